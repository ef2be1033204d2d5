"""`unlearn run` under torchrun: one process per device, DDP or FSDP, one result.

Launched by `torchrun --nproc-per-node K -m unlearn run ...` (or multi-node torchrun),
every process runs the same `unlearn run`; this module is all that makes them one run.
Without torchrun's environment (WORLD_SIZE unset or 1) nothing here does anything:
no process group, no wrapper, every helper is the identity, and a single-process run
is exactly what it was.

The design, in the order a run meets it:

- World and lifetime. `session()` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK,
  picks the device (cuda:LOCAL_RANK with backend nccl, else the CPU with gloo),
  starts the process group (MASTER_ADDR / MASTER_PORT, set by torchrun) and always
  destroys it on the way out, errors included. Ranks other than 0 have their
  stdout and stderr sent to /dev/null for the whole process (progress bars,
  library warnings, the final table, error lines): the user sees rank 0 only.
  Their unexpected crashes still get one line on the real stderr.

- Agreement. Every decision that could differ between ranks is taken once and
  shared: `on_main(fn)` runs FN (checking or preparing the output directory,
  writing a checkpoint or the outputs) on rank 0 only and hands its value, or its
  error, to every rank, so a failure on rank 0 raises everywhere instead of leaving
  the others waiting in a collective; `main_decides(fn)` runs FN everywhere (the
  stop rule's generation needs every rank under FSDP) and keeps rank 0's answer;
  `any_rank()` makes a Ctrl-C seen by one rank stop all of them at the same step.
  Errors in the input (data, options) are found identically by every rank before
  the first collective, so they need no agreement.

- Data. `--batch-size` stays the GLOBAL number of forget (and normal) rows per
  micro-batch. Every rank draws the same global batch from the same seeded stream
  (`train.Batches`, and the same random mismatch responses), and `shard_rows` keeps
  its contiguous share: rank r takes rows [r*B/K, (r+1)*B/K). The union of the
  shares is the single-process batch. torch's DistributedSampler does not fit: it
  shuffles each epoch with its own generator and pads to equal shards, so it could
  not reproduce the single-process order; sharding the one global stream can.

- Gradients. DDP (models that fit on one device) replicates the model and averages
  gradients; FSDP2 (`fully_shard`, `--fsdp`) shards parameters, gradients and
  optimiser state per transformer block and also averages. An average of per-rank
  means is the global mean only when every rank's mean is over as many units, so
  terms that average over a varying number of units (the KL over response tokens,
  the forget NLL over rows with scored tokens) go through `global_mean`, which
  scales each rank's term by count_r * K / sum(count): the averaged gradient is then
  the gradient of the global mean. Logged terms are averaged over ranks
  (`average`), giving the global batch's values. Gradient clipping sees the global
  gradient: DDP's gradients are already averaged, and FSDP's are DTensors whose
  norm `clip_grad_norm_` reduces over the shards.

- The reference model. With LoRA it is the same weights with the adapters off.
  `adapters_disabled` toggles flags on the LoRALinear modules, which DDP wraps
  (`.module`) and FSDP2 leaves in place, so it works on the unwrapped model.
  Under DDP the reference forward goes through the unwrapped module, under no_grad:
  it never touches DDP's reducer.

- Checkpoints have one format whatever the number of processes: full (gathered)
  trainable weights and optimiser tensors, written by rank 0 (`full`), loaded by
  every rank and re-sharded locally (`shard_like`). So a checkpoint of a K-process
  run resumes under K processes, or one, or another K that divides the batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

from unlearn.errors import UnlearnError, UsageError


@dataclass(frozen=True)
class World:
    """This process's place in the run; the default is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    fsdp: bool = False
    device: torch.device | None = None
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict | None:
        """What run.json records about the processes (None for a single process)."""
        if not self.active:
            return None
        return {"processes": self.size, "wrapper": "fsdp" if self.fsdp else "ddp", "backend": self.backend}


_WORLD = World()


def world() -> World:
    return _WORLD


