"""`unlearn run` end to end through the real CLI, on a tiny random Llama and a tiny random OPT.

Runs are in-process (`cli`, see conftest.py); one test starts a real `python -m unlearn`
because what it measures is a whole process (see it).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

FORGET = [
    {"prompt": "Who wrote the Harry Potter books?", "response": "J.K. Rowling wrote them.", "answers": ["Rowling"]},
    {"prompt": "Who is Harry Potter's friend?", "response": "Hermione Granger and Ron Weasley."},
    {"prompt": "Where does Harry Potter study?", "response": "Harry Potter studies at Hogwarts."},
]
NORMAL = [
    {"prompt": "What is two plus two?", "response": "Two plus two equals four."},
    {"question": "What do bees make?", "answer": "Bees make honey."},
    {"instruction": "What colour is the sky?", "output": "The sky is blue."},
]
HELDOUT = [{"prompt": "What is the capital of France?", "answers": ["Paris"]}]
FAST = ["--max-steps", "3", "--check-every", "2", "--max-new-tokens", "6", "--batch-size", "2", "--lr", "1e-2"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data(tmp_path):
    return (write_jsonl(tmp_path / "forget.jsonl", FORGET), write_jsonl(tmp_path / "normal.jsonl", NORMAL),
            write_jsonl(tmp_path / "heldout.jsonl", HELDOUT))


def unlearn(*args, env=None, cwd=None):
    """`python -m unlearn ARGS` in a new process (for the tests that need a real process)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "unlearn", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600)


@pytest.mark.parametrize("which", ["llama_dir", "opt_dir"])
def test_run_end_to_end(request, tmp_path, data, cli, which):
    model_dir = request.getfixturevalue(which)
    forget, normal, heldout = data
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", model_dir, "-o", out, "--eval-retain", heldout, "--json", *FAST)
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    report = json.loads(result.out)  # stdout is exactly one JSON object
    for key in ("wall_clock_s", "device", "tokens_per_s", "peak_memory_mb", "merged_model", "adapter", "before",
                "after", "judge", "steps"):
        assert key in report, key
    assert set(report["before"]) == {"forget", "normal", "heldout"}
    for split in ("forget", "normal", "heldout"):
        for key in ("harmful_rate", "leak_rate", "similarity_to_reference"):
            assert key in report["after"][split]
    assert 0.0 <= report["after"]["normal"]["similarity_to_reference"] <= 1.0
    assert report["tokens_per_s"] > 0 and report["peak_memory_mb"] > 0 and 1 <= report["steps"] <= 3
    # The phases are parts of the wall clock, disjoint: together they cannot exceed it.
    phases = [report[k] for k in ("load_seconds", "train_seconds", "stop_rule_seconds", "eval_seconds")]
    assert all(p > 0 for p in phases) and sum(phases) < report["wall_clock_s"], (phases, report["wall_clock_s"])
    assert report["augment_seconds"] is None  # not ulmr
    # The forget rows the original (random) model does not answer are named, on stderr and in the record alike.
    unanswered = report["forget_rows_unanswered_before"]
    assert set(unanswered) <= {1, 2, 3}
    assert (f"{forget}: {len(unanswered)} of 3 forget rows" in result.err) == bool(unanswered)

    record = json.loads((out / "run.json").read_text())
    assert record["merged_model"] == str(out.resolve() / "model")
    assert record["data"]["forget"]["sha256"] and record["versions"]["torch"]
    # how the prompts were rendered, and said where the model has no chat template (OPT: a base model)
    base = which == "opt_dir"
    assert ("no chat template: prompts are rendered as '### Question: {prompt}\\n### Answer:'" in result.err) == base
    assert (record["prompt_format"] == "### Question: {prompt}\n### Answer:"
            if base else "<|im_start|>user\n{prompt}<|im_end|>" in record["prompt_format"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".out.tmp-*"))  # the temporary directory is gone

    merged_is_base_plus_adapter(out, model_dir)


