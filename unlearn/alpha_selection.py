"""Choosing ULMR's averaging weight α: a trade-off table and a rule.

θa = α·θ + (1−α)·θ' (θ the original model, θ' the fine-tuned one): α = 1 is the
original (nothing forgotten, nothing lost), α = 0 the fine-tuned model (most
forgotten, most drift). For each candidate α the averaged model answers the
forget prompts and the retain prompts, and three numbers are computed:

    forget_leak        share of forget prompts whose output leaks the forget answer
                       (`evaluate.leak_flags`), pooled over every forget set: the
                       sets' leak rates averaged with their row counts as weights;
    retain_accuracy    the same pooled mean of the retain sets' accuracy (an `answers`
                       string appears in the output); None when no retain row has answers;
    retain_similarity  the same pooled mean of ROUGE-L F between the output and the
                       original model's output for the same retain prompt.

The rule (`recommend`): among the α whose forget_leak is at most MAX_LEAK, take the
one that keeps the most (retain score = mean of retain_accuracy and
retain_similarity, whichever exist); ties go to the larger α (closer to the
original). If no α reaches MAX_LEAK, take the lowest leak (ties: best retain score),
and say that the target was missed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from unlearn.errors import UsageError

DEFAULT_MAX_LEAK = 0.1
# `unlearn run --alpha auto` tries these; 0 (the fine-tuned model itself) is the fallback
# when no averaged model forgets enough.
AUTO_GRID = (0.0, 0.2, 0.4, 0.6, 0.8)
TABLE_FILES = ("alphas.json", "alphas.md", "alphas.png")


def parse_alphas(text: str, *, allow_auto: bool = False, allow_extrapolation: bool = False) -> list[float] | str:
    """'0.5' -> [0.5]; '0.2,0.4' -> [0.2, 0.4]; 'auto' (where allowed) -> 'auto'. Each α is checked."""
    from unlearn.averaging import check_alpha

    text = text.strip()
    if allow_auto and text.lower() == "auto":
        return "auto"
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise UsageError(f"--alpha {text}: {part.strip()!r} is not a number"
                             + (" (or give auto)" if allow_auto else "")) from None
        if not math.isfinite(value):
            raise UsageError(f"--alpha {text}: {part.strip()!r} is not a finite number")
        check_alpha(value, allow_extrapolation)
        values.append(value)
    if len(set(values)) != len(values):
        raise UsageError(f"--alpha {text}: an α is listed twice")
    return values


@dataclass
class AlphaScore:
    alpha: float
    forget_leak: float | None
    retain_accuracy: float | None
    retain_similarity: float | None

    @property
    def retain_score(self) -> float | None:
        kept = [v for v in (self.retain_accuracy, self.retain_similarity) if v is not None]
        return sum(kept) / len(kept) if kept else None


def _pooled(pairs: list[tuple[int, float | None]]) -> float | None:
    """Mean of per-set values weighted by the sets' row counts; None when no set has a value."""
    pairs = [(n, v) for n, v in pairs if v is not None and n > 0]
    total = sum(n for n, _ in pairs)
    return sum(n * v for n, v in pairs) / total if total else None


def score(alpha: float, summaries: dict[str, dict], kinds: dict[str, str]) -> AlphaScore:
    """One α's row of the table from per-set summaries (n, leak_rate, accuracy, similarity_to_reference)."""
    forget = [s for name, s in summaries.items() if kinds[name] == "forget"]
    retain = [s for name, s in summaries.items() if kinds[name] == "retain"]
    return AlphaScore(
        alpha=alpha,
        forget_leak=_pooled([(s["n"], s.get("leak_rate")) for s in forget]),
        retain_accuracy=_pooled([(s["n"], s.get("accuracy")) for s in retain]),
        retain_similarity=_pooled([(s["n"], s.get("similarity_to_reference")) for s in retain]),
    )


def recommend(scores: list[AlphaScore], max_leak: float = DEFAULT_MAX_LEAK) -> tuple[float, str]:
    """The α to use and, in one sentence, why (the rule is in the module docstring)."""
    if not scores:
        raise ValueError("no α was evaluated")
    if any(s.forget_leak is None for s in scores):
        raise UsageError("choosing α needs forget prompts with a response or `answers` to measure leaks against")
    retain = lambda s: s.retain_score if s.retain_score is not None else 0.0  # noqa: E731
    passing = [s for s in scores if s.forget_leak <= max_leak]
    if passing:
        best = max(passing, key=lambda s: (retain(s), s.alpha))
        why = (f"α={best.alpha:g}: of the α with forget leak ≤ {max_leak:g} "
               f"({', '.join(f'{s.alpha:g}' for s in passing)}), it keeps the most")
    else:
        best = min(scores, key=lambda s: (s.forget_leak, -retain(s), -s.alpha))
        why = (f"α={best.alpha:g}: no α reached forget leak ≤ {max_leak:g}; this one leaks least")
    details = [f"forget leak {best.forget_leak:.2f}"]
    if best.retain_accuracy is not None:
        details.append(f"retained accuracy {best.retain_accuracy:.2f}")
    if best.retain_similarity is not None:
        details.append(f"similarity to the original {best.retain_similarity:.2f}")
    return best.alpha, f"{why} ({', '.join(details)})"


