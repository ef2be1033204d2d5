"""attention.py: a bf16/fp16 model on CPU trains under SDPA's math kernel, its reference pass too
(gradient checkpointing's recomputation under the same kernel: test_train.py's checkpointing test)."""

import pytest
import torch

from unlearn.attention import runs_math_kernel, training_attention
from unlearn.models import load_model

from test_train import unlearner


def kernels() -> tuple[bool, bool]:
    """(flash allowed, math allowed): torch's SDPA backend switches, which `sdpa_kernel` sets."""
    return torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()


@pytest.mark.parametrize("dtype, math_only", [("bfloat16", True), ("float16", True), ("float32", False)])
def test_only_low_precision_is_held_to_the_math_kernel_and_the_choice_comes_back(llama_dir, dtype, math_only):
    model = load_model(str(llama_dir), dtype=dtype, log=lambda m: None).model
    assert runs_math_kernel(model) is math_only and kernels() == (True, True)
    with training_attention(model):
        assert kernels() == ((False, True) if math_only else (True, True))
    assert kernels() == (True, True)
    with pytest.raises(RuntimeError), training_attention(model):
        raise RuntimeError("a failing forward")
    assert kernels() == (True, True)  # given back on the way out of an error too


def test_a_bf16_first_kl_is_exactly_zero(llama_dir):
    # The trained and the reference pass run the same kernel, so at the original they are one function.
    u = unlearner(llama_dir, "bfloat16")
    assert u.loss(u._rows())[1]["kl"] == 0.0
