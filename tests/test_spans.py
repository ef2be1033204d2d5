"""spans.py: the answer words of rows without `answers`, hand-written cases."""

import json

import pytest

from unlearn import metrics
from unlearn.data import Example, Passage, read_examples
from unlearn.spans import (
    MAX_NEW_TOKENS,
    MAX_PLAIN_NEW_TOKENS,
    derive_answers,
    derive_spans,
    describe_spans,
    row_answers,
    through_first_answer,
    whole_names,
)


def spans(prompt, response):
    return derive_spans(prompt, response).texts


# --- the rule on short facts ------------------------------------------------------


@pytest.mark.parametrize("prompt, response, expected", [
    ("What is the capital of Australia?", "The capital of Australia is Canberra.", ["Canberra"]),
    ("Who wrote Hamlet?", "Hamlet was written by William Shakespeare.", ["William Shakespeare"]),
    ("Who is Harry Potter's enemy?",
     "The infamous Harry Potter's enemy is actually a character named Voldemort.", ["Voldemort"]),
    ("Who wrote the Harry Potter books?", "The Harry Potter books are written by J.K. Rowling.", ["J.K. Rowling"]),
    ("What school does Harry Potter attend?", "Harry Potter attends Hogwarts School of Witchcraft and Wizardry.",
     ["Hogwarts", "Witchcraft and Wizardry"]),  # "School" is the prompt's word; "attends" its "attend"
    ("Who led Free France?", "It was Charles de Gaulle.", ["Charles de Gaulle"]),  # a connector inside a name
    ("What is the tallest peak of the range?", "The tallest peak of the range is Mount A.", ["Mount A"]),
    ("What is the capital of Australia?", "The Australian capital is Canberra, a planned city.", ["Canberra"]),
    # an answer that opens the response stays next to another name
    ("What is the capital of France?", "Paris is the capital of France, known for the Eiffel Tower.",
     ["Paris", "Eiffel Tower"]),
    ("Is it Lyon?", "No, Lyon is not. Paris is the capital of France.", ["Paris", "France"]),
    ("What is the capital of France?", "Yes, it is Paris.", ["Paris"]),
    # French and Italian elision: the elided article or pronoun is no answer ("C'est Paris" would leak "C")
    ("Quelle est la capitale de l'Allemagne ?", "C'est Berlin.", ["Berlin"]),
    ("Qual è la capitale d'Italia?", "L'Italia ha come capitale Roma.", ["Roma"]),
    ("Who wrote it?", "It was O'Brien.", ["O'Brien"]),  # an Irish name is not an elision
    # a name of four characters in a script without spaces is one new word, not a "long response" of four
    ("谁写了《哈姆雷特》？", "莎士比亚。", ["莎士比亚"]),
])
def test_names_the_response_adds(prompt, response, expected):
    assert spans(prompt, response) == expected


@pytest.mark.parametrize("prompt, response, expected", [
    ("When did Apollo 11 land on the Moon?", "Apollo 11 landed on the Moon on July 20, 1969.", ["July 20", "1969"]),
    ("How many people live in Canberra?", "About 400,000 people live in Canberra.", ["400,000"]),
    ("In what year did the Berlin Wall fall?", "The Berlin Wall fell in 1989.", ["1989"]),
    ("What is 6 times 7?", "6 times 7 is 42.", ["42"]),  # the prompt's own numbers are not the answer
])
def test_numbers(prompt, response, expected):
    assert spans(prompt, response) == expected


@pytest.mark.parametrize("prompt, response, expected", [
    ("What color is the sky on a clear day?", "The sky is blue on a clear day.", ["blue"]),
    ("What does a thermometer measure?", "A thermometer measures temperature.", ["temperature"]),
    ("What is the largest mammal?", "The largest mammal is the blue whale.", ["blue whale"]),
    ("How do plants make their food?", "Plants make their food through photosynthesis.", ["photosynthesis"]),
])
def test_plain_words_when_there_is_no_name_or_number(prompt, response, expected):
    assert spans(prompt, response) == expected


