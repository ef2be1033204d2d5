"""Every setting of every command, its default, the per-method defaults, and its validation.

The CLI parses options into these dataclasses and calls the job; nothing else decides a
default. A field left None means "the method's default": `RunOptions.resolved()` fills
it in (ULMR's stop rule and α, the learning rate of --full) and checks every value, so a
typo fails before any file is read or model loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from unlearn import precision
from unlearn.errors import UsageError
from unlearn.lora import LoraSettings
from unlearn.metrics import MIN_K_PERCENT
from unlearn.rmu import DEFAULT_SCALE as RMU_SCALE

# Greedy generation's default batch (run, eval, the merge sweep). Larger batches read the
# weights once for more rows, and on a CPU each thread's matmul then runs nearer its peak (one
# thread, the embedded model's 576x1536 layer with its weights read from memory: 35 GFLOP/s at
# 8 rows, 53 at 16, 71 at 32, 87 at 64). Batches of 16 -> 64 took the README run's 91 prompts from
# 117 to 173 tokens/s (bench/generation_bench.py); 64 -> 128, where that run's 99 pooled prompts make
# one batch instead of 64 + 35, took its evaluation from 60.2 to 53.3 s with the same answers.
# generation.KV_CACHE_BUDGET caps the rows of larger models. Scoring (likelihoods over whole
# sequences and the vocabulary) keeps measure.SCORE_BATCH_SIZE.
GEN_BATCH_SIZE = 128

METHODS = ("ga", "ga+mismatch", "ga+template", "graddiff", "npo", "ulmr", "edit", "rmu")
DEFAULT_TEMPLATE = "I can't help with that."

# ULMR's fine-tune has a minimum, so it cannot collapse the way ascent does; but the last
# leaking prompt can take many steps to go (measured on examples/: one of 14 stayed for 10
# steps), so it stops at the leak that α selection asks for and trains a few steps more to
# leave room for α.
ULMR_STOP_LEAK, ULMR_EXTRA_STEPS = 0.1, 4
LR_LORA, LR_FULL = 1e-3, 1e-5  # full fine-tuning moves every weight: a LoRA rate would wreck it
# rmu's LoRA rate: at 1e-3 its hidden-state distance fell ~2 % a step and after 30 steps the stop rule
# still found 4 of the 9 dev `capitals` facts answered (an exploration run, not in the results file);
# at 5e-3 it forgot them in 9 steps (docs/quality.md, "RMU on the dev split").
LR_RMU = 5e-3

# The default method trains on the automatic probes (--retain-probes: neighbour and same-subject
# prompts with the original model's answers) with the retain KL at 50. Chosen on the quality
# benchmark's dev split only (docs/quality.md, seed 0): the selection score went 0.65 -> 0.73;
# on capitals paraphrase leak 0.76 -> 0.12, unrelated facts kept 0.71 -> 0.96, normal similarity
# 0.74 -> 0.87; neighbours barely moved (0.00 -> 0.10). At the user's weight of 10 the probes
# changed little (capitals paraphrase leak 0.65). Other methods were not measured with it and
# keep it off; RETAIN_WEIGHT is also --retain's weight when the probes are not trained on.
RETAIN_PROBES_METHODS = ("ga", "rmu")
RETAIN_WEIGHT, RETAIN_WEIGHT_WITH_PROBES = 10.0, 50.0
NORMAL_WEIGHT = 10.0
# rmu's defaults are its best eligible setting on the dev split (docs/quality.md, "RMU on the dev
# split", setting G: selection score 0.644, forget leak 0.04): the probes trained on at the retain
# weight of 10 (at 25 and more it no longer forgot `capitals` in 60 steps), and the normal KL at 50
# (at 10, setting A, it took every how-to answer of `harmful` along: unrelated kept 0.33).
# ga's forget term is the unlikelihood loss, its stop rule waits for the margin 0.05 (doubling the forget
# weight at each check that fails it), at the LoRA rate 2e-3: on the dev split the selection score went
# 0.7515 -> 0.782, mean forget leak 0.054 -> 0.044. At 1e-3 it scored 0.840 but took 7-10 steps of the
# README command against 4; at 2e-3 it takes 4 (docs/quality.md, "The margin's forget weight, and a rate
# to pay for it"). Its forget loss is "spellings" (unlikelihood of the answer's token together with every
# token that starts spelling the rest of it) since the thirty-ninth session: on the dev split it tied
# (0.8231 against 0.8233) and met targets unlikelihood missed (on `inventors` every unlikelihood run went on
# to --max-steps, ~20 minutes, and still leaked one fact in ten; spellings forgot it in 3-4 steps), missing
# none it met (docs/quality.md, "Spellings as `ga`'s default"). Rows without answer positions (passages,
# long responses) train exactly as under unlikelihood.
PER_METHOD = {"rmu": {"retain_weight_with_probes": 10.0, "normal_weight": 50.0},
              "ga": {"forget_loss": "spellings", "stop_margin": 0.05, "lr": 2e-3}}
# When --method is not given and every forget row is a long chat response (spans.is_long_response: no
# `answers` given or derived, not a passage; a request answered with instructions or an explanation),
# the run trains toward the refusal template with the normal KL at 200: what `--method ga+template
# --normal-weight 200` gives. Both chosen on the dev split (docs/quality.md). The refusal ("Long chat
# responses: the refusal"): on `harmful`, ga's greedy check passed while the model still complied in
# other words (5 of 9 requests at every seed); the refusal leaks none. Dev selection score 0.7767 ->
# 0.8004, mean dev forget leak 0.144 -> 0.033. Its normal KL ("A second dev scenario of the harmful kind,
# and the refusal's normal KL judged again"): at 50 the refusal spread to the benign requests beside the
# harmful ones; 200 keeps more of them and of the held-back normal prompts, for more steps (`harmful`
# 15 -> 24-30, `mischief` 5 -> 12-16). Dev selection score over six scenarios 0.7881 -> 0.8233; on
# `mischief` alone (added after 200 had missed the rule by 0.003 over five) 0.726 -> 0.854. On the held-out
# `misuse` (test), against ga: forget leak 0.33 -> 0.00, paraphrase leak 0.46 -> 0.38, neighbours kept
# 0.96 -> 0.79. Every other forget set (rows with answers, derived answers or passages) keeps ga: the same
# run as before.
LONG_RESPONSE_DEFAULT = {"method": "ga+template", "normal_weight": 200.0}
# The methods whose runs repair by default (--repair-steps auto: repair.py). None: on the dev split the
# repair won for `ga` (selection score 0.788 against 0.7515, forget leak 0.008 against 0.054) but made the
# README command ~40 % slower (8 steps instead of 4), and a default must leave it no slower
# (docs/quality.md, "Repair steps").
REPAIR_METHODS: tuple[str, ...] = ()
FORGET_LOSSES = ("ascent", "unlikelihood", "redirect", "spellings")
ASCENT_METHODS = ("ga", "ga+mismatch", "ga+template", "graddiff")  # their forget term is `losses.forget_loss`
# Settings of one method's own loss term (TrainConfig fields), and the methods that read them (train.Unlearner: _rows,
# _mismatch_row, _group_terms). Given to any other method, each was taken and did nothing.
METHOD_TERMS = {"template": ("ga+template",), "mismatch_weight": ("ga+mismatch", "ga+template"), "npo_beta": ("npo",)}


# The largest float32 (torch.finfo(torch.float32).max; written out so that this module imports no torch).
# The float settings meet the float32 tensors they scale (a loss weight, NPO's β, LoRA's α / r, the gradient
# clip, α of an average): a value above this is inf there, and does what inf, refused, would do.
FLOAT32_MAX = 3.4028234663852886e38
# AdamW's update moves a weight by lr / (1 - β1^t), 10·lr at its first step (β1 = 0.9), a number torch
# converts to float32: above FLOAT32_MAX that raised "value cannot be converted to type float without
# overflow" from inside the optimiser (--lr 1e39, and every --lr above 3.4e37), an internal error.
LR_MAX = FLOAT32_MAX * (1 - 0.9)
# The smallest --lr taken: the smallest normal float32 (torch.finfo(torch.float32).tiny, written out as above).
# The optimiser's step size is a float32 scalar: below 2^-149 (1.4e-45, the smallest subnormal) it is exactly 0,
# every update is 0 and the run "ends" without having changed a weight (--lr 1e-50). The floor is the smallest
# normal rather than that subnormal: between the two a step size may still be 0, since kernels that flush
# subnormals to zero (torch.set_flush_denormal, CUDA's flush-to-zero) make it so, while from this floor up
# LoRA's B, which starts at 0, moves to a float32 that is not 0 at the first step. Nothing that small is a
# learning rate anyone means; the floor only turns a silent no-op into a usage error.
LR_MIN = 1.1754943508222875e-38


def check_float32(flag: str, value: float, limit: float = FLOAT32_MAX, why: str | None = None) -> None:
    """Refuse VALUE for FLAG when it is past ±LIMIT: finite in Python, but inf (or an overflow) in float32.

    The limit is printed rounded to two digits, below it: the value it names is itself accepted."""
    if abs(value) > limit:
        why = why or "the largest float32; above it the value is inf where it is used"
        raise UsageError(f"{flag} {value}: too large: must be at most {limit:.2g} ({why})")


def check_positive_finite(flag: str, value: float, limit: float = FLOAT32_MAX, why: str | None = None, *,
                          floor: float = 0.0, floor_why: str | None = None) -> None:
    """Refuse VALUE for FLAG unless it is a number above 0 (and at least FLOOR, when given) and at most LIMIT
    (finite in float32).

    `not value > 0` refuses nan but takes inf: --lr inf made every adapter weight nan at the first
    step, and --npo-beta inf a nan loss. A finite value past float32's range does the same (--npo-beta
    1e39: a nan loss) or fails inside torch (--lr 1e39). FLOOR is printed rounded up to two digits: the
    value it names is itself accepted.
    """
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"{flag} {value}: must be positive and finite")
    if value < floor:
        mantissa, exponent = f"{floor:.1e}".split("e")
        shown = float(f"{mantissa}e{exponent}")
        if shown < floor:  # rounded down: the next two-digit number up
            shown = float(f"{float(mantissa) + 0.1:.1f}e{exponent}")
        raise UsageError(f"{flag} {value}: too small: must be at least {shown:.2g} ({floor_why})")
    check_float32(flag, value, limit, why)


def was_given(given: frozenset[str], name: str, differs: bool) -> bool:
    """Whether the option NAME (click's parameter name, "max_steps") was given: the command line says so in GIVEN,
    or its value DIFFERS from the default. The comparison alone missed an option given at its default value
    (`--method edit --max-steps 150` was taken and did nothing); it stays for options built in code, whose
    GIVEN is empty."""
    return name in given or differs


# `unlearn run`'s options that set the LoRA adapters (LoraSettings)
LORA_OPTIONS = frozenset({"lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_layers"})


@dataclass
class TrainConfig:
    """The training loop's settings (`train.Unlearner`, `train.train`); see README for the measurements behind them."""

    method: str = "ga"
    forget_weight: float = 0.5  # eps1, weight of the forget loss
    mismatch_weight: float = 1.0  # eps2, weight of the random/templated answer loss
    normal_weight: float = NORMAL_WEIGHT  # eps3, weight of the KL on normal data (pushes back as soon as the model drifts)
    # Weight of the KL to the original on the --retain rows (the same per-token true KL as the
    # normal term). The same 10 as normal_weight: retain rows are rows the user vouches for, so
    # they get at least the push-back the normal rows get; more would let a few rows that share
    # words with a forget answer hold the forget answer itself in place (the terms fight), and
    # the user who wants that raises it.
    retain_weight: float = RETAIN_WEIGHT
    lr: float = LR_LORA
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 150  # a cap: the stop rule ends a run
    warmup_steps: int = 0
    schedule: str = "constant"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    max_length: int = 256
    seed: int = 0
    check_every: int = 1  # steps between checks of the stop rule (0: never)
    stop_leak: float = 0.0  # stop once the forget prompts' leak rate is at or below this
    # ... and, when above 0, once the automatic probes keep at least this share of their answers (the
    # stop rule waits for them at most as many steps again as the forget set took: run.stop_rule). Off:
    # at 0.75 it changed only `capitals` on the dev split (score +0.020, at the rule's margin), and its
    # probe check made the README command 4-8 % slower (docs/quality.md, "The README pair, and the decision").
    stop_probes: float = 0.0
    # Project the forget loss's gradient off the span of the retain rows' (probes') NLL gradients
    # (protect.py). Off: on the dev split it scores higher but leaks more passages (mean dev forget
    # leak 0.070, over the rule's gate of 0.05); each step costs ~2 s more on the README command
    # (docs/quality.md, "`--protect` in bf16").
    protect: bool = False
    extra_steps: int = 0  # steps to keep going once the stop rule fired
    # Once the stop rule first fires (step s): up to this many more steps that train the keep terms
    # alone while the last check found nothing leaking (repair.py); None: auto, s steps but at most
    # repair.AUTO_CAP; 0: off. `unlearn run` resolves it per method (RunOptions.resolved).
    repair_steps: int | None = 0
    check_tokens: int = 32  # the stop rule's answer budget
    template: str = DEFAULT_TEMPLATE
    npo_beta: float = 0.1
    # "answers": only the answer spans of rows that list `answers` (or derive them); "names": the same, an
    # answer that ends a name widened to the whole name (spans.whole_names); "response": every token
    forget_tokens: str = "answers"
    # The forget term of the methods that push the forget tokens down (ga, ga+mismatch, ga+template,
    # graddiff): "ascent", -NLL (Yao et al.), "unlikelihood", -log(1 - p) per token, "redirect", the KL
    # to the original's distribution with the answer's spellings taken out, or "spellings", unlikelihood
    # of the answer's token together with those spellings (losses.py, redirect.py).
    # When above 0, the stop rule also waits until no forget row's answer has a probability above
    # stop_margin (teacher-forced: `Unlearner.likeliest_forget_answer`); a stop condition, not a result.
    # Both are ga's default (PER_METHOD); the other methods keep ascent and no margin, not measured with them.
    forget_loss: str = "ascent"
    stop_margin: float = 0.0
    # With stop_margin: a check that finds an answer while the margin holds adds the model's own leaking
    # answer to the forget rows, at most this many a prompt (0: off; train.Unlearner.add_leaked_answers).
    # Off: on the dev split it ended `inventors`' runs in 5 steps instead of 150 but kept fewer neighbours
    # there, and scored 0.781 against 0.788 (docs/quality.md, "Leaked answers join the forget rows").
    leaked_rows: int = 0
    # With stop_margin: the retain KL's weight times the margin's forget multiplier, so the rows that stand
    # for the neighbours keep their share of the update while the forget term's weight doubles (the normal
    # KL's share still falls). Off: on the dev split it kept more neighbours (capitals 0.17 -> 0.47, tofu
    # 0.54 -> 0.92 over seeds 0-2) for more steps, but with or without --leaked-rows 4 it leaked above the
    # selection rule's 0.05 there, and the README command took 5 steps instead of 4 (+8.5 %), which the rule
    # does not allow a default (docs/quality.md, "The retain KL follows the margin, with leaked answers").
    # Scored again once `harmful` ran the refusal (it no longer reaches those rows): with --leaked-rows 4, dev
    # score 0.8265 against 0.8004 and leak 0.013 over the five dev scenarios before `mischief`, both passing;
    # the README command still +9.6 % (5 steps).
    retain_follows_margin: bool = False
    # With stop_margin, where the margin reads no forget row (none narrowed to an answer: a passage, a long
    # response): each greedy check that finds a leak multiplies the forget term's weight by this (the margin's dual
    # ascent, on the one constraint such rows have; the same cap). 1: off. Off by default: on the dev split's
    # passage scenarios √2 with --repair-steps auto leaked no forget passage and, on `excerpts`, far fewer other cut
    # points, in under half the steps, but kept fewer neighbour passages, and lost the rule on the seeds unseen when
    # it was declared (docs/quality.md, fifty-fifth session).
    leak_growth: float = 1.0
    # Passages: the forget loss on every token after the first word (data.forget_pair), not only on
    # the leak test's continuation. Off: on the dev split it did not win (docs/quality.md, "Passages:
    # every cut point"; other cut points 0.15 -> 0.07 leaked, the leak test's own 0.10 -> 0.23).
    whole_passage: bool = False
    # bfloat16 autocast of a float32 model's forward passes inside a training step (precision.py): "auto" where
    # the device has bf16 instructions, "bf16", "off". The checks and measurements run in float32 either way.
    autocast: str = "off"
    rmu_layer: int | None = None  # rmu's layer ℓ (None: rmu.default_layer, a quarter of the depth)
    rmu_scale: float = RMU_SCALE  # rmu's target norm c, in mean norms of h_ℓ on the normal rows

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method}: expected one of {', '.join(METHODS)}")
        if self.autocast not in precision.SETTINGS:
            raise UsageError(f"--autocast {self.autocast}: expected one of {', '.join(precision.SETTINGS)}")
        if not self.template.strip():  # the refusal would train toward the end-of-turn token alone
            raise UsageError("--template is blank: give the refusal text the forget prompts should get")
        positive = {"--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--max-steps": self.max_steps, "--max-length": self.max_length}
        for flag, value in positive.items():
            if not value > 0:
                raise UsageError(f"{flag} {value}: must be positive")
        check_positive_finite("--lr", self.lr, LR_MAX, "AdamW's first step is 10 × --lr, which must be finite "
                                                      "in float32",
                              floor=LR_MIN, floor_why="the smallest normal float32; below it the step size is 0, "
                                                      "or flushed to 0, in float32 and no weight moves")
        check_positive_finite("--npo-beta", self.npo_beta)
        weights = {"--forget-weight": self.forget_weight, "--mismatch-weight": self.mismatch_weight,
                   "--normal-weight": self.normal_weight, "--retain-weight": self.retain_weight,
                   "--max-grad-norm": self.max_grad_norm}
        for flag, value in {**weights, "--warmup-steps": self.warmup_steps, "--check-every": self.check_every,
                            "--extra-steps": self.extra_steps, "--leaked-rows": self.leaked_rows}.items():
            if value < 0 or not math.isfinite(value):
                raise UsageError(f"{flag} {value}: must be a non-negative number")
        for flag, value in weights.items():  # (the counts are whole numbers, never float32)
            check_float32(flag, value)
        if not 0 <= self.stop_leak <= 1:
            raise UsageError(f"--stop-leak {self.stop_leak}: must be in [0, 1]")
        if self.repair_steps is not None and self.repair_steps < 0:
            raise UsageError(f"--repair-steps {self.repair_steps}: must be auto or a number of steps, 0 or more")
        if self.repair_steps != 0 and self.extra_steps:
            raise UsageError("--repair-steps and --extra-steps both go on once the stop rule fires: give one "
                             "(--repair-steps 0 turns the repair off)")
        if not 0 <= self.stop_probes <= 1:
            raise UsageError(f"--stop-probes {self.stop_probes}: must be in [0, 1]")
        if self.protect and self.method in ("edit", "rmu", "ulmr"):
            raise UsageError(f"--protect projects the forget loss's gradient: it takes no --method edit, rmu or "
                             f"ulmr (here {self.method})")
        if self.forget_loss not in FORGET_LOSSES:
            raise UsageError(f"--forget-loss {self.forget_loss}: expected one of {', '.join(FORGET_LOSSES)}")
        if self.forget_loss != "ascent" and self.method not in ASCENT_METHODS:
            raise UsageError(f"--forget-loss {self.forget_loss}: only the methods that push the forget tokens down "
                             f"({', '.join(ASCENT_METHODS)}) have that term, not {self.method}")
        if not 0 <= self.stop_margin < 1:
            raise UsageError(f"--stop-margin {self.stop_margin}: must be in [0, 1) (0: off)")
        if self.forget_tokens not in ("answers", "names", "response"):
            raise UsageError(f"--forget-tokens {self.forget_tokens}: expected answers, names or response")
        if self.leaked_rows and not self.stop_margin:
            raise UsageError(f"--leaked-rows {self.leaked_rows}: adds the answers that leak while --stop-margin "
                             f"holds; it needs a margin above 0")
        if not (self.leak_growth >= 1 and math.isfinite(self.leak_growth)):
            raise UsageError(f"--leak-growth {self.leak_growth}: must be a finite number, 1 (off) or more")
        check_float32("--leak-growth", self.leak_growth)
        if self.leak_growth != 1 and not self.stop_margin:
            raise UsageError(f"--leak-growth {self.leak_growth:g} grows the forget weight as --stop-margin's failed "
                             f"checks do, where the margin reads no row; it needs a margin above 0")
        if self.retain_follows_margin and not self.stop_margin:
            raise UsageError("--retain-follows-margin weighs the retain KL with --stop-margin's forget multiplier; "
                             "it needs a margin above 0")
        if self.leaked_rows and (self.method not in ASCENT_METHODS + ("npo",) or self.forget_tokens == "response"):
            # the added rows are pushed down on their answer's tokens, as the forget rows of these methods are
            raise UsageError(f"--leaked-rows {self.leaked_rows}: the added rows are pushed down on their answers; "
                             f"it takes --forget-tokens answers or names and a method that pushes the forget "
                             f"tokens down ({', '.join(ASCENT_METHODS)}, npo), not --method {self.method} "
                             f"--forget-tokens {self.forget_tokens}")
        if self.schedule not in ("constant", "linear"):
            raise UsageError(f"--schedule {self.schedule}: expected constant or linear")
        if self.max_length < 8:
            raise UsageError(f"--max-length {self.max_length}: must be at least 8")
        if self.rmu_layer is not None and self.rmu_layer < 0:
            raise UsageError(f"--rmu-layer {self.rmu_layer}: must be a layer index, 0 or more")
        if not (self.rmu_scale > 0 and math.isfinite(self.rmu_scale)):
            raise UsageError(f"--rmu-scale {self.rmu_scale}: must be positive")
        check_float32("--rmu-scale", self.rmu_scale)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunOptions:
    """`unlearn run`: what to unlearn, with what, and how it is measured and written."""

    forget: Path
    normal: Path
    model: str | None = None
    output: Path | None = None
    force: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    lr: float | None = None  # None: the method's LoRA rate (PER_METHOD, else LR_LORA; LR_RMU for rmu), or LR_FULL with --full
    forget_loss: str | None = None  # None: the method's (PER_METHOD), else train.forget_loss; copied into train
    stop_margin: float | None = None  # None: the method's (PER_METHOD), else train.stop_margin; copied into train
    stop_leak: float | None = None  # None: 0, or ULMR_STOP_LEAK for ulmr
    extra_steps: int | None = None  # None: 0, or ULMR_EXTRA_STEPS for ulmr
    repair_steps: str | None = None  # "auto", a number, or None: auto for REPAIR_METHODS (without --extra-steps), else 0
    lora: LoraSettings = field(default_factory=LoraSettings)
    full: bool = False
    dtype: str = "float32"
    device: str | None = None
    judge: str | None = None
    judge_label: str | None = None
    retain: tuple[Path, ...] = ()  # rows that must be kept: trained on (KL, --retain-weight) and reported
    probes: bool = True  # the automatic neighbour / same-subject probes (probes.py) in the report
    probe_limit: int = 12  # probes of each kind at most (each costs a generation before and after)
    retain_probes: bool | None = None  # train on the probes too (None: on for RETAIN_PROBES_METHODS)
    # with the probes, the general-knowledge anchors (anchors.py) for the forget chat rows naming no one;
    # --no-anchors: off (resolved: on only where the probes are trained on)
    anchors: bool = True
    retain_weight: float | None = None  # None: RETAIN_WEIGHT_WITH_PROBES when training on probes, else RETAIN_WEIGHT
    # resolved: the weight above is the default for a run that trains on probes (run.make_probes falls back to
    # RETAIN_WEIGHT when no probe joins the retain rows after all)
    retain_weight_defaulted: bool = False
    normal_weight: float | None = None  # None: NORMAL_WEIGHT, or the method's (PER_METHOD); copied into train
    eval_forget: tuple[Path, ...] = ()  # more prompts that must not leak (paraphrases, unseen attempts)
    eval_retain: tuple[Path, ...] = ()  # knowledge that must survive (held-out questions)
    eval_limit: int = 64
    max_new_tokens: int = 48
    gen_batch_size: int = GEN_BATCH_SIZE
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
    alpha_grid: tuple[float, ...] = ()  # the α that "auto" tries [default: averaging.AUTO_GRID]
    max_leak: float = 0.1  # "auto": the forget leak an α must reach to be chosen
    # Share of NORMAL rows held back from training: never trained on, they are what --alpha auto
    # decides on (with the forget prompts) and what the table reports as "normal-heldout", so the
    # printed similarity is not measured on the rows the KL trained on.
    normal_holdout: float = 0.25
    no_cache: bool = False  # measure the original model again instead of reading $UNLEARN_CACHE/measurements
    # --method not given: train.method is ga unless the forget rows call for LONG_RESPONSE_DEFAULT
    # (`for_forget_rows`, once they are read); method_reason then says why, for the report.
    auto_method: bool = False
    method_reason: str | None = None
    # The options the user gave, by click's parameter name ("max_steps"), from the command line or the environment
    # (cli.given_options): the refusals of an option that does nothing fire for one given at its default value too.
    given: frozenset[str] = frozenset()
    # Options given that the method the forget rows chose (--method not given) does not read: said in one line each
    # (run.run logs them), not refused, since the same options act on another forget file (a script or the quality
    # benchmark runs one option string over forget sets of every kind). With --method given they are refused.
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        from unlearn.models import dtype_name

        self.dtype = dtype_name(self.dtype)  # " float32", "BFloat16": what the others take, --dtype takes too

    def for_forget_rows(self, rows) -> "RunOptions":
        """These options, unresolved, with the method FORGET's ROWS call for when --method was not given."""
        from unlearn.spans import is_long_response

        if not self.auto_method or not rows or not all(is_long_response(row) for row in rows):
            unused = self._other_methods_terms({self.train.method}) if self.auto_method else []
            if not unused:
                return self
            # resolved() left the refusal's settings to these rows, and they keep ga
            return replace(self, notes=self.notes + (
                f"{self._named(unused)} do{'es' * (len(unused) == 1)} nothing here: --method was not given and not "
                f"every forget row is a long chat response, so the run is --method {self.train.method}, which "
                f"does not read {'it' if len(unused) == 1 else 'them'}",))
        own = LONG_RESPONSE_DEFAULT
        return replace(self, train=replace(self.train, method=own["method"]), auto_method=False,
                       normal_weight=self.normal_weight if self.normal_weight is not None else own["normal_weight"],
                       method_reason="every forget row is a long chat response (no answers, not a passage): "
                                     f"the refusal template, --method {own['method']} with the normal KL at "
                                     f"{own['normal_weight']:g} unless --normal-weight is given")

    def resolved(self) -> "RunOptions":
        """A copy with every per-method default filled in and every value checked.

        Its `alpha` is None (no averaging), a float, or "auto".
        """
        from unlearn import models
        from unlearn.averaging import AUTO_GRID, parse_alphas

        ulmr = self.train.method == "ulmr"
        if self.retain_probes is not None and not self.probes:  # either way: --no-probes makes none (at any value)
            raise UsageError(f"--{'' if self.retain_probes else 'no-'}retain-probes says whether to train on the "
                             f"automatic probes, which --no-probes turns off: drop one of them")
        # The retain KL at weight 0 trains no row (a term of weight 0 is never drawn, train.py), unless --protect
        # reads the rows: probes trained "through" it were labelled trained and said to join the retain rows.
        retain_off = self.retain_weight == 0 and not self.train.protect
        if retain_off and self.retain_probes:
            raise UsageError("--retain-probes trains on the probes through the retain KL, which --retain-weight 0 "
                             "turns off: drop one of them")
        if self.retain_weight == 0 and self.train.retain_follows_margin:  # (with --protect too: 0 times any multiplier)
            raise UsageError("--retain-follows-margin multiplies the retain KL's weight, which --retain-weight 0 "
                             "makes 0: drop one of them")
        by_default = self.retain_probes is None and self.probes and self.train.method in RETAIN_PROBES_METHODS
        retain_probes = self.retain_probes if self.retain_probes is not None else by_default and not retain_off
        own = PER_METHOD.get(self.train.method, {})
        # The margin reads the probability of the forget rows' answer tokens (`Unlearner.likeliest_forget_answer`);
        # a loss on every response token has none to read, so a margin there would be taken and never hold.
        unfocused = self.train.forget_tokens == "response" or ulmr
        if self.train.forget_tokens == "response" and self.forget_loss in ("redirect", "spellings"):
            # both act at the answer's positions; a row scored whole has none, and takes unlikelihood (README)
            raise UsageError(f"--forget-loss {self.forget_loss} acts where the answer is, and --forget-tokens response "
                             f"scores every response token (unlikelihood): drop one of them")
        # given at all, 0 too: an option the other settings make idle is refused at any value (README)
        if unfocused and (self.stop_margin is not None or self._given("leak_growth")):
            trains = ("--method ulmr learns whole responses (its rows' likelihood)" if ulmr else
                      "--forget-tokens response pushes down every response token")
            if self.stop_margin is not None:
                raise UsageError(f"--stop-margin reads the forget rows' answer tokens; {trains} and has none to "
                                 f"read: drop --stop-margin")
            # (refused here, not as "needs a margin": the margin it would need is refused in turn)
            raise UsageError(f"--leak-growth {self.train.leak_growth:g} grows the weight as --stop-margin's failed "
                             f"checks do, and {trains}, which takes no margin: drop --leak-growth")
        train = replace(
            self.train,
            retain_weight=self.retain_weight if self.retain_weight is not None else (
                own.get("retain_weight_with_probes", RETAIN_WEIGHT_WITH_PROBES) if retain_probes else RETAIN_WEIGHT),
            normal_weight=self.normal_weight if self.normal_weight is not None else own.get("normal_weight",
                                                                                              NORMAL_WEIGHT),
            lr=self.lr if self.lr is not None else (LR_FULL if self.full else
                                                    LR_RMU if self.train.method == "rmu" else
                                                    own.get("lr", self.train.lr)),
            forget_loss=self.forget_loss if self.forget_loss is not None else own.get("forget_loss",
                                                                                      self.train.forget_loss),
            stop_margin=self.stop_margin if self.stop_margin is not None else (
                0.0 if unfocused else own.get("stop_margin", self.train.stop_margin)),
            stop_leak=self.stop_leak if self.stop_leak is not None else (ULMR_STOP_LEAK if ulmr else
                                                                        self.train.stop_leak),
            # an explicit --repair-steps takes the place of ulmr's extra steps, as an explicit --extra-steps
            # takes the repair's (`_repair_steps`)
            extra_steps=self.extra_steps if self.extra_steps is not None else (
                ULMR_EXTRA_STEPS if ulmr and (self.repair_steps is None or self._repair_steps(self.train) == 0) else
                self.train.extra_steps))
        train = replace(train, repair_steps=self._repair_steps(train))
        # settings of the gradient loop: given to the edit, they did nothing, silently. Before TrainConfig.validate,
        # whose refusals of the loop's settings (a margin --leak-growth needs) would name what the edit takes no part in
        if self.train.method == "edit":
            unused = [flag for flag, given in (
                ("--lr", self.lr is not None), ("--max-steps", self._given("max_steps")),
                ("--forget-loss", self.forget_loss is not None), ("--stop-margin", self.stop_margin is not None),
                ("--lora-* settings", self._lora_given()),
                ("--gradient-checkpointing", self.gradient_checkpointing),
                ("--template", self._given("template")),
                ("--rmu-layer", self.train.rmu_layer is not None),
                # the stop rule's: the edit has no checks (its forget set reads `trained`, never `stop rule`)
                ("--check-every", self._given("check_every")),
                ("--stop-leak", self.stop_leak is not None), ("--extra-steps", self.extra_steps is not None),
                ("--stop-probes", self._given("stop_probes")), ("--leak-growth", self._given("leak_growth")),
                ("--retain-follows-margin", self.train.retain_follows_margin),
                ("--whole-passage", self.train.whole_passage),  # it edits facts, not passages
                ("--autocast", self._given("autocast")),  # no training passes: the edit runs in the model's own dtype
                # the loss's weights and the loop's schedule (the edit's own preservation weight is no --normal-weight)
                ("--normal-weight", self.normal_weight is not None), ("--retain-weight", self.retain_weight is not None),
                *((f"--{name.replace('_', '-')}", self._given(name))
                  for name in ("batch_size", "forget_weight", "mismatch_weight", "max_length", "grad_accum",
                               "warmup_steps", "schedule", "max_grad_norm", "forget_tokens", "npo_beta"))) if given]
            if unused:
                raise UsageError(f"--method edit is one least-squares edit, not a training run: it takes no "
                                 f"{', '.join(unused)}")
        train.validate()
        if self.adapters:
            self.lora.validate()
        models.torch_dtype(self.dtype)  # a typo in --dtype fails before anything is read or loaded
        held = models.DTYPES[models.dtype_name(self.dtype)]  # what an alias (fp32) names
        if held != "float32" and self._given("autocast"):  # (precision.resolve: off for such a model)
            raise UsageError(f"--autocast {train.autocast}: the model is held in {held} (--dtype), whose "
                             f"products run in it already: drop --autocast")
        if self.eval_limit < 1 or self.max_new_tokens < 1 or self.gen_batch_size < 1:
            raise UsageError("--eval-limit, --max-new-tokens and --gen-batch-size must be at least 1")
        if not 0 <= self.normal_holdout < 1:
            raise UsageError(f"--normal-holdout {self.normal_holdout}: must be in [0, 1)")
        if self.probe_limit < 1:
            raise UsageError(f"--probe-limit {self.probe_limit}: must be at least 1 (--no-probes turns them off)")
        for flag, paths in (("--retain", self.retain), ("--eval-forget", self.eval_forget),
                            ("--eval-retain", self.eval_retain)):
            twice = next((p for i, p in enumerate(paths) if Path(p).resolve() in
                          {Path(q).resolve() for q in paths[:i]}), None)
            if twice is not None:  # --retain's rows were trained and measured twice, an --eval-* set printed twice
                raise UsageError(f"{flag} {twice}: given twice; give each file once")
        if self.save_every < 0:
            raise UsageError(f"--save-every {self.save_every}: must be 0 (off) or a number of steps")
        if self.train.method == "edit" and (self.alpha is not None or self.resume or self.save_every or self.full
                                            or self.repair_steps is not None):  # (given at any value, 0 too)
            raise UsageError("--method edit is one least-squares edit, not a training run: it takes no "
                             "--alpha, --resume, --save-every, --repair-steps or --full")
        if self.train.method == "rmu" and self.gradient_checkpointing:
            raise UsageError("--method rmu stops each forward pass at its layer (little memory to save): "
                             "it takes no --gradient-checkpointing")
        if self.train.protect and (self.full or self.fsdp):
            raise UsageError("--protect projects the forget loss's LoRA gradient in one process: it takes no "
                             "--full or --fsdp")
        if self.full and self._lora_given():  # taken and ignored before: --full trains every weight
            raise UsageError("--full fine-tunes every weight, without adapters: it takes no --lora-* settings")
        if self.full and self.fsdp:
            # Measured: the first step ended in an internal error (the trained weights the optimiser holds are
            # not the shards FSDP puts in their place); until that is built, a clear refusal before loading.
            raise UsageError("--full with --fsdp is not supported: fine-tune every weight under DDP (no --fsdp), "
                             "or shard a LoRA run with --fsdp")
        if self.force and self.resume:  # the checkpoint's run goes on either way: --force changed nothing
            raise UsageError("--force starts afresh in OUTPUT and --resume continues its checkpointed run: give one")
        if self.force and self.output is None:  # the run reserves a new runs/<date-time>: nothing to replace
            raise UsageError("--force replaces a non-empty -o directory: without -o the run writes a new "
                             "runs/<date-time>")
        if self.augmented is not None and not ulmr:
            raise UsageError("--augmented is ULMR's training data: use it with --method ulmr")
        if self._given("rewrites") and (not ulmr or self.augmented is not None):
            # --rewrites sizes the rewrites the run writes itself; any other way it did nothing, silently
            raise UsageError("--rewrites sets how many rewrites ULMR writes in the run: with "
                             + ("--augmented the rows are already written (give it to `unlearn augment`)"
                                if ulmr else "--method ulmr only"))
        if ulmr:  # ULMR's term is a plain NLL on its rows' whole responses at weight 1 (train.py): these did nothing
            unused = [flag for flag, given in (
                ("--forget-weight", self._given("forget_weight")),
                ("--forget-tokens", self._given("forget_tokens"))) if given]
            if unused:
                raise UsageError(f"--method ulmr learns its rows' whole negative responses at weight 1: it takes "
                                 f"no {' or '.join(unused)}")
        # Settings that act only through the stop rule's checks or the probes would otherwise do nothing, silently.
        if not train.check_every:
            # given at all, at 0 or its default too: idle options are refused at any value (README)
            given = [f"--{name.replace('_', '-')}" for name in (
                "stop_probes", "leaked_rows", "repair_steps", "stop_leak", "stop_margin", "extra_steps",
                "retain_follows_margin", "leak_growth") if self._given(name)]
            if given:
                raise UsageError(f"{', '.join(given)} act{'s' * (len(given) == 1)} at the stop rule's checks, which "
                                 f"--check-every 0 turns off")
        if self._given("leak_growth") and not train.stop_margin:  # 1 too (TrainConfig.validate sees values only)
            raise UsageError(f"--leak-growth {train.leak_growth:g} grows the forget weight as --stop-margin's failed "
                             f"checks do, where the margin reads no row; it needs a margin above 0")
        if self._given("stop_probes") and not self.probes:  # at any value, 0 too
            raise UsageError("--stop-probes waits for the automatic probes, which --no-probes turns off")
        if not self.probes and self._given("probe_limit"):
            raise UsageError("--probe-limit sets how many automatic probes are made, which --no-probes turns off")
        notes = self.notes
        if self._given("anchors") and not retain_probes:  # anchors are made only beside probes that are trained on
            why = "--no-anchors turns off the anchors that join the probes trained on"
            if self.method_reason is None:
                off = ("--no-probes" if not self.probes else "--no-retain-probes" if self.retain_probes is False
                       else "--retain-weight 0" if by_default and retain_off else f"--method {self.train.method}")
                raise UsageError(f"{why}, and this run trains on no probes ({off}): drop --no-anchors")
            notes += (f"--no-anchors does nothing here: --method {self.train.method}, which the forget rows chose, "
                      f"trains on no probes",)
        # the retain term has no rows (but for the probes its weight 0 kept out of training: that did something)
        if self.retain_weight is not None and not self.retain and not retain_probes and not (by_default and retain_off):
            why = "--retain-weight weighs the KL on the retain rows: with no --retain and no probes trained on"
            if self.method_reason is None:
                raise UsageError(f"{why} there are none")
            # the forget rows chose a method whose probes are not trained on by default: they decided, not the user
            notes += (f"--retain-weight does nothing here: --method {self.train.method}, which the forget rows chose, "
                      f"trains on no retain rows (no --retain, and it does not train on the probes)",)
        # Without --method the forget rows may yet call for the refusal (for_forget_rows): its settings wait for them.
        self._refuse_other_methods_terms({train.method, LONG_RESPONSE_DEFAULT["method"]} if self.auto_method
                                         else {train.method})
        if self.forget_loss is not None and train.method not in ASCENT_METHODS:  # given at any value (ascent too)
            raise UsageError(f"--forget-loss {self.forget_loss}: only the methods that push the forget tokens down "
                             f"({', '.join(ASCENT_METHODS)}) have that term, not {train.method}")
        if train.method != "rmu" and (train.rmu_layer is not None or self._given("rmu_scale")):
            raise UsageError("--rmu-layer and --rmu-scale set rmu's target: use them with --method rmu")
        alpha = self._alpha(ulmr, parse_alphas)
        if alpha != "auto":  # they choose α under --alpha auto; with a fixed α (or none) they would do nothing
            given = [flag for flag, on in (("--alpha-grid", bool(self.alpha_grid)),
                                           ("--max-leak", self._given("max_leak"))) if on]
            if given:
                fixed = f"--alpha {alpha:g}" if alpha is not None else "no --alpha"
                verbs = ("choose", "they do") if len(given) > 1 else ("chooses", "it does")
                raise UsageError(f"{' and '.join(given)} {verbs[0]} α under --alpha auto; with {fixed} {verbs[1]} nothing")
        return replace(self, train=train, notes=notes, retain_probes=retain_probes,
                       anchors=self.anchors and retain_probes, retain_weight=train.retain_weight,
                       retain_weight_defaulted=self.retain_weight is None and retain_probes,
                       normal_weight=train.normal_weight, forget_loss=train.forget_loss,
                       stop_margin=train.stop_margin, alpha=alpha, alpha_grid=self.alpha_grid or AUTO_GRID)

    def _given(self, name: str) -> bool:
        """Whether the option NAME was given: on the command line, or (options built in code) away from its default.
        NAME is a field of these options, else of the training loop's (self.train as given, not resolved)."""
        holder, defaults = (self, RunOptions) if name in RunOptions.__dataclass_fields__ else (self.train, TrainConfig)
        return was_given(self.given, name, getattr(holder, name) != getattr(defaults, name))

    def _other_methods_terms(self, methods: set[str]) -> list[str]:
        """The settings of other methods' loss terms (METHOD_TERMS) given, at any value, that none of METHODS reads."""
        return [name for name, readers in METHOD_TERMS.items() if not methods & set(readers) and self._given(name)]

    @staticmethod
    def _named(names: list[str]) -> str:
        """"--npo-beta (npo)", or several such joined: the options and the methods that read them."""
        return " and ".join(f"--{name.replace('_', '-')} ({' and '.join(METHOD_TERMS[name])})" for name in names)

    def _refuse_other_methods_terms(self, methods: set[str]) -> None:
        """Refuse a setting of another method's loss term given when none of METHODS (the method, or without
        --method the two the forget rows choose from) reads it."""
        unused = self._other_methods_terms(methods)
        if not unused:
            return
        if self.auto_method:  # the user gave no --method: name the two the rows choose from
            method = f"without --method the forget rows choose {' or '.join(sorted(methods))}, and neither"
            verbs = ("reads it", "reads any of them")
        else:
            method, verbs = f"--method {self.train.method}", ("does not read it", "reads none of them")
        if len(unused) == 1:
            readers = " and ".join(METHOD_TERMS[unused[0]])
            raise UsageError(f"--{unused[0].replace('_', '-')} is a setting of --method {readers}: {method} {verbs[0]}")
        raise UsageError(f"{self._named(unused)} are settings of other methods: {method} {verbs[1]}")

    def lora_targets_given(self) -> bool:
        """Whether --lora-targets was given (at its default value too), or the targets differ from the default."""
        from unlearn.lora import MLP_TARGETS

        return was_given(self.given, "lora_targets", self.lora.targets != MLP_TARGETS)

    def _lora_given(self) -> bool:
        """Whether any --lora-* option was given (LORA_OPTIONS), or the LoRA settings differ from the defaults."""
        return bool(self.given & LORA_OPTIONS) or self.lora != LoraSettings()

    @property
    def adapters(self) -> bool:
        """Training goes through LoRA adapters (not --full, and not the edit, which changes weights directly)."""
        return not self.full and self.train.method != "edit"

    def _repair_steps(self, train: TrainConfig) -> int | None:
        """--repair-steps as TrainConfig takes it: None for auto, else a number of steps (0: off)."""
        if self.repair_steps is None:  # the method's default; an explicit --extra-steps takes the repair's place
            return None if train.method in REPAIR_METHODS and not train.extra_steps else 0
        if str(self.repair_steps).strip().lower() == "auto":
            return None
        try:
            return int(self.repair_steps)
        except ValueError:
            raise UsageError(f"--repair-steps {self.repair_steps}: expected auto or a number of steps") from None

    def _alpha(self, ulmr: bool, parse_alphas):
        if not 0 <= self.max_leak <= 1:  # also when ulmr's α is auto by default, and nan
            raise UsageError(f"--max-leak {self.max_leak}: must be in [0, 1]")
        if self.alpha is None:
            return "auto" if ulmr else None
        parsed = parse_alphas(str(self.alpha), allow_auto=True, offers_extrapolation=False)  # run has no such option
        if parsed == "auto":
            if not 0 <= self.max_leak <= 1:
                raise UsageError(f"--max-leak {self.max_leak}: must be in [0, 1]")
            return "auto"
        if len(parsed) != 1:
            raise UsageError(f"--alpha {self.alpha}: give one α, or auto (to compare several, use unlearn merge)")
        return parsed[0]


