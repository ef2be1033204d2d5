"""Batched generation: left padding, KV cache, stop at EOS (or when the caller's check says so).

Prompts are tokenised exactly as in training (`data.encode_prompt`), sorted by
length so that a batch holds prompts of similar length (less padding, less
wasted compute), and the outputs are put back in the caller's order.

Greedy decoding runs its own loop (`_greedy_batch`): one prefill forward with
logits for the last position only, then one forward per new token, under
`torch.inference_mode`, with no logits processors or stopping-criteria objects
between steps, and the batch ends as soon as every row has ended. It computes what
`model.generate` computes (same batches, same left padding, position ids
`cumsum(mask) - 1`, the same 2-D mask growing by one column per step), with four
differences in how the work is done, not in what is computed:
- the prompt prefix every row of the batch shares runs once (kv_cache.run_prefix);
- rows that have ended leave the batch, with their keys and values;
- keys and values go into buffers allocated once (kv_cache.new_cache), not concatenated;
- on a CPU with T >= 2 torch threads, a batch of at least 4T rows runs as T slices side by
  side, one thread each (`_greedy_parts`, cpu_parts.py), each slice as wide as its own prompts
  and cut so that the slices' forward positions are as even as can be (`balanced_slices`).
A float32 matmul's result for one row can depend on the shapes around it (MKL/oneDNN pick
kernels by shape), so an output could differ from `model.generate`'s at a near-tie of two
logits; none does on the README run's 91 prompts (bench/generation_bench.py counts them)
or in tests/test_generation.py (Llama and OPT, token for token).

Measured (bench/generation_bench.py, embedded model, the README run's prompts, 2 threads, a
quiet machine): batches of 16 ran at 117 tokens/s (0.40 of the limit the same run measures);
rows leaving, the preallocated buffers and batches of 64 (config.GEN_BATCH_SIZE): 173 tokens/s
(0.53). With the shared prefix as well: one thread 0.545 of the limit (1.27x `model.generate`
on the same batches); two threads 188 tokens/s but 0.39 of a limit the prefix raised to 486. Matrix products are 77 % of decoding; the rest is the model's small
per-layer operations. Batches of 128 (the run's 91 prompts in one call, as `unlearn run` pools
its sets, so each thread's slice has ~45 rows): 286 tokens/s, 0.60 of a limit that takes the
best matmul rate over 16-256 rows (478 tokens/s); the same prompts one call per file: 0.29.

Drafts (`generate`'s DRAFTS): a row may come with a guess of its answer's opening. Each forward
then runs, for every drafting row, its last token and up to DRAFT_BLOCK draft tokens after it:
the logits at each position give the greedy token there, the draft is kept as far as it agrees,
the first disagreeing position gives the next token, and the rejected draft positions are masked
out of the cache for good (their columns stay, with attention mask 0; so a model with a sliding window,
which counts its window in columns, gets drafts only for a batch whose columns all stay in the window:
`kv_cache.sees_every_column`). The answers are the ones
decoding one token per forward gives, up to float rounding at near-ties (the shapes differ, as
with the thread count); tests/test_drafts.py compares them, their `Scored`, budget cuts and stop
checks. A forward costs its positions for every row of the batch, so drafts are offered only
while at least half of the live rows draft. Where they pay: small batches, where a forward reads
all the weights whatever its width. The stop rule's check (14 forget prompts, 7 rows a thread,
32 tokens) drafting from the last check's answers: the README run's four checks 23.0 -> 17.7 s
(forwards 3.3 / 4.8 / 6.1 / 8.8 -> 2.3 / 3.5 / 5.1 / 6.8 s), the same verdicts and table. Blocks
of 4, 8 and 16 timed alike on the last check's workload (5.8-6.6 s against 6.6-8.0 s without).
In the pooled after measurement (50 rows a thread, bound by arithmetic) drafts of the original's
answers gained nothing (24.1-24.2 s without, 24.9-27.0 s with), so it has none.

`model.generate` is still used (`generate_hf`) for sampling, under FSDP (where
every rank must keep stepping until all ranks end: `synced_gpus`), and when the
model's generation config asks for a logits processor greedy decoding would
apply (repetition penalty, banned words, minimum length, ...).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

from unlearn.cpu_parts import Cancelled, balanced_slices, parallel_pieces, run_pieces
from unlearn.data import (SOURCE_FILE, answer_in_format, encode_prompt, fallback_format, prompt_key, prompt_length,
                          turn_started)
from unlearn.errors import UnlearnError
from unlearn.kv_cache import (cache_argument, evaluating, keeps_every_position, last_positions, new_cache,
                              prefix_applies, run_prefix, sees_every_column, shared_length)

# On a CPU with T >= 2 torch threads, a batch of at least T * MIN_ROWS_PER_WORKER rows is
# decoded as T parts side by side, one thread each with one torch thread (`_greedy_parts`,
# cpu_parts.py says why). With load from other processes on the 2-core machine, the stop
# rule's 14 rows x 32 tokens took 8-9 s as 2 parts of 7 and 20-26 s as one decode with 2
# threads (identical answers). Below 4 rows a part reads all the weights for too few rows.
MIN_ROWS_PER_WORKER = 4

# A row's `stop_row(index, text_so_far)` check runs after every STOP_CHECK_EVERY new tokens
# (and not at the last token, where the row ends anyway). Each check decodes every live
# row's tokens: at 4 it costs well under 1 % of a decode step on the embedded model
# (bench/generation_bench.py measures it), and a row runs at most 3 tokens past the point
# where its answer appeared.
STOP_CHECK_EVERY = 4

# Draft tokens a row offers per forward (`generate`'s DRAFTS): the forward then runs 1 + this
# many positions for the row, and its logits check each guess at once. 4, 8 and 16 timed alike
# on the stop rule's check (the module docstring).
DRAFT_BLOCK = 8

# A batch's key/value cache holds rows x (longest prompt + new tokens) positions of
# `kv_bytes_per_position(model)` bytes. Batches are cut to at most --gen-batch-size rows and,
# whatever that asks, to what fits in this many bytes: 128 rows (config.GEN_BATCH_SIZE) of
# 110 positions are 0.65 GB on the embedded model, 5.5 GB at OPT-1.3B and 9.2 GB at OPT-2.7B
# in float32, which the cap brings to 99 and 59 rows (at most 4 GiB beside the weights).
KV_CACHE_BUDGET = 4 * 2**30

# A batch whose rows are padded runs its prefill with an attention mask, and SDPA then computes every
# head's scores as rows x heads x width x width floats: five 9,551-token probes of one forget row asked
# 7.3 GB on the tests' 4-head Llama ("internal error"). Batches are cut to keep them within this many
# bytes too (`batch_rows`); one row alone has no padding, no mask and no score matrix (a causal kernel).
ATTENTION_SCORES_BUDGET = 4 * 2**30
ATTENTION_SCORE_BYTES = 4  # float32 scores (the math kernel upcasts bf16/fp16 ones on a CPU)

# Generation-config fields that make `model.generate` alter greedy logits, with their
# inactive values. Any other value sends greedy decoding to `generate_hf`.
_GREEDY_PROCESSOR_DEFAULTS = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False), "remove_invalid_values": (None, False), "guidance_scale": (None, 1.0),
    "stop_strings": (None,), "watermarking_config": (None,), "num_beams": (None, 1),
    "max_time": (None,), "low_memory": (None, False), "compile_config": (None,),
}


def _stop_ids(model, tokenizer) -> list[int]:
    """Where an answer ends: the tokenizer's EOS, the model's configured end-of-turn ids, and the special
    token that ends an answer turn in the chat template (`end_of_turn_id`)."""
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def end_of_turn_id(tokenizer) -> int | None:
    """The special token that closes an answer turn in the chat template (`data.render_response`), or None.

    Training teaches every answer to end there. A tokenizer whose EOS is another token (ChatML's
    "<|im_end|>" beside an EOS "<|endoftext|>", as some base checkpoints ship) with no generation config
    naming it would otherwise never stop there, and write an invented next turn that every metric reads.
    """
    from unlearn.data import has_chat_template, render_response

    if not has_chat_template(tokenizer):
        return None
    try:
        text = render_response(tokenizer, "?", "x")
    except Exception:  # a template that cannot render a plain turn: generation keeps its other stop ids
        return None
    at = text.find("x")
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token in tokenizer(text[at + 1:] if at >= 0 else text, add_special_tokens=False)["input_ids"]:
        if token in special:
            return token
    return None


def text_config(model):
    """MODEL's config, or the text model's within it: an image-and-text checkpoint (Gemma 3's
    `Gemma3ForConditionalGeneration`) keeps its layers, heads and context under `text_config`."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_bytes_per_position(model) -> int | None:
    """Bytes one token position takes in MODEL's key/value cache (keys and values, every layer), from its
    config; None when the config does not say."""
    config = text_config(model)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        return None
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


