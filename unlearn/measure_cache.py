"""Measurements that cannot change, kept on disk: the original model's answers and scores.

Every `unlearn run` measures the original model again on the same prompts with the same
settings, and users run many settings in a row. A measurement is a pure function of

    the weights (their content: a SHA-256 over the weight files' bytes),
    the dtype and device kind they ran in,
    the set (its kind and every row: prompt, response, answers, ...), the rows a retain
    set is judged against, the judge, and the generation settings (budget, batch size:
    greedy answers of padded batches depend on the batch, sampling settings, seed),

so it is stored under `$UNLEARN_CACHE/measurements/<sha256 of all that>.json` and read
back when the same key comes again. `--no-cache` bypasses it (neither read nor written).
A weight file's hash is itself remembered by (path, size, mtime), so a second run does not
read 500 MB to find its key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

from unlearn.paths import cache_dir

VERSION = 2  # bump when what a measurement contains changes (2: generation drops rows that have ended)


def weights_fingerprint(model_dir: Path) -> str:
    """SHA-256 over the model directory's weight files (safetensors/bin) and config, by content."""
    from unlearn.system import file_sha256

    model_dir = Path(model_dir)
    index_path = cache_dir() / "weight_hashes.json"
    try:
        known = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    files = sorted(p for p in model_dir.iterdir()
                   if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json"))
    parts, changed = [], False
    for path in files:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in known:
            known[key] = file_sha256(path)
            changed = True
        parts.append(f"{path.name}:{known[key]}")
    if changed:
        _write_json(index_path, known)
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
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    for name, module in sorted(lora_modules(model).items()):
        digest.update(f"{name}|{module.scaling}|{module.enabled}".encode())
    return digest.hexdigest()


def _plain(value):
    """VALUE as JSON-ready data (dataclasses and paths included) for hashing."""
    if is_dataclass(value):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
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


def load(k: str) -> dict | None:
    try:
        return json.loads(_path(k).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # absent, or a half-written file from a killed run: measure again


def store(k: str, value: dict) -> None:
    try:
        _write_json(_path(k), value)
    except OSError:
        pass  # a read-only or full cache costs time, never the result


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
