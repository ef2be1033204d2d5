"""--protect: the forget loss's gradient projected off the span of the retain rows' gradients (protect.py)."""

import json

import pytest
import torch

from unlearn import losses, precision, protect
from unlearn.data import collate
from unlearn.lora import lora_modules
from unlearn.train import first_scored_position, forward_logits

from test_retain import retainer


def test_basis_spans_the_rows_and_drops_dependent_and_zero_ones():
    g = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    q = protect.basis(g)
    assert q.shape == (3, 2)  # rows 3 (= row 1 + row 2) and 4 (zero) add no direction
    assert torch.allclose(q.t() @ q, torch.eye(2), atol=1e-6)
    # (1, 2, 3) without its components along e1 and e2 is (0, 0, 3), by hand.
    assert torch.allclose(protect.project_out(torch.tensor([1.0, 2.0, 3.0]), q), torch.tensor([0.0, 0.0, 3.0]),
                          atol=1e-6)
    # A repeated row and a zero row before an independent one: the basis still spans e1 and e2.
    for g in (torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
              torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])):
        q = protect.basis(g)
        assert q.shape == (3, 2) and torch.allclose(q.t() @ q, torch.eye(2), atol=1e-6)
        assert torch.allclose(protect.project_out(torch.tensor([1.0, 2.0, 3.0]), q), torch.tensor([0.0, 0.0, 3.0]),
                              atol=1e-6)
    assert protect.basis(torch.zeros(0, 3)).shape == (3, 0)
    assert torch.equal(protect.project_out(torch.tensor([1.0, 2.0]), torch.zeros(2, 0)), torch.tensor([1.0, 2.0]))


def test_accumulate_adds_a_flat_vector_to_the_gradients_as_flat_lays_them_out():
    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))]
    params[1].grad = torch.ones(4)
    protect.accumulate(params, torch.arange(10, dtype=torch.float32))
    assert torch.equal(params[0].grad, torch.arange(6.0).view(2, 3))
    assert torch.equal(params[1].grad, torch.tensor([7.0, 8.0, 9.0, 10.0]))
    assert torch.equal(protect.flat(p.grad for p in params), torch.tensor([0.0, 1, 2, 3, 4, 5, 7, 8, 9, 10]))


def test_row_gradients_from_one_batched_pass_equal_each_rows_own_backward(llama_dir, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)  # bf16 as on a CPU with bf16 instructions
    u = retainer(llama_dir)
    for m in lora_modules(u.model).values():  # off B = 0, where every A gradient vanishes
        m.lora_B.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    batched = protect.row_gradients(u.model, u.params, u.retain, u.pad_id, forward_logits, low_precision=False)
    for i, row in enumerate(u.retain):  # the retain rows have different lengths: padding is in play
        batch = collate([row], u.pad_id)
        start = first_scored_position(batch["labels"])
        loss = losses.mean_nll(forward_logits(u.model, batch, start), batch["labels"][:, start:])
        own = protect.flat(torch.autograd.grad(loss, u.params))
        assert torch.allclose(batched[i], own, rtol=1e-4, atol=1e-6)
    # The default bf16 pass: each row's gradient keeps its direction (its span is what is used).
    rough = protect.row_gradients(u.model, u.params, u.retain, u.pad_id, forward_logits)
    assert rough.dtype == torch.float32 and rough.shape == batched.shape
    cosines = torch.nn.functional.cosine_similarity(rough, batched, dim=1)
    assert cosines.min() > 0.99 and not torch.equal(rough, batched)  # (it did run in bf16)


def test_a_cpu_without_bf16_instructions_gets_the_float32_pass(llama_dir, monkeypatch):
    u = retainer(llama_dir)
    for m in lora_modules(u.model).values():
        m.lora_B.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    exact = protect.row_gradients(u.model, u.params, u.retain, u.pad_id, forward_logits, low_precision=False)
    # decided from the instructions the CPU declares (precision.native_bf16), not from a timed product
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": False})
    assert torch.equal(protect.row_gradients(u.model, u.params, u.retain, u.pad_id, forward_logits), exact)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert not torch.equal(protect.row_gradients(u.model, u.params, u.retain, u.pad_id, forward_logits), exact)


def test_the_forget_sides_gradient_is_projected_off_every_retain_rows_gradient_and_the_kl_is_not(llama_dir):
    u = retainer(llama_dir, protect=True, retain_weight=1.0)
    u.step()  # off B = 0, where the gradients w.r.t. A vanish: the general case
    gradients = protect.row_gradients(u.model, u.params, u.retain, u.pad_id, forward_logits, low_precision=False)
    basis = protect.basis(gradients)
    rows = u._rows()
    forget_rows, kl_rows = rows["forget"], {k: v for k, v in rows.items() if k != "forget"}
    plain = protect.flat(torch.autograd.grad(u.loss({"forget": forget_rows})[0], u.params))
    terms = u._protected_backward(rows, basis, 1.0)
    assert set(rows) == set(kl_rows) and "forget" in terms  # the forget side was taken out and logged
    projected = protect.flat(p.grad for p in u.params)
    cosines = gradients @ projected / (gradients.norm(dim=1) * projected.norm())
    plain_cosines = gradients @ plain / (gradients.norm(dim=1) * plain.norm())
    # Cosines with each retain row's gradient: the forget gradient has some (in thousands of
    # dimensions a few hundredths is a clear alignment); projected, none beyond float rounding.
    assert plain_cosines.abs().max() > 0.02
    assert cosines.abs().max() < 1e-3 * plain_cosines.abs().max()
    assert torch.allclose(projected, protect.project_out(plain, basis), rtol=1e-4, atol=1e-7)
    assert projected.norm() > 0.1 * plain.norm()  # not projected away whole
    # The KL rows' backward then adds their gradient whole, unprojected.
    kl = protect.flat(torch.autograd.grad(u.loss(kl_rows)[0], u.params))
    u.loss(kl_rows)[0].backward()
    assert torch.allclose(protect.flat(p.grad for p in u.params), projected + kl, rtol=1e-4, atol=1e-7)


