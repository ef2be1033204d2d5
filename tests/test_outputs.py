"""outputs.py: where a result may go, what it replaces, and with which permissions."""

import os
import stat
from pathlib import Path

import pytest

from unlearn import outputs
from unlearn.errors import UnlearnError, UsageError
from unlearn.merge import _stem


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_results_get_the_umasks_permissions_not_the_temporary_ones(tmp_path, umask_022):
    with outputs.atomic_output_dir(tmp_path / "run") as tmp:
        (tmp / "run.json").write_text("{}")
    outputs.write_text_atomic(tmp_path / "report.md", "x")
    # mkdtemp and mkstemp would leave 0700 and 0600: nobody else could read a shared run directory
    assert mode(tmp_path / "run") == 0o755
    assert mode(tmp_path / "report.md") == 0o644


def test_a_failed_final_rename_puts_the_old_result_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the earlier result")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old result is out of the way; the new one fails to go in
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(UnlearnError, match="could not move the finished output into place"):
        with outputs.atomic_output_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("the new result")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.tmp-* or .out.old-* left


def test_an_output_that_is_holds_or_sits_in_an_input_is_refused(tmp_path):
    model, data = tmp_path / "model", tmp_path / "data"
    model.mkdir()
    data.mkdir()
    forget = data / "forget.jsonl"
    forget.write_text("{}\n")
    with pytest.raises(UsageError, match=r"-o .*model: is an input"):
        outputs.refuse_output_over_inputs(model, [model, forget])
    with pytest.raises(UsageError, match=r"-o .*data: holds an input \(.*forget.jsonl\)"):
        outputs.refuse_output_over_inputs(data, [model, forget])
    with pytest.raises(UsageError, match="holds an input"):
        outputs.refuse_output_over_inputs(tmp_path, [model])
    # inside an input: refused only where asked (merge), and inputs that do not exist are not inputs
    outputs.refuse_output_over_inputs(model / "sub", [model, None, tmp_path / "hub/id"])
    with pytest.raises(UsageError, match="is inside an input model directory"):
        outputs.refuse_output_over_inputs(model / "sub", [model], inside_too=True)
    outputs.refuse_output_over_inputs(tmp_path / "elsewhere", [model, forget], inside_too=True)


def test_the_current_directory_and_the_home_directory_are_never_replaced(tmp_path, monkeypatch):
    work, home = tmp_path / "home" / "work", tmp_path / "home"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    for given in (".", "", str(work), ".."):
        with pytest.raises(UsageError, match="is the current directory"):
            outputs.check_output_dir(Path(given), force=True)
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    with pytest.raises(UsageError, match="is the home directory"):
        outputs.check_output_dir(home, force=True)
    with pytest.raises(UsageError, match="exists and is not empty"):  # without --force, the usual refusal
        outputs.check_output_dir(home, force=False)
    outputs.check_output_dir(home / "new-run", force=True)


def test_unwritable_places_are_found_before_any_work(tmp_path):
    a_file = tmp_path / "f.jsonl"
    a_file.write_text("{}\n")
    with pytest.raises(UsageError, match="f.jsonl is not a directory"):
        outputs.check_output_dir(a_file / "sub" / "out", force=False)
    with pytest.raises(UsageError, match="cannot write in /proc"):
        outputs.check_writable(Path("/proc/unlearn-report.md"))
    with pytest.raises(UsageError, match="the same file is given for two outputs"):
        outputs.check_writable(tmp_path / "x.md", None, tmp_path / "." / "x.md")
    outputs.check_writable(tmp_path / "new" / "deeper" / "x.md")  # missing directories are made when written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.jsonl"]  # the checks leave nothing behind


def test_a_default_output_name_from_dot_is_made_from_the_full_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _stem(".") == str(tmp_path)
    assert _stem("runs/a/model/") == "runs/a/model"
