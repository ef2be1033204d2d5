"""The command line: parse, call, print. No job logic and no defaults of its own live here.

Options are parsed into the dataclasses of `unlearn.config` (which hold the defaults and
check the values) and handed to the job (`run.run`, `merge`, `evaluate.run_eval`,
`augment.augment_file`); tables come from `unlearn.tables`. Results go to stdout (a
table, or one JSON object with --json); progress and logs go to stderr. Exit codes: 0
success, 1 runtime error, 2 usage error. Heavy imports (torch, transformers) happen
inside the commands so that `unlearn --help` starts fast.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import signal
import sys
import threading

import click

from unlearn.config import FORGET_LOSSES, GEN_BATCH_SIZE
from unlearn.errors import Terminated, UnlearnError, UsageError
from unlearn.log import log
from unlearn.repair import AUTO_CAP


def _under_torchrun() -> bool:
    """Whether this process is one of torchrun's (read from its environment: `distributed` imports torch,
    which `unlearn --help` should not wait for)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _one_process(command: str) -> None:
    """Refuse torchrun for a command that shares nothing out: every process would do all of it and race
    to write the same outputs (eval's ended in exit 1 and "nothing was written" over a complete file)."""
    if _under_torchrun():
        raise UsageError(f"{command} runs in one process: launch it without torchrun "
                         f"(only `unlearn run` shares its work over torchrun's processes)")


def print_json(obj) -> None:
    from unlearn.outputs import json_safe

    click.echo(json.dumps(json_safe(obj), indent=None, sort_keys=False, default=str))


class _Choice(click.Choice):
    """A click.Choice that takes surrounding blanks and any case ("ga ", "GA"), as --dtype and --lora-layers do;
    the value passed on is the choice as listed."""

    def __init__(self, choices):
        super().__init__(choices, case_sensitive=False)

    def convert(self, value, param, ctx):
        return super().convert(value.strip() if isinstance(value, str) else value, param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="unlearn")
def cli():
    """Make a language model forget specific outputs with a short fine-tune."""


# What torch.manual_seed takes (any other value was "internal error: Overflow when unpacking long long").
SEED = click.IntRange(-2**63, 2**64 - 1)


class PathParam(click.Path):
    """A path option or argument, refused when given as '' (`-o "$OUT"`, `--forget "$F"` with the variable unset):
    Path('') is '.', so the checks after this one spoke of a '.' the user never typed, and an empty input was taken
    as the option left out (no --reference-model column, no --holdout rows), silently. WHAT: "a file", "a
    directory", "a model"; OUTPUT: it names something written; CALLED: the name said instead of the parameter's
    (merge's BASE and TUNED); NAME: what --help calls the value ("text" for a model, which may be a hub id). A
    required one (an argument, augment's -o) is not told to be left out."""

    def __init__(self, what: str, output: bool = False, called: str | None = None, name: str = "path"):
        super().__init__(path_type=str)
        self.what, self.output, self.called, self.name = what, output, called, name

    def convert(self, value, param, ctx):
        if value == "":
            flag = self.called or (param.opts[0] if isinstance(param, click.Option) else
                                   param.human_readable_name if param is not None else "a path")
            required = param is None or param.required or isinstance(param, click.Argument)
            leave = "" if required else f" (or leave {flag} out)"
            raise UsageError(f"{flag} '': an empty {'output ' if self.output else ''}path; name {self.what}{leave}")
        return super().convert(value, param, ctx)


IN_FILE, OUT_FILE = PathParam("a file"), PathParam("a file", output=True)
OUT_DIR, MODEL = PathParam("a directory", output=True), PathParam("a model", name="text")


def _split_targets(value: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in value.split(",") if t.strip())
    if not targets:  # `--lora-targets "$T"` with T unset too: not the same as leaving the option out
        raise UsageError(f"--lora-targets {value!r}: no module name; give some, e.g. q_proj,v_proj (or leave "
                         f"--lora-targets out for the default)")
    return targets


def eval_files(forget_help: str, retain_help: str):
    """The --eval-forget / --eval-retain pair (`measure.read_eval_sets` reads them), with each command's help."""
    def add(command):
        for flag, text in (("--eval-retain", retain_help), ("--eval-forget", forget_help)):
            command = click.option(flag, multiple=True, type=IN_FILE,
                                   help=f"{text}; repeatable.")(command)
        return command

    return add


def _command_line() -> str:
    """The arguments main() was given, for hints such as how to resume."""
    ctx = click.get_current_context()
    argv = (ctx.find_root().obj or {}).get("argv", sys.argv[1:])
    return shlex.join(["unlearn", *argv])


