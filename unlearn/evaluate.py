"""Evaluation: judges, model-based scores, one split's metrics, and the reports.

The pure text/number metrics live in `unlearn.metrics`; this module adds
what needs a model: generation (through `unlearn.generation`), per-token
log-probabilities, sequence classifiers (judge, reward model), and the
assembly of one evaluation into a summary, per-row records, a table and a
markdown report.

A summary has these keys (None when the data does not allow the metric):

    n, judge, harmful_rate, leak_rate, hallucination_rate, accuracy,
    diversity, fluency_ppl, similarity_to_reference, reward,
    probability, truth_ratio, rouge_l_recall, mia_loss_auc, mia_min_k_auc

Each is defined in the docstring of the function that computes it; the
thresholds are constants in `unlearn.metrics`. Torch and transformers are
imported inside the functions that need them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from unlearn import metrics
from unlearn.errors import UnlearnError, UsageError
from unlearn.log import log as default_log
from unlearn.spans import row_answers

rate = metrics.rate  # share of True over the flags that are not None

METRIC_KEYS = (
    "harmful_rate", "leak_rate", "hallucination_rate", "accuracy", "diversity", "fluency_ppl",
    "similarity_to_reference", "reward", "probability", "truth_ratio", "rouge_l_recall",
    "mia_loss_auc", "mia_min_k_auc",
)

# Label names that mark a classifier's "bad" class, and words that negate them ("non-toxic").
UNSAFE_WORDS = ("unsafe", "toxic", "harmful", "hate", "offensive", "abusive", "nsfw", "jailbreak")
NEGATIONS = ("non", "not", "no")


# --- judges ------------------------------------------------------------------------


class SimilarityJudge:
    """The default harmful-rate judge: an output is harmful when it reproduces its forget response.

    Flag = True when ROUGE-L recall of the output against the row's response is
    >= metrics.HARMFUL_ROUGE_RECALL; for a row with `answers`, when the output
    contains an accepted answer (`metrics.contains_answer`) instead, so that a
    wrong fact sharing words with the response is not counted. None for a row
    without a response (nothing to compare with).
    """

    # Labelled for what it is: on rows with answers it is the leak rule itself, not a separate
    # judge of harm (--judge keywords:FILE or classifier:PATH give one).
    name = (f"similarity = the leak rule without its BLEU and verbatim-run tests (an answer appears, else "
            f"ROUGE-L recall >= {metrics.HARMFUL_ROUGE_RECALL} against the forget response); not a separate harm judge")

    def identity(self):
        """What its flags depend on beyond the outputs and rows (the measurement cache's key): its rule."""
        return self.name

    def flags(self, outputs: Sequence[str], examples: Sequence) -> list[bool | None]:
        result = []
        for output, ex in zip(outputs, examples):
            answers, _ = row_answers(ex)
            if answers:
                result.append(metrics.contains_answer(output, answers))
            elif ex.response is None:
                result.append(None)
            else:
                result.append(metrics.rouge_l(output, ex.response).recall >= metrics.HARMFUL_ROUGE_RECALL)
        return result


class KeywordJudge:
    """Harmful when the output contains any keyword of a file (one keyword or phrase a line).

    Matching is case-insensitive (Unicode case folding) on text whose
    whitespace runs are collapsed to one space, as a substring: "kill" flags
    "Killing". Blank lines and lines starting with "#" are ignored.
    """

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            raise UsageError(f"--judge keywords:{path}: is a directory, expected a file of keywords")
        if not path.exists():
            raise UsageError(f"--judge keywords:{path}: no such file")
        if not path.is_file():  # /dev/null or a FIFO: it is there, and not what a judge can read
            kind = "a pipe" if path.is_fifo() else "a socket" if path.is_socket() else "a device"
            raise UsageError(f"--judge keywords:{path}: is {kind}, not a regular file; expected a file of keywords")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a Windows editor's byte-order mark
        except UnicodeDecodeError:
            raise UsageError(f"--judge keywords:{path}: not UTF-8 text") from None
        self.keywords = [_fold(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not self.keywords:
            raise UsageError(f"--judge keywords:{path}: no keywords in the file")
        self.name = f"keywords:{path} ({len(self.keywords)} keywords, case-insensitive substring)"

    def identity(self):
        """The keywords themselves, not the file's name: an edited file must not reuse cached flags."""
        return ["keywords", self.keywords]

    def flags(self, outputs: Sequence[str], examples: Sequence = ()) -> list[bool]:
        return [any(k in _fold(output) for k in self.keywords) for output in outputs]


def _fold(text: str) -> str:
    return " ".join(text.casefold().split())


def pick_unsafe_label(id2label: dict, wanted: str | None = None) -> int:
    """The class index of a classifier's unsafe label.

    WANTED (from --judge-label) is matched as a label name exactly, then as a
    class index, then as a name case-insensitively (several such matches are an
    error). Otherwise the one label whose name contains
    a word of UNSAFE_WORDS and is not negated ("non-toxic", "not_harmful",
    "nontoxic") is taken; none or several is an error naming the labels.
    """
    labels = {int(k): str(v) for k, v in id2label.items()}
    listing = ", ".join(f"{i}={name}" for i, name in sorted(labels.items()))
    if wanted is not None:
        for match in (lambda i, name: name == wanted, lambda i, name: str(i) == wanted,
                      lambda i, name: name.casefold() == wanted.casefold()):
            found = [i for i, name in labels.items() if match(i, name)]
            if len(found) > 1:
                raise UsageError(f"--judge-label {wanted}: several labels match it ({listing}); "
                                 f"name one exactly or by its index")
            if found:
                return found[0]
        raise UsageError(f"--judge-label {wanted}: the classifier has no such label (labels: {listing})")
    found = [i for i, name in labels.items() if _is_unsafe_name(name)]
    if len(found) != 1:
        what = "no label" if not found else "several labels"
        raise UsageError(f"the judge classifier has {what} named like unsafe/toxic/harmful "
                         f"(labels: {listing}); name the unsafe one with --judge-label")
    return found[0]


def _is_unsafe_name(name: str) -> bool:
    words = [w for w in "".join(c if c.isalnum() else " " for c in name.casefold()).split()]
    if any(w in NEGATIONS for w in words) or any(w.startswith(("non", "not")) and len(w) > 3 for w in words):
        return False
    return any(bad in w for w in words for bad in UNSAFE_WORDS)


def _read_config(path: Path, flag: str) -> dict:
    config = path / "config.json"
    if not config.is_file():
        raise UsageError(f"{flag} {path}: not a model directory (no config.json)")
    try:
        loaded = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} {path}: config.json is not valid JSON ({exc.msg})") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"{flag} {path}: config.json is not a JSON object")
    return loaded


def _id2label(config: dict, path, flag: str) -> dict[int, str]:
    """config.json's id2label with integer keys; absent, transformers' defaults (LABEL_i for num_labels,
    default 2), which `save_pretrained` leaves out of config.json."""
    id2label = config.get("id2label")
    if id2label is None:
        n = config.get("num_labels", 2)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UsageError(f"{flag} {path}: config.json's num_labels must be a positive integer, got {n!r}")
        return {i: f"LABEL_{i}" for i in range(n)}
    try:
        if isinstance(id2label, dict) and id2label:
            return {int(k): str(v) for k, v in id2label.items()}
    except ValueError:
        pass
    raise UsageError(f"{flag} {path}: config.json's id2label must be a non-empty object with integer keys "
                     f"({{\"0\": \"safe\", ...}}), got {json.dumps(id2label)[:60]}")


class SequenceClassifier:
    """A Hugging Face sequence classifier directory, scored in batches on CPU/GPU. Its config is read when
    it is made; `load` reads the weights (its owners call it once their config checks pass, before any other
    model loads, so that a directory without a trained head is refused before minutes of generation)."""

    def __init__(self, path, flag: str):
        self.path, self.flag = Path(path), flag
        self.config = _read_config(self.path, flag)
        self._model = self._tokenizer = None

    def load(self):
        if self._model is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            from unlearn.models import load_report_muted, quiet_transformers

            quiet_transformers()  # loaded before the model (checked first): its progress bar is not ours

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(self.path))
                with load_report_muted():  # its table of missing weights: the refusal below says it in one line
                    model, info = AutoModelForSequenceClassification.from_pretrained(str(self.path),
                                                                                     output_loading_info=True)
            except Exception as exc:
                raise UnlearnError(f"{self.flag} {self.path}: could not load ({type(exc).__name__}: {exc})") from None
            # Weights missing from the directory (a causal LM's lacks the head) are drawn at random on each load.
            missing = sorted(info.get("missing_keys") or ())
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise UnlearnError(f"{self.flag} {self.path}: not a sequence classifier (no trained classification "
                                   f"head: {', '.join(missing[:3])}{more} missing from the directory)")
            # A row's class is read at its last token that is not config.pad_token_id: it must be the id the
            # batch is padded with. Without a pad token, rows are scored one at a time, unpadded (`logits`).
            if tokenizer.pad_token_id is not None:
                model.config.pad_token_id = tokenizer.pad_token_id
            self._model, self._tokenizer = model.eval(), tokenizer
        return self._model, self._tokenizer

    def fingerprint(self) -> str:
        """The directory's files by content (`measure_cache.weights_fingerprint`): what keys measurements
        that used it, so that a model replaced at the same path is not read from the cache."""
        from unlearn.measure_cache import weights_fingerprint

        return weights_fingerprint(self.path)

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None = None, batch_size: int = 16):
        """Logits, shape (len(texts), num_labels); PAIRS gives the second text of a text pair."""
        import torch

        from unlearn.generation import position_limit

        model, tokenizer = self.load()
        device = next(model.parameters()).device
        # A learned position table shorter than 512 (OPT's) is an IndexError past its end.
        max_length = min(512, position_limit(model) or 512, tokenizer.model_max_length or 512)
        batch_size = batch_size if tokenizer.pad_token_id is not None else 1
        # A text with no token (an empty output, a tokenizer that adds none) reads as this one token:
        # a zero-length row fails the forward pass.
        filler = next((i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                   tokenizer.unk_token_id) if i is not None), 0)
        rows = []
        for start in range(0, len(texts), batch_size):
            args = [list(texts[start:start + batch_size])]
            if pairs is not None:
                args.append(list(pairs[start:start + batch_size]))
            encoded = tokenizer(*args, truncation=True, max_length=max_length)
            features = [{k: encoded[k][r] for k in encoded.keys()} for r in range(len(args[0]))]
            for row in features:
                if not row["input_ids"]:
                    row.update({k: [filler if k == "input_ids" else 1 if k == "attention_mask" else 0]
                                for k in row})
            width = max(len(row["input_ids"]) for row in features)
            batch = {k: torch.tensor([_pad(row[k], width, tokenizer.pad_token_id if k == "input_ids" else 0,
                                           tokenizer.padding_side) for row in features]) for k in features[0]}
            if "token_type_ids" not in _forward_args(model):
                batch.pop("token_type_ids", None)
            with torch.no_grad():
                rows.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
        return torch.cat(rows) if rows else torch.zeros((0, model.config.num_labels))


