"""Reading and writing safetensors checkpoints a tensor at a time, with no model loaded.

Each tensor is read through `safe_open` in row chunks (zero-copy views of the
memory-mapped file) and an output file is streamed from `Job`s whose chunks are
computed on demand, after a header computed up front from the inputs' headers.
Peak memory is a few chunk buffers, whatever the model size. The arithmetic on the
tensors (averaging, LoRA folding) lives in `averaging`; this module only moves bytes.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from unlearn.errors import UnlearnError, UsageError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
RECORD_FILE = "merge.json"
LM_HEAD = "lm_head.weight"

# Bytes per element of every safetensors dtype we can stream.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}
# Averaged in float32 (float64 stays float64: rounding it to float32 would lose what it keeps).
FLOAT_DTYPES = set(TORCH_DTYPES)
# Quantised floats come with scales elsewhere in the checkpoint: averaging their raw values is wrong.
UNSUPPORTED_FLOATS = {"F8_E4M3", "F8_E5M2"}

# Rows are read this many elements at a time (16 MB of float32): large enough
# that per-read overhead is negligible, small enough to keep peak memory flat.
CHUNK_ELEMENTS = 1 << 22


# Names of the input-embedding tensor that a tied lm_head shares, most common first.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
                      "tok_embeddings.weight", "embed_in.weight")

# Files copied verbatim from BASE so that the output loads like the input.
SIDE_FILE_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                      "added_tokens.json", "vocab.*", "merges.txt", "chat_template*", "*.tiktoken",
                      "spiece.model", "sentencepiece*.model", "preprocessor_config.json")

# safetensors refuses headers above 100 MB; anything larger is corruption, not a model.
MAX_HEADER_BYTES = 100_000_000


# --------------------------------------------------------------------------
# Reading checkpoints


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives, read from a safetensors header (no data touched)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


@dataclass
class Checkpoint:
    """A safetensors model directory: its tensors in storage order, its files and its config."""

    path: Path
    label: str  # BASE / TUNED / ADAPTER: how errors name this input
    tensors: dict[str, TensorInfo]
    files: list[Path]
    sharded: bool
    config: dict = field(default_factory=dict)
    _handles: dict = field(default_factory=dict, repr=False)

    def handle(self, file: Path):
        """The open safe_open handle of FILE (opened once, memory-mapped, cheap to keep)."""
        if file not in self._handles:
            self._handles[file] = _safe_open(file)
        return self._handles[file]

    def read(self, info: TensorInfo, rows: slice | None) -> torch.Tensor:
        """Rows ROWS of a tensor (all of it for None), as a flat tensor; a view of the mapped file."""
        try:
            handle = self.handle(info.file)
            tensor = handle.get_tensor(info.name) if rows is None else handle.get_slice(info.name)[rows]
        except SafetensorError as exc:
            raise UnlearnError(f"{info.file}: unreadable tensor {info.name} ({exc})") from None
        return tensor.reshape(-1)

    def close(self) -> None:
        self._handles.clear()

    def tied(self) -> bool:
        """Whether lm_head shares the input embedding. An absent flag counts as tied only
        when lm_head.weight is also absent, the one reading under which the checkpoint loads."""
        flag = self.config.get("tie_word_embeddings")
        return (LM_HEAD not in self.tensors) if flag is None else bool(flag)

    def embedding_name(self) -> str | None:
        """The input-embedding tensor a tied lm_head stands for, if one is recognisable."""
        for suffix in EMBEDDING_SUFFIXES:
            names = [n for n in self.tensors if n == suffix or n.endswith("." + suffix)]
            if len(names) == 1:
                return names[0]
        return None


def _safe_open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as exc:
        raise UnlearnError(f"{file}: corrupt safetensors file ({exc})") from None
    except OSError as exc:
        raise UnlearnError(f"{file}: cannot open ({exc.strerror})") from None


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header before any tensor is used.

    A copy interrupted half-way leaves a file whose header promises more data
    than the file holds; mmap-ing it would fail late (or crash), so the length
    of the header and the extent of every tensor are checked against the file
    size here, and the whole file must be covered, as safetensors requires.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise UnlearnError(f"{file}: truncated safetensors file ({size} bytes, not even a header)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
                raise UnlearnError(f"{file}: truncated or corrupt safetensors file "
                                   f"(header claims {header_len} bytes, file has {size - 8} after the length)")
            raw = fh.read(header_len)
    except OSError as exc:
        raise UnlearnError(f"{file}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UnlearnError(f"{file}: corrupt safetensors file (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise UnlearnError(f"{file}: corrupt safetensors file (header is not a JSON object)")
    return _tensor_infos(file, header, size - 8 - header_len)


def _tensor_infos(file: Path, header: dict, data_size: int) -> dict[str, TensorInfo]:
    """TensorInfos in storage order, each checked to fit the data area exactly."""
    entries = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UnlearnError(f"{file}: corrupt safetensors header (entry {name})") from None
        if dtype not in DTYPE_SIZES:
            raise UnlearnError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (0 <= start <= end):
            raise UnlearnError(f"{file}: corrupt safetensors header (entry {name})")
        info = TensorInfo(name, dtype, shape, file)
        if end - start != info.nbytes:
            raise UnlearnError(f"{file}: corrupt safetensors header (tensor {name} has the wrong byte length)")
        if end > data_size:
            raise UnlearnError(f"{file}: truncated safetensors file (tensor {name} ends at byte {end} "
                               f"of the data, which holds only {data_size})")
        entries.append((start, end, info))
    entries.sort(key=lambda e: (e[0], e[1]))
    covered = max((e[1] for e in entries), default=0)
    if covered != data_size:
        raise UnlearnError(f"{file}: corrupt safetensors file ({data_size - covered} bytes after the last tensor)")
    return {info.name: info for _, _, info in entries}


def open_checkpoint(path: Path, label: str) -> Checkpoint:
    """Find and check the safetensors weights of a model directory (single file or sharded)."""
    path = Path(path)
    if not path.exists():
        raise UnlearnError(f"{label} {path}: no such directory")
    if not path.is_dir():
        raise UnlearnError(f"{label} {path}: not a directory (give the model's directory)")
    if (path / INDEX_FILE).is_file():
        tensors, files = _read_index(path / INDEX_FILE)
        sharded = True
    elif (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
        tensors = read_header(files[0])
        sharded = False
    else:
        hint = " (only PyTorch .bin weights: convert them to safetensors first)" if any(path.glob("*.bin")) else ""
        raise UnlearnError(f"{label} {path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    ckpt = Checkpoint(path, label, tensors, files, sharded, _read_config(path))
    for file in files:  # let safetensors validate too, so no error surfaces mid-write
        ckpt.handle(file)
    return ckpt


def _read_index(index_path: Path) -> tuple[dict[str, TensorInfo], list[Path]]:
    """Tensors of a sharded checkpoint, shard by shard in storage order, as the index maps them."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UnlearnError(f"{index_path}: corrupt index (no valid weight_map)") from None
    tensors: dict[str, TensorInfo] = {}
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        file = index_path.parent / shard
        if not file.is_file():
            raise UnlearnError(f"{file}: missing shard named by {index_path.name}")
        files.append(file)
        for name, info in read_header(file).items():
            if weight_map.get(name) == shard:
                tensors[name] = info
    for name, shard in weight_map.items():
        if name not in tensors:
            raise UnlearnError(f"{index_path.parent / shard}: does not hold tensor {name} that {index_path.name} names")
    return tensors, files


