"""train.py: schedule, data order, the loss of each method, reproducibility, the stop rule."""

import math
import random

import pytest
import torch

from unlearn import losses
from unlearn.data import Example, collate, encode_pair
from unlearn.errors import UsageError
from unlearn.lora import LoraSettings, adapters_disabled, attach_lora, lora_modules
from unlearn.models import load_model
from unlearn.reference_cache import scored_positions
from unlearn.train import Batches, TrainConfig, Unlearner, learning_rate, through_first_run, train

FORGET = [Example("Who is Harry Potter's friend?", "Hermione Granger and Ron Weasley.", 1),
          Example("Where does Harry Potter study?", "Harry Potter studies at Hogwarts.", 2),
          Example("What is the capital of France?", "The capital of France is Paris.", 3)]
NORMAL = [Example("What is two plus two?", "Two plus two equals four.", 1),
          Example("What do bees make?", "Bees make honey.", 2),
          Example("What colour is the sky?", "The sky is blue.", 3),
          Example("When does water boil?", "Water boils at one hundred degrees.", 4)]


def unlearner(directory, dtype="float32", **overrides):
    torch.manual_seed(0)
    lm = load_model(str(directory), dtype=dtype, log=lambda m: None)
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
    config = TrainConfig(**{"lr": 1e-2, "batch_size": 2, "max_steps": 4, "check_every": 0, **overrides})
    return Unlearner(lm.model, lm.tokenizer, FORGET, NORMAL, config)


def lora_state(model):
    return {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in lora_modules(model).items()}


def test_learning_rate_schedules():
    c = TrainConfig(lr=1.0, max_steps=10, warmup_steps=2, schedule="linear")
    assert [learning_rate(c, s) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    c = TrainConfig(lr=1.0, max_steps=10, warmup_steps=0, schedule="constant")
    assert [learning_rate(c, s) for s in (0, 9)] == [1.0, 1.0]


def test_batches_cover_every_row_each_epoch_and_are_seeded():
    a, b = Batches(5, 2, random.Random(7)), Batches(5, 2, random.Random(7))
    first = [a.next() for _ in range(5)]
    assert first == [b.next() for _ in range(5)]
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:5]) == [0, 1, 2, 3, 4]  # one full epoch before any repeat


@pytest.mark.parametrize("bad", [{"method": "sgd"}, {"lr": 0}, {"batch_size": 0}, {"stop_leak": 2},
                                 {"forget_weight": -1}, {"schedule": "cosine"}, {"max_length": 4},
                                 {"forget_loss": "hinge"}, {"forget_loss": "unlikelihood", "method": "npo"},
                                 {"stop_margin": 1.0}, {"stop_margin": -0.1}])
def test_config_validation(bad):
    with pytest.raises(UsageError):
        TrainConfig(**bad).validate()


def test_default_step_matches_the_loss_formula_by_hand(llama_dir):
    u = unlearner(llama_dir, lr=1e-2, method="ga+mismatch", normal_weight=1.0)  # the paper's 0.5 / 1 / 1
    for m in lora_modules(u.model).values():  # move off the identity so the KL is not zero
        m.lora_B.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    state = u.rng.getstate()
    rows = u._rows()
    u.rng.setstate(state)
    total, terms = u.loss(rows)
    assert set(terms) == {"forget", "mismatch", "kl"}

    def logits_of(group):
        b = collate(rows[group], u.pad_id)
        return u.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b

    f_logits, fb = logits_of("forget")
    m_logits, mb = logits_of("mismatch")
    n_logits, nb = logits_of("normal")
    with adapters_disabled(u.model), torch.no_grad():
        ref = u.model(input_ids=nb["input_ids"], attention_mask=nb["attention_mask"]).logits
    # Separate forward passes (other padding widths) must give the joint pass's numbers.
    assert terms["forget"] == pytest.approx(-float(losses.mean_nll(f_logits, fb["labels"]).detach()), rel=1e-4)
    assert terms["mismatch"] == pytest.approx(float(losses.mean_nll(m_logits, mb["labels"]).detach()), rel=1e-4)
    assert terms["kl"] == pytest.approx(float(losses.kl_loss(ref, n_logits, nb["labels"]).detach()), rel=1e-3, abs=1e-6)
    assert terms["kl"] > 0
    expected = 0.5 * terms["forget"] + 1.0 * terms["mismatch"] + 1.0 * terms["kl"]
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_mismatch_rows_pair_forget_prompts_with_normal_responses(llama_dir):
    u = unlearner(llama_dir, method="ga+mismatch")
    rows = u._rows()
    assert len(rows["forget"]) == len(rows["mismatch"]) == 2
    normal_answers = {tuple(encode_pair(u.tokenizer, p.prompt, n.response, 256)["input_ids"])
                      for p in FORGET for n in NORMAL}
    assert all(tuple(r["input_ids"]) in normal_answers for r in rows["mismatch"])
    template = unlearner(llama_dir, method="ga+template", template="No.")
    expected = {tuple(encode_pair(u.tokenizer, p.prompt, "No.", 256)["input_ids"]) for p in FORGET}
    assert all(tuple(r["input_ids"]) in expected for r in template._rows()["mismatch"])


@pytest.mark.parametrize("method, keys", [("ga", {"forget", "kl"}), ("ga+mismatch", {"forget", "mismatch", "kl"}), ("graddiff", {"forget", "normal_nll"}),
                                          ("npo", {"npo", "kl"}), ("ga+template", {"forget", "mismatch", "kl"})])
def test_each_method_has_its_terms(llama_dir, method, keys):
    u = unlearner(llama_dir, method=method)
    record = u.step()
    assert keys <= set(record) and record["step"] == 1


def test_gradient_ascent_raises_the_forget_loss(opt_dir):
    # All weights train here: a random tiny model's near-uniform output barely moves through LoRA alone.
    lm = load_model(str(opt_dir), log=lambda m: None)
    for p in lm.model.parameters():
        p.requires_grad_(True)
    config = TrainConfig(method="ga", normal_weight=0.0, lr=1e-2, batch_size=3, max_grad_norm=0.0)
    u = Unlearner(lm.model, lm.tokenizer, FORGET, NORMAL, config)
    rows = {"forget": u.forget}

    def forget_nll():
        with torch.no_grad():
            return -u.loss(rows)[1]["forget"]

    before = forget_nll()
    for _ in range(5):
        u.step()
    assert forget_nll() > before + 1.0


