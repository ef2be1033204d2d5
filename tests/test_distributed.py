"""`unlearn run` under torchrun: 2 CPU processes (gloo) against one process with the same global batch.

Every run here is the real CLI: under torchrun in subprocesses, alone in-process (`cli`, see
conftest.py; the same entry point as a fresh process). The single-process run, the DDP run and
the FSDP run see the same global batch (4 forget + 4 mismatch + 4 normal rows per step,
2 of each per process), so their loss histories and final LoRA weights must agree to
1e-5 (float rounding differs: per-rank means averaged by all-reduce). A checkpoint
written by a 2-process FSDP run (Ctrl-C to torchrun, forwarded to both ranks) resumes
under 2 processes to bit-identical weights, and under 1 process to the same weights to
1e-5. Launches have timeouts: a hang fails its test instead of the suite.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_run_cli import FORGET, NORMAL, write_jsonl

TOLERANCE = 1e-5
# The stop rule fires at step 2 on the random model (nothing leaks; its verdict is broadcast
# from rank 0), then 38 extra steps. ga+mismatch draws random normal responses: every rank
# must draw the whole global batch's to stay in step with one process.
ARGS = ["--method", "ga+mismatch", "--max-steps", "40", "--check-every", "2", "--extra-steps", "40",
        "--batch-size", "4", "--lr", "1e-3", "--max-new-tokens", "4", "--eval-limit", "2", "--gen-batch-size", "2"]
TIMEOUT = 240


def _env(tmp_root: Path) -> dict:
    # Module-scoped runs start before conftest's per-test cache fixture: give the cache explicitly.
    # TMPDIR: torchrun leaves a torchelastic_* log directory in the temporary directory at every launch;
    # under the test's own directory, the suite leaves none in /tmp.
    (tmp_root / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "UNLEARN_CACHE": str(tmp_root / "unlearn-cache"), "TMPDIR": str(tmp_root / "tmp")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "unlearn", *map(str, args)]


def finish(process: subprocess.Popen, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Wait for PROCESS; past TIMEOUT, stop it (torchrun passes SIGTERM on to its workers) and fail."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        pytest.fail(f"{' '.join(process.args)} did not finish in {timeout} s")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def launch(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return finish(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama_dir):
    root = tmp_path_factory.getbasetemp()
    folder = tmp_path_factory.mktemp("dist-data")
    forget = write_jsonl(folder / "forget.jsonl", FORGET + [
        {"prompt": "What is the capital of France?", "response": "The capital of France is Paris.",
         "answers": ["Paris"]}])
    normal = write_jsonl(folder / "normal.jsonl", NORMAL + [
        {"prompt": "When does water boil?", "response": "Water boils at one hundred degrees."}])
    return {"args": [forget, normal, "--model", llama_dir, *ARGS], "env": _env(root), "factory": tmp_path_factory}


@pytest.fixture(scope="module")
def runs(setup, cli):
    """The uninterrupted runs, each computed once: 'single', 'ddp', 'fsdp' -> (output dir, stdout, stderr)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            parent = setup["factory"].mktemp(kind)
            out = parent / "out"
            if kind == "single":
                code, stdout, stderr = cli("run", *setup["args"], "-o", out, env=setup["env"])
            else:
                extra = ["--fsdp"] if kind == "fsdp" else []
                result = launch(torchrun("run", *setup["args"], *extra, "-o", out), setup["env"])
                code, stdout, stderr = result.returncode, result.stdout, result.stderr
            assert code == 0, stderr
            cache[kind] = (out, stdout, stderr)
        return cache[kind]

    return get


def history(out: Path) -> list[dict]:
    return json.loads((out / "run.json").read_text())["history"]


