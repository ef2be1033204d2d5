"""Speed and memory of `unlearn run`'s training step against this machine's matmul rate and the weights' size.

    .venv/bin/python bench/train_bench.py [--json] [--shape default|opt-1.3b|opt-2.7b] [--dtype D]
        [--steps N] [--warmup W] [--threads T] [--model M] [--rows examples|N] [--variants V,...]

What it measures, in one run (each step variant in its own subprocess, because
peak RSS is per process; each subprocess sets the same thread count):

1. `torch.mm` of two 4096 x 4096 matrices in the step's dtype, in the step's
   process and thread count, best of 3 before the steps and 3 after (each after
   one warm-up): the attainable matmul rate. Best, not median, so the MFU below
   is measured against the ceiling, never flattered by a slow repetition; before
   and after, so that a machine shared with other jobs is sampled around the steps.
2. Our real training step: `unlearn.train.Unlearner.step()` built as `unlearn run`
   builds it (default TrainConfig: method ga, KL on normal data, batch 4, max
   length 256, with ga's forget loss from config.PER_METHOD (spellings since the thirty-ninth
   session; before it the step ran TrainConfig's own, ascent); without the automatic probes'
   retain KL, which `unlearn run` adds when it builds probes; LoRA via `attach_lora(LoraSettings())`, i.e. the feed-forward
   projections: gate/up/down on Llama, fc1/fc2 on OPT), W warm-up steps untimed,
   then N timed steps.
   The model (`--shape`):
   - `default`: the embedded model (or `--model M`), rows from examples/forget.jsonl
     and examples/normal.jsonl as they are (51-65 and 61-88 tokens with SmolLM2's
     chat template);
   - `opt-1.3b`, `opt-2.7b`: the paper's models (Yao et al. unlearn OPT-1.3B and
     OPT-2.7B), built as `OPTForCausalLM` from the configuration values of
     facebook/opt-1.3b and facebook/opt-2.7b written in `SHAPES` below, with
     RANDOM weights (nothing is downloaded; time and memory do not depend on the
     values). The model is built directly in the step's dtype, each weight
     allocated and initialised once, so building never holds two copies.
     Tokenizer: the embedded SmolLM2 one (a byte-level BPE like OPT's GPT-2 BPE,
     with a chat template). Its 49152 ids are all below OPT's vocabulary size
     50272, so its ids are used as OPT ids unchanged; the lm_head keeps OPT's real
     width (50272), which is what the logits' memory and FLOPs depend on.
     Rows (`--rows`, default 128 for these shapes): the example rows lengthened to
     exactly 128 tokens (each response followed by other normal responses, then
     cut by max length 128). The examples' own 51-88 tokens are shorter than the
     paper's (PKU-SafeRLHF answers run to a few hundred tokens); 128 is the size
     the memory estimate below is written for. `--rows examples` uses them as they are.
   Variants: `fp32` (the default), `bf16` (what `--dtype bfloat16` does: the model
   in bfloat16, LoRA weights stay fp32; no autocast), `naive` (the same step with
   `reference_model=copy.deepcopy(model)`, a second full copy as the paper's code
   and other toolkits keep; the `--full` code path of Unlearner supports it), and
   `ckpt` (fp32 with transformers' gradient checkpointing of the decoder layers:
   activations recomputed in the backward pass instead of kept; the recomputation
   is not counted as useful). `bf16+ckpt` combines the two. `--dtype bfloat16`
   (or float32) is a shorthand for the variant of that dtype alone. On a CPU whose
   bf16 matmuls run at under half the float32 rate (no bf16 instructions:
   `unlearn.system.slow_low_precision_note`) the default list leaves bf16 out and
   says why; asked for by name it runs. `autocast` (not in the default list) is
   `unlearn run --autocast bf16`: the float32 model, its step's passes under bf16
   autocast; its MFU is against the bf16 rate, and `autocast_over_fp32` is its
   median step time over the fp32 variant's, both measured in the same run.
3. FLOPs of each step, counted from the rows that step actually used (see
   `step_flops`: the derivation is written there), so achieved GFLOP/s = useful
   FLOPs / step time (the median over timed steps of each step's rate: one step
   slowed by another job on a shared machine does not drag it down), MFU =
   achieved / matmul rate of the same dtype. `mfu_*_beside`: each timed step's
   useful FLOP/s over the mean of two rates measured just before and just after
   it (best of 2 `torch.mm`, the same size), median over the steps: a machine
   whose speed drifts during a run (other jobs, a neighbour's phases) moves both
   sides of that ratio together, where the best rate of the run is a ceiling the
   step may never have been offered.
4. Peak RSS (VmHWM) of each variant's process, with the high-water mark reset
   (`/proc/self/clear_refs` = 5) once the model is loaded and the Unlearner built,
   so that load-time transients do not count; the resident weights, Python and
   torch do count (what the machine must have free while training).
   `rss_over_weights` = peak RSS / (the model's parameter count x 4 bytes), the
   fp32 size of its weights (LoRA's not counted: about 1% of them on the embedded model, less at the OPT sizes).
   Where the peak is (`memory`, see `MemoryProbe`): the high-water mark is also
   reset around each backward pass, so the peak of the forward passes and losses and
   the peak of the backward passes and optimiser step are read apart; with them the
   most bytes autograd keeps for one backward (every tensor it saves, counted once
   per storage, weights excluded), the logits of each forward call, and the
   optimiser state.

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
VARIANTS = ("fp32", "bf16", "naive", "ckpt", "autocast")
# Modifiers, appended to a variant with "+": "ckpt" (gradient checkpointing, as `unlearn run
# --gradient-checkpointing`); and three changes measured here before they were made in the
# library (each monkeypatched into the variant's process by `apply_proposed`; all three are now
# what `unlearn run` does, in attention.training_attention, lora.LoRALinear and
# models.tune_allocator, so on the shapes they apply to they change nothing):
# "math" runs attention with SDPA's math kernel in bf16 (the CPU flash kernel's bf16 backward is
# ~2x slower than the matmuls and softmax it replaces), "lora16" computes LoRA's two small matmuls
# in the activations' dtype (the fp32 adapter weights are cast, instead of every activation),
# "mmap" fixes glibc's mmap threshold at 128 KiB (glibc otherwise raises it to the size of the
# largest block freed, up to 32 MiB, and activations freed into the heap stay resident); set
# through glibc's MALLOC_MMAP_THRESHOLD_ in the variant's environment, as mallopt would (on a model
# under 1 GiB, `tune_allocator`'s mallopt after loading then replaces it: +mmap measures nothing there).
MODIFIERS = ("ckpt", "math", "lora16", "mmap")
LOW_PRECISION = ("bf16", "autocast")  # the variants whose products run in bf16
DTYPE_VARIANT = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16"}

# The configuration values of the paper's models (config.json of facebook/opt-1.3b and
# facebook/opt-2.7b on the Hugging Face hub); everything else is OPTConfig's default, which
# those files repeat: relu, layer norm before, dropout 0.1, biases, tied lm_head, pad 1, bos/eos 2.
SHAPES = {
    "opt-1.3b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "ffn_dim": 8192,
                 "vocab_size": 50272, "max_position_embeddings": 2048, "word_embed_proj_dim": 2048},
    "opt-2.7b": {"hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32, "ffn_dim": 10240,
                 "vocab_size": 50272, "max_position_embeddings": 2048, "word_embed_proj_dim": 2560},
}
OPT_COMMON = {"activation_function": "relu", "do_layer_norm_before": True, "dropout": 0.1,
              "attention_dropout": 0.0, "enable_bias": True, "pad_token_id": 1, "bos_token_id": 2,
              "eos_token_id": 2, "tie_word_embeddings": True}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="default", choices=("default", *SHAPES),
                        help="the embedded model, or an OPT of the paper's sizes with random weights")
    parser.add_argument("--model", default=None, help="model spec for unlearn.models.load_model "
                        "[default: embedded; --shape default only]")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPE_VARIANT),
                        help="run only the variant of this dtype (shorthand for --variants fp32 or bf16)")
    parser.add_argument("--rows", default=None, help="'examples' (as they are) or a token count to lengthen "
                        "them to [default: examples; 128 for the OPT shapes]")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, caches)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads [default: torch's choice]")
    parser.add_argument("--variants", default=None, help=f"comma-separated, each one of {VARIANTS} "
                        f"with any of the modifiers +{', +'.join(MODIFIERS)} (e.g. bf16+ckpt) "
                        "[default: all for --shape default; fp32,bf16 for the OPT shapes]")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:  # no timed step: no median to report (a traceback at the end)
        parser.error("--steps must be at least 1 and --warmup 0 or more")
    if args.model and args.shape != "default":
        parser.error("--model and --shape opt-*: pick one")
    if args.rows is None:
        args.rows = "examples" if args.shape == "default" else "128"
    if args.rows != "examples" and not (args.rows.isdigit() and int(args.rows) >= 16):
        parser.error(f"--rows {args.rows}: 'examples' or a token count of at least 16")
    args.chosen_variants = args.variants is not None or args.dtype is not None  # asked for, not the default list
    if args.variants is None:
        args.variants = (DTYPE_VARIANT[args.dtype] if args.dtype else
                         ",".join(VARIANTS[:4]) if args.shape == "default" else "fp32,bf16")
    elif args.dtype:
        parser.error("--dtype and --variants: pick one")
    return args


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


def mfu_beside(useful_flops: list[float], seconds: list[float], beside_gflops: list[float]) -> float:
    """The median over steps of step i's useful GFLOP/s over the mean of the matmul rates measured just
    before it (BESIDE_GFLOPS[i]) and just after it ([i + 1]): one more rate than steps."""
    if len(beside_gflops) != len(seconds) + 1 or len(useful_flops) != len(seconds):
        raise ValueError(f"{len(useful_flops)} steps' FLOPs, {len(seconds)} times and {len(beside_gflops)} rates "
                         f"around them: expected n, n and n + 1")
    return statistics.median(flops / 1e9 / s / ((before + after) / 2) for flops, s, before, after
                             in zip(useful_flops, seconds, beside_gflops, beside_gflops[1:]))


# -- FLOPs of one step ----------------------------------------------------------------

# The projections of a decoder layer by the role they play, in the two families the
# FLOP count is written for (Llama-style and OPT): attention's inputs and output, the
# feed-forward's inputs and output.
ATTN_IN = ("q_proj", "k_proj", "v_proj")
ATTN_OUT = ("o_proj", "out_proj")
MLP_IN = ("gate_proj", "up_proj", "fc1")
MLP_OUT = ("down_proj", "fc2")


def decoder_layers(model):
    """The decoder layers: model.model.layers (Llama-style) or model.model.decoder.layers (OPT)."""
    inner = model.model
    return inner.layers if hasattr(inner, "layers") else inner.decoder.layers


def _linear_shapes(layer) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of a Llama-style or OPT decoder layer, read from the modules themselves."""
    from torch import nn

    shapes = {}
    for name, module in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf != "base":
            shapes[leaf] = (module.in_features, module.out_features)
        elif hasattr(module, "base") and isinstance(module.base, nn.Linear):  # a LoRALinear
            shapes[leaf] = (module.base.in_features, module.base.out_features)
    roles = [[p for p in group if p in shapes] for group in (ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT)]
    known = {p for group in roles for p in group}
    if set(shapes) != known or roles[0] != list(ATTN_IN) or len(roles[1]) != 1 or not roles[2] or len(roles[3]) != 1:
        raise SystemExit(f"the FLOP count is written for Llama-style and OPT layers, got {sorted(shapes)}")
    return shapes


