"""The command line: parse, call, print. No training logic lives here.

Results go to stdout (a table, or one JSON object with --json); progress and
logs go to stderr. Exit codes: 0 success, 1 runtime error, 2 usage error.
Heavy imports (torch, transformers) happen inside the commands so that
`unlearn --help` starts fast.
"""

from __future__ import annotations

import json
import os
import sys

import click

from unlearn.errors import UnlearnError, UsageError


def echo_err(message: str) -> None:
    click.echo(message, err=True)


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=None, sort_keys=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="unlearn")
def cli():
    """Make a language model forget specific outputs with a short fine-tune."""


# --- commands are registered below; each lives in its own section ---------


# === run (run.py) ===


_ARGV: list[str] = []  # the arguments main() was given, for hints such as how to resume


def _command_line() -> str:
    import shlex

    return shlex.join(["unlearn", *_ARGV])


ULMR_STOP_LEAK, ULMR_EXTRA_STEPS = 0.1, 4


def _split_targets(value: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in value.split(",") if t.strip())
    if not targets:
        raise click.BadParameter("give at least one module name, e.g. q_proj,v_proj")
    return targets


@cli.command("run")
@click.argument("forget", type=click.Path(path_type=str))
@click.argument("normal", type=click.Path(path_type=str))
@click.option("--model", default=None, envvar="UNLEARN_MODEL",
              help="HF directory, hub id or .gguf file [default: embedded SmolLM2-135M-Instruct; env UNLEARN_MODEL].")
@click.option("--method", default="ga", show_default=True,
              type=click.Choice(["ga", "ga+mismatch", "ga+template", "graddiff", "npo", "ulmr"]),
              help="ga: gradient ascent + KL; ga+mismatch: + random normal answers; ga+template: + a fixed "
                   "refusal; graddiff: ascent + NLL on normal; npo: negative preference optimisation + KL; "
                   "ulmr: fine-tune on rewritten prompts with negative responses (+ KL), then average with α.")
@click.option("-o", "--output", default=None, help="Output directory [default: runs/<timestamp>].")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--lr", type=float, default=None, help="Learning rate [default: 1e-3 with LoRA, 1e-5 with --full].")
@click.option("--batch-size", type=int, default=4, show_default=True,
              help="Forget (and normal) rows per micro-batch; under torchrun, in all (each process takes a share).")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimiser step.")
@click.option("--max-steps", type=int, default=150, show_default=True, help="Cap on optimiser steps.")
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option("--schedule", type=click.Choice(["constant", "linear"]), default="constant", show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping (0: off).")
@click.option("--forget-weight", type=float, default=0.5, show_default=True, help="eps1, weight of L_fgt.")
@click.option("--mismatch-weight", type=float, default=1.0, show_default=True, help="eps2, weight of L_rdn.")
@click.option("--normal-weight", type=float, default=10.0, show_default=True,
              help="eps3, weight of L_nor (the KL to the original on normal data).")
@click.option("--forget-tokens", type=click.Choice(["answers", "response"]), default="answers", show_default=True,
              help="Which tokens the forget loss pushes down: for rows with `answers`, only the tokens that spell "
                   "an answer (the fact, not the words around it); or every response token.")
@click.option("--template", default="I can't help with that.", show_default=True,
              help="The refusal that ga+template teaches.")
@click.option("--npo-beta", type=float, default=0.1, show_default=True)
@click.option("--check-every", type=int, default=1, show_default=True,
              help="Steps between checks of the stop rule (0: no checks, run --max-steps).")
@click.option("--stop-leak", type=float, default=None,
              help="Stop once the forget prompts' leak rate is at or below this [default: 0; ulmr: 0.1].")
@click.option("--extra-steps", type=int, default=None,
              help="Steps to keep going after the stop rule fires [default: 0; ulmr: 4].")
@click.option("--max-length", type=int, default=256, show_default=True, help="Tokens per training row (prompt+response).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--full", is_flag=True, help="Fine-tune every weight instead of LoRA (keeps a frozen reference copy).")
@click.option("--gradient-checkpointing", is_flag=True,
              help="Recompute activations in backward: about 40% less peak memory, 30% more time (large models).")
@click.option("--fsdp", is_flag=True,
              help="Under torchrun: shard parameters, gradients and optimiser state over the processes (FSDP) "
                   "instead of a full model copy per process (DDP), for models that do not fit on one device.")
@click.option("--lora-rank", type=int, default=8, show_default=True)
@click.option("--lora-alpha", type=float, default=16.0, show_default=True)
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@click.option("--lora-targets", default=None,
              help="Comma-separated module names; names absent from the model are skipped "
                   "[default: the feed-forward layers: gate_proj,up_proj,down_proj (Llama, Mistral, Qwen), "
                   "fc1,fc2 (OPT, Phi), dense_h_to_4h,dense_4h_to_h (GPT-NeoX, Falcon)].")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda when available].")
