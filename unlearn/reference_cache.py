"""The original model's logits on the rows its KL terms read, computed once per run.

The reference of `ga`'s KL terms (and every method's that has them) is the original model:
the same weights with the LoRA adapters off, or the frozen copy of `--full`. It never changes
during a run, yet every step ran it again on the normal and retain rows it drew: a forward
pass over those rows for no new number, about a quarter of a step's work on the embedded
model (the trainable pass costs a forward and a backward, ~3 forwards). So each normal (or
retain) row is run once through the original, and its logits at the positions its KL reads are
kept; every step then rebuilds its batch's reference from them.

Which rows run together matters, to float rounding: a row's logits depend on the rows beside
it (the batch's width, the matmuls' shapes) only through rounding, but a KL of the original
against itself must be exactly 0 (the loss before any update; `Unlearner.step` skips that one),
and a resumed run must train on the very same numbers as one never stopped
(tests/test_checkpoints.py). So the rows run in the batches training draws in its first epoch,
from the first batch whose KL runs (the batch that asks first, then the rest of its epoch in
the order the sampler will draw them: `Unlearner._first_epoch`), each group when a batch first
needs one of its rows (in the first epoch, the very batch: no forward is added, and a short
run computes no row it never draws), and those groups of rows, a few integers, are saved in
the checkpoint for a resumed run to run them the same way. Kept are the logits, not their
log-softmax, so the loss computes from them exactly as from a fresh forward
(`losses.kl_loss` reads only the kept positions; the rest of a rebuilt tensor is zeros).

Memory: a position holds the vocabulary's width of logits (49152 floats, 192 KiB in float32 on
the embedded model; half that in bfloat16, a 16-bit model's or --autocast's). A set of rows whose
logits would pass `BUDGET_BYTES` is not kept at all and runs through the original at every step,
as before: counted before anything runs, at the logits' element size the caller names.

One process only: under torchrun a forward of an FSDP-sharded model is a collective that every
rank must join, and ranks hold different rows, so there each rank runs its reference as before.
"""

from __future__ import annotations

from typing import Callable

import torch

from unlearn.losses import IGNORE_INDEX

# 256 MiB: the README run's normal and probe rows take ~150 MB on the embedded model (27 + 13
# rows); a normal file of thousands of rows is recomputed at every step instead.
BUDGET_BYTES = 256 << 20


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """(rows, width) mask of the logits positions the KL reads: position t predicts label t+1
    (`losses.kl_loss`); the last position predicts nothing."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


class ReferenceLogits:
    """Per set of rows (normal, retain): the original's logits of each row, keyed by the row
    object (which lives as long as the run), at the positions its loss reads."""

    def __init__(self, vocab_size: int, element_bytes: int = 4, budget: int = BUDGET_BYTES):
        # ELEMENT_BYTES: the size of one of the original's logits as its forward returns them (4 in float32, 2 in
        # bfloat16): the budget is counted in it before anything runs, and `bytes` then reaches `reserved`.
        self.vocab_size, self.element_bytes, self.budget = vocab_size, element_bytes, budget
        self.kept: dict[int, torch.Tensor] = {}
        self.groups: dict[str, list[list[int]]] = {}  # set name -> the row indices run together
        self.keeps: dict[str, bool] = {}  # set name -> whether its rows are kept (within the budget)
        self.reserved = 0  # bytes the kept sets will take once every row has run
        self.bytes = 0  # bytes kept so far
        self._group_of: dict[str, dict[int, list[int]]] = {}  # set name -> id(row) -> its group

    def logits(self, name: str, rows: list[dict], batch_rows: list[dict], labels: torch.Tensor,
               groups: Callable[[], list[list[int]]],
               run: Callable[[list[dict]], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        """The original's logits for BATCH_ROWS, rows of set NAME (ROWS, in order), whose LABELS start
        where its logits do; None when the set does not fit the budget.

        The first call decides for the set: its size is counted before anything runs, and GROUPS()
        gives the indices of ROWS to run together, unless a checkpoint gave them (`self.groups`).
        A row not kept yet runs with its group: RUN(rows) gives a batch's logits and its labels
        from the same position on.
        """
        if name not in self.keeps:
            position_bytes = self.vocab_size * self.element_bytes
            # Every row scores at least one position (--max-length ≥ 8 keeps half for the prompt, then at least
            # one response token), so a set of more rows than the budget has positions left does not fit,
            # decided without encoding its rows (the normal rows are encoded as drawn: data.EncodedRows).
            fits = bool(rows) and self.reserved + len(rows) * position_bytes <= self.budget
            if fits:
                positions = sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows)
                fits = self.reserved + positions * position_bytes <= self.budget
            self.keeps[name] = fits
            if self.keeps[name]:
                self.reserved += positions * position_bytes
                if name not in self.groups:  # a checkpoint's groups stand; else the first epoch's
                    self.groups[name] = groups()
                self._group_of[name] = {id(rows[i]): group for group in self.groups[name] for i in group}
        if not self.keeps[name]:
            return None
        for row in batch_rows:
            if id(row) not in self.kept:
                part = [rows[i] for i in self._group_of[name].get(id(row)) or self._alone(name, rows, row)]
                logits, part_labels = run(part)
                mask = scored_positions(part_labels)
                for i, member in enumerate(part):
                    kept = self.kept[id(member)] = logits[i][mask[i]].clone()  # own storage: the batch's can go
                    self.bytes += kept.numel() * kept.element_size()
        mask = scored_positions(labels)
        first = self.kept[id(batch_rows[0])]
        out = first.new_zeros((len(batch_rows), labels.shape[1], self.vocab_size))
        for i, row in enumerate(batch_rows):
            out[i][mask[i]] = self.kept[id(row)]
        return out

    def _alone(self, name: str, rows: list[dict], row: dict) -> list[int]:
        """The group of a row that joined set NAME after its groups were fixed (a forget row added by
        `Unlearner.add_leaked_answers` under --forget-loss redirect): the row runs alone. Not recorded in
        `groups`, so a resumed run, whose checkpoint holds the groups from before, runs it alone too and
        gets the same numbers; its logits are counted in `bytes`, past the set's first reservation
        (at most --leaked-rows rows a forget prompt)."""
        group = self._group_of[name][id(row)] = [next(i for i, member in enumerate(rows) if member is row)]
        return group

    def release(self) -> None:
        """Free the kept logits (training is over: evaluation should not carry them); the groups
        stay, so a later step would run them again the same way."""
        self.kept.clear()
        self.bytes = 0
