"""Streaming arithmetic on safetensors checkpoints: weight averaging and LoRA folding.

ULMR's last step is θa = α·θ + (1−α)·θ' over every weight of two checkpoints.
Models are large, so nothing here loads a model: each tensor is read through
`safe_open` in row chunks (zero-copy views of the memory-mapped file), combined
in float32 and streamed straight into the output file, whose safetensors
header is computed up front from the input headers. Peak memory is a few
chunk buffers, whatever the model size. No `torch.nn` and no transformers
model classes are imported: this only needs tensors.

The same machinery folds a PEFT-format LoRA adapter into its base model
(W + s·B·A), so an adapter can be turned into a plain checkpoint without
loading either model.

Every input is checked (headers, keys, shapes, dtypes) before the first byte
is written; the output is built in a temporary directory that is renamed into
place only when complete (see outputs.atomic_output_dir).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from unlearn.errors import UnlearnError, UsageError
from unlearn.outputs import atomic_output_dir, check_output_dir

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
# ...and combined in pieces of this many elements (1 MB of float32), which
# stay in the CPU cache through the few passes that the arithmetic makes.
PIECE_ELEMENTS = 1 << 18

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
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raise UnlearnError(f"{config_path}: not valid JSON") from None
    return config if isinstance(config, dict) else {}


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


# --------------------------------------------------------------------------
# Chunked arithmetic


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


class Buffers:
    """Reusable scratch space: a fresh allocation per chunk would fault its pages in every time."""

    def __init__(self):
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, key: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get((key, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            self._buffers[(key, dtype)] = buf
        return buf[:n]


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: this work is bound by memory bandwidth, so a second
    thread gains nothing, and on a busy machine OpenMP workers spinning at
    every small op's barrier cost several times the work itself (measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def compute_dtype(dtype: str) -> torch.dtype:
    return torch.float64 if dtype == "F64" else torch.float32


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled(x: torch.Tensor, factor: float, out: torch.Tensor) -> torch.Tensor:
    """OUT = factor·x in OUT's (compute) dtype; half-precision inputs are widened first."""
    if x.dtype == out.dtype:
        return torch.mul(x, factor, out=out)
    out.copy_(x)
    return out.mul_(factor)


def average_pieces(b: torch.Tensor, t: torch.Tensor, alpha: float, buffers: Buffers) -> Iterator[torch.Tensor]:
    """α·b + (1−α)·t in the compute dtype, cast back to b's dtype, one cache-sized piece at a time.

    Written as the two products and a sum, the exact operations of the formula,
    so float32 results equal torch's `alpha*b + (1-alpha)*t` bit for bit. The
    pieces are small enough to stay in the CPU cache across those three passes,
    so main memory sees each input read once and the result written once.
    Each piece is a view of a reused buffer: consume it before asking for the next.
    """
    ctype = compute_dtype_of(b.dtype)
    n = b.numel()
    step = min(PIECE_ELEMENTS, n)
    x_buf, y_buf = buffers.get("x", step, ctype), buffers.get("y", step, ctype)
    for start in range(0, n, step):
        stop = min(start + step, n)
        x = scaled(b[start:stop], alpha, x_buf[: stop - start])
        y = scaled(t[start:stop], 1.0 - alpha, y_buf[: stop - start])
        x.add_(y)
        yield x if b.dtype == ctype else x.to(b.dtype)


def copy_job(ckpt: Checkpoint, info: TensorInfo, name: str | None = None) -> Job:
    """A tensor passed through unchanged (bytes straight from the mapped file)."""
    def chunks():
        for rows in row_slices(info.shape):
            yield ckpt.read(info, rows)
    return Job(name or info.name, info.dtype, info.shape, chunks)


def average_job(name: str, base: Checkpoint, b: TensorInfo, tuned: Checkpoint, t: TensorInfo,
                alpha: float, buffers: Buffers) -> Job:
    """α·BASE + (1−α)·TUNED for one tensor, row chunk by row chunk."""
    def chunks():
        for rows in row_slices(b.shape):
            yield from average_pieces(base.read(b, rows), tuned.read(t, rows), alpha, buffers)
    return Job(name, b.dtype, b.shape, chunks)


# --------------------------------------------------------------------------
# Averaging


def check_alpha(alpha: float, allow_extrapolation: bool) -> None:
    """α outside [0, 1] extrapolates past one of the models: allowed only when asked for."""
    if math.isnan(alpha) or math.isinf(alpha):
        raise UsageError(f"--alpha {alpha}: must be a finite number")
    if not 0.0 <= alpha <= 1.0 and not allow_extrapolation:
        raise UsageError(f"--alpha {alpha}: must be between 0 and 1 (use --allow-extrapolation to go beyond)")


