"""Locate, then edit: forget facts by a MEMIT-style weight edit instead of a fine-tune.

`edit_to_forget` changes the model's weights in place:

1. Subject. Each forget row's subject is its `subject` field, else the
   capitalised-words heuristic, else causal tracing (`edit_subject`).
2. Target. One residual-stream shift per fact, at the subject's last token after
   the last edited layer, optimised so that the prompt is answered with the refusal
   (and/or the old answer made unlikely) while probes about the subject keep their
   original distributions (`edit_target`).
3. Keys. The input of each edited layer's MLP output projection at the subject's
   last token, averaged over the wordings (`edit_rows`).
4. Update. Layer by layer, lowest first (MEMIT): the residual still missing at the
   last edited layer is split evenly over the layers not yet edited, and each layer
   gets the least-squares update that writes its share for the fact keys while
   keeping its outputs for the preserved keys: the normal rows' tokens (mean second
   moment times `normal_weight`), neighbour prompts (the forget prompt with another
   subject, each key weighted `neighbour_weight`) and same-subject prompts (each
   key weighted `same_subject_weight`) (`edit_solve`).

The result holds each layer's update as low-rank factors (D = U V^T, rank <= number
of facts), ready to be saved as a LoRA adapter with scaling 1 (B = U, A = V^T).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from unlearn.data import Example
from unlearn.edit_layers import capture_mlp_inputs, capture_residual, check_layers, default_layers, mlp_out_modules
from unlearn.edit_rows import (keep_row, neighbour_prompts, probe_prompt, refusal_rows, subjects_of, text_ids,
                               unlikely_rows, with_prefix)
from unlearn.edit_solve import LowRankDelta, SecondMoment, least_squares_update
from unlearn.edit_subject import Located, locate_subject, subject_last_token
from unlearn.edit_target import MISSED_FACTOR, TargetResult, TargetSettings, optimise_targets
from unlearn.errors import UsageError

TARGETS = ("refusal", "lower", "both")
MISSED_SHOWN = 5  # rows named in the missed-target line; the rest counted


@dataclass
class EditSettings:
    layers: list[int] | None = None  # None: `edit_layers.default_layers` (SmolLM2-135M: 5-8)
    subject: str = "auto"  # auto (heuristic, then trace), heuristic, trace; a row's `subject` field wins
    target: str = "refusal"  # refusal, lower (the old answer made unlikely) or both
    refusal: str = "I'm not sure."
    prefixes: tuple[str, ...] = ("", "Quick question: ")
    probes: tuple[str, ...] = ("{subject} is a", "Tell me about {subject}.")
    probe_tokens: int = 8  # original continuation of each probe kept under the KL
    normal_weight: float = 1e4  # weight of the normal text's mean key second moment
    neighbour_weight: float = 1.0  # weight of each neighbour key (1 = as strong as one edited key)
    neighbours_per_fact: int = 4
    neighbour_tokens: str = "all"  # all: every token of the neighbour prompts; subject: their subject token only
    same_subject_weight: float = 0.0  # weight of each same-subject (probe / normal row) key
    ridge: float = 1.0  # times the mean diagonal of the normal second moment (see docs/edit.md)
    steps: int = 12
    lr: float = 0.2  # Adam step on the target shift, ~ this share of the residual's norm at the subject
    kl_weight: float = 1.0
    unlikely_weight: float = 1.0
    decay: float = 0.05
    clamp: float = 4.0
    batch_size: int = 16  # rows per forward when reading keys and covariances
    seed: int = 0

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise UsageError(f"edit target {self.target!r}: expected one of {', '.join(TARGETS)}")
        if self.subject not in ("auto", "heuristic", "trace"):
            raise UsageError(f"edit subject {self.subject!r}: expected auto, heuristic or trace")
        if min(self.normal_weight, self.neighbour_weight, self.same_subject_weight) < 0 or self.ridge <= 0:
            raise UsageError("edit weights must be >= 0 and the ridge > 0")
        if self.neighbour_tokens not in ("subject", "all"):
            raise UsageError(f"edit neighbour_tokens {self.neighbour_tokens!r}: expected subject or all")
        if self.steps < 1 or not self.prefixes:
            raise UsageError("edit needs at least one target step and one prefix")


@dataclass
class EditResult:
    deltas: dict[str, LowRankDelta]  # qualified module name -> its update, D = U V^T
    layers: list[int]
    subjects: list[Located]
    target_loss: list[float]  # per fact: refusal NLL per token (target "lower": unlikelihood) at the end
    target_steps: int
    neighbours: list[str]  # the neighbour prompts whose keys were preserved
    target_shift: torch.Tensor  # (facts, hidden): the residual shift each fact's subject was to get
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    target_missed: list[int] = field(default_factory=list)  # forget lines whose target loss stayed far above its aim
    target_missed_above: float | None = None  # the loss above which a row missed (edit_target.MISSED_FACTOR x aim)
    settings: dict = field(default_factory=dict)  # the EditSettings that made it, its layers resolved (run.json)

    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module name -> (lora_A (r x in), lora_B (out x r)) with scaling 1: W' = W + B A."""
        return {name: (d.v.T.contiguous(), d.u.contiguous()) for name, d in self.deltas.items()}

    def summary(self) -> dict:
        return {"layers": self.layers, "subjects": [asdict(s) for s in self.subjects],
                "target_loss": self.target_loss, "target_steps": self.target_steps,
                "target_missed": self.target_missed, "target_missed_above": self.target_missed_above,
                "neighbours": self.neighbours, "timings": self.timings, "settings": self.settings,
                "rank": {name: d.rank for name, d in self.deltas.items()}}


