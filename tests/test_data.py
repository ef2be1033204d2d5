"""data.py: reading and validation, one rendering, response-only labels, padding from the tokenizer."""

import json

import pytest

from unlearn.data import (IGNORE_INDEX, check_answers_spelled, collate, encode_pair, encode_prompt, read_examples,
                          render_prompt, split_passage)
from unlearn.data import Passage, answer_in_format, forget_pair, passage_words
from unlearn.errors import UnlearnError
from unlearn.models import load_tokenizer


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def test_aliases_extra_fields_and_blank_lines(tmp_path):
    path = write(tmp_path, [
        {"prompt": "p1", "response": "r1", "answers": ["x"]},
        "",
        {"question": "p2", "answer": "r2"},
        {"instruction": "p3", "output": "r3", "hallucinated_response": "q"},
    ])
    rows = read_examples(path)
    assert [(r.prompt, r.response, r.line) for r in rows] == [("p1", "r1", 1), ("p2", "r2", 3), ("p3", "r3", 4)]
    assert rows[0].extra == {"answers": ["x"]} and rows[2].extra == {"hallucinated_response": "q"}


def test_a_byte_order_mark_and_windows_line_ends_are_read_as_text(tmp_path):
    """What Windows editors and spreadsheet exports write: a UTF-8 BOM first, CRLF line ends."""
    rows = [{"prompt": "p1", "response": "r1", "answers": ["r1"]}, {"prompt": "p2", "response": "r2"}]
    plain = write(tmp_path, rows, "plain.jsonl")
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b"\n", b"\r\n"))
    assert read_examples(windows) == read_examples(plain)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "p"}\r\n')
    with pytest.raises(UnlearnError, match="bad.jsonl:1: no response"):  # line numbers unchanged by the mark
        read_examples(bad)


def test_answers_must_be_spelled_in_their_response(tmp_path):
    """A forget row's answers are looked for in its own response as the leak judge matches them."""
    ok = read_examples(write(tmp_path, [
        {"prompt": "Who?", "response": "It was J.K.Rowling's work.", "answers": ["rowling"]},  # punctuation splits
        {"prompt": "Who?", "response": "Nobody knows.", "answers": ["Marlowe", "nobody"]},  # one of them is enough
        {"prompt": "What?", "response": "No answers field here."},
        # a passage: looked for in its continuation, which the judge reads (its prefix names Marlowe)
        {"text": "Marlowe wrote plays in London before Shakespeare", "answers": ["Shakespeare"]},
    ], "ok.jsonl"))
    check_answers_spelled(ok, tmp_path / "ok.jsonl")
    bad = read_examples(write(tmp_path, [
        {"prompt": "Who?", "response": "It was Rowling.", "answers": ["Rowling"]},
        {"prompt": "Who wrote Hamlet?", "response": "Shakespeare.", "answers": ["Marlowe", "Kit"]},
        {"prompt": "Where?", "response": "In Parisian cafés.", "answers": ["Paris"]},  # a whole word only
    ], "bad.jsonl"))
    with pytest.raises(UnlearnError) as err:
        check_answers_spelled(bad, tmp_path / "bad.jsonl")
    assert str(err.value) == (f"{tmp_path / 'bad.jsonl'}:2: none of its answers (\"Marlowe\", \"Kit\") occurs in its "
                              f"response; write each answer as it is spelled there")
    with pytest.raises(UnlearnError, match="bad.jsonl:3: none of its answers"):
        check_answers_spelled(bad[2:], tmp_path / "bad.jsonl")


def test_text_passages_split_into_prefix_and_continuation(tmp_path):
    rows = read_examples(write(tmp_path, [{"text": "one two three four five six"}]))
    assert rows[0].is_passage
    assert (rows[0].prompt, rows[0].response) == ("one two three", " four five six")
    long = " ".join(f"w{i}" for i in range(300))
    prefix, rest = split_passage(long)
    assert len(prefix.split()) == 64 and len(rest.split()) == 236  # prefix capped at 64 words


def test_a_passage_without_spaces_is_cut_at_its_line_breaks(tmp_path):
    # the space rule made it one word: prefix everything, continuation " ", trained on nothing, never leaking
    rows = read_examples(write(tmp_path, [{"text": "Alpha\nBeta\nGamma\tDelta"}]))
    assert (rows[0].prompt, rows[0].response) == ("Alpha\nBeta", "\nGamma\tDelta")
    assert forget_pair(rows[0]) == ("Alpha", "\nBeta\nGamma\tDelta")
    # with spaces, the rule is the spaces' (every committed passage is cut as before)
    assert split_passage("one\n\ntwo three four") == ("one\n\ntwo", " three four")


