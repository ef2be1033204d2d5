"""The loss terms against values computed by hand on tiny tensors: masking, sign, reduction."""

import math

import pytest
import torch

from unlearn import losses

LN3 = math.log(3.0)
IGN = losses.IGNORE_INDEX


def two_rows():
    """Vocabulary of 2. Row A answers at positions 1 and 2, row B at position 2 only.

    Position t's logits predict token t+1. Logits [0, 0] give p = (1/2, 1/2); [ln 3, 0] give (3/4, 1/4).
    """
    logits = torch.tensor([
        [[0.0, 0.0], [LN3, 0.0], [5.0, 5.0]],
        [[9.0, -9.0], [LN3, 0.0], [5.0, 5.0]],
    ])
    labels = torch.tensor([[IGN, 1, 0], [IGN, IGN, 0]])
    return logits, labels


def test_token_logprobs_and_mask_by_hand():
    logits, labels = two_rows()
    picked, mask = losses.token_logprobs(logits, labels)
    assert mask.tolist() == [[True, True], [False, True]]
    assert picked[0].tolist() == pytest.approx([math.log(0.5), math.log(0.75)])
    assert picked[1].tolist() == pytest.approx([0.0, math.log(0.75)])  # masked position contributes 0


def test_sequence_nll_is_a_per_sequence_mean_over_response_tokens():
    logits, labels = two_rows()
    nll = losses.sequence_nll(logits, labels)
    a = -(math.log(0.5) + math.log(0.75)) / 2  # 0.4904146
    b = -math.log(0.75)  # 0.2876821
    assert nll.tolist() == pytest.approx([a, b])
    # Batch reduction: mean of the per-sequence means, not the token-weighted mean (2a + b) / 3.
    assert float(losses.mean_nll(logits, labels)) == pytest.approx((a + b) / 2)
    assert float(losses.mean_nll(logits, labels)) != pytest.approx((2 * a + b) / 3)


def test_prompt_tokens_never_count():
    logits, labels = two_rows()
    changed = logits.clone()
    changed[1, 0] = torch.tensor([-50.0, 50.0])  # row B's prompt position: masked, must not matter
    assert float(losses.mean_nll(changed, labels)) == pytest.approx(float(losses.mean_nll(logits, labels)))


def test_row_without_response_is_left_out_and_empty_batch_fails():
    logits, labels = two_rows()
    labels[1] = IGN
    assert math.isnan(float(losses.sequence_nll(logits, labels)[1]))
    assert float(losses.mean_nll(logits, labels)) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)
    with pytest.raises(ValueError):
        losses.mean_nll(logits, torch.full_like(labels, IGN))


def test_forget_loss_is_minus_nll_and_descending_it_lowers_the_forget_probability():
    logits, labels = two_rows()
    assert float(losses.forget_loss(logits, labels)) == pytest.approx(-float(losses.mean_nll(logits, labels)))
    z = logits.clone().requires_grad_(True)
    losses.forget_loss(z, labels).backward()
    # d(log p_target)/dz_target = 1 - p > 0: gradient descent pushes the target logit down.
    assert z.grad[0, 0, 1] > 0 and z.grad[0, 1, 0] > 0
    p_before = torch.softmax(z[0, 1].detach(), -1)[0]
    p_after = torch.softmax((z - 0.5 * z.grad)[0, 1].detach(), -1)[0]
    assert p_after < p_before


def test_unlikelihood_by_hand_and_its_push_fades_as_the_token_goes():
    logits, labels = two_rows()
    # Row A: p = 1/2 then 3/4 -> -log(1/2) and -log(1/4); row B: p = 3/4 -> -log(1/4).
    a = (math.log(2.0) + math.log(4.0)) / 2
    b = math.log(4.0)
    assert float(losses.unlikelihood_loss(logits, labels)) == pytest.approx((a + b) / 2)
    z = logits.clone().requires_grad_(True)
    losses.unlikelihood_loss(z, labels).backward()
    # d(-log(1 - p_y))/dz_y = p_y, over 2 tokens in row A and 2 rows: 3/4 / 2 / 2 at row A's second
    # position, 1/2 / 2 / 2 at its first: the likelier token gets the larger push (ascent: the smaller).
    assert float(z.grad[0, 1, 0]) == pytest.approx(0.75 / 4)
    assert float(z.grad[0, 0, 1]) == pytest.approx(0.5 / 4)
    ascent = logits.clone().requires_grad_(True)
    losses.forget_loss(ascent, labels).backward()
    assert float(ascent.grad[0, 1, 0]) == pytest.approx(0.25 / 4)  # 1 - p_y
    assert float(z.grad[1, 0].abs().sum()) == 0.0  # row B's prompt position: masked


