"""generation.py's drafts: guessed answer openings verified several tokens per forward change how many
forwards run, never the answer, its log-probabilities, its budget cut or its stop checks."""

import pytest
import torch

from unlearn import kv_cache
from unlearn.generation import DRAFT_BLOCK, generate, generate_hf
from unlearn.models import load_model

from test_generation import NEW, PROMPTS, load, stop_mid_batch


def answer_ids(model, tokenizer, **options) -> tuple[list[list[int]], int]:
    """Each prompt's new token ids (PROMPTS' order) and the forwards the own loop ran."""
    record, ids = [], [None] * len(PROMPTS)
    generate(model, tokenizer, PROMPTS, desc=False, record=record, **options)
    for batch in record:
        for i, row in zip(batch["indices"], batch["new_ids"]):
            ids[i] = row
    return ids, sum(batch["forwards"] for batch in record)


def wrong_drafts(right: list[list[int]]) -> list:
    """Drafts that hold for a while, then go wrong (one token off, at a different place in each row),
    one that is wrong from its first token, one past its answer's end, one empty and one None."""
    drafts = []
    for i, ids in enumerate(right):
        d = list(ids) + [7, 7, 7]  # past its end: tokens after an EOS or the budget are never used
        if i == 0:
            d[0] = (d[0] + 1) % 50
        elif i in (1, 2):
            where = min(len(ids) - 1, 3 * i + 1)
            d[where] = (d[where] + 1) % 50
        drafts.append(d)
    drafts[3] = []
    drafts[4] = None
    return drafts


