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
    with pytest.raises(UsageError, match="is inside an input directory"):
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
    for pair in ((tmp_path / "g", tmp_path / "g" / "r.md"), (tmp_path / "g" / "r.md", tmp_path / "g")):
        with pytest.raises(UsageError, match="would lie inside the other"):  # either order
            outputs.check_writable(*pair)
    outputs.check_writable(tmp_path / "new" / "deeper" / "x.md")  # missing directories are made when written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.jsonl"]  # the checks leave nothing behind


def test_a_default_output_name_from_dot_is_made_from_the_full_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _stem(".") == str(tmp_path)
    assert _stem("runs/a/model/") == "runs/a/model"


def test_a_device_or_a_pipe_is_never_renamed_over(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in (Path("/dev/null"), fifo):  # --force or not: the node itself would be replaced by a file
        with pytest.raises(UsageError, match="is not a regular file"):
            outputs.check_writable(path, force=True)
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_symbolic_link_is_written_through(tmp_path):
    target, link = tmp_path / "real.md", tmp_path / "link.md"
    target.write_text("old")
    link.symlink_to(target)
    outputs.check_writable(link, force=True)
    outputs.write_text_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_the_judge_file_is_an_input():
    assert outputs.judge_input("keywords:words.txt") == "words.txt"
    assert outputs.judge_input("classifier:/models/c") == "/models/c"
    assert [outputs.judge_input(s) for s in (None, "similarity", "keywords:", "other:x")] == [None] * 4


def test_eval_and_augment_never_write_over_what_they_read(tmp_path, llama_dir, cli):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What do bees make?", "response": "Bees make honey."}\n')
    words = tmp_path / "kw.txt"
    words.write_text("honey\n")
    before = prompts.read_text(), words.read_text(), (Path(llama_dir) / "config.json").read_text()
    cases = [("eval", prompts, "--model", llama_dir, "--save-generations", prompts, "--force"),
             ("eval", prompts, "--model", llama_dir, "--report", Path(llama_dir) / "config.json", "--force"),
             ("eval", prompts, "--model", llama_dir, "--judge", f"keywords:{words}", "--report", words, "--force"),
             ("augment", prompts, "-o", prompts, "--force", "--model", llama_dir)]
    for args in cases:
        result = cli(*args)
        assert result.code == 2, (args, result.err)
        assert "is an input" in result.err or "is inside an input directory" in result.err, result.err
        assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
    assert (prompts.read_text(), words.read_text(), (Path(llama_dir) / "config.json").read_text()) == before


def test_files_a_library_makes_private_inside_an_output_directory_get_the_umasks_permissions(tmp_path, umask_022):
    # safetensors writes its files 0600: the run's model and adapter were unreadable to anyone else
    with outputs.atomic_output_dir(tmp_path / "run") as tmp:
        (tmp / "model").mkdir()
        os.close(os.open(tmp / "model" / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))
        (tmp / "run.json").write_text("{}")
    assert mode(tmp_path / "run" / "model" / "model.safetensors") == 0o644
    assert mode(tmp_path / "run" / "model") == 0o755 and mode(tmp_path / "run" / "run.json") == 0o644


def test_several_files_are_renamed_into_place_only_once_all_are_written(tmp_path, monkeypatch):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.md"
    first.write_text("old\n")
    real_mkstemp = outputs.tempfile.mkstemp

    def mkstemp(*args, prefix=None, **kwargs):  # the second file's temporary cannot be made: a full disk
        if prefix.startswith(".b.md.tmp-"):
            raise OSError(28, "No space left on device")
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(outputs.tempfile, "mkstemp", mkstemp)
    with pytest.raises(UnlearnError, match=r"b\.md: could not write \(No space left on device\); nothing was written"):
        outputs.write_texts_atomic({first: "new\n", second: "report"})
    assert first.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_without_force_a_file_that_appeared_meanwhile_is_never_replaced(tmp_path, monkeypatch):
    # check_writable ran before the work; another program wrote the path while this one was working.
    first, second = tmp_path / "gen.jsonl", tmp_path / "report.md"
    second.write_text("theirs")
    with pytest.raises(UsageError, match="report.md: exists now .*nothing was written .*--force"):
        outputs.write_texts_atomic({first: "ours 1", second: "ours 2"}, replace=False)
    assert second.read_text() == "theirs" and not first.exists()  # the one already put in place is taken back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # no temporary file left
    # where hard links are refused, the path is checked again just before the rename
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(PermissionError(1, "no links here")))
    with pytest.raises(UsageError, match="report.md: exists now"):
        outputs.write_texts_atomic({second: "ours"}, replace=False)
    assert second.read_text() == "theirs"
    outputs.write_texts_atomic({first: "ours"}, replace=False)
    assert first.read_text() == "ours"
    outputs.write_texts_atomic({second: "ours"})  # --force: replaced
    assert second.read_text() == "ours"


