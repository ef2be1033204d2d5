"""JSONL examples: read and validate, render with one template, tokenise with response-only labels.

A line is one JSON object: `{"prompt", "response"}` (aliases `question/answer`,
`instruction/output`), or `{"text"}` for a raw passage, which is split into a
prefix (the prompt) and its continuation (the response) — the copyright
extraction setting of Yao et al.: that split is the leak test. With
--whole-passage the forget loss trains on more of a passage (`forget_pair`):
every token after its first word. Other fields (`answers`, `paraphrased_response`, ...) ride along in
`Example.extra` for evaluation; a field whose name misses one the tool reads (`Answers`) is refused (`misspelt`).

Every bad line is reported as `FILE:LINE: what is wrong`, and files are read
before any model loads, so a typo costs a second, not a model load.

Rendering is the same for forget, normal and evaluation data: the tokenizer's
chat template when it has one, else `### Question: ...\\n### Answer: ...`.
Yao et al. warn that a format that differs between forget and normal data lets
the model learn the format instead of the behaviour.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import stat
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from unlearn.errors import UnlearnError
from unlearn.metrics import answer_spans, no_space_script
from unlearn.spans import DERIVED_KEY, whole_names  # spans imports data only inside functions: no cycle

PROMPT_KEYS = ("prompt", "question", "instruction")
RESPONSE_KEYS = ("response", "answer", "output")
ALPACA_INPUT = "input"  # beside `instruction`: the text it acts on, joined to the prompt (`_with_alpaca_input`)
# The optional fields some part of the tool reads (README, "Optional fields"; docs/eval.md), kept in `Example.extra`.
OPTIONAL_FIELDS = ("answers", "subject", "refusal_markers", "paraphrased_response", "perturbed_responses",
                   "hallucinated_response")
# TOFU's names for the truth ratio's two fields (its `*_perturbed` files), read as ours: a TOFU file scored without
# renaming, where they were ignored and the truth ratio silently left out.
TOFU_FIELDS = {"paraphrased_answer": "paraphrased_response", "perturbed_answer": "perturbed_responses"}
# The fields a plural's `s` does not make another (`data.misspelt`): they name a list, a subject or a prompt. A
# response's plural is a column of its own in many datasets (`responses`, several answers to rank).
PLURAL_READY = frozenset(OPTIONAL_FIELDS + tuple(TOFU_FIELDS) + PROMPT_KEYS + ("text",))
# Fields unlearn writes into the row files it saves (probes.jsonl, augmented.jsonl, saved generations, the derived
# spans), which a user may read back as rows: never taken for a misspelling of a field it reads.
WRITTEN_FIELDS = ("set", "reference", "forget_line", "replacement", "dropped", "kind", "source_prompt",
                  "source_line", "prompt_from", "response_from", "line", "source", "spans", "rule", "loss_prompt",
                  "loss_response", "loss_spans", "step")
IGNORE_INDEX = -100  # label value that torch's cross-entropy (and our losses) skip

# The answer's leading space belongs to the response, so its first word tokenises as in running text.
FALLBACK_PROMPT = "### Question: {prompt}\n### Answer:"
# Where a model's answer in that format ends: the next turn it starts (`answer_in_format`). A base model (OPT, GPT-2,
# Pythia: no chat template) was never taught an end-of-text after such an answer; it writes "\n### Question: ..."
# next (or a turn of its own, "\n#### Answer:"), and invents that turn's answer too, which every metric would read.
# A whole marker, not "\n###": an answer may hold a Markdown heading ("### Author"), which cut there read as no leak.
FALLBACK_TURN = re.compile(r"\n#{3,} ?(?:Question|Answer):")
# The start of such a marker that the token budget cut while it was written, at the end of an answer ("\n### Qu",
# "\n##"; a finished two-# line is a heading).
_CUT_TURN = re.compile(r"\n(?:##|#{3,} ?(\w*):?)$")


class Passage(str):
    """A passage prefix: continued as raw text, not answered as a chat turn.

    Copyright extraction asks a model to continue a text; wrapping the prefix in a
    chat template would make an instruct model reply instead of continue (and a
    leak would go unmeasured). A str subclass, so the marker travels with the
    prompt through every caller unchanged.
    """

    __slots__ = ()


#: The `Example.extra` key where a row read from one of several files that make one set (--retain A
#: --retain B) keeps its file's name, so that a message about the row names its own file.
SOURCE_FILE = "source_file"


@dataclass
class Example:
    prompt: str
    response: str | None
    line: int
    extra: dict = field(default_factory=dict)

    @property
    def is_passage(self) -> bool:
        return isinstance(self.prompt, Passage)


def passage_words(text: str) -> tuple[list[str], list[str]]:
    """A passage's words and the gaps between them (len(gaps) == len(words) - 1).

    Words are what single spaces separate; a passage with no space at all (one word per line,
    tab-separated) is cut at its runs of any whitespace instead, where the space rule would make
    the whole passage one word: prefix everything, continuation nothing, so that the forget loss
    trained on nothing and no answer could ever leak it. A passage written mostly in a script without
    spaces between words (Chinese, Japanese) has a word per character of that script (other runs of
    characters are words, whitespace the gaps): its "first half" is half its characters, not whatever
    its one Latin name's space cuts off.
    """
    letters = [ch for ch in text if not ch.isspace()]
    if sum(map(no_space_script, letters)) * 2 > len(letters):
        words, gaps, gap = [], [], ""
        kind = lambda ch: "gap" if ch.isspace() else "unspaced" if no_space_script(ch) else "run"  # noqa: E731
        for what, group in itertools.groupby(text, key=kind):
            run = "".join(group)
            if what == "gap":
                gap = run
                continue
            # a character of the script is a word; a run of other characters ("iPhone", "2007") is one
            for word in (run if what == "unspaced" else [run]):
                if words:
                    gaps.append(gap)
                words.append(word)
                gap = ""
        return words, gaps
    if " " in text:
        words = text.split(" ")
        return words, [" "] * (len(words) - 1)
    parts = re.split(r"(\s+)", text)
    return parts[0::2], parts[1::2]


def join_words(words: list[str], gaps: list[str]) -> str:
    """WORDS with GAPS between them, `passage_words`' inverse."""
    return "".join(w + g for w, g in zip(words, gaps)) + (words[-1] if len(words) > len(gaps) else "")


