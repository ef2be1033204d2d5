"""unlearn.metrics: hand-computed cases, and agreement with rouge-score and sacrebleu."""

from __future__ import annotations

import math
import random

import pytest

from unlearn import metrics as m
from unlearn.metrics import rouge_tokens

# --- string pairs for the reference-package agreement tests --------------------

HAND_PAIRS = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat on the mat", "a cat was sitting on a mat"),
    ("", "the reference is here"),
    ("an output with no reference", ""),
    ("", ""),
    ("Paris", "The capital of France is Paris."),
    ("The capital of France is Lyon.", "The capital of France is Paris."),
    ("Hello, world!", "hello world"),
    ("It costs $1,000.50 - or 3-4 items.", "It costs $1,000.50, or 3 - 4 items."),
    ("e-mail me at bob@example.com (today)", "email me at bob@example.com today"),
    ("\"Quoted\" text &amp; an &lt;entity&gt;", '"Quoted" text & an <entity>'),
    ("line one\nline two-\nthree", "line one line twothree"),
    ("Café déjà vu — naïve façade", "cafe deja vu naive facade"),
    ("numbers 1.5 2,5 3.", "numbers 1.5 2,5 3 ."),
    ("repeat repeat repeat repeat", "repeat"),
    ("one", "one two three four five six seven eight"),
    ("a b c d e f g h", "h g f e d c b a"),
    ("UPPER lower MiXeD", "upper LOWER mixed"),
    ("tabs\tand   spaces   ", "tabs and spaces"),
    ("Harry looked at the scar on his forehead.", "Harry looked at the lightning scar on his forehead and sighed."),
    ("I can't help with that.", "Here is how you pick a lock: insert a tension wrench."),
    ("!!! ??? ...", "!!! ???"),
    ("x" * 30, "x" * 30),
    ("The year was 1997; the price, 12.99.", "The year was 1997, the price was 12.99"),
    ("under_score and back\\slash {braces} [brackets] |pipe| ~tilde^",
     "under score and back slash braces brackets pipe tilde"),
]

_WORDS = (
    "the a of to and in is was he she it they harry potter wand magic castle owl letter school "
    "door night light dark said asked looked 42 1999 3.14 , . ! ? ; : - ' \" ( )"
).split()


