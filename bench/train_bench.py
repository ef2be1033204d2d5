"""Speed and memory of `unlearn run`'s training step against this machine's matmul rate and a two-copy baseline.

    .venv/bin/python bench/train_bench.py [--json] [--steps N] [--warmup W] [--threads T] [--model M]

What it measures, in one run (each step variant in its own subprocess, because
peak RSS is per process; each subprocess sets the same thread count):

1. `torch.mm` of two 4096 x 4096 matrices in the step's dtype, in the step's
   process and thread count, best of 3 before the steps and 3 after (each after
   one warm-up): the attainable matmul rate. Best, not median, so the MFU below
   is measured against the ceiling, never flattered by a slow repetition; before
   and after, so that a machine shared with other jobs is sampled around the steps.
2. Our real training step: `unlearn.train.Unlearner.step()` built as `unlearn run`
   builds it (default TrainConfig: method ga, KL on normal data, batch 4, max
   length 256; LoRA via `attach_lora(LoraSettings())`; examples/forget.jsonl and
   examples/normal.jsonl; the embedded model), W warm-up steps untimed, then N
   timed steps. Variants: `fp32` (the default), `bf16` (what `--dtype bfloat16`
   does: the model is loaded in bfloat16, LoRA weights stay fp32; no autocast),
   and `naive` (the same step with `reference_model=copy.deepcopy(model)`, a
   second full copy as the paper's code and other toolkits keep; the `--full`
   code path of Unlearner supports it), and `ckpt` (fp32 with transformers'
   gradient checkpointing of the decoder layers: activations recomputed in the
   backward pass instead of kept; the recomputation is not counted as useful).
3. FLOPs of each step, counted from the rows that step actually used (see
   `step_flops`: the derivation is written there), so achieved GFLOP/s = useful
   FLOPs / step time (the median over timed steps of each step's rate: one step
   slowed by another job on a shared machine does not drag it down), MFU =
   achieved / matmul rate of the same dtype.
4. Peak RSS (VmHWM) of each variant's process, with the high-water mark reset
   (`/proc/self/clear_refs` = 5) once the model is loaded and the Unlearner built,
   so that load-time transients do not count; the resident weights, Python and
   torch do count (what the machine must have free while training).

Results go to stdout (a table, or with --json the table's JSON object as the
last line); progress to stderr. Not part of the test suite: timings depend on
the machine and its load (the 1-minute load average is printed with them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("fp32", "bf16", "naive", "ckpt")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model spec for unlearn.models.load_model [default: embedded]")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, caches)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads [default: torch's choice]")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    return parser.parse_args(argv)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the matmul ceiling -----------------------------------------------------------------


def matmul_gflops(dtype, n: int = 4096, reps: int = 3) -> float:
    """Best rate of torch.mm(n x n, n x n) over REPS after one warm-up: 2 n^3 FLOPs each."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


# -- FLOPs of one step ----------------------------------------------------------------


