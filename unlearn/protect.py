"""The forget loss's gradient with the protected rows' directions taken out (`--protect`).

Why: a few steps of ascent on "The capital of France is Paris" remove the skill of naming
capitals at all (the benchmark's neighbours, docs/quality.md): the gradient that lowers
"Paris" after "France" is mostly a direction shared with every capital. The automatic probes
(neighbours and same-subject questions, with the original's answers) carry that direction in
their own gradients. So at each step, with g_i = ∇θ NLL(retain row i) at the current weights
and Q an orthonormal basis of span{g_1 … g_k}, the forget side's gradient is replaced by

    g' = g − Q (Qᵀ g)

before the KL terms' gradients are added whole (train.Unlearner._protected_backward). The
shared direction is taken out of the push; what is particular to the forget rows' subjects is
left; the KL terms still pull back wherever the model drifted. Adam's per-coordinate scaling
means the update itself is not exactly orthogonal to the g_i: projecting Adam's whole update
instead (exactly orthogonal) also took the KL terms' pull off those directions, and normal
similarity fell on the dev split (docs/quality.md, "Protecting the probes' gradients").
"""

from __future__ import annotations

import contextlib

import torch

from unlearn import losses, precision
from unlearn.data import collate

# Singular values below this share of the largest are rounding: their directions are not in the
# span of the rows (a repeated row, or one whose gradient vanished), and are left out of the basis.
RANK_TOLERANCE = 1e-6


def flat(tensors) -> torch.Tensor:
    """The tensors' values as one float32 vector (a parameter list's order)."""
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


# Rows per batched pass of `row_gradients`. One pass holds every row's logits (positions x vocabulary, in
# float32 for the NLL) and its inputs at every adapter: measured on the tiny test model, 1,000 retain rows in one
# pass peaked at 1,879 MiB and 3,000 at 4,296 MiB, against 532 MiB in passes of 50 rows, with bit-identical
# float32 gradients (each row's gradient is its own). 32 keeps the default run's probes (at most 24) in one pass.
ROWS_PER_PASS = 32


def row_gradients(model, params: list[torch.nn.Parameter], rows: list[dict], pad_id: int, forward,
                  low_precision: bool = True, rows_per_pass: int = ROWS_PER_PASS) -> torch.Tensor:
    """(k, P): per row of ROWS, the gradient of its mean response-token NLL w.r.t. PARAMS, flattened in
    PARAMS' order (`flat`), computed ROWS_PER_PASS rows at a time (`_pass_gradients`), so that memory does
    not grow with the retain file."""
    return torch.cat([_pass_gradients(model, params, rows[i:i + rows_per_pass], pad_id, forward, low_precision)
                      for i in range(0, len(rows), rows_per_pass)])


