"""What machine a run used and how much of it: device name, peak memory, versions, file hashes."""

from __future__ import annotations

import functools
import hashlib
import platform
import resource
import sys
import time
from pathlib import Path


def pick_device(requested: str | None = None):
    """--device REQUESTED, checked before any model loads (a bad name or a CUDA build that is not there would
    otherwise fail inside the model's move, as an internal error); None: CUDA when available, else the CPU."""
    import torch

    from unlearn.errors import UsageError

    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {requested}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: no CUDA device is available to this torch build; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def device_name(device) -> str:
    """A human name: the GPU's, or the CPU model with the number of threads torch uses."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


# torch runs bfloat16 and float16 matrix products on a CPU fast only where the CPU has instructions for
# them (AVX512-BF16, AMX, AVX512-FP16); elsewhere it takes a reference path. On an AVX2 AMD EPYC (torch
# 2.13, two threads) a 256 x 256 product ran at 1.3 GFLOP/s in bfloat16 (and in float16) against 47-62 in
# float32, so a bf16 model or bf16 autocast made everything about 40x slower there. Half precision is used or
# recommended only where its rate is at least this share of float32's; where it is native it is
# faster than float32, not a little slower.
LOW_PRECISION_MIN_SHARE = 0.5
_RATE_SIDE = 256  # a small product: at 1.3 GFLOP/s one run takes about 26 ms
_RATE_RUNS = 50  # best of these; where the dtype is native they take about 10 ms in all
_RATE_BUDGET_S = 0.1  # and no more time than this (a slow dtype: about 4 runs)


@functools.lru_cache(maxsize=None)
def cpu_matmul_rate(dtype_name: str) -> float:
    """GFLOP/s of a 256 x 256 x 256 matrix product in DTYPE_NAME ("float32", "bfloat16", "float16") on
    this CPU with torch's current threads: the best of _RATE_RUNS after one warm-up. Measured once a process.

    One product takes about 0.2 ms where the dtype is native, less than one stall of a thread waiting for a
    busy core (10-20 ms): with the best of 3, float16 read 2.8-30 GFLOP/s against float32's 155-173 in 3 of
    20 loads on a loaded machine where it runs as fast. A slow dtype stops at the time budget (about 4 runs)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(_RATE_SIDE, _RATE_SIDE).to(dtype), torch.randn(_RATE_SIDE, _RATE_SIDE).to(dtype)
    a @ b
    best, spent = float("inf"), 0.0
    for _ in range(_RATE_RUNS):
        started = time.perf_counter()
        a @ b
        took = time.perf_counter() - started
        best, spent = min(best, took), spent + took
        if spent > _RATE_BUDGET_S:
            break
    return 2 * _RATE_SIDE**3 / max(best, 1e-9) / 1e9


def slow_low_precision_note(dtype_name: str) -> str | None:
    """None if DTYPE_NAME's matrix products run on this CPU at LOW_PRECISION_MIN_SHARE or more of
    float32's rate (float32 itself: always None); else one line saying how much slower it is."""
    if dtype_name == "float32":
        return None
    low, full = cpu_matmul_rate(dtype_name), cpu_matmul_rate("float32")
    if low >= LOW_PRECISION_MIN_SHARE * full:
        return None
    return (f"this CPU multiplies {dtype_name} matrices at {low:.1f} GFLOP/s against {full:.0f} in float32 "
            f"(measured just now), so {dtype_name} work runs about {full / max(low, 1e-9):.0f}x "
            f"slower here")


def peak_memory_mb(device) -> float:
    """Peak memory of this run in MiB.

    CUDA: torch's peak allocated device memory. CPU: the process's peak resident set
    size (ru_maxrss, KiB on Linux, bytes on macOS), which includes the weights, the
    activations and Python itself: what the machine had to have free.
    """
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("unlearn", "torch", "transformers", "safetensors", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions
