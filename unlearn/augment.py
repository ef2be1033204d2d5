"""ULMR's data step: rewritten instructions and negative responses (`unlearn augment`).

For every forget row (x, y) the paper (ULMR, sec. 3.1) asks a model, with its two
prompts quoted below word for word, to
  1. rewrite x, twice, into x' ~ p(. | REWRITE_PROMPT(x))   (sampled, so the two differ);
  2. write a negative response y' ~ p(. | NEGATIVE_PROMPT(x')) for x and for each x':
     a refusal, or "this is not in my knowledge base".
Fine-tuning on the (x', y') pairs then teaches the model to decline the question in
any wording, not just the one in the forget file.

A small model (the embedded 135M one) often returns something unusable, so every
generated text is checked (`rewrite_problem`, `response_problem`): rejected rewrites
are replaced by another sampled candidate (we draw OVERSAMPLE candidates per rewrite
wanted) and then, if none is usable, by a templated rewording; rejected responses by
a templated refusal. So every source row gets exactly REWRITES rewrites, and --rewrites
above MAX_REWRITES is refused before any model loads (`check_request`). Every replacement
is counted in `AugmentStats`, and each row says where its prompt and response came from
(`prompt_from`, `response_from`), its source prompt and line (`source_prompt`,
`source_line`) and its `kind` (original / rewrite).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

from unlearn.errors import UnlearnError, UsageError
from unlearn.metrics import contains_answer, leaks

# The paper's prompts (ULMR, Tables 1 and 2), verbatim.
REWRITE_PROMPT = ('Please rewrite the provided instruction to ensure that the given answer can still satisfy the '
                  'requirement of your revised instruction. Instruction:"{instruction}" Rewrite Instruction:')
NEGATIVE_PROMPT = ('Please generate a response based on the Instruction indicating that you are unable to answer '
                   'the question or that the relevant content is not available in your knowledge base. '
                   'Instruction:"{instruction}"')

# Used where generation gave nothing usable (counted, and marked "template" on the row).
TEMPLATE_REFUSALS = (
    "I'm sorry, but I don't have any information about that.",
    "I can't answer that; it is not in my knowledge base.",
    "I'm afraid I don't know the answer to that question.",
    "Sorry, that is not something I have information on.",
)
TEMPLATE_REWRITES = (
    "Can you tell me this: {instruction}",
    "I have a question. {instruction}",
    "Please answer the following. {instruction}",
    "Quick question: {instruction}",
)

# The most rewrites per prompt we can promise. Every rewrite the model fails to write falls back to
# a distinct templated rewording, and a 135M model often writes none usable (3 of 56 on examples/),
# so only as many rewrites as there are templates can be delivered. A user asking for more wants that
# many rows, not fewer written silently, nor the same templated prompt twice (a duplicate row teaches
# nothing new and inflates the counts): refused up front, before the model loads.
MAX_REWRITES = len(TEMPLATE_REWRITES)

# Sampled rewrite candidates per rewrite wanted: a 135M model's rewrites fail the checks
# about half the time, and a second candidate costs one more row in the same batch.
OVERSAMPLE = 2
REWRITE_TOKENS = 48
# Rewrites are sampled from the 50 likeliest tokens within top-p 0.95: what every ULMR figure was measured with
# (transformers' default top-k, once taken silently; `generate` now cuts nothing unless asked).
REWRITE_TOP_K = 50
RESPONSE_TOKENS = 64

# How an instruction starts: a question word, an auxiliary verb, or an imperative.
INSTRUCTION_OPENERS = frozenset("""
what who whom whose which when where why how is are was were am do does did can could would should will
shall may might has have had name tell give list describe explain identify provide state write mention say
please define find summarize summarise complete continue recall share in according for from by if
""".split())
# How chatter, not an instruction, starts ("Sure, here is...", "I think...").
CHATTER_OPENERS = ("sure", "here", "certainly", "of course", "i ", "i'm", "i am", "as an", "the answer", "answer",
                   "rewrite", "instruction", "okay", "ok,", "yes", "no,")
# Words of the rewrite request itself: a "rewrite" that uses them is about the task, not the topic.
META_WORDS = re.compile(r"\b(?:rewrit\w*|instructions?|revised)\b", re.IGNORECASE)
# Long words that say nothing of a question's topic (for the "off topic" check).
FUNCTION_WORDS = frozenset("""
what which where when whom whose with about from that this these those there their them they have been
were does would could should will your yours into onto than then tell give name please know
""".split())
# A label the model sometimes repeats before its rewrite.
LABEL = re.compile(r"^\s*(?:(?:rewrit\w*|revised|new)\s+(?:instruction|question)s?|instruction|question)\s*:\s*",
                   re.IGNORECASE)


@dataclass
class AugmentStats:
    """What augmentation produced and how often it had to fall back, for the log and the record."""

    sources: int = 0
    rows: int = 0
    rewrites_wanted: int = 0
    rewrite_candidates: int = 0
    rewrites_rejected: dict = field(default_factory=dict)  # reason -> candidates rejected for it
    rewrite_fallbacks: int = 0  # rewrites that had to be templated
    responses_rejected: dict = field(default_factory=dict)
    response_fallbacks: int = 0  # negative responses that had to be templated

    def reject(self, table: dict, reason: str) -> None:
        table[reason] = table.get(reason, 0) + 1

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.rows} rows from {self.sources} forget rows; rewrites: {self.rewrite_fallbacks} of "
                f"{self.rewrites_wanted} templated after {self.rewrite_candidates} candidates; negative responses: "
                f"{self.response_fallbacks} of {self.rows} templated")


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def clean_rewrite(text: str) -> str:
    """The first line of a generated rewrite, without a repeated label or surrounding quotes."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = LABEL.sub("", lines[0]) if lines else ""
    return first.strip().strip('"“”\'').strip()


