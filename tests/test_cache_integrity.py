"""What is kept on disk between runs (file hashes, measurements, GGUF conversions, checkpoints) is never
trusted past a change, and a damaged entry is measured again or named in one line, never a crash."""

import json
import os

import pytest

import tiny_models
from unlearn import measure_cache, models
from unlearn.checkpoints import read_state
from unlearn.errors import UnlearnError


def rewrite_keeping_size_and_mtime(path, content: bytes):
    stat = path.stat()
    assert len(content) == stat.st_size
    path.write_bytes(content)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p, rsync -a or an unpacked archive leave it


def test_a_weights_file_rewritten_with_the_same_size_and_mtime_is_hashed_again(tmp_path):
    a = tiny_models.build_opt(tmp_path / "a", seed=0)
    b = tiny_models.build_opt(tmp_path / "b", seed=1)
    before = measure_cache.weights_fingerprint(a)
    rewrite_keeping_size_and_mtime(a / "model.safetensors", (b / "model.safetensors").read_bytes())
    # before: the memo, keyed by (path, size, mtime), gave the old hash and the old model's cached figures
    assert measure_cache.weights_fingerprint(a) == measure_cache.weights_fingerprint(b) != before


def test_damaged_cache_files_are_measured_again_not_crashed_on(tmp_path, llama_dir):
    from unlearn.data import Example
    from unlearn.measure import EvalSet, Measurer, Settings
    from unlearn.models import load_model

    (measure_cache.cache_dir()).mkdir(parents=True, exist_ok=True)
    (measure_cache.cache_dir() / "weight_hashes.json").write_bytes(b"\xff\xfe")
    assert measure_cache.weights_fingerprint(llama_dir)  # the memo is rebuilt (it was a UnicodeDecodeError)
    lm = load_model(str(llama_dir), log=lambda m: None)
    measurer = Measurer(lm.model, lm.tokenizer, Settings(max_new_tokens=2), fingerprint="f")
    s = EvalSet("forget", "forget", [Example("Who?", "Him.", 1)])
    key = measurer._cache_key(s, None, False)
    path = measure_cache.cache_dir() / "measurements" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for damaged in (b"\xff", b"[]", b"{}", json.dumps({"summary": {}, "outputs": ["a", "b"], "rows": [{}, {}]}).encode(),
                    json.dumps({"summary": {}, "outputs": ["a"], "rows": [{}]}).encode()):  # right keys, wrong inside
        path.write_bytes(damaged)  # a stray byte, another shape, a set of another length
        measurer._hits.clear()
        assert measurer._cached(key, 1) is None
    measured = measurer.measure([s])  # and a run over it measures again
    assert len(measured["forget"].outputs) == 1 and measurer.reused == 0


def test_a_template_that_renders_the_date_keys_the_measurement(llama_dir):
    from unlearn.measure import EvalSet, Measurer, Settings
    from unlearn.data import Example
    from unlearn.models import load_model

    lm = load_model(str(llama_dir), log=lambda m: None)
    s = EvalSet("forget", "forget", [Example("Who?", "Him.", 1)])
    keys = []
    for day in ("1 Dec 2026", "2 Dec 2026"):  # what strftime_now gives on two days; the files do not change
        lm.tokenizer.chat_template = ("{% for m in messages %}Today: " + day + "\n{{ m['content'] }}\n{% endfor %}"
                                      "{% if add_generation_prompt %}Answer:{% endif %}")
        keys.append(Measurer(lm.model, lm.tokenizer, Settings(max_new_tokens=2), fingerprint="f")._cache_key(s, None, False))
    assert keys[0] != keys[1]


def test_the_probes_are_keyed_by_the_rendered_template_too(tmp_path, llama_dir, cli, monkeypatch):
    import unlearn.run

    forget, normal = tmp_path / "f.jsonl", tmp_path / "n.jsonl"
    forget.write_text(json.dumps({"prompt": "What is the capital of France?", "response": "It is Paris.",
                                  "answers": ["Paris"]}) + "\n")
    normal.write_text(json.dumps({"prompt": "What do bees make?", "response": "Bees make honey."}) + "\n")
    args = ["run", forget, normal, "--model", llama_dir, "--max-steps", "1", "--check-every", "0",
            "--max-new-tokens", "2"]

    def built(out):
        return json.loads((out / "run.json").read_text())["eval_reused"]["probes"]["built"]

    assert cli(*args, "-o", tmp_path / "a").code == 0 and cli(*args, "-o", tmp_path / "b").code == 0
    assert (built(tmp_path / "a"), built(tmp_path / "b")) == (False, True)
    render = unlearn.run.render_prompt  # the next day, a template that prints the date renders another prompt
    monkeypatch.setattr(unlearn.run, "render_prompt", lambda tok, prompt: "Today: 2 Dec 2026\n" + render(tok, prompt))
    assert cli(*args, "-o", tmp_path / "c").code == 0 and built(tmp_path / "c") is False


@pytest.fixture
def fake_gguf_conversion(monkeypatch, llama_dir):
    """convert_gguf on a stand-in file, transformers' GGUF reading replaced by the tiny Llama's loading."""
    import transformers

    loads = []
    real_model, real_tokenizer = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def model_from(folder, gguf_file=None, **kw):
        loads.append(gguf_file)
        return real_model(str(llama_dir))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder, gguf_file=None, **kw:
                        real_tokenizer(str(llama_dir)))
    return loads


def test_a_gguf_rewritten_in_place_is_converted_again(tmp_path, fake_gguf_conversion):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"A" * 64)
    lines = []
    first = models.convert_gguf(gguf, log=lines.append)
    assert models.convert_gguf(gguf, log=lines.append) == first and len(fake_gguf_conversion) == 1  # kept
    rewrite_keeping_size_and_mtime(gguf, b"B" * 64)  # same size, same mtime: before, the old conversion
    assert models.convert_gguf(gguf, log=lines.append) == first and len(fake_gguf_conversion) == 2
    # the same bytes under a new identity (a restored copy) are recognised by their hash, not converted again
    restored = tmp_path / "restored.gguf"
    os.replace(gguf, restored)
    restored.rename(gguf)
    assert models.convert_gguf(gguf, log=lines.append) == first and len(fake_gguf_conversion) == 2


def test_an_unwritable_cache_is_one_line_before_any_converting(tmp_path, monkeypatch, fake_gguf_conversion):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("UNLEARN_CACHE", str(blocker / "cache"))  # under a file: nothing can be made there
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"A" * 64)
    # before: 10-20 s of converting, then "internal error: NotADirectoryError"
    said = []
    with pytest.raises(UnlearnError, match=r"cannot keep the converted model \(Not a directory\); set UNLEARN_CACHE "
                                           r"to a writable directory"):
        models.convert_gguf(gguf, log=said.append)
    assert fake_gguf_conversion == [] and said == []  # nothing said of a conversion that never starts


def test_a_conversion_another_run_finished_meanwhile_is_used_not_replaced(tmp_path, monkeypatch,
                                                                         fake_gguf_conversion):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"A" * 64)
    target = models._gguf_cache_path(gguf)
    theirs = []
    import transformers

    save = transformers.PreTrainedModel.save_pretrained

    def while_we_save(self, directory, *a, **k):  # the other run wins the race as we write our copy
        save(self, directory, *a, **k)
        if not theirs:
            theirs.append(1)
            monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save)
            models.convert_gguf(gguf, log=lambda m: None)
            theirs.append((target / "config.json").stat().st_ino)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", while_we_save)
    assert models.convert_gguf(gguf, log=lambda m: None) == target
    assert (target / "config.json").stat().st_ino == theirs[1]  # theirs kept: before, replaced while in use
    assert not list(target.parent.glob(f".{target.name}.*"))  # no temporary left


def test_a_gguf_changed_while_converting_is_converted_again(tmp_path, monkeypatch, fake_gguf_conversion):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"A" * 64)
    import transformers

    load = transformers.AutoModelForCausalLM.from_pretrained

    def changing(*a, **k):  # the file is rewritten in place (size and mtime kept) while it is read
        rewrite_keeping_size_and_mtime(gguf, b"B" * 64)
        return load(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", changing)
    models.convert_gguf(gguf, log=lambda m: None)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)
    models.convert_gguf(gguf, log=lambda m: None)
    assert len(fake_gguf_conversion) == 2  # before: the conversion of the old bytes was taken for the new


