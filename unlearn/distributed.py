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

- Failing alone. An error raised on one rank only (a file missing on one machine,
  a bug) must not leave the others blocked in a collective: with NCCL, or when the
  failing process's teardown hangs, they would wait for the process group's
  30-minute timeout (measured with gloo and a teardown that hangs: the others
  waited as long as it did). So every rank watches a flag in torchrun's key-value
  store (`_Watch`): a rank that fails posts its one-line message there BEFORE
  tearing anything down; every other rank's watcher sees it within POLL_SECONDS,
  interrupts its main thread (a signal, whose handler raises `ElsewhereError`) and,
  if that thread is stuck in a collective, ends the process after GRACE_SECONDS.
  Rank 0 is the voice: it prints the failing rank's message ("unlearn: rank 1:
  ...") and exits with its exit code; the failing rank, silenced, waits a moment
  for rank 0 to confirm it printed and prints the line itself if rank 0 did not.
  An error every rank meets alike is printed once, by rank 0, as its own.

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

- Evaluation. Every rank runs the same measurements (the before/after tables, the stop
  rule, the α grid), but under DDP each answers only its share of the prompts
  (`sharded`): the generation batches one process would form (prompts sorted by
  length, cut every --gen-batch-size) are dealt out whole, batch i to rank i mod K,
  and the answers gathered on every rank in the caller's order. Whole batches,
  because a greedy answer on CPU can depend on its batch (left padding sets the
  width, and matmul kernels are picked by shape), so each batch must be the one a
  single process forms; then the answers, and every score computed from them on
  every rank, are those of one process. Likelihood scores are sharded the same way.
  Under FSDP every forward is a collective over all ranks, so every rank answers
  every prompt (as before); sampling is not sharded either (its random stream runs
  through the batches in order).

- Checkpoints have one format whatever the number of processes: full (gathered)
  trainable weights and optimiser tensors, written by rank 0 (`full`), loaded by
  every rank and re-sharded locally (`shard_like`). So a checkpoint of a K-process
  run resumes under K processes, or one, or another K that divides the batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
import time
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
    # Errors that every rank meets alike (options, data) are said once, by rank 0, which also
    # relays the message of a rank failing alone (`_Watch`); UNLEARN_DEBUG=1 lets every rank print.
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
    watch = _Watch(rank, size, saved_stderr if saved_stderr is not None else 2)
    try:
        yield _WORLD
    except GeneratorExit:
        raise
    except BaseException as exc:
        raise watch.failed(exc) from None
    finally:
        watch.stop()
        _WORLD = World()
        dist.destroy_process_group()


# How often a rank looks for another's failure; how long it then lets its own error (if every
# rank fails alike) or the interrupted main thread end the process before ending it itself; how
# long a failing rank waits for rank 0 to say that it printed the message.
POLL_SECONDS = 0.1
SETTLE_SECONDS = 0.5
GRACE_SECONDS = 1.0
SHOWN_SECONDS = 5.0


