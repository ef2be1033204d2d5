"""Options that another option makes do nothing, or turns into something else: refused, or given their place."""

import re
from pathlib import Path

import pytest

from unlearn.config import RunOptions, TrainConfig
from unlearn.errors import UsageError


def resolved(method="ga", **kw):
    return RunOptions(Path("f"), Path("n"), train=TrainConfig(method=method, **kw.pop("train", {})), **kw).resolved()


@pytest.mark.parametrize("loss", ["redirect", "spellings"])
def test_an_answer_position_loss_with_every_response_token_is_refused(loss):
    # a row scored whole takes unlikelihood: run.json recorded the loss asked for, which did nothing
    with pytest.raises(UsageError, match=rf"^--forget-loss {loss} acts where the answer is, and --forget-tokens "
                                         r"response scores every response token"):
        resolved(forget_loss=loss, train={"forget_tokens": "response"})
    assert resolved(forget_loss="unlikelihood", train={"forget_tokens": "response"}).train.forget_loss == "unlikelihood"


def test_an_explicit_repair_takes_the_place_of_ulmrs_extra_steps():
    # it was refused as "both --repair-steps and --extra-steps", though only --repair-steps was given
    opts = resolved("ulmr", repair_steps="2")
    assert opts.train.repair_steps == 2 and opts.train.extra_steps == 0
    assert resolved("ulmr").train.extra_steps == 4 and resolved("ulmr", repair_steps="0").train.extra_steps == 4
    assert resolved("ulmr", repair_steps="00").train.extra_steps == 4  # off, however written
    assert resolved("ulmr", repair_steps="auto").train.extra_steps == 0
    with pytest.raises(UsageError, match="--repair-steps and --extra-steps both go on"):
        resolved("ulmr", repair_steps="2", extra_steps=3)


def test_the_retain_kl_at_weight_0_trains_no_probe():
    # (review 111) the probes were labelled trained, said to "join the retain rows" and written "trained": true
    # in probes.jsonl, though a term of weight 0 is never drawn
    assert resolved(retain_weight=0.0).retain_probes is False and resolved().retain_probes is True
    assert resolved(retain_weight=0.0, train={"protect": True}).retain_probes is True  # --protect reads them
    with pytest.raises(UsageError, match=r"^--retain-probes trains on the probes through the retain KL, which "
                                         r"--retain-weight 0 turns off: drop one of them$"):
        resolved(retain_weight=0.0, retain_probes=True)
    for protect in (False, True):  # 0 times any multiplier
        with pytest.raises(UsageError, match=r"^--retain-follows-margin multiplies the retain KL's weight, which "
                                             r"--retain-weight 0 makes 0"):
            resolved(retain_weight=0.0, train={"retain_follows_margin": True, "protect": protect})
    with pytest.raises(UsageError, match=r"this run trains on no probes \(--retain-weight 0\): drop --no-anchors"):
        resolved(retain_weight=0.0, anchors=False)


@pytest.mark.parametrize("kw, message", [
    ({"probes": False, "retain_probes": False}, "--no-retain-probes says whether to train on the automatic probes, "
                                                "which --no-probes turns off"),
    ({"probes": False, "retain_probes": True}, "--retain-probes says whether to train on the automatic probes"),
    ({"probes": False, "train": {"stop_probes": 0.0}}, "--stop-probes waits for the automatic probes"),
    ({"method": "npo", "train": {"leak_growth": 1.0}}, "--leak-growth 1 grows the forget weight"),
    ({"train": {"leak_growth": 1.0, "forget_tokens": "response"}}, "--leak-growth 1 grows the weight as "
                                                                   "--stop-margin's failed checks do, and"),
    ({"method": "edit", "repair_steps": "0"}, "--method edit is one least-squares edit, not a training run: it takes no "
                                              "--alpha, --resume, --save-every, --repair-steps or --full"),
    ({"method": "edit", "train": {"retain_follows_margin": True}}, "--method edit is one least-squares edit, not a "
                                                                  "training run: it takes no --retain-follows-margin"),
])
def test_an_idle_option_is_refused_at_its_off_value_too(kw, message):
    # (review 111) each was accepted at the value that turns it off, though the README refuses an idle option at
    # any value; the edit's --retain-follows-margin was refused as "needs a margin"
    given = frozenset((set(kw) | set(kw.get("train", {}))) - {"train", "method"})  # as the command line gives them
    with pytest.raises(UsageError, match=re.escape(message)):
        resolved(given=given, **kw)


@pytest.mark.parametrize("flag", ["retain", "eval_forget", "eval_retain"])
def test_a_file_given_twice_to_one_option_is_refused(flag, tmp_path):
    # (review 111) the same --retain file was trained and measured twice without a word
    rows = tmp_path / "keep.jsonl"
    (tmp_path / "sub").mkdir()
    with pytest.raises(UsageError, match=rf"^--{flag.replace('_', '-')} {re.escape(str(tmp_path))}/sub/\.\./keep.jsonl: "
                                         r"given twice; give each file once$"):
        resolved(**{flag: (rows, tmp_path / "sub" / ".." / "keep.jsonl")})  # the same file, named otherwise
    assert resolved(**{flag: (rows, tmp_path / "other.jsonl")})
