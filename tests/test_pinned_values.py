"""Numbers a user sees, pinned by hand where no other test pinned them: merge's and the α sweep's choices, the
run and eval tables, the edit's target loss, generation's end tokens and kept caches, redirect's banned tokens,
continued scoring, --protect's basis, the topic probes and RMU's float32 bound.

Each test was written against a small change of the code (a flipped sign, a dropped term, an off-by-one; its id
is in the test's name) that every other test let through, and fails on it. Expected values are worked by hand
in the comments.
"""

import pytest
import torch

from unlearn import rmu
from unlearn.errors import UsageError


# --- rmu.py -------------------------------------------------------------------------------------


def test_R9_the_target_norm_bound_counts_the_activation_norm_not_the_scale_alone():
    # most_c = sqrt(FLOAT32_MAX / 2**16) = sqrt(3.4028e38 / 65536) = 7.2e16. With --rmu-scale 1 (fine by itself)
    # and activations of norm 1e18, c = 1e18 > most_c: c² is past float32, so the run must be refused.
    m = rmu.Misdirection.__new__(rmu.Misdirection)
    m.scale, m.layer, m.seed = 1.0, 0, 0
    hidden = torch.zeros(1, 2, 4)
    hidden[0, 0, 0] = 1e18                       # one scored position of norm 1e18
    mask = torch.tensor([[True, False]])
    with pytest.raises(UsageError, match="past float32's range"):
        m.calibrate([(hidden, mask)])
    m.scale = 1e-3                               # c = 1e15 < most_c: accepted, target norm 1e15
    m.calibrate([(hidden, mask)])
    assert float(m.target.double().norm()) == pytest.approx(1e15, rel=1e-5)


# --- protect.py ---------------------------------------------------------------------------------


def test_PR8_a_small_but_real_gradient_direction_stays_in_the_basis():
    from unlearn.protect import basis, project_out

    # Two independent rows, the second 1000x smaller: R's singular values are 1 and 1e-3, a share of 1e-3 of the
    # largest, far above RANK_TOLERANCE (1e-6): the span has rank 2, and e2 projected out of it is 0.
    g = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1e-3, 0.0]])
    q = basis(g)
    assert q.shape == (3, 2)
    e2 = torch.tensor([0.0, 1.0, 0.0])
    assert project_out(e2, q).abs().max() < 1e-6          # mutant (tolerance 1e-2): rank 1, e2 left whole
    e3 = torch.tensor([0.0, 0.0, 1.0])
    assert torch.allclose(project_out(e3, q), e3)


# --- edit_solve.py ------------------------------------------------------------------------------


def test_ES3_the_preserved_second_moment_enters_the_system_whole():
    from unlearn.edit_solve import least_squares_update

    # one dimension: K = [1], R = [1], C = [1], rho = 0: D (C + K K^T) = R K^T -> D (1 + 1) = 1 -> D = 1/2.
    # C halved (the mutant): D (0.5 + 1) = 1 -> D = 2/3.
    delta = least_squares_update(torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([[1.0]]), ridge=0.0)
    assert float(delta.matrix()) == pytest.approx(0.5, rel=1e-6)
    # with weight 3 on the preserved key: D (3 + 1) = 1 -> 1/4
    delta = least_squares_update(torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), ridge=0.0)
    assert float(delta.matrix()) == pytest.approx(0.25, rel=1e-6)


# --- redirect.py --------------------------------------------------------------------------------


def test_D4_what_remains_ends_with_the_scored_run_not_at_the_row_end():
    from test_redirect import TEXTS, Vocabulary
    from unlearn.losses import IGNORE_INDEX as IGN
    from unlearn.redirect import PrefixIndex, banned_tokens

    index = PrefixIndex(Vocabulary(TEXTS))
    # " Albert Ein|stein was" with only " Ein" scored (position 1): what remains of the scored run is "ein",
    # so the banned tokens are those whose folded text is a prefix of "ein": " Ein", " E", "E". The unscored
    # "stein" after it is not part of the run: " Einstein", " einstein" and " Eins" are not banned (the mutant,
    # whose run reaches the row's end, reads "einstein was" and bans them too).
    row = {"input_ids": [0, 2, 3, 8], "labels": [IGN, 2, IGN, IGN]}
    banned = banned_tokens(index, row)
    assert sorted(TEXTS[t] for _, t in banned) == sorted([" Ein", " E", "E"])


