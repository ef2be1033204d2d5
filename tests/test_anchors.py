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


def test_anchors_go_to_chat_rows_naming_no_one_only():
    assert anchors.gets_anchors(chat("What is the largest land animal?"), None)
    assert not anchors.gets_anchors(chat("What is the capital of France?"), "France")
    assert not anchors.gets_anchors(PASSAGE, "Eiffel Tower")  # its same-subject probes hold the subject
    assert not anchors.gets_anchors(PASSAGE, None)  # a passage gets none, subject or not
    assert not anchors.gets_anchors(LONG, None)  # topic probes, and the refusal trains on none


def test_per_row_anchors_in_order_at_most_all():
    rows = [chat("What is the capital of France?"), chat("What is the largest land animal?"), PASSAGE]
    subjects = ["France", None, "Eiffel Tower"]
    assert anchors.PER_ROW == 4
    assert anchors.questions(rows, subjects) == [q for q, _ in anchors.ANCHORS[:4]]  # 1 row (no passage) x 4
    two = [chat("What is the largest land animal?"), chat("Which planet is the hottest?")]
    assert anchors.questions(two, [None, None]) == [q for q, _ in anchors.ANCHORS[:8]]  # 2 rows x 4
    assert anchors.questions(rows[:1], subjects[:1]) == []  # every row has its neighbours: no anchor
    many = [chat(f"Which animal is number {i}?") for i in range(20)]
    assert anchors.questions(many, [None] * 20) == [q for q, _ in anchors.ANCHORS]  # 80 wanted, 43 there


def test_an_anchor_that_asks_a_forget_prompt_is_skipped():
    first = anchors.ANCHORS[0][0]
    rows = [chat("  " + first.replace(" ", "\n "))]  # the same prompt, by prompt_key
    assert anchors.questions(rows, [None]) == [q for q, _ in anchors.ANCHORS[1:5]]


def test_an_anchor_that_a_probe_asks_already_is_skipped(monkeypatch):
    """A capital-of row's neighbour may ask an anchor's very question: the next anchor stands in for it."""
    class Stub:  # the neighbour search, with fixed nearest words (the tiny model's embeddings are random)
        def __init__(self, *args):
            pass

        def candidates(self, subject):
            return ["Hungary", "Chile"]

        def plausible_many(self, items):
            return [candidates for _, _, candidates in items]

    monkeypatch.setattr(probes, "Neighbourhood", Stub)
    rows = [chat("What is the capital of Peru?", "It is Lima.", answers=["Lima"]),
            chat("What is the largest land animal?")]
    made = probes.build(None, None, rows, with_anchors=True)
    prompts = [p.prompt for p in made]
    assert "What is the capital of Hungary?" in [p.prompt for p in made if p.kind == probes.NEIGHBOURS]
    assert len(prompts) == len(set(prompts))  # before: the neighbour and anchor 4 asked the same
    held = [p.prompt for p in made if p.kind == probes.ANCHORS]
    assert held == [q for q, _ in anchors.ANCHORS[:5] if "Hungary" not in q]


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


# Texts of benchmark rows that hold an anchor's answer word, each with why it is let through. The first version of
# this test read questions and answers only; these five were found once it read responses and passages too, after
# the dev runs that chose the anchors (docs/quality.md, "General-knowledge anchors"), so the bank was kept as it was
# judged and the overlaps are named here and in the test split's report instead.
ALLOWED_TEXT = (
    "the largest star in the Milky Way",  # `passages` forget line 8's opening (not forgotten) and a paraphrase's
    "the most massive star in the Milky Way",  # and its continuation: the galaxy anchor's answer is dropped if it
    # leaks that passage by the passage leak rule (probes.forget_held, evaluate.leak_flags), else held beside it
    # (since the fifty-fourth session a passage makes no anchor, so neither of these is held in a `passages` run)
    "The human heart is a muscular organ",  # `passages` (test) neighbour passage, and the candidate file it was
    # made from: the organ anchor asks about the heart, so that neighbour was held by it while passages made
    # anchors (the fifty-third session's test report reads `passages`' neighbours without it too)
    "4. Grapes",  # examples/normal.jsonl's list of fruits: a normal row, trained on by the normal KL anyway
    "in the heart of",  # held-back normal responses (shared, tofu): "heart" as an idiom, scored by similarity
)


