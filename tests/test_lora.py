"""lora.py: identity at start, the adapters-off reference, merging, and PEFT's format both ways."""

import json

import pytest
import torch

from unlearn.errors import UnlearnError, UsageError
from unlearn.lora import (LoRALinear, LoraSettings, adapters_disabled, adapters_folded, attach_lora, layer_index,
                          layer_indices,
                          load_adapter, lora_modules, merge_lora, save_adapter)
from unlearn.models import load_model


def fresh(directory):
    return load_model(str(directory), log=lambda m: None).model


def ids():
    return torch.tensor([[5, 17, 42, 8, 99, 3]])


def randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.5


@pytest.mark.parametrize("which, names", [("llama_dir", {"gate_proj", "up_proj", "down_proj"}),
                                          ("opt_dir", {"fc1", "fc2"})])
def test_default_targets_are_each_familys_mlp_and_attach_is_identity(request, which, names):
    model = fresh(request.getfixturevalue(which))
    before = model(ids()).logits
    wrapped = attach_lora(model, LoraSettings(rank=4, alpha=8), seed=0)
    assert set(n.rsplit(".", 1)[1] for n in wrapped) == names
    assert len(wrapped) == 2 * len(names)  # 2 layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert torch.equal(model(ids()).logits, before)  # B = 0: nothing changes until training


def test_lora_forward_formula_and_disabled_reference():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 4)
    layer = LoRALinear(base, rank=2, alpha=6.0, dropout=0.0)
    layer.lora_B.data = torch.randn(4, 2)
    x = torch.randn(3, 6)
    expected = base(x) + 3.0 * (x @ layer.lora_A.t() @ layer.lora_B.t())  # alpha / r = 3
    assert torch.allclose(layer(x), expected, atol=1e-6)
    layer.enabled = False
    assert torch.equal(layer(x), base(x))


def test_lora_on_batched_input_gives_the_formulas_output_and_gradients():
    # (batch, seq, features) input: the layer flattens it for its one addmm and restores the shape.
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 4), rank=2, alpha=6.0, dropout=0.0)
    layer.lora_B.data = torch.randn(4, 2)
    x, weights = torch.randn(2, 3, 6), torch.randn(2, 3, 4)
    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    expected = layer.base(x) + 3.0 * (x @ a.t() @ b.t())
    (expected * weights).sum().backward()
    out = layer(x)
    (out * weights).sum().backward()
    assert out.shape == (2, 3, 4) and torch.allclose(out, expected, atol=1e-6)
    # By hand: d/dB = 3 · Σ_tokens w (x Aᵀ), d/dA = 3 · Σ_tokens (w B)ᵀ x
    flat_x, flat_w = x.reshape(-1, 6), weights.reshape(-1, 4)
    assert torch.allclose(layer.lora_B.grad, 3.0 * flat_w.t() @ (flat_x @ a.detach().t()), atol=1e-5)
    assert torch.allclose(layer.lora_A.grad, 3.0 * (flat_w @ b.detach()).t() @ flat_x, atol=1e-5)
    assert torch.allclose(layer.lora_A.grad, a.grad, atol=1e-6) and torch.allclose(layer.lora_B.grad, b.grad, atol=1e-6)


def _formula_and_gradients(layer, x, weights):
    """The layer's output and the gradients of Σ weights · output w.r.t. x, A and B, by autograd on the formula."""
    x = x.detach().clone().requires_grad_()
    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    out = layer.base(x) + layer.scaling * (x @ a.t() @ b.t())
    (out * weights).sum().backward()
    return out.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("bias", [True, False])
