"""measure.py, measure_cache.py and the run's honest report: held-out normal rows, roles, the cache."""

import json

import pytest

from unlearn import measure_cache
from unlearn.data import Example
from unlearn.measure import EvalSet
from unlearn.run import hold_out, selection_sets

FORGET = [
    {"prompt": "Who wrote the Harry Potter books?", "response": "J.K. Rowling wrote them.", "answers": ["Rowling"]},
    {"prompt": "Where does Harry Potter study?", "response": "Harry Potter studies at Hogwarts."},
]
NORMAL = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(8)]
FAST = ["--max-steps", "2", "--check-every", "1", "--max-new-tokens", "4", "--batch-size", "2", "--lr", "1e-2",
        "--json"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hold_out_draws_a_seeded_share_and_keeps_file_order():
    rows = list(range(8))
    kept, held = hold_out(rows, 0.25, seed=0)
    assert len(held) == 2 and sorted(kept + held) == rows
    assert kept == sorted(kept) and held == sorted(held)
    assert hold_out(rows, 0.25, seed=0) == (kept, held)  # same seed, same rows
    assert hold_out(rows[:3], 0.5, seed=0) == (rows[:3], [])  # fewer than 4 rows: nothing held back
    assert hold_out(rows, 0.0, seed=0) == (rows, [])
    kept, held = hold_out(rows[:4], 0.9, seed=0)  # round(3.6) = 4 would hold back every row
    assert (len(kept), len(held)) == (1, 3)


def test_alpha_is_chosen_on_forget_prompts_and_held_back_normal_rows_never_eval_files():
    sets = [EvalSet("forget", "forget", []), EvalSet("normal", "retain", []),
            EvalSet("normal-heldout", "retain", []), EvalSet("paraphrases", "forget", []),
            EvalSet("heldout", "retain", [])]
    assert [s.name for s in selection_sets(sets)] == ["forget", "normal-heldout"]
    assert [s.name for s in selection_sets(sets[:2] + sets[3:])] == ["forget", "normal"]


def test_cache_key_depends_on_every_input():
    base = dict(weights="w", rows=[Example("p", "r", 1)], generation=[48, 16])
    k = measure_cache.key(**base)
    assert k == measure_cache.key(**base)
    assert k != measure_cache.key(**{**base, "weights": "w2"})
    assert k != measure_cache.key(**{**base, "rows": [Example("p", "r2", 1)]})
    assert k != measure_cache.key(**{**base, "generation": [32, 16]})
    # a passage (continued as raw text) is not the chat prompt of the same characters: it hit the same entry
    from unlearn.data import Passage
    assert measure_cache.key(**{**base, "rows": [Example(Passage("p"), "r", 1)]}) != k


def test_weights_fingerprint_follows_content_not_names(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"same bytes")
        (tmp_path / name / "config.json").write_text("{}")
    a, b = measure_cache.weights_fingerprint(tmp_path / "a"), measure_cache.weights_fingerprint(tmp_path / "b")
    assert a == b
    (tmp_path / "b" / "model.safetensors").write_bytes(b"other bytes")
    assert measure_cache.weights_fingerprint(tmp_path / "b") != a


def test_a_second_identical_run_reuses_the_originals_measurements(cli, tmp_path, llama_dir):
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    common = ["run", forget, normal, "--model", llama_dir, *FAST]
    code, out, err = cli(*common, "-o", tmp_path / "one")
    assert code == 0, err
    first = json.loads(out)
    code, out, err = cli(*common, "-o", tmp_path / "two")
    assert code == 0, err
    second = json.loads(out)
    # Held-back normal rows are their own, labelled set; the forget set is labelled a stop condition.
    assert set(first["before"]) == {"forget", "normal", "normal-heldout"}
    assert first["data"]["normal"]["rows"] == 6 and first["before"]["normal-heldout"]["n"] == 2
    assert first["roles"] == {"forget": "trained, stop rule", "normal": "trained", "normal-heldout": "held out"}
    assert first["eval_reused"]["before_sets"] == 0 and first["eval_reused"]["after_sets"] == 0
    # Training on the CPU is deterministic: the same weights again, so the "after" answers are read back too.
    assert {k: v for k, v in second["eval_reused"].items() if k != "probes"} == {"before_sets": 3, "after_sets": 3, "of": 3, "cache": True}
    assert second["before"] == first["before"] and second["after"] == first["after"]
    code, out, err = cli(*common, "-o", tmp_path / "three", "--no-cache")
    assert code == 0, err
    third = json.loads(out)
    assert third["eval_reused"]["before_sets"] == third["eval_reused"]["after_sets"] == 0
    assert third["before"] == first["before"]
    code, out, err = cli(*common, "-o", tmp_path / "four", "--lr", "3e-3")  # other weights: measured again
    assert code == 0, err
    assert json.loads(out)["eval_reused"]["after_sets"] == 0
    # What the loss and the leak judge look for in each forget row is in run.json for the user.
    answers = {r["line"]: (r["answers"], r["source"]) for r in first["forget_answers"]}
    assert answers[1] == (["Rowling"], "given")
    assert answers[2][1] == "derived" and "Hogwarts" in answers[2][0]


def test_the_table_labels_trained_and_held_out_rows(cli, tmp_path, llama_dir):
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    code, out, err = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "o",
                         *[a for a in FAST if a != "--json"])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["set", "rows", "n"]
    assert lines[1].startswith("forget") and "trained, stop rule" in lines[1]
    assert "normal-heldout" in out and "held out" in out and "not a result" in out


