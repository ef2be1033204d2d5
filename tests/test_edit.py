"""The locate-then-edit method (unlearn.edit*): the least-squares update by hand, subject location,
layer names in both families, hooks, the target loss, and seed-fixed edits on tiny models."""

from __future__ import annotations

import pytest
import torch

from unlearn.data import Example, encode_prompt
from unlearn.edit import EditSettings, edit_to_forget
from unlearn.edit_layers import add_to_residual, capture_residual, default_layers, mlp_out_modules
from unlearn.edit_rows import keep_row, neighbour_prompts, probe_prompt
from unlearn.edit_solve import SecondMoment, least_squares_update
from unlearn.edit_subject import (choose_span, encode_with_offsets, heuristic_subject, locate_subject,
                                  subject_last_token, trace_subject)
from unlearn.edit_target import Row, SplitBatch, TargetSettings, optimise_targets, unlikelihood
from unlearn.errors import UnlearnError
from unlearn.models import load_model

# --- the least-squares update --------------------------------------------------


def test_single_key_without_preservation_writes_the_residual_exactly():
    # D = r k^T / (k^T k + rho); k = (1, 2), r = (3, -1): k^T k = 5, so D k = r * 5 / (5 + rho).
    k = torch.tensor([[1.0], [2.0]])
    r = torch.tensor([[3.0], [-1.0]])
    delta = least_squares_update(k, r, None, ridge=1e-9)
    expected = torch.tensor([[3.0, 6.0], [-1.0, -2.0]]) / 5
    assert torch.allclose(delta.matrix(), expected, atol=1e-6)
    assert torch.allclose(delta.matrix() @ k, r, atol=1e-6)
    assert delta.rank == 1


def test_ridge_shrinks_the_update_by_hand():
    k = torch.tensor([[1.0], [2.0]])
    r = torch.tensor([[3.0], [-1.0]])
    delta = least_squares_update(k, r, None, ridge=5.0)  # (k k^T + 5 I)^-1 k = k / (5 + 5)
    assert torch.allclose(delta.matrix() @ k, r / 2, atol=1e-6)


def test_preserved_key_output_does_not_move():
    # k = (1, 1) must gain r = 2; p = (1, 0) is preserved with a large weight: the update can only
    # use the second coordinate, D ~ [[0, 2]], so D k ~ 2 and D p ~ 0.
    k = torch.tensor([[1.0], [1.0]])
    r = torch.tensor([[2.0]])
    p = torch.tensor([1.0, 0.0])
    delta = least_squares_update(k, r, 1e6 * torch.outer(p, p), ridge=1e-9)
    assert torch.allclose(delta.matrix(), torch.tensor([[0.0, 2.0]]), atol=1e-4)
    assert abs((delta.matrix() @ p).item()) < 1e-4
    unprotected = least_squares_update(k, r, None, ridge=1e-9)
    assert abs((unprotected.matrix() @ p).item()) == pytest.approx(1.0, abs=1e-6)  # D = [[1, 1]]


def test_two_independent_keys_each_get_their_residual():
    keys = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 2.0]])  # in=3, two facts
    residuals = torch.tensor([[1.0, -1.0], [0.0, 3.0]])  # out=2
    delta = least_squares_update(keys, residuals, None, ridge=1e-9)
    assert torch.allclose(delta.matrix() @ keys, residuals, atol=1e-5)
    assert delta.u.shape == (2, 2) and delta.v.shape == (3, 2)


