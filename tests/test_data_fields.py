"""Field checks that must happen when a file is read, before any model loads: a passage (`text`) row's
fields are checked as a chat row's are, a `subject` must occur in the prompt the model sees, and an
input that can be read only once (a pipe) is refused before it is read."""

import json
import os
import threading

import pytest

from test_bad_input import assert_one_line_and_nothing_written, snapshot
from unlearn.data import parse_line, read_examples
from unlearn.errors import UnlearnError

PASSAGE = "The Battle of Waterloo was fought in 1815 in Belgium by Napoleon against Wellington."
QUESTION = "What is the capital of France?"


def refused(obj: dict, need_response: bool = True) -> str:
    """The one-line message parse_line refuses OBJ with, as row 7 of rows.jsonl."""
    with pytest.raises(UnlearnError) as caught:
        parse_line(obj, "rows.jsonl:7", need_response)
    message = str(caught.value)
    assert message.startswith("rows.jsonl:7: ") and "\n" not in message, message
    return message


# --- passage rows: the same field checks as chat rows ---------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"answers": [5]}, "'answers' must be a non-empty list of non-empty strings"),
    ({"answers": "Wellington"}, "'answers' must be a non-empty list of non-empty strings"),
    ({"answers": []}, "'answers' must be a non-empty list of non-empty strings"),
    ({"paraphrased_response": 5}, "'paraphrased_response' must be a non-empty string, got a number"),
    ({"paraphrased_response": " "}, "'paraphrased_response' must be a non-empty string, got an empty string"),
    ({"hallucinated_response": ["x"]}, "'hallucinated_response' must be a non-empty string, got an array"),
    ({"perturbed_responses": "x"}, "'perturbed_responses' must be a non-empty list of non-empty strings"),
    ({"perturbed_responses": ["a", ""]}, "'perturbed_responses' must be a non-empty list of non-empty strings"),
    ({"perturbed_responses": []}, "'perturbed_responses' must be a non-empty list of non-empty strings"),
    ({"refusal_markers": "I can't"}, "'refusal_markers' must be a list of non-empty strings"),
    ({"refusal_markers": ["I can't", " "]}, "'refusal_markers' must be a list of non-empty strings"),
    # where a row's derived answers are kept once read: from a file it would be trusted, or crash the judge
    ({"_derived": 1}, "'_derived' is a field unlearn keeps for itself; rename or drop it"),
    ({"_derived": {"answers": ["zzz"], "rule": "x"}}, "'_derived' is a field unlearn keeps for itself"),
])
def test_a_passage_row_gets_the_chat_rows_field_checks(fields, message):
    chat = refused({"prompt": QUESTION, "response": "Paris.", **fields})
    passage = refused({"text": PASSAGE, **fields})
    assert message in passage and passage == chat  # the very same message, whichever kind of row


def test_a_passage_row_with_good_fields_is_read():
    example = parse_line({"text": PASSAGE, "answers": ["Wellington"], "hallucinated_response": "Napoleon won."},
                         "rows.jsonl:1", True)
    assert example.is_passage and example.extra == {"answers": ["Wellington"], "hallucinated_response": "Napoleon won."}


# --- a field misspelt, TOFU's names ------------------------------------------------------------------

CHAT = {"prompt": QUESTION, "response": "Paris."}


@pytest.mark.parametrize("row, name, meant", [
    ({**CHAT, "Answers": ["Paris"]}, "Answers", "answers"),  # case
    ({**CHAT, "answer_s": ["Paris"]}, "answer_s", "answers"),  # a separator
    ({**CHAT, "subjects": "France"}, "subjects", "subject"),  # a plural, for a field naming a list or a subject
    ({**CHAT, "anwsers": ["Paris"]}, "anwsers", "answers"),  # two letters swapped
    ({**CHAT, "ansers": ["Paris"]}, "ansers", "answers"),  # one left out
    ({**CHAT, "refusal-marker": ["No"]}, "refusal-marker", "refusal_markers"),  # a separator and the plural
    ({**CHAT, "refusalMarkers": ["No"]}, "refusalMarkers", "refusal_markers"),
    ({**CHAT, "halucinated_respnse": "Lyon."}, "halucinated_respnse", "hallucinated_response"),  # two off, long
    ({**CHAT, "Subject": "France"}, "Subject", "subject"),
    ({**CHAT, "subjets": "France"}, "subjets", "subject"),
    # (review 115) a letter cut off, or one typed on, is a typo, not another column
    ({**CHAT, "answes": ["Paris"]}, "answes", "answers"),
    ({**CHAT, "subjec": "France"}, "subjec", "subject"),
    ({**CHAT, "refusal_markes": ["No"]}, "refusal_markes", "refusal_markers"),
    ({"prompt": QUESTION, "respons": "Paris."}, "respons", "response"),
    ({"prompt": QUESTION, "responsee": "Paris."}, "responsee", "response"),
    ({"question": QUESTION, "Answer": "Paris."}, "Answer", "answer"),  # no response: the response field is meant
    ({"prompt": QUESTION, "reponse": "Paris."}, "reponse", "response"),
    ({"instruction": QUESTION, "output": "Paris.", "Input": "France"}, "Input", "input"),
    ({"text": PASSAGE, "Answers": ["Wellington"]}, "Answers", "answers"),  # a passage row's too
])
@pytest.mark.parametrize("need_response", [True, False])
def test_a_misspelt_field_is_refused_with_the_field_it_misses(row, name, meant, need_response):
    # Ignored, a misspelt `answers` left the run judged on derived answers, and a misspelt response in an eval
    # file left its row with no reference, without a word.
    assert refused(row, need_response).endswith(
        f"unknown field {name!r} (did you mean {meant!r}?): a name this close to one unlearn reads is refused rather "
        f"than ignored; rename it, or drop it if it is another field")