def _pair_tensors(base: Checkpoint, tuned: Checkpoint) -> tuple[dict, dict, dict]:
    """Output name -> (BASE tensor, TUNED tensor), standing a tied embedding in for a missing lm_head.

    Returns both maps (BASE's order, which the output keeps) and the config
    changes the output needs.
    """
    base_map, tuned_map = dict(base.tensors), dict(tuned.tensors)
    updates: dict = {}
    if (LM_HEAD in base_map) != (LM_HEAD in tuned_map):
        lacking = tuned if LM_HEAD in base_map else base
        embed = lacking.embedding_name()
        if not lacking.tied() or embed is None:
            raise UnlearnError(f"{lacking.label} {lacking.path} lacks {LM_HEAD} and its config does not tie "
                               "it to the input embedding")
        if lacking is tuned:
            tuned_map[LM_HEAD] = tuned.tensors[embed]
        elif tuned.tied():
            del tuned_map[LM_HEAD]  # TUNED stored its tied head anyway; the loaded model ignores it
        else:
            # TUNED's head is its own: the output keeps one too, untied in its config.
            base_map[LM_HEAD] = base.tensors[embed]
            updates["tie_word_embeddings"] = False
    return base_map, tuned_map, updates


def check_compatible(base_map: dict[str, TensorInfo], tuned_map: dict[str, TensorInfo],
                     base: Checkpoint, tuned: Checkpoint) -> None:
    """Same keys, shapes and dtypes on both sides; the first difference is named."""
    missing = [n for n in base_map if n not in tuned_map]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UnlearnError(f"tensor {missing[0]}: in BASE but not in TUNED {tuned.path}{more}")
    extra = [n for n in tuned_map if n not in base_map]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UnlearnError(f"tensor {extra[0]}: in TUNED but not in BASE {base.path}{more}")
    for name, b in base_map.items():
        t = tuned_map[name]
        if b.shape != t.shape:
            raise UnlearnError(f"tensor {name}: shape {list(b.shape)} in BASE but {list(t.shape)} in TUNED")
        if b.dtype != t.dtype:
            raise UnlearnError(f"tensor {name}: dtype {b.dtype} in BASE but {t.dtype} in TUNED")
        if b.dtype in UNSUPPORTED_FLOATS:
            raise UnlearnError(f"tensor {name}: cannot average quantised dtype {b.dtype}")


