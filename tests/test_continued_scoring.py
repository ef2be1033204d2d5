"""continued_scoring.py and generate's KEEP_KV: a pair scored from where it parts from the model's own
answer gives the whole pass's log-probabilities, from fewer positions."""

import pytest
import torch

from unlearn import evaluate, kv_cache
from unlearn.continued_scoring import continued_logprobs, resume_point
from unlearn.data import IGNORE_INDEX, encode_prompt
from unlearn.generation import Scored, generate, kv_bytes_per_position
from unlearn.measure import ShardedScorer
from unlearn.models import load_model

PROMPTS = ["the capital of France is", "one two three four five six", "a", "the capital of Spain"]


def _own_answers(model, tokenizer, keep_kv=2**30, budget=6):
    scored = []
    generate(model, tokenizer, PROMPTS, batch_size=4, max_new_tokens=budget, scored=scored, keep_kv=keep_kv)
    return scored


def _tiny(request, which):
    loaded = load_model(str(request.getfixturevalue(which)), log=lambda m: None)
    return loaded.model.eval(), loaded.tokenizer


@pytest.mark.parametrize("which", ["llama_dir", "opt_dir"])
def test_kept_keys_and_values_are_those_of_a_pass_over_the_same_tokens(request, which):
    model, tokenizer = _tiny(request, which)
    owns = _own_answers(model, tokenizer)
    for prompt, own in zip(PROMPTS, owns):
        assert own.prompt_ids == encode_prompt(tokenizer, prompt)
        positions = own.kept_positions()
        fed = positions - len(own.prompt_ids)
        # every answer token but the last was fed back (a budget cut's extra step feeds the last too)
        assert fed in (len(own.ids) - 1, len(own.ids))
        ids = torch.tensor([own.prompt_ids + own.ids[:fed]])
        cache = kv_cache.new_cache(model)
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{kv_cache.cache_argument(model): cache})
        assert len(own.kv) == len(cache.layers)
        for n, layer in enumerate(cache.layers):
            keys, values = own.kept_kv(n, positions)
            assert torch.allclose(keys, layer.keys[0], atol=1e-5)
            assert torch.allclose(values, layer.values[0], atol=1e-5)
    # the batch's shared prompt prefix is kept once for all its rows (the tiny template's opening)
    assert len({id(own.kv_prefix) for own in owns}) == 1 and owns[0].kv_prefix is not None


def test_the_byte_budget_bounds_what_is_kept(llama_dir):
    loaded = load_model(str(llama_dir), log=lambda m: None)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    per_position = kv_bytes_per_position(model)
    everything = _own_answers(model, tokenizer)
    first = everything[0].kept_positions() * per_position
    budget = first + per_position  # room for some answers, not all
    some = _own_answers(model, tokenizer, keep_kv=budget)
    kept = [own.kv.shape[3] * per_position for own in some if own.kv is not None]
    prefix = next(own for own in some if own.kv is not None).kv_prefix.shape[3] * per_position  # kept once
    assert 0 < len(kept) < len(PROMPTS) and sum(kept) + prefix <= budget
    assert [own.ids for own in some] == [own.ids for own in everything]  # the answers do not change
    assert all(own.kv is None for own in _own_answers(model, tokenizer, keep_kv=0))


def test_resume_point_by_hand():
    kv = torch.zeros(1, 2, 1, 6, 2)  # 1 layer, keys and values, 1 head, 6 positions: the prompt, 3 fed tokens
    own = Scored(ids=[4, 5, 6, 7], logprobs=[-1.0, -2.0, -3.0, -4.0], prompt_ids=[1, 2, 3], kv=kv)
    ignore = [IGNORE_INDEX] * 3
    # the answers part after 2 tokens: the last shared one (position 4) runs again for the first different one
    assert resume_point({"input_ids": [1, 2, 3, 4, 5, 9, 9], "labels": ignore + [4, 5, 9, 9]}, own) == 4
    # the pair is the kept answer and more: from the last kept position on (6)
    assert resume_point({"input_ids": [1, 2, 3, 4, 5, 6, 7, 8], "labels": ignore + [4, 5, 6, 7, 8]}, own) == 6
    # parts at once: the prompt's last token runs again (position 2)
    assert resume_point({"input_ids": [1, 2, 3, 9], "labels": ignore + [9]}, own) == 2
    # another prompt, a prompt cut for length, no cache: not at all
    assert resume_point({"input_ids": [1, 7, 3, 4], "labels": ignore + [4]}, own) == 0
    assert resume_point({"input_ids": [2, 3, 4, 5], "labels": [IGNORE_INDEX] * 2 + [4, 5]}, own) == 0
    assert resume_point({"input_ids": [1, 2, 3, 4], "labels": ignore + [4]}, Scored([4], [-1.0])) == 0