def adapter(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def max_differences(a: Path, b: Path) -> tuple[float, float]:
    """(largest difference of a logged number, largest difference of a LoRA weight) between two runs."""
    ha, hb = history(a), history(b)
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == list(range(1, 41))
    logged = 0.0
    for x, y in zip(ha, hb):
        assert set(x) == set(y)
        logged = max([logged] + [abs(x[k] - y[k]) for k in x if k != "step"])
    wa, wb = adapter(a), adapter(b)
    assert set(wa) == set(wb)
    weights = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    return logged, weights


@pytest.mark.slow  # torchrun: 2 worker processes and a launcher per run
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(runs, kind):
    reference = runs("single")[0]
    out = runs(kind)[0]
    logged, weights = max_differences(reference, out)
    print(f"{kind}: max |loss-curve difference| {logged:.3g}, max |LoRA weight difference| {weights:.3g}")
    assert logged <= TOLERANCE and weights <= TOLERANCE
    record = json.loads((out / "run.json").read_text())
    assert record["distributed"] == {"processes": 2, "wrapper": kind, "backend": "gloo"}
    assert record["stopped_by"] == "forgotten" and record["history"][1]["forget_leak"] == 0.0
    # The KL (the reference forward with adapters off, through the unwrapped model) is live and agrees.
    assert max(h["kl"] for h in record["history"]) > 0
    # The merged model is whole (FSDP's shards gathered) and equals one process's.
    merged, expected = load_file(out / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in expected.items()}
    assert max((merged[k] - expected[k]).abs().max().item() for k in merged) <= TOLERANCE


@pytest.mark.slow  # torchrun: 2 worker processes and a launcher per run
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_only_rank_0_prints_and_writes(runs, kind):
    out, stdout, stderr = runs(kind)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no second output, no temporary directory
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "model", "probes.jsonl", "run.json"]
    assert stdout.count("judge: ") == 1 and stdout.count("merged model: ") == 1  # one table
    assert stdout.splitlines()[0].split()[:4] == ["set", "rows", "n", "harmful"]
    stderr = stderr.replace("\r", "\n")
    assert stderr.count("stopped after 40 steps") == 1 and stderr.count("step 2: forget leak rate") == 1
    assert "Traceback" not in stderr


def _wait_for_checkpoint(process: subprocess.Popen, out: Path, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not any(int(p.name.split("-")[1]) >= step for p in (out / "checkpoints").glob("step-*")):
        if process.poll() is not None:
            pytest.fail(f"the run ended before checkpoint {step}: {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            finish(process, timeout=0.1)
        time.sleep(0.005)


@pytest.mark.slow  # torchrun: 2 worker processes and a launcher per run
def test_checkpoint_of_two_processes_resumes_under_two_and_one(tmp_path, setup, runs, cli):
    args = [*setup["args"], "--save-every", "1"]
    out = tmp_path / "out"
    process = subprocess.Popen(torchrun("run", *args, "--fsdp", "-o", out), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=setup["env"])
    _wait_for_checkpoint(process, out, 3)
    process.send_signal(signal.SIGINT)  # as Ctrl-C: torchrun passes it on to both ranks
    stopped = finish(process)
    assert stopped.returncode != 0
    said = [line for line in stopped.stderr.replace("\r", "\n").splitlines() if line.startswith("unlearn:")]
    assert len(said) == 1 and said[0].startswith("unlearn: interrupted after step "), stopped.stderr[-2000:]
    step = int(said[0].split("after step ")[1].split(";")[0])
    assert 3 <= step < 40 and not (out / "run.json").exists()
    saved = out / "checkpoints" / f"step-{step}"
    assert sorted(p.name for p in saved.iterdir()) == ["optimizer.safetensors", "rng.safetensors", "state.json",
                                                       "trainable.safetensors"]
    whole = adapter(runs("single")[0])
    lora = load_file(saved / "trainable.safetensors")  # whole tensors (gathered), not a rank's shards
    assert {f"base_model.model.{k}.weight": v.shape for k, v in lora.items()} == {k: v.shape for k, v in whole.items()}
    one = tmp_path / "one"
    shutil.copytree(out, one)

    resumed = launch(torchrun("run", *args, "--fsdp", "-o", out, "--resume"), setup["env"])
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count(f"resuming from {saved} (step {step})") == 1
    uninterrupted = runs("fsdp")[0]
    assert history(out) == history(uninterrupted)
    got, expected = adapter(out), adapter(uninterrupted)
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    alone = cli("run", *args, "-o", one, "--resume", env=setup["env"])
    assert alone.code == 0, alone.err
    logged, weights = max_differences(runs("single")[0], one)
    print(f"resumed under 1 process: max |loss-curve difference| {logged:.3g}, max |weight difference| {weights:.3g}")
    assert logged <= TOLERANCE and weights <= TOLERANCE


@pytest.mark.slow  # torchrun: 2 worker processes and a launcher per run
def test_batch_size_must_split_over_the_processes(tmp_path, setup, llama_dir):
    forget, normal = setup["args"][:2]
    out = tmp_path / "out"
    result = launch(torchrun("run", forget, normal, "--model", llama_dir, "--batch-size", "3", "-o", out), setup["env"])
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if line.startswith("unlearn:")]
    assert said == ["unlearn: --batch-size 3: the global batch must split evenly over the 2 processes "
                    "(a multiple of 2)"]
    assert not out.exists()


def test_fsdp_without_torchrun_is_a_usage_error(tmp_path, setup, cli):
    result = cli("run", *setup["args"][:4], "--fsdp", "-o", tmp_path / "out")
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        "unlearn: --fsdp shards the model across processes: launch with torchrun --nproc-per-node K (K > 1) "
        "-m unlearn run ..."]
    assert not (tmp_path / "out").exists()


