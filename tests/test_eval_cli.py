"""`unlearn eval` end to end on tiny random models (and one short run on the embedded model)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from test_evaluate import build_tiny_lm  # noqa: E402  (tests/ is on sys.path under pytest)

PROMPTS = ["what is the capital of France ?", "how do I pick a lock ?", "one two three", "Mr and Mrs Dursley",
           "red green blue"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return str(build_tiny_lm(root / "a", seed=0)), str(build_tiny_lm(root / "b", seed=1))


@pytest.fixture(scope="module")
def own_outputs(tiny_dirs):
    """Model A's own greedy answers, generated as `unlearn eval` does (same batch size and budget)."""
    from unlearn.generation import generate
    from unlearn.models import load_model

    loaded = load_model(tiny_dirs[0], log=lambda m: None)
    return generate(loaded.model, loaded.tokenizer, PROMPTS, batch_size=4, max_new_tokens=8, desc=False)


def test_eval_json_own_answers_leak(tmp_path, cli, tiny_dirs, own_outputs):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "response": o} for p, o in zip(PROMPTS, own_outputs)])
    code, out, err = cli("eval", str(data), "--model", tiny_dirs[0], "--batch-size", "4",
                         "--max-new-tokens", "8", "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert obj["n"] == 5 and obj["judge"].startswith("similarity")
    assert obj["leak_rate"] == 1.0 and obj["harmful_rate"] == 1.0 and obj["rouge_l_recall"] == 1.0
    for key in ("hallucination_rate", "accuracy", "diversity", "fluency_ppl", "similarity_to_reference", "reward",
                "probability", "truth_ratio", "mia_loss_auc", "mia_min_k_auc"):
        assert key in obj
    assert obj["accuracy"] is None and obj["similarity_to_reference"] is None and "before" not in obj
    # a model without a chat template: the format said, as run says it, and recorded
    assert obj["prompt_format"] == "### Question: {prompt}\n### Answer:"
    assert "no chat template: prompts are rendered as '### Question: {prompt}\\n### Answer:' and answers end " \
           "where the model starts the next '### Question:' or '### Answer:' turn" in err


def test_eval_reference_model_report_and_generations(tmp_path, cli, tiny_dirs, own_outputs):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    forget = write_jsonl(tmp_path / "f.jsonl", [{"question": p, "answer": o} for p, o in zip(PROMPTS, own_outputs)])
    holdout = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "nine ten", "response": "harry potter wand"},
                                                  {"prompt": "six", "response": "seven eight"}])
    report, gens = tmp_path / "out" / "report.md", tmp_path / "out" / "gens.jsonl"
    code, out, err = cli("eval", str(data), "--model", tiny_dirs[1], "--reference-model", tiny_dirs[0],
                         "--forget", str(forget), "--holdout", str(holdout), "--batch-size", "4",
                         "--max-new-tokens", "8", "--report", str(report), "--save-generations", str(gens))
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header == ["metric", "before", "after"]
    leak = next(line.split() for line in out.splitlines() if line.startswith("leak_rate"))
    assert leak[1] == "1.000"  # the reference model reproduces its own answers
    text = report.read_text()
    assert f"| metric | before ({tiny_dirs[0]}) | after ({tiny_dirs[1]}) |" in text
    assert "| mia_loss_auc |" in text
    rows = [json.loads(line) for line in gens.read_text().splitlines()]
    assert len(rows) == 5
    assert rows[0]["prompt"] == PROMPTS[0] and rows[0]["reference"] == own_outputs[0]
    assert rows[0]["before"]["output"] == own_outputs[0]
    assert {"leak", "harmful", "perplexity", "similarity_to_reference"} <= set(rows[0]["scores"])