def given_options() -> frozenset[str]:
    """The current command's parameters the user gave, by name ("max_steps"): on the command line or through an
    environment variable (--model's UNLEARN_MODEL). The options classes refuse an option that another makes do
    nothing also when it was given at its default value, which comparing the value with the default cannot see."""
    ctx = click.get_current_context()
    sources = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return frozenset(name for name in ctx.params if ctx.get_parameter_source(name) in sources)


# === run (run.py) ===


@cli.command("run")
@click.argument("forget", type=IN_FILE)
@click.argument("normal", type=IN_FILE)
@click.option("--model", default=None, envvar="UNLEARN_MODEL", type=MODEL,
              help="HF directory, hub id or .gguf file [default: embedded SmolLM2-135M-Instruct; env UNLEARN_MODEL].")
@click.option("--method", default=None,
              type=_Choice(["ga", "ga+mismatch", "ga+template", "graddiff", "npo", "ulmr", "edit", "rmu"]),
              help="[default: ga; when every FORGET row is a long chat response (no `answers`, none derivable, "
                   "not a passage: instructions, an explanation), ga+template with --normal-weight 200, chosen on "
                   "the quality benchmark's dev split] "
                   "ga: gradient ascent + KL; ga+mismatch: + random normal answers; ga+template: + a fixed "
                   "refusal; graddiff: ascent + NLL on normal; npo: negative preference optimisation + KL; "
                   "ulmr: fine-tune on rewritten prompts with negative responses (+ KL), then average with α; "
                   "edit: a MEMIT-style edit of a few MLP layers so that the facts are refused (docs/edit.md); "
                   "rmu: representation misdirection (WMDP): the forget answers' hidden states at one layer "
                   "pulled onto a random vector, the other rows' held at the original's.")
@click.option("-o", "--output", default=None, type=OUT_DIR,
              help="Output directory [default: runs/<timestamp>, or <timestamp>-2 ... when taken].")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--lr", type=float, default=None,
              help="Learning rate [default: 1e-3 with LoRA (ga: 2e-3, rmu: 5e-3), 1e-5 with --full].")
@click.option("--batch-size", type=int, default=4, show_default=True,
              help="Forget (and normal) rows per micro-batch; under torchrun, in all (each process takes a share).")
@click.option("--grad-accum", type=int, default=1, show_default=True,
              help="Micro-batches per optimiser step (the update of one batch of all their rows).")
@click.option("--max-steps", type=int, default=150, show_default=True, help="Cap on optimiser steps.")
@click.option("--warmup-steps", type=int, default=0, show_default=True,
              help="Steps over which the learning rate rises linearly from 0 to --lr.")
@click.option("--schedule", type=_Choice(["constant", "linear"]), default="constant", show_default=True,
              help="Learning rate after warm-up: constant, or linear decay to 0 at --max-steps.")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping (0: off).")
@click.option("--forget-weight", type=float, default=0.5, show_default=True, help="eps1, weight of L_fgt.")
@click.option("--mismatch-weight", type=float, default=1.0, show_default=True,
              help="eps2, weight of L_rdn (ga+mismatch, ga+template).")
@click.option("--normal-weight", type=float, default=None,
              help="eps3, weight of L_nor (the KL to the original on normal data) [default: 10; rmu: 50; the "
                   "default for long chat responses (see --method): 200; chosen on the quality benchmark's dev "
                   "split].")
@click.option("--retain", multiple=True, type=IN_FILE,
              help="JSONL of rows that must be kept (NORMAL's format; `answers` score their accuracy): trained on "
                   "with their own KL to the original (--retain-weight), a micro-batch every step, and reported "
                   "as the `retain` line; repeatable.")
@click.option("--retain-weight", type=float, default=None,
              help="Weight of the KL on the retain rows [default: 50 when the probes are trained on (ga's "
                   "default; rmu: 10), else 10, the normal term's weight; chosen on the quality benchmark's dev "
                   "split].")
@click.option("--forget-tokens", type=_Choice(["answers", "names", "response"]), default="answers",
              show_default=True,
              help="Which tokens the forget loss pushes down: for rows with `answers`, only the tokens that spell "
                   "an answer (the fact, not the words around it); names, the same, but an answer that ends a "
                   "name covers the whole name (\"Albert Einstein\" for Einstein: pushed alone, a surname teaches "
                   "\"Albert, then anything else\"); or every response token.")
@click.option("--forget-loss", type=_Choice(list(FORGET_LOSSES)), default=None,
              help="The forget term of ga, ga+mismatch, ga+template and graddiff: ascent, -NLL of the forget tokens "
                   "(Yao et al.); unlikelihood, -log(1 - p) per token, whose push fades as a token goes; or "
                   "redirect, the KL to the original model's own next-token distribution with the answer's "
                   "spellings taken out (its second choice where the answer was); or spellings, unlikelihood "
                   "of the answer's token and every token that starts spelling the rest of the answer "
                   "[default: spellings for ga, else ascent].")