def test_the_written_out_float32_backward_gives_autograds_gradients(bias):
    # The float32 training forward runs `_LowRankLinear`, whose backward is written by hand
    # (the rank-r products transposed, the input's gradient one addmm): it must give what autograd
    # gives on the formula, for the input too (an upper layer's input needs its gradient).
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 5, bias=bias), rank=2, alpha=6.0, dropout=0.0)
    layer.lora_B.data = torch.randn(5, 2)
    x, weights = torch.randn(2, 3, 6, requires_grad=True), torch.randn(2, 3, 5)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_LowRankLinearBackward"  # the written-out path ran
    (out * weights).sum().backward()
    expected, dx, da, db = _formula_and_gradients(layer, x, weights)
    assert out.shape == (2, 3, 5) and torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(x.grad, dx, atol=1e-5)
    assert torch.allclose(layer.lora_A.grad, da, atol=1e-5) and torch.allclose(layer.lora_B.grad, db, atol=1e-5)
    # By hand, on one token: d/dx = W^T w + s A^T (B^T w); the sum over tokens is autograd's business.
    w0 = weights[0, 0]
    by_hand = layer.base.weight.t() @ w0 + 3.0 * layer.lora_A.detach().t() @ (layer.lora_B.detach().t() @ w0)
    assert torch.allclose(x.grad[0, 0], by_hand, atol=1e-5)
    assert layer.base.weight.grad is None  # the base stays frozen


@pytest.mark.parametrize("bias", [True, False])
def test_the_written_out_output_may_be_added_to_in_place(bias):
    # Falcon adds the attention output to its MLP's output in place (`mlp_output += attention_output`):
    # a view returned from a custom Function refuses that, so the output must be a tensor of its own.
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 5, bias=bias), rank=2, alpha=6.0, dropout=0.0)
    layer.lora_B.data = torch.randn(5, 2)
    x, weights, residual = torch.randn(2, 3, 6, requires_grad=True), torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_LowRankLinearBackward"
    out += residual
    (out * weights).sum().backward()
    expected, dx, da, db = _formula_and_gradients(layer, x, weights)
    assert torch.allclose(out, expected + residual, atol=1e-6)
    assert torch.allclose(x.grad, dx, atol=1e-5)
    assert torch.allclose(layer.lora_A.grad, da, atol=1e-5) and torch.allclose(layer.lora_B.grad, db, atol=1e-5)


def test_the_written_out_backward_is_skipped_where_it_was_not_measured():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 5), rank=2, alpha=6.0, dropout=0.0)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    with_dropout = LoRALinear(torch.nn.Linear(6, 5), rank=2, alpha=6.0, dropout=0.5)
    assert type(with_dropout(x).grad_fn).__name__ != "_LowRankLinearBackward"
    bf16 = LoRALinear(torch.nn.Linear(6, 5).to(torch.bfloat16), rank=2, alpha=6.0, dropout=0.0)
    assert type(bf16(x.to(torch.bfloat16)).grad_fn).__name__ != "_LowRankLinearBackward"
    layer.base.weight.requires_grad_(True)  # a trainable base (not LoRA's use) keeps autograd's path
    assert type(layer(x).grad_fn).__name__ != "_LowRankLinearBackward"