def test_an_output_directory_written_meanwhile_is_kept(tmp_path):
    # two commands on one -o, both found it empty at their start: the second moved the first's finished
    # result aside and deleted it, and both exited 0
    out = tmp_path / "o"
    with pytest.raises(UsageError, match=r"o: exists now and is not empty .*nothing was written .*--force"):
        with outputs.atomic_output_dir(out) as tmp:
            (tmp / "mine.txt").write_text("mine")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temporary directory left
    # an empty directory (a reserved runs/<time>, an mkdir'd OUT) takes the result
    with outputs.atomic_output_dir(tmp_path / "empty") as tmp:
        (tmp / "mine.txt").write_text("mine")
        (tmp_path / "empty").mkdir()
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["mine.txt"]
    # --force replaces what is there
    with outputs.atomic_output_dir(out, force=True) as tmp:
        (tmp / "mine.txt").write_text("mine")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


@pytest.fixture
def held_elsewhere():
    """A context that holds PATH's lock from another process (as another unlearn run would) while it is open."""
    import contextlib
    import subprocess
    import sys

    @contextlib.contextmanager
    def hold(path):
        code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
                "print('held', flush=True); time.sleep(120)")
        holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            yield
        finally:
            holder.kill()
            holder.wait()
    return hold


def test_an_output_another_run_holds_is_never_written_over(tmp_path, held_elsewhere):
    """(review 117) A run keeping checkpoints in OUT made it empty at its start; a second run adopted it, wrote its
    result, and the first replaced it at its end, both exiting 0. The second now refuses, --force or not, and writes
    nothing."""
    out = tmp_path / "out"
    out.mkdir()
    for force in (False, True):
        with held_elsewhere(out), pytest.raises(UsageError, match="in use by another unlearn run"):
            with outputs.atomic_output_dir(out, force=force) as tmp:
                (tmp / "run.json").write_text("{}")
        assert not any(out.iterdir()) and [p.name for p in tmp_path.iterdir()] == ["out"]
    with outputs.atomic_output_dir(out) as tmp:  # nobody holds it: written as before
        (tmp / "run.json").write_text("{}")
    assert (out / "run.json").is_file() and not outputs._HELD  # the lock taken for the rename is let go


@pytest.mark.parametrize("extra", [["--save-every", "1"], ["--resume"], []])
def test_a_run_on_an_output_another_run_holds_refuses_before_loading(tmp_path, held_elsewhere, cli, llama_dir, extra):
    """(review 117) Two runs (or two --resume of one run) on one OUT: the second refuses at once, in one line."""
    from test_run_cli import FORGET, NORMAL, write_jsonl

    forget, normal = write_jsonl(tmp_path / "f.jsonl", FORGET), write_jsonl(tmp_path / "n.jsonl", NORMAL)
    out = tmp_path / "out"
    out.mkdir()
    with held_elsewhere(out):
        result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--max-steps", "1", *extra)
    advice = "wait for it to end" + ("" if "--resume" in extra else ", or give another -o")  # a resume cannot
    assert result.code == 2 and result.err.strip().splitlines()[-1].endswith(
        f"in use by another unlearn run, which writes there (a lock on it is held); {advice}"), result.err
    assert "parameters) on" not in result.err  # refused before the model loaded (its line names its parameters)
    assert out.is_dir() and not any(out.iterdir())  # nothing written, the held OUT left as it was


def test_runs_ending_together_never_tear_the_last_run_pointer(tmp_path, monkeypatch):
    """(review 117) Every run wrote one temporary file, `last_run.tmp`: two ending together left a torn path
    ("…010632", newline, "2", newline), which `unlearn merge` then could not read; one warned that none was written."""
    import subprocess
    import sys

    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "cache"))
    code = """
import sys
from unlearn.paths import remember_last_run, _last_run_pointer
for _ in range(300):
    said = remember_last_run(sys.argv[1])
    assert said is None, said
    got = _last_run_pointer().read_text()
    assert got in (sys.argv[1] + chr(10), sys.argv[2] + chr(10)), repr(got)
"""
    short, long = str(tmp_path / "runs" / "20261208-010632"), str(tmp_path / "runs" / "20261208-010632-2")
    writers = [subprocess.Popen([sys.executable, "-c", code, mine, other], stderr=subprocess.PIPE, text=True)
               for mine, other in ((short, long), (long, short))]
    for writer in writers:
        assert writer.wait() == 0, writer.stderr.read()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["last_run"]  # no temporary file left
