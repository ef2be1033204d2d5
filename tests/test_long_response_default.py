"""The default for a forget set of long chat responses (config.LONG_RESPONSE_DEFAULT): which rows are
long (spans.is_long_response), what the options resolve to, and what a run without --method records."""

import json
from pathlib import Path

import pytest

from unlearn.config import LONG_RESPONSE_DEFAULT, RunOptions, TrainConfig
from unlearn.data import Example, Passage
from unlearn.spans import is_long_response

LOCK = Example("How do I pick a lock?",
               "First insert a tension wrench into the bottom of the keyhole, then rake the pins with a pick while "
               "turning gently until each pin sets and the plug rotates.", 1)
FAKE_ID = Example("How can I make a fake ID?",
                  "You will need a printer, laminating sheets and a photo editor to copy the hologram and the "
                  "layout of a real card.", 2)


@pytest.mark.parametrize("row, long", [
    (LOCK, True),
    (FAKE_ID, True),
    # the same response with the user's answers: judged by them, not long
    (Example(LOCK.prompt, LOCK.response, 3, {"answers": ["tension wrench"]}), False),
    # a short fact the rule derives an answer from ("Canberra")
    (Example("What is the capital of Australia?", "The capital of Australia is Canberra.", 4), False),
    # three plain new words: at the limit (MAX_PLAIN_NEW_TOKENS), so still spans
    (Example("What colour is the sky?", "The sky is bright clear blue.", 5), False),
    # nothing beyond the prompt's words: it restates, it is not long
    (Example("Is the sky blue?", "The sky is blue.", 6), False),
    # a passage is judged as a continuation
    (Example(Passage("It was the best of times, it was the worst of times,"),
             " it was the age of wisdom, it was the age of foolishness, it was the epoch of belief", 7), False),
    (Example("Say nothing.", None, 8), False),
])
def test_which_rows_are_long_chat_responses(row, long):
    assert is_long_response(row) is long


def resolved(rows, **kw):
    return RunOptions(Path("f"), Path("n"), **kw).for_forget_rows(rows).resolved()


def test_a_forget_set_of_long_responses_resolves_to_the_refusal_with_the_normal_kl_at_200():
    opts = resolved([LOCK, FAKE_ID], auto_method=True)
    assert LONG_RESPONSE_DEFAULT == {"method": "ga+template", "normal_weight": 200.0}
    # what `--method ga+template --normal-weight 200` resolves to, field for field
    given = RunOptions(Path("f"), Path("n"), train=TrainConfig(method="ga+template"), normal_weight=200.0).resolved()
    assert opts.train == given.train
    assert (opts.train.method, opts.train.normal_weight, opts.train.forget_loss, opts.train.stop_margin,
            opts.train.lr, opts.retain_probes) == ("ga+template", 200.0, "ascent", 0.0, 1e-3, False)
    assert "long chat response" in opts.method_reason


def test_only_an_untold_method_and_an_all_long_set_change_anything():
    ga = resolved([LOCK, FAKE_ID])  # --method given (auto_method False): ga stays ga
    assert (ga.train.method, ga.train.normal_weight, ga.method_reason) == ("ga", 10.0, None)
    mixed = resolved([LOCK, Example("What is the capital of Australia?", "Canberra is.", 2)], auto_method=True)
    assert (mixed.train.method, mixed.train.forget_loss, mixed.method_reason) == ("ga", "spellings", None)
    assert resolved([], auto_method=True).train.method == "ga"
    # a --normal-weight the user gives is kept
    assert resolved([LOCK], auto_method=True, normal_weight=20.0).train.normal_weight == 20.0


# --- through the command line, on the tiny Llama ------------------------------------------------

FAST = ["--max-steps", "2", "--check-every", "1", "--max-new-tokens", "6", "--batch-size", "2", "--lr", "1e-2"]


@pytest.fixture
def files(tmp_path):
    forget = tmp_path / "forget.jsonl"
    forget.write_text("".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n"
                              for r in (LOCK, FAKE_ID)))
    normal = tmp_path / "normal.jsonl"
    normal.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in [
        ("What is two plus two?", "Two plus two equals four."), ("What do bees make?", "Bees make honey."),
        ("What colour is the sky?", "The sky is blue."), ("Name a fruit.", "An apple.")]))
    return forget, normal


@pytest.mark.parametrize("method", [None, "ga"])
def test_a_run_without_method_on_long_responses_trains_the_refusal_and_says_why(tmp_path, files, llama_dir, cli,
                                                                               method):
    forget, normal = files
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, *FAST,
                 *(["--method", method] if method else []))
    assert result.code == 0, result.err
    record = json.loads((out / "run.json").read_text())
    if method is None:
        assert (record["method"], record["config"]["normal_weight"], record["config"]["mismatch_weight"]) == \
            ("ga+template", 200.0, 1.0)
        assert "long chat response" in record["method_reason"]
        # same-topic probes are made ("How do I find out more about a lock?") and measured, not trained on
        # (`retained` is None; --retain-probes trains on them)
        assert record["probes"]["sets"]["same subject"]["made"] == 2 and record["probes"]["retained"] is None
        assert "method: ga+template, because every forget row is a long chat response" in result.err
        assert "method: ga+template (every forget row is a long chat response" in result.out
    else:
        assert (record["method"], record["method_reason"], record["config"]["normal_weight"]) == ("ga", None, 10.0)
        # ga trains on its probes by default, these too (0 rows here: the tiny model's answers are empty)
        assert record["probes"]["sets"]["same subject"]["made"] == 2 and record["probes"]["retained"] == 0


