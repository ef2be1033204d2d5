"""Hand-rolled LoRA: y = W x + (alpha / r) · B A dropout(x).

A is kaiming-uniform and B zero, so a freshly attached adapter leaves the model
unchanged. The frozen base weights double as the reference model: inside
`adapters_disabled(model)` the network is exactly the original, so the KL and
NPO terms need one copy of the weights in memory, not two.

Adapters are saved in PEFT's format (`adapter_config.json` +
`adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`),
so `peft.PeftModel.from_pretrained` loads them with no missing keys.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unlearn.errors import UnlearnError, UsageError
from unlearn.layer_names import decoder_layer_names, layer_index

# PEFT's adapter format, used by `save_adapter`/`load_adapter` here and by `averaging.fold_lora`.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# peft saves `<module>.lora_A.weight`; some versions keep the adapter name (`.default`);
# embedding layers use `lora_embedding_A` without `.weight`.
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                      r"(?:\.default)?(?:\.weight)?$")


# The feed-forward projections of the common families: Llama/Mistral/Qwen/Gemma (gate/up/down),
# Phi-3 (gate_up_proj, gate and up fused), OPT/Phi (fc1/fc2), GPT-NeoX/Falcon/BLOOM
# (dense_h_to_4h/dense_4h_to_h), GPT-J (fc_in/fc_out), GPT-2 and GPT-Neo (c_fc and the MLP's c_proj:
# a bare `c_proj` would take GPT-2's attention output too; GPT-2's are Conv1D, see LoRALinear). Facts are stored
# there (Geva et al. 2021, "Feed-Forward Layers Are Key-Value Memories"; Meng et al. 2022,
# ROME), so adapting them forgets a fact with less damage elsewhere than adapting attention.
# Measured on examples/: see README, "How the defaults were chosen".
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "dense_h_to_4h", "dense_4h_to_h",
               "fc_in", "fc_out", "c_fc", "mlp.c_proj")
# Where those names are a mixture of experts held as fused 3-D parameters (transformers 5's Mixtral, Qwen3-MoE,
# OLMoE), which LoRA here cannot wrap, and --lora-targets was not given: the attention projections instead, as
# most LoRA recipes for such models do, so that the default run trains rather than stops (`--full` trains the
# experts themselves).
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = MLP_TARGETS
    rslora: bool = False  # rank-stabilised scaling alpha/√r (read from adapters that use it)
    # Which decoder layers get adapters (`--lora-layers`): "all", "upper" (the upper half, layers
    # n//2 .. n-1 of n) or "A-B" (0-based, both ends included). `layer_indices` resolves it.
    layers: str = "all"

    def __post_init__(self):
        # "all", "upper" or "A-B" as --repair-steps takes auto: surrounding blanks and case do not count
        # (--lora-layers " 0-1" was refused while --repair-steps " auto" was taken)
        self.layers = str(self.layers).strip().lower()

    def validate(self) -> None:
        from unlearn.config import check_positive_finite  # (config imports this module)

        if self.rank < 1:
            raise UsageError(f"--lora-rank {self.rank}: must be at least 1")
        # (`alpha <= 0` took nan and inf; 1e39, inf in float32, made the gradient inf at the first step)
        check_positive_finite("--lora-alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise UsageError(f"--lora-dropout {self.dropout}: must be in [0, 1)")
        layer_indices(self.layers, 1 << 30)  # the form only; the range is checked against the model

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.rslora)


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor s of W + s·B·A: alpha / r, or alpha / √r for rank-stabilised LoRA (PEFT's use_rslora)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


class _LowRankLinear(torch.autograd.Function):
    """x Wᵀ + b + s·(x Aᵀ) Bᵀ for a frozen W and b, with the backward written out.

    Autograd's backward of LoRALinear's two small products runs two of them with the
    rank as the output's width: g B (tokens x r) and gᵀ (x Aᵀ) (out x r). On CPU the float32
    GEMM does those at a third of the rate of the same products computed transposed, with
    the rank as the height: (Bᵀ gᵀ)ᵀ and ((x Aᵀ)ᵀ g)ᵀ (352 tokens, 576 -> 1536: 311 -> 119 µs
    and 345 -> 119 µs, two threads). Here they are computed transposed, and the input's
    gradient g W + d(x Aᵀ) A is one addmm instead of two products and a sum. The default fp32
    training step (bench/train_bench.py's, the two paths alternated in one process, 10-30 pairs
    of steps, three times) took 1-2.4 % less time: real, but under the ±0.05 that the benchmark's
    MFU moves between runs. In bf16 nothing changed, so bf16 keeps autograd's path (`applies`).
    The same numbers to float32 rounding.
    """

    @staticmethod
    def applies(layer: "LoRALinear", x: torch.Tensor) -> bool:
        """Only where it was measured and is exact: a float32 training forward, frozen base, no adapter dropout."""
        base = layer.base
        return (torch.is_grad_enabled() and layer.folded is None and x.dtype == torch.float32
                and base.weight.dtype == torch.float32 and isinstance(layer.dropout, nn.Identity)
                and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
                and not torch.is_autocast_enabled(x.device.type))

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        flat = x.reshape(-1, x.shape[-1])
        low = flat @ lora_A.t()
        # The output is allocated in its own shape and written through a flat view of it: a view returned
        # from a custom Function may not be modified in place, and Falcon adds to its MLP's output in place.
        result = flat.new_empty(*x.shape[:-1], weight.shape[0])
        out = result.view(-1, weight.shape[0])
        if bias is not None:
            torch.addmm(bias, flat, weight.t(), out=out)
        else:
            torch.mm(flat, weight.t(), out=out)
        torch.addmm(out, low, lora_B.t(), alpha=scaling, out=out)  # in place, as an op FLOP counters know
        ctx.save_for_backward(flat, weight, lora_A, lora_B, low)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return result

    @staticmethod
    def backward(ctx, grad):
        flat, weight, lora_A, lora_B, low = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        d_low = (lora_B.t() @ g.t()).t() * ctx.scaling  # s · g B, the rank as the height
        d_x = torch.addmm(g @ weight, d_low, lora_A).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        d_A = d_low.t() @ flat if ctx.needs_input_grad[3] else None
        d_B = (low.t() @ g).t() * ctx.scaling if ctx.needs_input_grad[4] else None  # s · gᵀ (x Aᵀ)
        return d_x, None, None, d_A, d_B, None


def is_conv1d(module: nn.Module) -> bool:
    """Whether MODULE is transformers' Conv1D (GPT-2's layers: y = x W + b, W of shape (in, out))."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