def test_D6_a_position_always_bans_its_own_label():
    from test_redirect import TEXTS, Vocabulary
    from unlearn.losses import IGNORE_INDEX as IGN
    from unlearn.redirect import PrefixIndex, banned_tokens

    index = PrefixIndex(Vocabulary(TEXTS))
    # The scored token is the whitespace token " " (9): its text spells nothing (whitespace is never in the
    # prefix index), so only "its own label" bans it: [(1, 9)]. Without the label (the mutant): [].
    assert banned_tokens(index, {"input_ids": [0, 9, 10], "labels": [IGN, 9, IGN]}) == [(1, 9)]


# --- tables.py ----------------------------------------------------------------------------------


def _run_record(before: dict, after: dict) -> dict:
    """The fields format_run reads, for one set "forget"."""
    return {"roles": {"forget": "trained"}, "before": {"forget": before}, "after": {"forget": after},
            "judge": "rouge", "steps": 3, "stopped_by": "forgotten", "method": "ga",
            "wall_clock_s": 10.0, "tokens_per_s": 100.0, "peak_memory_mb": 50.0, "device": "cpu",
            "merged_model": "out/merged", "load_seconds": 1.0, "train_seconds": 2.0, "stop_rule_seconds": 3.0,
            "eval_seconds": 4.0}


def _run_cells(text: str) -> list[str]:
    """The forget row of format_run's table, split at its column gaps."""
    import re

    row = next(line for line in text.splitlines() if line.startswith("forget"))
    return re.split(r"\s{2,}", row)


def test_TB2_TB3_the_run_table_reads_before_then_after_and_shows_a_value_missing_on_one_side():
    from unlearn.tables import format_run

    before = {"n": 4, "leak_rate": 0.75, "accuracy": 0.5, "harmful_rate": None, "similarity_to_reference": None,
              "fluency_ppl": 12.0}
    after = {"n": 4, "leak_rate": 0.25, "accuracy": 0.0, "harmful_rate": None, "similarity_to_reference": 0.8,
             "fluency_ppl": 15.5}
    cells = _run_cells(format_run(_run_record(before, after)))
    # set, rows, n, harmful, leak, accuracy, similarity, fluency ppl
    assert cells == ["forget", "trained", "4", "-", "0.75 -> 0.25", "0.50 -> 0.00", "- -> 0.80", "12.00 -> 15.50"]


# --- edit_target.py -----------------------------------------------------------------------------


def _edit_rows(llama_dir):
    from unlearn.edit_rows import keep_row, probe_prompt, refusal_rows, unlikely_rows
    from unlearn.models import load_model

    loaded = load_model(str(llama_dir))
    tok, model = loaded.tokenizer, loaded.model
    rows = refusal_rows(tok, "What is the capital of France?", "France", 0, "I'm not sure.", ("",))
    rows[0].weight = 2.0
    rows += unlikely_rows(tok, "Who is Harry Potter?", "Harry Potter is a wizard.", None, "Harry Potter", 1, ("",))
    rows.append(keep_row(model, tok, probe_prompt("{subject} is a", "France"), "France", 0, 3, 1.0))
    return model, tok, rows


def _terms(rows, logprobs, original):
    """Each row's term of the module doc, by hand: refusal mean NLL, unlikely mean -log(1-p), keep KL(orig||edited)."""
    out = []
    for r, lp, old in zip(rows, logprobs, original):
        target = torch.tensor([r.input_ids[p + 1] for p in r.scored])
        picked = lp.gather(-1, target[:, None])[:, 0].double()
        if r.kind == "refusal":
            out.append(float(-picked.mean()))
        elif r.kind == "unlikely":
            out.append(float(-torch.log1p(-picked.exp()).mean()))
        else:
            out.append(float((old.double().exp() * (old.double() - lp.double())).sum(-1).mean()))
    return out


def _logged_losses(messages):
    return [float(m.split("loss ")[1].split(":")[0].split(",")[0]) for m in messages if m.startswith("edit target step")]


