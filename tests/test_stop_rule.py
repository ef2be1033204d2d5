"""The stop rule: the probes' kept share (`measure.kept_rate`) and --stop-probes' wait (`run.stop_rule`)."""

from types import SimpleNamespace

import pytest

from unlearn import run
from unlearn.config import RunOptions, TrainConfig
from unlearn.data import Example
from unlearn.errors import UsageError
from unlearn.measure import EvalSet, kept_rate

from test_measure import _StreamingMeasurer as _Streaming


def _probes(n):
    return EvalSet("probes", "retain", [Example(f"What is the capital of country {i}?", None, i + 1,
                                                {"answers": ["Lyon"]}) for i in range(n)])


NOTHING = "I am not sure which city that would be, it is hard to say."


def test_kept_rate_counts_the_rows_whose_answer_still_appears_and_stops_at_its_verdict():
    streams = [NOTHING, "It is Lyon of course", NOTHING, "The city is Lyon and more"]
    full = _Streaming(streams)
    assert kept_rate(full, _probes(4)) == 0.5  # rows 1 and 3 say Lyon
    assert full.words == [14, 4, 14, 5]  # each stops once "Lyon" is followed by a word (it stays)
    half = _Streaming(streams)
    assert kept_rate(half, _probes(4), enough=0.5) == 0.5
    assert half.words == [6, 4, 6, 5]  # row 3 keeps it second, at word 5: the others stop at their next ask
    most = _Streaming(streams)
    assert kept_rate(most, _probes(4), enough=0.75) == 0.5  # 3 of 4 never reached: every row runs out
    assert most.words == [14, 4, 14, 5]
    assert kept_rate(_Streaming([]), EvalSet("probes", "retain", [])) == 0.0


def _job():
    notes = []  # run.Loaded.note: a line that says an option changes nothing, logged and kept for run.json
    return SimpleNamespace(model=None, tokenizer=None, probe_after=object(), notes=notes,
                           note=lambda line, log: (notes.append(line), log(line)))


def _rule(monkeypatch, leaks, kept, stop_probes, history=(), with_probes=True, repairing=False, fired=False):
    """run.stop_rule over scripted checks: LEAKS per step, KEPT per probe check; returns the
    step the run stops at, the probe checks made, and the log. REPAIRING: the checks go on after the rule
    fires, as a repair phase's do (the step returned is still the first that fired); FIRED: a resumed run's
    rule had fired before."""
    monkeypatch.setattr(run, "leak_rate", lambda checker, s, decided_above=None: leaks[state["step"] - 1])
    checks = []

    def fake_kept(checker, s, enough=None):
        checks.append(state["step"])
        return kept.pop(0)
    monkeypatch.setattr(run, "kept_rate", fake_kept)
    monkeypatch.setattr(run, "Measurer", lambda *a, **k: object())
    opts = SimpleNamespace(train=TrainConfig(stop_probes=stop_probes), gen_batch_size=8)
    state, logged = {"step": len(history)}, []
    probes = [_probes(3)] if with_probes else []
    forgotten = run.stop_rule(opts, _job(), EvalSet("forget", "forget", []), probes, lambda: state["step"],
                              history, logged.append, fired=fired)
    first = None
    while state["step"] < len(leaks):
        state["step"] += 1
        done, _ = forgotten()
        if done and first is None:
            first = state["step"]
            if not repairing:
                break
    return first, checks, logged


def test_stop_probes_waits_for_the_probes_once_forgotten(monkeypatch):
    # forgotten first at step 3; the probes keep 0.3, then 0.8 of their answers at the checks made when
    # the forget set does not leak (step 4 leaks again: no probe check there)
    step, checks, logged = _rule(monkeypatch, [0.5, 0.5, 0, 0.1, 0, 0], [0.3, 0.8], 0.75)
    assert step == 5 and checks == [3, 5]
    assert logged[-1].startswith("step 5: the probes keep ≥ 0.80 of their answers (a stop condition")


def test_stop_probes_waits_at_most_as_many_steps_again_as_forgetting_took(monkeypatch):
    # forgotten first at step 2: from step 4 on, the forget check alone decides
    step, checks, logged = _rule(monkeypatch, [0.5, 0, 0, 0, 0], [0.1, 0.2, 0.1], 0.75)
    assert step == 4 and checks == [2, 3]
    # ... and says so: it stopped on the forget check alone, with the probes below the share asked
    assert logged[-1] == ("step 4: the probes did not reach --stop-probes 0.75 by step 4 (twice the 2 steps "
                          "forgetting took; 0.20 at their last check): the forget check alone decides")
    # a resumed run takes the step first forgotten from its history: here 1, so step 2 decides alone
    history = [{"step": 1, "forget_leak": 0.0}]
    step, checks, logged = _rule(monkeypatch, [0.0, 0.0], [0.1], 0.75, history=history)
    assert step == 2 and checks == [] and logged[-1].endswith("by step 2 (twice the 1 step forgetting took): "
                                                              "the forget check alone decides")