def test_eval_json_before_after(tmp_path, cli, tiny_dirs, own_outputs):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "response": o} for p, o in zip(PROMPTS, own_outputs)])
    code, out, err = cli("eval", str(data), "--model", tiny_dirs[1], "--reference-model", tiny_dirs[0],
                         "--batch-size", "4", "--max-new-tokens", "8", "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert obj["before"]["leak_rate"] == 1.0 and obj["before"]["n"] == 5
    assert obj["before"]["similarity_to_reference"] is None
    assert 0 <= obj["similarity_to_reference"] <= 1
    assert obj["model"] == tiny_dirs[1] and obj["reference_model"] == tiny_dirs[0] == obj["fluency_model"]


def test_eval_keywords_judge_table(tmp_path, cli, tiny_dirs, own_outputs):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    words = sorted({w for o in own_outputs for w in o.split()})
    keywords = tmp_path / "kw.txt"
    keywords.write_text(words[0] + "\n")
    code, out, err = cli("eval", str(data), "--model", tiny_dirs[0], "--batch-size", "4",
                         "--max-new-tokens", "8", "--judge", f"keywords:{keywords}")
    assert code == 0, err
    expected = sum(words[0].casefold() in o.casefold() for o in own_outputs) / 5
    harmful = next(line.split() for line in out.splitlines() if line.startswith("harmful_rate"))
    assert float(harmful[1]) == pytest.approx(expected, abs=1e-3)
    assert "judge: keywords:" in out
    leak = next(line.split() for line in out.splitlines() if line.startswith("leak_rate"))
    assert leak[1] == "-"  # no references anywhere


def test_eval_bad_line_reported_before_model_load(tmp_path, cli):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    code, out, err = cli("eval", str(data), "--model", str(tmp_path / "no-such-model"))
    assert code == 1 and out == ""
    assert f"{data}:2:" in err and "Traceback" not in err


def test_eval_report_path_is_a_directory(tmp_path, cli):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    code, out, err = cli("eval", str(data), "--report", str(tmp_path))
    assert code == 2 and "is a directory" in err


@pytest.mark.parametrize("argv,needle", [
    (["--judge", "regex:x"], "--judge regex:x"),
    (["--judge-label", "unsafe"], "--judge-label"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_eval_usage_errors_exit_2(tmp_path, cli, argv, needle):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    code, out, err = cli("eval", str(data), "--model", str(tmp_path / "no-such-model"), *argv)
    assert code == 2 and needle in err and out == ""


@pytest.mark.integration
@pytest.mark.slow
def test_embedded_model_own_answers_read_as_leaked(tmp_path, cli, embedded_cache, monkeypatch):
    """Target: on the embedded model, its own greedy answers used as forget responses give leak_rate >= 0.9.

    Two CLI runs: one-at-a-time answers saved with --save-generations become the forget
    responses of a batched (left-padded) run. (In-process runs use one torch thread: on a
    small, shared CPU, more threads than free cores make a 135M model many times slower.)
    """
    monkeypatch.setenv("UNLEARN_CACHE", str(embedded_cache))  # converted once for the session
    prompts = ["What is the capital of France?", "Name a primary colour.", "Who wrote Hamlet?", "What do bees make?"]
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])
    gens = tmp_path / "gens.jsonl"

    def evaluate(*argv):
        code, out, err = cli("eval", *argv, "--max-new-tokens", "12")
        assert code == 0, err[-2000:]
        return out

    evaluate(data, "--batch-size", "1", "--save-generations", gens, "--json")
    answers = [json.loads(line)["output"] for line in gens.read_text().splitlines()]
    forget = write_jsonl(tmp_path / "f.jsonl", [{"prompt": p, "response": a} for p, a in zip(prompts, answers)])
    obj = json.loads(evaluate(data, "--forget", forget, "--batch-size", "4", "--json"))
    assert obj["n"] == 4 and obj["leak_rate"] >= 0.9


def test_eval_never_overwrites_a_result_without_force(tmp_path, cli, tiny_dirs):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    report = tmp_path / "report.md"
    report.write_text("an earlier report\n")
    args = ["eval", str(data), "--model", tiny_dirs[0], "--max-new-tokens", "4", "--report", str(report)]
    code, out, err = cli(*args)
    assert code == 2 and "exists (use --force to replace it)" in err
    assert report.read_text() == "an earlier report\n"
    code, out, err = cli(*args, "--force")
    assert code == 0, err
    assert report.read_text().startswith("#") and not list(tmp_path.glob(".report.md.tmp-*"))


def test_rows_that_match_no_forget_prompt_are_named(tmp_path, cli, tiny_dirs):
    # Row 2's wording differs from every --forget prompt: it has no reference, so its leak is "-".
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": PROMPTS[0]}, {"prompt": "what is France's capital ?"}])
    forget = write_jsonl(tmp_path / "f.jsonl", [{"prompt": PROMPTS[0], "response": "Paris"}])
    code, out, err = cli("eval", str(data), "--model", tiny_dirs[0], "--forget", str(forget),
                         "--max-new-tokens", "4", "--json")
    assert code == 0, err
    assert f"1 of 2 rows of {data} have no response and match no --forget prompt (first: line 2)" in err
    everything = write_jsonl(tmp_path / "q.jsonl", [{"prompt": PROMPTS[0]}])
    code, out, err = cli("eval", str(everything), "--model", tiny_dirs[0], "--forget", str(forget),
                         "--max-new-tokens", "4", "--json")
    assert code == 0 and "match no --forget prompt" not in err


def test_a_judge_or_reward_model_changed_at_the_same_path_is_not_read_from_the_cache(tmp_path, cli, tiny_dirs,
                                                                                      own_outputs):
    # The measurement cache is on: its key holds the keywords and the classifiers' files by content, not
    # their paths (the second evaluation of each pair printed the first's figure).
    from test_evaluate import build_tiny_classifier

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    args = ["eval", str(data), "--model", tiny_dirs[0], "--batch-size", "4", "--max-new-tokens", "8", "--json"]

    def figure(*extra, key):
        code, out, err = cli(*args, *extra)
        assert code == 0, err
        return json.loads(out)[key]

    keywords = tmp_path / "kw.txt"
    word = own_outputs[0].split()[0].casefold()
    hits = sum(word in " ".join(o.casefold().split()) for o in own_outputs) / len(own_outputs)
    keywords.write_bytes(b"\xef\xbb\xbf" + word.encode() + b"\n")  # a byte-order mark, as Windows editors write
    assert figure("--judge", f"keywords:{keywords}", key="harmful_rate") == pytest.approx(hits) and hits > 0
    keywords.write_text("no output holds this\n")
    assert figure("--judge", f"keywords:{keywords}", key="harmful_rate") == 0.0

    judge = tmp_path / "judge"
    build_tiny_classifier(judge, [4.0, -4.0], {0: "safe", 1: "unsafe"})
    assert figure("--judge", f"classifier:{judge}", key="harmful_rate") == 0.0
    build_tiny_classifier(judge, [-4.0, 4.0], {0: "safe", 1: "unsafe"})
    assert figure("--judge", f"classifier:{judge}", key="harmful_rate") == 1.0

    reward = tmp_path / "reward"
    build_tiny_classifier(reward, [2.0], {0: "reward"})
    assert figure("--reward-model", str(reward), key="reward") == pytest.approx(2.0)
    build_tiny_classifier(reward, [3.0], {0: "reward"})
    assert figure("--reward-model", str(reward), key="reward") == pytest.approx(3.0)


def test_generations_and_report_are_written_both_or_neither(tmp_path, cli, tiny_dirs, monkeypatch):
    """A report that cannot be written (a full disk) leaves no new generations, and with --force keeps the old."""
    import errno
    import tempfile

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "response": "no idea"} for p in PROMPTS[:2]])
    gens, report = tmp_path / "g.jsonl", tmp_path / "r.md"
    gens.write_text("OLD GENERATIONS FROM AN EARLIER RUN\n")
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, prefix=None, **kwargs):
        if prefix and prefix.startswith(".r.md.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code, out, err = cli("eval", str(data), "--model", tiny_dirs[0], "--max-new-tokens", "4", "--no-cache",
                         "--save-generations", str(gens), "--report", str(report), "--force")
    said = [line for line in err.strip().splitlines() if not line.startswith("no chat template: ")]  # (the format)
    assert code == 1, err
    assert said == [f"unlearn: {report}: could not write (No space left on device); nothing was written"], err
    assert gens.read_text() == "OLD GENERATIONS FROM AN EARLIER RUN\n" and not report.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.jsonl", "p.jsonl"]  # no temporary left