class FlopModel:
    """Per-token and per-position FLOP counts of the model, written out from its shapes.

    Only matrix multiplications count (2 FLOPs per multiply-add); norms, activations,
    biases, dropout, rotary or learned position embeddings, softmaxes and the loss are
    elementwise or gathers and left out. The embedding lookup is a gather, not a
    matmul: it counts 0. The tied lm_head is a matmul (2 d V per position), counted
    only at the positions `forward_logits` computes it for (from `first_scored_position` on).

    Forward, per token of a layer: 2 (in x out) for each projection (q, k, v, o, gate,
    up, down on Llama; q, k, v, out, fc1, fc2 on OPT); attention scores QK^T and the
    weighted sum PV: 2 * 2 * H * hd per key attended to (a causal row of length n
    attends to 1, 2, ..., n keys).
    LoRA (enabled in the trainable forward only; the reference runs with adapters
    off): 2 r (in + out) per adapted projection per token.

    Backward, trainable forward only: activation gradients 2 (in x out) per
    projection whose input needs a gradient, i.e. one with a trainable weight
    upstream of it (autograd computes nothing below the first adapter: with LoRA
    on every layer's MLP, layer 0's attention and its MLP-input gradients are
    skipped, and the lm_head's input gradient counts). Attention backward is 4
    matmuls of the forward's 2 sizes (dP, dV, dQ, dK): 2 x its forward, in layers
    whose q, k or v needs a gradient. Weight gradients: only LoRA's A and B
    (2 r (in + out) per token); frozen base weights get none.
    """

    def __init__(self, model):
        from unlearn.lora import lora_modules

        config = model.config
        layers = decoder_layers(model)
        self.layers = len(layers)
        self.shapes = [_linear_shapes(layer) for layer in layers]
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
            attn_out = next(p for p in ATTN_OUT if p in shapes)
            mlp_in = [p for p in MLP_IN if p in shapes]
            mlp_out = next(p for p in MLP_OUT if p in shapes)

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
            qkv_out = stream or any(trained(p) for p in ATTN_IN)
            bwd += sum(backward(p, stream) for p in ATTN_IN)
            attn_bwd_layers += qkv_out
            bwd += backward(attn_out, qkv_out)
            stream = qkv_out or trained(attn_out)
            act_out = stream or any(trained(p) for p in mlp_in)
            bwd += sum(backward(p, stream) for p in mlp_in)
            bwd += backward(mlp_out, act_out)
            stream = act_out or trained(mlp_out)
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



