"""Other processes' use of this process's CPUs while a run loads its model, and the line that says what it costs.

torch splits every operation over its threads and waits for the last one. When other work keeps a core busy,
the OS sets one of those threads aside for a time slice now and then, and the others wait for it: thousands of
times a training step. Measured (2-core Intel Xeon, torch 2.13, the sixtieth session, `/work/s60/contention.sh`:
`unlearn run` on the embedded model, steps 2-4, one busy Python loop beside it): 23-28 s a step on torch's 2
threads, 6.8-7.8 s on 1 thread, against 3.7-4.4 s alone on 2. The tool does not change the thread count itself:
the count changes float rounding, so a run's exact weights (and a resume's) would depend on what else ran when it
started. It says so, and names the setting that does (OMP_NUM_THREADS).

The measure: over a window (the model's loading; then, while it trains, windows of TRAINING_WINDOW_S or more, up
to the end of a step: `CrowdWatch`), the busy time /proc/stat counts on this process's CPUs
(`os.sched_getaffinity`), less this process's own CPU time, over the window's wall clock: how many of those
cores other processes kept busy. Linux only; elsewhere nothing is measured and nothing said. Said once a run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# Other work below this many cores goes unsaid: /proc/stat counts in ticks (10 ms at 100 Hz), and a window of
# a few seconds reads a quiet machine as a few hundredths of a core.
BUSY_CORES_SAID = 0.5
# A window shorter than this reads too few ticks to say anything.
MIN_WINDOW_S = 0.5
# Training's windows: long enough that a burst of other work (a shell command, an editor's save) averages out to
# under BUSY_CORES_SAID, short enough that a run of a few minutes says it in its first quarter.
TRAINING_WINDOW_S = 20.0


def busy_ticks(stat_text: str, cpus: set[int]) -> int | None:
    """The busy ticks /proc/stat's text STAT_TEXT counts on CPUS, summed: user, nice, system, irq, softirq and
    steal (a hypervisor's other guests), not idle or iowait; guest time is inside user already. None when a
    CPU's line is missing."""
    found = {}
    for line in stat_text.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]] + [0] * (8 - len(fields[:8]))
            user, nice, system, _idle, _iowait, irq, softirq, steal = values
            found[int(name[3:])] = user + nice + system + irq + softirq + steal
    return sum(found.values()) if set(found) == set(cpus) else None


class OtherWork:
    """Started at the window's opening; `busy_cores()` at its end says how many cores other processes used."""

    def __init__(self, read_stat=lambda: Path("/proc/stat").read_text(), clock=time.perf_counter,
                 own_cpu=time.process_time, cpus: set[int] | None = None, hz: int | None = None):
        """The defaults read this machine; a test gives its own /proc/stat text, clocks, CPUs and tick rate."""
        self._read, self._clock, self._own = read_stat, clock, own_cpu
        self.cpus: set[int] = set()
        try:
            self.cpus = set(cpus if cpus is not None else os.sched_getaffinity(0))
            self.hz = hz or os.sysconf("SC_CLK_TCK")
            self._start = (busy_ticks(self._read(), self.cpus), self._clock(), self._own())
        except (OSError, AttributeError, ValueError):  # not Linux: no /proc/stat, no affinity
            self._start = None

    def busy_cores(self) -> float | None:
        """Cores of this process's CPUs other processes kept busy since the start, on average; None when it
        cannot be measured (not Linux, a window under MIN_WINDOW_S)."""
        if self._start is None or self._start[0] is None:
            return None
        try:
            ticks = busy_ticks(self._read(), self.cpus)
        except OSError:
            return None
        ticks0, wall0, own0 = self._start
        wall = self._clock() - wall0
        if ticks is None or wall < MIN_WINDOW_S:
            return None
        return max(0.0, ((ticks - ticks0) / self.hz - (self._own() - own0)) / wall)


def contention_note(busy: float | None, threads: int, cores: int, when: str = "while the model loaded") -> str | None:
    """The line a run logs when BUSY cores of its CORES were kept busy by other processes (WHEN says over which
    window) and torch's THREADS are more than the cores left (at least one); None otherwise."""
    if busy is None or busy < BUSY_CORES_SAID or threads <= 1:
        return None
    free = max(1, round(cores - busy))
    if threads <= free:
        return None
    return (f"cpu: other processes kept {busy:.1f} of this run's {cores} cores busy {when}; torch's "
            f"{threads} threads wait for each other at every operation, so a step can take several times longer "
            f"(docs/speed.md: beside one busy process, 23-28 s a step on 2 threads, 7-8 s on 1, 4 s alone); "
            f"OMP_NUM_THREADS={free} runs on the {'core' if free == 1 else 'cores'} left")


class CrowdWatch:
    """Other work on the run's cores while it trains, read over windows of TRAINING_WINDOW_S or more that end with
    a step (`after_step`): work that began once the model had loaded, which the load's window cannot see."""

    def __init__(self, threads: int, cores: int, watch=None, clock=time.perf_counter):
        """WATCH starts a window (OtherWork unless a test gives its own); CLOCK times the windows."""
        self.threads, self.cores, self._watch, self._clock = threads, cores, watch or OtherWork, clock
        self.restart()

    def restart(self) -> None:
        """A new window from now: training's first opens as training starts, not at the watch's making (the
        original's measurement between would be counted as the first steps')."""
        self._window, self._opened, self._first_step = self._watch(), self._clock(), None

    def after_step(self, step: int) -> str | None:
        """The note for the window that ends with STEP once it is TRAINING_WINDOW_S long (the next window then
        starts), else None."""
        self._first_step = self._first_step or step
        if self._clock() - self._opened < TRAINING_WINDOW_S:
            return None
        steps = f"step {step}" if step == self._first_step else f"steps {self._first_step}-{step}"
        note = contention_note(self._window.busy_cores(), self.threads, self.cores, when=f"during {steps}")
        self.restart()
        return note
