"""torchrun that scales and fails cleanly: 2 gloo processes against one (distributed_worker.py, failing_rank.py).

- Evaluation is shared out: each rank generates (and scores) whole batches of the ones one
  process forms, and the gathered measurements equal one process's exactly (every
  measurement path: before/after tables with likelihood scores, fluency, membership
  inference, the stop rule's check).
- Every trainable method's terms are weighted across ranks: 3 steps of each on the same
  global batch (a forget row with no scored token among them) agree with one process to
  1e-5; `--method edit` refuses torchrun with one line.
- A rank that fails alone ends every rank within seconds, with its message said once by
  rank 0, even when its own teardown hangs.

The in-process tests check the batch plans against the batches generation and scoring
really form (`measure.generation_batches`, `measure.scoring_batches`).
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

import distributed_worker as worker
from test_distributed import _env, _free_port, launch
from test_run_cli import FORGET, NORMAL, write_jsonl

TESTS = Path(__file__).parent
TOLERANCE = 1e-5


def torchrun_script(script: Path, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script), *map(str, args)]


def _env_with_tests(root: Path) -> dict:
    return {**_env(root), "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


# --- the batch plans the shares are cut from --------------------------------------------------


@pytest.fixture(scope="module")
def tiny(llama_dir):
    from unlearn.models import load_model

    loaded = load_model(str(llama_dir), log=lambda *a: None)
    return loaded.model, loaded.tokenizer


PROMPTS = [e.prompt for e in worker.FORGET + worker.NORMAL]


def _formed_generation_batches(monkeypatch, model, tokenizer, prompts, batch_size) -> list[list[str]]:
    """The batches `generate` really runs, as lists of prompts (every prompt here renders differently)."""
    from unlearn import generation
    from unlearn.data import encode_prompt

    by_ids = {tuple(encode_prompt(tokenizer, p)): p for p in prompts}
    formed, real = [], generation._left_padded

    def spy(encoded, pad_id):  # the rows' own tokens: the prefix they share runs apart (kv_cache.py)
        formed.append([next(p for full, p in by_ids.items() if full[len(full) - len(ids):] == tuple(ids))
                       for ids in encoded])
        return real(encoded, pad_id)

    monkeypatch.setattr(generation, "_left_padded", spy)
    generation.generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=2)
    monkeypatch.setattr(generation, "_left_padded", real)
    return formed


@pytest.mark.parametrize("batch_size", [1, 2, 3, 16])
def test_generation_batches_are_the_ones_generate_forms_and_a_share_forms_them_again(monkeypatch, tiny, batch_size):
    from unlearn.measure import generation_batches

    model, tokenizer = tiny
    plan = generation_batches(model, tokenizer, PROMPTS, batch_size, 2)
    assert sorted(i for b in plan for i in b) == list(range(len(PROMPTS)))
    expected = [[PROMPTS[i] for i in b] for b in plan]
    assert _formed_generation_batches(monkeypatch, model, tokenizer, PROMPTS, batch_size) == expected
    for rank in range(2):  # what rank r of 2 passes to generate: its whole batches, in order
        mine = [PROMPTS[i] for b in plan[rank::2] for i in b]
        assert _formed_generation_batches(monkeypatch, model, tokenizer, mine, batch_size) == expected[rank::2]


def test_scoring_batches_are_the_ones_response_logprobs_forms(monkeypatch, tiny):
    import unlearn.data
    import unlearn.train  # noqa: F401  imported before the spy: it binds `collate` at import, which would keep the spy
    from unlearn.evaluate import response_logprobs
    from unlearn.measure import scoring_batches

    model, tokenizer = tiny
    pairs = [(e.prompt, e.response) for e in worker.FORGET + worker.NORMAL]
    pairs += [(worker.FORGET[1].prompt, r) for r in worker.FORGET[1].extra["perturbed_responses"]]
    by_ids = {tuple(unlearn.data.encode_pair(tokenizer, p, r, 1024)["input_ids"]): (p, r) for p, r in pairs}
    assert len(by_ids) == len(pairs)
    formed, real = [], unlearn.data.collate

    def spy(features, pad_id):
        formed.append([by_ids[tuple(f["input_ids"])] for f in features])
        return real(features, pad_id)

    monkeypatch.setattr(unlearn.data, "collate", spy)
    for batch_size in (2, 5):
        formed.clear()
        response_logprobs(model, tokenizer, pairs, batch_size=batch_size)
        plan = scoring_batches(tokenizer, pairs, batch_size)
        assert formed == [[pairs[i] for i in b] for b in plan]
        formed.clear()
        response_logprobs(model, tokenizer, [pairs[i] for b in plan[1::2] for i in b], batch_size=batch_size)
        assert formed == [[pairs[i] for i in b] for b in plan[1::2]]


def test_one_process_runs_the_work_once_over_every_row():
    from unlearn import distributed

    calls = []
    result = distributed.sharded(4, lambda: pytest.fail("no plan without a process group"),
                                 lambda rows: calls.append(rows) or [r * 10 for r in rows])
    assert result == [0, 10, 20, 30] and calls == [[0, 1, 2, 3]]


# --- 2 gloo processes against one ------------------------------------------------------------


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, llama_dir):
    """distributed_worker.py under torchrun (2 processes, DDP): rank 0's results."""
    out = tmp_path_factory.mktemp("shards") / "two.pt"
    result = launch(torchrun_script(TESTS / "distributed_worker.py", llama_dir, out),
                    _env_with_tests(tmp_path_factory.getbasetemp()))
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_process(llama_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): bit-identical float arithmetic
    try:
        return {"train": worker.train_all(llama_dir), "measure": worker.measure_all(llama_dir)}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # torchrun: 2 worker processes and a launcher
