"""Model families beyond Llama and OPT: what each needs from LoRA, the edit and generation.

Tiny random models of the families (tiny_models.build_family), each run as a user would run it: the
default method adapts the family's feed-forward layers, the edit runs under a sliding-window cache,
batched answers equal one-at-a-time answers under a sliding window, and what cannot work says so in
one line with the way forward.
"""

import json

import pytest
import torch

import tiny_models
from test_run_cli import FORGET, NORMAL, write_jsonl

FAST = ["--max-steps", "2", "--check-every", "0", "--eval-limit", "2", "--max-new-tokens", "6", "--no-probes",
        "--batch-size", "2"]


@pytest.fixture
def rows(tmp_path):
    return write_jsonl(tmp_path / "forget.jsonl", FORGET), write_jsonl(tmp_path / "normal.jsonl", NORMAL)


@pytest.mark.parametrize("family, kinds", [
    ("gemma", ["down_proj", "gate_proj", "up_proj"]),  # its 0-dim embed_scale buffer ended the run when hashed
    ("falcon", ["dense_4h_to_h", "dense_h_to_4h"]),     # it adds to its MLP's output in place
    ("phi3", ["down_proj", "gate_up_proj"]),            # gate and up fused: two thirds of the MLP
    ("gptj", ["fc_in", "fc_out"]),
])
def test_the_default_run_adapts_each_familys_feed_forward_layers(tmp_path, cli, rows, family, kinds):
    model = tiny_models.build_family(tmp_path / family, family)
    out = tmp_path / "out"
    result = cli("run", *rows, "--model", model, "-o", out, *FAST)
    assert result.code == 0, result.err
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"] == kinds


@pytest.mark.parametrize("family, window", [
    # The edit's target optimisation puts the cache back after every step; a sliding-window layer also
    # counts the positions it has seen, and the second step's mask was built for more keys than it held.
    ("mistral", 4096),  # Mistral-7B-v0.1's window
    ("gptj", None),     # its MLP output projection is mlp.fc_out (edit_layers.MLP_OUT_NAMES)
])
def test_the_edit_runs_on_other_families(tmp_path, cli, rows, family, window):
    model = tiny_models.build_family(tmp_path / family, family, sliding_window=window)
    result = cli("run", *rows, "--model", model, "-o", tmp_path / "out", "--method", "edit", "--eval-limit", "2",
                 "--max-new-tokens", "6", "--no-probes")
    assert result.code == 0, result.err


def test_the_edit_and_the_default_run_on_an_image_and_text_gemma3(tmp_path, cli, rows):
    """Gemma 3's image-and-text class keeps its text model's width under `text_config`: the edit's target read
    `config.hidden_size` at the top and ended in an internal error (AttributeError) before it edited anything."""
    model = tiny_models.build_gemma3_image_text(tmp_path / "gemma3")
    result = cli("run", *rows, "--model", model, "-o", tmp_path / "edit", "--method", "edit", "--eval-limit", "2",
                 "--max-new-tokens", "6", "--no-probes")
    assert result.code == 0, result.err
    assert (tmp_path / "edit" / "model").is_dir()
    result = cli("run", *rows, "--model", model, "-o", tmp_path / "ga", *FAST)
    assert result.code == 0, result.err


def test_merge_folds_a_gemma3_image_and_text_adapter_into_its_base(tmp_path, cli, rows):
    """Gemma 3's image-and-text checkpoints store `language_model.model.layers...`, and the loaded model, hence
    PEFT's adapter keys, calls them `model.language_model.layers...`: not a prefix apart, so `merge --adapter` refused
    the base ("has no tensor"). Folded on disk now, the result is the run's own merged model, bit for bit."""
    from safetensors.torch import load_file

    model = tiny_models.build_gemma3_image_text(tmp_path / "gemma3")
    run = tmp_path / "run"
    result = cli("run", *rows, "--model", model, "-o", run, *FAST)
    assert result.code == 0, result.err
    result = cli("merge", model, "--adapter", run / "adapter", "-o", tmp_path / "merged")
    assert result.code == 0, result.err
    merged, in_run = (load_file(path / "model.safetensors") for path in (tmp_path / "merged", run / "model"))
    base = load_file(model / "model.safetensors")
    assert sorted(merged) == sorted(base)  # BASE's names kept: it loads as BASE does
    folded = [name for name in merged if not torch.equal(merged[name], base[name])]
    assert folded and all(name.startswith("language_model.model.layers.") for name in folded)
    assert all(torch.equal(merged[name], in_run[name]) for name in merged)


