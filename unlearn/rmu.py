"""Representation misdirection for unlearning (RMU; Li et al. 2024, "The WMDP Benchmark", section 5).

Instead of pushing the forget answers' probability down (ascent), RMU moves the model's
hidden state at one layer ℓ, on the forget positions, onto a fixed random vector, and keeps
it where the original model had it on every other row:

    forget  L_f = mean over forget positions of ||h_ℓ(x) − c·u||² / d
    retain  L_r = mean over retain positions of ||h_ℓ(x) − h_ℓ^orig(x)||² / d
    (d the hidden size: the paper's mean squared error over the elements)

u is a unit vector drawn once from a seeded Gaussian (a uniformly random direction), c a
scale. Later layers receive a vector that carries nothing about the prompt, so what they
would have said is lost; the retain term holds every other row's state in place.

How this project applies it (train.Unlearner._rmu_loss):
- Positions: a position counts when the losses of the other methods read its logits, i.e.
  position t where token t+1 is a scored response token (labels[:, 1:] != IGNORE). For a
  forget row with `answers` those are the positions that predict an answer token, so the
  state that would produce the answer is the one misdirected (the answer token's own state
  only shapes what comes after it). Prompt and padding positions never count.
- Retain rows: the normal rows (weight --normal-weight), and the --retain rows, which
  include the automatic probes under --retain-probes (weight --retain-weight); the forget
  term has --forget-weight.
- ℓ: --rmu-layer, by default the layer at DEPTH_FRACTION of the depth (the paper: 7 of
  Zephyr-7B's 32); only the parameters of layers ℓ−TRAINED_LAYERS+1..ℓ are trained (the
  paper: the MLPs of ℓ−2..ℓ; with LoRA, the adapters in those layers). Nothing after ℓ
  could get a gradient anyway.
- c: --rmu-scale times the mean norm of the original model's h_ℓ on the normal rows'
  scored positions, measured once before training, so that the target has the same size
  relative to the activations whatever the model (the paper set c per model by hand: its
  norms grow with depth and differ between models).
- The forward pass stops at layer ℓ (a hook raises once h_ℓ is recorded): the layers after
  it, the vocabulary projection and the softmax are never computed, for the trained pass
  and for the original's.
"""

from __future__ import annotations

import math

import torch

from unlearn import layer_names
from unlearn.errors import UsageError
from unlearn.losses import IGNORE_INDEX

DEPTH_FRACTION = 0.25  # the default ℓ: a quarter of the depth (SmolLM2-135M: 8 of 0..29; the paper: 7 of 32)
TRAINED_LAYERS = 3  # layers ℓ−2..ℓ are trained, as in the paper
# c = 2 × the mean norm of h_ℓ: a target well off the activations' own scale, as in the paper. On the dev
# split 1 and 0.5 were tried too (docs/quality.md, "RMU on the dev split"): no better, and slower to forget.
DEFAULT_SCALE = 2.0
# The normal rows whose h_ℓ norms set c (file order): a mean over thousands of positions, which more rows would
# move little, while each row costs a forward of the original. Every normal file of the quality benchmark and
# examples/ has fewer (16 and 34 rows), so c there is the mean over every row, as before this cut.
CALIBRATION_ROWS = 512


def decoder_layers(model) -> dict[int, torch.nn.Module]:
    """Layer index -> decoder layer (`layer_names.decoder_layers`: model.layers.N, model.decoder.layers.N,
    gpt_neox.layers.N, transformer.h.N, ...), whatever is attached inside them; a usage error if there are none."""
    found = layer_names.decoder_layers(model)
    if not found:
        raise UsageError(f"--method rmu: {type(model).__name__} has no decoder layers named layers.N, h.N or blocks.N")
    return found


def resolved_layer(model, layer: int | None) -> int:
    """The layer ℓ a run misdirects: LAYER (--rmu-layer), or `default_layer` of MODEL's depth."""
    return default_layer(len(decoder_layers(model))) if layer is None else layer