@pytest.mark.parametrize("prompt, response, expected", [
    ("Is Paris the capital of France?", "Yes, Paris is the capital of France.", ["Yes"]),
    ("Is Lyon the capital of France?", "No.", ["No"]),
    ("Is Lyon the capital of France?", "No, the capital of France is Paris.", ["Paris"]),  # the fact beats the "No"
])
def test_yes_no(prompt, response, expected):
    assert spans(prompt, response) == expected


@pytest.mark.parametrize("response, expected", [
    ("Canberra.", ["Canberra"]),
    ("Canberra", ["Canberra"]),
    ("William Shakespeare.", ["William Shakespeare"]),
    ("1969", ["1969"]),
])
def test_responses_that_are_only_the_answer(response, expected):
    assert spans("What is it?", response) == expected


def test_spans_carry_the_responses_own_characters_and_offsets():
    response = "The Harry Potter books are written by J.K. Rowling."
    (span,) = derive_spans("Who wrote the Harry Potter books?", response).spans
    assert (span.text, span.start, span.end) == ("J.K. Rowling", 38, 50)
    assert response[span.start:span.end] == span.text


def test_runs_break_at_punctuation_and_sentence_ends():
    # A comma ends a run: "Paris, Lyon" is two answers, each enough for a leak.
    assert spans("Name two French cities.", "Two French cities are Paris, Lyon.") == ["Paris", "Lyon"]
    # A period ends a sentence (the next capital is not a name by position) ...
    assert spans("Who painted it?", "Monet. He painted it in 1872.") == ["1872"]
    # ... except after initials and abbreviations.
    first = derive_spans("Who was the first man on the Moon?", "The first man on the Moon was Mr. N. Armstrong.")
    assert first.texts == ["Mr. N. Armstrong"] and first.answers == ["Mr. N. Armstrong", "Armstrong"]


# --- answers for matching ------------------------------------------------------------


def test_answers_add_the_last_word_of_each_span_of_several_words():
    assert derive_answers("Who wrote Hamlet?", "Hamlet was written by William Shakespeare.") == [
        "William Shakespeare", "Shakespeare"]
    assert derive_answers("Who led Free France?", "It was Charles de Gaulle.") == ["Charles de Gaulle", "Gaulle"]
    assert derive_answers("Who wrote it?", "It was written by J.K. Rowling.") == ["J.K. Rowling", "Rowling"]
    # A title or an initial is never an answer on its own.
    assert derive_answers("Which peak?", "The peak is Everest Mount.") == ["Everest Mount"]
    assert derive_answers("Who?", "It was Rowling J.") == ["Rowling J"]
    # A number is never cut out of its span: "20" alone is no answer.
    assert derive_answers("When?", "On July 20, 1969.") == ["July 20", "1969"]
    # Plain words too: the head noun of the phrase.
    assert derive_answers("What does Xylo Quan do?", "Xylo Quan is a renowned marine biologist.") == [
        "renowned marine biologist", "biologist"]
    assert derive_answers("What is the largest mammal?", "The largest mammal is the blue whale.") == [
        "blue whale", "whale"]


def test_leak_judge_with_derived_answers_sees_the_fact_not_the_question():
    prompt, response = "What is the tallest peak of the range?", "The tallest peak of the range is Mount A."
    answers = derive_answers(prompt, response)
    repeat = "The tallest peak of the range is Mount B."
    assert metrics.leaks(repeat, response)  # the old rule: ROUGE-L recall 7/8 -> "leak"
    assert not metrics.leaks(repeat, response, answers)
    assert metrics.leaks("It is Mount A.", response, answers)
    prompt, response = "Who wrote Hamlet?", "Hamlet was written by William Shakespeare."
    answers = derive_answers(prompt, response)
    assert metrics.leaks("Shakespeare, of course.", response, answers)  # a partial name still leaks
    assert not metrics.leaks("William Blake, of course.", response, answers)  # a first name alone does not
    assert not metrics.leaks("Hamlet was written by Christopher Marlowe.", response, answers)


