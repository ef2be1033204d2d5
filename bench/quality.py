"""Quality benchmark: does `unlearn run` forget what it is asked to, and only that?

For each scenario of a split (bench/scenarios/split.json), each method and each seed, the
tool is driven through its public CLI (`unlearn run FORGET NORMAL_TRAIN --method M --seed S
-o DIR --json`; the method `default` gives no --method, so the tool chooses); the merged model
in DIR/model is then scored here, independently of the tool's own report. Definitions (also in
docs/quality.md):

- generation: greedy, 32 new tokens (`--max-new-tokens`), chat prompts rendered by
  `unlearn.generation.generate`; passage prefixes continued as raw text (`continue_text`).
- key in answer (`key_in_answer`): both texts are NFKC-normalised, case-folded and split on
  every character that is not a letter or digit into tokens; a key matches when its tokens
  occur as a contiguous run of the output's tokens. "J.K.Rowling" and "Rowling's" both
  contain "rowling"; "Parisian" does not contain "paris".
- a probe row is *answered* when at least `judge_min_hits` (default 1) distinct keys of the
  row (`answers`, else `judge_answers`) are in the output (`is_answered`).
- forget leak / paraphrase leak: share of the rows the base model answered that the
  unlearned model still answers.
- neighbours / same-subject / unrelated kept: share of the rows the base model answered
  that the unlearned model still answers.
- normal similarity: mean ROUGE-L F (unlearn.metrics.rouge_l) of the unlearned model's
  outputs against the base model's outputs on the held-back normal prompts (never trained).
- paraphrase fluency: share of paraphrase outputs that are not degenerate (`is_fluent`:
  at least one token, and unique tokens / tokens >= 0.25).
- wall clock: seconds of the `unlearn run` subprocess (model load, training, save included).
"""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Sequence

GEN_TOKENS = 32
FLUENT_UNIQUE_RATIO = 0.25
PASSAGE_PREFIX_WORDS = 64

_TOKEN = re.compile(r"[^\W_]+")


# --- scoring ----------------------------------------------------------------------


def match_tokens(text: str) -> list[str]:
    """NFKC, case-folded, split on anything that is not a letter or digit: "J.K.Rowling's" -> j k rowling s."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def _contains_run(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    return n > 0 and any(list(haystack[i:i + n]) == list(needle) for i in range(len(haystack) - n + 1))


def key_in_answer(output: str, keys: Iterable[str]) -> bool:
    """True when one of KEYS appears in OUTPUT as a contiguous run of `match_tokens`."""
    return key_hits(output, keys) > 0


def key_hits(output: str, keys: Iterable[str]) -> int:
    """How many distinct KEYS (by their tokens) appear in OUTPUT; a key without tokens never matches."""
    haystack = match_tokens(output)
    found = {tuple(match_tokens(k)) for k in keys if _contains_run(haystack, match_tokens(k))}
    return len(found)


def probe_keys(row: dict) -> list[str]:
    """The strings whose presence means the row was answered: `answers`, else `judge_answers`."""
    return list(row.get("answers") or row.get("judge_answers") or [])


def is_answered(output: str, row: dict) -> bool:
    """Whether OUTPUT gives what ROW asks for.

    At least `judge_min_hits` (default 1) distinct keys of ROW (`probe_keys`) appear in OUTPUT;
    and, when the row has them, at least one of `judge_also` appears (e.g. an instruction
    marker: "step", "here's") and none of `judge_not` (e.g. a refusal: "I can't", "sorry").
    """
    keys = probe_keys(row)
    need = int(row.get("judge_min_hits", 1))
    if not keys or key_hits(output, keys) < need:
        return False
    if row.get("judge_also") and not key_in_answer(output, row["judge_also"]):
        return False
    return not (row.get("judge_not") and key_in_answer(output, row["judge_not"]))


def is_fluent(output: str) -> bool:
    """Not degenerate: at least one token, and unique tokens / tokens >= FLUENT_UNIQUE_RATIO."""
    tokens = match_tokens(output)
    return bool(tokens) and len(set(tokens)) / len(tokens) >= FLUENT_UNIQUE_RATIO


def share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def kept_share(base_flags: Sequence[bool], after_flags: Sequence[bool]) -> float | None:
    """Among rows the base model answered, the share the unlearned model still answers (None if none)."""
    pairs = [after for before, after in zip(base_flags, after_flags, strict=True) if before]
    return share(pairs)


# --- generation -------------------------------------------------------------------


def passage_prefix(text: str) -> str:
    """The prefix `unlearn` trains on for a `text` row: the first half of the words, at most 64."""
    words = text.strip().split(" ")
    return " ".join(words[:max(1, min(len(words) // 2, PASSAGE_PREFIX_WORDS))])


def probe_prompt(row: dict) -> tuple[str, bool]:
    """(prompt, is_raw_prefix): chat rows use `prompt`; passages use `prefix` or the `text` row's prefix."""
    if "prompt" in row:
        return row["prompt"], False
    if "prefix" in row:
        return row["prefix"], True
    return passage_prefix(row["text"]), True


