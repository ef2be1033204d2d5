"""ULMR: augmentation filters and fallbacks, α selection (rule, pooling, table), in-memory averaging, and the CLI."""

import json

import pytest
import torch

from unlearn import averaging as sel
from unlearn import tables
from unlearn import augment as aug
from unlearn.data import Example
from unlearn.errors import UnlearnError, UsageError

SOURCE = Example("Who wrote the Harry Potter books?", "J.K. Rowling wrote them.", 1, {"answers": ["Rowling"]})
LONG = Example("Where does Harry study?", "Harry Potter studies magic at Hogwarts School in Scotland.", 2, {})


# --- augmentation: cleaning and filtering --------------------------------------------------


def test_clean_rewrite_drops_labels_quotes_and_later_lines():
    assert aug.clean_rewrite('Rewritten instruction: "Who is the author of Harry Potter?"\nSure!') == \
        "Who is the author of Harry Potter?"
    assert aug.clean_rewrite("  \n Question: Name the writer of Harry Potter.") == "Name the writer of Harry Potter."
    assert aug.clean_rewrite("") == ""


@pytest.mark.parametrize("rewrite, reason", [
    ("", "empty"),
    ("who wrote the Harry Potter books", "same as the original"),  # case and punctuation do not count
    ("Who created Harry Potter, J.K. Rowling?", "contains the answer"),
    ("Harry Potter?", "not an instruction"),  # fewer than 3 words
    ("Sure, here is a new question about the books.", "not an instruction"),
    ("The Harry Potter books were written by someone.", "not an instruction"),  # a statement
    ("Please rewrite the instruction about Harry Potter books.", "talks about the rewriting"),
    ("What is the capital of France?", "off topic"),  # shares no content word with the original
    ("Who is the author of the Harry Potter novels?", None),
    ("Name the writer of the Harry Potter series.", None),  # imperative, no question mark
])
def test_rewrite_problem(rewrite, reason):
    assert aug.rewrite_problem(rewrite, SOURCE, set()) == reason


def test_rewrite_problem_duplicate_and_leak_without_answers():
    seen = {aug._normalise("Who is the author of the Harry Potter novels?")}
    assert aug.rewrite_problem("Who is the author of the Harry Potter novels ?", SOURCE, seen) == "duplicate"
    # Without `answers`, a leak is the response's words (ROUGE-L recall >= 0.5).
    assert aug.rewrite_problem("Does Harry Potter study magic at Hogwarts School in Scotland?", LONG, set()) == \
        "contains the answer"


def test_clean_response_cuts_at_the_last_full_sentence():
    assert aug.clean_response("I don't know.  That is not in my   knowledge base. It was") == \
        "I don't know. That is not in my knowledge base."
    assert aug.clean_response("no sentence end") == "no sentence end"


@pytest.mark.parametrize("response, reason", [
    ("", "empty"),
    ("I can't.", "too short"),
    ("Who wrote the Harry Potter books?", "repeats the instruction"),
    ("I believe it was Rowling, sorry.", "contains the answer"),
    ("I'm sorry, I don't have that information.", None),
])
def test_response_problem(response, reason):
    assert aug.response_problem(response, SOURCE.prompt, SOURCE) == reason


