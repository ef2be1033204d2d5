"""reference_cache.py: the original's logits on normal and retain rows, computed once per run."""

import pytest
import torch

from unlearn.losses import IGNORE_INDEX
from unlearn.reference_cache import ReferenceLogits, scored_positions

VOCAB = 3


def batch_of(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
    return ids, labels


def fake_run(calls):
    """RUN(rows) of a model whose logit v at a position is 10 * that position's token + v."""
    def run(rows):
        calls.append(len(rows))
        ids, labels = batch_of(rows)
        return ids[..., None].float() * 10 + torch.arange(VOCAB).float(), labels
    return run


# prompt tokens, then response tokens (their labels); right-padded in a batch
A = {"input_ids": [1, 2, 3, 4], "labels": [IGNORE_INDEX, IGNORE_INDEX, 3, 4]}
B = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}
C = {"input_ids": [8, 9, 1, 2, 3], "labels": [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 2, 3]}


def test_scored_positions_are_those_that_predict_a_response_token():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4], [IGNORE_INDEX, 6, 7, IGNORE_INDEX]])
    assert scored_positions(labels).tolist() == [[False, True, True, False], [True, True, False, False]]


def test_a_row_runs_once_with_its_group_then_batches_are_rebuilt_from_it():
    calls = []
    cache = ReferenceLogits(VOCAB)
    rows = [A, B, C]
    ids, labels = batch_of([C, A])

    def ask(batch_rows, labels, start=0):
        return cache.logits("normal", rows, batch_rows, labels[:, start:], lambda: [[2, 0], [1]], fake_run(calls))

    got = ask([C, A], labels, 1)  # a batch scored from position 1 on: its group [C, A] runs
    assert calls == [2] and cache.groups == {"normal": [[2, 0], [1]]}
    assert cache.reserved == 6 * VOCAB * 4 and cache.bytes == 4 * VOCAB * 4  # 2 positions a row, float32
    # A's positions 1 and 2 (tokens 2 and 3) predict its response; C's 2 and 3
    assert got.shape == (2, 4, VOCAB)
    assert got[1, :2].tolist() == [[20, 21, 22], [30, 31, 32]]  # A at 1, 2 -> 0, 1
    assert got[0, 1:3].tolist() == [[10, 11, 12], [20, 21, 22]]  # C at 2, 3 -> 1, 2
    mask = scored_positions(labels[:, 1:])
    assert got[~mask].abs().sum() == 0  # the positions no loss reads are zeros
    fresh = ids[:, 1:, None].float() * 10 + torch.arange(VOCAB).float()
    assert torch.equal(got[mask], fresh[mask])  # where the KL reads: a fresh forward's numbers
    ask([A, B], batch_of([A, B])[1])  # B's group runs, A is read back
    ask([B, C], batch_of([B, C])[1])  # nothing runs
    assert calls == [2, 1] and cache.bytes == cache.reserved
    cache.release()  # training is over
    assert cache.bytes == 0 and not cache.kept
    ask([B], batch_of([B])[1])  # a later step runs B's group again, the same group
    assert calls == [2, 1, 1]


def test_a_set_beyond_the_budget_is_not_kept():
    calls = []
    cache = ReferenceLogits(VOCAB, budget=5 * VOCAB * 4)
    # 4 positions: kept; 4 more would pass 5: that set is never run through here, nor kept
    assert cache.logits("normal", [A, B], [A], batch_of([A])[1], lambda: [[0, 1]], fake_run(calls)) is not None
    assert cache.logits("retain", [C, A], [C], batch_of([C])[1], lambda: [[0, 1]], fake_run(calls)) is None
    assert calls == [2] and cache.keeps == {"normal": True, "retain": False}



def test_a_set_of_more_rows_than_the_budget_has_positions_is_refused_unread():
    """Every row scores at least one position, so 6 rows cannot fit 5 positions: decided from the count."""
    class Unread(list):
        def __getitem__(self, i):
            pytest.fail("a row was read")

        def __iter__(self):
            pytest.fail("the rows were read")

    cache = ReferenceLogits(VOCAB, budget=5 * VOCAB * 4)
    assert cache.logits("normal", Unread([A] * 6), [A], batch_of([A])[1], lambda: [[0]], fake_run([])) is None
    assert cache.keeps == {"normal": False} and cache.reserved == 0

def test_groups_given_by_a_checkpoint_are_the_ones_run():
    calls = []
    cache = ReferenceLogits(VOCAB)
    cache.groups = {"normal": [[1], [0, 2]]}
    cache.logits("normal", [A, B, C], [C], batch_of([C])[1], lambda: pytest.fail("groups asked for"), fake_run(calls))
    assert calls == [2]  # C's group from the checkpoint: A and C
