"""nan and inf: refused as settings up front (exit 2), and a run whose weights or outputs become non-finite
stops with one line (exit 1) instead of writing a broken model as a success."""

import math
import re

import pytest
import torch

from unlearn.config import TrainConfig
from unlearn.errors import UsageError
from unlearn.lora import LoraSettings
from unlearn.train import NonFiniteLoss, NonFiniteWeights, first_non_finite, margin_holds, train

NON_FINITE = [math.nan, math.inf, -math.inf]

# Every float setting TrainConfig.validate checks, by flag, and what its message says.
TRAIN_FLOATS = {"lr": ("--lr", "must be positive and finite"),
                "npo_beta": ("--npo-beta", "must be positive and finite"),
                "forget_weight": ("--forget-weight", "must be a non-negative number"),
                "mismatch_weight": ("--mismatch-weight", "must be a non-negative number"),
                "normal_weight": ("--normal-weight", "must be a non-negative number"),
                "retain_weight": ("--retain-weight", "must be a non-negative number"),
                "max_grad_norm": ("--max-grad-norm", "must be a non-negative number"),
                "stop_leak": ("--stop-leak", "must be in [0, 1]"),
                "stop_probes": ("--stop-probes", "must be in [0, 1]"),
                "stop_margin": ("--stop-margin", "must be in [0, 1)"),
                "rmu_scale": ("--rmu-scale", "must be positive")}
LORA_FLOATS = {"alpha": ("--lora-alpha", "must be positive and finite"),
               "dropout": ("--lora-dropout", "must be in [0, 1)")}


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("field", list(TRAIN_FLOATS))
def test_every_float_training_setting_refuses_nan_and_inf(field, value):
    flag, rule = TRAIN_FLOATS[field]
    with pytest.raises(UsageError) as raised:
        TrainConfig(**{field: value}).validate()
    assert str(raised.value).startswith(f"{flag} {value}: {rule}") and "\n" not in str(raised.value)


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("field", list(LORA_FLOATS))
def test_every_float_lora_setting_refuses_nan_and_inf(field, value):
    flag, rule = LORA_FLOATS[field]
    with pytest.raises(UsageError, match=f"^{re.escape(f'{flag} {value}: {rule}')}$"):
        LoraSettings(**{field: value}).validate()


def test_large_finite_and_ordinary_values_still_pass():
    TrainConfig(lr=1e30, npo_beta=1e6).validate()  # huge but finite: a run's own checks catch what it does
    LoraSettings(alpha=1e6).validate()
    with pytest.raises(UsageError, match=r"^--lr 0: must be positive"):  # what test_bad_input reads still holds
        TrainConfig(lr=0).validate()


@pytest.mark.parametrize("args, message", [
    (["--lr", "inf"], "--lr inf: must be positive and finite"),
    (["--lr", "nan"], "--lr nan: must be positive and finite"),
    (["--method", "npo", "--npo-beta", "inf"], "--npo-beta inf: must be positive and finite"),
    (["--method", "npo", "--npo-beta", "nan"], "--npo-beta nan: must be positive and finite"),
    (["--lora-alpha", "nan"], "--lora-alpha nan: must be positive and finite"),
    (["--lora-alpha", "inf"], "--lora-alpha inf: must be positive and finite"),
])
def test_non_finite_flags_are_usage_errors_on_the_command_line(tmp_path, data, llama_dir, cli, args, message):
    forget, normal, _ = data
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "o", *args)
    assert result.code == 2, result.err
    assert result.err.strip().splitlines() == [f"unlearn: {message}"]
    assert not (tmp_path / "o").exists()


# --- the margin -------------------------------------------------------------------------------


def test_a_nan_margin_is_never_met():
    assert not margin_holds(math.nan, 0.05)
    assert not margin_holds(0.5, 0.05)
    assert margin_holds(0.04, 0.05) and margin_holds(0.05, 0.05)  # at the margin it holds, as before
    assert margin_holds(None, 0.05)  # no row focused on an answer: nothing to read


def test_the_likeliest_answer_is_nan_when_any_row_is(llama_dir, monkeypatch):
    from test_train import unlearner

    u = unlearner(llama_dir)
    monkeypatch.setattr(u, "_answer_probabilities", lambda rows: [0.01, math.nan, 0.02][:len(rows)])
    p, exact = u.likeliest_forget_answer()
    assert math.isnan(p) and exact  # not 0.02: max() alone passes over a nan


