"""ULMR's parameter averaging on a model in memory: θa = α·θ + (1−α)·θ'.

`unlearn run --alpha` averages the model it has just fine-tuned without writing
θ' to disk first, and `--alpha auto` measures several α on the same weights, so the
fine-tuned weights are kept aside and any α can be applied (and undone):

- LoRA: θ' = θ + ΔW with ΔW = s·B·A, so θa = θ + (1−α)·ΔW exactly: B is scaled by
  (1−α). Only B is copied (a few MB), and the saved adapter and merged model of the
  averaged state are then plain LoRA outputs.
- --full: every trainable weight becomes α·θ + (1−α)·θ', in float32 as `merge` does,
  with θ taken from the frozen reference copy that --full keeps anyway.
"""

from __future__ import annotations

import torch

from unlearn.lora import lora_modules


class ModelAverage:
    def __init__(self, model, reference_model=None):
        self.model = model
        self.lora = lora_modules(model)
        with torch.no_grad():
            if self.lora:
                self.tuned = {name: m.lora_B.detach().clone() for name, m in self.lora.items()}
            else:
                if reference_model is None:
                    raise ValueError("averaging a fully fine-tuned model needs the original (reference) weights")
                self.original = dict(reference_model.named_parameters())
                self.tuned = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        self.alpha = 0.0

    @torch.no_grad()
    def apply(self, alpha: float) -> None:
        """Set the model's weights to α·θ + (1−α)·θ' (α = 0: the fine-tuned model itself)."""
        if self.lora:
            for name, module in self.lora.items():
                module.lora_B.copy_(self.tuned[name] * (1.0 - alpha))
        else:
            params = dict(self.model.named_parameters())
            for name, tuned in self.tuned.items():
                original = self.original[name]
                params[name].copy_((alpha * original.float() + (1.0 - alpha) * tuned.float()).to(tuned.dtype))
        self.alpha = alpha
