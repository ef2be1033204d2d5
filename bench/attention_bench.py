"""Eager attention against SDPA in `unlearn run`'s training step, alternating in one process.

    .venv/bin/python bench/attention_bench.py [--dtype bfloat16|float32] [--shape default|opt-1.3b|opt-2.7b]
        [--pairs N] [--threads T] [--json]

Why one process: between processes the same step's time moves by about +-8 % on the 2-core
machines here (bench/train_bench.py's MFU over five runs: 0.539-0.646), more than the difference
measured. So one process builds the step as bench/train_bench.py does (the embedded model, the
example rows, default TrainConfig, LoRA), draws one step's rows once and keeps them (every step
then does the same work), and times N pairs of steps, in alternating order: one with transformers'
eager attention (`attention.training_attention`, which `unlearn run` enters for bf16/fp16 on CPU;
here in either dtype) and one with SDPA as before it (in bf16 under the math kernel, the old
`train._attention_kernel`; in float32 torch's own kernel choice, which `unlearn run` still makes).
Reported: each arm's median step time and the median over pairs of eager / SDPA (below 1: eager is
faster). The losses are not compared: the weights move at every step, so the two arms' losses are
those of different weights (tests/test_attention.py compares the logits).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--shape", default="default", help="as bench/train_bench.py's --shape (its rows too)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="the result as a JSON object on the last line")
    args = parser.parse_args(argv)

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import train_bench
    from unlearn import attention, train
    from unlearn.lora import LoraSettings, attach_lora

    torch.set_num_threads(args.threads)
    shape = train_bench.parse_args(["--shape", args.shape])
    torch.manual_seed(train.TrainConfig().seed)
    model, tokenizer, name = train_bench.build_model(shape, args.dtype)
    forget, normal, max_length = train_bench.read_rows(shape, tokenizer)
    config = train.TrainConfig(max_length=max_length)
    attach_lora(model, LoraSettings(), seed=config.seed)
    unlearner = train.Unlearner(model, tokenizer, forget, normal, config)
    rows = unlearner._rows()
    unlearner._rows = lambda: dict(rows)  # every step the same rows, the same work (step() pops groups from its dict)

    def sdpa(model):  # before attention.py: the math kernel for low precision on CPU, else torch's choice
        return sdpa_kernel(SDPBackend.MATH) if attention.runs_eager(model) else contextlib.nullcontext()

    arms = {"eager": lambda model: attention.training_attention(model, eager=True), "sdpa": sdpa}
    times = {arm: [] for arm in arms}
    for _ in range(2):  # warm-up: the first step leaves the KL out, and the allocator settles
        unlearner.step()
    for pair in range(args.pairs):
        for arm in (list(arms) if pair % 2 == 0 else list(reversed(arms))):
            train.training_attention = arms[arm]  # what forward_logits enters
            start = time.perf_counter()
            unlearner.step()
            times[arm].append(time.perf_counter() - start)
    train.training_attention = attention.training_attention
    result = {"model": name, "shape": args.shape, "dtype": args.dtype, "threads": args.threads, "pairs": args.pairs,
              "eager_step_s": round(statistics.median(times["eager"]), 4),
              "sdpa_step_s": round(statistics.median(times["sdpa"]), 4),
              "eager_over_sdpa": round(statistics.median(e / s for e, s in zip(times["eager"], times["sdpa"])), 4)}
    for key, value in result.items():
        print(f"{key:18s} {value}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