@pytest.mark.two_torch_threads  # its batches dealt to 2 pieces (cpu_parts), as on 2 cores before
@pytest.mark.parametrize("which", ["llama_dir", "opt_dir"])
def test_continued_log_probabilities_are_the_whole_pass(request, which):
    model, tokenizer = _tiny(request, which)
    owns = _own_answers(model, tokenizer)
    features, starts = [], []
    for n, own in enumerate(owns):
        other = (own.ids[-1] + 1) % len(tokenizer)  # a token the answer does not have there
        for answer in (own.ids[:2] + [other, 7], [other], own.ids[:n] + [11, 12, 13]):
            ids = own.prompt_ids + answer
            features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * len(own.prompt_ids) + answer})
            starts.append(resume_point(features[-1], own))
    items = [(f, own, start) for f, own, start in zip(features, [o for o in owns for _ in range(3)], starts)]
    assert starts[0] == len(owns[0].prompt_ids) + 1  # shares 2 answer tokens: resumes at the second
    got = continued_logprobs(model, tokenizer.pad_token_id, items, batch_size=5)
    want = evaluate.labelled_logprobs(model, tokenizer, features)
    assert [len(g) for g in got] == [len(w) for w in want]
    for g, w in zip(got, want):
        assert torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-4)


def test_a_scorer_given_contexts_runs_fewer_positions_for_the_same_figures(llama_dir):
    loaded = load_model(str(llama_dir), log=lambda m: None)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    texts = generate(model, tokenizer, PROMPTS, max_new_tokens=6)
    owns = _own_answers(model, tokenizer)
    # other answers to the same prompts: each the model's own opening, then words of its own
    pairs = [(p, (t.split(" ")[0] + " zebra crossing").strip()) for p, t in zip(PROMPTS, texts)]
    contexts = dict(zip(pairs, owns))
    positions = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: positions.append(kw["input_ids"].numel()),
                                           with_kwargs=True)
    scorer = ShardedScorer(model, tokenizer, batch_size=16)
    try:
        whole = scorer.logprobs(pairs)
        ran_whole, positions[:] = sum(positions), []
        continued = scorer.logprobs(pairs, contexts)
        ran_continued = sum(positions)
    finally:
        hook.remove()
    assert ran_continued < ran_whole
    for c, w in zip(continued, whole):
        assert torch.allclose(torch.tensor(c), torch.tensor(w), atol=1e-4)


def test_answers_scored_without_their_ends_take_no_step_more(llama_dir):
    """SCORED_ENDS False (answers scored only to keep their caches): the same tokens and log-probabilities,
    no `Scored.end`, and no forward for the end tokens after a budget cut."""
    loaded = load_model(str(llama_dir), log=lambda m: None)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    runs = {}
    for ends in (True, False):
        scored, record = [], []
        generate(model, tokenizer, PROMPTS, batch_size=4, max_new_tokens=6, scored=scored, record=record,
                 scored_ends=ends)
        runs[ends] = scored, record[0]["forwards"]
    (with_ends, forwards), (without, fewer) = runs[True], runs[False]
    assert any(own.end is not None for own in with_ends)  # some answer was cut by the budget
    assert all(own.end is None for own in without) and fewer == forwards - 1
    assert [own.ids for own in without] == [own.ids for own in with_ends]
    for a, b in zip(without, with_ends):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_a_row_resumed_near_the_position_table_beside_a_long_run_scores(opt_dir):
    # OPT's learned positions end at 512: padding columns were given positions past them (an IndexError)
    loaded = load_model(str(opt_dir), log=lambda m: None)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    long_prompt = " ".join(["Paris is a city in France."] * 80)
    while len(encode_prompt(tokenizer, long_prompt)) > 470:
        long_prompt = long_prompt.rsplit(" ", 1)[0]
    prompts = ["Who?", long_prompt]
    owns = []
    generate(model, tokenizer, prompts, max_new_tokens=8, scored=owns, keep_kv=2**30)
    pairs = [(prompts[0], " ".join(["Hermione and Ron are his friends."] * 12)), (prompts[1], "Paris.")]
    scorer = ShardedScorer(model, tokenizer, batch_size=16)
    got = scorer.logprobs(pairs, dict(zip(pairs, owns)))
    want = scorer.logprobs(pairs)
    assert [len(g) for g in got] == [len(w) for w in want]
    for g, w in zip(got, want):
        assert torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-4)
