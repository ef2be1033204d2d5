"""Where unlearn keeps things between runs: the model cache and the last run's record."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from unlearn.errors import UnlearnError


def cache_dir() -> Path:
    """$UNLEARN_CACHE, else ~/.cache/unlearn (created on demand by writers)."""
    return Path(os.environ.get("UNLEARN_CACHE") or Path.home() / ".cache" / "unlearn").expanduser()


def model_input(spec: str | None) -> Path:
    """What a command reads for --model SPEC, for the outputs that must not replace it: the local directory
    or file SPEC names, else the cache (where the embedded model and downloaded ones live)."""
    return Path(spec) if spec and Path(spec).exists() else cache_dir()


def _last_run_pointer() -> Path:
    return cache_dir() / "last_run"


def remember_last_run(run_dir: Path) -> str | None:
    """Record RUN_DIR as the most recent run (what `unlearn merge` with no paths reads); None when recorded,
    else why not. The run's result is already written when this runs: a cache that cannot be written
    ($UNLEARN_CACHE a file, a read-only $HOME) costs only the pointer, never the run's exit status.

    "Most recent" is the run whose result was written last. Each run writes its own temporary file (named by its
    pid), renamed over the pointer: with one name for all, two runs ending together wrote it at once, leaving a
    torn path, and one warned of a failure when the other had renamed the file (review 117)."""
    pointer = _last_run_pointer()
    tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}.tmp")
    try:
        pointer.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(str(Path(run_dir).resolve()) + "\n")
        os.replace(tmp, pointer)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a full cache: no empty temporary file left behind
        return (f"could not record this run as the last one in {pointer.parent} ({exc.strerror or exc}); "
                f"`unlearn merge` will need its paths")
    return None


def last_run_record(paths_needed: str = "BASE and TUNED paths") -> tuple[Path, dict]:
    """The directory and parsed run.json of the most recent `unlearn run`; PATHS_NEEDED says what to give instead
    when there is none."""
    pointer = _last_run_pointer()
    if not pointer.is_file():
        raise UnlearnError(f"no previous `unlearn run` recorded in {cache_dir()}; give {paths_needed}")
    run_dir = Path(pointer.read_text().strip())
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        raise UnlearnError(f"{record_path}: the last run's record is missing (was the run directory moved?)")
    try:
        return run_dir, json.loads(record_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UnlearnError(f"{record_path}: not valid JSON ({exc.msg})") from None