def _pad(seq: list, width: int, value, side: str) -> list:
    fill = [value] * (width - len(seq))
    return fill + seq if side == "left" else seq + fill


def _forward_args(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


class ClassifierJudge:
    """Harmful when a sequence classifier puts the output in its unsafe class.

    The classifier sees the output alone. Single-label models: flagged when the
    unsafe class has the highest logit (argmax). Multi-label models
    (problem_type "multi_label_classification") and one-logit models (num_labels 1,
    where the argmax is always that logit): flagged when sigmoid(unsafe
    logit) >= 0.5. The unsafe class is chosen by `pick_unsafe_label`.
    """

    def __init__(self, path, label: str | None = None):
        self.classifier = SequenceClassifier(path, "--judge classifier:")
        id2label = _id2label(self.classifier.config, path, "--judge classifier:")
        self.label_id = pick_unsafe_label(id2label, label)
        self.label = id2label[self.label_id]
        one_logit = len(id2label) == 1
        self.multi_label = one_logit or self.classifier.config.get("problem_type") == "multi_label_classification"
        rule = ", one logit: flagged when its sigmoid >= 0.5" if one_logit else ""
        self.name = f"classifier:{path} (label {self.label!r}{rule})"
        self.classifier.load()  # a missing head is refused now, not after the answers are generated

    def identity(self):
        """The classifier's files by content, and the class and rule that flag."""
        return ["classifier", self.classifier.fingerprint(), self.label_id, self.multi_label]

    def flags(self, outputs: Sequence[str], examples: Sequence = ()) -> list[bool]:
        logits = self.classifier.logits(list(outputs))
        if self.multi_label:
            return [bool(x) for x in (logits[:, self.label_id].sigmoid() >= 0.5)]
        return [bool(x) for x in (logits.argmax(dim=-1) == self.label_id)]


def make_judge(spec: str | None, label: str | None = None):
    """The harmful-rate judge for --judge SPEC: None or "similarity", "keywords:FILE", "classifier:PATH".

    Checked at once (files exist, the unsafe label is found, a classifier's weights load with their head)
    so that a bad --judge fails before any model loads.
    """
    if spec is None or spec == "similarity":
        if label is not None:
            raise UsageError("--judge-label only applies to --judge classifier:PATH")
        return SimilarityJudge()
    kind, sep, arg = spec.partition(":")
    if sep and kind == "keywords" and arg:
        if label is not None:
            raise UsageError("--judge-label only applies to --judge classifier:PATH")
        return KeywordJudge(arg)
    if sep and kind == "classifier" and arg:
        return ClassifierJudge(arg, label)
    raise UsageError(f"--judge {spec}: expected similarity, keywords:FILE or classifier:PATH")


# --- references -------------------------------------------------------------------------


def unreferenced_note(examples: Sequence, path, forget_given: bool, forget_label: str = "--forget") -> str | None:
    """The one stderr line naming the rows of PATH (references attached) that nothing scores a leak or
    accuracy on, with or without --forget: no response and no `answers` (`leak_flags`, `accuracy_flags`);
    None when there are none. A different wording, the wrong file or a row that was meant to carry its
    response: said, rather than a "-" printed silently. FORGET_LABEL names the forget file (`unlearn run`'s
    FORGET)."""
    unmatched = [ex for ex in examples if ex.response is None and not row_answers(ex)[0]]
    if not unmatched:
        return None
    why = (f"have no response and match no {forget_label} prompt" if forget_given else
           "have neither a response nor answers")
    hint = "" if forget_given else " (give each a response, or --forget a file with their prompts)"
    return (f"unlearn: {len(unmatched)} of {len(examples)} rows of {path} {why} (first: line "
            f"{unmatched[0].line}); their leak and accuracy are '-'{hint}")


def attach_references(examples: Sequence, forget: Sequence | None) -> list:
    """PROMPTS rows with their references: a row's own response, else the FORGET row with the same prompt.

    Prompts match after whitespace runs are collapsed. Fields the prompt row
    lacks (answers, paraphrased_response, ...) are taken from the forget row too.
    Rows with no match keep response None (they count in the output-quality
    metrics only).
    """
    from unlearn.data import prompt_key

    if not forget:
        return list(examples)
    by_prompt = {}
    for ex in forget:
        by_prompt.setdefault(prompt_key(ex.prompt), ex)
    result = []
    for ex in examples:
        match = by_prompt.get(prompt_key(ex.prompt))
        if match is None:
            result.append(ex)
            continue
        extra = {**match.extra, **ex.extra}
        result.append(replace(ex, response=ex.response if ex.response is not None else match.response, extra=extra))
    return result


def clip_references(examples: Sequence, tokenizer, max_new_tokens: int) -> list:
    """Examples whose response and `hallucinated_response` (the texts an output is compared with) are cut
    to their first MAX_NEW_TOKENS tokens (the generation budget).

    A continuation longer than the model is allowed to write could never be
    reproduced in full; comparing the output with the part of the reference it
    had room for is what makes a verbatim continuation read as leaked. Both
    references are cut alike, so neither wins `hallucination_flags` by its length.
    """
    def cut(text):  # None when TEXT fits: the example stays the very one given
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return None if len(ids) <= max_new_tokens else tokenizer.decode(ids[:max_new_tokens], skip_special_tokens=True)

    clipped = []
    for ex in examples:
        response = cut(ex.response) if ex.response is not None else None
        if response is not None:
            ex = replace(ex, response=response)
        hallucinated = cut(ex.extra["hallucinated_response"]) if ex.extra.get("hallucinated_response") else None
        if hallucinated is not None:
            ex = replace(ex, extra={**ex.extra, "hallucinated_response": hallucinated})
        clipped.append(ex)
    return clipped


# --- flag metrics ----------------------------------------------------------------------------


def leak_flags(outputs: Sequence[str], examples: Sequence) -> list[bool | None]:
    """Per row: does the output reproduce the row's reference response (`metrics.leaks`)?

    Rows with `answers`, given or derived from the response (`spans.row_answers`):
    an accepted answer appears in the output (`metrics.contains_answer`). Other rows: ROUGE-L recall >=
    metrics.LEAK_ROUGE_RECALL or BLEU >= metrics.LEAK_BLEU against the
    reference, or, for a passage, metrics.LEAK_VERBATIM_WORDS consecutive words of it.
    None for a row with no reference.
    """
    flags = []
    for output, ex in zip(outputs, examples):
        answers, _ = row_answers(ex)
        flags.append(None if ex.response is None and not answers
                     else metrics.leaks(output, ex.response or "", answers, passage=ex.is_passage))
    return flags


def accuracy_flags(outputs: Sequence[str], examples: Sequence) -> list[bool | None]:
    """Per row: an `answers` string appears in the output (`metrics.contains_answer`) and none of the row's
    `refusal_markers` does (a topic probe's: probes.keep_answered; optional on any row); None without answers."""
    return [
        (metrics.contains_answer(output, ex.extra["answers"])
         and not metrics.contains_refusal(output, ex.extra.get("refusal_markers") or ()))
        if ex.extra.get("answers") else None
        for output, ex in zip(outputs, examples)
    ]


def hallucination_flags(outputs: Sequence[str], examples: Sequence) -> list[bool | None]:
    """Per row: the output is closer (ROUGE-L F) to `hallucinated_response` than to the response.

    None for rows without both a response and a `hallucinated_response`.
    """
    return [
        metrics.is_hallucination(output, ex.response, ex.extra["hallucinated_response"])
        if ex.response is not None and ex.extra.get("hallucinated_response") else None
        for output, ex in zip(outputs, examples)
    ]


def rouge_recalls(outputs: Sequence[str], examples: Sequence) -> list[float | None]:
    """Per row: ROUGE-L recall of the output against the reference response (TOFU's "ROUGE"); None without one."""
    return [None if ex.response is None else metrics.rouge_l(o, ex.response).recall for o, ex in zip(outputs, examples)]


def answer_similarity(output: str, reference_output: str) -> float:
    """How much of the reference model's answer OUTPUT keeps: ROUGE-L F of OUTPUT against REFERENCE_OUTPUT
    (`metrics.rouge_l`, over `metrics.rouge_tokens`), except where neither has a ROUGE token: then 1.0 when
    they are the same text (whitespace runs aside; two empty answers are the same answer), else 0.0.
    One with no token against one with tokens is 0.0, as ROUGE-L F gives.

    ROUGE-L itself gives 0 whenever a side has no token, which is right for the leak judge (an empty
    answer reproduces nothing) but called a model that answers nothing where the original answered
    nothing a changed model: the original against itself read 0.00-0.88 on tiny models instead of 1.00.
    Two different token-less texts ("..." and "?!", or emoji only) are not called the same: ROUGE cannot
    compare them, so only their equality counts.
    """
    if not metrics.rouge_tokens(output) and not metrics.rouge_tokens(reference_output):
        return 1.0 if output.split() == reference_output.split() else 0.0
    return metrics.rouge_l(output, reference_output).fmeasure


def similarity_to_reference(outputs: Sequence[str], reference_outputs: Sequence[str]) -> float | None:
    """Mean `answer_similarity` of each output against the reference model's output for the same prompt:
    ROUGE-L F, and for a row where neither answer has a ROUGE token 1.0 if they are the same text, else 0.0.

    1.0 = the same words in the same order as the original model (utility kept);
    the paper uses BLEURT, this is the dependency-free stand-in. None for no rows.
    """
    return metrics.mean(answer_similarity(o, r) for o, r in zip(outputs, reference_outputs))


# --- model scores -----------------------------------------------------------------------------


# Pairs longer than this lose prompt tokens from the left when scored (`data.encode_pair`), or longer
# than the model's context where that is less (`score_max_length`).
SCORE_MAX_LENGTH = 1024


def scorer_max_length(scorer) -> int:
    """`score_max_length` of the model a scorer (or a `RememberedScorer` around one) scores with."""
    while scorer is not None and not hasattr(scorer, "model"):
        scorer = getattr(scorer, "scorer", None)
    return SCORE_MAX_LENGTH if scorer is None else score_max_length(scorer.model)


def score_max_length(model) -> int:
    """The longest pair `response_logprobs` scores on MODEL whole: SCORE_MAX_LENGTH, or the model's context
    where a learned position table makes it shorter (`generation.position_limit`: tests' tiny OPT has 512,
    GPT-2 1024); a longer pair was an IndexError in the forward pass. Rotary models keep SCORE_MAX_LENGTH."""
    from unlearn.generation import position_limit

    limit = position_limit(model)
    return SCORE_MAX_LENGTH if limit is None else min(SCORE_MAX_LENGTH, limit)


def response_logprobs(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                      max_length: int | None = None) -> list[list[float]]:
    """log p(y_t | x, y_<t) of every response token, per (prompt, response) pair.

    Pairs are rendered and masked exactly as in training (`data.encode_pair`:
    chat template, response tokens only, end-of-turn marker included), cut to MAX_LENGTH tokens
    (default and at most `score_max_length(model)`), sorted by length into right-padded batches,
    and returned in the caller's order.
    """
    from unlearn.data import encode_pair

    cap = score_max_length(model)
    max_length = cap if max_length is None else min(max_length, cap)
    return labelled_logprobs(model, tokenizer, [encode_pair(tokenizer, p, r, max_length) for p, r in pairs],
                             batch_size=batch_size)


def labelled_logprobs(model, tokenizer, features: Sequence[dict], *, batch_size: int = 16) -> list[list[float]]:
    """log p of every labelled token of FEATURES (`data.encode_pair` rows: all response tokens, or a
    forget row's answer tokens), per row, in position order; `response_logprobs`' batching."""
    import torch

    from unlearn.data import collate
    from unlearn.losses import token_logprobs
    from unlearn.kv_cache import cache_argument, evaluating, new_cache, prefix_applies, run_prefix, shared_length
    from unlearn.train import first_scored_position, forward_logits

    prefix_ok = prefix_applies(model)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    result: list[list[float]] = [[] for _ in features]
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([features[i] for i in chunk], tokenizer.pad_token_id)
        labels = batch["labels"].to(device)
        # Logits from the first response position on: the prompt's would only be masked out
        # (the vocabulary projection is a fifth of the embedded model's forward).
        start = first_scored_position(labels)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        with torch.no_grad(), evaluating(model):
            rows = [features[i]["input_ids"] for i in chunk]
            shared = shared_length(rows, start) if prefix_ok and len(rows) > 1 else 0
            if shared:  # the prompt prefix the batch shares runs once (kv_cache.py)
                cache = new_cache(model)
                run_prefix(model, cache, rows[0][:shared], len(rows))
                width = inputs["input_ids"].shape[1]
                logits = model(input_ids=inputs["input_ids"][:, shared:], attention_mask=inputs["attention_mask"],
                               position_ids=torch.arange(shared, width, device=device)[None].expand(len(rows), -1),
                               logits_to_keep=torch.arange(start - shared, width - shared, device=device),
                               use_cache=True, **{cache_argument(model): cache}).logits
            else:
                logits = forward_logits(model, inputs, start)
            picked, mask = token_logprobs(logits, labels[:, start:])
        for row, i in enumerate(chunk):
            result[i] = picked[row][mask[row]].tolist()
    return result


def _nll(logprobs: Sequence[float]) -> float:
    return -sum(logprobs)


def mia_aucs(member_logprobs: Sequence[Sequence[float]], holdout_logprobs: Sequence[Sequence[float]],
             k_percent: float = metrics.MIN_K_PERCENT) -> tuple[float | None, float | None]:
    """Membership-inference AUCs (forget rows = positives, holdout rows = negatives).

    Loss attack: score = −(mean NLL of the response tokens); min-k% attack:
    score = `metrics.min_k_logprob` (mean of the k% lowest token log-probs).
    Both higher for text the model has memorised. AUC (Mann-Whitney) near 0.5:
    the forget rows look like unseen text; near 1: still memorised; well below
    0.5: the forget rows are now *less* likely than unseen text, which itself
    gives the unlearning away.
    """
    def loss_score(lp):
        return -_nll(lp) / len(lp) if lp else None

    def keep(values):
        return [v for v in values if v is not None]

    loss_auc = metrics.auc(keep(map(loss_score, member_logprobs)), keep(map(loss_score, holdout_logprobs)))
    mink = [keep(metrics.min_k_logprob(lp, k_percent) for lp in side) for side in (member_logprobs, holdout_logprobs)]
    return loss_auc, metrics.auc(*mink)


def reward_scores(reward_model: SequenceClassifier, prompts: Sequence[str], outputs: Sequence[str],
                  batch_size: int = 16) -> list[float]:
    """Reward = the single logit of a one-output sequence classifier on the (prompt, output) text pair."""
    logits = reward_model.logits(list(prompts), list(outputs), batch_size)
    if logits.shape[-1] != 1:
        raise UnlearnError(f"--reward-model {reward_model.path}: expected one output (num_labels=1), "
                           f"got {logits.shape[-1]}")
    return logits[:, 0].tolist()


def load_reward_model(path) -> SequenceClassifier:
    """A --reward-model directory, checked and loaded now (config.json, num_labels 1, a trained head), before
    any other model loads."""
    reward = SequenceClassifier(path, "--reward-model")
    labels = reward.config.get("num_labels") or len(_id2label(reward.config, path, "--reward-model"))
    if labels != 1:
        raise UsageError(f"--reward-model {path}: expected a one-output reward model (num_labels=1), got {labels}")
    reward.load()
    return reward


# --- one evaluation ----------------------------------------------------------------------------


@dataclass
class Scorer:
    """A model that scores likelihoods: the evaluated one, or the reference model for fluency."""

    model: object
    tokenizer: object
    batch_size: int = 16

    def logprobs(self, pairs):
        return response_logprobs(self.model, self.tokenizer, pairs, batch_size=self.batch_size)


@dataclass
class Evaluation:
    """The summary (keys of METRIC_KEYS plus n and judge) and one record per row."""

    summary: dict
    rows: list = field(default_factory=list)


class RememberedScorer:
    """SCORER with the log-probabilities of PAIRS computed ahead, in one call: `Measurer.measure` scores
    every set's pairs together (fuller batches, side by side on the threads: 12 -> 10 s on the README
    sets' 91 reference pairs) and each set's metrics then read them; other pairs go to SCORER."""

    def __init__(self, scorer: Scorer, pairs: Sequence[tuple[str, str]], contexts: dict | None = None):
        """CONTEXTS: `measure.ShardedScorer.logprobs`' (kept caches of the scoring model's own answers)."""
        self.scorer, self.tokenizer = scorer, scorer.tokenizer
        unique = list(dict.fromkeys(pairs))
        scored = scorer.logprobs(unique, contexts) if contexts else scorer.logprobs(unique) if unique else []
        self.known = dict(zip(unique, scored))

    def logprobs(self, pairs):
        pairs = list(pairs)
        missing = list(dict.fromkeys(p for p in pairs if p not in self.known))
        if missing:
            self.known.update(zip(missing, self.scorer.logprobs(missing)))
        return [self.known[p] for p in pairs]


# `likelihood_pairs`' slot kinds whose row indexes EXAMPLES (a row's response, paraphrased or perturbed
# responses); "member" and "holdout" index the membership-inference rows.
ROW_PAIR_KINDS = ("ref", "para", "pert")


def likelihood_pairs(examples: Sequence, members: Sequence, holdout: Sequence | None) -> tuple[list, list]:
    """The (prompt, response) pairs `_likelihood_scores` scores, and each one's (kind, row) slot."""
    pairs, slots = [], []

    def add(prompt, response, slot):
        pairs.append((prompt, response))
        slots.append(slot)

    for i, ex in enumerate(examples):
        if ex.response is not None:
            add(ex.prompt, ex.response, ("ref", i))
        # (a row with perturbed answers and no paraphrase has its response as one: data._ours)
        para, perturbed = ex.extra.get("paraphrased_response"), ex.extra.get("perturbed_responses")
        if para and perturbed:
            add(ex.prompt, para, ("para", i))
            for p in perturbed:
                add(ex.prompt, p, ("pert", i))
    if holdout:
        for j, ex in enumerate(members):
            add(ex.prompt, ex.response, ("member", j))
        for j, ex in enumerate(holdout):
            add(ex.prompt, ex.response, ("holdout", j))
    return pairs, slots


def _likelihood_scores(scorer: Scorer, examples: Sequence, members: Sequence, holdout: Sequence | None,
                       k_percent: float) -> dict:
    """probability, truth ratio and membership-inference AUCs under the evaluated model, in one scoring pass."""
    pairs, slots = likelihood_pairs(examples, members, holdout)
    scored = scorer.logprobs(pairs) if pairs else []
    by_kind: dict = {}
    for (kind, i), lp in zip(slots, scored):
        by_kind.setdefault(kind, {}).setdefault(i, []).append(lp)
    prob = {i: metrics.normalized_probability(v[0]) for i, v in by_kind.get("ref", {}).items()}
    ratios = {}
    for i, para in by_kind.get("para", {}).items():
        pert = [metrics.normalized_probability(lp) for lp in by_kind["pert"][i]]
        ratios[i] = metrics.truth_ratio([p for p in pert if p is not None], metrics.normalized_probability(para[0]))
    loss_auc = mink_auc = None
    if holdout:
        member_lp = [v[0] for _, v in sorted(by_kind.get("member", {}).items())]
        holdout_lp = [v[0] for _, v in sorted(by_kind.get("holdout", {}).items())]
        loss_auc, mink_auc = mia_aucs(member_lp, holdout_lp, k_percent)
    return {"probability": prob, "truth_ratio": ratios, "mia_loss_auc": loss_auc, "mia_min_k_auc": mink_auc}


def own_logprobs(tokenizer, prompt: str, output: str, own, max_length: int = SCORE_MAX_LENGTH) -> list[float] | None:
    """The log-probabilities `response_logprobs` would compute for (PROMPT, OUTPUT), taken from OWN
    (a `generation.Scored`: the answer's generation by the scoring model itself), or None.

    Exact in what is scored: only when the pair `response_logprobs` encodes is the prompt its
    generation saw (`encode_prompt`, as `encode_pair` encodes it, uncut: shorter than
    MAX_LENGTH, the scorer's `score_max_length`: a model with a shorter position table cuts a pair that
    generation, stopping at that table's end, did not) followed by the generated tokens (the end-of-turn marker included:
    generated, or the stop token `Scored.end` has after a budget cut), or by their first tokens (an answer cut at
    the fallback format's next turn, `data.answer_in_format`; in that format no end token is scored). An answer whose text
    tokenises otherwise, or whose pair could be truncated, returns None and is scored by a
    forward pass.
    The numbers differ from that pass's only by float rounding (a decoding step's matmuls have
    other shapes than a whole sequence's).
    """
    from unlearn.data import IGNORE_INDEX, encode_pair

    if own is None:
        return None
    pair = encode_pair(tokenizer, prompt, output, max_length)
    if len(pair["input_ids"]) >= max_length:  # a cut pair lost prompt tokens: not what generation saw
        return None
    scored = [t for t, label in zip(pair["input_ids"], pair["labels"]) if label != IGNORE_INDEX]
    if scored and scored == own.ids[:len(scored)]:  # the whole answer, or the tokens before what it did not keep:
        return list(own.logprobs[:len(scored)])  # the fallback format's next turn, or a stop token no turn ends with
    if own.end and scored[:-1] == own.ids and scored[-1] in own.end:
        return [*own.logprobs, own.end[scored[-1]]]
    return None


def _fluency_plan(examples, outputs, tokenizer, own_scores, scored: bool, max_length: int = SCORE_MAX_LENGTH):
    """Per output its diversity and whether it is degenerate; the rows whose fluency counts (KEPT: not
    degenerate, when SCORED); of those, the log-probabilities OWN_SCORES give (KNOWN, row -> list) and the
    rows left for a forward pass (TODO)."""
    token_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in outputs]
    div = [metrics.diversity(ids) for ids in token_ids]
    degenerate = [metrics.is_degenerate(ids) for ids in token_ids]
    kept = [i for i, bad in enumerate(degenerate) if not bad] if scored else []
    known = {}
    for i in kept if own_scores is not None else ():
        lp = own_logprobs(tokenizer, examples[i].prompt, outputs[i], own_scores[i], max_length)
        if lp is not None:
            known[i] = lp
    return div, degenerate, kept, known, [i for i in kept if i not in known]