@pytest.mark.parametrize("which", ["llama_dir", "opt_dir"])
def test_drafts_give_the_same_answers_scores_and_cuts_in_fewer_forwards(request, which):
    model, tokenizer = load(request.getfixturevalue(which))
    stop_mid_batch(model, tokenizer)  # one row ends at an EOS mid-batch
    budgets = [5, NEW, 8, NEW, 3]  # and some at short budgets (Scored.end after them)
    options = dict(batch_size=3, max_new_tokens=budgets)
    plain_scored = []
    plain, plain_forwards = answer_ids(model, tokenizer, scored=plain_scored, **options)
    expected = generate_hf(model, tokenizer, PROMPTS, desc=False, **options)
    assert generate(model, tokenizer, PROMPTS, desc=False, **options) == expected

    for drafts in (plain, wrong_drafts(plain)):
        scored = []
        outputs = generate(model, tokenizer, PROMPTS, desc=False, drafts=drafts, scored=scored, **options)
        ids, forwards = answer_ids(model, tokenizer, drafts=drafts, **options)
        assert outputs == expected and ids == plain
        for a, b in zip(scored, plain_scored):
            assert a.ids == b.ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
            assert (a.end is None) == (b.end is None) and (a.end is None or a.end == pytest.approx(b.end, abs=1e-5))
        assert forwards < plain_forwards
    assert any(s.end is None for s in plain_scored) and any(s.end is not None for s in plain_scored)
    # The right drafts: every row's answer in one forward per DRAFT_BLOCK + 1 tokens of its batch's
    # longest (and the forward after a budget cut, for the stop tokens' log-probabilities).
    _, forwards = answer_ids(model, tokenizer, drafts=plain, scored=[], **options)
    assert forwards <= 2 * -(-NEW // (DRAFT_BLOCK + 1)) + 2


def test_drafts_keep_the_stop_checks(llama_dir):
    model, tokenizer = load(llama_dir)
    plain, _ = answer_ids(model, tokenizer, batch_size=len(PROMPTS), max_new_tokens=NEW)
    seen = {}

    def stop_row(index, text):  # ends rows 1 and 3 at their second check, the others never
        seen.setdefault(index, []).append(text)
        return index in (1, 3) and len(seen[index]) == 2

    expected = generate(model, tokenizer, PROMPTS, batch_size=len(PROMPTS), max_new_tokens=NEW, desc=False,
                        stop_row=stop_row)
    checks, seen = seen, {}
    for drafts in (plain, wrong_drafts(plain)):
        got = generate(model, tokenizer, PROMPTS, batch_size=len(PROMPTS), max_new_tokens=NEW, desc=False,
                       stop_row=stop_row, drafts=drafts)
        assert got == expected and seen == checks  # the same texts checked, in each row's order
        seen = {}
    assert len(expected[1]) < len(generate(model, tokenizer, PROMPTS, max_new_tokens=NEW, desc=False)[1])


def test_drafts_in_two_parts(llama_dir, monkeypatch):
    import unlearn.generation as generation

    model, tokenizer = load(llama_dir)
    stop_mid_batch(model, tokenizer)
    plain, _ = answer_ids(model, tokenizer, batch_size=len(PROMPTS), max_new_tokens=NEW)
    monkeypatch.setattr(generation, "MIN_ROWS_PER_WORKER", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ids, _ = answer_ids(model, tokenizer, batch_size=len(PROMPTS), max_new_tokens=NEW,
                            drafts=wrong_drafts(plain))
    finally:
        torch.set_num_threads(threads)
    assert ids == plain


def test_the_preallocated_cache_grows_past_its_capacity(llama_dir):
    model = load_model(str(llama_dir), log=lambda m: None).model.eval()
    ids = torch.tensor([[5, 9, 11, 4, 7, 8, 3, 2, 6, 6]])
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        cache = kv_cache.new_cache(model, capacity=3)  # 10 positions: grows twice
        parts = [model(input_ids=ids[:, lo:hi], position_ids=torch.arange(lo, hi)[None], use_cache=True,
                       **{kv_cache.cache_argument(model): cache}).logits for lo, hi in ((0, 2), (2, 5), (5, 10))]
    assert cache.get_seq_length() == 10
    assert torch.allclose(torch.cat(parts, 1), whole, atol=1e-5)


def test_a_row_without_a_draft_at_the_position_tables_end_beside_a_drafting_row(opt_dir):
    # its padded guess columns were given positions past OPT's 512 learned ones (an IndexError)
    from unlearn.data import encode_prompt

    model, tokenizer = load(opt_dir)
    long_prompt = " ".join(["Paris is a city in France."] * 80)
    while len(encode_prompt(tokenizer, long_prompt)) > 506:
        long_prompt = long_prompt.rsplit(" ", 1)[0]
    prompts = ["Who?", long_prompt]
    budgets = [16, 512 - len(encode_prompt(tokenizer, long_prompt))]
    ids = []
    plain = generate(model, tokenizer, prompts, max_new_tokens=budgets, token_ids=ids, desc=False)
    assert generate(model, tokenizer, prompts, max_new_tokens=budgets, drafts=[ids[0], None], desc=False) == plain


@pytest.mark.parametrize("family", ["mistral", "gptneo"])  # (gemma2's tiny model gave the same answers either way)
def test_no_draft_under_a_sliding_window(tmp_path, family):
    """(review 112) A rejected draft token stays in the cache as a masked column; a sliding-window layer counts its
    window in cache slots, so each one pushed a real token out of view: past the window, the answer was another than
    one-token-at-a-time decoding gives. Such a model's rows decode without drafts."""
    import tiny_models

    from unlearn.data import encode_prompt

    loaded = load_model(str(tiny_models.build_family(tmp_path / family, family, sliding_window=6)), log=lambda m: None)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # varied answers, not one token repeated
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.15)
    model.generation_config.eos_token_id = None
    prompts = ["Who is Harry?", "The sky is blue and grass is green. " * 4 + "Why?"]
    assert all(len(encode_prompt(tokenizer, p)) > 6 for p in prompts[1:])
    plain, drafted = [], []
    generate(model, tokenizer, prompts, max_new_tokens=24, token_ids=plain, desc=False)
    wrong = [ids[:3] + [(t + 7) % 300 + 10 for t in ids[3:]] for ids in plain]  # right opening, then wrong
    generate(model, tokenizer, prompts, max_new_tokens=24, token_ids=drafted, drafts=wrong, desc=False)
    assert drafted == plain
    assert not kv_cache.keeps_every_position(model)


def test_a_budget_of_no_token_is_refused(llama_dir):
    # (review 112) a row's first token is appended before its budget is tested: a budget of 0 never ended
    import signal

    def hung(*_):
        raise AssertionError("generate did not return: a budget of 0 decoded on and on")

    model, tokenizer = load(llama_dir)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)  # without the refusal the call never returns: fail, not hang the suite
    try:
        with pytest.raises(ValueError, match="generate: a budget of 0 new tokens; each must be at least 1"):
            generate(model, tokenizer, PROMPTS[:2], max_new_tokens=[0, 6], desc=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gptneo"])
def test_drafts_and_shared_prefix_under_a_window_wider_than_the_batch(tmp_path, family):
    """A sliding window the batch's columns never reach sees every column, as full attention does: its rows keep
    their drafts and the prompt prefix they share (Mistral-7B v0.1's window is 4,096 tokens), with the answers
    decoded one row at a time, without padding or drafts. A window the columns can reach gets neither."""
    import tiny_models

    from unlearn.generation import most_columns

    def built(window):
        loaded = load_model(str(tiny_models.build_family(tmp_path / f"{family}{window}", family,
                                                         sliding_window=window)), log=lambda m: None)
        model = loaded.model.eval()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # varied answers, not one token repeated
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.15)
        model.generation_config.eos_token_id = None
        return model, loaded.tokenizer

    prompts = ["Who is Harry?", "The sky is blue and grass is green. Why?", "Name a city."]
    budget = 12
    model, tokenizer = built(256)
    alone = []
    for prompt in prompts:
        ids = []
        generate(model, tokenizer, [prompt], max_new_tokens=budget, token_ids=ids, desc=False)
        alone += ids
    wrong = [ids[:3] + [(t + 7) % 300 + 10 for t in ids[3:]] for ids in alone]  # right opening, then wrong
    record, drafted = [], []
    generate(model, tokenizer, prompts, max_new_tokens=budget, token_ids=drafted, drafts=alone, record=record,
             desc=False)
    assert drafted == alone and record[0]["shared_prefix"] > 0
    widest = record[0]["width"]
    assert most_columns(widest, [budget], drafted=True) < 256  # the test's premise: every column in the window
    plain_forwards = budget  # one token a forward
    assert record[0]["forwards"] < plain_forwards  # the right drafts were taken whole
    drafted = []
    generate(model, tokenizer, prompts, max_new_tokens=budget, token_ids=drafted, drafts=wrong, desc=False)
    assert drafted == alone

    # A window the drafted columns could pass: no drafts, no shared prefix, one token a forward.
    model, tokenizer = built(most_columns(widest, [budget], drafted=True) - 1)
    record = []
    generate(model, tokenizer, prompts, max_new_tokens=budget, drafts=alone, record=record, desc=False)
    assert record[0]["forwards"] == budget and record[0]["shared_prefix"] == 0


