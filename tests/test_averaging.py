"""averaging.py as a library: exact arithmetic, layouts, tied heads, header checks, LoRA folding.

Checkpoints are a handful of tiny random tensors written with save_file; the
chunk size is shrunk so that every tensor is streamed in several pieces.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unlearn import averaging, tensor_io
from unlearn.averaging import average, fold_lora
from unlearn.tensor_io import parse_size, read_header, row_slices
from unlearn.errors import UnlearnError, UsageError


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Force multi-chunk streaming on tiny tensors: a 6×5 matrix is read 2 rows at a time
    and combined 4 elements at a time, so chunk and piece boundaries are both crossed."""
    monkeypatch.setattr(tensor_io, "CHUNK_ELEMENTS", 10)
    monkeypatch.setattr(averaging, "PIECE_ELEMENTS", 4)


def tensors(seed: int, dtype=torch.float32, lm_head=True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "model.embed_tokens.weight": torch.randn(6, 5, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(5, 5, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(5, generator=g),
        "model.norm.weight": torch.randn(5, generator=g),
        "scalar": torch.randn((), generator=g),
    }
    if lm_head:
        out["lm_head.weight"] = torch.randn(6, 5, generator=g)
    return {k: v.to(dtype) for k, v in out.items()}


def write_model(path: Path, weights: dict, shards: list[list[str]] | None = None, config: dict | None = None) -> Path:
    """A model directory: one model.safetensors, or the given shards plus an index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config if config is not None else {"model_type": "llama"}))
    if not shards:
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        return path
    weight_map = {}
    for i, names in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: weights[n] for n in names}, path / name, metadata={"format": "pt"})
        weight_map.update({n: name for n in names})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def reference(base, tuned, alpha):
    return {k: (alpha * base[k].float() + (1 - alpha) * tuned[k].float()).to(base[k].dtype) for k in base}


# -- arithmetic --------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.0, 1.0])
def test_fp32_average_equals_torch_formula(tmp_path, alpha):
    base, tuned = tensors(1), tensors(2)
    result = average(write_model(tmp_path / "b", base), write_model(tmp_path / "t", tuned), tmp_path / "o", alpha)
    merged = load_dir(tmp_path / "o")
    for name in base:
        expected = alpha * base[name] + (1 - alpha) * tuned[name]
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=0)
        assert torch.equal(merged[name], expected)  # the same operations, so the same bits
    assert result.tensors == len(base)
    assert result.bytes == sum(t.numel() * 4 for t in base.values())


def test_alpha_one_gives_base_back_bit_for_bit(tmp_path):
    base = tensors(1)
    average(write_model(tmp_path / "b", base), write_model(tmp_path / "t", tensors(2)), tmp_path / "o", 1.0)
    merged = load_dir(tmp_path / "o")
    assert all(torch.equal(merged[k], base[k]) for k in base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_averaged_in_float32_and_cast_back(tmp_path, dtype):
    base, tuned = tensors(1, dtype), tensors(2, dtype)
    average(write_model(tmp_path / "b", base), write_model(tmp_path / "t", tuned), tmp_path / "o", 0.3)
    merged = load_dir(tmp_path / "o")
    expected = reference(base, tuned, 0.3)
    for name in base:
        assert merged[name].dtype == dtype
        assert torch.equal(merged[name], expected[name])  # one rounding, from float32


def test_extrapolation_follows_the_same_formula(tmp_path):
    base, tuned = tensors(1), tensors(2)
    average(write_model(tmp_path / "b", base), write_model(tmp_path / "t", tuned), tmp_path / "o", 1.5,
            allow_extrapolation=True)
    merged = load_dir(tmp_path / "o")
    torch.testing.assert_close(merged["model.norm.weight"], 1.5 * base["model.norm.weight"] - 0.5 * tuned["model.norm.weight"])


def test_integer_tensors_are_copied_from_base(tmp_path):
    base, tuned = tensors(1), tensors(2)
    base["position_ids"] = torch.arange(7)
    tuned["position_ids"] = torch.arange(7) * 2
    average(write_model(tmp_path / "b", base), write_model(tmp_path / "t", tuned), tmp_path / "o", 0.5)
    assert torch.equal(load_dir(tmp_path / "o")["position_ids"], torch.arange(7))


@pytest.mark.parametrize("alpha", [-0.1, 1.1, float("nan"), float("inf")])
def test_alpha_outside_unit_interval_is_a_usage_error(tmp_path, alpha):
    with pytest.raises(UsageError):
        average(tmp_path / "b", tmp_path / "t", tmp_path / "o", alpha)


# -- layouts -------------------------------------------------------------------


SHARDS = [["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"],
          ["model.layers.0.input_layernorm.weight", "model.norm.weight", "scalar", "lm_head.weight"]]


@pytest.mark.parametrize("base_sharded,tuned_sharded", [(True, False), (False, True), (True, True)])
def test_sharded_and_single_inputs_mix_and_output_follows_base(tmp_path, base_sharded, tuned_sharded):
    base, tuned = tensors(1), tensors(2)
    write_model(tmp_path / "b", base, SHARDS if base_sharded else None)
    write_model(tmp_path / "t", tuned, SHARDS[::-1] if tuned_sharded else None)
    average(tmp_path / "b", tmp_path / "t", tmp_path / "o", 0.25)
    merged = load_dir(tmp_path / "o")
    expected = reference(base, tuned, 0.25)
    assert all(torch.allclose(merged[k], expected[k], rtol=1e-6, atol=0) for k in base)
    files = sorted(p.name for p in (tmp_path / "o").glob("*.safetensors"))
    if base_sharded:
        index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in base.values())
        base_index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == base_index["weight_map"]
        assert files == sorted(set(base_index["weight_map"].values()))
    else:
        assert files == ["model.safetensors"]
        assert not (tmp_path / "o" / "model.safetensors.index.json").exists()


def test_max_shard_size_repacks_the_output(tmp_path):
    base, tuned = tensors(1), tensors(2)
    average(write_model(tmp_path / "b", base), write_model(tmp_path / "t", tuned), tmp_path / "o", 0.5,
            max_shard_size=130)
    out = tmp_path / "o"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        nbytes = sum(math.prod(s) * 4 for s in sizes)
        assert nbytes <= 130 or len(sizes) == 1
    assert set(load_dir(out)) == set(base)


def test_large_max_shard_size_gives_one_file_without_index(tmp_path):
    write_model(tmp_path / "b", tensors(1), SHARDS)
    write_model(tmp_path / "t", tensors(2), SHARDS)
    average(tmp_path / "b", tmp_path / "t", tmp_path / "o", 0.5, max_shard_size=parse_size("2GB"))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["config.json", "merge.json", "model.safetensors"]


def test_output_metadata_side_files_and_record(tmp_path):
    base_dir = write_model(tmp_path / "b", tensors(1), config={"model_type": "llama", "hidden_size": 5})
    for name in ["generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        (base_dir / name).write_text("{}")
    (base_dir / "README.md").write_text("base model card")
    average(base_dir, write_model(tmp_path / "t", tensors(2)), tmp_path / "o", 0.5)
    out = tmp_path / "o"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 5
    for name in ["generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        assert (out / name).is_file()
    assert not (out / "README.md").exists()
    record = json.loads((out / "merge.json").read_text())
    assert record["alpha"] == 0.5 and record["tensors"] == 6
    assert record["base"] == str(base_dir.resolve()) and "created" in record and "seconds" in record


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("1.5kb") == 1500
    assert parse_size("4096") == 4096
    for bad in ["", "GB", "-1GB", "2 parsecs", "0"]:
        with pytest.raises(UsageError):
            parse_size(bad)


def test_row_slices_cover_each_tensor_exactly():
    assert list(row_slices((), 4)) == [None]
    assert list(row_slices((0, 3), 4)) == []
    assert list(row_slices((5, 2), 4)) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert list(row_slices((3, 100), 4)) == [slice(0, 1), slice(1, 2), slice(2, 3)]


# -- tied lm_head --------------------------------------------------------------


def test_tuned_without_lm_head_uses_its_tied_embedding(tmp_path):
    base, tuned = tensors(1), tensors(2, lm_head=False)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", tuned, config={"tie_word_embeddings": True})
    average(tmp_path / "b", tmp_path / "t", tmp_path / "o", 0.4)
    merged = load_dir(tmp_path / "o")
    expected = 0.4 * base["lm_head.weight"] + 0.6 * tuned["model.embed_tokens.weight"]
    torch.testing.assert_close(merged["lm_head.weight"], expected, rtol=1e-6, atol=0)


def test_base_without_lm_head_and_tied_tuned_head_stays_tied(tmp_path):
    base, tuned = tensors(1, lm_head=False), tensors(2)
    write_model(tmp_path / "b", base, config={"tie_word_embeddings": True})
    write_model(tmp_path / "t", tuned, config={"tie_word_embeddings": True})
    average(tmp_path / "b", tmp_path / "t", tmp_path / "o", 0.4)
    assert "lm_head.weight" not in load_dir(tmp_path / "o")
    assert json.loads((tmp_path / "o" / "config.json").read_text())["tie_word_embeddings"] is True


def test_base_without_lm_head_and_untied_tuned_head_is_kept_and_untied(tmp_path):
    base, tuned = tensors(1, lm_head=False), tensors(2)
    write_model(tmp_path / "b", base, config={"tie_word_embeddings": True})
    write_model(tmp_path / "t", tuned, config={"tie_word_embeddings": False})
    average(tmp_path / "b", tmp_path / "t", tmp_path / "o", 0.4)
    merged = load_dir(tmp_path / "o")
    expected = 0.4 * base["model.embed_tokens.weight"] + 0.6 * tuned["lm_head.weight"]
    torch.testing.assert_close(merged["lm_head.weight"], expected, rtol=1e-6, atol=0)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["tie_word_embeddings"] is False


def test_missing_lm_head_without_tying_is_refused(tmp_path):
    write_model(tmp_path / "b", tensors(1))
    write_model(tmp_path / "t", tensors(2, lm_head=False), config={"tie_word_embeddings": False})
    with pytest.raises(UnlearnError, match="TUNED .* lacks lm_head.weight"):
        average(tmp_path / "b", tmp_path / "t", tmp_path / "o", 0.5)
    assert not (tmp_path / "o").exists()


# -- checks before anything is written ----------------------------------------


def mismatch(tmp_path, edit):
    base, tuned = tensors(1), tensors(2)
    edit(tuned)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", tuned)
    with pytest.raises(UnlearnError) as info:
        average(tmp_path / "b", tmp_path / "t", tmp_path / "o", 0.5)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
    return str(info.value)


def test_missing_key_is_named(tmp_path):
    assert "model.norm.weight: in BASE but not in TUNED" in mismatch(tmp_path, lambda t: t.pop("model.norm.weight"))


def test_extra_key_is_named(tmp_path):
    message = mismatch(tmp_path, lambda t: t.update(extra=torch.zeros(2)))
    assert "extra: in TUNED but not in BASE" in message


def test_shape_mismatch_is_named(tmp_path):
    message = mismatch(tmp_path, lambda t: t.update({"model.norm.weight": torch.zeros(4)}))
    assert message == "tensor model.norm.weight: shape [5] in BASE but [4] in TUNED"


def test_dtype_mismatch_is_named(tmp_path):
    message = mismatch(tmp_path, lambda t: t.update({"scalar": t["scalar"].half()}))
    assert message == "tensor scalar: dtype F32 in BASE but F16 in TUNED"


def header_case(tmp_path, damage):
    path = write_model(tmp_path / "m", tensors(1)) / "model.safetensors"
    data = bytearray(path.read_bytes())
    path.write_bytes(damage(data))
    with pytest.raises(UnlearnError) as info:
        read_header(path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_truncated_file_is_detected(tmp_path):
    assert "truncated" in header_case(tmp_path, lambda d: bytes(d[:-7]))


def test_header_longer_than_file_is_detected(tmp_path):
    assert "header claims" in header_case(tmp_path, lambda d: (10**9).to_bytes(8, "little") + bytes(d[8:]))


def test_tiny_file_is_detected(tmp_path):
    assert "truncated" in header_case(tmp_path, lambda d: bytes(d[:5]))


def test_garbage_header_is_detected(tmp_path):
    def garble(d):
        d[8:16] = b"\xff\xfe{{{{{{"
        return bytes(d)
    assert "not valid JSON" in header_case(tmp_path, garble)


def test_trailing_bytes_are_detected(tmp_path):
    assert "after the last tensor" in header_case(tmp_path, lambda d: bytes(d) + b"\0" * 16)


# -- LoRA folding ---------------------------------------------------------------


def write_adapter(path: Path, weights: dict, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(weights, path / "adapter_model.safetensors", metadata={"format": "pt"})
    return path


Q = "model.layers.0.self_attn.q_proj"


def lora_weights(r=2, default=False):
    g = torch.Generator().manual_seed(3)
    tag = ".default" if default else ""
    return {f"base_model.model.{Q}.lora_A{tag}.weight": torch.randn(r, 5, generator=g),
            f"base_model.model.{Q}.lora_B{tag}.weight": torch.randn(5, r, generator=g)}


@pytest.mark.parametrize("default,rslora,alpha", [(False, False, 0.0), (True, False, 0.0), (False, True, 0.0),
                                                  (False, False, 0.25)])
def test_fold_lora_adds_scaled_low_rank_update(tmp_path, default, rslora, alpha):
    base = tensors(1)
    weights = lora_weights(default=default)
    write_adapter(tmp_path / "a", weights, use_rslora=rslora)
    fold_lora(write_model(tmp_path / "b", base), tmp_path / "a", tmp_path / "o", alpha=alpha)
    merged = load_dir(tmp_path / "o")
    a, b = weights.values()
    scale = 4 / (math.sqrt(2) if rslora else 2)
    expected = base[f"{Q}.weight"] + (1 - alpha) * (b @ a) * scale
    torch.testing.assert_close(merged[f"{Q}.weight"], expected, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(merged[k], base[k]) for k in base if k != f"{Q}.weight")
    assert json.loads((tmp_path / "o" / "merge.json").read_text())["lora_modules"] == 1


def test_fold_lora_bf16_base_is_folded_in_float32(tmp_path):
    base = tensors(1, torch.bfloat16)
    weights = lora_weights()
    write_adapter(tmp_path / "a", weights)
    fold_lora(write_model(tmp_path / "b", base), tmp_path / "a", tmp_path / "o")
    a, b = weights.values()
    expected = (base[f"{Q}.weight"].float() + (b @ a) * 2).bfloat16()
    assert torch.equal(load_dir(tmp_path / "o")[f"{Q}.weight"], expected)


def test_fold_lora_transposed_layers_and_patterns(tmp_path):
    """Embeddings (lora_embedding_A/B) fold as (B·A)ᵀ, a Linear layer as B·A whatever fan_in_fan_out says (peft
    decides by the layer, and resets the flag); rank/alpha patterns apply."""
    base = tensors(1)
    g = torch.Generator().manual_seed(4)
    weights = {
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(3, 6, generator=g),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.randn(5, 3, generator=g),
        f"base_model.model.{Q}.lora_A.weight": torch.randn(2, 5, generator=g),
        f"base_model.model.{Q}.lora_B.weight": torch.randn(5, 2, generator=g),
        "base_model.model.model.norm.weight": torch.ones(5),  # trained whole (modules_to_save)
    }
    write_adapter(tmp_path / "a", weights, fan_in_fan_out=True, rank_pattern={"embed_tokens": 3},
                  alpha_pattern={"embed_tokens": 6})
    fold_lora(write_model(tmp_path / "b", base), tmp_path / "a", tmp_path / "o")
    merged = load_dir(tmp_path / "o")
    emb_a, emb_b, q_a, q_b, _ = weights.values()
    torch.testing.assert_close(merged["model.embed_tokens.weight"],
                               base["model.embed_tokens.weight"] + (emb_b @ emb_a).T * 2)
    torch.testing.assert_close(merged[f"{Q}.weight"], base[f"{Q}.weight"] + (q_b @ q_a) * 2)  # square: not (B·A)ᵀ
    assert torch.equal(merged["model.norm.weight"], torch.ones(5))


@pytest.mark.parametrize("config, flag, transposed", [
    ({"model_type": "gpt2"}, False, True),  # a Conv1D ([in, out]): transposed, whatever the flag says
    ({"model_type": "gpt2"}, True, True),
    ({"model_type": "mystery", "auto_map": {"AutoModelForCausalLM": "m.M"}}, True, True),  # code unseen: the flag
    ({"model_type": "mystery", "auto_map": {"AutoModelForCausalLM": "m.M"}}, False, False),
])
def test_a_square_conv1d_folds_by_its_layer_not_by_the_flag(tmp_path, config, flag, transposed):
    name = "transformer.h.0.attn.c_proj"
    base = {f"{name}.weight": torch.randn(5, 5, generator=torch.Generator().manual_seed(2))}
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 5, generator=g), torch.randn(5, 2, generator=g)
    write_adapter(tmp_path / "a", {f"base_model.model.{name}.lora_A.weight": a,
                                   f"base_model.model.{name}.lora_B.weight": b}, fan_in_fan_out=flag)
    fold_lora(write_model(tmp_path / "b", base, config=config), tmp_path / "a", tmp_path / "o")
    delta = (b @ a).T if transposed else b @ a
    torch.testing.assert_close(load_dir(tmp_path / "o")[f"{name}.weight"], base[f"{name}.weight"] + delta * 2)


@pytest.mark.parametrize("trained", ["lora", "modules_to_save"])
def test_an_adapter_on_a_tied_embedding_keeps_the_head_it_was_trained_with(tmp_path, trained):
    """peft moves only the input embedding (a trained copy, or a LoRA on it): the output keeps BASE's embedding as
    its own head, untied in its config; folded into the one shared tensor, the head moved too."""
    base = tensors(1, lm_head=False)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 6, generator=g), torch.randn(5, 3, generator=g)
    new = torch.randn(6, 5, generator=g)
    weights = ({"base_model.model.model.embed_tokens.lora_embedding_A": a,
                "base_model.model.model.embed_tokens.lora_embedding_B": b} if trained == "lora" else
               {"base_model.model.model.embed_tokens.modules_to_save.default.weight": new})
    write_adapter(tmp_path / "a", weights, r=3, lora_alpha=3)
    fold_lora(write_model(tmp_path / "b", base), tmp_path / "a", tmp_path / "o")
    merged = load_dir(tmp_path / "o")
    assert torch.equal(merged["lm_head.weight"], base["model.embed_tokens.weight"])
    expected = base["model.embed_tokens.weight"] + (b @ a).T if trained == "lora" else new
    torch.testing.assert_close(merged["model.embed_tokens.weight"], expected)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["tie_word_embeddings"] is False


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_fold_lora_averages_whole_tensors_too_and_reads_peft_base_layer_names(tmp_path, alpha):
    """A tensor the adapter trained whole is θ' there: α·θ + (1−α)·θ' like every weight (it was θ' at any α, so
    --alpha 1 did not give BASE back). peft saves a trained bias of an adapted layer, and its copy of an adapted
    embedding's weight, as "<module>.base_layer.<name>" (merge refused those as tensors BASE lacks)."""
    base = tensors(1)
    base[f"{Q}.bias"] = torch.randn(5, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(4)
    weights = {
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(3, 6, generator=g),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.randn(5, 3, generator=g),
        "base_model.model.model.embed_tokens.base_layer.weight": base["model.embed_tokens.weight"].clone(),
        f"base_model.model.{Q}.lora_A.weight": torch.randn(2, 5, generator=g),
        f"base_model.model.{Q}.lora_B.weight": torch.randn(5, 2, generator=g),
        f"base_model.model.{Q}.base_layer.bias": torch.full((5,), 3.0),  # bias="lora_only"
        "base_model.model.model.norm.modules_to_save.default.weight": torch.ones(5),
    }
    write_adapter(tmp_path / "a", weights, rank_pattern={"embed_tokens": 3}, alpha_pattern={"embed_tokens": 6})
    fold_lora(write_model(tmp_path / "b", base), tmp_path / "a", tmp_path / "o", alpha=alpha)
    merged = load_dir(tmp_path / "o")
    emb_a, emb_b, _, q_a, q_b, _, _ = weights.values()
    torch.testing.assert_close(merged["model.embed_tokens.weight"],
                               base["model.embed_tokens.weight"] + (1 - alpha) * (emb_b @ emb_a).T * 2)
    torch.testing.assert_close(merged[f"{Q}.weight"], base[f"{Q}.weight"] + (1 - alpha) * (q_b @ q_a) * 2)
    assert torch.equal(merged[f"{Q}.bias"], alpha * base[f"{Q}.bias"] + (1 - alpha) * torch.full((5,), 3.0))
    assert torch.equal(merged["model.norm.weight"], alpha * base["model.norm.weight"] + (1 - alpha) * torch.ones(5))
    if alpha == 1.0:
        assert all(torch.equal(merged[k], base[k]) for k in base)
    assert json.loads((tmp_path / "o" / "merge.json").read_text())["replaced_tensors"] == 2


@pytest.mark.parametrize("weights,config,message", [
    ({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 5),
      "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.zeros(5, 2)}, {},
     "has no tensor model.layers.0.mlp.up_proj.weight"),
    ({f"base_model.model.{Q}.lora_A.weight": torch.zeros(2, 5)}, {}, "needs exactly one A and one B"),
    ({f"{Q}.lora_A.weight": torch.zeros(2, 5)}, {}, "expected a name starting with"),
    (lora_weights(r=3), {}, "rank-2 update"),
    (lora_weights(), {"use_dora": True}, "DoRA"),
    (lora_weights(), {"init_lora_weights": "pissa_niter_4"}, "init_lora_weights 'pissa_niter_4': the adapter updates"),
    (lora_weights(), {"init_lora_weights": "olora"}, "path_initial_model_for_weight_conversion"),
    (lora_weights(), {"alora_invocation_tokens": [3, 4]}, "activated LoRA"),
    (lora_weights(), {"layer_replication": [[0, 1], [0, 1]]}, "layer_replication builds another stack"),
    (lora_weights(), {"trainable_token_indices": [2]}, r"trainable tokens \(trainable_token_indices\)"),
    ({f"base_model.model.{Q}.lora_magnitude_vector": torch.zeros(5)}, {}, "not a plain LoRA weight"),
])
def test_fold_lora_errors(tmp_path, weights, config, message):
    write_adapter(tmp_path / "a", weights, **config)
    with pytest.raises(UnlearnError, match=message):
        fold_lora(write_model(tmp_path / "b", tensors(1)), tmp_path / "a", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_lora_on_a_tied_lm_head_that_base_lacks_is_refused(tmp_path):
    g = torch.Generator().manual_seed(5)
    write_adapter(tmp_path / "a", {"base_model.model.lm_head.lora_A.weight": torch.randn(2, 5, generator=g),
                                   "base_model.model.lm_head.lora_B.weight": torch.randn(6, 2, generator=g)})
    with pytest.raises(UnlearnError, match="has no tensor lm_head.weight"):
        fold_lora(write_model(tmp_path / "b", tensors(1, lm_head=False)), tmp_path / "a", tmp_path / "o")


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensor_io, "write_safetensors", full)
    with pytest.raises(UnlearnError, match="No space left on device"):
        average(write_model(tmp_path / "b", tensors(1)), write_model(tmp_path / "t", tensors(2)), tmp_path / "o", 0.5)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


def hub_gpt2(seed: int, prefix: str) -> dict[str, torch.Tensor]:
    """A GPT-2 body stored with or without its base-model prefix (the hub's gpt2 files have none)."""
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}wte.weight": torch.randn(6, 4, generator=g),
            f"{prefix}h.0.mlp.c_fc.weight": torch.randn(4, 8, generator=g),
            f"{prefix}ln_f.weight": torch.randn(4, generator=g)}


@pytest.mark.parametrize("base_prefix, tuned_prefix", [("", "transformer."), ("transformer.", "")])
def test_checkpoints_saved_with_and_without_the_base_model_prefix_merge_by_tensor(tmp_path, base_prefix,
                                                                                     tuned_prefix):
    """A run on the hub's gpt2 writes model/ with "transformer." names; its BASE has none: every merge of the
    run was refused as a tensor "in BASE but not in TUNED". The output keeps BASE's names."""
    base, tuned = hub_gpt2(1, base_prefix), hub_gpt2(2, tuned_prefix)
    tuned["lm_head.weight"] = tuned[f"{tuned_prefix}wte.weight"].clone()  # saved tied, as save_pretrained may
    config = {"model_type": "gpt2", "tie_word_embeddings": True}
    average(write_model(tmp_path / "b", base, config=config), write_model(tmp_path / "t", tuned, config=config),
            tmp_path / "o", 0.25)
    merged = load_dir(tmp_path / "o")
    assert sorted(merged) == sorted(base)
    for name in ("wte.weight", "h.0.mlp.c_fc.weight", "ln_f.weight"):
        torch.testing.assert_close(merged[base_prefix + name],
                                   0.25 * base[base_prefix + name] + 0.75 * tuned[tuned_prefix + name])


def test_an_adapter_folds_into_a_base_stored_without_the_base_model_prefix(tmp_path):
    base = hub_gpt2(1, "")
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 4, generator=g), torch.randn(8, 2, generator=g)
    write_adapter(tmp_path / "a", {"base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight": a,
                                   "base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight": b,
                                   "base_model.model.transformer.ln_f.modules_to_save.default.weight": torch.ones(4)},
                  target_modules=["c_fc"])
    fold_lora(write_model(tmp_path / "b", base, config={"model_type": "gpt2"}), tmp_path / "a", tmp_path / "o")
    merged = load_dir(tmp_path / "o")
    assert sorted(merged) == sorted(base)
    torch.testing.assert_close(merged["h.0.mlp.c_fc.weight"], base["h.0.mlp.c_fc.weight"] + (b @ a).T * 2)
    assert torch.equal(merged["ln_f.weight"], torch.ones(4))