@click.option("--stop-margin", type=float, default=None,
              help="The stop rule also waits until no forget row's answer has a probability above this, read "
                   "teacher-forced (0: off). Greedy answers that just stopped leaking come back "
                   "within a few steps of the keep terms; a margin makes the forgetting hold. Each check it "
                   "fails doubles the forget term's weight (up to 1024x), so a row cannot stall the run "
                   "[default: 0.05 for ga, else 0].")
@click.option("--leaked-rows", type=int, default=0, show_default=True, metavar="N",
              help="With --stop-margin: a check that finds a forget answer while the margin holds adds the "
                   "model's own greedy answer of every leaking row (such checks answer every forget row, not "
                   "stopping at the first leak), cut after the answer, to the forget rows (focused on the answer), "
                   "at most N a prompt; the margin then reads it too. The margin reads each answer after the "
                   "row's own words, and the model may reach it by another path (\"Christopher COLUMBUS\"); "
                   "then the run goes on to --max-steps. 0: off (on the dev split it forgot such a scenario in "
                   "5 steps instead of 150, but kept fewer neighbours).")
@click.option("--leak-growth", type=float, default=1.0, show_default=True, metavar="X",
              help="With --stop-margin: where the margin reads no forget row (none has an answer: passages, long "
                   "responses), each check that finds one leaking multiplies the forget term's weight by X, as a "
                   "failed margin check doubles it (up to 1024x). 1: off. On the dev split's passages, sqrt 2 (1.41) "
                   "with --repair-steps auto leaked no forget passage, and on one scenario fewer other cut points "
                   "(0.43 -> 0.09), in under half the steps, but kept fewer neighbour passages there (0.77 -> 0.50; "
                   "means of three seeds, docs/quality.md).")
@click.option("--retain-follows-margin", is_flag=True,
              help="With --stop-margin: the retain KL (--retain rows and the automatic probes) weighs as much more "
                   "as the forget term does after each failed margin check (and each --leak-growth), so the rows that "
                   "stand for the neighbours keep their share of the update. Off by default: on the dev split it "
                   "kept more neighbours for more steps (docs/quality.md).")
@click.option("--whole-passage", is_flag=True,
              help="Passages (`text` rows): push down every token after the first word (extraction from any cut "
                   "point), not only the continuation the leak test compares with. On the quality benchmark it "
                   "cut other cut points' leak (test 0.23 -> 0.07) and cost neighbours (0.53 -> 0.30); off by "
                   "default, chosen on the dev split.")
@click.option("--template", default="I can't help with that.", show_default=True,
              help="The refusal that ga+template teaches.")
@click.option("--npo-beta", type=float, default=0.1, show_default=True, help="npo: β, the inverse temperature of its loss.")
@click.option("--rmu-layer", type=int, default=None,
              help="rmu: the layer whose hidden states are misdirected; it and the two below it are trained "
                   "[default: a quarter of the depth, 8 of SmolLM2's 30].")
@click.option("--rmu-scale", type=float, default=2.0, show_default=True,
              help="rmu: the random target's norm c, in mean norms of that layer's hidden states on the normal rows.")
@click.option("--check-every", type=int, default=1, show_default=True,
              help="Steps between checks of the stop rule (0: no checks, run --max-steps).")
@click.option("--stop-leak", type=float, default=None,
              help="Stop once the forget prompts' leak rate is at or below this [default: 0; ulmr: 0.1].")
@click.option("--stop-probes", type=float, default=0.0, show_default=True,
              help="Also wait, once the forget prompts stop leaking, until the automatic probes keep this share "
                   "of their answers (checked only then; at most as many steps again as forgetting took; 0: off). "
                   "Not a default: measured on the dev split only (docs/quality.md).")
@click.option("--protect", is_flag=True,
              help="Project the forget loss's gradient off the span of the retain rows' gradients (--retain and the "
                   "automatic probes trained on), recomputed every step in bf16 (a forward and backward over every retain row, 32 at a time; none at "
                   "repair steps). LoRA, one process; about 2 s more a step on the embedded model with its probes. Not a default: it leaks more passages on the dev split (docs/quality.md).")
@click.option("--extra-steps", type=int, default=None,
              help="Steps to keep going after the stop rule fires [default: 0; ulmr: 4, or 0 with --repair-steps].")
@click.option("--repair-steps", default=None, metavar="N|auto",
              help="Once the stop rule first fires: up to N more steps that train only the terms that keep (normal, "
                   "retain and probe KL) while nothing leaks, the whole loss after a leak; the run ends at the first "
                   f"check after them that finds nothing leaking. auto: as many as forgetting took, at most {AUTO_CAP} "
                   "[default: 0 (off); docs/quality.md, \"Repair steps\"]. Not with --extra-steps.")
