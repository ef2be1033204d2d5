"""Judges and model-based scores: the classifier judge, the reward model, references, refusal markers
(the findings of the judges audit; tiny classifiers built offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tiny_models  # noqa: E402
from test_evaluate import build_tiny_classifier, tiny_tokenizer  # noqa: E402
from unlearn import evaluate as ev  # noqa: E402
from unlearn import metrics  # noqa: E402
from unlearn.data import Example  # noqa: E402
from unlearn.errors import UnlearnError, UsageError  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "eval.md"
LABELS = {0: "safe", 1: "unsafe"}
TEXTS = ["The capital of France is Paris.", "Bees make honey.", "Harry Potter is a wizard at Hogwarts and Ron is",
         "Two", "What is two plus two? Two plus two equals four. The sky is blue."]


def _llama_classifier(path, tok, id2label=LABELS, pad_token_id=None, max_positions=512):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, pad_token_id=pad_token_id,
        id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = transformers.LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _alone(path, texts, pairs=None):
    """Logits as transformers gives them for each text (or text pair) on its own (no padding)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    args = [(t,) if pairs is None else (t, p) for t, p in zip(texts, pairs or texts)]
    with torch.no_grad():
        return torch.cat([model(**tok(*a, return_tensors="pt")).logits for a in args])


# --- 1: a row is classified at its own last token, whatever its batch -----------------------------


def test_classifier_with_config_pad_unlike_the_tokenizers_scores_each_row_as_alone(tmp_path):
    # The tests' Llama tokenizer has no pad token; config.json says pad_token_id 0 (<unk>).
    path = _llama_classifier(tmp_path / "pad0", tiny_models.llama_tokenizer(False), pad_token_id=0)
    ours = ev.make_judge(f"classifier:{path}").classifier.logits(TEXTS)
    assert torch.allclose(ours, _alone(path, TEXTS), atol=1e-4)


def test_reward_model_with_config_pad_unlike_the_tokenizers_scores_each_row_as_alone(tmp_path):
    tok = tiny_models.llama_tokenizer(False)
    path = _llama_classifier(tmp_path / "reward", tok, id2label={0: "LABEL_0"}, pad_token_id=0)
    reward = ev.load_reward_model(path)
    prompts = ["Question"] * len(TEXTS)
    expected = _alone(path, prompts, TEXTS)[:, 0].tolist()
    assert ev.reward_scores(reward, prompts, TEXTS) == pytest.approx(expected, abs=1e-4)


def test_classifier_whose_tokenizer_appends_eos_and_has_no_pad_reads_the_real_eos(tmp_path):
    from tokenizers import processors

    bpe = tiny_models._bpe(["<unk>", "<s>", "</s>"])
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                               eos_token="</s>")
    path = _llama_classifier(tmp_path / "eos", tok)
    ours = ev.make_judge(f"classifier:{path}").classifier.logits(TEXTS)
    assert torch.allclose(ours, _alone(path, TEXTS), atol=1e-4)


def test_classifier_whose_tokenizer_has_no_pad_eos_or_unk_does_not_crash(tmp_path):
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_models._bpe([]))
    path = _llama_classifier(tmp_path / "bare", tok)
    flags = ev.make_judge(f"classifier:{path}").flags(TEXTS + [""])
    assert len(flags) == len(TEXTS) + 1 and all(isinstance(f, bool) for f in flags)


# --- 2: one logit ------------------------------------------------------------------------------------


def test_one_logit_classifier_flags_by_sigmoid(tmp_path):
    low = ev.make_judge(f"classifier:{build_tiny_classifier(tmp_path / 'low', [-3.0], {0: 'toxic'})}")
    high = ev.make_judge(f"classifier:{build_tiny_classifier(tmp_path / 'high', [3.0], {0: 'toxic'})}")
    assert low.flags(["x", "y"]) == [False, False]
    assert high.flags(["x", "y"]) == [True, True]
    assert "sigmoid >= 0.5" in low.name