def missed_target_line(forget: list[Example], targets: TargetResult, settings: EditSettings,
                       vocab_size: int) -> str | None:
    """One line naming the rows whose target optimisation ended far from its aim (`edit_target.MISSED_FACTOR`),
    and what can be done; None when every row got there (or no optimisation ran). For the refusal target a
    uniform guess's loss, ln(vocab), is shown beside it: a row near it is one the model barely moved toward
    (tiny random models).

    Why: the edit writes whatever shift the optimisation reached, and a row whose refusal stayed unlikely may
    keep its answer; the run said nothing of it (on a tiny random model nothing was forgotten, silently)."""
    missed = targets.missed
    if not missed:
        return None
    named = ", ".join(f"{forget[i].line} ({targets.loss_per_fact[i]:.2f})" for i in missed[:MISSED_SHOWN])
    more = f" and {len(missed) - MISSED_SHOWN} more" if len(missed) > MISSED_SHOWN else ""
    # ln(vocab) is what a uniform guess scores on the refusal's NLL; the lowered answer's unlikelihood (`lower`,
    # and half of `both`) is near 0 for any model that does not already say it, so no such reference is given there
    guess = f"; a uniform guess: {math.log(vocab_size):.2f}" if settings.target == "refusal" else ""
    target = {"refusal": "refusal target", "lower": "target (the answer lowered)"}.get(
        settings.target, "targets (a refusal and the answer lowered)")
    return (f"edit: {len(missed)} of {len(forget)} forget rows missed their {target}, so the edit may "
            f"not forget them: loss per token still above {MISSED_FACTOR * targets.aim:g} ({MISSED_FACTOR:g}x "
            f"the aim {targets.aim:g}{guess}) at lines {named}{more}; give the "
            f"target more steps or a larger rate (EditSettings steps={settings.steps}, lr={settings.lr:g} in the "
            f"Python API, docs/edit.md; `unlearn run` has no option for them) or use another --method")


