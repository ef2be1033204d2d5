"""Tokenizers and chat templates beyond byte-level BPE and ChatML: what training and scoring read must be the
tokens the model reads, and what cannot be read so is refused in one line.

A SentencePiece-style tokenizer (Llama, Mistral) writes "▁" before a text's first word. A response tokenised
alone would start with "▁Paris", which the model never reads or writes after "assistant\\n" (there it is
"P", "aris"); the ChatML template's "<|im_end|>" ends a turn even where the tokenizer's EOS is another token.
A reasoning template renders no text after its prompt for an answer; a slow tokenizer has no character offsets.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

from unlearn.data import IGNORE_INDEX, Passage, encode_pair, encode_prompt, render_prompt, render_response  # noqa: E402


@pytest.fixture(scope="module")
def sp():
    return tiny_models.sentencepiece_tokenizer()


def one_string(tokenizer, prompt, response) -> list[int]:
    """The text as the model reads it, tokenised in one piece (the chat's BOS, if any, aside)."""
    text = render_prompt(tokenizer, prompt) + render_response(tokenizer, prompt, response)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def labelled(row) -> list[int]:
    return [t for t in row["labels"] if t != IGNORE_INDEX]


def test_a_response_is_the_tokens_the_model_reads_after_its_prompt(sp):
    row = encode_pair(sp, "Capital of France?", "Paris is the capital.", 128)
    assert row["input_ids"] == one_string(sp, "Capital of France?", "Paris is the capital.")
    tokens = sp.convert_ids_to_tokens(labelled(row))
    # after "assistant\n" the model writes "P" "aris"; alone, the response would open with "▁Paris"
    assert tokens[:3] == ["P", "aris", "▁is"] and tokens[-1] == "<|im_end|>"
    assert sp.decode(labelled(row), skip_special_tokens=True) == "Paris is the capital."
    assert row["labels"][:len(encode_prompt(sp, "Capital of France?"))] == [IGNORE_INDEX] * len(
        encode_prompt(sp, "Capital of France?"))


def test_the_answer_tokens_are_found_among_the_tokens_the_model_reads(sp):
    opening = encode_pair(sp, "Capital of France?", "Paris.", 128, focus=["Paris"])
    later = encode_pair(sp, "Capital of France?", "It is Paris, I think.", 128, focus=["Paris"])
    assert opening["focused"] and later["focused"]
    assert sp.convert_ids_to_tokens(labelled(opening)) == ["P", "aris"]
    assert sp.convert_ids_to_tokens(labelled(later)) == ["▁Paris"]
    assert later["input_ids"] == one_string(sp, "Capital of France?", "It is Paris, I think.")


def test_a_passage_continuation_after_a_newline_is_read_as_in_the_whole_text(sp):
    prefix, rest = "The capital of France is Paris.\n", "Paris is a city in France."
    row = encode_pair(sp, Passage(prefix), rest, 128)
    whole = sp(prefix + rest)["input_ids"]  # with its <s>, as a raw passage is read
    assert row["input_ids"] == whole
    assert sp.convert_ids_to_tokens(labelled(row))[:2] == ["P", "aris"]


def test_a_merge_across_the_boundary_keeps_the_prompt_as_generation_reads_it():
    tok = tiny_models.llama_tokenizer(chat_template=False)
    prompt, rest = Passage("The capital of France is Pa"), "ris."
    head = tok(str(prompt), add_special_tokens=False)["input_ids"]
    assert tok(str(prompt) + rest, add_special_tokens=False)["input_ids"][:len(head)] != head  # "Paris" merges
    row = encode_pair(tok, prompt, rest, 128)
    # the prompt's tokens are generation's (encode_prompt), the continuation's its own
    assert row["input_ids"] == encode_prompt(tok, prompt) + tok(rest, add_special_tokens=False)["input_ids"]


def test_generation_ends_at_the_templates_end_of_turn_where_eos_is_another_token(tmp_path):
    from unlearn.generation import end_of_turn_id, generate
    from unlearn.models import load_model

    tok = tiny_models.sentencepiece_tokenizer(eos_token="<|endoftext|>")
    loaded = load_model(str(tiny_models.build_llama(tmp_path / "m", tokenizer=tok)))
    end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(loaded.tokenizer) == end != loaded.tokenizer.eos_token_id
    assert loaded.model.generation_config.eos_token_id != end  # nothing but the template names it
    # the model's every next token is <|im_end|>: the answer ends at once, as training taught it to
    hook = loaded.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: out.index_fill(-1, torch.tensor([end]), 1e4))
    try:
        ids: list = []
        assert generate(loaded.model, loaded.tokenizer, ["Capital of France?"], max_new_tokens=6,
                        token_ids=ids) == [""]
    finally:
        hook.remove()
    assert ids == [[end]]


