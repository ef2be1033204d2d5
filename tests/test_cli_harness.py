"""The in-process `cli` fixture (conftest.py) behaves like a fresh `unlearn` process, and leaves
nothing behind: what the CLI tests assert through it holds for the real command too.

Each test stands in a fake `unlearn.cli.main` that does what a process may do (print, warn,
exit, change the environment, the working directory, the random generators, the thread count).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch


def fake_main(body):
    """A stand-in for unlearn.cli.main that runs BODY(argv) and exits like the real one."""
    def main(argv=None):
        code = body(argv)
        sys.exit(code)
    return main


def test_streams_exit_code_and_argv(monkeypatch, cli):
    def body(argv):
        print("result")
        print("unlearn: progress", file=sys.stderr)
        assert argv == ["run", "a b", "3"] and sys.argv == ["unlearn", "run", "a b", "3"]
        return 3

    monkeypatch.setattr("unlearn.cli.main", fake_main(body))
    assert cli("run", "a b", 3) == (3, "result\n", "unlearn: progress\n")


@pytest.mark.parametrize("exit_with, code, err", [(None, 0, ""), (0, 0, ""), (2, 2, ""), ("bye", 1, "bye\n")])
def test_exit_values_read_as_a_shell_would(monkeypatch, cli, exit_with, code, err):
    monkeypatch.setattr("unlearn.cli.main", fake_main(lambda argv: exit_with))
    assert cli("x") == (code, "", err)


def test_what_compiled_code_writes_to_the_file_descriptors_is_captured(monkeypatch, cli):
    def body(argv):
        print("python out")
        os.write(1, b"fd out\n")
        os.write(2, b"fd err\n")
        return 0

    monkeypatch.setattr("unlearn.cli.main", fake_main(body))
    assert cli("x") == (0, "python out\nfd out\n", "fd err\n")


def test_a_main_that_returns_is_exit_0(monkeypatch, cli):
    monkeypatch.setattr("unlearn.cli.main", lambda argv=None: None)
    assert cli("x") == (0, "", "")


def test_warnings_reach_stderr_every_call_as_in_a_fresh_process(monkeypatch, cli):
    from transformers.utils import logging as hf_logging

    def body(argv):
        warnings.warn("a python warning", UserWarning)
        warnings.warn("hidden at start-up", DeprecationWarning)
        hf_logging.get_logger("transformers.models").warning_once("a transformers warning")
        return 0

    monkeypatch.setattr("unlearn.cli.main", fake_main(body))
    for _ in range(2):  # each process shows its once-only warnings again
        _, _, err = cli("x")
        assert "UserWarning: a python warning" in err and "a transformers warning" in err
        assert "hidden at start-up" not in err


def test_process_state_is_fresh_inside_and_restored_after(monkeypatch, tmp_path, cli):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch.set_num_threads(3)  # not the call's 1 (conftest.py runs tests on 1): the checks below see it set and put back
    threads, cwd = torch.get_num_threads(), os.getcwd()
    torch.manual_seed(0)
    expected_next = torch.rand(3, generator=torch.Generator().manual_seed(0))
    drawn = []

    def body(argv):
        drawn.append(torch.rand(3))
        assert Path.cwd() == elsewhere and os.environ["GIVEN"] == "1" and "REMOVED" not in os.environ
        assert torch.get_num_threads() == 1
        os.environ["LEAKED"] = "1"
        os.chdir(tmp_path)
        torch.manual_seed(123)
        torch.set_num_threads(2)
        return 0

    monkeypatch.setenv("REMOVED", "x")
    monkeypatch.setattr("unlearn.cli.main", fake_main(body))
    assert cli("x", cwd=elsewhere, env={"GIVEN": "1", "REMOVED": None}).code == 0
    assert cli("x", cwd=elsewhere, env={"GIVEN": "1", "REMOVED": None}).code == 0
    assert not torch.equal(drawn[0], expected_next)  # the call's generator is not the test's, seeded 0
    assert not torch.equal(drawn[0], drawn[1])  # nor the same in every call: unpredictable, as at start-up
    assert torch.equal(torch.rand(3), expected_next)  # the test's own stream is untouched
    assert "LEAKED" not in os.environ and os.environ["REMOVED"] == "x" and "GIVEN" not in os.environ
    assert os.getcwd() == cwd and torch.get_num_threads() == threads


def test_each_test_has_a_fresh_cache():
    assert not Path(os.environ["UNLEARN_CACHE"]).exists()  # no other test's "last run" pointer
    assert "UNLEARN_MODEL" not in os.environ and "UNLEARN_DEBUG" not in os.environ


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["run"], 2), (["run", "missing.jsonl", "also-missing.jsonl"], 1)])
def test_the_command_ends_at_once_with_its_code_streams_and_exit_handlers(tmp_path, argv, code):
    """`unlearn` (cli.entry) skips the interpreter's teardown: the exit code, everything printed and
    every exit handler must still be there."""
    import subprocess

    script = ("import atexit, sys; atexit.register(lambda: print('handler ran', file=sys.stderr)); "
              f"sys.argv = ['unlearn'] + {argv!r}; print('buffered', end=''); "
              "from unlearn.cli import entry; entry(); print('after entry')")
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == code
    assert done.stdout.startswith("buffered") and "after entry" not in done.stdout
    assert done.stderr.endswith("handler ran\n")
    assert ("Usage" in done.stdout) == (code == 0)
    assert code == 0 or len(done.stderr.splitlines()) == 2  # the one error line, then the handler's


@pytest.mark.parametrize("where", ["importing", "handling the first"])
def test_a_ctrl_c_outside_main_is_one_line_and_exit_130(tmp_path, where):
    """A Ctrl-C while `unlearn.cli` (torch) is being imported, or a second one inside main's handling of the
    first, ended in a traceback (and in the second case exit 1, which a script reads as a failure)."""
    import subprocess

    if where == "importing":  # the import of unlearn.cli is where the interrupt lands
        script = ("import sys\n"
                  "class Interrupting:\n"
                  "    def find_spec(self, name, path=None, target=None):\n"
                  "        if name == 'unlearn.cli':\n"
                  "            raise KeyboardInterrupt\n"
                  "sys.meta_path.insert(0, Interrupting())\n"
                  "from unlearn.command import entry; entry()\n")
    else:  # main has decided 130 for a first Ctrl-C when the second lands
        # (Python's own SIGINT handler set explicitly: a process started in the background by a shell
        # without job control inherits SIGINT ignored, and then gets no KeyboardInterrupt at all)
        script = ("import os, signal, sys, unlearn.cli as c\n"
                  "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                  "def main():\n"
                  "    try:\n"
                  "        raise KeyboardInterrupt\n"
                  "    except KeyboardInterrupt:\n"
                  "        os.kill(os.getpid(), signal.SIGINT)\n"
                  "        sys.exit(130)\n"
                  "c.main = main\n"
                  "c.entry()\n")
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120)
    assert (done.returncode, done.stderr) == (130, "unlearn: interrupted\n")
