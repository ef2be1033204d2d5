"""cpu_load.py: other processes' use of the run's cores while the model loads, and the line that says it."""

from __future__ import annotations

import json

import pytest

from test_run_cli import FORGET, NORMAL, write_jsonl
from unlearn.cpu_load import CrowdWatch, OtherWork, busy_ticks, contention_note

# /proc/stat's layout: the total line, then one line a CPU (user nice system idle iowait irq softirq steal guest
# guest_nice), in ticks.
STAT = ("cpu  150 10 30 900 5 1 2 3 0 0\n"
        "cpu0 100 10 20 500 5 1 2 3 7 0\n"
        "cpu1 50 0 10 400 0 0 0 0 0 0\n"
        "intr 12345 0 0\n")


def test_busy_ticks_count_user_nice_system_irq_softirq_and_steal_of_the_cpus_asked():
    assert busy_ticks(STAT, {0}) == 100 + 10 + 20 + 1 + 2 + 3  # idle 500 and iowait 5 are not busy; guest is in user
    assert busy_ticks(STAT, {1}) == 60
    assert busy_ticks(STAT, {0, 1}) == 196  # the total line is not counted again
    assert busy_ticks(STAT, {0, 2}) is None  # a CPU without its line: nothing to say


def fake(stats, times, own):
    """An OtherWork reading STATS, TIMES and OWN (CPU seconds of this process) in turn, on CPUs 0-1 at 100 Hz."""
    stats, times, own = iter(stats), iter(times), iter(own)
    return OtherWork(lambda: next(stats), lambda: next(times), lambda: next(own), cpus={0, 1}, hz=100)


def test_other_work_is_the_busy_time_less_this_processs_own_over_the_window():
    later = STAT.replace("cpu1 50 0 10 400", "cpu1 300 0 10 400")  # 250 more ticks: 2.5 CPU seconds
    # 2.5 s busy, of which 1.0 s this process's, over 2.0 s: 0.75 cores kept busy by others
    assert fake([STAT, later], [10.0, 12.0], [3.0, 4.0]).busy_cores() == pytest.approx(0.75)
    # this process alone: nothing from others (and never below 0 from rounding to ticks)
    assert fake([STAT, later], [10.0, 12.0], [3.0, 5.6]).busy_cores() == 0.0
    assert fake([STAT, later], [10.0, 10.3], [3.0, 3.0]).busy_cores() is None  # 0.3 s: too few ticks to read
    assert fake(["no cpu lines\n", later], [10.0, 12.0], [3.0, 4.0]).busy_cores() is None


def test_the_note_names_the_threads_that_fit_on_the_cores_left():
    note = contention_note(1.0, threads=2, cores=2)
    assert note.startswith("cpu: other processes kept 1.0 of this run's 2 cores busy while the model loaded; ")
    assert note.endswith("OMP_NUM_THREADS=1 runs on the core left")
    assert contention_note(2.6, threads=4, cores=4).endswith("OMP_NUM_THREADS=1 runs on the core left")
    assert contention_note(1.2, threads=4, cores=4).endswith("OMP_NUM_THREADS=3 runs on the cores left")
    assert contention_note(0.4, threads=2, cores=2) is None  # under BUSY_CORES_SAID: a quiet machine's ticks
    assert contention_note(1.0, threads=1, cores=2) is None  # one thread waits for no other
    assert contention_note(1.0, threads=2, cores=4) is None  # three cores left for two threads
    assert contention_note(None, threads=2, cores=2) is None  # not measured (not Linux)


def test_a_run_on_crowded_cores_says_so_and_keeps_it_in_run_json(tmp_path, llama_dir, cli, monkeypatch):
    import torch

    from unlearn import run

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the CLI's in-process runs set one thread

    class Crowded:
        cpus = {0, 1}

        def busy_cores(self):
            return 1.0

    monkeypatch.setattr(run, "OtherWork", Crowded)
    forget, normal = write_jsonl(tmp_path / "f.jsonl", FORGET), write_jsonl(tmp_path / "n.jsonl", NORMAL)
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", "--max-steps", "1",
                 "--check-every", "0", "--max-new-tokens", "2", "--eval-limit", "1", "--no-probes")
    assert result.code == 0, result.err
    said = [line for line in result.err.splitlines() if line.startswith("cpu: ")]
    assert said == [contention_note(1.0, threads=2, cores=2)]
    assert said[0] in json.loads((tmp_path / "out" / "run.json").read_text())["notes"]