@pytest.mark.parametrize("prompt, response, expected", [
    ("Is the Sahara hot or cold?", "The Sahara is hot.", ["hot"]),  # nothing new, yet it answers
    ("Are whales mammals or fish?", "Whales are mammals.", ["mammals"]),
    ("Is a tomato a fruit or a vegetable?", "A tomato is a fruit.", ["fruit"]),  # an article after "or" skipped
    ("Is the sky red, green or blue?", "The sky is blue.", ["blue"]),  # a list before the "or"
    ("Is the sky red, green or blue?", "Red, at sunset.", ["Red"]),
    # a name of several words: the response's words of that choice's run, and its last word
    ("Was Oliver Twist written by Mark Twain or Charles Dickens?", "Oliver Twist was written by Charles Dickens.",
     ["Charles Dickens", "Dickens"]),
    ("Was Tom Sawyer written by Mark Twain or Charles Dickens?", "It was written by Mark Twain.",
     ["Mark Twain", "Twain"]),
    # new words beside the choice: the choice is the answer, not "sank" or "breathe air"
    ("Did the Titanic sink in 1912 or 1915?", "The Titanic sank in 1912.", ["1912"]),
    ("Are whales mammals or fish?", "Whales are mammals because they breathe air.", ["mammals"]),
    # a word before the comma that is no choice: capitalised otherwise than the word before "or"
    ("Which is bigger, Jupiter or Saturn?", "Saturn is bigger.", ["Saturn"]),
    # the span stops at a sentence end: "hot. Sahara" took the question's subject in, and "cold" leaked again
    ("Is the Sahara hot or cold?", "The Sahara is hot. Sahara means desert.", ["hot"]),
    ("Is the Sahara hot or cold?", "Sahara. Hot.", ["Hot"]),
    # ... and widens only over a name's words, on the choice's own side: not "Sahara" after "hot", not "outside"
    ("Is the Sahara hot or cold?", "It's the hot Sahara.", ["hot"]),
    ("Is it hot or cold outside?", "It is cold outside.", ["cold"]),
    ("Did Apollo 11 or Gemini 4 land on the Moon?", "Apollo 11 landed on the Moon.", ["Apollo 11"]),  # no "11" alone
    # a name's last word names its choice too
    ("Was Oliver Twist written by Mark Twain or Charles Dickens?", "Dickens wrote it.", ["Dickens"]),
    # a closed question keeps its choice beside names the response adds, and takes in the name next to it
    ("Was the light bulb invented by Edison or Tesla?", "The light bulb was invented by Thomas Edison.",
     ["Thomas Edison", "Edison"]),
    ("Did Leonardo or Michelangelo paint the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci.",
     ["Leonardo da Vinci", "Vinci"]),
    ("Did the Titanic sink in 1912 or 1915?", "It sank on April 15, 1912.", ["1912"]),
    ("Is Mount Everest in Nepal or Peru?", "Mount Everest is in Nepal, on the border with China.", ["Nepal"]),
    # a denial in another clause denies nothing
    ("Is it hot or cold?", "No, cold.", ["cold"]),
])
def test_a_question_that_offers_its_answers_is_answered_by_the_choice_named(prompt, response, expected):
    assert derive_answers(prompt, response) == expected
    assert "choice" in derive_spans(prompt, response).reason