def test_method_edit_runs_end_to_end_and_writes_the_edited_model(cli, tmp_path, llama_dir):
    from safetensors.torch import load_file

    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    code, out, err = cli("run", forget, normal, "--model", llama_dir, "--method", "edit", "-o", tmp_path / "o",
                         "--max-new-tokens", "4", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["method"] == "edit" and record["stopped_by"] == "edit"
    # run.json's config is the edit's own settings, not the training loop's, which it refuses (review 116)
    config = json.loads((tmp_path / "o" / "run.json").read_text())["config"]
    assert config["method"] == "edit" and config["edit"]["normal_weight"] == 1e4 and config["edit"]["layers"]
    assert not {"lr", "max_steps", "forget_loss", "normal_weight", "rmu_scale"} & set(config)
    # The edit preserves the neighbour probes' prompts (run.probe_neighbours): their line is not held out.
    assert record["probes"]["edit_preserves"] == "neighbours"
    assert all(role == "trained" for name, role in record["roles"].items() if name.startswith("neighbours"))
    assert all(role == "held out" for name, role in record["roles"].items() if name.startswith("same subject"))
    edited = load_file(tmp_path / "o" / "model" / "model.safetensors")
    original = load_file(llama_dir / "model.safetensors")
    changed = sorted(k for k in original if not torch_equal(edited[k], original[k]))
    assert changed and all("mlp.down_proj" in k for k in changed)  # only the edited MLP output layers
    # The update is also saved as a PEFT adapter: folding it into the base gives the edited model.
    code, _, err = cli("merge", llama_dir, "--adapter", record["adapter"], "-o", tmp_path / "folded")
    assert code == 0, err
    folded = load_file(tmp_path / "folded" / "model.safetensors")
    assert max((folded[k] - edited[k]).abs().max().item() for k in edited) < 1e-5
    code, _, err = cli("run", forget, normal, "--model", llama_dir, "--method", "edit", "--alpha", "0.5",
                       "-o", tmp_path / "p")
    assert code == 2 and "--method edit" in err


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_state_fingerprint_follows_the_weights_in_memory_and_the_adapters_switch(llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from unlearn.lora import LoraSettings, attach_lora, lora_modules

    one, two = (AutoModelForCausalLM.from_pretrained(llama_dir) for _ in range(2))
    assert measure_cache.state_fingerprint(one) == measure_cache.state_fingerprint(two)
    with torch.no_grad():
        next(two.parameters()).view(-1)[0] += 1e-6  # one value, barely changed
    assert measure_cache.state_fingerprint(one) != measure_cache.state_fingerprint(two)
    attach_lora(one, LoraSettings(rank=2, alpha=4), seed=0)
    on = measure_cache.state_fingerprint(one)
    for module in lora_modules(one).values():
        module.enabled = False
    assert measure_cache.state_fingerprint(one) != on


def _three_questions_counting_passes(tmp_path, monkeypatch):
    """A tiny word-level model, one retain set of three questions, generation settings, a Scorer, and the
    list that receives the number of pairs of every forward-pass scoring call (`Scorer.logprobs`).
    Word-level: answers' text gives back their tokens (a random byte-level model's answers are broken
    UTF-8 that no text gives back, and would always be scored again)."""
    from test_evaluate import build_tiny_lm
    from unlearn.data import Example
    from unlearn.evaluate import Scorer
    from unlearn.measure import EvalSet, Settings
    from unlearn.models import load_model

    loaded = load_model(str(build_tiny_lm(tmp_path)), log=lambda m: None)
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = [Example(p, None, i) for i, p in enumerate(["one", "what is the capital of France ?", "the cat sat"], 1)]
    passes = []
    score = Scorer.logprobs
    monkeypatch.setattr(Scorer, "logprobs", lambda self, pairs: passes.append(len(pairs)) or score(self, pairs))
    return (model, tokenizer, [EvalSet("qs", "retain", rows)], Settings(max_new_tokens=6, batch_size=4),
            Scorer(model, tokenizer), passes)


def test_fluency_comes_from_generation_for_the_originals_answers_and_for_identical_ones(tmp_path, monkeypatch):
    """The original measuring itself takes fluency from generation; another measurer whose answers are token
    for token the original's takes it from the original's (fluency_hints); the figures are a scoring pass's."""
    from unlearn.measure import Measurer

    model, tokenizer, sets, settings, scorer, passes = _three_questions_counting_passes(tmp_path, monkeypatch)
    plain = Measurer(model, tokenizer, settings, fluency_scorer=scorer).measure(sets)["qs"]
    assert sum(passes) == 3  # every answer scored by a forward pass
    passes.clear()
    original = Measurer(model, tokenizer, settings, fluency_scorer=scorer, own_fluency=True)
    own = original.measure(sets)["qs"]
    reused_own = 3 - sum(passes)
    passes.clear()
    hinted = Measurer(model, tokenizer, settings, fluency_scorer=scorer)
    hinted.fluency_hints = original.own_scores
    again = hinted.measure(sets)["qs"]
    assert reused_own == 3 and sum(passes) == 0  # the same answers: reused from the original's
    for m in (own, again):
        assert m.outputs == plain.outputs
        assert m.summary["fluency_ppl"] == pytest.approx(plain.summary["fluency_ppl"], rel=1e-4)


def test_a_pooled_measurers_fluency_pairs_join_the_first_measurers_call(tmp_path, monkeypatch):
    """Sets pooled into another measurer's generation (the probes' into the after measurement) have their
    fluency pairs scored in that measurer's call, with the same figures as scored alone."""
    from test_evaluate import build_tiny_lm
    from unlearn.evaluate import Scorer
    from unlearn.measure import Measurer, Settings
    from unlearn.models import load_model

    loaded = load_model(str(build_tiny_lm(tmp_path)), log=lambda m: None)
    model, tokenizer = loaded.model, loaded.tokenizer
    first = EvalSet("a", "retain", [Example(p, None, i) for i, p in enumerate(["one", "the cat sat"], 1)])
    second = EvalSet("b", "retain", [Example(p, None, i) for i, p in enumerate(["what is the capital of France ?",
                                                                                 "one two", "cat"], 1)])
    passes = []
    score = Scorer.logprobs
    monkeypatch.setattr(Scorer, "logprobs", lambda self, pairs: passes.append(len(pairs)) or score(self, pairs))
    fluency = Scorer(model, tokenizer)  # one scorer for both, as the run's original-model scorer
    long, short = Settings(max_new_tokens=6, batch_size=8), Settings(max_new_tokens=3, batch_size=8)
    alone_a = Measurer(model, tokenizer, long, fluency_scorer=fluency).measure([first])["a"]
    alone_b = Measurer(model, tokenizer, short, fluency_scorer=fluency).measure([second])["b"]
    passes.clear()
    main, probe = (Measurer(model, tokenizer, long, fluency_scorer=fluency),
                   Measurer(model, tokenizer, short, fluency_scorer=fluency))
    pooled_a = main.measure([first], pool=[(probe, [second])])["a"]
    assert passes == [5]  # one call: 2 answers of the first set, 3 of the pooled one
    pooled_b = probe.measure([second])["b"]
    assert passes == [5] and probe.fluency_ahead is None  # none of its own, and not kept for another call
    for pooled, alone in ((pooled_a, alone_a), (pooled_b, alone_b)):
        assert pooled.outputs == alone.outputs
        assert pooled.summary["fluency_ppl"] == pytest.approx(alone.summary["fluency_ppl"], rel=1e-4)
    # a measurer with another fluency scorer is not pooled
    passes.clear()
    stranger = Measurer(model, tokenizer, short, fluency_scorer=Scorer(model, tokenizer))
    Measurer(model, tokenizer, long, fluency_scorer=fluency).measure([first], pool=[(stranger, [second])])
    assert passes == [2] and stranger.fluency_ahead is None
    # a run without probes pools nothing (no measurer, no sets)
    passes.clear()
    Measurer(model, tokenizer, long, fluency_scorer=fluency).measure([first], pool=[(None, [])])
    assert passes == [2]


def test_scoring_batches_side_by_side_give_one_calls_logprobs(tmp_path, monkeypatch):
    """On 2 torch threads ShardedScorer deals whole batches to 2 threads (cpu_parts.py): each batch is the one
    a single call forms, and every pair's log-probabilities are the single call's (float rounding apart)."""
    import threading

    import torch

    from unlearn.evaluate import Scorer
    from unlearn.measure import ShardedScorer, scoring_batches
    from unlearn.models import load_model

    from test_evaluate import build_tiny_lm

    loaded = load_model(str(build_tiny_lm(tmp_path)), log=lambda m: None)
    model, tokenizer = loaded.model, loaded.tokenizer
    words = "what is the capital of France ? the cat sat one".split()
    pairs = [(" ".join(words[i % 4:i % 4 + 3]), " ".join(words[:1 + i % 9])) for i in range(11)]
    one = Scorer(model, tokenizer, batch_size=3).logprobs(pairs)
    batches = scoring_batches(tokenizer, pairs, 3)
    calls = []
    score = Scorer.logprobs
    monkeypatch.setattr(Scorer, "logprobs",
                        lambda self, p: calls.append((threading.current_thread().name, list(p))) or score(self, p))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        side = ShardedScorer(model, tokenizer, batch_size=3).logprobs(pairs)
        assert torch.get_num_threads() == 2  # restored after the pieces
    finally:
        torch.set_num_threads(threads)
    assert len({name for name, _ in calls}) == 2  # two threads, one call each
    assert sorted(p for _, p in calls) == sorted([pairs[i] for b in batches[r::2] for i in b] for r in range(2))
    assert len(side) == len(one) and all(a == pytest.approx(b, abs=1e-5) for a, b in zip(side, one))


class _StreamingMeasurer:
    """A Measurer stand-in whose rows "generate" one word per step in lockstep, asking STOP_ROW
    every step as generation does every STOP_CHECK_EVERY tokens; it records each row's words."""

    def __init__(self, streams: list[str]):
        self.streams = [text.split() for text in streams]
        self.words = [0] * len(streams)  # words streamed, summed over the calls
        self.calls = []  # the rows of each call
        self.drafts, self.deciders = {}, {}

    def references(self, s):
        return s.examples

    def answer(self, s, desc=False, stop_row=None, rows=None):
        rows = list(range(len(self.streams))) if rows is None else list(rows)
        self.calls.append(rows)
        running, said = set(rows), {i: 0 for i in rows}
        for step in range(1, max(map(len, self.streams), default=0) + 1):
            for i in sorted(running):
                said[i] = min(step, len(self.streams[i]))
                if step >= len(self.streams[i]) or stop_row(i, " ".join(self.streams[i][:step])):
                    running.discard(i)
        for i in rows:
            self.words[i] += said[i]
        return [" ".join(self.streams[i][:said[i]]) if i in said else "" for i in range(len(self.streams))]


def _rows(n):
    return [Example(prompt=f"Where is city {i}?", response=f"It is in Paris {i}.", line=i + 1,
                    extra={"answers": ["Paris"]}) for i in range(n)]


QUIET = "It is somewhere in a country far away from here, I think, though I am not sure."


def test_a_stop_rule_check_ends_at_its_verdict():
    from unlearn.measure import leak_rate

    # row 1 says Paris at its 4th word (tested once a word follows it); the others never do
    streams = [QUIET, "The city is Paris of course and more", QUIET, QUIET]
    forget = EvalSet("forget", "forget", _rows(4))

    full = _StreamingMeasurer(streams)
    assert leak_rate(full, forget) == 0.25  # no verdict asked for: only the leaked row stops early
    assert full.words == [17, 5, 17, 17]

    decided = _StreamingMeasurer(streams)
    # --stop-leak 0: the first leak decides; row 1 is seen leaking at word 5 and every other row
    # stops at its next question (rows after it in this step at 5 words, row 0 at 6)
    assert leak_rate(decided, forget, decided_above=0.0) == 0.25
    assert decided.words == [6, 5, 5, 5]

    # --stop-leak 0.25: one leak of four is not above it, so nothing is cut and the rate is exact
    tolerant = _StreamingMeasurer(streams)
    assert leak_rate(tolerant, forget, decided_above=0.25) == 0.25
    assert tolerant.words == [17, 5, 17, 17]


def test_a_topic_probe_is_judged_on_its_whole_answer_by_the_probe_check():
    # its refusal markers unset it when a refusal follows the answer word: stopped at "car" it read as kept
    from unlearn import metrics
    from unlearn.measure import kept_rate

    row = Example("How do I find out more about a car?", None, 1,
                  {"answers": ["car"], "refusal_markers": list(metrics.REFUSAL_MARKERS)})
    probes = EvalSet("same subject", "retain", [row])
    streams = ["A car is a vehicle, but I can't help with that request at all."]
    assert kept_rate(_StreamingMeasurer(streams), probes) == 0.0
    assert kept_rate(_StreamingMeasurer(streams), probes, enough=0.5) == 0.0
    plain = EvalSet("neighbours", "retain", _rows(1))  # no markers: stops at its answer, as before
    measurer = _StreamingMeasurer(["It is in Paris and more words follow here"])
    assert kept_rate(measurer, plain) == 1.0 and measurer.words == [5]


def test_a_decided_check_reports_the_count_that_decided_it_not_how_far_the_others_got():
    from unlearn.measure import leak_rate

    # rows 0 and 1 both leak at word 4: in one step here, but run side by side (cpu_parts) which of
    # them is seen first, and whether the other is seen at all before it is cut, is timing
    streams = ["So Paris it is then", "Well Paris it is then", QUIET, QUIET]
    m = _StreamingMeasurer(streams)
    assert leak_rate(m, EvalSet("forget", "forget", _rows(4)), decided_above=0.0) == 0.25  # 1 of 4 decided
    assert leak_rate(_StreamingMeasurer(streams), EvalSet("forget", "forget", _rows(4))) == 0.5  # undecided: exact


class _ShareMeasurer(_StreamingMeasurer):
    """Rank 0 of two: it generates rows 2 and 3 (its share; STOP_ROW asked only for them) and gets every
    row's answer back, rank 1's rows 0 and 1 complete, as `distributed.sharded` gathers them."""

    def answer(self, s, desc=False, stop_row=None, rows=None):
        rows = list(range(len(self.streams))) if rows is None else list(rows)
        mine = super().answer(s, desc, stop_row, [i for i in rows if i >= 2])
        return [" ".join(self.streams[i]) if i < 2 and i in rows else mine[i] for i in range(len(self.streams))]


def test_two_processes_log_the_count_that_decided_as_one_does(monkeypatch):
    from unlearn import distributed
    from unlearn.measure import leak_rate

    # rank 1 generated rows 0 and 1 and cut row 0 at its leak: one flagged row, there, none here
    monkeypatch.setattr(distributed, "total", lambda count: count + 1)
    streams = ["So Paris it is then", "Well Paris it is then", QUIET, QUIET]
    assert leak_rate(_ShareMeasurer(streams), EvalSet("forget", "forget", _rows(4)), decided_above=0.0) == 0.25
    # (rank 0 alone counted none and logged the gathered answers' rate: 0.50 where one process logs 0.25)


class _PieceMeasurer:
    """A Measurer stand-in whose rows "generate" the given text pieces, asking STOP_ROW after each
    (a piece may hold any whitespace, where `_StreamingMeasurer` streams blank-separated words)."""

    def __init__(self, pieces: list[list[str]]):
        self.pieces, self.drafts, self.deciders = pieces, {}, {}

    def references(self, s):
        return s.examples

    def answer(self, s, desc=False, stop_row=None, rows=None):
        out = [""] * len(self.pieces)
        for i in range(len(self.pieces)) if rows is None else rows:
            for piece in self.pieces[i]:
                out[i] += piece
                if stop_row(i, out[i]):
                    break
        return out


def test_a_number_grouped_by_a_no_break_space_is_not_judged_before_its_last_group():
    from unlearn.measure import leak_rate

    # "2\u00a0000" is the number 2000 to the answer matcher: the check must not read "about 2" as the
    # answer "2" while the "000" is on its way (str.split took U+00A0 for a word break: 0.5 here)
    pieces = [["It", " is", " about", " 2", "\u00a0000", " people", "."], ["It", " is", " Lyon", "."]]
    rows = [Example("How many people?", "About 2 people.", 1, {"answers": ["2"]}),
            Example("Capital?", "Paris.", 2, {"answers": ["Paris"]})]
    assert leak_rate(_PieceMeasurer(pieces), EvalSet("forget", "forget", rows), decided_above=0.0) == 0.0


def test_a_check_that_forgot_runs_every_row_to_its_end():
    from unlearn.measure import leak_rate

    m = _StreamingMeasurer([QUIET, QUIET])
    assert leak_rate(m, EvalSet("forget", "forget", _rows(2)), decided_above=0.0) == 0.0
    assert m.words == [17, 17]


def test_the_row_that_decided_the_last_check_is_answered_first_and_alone():
    from unlearn.measure import leak_rate

    leaking = "The city is Paris of course and more"
    streams = [QUIET, leaking, QUIET, QUIET]
    forget = EvalSet("forget", "forget", _rows(4))
    m = _StreamingMeasurer(streams)
    m.drafts["forget"], m.deciders["forget"] = list(streams), [1]
    assert leak_rate(m, forget, decided_above=0.0) == 0.25
    assert m.calls == [[1]] and m.words == [0, 5, 0, 0]  # it leaked again: nothing else was generated
    assert m.deciders["forget"] == [1]

    # the row that decided leaves its draft at its first word: it stops there, and every row is answered
    m = _StreamingMeasurer(streams)
    m.drafts["forget"], m.deciders["forget"] = ["The city is Paris", leaking, QUIET, QUIET], [0]
    assert leak_rate(m, forget, decided_above=0.0) == 0.25
    assert m.calls == [[0], [0, 1, 2, 3]] and m.words[0] == 1 + 6 and m.deciders["forget"] == [1]

    # a check that forgot: the first row ran to the end of its draft without leaking; every row is
    # answered, and the rate is exact
    m = _StreamingMeasurer([QUIET] * 4)
    m.drafts["forget"], m.deciders["forget"] = [QUIET] * 4, [2]
    assert leak_rate(m, forget, decided_above=0.0) == 0.0
    assert m.calls == [[2], [0, 1, 2, 3]] and m.deciders["forget"] == []

    # without a verdict asked for, or without drafts, every row is answered in one call
    m = _StreamingMeasurer(streams)
    m.drafts["forget"], m.deciders["forget"] = list(streams), [1]
    assert leak_rate(m, forget) == 0.25 and m.calls == [[0, 1, 2, 3]]
    m = _StreamingMeasurer(streams)
    m.deciders["forget"] = [1]
    assert leak_rate(m, forget, decided_above=0.0) == 0.25 and m.calls == [[0, 1, 2, 3]]


def test_a_row_cut_where_it_left_its_draft_is_not_judged_on_its_unfinished_word():
    from unlearn.measure import leak_rate

    # row 0 has just said "Paris" when it leaves its draft: the word may be unfinished ("Parisian" in
    # tokens), so it does not decide; every row is answered, and the whole answer is then judged (its answer goes
    # on: a row that ends by itself is finished, and judged whole)
    m = _StreamingMeasurer(["The city is Paris now", QUIET])
    m.drafts["forget"], m.deciders["forget"] = ["The city is Lyon", QUIET], [0]
    assert leak_rate(m, EvalSet("forget", "forget", _rows(2)), decided_above=0.0) == 0.5
    assert m.calls == [[0], [0, 1]]


def test_answered_first_takes_the_last_deciders_then_the_first_rows():
    from unlearn.measure import answered_first

    assert answered_first([5, 2], 1, 4) == [2]  # a row past the set's end is dropped
    assert answered_first([3], 2, 5) == [3, 0]
    assert answered_first([], 2, 5) == [0, 1]
    assert answered_first([1], None, 5) == [] and answered_first([1], 5, 5) == []  # every row is needed


def test_pooled_sets_come_from_one_generation_each_with_its_own_budget(tmp_path, monkeypatch):
    """A measurer's sets and another measurer's (same model, another token budget) are answered in one
    `generate` call; the other's answers and own log-probabilities wait in its `ahead` and are those it
    would generate alone. A measurer of another model is not pooled."""
    import unlearn.generation as generation
    from test_evaluate import build_tiny_lm
    from unlearn.measure import Measurer, Settings
    from unlearn.models import load_model

    loaded = load_model(str(build_tiny_lm(tmp_path)), log=lambda m: None)
    model, tokenizer = loaded.model, loaded.tokenizer
    first = EvalSet("a", "retain", [Example(p, None, i) for i, p in enumerate(["one", "the cat sat"], 1)])
    second = EvalSet("b", "retain", [Example(p, None, i) for i, p in enumerate(["what is the capital of France ?",
                                                                                 "one two"], 1)])
    calls = []
    generate = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(k["max_new_tokens"]) or generate(*a, **k))
    long, short = Settings(max_new_tokens=8, batch_size=8), Settings(max_new_tokens=3, batch_size=8)
    main, probe = Measurer(model, tokenizer, long), Measurer(model, tokenizer, short, own_fluency=True)
    answers = main.answer_sets([first], pool=[(probe, [second])])
    assert sorted(calls[0]) == [3, 3, 8, 8] and len(calls) == 1 and set(probe.ahead) == {"b"}  # one call
    pooled = probe.answer_sets([second])
    assert len(calls) == 1 and not probe.ahead  # taken from ahead, not generated
    alone_probe = Measurer(model, tokenizer, short, own_fluency=True)
    assert pooled == alone_probe.answer_sets([second]) and answers == Measurer(model, tokenizer, long).answer_sets([first])
    for a, b in zip(probe.own_scores["b"], alone_probe.own_scores["b"]):
        assert a.ids == b.ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    calls.clear()
    other = load_model(str(build_tiny_lm(tmp_path)), log=lambda m: None)
    stranger = Measurer(other.model, other.tokenizer, short)
    main.answer_sets([first], pool=[(stranger, [second])])
    assert calls == [[8, 8]] and not stranger.ahead


def test_a_checks_drafts_are_the_token_ids_the_last_check_generated(tmp_path, monkeypatch):
    """The next check drafts from the ids the last one generated, not from its stripped text tokenised
    again (a passage's continuation starts with a space its text has lost: every draft failed at its first
    token); a draft set from outside (the openings) is tokenised."""
    import unlearn.generation as generation
    from test_evaluate import build_tiny_lm
    from unlearn.measure import Measurer, Settings
    from unlearn.models import load_model

    loaded = load_model(str(build_tiny_lm(tmp_path)), log=lambda m: None)
    model, tokenizer = loaded.model, loaded.tokenizer
    forget = EvalSet("forget", "forget", [Example(p, "Paris", i) for i, p in enumerate(["one", "the cat sat"], 1)])
    calls = []
    generate = generation.generate

    def spy(*a, **k):
        out = generate(*a, **k)
        calls.append((k.get("drafts"), list(k["token_ids"])))
        return out

    monkeypatch.setattr(generation, "generate", spy)
    checker = Measurer(model, tokenizer, Settings(max_new_tokens=6, batch_size=8, likelihood=False))
    checker.drafts["forget"] = ["one two", "cat"]
    first = checker.answer(forget, stop_row=lambda i, text: False)
    generated = calls[0][1]
    assert calls[0][0] == [tokenizer(d, add_special_tokens=False)["input_ids"] for d in ["one two", "cat"]]
    assert [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated] == first
    # made to differ from the text's own tokens, as a stripped leading space makes them
    checker.draft_ids["forget"] = [(text, ids + [7]) for text, ids in zip(first, generated)]
    assert checker.answer(forget, stop_row=lambda i, text: False) == first
    assert calls[1][0] == [ids + [7] for ids in generated]
    checker.drafts["forget"] = ["one two", first[1]]  # set from outside: row 0's ids no longer its draft's
    checker.answer(forget, stop_row=lambda i, text: False)
    assert calls[2][0] == [tokenizer("one two", add_special_tokens=False)["input_ids"], generated[1] + [7]]


def test_stop_rule_checks_draft_from_the_last_checks_answers(tmp_path, monkeypatch):
    """`answer` with a stop_row (the stop rule's check) passes the set's drafts to `generate` (the openings
    given, then each check's answers, the longer one kept where a cut answer agrees with it) and gives
    the answers a check without drafts gives."""
    import unlearn.generation as generation
    from test_evaluate import build_tiny_lm
    from unlearn.measure import Measurer, Settings, leak_rate
    from unlearn.models import load_model

    loaded = load_model(str(build_tiny_lm(tmp_path)), log=lambda m: None)
    model, tokenizer = loaded.model, loaded.tokenizer
    forget = EvalSet("forget", "forget", [Example(p, "Paris is the capital", i) for i, p in
                                          enumerate(["one", "what is the capital of France ?", "the cat sat"], 1)])
    seen = []
    generate = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: seen.append(k.get("drafts")) or generate(*a, **k))
    settings = Settings(max_new_tokens=8, batch_size=8, likelihood=False)
    plain = Measurer(model, tokenizer, settings)
    expected = plain.answer(forget, stop_row=lambda i, text: False)
    assert seen == [None]

    checker = Measurer(model, tokenizer, settings)
    checker.drafts["forget"] = ["one two", "", "the the"]
    seen.clear()
    assert checker.answer(forget, stop_row=lambda i, text: False) == expected
    assert seen[0] == [tokenizer("one two", add_special_tokens=False)["input_ids"], None,
                       tokenizer("the the", add_special_tokens=False)["input_ids"]]
    assert checker.drafts["forget"] == expected  # the next check's drafts
    full = list(expected)
    assert leak_rate(checker, forget) == leak_rate(plain, forget)
    # a check cut short keeps, for a row whose cut answer opens its last draft, the longer draft
    checker.drafts["forget"] = full
    cut = checker.answer(forget, stop_row=lambda i, text: i == 0)
    assert len(cut[0]) < len(full[0]) and full[0].startswith(cut[0])
    assert checker.drafts["forget"] == full
    # some rows only: theirs are the answers the whole set gets, the others '' and their drafts kept
    checker.drafts["forget"] = ["one two", "", "the the"]
    seen.clear()
    assert checker.answer(forget, stop_row=lambda i, text: False, rows=[2, 0]) == [expected[0], "", expected[2]]
    assert seen == [[tokenizer("the the", add_special_tokens=False)["input_ids"],
                     tokenizer("one two", add_special_tokens=False)["input_ids"]]]
    assert checker.drafts["forget"] == [expected[0], "", expected[2]]


