"""Checkpoints and resume, Ctrl-C, nan losses, failed saves, and the loading/saving security rules.

The resume tests kill a real `unlearn run` process (SIGKILL, SIGINT: only a process can
be killed) once a checkpoint appears, resume it in-process (`cli`, see conftest.py), and
compare the adapter with an uninterrupted run's: the weights must be bit-identical (CPU).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_run_cli import FORGET, NORMAL, write_jsonl

ENV = {"OMP_NUM_THREADS": "1"}
BASE = ["--max-steps", "40", "--max-new-tokens", "4", "--batch-size", "2", "--lr", "1e-2", "--save-every", "1"]
SETTINGS = {
    "no-checks": ["--check-every", "0"],
    # The stop rule fires at once on the random model (nothing leaks), then 30 extra steps:
    # the rule's state (stopped, stop_at) must survive the resume too.
    "stop-rule": ["--check-every", "1", "--extra-steps", "30", "--method", "ga+mismatch", "--lora-dropout", "0.1"],
    # rmu's target c·u is recomputed on resume (the seed's direction, the original's norms): it must match.
    "rmu": ["--check-every", "0", "--method", "rmu"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_jsonl(folder / "forget.jsonl", FORGET), write_jsonl(folder / "normal.jsonl", NORMAL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, llama_dir, cli):
    """The adapter of an uninterrupted run, per setting (computed once)."""
    cache = {}

    def get(setting):
        if setting not in cache:
            out = tmp_path_factory.mktemp("reference") / "out"
            result = cli("run", *data, "--model", llama_dir, "-o", out, *BASE, *SETTINGS[setting])
            assert result.code == 0, result.err
            assert not (out / "checkpoints").exists()  # the finished result replaced them
            cache[setting] = load_file(out / "adapter" / "adapter_model.safetensors")
        return cache[setting]

    return get


def start_and_stop(args, out: Path, sig, env: dict | None = None) -> subprocess.CompletedProcess:
    """Start `unlearn run ARGS -o OUT`, send SIG once a checkpoint of step 3 or later exists; wait for it.
    ENV: more variables for the process."""
    # SIGINT at its default in the child, as from a terminal: started from a shell's background job, the suite's
    # processes inherit it ignored, and a run keeps an ignored SIGINT ignored. The usual umask (022), so that the
    # checkpoint's modes read the same whatever the suite's own umask (under 077 they equal mkdtemp's anyway).
    def as_from_a_terminal():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.umask(0o022)

    process = subprocess.Popen([sys.executable, "-m", "unlearn", "run", *map(str, args), "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **ENV, **(env or {})}, preexec_fn=as_from_a_terminal)
    deadline = time.monotonic() + 120
    def reached_step_3():
        return any(int(p.name.split("-")[1]) >= 3 for p in (out / "checkpoints").glob("step-*"))

    while not reached_step_3():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def killed(tmp_path_factory, data, llama_dir):
    """`killed(setting, out)`: OUT holds a copy of what a run of SETTING SIGKILLed at step 3 or later left, and the
    test's UNLEARN_CACHE a copy of what it left there; its CompletedProcess is returned. Shared: the three tests
    of "no-checks" each killed an identical process, then read or resumed what it left; each now has its own
    copies, so none sees another's changes (a resume's result, a refused resume's)."""
    runs = {}

    def get(setting, out: Path) -> subprocess.CompletedProcess:
        if setting not in runs:
            left = tmp_path_factory.mktemp(f"killed-{setting}")
            args = [*data, "--model", llama_dir, *BASE, *SETTINGS[setting]]
            runs[setting] = left, start_and_stop(args, left / "out", signal.SIGKILL,
                                                 env={"UNLEARN_CACHE": str(left / "cache")})
        left, process = runs[setting]
        shutil.copytree(left / "out", out, symlinks=True)
        if (left / "cache").exists():
            shutil.copytree(left / "cache", os.environ["UNLEARN_CACHE"], symlinks=True, dirs_exist_ok=True)
        return process

    return get


