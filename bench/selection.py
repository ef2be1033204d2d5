"""The rule that chooses defaults (docs/quality.md, "How the default is chosen"), computed from results files.

    python bench/selection.py CANDIDATE.jsonl --run-args="ARGS" [--method default] [--scenarios a,b,...] [--scoped]
                              [--defaults FILE] [--json]

Every figure it prints is a selection criterion, never a result: the test split's table is the result.

- **Selection score of a run** (`run_score`) = mean(1 − forget leak, 1 − paraphrase leak, neighbours kept,
  same-subject kept, unrelated kept, normal similarity), the benchmark's own columns; of a scenario, the mean over
  seeds 0–2; of the split (`split_score`), the mean over its scenarios.
- **The default's rows** are named once, per dev scenario, in `bench/results/dev-default.json` (a file, the method and
  the run arguments its rows carry). A candidate's rows take their place in each scenario where it ran every seed;
  elsewhere the candidate trains as the default does, and the default's rows stand for it.
- **Adopted** when (1) its split score beats the default's by at least `MARGIN` (0.02), (2) its mean forget leak
  over the split is at most `MAX_FORGET_LEAK` (0.05), and (3) the README command's wall clock is no worse, which
  is measured side by side and not here. A score within `MARGIN` that passes (2) is a tie, broken by the targets
  read per scenario (the thirty-ninth session's amendment, `TARGETS`): the candidate wins when it meets at least one
  the default misses and misses none the default meets.
- A scenario with a failed run (non-zero exit code, or a figure missing) has no score and the rule no verdict; a
  candidate with some seeds of a scenario but not all is refused, not judged on the default's rows there.
- **A scoped candidate** (`--scoped`; the fifty-second session's amendment, declared before any candidate's runs)
  is one declared before its runs to train exactly as the default everywhere but the scenarios it runs: its
  margin is `MARGIN` · √(reached / scenarios) (`margin_for`), for the gate and the tie alike. `--scoped` counts
  as reached the scenarios the results file has rows for; `--reaches a,b,...` names them as declared, and refuses a
  file without rows for one of them (a run left out would otherwise lower the margin) or with rows for another.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (bench/quality.py: the splits; no model is loaded by importing it)

RESULTS = quality.ROOT / "bench/results"
DEFAULT_ROWS = RESULTS / "dev-default.json"
SEEDS = (0, 1, 2)
MARGIN = 0.02
MAX_FORGET_LEAK = 0.05
# The issues' targets read per scenario (mean of seeds), as the thirty-ninth session's amendment lists them;
# `longest_run_s` is the slowest seed's wall clock, which a loaded machine inflates (rows carry their load).
TARGETS = (("forget_leak", operator.le, 0.05), ("paraphrase_leak", operator.le, 0.10),
           ("neighbours_kept", operator.ge, 0.90), ("same_subject_kept", operator.ge, 0.90),
           ("unrelated_kept", operator.ge, 0.90), ("normal_similarity", operator.ge, 0.70),
           ("longest_run_s", operator.le, 300.0))
COLUMNS = ("forget_leak", "paraphrase_leak", "neighbours_kept", "same_subject_kept", "unrelated_kept",
           "normal_similarity")


def run_score(row: dict) -> float:
    """One run's selection score: its six columns, each oriented so that higher is better, averaged."""
    return (2 - row["forget_leak"] - row["paraphrase_leak"] + row["neighbours_kept"] + row["same_subject_kept"]
            + row["unrelated_kept"] + row["normal_similarity"]) / 6


