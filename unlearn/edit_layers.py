"""Where an edit happens: the feed-forward output projections, and hooks to read and steer them.

A MEMIT-style edit writes into the matrix that maps a layer's MLP hidden units
back into the residual stream (Llama/Mistral/Qwen/Gemma/SmolLM: `mlp.down_proj`; OPT:
`fc2`; GPT-NeoX/Falcon: `mlp.dense_4h_to_h`; Phi: `mlp.fc2`; GPT-J: `mlp.fc_out`; GPT-Neo: `mlp.c_proj`). Its input at a token is the
"key" of the key-value memory reading of Geva et al. (2021); its output is
added to the residual stream, so a change of that output at layer l shifts the
residual of every later layer at the same position by the same amount.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from unlearn.errors import UsageError
from unlearn.layer_names import decoder_layer_names, decoder_layers
from unlearn.lora import is_conv1d

# Paths of the MLP output projection inside a decoder layer, by family (Falcon and BLOOM: transformer.h.N.…):
# Llama/Mistral/Qwen/Gemma/Phi-3, OPT, GPT-NeoX/Falcon/BLOOM, Phi, GPT-J, MPT, and GPT-Neo, GPTBigCode (StarCoder)
# and Qwen-1, whose `mlp.c_proj` is an nn.Linear. GPT-2's `mlp.c_proj` is a Conv1D, which the edit (an nn.Linear's
# weight) does not take: only a Linear of these names counts.
MLP_OUT_NAMES = ("mlp.down_proj", "fc2", "mlp.dense_4h_to_h", "mlp.fc2", "mlp.fc_out", "ffn.down_proj", "mlp.c_proj")


def mlp_out_modules(model: nn.Module) -> dict[int, tuple[str, nn.Linear]]:
    """Layer index -> (qualified name, the MLP output projection) for every decoder layer that has one."""
    modules = dict(model.named_modules())
    found: dict[int, tuple[str, nn.Linear]] = {}
    for index, layer_name in decoder_layer_names(model).items():
        for path in MLP_OUT_NAMES:
            name = f"{layer_name}.{path}"
            if isinstance(modules.get(name), nn.Linear):
                found[index] = (name, modules[name])
    if not found:
        conv1d = [n for n, m in modules.items() if n.endswith(".mlp.c_proj") and is_conv1d(m)]
        if conv1d:  # GPT-2
            raise UsageError(f"{type(model).__name__}: its MLP output projection ({conv1d[0]}) is a Conv1D, which "
                             f"--method edit does not take: use a fine-tuning method (the default)")
        raise UsageError(f"{type(model).__name__}: no MLP output projection found "
                         f"(looked for {{layers,h,blocks}}.N.{{{', '.join(MLP_OUT_NAMES)}}})")
    return found


def default_layers(n_layers: int, width: int = 4, depth_fraction: float = 0.25) -> list[int]:
    """A window of WIDTH consecutive layers that ends at DEPTH_FRACTION of the depth.

    Causal tracing puts the subject's factual recall in the MLPs of early-middle
    layers (Meng et al. 2022, ROME: GPT-2 XL layers ~10-20 of 48; MEMIT edits
    GPT-J layers 3-8 of 28). For SmolLM2-135M's 30 layers this is 5-8.
    """
    last = min(n_layers - 1, max(0, round(n_layers * depth_fraction)))
    first = max(0, last - width + 1)
    return list(range(first, last + 1))


def check_layers(model: nn.Module, layers: list[int]) -> list[int]:
    available = mlp_out_modules(model)
    bad = [layer for layer in layers if layer not in available]
    if bad or not layers:
        raise UsageError(f"edit layers {layers}: the model has layers 0..{max(available)}")
    return sorted(set(layers))


@contextlib.contextmanager
def capture_mlp_inputs(model: nn.Module, layers: list[int]):
    """Record the input of each listed layer's MLP output projection; yields {layer: tensor}.

    The tensors are (batch, sequence, intermediate) and are overwritten by each forward pass.
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []
    modules = mlp_out_modules(model)
    for layer in layers:
        def hook(_module, args, layer=layer):
            captured[layer] = args[0].detach()
        handles.append(modules[layer][1].register_forward_pre_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture_residual(model: nn.Module, layer: int):
    """Record the residual stream after decoder layer LAYER; yields a dict with key "h"."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        captured["h"] = _hidden(output).detach()

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def add_to_residual(model: nn.Module, layer: int, rows: torch.Tensor, positions: torch.Tensor, deltas):
    """Add DELTAS[i] to the residual after decoder layer LAYER at (ROWS[i], POSITIONS[i]).

    DELTAS is a (n, hidden) tensor (may require grad) or a callable returning one
    (so the caller can clamp it inside the graph). The addition is out of place,
    so autograd sees it.
    """
    def hook(_module, _args, output):
        hidden = _hidden(output)
        values = deltas() if callable(deltas) else deltas
        bump = torch.zeros_like(hidden)
        bump = bump.index_put((rows, positions), values.to(hidden.dtype), accumulate=True)
        hidden = hidden + bump
        if isinstance(output, tuple):
            return (hidden,) + tuple(output[1:])
        return hidden

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
