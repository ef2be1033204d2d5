"""Training checkpoints: everything needed to continue a run exactly where it stopped.

`OUT/checkpoints/step-N/` holds
    trainable.safetensors   the trainable weights (LoRA A/B, or every weight with --full)
    optimizer.safetensors   the optimiser's per-parameter tensors (AdamW: step, exp_avg, exp_avg_sq)
    rng.safetensors         torch's CPU generator state (dropout); under torchrun each rank's
    state.json              step, token count, the Python RNG state, the data order
                            (each stream's remaining `order`), the stop rule's state,
                            the history so far, and the run's arguments (checked on --resume)
Only safetensors and JSON: loading a checkpoint never unpickles anything.

A checkpoint is written into a hidden temporary directory beside its final place
and renamed into place when complete, so `step-N/` is always whole; a run killed
mid-write leaves only a `.tmp-*` directory, which resume ignores and removes.
The two most recent checkpoints are kept.

Under torchrun (DDP or FSDP) the format is the same: whole tensors (FSDP's shards are
gathered) written by rank 0, read by every rank, which cuts its own shard again. So a
checkpoint resumes under any number of processes that divides --batch-size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
from safetensors import SafetensorError


from unlearn import distributed
from unlearn.errors import UnlearnError
from unlearn.outputs import usual_modes

CHECKPOINTS = "checkpoints"
KEEP = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output: Path) -> Path:
    return Path(output) / CHECKPOINTS


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in OUTPUT, oldest first."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / "state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output: Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1][1] if found else None


def read_state(directory: Path) -> dict:
    path = Path(directory) / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: cut JSON, or a stray byte (UnicodeDecodeError)
        raise UnlearnError(f"{path}: not a readable checkpoint state ({exc})") from None
    if not isinstance(state, dict):
        raise UnlearnError(f"{path}: not a readable checkpoint state (a JSON {type(state).__name__}, not an object)")
    return state


TENSOR_FILES = {"weights": "trainable.safetensors", "optimizer_tensors": "optimizer.safetensors",
                "torch_rng": "rng.safetensors"}


def save_checkpoint(output: Path, unlearner, loop: dict, run_args: dict) -> Path:
    """Write UNLEARNER's state (after its last step) and the loop's; return the checkpoint directory.

    Under torchrun every rank calls this (`Unlearner.state_dict` gathers FSDP's shards, a
    collective), so the checkpoint has the same format whatever the number of processes;
    rank 0 alone writes it, and every rank learns whether that worked (distributed.on_main).
    """
    state = unlearner.state_dict()
    return distributed.on_main(lambda: _write_checkpoint(output, state, loop, run_args))


def write_state(output: Path, state: dict, loop: dict, run_args: dict) -> Path:
    """Write STATE (an `Unlearner.state_dict()` taken earlier) as a checkpoint, in this process; return its
    directory. A write that does not finish (a second Ctrl-C) leaves no empty checkpoints directory behind,
    which would hold OUT against a new run without --force."""
    try:
        return _write_checkpoint(output, state, loop, run_args)
    except BaseException:
        root = checkpoint_root(output)
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        raise


def _write_checkpoint(output: Path, state: dict, loop: dict, run_args: dict) -> Path:
    root = checkpoint_root(output)
    root.mkdir(parents=True, exist_ok=True)
    step = state["step"]
    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root))
    try:
        for key, name in TENSOR_FILES.items():
            safetensors.torch.save_file(state[key], str(tmp / name))
        scalars = {k: v for k, v in state.items() if k not in TENSOR_FILES}
        (tmp / "state.json").write_text(json.dumps({**scalars, "loop": loop, "args": run_args}, default=str) + "\n")
        # A checkpoint lives in OUT, whose files get the umask's permissions (README, outputs.usual_modes);
        # mkdtemp's 0700 and safetensors' 0600 had kept it private from the users who may read the rest of OUT.
        usual_modes(tmp)
        if final.exists():  # a stale copy of this very step (e.g. from before a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):  # safetensors says a full disk with its own error
            raise UnlearnError(f"{final}: could not write the checkpoint ({getattr(exc, 'strerror', None) or exc}); "
                               f"earlier checkpoints are intact") from None
        raise
    for _, old in list_checkpoints(output)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial(output: Path) -> None:
    """Delete checkpoints that a killed run left half-written."""
    root = checkpoint_root(output)
    if root.is_dir():
        for child in root.glob(".tmp-step-*"):
            shutil.rmtree(child, ignore_errors=True)


def _load(path: Path) -> dict:
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as exc:  # a truncated or foreign file: one line, not a traceback
        raise UnlearnError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def load_checkpoint(directory: Path, unlearner) -> dict:
    """Restore UNLEARNER to the checkpoint in DIRECTORY; return the loop state saved with it."""
    directory = Path(directory)
    state = read_state(directory)
    for key, name in TENSOR_FILES.items():
        state[key] = _load(directory / name)
    state.setdefault("optimizer_scalars", {})
    try:
        unlearner.load_state_dict(state, where=str(directory))
        loop = state["loop"]
        for batches in (unlearner.forget_batches, unlearner.normal_batches, unlearner.retain_batches):
            # a row order naming rows the run does not have would fail steps later, with no file named
            if not set(batches.order) <= set(range(batches.n)) or len(set(batches.order)) != len(batches.order):
                raise ValueError("a row order is not one of the run's rows")
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # an edited or foreign state
        raise UnlearnError(f"{directory / 'state.json'}: not a readable checkpoint state "
                           f"({type(exc).__name__}: {exc})") from None
    return loop