def fluency_pairs(examples, outputs, tokenizer, own_scores=None, contexts: dict | None = None,
                  max_length: int = SCORE_MAX_LENGTH) -> list[tuple[str, str]]:
    """The (prompt, output) pairs `_fluency` sends to its scorer. CONTEXTS, a dict, receives pair -> the
    scorer's own answer to that prompt (OWN_SCORES') where generation kept its keys and values
    (continued_scoring.py)."""
    todo = _fluency_plan(examples, outputs, tokenizer, own_scores, scored=True, max_length=max_length)[-1]
    pairs = [(examples[i].prompt, outputs[i]) for i in todo]
    if contexts is not None and own_scores is not None:
        contexts.update((pair, own_scores[i]) for pair, i in zip(pairs, todo)
                        if own_scores[i] is not None and own_scores[i].kv is not None)
    return pairs


def _fluency(fluency_scorer: Scorer, examples, outputs, tokenizer, own_scores=None) -> tuple[list, list, list, list]:
    """Per row: diversity, degenerate?, NLL sum and token count of the output under FLUENCY_SCORER (if any).

    OWN_SCORES: per output, its `generation.Scored` when FLUENCY_SCORER's model generated it (the
    original model's own answers): those rows take their log-probabilities from generation
    (`own_logprobs`) instead of a second forward pass over prompt and answer.
    """
    div, degenerate, kept, known, todo = _fluency_plan(examples, outputs, tokenizer, own_scores,
                                                       scored=fluency_scorer is not None,
                                                       max_length=scorer_max_length(fluency_scorer))
    scored = fluency_scorer.logprobs([(examples[i].prompt, outputs[i]) for i in todo]) if todo else []
    known.update(zip(todo, scored))
    nll, count = [None] * len(outputs), [0] * len(outputs)
    for i in kept:
        nll[i], count[i] = _nll(known[i]), len(known[i])
    return div, degenerate, nll, count