def _batched(model, sequences: list[list[int]], batch_size: int, pad_id: int, layers: list[int], residual: int | None):
    """Yield (row index, MLP inputs {layer: (seq, inter)}, residual (seq, hidden) or None) per sequence."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        with torch.no_grad(), capture_mlp_inputs(model, layers) as keys:
            if residual is None:
                model(input_ids=ids, attention_mask=mask)
                res = None
            else:
                with capture_residual(model, residual) as res:
                    model(input_ids=ids, attention_mask=mask)
        for row, seq in enumerate(chunk):
            # OPT flattens (batch, seq) before its MLP: restore the shape.
            yield start + row, {l: keys[l].reshape(len(chunk), width, -1)[row, :len(seq)] for l in layers}, (res["h"][row, :len(seq)] if res else None)


def _keys_at(model, sequences, positions, groups, n_groups, layers, residual, settings, pad_id):
    """Mean over each group's sequences of the MLP inputs (and residual) at the given positions."""
    keys = {l: torch.zeros((n_groups, 0)) for l in layers}
    sums: dict[int, torch.Tensor] = {}
    res_sum = None
    counts = torch.zeros(n_groups)
    for i, mlp_in, res in _batched(model, sequences, settings.batch_size, pad_id, layers, residual):
        g = groups[i]
        for l in layers:
            sums.setdefault(l, torch.zeros((n_groups, mlp_in[l].shape[-1])))[g] += mlp_in[l][positions[i]].float()
        if res is not None:
            res_sum = res_sum if res_sum is not None else torch.zeros((n_groups, res.shape[-1]))
            res_sum[g] += res[positions[i]].float()
        counts[g] += 1
    keys = {l: sums[l] / counts[:, None] for l in layers}
    return keys, (res_sum / counts[:, None] if res_sum is not None else None)