def assert_same_adapter(out: Path, expected: dict) -> None:
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    assert set(got) == set(expected)
    for key in got:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_killed_run_resumes_to_identical_weights(tmp_path, data, llama_dir, reference, killed, cli, setting):
    args = [*data, "--model", llama_dir, *BASE, *SETTINGS[setting]]
    out = tmp_path / "out"
    assert killed(setting, out).returncode == -signal.SIGKILL
    assert not (out / "adapter").exists() and not (out / "run.json").exists()
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert steps and steps[-1] < 40
    (out / "checkpoints" / ".tmp-step-99-junk").mkdir()  # as a kill in the middle of a write leaves

    resumed = cli("run", *args, "-o", out, "--resume")
    assert resumed.code == 0, resumed.err
    assert f"resuming from {out / 'checkpoints' / f'step-{steps[-1]}'}" in resumed.err
    assert_same_adapter(out, reference(setting))
    record = json.loads((out / "run.json").read_text())
    assert record["steps"] == len(record["history"]) and [h["step"] for h in record["history"]] == list(
        range(1, record["steps"] + 1))
    # the wall clock is this process's, training counts every process: the table says so, with no rest
    assert record["resumed_from"] == str(out / "checkpoints" / f"step-{steps[-1]}")
    assert "this process, resumed" in resumed.out and "reading and writing" not in resumed.out
    assert not (out / "checkpoints").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.slow
