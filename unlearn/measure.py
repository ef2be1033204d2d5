"""The one way a model is measured: answer each evaluation set's prompts, then score the answers.

Every number `unlearn` prints about a model goes through `Measurer.measure`: the
run's "before" and "after" tables, the stop rule's check, the α grid of
`--alpha auto` and of `unlearn merge --alpha A,B,...`, and `unlearn eval`. What
differs between them is only the settings (budget, which scores) and the sets.

An evaluation set (`EvalSet`) is a named list of rows of one kind:

    "forget"  its rows' own responses (or `answers`) must not come out: leak and
              harmful are judged against the row's reference, cut to the budget;
    "retain"  what must survive: accuracy on `answers`, similarity to the original
              model's answers; its leak and harmful rates are judged against every
              forget row (forget content surfacing in answers to other prompts).

The metrics themselves are defined in `evaluate.evaluate_outputs` and `metrics`.

Under torchrun (DDP) every rank measures the same sets, but generates the answers, and
scores the likelihoods, of its share of the batches only (`distributed.sharded`); the
values are gathered on every rank before anything is scored, so every rank computes the
same figures, those of one process. `generation_batches` and `scoring_batches` say which
batches one process forms (they must: a greedy answer can depend on its batch).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from unlearn import data, distributed, metrics
from unlearn.errors import UnlearnError
from unlearn.evaluate import Scorer
from unlearn.metrics import MIN_K_PERCENT

KINDS = ("forget", "retain")


@dataclass
class EvalSet:
    name: str
    kind: str  # one of KINDS
    examples: list
    path: Path | None = None
    role: str = "held out"  # "held out" (never trained on), "trained", or "trained, stop rule" (a stop condition)


def unique_name(stem: str, taken: set[str]) -> str:
    """STEM, primed until it differs from every name in TAKEN (which it joins)."""
    name = stem
    while name in taken:
        name += "'"
    taken.add(name)
    return name


def read_eval_sets(forget_paths=(), retain_paths=(), *, taken: set[str] | None = None,
                   limit: int | None = None, need_reference: bool = False) -> list[EvalSet]:
    """The --eval-forget / --eval-retain files as sets named by their file stems (made unique).

    NEED_REFERENCE: a forget row must have a response or `answers` to measure leaks against
    (α selection needs one per row); a file with no rows is refused then too.
    """
    from unlearn.data import read_examples

    taken = set() if taken is None else taken
    sets = []
    for kind, paths in (("forget", forget_paths), ("retain", retain_paths)):
        for path in paths:
            examples = read_examples(path, need_response=False)
            if need_reference:
                if not examples:
                    raise UnlearnError(f"{path}: no rows")
                for ex in examples:
                    if kind == "forget" and ex.response is None and not ex.extra.get("answers"):
                        raise UnlearnError(f"{path}:{ex.line}: a forget row needs a response or `answers` "
                                           f"to measure leaks against")
            sets.append(EvalSet(unique_name(Path(path).stem, taken), kind, examples[:limit], Path(path)))
    return sets


@dataclass
class Settings:
    """How answers are generated and which scores are computed."""

    max_new_tokens: int = 48
    batch_size: int = 16
    likelihood: bool = True  # scores that need forward passes (fluency perplexity, probability, MIA)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    min_k: float = MIN_K_PERCENT  # k% of the min-k probability attack (`unlearn eval --min-k`)
    members: list = field(default_factory=list)  # membership inference: rows that were trained on...
    holdout: list | None = None  # ...and rows that were not
    reward_model: object = None


@dataclass
class Measured:
    """One set's answers and scores."""

    summary: dict
    outputs: list
    rows: list


# Likelihood scoring computes logits over the whole vocabulary at every response position: a
# batch of 16 rows of 50 response tokens on a 49k vocabulary is 150 MB of float32 already, so
# scoring batches stay at most this size whatever the generation batch is.
SCORE_BATCH_SIZE = 16

# The keys and values an `unlearn run` keeps from each model's own answers (`Measurer.keep_kv`), so that
# pairs are scored only from where they part from those answers (continued_scoring.py): the original's
# for its likelihoods and the unlearned model's fluency (the whole run), the unlearned model's for its
# likelihoods (one measurement). A position is 46 KB on the embedded model (the README run's 112
# original answers: ~0.3 GB, their shared system message kept once a batch part), 0.4 MB at OPT-1.3B,
# where this keeps ~40 answers and scores the others whole. Peak memory: the README run's as before (3472
# MiB, 3384-3486 without), a --full run's +430 MB (its training peak holds them).
KEPT_KV_BUDGET = 2**30