def _read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.exists():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError):
        raise UnlearnError(f"{config_path}: not valid JSON") from None
    if not isinstance(config, dict):  # it is copied into the output, which no loader could then read
        raise UnlearnError(f"{config_path}: not a JSON object (a model's config is one)")
    return config


# --------------------------------------------------------------------------
# Writing checkpoints


@dataclass
class Job:
    """One output tensor: its header entry and a generator of its data, chunk by chunk."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def parse_size(text: str) -> int:
    """'2GB' -> 2·10⁹, '500MiB' -> 500·2²⁰, '1000' -> 1000 bytes (Hugging Face's convention)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise UsageError(f"--max-shard-size {text!r}: expected a size such as 500MB or 2GB")
    number, prefix, unit = match.groups()
    base = 1024 if unit == "IB" else 1000
    size = int(float(number) * base ** " KMGT".index(prefix or " "))
    if size <= 0:
        raise UsageError(f"--max-shard-size {text!r}: must be positive")
    return size


def plan_shards(jobs: list[Job], layout: list[tuple[str, list[str]]], sharded: bool,
                max_shard_size: int | None) -> tuple[list[tuple[str, list[Job]]], bool]:
    """Group jobs into output files: BASE's own layout, or greedy packing under MAX_SHARD_SIZE.

    Returns the (file name, jobs) list and whether an index is needed.
    """
    by_name = {job.name: job for job in jobs}
    if max_shard_size is None:
        shards = [(file, [by_name[n] for n in names if n in by_name]) for file, names in layout]
        return [s for s in shards if s[1]] or [(SINGLE_FILE, [])], sharded
    groups: list[list[Job]] = [[]]
    size = 0
    for job in jobs:
        if groups[-1] and size + job.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.nbytes
    if len(groups) == 1:
        return [(SINGLE_FILE, groups[0])], False
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)], True


