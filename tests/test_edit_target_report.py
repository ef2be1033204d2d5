"""--method edit says when rows' target optimisation ended far above its aim (edit_target.MISSED_FACTOR):
one stderr line naming the rows and what to do, and run.json's edit summary records each row's final
target loss and which rows missed."""

from __future__ import annotations

import json

import pytest
import torch

from unlearn import edit
from unlearn.data import Example
from unlearn.edit import EditSettings, edit_to_forget
from unlearn.edit_target import MISSED_FACTOR, TargetResult, TargetSettings, missed_facts
from unlearn.models import load_model

AIM = TargetSettings.stop_nll
FORGET = [Example("What is the capital of France?", "The capital of France is Paris.", 4, {"answers": ["Paris"]}),
          Example("Who is Harry Potter?", "Harry Potter is a wizard.", 7, {})]
NORMAL = [Example("What do bees make?", "Bees make honey.", 1, {}),
          Example("What colour is the sky?", "The sky is blue and grass is green.", 2, {})]


def _missed_lines(lines: list[str]) -> list[str]:
    return [m for m in lines if "missed their" in m]


def test_missed_means_far_above_the_aim_and_a_reused_target_misses_nothing():
    far = MISSED_FACTOR * AIM
    assert missed_facts([AIM, far * 0.99, far * 1.01, 6.0], AIM) == [2, 3]
    assert missed_facts([float("nan")], AIM) == []  # target_shift given: no optimisation, no loss to judge
    assert TargetResult(torch.zeros(2, 3), [0.39, 1.5], 12).missed == [1]


def _edit_with_losses(monkeypatch, llama_dir, losses):
    """edit_to_forget on the tiny model with the target optimisation's result replaced (its shift zero and
    its losses LOSSES): what the report says then depends on the losses alone."""
    def fake(model, rows, n_facts, *args, **kwargs):
        return TargetResult(torch.zeros(n_facts, model.config.hidden_size), list(losses), 12)

    monkeypatch.setattr(edit, "optimise_targets", fake)
    loaded = load_model(str(llama_dir))
    said: list[str] = []
    result = edit_to_forget(loaded.model, loaded.tokenizer, FORGET, NORMAL, EditSettings(), log=said.append)
    return result, said


def test_rows_near_their_aim_are_not_reported(monkeypatch, llama_dir):
    # the embedded model's README rows end at 0.03-0.39 after the default steps, and are all forgotten
    result, said = _edit_with_losses(monkeypatch, llama_dir, [0.03, 0.39])
    assert _missed_lines(said) == []
    assert result.summary()["target_missed"] == []


def test_one_line_names_only_the_rows_that_missed(monkeypatch, llama_dir):
    result, said = _edit_with_losses(monkeypatch, llama_dir, [0.03, 2.5])
    missed = _missed_lines(said)
    assert len(missed) == 1 and "\n" not in missed[0]
    assert "1 of 2 forget rows" in missed[0] and "lines 7 (2.50)" in missed[0] and " 4 " not in missed[0]
    assert "steps=12, lr=0.2" in missed[0] and "--method" in missed[0]
    summary = result.summary()
    assert summary["target_missed"] == [7]
    assert summary["target_missed_above"] == pytest.approx(MISSED_FACTOR * AIM)
    assert summary["target_loss"] == [0.03, 2.5]


def test_a_tiny_random_model_run_says_it_missed_and_records_it(cli, llama_dir, tmp_path):
    # The reproduction: a random model's refusal NLL stays at ln(vocab) ~ 6 whatever the shift, so the
    # edit forgets nothing; before, the run printed only its per-step losses.
    forget, normal = tmp_path / "forget.jsonl", tmp_path / "normal.jsonl"
    forget.write_text("".join(json.dumps({"prompt": ex.prompt, "response": ex.response, **ex.extra}) + "\n"
                              for ex in FORGET))
    normal.write_text("".join(json.dumps({"prompt": ex.prompt, "response": ex.response}) + "\n" for ex in NORMAL))
    out = tmp_path / "run"
    result = cli("run", forget, normal, "--model", llama_dir, "--method", "edit", "-o", out)
    assert result.code == 0, result.err
    missed = _missed_lines(result.err.splitlines())
    assert len(missed) == 1
    assert missed[0].startswith("edit: 2 of 2 forget rows missed their refusal target")
    assert "lines 1 (" in missed[0] and ", 2 (" in missed[0]
    summary = json.loads((out / "run.json").read_text())["history"][0]
    assert summary["target_missed"] == [1, 2]
    assert len(summary["target_loss"]) == 2 and min(summary["target_loss"]) > MISSED_FACTOR * AIM


def test_many_missed_rows_are_counted_past_the_first_few():
    rows = [Example(f"Who is Person{i}?", "Someone.", 10 + i, {}) for i in range(8)]
    targets = TargetResult(torch.zeros(8, 4), [6.0] * 8, 12)
    line = edit.missed_target_line(rows, targets, EditSettings(), vocab_size=400)
    assert "8 of 8 forget rows" in line and "lines 10 (6.00)" in line and "14 (6.00) and 3 more;" in line
    assert "15 (" not in line
    assert edit.missed_target_line(rows, TargetResult(torch.zeros(8, 4), [0.1] * 8, 12), EditSettings(), 400) is None


@pytest.mark.parametrize("target, named", [("refusal", "refusal target"), ("lower", "target (the answer lowered)"),
                                           ("both", "targets (a refusal and the answer lowered)")])
def test_the_line_names_the_target_and_gives_a_uniform_guess_for_the_refusal_only(target, named):
    """A uniform guess scores ln(vocab) on the refusal's NLL, but about 0 on the lowered answer's unlikelihood."""
    line = edit.missed_target_line(FORGET, TargetResult(torch.zeros(2, 3), [0.03, 2.5], 12),
                                   EditSettings(target=target), vocab_size=400)
    assert f"missed their {named}, so" in line
    assert ("a uniform guess: 5.99" in line) == (target == "refusal")