def batch_rows(model, batch_size: int, positions: int) -> int:
    """BATCH_SIZE, lowered so that a batch's KV cache of POSITIONS per row stays within KV_CACHE_BUDGET and a
    padded prefill's attention scores within ATTENTION_SCORES_BUDGET; at least one row."""
    positions = max(1, positions)
    per_position = kv_bytes_per_position(model)
    if per_position:
        batch_size = min(batch_size, KV_CACHE_BUDGET // (per_position * positions))
    heads = getattr(text_config(model), "num_attention_heads", None)
    if heads:
        batch_size = min(batch_size, ATTENTION_SCORES_BUDGET // (heads * positions**2 * ATTENTION_SCORE_BYTES))
    return max(1, batch_size)


# --- the model's context ------------------------------------------------------------------------

# Module names of a learned table of position embeddings, one row per position, in the causal LMs
# transformers ships: OPT and BioGPT `embed_positions` (whose indices are offset by 2: the module's
# `offset`), GPT-2, GPT-Neo, GPT-BigCode and MPT without ALiBi `wpe`. A position past the table is an
# IndexError ("index out of range in self") deep inside the forward pass. Rotary and ALiBi models
# have no such table: they compute positions and have no hard limit, so they are never refused here.
POSITION_TABLE_NAMES = ("embed_positions", "wpe", "position_embeddings")

# Config fields that state the size of that table, named in the error for the user to recognise.
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx")

# A model without a table (rotary, ALiBi) runs past the context its config declares (its answers there are its
# own affair), but not without end: a prompt of N tokens is N x N attention work in every layer, and memory
# the allocator refuses long before a learned table would end: a 400,000-word prompt (1.28 M tokens) asked
# 1.6 TB for its mask and ended as "internal error". Past both its declared context and this many positions a
# row is refused as one past a table is. One 65,536-token row's prefill took 68 s on the tests' 2-layer,
# 32-wide Llama (16,384: 4.6 s), at 0.5 GB; a real model's is hours.
ATTENDED_POSITIONS = 65536
MAX_ROPE_FACTOR = 128  # `_declared_context`


def position_limit(model) -> int | None:
    """How many positions MODEL can embed: the rows of its learned position table (`POSITION_TABLE_NAMES`,
    an `nn.Embedding`) less the module's index offset; None when it has none (rotary, ALiBi: no hard
    limit). A sequence of N tokens takes positions 0 .. N-1, so N may be at most this."""
    import torch

    limits = [module.num_embeddings - int(getattr(module, "offset", 0) or 0)
              for name, module in model.named_modules()
              if name.rsplit(".", 1)[-1] in POSITION_TABLE_NAMES and isinstance(module, torch.nn.Embedding)]
    return min(limits) if limits else None


def _declared_context(model) -> tuple[str, int] | None:
    """What states MODEL's context ("max_position_embeddings 512": a `_CONTEXT_FIELDS` field and its value) and
    that context, or None. With rope scaling that names the size it scales (`rope_scaling`'s factor and
    original_max_position_embeddings: YaRN, Llama 3's) the context is the scaled one when that is more: Qwen2.5's
    128K setup keeps max_position_embeddings 32768 with a YaRN factor of 4 over 32768, a context of 131,072. A
    factor without that size is not applied (the declared size may be the scaled one already), nor one past
    MAX_ROPE_FACTOR (the largest in published configs is 32-64: past it, a typo, not a context)."""
    config = text_config(model)
    field = next(((f, v) for f in _CONTEXT_FIELDS if isinstance(v := getattr(config, f, None), int) and v > 0), None)
    if field is None:
        return None
    name, value = field
    scaling = getattr(config, "rope_scaling", None)
    scaling = scaling if isinstance(scaling, dict) else {}
    factor, base = scaling.get("factor"), scaling.get("original_max_position_embeddings")
    if (isinstance(factor, (int, float)) and not isinstance(factor, bool) and 1 < factor <= MAX_ROPE_FACTOR
            and isinstance(base, int) and not isinstance(base, bool) and base > 0 and base * factor > value):
        return f"original_max_position_embeddings {base} x rope_scaling factor {factor:g}", int(base * factor)
    return f"{name} {value}", value


def context_limit(model) -> int:
    """The most positions generation takes on MODEL: its learned table's (`position_limit`), or for a model
    without one the larger of its declared context and ATTENDED_POSITIONS."""
    limit = position_limit(model)
    if limit is not None:
        return limit
    declared = _declared_context(model)
    return max(declared[1] if declared else 0, ATTENDED_POSITIONS)


def context_words(model, limit: int, whose: str | None) -> str:
    """MODEL's context as the errors state it: whose, LIMIT (`context_limit`) and what sets it."""
    head = f"the context of {whose or 'the model'} ({limit} positions"
    if position_limit(model) is not None:
        config = getattr(model, "config", None)
        field = next((f for f in _CONTEXT_FIELDS if getattr(config, f, None) == limit), None)
        return head + ": learned position embeddings" + (f", {field} {limit})" if field else ")")
    declared = _declared_context(model)
    if declared and declared[1] == limit:
        return f"{head}: {declared[0]})"
    return head + (f": past {declared[0]}, " if declared else ": ") + \
        "the most a row takes on a model without a learned position table)"


def refuse_past_context(model, lengths: list[int], budgets: list[int], where: Callable[[int], str],
                        budget_name: str | None = None, whose: str | None = None,
                        exact: list[bool] | None = None, remedy: str | None = None) -> None:
    """Raise UnlearnError, naming the first row, when a prompt of LENGTHS[i] tokens and BUDGETS[i] new tokens
    does not fit in MODEL's `context_limit`. EXACT[i] False: LENGTHS[i] is a lower bound (`data.prompt_length`).

    A row needs prompt tokens + new tokens positions: generation feeds back every new token but the
    last (the position the last one would take is where a budget-cut answer's end-token scores and a
    draft's last token are computed: `_greedy_batch`), so this is exactly what the own loop runs and one
    more than `model.generate` does. WHERE(i) names row i (FILE:LINE where the caller knows it);
    BUDGET_NAME the option that sets the budget (None: "a budget of N new tokens"); WHOSE names the model
    (None: "the model"). REMEDY, when given, is what the message advises instead of lowering the budget (a budget
    no option sets).
    """
    limit = context_limit(model)
    over = [i for i, (n, b) in enumerate(zip(lengths, budgets)) if n + b > limit]
    if not over:
        return
    i = over[0]
    n, b = lengths[i], budgets[i]
    asked = f"{budget_name} {b}" if budget_name else f"a budget of {b} new tokens"
    fix = ("shorten the prompt" if n >= limit else remedy or
           f"lower {budget_name or 'the budget'} to {limit - n} or shorten the prompt")
    more = ""
    if len(over) > 1:
        shown = ", ".join(where(j) for j in over[1:4]) + (", ..." if len(over) > 4 else "")
        more = f" ({len(over) - 1} more row{'s' if len(over) > 2 else ''} too: {shown})"
    at_least = "" if exact is None or exact[i] else "at least "
    raise UnlearnError(f"{where(i)}: the rendered prompt is {at_least}{n} tokens; with {asked} that is {at_least}"
                       f"{n + b} positions, past {context_words(model, limit, whose)}; {fix}{more}")


def check_prompts_fit(model, tokenizer, rows, budget: int, budget_name: str | None = None,
                      whose: str | None = None, remedy: str | None = None) -> None:
    """Refuse, before anything is generated, ROWS (pairs of where, prompt: FILE:LINE and the row's prompt)
    whose rendered prompt (`data.encode_prompt`, as generation encodes it) and BUDGET new tokens pass
    MODEL's context (`refuse_past_context`). `generate` refuses them too, but knows no file or line, and
    only once every prompt is tokenised whole: a prompt far past the context is measured here on an opening
    of it (`data.prompt_length`: 0.3 s, not 3.7 s, for a 400,000-word one on the tests' Llama tokenizer)."""
    rows = list(rows)
    if not rows:
        return
    limit = context_limit(model)
    measured = [prompt_length(tokenizer, prompt, limit) for _, prompt in rows]
    refuse_past_context(model, [n for n, _ in measured], [budget] * len(rows), lambda i: rows[i][0], budget_name,
                        whose, exact=[whole for _, whole in measured], remedy=remedy)


def check_sets_fit(model, tokenizer, sets, budget: int, budget_name: str | None = None,
                   whose: str | None = None, remedy: str | None = None) -> None:
    """`check_prompts_fit` over the rows of SETS (`measure.EvalSet`s: each row named FILE:LINE by its own
    file (`SOURCE_FILE`, for a set made of several files) or its set's path, and its `Example.line`; by the
    set's name without a path)."""
    rows = [(f"{ex.extra.get(SOURCE_FILE) or s.path or s.name}:{ex.line}", ex.prompt)
            for s in sets for ex in s.examples]
    check_prompts_fit(model, tokenizer, rows, budget, budget_name, whose, remedy)


def _prompt_label(prompts: list[str], i: int, width: int = 40) -> str:
    """Prompt I of PROMPTS as an error names it when no file and line are known: its number and opening."""
    text = prompt_key(prompts[i])
    return f"prompt {i + 1} of {len(prompts)} ({text[:width] + '...' if len(text) > width else text!r})"


def _own_loop_applies(model, do_sample: bool) -> bool:
    """Whether greedy decoding can run in `_greedy_batch` with the outputs `model.generate` would give."""
    # prefix_applies: not under FSDP, a KV cache argument and position ids (the loop runs the prefix apart)
    if do_sample or not prefix_applies(model):
        return False
    config = getattr(model, "generation_config", None)
    if any(getattr(config, name, None) not in inactive for name, inactive in _GREEDY_PROCESSOR_DEFAULTS.items()):
        return False
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _left_padded(encoded: list[list[int]], pad_id: int):
    """(input_ids, attention mask) with every prompt ending where generation starts."""
    import torch

    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids):] = 1
    return input_ids, attention