# -- the model and the rows ------------------------------------------------------------


def build_model(args, dtype: str):
    """(model in eval mode, tokenizer, name) for --shape: the embedded model, or a random-weight OPT."""
    import torch

    from unlearn.models import load_model, load_tokenizer, resolve_model_dir, tune_allocator, torch_dtype

    if args.shape == "default":
        loaded = load_model(args.model, dtype=dtype, log=_log)
        return loaded.model, loaded.tokenizer, loaded.name
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(**SHAPES[args.shape], **OPT_COMMON)
    # Built in the target dtype: each weight is allocated once, in that dtype, and initialised in
    # place (normal, std 0.02, as OPT's _init_weights), so no float32 copy exists on the way to bf16.
    model = OPTForCausalLM._from_config(config, dtype=torch_dtype(dtype)).eval()
    assert next(model.parameters()).dtype == torch_dtype(dtype) and torch.get_default_dtype() == torch.float32
    tune_allocator(model)  # as load_model does after loading: the allocator `unlearn run` has
    tokenizer = load_tokenizer(resolve_model_dir(None, log=_log))  # the embedded SmolLM2 tokenizer (see top)
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"the tokenizer's {len(tokenizer)} ids do not fit the model's vocabulary {config.vocab_size}")
    return model, tokenizer, f"{args.shape} (random weights)"