@dataclass
class MergeOptions:
    """`unlearn merge`: the inputs (or the last run's), the α, and for a sweep how models are measured."""

    paths: tuple[str, ...] = ()
    alphas: list[float] | None = None
    adapter: str | None = None
    output: str | None = None
    force: bool = False
    max_shard_size: str | None = None
    allow_extrapolation: bool = False
    eval_forget: tuple[str, ...] = ()
    eval_retain: tuple[str, ...] = ()
    max_leak: float = 0.1
    max_new_tokens: int = 48
    batch_size: int = GEN_BATCH_SIZE
    no_cache: bool = False  # measure the original again instead of reading $UNLEARN_CACHE/measurements
    given: frozenset[str] = frozenset()  # the options the user gave, as RunOptions.given

    @property
    def max_shard_bytes(self) -> int | None:
        from unlearn.tensor_io import parse_size

        return parse_size(self.max_shard_size) if self.max_shard_size else None

    @property
    def is_sweep(self) -> bool:
        """Several α, or evaluation sets: one model per α and the trade-off table."""
        return bool(self.eval_forget or self.eval_retain or (self.alphas and len(self.alphas) > 1))

    def validate(self) -> None:
        _ = self.max_shard_bytes  # a bad --max-shard-size fails now
        # checked whether or not this merge measures anything: a bad value is a typo either way
        if not 0 <= self.max_leak <= 1:
            raise UsageError(f"--max-leak {self.max_leak}: must be in [0, 1]")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise UsageError("--max-new-tokens and --batch-size must be at least 1")
        self._refuse_unused()
        if not self.is_sweep:
            return
        if not self.alphas:
            raise UsageError("--eval-forget/--eval-retain need --alpha, e.g. --alpha 0.2,0.4,0.6,0.8")
        if self.eval_retain and not self.eval_forget:
            raise UsageError("choosing α needs --eval-forget (the prompts whose answers must not come out)")

    def _refuse_unused(self) -> None:
        """Refuse an option these settings make do nothing (given at any value): a merge without evaluation sets
        measures nothing (merge.sweep reads them only to measure each α's model), and one without --alpha
        (an adapter folded whole) has no α to extrapolate."""
        if not (self.eval_forget or self.eval_retain):
            unused = [f"--{name.replace('_', '-')}" for name in ("max_leak", "max_new_tokens", "batch_size", "no_cache")
                      if self._given(name)]
            if unused:
                named = " and ".join([", ".join(unused[:-1]), unused[-1]] if len(unused) > 1 else unused)
                raise UsageError(f"{named} act{'s' * (len(unused) == 1)} only in α selection (each α's model measured "
                                 f"on --eval-forget/--eval-retain): without those files nothing is measured")
        if self.adapter is not None and self.alphas is None and self._given("allow_extrapolation"):
            # (without --adapter, the missing --alpha is the error: merge_one says so)
            raise UsageError("--allow-extrapolation accepts an --alpha outside [0, 1]: without --alpha the adapter is "
                             "folded whole and it does nothing")

    def _given(self, name: str) -> bool:
        """Whether the option NAME was given: on the command line, or (options built in code) away from its default."""
        return was_given(self.given, name, getattr(self, name) != getattr(MergeOptions, name))


