"""Answer spans for rows without `answers`: the response words that carry what the prompt asks.

A short-fact row often restates its question ("What is the capital of
Australia?" / "The capital of Australia is Canberra."). Judged by word overlap
(ROUGE-L recall >= 0.5), a model that repeats the question's own words
("The capital of Australia is Sydney.") still "leaks", and the stop rule goes
on ascending until the model no longer says the question's words: it
collapses. This module finds the words a restating response adds — the
answer — so that the leak judge, the stop rule and the forget loss look at
those words only, as they do for rows that list `answers`.

The rule (`derive_spans`), on the `metrics.answer_tokens` of prompt and response:

1. A response token is *given* when it is a prompt token, up to a common
   English ending (-s, -es, -ed, -d, -ing, -n, -an, -ian, -ese, -ly, -er:
   "attends" is given by "attend", "Australian" by "Australia"); it is *trivial*
   when it is in STOP_WORDS (function words, forms of be/have/do, fillers such
   as "actually", restating verbs such as "called", "named", "written",
   hedges such as "think"), is a contraction ending after an apostrophe
   ("Rowling's" -> s) or the stem before an n't ("isn't" -> isn), or numbers a
   list item (`_is_list_marker`: "...a step-by-step guide:\n\n1." -> 1 is not
   an answer, or every output with a "1" in it would leak). Every other
   token is *new*.
2. A new token is *marked* when it contains a digit or is capitalised
   without starting a sentence (or starts one and is followed by a marked
   token, perhaps after up to two connectors, as in "William Shakespeare."
   and "Charles de Gaulle."): names and numbers, which are what
   factual questions ask for.
3. Spans are maximal runs of new tokens; inside a run at most two CONNECTORS
   ("of", "and", "the", "de", "von", ...) may stand between two new tokens
   ("Witchcraft and Wizardry", "Charles de Gaulle") but never join a number
   to another token ("Alexander Graham Bell in 1876": a name and a date, two
   spans), and a run never crosses a comma, colon (but for "9:30", "16:9":
   one number), semicolon, bracket, quote, dash, "?" / "!" or a sentence
   end. When any new token is marked, only runs of marked tokens are kept
   ("a character named Voldemort" -> Voldemort, not "character"), with a
   sentence's capitalised first word when the sentence goes straight on with
   given or trivial words ("Paris is the capital of France, known for the
   Eiffel Tower." -> Paris, Eiffel Tower; not "Yes, ..." nor "Regular
   exercise ..."); otherwise every run is (the sky is blue -> blue;
   "Yes, ..." -> Yes).
   A span's text is the response's own characters from its first to its last
   token ("J.K. Rowling", "400,000").
   A question that offers its answers ("Is the Sahara hot or cold?", "... red,
   green or blue?", "... by Mark Twain or Charles Dickens?": one "or", perhaps
   with a list before it) is answered by the choice its response names when
   it names exactly one and does not deny it (`_chosen_alternative`): that
   choice, widened over its name ("Charles Dickens", "Thomas Edison"), is the
   span, whatever common words the response adds ("The Titanic sank in
   1912." -> 1912, not "sank"). Its answer is a given word, so the rule above
   finds none, or a wrong one. An open question (`CLOSED_OPENINGS`: not
   "Is ...", "Did ...", "Which ...") whose response adds a name or a number
   keeps the rule above ("What is ... in Celsius or Fahrenheit?" / "... at
   100 degrees Celsius." -> 100).
4. The rule does not apply (None: the caller keeps the ROUGE-L/BLEU rule and
   every response token in the loss) to passages (`text` rows), to responses
   with no new token that name no single choice the question offers (nothing
   beyond the prompt's words to look for), and to
   long responses: more than MAX_NEW_TOKENS new tokens (MAX_PLAIN_NEW_TOKENS
   when none is marked) while the question itself, read as an output, has a
   ROUGE-L recall below `metrics.LEAK_ROUGE_RECALL` against the response.
   There the answer is the text itself (an explanation, instructions, a
   passage), and ROUGE-L recall >= 0.5 can only be reached by reproducing the
   response's own words, not by repeating the question. When the question
   alone does reach the ROUGE threshold, a model that only repeats it would
   "leak", so the spans are used however many. (The question's words in its
   order, not the share of the response's words found anywhere in it: "Explain
   step by step how to pick a pin tumbler lock." has 57 % of its response's
   words but a recall of 0.26 (9 of 35), and repeating it leaks nothing by ROUGE.)

The answers a caller matches (`Derivation.answers`) are the span texts, then
the last word of each span of several words (unless a number, a title such as
"Mount" or an initial), and of each name of several words an "and" ends inside
a span ("Bill Gates and Paul Allen" -> Gates, Allen): a model that still says "Shakespeare" has not
forgotten "William Shakespeare", nor "biologist" "marine biologist". Only the
last word — the surname or the head noun, as people write `answers` by hand
("Rowling", "Einstein"); a first name or an adjective alone ("William",
"marine") says little, and every false leak makes the stop rule ascend further.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from unlearn import metrics
from unlearn.metrics import AnswerToken, answer_tokens

#: Above this many new tokens (and with the question alone under the ROUGE rule's
#: threshold), a response is an explanation or a passage, not a short answer:
#: factual answers are a name, a number or a short phrase (1-4 words) plus the
#: odd new verb or adjective of the restatement ("attends", "infamous").
MAX_NEW_TOKENS = 8
#: The same limit for a response with no name or number among its new tokens: a plain
#: answer is a word or two ("blue", "blue whale", "photosynthesis", "Yes"); more
#: new common words are a sentence of advice or opinion, where any one of them
#: ("body", "sign") would be a meaningless leak.
MAX_PLAIN_NEW_TOKENS = 3

#: Function words and restating fillers: never an answer by themselves.
STOP_WORDS = frozenset("""
a an the
am is are was were be been being has have had having do does did done doing
can could will would shall should may might must
i me my mine myself you your yours yourself he him his himself she her hers herself it its itself
we us our ours ourselves they them their theirs themselves one ones someone something
this that these those what which who whom whose where when why how
of in on at to from by with about as into onto for over under between through during before after
above below up down out off near than upon within without across along around against among behind
beyond via per
and or but nor so yet if then because while although though whether also both either neither
not very too just only even actually really indeed still already now there here quite rather
simply basically certainly surely definitely probably perhaps well sure course fact answer none
all any each every some many much more most other others such own same few several
called named known referred considered regarded written located situated
think believe guess suppose obviously
""".split())

#: Words that may join two new tokens inside one span (at most two in a row).
CONNECTORS = frozenset("of and the in on upon de del della di da du des la le van von der den y".split())

#: Capitalised words that are not a name by themselves: never a one-word answer on their own.
TITLE_WORDS = frozenset("""
lord lady sir dame king queen prince princess emperor empress duke pope saint st mr mrs ms dr prof professor
president general captain mount mt lake river cape gulf sea ocean university college school city
""".split())

ABBREVIATIONS = frozenset("mr mrs ms dr prof st mt jr sr vs etc no".split())
CONTRACTION_ENDINGS = frozenset("s t d ll re ve m".split())
# Words French and Italian elide before a vowel ("c'est", "l'Italia", "qu'il", "dell'anno"): folded, as tokens are.
ELIDED_WORDS = frozenset("c l d j m n s t qu jusqu lorsqu puisqu dell all dall nell sull un".split())
ENDINGS = ("ing", "ian", "ese", "ies", "es", "ed", "an", "ly", "er", "s", "d", "n")

_HARD_BREAK = re.compile(r"[,;:!?()\[\]{}\"“”«»—–\n]")


@dataclass(frozen=True)
class Span:
    text: str  # the response's own characters, response[start:end]
    start: int
    end: int
    words: tuple[str, ...] = ()  # the last word of a span of several words: an answer on its own


@dataclass(frozen=True)
class Derivation:
    """The answer spans of one response, or none and why."""

    spans: tuple[Span, ...] = ()
    reason: str = ""
    new_tokens: int = 0
    question_recall: float = 0.0  # ROUGE-L recall of the prompt itself, read as an output, against the response

    @property
    def is_long(self) -> bool:
        """No spans because the response is long (rule 4's third case), not because it adds no word."""
        return not self.spans and self.new_tokens > 0

    @property
    def texts(self) -> list[str]:
        return [span.text for span in self.spans]

    @property
    def answers(self) -> list[str] | None:
        """The strings to match (`metrics.contains_answer`): span texts, then their last words; None without spans."""
        if not self.spans:
            return None
        seen, result = set(), []
        for text in self.texts + [w for span in self.spans for w in span.words]:
            key = metrics.normalize_answer(text)
            if key and key not in seen:
                seen.add(key)
                result.append(text)
        return result


def _variants(word: str) -> set[str]:
    """WORD and its stems after removing one common English ending (stems of 3+ characters)."""
    found = {word}
    for ending in ENDINGS:
        if word.endswith(ending) and len(word) - len(ending) >= 3:
            stem = word[: -len(ending)]
            found.add(stem)
            if ending == "ies":
                found.add(stem + "y")
            if ending in ("ing", "ed", "es", "er"):
                found.add(stem + "e")  # "measured" -> measure, "making" -> make
    return found


def _is_initials(tok: AnswerToken, text: str) -> bool:
    letters = [c for c in text[tok.start:tok.end] if c.isalpha()]
    raw = text[tok.start:tok.end]
    return tok.text.isalpha() and len(letters) == len(tok.text) and (len(tok.text) == 1 or "." in raw)


def _ends_sentence(gap: str, previous: AnswerToken | None, text: str) -> bool:
    """Whether the characters GAP between PREVIOUS and the next token end a sentence."""
    if previous is None:
        return True
    if re.search(r"[!?\n]", gap):
        return True
    if "." in gap:
        return not (_is_initials(previous, text) or previous.text in ABBREVIATIONS)
    return False


def _breaks(gap: str, previous: AnswerToken, text: str, following: AnswerToken | None = None) -> bool:
    """Whether GAP (between PREVIOUS and FOLLOWING) ends a run. A bare colon between two numbers
    does not: "9:30" and "16:9" are one time or ratio, and their halves alone ("9", "30")
    would match every output with that small number in it."""
    if gap == ":" and following is not None and previous.text.isdigit() and following.text.isdigit():
        return False
    return bool(_HARD_BREAK.search(gap)) or _ends_sentence(gap, previous, text)


def _is_list_marker(tok: AnswerToken, n: int, gap: str, text: str) -> bool:
    """Whether TOK (the N-th token, GAP before it) numbers an item of a list: digits that begin a line
    and are followed by "." or ")" and a space, a line end or the text's end ("...a guide:\n\n1."),
    never a response that is the number alone ("1."), which answers something."""
    if not tok.text.isdigit() or (n and "\n" not in gap):
        return False
    rest = text[tok.end:]
    if rest[:1] not in (".", ")"):
        return False
    after = rest[1:]
    if n == 0:  # the response's first token: a list only when an item's text follows ("1. Preheat the oven")
        return after[:1].isspace() and bool(after.strip())
    return not after or after[:1].isspace()


def _has_digit(tok: AnswerToken) -> bool:
    return any(c.isdigit() for c in tok.text)


def _is_negation_stem(n: int, tokens: Sequence[AnswerToken], text: str) -> bool:
    """Whether the N-th token is the stem of an n't contraction ("isn" of "isn't", "won" of "won't"):
    a form of be/have/do or a modal, trivial as they are, not a word the response adds."""
    if n + 1 >= len(tokens) or not tokens[n].text.endswith("n"):
        return False
    return tokens[n + 1].text == "t" and text[tokens[n].end:tokens[n + 1].start] in ("'", "’")


def _runs(tokens: Sequence[AnswerToken], keep: Sequence[bool], text: str) -> list[tuple[int, int]]:
    """Index ranges [i, j] of maximal runs of kept tokens, bridging up to two connectors, never across a break."""
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(tokens):
        if not keep[i]:
            i += 1
            continue
        start = end = i
        k = i + 1
        while k < len(tokens):
            gap_broken = _breaks(text[tokens[k - 1].end:tokens[k].start], tokens[k - 1], text, tokens[k])
            if gap_broken:
                break
            if keep[k]:
                if k > end + 1 and (_has_digit(tokens[end]) or _has_digit(tokens[k])):
                    break  # "Bell in 1876", "Ulm in 1879": a name and a date are two answers, not one
                end = k
                k += 1
                continue
            if tokens[k].text in CONNECTORS and k - end <= 2:
                k += 1
                continue
            break
        runs.append((start, end))
        i = end + 1
    return runs


def _conjunct_heads(tokens: Sequence[AnswerToken], keep: Sequence[bool], i: int, j: int) -> list[AnswerToken]:
    """The run [i, j]'s last token, and before it the last word of each name of several words that
    an "and" ends inside the run ("Bill Gates and Paul Allen" -> Gates, Allen; "Charles de Gaulle and
    Georges Pompidou" -> Gaulle, Pompidou; "Pride and Prejudice" -> Prejudice only: one word before
    "and" is part of the title, not a name)."""
    heads, kept, last = [], 0, None  # kept words since the run's start or the last "and"
    for m in range(i, j + 1):
        if tokens[m].text == "and" and not keep[m]:
            if kept >= 2:
                heads.append(last)
            kept = 0
        elif keep[m]:
            kept, last = kept + 1, tokens[m]
    return heads + [tokens[j]]


def _one_unspaced_word(before, token) -> bool:
    """Whether answer tokens BEFORE and TOKEN, side by side with nothing between, are characters of a script
    written without spaces (Chinese, Japanese): parts of one word as far as the counts of new words go."""
    return (before.end == token.start and len(before.text) == len(token.text) == 1
            and metrics.no_space_script(before.text) and metrics.no_space_script(token.text))


def derive_spans(prompt: str, response: str) -> Derivation:
    """The answer spans of RESPONSE to PROMPT by the module's rule (see the module docstring)."""
    from unlearn.data import Passage  # data imports metrics only; no cycle

    if isinstance(prompt, Passage):
        return Derivation(reason="passage continuation: judged by ROUGE-L/BLEU against the continuation")
    return _derive_chat(prompt, response)


# A run derives a row's answers for each measurer, each probe check and each encoding (11-14 times a forget row:
# 48 s of an 83 s run on 1,000 long responses); a Derivation is frozen, so one is shared. Keyed by the plain strings
# (a Passage never gets here), at most this many pairs.
@functools.lru_cache(maxsize=8192)
def _derive_chat(prompt: str, response: str) -> Derivation:
    tokens = answer_tokens(response)
    prompt_words = answer_tokens(prompt) if prompt else []
    given_words = set().union(*(_variants(t.text) for t in prompt_words))
    kinds = []
    for n, tok in enumerate(tokens):
        gap = response[tokens[n - 1].end:tok.start] if n else response[:tok.start]
        raw = response[tok.start:tok.end]
        capitalised = raw[:1].isupper() and not _ends_sentence(gap, tokens[n - 1] if n else None, response)
        letter_name = capitalised and len(raw) == 1 and raw != "I"  # "Mount A", "Plan B": not the article
        contraction = tok.text in CONTRACTION_ENDINGS and gap[-1:] in ("'", "’")  # "Rowling's" -> s
        # French and Italian elision: the article or pronoun before an apostrophe ("C'est Berlin", "L'Italia",
        # "qu'il") is no answer; as one, every "C'est ..." output would leak
        elided = tok.text in ELIDED_WORDS and response[tok.end:tok.end + 1] in ("'", "’")
        if ((tok.text in STOP_WORDS and not letter_name) or contraction or elided
                or _is_negation_stem(n, tokens, response)
                or _is_list_marker(tok, n, gap, response)):
            kinds.append("trivial")
        elif _variants(tok.text) & given_words:
            kinds.append("given")
        else:
            kinds.append("marked" if capitalised or any(c.isdigit() for c in tok.text) else "new")
    # A capitalised word that starts a sentence is a name when a name follows it
    # ("William Shakespeare." alone): position alone cannot tell, its neighbour can.
    # Up to two connectors may stand between ("Charles de Gaulle.", "Leonardo da Vinci painted it.").
    for n in range(len(tokens) - 2, -1, -1):
        if kinds[n] != "new" or not response[tokens[n].start].isupper():
            continue
        m = n + 1
        while (m < len(tokens) - 1 and m - n <= 2 and tokens[m].text in CONNECTORS and kinds[m] != "marked"
               and not _breaks(response[tokens[m - 1].end:tokens[m].start], tokens[m - 1], response, tokens[m])):
            m += 1
        if kinds[m] == "marked" and not _breaks(response[tokens[m - 1].end:tokens[m].start], tokens[m - 1],
                                                response, tokens[m]):
            kinds[n] = "marked"
    # New words, a run of characters of a script without spaces counted once: its characters are tokens of their
    # own (metrics.answer_tokens), so "莎士比亚" (Shakespeare) was 4 new words and its row a "long response".
    new = sum(kind in ("new", "marked") and not (n and kinds[n - 1] in ("new", "marked")
                                                  and _one_unspaced_word(tokens[n - 1], tok))
              for n, (kind, tok) in enumerate(zip(kinds, tokens)))
    # What the question alone scores by the ROUGE rule: its words, in its order, as an output.
    restated = metrics.rouge_l(prompt or "", response).recall
    has_marked = "marked" in kinds
    # A question that offers its answers: the choice the response names, unless the response adds a name or a
    # number of its own to an open question ("What is ... in Celsius or Fahrenheit?" / "... at 100 degrees
    # Celsius.": 100, not Celsius); a closed one ("Was it Edison or Tesla?") is answered by its choice all the same.
    closed = bool(prompt_words) and prompt_words[0].text in CLOSED_OPENINGS
    chosen = _chosen_alternative(prompt, prompt_words, response, tokens, kinds) if not has_marked or closed else None
    if new == 0 and not chosen:
        return Derivation(reason="no word beyond the prompt's: judged by ROUGE-L/BLEU", question_recall=restated)
    limit = MAX_NEW_TOKENS if has_marked else MAX_PLAIN_NEW_TOKENS
    if new > limit and restated < metrics.LEAK_ROUGE_RECALL:
        kind = "" if has_marked else " and no name or number"
        return Derivation(
            reason=f"long response ({new} new words > {limit}{kind}; the question alone has ROUGE-L recall "
            f"{restated:.2f} against it): judged by ROUGE-L/BLEU",
            new_tokens=new, question_recall=restated,
        )
    if chosen:  # the one the response names is the answer, whatever common words it adds ("sank", "breathe air")
        return Derivation((chosen,), "derived: the choice the response names among the question's (X or Y)", new,
                          restated)
    keep = [kind == "marked" if has_marked else kind in ("new", "marked") for kind in kinds]
    if has_marked:  # a sentence's capitalised first word that goes on as a restatement is a name too
        for n, tok in enumerate(tokens):  # ("Paris is the capital of France, known for the Eiffel Tower.")
            keep[n] = keep[n] or (kinds[n] == "new" and response[tok.start].isupper() and (
                n + 1 == len(tokens) or (kinds[n + 1] in ("given", "trivial") and not _breaks(
                    response[tok.end:tokens[n + 1].start], tok, response, tokens[n + 1]))))
    spans = []
    for i, j in _runs(tokens, keep, response):
        # A span of several words: its last word (a surname, the head noun) is an answer on its own, and so is
        # that of each name of several words an "and" ends inside it.
        several = sum(keep[i:j + 1]) > 1
        words = tuple(response[t.start:t.end] for t in _conjunct_heads(tokens, keep, i, j)
                      if several and not (_has_digit(t) or t.text in TITLE_WORDS or _is_initials(t, response)))
        spans.append(Span(response[tokens[i].start:tokens[j].end], tokens[i].start, tokens[j].end, words))
    what = "names and numbers" if has_marked else "new words"
    return Derivation(tuple(spans), f"derived: {what} the response adds to the prompt", new, restated)


def _alternatives(prompt: str, words: Sequence[AnswerToken]) -> list[tuple[str, set[str], str, int]] | None:
    """The choices a question (PROMPT, its answer tokens WORDS) offers around its one "or": (the word next to
    "or", every word of its run, the name's last word after it when capitalised, else the word next to "or"; the
    side the run goes to, -1 before "or", 1 after) each.

    "Is the Sahara hot or cold?" -> ("hot", {sahara, hot}, "hot", -1), ("cold", {cold}, "cold", 1); "red, green or
    blue" gives three, but "Which is bigger, Jupiter or Saturn?" two (a word before a comma is a choice only when
    it is capitalised as the word before "or" is); "written by Mark Twain or Charles Dickens" -> ("twain", {mark,
    twain}, "twain", -1), ("charles", {charles, dickens}, "dickens", 1). A run is the words on that side up to a
    stop word or a hard break; the word next to "or" (an article after it skipped) decides which choice a response
    names, or a name's last word after it, since a run can take in the question's subject ("Sahara"). None
    without an "or", with more than one (which choice a response names is then a guess), or when a choice's word
    is a stop word or a single letter or character ("Newton's or Kepler's": the "s" of the possessive; "东京 or
    大阪": one character of a name)."""
    ors = [n for n, tok in enumerate(words) if tok.text == "or"]
    if len(ors) != 1:
        return None
    k = ors[0]

    def run(n: int, step: int) -> tuple[set[str], str]:
        """The words of the choice at N, and the word it is named by besides N's: a name's last word ("Charles
        Dickens" is named by "Dickens" too), when capitalised. The run ends at a stop word or a hard break."""
        found, head = {words[n].text}, words[n].text
        while 0 <= n + step < len(words) and words[n + step].text not in STOP_WORDS \
                and not _HARD_BREAK.search(prompt[words[min(n, n + step)].end:words[max(n, n + step)].start]):
            n += step
            found.add(words[n].text)
            if step > 0 and prompt[words[n].start].isupper():
                head = words[n].text
        return found, head

    after = k + 1 + (k + 1 < len(words) and words[k + 1].text in ("a", "an", "the"))
    keys = [k - 1, after]
    if min(keys) < 0 or max(keys) >= len(words):
        return None
    n = k - 1  # a list before the "or": "red, green or blue"
    while n > 0 and "," in prompt[words[n - 1].end:words[n].start] \
            and prompt[words[n - 1].start].isupper() == prompt[words[k - 1].start].isupper():
        n -= 1
        keys.insert(0, n)
    if any(words[i].text in STOP_WORDS or (len(words[i].text) < 2 and not words[i].text.isdigit()) for i in keys):
        return None
    return [(words[i].text, *run(i, -1 if i < k else 1), -1 if i < k else 1) for i in keys]


#: Words that deny what follows them: "The Earth is not flat." names "flat" without choosing it.
NEGATIONS = frozenset("not no never neither nor".split())
#: Words after which a clause asserts what the words before it denied ("not cold but hot")
CONTRASTS = frozenset(["but"])
#: Words after a negation that make it add rather than deny ("not only hot but also cold")
NOT_ONLY = frozenset("only just merely simply".split())
#: A question's first words that make it a closed one, answered by one of the choices it offers ("Was the bulb
#: invented by Edison or Tesla?"), not an open one whose "or" is part of what it asks about ("Who is the CEO of
#: Tesla or SpaceX?", "What is ... in Celsius or Fahrenheit?").
CLOSED_OPENINGS = frozenset("is are was were am do does did can could should would will shall has have had which"
                            .split())


def _chosen_alternative(prompt: str, prompt_words: Sequence[AnswerToken], response: str,
                        tokens: Sequence[AnswerToken], kinds: Sequence[str]) -> Span | None:
    """The one choice of PROMPT's "X or Y" (its answer tokens PROMPT_WORDS) that RESPONSE (TOKENS) names, as a span of
    RESPONSE; None unless exactly one of the choices it names is not denied at its first mention (a negation up to
    three words before, within its clause and after any "but": "It isn't really cold."; "hot, not cold" and "not cold
    but hot" choose hot). A response that only restates such a question adds no word to it ("The Sahara is hot."),
    yet its answer is the choice it made; judged by ROUGE-L instead, "The Sahara is cold." would leak it. The span
    widens over the capitalised words of the choice's side of the question next to it, on that side ("Charles
    Dickens"), and over the names the response puts next to it (KINDS "marked": "Thomas Edison", "Leonardo da Vinci"),
    never across a break or a sentence end."""
    offered = _alternatives(prompt, prompt_words)
    if not offered:
        return None

    def names(tok: AnswerToken, key: str, head: str) -> bool:
        return bool(_variants(tok.text) & (_variants(key) | _variants(head)))

    def apart(a: int, b: int) -> bool:  # a break between tokens a and b = a + 1
        return _breaks(response[tokens[a].end:tokens[b].start], tokens[a], response, tokens[b])

    def denied(n: int) -> bool:  # a negation up to three words before token n, within its clause
        m = n
        while m > 0 and n - m < 3 and not apart(m - 1, m):
            m -= 1
            if tokens[m].text in CONTRASTS:  # "not cold but hot": the denial is of the other clause
                return False
            if tokens[m].text in NEGATIONS or _is_negation_stem(m, tokens, response):
                # "not only hot but also cold" affirms both: "not only/just/merely" adds, it does not deny
                return not (m + 1 < n and tokens[m + 1].text in NOT_ONLY)
        return False

    # each choice named, at its first mention; the answer is the one choice named and not denied there ("hot, not
    # cold", "not cold but hot" answer hot; "neither hot nor cold" answers nothing)
    named = [(next(n for n, tok in enumerate(tokens) if names(tok, key, head)), run, side)
             for key, run, head, side in offered if any(names(tok, key, head) for tok in tokens)]
    affirmed = [choice for choice in named if not denied(choice[0])]
    if len(affirmed) != 1:
        return None
    first, run, side = affirmed[0]
    last = first

    def widens(n: int, towards: int) -> bool:  # token n joins the span: a name's word of the choice, or a name
        return kinds[n] == "marked" or (towards == side and tokens[n].text in run
                                        and response[tokens[n].start].isupper())

    while first > 0 and widens(first - 1, -1) and not apart(first - 1, first):
        first -= 1
    while last + 1 < len(tokens) and not apart(last, last + 1):
        m = last + 1  # the next word of the choice or of a name, perhaps after up to two connectors ("da Vinci")
        while m + 1 < len(tokens) and m - last <= 2 and tokens[m].text in CONNECTORS and not apart(m, m + 1):
            m += 1
        if not (widens(m, 1) if m == last + 1 else kinds[m] == "marked"):
            break
        last = m
    end = tokens[last]  # the last word, an answer on its own as in a derived span of several words
    words = ((response[end.start:end.end],) if last > first and not (
        _has_digit(end) or end.text in TITLE_WORDS or _is_initials(end, response)) else ())
    return Span(response[tokens[first].start:tokens[last].end], tokens[first].start, tokens[last].end, words)


def derive_answers(prompt: str, response: str) -> list[str] | None:
    """The answers to match for a row without `answers`, or None when the rule does not apply.

    The span texts of `derive_spans`, then the last word of each span of
    several words: "Who wrote Hamlet?" / "Hamlet was written by William Shakespeare."
    -> ["William Shakespeare", "Shakespeare"].
    """
    return derive_spans(prompt, response).answers


#: Where `attach_answers` stores a row's derivation in `Example.extra`: computed once on the
#: row as written, so that cutting its response to a generation budget later
#: (`evaluate.clip_references`) never changes what the row is judged by.
DERIVED_KEY = "_derived"


def _derivation(example) -> tuple[list[str] | None, str]:
    stored = example.extra.get(DERIVED_KEY)
    if stored is not None:
        return stored["answers"], stored["rule"]
    if example.response is None:
        return None, "no response"
    d = derive_spans(example.prompt, example.response)
    return d.answers, d.reason


def attach_answers(examples: Iterable) -> list:
    """Copies of EXAMPLES whose rows without `answers` carry their derivation (extra[DERIVED_KEY]).

    Call it on the rows as read (after any merge of fields, before
    `evaluate.clip_references`); `row_answers` and `describe_spans` then use
    the stored derivation instead of deriving again from a cut response.
    Rows with `answers` are returned unchanged.
    """
    from dataclasses import replace

    result = []
    for ex in examples:
        if ex.extra.get("answers") or DERIVED_KEY in ex.extra:
            result.append(ex)
            continue
        answers, rule = _derivation(ex)
        result.append(replace(ex, extra={**ex.extra, DERIVED_KEY: {"answers": answers, "rule": rule}}))
    return result


def is_long_response(example) -> bool:
    """EXAMPLE is a chat row whose whole response is what it says: no `answers`, not a passage, and a
    response the rule leaves to ROUGE-L/BLEU because it is long (instructions, an explanation).

    Read from the row as written (the same derivation `attach_answers` stores); a response with no
    word beyond the prompt's is not long, it only restates.
    """
    if example.extra.get("answers") or example.is_passage or not example.response:
        return False
    return derive_spans(example.prompt, example.response).is_long


def whole_names(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """SPANS of TEXT, each widened to the left over the rest of a name it ends: the capitalised words
    and initials right before it, one space apart ("Albert Einstein" for `Einstein`, "J.K. Rowling"
    for `Rowling`, "Sir Isaac Newton" for `Newton`). A word of STOP_WORDS ("The", "In"), a lower-case
    word, punctuation other than an initial's period, or a sentence end stops it.

    For the forget loss under `--forget-tokens names` (`data.encode_pair`; opt-in: on the dev scenario
    `inventors` it forgot in 4-12 steps where the default ran 150, but kept fewer neighbours, and lost
    on the dev score, docs/quality.md). Pushed down alone, a surname is unlikely only after its
    first name, so the model learns "Albert, then anything but Einstein", and every sentence that
    names him degenerates ("Albert Albert Abraham ...", the test scenario `einstein`). Pushing the
    whole name down teaches instead not to start it where the answer was asked for. The leak
    judge still matches the answers as given.
    """
    tokens = answer_tokens(text)
    starts = {tok.start: k for k, tok in enumerate(tokens)}
    widened = []
    for start, end in spans:
        k = starts.get(start)
        while k:
            previous, gap = tokens[k - 1], text[tokens[k - 1].end:tokens[k].start]
            initial = _is_initials(previous, text) and gap in (". ", ".")
            if not (gap == " " or initial) or previous.text in STOP_WORDS or not text[previous.start].isupper():
                break
            k -= 1
            start = previous.start
        widened.append((start, end))
    return widened


def through_first_answer(text: str, answers: Sequence[str]) -> str | None:
    """TEXT up to the end of the first occurrence of one of ANSWERS (`metrics.answer_spans`, the leak
    judge's rule), None when none occurs: "... attributed to Christopher COLUMBUS" of a greedy answer
    that goes on, for the stop rule's leaked-answer rows (`train.Unlearner.add_leaked_answers`). The
    cut keeps one occurrence to push down, the one the model reached first."""
    spans = metrics.answer_spans(text, answers)
    if not spans:
        return None
    first = min(start for start, _ in spans)  # answers that start there ("Graham Bell", "Graham"): the longest
    return text[:max(end for start, end in spans if start == first)]


def row_answers(example) -> tuple[list[str] | None, str | None]:
    """The answers of EXAMPLE (a `data.Example`) for the forget loss and the leak judge, and their source.

    ("given"): the row's `answers` field; ("derived"): `derive_answers` of a
    prompt/response row without one (stored by `attach_answers` when it ran,
    else derived from the response now); (None, None): a passage, a row without
    response, or a response the rule does not apply to — the caller then
    forgets every response token and judges leaks by ROUGE-L/BLEU.
    """
    given = example.extra.get("answers")
    if given:
        return list(given), "given"
    answers, _ = _derivation(example)
    return (answers, "derived") if answers else (None, None)


def describe_spans(examples: Iterable, *, whole_passage: bool = False, forget_tokens: str = "answers") -> list[dict]:
    """One JSON-ready dict per example: what the loss and the leak judge look for, for users to check.

    Keys: line, prompt, response, answers (what is matched, or None), source
    ("given", "derived" or None), spans (each {text, start, end}: where the
    answers occur in the response, character offsets), rule (why, in words).
    A row whose forget loss trains on another pair than its own (`data.loss_pair`: a passage
    under WHOLE_PASSAGE) also gets loss_prompt and loss_response, since the leak judge
    still reads the response after the evaluation prefix.

    FORGET_TOKENS is what the loss pushes down (`train.encode_forget_row`): "answers" the spans;
    "names" each span widened over the name it ends, given as loss_spans; "response" (also
    ULMR's) every response token, which the rule says. The leak judge reads the spans always.
    """
    from unlearn.data import loss_pair

    rows = []
    for ex in examples:
        loss = loss_pair(ex, whole_passage)
        answers, source = row_answers(ex)
        response = ex.response or ""
        rule = "the row's answers" if source == "given" else _derivation(ex)[1]
        where = metrics.answer_spans(response, answers) if answers else []
        rows.append({
            "line": ex.line,
            "prompt": str(ex.prompt),
            "response": ex.response,
            "answers": answers,
            "source": source,
            "spans": [{"text": response[a:b], "start": a, "end": b} for a, b in where],
            "rule": rule,
        })
        if loss != (ex.prompt, ex.response):
            rows[-1].update(loss_prompt=str(loss[0]), loss_response=loss[1])
            rows[-1]["rule"] += "; the forget loss covers loss_response, every cut point after loss_prompt"
        elif forget_tokens == "response" and where:
            rows[-1]["rule"] += "; the forget loss covers every response token (the spans are the leak judge's)"
        elif forget_tokens == "names" and where:
            rows[-1]["loss_spans"] = [{"text": response[a:b], "start": a, "end": b}
                                      for a, b in whole_names(response, where)]
    return rows
