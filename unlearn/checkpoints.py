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
import torch

from unlearn import distributed
from unlearn.errors import UnlearnError

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
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UnlearnError(f"{path}: not a readable checkpoint state ({exc})") from None


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output: Path, unlearner, loop: dict, run_args: dict) -> Path:
    """Write the state of UNLEARNER (after its last step) and of the loop; return the checkpoint directory.

    Under torchrun every rank calls this: FSDP's shards are gathered into whole tensors (a
    collective), so the checkpoint has the same format whatever the number of processes;
    rank 0 alone writes it, and every rank learns whether that worked (distributed.on_main).
    """
    params = _trainable(unlearner.model)
    weights = {name: distributed.full(p.detach()).cpu().contiguous() for name, p in params.items()}
    optimizer_tensors, optimizer_scalars = {}, {}
    for name, p in params.items():
        for key, value in unlearner.optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                optimizer_tensors[f"{name}::{key}"] = distributed.full(value.detach()).cpu().contiguous()
            else:
                optimizer_scalars[f"{name}::{key}"] = value
    rng = distributed.rng_states()
    tokens = distributed.total(unlearner.tokens)  # every process's count (rank 0 carries it on resume)
    return distributed.on_main(lambda: _write_checkpoint(output, unlearner, loop, run_args, params, weights,
                                                         optimizer_tensors, optimizer_scalars, rng, tokens))


def _write_checkpoint(output, unlearner, loop, run_args, params, weights, optimizer_tensors, optimizer_scalars,
                      rng, tokens) -> Path:
    root = checkpoint_root(output)
    root.mkdir(parents=True, exist_ok=True)
    step = unlearner.step_count
    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root))
    try:
        index = {id(p): i for i, p in enumerate(unlearner.params)}
        safetensors.torch.save_file(weights, str(tmp / "trainable.safetensors"))
        safetensors.torch.save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
        safetensors.torch.save_file(rng, str(tmp / "rng.safetensors"))
        version, internal, gauss = unlearner.rng.getstate()
        state = {
            "step": step,
            "tokens": tokens,
            "python_rng": [version, list(internal), gauss],
            "forget_order": list(unlearner.forget_batches.order),
            "normal_order": list(unlearner.normal_batches.order),
            "optimizer_scalars": optimizer_scalars,
            "param_order": sorted(params, key=lambda n: index.get(id(params[n]), -1)),
            "loop": loop,
            "args": run_args,
        }
        (tmp / "state.json").write_text(json.dumps(state, default=str) + "\n")
        if final.exists():  # a stale copy of this very step (e.g. from before a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UnlearnError(f"{final}: could not write the checkpoint ({exc.strerror or exc}); "
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


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as exc:  # a truncated or foreign file: one line, not a traceback
        raise UnlearnError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def load_checkpoint(directory: Path, unlearner) -> dict:
    """Restore UNLEARNER to the checkpoint in DIRECTORY; return the loop state saved with it."""
    directory = Path(directory)
    state = read_state(directory)
    params = _trainable(unlearner.model)
    weights = _load(directory / "trainable.safetensors")
    if set(weights) != set(params):
        missing = sorted(set(params) - set(weights)) or sorted(set(weights) - set(params))
        raise UnlearnError(f"{directory}: the checkpoint's weights do not match this model (e.g. {missing[0]})")
    with torch.no_grad():
        for name, p in params.items():
            if weights[name].shape != p.shape:
                raise UnlearnError(f"{directory}: {name} has shape {tuple(weights[name].shape)}, "
                                   f"expected {tuple(p.shape)}")
            p.copy_(distributed.shard_like(weights[name], p))  # under FSDP: this rank's shard
    tensors = _load(directory / "optimizer.safetensors")
    scalars = state.get("optimizer_scalars", {})
    optimizer_state = {}
    for i, p in enumerate(unlearner.params):
        name = next(n for n, q in params.items() if q is p)
        entry = {key.split("::", 1)[1]: distributed.shard_like(value, p) if torch.is_tensor(value) else value
                 for key, value in {**tensors, **scalars}.items() if key.split("::", 1)[0] == name}
        if entry:
            optimizer_state[i] = entry
    saved = unlearner.optimizer.state_dict()
    saved["state"] = optimizer_state
    unlearner.optimizer.load_state_dict(saved)
    rng = _load(directory / "rng.safetensors")
    torch.random.set_rng_state(distributed.my_rng_state(rng))
    version, internal, gauss = state["python_rng"]
    unlearner.rng.setstate((version, tuple(internal), gauss))
    unlearner.forget_batches.order = list(state["forget_order"])
    unlearner.normal_batches.order = list(state["normal_order"])
    unlearner.step_count = int(state["step"])
    unlearner.tokens = int(state["tokens"]) if distributed.world().is_main else 0  # summed over ranks at the end
    return state["loop"]