def _conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D as the nn.Linear it computes: the weight is the Conv1D's, transposed as a view (the same
    storage: no copy, and F.linear multiplies by the untransposed matrix without one)."""
    linear = nn.Linear(1, 1, bias=False, device="meta")  # its parameters replaced just below
    linear.in_features, linear.out_features = conv.weight.shape
    linear.weight = nn.Parameter(conv.weight.detach().t(), requires_grad=False)
    linear.bias = conv.bias
    return linear


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update that can be switched off.

    BASE may be GPT-2's Conv1D (peft's `fan_in_fan_out`): the wrapper then runs it as the Linear it is
    (`_conv1d_as_linear`), and `merge_lora` puts back a Conv1D holding the merged weight, transposed, so the
    saved model is a GPT-2 checkpoint again. lora_A and lora_B have the shapes peft gives them either way.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, rslora: bool = False):
        super().__init__()
        # kept outside the module tree (its weight is base's, and would be listed twice): merge_lora's way back
        self._conv1d = [base] if is_conv1d(base) else []
        if self._conv1d:
            base = _conv1d_as_linear(base)
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        # LoRA weights stay float32 even on a bf16/fp16 base: they are what the optimiser updates.
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise
        self.scaling = lora_scaling(alpha, rank, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.folded: torch.Tensor | None = None  # W + s·B A while `adapters_folded` holds (inference only)

    def forward(self, x):
        if self.enabled and self.folded is not None:
            return nn.functional.linear(x, self.folded, self.base.bias)
        if self.enabled and _LowRankLinear.applies(self, x):
            return _LowRankLinear.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling)
        out = self.base(x)
        if not self.enabled:  # (under autocast in float32, as the sum below: the reference then equals B = 0's pass)
            return out.float() if torch.is_autocast_enabled(x.device.type) else out
        # The two small matmuls run in the activations' dtype: the rank-r weights are cast
        # (r x d values), not every activation (tokens x d, forward and backward). On a bf16
        # model the float32 copies of the activations were most of the step's casting time,
        # and autograd kept them for the backward (~40 KB per token per layer at OPT-1.3B).
        # The weights and their optimiser state stay float32; their gradients arrive
        # rounded to bf16, as under autocast. In float32 every cast is a no-op: same numbers.
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        low = self.dropout(x) @ a.t()
        # out + s · (low Bᵀ) in one addmm: no (tokens x out) product, scaled copy and sum in
        # between, each an activation-sized tensor. At the default step's gate/up shape (352
        # tokens, 1536 outputs) 132 -> 66 µs in bf16, 218 -> 137 µs in float32 (two threads); the
        # whole step's gain was within the machine's noise. Under autocast it runs in bf16.
        if torch.is_autocast_enabled(x.device.type):
            # Under --autocast the sum is taken in float32: base(x) comes out in bf16, whose 8-bit mantissa rounds away
            # an update under ~0.4 % of it, so the training passes saw less of the adapter than the float32 checks do
            # (dev `capitals` stopped after 2 steps at every seed, with the damage of an overshoot: docs/quality.md).
            delta = torch.mm(low.reshape(-1, low.shape[-1]), b.t()).float()
            return (out.reshape(-1, out.shape[-1]).float() + self.scaling * delta).view(out.shape)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), b.t(), alpha=self.scaling)
        return flat.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) · B A, the change this adapter makes to W."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def matches_targets(name: str, targets: tuple[str, ...]) -> bool:
    # peft's rule: a target names the module itself or the last parts of its dotted path.
    return any(name == t or name.endswith("." + t) for t in targets)


def layer_indices(spec: str, depth: int) -> range:
    """The layers SPEC (`LoraSettings.layers`) names in a model of DEPTH decoder layers."""
    if spec == "all":
        return range(depth)
    if spec == "upper":
        return range(depth // 2, depth)
    first, dash, last = spec.partition("-")
    if not (dash and first.isdigit() and last.isdigit()) or int(first) > int(last):
        raise UsageError(f"--lora-layers {spec}: expected all, upper or FIRST-LAST (0-based, e.g. 12-23)")
    if int(last) >= depth:
        raise UsageError(f"--lora-layers {spec}: the model has {depth} decoder layers (0-{depth - 1})")
    return range(int(first), int(last) + 1)


def _in_layers(model: nn.Module, names: list[str], spec: str) -> list[str]:
    """NAMES whose decoder layer SPEC selects among MODEL's decoder layers (every name for "all")."""
    if spec == "all":
        return names
    index = {name: layer_index(name) for name in names}  # layers.N, h.N or blocks.N: see layer_names.py
    known = [i for i in index.values() if i is not None]
    if not known:
        raise UsageError(f"--lora-layers {spec}: no targeted module sits in a numbered decoder layer "
                         f"(layers.N, h.N or blocks.N)")
    # The model's depth, not the targeted names': "upper" of a 30-layer model is 15-29 even when
    # --lora-targets names modules of a few layers only.
    wanted = layer_indices(spec, max(decoder_layer_names(model), default=max(known)) + 1)
    chosen = [name for name in names if index[name] in wanted]
    if not chosen:
        raise UsageError(f"--lora-layers {spec}: no targeted module in layers {wanted.start}-{wanted.stop - 1}")
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def fused_experts(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The names of MODEL's parameters of more than two dimensions that TARGETS name: a mixture of experts' fused
    projections (`mlp.experts.down_proj`, one tensor for every expert)."""
    return [n for n, p in model.named_parameters() if p.dim() > 2 and matches_targets(n, targets)]


def _nothing_to_adapt(model: nn.Module, targets: tuple[str, ...], given: bool = True) -> str:
    """The one line for TARGETS naming no module of MODEL: what it has instead, so the user can choose.

    A mixture of experts in transformers 5 (Mixtral, Qwen3-MoE) keeps its experts' projections as one 3-D
    parameter (`mlp.experts.down_proj`), not Linear modules: the name is there, yet there is nothing to wrap.
    GIVEN False: TARGETS are the default's, which the user never typed, so the line does not quote them as theirs."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    kinds = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if (isinstance(m, nn.Linear) or is_conv1d(m)) and m is not head})
    linears = f"its Linear layers are {', '.join(kinds) or 'none'}"
    fused = fused_experts(model, targets)
    if fused and not given:  # the attention fallback found no q_proj-style layer either
        return (f"the default LoRA targets name only the experts' fused parameters ({fused[0]}, not Linear layers, "
                f"which LoRA here adapts only) and this model has no {', '.join(ATTENTION_TARGETS)} to adapt "
                f"instead; {linears}: name some with --lora-targets, or train every weight with --full")
    wanted = f"--lora-targets {','.join(targets)}" if given else f"the default --lora-targets ({','.join(targets)})"
    if fused:
        return (f"{wanted}: {fused[0]} is a fused parameter of the experts, not a Linear layer, which LoRA here "
                f"adapts only: train every weight with --full, or name Linear layers with --lora-targets")
    return (f"{wanted}: no module of this model has that name; {linears} (name the feed-forward ones with "
            f"--lora-targets, or train every weight with --full)")


def attach_lora(model: nn.Module, settings: LoraSettings, seed: int | None = None,
                attention_if_fused: bool = False) -> dict[str, LoRALinear]:
    """Freeze MODEL and wrap each targeted nn.Linear in a LoRALinear; return the wrappers by name.

    ATTENTION_IF_FUSED (the default targets, --lora-targets not given): where the feed-forward names are only a
    mixture of experts' fused parameters, the attention projections (ATTENTION_TARGETS) are adapted instead."""
    settings.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if n and matches_targets(n, settings.targets)]
    if not names and attention_if_fused and fused_experts(model, settings.targets):
        names = [n for n, m in model.named_modules() if n and matches_targets(n, ATTENTION_TARGETS)
                 and isinstance(m, nn.Linear)]
    if not names:
        raise UsageError(_nothing_to_adapt(model, settings.targets, given=not attention_if_fused))
    names = _in_layers(model, names, settings.layers)
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    wrapped = {}
    try:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module = getattr(parent, child)
            if not isinstance(module, nn.Linear) and not is_conv1d(module):
                raise UsageError(f"--lora-targets: {name} is a {type(module).__name__}, not a Linear layer (nor "
                                 f"GPT-2's Conv1D), which LoRA here adapts only: train every weight with --full")
            if module is getattr(model, "get_output_embeddings", lambda: None)():
                # The training reads the head's weight (the vocabulary's size, the fused losses), and on a model
                # whose head is the input embedding, folding an update into it would move the embedding too.
                raise UsageError(f"--lora-targets: {name} is the output head, which LoRA here does not train "
                                 f"(name the decoder layers' modules)")
            wrapped[name] = LoRALinear(module, settings.rank, settings.alpha, settings.dropout, settings.rslora)
            setattr(parent, child, wrapped[name])
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    return wrapped


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run MODEL as the original network (adapters off); restores the previous state after."""
    modules = lora_modules(model).values()
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.enabled = was


def _merged_weight(module: LoRALinear) -> torch.Tensor:
    """W + (alpha/r) B A in W's dtype: the weight `merge_lora` writes, and `adapters_folded` runs."""
    with torch.no_grad():
        weight = module.base.weight
        return (weight.float() + module.delta_weight()).to(weight.dtype)