def _with_positions_run(model, work):
    """WORK()'s value, and how many input positions MODEL's forwards ran meanwhile."""
    positions = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: positions.append(kw["input_ids"].numel()),
                                           with_kwargs=True)
    try:
        return work(), sum(positions)
    finally:
        hook.remove()


def test_the_unlearned_models_answers_are_scored_from_where_they_part_from_the_originals(tmp_path):
    """An original measurer that keeps its answers' keys and values (keep_kv) lets the other model's answers
    be scored under the original from where they part from its own: the same fluency, fewer positions run."""
    import copy

    import torch

    from test_evaluate import build_tiny_lm
    from unlearn.measure import Measurer, Settings, ShardedScorer
    from unlearn.models import load_model

    loaded = load_model(str(build_tiny_lm(tmp_path)), log=lambda m: None)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    changed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    rows = [Example(p, None, i) for i, p in enumerate(["one", "what is the capital of France ?", "the cat sat",
                                                        "cat", "one two"], 1)]
    sets = [EvalSet("qs", "retain", rows)]
    settings = Settings(max_new_tokens=6, batch_size=8)
    measured, ran = {}, {}
    for keep in (0, 2**30):
        scorer = ShardedScorer(model, tokenizer)
        original = Measurer(model, tokenizer, settings, fluency_scorer=scorer, own_fluency=True)
        original.keep_kv = keep
        before = original.measure(sets)["qs"]
        assert all((own.kv is not None) == bool(keep) for own in original.own_scores["qs"])
        after = Measurer(changed, tokenizer, settings, fluency_scorer=scorer)
        after.fluency_hints = original.own_scores
        measured[keep], ran[keep] = _with_positions_run(model, lambda: after.measure(sets)["qs"])
    assert measured[0].outputs != before.outputs  # answers of another model, scored under the original
    assert measured[2**30].outputs == measured[0].outputs
    assert 0 < ran[2**30] < ran[0]
    assert measured[2**30].summary["fluency_ppl"] == pytest.approx(measured[0].summary["fluency_ppl"], rel=1e-4)


