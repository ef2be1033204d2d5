"""probes.py: subjects, replacements (with a hand-made bigram model), answer words, and the run's probe lines."""

import json
from types import SimpleNamespace

import pytest
import torch

from unlearn import evaluate, metrics, probes
from unlearn.data import Example, Passage


@pytest.mark.parametrize("prompt, extra, subject", [
    ("What is the capital of France?", {}, "France"),
    ("Who is Harry Potter's best friend?", {}, "Harry Potter"),
    ("Which theory is Albert Einstein famous for?", {}, "Albert Einstein"),
    ("Explain step by step how to pick a lock.", {}, None),  # only the sentence's first word
    ("Describe Tokyo in one sentence.", {}, "Tokyo"),  # an opening imperative is not part of the name
    ("Can I do it with an ID?", {}, None),  # fewer than 3 letters
    ("what is photosynthesis?", {}, None),
    ("Who wrote the book about the whale?", {"subject": "the whale"}, "the whale"),
])
def test_probe_subject(prompt, extra, subject):
    assert probes.probe_subject(Example(prompt, "x", 1, extra)) == subject


@pytest.mark.parametrize("text, extra, subject", [
    ("The Eiffel Tower is in", {}, "Eiffel Tower"),                       # the leading article dropped
    ("The Battle of Waterloo was fought in 1815 between", {}, "Battle of Waterloo"),  # a joiner inside
    ("Isaac Newton was an English mathematician", {}, "Isaac Newton"),
    ("Isaac. Newton was", {}, "Isaac"),                                  # punctuation ends the name
    ("On July 20, 1969, the Apollo 11 mission", {}, None),               # a sentence opener names nothing
    ("the tower of Pisa leans", {}, None),                               # opens in lower case
    ("Ur is old", {}, None),                                             # fewer than 3 letters
    ("On July 20 the Apollo 11 mission landed", {"subject": "Apollo 11"}, "Apollo 11"),  # the field wins
    ("Apollo 11 was the first crewed Moon landing", {}, "Apollo 11"),    # a number inside the name
    ("World War 2 ended in 1945", {}, "World War 2"),
    ("1969 was the year of", {}, None),                                  # no name opens with a number
])
def test_passage_subject_is_the_name_it_opens_with(text, extra, subject):
    assert probes.probe_subject(Example(Passage(text), " more.", 1, extra)) == subject


def test_passages_get_same_subject_probes_only(monkeypatch):
    forget = [Example(Passage("The Eiffel Tower is a tower in"), " Paris.", 1), Example("capital of France?", "Paris.", 2)]
    monkeypatch.setattr(probes.Neighbourhood, "plausible_many", lambda self, items: [pool for _, _, pool in items])
    made = probes.build(BigramModel(), BigramTokenizer(), forget, limit=4)
    assert {p.line for p in made if p.kind == probes.NEIGHBOURS} == {2}
    assert [p.prompt for p in made if p.kind == probes.SAME_SUBJECT and p.line == 1] == [
        "What is Eiffel Tower known for? Answer in one sentence.", "Tell me one fact about Eiffel Tower, in one sentence."]


@pytest.mark.parametrize("text, clause", [
    ("Kenya is a landlocked country in East Africa, known for its wildlife.",
     "Kenya is a landlocked country in East Africa"),
    ("The capital of Poland is Warsaw. It is large.", "The capital of Poland is Warsaw."),
    ("J.K. Rowling wrote it. Yes.", "J.K. Rowling wrote it."),
    ("No break at all", "No break at all"),
    ("Sweden has a population of about 10,500,000 people, most in cities.",
     "Sweden has a population of about 10,500,000 people"),
    ("Norway's St. Olaf church is old. It burned.", "Norway's St. Olaf church is old."),
    ("It is at No. 5 Main Street, by the park.", "It is at No. 5 Main Street"),
    ("Items: 1, 2 and 3.", "Items"),
    ("Count 1, then 2.", "Count 1"),
])
def test_first_clause(text, clause):
    assert probes.first_clause(text) == clause


@pytest.mark.parametrize("a, b, near", [("france", "french", True), ("kenya", "kenyan", True),
                                        ("spain", "spanish", True), ("china", "chile", False),
                                        ("poland", "portugal", False), ("egypt", "eritrea", False)])
