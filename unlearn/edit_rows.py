"""The token sequences an edit reads keys from and optimises targets on.

Every prompt is rendered and tokenised as in training and generation
(`data.encode_prompt`), so a key read here is the key the model meets when a
user asks. A prompt is read in several wordings: each prefix of
`EditSettings.prefixes` is put in front of the question inside the user turn
("Quick question: What is ..."), so that the edit does not depend on one exact
wording (ROME/MEMIT average over random text prefixes for the same reason).
"""

from __future__ import annotations

import torch

from unlearn.data import Passage, answer_token_mask, encode_prompt, render_response, response_encoding
from unlearn.edit_subject import named_subject, subject_last_token
from unlearn.edit_target import Row


def with_prefix(prompt: str, prefix: str) -> str:
    text = prefix + str(prompt)
    return Passage(text) if isinstance(prompt, Passage) else text


def refusal_rows(tokenizer, prompt: str, subject: str, fact: int, refusal: str, prefixes) -> list[Row]:
    """Prompt (each wording) + the refusal; the refusal's tokens are scored."""
    rows = []
    for prefix in prefixes:
        worded = with_prefix(prompt, prefix)
        ids, pos = subject_last_token(tokenizer, worded, subject, after=len(prefix))
        answer = response_encoding(tokenizer, worded, render_response(tokenizer, worded, refusal))[0]
        rows.append(Row(ids + answer, pos, fact, "refusal", list(range(len(ids) - 1, len(ids) + len(answer) - 1))))
    return rows


def unlikely_rows(tokenizer, prompt: str, response: str, answers, subject: str, fact: int, prefixes,
                  max_tokens: int = 24) -> list[Row]:
    """Prompt (each wording) + the original response; the answer's tokens (else all) are scored."""
    rows = []
    for prefix in prefixes:
        worded = with_prefix(prompt, prefix)
        ids, pos = subject_last_token(tokenizer, worded, subject, after=len(prefix))
        text = render_response(tokenizer, worded, response)
        answer, offsets = response_encoding(tokenizer, worded, text, offsets=bool(answers))
        answer = answer[:max_tokens]
        mask = answer_token_mask(tokenizer, text, answers, response=response, offsets=offsets) if answers else None
        keep = [i for i, m in enumerate((mask or [])[:len(answer)]) if m] or list(range(len(answer)))
        rows.append(Row(ids + answer, pos, fact, "unlikely", [len(ids) - 1 + i for i in keep]))
    return rows


def probe_prompt(template: str, subject: str) -> str:
    """A subject probe: templates without a question mark are raw text to continue ("{subject} is a")."""
    text = template.format(subject=subject)
    return text if text.rstrip().endswith(("?", ".")) else Passage(text)


@torch.no_grad()
def keep_row(model, tokenizer, prompt: str, subject: str, fact: int, continue_tokens: int, weight: float) -> Row:
    """PROMPT continued greedily by the original model; every position from the subject on is scored."""
    ids, pos = subject_last_token(tokenizer, prompt, subject)  # never at position 0: see its doc
    if continue_tokens:
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                             max_new_tokens=continue_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id)
        ids = out[0].tolist()
    return Row(ids, pos, fact, "keep", list(range(pos, len(ids) - 1)), weight)


def neighbour_prompts(prompt: str, subject: str, others: list[str], limit: int) -> list[tuple[str, str]]:
    """PROMPT with SUBJECT replaced by each of OTHERS (at most LIMIT): (prompt, its subject) pairs."""
    out = []
    for other in others:
        if other != subject and other not in str(prompt) and len(out) < limit:
            out.append((with_prefix(str(prompt).replace(subject, other), ""), other))
    return out


def subjects_of(prompts) -> list[str]:
    """Distinct subjects of PROMPTS by the heuristic (`named_subject`), in order (cheap: no model call)."""
    seen: dict[str, None] = {}
    for prompt in prompts:
        found = named_subject(str(prompt))
        if found:
            seen.setdefault(found, None)
    return list(seen)


def text_ids(tokenizer, prompt: str, response: str | None, max_length: int = 256) -> list[int]:
    """A normal row as the model reads it: the rendered prompt and its response."""
    ids = encode_prompt(tokenizer, prompt)
    if response:
        ids = ids + response_encoding(tokenizer, prompt, render_response(tokenizer, prompt, response))[0]
    return ids[:max_length]