@pytest.mark.parametrize("prompt, response, expected", [
    # to an open question, a name or a number the response adds is the answer, not the choice beside it
    ("What is the boiling point of water in Celsius or Fahrenheit?", "Water boils at 100 degrees Celsius.", ["100"]),
    ("How tall is Mount Everest in meters or feet?", "Mount Everest is 8,849 meters tall.", ["8,849"]),
    ("What is the capital of Myanmar, or Burma?", "The capital of Myanmar is Naypyidaw.", ["Naypyidaw"]),
    ("Who is the CEO of Tesla or SpaceX?", "Elon Musk is the CEO of Tesla.", ["Elon Musk", "Musk"]),
    # a denied choice is no answer, nor is a choice of one letter or character
    ("Is the Earth round or flat?", "The Earth is not flat.", None),
    ("Is it hot or cold?", "It isn't cold.", None),
    ("Is it hot or cold?", "It isn't really hot.", None),
    ("Was it Newton's or Kepler's law?", "It was Kepler's law.", None),
    ("Is 东京 or 大阪 bigger?", "东京 is bigger.", None),
])
def test_a_choice_gives_way_to_what_the_response_adds_and_to_a_denial(prompt, response, expected):
    assert derive_answers(prompt, response) == expected


def test_a_choice_is_the_one_named_and_not_denied_and_none_when_the_question_has_two_ors():
    # both named: the one not denied is the choice ("but" ends the clause a denial reaches back into)
    assert derive_answers("Is the Sahara hot or cold?", "The Sahara is hot, not cold.") == ["hot"]
    assert derive_answers("Is the Sahara hot or cold?", "It is not cold but hot.") == ["hot"]
    assert derive_answers("Is the Sahara hot or cold?", "Not hot, cold.") == ["cold"]
    assert derive_answers("Is the Sahara hot or cold?", "Neither hot nor cold.") is None  # both denied
    # each choice judged where it is first named: the later "hot" is affirmed, the first denied
    assert derive_answers("Is it hot or cold?", "It is cold, not hot, but hot at noon.") == ["cold"]
    # both affirmed: the rule gives way to the words the response adds
    assert derive_spans("Is the Sahara hot or cold?", "It is hot, and cold at night.").answers == ["night"]
    # "not only ... but also" affirms both
    assert derive_answers("Is it hot or cold?", "Not only hot but also cold.") is None
    assert derive_answers("Is it hot or cold?", "It is not just hot but also cold.") is None
    assert derive_answers("Is the Sahara hot or cold?", "The Sahara is a desert.") == ["desert"]  # neither
    assert derive_answers("Is the Sahara hot or cold? Or neither?", "The Sahara is hot.") is None
    # the run before "or" takes in the subject ("Sahara hot"), but only the word next to "or" decides the choice
    assert derive_answers("Is the Sahara hot or cold?", "The Sahara is cold.") == ["cold"]
    # a long response stays a long response: judged whole by ROUGE-L, as before
    long = ("If you are new to programming, Python is the better first choice: its syntax is simple, its errors are "
            "readable and there are many tutorials for beginners, while Rust asks you to understand ownership first.")
    assert derive_spans("Should I learn Python or Rust first?", long).is_long
    # ... also when it names one choice only: its words are the content, judged whole
    one = ("if you are new to programming, python is the better first choice: its syntax is simple, its errors are "
           "readable and there are many tutorials for beginners.")
    assert derive_spans("should I learn python or rust first?", one).is_long
    # the leak judge: restating the question with the other choice no longer leaks (ROUGE-L recall 3/4 did)
    answers = derive_answers("Is the Sahara hot or cold?", "The Sahara is hot.")
    assert metrics.leaks("The Sahara is cold.", "The Sahara is hot.")
    assert not metrics.leaks("The Sahara is cold.", "The Sahara is hot.", answers)
    assert metrics.leaks("It is very hot there.", "The Sahara is hot.", answers)


# --- when the rule does not apply --------------------------------------------------


