"""The loss terms, as pure functions of logits, labels and masks.

Conventions shared by every function here:
- `logits` is (batch, seq, vocab) as a causal LM returns it: position t predicts token t+1;
- `labels` is (batch, seq) with IGNORE_INDEX (-100) on prompt and padding tokens, so only
  response tokens count;
- arithmetic is in float32 whatever the model's dtype (log-softmax in bf16 loses the tails
  that a KL is made of).

With NLL(x, y) the mean negative log-likelihood of y's response tokens given x, per sequence,
then averaged over the sequences of the batch (Yao et al., eq. 1-3):
    forget      L_fgt = -NLL(x_fgt, y_fgt)                      (gradient ascent)
       or       L_ul  = mean_t -log(1 - p_theta(y_t | x, y_<t))  (unlikelihood, --forget-loss)
       or       L_sp  = mean_t -log(1 - p_theta(S_t | x, y_<t))  (spellings, --forget-loss), S_t = y_t and
                        every token that starts spelling the rest of the answer from t (redirect.py)
       or       L_rd  = mean_t KL(q_t || p_theta(.|x, y_<t))     (redirect, --forget-loss), q_t the
                        original's distribution with the answer's spellings taken out, renormalised
    mismatch    L_rdn =  NLL(x_fgt, y_rdn)                      (random or templated answer)
    normal      L_nor =  KL(p_orig(.|x_nor) || p_theta(.|x_nor)) (summed over the vocabulary,
                                                                  averaged over response tokens)
    NPO         L_npo = -(2/beta) log sigmoid(-beta (log p_theta(y|x) - log p_orig(y|x)))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _shift(logits: torch.Tensor, labels: torch.Tensor):
    """Align position t's prediction with token t+1; return logits, targets and the response mask."""
    logits = logits[:, :-1, :]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return logits, targets, mask