def default_layer(n_layers: int) -> int:
    return min(n_layers - 1, max(0, round(n_layers * DEPTH_FRACTION)))


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: position t counts when token t+1 is a scored response token.

    The last position predicts nothing and never counts; padding has IGNORE labels, so the
    position before it counts only when that position predicts a real response token.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def _mean_square(diff: torch.Tensor) -> torch.Tensor:
    """Mean over positions of the squared norm divided by the hidden size (the paper's MSE)."""
    if diff.shape[0] == 0:
        raise ValueError("no scored positions in this batch (is --max-length too small?)")
    return diff.float().pow(2).mean()


def forget_loss(hidden: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_f = mean over MASK positions of ||hidden − target||² / d; HIDDEN (batch, seq, d), TARGET (d,)."""
    return _mean_square(hidden[mask].float() - target.float())


def retain_loss(hidden: torch.Tensor, mask: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """L_r = mean over MASK positions of ||hidden − original||² / d; ORIGINAL is held fixed (no gradient)."""
    return _mean_square(hidden[mask].float() - original.detach()[mask].float())


def random_direction(size: int, seed: int) -> torch.Tensor:
    """A unit vector of SIZE floats in a uniformly random direction (normal entries, normalised), the same for the
    same seed. Not the WMDP code's: it draws the entries uniform in [0, 1), a direction in the positive orthant
    about 0.87 from the all-ones vector in cosine; rmu's defaults were chosen with this one (docs/quality.md)."""
    u = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u / u.norm()).float()


class _Reached(Exception):
    """Raised by the hook once h_ℓ is recorded: the rest of the forward pass is not needed."""