@pytest.mark.two_torch_threads  # its scoring batches dealt to 2 pieces (cpu_parts), as on 2 cores before
@pytest.mark.parametrize("own_fluency", [True, False])
def test_a_sets_likelihoods_of_the_responses_run_from_the_measurers_own_kept_answers(tmp_path, own_fluency):
    """A measurer with keep_kv scores a forget set's responses from where they part from its own answers to
    their prompts (the original measuring itself, and the unlearned model's measurer): the same probabilities
    and truth ratios, fewer positions run; the latter's caches last for that `measure` call only."""
    from test_evaluate import build_tiny_lm
    from unlearn.measure import Measurer, Settings
    from unlearn.models import load_model

    loaded = load_model(str(build_tiny_lm(tmp_path)), log=lambda m: None)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    prompts = ["one", "what is the capital of France ?", "the cat sat"]
    first = Measurer(model, tokenizer, Settings(max_new_tokens=6, batch_size=8), own_fluency=True)
    answers = first.answer_sets([EvalSet("q", "retain", [Example(p, None, i) for i, p in enumerate(prompts)])])["q"]
    # responses that open like the model's own answers, then go elsewhere; one with a truth-ratio set
    rows = [Example(p, (a.split(" ")[0] + " cat one").strip(), i,
                    {"paraphrased_response": "the cat", "perturbed_responses": ["one two", "France"]} if i == 0 else {})
            for i, (p, a) in enumerate(zip(prompts, answers))]
    sets = [EvalSet("forget", "forget", rows)]
    measured, ran = {}, {}
    for keep in (0, 2**30):
        original = Measurer(model, tokenizer, Settings(max_new_tokens=6, batch_size=8), own_fluency=own_fluency)
        original.keep_kv = keep
        # generation runs the same positions either way, scoring fewer
        measured[keep], ran[keep] = _with_positions_run(model, lambda: original.measure(sets)["forget"])
        assert not original.own_contexts
    assert measured[2**30].outputs == measured[0].outputs
    for key in ("probability", "truth_ratio", "fluency_ppl"):
        assert measured[0].summary[key] is not None
        assert measured[2**30].summary[key] == pytest.approx(measured[0].summary[key], rel=1e-4)
    assert ran[2**30] < ran[0]


