"""Boundaries and options the rest of the suite could not tell apart: each test here fails on a one-line change
to the code that every other test let pass (a hand-made mutation: a swapped row split, a dropped bias or
option, `>=` made `>`), with values worked out by hand."""
import math

import pytest
import torch
from torch import nn

from unlearn import losses, metrics, averaging, probes
from unlearn.spans import derive_answers
from unlearn.data import Example

IGN = losses.IGNORE_INDEX


def test_redirected_rows_take_redirect_and_the_others_unlikelihood():
    # vocab 3; row 0 p=(1/8,2/8,5/8), row 1 p=(1/5,3/5,1/5); answer token 0 in both; reference uniform
    z = torch.tensor([[[0.0, math.log(2), math.log(5)], [0, 0, 0]],
                      [[0.0, math.log(3), 0.0], [0, 0, 0]]])
    ref = torch.zeros_like(z)  # q = (0, 1/2, 1/2) after banning token 0
    labels = torch.tensor([[IGN, 0], [IGN, 0]])
    none = torch.zeros(0, 3, dtype=torch.long)
    row0_redirect = 0.5 * math.log(8 / 5)  # KL((0,.5,.5) || (1/8,2/8,5/8)) = 0.2350
    row1_unlikely = math.log(5 / 4)  # -log(1 - 1/5) = 0.2231
    got = float(losses.redirect_loss(ref, z, labels, none, torch.tensor([True, False])))
    assert got == pytest.approx((row0_redirect + row1_unlikely) / 2, rel=1e-6)  # 0.22907; swapped: 0.25025


def test_recall_exactly_half_leaks():
    # LCS(red blue, red green blue yellow) = 2 of 4 reference words: recall 0.5 = LEAK_ROUGE_RECALL
    assert metrics.rouge_l("red blue", "red green blue yellow").recall == 0.5
    assert metrics.sentence_bleu("red blue", "red green blue yellow") < metrics.LEAK_BLEU  # 26.0: BLEU alone would not
    assert metrics.leaks("red blue", "red green blue yellow") is True


def test_a_separator_before_four_digits_is_not_a_thousands_separator():
    assert metrics.normalize_answer("1,0000") == "1 0000"
    assert not metrics.contains_answer("It costs 1,0000", ["10000"])


def test_question_recall_exactly_half_keeps_the_spans():
    assert derive_answers("What colours are cars, boats, trains and planes?",
                          "Cars red, boats green, trains blue, planes pink.") == ["red", "green", "blue", "pink"]


def test_at_most_two_connectors_inside_a_span():
    assert derive_answers("Where is the museum?", "It is in the Isle of the Dead.") == ["Isle of the Dead", "Dead"]
    assert derive_answers("What did he paint?", "He painted Isle of the of Dead.") == ["Isle", "Dead"]


def test_endings_leave_stems_of_three_letters_or_more():
    # "goes" - "es" = "go" (2 letters): not a stem, so "goes" is not given by "go"
    assert derive_answers("Where does it go?", "It goes north.") == ["goes north", "north"]


def test_similarity_judge_flags_recall_exactly_half():
    from unlearn.evaluate import SimilarityJudge
    row = Example("red green blue yellow", "red green blue yellow", 1, {})  # no word beyond the prompt: ROUGE rule
    assert SimilarityJudge().flags(["red blue"], [row]) == [True]


def test_retain_accuracy_is_a_share_of_the_rows_with_answers():
    summaries = {"f": {"n": 4, "leak_rate": 0.0},
                 "r1": {"n": 4, "accuracy": 1.0, "accuracy_rows": 2},   # 2 of its 2 rows with answers
                 "r2": {"n": 8, "accuracy": 0.0, "accuracy_rows": 2}}   # 0 of its 2
    s = averaging.score(0.5, summaries, {"f": "forget", "r1": "retain", "r2": "retain"})
    assert s.retain_accuracy == 0.5  # 2 of 4; weighted by n: 4 of 12 = 0.33


def test_retain_score_is_the_mean_of_what_exists():
    assert averaging.AlphaScore(0.5, 0.0, 0.8, None).retain_score == pytest.approx(0.8)
    assert averaging.AlphaScore(0.5, 0.0, None, 0.6).retain_score == pytest.approx(0.6)


def test_no_alpha_forgets_enough_full_tie_goes_to_the_larger_alpha():
    scores = [averaging.AlphaScore(0.2, 0.3, 0.5, None), averaging.AlphaScore(0.6, 0.3, 0.5, None)]
    assert averaging.recommend(scores, 0.1)[0] == 0.6


def test_kept_rate_verdict_needs_ceil_of_the_share():
    from test_measure import _StreamingMeasurer
    from unlearn.measure import EvalSet, kept_rate
    probes_ = EvalSet("probes", "retain", [Example(f"What is the capital of country {i}?", None, i + 1,
                                                   {"answers": ["Lyon"]}) for i in range(3)])
    streams = ["I am not sure which city that would be, it is hard to say.", "It is Lyon of course",
               "The city is Lyon and more"]
    # 2 of 3 keep Lyon: the --stop-probes 0.5 wait is met (kept >= 0.5)
    assert kept_rate(_StreamingMeasurer(streams), probes_, enough=0.5) >= 0.5


