"""The unlearning loop: batches, the loss of each method, optimiser, schedule, stop rule.

One step (method ga+mismatch, Yao et al.):
    forget rows  (x_fgt, y_fgt)   -> L_fgt = -NLL            (gradient ascent)
    mismatch rows (x_fgt, y_rdn)  -> L_rdn =  NLL            (y_rdn: a random normal response)
    normal rows  (x_nor, y_nor)   -> L_nor = KL(p_orig || p_theta)
    retain rows  (x_ret, y_ret)   -> L_ret = KL(p_orig || p_theta)   (only with --retain)
    loss = forget_weight * L_fgt + mismatch_weight * L_rdn + normal_weight * L_nor + retain_weight * L_ret

The retain rows are the ones a user names as must-keep (`unlearn run --retain FILE`): a
micro-batch of them every step, drawn epoch by epoch like the other groups, so each one
is seen every ceil(rows / batch size) steps, whatever the method (the KL for all of
them, graddiff included: a must-keep row is kept as the original answers it).

Each group of rows goes through the model in its own forward pass at its own width
(no padding to the other group's longer rows; one joint pass under DDP/FSDP), one
backward for all; on a model whose activations for a group would be large (OPT-1.3B),
one forward and backward per piece of a group's rows instead, so that one piece's
activations are alive at a time (`_backward_in_pieces`, the same gradient). The
reference distribution p_orig comes from the same weights with the LoRA adapters
switched off, under no_grad.

Why a stop rule: gradient ascent has no minimum. A fixed learning rate for a fixed
number of steps first forgets, then keeps pushing and wrecks unrelated knowledge.
So every `check_every` steps the forget prompts are answered greedily and the run
stops once the leak rate is at or below `stop_leak` (after `extra_steps` more
steps, which make the forgetting hold for paraphrases too, or after the repair
phase: steps of the keep terms alone while nothing leaks, repair.py); `max_steps`
is a cap.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from unlearn import distributed, losses, precision, protect, redirect, repair, rmu
from unlearn.attention import training_attention
from unlearn.config import TrainConfig
from unlearn.data import EncodedRows, collate, encode_pair, loss_pair
from unlearn.errors import UnlearnError, UsageError
from unlearn.generation import NonFiniteLogits, text_config
from unlearn.lora import adapters_disabled, lora_modules
from unlearn.reference_cache import ReferenceLogits
from unlearn.spans import row_answers

# --stop-margin doubles the forget term's weight at each check the margin fails: ten failed checks
# reach this cap, where the keep terms weigh ~1/1000 as much as at the start. A cap, not a setting:
# Adam's step size does not grow with the loss's scale, only the forget term's share of the direction.
MAX_FORGET_SCALE = 1024.0

# Consecutive checks where the margin held and the greedy answer still leaked after which a run without
# --leaked-rows says so, once: on the dev scenario `inventors` under unlikelihood (ga's forget loss until
# the thirty-ninth session) that state lasted from step 4 to --max-steps (150 steps, ~20 minutes), where a
# check's leaking answer spelled the answer another way.
HINT_AFTER_CHECKS = 5
# What the hint offers (the first only while --forget-loss spellings is off). Each finished the dev scenario
# `inventors` (under unlikelihood: 150 steps at every seed, ~20 minutes) in 3-5 steps (docs/quality.md).
SPELLINGS_HINT = "--forget-loss spellings pushes down every spelling of the answer, and "
LEAKED_ROWS_HINT = "--leaked-rows 4 adds such answers to the forget rows"


class NonFiniteLoss(UnlearnError):
    """A loss or gradient norm became nan or inf; the update was not applied."""

    def __init__(self, step: int, what: str, value: float):
        super().__init__(f"step {step}: the {what} is {value}")
        self.step, self.what, self.value = step, what, value


class NonFiniteWeights(NonFiniteLoss):
    """An update made a trainable weight nan or inf from a finite loss and gradient (an overflowing step);
    the run stops before the model is written. No --lr that passes validation reached it on the tiny test
    model (there the weights stay finite and the outputs overflow: `Unlearner.outputs_finite`), so the
    test puts the inf in by hand; it names the first such tensor, where a nan loss a step later would not."""

    def __init__(self, step: int, name: str | None):
        UnlearnError.__init__(self, f"step {step}: the update made the trained weights non-finite (nan or inf"
                                    + (f", first in {name})" if name else ")"))
        self.step, self.what, self.value = step, "trained weights", math.nan


def first_non_finite(params: dict[str, torch.Tensor]) -> str | None:
    """The name of the first of PARAMS holding a nan or inf, or None when every one is finite.

    One host sync for all of them (a flag a tensor, stacked), not one a tensor: a step of the embedded
    model has ~200 adapter tensors. Under FSDP each rank reads its own shards (`to_local`).
    """
    if not params:
        return None
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params.values()]
    finite = torch.stack([torch.isfinite(t).all() for t in local]).cpu()
    if bool(finite.all()):
        return None
    return list(params)[int((~finite).nonzero()[0])]


def margin_holds(likeliest: float | None, margin: float) -> bool:
    """Whether --stop-margin holds: no forget answer likelier than MARGIN (LIKELIEST None: no answer to read).

    A nan never holds: `nan > margin` is False, so the test the other way round counted a broken model's
    margin as met, and the run stopped as "forgotten" and wrote it.
    """
    return likeliest is None or likeliest <= margin


class StopRequested(Exception):
    """Ctrl-C (or SIGTERM, SIGHUP: SIGNUM) arrived during training: the current step finished and the state was
    saved."""

    def __init__(self, step: int, checkpoint, signum: int = signal.SIGINT):
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


@dataclass
class TrainResult:
    steps: int
    stopped_by: str  # "forgotten" | "max_steps"
    seconds: float
    tokens: int  # non-padding tokens through forward passes (trainable + reference)
    history: list = field(default_factory=list)  # one dict per step: step, loss terms, lr
    check_seconds: float = 0.0  # the stop rule's checks (generation), not in SECONDS
    update: dict | None = None  # --method edit: {module name: (A, B)}, the weight change W + B·A
    repair: dict | None = None  # the repair phase's last state (repair.Repair), when it began
    extra_steps: dict | None = None  # {"asked": --extra-steps, "run": how many ran (--max-steps may cut them)}
    added_forget_rows: list = field(default_factory=list)  # the forget rows the stop rule added (Unlearner.add_leaked_answers)
    loop: dict | None = None  # the loop's state at the end, for a checkpoint of the trained model (run.py, on Ctrl-C)
    save: object = field(default=None, repr=False)  # () -> the checkpoint written of it (run.train_model sets it)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _first_run_length(labels) -> int:
    """How many labelled tokens LABELS' first run of consecutive labelled positions holds."""
    positions = [t for t, label in enumerate(labels) if label != losses.IGNORE_INDEX]
    return next((k for k in range(1, len(positions)) if positions[k] != positions[0] + k), len(positions))


def through_first_run(row: dict) -> dict:
    """ROW's input ids and labels up to the end of its first run of labelled positions (all of a row
    without labels)."""
    labels = row["labels"]
    first = next((t for t, label in enumerate(labels) if label != losses.IGNORE_INDEX), None)
    if first is None:
        return row
    end = first + _first_run_length(labels)
    return {**row, "input_ids": row["input_ids"][:end], "labels": labels[:end]}


class Batches:
    """An endless, seeded stream of shuffled index batches over N examples (epoch after epoch)."""

    def __init__(self, n: int, batch_size: int, rng: random.Random):
        self.n, self.batch_size, self.rng = n, batch_size, rng
        self.order: list[int] = []

    def next(self) -> list[int]:
        batch = []
        while len(batch) < self.batch_size:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            batch.append(self.order.pop())
        return batch


def first_scored_position(labels: torch.Tensor) -> int:
    """The first position whose logits any loss reads: one before the earliest response token.

    Position t predicts token t+1, so logits before this position only score
    prompt tokens, which every loss masks out.
    """
    is_response = labels != losses.IGNORE_INDEX
    first = torch.where(is_response.any(dim=1), is_response.int().argmax(dim=1), labels.shape[1])
    return max(int(first.min()) - 1, 0)


