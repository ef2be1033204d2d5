"""--leak-growth X: with --stop-margin, where the margin reads no forget row (a passage, a long response), each
greedy check that finds a leak multiplies the forget term's weight by X (train.train); its refusals and its note."""

import json

import pytest

from unlearn.config import TrainConfig
from unlearn.errors import UsageError
from unlearn.train import MAX_FORGET_SCALE, train

from test_run_cli import write_jsonl
from test_train import _scripted_checks, unlearner

ROOT2 = 2 ** 0.5


def train_with(u, verdicts, lines):
    return train(u, forgotten=_scripted_checks(verdicts, None), log=lines.append)


def test_each_leaking_check_multiplies_the_forget_weight_where_the_margin_reads_no_row(llama_dir, monkeypatch):
    u = unlearner(llama_dir, max_steps=10, check_every=1, stop_margin=0.05, leak_growth=ROOT2)
    monkeypatch.setattr(u, "likeliest_forget_answer", lambda above: (None, True))  # no row narrowed to an answer
    before = u.forget_weight
    lines = []
    # the third check is clean but not done (--stop-probes waiting for the probes): no leak, no growth
    result = train_with(u, [(False, 0.5), (False, 0.5), (False, 0.0), (True, 0.0)], lines)
    assert result.steps == 4 and u.forget_scale == pytest.approx(2.0)  # √2 twice; the clean checks add none
    assert u.forget_weight == pytest.approx(2 * before)
    assert [r.get("forget_scale") for r in result.history] == [pytest.approx(ROOT2), pytest.approx(2.0), None, None]
    assert lines[:3] == ["step 1: forget leak rate ≥ 0.50; forget weight ×1.41 (--leak-growth)",
                         "step 2: forget leak rate ≥ 0.50; forget weight ×2 (--leak-growth)",
                         "step 3: forget leak rate 0.00"]  # (its probes' line is stop_rule's, not the loop's)
    # the margin's cap holds
    u = unlearner(llama_dir, max_steps=10, check_every=1, stop_margin=0.05, leak_growth=1e6)
    monkeypatch.setattr(u, "likeliest_forget_answer", lambda above: (None, True))
    train_with(u, [(False, 0.5), (False, 0.5), (True, 0.0)], [])
    assert u.forget_scale == MAX_FORGET_SCALE


@pytest.mark.parametrize("growth, margin", [
    (1.0, None),  # off, the default
    (ROOT2, 0.01),  # the margin reads a row and holds: the greedy leak is its own rule's (held_leaks), no growth
])
def test_the_weight_stays_where_it_does_not_apply(llama_dir, monkeypatch, growth, margin):
    u = unlearner(llama_dir, max_steps=10, check_every=1, stop_margin=0.05, leak_growth=growth)
    monkeypatch.setattr(u, "likeliest_forget_answer", lambda above: (margin, True))
    lines = []
    result = train_with(u, [(False, 0.5), (True, 0.0)], lines)
    assert result.steps == 2 and u.forget_scale == 1.0
    assert all(r.get("forget_scale", 1.0) == 1.0 for r in result.history)
    assert not any("--leak-growth" in line for line in lines)


@pytest.mark.parametrize("fields, message", [
    ({"leak_growth": 0.5, "stop_margin": 0.05}, "--leak-growth 0.5: must be a finite number, 1 (off) or more"),
    ({"leak_growth": float("nan"), "stop_margin": 0.05}, "--leak-growth nan: must be a finite number, 1 (off) or more"),
    ({"leak_growth": float("inf"), "stop_margin": 0.05}, "--leak-growth inf: must be a finite number, 1 (off) or more"),
    ({"leak_growth": 2.0}, "--leak-growth 2 grows the forget weight as --stop-margin's failed checks do, where the "
                           "margin reads no row; it needs a margin above 0"),
])
def test_bad_values_are_refused(fields, message):
    with pytest.raises(UsageError) as refused:
        TrainConfig(**fields).validate()
    assert str(refused.value) == message
    TrainConfig(leak_growth=1.41, stop_margin=0.05).validate()


def test_a_run_whose_forget_rows_have_answers_says_it_changes_nothing(cli, llama_dir, tmp_path):
    forget = write_jsonl(tmp_path / "forget.jsonl", [
        {"prompt": "What is the capital of France?", "response": "The capital is Paris.", "answers": ["Paris"]}])
    normal = write_jsonl(tmp_path / "normal.jsonl", [{"prompt": f"Q{i}?", "response": f"A{i}."} for i in range(4)])
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--max-steps", "1", "--max-new-tokens", "4",
                 "--no-probes", "--leak-growth", "1.41")
    assert result.code == 0, result.err
    assert ("--leak-growth 1.41: the margin reads the answers of 1 of the 1 forget rows, so it changes nothing in "
            "this run (it acts only where no row has one)" in result.err)
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["leak_growth"] == 1.41
    assert record["notes"] == ["--leak-growth 1.41: the margin reads the answers of 1 of the 1 forget rows, so it "
                               "changes nothing in this run (it acts only where no row has one)"]
    # one row with an answer beside a passage: the margin reads that row, so no check ever grows the weight
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "What is the capital of France?", "response": "The capital is Paris.", "answers": ["Paris"]},
        {"text": "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age"}])
    result = cli("run", mixed, normal, "--model", llama_dir, "-o", tmp_path / "o3", "--max-steps", "1",
                 "--max-new-tokens", "4", "--no-probes", "--leak-growth", "2")
    assert result.code == 0, result.err
    assert "--leak-growth 2: the margin reads the answers of 1 of the 2 forget rows, so it changes nothing" in result.err
    refused = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "o2", "--stop-margin", "0",
                  "--leak-growth", "2")
    assert refused.code == 2 and "it needs a margin above 0" in refused.err
    assert not (tmp_path / "o2").exists()
    refused = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "o5", "--method", "edit",
                  "--leak-growth", "2")
    assert refused.code == 2 and refused.err.strip().splitlines() == [
        "unlearn: --method edit is one least-squares edit, not a training run: it takes no --leak-growth"]
    # where no margin can be had, the refusal names the option to drop, not the margin it would need
    for flags, trains in ((["--method", "ulmr"], "--method ulmr learns whole responses"),
                          (["--forget-tokens", "response"], "--forget-tokens response pushes down every response")):
        refused = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "o4", *flags, "--leak-growth", "2")
        assert refused.code == 2 and refused.err.strip().splitlines() == [
            f"unlearn: --leak-growth 2 grows the weight as --stop-margin's failed checks do, and {trains} "
            + ("(its rows' likelihood)" if "ulmr" in trains else "token")
            + ", which takes no margin: drop --leak-growth"]