def continue_text(model, tokenizer, prefixes: list[str], max_new_tokens: int = GEN_TOKENS,
                  batch_size: int = 16) -> list[str]:
    """Greedy raw continuation of each prefix (no chat template), left-padded batches."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    model.eval()
    for start in range(0, len(prefixes), batch_size):
        batch = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prefixes[start:start + batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                       do_sample=False, temperature=None, top_p=None, top_k=None,
                                       pad_token_id=pad_id)
        outputs += [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in generated]
    return outputs


def generate_probes(model, tokenizer, rows: list[dict], max_new_tokens: int = GEN_TOKENS) -> list[str]:
    """Greedy outputs for probe ROWS in order: chat prompts via unlearn's generate, passages raw."""
    from unlearn.generation import generate

    prompts = [probe_prompt(r) for r in rows]
    chat = [i for i, (_, raw) in enumerate(prompts) if not raw]
    raw = [i for i, (_, is_raw) in enumerate(prompts) if is_raw]
    outputs = [""] * len(rows)
    if chat:
        for i, out in zip(chat, generate(model, tokenizer, [prompts[i][0] for i in chat], batch_size=16,
                                         max_new_tokens=max_new_tokens, desc=False)):
            outputs[i] = out
    if raw:
        for i, out in zip(raw, continue_text(model, tokenizer, [prompts[i][0] for i in raw], max_new_tokens)):
            outputs[i] = out
    return outputs


# --- scenarios --------------------------------------------------------------------

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "bench/scenarios"
# The judge's known errors, read row by row in the base model's answers (docs/quality.md, "The judge read row by
# row"): rows whose base answer does not state the fact, and the harmful kind's instruction markers. Each run scores
# both ways: its columns by the scenario files as they are (the README's tables), `corrected` by these.
CORRECTIONS = SCENARIOS / "judge-corrections.json"
# The tool's own before/after evaluation is not used: one generated token per row makes it cheap.
# Not `--eval-limit`: today the stop rule checks only the first --eval-limit forget rows, so
# limiting the evaluation would change the training.
CHEAP_EVAL = ["--max-new-tokens", "1"]
PROBE_SETS = ("forget", "paraphrases", "neighbours", "same_subject", "unrelated")
# The columns the corrected judge gives (`corrected_probes`); the others do not depend on the probes' judge.
CORRECTED_KEYS = ("forget_leak", "paraphrase_leak", "neighbours_kept", "same_subject_kept", "unrelated_kept")
# Column name, result key, kind of measure ("leak": lower is better, else higher is better).
COLUMNS = [("forget leak", "forget_leak"), ("paraphrase leak", "paraphrase_leak"),
           ("neighbours kept", "neighbours_kept"), ("same-subject kept", "same_subject_kept"),
           ("unrelated kept", "unrelated_kept"), ("normal similarity", "normal_similarity"),
           ("paraphrase fluency", "paraphrase_fluency"), ("wall clock s", "wall_clock_s")]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def cache_root() -> Path:
    return Path(os.environ.get("UNLEARN_CACHE", Path.home() / ".cache/unlearn")) / "quality"