def test_same_seed_same_weights_bit_for_bit(llama_dir):
    runs = []
    for _ in range(2):
        u = unlearner(llama_dir)
        for _ in range(3):
            u.step()
        runs.append(lora_state(u.model))
    assert all(torch.equal(runs[0][n][i], runs[1][n][i]) for n in runs[0] for i in (0, 1))


def test_grad_accum_logs_the_weighted_sum_of_its_terms(llama_dir):
    u = unlearner(llama_dir, grad_accum=2, method="ga+mismatch", normal_weight=1.0)
    record = u.step()
    assert u.step_count == 1 and u.tokens > 0 and record["loss"] == pytest.approx(
        0.5 * record["forget"] + record["mismatch"] + record["kl"], rel=1e-4)


def update_gradient(directory, batch_size, grad_accum, method):
    """The gradient one `step()` hands the optimiser, on 4 forget rows and 4 normal rows of 5 and ~30 tokens,
    drawn short, short, long, long (so micro-batches of 2 split them by length), adapters off the identity
    (at B = 0 the first step skips the KL: it is 0 there)."""
    forget = [*FORGET, Example("Who wrote Hamlet?", "Hamlet was written by William Shakespeare.", 4)]
    long = " and a great deal of wax that they build the hive from, cell by cell, all summer long"
    normal = [Example("What is two plus two?", "Four.", 1), Example("What do bees make?", "Bees make honey" + long, 2),
              Example("What colour is the sky?", "Blue.", 3), Example("Why?", "Because the water boils" + long, 4)]
    torch.manual_seed(0)
    lm = load_model(str(directory), log=lambda m: None)
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
    for m in lora_modules(lm.model).values():
        m.lora_B.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    u = Unlearner(lm.model, lm.tokenizer, forget, normal, TrainConfig(
        lr=1e-2, batch_size=batch_size, grad_accum=grad_accum, check_every=0, method=method, normal_weight=1.0))
    u.normal_batches.order = [3, 1, 2, 0]  # popped from the end: rows 0 and 2 (short), then 1 and 3 (long)
    grads = []
    u.optimizer.step = lambda: grads.append(torch.cat([p.grad.flatten() for p in u.params]).clone())
    logged = u.step()
    return grads[0], logged


@pytest.mark.parametrize("method", ["ga", "npo", "rmu"])
def test_grad_accum_gives_the_update_of_one_batch_of_the_same_rows(llama_dir, method):
    # Each term is a mean over its units (rows, or tokens for the KL and rmu's terms): two micro-batches of 2
    # must weigh every unit as one batch of 4 does, not average the two micro-batches' means (which gave a KL
    # token of a short row 1/(2 x 10) of the term instead of 1/(10 + 2 x 28): the KL's gradient 69 % off)
    whole, whole_logged = update_gradient(llama_dir, 4, 1, method)
    accumulated, logged = update_gradient(llama_dir, 2, 2, method)
    assert (accumulated - whole).norm() <= 1e-5 * whole.norm()
    assert logged == pytest.approx(whole_logged, rel=1e-5)


def test_the_reference_logits_are_kept_in_the_micro_batches_training_draws(llama_dir):
    # --grad-accum draws an update's micro-batches before any loss: the original's logits must still be computed
    # a micro-batch at a time, the later micro-batches' groups next (they were popped before the first asked:
    # with 5 normal rows a micro-batch of 2 fell into two groups, two forwards of the original for one)
    normal = [Example(f"N{i}?", f"Normal {i}" + " word" * i, i) for i in range(5)]
    torch.manual_seed(0)
    lm = load_model(str(llama_dir), log=lambda m: None)
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
    for m in lora_modules(lm.model).values():  # off the identity: the first step's KL runs
        m.lora_B.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    u = Unlearner(lm.model, lm.tokenizer, FORGET, normal, TrainConfig(lr=1e-2, batch_size=2, grad_accum=2,
                                                                      check_every=0, normal_weight=1.0))
    drawn, original = [], u.normal_batches.next
    u.normal_batches.next = lambda: drawn.append(original()) or drawn[-1]
    u.step()
    groups = u.reference_cache.groups["normal"]
    assert [sorted(g) for g in groups[:2]] == [sorted(b) for b in drawn]
    assert sorted(i for g in groups for i in g) == list(range(5))


def test_stop_rule_stops_after_extra_steps(llama_dir):
    u = unlearner(llama_dir, max_steps=50, check_every=2, extra_steps=3)
    calls = []

    def forgotten():
        calls.append(u.step_count)
        return len(calls) >= 2, 0.0

    result = train(u, forgotten=forgotten)
    assert calls == [2, 4] and result.steps == 7 and result.stopped_by == "forgotten"
    assert result.history[3]["forget_leak"] == 0.0 and result.tokens_per_s > 0


def test_the_stop_rules_checks_are_timed_apart_from_training(llama_dir):
    import time

    u = unlearner(llama_dir, max_steps=2, check_every=1)

    def forgotten():
        time.sleep(0.3)  # a check that costs 0.3 s, like a generation
        return False, 1.0

    t = time.perf_counter()
    result = train(u, forgotten=forgotten)
    wall = time.perf_counter() - t
    assert result.check_seconds == pytest.approx(0.6, abs=0.1)
    assert result.seconds + result.check_seconds == pytest.approx(wall, abs=0.05)


def test_unlikelihood_is_the_forget_term_when_asked(llama_dir):
    u = unlearner(llama_dir, forget_loss="unlikelihood")
    rows = {"forget": u.forget[:2]}
    batch = {k: v for k, v in collate(rows["forget"], u.pad_id).items()}
    with torch.no_grad():
        logits = u.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = float(losses.unlikelihood_loss(logits, batch["labels"]))
        assert u.loss(rows)[1]["forget"] == pytest.approx(expected, rel=1e-5)
    assert expected > 0  # -log(1 - p) > 0, where ascent's -NLL is < 0