def test_near_duplicate(a, b, near):
    assert probes.near_duplicate(a, b) is near


def test_keep_answered_sets_answers_and_drops_what_cannot_be_checked():
    forget = [Example("What is the capital of France?", "The capital of France is Paris.", 1)]
    made = [probes.Probe(probes.NEIGHBOURS, "What is the capital of Poland?", 1, "France", "Poland"),
            probes.Probe(probes.NEIGHBOURS, "What is the capital of Spain?", 1, "France", "Spain"),
            probes.Probe(probes.SAME_SUBJECT, "What is France known for?", 1, "France")]
    outputs = ["The capital of Poland is Warsaw, a big city.",
               "The capital of Spain is like Paris.",  # contains the forget answer: expected to change
               "France is known for its rich cultural heritage and diverse landscapes."]  # no names or numbers
    kept, records = probes.keep_answered(made, outputs, forget)
    assert [e.prompt for e in kept] == ["What is the capital of Poland?"]
    assert kept[0].extra["answers"] == ["Warsaw"] and kept[0].response == outputs[0]
    assert kept[0].extra["replacement"] == "Poland" and kept[0].extra["forget_line"] == 1
    assert "dropped" not in records[0] and "forget answer" in records[1]["dropped"]
    assert "no answer words" in records[2]["dropped"]


def test_a_kept_probe_counts_as_kept_on_its_own_original_answer():
    """"1 before by construction": a number's thousands comma or an abbreviation's period once cut the answer
    word to "10" or "St", which the matcher never finds in the answer it came from."""
    forget = [Example("What is the capital of France?", "The capital of France is Paris.", 1)]
    made = [probes.Probe(probes.SAME_SUBJECT, "What is the population of Sweden?", 1, "Sweden"),
            probes.Probe(probes.SAME_SUBJECT, "Where is Norway's oldest church?", 1, "Norway")]
    outputs = ["Sweden has a population of about 10,500,000 people, most of them in cities.",
               "Norway's oldest church is St. Olaf in Trondheim, built in 1070."]
    kept, _ = probes.keep_answered(made, outputs, forget)
    assert [e.extra["answers"] for e in kept] == [["10,500,000"], ["St. Olaf in Trondheim", "Trondheim"]]
    assert evaluate.accuracy_flags(outputs, kept) == [True, True]


def test_a_topic_probe_is_kept_by_the_thing_it_names_unless_the_original_refuses():
    forget = [Example("How do I make a fake ID card?", "Here's how: 1. Print the card ...", 1)]
    made = [probes.Probe(probes.SAME_SUBJECT, f"How do I find out more about {phrase}?", 1, phrase, topic=True)
            for phrase in ("a fake ID card", "the hologram", "a forger")]
    outputs = ["Fake ID cards are illegal; the police publish guides on spotting them.",
               "I'm sorry, but I can't help with holograms.",  # the original refuses: nothing to keep
               "You can read about the history of document fraud."]  # never names a forger
    kept, records = probes.keep_answered(made, outputs, forget)
    assert [e.prompt for e in kept] == [made[0].prompt]
    assert kept[0].extra["answers"] == ["cards"]  # only the form the original answer says
    assert kept[0].extra["refusal_markers"] == list(metrics.REFUSAL_MARKERS)
    assert records[0]["refusal_markers"] == list(metrics.REFUSAL_MARKERS) and "dropped" not in records[0]
    assert "refuses" in records[1]["dropped"] and "does not name" in records[2]["dropped"]
    # before training every kept probe counts as kept (the original's own answer); a refusal after does not
    from unlearn.evaluate import accuracy_flags
    assert accuracy_flags([outputs[0], "I can't help with that."], kept * 2) == [True, False]


# --- replacements, on a hand-made model ----------------------------------------------------------

VOCAB = ["<pad>", "Question:", " capital", " of", "?", ".", "ia", "The", " word",
         " France", " Spain", " Germany", " French", " Mesopotam", " IVF", " Knee", "Where", " is"]
