"""What a shell script meets: no progress bars in a log file, a closed stderr, a full stdout, HF_HUB_OFFLINE's
spellings, and eval/augment on pickle weights (the shell audit)."""

import errno
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from test_run_cli import FORGET, NORMAL, write_jsonl

FAST = ["--max-steps", "3", "--check-every", "1", "--max-new-tokens", "4", "--batch-size", "2", "--no-probes"]


def test_no_progress_bar_is_written_where_stderr_is_not_a_terminal(tmp_path, llama_dir, cli):
    # redrawn into a log file, the bars made one line of every state: 3,206 characters for 20 steps
    forget, normal = write_jsonl(tmp_path / "forget.jsonl", FORGET), write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "o", *FAST, "--eval-limit", "3",
                 "--gen-batch-size", "1")
    assert result.code == 0, result.err
    assert "\r" not in result.err and "unlearning:" not in result.err and "generating" not in result.err
    assert any(line.startswith("stopped after") for line in result.err.splitlines())  # the logs stay


def test_a_closed_stderr_sends_nothing_to_stdout(monkeypatch, capsys):
    import sys

    from unlearn.log import log

    monkeypatch.setattr(sys, "stderr", None)  # what Python makes of `2>&-`
    log("unlearn: a message")  # print(file=None) wrote it to stdout, where only the result goes
    assert capsys.readouterr().out == ""


def test_a_result_that_cannot_be_written_is_said_as_such(tmp_path, llama_dir, cli, monkeypatch):
    from unlearn import cli as commands

    def full(obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(commands, "print_json", full)  # `> /dev/full`
    prompts = write_jsonl(tmp_path / "p.jsonl", FORGET)
    result = cli("eval", prompts, "--model", llama_dir, "--max-new-tokens", "2", "--json", "--no-cache")
    assert result.code == 1 and result.err.splitlines()[-1] == \
        "unlearn: could not write the result (No space left on device)"  # not "internal error", kept for bugs


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("YES", True), ("on", True),
                                            ("0", False), ("", False)])
def test_offline_is_read_as_huggingface_hub_reads_it(monkeypatch, value, offline):
    import socket

    from unlearn import models

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    tried = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: tried.append(a) or (_ for _ in ()).throw(OSError()))
    assert models._hub_reachable() is False
    assert bool(tried) is not offline  # offline: no socket opened at all


def test_eval_and_augment_take_allow_pickle_as_run_does(tmp_path, llama_dir, cli):
    pickled = tmp_path / "llamabin"
    shutil.copytree(llama_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    prompts = write_jsonl(tmp_path / "p.jsonl", FORGET)
    refused = cli("eval", prompts, "--model", pickled, "--max-new-tokens", "2", "--no-cache")
    assert refused.code == 1 and "pass --allow-pickle if you trust them" in refused.err
    # the message names an option the command takes: eval (and augment) refused it as unknown
    taken = cli("eval", prompts, "--model", pickled, "--max-new-tokens", "2", "--no-cache", "--json", "--allow-pickle")
    assert taken.code == 0, taken.err
    assert json.loads(taken.out)["n"] == len(FORGET)
    written = cli("augment", prompts, "-o", tmp_path / "aug.jsonl", "--model", pickled, "--rewrites", "1",
                  "--allow-pickle")
    assert written.code == 0, written.err