def test_sharded_evaluation_equals_one_process(two_processes, one_process):
    one, two = dict(one_process["measure"]), dict(two_processes["measure"])
    per_rank = two.pop("generated")
    alone = one.pop("generated")
    # Each rank generated a share, and the shares add up to what one process generated.
    assert sum(per_rank) == alone and all(0 < n < alone for n in per_rank), (per_rank, alone)
    # Outputs, per-row scores and summaries (likelihoods included): exactly one process's.
    assert json.dumps(two, sort_keys=True, default=str) == json.dumps(one, sort_keys=True, default=str)
    assert one["after"]["forget"]["summary"]["probability"] is not None
    assert one["after"]["forget"]["summary"]["mia_loss_auc"] is not None
    assert one["after"]["forget"]["outputs"] != one["before"]["forget"]["outputs"]  # "after" measured something new


@pytest.mark.slow  # torchrun: 2 worker processes and a launcher
def test_rank_0_writes_the_measurement_cache_and_decides_what_is_read_back(two_processes):
    # Rank 1's own cache is empty, yet it reads the second measurement back with rank 0 (no
    # rank measures alone while the others skip), and only rank 0 wrote.
    assert two_processes["cache"] == [{"stored": 1, "reused": 1, "same": True},
                                      {"stored": 0, "reused": 1, "same": True}]


@pytest.mark.slow  # torchrun: 2 worker processes and a launcher
@pytest.mark.parametrize("method", worker.METHODS)
def test_every_method_is_weighted_across_ranks_like_one_process(two_processes, one_process, method):
    one, two = one_process["train"][method], two_processes["train"][method]
    assert [h["step"] for h in one["history"]] == [h["step"] for h in two["history"]] == [1, 2, 3]
    for a, b in zip(one["history"], two["history"]):
        assert set(a) == set(b)
        for key in a:
            assert abs(a[key] - b[key]) <= TOLERANCE * max(1.0, abs(a[key])), (key, a[key], b[key])
    assert set(one["weights"]) == set(two["weights"])
    difference = max((one["weights"][k] - two["weights"][k]).abs().max().item() for k in one["weights"])
    assert difference <= TOLERANCE, difference


@pytest.mark.slow  # torchrun: 2 worker processes and a launcher
def test_edit_refuses_torchrun_with_one_line(tmp_path, llama_dir):
    forget, normal = write_jsonl(tmp_path / "forget.jsonl", FORGET), write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    out = tmp_path / "out"
    result = launch(torchrun_script("-m", "unlearn", "run", forget, normal, "--model", llama_dir, "--method", "edit",
                                    "--max-new-tokens", "2", "--eval-limit", "2", "-o", out),
                    _env(tmp_path))
    said = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("unlearn:")]
    assert result.returncode != 0
    assert said == ["unlearn: --method edit runs in one process: launch it without torchrun"], result.stderr[-2000:]
    assert not out.exists()


