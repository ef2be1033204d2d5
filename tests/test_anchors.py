"""General-knowledge anchors (unlearn/anchors.py): how many a run adds, that they hold no forget answer, that they
are trained and never measured, and that no anchor is a row of the quality benchmark or examples/."""

import glob
import json
import re
from pathlib import Path

import pytest

from test_run_cli import write_jsonl  # (the suite's JSONL writer)
from unlearn import anchors, probes
from unlearn.data import Example, Passage

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-steps", "1", "--check-every", "0", "--max-new-tokens", "8", "--batch-size", "1"]


def chat(prompt, response="It is so.", **extra):
    return Example(prompt, response, 1, extra)


PASSAGE = Example(Passage("The Eiffel Tower is a wrought-iron lattice"), " tower in Paris, France.", 1)
LONG = chat("How do I pick a lock?", "To pick a lock you need a tension wrench and a pick. " * 6)


def test_rows_without_a_neighbour_probe_are_passages_and_chat_rows_naming_no_one():
    assert anchors.without_neighbours(chat("What is the largest land animal?"), None)
    assert not anchors.without_neighbours(chat("What is the capital of France?"), "France")
    assert anchors.without_neighbours(PASSAGE, "Eiffel Tower")  # a passage gets no neighbour, subject or not
    assert not anchors.without_neighbours(LONG, None)  # topic probes, and the refusal trains on none


def test_per_row_anchors_in_order_at_most_all():
    rows = [chat("What is the capital of France?"), chat("What is the largest land animal?"), PASSAGE]
    subjects = ["France", None, "Eiffel Tower"]
    assert anchors.PER_ROW == 4
    assert anchors.questions(rows, subjects) == [q for q, _ in anchors.ANCHORS[:8]]  # 2 rows x 4
    assert anchors.questions(rows[:1], subjects[:1]) == []  # every row has its neighbours: no anchor
    many = [chat(f"Which animal is number {i}?") for i in range(20)]
    assert anchors.questions(many, [None] * 20) == [q for q, _ in anchors.ANCHORS]  # 80 wanted, 43 there


def test_an_anchor_that_asks_a_forget_prompt_is_skipped():
    first = anchors.ANCHORS[0][0]
    rows = [chat("  " + first.replace(" ", "\n "))]  # the same prompt, by prompt_key
    assert anchors.questions(rows, [None]) == [q for q, _ in anchors.ANCHORS[1:5]]


def test_build_appends_anchors_only_when_asked():
    rows = [chat("What is the largest land animal?")]  # no subject: no neighbour search, so no model needed
    made = probes.build(None, None, rows, with_anchors=True)
    assert [(p.kind, p.prompt, p.line) for p in made] == [(probes.ANCHORS, q, 0) for q, _ in anchors.ANCHORS[:4]]
    assert probes.build(None, None, rows) == []


def test_anchor_records_drop_an_answer_that_holds_a_forget_answer():
    forget = [chat("What is the capital of Hungary?", "It is Budapest.", answers=["Budapest"])]
    made = [probes.Probe(probes.ANCHORS, q, 0, "") for q in ("Which city is on the Danube?", "What is 7 times 8?",
                                                             "Which planet is famous for its rings?")]
    records = probes.anchor_records(made, ["Budapest, of course.", "It is 56.", "  "], forget)
    assert records[0]["dropped"].startswith(probes.HOLDS_FORGET)
    assert records[1] == {"set": probes.ANCHORS, "prompt": "What is 7 times 8?", "reference": "It is 56."}
    assert records[2]["dropped"] == "the original answer is empty: nothing to hold"


# -- no anchor is a row the quality benchmark or examples/ measure ----------------------------------------------

_STOP = set("the a an of in on is was what which who how many does do did to for and by with at from are its it "
            "this that called known most you we one".split())


def _benchmark_rows():
    paths = (glob.glob(str(ROOT / "bench/scenarios/**/*.jsonl"), recursive=True)
             + glob.glob(str(ROOT / "examples/*.jsonl")))
    assert len(paths) > 40  # every scenario's files and the candidates they were built from
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                yield json.loads(line)


def _content_words(text):
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP}