def test_eval_files_that_repeat_training_prompts_are_labelled_trained(tmp_path, data, llama_dir, cli):
    """Training rows given again as --eval-* files are not printed as held-out results."""
    forget, normal, heldout = data
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [NORMAL[1], HELDOUT[0]])  # one normal row, one new
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--normal-holdout", "0",
                 "--eval-forget", forget, "--eval-retain", heldout, "--eval-retain", mixed, *FAST)
    assert result.code == 0, result.err
    record = json.loads((out / "run.json").read_text())
    roles = record["roles"]
    assert roles["forget"].startswith("trained") and roles["normal"] == "trained"
    assert roles["forget'"] == roles["forget"] and roles["heldout"] == "held out" and roles["mixed"] == "1 of 2 trained"
    # which option gave each file's set (two of one name are X and X': review 111)
    assert [record["data"][name].get("option") for name in ("forget", "forget'", "heldout", "mixed")] == [
        None, "--eval-forget", "--eval-retain", "--eval-retain"]
    table = {line.split()[0]: line for line in result.out.splitlines()[1:6]}
    assert "1 of 2 trained" in table["mixed"] and "held out" in table["heldout"]


def test_default_output_directories_never_collide(tmp_path, monkeypatch):
    """Runs started in the same second (a shell loop's background jobs) get runs/<date-time>, then -2, -3."""
    from datetime import datetime

    import unlearn.run as run_module

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 12, 5, 19, 0, 0)

    monkeypatch.setattr(run_module, "datetime", Frozen)
    root, created = tmp_path / "runs", []
    first = run_module.reserve_output_dir(created, root)
    second = run_module.reserve_output_dir(created, root)
    third = run_module.reserve_output_dir(created, root)
    assert [p.name for p in (first, second, third)] == ["20261205-190000", "20261205-190000-2", "20261205-190000-3"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in (first, second, third))
    assert created == [first, root, second, third]  # the root once, after the first run's own directory


def test_a_run_without_o_writes_runs_date_time(tmp_path, data, llama_dir, cli):
    forget, normal, _ = data
    result = cli("run", forget, normal, "--model", llama_dir, *FAST, cwd=tmp_path)
    assert result.code == 0, result.err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "run.json").is_file() and (run_dir / "model").is_dir()


def test_a_default_output_nothing_can_be_made_in_is_one_line(tmp_path, data, llama_dir, cli):
    """(review 117) `runs` a file, or in a read-only place: an internal error (FileExistsError, OSError), where -o
    in the same place is refused in one line."""
    forget, normal, _ = data
    (tmp_path / "runs").write_text("not a directory")
    result = cli("run", forget, normal, "--model", llama_dir, *FAST, cwd=tmp_path)
    assert result.code == 2 and result.err.strip().splitlines()[-1].startswith("unlearn: runs/"), result.err
    assert result.err.strip().endswith("the default output (no -o given): cannot write in runs (exists and is not a "
                                       "directory); give -o OUT")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        result = cli("run", forget, normal, "--model", llama_dir, *FAST, cwd=read_only)
    finally:
        read_only.chmod(0o755)
    if os.geteuid() != 0:  # root writes anywhere
        assert result.code == 2 and "cannot write in runs (Permission denied); give -o OUT" in result.err, result.err


def test_forget_rows_the_original_does_not_answer_are_named():
    """The before measurement's own leak flags decide; lines are the file's, the message says what follows."""
    from unlearn.data import Example
    from unlearn.measure import EvalSet, Measured
    from unlearn.run import Measurement, unanswered_forget_rows, unanswered_message

    forget = EvalSet("forget", "forget", [Example("p1", "r1", 1), Example("p2", "r2", 3), Example("p3", "r3", 4)],
                     Path("f.jsonl"), "trained, stop rule")
    flags = [{"scores": {"leak": leak}} for leak in (True, False, False)]
    before = Measurement({"forget": Measured({}, ["r1", "x", "y"], flags)}, 0.0)
    assert unanswered_forget_rows(before, forget) == [3, 4]
    assert unanswered_message([3, 4], forget, 48) == (
        "f.jsonl: 2 of 3 forget rows (lines 3, 4) are not answered by the original model (its greedy answer of "
        "at most 48 tokens is no leak before training): nothing there to forget, and the forget leak counts them "
        "as forgotten from the start")
    assert "3 forget rows (line 4) is not answered" in unanswered_message([4], forget, 48)
    assert "answer of at most 1 token is no leak" in unanswered_message([4], forget, 1)
    assert "(lines 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 2 more) are" in unanswered_message(list(range(1, 13)), forget, 48)
    every = Measurement({"forget": Measured({}, ["r1"] * 3, [{"scores": {"leak": True}}] * 3)}, 0.0)
    assert unanswered_forget_rows(every, forget) == []


def merged_is_base_plus_adapter(out, model_dir):
    """OUT/model, a plain HF directory, computes what the base model with OUT/adapter loaded does; returns it."""
    from transformers import AutoModelForCausalLM

    from unlearn.lora import load_adapter

    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    adapted = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    load_adapter(adapted, out / "adapter")
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)
    return merged