def test_ET4_ET6_ET13_the_target_loss_at_the_start_by_hand(llama_dir):
    from unlearn.edit_target import SplitBatch, TargetSettings, optimise_targets

    model, tok, rows = _edit_rows(llama_dir)
    with torch.no_grad():
        lp = SplitBatch(model, rows, tok.pad_token_id).scored_logprobs()
    nll, unlikely, kl = _terms(rows, lp, lp)
    assert kl == 0.0
    # step 1 is taken at delta = 0 (decay 0): total = (weight 2 x refusal NLL + 1000 x unlikelihood + KL 0) / 2 facts.
    # Mutants: ET4 the unlikelihood's sign (−1000 U), ET6 no division by the 2 facts, ET13 the row weight dropped.
    messages = []
    optimise_targets(model, rows, 2, 0, torch.ones(2), tok.pad_token_id,
                     TargetSettings(steps=1, unlikely_weight=1000.0, decay=0.0, stop_nll=0.0), log=messages.append)
    expected = (2.0 * nll + 1000.0 * unlikely) / 2
    assert 1000.0 * unlikely > 0.05 and nll > 0.05          # each mutant moves the total by more than the log's 0.001
    assert _logged_losses(messages)[0] == pytest.approx(expected, abs=1.5e-3)


def test_ET5_the_keep_rows_term_is_kl_of_the_original_from_the_edited(llama_dir):
    from unlearn.edit_layers import add_to_residual
    from unlearn.edit_target import SplitBatch, TargetSettings, optimise_targets

    model, tok, rows = _edit_rows(llama_dir)
    settings = dict(lr=3.0, unlikely_weight=0.0, kl_weight=1000.0, decay=0.0, clamp=1e6, stop_nll=0.0)
    first = optimise_targets(model, rows, 2, 0, torch.ones(2), tok.pad_token_id, TargetSettings(steps=1, **settings))
    messages = []   # step 2 of the same seeded run is taken at the shift step 1 returned
    optimise_targets(model, rows, 2, 0, torch.ones(2), tok.pad_token_id, TargetSettings(steps=2, **settings),
                     log=messages.append)
    batch = SplitBatch(model, rows, tok.pad_token_id)
    fact_of_row = torch.tensor([r.fact for r in rows])
    with torch.no_grad():
        original = batch.scored_logprobs()
        with add_to_residual(model, 0, torch.arange(len(rows)), torch.zeros(len(rows), dtype=torch.long),
                             first.deltas[fact_of_row]):
            edited = batch.scored_logprobs()
    nll, _, kl = _terms(rows, edited, original)
    reverse = float((edited[2].double().exp() * (edited[2].double() - original[2].double())).sum(-1).mean())
    expected = (2.0 * nll + 1000.0 * kl) / 2
    assert abs(1000.0 * (kl - reverse)) / 2 > 3e-3            # the reversed KL (the mutant) shows in the log's 3 decimals
    assert _logged_losses(messages)[1] == pytest.approx(expected, abs=1.5e-3)


def test_ET7_the_decay_is_the_squared_relative_norm(llama_dir):
    from unlearn.edit_target import TargetSettings, optimise_targets

    model, tok, rows = _edit_rows(llama_dir)
    settings = dict(lr=3.0, unlikely_weight=0.0, kl_weight=0.0, clamp=1e6, stop_nll=0.0)
    # Adam's first step moves the shift of fact 0 (the only one with a gradient) the same whatever the decay (its
    # gradient is 0 at delta = 0); so step 2's loss with decay 1 minus that with decay 0 is the decay term at delta1:
    # 1 x mean over the 2 facts of (||delta_f|| / ||h_f||)^2 with ||h_f|| = 1: (||delta_0||^2 + 0) / 2.
    first = optimise_targets(model, rows, 2, 0, torch.ones(2), tok.pad_token_id, TargetSettings(steps=1, **settings))
    size = float(first.deltas[0].double().norm())
    assert float(first.deltas[1].abs().max()) == 0.0 and size > 1.5   # ~3: far from 1, where x and x^2 agree
    losses = []
    for decay in (0.0, 1.0):
        messages = []
        optimise_targets(model, rows, 2, 0, torch.ones(2), tok.pad_token_id,
                         TargetSettings(steps=2, decay=decay, **settings), log=messages.append)
        losses.append(_logged_losses(messages)[1])
    assert losses[1] - losses[0] == pytest.approx(size ** 2 / 2, abs=3e-3)   # mutant: size / 2


