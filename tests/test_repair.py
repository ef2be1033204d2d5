"""repair.py and the repair phase of train.train: steps of the keep terms alone while nothing leaks."""

import pytest
import torch

from test_train import lora_state, unlearner
from unlearn import repair
from unlearn.config import RunOptions, TrainConfig
from unlearn.errors import UsageError
from unlearn.train import train


def verdicts(*leaks):
    """A stop rule whose checks find these leak rates, in order (0 is "nothing leaks")."""
    it = iter(leaks)

    def forgotten():
        leak = next(it)
        return leak == 0, leak
    return forgotten


def test_auto_budget_is_the_steps_forgetting_took_at_most_the_cap():
    assert repair.budget(None, 3) == 3 and repair.budget(None, repair.AUTO_CAP + 25) == repair.AUTO_CAP
    assert repair.budget(5, 2) == 5 and repair.budget(0, 7) == 0


def test_the_phase_follows_the_last_check_and_ends_at_a_check_without_leak():
    phase = repair.Repair.start(2, 2)  # forgotten after step 2: a check from step 4 on may end the run
    assert (phase.end, phase.keep_terms_only, phase.finished) == (4, True, False)
    phase.checked(3, True)
    assert phase.keep_terms_only and not phase.finished  # before the end: go on, keep terms alone
    phase.checked(4, False)
    assert not phase.keep_terms_only and not phase.finished  # a leak at the end: the whole loss until none
    phase.checked(5, True)
    assert phase.finished
    waiting = repair.Repair.start(2, 2)
    waiting.checked(4, False, clean=True)  # nothing leaks, --stop-probes not met yet: keep terms, not the end
    assert waiting.keep_terms_only and not waiting.finished
    assert repair.Repair.from_state(phase.state()) == phase and repair.Repair.from_state(None) is None


def test_repair_steps_train_the_keep_terms_alone_while_nothing_leaks(llama_dir):
    u = unlearner(llama_dir, max_steps=20, check_every=1, repair_steps=2)
    lines = []
    # step 1 leaks; step 2 forgotten (phase until step 4); 3 clean; 4 leaks; 5 clean: the end
    result = train(u, forgotten=verdicts(0.5, 0.0, 0.0, 0.25, 0.0), log=lines.append)
    assert result.steps == 5 and result.stopped_by == "forgotten"
    flags = [bool(r.get("keep_terms_only")) for r in result.history]
    assert flags == [False, False, True, True, False]  # steps 3-4 follow clean checks, step 5 a leak
    for r in result.history:
        assert ("forget" in r) != r.get("keep_terms_only", False)  # a repair step has no forget term
        assert "kl" in r or r["step"] == 1  # (step 1's KL is 0 by construction and not run)
    assert result.repair == {"first_forgotten": 2, "end": 4, "keep_terms_only": True, "finished": True}
    assert "step 2: forget leak rate 0.00; repair: up to 2 more steps" in "\n".join(lines)
    assert [line.split("; ", 1)[1] for line in lines if line.startswith(("step 3:", "step 4:", "step 5:"))] == [
        "next step trains the keep terms alone (nothing leaks); repair until step 4",
        "next step trains the whole loss again (a leak, or the margin failed); repair over, stopping at the first "
        "check where the stop rule holds",
        "repair over: stop"]
    assert not u.keep_terms_only  # off again once training is over


def test_probes_not_yet_kept_are_no_leak_in_the_repair_phase(llama_dir):
    """--stop-probes makes a check not done while its forget prompts leak nothing: the repair phase then goes
    on with the keep terms alone (the ascent again would push on what damaged the probes), and the log says
    the exact leak, not a lower bound."""
    u = unlearner(llama_dir, max_steps=20, check_every=1, repair_steps=2)
    checks = iter([(False, 0.5), (True, 0.0), (False, 0.0), (False, 0.0), (True, 0.0)])
    lines = []
    result = train(u, forgotten=lambda: next(checks), log=lines.append)
    assert result.steps == 5 and result.stopped_by == "forgotten"
    assert [bool(r.get("keep_terms_only")) for r in result.history] == [False, False, True, True, True]
    assert all("forget" not in r for r in result.history[2:])  # before: steps 4 and 5 trained the ascent again
    assert "step 3: forget leak rate 0.00; next step trains the keep terms alone (nothing leaks)" in "\n".join(lines)
    assert "≥ 0.00" not in "\n".join(lines)


def test_the_repair_log_names_stop_leak_when_it_allows_a_leak():
    phase = repair.Repair.start(2, 2)
    assert phase.describe(2, 0.5) == "next step trains the keep terms alone (leak at most --stop-leak 0.5); " \
                                     "repair until step 4"
    phase.checked(3, False)
    assert phase.describe(3, 0.5).startswith("next step trains the whole loss again (a leak past --stop-leak 0.5")