def _cell(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def table_markdown(scores: list[AlphaScore], chosen: float | None = None, reason: str | None = None,
                   base: AlphaScore | None = None) -> str:
    """The trade-off table (one row per α; the original model as α = 1 when BASE is given)."""
    lines = ["| α | forget leak | retained accuracy | similarity to original | |", "|---|---|---|---|---|"]
    rows = sorted(scores + ([base] if base else []), key=lambda s: s.alpha)
    for s in rows:
        mark = "original" if base is not None and s is base else ("**recommended**" if s.alpha == chosen else "")
        lines.append(f"| {s.alpha:g} | {_cell(s.forget_leak)} | {_cell(s.retain_accuracy)} | "
                     f"{_cell(s.retain_similarity)} | {mark} |")
    if reason:
        lines += ["", f"Recommended: {reason}."]
    return "\n".join(lines) + "\n"


def report(scores: list[AlphaScore], chosen: float, reason: str, max_leak: float,
           base: AlphaScore | None = None, extra: dict | None = None) -> dict:
    """The JSON form of the table."""
    def row(s):
        return {**asdict(s), "retain_score": s.retain_score}

    return {"formula": "alpha*base + (1-alpha)*tuned", "max_leak": max_leak, "recommended_alpha": chosen,
            "reason": reason, "alphas": [row(s) for s in sorted(scores, key=lambda s: s.alpha)],
            "original": row(base) if base else None, **(extra or {})}


def _scores_of(result: dict) -> tuple[list[AlphaScore], AlphaScore | None]:
    """The AlphaScores (and the original's) back from the JSON form that `report` made."""
    def one(row):
        return AlphaScore(row["alpha"], row["forget_leak"], row["retain_accuracy"], row["retain_similarity"])

    return [one(r) for r in result["alphas"]], (one(result["original"]) if result.get("original") else None)


def write_tables(directory: Path, result: dict, log=None) -> list[str]:
    """alphas.json, alphas.md and, when matplotlib is installed, alphas.png into DIRECTORY, from RESULT (`report`)."""
    directory = Path(directory)
    scores, base = _scores_of(result)
    (directory / "alphas.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = "# α selection\n\n" + table_markdown(scores, result["recommended_alpha"], result["reason"], base)
    (directory / "alphas.md").write_text(markdown)
    written = ["alphas.json", "alphas.md"]
    if plot(directory / "alphas.png", scores, result["recommended_alpha"], result["max_leak"], base):
        written.append("alphas.png")
    elif log:
        log("unlearn: no plot: matplotlib is not installed (pip install 'unlearn[plot]', or pip install matplotlib)")
    return written


def plot(path: Path, scores: list[AlphaScore], chosen: float, max_leak: float, base: AlphaScore | None) -> bool:
    """Forget leak and retain numbers against α, as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = sorted(scores + ([base] if base else []), key=lambda s: s.alpha)
    alphas = [s.alpha for s in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values, style in (("forget leak", [s.forget_leak for s in rows], "o-"),
                                 ("retained accuracy", [s.retain_accuracy for s in rows], "s-"),
                                 ("similarity to original", [s.retain_similarity for s in rows], "^-")):
        if any(v is not None for v in values):
            ax.plot(alphas, [math.nan if v is None else v for v in values], style, label=label)
    ax.axhline(max_leak, color="grey", linestyle=":", linewidth=1, label=f"leak target {max_leak:g}")
    ax.axvline(chosen, color="black", linestyle="--", linewidth=1, label=f"recommended α={chosen:g}")
    ax.set_xlabel("α (weight of the original model)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("θa = α·θ + (1−α)·θ'")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------
# `unlearn merge --alpha A,B,... --eval-forget F --eval-retain R`: one model per α, measured


@dataclass
class EvalSet:
    name: str
    kind: str  # "forget": its answers must not come out; "retain": knowledge that must survive
    examples: list


def read_eval_sets(forget_paths, retain_paths) -> list[EvalSet]:
    """The --eval-forget / --eval-retain files; a forget row needs a response or `answers` to leak."""
    from unlearn.data import read_examples
    from unlearn.errors import UnlearnError

    sets, seen = [], set()
    for kind, paths in (("forget", forget_paths), ("retain", retain_paths)):
        for path in paths:
            examples = read_examples(path, need_response=False)
            if not examples:
                raise UnlearnError(f"{path}: no rows")
            for ex in examples:
                if kind == "forget" and ex.response is None and not ex.extra.get("answers"):
                    raise UnlearnError(f"{path}:{ex.line}: a forget row needs a response or `answers` "
                                       f"to measure leaks against")
            name = Path(path).stem
            while name in seen:
                name += "'"
            seen.add(name)
            sets.append(EvalSet(name, kind, examples))
    return sets


def measure(model, tokenizer, sets: list[EvalSet], base_outputs: dict | None, *, max_new_tokens: int,
            batch_size: int) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Per set: n, leak_rate (forget sets), accuracy, similarity_to_reference (retain sets, with BASE_OUTPUTS)."""
    from unlearn.evaluate import accuracy_flags, clip_references, leak_flags, rate, similarity_to_reference
    from unlearn.generation import generate

    summaries, outputs = {}, {}
    for s in sets:
        outputs[s.name] = generate(model, tokenizer, [e.prompt for e in s.examples], batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, desc=False)
        summary = {"n": len(s.examples), "accuracy": rate(accuracy_flags(outputs[s.name], s.examples))}
        if s.kind == "forget":
            references = clip_references(s.examples, tokenizer, max_new_tokens)
            summary["leak_rate"] = rate(leak_flags(outputs[s.name], references))
        elif base_outputs is not None:
            summary["similarity_to_reference"] = similarity_to_reference(outputs[s.name], base_outputs[s.name])
        summaries[s.name] = summary
    return summaries, outputs


def sweep(base: str, tuned: str | None, adapter: str | None, alphas: list[float], out: Path, sets: list[EvalSet],
          *, max_leak: float = DEFAULT_MAX_LEAK, force: bool = False, max_new_tokens: int = 48,
          batch_size: int = 16, max_shard_size: int | None = None, allow_extrapolation: bool = False,
          log=None) -> dict:
    """Write OUT/alpha-A for each α and, with eval sets, measure each and write the trade-off table.

    The original model is measured first (its outputs are what similarity compares with,
    and it is the α = 1 row). Everything goes into a temporary directory that becomes OUT
    only when complete.
    """
    import gc
    import time

    from unlearn import averaging, models
    from unlearn.outputs import atomic_output_dir, check_output_dir

    started = time.perf_counter()
    out = Path(out)
    check_output_dir(out, force)
    kinds = {s.name: s.kind for s in sets}
    say = log or (lambda message: None)

    def load(path):
        loaded = models.load_model(str(path), log=say)
        return loaded.model, loaded.tokenizer

    scores, per_alpha, base_score, base_outputs = [], {}, None, None
    with atomic_output_dir(out, force) as tmp:
        if sets:
            model, tokenizer = load(base)
            say("α selection: measuring the original model")
            summaries, base_outputs = measure(model, tokenizer, sets, None, max_new_tokens=max_new_tokens,
                                              batch_size=batch_size)
            for s in sets:  # the original against itself: similarity 1 by definition, computed all the same
                if s.kind == "retain":
                    summaries[s.name]["similarity_to_reference"] = 1.0
            base_score = score(1.0, summaries, kinds)
            del model
            gc.collect()
        for alpha in alphas:
            target = tmp / f"alpha-{alpha:g}"
            say(f"α selection: writing and measuring α={alpha:g}")
            common = dict(max_shard_size=max_shard_size, allow_extrapolation=allow_extrapolation)
            if adapter:
                averaging.fold_lora(Path(base), Path(adapter), target, alpha=alpha, **common)
            else:
                averaging.average(Path(base), Path(tuned), target, alpha, **common)
            if not sets:
                continue
            model, tokenizer = load(target)
            summaries, _ = measure(model, tokenizer, sets, base_outputs, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size)
            del model
            gc.collect()
            per_alpha[alpha] = summaries
            scores.append(score(alpha, summaries, kinds))
        result = {"output": str(out.resolve()), "models": {f"{a:g}": str((out / f"alpha-{a:g}").resolve())
                                                           for a in alphas}}
        if sets:
            chosen, reason = recommend(scores, max_leak)
            result.update(report(scores, chosen, reason, max_leak, base_score,
                                 {"sets": per_alpha, "base": base, "tuned": tuned, "adapter": adapter,
                                  "max_new_tokens": max_new_tokens}))
            result["files"] = write_tables(tmp, result, log=log)
            result["table"] = table_markdown(scores, chosen, reason, base_score)
        result["seconds"] = round(time.perf_counter() - started, 3)
    return result
