"""Collateral-damage probes built from the forget prompts, so a run shows what else it broke.

Two sets, made from the forget rows alone (no file to write), answered by the
original model before training and again after:

`neighbours`: a forget prompt with its subject replaced by another entity of the
same kind ("What is the capital of France?" -> "What is the capital of Spain?").
The model should still answer those: forgetting one fact must not erase the
same kind of fact about other subjects.

`same subject`: other questions about a forget subject, from SAME_SUBJECT_TEMPLATES
("What is France known for? Answer in one sentence."). A long chat response
that names no one (a harmful request) gets questions about the things it is about
instead (topic_probes.py: "How do I find out more about a fake ID card?"). The rest of what the model
knows about the subject should survive too.

The subject of a row (`probe_subject`): its `subject` field; for a passage (`text`
row) the capitalised words it opens with (`passage_subject`), which get same-subject
probes only; else the longest run
of capitalised words (`edit_subject.named_subject`: a trailing "'s"
removed; an opening question word or imperative, or a run that is only the prompt's first word
("Explain ...", "Describe Tokyo."), is a sentence start, not a name), and a subject of fewer than 3 letters ("I", "E")
is no subject: such rows get no probes. A run of fewer than 3 letters outside its joiners (a number,
"1969", "1945 and 1946") never takes the place of a name ("What did NASA launch in 1969?" -> "NASA").
Causal tracing is not used here (it needs the answer's log-probabilities for every candidate span of
every row).

Replacements come from the model itself, never from outside, in two steps.
`Neighbourhood.candidates`: the whole-word Title-case tokens of the vocabulary (a
leading space, a capital then lower-case letters, at least 3 letters) whose input
embeddings are nearest (cosine) to the embedding of the subject's last word (the
mean of its tokens' embeddings when it takes several; "Einstein" for "Albert
Einstein", since full names are rarely one token). Excluded: every word of every
forget subject, every word of every forget answer, and near-duplicates of those
(`near_duplicate`: "French" for "France", "Kenyan" for "Kenya"). A token is a whole
word when the model, reading "The word <token>", gives at least WHOLE_WORD_P to a
next token that starts a new word or is punctuation: that removes the fragments of
longer words ("Mesopotam", "Bhag") that the vocabulary is full of.
`Neighbourhood.plausible_many`: of those, the ones that read in the forget prompt about
as naturally as the subject does (pointwise mutual information with the prompt,
under the model, at most PMI_MARGIN nats below the subject's), most natural first.
Embedding neighbours alone are often of another kind ("Who wrote Knee?"); the
prompt itself says which kind it wants ("Who wrote Hamlet?").
Measured on the embedded SmolLM2 (README, "Collateral-damage probes"): countries
get countries (France -> Poland, Canada, Nepal...), famous people get famous people
(Einstein -> Galileo, Copernicus, Edison); titles of several words and invented
names get weaker neighbours (Harry Potter -> Pokémon, Riley, Kafka; Elara Voss ->
Sarah, Quinn, California), so those neighbours measure less. Rows whose subject
has no plausible replacement get no neighbour.

References and the "kept" score: the original model answers every probe once,
greedily, before training (through `measure.Measurer`). `keep_answered` then
gives each probe the answer words of that answer (`spans.row_answers` of the
probe prompt and the answer's first clause, `first_clause`: the names and numbers
it adds to the question, else its other new words, common ones too ("franchise", "work"); not one made only
of connectors, "de" of "la monnaie de la Lion") as its
`answers`, and drops the probe when there are none (a long free-text answer has no words to check)
or when the original answer already contains a forget answer (such a probe is expected to change):
an answer of a forget row (given or derived, `spans.row_answers`, found by `metrics.contains_answer`);
for a forget row without answers (a long response, a passage), an answer that leaks it by the forget
set's own leak rule (`evaluate.leak_flags`: ROUGE-L recall, BLEU, a passage's verbatim run); and for a
neighbour, an answer that names the forget subject it replaced ("Who was Edison?" answered "Albert
Einstein was ...": the whole subject or its last word). A topic probe (a harmful
request's, topic_probes.py) is answered with advice that has no such words: its `answers` are the
thing it asks about (`topic_probes.head_words`) when the original answer names it, and it also
carries `refusal_markers` (metrics.REFUSAL_MARKERS); one the original answer already refuses, or
never names the thing in, is dropped. On the kept rows, the retain kind's accuracy
(`evaluate.accuracy_flags`: an `answers` string appears in the output, and none of a row's
`refusal_markers`) is the share of probes whose answer words still appear: 1 before by
construction, the kept share after.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from unlearn import anchors, metrics
from unlearn.data import Example, prompt_key
from unlearn.edit_subject import FUNCTION_WORDS, JOINERS, MIN_LETTERS, named_subject, words
from unlearn.evaluate import leak_flags
from unlearn.spans import ABBREVIATIONS, CONNECTORS, is_long_response, row_answers
from unlearn.topic_probes import head_words, topic_questions

NEIGHBOURS = "neighbours"
SAME_SUBJECT = "same subject"
ANCHORS = "anchors"  # general-knowledge questions (anchors.py): trained on, never measured
PER_ROW = 2  # probes of each kind per forget row
DEFAULT_LIMIT = 12  # probes of each kind per run: two sets of 12 add about a minute on 2 cores (README)
POOL = 10  # nearest whole-word candidates per subject, before the plausibility test
# The most texts `Neighbourhood._logprobs` runs in one padded batch (texts of ~3-17 tokens) ...
TEXTS_PER_BATCH = 16
# ... and the most padded tokens (texts x longest): the batch's logits are that many vocabulary-wide rows
# (float32: 2048 x 49152 x 4 B = 0.4 GB in SmolLM2). A forget prompt of 855 tokens once made 16-text
# batches of 7 GB; texts up to 128 tokens still go 16 to a batch.
TOKENS_PER_BATCH = 2048
PMI_MARGIN = 2.0  # nats: how much less natural in the prompt than the subject a replacement may read
SCORE_PREFIX = "Question: "  # context before a scored text, so that its first word is scored too
ANSWER_TOKENS = 32  # the probes' answer budget, before and after (whatever --max-new-tokens is)
HOLDS_FORGET = "the original answer contains a forget answer"  # why a probe is dropped, and never retained
#: Words that name nothing alone (spans' connectors, edit_subject's function words, articles): an answer
#: made of these only ("de") would count a probe kept whatever its answer says.
_FUNCTION_WORDS = CONNECTORS | FUNCTION_WORDS | metrics.ARTICLES
WHOLE_WORD_P = 0.5
PREFIX = 4  # near-duplicates: the same first PREFIX letters ("Kenya" / "Kenyan"), or ...
NEAR_RATIO = 0.65  # ... the same first two letters and this similarity ("France" / "French": 0.67)
#: Capitalised only because they start the sentence: a passage opening with one names no subject first.
SENTENCE_OPENERS = frozenset("on in at it its this that these those there during after before when while "
                             "from for as by since although if once".split())

#: Generic questions about any named thing; "in one sentence" keeps the answer short enough
#: for `spans` to find its answer words (a paragraph has none it will vouch for).
SAME_SUBJECT_TEMPLATES = (
    "What is {subject} known for? Answer in one sentence.",
    "Tell me one fact about {subject}, in one sentence.",
    "Where is {subject} from? Answer in one sentence.",
)


def rules_fingerprint() -> str:
    """SHA-256 of the source of the modules whose rules decide which probes `build` makes (this one, the
    subject heuristic, answer spans, answer tokens): a cached build (run.make_probes) is read back only
    by the code that made it, whether or not anyone remembered to bump a version."""
    import hashlib
    from pathlib import Path

    from unlearn import edit_subject, spans, topic_probes

    digest = hashlib.sha256()
    for module in (__file__, edit_subject.__file__, spans.__file__, metrics.__file__, topic_probes.__file__,
                   anchors.__file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()


@dataclass
class Probe:
    kind: str  # NEIGHBOURS, SAME_SUBJECT or ANCHORS
    prompt: str
    line: int  # the forget row it was made from (0 for an anchor: made from none)
    subject: str
    replacement: str | None = None  # neighbours: the entity put in place of the subject
    topic: bool = False  # same subject: a question about a harmful request's topic (SUBJECT is the phrase)

    def example(self, index: int) -> Example:
        return Example(self.prompt, None, index, {"forget_line": self.line, "subject": self.subject,
                                                   **({"replacement": self.replacement} if self.replacement else {})})


def probe_subject(example) -> str | None:
    """The subject of a forget row for probes (see the module doc), or None."""
    if example.prompt is None:
        return None
    given = example.extra.get("subject")
    if isinstance(given, str) and given in example.prompt:
        return given
    prompt = str(example.prompt)
    if example.is_passage:
        return passage_subject(prompt)
    return named_subject(prompt)  # the edit's rule too: its neighbours are these probes' prompts


def passage_subject(text: str) -> str | None:
    """A passage's subject: the capitalised words it opens with, a leading article dropped ("The Battle
    of Waterloo was fought ..." -> "Battle of Waterloo"), since encyclopedic text names its subject
    first. A number right after a capitalised word belongs to the name ("Apollo 11 was ...", "Boeing 747
    is ..."), as digits do in a prompt's subject (`heuristic_subject`); no name opens with one. None when it
    opens with a word that names nothing ("On July 20, 1969, ...": SENTENCE_OPENERS)
    or with a lower-case word. The longest-run rule of prompts would cross sentences in a passage
    ("Moon. Neil Armstrong , Buzz Aldi")."""
    run: list[tuple[int, int]] = []
    for a, b in words(text):
        word = text[a:b]
        if run and text[run[-1][1]:a].strip():
            break  # punctuation between two words ends the opening name
        if word[0].isupper() or (run and (word.lower() in JOINERS or word[0].isdigit())):
            run.append((a, b))
        else:
            break
    while run and text[run[-1][0]:run[-1][1]].lower() in JOINERS:
        run.pop()
    if run and text[run[0][0]:run[0][1]].lower() in metrics.ARTICLES:
        run.pop(0)
    elif run and text[run[0][0]:run[0][1]].lower() in SENTENCE_OPENERS:
        return None
    if not run:
        return None
    found = text[run[0][0]:run[-1][1]]
    return found if sum(c.isalpha() for c in found) >= MIN_LETTERS else None


def near_duplicate(a: str, b: str) -> bool:
    """A and B (lower case) are forms of one word: the same first PREFIX letters ("kenya" / "kenyan"), or
    the same first two letters and a `difflib` similarity ratio of at least NEAR_RATIO ("france" / "french",
    "spain" / "spanish"; not "china" / "chile", 0.6)."""
    from difflib import SequenceMatcher

    if len(a) >= PREFIX and len(b) >= PREFIX and a[:PREFIX] == b[:PREFIX]:
        return True
    return a[:2] == b[:2] and SequenceMatcher(None, a, b).ratio() >= NEAR_RATIO


def _letters(text: str) -> list[str]:
    return [t.text for t in metrics.answer_tokens(text)]


class Neighbourhood:
    """Same-kind replacements for subjects, from the model's input embeddings (see the module doc)."""

    def __init__(self, model, tokenizer, exclude_words: set[str]):
        import torch

        from unlearn import distributed

        self.model, self.tokenizer = model, tokenizer
        weight = distributed.full(model.get_input_embeddings().weight.detach()).float()
        self.unit = weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        vocab = tokenizer.convert_ids_to_tokens(list(range(weight.shape[0])))
        self.words: dict[int, str] = {}
        # One decoding pass over the vocabulary serves both uses: the candidate words, and which
        # tokens start a new word or are punctuation (`whole_words`' test, over the same ids: a
        # causal LM's output vocabulary is its input embeddings' rows).
        word_starts = []
        for i, token in enumerate(vocab):
            text = tokenizer.convert_tokens_to_string([token]) if token else ""
            word_starts.append(bool(text) and not text[0].isalnum())
            if not text.startswith(" "):
                continue
            word = text[1:]
            # Title case only: acronyms ("IVF", "PFAS") and joined identifiers ("InstancePreprocess")
            # sit near anything rare in embedding space and are hardly ever a same-kind entity.
            if len(word) >= MIN_LETTERS and word.isalpha() and word[0].isupper() and word[1:].islower():
                self.words[i] = word
        self.ids = torch.tensor(sorted(self.words))
        self.word_starts = torch.tensor(word_starts, device=self.unit.device)
        self.exclude = {w.lower() for w in exclude_words}
        self._alone: dict[str, float] = {}

    def _excluded(self, word: str) -> bool:
        w = word.lower()
        return w in self.exclude or any(near_duplicate(w, x) for x in self.exclude)

    def candidates(self, subject: str, k: int = POOL) -> list[str]:
        """Up to K whole words nearest to SUBJECT's last word, nearest first (2K nearest are tested)."""
        import torch

        head = subject.split()[-1]
        ids = self.tokenizer(" " + head, add_special_tokens=False)["input_ids"]
        if not ids or not len(self.ids):
            return []
        query = self.unit[ids].mean(0)
        similarity = self.unit[self.ids] @ (query / query.norm().clamp_min(1e-12))
        nearest = []
        for j in torch.argsort(similarity, descending=True).tolist():
            word = self.words[int(self.ids[j])]
            if not self._excluded(word):
                nearest.append(word)
                if len(nearest) == 2 * k:
                    break
        return [w for w, whole in zip(nearest, self.whole_words(nearest)) if whole][:k]

    def plausible_many(self, items: list[tuple[str, str, list[str]]]) -> list[list[str]]:
        """For each (prompt, subject, candidates) item: the candidates that read as naturally in the
        prompt as the subject does, most natural first.

        Naturalness is the pointwise mutual information of a word with the prompt around it:
        log p(prompt with the word) − log p(the word alone), both after SCORE_PREFIX, under
        the model. A candidate is kept when its PMI is at least the subject's own minus
        PMI_MARGIN nats: "Who wrote Hamlet?" reads like "Who wrote Romeo and Juliet?",
        "Who wrote Knee?" does not.

        Every item's texts are scored in one `_logprobs` call. Ranked one row at a time, the README
        run's rows made 18 calls of ~10 short texts (1714 tokens in all), each thread's batch ~5
        texts that read all the weights for ~50 tokens: 8.3 s. Pooled, the texts fill batches.
        """
        texts, spans = [], []
        for prompt, subject, candidates in items:
            start = len(texts)
            if candidates:
                texts += [SCORE_PREFIX + t for t in [prompt] + [prompt.replace(subject, c) for c in candidates]]
            spans.append((start, len(texts)))
        # a word's score alone is the same in every prompt: scored once
        words = list(dict.fromkeys(w for _, subject, candidates in items if candidates
                                   for w in [subject] + candidates if w not in self._alone))
        scored = self._logprobs(texts + [SCORE_PREFIX + w for w in words]) if texts else []
        self._alone.update(zip(words, scored[len(texts):]))
        ranked = []
        for (prompt, subject, candidates), (lo, hi) in zip(items, spans):
            if not candidates:
                ranked.append([])
                continue
            alone = [self._alone[w] for w in [subject] + candidates]
            pmi = [t - a for t, a in zip(scored[lo:hi], alone)]
            threshold = pmi[0] - PMI_MARGIN
            order = sorted(range(len(candidates)), key=lambda i: -pmi[i + 1])
            ranked.append([candidates[i] for i in order if pmi[i + 1] >= threshold])
        return ranked

    def _logprobs(self, texts: list[str]) -> list[float]:
        """log p(text) of each text's tokens after its first, under the model: the texts sorted by length
        (little padding) into batches of at most TEXTS_PER_BATCH texts and TOKENS_PER_BATCH padded tokens
        (`token_batches`; a longer text alone), and on a CPU with T >= 2 torch threads
        and at least T batches, the batches dealt out to T pieces side by side, one torch thread each
        (cpu_parts.py: the same numbers to float rounding, and under load from other processes no
        barrier waiting on a thread set aside)."""
        from unlearn.cpu_parts import dealt_batches

        lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        batches = token_batches(lengths)
        # a piece's share is whole batches in turn: each found again by its first text
        sizes = {batch[0]: len(batch) for batch in batches}

        def work(share: list[int]) -> list[float]:  # a piece's batches, in turn
            values, at = [], 0
            while at < len(share):
                size = sizes[share[at]]
                values += self._batch_logprobs([texts[i] for i in share[at:at + size]])
                at += size
            return values

        return dealt_batches(self.model, batches, work)

    def _batch_logprobs(self, texts: list[str]) -> list[float]:
        """`_logprobs` of TEXTS in one padded batch."""
        import torch

        ids, mask = self._padded([self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        sums = []
        # log p(token) = z_token - logsumexp(z), one text at a time: no vocabulary-wide log-softmax, nor a
        # float32 copy or logsumexp temporary of the whole batch's logits, beside the logits themselves
        for z, targets, weights in zip(logits, ids[:, 1:], mask[:, 1:]):
            z = z[:-1].float()
            picked = z.gather(-1, targets[:, None])[:, 0] - z.logsumexp(-1)
            sums.append((picked * weights).sum().item())
        return sums

    def whole_words(self, words: list[str]) -> list[bool]:
        """Per word: the model reads it as a whole word, i.e. after "The word WORD" it gives at least
        WHOLE_WORD_P to a next token that starts a new word or is punctuation. One batched forward."""
        import torch

        if not words:
            return []
        encoded = [self.tokenizer("The word " + w, add_special_tokens=False)["input_ids"] for w in words]
        ids, mask = self._padded(encoded)
        last = torch.tensor([len(e) - 1 for e in encoded], device=ids.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(words)), last]
        p = logits.float().softmax(-1)
        return (p[:, self.word_starts].sum(-1) >= WHOLE_WORD_P).tolist()

    def _padded(self, encoded: list[list[int]]):
        import torch

        width = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in encoded], device=self.unit.device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded], device=self.unit.device)
        return ids, mask