def test_a_chinese_passage_is_cut_at_half_its_characters(tmp_path):
    # written without spaces, it was refused as "needs at least two words"; with one space (a Latin name) it was
    # cut there, far from its half
    text = "苹果公司由史蒂夫·乔布斯创立。主要产品包括 iPhone 手机。"
    rows = read_examples(write(tmp_path, [{"text": text}, {"text": "长城是中国古代的军事防御工程。"}]))
    assert (rows[0].prompt, rows[0].response) == ("苹果公司由史蒂夫·乔布斯", "创立。主要产品包括 iPhone 手机。")
    assert (rows[1].prompt, rows[1].response) == ("长城是中国古代", "的军事防御工程。")  # 15 characters, 7 first
    assert rows[0].prompt + rows[0].response == text


@pytest.mark.parametrize("line, message", [
    ("{not json", "data.jsonl:2: not valid JSON"),
    ("[1, 2]", "data.jsonl:2: expected a JSON object, got an array"),
    ('{"prompt": 3, "response": "r"}', "data.jsonl:2: 'prompt' must be a string, got a number"),
    ('{"prompt": "p"}', "data.jsonl:2: no response"),
    ('{"response": "r"}', "data.jsonl:2: no prompt"),
    ('{"prompt": "  ", "response": "r"}', "data.jsonl:2: 'prompt' is empty"),
    ('{"prompt": "p", "question": "q", "response": "r"}', "data.jsonl:2: both 'prompt' and 'question'"),
    ('{"prompt": "p", "response": "r", "answers": "x"}', "data.jsonl:2: 'answers' must be a non-empty list"),
    ('{"text": "single"}', "data.jsonl:2: 'text' needs at least two words"),
    ('{"text": 5}', "data.jsonl:2: 'text' must be a string"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path, [{"prompt": "ok", "response": "ok"}, line])
    with pytest.raises(UnlearnError) as err:
        read_examples(path)
    assert str(err.value).startswith(str(tmp_path / message.split(":")[0]) + ":" + message.split(":", 1)[1])


def test_binary_empty_missing_and_directory(tmp_path):
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b'{"prompt": "p", "response": "r"}\n\xff\xfe\x00\x01')
    with pytest.raises(UnlearnError, match=r"b\.jsonl:2: not UTF-8"):
        read_examples(binary)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UnlearnError, match="no examples"):
        read_examples(empty)
    with pytest.raises(UnlearnError, match="no such file"):
        read_examples(tmp_path / "missing.jsonl")
    with pytest.raises(UnlearnError, match="is a directory"):
        read_examples(tmp_path)


def test_prompt_only_rows_allowed_for_evaluation(tmp_path):
    rows = read_examples(write(tmp_path, [{"prompt": "p"}]), need_response=False)
    assert rows[0].response is None


def _decode_parts(tok, feature):
    ids, labels = feature["input_ids"], feature["labels"]
    prompt = [i for i, l in zip(ids, labels) if l == IGNORE_INDEX]
    response = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    return tok.decode(prompt), tok.decode(response)


def test_chat_template_rendering_and_labels(llama_dir):
    tok = load_tokenizer(llama_dir)
    assert render_prompt(tok, "Hi?") == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    f = encode_pair(tok, "Hi?", "Paris is the capital.", 128)
    prompt, response = _decode_parts(tok, f)
    assert prompt == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert response == "Paris is the capital.<|im_end|>"  # the template's own end-of-turn is learned
    # The labels are exactly the input ids on the response part.
    n = sum(l != IGNORE_INDEX for l in f["labels"])
    assert f["labels"][-n:] == f["input_ids"][-n:]
    # Generation sees exactly the training prompt.
    assert encode_prompt(tok, "Hi?") == f["input_ids"][:-n]


def test_fallback_rendering_with_bos_and_no_eos(llama_plain_dir, opt_dir):
    """Without a chat template the response is trained and scored without an EOS after it: a base model
    never writes one there (its answer ends where it starts the next turn: `answer_in_format`)."""
    for directory, bos in ((llama_plain_dir, "<s>"), (opt_dir, "</s>")):
        tok = load_tokenizer(directory)
        f = encode_pair(tok, "What is two plus two?", "Four.", 128)
        assert f["input_ids"][0] == tok.bos_token_id
        prompt, response = _decode_parts(tok, f)
        assert prompt == f"{bos}### Question: What is two plus two?\n### Answer:"
        assert response == " Four."
        assert tok.eos_token_id not in f["input_ids"][1:]


