"""Atomic outputs (directories and single files): a result appears whole, or not at all.

Everything a command writes goes into a hidden temporary directory beside the
destination (same filesystem, so the final rename is atomic). An existing
non-empty destination is refused unless the user passed --force; with --force
the old directory is replaced only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from unlearn.errors import UnlearnError, UsageError


def check_output_dir(path: Path, force: bool) -> None:
    """Refuse, before any work starts, to overwrite a result the user did not ask to replace."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise UsageError(f"{path}: output directory exists and is not empty (use --force to replace it)")


@contextlib.contextmanager
def atomic_output_dir(path: Path, force: bool = False):
    """Yield a temporary directory; on success move it to PATH, on failure delete it."""
    path = Path(path)
    check_output_dir(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UnlearnError(f"{path}: could not move the finished output into place ({exc.strerror})") from None


def check_writable(*paths, force: bool = False) -> None:
    """Fail before any model loads when an output file cannot be written, or exists and FORCE is off."""
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            raise UsageError(f"{path}: is a directory, expected a file name")
        if path.exists() and not force:
            raise UsageError(f"{path}: exists (use --force to replace it)")
        parent = path.parent if str(path.parent) else Path(".")
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{path}: {parent} is not a directory")


def write_text_atomic(path, text: str) -> None:
    """Write TEXT to PATH atomically: a temporary file beside it, renamed when complete."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise UnlearnError(f"{path}: could not write ({exc.strerror}); nothing was written") from None


def write_jsonl(path, rows) -> None:
    """One JSON object a line (UTF-8, not escaped), written atomically."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