def read_rows(path: Path) -> list[dict]:
    """A results file's rows; an unreadable file or line is one line naming it (FILE:LINE), not a traceback."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{number}: not a JSON row ({exc.msg})") from None
            problem = _row_problem(row)
            if problem:
                raise SystemExit(f"{path}:{number}: {problem}")
            rows.append(row)
    return rows


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _row_problem(row) -> str | None:
    """What makes ROW unreadable by the rule, or None. A figure may be null or absent (a failed run's)."""
    if not isinstance(row, dict):
        return "a row is a JSON object"
    for key in ("scenario", "method", "run_args"):
        if not isinstance(row.get(key), str):
            return f"no {key} (a string)"
    if not isinstance(row.get("seed"), int) or isinstance(row["seed"], bool):
        return "no seed (an integer)"
    for key in (*COLUMNS, "wall_clock_s", "exit_code"):
        if row.get(key) is not None and not _is_number(row[key]):
            return f"{key} is not a number: {row[key]!r}"
    return None


def seed_rows(rows: list[dict], scenario: str, method: str, run_args: str, source: str) -> list[dict] | None:
    """The rows of SCENARIO run by METHOD with RUN_ARGS, one per seed of SEEDS, or None when there are none. Some
    seeds without the others are refused, and so are two rows for one seed: which one the rule reads must not
    depend on a file's order."""
    by_seed: dict[int, dict] = {}
    for row in rows:
        if (row["scenario"], row["method"], row["run_args"]) == (scenario, method, run_args):
            if row["seed"] in by_seed:
                raise SystemExit(f"{source}: two rows of {scenario} seed {row['seed']} ({method}, {run_args!r}): "
                                 f"keep one")
            by_seed[row["seed"]] = row
    if not by_seed:
        return None
    missing = [seed for seed in SEEDS if seed not in by_seed]
    if missing:  # judged on the default's rows instead, a candidate could win on seeds it never ran
        raise SystemExit(f"{source}: {scenario} ({method}, {run_args!r}) lacks seed(s) {missing}: run them, or "
                         f"leave {scenario} out of --scenarios")
    return [by_seed[seed] for seed in SEEDS]


def summary(rows: list[dict]) -> dict:
    """A scenario's figures over its seeds: the score, each column's mean, the longest run; None where a run failed."""
    failed = [row["seed"] for row in rows
              if row.get("exit_code", 0) != 0 or any(row.get(column) is None for column in COLUMNS)]
    if failed:
        return {"score": None, "failed_seeds": failed}
    means = {column: sum(row[column] for row in rows) / len(rows) for column in COLUMNS}
    walls = [row.get("wall_clock_s") for row in rows]
    return {"score": sum(map(run_score, rows)) / len(rows), **means,
            "longest_run_s": None if None in walls else max(walls)}


def targets_met(figures: dict) -> set[str]:
    """The targets FIGURES meet, read at 9 decimals: a mean of three 0.10s is 0.10000000000000002 in floats."""
    return {name for name, within, bound in TARGETS
            if figures.get(name) is not None and within(round(figures[name], 9), bound)}


def split_score(summaries: dict[str, dict]) -> float | None:
    scores = [s["score"] for s in summaries.values()]
    return None if any(score is None for score in scores) else sum(scores) / len(scores)


def margin_for(reached: int, scenarios: int) -> float:
    """The margin over the split's score that a scoped candidate, reaching REACHED of the split's SCENARIOS, must beat.

    A candidate that trains exactly as the default on every scenario but the ones it reaches moves the split's mean
    by its change there times reached / scenarios, and its noise moves the mean by √reached / scenarios times one
    scenario's (each scenario's score difference taken as independent noise of one size), where a change to every
    scenario moves it by √scenarios / scenarios. So `MARGIN` · √(reached / scenarios) asks the same of a scoped
    change's signal against its noise as `MARGIN` asks of a change to every scenario. That holds as far as the
    scenarios are equally noisy, and they are not: over the default's three seeds a scenario's score spreads by
    0.0125 (`openings`) to 0.11 (`capitals`), so a change that does nothing passes more often where it reaches the
    noisy ones (a review's estimate from those spreads: about 12 % over the whole split, 7 % reaching `harmful` and
    `mischief`, 28 % reaching `capitals` alone). (`MARGIN` itself, over every scenario, would ask a change reaching
    2 of 7 scenarios for 0.07 there, and one reaching all 7 for 0.02: the fifty-first session's flaw.)
    """
    if not 0 < reached <= scenarios:
        raise ValueError(f"reached {reached} of {scenarios} scenarios")
    return MARGIN * math.sqrt(reached / scenarios)


def judge(default: dict[str, dict], candidate: dict[str, dict], margin: float = MARGIN) -> dict:
    """The rule's verdict on CANDIDATE's scenario summaries (the default's where it did not run) against DEFAULT's.

    MARGIN is the rule's `MARGIN`, or a scoped candidate's `margin_for`."""
    base, new = split_score(default), split_score(candidate)
    forget_leak = (None if new is None
                   else sum(s["forget_leak"] for s in candidate.values()) / len(candidate))
    # a target is compared only where both sides have its figure (a row without a wall clock reads neither way)
    both = {name: {t for t, _, _ in TARGETS if default[name].get(t) is not None and candidate[name].get(t) is not None}
            for name in default}
    gained = {name: sorted(both[name] & (targets_met(candidate[name]) - targets_met(default[name]))) for name in default}
    lost = {name: sorted(both[name] & (targets_met(default[name]) - targets_met(candidate[name]))) for name in default}
    if base is None or new is None:
        # a scenario the candidate never ran holds the default's own summary: its failure is named once
        failed = [f"{who}'s {name} (seeds {summary.get('failed_seeds')})" for who, summaries in
                  (("the default", default), ("the candidate", candidate)) for name, summary in summaries.items()
                  if summary["score"] is None and (who == "the default" or summary is not default[name])]
        verdict = "no verdict: a failed run or a missing figure in " + ", ".join(failed)
    elif round(forget_leak, 9) > MAX_FORGET_LEAK:
        verdict = "not adopted: the mean forget leak is over the gate"
    elif round(new - base, 9) >= round(margin, 9):  # as targets_met: float sums are not a real shortfall
        verdict = "adopted by the score (if the README command is no slower)"
    elif abs(round(new - base, 9)) < round(margin, 9) and any(gained.values()) and not any(lost.values()):
        verdict = "a tie, adopted by the targets (if the README command is no slower)"
    else:
        verdict = "not adopted"
    return {"default_score": base, "candidate_score": new, "margin": margin,
            "bar": None if base is None else base + margin,
            "forget_leak": forget_leak, "targets_gained": gained, "targets_lost": lost, "verdict": verdict}


def default_summaries(scenarios: list[str], spec_path: Path = DEFAULT_ROWS) -> dict[str, dict]:
    spec = json.loads(Path(spec_path).read_text())["scenarios"]
    out, files = {}, {}  # several scenarios' rows share a file: each is read once
    for name in scenarios:
        if name not in spec:
            raise SystemExit(f"{spec_path}: no default rows named for {name}")
        entry = spec[name]
        path = RESULTS / entry["file"]
        if path not in files:
            files[path] = read_rows(path)
        rows = seed_rows(files[path], name, entry["method"], entry["run_args"], str(path))
        if rows is None:
            raise SystemExit(f"{path}: no rows of {name} ({entry['method']}, {entry['run_args']!r}), which "
                             f"{spec_path} names as the default's")
        out[name] = summary(rows)
    return out


def _fmt(value, digits=4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(default: dict, candidate: dict, ran: set[str], verdict: dict) -> str:
    lines = ["| scenario | default's score | candidate's score | targets gained | targets lost |",
             "|---|---|---|---|---|"]
    for name in default:
        mine = _fmt(candidate[name]["score"]) if name in ran else "(trains as the default)"
        gained, lost = (", ".join(verdict[key][name]) or "-" for key in ("targets_gained", "targets_lost"))
        lines.append(f"| {name} | {_fmt(default[name]['score'])} | {mine} | {gained} | {lost} |")
    lines += ["", f"selection score over {len(default)} scenarios (a selection criterion, not a result): default "
              f"{_fmt(verdict['default_score'])}, candidate {_fmt(verdict['candidate_score'])}, the rule's bar "
              f"{_fmt(verdict['bar'])} (margin {_fmt(verdict['margin'])}"
              + (f", scoped: {len(ran)} of {len(default)} scenarios reached, {MARGIN} x sqrt({len(ran)}/{len(default)}))"
                 if verdict["margin"] != MARGIN else ")"),
              f"mean forget leak of the candidate: {_fmt(verdict['forget_leak'], 3)} (gate {MAX_FORGET_LEAK})",
              "longest_run_s reads the rows' wall clocks as measured: a run beside other jobs reads slower than alone",
              f"verdict: {verdict['verdict']}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidate", type=Path, help="results file (JSONL) holding the candidate's rows")
    parser.add_argument("--method", default="default", help="the candidate rows' method [default: default]")
    parser.add_argument("--run-args", default="", help='the candidate rows\' run arguments; write --run-args="..."')
    parser.add_argument("--scenarios", help="comma-separated [default: the dev split, bench/scenarios/split.json]")
    parser.add_argument("--scoped", action="store_true", help="the candidate was declared, before its runs, to train "
                        "exactly as the default on every scenario it has no rows for: margin_for's margin")
    parser.add_argument("--reaches", help="comma-separated: the scenarios a scoped candidate was declared to reach; "
                        "--scoped's margin for that many, every one of them run and no other")
    parser.add_argument("--defaults", type=Path, default=DEFAULT_ROWS,
                        help="the file naming the default's rows [default: bench/results/dev-default.json; an earlier "
                             "default's, such as dev-default-s52.json, reads a decision judged against it again]")
    parser.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    args = parser.parse_args(argv)
    scenarios = [name.strip() for name in args.scenarios.split(",")] if args.scenarios else quality.load_split("dev")
    default = default_summaries(scenarios, args.defaults)
    rows = read_rows(args.candidate)
    candidate, ran = dict(default), set()
    for name in scenarios:
        mine = seed_rows(rows, name, args.method, args.run_args, str(args.candidate))
        if mine is not None:
            candidate[name], ran = summary(mine), ran | {name}
    if not ran:
        raise SystemExit(f"{args.candidate}: no rows of {args.method} with run arguments {args.run_args!r} in "
                         f"{', '.join(scenarios)}")
    if args.reaches is not None:
        declared = {name.strip() for name in args.reaches.split(",") if name.strip()}
        unknown, missing, extra = declared - set(scenarios), declared - ran, ran - declared
        if unknown or missing or extra:
            raise SystemExit(f"{args.candidate}: --reaches {args.reaches}: " + "; ".join(
                f"{what}: {', '.join(sorted(names))}" for what, names in (
                    ("not in the split", unknown), ("declared but without rows", missing - unknown),
                    ("rows but not declared", extra)) if names))
    scoped = args.scoped or args.reaches is not None
    verdict = judge(default, candidate, margin_for(len(ran), len(scenarios)) if scoped else MARGIN)
    print(json.dumps({**verdict, "ran": sorted(ran)}) if args.json else report(default, candidate, ran, verdict))


if __name__ == "__main__":
    sys.exit(main())