def test_every_misspelt_field_of_a_row_is_named_at_once():
    # (review 113) capitalised headers were refused one field a run
    assert "unknown fields 'Question' (did you mean 'question'?), 'Answer' (did you mean 'answer'?): " in refused(
        {"Question": QUESTION, "Answer": "Paris."})


@pytest.mark.parametrize("row", [
    {**CHAT, "id": 7, "source": "wiki", "category": "geo", "context": "c", "object": "o", "target": "t",
     "title": "x", "label": 1, "metadata": {}},  # fields of common datasets: ignored
    {**CHAT, "responses": ["a", "b"], "prompts": ["p"], "answer_start": 3},  # near a prompt or response given
    {"question": QUESTION, "answer": "Paris."},  # the response field `answer` is not a misspelt `answers`
    # (review 113) columns of real datasets that extend a field's name are other columns, not typos, even where
    # the field itself is absent (a prompt-only eval file): PKU-SafeRLHF, AlpacaFarm, Social-IQa, several answers
    {"prompt": QUESTION, "response_0": "a", "response_1": "b", "better_response_id": 0},
    {"prompt": QUESTION, "response_a": "a", "output_1": "b", "answerA": "c", "answer1": "d", "outputs": ["e"],
     "responses": ["f"]},
    {**CHAT, "answers_list": ["x"], "subject_id": 3},
    {**CHAT, "inputs": "x"},  # `input` is read beside `instruction` only
    {"text": PASSAGE, "Response": "x"},  # a passage's response fields are refused by name when spelt right
    {**CHAT, "set": "neighbours", "reference": "Paris.", "forget_line": 1, "dropped": "x", "kind": "k",
     "source_prompt": "p", "source_line": 1, "prompt_from": "m", "response_from": "m", "rule": "r", "spans": []},
])
def test_fields_near_no_field_read_are_ignored(row):
    # (the files unlearn saves itself, probes.jsonl and augmented.jsonl, read back as rows: the last)
    known = {"prompt", "question", "text", "response", "answer"}
    assert parse_line(row, "rows.jsonl:7", False).extra == {k: v for k, v in row.items() if k not in known}


NO_PROMPT = "no prompt: expected one of prompt, question, instruction (or 'text')"


@pytest.mark.parametrize("row, message", [
    ({"Prompt": QUESTION, "response": "Paris."}, "unknown field 'Prompt' (did you mean 'prompt'?)"),
    ({"Question": QUESTION, "answer": "Paris."}, "unknown field 'Question' (did you mean 'question'?)"),
    ({"Text": PASSAGE}, "unknown field 'Text' (did you mean 'text'?)"),
    ({"prompts": QUESTION, "response": "Paris."}, "unknown field 'prompts' (did you mean 'prompt'?)"),
])
def test_a_row_without_its_prompt_names_the_field_that_misses_one(row, message):
    assert refused(row).startswith(f"rows.jsonl:7: {NO_PROMPT}; {message}: ")
    # another column is no hint (review 115: SORRY-bench's question_id, whose prompt is in `turns`)
    for other in ({"question_id": 3, "turns": [QUESTION]}, {"q": QUESTION}, {"": QUESTION}, {"tex": QUESTION}):
        assert refused({**other, "response": "Paris."}) == f"rows.jsonl:7: {NO_PROMPT}"


def test_tofus_names_are_read_as_the_truth_ratios_fields():
    # TOFU's *_perturbed files name them so; ignored, a TOFU file was scored with no truth ratio.
    row = {"question": QUESTION, "answer": "Paris.", "paraphrased_answer": "It is Paris.",
           "perturbed_answer": ["Lyon.", "Nice."], "paraphrased_question": "Which city is France's capital?"}
    extra = parse_line(row, "tofu.jsonl:1", True).extra
    assert extra["paraphrased_response"] == "It is Paris." and extra["perturbed_responses"] == ["Lyon.", "Nice."]
    assert "paraphrased_answer" not in extra and "perturbed_answer" not in extra
    assert "both 'paraphrased_response' and 'paraphrased_answer' (TOFU's name for it) given; use one" in refused(
        {**row, "paraphrased_response": "It is Paris."})
    # a bad value is named as the row spells it
    assert refused({**row, "perturbed_answer": "Lyon."}).endswith(
        "'perturbed_answer' must be a non-empty list of non-empty strings")
    assert refused({**row, "paraphrased_answer": ""}).endswith(
        "'paraphrased_answer' must be a non-empty string, got an empty string")
    assert refused({k: v for k, v in row.items() if k != "perturbed_answer"}).endswith(
        "'paraphrased_answer' without 'perturbed_responses': the truth ratio compares the two")
    # TOFU's real_authors_perturbed and world_facts_perturbed: perturbed answers, no paraphrase (review 113)
    world = {"question": QUESTION, "answer": "Paris.", "perturbed_answer": ["Lyon.", "Nice."]}
    assert parse_line(world, "tofu.jsonl:2", True).extra == {"perturbed_responses": ["Lyon.", "Nice."],
                                                            "paraphrased_response": "Paris."}  # the response stands in