@contextlib.contextmanager
def adapters_folded(model: nn.Module):
    """For inference: every adapter runs as its merged weight, W + (alpha/r) B A, one matmul a layer.

    The weights are those `merge_lora` writes, bit for bit, so what is measured inside is the model
    that is saved. Unfolded, an adapted layer is three matmuls and an add, and on the README run's
    91 prompts x 48 tokens (two threads) greedy answers took 22.0 s against 19.4 s folded, the same
    answers. The base weights are not touched (each folded weight is a new tensor, ~318 MB for the
    embedded model's MLP adapters), so `adapters_disabled` inside still gives the original exactly.
    No gradient reaches the adapters while folded: not for training.
    """
    modules = list(lora_modules(model).values())
    for m in modules:
        m.folded = _merged_weight(m)
    try:
        yield model
    finally:
        for m in modules:
            m.folded = None


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += (alpha/r) B A) and unwrap it; in place."""
    for name, module in lora_modules(model).items():
        # A new tensor, not a copy into the old one: a loaded model's weights are a private
        # mapping of its safetensors file, and writing into them faults in a copy of every page
        # (~1.1 s for the default's 318 MB of MLP weights on the 2-core VMs), where the sum
        # comes from memory the allocator has already touched.
        merged = _merged_weight(module)
        if module._conv1d:  # GPT-2: its own module back, W stored (in, out)
            original = module._conv1d[0]
            original.weight.data = merged.t().contiguous()
        else:
            module.base.weight.data = merged
            original = module.base
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, original)
    return model


# --- PEFT format ---------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT's key names."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().contiguous().cpu()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().contiguous().cpu()
    return state


def adapter_config(settings: LoraSettings, base_model: str, targets: list[str], fan_in_fan_out: bool = False) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,  # peft's flag for Conv1D bases (GPT-2): W = (B A)ᵀ-shaped
        "use_rslora": settings.rslora,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "revision": None,
    }


def save_adapter(model: nn.Module, settings: LoraSettings, directory: Path, base_model: str) -> None:
    conv1d = any(m._conv1d for m in lora_modules(model).values())
    _write_adapter(adapter_state_dict(model), adapter_config(settings, base_model, adapter_targets(model), conv1d),
                   directory)


def adapter_targets(model: nn.Module) -> list[str]:
    """`target_modules` for MODEL's adapters: the kinds that matched (`up_proj`: the defaults list several
    families' names) when every module of those kinds has one; else (some layers only: `--lora-layers`, a
    layer's name in `--lora-targets`) the full names, so that peft and `load_adapter` attach exactly those."""
    adapted = sorted(lora_modules(model))
    kinds = tuple(sorted({name.rsplit(".", 1)[-1] for name in adapted}))
    of_kind = [n for n, m in model.named_modules()
               if matches_targets(n, kinds) and (isinstance(m, (nn.Linear, LoRALinear)) or is_conv1d(m))]
    return list(kinds) if sorted(of_kind) == adapted else adapted