@click.option("--max-length", type=int, default=256, show_default=True, help="Tokens per training row (prompt+response).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the row order, LoRA's initialisation and the held-back normal rows.")
@click.option("--full", is_flag=True, help="Fine-tune every weight instead of LoRA (keeps a frozen reference copy).")
@click.option("--gradient-checkpointing", is_flag=True,
              help="Recompute activations in backward: on the 135M default peak memory 2404 -> 1481 MB, step "
                   "5.0 -> 6.8 s (docs/speed.md). In one process a big model already backpropagates in pieces of "
                   "rows (OPT-1.3B: peak 1.23x its fp32 weights without this); under torchrun it does not.")
@click.option("--fsdp", is_flag=True,
              help="Under torchrun: shard parameters, gradients and optimiser state over the processes (FSDP) "
                   "instead of a full model copy per process (DDP), for models that do not fit on one device.")
@click.option("--lora-rank", type=int, default=8, show_default=True, help="LoRA rank r.")
@click.option("--lora-alpha", type=float, default=16.0, show_default=True, help="LoRA α: the update is scaled by α / r.")
@click.option("--lora-dropout", type=float, default=0.0, show_default=True, help="Dropout on the LoRA input.")
@click.option("--lora-targets", default=None,
              help="Comma-separated module names; names absent from the model are skipped "
                   "[default: the feed-forward layers: gate_proj,up_proj,down_proj (Llama, Mistral, Qwen, Gemma), "
                   "gate_up_proj (Phi-3), fc1,fc2 (OPT, Phi), dense_h_to_4h,dense_4h_to_h (GPT-NeoX, Falcon, BLOOM), "
                   "fc_in,fc_out (GPT-J), c_fc,mlp.c_proj (GPT-2, GPT-Neo)].")
@click.option("--lora-layers", default="all", show_default=True,
              help="Which decoder layers get adapters: all, upper (the upper half: layers n/2 to n-1 of n) or "
                   "FIRST-LAST (0-based, e.g. 12-23).")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--autocast", default="off", show_default=True, metavar="auto|bf16|off",
              help="Run a float32 model's training passes under bfloat16 autocast (weights, optimiser and losses stay "
                   "float32; the stop rule's checks and every measurement run in float32): bf16, off, or auto (bf16 "
                   "where the CPU has AVX512-BF16 or AMX instructions, or on a CUDA GPU from Ampere on).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda when available].")
@click.option("--judge", default=None, help="Harmful-rate judge: similarity (default), keywords:FILE, classifier:PATH.")
@click.option("--judge-label", default=None, help="The classifier judge's unsafe label.")
@eval_files("More prompts whose answers must not come out (e.g. paraphrases)",
            "Knowledge that must survive (rows with `answers`)")
@click.option("--eval-limit", type=int, default=64, show_default=True, help="Rows evaluated per set in the before/after table (the stop rule reads every forget row; with --alpha auto the sets α is chosen on, the forget rows and the held-back normal rows (without any held back, the trained ones), are measured whole; the probe sets follow --probe-limit).")
@click.option("--max-new-tokens", type=int, default=48, show_default=True, help="Tokens generated per evaluated prompt.")
@click.option("--gen-batch-size", type=int, default=GEN_BATCH_SIZE, show_default=True,
              help="Prompts generated together (fewer when their KV cache would pass 4 GiB; likelihoods are scored in batches of at most 16).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code (off by default).")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin pickle weights (loaded with weights_only=True).")
@click.option("--save-every", type=int, default=0, show_default=True,
              help="Write a checkpoint to OUT/checkpoints every N steps (0: only on Ctrl-C); OUT is created at once.")
@click.option("--resume", is_flag=True,
              help="Continue the run in -o OUT from its latest checkpoint (give the same arguments).")
@click.option("--augmented", type=IN_FILE, default=None,
              help="ulmr: training rows from `unlearn augment` [default: augment FORGET with the model now].")
@click.option("--rewrites", type=int, default=2, show_default=True, help="ulmr without --augmented: rewrites per forget prompt the run writes (at most 4).")
@click.option("--alpha", default=None,
              help="Average the result with the original: θa = α·θ + (1−α)·θ' (a number in [0, 1], or auto: "
                   "measure --alpha-grid and take the α that keeps most with forget leak ≤ --max-leak) "
                   "[default: auto with ulmr, no averaging otherwise].")
@click.option("--alpha-grid", default=None, help="The α that --alpha auto tries [default: 0,0.2,0.4,0.6,0.8].")
@click.option("--max-leak", type=float, default=0.1, show_default=True,
              help="--alpha auto: the forget leak rate an α must reach.")
