"""layer_names.py: the decoder layer of a module name in each family, and the decoder layers of tiny models."""

import pytest
from torch import nn

from unlearn import edit_layers, rmu
from unlearn.errors import UsageError
from unlearn.layer_names import decoder_layer_names, decoder_layers, layer_index
from unlearn.lora import LoraSettings, attach_lora


@pytest.mark.parametrize("name, index", [
    ("model.layers.0.self_attn.q_proj", 0),                      # Llama, Mistral, Qwen
    ("model.layers.29.mlp.down_proj", 29),
    ("model.layers.12.mlp.down_proj.lora_A", 12),                # below a LoRA wrapper
    ("model.layers.12.mlp.down_proj.base", 12),
    ("model.layers.7", 7),                                       # the block itself
    ("model.decoder.layers.3.fc1", 3),                           # OPT
    ("model.decoder.layers.11.self_attn_layer_norm", 11),
    ("transformer.h.7.mlp.c_fc", 7),                             # GPT-2, Falcon, BLOOM
    ("transformer.h.0.mlp.dense_4h_to_h", 0),
    ("gpt_neox.layers.5.mlp.dense_4h_to_h", 5),                  # GPT-NeoX
    ("transformer.blocks.2.ffn.down_proj", 2),                   # MPT
    ("layers.4.fc2", 4),                                         # no prefix
])
def test_a_name_inside_a_decoder_layer_has_its_index(name, index):
    assert layer_index(name) == index


@pytest.mark.parametrize("name", [
    "",                                  # the model itself
    "lm_head", "model.embed_tokens", "model.norm",                           # Llama
    "model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.final_layer_norm",  # OPT
    "transformer.wte", "transformer.wpe", "transformer.ln_f",                # GPT-2
    "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "embed_out",           # GPT-NeoX
    "model.layers", "transformer.h",     # the containers, not a layer
    "model.layers12.mlp", "model.graph.3.fc", "model.sublayers.3.fc",        # not a part of its own
    "model.layers.x.mlp", "model.layers.3x.mlp",
])
def test_a_name_outside_the_decoder_layers_has_none(name):
    assert layer_index(name) is None


def test_the_first_numbered_part_counts():
    # A numbered child of a block (MoE experts are `experts.N`, but a `layers.N` would read the same way)
    # belongs to the block.
    assert layer_index("model.layers.3.inner.layers.1.fc") == 3


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=3,
                                    num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def tiny_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                            num_attention_heads=2, max_position_embeddings=32))


def tiny_falcon():
    from transformers import FalconConfig, FalconForCausalLM

    return FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                          bos_token_id=0, eos_token_id=0))


@pytest.mark.parametrize("build, names", [
    (tiny_llama, ["model.layers.0", "model.layers.1", "model.layers.2"]),
    (tiny_opt, ["model.decoder.layers.0", "model.decoder.layers.1", "model.decoder.layers.2"]),
    (tiny_neox, ["gpt_neox.layers.0", "gpt_neox.layers.1", "gpt_neox.layers.2"]),
    (tiny_gpt2, ["transformer.h.0", "transformer.h.1", "transformer.h.2"]),
    (tiny_falcon, ["transformer.h.0", "transformer.h.1", "transformer.h.2"]),
])
def test_decoder_layers_of_tiny_models(build, names):
    model = build()
    assert decoder_layer_names(model) == dict(enumerate(names))
    layers = decoder_layers(model)
    assert list(layers) == [0, 1, 2]
    assert all(layers[i] is model.get_submodule(name) for i, name in enumerate(names))
    assert rmu.decoder_layers(model) == layers


def test_decoder_layers_are_the_same_blocks_with_adapters_attached():
    model = tiny_llama()
    before = decoder_layers(model)
    attach_lora(model, LoraSettings(), seed=0)  # adds model.layers.N.mlp.*.base, lora_A, ...
    assert decoder_layers(model) == before


def test_layers_wins_over_other_numbered_stacks():
    # A vision tower named `visual.blocks.N` (Qwen2-VL) next to a `model.layers.N` decoder is not a decoder layer.
    model = tiny_llama()
    model.visual = nn.Module()
    model.visual.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(5))
    assert decoder_layer_names(model) == {0: "model.layers.0", 1: "model.layers.1", 2: "model.layers.2"}


def test_a_model_without_decoder_layers():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert decoder_layers(model) == {} and decoder_layer_names(model) == {}
    with pytest.raises(UsageError, match="no decoder layers named layers.N, h.N or blocks.N"):
        rmu.decoder_layers(model)


@pytest.mark.parametrize("build, path", [(tiny_llama, "mlp.down_proj"), (tiny_opt, "fc2"),
                                         (tiny_neox, "mlp.dense_4h_to_h"), (tiny_falcon, "mlp.dense_4h_to_h")])
def test_edit_finds_the_mlp_output_projection_in_each_decoder_layer(build, path):
    model = build()
    names = decoder_layer_names(model)
    found = edit_layers.mlp_out_modules(model)
    assert {i: name for i, (name, _) in found.items()} == {i: f"{names[i]}.{path}" for i in range(3)}
    assert all(module is model.get_submodule(name) for name, module in found.values())
