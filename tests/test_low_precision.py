"""system.slow_low_precision_note: half precision is flagged where this CPU multiplies it much slower than
float32 (torch's reference path on CPUs without bf16/fp16 instructions), and load_model says so."""

import pytest
import torch

from unlearn import models, system


@pytest.fixture
def rates(monkeypatch):
    """Set the measured GFLOP/s per dtype; a float32-only question must not measure anything else."""
    table = {}
    monkeypatch.setattr(system, "cpu_matmul_rate", lambda name: table[name])
    return table


def test_the_note_follows_the_share_of_float32s_rate(rates):
    rates.update(float32=60.0, bfloat16=1.5)
    note = system.slow_low_precision_note("bfloat16")
    assert "1.5 GFLOP/s against 60 in float32" in note and "about 40x slower" in note
    rates["bfloat16"] = 0.5 * 60.0  # exactly the threshold: fast enough
    assert system.slow_low_precision_note("bfloat16") is None
    rates["bfloat16"] = 150.0  # native bf16: faster than float32
    assert system.slow_low_precision_note("bfloat16") is None
    assert system.slow_low_precision_note("float32") is None and set(rates) == {"float32", "bfloat16"}


def test_the_rate_is_measured_once_and_is_a_rate():
    system.cpu_matmul_rate.cache_clear()
    first = system.cpu_matmul_rate("float32")
    assert first > 0.1 and system.cpu_matmul_rate("float32") == first


@pytest.mark.parametrize("slow", [True, False])
def test_loading_a_bf16_model_on_such_a_cpu_says_float32_is_faster(llama_dir, rates, slow, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rates.update(float32=60.0, bfloat16=1.5 if slow else 120.0)
    said = []
    loaded = models.load_model(str(llama_dir), dtype="bfloat16", log=said.append)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16  # the user's choice stands
    lines = [m for m in said if m.startswith("--dtype bfloat16:")]
    assert (lines == [f"--dtype bfloat16: {system.slow_low_precision_note('bfloat16')}; --dtype float32 is "
                      f"faster on this machine"]) if slow else not lines
    said.clear()
    models.load_model(str(llama_dir), log=said.append)  # float32: nothing measured, nothing said
    assert not [m for m in said if m.startswith("--dtype")]