def _content_words(text: str) -> set[str]:
    """Words of four letters or more, minus the commonest function words: what a question is about."""
    return {w for w in _normalise(text).split() if len(w) >= 4 and w not in FUNCTION_WORDS}


def _leaks_source(text: str, source) -> bool:
    """TEXT gives away the forget row's answer: one of its answers (given or derived, `spans.row_answers`),
    or, when it has none, its response (`metrics.leaks`)."""
    from unlearn.spans import row_answers

    answers, _ = row_answers(source)
    if answers:
        return contains_answer(text, answers)
    return leaks(text, source.response or "", None)


def rewrite_problem(rewrite: str, source, seen: set[str]) -> str | None:
    """Why a cleaned rewrite of SOURCE's prompt is unusable, or None when it is fine.

    empty; same as the original (or as a rewrite already kept); gives the answer
    away; not an instruction: fewer than 3 words, more than 3x the original's words
    plus 20, chatter ("Sure, here is ..."), or neither a question mark nor an
    instruction opener (question word, auxiliary, imperative) at its start; talks
    about the rewriting (the request's own words: rewrite, instruction, revised);
    off topic (no content word of the original: "What is the weather like today?").
    """
    if not rewrite:
        return "empty"
    key = _normalise(rewrite)
    if key == _normalise(source.prompt):
        return "same as the original"
    if key in seen:
        return "duplicate"
    if _leaks_source(rewrite, source):
        return "contains the answer"
    words = rewrite.split()
    lowered = rewrite.lower()
    if len(words) < 3 or len(words) > 3 * len(source.prompt.split()) + 20:
        return "not an instruction"
    if lowered.startswith(CHATTER_OPENERS):
        return "not an instruction"
    if META_WORDS.search(rewrite) and not META_WORDS.search(source.prompt):
        return "talks about the rewriting"  # "Please rewrite the instruction to ..." asks nothing
    topic = _content_words(source.prompt)
    if topic and not topic & _content_words(rewrite):
        return "off topic"
    if not rewrite.rstrip().endswith("?") and words[0].lower().strip(",:;\"'") not in INSTRUCTION_OPENERS:
        return "not an instruction"
    return None


# A sentence end: . ! or ? with any closing quotes or brackets, then a space or the end of the text.
SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s|$)")
# A period after these does not end a sentence: they lead into a name, and a cut there keeps the lead-in
# and drops the name ("written by J.K." | "Rowling"), which the leak filter cannot see. Initials are
# single letters, each with its period ("J.", "J.K.", "U.S.", "e.g."); titles are the few below.
INITIALS = re.compile(r"(?:[A-Za-z]\.)+")
TITLES = frozenset("mr mrs ms mx dr prof rev st mt gen sen gov capt col lt sgt vs".split())


