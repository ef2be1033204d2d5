"""Atomic outputs (directories and single files): a result appears whole, or not at all.

Everything a command writes goes into a hidden temporary directory beside the
destination (same filesystem, so the final rename is atomic). An existing
non-empty destination is refused unless the user passed --force; with --force
the old directory is replaced only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from unlearn.errors import UnlearnError, UsageError


def check_output_dir(path: Path, force: bool) -> None:
    """Refuse, before any work starts, to overwrite a result the user did not ask to replace."""
    path = Path(path)
    target, here, home = path.resolve(), Path.cwd().resolve(), Path.home().resolve()
    if target == here or target in here.parents:
        # The finished output replaces PATH whole by a rename, which the directory a shell stands in
        # (or one holding it) cannot take: the run would fail at its very end and lose its result.
        raise UsageError(f"-o {path}: is the current directory (or holds it); name a new directory")
    if force and (target == home or target in home.parents):
        raise UsageError(f"-o {path}: is the home directory (or holds it), which --force would replace whole; "
                         f"name a new directory")
    if path.exists() and not path.is_dir():  # never replaced, --force or not: a file is no earlier output
        raise UsageError(f"{path}: exists and is not a directory (--force replaces output directories only; "
                         f"remove it or name another)")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise UsageError(f"{path}: output directory exists and is not empty (use --force to replace it)")
    check_parent_writable(path)  # the result is made beside PATH, then renamed into place


# Output directories this process holds a lock on (`hold_output`): their path -> the open directory's descriptor.
_HELD: dict[str, int] = {}


def hold_output(path: Path, advice: str = "wait for it to end, or give another -o") -> bool:
    """Take, for as long as this command runs (`release_outputs`), an exclusive lock on the directory PATH, refusing
    in one line when another unlearn process holds it.

    A run that keeps checkpoints in OUT (--save-every, --resume) owns OUT from its start: a second run given that
    OUT adopted it while it was empty and wrote its result there, which the first then replaced at its end, both
    exiting 0; and two resumes of one run pruned each other's checkpoints (review 117). flock(2) on the directory
    itself: nothing is added inside OUT, and the lock ends with the process, however it ends. Where the file system
    takes no locks (some network mounts) it is skipped: the run goes on as before. True when it took the lock now
    (False: held already, or nothing to hold)."""
    import fcntl

    key = str(Path(path).resolve())
    if key in _HELD:
        return False
    try:
        fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False  # not a directory (yet): nothing to hold; the checks that follow say what is wrong
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"{path}: in use by another unlearn run, which writes there (a lock on it is held); "
                         f"{advice}") from None
    except OSError:
        os.close(fd)
        return False
    _HELD[key] = fd
    return True


def release_output(path: Path) -> None:
    """Close `hold_output`'s lock on PATH, if held."""
    fd = _HELD.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)


def release_outputs() -> None:
    """Close every lock `hold_output` took (the command is over)."""
    while _HELD:
        os.close(_HELD.popitem()[1])