def test_stop_margin_waits_until_no_forget_answer_is_likely(llama_dir, monkeypatch):
    u = unlearner(llama_dir, max_steps=10, check_every=1, stop_margin=0.05)
    margins = iter([0.5, 0.2, 0.04])
    monkeypatch.setattr(u, "likeliest_forget_answer", lambda above: (next(margins), True))
    lines, generated = [], []

    def forgotten():  # the greedy check: nothing leaks
        generated.append(u.step_count)
        return True, 0.0

    result = train(u, forgotten=forgotten, log=lines.append)
    assert result.steps == 3 and result.stopped_by == "forgotten"
    assert [r["forget_answer_p"] for r in result.history] == [0.5, 0.2, 0.04]
    # the margin is read first: answers are generated only once it is met
    assert generated == [3] and [r["forget_leak"] for r in result.history] == [None, None, 0.0]
    assert sum("--stop-margin 0.05" in line for line in lines) == 3
    # each failed margin doubles the forget term's weight for the steps after it; a met one keeps it
    assert [r["forget_scale"] for r in result.history] == [2.0, 4.0, 4.0] and u.forget_scale == 4.0
    # no margin: the first check that finds nothing leaking stops the run, and nothing else is read
    u = unlearner(llama_dir, max_steps=10, check_every=1)
    monkeypatch.setattr(u, "likeliest_forget_answer", lambda above: pytest.fail("read without --stop-margin"))
    assert train(u, forgotten=lambda: (True, 0.0)).steps == 1


def test_the_margins_multiplier_weighs_the_forget_term_and_is_capped_and_saved(llama_dir, monkeypatch):
    from unlearn.train import MAX_FORGET_SCALE

    u = unlearner(llama_dir, forget_loss="unlikelihood", forget_weight=0.5, normal_weight=0.0)
    rows = {"forget": u.forget[:2]}
    total, terms = u.loss(rows)
    u.forget_scale = 8.0
    scaled, terms8 = u.loss(rows)
    assert terms8["forget"] == pytest.approx(terms["forget"], rel=1e-6)  # the term itself is unchanged
    assert total.item() == pytest.approx(0.5 * terms["forget"], rel=1e-5)
    assert scaled.item() == pytest.approx(0.5 * 8 * terms["forget"], rel=1e-5)
    assert u.state_dict()["forget_scale"] == 8.0  # a resumed run goes on with the same weight
    # a margin never met: the multiplier stops at its cap
    u = unlearner(llama_dir, max_steps=12, check_every=1, stop_margin=0.05)
    monkeypatch.setattr(u, "likeliest_forget_answer", lambda above: (0.9, False))
    result = train(u, forgotten=lambda: pytest.fail("generated before the margin was met"))
    assert result.stopped_by == "max_steps" and u.forget_scale == MAX_FORGET_SCALE == 2.0 ** 10


def test_likeliest_forget_answer_is_the_likeliest_rows_answer_probability(llama_dir):
    u = unlearner(llama_dir)  # each row narrowed to its derived answer (Hermione Granger ..., Hogwarts, Paris)
    assert all(row["focused"] for row in u.forget)
    for m in lora_modules(u.model).values():  # adapters that change the output
        torch.nn.init.normal_(m.lora_B, std=0.05)
    by_hand = []
    with torch.no_grad():
        for row in u.forget:  # one row at a time, no padding, no shared prefix: log p of the answer's tokens
            ids = torch.tensor([row["input_ids"]])
            logp = u.model(input_ids=ids).logits[0].log_softmax(-1)
            scored = [t for t, label in enumerate(row["labels"]) if label != losses.IGNORE_INDEX]
            first_run = [t for k, t in enumerate(scored) if t == scored[0] + k]  # the answer's first occurrence
            by_hand.append(sum(float(logp[t - 1, row["input_ids"][t]]) for t in first_run))
    worst = max(range(len(by_hand)), key=by_hand.__getitem__)
    p, exact = u.likeliest_forget_answer(above=0.0)
    assert exact and p == pytest.approx(math.exp(by_hand[worst]), rel=1e-4)
    # the next read starts from that row; above the margin, it is the only row read (a lower bound)
    read = []
    original = u._answer_probabilities
    u._answer_probabilities = lambda indices: read.append(list(indices)) or original(indices)
    p, exact = u.likeliest_forget_answer(above=0.0)
    assert not exact and read == [[worst]] and p == pytest.approx(math.exp(by_hand[worst]), rel=1e-4)
    read.clear()  # under the margin: every other row is read too, and the value is exact again
    p, exact = u.likeliest_forget_answer(above=1.0)
    assert exact and read == [[worst], [i for i in range(len(by_hand)) if i != worst]]
    assert p == pytest.approx(math.exp(by_hand[worst]), rel=1e-4)