def test_augment_filters_falls_back_counts_and_keeps_provenance(monkeypatch):
    """Scripted generations: 2 rewrites wanted, OVERSAMPLE=2 candidates each, so 4 candidates per source."""
    calls = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        calls.append((prompts, kwargs))
        if len(calls) == 1:  # rewrite candidates: source 1 gets one good, source 2 none
            assert all(p.startswith("Please rewrite the provided instruction") for p in prompts)
            assert kwargs["do_sample"] is True
            return ["Who is the author of the Harry Potter novels?", "Who created Harry Potter? Rowling",
                    "", "Sure, here you go"] + ["", "", "", ""]
        assert all(p.startswith("Please generate a response based on the Instruction") for p in prompts)
        return ["I do not know who wrote them.", "It was J.K. Rowling.", "I cannot say, sorry.",
                "That is not in my knowledge base.", "", "I have no idea about that."]

    monkeypatch.setattr("unlearn.generation.generate", fake_generate)
    rows, stats = aug.augment(None, None, [SOURCE, LONG], rewrites=2, seed=3)
    # originals first, then each source's rewrites: 1 generated + 1 templated, then 2 templated
    assert [r["kind"] for r in rows] == ["original", "rewrite", "rewrite"] * 2
    assert [r["prompt_from"] for r in rows] == ["original", "model", "template", "original", "template", "template"]
    assert rows[1]["prompt"] == "Who is the author of the Harry Potter novels?"
    assert rows[2]["prompt"].endswith(SOURCE.prompt) and rows[4]["prompt"].endswith(LONG.prompt)
    assert stats.rewrite_fallbacks == 3 and stats.rewrite_candidates == 8 and stats.rewrites_wanted == 4
    assert stats.rewrites_rejected == {"contains the answer": 1, "empty": 5, "not an instruction": 1}
    # the second response leaks "Rowling", the fifth is empty: both templated, and counted
    assert [r["response_from"] for r in rows] == ["model", "template", "model", "model", "template", "model"]
    assert rows[1]["response"] in aug.TEMPLATE_REFUSALS and rows[4]["response"] in aug.TEMPLATE_REFUSALS
    assert stats.response_fallbacks == 2 and stats.responses_rejected == {"contains the answer": 1, "empty": 1}
    assert all(r["source_prompt"] == SOURCE.prompt and r["source_line"] == 1 for r in rows[:3])
    assert rows[0]["answers"] == ["Rowling"] and "answers" not in rows[3]
    assert stats.rows == 6 and stats.sources == 2


def test_augment_refuses_passages():
    from unlearn.data import Passage

    with pytest.raises(UnlearnError, match="line 4"):
        aug.augment(None, None, [Example(Passage("Once upon"), " a time", 4, {})])


# --- α selection ----------------------------------------------------------------------------


def test_parse_alphas():
    assert sel.parse_alphas("0.5") == [0.5]
    assert sel.parse_alphas(" 0.2, 0.4,0.6 ") == [0.2, 0.4, 0.6]
    assert sel.parse_alphas("auto", allow_auto=True) == "auto"
    for bad, message in (("auto", "not a number"), ("0.2,x", "'x'"), ("1.5", "between 0 and 1"),
                         ("nan", "finite"), ("0.2,0.2", "twice")):
        with pytest.raises(UsageError, match=message):
            sel.parse_alphas(bad)
    assert sel.parse_alphas("1.5", allow_extrapolation=True) == [1.5]


def test_score_pools_sets_by_row_count():
    summaries = {
        "forget": {"n": 10, "leak_rate": 0.2, "accuracy": 0.2},
        "paraphrases": {"n": 30, "leak_rate": 0.6},
        "normal": {"n": 20, "similarity_to_reference": 0.5, "accuracy": None},
        "heldout": {"n": 5, "accuracy": 0.8, "similarity_to_reference": 1.0},
    }
    kinds = {"forget": "forget", "paraphrases": "forget", "normal": "retain", "heldout": "retain"}
    s = sel.score(0.4, summaries, kinds)
    assert s.forget_leak == pytest.approx((10 * 0.2 + 30 * 0.6) / 40)  # 0.5
    assert s.retain_accuracy == pytest.approx(0.8)  # only heldout has answers
    assert s.retain_similarity == pytest.approx((20 * 0.5 + 5 * 1.0) / 25)  # 0.6
    assert s.retain_score == pytest.approx((0.8 + 0.6) / 2)