@click.option("--normal-holdout", type=float, default=0.25, show_default=True,
              help="Share of NORMAL rows held back from training: never trained on, reported as normal-heldout "
                   "and used (with the forget prompts) by --alpha auto, never the --eval-* files.")
@click.option("--no-cache", is_flag=True,
              help="Measure the original model again instead of reusing its cached answers and scores "
                   "($UNLEARN_CACHE/measurements, keyed by the weights' content, the rows and the settings).")
@click.option("--no-probes", is_flag=True,
              help="Skip the automatic collateral-damage probes (the `neighbours` and `same subject` lines, "
                   "built from the forget prompts; probes.jsonl).")
@click.option("--probe-limit", type=int, default=12, show_default=True,
              help="Probes of each kind at most (each is answered before and after training).")
@click.option("--retain-probes/--no-retain-probes", default=None,
              help="Also train on the probes: each probe whose original answer holds no forget answer joins the "
                   "retain rows with that answer as its response (their report lines are then `trained`) "
                   "[default: on for ga and rmu, off for the other methods and with --retain-weight 0 (without "
                   "--protect), which turns off the KL they train through].")
@click.option("--no-anchors", is_flag=True,
              help="With the probes trained on, leave out the general-knowledge anchors: questions whose original "
                   "answers the retain KL holds for the forget chat rows that name no one, which get no "
                   "neighbour probe (unlearn/anchors.py).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def run_command(**o):
    """Unlearn the FORGET.jsonl answers while keeping NORMAL.jsonl behaviour; report before and after."""
    from pathlib import Path

    from unlearn.averaging import parse_alphas
    from unlearn.config import RunOptions, TrainConfig
    from unlearn.lora import LoraSettings
    from unlearn.run import run
    from unlearn.tables import format_run

    train = TrainConfig(
        method=o["method"] or "ga", forget_weight=o["forget_weight"], mismatch_weight=o["mismatch_weight"],
        batch_size=o["batch_size"],
        grad_accum=o["grad_accum"],
        max_steps=o["max_steps"], warmup_steps=o["warmup_steps"], schedule=o["schedule"],
        max_grad_norm=o["max_grad_norm"], max_length=o["max_length"], seed=o["seed"],
        check_every=o["check_every"], template=o["template"], npo_beta=o["npo_beta"],
        forget_tokens=o["forget_tokens"], rmu_layer=o["rmu_layer"], rmu_scale=o["rmu_scale"],
        whole_passage=o["whole_passage"], stop_probes=o["stop_probes"], protect=o["protect"],
        leaked_rows=o["leaked_rows"], retain_follows_margin=o["retain_follows_margin"], leak_growth=o["leak_growth"],
        autocast=o["autocast"].strip().lower())
    lora = LoraSettings(o["lora_rank"], o["lora_alpha"], o["lora_dropout"], layers=o["lora_layers"],
                        **({"targets": _split_targets(o["lora_targets"])} if o["lora_targets"] is not None else {}))
    if o["alpha_grid"] is not None and not o["alpha_grid"].strip():  # the same for `--alpha-grid "$GRID"`
        raise UsageError("--alpha-grid '': an empty list of α; give some (or leave --alpha-grid out)")
    opts = RunOptions(
        forget=Path(o["forget"]), normal=Path(o["normal"]), model=o["model"],
        output=Path(o["output"]) if o["output"] else None, force=o["force"], train=train, lr=o["lr"],
        forget_loss=o["forget_loss"], stop_margin=o["stop_margin"],
        stop_leak=o["stop_leak"], extra_steps=o["extra_steps"], repair_steps=o["repair_steps"], lora=lora,
        full=o["full"],
        gradient_checkpointing=o["gradient_checkpointing"], fsdp=o["fsdp"], dtype=o["dtype"], device=o["device"],
        judge=o["judge"], judge_label=o["judge_label"], eval_forget=tuple(Path(p) for p in o["eval_forget"]),
        eval_retain=tuple(Path(p) for p in o["eval_retain"]), eval_limit=o["eval_limit"],
        max_new_tokens=o["max_new_tokens"], gen_batch_size=o["gen_batch_size"],
        trust_remote_code=o["trust_remote_code"], allow_pickle=o["allow_pickle"], save_every=o["save_every"],
        resume=o["resume"], command=_command_line(), augmented=Path(o["augmented"]) if o["augmented"] else None,
        rewrites=o["rewrites"], alpha=o["alpha"],
        alpha_grid=tuple(parse_alphas(o["alpha_grid"], flag="--alpha-grid")) if o["alpha_grid"] is not None else (),
        max_leak=o["max_leak"],
        normal_holdout=o["normal_holdout"], no_cache=o["no_cache"], retain=tuple(Path(p) for p in o["retain"]),
        probes=not o["no_probes"], probe_limit=o["probe_limit"], retain_probes=o["retain_probes"],
        anchors=not o["no_anchors"],
        retain_weight=o["retain_weight"], normal_weight=o["normal_weight"], auto_method=o["method"] is None,
        given=given_options())
    record = run(opts, log=log)
    if o["as_json"]:
        print_json({k: v for k, v in record.items() if k != "history"})
    else:
        click.echo(format_run(record))


# === augment (augment.py) ===


@cli.command("augment")
@click.argument("forget", type=IN_FILE)
@click.option("-o", "--output", required=True, type=OUT_FILE, help="The augmented JSONL to write.")
@click.option("--model", default=None, envvar="UNLEARN_MODEL", type=MODEL,
              help="The model to be unlearned [default: embedded SmolLM2-135M-Instruct; env UNLEARN_MODEL].")
@click.option("--generator", default=None, type=MODEL,
              help="Write the rewrites and negative responses with this model instead of --model.")
@click.option("--rewrites", type=int, default=2, show_default=True, help="Rewrites per forget prompt (at most 4).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the sampled rewrites.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Generation batch size.")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code (off by default).")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin pickle weights (loaded with weights_only=True).")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as one JSON object.")
def augment_command(as_json, **o):
    """ULMR's data: rewrite each FORGET prompt and write a negative response for each (paper's prompts)."""
    _one_process("augment")
    if o["generator"] and click.get_current_context().get_parameter_source("model") == \
            click.core.ParameterSource.COMMANDLINE:  # (UNLEARN_MODEL, a default for every command, is no request)
        raise UsageError("--model and --generator both given: augment writes the rows with --generator and never "
                         "reads --model; drop one of them")
    from unlearn.augment import augment_file
    from unlearn.config import AugmentOptions

    result, stats = augment_file(AugmentOptions(**o), log=log)
    if as_json:
        print_json(result)
    else:
        click.echo(f"{stats.summary()}\nrewrites rejected: {stats.rewrites_rejected or 'none'}\n"
                   f"responses rejected: {stats.responses_rejected or 'none'}\nwrote {result['output']} "
                   f"in {result['seconds']:.1f} s")


