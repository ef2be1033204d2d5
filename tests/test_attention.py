"""attention.py: a bf16/fp16 model on CPU trains with eager attention, its reference pass too, and
gradient checkpointing recomputes with the same attention."""

import pytest
import torch

from unlearn.attention import runs_eager, training_attention
from unlearn.data import collate, encode_pair
from unlearn.lora import LoraSettings, attach_lora, lora_modules
from unlearn.models import enable_gradient_checkpointing, load_model
from unlearn.train import TrainConfig, Unlearner, forward_logits

from test_train import FORGET, NORMAL


def loaded(directory, dtype):
    torch.manual_seed(0)
    lm = load_model(str(directory), dtype=dtype, log=lambda m: None)
    return lm


@pytest.mark.parametrize("dtype, eager", [("bfloat16", True), ("float16", True), ("float32", False)])
def test_only_low_precision_switches_to_eager_and_sdpa_comes_back(llama_dir, dtype, eager):
    model = loaded(llama_dir, dtype).model
    assert model.config._attn_implementation == "sdpa" and runs_eager(model) is eager
    with training_attention(model):
        inside = {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    assert inside == {"eager" if eager else "sdpa"}
    assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {"sdpa"}
    with pytest.raises(RuntimeError), training_attention(model):
        raise RuntimeError("a failing forward")
    assert model.config._attn_implementation == "sdpa"  # given back on the way out of an error too


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_eager_gives_sdpa_s_logits_at_every_real_position_of_a_padded_batch(llama_dir, opt_dir, family):
    # Right-padded rows of unequal length: the causal eager mask must hide the padding as SDPA's does.
    lm = loaded(llama_dir if family == "llama" else opt_dir, "bfloat16")
    rows = [encode_pair(lm.tokenizer, e.prompt, e.response, 64) for e in FORGET]
    batch = collate(rows, lm.tokenizer.pad_token_id)
    with torch.no_grad():
        trained = forward_logits(lm.model, batch, 0).float()  # eager, inside training_attention
        plain = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    real = batch["attention_mask"].bool()
    assert trained.shape == plain.shape and real.sum() < real.numel()  # some padding
    # bf16 rounds to 8 bits of mantissa: the two orders of summation agree to its resolution
    assert torch.allclose(trained[real], plain[real], atol=0.05 * plain[real].abs().max().item())


def test_a_bf16_first_kl_is_exactly_zero(llama_dir):
    # The trained and the reference pass run the same attention, so at the original they are one function.
    lm = loaded(llama_dir, "bfloat16")
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
    u = Unlearner(lm.model, lm.tokenizer, FORGET, NORMAL, TrainConfig(lr=1e-2, batch_size=2, check_every=0))
    assert u.loss(u._rows())[1]["kl"] == 0.0


def test_bf16_gradient_checkpointing_steps_as_the_plain_model_does(llama_dir):
    # Before checkpoint_contexts the recomputation ran SDPA while the forward had run another kernel:
    # torch.utils.checkpoint.CheckpointError (the recomputed tensors did not match the saved ones).
    def built(checkpointing):
        lm = loaded(llama_dir, "bfloat16")
        attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
        if checkpointing:
            enable_gradient_checkpointing(lm.model)
        return Unlearner(lm.model, lm.tokenizer, FORGET, NORMAL, TrainConfig(lr=1e-2, batch_size=2, check_every=0))

    plain, checkpointed = built(False), built(True)
    for _ in range(3):
        a, b = plain.step(), checkpointed.step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2, abs=1e-3)
    for name, module in lora_modules(plain.model).items():
        other = lora_modules(checkpointed.model)[name]
        assert torch.allclose(module.lora_B.float(), other.lora_B.float(), atol=1e-3), name