def test_unlikelihood_is_exact_where_p_rounds_to_one():
    # A margin of 40 nats: p(y) is 1 in float32, log(1 - exp(log p)) would be log 0 = -inf.
    z = torch.tensor([[[0.0, 40.0], [0.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[IGN, 1]])
    loss = losses.unlikelihood_loss(z, labels)
    assert float(loss) == pytest.approx(40.0, abs=1e-4)  # -log(1 - p) = log(1 + e^40) ~ 40
    loss.backward()
    assert float(z.grad[0, 0, 1]) == pytest.approx(1.0) and float(z.grad[0, 0, 0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        losses.unlikelihood_loss(z, torch.full_like(labels, IGN))


def test_spellings_pushes_the_banned_set_down_by_hand():
    # p = (1/8, 2/8, 5/8) at the one scored position, whose label is token 0. With token 1 listed as
    # a spelling of the same answer: -log(1 - p({0, 1})) = -log(5/8) = log(8/5), where plain
    # unlikelihood gives -log(7/8).
    z = torch.tensor([[[0.0, math.log(2.0), math.log(5.0)], [0.0, 0.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[IGN, 0]])
    banned = torch.tensor([[0, 1, 1]])  # (row, label position, token)
    loss = losses.unlikelihood_loss(z, labels, banned)
    assert float(loss) == pytest.approx(math.log(8 / 5))
    assert float(losses.unlikelihood_loss(z, labels)) == pytest.approx(math.log(8 / 7))
    loss.backward()
    # With P = p(set) = 3/8: dL/dz_u = p_u ([u in set] - P) / (1 - P), so p_u for a token of the set
    # (unlikelihood's own p_y, now at every spelling) and -p_u P / (1 - P) for the others.
    assert z.grad[0, 0].tolist() == pytest.approx([1 / 8, 2 / 8, -3 / 8])
    # An empty list, or one for another row, is plain unlikelihood.
    none = torch.zeros(0, 3, dtype=torch.long)
    assert float(losses.unlikelihood_loss(z, labels, none)) == pytest.approx(math.log(8 / 7))
    two = torch.cat([z.detach(), z.detach()])
    mixed = losses.unlikelihood_loss(two, torch.cat([labels, labels]), banned)
    assert float(mixed) == pytest.approx((math.log(8 / 5) + math.log(8 / 7)) / 2)


def test_redirect_by_hand_its_minimum_and_its_gradient():
    # Vocabulary of 3, one scored position predicting token 0. The original gives (1/2, 1/4, 1/4):
    # without token 0, q = (0, 1/2, 1/2). The model gives (1/3, 1/3, 1/3): KL(q || p) = ln(3/2).
    ref = torch.tensor([[[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]]])
    cur = torch.zeros(1, 2, 3, requires_grad=True)
    labels = torch.tensor([[IGN, 0]])
    none = torch.zeros(0, 3, dtype=torch.long)
    loss = losses.redirect_loss(ref, cur, labels, none)
    assert float(loss) == pytest.approx(math.log(1.5))
    loss.backward()
    assert cur.grad[0, 0].tolist() == pytest.approx([1 / 3, -1 / 6, -1 / 6])  # p - q: bounded, and says where to
    assert float(cur.grad[0, 1].abs().sum()) == 0.0  # the last position predicts nothing
    # Banning token 1 as well (row 0, label position 1): q = (0, 0, 1), KL = ln 3.
    assert float(losses.redirect_loss(ref, cur, labels, torch.tensor([[0, 1, 1]]))) == pytest.approx(LN3)
    # The minimum: the model is the original without the answer. Zero, and so is its gradient.
    target = torch.tensor([[[-30.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    at_min = losses.redirect_loss(ref, target, labels, none)
    assert float(at_min) == pytest.approx(0.0, abs=1e-6)
    at_min.backward()
    assert float(target.grad.abs().max()) < 1e-6


def test_redirect_from_the_original_is_the_unlikelihood_of_what_it_bans():
    # KL(q || p_orig) = -log(1 - p_orig(banned)): with only the labels banned, unlikelihood itself.
    logits, labels = two_rows()
    none = torch.zeros(0, 3, dtype=torch.long)
    assert float(losses.redirect_loss(logits, logits, labels, none)) == pytest.approx(
        float(losses.unlikelihood_loss(logits, labels)))
    z = torch.tensor([[[0.0, math.log(2.0), math.log(5.0)], [0.0, 0.0, 0.0]]])  # p = (1/8, 2/8, 5/8)
    labels = torch.tensor([[IGN, 0]])
    banned = torch.tensor([[0, 1, 1]])  # token 1 too: 1 - p(banned) = 5/8
    assert float(losses.redirect_loss(z, z, labels, banned)) == pytest.approx(math.log(8 / 5))
    # Prompt positions never count, and a batch without a response token is an error.
    with pytest.raises(ValueError):
        losses.redirect_loss(z, z, torch.full_like(labels, IGN), none)


def test_redirect_leaves_rows_scored_whole_to_unlikelihood():
    # Row A redirected against a reference that differs from the model, row B (not redirected) takes
    # unlikelihood: the mean of row means is the mean of the two losses computed row by row.
    logits, labels = two_rows()
    ref = logits.clone()
    ref[0, 0] = torch.tensor([0.0, 0.0])  # whatever the reference, its own answer token is banned
    none = torch.zeros(0, 3, dtype=torch.long)
    z = logits.clone().requires_grad_(True)
    mixed = losses.redirect_loss(ref, z, labels, none, torch.tensor([True, False]))
    row_a = float(losses.redirect_loss(ref[:1], logits[:1], labels[:1], none))
    row_b = float(losses.unlikelihood_loss(logits[1:], labels[1:]))
    assert float(mixed) == pytest.approx((row_a + row_b) / 2)
    mixed.backward()
    # row B's gradient is unlikelihood's: p_y / 2 rows at its answer position (p = 3/4)
    assert float(z.grad[1, 1, 0]) == pytest.approx(0.75 / 2)


def test_mismatch_loss_is_plain_nll():
    logits, labels = two_rows()
    assert float(losses.mismatch_loss(logits, labels)) == pytest.approx(float(losses.mean_nll(logits, labels)))


def test_kl_is_a_true_kl_in_the_right_direction():
    labels = torch.tensor([[IGN, 0]])
    ref = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # p_orig = (1/2, 1/2) at the answer position
    cur = torch.tensor([[[LN3, 0.0], [1.0, 1.0]]])  # p_theta = (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p_orig || p_theta) = 0.1438410
    assert float(losses.kl_loss(ref, cur, labels)) == pytest.approx(expected, rel=1e-6)
    reverse = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.1308120: not what we compute
    assert float(losses.kl_loss(ref, cur, labels)) != pytest.approx(reverse, rel=1e-3)
    assert float(losses.kl_loss(ref, ref, labels)) == pytest.approx(0.0, abs=1e-7)  # a cross-entropy would be ln 2


def test_kl_averages_over_response_tokens_and_skips_prompt_and_padding():
    ref = torch.zeros(2, 3, 2)
    cur = torch.zeros(2, 3, 2)
    cur[0, 0] = torch.tensor([LN3, 0.0])  # row 0, first answer position: KL = 0.1438410
    cur[1, 0] = torch.tensor([50.0, 0.0])  # row 1 prompt position (masked): must not count
    labels = torch.tensor([[IGN, 0, 1], [IGN, IGN, 1]])  # 3 response tokens in the batch
    one = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(losses.kl_loss(ref, cur, labels)) == pytest.approx(one / 3, rel=1e-6)


def test_npo_by_hand():
    beta = 0.1
    same = torch.tensor([-4.0, -7.0])
    # theta = orig: -(2/beta) log sigmoid(0) = 20 ln 2
    assert float(losses.npo_loss(same, same, beta)) == pytest.approx(20 * math.log(2), rel=1e-6)
    # log p_theta - log p_orig = -10: -(20) log sigmoid(1) = 20 * 0.3132617
    lower = torch.tensor([-14.0])
    assert float(losses.npo_loss(lower, torch.tensor([-4.0]), beta)) == pytest.approx(20 * 0.31326169, rel=1e-6)
    # Sign: the gradient pushes log p_theta(y|x) down (descent direction = -grad < 0).
    lp = torch.tensor([-4.0], requires_grad=True)
    losses.npo_loss(lp, torch.tensor([-4.0]), beta).backward()
    assert lp.grad.item() == pytest.approx(1.0)  # at theta = orig NPO's gradient equals GA's


def test_npo_leaves_out_a_row_without_response_tokens():
    # row 1's only label is at position 0, which nothing predicts: no response token, log p = 0 on both
    # sides; kept, it added (2/beta) ln 2 = 13.86 and halved row 0's gradient
    labels = torch.tensor([[IGN, 0, 1], [3, IGN, IGN]])
    assert losses.scored_rows(labels).tolist() == [True, False]
    lp = torch.tensor([-14.0, 0.0], requires_grad=True)
    loss = losses.npo_loss(lp, torch.tensor([-4.0, 0.0]), 0.1, scored=losses.scored_rows(labels))
    assert float(loss.detach()) == pytest.approx(20 * 0.31326169, rel=1e-6)  # row 0 alone, as in test_npo_by_hand
    loss.backward()
    # d/d lp of -(2/beta) log sigmoid(-beta (lp - ref)) = 2 sigmoid(beta (lp - ref)) = 2 sigmoid(-1), row 0's
    # whole (the mean is over one row); none for row 1
    assert lp.grad.tolist() == pytest.approx([2 / (1 + math.e), 0.0], rel=1e-6)
    with pytest.raises(ValueError, match="no response tokens"):
        losses.npo_loss(lp, lp.detach(), 0.1, scored=torch.tensor([False, False]))


def test_sequence_logprob_sums_response_tokens():
    logits, labels = two_rows()
    assert losses.sequence_logprob(logits, labels).tolist() == pytest.approx(
        [math.log(0.5) + math.log(0.75), math.log(0.75)])


def test_losses_compute_in_float32_for_bf16_logits():
    logits, labels = two_rows()
    value = losses.mean_nll(logits.to(torch.bfloat16), labels)
    assert value.dtype == torch.float32
