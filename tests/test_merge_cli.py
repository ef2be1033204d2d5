"""`unlearn merge` through the real command line: outputs, exit codes, one-line errors, LoRA vs peft.

Most cases run the command in-process (`cli`, see conftest.py) to stay fast; one test runs
the installed module as a subprocess end to end, for the exit codes a shell sees.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


def weights(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(8, 4, generator=g).to(dtype),
            "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g).to(dtype),
            "model.norm.weight": torch.randn(4, generator=g).to(dtype),
            "lm_head.weight": torch.randn(8, 4, generator=g).to(dtype)}


def model_dir(path: Path, tensors: dict, config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture
def pair(tmp_path):
    """A BASE and a TUNED directory with their tensors."""
    base, tuned = weights(1), weights(2)
    return model_dir(tmp_path / "base", base), model_dir(tmp_path / "tuned", tuned), base, tuned


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


# -- success ---------------------------------------------------------------------


def test_json_result_on_stdout_and_exact_weights(cli, tmp_path, pair):
    base_dir, tuned_dir, base, tuned = pair
    code, out, err = cli("merge", "--alpha", "0.3", base_dir, tuned_dir, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    result = json.loads(out)  # exactly one JSON object, nothing else on stdout
    assert result["output"] == str((tmp_path / "out").resolve())
    assert result["alpha"] == 0.3 and result["tensors"] == 4
    assert result["bytes"] == sum(t.numel() * 4 for t in base.values())
    assert isinstance(result["seconds"], float)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for name in base:
        torch.testing.assert_close(merged[name], 0.3 * base[name] + 0.7 * tuned[name], rtol=1e-6, atol=0)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "out" / "merge.json").read_text())["tuned"] == str(tuned_dir.resolve())


def test_table_output_by_default(cli, tmp_path, pair):
    base_dir, tuned_dir, *_ = pair
    code, out, _ = cli("merge", "--alpha", "0.5", base_dir, tuned_dir, "-o", tmp_path / "out")
    assert code == 0
    rows = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert rows["tensors"] == "4" and rows["alpha"] == "0.5"


def test_default_output_sits_beside_tuned(cli, tmp_path, pair):
    base_dir, tuned_dir, *_ = pair
    code, _, err = cli("merge", "--alpha", "0.5", base_dir, tuned_dir)
    assert code == 0
    assert (tmp_path / "tuned-avg0.5" / "model.safetensors").is_file()
    assert "tuned-avg0.5" in err


def test_bf16_merge_is_within_bf16_rounding(cli, tmp_path):
    base, tuned = weights(1, torch.bfloat16), weights(2, torch.bfloat16)
    code, _, _ = cli("merge", "--alpha", "0.5", model_dir(tmp_path / "b", base),
                     model_dir(tmp_path / "t", tuned), "-o", tmp_path / "o")
    assert code == 0
    merged = load_file(tmp_path / "o" / "model.safetensors")
    for name in base:
        exact = 0.5 * base[name].float() + 0.5 * tuned[name].float()
        assert merged[name].dtype == torch.bfloat16
        torch.testing.assert_close(merged[name].float(), exact, rtol=2 ** -8, atol=0)


def test_no_paths_merges_the_last_run(cli, tmp_path, pair, monkeypatch):
    base_dir, tuned_dir, base, tuned = pair
    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "cache"))
    from unlearn.paths import remember_last_run

    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"base_model": str(base_dir), "merged_model": str(tuned_dir)}))
    remember_last_run(run_dir)
    code, out, err = cli("merge", "--alpha", "0.5", "-o", tmp_path / "avg", "--json")
    assert code == 0, err
    assert json.loads(out)["base"] == str(base_dir.resolve())
    merged = load_file(tmp_path / "avg" / "model.safetensors")
    torch.testing.assert_close(merged["model.norm.weight"], 0.5 * base["model.norm.weight"] + 0.5 * tuned["model.norm.weight"])


def test_no_paths_and_no_recorded_run_is_an_error(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "empty-cache"))
    code, out, err = cli("merge", "--alpha", "0.5", "-o", tmp_path / "o")
    assert code == 1 and out == ""
    assert err.startswith("unlearn: no previous `unlearn run`") and err.count("\n") == 1
    assert err.rstrip().endswith("give BASE and TUNED paths")
    # with --adapter, TUNED is no argument: the line asks for BASE alone
    code, out, err = cli("merge", "--adapter", tmp_path / "adapter", "-o", tmp_path / "o")
    assert code == 1 and err.rstrip().endswith("; give BASE (with --adapter)") and err.count("\n") == 1


def test_existing_output_is_refused_then_replaced_with_force(cli, tmp_path, pair):
    base_dir, tuned_dir, base, _ = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = cli("merge", "--alpha", "1", base_dir, tuned_dir, "-o", out)
    assert code == 2 and "--force" in err
    assert (out / "keep.txt").read_text() == "precious"
    code, _, _ = cli("merge", "--alpha", "1", base_dir, tuned_dir, "-o", out, "--force")
    assert code == 0 and not (out / "keep.txt").exists()
    assert torch.equal(load_file(out / "model.safetensors")["lm_head.weight"], base["lm_head.weight"])


def test_extrapolation_needs_the_flag(cli, tmp_path, pair):
    base_dir, tuned_dir, *_ = pair
    code, _, err = cli("merge", "--alpha", "1.5", base_dir, tuned_dir, "-o", tmp_path / "o")
    assert code == 2 and "--allow-extrapolation" in err
    assert_nothing_written(tmp_path / "o")
    code, _, _ = cli("merge", "--alpha", "1.5", "--allow-extrapolation", base_dir, tuned_dir, "-o", tmp_path / "o")
    assert code == 0


def test_re_sharding_through_the_cli(cli, tmp_path, pair):
    base_dir, tuned_dir, *_ = pair
    code, _, err = cli("merge", "--alpha", "0.5", base_dir, tuned_dir, "-o", tmp_path / "o", "--max-shard-size", "150B")
    assert code == 0, err
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == (8 * 4 + 6 * 4 + 4 + 8 * 4) * 4
    assert len(set(index["weight_map"].values())) == 3


# -- errors: one line, right exit code, nothing written --------------------------------


def usage_cases(base_dir, tuned_dir, out):
    return [
        (["merge", base_dir, tuned_dir, "-o", out], "--alpha is required"),
        (["merge", "--alpha", "0.5", base_dir, "-o", out], "BASE and TUNED, or neither"),
        (["merge", "--alpha", "-0.5", base_dir, tuned_dir, "-o", out], "between 0 and 1"),
        (["merge", "--alpha", "nan", base_dir, tuned_dir, "-o", out], "finite"),
        (["merge", "--alpha", "half", base_dir, tuned_dir, "-o", out], "half"),
        (["merge", "--alpha", "0.5", base_dir, tuned_dir, "-o", out, "--max-shard-size", "big"], "--max-shard-size"),
        (["merge", "--alpha", "0.5", base_dir, tuned_dir, "-o", tuned_dir, "--force"], "is an input"),
        (["merge", "--adapter", out, base_dir, tuned_dir, "-o", out], "BASE (with --adapter)"),
    ]


def test_usage_errors_exit_2(cli, tmp_path, pair):
    base_dir, tuned_dir, *_ = pair
    for args, message in usage_cases(base_dir, tuned_dir, tmp_path / "o"):
        code, out, err = cli(*args)
        assert code == 2, (args, err)
        assert message in err and out == ""
        assert_nothing_written(tmp_path / "o")
    assert (tuned_dir / "model.safetensors").is_file()


def failing(cli, tmp_path, base_dir, tuned_dir) -> str:
    out = tmp_path / "o"
    code, stdout, err = cli("merge", "--alpha", "0.5", base_dir, tuned_dir, "-o", out)
    assert code == 1 and stdout == ""
    assert err.startswith("unlearn: ") and err.count("\n") == 1 and "Traceback" not in err
    assert_nothing_written(out)
    return err


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.norm.weight"), "tensor model.norm.weight: in BASE but not in TUNED"),
    (lambda t: t.update(bias=torch.zeros(1)), "tensor bias: in TUNED but not in BASE"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(5)}), "tensor model.norm.weight: shape [4] in BASE but [5]"),
    (lambda t: t.update({"lm_head.weight": t["lm_head.weight"].bfloat16()}), "tensor lm_head.weight: dtype F32 in BASE but BF16"),
])
def test_mismatches_name_the_first_offending_tensor(cli, tmp_path, edit, message):
    tuned = weights(2)
    edit(tuned)
    err = failing(cli, tmp_path, model_dir(tmp_path / "b", weights(1)), model_dir(tmp_path / "t", tuned))
    assert message in err


def test_missing_directory(cli, tmp_path, pair):
    base_dir, *_ = pair
    assert "TUNED" in failing(cli, tmp_path, base_dir, tmp_path / "nowhere")


def test_directory_without_safetensors(cli, tmp_path, pair):
    base_dir, *_ = pair
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"x")
    assert "no model.safetensors" in failing(cli, tmp_path, base_dir, empty)


def test_truncated_safetensors_names_the_file(cli, tmp_path, pair):
    base_dir, tuned_dir, *_ = pair
    file = tuned_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    err = failing(cli, tmp_path, base_dir, tuned_dir)
    assert str(file) in err and "truncated" in err


def test_corrupt_header_names_the_file(cli, tmp_path, pair):
    base_dir, tuned_dir, *_ = pair
    file = base_dir / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:12] = b"\x00\x01\x02\x03"
    file.write_bytes(bytes(data))
    assert str(file) in failing(cli, tmp_path, base_dir, tuned_dir)


def test_missing_shard_is_reported(cli, tmp_path, pair):
    base_dir, tuned_dir, *_ = pair
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (base_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00002-of-00002.safetensors: missing shard" in failing(cli, tmp_path, base_dir, tuned_dir)


def test_index_naming_a_tensor_its_shard_lacks(cli, tmp_path, pair):
    base_dir, tuned_dir, *_ = pair
    index = {"weight_map": {"model.norm.weight": "model.safetensors", "ghost.weight": "model.safetensors"}}
    (tuned_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "does not hold tensor ghost.weight" in failing(cli, tmp_path, base_dir, tuned_dir)


def test_corrupt_index(cli, tmp_path, pair):
    base_dir, tuned_dir, *_ = pair
    (tuned_dir / "model.safetensors.index.json").write_text("{not json")
    assert "corrupt index" in failing(cli, tmp_path, base_dir, tuned_dir)


def test_safetensors_own_validation_is_reported_as_one_line(cli, tmp_path, pair):
    """Overlapping tensors pass our size checks; safetensors' own error must still come out as one line."""
    base_dir, tuned_dir, *_ = pair
    file = tuned_dir / "model.safetensors"
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    first = min(header.values(), key=lambda e: e.get("data_offsets", [1 << 60])[0])
    embed = header["model.embed_tokens.weight"]
    assert embed is not first and first["data_offsets"][1] - first["data_offsets"][0] == 128
    embed["data_offsets"] = [0, 128]  # overlaps the first tensor, yet every extent fits the file
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    assert str(file) in failing(cli, tmp_path, base_dir, tuned_dir)