def test_the_wait_is_said_to_run_out_only_where_the_probes_never_reached_the_share(monkeypatch):
    # the probes reach it at step 3 (forgotten first at 2), the rule fires, and a repair phase checks on
    step, checks, logged = _rule(monkeypatch, [0.5, 0, 0, 0, 0, 0], [0.1, 0.9], 0.75, repairing=True)
    assert step == 3 and not any("did not reach" in line for line in logged)
    # they never do: said once, at the step the forget check decided alone, not at each repair check after it
    step, checks, logged = _rule(monkeypatch, [0.5, 0, 0, 0, 0, 0], [0.1, 0.2], 0.75, repairing=True)
    assert step == 4 and sum("did not reach" in line for line in logged) == 1
    # a run resumed after its rule fired says nothing of the wait
    history = [{"step": 1, "forget_leak": 0.0}]
    step, checks, logged = _rule(monkeypatch, [0.0, 0.0, 0.0], [], 0.75, history=history, repairing=True, fired=True)
    assert step == 2 and logged == []


def test_without_stop_probes_or_probes_the_forget_check_decides(monkeypatch):
    assert _rule(monkeypatch, [0.5, 0, 0], [0.1], 0.0)[:2] == (2, [])
    step, checks, logged = _rule(monkeypatch, [0.5, 0, 0], [0.1], 0.75, with_probes=False)
    assert (step, checks) == (2, []) and logged[0].startswith("--stop-probes 0.75: no probe could be measured")


def test_stop_probes_must_be_a_share():
    with pytest.raises(UsageError, match="--stop-probes 1.5"):
        RunOptions(forget="f", normal="n", train=TrainConfig(stop_probes=1.5)).resolved()


def test_a_methods_own_forget_loss_margin_and_rate_fill_only_what_is_not_given(monkeypatch):
    from pathlib import Path

    from unlearn import config

    monkeypatch.setitem(config.PER_METHOD, "graddiff", {"forget_loss": "unlikelihood", "stop_margin": 0.1,
                                                        "lr": 3e-3})

    def resolved(method, **kw):
        opts = RunOptions(Path("f"), Path("n"), train=TrainConfig(method=method), **kw).resolved()
        assert (opts.forget_loss, opts.stop_margin) == (opts.train.forget_loss, opts.train.stop_margin)
        return opts.train.forget_loss, opts.train.stop_margin, opts.train.lr

    assert resolved("graddiff") == ("unlikelihood", 0.1, 3e-3)
    assert resolved("graddiff", forget_loss="ascent", stop_margin=0.0, lr=1e-4) == ("ascent", 0.0, 1e-4)
    assert resolved("graddiff", full=True)[2] == 1e-5  # --full's rate, not the method's LoRA rate
    assert resolved("npo") == ("ascent", 0.0, 1e-3)  # a method without its own: TrainConfig's


def test_the_margin_needs_answer_tokens_to_read():
    from pathlib import Path

    def margin(method="ga", forget_tokens="answers", **kw):
        train = TrainConfig(method=method, forget_tokens=forget_tokens)
        return RunOptions(Path("f"), Path("n"), train=train, **kw).resolved().train.stop_margin

    assert margin() == 0.05  # ga's own
    assert margin(forget_tokens="names") == 0.05
    # every response token pushed down: no answer tokens to read, so ga's margin is off, as run.json records
    assert margin(forget_tokens="response") == 0.0
    # given, it is refused at any value, 0 (off) too: it does nothing there (README: idle options are refused)
    for value in (0.0, 0.05):
        with pytest.raises(UsageError, match="--forget-tokens response pushes down every response token"):
            margin(forget_tokens="response", stop_margin=value)
        with pytest.raises(UsageError, match="--method ulmr learns whole responses"):
            margin("ulmr", stop_margin=value)