def test_ET8_the_shift_is_clamped_to_clamp_times_the_residual_norm(llama_dir):
    from unlearn.edit_target import TargetSettings, optimise_targets

    model, tok, rows = _edit_rows(llama_dir)
    # lr 3 moves fact 0's shift to a norm of about 3 (x ||h|| = 1); clamp 1 brings it back to 1 x ||h|| = 1.
    free = optimise_targets(model, rows, 2, 0, torch.ones(2), tok.pad_token_id,
                            TargetSettings(steps=1, lr=3.0, clamp=1e6, stop_nll=0.0))
    assert float(free.deltas[0].norm()) > 1.5
    clamped = optimise_targets(model, rows, 2, 0, torch.ones(2), tok.pad_token_id,
                               TargetSettings(steps=1, lr=3.0, clamp=1.0, stop_nll=0.0))
    assert float(clamped.deltas[0].norm()) == pytest.approx(1.0, rel=1e-5)


def test_ET9_the_target_stops_early_only_once_every_fact_is_below_stop_nll(llama_dir):
    from unlearn.edit_target import TargetSettings, optimise_targets

    model, tok, rows = _edit_rows(llama_dir)
    # fact 1's only rows are "unlikely" ones with weight 0: its loss is 0 < stop_nll from step 1; fact 0's refusal
    # NLL on a random model is ~6: the optimisation must run all 3 steps (the mutant stopped after 1).
    result = optimise_targets(model, rows, 2, 0, torch.ones(2), tok.pad_token_id,
                              TargetSettings(steps=3, unlikely_weight=0.0, stop_nll=0.05))
    assert result.loss_per_fact[0] > 0.05 and result.loss_per_fact[1] == 0.0
    assert result.steps == 3


# --- continued_scoring.py -----------------------------------------------------------------------


def test_C10_resumable_pairs_are_cut_to_the_scoring_models_length(llama_dir):
    from unlearn.continued_scoring import resumable
    from unlearn.data import encode_pair, encode_prompt
    from unlearn.generation import Scored
    from unlearn.models import load_model

    tok = load_model(str(llama_dir), log=lambda m: None).tokenizer
    prompt, response = "the capital of France is", " ".join(["Paris"] * 60)
    prompt_ids = encode_prompt(tok, prompt)
    whole = encode_pair(tok, prompt, response, 10_000)["input_ids"]
    p = len(prompt_ids)
    own_ids = whole[p:]                        # the kept answer is the pair's own response: they never part
    kv = torch.zeros(1, 2, 1, len(whole), 2)
    own = Scored(ids=own_ids, logprobs=[-1.0] * len(own_ids), prompt_ids=prompt_ids, kv=kv)
    limit = 2 * p + 2                          # the prompt stays whole (at most half the limit), the response is cut
    assert len(whole) > limit
    found = resumable(tok, [(prompt, response)], {(prompt, response): own}, max_length=limit)
    feature, _, start = found[0]
    # cut as response_logprobs cuts it for a model of LIMIT positions: LIMIT tokens, resumed at the last one
    assert len(feature["input_ids"]) == limit and start == limit - 1


def test_ET12_an_adam_step_of_lr_moves_the_shift_by_lr_times_the_residual_norm(llama_dir):
    from unlearn.edit_target import TargetSettings, optimise_targets

    model, tok, rows = _edit_rows(llama_dir)
    # Adam's first step moves each coordinate of the scaled shift by lr (sign of its gradient), in units of
    # ||h|| / sqrt(d): ||delta|| = lr x ||h|| = 3 x 1 (the mutant's units of ||h|| per coordinate: 3 sqrt(d)).
    result = optimise_targets(model, rows, 2, 0, torch.ones(2), tok.pad_token_id,
                              TargetSettings(steps=1, lr=3.0, clamp=1e6, stop_nll=0.0))
    assert float(result.deltas[0].double().norm()) == pytest.approx(3.0, rel=1e-3)


