"""The two kinds of failure the CLI reports in one line (no traceback)."""


class UnlearnError(Exception):
    """A runtime failure: bad data, a missing model, a failed save. Exit code 1."""

    exit_code = 1


class UsageError(UnlearnError):
    """The command line asks for something impossible. Exit code 2."""

    exit_code = 2


class Interrupted(UnlearnError):
    """The user pressed Ctrl-C; the run stopped cleanly (after a checkpoint). Exit code 130."""

    exit_code = 130


class Terminated(BaseException):
    """SIGTERM (`timeout`, a cancelled CI job, `kill`) or SIGHUP (the terminal or ssh session gone), raised in
    the main thread so that every cleanup runs as for Ctrl-C: a merge's or run's temporary output directory, a
    run's empty OUT. Its argument is the signal; the exit code 128 + it (143, 129).

    A BaseException, as KeyboardInterrupt is: code that catches Exception must not swallow it.
    """

    exit_code = 143
