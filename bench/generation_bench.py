"""Greedy generation speed against the machine's limit, measured in one run.

    .venv/bin/python bench/generation_bench.py [--model M] [--max-new-tokens 48] [--batch-size 128]
                                               [--threads 2] [--splits forget,normal,...] [--per-file]
                                               [--skip-old] [--rounds 2] [--json]

Workload: what `unlearn run` generates for its before/after table: the prompts of
examples/{forget,normal,forget_paraphrases,heldout}.jsonl in one `generate` call, as
`measure.Measurer.answer_sets` pools a run's sets (--per-file: one call per file, the
workload before the sets were pooled: smaller batches), greedy, --max-new-tokens new
tokens, batches of --batch-size, on the embedded model unless --model. Two implementations run in the order old, new, new, old (so
slow drift in the machine's load hits both alike; --rounds 1: old, new):
`unlearn.generation.generate_hf` (every batch through `model.generate`: the
implementation before this bench) and `unlearn.generation.generate` (the own decode
loop; with --threads T >= 2, batches of 4T rows or more run as T slices side by side, one
torch thread each: generation._greedy_parts). Outputs must be identical;
`identical_outputs` counts them.

tokens_per_s = new tokens / seconds, where new tokens are those each answer really
has (up to and including its EOS), counted by `generate(record=...)`, and seconds
the wall clock of the `generate` calls (the better of the runs of each).

The limit (the `limit_*` keys). Three rates are measured in the same process, just
before the timed runs:
  R_dec  FLOP/s of torch's matmul at decode shape: x[rows, K] @ W[N', K].T for each
         distinct (N, K) of the model's nn.Linear layers, N' <= N rows of W so that it
         stays in cache: the arithmetic rate without waiting on memory. The best over
         rows in DECODE_ROWS (and --batch-size): a limit that does not depend on the batch
         size the run chose (at 2 threads the rate peaks near 64 rows: 172 GFLOP/s there,
         138 at 128 in one run).
  R_pre  the same at prefill shape: x[rows * 40, K], the best over the same rows.
  BW     bytes/s of reading a 256 MB float32 tensor (`sum`), far larger than the caches.
Per-token cost model. Let P_lin be the parameters of the nn.Linear layers (the LM head
included, once even when tied to the embedding), P_head those of the LM head, and per
layer H heads of size h, G key/value heads, n_layer layers, b bytes per parameter.
  - A decode step with `a` rows still generating, each attending to c positions:
      compute  F = a * (2 * P_lin + n_layer * 4 * c * H * h)            [FLOP]
      memory   M = b * P_lin + a * n_layer * 2 * c * G * h * b            [bytes]
               (weights read once per step, shared by the batch, plus the KV cache)
      time     max(F / R_dec, M / BW)                                    (roofline)
  - The prefill of a batch with T real prompt tokens (rows r; padding is not counted,
    the limit is what the work needs, not what a padded batch does; the prompt prefix all
    rows of a batch share, which `generate` computes once (unlearn/kv_cache.py), counts
    once, so T = shared prefix + each row's own tokens):
      compute  2 * (P_lin - P_head) * T + 2 * P_head * r + attention (4 * i * H * h per
               layer for the token at position i)
      memory   b * P_lin (weights once)
      time     max(F / R_pre, M / BW)
  - A row with n new tokens needs the prefill (which gives the first token) and n - 1
    decode steps, so a batch needs max(n) - 1 steps, step s holding the rows with n > s.
limit_seconds sums these over the workload's batches (the same batches and the same new
tokens as the measured run), limit_tokens_per_s = new tokens / limit_seconds, and
fraction_of_limit = tokens_per_s / limit_tokens_per_s.

On a shared machine the rates are the best of 10 short timings (moments when this process
had its cores), while a run of minutes gets only its share of the cores, so the wall-clock
fraction mostly measures the load. `fraction_of_limit_cpu` = limit_seconds * threads /
CPU seconds of the run (time.process_time, all threads) compares the work with the time
the process actually ran; with more than one thread, time a thread spends spinning while
waiting for another also counts as CPU time, so it is a lower bound there. `decode_limit_tokens_per_s`
leaves the prefill out (it counts only the decode steps' time), for comparison with
estimates that count decoding alone.

The stop-rule hook: `stop_row_check_seconds` is the time to decode, as `generate`'s
`stop_row` hook does, every live row's text every STOP_CHECK_EVERY tokens for the new
run's outputs; `stop_row_check_share` divides it by the new run's seconds.

Results: a table (or, with --json, one JSON object as the LAST line) on stdout; progress on
stderr. The machine may be shared: the 1-minute load average is printed before and after.
Not part of the test suite: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SPLITS = ("forget", "normal", "forget_paraphrases", "heldout")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model spec for unlearn.models.load_model [default: embedded]")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per batch [default: config.GEN_BATCH_SIZE, the tool's default]")
    parser.add_argument("--per-file", action="store_true", help="one generate call per file, not one for all")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads [default: 2]")
    parser.add_argument("--splits", default=",".join(SPLITS), help="which examples/*.jsonl files [default: all four]")
    parser.add_argument("--skip-old", action="store_true", help="time only the new implementation (once)")
    parser.add_argument("--rounds", type=int, default=2, help="2: old, new, new, old; 1: old, new [default: 2]")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.rounds not in (1, 2):  # 0 tokens: the decode loop never reached its budget
        parser.error("--max-new-tokens must be at least 1 and --rounds 1 or 2")
    if args.batch_size is None:
        from unlearn.config import GEN_BATCH_SIZE

        args.batch_size = GEN_BATCH_SIZE
    return args


def _best_rate(fn, work: float, repeats: int = 10) -> float:
    """WORK / the shortest of REPEATS timings of FN (the least disturbed by other processes)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return work / best