def save_factors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], directory: Path, base_model: str) -> None:
    """A weight update W + B·A per named module (scaling 1) as a PEFT LoRA adapter (`--method edit`).

    Ranks are zero-padded to the largest, which leaves every B·A unchanged, so that one `r`
    serves all modules; `lora_alpha` = r makes the scaling 1. Targets are the full module
    names: only those modules, not every module of that kind, carry an update.
    """
    rank = max(a.shape[0] for a, _ in factors.values())
    state = {}
    for name, (a, b) in factors.items():
        pad = rank - a.shape[0]
        a = torch.cat([a.float(), a.new_zeros(pad, a.shape[1], dtype=torch.float32)])
        b = torch.cat([b.float(), b.new_zeros(b.shape[0], pad, dtype=torch.float32)], dim=1)
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous().cpu()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous().cpu()
    settings = LoraSettings(rank=rank, alpha=float(rank), dropout=0.0, targets=tuple(sorted(factors)))
    _write_adapter(state, adapter_config(settings, base_model, sorted(factors)), directory)


def _write_adapter(state: dict, config: dict, directory: Path) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter_config(directory: Path) -> dict:
    """DIRECTORY's adapter_config.json, checked to be plain LoRA (which is all W + s·B·A can express)."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise UnlearnError(f"{directory}: not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UnlearnError(f"{path}: not valid JSON") from None
    if not isinstance(config, dict):
        raise UnlearnError(f"{path}: not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise UnlearnError(f"{path}: peft_type {config['peft_type']} is not LORA")
    if config.get("use_dora"):
        raise UnlearnError(f"{path}: DoRA adapters are not supported")
    _refuse_unfoldable(path, config)
    r, lora_alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(lora_alpha, (int, float)):
        raise UnlearnError(f"{path}: needs a positive integer r and a numeric lora_alpha")
    # checked here, not where they are used (`_pattern_value`, `lora_scaling`), which would fail as an internal
    # error: a string value divides nothing, and a key is a regular expression matched against module names
    for field, wanted in (("rank_pattern", "positive integer ranks"), ("alpha_pattern", "numbers")):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise UnlearnError(f"{path}: {field} must map module-name patterns to {wanted}")
        for key, value in patterns.items():
            kinds = (int,) if field == "rank_pattern" else (int, float)
            if not isinstance(value, kinds) or isinstance(value, bool) or (field == "rank_pattern" and value <= 0):
                raise UnlearnError(f"{path}: {field} {key!r} is {json.dumps(value)}; it must map module-name "
                                   f"patterns to {wanted}")
            try:
                re.compile(_pattern_regex(key))
            except re.error as exc:
                raise UnlearnError(f"{path}: {field} key {key!r} is not a valid regular expression ({exc})") from None
    return config


# init_lora_weights that move BASE's weights before training (peft's pissa_init, olora_init, corda_init,
# loftq_init, lora_ga_init subtract the initial B₀A₀ from W): the adapter then updates that residual, which peft
# rebuilds when it loads the adapter on BASE, and W + s·B·A of the original W is another model (0.015-0.030
# logits off on a tiny Llama).
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _refuse_unfoldable(path: Path, config: dict) -> None:
    """Refuse, in one line, a LoRA whose model W + s·B·A of BASE's weights is not: each would merge silently
    wrong (docs/merge.md promises peft's merge_and_unload(), or a refusal)."""
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise UnlearnError(f"{path}: init_lora_weights {init!r}: the adapter updates weights its initialisation "
                           "changed, not BASE's; save it with peft's path_initial_model_for_weight_conversion first")
    if config.get("alora_invocation_tokens"):
        raise UnlearnError(f"{path}: an activated LoRA (alora_invocation_tokens) acts only after its invocation "
                           "tokens, which no merged weight can express")
    if config.get("layer_replication"):
        raise UnlearnError(f"{path}: layer_replication builds another stack of layers than BASE's, which its "
                           "updates belong to")
    if config.get("trainable_token_indices"):
        raise UnlearnError(f"{path}: trainable tokens (trainable_token_indices) are not supported")


def _pattern_regex(key: str) -> str:
    """The regular expression peft matches a rank_pattern / alpha_pattern KEY with: the end of a module's name."""
    return rf"(.*\.)?({key})$"


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: a key matches the end of the module's name."""
    for key, value in patterns.items():
        if re.match(_pattern_regex(key), module):
            return value
    return default


def lora_rank_and_scale(config: dict, module: str) -> tuple[int, float]:
    """(r, lora_alpha / r) for MODULE; rsLoRA divides by √r instead."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    lora_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return r, lora_scaling(lora_alpha, r, bool(config.get("use_rslora")))


def adapter_settings(directory: Path) -> LoraSettings:
    """The LoraSettings that rebuild DIRECTORY's adapter on our layers (one rank for every module)."""
    config = read_adapter_config(directory)
    path = Path(directory) / ADAPTER_CONFIG
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UnlearnError(f"{path}: per-module ranks (rank_pattern) cannot be attached; "
                           f"fold it with `unlearn merge --adapter` instead")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise UnlearnError(f"{path}: regex target_modules are not supported; list the module names")
    return LoraSettings(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                        dropout=float(config.get("lora_dropout", 0.0)), targets=tuple(targets),
                        rslora=bool(config.get("use_rslora")))


def load_adapter(model: nn.Module, directory: Path) -> LoraSettings:
    """Attach the adapter saved in DIRECTORY (ours or peft's) to MODEL and load its weights."""
    from safetensors.torch import load_file

    settings = adapter_settings(directory)
    modules = attach_lora(model, settings)
    weights_path = Path(directory) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise UnlearnError(f"{directory}: no {ADAPTER_WEIGHTS}")
    state = load_file(str(weights_path))
    loaded = set()
    for key, tensor in state.items():
        match = LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        module_name, kind = (match["module"], match["part"].removeprefix("lora_")) if match else (None, None)
        if module_name not in modules or kind not in ("A", "B"):
            raise UnlearnError(f"{weights_path}: unexpected tensor {key}")
        target = getattr(modules[module_name], f"lora_{kind}")
        if target.shape != tensor.shape:
            raise UnlearnError(f"{weights_path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
        loaded.add((module_name, kind))
    missing = [f"{n}.lora_{k}" for n in modules for k in ("A", "B") if (n, k) not in loaded]
    if missing:
        raise UnlearnError(f"{weights_path}: missing {len(missing)} LoRA tensors, first {missing[0]}")
    return settings