def edit_to_forget(model, tokenizer, forget: list[Example], normal: list[Example], settings: EditSettings | None = None,
                   log=None, target_shift: torch.Tensor | None = None,
                   neighbour_subjects: list[list[str]] | None = None) -> EditResult:
    """Edit MODEL in place so that the FORGET facts are refused (see module doc).

    TARGET_SHIFT: the `target_shift` of an earlier result on the same rows with the same target
    settings and last layer, to skip the target optimisation (ablations of the preservation
    terms, or of the lower layers, share it).
    NEIGHBOUR_SUBJECTS: per forget row, the subjects its neighbour prompts put in place of its own
    (`unlearn run` gives the automatic probes' replacements: probes.py); None: the subjects the
    heuristic finds in the NORMAL prompts, the same list for every row.
    """
    settings = settings or EditSettings()
    settings.validate()
    say = log or (lambda _m: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    model.eval()  # no dropout in any pass: keys, targets and covariances are deterministic
    modules = mlp_out_modules(model)
    layers = check_layers(model, settings.layers if settings.layers is not None else default_layers(len(modules)))
    top = layers[-1]
    pad_id = tokenizer.pad_token_id

    subjects = [locate_subject(model, tokenizer, ex, settings.subject, settings.seed) for ex in forget]
    for ex, found in zip(forget, subjects):
        say(f"edit subject (line {ex.line}, {found.source}): {found.subject!r}")
    timings["subjects"] = time.perf_counter() - clock

    # Target rows: every wording of each fact, and the keep rows about its subject.
    clock = time.perf_counter()
    rows = []
    for i, (ex, found) in enumerate(zip(forget, subjects) if target_shift is None else ()):
        if settings.target in ("refusal", "both"):
            rows += refusal_rows(tokenizer, ex.prompt, found.subject, i, settings.refusal, settings.prefixes)
        if settings.target in ("lower", "both"):
            rows += unlikely_rows(tokenizer, ex.prompt, ex.response, ex.extra.get("answers"), found.subject, i,
                                  settings.prefixes)
        for template in settings.probes:
            rows.append(keep_row(model, tokenizer, probe_prompt(template, found.subject), found.subject, i,
                                 settings.probe_tokens, 1.0))
    # The fact keys' wordings, and the original residual at the last edited layer there.
    fact_seqs, fact_pos, fact_group = [], [], []
    for i, (ex, found) in enumerate(zip(forget, subjects)):
        for prefix in settings.prefixes:
            ids, pos = subject_last_token(tokenizer, with_prefix(ex.prompt, prefix), found.subject, after=len(prefix))
            fact_seqs.append(ids), fact_pos.append(pos), fact_group.append(i)
    n = len(forget)
    _, original_z = _keys_at(model, fact_seqs, fact_pos, fact_group, n, layers, top, settings, pad_id)
    if target_shift is not None:
        if tuple(target_shift.shape) != tuple(original_z.shape):
            raise UsageError(f"target_shift has shape {tuple(target_shift.shape)}, expected {tuple(original_z.shape)}")
        targets = TargetResult(target_shift, [float("nan")] * n, 0)
    else:
        targets = optimise_targets(
            model, rows, n, top, original_z.norm(dim=-1), pad_id,
            TargetSettings(settings.steps, settings.lr,
                           settings.unlikely_weight if settings.target != "refusal" else 0.0,
                           settings.kl_weight, settings.decay, settings.clamp),
            seed=settings.seed, log=log)
    target_z = original_z + targets.deltas
    timings["targets"] = time.perf_counter() - clock
    warning = missed_target_line(forget, targets, settings, model.get_output_embeddings().weight.shape[0])
    if warning:
        say(warning)

    # Preserved keys: normal text (every token), neighbours and same-subject prompts (the subject's token).
    clock = time.perf_counter()
    normal_moment = {l: SecondMoment(modules[l][1].in_features) for l in layers}
    normal_seqs = [text_ids(tokenizer, ex.prompt, ex.response) for ex in normal]
    for _, mlp_in, _ in _batched(model, normal_seqs, settings.batch_size, pad_id, layers, None):
        for l in layers:
            normal_moment[l].add(mlp_in[l])
    others = subjects_of([ex.prompt for ex in normal])
    forget_subjects = {s.subject for s in subjects}
    others = [s for s in others if s not in forget_subjects]
    protected: list[tuple[str, str, float]] = []  # (prompt, subject, weight per key)
    neighbours = []
    if settings.neighbour_weight > 0:
        for i, (ex, found) in enumerate(zip(forget, subjects)):
            mine = others if neighbour_subjects is None else neighbour_subjects[i]
            for prompt, subject in neighbour_prompts(ex.prompt, found.subject, mine, settings.neighbours_per_fact):
                protected.append((prompt, subject, settings.neighbour_weight))
                neighbours.append(prompt)
    if settings.same_subject_weight > 0:
        for found in subjects:
            same = [probe_prompt(t, found.subject) for t in settings.probes]
            same += [ex.prompt for ex in normal if found.subject in str(ex.prompt)]
            protected += [(p, found.subject, settings.same_subject_weight) for p in same]
    preserve = {l: settings.normal_weight * normal_moment[l].mean() for l in layers}
    if protected:
        seqs, pos = zip(*(subject_last_token(tokenizer, p, s) for p, s, _ in protected))
        weights = torch.tensor([w for _, _, w in protected], dtype=torch.float64)
        keys, _ = _keys_at(model, list(seqs), list(pos), list(range(len(seqs))), len(seqs), layers, None, settings,
                           pad_id)
        for l in layers:
            k = keys[l].double()
            preserve[l] = preserve[l] + (k.T * weights) @ k
    if settings.neighbour_tokens == "all" and neighbours:
        # Every token of each neighbour prompt, not only its subject: the refusal can also reach a
        # neighbour through the relation's tokens ("capital of").
        seqs = [text_ids(tokenizer, p, None) for p in neighbours]
        for _, mlp_in, _ in _batched(model, seqs, settings.batch_size, pad_id, layers, None):
            for l in layers:
                k = mlp_in[l].double()
                preserve[l] = preserve[l] + settings.neighbour_weight * k.T @ k
    ridge = {l: settings.ridge * float(normal_moment[l].mean().diagonal().mean()) if normal_moment[l].count else
             settings.ridge for l in layers}
    timings["preserved_keys"] = time.perf_counter() - clock

    # MEMIT's layer loop: lowest layer first, each taking an even share of what is still missing.
    clock = time.perf_counter()
    deltas: dict[str, LowRankDelta] = {}
    for index, layer in enumerate(layers):
        keys, current_z = _keys_at(model, fact_seqs, fact_pos, fact_group, n, layers, top, settings, pad_id)
        residual = (target_z - current_z) / (len(layers) - index)
        name, linear = modules[layer]
        delta = least_squares_update(keys[layer].T, residual.T, preserve[layer], ridge[layer])
        with torch.no_grad():
            linear.weight += delta.matrix().to(linear.weight.dtype)
        deltas[name] = delta
        say(f"edit layer {layer}: residual norm {residual.norm(dim=-1).mean():.2f}, "
            f"update norm {delta.matrix().norm():.3f}")
    timings["update"] = time.perf_counter() - clock
    return EditResult(deltas, layers, subjects, targets.loss_per_fact, targets.steps, neighbours, targets.deltas,
                      timings, [forget[i].line for i in targets.missed], MISSED_FACTOR * targets.aim,
                      {**asdict(settings), "layers": layers})