@dataclass
class Scored:
    """A greedy answer's own log-probabilities under the model that generated it.

    LOGPROBS[i] = log p(IDS[i] | prompt, IDS[:i]), from the decoding step's logits (EOS
    included when the answer reached it). END: for an answer cut by the token budget, log p
    of each stop token after its last token (one decoding step more), so that a scorer
    that appends the end-of-turn marker finds that token's log-probability too; None when
    the answer ended by itself.
    """

    ids: list[int]
    logprobs: list[float]
    end: dict[int, float] | None = None
    # With generate's KEEP_KV: the rendered prompt's token ids, and the keys and values the model
    # computed for that prompt and then the answer's tokens fed back (all but the last, or all after a
    # budget cut's extra step), one tensor of layers x 2 (keys, values) x heads x positions x head size
    # (one allocation a row: as 60 small tensors a row, the README run's peak memory was ~100 MB
    # higher): KV_PREFIX holds the positions of the prompt prefix the batch shared (one tensor for
    # all its rows: the chat template's system message is 24 of the README answers' ~80 positions), KV
    # the row's own after them. A later scoring of another answer to this prompt by the same model
    # starts where the two answers part (`continued_scoring.py`): the original model's fluency of the
    # unlearned model's answers.
    prompt_ids: list[int] | None = None
    kv: object | None = None  # torch.Tensor
    kv_prefix: object | None = None  # torch.Tensor

    def kept_positions(self) -> int:
        """How many positions' keys and values are kept (0: none)."""
        if self.kv is None:
            return 0
        return self.kv.shape[3] + (self.kv_prefix.shape[3] if self.kv_prefix is not None else 0)

    def kept_kv(self, layer: int, n: int):
        """(keys, values) of LAYER's first N kept positions, heads x N x head size."""
        import torch

        own = self.kv[layer]  # 2 x heads x positions x head size
        shared = self.kv_prefix.shape[3] if self.kv_prefix is not None else 0
        if n <= shared:
            both = self.kv_prefix[layer][:, :, :n]
        elif shared:
            both = torch.cat([self.kv_prefix[layer], own[:, :, :n - shared]], 2)
        else:
            both = own[:, :, :n]
        return both[0], both[1]