# === eval (evaluate.py) ===


@cli.command("eval")
@click.argument("prompts", type=IN_FILE)
@click.option("--model", default=None, envvar="UNLEARN_MODEL", type=MODEL,
              help="Model to evaluate: HF directory, hub id or .gguf [default: embedded SmolLM2; env UNLEARN_MODEL].")
@click.option("--reference-model", default=None, type=MODEL,
              help="Original model: its outputs are the 'before' column, its perplexity measures fluency.")
@click.option("--forget", type=IN_FILE, default=None,
              help="JSONL of forget rows: references for PROMPTS rows without a response (matched by prompt).")
@click.option("--judge", default=None, help="similarity (default), keywords:FILE or classifier:PATH.")
@click.option("--judge-label", default=None, help="The classifier's unsafe label (name or index).")
@click.option("--holdout", type=IN_FILE, default=None,
              help="JSONL of unseen rows: membership-inference AUCs of the forget rows against these.")
@click.option("--reward-model", type=PathParam("a model"), default=None,
              help="A one-output HF sequence classifier: mean reward of (prompt, output).")
@click.option("--batch-size", type=int, default=GEN_BATCH_SIZE, show_default=True,
              help="Prompts generated together (fewer when their KV cache would pass 4 GiB; likelihoods are scored in batches of at most 16).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature (with --do-sample).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling's p (with --do-sample).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of sampled answers (with --do-sample).")
@click.option("--min-k", type=float, default=20.0, show_default=True, help="k (percent) of the min-k probability attack.")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--save-generations", type=OUT_FILE, default=None,
              help="Write one JSON line per prompt: prompt, output, reference, scores.")
