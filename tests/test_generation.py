"""generation.py: the own greedy loop gives model.generate's tokens; the stop_row hook; seeded sampling."""

import copy
import re

import pytest
import torch

import tiny_models
from unlearn.data import encode_prompt
from unlearn.generation import STOP_CHECK_EVERY, _left_padded, _own_loop_applies, generate, generate_hf
from unlearn.lora import LoraSettings, attach_lora, lora_modules
from unlearn.models import load_model

# Mixed lengths, so that batches are left-padded (sorted by length, then cut into batches of 3).
PROMPTS = ["Hi", "What is the capital of France?", "Bees make honey. Water boils at one hundred degrees. Why?",
           "Two plus two", "Harry Potter is a wizard and Hermione Granger is his friend at Hogwarts. Who is Ron?"]
NEW = 12


def load(directory, dtype="float32"):
    """A tiny random model with weights large enough (std 0.3) that greedy answers vary from token to token."""
    loaded = load_model(str(directory), log=lambda m: None)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3, generator=generator)
    return loaded.model.to(getattr(torch, dtype)), loaded.tokenizer


def run(fn, model, tokenizer, **kwargs):
    record = []
    outputs = fn(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=NEW, desc=False, record=record, **kwargs)
    return outputs, [n for batch in record for n in batch["new_tokens"]]