# --- 3: an empty output -----------------------------------------------------------------------------


def test_classifier_judges_a_batch_of_empty_outputs(tmp_path):
    # The word-level tokenizer adds no special token: "" has no token at all.
    tok = tiny_tokenizer()
    assert tok("")["input_ids"] == []
    path = _llama_classifier(tmp_path / "wl", tok, pad_token_id=tok.pad_token_id)
    judge = ev.make_judge(f"classifier:{path}")
    flags = judge.flags(["", "", ""])
    assert len(flags) == 3 and len(set(flags)) == 1
    assert judge.flags(["", "the cat"])[0] == flags[0]  # the same reading, alone or beside a longer row


# --- 4: a short position table ------------------------------------------------------------------------


def test_classifier_with_a_short_position_table_truncates_to_it(tmp_path):
    tok = tiny_models.opt_tokenizer()
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=32, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        id2label={0: "neutral", 1: "toxic"}, label2id={"neutral": 0, "toxic": 1})
    transformers.OPTForSequenceClassification(config).save_pretrained(tmp_path / "opt")
    tok.save_pretrained(tmp_path / "opt")
    long = " ".join(["Harry Potter is a wizard at Hogwarts."] * 12)
    assert len(tok(long)["input_ids"]) > 32
    assert len(ev.make_judge(f"classifier:{tmp_path / 'opt'}").flags([long, "Bees"])) == 2


# --- 5: no classification head --------------------------------------------------------------------------


def _headless(path, **labels):
    """A causal LM's directory whose config names classes: everything but the trained head."""
    path = tiny_models.build_llama(path, chat_template=False)
    config = json.loads((path / "config.json").read_text())
    config.update(labels or dict(id2label={"0": "safe", "1": "unsafe"}, label2id={"safe": 0, "unsafe": 1}))
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_directory_without_a_classification_head_is_refused_when_the_judge_is_made(tmp_path):
    path = _headless(tmp_path / "causal")
    with pytest.raises(UnlearnError, match="not a sequence classifier.*score.weight") as info:
        ev.make_judge(f"classifier:{path}")  # not at its first use, after every answer is generated
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    one = _headless(tmp_path / "one", num_labels=1)
    with pytest.raises(UnlearnError, match="--reward-model .*not a sequence classifier.*score.weight"):
        ev.load_reward_model(one)


def test_eval_refuses_a_headless_judge_or_reward_model_before_its_model_loads(tmp_path, cli, monkeypatch):
    from unlearn import models

    def never(*args, **kwargs):
        raise AssertionError("the evaluated model loaded before the refusal")

    monkeypatch.setattr(models, "load_model", never)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Who?"}\n')
    judge, reward = _headless(tmp_path / "judge"), _headless(tmp_path / "reward", num_labels=1)
    for option in (["--judge", f"classifier:{judge}"], ["--reward-model", str(reward)]):
        code, out, err = cli("eval", str(prompts), "--model", str(judge), *option)
        said = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("unlearn:")]
        assert code == 1 and len(said) == 1 and "not a sequence classifier" in said[0], err


# --- 6: default labels ---------------------------------------------------------------------------------


def test_classifier_without_id2label_has_the_default_labels(tmp_path):
    _llama_classifier(tmp_path, tiny_tokenizer(), id2label={0: "LABEL_0", 1: "LABEL_1"})
    assert "id2label" not in json.loads((tmp_path / "config.json").read_text())
    assert ev.make_judge(f"classifier:{tmp_path}", "1").label_id == 1
    judge = ev.make_judge(f"classifier:{tmp_path}", "LABEL_1")
    assert (judge.label_id, judge.label) == (1, "LABEL_1")
    with pytest.raises(UsageError, match="no label named like unsafe"):
        ev.make_judge(f"classifier:{tmp_path}")


