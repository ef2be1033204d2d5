"""The subject of a fact: which prompt tokens name it, given, guessed or traced.

An edit keys on the residual stream at the subject's last token (ROME/MEMIT:
that is where the MLPs of early-middle layers recall facts about it). Three
sources, in order of preference:

- `given`: the row's `subject` field; it must occur in the prompt.
- `heuristic`: the longest run of capitalised words (small joining words such
  as "of", "and", "da" allowed inside), the prompt's first word excluded when it
  is an opening question word or imperative or makes a run alone, a trailing "'s" dropped,
  a run of fewer than MIN_LETTERS letters ("1969", "I") passed over (`named_subject`, the probes' rule too).
  "Who wrote Romeo and Juliet?" -> "Romeo and Juliet". Free, and wrong on
  lower-case subjects ("photosynthesis") and prompts with several names.
- `trace`: causal tracing (Meng et al. 2022), reduced to what locating needs:
  the embeddings of one contiguous word span are corrupted with Gaussian noise
  (3x the embedding matrix's standard deviation, a few samples), and the span
  whose corruption lowers the answer's mean log-probability most is the
  subject; spans that start or end with a function word ("of", "the", "who")
  are not candidates. A longer span always hurts at least as much as a shorter one inside
  it, so the shortest span within `TRACE_KEEP` of the best drop wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from unlearn.data import (Passage, answer_token_mask, has_chat_template, render_prompt, render_response,
                          response_encoding, with_offsets)
from unlearn.errors import UnlearnError

JOINERS = {"of", "and", "the", "de", "da", "del", "di", "von", "van", "la", "le", "du", "on", "in", "for", "&"}
QUESTION_WORDS = {"what", "who", "whom", "whose", "which", "where", "when", "why", "how", "is", "are", "was",
                  "were", "do", "does", "did", "can", "could", "name", "tell", "in", "on", "please", "give"}
# Imperatives a prompt opens with: capitalised as its first word only, so never part of a name ("Describe
# Tokyo." names Tokyo, not "Describe Tokyo", which made probes ask "What is Describe Tokyo known for?").
OPENING_VERBS = {"explain", "describe", "summarize", "summarise", "translate", "write", "list", "define", "compare",
                 "identify", "state", "provide", "find", "recall", "share", "mention", "say", "complete", "continue",
                 "discuss", "outline", "introduce", "imagine", "draft", "analyze", "analyse", "evaluate", "rate",
                 "suggest", "show", "teach", "help", "make", "create", "generate", "recommend", "rewrite", "answer"}
FUNCTION_WORDS = JOINERS | QUESTION_WORDS | {"a", "an", "be", "by", "to", "at", "from", "with", "about", "does",
                                             "me", "you", "your", "it", "its", "this", "that", "there"}
MIN_LETTERS = 3  # a subject's letters at least (`named_subject`): "1969", "I" and "II" name nothing alone
TRACE_KEEP = 0.8  # shortest span whose drop is at least this share of the largest drop
TRACE_NOISE = 3.0  # noise std in units of the embedding matrix's std (ROME's choice)
# A combining accent (U+0300-U+036F) belongs to its word: decomposed text (NFD, as macOS writes it) spells
# "Zürich" as "Zu" + U+0308 + "rich", and \w alone cut the subject at the accent ("Zu").
_WORD_RE = re.compile(r"[\w\u0300-\u036f'’.-]*[\w\u0300-\u036f]|\w")


@dataclass
class Located:
    prompt: str
    subject: str
    source: str  # "given", "heuristic" or "trace"
    trace_drop: float | None = None  # mean log-prob drop of the answer when the subject is corrupted


def words(text: str) -> list[tuple[int, int]]:
    """Character spans of the words of TEXT (letters, digits, inner apostrophes, dots and hyphens)."""
    return [m.span() for m in _WORD_RE.finditer(text)]


def heuristic_subject(prompt: str) -> str | None:
    """The longest run of capitalised words (joiners allowed inside), or None.

    The prompt's first word is a sentence start: an opening question word or imperative
    (QUESTION_WORDS, OPENING_VERBS) is never part of a run, and a run that is only the first word is
    no name ("Explain photosynthesis.", "Paris is the capital of which country?": tracing decides).
    A trailing possessive is not part of the name ("Harry Potter's friend" -> "Harry Potter"): the
    key is read at the name's last token, and the probes and neighbours ask about the name.
    """
    spans = words(prompt)
    best: tuple[int, int] | None = None
    run: list[tuple[int, int]] = []

    def close():
        nonlocal best
        while run and prompt[run[-1][0]:run[-1][1]].lower() in JOINERS:
            run.pop()  # a run never ends on a joiner
        if run == spans[:1]:
            run.clear()  # only the sentence's first word
        if run and (best is None or run[-1][1] - run[0][0] >= best[1] - best[0]):
            best = (run[0][0], run[-1][1])
        run.clear()

    for index, (a, b) in enumerate(spans):
        word = prompt[a:b]
        capitalised = word[0].isupper() or word[0].isdigit()
        if index == 0 and word.lower() in QUESTION_WORDS | OPENING_VERBS:
            capitalised = False
        if capitalised:
            run.append((a, b))
        elif run and word.lower() in JOINERS:
            run.append((a, b))
        else:
            close()
    close()
    return re.sub(r"['’]s$", "", prompt[best[0]:best[1]]) if best else None


def named_subject(prompt: str) -> str | None:
    """`heuristic_subject`'s run, if it names something: one of MIN_LETTERS letters or more outside its joiners.

    The longest run wins, the later on a tie, so "What did NASA launch in 1969?" gave "1969", "How do I hotwire a
    car?" "I". Such a run ("1969", "I", "1945 and 1946") is blanked out (same length, lower case: no run) and the
    choice made again, which then falls on the name it tied or beat ("NASA"), or on none. The edit keys on this
    subject and the probes replace it (probes.probe_subject), so the neighbours the edit preserves are the probes'
    own prompts: with different rules it preserved "What did NASA launch in France?" (review 116)."""
    while (found := heuristic_subject(prompt)) is not None and _name_letters(found) < MIN_LETTERS:
        at = prompt.rindex(found)
        prompt = prompt[:at] + "x" * len(found) + prompt[at + len(found):]
    return found


def _name_letters(run: str) -> int:
    """The letters of a run of capitalised words outside its joiners: "1945 and 1946" has none."""
    return sum(c.isalpha() for w in run.split() if w.lower() not in JOINERS for c in w)


# --- token positions ------------------------------------------------------------


def encode_with_offsets(tokenizer, prompt: str) -> tuple[list[int], list[tuple[int, int]], int]:
    """Token ids of the rendered prompt (as `data.encode_prompt`), their character offsets in the
    rendered text, and where the raw prompt starts inside that text."""
    text = render_prompt(tokenizer, prompt)
    templated = has_chat_template(tokenizer) and not isinstance(prompt, Passage)
    encoded = with_offsets(tokenizer, text, add_special_tokens=not templated)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    if ids and ids[-1] == tokenizer.eos_token_id and len(ids) > 1 and not text.endswith(tokenizer.eos_token or "\0"):
        ids, offsets = ids[:-1], offsets[:-1]
    start = text.rfind(str(prompt))
    if start < 0:  # a chat template that trims the message (Llama 3, Gemma): the prompt's stripped text is there
        lead = len(str(prompt)) - len(str(prompt).lstrip())
        start = text.rfind(str(prompt).strip())
        if start < 0 or not str(prompt).strip():
            raise UnlearnError(f"the rendered prompt does not contain the prompt text: {prompt[:60]!r}")
        start -= lead  # character i of the prompt is character start + i of the text
    return ids, offsets, start


def span_tokens(offsets: list[tuple[int, int]], char_start: int, char_end: int) -> list[int]:
    """Indices of the tokens that overlap [char_start, char_end) (special tokens have empty offsets)."""
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < char_end and char_start < b]


def find_subject(prompt: str, subject: str, after: int = 0) -> int:
    """Where SUBJECT occurs in PROMPT from character AFTER on (-1: nowhere): its first whole-word
    occurrence, else its first one ("Paris" in "What do Parisians call Paris?" is the last word)."""
    whole = re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", str(prompt)[after:])
    return after + whole.start() if whole else str(prompt).find(subject, after)


def subject_last_token(tokenizer, prompt: str, subject: str, after: int = 0) -> tuple[list[int], int]:
    """Token ids of the rendered PROMPT and the index of SUBJECT's last token (find_subject from character
    AFTER on: a wording's prefix, "Quick question: ", must not hold the subject "question").

    A subject whose last token is the first of the sequence (raw text opening with a one-token
    subject, on a tokenizer that adds no BOS) gets the BOS (else EOS) token in front: every use of
    the key needs a position before it (the shift's scored positions, the keep rows' KL)."""
    found = find_subject(prompt, subject, after)
    if found < 0:
        raise UnlearnError(f"subject {subject!r} does not occur in the prompt {str(prompt)[:60]!r}")
    ids, offsets, start = encode_with_offsets(tokenizer, prompt)
    tokens = span_tokens(offsets, start + found, start + found + len(subject))
    if not tokens:
        raise UnlearnError(f"subject {subject!r}: no token of the prompt covers it")
    if tokens[-1] == 0:
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [first] + ids, 1
    return ids, tokens[-1]


# --- causal tracing -------------------------------------------------------------


def _answer_labels(tokenizer, prompt: str, response: str, answers, max_tokens: int = 16) -> tuple[list[int], list[bool]]:
    """Response token ids and which of them to score: the answer's tokens when `answers` occur, else all.

    MAX_TOKENS tokens of the response, or through the answer's first occurrence where it ends later: cut at 16
    first, an answer after "Well, that is a question many ..." fell outside, and the span was chosen by how its
    corruption lowered that opening (review 116)."""
    text = render_response(tokenizer, prompt, response)
    ids, offsets = response_encoding(tokenizer, prompt, text, offsets=bool(answers))
    mask = answer_token_mask(tokenizer, text, answers, response=response, offsets=offsets) if answers else None
    if mask and any(mask):
        first = mask.index(True)
        end = next((i for i in range(first, len(mask)) if not mask[i]), len(mask))  # the first occurrence's end
        ids, mask = ids[:max(max_tokens, end)], mask[:max(max_tokens, end)]
        return ids, mask
    ids = ids[:max_tokens]
    return ids, [True] * len(ids)


@torch.no_grad()
def trace_subject(model, tokenizer, prompt: str, response: str, answers=None, *, max_words: int = 4,
                  samples: int = 4, seed: int = 0) -> tuple[str, float]:
    """The word span whose corrupted embeddings lower the answer's log-probability most (see module doc)."""
    ids, offsets, start = encode_with_offsets(tokenizer, prompt)
    answer_ids, score_mask = _answer_labels(tokenizer, prompt, response, answers)
    spans = words(str(prompt))
    candidates = []
    text = str(prompt)
    for i in range(len(spans)):
        for j in range(i, min(len(spans), i + max_words)):
            if {text[slice(*spans[i])].lower(), text[slice(*spans[j])].lower()} & FUNCTION_WORDS:
                continue  # a name neither starts nor ends with "of", "the", "is", "who" ...
            tokens = span_tokens(offsets, start + spans[i][0], start + spans[j][1])
            if tokens:
                candidates.append(((spans[i][0], spans[j][1]), j - i + 1, tokens))
    if not candidates:
        raise UnlearnError(f"no word to trace in the prompt {str(prompt)[:60]!r}")
    embed = model.get_input_embeddings()
    full = torch.tensor([ids + answer_ids])
    base_embeds = embed(full)[0]
    noise_scale = TRACE_NOISE * embed.weight.float().std().item()
    generator = torch.Generator().manual_seed(seed)
    n_prompt = len(ids)
    target = full[0, n_prompt:]
    weights = torch.tensor(score_mask, dtype=torch.float32)

    def mean_logprob(batch_embeds: torch.Tensor) -> torch.Tensor:
        logits = model(inputs_embeds=batch_embeds).logits[:, n_prompt - 1:-1].float()
        logprobs = logits.log_softmax(-1).gather(-1, target.expand(len(batch_embeds), -1).unsqueeze(-1))[..., 0]
        return (logprobs * weights).sum(-1) / weights.sum()

    clean = mean_logprob(base_embeds.unsqueeze(0))[0].item()
    drops = []
    for chunk_start in range(0, len(candidates), 8):
        chunk = candidates[chunk_start:chunk_start + 8]
        batch = base_embeds.unsqueeze(0).repeat(len(chunk) * samples, 1, 1)
        for c, (_, _, tokens) in enumerate(chunk):
            noise = torch.randn((samples, len(tokens), batch.shape[-1]), generator=generator) * noise_scale
            batch[c * samples:(c + 1) * samples, tokens] += noise.to(batch.dtype)
        scores = mean_logprob(batch).view(len(chunk), samples).mean(-1)
        drops.extend((clean - scores).tolist())
    chosen = choose_span([c[1] for c in candidates], drops)
    (a, b), _, _ = candidates[chosen]
    return str(prompt)[a:b], drops[chosen]