def cut_words(words: list[str], gaps: list[str], cut: int) -> tuple[str, str]:
    """The text of WORDS and GAPS cut after its first CUT words: (prefix, the rest with the gap it starts with).
    One word (read_examples refuses it as a passage) is all prefix, the rest " "."""
    gap = gaps[cut - 1] if gaps else " "
    return join_words(words[:cut], gaps[:cut - 1]), gap + join_words(words[cut:], gaps[cut:])


def split_passage(text: str) -> tuple[str, str]:
    """Split a raw passage at a word boundary: the first half of its words is the prefix.

    Half, capped at 64 words of prefix, so that long passages still leave a long
    continuation to test extraction against.
    """
    words, gaps = passage_words(text)
    return cut_words(words, gaps, max(1, min(len(words) // 2, 64)))


# Where the forget loss starts on a passage with --whole-passage: after its first word, not at the leak test's cut
# (half the words). Extraction can start at any cut point, and a causal LM's loss over a text is
# the sum over all of its cut points, so training on the whole passage pushes down every
# continuation a prefix could ask for; with the second half alone, other cut points still leaked.
# One word is the least context there can be: a tokenizer without BOS (SmolLM2) predicts the
# first token from nothing. 4 and 8 words (keeping the opening that names the subject out of the
# ascent) were tried on the dev split and scored lower (4: within noise): docs/quality.md, "Passages:
# every cut point".
PASSAGE_CONTEXT_WORDS = 1


def forget_pair(example: Example) -> tuple[str, str]:
    """The (prompt, response) the forget loss trains on for EXAMPLE.

    A passage: its first PASSAGE_CONTEXT_WORDS words as the prompt (never more
    than the leak test's prefix) and the rest of the passage as the response, so
    the loss covers every cut point from there on, the leak test's included. Any
    other row: its own prompt and response. Evaluation keeps `split_passage`'s
    prefix and continuation.
    """
    if not example.is_passage:
        return example.prompt, example.response
    words, gaps = passage_words(example.prompt + example.response)  # the passage as read: split_passage's inverse
    prefix, rest = cut_words(words, gaps, min(PASSAGE_CONTEXT_WORDS, len(passage_words(example.prompt)[0])))
    return Passage(prefix), rest


def loss_pair(example: Example, whole_passage: bool) -> tuple[str, str]:
    """The (prompt, response) the forget loss trains on: `forget_pair` under --whole-passage, else the row's own."""
    return forget_pair(example) if whole_passage else (example.prompt, example.response)


def json_type(value) -> str:
    """VALUE's type as JSON names it (the file's language, not Python's: null, not NoneType)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def _pick(obj: dict, keys: tuple[str, ...], where: str, what: str) -> str | None:
    present = [k for k in keys if k in obj]
    if len(present) > 1:
        # `answer` beside `response` is most likely meant as `answers`, the short strings that judge a leak
        hint = (" (short answers that judge a leak go in 'answers', a list)"
                if what == "response" and "answer" in present else "")
        raise UnlearnError(f"{where}: both {present[0]!r} and {present[1]!r} given; use one {what} field{hint}")
    if not present:
        return None
    value = obj[present[0]]
    if not isinstance(value, str):
        raise UnlearnError(f"{where}: {present[0]!r} must be a string, got {json_type(value)}")
    if not value.strip():
        raise UnlearnError(f"{where}: {present[0]!r} is empty")
    return value


def _field_key(name: str) -> str:
    """NAME as a misspelling is compared: case and separators do not count."""
    return re.sub(r"[\W_]+", "", name.casefold())


def _edits(a: str, b: str) -> int:
    """The edit distance between A and B, a swap of two neighbouring letters counting as one edit."""
    rows = [list(range(len(b) + 1))]
    for i, x in enumerate(a, start=1):
        row = [i]
        for j, y in enumerate(b, start=1):
            row.append(min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (x != y)))
            if i > 1 and j > 1 and x == b[j - 2] and a[i - 2] == y:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


@functools.lru_cache(maxsize=4096)  # per field name, not per row: a file's rows share their columns
def misspelt(name: str, fields: tuple[str, ...]) -> str | None:
    """The one of FIELDS that NAME (no field unlearn knows) most likely misspells, else None: the same name but for
    case or separators (`Answers`, `refusal-markers`), or for a plural's `s` where the field names a list, a subject
    or a prompt (`refusal_marker`, `subjects`, `prompts`: PLURAL_READY), or one or two edits (`anwsers`, `reponse`,
    `subjec`, `responsee`; two from nine letters on; fields of five letters or more). A name that extends a field's
    by a digit, a separator, a capital, a plural's `s` or more than one letter is another column of the dataset, not
    a typo (`response_0`, `answerA`, `output_1`, `responses`, `answers_list`, `question_id`)."""
    for known in fields:
        key, target = _field_key(name), _field_key(known)
        if known in PLURAL_READY:  # compared without a plural's s
            key, target = key.removesuffix("s"), target.removesuffix("s")
        if key == target:
            return known
        added = key[len(target):] if key.startswith(target) else ""
        # one lowercase letter typed on after the name (`responsee`) is a typo; anything else it adds is a column
        if added and not (len(added) == 1 and added.isalpha() and added != "s" and name[-1:] == added
                          and name[-2:-1].isalnum()):
            continue
        if len(target) >= 5 and _edits(key, target) <= (1 if len(target) < 9 else 2):
            return known
    return None


# Every field name unlearn reads or writes: never taken for a misspelling.
KNOWN_FIELDS = frozenset(PROMPT_KEYS + RESPONSE_KEYS + OPTIONAL_FIELDS + WRITTEN_FIELDS + tuple(TOFU_FIELDS)
                         + (ALPACA_INPUT, "text", DERIVED_KEY, SOURCE_FILE))


def _refuse_misspelt_fields(obj: dict, where: str) -> None:
    """Refuse, all in one line, the fields that misspell one unlearn reads where that field is absent: ignored, a
    misspelt `answers` left a run judged on derived answers, and a misspelt `response` in an eval file left its
    rows with no reference. A row without its prompt field is refused as such, naming what it missed."""
    no_prompt = "text" not in obj and not any(k in obj for k in PROMPT_KEYS)
    # A prompt field where none is given; a response field ("Answer" beside "question" is its answer, not
    # `answers`) where none is given (a passage's is refused anyway); an Alpaca `input` only beside its `instruction`.
    fields = ((PROMPT_KEYS + ("text",) if no_prompt else ())
              + (() if "text" in obj or any(k in obj for k in RESPONSE_KEYS) else RESPONSE_KEYS) + OPTIONAL_FIELDS
              + tuple(TOFU_FIELDS) + ((ALPACA_INPUT,) if "instruction" in obj else ()))
    misses = [f"{name!r} (did you mean {meant!r}?)" for name in obj if name not in KNOWN_FIELDS
              and (meant := misspelt(name, fields)) and meant not in obj]
    if misses:
        head = f"no prompt: expected one of {', '.join(PROMPT_KEYS)} (or 'text'); " if no_prompt else ""
        raise UnlearnError(f"{where}: {head}unknown field{'s' * (len(misses) > 1)} {', '.join(misses)}: a name this "
                           f"close to one unlearn reads is refused rather than ignored; rename it, or drop it if it "
                           f"is another field")


def _ours(extra: dict, response: str | None) -> dict:
    """EXTRA with TOFU's names for the truth ratio's fields (`TOFU_FIELDS`) replaced by ours, and RESPONSE as the
    paraphrase of a row with perturbed answers and none (TOFU's real_authors and world_facts files: its truth ratio
    reads the answer there). Set here, the response still stands in where a set's references are blanked
    (`--eval-retain`: measure.references)."""
    extra = {TOFU_FIELDS.get(k, k): v for k, v in extra.items()}
    if "perturbed_responses" in extra and "paraphrased_response" not in extra and response is not None:
        extra["paraphrased_response"] = response
    return extra


def _check_extra(obj: dict, where: str) -> None:
    # The field where a row's derived answers are kept once read (`spans.DERIVED_KEY`): taken from a
    # file, it would be trusted as that derivation, or crash the judge when it is not one.
    if DERIVED_KEY in obj:
        raise UnlearnError(f"{where}: {DERIVED_KEY!r} is a field unlearn keeps for itself; rename or drop it")
    answers = obj.get("answers")
    if answers is not None and not (
        isinstance(answers, list) and answers and all(isinstance(a, str) and a.strip() for a in answers)
    ):
        raise UnlearnError(f"{where}: 'answers' must be a non-empty list of non-empty strings")
    markers = obj.get("refusal_markers")
    if markers is not None and not (isinstance(markers, list) and all(isinstance(m, str) and m.strip() for m in markers)):
        raise UnlearnError(f"{where}: 'refusal_markers' must be a list of non-empty strings")
    # An empty answer here would be scored as the end-of-turn token alone (a "probability" of one token) or
    # silently drop the row from the truth ratio: refused, as an empty response is.
    # (each named as the row spells it, ours or TOFU's)
    for key in ("paraphrased_response", "paraphrased_answer", "hallucinated_response"):
        if key in obj and not (isinstance(obj[key], str) and obj[key].strip()):
            got = "an empty string" if isinstance(obj[key], str) else json_type(obj[key])
            raise UnlearnError(f"{where}: {key!r} must be a non-empty string, got {got}")
    for key in ("perturbed_responses", "perturbed_answer"):
        if key in obj and not (isinstance(obj[key], list) and obj[key]
                               and all(isinstance(p, str) and p.strip() for p in obj[key])):
            raise UnlearnError(f"{where}: {key!r} must be a non-empty list of non-empty strings")
    for theirs, ours in TOFU_FIELDS.items():
        if theirs in obj and ours in obj:
            raise UnlearnError(f"{where}: both {ours!r} and {theirs!r} (TOFU's name for it) given; use one")
    # The truth ratio compares the paraphrase (else the response: TOFU's real_authors and world_facts files have
    # none) with the perturbed answers: a paraphrase without them was read by nothing.
    para = next((k for k in ("paraphrased_response", "paraphrased_answer") if k in obj), None)
    if para and not any(k in obj for k in ("perturbed_responses", "perturbed_answer")):
        raise UnlearnError(f"{where}: {para!r} without 'perturbed_responses': the truth ratio compares the two")


def _check_subject(obj: dict, prompt: str, where: str, part: str) -> None:
    """Refuse a `subject` that is not a non-empty string occurring in PROMPT (case-sensitive).

    The subject is found by plain `str.find` in the prompt the model sees (`edit_subject.locate_subject`,
    `probes.probe_subject`); checked here, a typo costs a second instead of a model load. PART names
    that prompt in the message: a passage's is its prefix, so a subject only in the continuation is
    refused too (the edit keys on a prompt token).
    """
    subject = obj.get("subject")
    # A neighbour probe as `unlearn run` saves it (probes.jsonl) names the subject its `replacement` took the
    # place of: that file read back as rows (unlearn eval OUT/probes.jsonl) is not a typo to refuse. Its
    # subject is a name, though: any other `subject` is refused whatever else the row holds.
    if subject is None or ("replacement" in obj and isinstance(subject, str) and subject.strip()):
        return
    if not isinstance(subject, str) or not subject.strip():
        got = "an empty string" if isinstance(subject, str) else json_type(subject)
        raise UnlearnError(f"{where}: 'subject' must be a non-empty string that occurs in the {part}, got {got}")
    if subject not in prompt:
        raise UnlearnError(f"{where}: 'subject' {subject!r} does not occur in the {part}; case matters")


def _parse_passage(obj: dict, where: str, line: int) -> Example:
    """A `text` row: split into prefix and continuation, its other fields checked as a chat row's are."""
    given = [k for k in RESPONSE_KEYS if k in obj]
    if given:  # was ignored: a passage's reference is its own continuation
        raise UnlearnError(f"{where}: {given[0]!r} beside 'text' is not read (a passage's continuation is what it "
                           f"is judged by); short answers go in 'answers', a list, or give a 'prompt' for a chat row")
    text = obj["text"]
    if not isinstance(text, str):
        raise UnlearnError(f"{where}: 'text' must be a string, got {json_type(text)}")
    if len(passage_words(text.strip())[0]) < 2:  # a Chinese or Japanese character is a word here
        raise UnlearnError(f"{where}: 'text' needs at least two words (or characters of a script written without "
                           f"spaces) to split into prefix and continuation")
    prefix, continuation = split_passage(text.strip())
    _check_extra(obj, where)
    # The model is prompted with the prefix only, so that is where a subject must be.
    _check_subject(obj, prefix, where, f"passage's prefix (its first {len(passage_words(prefix)[0])} words)")
    extra = _ours({k: v for k, v in obj.items() if k != "text"}, continuation)
    return Example(Passage(prefix), continuation, line, extra)


def parse_line(obj, where: str, need_response: bool) -> Example:
    if not isinstance(obj, dict):
        raise UnlearnError(f"{where}: expected a JSON object, got {json_type(obj)}")
    line = int(where.rsplit(":", 1)[1])
    _refuse_misspelt_fields(obj, where)
    if "text" in obj and not any(k in obj for k in PROMPT_KEYS):
        return _parse_passage(obj, where, line)
    prompt = _pick(obj, PROMPT_KEYS, where, "prompt")
    if prompt is None:
        raise UnlearnError(f"{where}: no prompt: expected one of {', '.join(PROMPT_KEYS)} (or 'text')")
    prompt = _with_alpaca_input(obj, prompt, where)
    response = _pick(obj, RESPONSE_KEYS, where, "response")
    if response is None and need_response:
        raise UnlearnError(f"{where}: no response: expected one of {', '.join(RESPONSE_KEYS)}")
    _check_extra(obj, where)
    _check_subject(obj, prompt, where, "prompt")
    extra = _ours({k: v for k, v in obj.items() if k not in PROMPT_KEYS + RESPONSE_KEYS + (ALPACA_INPUT,)}, response)
    return Example(prompt, response, line, extra)


def _with_alpaca_input(obj: dict, prompt: str, where: str) -> str:
    """PROMPT with an Alpaca row's `input` (the text its `instruction` acts on) after a blank line, as Alpaca's
    own template puts it; an empty `input` (most Alpaca rows) adds nothing. Dropped, "Translate the sentence"
    was trained and judged without its sentence, and two rows sharing an instruction were one prompt."""
    if ALPACA_INPUT not in obj:
        return prompt
    if "instruction" not in obj:
        raise UnlearnError(f"{where}: {ALPACA_INPUT!r} is read beside 'instruction' only (Alpaca's rows); put its "
                           f"text into the prompt")
    value = obj[ALPACA_INPUT]
    if not isinstance(value, str):
        raise UnlearnError(f"{where}: {ALPACA_INPUT!r} must be a string, got {json_type(value)}")
    return f"{prompt}\n\n{value}" if value.strip() else prompt


def shown(path) -> str:
    """PATH as a message shows it: control characters and line breaks escaped (a newline in a file's name
    cut `name:LINE: what is wrong` to the text before it, since errors are printed as their first line)."""
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in ("Cc", "Zl", "Zp")
                   else ch for ch in str(path))


def _refuse_pipe(path: Path) -> None:
    """Refuse a FIFO or socket (bash's `<(cat rows.jsonl)` is a pipe at /dev/fd/N), and a device.

    An input file is read more than once (its rows, then its SHA-256 for run.json and --resume, then a
    row count), and a pipe is empty after the first read: the run would fail at its very end, or record
    the empty input's hash. /dev/null passes, an empty file; any other device may never end (/dev/zero
    was read until the process was killed for its memory).
    """
    st = path.stat()
    if stat.S_ISFIFO(st.st_mode):
        raise UnlearnError(f"{shown(path)}: is a pipe, which can be read only once; write it to a file first")
    if stat.S_ISSOCK(st.st_mode):
        raise UnlearnError(f"{shown(path)}: is a socket, not a file; write its rows to a file first")
    if (stat.S_ISCHR(st.st_mode) and st.st_rdev != os.stat(os.devnull).st_rdev) or stat.S_ISBLK(st.st_mode):
        raise UnlearnError(f"{shown(path)}: is a device, not a file; write its rows to a file first")


def read_examples(path, *, need_response: bool = True) -> list[Example]:
    """Read and validate a JSONL file; blank lines are skipped; any bad line is one clear error."""
    path = Path(path)
    if not path.exists():
        raise UnlearnError(f"{shown(path)}: no such file")
    if path.is_dir():
        raise UnlearnError(f"{shown(path)}: is a directory, expected a JSONL file")
    _refuse_pipe(path)
    with open(path, "rb") as lines:  # a line at a time: a file read whole was held twice (a 183 MB file took 694 MB)
        examples = [e for number, line_bytes in enumerate(lines, start=1)
                    if (e := _read_line(path, number, line_bytes, need_response)) is not None]
    if not examples:
        empty = not path.is_file() or path.stat().st_size == 0  # (/dev/null is no file, and empty)
        raise UnlearnError(f"{shown(path)}: no examples ({'the file is empty' if empty else 'every line is blank'})")
    return examples


def _read_line(path: Path, number: int, line_bytes: bytes, need_response: bool) -> Example | None:
    """Line NUMBER of PATH as an Example, None for a blank line; a bad line is one clear error."""
    if number == 1:  # a UTF-8 byte-order mark, which Windows editors and spreadsheet exports write first, is no text
        line_bytes = line_bytes.removeprefix(b"\xef\xbb\xbf")
    line_bytes = line_bytes.removesuffix(b"\n")
    where = f"{shown(path)}:{number}"
    # Without a byte-order mark, UTF-16 text has a NUL beside every ASCII character (a JSON line's keys and
    # punctuation at least): valid UTF-8 when the rest is ASCII too, not when it holds "é" or "東".
    bom_less = line_bytes.count(0) * 3 >= len(line_bytes) > 0
    try:
        line = line_bytes.decode("utf-8")
    except UnicodeDecodeError:
        if number == 1 and line_bytes.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 or UTF-32's mark
            raise UnlearnError(f"{where}: UTF-16 or UTF-32 text (Windows PowerShell's `>` writes it); save it as "
                               f"UTF-8") from None
        if bom_less:
            raise UnlearnError(f"{where}: UTF-16 or UTF-32 text without a byte-order mark, by its NUL bytes; save it "
                               f"as UTF-8") from None
        raise UnlearnError(f"{where}: not UTF-8 text (another encoding, such as Latin-1, or a binary file); save "
                           f"it as UTF-8") from None
    if "\x00" in line:
        if bom_less:
            raise UnlearnError(f"{where}: UTF-16 or UTF-32 text without a byte-order mark, by its NUL bytes; save it "
                               f"as UTF-8")
        raise UnlearnError(f"{where}: contains NUL bytes (is this a binary file?)")
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UnlearnError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:  # Python's parser recurses once per bracket
        raise UnlearnError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # a number past Python's digit limit (its advice is for programmers: cut)
        raise UnlearnError(f"{where}: not valid JSON ({str(exc).split(';')[0]})") from None
    try:  # JSON may escape half of a character ("\ud800"); no tokenizer or file can take it later
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UnlearnError(f"{where}: holds a lone surrogate escape (such as \\ud800), half of a character; "
                           f"write the character itself") from None
    return parse_line(obj, where, need_response)


def prompt_key(prompt) -> str:
    """A prompt as rows are matched across files (a forget row's references, a kept row that repeats a
    forget prompt, an eval row that was trained on): its words, whitespace runs collapsed."""
    return " ".join(str(prompt).split())


def check_answers_spelled(examples: list[Example], path) -> None:
    """Refuse a row whose `answers` all miss its own response (matched as the leak judge matches them).

    The forget loss trains the response tokens that spell an answer, and the leak judge looks for the
    answers in the model's outputs. An answer the response does not spell (a typo, another spelling)
    leaves the loss on every response token and the judge looking for a word the row never says: the
    stop rule then finds the row forgotten at its first check, whatever the model still answers.
    A passage's response is its continuation, which is what the judge reads too: its answers must occur there.
    Passages were skipped: "Dickens" on a passage that never names him (or names him in its prefix only) was
    taken, and the judge then found the passage forgotten at the first check, whatever the model still recited.
    """
    for ex in examples:
        answers = ex.extra.get("answers")
        if answers and not answer_spans(ex.response, answers):
            listed = ", ".join(json.dumps(a, ensure_ascii=False) for a in answers)
            where = (f"continuation (the text after its first {len(passage_words(str(ex.prompt))[0])} words, which "
                     f"the model is asked to write)") if ex.is_passage else "response"
            raise UnlearnError(f"{shown(path)}:{ex.line}: none of its answers ({listed}) occurs in its {where}; "
                               f"write each answer as it is spelled there")


# --- rendering and tokenising ------------------------------------------------


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: str) -> str:
    """The text the model sees before its answer, identical for training and generation."""
    if isinstance(prompt, Passage):
        return str(prompt)
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return FALLBACK_PROMPT.format(prompt=prompt)


def fallback_format(tokenizer, prompt) -> bool:
    """Whether PROMPT is rendered in `FALLBACK_PROMPT`'s format: a question to a model without a chat template."""
    return not isinstance(prompt, Passage) and not has_chat_template(tokenizer)


def fallback_note(tokenizer, examples, questions: bool = False) -> str | None:
    """The line saying that EXAMPLES' questions (and with QUESTIONS, others asked beside them: `run`'s automatic
    probes) are rendered in the fallback format (the model has no chat template), how its answers end, and how
    to prompt the model; None when nothing is rendered so (a chat template, or passages only). `run` and `eval`
    say it: a user who prompts a base model otherwise, or compares its raw `generate` output, would not know why
    the answers read shorter."""
    if has_chat_template(tokenizer) or not (questions or any(not isinstance(e.prompt, Passage) for e in examples)):
        return None
    return (f"no chat template: prompts are rendered as {FALLBACK_PROMPT!r} and answers end where the model starts "
            f"the next '### Question:' or '### Answer:' turn; prompt the unlearned model the same way")


def _next_turn(text: str):
    """The first FALLBACK_TURN marker in TEXT with answer text before it, or None. An Answer marker with only
    blanks before it is the answer restating its own turn ("\n### Answer: Paris."): cut there, a model that still
    answers word for word read as forgotten. A Question marker there is the next turn begun at once: the answer
    is empty (kept, the invented question was read as the answer: review 112)."""
    return next((m for m in FALLBACK_TURN.finditer(text) if text[:m.start()].strip() or "Question" in m.group()),
                None)


def turn_started(text: str) -> bool:
    """Whether TEXT, an answer in the fallback format, holds the start of the format's next turn."""
    return _next_turn(text) is not None


def answer_in_format(tokenizer, prompt, text: str) -> str:
    """TEXT, a model's continuation of PROMPT's rendering, cut where the format's next turn starts
    (`FALLBACK_TURN`, or the start of one the budget cut at the end; in the fallback format only: a chat
    template's turn ends at a stop token)."""
    if not fallback_format(tokenizer, prompt):
        return text
    turn = _next_turn(text)
    if turn is not None:
        return text[:turn.start()]
    cut = _CUT_TURN.search(text)
    if cut is not None and text[:cut.start()].strip() and any(
            word.startswith(cut.group(1) or "") for word in ("Question", "Answer")):
        return text[:cut.start()]
    return text


def render_response(tokenizer, prompt: str, response: str) -> str:
    """The text of the answer turn after `render_prompt`, end-of-turn marker included.

    With a chat template, the full conversation is rendered and the prompt part
    cut off, so the end-of-turn tokens are the template's own. Without one, the format has no
    end-of-turn token: the response alone, after its leading space. No EOS is trained or scored after it:
    a base model never writes one there (Yao et al. train OPT in this format without it): on a tiny GPT-2
    taught to answer and go on, as base models do, it scored about -17 nats, one token that set the
    probability of answers the model writes word for word at 0.23 instead of 0.99; and a method
    that trains a likelihood (graddiff, the refusal) taught the model an end the original lacks, which
    every comparison with the original then read as damage. Its answers end at the next turn
    (`answer_in_format`), or at an EOS the model does write.
    """
    if isinstance(prompt, Passage):  # a continuation: the passage goes on, no end-of-text
        return response
    prompt_text = render_prompt(tokenizer, prompt)
    if has_chat_template(tokenizer):
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(prompt_text):
            return full[len(prompt_text):].rstrip("\n")
    return " " + response


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of the rendered prompt.

    A chat template writes its own BOS into the text; the fallback format and raw
    passages rely on the tokenizer adding it (OPT's `</s>`, Llama's `<s>`). A trailing EOS some
    tokenizers append is dropped: the answer follows the prompt.
    """
    return _encode_rendered(tokenizer, prompt, render_prompt(tokenizer, prompt))


def _encode_rendered(tokenizer, prompt, text: str) -> list[int]:
    """`encode_prompt`'s ids of TEXT, PROMPT's rendering or an opening of it."""
    templated = has_chat_template(tokenizer) and not isinstance(prompt, Passage)
    ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    if ids and ids[-1] == tokenizer.eos_token_id and len(ids) > 1 and not text.endswith(tokenizer.eos_token or "\0"):
        ids = ids[:-1]
    return list(ids)


# A rendered prompt of at most this many characters is tokenised whole to measure it (0.2 s at most on the tests'
# tokenizer). A longer one is measured on openings of it, while they stay within the limit asked about: a
# 400,000-word prompt (2 M characters, 1.28 M tokens on the tests' Llama tokenizer) took 3.7 s to tokenise whole.
WHOLE_TEXT_CHARS = 100_000


def prompt_length(tokenizer, prompt, enough: int) -> tuple[int, bool]:
    """The tokens of PROMPT's rendering (`encode_prompt`) and whether that count is exact: always while it is at
    most ENOUGH; past ENOUGH perhaps only a count past ENOUGH of an opening of the text, cut at a blank (a
    pre-tokeniser splits words there, so the opening's tokens are no more than the whole text spends on it)."""
    text = render_prompt(tokenizer, prompt)
    chars = WHOLE_TEXT_CHARS
    while len(text) > chars:
        blank = max(text.rfind(" ", 0, chars), text.rfind("\n", 0, chars))
        cut = blank if blank > chars // 2 else chars
        n = len(_encode_rendered(tokenizer, prompt, text[:cut]))
        if n > enough:
            return n, False
        # the next opening from the characters a token took so far, a quarter more: one more try, mostly
        chars = max(int(cut * 1.25 * (enough + 1) / max(n, 1)), int(chars * 1.25))
    return len(_encode_rendered(tokenizer, prompt, text)), True


def with_offsets(tokenizer, text: str, **kwargs) -> dict:
    """TOKENIZER's encoding of TEXT with each token's character span (`offset_mapping`), which finding an
    answer's tokens and an edit's subject needs. Only fast tokenizers have it: a slow (Python) one, which
    would leave the key out, is refused in one line."""
    if not getattr(tokenizer, "is_fast", False):
        raise UnlearnError(
            f"{getattr(tokenizer, 'name_or_path', '') or 'the model'}: its tokenizer is a slow (Python) one, which "
            "gives no character offsets: finding an answer's tokens (--forget-tokens answers or names, the default) "
            "and --method edit need them; give the model a fast tokenizer (tokenizer.json), or push down every "
            "response token (--forget-tokens response)")
    return tokenizer(text, return_offsets_mapping=True, **kwargs)


def response_encoding(tokenizer, prompt, text: str, offsets: bool = False) -> tuple[list[int], list | None]:
    """Token ids of TEXT (an answer turn, `render_response`, or an answer's text) as the model reads it after
    PROMPT's rendering, and with OFFSETS each token's (start, end) in TEXT (else None).

    TEXT is tokenised in one string with the rendered prompt, and the prompt's tokens are cut off: a
    tokenizer that marks a text's first word (SentencePiece's "▁", which transformers' Llama, Mistral and
    Gemma-style tokenizers put before it) would spell a response tokenised alone as no sequence the model
    reads or writes there ("▁Rome" where, after "assistant\n", the model writes "Rome"), and every loss and
    score would read those tokens. Where the prompt's tokens are not a prefix of the one string's (a merge
    across the boundary), TEXT is tokenised alone. Byte-level tokenizers (GPT-2, OPT, SmolLM2) give the same
    ids both ways.
    """
    prompt_text = render_prompt(tokenizer, prompt)
    encode = (lambda t, **kw: with_offsets(tokenizer, t, **kw)) if offsets else tokenizer
    joint = encode(prompt_text + text, add_special_tokens=False)
    head = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if joint["input_ids"][:len(head)] == head:
        spans = [(a - len(prompt_text), b - len(prompt_text))
                 for a, b in joint["offset_mapping"][len(head):]] if offsets else None
        return joint["input_ids"][len(head):], spans
    alone = encode(text, add_special_tokens=False)
    return alone["input_ids"], alone["offset_mapping"] if offsets else None


def answer_token_mask(tokenizer, text: str, answers, names: bool = False, response: str | None = None,
                      offsets: list | None = None) -> list[bool] | None:
    """Which tokens of TEXT overlap an occurrence of one of ANSWERS, found as the leak judge finds them.

    Occurrences are `metrics.answer_spans` (whole tokens, punctuation splits,
    case and accents folded: "Rowling" in "J.K.Rowling's", "1000" in "1,000",
    never "Paris" in "Parisian"). None when no answer occurs in TEXT (the caller
    then keeps every response token). ANSWERS are a row's `answers` or, for a
    row without them, `unlearn.spans.row_answers(example)[0]`. NAMES: each
    occurrence that ends a name covers the whole name (`spans.whole_names`).

    RESPONSE: when TEXT is `render_response` of it, only occurrences inside the
    response's own characters count. The rendered text ends with the template's
    end-of-turn marker, whose letters the matcher reads as words ("<|im_end|>"
    is "im", "end"): an answer "end" would otherwise put the EOS token into the
    forget loss, which the leak judge, reading outputs, never sees.

    OFFSETS: the character spans of TEXT's tokens as the model reads them after its prompt (`response_encoding`
    with offsets, which the caller has already run for the ids); without them, TEXT is tokenised alone.
    """
    spans = answer_spans(text, answers)
    if response is not None:
        lo, hi = response_region(text, response)
        spans = [(a, b) for a, b in spans if lo <= a and b <= hi]
    if names:  # the forget loss's focus: an answer that ends a name covers the whole name
        spans = whole_names(text, spans)
    if not spans:
        return None
    if offsets is None:
        offsets = with_offsets(tokenizer, text, add_special_tokens=False)["offset_mapping"]
    return [any(a < end and start < b for start, end in spans) for a, b in offsets]


def response_region(text: str, response: str) -> tuple[int, int]:
    """Where RESPONSE's own characters are in TEXT (its `render_response`): (start, end).

    Templates may trim the message (Llama 3, Gemma), so the stripped response is
    looked for too; not found at all (a template that rewrites it), the whole TEXT.
    """
    for wanted in (response, response.strip()):
        at = text.find(wanted) if wanted else -1
        if at >= 0:
            return at, at + len(wanted)
    return 0, len(text)


def encode_pair(tokenizer, prompt: str, response: str, max_length: int, focus=None, names: bool = False) -> dict:
    """Input ids of prompt + response, and labels that count response tokens only.

    The prompt's tokens are `encode_prompt`'s, the response's are read after them
    (`response_encoding`), so that the boundary (and so the label mask) is exact
    and the response's tokens are the ones the model writes there. Too long for MAX_LENGTH: the prompt
    keeps at least half of it (an answer without its question teaches nothing),
    the response keeps the rest from its start, and the prompt loses tokens from
    its left (the question itself sits at the end of the rendered prompt).

    FOCUS (a list of answer strings) narrows the labels further to the response
    tokens that spell one of them (`answer_token_mask`), when any occurs in the
    response (then "focused" is True). For `--forget-tokens answers`, FOCUS is
    `unlearn.spans.row_answers(example)[0]`: the row's `answers`, else the
    answers derived from its prompt and response, else None (every token).
    NAMES (`--forget-tokens names`): an answer that ends a name covers the whole name.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_text = render_response(tokenizer, prompt, response)
    response_ids, offsets = response_encoding(tokenizer, prompt, response_text, offsets=bool(focus))
    labels = list(response_ids)
    mask = (answer_token_mask(tokenizer, response_text, focus, names, response=response, offsets=offsets)
            if focus else None)
    focused = mask is not None and len(mask) == len(labels)
    if focused:
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(labels, mask)]
    if len(prompt_ids) + len(response_ids) > max_length:
        keep_response = min(len(response_ids), max_length - min(len(prompt_ids), max_length // 2))
        response_ids, labels = response_ids[:keep_response], labels[:keep_response]
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - keep_response):]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + labels,
        "focused": focused,  # the labels were narrowed to FOCUS's tokens (losses.redirect_loss reads it)
    }


class EncodedRows(Sequence):
    """EXAMPLES' encodings (ENCODE(example) -> dict), each made when the row is first read and kept.

    Why: training draws a few batches of the normal rows (a run stops after 4-60 steps), yet encoding
    every row up front took 64 s for a 50,000-row normal file (260 bytes a row, the embedded model's
    tokenizer, one thread on a loaded 2-core machine) before the first step. A row is encoded once: the
    same dict is returned every time, since the reference cache keys the original's logits by the row
    object (reference_cache.py).
    """

    def __init__(self, examples, encode):
        self._examples, self._encode = list(examples), encode
        self._rows: list[dict | None] = [None] * len(self._examples)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self._rows[index]
        if row is None:
            row = self._rows[index] = self._encode(self._examples[index])
        return row

    @property
    def encoded(self) -> int:
        """How many rows have been encoded so far (tests read it)."""
        return sum(row is not None for row in self._rows)


def collate(features: list[dict], pad_id: int) -> dict:
    """Right-pad a batch to its longest row (dynamic padding) with the tokenizer's pad id.

    Padding is masked in `attention_mask` and has label IGNORE_INDEX, so the pad id's
    own meaning (often EOS) never reaches a loss.
    """
    import torch

    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = torch.tensor(f["input_ids"])
        labels[row, :n] = torch.tensor(f["labels"])
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