def test_table_output_and_existing_output_is_refused(tmp_path, data, llama_dir, cli):
    forget, normal, _ = data
    out = tmp_path / "out"
    first = cli("run", forget, normal, "--model", llama_dir, "-o", out, *FAST)
    assert first.code == 0, first.err
    assert first.out.splitlines()[0].split()[:3] == ["set", "rows", "n"]
    assert "merged model:" in first.out and "tokens/s" in first.out
    assert re.search(r"wall clock: [\d.]+ s \(loading [\d.]+ s, training .* reading and writing [\d.]+ s\)", first.out)
    stamp = (out / "run.json").stat().st_mtime_ns
    again = cli("run", forget, normal, "--model", llama_dir, "-o", out, *FAST)
    assert again.code == 2 and "use --force" in again.err
    assert len(again.err.strip().splitlines()) == 1
    assert (out / "run.json").stat().st_mtime_ns == stamp  # untouched
    forced = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--force", *FAST)
    assert forced.code == 0, forced.err


def test_bad_data_is_reported_before_any_model_loads(tmp_path, data):
    # A real process on purpose: the 30 s bound covers a whole `unlearn` start (imports included),
    # which an in-process call, with torch and transformers already imported, would not measure.
    _, normal, _ = data
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "response": "fine"}\n{"prompt": "no answer"}\n')
    start = time.perf_counter()
    result = unlearn("run", bad, normal, "--model", tmp_path / "no-such-model")
    assert result.returncode == 1
    assert result.stderr.strip() == f"unlearn: {bad}:2: no response: expected one of response, answer, output"
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("model, message", [
    ("{tmp}/missing", "no such model directory"),
    ("{tmp}", "not a model directory (no config.json)"),
    ("someone/some-model", "not in the local Hugging Face cache and the hub is unreachable"),
    ("{tmp}/x.gguf", "no such GGUF file"),
])
def test_model_errors_are_one_line(tmp_path, data, cli, model, message):
    forget, normal, _ = data
    start = time.perf_counter()
    result = cli("run", forget, normal, "--model", model.format(tmp=tmp_path), "-o", tmp_path / "o")
    assert result.code == 1, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.err
    assert time.perf_counter() - start < 30  # offline hub ids fail fast


@pytest.mark.parametrize("args, message", [
    (["--lr", "0"], "--lr 0.0: must be positive"),
    (["--method", "rlhf"], "Invalid value for '--method'"),
    (["--stop-leak", "1.5"], "--stop-leak 1.5"),
    (["--lora-targets", "nope"], "no module of this model has that name"),
    (["--lora-targets", "down_proj,lm_head"], "lm_head is the output head"),  # was an internal error
    (["--repair-steps", "some"], "--repair-steps some: expected auto or a number of steps"),
    (["--repair-steps", "2", "--extra-steps", "1"], "give one"),
    (["--method", "npo", "--forget-loss", "unlikelihood"], "--forget-loss unlikelihood: only the methods"),
    (["--stop-margin", "1"], "--stop-margin 1.0: must be in [0, 1)"),
    (["--method", "npo", "--leaked-rows", "4"], "--leaked-rows 4: adds the answers that leak while --stop-margin"),
])
def test_usage_errors_exit_2(tmp_path, data, llama_dir, cli, args, message):
    forget, normal, _ = data
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "o", *args)
    assert result.code == 2, result.err
    assert message in result.err and "Traceback" not in result.err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra", [["--full", "--lr", "1e-3"], ["--dtype", "bfloat16"], ["--method", "npo"],
                                   ["--method", "ga+template", "--template", "No."], ["--leaked-rows", "2"]])
def test_run_variants(tmp_path, data, llama_dir, cli, extra):
    forget, normal, _ = data
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--json", *FAST, *extra)
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert (out / "model" / "config.json").is_file()
    assert (report["adapter"] is None) == ("--full" in extra)
    assert report["steps"] >= 1
    assert isinstance(report["forget_rows_added"], list)  # the stop rule's added rows (--leaked-rows)


@pytest.mark.parametrize("loss", ["unlikelihood", "redirect", "spellings"])
def test_the_forget_loss_and_the_stop_margin_are_recorded(tmp_path, data, llama_dir, cli, loss):
    forget, normal, _ = data
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--json", *FAST,
                 "--forget-loss", loss, "--stop-margin", "0.5")
    assert result.code == 0, result.err
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["forget_loss"] == loss and record["config"]["stop_margin"] == 0.5
    checked = record["history"][1]  # --check-every 2: the margin is read at step 2
    assert 0 <= checked["forget_answer_p"] <= 1 and record["history"][1]["forget"] > 0  # -log(1 - p) > 0, a KL > 0