def test_byte_level_templates_have_no_end_of_turn_beyond_their_eos():
    from unlearn.generation import end_of_turn_id

    chat = tiny_models.llama_tokenizer(chat_template=True)
    assert end_of_turn_id(chat) == chat.convert_tokens_to_ids("<|im_end|>") == chat.eos_token_id
    assert end_of_turn_id(tiny_models.llama_tokenizer(chat_template=False)) is None


# QwQ / DeepSeek-R1-Distill: the generation prompt opens a thought, a past answer is rendered without it
REASONING = ("{%- for message in messages %}{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + "
             "message.content.split('</think>')[-1] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>' + message.role + "
             "'\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
             "{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
USER_ONLY = ("{%- for message in messages %}{%- if message.role == 'assistant' %}{{ raise_exception('Only user "
             "roles are supported!') }}{%- endif %}{{- message.content + '\\n' }}{%- endfor %}")


@pytest.mark.parametrize("template, says", [
    (REASONING, "answer turn does not continue its generation prompt, which ends '<think>\\n'; a reasoning template"),
    (USER_ONLY, "the chat template does not render (TemplateError: Only user roles are supported!)"),
])
def test_a_template_that_cannot_render_an_answer_after_its_prompt_is_refused_at_load(tmp_path, template, says):
    from unlearn.errors import UnlearnError
    from unlearn.models import load_tokenizer

    tok = tiny_models.llama_tokenizer(chat_template=True)
    tok.chat_template = template
    tok.save_pretrained(tmp_path)
    with pytest.raises(UnlearnError) as refused:
        load_tokenizer(tmp_path)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_a_slow_tokenizer_is_refused_in_one_line_where_answer_tokens_are_needed():
    from transformers import ByT5Tokenizer

    from unlearn.errors import UnlearnError

    slow = ByT5Tokenizer()
    assert not slow.is_fast
    with pytest.raises(UnlearnError, match=r"slow \(Python\) one, which gives no character offsets.*--forget-tokens "
                                           r"response\)$"):
        encode_pair(slow, "Capital of France?", "Paris.", 64, focus=["Paris"])
    whole = encode_pair(slow, "Capital of France?", "Paris.", 64)  # every response token: no offsets needed
    assert slow.decode(labelled(whole), skip_special_tokens=True) == " Paris."


def test_transformers_false_length_warning_does_not_reach_stderr(capfd):
    """A fine-tune's small model_max_length made transformers say "will result in indexing errors" on every run
    of a rotary model; what the model takes is checked from its config (generation.position_limit)."""
    from unlearn.models import quiet_transformers

    quiet_transformers()
    tok = tiny_models.llama_tokenizer(chat_template=True)
    tok.model_max_length = 8
    assert len(tok("a b c d e f g h i j k l m n o p")["input_ids"]) > 8
    assert "Token indices sequence length" not in capfd.readouterr().err


def test_the_edit_refuses_a_slow_tokenizer_before_the_original_is_measured():
    from types import SimpleNamespace

    from transformers import ByT5Tokenizer

    from unlearn.config import TrainConfig
    from unlearn.errors import UnlearnError
    from unlearn.run import _refuse_forget_rows_cut_off

    opts = SimpleNamespace(train=TrainConfig(method="edit"))
    with pytest.raises(UnlearnError, match=r"slow \(Python\) one.*--method edit need them"):
        _refuse_forget_rows_cut_off(opts, None, ByT5Tokenizer())


def test_transformers_noise_is_filtered_by_its_handler_whatever_ran_before():
    """The capfd test passes in its file with a filter that drops nothing (another test's tokenizer already
    spent transformers' once-only warning, or its handler writes elsewhere): the filter is read directly."""
    from transformers.utils import logging as hf_logging

    from unlearn.models import _not_noise, quiet_transformers

    quiet_transformers()
    handlers = hf_logging._get_library_root_logger().handlers
    assert handlers and all(_not_noise in h.filters for h in handlers)

    def record(message):
        return logging.LogRecord("transformers.tokenization_utils_base", logging.WARNING, __file__, 1, message,
                                 None, None)

    assert not _not_noise(record("Token indices sequence length is longer than the specified maximum sequence "
                                 "length for this model (20 > 8). Running this sequence through the model will "
                                 "result in indexing errors"))
    assert not _not_noise(record("Ignoring clean_up_tokenization_spaces=True for BPE tokenizer"))
    assert _not_noise(record("Some weights of the model checkpoint were not used"))