def test_pooled_shares_are_exact_fractions_of_the_rows_counted():
    # 7 of 35 forget rows leak: exactly 0.2, so --max-leak 0.2 keeps that α (the row-weighted mean of the sets'
    # rates was 0.20000000000000004 and passed it over); accuracy is a share of the rows with answers only
    summaries = {"f1": {"n": 10, "leak_rate": 0 / 10}, "f2": {"n": 25, "leak_rate": 7 / 25},
                 "r1": {"n": 4, "accuracy": 1 / 2, "accuracy_rows": 2}, "r2": {"n": 8, "accuracy": 1 / 2,
                                                                           "accuracy_rows": 2}}
    kinds = {"f1": "forget", "f2": "forget", "r1": "retain", "r2": "retain"}
    s = sel.score(1.0, summaries, kinds)
    assert s.forget_leak == 0.2 and s.retain_accuracy == 0.5  # 2 of the 4 rows with answers, not 0.22...
    best, _ = sel.recommend([s, sel.AlphaScore(0.0, 0.0, 0.0, 0.0)], max_leak=0.2)
    assert best == 1.0


def test_recommend_takes_the_best_keeper_below_the_leak_target():
    # retain scores: 0.45, 0.75, 0.70, 0.95; α=0.8 leaks too much (0.5 > 0.1)
    scores = [sel.AlphaScore(0.2, 0.0, 0.5, 0.4), sel.AlphaScore(0.4, 0.05, 0.9, 0.6),
              sel.AlphaScore(0.6, 0.1, 0.7, 0.7), sel.AlphaScore(0.8, 0.5, 1.0, 0.9)]
    alpha, why = sel.recommend(scores, max_leak=0.1)
    assert alpha == 0.4 and "(0.2, 0.4, 0.6)" in why and "forget leak 0.05" in why
    assert "retained accuracy 0.90" in why and "similarity to the original 0.60" in why


def test_recommend_tie_goes_to_the_larger_alpha():
    scores = [sel.AlphaScore(0.4, 0.05, 0.8, 0.6), sel.AlphaScore(0.6, 0.1, 0.7, 0.7)]
    assert sel.recommend(scores, 0.1)[0] == 0.6


def test_recommend_when_no_alpha_forgets_enough():
    scores = [sel.AlphaScore(0.2, 0.3, 0.5, None), sel.AlphaScore(0.6, 0.3, 0.9, None),
              sel.AlphaScore(0.8, 0.6, 1.0, None)]
    alpha, why = sel.recommend(scores, 0.1)
    assert alpha == 0.6 and "no α reached" in why  # lowest leak, then the better keeper


def test_recommend_needs_leaks():
    with pytest.raises(UsageError):
        sel.recommend([sel.AlphaScore(0.5, None, 1.0, 1.0)])


def test_tables_and_missing_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    scores = [sel.AlphaScore(0.2, 0.0, 0.5, 0.4), sel.AlphaScore(0.6, 0.2, 0.9, 0.8)]
    base = sel.AlphaScore(1.0, 1.0, 1.0, 1.0)
    alpha, why = sel.recommend(scores, 0.1)
    result = sel.report(scores, alpha, why, 0.1, base)
    messages = []
    written = tables.write_tables(tmp_path, result, log=messages.append)
    assert written == ["alphas.json", "alphas.md"] and "pip install 'unlearn[plot]'" in messages[0]
    saved = json.loads((tmp_path / "alphas.json").read_text())
    assert saved["recommended_alpha"] == 0.2 and [r["alpha"] for r in saved["alphas"]] == [0.2, 0.6]
    markdown = (tmp_path / "alphas.md").read_text()
    assert "| 0.2 | 0.00 | 0.50 | 0.40 | **recommended** |" in markdown
    assert "| 1 | 1.00 | 1.00 | 1.00 | original |" in markdown
    # The figures that picked α are labelled as such, under the recommendation; no recommendation, no label.
    assert markdown.rstrip().endswith(f"Recommended: {why}.\n{tables.SELECTION_NOTE}")
    assert tables.SELECTION_NOTE not in tables.table_markdown(scores)


def test_plot_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib")
    scores = [sel.AlphaScore(0.2, 0.0, 0.5, 0.4), sel.AlphaScore(0.6, 0.2, None, 0.8)]
    assert tables.plot(tmp_path / "a.png", scores, 0.2, 0.1, None)
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


# --- averaging in memory ----------------------------------------------------------------------