def test_a_nan_margin_stops_the_run_instead_of_counting_as_forgotten(llama_dir, monkeypatch):
    from test_train import unlearner

    u = unlearner(llama_dir, max_steps=3, check_every=1, stop_margin=0.05)
    monkeypatch.setattr(u, "likeliest_forget_answer", lambda above: (math.nan, True))
    with pytest.raises(NonFiniteLoss, match=r"^step 1: the likeliest forget answer's probability is nan$"):
        train(u, forgotten=lambda: pytest.fail("a nan margin counted as met"))


# --- the weights and outputs after an update ----------------------------------------------------


def test_first_non_finite_names_the_first_bad_tensor():
    ok = torch.zeros(3)
    assert first_non_finite({}) is None and first_non_finite({"a": ok, "b": ok}) is None
    assert first_non_finite({"a": ok, "b": torch.tensor([1.0, math.inf]), "c": torch.tensor([math.nan])}) == "b"
    assert first_non_finite({"a": torch.tensor([math.nan], dtype=torch.bfloat16)}) == "a"


def test_an_update_that_makes_a_weight_non_finite_stops_the_run(llama_dir):
    from test_train import unlearner

    u = unlearner(llama_dir)
    name, param = next(iter(u._named_params().items()))
    u.optimizer.step = lambda: param.data.view(-1)[0].fill_(math.inf)  # an update that overflowed
    with pytest.raises(NonFiniteWeights, match=rf"^step 1: the update made the trained weights non-finite "
                                               rf"\(nan or inf, first in {name}\)$") as raised:
        u.step()
    assert isinstance(raised.value, NonFiniteLoss)  # run.py's one-line path: no model written


def test_a_last_step_whose_outputs_are_nan_is_not_returned_as_a_result(llama_dir):
    from test_train import unlearner

    # lr 1e30: the one step's loss and weights are finite (~1e30), its forward pass overflows to nan
    u = unlearner(llama_dir, lr=1e30, max_steps=1, check_every=0)
    with pytest.raises(NonFiniteLoss, match=r"^step 1: the trained model's log-probability of a forget answer "
                                            r"is nan$"):
        train(u)
    assert all(torch.isfinite(p).all() for p in u.params)  # which the weights check alone would miss


# --- end to end -----------------------------------------------------------------------------------


@pytest.fixture
def data(tmp_path):
    from test_run_cli import FORGET, NORMAL, HELDOUT, write_jsonl

    return (write_jsonl(tmp_path / "forget.jsonl", FORGET), write_jsonl(tmp_path / "normal.jsonl", NORMAL),
            write_jsonl(tmp_path / "heldout.jsonl", HELDOUT))


@pytest.mark.parametrize("args, message", [
    # ga's margin reads the overflowing model first (it used to count nan as met: "forgotten", exit 0)
    ([], "step 1: the likeliest forget answer's probability is nan"),
    # no margin: the stop rule's greedy check meets the nan logits (it used to find no leak in them)
    (["--method", "npo", "--max-steps", "1"], "step 1: the stop rule check's greedy logit is nan"),
    # no check either, and the last step's model is the broken one: read before it is written
    (["--method", "npo", "--max-steps", "1", "--check-every", "0"],
     "step 1: the trained model's log-probability of a forget answer is nan"),
])
def test_a_run_that_breaks_the_model_exits_1_with_one_line_and_writes_no_model(tmp_path, data, llama_dir, cli,
                                                                                 args, message):
    forget, normal, _ = data
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--lr", "1e30", "--max-steps", "3",
                 "--max-new-tokens", "8", "--no-probes", *args)
    assert result.code == 1, result.err
    lines = result.err.replace("\r", "\n").strip().splitlines()
    assert [line for line in lines if line.startswith("unlearn:")] == [lines[-1]]
    assert lines[-1] == (f"unlearn: {message}; stopped without writing the model; no checkpoint was saved "
                         f"(see --save-every); try a lower --lr")
    assert "Traceback" not in result.err and "internal error" not in result.err
    assert not out.exists() or not any(out.iterdir())  # no model, adapter or run.json (with its nan)
    assert result.out == ""  # no report
