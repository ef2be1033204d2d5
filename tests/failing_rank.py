"""`unlearn` with one rank failing at a training step: the failure test's entry point (test_distributed_shards.py).

Run by torchrun as the worker script, with FAIL_RANK (which rank fails), FAIL_STEP (at which
step) and FAIL_AT (a file that receives the time of the failure). FAIL_HANG=1: the failing
rank's teardown then hangs (its process group's destruction sleeps for 10 minutes), as an
NCCL teardown can: the other ranks must not wait for it.
"""

import os
import sys
import time

from unlearn import train
from unlearn.errors import UnlearnError

RANK, FAIL_RANK, FAIL_STEP = int(os.environ.get("RANK", 0)), int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_STEP"])
MESSAGE = "forget.jsonl:3: a deliberate failure on one rank"

real_step = train.Unlearner.step


def step(self):
    if RANK == FAIL_RANK and self.step_count + 1 == FAIL_STEP:
        with open(os.environ["FAIL_AT"], "w") as f:
            f.write(repr(time.time()))
        raise UnlearnError(MESSAGE)
    return real_step(self)


train.Unlearner.step = step
if os.environ.get("FAIL_HANG") == "1" and RANK == FAIL_RANK:
    import torch.distributed

    torch.distributed.destroy_process_group = lambda *args, **kwargs: time.sleep(600)

from unlearn.cli import main  # noqa: E402

main(sys.argv[1:])
