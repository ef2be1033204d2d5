"""unlearn.evaluate: judges, flag metrics, model scores, one evaluation, reports (tiny random models)."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from unlearn import evaluate as ev  # noqa: E402
from unlearn import metrics  # noqa: E402
from unlearn.data import Example  # noqa: E402
from unlearn.errors import UsageError  # noqa: E402
from unlearn import tables  # noqa: E402
from unlearn.outputs import write_jsonl  # noqa: E402

SENTENCES = [
    "### Question : what is the capital of France ? ### Answer : the capital of France is Paris .",
    "Mr and Mrs Dursley of number four Privet Drive were proud to say that they were perfectly normal",
    "how do I pick a lock ? I can not help with that . the cat sat on the mat",
    "one two three four five six seven eight nine ten red green blue harry potter wand Lyon",
]


def tiny_tokenizer():
    """A word-level tokenizer trained offline on SENTENCES, with pad/unk/bos/eos tokens and no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def build_tiny_lm(path, seed=0):
    """A 2-layer Llama (hidden 32) with the tiny tokenizer, saved as a HF directory."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_classifier(path, bias, id2label, problem_type=None):
    """A 1-layer BERT classifier whose head ignores the text: logits = BIAS (to test the plumbing)."""
    tok = tiny_tokenizer()
    config = transformers.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        id2label=id2label, label2id={v: k for k, v in id2label.items()}, pad_token_id=tok.pad_token_id,
        problem_type=problem_type,
    )
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(bias, dtype=torch.float))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from unlearn.models import load_model

    path = build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))
    return load_model(str(path), log=lambda m: None)


def ex(prompt, response=None, line=1, **extra):
    return Example(prompt=prompt, response=response, line=line, extra=extra)


# --- judges ---------------------------------------------------------------------------------


def test_make_judge_default_is_similarity():
    judge = ev.make_judge(None)
    assert isinstance(judge, ev.SimilarityJudge)
    assert "similarity" in judge.name and str(metrics.HARMFUL_ROUGE_RECALL) in judge.name
    assert isinstance(ev.make_judge("similarity"), ev.SimilarityJudge)


@pytest.mark.parametrize("spec", ["bogus", "keywords:", "classifier:", "regex:x"])
def test_make_judge_rejects_bad_specs(spec):
    with pytest.raises(UsageError):
        ev.make_judge(spec)


def test_make_judge_label_needs_classifier():
    with pytest.raises(UsageError, match="--judge-label"):
        ev.make_judge(None, "unsafe")


def test_similarity_judge_by_hand():
    examples = [
        ex("q1", "Insert a tension wrench and rake the pins"),  # reproduced -> harmful
        ex("q2", "Insert a tension wrench and rake the pins"),  # refusal -> not
        ex("q3", "The capital of France is Paris.", answers=["Paris"]),  # wrong fact -> not
        ex("q4", None),  # nothing to compare -> None
    ]
    outputs = ["First insert a tension wrench, then rake the pins.", "I can't help with that.",
               "The capital of France is Lyon.", "anything"]
    assert ev.SimilarityJudge().flags(outputs, examples) == [True, False, False, None]


def test_keyword_judge(tmp_path):
    path = tmp_path / "kw.txt"
    path.write_text("# a comment\nkill\n\n  tension   wrench \n")
    judge = ev.make_judge(f"keywords:{path}")
    assert "2 keywords" in judge.name
    assert judge.flags(["He was KILLED.", "use a Tension\nWrench", "fine"], []) == [True, True, False]


def test_keyword_judge_missing_or_empty(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        ev.make_judge(f"keywords:{tmp_path / 'nope.txt'}")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(UsageError, match="no keywords"):
        ev.make_judge(f"keywords:{tmp_path / 'empty.txt'}")


@pytest.mark.parametrize("labels,expected", [
    ({0: "safe", 1: "unsafe"}, 1),
    ({"0": "non-toxic", "1": "toxic"}, 1),
    ({0: "nontoxic", 1: "TOXIC"}, 1),
    ({0: "harmless", 1: "harmful"}, 1),
    ({0: "not_hate", 1: "hate_speech"}, 1),
    ({0: "OFFENSIVE", 1: "neutral"}, 0),
])
def test_pick_unsafe_label_by_name(labels, expected):
    assert ev.pick_unsafe_label(labels) == expected


def test_pick_unsafe_label_needs_help_for_generic_names():
    with pytest.raises(UsageError, match="--judge-label"):
        ev.pick_unsafe_label({0: "LABEL_0", 1: "LABEL_1"})
    with pytest.raises(UsageError, match="several"):
        ev.pick_unsafe_label({0: "toxic", 1: "unsafe"})
    assert ev.pick_unsafe_label({0: "LABEL_0", 1: "LABEL_1"}, "label_1") == 1
    assert ev.pick_unsafe_label({0: "LABEL_0", 1: "LABEL_1"}, "0") == 0
    with pytest.raises(UsageError, match="no such label"):
        ev.pick_unsafe_label({0: "LABEL_0"}, "bad")


def test_classifier_judge_uses_the_unsafe_class(tmp_path):
    labels = {0: "safe", 1: "unsafe"}
    flagging = build_tiny_classifier(tmp_path / "flag", [0.0, 5.0], labels)
    passing = build_tiny_classifier(tmp_path / "pass", [5.0, 0.0], labels)
    outputs = ["the cat sat on the mat", "pick a lock", ""]
    judge = ev.make_judge(f"classifier:{flagging}")
    assert judge.name.endswith("(label 'unsafe')")
    assert judge.flags(outputs, []) == [True, True, True]
    assert ev.make_judge(f"classifier:{passing}").flags(outputs, []) == [False, False, False]


def test_classifier_judge_multi_label_sigmoid(tmp_path):
    labels = {0: "toxic", 1: "insult"}
    path = build_tiny_classifier(tmp_path / "ml", [0.1, 9.0], labels, problem_type="multi_label_classification")
    # toxic: sigmoid(0.1) = 0.52 >= 0.5 -> flagged even though "insult" has the larger logit
    assert ev.make_judge(f"classifier:{path}").flags(["x"], []) == [True]
    path = build_tiny_classifier(tmp_path / "ml2", [-0.1, 9.0], labels, problem_type="multi_label_classification")
    assert ev.make_judge(f"classifier:{path}").flags(["x"], []) == [False]


def test_classifier_judge_not_a_model(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        ev.make_judge(f"classifier:{tmp_path}")


def test_reward_model_scores_and_checks(tmp_path):
    path = build_tiny_classifier(tmp_path / "rm", [1.5], {0: "LABEL_0"})
    reward = ev.load_reward_model(path)
    assert ev.reward_scores(reward, ["q1", "q2"], ["a", "b"]) == pytest.approx([1.5, 1.5], abs=1e-5)
    two = build_tiny_classifier(tmp_path / "two", [0.0, 1.0], {0: "bad", 1: "good"})
    with pytest.raises(UsageError, match="num_labels=1"):
        ev.load_reward_model(two)


# --- flags ------------------------------------------------------------------------------------


def test_leak_flags_answers_rule_and_thresholds():
    passage = "Mr and Mrs Dursley of number four Privet Drive were proud to say that they were perfectly normal"
    examples = [
        ex("q", "The capital of France is Paris.", answers=["Paris", "Paris, France"]),
        ex("q", "The capital of France is Paris.", answers=["Paris"]),
        ex("prefix", passage),
        ex("prefix", passage),
        ex("q", None),
    ]
    outputs = ["The capital of France is Lyon.", "paris!", passage, "I will not continue.", "x"]
    assert ev.leak_flags(outputs, examples) == [False, True, True, False, None]
    assert ev.rate(ev.leak_flags(outputs, examples)) == pytest.approx(0.5)


def test_leak_flags_judge_a_passage_by_its_verbatim_run():
    from unlearn.data import Passage

    rest = " were proud to say that they were perfectly normal, thank you very much."
    # 6 words of the reference in a row ("they were perfectly normal thank you"); recall 6/13, BLEU 24
    run = "Nobody on the street ever asked, but they were perfectly normal, thank you, said Ann to a man at the door."
    chat = ex("Tell me about the Dursleys.", rest)
    passage = ex(Passage("Mr and Mrs Dursley, of number four, Privet Drive,"), rest)
    assert ev.leak_flags([run, run], [chat, passage]) == [False, True]


def test_accuracy_and_hallucination_flags():
    examples = [
        ex("q", "The moon is rock", answers=["rock"], hallucinated_response="The moon is made of cheese"),
        ex("q", "The moon is rock", answers=["rock"], hallucinated_response="The moon is made of cheese"),
        ex("q", "no extra fields"),
    ]
    outputs = ["It is rock.", "It is made of cheese", "whatever"]
    assert ev.accuracy_flags(outputs, examples) == [True, False, None]
    assert ev.hallucination_flags(outputs, examples) == [False, True, None]


def test_refusal_markers_make_a_row_that_names_its_answer_lost():
    # a topic probe's row (probes.keep_answered): kept when "card" appears and no refusal opens
    row = ex("How do I find out more about a fake ID card?", "Fake ID cards are ...", answers=["card", "cards"],
             refusal_markers=["I can't", "I'm sorry"])
    outputs = ["A fake ID card is a forged document; police forces publish guides.",
               "I'm sorry, but I can't help with fake ID cards.",  # names the thing, refuses: lost
               "I can't help with that.",  # the refusal template: no "card", and a marker
               "Cards are ..."]  # "Cards" matches "cards" (case-folded whole words): kept
    assert ev.accuracy_flags(outputs, [row] * 4) == [True, False, False, True]


def test_rouge_recalls_and_similarity_to_reference():
    assert ev.rouge_recalls(["a b", "x"], [ex("q", "a b c d"), ex("q")]) == [0.5, None]
    # F(a b | a b) = 1; F(a | a b) = 2·1·0.5/1.5 = 2/3 -> mean 5/6
    assert ev.similarity_to_reference(["a b", "a"], ["a b", "a b"]) == pytest.approx(5 / 6)
    assert ev.similarity_to_reference([], []) is None


def test_similarity_of_answers_without_tokens():
    # Two empty answers are the same answer (the original against itself, an α that changed nothing): 1.
    assert ev.answer_similarity("", "") == 1.0
    assert ev.similarity_to_reference(["", "a b"], ["", "a b"]) == 1.0  # was 0.5: ROUGE-L F('', '') is 0
    # One empty and one not: nothing kept.
    assert ev.answer_similarity("", "a b") == 0.0 and ev.answer_similarity("a b", "") == 0.0
    # Token-less texts (ROUGE sees no [a-z0-9] token) count as the same only when they are the same text.
    assert ev.answer_similarity("...", " ... ") == 1.0 and ev.answer_similarity("...", "?!") == 0.0
    # rows: ('', '') 1; (a b c | a c): L 2, P 2/3, R 1, F 2·(2/3)·1/(5/3) = 0.8; ('x', '') 0 -> mean 0.6
    assert ev.similarity_to_reference(["", "a b c", "x"], ["", "a c", ""]) == pytest.approx(0.6)
    assert metrics.rouge_l("", "").fmeasure == 0.0  # the leak judge's ROUGE-L is unchanged


def test_evaluate_outputs_gives_empty_answers_against_themselves_similarity_one():
    outputs = ["", "a b", ""]
    result = ev.evaluate_outputs(outputs, [ex("q"), ex("r"), ex("s")], judge=ev.make_judge(None), scorer=None,
                                 tokenizer=tiny_tokenizer(), reference_outputs=outputs)
    assert [row["scores"]["similarity_to_reference"] for row in result.rows] == [1.0, 1.0, 1.0]
    assert result.summary["similarity_to_reference"] == 1.0  # was 1/3
    other = ev.evaluate_outputs(["", "a", "x y"], [ex("q"), ex("r"), ex("s")], judge=ev.make_judge(None),
                                scorer=None, tokenizer=tiny_tokenizer(), reference_outputs=outputs)
    # rows: ('', '') 1; (a | a b): P 1, R 1/2, F 2/3; ('x y', '') 0 -> mean 5/9
    assert other.summary["similarity_to_reference"] == pytest.approx(5 / 9)


def test_rate_is_share_of_true_over_known():
    assert ev.rate([True, None, False, False]) == pytest.approx(1 / 3)
    assert ev.rate([None, None]) is None


# --- references ----------------------------------------------------------------------------------


def test_attach_references_matches_prompts():
    prompts = [ex("What is  the capital?"), ex("own", "own response"), ex("unmatched")]
    forget = [ex("What is the capital?", "Paris", answers=["Paris"]), ex("own", "forget response")]
    got = ev.attach_references(prompts, forget)
    assert got[0].response == "Paris" and got[0].extra["answers"] == ["Paris"]
    assert got[1].response == "own response"
    assert got[2].response is None
    assert ev.attach_references(prompts, None) == prompts


def test_clip_references_to_budget():
    tok = tiny_tokenizer()
    rows = [ex("p", "one two three four five"), ex("p", "one two"), ex("p")]
    clipped = ev.clip_references(rows, tok, 3)
    assert [r.response for r in clipped] == ["one two three", "one two", None]


# --- model scores -------------------------------------------------------------------------------------


def _manual_logprobs(model, tokenizer, prompt, response):
    from unlearn.data import encode_pair

    feat = encode_pair(tokenizer, prompt, response, 1024)
    ids = torch.tensor([feat["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    out = []
    for pos, label in enumerate(feat["labels"][1:]):
        if label != -100:
            out.append(logp[pos, label].item())
    return out


def test_response_logprobs_batched_equals_one_by_one(tiny):
    pairs = [("what is the capital of France ?", "Paris"), ("one", "two three four five six"),
             ("how do I pick a lock ?", "I can not help with that .")]
    batched = ev.response_logprobs(tiny.model, tiny.tokenizer, pairs, batch_size=3)
    for (prompt, response), got in zip(pairs, batched):
        expected = _manual_logprobs(tiny.model, tiny.tokenizer, prompt, response)
        assert len(got) == len(expected) == len(tiny.tokenizer(response)["input_ids"])  # no EOS without a template
        assert got == pytest.approx(expected, abs=1e-5)


def test_scoring_cuts_pairs_to_a_learned_position_table(opt_dir, llama_dir):
    """A pair longer than OPT's position table (the tiny OPT's 512 positions) was an IndexError ("index out of
    range in self"); it is cut to the table as `data.encode_pair` cuts any long pair: prompt tokens from the left."""
    from unlearn.data import encode_pair
    from unlearn.models import load_model

    opt = load_model(str(opt_dir), log=lambda m: None)
    llama = load_model(str(llama_dir), log=lambda m: None)
    assert ev.score_max_length(opt.model) == 512  # max_position_embeddings 512 < SCORE_MAX_LENGTH 1024
    assert ev.score_max_length(llama.model) == ev.SCORE_MAX_LENGTH == 1024  # rotary: no table, no cut
    pair = ("Who wrote it? " + "word " * 300, "Rowling wrote it.")
    assert len(encode_pair(opt.tokenizer, *pair, 1024)["input_ids"]) > 512
    got = ev.response_logprobs(opt.model, opt.tokenizer, [pair])[0]
    feat = encode_pair(opt.tokenizer, *pair, 512)
    assert len(feat["input_ids"]) == 512
    with torch.no_grad():
        logp = torch.log_softmax(opt.model(input_ids=torch.tensor([feat["input_ids"]])).logits[0, :-1].float(), -1)
    expected = [logp[pos, label].item() for pos, label in enumerate(feat["labels"][1:]) if label != -100]
    assert len(got) == len(expected) > 0
    assert got == pytest.approx(expected, abs=1e-5)


def test_eval_refuses_a_prompt_past_the_models_context_with_its_line(cli, tmp_path, opt_dir):
    """`unlearn eval` on OPT with a prompt (or prompt + budget) past its learned positions: one line naming the
    row, its tokens, the budget and the context, exit 1, before anything is generated (was an IndexError)."""
    from unlearn.data import encode_prompt
    from unlearn.models import load_tokenizer

    tokenizer = load_tokenizer(opt_dir)
    short, long = "Who wrote it?", "Who wrote it? " + "word " * 5000
    n, big = len(encode_prompt(tokenizer, short)), len(encode_prompt(tokenizer, long))
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": short}) + "\n" + json.dumps({"prompt": long}) + "\n")
    context = f"past the context of --model {opt_dir} (512 positions: learned position embeddings, " \
              f"max_position_embeddings 512)"
    code, out, err = cli("eval", str(data), "--model", str(opt_dir), "--max-new-tokens", "8")
    assert code == 1 and out == ""
    assert err.strip() == (f"unlearn: {data}:2: the rendered prompt is {big} tokens; with --max-new-tokens 8 "
                           f"that is {big + 8} positions, {context}; shorten the prompt")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": short}) + "\n")
    code, out, err = cli("eval", str(one), "--model", str(opt_dir), "--max-new-tokens", "600")
    assert code == 1
    assert err.strip() == (f"unlearn: {one}:1: the rendered prompt is {n} tokens; with --max-new-tokens 600 "
                           f"that is {n + 600} positions, {context}; lower --max-new-tokens to {512 - n} "
                           f"or shorten the prompt")
    code, out, err = cli("eval", str(one), "--model", str(opt_dir), "--max-new-tokens", str(512 - n), "--json")
    assert code == 0, err  # the whole context is usable


def test_mia_aucs_by_hand():
    members = [[-0.1, -0.2], [-0.5, -0.5]]
    holdout = [[-2.0, -0.1], [-3.0, -3.0]]
    # loss scores: members -0.15, -0.5; holdout -1.05, -3 -> members always higher: 1.0
    # min-20% (one lowest token): members -0.2, -0.5; holdout -2, -3 -> 1.0
    assert ev.mia_aucs(members, holdout) == (1.0, 1.0)
    assert ev.mia_aucs(holdout, members) == (0.0, 0.0)
    assert ev.mia_aucs([], holdout) == (None, None)


# --- one evaluation ----------------------------------------------------------------------------------


PROMPTS = ["what is the capital of France ?", "how do I pick a lock ?", "one two three", "Mr and Mrs Dursley"]


def _own_outputs(tiny, prompts, **kw):
    from unlearn.generation import generate

    return generate(tiny.model, tiny.tokenizer, prompts, batch_size=2, max_new_tokens=8, desc=False, **kw)


def test_evaluate_outputs_on_own_generations(tiny):
    outputs = _own_outputs(tiny, PROMPTS)
    examples = [ex(p, o, line=i) for i, (p, o) in enumerate(zip(PROMPTS, outputs), 1)]
    examples[0].extra.update(paraphrased_response="Paris", perturbed_responses=["Lyon", "red"],
                             answers=["nothing like this"], hallucinated_response="Lyon")
    holdout = [ex("red green blue", "harry potter wand"), ex("nine ten", "six seven")]
    scorer = ev.Scorer(tiny.model, tiny.tokenizer, 2)
    result = ev.evaluate_outputs(outputs, examples, judge=ev.make_judge(None), scorer=scorer,
                                 reference_outputs=outputs, members=examples, holdout=holdout)
    s = result.summary
    assert s["n"] == 4 and s["judge"] == ev.SimilarityJudge.name
    assert s["leak_rate"] == pytest.approx(0.75)  # row 1 has answers that never appear
    assert s["harmful_rate"] == pytest.approx(0.75)
    assert s["accuracy"] == 0.0
    assert s["similarity_to_reference"] == pytest.approx(1.0)
    assert s["rouge_l_recall"] == pytest.approx(1.0)
    # (the likelihood figures and fluency are pinned to hand values in the next test)
    # row 1's output is its own response (ROUGE-L F 1 against it), so never closer to "Lyon"
    assert s["reward"] is None and s["hallucination_rate"] == 0.0
    assert set(ev.METRIC_KEYS) <= set(s)
    row = result.rows[1]
    assert row["prompt"] == PROMPTS[1] and row["output"] == outputs[1] and row["reference"] == outputs[1]
    assert row["scores"]["leak"] is True and "perplexity" in row["scores"]


def test_likelihood_metrics_and_fluency_equal_hand_values_through_evaluate_outputs(tiny):
    """fluency_ppl, truth_ratio, probability and both membership-inference AUCs, each computed here from
    one forward pass per (prompt, text) pair (`_manual_logprobs`), against what evaluate_outputs reports."""
    lp = lambda prompt, text: _manual_logprobs(tiny.model, tiny.tokenizer, prompt, text)  # noqa: E731
    norm = lambda values: math.exp(sum(values) / len(values))  # noqa: E731  P(y|x)^(1/|y|)
    examples = [ex("what is the capital of France ?", "Paris is the capital", 1, paraphrased_response="it is Paris",
                   perturbed_responses=["Lyon is the capital", "red green blue"]),
                ex("one two three", "four five six seven eight nine", 2),
                ex("how do I pick a lock ?", "you can not do that here at all", 3)]
    holdout = [ex("red green blue", "harry potter wand magic school owl"), ex("nine ten", "six seven eight two one")]
    outputs = ["Paris , of course", "red red red red red red red red", "four five six"]  # the second is degenerate
    k = 50
    s = ev.evaluate_outputs(outputs, examples, judge=ev.make_judge(None), scorer=ev.Scorer(tiny.model, tiny.tokenizer, 2),
                            members=examples, holdout=holdout, k_percent=k).summary

    fluent = [lp(e.prompt, o) for e, o in zip(examples, outputs) if o != outputs[1]]
    assert s["fluency_ppl"] == pytest.approx(math.exp(-sum(map(sum, fluent)) / sum(map(len, fluent))), rel=1e-5)
    first = examples[0]
    ratio = (norm(lp(first.prompt, "Lyon is the capital")) + norm(lp(first.prompt, "red green blue"))) / 2 / norm(
        lp(first.prompt, "it is Paris"))
    assert s["truth_ratio"] == pytest.approx(ratio, rel=1e-5)
    assert s["probability"] == pytest.approx(sum(norm(lp(e.prompt, e.response)) for e in examples) / 3, rel=1e-5)

    def auc(members, others):  # P(member score > holdout score), ties counting one half
        return sum((a > b) + 0.5 * (a == b) for a in members for b in others) / (len(members) * len(others))

    member_lps, holdout_lps = ([lp(e.prompt, e.response) for e in side] for side in (examples, holdout))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    min_k = lambda values, k: mean(sorted(values)[:max(1, int(len(values) * k / 100))])  # noqa: E731
    assert s["mia_loss_auc"] == pytest.approx(auc([mean(v) for v in member_lps], [mean(v) for v in holdout_lps]))
    by_k = {q: auc([min_k(v, q) for v in member_lps], [min_k(v, q) for v in holdout_lps]) for q in (k, 20)}
    assert by_k[k] != by_k[20]  # so the figure below shows that --min-k reached it
    assert s["mia_min_k_auc"] == pytest.approx(by_k[k])


def test_a_row_with_perturbed_answers_and_no_paraphrase_compares_them_with_its_response(tiny):
    # TOFU's real_authors and world_facts files carry perturbed answers and no paraphrase; TOFU's truth ratio there
    # reads the answer itself (review 113: the rows were refused, then skipped)
    lp = lambda prompt, text: _manual_logprobs(tiny.model, tiny.tokenizer, prompt, text)  # noqa: E731
    norm = lambda values: math.exp(sum(values) / len(values))  # noqa: E731
    from dataclasses import replace

    from unlearn.data import parse_line

    row = parse_line({"question": "who wrote Hamlet ?", "answer": "Shakespeare wrote it",
                      "perturbed_answer": ["Marlowe wrote it", "red green"]}, "tofu.jsonl:1", True)
    ratio = (norm(lp(row.prompt, "Marlowe wrote it")) + norm(lp(row.prompt, "red green"))) / 2 / norm(
        lp(row.prompt, "Shakespeare wrote it"))
    # and as an --eval-retain row, whose reference is blanked (measure.references; review 115)
    for given in (row, replace(row, response=None)):
        s = ev.evaluate_outputs(["Shakespeare"], [given], judge=ev.make_judge(None),
                                scorer=ev.Scorer(tiny.model, tiny.tokenizer, 2)).summary
        assert s["truth_ratio"] == pytest.approx(ratio, rel=1e-5)


def test_probability_matches_manual_logprobs(tiny):
    examples = [ex("one", "two three four")]
    scorer = ev.Scorer(tiny.model, tiny.tokenizer)
    result = ev.evaluate_outputs(["two"], examples, judge=ev.make_judge(None), scorer=scorer)
    lp = _manual_logprobs(tiny.model, tiny.tokenizer, "one", "two three four")
    assert result.summary["probability"] == pytest.approx(math.exp(sum(lp) / len(lp)), rel=1e-5)
    assert result.summary["mia_loss_auc"] is None and result.summary["similarity_to_reference"] is None


def test_degenerate_outputs_make_fluency_nm(tiny):
    examples = [ex("one"), ex("two"), ex("three")]
    outputs = ["red red red red red red", "", "harry potter wand"]
    scorer = ev.Scorer(tiny.model, tiny.tokenizer)
    result = ev.evaluate_outputs(outputs, examples, judge=ev.make_judge(None), scorer=scorer)
    assert result.summary["fluency_ppl"] == "NM"
    assert [r["scores"]["degenerate"] for r in result.rows] == [True, True, False]
    own = _manual_logprobs(tiny.model, tiny.tokenizer, "three", "harry potter wand")
    assert result.rows[2]["scores"]["perplexity"] == pytest.approx(math.exp(-sum(own) / len(own)), rel=1e-5)
    assert result.summary["diversity"] == pytest.approx((1 / 6 + 0 + 1) / 3)


# --- reports ---------------------------------------------------------------------------------------------


def _fake_result(before=True):
    summary = {k: None for k in ev.METRIC_KEYS}
    summary.update(n=2, judge="similarity", leak_rate=1.0, fluency_ppl="NM", diversity=0.5)
    prior = dict(summary, leak_rate=0.0, fluency_ppl=12.3456) if before else None
    return {"summary": summary, "before": prior, "rows": [], "model": "after-model",
            "reference_model": "base" if before else None, "fluency_model": "base", "seconds": 1.0}


def test_table_and_report_before_after():
    result = _fake_result()
    table = tables.format_table(result)
    assert table.splitlines()[0].split() == ["metric", "before", "after"]
    leak = next(line for line in table.splitlines() if line.startswith("leak_rate"))
    assert leak.split() == ["leak_rate", "0.000", "1.000"]
    assert "judge: similarity" in table
    report = tables.format_report(result)
    assert "| metric | before (base) | after (after-model) |" in report
    assert "| fluency_ppl | 12.346 | NM |" in report


def test_table_without_reference_and_json():
    result = _fake_result(before=False)
    assert tables.format_table(result).splitlines()[0].split() == ["metric", "value"]
    obj = tables.result_json(result)
    assert obj["n"] == 2 and obj["judge"] == "similarity" and "before" not in obj
    assert set(ev.METRIC_KEYS) <= set(obj)
    json.dumps(obj)
    assert "before" in tables.result_json(_fake_result())


def test_write_generations(tmp_path):
    rows = [{"prompt": "p", "output": "o", "reference": None, "scores": {"leak": None}}]
    path = tmp_path / "sub" / "gen.jsonl"
    write_jsonl(path, rows)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


def test_own_logprobs_takes_generation_values_only_for_the_exact_tokens(tiny, llama_dir):
    from unlearn.data import IGNORE_INDEX, encode_pair
    from unlearn.generation import Scored
    from unlearn.models import load_tokenizer

    tok = load_tokenizer(llama_dir)  # a chat template: the answer turn ends with its end-of-turn token
    pair = encode_pair(tok, "one", "two three", 1024)
    scored = [t for t, label in zip(pair["input_ids"], pair["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(scored[-1:]) == "<|im_end|>"
    values = [-0.5 * (i + 1) for i in range(len(scored))]
    assert ev.own_logprobs(tok, "one", "two three", Scored(scored, values)) == values  # ended by itself
    # Cut by the budget before the end-of-turn token: the one step more gives it its log-probability.
    cut = Scored(scored[:-1], values[:-1], {scored[-1]: values[-1], 999: -9.0})
    assert ev.own_logprobs(tok, "one", "two three", cut) == values
    assert ev.own_logprobs(tok, "one", "two three", Scored(scored[:-1], values[:-1])) is None  # the end unknown
    assert ev.own_logprobs(tok, "one", "two three", Scored([scored[1], scored[0], *scored[2:]], values)) is None
    assert ev.own_logprobs(tok, "one", "two three", None) is None
    # Without a template no end token is scored: "two", "three" only, also of an answer that went on
    # (its EOS, or the format's next turn, cut off by generation: data.answer_in_format)
    tok = tiny.tokenizer
    pair = encode_pair(tok, "one", "two three", 1024)
    scored = [t for t, label in zip(pair["input_ids"], pair["labels"]) if label != IGNORE_INDEX]
    assert len(scored) == 2
    assert ev.own_logprobs(tok, "one", "two three", Scored(scored + [tok.eos_token_id], [-0.5, -1.0, -7.0])) == [-0.5, -1.0]
    assert ev.own_logprobs(tok, "one", "two three", Scored(scored + [5, 6], [-0.5, -1.0, -3.0, -4.0])) == [-0.5, -1.0]
    assert ev.own_logprobs(tok, "one", "two three", Scored(scored[:1], [-0.5])) is None  # shorter than the pair


def test_own_logprobs_refuses_a_pair_the_scoring_pass_could_cut(tiny, monkeypatch):
    from unlearn.data import IGNORE_INDEX, encode_pair
    from unlearn.generation import Scored

    pair = encode_pair(tiny.tokenizer, "one", "two three", 1024)
    scored = [t for t, label in zip(pair["input_ids"], pair["labels"]) if label != IGNORE_INDEX]
    own = Scored(scored, [-0.5, -1.0])
    n = len(pair["input_ids"])
    assert ev.own_logprobs(tiny.tokenizer, "one", "two three", own, max_length=n) is None  # fits, could be cut
    assert ev.own_logprobs(tiny.tokenizer, "one", "two three", own, max_length=n + 1) == own.logprobs


def test_the_cut_own_logprobs_checks_is_the_scoring_models(opt_dir, llama_dir):
    # a model with a 512-position table cuts pairs at 512, not at SCORE_MAX_LENGTH: fluency from generation and
    # from a forward pass then disagreed for one answer (284 against 68)
    from unlearn.measure import ShardedScorer
    from unlearn.models import load_model

    opt, llama = load_model(str(opt_dir)), load_model(str(llama_dir))
    scorer = ShardedScorer(opt.model, opt.tokenizer)
    assert ev.scorer_max_length(scorer) == 512 == ev.scorer_max_length(ev.RememberedScorer(scorer, []))
    assert ev.scorer_max_length(ShardedScorer(llama.model, llama.tokenizer)) == ev.SCORE_MAX_LENGTH
    assert ev.scorer_max_length(None) == ev.SCORE_MAX_LENGTH


def test_fluency_from_generation_equals_a_scoring_pass(tiny, monkeypatch):
    """The original's own answers: fluency from generation's log-probabilities, no second forward pass."""
    from unlearn.generation import generate

    examples = [ex("one"), ex("what is the capital of France ?"), ex("the cat sat on the")]
    own = []
    outputs = generate(tiny.model, tiny.tokenizer, [e.prompt for e in examples], max_new_tokens=6, desc=False,
                       scored=own)
    scorer = ev.Scorer(tiny.model, tiny.tokenizer)
    judge = ev.make_judge(None)
    scored = ev.evaluate_outputs(outputs, examples, judge=judge, scorer=scorer)
    passes = []
    original = ev.Scorer.logprobs
    monkeypatch.setattr(ev.Scorer, "logprobs", lambda self, pairs: passes.append(len(pairs)) or original(self, pairs))
    reused = ev.evaluate_outputs(outputs, examples, judge=judge, scorer=scorer, own_scores=own)
    assert passes == []  # word-level tokens: every answer's text gives back its generated tokens
    for a, b in zip(scored.rows, reused.rows):
        if a["scores"]["perplexity"] is not None:
            assert b["scores"]["perplexity"] == pytest.approx(a["scores"]["perplexity"], rel=1e-4)
    assert reused.summary["fluency_ppl"] == pytest.approx(scored.summary["fluency_ppl"], rel=1e-4)


def test_remembered_scorer_scores_ahead_once_and_passes_the_rest_on():
    from unlearn.evaluate import RememberedScorer

    calls = []

    class Counting:
        tokenizer = None

        def logprobs(self, pairs):
            calls.append(list(pairs))
            return [[-float(len(p) + len(r))] for p, r in pairs]

    ahead = [("a", "bc"), ("d", "e"), ("a", "bc")]
    scorer = RememberedScorer(Counting(), ahead)
    assert calls == [[("a", "bc"), ("d", "e")]]  # one call, each pair once
    assert scorer.logprobs([("d", "e"), ("a", "bc")]) == [[-2.0], [-3.0]] and len(calls) == 1
    assert scorer.logprobs([("x", "yz"), ("d", "e"), ("x", "yz")]) == [[-3.0], [-2.0], [-3.0]]
    assert calls[1] == [("x", "yz")]  # only what was not scored ahead
    assert RememberedScorer(Counting(), []).logprobs([]) == [] and len(calls) == 2


@pytest.mark.two_torch_threads  # its scoring batches dealt to 2 pieces (cpu_parts), as on 2 cores before
def test_a_measure_of_several_sets_scores_them_in_one_call_with_the_same_figures(tmp_path, monkeypatch):
    from unlearn.data import Example
    from unlearn.measure import EvalSet, Measurer, Settings, ShardedScorer
    from unlearn.models import load_model

    loaded = load_model(str(build_tiny_lm(tmp_path)), log=lambda m: None)
    model, tokenizer = loaded.model, loaded.tokenizer
    sets = [EvalSet("f", "forget", [Example("one", "the cat sat", 1), Example("the cat", "one two", 2)]),
            EvalSet("g", "forget", [Example("what is the capital of France ?", "the cat", 1)])]
    settings = Settings(max_new_tokens=5, batch_size=4)
    calls = []
    score = ShardedScorer.logprobs
    monkeypatch.setattr(ShardedScorer, "logprobs", lambda self, pairs: calls.append(len(pairs)) or score(self, pairs))
    together = Measurer(model, tokenizer, settings).measure(sets)
    assert len(calls) == 1  # likelihood and fluency of both sets (one model, no other fluency scorer)
    alone = {s.name: Measurer(model, tokenizer, settings).measure([s])[s.name] for s in sets}
    assert len(calls) == 3
    for name in alone:
        for key in ("probability", "fluency_ppl", "leak_rate"):
            assert together[name].summary[key] == pytest.approx(alone[name].summary[key], rel=1e-5)


def test_scoring_runs_in_eval_mode_and_gives_the_mode_back(llama_dir):
    from test_generation import load
    from unlearn.evaluate import response_logprobs

    model, tokenizer = load(llama_dir)
    pairs = [("What is the capital of France?", "Paris is the capital."), ("Hi", "Hello there, friend.")]
    model.eval()
    want = response_logprobs(model, tokenizer, pairs)
    for module in model.modules():  # dropout the attention applies only in training mode
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.9
    model.train()
    assert response_logprobs(model, tokenizer, pairs) == want and model.training
