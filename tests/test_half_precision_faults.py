"""Half precision's faults, each caught where it happens: logits that overflow float16, nan in --json, the
merge of a half-precision run, and the slow-dtype note's timing on a loaded machine (the low-precision audit)."""

import json
import math

import pytest
import torch

from unlearn import generation, system
from unlearn.config import TrainConfig
from unlearn.data import Example
from unlearn.models import load_model

FORGET = [{"prompt": "Who wrote the Harry Potter books?", "response": "J.K. Rowling wrote them.", "answers": ["Rowling"]}]
NORMAL = [{"prompt": "What is two plus two?", "response": "Two plus two equals four."},
          {"prompt": "What do bees make?", "response": "Bees make honey."}]
FAST = ["--max-steps", "2", "--check-every", "0", "--max-new-tokens", "4", "--batch-size", "2", "--no-probes"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("dtype, says", [
    ("float16", "the model's logits are nan or inf in float16: its activations overflow float16's range (at most "
                "65504); use --dtype bfloat16 or float32"),
    ("float32", "the model's logits are nan or inf (float32): its weights or activations are not finite"),
])
def test_logits_that_are_not_finite_end_generation_with_one_line(llama_dir, dtype, says):
    lm = load_model(str(llama_dir), dtype=dtype, log=lambda m: None)
    with torch.no_grad():
        lm.model.get_output_embeddings().weight[3] = math.inf  # a logit of inf (or nan: inf * 0) on every row
    # unchecked, argmax picked the nan's token at every step: "" everywhere, read as forgotten by the leak judge
    with pytest.raises(generation.NonFiniteLogits) as caught:
        generation.generate(lm.model, lm.tokenizer, ["Who wrote it?", "Hi?"], max_new_tokens=4, desc=False)
    assert str(caught.value) == says


def test_a_check_that_meets_non_finite_logits_stops_the_run_at_that_step(llama_dir):
    from unlearn.lora import LoraSettings, attach_lora
    from unlearn.train import NonFiniteLoss, Unlearner, train

    lm = load_model(str(llama_dir), log=lambda m: None)
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
    forget = [Example(r["prompt"], r["response"], i + 1, {"answers": r["answers"]}) for i, r in enumerate(FORGET)]
    normal = [Example(r["prompt"], r["response"], i + 1) for i, r in enumerate(NORMAL)]
    u = Unlearner(lm.model, lm.tokenizer, forget, normal, TrainConfig(lr=1e-3, batch_size=1, max_steps=4, check_every=1))

    def overflowing():
        raise generation.NonFiniteLogits("the model's logits are nan or inf")

    with pytest.raises(NonFiniteLoss) as caught:
        train(u, forgotten=overflowing)
    assert caught.value.step == 1 and "stop rule check's greedy logit" in str(caught.value)


def test_json_output_never_holds_nan_or_infinity():
    from unlearn.cli import print_json
    from unlearn.outputs import json_safe

    assert json_safe({"p": math.nan, "rows": [1.0, math.inf, (-math.inf, "x")], "n": 3}) == \
        {"p": None, "rows": [1.0, None, [None, "x"]], "n": 3}
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_json({"probability": math.nan})
    assert out.getvalue().strip() == '{"probability": null}'  # not the bare NaN strict parsers refuse


def test_merge_with_no_paths_folds_a_half_precision_runs_adapter(cli, tmp_path, llama_dir, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "cache"))
    forget, normal = _jsonl(tmp_path / "forget.jsonl", FORGET), _jsonl(tmp_path / "normal.jsonl", NORMAL)
    run = cli("run", forget, normal, "--model", llama_dir, "--dtype", "bfloat16", "-o", tmp_path / "run", *FAST)
    assert run.code == 0, run.err
    # the run's merged model is bfloat16 and its float32 base is not: merge read it and refused the mixed dtypes
    last = cli("merge", "--alpha", "0.5", "-o", tmp_path / "last")
    assert last.code == 0, last.err
    given = cli("merge", "--alpha", "0.5", llama_dir, "--adapter", tmp_path / "run" / "adapter", "-o", tmp_path / "given")
    assert given.code == 0, given.err
    merged, same = load_file(tmp_path / "last" / "model.safetensors"), load_file(tmp_path / "given" / "model.safetensors")
    assert merged.keys() == same.keys() and all(torch.equal(merged[k], same[k]) for k in merged)
    assert merged["model.norm.weight"].dtype == torch.float32  # BASE's dtype


def test_the_matmul_rate_is_not_read_from_a_stalled_run(monkeypatch):
    # A stall of a thread waiting for a busy core (20 ms) on the first runs of a 0.2 ms product: with the best of 3
    # the rate read 1.7 GFLOP/s, and float16 was called 40x slower than float32 on a CPU where it is as fast.
    times = iter([0.02] * 3 + [0.0002] * 100)
    clock = {"now": 0.0, "started": False}

    def perf_counter():
        if clock["started"]:
            clock["now"] += next(times)
        clock["started"] = not clock["started"]
        return clock["now"]

    monkeypatch.setattr(system.time, "perf_counter", perf_counter)
    system.cpu_matmul_rate.cache_clear()
    try:
        rate = system.cpu_matmul_rate("float32")
    finally:
        system.cpu_matmul_rate.cache_clear()
    assert rate == pytest.approx(2 * 256**3 / 0.0002 / 1e9)