def _greedy_batch(model, input_ids, attention, *, stop_ids: list[int], pad_id: int, budgets: list[int],
                  should_stop: Callable[[int, list[int]], bool] | None, prefix: list[int] = (),
                  scored: list | None = None, cancelled: Callable[[], bool] | None = None,
                  drafts: list | None = None, forwards: list | None = None, keep_kv: int = 0,
                  keep_rows: list[bool] | None = None, kept_bytes: list | None = None,
                  ends: bool = True) -> list[list[int]]:
    """Greedy new tokens of each row of a left-padded batch (EOS included when reached).

    BUDGETS: each row's number of new tokens: a row ends at its own budget exactly as in a batch of
    that budget (with SCORED and ENDS, it stays one step longer for the
    log-probabilities of the stop tokens after it, `Scored.end`, and that step's token is dropped).

    PREFIX: token ids every row's prompt starts with, left out of INPUT_IDS and run once for
    the batch (kv_cache.run_prefix); the rows' tokens and padding follow it.
    SHOULD_STOP(row, tokens_so_far) is asked every STOP_CHECK_EVERY tokens for rows still
    running; True ends the row there.
    SCORED, a list: receives one `Scored` per row (the log-softmax of the logits each step
    computes anyway: one logsumexp over the vocabulary per row and step).
    CANCELLED() -> True ends the batch with `cpu_parts.Cancelled` before its next step (`_greedy_parts`).
    DRAFTS: per row, token ids its answer may well start with (or None): verified DRAFT_BLOCK at a
    time (see the module docstring); they change how many forwards run, not the answer.
    FORWARDS, a list: receives the number of forward passes the batch ran (the prefix's apart).
    KEEP_KV: with SCORED, up to this many bytes of the rows' keys and values are copied out as each row
    ends, into its `Scored.kv` and `Scored.kv_prefix` (rows in order until the bytes run out); KEEP_ROWS, per
    row, whether to (None: every row); KEPT_BYTES, a list, receives the bytes kept.
    """
    import torch

    rows, width = input_ids.shape
    kept: dict[int, object] = {}  # row -> its own keys and values (`_keep_row`)
    kv_prefix = None  # the shared prefix's keys and values, copied once (at the first row kept)
    keep_kv = keep_kv if scored is not None and kv_keepable(model) else 0
    spent, per_position = 0, kv_bytes_per_position(model)  # bytes kept so far, and a position's
    max_new_tokens = max(budgets)  # the batch's new tokens at most
    device = next(model.parameters()).device
    cache_name = cache_argument(model)
    # Under a sliding window only while every column stays in view: a rejected draft token stays as a masked cache
    # column, and such a layer counts its window in columns, so past the window each one pushed a real token out of
    # view (another answer: review 112).
    if drafts is not None and not sees_every_column(model, most_columns(input_ids.shape[1] + len(prefix), budgets,
                                                                         drafted=True)):
        drafts = None
    drafts = [list(d or ())[:b] for d, b in zip(drafts or [None] * rows, budgets)]
    block = DRAFT_BLOCK if any(drafts) else 0
    shared = len(prefix)
    # Columns: the prompts, one per step, and a block's rejected draft tokens (the cache grows past this).
    cache = new_cache(model, capacity=shared + width + max_new_tokens + 1 + 2 * block)
    if shared:
        run_prefix(model, cache, list(prefix), rows)
    attention = torch.cat([torch.ones((rows, shared), dtype=attention.dtype), attention], dim=1).to(device)
    # model.generate's positions: the first real token of each row is 0, pads get 0.
    positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0)
    stop_set, stop_tensor = set(stop_ids), torch.tensor(stop_ids, dtype=torch.long, device=device)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    cut: dict[int, dict[int, float]] = {}  # rows the budget cut -> log p of each stop token next
    pending: set[int] = set()  # rows cut by their budget, run one step more for their `cut`
    drafting = [bool(d) for d in drafts]  # the row's answer so far is its draft's opening
    live = list(range(rows))  # the batch's rows still in the computation, in order
    # The first forward's head is each row's prompt; later ones', its last new token (not in the cache yet).
    head, head_positions = input_ids.to(device), positions[:, shared:]
    mask = attention  # one column per cache position: 0 for padding and rejected draft tokens
    runs = 0
    while live:
        if cancelled is not None and cancelled():
            raise Cancelled()
        # Each drafting row appends up to DRAFT_BLOCK tokens of its draft after its head: the logits
        # at the head's last position and at each draft token give the greedy token after it.
        # A forward runs 1 + the widest offer positions for every row: only while at least half of the
        # rows draft (rows whose drafts went wrong would otherwise compute padding).
        drafters = sum(drafting[r] and r not in pending for r in live)
        offered = [drafts[r][len(tokens[r]):len(tokens[r]) + block]
                   if drafting[r] and r not in pending and 2 * drafters >= len(live) else [] for r in live]
        width = max(map(len, offered))
        inputs, new_mask, new_positions = head, torch.ones_like(head), head_positions
        if width:
            guess = torch.full((len(live), width), pad_id, dtype=torch.long, device=device)
            real = torch.zeros((len(live), width), dtype=mask.dtype, device=device)
            for i, d in enumerate(offered):
                guess[i, :len(d)] = torch.tensor(d, dtype=torch.long)
                real[i, :len(d)] = 1
            after = head_positions[:, -1:] + torch.arange(1, width + 1, device=device)
            # a row that offers fewer tokens pads at its head's position (masked out), never past the position
            # table of a learned-position model when its prompt and budget reach the context's end
            after = torch.where(real.bool(), after, head_positions[:, -1:])
            inputs = torch.cat([head, guess], 1)
            new_mask = torch.cat([new_mask, real], 1)
            new_positions = torch.cat([head_positions, after], 1)
        if runs:  # the prompt's columns are in MASK already
            mask = torch.cat([mask, new_mask], 1)
        else:
            mask = torch.cat([mask, new_mask[:, head.shape[1]:]], 1)
        logits = model(input_ids=inputs, attention_mask=mask, position_ids=new_positions, use_cache=True,
                       logits_to_keep=last_positions(inputs.shape[1], width + 1, device), **{cache_name: cache}).logits
        runs += 1
        # argmax: exact in any float dtype (model.generate casts to float32 first, which cannot
        # change which logit is largest or the first of equals)
        picked = logits.argmax(-1)  # (rows, width + 1): the greedy token after each position
        # A nan logit is the argmax (an inf one too): the check reads only the picked ones. Unchecked, a model whose
        # float16 activations overflow answered "" everywhere, which the leak judge reads as forgotten.
        if not torch.isfinite(logits.gather(-1, picked.unsqueeze(-1))).all():
            raise NonFiniteLogits(non_finite_logits_message(model))
        token_logprobs = (_picked_logprobs(logits.flatten(0, 1), picked.flatten()).view(picked.shape).tolist()
                          if scored is not None else None)
        picks = picked.tolist()
        keep, heads = [], []
        columns = mask.shape[1] - width  # where this forward's draft tokens start
        for i, row in enumerate(live):
            if row in pending:  # its answer ended last step; these logits follow its last token
                cut[row] = dict(zip(stop_ids, logits[i, 0].float().log_softmax(-1)[stop_tensor].tolist()))
                pending.discard(row)
                continue
            d = offered[i]
            accepted = 0  # draft tokens equal to the greedy token at their place
            while accepted < len(d) and d[accepted] == picks[i][accepted]:
                accepted += 1
            mask[i, columns + accepted:] = 0  # the rest of its draft (and padding) is no context
            ended = False
            fed = 0  # draft tokens this row's answer holds as context: an ended row's last one is never fed back
            for j in range(accepted + 1):
                token = picks[i][j]
                tokens[row].append(token)
                if token_logprobs is not None:
                    logprobs[row].append(token_logprobs[i][j])
                n = len(tokens[row])
                if token in stop_set:
                    ended = True
                elif n == budgets[row]:
                    if scored is None or not ends:
                        ended = True
                    elif j < accepted:  # the next position's logits follow this token
                        cut[row] = dict(zip(stop_ids, logits[i, j + 1].float().log_softmax(-1)[stop_tensor].tolist()))
                        ended, fed = True, 1  # as the one step more a row without a draft runs for its cut
                    else:
                        pending.add(row)
                elif (should_stop is not None and n % STOP_CHECK_EVERY == 0 and n < max_new_tokens
                      and should_stop(row, tokens[row])):
                    ended = True
                if ended or row in pending:
                    break
            if ended:
                # Ended inside its accepted draft: the draft tokens after its last one fed back are no context, as
                # decoding without a draft never computes them (the keys and values `keep_kv` copies out: review 118).
                mask[i, columns + j + fed:] = 0
                continue
            # still the draft's opening (the accepted tokens are; the last one may not be), with more to offer
            n = len(tokens[row])
            drafting[row] = drafting[row] and len(drafts[row]) > n and drafts[row][n - 1] == tokens[row][-1]
            keep.append(i)
            heads.append((tokens[row][-1], int(new_positions[i, -width - 1]) + 1 + accepted))
        if len(keep) < len(live):
            if keep_kv:
                for i in sorted(set(range(len(live))) - set(keep)):
                    if keep_rows is not None and not keep_rows[live[i]]:
                        continue
                    if shared and kv_prefix is None:  # the shared prefix first, once
                        if shared * per_position > keep_kv:
                            keep_kv = 0  # no row can be kept without it
                            break
                        kv_prefix = _kv_of_row(cache, i, slice(0, shared))
                        keep_kv, spent = keep_kv - shared * per_position, spent + shared * per_position
                    own, taken = _keep_row(cache, i, mask[i], shared, keep_kv, per_position)
                    if own is not None:
                        kept[live[i]] = own
                    keep_kv, spent = keep_kv - taken, spent + taken
            # Rows that have ended leave the batch (their keys and values with them), so each
            # step computes only rows still generating (see the module docstring).
            index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            mask = mask[index]
            live = [live[i] for i in keep]
        if live:
            head = torch.tensor([[t] for t, _ in heads], dtype=torch.long, device=device)
            head_positions = torch.tensor([[p] for _, p in heads], dtype=torch.long, device=device)
    if forwards is not None:
        forwards.append(runs)
    if kept_bytes is not None:
        kept_bytes.append(spent if kept else 0)  # a prefix no row kept is not held
    if scored is not None:
        scored.extend(Scored(tokens[row], logprobs[row], cut.get(row), kv=kept.get(row),
                             kv_prefix=kv_prefix if row in kept else None) for row in range(rows))
    return tokens