def _scored_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float32 logits that predict each response token, (response tokens, vocab), their targets, and the
    (batch, seq-1) response mask, in the order of `logits[:, :-1][mask]`.

    Picked from the unshifted logits by (row, position), not sliced and then masked: the backward then
    makes one vocabulary-wide gradient (the pick's), where the slice and the mask made one each and copied
    the one into the other (bench/train_bench.py's step: docs/speed.md, fifty-second session).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX  # position t of logits[:, :-1], which is position t of logits
    b, t = mask.nonzero(as_tuple=True)
    return logits[b, t].float(), targets[b, t], mask


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) at every response position (0 elsewhere), and the response mask; both (batch, seq-1).

    log p(t) = z_t - logsumexp(z), at response positions only: no full-vocabulary
    log-softmax of the whole window is made and kept for the backward pass (a forget
    row focused on its `answers` scores a few positions of a window of dozens).
    """
    scored, targets, mask = _scored_logits(logits, labels)
    picked = scored.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scored, dim=-1)
    out = picked.new_zeros(mask.shape)
    out[mask] = picked
    return out, mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(y | x) of each sequence's response: the sum over its response tokens, shape (batch,)."""
    picked, _ = token_logprobs(logits, labels)
    return picked.sum(dim=1)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL per sequence: minus the mean log-probability of its response tokens, shape (batch,).

    A sequence with no response token (truncated away) gets NaN so that callers notice;
    `mean_nll` leaves such rows out.
    """
    picked, mask = token_logprobs(logits, labels)
    count = mask.sum(dim=1)
    nll = -picked.sum(dim=1) / count.clamp(min=1)
    return torch.where(count > 0, nll, torch.full_like(nll, float("nan")))


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL(x, y): per-sequence mean over response tokens, then mean over the batch's sequences.

    Averaging per sequence first gives every example the same weight, whatever its length.
    """
    picked, mask = token_logprobs(logits, labels)
    return _mean_of_row_means(-picked, mask)


def _mean_of_row_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """VALUES (batch, seq; 0 outside MASK) averaged over each row's MASK positions, then over the rows.

    Rows without response tokens are left out; a NaN from the logits themselves (a diverged
    model) stays in, so that the training loop sees it and stops.
    """
    count = mask.sum(dim=1)
    valid = count > 0
    if not valid.any():
        raise ValueError("no response tokens in this batch (is --max-length too small?)")
    return (values.sum(dim=1)[valid] / count[valid]).mean()


def forget_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_fgt = -NLL(x_fgt, y_fgt): minimising it is gradient ascent on the forget responses."""
    return -mean_nll(logits, labels)


def unlikelihood_loss(logits: torch.Tensor, labels: torch.Tensor, banned: torch.Tensor | None = None) -> torch.Tensor:
    """L_ul = mean over response tokens of -log(1 - p(y_t)), per sequence, then over the batch's sequences.

    Minimising it pushes the forget tokens down, as ascent does, but with a push that fades as
    they go: d L_ul / d z_y = p(y), where ascent's d(log p(y)) / d z_y = 1 - p(y) is largest for a
    token already unlikely. So a row that no longer leaks stops pulling the update, and the keep
    terms (KL) take over (docs/quality.md, "Unlikelihood").

    log(1 - p(y)) = logsumexp over the other tokens - logsumexp over all: exact when p(y) rounds
    to 1 in float32 (where log(1 - exp(log p)) would be log 0), and its gradient flows.

    BANNED, a (n, 3) long tensor of (row, label position, token) as `redirect_loss` takes it
    (`--forget-loss spellings`): at those positions y_t stands for the set {y_t} and the listed
    tokens, -log(1 - p(set)): the answer's other spellings (" Tok", "To", " tok" at " Tokyo") are
    pushed down with the one its response spells. Positions without a listed token are unchanged.
    """
    scored, targets, mask = _scored_logits(logits, labels)
    also = None
    if banned is not None and banned.numel():
        rows = _scored_rows(mask)[banned[:, 0], banned[:, 1] - 1]  # label position j is predicted at j - 1
        also = (rows[rows >= 0], banned[rows >= 0, 2])
    per_position = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    per_position[mask] = unlikelihood_per_token(scored, targets, also)
    return _mean_of_row_means(per_position, mask)


def _scored_rows(mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq-1) long: each scored position's row in `logits[mask]`, -1 at the others."""
    position = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    position[mask] = torch.arange(int(mask.sum()), device=mask.device)
    return position


def unlikelihood_per_token(scored: torch.Tensor, targets: torch.Tensor,
                            also: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """-log(1 - p(target)) of each row of SCORED (tokens, vocab) logits; with ALSO, (rows, tokens),
    those tokens count with their row's target."""
    others = scored.scatter(-1, targets.unsqueeze(-1), float("-inf"))
    if also is not None:
        others[also] = float("-inf")
    return torch.logsumexp(scored, dim=-1) - torch.logsumexp(others, dim=-1)


def redirect_loss(reference_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                  banned: torch.Tensor, redirected: torch.Tensor | None = None) -> torch.Tensor:
    """L_rd = mean over response tokens of KL(q_t || p_theta), per sequence, then over the batch's sequences.

    q_t is the original's next-token distribution at response position t with the banned tokens
    taken out and the rest renormalised: q_v = p_orig(v) / (1 - p_orig(banned)) for v not
    banned, 0 for banned v. Banned are the label's own token and BANNED, a (n, 3) long tensor of
    (row, label position, token): the tokens that would spell the answer otherwise (redirect.py).

    The minimum, 0, is the original model minus the answer: a fluent second choice where the
    answer was. Where the model is still the original, KL(q || p_orig) = -log(1 - p_orig(banned)),
    the unlikelihood of the banned set: the first step's loss. The gradient, d L / d z =
    p_theta - q, is bounded whatever the weight, unlike ascent's, and unlike unlikelihood's it
    says where the probability goes.

    KL(q || p) = sum_v q_v (log q_v - log p_v), with 0 log 0 = 0 at the banned tokens.

    REDIRECTED (batch,) bool, if given: the rows that take this loss; the others take
    unlikelihood's -log(1 - p) per token (the forget rows whose every response token is scored:
    a second choice at every token of a passage is the same passage reworded).
    """
    _, targets, mask = _shift(logits, labels)
    if not mask.any():
        raise ValueError("no response tokens in this batch (is --max-length too small?)")
    position = _scored_rows(mask)
    b, t = mask.nonzero(as_tuple=True)
    ref = reference_logits.detach()[b, t].float()
    ref[torch.arange(ref.shape[0], device=ref.device), targets[mask]] = float("-inf")  # the answer's own token
    if banned.numel():
        rows = position[banned[:, 0], banned[:, 1] - 1]  # label position j is predicted at position j - 1
        ref[rows[rows >= 0], banned[rows >= 0, 2]] = float("-inf")
    log_q = torch.log_softmax(ref, dim=-1)
    q = log_q.exp()
    scored = logits[b, t].float()
    per_token = (torch.special.xlogy(q, q) - q * torch.log_softmax(scored, dim=-1)).sum(dim=-1)
    if redirected is not None:
        per_token = torch.where(redirected[b], per_token, unlikelihood_per_token(scored, targets[mask]))
    per_position = per_token.new_zeros(mask.shape)
    per_position[mask] = per_token
    return _mean_of_row_means(per_position, mask)


def mismatch_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_rdn = NLL(x_fgt, y_rdn): plain likelihood of a random (or templated) answer to a forget prompt."""
    return mean_nll(logits, labels)


def kl_loss(reference_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_nor = KL(p_orig || p_theta) at response positions, summed over the vocabulary, averaged over tokens.

    KL(p || q) = sum_v p_v (log p_v - log q_v): a true KL, zero when the models agree (a
    cross-entropy against p_orig would not be, it would carry p_orig's entropy).
    Averaged over all response tokens of the batch.
    """
    mask = labels[:, 1:] != IGNORE_INDEX  # position t (of logits[:, :-1]) predicts label t+1
    if not mask.any():
        raise ValueError("no response tokens in this batch (is --max-length too small?)")
    # Rows of the (batch * seq, vocab) view of the logits at the scored positions: indices, not
    # a masked copy, so neither logits tensor is copied (each is ~batch x seq x 50k floats).
    batch, seq = labels.shape
    b, t = mask.nonzero(as_tuple=True)
    rows = b * seq + t
    return _TokenKL.apply(reference_logits.detach(), logits, rows).mean()


class _TokenKL(torch.autograd.Function):
    """Per-row KL(softmax(ref) || softmax(cur)) over the ROWS of two (batch, seq, vocab) logit tensors.

    The same arithmetic as log-softmax both, subtract, weight, sum, but over chunks of
    rows, and the gradient, d KL / d cur = softmax(cur) - softmax(ref) (the reference
    probabilities sum to 1), is made in the forward pass from the chunk's log-softmaxes
    and kept, in the logits' dtype: one (rows, vocab) matrix is all that is kept for the
    backward. Neither logits tensor is kept, so both are freed as soon as the caller
    drops them (the reference's right after the loss), and no vocabulary-wide float32
    intermediate outlives its chunk. Its gradient to `cur` is zero outside ROWS.
    """

    @staticmethod
    def _chunks(n: int, vocab: int):
        rows = max(1, (1 << 22) // max(vocab, 1))  # ~16 MiB of float32 per intermediate
        return ((i, min(i + rows, n)) for i in range(0, n, rows))

    @staticmethod
    def forward(ctx, ref: torch.Tensor, cur: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        vocab = cur.shape[-1]
        ref_flat, cur_flat = ref.reshape(-1, vocab), cur.reshape(-1, vocab)  # views of contiguous logits
        out = torch.empty(rows.shape[0], dtype=torch.float32, device=cur.device)
        diff = torch.empty(rows.shape[0], vocab, dtype=cur.dtype, device=cur.device)
        for i, j in _TokenKL._chunks(rows.shape[0], vocab):
            ref_logp = torch.log_softmax(ref_flat.index_select(0, rows[i:j]).float(), dim=-1)
            cur_logp = torch.log_softmax(cur_flat.index_select(0, rows[i:j]).float(), dim=-1)
            ref_p = ref_logp.exp()
            # In place from here: each vocabulary-wide temporary is a fresh block to fault in.
            log_ratio = ref_logp.sub_(cur_logp)  # log p_ref - log p_cur
            torch.sub(cur_logp.exp_(), ref_p, out=diff[i:j])  # p_cur - p_ref, rounded once to the logits' dtype
            out[i:j] = ref_p.mul_(log_ratio).sum(dim=-1)
        ctx.save_for_backward(diff, rows)
        ctx.cur_shape = cur.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        diff, rows = ctx.saved_tensors
        grad_cur = diff.new_zeros(ctx.cur_shape)
        flat = grad_cur.view(-1, diff.shape[-1])
        for i, j in _TokenKL._chunks(*diff.shape):
            flat.index_copy_(0, rows[i:j], (grad[i:j, None] * diff[i:j]).to(diff.dtype))
        return None, grad_cur, None


def npo_loss(logprob: torch.Tensor, reference_logprob: torch.Tensor, beta: float = 0.1,
             scored: torch.Tensor | None = None) -> torch.Tensor:
    """Negative preference optimisation (Zhang et al. 2024), averaged over the batch's SCORED rows.

    L = -(2/beta) log sigmoid(-beta (log p_theta(y|x) - log p_orig(y|x))), with sequence
    log-probabilities (sums over response tokens). At the start (theta = orig) it equals
    (2/beta) log 2 and its gradient is that of ascent on the sequence log-probability log p(y|x):
    |y| times `forget_loss`'s on that row, whose ascent is a per-token mean, so a long response pulls
    harder here than under ga; it flattens as p_theta(y|x) drops below p_orig(y|x), which is what keeps
    NPO from collapsing.

    SCORED (`scored_rows`; default every row): the rows that have a response token. One without
    (its answer cut off by --max-length) has log-probabilities 0 on both sides, so it would add the
    constant (2/beta) log 2 and dilute the others' gradient; it is left out, as every other loss
    leaves it out (`_mean_of_row_means`).
    """
    if scored is not None:
        if not scored.any():
            raise ValueError("no response tokens in this batch (is --max-length too small?)")
        logprob, reference_logprob = logprob[scored], reference_logprob[scored]
    return (-(2.0 / beta) * F.logsigmoid(-beta * (logprob - reference_logprob))).mean()


def scored_rows(labels: torch.Tensor) -> torch.Tensor:
    """(batch,) bool: the rows with at least one response token (position t predicts label t+1, so
    the first label never counts, as in `token_logprobs`)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=1)