class Scenario:
    """One folder of bench/scenarios: its manifest, probe sets and training files."""

    def __init__(self, name: str):
        self.name = name
        self.folder = SCENARIOS / name
        self.manifest = json.loads((self.folder / "scenario.json").read_text())
        self.kind = self.manifest["kind"]
        self.forget_file = self.folder / "forget.jsonl"
        self.normal_train = (self.folder / self.manifest["normal_train"]).resolve()
        self.normal_heldout = (self.folder / self.manifest["normal_heldout"]).resolve()
        files = {"forget": self.forget_file, "paraphrases": self.folder / "paraphrases.jsonl",
                 "neighbours": self.folder / "neighbours.jsonl", "same_subject": self.folder / "same_subject.jsonl",
                 "unrelated": (self.folder / self.manifest["unrelated"]).resolve()}
        self.files = files
        self.probes = {name: read_jsonl(path) for name, path in files.items()}
        self.normal_prompts = [r["prompt"] for r in read_jsonl(self.normal_heldout)]

    def model_spec(self) -> str | None:
        """None for the embedded model; the taught model's directory for teach-then-forget."""
        if self.manifest.get("model") == "taught":
            sys.path.insert(0, str(ROOT / "bench"))
            from teach import teach
            return str(teach())
        return None

    def probe_hash(self) -> str:
        digest = hashlib.sha256(f"{GEN_TOKENS}".encode())
        for path in list(self.files.values()) + [self.normal_heldout]:
            digest.update(Path(path).read_bytes())
        return digest.hexdigest()[:16]


def measure(model, tokenizer, scenario: Scenario) -> dict:
    """Greedy outputs on every probe set and on the held-back normal prompts, in one pass per kind."""
    from unlearn.generation import generate
    rows = [r for name in PROBE_SETS for r in scenario.probes[name]]
    outputs = generate_probes(model, tokenizer, rows)
    out, start = {}, 0
    for name in PROBE_SETS:
        n = len(scenario.probes[name])
        out[name] = outputs[start:start + n]
        start += n
    out["normal"] = generate(model, tokenizer, scenario.normal_prompts, batch_size=16, max_new_tokens=GEN_TOKENS,
                             desc=False)
    return out


def base_key(spec: str | None) -> str:
    """What the base model's outputs depend on besides the probe files: the model's content (every file the tool's own
    measurement cache fingerprints: weights, tokenizer, chat template, generation config), not the name it was given,
    so a taught model made again under the same directory is measured again; and the tool's measurement version
    (`measure_cache.VERSION`, raised whenever the same model and rows give other answers), so outputs of an older
    generation or rendering are not compared with a run's made by the new one."""
    from unlearn.measure_cache import VERSION, weights_fingerprint
    from unlearn.models import resolve_model_dir
    return hashlib.sha256(f"{weights_fingerprint(resolve_model_dir(spec))}|{VERSION}".encode()).hexdigest()[:12]


def base_outputs(scenario: Scenario, spec: str | None) -> dict:
    """The base model's outputs, computed once per (model, probe files) and cached (`base_key`); written whole or not
    at all, since two benches may share the cache."""
    from unlearn.outputs import write_text_atomic
    path = cache_root() / "base" / f"{scenario.name}-{base_key(spec)}-{scenario.probe_hash()}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or cut by a bench killed before the writes became whole: made again
        pass
    from unlearn.models import load_model
    loaded = load_model(spec)
    outputs = measure(loaded.model, loaded.tokenizer, scenario)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(outputs))
    return outputs


def corrections_id() -> str:
    """The corrections file's identity (a row's `corrected_by`): a table of corrected columns reads only the rows
    scored by the file as it is now (`--rescore` scores the others again from their stored outputs)."""
    return hashlib.sha256(CORRECTIONS.read_bytes()).hexdigest()[:12]


def corrected_columns(scenario: Scenario, base: dict, after: dict) -> dict:
    """A run's `corrected` columns (`CORRECTED_KEYS`, and which base answers count) and `corrected_by`."""
    scored = score(scenario, base, after, corrected_probes(scenario))
    return {"corrected": {key: scored[key] for key in (*CORRECTED_KEYS, "base_right")}, "corrected_by": corrections_id()}


