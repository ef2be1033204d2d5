"""Options that another option makes do nothing, or turns into something else: refused, or given their place."""

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
