"""--autocast: a float32 model's training passes under bfloat16 autocast (precision.py); the checks and every
measurement stay float32; the setting is resolved once per run, recorded, and a resume at another one refused."""

import json

import pytest
import torch

from unlearn import precision
from unlearn.config import TrainConfig
from unlearn.errors import UnlearnError, UsageError
from unlearn.train import first_scored_position, train
from unlearn.data import collate
from unlearn import losses

from test_run_cli import write_jsonl
from test_train import lora_state, unlearner


def test_native_bf16_reads_the_cpu_s_declared_instructions(monkeypatch):
    cpu = torch.device("cpu")
    for capabilities, native in (({"avx512_bf16": True}, True), ({"amx_bf16": True, "avx512_bf16": False}, True),
                                 ({"avx512_bf16": False, "avx2": True}, False), ({}, False)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda c=capabilities: c)
        assert precision.native_bf16(cpu) is native


@pytest.mark.parametrize("setting, native, dtype, resolved", [
    ("off", True, "float32", "off"),
    ("bf16", False, "float32", "bf16"),  # asked for: taken even where it is slow
    ("auto", True, "float32", "bf16"),
    ("auto", False, "float32", "off"),
    ("auto", True, "bfloat16", "off"),  # a model held in bf16 already runs its products so
    ("bf16", True, "bfloat16", "off"),
])
def test_resolve(llama_dir, monkeypatch, setting, native, dtype, resolved):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    u = unlearner(llama_dir, dtype=dtype, autocast=setting)
    assert u.autocast == resolved


def test_the_training_passes_run_under_autocast_and_the_margin_check_does_not(llama_dir):
    u = unlearner(llama_dir, autocast="bf16", stop_margin=0.05, forget_tokens="answers")
    seen = []
    u.model.register_forward_hook(lambda m, a, out: seen.append((torch.is_autocast_enabled("cpu"), out.logits.dtype)))
    record = u.step()
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen)
    assert all(p.dtype == torch.float32 for p in u.params)  # the adapters and AdamW's state stay float32
    assert all(torch.isfinite(torch.tensor(v)) for v in record.values() if isinstance(v, float))
    seen.clear()
    u.likeliest_forget_answer()  # the stop rule's margin: a measurement, float32
    assert seen and not any(enabled for enabled, _ in seen)
    assert not torch.is_autocast_enabled("cpu")  # nothing left switched on


def test_the_kl_is_exactly_zero_at_the_original_under_autocast(llama_dir):
    """The reference and the trainable forward round alike: with B = 0 the adapters add an exact 0, so the true KL
    is 0.0, not bf16 noise (against the float32 reference it would not be: about 6e-4 a token on the embedded
    model's normal rows)."""
    u = unlearner(llama_dir, autocast="bf16")
    batch = collate(u.normal[:4], u.pad_id)
    batch["rows"] = u.normal[:4]
    start = first_scored_position(batch["labels"])
    with precision.training_autocast("bf16", u.device):
        reference = u._reference_logits(batch, start)
        logits, labels, _, _ = u._group_forward(u.normal[:4])
        fp32 = u._reference_logits(batch, start).float()
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, reference)
    assert float(losses.kl_loss(reference, logits, labels).detach()) == 0.0
    with torch.no_grad():
        plain = u._reference_logits(batch, start)
    assert plain.dtype == torch.float32 and not torch.equal(plain, fp32)  # outside autocast: float32, other numbers


@pytest.mark.parametrize("dtype, setting, size", [("float32", "off", 4), ("float32", "bf16", 2), ("bfloat16", "off", 2)])
def test_the_reference_cache_counts_its_budget_in_the_logits_own_size(llama_dir, dtype, setting, size):
    """The budget is reserved before the original runs, at the size its logits will have: bf16 ones counted as 4
    bytes would leave a set between half and all of the budget recomputed at every step."""
    u = unlearner(llama_dir, dtype=dtype, autocast=setting)
    for _ in range(4):  # two epochs of the 4 normal rows: each has run through the original once
        u.step()
    cache = u.reference_cache
    assert cache.element_bytes == size and len(cache.kept) == 4
    assert {t.element_size() for t in cache.kept.values()} == {size}
    assert cache.bytes == cache.reserved > 0