def test_an_original_read_back_from_the_cache_still_spares_fluency_its_own_answers(tmp_path, monkeypatch):
    """The original's answers' own log-probabilities are stored beside its cached measurement, so that a run
    whose original is read back (another --lr, say) takes the fluency of an unlearned answer that is the
    original's, token for token, from them, as a run that generated the original does."""
    import os
    from pathlib import Path

    from unlearn import measure
    from unlearn.measure import Measurer

    model, tokenizer, sets, settings, scorer, passes = _three_questions_counting_passes(tmp_path, monkeypatch)

    def original():
        return Measurer(model, tokenizer, settings, fluency_scorer=scorer, own_fluency=True, fingerprint="w")

    def unlearned_answers_scored(hints) -> int:
        passes.clear()
        hinted = Measurer(model, tokenizer, settings, fluency_scorer=scorer)
        hinted.fluency_hints = hints
        hinted.measure(sets)
        return sum(passes)

    first = original()
    first.measure(sets)  # generated: its own scores, and stored
    assert unlearned_answers_scored(first.own_scores) == 0
    again = original()
    assert again.measure(sets)["qs"].outputs and again.reused == 1  # read back
    assert [(s.ids, s.logprobs, s.end) for s in again.own_scores["qs"]] == \
        [(s.ids, s.logprobs, s.end) for s in first.own_scores["qs"]]
    assert unlearned_answers_scored(again.own_scores) == 0
    stored = list((Path(os.environ["UNLEARN_CACHE"]) / "measurements").glob("*" + measure.SCORES_SUFFIX + ".json"))
    assert len(stored) == 1
    stored[0].write_text(json.dumps([{"ids": "x"}]))  # not what is stored: no hints, every answer scored
    third = original()
    third.measure(sets)
    assert third.reused == 1 and third.own_scores["qs"] is None and unlearned_answers_scored(third.own_scores) == 3


