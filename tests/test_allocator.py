"""models.tune_allocator: which glibc setting each model size gets, and that keeping freed memory avoids faults."""

import subprocess
import sys

import pytest
import torch

from unlearn import models


class _Weights(torch.nn.Module):
    def __init__(self, numel: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(numel, device="meta"))  # a size, no memory


@pytest.mark.parametrize("numel, expected", [(2**28 + 1, "return"), (2**28, "keep"), (1000, "keep")])
def test_tune_allocator_returns_memory_only_above_one_gib(monkeypatch, numel, expected):
    calls = []
    monkeypatch.setattr(models, "_mallopt", lambda option, value: calls.append((option, value)))
    models.tune_allocator(_Weights(numel))  # float32: 4 bytes a weight, 2**28 of them is 1 GiB
    if expected == "return":
        assert calls == [(models.M_MMAP_THRESHOLD, 128 * 1024)]
    else:
        assert calls == [(models.M_MMAP_THRESHOLD, 32 * 2**20), (models.M_TRIM_THRESHOLD, 2**30)]


# A step's pattern in small: many activation-sized blocks alive together, a few vocabulary-wide
# ones, all freed, then the same again. Prints the page faults of the second round.
_ROUNDS = """
import resource, sys, torch
from unlearn import models
if sys.argv[1] == "keep":
    models.keep_freed_memory()
def round_():
    blocks = [torch.empty(2**20, dtype=torch.uint8).fill_(1) for _ in range(300)]
    blocks += [torch.empty(16 * 2**20, dtype=torch.uint8).fill_(1) for _ in range(10)]
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_memory_is_reused_without_page_faults():
    pages = (300 + 10 * 16) * 2**20 // 4096
    faults = {mode: int(subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    assert faults["default"] > pages // 2  # glibc's own rule gives most of it back and faults it in again
    assert faults["keep"] < pages // 10