@click.option("--judge", default=None, help="Harmful-rate judge: similarity (default), keywords:FILE, classifier:PATH.")
@click.option("--judge-label", default=None, help="The classifier judge's unsafe label.")
@click.option("--eval-forget", multiple=True, type=click.Path(path_type=str),
              help="More prompts whose answers must not come out (e.g. paraphrases); repeatable.")
@click.option("--eval-retain", multiple=True, type=click.Path(path_type=str),
              help="Knowledge that must survive (rows with `answers`); repeatable.")
@click.option("--eval-limit", type=int, default=64, show_default=True, help="Rows evaluated per set.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True, help="Tokens generated per evaluated prompt.")
@click.option("--gen-batch-size", type=int, default=16, show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code (off by default).")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin pickle weights (loaded with weights_only=True).")
@click.option("--save-every", type=int, default=0, show_default=True,
              help="Write a checkpoint to OUT/checkpoints every N steps (0: only on Ctrl-C); OUT is created at once.")
@click.option("--resume", is_flag=True,
              help="Continue the run in -o OUT from its latest checkpoint (give the same arguments).")
@click.option("--augmented", type=click.Path(path_type=str), default=None,
              help="ulmr: training rows from `unlearn augment` [default: augment FORGET with the model now].")
@click.option("--rewrites", type=int, default=2, show_default=True, help="ulmr: rewrites per forget prompt.")
@click.option("--alpha", default=None,
              help="Average the result with the original: θa = α·θ + (1−α)·θ' (a number in [0, 1], or auto: "
                   "measure --alpha-grid and take the α that keeps most with forget leak ≤ --max-leak) "
                   "[default: auto with ulmr, no averaging otherwise].")
@click.option("--alpha-grid", default="0,0.2,0.4,0.6,0.8", show_default=True, help="The α that --alpha auto tries.")
@click.option("--max-leak", type=float, default=0.1, show_default=True,
              help="--alpha auto: the forget leak rate an α must reach.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def run_command(forget, normal, model, method, output, force, lr, batch_size, grad_accum, max_steps, warmup_steps,
                schedule, max_grad_norm, forget_weight, mismatch_weight, normal_weight, forget_tokens, template, npo_beta,
                check_every, stop_leak, extra_steps, max_length, seed, full, gradient_checkpointing, fsdp, lora_rank, lora_alpha, lora_dropout,
                lora_targets, dtype, device, judge, judge_label, eval_forget, eval_retain, eval_limit, max_new_tokens,
                gen_batch_size, trust_remote_code, allow_pickle, save_every, resume, augmented, rewrites, alpha,
                alpha_grid, max_leak, as_json):
    """Unlearn the FORGET.jsonl answers while keeping NORMAL.jsonl behaviour; report before and after."""
    from pathlib import Path

    from unlearn.alpha_selection import parse_alphas
    from unlearn.lora import MLP_TARGETS, LoraSettings
    from unlearn.run import RunOptions, run
    from unlearn.train import TrainConfig

    # ULMR's fine-tune has a minimum, so it cannot collapse the way ascent does; but the last
    # leaking prompt can take many steps to go (measured: one of 14 stayed for 10 steps), so it
    # stops at the leak that α selection asks for and trains a few steps more to leave room for α.
    ulmr = method == "ulmr"
    stop_leak = stop_leak if stop_leak is not None else (ULMR_STOP_LEAK if ulmr else 0.0)
    extra_steps = extra_steps if extra_steps is not None else (ULMR_EXTRA_STEPS if ulmr else 0)
    train = TrainConfig(
        method=method, forget_weight=forget_weight, mismatch_weight=mismatch_weight, normal_weight=normal_weight,
        lr=lr if lr is not None else (1e-5 if full else 1e-3), batch_size=batch_size, grad_accum=grad_accum,
        max_steps=max_steps, warmup_steps=warmup_steps, schedule=schedule, max_grad_norm=max_grad_norm,
        max_length=max_length, seed=seed, check_every=check_every, stop_leak=stop_leak, extra_steps=extra_steps,
        template=template, npo_beta=npo_beta, forget_tokens=forget_tokens,
    )
    opts = RunOptions(
        forget=Path(forget), normal=Path(normal), model=model, output=Path(output) if output else None, force=force,
        train=train, lora=LoraSettings(lora_rank, lora_alpha, lora_dropout, _split_targets(lora_targets) if lora_targets else MLP_TARGETS),
        full=full, gradient_checkpointing=gradient_checkpointing, fsdp=fsdp, dtype=dtype, device=device, judge=judge, judge_label=judge_label,
        eval_forget=tuple(Path(p) for p in eval_forget), eval_retain=tuple(Path(p) for p in eval_retain),
        eval_limit=eval_limit, max_new_tokens=max_new_tokens,
        gen_batch_size=gen_batch_size, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        save_every=save_every, resume=resume, command=_command_line(),
        augmented=Path(augmented) if augmented else None, rewrites=rewrites, alpha=alpha,
        alpha_grid=tuple(parse_alphas(alpha_grid)), max_leak=max_leak,
    )
    record = run(opts, log=echo_err)
    if as_json:
        print_json({k: v for k, v in record.items() if k != "history"})
    else:
        click.echo(format_run(record))


RUN_COLUMNS = (("harmful_rate", "harmful"), ("leak_rate", "leak"), ("accuracy", "accuracy"),
               ("similarity_to_reference", "similarity"), ("fluency_ppl", "fluency ppl"))


def _cell(value) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.2f}"


def format_run(record: dict) -> str:
    """The before -> after table of a run, then where things were written and what it cost."""
    header = ["set", "n"] + [label for _, label in RUN_COLUMNS]
    rows = []
    for name, before in record["before"].items():
        after = record["after"][name]
        rows.append([name, str(after["n"])] + [
            "-" if before.get(key) is None and after.get(key) is None
            else f"{_cell(before.get(key))} -> {_cell(after.get(key))}" for key, _ in RUN_COLUMNS])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines += [
        "",
        f"judge: {record['judge']}; similarity: ROUGE-L F against the original model's outputs",
        f"steps: {record['steps']} (stopped: {record['stopped_by']}); method: {record['method']}",
        *_ulmr_lines(record),
        f"wall clock: {record['wall_clock_s']:.1f} s (training {record['train_seconds']:.1f} s, "
        f"evaluation {record['eval_seconds']:.1f} s); {record['tokens_per_s']:.0f} tokens/s; "
        f"peak memory {record['peak_memory_mb']:.0f} MiB; device {record['device']}",
        f"merged model: {record['merged_model']}",
    ]
    if record.get("adapter"):
        lines.append(f"adapter: {record['adapter']}")
    return "\n".join(lines)


def _ulmr_lines(record: dict) -> list[str]:
    """What augmentation made and which α averaging used, when the run did either."""
    lines = []
    augment = record.get("augment")
    if augment and "rows" in augment and "sources" in augment:
        lines.append(f"augmented: {augment['rows']} rows from {augment['sources']} forget rows "
                     f"({augment['rewrite_fallbacks']} templated rewrites, {augment['response_fallbacks']} "
                     f"templated responses)")
    elif augment:
        lines.append(f"augmented: {augment['rows']} rows from {augment['file']}")
    if record.get("alpha") is not None:
        selection = record.get("alpha_selection")
        lines.append(f"averaged: α={record['alpha']:g}" + (f"; {selection['reason']}" if selection else ""))
    return lines


# === augment (augment.py) ===


@cli.command("augment")
@click.argument("forget", type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="The augmented JSONL to write.")
@click.option("--model", default=None, envvar="UNLEARN_MODEL",
              help="The model to be unlearned [default: embedded SmolLM2-135M-Instruct; env UNLEARN_MODEL].")
@click.option("--generator", default=None,
              help="Write the rewrites and negative responses with this model instead of --model.")
@click.option("--rewrites", type=int, default=2, show_default=True, help="Rewrites per forget prompt.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled rewrites.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Generation batch size.")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code (off by default).")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as one JSON object.")
def augment_command(forget, output, model, generator, rewrites, seed, batch_size, dtype, force, trust_remote_code,
                    as_json):
    """ULMR's data: rewrite each FORGET prompt and write a negative response for each (paper's prompts)."""
    import time

    from unlearn import models
    from unlearn.augment import augment
    from unlearn.data import read_examples
    from unlearn.outputs import check_writable, write_jsonl

    if rewrites < 0 or batch_size < 1:
        raise UsageError("--rewrites must be 0 or more and --batch-size at least 1")
    models.torch_dtype(dtype)
    examples = read_examples(forget)
    check_writable(output, force=force)
    started = time.perf_counter()
    loaded = models.load_model(generator or model, dtype=dtype, trust_remote_code=trust_remote_code, log=echo_err)
    rows, stats = augment(loaded.model, loaded.tokenizer, examples, rewrites=rewrites, seed=seed,
                          batch_size=batch_size, log=echo_err)
    write_jsonl(output, rows)
    result = {"output": os.path.abspath(output), "generator": loaded.name, **stats.as_dict(),
              "seconds": round(time.perf_counter() - started, 1)}
    if as_json:
        print_json(result)
    else:
        click.echo(f"{stats.summary()}\nrewrites rejected: {stats.rewrites_rejected or 'none'}\n"
                   f"responses rejected: {stats.responses_rejected or 'none'}\nwrote {result['output']} "
                   f"in {result['seconds']:.1f} s")


# === eval (evaluate.py) ===


@cli.command("eval")
@click.argument("prompts", type=click.Path(path_type=str))
@click.option("--model", default=None, help="Model to evaluate: HF directory, hub id or .gguf [default: embedded SmolLM2].")
@click.option("--reference-model", default=None,
              help="Original model: its outputs are the 'before' column, its perplexity measures fluency.")
@click.option("--forget", type=click.Path(path_type=str), default=None,
              help="JSONL of forget rows: references for PROMPTS rows without a response (matched by prompt).")
@click.option("--judge", default=None, help="similarity (default), keywords:FILE or classifier:PATH.")
@click.option("--judge-label", default=None, help="The classifier's unsafe label (name or index).")
@click.option("--holdout", type=click.Path(path_type=str), default=None,
              help="JSONL of unseen rows: membership-inference AUCs of the forget rows against these.")
@click.option("--reward-model", type=click.Path(path_type=str), default=None,
              help="A one-output HF sequence classifier: mean reward of (prompt, output).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--min-k", type=float, default=20.0, show_default=True, help="k (percent) of the min-k probability attack.")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--save-generations", type=click.Path(path_type=str), default=None,
              help="Write one JSON line per prompt: prompt, output, reference, scores.")
@click.option("--report", type=click.Path(path_type=str), default=None, help="Write a markdown report.")
@click.option("--force", is_flag=True, help="Replace existing --save-generations / --report files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def eval_command(prompts, model, reference_model, forget, judge, judge_label, holdout, reward_model, batch_size,
                 max_new_tokens, do_sample, temperature, top_p, seed, min_k, dtype, save_generations, report,
                 force, as_json):
    """Generate answers to PROMPTS and measure harmful, leak and hallucination rates, quality and memorisation.

    References for leak and harmful rates are the PROMPTS rows' responses, or
    the --forget rows with the same prompt. Metric definitions: docs/eval.md.
    """
    from pathlib import Path

    from unlearn import evaluate
    from unlearn.outputs import check_writable

    check_writable(save_generations, report, force=force)
    opts = evaluate.EvalOptions(
        prompts=Path(prompts), model=model, reference_model=reference_model,
        forget=Path(forget) if forget else None, holdout=Path(holdout) if holdout else None,
        judge=judge, judge_label=judge_label, reward_model=Path(reward_model) if reward_model else None,
        batch_size=batch_size, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
        top_p=top_p, seed=seed, min_k=min_k, dtype=dtype,
    )
    result = evaluate.run_eval(opts, log=echo_err)
    if save_generations:
        evaluate.write_generations(save_generations, result["rows"])
        echo_err(f"unlearn: wrote {len(result['rows'])} generations to {save_generations}")
    if report:
        evaluate.write_report(report, result)
        echo_err(f"unlearn: wrote the report to {report}")
    if as_json:
        print_json(evaluate.result_json(result))
    else:
        click.echo(evaluate.format_table(result))


# === merge (averaging.py) ===