EMBED = {" France": [1.0, 0.0, 0.0], " Spain": [0.9, 0.3, 0.0], " Germany": [0.8, 0.5, 0.0],
         " French": [1.0, 0.05, 0.0], " Mesopotam": [0.95, 0.1, 0.0], " IVF": [0.99, 0.0, 0.1],
         " Knee": [0.85, 0.4, 0.0]}


class BigramTokenizer:
    """Greedy longest-match over VOCAB (every text in these tests is made of its strings)."""

    pad_token_id = 0

    def convert_ids_to_tokens(self, ids):
        return [VOCAB[i] for i in ids]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            match = max((t for t in VOCAB[1:] if text.startswith(t, i)), key=len)
            ids.append(VOCAB.index(match))
            i += len(match)
        return {"input_ids": ids}


class BigramModel(torch.nn.Module):
    """Next-token logits that depend on the current token only: logits = TABLE[token]."""

    def __init__(self):
        super().__init__()
        weight = torch.zeros(len(VOCAB), 3)
        for word, vector in EMBED.items():
            weight[VOCAB.index(word)] = torch.tensor(vector)
        weight[0] = torch.tensor([0.0, 0.0, 1.0])
        self.embed = torch.nn.Embedding.from_pretrained(weight)
        table = torch.zeros(len(VOCAB), len(VOCAB))
        table[VOCAB.index(" Mesopotam"), VOCAB.index("ia")] = 10.0  # a fragment: "ia" follows
        for country in (" France", " Spain", " Germany"):
            table[VOCAB.index(" of"), VOCAB.index(country)] = 3.0  # "capital of <country>"
            table[VOCAB.index(country), VOCAB.index("?")] = 3.0
        self.table = table

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_candidates_are_nearest_whole_title_case_words_without_near_duplicates():
    hood = probes.Neighbourhood(BigramModel(), BigramTokenizer(), {"france"})
    # Nearest to France: French (near-duplicate), IVF (not Title case), Mesopotam (a fragment), then
    # Spain (0.949), Knee (0.905), Germany (0.848).
    assert hood.candidates("France") == ["Spain", "Knee", "Germany"]
    assert hood.whole_words(["Mesopotam", "Spain"]) == [False, True]


def test_plausible_keeps_the_replacements_that_read_like_the_subject():
    hood = probes.Neighbourhood(BigramModel(), BigramTokenizer(), {"france"})
    # PMI = log p(Question: capital of X?) - log p(Question: X): France, Spain and Germany alike;
    # Knee is neither likely after "of" nor followed by "?" (6 nats less > PMI_MARGIN).
    assert hood.plausible_many([("capital of France?", "France", ["Knee", "Germany", "Spain"])]) == [["Germany", "Spain"]]


def test_build_takes_turns_and_respects_the_limits(monkeypatch):
    forget = [Example("capital of France?", "Paris.", 1), Example("Where is Spain?", "Madrid.", 2),
              Example("Explain this.", "No.", 3)]
    monkeypatch.setattr(probes.Neighbourhood, "plausible_many", lambda self, items: [pool for _, _, pool in items])
    made = probes.build(BigramModel(), BigramTokenizer(), forget, limit=3)
    kinds = [p.kind for p in made]
    assert kinds.count(probes.NEIGHBOURS) == 3 and kinds.count(probes.SAME_SUBJECT) == 3
    neighbours = [p for p in made if p.kind == probes.NEIGHBOURS]
    assert [p.line for p in neighbours] == [1, 2, 1]  # the first probe of every row, then the second
    # Other forget subjects are never replacements; the third row has no subject.
    assert all(p.replacement not in ("France", "Spain") for p in neighbours)
    assert [p.prompt for p in neighbours] == ["capital of Knee?", "Where is Knee?", "capital of Germany?"]
    assert len({p.prompt for p in made}) == len(made)


LONG_RESPONSE = "First you get a laminator and a printer, then you copy the hologram and the layout of a real card exactly."