def test_a_paraphrase_without_perturbed_answers_is_refused():
    assert refused({**CHAT, "paraphrased_response": "It is Paris."}).endswith(
        "'paraphrased_response' without 'perturbed_responses': the truth ratio compares the two")
    assert parse_line({**CHAT, "perturbed_responses": ["Lyon."]}, "rows.jsonl:1", True).extra  # the response stands in


# --- subject -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("subject, message", [
    ("france", "'subject' 'france' does not occur in the prompt"),  # case matters: edit and probes use str.find
    ("Spain", "'subject' 'Spain' does not occur in the prompt"),
    (5, "'subject' must be a non-empty string that occurs in the prompt, got a number"),
    (["France"], "got an array"),
    ("", "got an empty string"),
    ("  ", "got an empty string"),
])
def test_a_subject_must_be_a_string_in_the_prompt(subject, message):
    assert message in refused({"prompt": QUESTION, "response": "Paris.", "answers": ["Paris"], "subject": subject})
    # Prompt-only rows (eval prompts) are checked too: the same file may be a forget file elsewhere.
    assert message in refused({"prompt": QUESTION, "subject": subject}, need_response=False)


def test_a_subject_in_the_prompt_is_kept():
    example = parse_line({"prompt": QUESTION, "response": "Paris.", "subject": "France"}, "rows.jsonl:1", True)
    assert example.extra["subject"] == "France"
    assert parse_line({"prompt": QUESTION, "response": "Paris.", "subject": None}, "rows.jsonl:1", True)


def test_a_passage_subject_must_be_in_its_prefix():
    # The model is prompted with the prefix (the first half of the words): an edit keys on a prompt token.
    example = parse_line({"text": PASSAGE, "subject": "Battle of Waterloo"}, "rows.jsonl:1", True)
    assert example.extra["subject"] == "Battle of Waterloo" and "Battle of Waterloo" in example.prompt
    assert "'subject' 'Wellington' does not occur in the passage's prefix (its first 7 words)" in refused(
        {"text": PASSAGE, "subject": "Wellington"})
    assert "does not occur in the passage's prefix" in refused({"text": PASSAGE, "subject": "battle"})
    assert "got a number" in refused({"text": PASSAGE, "subject": 5})


# --- inputs that can be read only once -------------------------------------------------------------


def test_a_fifo_is_refused_before_it_is_read(tmp_path):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    # A writer, so that a read would not block forever: if the FIFO were read, its rows would be returned.
    writer = threading.Thread(target=lambda: fifo.write_text(json.dumps({"prompt": QUESTION, "response": "Paris."})))
    writer.start()
    try:
        with pytest.raises(UnlearnError) as caught:
            read_examples(fifo)
        assert str(caught.value) == f"{fifo}: is a pipe, which can be read only once; write it to a file first"
    finally:
        # Unblock the writer, which waits for a reader; non-blocking, so that this cannot hang when a
        # regression has read the FIFO already (and the writer is gone).
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.join(timeout=10)
        os.close(reader)
    assert not writer.is_alive()


def test_dev_null_is_still_an_empty_file():
    with pytest.raises(UnlearnError, match="no examples"):
        read_examples("/dev/null")


# --- through the command line ---------------------------------------------------------------------


def test_eval_refuses_a_bad_passage_row_in_one_line(tmp_path, llama_dir, cli):
    rows = tmp_path / "t.jsonl"
    rows.write_text(json.dumps({"text": PASSAGE, "answers": [5]}) + "\n")
    before = snapshot(tmp_path)
    result = cli("eval", rows, "--model", llama_dir, "--max-new-tokens", "8", cwd=tmp_path)
    # Data errors exit 1, as every data case of test_bad_input does (2 is for bad options).
    assert_one_line_and_nothing_written(result, 1, f"{rows}:1: 'answers' must be a non-empty list", tmp_path, before)


def test_a_saved_neighbour_probe_read_back_keeps_its_replaced_subject():
    from unlearn.data import parse_line

    row = {"prompt": "What is the capital of Spain?", "subject": "France", "replacement": "Spain"}
    assert parse_line(row, "probes.jsonl:1", need_response=False).extra["subject"] == "France"