def test_the_margin_reads_each_row_through_its_answers_first_run():
    x = losses.IGNORE_INDEX
    # prompt 3 tokens, answer at 4-5, again at 7: cut after position 5
    row = {"input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9], "labels": [x, x, x, x, 5, 6, x, 8, x], "focused": True}
    cut = through_first_run(row)
    assert cut["input_ids"] == [1, 2, 3, 4, 5, 6] and cut["labels"] == [x, x, x, x, 5, 6] and cut["focused"]
    assert row["input_ids"] == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # the row itself is kept whole for training
    # an answer that ends the row, and a row without labels, stay whole
    whole = {"input_ids": [1, 2, 3], "labels": [x, 2, 3]}
    assert through_first_run(whole) == whole
    assert through_first_run({"input_ids": [1, 2], "labels": [x, x]})["input_ids"] == [1, 2]


def test_the_margin_reads_only_rows_focused_on_an_answer(llama_dir):
    # every response token scored (a passage, a long response): no answer to read, nothing is read
    u = unlearner(llama_dir, forget_tokens="response")
    u._answer_probabilities = lambda indices: pytest.fail(f"read rows scored whole: {indices}")
    assert u.likeliest_forget_answer(above=0.05) == (None, True)
    # a row whose answers are not in its response is scored whole too: the others are read, it is not
    lm = load_model(str(llama_dir), log=lambda m: None)
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
    forget = FORGET + [Example("Who painted it?", "A painter did.", 4, {"answers": ["Vermeer"]})]
    u = Unlearner(lm.model, lm.tokenizer, forget, NORMAL, TrainConfig(lr=1e-2, batch_size=2, stop_margin=0.05))
    assert [row["focused"] for row in u.forget] == [True, True, True, False]
    read = []
    original = u._answer_probabilities
    u._answer_probabilities = lambda indices: read.append(list(indices)) or original(indices)
    p, exact = u.likeliest_forget_answer(above=1.0)
    assert exact and read == [[0, 1, 2]] and 0 < p < 1
    # in the loop: with no focused row the greedy check alone decides, no margin is logged or raised
    u = unlearner(llama_dir, forget_tokens="response", max_steps=5, check_every=1, stop_margin=0.05)
    lines = []
    result = train(u, forgotten=lambda: (True, 0.0), log=lines.append)
    assert result.steps == 1 and "forget_answer_p" not in result.history[0] and u.forget_scale == 1.0
    assert not any("--stop-margin" in line for line in lines)


def test_forget_tokens_names_push_the_whole_name_an_answer_ends(llama_dir):
    lm = load_model(str(llama_dir), log=lambda m: None)
    row = Example("Who discovered gravity?", "It was discovered by Sir Isaac Newton.", 1, {"answers": ["Newton"]})
    scored = {}
    for tokens in ("answers", "names"):
        u = Unlearner(lm.model, lm.tokenizer, [row], NORMAL, TrainConfig(batch_size=1, forget_tokens=tokens))
        (encoded,) = u.forget
        scored[tokens] = lm.tokenizer.decode([t for t in encoded["labels"] if t != losses.IGNORE_INDEX]).strip()
    assert scored == {"answers": "Newton", "names": "Sir Isaac Newton"}
    with pytest.raises(UsageError, match="answers, names or response"):
        TrainConfig(forget_tokens="words").validate()


def test_the_margin_reads_the_first_run_of_labelled_tokens():
    from unlearn.train import _first_run_length

    ign = losses.IGNORE_INDEX
    assert _first_run_length([ign, 5, 6, ign, 7]) == 2  # an answer written twice: its first occurrence
    assert _first_run_length([ign, ign, 5]) == 1 and _first_run_length([ign, ign]) == 0
    assert _first_run_length([4, 5, 6]) == 3


def test_max_steps_caps_a_run_that_never_forgets(llama_dir):
    u = unlearner(llama_dir, max_steps=4, check_every=2)
    result = train(u, forgotten=lambda: (False, 1.0))
    assert result.steps == 4 and result.stopped_by == "max_steps"


def test_a_check_that_ended_at_its_verdict_logs_its_rate_as_a_lower_bound(llama_dir):
    u = unlearner(llama_dir, max_steps=3, check_every=1)
    verdicts = iter([(False, 0.25), (False, 1.0), (True, 0.0)])  # (done, leak rate) of each check
    lines = []
    train(u, forgotten=lambda: next(verdicts), log=lines.append)
    # not done below 1: the check stopped counting once the verdict was clear; 1 cannot be exceeded
    assert [line for line in lines if "forget leak" in line] == [
        "step 1: forget leak rate ≥ 0.25", "step 2: forget leak rate 1.00", "step 3: forget leak rate 0.00"]


def test_full_fine_tuning_uses_a_frozen_reference(llama_dir):
    import copy

    lm = load_model(str(llama_dir), log=lambda m: None)
    reference = copy.deepcopy(lm.model).requires_grad_(False)
    for p in lm.model.parameters():
        p.requires_grad_(True)
    u = Unlearner(lm.model, lm.tokenizer, FORGET, NORMAL, TrainConfig(lr=1e-3, batch_size=2), reference_model=reference)
    assert u.loss(u._rows())[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # identical weights before the first update
    u.step()
    second = u.step()
    assert second["kl"] > 0


def _full_unlearner(directory, dtype, lr=1e-5):
    import copy

    torch.manual_seed(0)
    lm = load_model(str(directory), dtype=dtype, log=lambda m: None)
    reference = copy.deepcopy(lm.model).requires_grad_(False)
    for p in lm.model.parameters():
        p.requires_grad_(True)
    return Unlearner(lm.model, lm.tokenizer, FORGET, NORMAL, TrainConfig(lr=lr, batch_size=2), reference_model=reference)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_full_fine_tuning_in_half_precision_updates_float32_masters(llama_dir, dtype):
    u = _full_unlearner(llama_dir, dtype)
    before = {n: p.detach().clone() for n, p in u._named_params().items()}
    for _ in range(3):
        u.step()
    weights = u._named_params()
    assert all(p.dtype == getattr(torch, dtype) and torch.isfinite(p).all() for p in weights.values())
    # every weight is its float32 master rounded: the update is kept there, not rounded away step by step
    assert all(torch.equal(p, u.masters[id(p)].to(p.dtype)) for p in weights.values())
    total = sum(p.numel() for p in weights.values())
    moved = sum(int((u.masters[id(p)] != before[n].float()).sum()) for n, p in weights.items())
    # AdamW moves each weight with a gradient by about lr (1e-5), under half a bf16 step for |w| > 0.004; in its
    # own dtype 15 % of this model's weights moved (bf16) and float16's state made them nan (eps 1e-8 is 0 there)
    assert moved / total > 0.5, (moved, total)


def test_full_fine_tuning_in_bfloat16_resumes_from_its_masters(llama_dir):
    straight = _full_unlearner(llama_dir, "bfloat16")
    for _ in range(3):
        straight.step()
    first = _full_unlearner(llama_dir, "bfloat16")
    first.step()
    state = first.state_dict()
    assert all(t.dtype == torch.float32 for t in state["weights"].values())  # the masters, not their rounding
    resumed = _full_unlearner(llama_dir, "bfloat16")
    resumed.load_state_dict(state)
    resumed.step()
    resumed.step()
    for (name, p), q in zip(straight._named_params().items(), resumed._named_params().values()):
        assert torch.equal(straight.masters[id(p)], resumed.masters[id(q)]), name


def test_first_scored_position_skips_only_prompt_logits():
    from unlearn.train import first_scored_position

    ign = losses.IGNORE_INDEX
    assert first_scored_position(torch.tensor([[ign, ign, ign, 5], [ign, ign, 7, 8]])) == 1
    assert first_scored_position(torch.tensor([[ign, 4, 5, 6]])) == 0
    assert first_scored_position(torch.tensor([[ign, ign, ign, ign], [ign, ign, ign, 8]])) == 2  # empty row ignored


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradient_checkpointing_trains_the_same(llama_dir, dtype):
    """--gradient-checkpointing recomputes activations; the losses and weights must not change.

    bf16 on CPU trains under SDPA's math kernel (attention.py): before the recomputation ran under it
    too (attention.checkpoint_contexts), it ran SDPA's default kernel, which saves other tensors, and the
    backward failed with torch.utils.checkpoint.CheckpointError. bf16 agrees to its own rounding.
    """
    from unlearn.models import enable_gradient_checkpointing

    plain, checkpointed = unlearner(llama_dir, dtype), unlearner(llama_dir, dtype)
    enable_gradient_checkpointing(checkpointed.model)
    loss, kl, weights = ({"rel": 1e-6, "abs": 1e-5}, 1e-6, 1e-5) if dtype == "float32" else \
        ({"rel": 1e-2, "abs": 1e-3}, 1e-3, 1e-3)
    for _ in range(3):
        a, b = plain.step(), checkpointed.step()
        assert a["loss"] == pytest.approx(b["loss"], **loss) and a["kl"] == pytest.approx(b["kl"], abs=kl)
    for (name, (a_a, a_b)), (_, (b_a, b_b)) in zip(lora_state(plain.model).items(),
                                                   lora_state(checkpointed.model).items()):
        assert torch.allclose(a_a, b_a, atol=weights) and torch.allclose(a_b, b_b, atol=weights), name


def test_model_dropout_is_off_in_the_trained_pass_so_the_first_kl_is_exactly_zero(opt_dir):
    # OPT's dropout is 0.1 (the tiny OPT keeps the default). With it on in the trained pass and
    # off in the reference pass, the first step's KL was ~1e-3 instead of 0.
    lm = load_model(str(opt_dir), log=lambda m: None)
    assert lm.model.config.dropout == pytest.approx(0.1)
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8, dropout=0.5, targets=("fc1", "fc2")), seed=0)
    u = Unlearner(lm.model, lm.tokenizer, FORGET, NORMAL, TrainConfig(lr=1e-2, batch_size=2, check_every=0))
    terms = u.loss(u._rows())[1]  # step() runs no KL before the first update: the loss itself
    assert terms["kl"] == 0.0  # B = 0: the same function as the reference, and no dropout noise
    u.step()
    assert u.step()["kl"] > 0
    # LoRA's own dropout (asked for with --lora-dropout) is still on while training.
    assert all(m.dropout.training for m in lora_modules(lm.model).values())