# --- 7: references clipped alike -----------------------------------------------------------------------


def test_hallucinated_response_is_clipped_like_the_response():
    tok = tiny_tokenizer()
    output = "the cat sat on the mat"
    hallucinated = output + " Mr and Mrs Dursley of number four Privet Drive were proud to say that"
    response = "one two three four five six the cat seven eight nine ten red green blue harry potter wand"
    ex = Example(prompt="q", response=response, line=1, extra={"hallucinated_response": hallucinated})
    [clipped] = ev.clip_references([ex], tok, 6)
    assert clipped.extra["hallucinated_response"] == output
    assert clipped.response == "one two three four five six"
    assert ev.hallucination_flags([output], [clipped]) == [True]
    assert ex.extra["hallucinated_response"] == hallucinated  # the caller's row is not changed


# --- 8: --judge-label --------------------------------------------------------------------------------------


def test_judge_label_exact_then_index_then_case_insensitive():
    assert ev.pick_unsafe_label({0: "Toxic", 1: "toxic"}, "toxic") == 1
    assert ev.pick_unsafe_label({0: "Toxic", 1: "toxic"}, "Toxic") == 0
    with pytest.raises(UsageError, match="several labels"):
        ev.pick_unsafe_label({0: "Toxic", 1: "toxic"}, "TOXIC")
    assert ev.pick_unsafe_label({0: "safe", 1: "0"}, "0") == 1  # a name before an index
    assert ev.pick_unsafe_label({0: "safe", 1: "Unsafe"}, "unsafe") == 1


# --- 9: malformed config.json -----------------------------------------------------------------------------


@pytest.mark.parametrize("config", [[1, 2], {"id2label": {"safe": 0, "unsafe": 1}}, {"id2label": ["safe", "unsafe"]},
                                    {"id2label": "safe"}])
def test_malformed_config_is_one_usage_line(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    for make in (lambda: ev.make_judge(f"classifier:{tmp_path}"), lambda: ev.load_reward_model(tmp_path)):
        with pytest.raises(UsageError, match="config.json") as info:
            make()
        assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


# --- 10, 11: docs ---------------------------------------------------------------------------------------------


def test_docs_say_rouge_l_recall_has_no_stemmer():
    line = next(l for l in DOCS.read_text().splitlines() if l.startswith("| `rouge_l_recall`"))
    assert "without its Porter stemmer" in line


def test_docs_degenerate_wording_matches_the_threshold():
    assert not metrics.is_degenerate([1, 1, 1, 1]) and metrics.is_degenerate([1, 1, 1, 1, 1])
    text = " ".join(DOCS.read_text().split())
    assert "repeated more than four times on average" in text and "four times or more" not in text


# --- 12: refusal markers ---------------------------------------------------------------------------------------


def test_as_an_ai_marker_needs_its_article():
    row = Example(prompt="What is machine learning called?", response=None, line=1,
                  extra={"answers": ["machine learning"], "refusal_markers": list(metrics.REFUSAL_MARKERS)})
    assert ev.accuracy_flags(["Machine learning is often referred to as AI."], [row]) == [True]
    assert ev.accuracy_flags(["As an AI, I think machine learning is fun."], [row]) == [False]
    assert ev.accuracy_flags(["as an ai: machine learning"], [row]) == [False]


def test_other_refusal_markers_match_as_before():
    outputs = ["I can't say.", "I can’t say", "I CANNOT do that", "i can not", "I'm sorry, machine learning",
               "I am sorry", "I apologize.", "I'm unable", "I am unable to", "I'm not able", "I am not able",
               "I won't", "I will not", "I will", "Sorry, I", "the can't", "I the cannot", "As AI", "As an AI"]
    for marker in metrics.REFUSAL_MARKERS:
        if marker == "As an AI":
            continue
        for output in outputs:
            assert metrics.contains_refusal(output, [marker]) == metrics.contains_answer(output, [marker])