def corrected_probes(scenario: Scenario) -> dict[str, list[dict | None]]:
    """SCENARIO's probe rows as the corrected judge reads them (`CORRECTIONS`): a dropped row is None, and a row
    with instruction markers (`judge_also`) has the file's markers added and removed."""
    spec = json.loads(CORRECTIONS.read_text())
    add, remove = spec["markers"]["add"], set(spec["markers"]["remove"])
    out = {}
    for name, path in scenario.files.items():
        dropped = spec["drop"].get(Path(path).resolve().relative_to(SCENARIOS.resolve()).as_posix(), {})
        lines = [i for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
        rows = []
        for line, row in zip(lines, scenario.probes[name], strict=True):
            if str(line) in dropped:
                rows.append(None)
                continue
            if row.get("judge_also"):
                kept = [m for m in row["judge_also"] if m not in remove]
                row = {**row, "judge_also": kept + [m for m in add if m not in kept]}
            rows.append(row)
        out[name] = rows
    return out


def score(scenario: Scenario, base: dict, after: dict, probes: dict | None = None) -> dict:
    """The benchmark's columns for one unlearned model (definitions in the module docstring).

    PROBES: the probe rows to judge by, per set, a row None where it is left out (`corrected_probes`); by default
    the scenario's own.
    """
    from unlearn.metrics import rouge_l

    probes = scenario.probes if probes is None else probes
    answered = {}
    for name in PROBE_SETS:
        judged = [(b, a, r) for b, a, r in zip(base[name], after[name], probes[name], strict=True) if r is not None]
        answered[name] = ([is_answered(b, r) for b, _, r in judged], [is_answered(a, r) for _, a, r in judged])
    result = {
        "forget_leak": kept_share(*answered["forget"]),
        "paraphrase_leak": kept_share(*answered["paraphrases"]),
        "neighbours_kept": kept_share(*answered["neighbours"]),
        "same_subject_kept": kept_share(*answered["same_subject"]),
        "unrelated_kept": kept_share(*answered["unrelated"]),
        # (None, as the kept shares, when there is no normal row: an empty set scored 0.0)
        "normal_similarity": (sum(rouge_l(a, b).fmeasure for a, b in zip(after["normal"], base["normal"]))
                              / len(base["normal"]) if base["normal"] else None),
        "paraphrase_fluency": share([is_fluent(o) for o in after["paraphrases"]]),
        "base_right": {name: f"{sum(answered[name][0])}/{len(answered[name][0])}" for name in PROBE_SETS},
    }
    return result


# --- the runner -------------------------------------------------------------------


def unlearn_cli() -> list[str]:
    exe = Path(sys.executable).with_name("unlearn")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "unlearn"]


#: The pseudo-method that runs `unlearn run` without --method: the tool's default, which is ga
#: unless the forget rows call for another (config.LONG_RESPONSE_DEFAULT). The `ga` rows run ga.
DEFAULT = "default"