def _ends_sentence(text: str, end) -> bool:
    """The SENTENCE_END match END really ends a sentence: its period does not close initials or a title."""
    if "." not in end.group():
        return True
    word = text[:end.end()].split()[-1].lstrip("\"'“‘([").rstrip("\"'”’)]")
    return not (INITIALS.fullmatch(word) or word[:-1].lower() in TITLES)


def clean_response(text: str) -> str:
    """A generated response cut back to its last complete sentence (generation stops mid-sentence).

    Without a complete sentence it is returned whole, and `response_problem` rejects it as cut off.
    """
    text = " ".join(text.strip().split())
    ends = [m.end() for m in SENTENCE_END.finditer(text) if _ends_sentence(text, m)]
    return text[:ends[-1]] if ends else text


def _is_complete(text: str) -> bool:
    """TEXT ends at a sentence end (`SENTENCE_END`, not after initials or a title)."""
    return any(m.end() == len(text) and _ends_sentence(text, m) for m in SENTENCE_END.finditer(text))


def response_problem(response: str, instruction: str, source) -> str | None:
    """Why a negative response is unusable, or None: empty, too short, the instruction echoed, a leak, or cut off.

    Cut off: it does not end a sentence, so generation stopped inside it, possibly right before the
    answer ("... were written by J.K." for "Rowling"). The leak filter judges only what is written, and a
    refusal says all it has to say, so an unfinished response is not kept.
    """
    if not response:
        return "empty"
    if len(response.split()) < 3:
        return "too short"
    if _normalise(response) == _normalise(instruction):
        return "repeats the instruction"
    if _leaks_source(response, source):
        return "contains the answer"
    if not _is_complete(response):
        return "cut off mid-sentence"
    return None


def check_request(forget, rewrites: int, path=None) -> None:
    """Refuse what `augment` cannot do, before any model loads: REWRITES out of range, or a passage row.

    PATH, the forget file, names the bad line (`FILE:LINE: ...`).
    """
    if rewrites < 0:
        raise UsageError(f"--rewrites {rewrites}: must be 0 or more")
    if rewrites > MAX_REWRITES:
        raise UsageError(f"--rewrites {rewrites}: at most {MAX_REWRITES}, so that every prompt gets them all "
                         f"(a rewrite the model fails to write falls back to one of {MAX_REWRITES} templated "
                         f"rewordings)")
    for ex in forget:
        if ex.is_passage:
            where = f"{path}:{ex.line}" if path is not None else f"line {ex.line}"
            raise UnlearnError(f"{where}: a `text` passage has no instruction to rewrite; "
                             f"ULMR needs prompt/response rows (use --method ga for passages)")


def check_augmented(rows, path, forget, forget_path) -> list:
    """ROWS, read from PATH (`--augmented`), when ULMR may train on them, else one `FILE:LINE` refusal.

    ULMR raises the likelihood of each row's response, so a row is refused when that would teach what
    is to be forgotten: a `text` passage (its continuation), or a response that gives away a forget
    answer, judged as `augment` judges the rows it writes (`_leaks_source`: the row's own `answers`,
    which augment copies into each row, and those of every FORGET row, given or derived, or its
    response by ROUGE-L/BLEU when it has none). The forget file itself, given as --augmented, is the
    plainest case: every response is the answer."""
    for ex in rows:
        where = f"{path}:{ex.line}"
        if ex.is_passage:
            raise UnlearnError(f"{where}: a `text` passage; ULMR learns each row's response, and a passage's is "
                             f"its continuation (use --method ga for passages)")
        own = ex.extra.get("answers")
        if own and contains_answer(ex.response, own):
            raise UnlearnError(f"{where}: the response gives its own answer away; ULMR would teach it "
                             f"(its rows' responses must decline: `unlearn augment` writes such rows)")
        for source in forget:
            if _leaks_source(ex.response, source):
                raise UnlearnError(f"{where}: the response gives away the answer of {forget_path}:{source.line}; "
                                 f"ULMR would teach it (its rows' responses must decline)")
    return rows