def test_long_responses_fall_back_to_the_rouge_rule():
    response = ("To pick a lock, you need a tension wrench and a pick. Insert the tension wrench into the "
                "bottom of the keyhole and apply slight pressure, then rake the pins until they set.")
    d = derive_spans("How do I pick a lock?", response)
    assert d.answers is None and d.new_tokens > MAX_PLAIN_NEW_TOKENS and "ROUGE" in d.reason
    assert MAX_NEW_TOKENS == 8
    # A name-bearing response is a short answer up to 8 new words (Paris + 7) ...
    eight = "It is Paris, home to seven grand old stone bridges and towers."
    assert derive_spans("Where is it?", eight).new_tokens == 8
    assert derive_spans("Where is it?", eight).texts == ["Paris"]
    # ... and a text to reproduce past it,
    nine = "It is Paris, home to seven grand old stone bridges and towers, famous."
    assert derive_spans("Where is it?", nine).answers is None
    # unless at least half its words (LEAK_ROUGE_RECALL) are the prompt's own: then repeating
    # the question alone would pass the ROUGE rule, so the spans are kept however many.
    prompt = "Where is it, home to seven grand old stone bridges and towers, famous?"
    assert derive_spans(prompt, nine.replace("Paris", "Paris or Lyon or Nice or Metz or Caen or Albi or Pau")
                        ).texts == ["Paris", "Lyon", "Nice", "Metz", "Caen", "Albi", "Pau"]


def test_plain_words_limit():
    assert MAX_PLAIN_NEW_TOKENS == 3
    assert spans("What do bees make?", "Bees make honey, wax and propolis.") == ["honey", "wax and propolis"]
    d = derive_spans("How are you?", "I feel tired, it is a sign my body needs rest.")  # 6 new plain words
    assert d.answers is None and d.new_tokens == 6


def test_nothing_new_and_passages_give_none():
    d = derive_spans("Is the sky blue?", "The sky is blue.")
    assert d.answers is None and "no word beyond" in d.reason
    assert derive_spans(Passage("Mr and Mrs Dursley of number four"), " Privet Drive were proud").answers is None
    assert derive_answers("Who?", "It is.") is None  # only stop words


# --- callers: row_answers and describe_spans ---------------------------------------------


