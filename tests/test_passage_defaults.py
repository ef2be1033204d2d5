"""The defaults for a forget set of passages under ga (config.PASSAGE_LEAK_SCALE, PASSAGE_METHODS): what the
options resolve to, what the run says, and the training loop's growth of the forget weight at each leaking check."""

from pathlib import Path

import pytest

from unlearn.config import PASSAGE_LEAK_SCALE, RunOptions, TrainConfig
from unlearn.data import Example, Passage

from test_train import _scripted_checks, unlearner

TWO_CITIES = Example(Passage("It was the best of times,"), " it was the worst of times, it was the age of wisdom", 1)
MOBY = Example(Passage("Call me Ishmael. Some years ago,"), " never mind how long precisely, having little money", 2)
FACT = Example("What is the capital of Australia?", "The capital of Australia is Canberra.", 3)


def resolved(rows, **kw):
    return RunOptions(Path("f"), Path("n"), **kw).for_forget_rows(rows).resolved()


def test_passages_under_ga_grow_the_forget_weight_and_repair_by_default():
    opts = resolved([TWO_CITIES, MOBY], auto_method=True)
    assert PASSAGE_LEAK_SCALE == pytest.approx(2 ** 0.5)
    assert (opts.passage_rows, opts.train.method, opts.train.leak_scale, opts.train.repair_steps,
            opts.train.stop_margin) == (True, "ga", PASSAGE_LEAK_SCALE, None, 0.05)  # repair None: auto
    assert opts.notes == ("every forget row is a passage: each check that finds one leaking multiplies the forget "
                          "weight by 1.41 and the repair phase runs (--repair-steps auto)",)
    # --method ga given: the same defaults (they belong to the rows, not to an untold method)
    given = resolved([TWO_CITIES, MOBY], train=TrainConfig(method="ga"))
    assert given.train == opts.train and given.notes == opts.notes


@pytest.mark.parametrize("kw, leak_scale, repair, said", [
    ({"repair_steps": "3"}, PASSAGE_LEAK_SCALE, 3, "each check that finds one leaking multiplies the forget weight "
                                                   "by 1.41"),
    ({"repair_steps": "0"}, PASSAGE_LEAK_SCALE, 0, "each check that finds one leaking multiplies the forget weight "
                                                   "by 1.41"),
    ({"extra_steps": 2}, PASSAGE_LEAK_SCALE, 0, "each check that finds one leaking multiplies the forget weight "
                                                "by 1.41"),  # --extra-steps takes the repair's place, as for any method
    ({"stop_margin": 0.0}, PASSAGE_LEAK_SCALE, None, "the repair phase runs (--repair-steps auto)"),
])
def test_what_the_user_gives_keeps_its_own_meaning(kw, leak_scale, repair, said):
    opts = resolved([TWO_CITIES, MOBY], auto_method=True, **kw)
    assert (opts.train.leak_scale, opts.train.repair_steps) == (leak_scale, repair)
    assert opts.notes == (f"every forget row is a passage: {said}",)


def test_other_methods_and_mixed_sets_keep_their_defaults():
    npo = resolved([TWO_CITIES, MOBY], train=TrainConfig(method="npo"))
    assert (npo.passage_rows, npo.train.leak_scale, npo.train.repair_steps, npo.notes) == (True, 1.0, 0, ())
    mixed = resolved([TWO_CITIES, FACT], auto_method=True)
    assert (mixed.passage_rows, mixed.train.leak_scale, mixed.train.repair_steps, mixed.notes) == (False, 1.0, 0, ())
    assert resolved([FACT], auto_method=True).train.leak_scale == 1.0


def _no_margin_row(u, monkeypatch):
    monkeypatch.setattr(u, "likeliest_forget_answer", lambda above: (None, True))  # no row narrowed to an answer


def test_each_leaking_check_multiplies_the_forget_weight_where_the_margin_reads_no_row(llama_dir, monkeypatch):
    u = unlearner(llama_dir, max_steps=10, check_every=1, stop_margin=0.05, leak_scale=PASSAGE_LEAK_SCALE)
    _no_margin_row(u, monkeypatch)
    lines = []
    result = train_with(u, [(False, 0.5), (False, 0.5), (True, 0.0)], lines)
    assert result.steps == 3 and u.forget_scale == pytest.approx(2.0)  # √2 twice; the clean check adds none
    assert [r.get("forget_scale") for r in result.history] == [pytest.approx(2 ** 0.5), pytest.approx(2.0), None]
    assert lines[:3] == ["step 1: forget leak rate ≥ 0.50; forget weight ×1.41",
                         "step 2: forget leak rate ≥ 0.50; forget weight ×2", "step 3: forget leak rate 0.00"]


@pytest.mark.parametrize("overrides, margin", [
    ({"leak_scale": 1.0}, None),  # off: not a passage set
    ({"leak_scale": PASSAGE_LEAK_SCALE, "stop_margin": 0.0}, None),  # no margin: no dual ascent at all
    ({"leak_scale": PASSAGE_LEAK_SCALE}, 0.01),  # the margin reads a row and holds: its own rule, no growth
])
def test_the_weight_stays_where_the_rule_does_not_apply(llama_dir, monkeypatch, overrides, margin):
    u = unlearner(llama_dir, max_steps=10, check_every=1, **{"stop_margin": 0.05, **overrides})
    monkeypatch.setattr(u, "likeliest_forget_answer", lambda above: (margin, True))
    result = train_with(u, [(False, 0.5), (True, 0.0)], [])
    assert result.steps == 2 and u.forget_scale == 1.0
    assert all("forget_scale" not in r or r["forget_scale"] == 1.0 for r in result.history)


def train_with(u, verdicts, lines):
    from unlearn.train import train

    return train(u, forgotten=_scripted_checks(verdicts, None), log=lines.append)


def test_the_forget_term_weighs_the_grown_scale(llama_dir):
    u = unlearner(llama_dir, stop_margin=0.05, leak_scale=PASSAGE_LEAK_SCALE)
    batch = {"forget": [u.forget[0]]}
    before = u.loss(batch)[0].item()
    u.forget_scale = 2.0
    assert u.loss(batch)[0].item() == pytest.approx(2 * before, rel=1e-5)  # the forget term alone, doubled