def test_the_fallback_format_is_said_where_questions_are_rendered_in_it(llama_plain_dir, llama_dir):
    from unlearn.data import Example, fallback_note

    plain, chat = load_tokenizer(llama_plain_dir), load_tokenizer(llama_dir)
    passage, question = Example(Passage("Once upon"), " a time", 1), Example("Capital of France?", "Paris.", 2)
    assert fallback_note(plain, [passage, question]).startswith("no chat template: prompts are rendered as ")
    assert fallback_note(plain, [passage]) is None  # raw text: no format
    assert fallback_note(plain, [passage], questions=True) is not None  # the automatic probes are questions
    assert fallback_note(chat, [question], questions=True) is None


def test_an_answer_in_the_fallback_format_ends_at_its_next_turn(llama_plain_dir, llama_dir):
    plain, chat = load_tokenizer(llama_plain_dir), load_tokenizer(llama_dir)
    invented = "Paris.\n### Question: Who wrote Hamlet?\n### Answer: Shakespeare."
    assert answer_in_format(plain, "Capital of France?", invented) == "Paris."
    assert answer_in_format(plain, Passage("Once upon"), invented) == invented  # a passage has no turns
    assert answer_in_format(chat, "Capital of France?", invented) == invented  # a template ends turns by token
    headed = "Shakespeare.\n### Author\nWilliam Shakespeare wrote it."  # a Markdown heading, not a turn
    assert answer_in_format(plain, "Who wrote Hamlet?", headed) == headed
    # a turn of the model's own, and one the token budget cut while it was written
    assert answer_in_format(plain, "Q?", "Paris.\n#### Answer: Rome.") == "Paris."
    assert answer_in_format(plain, "Q?", "Paris.\n### Qu") == "Paris."
    assert answer_in_format(plain, "Q?", "Paris.\n### An") == "Paris."
    assert answer_in_format(plain, "Q?", "Paris.\n### Author") == "Paris.\n### Author"  # a heading, cut or not
    assert answer_in_format(plain, "Q?", "Paris.\n## Answer") == "Paris.\n## Answer"  # a finished two-# heading
    assert answer_in_format(plain, "Q?", "Paris.\n##") == "Paris."  # perhaps a third '#' to come
    # an answer that restates its own turn first is the answer, up to the next turn
    restated = "\n### Answer: Shakespeare wrote it.\n### Question: Who painted it?"
    assert answer_in_format(plain, "Who wrote Hamlet?", restated) == "\n### Answer: Shakespeare wrote it."


def test_pad_id_comes_from_the_tokenizer(llama_plain_dir, opt_dir):
    assert load_tokenizer(opt_dir).pad_token_id == 1  # OPT's own <pad>
    tok = load_tokenizer(llama_plain_dir)  # no pad token: EOS stands in
    assert tok.pad_token_id == tok.eos_token_id == 2


def test_the_pad_token_set_for_padding_is_not_written_into_an_output(llama_plain_dir, tmp_path):
    import json

    from unlearn.models import load_model, save_model

    lm = load_model(str(llama_plain_dir), log=lambda m: None)
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token  # EOS stands in, in memory
    save_model(lm.model, lm.tokenizer, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()).get("pad_token") is None
    assert lm.tokenizer.pad_token_id == lm.tokenizer.eos_token_id  # and still in memory after


def test_collate_pads_dynamically_and_masks(opt_dir):
    tok = load_tokenizer(opt_dir)
    short = encode_pair(tok, "Hi", "Yes.", 64)
    long = encode_pair(tok, "What is two plus two?", "Two plus two equals four.", 64)
    batch = collate([short, long], tok.pad_token_id)
    width = len(long["input_ids"])
    assert batch["input_ids"].shape == (2, width)  # the longest row, not max_length
    n = len(short["input_ids"])
    assert batch["input_ids"][0, n:].tolist() == [1] * (width - n)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][0, n:].tolist() == [IGNORE_INDEX] * (width - n)


def test_max_length_keeps_response_and_cuts_prompt_from_the_left(opt_dir):
    tok = load_tokenizer(opt_dir)
    response_ids = tok(" Two plus two equals four.", add_special_tokens=False)["input_ids"]
    budget = 2 * len(response_ids) + 2  # the prompt's half leaves room for the whole response
    f = encode_pair(tok, "word " * 100, "Two plus two equals four.", budget)
    assert len(f["input_ids"]) == budget
    assert f["input_ids"][-len(response_ids):] == response_ids  # the whole response survives
    prompt_ids = encode_prompt(tok, "word " * 100)
    kept = budget - len(response_ids)
    assert f["input_ids"][:kept] == prompt_ids[-kept:]  # the prompt lost its left part
    g = encode_pair(tok, "Hi", "four " * 100, 64)  # a short prompt stays whole; the response is cut
    assert len(g["input_ids"]) == 64 and g["input_ids"][:len(encode_prompt(tok, "Hi"))] == encode_prompt(tok, "Hi")