def test_an_extra_tensor_named_like_a_prefixed_one_is_not_paired_in_its_place(tmp_path):
    """TUNED's "mtp.lm_head.weight" beside its own "lm_head.weight" is another tensor (a draft head), not BASE's
    head under a prefix: paired, the merged head was BASE's averaged with it, exit 0. It is named and refused."""
    base = {"model.embed_tokens.weight": torch.zeros(4, 4), "lm_head.weight": torch.zeros(4, 4)}
    tuned = {"model.embed_tokens.weight": torch.full((4, 4), 2.0), "lm_head.weight": torch.full((4, 4), 2.0),
             "mtp.lm_head.weight": torch.full((4, 4), 100.0)}
    with pytest.raises(UnlearnError, match="tensor mtp.lm_head.weight: in TUNED but not in BASE"):
        average(write_model(tmp_path / "b", base), write_model(tmp_path / "t", tuned), tmp_path / "o", 0.5)
    assert not (tmp_path / "o").exists()


def test_a_linear_layer_of_a_conv1d_model_folds_untransposed(tmp_path):
    # GPT-2's head is an nn.Linear ([out, in]), not one of its Conv1D layers: B·A as it is
    name = "lm_head"
    base = {f"{name}.weight": torch.randn(6, 5, generator=torch.Generator().manual_seed(2))}
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    write_adapter(tmp_path / "a", {f"base_model.model.{name}.lora_A.weight": a,
                                   f"base_model.model.{name}.lora_B.weight": b}, target_modules=["lm_head"])
    fold_lora(write_model(tmp_path / "b", base, config={"model_type": "gpt2"}), tmp_path / "a", tmp_path / "o")
    torch.testing.assert_close(load_dir(tmp_path / "o")[f"{name}.weight"], base[f"{name}.weight"] + (b @ a) * 2)


def test_an_untied_base_whose_head_has_another_name_gets_no_lm_head(tmp_path):
    # untied (its head is elsewhere, as GPT-NeoX's embed_out): the embedding's adapter moves the embedding only
    head = torch.randn(6, 5, generator=torch.Generator().manual_seed(7))
    base = {**tensors(1, lm_head=False), "embed_out.weight": head}
    g = torch.Generator().manual_seed(4)
    new = torch.randn(6, 5, generator=g)
    write_adapter(tmp_path / "a", {"base_model.model.model.embed_tokens.modules_to_save.default.weight": new})
    fold_lora(write_model(tmp_path / "b", base, config={"model_type": "llama", "tie_word_embeddings": False}),
              tmp_path / "a", tmp_path / "o")
    merged = load_dir(tmp_path / "o")
    assert sorted(merged) == sorted(base) and torch.equal(merged["model.embed_tokens.weight"], new)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["tie_word_embeddings"] is False