def forward_logits(model, batch: dict, start: int) -> torch.Tensor:
    """Logits for positions START.. only (transformers' `logits_to_keep`).

    The vocabulary projection and its softmax are the widest matrices of a small
    model (49152 x 576 in SmolLM2); skipping them on the prompt (the chat template's
    system text alone is ~30 tokens) saves a sizeable share of every step.
    """
    width = batch["input_ids"].shape[1]
    # Positions as an index tensor, not a count: transformers then gathers the kept hidden
    # states into a contiguous tensor, whose lm_head is one matmul. A count slices them in
    # place, and the strided input sends the matmul down a batched path that copies the
    # vocab-wide weight per row (measured: lm_head forward+backward 1.3x faster in fp32,
    # 4.8x in bf16; bench/train_bench.py).
    keep = torch.arange(start, width, device=batch["input_ids"].device)
    with training_attention(model):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits


def train_without_dropout(model) -> None:
    """Training mode with the model's own dropout off; LoRA's dropout (--lora-dropout) stays on.

    The reference pass runs without dropout, so the trained pass must too: with OPT's 0.1 the
    KL is not 0 at step 0 and the forget loss chases noise. Training mode itself stays on,
    because transformers' gradient checkpointing only runs in it. Dropout is switched off
    where it lives: nn.Dropout modules, and the float `*drop*` attributes (dropout,
    attention_dropout, layerdrop, resid_pdrop...) that layers pass to functional dropout. A
    Dropout module's rate goes to 0 as well as its mode to eval: GPT-2's attention passes
    `self.attn_dropout.p` to its attention kernel whenever the attention module itself trains,
    so its attention dropped 10 % of its weights in the trained pass (the first KL was not 0, and
    a reference computed at another step drew other masks: a resumed run trained on other numbers).
    """
    model.train()
    adapters = {id(m.dropout) for m in lora_modules(model).values()}
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and id(module) not in adapters:
            module.eval()
            module.p = 0.0
        for name, value in vars(module).items():
            if "drop" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def encode_forget_row(tokenizer, example, config: TrainConfig, max_length: int | None = None) -> dict:
    """A forget row as training reads it: the loss pair (`data.loss_pair`), labels on its answers (given, or
    derived by spans.row_answers) unless every response token is pushed down (--forget-tokens response, ULMR's
    negative responses, a passage or a long response), cut at MAX_LENGTH (default --max-length)."""
    # ULMR's forget rows carry negative responses to learn whole, never an answer span to push down.
    by_answers = config.forget_tokens in ("answers", "names") and config.method != "ulmr"
    return encode_pair(tokenizer, *loss_pair(example, config.whole_passage),
                       config.max_length if max_length is None else max_length,
                       row_answers(example)[0] if by_answers else None, names=config.forget_tokens == "names")


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup to `lr`, then constant or linear decay to zero at `max_steps`."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "linear":
        remaining = max(config.max_steps - step, 0) / max(config.max_steps - config.warmup_steps, 1)
        return config.lr * remaining
    return config.lr


