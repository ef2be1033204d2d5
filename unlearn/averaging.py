"""θa = α·θ + (1−α)·θ': ULMR's parameter averaging, on disk and in memory, and the rule that picks α.

θ is the original model and θ' the fine-tuned one: α = 1 is the original (nothing
forgotten, nothing lost), α = 0 the fine-tuned model (most forgotten, most drift).

- On disk (`average`, `fold_lora`): two checkpoints, or a base and a PEFT LoRA
  adapter (W + (1−α)·s·B·A), are combined tensor by tensor in float32 and cast
  back, streamed through `tensor_io` so no model is loaded and memory stays flat.
  Every input is checked before the first byte is written; the output appears whole
  or not at all (`outputs.atomic_output_dir`).
- In memory (`ModelAverage`): the model `unlearn run` has just fine-tuned, at any α
  and back again, without writing θ' first.
- Choosing α (`score`, `recommend`): the rule is in `recommend`'s docstring.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import torch

from unlearn.errors import UnlearnError, UsageError
from unlearn.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_KEY, PEFT_PREFIX, lora_modules, lora_rank_and_scale
from unlearn.lora import read_adapter_config
from unlearn.outputs import atomic_output_dir, check_output_dir, refuse_output_over_inputs
from unlearn.stored_names import stored_names
from unlearn.tensor_io import (FLOAT_DTYPES, LM_HEAD, RECORD_FILE, TORCH_DTYPES, UNSUPPORTED_FLOATS, Checkpoint, Job,
                               TensorInfo, _layout, copy_side_files, open_checkpoint, plan_shards, read_header,
                               row_slices, write_model)

# ...and combined in pieces of this many elements (1 MB of float32), which
# stay in the CPU cache through the few passes that the arithmetic makes.
PIECE_ELEMENTS = 1 << 18



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


def check_finite(piece: torch.Tensor, name: str, alpha: float | None, formula: str, inputs) -> None:
    """Refuse a merged PIECE of tensor NAME that holds inf or nan, before it is written: a finite α can
    still overflow (--alpha 1e38 --allow-extrapolation: α·BASE is past float32's range), and so can the
    cast back to a half-precision checkpoint's dtype. The output's temporary directory is then removed
    (`outputs.atomic_output_dir`), so nothing is written. The test is the piece's float32 sum, one read of a
    piece in the CPU cache already: any inf or nan makes it inf or nan, and only then is every element
    looked at (a sum of finite values can overflow too). isfinite(piece).all() on every piece made the
    averaging arithmetic 3x slower (16M elements: 0.022 -> 0.071 s; the sum, 0.022 s). Only on failure are
    the input pieces read again (INPUTS: (label, read) pairs), to say whether an input brought the inf or
    nan rather than the arithmetic."""
    if bool(torch.isfinite(piece.sum(dtype=torch.float32))) or bool(torch.isfinite(piece).all()):
        return
    brought = [label for label, read in inputs if not bool(torch.isfinite(read()).all())]
    at = f"--alpha {alpha_label(alpha)}: " if alpha is not None else ""
    dtype = str(piece.dtype).removeprefix("torch.")
    why = (f"{' and '.join(brought)} already hold{'s' if len(brought) == 1 else ''} inf or nan there" if brought
           else f"{formula} is past {dtype}'s range")
    raise UnlearnError(f"{at}the merged tensor {name} is not finite ({why}); nothing was written")


def average_job(name: str, base: Checkpoint, b: TensorInfo, tuned: Checkpoint, t: TensorInfo,
                alpha: float, buffers: Buffers) -> Job:
    """α·BASE + (1−α)·TUNED for one tensor, row chunk by row chunk, each piece checked finite."""
    def chunks():
        for rows in row_slices(b.shape):
            inputs = (("BASE", lambda: base.read(b, rows)), ("TUNED", lambda: tuned.read(t, rows)))
            for piece in average_pieces(base.read(b, rows), tuned.read(t, rows), alpha, buffers):
                check_finite(piece, name, alpha, "α·BASE + (1−α)·TUNED", inputs)
                yield piece
    return Job(name, b.dtype, b.shape, chunks)


# --------------------------------------------------------------------------
# Averaging


def alpha_label(alpha: float) -> str:
    """α as every directory name, JSON key, log line and default output name shows it: `%g` (0.3, 1), unless
    that reads back as another float (0.30000001 is not 0.3, 0.9999999 is not 1), then the shortest exact
    form (repr). Two α of one list then never share a label (`alpha-A`, a JSON key), and no label names a
    model averaged at another α."""
    short = f"{alpha:g}"
    return short if float(short) == alpha else repr(alpha)


def check_alpha(alpha: float, allow_extrapolation: bool, flag: str = "--alpha", given=None,
                offers_extrapolation: bool = True) -> None:
    """α outside [0, 1] extrapolates past one of the models: allowed only when asked for (`--alpha`'s
    --allow-extrapolation). FLAG and GIVEN (the option's text) name it in the message; the hint to
    --allow-extrapolation only where the command has it (OFFERS_EXTRAPOLATION: `merge`, not `run`)."""
    from unlearn.config import FLOAT32_MAX

    given = alpha if given is None else given
    if math.isnan(alpha) or math.isinf(alpha):
        raise UsageError(f"{flag} {given}: must be a finite number")
    if not 0.0 <= alpha <= 1.0 and not allow_extrapolation:
        raise UsageError(f"{flag} {given}: must be between 0 and 1"
                         + (" (use --allow-extrapolation to go beyond)" if flag == "--alpha" and offers_extrapolation
                            else ""))
    if abs(alpha) > FLOAT32_MAX:  # (extrapolating) the average is computed in float32, where α would be ±inf
        raise UsageError(f"{flag} {given}: out of float32's range: |α| must be at most {FLOAT32_MAX:.2g}")


def _prefix_map(longs, shorts: set) -> dict[str, str]:
    """{name: name without its leading components} for the names of LONGS that are one prefix ("transformer.",
    "model.") before a name of SHORTS; {} when there is no such prefix. The prefix is the first that maps a name."""
    for long in longs:
        for i, ch in enumerate(long):
            if ch == "." and long[i + 1:] in shorts:
                prefix = long[:i + 1]
                return {n: n[len(prefix):] for n in longs if n.startswith(prefix) and n[len(prefix):] in shorts}
    return {}


def base_names(base_tensors, names) -> dict[str, str]:
    """{name: BASE's name of that tensor} for the NAMES that BASE stores under another prefix; {} if none.

    transformers loads a checkpoint saved from the base model alone, as the hub's GPT-2 ("h.0.attn.c_attn.weight")
    and OPT ones were, and one saved with its head ("transformer.h.0.attn.c_attn.weight": a run's model/, peft's
    adapter keys). Matched by name alone, every merge of such a pair was refused (a tensor "in BASE but not in
    TUNED"); the output keeps BASE's names, which load as BASE does."""
    stored, given = set(base_tensors), set(names)
    lacking = [n for n in names if n not in stored]
    if not lacking:
        return {}
    shorter = _prefix_map(lacking, stored)  # NAMES have a prefix BASE's lack
    if not shorter:
        longer = _prefix_map([n for n in stored if n not in given], set(lacking))  # BASE's have one NAMES lack
        shorter = {short: long for long, short in longer.items()}
    # a name the other side also has as it is ("mtp.lm_head.weight" beside "lm_head.weight") is another tensor,
    # not the same one under a prefix: paired, it would stand in for that one and be averaged in its place
    return {name: base for name, base in shorter.items() if base not in given}


def base_aliases(base: Checkpoint, names) -> dict[str, str]:
    """`base_names`, and for NAMES still not in BASE, the name transformers stores them under in a checkpoint of
    BASE's kind where that is another (`stored_names`: Gemma 3's image-and-text models, whose loaded names, PEFT's
    adapter keys among them, are not BASE's under a prefix)."""
    alias = base_names(base.tensors, names)
    lacking = [n for n in names if n not in base.tensors and n not in alias]
    if lacking:
        alias.update({n: s for n, s in stored_names(base.config, lacking).items() if s in base.tensors})
    return alias


def _pair_tensors(base: Checkpoint, tuned: Checkpoint) -> tuple[dict, dict, dict]:
    """Output name -> (BASE tensor, TUNED tensor), standing a tied embedding in for a missing lm_head.

    Returns both maps (BASE's order, which the output keeps) and the config
    changes the output needs.
    """
    base_map, updates = dict(base.tensors), {}
    renamed = base_aliases(base, list(tuned.tensors))
    tuned_map = {renamed.get(name, name): info for name, info in tuned.tensors.items()}
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
    refuse_output_over_inputs(out, [base.path, tuned.path], inside_too=True)
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


def check_mergeable(base_path: Path, tuned_path: Path | None, adapter_path: Path | None) -> None:
    """What `average` and `fold_lora` check before writing, done once up front: a sweep measures the
    original model first (minutes), and a BASE/TUNED mismatch should not wait for it."""
    base = open_checkpoint(base_path, "BASE")
    try:
        if adapter_path is not None:
            config, adapter = read_adapter(adapter_path)
            try:
                plan_lora(config, adapter, base)
            finally:
                adapter.close()
        else:
            tuned = open_checkpoint(tuned_path, "TUNED")
            try:
                base_map, tuned_map, _ = _pair_tensors(base, tuned)
                check_compatible(base_map, tuned_map, base, tuned)
            finally:
                tuned.close()
    finally:
        base.close()


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

@dataclass
class LoraPair:
    """One low-rank update W += scale·B·A, located in the adapter file."""

    target: str
    a: TensorInfo
    b: TensorInfo
    scale: float
    transposed: bool  # delta = (B·A)ᵀ: embeddings, and Conv1D layers (fan_in_fan_out)


def read_adapter(path: Path) -> tuple[dict, Checkpoint]:
    """The adapter's config (checked by `lora.read_adapter_config`) and its weights file, opened like a checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise UnlearnError(f"ADAPTER {path}: no such directory")
    weights = path / ADAPTER_WEIGHTS
    if not (path / ADAPTER_CONFIG).is_file():
        raise UnlearnError(f"ADAPTER {path}: no {ADAPTER_CONFIG}")
    if not weights.is_file():
        hint = " (only adapter_model.bin: save it with safe_serialization)" if (path / "adapter_model.bin").exists() else ""
        raise UnlearnError(f"ADAPTER {path}: no {ADAPTER_WEIGHTS}{hint}")
    config = read_adapter_config(path)
    adapter = Checkpoint(path, "ADAPTER", read_header(weights), [weights], False, config)
    adapter.handle(weights)
    return config, adapter


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
            # peft names a trained bias of an adapted layer, and the copy of an adapted embedding's weight it
            # saves by default, under the wrapped layer: "fc1.base_layer.bias" is BASE's "fc1.bias"
            replacements[rest.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")] = info
    # the adapter names modules as the model with its head does: BASE may store them under another prefix
    alias = base_aliases(base, [module + ".weight" for module in parts] + list(replacements))
    pairs = {}
    for module, found in parts.items():
        pair = _lora_pair(module, found, config, base, alias)
        pairs[pair.target] = pair
    # a LoRA pair's own base weight saved beside it (an embedding's "base_layer.weight") is BASE's, unchanged
    replacements = {alias.get(target, target): info for target, info in replacements.items()
                    if alias.get(target, target) not in pairs}
    for target, info in replacements.items():
        _check_target(base, target, info.name, info.shape)
    return pairs, replacements


# transformers' models whose layers include Conv1D (weights stored [in, out]), and those layers' names there
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp")
CONV1D_LAYERS = ("c_attn", "q_attn", "c_proj", "c_fc")


def _conv1d(base: Checkpoint, module: str, config: dict) -> bool:
    """Whether MODULE of BASE is a Conv1D, whose update folds transposed. peft decides by the layer, and resets a
    fan_in_fan_out flag that disagrees with it, so an adapter written by another tool or by hand can carry the
    wrong one: on a square layer (GPT-2's attn.c_proj, Llama's q_proj) no shape check catches it, and the update
    was folded transposed (0.5 logits off on a tiny model). The flag decides only for code this cannot see."""
    model_type = base.config.get("model_type")
    if not model_type or base.config.get("auto_map"):
        return bool(config.get("fan_in_fan_out"))
    return model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_LAYERS


def _lora_pair(module: str, found: dict[str, TensorInfo], config: dict, base: Checkpoint,
               alias: dict[str, str]) -> LoraPair:
    embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
    a = found.get("lora_embedding_A" if embedding else "lora_A")
    b = found.get("lora_embedding_B" if embedding else "lora_B")
    if a is None or b is None or len(found) != 2:
        raise UnlearnError(f"adapter module {module}: needs exactly one A and one B matrix, found {sorted(found)}")
    target = alias.get(module + ".weight", module + ".weight")
    r, scale = lora_rank_and_scale(config, module)
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
        raise UnlearnError(f"adapter tensor {a.name}: shapes {list(a.shape)} and {list(b.shape)} "
                           f"do not form a rank-{r} update")
    transposed = embedding or _conv1d(base, module, config)
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
             buffers: Buffers, alpha: float | None = None) -> Job:
    """W + factor·scale·B·A for one weight, row chunk by row chunk, in float32, each piece checked finite.

    Written as peft's merge writes it, W + (B·A)·s, so folded weights match
    `merge_and_unload()`; FACTOR is 1−α when averaging with the folded model
    (ALPHA, when given, names it in the refusal of a result that is not finite).
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
            piece = x if w.dtype == ctype else x.to(w.dtype)
            check_finite(piece, info.name, alpha, "W + (1−α)·s·B·A",
                         (("BASE", lambda: base.read(info, rows)), ("ADAPTER", lambda: torch.cat([a.reshape(-1),
                                                                                                   b.reshape(-1)]))))
            yield piece
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
    refuse_output_over_inputs(out, [base.path, adapter.path], inside_too=True)
    pairs, replacements = plan_lora(config, adapter, base)

    tensors, config_updates = dict(base.tensors), {}
    embed = base.embedding_name()
    if LM_HEAD not in tensors and base.tied() and embed is not None and (embed in pairs or embed in replacements):
        # The adapter changes the input embedding of a tied BASE. peft keeps the head apart (a trained copy in
        # modules_to_save, or a LoRA on the embedding, moves the input side only), so the adapter's model has
        # BASE's embedding as its head: folded into the one shared tensor, the head would move too (11-24 logits
        # on a tiny Llama). The output keeps BASE's as its own head, untied in its config, as `average` does.
        tensors[LM_HEAD] = base.tensors[embed]
        config_updates["tie_word_embeddings"] = False
    buffers = Buffers()
    jobs = []
    for name, info in tensors.items():
        if name == LM_HEAD and LM_HEAD not in base.tensors:
            jobs.append(copy_job(base, info, LM_HEAD))
        elif name in pairs:
            jobs.append(fold_job(base, info, adapter, pairs[name], 1.0 - alpha, buffers, alpha or None))
        elif name in replacements and alpha:  # θ' holds the adapter's tensor: α·θ + (1−α)·θ' as for a weight
            jobs.append(average_job(name, base, info, adapter, replacements[name], alpha, buffers))
        elif name in replacements:
            jobs.append(replace_job(info, adapter, replacements[name]))
        else:
            jobs.append(copy_job(base, info))
    record = {"method": "lora-fold", "formula": "W + (1-alpha)*scale*B@A", "alpha": alpha,
              "base": str(base.path.resolve()), "adapter": str(adapter.path.resolve()),
              "lora_modules": len(pairs), "replaced_tensors": len(replacements)}
    return _write_output(out, force, base, jobs, _layout(tensors), max_shard_size, config_updates, record,
                         started, progress, on_start, closing=[base, adapter])


# --------------------------------------------------------------------------
# In memory


class ModelAverage:
    """A fine-tuned model in memory that can be set to any α and back.

    - LoRA: θ' = θ + ΔW with ΔW = s·B·A, so θa = θ + (1−α)·ΔW exactly: B is scaled by
      (1−α). Only B is copied (a few MB), and the saved adapter and merged model of the
      averaged state are then plain LoRA outputs.
    - --full: every trainable weight becomes α·θ + (1−α)·θ', in float32 as `average`
      does, with θ taken from the frozen reference copy that --full keeps anyway.
    """

    def __init__(self, model, reference_model=None):
        self.model = model
        self.lora = lora_modules(model)
        with torch.no_grad():
            if self.lora:
                self.tuned = {name: m.lora_B.detach().clone() for name, m in self.lora.items()}
            else:
                if reference_model is None:
                    raise ValueError("averaging a fully fine-tuned model needs the original (reference) weights")
                self.original = dict(reference_model.named_parameters())
                self.tuned = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        self.alpha = 0.0

    @torch.no_grad()
    def apply(self, alpha: float) -> None:
        """Set the model's weights to α·θ + (1−α)·θ' (α = 0: the fine-tuned model itself)."""
        if self.lora:
            for name, module in self.lora.items():
                module.lora_B.copy_(self.tuned[name] * (1.0 - alpha))
        else:
            params = dict(self.model.named_parameters())
            for name, tuned in self.tuned.items():
                original = self.original[name]
                params[name].copy_((alpha * original.float() + (1.0 - alpha) * tuned.float()).to(tuned.dtype))
        self.alpha = alpha


# --------------------------------------------------------------------------
# Choosing α


DEFAULT_MAX_LEAK = 0.1
# `unlearn run --alpha auto` tries these; 0 (the fine-tuned model itself) is the fallback
# when no averaged model forgets enough.
AUTO_GRID = (0.0, 0.2, 0.4, 0.6, 0.8)


def parse_alphas(text: str, *, allow_auto: bool = False, allow_extrapolation: bool = False,
                 flag: str = "--alpha", offers_extrapolation: bool = True) -> list[float] | str:
    """'0.5' -> [0.5]; '0.2,0.4' -> [0.2, 0.4]; 'auto' (where allowed) -> 'auto'. Each α is checked
    (`check_alpha`); FLAG names the option in the messages."""
    text = text.strip()
    if allow_auto and text.lower() == "auto":
        return "auto"
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise UsageError(f"{flag} {text}: {part.strip()!r} is not a number"
                             + (" (or give auto)" if allow_auto else "")) from None
        if not math.isfinite(value):
            raise UsageError(f"{flag} {text}: {part.strip()!r} is not a finite number")
        check_alpha(value, allow_extrapolation, flag, text, offers_extrapolation)
        values.append(value + 0.0)  # + 0.0: "-0" is 0.0, not -0.0, in every message and record
    if len(set(values)) != len(values):
        raise UsageError(f"{flag} {text}: an α is listed twice")
    return values


@dataclass
class AlphaScore:
    alpha: float
    forget_leak: float | None
    retain_accuracy: float | None
    retain_similarity: float | None

    @property
    def retain_score(self) -> float | None:
        kept = [v for v in (self.retain_accuracy, self.retain_similarity) if v is not None]
        return sum(kept) / len(kept) if kept else None


def _pooled(pairs: list[tuple[int, float | None]]) -> float | None:
    """Mean of per-set values weighted by the sets' row counts; None when no set has a value."""
    pairs = [(n, v) for n, v in pairs if v is not None and n > 0]
    total = sum(n for n, _ in pairs)
    return sum(n * v for n, v in pairs) / total if total else None


def _pooled_share(pairs: list[tuple[int, float | None]]) -> float | None:
    """A share pooled over sets from their counts: (rows counted, share of them) per set -> flagged rows over
    rows counted, the exact fraction (7 of 35 is 0.2; a row-weighted mean of the sets' shares, 0.20000000000000004,
    passed over an α whose leak met --max-leak 0.2 exactly). None when no set has a share."""
    pairs = [(n, v) for n, v in pairs if v is not None and n > 0]
    total = sum(n for n, _ in pairs)
    return sum(round(n * v) for n, v in pairs) / total if total else None


def score(alpha: float, summaries: dict[str, dict], kinds: dict[str, str]) -> AlphaScore:
    """One α's row of the table from per-set summaries (n, leak_rate, accuracy and the rows it is a share of,
    similarity_to_reference)."""
    forget = [s for name, s in summaries.items() if kinds[name] == "forget"]
    retain = [s for name, s in summaries.items() if kinds[name] == "retain"]
    return AlphaScore(
        alpha=alpha,
        forget_leak=_pooled_share([(s["n"], s.get("leak_rate")) for s in forget]),  # every forget row is judged
        # a share of the rows with `answers` only: weighted by all of a set's rows, 2 of 4 read as 0.22
        retain_accuracy=_pooled_share([(s.get("accuracy_rows", s["n"]), s.get("accuracy")) for s in retain]),
        retain_similarity=_pooled([(s["n"], s.get("similarity_to_reference")) for s in retain]),
    )


def recommend(scores: list[AlphaScore], max_leak: float = DEFAULT_MAX_LEAK) -> tuple[float, str]:
    """The α to use and, in one sentence, why.

    Per α (`score`): forget_leak, the share of forget prompts whose answer leaks
    (`evaluate.leak_flags`), pooled over every forget set (the sets' rates averaged
    with their row counts as weights); retain_accuracy and retain_similarity, the same
    pooled means over the retain sets of accuracy on `answers` and of ROUGE-L F against
    the original model's answers (None when no set has them).

    Rule: among the α whose forget_leak is at most MAX_LEAK, take the one that keeps
    the most (retain score = mean of retain_accuracy and retain_similarity, whichever
    exist); ties go to the larger α (closer to the original). If no α reaches MAX_LEAK,
    take the lowest leak (ties: best retain score) and say that the target was missed.
    """
    if not scores:
        raise ValueError("no α was evaluated")
    if any(s.forget_leak is None for s in scores):
        raise UsageError("choosing α needs forget prompts with a response or `answers` to measure leaks against")
    retain = lambda s: s.retain_score if s.retain_score is not None else 0.0  # noqa: E731
    passing = [s for s in scores if s.forget_leak <= max_leak]
    if passing:
        best = max(passing, key=lambda s: (retain(s), s.alpha))
        why = (f"α={alpha_label(best.alpha)}: of the α with forget leak ≤ {max_leak:g} "
               f"({', '.join(alpha_label(s.alpha) for s in passing)}), it keeps the most")
    else:
        best = min(scores, key=lambda s: (s.forget_leak, -retain(s), -s.alpha))
        why = (f"α={alpha_label(best.alpha)}: no α reached forget leak ≤ {max_leak:g}; this one leaks least")
    details = [f"forget leak {best.forget_leak:.2f}"]
    if best.retain_accuracy is not None:
        details.append(f"retained accuracy {best.retain_accuracy:.2f}")
    if best.retain_similarity is not None:
        details.append(f"similarity to the original {best.retain_similarity:.2f}")
    return best.alpha, f"{why} ({', '.join(details)})"


def report(scores: list[AlphaScore], chosen: float, reason: str, max_leak: float,
           base: AlphaScore | None = None, extra: dict | None = None) -> dict:
    """The JSON form of the table."""
    def row(s):
        return {**asdict(s), "retain_score": s.retain_score}

    return {"formula": "alpha*base + (1-alpha)*tuned", "max_leak": max_leak, "recommended_alpha": chosen,
            "reason": reason, "alphas": [row(s) for s in sorted(scores, key=lambda s: s.alpha)],
            "original": row(base) if base else None, **(extra or {})}