def test_passages_are_continued_as_raw_text_even_with_a_chat_template(tmp_path, llama_dir):
    tok = load_tokenizer(llama_dir)
    row = read_examples(write(tmp_path, [{"text": "The capital of France is Paris and the sky is blue"}]))[0]
    assert render_prompt(tok, row.prompt) == "The capital of France is"
    f = encode_pair(tok, row.prompt, row.response, 128)
    prompt, response = _decode_parts(tok, f)
    assert prompt == "<s>The capital of France is"  # the tokenizer's BOS, no template
    assert response == " Paris and the sky is blue"  # no end-of-text: the passage goes on


def test_focus_narrows_labels_to_the_answer_tokens(llama_dir):
    tok = load_tokenizer(llama_dir)
    f = encode_pair(tok, "Who wrote it?", "The books are written by J.K. Rowling.", 128, focus=["rowling"])
    kept = [i for i, l in zip(f["input_ids"], f["labels"]) if l != IGNORE_INDEX]
    assert tok.decode(kept).strip() == "Rowling"  # case-insensitive match, only its tokens
    # --forget-tokens names: and the rest of the name it ends (spans.whole_names)
    named = encode_pair(tok, "Who wrote it?", "The books are written by J.K. Rowling.", 128, focus=["rowling"],
                        names=True)
    assert tok.decode([i for i, l in zip(named["input_ids"], named["labels"]) if l != IGNORE_INDEX]).strip() \
        == "J.K. Rowling"
    whole = encode_pair(tok, "Who wrote it?", "The books are written by J.K. Rowling.", 128)
    assert f["input_ids"] == whole["input_ids"]  # same inputs, narrower labels
    absent = encode_pair(tok, "Who wrote it?", "Nobody knows.", 128, focus=["Rowling"])
    assert absent["labels"] == encode_pair(tok, "Who wrote it?", "Nobody knows.", 128)["labels"]  # falls back


def test_an_answer_is_never_found_in_the_end_of_turn_marker(llama_dir, llama_plain_dir):
    # "<|im_end|>" reads as the words "im", "end" (and the fallback's "</s>" as "s"): an answer "end"
    # must label the response's own "end", never the end-of-turn token the model stops on.
    for directory, answer in ((llama_dir, "end"), (llama_dir, "im"), (llama_plain_dir, "s")):
        tok = load_tokenizer(directory)
        f = encode_pair(tok, "How does the film finish?", f"Happily, at the {answer}.", 128, focus=[answer])
        kept = [i for i, l in zip(f["input_ids"], f["labels"]) if l != IGNORE_INDEX]
        assert f["focused"] and tok.decode(kept).strip() == answer, (directory, answer, tok.decode(kept))
        assert tok.eos_token_id not in kept
    # a response that only the marker would match is scored whole, as one the answer is not in
    tok = load_tokenizer(llama_dir)
    f = encode_pair(tok, "How does it finish?", "Happily.", 128, focus=["end"])
    assert not f["focused"] and f["labels"] == encode_pair(tok, "How does it finish?", "Happily.", 128)["labels"]


def test_answer_mask_finds_answers_as_the_leak_judge_does(llama_dir):
    from unlearn.data import answer_token_mask

    tok = load_tokenizer(llama_dir)
    marked = lambda text, answers: "".join(  # noqa: E731
        text[a:b] for (a, b), keep in zip(tok(text, add_special_tokens=False, return_offsets_mapping=True)
                                          ["offset_mapping"], answer_token_mask(tok, text, answers)) if keep)
    assert marked("About 1,000 people.", ["1000"]).strip() == "1,000"  # the same number
    assert marked("By J.K.Rowling's pen.", ["rowling"]).strip() == "Rowling"
    # the leak judge's occurrences (and --method edit's) stay the answer's own; the loss's focus is the name
    assert marked("Developed by Albert Einstein.", ["Einstein"]).strip() == "Einstein"
    named = [(a, b) for (a, b), keep in zip(tok("Developed by Albert Einstein.", add_special_tokens=False,
                                                  return_offsets_mapping=True)["offset_mapping"],
                                              answer_token_mask(tok, "Developed by Albert Einstein.", ["Einstein"],
                                                                names=True)) if keep]
    assert "Developed by Albert Einstein."[named[0][0]:named[-1][1]].strip() == "Albert Einstein"
    assert answer_token_mask(tok, "A Parisian café.", ["Paris"]) is None  # not a whole word: every token kept