def test_a_tokenizer_appended_eos_is_dropped_from_the_prompt(tmp_path):
    import tiny_models
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer
    from unlearn.data import encode_prompt
    tiny_models.build_llama(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.chat_template = None  # the fallback format: the tokenizer adds its special tokens
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    assert tok("hi")["input_ids"][-1] == tok.eos_token_id
    assert encode_prompt(tok, "What is it?")[-1] != tok.eos_token_id


def test_adapter_dropout_applies_in_training():
    from unlearn.lora import LoRALinear
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), rank=2, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.ones(4, 8)
    layer.eval()
    clean = layer(x)
    layer.train()
    assert not torch.allclose(layer(x), clean)  # dropout(x) before A: half of x zeroed, the rest doubled


def test_folded_adapters_keep_the_bias():
    from unlearn.lora import LoRALinear, adapters_folded
    torch.manual_seed(0)
    base = nn.Linear(8, 8, bias=True)
    nn.init.normal_(base.bias)
    net = nn.Sequential(LoRALinear(base, rank=2, alpha=4, dropout=0.0))
    nn.init.normal_(net[0].lora_B)
    x = torch.randn(3, 8)
    with torch.no_grad():
        plain = net(x)
        with adapters_folded(net):
            folded = net(x)
    assert torch.allclose(plain, folded, atol=1e-5)


def test_plausible_candidates_ranked_by_pmi_most_natural_first():
    hood = object.__new__(probes.Neighbourhood)
    hood._alone = {}
    P = probes.SCORE_PREFIX
    table = {P + "Who wrote X?": -10.0, P + "Who wrote A?": -12.0, P + "Who wrote B?": -11.0,
             P + "X": -5.0, P + "A": -8.0, P + "B": -5.0}
    hood._logprobs = lambda texts: [table[t] for t in texts]
    # PMI: X -5, A -4, B -6; threshold -7: both kept, A first
    assert hood.plausible_many([("Who wrote X?", "X", ["B", "A"])]) == [["A", "B"]]


def test_npo_beta_reaches_the_loss(llama_dir):
    from test_train import unlearner
    u = unlearner(llama_dir, method="npo", npo_beta=1.0, normal_weight=0.0)
    # at theta = orig: L = -(2/beta) log sigmoid(0) = (2/beta) ln 2 = 1.386 for beta 1 (13.86 for the default 0.1)
    assert u.loss({"forget": u.forget[:2]})[1]["npo"] == pytest.approx(2 * math.log(2), rel=1e-4)


def test_a_mixed_batch_redirects_only_its_focused_rows_after_training(llama_dir):
    from test_train import FORGET, NORMAL
    from unlearn.data import collate
    from unlearn.lora import LoraSettings, attach_lora, adapters_disabled
    from unlearn.models import load_model
    from unlearn.train import TrainConfig, Unlearner
    torch.manual_seed(0)
    lm = load_model(str(llama_dir), log=lambda m: None)
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
    whole = Example("Who painted it?", "Nobody knows who did.", 4, {"answers": ["Picasso"]})
    u = Unlearner(lm.model, lm.tokenizer, [*FORGET, whole], NORMAL,
                  TrainConfig(lr=1e-1, batch_size=2, max_steps=8, check_every=0, forget_loss="redirect"))
    assert not u.forget[3]["focused"] and u.forget[0]["focused"]
    for _ in range(4):
        u.step()  # the model now differs from the original: redirect != unlikelihood on the unfocused row
    mixed = collate([u.forget[0], u.forget[3]], u.pad_id)
    with torch.no_grad():
        logits = u.model(input_ids=mixed["input_ids"], attention_mask=mixed["attention_mask"]).logits
        with adapters_disabled(u.model):
            original = u.model(input_ids=mixed["input_ids"], attention_mask=mixed["attention_mask"]).logits
        assert not torch.allclose(logits, original)
        banned = torch.tensor([(0, j, t) for j, t in u.forget[0]["banned"]])
        expected = float(losses.redirect_loss(original, logits, mixed["labels"], banned, torch.tensor([True, False])))
        wrong = float(losses.redirect_loss(original, logits, mixed["labels"], banned, None))
        assert abs(expected - wrong) > 1e-3 * abs(expected)
        assert u.loss({"forget": [u.forget[0], u.forget[3]]})[1]["forget"] == pytest.approx(expected, rel=1e-5)


def test_accuracy_rows_counts_the_rows_with_answers():
    from test_evaluate import ex, tiny_tokenizer
    from unlearn import evaluate as ev
    rows = [ex("q", "a b", answers=["a"]), ex("r", "c d"), ex("s", "e f")]  # one row of three has answers
    result = ev.evaluate_outputs(["a", "x", "y"], rows, judge=ev.make_judge(None), scorer=None,
                                 tokenizer=tiny_tokenizer())
    assert result.summary["accuracy"] == 1.0 and result.summary["accuracy_rows"] == 1