def read_rows(args, tokenizer):
    """(forget, normal, max_length): the example rows, as they are or lengthened to --rows tokens.

    Lengthened: each response is followed by the next normal responses (in file order,
    wrapping) until prompt + response is at least N tokens; max_length N then cuts every
    row to exactly N (encode_pair keeps the prompt and the start of the response, so a
    forget row's answer span, near the start of its response, is still scored).
    """
    from dataclasses import replace

    from unlearn.data import read_examples
    from unlearn.train import TrainConfig

    forget = read_examples(REPO / "examples" / "forget.jsonl")
    normal = read_examples(REPO / "examples" / "normal.jsonl")
    if args.rows == "examples":
        return forget, normal, TrainConfig().max_length
    n = int(args.rows)
    filler = [e.response for e in normal]

    def lengthen(example, start):
        response, k = example.response, start
        count = lambda text: len(tokenizer(example.prompt + " " + text)["input_ids"])  # noqa: E731
        while count(response) < n + 8:  # + 8: the chat template's own tokens vary by family
            response += " " + filler[k % len(filler)]
            k += 1
        return replace(example, response=response)

    return ([lengthen(e, i) for i, e in enumerate(forget)],
            [lengthen(e, i + 1) for i, e in enumerate(normal)], n)


# -- where the memory goes -------------------------------------------------------------


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