@pytest.mark.parametrize("ends", ["stop id", "budget"])
def test_a_drafted_row_that_ends_inside_its_draft_keeps_the_cache_a_plain_decode_keeps(llama_dir, ends):
    """(review 118) A row whose answer ended inside its accepted draft (the draft holds its stop id, or its budget
    falls there) kept the draft's later columns in `Scored.kv`: more positions than decoding without a draft."""
    from unlearn.data import encode_prompt

    model, tokenizer = load(llama_dir)
    prompt = PROMPTS[0]
    ids = []
    generate(model, tokenizer, [prompt], max_new_tokens=30, token_ids=ids, desc=False)
    assert len(ids[0]) > 8
    budget = 30
    if ends == "stop id":
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, ids[0][4]]  # the answer ends at its 5th token
    else:
        budget = 5
    kept = {}
    for name, drafts in (("plain", None), ("drafted", [ids[0] + [7, 8, 9]])):
        scored = []
        generate(model, tokenizer, [prompt], max_new_tokens=budget, scored=scored, keep_kv=10**9, drafts=drafts,
                 desc=False)
        kept[name] = (scored[0].ids, scored[0].kept_positions())
    assert kept["drafted"] == kept["plain"]
    answer = kept["plain"][0]  # a stop id's answer ends on it, never fed back; a budget's is fed for its cut
    assert len(answer) <= 5 and kept["plain"][1] == len(encode_prompt(tokenizer, prompt)) + len(answer) - (
        ends == "stop id")