def test_lora_on_a_bf16_base_computes_in_bf16_and_trains_float32_weights():
    torch.manual_seed(0)
    base32 = torch.nn.Linear(6, 4)
    layer32 = LoRALinear(base32, rank=2, alpha=6.0, dropout=0.0)
    layer32.lora_B.data = torch.randn(4, 2)
    base16 = torch.nn.Linear(6, 4).to(torch.bfloat16)
    base16.load_state_dict({k: v.to(torch.bfloat16) for k, v in base32.state_dict().items()})
    layer16 = LoRALinear(base16, rank=2, alpha=6.0, dropout=0.0)
    layer16.lora_A.data, layer16.lora_B.data = layer32.lora_A.data.clone(), layer32.lora_B.data.clone()
    x = torch.randn(3, 6)
    out = layer16(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and layer16.lora_A.dtype == torch.float32
    assert torch.allclose(out.float(), layer32(x), atol=0.1)  # bf16 keeps ~3 significant digits
    out.float().sum().backward()
    assert layer16.lora_B.grad is not None and layer16.lora_B.grad.dtype == torch.float32


def test_adapters_disabled_restores_and_equals_base(llama_dir):
    model = fresh(llama_dir)
    base_logits = model(ids()).logits
    attach_lora(model, LoraSettings(rank=4, alpha=8), seed=0)
    randomise(model)
    tuned = model(ids()).logits
    assert not torch.allclose(tuned, base_logits)
    with adapters_disabled(model):
        assert torch.equal(model(ids()).logits, base_logits)
    assert torch.equal(model(ids()).logits, tuned)


def test_merge_equals_adapter_forward_and_unwraps(opt_dir):
    model = fresh(opt_dir)
    attach_lora(model, LoraSettings(rank=4, alpha=8), seed=0)
    randomise(model)
    tuned = model(ids()).logits
    loaded = {name: m.base.weight.data for name, m in lora_modules(model).items()}
    kept = {name: w.clone() for name, w in loaded.items()}
    merge_lora(model)
    assert not lora_modules(model)
    # the merged weights are new tensors: the loaded ones (a mapping of the model file) are not written to
    assert all(torch.equal(loaded[n], kept[n]) for n in loaded)
    assert not any(torch.equal(model.get_submodule(n).weight, kept[n]) for n in loaded)
    assert all(not k.endswith(("lora_A", "lora_B")) for k in model.state_dict())
    assert torch.allclose(model(ids()).logits, tuned, atol=1e-5)


def test_folded_adapters_run_the_merged_weights_and_leave_the_base_alone(llama_dir):
    import copy

    model = fresh(llama_dir)
    base_logits = model(ids()).logits
    attach_lora(model, LoraSettings(rank=4, alpha=8), seed=0)
    randomise(model)
    with torch.no_grad():
        tuned = model(ids()).logits
        merged = merge_lora(copy.deepcopy(model))(ids()).logits
        weights = {n: m.base.weight.clone() for n, m in lora_modules(model).items()}
        with adapters_folded(model):
            # the model merge_lora writes, bit for bit: the same weights, one matmul a layer
            assert torch.equal(model(ids()).logits, merged)
            assert torch.allclose(merged, tuned, atol=1e-5) and not torch.allclose(merged, base_logits)
            with adapters_disabled(model):  # the original, exactly, as the fluency scorer needs
                assert torch.equal(model(ids()).logits, base_logits)
            assert torch.equal(model(ids()).logits, merged)
        assert all(m.folded is None for m in lora_modules(model).values())
        assert torch.equal(model(ids()).logits, tuned)  # unfolded again: the adapters' own three matmuls
    assert all(torch.equal(m.base.weight, weights[n]) for n, m in lora_modules(model).items())


def test_seeded_attach_is_reproducible(llama_dir):
    a, b = fresh(llama_dir), fresh(llama_dir)
    wa = attach_lora(a, LoraSettings(), seed=3)
    wb = attach_lora(b, LoraSettings(), seed=3)
    assert all(torch.equal(wa[n].lora_A, wb[n].lora_A) for n in wa)


def test_bad_settings(llama_dir):
    with pytest.raises(UsageError, match="no module"):
        attach_lora(fresh(llama_dir), LoraSettings(targets=("nonexistent",)))
    with pytest.raises(UsageError, match="not a Linear"):
        attach_lora(fresh(llama_dir), LoraSettings(targets=("self_attn",)))
    with pytest.raises(UsageError, match="rank"):
        attach_lora(fresh(llama_dir), LoraSettings(rank=0))


@pytest.mark.parametrize("which", ["llama_dir", "opt_dir"])
def test_peft_loads_our_adapter_with_no_missing_keys_and_same_logits(request, tmp_path, which):
    peft = pytest.importorskip("peft")
    directory = request.getfixturevalue(which)
    model = fresh(directory)
    settings = LoraSettings(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    attach_lora(model, settings, seed=0)
    randomise(model)
    ours = model(ids()).logits
    save_adapter(model, settings, tmp_path / "adapter", base_model=str(directory))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["target_modules"] == ["q_proj", "v_proj"]

    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    loaded = peft.PeftModel.from_pretrained(fresh(directory), str(tmp_path / "adapter"))
    result = set_peft_model_state_dict(loaded, load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    loaded.eval()
    assert torch.allclose(loaded(ids()).logits, ours, atol=1e-5)


def test_we_load_peft_made_adapters(llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    reference = peft.get_peft_model(fresh(llama_dir), peft.LoraConfig(r=4, lora_alpha=16,
                                                                      target_modules=["q_proj", "v_proj"]))
    for name, p in reference.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    reference.save_pretrained(tmp_path / "peft")
    reference.eval()
    model = fresh(llama_dir)
    settings = load_adapter(model, tmp_path / "peft")
    assert settings.rank == 4 and settings.scaling == 4.0
    assert torch.allclose(model(ids()).logits, reference(ids()).logits, atol=1e-5)


def test_load_adapter_errors(llama_dir, tmp_path):
    with pytest.raises(UnlearnError, match="not a LoRA adapter directory"):
        load_adapter(fresh(llama_dir), tmp_path)
    model = fresh(llama_dir)
    attach_lora(model, LoraSettings(rank=4, alpha=8))
    save_adapter(model, LoraSettings(rank=4, alpha=8), tmp_path / "a", base_model="x")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["r"] = 2
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnlearnError, match="shape"):
        load_adapter(fresh(llama_dir), tmp_path / "a")


def test_layer_index_and_the_layers_a_spec_names():
    assert layer_index("model.layers.12.mlp.up_proj") == 12
    assert layer_index("model.decoder.layers.3.fc1") == 3  # OPT
    assert layer_index("transformer.h.7.mlp.c_fc") == 7  # GPT-2
    assert layer_index("lm_head") is None and layer_index("model.layers") is None
    assert list(layer_indices("all", 4)) == [0, 1, 2, 3]
    assert list(layer_indices("upper", 30)) == list(range(15, 30))
    assert list(layer_indices("upper", 5)) == [2, 3, 4] and list(layer_indices("upper", 2)) == [1]
    assert list(layer_indices("3-5", 30)) == [3, 4, 5]
    for bad in ("5-3", "up", "3", "-2", "a-b"):
        with pytest.raises(UsageError, match="expected all, upper or FIRST-LAST"):
            layer_indices(bad, 30)
    with pytest.raises(UsageError, match="has 30 decoder layers"):
        layer_indices("10-30", 30)


@pytest.mark.parametrize("which, names", [("llama_dir", {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                                                        "model.layers.1.mlp.down_proj"}),
                                          ("opt_dir", {"model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2"})])
def test_upper_layers_only_get_adapters(request, which, names):
    model = fresh(request.getfixturevalue(which))  # two decoder layers: the upper half is layer 1
    assert set(attach_lora(model, LoraSettings(layers="upper"), seed=0)) == names
    assert set(lora_modules(model)) == names
    with pytest.raises(UsageError, match="has 2 decoder layers"):
        attach_lora(fresh(request.getfixturevalue(which)), LoraSettings(layers="1-2"))


def test_an_adapter_on_some_layers_names_its_modules_and_loads_back_exactly(llama_dir, tmp_path):
    settings = LoraSettings(rank=4, alpha=8, layers="upper")
    model = fresh(llama_dir)
    attach_lora(model, settings, seed=0)
    randomise(model)
    ours = model(ids()).logits
    save_adapter(model, settings, tmp_path / "adapter", base_model=str(llama_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # "up_proj" alone would make peft (and load_adapter) attach adapters to layer 0 too
    assert config["target_modules"] == sorted(lora_modules(model))
    again = fresh(llama_dir)
    load_adapter(again, tmp_path / "adapter")
    assert set(lora_modules(again)) == set(lora_modules(model))
    assert torch.allclose(again(ids()).logits, ours, atol=1e-6)
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(fresh(llama_dir), str(tmp_path / "adapter")).eval()
    assert sum(".lora_A." in n for n, _ in loaded.named_parameters()) == 3
    assert torch.allclose(loaded(ids()).logits, ours, atol=1e-5)


def test_upper_is_the_models_upper_half_whatever_the_targets_name(llama_dir):
    # Targets in layer 0 only: the upper half of the 2-layer model is layer 1, so nothing is left to adapt
    # (read from the targets alone, layer 0 would have been "the upper half of 1 layer").
    with pytest.raises(UsageError, match="no targeted module in layers 1-1"):
        attach_lora(fresh(llama_dir), LoraSettings(targets=("model.layers.0.mlp.up_proj",), layers="upper"))
    targets = ("model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj")
    assert set(attach_lora(fresh(llama_dir), LoraSettings(targets=targets, layers="upper"))) == {targets[1]}