def test_the_note_is_for_a_cpu_run_in_one_process(monkeypatch):
    """Under torchrun the busy cores are the run's own other ranks; on a GPU the step is not on torch's CPU
    threads: no note either way."""
    import torch

    from unlearn.distributed import World
    from unlearn.run import _crowded_cores

    class Crowded:
        cpus = {0, 1}

        def busy_cores(self):
            return 1.0

    class Quiet(Crowded):
        def busy_cores(self):
            return 0.0

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu = torch.device("cpu")
    assert _crowded_cores(cpu, World(), Crowded()) == (contention_note(1.0, threads=2, cores=2), None)  # said once
    assert _crowded_cores(cpu, World(rank=0, size=2), Crowded()) == (None, None)
    assert _crowded_cores(torch.device("cuda"), World(), Crowded()) == (None, None)
    note, watch = _crowded_cores(cpu, World(), Quiet())
    assert note is None and isinstance(watch, CrowdWatch) and (watch.threads, watch.cores) == (2, 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert _crowded_cores(cpu, World(), Quiet()) == (None, None)  # one thread waits for no other


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_training_reads_other_work_over_windows_of_twenty_seconds_that_end_with_a_step():
    clock, busy, windows = Clock(), iter([0.2, 1.3]), []

    class Window:  # each window reads the next figure of BUSY
        def __init__(self):
            windows.append(self)

        def busy_cores(self):
            return next(busy)

    watch = CrowdWatch(threads=2, cores=2, watch=Window, clock=clock)
    clock.now += 30.0  # the original measured: not training's
    watch.restart()
    clock.now += 8.0
    assert watch.after_step(1) is None  # 8 s: the window is not over
    clock.now += 12.5
    assert watch.after_step(2) is None  # 20.5 s, steps 1-2: 0.2 cores busy, under BUSY_CORES_SAID
    clock.now += 19.0
    assert watch.after_step(3) is None  # a new window, 19 s old
    clock.now += 4.0
    assert watch.after_step(4) == contention_note(1.3, threads=2, cores=2, when="during steps 3-4")
    assert len(windows) == 4  # the one made with the watch, training's first, and one after each window
    assert "busy during steps 3-4; torch's 2 threads" in contention_note(1.3, 2, 2, when="during steps 3-4")


def test_a_run_whose_cores_are_crowded_once_it_trains_says_so_once_and_keeps_it(tmp_path, llama_dir, cli,
                                                                                 monkeypatch):
    import torch

    from unlearn import cpu_load, run

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the CLI's in-process runs set one thread
    windows = []

    class Window:  # quiet while the model loads (the first window), then one busy core
        def __init__(self):
            windows.append(self)
            self.cpus = {0, 1}

        def busy_cores(self):
            return 0.0 if self is windows[0] else 1.0

    monkeypatch.setattr(run, "OtherWork", Window)
    monkeypatch.setattr(cpu_load, "OtherWork", Window)
    monkeypatch.setattr(cpu_load, "TRAINING_WINDOW_S", 0.0)  # every step ends a window
    forget, normal = write_jsonl(tmp_path / "f.jsonl", FORGET), write_jsonl(tmp_path / "n.jsonl", NORMAL)
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", "--max-steps", "3",
                 "--check-every", "0", "--max-new-tokens", "2", "--eval-limit", "1", "--no-probes")
    assert result.code == 0, result.err
    said = [line for line in result.err.splitlines() if line.startswith("cpu: ")]
    assert said == [contention_note(1.0, threads=2, cores=2, when="during step 1")]  # once, though 3 steps were
    notes = json.loads((tmp_path / "out" / "run.json").read_text())["notes"]
    assert [n for n in notes if n.startswith("cpu: ")] == said