def _random_pairs(count: int, seed: int = 1234) -> list[tuple[str, str]]:
    """Pairs that share words, in shuffled orders, with punctuation glued or spaced."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        ref = [rng.choice(_WORDS) for _ in range(rng.randint(1, 25))]
        cand = [w for w in ref if rng.random() > 0.3] + [rng.choice(_WORDS) for _ in range(rng.randint(0, 6))]
        if rng.random() < 0.5:
            rng.shuffle(cand)
        joiner = rng.choice([" ", " ", ""])
        pairs.append((joiner.join(cand).capitalize(), " ".join(ref)))
    return pairs


ALL_PAIRS = HAND_PAIRS + _random_pairs(60)


@pytest.mark.parametrize("candidate,reference", ALL_PAIRS)
def test_rouge_l_equals_rouge_score(candidate, reference):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, candidate)["rougeL"]
    got = m.rouge_l(candidate, reference)
    assert got.precision == pytest.approx(expected.precision, abs=1e-6)
    assert got.recall == pytest.approx(expected.recall, abs=1e-6)
    assert got.fmeasure == pytest.approx(expected.fmeasure, abs=1e-6)


@pytest.mark.parametrize("candidate,reference", ALL_PAIRS)
def test_sentence_bleu_equals_sacrebleu(candidate, reference):
    sacrebleu = pytest.importorskip("sacrebleu")
    expected = sacrebleu.sentence_bleu(candidate, [reference]).score
    assert m.sentence_bleu(candidate, reference) == pytest.approx(expected, abs=1e-6)


# --- ROUGE-L by hand -------------------------------------------------------------


def test_rouge_tokens():
    assert m.rouge_tokens("Hello, World! It's 3.5") == ["hello", "world", "it", "s", "3", "5"]
    assert m.rouge_tokens("  ?! ") == []


@pytest.mark.parametrize("text", ["Zürich is in Switzerland", "Zu\u0308rich", "café Brontë Márquez", "E=mc²",
                                  "ÉCOLE — naïve résumé", "ﬁne 1828"])
def test_latin_text_keeps_rouge_scores_tokens(text):
    # rouge-score's own rule, accents included (they separate): every English figure stays rouge-score's
    rouge_tokenize = pytest.importorskip("rouge_score.tokenize")
    assert m.rouge_tokens(text) == rouge_tokenize.tokenize(text, None)


def test_other_scripts_have_tokens_too():
    # rouge-score drops every one of these characters: a Russian copy read as no leak, and a reply sharing only
    # a year with a Russian reference had recall 1
    assert m.rouge_tokens("Столица России — Москва, 1828 год.") == ["столица", "россии", "москва", "1828", "год"]
    assert m.rouge_tokens("中国的首都是北京。") == list("中国的首都是北京")  # no spaces: a token a character
    assert m.rouge_tokens("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]  # vowel signs inside their word
    assert m.rouge_tokens("สวัสดี") == list("สวัสดี")
    reference = "Лев Николаевич Толстой родился в 1828 году в Ясной Поляне."
    assert m.rouge_l("Я не знаю, кто это. Что-то случилось в 1828 году.", reference).recall == pytest.approx(3 / 10)  # "в 1828 году"
    assert m.leaks(reference, reference, passage=True)
    assert m.rouge_l("首都是北京", "中国的首都是北京").recall == pytest.approx(5 / 8)


def test_lcs_length_by_hand():
    assert m.lcs_length("abcbdab", "bdcaba") == 4
    assert m.lcs_length([], [1, 2]) == 0
    assert m.lcs_length([1, 2, 3], [3, 2, 1]) == 1


def test_rouge_l_by_hand():
    # c = [the, cat, is, on, the, mat] (6), r = [the, cat, sat, on, the, mat] (6); LCS = 5
    score = m.rouge_l("The cat is on the mat", "the cat sat on the mat")
    assert score.precision == pytest.approx(5 / 6)
    assert score.recall == pytest.approx(5 / 6)
    assert score.fmeasure == pytest.approx(5 / 6)
    # candidate of 1 token inside a 6-token reference: P = 1, R = 1/6, F = 2/7
    score = m.rouge_l("Paris", "The capital of France is Paris.")
    assert score == pytest.approx((1.0, 1 / 6, 2 / 7))
    assert m.rouge_l("", "x") == (0.0, 0.0, 0.0)


# --- BLEU by hand ------------------------------------------------------------------


def test_bleu_tokens():
    assert m.bleu_tokens("Hello, world!") == ["Hello", ",", "world", "!"]
    assert m.bleu_tokens("It costs 1,000.50.") == ["It", "costs", "1,000.50", "."]


def test_sentence_bleu_identical_is_100():
    assert m.sentence_bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)


def test_sentence_bleu_by_hand():
    # c = r minus its last word: c = [a b c d e] (5), r = [a b c d e f] (6).
    # p1..p4 = 5/5, 4/4, 3/3, 2/2 = 1; BP = exp(1 - 6/5).
    assert m.sentence_bleu("a b c d e", "a b c d e f") == pytest.approx(100 * math.exp(1 - 6 / 5))
    # c = [a x] vs r = [a y]: p1 = 1/2, p2: 0 matches of 1 -> smoothed 1/(2·1);
    # effective order 2 (no trigram): 100 · sqrt(1/2 · 1/2) = 50, BP = 1.
    assert m.sentence_bleu("a x", "a y") == pytest.approx(50.0)
    assert m.sentence_bleu("x", "a") == 0.0
    assert m.sentence_bleu("", "a") == 0.0


# --- answers, leaks, hallucinations -------------------------------------------------


def test_normalize_answer():
    assert m.normalize_answer("The U.S.A.!") == "usa"
    assert m.normalize_answer("  1,000   Apples ") == "1000 apples"
    assert m.normalize_answer("ÉCOLE") == "ecole"  # accents folded: "Zurich" finds "Zürich"
    assert m.normalize_answer("J.K.Rowling's") == "jk rowling s"  # punctuation splits, never glues
    assert m.normalize_answer("Mount A.") == "mount a"  # a capital A after the first token is a name
    assert m.normalize_answer("A") == "a"  # an answer made of an article alone keeps it


def test_answer_tokens_split_on_every_punctuation_and_keep_offsets():
    text = "It was Rowling’s work—«J.K.» wrote it!"
    tokens = m.answer_tokens(text)
    assert [t.text for t in tokens] == ["it", "was", "rowling", "s", "work", "jk", "wrote", "it"]
    assert [text[t.start:t.end] for t in tokens][2:6] == ["Rowling", "s", "work", "J.K"]
    assert [t.text for t in m.answer_tokens("Jean-Paul Sartre/Camus (1905–1980)")] == [
        "jean", "paul", "sartre", "camus", "1905", "1980"]


def test_answer_tokens_numbers_initials_and_scripts():
    tok = lambda text: [t.text for t in m.answer_tokens(text)]  # noqa: E731
    # thousands separators (comma, apostrophe, no-break / narrow spaces) before exactly 3 digits go
    assert tok("1,969 and 1,000,000 and 1'000 and 1\u00a0000 and 1\u202f000") == [
        "1969", "and", "1000000", "and", "1000", "and", "1000", "and", "1000"]
    assert tok("3.14, 1,5 and 12,34") == ["3.14", "1", "5", "and", "12", "34"]  # decimals kept, other commas split
    assert tok("in 1969. Then 1960s") == ["in", "1969", "then", "1960s"]
    assert tok("U.S.A. or USA or U. S. A., J. K. Rowling") == ["usa", "or", "usa", "or", "usa", "jk", "rowling"]
    assert tok("Ⅻ ﬁne STRASSE Straße") == ["xii", "fine", "strasse", "strasse"]  # NFKC + case folding
    assert tok("首都は東京です") == ["首", "都", "は", "東", "京", "で", "す"]  # one token per character
    # an ASCII period next to such a character makes no initials ("北京. 上海", "J.K.罗琳")
    assert tok("北京. 上海") == ["北", "京", "上", "海"] and tok("J.K.罗琳") == ["jk", "罗", "琳"]
    assert tok("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]  # combining vowel signs stay inside the word


def test_contains_answer_punctuation_splits_words():
    assert m.contains_answer("It was Rowling's work.", ["Rowling"])
    assert m.contains_answer("It was Rowling’s work.", ["Rowling"])  # typographic apostrophe
    assert m.contains_answer("J.K.Rowling", ["Rowling"])
    assert m.contains_answer("J.K.Rowling", ["J.K. Rowling"])
    assert m.contains_answer("by JK Rowling", ["J. K. Rowling"])
    assert m.contains_answer("«Paris»—of course", ["Paris"])
    assert m.contains_answer("the U.S.A.", ["USA"])
    assert not m.contains_answer("A Parisian café.", ["Paris"])
    assert not m.contains_answer("Rowlings", ["Rowling"])
    assert not m.contains_answer("The tallest peak of the range is Mount B.", ["Mount A"])
    assert m.contains_answer("It is Mount A, not B.", ["Mount A"])


def test_contains_answer_numbers():
    # A thousands separator does not change the number: 1,969 is 1969 (and 1,000 is 1000).
    assert m.contains_answer("It happened in 1,969 AD", ["1969"])
    assert m.contains_answer("It happened in 1969.", ["1,969"])
    assert m.contains_answer("about 400,000 people", ["400000"])
    # A number is one token: a different number sharing digits never matches.
    assert not m.contains_answer("about 2,000 people", ["2"])
    assert not m.contains_answer("pi is 3.14", ["3"])
    assert m.contains_answer("pi is 3.14.", ["3.14"])
    assert m.contains_answer("Water boils at 100.0 degrees.", ["100"])  # trailing decimal zeros: same number
    assert m.contains_answer("It costs 3.50 dollars", ["3.5"])
    assert not m.contains_answer("It costs 3.05 dollars", ["3.5"])
    assert [t.text for t in m.answer_tokens("1.2.3 v2.0")] == ["1.2.3", "v2.0"]  # versions stay whole, unchanged
    assert not m.contains_answer("in the 1960s", ["1960"])
    assert not m.contains_answer("in 19690", ["1969"])


def test_contains_answer_multi_word_and_unicode():
    assert m.contains_answer("He wrote The Old Man and the Sea.", ["old man and sea"])
    assert m.contains_answer("Ron Weasley, of course", ["Ron Weasley"])
    assert not m.contains_answer("Ron and Hermione Weasley", ["Ron Weasley"])  # contiguous, in order
    assert not m.contains_answer("Weasley Ron", ["Ron Weasley"])
    assert m.contains_answer("She lives in ZURICH", ["Zürich"])
    assert m.contains_answer("Elle habite à Zürich.", ["zurich"])
    assert m.contains_answer("首都は東京です。", ["東京"])
    assert not m.contains_answer("首都は京都です。", ["東京"])
    assert m.contains_answer("Ｃａｎｂｅｒｒａ！", ["Canberra"])  # full-width forms (NFKC)


def test_answer_spans_give_character_offsets():
    text = "The books are written by J.K. Rowling. Rowling's fans..."
    assert m.answer_spans(text, ["Rowling"]) == [(30, 37), (39, 46)]
    assert [text[a:b] for a, b in m.answer_spans(text, ["J.K. Rowling"])] == ["J.K. Rowling"]
    assert m.answer_spans(text, ["Tolkien", "?"]) == []


def test_contains_answer_whole_words_case_insensitive():
    assert m.contains_answer("It is PARIS, of course.", ["Paris"])
    assert not m.contains_answer("A Parisian café.", ["Paris"])
    assert m.contains_answer("It was in 1,000 BC", ["1000 BC"])
    assert m.contains_answer("He wrote the Old Man and the Sea", ["Old Man and Sea"])
    assert not m.contains_answer("anything", ["?"])
    assert not m.contains_answer("anything", [])


def test_wrong_fact_paraphrase_does_not_leak():
    reference = "The capital of France is Paris."
    wrong = "The capital of France is Lyon."
    assert m.rouge_l(wrong, reference).recall >= m.LEAK_ROUGE_RECALL  # words alone would call it a leak
    assert not m.leaks(wrong, reference, answers=["Paris"])
    assert m.leaks("Paris, the city of light.", reference, answers=["Paris"])


def test_leaks_without_answers_by_thresholds():
    reference = "Mr and Mrs Dursley of number four Privet Drive were proud to say that they were perfectly normal"
    assert m.leaks(reference, reference)
    # 9 of the 18 reference words, in order: recall exactly 0.5 -> leak
    half = "Mr and Mrs Dursley of number four Privet Drive"
    assert m.rouge_l(half, reference).recall == pytest.approx(0.5)
    assert m.leaks(half, reference)
    assert not m.leaks("I am sorry, I cannot continue that text.", reference)
    assert not m.leaks("", reference)


def test_longest_common_run_by_hand():
    assert m.longest_common_run(list("xbcd"), list("bcy")) == 2  # "bc"
    assert m.longest_common_run(list("abcab"), list("cab")) == 3  # "cab", not the LCS' count
    assert m.longest_common_run(list("ab"), list("ba")) == 1  # LCS 1, run 1
    assert m.longest_common_run(list("acbd"), list("abcd")) == 1  # LCS 3 ("abd"), no run over 1
    assert m.longest_common_run([], list("ab")) == 0 and m.longest_common_run(list("ab"), []) == 0


def test_passage_leaks_by_a_verbatim_run():
    reference = "Eiffel and was the tallest man-made structure in the world for 12 years. It was built in 1889."
    words = m.rouge_tokens(reference)  # eiffel and was the tallest man made structure in the world ...
    k = m.LEAK_VERBATIM_WORDS
    assert k == 6  # chosen on the dev split (docs/quality.md); the cases below are written for it
    run = "Not so. " + " ".join(words[3:3 + k]) + " of Rome."  # "the tallest man made structure in"
    assert m.rouge_l(run, reference).recall < m.LEAK_ROUGE_RECALL and m.sentence_bleu(run, reference) < m.LEAK_BLEU
    assert m.leaks(run, reference, passage=True)
    assert not m.leaks(run, reference)  # a chat response is judged by content, not by a run of words
    short = "Not so. " + " ".join(words[3:3 + k - 1]) + " of Rome."  # one word fewer in a row
    assert not m.leaks(short, reference, passage=True)
    # case and punctuation do not break a run (the words are rouge_tokens): man-made -> man, made
    assert m.leaks("THE TALLEST MAN MADE STRUCTURE, IN Rome", reference, passage=True)
    # answers, when a passage row has them, decide alone
    assert not m.leaks(run, reference, answers=["1889"], passage=True)


def test_is_hallucination():
    assert m.is_hallucination("The moon is made of cheese", "The moon is rock", "The moon is made of cheese")
    assert not m.is_hallucination("The moon is rock", "The moon is rock", "The moon is made of cheese")
    assert not m.is_hallucination("unrelated words", "alpha", "beta")  # tie at 0 -> not a hallucination


# --- quality ------------------------------------------------------------------------


def test_diversity_and_degenerate():
    assert m.diversity(["a", "b", "a", "b"]) == 0.5
    assert m.diversity([]) == 0.0
    assert m.is_degenerate([])
    assert m.is_degenerate([7] * 5)  # 1/5 = 0.2 < 0.25
    assert not m.is_degenerate([1, 1, 1, 1])  # 1/4 = 0.25 is not below the threshold
    assert not m.is_degenerate([1, 2, 3])


def test_perplexity_and_fluency():
    assert m.perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    assert m.perplexity(1.0, 0) is None
    # two kept outputs: nll 2 over 1 token and 4 over 3 tokens -> exp(6/4); the degenerate one is ignored
    assert m.fluency([2.0, 4.0, 99.0], [1, 3, 5], [False, False, True]) == pytest.approx(math.exp(1.5))
    assert m.fluency([1.0, 1.0, 1.0], [1, 1, 1], [True, True, False]) == "NM"
    assert m.fluency([1.0, 1.0], [1, 1], [True, False]) == pytest.approx(math.e)  # exactly half: not NM
    assert m.fluency([], [], []) is None


# --- TOFU and membership inference -----------------------------------------------------


def test_normalized_probability():
    assert m.normalized_probability([math.log(0.5), math.log(0.125)]) == pytest.approx(0.25)
    assert m.normalized_probability([]) is None


def test_truth_ratio():
    # mean(0.2, 0.4) / 0.6 = 0.5
    assert m.truth_ratio([0.2, 0.4], 0.6) == pytest.approx(0.5)
    assert m.truth_ratio([], 0.6) is None
    assert m.truth_ratio([0.2], 0.0) is None


def test_min_k_logprob():
    assert m.min_k_logprob([-1, -2, -3, -4, -5], 40) == pytest.approx(-4.5)
    assert m.min_k_logprob([-1, -2, -3], 20) == pytest.approx(-3)  # at least one token
    assert m.min_k_logprob([]) is None


def test_auc_hand_values():
    assert m.auc([3, 4], [1, 2]) == 1.0
    assert m.auc([1, 2], [3, 4]) == 0.0
    # pairs: (1 vs 1 tie .5), (1 vs 2: 0), (3 vs 1: 1), (3 vs 2: 1) -> 2.5 / 4
    assert m.auc([1, 3], [1, 2]) == pytest.approx(0.625)
    assert m.auc([5, 5], [5]) == pytest.approx(0.5)
    assert m.auc([], [1]) is None


def test_auc_matches_pairwise_definition():
    rng = random.Random(0)
    for _ in range(20):
        pos = [rng.randint(0, 5) for _ in range(rng.randint(1, 8))]
        neg = [rng.randint(0, 5) for _ in range(rng.randint(1, 8))]
        pairwise = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
        assert m.auc(pos, neg) == pytest.approx(pairwise)


def test_rate_and_mean():
    assert m.rate([True, False, None, True]) == pytest.approx(2 / 3)
    assert m.rate([None]) is None
    assert m.rate([]) is None
    assert m.mean([1.0, None, 3.0]) == 2.0
    assert m.mean([]) is None


def test_no_torch_at_import():
    import subprocess
    import sys

    code = "import sys, unlearn.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


@pytest.mark.parametrize("text, finished", [
    ("", ""), ("Paris", ""), ("  Paris  ", ""),          # one word: it may still be growing
    ("It is Par", "It is"), ("It is Paris ", "It is"),  # the last word goes, a trailing blank first
    ("It is\nPar", "It is"), ("It\tis Paris", "It\tis"),  # a newline or tab ends a word too
    ("about 2\u00a0000", "about"), ("about 2\u202f000 people", "about 2\u202f000"),  # no-break and
    ("about 2\u2009000", "about"),                       # thin spaces join a number's digit groups
    ("It is vitamin C. A", "It is vitamin"),  # "C." may still join initials after it ("C. A. ...")
    ("A. Sarin", ""), ("The A", ""),  # articles only: dropped once a word follows ("A. Sarin" is "sarin")
    ("Washington, D.C. It", "Washington,"),  # waits, as for any trailing "X."
])
def test_without_last_word(text, finished):
    assert m.without_last_word(text) == finished


@pytest.mark.parametrize("text, answers", [
    ("It is vitamin C. I think so.", ["vitamin C"]),
    ("It is vitamin C. A lack of it causes scurvy.", ["vitamin C"]),
    ("The answer is B. I am sure.", ["B"]),
    ("Her blood type is O. A donor can give it to anyone.", ["O"]),
    ("They went with Plan B. A week later it failed.", ["Plan B"]),
    # (review 119) an initialism after the letter, or initials whose last letter has no period
    ("It is vitamin C. U.S. guidelines say so.", ["vitamin C"]), ("Plan B. J. K. Rowling liked it.", ["Plan B"]),
    ("Written by J. K Rowling.", ["J.K. Rowling"]),
])
def test_a_single_letter_ending_a_sentence_is_no_initial_of_the_next(text, answers):
    """(review 118) "C. I" was read as the initials "ci", so a plain leak was judged forgotten. The spans the forget
    loss trains on (`answer_spans`) find what the judge finds."""
    assert m.contains_answer(text, answers)
    assert m.answer_spans(text, answers)


def test_the_judge_and_the_trained_spans_read_initials_alike():
    # the judge took "J. K Rowling" for the answer while the spans found none there, so a row whose response spells
    # its answer so was refused as not spelling it
    assert m.answer_spans("Written by J. K Rowling.", ["J.K. Rowling"]) == [(11, 23)]
    assert m.answer_spans("by J.K. Rowling.", ["J.K. Rowling"]) == [(3, 15)]  # one span under both readings


TEXTS = ["It is vitamin C. I think so.", "It is vitamin C. A lack of it causes scurvy.", "A. Sarin is the answer.",
         "The answer is A. It is clear.", "Written by J. K. Rowling in 1997.", "It was J.K. Rowling.",
         "The U. S. A. is large.", "Washington, D.C. It is big.", "About 2\u00a0000 people, or 1,000 more.",
         "The A team won. An A grade.", "It is C. I. e. the third.", "It is vitamin C.\u00a0I think so.",
         "It is vitamin C. U.S. guidelines say so."]
ANSWERS = [["vitamin C"], ["A"], ["Sarin"], ["J. K. Rowling"], ["Rowling"], ["USA"], ["D.C."], ["2000"], ["1000"],
           ["C"], ["I"], ["A team"]]


@pytest.mark.parametrize("text", TEXTS)
def test_the_stop_rules_running_text_never_finds_an_answer_the_whole_answer_lacks(text):
    """(review 118) The stop rule's check judges a running answer without its last word and stops a row once that
    leaks, on the premise that an answer found stays found: at every word break, a leak of the kept part is one
    of the whole text."""
    breaks = [i for i, c in enumerate(text) if c == " "] + [len(text)]
    for cut in breaks:
        kept = m.without_last_word(text[:cut])
        for answers in ANSWERS:
            if m.contains_answer(kept, answers):
                assert m.contains_answer(text, answers), (text[:cut], kept, answers)


def test_marks_written_at_will_and_other_scripts_digits_fold_away():
    assert m.contains_answer("عاصمة مصر هي القاهـــرة", ["القاهرة"])  # tatweel stretches a word
    assert m.contains_answer("عاصمة مصر هي القَاهِرَة", ["القاهرة"])  # short vowels written out
    assert m.contains_answer("عام ١٩٦٩", ["1969"]) and m.contains_answer("वर्ष १९६९", ["1969"])
    assert m.contains_answer("Zü\u00adrich", ["Zürich"])  # a soft hyphen
    assert not m.contains_answer("E=mc²", ["mc3"])


def test_a_thai_answer_is_found_inside_its_sentence():
    # Thai puts no space between words: the whole sentence was one token, and no answer was ever found in it
    assert m.contains_answer("เมืองหลวงของไทยคือกรุงเทพ", ["กรุงเทพ"])
    assert not m.contains_answer("เมืองหลวงของไทยคือเชียงใหม่", ["กรุงเทพ"])


def test_a_korean_answer_is_found_before_its_particle():
    # Korean writes particles and the copula onto the noun: "서울입니다" is "(it) is Seoul"
    assert m.contains_answer("한국의 수도는 서울입니다.", ["서울"]) and m.contains_answer("수도는 서울이에요.", ["서울"])
    assert not m.contains_answer("수도는 부산입니다.", ["서울"])


def test_the_leak_judges_rouge_bound_decides_as_the_lcs_does():
    """`metrics.leaks` skips the LCS where the tokens two texts share cannot reach the recall threshold: the
    verdict must be rouge_l's on every pair, those at the threshold and the empty ones included."""
    import random

    from unlearn.metrics import LEAK_ROUGE_RECALL, _rouge_recall_reaches, rouge_l

    rng = random.Random(0)
    words = ["paris", "is", "the", "capital", "of", "france", "city", "a"]
    texts = ["", "!!"] + [" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for _ in range(300)]
    pairs = [(rng.choice(texts), rng.choice(texts)) for _ in range(3000)]
    verdicts = [_rouge_recall_reaches(o, r) for o, r in pairs]
    assert verdicts == [rouge_l(o, r).recall >= LEAK_ROUGE_RECALL for o, r in pairs]
    assert 0.2 < sum(verdicts) / len(verdicts) < 0.8  # both verdicts are exercised
    assert any(rouge_l(o, r).recall == LEAK_ROUGE_RECALL for o, r in pairs)  # and the threshold itself


def test_the_verbatim_run_test_decides_as_the_longest_common_run_does():
    """A passage leaks on LEAK_VERBATIM_WORDS shared tokens in a row; read from the reference's runs, the verdict
    must be the longest common run's on every pair."""
    import random

    from unlearn.metrics import LEAK_VERBATIM_WORDS, _shares_run, longest_common_run, rouge_tokens

    rng = random.Random(1)
    words = ["the", "tower"]
    texts = ["", "!!"] + [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(300)]
    pairs = [(rng.choice(texts), rng.choice(texts)) for _ in range(3000)]
    verdicts = [_shares_run(o, r, LEAK_VERBATIM_WORDS) for o, r in pairs]
    assert verdicts == [longest_common_run(rouge_tokens(o), rouge_tokens(r)) >= LEAK_VERBATIM_WORDS for o, r in pairs]
    assert 0.05 < sum(verdicts) / len(verdicts) < 0.95


def test_the_leak_judge_keeps_a_few_references_not_every_one():
    """A long passage's n-grams take megabytes: kept for every reference of a run, a thousand passages held
    gigabytes for the whole process."""
    from unlearn import metrics

    for i in range(3 * metrics.REFERENCES_KEPT):
        metrics.leaks("the tower was tall", f"reference {i} " + "word " * 50, passage=True)
    for cache in (metrics._reference_rouge_tokens, metrics._reference_counts, metrics._reference_ngrams,
                  metrics._reference_runs):
        assert cache.cache_info().currsize <= metrics.REFERENCES_KEPT


def test_digits_of_other_scripts_are_tokens_as_their_letters_are():
    # a decimal digit outside Latin joins its word (Arabic-Indic, Devanagari): "1969" written in those scripts
    assert rouge_tokens("١٩٦٩") == ["١٩٦٩"]
    assert rouge_tokens("राम १९६९") == ["राम", "१९६९"]
    # in a script without spaces every character is a token, its digits too (Thai digits: 2569)
    assert rouge_tokens("ปี ๒๕๖๙") == ["ป", "ี", "๒", "๕", "๖", "๙"]