def stop_mid_batch(model, tokenizer) -> int:
    """Add to the model's EOS ids a token model.generate emits early in one row of the first batch, not in another."""
    order = sorted(range(len(PROMPTS)), key=lambda i: len(encode_prompt(tokenizer, PROMPTS[i])))
    ids, mask = _left_padded([encode_prompt(tokenizer, PROMPTS[i]) for i in order[:3]], tokenizer.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    rows = out[:, ids.shape[1]:].tolist()
    assert all(len(r) == NEW for r in rows)  # no EOS of their own in NEW tokens
    token = next(t for r in rows for t in r[1:NEW // 2] if any(t not in other for other in rows))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, token]
    return token


@pytest.mark.parametrize("which", ["llama_dir", "opt_dir"])
def test_greedy_is_model_generate_token_for_token(request, which):
    model, tokenizer = load(request.getfixturevalue(which))
    stop_mid_batch(model, tokenizer)
    assert _own_loop_applies(model, do_sample=False)
    reference, ref_lengths = run(generate_hf, model, tokenizer)
    record = []
    outputs = generate(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=NEW, desc=False, record=record)
    lengths = [n for batch in record for n in batch["new_tokens"]]
    assert outputs == reference and lengths == ref_lengths
    assert min(lengths) < NEW and max(lengths) == NEW  # a row ended at the extra EOS while others ran on
    if which == "llama_dir":  # its chat template starts every prompt alike: that prefix ran once per batch
        assert all(batch["shared_prefix"] > 0 for batch in record)


def new_ids(fn, model, tokenizer) -> list[list[int]]:
    """Each prompt's new token ids (in PROMPTS' order) as FN generates them."""
    record, ids = [], [None] * len(PROMPTS)
    fn(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=NEW, desc=False, record=record)
    for batch in record:
        for i, row in zip(batch["indices"], batch["new_ids"]):
            ids[i] = row
    return ids


def test_greedy_matches_in_bfloat16_up_to_near_ties(llama_dir):
    """In bf16 a logit is rounded to 8 significant bits, and the own loop's shapes (the shared prefix run
    once, rows leaving) round differently from model.generate's: two tokens whose logits nearly tie can
    swap. So each row must match token for token up to its first difference, and there the two tokens'
    logits, from a float32 copy of the same weights, must be within one bf16 rounding step of the
    largest logit (2⁻⁸ of it) of each other. On an AVX2 EPYC one row swapped at its 12th token, where
    the two logits differed by 0.002 and the third-best was 0.04 below. A wrong mask, position or
    cache picks tokens far from the top instead."""
    model, tokenizer = load(llama_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    ours, theirs = new_ids(generate, model, tokenizer), new_ids(generate_hf, model, tokenizer)
    exact = copy.deepcopy(model).float()
    swaps = 0
    for prompt, a, b in zip(PROMPTS, ours, theirs):
        first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None:
            assert a == b
            continue
        swaps += 1
        with torch.no_grad():
            logits = exact(torch.tensor([encode_prompt(tokenizer, prompt) + a[:first]])).logits[0, -1]
        assert abs(logits[a[first]] - logits[b[first]]) <= 2 ** -8 * logits.abs().max(), (prompt, first)
    assert swaps <= 2  # a tie now and then, not a different computation


def test_greedy_matches_with_lora(llama_dir):
    model, tokenizer = load(llama_dir)
    attach_lora(model, LoraSettings(rank=4, alpha=8), seed=0)
    for m in lora_modules(model).values():
        m.lora_B.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    plain = run(generate, *load(llama_dir))
    assert plain == run(generate, *load(llama_dir))
    with_lora = run(generate, model, tokenizer)
    assert with_lora == run(generate_hf, model, tokenizer) and with_lora != plain


def test_generation_config_processor_falls_back_to_model_generate(llama_dir):
    model, tokenizer = load(llama_dir)
    plain = run(generate, model, tokenizer)
    model.generation_config.repetition_penalty = 5.0
    assert not _own_loop_applies(model, do_sample=False)
    penalised = run(generate, model, tokenizer)
    assert penalised == run(generate_hf, model, tokenizer) and penalised != plain


@pytest.mark.parametrize("fn", [generate, generate_hf])
def test_stop_row_ends_a_row_with_the_text_it_has(llama_dir, fn):
    model, tokenizer = load(llama_dir)
    full, full_lengths = run(generate, model, tokenizer)
    calls = []

    def stop_row(index, text):
        calls.append((index, text))
        return index == 2 and len([c for c in calls if c[0] == 2]) == 2  # prompt 2 stops at its second check

    outputs, lengths = run(fn, model, tokenizer, stop_row=stop_row)
    # every other prompt: as without the hook, and checked after 4 and 8 tokens (not at 12, its end)
    assert [o for i, o in enumerate(outputs) if i != 2] == [o for i, o in enumerate(full) if i != 2]
    assert sorted({i for i, _ in calls}) == list(range(len(PROMPTS)))
    assert sum(1 for i, _ in calls if i == 0) == (NEW - 1) // STOP_CHECK_EVERY
    # the texts it sees are the final output's prefixes, decoded as the output is
    assert all(full[i].startswith(text) for i, text in calls if i != 2)
    # prompt 2 ended after 2 * STOP_CHECK_EVERY tokens, its output the text of the second check
    assert outputs[2] == [t for i, t in calls if i == 2][-1]
    assert 2 * STOP_CHECK_EVERY in lengths and full[2].startswith(outputs[2]) and outputs[2] != full[2]


def test_sampling_cuts_no_tokens_unless_asked(llama_dir, monkeypatch):
    # left out, transformers' own default top_k=50 sampled from the 50 likeliest tokens, which no option says
    model, tokenizer = load(llama_dir)
    seen = []
    real = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("top_k", "not given"))
        return real(*args, **kwargs)
    monkeypatch.setattr(model, "generate", spy)
    generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2, do_sample=True, top_p=1.0, desc=False)
    generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2, do_sample=True, top_k=50, desc=False)
    assert seen == [0, 50]


def test_sampling_is_reproducible_per_seed_and_leaves_the_global_rng(llama_dir):
    model, tokenizer = load(llama_dir)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = generate(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=NEW, do_sample=True, seed=7, desc=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = generate(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=NEW, do_sample=True, seed=7, desc=False)
    other = generate(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=NEW, do_sample=True, seed=8, desc=False)
    greedy = generate(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=NEW, desc=False)
    assert first == again and first != other and first != greedy


def test_preallocated_cache_returns_what_concatenation_would(llama_dir):
    import torch
    from transformers.cache_utils import DynamicLayer

    from unlearn.kv_cache import new_cache
    from unlearn.models import load_model

    model = load_model(str(llama_dir)).model
    cache = new_cache(model, capacity=6)
    layer = cache.layers[0]
    assert type(layer) is not DynamicLayer and isinstance(layer, DynamicLayer)
    plain = DynamicLayer()
    torch.manual_seed(0)
    steps = [torch.randn(3, 2, 4, 5)] + [torch.randn(3, 2, 1, 5) for _ in range(2)]
    for i, new in enumerate(steps):
        if i == 2:  # the middle row ends: both drop it
            layer.batch_select_indices(torch.tensor([0, 2]))
            plain.batch_select_indices(torch.tensor([0, 2]))
            new = new[[0, 2]]
        keys, values = layer.update(new, -new)
        expected_keys, expected_values = plain.update(new, -new)
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    assert layer.get_seq_length() == 6 and keys.shape == (2, 2, 6, 5)


@pytest.mark.parametrize("which", ["llama_dir", "opt_dir"])
def test_scored_logprobs_are_the_teacher_forced_ones(request, which):
    """Scored: log p of every generated token, and after a budget cut log p of each stop token next,
    equal to one whole forward pass over prompt + answer (float rounding apart)."""
    from unlearn.generation import _stop_ids

    model, tokenizer = load(request.getfixturevalue(which))
    stop_mid_batch(model, tokenizer)
    scored = []
    outputs = generate(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=NEW, desc=False, scored=scored)
    assert len(scored) == len(outputs) == len(PROMPTS)
    stops = _stop_ids(model, tokenizer)
    assert any(s.end is None for s in scored) and any(s.end is not None for s in scored)  # ended, and cut
    for prompt, s in zip(PROMPTS, scored):
        prompt_ids = encode_prompt(tokenizer, prompt)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + s.ids])).logits[0].float().log_softmax(-1)
        start = len(prompt_ids) - 1
        expected = [float(logits[start + i, t]) for i, t in enumerate(s.ids)]
        assert s.logprobs == pytest.approx(expected, abs=1e-4)
        if s.end is None:
            assert len(s.ids) < NEW and s.ids[-1] in stops
        else:
            assert len(s.ids) == NEW and set(s.end) == set(stops)
            assert [s.end[t] for t in stops] == pytest.approx([float(logits[-1, t]) for t in stops], abs=1e-4)


