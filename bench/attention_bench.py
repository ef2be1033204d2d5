"""Eager attention against SDPA in `unlearn run`'s training step, alternating in one process.

    .venv/bin/python bench/attention_bench.py [--dtype bfloat16|float32] [--shape default|opt-1.3b|opt-2.7b]
        [--pairs N] [--threads T] [--exactness [--batches 6]] [--json]

Why one process: between processes the same step's time moves by about +-8 % on the 2-core
machines here (bench/train_bench.py's MFU over five runs: 0.539-0.646), more than the difference
measured. So one process builds a step like bench/train_bench.py's (the embedded model, the
example rows, LoRA, TrainConfig's own defaults: its forget loss is plain ascent, where train_bench and
`unlearn run`'s `ga` now train `spellings`; both arms train the same loss, and every figure this
bench gave in docs/speed.md was measured so), draws one step's rows once and keeps them (every step
then does the same work), and times N pairs of steps, in alternating order: one with transformers'
eager attention (`eager_attention` below: measured, not used) and one with what `unlearn run` runs
(`attention.training_attention`: in bf16 SDPA's math kernel, in float32 torch's own kernel choice).
Reported: each arm's median step time and the median over pairs of eager / SDPA (below 1: eager is
faster). The losses are not compared: the weights move at every step, so the two arms' losses are
those of different weights. `--exactness` compares what matters instead (see `exactness`).
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
    parser.add_argument("--exactness", action="store_true", help="also each arm's error against a float32 "
                        "forward and backward of the same rows (bf16, --shape default only; see `exactness`)")
    parser.add_argument("--batches", type=int, default=6, help="with --exactness: how many drawn batches")
    parser.add_argument("--json", action="store_true", help="the result as a JSON object on the last line")
    args = parser.parse_args(argv)
    if args.exactness and (args.dtype != "bfloat16" or args.shape != "default"):
        parser.error("--exactness: bf16 on --shape default only (an OPT shape's random weights differ by dtype)")

    import torch

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
    draws = [unlearner._rows() for _ in range(args.batches if args.exactness else 1)]
    rows = draws[0]
    unlearner._rows = lambda: dict(rows)  # every step the same rows, the same work (step() pops groups from its dict)

    arms = {"eager": eager_attention, "sdpa": attention.training_attention}
    exact = (exactness(shape, arms, [draw["forget"] + draw["normal"] for draw in draws], unlearner.pad_id)
             if args.exactness else {})
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
              "eager_over_sdpa": round(statistics.median(e / s for e, s in zip(times["eager"], times["sdpa"])), 4),
              **exact}
    for key, value in result.items():
        print(f"{key:18s} {value}")
    if args.json:
        print(json.dumps(result))


@contextlib.contextmanager
def eager_attention(model):
    """Transformers' eager attention (matmuls and a float32 softmax) inside, on every config of MODEL that asks for SDPA."""
    configs = {}  # a model's layers share its config object: each one once
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            configs[id(config)] = config
    for config in configs.values():
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        for config in configs.values():
            config._attn_implementation = "sdpa"


def exactness(shape, arms: dict, batches: list[list[dict]], pad_id: int) -> dict:
    """Each arm's bf16 forward and backward against float32's, the same weights in both, over BATCHES.

    The embedded model is loaded in float32 and in bf16 with LoRA attached, and for batch i every
    LoRA B of both is set to the same small non-zero values (seed i; B = 0, as at the start, has no
    gradient through A). Per batch, over its real scored positions: mean |logit - float32's logit|
    and mean KL(p_float32 || p_arm); of the LoRA gradient of the mean response NLL, its relative
    error |g - g_float32| / |g_float32|. Reported: the means over batches, and the gradient error of
    each batch (it varies with the rows: one number would mislead).
    """
    import torch

    import train_bench
    from unlearn import losses, train
    from unlearn.data import collate
    from unlearn.lora import LoraSettings, attach_lora, lora_modules

    models = {}
    for dtype in ("float32", "bfloat16"):
        models[dtype] = train_bench.build_model(shape, dtype)[0]
        attach_lora(models[dtype], LoraSettings(), seed=0)
    runs = {"float32": ("float32", lambda model: contextlib.nullcontext())}
    runs.update((arm, ("bfloat16", context)) for arm, context in arms.items())
    per_batch = {arm: {"logit_error": [], "kl_from_fp32": [], "grad_rel_error": []} for arm in arms}
    for i, rows in enumerate(batches):
        batch = collate(rows, pad_id)
        start = train.first_scored_position(batch["labels"])
        keep = torch.arange(start, batch["input_ids"].shape[1])
        real = batch["attention_mask"][:, start:].bool()
        for model in models.values():
            generator = torch.Generator().manual_seed(i)
            for module in lora_modules(model).values():
                module.lora_B.data = 0.01 * torch.randn(module.lora_B.shape, generator=generator)
        out = {}
        for name, (dtype, context) in runs.items():
            model = models[dtype]
            model.zero_grad(set_to_none=True)
            with context(model):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               logits_to_keep=keep).logits
            losses.mean_nll(logits, batch["labels"][:, start:]).backward()
            gradient = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
            out[name] = (logits.detach().float(), gradient)
        exact_logits, exact_gradient = out["float32"]
        exact_log_p = exact_logits.log_softmax(-1)
        for arm in arms:
            logits, gradient = out[arm]
            kl = (exact_log_p.exp() * (exact_log_p - logits.log_softmax(-1))).sum(-1)
            per_batch[arm]["logit_error"].append(float((logits - exact_logits).abs()[real].mean()))
            per_batch[arm]["kl_from_fp32"].append(float(kl[real].mean()))
            per_batch[arm]["grad_rel_error"].append(float((gradient - exact_gradient).norm() / exact_gradient.norm()))
    result = {}
    for arm, measures in per_batch.items():
        for measure, values in measures.items():
            result[f"{arm}_{measure}"] = round(statistics.mean(values), 5)
        result[f"{arm}_grad_rel_error_by_batch"] = [round(v, 4) for v in measures["grad_rel_error"]]
    return result

if __name__ == "__main__":
    main()