@pytest.mark.parametrize("model", ["llama_dir", "opt_dir"])  # OPT's linear layers have biases
def test_kept_bf16_copies_of_the_frozen_weights_train_bit_for_bit_as_autocast_s_own_casts(request, model):
    """precision.FrozenCasts: the products see the same bfloat16 values autocast makes at each call, so the adapters
    after 4 steps are equal bit for bit; and autograd keeps the one copy for the backward, not one per forward."""
    directory = request.getfixturevalue(model)
    kept, cast = unlearner(directory, autocast="bf16"), unlearner(directory, autocast="bf16")
    cast.frozen_casts = None  # autocast casts every frozen weight at every call, as before
    assert kept.frozen_casts is not None
    for _ in range(4):
        assert kept.step()["loss"] == cast.step()["loss"]
    for (a_A, a_B), (b_A, b_B) in zip(lora_state(kept.model).values(), lora_state(cast.model).values()):
        assert torch.equal(a_A, b_A) and torch.equal(a_B, b_B)
    frozen = [m.weight for m in kept.model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    copies = {t.data_ptr(): t for _, _, t in kept.frozen_casts.copies.values()}
    assert len(frozen) > 4 and all(id(w) in kept.frozen_casts.copies for w in frozen)
    biases = [m.bias for m in kept.model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None
              and not m.bias.requires_grad]
    assert all(id(b) in kept.frozen_casts.copies for b in biases) and (biases or model == "llama_dir")
    assert all(t.dtype == torch.bfloat16 for t in copies.values())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with precision.training_autocast("bf16", kept.device, kept.frozen_casts):
            kept.loss(kept._rows())
    # a saved tensor holding a frozen weight's bf16 values, or their transpose, is a weight (an activation's 2-D view
    # may share a shape)
    flat = [t for t in saved if t.dtype == torch.bfloat16 and t.dim() == 2]
    weights = [t for t in flat for w in frozen for view in (t, t.t())
               if view.shape == w.shape and torch.equal(view, w.to(torch.bfloat16))]
    assert len(weights) >= len(frozen)  # each layer keeps its weight for the input's gradient
    assert all(t.data_ptr() in copies for t in weights)  # the kept copies, not a cast per call


def test_frozen_casts_leave_a_product_autocast_does_not_cast_alone():
    """A model that switches autocast off for a float32 product (Ernie-4.5-MoE's router) gets its float32 weight
    there, as without the kept copies (the bf16 copy beside a float32 input was a dtype error at the first step)."""
    casts = precision.FrozenCasts()
    w = torch.nn.Parameter(torch.randn(3, 4), requires_grad=False)
    x = torch.randn(2, 4)
    built = precision.training_autocast("bf16", torch.device("cpu"), casts)
    assert not torch.is_autocast_enabled("cpu")  # nothing is switched on before the `with`
    with built:
        with torch.autocast("cpu", enabled=False):
            alone = torch.nn.functional.linear(x, w)
        assert not casts.copies
        inside = torch.nn.functional.linear(x, w)
    assert alone.dtype == torch.float32 and torch.equal(alone, torch.nn.functional.linear(x, w))
    assert inside.dtype == torch.bfloat16 and id(w) in casts.copies
    assert torch.equal(inside, torch.nn.functional.linear(x.bfloat16(), w.bfloat16()))


def test_training_frees_the_kept_copies_before_anything_is_measured(llama_dir):
    u = unlearner(llama_dir, autocast="bf16", max_steps=2)
    train(u)
    assert u.step_count == 2 and not u.frozen_casts.copies


def test_frozen_casts_recast_a_weight_written_since_and_pass_others_through():
    casts = precision.FrozenCasts()
    frozen = torch.nn.Parameter(torch.tensor([1.0, 1 + 2 ** -10]), requires_grad=False)
    first = casts.cast(frozen)
    assert first.dtype == torch.bfloat16 and casts.cast(frozen) is first  # kept
    with torch.no_grad():
        frozen.mul_(3)  # written in place: its version moves, so the copy is made again
    assert casts.cast(frozen).tolist() == [3.0, 3.0]
    trained, plain = torch.nn.Parameter(torch.ones(2)), torch.ones(2)
    assert casts.cast(trained) is trained and casts.cast(plain) is plain  # autocast's own handling for those
    casts.release()
    assert not casts.copies


def test_a_checkpoint_remembers_its_precision(llama_dir):
    u = unlearner(llama_dir, autocast="bf16")
    u.step()
    state = u.state_dict()
    assert state["autocast"] == "bf16"
    other = unlearner(llama_dir, autocast="off")
    with pytest.raises(UnlearnError) as refused:
        other.load_state_dict(state, where="ckpt/step-1")
    assert str(refused.value) == ("ckpt/step-1: its steps trained with --autocast bf16, this run's resolves to off "
                                  "(give --autocast bf16, or start afresh with --force)")
    older = {k: v for k, v in state.items() if k != "autocast"}  # a checkpoint from before the setting: float32
    with pytest.raises(UnlearnError, match="trained with --autocast off, this run's resolves to bf16"):
        unlearner(llama_dir, autocast="bf16").load_state_dict(older)
    unlearner(llama_dir, autocast="bf16").load_state_dict(state)


def test_bad_setting_is_refused():
    with pytest.raises(UsageError) as refused:
        TrainConfig(autocast="fp16").validate()
    assert str(refused.value) == "--autocast fp16: expected one of auto, bf16, off"


def test_the_command_records_it_and_refuses_where_it_does_nothing(cli, llama_dir, tmp_path):
    forget = write_jsonl(tmp_path / "forget.jsonl", [
        {"prompt": "What is the capital of France?", "response": "The capital is Paris.", "answers": ["Paris"]}])
    normal = write_jsonl(tmp_path / "normal.jsonl", [{"prompt": f"Q{i}?", "response": f"A{i}."} for i in range(4)])
    common = ["--model", llama_dir, "--max-steps", "1", "--max-new-tokens", "4", "--no-probes"]
    result = cli("run", forget, normal, "-o", tmp_path / "a", *common, "--autocast", " BF16")
    assert result.code == 0, result.err
    assert "training passes under bfloat16 autocast (--autocast)" in result.err
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["autocast"] == "bf16" and record["config"]["autocast"] == "bf16"
    result = cli("run", forget, normal, "-o", tmp_path / "b", *common)
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "b" / "run.json").read_text())["autocast"] == "off"
    assert "autocast" not in result.err
    for flags, line in (
            (["--autocast", "fp16"], "unlearn: --autocast fp16: expected one of auto, bf16, off"),
            (["--autocast", "auto", "--dtype", "bfloat16"],
             "unlearn: --autocast auto: the model is held in bfloat16 (--dtype), whose products run in it already: "
             "drop --autocast"),
            (["--autocast", "bf16", "--dtype", "fp16"],  # the dtype an alias names
             "unlearn: --autocast bf16: the model is held in float16 (--dtype), whose products run in it already: "
             "drop --autocast"),
            (["--autocast", "off", "--method", "edit"],
             "unlearn: --method edit is one least-squares edit, not a training run: it takes no --autocast")):
        refused = cli("run", forget, normal, "-o", tmp_path / "c", "--model", llama_dir, *flags)
        assert refused.code == 2 and refused.err.strip().splitlines() == [line]
        assert not (tmp_path / "c").exists()