def test_scored_is_none_where_not_computed(llama_dir):
    model, tokenizer = load(llama_dir)
    scored = []
    generate(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=4, desc=False, scored=scored,
             stop_row=lambda i, text: False)
    assert scored == [None] * len(PROMPTS)  # a stop_row check may end a row: nothing is claimed
    scored = []
    generate_hf(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=4, desc=False, scored=scored)
    assert scored == [None] * len(PROMPTS)


@pytest.fixture
def two_parts(monkeypatch):
    """2 torch threads and MIN_ROWS_PER_WORKER 1: a batch of 2+ rows is decoded as 2 parts (`_greedy_parts`)."""
    import unlearn.generation as generation

    monkeypatch.setattr(generation, "MIN_ROWS_PER_WORKER", 1)
    parts = []
    split = generation._greedy_parts
    monkeypatch.setattr(generation, "_greedy_parts", lambda *a, **k: parts.append(a[3]) or split(*a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield parts
    torch.set_num_threads(threads)


def test_parts_give_one_decodes_tokens_scores_and_stop_checks(llama_dir, two_parts, monkeypatch):
    import unlearn.generation as generation

    model, tokenizer = load(llama_dir)
    stop_mid_batch(model, tokenizer)
    options = dict(batch_size=len(PROMPTS), max_new_tokens=NEW, desc=False)
    scored, widths = [], []
    batch = generation._greedy_batch
    monkeypatch.setattr(generation, "_greedy_batch", lambda m, ids, *a, **k: widths.append(ids.shape[1]) or
                        batch(m, ids, *a, **k))
    outputs = generate(model, tokenizer, PROMPTS, scored=scored, **options)
    assert two_parts == [2] and torch.get_num_threads() == 2  # split, and the thread count restored
    # each part runs its own prompts' width: the shorter prompts' part none of the longer ones' padding
    assert len(widths) == 2 and min(widths) < max(widths)
    assert outputs == generate_hf(model, tokenizer, PROMPTS, **options)
    monkeypatch.setattr(generation, "MIN_ROWS_PER_WORKER", 100)  # one decode, for the scores
    one = []
    assert generate(model, tokenizer, PROMPTS, scored=one, **options) == outputs and two_parts == [2]
    for a, b in zip(scored, one):
        assert a.ids == b.ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert (a.end is None) == (b.end is None) and (a.end is None or a.end == pytest.approx(b.end, abs=1e-5))
    assert any(s.end is None for s in scored) and any(s.end is not None for s in scored)

    # stop_row sees the caller's prompt indices from every part; the longest prompt is in the last part
    monkeypatch.setattr(generation, "MIN_ROWS_PER_WORKER", 1)
    longest = max(range(len(PROMPTS)), key=lambda i: len(encode_prompt(tokenizer, PROMPTS[i])))
    seen = []

    def stop_row(index, text):
        seen.append((index, text))
        return index == longest

    stopped = generate(model, tokenizer, PROMPTS, stop_row=stop_row, **options)
    order = sorted(range(len(PROMPTS)), key=lambda i: len(encode_prompt(tokenizer, PROMPTS[i])))
    checked = {i for i, _ in seen}  # rows of both parts (a row that ended early was never checked)
    assert two_parts == [2, 2] and checked & set(order[:2]) and checked & set(order[2:])
    assert stopped[longest] == next(t for i, t in seen if i == longest) != outputs[longest]
    assert [o for i, o in enumerate(stopped) if i != longest] == [o for i, o in enumerate(outputs) if i != longest]


def test_an_error_in_one_part_ends_the_batch_with_it(llama_dir, two_parts):
    model, tokenizer = load(llama_dir)
    longest = max(range(len(PROMPTS)), key=lambda i: len(encode_prompt(tokenizer, PROMPTS[i])))

    def stop_row(index, text):
        if index == longest:
            raise ValueError("bad row")
        return False

    with pytest.raises(ValueError, match="bad row"):
        generate(model, tokenizer, PROMPTS, batch_size=len(PROMPTS), max_new_tokens=NEW, desc=False, stop_row=stop_row)
    assert two_parts == [2] and torch.get_num_threads() == 2


def test_balanced_slices_least_largest_work():
    import itertools
    import random

    from unlearn.cpu_parts import balanced_slices

    # work of a run = its rows x its widest prompt + its budgets
    assert balanced_slices([1, 1, 1, 1], [1, 1, 1, 1], 2) == [(0, 2), (2, 4)]  # 2+2 and 2+2
    # by row count, 1,2 | 3,10 would be 2*2+10 = 14 and 2*10+10 = 30; the last row alone is 10+5 = 15,
    # the first three 3*3+15 = 24
    assert balanced_slices([1, 2, 3, 10], [5, 5, 5, 5], 2) == [(0, 3), (3, 4)]
    assert balanced_slices([3] * 10, [32] * 10, 3) == [(0, 4), (4, 8), (8, 10)]  # 140, 140, 70
    assert balanced_slices([2, 2], [1, 1], 2) == [(0, 1), (1, 2)]
    assert balanced_slices([4, 5, 6], [8, 8, 8], 1) == [(0, 3)]

    def work(widths, budgets, lo, hi):
        return (hi - lo) * max(widths[lo:hi]) + sum(budgets[lo:hi])

    rng = random.Random(0)
    for _ in range(200):
        n, pieces = rng.randint(2, 9), rng.randint(2, 4)
        widths = sorted(rng.randint(1, 30) for _ in range(n))
        budgets = [rng.choice([8, 32, 48]) for _ in range(n)]
        got = balanced_slices(widths, budgets, pieces)
        # consecutive, covering, min(pieces, n) runs of at least one row each
        assert got[0][0] == 0 and got[-1][1] == n and all(a[1] == b[0] for a, b in zip(got, got[1:]))
        assert len(got) == min(pieces, n) and all(hi > lo for lo, hi in got)
        best = min(max(work(widths, budgets, lo, hi) for lo, hi in zip((0,) + cut, cut + (n,)))
                   for cut in itertools.combinations(range(1, n), min(pieces, n) - 1))
        assert max(work(widths, budgets, lo, hi) for lo, hi in got) == best


@pytest.mark.parametrize("which", ["llama_dir", "opt_dir"])
def test_batches_are_capped_by_the_kv_cache_budget(request, which, monkeypatch):
    from unlearn import generation
    from unlearn.measure import generation_batches

    model, tokenizer = load(request.getfixturevalue(which))
    c = model.config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    # keys and values, every layer, float32
    per_position = 2 * c.num_hidden_layers * kv_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert generation.kv_bytes_per_position(model) == per_position
    assert generation.kv_bytes_per_position(model.to(torch.bfloat16)) == per_position // 2
    model.to(torch.float32)
    longest = max(len(encode_prompt(tokenizer, p)) for p in PROMPTS)
    # a budget for exactly 2 rows of the longest prompt plus NEW tokens (and a byte short of 3)
    monkeypatch.setattr(generation, "KV_CACHE_BUDGET", per_position * (longest + NEW) * 3 - 1)
    assert generation.batch_rows(model, 64, longest + NEW) == 2
    assert generation.batch_rows(model, 1, longest + NEW) == 1
    record = []
    outputs = generate(model, tokenizer, PROMPTS, batch_size=64, max_new_tokens=NEW, desc=False, record=record)
    assert [batch["rows"] for batch in record] == [2, 2, 1]
    assert [len(b) for b in generation_batches(model, tokenizer, PROMPTS, 64, NEW)] == [2, 2, 1]
    monkeypatch.setattr(generation, "KV_CACHE_BUDGET", 1)  # never below one row
    assert generation.batch_rows(model, 64, longest + NEW) == 1
    record = []
    assert generate(model, tokenizer, PROMPTS, batch_size=2, max_new_tokens=NEW, desc=False, record=record) == outputs
    assert [batch["rows"] for batch in record] == [1] * len(PROMPTS)


@pytest.mark.parametrize("parts", [1, 2])
def test_per_prompt_budgets_give_what_each_budget_gives_alone(llama_dir, monkeypatch, parts):
    # Budgets 5, 12, 8, 12, 3 in one call: each answer and its Scored (its log-probabilities, and for a row
    # its budget cut, log p of the stop tokens after it) are those of a call with that budget alone, and
    # the row with the extra EOS still ends where it did. Decoded in one batch, and in two parts.
    import unlearn.generation as generation

    model, tokenizer = load(llama_dir)
    stop_mid_batch(model, tokenizer)
    if parts == 2:
        monkeypatch.setattr(generation, "MIN_ROWS_PER_WORKER", 1)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
    try:
        budgets = [5, NEW, 8, NEW, 3]
        pooled, record = [], []
        outputs = generate(model, tokenizer, PROMPTS, batch_size=len(PROMPTS), max_new_tokens=budgets,
                           desc=False, scored=pooled, record=record)
        assert record[0]["rows"] == len(PROMPTS)  # one batch of mixed budgets
        for budget in sorted(set(budgets)):
            alone = []
            expected = generate(model, tokenizer, PROMPTS, batch_size=len(PROMPTS), max_new_tokens=budget,
                                desc=False, scored=alone)
            for i in (i for i, b in enumerate(budgets) if b == budget):
                a, b = pooled[i], alone[i]
                assert outputs[i] == expected[i] and a.ids == b.ids and len(a.ids) <= budget
                assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
                assert (a.end is None) == (b.end is None) and (a.end is None or a.end == pytest.approx(b.end, abs=1e-5))
        assert any(pooled[i].end is not None and budgets[i] < NEW for i in range(len(PROMPTS)))  # a short budget cut
        # without scores, and through model.generate, the same answers
        assert generate(model, tokenizer, PROMPTS, batch_size=len(PROMPTS), max_new_tokens=budgets,
                        desc=False) == outputs
        assert generate_hf(model, tokenizer, PROMPTS, batch_size=len(PROMPTS), max_new_tokens=budgets,
                           desc=False) == outputs
    finally:
        if parts == 2:
            torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="budgets"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=[4, 4], desc=False)


def test_last_positions_are_indices_below_the_width_and_a_count_at_it():
    # A count below the width would slice the hidden states into a strided view, whose head matmul
    # copies the vocabulary-wide weight per row; indices are gathered into a contiguous tensor.
    from unlearn.kv_cache import last_positions

    assert last_positions(5, 2).tolist() == [3, 4]
    assert last_positions(5, 1).tolist() == [4]
    assert last_positions(1, 1) == 1 and last_positions(3, 3) == 3


# --- the model's context -----------------------------------------------------------------------------


def test_position_limit_is_the_learned_table_less_its_offset(opt_dir, llama_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from unlearn.generation import position_limit

    opt, _ = load(opt_dir)
    assert opt.model.decoder.embed_positions.num_embeddings == 514  # max_position_embeddings 512 + offset 2
    assert position_limit(opt) == 512
    llama, _ = load(llama_dir)
    assert position_limit(llama) is None  # rotary: no table, no hard limit (max_position_embeddings is 512)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    assert position_limit(gpt2) == 64  # `wpe`, no offset


def test_generate_fills_a_learned_context_exactly_and_refuses_one_more(opt_dir, monkeypatch):
    """A prompt of n tokens and a budget of b take n + b positions (the last new token's position computes a
    budget-cut answer's end-token scores): b = 512 - n runs to position 511; b = 513 - n was an IndexError."""
    from unlearn import generation
    from unlearn.errors import UnlearnError

    model, tokenizer = load(opt_dir)
    monkeypatch.setattr(generation, "_stop_ids", lambda model, tokenizer: [])  # every row runs its whole budget
    prompt = "Who wrote it?"
    n = len(encode_prompt(tokenizer, prompt))
    record, scored = [], []
    generate(model, tokenizer, [prompt], max_new_tokens=512 - n, desc=False, record=record, scored=scored)
    assert record[0]["new_tokens"] == [512 - n] and len(scored[0].logprobs) == 512 - n
    sampled = generate(model, tokenizer, [prompt], max_new_tokens=512 - n, desc=False, do_sample=True)
    assert len(sampled) == 1  # model.generate's path fits too
    context = "past the context of the model (512 positions: learned position embeddings, max_position_embeddings 512)"
    with pytest.raises(UnlearnError) as caught:
        generate(model, tokenizer, [prompt], max_new_tokens=513 - n, desc=False, scored=[])
    assert str(caught.value) == (f"prompt 1 of 1 ('Who wrote it?'): the rendered prompt is {n} tokens; with a budget "
                                 f"of {513 - n} new tokens that is 513 positions, {context}; lower the budget to "
                                 f"{512 - n} or shorten the prompt")
    long = "Who wrote it? " + "word " * 5000
    big = len(encode_prompt(tokenizer, long))
    with pytest.raises(UnlearnError) as caught:
        generate(model, tokenizer, ["Hi", long], max_new_tokens=[4, 8], desc=False)
    assert str(caught.value) == (f"prompt 2 of 2 ('Who wrote it? word word word word word w...'): the rendered "
                                 f"prompt is {big} tokens; with a budget of 8 new tokens that is {big + 8} "
                                 f"positions, {context}; shorten the prompt")


def test_check_sets_fit_names_file_and_line_and_leaves_rotary_models_alone(opt_dir, llama_dir):
    from pathlib import Path

    from unlearn.data import Example
    from unlearn.errors import UnlearnError
    from unlearn.generation import check_sets_fit
    from unlearn.measure import EvalSet

    long = "Who wrote it? " + "word " * 110
    rows = [Example("Hi", None, 1), Example(long, None, 3), Example(long + "more", None, 5)]
    sets = [EvalSet("p", "forget", rows, Path("data/p.jsonl"))]
    opt, opt_tokenizer = load(opt_dir)
    n = len(encode_prompt(opt_tokenizer, long))
    assert n < 512 < n + 64  # fits alone, not with a budget of 64
    check_sets_fit(opt, opt_tokenizer, sets, 512 - len(encode_prompt(opt_tokenizer, long + "more")))
    with pytest.raises(UnlearnError) as caught:
        check_sets_fit(opt, opt_tokenizer, sets, 64, "--max-new-tokens", whose="--model tiny-opt")
    assert str(caught.value) == (
        f"data/p.jsonl:3: the rendered prompt is {n} tokens; with --max-new-tokens 64 that is {n + 64} positions, "
        f"past the context of --model tiny-opt (512 positions: learned position embeddings, max_position_embeddings"
        f" 512); lower --max-new-tokens to {512 - n} or shorten the prompt (1 more row too: data/p.jsonl:5)")
    # Llama's rotary positions have no table: 600 positions are not refused, and generation runs past 512.
    llama, llama_tokenizer = load(llama_dir)
    far = "Who wrote it? " + "word " * 300
    assert len(encode_prompt(llama_tokenizer, far)) > 512
    check_sets_fit(llama, llama_tokenizer, [EvalSet("p", "forget", [Example(far, None, 1)])], 64)
    assert len(generate(llama, llama_tokenizer, [far], max_new_tokens=4, desc=False)) == 1


def kept_kv_bytes(llama_dir, batch_size: int, keep_kv: int) -> int:
    """The bytes of keys and values `generate` keeps for four prompts of the tiny Llama under KEEP_KV."""
    from unlearn.generation import generate
    from unlearn.models import load_model

    loaded = load_model(str(llama_dir), log=lambda m: None)
    prompts = ["the capital of France is", "one two three four five six", "a", "the capital of Spain"]
    scored = []
    generate(loaded.model.eval(), loaded.tokenizer, prompts, batch_size=batch_size, max_new_tokens=4, scored=scored,
             keep_kv=keep_kv)
    tensors = {id(t): t for s in scored if s is not None for t in (s.kv, s.kv_prefix) if t is not None}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_G14_the_kept_key_value_bytes_are_bounded_over_the_whole_call(llama_dir):
    # KEEP_KV bounds the whole call ("up to this many bytes of the answers' keys and values (the whole call)"):
    # with half of what every row takes, at most half is kept, over both batches of 2 (the mutant gave each batch
    # the whole budget again)
    whole = kept_kv_bytes(llama_dir, 2, 2**30)
    assert 0 < kept_kv_bytes(llama_dir, 2, whole // 2) <= whole // 2


def test_G15_the_kept_bytes_are_bounded_when_a_batch_runs_in_parts(llama_dir, two_parts):
    # one batch of 4 in 2 parts: each part gets its share of the bytes (the mutant: each the whole)
    whole = kept_kv_bytes(llama_dir, 4, 2**30)
    assert 0 < kept_kv_bytes(llama_dir, 4, whole // 2) <= whole // 2
    assert two_parts and two_parts[-1] == 2


@pytest.mark.parametrize("fn", [generate, generate_hf])
def test_an_answer_without_a_template_ends_at_the_formats_next_turn(llama_plain_dir, fn, monkeypatch):
    """The fallback format's answer stops where the model starts the next turn (data.FALLBACK_TURN), its text
    and token ids both; a STOP_ROW check ends the row there. The marker is set to text the random model
    writes mid-answer, as a base model writes "\\n### Question:" after its answer."""
    import unlearn.data as data_module

    model, tokenizer = load(llama_plain_dir)
    full_scored = []
    full, full_counts = run(generate, model, tokenizer, scored=full_scored)
    ids = []
    run(generate, model, tokenizer, token_ids=ids)
    whole = tokenizer.decode(ids[1], skip_special_tokens=True)
    # complete by the first check (4 tokens), with answer text before it (a marker opening the answer is its own)
    marker = next(m for m in (tokenizer.decode(ids[1][:k], skip_special_tokens=True)[-3:] for k in (3, 4))
                  if m.strip() and whole.count(m) == 1 and whole[:whole.index(m)].strip())
    monkeypatch.setattr(data_module, "FALLBACK_TURN", re.compile(re.escape(marker)))
    cut_ids, scored = [], []
    outputs, counts = run(fn, model, tokenizer, token_ids=cut_ids, scored=scored)
    assert outputs[1] == whole[:whole.index(marker)].strip() and outputs[1] != full[1]
    # the row ends at the first check that finds the turn begun (4 tokens), not at its budget: its answer's
    # log-probabilities are those of the longer run's first tokens
    assert sum(counts) < sum(full_counts) and NEW in full_counts
    if fn is generate:
        assert len(scored[1].ids) == 4 and scored[1].ids == full_scored[1].ids[:4]
        assert scored[1].logprobs == pytest.approx(full_scored[1].logprobs[:4], abs=1e-5)
    assert len(cut_ids[1]) < len(ids[1]) and ids[1][:len(cut_ids[1])] == cut_ids[1]
    assert whole.startswith(tokenizer.decode(cut_ids[1], skip_special_tokens=True))
    assert marker not in tokenizer.decode(cut_ids[1], skip_special_tokens=True)
    assert [o for i, o in enumerate(outputs) if marker not in full[i]] == [o for o in full if marker not in o]
    # with a stop check, the row ends once the turn has started: fewer tokens, the same answer
    record = []
    stopped = fn(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=NEW, desc=False, record=record,
                 stop_row=lambda i, text: False)
    assert stopped == outputs
    assert sum(n for batch in record for n in batch["new_tokens"]) < len(PROMPTS) * NEW


def _marker(tokenizer, ids, whole):
    """As test_an_answer_without_a_template_ends_at_the_formats_next_turn picks it."""
    return next(m for m in (tokenizer.decode(ids[:k], skip_special_tokens=True)[-3:] for k in (3, 4))
                if m.strip() and whole.count(m) == 1 and whole[:whole.index(m)].strip())


@pytest.mark.parametrize("fn", [generate, generate_hf])
def test_a_cut_answer_keeps_the_most_tokens_whose_text_begins_it(llama_plain_dir, fn, monkeypatch):
    import unlearn.data as data_module

    model, tokenizer = load(llama_plain_dir)
    ids = []
    run(generate, model, tokenizer, token_ids=ids)
    whole = tokenizer.decode(ids[1], skip_special_tokens=True)
    marker = _marker(tokenizer, ids[1], whole)
    monkeypatch.setattr(data_module, "FALLBACK_TURN", re.compile(re.escape(marker)))
    kept = whole[:whole.index(marker)]
    cut_ids, seen = [], []
    run(fn, model, tokenizer, token_ids=cut_ids)
    n = len(cut_ids[1])
    assert n > 0 and kept.startswith(tokenizer.decode(cut_ids[1], skip_special_tokens=True))
    # the most such tokens: one more token's text runs past the kept answer
    assert not kept.startswith(tokenizer.decode(ids[1][:n + 1], skip_special_tokens=True))
    # a STOP_ROW check reads the answer as the output reads it: cut before the turn, never the turn itself
    fn(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=NEW, desc=False,
       stop_row=lambda i, text: seen.append(text) or False)
    assert seen and all(marker not in text for text in seen)


def test_a_chat_templates_answer_runs_past_a_fallback_turn_marker(llama_dir, monkeypatch):
    """The fallback format's turn ends only the fallback format's answers: with a chat template a stop check
    does not end a row at the marker (its answers end at a stop token)."""
    import unlearn.data as data_module

    model, tokenizer = load(llama_dir)
    ids = []
    full, _ = run(generate, model, tokenizer, token_ids=ids)
    whole = tokenizer.decode(ids[1], skip_special_tokens=True)
    monkeypatch.setattr(data_module, "FALLBACK_TURN", re.compile(re.escape(_marker(tokenizer, ids[1], whole))))
    checked, tokens = run(generate, model, tokenizer, stop_row=lambda i, text: False)
    assert checked == full and sum(tokens) == sum(run(generate, model, tokenizer)[1])


def test_a_cut_answer_is_stripped_like_an_uncut_one(llama_plain_dir, monkeypatch):
    import unlearn.data as data_module

    model, tokenizer = load(llama_plain_dir)
    ids = []
    run(generate, model, tokenizer, token_ids=ids)
    whole = next(t for t in (tokenizer.decode(i, skip_special_tokens=True) for i in ids)
                 if any(marker_after_a_blank(t, p) for p in range(len(t))))
    at = next(p for p in range(len(whole)) if marker_after_a_blank(whole, p))  # a marker right after a blank
    monkeypatch.setattr(data_module, "FALLBACK_TURN", re.compile(re.escape(whole[at:at + 3])))
    outputs, _ = run(generate, model, tokenizer)
    assert whole[:at].strip() in outputs and whole[:at] not in outputs  # "... " read as "...", as before the cut


def marker_after_a_blank(text, p):
    """Whether TEXT's three characters at P can be a marker that follows a blank, after some answer text."""
    return (p > 0 and text[p - 1].isspace() and text[:p].strip() and text[p:p + 3].strip()
            and len(text[p:p + 3]) == 3 and text.count(text[p:p + 3]) == 1)


def test_generation_runs_in_eval_mode_and_gives_the_mode_back(llama_dir):
    model, tokenizer = load(llama_dir)
    model.eval()
    want, _ = run(generate, model, tokenizer)
    for module in model.modules():  # dropout the attention applies only in training mode
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.9
    model.train()
    got, _ = run(generate, model, tokenizer)
    assert got == want and model.training
    model.eval()
    run(generate, model, tokenizer)
    assert not model.training


def test_no_keys_and_values_are_kept_from_a_sliding_window_cache(tmp_path, llama_dir):
    from unlearn.generation import kv_keepable
    from unlearn.models import load_model

    sliding = load_model(str(tiny_models.build_family(tmp_path / "mistral", "mistral", sliding_window=16)),
                         log=lambda m: None).model
    assert not kv_keepable(sliding)
    assert kv_keepable(load(llama_dir)[0])
