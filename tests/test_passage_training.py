"""A `text` passage: with --whole-passage the forget loss trains on it from its first words on; the leak test keeps
its half split (and without the flag, training does too)."""

import json

import pytest

from unlearn import data
from unlearn.data import IGNORE_INDEX, Example, Passage, encode_pair, forget_pair, read_examples
from unlearn.models import load_tokenizer

TEXT = "The capital of France is Paris and the sky is blue"  # 11 words
# The tiny Llama tokenizer (tests/tiny_models.py) on TEXT, BOS first; token i sits at position i.
TOKENS = ["<s>", "The", "Ġc", "ap", "it", "al", "Ġ", "of", "ĠFrance", "Ġis", "ĠParis", "Ġand", "Ġt", "h", "e",
          "Ġs", "ky", "Ġis", "Ġb", "lu", "e"]


def passage_row(tmp_path, text=TEXT) -> Example:
    path = tmp_path / "forget.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    return read_examples(path)[0]


def labelled(tok, features) -> list[int]:
    """The positions whose token the loss reads."""
    return [i for i, label in enumerate(features["labels"]) if label != IGNORE_INDEX]


@pytest.mark.parametrize("context, first_labelled", [
    (4, 9),  # after "<s> The capital of France": " is Paris ..." is pushed down
    (1, 2),  # after "<s> The"
])
def test_the_forget_pair_labels_every_token_after_the_context(tmp_path, llama_dir, monkeypatch, context,
                                                              first_labelled):
    monkeypatch.setattr(data, "PASSAGE_CONTEXT_WORDS", context)
    tok = load_tokenizer(llama_dir)
    row = passage_row(tmp_path)
    f = encode_pair(tok, *forget_pair(row), 128)
    assert tok.convert_ids_to_tokens(f["input_ids"]) == TOKENS  # the whole passage, tokenised as one text
    assert labelled(tok, f) == list(range(first_labelled, len(TOKENS)))
    assert f["labels"][first_labelled:] == f["input_ids"][first_labelled:]


def test_the_leak_test_split_is_unchanged(tmp_path, llama_dir, monkeypatch):
    monkeypatch.setattr(data, "PASSAGE_CONTEXT_WORDS", 4)
    tok = load_tokenizer(llama_dir)
    row = passage_row(tmp_path)
    # Evaluation: the prefix is the first half of the words, the continuation the rest.
    assert (row.prompt, row.response) == ("The capital of France is", " Paris and the sky is blue")
    assert isinstance(row.prompt, Passage)
    f = encode_pair(tok, row.prompt, row.response, 128)
    assert f["input_ids"] == encode_pair(tok, *forget_pair(row), 128)["input_ids"]
    assert labelled(tok, f) == list(range(10, len(TOKENS)))  # from " Paris" on


def test_the_context_is_never_longer_than_the_leak_tests_prefix(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PASSAGE_CONTEXT_WORDS", 8)
    row = passage_row(tmp_path, "one two three four five six")
    assert forget_pair(row) == ("one two three", " four five six")  # as the leak test: nothing less is trained
    assert isinstance(forget_pair(row)[0], Passage)  # still continued as raw text


def test_the_passage_is_rebuilt_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PASSAGE_CONTEXT_WORDS", 2)
    text = "A  line\nwith  odd spacing, and more words after it here"
    prompt, response = forget_pair(passage_row(tmp_path, text))
    assert (prompt, prompt + response) == ("A ", text)  # "A", "" are the first two words of split(" ")


def test_other_rows_train_on_their_own_prompt_and_response():
    row = Example("Who wrote Hamlet?", "Shakespeare.", 1)
    assert forget_pair(row) == ("Who wrote Hamlet?", "Shakespeare.")


@pytest.mark.parametrize("forget_tokens", ["answers", "response"])
def test_the_unlearner_trains_on_the_forget_pair(tmp_path, llama_dir, monkeypatch, forget_tokens):
    from dataclasses import replace

    from unlearn.models import load_model
    from unlearn.spans import row_answers
    from unlearn.train import TrainConfig, Unlearner

    monkeypatch.setattr(data, "PASSAGE_CONTEXT_WORDS", 4)
    lm = load_model(str(llama_dir), log=lambda m: None)
    for p in lm.model.parameters():
        p.requires_grad_(True)
    normal = [Example("What is two plus two?", "Four.", 1)]
    config = TrainConfig(method="ga", forget_tokens=forget_tokens, batch_size=1, check_every=0, whole_passage=True)
    u = Unlearner(lm.model, lm.tokenizer, [passage_row(tmp_path)], normal, config)
    assert labelled(lm.tokenizer, u.forget[0]) == list(range(9, len(TOKENS)))
    assert u.forget_prompts == ["The capital of France is"]  # mismatch rows keep the leak test's prefix
    # The default (--whole-passage off, the dev split's choice): the leak test's continuation only.
    row = passage_row(tmp_path)
    default = Unlearner(lm.model, lm.tokenizer, [row], normal, replace(config, whole_passage=False))
    focus = row_answers(row)[0] if forget_tokens == "answers" else None
    assert default.forget[0] == encode_pair(lm.tokenizer, row.prompt, row.response, config.max_length, focus)
    assert labelled(lm.tokenizer, default.forget[0]) == list(range(TOKENS.index("ĠParis"), len(TOKENS)))


def test_answers_of_a_passage_are_found_in_the_whole_trained_text(tmp_path, llama_dir, monkeypatch):
    """--forget-tokens answers on a `text` row that lists `answers`: only their tokens, wherever they are
    after the context — here in the first half, which the leak test's continuation does not contain."""
    from unlearn.spans import row_answers

    monkeypatch.setattr(data, "PASSAGE_CONTEXT_WORDS", 1)
    tok = load_tokenizer(llama_dir)
    path = tmp_path / "forget.jsonl"
    path.write_text(json.dumps({"text": TEXT, "answers": ["France"]}) + "\n")
    row = read_examples(path)[0]
    f = encode_pair(tok, *forget_pair(row), 128, row_answers(row)[0])
    assert labelled(tok, f) == [TOKENS.index("ĠFrance")]