def most_columns(prompt_width: int, budgets: list[int], drafted: bool) -> int:
    """The most columns a batch's decoding cache can reach (`kv_cache.sees_every_column`): its prompts' width, then
    per forward one token and, drafting, up to DRAFT_BLOCK draft tokens, for at most the largest budget's tokens and
    the one step more a row cut by its budget runs for its `Scored.cut`."""
    return prompt_width + (max(budgets) + 1) * (1 + (DRAFT_BLOCK if drafted else 0))


def kv_keepable(model) -> bool:
    """Whether a row's keys and values can be copied out of MODEL's decoding cache: every layer keeps every
    position (full attention: `kv_cache.new_cache`'s buffers, not a sliding window) and the config says
    how many bytes a position takes."""
    return keeps_every_position(model) and bool(kv_bytes_per_position(model))


def _keep_row(cache, i: int, mask_row, shared: int, budget: int, per_position: int) -> tuple[object | None, int]:
    """The ended row I of CACHE's keys and values after its first SHARED columns (the batch's shared prefix),
    as `_kv_of_row` gives them, and the bytes they take; (None, 0) when they would pass BUDGET. The columns that count
    (MASK_ROW 1: not padding, not a rejected draft) are the prompt's, then the answer's tokens fed back."""
    columns = mask_row[shared:].nonzero()[:, 0] + shared
    if len(columns) * per_position > budget:
        return None, 0
    return _kv_of_row(cache, i, columns), len(columns) * per_position