def test_a_repair_step_moves_the_weights_by_the_keep_terms_only(llama_dir):
    """A repair step's update is the one the same step makes with the forget weight at 0: the forget rows
    are drawn (the data order stays the run's) but add nothing."""
    import copy

    u = unlearner(llama_dir, max_steps=5)
    for _ in range(2):  # two ordinary steps, so the model has drifted and the KL is not 0
        u.step()
    saved = copy.deepcopy(u.state_dict())
    u.keep_terms_only = True
    repaired = u.step()
    after_repair = lora_state(u.model)
    u.load_state_dict(copy.deepcopy(saved))
    u.keep_terms_only, u.config.forget_weight = False, 0.0
    plain = u.step()
    assert repaired["keep_terms_only"] and "forget" not in repaired and "forget" in plain
    assert repaired["kl"] == pytest.approx(plain["kl"], rel=1e-6) and repaired["kl"] > 0
    for (a_A, a_B), (b_A, b_B) in zip(after_repair.values(), lora_state(u.model).values()):
        assert torch.allclose(a_A, b_A, atol=1e-7) and torch.allclose(a_B, b_B, atol=1e-7)


def test_a_run_that_leaks_at_max_steps_says_so(llama_dir):
    u = unlearner(llama_dir, max_steps=4, check_every=1, repair_steps=1)
    result = train(u, forgotten=verdicts(0.0, 0.2, 0.2, 0.2))
    assert result.steps == 4 and result.stopped_by == "max_steps"  # the last check still found a leak
    assert result.repair["first_forgotten"] == 1 and not result.repair["finished"]


def test_no_repair_without_keep_terms(llama_dir):
    u = unlearner(llama_dir, max_steps=10, check_every=1, repair_steps=3, normal_weight=0.0)
    result = train(u, forgotten=verdicts(0.0))
    assert result.steps == 1 and result.repair is None and not u.has_keep_terms


@pytest.mark.parametrize("steps", ["3", "auto"])
def test_a_repair_with_nothing_to_keep_is_said_and_kept_in_run_json(cli, tmp_path, llama_dir, steps):
    # the --repair-steps the user gave is not dropped without a word: auto was, and a number only in a log line
    # at the step the stop rule fired (review 111)
    import json

    from test_run_cli import FORGET, NORMAL, write_jsonl

    forget, normal = write_jsonl(tmp_path / "f.jsonl", FORGET), write_jsonl(tmp_path / "n.jsonl", NORMAL)
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", "--max-steps", "1",
                 "--max-new-tokens", "2", "--eval-limit", "1", "--normal-weight", "0", "--no-probes",
                 "--repair-steps", steps)
    assert result.code == 0, result.err
    line = (f"--repair-steps {steps}: nothing to keep (--normal-weight 0, no retain rows or probes trained on), so a "
            f"repair has no terms to train; it changes nothing in this run")
    assert line in result.err.splitlines()
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert line in record["notes"]
    assert record["config"]["repair_steps"] == (3 if steps == "3" else "auto")  # auto was written null ("not set")


def test_a_run_resumed_in_its_repair_phase_ends_as_one_never_stopped(tmp_path, llama_dir):
    from unlearn.checkpoints import load_checkpoint, save_checkpoint

    leaks = (0.5, 0.0, 0.0, 0.25, 0.0, 0.0)
    straight = unlearner(llama_dir, max_steps=20, check_every=1, repair_steps=3)
    whole = train(straight, forgotten=verdicts(*leaks))
    assert whole.steps == 5 and whole.repair["finished"]
    first = unlearner(llama_dir, max_steps=20, check_every=1, repair_steps=3)
    saved = []
    with pytest.raises(_Stop):
        train(first, forgotten=verdicts(*leaks), save_every=3,
              checkpoint=lambda loop: saved.append(save_checkpoint(tmp_path, first, loop, {})) or _stop())
    second = unlearner(llama_dir, max_steps=20, check_every=1, repair_steps=3)
    loop = load_checkpoint(saved[0], second)
    assert loop["repair"] == {"first_forgotten": 2, "end": 5, "keep_terms_only": True, "finished": False}
    rest = train(second, forgotten=verdicts(*leaks[3:]), resume=loop)
    assert rest.steps == whole.steps and [r.get("keep_terms_only") for r in rest.history] == [
        r.get("keep_terms_only") for r in whole.history]
    assert all(torch.equal(a, b) for a, b in zip(straight.params, second.params))


class _Stop(Exception):
    pass


def _stop():
    raise _Stop


def test_run_options_repair_by_default_for_the_repair_methods_only(tmp_path, monkeypatch):
    from unlearn import config

    def resolved(**kw):
        method = kw.pop("method", "ga")
        return RunOptions(tmp_path / "f.jsonl", tmp_path / "n.jsonl", train=TrainConfig(method=method),
                          **kw).resolved().train.repair_steps

    monkeypatch.setattr(config, "REPAIR_METHODS", ("ga",))
    assert resolved() is None  # auto
    assert resolved(method="npo") == 0 and resolved(method="ulmr") == 0
    assert resolved(method="npo", repair_steps="auto") is None and resolved(repair_steps="3") == 3
    assert resolved(repair_steps="0") == 0
    assert resolved(extra_steps=2) == 0  # --extra-steps alone takes the repair's place
    with pytest.raises(UsageError, match="give one"):
        resolved(extra_steps=2, repair_steps="auto")
    with pytest.raises(UsageError, match="expected auto or a number"):
        resolved(repair_steps="some")
    with pytest.raises(UsageError, match="0 or more"):
        resolved(repair_steps="-1")
    with pytest.raises(UsageError, match="--repair-steps"):
        resolved(method="edit", repair_steps="2")