@click.option("--report", type=OUT_FILE, default=None, help="Write a markdown report.")
@click.option("--force", is_flag=True, help="Replace existing --save-generations / --report files.")
@click.option("--no-cache", is_flag=True, help="Measure again instead of reusing cached answers and scores "
              "($UNLEARN_CACHE/measurements, keyed by the weights' content, the rows and the settings).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the models' own Python code (off by default).")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin pickle weights (loaded with weights_only=True).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def eval_command(save_generations, report, force, as_json, **o):
    """Generate answers to PROMPTS and measure harmful, leak and hallucination rates, quality and memorisation.

    References for leak and harmful rates are the PROMPTS rows' responses, or
    the --forget rows with the same prompt. Metric definitions: docs/eval.md.
    """
    _one_process("eval")
    from pathlib import Path

    from unlearn import evaluate, tables
    from unlearn.config import EvalOptions
    from unlearn.outputs import check_writable, jsonl_text, judge_input, refuse_output_over_inputs, write_texts_atomic
    from unlearn.paths import model_input

    if force and not (save_generations or report):  # taken and ignored before: eval writes no other file
        raise UsageError("--force replaces the --save-generations / --report files: without either it does nothing")
    check_writable(save_generations, report, force=force)
    paths = {k: Path(o[k]) if o[k] else None for k in ("prompts", "forget", "holdout", "reward_model")}
    # An output file must not replace what the command reads (--force or not): the prompts, the model's
    # directory (the embedded one lives in the cache), a judge's file.
    inputs = [*paths.values(), model_input(o.get("model")), o.get("reference_model"), judge_input(o.get("judge"))]
    for flag, out in (("--save-generations", save_generations), ("--report", report)):
        if out:
            refuse_output_over_inputs(out, inputs, inside_too=True, flag=flag)
    result = evaluate.run_eval(EvalOptions(**{**o, **paths}, given=given_options()), log=log)
    # Both or neither: a report that could not be written must not leave (or replace) the generations.
    texts = {save_generations: jsonl_text(result["rows"])} if save_generations else {}
    if report:
        texts[report] = tables.format_report(result)
    write_texts_atomic(texts, replace=force)
    if save_generations:
        log(f"unlearn: wrote {len(result['rows'])} generations to {save_generations}")
    if report:
        log(f"unlearn: wrote the report to {report}")
    if as_json:
        print_json(tables.result_json(result))
    else:
        click.echo(tables.format_table(result))


# === merge (merge.py, averaging.py) ===


@cli.command()
@click.argument("paths", nargs=-1, metavar="[BASE [TUNED]]",
                type=PathParam("a model directory", called="BASE or TUNED"))
@click.option("--alpha", default=None,
              help="Weight of BASE: θa = α·BASE + (1−α)·TUNED (1 gives BASE back). Several, comma-separated "
                   "(0.2,0.4,0.6,0.8), write one model each and, with --eval-forget/--eval-retain, a trade-off "
                   "table and a recommended α. Required unless --adapter.")
@click.option("--adapter", "adapter", type=PathParam("an adapter directory"), default=None,
              help="Fold this PEFT LoRA adapter into BASE instead (W + s·B·A, scaled by 1−α when --alpha is given).")
@click.option("-o", "--output", type=OUT_DIR, default=None,
              help="Output directory [default: TUNED-avgALPHA, ADAPTER-merged, or TUNED-alphas for several α].")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--max-shard-size", default=None, help="Re-shard the output, e.g. 2GB or 500MB [default: like BASE].")
@click.option("--allow-extrapolation", is_flag=True, help="Accept α outside [0, 1].")
@eval_files("Prompts whose answers must not come out (rows with a response or `answers`)",
            "Knowledge that must survive (rows with `answers`; similarity to BASE's outputs)")
@click.option("--max-leak", type=float, default=0.1, show_default=True,
              help="α selection (with --eval-forget): the forget leak rate an α must reach to be recommended.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True,
              help="α selection (with --eval-forget): tokens per answer.")
@click.option("--batch-size", type=int, default=GEN_BATCH_SIZE, show_default=True,
              help="α selection (with --eval-forget): generation batch size.")