class MemoryProbe:
    """Per step: the peak RSS of its forwards + losses and of its backwards + optimiser step, read apart.

    The high-water mark is reset when the step starts, before and after each backward
    pass (torch.autograd.backward, which Tensor.backward calls, is wrapped in this
    process), and read at those points, so `forward_peak_mb` is the highest RSS while the
    forward passes and the losses run (the graph of each is alive: the activations) and
    `backward_peak_mb` the highest during the backward passes, clipping and the optimiser
    step, whether the step makes one backward or one per piece of its rows
    (`Unlearner._backward_in_pieces`). The step's peak is the larger. Also counted:
    - `saved_mb`: the most bytes autograd holds for a backward at once (every tensor
      packed by saved_tensors_hooks between two backward passes, counted once per storage,
      parameters excluded): the activations. Under gradient checkpointing transformers'
      own hooks take over inside each layer, so only what they keep outside is counted;
    - `logits_mb`: the logits each forward call returns, summed over the step's calls;
    - `backward_passes`: how many backward passes the step made.
    """

    def __init__(self, model, unlearner):
        import torch

        self.torch = torch
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.steps: list[dict] = []
        self.current: dict = {}
        self.saved: dict[int, int] = {}
        inner_backward = torch.autograd.backward

        def backward(*args, **kwargs):
            self._peak("forward_peak_mb")
            self.current["saved_mb"] = max(self.current.get("saved_mb", 0.0), sum(self.saved.values()) / 2**20)
            self.saved = {}
            self.current["backward_passes"] = self.current.get("backward_passes", 0) + 1
            out = inner_backward(*args, **kwargs)
            self._peak("backward_peak_mb")
            return out

        torch.autograd.backward = backward  # Tensor.backward looks it up on the module at each call
        model.register_forward_hook(self._logits)
        reference = getattr(unlearner, "reference_model", None)
        if reference is not None and reference is not model:  # the naive two-copy step's reference forward too
            reference.register_forward_hook(self._logits)

    def _peak(self, key: str) -> None:
        """Fold the high-water mark since the last reset into KEY, and reset it."""
        self.current[key] = max(self.current.get(key, 0.0), _status_mb("VmHWM"))
        reset_peak()

    def _logits(self, module, args, output):
        self.current["logits_mb"] = self.current.get("logits_mb", 0.0) + output.logits.nbytes / 2**20

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.param_storages:
            self.saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def step(self, unlearner) -> dict:
        self.current, self.saved = {"rss_before_step_mb": _status_mb("VmRSS")}, {}
        reset_peak()
        with self.torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            record = unlearner.step()
        self._peak("backward_peak_mb")  # and the optimiser step's
        self.current["rss_after_step_mb"] = _status_mb("VmRSS")
        self.steps.append(self.current)
        return record

    def summary(self, optimizer) -> dict:
        state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if self.torch.is_tensor(t))
        worst = max(self.steps, key=lambda s: max(s["forward_peak_mb"], s["backward_peak_mb"]))
        return {**{k: round(v, 1) for k, v in worst.items()}, "optimizer_state_mb": round(state / 2**20, 1)}


# -- proposed library changes, measured before they are made --------------------------


def apply_proposed(mods: set) -> None:
    """Monkeypatch the changes named in MODS into this process (see MODIFIERS; now in the library)."""
    import torch

    from unlearn import lora, train

    if "math" in mods:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        inner_forward_logits = train.forward_logits

        def forward_logits(model, batch, start):
            low = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
            if not low:
                return inner_forward_logits(model, batch, start)
            with sdpa_kernel(SDPBackend.MATH):  # the backward runs where the forward chose
                return inner_forward_logits(model, batch, start)

        train.forward_logits = forward_logits
    if "lora16" in mods:
        def forward(self, x):
            out = self.base(x)
            if not self.enabled:
                return out
            a, b = self.lora_A.to(x.dtype), (self.lora_B * self.scaling).to(x.dtype)
            return out + (self.dropout(x) @ a.t()) @ b.t()

        lora.LoRALinear.forward = forward


# -- one variant, in its own process ----------------------------------------------------