@contextlib.contextmanager
def atomic_output_dir(path: Path, force: bool = False):
    """Yield a temporary directory; on success move it to PATH, on failure delete it.

    A PATH that is a symbolic link is written through to its target, as the output files are: renamed
    onto the link itself, the result replaced the link while the paths printed (resolved) named the
    target, left as it was."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    check_output_dir(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old, took = None, False
    try:
        usual_modes(tmp)
        if path.is_dir():
            # an OUT another run holds (it keeps checkpoints there) is never replaced, --force or not: it was empty
            # when checked, and that run will write its own result there (held only for this rename)
            took = hold_output(path, "nothing was written; give another -o, or run again once it has ended")
        if path.exists() and force:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            # Without --force a plain rename: it takes an empty directory (a reserved runs/<time>, an
            # mkdir'd OUT) and fails on one that is not, so a result another command wrote there while this
            # one worked (PATH was checked empty before) is kept; moved aside, it was deleted.
            os.replace(tmp, path)
    except UsageError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as exc:
        if not force and exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            shutil.rmtree(tmp, ignore_errors=True)
            raise UsageError(f"{path}: exists now and is not empty (written while unlearn was working); "
                             f"nothing was written (use --force to replace it)") from None
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "x").exists():  # the new result did not go in: put the old one back
            os.replace(old / "x", path)
            shutil.rmtree(old, ignore_errors=True)
        raise UnlearnError(f"{path}: could not move the finished output into place ({exc.strerror})") from None
    finally:
        if took:
            release_output(path)


def usual_modes(root: Path) -> None:
    """`usual_mode` for the directory ROOT and everything in it, what libraries made there too (safetensors writes
    its files 0600); links are left alone."""
    usual_mode(root, directory=True)
    for inside in root.rglob("*"):
        if not inside.is_symlink():
            usual_mode(inside, directory=inside.is_dir())


def usual_mode(path: Path, directory: bool) -> None:
    """Give PATH the permissions a plain mkdir or open would have (the umask's): mkdtemp and mkstemp make
    their results private (0700, 0600), and a result others should read would stay so after the rename."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


def refuse_output_over_inputs(out: Path, inputs, *, inside_too: bool = False, flag: str = "-o",
                              default: bool = False) -> None:
    """Refuse, before any work starts, an output (directory or file) that is one of the command's INPUTS
    (files or directories) or holds one: with --force the finished output replaces OUT whole, so the input
    would be deleted (a model read from OUT, the data files in it, or the prompts file itself). With
    INSIDE_TOO, an OUT inside an input directory is refused as well (merge: its output must not land inside
    a model it reads; eval: a report written into the model's directory). FLAG names the option; DEFAULT
    says OUT is the command's own default (FLAG not given), which the message then says instead of
    quoting an option the user never typed (merge's TUNED-avgALPHA can be BASE)."""
    target = Path(out).resolve()
    subject, remedy = (f"the default output {out} (no {flag} given)", f"give {flag}") if default else (
        f"{flag} {out}:", "choose another output")
    for path in inputs:
        if path is None or not Path(path).exists():
            continue
        source = Path(path).resolve()
        if target == source:
            if default:
                raise UsageError(f"{subject} is one of the inputs; {remedy}")
            raise UsageError(f"{subject} is an input ({path}); {remedy}")
        if target in source.parents:
            raise UsageError(f"{subject} holds an input ({path}), which replacing it would delete; {remedy}")
        if inside_too and source in target.parents:
            raise UsageError(f"{subject} is inside an input directory ({path}); {remedy}")


def judge_input(spec: str | None) -> str | None:
    """The file or directory a --judge SPEC reads (keywords:FILE, classifier:PATH), or None: an input too."""
    kind, sep, arg = (spec or "").partition(":")
    return arg if sep and kind in ("keywords", "classifier") and arg else None


def check_writable(*paths, force: bool = False) -> None:
    """Fail before any model loads when an output file cannot be written, or exists and FORCE is off."""
    seen = set()
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        resolved = path.resolve()
        if resolved in seen:  # the second write would silently replace the first
            raise UsageError(f"{path}: the same file is given for two outputs")
        for other in seen:  # the first written would be the other's missing directory, as a file
            if other in resolved.parents or resolved in other.parents:
                raise UsageError(f"{path}: one output file would lie inside the other ({other}); name two "
                                 f"separate files")
        seen.add(resolved)
        if path.is_dir():
            raise UsageError(f"{path}: is a directory, expected a file name")
        if path.exists() and not path.resolve().is_file():
            # A device or a pipe (/dev/null, /dev/stdout): the atomic write renames a new file over
            # the path, which would replace the device node itself, for every process on the machine.
            raise UsageError(f"{path}: is not a regular file (a device or a pipe); name a file")
        if path.exists() and not force:
            raise UsageError(f"{path}: exists (use --force to replace it)")
        check_parent_writable(path)


def check_parent_writable(path: Path) -> None:
    """Fail before any work when PATH could not be created: its nearest existing ancestor is a file,
    or a directory this process may not write into (what is missing below it is made when written)."""
    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{path}: {parent} is not a directory")
    try:  # a real try, not os.access: root passes access() on file systems that refuse (/sys, read-only mounts)
        os.rmdir(tempfile.mkdtemp(prefix=".unlearn-probe-", dir=parent))
    except OSError as exc:
        raise UsageError(f"{path}: cannot write in {parent} ({exc.strerror})") from None


def write_text_atomic(path, text: str) -> None:
    """Write TEXT to PATH atomically: a temporary file beside it, renamed when complete.

    A symbolic link is written through (its target gets the text; renaming over the link would replace
    the link with a file and leave the file it points to as it was)."""
    write_texts_atomic({path: text})


def _put_in_place(tmp: str, path: Path, replace: bool) -> None:
    """Move the complete temporary file TMP to PATH. Without REPLACE, never over a file that is there now:
    a hard link fails when PATH exists, so a result another program wrote while this one was working
    (checked absent minutes before) is kept. Where hard links are refused, the check is made again
    just before the rename, which narrows the window without closing it."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_texts_atomic(texts: dict, replace: bool = True) -> None:
    """Write each text of TEXTS ({path: text}) as `write_text_atomic` does, all or none: every file is
    renamed into place only once all of them are complete (one output written while the next failed
    left the command's first result, or replaced an earlier one with --force, under "nothing was written").

    REPLACE False (no --force): a path that exists by then is refused, and the files already put in place
    are taken back (`check_writable` ran before the work, which may take minutes)."""
    done = {}  # final path -> its complete temporary file
    placed = []
    path = None
    try:
        for path, text in texts.items():
            path = Path(path)
            if path.is_symlink():
                path = path.resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
            done[path] = tmp
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            usual_mode(Path(tmp), directory=False)
        for path, tmp in list(done.items()):
            _put_in_place(tmp, path, replace)
            placed.append(path)
            del done[path]
    except FileExistsError:
        for earlier in placed:
            os.unlink(earlier)
        raise UsageError(f"{path}: exists now (written while unlearn was working); nothing was written "
                         f"(use --force to replace it)") from None
    except OSError as exc:
        raise UnlearnError(f"{path}: could not write ({exc.strerror}); nothing was written") from None
    finally:  # the temporary files not put in place (none when every one was)
        for tmp in done.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def json_safe(value):
    """VALUE with every nan or inf float as None: `json.dumps` would write the bare tokens NaN and Infinity,
    which are not JSON (RFC 8259) and which strict parsers (JavaScript's, Go's) refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def jsonl_text(rows) -> str:
    """One JSON object a line (UTF-8, not escaped)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_jsonl(path, rows, replace: bool = True) -> None:
    """`jsonl_text` of ROWS, written atomically (REPLACE: as `write_texts_atomic`)."""
    write_texts_atomic({path: jsonl_text(rows)}, replace=replace)