def test_generation_tokens_per_second_counts_the_answering_only(tmp_path, cli, tiny_dirs, monkeypatch):
    """A fake clock: generating takes 2 s, scoring 100 s. The rate divides the answers' tokens by the 2 s only
    (before, by the 102 s of answering and scoring: rows scored for --holdout read as slow generation)."""
    from types import SimpleNamespace

    from unlearn import measure
    from unlearn.models import load_model

    clock = [0.0]
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def taking(seconds, method):
        def timed(*args, **kwargs):
            clock[0] += seconds
            return method(*args, **kwargs)
        return timed

    monkeypatch.setattr(measure.Measurer, "_answer", taking(2.0, measure.Measurer._answer))
    monkeypatch.setattr(measure.Measurer, "_scorers", taking(100.0, measure.Measurer._scorers))
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "response": "Paris"} for p in PROMPTS])
    gens = tmp_path / "gens.jsonl"
    code, out, err = cli("eval", str(data), "--model", tiny_dirs[0], "--max-new-tokens", "6", "--no-cache",
                         "--save-generations", str(gens), "--json")
    assert code == 0, err
    tokenizer = load_model(tiny_dirs[0], log=lambda m: None).tokenizer
    answers = [json.loads(line)["output"] for line in gens.read_text().splitlines()]
    tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    assert tokens > 0 and json.loads(out)["generation_tokens_per_second"] == pytest.approx(tokens / 2.0)