def _kv_of_row(cache, i: int, columns):
    """Row I's keys and values at COLUMNS (a slice or an index tensor) of every layer of CACHE, copied into one
    tensor (layers x 2 x heads x positions x head size) in host memory: on an accelerator they would hold
    its memory through training."""
    import torch

    return torch.stack([torch.stack([layer.keys[i][:, columns], layer.values[i][:, columns]])
                        for layer in cache.layers]).cpu()


class NonFiniteLogits(UnlearnError):
    """The model's logits came out nan or inf while generating (its message names the likely cause)."""


def non_finite_logits_message(model) -> str:
    """One line for a model whose logits came out nan or inf, naming the likely cause by its dtype."""
    import torch

    dtype = next(model.parameters()).dtype
    if dtype == torch.float16:
        return ("the model's logits are nan or inf in float16: its activations overflow float16's range "
                "(at most 65504); use --dtype bfloat16 or float32")
    return f"the model's logits are nan or inf ({str(dtype).removeprefix('torch.')}): its weights or activations are not finite"


def _greedy_parts(model, input_ids, attention, parts: int, *, should_stop, scored, **options) -> list[list[int]]:
    """`_greedy_batch` over PARTS contiguous slices of the batch's rows side by side (cpu_parts.run_pieces),
    joined in row order; the slices are cut by their work (`cpu_parts.balanced_slices`), not by row count.

    A slice drops the padding columns none of its rows uses: the rows are sorted by prompt length,
    so the shorter half of a pooled batch no longer runs the longer half's padding through every
    layer (the README run's before measurement: 2,688 prompt positions computed for 1,726 real
    ones). A row attends to the same positions as in one decode (padding is masked out, positions
    count real tokens); only the rows around it in each matmul change (float rounding, as with the
    thread count: bench/generation_bench.py counts outputs identical to `model.generate`'s).
    """
    budgets, drafts, forwards = options.pop("budgets"), options.pop("drafts", None), options.pop("forwards", None)
    # (KEPT_BYTES, like FORWARDS, is a list each slice appends to)
    options["keep_kv"] = options.get("keep_kv", 0) // parts  # each slice its share of the bytes
    keep_rows = options.pop("keep_rows", None)

    def part(lo: int, hi: int):
        used = attention[lo:hi].any(0).nonzero()
        start = int(used[0]) if len(used) else 0  # the slice's first column some row uses

        def run(cancelled):
            check = None if should_stop is None else (lambda row, ids: should_stop(lo + row, ids))
            own = [] if scored is not None else None
            tokens = _greedy_batch(model, input_ids[lo:hi, start:], attention[lo:hi, start:], should_stop=check,
                                   scored=own, cancelled=cancelled, budgets=budgets[lo:hi], forwards=forwards,
                                   drafts=None if drafts is None else drafts[lo:hi],
                                   keep_rows=None if keep_rows is None else keep_rows[lo:hi], **options)
            return tokens, own
        return run

    widths = [int(w) for w in attention.sum(1)]  # each row's prompt tokens (the batch is sorted by them)
    results = run_pieces([part(lo, hi) for lo, hi in balanced_slices(widths, budgets, parts)])
    if scored is not None:
        scored.extend(s for _, own in results for s in own)
    return [row for tokens, _ in results for row in tokens]


