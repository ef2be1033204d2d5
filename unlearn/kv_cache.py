"""Key/value caches for inference: preallocated buffers, and the prompt prefix a batch shares computed once.

A chat template puts the same tokens in front of every prompt: SmolLM2's default system
message is 24 of a short question's 36 prompt tokens. Under causal attention those
positions' keys and values are the same in every row of a batch, so `run_prefix` computes
them once, at batch size 1, and every row attends to copies of that one result. The rows'
own tokens then run as usual, their positions counted on from the prefix. Generation's
prefill and likelihood scoring both do this (generation.py, evaluate.response_logprobs).
The numbers are those of the whole-sequence pass up to float rounding (different matmul
shapes): tests/test_kv_cache.py compares logits, and bench/generation_bench.py counts greedy
outputs identical to `model.generate`'s.

Not under FSDP: there every rank must run the same forwards in the same order (each one
gathers parameters), and whether a batch has a shared prefix depends on the batch.
"""

from __future__ import annotations

import contextlib
import inspect


def cache_argument(model) -> str | None:
    """The forward's name for the KV cache: `cache` in transformers >= 5.x, `past_key_values` before."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def prefix_applies(model) -> bool:
    """Whether MODEL can run a batch's shared prefix once (see the module docstring)."""
    if getattr(model, "_is_fsdp_managed_module", False) or cache_argument(model) is None:
        return False
    return "position_ids" in inspect.signature(model.forward).parameters