# The row counts R_dec and R_pre are measured at (the best one counts).
DECODE_ROWS = (16, 32, 64, 128, 256)


def measure_machine(model, batch_size: int) -> dict:
    """R_dec, R_pre (FLOP/s) and BW (bytes/s) as the docstring defines them."""
    import torch

    dtype = next(model.parameters()).dtype
    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})

    def matmul_rate(rows: int) -> float:
        # Each timing is ~1e8 FLOP (a few ms): short enough to fall between other processes'
        # turns on a shared machine, long enough to time. W keeps the layer's K and at most
        # 4 MB (float32) of its N rows, so it stays in cache.
        flops, seconds = 0.0, 0.0
        for n, k in shapes:
            n_cached = min(n, max(16, 2**20 // k), max(16, int(1e8 // (2 * rows * k))))
            w = torch.randn(n_cached, k, dtype=dtype)
            x = torch.randn(rows, k, dtype=dtype)
            reps = max(1, int(1e8 // (2 * rows * n_cached * k)))
            work = 2.0 * rows * n_cached * k * reps
            rate = _best_rate(lambda: [torch.nn.functional.linear(x, w) for _ in range(reps)], work)
            flops, seconds = flops + work, seconds + work / rate
        return flops / seconds

    with torch.inference_mode():
        row_counts = sorted({*DECODE_ROWS, batch_size})
        r_dec = max(matmul_rate(rows) for rows in row_counts)
        r_pre = max(matmul_rate(rows * 40) for rows in row_counts)
        big = torch.ones(64 * 2**20, dtype=torch.float32)
        bw = _best_rate(lambda: big.sum(), big.numel() * 4.0)
    return {"R_dec": r_dec, "R_pre": r_pre, "BW": bw}


def model_shape(model) -> dict:
    import torch

    config = model.config
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "P_lin": sum({id(m.weight): m.weight.numel() for m in linears}.values()),
        "P_head": head.weight.numel(),
        "bytes": next(model.parameters()).element_size(),
        "layers": config.num_hidden_layers, "heads": heads, "head_dim": head_dim,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
    }


def limit_seconds(record: list[dict], shape: dict, rates: dict) -> tuple[float, float]:
    """(prefill seconds, decode seconds) the cost model gives for the batches in RECORD."""
    s, r = shape, rates
    weight_bytes = s["bytes"] * s["P_lin"]
    attn_per_position = s["layers"] * 4 * s["heads"] * s["head_dim"]  # FLOP per (query, key) pair, all layers
    kv_per_position = s["layers"] * 2 * s["kv_heads"] * s["head_dim"] * s["bytes"]
    prefill = decode = 0.0
    for batch in record:
        rows, shared = batch["rows"], batch.get("shared_prefix", 0)
        mean_prompt = batch["prompt_tokens"] / rows
        tokens = shared + batch["prompt_tokens"] - rows * shared  # the work: the shared prefix once
        # sum over a prompt's positions i of i attended keys ~ L^2 / 2 per row
        attention = attn_per_position * rows * mean_prompt * (mean_prompt + 1) / 2
        flops = 2 * (s["P_lin"] - s["P_head"]) * tokens + 2 * s["P_head"] * rows + attention
        prefill += max(flops / r["R_pre"], weight_bytes / r["BW"])
        lengths = batch["new_tokens"]
        for step in range(1, max(lengths)):
            active = sum(1 for n in lengths if n > step)
            context = mean_prompt + step
            flops = active * (2 * s["P_lin"] + attn_per_position * context)
            memory = weight_bytes + active * kv_per_position * context
            decode += max(flops / r["R_dec"], memory / r["BW"])
    return prefill, decode


def load_prompts(splits: list[str]) -> dict[str, list[str]]:
    from unlearn.data import read_examples

    return {name: [e.prompt for e in read_examples(EXAMPLES / f"{name}.jsonl", need_response=False)]
            for name in splits}


def timed_run(fn, loaded, prompts: dict[str, list[str]], args) -> tuple[float, float, dict, list[dict]]:
    """Wall and CPU seconds, outputs per split and batch records of FN (generate or generate_hf)."""
    outputs, record = {}, []
    calls = (dict(prompts) if args.per_file
             else {"all": [p for split in prompts.values() for p in split]})
    start, cpu_start = time.perf_counter(), time.process_time()
    answers = {name: fn(loaded.model, loaded.tokenizer, split, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, desc=False, record=record)
               for name, split in calls.items()}
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if args.per_file:
        return seconds, cpu_seconds, answers, record
    pooled, first = answers["all"], 0
    for name, split in prompts.items():
        outputs[name], first = pooled[first:first + len(split)], first + len(split)
    return seconds, cpu_seconds, outputs, record


def stop_check_seconds(tokenizer, record: list[dict], outputs: dict[str, list[str]], every: int) -> float:
    """Time to decode each live row's text every EVERY tokens, as the stop_row hook does."""
    texts = [o for split in outputs.values() for o in split]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    lengths = [n for batch in record for n in batch["new_tokens"]]
    start = time.perf_counter()
    for tokens, n in zip(ids, lengths):
        for upto in range(every, n, every):
            tokenizer.decode(tokens[:upto], skip_special_tokens=True).strip()
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    import torch

    from unlearn.generation import STOP_CHECK_EVERY, generate, generate_hf
    from unlearn.models import load_model

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    loaded = load_model(args.model, log=lambda m: print(m, file=sys.stderr))
    prompts = load_prompts(args.splits.split(","))
    print("measuring matmul rates and memory bandwidth", file=sys.stderr)
    rates = measure_machine(loaded.model, args.batch_size)
    shape = model_shape(loaded.model)

    runs = {"new": []} if args.skip_old else {"old": [], "new": []}
    cpu = {name: [] for name in runs}
    order = ["new"] if args.skip_old else (["old", "new", "new", "old"] if args.rounds > 1 else ["old", "new"])
    functions = {"old": generate_hf, "new": generate}
    results = {}
    for name in order:
        print(f"timing {name}", file=sys.stderr)
        seconds, cpu_seconds, outputs, record = timed_run(functions[name], loaded, prompts, args)
        runs[name].append(seconds)
        cpu[name].append(cpu_seconds)
        results[name] = (outputs, record)
        print(f"  {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU", file=sys.stderr)

    outputs, record = results["new"]
    tokens = sum(sum(batch["new_tokens"]) for batch in record)
    new_seconds = min(runs["new"])
    prefill_s, decode_s = limit_seconds(record, shape, rates)
    tokens_per_s = tokens / new_seconds
    limit = tokens / (prefill_s + decode_s)
    check_s = stop_check_seconds(loaded.tokenizer, record, outputs, STOP_CHECK_EVERY)
    result = {
        "model": loaded.name,
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "splits": list(prompts),
        "prompts": sum(map(len, prompts.values())),
        "batches": len(record),
        "batch_size": args.batch_size,
        "workload": "per-file" if args.per_file else "pooled",
        "max_new_tokens": args.max_new_tokens,
        "new_tokens": tokens,
        "prompt_tokens": sum(batch["prompt_tokens"] for batch in record),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_before": round(load_before, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "matmul_decode_gflop_s": round(rates["R_dec"] / 1e9, 2),
        "matmul_prefill_gflop_s": round(rates["R_pre"] / 1e9, 2),
        "read_bandwidth_gb_s": round(rates["BW"] / 1e9, 2),
        "seconds": round(new_seconds, 2),
        "seconds_runs": [round(s, 2) for s in runs["new"]],
        "tokens_per_s": round(tokens_per_s, 2),
        "limit_seconds": round(prefill_s + decode_s, 2),
        "limit_prefill_seconds": round(prefill_s, 2),
        "limit_tokens_per_s": round(limit, 2),
        "fraction_of_limit": round(tokens_per_s / limit, 3),
        "decode_limit_tokens_per_s": round(tokens / decode_s, 2),
        "cpu_seconds": round(min(cpu["new"]), 2),
        "fraction_of_limit_cpu": round((prefill_s + decode_s) * args.threads / min(cpu["new"]), 3),
        "stop_row_check_seconds": round(check_s, 3),
        "stop_row_check_share": round(check_s / new_seconds, 4),
    }
    if not args.skip_old:
        old_outputs, old_record = results["old"]
        old_seconds = min(runs["old"])
        old_tokens = sum(sum(batch["new_tokens"]) for batch in old_record)
        pairs = [(a, b) for name in prompts for a, b in zip(old_outputs[name], outputs[name])]
        result.update({
            "old_seconds": round(old_seconds, 2),
            "old_seconds_runs": [round(s, 2) for s in runs["old"]],
            "old_tokens_per_s": round(old_tokens / old_seconds, 2),
            "old_fraction_of_limit": round(old_tokens / old_seconds / limit, 3),
            "old_cpu_seconds": round(min(cpu["old"]), 2),
            "old_fraction_of_limit_cpu": round((prefill_s + decode_s) * args.threads / min(cpu["old"]), 3),
            "speedup": round(old_seconds / new_seconds, 3),
            "identical_outputs": f"{sum(a == b for a, b in pairs)}/{len(pairs)}",
        })
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
