"""`unlearn augment`: the rows asked for are the rows written, a response cut before the answer is not
kept, and bad requests are refused with the file's name before any model loads. (The filters and
fallbacks in general: test_ulmr.py.)"""

import json

import pytest

from unlearn import augment as aug
from unlearn.data import Example, Passage
from unlearn.errors import UnlearnError, UsageError

SOURCE = Example("Who wrote the Harry Potter books?", "J.K. Rowling wrote them.", 1, {"answers": ["Rowling"]})
PARIS = Example("What is the capital of France?", "Paris is the capital of France.", 2, {"answers": ["Paris"]})
REFUSAL = "I'm sorry, I don't have that information."


def _scripted(monkeypatch, rewrites: list[str], responses=None):
    """generate() returns REWRITES (padded with "") for the rewrite candidates and RESPONSES (default:
    REFUSAL for each) for the negative responses."""
    def fake_generate(model, tokenizer, prompts, **kwargs):
        if prompts[0].startswith("Please rewrite"):
            return (rewrites + [""] * len(prompts))[:len(prompts)]
        return list(responses) if responses is not None else [REFUSAL] * len(prompts)

    monkeypatch.setattr("unlearn.generation.generate", fake_generate)


# --- 1. every prompt gets the rewrites asked for -----------------------------------------------


def test_more_rewrites_than_templates_are_refused_before_generating(monkeypatch):
    _scripted(monkeypatch, [])  # nothing usable: every rewrite would need a template, and there are 4
    assert aug.MAX_REWRITES == len(aug.TEMPLATE_REWRITES) == 4
    with pytest.raises(UsageError, match=r"--rewrites 5: at most 4"):
        aug.augment(None, None, [SOURCE], rewrites=5)


def test_the_most_rewrites_all_templated_are_all_written(monkeypatch):
    _scripted(monkeypatch, [])
    rows, stats = aug.augment(None, None, [SOURCE, PARIS], rewrites=4, seed=1)
    # 2 sources x (1 original + 4 rewrites) = 10 rows; 8 rewrites, all templated, each template once per source
    assert len(rows) == stats.rows == 10
    assert stats.rewrites_wanted == 8 and stats.rewrite_fallbacks == 8 and stats.rewrite_candidates == 16
    for source, block in ((SOURCE, rows[:5]), (PARIS, rows[5:])):
        assert [r["kind"] for r in block] == ["original"] + ["rewrite"] * 4
        assert sorted(r["prompt"] for r in block[1:]) == \
            sorted(t.format(instruction=source.prompt) for t in aug.TEMPLATE_REWRITES)
    assert stats.summary().startswith("10 rows from 2 forget rows; rewrites: 8 of 8 templated after 16 candidates")


@pytest.mark.parametrize("seed", range(4))
def test_a_template_never_repeats_a_model_rewrite(monkeypatch, seed):
    # The model's one usable rewrite is word for word the "Quick question" template: the 3 rewrites still
    # missing must be the other 3 templates, so the 5 prompts are all different.
    quick = "Quick question: Who wrote the Harry Potter books?"
    _scripted(monkeypatch, [quick])
    rows, stats = aug.augment(None, None, [SOURCE], rewrites=4, seed=seed)
    assert [r["prompt_from"] for r in rows] == ["original", "model", "template", "template", "template"]
    assert rows[1]["prompt"] == quick
    assert sorted(r["prompt"] for r in rows[2:]) == sorted(
        t.format(instruction=SOURCE.prompt) for t in aug.TEMPLATE_REWRITES if not t.startswith("Quick"))
    assert stats.rewrite_fallbacks == 3 and stats.rows == 5


# --- 2. initials do not end a sentence; a cut-off response is not kept -------------------------


@pytest.mark.parametrize("text, cleaned", [
    # a period after initials or a title ends no sentence: nothing is cut there (before: "... by J.K.",
    # "I asked Dr.", "... Rowling, e.g."), so the surname stays for the leak filter to see
    ("The Harry Potter books were written by J.K. Rowling, who", "The Harry Potter books were written by "
                                                               "J.K. Rowling, who"),
    ("I asked Dr. Smith in the U.S. about it", "I asked Dr. Smith in the U.S. about it"),
    ("It was J. K. Rowling, e.g. her first", "It was J. K. Rowling, e.g. her first"),
    ("I cannot say. It was written by J.K. Rowling, who", "I cannot say."),
    # a closing quote after the period still ends the sentence (before: no end found, nothing cut)
    ('He said "I don\'t know." Then he', 'He said "I don\'t know."'),
])
def test_clean_response_keeps_initials_and_titles_inside_sentences(text, cleaned):
    assert aug.clean_response(text) == cleaned


