"""Edge cases of `unlearn merge` and `unlearn augment` found by an audit: α labels that must stay exact and
distinct, a forget row too long for the generator's wrapper prompts, a malformed adapter_config.json, a broken
last-run record, and `merge` without `--alpha`. Each bad input is one line on stderr, its exit code, nothing
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny_models
from unlearn import augment as aug
from unlearn.data import Example


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "internal error" not in err and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory, llama_dir):
    """BASE (the shared tiny Llama) and a TUNED of the same shape with other weights."""
    return llama_dir, tiny_models.build_llama(tmp_path_factory.mktemp("tiny-llama-tuned"), seed=2)


# --- α labels -------------------------------------------------------------------------


def test_alpha_label_keeps_short_labels_and_is_exact_otherwise():
    from unlearn.averaging import alpha_label

    assert [alpha_label(a) for a in (0.3, 1.0, 0.0, 0.25, -2.0)] == ["0.3", "1", "0", "0.25", "-2"]
    assert alpha_label(0.30000001) == "0.30000001" and alpha_label(0.9999999) == "0.9999999"
    assert alpha_label(0.1234567) != alpha_label(0.12345671)
    for a in (0.1, 0.30000001, 0.9999999, 0.1234567, 0.12345671, 1 / 3):
        assert float(alpha_label(a)) == a


def test_sweep_alphas_that_print_alike_get_their_own_directories(cli, tmp_path, llama_pair):
    base, tuned = llama_pair
    out = tmp_path / "sweep"
    result = cli("merge", "--alpha", "0.1234567,0.12345671,0.9999999", base, tuned, "-o", out, "--json")
    assert result.code == 0, result.err
    models = json.loads(result.out)["models"]
    assert models == {a: str((out / f"alpha-{a}").resolve()) for a in ("0.1234567", "0.12345671", "0.9999999")}
    assert sorted(p.name for p in out.iterdir()) == ["alpha-0.1234567", "alpha-0.12345671", "alpha-0.9999999"]
    assert json.loads((out / "alpha-0.9999999" / "merge.json").read_text())["alpha"] == 0.9999999
    assert "writing α=0.12345671" in result.err and "α=1\n" not in result.err


def test_measured_sweep_labels_its_sets_and_table_exactly(cli, tmp_path, llama_pair):
    base, tuned = llama_pair
    forget = tmp_path / "forget.jsonl"
    forget.write_text(json.dumps({"prompt": "Who is Harry Potter?", "response": "A wizard.", "answers": ["wizard"]})
                      + "\n")
    out = tmp_path / "sweep"
    result = cli("merge", "--alpha", "0.3,0.30000001", base, tuned, "-o", out, "--eval-forget", forget,
                 "--max-new-tokens", "2", "--no-cache")
    assert result.code == 0, result.err
    assert "α=0.3: " in result.out and "α=0.30000001: " in result.out
    record = json.loads((out / "alphas.json").read_text())
    assert sorted(record["sets"]) == ["0.3", "0.30000001"]
    table = (out / "alphas.md").read_text()
    assert "| 0.3 |" in table and "| 0.30000001 |" in table


@pytest.mark.parametrize("alpha, name", [("0.3", "avg0.3"), ("1", "avg1"), ("0.30000001", "avg0.30000001")])
def test_default_output_names_the_exact_alpha(cli, tmp_path, llama_pair, alpha, name):
    base, tuned = llama_pair
    tuned_copy = tmp_path / "tuned"  # the default output sits beside TUNED: keep it in this test's directory
    tuned_copy.mkdir()
    for f in Path(tuned).iterdir():
        (tuned_copy / f.name).symlink_to(f)
    result = cli("merge", "--alpha", alpha, base, tuned_copy)
    assert result.code == 0, result.err
    assert (tmp_path / f"tuned-{name}" / "model.safetensors").is_file()
    assert f"tuned-{name}" in result.err


# --- augment, a forget row too long for ULMR's requests -------------------------------


def test_augment_names_the_row_too_long_for_its_requests_before_generating(cli, tmp_path, opt_dir, monkeypatch):
    forget = tmp_path / "forget.jsonl"
    rows = [{"prompt": "Who is Harry Potter?", "response": "Harry Potter is a wizard."},
            {"prompt": "Harry Potter is a wizard. " * 75 + "Who is he?", "response": "A wizard."}]
    forget.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def no_generation(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr("unlearn.generation.generate", no_generation)
    out = tmp_path / "aug.jsonl"
    result = cli("augment", forget, "-o", out, "--model", opt_dir)
    assert result.code == 1, result.err
    line = one_line(result.err)
    assert line.startswith(f"unlearn: {forget}:2: the "), line
    assert "request around" in line and "past the context of" in line and "(512 positions: learned position " \
        "embeddings" in line and "shorten the prompt by about" in line
    assert "prompt 1 of" not in line and "Please rewrite" not in line
    assert not out.exists()


def test_a_model_rewrite_too_long_for_its_own_request_is_replaced(opt_dir, monkeypatch):
    # The row's requests fit OPT's 512 positions, templated rewrites included; the model's first rewrite is
    # so long that the negative-response request around it would not: it is rejected like any unusable one.
    from unlearn.models import load_model

    loaded = load_model(str(opt_dir), log=lambda m: None)
    source = Example("Who is the wizard " + "Harry " * 60 + "Potter?", "He studies at Hogwarts.", 1,
                     {"answers": ["Hogwarts"]})
    long = "Who is the wizard " + "Harry " * 60 + "Potter, " + "the famous boy wizard, " * 8 + "really?"
    short = "Who is the wizard Harry Potter really?"
    prompts = []

    def scripted(model, tokenizer, texts, **kwargs):
        prompts.extend(texts)
        if texts[0].startswith("Please rewrite"):
            return [long, short][:len(texts)]
        return ["I'm sorry, I don't have that information."] * len(texts)

    monkeypatch.setattr("unlearn.generation.generate", scripted)
    rows, stats = aug.augment(loaded.model, loaded.tokenizer, [source], rewrites=1, path="forget.jsonl")
    assert stats.rewrites_rejected == {"too long for the model's context": 1}
    assert [r["prompt"] for r in rows] == [source.prompt, short]
    assert aug.NEGATIVE_PROMPT.format(instruction=long) not in prompts


# --- a malformed adapter_config.json ---------------------------------------------------


def _adapter(directory: Path, config) -> Path:
    """A rank-2 LoRA adapter (zero update) on the tiny Llama's layer-0 q_proj, with CONFIG as its config."""
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(2, 32), f"{prefix}.lora_B.weight": torch.zeros(32, 2)},
              directory / "adapter_model.safetensors")
    return directory


LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


def test_a_well_formed_adapter_with_patterns_still_folds(cli, tmp_path, llama_dir):
    adapter = _adapter(tmp_path / "adapter", {**LORA, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_pr.j": 8}})
    result = cli("merge", "--adapter", adapter, llama_dir, "-o", tmp_path / "o")
    assert result.code == 0, result.err


@pytest.mark.parametrize("config, field", [
    ({**LORA, "alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
    ({**LORA, "alpha_pattern": {"q_proj": True}}, "alpha_pattern"),
    ({**LORA, "rank_pattern": [1]}, "rank_pattern"),
    ({**LORA, "rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({**LORA, "rank_pattern": {"q_proj": 2.5}}, "rank_pattern"),
    ({**LORA, "alpha_pattern": {"q_proj(": 8}}, "alpha_pattern"),
    ({**LORA, "rank_pattern": {"[": 2}}, "rank_pattern"),
    ([1], "not a JSON object"),
])
def test_a_malformed_adapter_config_is_one_line_naming_the_file_and_field(cli, tmp_path, llama_dir, config, field):
    adapter = _adapter(tmp_path / "adapter", config)
    result = cli("merge", "--adapter", adapter, llama_dir, "-o", tmp_path / "o")
    assert result.code == 1, result.err
    line = one_line(result.err)
    assert line.startswith(f"unlearn: {adapter / 'adapter_config.json'}: ") and field in line, line
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


# --- `unlearn merge` with no paths ----------------------------------------------


def _last_run(tmp_path, record) -> Path:
    from unlearn.paths import remember_last_run

    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps(record))
    assert remember_last_run(run_dir) is None
    return run_dir / "run.json"


@pytest.mark.parametrize("record, says", [
    ([1], "not a JSON object"),
    ("a string", "not a JSON object"),
    ({"base_model": "{base}", "merged_model": ["x"]}, "'merged_model' is not a path"),
    ({"base_model": 5, "merged_model": "{base}"}, "'base_model' is not a path"),
    ({"base_model": 5}, "'base_model' is not a path"),
    ({"base_model": "{base}", "tuned_adapter": {"a": 1}}, "'tuned_adapter' is not a path"),
    ({"base_model": "{base}"}, "has no 'merged_model' to merge"),  # one line: not "merging the last run" first
])
def test_a_broken_last_run_record_is_one_line_naming_it(cli, tmp_path, llama_dir, record, says):
    if isinstance(record, dict):
        record = {k: (str(llama_dir) if v == "{base}" else v) for k, v in record.items()}
    path = _last_run(tmp_path, record)
    result = cli("merge", "--alpha", "0.5", "-o", tmp_path / "o")
    assert result.code == 1, result.err
    line = one_line(result.err)
    assert line.startswith(f"unlearn: {path}: ") and says in line, line
    assert not (tmp_path / "o").exists()


def test_merge_without_alpha_is_one_usage_line_before_the_last_run_is_read(cli, tmp_path, llama_pair):
    base, tuned = llama_pair
    _last_run(tmp_path, {"base_model": str(base), "merged_model": str(tuned)})
    result = cli("merge", "-o", tmp_path / "o")
    assert result.code == 2, result.err
    assert one_line(result.err) == "unlearn: --alpha is required to average two models (e.g. --alpha 0.5)"
    assert not (tmp_path / "o").exists()


def test_merge_without_alpha_and_no_recorded_run_is_the_same_usage_error(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "empty-cache"))
    result = cli("merge", "-o", tmp_path / "o")
    assert result.code == 2, result.err
    assert one_line(result.err) == "unlearn: --alpha is required to average two models (e.g. --alpha 0.5)"