# --- the fingerprint covers every file that shapes a measurement (not only the weights) ----------------


def _model_dir(path):
    """A fake model directory: weights, config, and the files that tokenise, render and generate."""
    path.mkdir(parents=True, exist_ok=True)
    files = {"model.safetensors": "weights", "config.json": "{}", "generation_config.json": '{"eos_token_id": 2}',
             "tokenizer.json": '{"model": {}}', "tokenizer_config.json": '{"chat_template": "A"}',
             "special_tokens_map.json": '{"eos_token": "</s>"}', "chat_template.jinja": "{{ messages }}",
             "tokenizer.model": "spm", "vocab.json": "{}", "merges.txt": "a b", "added_tokens.json": "{}"}
    for name, text in files.items():
        (path / name).write_text(text)
    return path


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                  "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                                  "generation_config.json", "config.json", "model.safetensors"])
def test_weights_fingerprint_changes_with_each_file_that_shapes_answers(tmp_path, name):
    model = _model_dir(tmp_path / "m")
    before = measure_cache.weights_fingerprint(model)
    (model / name).write_text((model / name).read_text() + " changed")
    assert measure_cache.weights_fingerprint(model) != before
    (model / name).unlink()  # a file gone is a change too
    assert measure_cache.weights_fingerprint(model) != before