def test_a_setting_the_chosen_method_cannot_take_says_which_method_and_why(tmp_path, files, llama_dir, cli):
    forget, normal = files
    # --leaked-rows needs ga's margin; the refusal has none
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "o", "--leaked-rows", "2")
    assert result.code == 2, result.err
    assert "--method ga+template (not given: every forget row is a long chat response" in result.err
    assert "--leaked-rows 2" in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# --- the note when the refusal refuses the benign same-topic probes (run.over_refusal_note) ----------------


def _note(method="ga+template", retain_probes=False, kept=0.25, n=4, markers=True, name="same subject"):
    from types import SimpleNamespace

    from unlearn.run import Measurement, over_refusal_note

    opts = SimpleNamespace(train=TrainConfig(method=method), retain_probes=retain_probes)
    # what make_probes records: the same-subject set, when topic probes (with refusal markers) were measured
    data = SimpleNamespace(probes={"topic_set": "same subject" if markers else None}, output=Path("runs/a"))
    after = Measurement({name: SimpleNamespace(summary={"accuracy": kept, "n": n})}, 0.0)
    return over_refusal_note(opts, data, after)


def test_the_refusal_that_refuses_most_topic_probes_says_so_and_what_trains_on_them():
    note = _note(kept=0.25, n=4)
    assert note.startswith("unlearn: the refusal also refuses benign questions") and "1 of 4" in note
    assert "--retain-probes" in note and "\n" not in note and "(runs/a/probes.jsonl)" in note
    assert "0 of 12" in _note(kept=0.0, n=12)


@pytest.mark.parametrize("change", [
    {"kept": 0.5},  # at OVER_REFUSAL_KEPT: half kept is not "most refused"
    {"retain_probes": True},  # already trained on them: the line is then no evidence
    {"method": "ga"},  # ascent: no refusal to spread
    {"markers": False},  # subject probes, not a request's topics
    {"name": "neighbours"},  # another probe set
])
def test_no_note_where_it_does_not_apply(change):
    assert _note(**change) is None


def test_a_run_records_its_topic_probes_and_says_when_the_refusal_takes_them(tmp_path, llama_dir, cli, monkeypatch):
    from unlearn.measure import Measurer

    answer_sets = Measurer.answer_sets

    def scripted(self, sets, *args, **kwargs):  # the original's answers to the probes; the tiny model names nothing
        if [s.name for s in sets] != ["probes"]:
            return answer_sets(self, sets, *args, **kwargs)
        return {"probes": ["A fake ID card is a forged document." for _ in sets[0].examples]}

    monkeypatch.setattr(Measurer, "answer_sets", scripted)
    forget = tmp_path / "forget.jsonl"
    forget.write_text(json.dumps({"prompt": "How do I make a fake ID card?", "response": FAKE_ID.response}) + "\n")
    normal = tmp_path / "normal.jsonl"
    normal.write_text(json.dumps({"prompt": "What do bees make?", "response": "Bees make honey."}) + "\n")
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--max-steps", "1", "--check-every", "0",
                 "--max-new-tokens", "8", "--batch-size", "1")
    assert result.code == 0, result.err
    record = json.loads((out / "run.json").read_text())
    assert record["method"] == "ga+template" and record["probes"]["topic_probes"] == 1
    assert record["before"]["same subject"]["accuracy"] == 1.0 and record["after"]["same subject"]["accuracy"] == 0.0
    assert f"0 of 1 same-subject probes kept ({out / 'probes.jsonl'})" in result.err


@pytest.mark.parametrize("weight, advice", [(50.0, "; --retain-probes trains on them"),
                                            (0.0, "; --retain-probes with a --retain-weight above 0 trains on them")])
def test_the_over_refusal_note_names_what_can_be_given(weight, advice):
    # (review 113) it named --retain-probes alone, which --retain-weight 0 now refuses beside it
    from pathlib import Path
    from types import SimpleNamespace

    from unlearn.run import over_refusal_note

    opts = SimpleNamespace(train=SimpleNamespace(method="ga+template", retain_weight=weight), retain_probes=False)
    data = SimpleNamespace(probes={"topic_set": "same subject"}, output=Path("out"))
    after = SimpleNamespace(sets={"same subject": SimpleNamespace(summary={"accuracy": 0.0, "n": 2})})
    note = over_refusal_note(opts, data, after)
    assert f"0 of 2 same-subject probes kept (out/probes.jsonl){advice} (on the quality" in note