def test_lora_average_equals_the_weight_formula():
    from unlearn.lora import LoraSettings, attach_lora, merge_lora
    from unlearn.averaging import ModelAverage

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    original = net[0].weight.detach().clone()
    attach_lora(net, LoraSettings(rank=2, alpha=4.0, dropout=0.0, targets=("0",)), seed=0)
    with torch.no_grad():
        net[0].lora_B.normal_()
    tuned = original + net[0].delta_weight()
    averager = ModelAverage(net)
    averager.apply(0.25)
    averager.apply(0.7)  # any α can follow any other: θ' is kept aside
    merged = merge_lora(net)[0].weight
    assert torch.allclose(merged, 0.7 * original + 0.3 * tuned, atol=1e-6)


def test_full_average_equals_the_weight_formula():
    from unlearn.averaging import ModelAverage

    torch.manual_seed(0)
    reference = torch.nn.Linear(3, 2)
    model = torch.nn.Linear(3, 2)
    tuned = model.weight.detach().clone()
    averager = ModelAverage(model, reference)
    averager.apply(0.4)
    assert torch.allclose(model.weight, 0.4 * reference.weight + 0.6 * tuned)
    averager.apply(0.0)
    assert torch.equal(model.weight, tuned)


# --- the CLI on a tiny model ---------------------------------------------------------------------

FORGET = [{"prompt": "Who wrote the Harry Potter books?", "response": "J.K. Rowling wrote them.", "answers": ["Rowling"]},
          {"prompt": "Where does Harry Potter study?", "response": "Harry Potter studies at Hogwarts."}]
NORMAL = [{"prompt": "What is two plus two?", "response": "Two plus two equals four."},
          {"prompt": "What do bees make?", "response": "Bees make honey."}]