def test_stored_names_are_transformers_renaming_and_nothing_for_a_model_it_does_not_rename(tmp_path):
    from unlearn.stored_names import stored_names

    config = json.loads((tiny_models.build_gemma3_image_text(tmp_path / "gemma3") / "config.json").read_text())
    loaded = ["model.language_model.layers.1.self_attn.q_proj.weight", "lm_head.weight",
              "model.vision_tower.encoder.layers.0.mlp.fc1.weight"]
    assert stored_names(config, loaded) == {
        "model.language_model.layers.1.self_attn.q_proj.weight": "language_model.model.layers.1.self_attn.q_proj.weight",
        "lm_head.weight": "language_model.lm_head.weight",
        "model.vision_tower.encoder.layers.0.mlp.fc1.weight": "vision_tower.encoder.layers.0.mlp.fc1.weight"}
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
             "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 64}
    assert stored_names(llama, ["model.layers.0.mlp.down_proj.weight"]) == {}
    # a model whose code comes with the checkpoint builds nothing here; an unknown class maps nothing
    assert stored_names({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}}, loaded) == {}
    assert stored_names({**config, "architectures": ["NoSuchModel"]}, loaded) == {}
    # a config without `architectures`: the causal LM class of its model_type, as `unlearn run` loads it
    assert stored_names({k: v for k, v in config.items() if k != "architectures"}, loaded[:1]) == {
        "model.language_model.layers.1.self_attn.q_proj.weight": "language_model.model.layers.1.self_attn.q_proj.weight"}
    # a fused experts' tensor is split on saving: no one stored tensor is it
    mixtral = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 16,
               "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
               "num_local_experts": 2, "vocab_size": 64}
    assert "model.layers.0.mlp.experts.gate_up_proj" not in stored_names(mixtral, [
        "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.gate.weight"])


def test_a_mixture_of_experts_gets_adapters_on_its_attention_unless_targets_are_given(tmp_path, cli, rows):
    """Mixtral's experts are fused 3-D parameters that LoRA here cannot wrap: without --lora-targets the default run
    adapts the attention projections and says so (it stopped with an error before); with the feed-forward names
    given, it still refuses in one line."""
    model = tiny_models.build_family(tmp_path / "mixtral", "mixtral")
    out = tmp_path / "out"
    result = cli("run", *rows, "--model", model, "-o", out, *FAST)
    assert result.code == 0, result.err
    assert "so the adapters are on the attention projections (k_proj, o_proj, q_proj, v_proj)" in result.err
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"] == [
        "k_proj", "o_proj", "q_proj", "v_proj"]
    assert any("attention projections" in note for note in json.loads((out / "run.json").read_text())["notes"])
    for targets in ("down_proj", "gate_proj,up_proj,down_proj,gate_up_proj,fc1,fc2,dense_h_to_4h,dense_4h_to_h,"
                                 "fc_in,fc_out,c_fc,mlp.c_proj"):  # given at the default's value: given all the same
        result = cli("run", *rows, "--model", model, "-o", tmp_path / "refused", "--lora-targets", targets, *FAST)
        assert result.code == 2 and "fused parameter" in result.err.strip().splitlines()[-1]
    assert not (tmp_path / "refused").exists()


def test_targets_given_with_a_dot_on_a_model_without_experts_say_nothing_of_experts(tmp_path, cli, rows, llama_dir):
    result = cli("run", *rows, "--model", llama_dir, "-o", tmp_path / "out", "--lora-targets", "mlp.down_proj", *FAST)
    assert result.code == 0, result.err
    assert "mixture of experts" not in result.err and "experts" not in json.dumps(
        json.loads((tmp_path / "out" / "run.json").read_text())["notes"])


def test_batched_answers_equal_single_ones_under_a_sliding_window(tmp_path):
    from unlearn.generation import generate
    from unlearn.models import load_model

    loaded = load_model(str(tiny_models.build_family(tmp_path / "mistral", "mistral", sliding_window=16)),
                        log=lambda m: None)
    # The chat template's opening is the prefix every row shares; shorter rows get left padding after it,
    # and the longest row with its answer passes the window.
    prompts = ["Hi?", "What is two plus two, and why?", "Name one colour of the sky at dusk and at noon, please.",
               "Tell me a long story about a dog and a cat and a bird who live together in a small house by the sea."]
    batched = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=8, batch_size=8, desc=False)
    alone = [generate(loaded.model, loaded.tokenizer, [p], max_new_tokens=8, batch_size=1, desc=False)[0]
             for p in prompts]
    assert batched == alone