def run_child(args) -> dict:
    """Build the step as `unlearn run` does, time it, count its FLOPs, report peak RSS and where it is."""
    variant = args.child
    rss_start = _status_mb("VmRSS")
    import copy

    import torch

    from unlearn.lora import LoraSettings, attach_lora
    from unlearn.models import enable_gradient_checkpointing
    from unlearn.config import PER_METHOD
    from unlearn.train import TrainConfig, Unlearner

    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = variant.startswith("bf16")
    autocast = variant.startswith("autocast")  # a float32 model, the step's passes under bf16 autocast
    rss_imported = _status_mb("VmRSS")
    torch.manual_seed(TrainConfig().seed)  # as run.py, before loading
    model, tokenizer, name = build_model(args, "bfloat16" if bf16 else "float32")
    forget, normal, max_length = read_rows(args, tokenizer)
    # `unlearn run`'s step for ga: TrainConfig's defaults with ga's forget loss (config.PER_METHOD; its rate and
    # stop margin change no work in a step). The automatic probes' retain KL is not in it (see the docstring).
    config = TrainConfig(max_length=max_length, forget_loss=PER_METHOD["ga"]["forget_loss"],
                         autocast="bf16" if autocast else "off")
    # fp32 size of the weights, each counted once (the lm_head is tied to the embedding).
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    # The naive baseline's reference: a plain deep copy of the original model, as other code keeps it.
    reference = copy.deepcopy(model).eval().requires_grad_(False) if variant.split("+")[0] == "naive" else None
    attach_lora(model, LoraSettings(), seed=config.seed)
    mods = set(variant.split("+")[1:])
    apply_proposed(mods)
    if variant.startswith("ckpt") or "ckpt" in mods:
        enable_gradient_checkpointing(model)  # what `unlearn run --gradient-checkpointing` does
    unlearner = Unlearner(model, tokenizer, forget, normal, config, reference_model=reference)
    flop_model = FlopModel(model)
    calls = []
    for m in {id(model): model, id(reference): reference}.values():
        if m is not None:
            record_forwards(m, calls)
    probe = MemoryProbe(model, unlearner)
    per_step = []  # the forward calls of each step
    rss_loaded = _status_mb("VmRSS")
    mm_dtype = torch.bfloat16 if bf16 or autocast else torch.float32
    mm_rates = [matmul_gflops(mm_dtype)]
    # The rate beside each timed step: measured just before its first timed step and after each, so step i sits
    # between beside[i] and beside[i + 1]. A shared machine's speed drifts within a run (three runs of one session
    # gave mfu_fp32 0.73, 0.52 and 0.49 against the run's best rate); the step's rate over the mean of the two
    # rates around it compares the step with what the machine gave at that time.
    beside = []

    records, seconds, tokens = [], [], []
    for i in range(args.warmup + args.steps):
        before_tokens = unlearner.tokens
        calls.clear()
        if i == args.warmup:
            beside.append(matmul_gflops(mm_dtype, reps=2))
        start = time.perf_counter()
        records.append(probe.step(unlearner))
        elapsed = time.perf_counter() - start
        per_step.append(list(calls))
        if i >= args.warmup:
            seconds.append(elapsed)
            tokens.append(unlearner.tokens - before_tokens)
            beside.append(matmul_gflops(mm_dtype, reps=2))
        _log(f"{variant}: step {i + 1} {elapsed:.2f} s loss {records[-1]['loss']:.4f}"
             + (" (warm-up)" if i < args.warmup else "") + f" load {os.getloadavg()[0]:.1f}")
    # The steps' peak (the probe resets the high-water mark inside each step; the matmul
    # below, whose 3 x 64 MiB matrices are not the step's, runs after it is read).
    peak = max(max(s["forward_peak_mb"], s["backward_peak_mb"]) for s in probe.steps)
    mm_rates.append(matmul_gflops(mm_dtype))
    counts = [step_flops(flop_model, step_calls) for step_calls in per_step[args.warmup:]]
    total = sum(seconds)
    useful = sum(c["useful"] for c in counts)
    executed = sum(c["executed"] for c in counts)
    weights_mb = params * 4 / 2**20
    return {
        "variant": variant,
        "model": name,
        "rows": args.rows,
        "threads": torch.get_num_threads(),
        "params": params,
        "matmul_gflops": max(mm_rates),
        "step_s_median": statistics.median(seconds),
        "step_s_mean": total / len(seconds),
        "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, seconds)),  # as `unlearn run` counts
        # them: non-padding tokens through every forward pass, the reference's included
        "useful_gflop_per_step": useful / len(counts) / 1e9,
        "executed_gflop_per_step": executed / len(counts) / 1e9,
        "achieved_gflops": statistics.median(c["useful"] / s for c, s in zip(counts, seconds)) / 1e9,
        "mfu_beside": mfu_beside([c["useful"] for c in counts], seconds, beside),
        "matmul_beside_gflops": beside,
        "executed_gflops": statistics.median(c["executed"] / s for c, s in zip(counts, seconds)) / 1e9,
        "padding_waste": 1 - sum(c["real_tokens"] for c in counts) / sum(c["computed_tokens"] for c in counts),
        "tokens_per_step": sum(c["real_tokens"] for c in counts) / len(counts),
        "loss_first_step": records[0]["loss"],
        "loss_by_step": [r["loss"] for r in records],
        "rss_start_mb": rss_start,
        "rss_imported_mb": rss_imported,
        "rss_loaded_mb": rss_loaded,
        "peak_rss_mb": peak,
        "weights_fp32_mb": weights_mb,
        "rss_over_weights": peak / weights_mb,
        "memory": probe.summary(unlearner.optimizer),
        "load_average_1min": os.getloadavg()[0],
    }


