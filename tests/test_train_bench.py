"""bench/train_bench.py: its FLOP count equals torch's own count, and its lengthened rows have the asked length."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import train_bench  # noqa: E402

from unlearn.data import encode_pair  # noqa: E402
from unlearn.lora import LoraSettings, attach_lora  # noqa: E402
from unlearn.models import load_model  # noqa: E402


@pytest.mark.parametrize("family", ["llama_dir", "opt_dir"])
def test_flop_model_equals_torch_flop_counter_for_a_lora_step(family, request):
    """Forward + backward with LoRA on the MLPs, logits from position 4: every matmul autograd runs.

    With SDPA's math kernel, attention is two bmm's that torch's FlopCounterMode counts
    (the CPU flash kernel has no FLOP formula); padded=True counts the full 12 x 12
    attention square, as a padding-masked SDPA computes it.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = load_model(str(request.getfixturevalue(family))).model.train()
    attach_lora(model, LoraSettings(), seed=0)
    flop_model = train_bench.FlopModel(model)
    ids = torch.randint(3, 50, (2, 12))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=torch.arange(4, 12)).logits
        logits.sum().backward()
    assert flop_model.rows([12, 12], 12, 4, trainable=True, padded=True) == counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=torch.arange(4, 12))
    assert flop_model.rows([12, 12], 12, 4, trainable=False, padded=True) + 2 * 12 * flop_model.fwd_lora \
        == counter.get_total_flops()  # adapters on in this no_grad pass: LoRA's forward counted too


def test_lengthened_rows_have_exactly_the_asked_length(llama_dir):
    tokenizer = load_model(str(llama_dir)).tokenizer
    forget, normal, max_length = train_bench.read_rows(SimpleNamespace(rows="40"), tokenizer)
    assert max_length == 40
    for example in forget + normal:
        assert len(encode_pair(tokenizer, example.prompt, example.response, max_length)["input_ids"]) == 40
    assert forget[0].extra.get("answers")  # the forget rows keep their answer spans


def test_report_keeps_its_json_keys(monkeypatch, capsys):
    """The --json line: mfu_fp32 and mfu_bf16 (as before) and rss_over_weights, computed from the children's numbers."""
    def child(variant, args):
        rate = 100.0 if variant == "fp32" else 200.0
        return {"variant": variant, "model": "m", "threads": 1, "params": 1000, "matmul_gflops": rate,
                "step_s_median": 1.5 if variant == "autocast" else 2.0, "tokens_per_s": 10.0, "useful_gflop_per_step": 100.0,
                "executed_gflop_per_step": 110.0, "achieved_gflops": 50.0, "executed_gflops": 55.0,
                "padding_waste": 0.1, "tokens_per_step": 20, "loss_first_step": -0.1, "peak_rss_mb": 12.0,
                "rss_loaded_mb": 5.0, "weights_fp32_mb": 4000 / 2**20, "rss_over_weights": 3.0,
                "memory": {}, "load_average_1min": 1.0,
                "mfu_beside": 0.5 if variant == "fp32" else 0.3, "matmul_beside_gflops": [rate, rate]}

    monkeypatch.setattr(train_bench, "spawn", child)
    monkeypatch.setattr("unlearn.system.slow_low_precision_note", lambda name: None)
    train_bench.main(["--json", "--variants", "fp32,bf16,autocast"])
    import json

    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mfu_fp32"] == 0.5 and result["mfu_bf16"] == 0.25
    assert result["mfu_fp32_beside"] == 0.5 and result["mfu_bf16_beside"] == 0.3
    assert result["rss_over_weights"] == 3.0 and result["rss_over_weights_variant"] == "fp32"
    assert set(result["variants"]) == {"fp32", "bf16", "autocast"}
    # --autocast bf16's step: its MFU against the bf16 rate, its time over the fp32 step's of the same run
    assert result["mfu_autocast"] == 0.25 and result["autocast_over_fp32"] == 0.75


def test_mfu_beside_pairs_each_step_with_the_rates_around_it():
    """Step 1: 100 GFLOP in 2 s = 50 GFLOP/s over (100 + 60) / 2 = 80: 0.625; step 2: 60 GFLOP in 1 s over
    (60 + 140) / 2 = 100: 0.6; step 3: 90 GFLOP in 1 s over (140 + 160) / 2 = 150: 0.6. The median is 0.6;
    against the best rate (160) the same steps read 0.31, 0.375 and 0.5625."""
    assert train_bench.mfu_beside([100e9, 60e9, 90e9], [2.0, 1.0, 1.0], [100.0, 60.0, 140.0, 160.0]) \
        == pytest.approx(0.6)
    with pytest.raises(ValueError, match="n and n \\+ 1"):
        train_bench.mfu_beside([1e9], [1.0], [100.0])


def test_memory_probe_reads_each_backward_of_a_step_in_pieces(llama_dir, monkeypatch):
    """One backward per piece (every row its own here): the probe counts them and reads peaks around them."""
    from test_train import unlearner

    monkeypatch.setattr(torch.autograd, "backward", torch.autograd.backward)  # restored after the test
    u = unlearner(llama_dir)
    u.step()  # the first step runs no KL (the model is the original): the normal rows run from the second
    u.piece_values = 1
    probe = train_bench.MemoryProbe(u.model, u)
    probe.step(u)
    step = probe.steps[0]
    assert step["backward_passes"] == 2 * u.config.batch_size  # forget and normal rows, one each
    assert step["saved_mb"] > 0 and step["logits_mb"] > 0
    assert step["forward_peak_mb"] > 0 and step["backward_peak_mb"] > 0
    u.piece_values = 1 << 40  # one backward for the whole loss
    probe.step(u)
    assert probe.steps[1]["backward_passes"] == 1 and probe.steps[1]["saved_mb"] > step["saved_mb"]


@pytest.mark.parametrize("asked", [None, ["--variants", "fp32,bf16"], ["--dtype", "bfloat16"]])
def test_bf16_is_left_out_of_the_default_list_where_this_cpu_runs_it_slowly(monkeypatch, asked, capsys):
    monkeypatch.setattr("unlearn.system.slow_low_precision_note", lambda name: "1.3 GFLOP/s against 60")
    args = train_bench.parse_args(asked or [])
    kept = train_bench._without_slow_bf16(args.variants.split(","), args)
    if asked is None:
        assert kept == ["fp32", "naive", "ckpt"] and "bf16 variants left out" in capsys.readouterr().err
    else:
        assert "bf16" in kept and "its steps take that much longer" in capsys.readouterr().err
    # autocast is not in the default list; asked for on such a CPU it runs, with the same warning
    assert "autocast" not in train_bench.parse_args([]).variants.split(",")
    args = train_bench.parse_args(["--variants", "fp32,autocast"])
    assert train_bench._without_slow_bf16(args.variants.split(","), args) == ["fp32", "autocast"]
    assert "its steps take that much longer" in capsys.readouterr().err
    monkeypatch.setattr("unlearn.system.slow_low_precision_note", lambda name: None)  # a CPU with bf16
    assert train_bench._without_slow_bf16(["fp32", "bf16"], train_bench.parse_args([])) == ["fp32", "bf16"]