def _header_bytes(jobs: list[Job]) -> bytes:
    """The safetensors header for JOBS, padded with spaces to 8 bytes so the data stays aligned."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in jobs:
        header[job.name] = {"dtype": job.dtype, "shape": list(job.shape),
                            "data_offsets": [offset, offset + job.nbytes]}
        offset += job.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(file: Path, jobs: list[Job], progress: Callable[[int], None] | None = None) -> None:
    """Stream JOBS into FILE: header first (all sizes are known), then each tensor's chunks in order."""
    with open(file, "wb", buffering=0) as out:
        out.write(_header_bytes(jobs))
        for job in jobs:
            written = 0
            for chunk in job.chunks():
                data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                _write_all(out, memoryview(data))
                written += data.nbytes
                if progress:
                    progress(data.nbytes)
            if written != job.nbytes:  # a bug of ours, never a user error: refuse to leave a bad file
                raise UnlearnError(f"{file}: internal error writing {job.name} ({written} of {job.nbytes} bytes)")


def _write_all(out, data: memoryview) -> None:
    """An unbuffered write may be short (Linux caps one write near 2 GB): loop until all is out."""
    while data:
        data = data[out.write(data):]


def write_model(tmp: Path, shards: list[tuple[str, list[Job]]], indexed: bool,
                progress: Callable[[int], None] | None) -> int:
    """Write every shard (and the index when sharded) into TMP; return the bytes of tensor data."""
    total = sum(job.nbytes for _, jobs in shards for job in jobs)
    for file_name, jobs in shards:
        write_safetensors(tmp / file_name, jobs, progress)
    if indexed:
        weight_map = {job.name: file_name for file_name, jobs in shards for job in jobs}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return total


def copy_side_files(src: Path, dst: Path, config_updates: dict | None = None) -> list[str]:
    """Copy config, generation config and tokenizer files from SRC, so the output loads alone."""
    copied = []
    for pattern in SIDE_FILE_PATTERNS:
        for file in sorted(src.glob(pattern)):
            if file.is_file() and not (dst / file.name).exists():
                shutil.copy2(file, dst / file.name)
                copied.append(file.name)
    if config_updates and (dst / "config.json").is_file():
        config = json.loads((dst / "config.json").read_text())
        config.update(config_updates)
        (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return copied


def _layout(tensors: dict[str, TensorInfo]) -> list[tuple[str, list[str]]]:
    """The files of a checkpoint and the output names each holds, in storage order."""
    layout: dict[str, list[str]] = {}
    for name, info in tensors.items():
        layout.setdefault(info.file.name, []).append(name)
    return list(layout.items())


def row_slices(shape: tuple[int, ...], chunk_elements: int | None = None) -> Iterator[slice | None]:
    """Slices of the first dimension covering about CHUNK_ELEMENTS each; None for a scalar."""
    chunk_elements = chunk_elements or CHUNK_ELEMENTS
    if not shape:
        yield None
        return
    if math.prod(shape) == 0:
        return
    row = math.prod(shape[1:])
    step = max(1, chunk_elements // row)
    for start in range(0, shape[0], step):
        yield slice(start, min(start + step, shape[0]))
