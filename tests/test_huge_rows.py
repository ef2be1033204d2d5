"""Rows far longer than a rotary model takes: a 400,000-word prompt (1.28 M tokens on the tiny Llama's tokenizer)
in a forget, normal or --eval-* file, or given to `unlearn eval`, is one line naming FILE:LINE and exit 1, before
anything is generated: it was "internal error: RuntimeError: ... you tried to allocate 1636228559950 bytes" from
the prefill's attention mask. It is measured on an opening of the text, not tokenised whole. A moderately long
row (thousands of tokens, past the tiny model's 512 declared positions) still runs, in batches whose attention
scores stay within their budget (five such probes asked 7.3 GB at once)."""

import json
import random
import re
import time

import pytest

from test_run_cli import FORGET, NORMAL

QUICK = ["--max-steps", "2", "--check-every", "0", "--max-new-tokens", "4", "--batch-size", "2", "--lr", "1e-2",
         "--no-probes"]
WORDS = "the cat sat on a mat while Harry Potter read old books about magic and wizards".split()


def words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def huge() -> str:
    return words(400_000)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_line(result) -> str:
    lines = [line for line in result.err.replace("\r", "\n").splitlines() if line.strip()]
    assert "internal error" not in result.err and "Traceback" not in result.err, result.err
    (line,) = [line for line in lines if line.startswith("unlearn:")]
    return line


REFUSAL = (r"unlearn: {where}: the rendered prompt is at least (\d+) tokens; with --max-new-tokens 4 that is at "
           r"least (\d+) positions, past the context of --model \S+ \(65536 positions: past max_position_embeddings "
           r"512, the most a row takes on a model without a learned position table\); shorten the prompt")


@pytest.mark.parametrize("where", ["forget", "normal", "eval-retain", "eval-forget", "unlearn eval"])
def test_a_400k_word_prompt_is_one_line_naming_its_row(cli, tmp_path, llama_dir, huge, where):
    long_row = {"prompt": huge + " Who wrote it?", "response": "Rowling wrote it.", "answers": ["Rowling"]}
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET + ([long_row] if where == "forget" else []))
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL + ([long_row] if where == "normal" else []))
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "What is the capital of France?", "answers": ["Paris"]},
                                                 {"prompt": huge + " Where?", "answers": ["Paris"]}])
    out = tmp_path / "out"
    started = time.perf_counter()
    if where == "unlearn eval":
        result = cli("eval", rows, "--model", llama_dir, "--max-new-tokens", "4")
    else:
        extra = [f"--{where}", rows] if where.startswith("eval-") else []
        result = cli("run", forget, normal, "--model", llama_dir, "-o", out, *QUICK, *extra)
    seconds = time.perf_counter() - started
    assert result.code == 1, result.err
    path, line = {"forget": (forget, 4), "normal": (normal, 4)}.get(where, (rows, 2))
    match = re.fullmatch(REFUSAL.format(where=re.escape(f"{path}:{line}")), one_line(result))
    assert match, one_line(result)
    n, positions = map(int, match.groups())
    assert 65536 < n and positions == n + 4
    assert not out.exists()
    assert seconds < 60  # it was a minute of tokenising and an allocation failure; this is a model load


def test_the_stop_rules_budget_is_checked_too(cli, tmp_path, llama_dir, huge):
    """With the stop rule on, the forget row is refused whichever budget names it first (here --max-new-tokens),
    and never reaches the probes' generation (which knows no FILE:LINE)."""
    forget = write_jsonl(tmp_path / "forget.jsonl", [*FORGET, {"prompt": huge, "response": "Rowling wrote it."}])
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", "--max-steps", "2",
                 "--check-every", "1", "--max-new-tokens", "4")
    assert result.code == 1, result.err
    assert one_line(result).startswith(f"unlearn: {forget}:4: the rendered prompt is at least ")


def test_max_length_past_the_rotary_limit_is_a_usage_error(cli, tmp_path, llama_dir):
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", *QUICK,
                 "--max-length", "100000")
    assert result.code == 2, result.err
    assert one_line(result) == (
        f"unlearn: --max-length 100000: past the context of --model {llama_dir} (65536 positions: past "
        "max_position_embeddings 512, the most a row takes on a model without a learned position table); use "
        "--max-length 65536 or less")


# --- measuring a prompt cheaply ----------------------------------------------------------------------------


def test_a_huge_prompt_is_measured_on_an_opening_of_it(llama_dir, huge, monkeypatch):
    from unlearn import data
    from unlearn.models import load_tokenizer

    tokenizer = load_tokenizer(llama_dir)
    read = []
    encode = data._encode_rendered
    monkeypatch.setattr(data, "_encode_rendered", lambda tok, prompt, text: read.append(len(text)) or
                        encode(tok, prompt, text))
    started = time.perf_counter()
    n, exact = data.prompt_length(tokenizer, huge, 65536)
    seconds = time.perf_counter() - started
    assert n > 65536 and not exact
    assert sum(read) < len(huge) / 4  # two openings: 100,000 characters, then about 200,000 (of 2 million)
    assert seconds < 2  # 0.2 s here; tokenising it whole took 3-4 s