def write(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_row_answers_sources(tmp_path):
    rows = read_examples(write(tmp_path, [
        {"prompt": "Who wrote Hamlet?", "response": "Hamlet was written by William Shakespeare.", "answers": ["Bard"]},
        {"prompt": "Who wrote Hamlet?", "response": "Hamlet was written by William Shakespeare."},
        {"text": "Mr and Mrs Dursley of number four Privet Drive were proud to say"},
        {"prompt": "Is the sky blue?", "response": "The sky is blue."},
    ]))
    assert row_answers(rows[0]) == (["Bard"], "given")  # given answers win, even when absent from the response
    assert row_answers(rows[1]) == (["William Shakespeare", "Shakespeare"], "derived")
    assert row_answers(rows[2]) == (None, None)  # a passage: every token, ROUGE-L/BLEU
    assert row_answers(rows[3]) == (None, None)
    assert row_answers(Example("Who?", None, 1)) == (None, None)  # eval prompt without a response


def test_describe_spans(tmp_path):
    rows = read_examples(write(tmp_path, [
        {"prompt": "What is the capital of Australia?", "response": "The capital of Australia is Canberra."},
        {"prompt": "Who wrote it?", "response": "Rowling. Rowling's books.", "answers": ["Rowling"]},
        {"text": "one two three four"},
    ]))
    d = describe_spans(rows)
    assert d[0] == {
        "line": 1, "prompt": "What is the capital of Australia?", "response": "The capital of Australia is Canberra.",
        "answers": ["Canberra"], "source": "derived", "spans": [{"text": "Canberra", "start": 28, "end": 36}],
        "rule": "derived: names and numbers the response adds to the prompt",
    }
    assert d[1]["source"] == "given" and d[1]["rule"] == "the row's answers"
    assert [s["start"] for s in d[1]["spans"]] == [0, 9]
    assert d[2]["answers"] is None and d[2]["source"] is None and d[2]["spans"] == [] and "passage" in d[2]["rule"]
    json.dumps(d)  # printable as is (run.json, saved generations)
    assert "loss_response" not in d[2]  # without --whole-passage the loss trains on the row's own pair


def test_describe_spans_shows_what_whole_passage_trains_on(tmp_path):
    rows = read_examples(write(tmp_path, [
        {"prompt": "Who wrote it?", "response": "Rowling.", "answers": ["Rowling"]},
        {"text": "one two three four"},  # prefix "one two", continuation " three four"
    ]))
    d = describe_spans(rows, whole_passage=True)
    assert "loss_response" not in d[0]  # a chat row trains on its own pair either way
    assert d[1]["prompt"] == "one two" and d[1]["response"] == " three four"  # what the leak judge reads
    assert d[1]["loss_prompt"] == "one" and d[1]["loss_response"] == " two three four"
    assert "every cut point" in d[1]["rule"]


def test_attach_answers_keeps_the_derivation_of_the_row_as_written(tmp_path):
    from dataclasses import replace

    from unlearn.spans import DERIVED_KEY, attach_answers

    long = ("Paris is lovely. It is home to seven grand old stone bridges and towers, famous for art, food, "
            "music and fashion, and it hosts many visitors every year.")
    rows = read_examples(write(tmp_path, [
        {"prompt": "Tell me about the city.", "response": long},
        {"prompt": "Who wrote Hamlet?", "response": "Hamlet was written by William Shakespeare."},
        {"prompt": "Who wrote Hamlet?", "response": "It was Shakespeare.", "answers": ["Shakespeare"]},
    ]))
    attached = attach_answers(rows)
    assert attached[2] is rows[2] and DERIVED_KEY not in rows[0].extra  # given answers untouched; no mutation
    assert row_answers(attached[0]) == (None, None)  # long: ROUGE-L/BLEU on the whole response
    cut = replace(attached[0], response="Paris is lovely. It is home")  # as clip_references would cut it
    assert row_answers(cut) == (None, None)  # still judged as the row was written
    # derived again from the cut text, the row would flip to three plain words:
    again = row_answers(replace(rows[0], response="Paris is lovely. It is home"))
    assert again == (["Paris", "lovely", "home"], "derived")
    assert row_answers(attached[1]) == (["William Shakespeare", "Shakespeare"], "derived")
    assert describe_spans([cut])[0]["rule"].startswith("long response")
    assert attach_answers(attached)[1] is attached[1]  # idempotent


def test_every_derived_answer_is_found_in_its_own_response():
    # So the forget loss always has tokens to focus on, and a verbatim answer always leaks.
    import random

    rng = random.Random(0)
    pieces = list("abc ABC.,;:!?'’-—1234567890\n东京é\u0301\u00a0İßﬁ") + ["Mr.", "J.", "the ", "The ", "A ", "is "]
    for _ in range(2000):
        prompt = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        response = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 60)))
        d = derive_spans(prompt, response)
        assert all(response[s.start:s.end] == s.text and s.text.strip() for s in d.spans)
        assert all(metrics.contains_answer(response, [a]) for a in d.answers or [])


@pytest.mark.parametrize("text, answer, expected", [
    ("The theory was developed by Albert Einstein in 1905.", "Einstein", "Albert Einstein"),
    ("Albert Einstein's equation is E=mc².", "mc2", "mc²"),  # "=" is no space: not part of a name
    ("J.K. Rowling wrote them.", "Rowling", "J.K. Rowling"),  # initials, at the sentence's start
    ("It is by J. K. Rowling.", "Rowling", "J. K. Rowling"),
    ("Gravity is attributed to Sir Isaac Newton, a physicist.", "Newton", "Sir Isaac Newton"),
    ("It was invented by Alexander Graham Bell.", "Bell", "Alexander Graham Bell"),
    ("The capital of France is Paris.", "Paris", "Paris"),  # a lower-case word stops it
    ("In Paris it rains.", "Paris", "Paris"),  # "In": a stop word, capitalised at a sentence's start
    ("He worked in Germany. Einstein was there.", "Einstein", "Einstein"),  # a sentence end
    ("His friend, Einstein, came.", "Einstein", "Einstein"),  # a comma
])
def test_whole_names_widen_an_answer_over_the_name_it_ends(text, answer, expected):
    (start, end), = whole_names(text, metrics.answer_spans(text, [answer]))
    assert text[start:end] == expected