def _picked_logprobs(logits, token):
    """log p(TOKEN) per row from one position's LOGITS (rows × vocabulary), in float32 as scoring computes it."""
    logits = logits.float()
    return logits.gather(1, token[:, None])[:, 0] - logits.logsumexp(-1)


def generate(model, tokenizer, prompts: list[str], *, batch_size: int = 16, max_new_tokens: int | list[int] = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             desc: str | None = None, stop_row: Callable[[int, str], bool] | None = None,
             record: list | None = None, scored: list | None = None, drafts: list | None = None,
             token_ids: list | None = None, keep_kv: int = 0, keep_rows: list[bool] | None = None,
             scored_ends: bool = True, _model_generate: bool = False) -> list[str]:
    """Generate an answer for each raw prompt (rendered inside); greedy unless DO_SAMPLE.

    Batches hold BATCH_SIZE prompts of similar length, fewer if their KV cache would not fit
    in KV_CACHE_BUDGET (`batch_rows`).

    MAX_NEW_TOKENS: one budget, or one per prompt, so that sets with different budgets share
    batches (`Measurer.answer_sets`' pool): a greedy answer is then the one its own budget gives
    alone (the same tokens and `Scored`, to float rounding); a sampled one (`model.generate`)
    is cut at its budget.

    STOP_ROW(index, text_so_far) -> bool, if given, is called every STOP_CHECK_EVERY new
    tokens for each prompt still generating (INDEX into PROMPTS, TEXT decoded as the final
    output would be); True ends that prompt's answer with the text it has.
    RECORD, if a list, receives one dict per batch: its prompts' indices, prompt tokens, padded
    width, the number of new tokens of each row and those tokens, and the forward passes the
    own loop ran (summed over its parts; None from `model.generate`), for benchmarks and tests.
    SCORED, if a list, receives per prompt (in PROMPTS' order) its answer's `Scored` log-probabilities
    under MODEL, or None where they are not computed (`model.generate`, or a STOP_ROW ending).
    DRAFTS: per prompt, token ids its greedy answer is likely to start with (another model's
    answer, the last check's), or None: the own loop verifies them several tokens per forward
    (see the module docstring); the answers are the same, the forwards fewer when drafts hold.
    TOKEN_IDS, if a list, receives per prompt the new token ids its text decodes (a stop token
    included when generated): a draft to give back as it was generated, since the text is stripped
    and may tokenise otherwise.
    KEEP_KV: with SCORED, up to this many bytes of the answers' keys and values (the whole call) are
    kept in their `Scored` (`Scored.kv`, with `Scored.prompt_ids`; the own loop only); KEEP_ROWS, per prompt,
    whether its answer keeps them (None: every prompt's). SCORED_ENDS False: no `Scored.end` (a row cut by its budget then needs no
    step more: an answer scored only to keep its caches).
    """
    import torch
    from tqdm import tqdm

    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if budgets and min(budgets) < 1:  # the own loop appends a row's first token before testing its budget
        raise ValueError(f"generate: a budget of {min(budgets)} new tokens; each must be at least 1")
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} token budgets for {len(prompts)} prompts")
    # A row past a learned position table would end in an IndexError mid-forward, one far past a rotary model's
    # context in a failed allocation: one line instead.
    # (Callers that know the rows' files check first, with FILE:LINE: `check_prompts_fit`.)
    refuse_past_context(model, [len(ids) for ids in encoded], budgets, lambda i: _prompt_label(prompts, i))
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    own_scores: list = [None] * len(prompts)
    new_ids: list = [None] * len(prompts)
    pad_id = tokenizer.pad_token_id
    stop_ids = _stop_ids(model, tokenizer)
    own_loop = not _model_generate and _own_loop_applies(model, do_sample)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    if encoded:
        batch_size = batch_rows(model, batch_size, max(map(len, encoded)) + max(budgets))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    # In the fallback format an answer ends where the model starts the format's next turn (data.FALLBACK_TURN):
    # its text and token ids stop there. The row itself ends at the first check (every STOP_CHECK_EVERY tokens)
    # that finds the turn begun, so its `Scored` may cover a few tokens more than it decodes: scorers read the
    # ones they need as a prefix. (It ran on to its budget before: a base model writes its next turn after a
    # short answer, so most of a 48-token budget was spent on text nothing reads.)
    cut_turn = [fallback_format(tokenizer, p) for p in prompts]

    def decoded(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def answer(ids, i: int) -> tuple[str, list[int]]:
        """Prompt I's answer from its new token IDS: the text, cut at the format's next turn, and the most
        tokens whose text begins it (all of them where no turn starts; scanned down, since a byte-fallback
        decoder spells an unfinished character as one "�" a byte, so a prefix's text is not always a prefix
        of the whole's)."""
        whole = decoded(ids)
        kept = answer_in_format(tokenizer, prompts[i], whole)
        n = len(ids) if kept == whole else next(n for n in range(len(ids), -1, -1) if kept.startswith(decoded(ids[:n])))
        return kept.strip(), [int(t) for t in ids[:n]]

    def stop_check(batch):
        """SHOULD_STOP for a batch's rows: STOP_ROW (if given) on the text as the final output reads, or the
        format's next turn begun (the answer is over); None when neither can end a row of BATCH."""
        if stop_row is None and not any(cut_turn[i] for i in batch):
            return None

        def should_stop(row, ids) -> bool:
            whole, i = decoded(ids), batch[row]
            return (stop_row is not None and stop_row(i, answer_in_format(tokenizer, prompts[i], whole).strip())) or (
                cut_turn[i] and turn_started(whole))
        return should_stop

    try:
        for batch in tqdm(batches, desc=desc or "generating", unit="batch", file=sys.stderr,
                          disable=True if desc is False or len(batches) < 2 else None, leave=False):  # tty only
            prompts_ids = [encoded[i] for i in batch]
            # The prompt prefix the batch shares runs once (kv_cache.py); each row keeps at least
            # one token of its own, whose logits give its first new token.
            # Not where a sliding window could lose it: a short row's left padding after the prefix would push the
            # prefix out of view while the row's own positions are still inside the window.
            share_prefix = own_loop and len(batch) > 1 and sees_every_column(
                model, most_columns(max(map(len, prompts_ids)), [budgets[i] for i in batch], drafted=drafts is not None))
            shared = shared_length(prompts_ids, min(map(len, prompts_ids)) - 1) if share_prefix else 0
            input_ids, attention = _left_padded([ids[shared:] for ids in prompts_ids], pad_id)
            should_stop = stop_check(batch)
            batch_scores = [] if scored is not None and stop_row is None else None
            mine = [budgets[i] for i in batch]
            runs: list[int] = []
            kept_bytes: list[int] = []
            with torch.inference_mode(), evaluating(model):
                if own_loop:
                    options = dict(stop_ids=stop_ids, pad_id=pad_id, budgets=mine, forwards=runs,
                                   prefix=prompts_ids[0][:shared], keep_kv=keep_kv if batch_scores is not None else 0,
                                   keep_rows=None if keep_rows is None else [keep_rows[i] for i in batch],
                                   kept_bytes=kept_bytes, ends=scored_ends,
                                   drafts=None if drafts is None else [drafts[i] for i in batch])
                    parts = parallel_pieces(model, len(batch), MIN_ROWS_PER_WORKER)
                    new = (_greedy_parts(model, input_ids, attention, parts, should_stop=should_stop,
                                         scored=batch_scores, **options) if parts > 1 else
                           _greedy_batch(model, input_ids, attention, should_stop=should_stop,
                                         scored=batch_scores, **options))
                else:
                    new = _hf_batch(model, input_ids, attention, stop_ids=stop_ids, pad_id=pad_id,
                                    max_new_tokens=max(mine), do_sample=do_sample, temperature=temperature,
                                    top_p=top_p, top_k=top_k, should_stop=should_stop)
                    new = [ids[:b] for ids, b in zip(new, mine)]
            for row, i in enumerate(batch):
                outputs[i], new_ids[i] = answer(new[row], i)
                if batch_scores:
                    own_scores[i] = batch_scores[row]
                    if own_scores[i].kv is not None:  # the prompt its cache begins with
                        own_scores[i].prompt_ids = encoded[i]
            keep_kv -= sum(kept_bytes)
            if record is not None:
                record.append({"rows": len(batch), "indices": list(batch), "width": input_ids.shape[1] + shared,
                               "shared_prefix": shared, "prompt_tokens": sum(map(len, prompts_ids)),
                               "new_tokens": [len(ids) for ids in new], "new_ids": new,
                               "forwards": sum(runs) if own_loop else None})
    finally:
        torch.random.set_rng_state(generator_state)
    if scored is not None:
        scored.extend(own_scores)
    if token_ids is not None:
        token_ids.extend(new_ids)
    return outputs


def generate_hf(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """`generate` through `model.generate` for every batch (the reference the own loop must match)."""
    return generate(model, tokenizer, prompts, **kwargs, _model_generate=True)


def _hf_batch(model, input_ids, attention, *, stop_ids, pad_id, max_new_tokens, do_sample, temperature, top_p,
              top_k=0, should_stop) -> list[list[int]]:
    """New tokens of each row from `model.generate` (EOS included; the pads after it removed)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    width = input_ids.shape[1]
    device = next(model.parameters()).device
    # top_k given always: left out, transformers samples from the 50 likeliest tokens only (its default), which
    # no option here says; 0 is no cut, so --temperature and --top-p are the whole rule
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    stopped: dict[int, int] = {}  # row -> its length when SHOULD_STOP ended it

    class RowCheck(StoppingCriteria):
        def __call__(self, ids, scores, **kwargs):
            done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            new = ids.shape[1] - width
            if new % STOP_CHECK_EVERY == 0 and new < max_new_tokens:
                for row in range(ids.shape[0]):
                    tokens = ids[row, width:].tolist()
                    if row in stopped:
                        done[row] = True
                    elif not any(t in stop_ids for t in tokens) and should_stop(row, tokens):
                        stopped[row] = new
                        done[row] = True
            return done

    try:
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
            pad_token_id=pad_id, eos_token_id=stop_ids, use_cache=True,
            stopping_criteria=StoppingCriteriaList([RowCheck()]) if should_stop is not None else None, **sampling,
        )
    except RuntimeError as exc:
        # torch.multinomial's refusal of non-finite probabilities: logits over a tiny temperature overflow
        # float32 (`unlearn eval --do-sample --temperature 1e-40`), or the model's own logits are nan
        if not do_sample or "probability tensor contains" not in str(exc):
            raise
        if temperature >= 1:  # no temperature overflows float32: the logits themselves are not finite
            raise NonFiniteLogits(non_finite_logits_message(model)) from None
        raise UnlearnError(f"sampling at --temperature {temperature:g} gave nan or inf probabilities: the "
                           f"model's logits divided by the temperature are not finite in float32; raise "
                           f"--temperature") from None
    rows = []
    for row in range(generated.shape[0]):
        tokens = generated[row, width:].tolist()
        end = stopped.get(row, len(tokens))
        for position, token in enumerate(tokens[:end]):
            if token in stop_ids:
                end = position + 1
                break
        rows.append(tokens[:end])
    return rows