def token_batches(lengths: list[int]) -> list[list[int]]:
    """The indices of texts of LENGTHS (tokens) in batches for `Neighbourhood._logprobs`: sorted by length
    (stable), each batch at most TEXTS_PER_BATCH texts whose count times the longest is at most
    TOKENS_PER_BATCH (a longer text alone), so that a batch's logits stay within that many vocabulary rows
    however long the forget prompts are."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        last = batches[-1] if batches else None
        # sorted: text i is the longest of the batch it joins
        if last and len(last) < TEXTS_PER_BATCH and (len(last) + 1) * lengths[i] <= TOKENS_PER_BATCH:
            last.append(i)
        else:
            batches.append([i])
    return batches


def build(model, tokenizer, forget: list, limit: int = DEFAULT_LIMIT, with_anchors: bool = False) -> list[Probe]:
    """The probe prompts (not yet answered): at most PER_ROW of each kind per forget row, LIMIT of each kind;
    WITH_ANCHORS (a run that trains on its probes), then the general-knowledge anchors (anchors.questions).

    Rows take turns (the first probe of every row, then the second...), so a small LIMIT
    still spreads over the forget rows; rows about one subject start at different places in
    its list of replacements; prompts equal to a forget prompt, or made twice, are skipped.
    A row's replacements are ranked in its own prompt (`Neighbourhood.plausible_many`), and only
    for rows whose turn comes before LIMIT is reached: that ranking is the model's time.
    """
    subjects = [probe_subject(ex) for ex in forget]
    rows, offsets = [], {}
    for ex, subject in zip(forget, subjects):
        if subject is not None:
            rows.append((ex, subject, offsets.get(subject, 0)))
            offsets[subject] = offsets.get(subject, 0) + PER_ROW
    # A long chat response names no one: its same-subject probes ask about the things it is about.
    topics = [(ex, topic_questions(str(ex.prompt))) for ex, subject in zip(forget, subjects)
              if subject is None and not ex.is_passage and is_long_response(ex)]
    exclude = set()
    for ex, subject in zip(forget, subjects):
        exclude.update(_letters(subject or ""))
        exclude.update(w for answer in row_answers(ex)[0] or () for w in _letters(answer))
    exclude -= {"the", "of", "and", "a", "an"}
    seen = {prompt_key(ex.prompt) for ex in forget}

    def add(probe: Probe, taken: list) -> None:
        key = prompt_key(probe.prompt)
        if key not in seen:
            seen.add(key)
            taken.append(probe)

    hood = Neighbourhood(model, tokenizer, exclude) if rows else None
    candidates: dict[str, list[str]] = {}
    ranked: dict[int, list[str]] = {}
    neighbours: list[Probe] = []
    for turn in range(PER_ROW):
        for n, (ex, subject, offset) in enumerate(rows):
            if len(neighbours) >= limit:
                break
            if ex.is_passage:
                continue  # another subject in a passage's sentences is no question of the same kind
            if n not in ranked:
                # This row and the next ones a turn may still need (each gives at most one probe a
                # turn), ranked together: the rows one at a time would rank these same rows.
                ahead = [m for m, (other, _, _) in enumerate(rows) if m >= n and m not in ranked
                         and not other.is_passage][:max(1, limit - len(neighbours))]
                for m in ahead:
                    if rows[m][1] not in candidates:
                        candidates[rows[m][1]] = hood.candidates(rows[m][1])
                ranked.update(zip(ahead, hood.plausible_many([(str(rows[m][0].prompt), rows[m][1],
                                                                candidates[rows[m][1]]) for m in ahead])))
            pool = ranked[n]
            if turn < len(pool):
                replacement = pool[(offset + turn) % len(pool)]
                add(Probe(NEIGHBOURS, str(ex.prompt).replace(subject, replacement), ex.line, subject, replacement),
                    neighbours)
    same: list[Probe] = []
    for turn in range(PER_ROW):
        for ex, subject, offset in rows:
            if len(same) < limit:
                template = SAME_SUBJECT_TEMPLATES[(offset // PER_ROW + turn) % len(SAME_SUBJECT_TEMPLATES)]
                add(Probe(SAME_SUBJECT, template.format(subject=subject), ex.line, subject), same)
        for ex, questions in topics:
            if len(same) < limit and turn < len(questions):
                phrase, question = questions[turn]
                add(Probe(SAME_SUBJECT, question, ex.line, phrase, topic=True), same)
    held = [Probe(ANCHORS, q, 0, "") for q in anchors.questions(forget, subjects, seen)] if with_anchors else []
    return neighbours + same + held


def first_clause(text: str) -> str:
    """TEXT up to its first clause break: a sentence end ("." "!" "?" before a space or the end, not
    after a lone capital as in "J.K." nor after an abbreviation followed by a capital or a digit, as in
    "St. Olaf" or "No. 5"), a comma (not one between digits, as in "10,500,000"), semicolon, colon or
    line break.

    A free answer runs on past what was asked ("Kenya is a landlocked country in East Africa,
    known for its ..."); its first clause is the answer, short enough for `spans` to name
    its words (measured: with whole answers almost every same-subject probe had none). A number's
    thousands comma or an abbreviation's period is not a break: cut there, the answer word was "10" of
    "10,500,000", which the answer matcher, reading the number whole, never finds in that same answer.
    """
    text = text.strip()
    match = next((m for m in _CLAUSE_MARK.finditer(text) if _breaks_clause(text, m.start(), m.group())), None)
    return text[:match.start() + (match.group() in ".!?")].strip() if match else text


_CLAUSE_MARK = re.compile(r"(?<!\b[A-Z])[.!?](?=\s|$)|[,;:\n]")


def _breaks_clause(text: str, at: int, mark: str) -> bool:
    """Whether MARK at AT in TEXT ends a clause (first_clause): not a comma between digits, nor the period
    of an abbreviation (spans.ABBREVIATIONS) that a capital or a digit follows."""
    if mark == ",":
        return not (text[at - 1:at].isdigit() and text[at + 1:at + 2].isdigit())
    if mark == ".":
        word = re.search(r"(\w+)$", text[:at])
        return not (word and word.group(1).lower() in ABBREVIATIONS and re.match(r"\s+[A-Z0-9]", text[at + 1:]))
    return True


def holds_forget(record: dict) -> bool:
    """Whether a probe's record (`keep_answered`) was dropped because its original answer holds a forget
    answer (`forget_held`): it asks the same fact, so it is expected to change and is neither trained on
    nor preserved."""
    return record.get("dropped", "").startswith(HOLDS_FORGET)


def names_something(answer: str) -> bool:
    """Whether ANSWER has a word that is not a connector, function word or article (_FUNCTION_WORDS): "de"
    names nothing, and any answer in its language holds it, so it would count a probe kept whatever it says."""
    return any(t.text not in _FUNCTION_WORDS for t in metrics.answer_tokens(answer))


def forget_held(probe: Probe, output: str, forget_answers: list[list[str]], unanswered: list) -> str | None:
    """Why the original's OUTPUT for PROBE holds what the forget rows ask to forget (the reason after
    HOLDS_FORGET), or None. FORGET_ANSWERS: the answers of the forget rows that have some (given or derived,
    `spans.row_answers`); UNANSWERED: the forget rows without, judged as the forget set judges them.

    - a forget answer, by `metrics.contains_answer` (the forget set's leak rule for rows with answers);
    - a forget row without answers (a long response, a passage) that OUTPUT leaks by the leak rule for
      such rows (`evaluate.leak_flags`: ROUGE-L recall, BLEU, a passage's verbatim run), whichever row the
      probe was made from: without this the guard never applied to such rows. The rule reads the whole
      response, where the forget set's own measurement reads it cut to the answer budget
      (`Measurer.references`). Cut to 32 or 48 tokens, it would change the probes of one committed forget
      set of thirteen (session 46: `misuse`), dropping two topic probes ("How do I find out more about the
      parent's signature?") whose answers share only the opening frame "To ... you can use the following
      methods: 1." with a forget response, not its instructions: false alarms, so the whole response it is;
    - for a neighbour, the forget subject it replaced, whole (as the answer matcher finds it), or its last
      word written as a name (capitalised, case for case) and not as the end of the replacement's own name
      ("Who was Edison?" answered "Albert Einstein was ..." or "Einstein was ..."; not "the largest city"
      for New York City, nor "The Nile River" for Amazon River): an answer about the forget subject itself,
      which forgetting it is expected to change, not a neighbour's fact. A last word of fewer than
      MIN_LETTERS letters ("II" of "World War II") names nothing alone.
    """
    if any(metrics.contains_answer(output, answers) for answers in forget_answers):
        return "expected to change"
    leaked = [ex for ex, flag in zip(unanswered, leak_flags([output] * len(unanswered), unanswered)) if flag]
    if leaked:
        return f"it leaks forget line {leaked[0].line} (evaluate.leak_flags): expected to change"
    if probe.kind == NEIGHBOURS:
        last = probe.subject.split()[-1]
        rest = output.replace(f"{probe.replacement} {last}", " ") if probe.replacement else output
        if metrics.contains_answer(output, [probe.subject]) or (
                last != probe.subject and sum(c.isalpha() for c in last) >= MIN_LETTERS
                and re.search(rf"(?<!\w){re.escape(last)}(?!\w)", rest)):
            return f"it names {probe.subject}, the forget subject this probe replaced: expected to change"
    return None


def _forget_judges(forget: list) -> tuple[list[list[str]], list]:
    """What `forget_held` judges an answer against: the answers of the FORGET rows that have some (given or
    derived), and the rows without, which the forget set judges by ROUGE-L/BLEU (leak_flags gives a row
    without a response None: no leak)."""
    derived = [row_answers(ex)[0] for ex in forget]
    return [a for a in derived if a], [ex for ex, a in zip(forget, derived) if not a and ex.response is not None]


def anchor_records(made: list[Probe], outputs: list[str], forget: list) -> list[dict]:
    """Each anchor's record for probes.jsonl: its question and the original's answer, which the retain KL
    holds, or why it is dropped (HOLDS_FORGET: `forget_held`, as for a probe). Anchors have no answer words:
    they are never measured."""
    forget_answers, unanswered = _forget_judges(forget)
    records = []
    for probe, output in zip(made, outputs):
        record = {"set": ANCHORS, "prompt": probe.prompt, "reference": output}
        held = forget_held(probe, output, forget_answers, unanswered)
        if held:
            record["dropped"] = f"{HOLDS_FORGET}: {held}"
        elif not output.strip():
            record["dropped"] = "the original answer is empty: nothing to hold"
        records.append(record)
    return records


def keep_answered(probes: list[Probe], outputs: list[str], forget: list) -> tuple[list[Example], list[dict]]:
    """The probes the original model's OUTPUTS make checkable, as retain rows with `answers`; and every
    probe's record (for probes.jsonl), kept or not and why (HOLDS_FORGET: `forget_held`)."""
    forget_answers, unanswered = _forget_judges(forget)
    kept, records = [], []
    for probe, output in zip(probes, outputs):
        connectors_only = False
        if probe.topic:
            answers = [w for w in head_words(probe.subject) if metrics.contains_answer(output, [w])] or None
        else:
            answers, _ = row_answers(Example(probe.prompt, first_clause(output), 0))
            # Only words the answer matcher finds in the very answer they came from: kept is 1 before, by construction.
            answers = [a for a in answers or () if metrics.contains_answer(output, [a])]
            # and words that name something: "de" (of "la monnaie de la Lion") stays in any French answer
            connectors_only = bool(answers) and not any(map(names_something, answers))
            answers = [a for a in answers if names_something(a)] or None
        held = forget_held(probe, output, forget_answers, unanswered)
        record = {"set": probe.kind, "prompt": probe.prompt, "reference": output, "answers": answers,
                  "forget_line": probe.line, "subject": probe.subject}
        if probe.replacement:
            record["replacement"] = probe.replacement
        if probe.topic:
            record["refusal_markers"] = list(metrics.REFUSAL_MARKERS)
        if held:
            record["dropped"] = f"{HOLDS_FORGET}: {held}"
        elif probe.topic and metrics.contains_refusal(output, metrics.REFUSAL_MARKERS):
            record["dropped"] = "the original answer refuses (metrics.REFUSAL_MARKERS): nothing to keep"
        elif connectors_only:
            record["dropped"] = ("the original answer's only answer words are connectors or function words "
                                 "(spans.CONNECTORS): nothing to check")
        elif not answers:
            record["dropped"] = ("the original answer does not name the thing asked about (topic_probes.head_words)"
                                 if probe.topic else "the original answer has no answer words to check (spans.py)")
        else:
            example = probe.example(len(kept) + 1)
            example.response = output
            example.extra["answers"] = answers
            if probe.topic:
                example.extra["refusal_markers"] = list(metrics.REFUSAL_MARKERS)
            kept.append(example)
        records.append(record)
    return kept, records