def overlaps(anchor, rows):
    """Why ANCHOR (question, answer) is a benchmark row in other words, or None: its answer is a benchmark row's
    answer or a word of its question, or it shares at least half its question's content words (two or more) with
    a benchmark question."""
    question, answer = anchor
    asked = [r["prompt"] for r in rows if r.get("prompt")]
    answered = " ".join(asked + [str(r.get(k) or "") for r in rows for k in ("response", "text", "prefix")]
                        + [str(a) for r in rows for a in (r.get("answers") or []) + (r.get("judge_answers") or [])])
    answered = answered.lower()
    for allowed in ALLOWED_TEXT:
        answered = answered.replace(allowed.lower(), " ")
    if re.search(rf"\b{re.escape(answer.lower())}\b", answered):
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
    # (these rows name no one: no probe is made, and without anchors no probes.jsonl is written either)
    assert not (out / "probes.jsonl").exists() and record["probes"]["file"] is None


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
    assert not (out / "probes.jsonl").exists() and record["probes"]["file"] is None
    for off in (["--no-retain-probes"], ["--no-probes"], ["--method", "npo"]):
        result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "x", "--no-anchors", *off, *FAST)
        assert result.code == 2 and "--no-anchors" in result.err and "drop --no-anchors" in result.err, off


def test_the_anchors_are_among_the_rows_the_retain_kl_trains(tmp_path, llama_dir, cli, files, scripted_probe_answers):
    """An --eval-retain row that asks an anchor's question is labelled trained: the anchors reached the retain rows
    (label_trained_rows reads the rows training draws from), not only the counts."""
    forget, normal = files
    second = anchors.ANCHORS[1][0]  # trained (the first is dropped: its scripted answer holds the forget answer)
    er = write_jsonl(tmp_path / "er.jsonl", [{"prompt": second, "response": "The Mongols.", "answers": ["Mongol"]},
                                             {"prompt": "Which way is north?", "response": "Up.", "answers": ["Up"]}])
    out = tmp_path / "out"
    assert cli("run", forget, normal, "--model", llama_dir, "-o", out, "--eval-retain", er, *FAST).code == 0
    assert json.loads((out / "run.json").read_text())["roles"]["er"] == "1 of 2 trained"
    off = tmp_path / "off"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", off, "--eval-retain", er, "--no-anchors", *FAST)
    assert result.code == 0
    assert json.loads((off / "run.json").read_text())["roles"]["er"] == "held out"


def test_probes_cached_without_anchors_are_not_read_back_by_a_run_that_makes_them(tmp_path, llama_dir, cli, files,
                                                                                 scripted_probe_answers, monkeypatch):
    forget, normal = files
    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "cache"))
    assert cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "a", "--no-anchors", *FAST).code == 0
    assert cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "b", *FAST).code == 0
    assert json.loads((tmp_path / "b" / "run.json").read_text())["probes"]["anchors"] == {"made": 4, "trained": 3}


def test_an_anchor_ulmr_forgets_is_not_trained(tmp_path, llama_dir, cli, files, scripted_probe_answers):
    forget, normal = files
    second = anchors.ANCHORS[1][0]
    augmented = write_jsonl(tmp_path / "aug.jsonl", [
        {"prompt": "What is the largest land animal?", "response": "I'm not able to share that."},
        {"prompt": second, "response": "I'm not able to share that."}])
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--method", "ulmr", "--augmented", augmented,
                 "--retain-probes", "--alpha", "0.5", *FAST)
    assert result.code == 0, result.err
    rows = {r["prompt"]: r for r in map(json.loads, (out / "probes.jsonl").read_text().splitlines())
            if r["set"] == probes.ANCHORS}
    assert rows[second]["trained"] is False and rows[anchors.ANCHORS[2][0]]["trained"] is True


def test_no_anchors_without_method_on_rows_that_get_the_refusal_is_a_note(tmp_path):
    """Where the forget rows, not the user, chose a method that trains on no probes, --no-anchors is one note."""
    from unlearn.config import RunOptions, TrainConfig, UsageError

    long_rows = [LONG]
    opts = RunOptions(tmp_path / "f.jsonl", tmp_path / "n.jsonl", anchors=False, auto_method=True,
                      given=frozenset({"no_anchors"}))
    resolved = opts.for_forget_rows(long_rows).resolved()
    assert not resolved.anchors and any("--no-anchors does nothing here" in n for n in resolved.notes)
    with pytest.raises(UsageError, match="drop --no-anchors"):
        RunOptions(tmp_path / "f.jsonl", tmp_path / "n.jsonl", anchors=False, given=frozenset({"no_anchors"}),
                   train=TrainConfig(method="npo")).resolved()