def _requests(ex, rewrites: int) -> list[tuple[str, str, int]]:
    """What generation will be asked for forget row EX, as far as it is known before anything is generated:
    (what, prompt, new tokens) for the rewrite request around its prompt, and for the negative-response
    requests around its prompt and around each templated rewrite that may stand in for a rejected one."""
    asked = [("the negative-response request around this row's prompt",
              NEGATIVE_PROMPT.format(instruction=ex.prompt), RESPONSE_TOKENS)]
    if rewrites:
        asked.append(("the rewrite request around this row's prompt", REWRITE_PROMPT.format(instruction=ex.prompt),
                      REWRITE_TOKENS))
        asked += [("the negative-response request around a templated rewrite of this row's prompt",
                   NEGATIVE_PROMPT.format(instruction=t.format(instruction=ex.prompt)), RESPONSE_TOKENS)
                  for t in TEMPLATE_REWRITES]
    return asked


def check_fits(model, tokenizer, forget, rewrites: int, path=None, whose: str | None = None) -> None:
    """Refuse, before anything is generated, a FORGET row (read from PATH) whose requests (`_requests`) with
    their new tokens pass MODEL's context (`generation.context_limit`: a learned position table's size, OPT's,
    or far past a rotary model's declared context; a long request measured on an opening, `data.prompt_length`).
    `generate` would refuse the request itself, as "prompt 5 of 8 ('Please rewrite ...')": a text the user
    never wrote, in no file. Here the line names the row (FILE:LINE), the request, and by how much it is too long."""
    from unlearn.data import prompt_length
    from unlearn.generation import context_limit, context_words

    if model is None:  # no model: generation is scripted (tests)
        return
    limit = context_limit(model)
    over = []  # (row, prompt tokens, exact, new tokens, what) of the longest request of each row that does not fit
    for ex in forget:
        n, exact, budget, what = max(((*prompt_length(tokenizer, prompt, limit), budget, what)
                                      for what, prompt, budget in _requests(ex, rewrites)),
                                     key=lambda r: r[0] + r[2])
        if n + budget > limit:
            over.append((ex, n, exact, budget, what))
    if not over:
        return

    def where(ex) -> str:
        return f"{path}:{ex.line}" if path is not None else f"line {ex.line}"

    ex, n, exact, budget, what = over[0]
    excess, at_least = n + budget - limit, "" if exact else "at least "
    more = ""
    if len(over) > 1:
        shown = ", ".join(where(row[0]) for row in over[1:4]) + (", ..." if len(over) > 4 else "")
        more = f" ({len(over) - 1} more row{'s' if len(over) > 2 else ''} too: {shown})"
    raise UnlearnError(f"{where(ex)}: {what} is {at_least}{n} tokens; with its {budget} new tokens that is "
                       f"{at_least}{n + budget} positions, {at_least}{excess} past "
                       f"{context_words(model, limit, whose)}; shorten the prompt by {at_least or 'about '}{excess} "
                       f"tokens{more}")