def test_gpt2s_conv1d_layers_get_adapters_peft_loads_and_merges_to_the_saved_model(tmp_path, cli, rows):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_models.build_family(tmp_path / "gpt2", "gpt2")
    out = tmp_path / "out"
    result = cli("run", *rows, "--model", base, "-o", out, *FAST, "--lr", "1e-2")
    assert result.code == 0, result.err
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    # The MLP's c_fc and c_proj, by full name: the kind `c_proj` would take the attention's output too.
    assert config["target_modules"] == [f"transformer.h.{i}.mlp.{m}" for i in (0, 1) for m in ("c_fc", "c_proj")]
    assert config["fan_in_fan_out"] is True
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter").merge_and_unload()
    saved = AutoModelForCausalLM.from_pretrained(out / "model")  # a GPT-2 checkpoint: Conv1D weights (in, out)
    ours, theirs = saved.state_dict(), merged.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not torch.equal(ours["transformer.h.0.mlp.c_fc.weight"],
                           AutoModelForCausalLM.from_pretrained(base).state_dict()["transformer.h.0.mlp.c_fc.weight"])


def test_the_edit_on_gpt2_is_one_line_that_names_its_conv1d(tmp_path, cli, rows):
    model = tiny_models.build_family(tmp_path / "gpt2", "gpt2")
    result = cli("run", *rows, "--model", model, "-o", tmp_path / "out", "--method", "edit", "--no-probes")
    assert result.code == 2 and result.err.strip().splitlines()[-1] == (
        "unlearn: GPT2LMHeadModel: its MLP output projection (transformer.h.0.mlp.c_proj) is a Conv1D, which "
        "--method edit does not take: use a fine-tuning method (the default)"), result.err


def test_a_target_that_is_neither_linear_nor_conv1d_is_one_line_that_points_to_full(tmp_path, cli, rows):
    model = tiny_models.build_family(tmp_path / "gpt2", "gpt2")
    result = cli("run", *rows, "--model", model, "-o", tmp_path / "out", *FAST, "--lora-targets", "wpe")
    last = result.err.strip().splitlines()[-1]  # after the "model ..." line
    assert result.code == 2 and last == ("unlearn: --lora-targets: transformer.wpe is a Embedding, not a Linear layer "
                                         "(nor GPT-2's Conv1D), which LoRA here adapts only: train every weight "
                                         "with --full"), result.err


def test_targets_naming_nothing_list_the_linear_layers_the_model_has_or_its_fused_experts():
    from transformers import MixtralConfig, MixtralForCausalLM

    from unlearn.errors import UsageError
    from unlearn.lora import LoraSettings, attach_lora

    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2))
    with pytest.raises(UsageError, match=r"mlp\.experts\..* is a fused parameter of the experts.*--full"):
        attach_lora(moe, LoraSettings())
    with pytest.raises(UsageError, match=r"no module of this model has that name; its Linear layers are "
                                         r"k_proj, o_proj, q_proj, v_proj \("):
        attach_lora(moe, LoraSettings(targets=("nope",)))
    # the default targets (--lora-targets not given) on experts whose attention has no q_proj-style names: the line
    # says the default found nothing, not "--lora-targets down_proj,..." as if the user had typed them
    for layer in moe.model.layers:
        attention = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attention, "w" + name[0], getattr(attention, name))
            delattr(attention, name)
    with pytest.raises(UsageError) as refused:
        attach_lora(moe, LoraSettings(), attention_if_fused=True)
    assert str(refused.value).startswith("the default LoRA targets name only the experts' fused parameters (model.")
    assert "no q_proj, k_proj, v_proj, o_proj to adapt instead; its Linear layers are wk, wo, wq, wv" in str(
        refused.value) and "--lora-targets" in str(refused.value) and "--full" in str(refused.value)
    # ... and on a dense model whose feed-forward layers the default does not name
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    for layer in dense.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, name.replace("_proj", ""), getattr(layer.mlp, name))
            delattr(layer.mlp, name)
    with pytest.raises(UsageError, match=r"^the default --lora-targets \(gate_proj,up_proj,down_proj,.*\): no module "
                                         r"of this model has that name; its Linear layers are down, gate, k_proj, "):
        attach_lora(dense, LoraSettings(), attention_if_fused=True)