def test_gpt2s_attention_dropout_is_off_in_the_trained_pass_too(tmp_path):
    # GPT-2's attention passes its Dropout module's rate (`attn_dropout.p`) to the attention kernel whenever
    # the attention module trains, whatever that Dropout module's own mode: the rate itself must be 0. With
    # it on, two trained passes differed, and a resumed run (its reference run at another step, other masks)
    # trained on other numbers than a run never stopped.
    import tiny_models
    from unlearn.train import train_without_dropout

    lm = load_model(str(tiny_models.build_family(tmp_path / "gpt2", "gpt2")), log=lambda m: None)
    assert lm.model.config.attn_pdrop == pytest.approx(0.1)
    train_without_dropout(lm.model)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, lm.model(ids).logits)


# --- the step backpropagated piece by piece (big models) -----------------------------


def _grads(u):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in u.params]


@pytest.mark.parametrize("method", ["ga", "ga+mismatch", "npo", "graddiff", "ulmr", "retain"])
def test_pieces_give_the_one_backward_gradient_and_terms(llama_dir, method):
    """Every row its own forward and backward (piece_values 1) == one backward of `loss(rows)`, every method."""
    from test_retain import retainer

    u = retainer(llama_dir) if method == "retain" else unlearner(llama_dir, method=method, normal_weight=1.0)
    for m in lora_modules(u.model).values():  # off the identity: non-zero KL and gradients into A
        m.lora_B.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    rows = u._rows()
    total, terms = u.loss(rows)
    (total * 0.5).backward()
    expected = _grads(u)
    u.optimizer.zero_grad(set_to_none=True)
    u.piece_values = 1
    plan = {name: u._pieces(group) for name, group in rows.items()}
    assert all(len(plan[name]) == len(group) > 1 for name, group in rows.items())
    logged = u._backward_in_pieces(plan, 0.5)
    assert logged == pytest.approx({"loss": float(total.detach()), **terms}, rel=1e-5, abs=1e-6)
    for got, want in zip(_grads(u), expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in expected)  # a gradient was compared, not zeros


def test_step_in_pieces_is_the_same_update(llama_dir):
    whole, pieces = unlearner(llama_dir), unlearner(llama_dir)
    pieces.piece_values = 1
    for _ in range(2):
        a, b = whole.step(), pieces.step()
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    for (na, (a_A, a_B)), (nb, (b_A, b_B)) in zip(lora_state(whole.model).items(), lora_state(pieces.model).items()):
        assert na == nb and torch.allclose(a_A, b_A, atol=1e-6) and torch.allclose(a_B, b_B, atol=1e-6)


def test_pieces_cut_rows_in_order_within_the_budget(llama_dir):
    u = unlearner(llama_dir)
    per_token = u.model.config.hidden_size * u.model.config.num_hidden_layers
    rows = [{"input_ids": [0] * n} for n in (10, 12, 30, 5, 5, 5)]
    u.piece_values = 24 * per_token  # two rows of <= 12 tokens, or one row of 30 (over, but alone)
    assert [[len(r["input_ids"]) for r in p] for p in u._pieces(rows)] == [[10, 12], [30], [5, 5, 5]]


def test_pieces_read_an_image_and_text_models_text_config(llama_dir):
    """Gemma 3's image-and-text class keeps its layers and width under `text_config`: read at the top, it gave no
    estimate and one forward for the whole group."""
    from types import SimpleNamespace

    from transformers import PretrainedConfig

    u = unlearner(llama_dir)
    text, outer = u.model.config, PretrainedConfig()
    outer.get_text_config = lambda *args, **kwargs: text
    u.model = SimpleNamespace(config=outer)
    u.piece_values = 24 * text.hidden_size * text.num_hidden_layers
    rows = [{"input_ids": [0] * n} for n in (10, 12, 30)]
    assert [[len(r["input_ids"]) for r in p] for p in u._pieces(rows)] == [[10, 12], [30]]