class Unlearner:
    """Holds the model, the tokenised data and the optimiser; `step()` does one update."""

    def __init__(self, model, tokenizer, forget, normal, config: TrainConfig, reference_model=None,
                 forward_model=None, retain=()):
        config.validate()
        self.model, self.tokenizer, self.config = model, tokenizer, config
        # With LoRA the reference is the same model with adapters off; with --full it is a frozen copy.
        self.reference_model = reference_model
        self.pad_id = tokenizer.pad_token_id
        self.rng = random.Random(config.seed)
        encode = lambda p, r: encode_pair(tokenizer, p, r, config.max_length)  # noqa: E731
        self._names = config.forget_tokens == "names"
        self.forget = [encode_forget_row(tokenizer, e, config) for e in forget]
        self._redirect_index = None  # redirect.PrefixIndex, built for the first focused row (`_ban`)
        for row in self.forget:
            self._ban(row)
        # The stop rule's leaked greedy answers added to the forget rows (`add_leaked_answers`), in order.
        self.added_forget_rows: list[dict] = []
        # encoded as training draws them (data.EncodedRows): a run reads a few batches of a normal file
        self.normal = EncodedRows(normal, lambda e: encode(e.prompt, e.response))
        self.retain = [encode(e.prompt, e.response) for e in retain]  # every response token: kept whole
        self.forget_prompts = [e.prompt for e in forget]
        self.normal_responses = [e.response for e in normal]
        self.forget_batches = Batches(len(forget), config.batch_size, self.rng)
        self.normal_batches = Batches(len(normal), config.batch_size, self.rng)
        self.retain_batches = Batches(len(self.retain), config.batch_size, self.rng)
        self.device = next(model.parameters()).device
        # --autocast made definite for this model and device ("bf16" or "off"): precision.py
        self.autocast = precision.resolve(config.autocast, model)
        self.rmu = None
        if config.method == "rmu":  # before the trainable parameters are collected: it freezes layers
            self.rmu = rmu.Misdirection(model, config.rmu_layer, config.rmu_scale, config.seed, reference_model)
            rmu.restrict_training(model, self.rmu.layer, full=reference_model is not None)
            self.rmu.calibrate(self._original_hidden_on_normal())
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise UsageError("nothing to train: the model has no trainable parameters")
        if config.protect:  # (its methods are checked by config.validate)
            if not all(id(p) in protect.adapter_parameters(model) for p in self.params):
                raise UsageError("--protect projects LoRA updates: it does not work with --full")
            if distributed.world().active:
                raise UsageError("--protect runs in one process (not under torchrun)")
        # Weights trained whole in half precision (--full with --dtype bfloat16/float16): AdamW updates a float32
        # copy of each, which the weight then takes rounded. In the weight's own dtype an update of about the
        # learning rate is below half a bf16 step for most weights and rounds away (--full bf16 at its default rate
        # moved 15 % of a tiny Llama's weights in 5 steps), and float16's AdamW state cannot hold eps (1e-8 is 0
        # there): every weight with a small gradient became nan at the first step. LoRA weights are float32 already.
        self.masters = {id(p): p.detach().float() for p in self.params if p.dtype in (torch.bfloat16, torch.float16)}
        self.optimized = [self.masters.get(id(p), p) for p in self.params]  # what AdamW updates, in self.params' order
        self.optimizer = torch.optim.AdamW(self.optimized, lr=config.lr, weight_decay=config.weight_decay)
        self.step_count = 0
        self.tokens = 0
        # What the trainable forward goes through: the model, or under torchrun its DDP wrapper
        # (distributed.wrap). Everything else uses the unwrapped self.model.
        self.forward_model = forward_model if forward_model is not None else model
        # The original's logits on the normal and retain rows, computed once (reference_cache.py),
        # keyed by the row objects of self.normal and self.retain, which live as long as this object.
        self.reference_cache = (None if distributed.world().active else
                                ReferenceLogits(model.get_output_embeddings().weight.shape[0],
                                                precision.output_bytes(self.autocast, model)))
        # Under --autocast, the frozen weights' bf16 copies, kept for the run instead of cast at every call (one
        # process only, as the reference cache: precision.FrozenCasts)
        self.frozen_casts = (precision.FrozenCasts() if self.autocast == "bf16" and not distributed.world().active
                             else None)
        # NPO's reference on the forget rows, one number a row (`_original_sequence_logprobs`)
        self._forget_index = {id(row): i for i, row in enumerate(self.forget)}
        self._forget_reference: dict[int, float] = {}
        # A repair step (repair.py) trains the keep terms alone: the normal rows' KL (graddiff: their
        # likelihood) and the retain rows' KL. Set by `train` from the stop rule's last check.
        self.keep_terms_only = False
        # --stop-margin's multiplier on the forget term's weight: doubled at each check the margin
        # fails (`train`), so a row held where the fading push of unlikelihood meets the keep terms'
        # pull is pushed harder until it goes, instead of stalling the run to --max-steps.
        self.forget_scale = 1.0
        self._likeliest_row: int | None = None  # the forget row the margin found likeliest last (its first read)
        self._drawn_ahead: list[dict[str, list[dict]]] = []  # this update's later micro-batches, drawn (`_first_epoch`)

    @property
    def has_keep_terms(self) -> bool:
        """Whether a step without the forget side would train anything (a repair step needs this)."""
        return bool((self.normal and self.config.normal_weight > 0) or (self.retain and self.config.retain_weight > 0))

    # --- state, for checkpoints ------------------------------------------------

    def _named_params(self) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters by name, in optimiser order."""
        by_id = {id(p): name for name, p in self.model.named_parameters()}
        return {by_id[id(p)]: p for p in self.params}

    def state_dict(self) -> dict:
        """Everything a later `load_state_dict` needs to continue exactly from this step.

        Tensors are whole and on the CPU (FSDP's shards are gathered: a collective, so every
        rank calls this); "tokens" is summed over ranks (rank 0 carries it on resume).
        """
        params = self._named_params()
        optimizer_tensors, optimizer_scalars = {}, {}
        for name, p in params.items():
            for key, value in self.optimizer.state.get(self.masters.get(id(p), p), {}).items():
                if torch.is_tensor(value):
                    optimizer_tensors[f"{name}::{key}"] = distributed.full(value.detach()).cpu().contiguous()
                else:
                    optimizer_scalars[f"{name}::{key}"] = value
        version, internal, gauss = self.rng.getstate()
        return {
            # a weight with a float32 master is saved as its master: resuming rounds it as the step did
            "weights": {name: distributed.full(self.masters.get(id(p), p).detach()).cpu().contiguous()
                        for name, p in params.items()},
            "optimizer_tensors": optimizer_tensors,
            "optimizer_scalars": optimizer_scalars,
            "torch_rng": distributed.rng_states(),
            "python_rng": [version, list(internal), gauss],
            "forget_order": list(self.forget_batches.order),
            "normal_order": list(self.normal_batches.order),
            "retain_order": list(self.retain_batches.order),
            "reference_groups": dict(self.reference_cache.groups) if self.reference_cache else {},
            "param_order": list(params),
            "step": self.step_count,
            "tokens": distributed.total(self.tokens),
            "forget_scale": self.forget_scale,
            "added_forget_rows": list(self.added_forget_rows),
            # the margin's next check reads this row alone first (`likeliest_forget_answer`): a resumed run whose
            # check read every row together gave the same verdict with another rounding of the logged p
            "likeliest_row": self._likeliest_row,
            "autocast": self.autocast,
        }

    def load_state_dict(self, state: dict, where: str = "the checkpoint") -> None:
        """Restore what `state_dict` returned (under FSDP each rank keeps its own shard)."""
        params = self._named_params()
        # The steps so far ran at the checkpoint's precision; another (--autocast auto on another device) would
        # continue them on other numbers. A checkpoint from before the setting trained in float32.
        trained_at = state.get("autocast", "off")
        if trained_at != self.autocast:
            raise UnlearnError(f"{where}: its steps trained with --autocast {trained_at}, this run's resolves to "
                               f"{self.autocast} (give --autocast {trained_at}, or start afresh with --force)")
        weights = state["weights"]
        if set(weights) != set(params):
            missing = sorted(set(params) - set(weights)) or sorted(set(weights) - set(params))
            raise UnlearnError(f"{where}: the checkpoint's weights do not match this model (e.g. {missing[0]})")
        with torch.no_grad():
            for name, p in params.items():
                if weights[name].shape != p.shape:
                    raise UnlearnError(f"{where}: {name} has shape {tuple(weights[name].shape)}, "
                                       f"expected {tuple(p.shape)}")
                p.copy_(distributed.shard_like(weights[name], p))
                if id(p) in self.masters:
                    self.masters[id(p)].copy_(weights[name])
        saved = {**state["optimizer_tensors"], **state["optimizer_scalars"]}
        optimizer_state = {}
        for i, (name, p) in enumerate(params.items()):
            entry = {key.split("::", 1)[1]: distributed.shard_like(value, p) if torch.is_tensor(value) else value
                     for key, value in saved.items() if key.split("::", 1)[0] == name}
            if entry:
                optimizer_state[i] = entry
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = optimizer_state
        self.optimizer.load_state_dict(optimizer)
        torch.random.set_rng_state(distributed.my_rng_state(state["torch_rng"]))
        version, internal, gauss = state["python_rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        if state.get("added_forget_rows") and not self.added_forget_rows:  # the rows the stop rule added, as they were
            for record in state["added_forget_rows"]:
                self.add_leaked_answers([record], record["step"])
        self.forget_batches.order = list(state["forget_order"])
        self.normal_batches.order = list(state["normal_order"])
        self.retain_batches.order = list(state.get("retain_order", []))
        if self.reference_cache is not None:  # the resumed run groups its reference forwards as before
            self.reference_cache.groups = {k: [list(g) for g in v] for k, v in state.get("reference_groups", {}).items()}
        self.step_count = int(state["step"])
        self.forget_scale = float(state.get("forget_scale", 1.0))
        self._likeliest_row = state.get("likeliest_row")  # absent from a checkpoint of an older version: None
        self.tokens = int(state["tokens"]) if distributed.world().is_main else 0  # summed over ranks at the end

    # --- building the rows of one micro-batch -------------------------------

    def _ban(self, row: dict) -> None:
        """With --forget-loss redirect, the tokens each answer position of forget ROW may not move to
        (redirect.py); with spellings, the tokens pushed down with the answer's own. Rows scored
        whole (a passage, a long response) take plain unlikelihood (losses.redirect_loss,
        losses.unlikelihood_loss) and get none."""
        if self.config.forget_loss not in ("redirect", "spellings") or not row["focused"]:
            return
        if self._redirect_index is None:
            self._redirect_index = redirect.PrefixIndex(self.tokenizer)
        row["banned"] = redirect.banned_tokens(self._redirect_index, row)

    def _mismatch_row(self, forget_index: int) -> dict:
        if self.config.method == "ga+template":
            answer = self.config.template
        else:  # a response drawn at random from the normal data (Yao et al.'s y_rdn)
            answer = self.normal_responses[self.rng.randrange(len(self.normal_responses))]
        return encode_pair(self.tokenizer, self.forget_prompts[forget_index], answer, self.config.max_length)

    def margin_rows(self) -> list[int]:
        """The forget rows --stop-margin reads: those narrowed to an answer (`likeliest_forget_answer`). Where
        there is none, --leak-growth grows the forget weight at each leaking check instead."""
        return [i for i, row in enumerate(self.forget) if row["focused"]]

    def likeliest_forget_answer(self, above: float | None = None) -> tuple[float | None, bool]:
        """The stop rule's margin (--stop-margin): the highest probability, over the forget rows focused on
        an answer, of the first run of each row's scored tokens (the answer's first occurrence) given the
        tokens before it, teacher-forced, with the weights as they are now. None when no row is focused.

        A row scored whole (a passage, a long response, a row whose answers are not in its response) has
        no answer to read, and its whole response's probability is no margin: at the original model the
        dev and test passages' and harmful responses' were at most 1e-5, so they never decided a verdict,
        yet reading them was a forward over every forget row at every check (~2 s on 10 passages, two
        threads; 35-47 checks a `passages` run). Their leaks are judged by the greedy check alone.

        A greedy check reads only whether an answer is still the likeliest continuation; one that has
        just stopped being it comes back within a few steps once the forget push fades (unlikelihood)
        and the keep terms pull back (docs/quality.md, "Unlikelihood"). A stop condition, not a result.

        Returns (p, exact). With ABOVE, the row that was the likeliest at the last read goes first,
        alone: if its p is above ABOVE, the verdict is known and the other rows are not read (p is
        then a lower bound, exact False). Most checks fail on that row, for a fourteenth of the forwards.
        """
        focused = self.margin_rows()
        if not focused:
            return None, True
        first = self._likeliest_row if above is not None and len(focused) > 1 else None
        if first is not None:
            p = distributed.broadcast(self._answer_probabilities([first])[0])
            if p > above:
                return p, False
        rest = [i for i in focused if i != first]
        probabilities = dict(zip(rest, self._answer_probabilities(rest)))
        if first is not None:
            probabilities[first] = p
        # a nan row counts as the likeliest: max() would pass over it, and the margin must not hold on it
        self._likeliest_row = max(probabilities, key=lambda i: (math.isnan(probabilities[i]), probabilities[i]))
        # every rank ran the forwards (FSDP needs them all); rank 0's value holds
        return distributed.broadcast(probabilities[self._likeliest_row]), True

    def _answer_probabilities(self, indices: list[int]) -> list[float]:
        """p of the first run of scored tokens of the forget rows INDICES (0 for a row truncated to none)."""
        from unlearn.evaluate import labelled_logprobs

        # Each row cut after its first run: a causal model's logits there do not depend on the tokens
        # after it, and the margin reads nothing else (the examples/ rows lose 6 % of their tokens; a
        # row whose answer opens a long response, most of them).
        rows = [through_first_run(self.forget[i]) for i in indices]
        # with the scorer's batching: 16 rows a forward, the chat template's shared prefix run once
        scored = labelled_logprobs(self.forward_model, self.tokenizer, rows)
        return [math.exp(sum(lp)) if lp else 0.0 for lp in scored]

    def add_leaked_answers(self, leaked: list[dict], step: int) -> list[dict]:
        """Add the stop rule's leaked greedy answers to the forget rows; returns the ones added.

        LEAKED: {"prompt", "response", "answers"} per forget prompt the last check found leaking, the
        response the model's own answer cut after the answer's first occurrence
        (`spans.through_first_answer`). Each becomes a forget row focused on that occurrence.

        Why: the margin (`likeliest_forget_answer`) reads each answer after the forget row's own words,
        and the model can reach it by another path. On the dev scenario `inventors` the margin read
        p ~2e-5 for every row from step 4 on, yet the greedy answer to "Who discovered America in
        1492?" went "... attributed to Christopher COLUMBUS": the capitals spelling, other tokens, which
        nothing pushed down, so every run went on to --max-steps (150 steps, ~20 minutes). Added, the
        model's own path is pushed down like the rest, and the margin reads it too, so the next greedy
        check runs only once that path is unlikely.

        An added row is drawn in the next batch. Skipped: a response already added, one without an
        answer, and past --leaked-rows rows a prompt (each costs a row in every epoch and in every
        margin read).
        """
        added = []
        for leak in leaked:
            same_prompt = [r for r in self.added_forget_rows if r["prompt"] == leak["prompt"]]
            if len(same_prompt) >= self.config.leaked_rows or any(r["response"] == leak["response"] for r in same_prompt):
                continue
            row = encode_pair(self.tokenizer, leak["prompt"], leak["response"], self.config.max_length,
                              list(leak["answers"]), names=self._names)
            if not row["focused"]:
                continue
            self._ban(row)
            index = len(self.forget)
            self.forget.append(row)
            self.forget_prompts.append(leak["prompt"])
            self._forget_index[id(row)] = index
            self.forget_batches.n += 1
            self.forget_batches.order.append(index)  # popped first: the next batch pushes it down
            record = {"step": step, "prompt": leak["prompt"], "response": leak["response"],
                      "answers": list(leak["answers"])}
            self.added_forget_rows.append(record)
            added.append(record)
        return added

    def _rows(self) -> dict[str, list[dict]]:
        method = self.config.method
        forget_idx = self.forget_batches.next()
        rows = {"forget": [self.forget[i] for i in forget_idx]}
        if method in ("ga+mismatch", "ga+template") and self.config.mismatch_weight > 0:
            rows["mismatch"] = [self._mismatch_row(i) for i in forget_idx]
        if self.keep_terms_only:  # a repair step (repair.py): the forget side drawn, as ever, but not trained
            rows = {}
        if self.config.normal_weight > 0:
            rows["normal"] = [self.normal[i] for i in self.normal_batches.next()]
        if self.retain and self.config.retain_weight > 0:
            rows["retain"] = [self.retain[i] for i in self.retain_batches.next()]
        return rows

    # --- the loss -------------------------------------------------------------

    def _reference_logits(self, batch: dict, start: int, kept: str | None = None) -> torch.Tensor:
        """The original's logits (adapters off, or the frozen copy) from START on, without gradient.

        KEPT, the name of the set the batch's rows come from ("normal", "retain": drawn again and
        again): read from the logits computed once per run (`reference_cache`), when they are kept.
        """
        if kept is not None and self.reference_cache is not None:
            rows, _ = self._kept_set(kept)
            logits = self.reference_cache.logits(kept, rows, batch["rows"], batch["labels"][:, start:],
                                                 lambda: self._first_epoch(kept, batch["rows"]),
                                                 self._reference_of_rows)
            if logits is not None:
                return logits
        self.tokens += int(batch["attention_mask"].sum())
        with torch.no_grad():
            if self.reference_model is not None:
                return forward_logits(self.reference_model, batch, start)
            with adapters_disabled(self.model):  # the model's own dropout is already off (step())
                return forward_logits(self.model, batch, start)

    def _original_sequence_logprobs(self, batch: dict, start: int, labels: torch.Tensor) -> torch.Tensor:
        """NPO's reference: log p_orig(y | x) of each forget row of BATCH (LABELS from START on).

        The original never changes, so in one process each forget row's value is computed once and
        kept (a number a row): the rows run through the original in fixed groups of --batch-size
        consecutive rows, each group when a batch first needs one of its rows, so a resumed run
        computes the very same numbers (float rounding depends on the rows run together). That is a
        forward over the batch's forget rows less per step. Under torchrun each rank runs its batch's
        rows through the original at every step, as the KL's reference does there (reference_cache.py).
        """
        if self.reference_cache is None:
            return losses.sequence_logprob(self._reference_logits(batch, start), labels)
        size = self.config.batch_size
        for row in batch["rows"]:
            i = self._forget_index[id(row)]
            if i not in self._forget_reference:
                group = list(range(i - i % size, min(i - i % size + size, len(self.forget))))
                logits, group_labels = self._reference_of_rows([self.forget[j] for j in group])
                values = losses.sequence_logprob(logits, group_labels)
                # a group grown by an added row (`add_leaked_answers`) keeps its rows' first values
                self._forget_reference.update((j, v) for j, v in zip(group, values.tolist())
                                              if j not in self._forget_reference)
        return torch.tensor([self._forget_reference[self._forget_index[id(row)]] for row in batch["rows"]],
                            dtype=torch.float32, device=labels.device)

    def _kept_set(self, name: str) -> tuple[list[dict], Batches]:
        """The rows of set NAME ("normal", "retain", "forget" for the redirect loss) whose reference logits are kept, and their sampler."""
        return {"normal": (self.normal, self.normal_batches), "retain": (self.retain, self.retain_batches),
                "forget": (self.forget, self.forget_batches)}[name]

    def _first_epoch(self, name: str, first: list[dict]) -> list[list[int]]:
        """The batches of set NAME's rows in the order training draws them from now: FIRST (the rows
        of the batch asking), then the update's later micro-batches (--grad-accum: drawn with it, before any
        loss), then the rest of its epoch as the sampler will pop it, then any row not in them (an epoch that
        ends inside a batch), in BATCH_SIZE groups. reference_cache.py."""
        rows, sampler = self._kept_set(name)
        index = {id(row): i for i, row in enumerate(rows)}
        head = [index[id(row)] for row in first]
        groups, placed = [head], set(head)
        for later in self._drawn_ahead:
            group = [i for i in (index[id(row)] for row in later.get(name, ())) if i not in placed]
            if group:
                groups.append(group)
                placed.update(group)
        rest = [i for i in reversed(sampler.order) if i not in placed]
        placed.update(rest)
        rest += [i for i in range(len(rows)) if i not in placed]
        size = self.config.batch_size
        return groups + [rest[lo:lo + size] for lo in range(0, len(rest), size)]

    def _reference_of_rows(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """The original's logits on ROWS, from their first scored position on, and their labels from there."""
        batch = {k: v.to(self.device) for k, v in collate(rows, self.pad_id).items()}
        start = first_scored_position(batch["labels"])
        return self._reference_logits(batch, start), batch["labels"][:, start:]

    def _original_hidden(self, batch: dict) -> torch.Tensor:
        """RMU: the original model's h_ℓ (adapters off, or the frozen copy), without gradient."""
        with torch.no_grad():
            if self.reference_model is not None:
                return rmu.hidden_at(self.reference_model, self.rmu.original_module, batch)
            with adapters_disabled(self.model):
                return rmu.hidden_at(self.model, self.rmu.module, batch)

    def _original_hidden_on_normal(self):
        """RMU's calibration: the original's h_ℓ and scored positions on the first `rmu.CALIBRATION_ROWS` normal
        rows, a batch at a time (yielded, so that one batch's hidden states are held at once: every row's at
        once took rows × positions × hidden floats, gigabytes for a large normal file)."""
        rows = min(len(self.normal), rmu.CALIBRATION_ROWS)
        for i in range(0, rows, self.config.batch_size):
            batch = {k: v.to(self.device) for k, v in collate(self.normal[i:min(i + self.config.batch_size, rows)],
                                                               self.pad_id).items()}
            yield self._original_hidden(batch), rmu.scored_positions(batch["labels"])

    def _rmu_loss(self, rows: dict[str, list[dict]], shares: dict | None = None) -> tuple[torch.Tensor, dict]:
        """RMU: forget rows' h_ℓ pulled onto c·u, normal and retain rows' h_ℓ held at the original's.

        One forward per group, each stopping at layer ℓ. Runs in one process only (run.prepare
        refuses rmu under torchrun), so these means are the batch's own; each is a mean over its group's
        scored positions, the "tokens" of SHARES (see `loss`).
        """
        config = self.config
        weights = {"forget": self.forget_weight, "normal": config.normal_weight, "retain": self.retain_weight}
        terms, total = {}, None
        for name, group in rows.items():
            batch = {k: v.to(self.device) for k, v in collate(group, self.pad_id).items()}
            self.tokens += int(batch["attention_mask"].sum())
            hidden = rmu.hidden_at(self.model, self.rmu.module, batch)
            mask = rmu.scored_positions(batch["labels"])
            if name == "forget":
                term = rmu.forget_loss(hidden, mask, self.rmu.target.to(hidden.device))
            else:
                self.tokens += int(batch["attention_mask"].sum())
                term = rmu.retain_loss(hidden, mask, self._original_hidden(batch))
            term = term if shares is None else term * shares[name]["tokens"]
            terms[f"rmu_{name}"] = term
            total = weights[name] * term if total is None else total + weights[name] * term
        return total, {k: float(v.detach()) for k, v in terms.items()}

    @property
    def forget_weight(self) -> float:
        """The forget term's weight this step: --forget-weight times --stop-margin's (or --leak-growth's) multiplier."""
        return self.config.forget_weight * self.forget_scale

    @property
    def retain_weight(self) -> float:
        """The retain term's weight this step: --retain-weight, times --stop-margin's multiplier with
        --retain-follows-margin (the rows that stand for the neighbours keep their share as the forget term grows)."""
        return self.config.retain_weight * (self.forget_scale if self.config.retain_follows_margin else 1.0)

    def _group_terms(self, name: str, logits, labels, batch: dict, start: int) -> list[tuple[str, float, str, torch.Tensor]]:
        """The loss terms one group's logits give: (term, weight, unit, value) each.

        UNIT is what the term is a mean over (distributed.scored_count's "rows" or "tokens"), which
        is what lets a group's term be summed from pieces of its rows (`_backward_in_pieces`).
        """
        config, method = self.config, self.config.method
        if name == "forget":
            if method == "ulmr":  # supervised fine-tuning on (rewritten prompt, negative response) pairs
                return [("sft", 1.0, "rows", distributed.global_mean(lambda: losses.mean_nll(logits, labels),
                                                                     labels, "rows", logits))]
            if method == "npo":  # a mean over the rows that have a response token (losses.npo_loss)
                return [("npo", self.forget_weight, "rows", distributed.global_mean(
                    lambda: losses.npo_loss(losses.sequence_logprob(logits, labels),
                                            self._original_sequence_logprobs(batch, start, labels), config.npo_beta,
                                            scored=losses.scored_rows(labels)), labels, "rows", logits))]
            # Under torchrun, means over a varying number of rows / tokens are made global (distributed.py).
            if config.forget_loss == "spellings":  # unlikelihood of each answer position's banned set
                banned = self._banned(batch, start, labels)
                return [("forget", self.forget_weight, "rows", distributed.global_mean(
                    lambda: losses.unlikelihood_loss(logits, labels, banned), labels, "rows", logits))]
            redirected = [row["focused"] for row in batch["rows"]] if config.forget_loss == "redirect" else []
            if any(redirected):
                reference = self._reference_logits(batch, start, kept="forget")
                banned = self._banned(batch, start, labels)
                which = None if all(redirected) else torch.tensor(redirected, device=labels.device)
                return [("forget", self.forget_weight, "rows", distributed.global_mean(
                    lambda: losses.redirect_loss(reference, logits, labels, banned, which), labels, "rows", logits))]
            # redirect's rows scored whole take unlikelihood (losses.redirect_loss)
            forget_loss = losses.forget_loss if config.forget_loss == "ascent" else losses.unlikelihood_loss
            return [("forget", self.forget_weight, "rows",
                     distributed.global_mean(lambda: forget_loss(logits, labels), labels, "rows", logits))]
        if name == "mismatch":
            return [("mismatch", config.mismatch_weight, "rows",
                     distributed.global_mean(lambda: losses.mismatch_loss(logits, labels), labels, "rows", logits))]
        if name == "normal" and method == "graddiff":  # gradient difference: plain likelihood of the normal data
            return [("normal_nll", config.normal_weight, "rows",
                     distributed.global_mean(lambda: losses.mean_nll(logits, labels), labels, "rows", logits))]
        # normal: KL(p_orig || p_theta); retain: the same true KL, on the rows the user named must-keep
        reference = self._reference_logits(batch, start, kept=name)
        kl = distributed.global_mean(lambda: losses.kl_loss(reference, logits, labels), labels, "tokens", logits)
        if name == "normal":
            return [("kl", config.normal_weight, "tokens", kl)]
        return [("retain_kl", self.retain_weight, "tokens", kl)]

    @staticmethod
    def _banned(batch: dict, start: int, labels: torch.Tensor) -> torch.Tensor:
        """(n, 3) long: (row, label position from START, token) of the batch rows' banned tokens (`_ban`)."""
        return torch.tensor([(i, j - start, token) for i, row in enumerate(batch["rows"])
                             for j, token in row.get("banned", ())], dtype=torch.long,
                            device=labels.device).reshape(-1, 3)

    def _group_forward(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, dict, int]:
        """The trainable forward of ROWS: logits from their first scored position on, labels aligned, batch, start."""
        batch = {k: v.to(self.device) for k, v in collate(rows, self.pad_id).items()}
        self.tokens += int(batch["attention_mask"].sum())
        batch["rows"] = rows  # the row objects, which key the reference logits kept between steps
        start = first_scored_position(batch["labels"])
        logits = forward_logits(self.forward_model, batch, start)
        return logits, batch["labels"][:, start:], batch, start

    def loss(self, rows: dict[str, list[dict]], shares: dict | None = None) -> tuple[torch.Tensor, dict]:
        """The weighted loss of one micro-batch and its terms (floats, for logging).

        SHARES (`_accumulation_shares`), under --grad-accum: each term is multiplied by its group's share of
        the step's units, so that the micro-batches' losses sum to the step's; None: the micro-batch's own means.
        """
        if self.config.method == "rmu":
            return self._rmu_loss(rows, shares)
        names = list(rows)
        # One forward per group, each padded to its own longest row and scored from its own first
        # response position: forget rows are shorter than normal rows, and in a joint batch their
        # padding and unscored logits were ~15% of a default step's work (bench/train_bench.py).
        # DDP/FSDP wrappers need exactly one forward per backward, so they get the joint batch.
        groups = [[name] for name in names] if self.forward_model is self.model else [names]
        parts = {}
        for group in groups:
            logits, labels, batch, start = self._group_forward([r for name in group for r in rows[name]])
            row = 0
            for name in group:  # split a joint forward pass back into its groups
                n = len(rows[name])
                parts[name] = (logits[row:row + n], labels[row:row + n],
                               {k: v[row:row + n] for k, v in batch.items()}, start)
                row += n
        terms, total = {}, None
        for name in names:  # forget, mismatch, normal, retain: the order of the sum
            for term, weight, unit, value in self._group_terms(name, *parts[name]):
                value = value if shares is None else value * shares[name][unit]
                terms[term] = value
                total = weight * value if total is None else total + weight * value
        return total, {k: float(v.detach()) for k, v in terms.items()}

    # The most residual-stream values (rows x padded width x hidden size x layers) one trainable
    # forward of `_backward_in_pieces` covers. Autograd keeps ~11 values per such value for the
    # backward (measured at OPT-1.3B: 88 KiB per token per layer at hidden size 2048: the layer
    # norms' inputs, q, k, v and attention's output, fc1's input and the 8192-wide ReLU output),
    # so 2^24 is at most ~700 MiB of activations in float32. The default step on the embedded
    # 135M model (4 rows of <= 88 tokens x 576 x 30 layers, 6.1 M) keeps one forward per group;
    # at OPT-1.3B (128 tokens x 2048 x 24 = 6.3 M per row) rows go two by two, at OPT-2.7B one by
    # one (peak RSS 1.58x -> 1.23x the fp32 weights at OPT-1.3B, bench/train_bench.py). Smaller
    # pieces cost time: one row per piece was ~12% slower than one forward per group at
    # OPT-1.3B's widths (4 layers, fp32 and bf16: fewer rows per matmul), for ~280 MB less.
    piece_values = 1 << 24

    def _pieces(self, rows: list[dict]) -> list[list[dict]]:
        """ROWS cut, in order, into runs whose padded forward stays within `piece_values` (one row at least)."""
        config = text_config(self.model)  # an image-and-text model's layers are its text model's
        per_token = getattr(config, "hidden_size", 0) * getattr(config, "num_hidden_layers", 0)
        if not per_token:  # an unknown shape: no estimate, one forward for the group
            return [rows]
        pieces, piece, width = [], [], 0
        for row in rows:
            wider = max(width, len(row["input_ids"]))
            if piece and (len(piece) + 1) * wider * per_token > self.piece_values:
                pieces.append(piece)
                piece, wider = [], len(row["input_ids"])
            piece.append(row)
            width = wider
        return pieces + [piece]

    def _backward_in_pieces(self, plan: dict[str, list[list[dict]]], scale: float,
                            shares: dict | None = None) -> dict | None:
        """Backpropagate SCALE x the loss of a micro-batch group by group, and big groups piece by piece
        (PLAN: each group's rows cut by `_pieces`; SHARES as `loss`'s).

        The same gradient as `loss(rows)` then one backward (to float32 rounding): the loss is a
        weighted sum of terms, each a mean over its group's units (rows or response tokens), so
        a piece holding count_p of a group's N units adds its own mean x count_p / N. But only
        one piece's activations are alive at a time, not every group's: at OPT-1.3B they were
        2.1 GB of a 1.65x-the-weights peak. Returns the logged terms and "loss", or None when a
        piece would hold no unit of a term that its group has (its own mean would be undefined
        or raise): the caller then takes the one-backward path, which handles those rows.
        """
        counts = {}  # per group: the units of each kind in the whole group and in each piece
        for name, pieces in plan.items():
            per_piece = [self._units(piece) for piece in pieces]
            if len(pieces) > 1 and any(c[unit] == 0 for c in per_piece for unit in c):
                return None
            counts[name] = ({unit: sum(c[unit] for c in per_piece) for unit in per_piece[0]}, per_piece)
        logged, weights = {}, {}
        for name, pieces in plan.items():
            whole, per_piece = counts[name]
            for piece, piece_counts in zip(pieces, per_piece):
                total = None
                for term, weight, unit, value in self._group_terms(name, *self._group_forward(piece)):
                    share = (piece_counts[unit] / whole[unit] if len(pieces) > 1 else 1.0) * (
                        1.0 if shares is None else shares[name][unit])
                    logged[term] = logged.get(term, 0.0) + float(value.detach()) * share
                    weights[term] = weight
                    part = weight * value * share
                    total = part if total is None else total + part
                (total * scale).backward()
                del total  # this piece's graph, activations and logits go before the next forward
        logged["loss"] = sum(weights[term] * value for term, value in logged.items())
        return logged

    def _units(self, rows: list[dict]) -> dict[str, int]:
        """How many of each unit a term averages over ROWS: {"rows": ..., "tokens": ...} (distributed.scored_count)."""
        labels = collate(rows, self.pad_id)["labels"]
        return {unit: distributed.scored_count(labels, unit) for unit in ("rows", "tokens")}

    def _accumulation_shares(self, drawn: list[dict[str, list[dict]]]) -> list[dict | None]:
        """Per micro-batch of DRAWN (one update's), each group's share of the update's units: {group: {unit: share}}.

        Each term is a mean over its group's units (rows, or response tokens: `_group_terms`). Averaging the
        micro-batches' means weighed a KL token by 1 / (--grad-accum x its micro-batch's tokens), so a normal row
        counted for more beside short rows than beside long ones, and `--batch-size 2 --grad-accum 2` was not
        `--batch-size 4` (the KL's gradient differed by 69 % on rows of 5 and 70 tokens). A micro-batch's
        mean times count_m / N, N the update's units (over every rank: `global_mean` has already made each
        rank's term a share of the micro-batch's), sums to the mean over all N, as one batch gives it.
        With one micro-batch: [None], its means as they are.
        """
        if len(drawn) == 1:
            return [None]
        units = ("rows", "tokens")
        keys = sorted({(name, unit) for rows in drawn for name in rows for unit in units})
        counts = [{(name, unit): count for name, group in rows.items() for unit, count in self._units(group).items()}
                  for rows in drawn]
        flat = distributed.totals([c.get(key, 0) for c in counts for key in keys])
        per_micro = [dict(zip(keys, flat[i * len(keys):(i + 1) * len(keys)])) for i in range(len(drawn))]
        whole = {key: sum(m[key] for m in per_micro) for key in keys}
        return [{name: {unit: m[(name, unit)] / whole[(name, unit)] if whole[(name, unit)] else 0.0 for unit in units}
                 for name in rows} for rows, m in zip(drawn, per_micro)]

    def _terms_zero_at_the_original(self, rows: dict[str, list[dict]]) -> dict[str, float]:
        """Before the first update, take the KL groups out of ROWS and return their terms' values (0.0).

        The trained model is then the original itself (LoRA's B starts at zero, so the adapters add
        exactly nothing; --full's reference is a frozen copy of the same weights), so
        KL(p_orig || p_theta) is 0 and so is its gradient (p_theta - p_orig per logit): the forward
        and backward of those rows would change the update by float rounding only. The README run's
        first step took ~4.5 s with them, three groups of rows; the rows are still drawn, so every
        later batch is the one it was. Not for rmu (its own loss) or a model that does not start at
        the original (a resumed run: step_count > 0; adapters with a non-zero B).
        """
        if self.step_count or self.config.method == "rmu":
            return {}
        if self.reference_model is None:
            adapters = lora_modules(self.model)
            if not adapters or any(bool(m.lora_B.detach().any()) for m in adapters.values()):
                return {}
        kl_groups = {"normal": "kl", "retain": "retain_kl"}
        if self.config.method == "graddiff":  # its normal term is a likelihood, not a KL
            del kl_groups["normal"]
        zero = {}
        for name, term in kl_groups.items():
            if rows.pop(name, None) is not None:
                zero[term] = 0.0
        return zero

    def _protected_backward(self, rows: dict[str, list[dict]], basis: torch.Tensor, scale: float,
                            shares: dict | None = None) -> dict[str, float]:
        """Take the forget side (forget, mismatch) out of ROWS and add SCALE x its loss's gradient to the
        parameters' .grad, projected off BASIS (protect.py); return its logged terms and "loss" (SHARES as `loss`'s).

        Only that side is projected: the KL terms' gradients are added whole by the usual backward, so
        they still pull the model back wherever it drifted. (Projecting Adam's whole update instead
        also took their pull off the protected directions, and normal similarity fell on the dev
        split: docs/quality.md, "Protecting the probes' gradients".)
        """
        side = {name: rows.pop(name) for name in ("forget", "mismatch") if name in rows}
        if not side:  # a repair step: nothing to project
            return {}
        total, terms = self.loss(side, shares)
        grads = torch.autograd.grad(total * scale, self.params, allow_unused=True)
        projected = protect.project_out(protect.flat(g if g is not None else torch.zeros_like(p)
                                                     for g, p in zip(grads, self.params)), basis)
        protect.accumulate(self.params, projected)
        return {"loss": float(total.detach()), **terms}

    def _micro_batches(self, drawn: list[dict[str, list[dict]]], protected: torch.Tensor | None) -> dict[str, float]:
        """Forward and backward of an update's micro-batches DRAWN (their gradients summed into .grad); returns
        the logged terms (PROTECTED: --protect's basis, or None)."""
        config, logged = self.config, {}
        for m, (rows, shares) in enumerate(zip(drawn, self._accumulation_shares(drawn))):
            self._drawn_ahead = drawn[m + 1:]
            scale = 1 / config.grad_accum if shares is None else 1.0  # shares weigh each term themselves
            at_zero = self._terms_zero_at_the_original(rows)
            # --protect: the forget side's gradient goes in first, projected (`_protected_backward`).
            step_terms = {} if protected is None else self._protected_backward(rows, protected, scale, shares)
            if rows:  # (a protected run's first step has nothing left: its KL rows are out)
                # One process and a group too big for one forward (`_pieces`): backward piece by piece.
                # Otherwise one backward of the whole loss (DDP/FSDP need one forward per backward).
                plan = ({name: self._pieces(group) for name, group in rows.items()} if config.method != "rmu"
                        and self.forward_model is self.model and not distributed.world().active else {})
                split = any(len(pieces) > 1 for pieces in plan.values())
                rest = self._backward_in_pieces(plan, scale, shares) if split else None
                if rest is None:
                    total, terms = self.loss(rows, shares)
                    (total * scale).backward()
                    rest = {"loss": float(total.detach()), **terms}
                step_terms = {**rest, **step_terms, "loss": step_terms.get("loss", 0.0) + rest["loss"]}
            step_terms.update(at_zero)
            for k, v in step_terms.items():
                logged[k] = logged.get(k, 0.0) + v * scale
        return logged

    def step(self) -> dict:
        """One optimiser update over `grad_accum` micro-batches; returns the logged terms."""
        config = self.config
        train_without_dropout(self.model)
        lr = learning_rate(config, self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # --protect: the span of the retain rows' gradients at the weights this update starts from (a repair
        # step trains no forget term, so there is nothing to project: `_protected_backward`).
        protected = (protect.basis(protect.row_gradients(self.model, self.params, self.retain, self.pad_id,
                                                         forward_logits))
                     if config.protect and self.retain and not self.keep_terms_only else None)
        # Every rank draws the same global micro-batches (same RNG draws, in the order one at a time gave)
        # and keeps its share of each.
        drawn = [distributed.shard_rows(self._rows()) for _ in range(config.grad_accum)]
        with precision.training_autocast(self.autocast, self.device, self.frozen_casts):
            logged = self._micro_batches(drawn, protected)
        self._drawn_ahead = []
        logged = distributed.average(logged)  # the global batch's terms, the same on every rank
        for p in self.params:  # a half-precision weight's gradient goes to its float32 master
            if id(p) in self.masters:
                self.masters[id(p)].grad = None if p.grad is None else p.grad.float()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.optimized, config.max_grad_norm or float("inf"))
        # A nan/inf update would poison every weight it touches (and every later step): refuse it.
        for what, value in (("loss", logged["loss"]), ("gradient norm", float(grad_norm))):
            if not math.isfinite(value):
                self._zero_grads()
                raise NonFiniteLoss(self.step_count + 1, what, value)
        self.optimizer.step()
        if self.masters:
            with torch.no_grad():
                for p in self.params:
                    if id(p) in self.masters:
                        p.copy_(self.masters[id(p)])
        self._zero_grads()
        self.step_count += 1
        self._check_weights()
        record = {"step": self.step_count, "lr": lr, "grad_norm": float(grad_norm), **logged}
        if self.keep_terms_only:
            record["keep_terms_only"] = True
        return record

    def _zero_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    def _check_weights(self) -> None:
        """Raise NonFiniteWeights if the update just taken made a trainable weight nan or inf.

        A finite loss and gradient norm do not make a finite update: Adam moves each weight by about
        the learning rate, which can overflow the weights' dtype (bf16's range sooner than float32's), and
        every later loss is nan. Only the trainable parameters can have changed, so only they are read.
        """
        name = first_non_finite(self._named_params())
        if distributed.any_rank(name is not None):  # (FSDP: a shard of another rank's)
            raise NonFiniteWeights(self.step_count, name)

    def outputs_finite(self) -> bool:
        """Whether the trained model gives finite log-probabilities on the first forget row's scored tokens.

        Finite weights can still overflow in the forward pass (the tiny test Llama at --lr 1e30: weights
        ~1e30, logits nan), and a run whose last step made them so is otherwise written: no later loss
        is computed, and a greedy check of nan logits leaks nothing. One row's forward, once a run.
        """
        from unlearn.evaluate import labelled_logprobs

        scored = labelled_logprobs(self.forward_model, self.tokenizer, [through_first_run(self.forget[0])])[0]
        return not distributed.any_rank(not all(math.isfinite(lp) for lp in scored))