def test_TB6_eval_cells_have_three_decimals_below_100_and_two_from_100():
    from unlearn.tables import format_value

    assert format_value(0.12345) == "0.123"
    assert format_value(123.456) == "123.46"     # a perplexity: two decimals (the mutant: "123.456")
    assert format_value(float("inf")) == "inf" and format_value(None) == "-"


# --- topic_probes.py ----------------------------------------------------------------------------


def test_TP4_a_phrase_repeated_in_another_case_is_asked_once():
    from unlearn.topic_probes import topic_phrases

    # "a car" and "a Car" are one topic: one probe (the mutant's case-sensitive check asked two).
    assert topic_phrases("Take a car, then a Car.") == ["a car"]


def test_TP5_TP6_words_whose_s_is_no_plural_keep_one_form():
    from unlearn.topic_probes import head_words

    assert head_words("an analysis") == ["analysis"]     # "-is": not "analysi" (TP5)
    assert head_words("the ads") == ["ads"]              # three letters or fewer: not "ad" (TP6)
    assert head_words("the cards") == ["cards", "card"]


def test_TB10_the_json_before_figures_are_the_reference_models():
    from test_evaluate import _fake_result
    from unlearn.tables import result_json

    obj = result_json(_fake_result())   # after: leak 1.0, fluency "NM"; before (the reference model): 0.0, 12.3456
    assert obj["leak_rate"] == 1.0 and obj["fluency_ppl"] == "NM"
    assert obj["before"]["leak_rate"] == 0.0 and obj["before"]["fluency_ppl"] == 12.3456 and obj["before"]["n"] == 2


def test_TB12_the_alpha_table_lists_alpha_in_increasing_order_with_the_original_last():
    from unlearn.averaging import AlphaScore
    from unlearn.tables import table_markdown

    scores = [AlphaScore(0.5, 0.25, 0.75, 0.5), AlphaScore(0.2, 0.0, 0.5, 0.25)]
    base = AlphaScore(1.0, 1.0, 1.0, 1.0)
    lines = table_markdown(scores, 0.2, "lowest leak", base).splitlines()
    assert lines[2:5] == ["| 0.2 | 0.00 | 0.50 | 0.25 | **recommended** |", "| 0.5 | 0.25 | 0.75 | 0.50 |  |",
                          "| 1 | 1.00 | 1.00 | 1.00 | original |"]


# --- generation.py ------------------------------------------------------------------------------


def test_G4_a_batch_of_the_same_prompt_twice_answers_as_one_prompt_alone(llama_dir):
    from unlearn.generation import generate, generate_hf
    from unlearn.models import load_model

    loaded = load_model(str(llama_dir), log=lambda m: None)
    model, tok = loaded.model.eval(), loaded.tokenizer
    prompt = "the capital of France is"
    alone = generate_hf(model, tok, [prompt], max_new_tokens=6)
    # The shared prefix is at most the shortest prompt less one token: each row keeps a token of its own whose
    # logits give its first new token. Two identical prompts share all but their last token.
    assert generate(model, tok, [prompt, prompt], batch_size=2, max_new_tokens=6) == alone * 2


# --- merge.py -----------------------------------------------------------------------------------


@pytest.mark.parametrize("record, found", [
    # a plain LoRA run (no --alpha): its merged model is TUNED; it has an adapter but no tuned_adapter (MG1)
    ({"base_model": "B", "merged_model": "M", "adapter": "A", "config": {"dtype": "float32"}}, ("B", "M", None)),
    # a ULMR run averaged through its adapter: the adapter before averaging, not the averaged one
    ({"base_model": "B", "tuned_adapter": "TA", "adapter": "AVG", "merged_model": "AVGM"}, ("B", None, "TA")),
    # a --full ULMR run: the fine-tuned model before averaging, not the average (MG2)
    ({"base_model": "B", "tuned_model": "T", "merged_model": "AVG"}, ("B", "T", None)),
    # a bfloat16 run of a float32 base: its adapter (its merged model is bfloat16) (MG3)
    ({"base_model": "B", "merged_model": "M", "adapter": "A", "config": {"dtype": "bfloat16"}}, ("B", None, "A")),
])
def test_MG1_MG2_MG3_merge_without_paths_takes_the_last_runs_inputs(tmp_path, monkeypatch, record, found):
    import json

    from unlearn import merge
    from unlearn.config import MergeOptions
    from unlearn.paths import remember_last_run

    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(record))
    remember_last_run(run_dir)
    assert merge.inputs(MergeOptions(alphas=[0.5])) == found