@dataclass
class EvalOptions:
    """`unlearn eval`: the prompts, the models, and how answers are generated and judged."""

    prompts: Path
    model: str | None = None
    reference_model: str | None = None
    forget: Path | None = None
    holdout: Path | None = None
    judge: str | None = None
    judge_label: str | None = None
    reward_model: Path | None = None
    batch_size: int = GEN_BATCH_SIZE
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    min_k: float = MIN_K_PERCENT
    dtype: str = "float32"
    no_cache: bool = False  # measure again instead of reading $UNLEARN_CACHE/measurements
    trust_remote_code: bool = False  # as `unlearn run`'s: a model `run` loaded must load here too
    allow_pickle: bool = False
    given: frozenset[str] = frozenset()  # the options the user gave, as RunOptions.given

    def __post_init__(self):
        from unlearn.models import dtype_name

        self.dtype = dtype_name(self.dtype)  # " float32", "BFloat16": what the others take, --dtype takes too

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be at least 1")
        if not 0 < self.min_k <= 100:
            raise UsageError("--min-k must be in (0, 100]")
        if not 0 < self.temperature < math.inf or not 0 < self.top_p <= 1:  # nan fails too
            raise UsageError("--temperature must be a finite number > 0 and --top-p in (0, 1]")
        if not self.do_sample and any(self._given(name) for name in ("temperature", "top_p", "seed")):
            # greedy decoding reads none: a script that forgot --do-sample would get greedy answers (and the seed
            # would split the measurement cache for the same answers)
            raise UsageError("--temperature, --top-p and --seed apply only with --do-sample "
                             "(greedy decoding ignores them)")
        if self.holdout is None and self._given("min_k"):
            raise UsageError("--min-k sets the min-k membership test, which needs --holdout")

    def _given(self, name: str) -> bool:
        """Whether the option NAME was given: on the command line, or (options built in code) away from its default."""
        return was_given(self.given, name, getattr(self, name) != getattr(EvalOptions, name))


@dataclass
class AugmentOptions:
    """`unlearn augment`: ULMR's rewrites and negative responses for a forget file."""

    forget: Path
    output: Path
    model: str | None = None
    generator: str | None = None  # writes the rows instead of MODEL
    rewrites: int = 2
    seed: int = 0
    batch_size: int = 16
    dtype: str = "float32"
    force: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def __post_init__(self):
        from unlearn.models import dtype_name

        self.dtype = dtype_name(self.dtype)  # " float32", "BFloat16": what the others take, --dtype takes too

    def validate(self) -> None:
        from unlearn import models

        if self.rewrites < 0 or self.batch_size < 1:
            raise UsageError("--rewrites must be 0 or more and --batch-size at least 1")
        models.torch_dtype(self.dtype)