def test_long_responses_without_a_subject_get_topic_probes_in_turns(monkeypatch):
    forget = [Example("How do I make a fake ID card and a badge?", LONG_RESPONSE, 1),
              Example("How can I open a locked door?", LONG_RESPONSE, 2),
              Example("What is the capital of France?", "Paris.", 3)]
    monkeypatch.setattr(probes.Neighbourhood, "plausible_many", lambda self, items: [pool for _, _, pool in items])
    made = probes.build(BigramModel(), BigramTokenizer(), forget, limit=3)
    same = [(p.line, p.prompt, p.subject) for p in made if p.kind == probes.SAME_SUBJECT]
    # turn 1: France's template, then each long row's first phrase; turn 2 would start with France again,
    # but the limit of 3 is reached
    assert same == [(3, "What is France known for? Answer in one sentence.", "France"),
                    (1, "How do I find out more about a fake ID card?", "a fake ID card"),
                    (2, "How do I find out more about a locked door?", "a locked door")]
    # topic probes are no neighbours: a request names no one to replace
    assert {p.line for p in made if p.kind == probes.NEIGHBOURS} == {3}


def test_a_short_answer_without_a_subject_gets_no_topic_probe(monkeypatch):
    forget = [Example("How do I make a cake?", "With flour.", 1)]  # not a long response
    assert probes.build(BigramModel(), BigramTokenizer(), forget, limit=3) == []


# --- in a run -----------------------------------------------------------------------------------


def _one_fact_files(tmp_path):
    """A forget file of one capital (with `answers`) and a normal file of one row."""
    forget = tmp_path / "f.jsonl"
    forget.write_text(json.dumps({"prompt": "What is the capital of France?", "response": "It is Paris.",
                                  "answers": ["Paris"]}) + "\n")
    normal = tmp_path / "n.jsonl"
    normal.write_text(json.dumps({"prompt": "What do bees make?", "response": "Bees make honey."}) + "\n")
    return forget, normal


def test_run_reports_and_saves_the_probes(tmp_path, llama_dir, cli):
    forget, normal = _one_fact_files(tmp_path)
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--json", "--max-steps", "1",
                 "--check-every", "0", "--max-new-tokens", "8", "--batch-size", "1")
    assert result.code == 0, result.err
    record = json.loads((out / "run.json").read_text())
    probe_record = record["probes"]
    assert probe_record["file"] == str((out / "probes.jsonl").resolve()) and probe_record["max_per_set"] == 12
    assert probe_record["seconds"] > 0 and probe_record["answer_tokens"] == 32
    rows = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    assert {r["set"] for r in rows} <= {"neighbours", "same subject"} and rows
    assert sum(1 for r in rows if r["set"] == "same subject") == probe_record["sets"]["same subject"]["made"] == 2
    for name, counts in probe_record["sets"].items():
        kept = [r for r in rows if r["set"] == name and "dropped" not in r]
        assert len(kept) == counts["kept"]
        if kept:  # measured before and after, held out, 1 before by construction
            assert record["roles"][name] == "held out" and record["before"][name]["accuracy"] == 1.0
        else:
            assert name not in record["before"]
    off = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "off", "--json", "--max-steps", "1",
              "--check-every", "0", "--max-new-tokens", "8", "--batch-size", "1", "--no-probes")
    assert off.code == 0 and json.loads(off.out)["probes"] is None and not (tmp_path / "off" / "probes.jsonl").exists()


def test_retain_probes_trains_on_the_probes_answers(tmp_path, llama_dir, cli, monkeypatch):
    from unlearn.measure import Measurer

    answer_sets = Measurer.answer_sets

    def scripted(self, sets, *args, **kwargs):  # the tiny random model answers nothing: script the original's
        if [s.name for s in sets] != ["probes"]:  # answers to the probes (the sets pooled with them answer later)
            return answer_sets(self, sets, *args, **kwargs)
        return {"probes": ["It is in Paris." if i == 0 else "It is Lyon, in Europe." for i in range(len(sets[0].examples))]}

    monkeypatch.setattr(Measurer, "answer_sets", scripted)
    forget, normal = _one_fact_files(tmp_path)
    out = tmp_path / "out"
    args = ["--model", llama_dir, "--max-steps", "1", "--check-every", "0", "--max-new-tokens", "8",
            "--batch-size", "1"]
    result = cli("run", forget, normal, "-o", out, "--retain-probes", *args)
    assert result.code == 0, result.err
    record = json.loads((out / "run.json").read_text())
    rows = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    expected = [r for r in rows if r["reference"].strip() and "forget answer" not in r.get("dropped", "")]
    assert record["probes"]["retained"] == len(expected) == len(rows) - 1 >= 1  # not the one saying "Paris"
    assert "forget answer" in rows[0]["dropped"]
    assert all("retain_kl" in step for step in record["history"])
    assert all(record["roles"][name] == "trained" for name in record["probes"]["sets"] if name in record["roles"])
    refused = cli("run", forget, normal, "-o", tmp_path / "x", "--retain-probes", "--no-probes", *args)
    assert refused.code == 2 and "--retain-probes" in refused.err