# -- LoRA adapters ---------------------------------------------------------------


def rank2_adapter(directory: Path, module: str, a: torch.Tensor, b: torch.Tensor) -> Path:
    """A PEFT LoRA adapter (r 2, lora_alpha 2) on one MODULE of the base, with factors A and B."""
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({f"base_model.model.{module}.lora_A.weight": a, f"base_model.model.{module}.lora_B.weight": b},
              directory / "adapter_model.safetensors")
    return directory


def test_adapter_needs_a_base_tensor_it_names(cli, tmp_path, pair):
    base_dir, *_ = pair
    adapter = rank2_adapter(tmp_path / "adapter", "model.layers.0.self_attn.q_proj", torch.zeros(2, 4),
                            torch.zeros(4, 2))
    code, _, err = cli("merge", "--adapter", adapter, base_dir, "-o", tmp_path / "o")
    assert code == 1 and "has no tensor model.layers.0.self_attn.q_proj.weight" in err
    assert_nothing_written(tmp_path / "o")


def test_adapter_directory_without_weights(cli, tmp_path, pair):
    base_dir, *_ = pair
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2}))
    code, _, err = cli("merge", "--adapter", tmp_path / "adapter", base_dir, "-o", tmp_path / "o")
    assert code == 1 and "no adapter_model.safetensors" in err


