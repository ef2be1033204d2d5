"""The `unlearn run` job: data -> model -> before -> unlearn -> after -> outputs.

Order matters for the user: every input file is read and validated, and the
output directory checked, before the model loads, so a typo fails in a second.
The "before" numbers come from the same weights with the adapters off (no
second model in memory). Outputs are written into a temporary directory and
moved into place only when complete. Checkpoints (--save-every, Ctrl-C) are the
exception: they must outlive a crash, so they go into OUTPUT/checkpoints while
the run goes on, and --resume continues from the latest (checkpoints.py).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from unlearn.data import read_examples
from unlearn.evaluate import SimilarityJudge, leak_flags, rate
from unlearn.errors import Interrupted, UnlearnError, UsageError
from unlearn.lora import LoraSettings
from unlearn.outputs import check_output_dir
from unlearn.train import TrainConfig


@dataclass
class RunOptions:
    forget: Path
    normal: Path
    model: str | None = None
    output: Path | None = None
    force: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    full: bool = False
    dtype: str = "float32"
    device: str | None = None
    judge: str | None = None
    judge_label: str | None = None
    eval_forget: tuple[Path, ...] = ()  # more prompts that must not leak (paraphrases, unseen attempts)
    eval_retain: tuple[Path, ...] = ()  # knowledge that must survive (held-out questions)
    eval_limit: int = 64
    max_new_tokens: int = 48
    gen_batch_size: int = 16
    trust_remote_code: bool = False
    allow_pickle: bool = False
    save_every: int = 0  # steps between checkpoints in OUTPUT/checkpoints (0: only on Ctrl-C)
    resume: bool = False  # continue the run in OUTPUT from its latest checkpoint
    command: str | None = None  # the command line, for the "how to resume" hint
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    fsdp: bool = False  # under torchrun: shard the model (FSDP2) instead of replicating it (DDP)
    # ULMR (and parameter averaging for any method)
    augmented: Path | None = None  # ULMR's training rows, from `unlearn augment`; else generated here
    rewrites: int = 2  # rewrites per forget prompt when augmenting here
    alpha: str | None = None  # θa = α·θ + (1−α)·θ': a number, "auto", or None (ulmr: auto; others: none)
    alpha_grid: tuple[float, ...] = ()  # the α that "auto" tries [default: alpha_selection.AUTO_GRID]
    max_leak: float = 0.1  # "auto": the forget leak an α must reach to be chosen


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_output_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


@dataclass
class Split:
    """One set of prompts evaluated before and after.

    kind "forget": the rows' own responses are what must not come out (leak, harmful).
    kind "retain": what must survive (accuracy on `answers`, similarity to the original's
    outputs); its leak and harmful rates are measured against the forget responses.
    """

    name: str
    kind: str
    examples: list
    path: Path | None = None
    references: list | None = None  # what the metrics compare with (set once the tokenizer is known)
    before: dict | None = None
    after: dict | None = None
    base_outputs: list | None = None


def _references(split: Split, tokenizer, budget: int) -> list:
    """The split's rows as the metrics see them, tokenised once for before and after.

    Responses are cut to the generation budget; a retain split's responses are not
    forbidden, so they are dropped (its accuracy comes from `answers`).
    """
    from unlearn.evaluate import clip_references

    if split.kind == "retain":
        return [replace(e, response=None) for e in split.examples]
    return clip_references(split.examples, tokenizer, budget)


def _load_splits(opts: RunOptions, forget, normal) -> list[Split]:
    limit = opts.eval_limit
    splits = [Split("forget", "forget", forget[:limit]), Split("normal", "retain", normal[:limit])]
    seen = {"forget", "normal"}
    for kind, paths in (("forget", opts.eval_forget), ("retain", opts.eval_retain)):
        for path in paths:
            name = Path(path).stem
            while name in seen:
                name += "'"
            seen.add(name)
            splits.append(Split(name, kind, read_examples(path, need_response=False)[:limit], path=Path(path)))
    return splits


class _Evaluator:
    """Generates answers for a split and computes its metrics; the model's state decides before/after."""

    def __init__(self, opts: RunOptions, model, tokenizer, reference_scorer, forget_references, judge):
        from unlearn.evaluate import Scorer

        self.opts, self.model, self.tokenizer = opts, model, tokenizer
        self.judge = judge
        self.forget = forget_references
        self.scorer = Scorer(model, tokenizer, batch_size=opts.gen_batch_size)
        self.reference_scorer = reference_scorer

    def outputs(self, split: Split, desc: str) -> list[str]:
        from unlearn.generation import generate

        return generate(self.model, self.tokenizer, [e.prompt for e in split.examples],
                        batch_size=self.opts.gen_batch_size, max_new_tokens=self.opts.max_new_tokens, desc=desc)

    def metrics(self, split: Split, outputs: list[str]) -> dict:
        from unlearn.evaluate import evaluate_outputs

        examples = split.references
        summary = evaluate_outputs(outputs, examples, judge=self.judge, scorer=self.scorer,
                                   fluency_scorer=self.reference_scorer, reference_outputs=split.base_outputs).summary
        if split.kind == "retain":
            # Only the similarity judge compares with a reference; the others judge the output alone.
            reference_free = not isinstance(self.judge, SimilarityJudge)
            summary["harmful_rate"] = rate(self.judge.flags(outputs, examples) if reference_free
                                           else self.against_forget(self.judge.flags, outputs))
            summary["leak_rate"] = rate(self.against_forget(leak_flags, outputs))
        return summary

    def against_forget(self, flag, outputs: list[str]) -> list[bool]:
        """Per output: FLAG fires against at least one forget row (forget content surfacing elsewhere)."""
        per_row = [flag(outputs, [f] * len(outputs)) for f in self.forget]
        return [any(bool(x) for x in column) for column in zip(*per_row)]


