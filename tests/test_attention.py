"""attention.py: a bf16/fp16 model on CPU trains under SDPA's math kernel, its reference pass too, and
gradient checkpointing recomputes under the same kernel."""

import pytest
import torch

from unlearn.attention import runs_math_kernel, training_attention
from unlearn.lora import LoraSettings, attach_lora, lora_modules
from unlearn.models import enable_gradient_checkpointing, load_model
from unlearn.train import TrainConfig, Unlearner

from test_train import FORGET, NORMAL


def loaded(directory, dtype):
    torch.manual_seed(0)
    return load_model(str(directory), dtype=dtype, log=lambda m: None)


def kernels() -> tuple[bool, bool]:
    """(flash allowed, math allowed): torch's SDPA backend switches, which `sdpa_kernel` sets."""
    return torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()


@pytest.mark.parametrize("dtype, math_only", [("bfloat16", True), ("float16", True), ("float32", False)])
def test_only_low_precision_is_held_to_the_math_kernel_and_the_choice_comes_back(llama_dir, dtype, math_only):
    model = loaded(llama_dir, dtype).model
    assert runs_math_kernel(model) is math_only and kernels() == (True, True)
    with training_attention(model):
        assert kernels() == ((False, True) if math_only else (True, True))
    assert kernels() == (True, True)
    with pytest.raises(RuntimeError), training_attention(model):
        raise RuntimeError("a failing forward")
    assert kernels() == (True, True)  # given back on the way out of an error too


def test_a_bf16_first_kl_is_exactly_zero(llama_dir):
    # The trained and the reference pass run the same kernel, so at the original they are one function.
    lm = loaded(llama_dir, "bfloat16")
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
    u = Unlearner(lm.model, lm.tokenizer, FORGET, NORMAL, TrainConfig(lr=1e-2, batch_size=2, check_every=0))
    assert u.loss(u._rows())[1]["kl"] == 0.0


def test_bf16_gradient_checkpointing_steps_as_the_plain_model_does(llama_dir):
    # Before checkpoint_contexts the recomputation ran SDPA's default kernel while the forward had run the
    # math kernel: torch.utils.checkpoint.CheckpointError (the recomputed tensors did not match the saved ones).
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