@cli.command()
@click.argument("paths", nargs=-1, metavar="[BASE [TUNED]]", type=click.Path(path_type=str))
@click.option("--alpha", default=None,
              help="Weight of BASE: θa = α·BASE + (1−α)·TUNED (1 gives BASE back). Several, comma-separated "
                   "(0.2,0.4,0.6,0.8), write one model each and, with --eval-forget/--eval-retain, a trade-off "
                   "table and a recommended α. Required unless --adapter.")
@click.option("--adapter", "adapter", type=click.Path(path_type=str), default=None,
              help="Fold this PEFT LoRA adapter into BASE instead (W + s·B·A, scaled by 1−α when --alpha is given).")
@click.option("-o", "--output", type=click.Path(path_type=str), default=None,
              help="Output directory [default: TUNED-avgALPHA, ADAPTER-merged, or TUNED-alphas for several α].")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--max-shard-size", default=None, help="Re-shard the output, e.g. 2GB or 500MB [default: like BASE].")
@click.option("--allow-extrapolation", is_flag=True, help="Accept α outside [0, 1].")
@click.option("--eval-forget", multiple=True, type=click.Path(path_type=str),
              help="Prompts whose answers must not come out (rows with a response or `answers`); repeatable.")
@click.option("--eval-retain", multiple=True, type=click.Path(path_type=str),
              help="Knowledge that must survive (rows with `answers`; similarity to BASE's outputs); repeatable.")
@click.option("--max-leak", type=float, default=0.1, show_default=True,
              help="α selection: the forget leak rate an α must reach to be recommended.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True, help="α selection: tokens per answer.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="α selection: generation batch size.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def merge(paths, alpha, adapter, output, force, max_shard_size, allow_extrapolation, eval_forget, eval_retain,
          max_leak, max_new_tokens, batch_size, as_json):
    """Average two checkpoints (BASE TUNED), or fold a LoRA adapter into BASE; choose α.

    With no paths, BASE and TUNED are the base model and the fine-tuned model of
    the most recent `unlearn run`. Works tensor by tensor: memory stays flat.
    """
    from pathlib import Path

    from unlearn import averaging
    from unlearn.alpha_selection import parse_alphas

    alphas = parse_alphas(alpha, allow_extrapolation=allow_extrapolation) if alpha is not None else None
    if (eval_forget or eval_retain or (alphas and len(alphas) > 1)):
        return _merge_sweep(paths, alphas, adapter, output, force, max_shard_size, allow_extrapolation,
                            eval_forget, eval_retain, max_leak, max_new_tokens, batch_size, as_json)
    alpha = alphas[0] if alphas else None
    base, tuned, adapter = _merge_inputs(paths, adapter, alpha)
    if adapter is None and alpha is None:
        raise UsageError("--alpha is required to average two models (e.g. --alpha 0.5)")
    shard = averaging.parse_size(max_shard_size) if max_shard_size else None
    if output is None:
        stem = (adapter or tuned).rstrip("/")
        output = f"{stem}-merged" if alpha is None else f"{stem}-avg{alpha:g}"
        echo_err(f"unlearn: writing to {output}")
    progress = _ByteProgress()
    common = dict(force=force, max_shard_size=shard, allow_extrapolation=allow_extrapolation,
                  progress=progress.update, on_start=progress.start)
    try:
        if adapter:
            result = averaging.fold_lora(Path(base), Path(adapter), Path(output), alpha=alpha or 0.0, **common)
        else:
            result = averaging.average(Path(base), Path(tuned), Path(output), alpha, **common)
    finally:
        progress.close()
    summary = {"output": str(Path(output).resolve()), "alpha": alpha if alpha is not None else 0.0,
               "base": str(Path(base).resolve()),
               **({"adapter": str(Path(adapter).resolve())} if adapter else {"tuned": str(Path(tuned).resolve())}),
               "tensors": result.tensors, "bytes": result.bytes, "seconds": round(result.seconds, 3)}
    if as_json:
        print_json(summary)
    else:
        width = max(map(len, summary))
        for key, value in summary.items():
            click.echo(f"{key:<{width}}  {value}")


