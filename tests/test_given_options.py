"""An option that another option makes do nothing is refused when given at its default value too.

The refusals decided "was it given?" by comparing the value with its default, so `--method edit --max-steps 150`
(150 being the default) was taken and ignored while `--max-steps 149` was refused. The CLI now passes which
options the user gave (click's parameter sources: the command line or the environment) as the options' `given`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unlearn.config import DEFAULT_TEMPLATE, EvalOptions, RunOptions, TrainConfig
from unlearn.errors import UsageError

EDIT = "--method edit is one least-squares edit, not a training run: it takes no "
ULMR = "--method ulmr learns its rows' whole negative responses at weight 1: it takes no "
GREEDY = "--temperature, --top-p and --seed apply only with --do-sample (greedy decoding ignores them)"
REACHED = "reached the run"  # what the stand-in for run.run says once the options resolved


@pytest.fixture
def data(tmp_path):
    forget, normal = tmp_path / "forget.jsonl", tmp_path / "normal.jsonl"
    forget.write_text(json.dumps({"prompt": "Capital of France?", "response": "Paris.", "answers": ["Paris"]}) + "\n")
    normal.write_text(json.dumps({"prompt": "Say hi.", "response": "Hi."}) + "\n")
    return forget, normal


@pytest.fixture
def reached(monkeypatch):
    """run.run replaced by one that resolves the options (where the refusals are) and stops with REACHED: a command
    that says it was accepted. Returns the options it was given (refused or not)."""
    import unlearn.run

    seen = []

    def run(opts, log=None):
        seen.append(opts)
        opts.resolved()
        raise UsageError(REACHED)

    monkeypatch.setattr(unlearn.run, "run", run)
    return seen


def only_line(result) -> str:
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    return lines[0]


# (the options that make it do nothing, the option at its default value, what the refusal says)
AT_DEFAULT = [
    (["--method", "edit"], ["--max-steps", "150"], EDIT + "--max-steps"),
    (["--method", "edit"], ["--check-every", "1"], EDIT + "--check-every"),
    (["--method", "edit"], ["--batch-size", "4"], EDIT + "--batch-size"),
    (["--method", "edit"], ["--stop-probes", "0"], EDIT + "--stop-probes"),
    (["--method", "edit"], ["--template", DEFAULT_TEMPLATE], EDIT + "--template"),
    (["--method", "edit"], ["--forget-weight", "0.5"], EDIT + "--forget-weight"),
    (["--method", "edit"], ["--mismatch-weight", "1"], EDIT + "--mismatch-weight"),
    (["--method", "edit"], ["--max-length", "256"], EDIT + "--max-length"),
    (["--method", "edit"], ["--grad-accum", "1"], EDIT + "--grad-accum"),
    (["--method", "edit"], ["--warmup-steps", "0"], EDIT + "--warmup-steps"),
    (["--method", "edit"], ["--schedule", "constant"], EDIT + "--schedule"),
    (["--method", "edit"], ["--max-grad-norm", "1.0"], EDIT + "--max-grad-norm"),
    (["--method", "edit"], ["--forget-tokens", "answers"], EDIT + "--forget-tokens"),
    (["--method", "edit"], ["--npo-beta", "0.1"], EDIT + "--npo-beta"),
    (["--method", "edit"], ["--lora-rank", "8"], EDIT + "--lora-* settings"),
    (["--method", "edit"], ["--lora-layers", "all"], EDIT + "--lora-* settings"),
    (["--full"], ["--lora-dropout", "0"], "--full fine-tunes every weight, without adapters: it takes no --lora-*"),
    (["--full"], ["--lora-alpha", "16"], "--full fine-tunes every weight, without adapters: it takes no --lora-*"),
    (["--method", "ga"], ["--rewrites", "2"], "--rewrites sets how many rewrites ULMR writes in the run: with "
                                              "--method ulmr only"),
    (["--method", "ulmr", "--augmented", "AUG"], ["--rewrites", "2"], "--rewrites sets how many rewrites ULMR writes "
                                                                      "in the run: with --augmented the rows are"),
    (["--method", "ulmr"], ["--forget-weight", "0.5"], ULMR + "--forget-weight"),
    (["--method", "ulmr"], ["--forget-tokens", "answers"], ULMR + "--forget-tokens"),
    (["--method", "ga"], ["--rmu-scale", "2.0"], "--rmu-layer and --rmu-scale set rmu's target: use them with "
                                                 "--method rmu"),
    (["--method", "ga"], ["--max-leak", "0.1"], "--max-leak chooses α under --alpha auto; with no --alpha it does "
                                                "nothing"),
]


def _args(args, data):
    return [str(data[0]) if a == "AUG" else a for a in args]  # the forget rows stand for ULMR's augmented rows


@pytest.mark.parametrize("setting, option, message", AT_DEFAULT,
                         ids=[" ".join(s + o) for s, o, _ in AT_DEFAULT])
def test_an_option_given_at_its_default_is_refused_where_it_does_nothing(tmp_path, data, llama_dir, cli, reached,
                                                                        setting, option, message):
    out = tmp_path / "o"
    result = cli("run", *data, "--model", llama_dir, "-o", out, *_args(setting, data), *option)
    assert result.code == 2 and only_line(result).startswith(f"unlearn: {message}"), result.err
    assert not out.exists()  # refused as the run resolved its options, before any file is read or model loaded


@pytest.mark.parametrize("setting", sorted({tuple(s) for s, _, _ in AT_DEFAULT}), ids=" ".join)
def test_the_same_command_without_the_option_is_taken(tmp_path, data, llama_dir, cli, reached, setting):
    # click's defaults do not count as given: only what the user wrote is refused
    result = cli("run", *data, "--model", llama_dir, "-o", tmp_path / "o", *_args(setting, data))
    assert result.code == 2 and only_line(result) == f"unlearn: {REACHED}"


def test_given_holds_what_the_command_line_and_the_environment_gave(tmp_path, data, llama_dir, cli, reached):
    cli("run", *data, "--method", "edit", "--max-steps", "150", "--json", env={"UNLEARN_MODEL": str(llama_dir)})
    # --model came from UNLEARN_MODEL (given); --lr, --lora-rank ... were left at click's defaults (not given)
    assert reached[0].given == {"forget", "normal", "method", "max_steps", "as_json", "model"}


@pytest.mark.parametrize("option", [["--seed", "0"], ["--temperature", "1.0"], ["--top-p", "1"], ["--min-k", "20"]])
def test_eval_refuses_a_sampling_or_min_k_option_given_at_its_default(data, llama_dir, cli, option):
    # greedy decoding reads no --seed 0 either, and --min-k 20 without --holdout measures nothing
    result = cli("eval", data[0], "--model", llama_dir, *option)
    message = GREEDY if option[0] != "--min-k" else "--min-k sets the min-k membership test, which needs --holdout"
    assert result.code == 2 and only_line(result) == f"unlearn: {message}"


def test_options_built_in_code_keep_comparing_with_the_default():
    # `given` is empty there: an option away from its default is still refused, one at it taken
    edit = TrainConfig(method="edit")
    RunOptions(Path("f"), Path("n"), train=edit).resolved()
    with pytest.raises(UsageError, match="it takes no --max-steps$"):
        RunOptions(Path("f"), Path("n"), train=TrainConfig(method="edit", max_steps=149)).resolved()
    with pytest.raises(UsageError, match="it takes no --max-steps$"):
        RunOptions(Path("f"), Path("n"), train=edit, given=frozenset({"max_steps"})).resolved()
    EvalOptions(Path("p")).validate()
    with pytest.raises(UsageError, match="--seed apply only with --do-sample"):
        EvalOptions(Path("p"), given=frozenset({"seed"})).validate()
    EvalOptions(Path("p"), do_sample=True, given=frozenset({"seed"})).validate()
