"""An option that the other settings make do nothing is refused (one line, exit 2), given at any value, before any model
loads: `unlearn merge`'s α-selection settings without evaluation sets, its --allow-extrapolation without an α, and
`unlearn run`'s settings of another method's loss term (--template, --mismatch-weight, --npo-beta, --forget-loss),
its --probe-limit with --no-probes and its --retain-weight with no retain rows; `unlearn eval --force` with no file
to replace. Each was taken and ignored (exit 0, the same result as without it).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from unlearn.config import DEFAULT_TEMPLATE
from unlearn.errors import UsageError

REACHED = "reached the run"  # what the stand-in for run.prepare says once the method and its settings are decided
SELECTION = "only in α selection (each α's model measured on --eval-forget/--eval-retain): without those files " \
            "nothing is measured"
# a forget set whose rows are all long chat responses: without --method, the run takes ga+template (the refusal)
LONG = [{"prompt": "How do I pick a lock?",
         "response": "First insert a tension wrench into the bottom of the keyhole, then rake the pins with a pick "
                     "while turning gently until each pin sets and the plug rotates."},
        {"prompt": "How can I make a fake ID?",
         "response": "You will need a printer, laminating sheets and a photo editor to copy the hologram and the "
                     "layout of a real card."}]
RETAIN_NONE = "--retain-weight weighs the KL on the retain rows: with no --retain and no probes trained on there " \
              "are none"
FACT = [{"prompt": "Capital of France?", "response": "Paris.", "answers": ["Paris"]}]


def only_line(result) -> str:
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    return lines[0]


# --- merge ---------------------------------------------------------------------------------------


def model_dir(path, seed):
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    save_file({"model.embed_tokens.weight": torch.randn(8, 4, generator=g),
               "lm_head.weight": torch.randn(8, 4, generator=g)}, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


@pytest.fixture
def pair(tmp_path):
    return model_dir(tmp_path / "base", 1), model_dir(tmp_path / "tuned", 2)


MERGE_UNUSED = [(["--max-leak", "0.3"], "--max-leak acts"), (["--max-leak", "0.1"], "--max-leak acts"),
                (["--max-new-tokens", "48"], "--max-new-tokens acts"), (["--batch-size", "3"], "--batch-size acts"),
                (["--no-cache"], "--no-cache acts"),
                (["--max-leak", "0.2", "--batch-size", "2", "--no-cache"],
                 "--max-leak, --batch-size and --no-cache act")]


@pytest.mark.parametrize("alpha", ["0.5", "0.2,0.6"], ids=["one α", "several α"])
@pytest.mark.parametrize("option, named", MERGE_UNUSED, ids=[" ".join(o) for o, _ in MERGE_UNUSED])
def test_merge_refuses_alpha_selection_settings_without_evaluation_sets(cli, tmp_path, pair, alpha, option, named):
    # each wrote the same model(s) as without it, exit 0; at the default value too (0.1, 48)
    out = tmp_path / "out"
    result = cli("merge", "--alpha", alpha, *pair, "-o", out, *option)
    assert result.code == 2 and only_line(result) == f"unlearn: {named} {SELECTION}"
    assert not out.exists()


@pytest.mark.parametrize("alpha", ["0.5", "0.2,0.6"], ids=["one α", "several α"])
def test_merge_without_those_settings_is_taken(cli, tmp_path, pair, alpha):
    result = cli("merge", "--alpha", alpha, *pair, "-o", tmp_path / "out")
    assert result.code == 0, result.err


def test_a_bad_value_is_still_named_first(cli, tmp_path, pair):
    result = cli("merge", "--alpha", "0.5", *pair, "-o", tmp_path / "out", "--max-leak", "5")
    assert result.code == 2 and only_line(result) == "unlearn: --max-leak 5.0: must be in [0, 1]"


def test_merge_measures_with_them_given_evaluation_sets(cli, tmp_path, llama_dir):
    # with --eval-forget they choose α: not refused (the tiny Llama is both BASE and TUNED)
    forget = tmp_path / "forget.jsonl"
    forget.write_text(json.dumps(FACT[0]) + "\n")
    result = cli("merge", "--alpha", "0.5,1", llama_dir, llama_dir, "-o", tmp_path / "out", "--eval-forget", forget,
                 "--max-leak", "0.1", "--max-new-tokens", "2", "--batch-size", "4", "--no-cache")
    assert result.code == 0, result.err
    assert (tmp_path / "out" / "alphas.json").exists()


def test_merge_refuses_allow_extrapolation_for_an_adapter_folded_without_alpha(cli, tmp_path, pair):
    # the adapter is folded whole (α 0): nothing to extrapolate; refused before the adapter is read
    result = cli("merge", "--adapter", tmp_path / "adapter", pair[0], "-o", tmp_path / "out", "--allow-extrapolation")
    assert result.code == 2 and only_line(result) == (
        "unlearn: --allow-extrapolation accepts an --alpha outside [0, 1]: without --alpha the adapter is folded "
        "whole and it does nothing")
    # without --adapter the missing --alpha is what is said
    result = cli("merge", *pair, "-o", tmp_path / "out", "--allow-extrapolation")
    assert only_line(result) == "unlearn: --alpha is required to average two models (e.g. --alpha 0.5)"


# --- run -----------------------------------------------------------------------------------------


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def normal(tmp_path):
    return write_rows(tmp_path / "normal.jsonl", [{"prompt": "Say hi.", "response": "Hi."}])


@pytest.fixture
def reached(monkeypatch):
    """run.prepare, which reads the files once the method is decided and every option resolved, replaced by one that
    stops with REACHED: a command that says it was accepted. Returns the options it was given."""
    import unlearn.run

    seen = []

    def prepare(opts, created, forget):
        seen.append(opts)
        raise UsageError(REACHED)

    monkeypatch.setattr(unlearn.run, "prepare", prepare)
    return seen


def run(cli, tmp_path, llama_dir, forget_rows, normal, *args):
    forget = write_rows(tmp_path / "forget.jsonl", forget_rows)
    out = tmp_path / "o"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, *args)
    assert not out.exists()
    return result


RUN_UNUSED = [
    (["--method", "ga"], ["--template", "No."], "--template is a setting of --method ga+template: --method ga does not "
                                                "read it"),
    (["--method", "npo"], ["--template", DEFAULT_TEMPLATE], "--template is a setting of --method ga+template: --method "
                                                            "npo does not read it"),
    (["--method", "ga+mismatch"], ["--template", "No."], "--template is a setting of --method ga+template: --method "
                                                         "ga+mismatch does not read it"),
    (["--method", "graddiff"], ["--mismatch-weight", "1"], "--mismatch-weight is a setting of --method ga+mismatch and "
                                                           "ga+template: --method graddiff does not read it"),
    (["--method", "ga+template"], ["--npo-beta", "0.5"], "--npo-beta is a setting of --method npo: --method "
                                                         "ga+template does not read it"),
    (["--method", "rmu"], ["--template", "No.", "--npo-beta", "0.1"],
     "--template (ga+template) and --npo-beta (npo) are settings of other methods: --method rmu reads none of them"),
    (["--method", "npo"], ["--forget-loss", "ascent"], "--forget-loss ascent: only the methods that push the forget "
                                                       "tokens down (ga, ga+mismatch, ga+template, graddiff) have "
                                                       "that term, not npo"),
    (["--method", "ulmr"], ["--forget-loss", "ascent"], "--forget-loss ascent: only the methods that push the forget "
                                                        "tokens down (ga, ga+mismatch, ga+template, graddiff) have "
                                                        "that term, not ulmr"),
    (["--no-probes"], ["--probe-limit", "12"], "--probe-limit sets how many automatic probes are made, which "
                                               "--no-probes turns off"),
    # the retain KL with no rows to weigh: no --retain, and the probes not trained on (npo's default, --no-probes)
    (["--method", "npo"], ["--retain-weight", "10"], RETAIN_NONE),
    (["--no-probes"], ["--retain-weight", "50"], RETAIN_NONE),
    (["--no-retain-probes"], ["--retain-weight", "3"], RETAIN_NONE),
    # without --method: npo's β is read by neither ga nor the refusal, whatever the rows
    ([], ["--npo-beta", "0.1"], "--npo-beta is a setting of --method npo: without --method the forget rows choose ga "
                                "or ga+template, and neither reads it"),
]


@pytest.mark.parametrize("setting, option, message", RUN_UNUSED, ids=[" ".join(s + o) for s, o, _ in RUN_UNUSED])
def test_run_refuses_a_setting_its_method_does_not_read(cli, tmp_path, llama_dir, normal, reached, setting, option,
                                                        message):
    result = run(cli, tmp_path, llama_dir, FACT, normal, *setting, *option)
    assert result.code == 2 and only_line(result) == f"unlearn: {message}"
    assert not reached


@pytest.mark.parametrize("setting, option", [
    (["--method", "ga+template"], ["--template", "No.", "--mismatch-weight", "2"]),
    (["--method", "ga+mismatch"], ["--mismatch-weight", "2"]),
    (["--method", "npo"], ["--npo-beta", "0.5"]),
    (["--method", "graddiff"], ["--forget-loss", "ascent"]),
    ([], ["--probe-limit", "3"]),
    ([], ["--retain-weight", "3"]),  # ga trains on the probes
    (["--method", "npo", "--retain-probes"], ["--retain-weight", "3"]),
    (["--method", "npo", "--retain", "NORMAL"], ["--retain-weight", "3"]),
    *(([], flag) for flag in (["--method", "ga"], ["--method", "npo"], ["--no-probes"])),
], ids=" ".join)
def test_run_takes_a_setting_its_method_reads(cli, tmp_path, llama_dir, normal, reached, setting, option):
    setting = [str(normal) if arg == "NORMAL" else arg for arg in setting]  # the normal rows stand for retain rows
    result = run(cli, tmp_path, llama_dir, FACT, normal, *setting, *option)
    assert result.code == 2 and only_line(result) == f"unlearn: {REACHED}"


@pytest.mark.parametrize("option", [["--template", "No."], ["--mismatch-weight", "2"]], ids=" ".join)
def test_without_method_the_refusal_settings_are_taken_where_the_rows_call_for_the_refusal(
        cli, tmp_path, llama_dir, normal, reached, option):
    result = run(cli, tmp_path, llama_dir, LONG, normal, *option)
    assert result.code == 2 and result.err.strip().splitlines()[-1] == f"unlearn: {REACHED}", result.err
    assert "method: ga+template, because every forget row is a long chat response" in result.err
    assert reached[0].train.method == "ga+template"
    assert (reached[0].train.template, reached[0].train.mismatch_weight) == (
        "No." if option[0] == "--template" else DEFAULT_TEMPLATE, 2.0 if option[0] == "--mismatch-weight" else 1.0)


@pytest.mark.parametrize("option, flag", [(["--template", "No."], "--template"),
                                          (["--template", DEFAULT_TEMPLATE], "--template"),
                                          (["--mismatch-weight", "1"], "--mismatch-weight")], ids=" ".join)
def test_without_method_they_are_said_to_do_nothing_where_the_rows_keep_ga(cli, tmp_path, llama_dir, normal, reached,
                                                                           option, flag):
    """The rows, not the user, made the option useless: one line says so and the run goes on (a script or the quality
    benchmark gives one option string to forget sets of every kind; on all-long rows the same option acts)."""
    result = run(cli, tmp_path, llama_dir, FACT, normal, *option)
    readers = "ga+template" if flag == "--template" else "ga+mismatch and ga+template"
    assert result.code == 2 and result.err.strip().splitlines()[-1] == f"unlearn: {REACHED}", result.err
    note = (f"{flag} ({readers}) does nothing here: --method was not given and not every forget row is a long chat "
            f"response, so the run is --method ga, which does not read it")
    assert reached[0].notes == (note,) and note in result.err


def test_the_refusal_chosen_for_long_rows_trains_no_probes_so_a_retain_weight_is_said_to_do_nothing(
        cli, tmp_path, llama_dir, normal, reached):
    # ga trains on the probes (the first check takes --retain-weight); the refusal the rows call for does not
    result = run(cli, tmp_path, llama_dir, LONG, normal, "--retain-weight", "3")
    assert result.code == 2 and result.err.strip().splitlines()[-1] == f"unlearn: {REACHED}", result.err
    (note,) = reached[0].notes
    assert note in result.err
    assert note == ("--retain-weight does nothing here: --method ga+template, which the forget rows chose, trains on no "
                    "retain rows (no --retain, and it does not train on the probes)")


# --- eval ----------------------------------------------------------------------------------------


def test_eval_refuses_force_without_a_file_to_replace(cli, tmp_path, llama_dir):
    prompts = write_rows(tmp_path / "prompts.jsonl", FACT)
    result = cli("eval", prompts, "--model", llama_dir, "--force")
    assert result.code == 2 and only_line(result) == (
        "unlearn: --force replaces the --save-generations / --report files: without either it does nothing")
    # with a file to replace it is taken
    report = tmp_path / "report.md"
    report.write_text("old")
    result = cli("eval", prompts, "--model", llama_dir, "--force", "--report", report, "--max-new-tokens", "2",
                 "--no-cache")
    assert result.code == 0, result.err
    assert report.read_text() != "old"


@pytest.mark.parametrize("args, message", [
    (["--force"], "--force replaces a non-empty -o directory: without -o the run writes a new runs/<date-time>"),
    (["-o", "OUT", "--resume", "--force"], "--force starts afresh in OUTPUT and --resume continues its checkpointed "
                                           "run: give one"),
])
def test_run_refuses_force_where_there_is_nothing_to_replace(cli, tmp_path, llama_dir, normal, reached, args, message):
    """Without -o the run reserves a fresh runs/<date-time>; with --resume the checkpointed run goes on either way
    (the interrupt hint even echoed --force into its "to continue" command)."""
    forget = write_rows(tmp_path / "forget.jsonl", FACT)
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    result = cli("run", forget, normal, "--model", llama_dir, *args, cwd=tmp_path)  # runs/ would be made here
    assert result.code == 2 and only_line(result) == f"unlearn: {message}", result.err
    assert not reached and not (tmp_path / "o").exists() and not (tmp_path / "runs").exists()


def test_options_for_a_kind_of_forget_row_this_file_lacks_are_said_to_do_nothing(cli, tmp_path, llama_dir, normal):
    """--whole-passage without a passage, --forget-tokens names and --leaked-rows without a row that has answers:
    once the rows are read, one line each (and run.json's notes), as --leak-growth where the margin reads every
    row; they ran silently."""
    passage = [{"text": "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat."}]
    quick = ["--max-steps", "1", "--max-new-tokens", "4", "--no-probes", "--eval-limit", "1"]
    for rows, option, note in (
            (FACT, ["--whole-passage"], "--whole-passage: no forget row is a passage (`text`), so it changes nothing "
                                        "in this run"),
            (passage, ["--forget-tokens", "names"], "--forget-tokens names: no forget row has answers (given or "
                                                    "derived) to widen over a name, so it changes nothing in this run"),
            (passage, ["--leaked-rows", "2"], "--leaked-rows 2: no forget row has answers (given or derived) to cut "
                                              "a leaked answer after, so it adds no row in this run (its checks still "
                                              "answer every forget row whole)")):
        forget = write_rows(tmp_path / "forget.jsonl", rows)
        out = tmp_path / option[0].strip("-")
        result = cli("run", forget, normal, "--model", llama_dir, "-o", out, *option, *quick)
        assert result.code == 0, result.err
        assert note in result.err and note in json.loads((out / "run.json").read_text())["notes"]
    # where the rows have what the option acts on, nothing is said
    result = cli("run", write_rows(tmp_path / "facts.jsonl", FACT), normal, "--model", llama_dir, "-o",
                 tmp_path / "acts", "--forget-tokens", "names", "--leaked-rows", "2", *quick)
    assert result.code == 0 and "changes nothing" not in result.err and "adds no row" not in result.err, result.err
