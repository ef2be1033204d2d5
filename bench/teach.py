"""Teach invented facts to the embedded model (the TOFU-style "teach, then forget" scenario).

`unlearn` has no "teach" command, so this is a plain torch + transformers full fine-tune:
the rows of bench/scenarios/tofu/teach.jsonl (two phrasings of each of three facts about
16 fictional people), NLL on response tokens only, AdamW, seeded. No normal rows are mixed
in: the scenario's normal set and its unrelated facts are re-derived from the TAUGHT model
(its own answers; the facts it still gets right), so ordinary drift costs nothing but rows. The result is
saved once under $UNLEARN_CACHE/quality/taught-<hash>/ (hash of the data and settings) and
reused; `python bench/teach.py` prints its path.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACH_FILE = ROOT / "bench/scenarios/tofu/teach.jsonl"
# Only the feed-forward weights of the upper layers are trained: the backward pass then stops
# at layer TRAIN_FROM_LAYER, which roughly halves the cost on a shared 2-core machine, and
# invented facts need no more than that to be memorised.
SETTINGS = {"epochs": 6, "lr": 2e-4, "batch_size": 8, "seed": 0, "weight_decay": 0.0, "train_from_layer": 16}


def cache_root() -> Path:
    return Path(os.environ.get("UNLEARN_CACHE", Path.home() / ".cache/unlearn")) / "quality"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def taught_dir() -> Path:
    digest = hashlib.sha256()
    digest.update(TEACH_FILE.read_bytes())
    digest.update(json.dumps(SETTINGS, sort_keys=True).encode())
    return cache_root() / f"taught-{digest.hexdigest()[:12]}"


def encode(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one chat turn; labels are -100 outside the response."""
    prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], tokenize=False)
    assert full.startswith(prompt_text)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt_text):].rstrip("\n"), add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def teach(log=lambda m: print(m, file=sys.stderr)) -> Path:
    out = taught_dir()
    if (out / "config.json").exists():
        return out
    import torch
    from unlearn.models import load_model

    torch.manual_seed(SETTINGS["seed"])
    rng = random.Random(SETTINGS["seed"])
    loaded = load_model(None)
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = read_jsonl(TEACH_FILE)
    examples = [encode(tokenizer, r["prompt"], r["response"]) for r in rows]
    trained = []
    for index, layer in enumerate(model.model.layers):
        for p in layer.parameters():
            p.requires_grad_(False)
        if index >= SETTINGS["train_from_layer"]:
            for p in layer.mlp.parameters():
                p.requires_grad_(True)
                trained.append(p)
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)
    optimiser = torch.optim.AdamW(trained, lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"])
    model.train()
    pad = tokenizer.pad_token_id
    for epoch in range(SETTINGS["epochs"]):
        order = list(range(len(examples)))
        rng.shuffle(order)
        total = 0.0
        for start in range(0, len(order), SETTINGS["batch_size"]):
            batch = [examples[i] for i in order[start:start + SETTINGS["batch_size"]]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (x, y) in enumerate(batch):  # right padding: training needs no generation alignment
                ids[row, :len(x)] = torch.tensor(x)
                labels[row, :len(y)] = torch.tensor(y)
                mask[row, :len(x)] = 1
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimiser.step()
            optimiser.zero_grad()
            total += loss.item() * len(batch)
        log(f"teach: epoch {epoch + 1}/{SETTINGS['epochs']} mean loss {total / len(examples):.3f}")
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(out)
    return out


if __name__ == "__main__":
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(teach())