def test_focus_from_derived_answers_of_a_row_without_answers(tmp_path, llama_dir):
    from unlearn.spans import row_answers

    tok = load_tokenizer(llama_dir)
    row, given, passage = read_examples(write(tmp_path, [
        {"prompt": "Who wrote Hamlet?", "response": "Hamlet was written by William Shakespeare."},
        {"prompt": "Who wrote Hamlet?", "response": "Hamlet was written by William Shakespeare.",
         "answers": ["Hamlet"]},
        {"text": "Mr and Mrs Dursley of number four Privet Drive"},
    ]))
    answers, source = row_answers(row)
    assert source == "derived"
    f = encode_pair(tok, row.prompt, row.response, 128, answers)
    kept = [i for i, l in zip(f["input_ids"], f["labels"]) if l != IGNORE_INDEX]
    assert tok.decode(kept).strip() == "William Shakespeare"  # the question's words are not pushed down
    g = encode_pair(tok, given.prompt, given.response, 128, row_answers(given)[0])
    assert tok.decode([i for i, l in zip(g["input_ids"], g["labels"]) if l != IGNORE_INDEX]).strip() == "Hamlet"
    # a passage has no answers: every continuation token counts (as --forget-tokens response)
    assert row_answers(passage) == (None, None)
    p = encode_pair(tok, passage.prompt, passage.response, 128, row_answers(passage)[0])
    assert p == encode_pair(tok, passage.prompt, passage.response, 128)


def test_a_passage_half_in_a_script_without_spaces_keeps_the_space_rule():
    # "mostly" is more than half: 2 of 4 letters are CJK, so the spaces cut it (a CJK-majority text goes by character)
    assert passage_words("東京 ab") == (["東京", "ab"], [" "])
    assert passage_words("東京 a") == (["東", "京", "a"], ["", " "])  # 2 of 3: one word a character


def test_a_heading_that_opens_with_a_turn_word_is_no_turn(llama_plain_dir):
    plain = load_tokenizer(llama_plain_dir)
    # a turn is the whole marker, colon included: a heading "### Questions" is the answer's own
    text = "Paris.\n### Questions and answers\nParis is the capital."
    assert answer_in_format(plain, "Q?", text) == text
    # and three or more '#': a two-# line is a heading even when it reads "Answer:"
    text = "Paris.\n## Answer: the capital\nParis."
    assert answer_in_format(plain, "Q?", text) == text


def test_an_answer_restating_its_turn_after_a_blank_is_still_the_answer(llama_plain_dir):
    plain = load_tokenizer(llama_plain_dir)
    # the model's continuation of "### Answer:" often opens with a space: " \n### Answer: ..." restates the turn
    restated = " \n### Answer: Shakespeare wrote it.\n### Question: Who painted it?"
    assert answer_in_format(plain, "Who wrote Hamlet?", restated) == " \n### Answer: Shakespeare wrote it."


def test_an_answer_that_opens_with_the_next_question_is_empty(llama_plain_dir):
    # (review 112) it was kept, so the leak judge and fluency read the model's invented next question as its answer
    plain = load_tokenizer(llama_plain_dir)
    assert answer_in_format(plain, "Say nothing.", "\n### Question: What?") == ""
    assert answer_in_format(plain, "Say nothing.", " \n#### Question: Who is?\n### Answer: Me.") == " "


def test_a_budget_cut_marker_with_no_answer_before_it_is_kept(llama_plain_dir):
    plain = load_tokenizer(llama_plain_dir)
    # the answer restates its own turn and the budget ends inside it: there is no answer before it to keep
    assert answer_in_format(plain, "Q?", "\n### Answer") == "\n### Answer"
    assert answer_in_format(plain, "Q?", " \n### Qu") == " \n### Qu"


def test_an_alpaca_rows_input_follows_its_instruction_after_a_blank_line():
    from unlearn.data import parse_line

    row = {"instruction": "Translate the sentence into French.", "input": "The capital of France is Paris.",
           "output": "La capitale de la France est Paris.", "answers": ["Paris"]}
    ex = parse_line(row, "a.jsonl:1", need_response=True)
    assert ex.prompt == "Translate the sentence into French.\n\nThe capital of France is Paris."
    assert "input" not in ex.extra and ex.extra["answers"] == ["Paris"]
    assert parse_line({**row, "input": " "}, "a.jsonl:1", need_response=True).prompt == row["instruction"]
    with pytest.raises(UnlearnError, match="a.jsonl:1: 'input' must be a string, got null"):
        parse_line({**row, "input": None}, "a.jsonl:1", need_response=True)