def _one_line(exc: BaseException) -> tuple[str, int]:
    """What `cli.main` prints for EXC (without "unlearn: ") and the exit code it gives."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    if isinstance(exc, UnlearnError):
        return first, exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in PEER_GONE):
        # a rank killed outright (kill -9, the out-of-memory killer) posts no failure: the others meet its
        # closed connection in their next collective, which is no bug of this process
        return (f"another process of the run ended without a message (killed? out of memory?); its connection "
                f"closed under this one: {first}", 1)
    return f"internal error: {type(exc).__name__}: {first} (set UNLEARN_DEBUG=1 for a traceback)", 1


# What a collective's error says when the process at the other end is gone (gloo's TCP transport; NCCL).
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited")


def _say(fd: int, line: str) -> None:
    """LINE on its own line of FD, which may hold an unfinished progress bar (cleared on a terminal)."""
    start = "\r\033[K" if os.isatty(fd) else "\n"
    os.write(fd, f"{start}{line}\n".encode())


class _Watch:
    """One rank's side of the failure notices in torchrun's key-value store (see the module's "Failing alone").

    Keys (prefixed per torchrun restart): "failures", a counter; "failure/N", the N-th failure
    as "rank<TAB>exit code<TAB>message"; "shown", set by rank 0 once a failure was printed.
    A thread polls the counter. The store is a separate client of the one the process group
    uses (MASTER_ADDR:MASTER_PORT), so the thread never shares a connection with a collective.
    If the store cannot be reached, nothing is watched: the collectives themselves then fail.
    """

    def __init__(self, rank: int, size: int, stderr_fd: int):
        self.rank, self.size, self.stderr_fd = rank, size, stderr_fd
        self.store = None
        self.failing = threading.Event()  # this rank's main thread is on its way out
        self.done = threading.Event()
        self.elsewhere: tuple[int, int, str] | None = None  # (rank, exit code, message) of another rank
        self.interruptible = False  # a SIGUSR1 handler of ours is installed in the main thread
        self.previous_handler = None
        try:
            import torch.distributed as dist

            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=datetime.timedelta(seconds=10))
            self.store = dist.PrefixStore(f"unlearn/{restart}/", client)
        except (KeyError, ValueError, RuntimeError):
            return
        if threading.current_thread() is threading.main_thread():
            self.previous_handler = signal.signal(signal.SIGUSR1, self._interrupt)
            self.interruptible = True
        self.thread = threading.Thread(target=self._run, name="unlearn-failure-watch", daemon=True)
        self.thread.start()

    # --- the watching thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self.done.wait(POLL_SECONDS):
                if self.store.add("failures", 0):
                    elsewhere = self._posted_elsewhere()
                    if elsewhere is not None:
                        return self._stop_for(elsewhere)
        except Exception:  # noqa: BLE001 - the store is gone (the run is ending): stop watching
            return

    def _stop_for(self, elsewhere: tuple[int, int, str]) -> None:
        """Another rank failed: end this one, through its main thread if possible, else at once."""
        if self.failing.wait(SETTLE_SECONDS) or self.done.is_set():
            return  # this rank fails too (an error every rank meets) and says so itself, or the run is over
        self.elsewhere = elsewhere
        if self.interruptible:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        if self.done.wait(GRACE_SECONDS):
            return
        # The main thread is stuck (a collective waiting for the failed rank): say it and go.
        self._say_elsewhere()
        os._exit(elsewhere[1])

    def _interrupt(self, signum, frame) -> None:
        if self.elsewhere is not None and not self.failing.is_set():
            raise ElsewhereError(f"rank {self.elsewhere[0]}: {self.elsewhere[2]}", self.elsewhere[1])

    # --- the main thread's way out ---------------------------------------------------

    def _say_elsewhere(self) -> None:
        """Rank 0 prints the failing rank's message (the others are silent), then tells it so."""
        rank, _, message = self.elsewhere
        if self.rank == 0:
            _say(self.stderr_fd, f"unlearn: rank {rank}: {message}")
            self._mark_shown()

    def _mark_shown(self) -> None:
        with contextlib.suppress(Exception):
            self.store.set("shown", "1")

    def failed(self, exc: BaseException) -> BaseException:
        """The exception the session re-raises for EXC, after telling the other ranks (and printing) as needed."""
        self.failing.set()
        if self.store is None:
            return exc
        message, code = _one_line(exc)
        if self.elsewhere is None and not isinstance(exc, UnlearnError):
            # A collective broken because another rank failed (and left) is that rank's failure;
            # the same error on both (a bug every rank meets) is this rank's own.
            posted = self._posted_elsewhere()
            if posted is not None and posted[2] != message:
                self.elsewhere = posted
        if self.elsewhere is not None:
            # Rank 0 prints the failing rank's line here (and exits with that rank's code) rather
            # than letting the command line print this rank's consequence of it.
            self._say_elsewhere()
            return SystemExit(self.elsewhere[1])
        if isinstance(exc, (ElsewhereError, SystemExit)):
            return exc  # rank 0's own error, which every rank already knows (`on_main`)
        try:
            n = self.store.add("failures", 1)
            self.store.set(f"failure/{n}", f"{self.rank}\t{code}\t{message}")
        except Exception:  # noqa: BLE001 - no store: the other ranks learn it from the collectives
            return exc
        if self.rank == 0:
            # Printed here, not by the command line after the teardown, which can hang (NCCL).
            if os.environ.get("UNLEARN_DEBUG") == "1":
                return exc  # the command line shows the traceback
            _say(self.stderr_fd, f"unlearn: {message}")
            self._mark_shown()
            return SystemExit(code)
        else:
            deadline = time.monotonic() + SHOWN_SECONDS
            while time.monotonic() < deadline and not self._shown():
                time.sleep(POLL_SECONDS / 2)
            if not self._shown():  # rank 0 is gone or stuck: say it here
                _say(self.stderr_fd, f"unlearn: rank {self.rank}: {message}")
        return exc

    def _posted_elsewhere(self) -> tuple[int, int, str] | None:
        """The first failure another rank posted, if any."""
        try:
            for n in range(1, self.store.add("failures", 0) + 1):
                rank, code, message = self.store.get(f"failure/{n}").decode().split("\t", 2)
                if int(rank) != self.rank:
                    return int(rank), int(code), message
        except Exception:  # noqa: BLE001
            pass
        return None

    def _shown(self) -> bool:
        try:
            return self.store.check(["shown"])
        except Exception:  # noqa: BLE001
            return False

    def stop(self) -> None:
        self.done.set()
        # Joined, not left to die with the interpreter: a daemon thread still inside a store call
        # (C++, the GIL released) when the process exits can abort it (exit code -6, seen once in
        # the resume test under load). The poll wakes within POLL_SECONDS; a store call is short.
        thread = getattr(self, "thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=15)
        if self.interruptible:
            signal.signal(signal.SIGUSR1, self.previous_handler if self.previous_handler is not None
                          else signal.SIG_DFL)


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
    return totals([count])[0]


def totals(counts: list[int]) -> list[int]:
    """Each of COUNTS summed over the ranks (one all-reduce for all of them)."""
    if not _WORLD.active:
        return list(counts)
    return [int(round(v)) for v in _all_reduce([float(c) for c in counts])] if counts else []


def average(logged: dict[str, float]) -> dict[str, float]:
    """Per-rank logged terms -> the global batch's (their mean over ranks; see `global_mean`)."""
    if not _WORLD.active:
        return logged
    keys = sorted(logged)
    values = _all_reduce([logged[k] for k in keys])
    return {**logged, **{k: v / _WORLD.size for k, v in zip(keys, values)}}


# --- evaluation: whole batches dealt out, answers gathered ------------------------------------


def shares_work() -> bool:
    """Whether this world splits evaluation rows between the ranks (DDP; not FSDP, whose forwards need every rank)."""
    return _WORLD.active and not _WORLD.fsdp


def sharded(n: int, batches, work) -> list:
    """WORK(indices) -> one value per index, for N rows; returns the N values, in row order, on every rank.

    BATCHES() gives the batches one process would form over the N rows (lists of row
    indices, every batch full but the last, in the order one process runs them). Rank r
    runs batches r, r+K, r+2K, ... in one call of WORK, with the indices in that order,
    so that WORK, cutting them into batches the same way, forms exactly those batches;
    the values are then gathered (all_gather_object: any backend). One process, or FSDP,
    calls WORK(range(N)) once, as before.
    """
    if not shares_work():
        return work(list(range(n)))
    import torch.distributed as dist

    mine = [i for batch in batches()[_WORLD.rank::_WORLD.size] for i in batch]
    values = work(mine) if mine else []
    if len(values) != len(mine):
        raise RuntimeError(f"sharded work returned {len(values)} values for {len(mine)} rows")
    shares = [None] * _WORLD.size
    dist.all_gather_object(shares, (mine, list(values)))
    result, filled = [None] * n, 0
    for indices, share in shares:
        for i, value in zip(indices, share):
            result[i] = value
        filled += len(indices)
    if filled != n:
        raise RuntimeError(f"sharded work covered {filled} of {n} rows")
    return result


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


def global_mean(compute, labels: torch.Tensor, unit: str, logits: torch.Tensor) -> torch.Tensor:
    """COMPUTE(), a mean over this rank's units of LABELS, scaled so that averaging over ranks gives the global mean.

    With count_r units on rank r and N = sum_r count_r, rank r's term becomes mean_r * count_r * K / N;
    the average over the K ranks, which DDP and FSDP take of the gradients and `average` of the
    logged value, is then sum_r mean_r * count_r / N: the mean over every unit of the global
    batch, as one process computes it. A single process gets COMPUTE() back untouched.

    The mean is taken lazily because a rank's share can hold no unit at all (its forget rows'
    answers cut off by --max-length) while other ranks' shares do: one process computes that
    loss, so this rank contributes 0 (LOGITS · 0, which keeps every weight in the backward, as
    DDP needs) instead of raising alone and ending the run. With no unit anywhere COMPUTE()
    raises on every rank, as it does in one process.
    """
    if not _WORLD.active:
        return compute()
    count = scored_count(labels, unit)
    everywhere = _all_reduce([float(count)])[0]
    if everywhere == 0 or count > 0:
        term = compute()
        return term * (count * _WORLD.size / everywhere) if everywhere else term
    return logits.sum() * 0.0


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
    if not any(p.requires_grad for p in model.parameters()):
        return model  # nothing trains (--method edit, which refuses torchrun itself): nothing to synchronise
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