def test_an_interrupted_or_failed_conversion_leaves_nothing_in_the_cache(tmp_path, monkeypatch, fake_gguf_conversion):
    """(review 117) SIGTERM while converting left the half conversion (517 MB for the embedded model) in the cache
    while the run said "nothing half-written is left"; a full disk was an internal error (SafetensorError) and left
    it too; a kill -9's leftover was never reclaimed."""
    import transformers
    from safetensors import SafetensorError

    from unlearn.errors import Terminated

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"A" * 64)
    target = models._gguf_cache_path(gguf)
    save = transformers.PreTrainedModel.save_pretrained

    def cut(error):
        def saving(self, directory, *a, **k):
            save(self, directory, *a, **k)
            raise error
        return saving

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", cut(Terminated("SIGTERM")))
    with pytest.raises(Terminated):
        models.convert_gguf(gguf, log=lambda m: None)
    assert not target.exists() and not list(target.parent.glob(f".{target.name}.*"))
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained",
                        cut(SafetensorError("Error while serializing: I/O error: No space left on device")))
    with pytest.raises(UnlearnError, match=r"could not write the converted model \(Error while serializing: I/O error: "
                                           r"No space left on device\); set UNLEARN_CACHE to a directory with room"):
        models.convert_gguf(gguf, log=lambda m: None)
    assert not target.exists() and not list(target.parent.glob(f".{target.name}.*"))
    # a kill -9's leftover (its process gone) is removed by the next conversion; a live one's is left alone
    import subprocess
    import sys

    import socket
    import time

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname().replace("-", "_")
    hour_ago = time.time() - models.DEAD_CONVERSION_SECONDS - 60
    made = {name: target.parent / f".{target.name}.tmp-{name}-x" for name in (
        f"{host}-{gone.pid}", f"{host}-{os.getpid()}", f"elsewhere-{gone.pid}", f"{gone.pid}")}
    recent = target.parent / f".{target.name}.tmp-{host}-{gone.pid}-recent"
    for path in [*made.values(), recent]:
        path.mkdir()
    for path in made.values():
        os.utime(path, (hour_ago, hour_ago))
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save)
    assert models.convert_gguf(gguf, log=lambda m: None) == target
    # only this host's, its process gone, untouched for an hour: another host's or container's pid means nothing
    # here, and a recent one may be a conversion under way
    assert [name for name, path in made.items() if not path.exists()] == [f"{host}-{gone.pid}"] and recent.exists()


@pytest.mark.parametrize("content, why", [(b"\xff", "can't decode"), (b"[]", "a JSON list, not an object")])
def test_a_damaged_checkpoint_state_is_one_line(tmp_path, content, why):
    (tmp_path / "state.json").write_bytes(content)
    with pytest.raises(UnlearnError, match=f"state.json: not a readable checkpoint state .*{why}"):
        read_state(tmp_path)


def fact_files(tmp_path):
    """A forget file of one fact and a normal file of four rows."""
    forget = tmp_path / "f.jsonl"
    forget.write_text(json.dumps({"prompt": "Who wrote it?", "response": "Rowling wrote it.", "answers": ["Rowling"]})
                      + "\n")
    normal = tmp_path / "n.jsonl"
    normal.write_text("".join(json.dumps({"prompt": f"Q{i}?", "response": f"A{i}."}) + "\n" for i in range(4)))
    return forget, normal


def test_resume_from_a_state_missing_a_key_is_one_line(tmp_path, llama_dir, cli):
    forget, normal = fact_files(tmp_path)
    out = tmp_path / "out"
    # lr 1e30: step 1 is finite, step 2 overflows: the run ends keeping the checkpoint of step 1
    args = ["run", forget, normal, "--model", llama_dir, "-o", out, "--check-every", "0", "--max-steps", "4",
            "--batch-size", "1", "--lr", "1e30", "--save-every", "1", "--no-probes"]
    assert cli(*args).code == 1
    state_path = out / "checkpoints" / "step-1" / "state.json"
    state = json.loads(state_path.read_text())
    del state["python_rng"]
    state_path.write_text(json.dumps(state))
    result = cli(*args, "--resume")
    assert result.code == 1
    assert result.err.strip().splitlines()[-1] == (f"unlearn: {state_path}: not a readable checkpoint state "
                                                   f"(KeyError: 'python_rng')")


def test_eval_says_what_it_read_back_from_the_cache(tmp_path, llama_dir, cli):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Who?", "response": "Him."}) + "\n")
    args = ["eval", rows, "--model", llama_dir, "--max-new-tokens", "2"]
    first, second = cli(*args, "--json"), cli(*args, "--json")
    assert json.loads(first.out)["reused"] == {"model": False, "reference": False}
    assert json.loads(second.out)["reused"] == {"model": True, "reference": False}
    assert "model read back from the cache (--no-cache measures again)" in cli(*args).out


def test_resume_with_another_generation_batch_size_is_refused_when_checks_answer_in_it(tmp_path, llama_dir, cli):
    forget, normal = fact_files(tmp_path)
    out = tmp_path / "out"
    args = ["run", forget, normal, "--model", llama_dir, "-o", out, "--check-every", "2", "--max-steps", "4",
            "--batch-size", "1", "--lr", "1e30", "--save-every", "1", "--no-probes", "--max-new-tokens", "2"]
    assert cli(*args).code == 1  # step 2 overflows before its check: the checkpoint of step 1 stays
    result = cli(*args, "--gen-batch-size", "3", "--resume")
    assert result.code == 2
    assert "(gen_batch_size: 128 then, 3 now)" in result.err  # the default, GEN_BATCH_SIZE


def test_converting_keeps_transformers_progress_bars_off_stderr(tmp_path, fake_gguf_conversion):
    """`run` converts before it loads (resolve_model_dir), where the bars were switched off: the conversion's
    "Loading weights" and "Writing model shards" bars reached a redirected stderr."""
    from transformers.utils import logging as hf_logging

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"A" * 64)
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        models.convert_gguf(gguf, log=lambda line: None)
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