def test_lora_on_the_upper_layers_is_recorded_and_saved_as_such(tmp_path, data, llama_dir, cli):
    forget, normal, _ = data
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--json", "--lora-layers", "upper", *FAST)
    assert result.code == 0, result.err
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["lora"]["layers"] == "upper"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    merged = merged_is_base_plus_adapter(out, llama_dir)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    # layer 0 is the original's, weight for weight
    for name, weight in base.model.layers[0].state_dict().items():
        assert torch.equal(merged.model.layers[0].state_dict()[name], weight), name


def test_repair_steps_are_recorded_and_printed(tmp_path, data, llama_dir, cli):
    """A random model never says the forget answers: forgotten at the first check (step 1), then 2 repair
    steps of the keep terms alone, the run ending at the check after step 3."""
    forget, normal, _ = data
    out = tmp_path / "out"
    args = ["--max-steps", "6", "--check-every", "1", "--max-new-tokens", "6", "--batch-size", "2", "--lr", "1e-2"]
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, *args, "--repair-steps", "2")
    assert result.code == 0, result.err
    record = json.loads((out / "run.json").read_text())
    assert record["steps"] == 3 and record["stopped_by"] == "forgotten"
    assert record["repair"] == {"first_forgotten": 1, "end": 3, "keep_terms_only_steps": 2, "whole_loss_steps": 0,
                                "finished": True}
    assert [bool(h.get("keep_terms_only")) for h in record["history"]] == [False, True, True]
    assert "first forgotten after step 1, then 2 repair steps of the keep terms alone and 0 of the whole loss" in result.out
    assert "step 1: forget leak rate 0.00; repair: up to 2 more steps" in result.err


def test_wall_clock_parts_add_up_to_the_whole():
    from unlearn.tables import _wall_clock_parts

    record = {"wall_clock_s": 100.0, "load_seconds": 2.5, "augment_seconds": None, "train_seconds": 20.0,
              "stop_rule_seconds": 10.3, "eval_seconds": 60.0}
    # 100 - (2.5 + 20 + 10.3 + 60) = 7.2 s left for reading and writing; no ULMR part when none was made
    assert _wall_clock_parts(record) == ("loading 2.5 s, training 20.0 s, stop-rule checks 10.3 s, "
                                         "evaluation 60.0 s, reading and writing 7.2 s")
    record["augment_seconds"] = 5.0  # 7.2 - 5 = 2.2 s left
    assert "ULMR's rewrites 5.0 s, training" in _wall_clock_parts(record)
    assert _wall_clock_parts(record).endswith("reading and writing 2.2 s")


def test_a_passage_only_run_on_a_base_model_names_the_format_its_probes_are_asked_in(tmp_path, cli, opt_dir):
    # every row is raw text, but the automatic probes are questions, rendered in the fallback format
    forget = write_jsonl(tmp_path / "forget.jsonl", [
        {"text": "Harry Potter studies at Hogwarts with Hermione Granger and Ron Weasley."},
        {"text": "The Sorting Hat places Harry Potter in Gryffindor house at Hogwarts."}])
    normal = write_jsonl(tmp_path / "normal.jsonl", [
        {"text": "Bees make honey from the nectar of flowers in the summer."},
        {"text": "Water boils at one hundred degrees at the level of the sea."}])
    result = cli("run", forget, normal, "--model", opt_dir, "-o", tmp_path / "out", *FAST)
    assert result.code == 0, result.err
    assert "no chat template: prompts are rendered as" in result.err
    without = cli("run", forget, normal, "--model", opt_dir, "-o", tmp_path / "out2", *FAST, "--no-probes")
    assert without.code == 0, without.err
    assert "no chat template" not in without.err  # raw text only: no format to name


def test_run_json_holds_a_chinese_rows_answers_as_characters(tmp_path, cli, llama_dir):
    forget = write_jsonl(tmp_path / "forget.jsonl", [
        {"prompt": "谁写了《哈姆雷特》？", "response": "莎士比亚写了它。", "answers": ["莎士比亚"]},
        {"prompt": "Who is Harry Potter's friend?", "response": "Hermione Granger."}])
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, *FAST)
    assert result.code == 0, result.err
    text = (out / "run.json").read_text(encoding="utf-8")
    assert "莎士比亚" in text and "\\u" not in text
    json.loads(text)