@pytest.mark.parametrize("sent, code, said", [(signal.SIGINT, 130, "interrupted"),
                                              # (review 117) what `timeout` or a cancelled CI job sends: it lost
                                              # the training, where a Ctrl-C kept it
                                              (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_finishes_the_step_saves_and_says_how_to_resume(tmp_path, data, llama_dir, reference, cli, sent, code,
                                                               said):
    args = [*data, "--model", llama_dir, *BASE, *SETTINGS["no-checks"]]
    out = tmp_path / "out"
    stopped = start_and_stop(args, out, sent)
    assert stopped.returncode == code, stopped.stderr
    last = stopped.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith(f"unlearn: {said} after step ") and last.endswith(f"-o {out} --resume"), last
    assert "Traceback" not in stopped.stderr
    step = int(last.split("after step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step-{step}" / "state.json").is_file()
    assert not (out / "adapter").exists()

    resumed = cli("run", *args, "-o", out, "--resume")
    assert resumed.code == 0, resumed.err
    assert_same_adapter(out, reference("no-checks"))


@pytest.mark.parametrize("signal_raised, where, extra", [
    ("ctrl-c", "measure_after", []), ("sigterm", "measure_after", []),
    # α averaging scales the adapters in place, and writing folds them into the model: the state saved is the
    # trained one, taken when training ended (saved after averaging, a resumed run averaged it twice: ×0.25)
    ("ctrl-c", "measure_after", ["--alpha", "0.5"]), ("ctrl-c", "save_model", []),
])
def test_an_interrupt_after_training_keeps_the_trained_model_as_a_checkpoint(tmp_path, data, llama_dir, cli,
                                                                               monkeypatch, signal_raised, where,
                                                                               extra):
    """A Ctrl-C while the trained model is measured or written lost the training, with only "unlearn:
    interrupted" said: the trained state is saved, and --resume writes the result from it."""
    import unlearn.run as run_module
    from unlearn.errors import Terminated

    args = [*data, "--model", llama_dir, "--max-steps", "3", "--max-new-tokens", "4", "--batch-size", "2",
            "--lr", "1e-2", "--check-every", "0", *extra]
    straight = cli("run", *args, "-o", tmp_path / "straight", "--json")
    assert straight.code == 0, straight.err
    owner = run_module if where == "measure_after" else run_module.models
    real = getattr(owner, where)

    def interrupted(*a, **k):
        raise KeyboardInterrupt if signal_raised == "ctrl-c" else Terminated(signal.SIGTERM)

    out = tmp_path / "out"
    monkeypatch.setattr(owner, where, interrupted)
    stopped = cli("run", *args, "-o", out)
    assert stopped.code == (130 if signal_raised == "ctrl-c" else 143), stopped.err
    said = [line for line in stopped.err.splitlines() if line.startswith("unlearn:")]
    assert said[0].startswith("unlearn: interrupted after training (step 3), before the result was written; saved ")
    assert said[0].endswith(f"-o {out} --resume") and len(said) == (1 if signal_raised == "ctrl-c" else 2)
    assert (out / "checkpoints" / "step-3" / "state.json").is_file() and not (out / "adapter").exists()
    monkeypatch.setattr(owner, where, real)
    resumed = cli("run", *args, "-o", out, "--resume", "--json")
    assert resumed.code == 0, resumed.err
    assert_same_adapter(out, load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    assert json.loads(resumed.out)["after"] == json.loads(straight.out)["after"]


@pytest.mark.slow
def test_checkpoint_holds_only_safetensors_and_json(tmp_path, killed):
    out = tmp_path / "out"
    assert killed("no-checks", out).returncode == -signal.SIGKILL
    step = max((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))  # step-10 after step-9
    assert sorted(p.name for p in step.iterdir()) == ["optimizer.safetensors", "rng.safetensors", "state.json",
                                                      "trainable.safetensors"]
    state = json.loads((step / "state.json").read_text())
    for key in ("step", "python_rng", "forget_order", "normal_order", "loop", "args"):
        assert key in state
    optimizer = load_file(step / "optimizer.safetensors")
    assert {k.split("::")[1] for k in optimizer} == {"step", "exp_avg", "exp_avg_sq"}
    assert len(list((out / "checkpoints").glob("step-*"))) <= 3  # old ones are pruned (2 kept, +1 mid-prune)
    # the umask's permissions (start_and_stop's 022), as the rest of OUT (they were 0700 and 0600)
    assert {p.name: p.stat().st_mode & 0o777 for p in (step, *step.iterdir())} == {
        step.name: 0o755, **{name: 0o644 for name in ("optimizer.safetensors", "rng.safetensors", "state.json",
                                                      "trainable.safetensors")}}


@pytest.mark.slow
def test_resume_refuses_other_arguments(tmp_path, data, llama_dir, killed, cli):
    out = tmp_path / "out"
    args = [*data, "--model", llama_dir, *BASE, *SETTINGS["no-checks"]]
    assert killed("no-checks", out).returncode == -signal.SIGKILL
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    result = cli("run", *args, "--lr", "5e-3", "-o", out, "--resume")
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        "unlearn: --resume: the arguments differ from the checkpointed run's (train.lr: 0.01 then, 0.005 now); "
        "give the same arguments, or start afresh with --force"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    # without --resume: the hint names --resume, not only the --force that would delete the checkpoints
    result = cli("run", *args, "-o", out)
    latest = max((n for n in before if n.startswith("step-")), key=lambda name: int(name.split("-")[1]))
    assert result.code == 2 and result.err.strip().splitlines() == [
        f"unlearn: {out}: holds an interrupted run's checkpoint ({latest}): add --resume to continue it, or --force "
        f"to start afresh (deleting its checkpoints)"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, data, llama_dir, cli):
    out = tmp_path / "out"
    # lr 1e30: step 1 is finite (B starts at zero), then the weights overflow.
    result = cli("run", *data, "--model", llama_dir, "-o", out, "--check-every", "0", "--max-steps", "10",
                 "--batch-size", "2", "--lr", "1e30", "--save-every", "1")
    assert result.code == 1
    last = result.err.replace("\r", "\n").strip().splitlines()[-1]
    # the checkpoint resumes with these settings only (which end here again): a lower --lr starts afresh
    assert last == (f"unlearn: step 2: the loss is nan; stopped without writing the model; "
                    f"the last good checkpoint is {out / 'checkpoints' / 'step-1'} (--resume takes it with these "
                    f"settings only); start again with a lower --lr (under another -o to keep it; --force here replaces it)")
    assert "Traceback" not in result.err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # no model, no adapter, no run.json
    weights = load_file(out / "checkpoints" / "step-1" / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    # --save-every given, but the loss broke before its first save: not "(see --save-every)"
    result = cli("run", *data, "--model", llama_dir, "-o", tmp_path / "early", "--check-every", "0", "--max-steps",
                 "10", "--batch-size", "2", "--lr", "1e30", "--save-every", "5")
    assert result.code == 1 and result.err.strip().splitlines()[-1] == (
        "unlearn: step 2: the loss is nan; stopped without writing the model; no checkpoint was saved before it "
        "(--save-every 5); try a lower --lr")


def test_nonfinite_step_is_refused_before_the_update(llama_dir):
    from test_train import unlearner

    from unlearn.train import NonFiniteLoss

    u = unlearner(llama_dir)
    u.step()
    before = [p.detach().clone() for p in u.params]
    original = u.loss
    u.loss = lambda rows, shares=None: (original(rows, shares)[0] * float("inf"), {})
    with pytest.raises(NonFiniteLoss, match=r"^step 2: the loss is -?inf$"):
        u.step()
    assert all(torch.equal(a, b) for a, b in zip(before, u.params)) and u.step_count == 1


def test_checkpoint_round_trip_in_process(tmp_path, llama_dir):
    """2 steps, save, a fresh Unlearner loads and does 2 more == 4 steps straight (weights and data order)."""
    from test_train import unlearner

    from unlearn.checkpoints import load_checkpoint, save_checkpoint

    straight = unlearner(llama_dir)
    for _ in range(4):
        straight.step()
    first = unlearner(llama_dir)
    first.step(), first.step()
    saved = save_checkpoint(tmp_path, first, {"history": []}, {})
    assert saved == tmp_path / "checkpoints" / "step-2"
    torch.manual_seed(123)  # whatever happens in between, the checkpoint restores the generator
    second = unlearner(llama_dir)
    assert load_checkpoint(saved, second) == {"history": []}
    second.step(), second.step()
    # the resumed run ran the original on the normal rows once more (reference_cache.py): in the groups
    # the first run chose, which the checkpoint carries, so the weights are the same to the bit (step 2's
    # rows lead them: step 1 runs no KL, the model being the original then)
    assert second.reference_cache.groups == first.reference_cache.groups == {"normal": [[2, 3], [0, 1]]}
    # the first run's original forwards up to its checkpoint (step 2's group) run again after the resume
    rerun = sum(len(straight.normal[i]["input_ids"]) for i in first.reference_cache.groups["normal"][0])
    assert second.step_count == 4 and second.tokens == straight.tokens + rerun
    assert all(torch.equal(a, b) for a, b in zip(straight.params, second.params))


def test_the_margins_likeliest_row_is_resumed(tmp_path, llama_dir):
    """The margin reads the row it found likeliest last alone first; a resumed run read every row together,
    the same verdict with the logged p rounded otherwise (7th digit): the row is in the checkpoint."""
    from test_train import unlearner

    from unlearn.checkpoints import load_checkpoint, save_checkpoint

    first = unlearner(llama_dir)
    first.step()
    first._likeliest_row = 2  # what a check sets (`likeliest_forget_answer`)
    saved = save_checkpoint(tmp_path, first, {"history": []}, {})
    second = unlearner(llama_dir)
    load_checkpoint(saved, second)
    assert second._likeliest_row == 2

def test_npo_resumed_trains_on_the_same_kept_reference_numbers(tmp_path, llama_dir):
    """NPO keeps each forget row's original log-probability, computed in fixed groups of rows: a resumed
    run computes them again the same way, so its weights equal a run never stopped, to the bit."""
    from test_train import unlearner

    from unlearn.checkpoints import load_checkpoint, save_checkpoint

    straight = unlearner(llama_dir, method="npo")
    for _ in range(4):
        straight.step()
    first = unlearner(llama_dir, method="npo")
    first.step(), first.step()
    saved = save_checkpoint(tmp_path, first, {"history": []}, {})
    second = unlearner(llama_dir, method="npo")
    load_checkpoint(saved, second)
    second.step(), second.step()
    assert all(torch.equal(a, b) for a, b in zip(straight.params, second.params))


def test_disk_full_while_saving_leaves_no_output(tmp_path, data, llama_dir, monkeypatch, cli):
    import safetensors.torch
    import transformers.modeling_utils

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    out = tmp_path / "out"
    captured = cli("run", *data, "--model", llama_dir, "-o", out, "--check-every", "0", "--max-steps", "2",
                   "--max-new-tokens", "4", "--batch-size", "2")
    assert captured.code == 1
    assert captured.err.replace("\r", "\n").strip().splitlines()[-1] == (
        f"unlearn: {out}: could not write the output (No space left on device); nothing was written")
    assert list(tmp_path.iterdir()) == []  # no OUT, no temporary directory
    assert captured.out == ""


@pytest.mark.parametrize("raised", ["os", "safetensors"])
def test_disk_full_while_checkpointing_keeps_earlier_checkpoints(tmp_path, data, llama_dir, monkeypatch, cli, raised):
    import safetensors.torch
    from safetensors import SafetensorError

    real, calls = safetensors.torch.save_file, []

    def fails_on_the_third_checkpoint(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if "step-3" in filename:  # safetensors reports a full disk with its own error (was an internal error)
            raise OSError(28, "No space left on device") if raised == "os" else SafetensorError(
                "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fails_on_the_third_checkpoint)
    out = tmp_path / "out"
    captured = cli("run", *data, "--model", llama_dir, "-o", out, "--check-every", "0", "--max-steps", "5",
                   "--max-new-tokens", "4", "--batch-size", "2", "--save-every", "1")
    assert captured.code == 1
    assert captured.err.replace("\r", "\n").strip().splitlines()[-1] == (
        f"unlearn: {out / 'checkpoints' / 'step-3'}: could not write the checkpoint (No space left on device); "
        f"earlier checkpoints are intact")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]


# --- security ----------------------------------------------------------------


def test_trust_remote_code_is_off_unless_asked(llama_dir, monkeypatch):
    import transformers

    from unlearn import models

    seen = []
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def spy(real):
        def wrapped(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy(real_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy(real_tok))
    models.load_model(str(llama_dir), log=lambda m: None)
    assert seen == [False, False]
    seen.clear()
    models.load_model(str(llama_dir), trust_remote_code=True, log=lambda m: None)
    assert seen == [True, True]


def test_cli_passes_trust_remote_code_through(monkeypatch, tmp_path, data, llama_dir, cli):
    # Seen where it matters, at transformers' loader. --lora-targets nope stops the run once the
    # model is loaded (exit 2), before any training.
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    for flag, expected in (([], False), (["--trust-remote-code"], True)):
        seen.clear()
        code, _, err = cli("run", *data, "--model", llama_dir, "-o", tmp_path / "o", "--lora-targets", "nope", *flag)
        assert code == 2 and "no module of this model has that name" in err, err
        assert seen and set(seen) == {expected}


class _Payload:
    """Unpickling this runs code: what a malicious .bin does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_model(tmp_path, llama_dir, state) -> Path:
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(llama_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")  # test input only: the product never writes pickles
    return folder


def test_pickle_weights_refused_without_allow_pickle(tmp_path, llama_dir):
    from unlearn.errors import UnlearnError
    from unlearn.models import load_model

    folder = _pickle_model(tmp_path, llama_dir, load_file(llama_dir / "model.safetensors"))
    with pytest.raises(UnlearnError, match="pickle files"):
        load_model(str(folder), log=lambda m: None)
    loaded = load_model(str(folder), allow_pickle=True, log=lambda m: None)  # a plain state dict loads
    assert loaded.model is not None


def test_allowed_pickle_is_loaded_with_weights_only(tmp_path, llama_dir):
    from unlearn.errors import UnlearnError
    from unlearn.models import load_model

    marker = tmp_path / "pwned"
    state = {**load_file(llama_dir / "model.safetensors"), "evil": _Payload(marker)}
    folder = _pickle_model(tmp_path, llama_dir, state)
    with pytest.raises(UnlearnError, match="refused to load the pickle weights") as error:
        load_model(str(folder), allow_pickle=True, log=lambda m: None)
    assert "\n" not in str(error.value)
    assert not marker.exists()  # weights_only=True refused to run the payload


def test_the_package_never_writes_pickles():
    package = Path(__file__).parent.parent / "unlearn"
    for source in package.glob("*.py"):
        text = source.read_text()
        assert "torch.save(" not in text and "pickle.dump" not in text, source


def test_the_first_difference_names_the_setting_and_both_values():
    from unlearn.run import _first_difference

    assert _first_difference("train", {"lr": 0.01, "seed": 0}, {"lr": 0.005, "seed": 0}) == \
        "train.lr: 0.01 then, 0.005 now"
    assert _first_difference("lora", {"rank": 8, "layers": {"a": 1}}, {"rank": 8, "layers": {"a": 2}}) == \
        "lora.layers.a: 1 then, 2 now"
    assert _first_difference("retain_probes", 12, None) == "retain_probes: 12 then, null now"


def test_resume_names_the_option_changed_before_the_training_default_it_chose():
    from unlearn.run import _resume_difference

    saved = {"train": {"lr": 0.01, "retain_weight": 50.0}, "retain_probes": 12, "save_every": 1}
    now = {"train": {"lr": 0.01, "retain_weight": 10.0}, "retain_probes": None, "save_every": 0}
    assert _resume_difference(saved, now) == "retain_probes: 12 then, null now"  # --no-probes, not its weight
    assert _resume_difference(saved, {**saved, "save_every": 0}) is None
    assert _resume_difference(saved, {**saved, "train": {"lr": 0.02, "retain_weight": 50.0}}) == "train.lr: 0.01 then, 0.02 now"


def test_a_state_write_cut_short_leaves_no_empty_checkpoints_directory(tmp_path, monkeypatch):
    """A second Ctrl-C during the save after training left OUT/checkpoints/ empty, which held OUT against a new
    run without --force."""
    import unlearn.checkpoints as checkpoints

    def cut(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.safetensors.torch, "save_file", cut)
    state = {"weights": {}, "optimizer_tensors": {}, "torch_rng": {}, "step": 3}
    with pytest.raises(KeyboardInterrupt):
        checkpoints.write_state(tmp_path, state, {"history": []}, {})
    assert not (tmp_path / "checkpoints").exists()


def test_an_interrupt_after_a_full_run_names_the_last_checkpoint(tmp_path, data, llama_dir, cli, monkeypatch):
    """--full keeps no copy of its trained weights (the whole model): an interrupt after training said only
    "interrupted" though --save-every had written the last step's checkpoint, from which --resume writes the
    result."""
    def said_the_last_checkpoint(stopped, out):
        said = [line for line in stopped.err.splitlines() if line.startswith("unlearn:")]
        assert said == [f"unlearn: interrupted after training (step 3), before the result was written; the last "
                        f"checkpoint is {out / 'checkpoints' / 'step-3'}; to continue from it: "
                        + said[0].split("to continue from it: ")[1]] and said[0].endswith(f"-o {out} --resume")

    want, got = straight_and_resumed(cli, [*data, "--model", llama_dir, "--full", "--max-steps", "3",
                                           "--max-new-tokens", "4", "--batch-size", "2", "--check-every", "0",
                                           "--save-every", "1"], tmp_path, monkeypatch, said_the_last_checkpoint)
    assert got["after"] == want["after"]


def straight_and_resumed(cli, args, tmp_path, monkeypatch, on_stop=None) -> tuple[dict, dict]:
    """run.json of ARGS run straight, and of the same run interrupted after training (Ctrl-C before the result is
    measured: the trained state saved as a checkpoint) and continued with --resume; ON_STOP(result, output
    directory) reads the interrupted run's result."""
    import unlearn.run as run_module

    straight = cli("run", *args, "-o", tmp_path / "straight")
    assert straight.code == 0, straight.err
    real = run_module.measure_after

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(run_module, "measure_after", interrupted)
    stopped = cli("run", *args, "-o", out)
    assert stopped.code == 130, stopped.err
    if on_stop is not None:
        on_stop(stopped, out)
    monkeypatch.setattr(run_module, "measure_after", real)
    resumed = cli("run", *args, "-o", out, "--resume")
    assert resumed.code == 0, resumed.err
    return tuple(json.loads((d / "run.json").read_text()) for d in (tmp_path / "straight", out))


def test_a_run_the_stop_rule_ended_resumes_without_training_past_its_stop(tmp_path, data, llama_dir, cli, monkeypatch):
    # --stop-leak 1: every check finds the forget set forgotten, so the rule ends the run at the first check
    want, got = straight_and_resumed(cli, [*data, "--model", llama_dir, "--max-steps", "6", "--max-new-tokens", "4",
                                           "--batch-size", "2", "--lr", "1e-2", "--check-every", "2",
                                           "--stop-leak", "1"], tmp_path, monkeypatch)
    assert want["steps"] < 6 and want["stopped_by"] == "forgotten"
    assert (got["steps"], got["stopped_by"]) == (want["steps"], want["stopped_by"])


def test_a_second_ctrl_c_while_the_trained_state_is_saved_names_the_last_checkpoint(tmp_path, data, llama_dir, cli,
                                                                                      monkeypatch):
    """The save after an interrupt can itself be interrupted (a second Ctrl-C): the line then names the last
    checkpoint --save-every wrote, as when the save fails."""
    import unlearn.run as run_module

    args = [*data, "--model", llama_dir, "--max-steps", "3", "--max-new-tokens", "4", "--batch-size", "2",
            "--check-every", "0", "--save-every", "1"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(run_module, "measure_after", interrupted)
    monkeypatch.setattr(run_module, "write_state", interrupted)
    stopped = cli("run", *args, "-o", out)
    assert stopped.code == 130, stopped.err
    said = [line for line in stopped.err.splitlines() if line.startswith("unlearn:")]
    assert len(said) == 1 and said[0].startswith(
        f"unlearn: interrupted after training (step 3), before the result was written; the last checkpoint is "
        f"{out / 'checkpoints' / 'step-3'}; to continue from it: ") and said[0].endswith(f"-o {out} --resume")


def test_a_run_resumed_after_an_interrupt_after_training_keeps_its_checks_history(tmp_path, data, llama_dir, cli,
                                                                                   monkeypatch):
    """The checkpoint saved after training holds the loop's state: the stop rule's checks (run.json's history)
    and how the run stopped come back with --resume, as the uninterrupted run wrote them."""
    want, got = straight_and_resumed(cli, [*data, "--model", llama_dir, "--max-steps", "3", "--max-new-tokens", "4",
                                           "--batch-size", "2", "--lr", "1e-2", "--check-every", "1"],
                                     tmp_path, monkeypatch)
    assert want["history"] and [r["step"] for r in got["history"]] == [r["step"] for r in want["history"]]
    assert (got["steps"], got["stopped_by"]) == (want["steps"], want["stopped_by"])


def test_a_checkpoint_from_before_the_anchors_resumes_when_the_run_makes_none():
    """Checkpoints written before the anchors (anchors.py) lack the key: those versions made none, so a run that
    makes none resumes them, and one that would make some is refused with the option that makes none."""
    from unlearn.run import _resume_difference

    before = {"train": {"lr": 0.01}, "retain_probes": 12, "save_every": 1}
    assert _resume_difference(before, {**before, "anchors": False}) is None
    assert _resume_difference(before, {**before, "anchors": True}) == \
        "anchors: false then, true now (--no-anchors makes none)"
    # a run with --no-anchors, or passages checkpointed by the version that anchored them (no option makes them now)
    assert _resume_difference({**before, "anchors": True}, {**before, "anchors": False}) == (
        "anchors: true then, false now (the checkpointed run trained on anchors this run does not make: with "
        "--no-anchors given, drop it; a forget set of passages gets none from this version on, so start afresh with "
        "--force)")


def test_a_sigint_the_caller_ignores_stays_ignored_through_training():
    """A shell without job control starts background jobs with SIGINT ignored; Python keeps it so, and the
    training overrode it: Ctrl-C at the terminal stopped the script's background run in training, not after."""
    from unlearn.train import _DeferredInterrupt

    saved = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with _DeferredInterrupt() as interrupt:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert not interrupt.requested
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with _DeferredInterrupt() as interrupt:  # from a terminal: the step finishes, then the run stops
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert interrupt.requested
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, saved)
