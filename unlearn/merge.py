"""The `unlearn merge` job: one averaged (or folded) model, or one per α with the trade-off table.

The arithmetic is `averaging`'s; this module finds the inputs (the paths given, or the
last run's), writes the models, and for an α sweep measures each model through
`measure.Measurer` (the original first: its answers are what similarity compares with,
and it is the α = 1 row of the table).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from unlearn import averaging
from unlearn.config import MergeOptions
from unlearn.errors import UnlearnError, UsageError
from unlearn.log import log
from unlearn.outputs import atomic_output_dir, check_output_dir, refuse_output_over_inputs


def inputs(opts: MergeOptions) -> tuple[str, str | None, str | None]:
    """(BASE, TUNED, ADAPTER) from the arguments, or from the last run's record when none are given.

    A run that averaged its result (ULMR's --alpha) records the fine-tuned model before
    averaging (`tuned_adapter` or `tuned_model`): that is TUNED, so a new α starts from θ'
    again rather than averaging the average.
    """
    paths, adapter = opts.paths, opts.adapter
    wanted = 1 if adapter else 2
    if len(paths) == wanted:
        return paths[0], (paths[1] if wanted == 2 else None), adapter
    if paths:
        shape = "BASE (with --adapter)" if adapter else "BASE and TUNED, or neither"
        raise UsageError(f"merge takes {shape}; got {len(paths)} path(s)")
    from unlearn.paths import last_run_record

    run_dir, record = last_run_record("BASE (with --adapter)" if adapter else "BASE and TUNED paths")
    # the record is a file anyone can edit: a field that is not a path would fail later as an internal error
    if not isinstance(record, dict):
        raise UnlearnError(f"{run_dir / 'run.json'}: not a JSON object (the record of an `unlearn run`)")
    for field in ("base_model", "tuned_adapter", "tuned_model", "merged_model"):
        if record.get(field) is not None and not isinstance(record[field], str):
            raise UnlearnError(f"{run_dir / 'run.json'}: '{field}' is not a path (a string): "
                               f"{json.dumps(record[field])}")
    if not record.get("base_model"):
        raise UnlearnError(f"{run_dir / 'run.json'}: has no 'base_model' to merge")
    if adapter:
        found = record["base_model"], None, adapter
    elif record.get("tuned_adapter"):
        found = record["base_model"], None, record["tuned_adapter"]
    elif isinstance(record.get("adapter"), str) and isinstance(record.get("config"), dict) and \
            record["config"].get("dtype") not in (None, "float32"):
        # A half-precision run of a float32 base wrote its merged model in its own dtype, which merge does not
        # average with the base's; its adapter is the same update, folded in float32 and written in BASE's dtype.
        found = record["base_model"], None, record["adapter"]
    elif record.get("tuned_model") or record.get("merged_model"):
        found = record["base_model"], record.get("tuned_model") or record["merged_model"], None
    else:
        raise UnlearnError(f"{run_dir / 'run.json'}: has no 'merged_model' to merge")
    log(f"unlearn: merging the last run ({run_dir})")  # once the record is found usable: a refusal is one line
    return found


def _stem(path: str) -> str:
    """The name a default output is made from: PATH itself, or its full path when PATH is "." or ".."
    (run from inside TUNED, "." would give ".-avg0.5" in the same directory)."""
    return str(Path(path).resolve()) if Path(path).name in ("", ".", "..") else path.rstrip("/")


def _write(base, tuned, adapter, target: Path, alpha: float | None, opts: MergeOptions, **progress):
    common = dict(max_shard_size=opts.max_shard_bytes, allow_extrapolation=opts.allow_extrapolation, **progress)
    if adapter:
        return averaging.fold_lora(Path(base), Path(adapter), target, alpha=alpha or 0.0, **common)
    return averaging.average(Path(base), Path(tuned), target, alpha, **common)


def merge_one(opts: MergeOptions, progress=None) -> dict:
    """One model: BASE and TUNED averaged at --alpha, or ADAPTER folded into BASE (scaled by 1−α)."""
    alpha = opts.alphas[0] if opts.alphas else None
    # before the last run is read (`inputs`): a usage error is one line, and the same whether a run is recorded
    if opts.adapter is None and alpha is None:
        raise UsageError("--alpha is required to average two models (e.g. --alpha 0.5)")
    base, tuned, adapter = inputs(opts)
    output, default = opts.output, opts.output is None
    if default:
        stem = _stem(adapter or tuned)
        output = f"{stem}-merged" if alpha is None else f"{stem}-avg{averaging.alpha_label(alpha)}"
        # checked first, so the refusal says the name was chosen here: "-o X: is an input" quoted an option the
        # user never gave (TUNED-avgALPHA can be BASE), and a non-empty X would have asked for --force
        refuse_output_over_inputs(output, [base, tuned, adapter], inside_too=True, default=True)

    def start(total: int) -> None:
        # Called once every check has passed (the output, the inputs, their tensors): the chosen default
        # output is named only then, never before a refusal of it
        if default:
            log(f"unlearn: writing to {output}")
        if progress:
            progress.start(total)

    hooks = dict(progress=progress.update if progress else None, on_start=start)
    try:
        result = _write(base, tuned, adapter, Path(output), alpha, opts, force=opts.force, **hooks)
    finally:
        if progress:
            progress.close()
    return {"output": str(Path(output).resolve()), "alpha": alpha if alpha is not None else 0.0,
            "base": str(Path(base).resolve()),
            **({"adapter": str(Path(adapter).resolve())} if adapter else {"tuned": str(Path(tuned).resolve())}),
            "tensors": result.tensors, "bytes": result.bytes, "seconds": round(result.seconds, 3)}


def sweep(opts: MergeOptions) -> dict:
    """OUT/alpha-A for each α and, with evaluation sets, each measured and the trade-off table written.

    Everything goes into a temporary directory that becomes OUT only when complete.
    """
    from unlearn import models
    from unlearn.measure import Measurer, Settings, read_eval_sets
    from unlearn.tables import table_markdown, write_tables

    sets = read_eval_sets(opts.eval_forget, opts.eval_retain, need_reference=True)
    base, tuned, adapter = inputs(opts)
    out = Path(opts.output if opts.output is not None else f"{_stem(adapter or tuned)}-alphas")
    started = time.perf_counter()
    if opts.output is None:  # the name chosen here: a refusal says so, before any "exists, use --force"
        refuse_output_over_inputs(out, [base, tuned, adapter], inside_too=True, default=True)
        refuse_output_over_inputs(out, [*opts.eval_forget, *opts.eval_retain], default=True)
    check_output_dir(out, opts.force)
    # each α's model goes to OUT/alpha-A, and OUT is replaced whole: refuse an OUT that is, or holds, a
    # model or file this sweep reads (with --force it would be deleted), as one α's merge does
    refuse_output_over_inputs(out, [base, tuned, adapter], inside_too=True)
    refuse_output_over_inputs(out, [*opts.eval_forget, *opts.eval_retain])
    averaging.check_mergeable(Path(base), Path(tuned) if tuned else None, Path(adapter) if adapter else None)
    kinds = {s.name: s.kind for s in sets}
    settings = Settings(max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size, likelihood=False)

    def measured(path, baseline=None, cache=False):
        from unlearn.generation import check_sets_fit
        from unlearn.measure_cache import weights_fingerprint

        loaded = models.load_model(str(path), log=log)
        check_sets_fit(loaded.model, loaded.tokenizer, sets, opts.max_new_tokens, "--max-new-tokens",
                       whose=str(path))  # FILE:LINE for a row past OPT's position table, not an IndexError
        # The original's answers are reused across sweeps and runs (measure_cache.py), keyed by content.
        fingerprint = f"{weights_fingerprint(loaded.path)}|float32|cpu" if cache and not opts.no_cache else None
        result = Measurer(loaded.model, loaded.tokenizer, settings, fingerprint=fingerprint,
                          own_fluency=True).measure(sets, baseline)  # no fluency scorer: each model scores itself
        del loaded
        gc.collect()
        return result

    scores, per_alpha, base_score, base_outputs = [], {}, None, None
    with atomic_output_dir(out, opts.force) as tmp:
        if sets:
            log("α selection: measuring the original model")
            original = measured(base, cache=True)
            base_outputs = {name: m.outputs for name, m in original.items()}
            summaries = {name: m.summary for name, m in original.items()}
            for s in sets:  # the original against itself: similarity 1 by definition
                if s.kind == "retain":
                    summaries[s.name]["similarity_to_reference"] = 1.0
            base_score = averaging.score(1.0, summaries, kinds)
        # A default output is named once every refusal is behind, the rows' fit in BASE's context too (read as
        # BASE loads, in `measured`): nothing claims to write what it then refuses.
        if opts.output is None:
            log(f"unlearn: writing to {out}")
        for alpha in opts.alphas:
            label = averaging.alpha_label(alpha)
            target = tmp / f"alpha-{label}"
            log(f"α selection: writing and measuring α={label}" if sets else f"writing α={label}")
            _write(base, tuned, adapter, target, alpha, opts)
            if not sets:
                continue
            summaries = {name: m.summary for name, m in measured(target, base_outputs).items()}
            per_alpha[label] = summaries
            scores.append(averaging.score(alpha, summaries, kinds))
        result = {"output": str(out.resolve()),
                  "models": {label: str((out / f"alpha-{label}").resolve())
                             for label in map(averaging.alpha_label, opts.alphas)}}
        if sets:
            chosen, reason = averaging.recommend(scores, opts.max_leak)
            result.update(averaging.report(scores, chosen, reason, opts.max_leak, base_score,
                                           {"sets": per_alpha, "base": base, "tuned": tuned, "adapter": adapter,
                                            "max_new_tokens": opts.max_new_tokens}))
            result["files"] = write_tables(tmp, result, log=log)
            result["table"] = table_markdown(scores, chosen, reason, base_score)
        result["seconds"] = round(time.perf_counter() - started, 3)
    return result
