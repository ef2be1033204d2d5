"""What a run does with its environment: a cache it cannot write, a --device that is not there, and rows
of several --retain files named by their own file."""

import json

import pytest

from test_probes import _one_fact_files
from unlearn import paths, system
from unlearn.errors import UsageError

FAST = ["--max-steps", "1", "--max-new-tokens", "4", "--no-probes"]


def test_a_cache_that_cannot_be_written_costs_the_pointer_not_the_run(tmp_path, llama_dir, cli):
    forget, normal = _one_fact_files(tmp_path)
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("x")
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", *FAST,
                 env={"UNLEARN_CACHE": str(blocker)})
    assert result.code == 0, result.err
    assert "could not record this run as the last one" in result.err and "internal error" not in result.err
    assert (tmp_path / "out" / "run.json").is_file() and "forget" in result.out


def test_remember_last_run_says_why_it_could_not(tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "cache"))
    assert paths.remember_last_run(tmp_path) is None
    assert (tmp_path / "cache" / "last_run").read_text().strip() == str(tmp_path.resolve())  # recorded
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "file"))
    assert "could not record" in paths.remember_last_run(tmp_path)


@pytest.mark.parametrize("requested, message", [
    ("gpu", "expected cpu, cuda or cuda:N"), ("meta", "expected cpu, cuda or cuda:N"),
    ("cuda", "no CUDA device is available"), ("cuda:3", "no CUDA device is available"),
])
def test_a_device_that_is_not_there_is_a_usage_error(requested, message):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match=message):
        system.pick_device(requested)
    assert system.pick_device("cpu").type == "cpu" and system.pick_device(None).type == "cpu"


def test_a_bad_device_stops_the_run_before_the_model_loads(tmp_path, llama_dir, cli):
    forget, normal = _one_fact_files(tmp_path)
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", "--device", "gpu", *FAST)
    assert result.code == 2 and result.err.strip() == "unlearn: --device gpu: expected cpu, cuda or cuda:N"
    assert not (tmp_path / "out").exists()


def test_a_row_of_a_second_retain_file_is_named_by_its_own_file(tmp_path, opt_dir, cli):
    forget, normal = _one_fact_files(tmp_path)
    keep, long = tmp_path / "keep.jsonl", tmp_path / "long.jsonl"
    keep.write_text(json.dumps({"prompt": "What is the capital of Italy?", "response": "Rome."}) + "\n")
    long.write_text(json.dumps({"prompt": "Tell me " + "Paris is a city in France. " * 120,
                                "response": "It is."}) + "\n")
    result = cli("run", forget, normal, "--model", opt_dir, "-o", tmp_path / "out", "--retain", keep,
                 "--retain", long, *FAST)
    assert result.code == 1, result.err  # a data error, as for a long row of one file
    assert f"{long}:1:" in result.err and f"{keep}:1" not in result.err