def _merge_sweep(paths, alphas, adapter, output, force, max_shard_size, allow_extrapolation, eval_forget,
                 eval_retain, max_leak, max_new_tokens, batch_size, as_json):
    """Several α (and/or --eval-*): one model per α under OUT, and the trade-off table."""
    from pathlib import Path

    from unlearn import averaging
    from unlearn.alpha_selection import read_eval_sets, sweep

    if not alphas:
        raise UsageError("--eval-forget/--eval-retain need --alpha, e.g. --alpha 0.2,0.4,0.6,0.8")
    if not 0 <= max_leak <= 1:
        raise UsageError(f"--max-leak {max_leak}: must be in [0, 1]")
    if max_new_tokens < 1 or batch_size < 1:
        raise UsageError("--max-new-tokens and --batch-size must be at least 1")
    if eval_retain and not eval_forget:
        raise UsageError("choosing α needs --eval-forget (the prompts whose answers must not come out)")
    sets = read_eval_sets(eval_forget, eval_retain)
    base, tuned, adapter = _merge_inputs(paths, adapter, alphas[0])
    shard = averaging.parse_size(max_shard_size) if max_shard_size else None
    if output is None:
        output = f"{(adapter or tuned).rstrip('/')}-alphas"
        echo_err(f"unlearn: writing to {output}")
    result = sweep(base, tuned, adapter, alphas, Path(output), sets, max_leak=max_leak, force=force,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, max_shard_size=shard,
                   allow_extrapolation=allow_extrapolation, log=echo_err)
    if as_json:
        print_json({k: v for k, v in result.items() if k not in ("table", "sets")})
        return
    if "table" in result:
        click.echo(result["table"].rstrip("\n"))
        click.echo("")
    for alpha in alphas:
        click.echo(f"α={alpha:g}: {result['models'][f'{alpha:g}']}")
    if "files" in result:
        click.echo("table: " + ", ".join(str(Path(result["output"]) / f) for f in result["files"]))


def _merge_inputs(paths, adapter, alpha=None):
    """(BASE, TUNED, ADAPTER) from the arguments, or from the last run's record when none are given.

    A run that averaged its result (ULMR's --alpha) records the fine-tuned model before
    averaging (`tuned_adapter` or `tuned_model`): that is TUNED, so a new α starts from θ'
    again rather than averaging the average.
    """
    wanted = 1 if adapter else 2
    if len(paths) == wanted:
        return paths[0], (paths[1] if wanted == 2 else None), adapter
    if paths:
        shape = "BASE (with --adapter)" if adapter else "BASE and TUNED, or neither"
        raise UsageError(f"merge takes {shape}; got {len(paths)} path(s)")
    from unlearn.paths import last_run_record

    run_dir, record = last_run_record()
    if not record.get("base_model"):
        raise UnlearnError(f"{run_dir / 'run.json'}: has no 'base_model' to merge")
    echo_err(f"unlearn: merging the last run ({run_dir})")
    if adapter:
        return record["base_model"], None, adapter
    if record.get("tuned_adapter"):
        return record["base_model"], None, record["tuned_adapter"]
    tuned = record.get("tuned_model") or record.get("merged_model")
    if not tuned:
        raise UnlearnError(f"{run_dir / 'run.json'}: has no 'merged_model' to merge")
    return record["base_model"], tuned, None


class _ByteProgress:
    """A tqdm bar over bytes written, on stderr, shown only on a terminal."""

    def __init__(self):
        self.bar = None

    def start(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge", file=sys.stderr,
                        disable=None, leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# === end of commands ======================================================


def _first_line(exc: BaseException) -> str:
    """Errors are one line on stderr, even when a library's message runs over several."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def main(argv=None) -> None:
    """Entry point: turn our errors into one line and an exit code."""
    debug = os.environ.get("UNLEARN_DEBUG") == "1"
    _ARGV[:] = sys.argv[1:] if argv is None else list(argv)
    try:
        cli.main(args=argv, prog_name="unlearn", standalone_mode=False)
    except click.exceptions.Abort:
        echo_err("unlearn: interrupted")
        sys.exit(130)
    except click.ClickException as exc:  # usage errors found by click: one line, like ours
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "unlearn"
        hint = f" (see {command} --help)" if isinstance(exc, click.UsageError) else ""
        echo_err(f"unlearn: {_first_line(exc.format_message())}{hint}")
        sys.exit(2)
    except UnlearnError as exc:
        if debug:
            raise
        echo_err(f"unlearn: {_first_line(exc)}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        echo_err("unlearn: interrupted")
        sys.exit(130)
    except Exception as exc:  # a bug of ours: still one line unless debugging
        if debug:
            raise
        echo_err(f"unlearn: internal error: {type(exc).__name__}: {_first_line(exc)} "
                 f"(set UNLEARN_DEBUG=1 for a traceback)")
        sys.exit(1)
    sys.exit(0)
