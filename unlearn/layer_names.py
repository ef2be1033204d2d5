"""Which decoder layer a module name belongs to, and the decoder layers of a model by index.

Transformers names the decoder blocks of every family as numbered children of one container,
but the container's name differs by family:

    Llama, Mistral, Qwen, Gemma, SmolLM, Phi   model.layers.N
    OPT                                        model.decoder.layers.N
    GPT-NeoX, Pythia                           gpt_neox.layers.N
    GPT-2, GPT-J, Falcon, BLOOM                transformer.h.N
    MPT, DBRX                                  transformer.blocks.N

and a module inside block N is named `<block>.<path>` (`model.layers.12.mlp.down_proj`, or
`model.layers.12.mlp.down_proj.lora_A` below a LoRA wrapper). `--lora-layers` (lora.py), the
edit method's hooks (edit_layers.py) and RMU's layer ℓ (rmu.py) all read the index here.
"""

from __future__ import annotations

import re

from torch import nn

# `layers.N`, `h.N` or `blocks.N` as whole parts of a dotted name: `h` must be a part of its own
# (not the end of `graph.3`), and N a whole part (`layers.3x` is no layer).
_NUMBERED = re.compile(r"(?:^|\.)(?P<stack>layers|h|blocks)\.(?P<index>\d+)(?=\.|$)")


def layer_index(name: str) -> int | None:
    """The decoder layer a module NAME sits in (`model.layers.12.mlp.up_proj` -> 12), or None
    (`lm_head`, `model.embed_tokens`, `model.norm`, the container `model.layers` itself).

    The first numbered part counts: a module inside a block's own numbered children belongs to the block.
    """
    match = _NUMBERED.search(name)
    return int(match["index"]) if match else None


def decoder_layer_names(model: nn.Module) -> dict[int, str]:
    """Layer index -> the full name of that decoder block (`model.decoder.layers.3`), by index; {} if none."""
    found: dict[str, dict[int, str]] = {}
    for name, _ in model.named_modules():
        match = _NUMBERED.search(name)
        if match and match.end() == len(name):  # the block itself, not a module inside it
            found.setdefault(match["stack"], {})[int(match["index"])] = name
    # One kind only, `layers` first: a model whose decoder is `layers.N` may have `blocks.N` elsewhere
    # (Qwen2-VL's vision tower is `visual.blocks.N`), which must not be taken for, or mixed in with, its
    # decoder layers. `h.N` and `blocks.N` are read only from a model with no `layers.N` (GPT-2, Falcon, MPT).
    for stack in ("layers", "h", "blocks"):
        if stack in found:
            return dict(sorted(found[stack].items()))
    return {}


def decoder_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> decoder block of MODEL (whatever is attached inside it), by index; {} if none."""
    return {index: model.get_submodule(name) for index, name in decoder_layer_names(model).items()}