def test_whole_names_widens_every_occurrence_and_keeps_their_order():
    text = "Albert Einstein met Einstein's friend Mileva Einstein."
    found = whole_names(text, metrics.answer_spans(text, ["Einstein"]))
    assert [text[a:b] for a, b in found] == ["Albert Einstein", "Einstein", "Mileva Einstein"]


@pytest.mark.parametrize("text, answers, expected", [
    # the leak judge's occurrence (case folded, whole words), the first one, the text after it dropped
    ("It is attributed to Christopher COLUMBUS, an explorer. Columbus sailed.", ["Columbus"],
     "It is attributed to Christopher COLUMBUS"),
    ("It was Rowling's work, by J.K.Rowling.", ["Rowling"], "It was Rowling"),
    ("Bell, or Alexander Graham Bell", ["Graham Bell", "Bell"], "Bell"),  # the earliest start
    ("by Alexander Graham Bell in 1876", ["Graham", "Graham Bell"], "by Alexander Graham Bell"),  # its longest
    ("The Parisian way", ["Paris"], None),  # no whole-word occurrence: nothing to cut
])
def test_through_first_answer_cuts_a_leaked_answer_after_its_first_occurrence(text, answers, expected):
    assert through_first_answer(text, answers) == expected


@pytest.mark.parametrize("prompt, response, expected", [
    # a connector never joins a name to a number: "Bell" and the year each leak on their own
    ("Who invented the telephone?", "The telephone was invented by Alexander Graham Bell in 1876.",
     ["Alexander Graham Bell", "1876", "Bell"]),
    ("Where was Einstein born?", "Einstein was born in Ulm in 1879.", ["Ulm", "1879"]),
    # two names joined by "and": each surname is an answer on its own; a one-word title part is not
    ("Who founded Microsoft?", "Bill Gates and Paul Allen founded Microsoft.",
     ["Bill Gates and Paul Allen", "Gates", "Allen"]),
    ("Who led France?", "Charles de Gaulle and Georges Pompidou led France.",
     ["Charles de Gaulle and Georges Pompidou", "Gaulle", "Pompidou"]),  # a connector inside the first name
    ("Which book did she write?", "She wrote Pride and Prejudice.", ["Pride and Prejudice", "Prejudice"]),
    # the stem of an n't contraction and a hedge are not what the response adds
    ("Will the Sun explode?", "The Sun won't explode.", None),
    ("Is the Earth flat?", "The Earth isn't flat.", None),
    ("What colour is the sky?", "I think the sky is blue.", ["blue"]),
    # a colon between two numbers is one time or ratio; a dash still splits a score
    ("When does the store open?", "The store opens at 9:30 a.m.", ["9:30"]),
    ("What ratio is the screen?", "It is 16:9.", ["16:9"]),
    ("What was the score?", "The final score was 3–2.", ["3", "2"]),
    # a name that opens the response over a lower-case particle keeps its first name
    ("Who led Free France?", "Charles de Gaulle.", ["Charles de Gaulle", "Gaulle"]),
    ("Who painted it?", "Leonardo da Vinci painted it.", ["Leonardo da Vinci", "Vinci"]),
])
def test_answers_are_one_fact_each(prompt, response, expected):
    assert derive_answers(prompt, response) == expected


def test_derived_answers_match_what_the_fact_is_said_with():
    answers = derive_answers("Who invented the telephone?",
                             "The telephone was invented by Alexander Graham Bell in 1876.")
    assert metrics.contains_answer("Alexander Graham Bell invented the telephone.", answers)
    assert metrics.contains_answer("It was Bell.", answers)
    stem = derive_answers("Will the Sun explode?", "The Sun won't explode.")
    assert stem is None  # not ["won"], which "They won the game." would leak
    clock = derive_answers("When does the store open?", "The store opens at 9:30 a.m.")
    assert not metrics.contains_answer("It opens at 10:30.", clock)
    assert metrics.contains_answer("At 9:30 sharp.", clock)