@pytest.fixture(scope="module")
def llama_and_adapter(tmp_path_factory):
    """A tiny random Llama, a peft LoRA adapter on it with random B, and peft's own merge of the two."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "base", safe_serialization=True)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(root / "adapter")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model.merge_and_unload().eval()(ids).logits
        plain = transformers.LlamaForCausalLM.from_pretrained(root / "base").eval()(ids).logits
    return root, ids, expected, plain


def test_fold_lora_matches_peft_merge_and_unload(cli, llama_and_adapter):
    transformers = pytest.importorskip("transformers")
    root, ids, expected, plain = llama_and_adapter
    code, out, err = cli("merge", "--adapter", root / "adapter", root / "base", "-o", root / "folded", "--json")
    assert code == 0, err
    assert json.loads(out)["tensors"] > 0
    folded = transformers.LlamaForCausalLM.from_pretrained(root / "folded").eval()
    with torch.no_grad():
        logits = folded(ids).logits
    assert (expected - plain).abs().max() > 1e-2  # the adapter does change the model
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


# -- end to end, as a shell script would run it --------------------------------------


def subprocess_merge(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unlearn", "merge", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_subprocess_success_and_failure(tmp_path, pair):
    base_dir, tuned_dir, base, tuned = pair
    done = subprocess_merge("--alpha", "0.25", base_dir, tuned_dir, "-o", tmp_path / "o", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["alpha"] == 0.25
    merged = load_file(tmp_path / "o" / "model.safetensors")
    torch.testing.assert_close(merged["model.norm.weight"],
                               0.25 * base["model.norm.weight"] + 0.75 * tuned["model.norm.weight"], rtol=1e-6, atol=0)
    failed = subprocess_merge("--alpha", "0.5", base_dir, tmp_path / "missing", "-o", tmp_path / "o2")
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("unlearn: TUNED")
    assert_nothing_written(tmp_path / "o2")


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_signal_during_a_sweep_leaves_no_partial_models(cli, tmp_path, pair, monkeypatch, name, code):
    # SIGTERM as `timeout` or a cancelled CI job sends it, SIGHUP when the terminal or ssh session goes: the
    # process died where it stood, and its hidden .o.tmp-* directory of written models stayed behind
    import os
    import signal

    from unlearn import merge

    base_dir, tuned_dir, _, _ = pair
    written = merge._write
    signum = getattr(signal, name)

    def write_then_signalled(*args, **kw):
        written(*args, **kw)
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(merge, "_write", write_then_signalled)
    # the signal's default disposition, as a terminal gives it: under `nohup` (a CI job can run so) SIGHUP is ignored,
    # and an ignored hangup stays ignored (the next test)
    before = signal.signal(signum, signal.SIG_DFL)
    try:
        result = cli("merge", "--alpha", "0.2,0.4", base_dir, tuned_dir, "-o", tmp_path / "o")
        assert signal.getsignal(signum) is signal.SIG_DFL  # the command's handler is gone again
    finally:
        signal.signal(signum, before)
    assert result[0] == code
    assert result[2].strip().splitlines()[-1] == f"unlearn: terminated ({name}); nothing half-written is left"
    assert_nothing_written(tmp_path / "o")


def test_a_hangup_the_caller_ignores_stays_ignored(cli, tmp_path, pair, monkeypatch):
    # `nohup unlearn run ... &`: the session's end must not end the run (the handler took SIGHUP over)
    import os
    import signal

    from unlearn import merge

    base_dir, tuned_dir, _, _ = pair
    written = merge._write

    def write_then_hung_up(*args, **kw):
        result = written(*args, **kw)
        os.kill(os.getpid(), signal.SIGHUP)
        return result

    monkeypatch.setattr(merge, "_write", write_then_hung_up)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        code, _, err = cli("merge", "--alpha", "0.5", base_dir, tuned_dir, "-o", tmp_path / "o")
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
    assert code == 0, err
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_merge_into_a_symbolic_link_writes_into_its_target(cli, tmp_path, pair):
    # the finished output was renamed onto the link itself, replacing it, while the printed path named the target
    base_dir, tuned_dir, _, _ = pair
    target, link = tmp_path / "target", tmp_path / "link"
    target.mkdir()
    link.symlink_to(target)
    code, out, err = cli("merge", "--alpha", "0.3", base_dir, tuned_dir, "-o", link, "--json")
    assert code == 0, err
    assert link.is_symlink() and (target / "model.safetensors").is_file()
    assert json.loads(out)["output"] == str(target.resolve())


def test_MG8_an_adapter_folded_without_alpha_reports_alpha_0(cli, llama_and_adapter, tmp_path):
    import json

    root, *_ = llama_and_adapter
    code, out, err = cli("merge", "--adapter", root / "adapter", root / "base", "-o", tmp_path / "folded", "--json")
    assert code == 0, err
    # folded whole (scaled by 1 - α with α = 0): the JSON says α 0 (the mutant: 1, as if nothing were folded)
    assert json.loads(out)["alpha"] == 0.0