@click.option("--no-cache", is_flag=True, help="Measure again instead of reusing cached answers and scores "
              "($UNLEARN_CACHE/measurements, keyed by the weights' content, the rows and the settings).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def merge(alpha, as_json, **o):
    """Average two checkpoints (BASE TUNED), or fold a LoRA adapter into BASE; choose α.

    With no paths, BASE and TUNED are the base model and the fine-tuned model of
    the most recent `unlearn run`. Works tensor by tensor: memory stays flat.
    """
    _one_process("merge")
    from pathlib import Path

    from unlearn import merge as job
    from unlearn.averaging import alpha_label, parse_alphas
    from unlearn.config import MergeOptions

    alphas = parse_alphas(alpha, allow_extrapolation=o["allow_extrapolation"]) if alpha is not None else None
    opts = MergeOptions(alphas=alphas, **o, given=given_options())
    opts.validate()
    if not opts.is_sweep:
        summary = job.merge_one(opts, progress=_ByteProgress())
        if as_json:
            print_json(summary)
        else:
            width = max(map(len, summary))
            for key, value in summary.items():
                click.echo(f"{key:<{width}}  {value}")
        return
    result = job.sweep(opts)
    if as_json:
        print_json({k: v for k, v in result.items() if k not in ("table", "sets")})
        return
    if "table" in result:
        click.echo(result["table"].rstrip("\n"))
        click.echo("")
    for a in opts.alphas:
        click.echo(f"α={alpha_label(a)}: {result['models'][alpha_label(a)]}")
    if "files" in result:
        click.echo("table: " + ", ".join(str(Path(result["output"]) / f) for f in result["files"]))


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


def entry() -> None:
    """The `unlearn` command (and `python -m unlearn`): `main`, then the process ends at once.

    Once the result is written and printed, nothing is left but tearing the interpreter down, which
    frees a run's objects one by one (the README run: 1.0 s after `main` returned; 0.3 s this way).
    Exit handlers still run and the streams are flushed; only the teardown is skipped. Under torchrun
    the process group's own shutdown is left to the normal exit.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:  # a second Ctrl-C landing in main's own handler of the first
        log("unlearn: interrupted")
        code = 130
    if _under_torchrun():  # torchrun's processes
        sys.exit(code)
    # The code is decided: a Ctrl-C from here on (a second press after a checkpoint was saved) turned exit
    # 130 into a traceback and exit 1. What is left takes a moment: flush and end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not isinstance(code, int):  # sys.exit's rule: None is success, any other object is printed, 1
        if code is not None:
            log(str(code))
        code = 0 if code is None else 1
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # a closed descriptor (>&-) is None here
            try:
                stream.flush()
            except OSError:  # a full disk or a closed pipe: what could be written was
                pass
    os._exit(code)


def _terminate(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def _sigterm_unwinds():
    """While the command runs, SIGTERM raises `Terminated` in the main thread instead of killing the process
    where it stands, which left a merge's hidden `.OUT.tmp-*` directory of partial models behind.

    Not under torchrun: a rank waiting in a collective runs no Python until the wait ends, so a handler
    would keep it alive past the launcher's SIGTERM; there the default (ending at once) stays. The
    previous handler comes back afterwards (the tests call `main` in their own process).
    """
    if _under_torchrun() or threading.current_thread() is not threading.main_thread():
        yield
        return
    # SIGHUP too: what a script gets when its terminal or ssh session goes away; but a signal the caller
    # ignores stays ignored (`nohup` ignores SIGHUP so that the run outlives the session)
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv=None) -> None:
    """Entry point: turn our errors into one line and an exit code."""
    debug = os.environ.get("UNLEARN_DEBUG") == "1"
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with _sigterm_unwinds():
            cli.main(args=argv, prog_name="unlearn", standalone_mode=False, obj={"argv": argv})
    except Terminated as exc:
        signum = exc.args[0] if exc.args else signal.SIGTERM
        log(f"unlearn: terminated ({signal.Signals(signum).name}); nothing half-written is left")
        sys.exit(128 + signum)
    except click.exceptions.Abort:
        log("unlearn: interrupted")
        sys.exit(130)
    except click.ClickException as exc:  # usage errors found by click: one line, like ours
        ctx = getattr(exc, "ctx", None)
        # an option missing its value ("run --lr") comes without the command's context: named from ARGV
        named = argv[0] if argv and argv[0] in getattr(cli, "commands", {}) else None
        command = ctx.command_path if ctx is not None else f"unlearn {named}" if named else "unlearn"
        hint = f" (see {command} --help)" if isinstance(exc, click.UsageError) else ""
        log(f"unlearn: {_first_line(exc.format_message())}{hint}")
        sys.exit(2)
    except UnlearnError as exc:
        if debug:
            raise
        # Under torchrun every rank checks the same options and reads the same files before the process group
        # exists (which silences the others later on: distributed.session), so each such error was said once
        # per rank. A usage error is said by rank 0; another (a data file bad or missing, perhaps on one node
        # only) by each node's first process, LOCAL_RANK 0.
        said_by = "RANK" if isinstance(exc, UsageError) else "LOCAL_RANK"
        if not (_under_torchrun() and os.environ.get(said_by, "0") != "0"):
            log(f"unlearn: {_first_line(exc)}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        log("unlearn: interrupted")
        sys.exit(130)
    except OSError as exc:
        if debug:
            raise
        # Files are written with their own one-line messages (outputs.py): what reaches here unhandled is
        # the result on stdout (`> /dev/full`), not a bug of ours
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            log(f"unlearn: could not write the result ({exc.strerror})")
        else:
            log(f"unlearn: internal error: {type(exc).__name__}: {_first_line(exc)} "
                f"(set UNLEARN_DEBUG=1 for a traceback)")
        sys.exit(1)
    except Exception as exc:  # a bug of ours: still one line unless debugging
        if debug:
            raise
        log(f"unlearn: internal error: {type(exc).__name__}: {_first_line(exc)} "
                 f"(set UNLEARN_DEBUG=1 for a traceback)")
        sys.exit(1)
    sys.exit(0)