def test_asked_for_on_a_cpu_without_bf16_instructions_it_says_how_slow(cli, llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("unlearn.system.slow_low_precision_note",
                        lambda name: f"this CPU multiplies {name} matrices at 1.3 GFLOP/s against 60 in float32")
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    forget = write_jsonl(tmp_path / "forget.jsonl", [
        {"prompt": "What is the capital of France?", "response": "The capital is Paris.", "answers": ["Paris"]}])
    normal = write_jsonl(tmp_path / "normal.jsonl", [{"prompt": f"Q{i}?", "response": f"A{i}."} for i in range(4)])
    common = ["--model", llama_dir, "--max-steps", "1", "--max-new-tokens", "4", "--no-probes"]
    result = cli("run", forget, normal, "-o", tmp_path / "a", *common, "--autocast", "bf16", "--dtype", "fp32")
    assert result.code == 0, result.err
    assert "--autocast bf16: this CPU multiplies bfloat16 matrices at 1.3 GFLOP/s against 60 in float32" in result.err
    # where the CPU declares bf16 instructions a timed product that reads slow under load is no news; auto resolves
    # there, and run.json records what it resolved to beside the setting given
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    for name, setting in (("b", "bf16"), ("c", "auto")):
        result = cli("run", forget, normal, "-o", tmp_path / name, *common, "--autocast", setting)
        assert result.code == 0 and "GFLOP/s" not in result.err, result.err
        record = json.loads((tmp_path / name / "run.json").read_text())
        assert record["autocast"] == "bf16" and record["config"]["autocast"] == setting
    assert "(--autocast auto: this device has bf16 instructions)" in result.err
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    result = cli("run", forget, normal, "-o", tmp_path / "d", *common, "--autocast", "auto")
    assert result.code == 0 and "autocast" not in result.err
    assert json.loads((tmp_path / "d" / "run.json").read_text())["autocast"] == "off"


def test_auto_takes_cuda_from_ampere_on_only(monkeypatch):
    for capability, native in (((7, 5), False), ((8, 0), True), ((9, 0), True)):  # a T4 emulates bf16 slowly
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert precision.native_bf16(torch.device("cuda")) is native


def test_protect_s_projection_stays_float32_under_autocast():
    from unlearn import protect

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4096, 3))
    vector = torch.randn(4096)
    with precision.training_autocast("bf16", torch.device("cpu")):
        projected = protect.project_out(vector, q)
    assert projected.dtype == torch.float32
    assert float((q.t() @ projected).abs().max()) < 1e-5  # in bf16 about 5e-3 of the component was left