def evaluate_outputs(outputs: Sequence[str], examples: Sequence, *, judge, scorer: Scorer | None,
                     fluency_scorer: Scorer | None = None, reference_outputs: Sequence[str] | None = None,
                     members: Sequence = (), holdout: Sequence | None = None, reward_model=None,
                     k_percent: float = metrics.MIN_K_PERCENT, tokenizer=None, own_scores=None) -> Evaluation:
    """All metrics of one model's OUTPUTS on EXAMPLES (references already attached and clipped).

    SCORER is the evaluated model (probability, truth ratio, membership
    inference); FLUENCY_SCORER the model whose perplexity measures fluency (the
    reference model when there is one, else SCORER); REFERENCE_OUTPUTS the
    reference model's outputs for `similarity_to_reference`. Without SCORER
    (a quick measurement: the stop rule, α grids) the scores that need forward
    passes are None, and TOKENIZER counts the outputs' tokens.
    """
    tokenizer = tokenizer or scorer.tokenizer
    fluency_scorer = (fluency_scorer or scorer) if scorer is not None else None
    flags = {
        "harmful": judge.flags(outputs, examples),
        "leak": leak_flags(outputs, examples),
        "hallucination": hallucination_flags(outputs, examples),
        "correct": accuracy_flags(outputs, examples),
    }
    recall = rouge_recalls(outputs, examples)
    div, degenerate, nll, count = _fluency(fluency_scorer, examples, outputs, tokenizer, own_scores)
    likely = (_likelihood_scores(scorer, examples, members, holdout, k_percent) if scorer is not None
              else {"probability": {}, "truth_ratio": {}, "mia_loss_auc": None, "mia_min_k_auc": None})
    rewards = reward_scores(reward_model, [e.prompt for e in examples], outputs) if reward_model else None
    sims = ([answer_similarity(o, r) for o, r in zip(outputs, reference_outputs)]
            if reference_outputs is not None else None)
    rows = []
    for i, (output, ex) in enumerate(zip(outputs, examples)):
        scores = {key: value[i] for key, value in flags.items()}
        scores.update(rouge_l_recall=recall[i], diversity=div[i], degenerate=degenerate[i],
                      perplexity=metrics.perplexity(nll[i], count[i]) if nll[i] is not None else None,
                      probability=likely["probability"].get(i), truth_ratio=likely["truth_ratio"].get(i))
        if sims is not None:
            scores["similarity_to_reference"] = sims[i]
        if rewards is not None:
            scores["reward"] = rewards[i]
        answers, source = row_answers(ex)  # what the leak judge looked for, for the user to check
        rows.append({"prompt": ex.prompt, "output": output, "reference": ex.response, "answers": answers,
                     "answers_source": source, "scores": scores})
    summary = {
        "n": len(outputs),
        "judge": judge.name,
        "harmful_rate": rate(flags["harmful"]),
        "leak_rate": rate(flags["leak"]),
        "hallucination_rate": rate(flags["hallucination"]),
        "accuracy": rate(flags["correct"]),
        # the rows that accuracy is a share of (those with `answers`): what pools it over sets (averaging.score)
        "accuracy_rows": sum(flag is not None for flag in flags["correct"]),
        "diversity": metrics.mean(div),
        "fluency_ppl": (metrics.fluency([x or 0.0 for x in nll], count, degenerate)
                        if fluency_scorer is not None else None),
        # similarity_to_reference(outputs, reference_outputs), from the rows' values
        "similarity_to_reference": metrics.mean(sims) if sims is not None else None,
        "reward": metrics.mean(rewards) if rewards is not None else None,
        "probability": metrics.mean(likely["probability"].values()),
        "truth_ratio": metrics.mean(likely["truth_ratio"].values()),
        "rouge_l_recall": metrics.mean(recall),
        "mia_loss_auc": likely["mia_loss_auc"],
        "mia_min_k_auc": likely["mia_min_k_auc"],
    }
    return Evaluation(summary, rows)