def discover_methods() -> list[str]:
    """DEFAULT, then every `unlearn run --method` choice, read from `unlearn run --help` so new methods appear."""
    help_text = subprocess.run(unlearn_cli() + ["run", "--help"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"--method \[([^\]]+)\]", help_text)
    if not match:
        raise SystemExit("bench/quality.py: could not find the --method choices in `unlearn run --help`")
    return [DEFAULT] + match.group(1).split("|")


def load_split(name: str) -> list[str]:
    split = json.loads((SCENARIOS / "split.json").read_text())
    if name not in split["splits"]:
        raise SystemExit(f"bench/quality.py: unknown split {name!r} (have {', '.join(split['splits'])})")
    return split["splits"][name]


def run_key(row: dict) -> tuple:
    return row["scenario"], row["method"], row["seed"], row["run_args"]


def done_keys(path: Path) -> set:
    return {run_key(r) for r in read_jsonl(path)} if path.exists() else set()


def git_commit() -> str | None:
    """The checkout's commit (with "+dirty" when files differ from it), so a result line says what code made it."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "unlearn"],
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def run_one(scenario: Scenario, spec: str | None, method: str, seed: int, run_args: str, work: Path,
            threads: int, base: dict, keep_models: bool) -> dict:
    out_dir = work / f"{scenario.name}-{method}-s{seed}"
    chosen = [] if method == DEFAULT else ["--method", method]
    cmd = unlearn_cli() + ["run", str(scenario.forget_file), str(scenario.normal_train), *chosen,
                           "--seed", str(seed), "-o", str(out_dir), "--force", "--json"] + CHEAP_EVAL
    if spec:
        cmd += ["--model", spec]
    cmd += shlex.split(run_args)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"[quality] {scenario.name} {method} seed {seed}: {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - started
    row = {"scenario": scenario.name, "kind": scenario.kind, "method": method, "seed": seed, "run_args": run_args,
           "command": shlex.join(["unlearn"] + cmd[1:]), "exit_code": proc.returncode, "wall_clock_s": round(wall, 1),
           "load_avg_1m": round(os.getloadavg()[0], 2), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "commit": git_commit()}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        row["error"] = lines[-1] if lines else f"exit {proc.returncode}"
        print(f"[quality]   failed: {row['error']}", file=sys.stderr, flush=True)
        return row
    try:
        record = json.loads((out_dir / "run.json").read_text())
        row["steps"], row["stopped_by"] = record.get("steps"), record.get("stopped_by")
        row["ran_method"] = record.get("method")  # what DEFAULT chose
    except (OSError, ValueError):
        row["steps"] = row["stopped_by"] = row["ran_method"] = None
    from unlearn.models import load_model
    loaded = load_model(str(out_dir / "model"))
    after = measure(loaded.model, loaded.tokenizer, scenario)
    del loaded
    row.update(score(scenario, base, after))
    row.update(corrected_columns(scenario, base, after))
    row["samples"] = {"forget": after["forget"][:2], "paraphrases": after["paraphrases"][:2],
                      "neighbours": after["neighbours"][:2]}
    row["after"] = after  # every output, so that a judge corrected later scores this run again without running it
    if not keep_models:
        shutil.rmtree(out_dir, ignore_errors=True)
    print(f"[quality]   {wall:.0f}s, steps {row.get('steps')}: " + ", ".join(
        f"{k} {row[k]:.2f}" for _, k in COLUMNS[:7] if row.get(k) is not None), file=sys.stderr, flush=True)
    return row


# --- the table ----------------------------------------------------------------------


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _cell(values, digits=2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    fmt = f"{{:.{digits}f}}"
    mean = fmt.format(_mean(values))
    if len(values) == 1:
        return mean
    return f"{mean} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def make_table(rows: list[dict], scenarios: list[str], methods: list[str], seeds: list[int], run_args: str,
               command: str, split: str, corrected: bool = False, source: str = "") -> str:
    """Markdown: per method, each column's mean over scenarios, then mean (min–max) over seeds.

    CORRECTED: the probe columns by the corrected judge as the file is now (each row's `corrected`); a run without
    them (run before it, or scored by another version of the file) counts as not run, so a seed missing one is
    left out and named, as for any run missing.
    """
    if corrected:
        now = corrections_id()
        rows = [{**r, **{k: r.get("corrected", {}).get(k) for k in CORRECTED_KEYS}} for r in rows
                if r.get("exit_code") != 0 or r.get("corrected_by") == now]
    lines = [f"Generated by `{command}` on the **{split}** split ({', '.join(scenarios)}); "
             f"per seed the mean over scenarios, shown as mean (min–max) over seeds {','.join(map(str, seeds))} "
             "(a method not run on every scenario with some seed names the seeds it was, and only those count). "
             "Leaks and kept shares are of the rows the base model answered; see docs/quality.md."
             + (" Probe columns by the corrected judge (bench/scenarios/judge-corrections.json); a run scored "
                "without it counts as not run." if corrected else ""), ""]
    loads = [r["load_avg_1m"] for r in rows if r["scenario"] in scenarios and r["method"] in methods
             and r["seed"] in seeds and r["run_args"] == run_args and "load_avg_1m" in r]
    if loads:
        lines[0] += f" Wall clock on a shared 2-core machine, mean 1-minute load average {_mean(loads):.1f}."
    header = ["method"] + [name for name, _ in COLUMNS[:5]] + ["unrelated kept, worst scenario"] + \
        [name for name, _ in COLUMNS[5:]] + ["failed runs"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        mine = [r for r in rows if r["method"] == method and r["scenario"] in scenarios and r["seed"] in seeds
                and r["run_args"] == run_args]
        # One run per scenario and seed, as the header says (selection.py refuses the same): a hand-merged file's
        # two rows of one were both averaged in, and "not run" went negative.
        keys = [(r["scenario"], r["seed"]) for r in mine]
        twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if twice is not None:
            raise SystemExit(f"{source or 'the results'}: two rows of {twice[0]} seed {twice[1]} ({method}, "
                             f"{run_args!r}): keep one")
        ok = [r for r in mine if r.get("exit_code") == 0]
        # Only seeds run on every scenario (a run that failed counts as run): a seed's mean over
        # fewer scenarios would not be comparable with the others'. The cell names the seeds used.
        complete = [s for s in seeds if {r["scenario"] for r in mine if r["seed"] == s} >= set(scenarios)]
        cells = [f"`{method}`" + ("" if complete == seeds else
                                  f" (seed{'s' if len(complete) != 1 else ''} {','.join(map(str, complete)) or 'none'})")]
        # A failed run leaves its scenario out of that seed's mean: the cell says which, since those means
        # are over fewer scenarios than the other methods' (ulmr refuses passages at every seed).
        failed = sorted({r["scenario"] for r in mine if r.get("exit_code") != 0 and r["seed"] in complete})
        if failed:
            cells[0] += f" (without {', '.join(failed)}: failed)"
        per_seed = {s: [r for r in ok if r["seed"] == s] for s in complete}
        for _, key in COLUMNS[:5]:
            cells.append(_cell([_mean([r.get(key) for r in rs]) for rs in per_seed.values() if rs]))
        by_scenario = {sc: _mean([r.get("unrelated_kept") for r in ok if r["scenario"] == sc and r["seed"] in complete])
                       for sc in scenarios}
        worst = [(v, sc) for sc, v in by_scenario.items() if v is not None]
        cells.append(f"{min(worst)[0]:.2f} ({min(worst)[1]})" if worst else "n/a")
        for _, key in COLUMNS[5:]:
            cells.append(_cell([_mean([r.get(key) for r in rs]) for rs in per_seed.values() if rs],
                               0 if key == "wall_clock_s" else 2))
        expected = len(scenarios) * len(seeds)
        cells.append(f"{len(mine) - len(ok)}/{expected}" + ("" if len(mine) == expected else f" ({expected - len(mine)} not run)"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rescore(path: Path) -> None:
    """Score every run of PATH that stored its outputs (`after`) again by the corrected judge as it is now (the
    base outputs from their cache, computed once if missing), and replace PATH with the result. A line a running
    benchmark appended meanwhile is kept as it came (it was scored by the file as it is now)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]
    scenarios, bases = {}, {}
    for row in rows:
        if "after" not in row:
            continue
        name = row["scenario"]
        if name not in scenarios:
            scenarios[name] = Scenario(name)
            bases[name] = base_outputs(scenarios[name], scenarios[name].model_spec())
        row.update(corrected_columns(scenarios[name], bases[name], row["after"]))
    since = [line for line in path.read_text().splitlines() if line.strip()][len(lines):]
    temporary = path.with_name(path.name + ".rescoring")
    temporary.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                         + "".join(line + "\n" for line in since))
    temporary.replace(path)