def test_a_pad_token_past_the_embeddings_is_one_line(tmp_path, cli, rows):
    model = tiny_models.build_llama(tmp_path / "llama")
    tokenizer = tiny_models.llama_tokenizer(True)
    tokenizer.add_special_tokens({"pad_token": "<newpad>"})  # a token the model was never resized for
    tokenizer.save_pretrained(model)
    result = cli("run", *rows, "--model", model, "-o", tmp_path / "out", *FAST)
    assert result.code == 1 and "pad token '<newpad>' is id 400, past the model's 400 embeddings" in result.err, \
        result.err


@pytest.mark.parametrize("family, window, keeps", [("gemma", None, True), ("mistral", 16, False),
                                                   ("gemma2", 16, False), ("gptneo", 16, False)])
def test_a_batch_shares_its_prompt_prefix_only_where_every_layer_sees_every_position(tmp_path, family, window, keeps):
    # GPT-Neo's local layers keep every position in plain cache layers but mask by cache slot: its config says so.
    from transformers import AutoModelForCausalLM

    from unlearn.kv_cache import keeps_every_position

    model = AutoModelForCausalLM.from_pretrained(tiny_models.build_family(tmp_path / family, family,
                                                                          sliding_window=window))
    assert keeps_every_position(model) is keeps


def test_gpt2_trained_with_gradient_checkpointing_is_measured_with_its_cache(tmp_path, cli, rows):
    # Scoring after training ran in training mode, where a checkpointed layer drops the KV cache.
    model = tiny_models.build_family(tmp_path / "gpt2", "gpt2")
    result = cli("run", *rows, "--model", model, "-o", tmp_path / "out", *FAST, "--lr", "1e-2",
                 "--gradient-checkpointing", "--lora-dropout", "0.1", "--grad-accum", "2")
    assert result.code == 0, result.err
    # transformers 5's deprecation of the old name, and its use_cache notice, on every such run
    assert "FutureWarning" not in result.err and "incompatible with gradient checkpointing" not in result.err


def test_a_model_that_does_not_say_where_its_embedding_is_is_not_checked():
    from unlearn.models import _refuse_special_tokens_past_embeddings

    class NoEmbedding:  # remote code without get_input_embeddings: transformers' default raises
        def get_input_embeddings(self):
            raise NotImplementedError("not auto-handled")

    _refuse_special_tokens_past_embeddings("m", NoEmbedding(), tokenizer=None)  # nothing to check, no error


def test_a_plain_weight_matrix_is_not_called_a_fused_expert_parameter():
    from transformers import MixtralConfig, MixtralForCausalLM

    from unlearn.errors import UsageError
    from unlearn.lora import LoraSettings, attach_lora

    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2))
    # "weight" names 2-D matrices (the embedding, the projections), no module and no 3-D experts' tensor
    with pytest.raises(UsageError, match=r"no module of this model has that name; its Linear layers are "):
        attach_lora(moe, LoraSettings(targets=("weight",)))


def test_gpt_neo_with_only_global_layers_keeps_every_position():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from unlearn.kv_cache import keeps_every_position

    config = GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global"], 2]],
                          vocab_size=64, max_position_embeddings=64)
    assert keeps_every_position(GPTNeoForCausalLM(config)) is True


def test_the_edit_takes_gpt_neos_linear_c_proj_and_refuses_gpt2_before_measuring(tmp_path, cli, rows):
    """(review 116) GPT-Neo's MLP output projection is an nn.Linear named `mlp.c_proj` (as GPTBigCode's and
    Qwen-1's): it was refused as having none. GPT-2's Conv1D of that name is refused, now before the original's
    answers are measured (the refusal came after them)."""
    neo = tiny_models.build_family(tmp_path / "gptneo", "gptneo")
    out = tmp_path / "out"
    result = cli("run", *rows, "--model", neo, "-o", out, "--method", "edit", "--no-probes", "--eval-limit", "2",
                 "--max-new-tokens", "4")
    assert result.code == 0, result.err
    edited = json.loads((out / "run.json").read_text())["history"][0]
    assert edited["rank"] and all(name.endswith(".mlp.c_proj") for name in edited["rank"])
    gpt2 = tiny_models.build_family(tmp_path / "gpt2", "gpt2")
    result = cli("run", *rows, "--model", gpt2, "-o", tmp_path / "out2", "--method", "edit", "--no-probes")
    assert result.code == 2 and "is a Conv1D" in result.err, result.err
    assert "not answered by the original model" not in result.err  # the before measurement's line: never reached