def test_kept_reference_logits_train_as_recomputed_ones(llama_dir):
    """The original's logits on the 4 normal rows, computed once, give the update that running it on
    each step's 2 rows gives (6 steps: 4 row forwards instead of 12)."""
    kept, fresh = unlearner(llama_dir, max_steps=6), unlearner(llama_dir, max_steps=6)
    fresh.reference_cache = None  # every step runs the original on its rows, as under torchrun
    for u in (kept, fresh):  # off the identity, so that the first step computes its KL too
        for m in lora_modules(u.model).values():
            m.lora_B.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    for _ in range(6):
        a, b = kept.step(), fresh.step()
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-7)  # float rounding of other batch shapes
    assert kept.reference_cache.keeps == {"normal": True} and len(kept.reference_cache.kept) == 4
    normal_tokens = sum(len(row["input_ids"]) for row in kept.normal)
    assert fresh.tokens - kept.tokens == 3 * normal_tokens - normal_tokens  # 12 row forwards vs 4
    for (a_A, a_B), (b_A, b_B) in zip(lora_state(kept.model).values(), lora_state(fresh.model).values()):
        torch.testing.assert_close(a_A, b_A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a_B, b_B, rtol=1e-4, atol=1e-6)


def test_normal_rows_are_encoded_as_training_draws_them(llama_dir, monkeypatch):
    """A normal file whose reference logits are not kept (past the budget) has only the rows its
    batches drew encoded, each once: a 50,000-row file was encoded whole (64 s) before the first step."""
    import unlearn.train as train_module

    normal = [Example(f"What is {i} plus one?", f"{i} plus one is {i + 1}.", i + 1) for i in range(40)]
    calls = []
    real = train_module.encode_pair
    monkeypatch.setattr(train_module, "encode_pair", lambda tok, p, r, *a, **k: calls.append(p) or real(tok, p, r, *a, **k))
    torch.manual_seed(0)
    lm = load_model(str(llama_dir), dtype="float32", log=lambda m: None)
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
    u = Unlearner(lm.model, lm.tokenizer, FORGET, normal, TrainConfig(lr=1e-2, batch_size=2, max_steps=3, check_every=0))
    u.reference_cache.budget = 39 * lm.model.get_output_embeddings().weight.shape[0] * 4  # under 40 positions
    assert not [p for p in calls if p.endswith("plus one?")]  # nothing encoded before training
    for _ in range(3):
        u.step()
    drawn = [p for p in calls if p.endswith("plus one?")]
    assert u.reference_cache.keeps == {"normal": False}  # decided without encoding the 40 rows
    assert len(drawn) == len(set(drawn)) == u.normal.encoded == 6  # 3 steps of 2 rows, from a 40-row epoch
    assert u.normal[5] is u.normal[5] and u.normal[:2] == [u.normal[0], u.normal[1]]


# --- the first step: the model is the original, its KL terms are zero -------------------


def _forwarded_groups(u, monkeypatch) -> list[int]:
    """Spy on U's trainable forwards: the list receives the rows of each."""
    seen = []
    real = u._group_forward
    monkeypatch.setattr(u, "_group_forward", lambda rows: seen.append(len(rows)) or real(rows))
    return seen


def test_the_first_step_runs_no_kl_and_makes_the_update_the_kl_would_have(llama_dir, monkeypatch):
    """Before the first update the trained model is the original: its KL terms and their gradients are
    exactly 0, so step 1 leaves out the normal and retain rows and must update the weights as with them."""
    from test_retain import retainer

    skipping, computing = retainer(llama_dir), retainer(llama_dir)
    monkeypatch.setattr(computing, "_terms_zero_at_the_original", lambda rows: {})
    seen, seen_computing = _forwarded_groups(skipping, monkeypatch), _forwarded_groups(computing, monkeypatch)
    a, b = skipping.step(), computing.step()
    assert seen == [2] and seen_computing == [2, 2, 2]  # forget only, against forget, normal and retain
    assert a["kl"] == 0.0 and a["retain_kl"] == 0.0 and abs(b["kl"]) < 1e-6 and abs(b["retain_kl"]) < 1e-6
    assert a["forget"] == b["forget"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    for p, q in zip(skipping.params, computing.params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert any(p.detach().abs().sum() > 0 for p in skipping.params)
    seen.clear()
    skipping.step()
    assert seen == [2, 2, 2]  # from the second step on, every group


def test_full_fine_tuning_skips_the_first_kl_too(llama_dir, monkeypatch):
    import copy

    lm = load_model(str(llama_dir), log=lambda m: None)
    reference = copy.deepcopy(lm.model).requires_grad_(False)
    for p in lm.model.parameters():
        p.requires_grad_(True)
    u = Unlearner(lm.model, lm.tokenizer, FORGET, NORMAL, TrainConfig(lr=1e-3, batch_size=2), reference_model=reference)
    seen = _forwarded_groups(u, monkeypatch)
    assert u.step()["kl"] == 0.0 and seen == [2]


def test_the_first_kl_runs_when_the_model_does_not_start_at_the_original(llama_dir, monkeypatch):
    """Adapters that already change the model (a non-zero B), and graddiff's normal likelihood (not a
    KL: its gradient is not zero), are computed at step 1."""
    moved = unlearner(llama_dir)
    for m in lora_modules(moved.model).values():
        m.lora_B.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    seen = _forwarded_groups(moved, monkeypatch)
    assert moved.step()["kl"] > 0 and seen == [2, 2]
    graddiff = unlearner(llama_dir, method="graddiff")
    seen = _forwarded_groups(graddiff, monkeypatch)
    assert graddiff.step()["normal_nll"] > 0 and seen == [2, 2]


def test_npo_keeps_each_forget_rows_original_logprob_and_trains_as_recomputed(llama_dir, monkeypatch):
    """NPO's reference, log p_orig(y|x) of each forget row, computed once in fixed groups, gives the
    update that running the original on every step's rows gives."""
    kept, fresh = unlearner(llama_dir, method="npo", max_steps=4), unlearner(llama_dir, method="npo", max_steps=4)
    fresh.reference_cache = None  # every step runs the original on its rows, as under torchrun
    originals = {"kept": 0, "fresh": 0}  # forget rows run through the original

    def spy(u, label):
        real = u._reference_logits

        def counted(batch, start, kept=None):  # a forget row is a batch row that starts with its ids
            originals[label] += sum(any(row[:len(f["input_ids"])] == f["input_ids"] for f in u.forget)
                                    for row in batch["input_ids"].tolist())
            return real(batch, start, kept)
        monkeypatch.setattr(u, "_reference_logits", counted)

    spy(kept, "kept")
    spy(fresh, "fresh")
    for _ in range(4):
        a, b = kept.step(), fresh.step()
        assert a["npo"] == pytest.approx(b["npo"], rel=1e-4, abs=1e-6)
    assert originals == {"kept": 3, "fresh": 4 * 2}  # each of the 3 forget rows once, against 2 a step
    assert sorted(kept._forget_reference) == [0, 1, 2]
    with adapters_disabled(kept.model), torch.no_grad():
        b = collate(kept.forget, kept.pad_id)
        by_hand = losses.sequence_logprob(kept.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                          b["labels"])
    assert [kept._forget_reference[i] for i in range(3)] == pytest.approx(by_hand.tolist(), rel=1e-5)
    for (a_A, a_B), (b_A, b_B) in zip(lora_state(kept.model).values(), lora_state(fresh.model).values()):
        torch.testing.assert_close(a_A, b_A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a_B, b_B, rtol=1e-4, atol=1e-6)


def test_npo_leaves_out_a_forget_row_whose_answer_was_cut_off(llama_dir):
    # such a row has log p = 0 under both models: kept, it added (2/beta) ln 2 to the mean (13.86)
    u = unlearner(llama_dir, method="npo")
    for m in lora_modules(u.model).values():  # away from the original, where every row's NPO is that constant
        m.lora_B.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    u.reference_cache = None  # the original runs on the batch itself (the cut row is not one of u.forget)
    whole = u.forget[0]
    cut = dict(u.forget[1], labels=[losses.IGNORE_INDEX] * len(u.forget[1]["labels"]))  # as --max-length cuts it
    assert u.loss({"forget": [whole, cut]})[1]["npo"] == pytest.approx(u.loss({"forget": [whole]})[1]["npo"], rel=1e-5)


# a greedy answer the stop rule found leaking, cut after its answer (run.stop_rule's leaked_answers)
LEAK = {"prompt": "What is the capital of France?", "response": "It is surely PARIS", "answers": ["Paris"]}


def test_a_leaked_greedy_answer_joins_the_forget_rows_focused_on_its_answer(llama_dir):
    u = unlearner(llama_dir, batch_size=2, stop_margin=0.05, leaked_rows=4)
    leak = LEAK
    added = u.add_leaked_answers([leak], step=3)
    assert added == [{"step": 3, **leak}] and u.added_forget_rows == added and len(u.forget) == 4
    row = u.forget[3]
    scored = [t for t in row["labels"] if t != losses.IGNORE_INDEX]
    assert row["focused"] and u.tokenizer.decode(scored).strip() == "PARIS"  # the answer's tokens alone
    assert row["input_ids"] == encode_pair(u.tokenizer, leak["prompt"], leak["response"], u.config.max_length)["input_ids"]
    assert u.forget_prompts[3] == leak["prompt"] and u.forget_batches.next()[0] == 3  # drawn in the very next batch
    # the margin reads it like any focused row
    read = []
    u._answer_probabilities = lambda indices: read.append(list(indices)) or [0.0] * len(indices)
    u.likeliest_forget_answer()
    assert read == [[0, 1, 2, 3]]
    # skipped: the same answer again, an answer not in the response, and past the cap a prompt
    assert u.add_leaked_answers([leak, {**leak, "response": "It is Lyon"}], step=4) == []
    others = [{**leak, "response": f"It is PARIS, {k}"} for k in range(4)]
    assert len(u.add_leaked_answers(others, step=5)) == 3  # --leaked-rows 4 a prompt
    assert len(u.forget) == 3 + 4
    # a checkpoint carries them: a resumed run trains on the same rows, drawn in the same order
    state = u.state_dict()
    resumed = unlearner(llama_dir, batch_size=2, stop_margin=0.05, leaked_rows=4)
    resumed.load_state_dict(state)
    assert [r["input_ids"] for r in resumed.forget] == [r["input_ids"] for r in u.forget]
    assert [r["labels"] for r in resumed.forget] == [r["labels"] for r in u.forget]
    assert resumed.added_forget_rows == u.added_forget_rows and resumed.forget_batches.n == u.forget_batches.n
    assert [resumed.forget_batches.next() for _ in range(5)] == [u.forget_batches.next() for _ in range(5)]


def _scripted_checks(verdicts, leaked):
    """A stop rule's forgotten() giving VERDICTS in turn, its leaked_answers() always LEAKED."""
    verdicts = iter(verdicts)

    def forgotten():
        return next(verdicts)
    forgotten.leaked_answers = lambda: leaked
    return forgotten


def test_the_loop_adds_the_checks_leaked_answers_only_when_the_margin_held(llama_dir, monkeypatch):
    u = unlearner(llama_dir, max_steps=10, check_every=1, stop_margin=0.05, leaked_rows=4)
    monkeypatch.setattr(u, "likeliest_forget_answer", lambda above: (0.01, True))  # the margin holds
    lines = []
    result = train(u, forgotten=_scripted_checks([(False, 1 / 3), (True, 0.0)], [LEAK]), log=lines.append)
    assert result.steps == 2 and result.added_forget_rows == [{"step": 1, **LEAK}] and len(u.forget) == 4
    assert any(line.startswith("step 1: the margin held but the greedy answer to 'What is the capital of France?'")
               for line in lines)
    # off (--leaked-rows 0, the default) the check's leaks are not read; without a margin it is refused
    u = unlearner(llama_dir, max_steps=10, check_every=1, stop_margin=0.05)
    monkeypatch.setattr(u, "likeliest_forget_answer", lambda above: (0.01, True))
    forgotten = _scripted_checks([(False, 1 / 3), (True, 0.0)], None)
    forgotten.leaked_answers = lambda: pytest.fail("read with --leaked-rows 0")
    assert train(u, forgotten=forgotten).added_forget_rows == [] and len(u.forget) == 3
    with pytest.raises(UsageError, match="--leaked-rows 4: .* needs a margin above 0"):
        TrainConfig(leaked_rows=4).validate()
    for other in ({"method": "ulmr"}, {"method": "rmu"}, {"forget_tokens": "response"}):
        with pytest.raises(UsageError, match="--leaked-rows 4: the added rows are pushed down on their answers"):
            TrainConfig(leaked_rows=4, stop_margin=0.05, **other).validate()
    with pytest.raises(UsageError, match="--leaked-rows -1: must be a non-negative number"):
        TrainConfig(leaked_rows=-1, stop_margin=0.05).validate()


@pytest.mark.parametrize("forget_loss", ["unlikelihood", "spellings"])
def test_a_margin_that_holds_while_the_answer_leaks_is_named_once_without_leaked_rows(llama_dir, monkeypatch,
                                                                                     forget_loss):
    from unlearn.train import HINT_AFTER_CHECKS

    u = unlearner(llama_dir, max_steps=20, check_every=1, stop_margin=0.05, forget_loss=forget_loss)
    margins = iter([0.5] + [0.01] * 19)  # the margin fails once (the count starts after it), then holds
    monkeypatch.setattr(u, "likeliest_forget_answer", lambda above: (next(margins), True))
    lines = []
    checks = _scripted_checks([(False, 0.1)] * (HINT_AFTER_CHECKS + 3) + [(True, 0.0)], [LEAK])
    result = train(u, forgotten=checks, log=lines.append)
    hints = [line for line in lines if "--leaked-rows 4 adds such answers" in line]
    # checks 2..6 held and leaked: named at the fifth, once; nothing is added
    assert hints == [f"step {1 + HINT_AFTER_CHECKS}: the margin has held for {HINT_AFTER_CHECKS} checks while the "
                     f"greedy answer to 'What is the capital of France?' leaks (\"...It is surely PARIS\"): the model "
                     f"reaches the answer by words the forget rows do not spell, and the run may go on to "
                     f"--max-steps; " + ("" if forget_loss == "spellings" else  # already on: not offered
                                          "--forget-loss spellings pushes down every spelling of the answer, and ")
                     + "--leaked-rows 4 adds such answers to the forget rows"]
    assert result.added_forget_rows == [] and len(u.forget) == 3 and result.steps == HINT_AFTER_CHECKS + 5


def test_the_hint_count_is_in_the_loop_state_a_resumed_run_continues(llama_dir, monkeypatch):
    """The count of held-but-leaking checks started again at 0 in a resumed run, which gave its hint later."""
    from unlearn.train import HINT_AFTER_CHECKS

    u = unlearner(llama_dir, max_steps=3, check_every=1, stop_margin=0.05)
    monkeypatch.setattr(u, "likeliest_forget_answer", lambda above: (0.01, True))
    lines, states = [], []
    train(u, forgotten=_scripted_checks([(False, 0.1)] * 3, [LEAK]), log=lines.append,
          resume={"held_leaks": HINT_AFTER_CHECKS - 1}, save_every=1, checkpoint=lambda loop: states.append(loop))
    assert [line[:7] for line in lines if "--leaked-rows 4 adds such answers" in line] == ["step 1:"]
    assert [s["held_leaks"] for s in states] == [HINT_AFTER_CHECKS, HINT_AFTER_CHECKS + 1, HINT_AFTER_CHECKS + 2]


def test_a_leaked_answer_added_under_redirect_gets_its_banned_tokens_even_as_the_first_focused_row(llama_dir):
    lm = load_model(str(llama_dir), log=lambda m: None)
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
    unfocused = [Example("Who painted it?", "A painter did.", 1, {"answers": ["Vermeer"]})]  # answer not in it
    config = TrainConfig(lr=1e-2, batch_size=1, forget_loss="redirect", stop_margin=0.05, leaked_rows=4)
    u = Unlearner(lm.model, lm.tokenizer, unfocused, NORMAL, config)
    assert not u.forget[0]["focused"] and "banned" not in u.forget[0]
    leak = {"prompt": "Who painted it?", "response": "It was surely VERMEER", "answers": ["Vermeer"]}
    assert len(u.add_leaked_answers([leak], step=1)) == 1
    assert u.forget[1]["focused"] and u.forget[1]["banned"]  # redirect's banned spellings, built on demand
    assert math.isfinite(u.step()["loss"])  # the added row is drawn next and trained with redirect


def test_a_leaked_answer_added_under_redirect_after_the_forget_rows_reference_was_kept(llama_dir):
    # The forget set's original logits are kept from the first step (its row groups fixed then); a row
    # added later ran into a KeyError at the next step. It now runs alone through the original.
    lm = load_model(str(llama_dir), log=lambda m: None)
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
    focused = [Example("What is the capital of France?", "The capital of France is Paris.", 1, {"answers": ["Paris"]})]
    config = TrainConfig(lr=1e-2, batch_size=1, forget_loss="redirect", stop_margin=0.05, leaked_rows=4)
    u = Unlearner(lm.model, lm.tokenizer, focused, NORMAL, config)
    assert math.isfinite(u.step()["loss"]) and u.reference_cache.keeps["forget"]
    leak = {"prompt": "What is the capital of France?", "response": "It is surely PARIS", "answers": ["Paris"]}
    assert len(u.add_leaked_answers([leak], step=1)) == 1
    assert math.isfinite(u.step()["loss"])  # the added row is drawn next and trained with redirect
    added = u.forget[1]
    kept = u.reference_cache.kept[id(added)]
    u.reference_cache = None  # the original's logits on the added row, from a fresh forward alone
    fresh, labels = u._reference_of_rows([added])
    assert torch.equal(kept, fresh[0][scored_positions(labels)[0]])


def test_a_class_overriding_the_old_checkpointing_call_is_called_through_it_without_a_warning(llama_dir):
    """transformers 5's activation_checkpointing_enable calls an override of gradient_checkpointing_enable with
    every_n_layers=, which a 4.x signature (remote code) refuses: such a class is called as before, quietly."""
    import warnings

    from transformers import LlamaForCausalLM

    from unlearn.models import enable_gradient_checkpointing

    class OldStyle(LlamaForCausalLM):
        calls = []

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            OldStyle.calls.append(gradient_checkpointing_kwargs["use_reentrant"])
            super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for model in (OldStyle.from_pretrained(llama_dir), LlamaForCausalLM.from_pretrained(llama_dir)):
            enable_gradient_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert OldStyle.calls == [False]
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