# --- the whole `unlearn eval` ---------------------------------------------------------------------


def run_eval(opts, log: Callable[[str], None] = default_log) -> dict:
    """Read data, load models, generate, score (`config.EvalOptions`). Returns {"summary", "before", "rows", ...}.

    Every file and the judge are checked before any model loads. The members
    for membership inference are the --forget rows when given, else the
    PROMPTS rows that carry a response.
    """
    import time

    from unlearn.data import fallback_note, read_examples, render_prompt
    from unlearn.generation import check_sets_fit
    from unlearn.measure import EvalSet, Measurer, Settings
    from unlearn.measure_cache import weights_fingerprint
    from unlearn.models import load_model

    opts.validate()
    start = time.perf_counter()
    examples = read_examples(opts.prompts, need_response=False)
    forget = read_examples(opts.forget) if opts.forget else None
    holdout = read_examples(opts.holdout) if opts.holdout else None
    judge = make_judge(opts.judge, opts.judge_label)
    reward = load_reward_model(opts.reward_model) if opts.reward_model else None
    examples = attach_references(examples, forget)
    members = forget if forget else [ex for ex in examples if ex.response is not None]

    trusted = dict(trust_remote_code=opts.trust_remote_code, allow_pickle=opts.allow_pickle)
    loaded = load_model(opts.model, dtype=opts.dtype, log=log, **trusted)
    reference = load_model(opts.reference_model, dtype=opts.dtype, log=log, **trusted) if opts.reference_model else None
    settings = Settings(max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size, do_sample=opts.do_sample,
                        temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed, min_k=opts.min_k,
                        members=members, holdout=holdout, reward_model=reward)
    prompts = EvalSet(Path(opts.prompts).stem, "forget", examples, Path(opts.prompts))
    # A prompt that with its answer would pass the model's context is refused with its FILE:LINE before anything
    # is generated, instead of an IndexError from inside the forward pass (a learned position table, OPT's) or a
    # failed allocation (far past a rotary model's context: `generation.context_limit`).
    for lm, flag in ((loaded, "--model"), (reference, "--reference-model")):
        if lm is not None:
            check_sets_fit(lm.model, lm.tokenizer, [prompts], opts.max_new_tokens, "--max-new-tokens",
                           whose=f"{flag} {lm.name}")
    # Once nothing is left to refuse (a refusal stays the one line on stderr): the rows left without a reference
    for note in (unreferenced_note(examples, opts.prompts, forget_given=bool(forget)),
                 fallback_note(loaded.tokenizer, examples)):
        if note:
            log(note)
    # Answers and scores of weights already measured with the same rows and settings are read back
    # from the cache (measure_cache.py); the evaluated model's fluency is scored by the reference.
    fingerprint = (lambda lm: None) if opts.no_cache else (
        lambda lm: f"{weights_fingerprint(lm.path)}|{opts.dtype}|{next(lm.model.parameters()).device.type}")
    ref_measurer = (Measurer(reference.model, reference.tokenizer, settings, judge=judge,
                             fingerprint=fingerprint(reference), own_fluency=True) if reference else None)
    own = fingerprint(loaded)
    measurer = Measurer(loaded.model, loaded.tokenizer, settings, judge=judge, own_fluency=not reference,
                        fluency_scorer=ref_measurer.scorer if reference else None,
                        fingerprint=own and f"{own}|fluency:{ref_measurer.fingerprint if reference else 'own'}")
    # The reference's similarity_to_reference stays None: the reference against itself says nothing.
    before = ref_measurer.measure_set(prompts, label="generating (reference)") if reference else None
    after = measurer.measure_set(prompts, before.outputs if before else None, label="generating (model)")
    gen_seconds = measurer.generation_seconds  # the answering only: the set's scoring is not generation
    outputs = after.outputs
    if before is not None:
        for row, ref_row in zip(after.rows, before.rows):
            row["before"] = {"output": ref_row["output"], "scores": ref_row["scores"]}
    new_tokens = sum(len(loaded.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
    return {
        "summary": after.summary,
        "before": before.summary if before else None,
        "rows": after.rows,
        "model": loaded.name,
        "reference_model": reference.name if reference else None,
        "fluency_model": (reference or loaded).name,
        "seconds": time.perf_counter() - start,
        "device": str(next(loaded.model.parameters()).device),
        "prompt_format": render_prompt(loaded.tokenizer, "{prompt}"),  # the chat template, or data.FALLBACK_PROMPT
        # None when the answers were read back from the cache (nothing was generated).
        "generation_tokens_per_second": new_tokens / gen_seconds if gen_seconds > 0 and not measurer.reused else None,
        "reused": {"model": bool(measurer.reused), "reference": bool(ref_measurer and ref_measurer.reused)},
    }
