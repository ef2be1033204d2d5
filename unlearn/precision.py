"""The precision of the training passes (`--autocast`): bfloat16 autocast of a float32 model's
forward passes inside a training step, or none.

Under autocast the matrix products of the trainable and reference forwards run in bfloat16; the
weights, their gradients, AdamW's state and the loss terms stay float32 (log-softmax runs in float32
under autocast; the logits come out bfloat16). Everything outside a training step (the stop rule's
checks and margin, the before/after measurements, generation) runs as the model is, float32, so every
printed figure is measured as before: only the training trajectory changes.

Why: on a CPU with bfloat16 instructions (an AMD EPYC with AVX512-BF16, two threads) the embedded model's default
step took 0.59-0.73 of the float32 step's time, 2.3-2.6 s against 3.1-4.2 s (bench/train_bench.py's
`autocast_over_fp32`, docs/speed.md, fifty-sixth session). It is not the default: on the dev split it scored lower
and lost a target the default meets (`openings`' paraphrase leak; docs/quality.md, fifty-seventh session). On a
CPU without them torch takes a reference path about 40x slower than float32 (system.slow_low_precision_note), so
`auto` never chooses it there.
"""

from __future__ import annotations

import contextlib

SETTINGS = ("auto", "bf16", "off")


def native_bf16(device) -> bool:
    """Whether DEVICE runs bfloat16 matrix products natively, read from what the hardware declares, so that
    the same machine always decides the same way (a timed product, as system.cpu_matmul_rate measures, can
    read slow under load, and the choice changes the numbers a run trains on): a CPU with AVX512-BF16 or
    AMX-BF16 instructions, or a CUDA device from Ampere on."""
    import torch

    if device.type == "cpu":
        capabilities = getattr(torch.cpu, "get_capabilities", lambda: {})()
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    # Ampere (compute capability 8) on: torch.cuda.is_bf16_supported() also answers True on a T4 or V100, which
    # emulate bf16 slowly, and reads the current device, not DEVICE.
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def resolve(setting: str, model) -> str:
    """SETTING ("auto", "bf16", "off") made definite for MODEL: "bf16" or "off". Autocast only lowers a
    float32 model's products; a model held in bfloat16 or float16 (--dtype) already runs them so."""
    import torch

    weight = next(model.parameters())
    if setting == "off" or weight.dtype != torch.float32:
        return "off"
    if setting == "bf16":
        return "bf16"
    return "bf16" if native_bf16(weight.device) else "off"


@contextlib.contextmanager
def training_autocast(resolved: str, device, casts: "FrozenCasts | None" = None):
    """The context a training step's forwards and backward run in for RESOLVED ("bf16" or "off"); with CASTS,
    the linear layers' frozen weights are multiplied in their kept bf16 copies (`FrozenCasts`). Nothing is
    switched on before the `with` enters it."""
    import torch

    if resolved != "bf16":
        yield
        return
    with torch.autocast(device.type, dtype=torch.bfloat16), (casts.mode() if casts else contextlib.nullcontext()):
        yield


class FrozenCasts:
    """bf16 copies of a float32 model's frozen linear weights (and biases), made once and kept while training runs.

    Why: autocast keeps a bf16 cast only of a leaf that requires a gradient, so it cast every frozen weight again at
    every call, and autograd kept that call's copy for the backward. A step's forget, normal and retain forwards run
    before its one backward, so about three copies of the weights were alive at once: 754 MiB on the embedded model
    (a reviewer's count on one step, session 57). Here F.linear gets the kept copy: the
    same bfloat16 values autocast would make (a cast is exact to reproduce), so the same products, bit for bit, with
    one copy (the embedded model's 256 MiB) for the whole run, and no cast per call.

    Only in one process: a sharded (FSDP) weight is a different view at each forward. Only frozen float32
    Parameters (the LoRA bases, the attention projections, the vocabulary projection), and only in a call that bf16
    autocast would cast: a model that switches autocast off for a float32 product (Ernie-4.5-MoE's router) keeps its
    float32 weight there. A copy is made again if its weight was written in place since (its version counter moved).

    Cost: a torch function mode sends every torch call inside the step through Python, about 12-15 µs each (a
    reviewer's count: ~9,300 calls, ~0.1 s, a step of a 30-layer model at the embedded model's width); the casts it
    saves cost more (docs/speed.md, fifty-seventh session: the step 2.29-2.65 s against 3.10-3.11 s).
    """

    def __init__(self):
        # id(tensor) -> (tensor, its version then, its bf16 copy); holding the tensor keeps its id from being reused
        self.copies: dict[int, tuple] = {}

    def cast(self, tensor):
        """TENSOR's kept bf16 copy, or TENSOR itself when it is not a frozen float32 Parameter."""
        import torch

        if not (isinstance(tensor, torch.nn.Parameter) and tensor.dtype == torch.float32 and not tensor.requires_grad):
            return tensor
        kept = self.copies.get(id(tensor))
        if kept is None or kept[1] != tensor._version:
            with torch.no_grad():
                kept = self.copies[id(tensor)] = (tensor, tensor._version, tensor.to(torch.bfloat16))
        return kept[2]

    def mode(self):
        """A torch function mode in which F.linear multiplies by the kept copies."""
        import torch
        from torch.overrides import TorchFunctionMode

        casts = self

        class _KeptCasts(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if (func is torch.nn.functional.linear and args and isinstance(args[0], torch.Tensor)
                        and torch.is_autocast_enabled(args[0].device.type)  # a call autocast would cast
                        and torch.get_autocast_dtype(args[0].device.type) == torch.bfloat16):
                    args = list(args)
                    for i, name in ((1, "weight"), (2, "bias")):
                        if i < len(args):
                            args[i] = casts.cast(args[i])
                        elif kwargs.get(name) is not None:
                            kwargs[name] = casts.cast(kwargs[name])
                return func(*args, **kwargs)

        return _KeptCasts()

    def release(self) -> None:
        """Free the copies (training is over); a later step makes them again."""
        self.copies.clear()


def output_bytes(resolved: str, model) -> int:
    """Bytes of one element of what MODEL's training forwards return under RESOLVED: 2 under bf16 autocast
    (its linear layers, the vocabulary projection included, return bfloat16) or for a model held in 16 bits,
    else 4. The reference cache counts its budget in it (reference_cache.py)."""
    import torch

    dtype = torch.bfloat16 if resolved == "bf16" else next(model.parameters()).dtype
    return dtype.itemsize if dtype.is_floating_point else 4