def test_global_mean_weights_by_units_and_a_rank_without_units_contributes_zero(monkeypatch):
    from unlearn import distributed
    from unlearn.losses import IGNORE_INDEX

    I = IGNORE_INDEX
    # This rank: 2 rows, one with scored tokens (the first label never counts: the shift).
    labels = torch.tensor([[I, 5, 6], [I, I, I]])
    logits = torch.ones(2, 3, 4, requires_grad=True)
    assert distributed.global_mean(lambda: torch.tensor(2.0), labels, "rows", logits) == 2.0  # one process

    world = distributed.World(rank=0, size=2)
    monkeypatch.setattr(distributed, "_WORLD", world)
    everywhere = {"n": 4.0}
    monkeypatch.setattr(distributed, "_all_reduce", lambda values, op="sum": [everywhere["n"]])
    # 1 row here of 4 in all, over 2 ranks: 2.0 * 1 * 2 / 4 = 1.0 (rows); 2 tokens here of 4: 2.0 * 2 * 2 / 4.
    assert distributed.global_mean(lambda: torch.tensor(2.0), labels, "rows", logits) == 1.0
    assert distributed.global_mean(lambda: torch.tensor(2.0), labels, "tokens", logits) == 2.0

    def raises():
        raise ValueError("no response tokens in this batch")

    empty = torch.full((1, 3), I)
    zero = distributed.global_mean(raises, empty, "rows", logits)  # units elsewhere: 0, with a graph
    assert zero == 0.0
    zero.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    everywhere["n"] = 0.0  # no unit on any rank: the same error as one process
    with pytest.raises(ValueError, match="no response tokens"):
        distributed.global_mean(raises, empty, "rows", logits)


def test_a_peer_killed_outright_is_not_called_an_internal_error():
    """A rank killed by the OOM killer posts no failure; the others' next collective fails with gloo's
    'Connection reset by peer', which was printed as an internal error of unlearn."""
    from unlearn.distributed import _one_line

    gone = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:50869: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging")
    message, code = _one_line(gone)
    assert message.startswith("another process of the run ended without a message (killed? out of memory?)")
    assert code == 1 and "internal error" not in message and "Connection reset by peer" in message
    assert _one_line(RuntimeError("shape mismatch"))[0].startswith("internal error: RuntimeError: shape mismatch")


@pytest.mark.parametrize("text", [
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:589] Read error [127.0.0.1]:6123: Connection reset by peer",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Write error: Broken pipe",
    "NCCL error: remote process exited or there was a network error",
])
def test_a_peer_killed_outright_is_said_as_such_not_as_an_internal_error(text):
    from unlearn.distributed import _one_line

    line, code = _one_line(RuntimeError(text + "\nException raised from ..."))
    assert code == 1 and line == ("another process of the run ended without a message (killed? out of memory?); "
                                  f"its connection closed under this one: {text}")
    # any other RuntimeError is one of this process
    assert _one_line(RuntimeError("boom"))[0].startswith("internal error: RuntimeError: boom")
    assert _one_line(ValueError(text))[0].startswith("internal error: ValueError: ")