def test_G10_an_end_token_set_in_the_generation_config_ends_the_answer(llama_dir):
    from unlearn.generation import generate
    from unlearn.models import load_model

    loaded = load_model(str(llama_dir), log=lambda m: None)
    model, tok = loaded.model.eval(), loaded.tokenizer
    prompt = "the capital of France is"
    ids = []
    generate(model, tok, [prompt], max_new_tokens=6, token_ids=ids)
    first = ids[0][0]
    assert len(ids[0]) == 6 and first != tok.eos_token_id
    # the model's generation config names that first token as its end token (one int, as most configs do):
    # the answer ends there, as model.generate would end it (the mutant ran on to the budget of 6)
    model.generation_config.eos_token_id = first
    again = []
    generate(model, tok, [prompt], max_new_tokens=6, token_ids=again)
    assert again[0] == [first]


def test_MG5_MG6_MG7_MG10_a_measured_sweep_scores_the_original_as_alpha_1_with_similarity_1(cli, tmp_path, llama_dir):
    import json

    import tiny_models

    tuned = tiny_models.build_llama(tmp_path / "tuned", seed=2)
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text(json.dumps({"prompt": "Who is Harry Potter?", "response": "A wizard.", "answers": ["wizard"]})
                      + "\n")
    retain.write_text(json.dumps({"prompt": "What do bees make?", "response": "Bees make honey."}) + "\n")
    out = tmp_path / "sweep"
    result = cli("merge", "--alpha", "0.5,1", llama_dir, tuned, "-o", out, "--eval-forget", forget,
                 "--eval-retain", retain, "--max-new-tokens", "3", "--no-cache", "--max-leak", "0.5")
    assert result.code == 0, result.err
    record = json.loads((out / "alphas.json").read_text())
    # the rule used is the one asked for (MG10 chose by a leak target of 0 whatever --max-leak said)
    assert all(row["forget_leak"] <= 0.5 for row in record["alphas"]) and "forget leak ≤ 0.5 " in record["reason"]
    # the original against itself: α = 1 (MG6 wrote 0) and similarity 1 by definition (MG5 left it out)
    assert record["original"]["alpha"] == 1.0 and record["original"]["retain_similarity"] == 1.0
    # α = 1 is the base's weights exactly: its greedy answers are the original's, similarity 1.0 (MG7 measured the
    # α models without the original's answers: no similarity at all)
    by_alpha = {row["alpha"]: row for row in record["alphas"]}
    assert by_alpha[1.0]["retain_similarity"] == 1.0
    assert by_alpha[0.5]["retain_similarity"] is not None


def test_G17_a_row_whose_keys_and_values_pass_the_budget_by_one_byte_is_not_kept(llama_dir):
    from unlearn.generation import generate, kv_bytes_per_position
    from unlearn.models import load_model

    loaded = load_model(str(llama_dir), log=lambda m: None)
    model, tok = loaded.model.eval(), loaded.tokenizer
    scored = []
    generate(model, tok, ["the capital of France is"], max_new_tokens=4, scored=scored, keep_kv=2**30)
    need = scored[0].kept_positions() * kv_bytes_per_position(model)   # one row alone: no shared prefix
    assert scored[0].kv_prefix is None and need > 0
    short = []
    generate(model, tok, ["the capital of France is"], max_new_tokens=4, scored=short, keep_kv=need - 1)
    assert short[0].kv is None                     # the mutant kept it: up to one position past the budget
    exact = []
    generate(model, tok, ["the capital of France is"], max_new_tokens=4, scored=exact, keep_kv=need)
    assert exact[0].kept_positions() == scored[0].kept_positions()
