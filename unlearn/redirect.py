"""`--forget-loss redirect`: which tokens a forget position may not move its probability to.

The redirect loss (losses.redirect_loss) pulls each scored forget position towards the
original model's own next-token distribution with the answer taken out: the original's
second choices ("Albert" → "Schweitzer" rather than "Einstein"), a fluent wrong answer. The
unlikelihood loss only pushes the answer down and leaves to chance where the probability
goes; pushed hard (the stop margin's doubling weight), it went to whatever the model had
at hand, "Albert Albert Albert ..." on the test scenario `einstein`. (Redirect does not cure
that one: after "Albert" the original's second choices are other first names. Opt-in: on the
dev split it kept more neighbours, but the README command took a step more; docs/quality.md,
"Redirect".)

Taking out the answer's own token is not enough: a byte-level BPE spells a word many ways,
and the original's second choice after "Albert" may well be " Ein" (then "stein"), which
the leak judge reads as "Einstein" again. So a position's banned tokens are every token
whose text, leading whitespace dropped, is a non-empty prefix of the answer's remaining
text from that position (both NFKC-normalised and case-folded, as the leak judge compares; the
judge also drops accents, which `_fold` does not):
" Ein", "Ein", " E", " einstein", ... at the first token of " Einstein". Tokens made of
whitespace alone are not banned (they would be banned at every position; the original
gives them next to nothing inside a word). The remaining text is the rest of the scored
run (the answer span; rows scored whole are not redirected), at most REMAINDER_CHARS tokens
decoded and cut at REMAINDER_CHARS characters: no token of these vocabularies is longer.
A position inside a character's bytes (a byte-level BPE spells "М" or "北" in pieces) bans
its label only: its remainder decodes to U+FFFD, the text of every lone byte token.
"""

from __future__ import annotations

import unicodedata

from unlearn.losses import IGNORE_INDEX

REMAINDER_CHARS = 32


def _fold(text: str) -> str:
    # NFKC and case only: the leak judge also takes accents off (`metrics.fold_char`, so " Zur" reads as
    # "Zürich"), but folding them here would ban every accented "e" token at an answer starting with "e", a
    # change to the default loss (spellings) that has not been measured.
    return unicodedata.normalize("NFKC", text).casefold()


class PrefixIndex:
    """Every token of a tokenizer's vocabulary by its folded text (leading whitespace dropped)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(size)])
        self.by_text: dict[str, list[int]] = {}
        for token, text in enumerate(texts):
            key = _fold(text.lstrip())
            if key:
                self.by_text.setdefault(key, []).append(token)

    def spelling(self, remainder: str) -> set[int]:
        """The tokens whose text starts REMAINDER: its non-empty prefixes, looked up."""
        folded = _fold(remainder.lstrip())[:REMAINDER_CHARS]
        return {t for k in range(1, len(folded) + 1) for t in self.by_text.get(folded[:k], ())}


def banned_tokens(index: PrefixIndex, row: dict) -> list[tuple[int, int]]:
    """(label position, token) pairs of an encoded forget ROW (`data.encode_pair`): at each
    scored position, its own label and every token that would start spelling what remains of
    the scored run from there."""
    ids, labels = row["input_ids"], row["labels"]
    out: list[tuple[int, int]] = []
    end = len(labels)
    for j in range(len(labels) - 1, -1, -1):  # from the right, so each position knows its run's end
        if labels[j] == IGNORE_INDEX:
            end = j
            continue
        remainder = index.tokenizer.decode(ids[j:min(end, j + REMAINDER_CHARS)])
        # Inside a character's bytes (a byte-level BPE spells "М" or "北" in pieces) the remainder decodes to
        # U+FFFD first, which every lone byte token's text also is: ~300 tokens, none a spelling. The label only.
        spelled = set() if remainder.lstrip().startswith("\ufffd") else index.spelling(remainder)
        out.extend((j, t) for t in sorted(spelled | {labels[j]}))
    return sorted(out)