def augment(model, tokenizer, forget, *, rewrites: int = 2, seed: int = 0, batch_size: int = 16,
            log=None, path=None, whose: str | None = None) -> tuple[list[dict], AugmentStats]:
    """ULMR's augmented set for the FORGET examples (read from PATH), generated with MODEL; rows as JSON-ready dicts.

    Per source row: the original prompt, then exactly REWRITES rewrites, each with a negative response.
    WHOSE names MODEL in a refusal of a row too long for it.
    """
    from unlearn.data import encode_prompt
    from unlearn.generation import generate, position_limit

    check_request(forget, rewrites, path)
    check_fits(model, tokenizer, forget, rewrites, path, whose)
    limit = position_limit(model) if model is not None else None
    rng = random.Random(seed)
    stats = AugmentStats(sources=len(forget), rewrites_wanted=rewrites * len(forget))

    # 1. Rewrites: OVERSAMPLE sampled candidates per rewrite wanted, all in one batched call.
    candidates_per_source = rewrites * OVERSAMPLE
    prompts = [REWRITE_PROMPT.format(instruction=ex.prompt) for ex in forget for _ in range(candidates_per_source)]
    generated = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=REWRITE_TOKENS,
                         do_sample=True, temperature=1.0, top_p=0.95, top_k=REWRITE_TOP_K, seed=seed,
                         desc=False if log is None else "augment: rewrites") if prompts else []
    stats.rewrite_candidates = len(generated)
    instructions: list[tuple[object, str, str, str]] = []  # (source, instruction, kind, prompt_from)
    for i, ex in enumerate(forget):
        instructions.append((ex, ex.prompt, "original", "original"))
        seen: set[str] = set()
        kept: list[str] = []
        for text in generated[i * candidates_per_source:(i + 1) * candidates_per_source]:
            if len(kept) == rewrites:
                break
            rewrite = clean_rewrite(text)
            problem = rewrite_problem(rewrite, ex, seen)
            if problem is None and limit is not None and len(encode_prompt(
                    tokenizer, NEGATIVE_PROMPT.format(instruction=rewrite))) + RESPONSE_TOKENS > limit:
                # its negative-response request would pass the context (`check_fits` vouches for the templates)
                problem = "too long for the model's context"
            if problem:
                stats.reject(stats.rewrites_rejected, problem)
                continue
            seen.add(_normalise(rewrite))
            kept.append(rewrite)
        instructions += [(ex, r, "rewrite", "model") for r in kept]
        # Templates a kept rewrite already equals would repeat it. Each kept rewrite rules out at most one,
        # so with rewrites <= MAX_REWRITES there are always enough left for the rewrites still missing.
        fresh = [t.format(instruction=ex.prompt) for t in TEMPLATE_REWRITES]
        fresh = [t for t in fresh if _normalise(t) not in seen]
        for template in rng.sample(fresh, k=rewrites - len(kept)):
            instructions.append((ex, template, "rewrite", "template"))
            stats.rewrite_fallbacks += 1

    # 2. Negative responses, greedy: one per instruction (originals and rewrites).
    prompts = [NEGATIVE_PROMPT.format(instruction=instruction) for _, instruction, _, _ in instructions]
    responses = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=RESPONSE_TOKENS,
                         desc=False if log is None else "augment: negative responses") if prompts else []
    rows = []
    for (source, instruction, kind, prompt_from), text in zip(instructions, responses):
        response = clean_response(text)
        problem = response_problem(response, instruction, source)
        response_from = "model"
        if problem:
            stats.reject(stats.responses_rejected, problem)
            response, response_from = rng.choice(TEMPLATE_REFUSALS), "template"
            stats.response_fallbacks += 1
        row = {"prompt": instruction, "response": response, "kind": kind, "source_prompt": source.prompt,
               "source_line": source.line, "prompt_from": prompt_from, "response_from": response_from}
        if source.extra.get("answers"):
            row["answers"] = source.extra["answers"]  # what must not come back (for eval of this file)
        rows.append(row)
    stats.rows = len(rows)
    return rows, stats


def augment_file(opts, log=None) -> tuple[dict, AugmentStats]:
    """`unlearn augment` (`config.AugmentOptions`): read FORGET, augment it, write OUTPUT; the record and statistics."""
    import os
    import time

    from unlearn import models
    from unlearn.data import check_answers_spelled, read_examples
    from unlearn.outputs import check_writable, refuse_output_over_inputs, write_jsonl
    from unlearn.paths import model_input

    opts.validate()
    examples = read_examples(opts.forget)
    check_request(examples, opts.rewrites, opts.forget)  # before the model loads: a bad request costs no load
    # as `run` checks them: the filter of rows that give the answer away reads them (a forget file run refuses
    # after the augmentation's minutes was taken here, and filtered against a word its rows never say)
    check_answers_spelled(examples, opts.forget)
    check_writable(opts.output, force=opts.force)
    refuse_output_over_inputs(opts.output, [opts.forget, model_input(opts.generator or opts.model)],
                              inside_too=True)  # --force or not
    started = time.perf_counter()
    loaded = models.load_model(opts.generator or opts.model, dtype=opts.dtype,
                               trust_remote_code=opts.trust_remote_code, allow_pickle=opts.allow_pickle, log=log)
    rows, stats = augment(loaded.model, loaded.tokenizer, examples, rewrites=opts.rewrites, seed=opts.seed,
                          batch_size=opts.batch_size, log=log, path=opts.forget, whose=loaded.name)
    write_jsonl(opts.output, rows, replace=opts.force)
    return {"output": os.path.abspath(opts.output), "generator": loaded.name, **stats.as_dict(),
            "seconds": round(time.perf_counter() - started, 1)}, stats