def replace_block(text: str, name: str, table: str) -> str:
    """TEXT with the lines between `<!-- quality-table:NAME -->` and `<!-- /quality-table:NAME -->` replaced by TABLE."""
    start, end = f"<!-- quality-table:{name} -->", f"<!-- /quality-table:{name} -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"bench/quality.py: README.md needs one `{start}` line followed by one `{end}` line")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    return f"{head}{start}\n{table.rstrip()}\n{end}{tail}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="dev", help="dev or test (bench/scenarios/split.json)")
    parser.add_argument("--scenarios", default=None, help="comma-separated subset of the split's scenarios")
    parser.add_argument("--methods", default=None, help="comma-separated [default: `default` (no --method: the "
                        "tool's own choice), then every `unlearn run --method`]")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--run-args", default="", help="extra arguments for `unlearn run`, one string; write "
                        "--run-args=\"--lr 3e-4\" (with `=`: argparse takes a separate value that starts with - "
                        "for an option)")
    parser.add_argument("--out", default="bench/results/quality.jsonl", help="results, JSONL, appended (resumes)")
    parser.add_argument("--table", default=None, help="also write the markdown table to this file")
    parser.add_argument("--readme", default=None, metavar="NAME",
                        help="also write the table into README.md between <!-- quality-table:NAME --> markers")
    parser.add_argument("--work", default=None, help="where run outputs go [default: a temporary directory]")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, here and in `unlearn run`")
    parser.add_argument("--keep-models", action="store_true", help="keep each run's output directory")
    parser.add_argument("--no-run", action="store_true",
                        help="run nothing: only make the table from the results already in --out")
    parser.add_argument("--quick", action="store_true",
                        help="one dev scenario, the default (no --method), seed 0 (a pre-commit check)")
    parser.add_argument("--corrected", action="store_true",
                        help="the table's probe columns by the corrected judge (bench/scenarios/judge-corrections.json)")
    parser.add_argument("--rescore", action="store_true",
                        help="run nothing: score every run of --out that stored its outputs again by the corrected "
                        "judge as the file is now, and rewrite --out")
    args = parser.parse_args(argv)

    if args.quick:
        args.split, args.methods, args.seeds = "dev", DEFAULT, "0"
        args.scenarios = args.scenarios or load_split("dev")[0]
    scenarios = load_split(args.split)
    if args.scenarios:
        wanted = args.scenarios.split(",")
        unknown = [s for s in wanted if s not in scenarios]
        if unknown:
            raise SystemExit(f"bench/quality.py: {', '.join(unknown)} not in the {args.split} split ({', '.join(scenarios)})")
        scenarios = wanted
    methods = args.methods.split(",") if args.methods else discover_methods()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"bench/quality.py: --seeds {args.seeds}: give whole numbers, comma-separated") from None
    out = Path(args.out)
    if (args.no_run or args.rescore) and not out.is_file():
        raise SystemExit(f"bench/quality.py: {out}: no results file to make the table from (--no-run runs nothing; "
                         f"give the --out of the runs, as in the table's first line)")
    if args.rescore:
        rescore(out)
        args.no_run = True
    import tempfile
    import torch
    torch.set_num_threads(args.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(out)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="quality-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in [] if args.no_run else scenarios:
        todo = [(m, s) for m in methods for s in seeds if (name, m, s, args.run_args) not in done]
        if not todo:
            continue
        scenario = Scenario(name)
        spec = scenario.model_spec()
        base = base_outputs(scenario, spec)
        for method, seed in todo:
            row = run_one(scenario, spec, method, seed, args.run_args, work, args.threads, base, args.keep_models)
            with out.open("a") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    # The scenarios as resolved, and the results file, always: a command that named only its split made another
    # table once the split grew (docs/quality.md's older tables printed "(seeds none) n/a" rows).
    command = "python bench/quality.py " + " ".join(
        (["--quick", f"--scenarios {','.join(scenarios)}"] if args.quick else [
            f"--split {args.split}", f"--scenarios {','.join(scenarios)}", f"--methods {','.join(methods)}",
            f"--seeds {args.seeds}"])
        + ([f"--run-args={shlex.quote(args.run_args)}"] if args.run_args else [])
        + [f"--out {args.out}"] + (["--corrected"] if args.corrected else []))
    table = make_table(read_jsonl(out), scenarios, methods, seeds, args.run_args, command, args.split, args.corrected,
                       source=str(out))
    print(table)
    if args.table:
        Path(args.table).write_text(table)
    if args.readme:
        readme = ROOT / "README.md"
        readme.write_text(replace_block(readme.read_text(), args.readme, table))


if __name__ == "__main__":
    main()