def test_protect_needs_lora_adapters(llama_dir):
    from unlearn.data import Example
    from unlearn.errors import UsageError
    from unlearn.models import load_model
    from unlearn.train import TrainConfig, Unlearner

    lm = load_model(str(llama_dir), log=lambda m: None)
    for p in lm.model.parameters():
        p.requires_grad_(True)
    rows = [Example("What is two plus two?", "Four.", 1)]
    with pytest.raises(UsageError, match="--full"):
        Unlearner(lm.model, lm.tokenizer, rows, rows, TrainConfig(protect=True), reference_model=lm.model,
                  retain=rows)


def test_cli_protect_is_seed_fixed_and_recorded_and_refuses_full(tmp_path, llama_dir, cli):
    from safetensors.torch import load_file

    from test_retain import CLI_FORGET, CLI_NORMAL, CLI_RETAIN, FAST, write_jsonl

    forget, normal = write_jsonl(tmp_path / "f.jsonl", CLI_FORGET), write_jsonl(tmp_path / "n.jsonl", CLI_NORMAL)
    retain = write_jsonl(tmp_path / "keep.jsonl", CLI_RETAIN)
    adapters = []
    for name in ("a", "b"):
        result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / name, "--retain", retain,
                     "--protect", "--json", *FAST)
        assert result.code == 0, result.err
        record = json.loads((tmp_path / name / "run.json").read_text())
        assert record["config"]["protect"] is True and record["steps"] == 2
        adapters.append(load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert any(adapters[0][k].abs().max() > 0 for k in adapters[0] if "lora_B" in k)  # it did train
    # without retain rows or probes there is nothing to project off: said, and kept in run.json's notes
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "none", "--protect", *FAST)
    note = "--protect: no retain rows or probes to protect; the gradient is not projected"
    assert result.code == 0 and note in result.err
    assert json.loads((tmp_path / "none" / "run.json").read_text())["notes"] == [note]
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "full", "--retain", retain,
                 "--protect", "--full", *FAST)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1 and "--full" in result.err
    for method in ("rmu", "ulmr", "edit"):  # refused before any model loads
        result = cli("run", forget, normal, "--model", tmp_path / "no-model", "--protect", "--method", method)
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1 and "--method edit, rmu" in result.err


@pytest.mark.parametrize("fixture, dropout", [("opt_dir", 0.0), ("llama_dir", 0.5)])
def test_row_gradients_on_opt_and_with_adapter_dropout_are_each_rows_own(fixture, dropout, request):
    # OPT runs fc1/fc2 on (rows x positions, width): the per-row einsums were an internal error there. With
    # --lora-dropout the hooks' formula (no mask in it) met the dropped pass's output gradients: 69 % off.
    u = retainer(request.getfixturevalue(fixture))
    for m in lora_modules(u.model).values():
        m.lora_B.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        if dropout:
            m.dropout = torch.nn.Dropout(dropout).train()
    modes = [m.dropout.training for m in lora_modules(u.model).values()]
    batched = protect.row_gradients(u.model, u.params, u.retain, u.pad_id, forward_logits, low_precision=False)
    assert [m.dropout.training for m in lora_modules(u.model).values()] == modes  # put back as they were
    for m in lora_modules(u.model).values():
        m.dropout.eval()  # g_i: the gradient at the current weights
    for i, row in enumerate(u.retain):
        batch = collate([row], u.pad_id)
        start = first_scored_position(batch["labels"])
        loss = losses.mean_nll(forward_logits(u.model, batch, start), batch["labels"][:, start:])
        own = protect.flat(torch.autograd.grad(loss, u.params))
        assert torch.allclose(batched[i], own, rtol=1e-4, atol=1e-6)


def test_row_gradients_in_passes_of_a_few_rows_are_the_one_pass_gradients(llama_dir):
    # memory is bounded by the pass, not the retain file; each row's gradient is its own, so the passes change
    # nothing (float32; the rows have different lengths, so each pass pads to its own longest)
    u = retainer(llama_dir)
    for m in lora_modules(u.model).values():
        m.lora_B.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    assert len(u.retain) >= 2
    whole = protect.row_gradients(u.model, u.params, u.retain, u.pad_id, forward_logits, low_precision=False)
    one_by_one = protect.row_gradients(u.model, u.params, u.retain, u.pad_id, forward_logits, low_precision=False,
                                       rows_per_pass=1)
    assert one_by_one.shape == whole.shape and torch.allclose(one_by_one, whole, rtol=1e-5, atol=1e-7)


def test_a_repair_step_computes_no_retain_gradients(llama_dir, monkeypatch):
    calls = []
    real = protect.row_gradients
    monkeypatch.setattr(protect, "row_gradients", lambda *a, **k: calls.append(1) or real(*a, **k))
    u = retainer(llama_dir, protect=True)
    u.step()
    assert len(calls) == 1
    u.keep_terms_only = True  # nothing to project: the forget side is not trained
    record = u.step()
    assert len(calls) == 1 and record["keep_terms_only"] and "forget" not in record