def choose_span(lengths: list[int], drops: list[float]) -> int:
    """Index of the shortest span (in words) whose drop is at least TRACE_KEEP of the largest; ties: larger drop."""
    best = max(drops)
    threshold = TRACE_KEEP * best if best > 0 else best
    return min((n, -d, k) for k, (n, d) in enumerate(zip(lengths, drops)) if d >= threshold)[2]


def locate_subject(model, tokenizer, example, how: str = "auto", seed: int = 0) -> Located:
    """The subject of one forget row: its `subject` field, else by HOW ("auto" = heuristic, then trace)."""
    given = example.extra.get("subject")
    if given is not None:
        if not isinstance(given, str) or given not in str(example.prompt):
            # Only FORGET's rows come here (edit.py), which the edit reads without their file's name.
            raise UnlearnError(f"FORGET line {example.line}: 'subject' must be a string that occurs in the prompt, "
                               f"got {given!r}")
        return Located(example.prompt, given, "given")
    if how in ("auto", "heuristic"):
        guess = named_subject(str(example.prompt))
        if guess is not None or how == "heuristic":
            if guess is None:
                raise UnlearnError(f"FORGET line {example.line}: no capitalised subject of {MIN_LETTERS} letters or "
                                   f"more in the prompt; give a 'subject' field or trace it")
            return Located(example.prompt, guess, "heuristic")
    subject, drop = trace_subject(model, tokenizer, example.prompt, example.response,
                                  example.extra.get("answers"), seed=seed)
    return Located(example.prompt, subject, "trace", drop)