@contextlib.contextmanager
def evaluating(model):
    """MODEL in eval mode inside, its own mode back after (generation and scoring). A forward that reads a
    KV cache must not run in training mode: a model trained with --gradient-checkpointing then drops the cache in every layer
    (transformers' GradientCheckpointingLayer), and GPT-2's mask, built for the kept and the new positions,
    no longer fits its keys; LoRA's own dropout (--lora-dropout) would also draw masks into scores."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# The layer kinds a config names (`layer_types`; GPT-Neo's `attention_layers`) that attend to every position, and
# those a sliding window bounds: every position within the window's columns is seen as full attention sees it.
FULL_KINDS = frozenset({"full_attention", "global"})
WINDOWED_KINDS = frozenset({"sliding_attention", "local"})


def _layer_kinds(config) -> set:
    return {*(getattr(config, "layer_types", None) or ()), *(getattr(config, "attention_layers", None) or ())}


def keeps_every_position(model) -> bool:
    """Whether every layer of MODEL's decoding cache keeps every position (full attention), not the last
    `window` of them (a sliding window: Mistral, Gemma 2/3). A generation batch's shared prefix then stays
    in view of its rows: in a sliding layer, a short row's left padding after the prefix would push the
    prefix out of the window while the row's positions are still inside it (another answer than alone).
    GPT-Neo's local layers keep every position in plain cache layers but mask by cache slot, which the
    padding shifts the same way: its config's layer kinds say so."""
    from transformers.cache_utils import DynamicLayer

    if _layer_kinds(getattr(model, "config", None)) - FULL_KINDS:  # "sliding_attention", GPT-Neo's "local", ...
        return False
    layers = getattr(new_cache(model), "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def sees_every_column(model, columns: int) -> bool:
    """Whether every layer of MODEL sees all of a decoding cache's first COLUMNS columns, as full attention does.

    Always where every layer keeps every position (`keeps_every_position`). Under a sliding window (Mistral v0.1's
    and Gemma 2/3's `sliding_window`, GPT-Neo's local layers' `window_size`) while the columns stay fewer than the
    window: such a layer keeps its last window - 1 columns and a query sees at most the window, counted in columns,
    so until then nothing leaves its view, and a column that holds no token (padding after a shared prompt prefix,
    a rejected draft token) pushes nothing out of it. A window 4,096 wide (Mistral-7B v0.1) or 512 (Gemma 3 1B) is
    far wider than the stop rule's checks (a prompt and 32 tokens), which then keep their drafts and shared prefix.
    Layer kinds other than full and sliding (chunked attention) count as not seen."""
    if keeps_every_position(model):
        return True
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if _layer_kinds(config) - FULL_KINDS - WINDOWED_KINDS:
        return False
    windows = [w for w in (getattr(config, "sliding_window", None), getattr(config, "window_size", None))
               if isinstance(w, int) and not isinstance(w, bool) and w > 0]
    return bool(windows) and columns < min(windows)


def shared_length(rows: list[list[int]], limit: int) -> int:
    """The length of the longest token prefix every row of ROWS starts with, at most LIMIT."""
    if not rows:
        return 0
    first, n = rows[0], min(limit, *(len(r) for r in rows))
    for row in rows[1:]:
        same = 0
        while same < n and row[same] == first[same]:
            same += 1
        n = same
    return max(n, 0)


def new_cache(model, capacity: int | None = None):
    """An empty DynamicCache for MODEL; with CAPACITY, its full-attention layers write each step's keys
    and values into buffers of that many positions allocated at the first update, instead of
    concatenating (a copy of the whole cache per layer per step: 6 % of decoding on the embedded
    model, torch.profiler). Other layer kinds (sliding windows) keep their own class."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized or self.keys.numel() == 0:
                self.is_initialized, self.device, self.length = True, key_states.device, 0
                self._key_buffer = key_states.new_empty(key_states.shape[:2] + (capacity, key_states.shape[3]))
                self._value_buffer = value_states.new_empty(value_states.shape[:2] + (capacity, value_states.shape[3]))
            end = self.length + key_states.shape[-2]
            if end > self._key_buffer.shape[2]:  # more positions than foreseen (draft tokens): grow
                grown = max(end, 2 * self._key_buffer.shape[2])
                for name in ("_key_buffer", "_value_buffer"):
                    old = getattr(self, name)
                    buffer = old.new_empty(old.shape[:2] + (grown, old.shape[3]))
                    buffer[:, :, :self.length] = old[:, :, :self.length]
                    setattr(self, name, buffer)
            self._key_buffer[:, :, self.length:end] = key_states
            self._value_buffer[:, :, self.length:end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def _views(self):
            self.keys, self.values = self._key_buffer[:, :, :self.length], self._value_buffer[:, :, :self.length]

        def batch_select_indices(self, indices):
            if self.get_seq_length() > 0:
                self._key_buffer, self._value_buffer = self._key_buffer[indices], self._value_buffer[indices]
                self._views()

        def batch_repeat_interleave(self, repeats: int):
            if self.get_seq_length() > 0:
                self._key_buffer = self._key_buffer.repeat_interleave(repeats, dim=0)
                self._value_buffer = self._value_buffer.repeat_interleave(repeats, dim=0)
                self._views()

    try:
        cache = DynamicCache(config=model.config)  # transformers >= 4.56: layer types from the config
    except TypeError:
        return DynamicCache()
    layers = getattr(cache, "layers", None)
    if capacity is not None and layers is not None:
        for i, layer in enumerate(layers):
            if type(layer) is DynamicLayer:
                layers[i] = PreallocatedLayer()
    return cache


def last_positions(width: int, keep: int, device=None):
    """`logits_to_keep` for the last KEEP of WIDTH positions: a count when that is every position, else
    their indices.

    A count below the width slices the hidden states in place; the strided (rows, keep, d) view sends
    the head's matmul down a batched path that copies the vocabulary-wide weight once per row (the
    prefill of 56 prompts, one thread: 539 ms for its last position's logits, against 61 ms with
    indices, which transformers gathers into a contiguous tensor first). Decoding steps keep every
    position of their input, so they pass the count: nothing to gather.
    """
    import torch

    return keep if keep >= width else torch.arange(width - keep, width, device=device)


def run_prefix(model, cache, prefix: list[int], rows: int) -> None:
    """Fill CACHE with the keys and values of the token ids PREFIX (positions 0..) for ROWS rows:
    one forward at batch size 1, then the rows' copies."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prefix], dtype=torch.long, device=device)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(len(prefix), device=device)[None],
          use_cache=True, logits_to_keep=last_positions(len(prefix), 1, device), **{cache_argument(model): cache})
    cache.batch_repeat_interleave(rows)