def test_an_openings_count_is_a_lower_bound_and_short_texts_are_exact(llama_dir):
    from unlearn.data import WHOLE_TEXT_CHARS, encode_prompt, prompt_length
    from unlearn.models import load_tokenizer

    tokenizer = load_tokenizer(llama_dir)
    text = words(60_000, seed=1)
    assert len(text) > WHOLE_TEXT_CHARS
    whole = len(encode_prompt(tokenizer, text))
    assert prompt_length(tokenizer, text, whole) == (whole, True)  # within ENOUGH: exact, even when long
    n, exact = prompt_length(tokenizer, text, whole // 3)
    assert whole // 3 < n <= whole and not exact
    short = words(3000)
    assert prompt_length(tokenizer, short, 10) == (len(encode_prompt(tokenizer, short)), True)


# --- the limits ----------------------------------------------------------------------------------------------


def _llama(max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=max_positions))


def test_a_rotary_model_takes_its_declared_context_or_attended_positions_whichever_is_more():
    from unlearn.generation import ATTENDED_POSITIONS, context_limit, context_words, position_limit

    small, large = _llama(512), _llama(200_000)
    assert position_limit(small) is position_limit(large) is None
    assert context_limit(small) == ATTENDED_POSITIONS == 65536
    assert context_limit(large) == 200_000  # never refused within the context it declares
    assert context_words(large, 200_000, "--model big") == (
        "the context of --model big (200000 positions: max_position_embeddings 200000)")


def test_a_moderately_long_row_is_not_refused(llama_dir):
    """Past the tiny Llama's 512 declared positions but within ATTENDED_POSITIONS: generated, as before."""
    from pathlib import Path

    from unlearn.data import Example, encode_prompt
    from unlearn.generation import check_sets_fit
    from unlearn.measure import EvalSet
    from unlearn.models import load_model

    loaded = load_model(str(llama_dir), log=lambda m: None)
    prompt = words(3000)
    assert 512 < len(encode_prompt(loaded.tokenizer, prompt)) < 65536
    check_sets_fit(loaded.model, loaded.tokenizer, [EvalSet("p", "forget", [Example(prompt, None, 1)],
                                                            Path("p.jsonl"))], 64)


def test_padded_batches_keep_their_attention_scores_within_budget(llama_dir):
    """A padded prefill's scores are rows x heads x width^2 floats: five 9,551-token probes on the tiny Llama's
    4 heads asked 7.3 GB. The KV cache alone (256 bytes a position) would have let 64 rows through."""
    from unlearn.generation import ATTENTION_SCORES_BUDGET, batch_rows
    from unlearn.models import load_model

    model = load_model(str(llama_dir), log=lambda m: None).model
    assert model.config.num_attention_heads == 4
    assert batch_rows(model, 64, 9555) == ATTENTION_SCORES_BUDGET // (4 * 9555**2 * 4) == 2
    assert batch_rows(model, 64, 40_000) == 1  # one row alone: no padding, no mask, no score matrix
    assert batch_rows(model, 64, 200) == 64  # short rows: as before


def test_augment_names_a_row_too_long_for_a_rotary_model(cli, tmp_path, llama_dir, huge, monkeypatch):
    """`unlearn augment` measures its requests against the same context as run and eval (it knew only OPT's)."""
    def no_generation(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr("unlearn.generation.generate", no_generation)
    forget = write_jsonl(tmp_path / "forget.jsonl", [FORGET[0], {"prompt": huge + " Who?", "response": "Rowling."}])
    out = tmp_path / "aug.jsonl"
    result = cli("augment", forget, "-o", out, "--model", llama_dir)
    assert result.code == 1, result.err
    line = one_line(result)
    assert line.startswith(f"unlearn: {forget}:2: the ") and " is at least " in line, line
    assert re.search(rf"at least \d+ past the context of {re.escape(str(llama_dir))} \(65536 positions: past "
                     r"max_position_embeddings 512", line), line
    assert not out.exists()


def test_rope_scaling_widens_a_rotary_models_context():
    """Qwen2.5's 128K setup: max_position_embeddings 32768 and a YaRN factor of 4 (a 131,072-position context)."""
    from unlearn.generation import context_limit, context_words

    model = _llama(32768)
    model.config.rope_scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert context_limit(model) == 131072
    assert context_words(model, 131072, "--model q") == (
        "the context of --model q (131072 positions: original_max_position_embeddings 32768 x rope_scaling factor 4)")
    for odd in ({"factor": 4.0}, {"factor": True, "original_max_position_embeddings": 32768},  # no size it scales
                {"factor": 1e5, "original_max_position_embeddings": 32768}, {"factor": "4"}, {"factor": 0.5}, None):
        model.config.rope_scaling = odd
        assert context_limit(model) == 65536  # the declared 32768, under ATTENDED_POSITIONS
    llama31 = _llama(131072)  # Llama 3.1 declares its scaled context itself: 8192 x 8 is less, and changes nothing
    llama31.config.rope_scaling = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    assert context_limit(llama31) == 131072


class _ImageAndText:
    """A model whose config keeps the text model's heads and layers under `text_config` (Gemma 3's image-and-text
    class), with one parameter for its dtype."""

    def __init__(self, text):
        from transformers import PretrainedConfig

        self.config = PretrainedConfig()
        self.config.get_text_config = lambda *args, **kwargs: text
        self._weight = __import__("torch").zeros(1)

    def parameters(self):
        return iter([self._weight])

    def modules(self):
        return iter([])


def test_an_image_and_text_models_batches_read_its_text_config():
    from unlearn.generation import batch_rows, kv_bytes_per_position

    text = _llama(512).config
    wrapped = _ImageAndText(text)
    assert kv_bytes_per_position(wrapped) == 2 * 1 * 2 * 4 * 4  # layers x kv heads x head dim x float32
    assert batch_rows(wrapped, 128, 20_000) == 1  # 4 heads x 20,000² scores: one row (it stayed at 128)