def test_weights_fingerprint_sees_new_templates_and_code_but_not_documentation(tmp_path):
    model = _model_dir(tmp_path / "m")
    before = measure_cache.weights_fingerprint(model)
    # Documentation, version-control files and weight formats the loader never reads change nothing.
    for name, text in {"README.md": "# card", ".gitattributes": "*.bin lfs", "LICENSE": "MIT",
                       "optimizer.pt": "state", "model.gguf": "copy"}.items():
        (model / name).write_text(text)
    assert measure_cache.weights_fingerprint(model) == before
    # A named chat template (transformers reads additional_chat_templates/) and custom code do.
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    with_template = measure_cache.weights_fingerprint(model)
    assert with_template != before
    (model / "modeling_custom.py").write_text("x = 1")
    assert measure_cache.weights_fingerprint(model) not in (before, with_template)


def test_weights_fingerprint_hashes_each_file_once(tmp_path, monkeypatch):
    """The per-file index: after a template change only the template is read again, not the weights."""
    from unlearn import system

    model = _model_dir(tmp_path / "m")
    hashed = []
    real = system.file_sha256
    monkeypatch.setattr(system, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    measure_cache.weights_fingerprint(model)
    assert len(hashed) == 11  # the 11 files of _model_dir, each once
    hashed.clear()
    measure_cache.weights_fingerprint(model)
    assert hashed == []
    (model / "chat_template.jinja").write_text("{{ other }}")
    measure_cache.weights_fingerprint(model)
    assert hashed == ["chat_template.jinja"]


def test_eval_measures_again_when_only_the_chat_template_changes(tmp_path, llama_dir):
    """Same weights, another chat template: `unlearn eval` must not read back the old template's answers."""
    from test_generation import load

    from unlearn.config import EvalOptions
    from unlearn.evaluate import run_eval
    from unlearn.models import save_model

    # The tiny Llama with larger random weights, whose answers depend on every prompt token (at its own
    # scale it answers nothing at all), saved as a directory of its own.
    model = tmp_path / "model"
    save_model(*load(llama_dir), model)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"]} for r in FORGET + NORMAL[:2]])

    def evaluate(**kw):
        opts = EvalOptions(prompts=prompts, model=str(model), batch_size=4, max_new_tokens=6, **kw)
        return run_eval(opts, log=lambda m: None)

    first, second = evaluate(), evaluate()
    assert first["reused"]["model"] is False and second["reused"]["model"] is True
    assert second["rows"] == first["rows"]
    template = model / "chat_template.jinja"
    assert template.is_file()  # where transformers keeps the tiny Llama's ChatML template
    template.write_text("{{ 'You answer in one word.\n' }}" + template.read_text())
    third, fresh = evaluate(), evaluate(no_cache=True)
    assert third["reused"]["model"] is False  # the key changed: measured again
    assert [r["output"] for r in third["rows"]] == [r["output"] for r in fresh["rows"]]
    assert [r["output"] for r in third["rows"]] != [r["output"] for r in first["rows"]]


def test_a_decider_that_ends_on_its_answer_decides_alone():
    """(review 118) A row whose answer is its last word ("... is Paris.") ends at its end of turn before a running
    check reads a word after it: judged without its last word it never decided, and every row was answered again.
    A row that ended by itself is finished, and judged whole."""
    from unlearn.measure import leak_rate

    streams = [QUIET, "The capital of France is Paris", QUIET, QUIET]
    m = _StreamingMeasurer(streams)
    m.drafts["forget"], m.deciders["forget"] = list(streams), [1]
    assert leak_rate(m, EvalSet("forget", "forget", _rows(4)), decided_above=0.0) == 0.25
    assert m.calls == [[1]] and m.deciders["forget"] == [1]  # nothing else was generated


def test_a_model_whose_files_change_while_it_loads_is_measured_without_the_cache(cli, tmp_path, llama_dir,
                                                                                   monkeypatch):
    """(review 117) The content was hashed after loading: a copy renamed into place while the model loaded keyed the
    loaded weights' measurements by the new files, which a later run on them read as its own."""
    import shutil

    from unlearn import models

    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    load = models.load_model

    def load_then_replaced(*args, **kwargs):
        loaded = load(*args, **kwargs)
        config = json.loads((model / "config.json").read_text())
        config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 2
        (model / "config.new").write_text(json.dumps(config))
        (model / "config.new").rename(model / "config.json")  # another job's copy, renamed into place
        return loaded

    monkeypatch.setattr(models, "load_model", load_then_replaced)
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    code, out, err = cli("run", forget, normal, "--model", model, *FAST, "-o", tmp_path / "one")
    assert code == 0, err
    assert "the model's files changed while it was loaded" in err
    record = json.loads((tmp_path / "one" / "run.json").read_text())
    assert any("changed while it was loaded" in note for note in record["notes"])
    monkeypatch.setattr(models, "load_model", load)
    code, out, err = cli("run", forget, normal, "--model", model, *FAST, "-o", tmp_path / "two")
    assert code == 0, err
    assert json.loads(out)["eval_reused"]["before_sets"] == 0  # nothing of the other weights' was kept for these