def test_leaked_answers_are_the_checks_leaking_rows_cut_after_their_answer(monkeypatch):
    checker = SimpleNamespace(drafts={}, deciders={})
    monkeypatch.setattr(run, "Measurer", lambda *a, **k: checker)
    forget = EvalSet("forget", "forget", [
        Example("Who discovered America in 1492?", "It was Christopher Columbus.", 1, {"answers": ["Columbus"]}),
        Example("Who wrote Hamlet?", "William Shakespeare wrote it.", 2, {"answers": ["Shakespeare"]}),
        Example("Tell me the opening.", "It was the best of times, it was the worst of times.", 3),
    ])

    def check(checker_, s, decided_above=None):  # rows 0 and 2 leak; a check's drafts end where they leaked
        checker.drafts["forget"] = ["The story of Christopher COLUMBUS, who sailed", "I cannot say.",
                                    "It was the best of times, it was the worst"]
        checker.deciders["forget"] = [0, 2]
        return 2 / 3
    monkeypatch.setattr(run, "leak_rate", check)
    opts = SimpleNamespace(train=TrainConfig(), gen_batch_size=8)
    forgotten = run.stop_rule(opts, _job(), forget, [], lambda: 1, (), lambda m: None)
    assert forgotten() == (False, 2 / 3)
    # row 2 has no answer (its leak is the ROUGE rule's): a whole passage is not the model's answer path
    assert forgotten.leaked_answers() == [{"prompt": "Who discovered America in 1492?",
                                           "response": "The story of Christopher COLUMBUS",
                                           "answers": ["Columbus"]}]


def test_the_first_check_drafts_from_the_originals_answers_as_generated(monkeypatch):
    """OPENINGS give each forget row the original's answer and, where generation kept them, its token ids:
    the ids draft while the text is the draft (a stripped continuation tokenises otherwise)."""
    checker = SimpleNamespace(drafts={}, draft_ids={}, deciders={})
    monkeypatch.setattr(run, "Measurer", lambda *a, **k: checker)
    forget = EvalSet("forget", "forget", [Example(f"q{i}", "a", i + 1) for i in range(3)])
    opts = SimpleNamespace(train=TrainConfig(), gen_batch_size=8)
    run.stop_rule(opts, _job(), forget, [], lambda: 1, (), lambda m: None,
                  openings=[("was built", [13, 14]), ("", None), ("It is", None)])
    assert checker.drafts["forget"] == ["was built", "", "It is"]
    assert checker.draft_ids["forget"] == [("was built", [13, 14]), None, None]
    empty = SimpleNamespace(drafts={}, draft_ids={}, deciders={})
    monkeypatch.setattr(run, "Measurer", lambda *a, **k: empty)
    run.stop_rule(opts, _job(), forget, [], lambda: 1, (), lambda m: None, openings=[("", None)] * 3)
    assert empty.drafts == {} and empty.draft_ids == {}  # no answer of the original's: no drafts


# --- the note when the table's longer answers leak what the stop rule's checks did not read -------------------


@pytest.mark.parametrize("stopped_by, leak, check_every, max_new_tokens, alpha, said", [
    ("forgotten", 1.0, 1, 48, None, True),  # forgotten by 32-token checks, leaking at 48 tokens: said
    ("forgotten", 0.0, 1, 48, None, False),  # the table agrees
    ("max_steps", 1.0, 1, 48, None, False),  # the run does not claim forgotten: the table says it all
    ("forgotten", 1.0, 0, 48, None, False),  # no checks
    ("forgotten", 1.0, 1, 32, None, False),  # the table's budget is the checks'
    ("forgotten", 1.0, 1, 48, 0.5, False),  # the table reads the averaged model, which no check read
    ("forgotten", 1.0, 1, 48, 0.0, True),  # averaged at α 0 (--alpha 0, or auto's choice): the trained model
])
def test_a_forgotten_run_whose_longer_answers_leak_says_so(stopped_by, leak, check_every, max_new_tokens, alpha,
                                                           said):
    from types import SimpleNamespace

    from unlearn.config import TrainConfig
    from unlearn.run import Measurement, check_budget_note

    opts = SimpleNamespace(train=TrainConfig(check_every=check_every), max_new_tokens=max_new_tokens)
    # the summary's key as measure.py writes it (`leak_rate`; test_run_cli reads it from a real run too)
    after = Measurement({"forget": SimpleNamespace(summary={"leak_rate": leak, "n": 1})}, 0.0)
    note = check_budget_note(opts, SimpleNamespace(stopped_by=stopped_by), after, alpha)
    assert (note is not None) == said
    if said:
        assert note.startswith("unlearn: the stop rule read the forget answers' first 32 tokens") and "(1.00)" in note
        assert "--max-new-tokens 32" in note and "\n" not in note