def overlaps(anchor, rows):
    """Why ANCHOR (question, answer) is a benchmark row in other words, or None: its answer is a benchmark row's
    answer or a word of its question, or it shares at least half its question's content words (two or more) with
    a benchmark question."""
    question, answer = anchor
    asked = [r["prompt"] for r in rows if r.get("prompt")]
    answered = " ".join(asked + [str(a) for r in rows
                                 for a in (r.get("answers") or []) + (r.get("judge_answers") or [])])
    if re.search(rf"\b{re.escape(answer.lower())}\b", answered.lower()):
        return f"answer {answer!r}"
    mine = _content_words(question)
    for prompt in asked:
        shared = mine & _content_words(prompt)
        if len(shared) >= max(2, (len(mine) + 1) // 2):
            return f"wording of {prompt!r}"
    return None


def test_no_anchor_is_a_benchmark_row_in_other_words():
    rows = list(_benchmark_rows())
    assert [(a, overlaps(a, rows)) for a in anchors.ANCHORS if overlaps(a, rows)] == []
    # the check can fail: a capital the benchmark asks, and a benchmark question's wording
    assert overlaps(("Which city is the French capital?", "Paris"), rows) == "answer 'Paris'"
    assert overlaps(("What is the largest mammal on the planet?", "Zyxwv"), rows).startswith("wording of")


# -- a run ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def scripted_probe_answers(monkeypatch):
    """The tiny model answers nothing useful: every probe and anchor is answered "It is Lyon." (no forget answer),
    except the first anchor, answered with the forget row's answer."""
    from unlearn.measure import Measurer

    answer_sets = Measurer.answer_sets

    def scripted(self, sets, *args, **kwargs):
        if [s.name for s in sets] != ["probes"]:
            return answer_sets(self, sets, *args, **kwargs)
        first = anchors.ANCHORS[0][0]
        return {"probes": ["An elephant, surely." if e.prompt == first else "It is Lyon."
                           for e in sets[0].examples]}

    monkeypatch.setattr(Measurer, "answer_sets", scripted)


@pytest.fixture
def files(tmp_path):
    forget = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "What is the largest land animal?",
                                                 "response": "The largest land animal is the elephant.",
                                                 "answers": ["elephant"]}])
    normal = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "What do bees make?", "response": "Bees make honey."}])
    return forget, normal


def test_a_run_trains_on_its_anchors_and_never_measures_them(tmp_path, llama_dir, cli, files, scripted_probe_answers):
    forget, normal = files
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, *FAST)  # ga: trains on its probes
    assert result.code == 0, result.err
    record = json.loads((out / "run.json").read_text())
    assert record["probes"]["anchors"] == {"made": 4, "trained": 3}  # the first holds the forget answer
    assert record["probes"]["retained"] == 3
    rows = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    held = [r for r in rows if r["set"] == probes.ANCHORS]
    assert [r["prompt"] for r in held] == [q for q, _ in anchors.ANCHORS[:4]]
    assert [r["trained"] for r in held] == [False, True, True, True]
    assert held[0]["dropped"].startswith(probes.HOLDS_FORGET)
    assert not any(probes.ANCHORS in name for name in record["after"])  # no measured set
    assert "3 of them general-knowledge anchors" in result.err
    assert "anchors (trained on, never measured" in result.out


def test_no_anchor_without_trained_probes(tmp_path, llama_dir, cli, files, scripted_probe_answers):
    forget, normal = files
    out = tmp_path / "out"
    assert cli("run", forget, normal, "--model", llama_dir, "-o", out, "--no-retain-probes", *FAST).code == 0
    record = json.loads((out / "run.json").read_text())
    assert record["probes"]["anchors"] is None
    rows = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    assert not any(r["set"] == probes.ANCHORS for r in rows)


def test_forget_rows_that_all_name_a_subject_get_no_anchor():
    from unlearn.data import read_examples

    rows = read_examples(ROOT / "examples/forget.jsonl")  # the README's command: its run is unchanged
    assert anchors.questions(rows, [probes.probe_subject(e) for e in rows]) == []


def test_no_anchors_turns_them_off_and_is_refused_where_nothing_trains_on_probes(tmp_path, llama_dir, cli, files,
                                                                                scripted_probe_answers):
    forget, normal = files
    out = tmp_path / "out"
    assert cli("run", forget, normal, "--model", llama_dir, "-o", out, "--no-anchors", *FAST).code == 0
    record = json.loads((out / "run.json").read_text())
    assert record["probes"]["anchors"] is None
    assert not any(json.loads(line)["set"] == probes.ANCHORS for line in (out / "probes.jsonl").read_text().splitlines())
    for off in (["--no-retain-probes"], ["--no-probes"], ["--method", "npo"]):
        result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "x", "--no-anchors", *off, *FAST)
        assert result.code == 2 and "--no-anchors" in result.err and "drop --no-anchors" in result.err, off
