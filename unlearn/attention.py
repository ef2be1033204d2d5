"""Which attention a training or reference forward runs: eager for a bf16/fp16 model on CPU, else the model's own.

On CPU, SDPA's flash kernel's bf16 backward ran at about half the speed of plain matmuls and a
softmax (attention forward+backward at the default step's shapes: 45 -> 21 ms, one thread;
bench/train_bench.py), so a low-precision model runs attention as matmuls and a softmax. Of the two
ways to get them, transformers' eager attention beat SDPA's math kernel, which checks every row of
the scores for being fully masked (`aten::all` and `aten::where`, 2 % of a bf16 step): the same
bf16 step on the same rows took 0.93-0.95 of the math kernel's time (`bench/attention_bench.py`, the
two alternating in one process, 10 pairs, the embedded model, two threads, two runs). Eager also takes its
softmax in float32. In float32 eager took 1.02 of the flash kernel's time, so float32 keeps SDPA.

The trained and the reference pass both run inside `training_attention`, so the KL is exactly 0 at
the original. The backward runs what the forward ran, except under gradient checkpointing, which
recomputes each layer's forward inside the backward: `checkpoint_contexts` gives that
recomputation the same attention, since torch checks that the recomputed tensors match the ones
the forward saved (a different kernel saves different tensors, and the backward fails).
"""

from __future__ import annotations

import contextlib

import torch


def runs_eager(model) -> bool:
    """True for a model whose training forwards take eager attention: bf16/fp16 weights on CPU."""
    param = next(model.parameters())
    return param.device.type == "cpu" and param.dtype in (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def training_attention(model, eager: bool | None = None):
    """Eager attention inside, on every config of MODEL that asks for SDPA, when EAGER (None: `runs_eager`)."""
    configs = {}  # a model's layers share its config object: each one once
    if runs_eager(model) if eager is None else eager:
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


def checkpoint_contexts(model):
    """`context_fn` for torch's non-reentrant checkpoint: the forward as it is, its recomputation in `training_attention`."""
    return lambda: (contextlib.nullcontext(), training_attention(model))
