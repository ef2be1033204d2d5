"""kv_cache.py: the shared prompt prefix, run once, gives the whole-sequence pass's numbers."""

import pytest
import torch

from unlearn import evaluate, kv_cache
from unlearn.models import load_model


def test_shared_length_by_hand():
    assert kv_cache.shared_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]], limit=10) == 2
    assert kv_cache.shared_length([[1, 2, 3], [1, 2, 3]], limit=2) == 2  # capped: rows keep tokens of their own
    assert kv_cache.shared_length([[7, 2], [1, 2]], limit=5) == 0
    assert kv_cache.shared_length([[1, 2, 3]], limit=1) == 1
    assert kv_cache.shared_length([], limit=3) == 0


@pytest.mark.parametrize("which", ["llama_dir", "opt_dir"])
def test_prefix_run_once_gives_the_whole_pass_logits(request, which):
    loaded = load_model(str(request.getfixturevalue(which)), log=lambda m: None)
    model = loaded.model.eval()
    prefix = [5, 9, 11, 4]
    rows = torch.tensor([prefix + [7, 8, 3, 2], prefix + [6, 6, 1, 9]])
    with torch.no_grad():
        whole = model(input_ids=rows).logits[:, len(prefix):]
        cache = kv_cache.new_cache(model)
        kv_cache.run_prefix(model, cache, prefix, rows=2)
        assert cache.get_seq_length() == len(prefix)
        rest = model(input_ids=rows[:, len(prefix):], attention_mask=torch.ones_like(rows),
                     position_ids=torch.arange(len(prefix), rows.shape[1])[None].expand(2, -1),
                     use_cache=True, **{kv_cache.cache_argument(model): cache}).logits
    assert torch.allclose(rest, whole, atol=1e-5)


def test_response_logprobs_with_and_without_the_prefix_agree(llama_dir, monkeypatch):
    # The tiny chat template starts every prompt alike; some prompts also share their first words.
    tiny = load_model(str(llama_dir), log=lambda m: None)
    pairs = [("the capital of France is", "Paris"), ("the capital of Spain is", "Madrid and more"),
             ("the capital", "of Italy is Rome"), ("one two", "three")]
    shared = []
    run_prefix = kv_cache.run_prefix
    monkeypatch.setattr(kv_cache, "run_prefix", lambda model, cache, prefix, rows: (shared.append(len(prefix)),
                                                                                    run_prefix(model, cache, prefix, rows)))
    with_prefix = evaluate.response_logprobs(tiny.model, tiny.tokenizer, pairs, batch_size=4)
    assert shared and shared[0] > 0
    monkeypatch.setattr(kv_cache, "prefix_applies", lambda model: False)
    without = evaluate.response_logprobs(tiny.model, tiny.tokenizer, pairs, batch_size=4)
    for got, expected in zip(with_prefix, without):
        assert len(got) == len(expected) and got == pytest.approx(expected, abs=1e-5)
