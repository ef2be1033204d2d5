"""Measurements that cannot change, kept on disk: the original model's answers and scores.

Every `unlearn run` measures the original model again on the same prompts with the same
settings, and users run many settings in a row. A measurement is a pure function of

    the model directory's content (`weights_fingerprint`: a SHA-256 over the bytes of the weight
    files and of every file that shapes how a prompt is tokenised, rendered and answered: config,
    tokenizer, chat template, generation config, custom code),
    the dtype and device kind they ran in,
    the set (its kind and every row: prompt, response, answers, ...), the rows a retain
    set is judged against, the judge, and the generation settings (budget, batch size:
    greedy answers of padded batches depend on the batch, sampling settings, seed),

so it is stored under `$UNLEARN_CACHE/measurements/<sha256 of all that>.json` and read
back when the same key comes again. `--no-cache` bypasses it (neither read nor written).
A file's hash is itself remembered by (path, size, mtime, inode, ctime), so a second run does
not read 500 MB to find its key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

from unlearn.data import Passage
from unlearn.paths import cache_dir

# Bump when what a measurement contains changes (2: generation drops rows that have ended; 3: similarity 1
# for an empty answer against an empty original answer, `evaluate.answer_similarity`; 4: a passage's prefix is
# keyed as a passage, not as the same string as a chat prompt, and `--do-sample` samples without transformers'
# hidden top-50 cut; 5: a summary says how many rows its accuracy is a share of, `accuracy_rows`; 6: classifier
# judges and reward models score each row as if alone and empty rows as one token, hallucinated responses are
# clipped like responses, "As an AI" needs its article; 7: under a sliding window (Mistral, Gemma 2/3) a
# generation batch no longer shares its prompt prefix, which changed the answers of its shorter rows; 8: ROUGE
# tokens include the words of scripts rouge-score drops, which changes similarity and leaks on such text; 9:
# answers are found in Korean before a particle, across Arabic tatweel and short vowels, in other digits; 10: and
# inside Thai, Lao, Myanmar and Khmer sentences; 11: a response is scored as the tokens the model reads after its
# prompt, not as tokenised alone (SentencePiece's "▁"), and generation ends at the template's end-of-turn token;
# 12: without a chat template an answer ends at the format's next turn and no EOS is scored after it; 13: that
# turn is a whole "### Question:" or "### Answer:" marker, not any "###", which cut Markdown headings; 14: and
# not one that opens the answer, restating its own turn; 15: such a row stops generating once its next turn has
# begun, so it leaves its batch sooner, which changes the later steps' shapes and so the float rounding of
# the rows still generating; 16: a row without `answers` whose question offers its answers, "X or Y", is judged by
# the choice its response names, spans._chosen_alternative; 17: a reverted candidate's, never to be used again;
# 18: that choice gives way to a name or number the response adds, and to a denial; 19: a response naming
# both choices answers by the one it does not deny, "hot, not cold"; 20: without a chat template, an answer that
# opens with the next "### Question:" is empty, not that question, and a row with perturbed answers and no
# paraphrase has a truth ratio against its response; 21: a single letter that ends a sentence is no initial of the
# next one's, "vitamin C. I think" holds "vitamin C": metrics._merge_initials; an answer found with initials joined
# or with every letter apart counts: metrics.contains_answer).
VERSION = 21


# Files of a model directory that cannot change what `unlearn` measures, left out of `weights_fingerprint`:
# documentation and pictures, version-control and editor files (hidden names), and weight formats the
# loader never reads (it reads safetensors, or with --allow-pickle the .bin pickles: models.load_model),
# such as a GGUF copy or a Trainer checkpoint's optimizer.pt, which would cost a read of gigabytes
# for nothing. Everything else counts: a file nobody listed (a new tokenizer's vocabulary, a custom
# code file) costs at worst a measurement made again, where a file left out returns stale answers.
_INERT_SUFFIXES = frozenset({
    ".md", ".rst", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".pdf",
    ".h5", ".msgpack", ".onnx", ".gguf", ".ckpt", ".pt", ".pth", ".tflite", ".ot", ".mlmodel",
})
_INERT_NAMES = ("license", "licence", "notice", "copying", "readme")

# The one subdirectory a tokenizer reads (transformers' CHAT_TEMPLATE_DIR): named chat templates.
CHAT_TEMPLATE_DIR = "additional_chat_templates"


def fingerprinted_files(model_dir: Path) -> list[Path]:
    """The files of MODEL_DIR `weights_fingerprint` hashes, sorted by their path within it.

    A measurement depends on more than the weights: the tokenizer's files (tokenizer.json,
    tokenizer.model, vocab and merges, added and special tokens), tokenizer_config.json and
    chat_template.jinja / chat_template.json (the chat template that renders every prompt:
    `data.render_prompt`), generation_config.json (end-of-text ids and the logits processors that send
    greedy decoding to `model.generate`: `generation._own_loop_applies`), config.json and custom code.
    So every regular file of the directory counts (and the chat templates under CHAT_TEMPLATE_DIR), but
    hidden ones and those with an _INERT_SUFFIXES suffix or an _INERT_NAMES stem. Symbolic links are
    followed (a Hugging Face cache snapshot is made of them)."""
    model_dir = Path(model_dir)

    def counts(path: Path) -> bool:
        name = path.name
        return (path.is_file() and not name.startswith(".") and path.suffix.lower() not in _INERT_SUFFIXES
                and name.split(".")[0].lower() not in _INERT_NAMES)

    files = [p for p in model_dir.iterdir() if counts(p)]
    templates = model_dir / CHAT_TEMPLATE_DIR
    if templates.is_dir():
        files += [p for p in templates.iterdir() if counts(p)]
    return sorted(files, key=lambda p: p.relative_to(model_dir).as_posix())


def file_identities(model_dir: Path) -> tuple | None:
    """What `weights_fingerprint` knows each file by (its path within MODEL_DIR, size, mtime, inode and change time),
    for every fingerprinted file: equal before a model loads and once its content is hashed when no file of it
    changed in between (a copy renamed into place, a file rewritten). None where the directory cannot be read."""
    try:
        model_dir = Path(model_dir)
        return tuple((p.relative_to(model_dir).as_posix(), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
                     for p in fingerprinted_files(model_dir) for st in (p.stat(),))
    except OSError:
        return None


def weights_fingerprint(model_dir: Path) -> str:
    """SHA-256 over the content of MODEL_DIR's `fingerprinted_files` (weights, config, tokenizer, chat
    template, generation config, ...), each named by its path within the directory.

    The name is older than its scope: it keys every measurement of the model in that directory, and
    the rows are in the key as written, not as rendered, so a changed chat template or tokenizer must
    change it. Each file's hash is remembered by (resolved path, size, mtime, inode, ctime) in the cache's
    weight_hashes.json: the weights are read once, not at every run.
    """
    from unlearn.system import file_sha256

    model_dir = Path(model_dir)
    index_path = cache_dir() / "weight_hashes.json"
    try:
        known = json.loads(index_path.read_text())
    except (OSError, ValueError):  # absent, cut, or a stray byte (UnicodeDecodeError): hash again
        known = {}
    if not isinstance(known, dict):
        known = {}
    parts, changed = [], False
    for path in fingerprinted_files(model_dir):
        stat = path.stat()
        # The inode and the change time too: a file rewritten with the same size and its mtime put back (cp -p,
        # rsync -a, an unpacked archive) kept its old hash, and the run printed the old weights' figures.
        # ctime cannot be set back, and an untouched file keeps it, so the read is still saved.
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}"
        if key not in known:
            known[key] = file_sha256(path)
            changed = True
        parts.append(f"{path.relative_to(model_dir).as_posix()}:{known[key]}")
    if changed:
        try:
            _write_json(index_path, known)
        except OSError:
            pass  # a read-only or full cache costs the hashing again next time, never the result
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def state_fingerprint(model) -> str:
    """SHA-256 over a model's current weights in memory: every parameter and buffer, by name, dtype,
    shape and bytes, and each LoRA adapter's scaling and on/off switch.

    The trained model's measurements are as pure a function of its weights as the original's:
    training on the CPU is deterministic, so a second identical run reaches the same weights and
    reuses the first run's "after" measurements. Hashing reads every weight once (about 0.4 s for
    the 135M default in float32), much less than the answers it can save.
    """
    import torch

    from unlearn.lora import lora_modules

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
            # flattened first: a 0-dim tensor (Gemma's `embed_scale` buffer) has no bytes view; the shape is hashed above
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    for name, module in sorted(lora_modules(model).items()):
        digest.update(f"{name}|{module.scaling}|{module.enabled}".encode())
    return digest.hexdigest()


def _plain(value):
    """VALUE as JSON-ready data (dataclasses and paths included) for hashing."""
    if is_dataclass(value):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Passage):  # continued as raw text: not the chat prompt of the same characters
        return {"passage": str(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def key(**parts) -> str:
    """The cache key of a measurement: SHA-256 of everything it depends on, as canonical JSON."""
    text = json.dumps(_plain({"version": VERSION, **parts}), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _path(k: str) -> Path:
    return cache_dir() / "measurements" / f"{k}.json"


def load(k: str):
    """The value stored under K, or None: absent, a half-written file from a killed run, or a damaged one
    (a stray byte is a UnicodeDecodeError, a ValueError): measure again. Callers check its shape."""
    try:
        return json.loads(_path(k).read_text())
    except (OSError, ValueError):
        return None


def store(k: str, value: dict) -> None:
    try:
        _write_json(_path(k), value)
    except OSError:
        pass  # a read-only or full cache costs time, never the result


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a full cache: no empty temporary file left behind (review 117)
        raise