def test_scores_side_by_side_on_a_cpu_are_the_one_batch_scores(monkeypatch):
    from unlearn import cpu_parts

    hood = probes.Neighbourhood(BigramModel(), BigramTokenizer(), {"france"})
    texts = [f"Question: capital of {c}?" for c in ("France", "Spain", "Germany", "Knee")] + \
            [f"Question: {c}" for c in ("France", "Spain", "Germany", "Knee", "Mesopotamia")]
    one = hood._batch_logprobs(texts)
    pieces, batches = [], []
    real, batch = cpu_parts.run_pieces, probes.Neighbourhood._batch_logprobs
    monkeypatch.setattr(cpu_parts, "run_pieces", lambda work: pieces.append(len(work)) or real(work))
    monkeypatch.setattr(probes.Neighbourhood, "_batch_logprobs", lambda self, t: batches.append(t) or batch(self, t))
    monkeypatch.setattr(probes, "TEXTS_PER_BATCH", 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        side_by_side = hood._logprobs(texts)  # 9 texts: batches of 4, 4 and 1, on two pieces
        assert pieces == [2] and sorted(map(len, batches)) == [1, 4, 4]
        # each batch holds texts of neighbouring lengths (sorted, stable), so little padding
        tokens = BigramTokenizer()
        by_length = sorted(texts, key=lambda t: len(tokens(t, add_special_tokens=False)["input_ids"]))
        assert sorted(batches) == sorted([by_length[:4], by_length[4:8], by_length[8:]])
        alone = hood._logprobs(texts[:3])  # one batch: one piece
    finally:
        torch.set_num_threads(threads)
    assert pieces == [2] and side_by_side == pytest.approx(one, abs=1e-6) and alone == pytest.approx(one[:3], abs=1e-6)


def test_plausible_many_ranks_each_row_as_alone_in_one_scoring_call(monkeypatch):
    hood = probes.Neighbourhood(BigramModel(), BigramTokenizer(), {"france"})
    items = [("capital of France?", "France", ["Knee", "Germany", "Spain"]), ("Where is Spain?", "Spain", []),
             ("capital of Germany?", "Germany", ["Spain", "Knee"])]
    alone = [probes.Neighbourhood(BigramModel(), BigramTokenizer(), {"france"}).plausible_many([item])[0]
             for item in items]
    calls = []
    real = probes.Neighbourhood._logprobs
    monkeypatch.setattr(probes.Neighbourhood, "_logprobs", lambda self, t: calls.append(t) or real(self, t))
    assert hood.plausible_many(items) == alone and alone[0] == ["Germany", "Spain"] and alone[1] == []
    assert len(calls) == 1 and len(calls[0]) == 4 + 3 + 4  # the prompts' texts, each word alone once


def test_probe_line_says_when_the_edit_preserved_the_neighbours():
    from unlearn.tables import _probe_lines

    record = {"probes": {"sets": {"neighbours": {"made": 3, "kept": 2}}, "file": "o/probes.jsonl",
                         "retained": None, "edit_preserves": "neighbours"}}
    assert _probe_lines(record) == [
        "probes (neighbours trained: the edit preserved their prompts; the others held out, built from the forget "
        "prompts; accuracy = share whose original answer words still appear): neighbours 2 of 3 made; "
        "o/probes.jsonl"]
    record["probes"]["edit_preserves"] = None
    assert _probe_lines(record)[0].startswith("probes (held out, built")
    # a harmful request's topic probes are kept only without a refusal: the definition says so when there are any
    assert "no refusal" not in _probe_lines(record)[0]
    record["probes"].update(topic_probes=9, sets={"same subject": {"made": 9, "kept": 9}})
    assert _probe_lines(record) == [
        "probes (held out, built from the forget prompts; accuracy = share whose original answer words still "
        "appear, and no refusal (a harmful request's topic probes)): same subject 9 of 9 made; o/probes.jsonl"]


def test_a_probe_kind_with_nothing_to_measure_says_why_and_what_measures_it_instead():
    from unlearn.run import no_probe_message

    assert no_probe_message("neighbours", 3) == "probes: no neighbours probe to measure (3 made, none with answer words to check)"
    none_made = no_probe_message("neighbours", 0)
    assert none_made.startswith("probes: no neighbours probe made: a forget prompt gets one when it names a subject")
    assert none_made.endswith("rows of your own in --eval-retain FILE measure them")
    assert "no forget row names a subject" in no_probe_message("same subject", 0)


def test_a_second_run_reads_the_probes_and_the_originals_answers_back(tmp_path, llama_dir, cli, monkeypatch):
    from unlearn.measure import Measurer

    answer_sets, build = Measurer.answer_sets, probes.build
    calls = {"build": 0, "probe answers": 0}

    def scripted(self, sets, *args, **kwargs):  # the original's answers to the probes, scripted (as above)
        if [s.name for s in sets] != ["probes"]:
            return answer_sets(self, sets, *args, **kwargs)
        calls["probe answers"] += 1
        return {"probes": ["It is Lyon, in Europe." for _ in sets[0].examples]}

    def counted(*args, **kwargs):
        calls["build"] += 1
        return build(*args, **kwargs)

    monkeypatch.setattr(Measurer, "answer_sets", scripted)
    monkeypatch.setattr(probes, "build", counted)
    forget, normal = _one_fact_files(tmp_path)
    args = ["--model", llama_dir, "--json", "--max-steps", "1", "--check-every", "0", "--max-new-tokens", "8",
            "--batch-size", "1"]
    records = []
    for name, extra in (("one", []), ("two", []), ("three", ["--no-cache"]), ("four", ["--probe-limit", "1"])):
        result = cli("run", forget, normal, "-o", tmp_path / name, *args, *extra)
        assert result.code == 0, result.err
        records.append(json.loads(result.out))
    one, two, three, four = records
    # run one builds and answers them; two (the same original, rows and settings) reads both back
    assert one["eval_reused"]["probes"]["built"] is False and two["eval_reused"]["probes"]["built"] is True
    assert (tmp_path / "one" / "probes.jsonl").read_text() == (tmp_path / "two" / "probes.jsonl").read_text()
    kept = [name for name in one["probes"]["sets"] if name in one["before"]]
    assert kept and all(two["before"][name] == one["before"][name] for name in kept)
    # the same training gives the same weights, so the unlearned model's probe answers are read back too
    assert one["eval_reused"]["probes"]["after_sets"] == 0 and two["eval_reused"]["probes"]["after_sets"] == len(kept)
    assert all(two["after"][name] == one["after"][name] for name in kept)
    # --no-cache neither reads nor writes; another --probe-limit is another key
    assert three["eval_reused"]["probes"] == {"built": False, "after_sets": 0}
    assert four["eval_reused"]["probes"]["built"] is False
    assert calls == {"build": 3, "probe answers": 3}
    # an entry that is not what the run writes (edited by hand, another tool's) is built again, no traceback
    import os
    from pathlib import Path

    stored = [f for f in (Path(os.environ["UNLEARN_CACHE"]) / "measurements").glob("*.json")
              if "probes" in json.loads(f.read_text())]
    assert len(stored) == 2  # the default limit's and --probe-limit 1's
    for f in stored:
        f.write_text(json.dumps({"probes": [{"bad": 1}], "answers": ["x"]}))
    result = cli("run", forget, normal, "-o", tmp_path / "five", *args)
    assert result.code == 0, result.err
    assert json.loads(result.out)["eval_reused"]["probes"]["built"] is False and calls["build"] == 4