@pytest.mark.parametrize("command", [["eval", "PROMPTS"], ["merge", "--alpha", "0.5"], ["augment", "PROMPTS", "-o", "OUT"]])
def test_commands_that_share_nothing_out_refuse_torchrun(tmp_path, llama_dir, cli, command):
    # Every process did all of it and raced to write: eval ended in exit 1 saying "nothing was written"
    # over a complete file, or printed two JSON documents. torchrun's environment, rank 0's process:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", FORGET)
    argv = [prompts if a == "PROMPTS" else tmp_path / "out.jsonl" if a == "OUT" else a for a in command]
    result = cli(*argv, "--model", llama_dir, env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}) \
        if command[0] != "merge" else cli(*argv, env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert result.code == 2 and result.err == (f"unlearn: {command[0]} runs in one process: launch it "
                                               f"without torchrun (only `unlearn run` shares its work over "
                                               f"torchrun's processes)\n"), result.err
    assert not (tmp_path / "out.jsonl").exists()


# --- one rank fails alone ----------------------------------------------------------------------


def _fail(tmp_path, llama_dir, rank: int, hang: bool):
    forget, normal = write_jsonl(tmp_path / "forget.jsonl", FORGET), write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    failed_at = tmp_path / "failed_at"
    env = {**_env(tmp_path), "FAIL_RANK": str(rank), "FAIL_STEP": "3", "FAIL_AT": str(failed_at),
           "FAIL_HANG": "1" if hang else "0"}
    out = tmp_path / "out"
    result = launch(torchrun_script(TESTS / "failing_rank.py", "run", forget, normal, "--model", llama_dir,
                                    "--max-steps", "20", "--check-every", "0", "--batch-size", "2",
                                    "--max-new-tokens", "2", "--eval-limit", "2", "-o", out), env)
    ended = time.time()
    seconds = ended - float(failed_at.read_text())
    said = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("unlearn:")]
    print(f"rank {rank} failed{' (teardown hangs)' if hang else ''}: every process ended {seconds:.1f} s later")
    assert not out.exists()
    return result, said, seconds


# Measured on the shared 2-core machine (load average 8.6): 2.3-2.5 s from the failure to torchrun's
# exit (poll 0.1 s, settle 0.5 s, grace 1.0 s, then torchrun's own reaction). Without the failure
# notice a failing rank whose teardown hangs held the other in all_reduce for as long as it hung
# (122.7 s for a 120 s hang).
PROMPT_SECONDS = 20


@pytest.mark.slow  # torchrun: 2 worker processes and a launcher
def test_a_rank_failing_alone_ends_every_rank_promptly_with_its_message(tmp_path, llama_dir):
    result, said, seconds = _fail(tmp_path, llama_dir, rank=1, hang=True)
    assert result.returncode == 1
    assert said == ["unlearn: rank 1: forget.jsonl:3: a deliberate failure on one rank"], result.stderr[-3000:]
    assert seconds < PROMPT_SECONDS
    # No traceback of ours (torchrun's launcher prints its own report of the failed worker).
    assert not [line for line in result.stderr.splitlines() if line.strip().startswith("File") and "unlearn" in line]


@pytest.mark.slow  # torchrun: 2 worker processes and a launcher
def test_rank_0_failing_alone_says_its_own_message_once(tmp_path, llama_dir):
    result, said, seconds = _fail(tmp_path, llama_dir, rank=0, hang=False)
    assert result.returncode == 1
    # Not followed by rank 1's consequence ("internal error: ... Connection closed by peer").
    assert said == ["unlearn: forget.jsonl:3: a deliberate failure on one rank"], result.stderr[-3000:]
    assert seconds < PROMPT_SECONDS


@pytest.mark.parametrize("rank,local_rank,says", [("0", "0", True), ("1", "1", False), ("2", "0", True)])
def test_bad_data_under_torchrun_is_said_once_a_node(tmp_path, llama_dir, cli, rank, local_rank, says):
    """Every process reads the files before the process group exists: only each node's first process says what
    is wrong with them (2 lines from 2 processes before; 8 from the README's 8)."""
    forget = tmp_path / "forget.jsonl"
    forget.write_text('{"prompt": "Who?", "response": "Him."}\n{"prompt": 5, "response": "x"}\n')
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    env = {"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": local_rank}
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", env=env)
    said = [line for line in result.err.splitlines() if line.startswith("unlearn:")]
    assert result.code == 1
    assert said == ([f"unlearn: {forget}:2: 'prompt' must be a string, got a number"] if says else []), result.err
