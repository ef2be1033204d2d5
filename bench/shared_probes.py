"""The test split's neighbours and same-subject figures with and without the probe rows a dev scenario shares.

    python bench/shared_probes.py bench/results/quality-test-s61-outputs.jsonl

Review 114 found that the dev scenario `inventors` shares 7 of `einstein`'s 10 neighbour prompts and 3 of
`passages`' 10 same-subject prompts, so defaults chosen on dev were chosen on those test rows too
(docs/quality.md, "Dev and test"). This scores runs that stored their outputs (`after`) both ways: with every
probe row, and with the rows a dev scenario's files also hold (found by prompt, case-folded) left out, as the
corrected judge leaves rows out (`quality.score`'s PROBES)."""
import glob
import json
import sys
from pathlib import Path

sys.path.insert(0, "bench")
import quality  # noqa: E402


def prompt_of(row):
    return (row.get("prompt") or row.get("question") or row.get("text") or row.get("prefix") or "").strip().casefold()


split = json.loads(Path("bench/scenarios/split.json").read_text())["splits"]
dev = {prompt_of(r) for s in split["dev"] for f in glob.glob(f"bench/scenarios/{s}/*.jsonl")
       for r in quality.read_jsonl(Path(f))}
rows = [r for r in quality.read_jsonl(Path(sys.argv[1])) if "after" in r]
for name in sorted({r["scenario"] for r in rows}):
    scenario = quality.Scenario(name)
    base = quality.base_outputs(scenario, scenario.model_spec())
    unshared = {k: [None if prompt_of(r) in dev else r for r in v] for k, v in scenario.probes.items()}
    shared = {k: sum(r is None for r in v) for k, v in unshared.items()}
    print(name, "probe rows a dev scenario shares:", {k: f"{n} of {len(scenario.probes[k])}" for k, n in shared.items() if n})
    for r in sorted((r for r in rows if r["scenario"] == name), key=lambda r: r["seed"]):
        full, part = quality.score(scenario, base, r["after"]), quality.score(scenario, base, r["after"], unshared)
        print(f"  seed {r['seed']}: neighbours {full['neighbours_kept']:.2f} -> {part['neighbours_kept']:.2f} "
              f"({part['base_right']['neighbours']} answered by the base); same-subject "
              f"{full['same_subject_kept']:.2f} -> {part['same_subject_kept']:.2f} ({part['base_right']['same_subject']})")
