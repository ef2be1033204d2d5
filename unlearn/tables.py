"""Every table and report the tool prints or writes: the run's before/after table, the α
trade-off table (markdown, JSON, plot) and `unlearn eval`'s table and markdown report.

Numbers come in already computed (their definitions are where they are computed:
`evaluate`, `averaging.score`); this module only lays them out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from unlearn import metrics
from unlearn.averaging import AlphaScore, alpha_label
from unlearn.evaluate import METRIC_KEYS


def cell(value, digits: int = 2) -> str:
    """One table cell: "-" for a missing value, text as it is, numbers to DIGITS decimals."""
    if value is None:
        return "-"
    if isinstance(value, (str, bool, int)) or not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def aligned(rows: list[list[str]]) -> list[str]:
    """Plain-text rows with every column padded to its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


# --- unlearn run ------------------------------------------------------------------------------


RUN_COLUMNS = (("harmful_rate", "harmful"), ("leak_rate", "leak"), ("accuracy", "accuracy"),
               ("similarity_to_reference", "similarity"), ("fluency_ppl", "fluency ppl"))


def format_run(record: dict) -> str:
    """The before -> after table of a run, then where things were written and what it cost."""
    header = ["set", "rows", "n"] + [label for _, label in RUN_COLUMNS]
    rows = []
    roles = record.get("roles", {})
    for name, before in record["before"].items():
        after = record["after"][name]
        rows.append([name, roles.get(name, "held out"), str(after["n"])] + [
            "-" if before.get(key) is None and after.get(key) is None
            else f"{cell(before.get(key))} -> {cell(after.get(key))}" for key, _ in RUN_COLUMNS])
    lines = aligned([header] + rows)
    lines += [
        "",
        "rows: \"trained\" sets were trained on (\"K of N trained\": K of their rows); \"held out\" never were, "
        "and are the result. "
        "\"stop rule\": the stop rule read this set at its checks, to end the run once its leak reaches --stop-leak "
        "(a probe set: once the probes' accuracy reaches --stop-probes; see \"stopped\" below for what ended it), "
        "so that figure is a stop condition, not a result; \"α choice\": "
        "--alpha auto chose α on these sets' figures.",
        f"harmful column, judge: {record['judge']}; similarity column: ROUGE-L F against the original model's "
        f"outputs; fluency ppl: perplexity of the outputs under the original model (lower is more fluent; NM: "
        f"most outputs degenerate), so forgotten answers should be wrong or refused in fluent text, not garbage",
        *_probe_lines(record),
        f"steps: {record['steps']} (stopped: {record['stopped_by']}{_repair_note(record)}{_extra_note(record)}); "
        f"method: {record['method']}"
        + (f" ({record['method_reason']})" if record.get("method_reason") else ""),
        *_ulmr_lines(record),
        f"wall clock: {record['wall_clock_s']:.1f} s ({_wall_clock_parts(record)}); "
        f"{record['tokens_per_s']:.0f} tokens/s; "
        f"peak memory {record['peak_memory_mb']:.0f} MiB; device {record['device']}",
        f"merged model: {record['merged_model']}",
    ]
    if record.get("adapter"):
        lines.append(f"adapter: {record['adapter']}")
    return "\n".join(lines)


def _repair_note(record: dict) -> str:
    """The repair phase's steps (run.repair_record), after the stop reason."""
    repair = record.get("repair")
    if not repair:
        return ""
    kept = repair["keep_terms_only_steps"]
    cut = ("; --max-steps came first, before the repair could end (at a check from step "
           f"{repair['end']} on)" if repair.get("finished") is False else "")
    return (f"; first forgotten after step {repair['first_forgotten']}, then {kept} repair step{'s' * (kept != 1)} "
            f"of the keep terms alone and {repair['whole_loss_steps']} of the whole loss{cut}")


def _extra_note(record: dict) -> str:
    """The --extra-steps run after the stop rule fired, which no check read ("stopped: forgotten" alone spoke for a
    model the rule never saw), and where --max-steps cut them short."""
    extra = record.get("extra_steps")
    if not extra:
        return ""
    if extra["run"] >= extra["asked"]:
        return f"; then {extra['run']} --extra-steps, which no check read"
    return f"; {extra['run']} of {extra['asked']} --extra-steps after it: --max-steps came first"