def spawn(variant: str, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--shape", args.shape,
               "--rows", args.rows, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.model:
        command += ["--model", args.model]
    env = dict(os.environ)
    if "mmap" in variant.split("+")[1:]:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # a fixed value also turns off glibc's raising it
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    if done.returncode != 0:
        raise SystemExit(f"variant {variant} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the report ------------------------------------------------------------------------


def _without_slow_bf16(variants: list[str], args) -> list[str]:
    """VARIANTS, less the bf16 ones when this CPU runs bf16 matmuls far slower than float32 (no bf16
    instructions: on an AVX2 EPYC 1.3 GFLOP/s against 47-62, so a bf16 step would take many minutes) and
    the list is the default one; a bf16 variant asked for by name runs, with the same warning."""
    if not any(v.split("+")[0] in LOW_PRECISION for v in variants):
        return variants
    import torch

    from unlearn.system import slow_low_precision_note

    if args.threads:
        torch.set_num_threads(args.threads)  # as the children do: the rates are those their steps get
    note = slow_low_precision_note("bfloat16")
    if not note:
        return variants
    if args.chosen_variants:
        _log(f"bf16: {note}; its steps take that much longer")
        return variants
    _log(f"bf16 variants left out: {note}; --variants bf16 runs them anyway")
    return [v for v in variants if v.split("+")[0] not in LOW_PRECISION]


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        base, *mods = variant.split("+")
        if base not in VARIANTS or not set(mods) <= set(MODIFIERS):
            raise SystemExit(f"--variants {variant}: expected one of {VARIANTS}, each with any of "
                             f"the modifiers +{', +'.join(MODIFIERS)}")
    if not variants:
        raise SystemExit("--variants: none given")
    variants = _without_slow_bf16(variants, args)
    load_before = os.getloadavg()[0]
    runs = {}
    for variant in variants:
        _log(f"variant {variant} ...")
        runs[variant] = spawn(variant, args)
        _log(f"{variant}: {json.dumps(runs[variant])}")  # each variant's numbers survive a later failure
    first = next(iter(runs.values()))
    result = {
        "model": first["model"],
        "shape": args.shape,
        "rows": args.rows,
        "tokens_per_step": round(first["tokens_per_step"], 1),
        "params": first["params"],
        "weights_fp32_mb": round(first["weights_fp32_mb"], 1),
        "threads": first["threads"],
        "timed_steps": args.steps,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
    }
    # The fp32 variant's, or with --dtype bfloat16 (no fp32 variant) the first variant's; named beside it.
    headline = "fp32" if "fp32" in runs else variants[0]
    result["rss_over_weights"] = round(runs[headline]["rss_over_weights"], 3)
    result["rss_over_weights_variant"] = headline
    if "fp32" in runs:
        fp32 = runs["fp32"]
        fp32_rate = fp32["matmul_gflops"]
        result.update({
            "matmul_fp32_gflops": round(fp32_rate, 1),
            "step_s": round(fp32["step_s_median"], 3),
            "tokens_per_s": round(fp32["tokens_per_s"], 1),
            "useful_gflop_per_step": round(fp32["useful_gflop_per_step"], 1),
            "executed_gflop_per_step": round(fp32["executed_gflop_per_step"], 1),
            "padding_waste": round(fp32["padding_waste"], 3),
            "achieved_gflops": round(fp32["achieved_gflops"], 1),
            "mfu_fp32": round(fp32["achieved_gflops"] / fp32_rate, 3),
            "mfu_fp32_beside": round(fp32["mfu_beside"], 3),
            "mfu_fp32_executed": round(fp32["executed_gflops"] / fp32_rate, 3),
            "loss_fp32_first_step": round(fp32["loss_first_step"], 5),
            "peak_rss_mb": round(fp32["peak_rss_mb"], 1),
            "rss_loaded_mb": round(fp32["rss_loaded_mb"], 1),
        })
    if "bf16" in runs:
        bf16 = runs["bf16"]
        bf16_rate = bf16["matmul_gflops"]
        result.update({
            "matmul_bf16_gflops": round(bf16_rate, 1),
            "bf16_step_s": round(bf16["step_s_median"], 3),
            "bf16_tokens_per_s": round(bf16["tokens_per_s"], 1),
            "bf16_achieved_gflops": round(bf16["achieved_gflops"], 1),
            "mfu_bf16": round(bf16["achieved_gflops"] / bf16_rate, 3),
            "mfu_bf16_beside": round(bf16["mfu_beside"], 3),
            "loss_bf16_first_step": round(bf16["loss_first_step"], 5),
            "bf16_peak_rss_mb": round(bf16["peak_rss_mb"], 1),
            "bf16_rss_over_weights": round(bf16["rss_over_weights"], 3),
        })
    if "naive" in runs:
        naive = runs["naive"]
        result.update({
            "naive_step_s": round(naive["step_s_median"], 3),
            "naive_peak_rss_mb": round(naive["peak_rss_mb"], 1),
        })
        if "fp32" in runs:
            result["rss_ratio_vs_two_copy"] = round(runs["fp32"]["peak_rss_mb"] / naive["peak_rss_mb"], 3)
    if "autocast" in runs:
        auto = runs["autocast"]
        result.update({
            "autocast_step_s": round(auto["step_s_median"], 3),
            "mfu_autocast": round(auto["achieved_gflops"] / auto["matmul_gflops"], 3),
            "mfu_autocast_beside": round(auto["mfu_beside"], 3),
            "loss_autocast_first_step": round(auto["loss_first_step"], 5),
            "autocast_peak_rss_mb": round(auto["peak_rss_mb"], 1),
        })
        if "fp32" in runs:  # the speed-up --autocast bf16 buys, both steps timed in this run
            result["autocast_over_fp32"] = round(auto["step_s_median"] / runs["fp32"]["step_s_median"], 3)
    if "ckpt" in runs:
        ckpt = runs["ckpt"]
        result.update({
            "ckpt_step_s": round(ckpt["step_s_median"], 3),
            "mfu_fp32_ckpt": round(ckpt["achieved_gflops"] / ckpt["matmul_gflops"], 3),
            "ckpt_peak_rss_mb": round(ckpt["peak_rss_mb"], 1),
            "ckpt_rss_over_weights": round(ckpt["rss_over_weights"], 3),
        })
    # Every variant, the ones above included, under its own name.
    result["variants"] = {v: {
        "step_s": round(r["step_s_median"], 3), "mfu": round(r["achieved_gflops"] / r["matmul_gflops"], 3),
        "mfu_beside": round(r["mfu_beside"], 3),
        "matmul_gflops": round(r["matmul_gflops"], 1), "loss_first_step": round(r["loss_first_step"], 5),
        "peak_rss_mb": round(r["peak_rss_mb"], 1), "rss_over_weights": round(r["rss_over_weights"], 3),
        "load_average_1min": round(r["load_average_1min"], 2)} for v, r in runs.items()}
    if "ckpt" in runs and "naive" in runs:  # ours with checkpointing against the two-copy step without
        result["rss_ratio_ckpt_vs_two_copy"] = round(runs["ckpt"]["peak_rss_mb"] / runs["naive"]["peak_rss_mb"], 3)
    result["memory"] = {v: {"rss_loaded_mb": round(r["rss_loaded_mb"], 1), **r["memory"]} for v, r in runs.items()}
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
