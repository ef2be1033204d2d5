"""Likelihood scoring that starts where a pair parts from the model's own earlier answer to its prompt.

The after measurement scores the unlearned model's answers under the original model (fluency,
`evaluate._fluency`): each a forward pass over the rendered prompt and the answer. The original
model ran that prompt already when it generated its own answer, and the two answers often open
alike (a changed name late in a sentence). Generation can keep each answer's keys and values
(`generation.generate`'s KEEP_KV, in `Scored.kv`); a pair whose tokens begin with the prompt and
then agree with that answer for a while needs a forward only from where they part:

- the keys and values of the first F positions come from the kept cache;
- the log-probabilities of the pair's response tokens up to position F are the answer's own
  (`Scored.logprobs`: the same tokens after the same context);
- the tokens from position F on run as a continuation of that cache, and their logits give
  the rest.

F is where the pair and the kept answer part, less one: the last shared token must run again for
the logits of the first different one (and F is at most the kept positions). The numbers are the
whole pass's up to float rounding (other matmul shapes, as with the thread count):
tests/test_continued_scoring.py compares them.

Measured on the README command's model after its run (its forget, paraphrase, held-out and normal
prompts, 32 and 48 tokens): 60 of 85 answers differ from the original's; they have 1,024 prompt
positions beyond the shared system message and 2,512 answer tokens, 991 of which open like the
original's answer. Scored this way, 1,581 positions run instead of 3,536 (and logits at 1,581
instead of 2,512).
"""

from __future__ import annotations

from collections.abc import Sequence


def resume_point(feature: dict, own) -> int:
    """Where scoring FEATURE (an `data.encode_pair` row) can start from OWN (a `generation.Scored` with
    kept keys and values): the position F of the first token to run; 0 when it cannot (no kept cache, or
    the pair's prompt is not the one generation saw: cut for length, or another template)."""
    from unlearn.data import IGNORE_INDEX

    if own is None or not own.kept_positions() or own.prompt_ids is None:
        return 0
    ids, labels, prompt = feature["input_ids"], feature["labels"], own.prompt_ids
    first = next((p for p, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
    if first != len(prompt) or ids[:first] != prompt:
        return 0
    agree = first
    for token, generated in zip(ids[first:], own.ids):
        if token != generated:
            break
        agree += 1
    return max(0, min(agree - 1, own.kept_positions(), len(ids) - 1))


def resumable(tokenizer, pairs: list[tuple[str, str]], contexts: dict, max_length: int | None = None
              ) -> dict[int, tuple]:
    """Index -> (encoded pair, its context's `Scored`, where to resume) for the PAIRS that CONTEXTS (pair ->
    the scoring model's own answer to its prompt) lets continue from a kept cache (`resume_point`). Pairs
    are cut to MAX_LENGTH (default SCORE_MAX_LENGTH; `evaluate.score_max_length` of the scoring model, so
    that a pair never passes an OPT's position table) as `response_logprobs` cuts them."""
    from unlearn.data import encode_pair
    from unlearn.evaluate import SCORE_MAX_LENGTH

    found = {}
    for i, pair in enumerate(pairs):
        if pair in contexts:
            feature = encode_pair(tokenizer, *pair, max_length or SCORE_MAX_LENGTH)
            start = resume_point(feature, contexts[pair])
            if start:
                found[i] = (feature, contexts[pair], start)
    return found


def continued_logprobs(model, pad_id: int, items: Sequence[tuple[dict, object, int]], batch_size: int = 16
                       ) -> list[list[float]]:
    """log p of every labelled token of each (feature, own, F) item (F from `resume_point`, at least 1),
    in position order, as `evaluate.labelled_logprobs` computes them; the items sorted by the length
    left to run into batches of BATCH_SIZE, dealt out to the CPU's threads (cpu_parts.dealt_batches)."""
    from unlearn.cpu_parts import dealt_batches

    order = sorted(range(len(items)), key=lambda i: len(items[i][0]["input_ids"]) - items[i][2])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def work(share: list[int]) -> list:
        return [v for lo in range(0, len(share), batch_size)
                for v in _batch([items[i] for i in share[lo:lo + batch_size]], model, pad_id)]

    return dealt_batches(model, batches, work) if items else []


def _batch(items: list, model, pad_id: int) -> list[list[float]]:
    """`continued_logprobs` of one batch: every row's kept positions left-padded to the longest, its
    tokens from F on right-padded after them, one forward."""
    import torch

    from unlearn.data import IGNORE_INDEX
    from unlearn.kv_cache import cache_argument, evaluating, new_cache

    device = next(model.parameters()).device
    starts = [f for _, _, f in items]
    runs = [feature["input_ids"][f:-1] for feature, _, f in items]  # the last token predicts nothing
    kept, width = max(starts), max(map(len, runs))
    results: list[list[float]] = []
    logits = None
    if width:
        cache = new_cache(model, capacity=kept + width)
        shape = items[0][1].kv.shape  # layers x 2 x heads x positions x head size
        for n, layer in enumerate(cache.layers):
            keys = items[0][1].kv.new_zeros((len(items), shape[2], kept, shape[4]))
            values = torch.zeros_like(keys)
            for row, (_, own, f) in enumerate(items):
                keys[row, :, kept - f:], values[row, :, kept - f:] = own.kept_kv(n, f)
            layer.update(keys.to(device), values.to(device))  # kept in host memory (generation._keep_row)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), kept + width), dtype=torch.long)
        for row, (run, f) in enumerate(zip(runs, starts)):
            ids[row, :len(run)] = torch.tensor(run, dtype=torch.long)
            mask[row, kept - f:kept + len(run)] = 1
        # A padding column sits at its row's last real position, not past it: masked out either way, but past a
        # learned position table (OPT's) a short-resumed row beside a long run was an IndexError.
        last = torch.tensor([max(len(run) - 1, 0) for run in runs])[:, None]
        positions = torch.tensor(starts)[:, None] + torch.minimum(torch.arange(width)[None], last)
        with torch.no_grad(), evaluating(model):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           use_cache=True, **{cache_argument(model): cache}).logits
    for row, (feature, own, f) in enumerate(items):
        labels = feature["labels"]
        prompt = len(own.prompt_ids)
        # up to position F: the answer's own log-probabilities (the same tokens after the same context)
        values = [own.logprobs[p - prompt] for p in range(prompt, f + 1) if labels[p] != IGNORE_INDEX]
        if len(runs[row]):  # positions F .. end-1 predict the tokens after them; log p = z_t - logsumexp(z)
            scored = torch.tensor([label != IGNORE_INDEX for label in labels[f + 1:]], device=device)
            targets = torch.tensor(feature["input_ids"][f + 1:], dtype=torch.long, device=device)[scored]
            z = logits[row, :len(runs[row])][scored].float()
            values += (z.gather(-1, targets[:, None])[:, 0] - z.logsumexp(-1)).tolist()
        results.append(values)
    return results