def _linear_shapes(layer) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of a Llama-style decoder layer, read from the modules themselves."""
    from torch import nn

    shapes = {}
    for name, module in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf != "base":
            shapes[leaf] = (module.in_features, module.out_features)
        elif hasattr(module, "base") and isinstance(module.base, nn.Linear):  # a LoRALinear
            shapes[leaf] = (module.base.in_features, module.base.out_features)
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    if set(shapes) != expected:
        raise SystemExit(f"the FLOP count is written for Llama-style layers ({sorted(expected)}), got {sorted(shapes)}")
    return shapes


class FlopModel:
    """Per-token and per-position FLOP counts of the model, written out from its shapes.

    Only matrix multiplications count (2 FLOPs per multiply-add); norms, activations,
    rotary embeddings, softmaxes and the loss are elementwise and left out. The
    embedding lookup is a gather, not a matmul: it counts 0. The tied lm_head is a
    matmul (2 d V per position), counted only at the positions `forward_logits`
    computes it for (from `first_scored_position` on).

    Forward, per token of a layer: 2 (in x out) for each of q, k, v, o, gate, up,
    down; attention scores QK^T and the weighted sum PV: 2 * 2 * H * hd per key
    attended to (a causal row of length n attends to 1, 2, ..., n keys).
    LoRA (enabled in the trainable forward only; the reference runs with adapters
    off): 2 r (in + out) per adapted projection per token.

    Backward, trainable forward only: activation gradients 2 (in x out) per
    projection whose input needs a gradient, i.e. one with a trainable weight
    upstream of it (autograd computes nothing below the first adapter: with LoRA
    on every layer's MLP, layer 0's attention and its gate/up input gradients are
    skipped, and the lm_head's input gradient counts). Attention backward is 4
    matmuls of the forward's 2 sizes (dP, dV, dQ, dK): 2 x its forward, in layers
    whose q, k or v needs a gradient. Weight gradients: only LoRA's A and B
    (2 r (in + out) per token); frozen base weights get none.
    """

    def __init__(self, model):
        from unlearn.lora import lora_modules

        config = model.config
        self.layers = len(model.model.layers)
        self.shapes = [_linear_shapes(layer) for layer in model.model.layers]
        self.hidden = config.hidden_size
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        lora = lora_modules(model)
        self.rank = {}  # (layer, projection) -> LoRA rank
        for name, module in lora.items():
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            self.rank[(layer, parts[-1])] = module.lora_A.shape[0]
        self._per_token()

    def _per_token(self):
        """Per-token FLOPs of the layers: forward (with and without LoRA) and the trainable backward."""
        fwd_base = fwd_lora = bwd = 0
        attn_bwd_layers = 0
        stream = False  # does the residual stream need a gradient (a trainable weight upstream)?
        for i, shapes in enumerate(self.shapes):
            mm = lambda p: 2 * shapes[p][0] * shapes[p][1]  # noqa: E731
            lora = lambda p: 2 * self.rank[(i, p)] * sum(shapes[p]) if (i, p) in self.rank else 0  # noqa: E731
            trained = lambda p: (i, p) in self.rank  # noqa: E731

            def backward(p, input_needs_grad):
                """Activation gradient of projection p (if its input needs one) + LoRA's weight and inner gradients."""
                total = mm(p) if input_needs_grad else 0
                if trained(p):
                    r, (n_in, n_out) = self.rank[(i, p)], shapes[p]
                    total += 2 * r * (n_in + n_out)  # dA and dB
                    total += 2 * r * n_out  # gradient into the rank-r inner activation (needed for dA)
                    total += 2 * r * n_in if input_needs_grad else 0  # ... and on through A to the input
                return total

            for p in shapes:
                fwd_base += mm(p)
                fwd_lora += lora(p)
            qkv_out = stream or any(trained(p) for p in ("q_proj", "k_proj", "v_proj"))
            bwd += sum(backward(p, stream) for p in ("q_proj", "k_proj", "v_proj"))
            attn_bwd_layers += qkv_out
            bwd += backward("o_proj", qkv_out)
            stream = qkv_out or trained("o_proj")
            act_out = stream or trained("gate_proj") or trained("up_proj")
            bwd += backward("gate_proj", stream) + backward("up_proj", stream)
            bwd += backward("down_proj", act_out)
            stream = act_out or trained("down_proj")
        self.fwd_base, self.fwd_lora, self.bwd_layers = fwd_base, fwd_lora, bwd
        self.attn_bwd_layers = attn_bwd_layers
        self.head_needs_grad = stream
        self.head = 2 * self.hidden * self.vocab  # one lm_head position, forward (and its input gradient)
        self.attn_key = 2 * 2 * self.heads * self.head_dim  # per layer, per (query, key) pair: QK^T and PV

    def rows(self, lengths, width, start, *, trainable: bool, padded: bool) -> float:
        """FLOPs of one pass over rows of LENGTHS (real tokens) padded to WIDTH, logits from START on.

        padded=False counts real tokens only (useful work, causal attention);
        padded=True counts what is computed: every position of width WIDTH, and the
        attention over all WIDTH keys (a padding mask keeps SDPA from skipping the
        upper triangle).
        """
        total = 0.0
        for n in lengths:
            tokens = width if padded else n
            pairs = width * width if padded else n * (n + 1) // 2
            positions = max((width if padded else n) - start, 0)
            fwd = tokens * (self.fwd_base + (self.fwd_lora if trainable else 0))
            fwd += self.layers * pairs * self.attn_key + positions * self.head
            total += fwd
            if trainable:
                total += tokens * self.bwd_layers + self.attn_bwd_layers * pairs * self.attn_key * 2
                total += positions * self.head if self.head_needs_grad else 0
        return total


def record_forwards(model, calls: list) -> None:
    """Append one record per forward call of MODEL: what was computed, read from the call itself.

    Counting from the calls (not from a copy of `Unlearner.loss`'s logic) keeps the count
    true to whatever the step does: how it groups rows, pads them, where it starts the
    logits, which rows get a reference pass. A pass with gradients and adapters on is a
    trainable pass (forward + backward); a no_grad pass is a reference pass (forward only).
    """
    import torch

    from unlearn.lora import lora_modules

    adapters = list(lora_modules(model).values())

    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        width = input_ids.shape[1]
        lengths = mask.sum(dim=1).tolist() if mask is not None else [width] * input_ids.shape[0]
        keep = kwargs.get("logits_to_keep", 0)
        if isinstance(keep, torch.Tensor):  # positions; the FLOP count needs a trailing range START..width-1
            kept = keep.tolist()
            if keep.ndim != 1 or kept != list(range(width - len(kept), width)):
                raise SystemExit("the FLOP count handles logits_to_keep as a count or a trailing range only")
            keep = len(kept)
        keep = keep or width  # transformers: 0 means every position
        trainable = torch.is_grad_enabled() and any(m.enabled for m in adapters) or (
            torch.is_grad_enabled() and not adapters)
        calls.append({"lengths": [int(n) for n in lengths], "width": width, "start": width - int(keep),
                      "trainable": bool(trainable)})

    model.register_forward_pre_hook(hook, with_kwargs=True)


def step_flops(flop_model: FlopModel, calls: list) -> dict:
    """Useful and executed FLOPs, and real and computed tokens, of the forward CALLS of one step.

    Useful: real (non-padding) tokens, causal attention, lm_head at real positions from the
    call's start. Executed: every position computed, padding included. Right padding is
    assumed (collate's): a row's real tokens are its first `length` positions.
    """
    out = {"real_tokens": 0, "computed_tokens": 0, "useful": 0.0, "executed": 0.0}
    for call in calls:
        out["real_tokens"] += sum(call["lengths"])
        out["computed_tokens"] += call["width"] * len(call["lengths"])
        for kind, padded in (("useful", False), ("executed", True)):
            out[kind] += flop_model.rows(call["lengths"], call["width"], call["start"],
                                         trainable=call["trainable"], padded=padded)
    return out


# -- one variant, in its own process ----------------------------------------------------


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_child(args) -> dict:
    """Build the step as `unlearn run` does, time it, count its FLOPs, report peak RSS."""
    variant = args.child
    rss_start = _status_mb("VmRSS")
    import copy

    import torch

    from unlearn.data import read_examples
    from unlearn.lora import LoraSettings, attach_lora
    from unlearn.models import enable_gradient_checkpointing, load_model
    from unlearn.train import TrainConfig, Unlearner

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig()  # the defaults of `unlearn run`
    forget = read_examples(REPO / "examples" / "forget.jsonl")
    normal = read_examples(REPO / "examples" / "normal.jsonl")
    rss_imported = _status_mb("VmRSS")
    torch.manual_seed(config.seed)  # as run.py, before loading
    loaded = load_model(args.model, dtype="bfloat16" if variant == "bf16" else "float32", log=_log)
    model = loaded.model
    # The naive baseline's reference: a plain deep copy of the original model, as other code keeps it.
    reference = copy.deepcopy(model).eval().requires_grad_(False) if variant == "naive" else None
    attach_lora(model, LoraSettings(), seed=config.seed)
    if variant == "ckpt":
        enable_gradient_checkpointing(model)  # what `unlearn run --gradient-checkpointing` does
    unlearner = Unlearner(model, loaded.tokenizer, forget, normal, config, reference_model=reference)
    flop_model = FlopModel(model)
    calls = []
    for m in {id(model): model, id(reference): reference}.values():
        if m is not None:
            record_forwards(m, calls)
    per_step = []  # the forward calls of each step
    rss_loaded = _status_mb("VmRSS")
    mm_dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    mm_rates = [matmul_gflops(mm_dtype)]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: load-time transients do not count

    records, seconds, tokens = [], [], []
    for i in range(args.warmup + args.steps):
        before_tokens = unlearner.tokens
        calls.clear()
        start = time.perf_counter()
        records.append(unlearner.step())
        elapsed = time.perf_counter() - start
        per_step.append(list(calls))
        if i >= args.warmup:
            seconds.append(elapsed)
            tokens.append(unlearner.tokens - before_tokens)
        _log(f"{variant}: step {i + 1} {elapsed:.2f} s loss {records[-1]['loss']:.4f}"
             + (" (warm-up)" if i < args.warmup else ""))
    peak = _status_mb("VmHWM")  # read before the matmul below, whose 3 x 64 MiB matrices are not the step's
    mm_rates.append(matmul_gflops(mm_dtype))
    counts = [step_flops(flop_model, step_calls) for step_calls in per_step[args.warmup:]]
    total = sum(seconds)
    useful = sum(c["useful"] for c in counts)
    executed = sum(c["executed"] for c in counts)
    return {
        "variant": variant,
        "threads": torch.get_num_threads(),
        "matmul_gflops": max(mm_rates),
        "step_s_median": statistics.median(seconds),
        "step_s_mean": total / len(seconds),
        "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, seconds)),  # as `unlearn run` counts
        # them: non-padding tokens through every forward pass, the reference's included
        "useful_gflop_per_step": useful / len(counts) / 1e9,
        "executed_gflop_per_step": executed / len(counts) / 1e9,
        "achieved_gflops": statistics.median(c["useful"] / s for c, s in zip(counts, seconds)) / 1e9,
        "executed_gflops": statistics.median(c["executed"] / s for c, s in zip(counts, seconds)) / 1e9,
        "padding_waste": 1 - sum(c["real_tokens"] for c in counts) / sum(c["computed_tokens"] for c in counts),
        "loss_first_step": records[0]["loss"],
        "loss_by_step": [r["loss"] for r in records],
        "rss_start_mb": rss_start,
        "rss_imported_mb": rss_imported,
        "rss_loaded_mb": rss_loaded,
        "peak_rss_mb": peak,
    }


def spawn(variant: str, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant,
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.model:
        command += ["--model", args.model]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"variant {variant} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the report ------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    variants = [v for v in args.variants.split(",") if v]
    if not set(variants) <= set(VARIANTS) or "fp32" not in variants:
        raise SystemExit(f"--variants: a subset of {VARIANTS} that includes fp32")
    load_before = os.getloadavg()[0]
    runs = {}
    for variant in variants:
        _log(f"variant {variant} ...")
        runs[variant] = spawn(variant, args)
    fp32 = runs["fp32"]
    fp32_rate = fp32["matmul_gflops"]
    result = {
        "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        "threads": fp32["threads"],
        "timed_steps": args.steps,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "matmul_fp32_gflops": round(fp32_rate, 1),
        "step_s": round(fp32["step_s_median"], 3),
        "tokens_per_s": round(fp32["tokens_per_s"], 1),
        "useful_gflop_per_step": round(fp32["useful_gflop_per_step"], 1),
        "executed_gflop_per_step": round(fp32["executed_gflop_per_step"], 1),
        "padding_waste": round(fp32["padding_waste"], 3),
        "achieved_gflops": round(fp32["achieved_gflops"], 1),
        "mfu_fp32": round(fp32["achieved_gflops"] / fp32_rate, 3),
        "mfu_fp32_executed": round(fp32["executed_gflops"] / fp32_rate, 3),
        "loss_fp32_first_step": round(fp32["loss_first_step"], 5),
        "peak_rss_mb": round(fp32["peak_rss_mb"], 1),
        "rss_loaded_mb": round(fp32["rss_loaded_mb"], 1),
    }
    if "bf16" in runs:
        bf16 = runs["bf16"]
        bf16_rate = bf16["matmul_gflops"]
        result.update({
            "matmul_bf16_gflops": round(bf16_rate, 1),
            "bf16_step_s": round(bf16["step_s_median"], 3),
            "bf16_tokens_per_s": round(bf16["tokens_per_s"], 1),
            "bf16_achieved_gflops": round(bf16["achieved_gflops"], 1),
            "mfu_bf16": round(bf16["achieved_gflops"] / bf16_rate, 3),
            "loss_bf16_first_step": round(bf16["loss_first_step"], 5),
            "bf16_peak_rss_mb": round(bf16["peak_rss_mb"], 1),
        })
    if "naive" in runs:
        naive = runs["naive"]
        result.update({
            "naive_step_s": round(naive["step_s_median"], 3),
            "naive_peak_rss_mb": round(naive["peak_rss_mb"], 1),
            "rss_ratio_vs_two_copy": round(fp32["peak_rss_mb"] / naive["peak_rss_mb"], 3),
        })
    if "ckpt" in runs:
        ckpt = runs["ckpt"]
        result.update({
            "ckpt_step_s": round(ckpt["step_s_median"], 3),
            "mfu_fp32_ckpt": round(ckpt["achieved_gflops"] / ckpt["matmul_gflops"], 3),
            "ckpt_peak_rss_mb": round(ckpt["peak_rss_mb"], 1),
        })
        if "naive" in runs:  # ours with checkpointing against the two-copy step without (as other code runs)
            result["rss_ratio_ckpt_vs_two_copy"] = round(ckpt["peak_rss_mb"] / runs["naive"]["peak_rss_mb"], 3)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
