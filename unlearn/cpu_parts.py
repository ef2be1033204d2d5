"""Independent pieces of inference work side by side on a CPU: one Python thread per piece, one torch thread each.

With T torch threads, every operator of a forward is shared out between T threads and
ends in a barrier where they wait for each other; the Python between operators runs on
one core while the others wait. A decode step of the embedded model is about 1,200
operator calls, most on 64 x 576 tensors, so that overhead is a large share of each one.
Pieces that need no result from each other (the rows of a greedy batch, whole scoring
batches) can instead run one per core with one torch thread each: no barrier at all, and
one piece's Python overlaps another's arithmetic (torch releases the GIL inside operators).
When other processes share the cores, a barrier also waits for a thread the OS has set
aside, which a piece never does. Measured on the 2-core machine, the README run's 91
prompts in one `generate` call (identical answers either way): with load average ~4 from
other work, 31 s this way and 91-120 s with 2 torch threads in one decode; with no other
work (load ~1.8 including this run), 20.9-21.8 s and 20.9-22.0 s: no loss, and no gain.

A piece's numbers can differ from the one-decode result only by float rounding (a matmul
with fewer rows or one thread may pick another kernel), as they can with the thread count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


def parallel_pieces(model, units: int, min_units: int) -> int:
    """How many pieces to cut work of UNITS units into: torch's thread count on a CPU when every piece gets
    at least MIN_UNITS units, else 1 (one piece, torch's threads inside each operator)."""
    import torch

    threads = torch.get_num_threads()
    if next(model.parameters()).device.type != "cpu" or threads < 2 or units < threads * min_units:
        return 1
    return threads


def balanced_slices(widths: list[int], budgets: list[int], pieces: int) -> list[tuple[int, int]]:
    """(start, end) of PIECES consecutive runs of rows, in order, whose largest forward work is the least.

    A run of rows decoded as one batch computes, per layer, its rows x its widest prompt positions
    (the prefill, padding included: `_greedy_parts` cuts each slice to its own widest prompt) and
    then at most one position per row per new token (BUDGETS: each row's token budget). That count
    is the run's work: its matmuls run at one rate whatever the positions are. Measured on the README
    command (two threads, one run each way, the same table): cut by row count, the slice of longer
    prompts took 12-13 % more time than the other (original's answers 16.5 / 18.4 s, 56 rows each,
    15 and 24 columns; after measurement 15.1 / 17.0 s, 50 rows each); cut by this count, 0-3 %
    (16.1 / 16.0 s, 60 and 52 rows; 14.6 / 15.1 s, 53 and 47 rows): the two calls end ~1.5 s sooner.
    The least largest work is found by bisection on a bound: runs are grown while their work stays
    within it, and the number of runs that needs can only fall as the bound grows.
    """
    n = len(widths)
    if pieces <= 1 or n == 0:
        return [(0, n)]
    if n <= pieces:  # a row each
        return [(i, i + 1) for i in range(n)]

    def cut(bound: int) -> list[int] | None:
        """The runs' ends when each is grown while its work is within BOUND; None past PIECES runs."""
        ends, lo = [], 0
        while lo < n:
            hi, widest, budget = lo, 0, 0
            while hi < n:
                w, b = max(widest, widths[hi]), budget + budgets[hi]
                if hi > lo and (hi + 1 - lo) * w + b > bound:
                    break
                widest, budget, hi = w, b, hi + 1
            ends.append(hi)
            lo = hi
            if len(ends) > pieces:
                return None
        return ends

    low, high = 0, n * max(widths) + sum(budgets)  # a bound no run fits in, and one all fit in
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if cut(middle) is not None else (middle, high)
    ends = cut(high)
    while len(ends) < pieces:  # fewer runs than pieces: halve the longest (every piece gets rows)
        i = max(range(len(ends)), key=lambda k: ends[k] - (ends[k - 1] if k else 0))
        start = ends[i - 1] if i else 0
        ends.insert(i, start + (ends[i] - start) // 2)
    bounds = [0] + ends
    return list(zip(bounds, bounds[1:]))


def dealt_batches(model, batches: list[list[int]], work: Callable[[list[int]], list]) -> list:
    """WORK's values for the items of BATCHES (lists of item indices, together 0..n-1), in item order.

    On a CPU with T >= 2 torch threads and at least T batches, the batches are dealt out in turn
    to T pieces (batches r, r+T, ...) run side by side (`run_pieces`); otherwise one piece has them
    all. WORK(indices) gets a piece's items in batch order and returns one value per item: cut
    again every len(BATCHES[0]) items, they give back exactly the piece's batches when every
    batch but the last is full (the last is then at its piece's end).
    """
    pieces = parallel_pieces(model, len(batches), 1) if batches else 1
    shares = [[i for batch in batches[r::pieces] for i in batch] for r in range(pieces)]
    values = (run_pieces([lambda cancelled, share=share: work(share) for share in shares]) if pieces > 1
              else [work(shares[0])])
    result: list = [None] * sum(map(len, shares))
    for share, share_values in zip(shares, values):
        for i, value in zip(share, share_values):
            result[i] = value
    return result


def run_pieces(pieces: list[Callable[[Callable[[], bool]], object]]) -> list:
    """Each PIECE(cancelled) on its own thread with one torch thread (the first on the calling thread, so that
    Ctrl-C interrupts it); their results in order. CANCELLED() turns True once any piece has failed, so that
    the others can stop early; the first failure (not a cancellation) is raised after all have ended.
    The caller's grad and inference modes (thread-local in torch) hold in every piece.
    """
    import torch

    results: list = [None] * len(pieces)
    failed = threading.Event()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(i: int) -> None:
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                results[i] = (pieces[i](failed.is_set),)
        except BaseException as exc:
            failed.set()
            results[i] = exc

    threads = torch.get_num_threads()
    # A new thread takes torch's thread count when it starts and keeps it: 1, set here for the
    # helpers and this thread, and restored for everything after.
    torch.set_num_threads(1)
    try:
        helpers = [threading.Thread(target=run, args=(i,), daemon=True, name=f"unlearn-piece-{i}")
                   for i in range(1, len(pieces))]
        for helper in helpers:
            helper.start()
        try:
            run(0)
            for helper in helpers:
                helper.join()
        except BaseException:  # interrupted while waiting: the others stop at their next check
            failed.set()
            raise
    finally:
        torch.set_num_threads(threads)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])
    return [r[0] for r in results]


class Cancelled(Exception):
    """Another piece of the same work failed (or was interrupted): this one stopped too."""