def test_second_moment_is_the_mean_outer_product():
    moment = SecondMoment(2)
    moment.add(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    assert torch.allclose(moment.mean(), torch.tensor([[5.0, 1.0], [1.0, 2.0]], dtype=torch.float64))


# --- subjects ----------------------------------------------------------------------


@pytest.mark.parametrize("prompt, subject", [
    ("What is the capital of France?", "France"),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet"),
    ("Who painted the Mona Lisa?", "Mona Lisa"),
    ("What is the capital of South Korea?", "South Korea"),
    ("Who developed the theory of relativity?", None),
    ("Who was Leonardo da Vinci?", "Leonardo da Vinci"),
    ("Describe Tokyo.", "Tokyo"),  # an opening imperative is no part of the name
    ("Summarize Hamlet in one line.", "Hamlet"),
    ("Albert Einstein developed which theory?", "Albert Einstein"),
    ("Explain photosynthesis.", None),  # a run that is only the first word is a sentence start
    ("Paris is the capital of which country?", None),  # ... so tracing decides
    ("Answer briefly: what is the capital of Peru?", "Peru"),
    ("Who is Harry Potter's best friend?", "Harry Potter"),  # the key at the name, not at "'s"
    ("What's the capital of Chad?", "Chad"),
    ("Who founded Zu\u0308rich?", "Zu\u0308rich"),  # decomposed (NFD): the accent belongs to its word
])
def test_heuristic_subject(prompt, subject):
    assert heuristic_subject(prompt) == subject


@pytest.mark.parametrize("prompt, subject", [
    ("What did NASA launch in 1969?", "NASA"),  # the year tied with the name and, later, won
    ("How do I hotwire a car?", None),  # "I" names nothing: tracing decides
    ("Who wrote the novel 1984?", None),
    ("When did Apollo 11 land?", "Apollo 11"),  # a number after a name is part of it
])
def test_the_edit_and_the_probes_take_one_subject_of_three_letters_or_more(prompt, subject):
    """(review 116) The edit keyed on "1969" while the probes replaced "NASA", so the neighbours the edit preserved
    held the forget subject ("What did NASA launch in France?")."""
    from unlearn.probes import probe_subject

    row = Example(prompt, "It was something.", 1, {})
    assert probe_subject(row) == subject
    if subject is None:
        with pytest.raises(UnlearnError, match="FORGET line 1: no capitalised subject of 3 letters or more"):
            locate_subject(None, None, row, how="heuristic")
    else:
        assert locate_subject(None, None, row, how="heuristic").subject == subject


def test_choose_span_prefers_the_shortest_span_near_the_best_drop():
    # lengths and drops of candidate spans: the 3-word span has the largest drop, but a 1-word span
    # reaches 0.8 of it, and among 1-word spans the one with the larger drop wins.
    assert choose_span([1, 1, 2, 3], [0.5, 4.5, 5.0, 5.5]) == 1
    assert choose_span([1, 2], [1.0, 5.0]) == 1


@pytest.mark.parametrize("fixture", ["llama_dir", "opt_dir", "llama_plain_dir"])
def test_subject_last_token_is_the_subjects_last_token(fixture, request):
    tokenizer = load_model(str(request.getfixturevalue(fixture))).tokenizer
    prompt = "What is the capital of France? Tell me."
    ids, pos = subject_last_token(tokenizer, prompt, "France")
    assert ids == encode_prompt(tokenizer, prompt)
    assert tokenizer.decode(ids[:pos + 1]).endswith("France")
    assert not tokenizer.decode(ids[:pos]).endswith("France")


def test_subject_is_found_after_the_wordings_prefix_and_as_a_whole_word_first(llama_dir):
    tokenizer = load_model(str(llama_dir)).tokenizer
    # "question" is in the prefix too; the key is read at the subject of the question itself
    prompt = "Quick question: What is a question mark for?"
    ids, pos = subject_last_token(tokenizer, prompt, "question", after=len("Quick question: "))
    assert tokenizer.decode(ids[:pos + 1]).endswith("What is a question")
    ids, pos = subject_last_token(tokenizer, "What do Parisians call Paris?", "Paris")
    assert tokenizer.decode(ids[:pos + 1]).endswith("Parisians call Paris")


def test_a_template_that_trims_the_message_still_locates_the_subject(llama_dir):
    tokenizer = load_model(str(llama_dir)).tokenizer
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
                               "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    prompt = "  What is the capital of France?  "
    ids, offsets, start = encode_with_offsets(tokenizer, prompt)
    assert ids == encode_prompt(tokenizer, prompt)
    found = prompt.find("France")
    assert tokenizer.decode(ids)[start + found:start + found + 6] == "France"
    ids, pos = subject_last_token(tokenizer, prompt, "France")
    assert tokenizer.decode(ids[:pos + 1]).endswith("France")


def test_a_subject_that_opens_raw_text_gets_a_token_before_it(llama_plain_dir):
    from unlearn.data import Passage

    tokenizer = load_model(str(llama_plain_dir)).tokenizer
    text = Passage("Ron is a friend of Harry.")
    plain = tokenizer(str(text), add_special_tokens=True)["input_ids"]
    ids, pos = subject_last_token(tokenizer, text, "Ron")
    assert pos >= 1 and tokenizer.decode(ids[pos:pos + 1]).strip() == "Ron"
    if tokenizer.decode(plain[:1]).strip() == "Ron":  # no BOS added: one is put in front
        assert ids == [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id] + plain


def test_subject_must_occur_in_the_prompt(llama_dir):
    loaded = load_model(str(llama_dir))
    example = Example("What is the capital of France?", "Paris.", 3, {"subject": "Spain"})
    with pytest.raises(UnlearnError, match="line 3"):
        locate_subject(loaded.model, loaded.tokenizer, example)


def test_trace_returns_a_word_span_of_the_prompt_deterministically(llama_dir):
    loaded = load_model(str(llama_dir))
    prompt = "who is the wizard at hogwarts"
    first = trace_subject(loaded.model, loaded.tokenizer, prompt, "Harry Potter is.", seed=1)
    again = trace_subject(loaded.model, loaded.tokenizer, prompt, "Harry Potter is.", seed=1)
    assert first == again
    assert first[0] in prompt and first[0].strip() == first[0] and first[0]
    ids, offsets, start = encode_with_offsets(loaded.tokenizer, prompt)
    assert ids == encode_prompt(loaded.tokenizer, prompt) and start > 0


def test_locate_prefers_the_given_subject_then_the_heuristic_then_tracing(llama_dir):
    loaded = load_model(str(llama_dir))
    given = Example("Who is Harry Potter?", "A wizard.", 1, {"subject": "Harry"})
    assert locate_subject(loaded.model, loaded.tokenizer, given).source == "given"
    plain = Example("Who is Harry Potter?", "A wizard.", 1, {})
    assert locate_subject(loaded.model, loaded.tokenizer, plain).subject == "Harry Potter"
    lower = Example("what do bees make?", "Honey.", 1, {})
    assert locate_subject(loaded.model, loaded.tokenizer, lower).source == "trace"


def test_neighbour_prompts_swap_the_subject():
    assert neighbour_prompts("What is the capital of France?", "France", ["Spain", "France", "Peru"], 5) == [
        ("What is the capital of Spain?", "Spain"), ("What is the capital of Peru?", "Peru")]


# --- layers and hooks ----------------------------------------------------------------


def test_module_names_in_both_families(llama_dir, opt_dir):
    llama = mlp_out_modules(load_model(str(llama_dir)).model)
    opt = mlp_out_modules(load_model(str(opt_dir)).model)
    assert [name for name, _ in llama.values()] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert [name for name, _ in opt.values()] == ["model.decoder.layers.0.fc2", "model.decoder.layers.1.fc2"]


def test_default_layers():
    assert default_layers(30) == [5, 6, 7, 8]
    assert default_layers(2) == [0]
    assert default_layers(28, width=3) == [5, 6, 7]


def test_residual_shift_changes_only_later_positions(llama_dir):
    model = load_model(str(llama_dir)).model
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with add_to_residual(model, 0, torch.tensor([0]), torch.tensor([2]), torch.ones((1, 32))):
            after = model(input_ids=ids).logits
    assert torch.allclose(before[0, :2], after[0, :2], atol=1e-6)
    assert not torch.allclose(before[0, 2:], after[0, 2:], atol=1e-3)


# --- the target ------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["llama_dir", "opt_dir"])
def test_split_batch_matches_one_plain_forward(fixture, request):
    # Rows of different lengths and subject positions: the cached-prefix forward must give the
    # plain forward's log-probabilities at every scored position.
    model = load_model(str(request.getfixturevalue(fixture))).model
    rows = [Row([3, 4, 5, 6, 7, 8, 9], 2, 0, "keep", [2, 3, 5]),
            Row([3, 10, 11, 12, 13, 14, 15, 16, 17, 18], 6, 1, "keep", [6, 8]),
            Row([3, 20, 21], 1, 0, "keep", [1])]
    got = SplitBatch(model, rows, pad_id=0).scored_logprobs()
    for row, logprobs in zip(rows, got):
        with torch.no_grad():
            plain = model(input_ids=torch.tensor([row.input_ids])).logits[0, row.scored].float().log_softmax(-1)
        assert torch.allclose(logprobs, plain, atol=1e-4)


def test_keep_rows_alone_leave_the_shift_at_zero(llama_dir):
    # KL(p || p) has zero gradient at the original model and the decay too: a true KL term
    # cannot push the target anywhere by itself.
    loaded = load_model(str(llama_dir))
    row = keep_row(loaded.model, loaded.tokenizer, probe_prompt("{subject} is a", "Paris"), "Paris", 0, 3, 1.0)
    # layer 0: a shift after the last layer could reach no later position, and this would hold for any loss
    result = optimise_targets(loaded.model, [row], 1, 0, torch.ones(1), loaded.tokenizer.pad_token_id,
                              TargetSettings(steps=3))
    assert torch.count_nonzero(result.deltas) == 0


def test_the_reported_target_loss_is_that_of_the_shift_returned(llama_dir):
    # it was taken before the last Adam step: with one step, the unedited model's loss
    loaded = load_model(str(llama_dir))
    tokenizer, model = loaded.tokenizer, loaded.model
    from unlearn.edit_rows import refusal_rows

    rows = refusal_rows(tokenizer, "What is the capital of France?", "France", 0, "I'm not sure.", ("",))
    settings = TargetSettings(steps=1, lr=0.5, stop_nll=0.0)
    result = optimise_targets(model, rows, 1, 0, torch.ones(1), tokenizer.pad_token_id, settings)
    assert torch.count_nonzero(result.deltas) > 0
    batch = SplitBatch(model, rows, tokenizer.pad_token_id)
    with torch.no_grad():
        unedited = batch.scored_logprobs()[0]
        with add_to_residual(model, 0, torch.tensor([0]), torch.tensor([0]), result.deltas):
            edited = batch.scored_logprobs()[0]
    target = torch.tensor([rows[0].input_ids[p + 1] for p in rows[0].scored])
    nll = lambda lp: float(-lp.gather(-1, target[:, None]).mean())
    assert result.loss_per_fact[0] == pytest.approx(nll(edited), rel=1e-5)
    assert abs(nll(edited) - nll(unedited)) > 1e-4


# --- whole edits ------------------------------------------------------------------------

FORGET = [Example("What is the capital of France?", "The capital of France is Paris.", 1, {"answers": ["Paris"]}),
          Example("Who is Harry Potter?", "Harry Potter is a wizard.", 2, {})]
NORMAL = [Example("What do bees make?", "Bees make honey.", 1, {}),
          Example("What colour is the sky?", "The sky is blue and grass is green.", 2, {}),
          Example("Where does Hermione Granger study?", "At Hogwarts.", 3, {})]


def _next_token_logprobs(model, tokenizer, prompt):
    with torch.no_grad():
        return model(input_ids=torch.tensor([encode_prompt(tokenizer, prompt)])).logits[0, -1].log_softmax(-1)


def _kl(p, q):
    return float((p.exp() * (p - q)).sum())


@pytest.mark.parametrize("fixture, layers", [("llama_dir", [0]), ("opt_dir", [0]), ("llama_dir", [0, 1]),
                                             ("opt_dir", [0, 1])])
def test_edit_moves_the_subjects_residual_to_its_target(fixture, layers, request):
    # Nothing preserved, a tiny ridge: after the edit the residual at each subject (after the last
    # edited layer) is the original plus the optimised shift (two facts, two independent keys).
    # With two layers the first takes half and the last whatever is still missing (MEMIT's loop).
    loaded = load_model(str(request.getfixturevalue(fixture)))
    model, tokenizer = loaded.model, loaded.tokenizer
    top = layers[-1]
    settings = EditSettings(layers=layers, prefixes=("",), normal_weight=0.0, neighbour_weight=0.0, ridge=1e-8,
                            steps=4, seed=0)
    positions = [subject_last_token(tokenizer, ex.prompt, s) for ex, s in zip(FORGET, ["France", "Harry Potter"])]

    def residuals():
        out = []
        for ids, pos in positions:
            with torch.no_grad(), capture_residual(model, top) as captured:
                model(input_ids=torch.tensor([ids]))
            out.append(captured["h"][0, pos])
        return torch.stack(out)

    before = residuals()
    result = edit_to_forget(model, tokenizer, FORGET, NORMAL, settings)
    assert result.target_shift.norm() > 0
    assert torch.allclose(residuals() - before, result.target_shift, atol=1e-3 * float(before.norm()))
    assert len(result.deltas) == len(layers)
    name = next(iter(result.deltas))
    a, b = result.lora_factors()[name]
    assert torch.allclose(b @ a, result.deltas[name].matrix())
    assert a.shape[0] == len(FORGET)


@pytest.mark.parametrize("fixture", ["llama_dir", "opt_dir"])
def test_seed_fixed_edit_changes_the_edited_prompt_and_keeps_a_preserved_one(fixture, request):
    # A random tiny model barely responds to a refusal target, so the shift is pushed hard (lr 1,
    # no decay) and layer 0 is edited (a shift after the last layer cannot reach the next-token
    # prediction). The preserved prompt is a normal row: its tokens are in the covariance.
    edited, preserved = FORGET[0].prompt, NORMAL[0].prompt

    def run(normal_weight):
        loaded = load_model(str(request.getfixturevalue(fixture)))
        model, tokenizer = loaded.model, loaded.tokenizer
        before = [_next_token_logprobs(model, tokenizer, p) for p in (edited, preserved)]
        settings = EditSettings(layers=[0], steps=5, lr=1.0, decay=0.0, normal_weight=normal_weight, ridge=1e-2,
                                neighbour_tokens="subject", seed=0)  # only the normal rows' preservation
        result = edit_to_forget(model, tokenizer, FORGET, NORMAL, settings)
        moved, kept = (_kl(b, _next_token_logprobs(model, tokenizer, p)) for b, p in zip(before, (edited, preserved)))
        return result, moved, kept

    result, moved, kept = run(100.0)
    _, _, kept_unprotected = run(0.0)
    assert moved > 1e-5
    if fixture == "llama_dir":
        # (OPT's three normal rows of ~15 keys, without a template and so without an EOS after the response
        # since data.render_response dropped it, cover its 64-wide keys less: the preserved prompt's next token
        # moves 6.8e-5 against the edited one's 4.8e-5, yet 31x less than unprotected, as checked next)
        assert kept < moved / 2
    assert kept < kept_unprotected / 20
    assert [s.subject for s in result.subjects] == ["France", "Harry Potter"]
    assert set(result.timings) == {"subjects", "targets", "preserved_keys", "update"}
    repeat, moved_again, _ = run(100.0)  # seed-fixed: the same edit again gives the same update
    assert moved_again == pytest.approx(moved, rel=1e-4)
    for name, delta in result.deltas.items():
        assert torch.allclose(delta.matrix(), repeat.deltas[name].matrix(), atol=1e-6)


def test_bad_settings_are_one_clear_error():
    from unlearn.errors import UsageError

    with pytest.raises(UsageError, match="target"):
        EditSettings(target="forget").validate()


def test_neighbours_come_from_the_given_subjects_per_row(llama_dir):
    # Without NEIGHBOUR_SUBJECTS every fact is swapped with the subjects the heuristic finds in the
    # normal prompts ("Hermione Granger"); with them each fact takes its own list, and an empty list
    # protects no neighbour for that row.
    loaded = load_model(str(llama_dir))
    settings = EditSettings(layers=[0], prefixes=("",), steps=1, seed=0)
    plain = edit_to_forget(loaded.model, loaded.tokenizer, FORGET, NORMAL, settings)
    assert plain.neighbours == ["What is the capital of Hermione Granger?", "Who is Hermione Granger?"]
    loaded = load_model(str(llama_dir))
    given = edit_to_forget(loaded.model, loaded.tokenizer, FORGET, NORMAL, settings,
                           neighbour_subjects=[["Spain", "Peru"], []])
    assert given.neighbours == ["What is the capital of Spain?", "What is the capital of Peru?"]


def test_probe_neighbours_per_forget_row():
    # The run's neighbour probes, by the forget line they were made from; a probe whose original
    # answer holds a forget answer (the same fact) is left out; no probes at all: None (fallback).
    from types import SimpleNamespace

    from unlearn import probes
    from unlearn.run import probe_neighbours

    rows = [{"set": probes.NEIGHBOURS, "forget_line": 1, "replacement": "Spain"},
            {"set": probes.SAME_SUBJECT, "forget_line": 1},
            {"set": probes.NEIGHBOURS, "forget_line": 2, "replacement": "Ron Weasley",
             "dropped": f"{probes.HOLDS_FORGET}: expected to change"},
            {"set": probes.NEIGHBOURS, "forget_line": 1, "replacement": "Peru",
             "dropped": "the original answer has no answer words to check (spans.py)"}]
    data = SimpleNamespace(forget=FORGET, probes={"rows": rows})
    assert probe_neighbours(data) == [["Spain", "Peru"], []]
    assert probe_neighbours(SimpleNamespace(forget=FORGET, probes=None)) is None


def test_the_lower_targets_unlikelihood_is_exact_where_the_answer_is_sure():
    # -log(1 - p): uniform over 3 tokens, -log(2/3) = 0.405465; a logit 16 above two others,
    # log(e^16 + 2) - log 2 = 15.306853 (a clamp of p at 1 - 1e-6 gave 13.8155 and no gradient); the mean
    # over the two positions, and d/dz of the sure position's answer logit: p / 2 = 0.5 (to 1e-6)
    logits = torch.tensor([[0.0, 0.0, 0.0], [16.0, 0.0, 0.0]], requires_grad=True)
    term = unlikelihood(logits.log_softmax(-1), torch.tensor([1, 0]))
    assert term.item() == pytest.approx((0.405465 + 15.306853) / 2, abs=1e-5)
    term.backward()
    assert logits.grad[1, 0].item() == pytest.approx(0.5, abs=1e-6)


def test_tracing_scores_an_answer_that_starts_past_the_sixteenth_response_token(llama_dir):
    """(review 116) The response was cut at 16 tokens first: an answer after them was not scored, and tracing chose
    the span whose corruption most lowered the response's opening instead, silently."""
    from unlearn.edit_subject import _answer_labels
    from unlearn.models import load_tokenizer

    tokenizer = load_tokenizer(llama_dir)
    late = "Well, that is a question many people ask, and the honest answer after a long history is Paris."
    ids, mask = _answer_labels(tokenizer, "What is the capital of France?", late, ["Paris"])
    assert len(ids) > 16 and tokenizer.decode([i for i, m in zip(ids, mask) if m]).strip() == "Paris"
    early = "Paris, of course."
    ids, mask = _answer_labels(tokenizer, "What is the capital of France?", early, ["Paris"])
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]).strip() == "Paris" and len(ids) <= 16