@dataclass
class MergeResult:
    """What a merge wrote; the CLI prints it and merge.json records it."""

    output: Path
    tensors: int
    bytes: int
    seconds: float
    files: list[str]

    def as_dict(self) -> dict:
        return {"output": str(self.output), "tensors": self.tensors, "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "files": self.files}


def average(base_path: Path, tuned_path: Path, out: Path, alpha: float, *, force: bool = False,
            max_shard_size: int | None = None, allow_extrapolation: bool = False,
            progress: Callable[[int], None] | None = None,
            on_start: Callable[[int], None] | None = None) -> MergeResult:
    """Write θa = α·BASE + (1−α)·TUNED to OUT, tensor by tensor, shaped like BASE.

    Everything is checked before the output directory is created, so an error
    leaves nothing behind. ON_START receives the number of bytes to write.
    """
    started = time.perf_counter()
    check_alpha(alpha, allow_extrapolation)
    out = Path(out)
    check_output_dir(out, force)
    base = open_checkpoint(base_path, "BASE")
    tuned = open_checkpoint(tuned_path, "TUNED")
    _refuse_overwriting_inputs(out, [base.path, tuned.path])
    base_map, tuned_map, config_updates = _pair_tensors(base, tuned)
    check_compatible(base_map, tuned_map, base, tuned)

    buffers = Buffers()
    jobs = []
    for name, b in base_map.items():
        if b.dtype in FLOAT_DTYPES:
            jobs.append(average_job(name, base, b, tuned, tuned_map[name], alpha, buffers))
        else:  # integer buffers (position ids, masks) are not weights: keep BASE's
            jobs.append(copy_job(base, b, name))
    layout = _layout(base_map)
    record = {"method": "average", "formula": "alpha*base + (1-alpha)*tuned", "alpha": alpha,
              "base": str(base.path.resolve()), "tuned": str(tuned.path.resolve())}
    return _write_output(out, force, base, jobs, layout, max_shard_size, config_updates, record,
                         started, progress, on_start, closing=[base, tuned])


def _refuse_overwriting_inputs(out: Path, inputs: list[Path]) -> None:
    """--force on an input directory would replace the model being read: refuse it plainly."""
    target = out.resolve()
    for path in inputs:
        source = path.resolve()
        if target == source or source in target.parents:
            raise UsageError(f"-o {out}: is an input model directory (or inside one); choose another output")


def _write_output(out: Path, force: bool, base: Checkpoint, jobs: list[Job], layout, max_shard_size,
                  config_updates: dict, record: dict, started: float, progress, on_start,
                  closing: list[Checkpoint]) -> MergeResult:
    """Shard, stream, copy side files and the record into a temporary directory, then rename it."""
    shards, indexed = plan_shards(jobs, layout, base.sharded, max_shard_size)
    if on_start:
        on_start(sum(job.nbytes for job in jobs))
    try:
        with atomic_output_dir(out, force) as tmp, one_thread():
            total = write_model(tmp, shards, indexed, progress)
            copy_side_files(base.path, tmp, config_updates)
            files = sorted(p.name for p in tmp.iterdir()) + [RECORD_FILE]
            seconds = time.perf_counter() - started
            record.update({"tensors": len(jobs), "bytes": total, "seconds": round(seconds, 3),
                           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    except OSError as exc:  # disk full, permissions: the temporary directory is already gone
        raise UnlearnError(f"{out}: could not write the output ({exc.strerror or exc})") from None
    finally:
        for ckpt in closing:
            ckpt.close()
    return MergeResult(out, len(jobs), total, seconds, sorted(files))


# --------------------------------------------------------------------------
# LoRA folding

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# peft saves `<module>.lora_A.weight`; some versions keep the adapter name (`.default`);
# embedding layers use `lora_embedding_A` without `.weight`.
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                      r"(?:\.default)?(?:\.weight)?$")


@dataclass
class LoraPair:
    """One low-rank update W += scale·B·A, located in the adapter file."""

    target: str
    a: TensorInfo
    b: TensorInfo
    scale: float
    transposed: bool  # delta = (B·A)ᵀ: embeddings, and Conv1D layers (fan_in_fan_out)


def read_adapter(path: Path) -> tuple[dict, Checkpoint]:
    """The adapter's config (checked) and its weights file, opened like a checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise UnlearnError(f"ADAPTER {path}: no such directory")
    config_path, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise UnlearnError(f"ADAPTER {path}: no {ADAPTER_CONFIG}")
    if not weights.is_file():
        hint = " (only adapter_model.bin: save it with safe_serialization)" if (path / "adapter_model.bin").exists() else ""
        raise UnlearnError(f"ADAPTER {path}: no {ADAPTER_WEIGHTS}{hint}")
    try:
        config = json.loads(config_path.read_text())
        assert isinstance(config, dict)
    except (OSError, ValueError, AssertionError):
        raise UnlearnError(f"{config_path}: not valid JSON") from None
    _check_adapter_config(config, config_path)
    adapter = Checkpoint(path, "ADAPTER", read_header(weights), [weights], False, config)
    adapter.handle(weights)
    return config, adapter


def _check_adapter_config(config: dict, config_path: Path) -> None:
    """Only plain LoRA can be folded as W + s·B·A; say so rather than fold something else wrongly."""
    if config.get("peft_type", "LORA") != "LORA":
        raise UnlearnError(f"{config_path}: peft_type {config['peft_type']} is not LORA")
    if config.get("use_dora"):
        raise UnlearnError(f"{config_path}: DoRA adapters are not supported")
    r, lora_alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(lora_alpha, (int, float)):
        raise UnlearnError(f"{config_path}: needs a positive integer r and a numeric lora_alpha")


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: a key matches the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_rank_and_scale(config: dict, module: str) -> tuple[int, float]:
    """(r, lora_alpha / r) for MODULE; rsLoRA divides by √r instead."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    lora_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return r, lora_alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def plan_lora(config: dict, adapter: Checkpoint, base: Checkpoint) -> tuple[dict[str, LoraPair], dict[str, TensorInfo]]:
    """The low-rank updates (by BASE tensor name) and the whole-tensor replacements
    (modules_to_save, trained biases) that the adapter holds, each checked against BASE."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    replacements: dict[str, TensorInfo] = {}
    for key, info in adapter.tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise UnlearnError(f"adapter tensor {key}: expected a name starting with {PEFT_PREFIX!r}")
        rest = key[len(PEFT_PREFIX):]
        match = LORA_KEY.match(rest)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = info
        elif "lora_" in rest:
            raise UnlearnError(f"adapter tensor {key}: not a plain LoRA weight (unsupported)")
        else:
            replacements[rest.replace(".modules_to_save.default.", ".")] = info
    pairs = {}
    for module, found in parts.items():
        pair = _lora_pair(module, found, config, base)
        pairs[pair.target] = pair
    for target, info in replacements.items():
        _check_target(base, target, info.name, info.shape)
    return pairs, replacements


def _lora_pair(module: str, found: dict[str, TensorInfo], config: dict, base: Checkpoint) -> LoraPair:
    embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
    a = found.get("lora_embedding_A" if embedding else "lora_A")
    b = found.get("lora_embedding_B" if embedding else "lora_B")
    if a is None or b is None or len(found) != 2:
        raise UnlearnError(f"adapter module {module}: needs exactly one A and one B matrix, found {sorted(found)}")
    target = module + ".weight"
    r, scale = lora_rank_and_scale(config, module)
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
        raise UnlearnError(f"adapter tensor {a.name}: shapes {list(a.shape)} and {list(b.shape)} "
                           f"do not form a rank-{r} update")
    transposed = embedding or bool(config.get("fan_in_fan_out"))
    delta_shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
    _check_target(base, target, a.name, delta_shape)
    return LoraPair(target, a, b, scale, transposed)


def _check_target(base: Checkpoint, target: str, key: str, shape: tuple[int, ...]) -> None:
    info = base.tensors.get(target)
    if info is None:
        raise UnlearnError(f"adapter tensor {key}: BASE {base.path} has no tensor {target}")
    if info.shape != tuple(shape):
        raise UnlearnError(f"adapter tensor {key}: updates {target} of shape {list(info.shape)} "
                           f"with shape {list(shape)}")
    if info.dtype not in FLOAT_DTYPES:
        raise UnlearnError(f"adapter tensor {key}: cannot update {target} of dtype {info.dtype}")


def fold_job(base: Checkpoint, info: TensorInfo, adapter: Checkpoint, pair: LoraPair, factor: float,
             buffers: Buffers) -> Job:
    """W + factor·scale·B·A for one weight, row chunk by row chunk, in float32.

    Written as peft's merge writes it, W + (B·A)·s, so folded weights match
    `merge_and_unload()`; FACTOR is 1−α when averaging with the folded model.
    """
    def chunks():
        ctype = compute_dtype(info.dtype)
        a = adapter.read(pair.a, None).reshape(pair.a.shape).to(ctype)
        b = adapter.read(pair.b, None).reshape(pair.b.shape).to(ctype)
        left, right = (a.T, b.T) if pair.transposed else (b, a)
        for rows in row_slices(info.shape):
            w = base.read(info, rows)
            x = scaled(w, 1.0, buffers.get("x", w.numel(), ctype))
            delta = (left[rows] @ right).mul_(pair.scale * factor)
            x.add_(delta.reshape(-1))
            yield x if w.dtype == ctype else x.to(w.dtype)
    return Job(info.name, info.dtype, info.shape, chunks)


def replace_job(info: TensorInfo, adapter: Checkpoint, source: TensorInfo) -> Job:
    """A tensor the adapter trained whole (modules_to_save, biases), in BASE's dtype."""
    dtype = TORCH_DTYPES[info.dtype]

    def chunks():
        for rows in row_slices(source.shape):
            yield adapter.read(source, rows).to(dtype)
    return Job(info.name, info.dtype, info.shape, chunks)


def fold_lora(base_path: Path, adapter_path: Path, out: Path, *, alpha: float = 0.0, force: bool = False,
              max_shard_size: int | None = None, allow_extrapolation: bool = False,
              progress: Callable[[int], None] | None = None,
              on_start: Callable[[int], None] | None = None) -> MergeResult:
    """Write BASE with the LoRA adapter folded in: W + (1−α)·s·B·A, shaped like BASE.

    With α = 0 (the default) this is the fine-tuned model θ' itself; any other
    α gives α·θ + (1−α)·θ', the ULMR average, without writing θ' first.
    """
    started = time.perf_counter()
    check_alpha(alpha, allow_extrapolation)
    out = Path(out)
    check_output_dir(out, force)
    base = open_checkpoint(base_path, "BASE")
    config, adapter = read_adapter(adapter_path)
    _refuse_overwriting_inputs(out, [base.path, adapter.path])
    pairs, replacements = plan_lora(config, adapter, base)

    buffers = Buffers()
    jobs = []
    for name, info in base.tensors.items():
        if name in pairs:
            jobs.append(fold_job(base, info, adapter, pairs[name], 1.0 - alpha, buffers))
        elif name in replacements:
            jobs.append(replace_job(info, adapter, replacements[name]))
        else:
            jobs.append(copy_job(base, info))
    record = {"method": "lora-fold", "formula": "W + (1-alpha)*scale*B@A", "alpha": alpha,
              "base": str(base.path.resolve()), "adapter": str(adapter.path.resolve()),
              "lora_modules": len(pairs), "replaced_tensors": len(replacements)}
    return _write_output(out, force, base, jobs, _layout(base.tensors), max_shard_size, {}, record,
                         started, progress, on_start, closing=[base, adapter])