@pytest.mark.parametrize("response, reason", [
    # the user's case: cut right after the initials, before "Rowling"
    ('The answer to this question is: "The Harry Potter books were written by J.K.', "cut off mid-sentence"),
    ("The books were written by Dr.", "cut off mid-sentence"),
    ("I don't know who wrote", "cut off mid-sentence"),
    ("The Harry Potter books were written by J.K. Rowling.", "contains the answer"),
    ('I said "I cannot answer that."', None),
    (REFUSAL, None),
])
def test_response_problem_rejects_a_cut_off_response(response, reason):
    assert aug.response_problem(response, SOURCE.prompt, SOURCE) == reason


def test_augment_replaces_a_response_that_leads_into_the_answer(monkeypatch):
    # Generation stopped mid-sentence after the surname. Cutting at "J.K." (as before) dropped "Rowling"
    # and kept the lead-in; now the whole text is judged and the surname is caught.
    leaking = 'The answer to this question is: "The Harry Potter books were written by J.K. Rowling, who'
    _scripted(monkeypatch, [], responses=[leaking, "That is not in my knowledge base."])
    rows, stats = aug.augment(None, None, [SOURCE], rewrites=1, seed=0)
    assert [r["response_from"] for r in rows] == ["template", "model"]
    assert rows[0]["response"] in aug.TEMPLATE_REFUSALS
    assert stats.responses_rejected == {"contains the answer": 1} and stats.response_fallbacks == 1


# --- 3. passages: named with their file, refused before the model loads -----------------------


def test_a_passage_is_named_with_its_file():
    with pytest.raises(UnlearnError, match=r"^forget\.jsonl:4: a `text` passage has no instruction"):
        aug.augment(None, None, [SOURCE, Example(Passage("Once upon"), " a time", 4, {})], path="forget.jsonl")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows, args, message, code", [
    # a bad row is a runtime error (exit 1) as everywhere else; a bad option a usage error (2)
    ([{"text": "Once upon a time there was a wizard called Harry who lived under the stairs."}], [],
     "{forget}:1: a `text` passage has no instruction to rewrite; ULMR needs prompt/response rows", 1),
    ([{"prompt": SOURCE.prompt, "response": SOURCE.response}], ["--rewrites", "5"],
     "--rewrites 5: at most 4", 2),
])
def test_bad_requests_fail_before_the_model_loads(tmp_path, cli, rows, args, message, code):
    forget = _write(tmp_path / "forget.jsonl", rows)
    # No such model: an error about the request, not about the model, proves it came first.
    result = cli("augment", forget, "-o", tmp_path / "out.jsonl", "--model", tmp_path / "no-model", *args)
    assert result.code == code, result.err
    assert result.err.splitlines() == [result.err.strip()] and result.err.startswith("unlearn: ")
    assert message.format(forget=forget) in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forget.jsonl"]


def test_augment_command_writes_what_it_reports(tmp_path, cli, llama_dir):
    # A random tiny model writes nothing usable: 2 sources x (1 + 4) rows, every rewrite templated.
    forget = _write(tmp_path / "forget.jsonl", [{"prompt": SOURCE.prompt, "response": SOURCE.response},
                                                {"prompt": PARIS.prompt, "response": PARIS.response}])
    out = tmp_path / "aug.jsonl"
    result = cli("augment", forget, "-o", out, "--model", llama_dir, "--rewrites", "4", "--json")
    assert result.code == 0, result.err
    stats = json.loads(result.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == stats["rows"] == 10 and stats["rewrites_wanted"] == 8
    assert sum(r["kind"] == "rewrite" for r in rows) == 8
    assert stats["rewrite_fallbacks"] == sum(r["prompt_from"] == "template" for r in rows)
    assert len({r["prompt"] for r in rows}) == 10
    text = cli("augment", forget, "-o", out, "--model", llama_dir, "--rewrites", "4", "--force")
    templated = sum(r["prompt_from"] == "template" for r in rows)
    assert text.code == 0 and text.out.startswith(f"10 rows from 2 forget rows; rewrites: {templated} of 8 templated")