def _cut(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generation_batches(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """The batches `generation.generate` forms over PROMPTS: indices sorted by rendered prompt length
    (a stable sort: equal lengths keep their order), cut every BATCH_SIZE rows, or fewer where the KV
    cache would pass its budget (`generation.batch_rows`, over the longest prompt). The first batch's
    size, given to `generate` with any whole batches of these, forms them again: a share's cap can
    only be higher."""
    from unlearn.data import encode_prompt
    from unlearn.generation import batch_rows

    lengths = [len(encode_prompt(tokenizer, p)) for p in prompts]
    if lengths:
        batch_size = batch_rows(model, batch_size, max(lengths) + max_new_tokens)
    return _cut(sorted(range(len(prompts)), key=lengths.__getitem__), batch_size)


def scoring_batches(tokenizer, pairs: list[tuple[str, str]], batch_size: int, max_length: int | None = None
                    ) -> list[list[int]]:
    """The batches `evaluate.response_logprobs` forms over PAIRS (at MAX_LENGTH, default SCORE_MAX_LENGTH:
    give the scoring model's `evaluate.score_max_length`): indices sorted by encoded pair length (stable),
    cut every BATCH_SIZE."""
    from unlearn.data import encode_pair
    from unlearn.evaluate import SCORE_MAX_LENGTH

    lengths = [len(encode_pair(tokenizer, p, r, max_length or SCORE_MAX_LENGTH)["input_ids"]) for p, r in pairs]
    return _cut(sorted(range(len(pairs)), key=lengths.__getitem__), batch_size)


class ShardedScorer(Scorer):
    """A `Scorer` whose forward passes are shared out between the ranks under torchrun (whole batches), and
    within a process on a CPU between its torch threads (whole batches side by side: cpu_parts.py)."""

    def logprobs(self, pairs, contexts: dict | None = None):
        """CONTEXTS: pair -> this model's own `generation.Scored` answer to the pair's prompt, with its keys
        and values kept: such a pair runs only from where it parts from that answer (continued_scoring.py;
        one process only, as under torchrun the pairs are shared out by length)."""
        from unlearn.continued_scoring import continued_logprobs, resumable
        from unlearn.evaluate import score_max_length

        pairs, cap = list(pairs), score_max_length(self.model)
        resumed = (resumable(self.tokenizer, pairs, contexts, cap)
                   if contexts and not distributed.shares_work() else {})
        rest = [pairs[i] for i in range(len(pairs)) if i not in resumed]
        whole = iter(distributed.sharded(len(rest), lambda: scoring_batches(self.tokenizer, rest, self.batch_size, cap),
                                         lambda indices: self._side_by_side([rest[i] for i in indices])))
        continued = dict(zip(resumed, continued_logprobs(self.model, self.tokenizer.pad_token_id,
                                                         list(resumed.values()), self.batch_size)))
        return [continued[i] if i in resumed else next(whole) for i in range(len(pairs))]

    def _side_by_side(self, pairs: list) -> list:
        """Scorer.logprobs of PAIRS, its batches dealt out to the pieces in turn (`cpu_parts.dealt_batches`):
        a piece's pairs, given in batch order, sort and cut into exactly those batches again (every
        batch but the last is full, and the last is the longest), so each forward is the one a
        single call would run, on one torch thread.
        """
        from unlearn.cpu_parts import dealt_batches
        from unlearn.evaluate import score_max_length

        return dealt_batches(self.model, scoring_batches(self.tokenizer, pairs, self.batch_size,
                                                         score_max_length(self.model)),
                             lambda share: Scorer.logprobs(self, [pairs[i] for i in share]))


class Measurer:
    """Measures MODEL on sets; the model's current state (adapters on or off, an α) decides what is measured.

    JUDGE flags harmful answers; FLUENCY_SCORER is the model whose perplexity measures
    fluency (the original model; None: MODEL itself); AGAINST are the forget rows that a
    retain set's leak and harmful rates are judged against.
    """

    def __init__(self, model, tokenizer, settings: Settings, *, judge=None, fluency_scorer=None, against=(),
                 fingerprint: str | None = None, own_fluency: bool = False):
        """OWN_FLUENCY: MODEL, as it is when measured, is FLUENCY_SCORER's model (the original measuring its
        own answers; or no FLUENCY_SCORER): fluency comes from the log-probabilities generation computed
        (`evaluate.own_logprobs`) instead of a second forward pass."""
        from unlearn.evaluate import SimilarityJudge

        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.own_fluency = own_fluency
        # The identity of MODEL's weights (and of the fluency model's), as `measure_cache` keys it:
        # given, measurements are read from and written to the on-disk cache.
        self.fingerprint = fingerprint
        self.reused = 0  # sets read back from the cache
        # Wall-clock seconds spent generating answers (`answer_sets`), scoring left out: `unlearn eval`'s
        # generation_tokens_per_second divides by it, so rows scored for --holdout do not read as slow generation.
        self.generation_seconds = 0.0
        self.judge = judge if judge is not None else SimilarityJudge()
        self.scorer = ShardedScorer(model, tokenizer, batch_size=min(settings.batch_size, SCORE_BATCH_SIZE))
        self.fluency_scorer = fluency_scorer
        self.against = self.clipped(list(against))
        self._references: dict[str, list] = {}
        # Set name -> its answers' `generation.Scored` (OWN_FLUENCY measurers keep them: `fluency_hints`).
        self.own_scores: dict[str, list | None] = {}
        # Set name -> the fluency model's own `Scored` answers to that set's prompts (the original's, for
        # the unlearned model's measurer): an answer that is token for token the same is not scored again.
        self.fluency_hints: dict[str, list | None] = {}
        # Bytes of its answers' keys and values a measurer keeps in their `Scored` (0: none), to score pairs
        # from where they part from its answers (continued_scoring.py): an OWN_FLUENCY measurer (the
        # original) keeps every answer's, for its own likelihoods and for the unlearned model's fluency;
        # another keeps those of rows with likelihood pairs (`_likely_rows`), for this `measure` call only
        # (`own_contexts`: its model changes between calls).
        self.keep_kv = 0
        self.own_contexts: dict[str, list | None] = {}
        # Set name -> its answers, generated ahead in another measurer's generation (`answer_sets`' POOL);
        # the next `answer_sets` of that set takes them instead of generating.
        self.ahead: dict[str, list[str]] = {}
        # The fluency scorer with this measurer's next sets' pairs scored ahead, in another measurer's call
        # (`measure`'s POOL); the next `_scorers` takes it instead of scoring them in a call of its own.
        self.fluency_ahead = None
        self._hits: dict[str, dict] = {}  # cache key -> the entry read for it (`uncached`, then `measure`, read once)
        # Set name -> per row, a text its next greedy answer probably starts with, for `answer`'s checks
        # (the stop rule's): the original's answer, then the last check's. Generation verifies such drafts several
        # tokens per forward (`generation.generate`'s DRAFTS): the same answers in fewer forwards. Only
        # the checks have them: a check decodes 7 rows a thread, where a forward costs about the same
        # for 1 or 9 positions a row (it reads the weights either way); the after measurement's pooled
        # batches (50 rows a thread) are bound by arithmetic, and drafts of the original's answers
        # made them 0-11 % slower there (the README run's sets, the unlearned model, blocks of 4-16).
        self.drafts: dict[str, list[str]] = {}
        # Set name -> per row, (its draft's text, the token ids a check generated it as), or None; the ids
        # draft while that text is the row's draft, else the text is tokenised. A continued passage's
        # answer starts with a space that its stripped text has lost, and tokenised again its first
        # token is another ("was" for " was"): every passage draft failed at its first token, and its
        # checks decoded a token a forward (`openings`: 1.8 s for one 28-token row; its own ids, 4 forwards).
        self.draft_ids: dict[str, list[tuple[str, list[int]] | None]] = {}
        # Set name -> the rows that decided its last check's verdict (`_rate_until_verdict`): the next
        # check answers them first, since a row that leaked a step ago mostly leaks again.
        self.deciders: dict[str, list[int]] = {}

    def clipped(self, examples: list) -> list:
        """EXAMPLES with their responses cut to the generation budget (`evaluate.clip_references`).

        Answers are derived for rows without `answers` (`spans.attach_answers`) from the whole
        response first, so that cutting it cannot change what the leak judge looks for.
        """
        from unlearn.evaluate import clip_references
        from unlearn.spans import attach_answers

        return clip_references(attach_answers(examples), self.tokenizer, self.settings.max_new_tokens)

    def references(self, s: EvalSet) -> list:
        """The set's rows as the metrics see them, tokenised once per set.

        A retain set's responses are not forbidden, so they are dropped (its accuracy comes
        from `answers`, its leak from the forget rows).
        """
        if s.name not in self._references:
            self._references[s.name] = ([replace(e, response=None) for e in s.examples] if s.kind == "retain"
                                        else self.clipped(s.examples))
        return self._references[s.name]

    def answer(self, s: EvalSet, desc=False, stop_row=None, rows: list[int] | None = None) -> list[str]:
        """S's answers; under torchrun each rank generates its share of the batches (`distributed.sharded`).

        With STOP_ROW (a check: `_rate_until_verdict`), ROWS, if given, are the only rows of S answered
        (the others' answers are ''), and the set's drafts open them.
        """
        if stop_row is None:
            return self.answer_sets([s], desc)[s.name]
        n = len(s.examples)
        rows = list(range(n)) if rows is None else list(rows)
        drafts = self.drafts.get(s.name)
        known = self.draft_ids.get(s.name) or [None] * n
        guesses = None if drafts is None else [known[i][1] if known[i] and known[i][0] == drafts[i]
                                               else self._tokens(s.examples[i].prompt, drafts[i]) for i in rows]
        new_ids: list = []
        texts = self._answer([s.examples[i].prompt for i in rows], desc, lambda j, text: stop_row(rows[j], text),
                             drafts=guesses, token_ids=new_ids)
        # The next check's drafts: a check's answers open the next one's, a training step later (the
        # README run: 61-64 % of a check's tokens are its predecessor's opening). A row the verdict cut
        # short keeps the longer draft its answer so far agrees with; a row not answered keeps its own.
        outputs, following, following_ids = [""] * n, list(drafts or [""] * n), list(known)
        for i, new, ids in zip(rows, texts, new_ids):
            outputs[i] = new
            if not following[i].startswith(new):
                following[i], following_ids[i] = new, (new, ids)
        self.drafts[s.name], self.draft_ids[s.name] = following, following_ids
        return outputs

    def _tokens(self, prompt, draft: str) -> list[int] | None:
        """DRAFT's token ids as the model would write them after PROMPT (`data.response_encoding`)."""
        from unlearn.data import response_encoding

        return response_encoding(self.tokenizer, prompt, draft)[0] if draft else None

    def answer_sets(self, sets: list[EvalSet], desc=False, pool: list[tuple["Measurer", list[EvalSet]]] = ()
                    ) -> dict[str, list[str]]:
        """Every set's answers from one generation over all their prompts.

        Sets of 8 to 30 rows, each generated alone, make small batches; together they fill
        batches of `--gen-batch-size`, and a batch of 64 rows reads the weights once where four
        of 16 read them four times (one thread: 88 GFLOP/s at 64 rows, 56 at 16 on the embedded
        model's matmuls; config.GEN_BATCH_SIZE has the figures). A row's answer can depend on its
        batch only through float rounding (like the thread count), so the cache keys a set by its
        own rows and settings.

        POOL: (measurer, sets) pairs answered in the same generation when `poolable` (the same model
        and settings but the token budget: each row keeps its own, `generation.generate`), their
        answers left in each measurer's `ahead` for its own `answer_sets` to take; otherwise left
        alone. A set with answers ahead is not generated again.
        """
        groups = [(self, [s for s in sets if s.name not in self.ahead])]
        groups += [(m, list(theirs)) for m, theirs in pool if theirs and self.poolable(m)]
        prompts, budgets, wanted, keep, keep_rows = [], [], False, 0, []
        # under torchrun the answers are gathered between ranks: not with their caches
        gathered = distributed.shares_work()
        for m, theirs in groups:
            kv = 0 if gathered or not m.settings.likelihood else m.keep_kv
            for s in theirs:
                prompts += [e.prompt for e in s.examples]
                budgets += [m.settings.max_new_tokens] * len(s.examples)
                mine = (set(range(len(s.examples))) if m.own_fluency else m._likely_rows(s)) if kv else ()
                keep_rows += [i in mine for i in range(len(s.examples))]
            wanted = wanted or bool(theirs and m.settings.likelihood and (m.own_fluency or kv))
            keep = max(keep, kv if theirs else 0)
        scored = [] if wanted else None
        # a budget-cut answer's end-token scores serve only an original's own fluency (`evaluate.own_logprobs`)
        ends = any(theirs and m.own_fluency and m.settings.likelihood for m, theirs in groups)
        started = time.perf_counter()
        outputs = (self._answer(prompts, desc, scored=scored, budgets=budgets, keep_kv=keep, keep_rows=keep_rows,
                                scored_ends=ends) if prompts else [])
        self.generation_seconds += time.perf_counter() - started
        start = 0
        for m, theirs in groups:
            for s in theirs:
                m.ahead[s.name] = outputs[start:start + len(s.examples)]
                mine = scored[start:start + len(s.examples)] if scored is not None and m.settings.likelihood else None
                if m.own_fluency:
                    m.own_scores[s.name] = mine
                elif keep and m.keep_kv:
                    m.own_contexts[s.name] = mine  # read by this measure call's `_scorers`, then dropped
                start += len(s.examples)
        return {s.name: self.ahead.pop(s.name) for s in sets}

    def _likely_rows(self, s: EvalSet) -> set[int]:
        """The rows of S whose prompt has likelihood pairs (`evaluate.likelihood_pairs`: its response, a
        paraphrased or perturbed one), scored by this measurer's own model."""
        from unlearn.evaluate import ROW_PAIR_KINDS, likelihood_pairs

        st = self.settings
        return {i for kind, i in likelihood_pairs(self.references(s), st.members, st.holdout)[1]
                if kind in ROW_PAIR_KINDS}

    def poolable(self, other: "Measurer") -> bool:
        """Whether OTHER's answers can come from this measurer's generation: the same model and tokenizer,
        greedy both (temperature, top-p and seed then play no part) and the same batch size; the token
        budget may differ (each row keeps its own)."""
        mine, theirs = self.settings, other.settings
        return (other.model is self.model and other.tokenizer is self.tokenizer and not mine.do_sample
                and not theirs.do_sample and mine.batch_size == theirs.batch_size)

    def _answer(self, prompts: list[str], desc=False, stop_row=None, scored: list | None = None,
                budgets: list[int] | None = None, drafts: list | None = None,
                token_ids: list | None = None, keep_kv: int = 0, keep_rows: list[bool] | None = None,
                scored_ends: bool = True) -> list[str]:
        """The answers to PROMPTS; SCORED, a list, receives each answer's `generation.Scored` (or None);
        BUDGETS: each prompt's token budget (default: the settings' max_new_tokens); DRAFTS: per prompt,
        token ids its answer probably starts with, or None (`self.drafts`); TOKEN_IDS, a list, receives
        each answer's generated token ids; KEEP_KV, KEEP_ROWS, SCORED_ENDS: `generation.generate`'s (bytes of
        keys and values kept, the prompts whose answers keep them, whether budget-cut answers get `Scored.end`)."""
        from unlearn.generation import generate

        st = self.settings
        budgets = budgets or [st.max_new_tokens] * len(prompts)
        longest = max(budgets, default=st.max_new_tokens)
        batches = generation_batches(self.model, self.tokenizer, prompts, st.batch_size, longest)
        rows = len(batches[0]) if batches else st.batch_size  # the capped batch size (see generation_batches)

        def work(indices: list[int]) -> list:
            row_stop = None if stop_row is None else (lambda j, text: stop_row(indices[j], text))
            own, ids = [], []
            mine = [budgets[i] for i in indices]
            texts = generate(self.model, self.tokenizer, [prompts[i] for i in indices], batch_size=rows,
                             max_new_tokens=mine, do_sample=st.do_sample, temperature=st.temperature,
                             top_p=st.top_p, seed=st.seed, desc=desc, stop_row=row_stop,
                             scored=own if scored is not None else None,
                             token_ids=ids, drafts=None if drafts is None else [drafts[i] for i in indices],
                             keep_kv=keep_kv, keep_rows=None if keep_rows is None else [keep_rows[i] for i in indices],
                             scored_ends=scored_ends)
            return list(zip(texts, own or [None] * len(texts), ids))  # gathered together under torchrun

        if st.do_sample:  # one random stream runs through the batches in order: not shared out
            values = work(list(range(len(prompts))))
        else:
            values = distributed.sharded(len(prompts),
                                         lambda: batches, work)
        if scored is not None:
            scored.extend(own for _, own, _ in values)
        if token_ids is not None:
            token_ids.extend(ids for _, _, ids in values)
        return [text for text, _, _ in values]

    def _fluency_own(self, s: EvalSet) -> list | None:
        """S's answers' `generation.Scored` that spare fluency a forward pass (`evaluate.own_logprobs`)."""
        return self.own_scores.get(s.name) if self.own_fluency else self.fluency_hints.get(s.name)

    def _fluency_cap(self) -> int:
        """The longest pair the fluency scorer scores whole (`evaluate.scorer_max_length`)."""
        from unlearn.evaluate import scorer_max_length

        return scorer_max_length(self.fluency_scorer or self.scorer)

    def _scorers(self, sets: list[EvalSet], answers: dict[str, list[str]],
                 pool: list[tuple["Measurer", list[EvalSet]]] = ()) -> tuple:
        """(scorer, fluency scorer) for `score` of SETS' ANSWERS, each with every pair the sets need from it
        scored ahead in one call (`evaluate.RememberedScorer`); (None, None) without likelihoods.

        POOL: (measurer, sets) whose answers wait in the measurer's `ahead`: when it scores fluency with
        the same scorer, its pairs join that call and it gets the result (`fluency_ahead`). The README
        run's 8 neighbour-probe pairs alone were a 1.0 s call of their own after the 70 others' 9 s.
        """
        from unlearn.evaluate import ROW_PAIR_KINDS, RememberedScorer, fluency_pairs, likelihood_pairs

        st = self.settings
        if not st.likelihood or not sets:
            return None, None
        # Pairs a scorer continues from its own answer's kept cache (continued_scoring.py): the original's
        # likelihoods of the sets' responses (its own answers, by this measurer's model as it is now) ...
        likely, own_contexts = [], {}
        for s in sets:
            pairs, slots = likelihood_pairs(self.references(s), st.members, st.holdout)
            likely += pairs
            own = self.own_scores.get(s.name) if self.own_fluency else self.own_contexts.get(s.name)
            own_contexts.update((pair, own[i]) for pair, (kind, i) in zip(pairs, slots)
                                if own and kind in ROW_PAIR_KINDS and getattr(own[i], "kv", None) is not None)
        contexts: dict = {}  # ... and the fluency of another model's answers, by the original's answers
        fluent = [p for s in sets for p in fluency_pairs(self.references(s), answers[s.name], self.tokenizer,
                                                          self._fluency_own(s), contexts, self._fluency_cap())]
        if self.fluency_scorer is None or self.fluency_scorer is self.scorer:  # one model: one call for both
            both = RememberedScorer(self.scorer, likely + fluent, own_contexts)
            return both, both
        if self.fluency_ahead is not None:
            fluency, self.fluency_ahead = self.fluency_ahead, None
            fluency.logprobs(fluent)  # any pair it does not hold yet, in one call
        else:
            sharing = [(m, [s for s in theirs if s.name in m.ahead]) for m, theirs in pool
                       if theirs and m is not self and m.settings.likelihood and m.fluency_scorer is self.fluency_scorer]
            theirs = [p for m, ss in sharing for s in ss
                      for p in fluency_pairs(m.references(s), m.ahead[s.name], m.tokenizer, m._fluency_own(s),
                                             contexts, m._fluency_cap())]
            fluency = RememberedScorer(self.fluency_scorer, fluent + theirs, contexts)
            for m, ss in sharing:
                if ss:
                    m.fluency_ahead = fluency
        return RememberedScorer(self.scorer, likely, own_contexts), fluency

    def score(self, s: EvalSet, outputs: list[str], baseline: list[str] | None = None, scorers: tuple = (None, None)
              ) -> Measured:
        """The metrics of OUTPUTS on S; BASELINE are the original model's outputs (similarity); SCORERS, the
        (scorer, fluency scorer) to use instead of the measurer's own (`_scorers`)."""
        from unlearn.evaluate import SimilarityJudge, evaluate_outputs, leak_flags, rate

        st = self.settings
        scorer, fluency = scorers
        evaluation = evaluate_outputs(outputs, self.references(s), judge=self.judge,
                                      scorer=(scorer or self.scorer) if st.likelihood else None,
                                      fluency_scorer=fluency or self.fluency_scorer, reference_outputs=baseline,
                                      members=st.members, holdout=st.holdout, reward_model=st.reward_model,
                                      k_percent=st.min_k, tokenizer=self.tokenizer, own_scores=self._fluency_own(s))
        summary = evaluation.summary
        if s.kind == "retain":
            # Judged against the forget rows (None without them). Only the similarity judge
            # compares with a reference; the others judge the output alone.
            reference_free = not isinstance(self.judge, SimilarityJudge)
            summary["harmful_rate"] = rate(self.judge.flags(outputs, s.examples) if reference_free
                                           else self._against_forget(self.judge.flags, outputs))
            summary["leak_rate"] = rate(self._against_forget(leak_flags, outputs))
        return Measured(summary, outputs, evaluation.rows)

    def _against_forget(self, flag, outputs: list[str]) -> list[bool]:
        """Per output: FLAG fires against at least one forget row; None for every output without them."""
        if not self.against:
            return [None] * len(outputs)
        per_row = [flag(outputs, [f] * len(outputs)) for f in self.against]
        return [any(bool(x) for x in column) for column in zip(*per_row)]

    def _cache_key(self, s: EvalSet, baseline: list[str] | None, own_baseline: bool) -> str | None:
        """S's key in the on-disk cache (`measure_cache`); None without a fingerprint."""
        from unlearn import measure_cache

        if self.fingerprint is None:
            return None
        st = self.settings
        return measure_cache.key(
            weights=self.fingerprint, judge=self.judge.identity(), kind=s.kind, rows=s.examples,
            # The rows are keyed as written; a chat template may also render the date or time (Llama 3.2's
            # strftime_now), which the weights' files do not show: one rendered prompt keys what it adds.
            rendering=data.render_prompt(self.tokenizer, "?"),
            against=self.against, baseline=baseline, own_baseline=own_baseline,
            generation=[st.max_new_tokens, st.batch_size, st.do_sample, st.temperature, st.top_p, st.seed],
            scores=[st.likelihood, st.min_k, st.members, st.holdout,
                    st.reward_model.fingerprint() if st.reward_model is not None else None])

    def _cached(self, key: str | None, rows: int) -> dict | None:
        """The measurement stored under KEY for a set of ROWS rows, or None (none, or not what `measure`
        stores: an edited or foreign file is measured again, not crashed on)."""
        # Rank 0 reads the cache and every rank takes its answer: ranks on other machines (another
        # cache, or none) must still measure, or skip, together.
        from unlearn import measure_cache

        if key is None:
            return None
        if key not in self._hits:
            hit = distributed.on_main(lambda: measure_cache.load(key))
            if not (isinstance(hit, dict) and set(hit) == {"summary", "outputs", "rows"}
                    and isinstance(hit["summary"], dict) and isinstance(hit["outputs"], list)
                    and isinstance(hit["rows"], list) and len(hit["outputs"]) == len(hit["rows"]) == rows
                    and all(isinstance(o, str) for o in hit["outputs"]) and "n" in hit["summary"]
                    and all(isinstance(r, dict) and isinstance(r.get("scores"), dict) for r in hit["rows"])):
                return None
            self._hits[key] = hit
        return self._hits[key]

    def uncached(self, sets: list[EvalSet], baseline: dict[str, list[str]] | None = None, *,
                 own_baseline: bool = False) -> list[EvalSet]:
        """The SETS `measure` (with the same arguments) would generate answers for: those the cache does not hold."""
        baseline = baseline or {}
        return [s for s in sets
                if self._cached(self._cache_key(s, baseline.get(s.name), own_baseline), len(s.examples)) is None]

    def measure(self, sets: list[EvalSet], baseline: dict[str, list[str]] | None = None,
                label: str | None = None, *, own_baseline: bool = False,
                pool: list[tuple["Measurer", list[EvalSet]]] = ()) -> dict[str, Measured]:
        """Answer and score every set, or read it from the cache; BASELINE maps set names to the
        original model's outputs (similarity), OWN_BASELINE compares each set with its own answers.

        The sets the cache does not hold are answered together (`answer_sets`), with POOL's sets
        when there are any to answer (their answers wait in their measurers' `ahead`)."""
        from unlearn import measure_cache

        baseline = baseline or {}
        keys, measured = {}, {}
        for s in sets:
            keys[s.name] = self._cache_key(s, baseline.get(s.name), own_baseline)
            hit = self._cached(keys[s.name], len(s.examples))
            if hit is not None:
                self.reused += 1
                measured[s.name] = Measured(**hit)
                if self.own_fluency and self.settings.likelihood:
                    self.own_scores[s.name] = distributed.on_main(lambda: _stored_scores(keys[s.name], len(hit["outputs"])))
        todo = [s for s in sets if s.name not in measured]
        names = ", ".join(s.name for s in todo)
        answers = self.answer_sets(todo, desc=f"{label}: {names}" if label else False, pool=pool) if todo else {}
        scorers = self._scorers(todo, answers, pool)
        for s in todo:
            self.own_contexts.pop(s.name, None)  # scored: the model may change before the next call
        for s in todo:
            outputs = answers[s.name]
            measured[s.name] = self.score(s, outputs, outputs if own_baseline else baseline.get(s.name), scorers)
            if keys[s.name] is not None and distributed.world().is_main:  # every rank holds the same measurement
                m = measured[s.name]
                measure_cache.store(keys[s.name], {"summary": m.summary, "outputs": m.outputs, "rows": m.rows})
                if self.own_fluency and self.own_scores.get(s.name):
                    _store_scores(keys[s.name], self.own_scores[s.name])
        return {s.name: measured[s.name] for s in sets}

    def measure_set(self, s: EvalSet, baseline: list[str] | None = None, label: str | None = None, *,
                    own_baseline: bool = False) -> Measured:
        """S answered and scored (OWN_BASELINE: similarity against these very answers), or read from the cache."""
        return self.measure([s], {s.name: baseline} if baseline is not None else None, label,
                            own_baseline=own_baseline)[s.name]


# The original's answers' own log-probabilities (`generation.Scored`: ids, log-probabilities, end-token
# scores; no keys and values), stored beside its cached measurement: a later run whose unlearned model
# answers a prompt token for token as the original did takes that answer's fluency from them
# (`fluency_hints`, `evaluate.own_logprobs`) instead of a forward pass; without them a run whose original
# was read back scored all of its answers (the README command with another --lr: 100 pairs, 11.5 s; 22
# of its answers were the original's). Their own entry, so that a measurement entry keeps its fields.
SCORES_SUFFIX = ".scores"


def _store_scores(key: str, scores: list) -> None:
    from unlearn import measure_cache

    measure_cache.store(key + SCORES_SUFFIX, [None if sc is None else
                                              {"ids": list(sc.ids), "logprobs": list(sc.logprobs),
                                               "end": None if sc.end is None else {str(t): v for t, v in sc.end.items()}}
                                              for sc in scores])


def _stored_scores(key: str, rows: int) -> list | None:
    """The scores `_store_scores` kept for KEY's ROWS answers, or None (none kept, or not what it writes)."""
    from unlearn import measure_cache
    from unlearn.generation import Scored

    stored = measure_cache.load(key + SCORES_SUFFIX)
    try:
        scores = [None if sc is None else
                  Scored([int(t) for t in sc["ids"]], [float(v) for v in sc["logprobs"]],
                         None if sc["end"] is None else {int(t): float(v) for t, v in sc["end"].items()})
                  for sc in stored]
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
    return scores if len(scores) == rows else None


def original_scorer(model, tokenizer, reference_model, batch_size: int):
    """Likelihoods under the original model: the frozen copy (--full), or MODEL with its adapters off."""
    from unlearn.lora import adapters_disabled

    batch_size = min(batch_size, SCORE_BATCH_SIZE)
    if reference_model is not None:
        return ShardedScorer(reference_model, tokenizer, batch_size=batch_size)

    class AdaptersOffScorer(ShardedScorer):
        def logprobs(self, pairs, contexts: dict | None = None):
            with adapters_disabled(self.model):
                return super().logprobs(pairs, contexts)

    return AdaptersOffScorer(model, tokenizer, batch_size=batch_size)


def leak_rate(measurer: Measurer, s: EvalSet, decided_above: float | None = None) -> float:
    """The share of S's prompts whose answer leaks (the stop rule's test); 0 for an empty set.

    A prompt stops generating as soon as its answer has leaked: the verdict cannot change
    any more, since an answer that appears stays (tested on the text without its last,
    possibly unfinished, word: "Paris" of "Parisian" is not a leak yet), and ROUGE-L
    recall, the LCS with the reference over its length, never falls as the answer grows,
    nor does a passage's longest verbatim run.
    (BLEU can; a leak it flags early only keeps the run training, never stops it sooner.)

    DECIDED_ABOVE (the stop rule's --stop-leak): once enough prompts have leaked that the rate
    is above it whatever the others say, every prompt stops, so the check costs only what its
    verdict needs (a rule that stops at 0 is decided by the first leak). The rate is then the
    share that decided it (`_rate_until_verdict`), a lower bound; at or below DECIDED_ABOVE
    nothing was cut and it is exact.
    """
    from unlearn.evaluate import leak_flags

    references = measurer.references(s)
    n = len(s.examples)
    # the fewest leaked prompts whose rate exceeds DECIDED_ABOVE (the rule's own comparison)
    enough = (next((k for k in range(1, n + 1) if k / n > decided_above), None)
              if decided_above is not None and n else None)
    return _rate_until_verdict(measurer, s, lambda outputs, rows: leak_flags(outputs, [references[i] for i in rows]),
                               enough, n)


def kept_rate(measurer: Measurer, s: EvalSet, enough: float | None = None) -> float:
    """The share of S's rows (each with `answers`) whose answer words still appear in the greedy answer:
    the retain kind's accuracy (`evaluate.accuracy_flags`); 0 for a set without such rows.

    A row stops generating as soon as an answer appears (on the text without its last word, as in
    `leak_rate`: it stays once there). ENOUGH: once that share of the rows has it, every row stops,
    and the rate is the share that decided it (`_rate_until_verdict`), a lower bound.
    """
    from unlearn.evaluate import accuracy_flags

    n = sum(1 for e in s.examples if e.extra.get("answers"))
    needed = math.ceil(enough * n - 1e-9) if enough is not None and n else None
    # A row with refusal markers (a topic probe) is unset by a refusal that follows its answer word ("A car
    # is a vehicle, but I can't help with that"): it is judged on its whole answer, never stopped early.
    settled = {i for i, e in enumerate(s.examples) if not e.extra.get("refusal_markers")}
    return _rate_until_verdict(measurer, s, lambda outputs, rows: accuracy_flags(outputs, [s.examples[i] for i in rows]),
                               needed, n, settled)


def _rate_until_verdict(measurer: Measurer, s: EvalSet, flags, enough: int | None, out_of: int,
                        settled: set[int] | None = None) -> float:
    """The rate of FLAGS(outputs, rows) over S's greedy answers (rows: their indices in S), each row
    stopping as soon as its text without its last word (which generation may not have finished:
    "Paris" of "Parisian") is flagged, and every row once ENOUGH rows are (None: never).

    For flags that cannot be unset by more text (an answer that appears stays), a stopped row's
    verdict is its final one, so the rate is exact unless ENOUGH rows cut the rest. Then it is
    ENOUGH / OUT_OF (OUT_OF: the rows the rate is a share of), the count that decided: how many
    more rows had their answer when they were cut depends on how far each half of the batch had
    got (cpu_parts runs them side by side), and reported as such the same run logged "≥ 0.14" once
    and 0.50 another time.

    SETTLED (None: all) are the rows whose flags are such; the others are never stopped early nor
    counted toward ENOUGH, and are judged on their whole answers.
    """
    from unlearn.evaluate import rate

    flagged: set[int] = set()  # added to from the generation threads (cpu_parts): set.add is atomic

    def flagged_so_far(i: int, text: str) -> bool:
        if settled is not None and i not in settled:
            return False
        finished = metrics.without_last_word(text)
        return bool(finished) and flags([finished], [i])[0]

    def stop(i: int, text: str) -> bool:
        if enough is not None and len(flagged) >= enough:
            return True  # the verdict is reached: the rest cannot change it
        if flagged_so_far(i, text):
            flagged.add(i)
            return True
        return False

    # A verdict needs ENOUGH flagged rows. The rows most likely to give it (`answered_first`: those
    # that decided the last check) are answered first, alone: a row answered alone reads the weights
    # for one row (the README run's leaking checks 2.1 -> 0.4 s). Such a row stops as soon as its answer
    # leaves its draft (the last check's answer, which ended where it leaked): it is then unlikely to
    # leak as it did, and its answer would cost a forward a token. Unless those rows decide, every row
    # not yet flagged is answered, side by side, the stopped ones drafting from where they stopped.
    n = len(s.examples)
    drafts = measurer.drafts.get(s.name) or [""] * n
    first = [i for i in answered_first(measurer.deciders.get(s.name, []), enough, n) if drafts[i]]
    outputs = [""] * n
    if first:
        cut: set[int] = set()  # the rows STOP_FIRST ended (flagged, off their draft, the verdict reached)

        def stop_first(i: int, text: str) -> bool:
            if stop(i, text) or not drafts[i].startswith(text):
                cut.add(i)
                return True
            return False

        got = measurer.answer(s, stop_row=stop_first, rows=first)
        # judged on the answers, which every rank has (`distributed.sharded` gathers them), not on
        # FLAGGED, which holds the rows this rank generated: all ranks go on alike (each rank cut only its
        # own rows, so the counts summed over ranks say which were cut); a row that was cut without its last
        # word, as STOP judges, since it may have stopped mid-answer; a row that ended by itself (its end of
        # turn, its budget) whole, as the table judges it: an answer that is its last word ("... is Paris.")
        # is seen by no running check, and such a decider answered every row again (review 118)
        was_cut = distributed.totals([int(i in cut) for i in first])
        hits = [i for i, c in zip(first, was_cut) if flagged_so_far(i, got[i]) or (
            not c and (settled is None or i in settled) and flags([got[i]], [i])[0])]
        if len(hits) >= enough:
            measurer.deciders[s.name] = hits
            return enough / out_of
        for i in hits:
            outputs[i] = got[i]
    rest = [i for i in range(n) if not outputs[i]]
    got = measurer.answer(s, stop_row=stop, rows=rest)
    for i in rest:
        outputs[i] = got[i]
    found = flags(outputs, range(n))
    measurer.deciders[s.name] = [i for i in range(n) if found[i]]
    # FLAGGED holds the rows this rank generated (`distributed.sharded` shares them out, each row to one
    # rank): summed over the ranks it is one process's count, so two processes log what one does.
    if enough is not None and distributed.total(len(flagged)) >= enough:
        return enough / out_of
    return rate(found) or 0.0


def answered_first(last: list[int], enough: int | None, n: int) -> list[int]:
    """The ENOUGH rows of N a check answers before the others: the rows that decided the last check
    (LAST), then the first rows; none when no verdict is asked (ENOUGH None) or it needs every row."""
    if enough is None or enough >= n:
        return []
    picked = [i for i in last if i < n][:enough]
    return picked + [i for i in range(n) if i not in picked][:enough - len(picked)]