def _reference_scorer(model, tokenizer, reference_model, batch_size):
    """Likelihoods under the original model: adapters off (LoRA) or the frozen copy (--full)."""
    from unlearn.evaluate import Scorer
    from unlearn.lora import adapters_disabled

    if reference_model is not None:
        return Scorer(reference_model, tokenizer, batch_size=batch_size)

    class AdaptersOffScorer(Scorer):
        def logprobs(self, pairs):
            with adapters_disabled(self.model):
                return super().logprobs(pairs)

    return AdaptersOffScorer(model, tokenizer, batch_size=batch_size)


def run(opts: RunOptions, log=_log) -> dict:
    """Do the whole job and return the record that run.json holds (and --json prints)."""
    from unlearn import distributed

    created: list[Path] = []  # OUTPUT, when made at the start for checkpoints
    # Under torchrun: join the process group for the run (distributed.py); otherwise a no-op.
    with distributed.session(opts.fsdp, opts.device) as world:
        try:
            return _run(opts, log, created)
        except BaseException:
            # A run that fails before its first checkpoint leaves no empty OUTPUT behind.
            for directory in created if world.is_main else ():
                if directory.is_dir() and not any(directory.iterdir()):
                    directory.rmdir()
            raise


def _run(opts: RunOptions, log, created: list) -> dict:
    import copy

    import torch

    from unlearn import distributed, models, system
    from unlearn.checkpoints import checkpoint_root, latest_checkpoint, load_checkpoint, save_checkpoint
    from unlearn.evaluate import clip_references, make_judge
    from unlearn.generation import generate
    from unlearn.lora import adapters_disabled, attach_lora
    from unlearn.paths import remember_last_run
    from unlearn.train import NonFiniteLoss, StopRequested, Unlearner, config_dict, train

    world = distributed.world()
    started = time.perf_counter()
    opts.train.validate()
    distributed.check_batch_size(opts.train.batch_size)  # --batch-size is global: each process takes a share
    if not opts.full:
        opts.lora.validate()
    models.torch_dtype(opts.dtype)  # a typo in --dtype fails before anything is read or loaded
    if opts.eval_limit < 1 or opts.max_new_tokens < 1 or opts.gen_batch_size < 1:
        raise UsageError("--eval-limit, --max-new-tokens and --gen-batch-size must be at least 1")
    forget = read_examples(opts.forget)
    normal = read_examples(opts.normal)
    alpha = _averaging_alpha(opts)
    augmented = _read_augmented(opts)
    splits = _load_splits(opts, forget, normal)
    output = Path(opts.output) if opts.output else default_output_dir()
    run_args = _run_args(opts)
    # Rank 0 alone checks and prepares OUTPUT (it may create it, or delete stale checkpoints), and
    # every rank gets its answer, run_args included (a resume takes --save-every from the checkpoint).
    resume_from, run_args = distributed.on_main(lambda: (_prepare_output(opts, output, run_args, created), run_args))
    torch.manual_seed(opts.train.seed)
    device = world.device if world.active else system.pick_device(opts.device)
    # A GGUF conversion or a download into the cache happens once, on rank 0, before every rank loads.
    distributed.on_main(lambda: models.resolve_model_dir(opts.model, log=log, allow_pickle=opts.allow_pickle))
    loaded = models.load_model(opts.model, dtype=opts.dtype, trust_remote_code=opts.trust_remote_code,
                               allow_pickle=opts.allow_pickle, log=log)
    # Under FSDP each rank moves only its shard to the device (distributed.wrap), never the whole model.
    model, tokenizer = (loaded.model if world.fsdp else loaded.model.to(device)), loaded.tokenizer
    log(f"model {loaded.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) on "
        f"{system.device_name(device)}")

    augment_stats = None
    if opts.train.method == "ulmr" and augmented is None:
        # Every rank trains on rank 0's rows (sampling may differ between devices).
        augmented, augment_stats = distributed.main_decides(_augment)(opts, model, tokenizer, forget, log)

    reference_model = None
    if opts.full:
        # Full fine-tuning changes every weight, so the reference must be a frozen copy.
        reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        attach_lora(model, opts.lora, seed=opts.train.seed)
    if opts.gradient_checkpointing:
        models.enable_gradient_checkpointing(model)
    # Under torchrun: DDP's wrapper (the training forward goes through it), or FSDP2 sharding in place.
    forward_model = distributed.wrap(model, reference_model)
    judge = make_judge(opts.judge, opts.judge_label)
    reference_scorer = _reference_scorer(model, tokenizer, reference_model, opts.gen_batch_size)
    for split in splits:
        split.references = _references(split, tokenizer, opts.max_new_tokens)
    forget_references = clip_references(forget, tokenizer, opts.max_new_tokens)
    evaluator = _Evaluator(opts, model, tokenizer, reference_scorer, forget_references, judge)

    eval_seconds = 0.0
    t = time.perf_counter()
    before_model = reference_model if reference_model is not None else model
    with adapters_disabled(model):
        before_eval = _Evaluator(opts, before_model, tokenizer, reference_scorer, forget_references, judge)
        for split in splits:
            split.base_outputs = before_eval.outputs(split, f"before: {split.name}")
            split.before = before_eval.metrics(split, split.base_outputs)
    eval_seconds += time.perf_counter() - t

    # The stop rule's references are cut to what its short answers can hold: a long forget
    # response could otherwise never read as leaked, and the rule would stop too early.
    check_rows = clip_references(splits[0].examples, tokenizer, opts.train.check_tokens)

    def forgotten():
        outputs = generate(model, tokenizer, [e.prompt for e in check_rows],
                           batch_size=opts.gen_batch_size, max_new_tokens=opts.train.check_tokens, desc=False)
        leak = rate(leak_flags(outputs, check_rows)) or 0.0
        return leak <= opts.train.stop_leak, leak

    forgotten = distributed.main_decides(forgotten)  # every rank generates; rank 0's verdict holds for all

    train_rows = augmented if opts.train.method == "ulmr" else forget
    unlearner = Unlearner(model, tokenizer, train_rows, normal, opts.train, reference_model=reference_model)
    unlearner.forward_model = forward_model
    loop_state = None
    if resume_from is not None:
        loop_state = load_checkpoint(resume_from, unlearner)
        log(f"resuming from {resume_from} (step {unlearner.step_count})")
    save_every = run_args["save_every"]

    def checkpoint(loop: dict) -> Path:
        return save_checkpoint(output, unlearner, loop, run_args)

    try:
        result = train(unlearner, forgotten=forgotten if opts.train.check_every else None, log=log,
                       save_every=save_every, checkpoint=checkpoint, resume=loop_state)
    except StopRequested as stop:
        command = opts.command or "unlearn run ..."
        if not opts.output:
            command += f" -o {shlex.quote(str(output))}"
        if "--resume" not in command.split():
            command += " --resume"
        if world.active:  # the launcher's own arguments are not ours to know
            command = "torchrun <the same launcher arguments> -m " + command
        raise Interrupted(f"interrupted after step {stop.step}; saved {stop.checkpoint}; "
                          f"to continue: {command}") from None
    except NonFiniteLoss as exc:
        last = latest_checkpoint(output)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved (see --save-every)"
        raise UnlearnError(f"{exc}; stopped without writing the model; {kept}; try a lower --lr") from None
    result.tokens = distributed.total(result.tokens)  # every process's tokens
    log(f"stopped after {result.steps} steps ({result.stopped_by}); {result.tokens_per_s:.0f} tokens/s")

    t = time.perf_counter()
    averager, selection = None, None
    if alpha is not None:
        from unlearn.model_average import ModelAverage

        averager = ModelAverage(model, reference_model)
        if alpha == "auto":
            # Every rank measures (FSDP's forwards need them all); rank 0's choice holds for all.
            alpha, selection = distributed.main_decides(_choose_alpha)(opts, averager, evaluator, splits, log)
        averager.apply(alpha)
        log(f"parameter averaging: α={alpha:g}" + (f" ({selection['reason']})" if selection else ""))
    for split in splits:
        if selection is None:
            split.after = evaluator.metrics(split, evaluator.outputs(split, f"after: {split.name}"))
        else:  # measured while choosing α
            split.after = selection["sets"][f"{alpha:g}"][split.name]
    eval_seconds += time.perf_counter() - t

    record = {
        "command": "run",
        "base_model": str(Path(loaded.path).resolve()),
        "model_name": loaded.name,
        "method": opts.train.method,
        "full": opts.full,
        "seed": opts.train.seed,
        "config": {**config_dict(opts.train), "dtype": opts.dtype, "full": opts.full,
                   "lora": None if opts.full else {"rank": opts.lora.rank, "alpha": opts.lora.alpha,
                                                    "dropout": opts.lora.dropout, "targets": list(opts.lora.targets)},
                   "judge": evaluator.judge.name, "max_new_tokens": opts.max_new_tokens,
                   "eval_limit": opts.eval_limit},
        "data": {name: {"path": str(Path(p).resolve()), "sha256": system.file_sha256(p), "rows": n}
                 for name, p, n in [("forget", opts.forget, len(forget)), ("normal", opts.normal, len(normal))]
                 + [(s.name, s.path, len(s.examples)) for s in splits[2:]]
                 + ([("augmented", opts.augmented, len(augmented))] if opts.augmented else [])},
        "versions": system.package_versions(),
        "device": system.device_name(device),
        "distributed": world.describe(),
        "judge": evaluator.judge.name,
        "steps": result.steps,
        "stopped_by": result.stopped_by,
        "train_seconds": round(result.seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "alpha": alpha,
        "alpha_selection": selection,  # the table, the reason, and every set's metrics at each α
        "augment": (augment_stats.as_dict() if augment_stats else {"file": str(Path(opts.augmented).resolve()),
                                                                    "rows": len(augmented)})
        if opts.train.method == "ulmr" else None,
        "before": {s.name: s.before for s in splits},
        "after": {s.name: s.after for s in splits},
        "history": result.history,
    }

    output_abs = output.resolve()
    # With checkpoints in OUTPUT (which is ours: checked empty or --force at the start) the
    # finished result replaces the directory, checkpoints included.
    replace_existing = opts.force or checkpoint_root(output).is_dir()
    trained = _gather_trained(model, averager)  # FSDP: the weights, whole, on rank 0 (every rank takes part)

    def write() -> dict:  # on rank 0 only
        target, target_averager = model, averager
        if trained is not None:  # FSDP: write an unsharded copy, not the shards
            target, target_averager = _unsharded(opts, trained, averager)
        try:
            _write_outputs(opts, record, target, tokenizer, output, output_abs, replace_existing, started, device,
                           averager=target_averager, augmented=augmented if augment_stats else None)
        except OSError as exc:
            root = checkpoint_root(output)
            kept = f"; the checkpoints in {root} are kept" if root.is_dir() else ""
            raise UnlearnError(f"{output}: could not write the output ({exc.strerror or exc}); "
                               f"nothing was written{kept}") from None
        remember_last_run(output)
        return record

    return distributed.on_main(write)  # every rank returns rank 0's completed record


def _gather_trained(model, averager) -> dict | None:
    """Under FSDP, the fine-tuned (pre-averaging) trainable weights gathered whole on rank 0; else None."""
    from unlearn import distributed

    if not distributed.world().fsdp:
        return None
    chosen = averager.alpha if averager is not None else None
    if averager is not None:
        averager.apply(0.0)  # theta', so that rank 0's copy can be averaged (and the tuned adapter written)
    trained = distributed.trained_weights(model)
    if averager is not None:
        averager.apply(chosen)
    return {"weights": trained, "alpha": chosen}


def _unsharded(opts: RunOptions, trained: dict, averager):
    """Rank 0 under FSDP: the base model again, on the CPU, with the gathered fine-tuned weights (and averager)."""
    from unlearn import models
    from unlearn.lora import attach_lora

    def base():
        return models.load_model(opts.model, dtype=opts.dtype, trust_remote_code=opts.trust_remote_code,
                                 allow_pickle=opts.allow_pickle, log=lambda m: None).model

    copy = base()
    if not opts.full:
        attach_lora(copy, opts.lora, seed=opts.train.seed)
    unexpected = copy.load_state_dict(trained["weights"], strict=False).unexpected_keys
    if unexpected:
        raise UnlearnError(f"internal: gathered weights do not fit the model (e.g. {unexpected[0]})")
    copy_averager = None
    if averager is not None:
        from unlearn.model_average import ModelAverage

        copy_averager = ModelAverage(copy, base() if opts.full else None)
        copy_averager.apply(trained["alpha"])
    return copy, copy_averager


def _write_outputs(opts, record, model, tokenizer, output, output_abs, replace_existing, started, device, *,
                   averager=None, augmented=None) -> None:
    from unlearn import models, system
    from unlearn.lora import merge_lora, save_adapter
    from unlearn.outputs import atomic_output_dir, write_jsonl

    with atomic_output_dir(output, force=replace_existing) as tmp:
        if averager is not None:
            # θ' before averaging, so that `unlearn merge --alpha` can pick another α later.
            chosen = averager.alpha
            averager.apply(0.0)
            if opts.full:
                models.save_model(model, tokenizer, tmp / "tuned-model")
                record["tuned_model"] = str(output_abs / "tuned-model")
            else:
                save_adapter(model, opts.lora, tmp / "tuned-adapter", base_model=record["base_model"])
                record["tuned_adapter"] = str(output_abs / "tuned-adapter")
            averager.apply(chosen)
        if augmented is not None:
            write_jsonl(tmp / "augmented.jsonl", [{"prompt": e.prompt, "response": e.response, **e.extra}
                                                  for e in augmented])
            record["augmented"] = str(output_abs / "augmented.jsonl")
        if record["alpha_selection"] is not None:  # --alpha auto
            from unlearn.alpha_selection import write_tables

            write_tables(tmp, record["alpha_selection"], log=_log)
        if not opts.full:
            save_adapter(model, opts.lora, tmp / "adapter", base_model=record["base_model"])
            merge_lora(model)
        models.save_model(model, tokenizer, tmp / "model")
        record.update({
            "output": str(output_abs),
            "adapter": None if opts.full else str(output_abs / "adapter"),
            "merged_model": str(output_abs / "model"),
            "peak_memory_mb": round(system.peak_memory_mb(device), 1),
            "wall_clock_s": round(time.perf_counter() - started, 3),
        })
        (tmp / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def _run_args(opts: RunOptions) -> dict:
    """What a resumed run must share with the run it continues (recorded in every checkpoint)."""
    from unlearn import system
    from unlearn.train import config_dict

    if opts.save_every < 0:
        raise UsageError(f"--save-every {opts.save_every}: must be 0 (off) or a number of steps")
    model = opts.model
    if model and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return {
        "train": config_dict(opts.train),
        "lora": None if opts.full else {"rank": opts.lora.rank, "alpha": opts.lora.alpha,
                                        "dropout": opts.lora.dropout, "targets": list(opts.lora.targets)},
        "full": opts.full, "dtype": opts.dtype, "model": model,
        "data": {"forget": system.file_sha256(opts.forget), "normal": system.file_sha256(opts.normal),
                 **({"augmented": system.file_sha256(opts.augmented)} if opts.augmented else {})},
        "alpha": opts.alpha, "rewrites": opts.rewrites,
        "save_every": opts.save_every,
    }


def _prepare_output(opts: RunOptions, output: Path, run_args: dict, created: list) -> Path | None:
    """Check OUTPUT before the model loads; with --resume, return the checkpoint to continue from.

    With --save-every the checkpoints go into OUTPUT while the run goes on, so OUTPUT is
    created now (empty, or --force); stale checkpoints of an earlier run there are removed.
    """
    import shutil

    from unlearn.checkpoints import checkpoint_root, latest_checkpoint, read_state, remove_partial

    if not opts.resume:
        check_output_dir(output, opts.force)
        if checkpoint_root(output).is_dir():
            shutil.rmtree(checkpoint_root(output))
        if opts.save_every and not output.exists():
            output.mkdir(parents=True)
            created.append(output)
        return None
    if not opts.output:
        raise UsageError("--resume needs -o OUT, the directory of the run to continue")
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: exists and is not a directory")
    checkpoint = latest_checkpoint(output)
    if checkpoint is None:
        raise UnlearnError(f"{output}: no checkpoint to resume from (expected {checkpoint_root(output)}/step-N, "
                           f"written by --save-every or by Ctrl-C)")
    saved = read_state(checkpoint).get("args", {})
    for key, value in run_args.items():
        if key == "save_every":
            continue
        if saved.get(key) != json.loads(json.dumps(value, default=str)):
            raise UsageError(f"--resume: the arguments differ from the checkpointed run's ({key}); "
                             f"give the same arguments, or start afresh with --force")
    if not run_args["save_every"]:
        run_args["save_every"] = saved.get("save_every", 0)
    remove_partial(output)
    return checkpoint



def _averaging_alpha(opts: RunOptions):
    """--alpha as None (no averaging), a number, or "auto"; ULMR averages by default (auto)."""
    from unlearn.alpha_selection import parse_alphas

    if opts.alpha is None:
        return "auto" if opts.train.method == "ulmr" else None
    parsed = parse_alphas(str(opts.alpha), allow_auto=True)
    if parsed == "auto":
        if not 0 <= opts.max_leak <= 1:
            raise UsageError(f"--max-leak {opts.max_leak}: must be in [0, 1]")
        return "auto"
    if len(parsed) != 1:
        raise UsageError(f"--alpha {opts.alpha}: give one α, or auto (to compare several, use unlearn merge)")
    return parsed[0]


def _read_augmented(opts: RunOptions):
    if opts.augmented is None:
        return None
    if opts.train.method != "ulmr":
        raise UsageError("--augmented is ULMR's training data: use it with --method ulmr")
    return read_examples(opts.augmented)


def _augment(opts: RunOptions, model, tokenizer, forget, log):
    """ULMR's rewritten prompts and negative responses, made by the model being unlearned."""
    from unlearn.augment import augment
    from unlearn.data import Example

    t = time.perf_counter()
    rows, stats = augment(model, tokenizer, forget, rewrites=opts.rewrites, seed=opts.train.seed,
                          batch_size=opts.gen_batch_size, log=log)
    log(f"augment: {stats.summary()} ({time.perf_counter() - t:.0f} s)")
    examples = [Example(r["prompt"], r["response"], i, {k: v for k, v in r.items() if k not in ("prompt", "response")})
                for i, r in enumerate(rows, start=1)]
    return examples, stats


def _choose_alpha(opts: RunOptions, averager, evaluator, splits, log):
    """--alpha auto: measure every split at each α of the grid and apply `alpha_selection.recommend`."""
    from unlearn.alpha_selection import AUTO_GRID, recommend, report, score, table_markdown

    grid = opts.alpha_grid or AUTO_GRID
    kinds = {s.name: s.kind for s in splits}
    per_alpha, scores = {}, []
    for alpha in grid:
        averager.apply(alpha)
        per_alpha[f"{alpha:g}"] = {s.name: evaluator.metrics(s, evaluator.outputs(s, f"α={alpha:g}: {s.name}"))
                                   for s in splits}
        scores.append(score(alpha, per_alpha[f"{alpha:g}"], kinds))
        best = scores[-1]
        log(f"α={alpha:g}: forget leak {best.forget_leak:.2f}, retain score "
            f"{best.retain_score if best.retain_score is not None else float('nan'):.2f}")
    chosen, reason = recommend(scores, opts.max_leak)
    log(table_markdown(scores, chosen, reason).rstrip())
    selection = report(scores, chosen, reason, opts.max_leak)
    selection["sets"] = per_alpha
    return chosen, selection