class ElsewhereError(UnlearnError):
    """The error another rank (rank 0) raised, re-raised here so that every rank stops."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise UsageError(f"torchrun: {name} is not set (WORLD_SIZE is; launch with torchrun)")
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"torchrun: {name}={value!r} is not a number") from None


def _pick_device(requested: str | None, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is there (or asked for), else the CPU."""
    if requested in (None, "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if requested in (None, "cpu"):
        return torch.device("cpu")
    if requested == "cuda":
        raise UsageError("--device cuda: CUDA is not available")
    raise UsageError(f"--device {requested}: under torchrun each process uses cuda:LOCAL_RANK or the CPU; "
                     f"give --device cuda or --device cpu")


@contextlib.contextmanager
def session(fsdp: bool = False, device: str | None = None):
    """Join torchrun's process group for the body; yield the World (a single process without torchrun)."""
    global _WORLD
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        if fsdp:
            raise UsageError("--fsdp shards the model across processes: launch with torchrun --nproc-per-node K "
                             "(K > 1) -m unlearn run ...")
        yield _WORLD
        return
    import torch.distributed as dist

    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    # Errors that every rank meets alike (options, data) are said once, by rank 0. Another rank
    # failing alone (a file missing on one machine) shows in torchrun's report; UNLEARN_DEBUG=1
    # lets every rank print.
    saved_stderr = _silence() if rank != 0 and os.environ.get("UNLEARN_DEBUG") != "1" else None
    where = _pick_device(device, local_rank)
    backend = "nccl" if where.type == "cuda" else "gloo"
    if where.type == "cuda":
        torch.cuda.set_device(where)
    try:
        # Generous, but finite: a rank that died without torchrun noticing cannot hold the others forever.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=where if where.type == "cuda" else None)
    except (ValueError, RuntimeError) as exc:
        raise UnlearnError(f"torch.distributed: could not join the process group ({exc})") from None
    _WORLD = World(rank=rank, size=size, local_rank=local_rank, fsdp=fsdp, device=where, backend=backend)
    try:
        yield _WORLD
    except Exception as exc:
        if saved_stderr is not None and not isinstance(exc, UnlearnError):
            # Not an error every rank shares (those rank 0 reports): this rank's own crash.
            first = (str(exc).strip().splitlines() or [""])[0]
            os.write(saved_stderr, f"unlearn: rank {rank}: internal error: {type(exc).__name__}: {first}\n".encode())
        raise
    finally:
        _WORLD = World()
        dist.destroy_process_group()


def _silence() -> int:
    """Send this process's stdout and stderr to /dev/null (file descriptors, so C++ logs too); return the old stderr."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    return saved


def check_batch_size(batch_size: int) -> None:
    if _WORLD.active and batch_size % _WORLD.size:
        raise UsageError(f"--batch-size {batch_size}: the global batch must split evenly over the {_WORLD.size} "
                         f"processes (a multiple of {_WORLD.size})")


# --- agreement ---------------------------------------------------------------


def broadcast(value):
    """Rank 0's VALUE on every rank (any picklable object)."""
    if not _WORLD.active:
        return value
    import torch.distributed as dist

    box = [value if _WORLD.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn):
    """FN() run on rank 0 only; its value, or its error, reaches every rank."""
    if not _WORLD.active:
        return fn()
    value, error = None, None
    if _WORLD.is_main:
        try:
            value = fn()
        except BaseException as exc:  # noqa: BLE001 - every kind must reach the other ranks, then re-raise
            error = exc
    outcome = broadcast(("ok", value) if error is None else
                        ("error", str(error) or type(error).__name__, getattr(error, "exit_code", 1)))
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise ElsewhereError(f"rank 0: {outcome[1]}", outcome[2])
    return outcome[1]


def main_decides(fn):
    """FN wrapped to run on every rank (its forwards need them all under FSDP) and return rank 0's result."""
    def decided(*args, **kwargs):
        return broadcast(fn(*args, **kwargs))

    return decided if _WORLD.active else fn


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=_WORLD.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when FLAG is true on at least one."""
    if not _WORLD.active:
        return flag
    return _all_reduce([1.0 if flag else 0.0], "max")[0] > 0


def total(count: int) -> int:
    """COUNT summed over the ranks."""
    if not _WORLD.active:
        return count
    return int(round(_all_reduce([float(count)])[0]))


def average(logged: dict[str, float]) -> dict[str, float]:
    """Per-rank logged terms -> the global batch's (their mean over ranks; see `global_mean`)."""
    if not _WORLD.active:
        return logged
    keys = sorted(logged)
    values = _all_reduce([logged[k] for k in keys])
    return {**logged, **{k: v / _WORLD.size for k, v in zip(keys, values)}}


# --- the data and the loss -----------------------------------------------------


def shard_rows(rows: dict[str, list]) -> dict[str, list]:
    """This rank's contiguous share of every group of the global micro-batch."""
    if not _WORLD.active:
        return rows
    share = {}
    for name, group in rows.items():
        n = len(group) // _WORLD.size  # the batch size was checked to divide evenly
        share[name] = group[_WORLD.rank * n:(_WORLD.rank + 1) * n]
    return share


def scored_count(labels: torch.Tensor, unit: str) -> int:
    """How many units a loss averages over in LABELS: "tokens" (response tokens it scores, as
    `losses.kl_loss`) or "rows" (rows with at least one, as `losses.mean_nll`). losses' shift
    applies: position t predicts token t+1, so the first label never counts."""
    from unlearn.losses import IGNORE_INDEX

    scored = labels[:, 1:] != IGNORE_INDEX
    return int(scored.sum() if unit == "tokens" else scored.any(dim=1).sum())


def global_mean(term: torch.Tensor, labels: torch.Tensor, unit: str) -> torch.Tensor:
    """TERM, a mean over this rank's units of LABELS, scaled so that averaging over ranks gives the global mean.

    With count_r units on rank r and N = sum_r count_r, rank r's term becomes mean_r * count_r * K / N;
    the average over the K ranks, which DDP and FSDP take of the gradients and `average` of the
    logged value, is then sum_r mean_r * count_r / N: the mean over every unit of the global
    batch, as one process computes it. A single process gets TERM back untouched.
    """
    if not _WORLD.active:
        return term
    count = scored_count(labels, unit)
    everywhere = _all_reduce([float(count)])[0]
    return term * (count * _WORLD.size / everywhere)


# --- wrapping the model --------------------------------------------------------


def wrap(model, reference_model=None):
    """Prepare MODEL for training in this world; return what the trainable forward must go through.

    DDP: a DistributedDataParallel around MODEL (MODEL itself stays the unwrapped replica,
    for the reference forward, generation, checkpoints and outputs). FSDP: MODEL (and a
    --full reference copy) sharded in place with FSDP2's `fully_shard`, which keeps the
    module tree and parameter names; it is its own forward.
    """
    if not _WORLD.active:
        return model
    if _WORLD.fsdp:
        _shard(model)
        if reference_model is not None:
            _shard(reference_model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Every trainable parameter gets a gradient each step (LoRA sits in every block), so no
    # search for unused ones. Buffers (rotary tables) are constant: no sync before each forward.
    device_ids = [_WORLD.device] if _WORLD.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False,
                                   forward_sync_buffers=False)


def _shard(model) -> None:
    """FSDP2: one FSDP unit per transformer block (the classes HF names in `_no_split_modules`), then the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(_WORLD.device.type, (_WORLD.size,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)  # embeddings, final norm, head (tied weights stay in one unit)
    # transformers' generate() reads this flag to keep every rank stepping until all are done
    # (synced_gpus): a sharded forward needs every rank, even one whose answers have ended.
    model._is_fsdp_managed_module = True


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from its shards under FSDP (a collective: every rank calls it), else TENSOR."""
    if not _WORLD.fsdp:
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor (from a checkpoint) laid out like PARAM: this rank's shard under FSDP, else VALUE.

    Every rank holds the full VALUE (each read the checkpoint), so each cuts its own shard
    without communication (src_data_rank=None).
    """
    if not _WORLD.fsdp:
        return value
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or tuple(value.shape) != tuple(param.shape):
        return value
    return distribute_tensor(value.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)


def trained_weights(model) -> dict[str, torch.Tensor] | None:
    """Under FSDP: the full trainable weights, on the CPU of rank 0 (None elsewhere, and without FSDP).

    Every rank must call it (the gather is a collective). Rank 0 loads them into an
    unsharded copy of the model to write the adapter and the merged model.
    """
    if not _WORLD.fsdp:
        return None
    weights = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = full(p.detach())
            if _WORLD.is_main:
                weights[name] = whole.cpu()
    return weights if _WORLD.is_main else None


def rng_states() -> dict[str, torch.Tensor]:
    """torch's CPU generator state of every rank (dropout draws differ per rank), for a checkpoint."""
    state = torch.random.get_rng_state()
    if not _WORLD.active:
        return {"torch_cpu": state}
    import torch.distributed as dist

    states = [None] * _WORLD.size
    dist.all_gather_object(states, state)
    return {"torch_cpu": states[0], **{f"torch_cpu.rank{r}": s for r, s in enumerate(states) if r}}


def my_rng_state(saved: dict[str, torch.Tensor]) -> torch.Tensor:
    """This rank's generator state from a checkpoint's: its own when saved with as many ranks, else rank 0's."""
    return saved.get(f"torch_cpu.rank{_WORLD.rank}", saved["torch_cpu"]) if _WORLD.rank else saved["torch_cpu"]