class _DeferredInterrupt:
    """While active, Ctrl-C sets a flag instead of raising, so the current step can finish and be saved.

    So do SIGTERM and SIGHUP where the command turns them into an unwinding (`cli._sigterm_unwinds`: not under
    torchrun, not where ignored): what `timeout`, a cancelled CI job or a lost ssh session sends a script's run,
    which lost all its training to them while a Ctrl-C kept it (review 117). A second signal acts at once
    (KeyboardInterrupt, or cli's `Terminated`). Only the main thread can own signals; elsewhere this does nothing.
    Nor does it where the caller ignores SIGINT: a shell without job control starts its background jobs so, to
    keep a Ctrl-C at the terminal from reaching them. Python leaves it ignored, so the rest of the run did not
    stop on it, while the training did; now neither does, as SIGHUP stays ignored under nohup.
    """

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGINT  # the signal that asked
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                handler = signal.getsignal(sig)
                # SIGINT unless ignored; the others only where the command catches them (a Python handler)
                if handler is not signal.SIG_IGN and (sig == signal.SIGINT or callable(handler)):
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.previous[signum](signum, frame)  # the command's own handler: it unwinds at once
        self.requested, self.signum = True, signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def train(unlearner: Unlearner, forgotten=None, log=None, *, save_every: int = 0, checkpoint=None,
          resume: dict | None = None, after_step=None) -> TrainResult:
    """Run steps until FORGOTTEN() says the forget set is forgotten, or max_steps.

    FORGOTTEN is a callable returning (done: bool, leak_rate: float), the rate a lower bound
    when not done (run.stop_rule's check ends at its verdict); it is asked every
    `check_every` steps (never when check_every is 0). With --stop-margin, its optional
    `leaked_answers()` lists the leaking rows of the check just made (run.stop_rule), which
    join the forget rows (`Unlearner.add_leaked_answers`). CHECKPOINT(loop_state) saves the
    unlearner and the loop state every SAVE_EVERY steps (and on Ctrl-C, after which
    StopRequested is raised); RESUME is a loop state saved that way, to continue from. AFTER_STEP(step), when
    given, is called after each step's update and returns a line to log or None (run.py: other work on the
    cores, cpu_load.CrowdWatch).
    """
    from tqdm import tqdm

    config = unlearner.config
    resume = resume or {}
    history = list(resume.get("history", []))
    stopped_by = resume.get("stopped_by", "max_steps")
    stop_at = resume.get("stop_at", config.max_steps)
    previous_seconds = resume.get("seconds", 0.0)
    start = time.perf_counter()
    check_seconds = resume.get("check_seconds", 0.0)
    previous_checks = check_seconds
    phase = repair.Repair.from_state(resume.get("repair"))  # the repair phase, once it has begun (repair.py)
    # consecutive checks where the margin held and the greedy answer leaked (HINT_AFTER_CHECKS); in the loop's
    # state, so that a resumed run gives its hint at the same step
    held_leaks = int(resume.get("held_leaks", 0))
    # the step the stop rule fired at, where --extra-steps follow it (None before, or with a repair phase)
    forgotten_at = resume.get("forgotten_at")
    unlearner.keep_terms_only = repair.next_step_keeps_only(phase)

    def loop_state() -> dict:
        return {"history": history, "stopped_by": stopped_by, "stop_at": stop_at,
                "seconds": previous_seconds + time.perf_counter() - start - (check_seconds - previous_checks),
                "check_seconds": check_seconds, "repair": phase.state() if phase else None, "held_leaks": held_leaks,
                "forgotten_at": forgotten_at}

    if log and unlearner.rmu is not None:
        log(unlearner.rmu.describe())
    # On a terminal only (disable=None): redrawn into a log file, the bar made one line of every state.
    bar = tqdm(total=config.max_steps, initial=unlearner.step_count, desc="unlearning", unit="step",
               file=sys.stderr, leave=False, disable=True if log is None else None)
    if log is not None and not bar.disable:  # a line said while the bar is drawn goes above it, not after it
        plain_log = log

        def log(message: str) -> None:
            bar.clear()
            plain_log(message)
            bar.refresh()
    with _DeferredInterrupt() as interrupt:
        try:
            while unlearner.step_count < stop_at:
                record = unlearner.step()
                history.append(record)
                said = after_step(unlearner.step_count) if after_step is not None else None
                if said and log:
                    log(said)
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k not in ("step", "lr")})
                due = config.check_every and unlearner.step_count % config.check_every == 0
                repairing = phase is not None and not phase.finished
                if forgotten is not None and due and (stopped_by == "max_steps" or repairing):
                    step = unlearner.step_count
                    t = time.perf_counter()
                    # --stop-margin first: forwards over the forget rows (the last likeliest row alone first),
                    # where the greedy check generates; while an answer is likelier than the margin the run
                    # is not done anyway.
                    likeliest, exact = (unlearner.likeliest_forget_answer(above=config.stop_margin)
                                        if config.stop_margin else (None, True))
                    if likeliest is not None and not math.isfinite(likeliest):  # a nan forward: a broken model
                        raise NonFiniteLoss(step, "likeliest forget answer's probability", likeliest)
                    if not margin_holds(likeliest, config.stop_margin):
                        done, leak, held_leaks = False, None, 0
                        # dual ascent on the margin's constraint: the forget term weighs more until it holds
                        unlearner.forget_scale = min(unlearner.forget_scale * 2, MAX_FORGET_SCALE)
                    else:
                        try:
                            done, leak = forgotten()
                        except NonFiniteLogits:  # the update made the forward overflow: this step's fault
                            raise NonFiniteLoss(step, "stop rule check's greedy logit", math.nan) from None
                        if (not done and likeliest is None and config.leak_growth != 1
                                and leak is not None and leak > config.stop_leak):
                            # --leak-growth: the margin reads no row (passages, long responses), the leak stands in
                            unlearner.forget_scale = min(unlearner.forget_scale * config.leak_growth, MAX_FORGET_SCALE)
                            record["forget_scale"] = unlearner.forget_scale  # the next step's multiplier
                        leaked = getattr(forgotten, "leaked_answers", None)
                        if not done and config.leaked_rows and leaked is not None:  # (validate: with a margin)
                            # the margin held, the greedy answer did not: its own path joins the forget rows
                            for row in unlearner.add_leaked_answers(leaked(), step):
                                if log:
                                    log(f"step {step}: the margin held but the greedy answer to {row['prompt']!r} "
                                        f"leaks (\"...{row['response'][-40:]}\"); it joins the forget rows")
                        held_leaks = held_leaks + 1 if likeliest is not None and not done else 0
                        if held_leaks == HINT_AFTER_CHECKS and not config.leaked_rows and leaked is not None:
                            for row in leaked()[:1]:  # asked on every rank (under torchrun, a broadcast)
                                if log:
                                    log(f"step {step}: the margin has held for {held_leaks} checks while the greedy "
                                        f"answer to {row['prompt']!r} leaks (\"...{row['response'][-40:]}\"): the "
                                        f"model reaches the answer by words the forget rows do not spell, and the run "
                                        f"may go on to --max-steps; "
                                        f"{'' if config.forget_loss == 'spellings' else SPELLINGS_HINT}{LEAKED_ROWS_HINT}")
                    check_seconds += time.perf_counter() - t
                    record["forget_leak"] = leak
                    if likeliest is not None:
                        record["forget_answer_p"] = likeliest  # a lower bound when the check stopped at its verdict
                        record["forget_scale"] = unlearner.forget_scale  # the next step's multiplier
                        if log:
                            log(f"step {step}: the likeliest forget answer has p {'=' if exact else '≥'} {likeliest:.3f} "
                                f"(a stop condition: --stop-margin {config.stop_margin:g})"
                                + ('' if leak is not None else f"; not generated; forget weight ×{unlearner.forget_scale:g}"))
                    note = ""
                    # the forget prompts alone: the margin held and the greedy check found at most --stop-leak
                    # (DONE may still be False while --stop-probes waits for the probes)
                    clean = leak is not None and leak <= config.stop_leak
                    if repairing:
                        phase.checked(step, done, clean)
                        stopped_by = "forgotten" if done else "max_steps"  # what the last check found
                        stop_at = step if phase.finished else config.max_steps
                        note = f"; {phase.describe(step, config.stop_leak)}"
                    elif done:
                        stopped_by = "forgotten"
                        steps = repair.budget(config.repair_steps, step) if unlearner.has_keep_terms else 0
                        if steps:
                            phase = repair.Repair.start(step, steps)
                            stop_at = config.max_steps
                            note = (f"; repair: up to {steps} more steps train the keep terms alone while nothing "
                                    f"leaks (--repair-steps)")
                        else:
                            forgotten_at = step
                            stop_at = min(config.max_steps, step + config.extra_steps)
                            if stop_at - step < config.extra_steps:  # said, not silently cut
                                note = (f"; --max-steps {config.max_steps} leaves {stop_at - step} of the "
                                        f"{config.extra_steps} --extra-steps")
                            elif config.extra_steps:
                                note = f"; {config.extra_steps} --extra-steps follow"
                    unlearner.keep_terms_only = repair.next_step_keeps_only(phase)
                    if log and leak is not None:
                        # a check whose leak passed --stop-leak ended at its verdict: a lower bound (--leaked-rows
                        # checks answer every row)
                        cut = config.stop_leak < leak < 1 and not config.leaked_rows
                        scaled = (f"; forget weight ×{unlearner.forget_scale:.3g} (--leak-growth)"
                                  if likeliest is None and "forget_scale" in record else "")
                        log(f"step {step}: forget leak rate {'≥ ' if cut else ''}{leak:.2f}{scaled}{note}")
                    elif log and note:  # the margin failed, so no greedy check: the repair phase's next step still changed
                        log(f"step {step}: {note[2:]}")
                saved = None
                if checkpoint is not None and save_every and unlearner.step_count % save_every == 0:
                    saved = checkpoint(loop_state())
                if distributed.any_rank(interrupt.requested):  # all ranks stop at the same step
                    if checkpoint is not None and saved is None:
                        saved = checkpoint(loop_state())
                    raise StopRequested(unlearner.step_count, saved, interrupt.signum)
            if phase is not None and not phase.finished and not (history and "forget_leak" in history[-1]):
                # --max-steps cut the repair phase after a step no check saw: "forgotten" (the last check's
                # verdict) would speak for a model the stop rule never read
                stopped_by = "max_steps"
            if unlearner.forget and not unlearner.outputs_finite():  # what is about to be written
                raise NonFiniteLoss(unlearner.step_count, "trained model's log-probability of a forget answer",
                                    math.nan)
        finally:
            bar.close()
            unlearner.keep_terms_only = False
            if unlearner.reference_cache is not None:
                unlearner.reference_cache.release()
            if unlearner.frozen_casts is not None:
                unlearner.frozen_casts.release()
    seconds = previous_seconds + time.perf_counter() - start - (check_seconds - previous_checks)
    extra = ({"asked": config.extra_steps, "run": unlearner.step_count - forgotten_at}
             if forgotten_at is not None and config.extra_steps else None)
    return TrainResult(steps=unlearner.step_count, stopped_by=stopped_by, seconds=seconds,
                       tokens=unlearner.tokens, history=history, check_seconds=check_seconds,
                       repair=phase.state() if phase else None, added_forget_rows=list(unlearner.added_forget_rows),
                       loop=loop_state(), extra_steps=extra)