def _wall_clock_parts(record: dict) -> str:
    """The run's wall clock in its parts (run.py's *_seconds); what they leave is reading the data and writing
    the outputs, so the parts add up to the whole (not after --resume: see below)."""
    parts = [("loading", record["load_seconds"]), ("ULMR's rewrites", record.get("augment_seconds")),
             ("training", record["train_seconds"]), ("stop-rule checks", record["stop_rule_seconds"]),
             ("evaluation", record["eval_seconds"])]
    parts = [(name, seconds) for name, seconds in parts if seconds is not None]
    if record.get("resumed_from"):
        # The wall clock is this process's; training and the checks count every process since the first
        # (the checkpoint carries their seconds), so the parts do not add up to it and no rest is shown.
        return "this process, resumed; training and stop-rule checks since the first start: " + ", ".join(
            f"{name} {seconds:.1f} s" for name, seconds in parts)
    rest = max(record["wall_clock_s"] - sum(seconds for _, seconds in parts), 0.0)
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in parts + [("reading and writing", rest)])


def _probe_lines(record: dict) -> list[str]:
    """What the automatic probes are and how many could be measured (probes.py)."""
    probes = record.get("probes")
    if not probes:
        return []
    counts = ", ".join(f"{name} {c['kept']} of {c['made']} made" for name, c in probes["sets"].items())
    retained = probes.get("retained")  # None: not trained on; 0: --retain-probes, but no probe could join
    role = ("trained on (--retain-probes)" if retained else
            "held out: --retain-probes, but none could be trained on" if retained == 0 else "held out")
    roles = record.get("roles") or {}
    if any("stop rule" in role_ for name, role_ in roles.items() if name.rstrip("'") in probes["sets"]):
        role += ", and checked by the stop rule (--stop-probes)"
    if probes.get("edit_preserves") and retained is None:
        role = f"{probes['edit_preserves']} trained: the edit preserved their prompts; the others held out"
    topics = ", and no refusal (a harmful request's topic probes)" if probes.get("topic_probes") else ""
    # (no file is written when no probe was made at all: an empty one that `unlearn eval` refuses)
    where = probes["file"] or ("probes.jsonl" if any(c["made"] for c in probes["sets"].values()) else
                               "none made, so no probes.jsonl")
    lines = [f"probes ({role}, built from the forget prompts; accuracy = share whose original answer words "
             f"still appear{topics}): {counts}; {where}"]
    anchors = probes.get("anchors")
    if anchors:
        lines.append(f"anchors (trained on, never measured: general-knowledge questions whose original answers the "
                     f"retain KL holds, for the forget chat rows that name no one): {anchors['trained']} of "
                     f"{anchors['made']} made; {probes['file'] or 'probes.jsonl'}")
    return lines


def _ulmr_lines(record: dict) -> list[str]:
    """What augmentation made and which α averaging used, when the run did either."""
    lines = []
    augment = record.get("augment")
    if augment and "rows" in augment and "sources" in augment:
        lines.append(f"augmented: {augment['rows']} rows from {augment['sources']} forget rows "
                     f"({augment['rewrite_fallbacks']} templated rewrites, {augment['response_fallbacks']} "
                     f"templated responses)")
    elif augment:
        lines.append(f"augmented: {augment['rows']} rows from {augment['file']}")
    if record.get("alpha") is not None:
        selection = record.get("alpha_selection")
        lines.append(f"averaged: α={alpha_label(record['alpha'])}" + (f"; {selection['reason']}" if selection else ""))
    return lines


# --- α selection ------------------------------------------------------------------------------


# Under every α table that recommends one: its figures picked the α, so for the chosen model they are
# flattered by the choice (the best of several draws on the same rows).
SELECTION_NOTE = ("These figures chose α: a selection criterion, not a result. For a result, measure the chosen "
                  "model on rows it was not chosen on (`unlearn eval`).")