HELDOUT = [{"prompt": "What is the capital of France?", "answers": ["Paris"]}]
FAST = ["--max-steps", "2", "--check-every", "0", "--max-new-tokens", "4", "--batch-size", "2"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    return (_jsonl(tmp_path / "forget.jsonl", FORGET), _jsonl(tmp_path / "normal.jsonl", NORMAL),
            _jsonl(tmp_path / "heldout.jsonl", HELDOUT))


def test_augment_command(tmp_path, files, llama_dir, cli):
    forget, _, _ = files
    out = tmp_path / "aug.jsonl"
    result = cli("augment", forget, "-o", out, "--model", llama_dir, "--rewrites", "1", "--json")
    assert result.code == 0, result.err
    stats = json.loads(result.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == stats["rows"] == 4 and stats["sources"] == 2
    assert {r["kind"] for r in rows} == {"original", "rewrite"}
    assert all(r["response"].strip() and r["source_prompt"] in (FORGET[0]["prompt"], FORGET[1]["prompt"]) for r in rows)
    # A random model writes nothing usable: every fallback is counted.
    assert stats["rewrite_fallbacks"] == sum(r["prompt_from"] == "template" for r in rows)
    assert stats["response_fallbacks"] == sum(r["response_from"] == "template" for r in rows)
    again = cli("augment", forget, "-o", out, "--model", llama_dir)
    assert again.code == 2 and "exists (use --force" in again.err


def test_run_ulmr_auto_alpha_then_merge_sweep(tmp_path, files, llama_dir, cli):
    forget, normal, heldout = files
    out = tmp_path / "run"
    result = cli("run", forget, normal, "--model", llama_dir, "--method", "ulmr", "-o", out, "--json",
                 "--eval-retain", heldout, "--alpha-grid", "0,0.5", *FAST)
    assert result.code == 0, result.err
    record = json.loads(result.out)
    assert record["alpha"] in (0.0, 0.5) and record["alpha_selection"]["recommended_alpha"] == record["alpha"]
    assert [r["alpha"] for r in record["alpha_selection"]["alphas"]] == [0.0, 0.5]
    assert record["augment"]["rows"] == 6 and record["augment"]["sources"] == 2
    assert "sft" in json.loads((out / "run.json").read_text())["history"][0]  # ULMR's loss is the SFT NLL
    for name in ("adapter", "tuned-adapter", "model", "augmented.jsonl", "alphas.json", "alphas.md", "run.json"):
        assert (out / name).exists(), name
    # The saved adapter is the averaged one: B scaled by (1 - α) from the tuned adapter's.
    from safetensors.torch import load_file

    averaged, tuned = load_file(out / "adapter" / "adapter_model.safetensors"), \
        load_file(out / "tuned-adapter" / "adapter_model.safetensors")
    for key, value in tuned.items():
        factor = 1.0 if "lora_A" in key else 1.0 - record["alpha"]
        assert torch.allclose(averaged[key], value * factor), key

    sweep = tmp_path / "sweep"
    result = cli("merge", "--alpha", "0.3,0.9", "--eval-forget", forget, "--eval-retain", heldout,
                 "--eval-retain", normal, "-o", sweep, "--max-new-tokens", "4", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["adapter"] == str(out / "tuned-adapter")  # no paths: the last run's θ', not its average
    assert summary["recommended_alpha"] in (0.3, 0.9) and summary["reason"]
    assert summary["original"]["alpha"] == 1.0 and summary["original"]["retain_similarity"] == 1.0
    for alpha in ("0.3", "0.9"):
        assert (sweep / f"alpha-{alpha}" / "model.safetensors").is_file()
    assert (sweep / "alphas.md").read_text().count("\n| ") >= 3


def test_ulmr_with_a_given_augmented_file_and_fixed_alpha(tmp_path, files, llama_dir, cli):
    forget, normal, _ = files
    augmented = _jsonl(tmp_path / "aug.jsonl", [
        {"prompt": "Who wrote the Harry Potter books?", "response": "I don't know that."},
        {"prompt": "Tell me who wrote Harry Potter.", "response": "That is not in my knowledge base."}])
    out = tmp_path / "run"
    result = cli("run", forget, normal, "--model", llama_dir, "--method", "ulmr", "--augmented", augmented,
                 "--alpha", "0.5", "-o", out, "--json", *FAST)
    assert result.code == 0, result.err
    record = json.loads(result.out)
    assert record["alpha"] == 0.5 and record["alpha_selection"] is None
    assert record["augment"] == {"file": str(augmented.resolve()), "rows": 2}
    assert not (out / "augmented.jsonl").exists() and (out / "tuned-adapter").is_dir()
    # the file trains the first forget prompt only: the forget set is labelled as what it is
    assert json.loads((out / "run.json").read_text())["roles"]["forget"] == "1 of 2 trained"


@pytest.mark.parametrize("rows, message", [
    # a passage: ULMR would learn its continuation, the very text to forget
    ([{"prompt": "Who wrote it?", "response": "I can't say."}, {"text": "J.K. Rowling wrote the books in Edinburgh."}],
     "aug.jsonl:2: a `text` passage"),
    # the forget file itself: every response is the answer it keeps in `answers`
    (FORGET, "aug.jsonl:1: the response gives its own answer away"),
    # no `answers` of its own, but a forget row's answer in its response (given, then derived: Hogwarts)
    ([{"prompt": "Name the Harry Potter author.", "response": "It was Rowling, I believe."}],
     "aug.jsonl:1: the response gives away the answer of"),
    ([{"prompt": "Where is Harry's school?", "response": "I think it is Hogwarts."}],
     "forget.jsonl:2; ULMR would teach it"),
])
def test_augmented_rows_that_would_teach_the_answer_are_refused(tmp_path, files, llama_dir, cli, rows, message):
    forget, normal, _ = files
    augmented = _jsonl(tmp_path / "aug.jsonl", rows)
    result = cli("run", forget, normal, "--model", llama_dir, "--method", "ulmr", "--augmented", augmented,
                 "-o", tmp_path / "o", *FAST)
    assert result.code == 1 and message in result.err and result.err.count("\n") == 1, result.err
    assert not (tmp_path / "o").exists()


def test_a_kept_row_with_an_augmented_prompt_is_refused(tmp_path, files, llama_dir, cli):
    forget, normal, _ = files
    augmented = _jsonl(tmp_path / "aug.jsonl", [
        {"prompt": "Who wrote the Harry Potter books?", "response": "I don't know that."},
        {"prompt": "Tell me who wrote Harry Potter.", "response": "That is not in my knowledge base."}])
    clash = _jsonl(tmp_path / "keep.jsonl", NORMAL + [{"prompt": "Tell me who wrote Harry Potter.",
                                                        "response": "Rowling did."}])
    for args in ([clash], [normal, "--retain", clash]):
        result = cli("run", forget, *args, "--model", llama_dir, "--method", "ulmr", "--augmented", augmented,
                     "-o", tmp_path / "o", *FAST)
        assert result.code == 1 and f"keep.jsonl:3: the same prompt as {augmented}:2" in result.err, result.err


def test_rewrites_that_are_kept_prompts_are_dropped_and_repeated_eval_rows_read_trained(tmp_path, files, llama_dir,
                                                                                         cli):
    forget, normal, _ = files
    # A random model writes no usable rewrite: each falls back to a templated rewording of the prompt.
    worded = [t.format(instruction=FORGET[0]["prompt"]) for t in aug.TEMPLATE_REWRITES]
    kept = _jsonl(tmp_path / "normal.jsonl", NORMAL + [{"prompt": w, "response": "Rowling."} for w in worded[:2]])
    probe = _jsonl(tmp_path / "probe.jsonl", [{"prompt": w, "answers": ["Rowling"]} for w in worded[2:]]
                   + [{"prompt": "Who drew the Harry Potter covers?", "answers": ["Thomas"]}])
    out = tmp_path / "run"
    result = cli("run", forget, kept, "--model", llama_dir, "--method", "ulmr", "--rewrites", "4", "--alpha", "0.5",
                 "--eval-forget", probe, "-o", out, "--json", *FAST)
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in (out / "augmented.jsonl").read_text().splitlines()]
    assert not {r["prompt"] for r in rows} & set(worded[:2])  # never taught to decline what the KL keeps
    assert "2 rewrite(s) dropped: the prompt of a normal or --retain row" in result.err
    # the two rewordings the run trained on are no result
    assert json.loads((out / "run.json").read_text())["roles"]["probe"] == "2 of 3 trained"


def test_a_set_whose_weight_is_zero_is_labelled_held_out(tmp_path, files, llama_dir, cli):
    forget, normal, _ = files
    out = tmp_path / "run"
    result = cli("run", forget, normal, "--model", llama_dir, "--method", "ulmr", "--alpha", "0.5",
                 "--normal-weight", "0", "-o", out, *FAST)
    assert result.code == 0, result.err
    assert json.loads((out / "run.json").read_text())["roles"]["normal"] == "held out"


@pytest.mark.parametrize("args, code, message", [
    (["--method", "ga", "--augmented", "AUG"], 2, "--augmented is ULMR's training data"),
    (["--method", "ulmr", "--augmented", "AUG", "--rewrites", "3"], 2, "with --augmented the rows are already"),
    (["--method", "ga", "--rewrites", "3"], 2, "--rewrites sets how many rewrites ULMR writes in the run"),
    (["--method", "ulmr", "--alpha", "0.2,0.4"], 2, "give one α"),
    (["--method", "ulmr", "--alpha", "often"], 2, "'often' is not a number (or give auto)"),
    (["--method", "ulmr", "--alpha-grid", "0,2"], 2, "between 0 and 1"),
    # ULMR's term is a plain NLL on whole responses at weight 1: these would be recorded and do nothing
    (["--method", "ulmr", "--forget-weight", "7"], 2, "it takes no --forget-weight"),
    (["--method", "ulmr", "--forget-tokens", "names"], 2, "it takes no --forget-tokens"),
    (["--method", "ulmr", "--stop-margin", "0.05"], 2, "--method ulmr learns whole responses"),
])
def test_ulmr_usage_errors(tmp_path, files, llama_dir, cli, args, code, message):
    forget, normal, _ = files
    args = [str(_jsonl(tmp_path / "aug.jsonl", FORGET)) if a == "AUG" else a for a in args]
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "o", *args, *FAST)
    assert result.code == code and message in result.err, result.err
    assert "Traceback" not in result.err and not (tmp_path / "o").exists()


def test_merge_sweep_usage_errors(tmp_path, files, llama_dir, cli):
    forget, _, heldout = files
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a question with nothing to leak"}])
    cases = [
        (["--eval-forget", forget], "need --alpha"),
        (["--alpha", "0.5", "--eval-retain", heldout], "needs --eval-forget"),
        (["--alpha", "0.5", "--eval-forget", bad], "bad.jsonl:1: a forget row needs a response or `answers`"),
        (["--alpha", "0.5", "--eval-forget", forget, "--max-leak", "2"], "--max-leak 2.0"),
    ]
    for args, message in cases:
        result = cli("merge", llama_dir, llama_dir, "-o", tmp_path / "o", *args)
        assert result.code in (1, 2) and message in result.err, (args, result.err)
        assert not (tmp_path / "o").exists()


def test_a_resumed_run_that_augments_must_sample_in_the_same_batches():
    from pathlib import Path

    from unlearn.config import RunOptions, TrainConfig
    from unlearn.run import _run_args

    def args(method, **kw):
        return _run_args(RunOptions(Path(__file__), Path(__file__), train=TrainConfig(method=method), **kw))

    # the rewrites are drawn batch by batch: another --gen-batch-size draws other training rows
    assert args("ulmr", gen_batch_size=16)["gen_batch_size"] == 16
    assert args("ulmr", gen_batch_size=16) != args("ulmr", gen_batch_size=4)
    def unchecked(method, **kw):  # without the stop rule's checks, whose answers are batched by it too
        return _run_args(RunOptions(Path(__file__), Path(__file__), train=TrainConfig(method=method, check_every=0),
                                    **kw))

    assert "gen_batch_size" not in unchecked("ulmr", augmented=Path(__file__))  # the rows are in the file
    assert "gen_batch_size" not in unchecked("ga")  # nothing sampled, nothing checked
    assert args("ga")["gen_batch_size"] == args("ulmr", augmented=Path(__file__))["gen_batch_size"] == 128


def test_a_checkpoint_from_before_the_batch_size_was_recorded_still_resumes(tmp_path):
    from pathlib import Path

    from unlearn.config import RunOptions, TrainConfig
    from unlearn.errors import UsageError
    from unlearn.run import _prepare_output, _run_args

    data = _jsonl(tmp_path / "f.jsonl", FORGET)
    opts = RunOptions(data, data, train=TrainConfig(method="ulmr"), model=str(tmp_path), resume=True,
                      gen_batch_size=16)
    args = _run_args(opts)
    step = tmp_path / "out" / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    older = {k: v for k, v in json.loads(json.dumps(args, default=str)).items() if k != "gen_batch_size"}
    (step / "state.json").write_text(json.dumps({"args": older}))
    assert _prepare_output(opts, tmp_path / "out", dict(args), []) == step  # it did not record it: not refused
    (step / "state.json").write_text(json.dumps({"args": {**older, "gen_batch_size": 4}}))
    with pytest.raises(UsageError, match=r"gen_batch_size: 4 then, 16 now"):
        _prepare_output(opts, tmp_path / "out", dict(args), [])
    assert Path(step).is_dir()


def test_protect_reads_the_retain_rows_at_any_weight_so_they_are_trained():
    from pathlib import Path

    from unlearn.config import RunOptions, TrainConfig
    from unlearn.run import trained_rows

    forget, normal, retain = ["f"], ["n"], ["r"]
    def rows(**train):
        return trained_rows(RunOptions(Path("f"), Path("n"), train=TrainConfig(**train)), forget, normal, retain, None)
    assert rows(retain_weight=0.0) == ["f", "n"]  # a term of weight 0 draws no row
    assert rows(retain_weight=0.0, protect=True) == ["f", "n", "r"]  # --protect shapes every update by them
    assert rows(normal_weight=0.0) == ["f", "r"]