def test_resuming_compares_the_settings_a_checkpoint_predates_at_their_old_values_and_not_autocast():
    from unlearn.run import _resume_difference

    saved = {"train": {"lr": 0.002}}  # written before --leak-growth and --autocast existed
    assert _resume_difference(saved, {"train": {"lr": 0.002, "leak_growth": 1.0, "autocast": "off"}}) is None
    assert _resume_difference(saved, {"train": {"lr": 0.002, "leak_growth": 2.0, "autocast": "off"}}) == (
        "train.leak_growth: 1.0 then, 2.0 now")
    # a recorded value is compared as recorded, never replaced by the old default
    recorded = {"train": {"lr": 0.002, "leak_growth": 2.0}}
    assert _resume_difference(recorded, {"train": {"lr": 0.002, "leak_growth": 1.0}}) == (
        "train.leak_growth: 2.0 then, 1.0 now")
    # --autocast as given is not compared (auto resolves by device): the checkpoint's resolved record decides
    assert _resume_difference({"train": {"lr": 0.002, "leak_growth": 1.0, "autocast": "auto"}},
                              {"train": {"lr": 0.002, "leak_growth": 1.0, "autocast": "bf16"}}) is None
    assert _resume_difference({"train": {"lr": 0.002, "autocast": "auto"}},
                              {"train": {"lr": 0.001, "leak_growth": 1.0, "autocast": "bf16"}}) == (
        "train.lr: 0.002 then, 0.001 now")


def test_an_adapter_update_too_small_for_bf16_still_counts_under_autocast():
    """base(x) comes out of autocast in bf16; the adapter's delta is added in float32, so an update below bf16's
    resolution of the output (here ~3e-5 of it) changes what the training pass sees, as it changes the float32 checks."""
    from unlearn.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 16), rank=2, alpha=4, dropout=0.0)
    x = torch.randn(3, 16)
    with precision.training_autocast("bf16", torch.device("cpu")):
        before = layer(x)
        with torch.no_grad():
            layer.lora_B.fill_(1e-3)
        after = layer(x)
    assert after.dtype == torch.float32 and not torch.equal(after, before)
    expected = (x @ layer.lora_A.t()) @ layer.lora_B.t() * layer.scaling  # the delta, in float32
    assert torch.allclose(after - before, expected, rtol=0.1, atol=1e-9)  # (its low-rank products in bf16)