def table_markdown(scores: list[AlphaScore], chosen: float | None = None, reason: str | None = None,
                   base: AlphaScore | None = None) -> str:
    """The trade-off table (one row per α; the original model as α = 1 when BASE is given)."""
    lines = ["| α | forget leak | retained accuracy | similarity to original | |", "|---|---|---|---|---|"]
    rows = sorted(scores + ([base] if base else []), key=lambda s: s.alpha)
    for s in rows:
        mark = "original" if base is not None and s is base else ("**recommended**" if s.alpha == chosen else "")
        lines.append(f"| {alpha_label(s.alpha)} | {cell(s.forget_leak)} | {cell(s.retain_accuracy)} | "
                     f"{cell(s.retain_similarity)} | {mark} |")
    if reason:
        lines += ["", f"Recommended: {reason}.", SELECTION_NOTE]
    return "\n".join(lines) + "\n"


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
    ax.axvline(chosen, color="black", linestyle="--", linewidth=1, label=f"recommended α={alpha_label(chosen)}")
    ax.set_xlabel("α (weight of the original model)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("θa = α·θ + (1−α)·θ'")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- unlearn eval -----------------------------------------------------------------------------


def format_value(value) -> str:
    """`unlearn eval`'s cells: three decimals, two from 100 up (perplexities)."""
    small = isinstance(value, float) and math.isfinite(value) and abs(value) < 100
    return cell(value, 3 if small else 2)


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and body of the results table (metric, [before,] value/after)."""
    after, before = result["summary"], result.get("before")
    header = ["metric", "before", "after"] if before else ["metric", "value"]
    body = []
    for key in ("n", *METRIC_KEYS):
        cells = [format_value(before[key])] if before else []
        body.append([key, *cells, format_value(after[key])])
    return header, body


def format_table(result: dict) -> str:
    """The plain-text table printed on stdout, with the judge and models named under it."""
    header, body = table_rows(result)
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    lines = ["  ".join(text.ljust(w) if c == 0 else text.rjust(w) for c, (text, w) in enumerate(zip(row, widths)))
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"judge: {result['summary']['judge']}")
    lines.append(f"model: {result['model']}" + (f"  (before: {result['reference_model']})"
                                                 if result["reference_model"] else ""))
    if "seconds" in result:
        speed = result.get("generation_tokens_per_second")
        lines.append(f"time: {result['seconds']:.1f} s on {result.get('device', '?')}"
                     + (f", generation {speed:.1f} tokens/s" if speed else "") + _reuse_note(result))
    return "\n".join(lines)


def _reuse_note(result: dict) -> str:
    """Which models' figures were read back from the measurement cache (measure_cache.py; --no-cache: none)."""
    reused = [who for who, back in (result.get("reused") or {}).items() if back]
    return f"; {' and '.join(reused)} read back from the cache (--no-cache measures again)" if reused else ""


def format_report(result: dict, title: str = "unlearn eval") -> str:
    """A markdown report: models, judge, thresholds, the metrics table (before/after with a reference)."""
    header, body = table_rows(result)
    if result.get("before"):
        header = ["metric", f"before ({result['reference_model']})", f"after ({result['model']})"]
    md = [f"# {title}", ""]
    md.append(f"- model: `{result['model']}`")
    if result["reference_model"]:
        md.append(f"- reference model (before): `{result['reference_model']}`")
    md.append(f"- fluency measured under: `{result['fluency_model']}`")
    md.append(f"- judge: {result['summary']['judge']}")
    md.append(f"- leak: a row with `answers` (given, or derived from a short response that restates the question) "
              f"leaks when an accepted answer appears in the output; otherwise ROUGE-L recall >= "
              f"{metrics.LEAK_ROUGE_RECALL} or BLEU >= {metrics.LEAK_BLEU} against the reference, and for a passage "
              f"also {metrics.LEAK_VERBATIM_WORDS} consecutive words of it")
    md.append(f"- fluency \"NM\": more than {metrics.NM_SHARE:.0%} of outputs degenerate "
              f"(empty, or unique tokens / tokens < {metrics.DEGENERATE_DIVERSITY})")
    md.append(f"- wall-clock: {result['seconds']:.1f} s")
    md += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(md) + "\n"


def result_json(result: dict) -> dict:
    """The --json object: the evaluated model's metrics at top level, the reference's under "before"."""
    obj = dict(result["summary"])
    obj.update(model=result["model"], reference_model=result["reference_model"],
               fluency_model=result["fluency_model"], seconds=round(result["seconds"], 3),
               device=result.get("device"),
               generation_tokens_per_second=_round(result.get("generation_tokens_per_second")),
               reused=result.get("reused"),  # {model, reference}: read back from the measurement cache
               prompt_format=result.get("prompt_format"))  # how every prompt was rendered
    if result.get("before"):
        obj["before"] = {k: result["before"][k] for k in ("n", *METRIC_KEYS)}
    return obj


def _round(value, digits: int = 1):
    return None if value is None else round(value, digits)