def _pass_gradients(model, params: list[torch.nn.Parameter], rows: list[dict], pad_id: int, forward,
                    low_precision: bool) -> torch.Tensor:
    """(k, P): `row_gradients` of ROWS in one pass. PARAMS must be LoRA adapters' A and B (lora.LoRALinear).

    One batched forward and backward, not one per row: a LoRA update y += s·(x Aᵀ) Bᵀ has, for row
    i with inputs x_it and output gradients δ_it (the loss is the sum of the rows' NLLs, so each
    row's δ is its own NLL's),
        ∂NLL_i/∂B = s Σ_t δ_itᵀ (x_it Aᵀ),    ∂NLL_i/∂A = s Σ_t (δ_it B)ᵀ x_it
    which the hooks below collect per row. FORWARD(model, batch, start) -> logits from START
    (train.forward_logits).

    LOW_PRECISION: the forward and backward run under bfloat16 autocast (on a float32 model; the
    parameters and the returned gradients stay float32). Only the span of the gradients is used, and
    bf16 moves it little: on 13 of the README run's probes (their original answers, 66-77 tokens,
    adapters with B != 0) each row's bf16 gradient had cosine 0.9995-0.9998 with its float32 one,
    and the bf16 span held 0.9995 or more of every float32 gradient's norm, for 2.7x less time
    (5.2 s -> 1.9 s a pass on 2 cores). The tests take float32, where the hooks' gradients are exact.
    """
    from unlearn.train import first_scored_position

    owner = adapter_parameters(model)
    if any(id(p) not in owner for p in params):
        raise ValueError("row_gradients: every trained parameter must be a LoRA adapter's A or B")
    inputs, per_row, hooks = {}, {}, []

    def by_row(t: torch.Tensor) -> torch.Tensor:
        # OPT runs fc1/fc2 on (rows x positions, width): the einsums need each row's positions apart
        return t if t.dim() == 3 else t.reshape(len(rows), -1, t.shape[-1])

    def keep_input(module, args, output):
        inputs[module] = by_row(args[0].detach())
        if output.requires_grad:
            output.register_hook(lambda grad, m=module: per_row.__setitem__(
                m, _adapter_gradients(m, inputs[m], by_row(grad))))

    modules = {module for module, _ in owner.values()}
    for m in modules:
        hooks.append(m.register_forward_hook(keep_input))
    # g_i is the gradient at the current weights: the hooks' formula has no dropout mask in it, so the
    # adapters' dropout (--lora-dropout) is off for this pass (on, the rows' gradients summed missed the
    # pass's own gradient by 69 %).
    dropouts = [(m.dropout, m.dropout.training) for m in modules]
    for d, _ in dropouts:
        d.eval()
    device = params[0].device
    try:
        batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
        start = first_scored_position(batch["labels"])
        # The base weights' dtype decides (the adapters are float32 on every base: lora.LoRALinear).
        base_dtype = next(iter(owner.values()))[0].base.weight.dtype
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                    if low_precision and base_dtype == torch.float32 and precision.native_bf16(device)
                    else contextlib.nullcontext())
        with autocast:
            logits = forward(model, batch, start)
        nll = losses.sequence_nll(logits.float(), batch["labels"][:, start:])
        torch.autograd.grad(torch.nan_to_num(nll).sum(), params, allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
        for d, was in dropouts:
            d.train(was)
    columns = []
    for p in params:
        module, which = owner[id(p)]
        got = per_row.get(module)
        columns.append(got[which].reshape(len(rows), -1) if got is not None else p.new_zeros(len(rows), p.numel()))
    return torch.cat(columns, dim=1).float()


def adapter_parameters(model) -> dict[int, tuple]:
    """id(parameter) -> (its LoRALinear, "A" or "B") for every LoRA adapter weight of MODEL."""
    from unlearn.lora import lora_modules

    owner = {}
    for m in lora_modules(model).values():
        owner[id(m.lora_A)], owner[id(m.lora_B)] = (m, "A"), (m, "B")
    return owner


def _adapter_gradients(module, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row: the gradients of LoRALinear MODULE's A and B, from its input X and output gradient GRAD."""
    a, b = module.lora_A.to(x.dtype), module.lora_B.to(x.dtype)
    grad = grad.to(x.dtype)  # (under autocast x and grad may be bf16: the einsums then are too)
    return {"B": module.scaling * torch.einsum("bto,btr->bor", grad, x @ a.t()),
            "A": module.scaling * torch.einsum("btr,bti->bri", grad @ b, x)}


def basis(gradients: torch.Tensor) -> torch.Tensor:
    """(P, r): an orthonormal basis of the span of GRADIENTS' rows, r its rank.

    Gᵀ = Q R (thin QR, P x k). When a row depends on earlier ones (a repeated row, or a zero
    gradient) R is singular and Q has a column outside the span, which later rows may still
    use, so dropping Q's columns by R's diagonal would lose span. The span is Q times R's
    column space: Q U_r, U_r the left singular vectors of the k x k R whose singular values
    are not negligible. Full rank (the usual case): Q itself.
    """
    if gradients.shape[0] == 0:
        return gradients.new_zeros(gradients.shape[1], 0)
    q, r = torch.linalg.qr(gradients.t())
    u, values, _ = torch.linalg.svd(r)
    keep = values > RANK_TOLERANCE * values.max().clamp_min(torch.finfo(values.dtype).tiny)
    return q if bool(keep.all()) else q @ u[:, keep]


def project_out(vector: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """VECTOR without its components along Q's (orthonormal) columns, in their own float32: under a training step's
    --autocast bf16 the two products would round to bf16 and leave ~5e-3 of the protected component, not ~3e-7."""
    if not q.shape[1]:
        return vector
    with torch.autocast(vector.device.type, enabled=False):
        return vector - q @ (q.t() @ vector)


def accumulate(params: list[torch.nn.Parameter], vector: torch.Tensor) -> None:
    """Add the flat VECTOR (`flat`'s layout) to PARAMS' .grad, as a backward would."""
    offset = 0
    for p in params:
        n = p.numel()
        part = vector[offset:offset + n].view_as(p).to(p.dtype)
        p.grad = part.clone() if p.grad is None else p.grad.add_(part)
        offset += n