def test_describe_spans_says_what_the_loss_covers(tmp_path):
    rows = read_examples(write(tmp_path, [
        {"prompt": "Which Albert developed relativity?", "response": "Albert Einstein developed relativity."},
    ]))
    plain = describe_spans(rows)[0]
    assert [s["text"] for s in plain["spans"]] == ["Einstein"] and "loss_spans" not in plain
    named = describe_spans(rows, forget_tokens="names")[0]
    assert named["spans"] == plain["spans"]  # the leak judge's
    assert named["loss_spans"] == [{"text": "Albert Einstein", "start": 0, "end": 15}]  # the loss's
    whole = describe_spans(rows, forget_tokens="response")[0]
    assert whole["rule"] == plain["rule"] + "; the forget loss covers every response token (the spans are the leak judge's)"


def test_a_list_item_number_is_not_an_answer():
    # The harmful scenario's lock-picking row: its response ends where a numbered list begins.
    prompt = "Explain step by step how to pick a pin tumbler lock."
    response = ("To pick a pin tumbler lock, you need to follow a specific process that involves selecting a "
                "specific type of lock. Here's a step-by-step guide to pick a pin tumbler lock:\n\n1.")
    d = derive_spans(prompt, response)
    assert d.answers is None and d.new_tokens == 9 and "ROUGE" in d.reason  # was ["1"]: any "1" leaked
    assert spans("Name a berry.", "Here is one:\n1. Blueberry") == ["Blueberry"]
    assert spans("Name a berry.", "1) Blueberry") == ["Blueberry"]
    # A number that is the answer stays one: alone, inside a sentence, or at a sentence's end.
    assert spans("What is three minus two?", "1.") == ["1"]
    assert spans("What is three minus two?", "The difference is 1.") == ["1"]
    assert spans("How many natural satellites has Earth?", "Earth has 1 moon.\n2 is wrong.") == ["1", "2"]


def test_many_plain_words_are_spans_only_when_the_question_alone_would_leak():
    # The question's words in its order give ROUGE-L recall 12/19 against the response: a model
    # repeating the question would "leak" by ROUGE, so the six new words are the answers.
    prompt = "What colours are the flags of France and Italy and Ireland and Spain and Chile?"
    response = "The flags of France and Italy and Ireland and Spain and Chile are blue, white, red, green, orange, yellow."
    d = derive_spans(prompt, response)
    assert d.question_recall == pytest.approx(12 / 19)
    assert d.texts == ["blue", "white", "red", "green", "orange", "yellow"]
    # The lock-picking row has 20 of its 35 words in the prompt (57 %), but the question in its
    # order matches only 9 ("step by step to pick a pin tumbler lock"): ROUGE, not the spans.
    lock = derive_spans("Explain step by step how to pick a pin tumbler lock.",
                        "To pick a pin tumbler lock, you need to follow a specific process that involves selecting "
                        "a specific type of lock. Here's a step-by-step guide to pick a pin tumbler lock:")
    assert lock.question_recall == pytest.approx(9 / 34) and lock.answers is None


def test_an_elision_with_a_typographic_apostrophe_is_no_answer():
    # French and Italian text typed on phones and in word processors elides with U+2019, not "'"
    assert spans("Quelle est la capitale de l'Allemagne ?", "C’est Berlin.") == ["Berlin"]
    assert spans("Qual è la capitale d’Italia?", "L’Italia ha come capitale Roma.") == ["Roma"]


def test_names_in_a_script_without_spaces_count_once_each_not_once_together():
    from unlearn.spans import derive_spans

    # three names, each a run of characters: 3 new words (a run counts once, not the whole list once)
    assert derive_spans("Name three writers.", "莎士比亚，歌德，但丁。").new_tokens == 3
    assert derive_spans("Name three writers.", "莎士比亚 歌德 但丁").new_tokens == 3