def hidden_at(model, layer_module, batch: dict) -> torch.Tensor:
    """h_ℓ: the output of LAYER_MODULE (a decoder layer of MODEL) for BATCH, (batch, seq, d).

    Inside autograd when called with gradients on; the forward stops there.
    """
    captured = {}

    def hook(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Reached

    handle = layer_module.register_forward_hook(hook)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    except _Reached:
        pass
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError("the forward pass never reached the RMU layer")
    return captured["h"]


def trained_layers(layer: int) -> list[int]:
    return list(range(max(0, layer - TRAINED_LAYERS + 1), layer + 1))


def checked_window(model, layer: int | None) -> list[int]:
    """The layers of the window ℓ−2..ℓ (ℓ: LAYER, resolved) that have trainable parameters, refusing an ℓ
    the model lacks or a window where nothing trains (--lora-layers elsewhere), each in one line. Called
    right after the adapters are attached (run.load), before anything is measured."""
    layers = decoder_layers(model)
    resolved = resolved_layer(model, layer)
    if resolved not in layers:
        raise UsageError(f"--rmu-layer {resolved}: the model has layers 0..{max(layers)}")
    window = trained_layers(resolved)
    trained = [i for i in window if any(p.requires_grad for p in layers[i].parameters())]
    if not trained:
        raise UsageError(f"--method rmu trains layers {window[0]}-{window[-1]} (layer {resolved}, --rmu-layer, and "
                         f"up to two below it), where this model has nothing to train: give --lora-layers that "
                         f"include them, or an --rmu-layer among the adapted layers")
    return trained


def restrict_training(model, layer: int, full: bool = False) -> None:
    """Turn off the gradient of every trainable parameter outside layers ℓ−2..ℓ.

    With LoRA the adapters elsewhere stay attached with B = 0 (the saved adapter keeps PEFT's
    shape). With --full (FULL) only the window's feed-forward weights train, the modules LoRA adapts by default
    (`lora.MLP_TARGETS`): the paper trains the MLPs (the WMDP code, their output projections alone), and every
    tensor of the window, attention and norms too, trained under --full before (review 116).
    """
    from unlearn.lora import MLP_TARGETS, matches_targets

    layers = decoder_layers(model)
    window = trained_layers(layer)
    # a weight of such a module, or a mixture of experts' fused parameter of such a name (`mlp.experts.down_proj`)
    keep = {id(p) for i in window for name, p in layers[i].named_parameters()
            if not full or matches_targets(name.rsplit(".", 1)[0], MLP_TARGETS) or matches_targets(name, MLP_TARGETS)}
    for p in model.parameters():
        if p.requires_grad and id(p) not in keep:
            p.requires_grad_(False)


def _two_digits_down(x: float) -> float:
    """X cut, not rounded, to two significant digits: a bound quoted back to the user must pass it (6.44e17,
    rounded, read 6.4e17 there and 6.5e17 elsewhere, which the same check then refused)."""
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return math.floor(x / step) * step


class Misdirection:
    """The fixed parts of RMU for one model: the layer ℓ, its module, the target c·u."""

    def __init__(self, model, layer: int | None, scale: float, seed: int, original=None):
        """ORIGINAL: the frozen copy under --full (its layer ℓ is its own module); None: MODEL with adapters off."""
        layers = decoder_layers(model)
        self.layer = resolved_layer(model, layer)
        # the window's layers with trainable parameters: what `describe` names (--lora-layers may leave some out)
        self.trained = checked_window(model, layer)
        self.module = layers[self.layer]
        self.original_module = self.module if original is None else decoder_layers(original)[self.layer]
        self.scale = scale
        self.seed = seed
        self.target: torch.Tensor | None = None  # c·u, set by calibrate()
        self.norm: float | None = None  # the mean norm of the original's h_ℓ on normal rows

    def calibrate(self, original_hidden) -> None:
        """c = scale × mean ||h_ℓ|| over the scored positions of ORIGINAL_HIDDEN ((hidden, mask) pairs, any
        iterable: a batch's hidden states are dropped once their norms are taken)."""
        norms, width = [], None
        for h, mask in original_hidden:
            norms.append(h[mask].float().norm(dim=-1))
            width = h.shape[-1]
        norms = torch.cat(norms) if norms else torch.zeros(0)
        if norms.numel() == 0:
            raise UsageError("RMU: the normal rows have no response tokens to measure the activations on")
        self.norm = float(norms.mean())
        from unlearn.config import FLOAT32_MAX

        # The loss sums squared distances to c·u over a batch's positions: with c² near float32's range it is
        # inf from the first step, whatever --lr, and the run ended saying "try a lower --lr". The bound leaves
        # room for a sum over 2^16 positions.
        most_c = (FLOAT32_MAX / 2**16) ** 0.5
        if self.scale * self.norm > most_c:
            raise UsageError(f"--rmu-scale {self.scale:g}: the target norm c = {self.scale:g} × {self.norm:.3g} "
                             f"(mean norm of h_{self.layer}) squared is past float32's range, so the loss is inf; "
                             f"use at most {_two_digits_down(most_c / self.norm):.2g}")
        u = random_direction(width, self.seed)
        self.target = u * (self.scale * self.norm)
        # A c so small that c·u underflows float32 pulls h_ℓ to 0, not onto a random direction (--rmu-scale 1e-50
        # ran and logged a misdirection: review 116): its entries must stay normal floats, about c / √d each.
        least_c = torch.finfo(torch.float32).tiny * width
        if self.scale * self.norm < least_c:
            raise UsageError(f"--rmu-scale {self.scale:g}: the target norm c = {self.scale:g} × {self.norm:.3g} "
                             f"(mean norm of h_{self.layer}) underflows float32, so the target is the zero vector; "
                             f"use at least {least_c / self.norm:.2g}")

    def describe(self) -> str:
        trained = (f"{self.trained[0]}-{self.trained[-1]}" if self.trained == list(range(self.trained[0],
                                                                                        self.trained[-1] + 1))
                   else ", ".join(map(str, self.trained)))
        return (f"rmu: layer {self.layer}, trained layers {trained}, target norm "
                f"c = {self.scale:g} × {self.norm:.3g} (mean norm of h_{self.layer} on the normal rows)")
