"""Answer candidate rows with a model (greedy, 32 new tokens) and report which ones it gets right.

Used once, by hand, while writing the scenarios: `python bench/scenarios/probe_candidates.py
bench/scenarios/candidates/X.jsonl [--model DIR] > X.probed.jsonl` writes each candidate with
the model's `output` and `correct` (the benchmark's own key-in-answer rule, `bench.quality.key_in_answer`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.quality import generate_probes, probe_keys, key_in_answer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("candidates")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    from unlearn.models import load_model
    loaded = load_model(args.model)
    rows = [json.loads(line) for line in Path(args.candidates).read_text().splitlines() if line.strip()]
    outputs = generate_probes(loaded.model, loaded.tokenizer, rows, max_new_tokens=args.max_new_tokens)
    right = 0
    for row, out in zip(rows, outputs):
        keys = probe_keys(row)
        row["output"] = out
        row["correct"] = bool(keys) and key_in_answer(out, keys)
        right += row["correct"]
        print(json.dumps(row, ensure_ascii=False))
    print(f"{right}/{len(rows)} right", file=sys.stderr)


if __name__ == "__main__":
    main()
