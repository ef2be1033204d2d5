"""Which attention kernel a training or reference forward runs, and the same one for gradient checkpointing.

A bf16/fp16 model on CPU runs SDPA's math kernel: the flash kernel's bf16 backward ran at about
half the speed of the math kernel's plain matmuls and softmax there (attention forward+backward at
the default step's shapes: 45 -> 21 ms, one thread; bench/train_bench.py). Float32 keeps torch's
own choice: both were as fast, and flash keeps no (heads, seq, seq) matrix.

Transformers' eager attention was measured against the math kernel (`bench/attention_bench.py`):
its bf16 step took 0.93-0.95 of the time, but its LoRA gradient was further from float32's (relative
error 0.085 against 0.072, mean of six batches; worse in three, better in two) and the bf16 README
command kept fewer held-out facts over seven seeds (177 against 182 of 189), so it is not used.

The backward runs the kernel its forward ran, so wrapping the forward is enough, except under
gradient checkpointing: it recomputes each layer's forward inside the backward, outside any
context the forward was in, and torch checks that the recomputed tensors match the ones the
forward saved. Another kernel saves other tensors, and the backward fails (`CheckpointError`: bf16
with --gradient-checkpointing did, until `checkpoint_contexts` gave the recomputation the same kernel).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def runs_math_kernel(model) -> bool:
    """True for a model whose training forwards take SDPA's math kernel: bf16/fp16 weights on CPU."""
    param = next(model.parameters())
    return param.device.type == "cpu" and param.dtype in (torch.bfloat16, torch.float16)


def training_attention(model):
    """The context a trainable or reference forward of MODEL runs in: the math kernel where `runs_math_kernel`."""
    return sdpa_kernel(SDPBackend.MATH) if runs_math_kernel(model) else contextlib.nullcontext()


def checkpoint_contexts(model):
    """`context_fn` for torch's non-reentrant checkpoint: the forward as it is, its recomputation in `training_attention`."""
    return lambda: (contextlib.nullcontext(), training_attention(model))
