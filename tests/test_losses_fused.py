"""The memory-lean loss implementations equal the plain ones: values and gradients, to tight tolerance.

`token_logprobs` normalises response positions only (z_t - logsumexp z) and `kl_loss`
runs a chunked autograd Function with a hand-written backward; the plain versions
below are what they replaced (full log-softmax, autograd through every intermediate).
"""

import pytest
import torch

from unlearn import losses

IGN = losses.IGNORE_INDEX


def plain_token_logprobs(logits, labels):
    logits, targets = logits[:, :-1, :], labels[:, 1:]
    mask = targets != IGN
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask, mask


def plain_kl(reference_logits, logits, labels):
    mask = labels[:, 1:] != IGN
    ref_logp = torch.log_softmax(reference_logits[:, :-1][mask].float(), dim=-1)
    cur_logp = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - cur_logp)).sum(dim=-1).mean()


def batch(vocab, seed=0, rows=3, seq=9):
    """Random logits (spread like a real LM's) and labels with prompt, response and padding positions."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, seq, vocab, generator=g) * 4
    reference = logits + torch.randn(rows, seq, vocab, generator=g)  # a nearby model: KL well above 0
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    labels[0, :3] = IGN  # prompt
    labels[1, :5] = IGN
    labels[1, -2:] = IGN  # padding
    labels[2, :-1] = IGN  # a single response token
    return reference, logits, labels


# 1000 and 70000 wide: one chunk, and several chunks of rows per chunk of ~16 MiB.
@pytest.mark.parametrize("vocab", [7, 1000, 70000])
def test_token_logprobs_equal_the_plain_log_softmax_with_gradients(vocab):
    _, logits, labels = batch(vocab)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    picked, mask = losses.token_logprobs(a, labels)
    plain, plain_mask = plain_token_logprobs(b, labels)
    assert torch.equal(mask, plain_mask)
    torch.testing.assert_close(picked, plain, rtol=1e-6, atol=1e-5)
    weights = torch.randn(picked.shape, generator=torch.Generator().manual_seed(1))
    (picked * weights).sum().backward()
    (plain * weights).sum().backward()
    # rtol 5e-5: the two sum 70000 exponentials in different orders (chunks); on an AVX2 EPYC the
    # picked tokens' gradients (about w) differed by up to 1.3e-5 relative. A wrong gradient
    # formula errs by orders of magnitude more.
    torch.testing.assert_close(a.grad, b.grad, rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("vocab", [7, 1000, 70000])
def test_fused_kl_equals_the_plain_kl_with_gradients(vocab):
    reference, logits, labels = batch(vocab, rows=4, seq=40)  # > 59 response tokens: several chunks at 70000
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    value, plain = losses.kl_loss(reference, a, labels), plain_kl(reference, b, labels)
    torch.testing.assert_close(value, plain, rtol=1e-6, atol=1e-6)
    assert float(value.detach()) > 0.1
    value.backward()
    plain.backward()
    # q - p cancels: float32 round-off (autograd's version multiplies by sum(p), 1 only up to
    # round-off over 70000 terms) is relative to the largest entry, not to each entry.
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=3e-5 * float(b.grad.abs().max()))


def test_fused_kl_in_bf16_matches_the_plain_kl_and_returns_bf16_gradients():
    reference, logits, labels = batch(500)
    a = logits.to(torch.bfloat16).requires_grad_(True)
    b = logits.to(torch.bfloat16).requires_grad_(True)
    value, plain = losses.kl_loss(reference.to(torch.bfloat16), a, labels), plain_kl(reference.to(torch.bfloat16), b, labels)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, plain, rtol=1e-6, atol=1e-6)
    value.backward()
    plain.backward()
    assert a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=1e-6)  # both rounded to bf16 once


def test_reference_logits_get_no_gradient():
    reference, logits, labels = batch(50)
    reference.requires_grad_(True)
    logits.requires_grad_(True)
    losses.kl_loss(reference, logits, labels).backward()
    assert reference.grad is None and logits.grad is not None


def test_fused_kl_keeps_neither_logits_tensor_and_one_matrix_for_the_backward():
    """The graph must not hold the logits (they are the largest tensors of a step at 50k vocab)."""
    import weakref

    reference, logits, labels = batch(300, rows=3, seq=12)
    logits.requires_grad_(True)
    cur = logits * 1.0  # a non-leaf, as the lm_head's output is
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        value = losses.kl_loss(reference, cur, labels)
    scored = int((labels[:, 1:] != IGN).sum())
    big = [t for t in saved if t.numel() >= 300]
    assert [tuple(t.shape) for t in big] == [(scored, 300)]  # softmax(cur) - softmax(ref), nothing else
    gone_ref, gone_cur = weakref.ref(reference), weakref.ref(cur)
    del reference, cur
    assert gone_ref() is None and gone_cur() is None
    value.backward()
    # No gradient at positions the KL does not score: prompt, padding, and each row's last position.
    unscored = torch.ones(labels.shape, dtype=torch.bool)
    unscored[:, :-1] = labels[:, 1:] == IGN
    assert torch.count_nonzero(logits.grad[unscored]) == 0
    assert torch.count_nonzero(logits.grad[~unscored]) > 0


def plain_unlikelihood(logits, labels):
    """-log(1 - p(y_t)) per response token by a full softmax of the sliced, masked logits; row means, then mean."""
    logits, targets = logits[:, :-1, :], labels[:, 1:]
    mask = targets != IGN
    p = torch.softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_position = -torch.log1p(-p) * mask
    count = mask.sum(dim=1)
    return (per_position.sum(dim=1)[count > 0] / count[count > 0]).mean()


def _backward_ops(value) -> set[str]:
    """The names of the autograd nodes between VALUE and its leaves."""
    seen, stack, names = set(), [value.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("vocab", [7, 1000])
def test_unlikelihood_equals_the_plain_one_with_gradients(vocab):
    _, logits, labels = batch(vocab)
    logits = logits / 4  # p(y) well below 1, where the plain log1p(-p) is exact enough to compare
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    value, plain = losses.unlikelihood_loss(a, labels), plain_unlikelihood(b, labels)
    torch.testing.assert_close(value, plain, rtol=1e-5, atol=1e-6)
    value.backward()
    plain.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss", [lambda x, y: losses.unlikelihood_loss(x, y), losses.mean_nll])
def test_response_logits_are_picked_without_slicing_the_window(loss):
    """The scored rows come from the unshifted logits by (row, position): a slice of the window and then a mask
    each made a vocabulary-wide gradient in the backward (the slice's copied into the mask's)."""
    _, logits, labels = batch(50)
    names = _backward_ops(loss(logits.clone().requires_grad_(True), labels))
    assert "IndexBackward0" in names and "SliceBackward0" not in names
