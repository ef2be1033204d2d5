"""Batched generation: left padding, KV cache, stop at EOS.

Prompts are tokenised exactly as in training (`data.encode_prompt`), sorted by
length so that a batch holds prompts of similar length (less padding, less
wasted compute), and the outputs are put back in the caller's order.
"""

from __future__ import annotations

import sys

from unlearn.data import encode_prompt


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def generate(model, tokenizer, prompts: list[str], *, batch_size: int = 16, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             desc: str | None = None) -> list[str]:
    """Generate an answer for each raw prompt (rendered inside); greedy unless DO_SAMPLE."""
    import torch
    from tqdm import tqdm

    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    try:
        for batch in tqdm(batches, desc=desc or "generating", unit="batch", file=sys.stderr,
                          disable=desc is False or len(batches) < 2, leave=False):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
                ids = encoded[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention[row, width - len(ids):] = 1
            with torch.no_grad():
                generated = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=_stop_ids(model, tokenizer),
                    use_cache=True, **sampling,
                )
            for row, i in enumerate(batch):
                outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return outputs
