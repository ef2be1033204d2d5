"""`unlearn run` at its edges: rows --max-length cuts, symbolic-link and empty outputs, a resume whose
model changed, held-back normal rows trained elsewhere, --eval-limit's cover of the unanswered forget
rows, and the stop rule's label when no check ran. Through the real CLI (`cli`, conftest.py) on the
tiny random models of tiny_models.py."""

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from test_run_cli import FORGET, NORMAL

QUICK = ["--max-steps", "2", "--check-every", "0", "--max-new-tokens", "4", "--batch-size", "2", "--lr", "1e-2",
         "--no-probes"]
LATE = {"prompt": "Who wrote it?", "response": "It was written by " + "and more " * 400 + "Rowling.",
        "answers": ["Rowling"]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip()]


# --- a forget row whose answer --max-length cuts off -----------------------------------


@pytest.mark.parametrize("rows", [[LATE], FORGET + [LATE]], ids=["alone", "beside-other-rows"])
def test_a_forget_row_whose_answer_max_length_cuts_is_refused_before_measuring(cli, tmp_path, llama_dir, rows):
    forget = write_jsonl(tmp_path / "forget.jsonl", rows)
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, *QUICK, "--batch-size", "4")
    assert result.code == 1, result.err
    (last,) = [line for line in lines(result.err) if line.startswith("unlearn:")]
    line = len(rows)
    match = re.fullmatch(rf"unlearn: {re.escape(str(forget))}:{line}: its answer \('Rowling'\) starts at token "
                         r"(\d+) of the response \((\d+) with the prompt\), but --max-length 256 keeps only the "
                         r"response's first (\d+) tokens, so the forget loss has nothing to train on; use "
                         r"--max-length (\d+) or more, or shorten the response", last)
    assert match, last
    at, with_prompt, kept, needed = map(int, match.groups())
    assert kept < at < with_prompt <= needed
    assert "not answered" not in result.err and "internal error" not in result.err  # before anything is measured
    assert not out.exists()
    # The length it names is enough: the row is taken (and trained: the loss has its answer).
    ok = cli("run", forget, normal, "--model", llama_dir, "-o", out, *QUICK, "--max-length", needed,
             "--max-new-tokens", "1", "--eval-limit", "1")
    assert ok.code == 0, ok.err


def test_rows_scored_whole_are_not_refused_for_their_length(cli, tmp_path, llama_dir):
    """--forget-tokens response scores every response token: the response keeps half of --max-length."""
    forget = write_jsonl(tmp_path / "forget.jsonl", [LATE])
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", *QUICK,
                 "--forget-tokens", "response", "--max-new-tokens", "1")
    assert result.code == 0, result.err


# --- -o a symbolic link to a directory -------------------------------------------------


def test_output_through_a_symbolic_link_writes_into_its_target(cli, tmp_path, llama_dir, monkeypatch):
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    cache = tmp_path / "cache"
    monkeypatch.setenv("UNLEARN_CACHE", str(cache))
    result = cli("run", forget, normal, "--model", llama_dir, "-o", link, *QUICK)
    assert result.code == 0, result.err
    assert link.is_symlink() and link.resolve() == target.resolve()  # the link stays
    record = json.loads((target / "run.json").read_text())
    assert record["output"] == str(target.resolve())
    assert record["merged_model"] == str(target.resolve() / "model")
    assert (target / "model").is_dir() and (target / "adapter").is_dir()
    assert f"merged model: {target.resolve() / 'model'}" in result.out
    assert (cache / "last_run").read_text().strip() == str(target.resolve())


# --- --resume with a model whose content changed ---------------------------------------


def _checkpointed(cli, tmp_path, llama_dir):
    """A copy of the tiny Llama, and a run on it that stopped at a nan loss, its step-1 checkpoint kept."""
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    args = ["run", forget, normal, "--model", model, "--check-every", "0", "--max-steps", "10", "--batch-size", "2",
            "--lr", "1e30", "--save-every", "1", "--max-new-tokens", "2", "--no-probes", "-o", tmp_path / "out"]
    first = cli(*args)
    assert first.code == 1 and "the last good checkpoint is" in first.err, first.err
    return model, args


def _change_weights(model: Path) -> None:
    (path,) = model.glob("*.safetensors")
    tensors = load_file(path)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_resume_refuses_a_model_whose_content_changed(cli, tmp_path, llama_dir):
    model, args = _checkpointed(cli, tmp_path, llama_dir)
    same = cli(*args, "--resume")  # the same model resumes (and meets its nan again)
    assert same.code == 1 and "resuming from" in same.err and "the loss is nan" in same.err, same.err
    _change_weights(model)
    result = cli(*args, "--resume")
    assert result.code == 2, result.err
    assert lines(result.err)[-1] == (
        f"unlearn: --resume: the arguments differ from the checkpointed run's (model: the content of "
        f"{model.resolve()} (weights, config or tokenizer) is not the checkpointed run's); give the same model, "
        f"or start afresh with --force")
    assert "resuming from" not in result.err


def test_a_checkpoint_without_a_recorded_model_content_compares_the_path_only(cli, tmp_path, llama_dir):
    model, args = _checkpointed(cli, tmp_path, llama_dir)
    state = tmp_path / "out" / "checkpoints" / "step-1" / "state.json"
    record = json.loads(state.read_text())
    assert record["args"].pop("model_content")  # as written before the content was recorded
    state.write_text(json.dumps(record))
    _change_weights(model)
    result = cli(*args, "--resume")
    assert "resuming from" in result.err and "--resume: the arguments differ" not in result.err, result.err


# --- held-back normal rows that are trained elsewhere ----------------------------------


def test_hold_out_draws_the_same_rows_as_before_when_nothing_is_duplicated():
    """The quality benchmark's stored results depend on which rows a seed holds back: pinned."""
    from unlearn.data import Example
    from unlearn.run import hold_out, untrained_elsewhere

    for n, share, seed, held in [(10, 0.2, 0, [6, 9]), (6, 0.25, 0, [3, 5]), (5, 0.2, 0, [3]),
                                 (40, 0.2, 1, [4, 7, 8, 16, 28, 30, 31, 36])]:
        rows = [Example(f"question {i}?", f"answer {i}.", i + 1) for i in range(n)]
        eligible = untrained_elsewhere(rows, [])
        assert eligible == list(range(n))
        assert hold_out(rows, share, seed, eligible) == hold_out(rows, share, seed)
        assert [rows.index(r) for r in hold_out(rows, share, seed, eligible)[1]] == held


def test_hold_out_holds_back_only_rows_not_trained_elsewhere():
    from unlearn.data import Example
    from unlearn.run import hold_out, untrained_elsewhere

    two = [Example("What is two plus two?", "Four.", i) for i in (1, 2, 3, 4)]
    bees = Example("What do bees make?", "Honey.", 5)
    rows = two[:3] + [bees] + two[3:]
    assert untrained_elsewhere(rows, []) == [3]
    kept, held = hold_out(rows, 0.25, 0, untrained_elsewhere(rows, []))
    assert held == [bees] and kept == two
    rows = [Example(f"question {i}?", "a.", i + 1) for i in range(8)]
    retain = [Example("question 0?", "a.", 1), Example("question 5?", "a.", 2)]
    eligible = untrained_elsewhere(rows, retain)
    assert eligible == [1, 2, 3, 4, 6, 7]
    for seed in range(20):
        assert all(r.prompt not in ("question 0?", "question 5?") for r in hold_out(rows, 0.5, seed, eligible)[1])


@pytest.mark.parametrize("weight, role", [((), "trained"), (("--retain-weight", "0"), "held out")])
def test_normal_rows_all_repeated_by_retain_are_labelled_trained(cli, tmp_path, llama_dir, weight, role):
    # (at --retain-weight 0 the retain rows train nothing: review 111 found them labelling the held-back row trained)
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL + [{"prompt": "Name a fruit.", "response": "Apple."}])
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", *QUICK, "--retain", normal,
                 "--json", *weight)
    assert result.code == 0, result.err
    record = json.loads(result.out)
    assert record["before"]["normal-heldout"]["n"] == 1
    assert record["roles"]["normal-heldout"] == role
    assert "option" not in record["data"]["normal-heldout"]  # NORMAL's share, no --eval-* file (review 113)


def test_duplicated_normal_rows_are_not_held_back(tmp_path, llama_dir):
    """Seed 0 draws row 4 of 5, here a copy of a row trained on: the unique row is held back instead."""
    from unlearn.config import RunOptions
    from unlearn.data import read_examples
    from unlearn.run import prepare

    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    two = {"prompt": "What is two plus two?", "response": "Two plus two equals four."}
    normal = write_jsonl(tmp_path / "normal.jsonl", [{"prompt": "What do bees make?", "response": "Bees make honey."},
                                                     two, two, two, two])
    opts = RunOptions(forget=forget, normal=normal, model=str(llama_dir), output=tmp_path / "out").resolved()
    data = prepare(opts, [], read_examples(forget))
    assert [e.line for e in data.normal_heldout] == [1] and [e.line for e in data.normal] == [2, 3, 4, 5]
    assert {s.name: s.role for s in data.sets}["normal-heldout"] == "held out"


# --- the unanswered forget rows under --eval-limit --------------------------------------


def test_unanswered_forget_rows_say_how_many_rows_were_looked_at(cli, tmp_path, llama_dir):
    from unlearn.data import Example
    from unlearn.measure import EvalSet
    from unlearn.run import unanswered_message

    forget = EvalSet("forget", "forget", [Example("p1", "r1", 1)], Path("f.jsonl"))
    assert unanswered_message([1], forget, 8, rows=3).startswith(
        "f.jsonl: 1 of the first 1 forget rows measured (--eval-limit; 3 in all) (line 1) is not answered")
    assert unanswered_message([1], forget, 8, rows=1).startswith("f.jsonl: 1 of 1 forget rows (line 1) is not")

    path = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    result = cli("run", path, normal, "--model", llama_dir, "-o", tmp_path / "out", *QUICK, "--eval-limit", "1",
                 "--json")
    assert result.code == 0, result.err
    record = json.loads(result.out)
    assert record["forget_rows_measured_before"] == 1 and record["data"]["forget"]["rows"] == 3
    unanswered = record["forget_rows_unanswered_before"]
    assert set(unanswered) <= {1}
    said = f"{path}: 1 of the first 1 forget rows measured (--eval-limit; 3 in all) (line 1) is not answered"
    assert (said in result.err) == bool(unanswered)


# --- -o '' ------------------------------------------------------------------------------


def test_an_empty_output_path_is_refused(cli, tmp_path, llama_dir):
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    work = tmp_path / "work"
    work.mkdir()
    result = cli("run", forget, normal, "--model", llama_dir, "-o", "", *QUICK, cwd=work)
    assert result.code == 2
    assert lines(result.err) == [
        "unlearn: -o '': an empty output path; name a directory (or leave -o out)"]
    assert list(work.iterdir()) == []


# --- "stop rule" only when a check ran --------------------------------------------------


def test_the_forget_set_is_not_labelled_stop_rule_when_no_check_ran(cli, tmp_path, llama_dir):
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    quick = [a for a in QUICK if a not in ("--check-every", "0")]
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", *quick, "--check-every", "5")
    assert result.code == 0, result.err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert not any("forget_leak" in r for r in record["history"])
    assert record["roles"]["forget"] == "trained"
    (row,) = [line for line in result.out.splitlines() if line.startswith("forget ")]
    assert "stop rule" not in row and "trained" in row


def test_eval_files_take_none_of_the_runs_own_names_and_say_what_chose_on_them(tmp_path):
    """An --eval-* file named normal-heldout.jsonl was taken for the held-back rows, and α chosen on it; one
    named retain.jsonl was left out of run.json; ULMR's --augmented rows given again read as held out; and one
    that repeats the held-back rows --alpha auto chooses on read as a result (report audit, helper 38)."""
    from unlearn.config import RunOptions
    from unlearn.data import read_examples
    from unlearn.run import hold_out, prepare, selection_sets, untrained_elsewhere

    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    normal_rows = NORMAL + [{"prompt": f"Name a colour, number {i}.", "response": "Red."} for i in range(4)]
    normal = write_jsonl(tmp_path / "normal.jsonl", normal_rows)
    (tmp_path / "e").mkdir()
    named = write_jsonl(tmp_path / "e" / "normal-heldout.jsonl", [NORMAL[0]])
    retain_named = write_jsonl(tmp_path / "e" / "retain.jsonl", [{"prompt": "Name a tree.", "response": "Oak."}])

    def sets(**options):
        opts = RunOptions(forget=forget, normal=normal, model="m", output=tmp_path / "out", force=True,
                          **options).resolved()
        return prepare(opts, [], read_examples(forget)).sets

    got = sets(normal_holdout=0.0, alpha="auto", eval_retain=(named, retain_named))
    names = [s.name for s in got]
    assert names.count("normal-heldout") == 0 and names.count("retain") == 0 and len(names) == 4
    assert [s.name for s in selection_sets(got)] == ["forget", "normal"]  # the trained rows, not the file

    augmented = write_jsonl(tmp_path / "aug.jsonl", [{"prompt": "Can you tell me this: who wrote it?",
                                                      "response": "I don't know."}])
    from unlearn.train import TrainConfig

    got = sets(train=TrainConfig(method="ulmr"), augmented=augmented, eval_forget=(augmented,))
    assert {s.name: s.role for s in got}["aug"] == "trained"

    rows = read_examples(normal)
    _, held = hold_out(rows, 0.25, 0, untrained_elsewhere(rows, []) or None)
    again = write_jsonl(tmp_path / "held.jsonl", [{"prompt": e.prompt, "response": e.response} for e in held])
    roles = {s.name: s.role for s in sets(alpha="auto", eval_retain=(again,))}
    assert roles["normal-heldout"] == "held out, α choice" == roles["held"]


def test_rows_that_join_training_after_the_labels_relabel_the_held_out_sets():
    from unlearn.data import Example
    from unlearn.measure import EvalSet
    from unlearn.run import label_trained_rows

    rows = [Example("Who wrote the Fran books?", "Fran.", 1), Example("What is red?", "A colour.", 2)]
    sets = [EvalSet("heldout", "retain", rows, None, "held out"), EvalSet("h2", "retain", rows[1:], None, "held out"),
            EvalSet("normal-heldout", "retain", rows[:1], None, "held out, α choice"),
            EvalSet("normal", "retain", rows[:1], None, "trained")]
    label_trained_rows(sets, [Example("Who wrote the Fran books?", "Fran Smith.", 1)])
    assert [s.role for s in sets] == ["1 of 2 trained", "held out", "trained, α choice", "trained"]


def test_probes_are_labelled_stop_rule_only_when_their_check_ran():
    # the probe check runs only at a check where nothing leaks: a run leaking at every check never asked them
    from types import SimpleNamespace

    from unlearn.data import Example
    from unlearn.measure import EvalSet
    from unlearn.run import roles_as_checked
    from unlearn.tables import _probe_lines

    def labelled(*leaks):
        sets = [EvalSet("forget", "forget", [], None, "trained, stop rule"),
                EvalSet("neighbours", "retain", [Example("q", "a", 1)], None, "stop rule"),
                EvalSet("same subject", "retain", [Example("q", "a", 1)], None, "trained, stop rule")]
        roles_as_checked(sets, SimpleNamespace(history=[{"step": i + 1, "forget_leak": x} for i, x in enumerate(leaks)]),
                         0.0, ("neighbours", "same subject"))
        return [s.role for s in sets]
    assert labelled(0.5, 0.2) == ["trained, stop rule", "held out", "trained"]
    assert labelled(0.5, 0.0) == ["trained, stop rule", "stop rule", "trained, stop rule"]
    assert labelled() == ["trained", "held out", "trained"]
    record = {"probes": {"sets": {"neighbours": {"made": 1, "kept": 1}}, "retained": None, "file": None},
              "roles": {"neighbours": "stop rule"}}
    assert "held out, and checked by the stop rule (--stop-probes)" in _probe_lines(record)[0]


def test_an_eval_file_repeating_some_forget_prompts_loses_its_stop_rule_part_when_no_check_ran():
    # (review 111) "1 of 2 stop rule" survived a run whose stop rule never checked (--check-every past the steps
    # run, every edit run), while the forget line became "trained"
    from types import SimpleNamespace

    from unlearn.measure import EvalSet
    from unlearn.run import roles_as_checked

    sets = [EvalSet("forget", "forget", [], None, "trained, stop rule"),
            EvalSet("para", "forget", [], None, "1 of 2 trained, 1 of 2 stop rule"),
            EvalSet("both", "forget", [], None, "1 of 3 trained, 1 of 3 stop rule, α choice")]
    roles_as_checked(sets, SimpleNamespace(history=[{"step": 1}]))
    assert [s.role for s in sets] == ["trained", "1 of 2 trained", "1 of 3 trained, α choice"]


def test_the_stop_rules_budget_is_checked_only_where_the_stop_rule_runs(cli, tmp_path, opt_dir):
    # (review 111) a forget prompt with room for --max-new-tokens but not for the check's 32 tokens was refused with
    # --check-every 0, where no check generates, and told to "lower the budget", which no option sets
    from unlearn.data import encode_prompt
    from unlearn.models import load_model

    tokenizer = load_model(str(opt_dir), log=lambda m: None).tokenizer
    prompt = "Who wrote it? " + "word " * 40
    while len(encode_prompt(tokenizer, prompt)) < 512 - 20:
        prompt += "word "
    n = len(encode_prompt(tokenizer, prompt))
    forget = write_jsonl(tmp_path / "forget.jsonl", [{"prompt": prompt, "response": "Jane Austen.",
                                                     "answers": ["Austen"]}])
    normal = write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    common = ["--model", opt_dir, "--max-new-tokens", "4", "--max-length", "512", "--no-probes", "--max-steps", "1"]
    refused = cli("run", forget, normal, *common, "-o", tmp_path / "checked")
    assert refused.code == 1 and refused.err.splitlines() == [
        f"unlearn: {forget}:1: the rendered prompt is {n} tokens; with the stop rule's check budget 32 that is "
        f"{n + 32} positions, past the context of --model {opt_dir} (512 positions: learned position embeddings, "
        f"max_position_embeddings 512); shorten the prompt, or run without the stop rule (--check-every 0)"]
    result = cli("run", forget, normal, *common, "--check-every", "0", "-o", tmp_path / "unchecked")
    assert result.code == 0, result.err



@pytest.mark.parametrize("rows, share, why, weight", [(3, "0.25", "fewer than 4 rows", "50"),
                                                      (4, "0.1", "0.1 of 4 rows rounds to none", "50"),
                                                      (3, "0.25", "fewer than 4 rows", "0")])
def test_no_row_held_back_is_said(cli, tmp_path, llama_dir, rows, share, why, weight):
    # (review 111) the normal-heldout line was left out without a word; at --normal-weight 0 the normal rows are
    # not trained on either (review 113)
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    normal = write_jsonl(tmp_path / "normal.jsonl", [{"prompt": f"Name a colour, {i}.", "response": "Red."}
                                                     for i in range(rows)])
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", *QUICK, "--normal-holdout", share,
                 "--normal-weight", weight)
    assert result.code == 0, result.err
    line = (f"--normal-holdout {share}: no NORMAL row held back ({why}), so there is no normal-heldout line"
            + (" and the normal similarity is of rows trained on" if weight != "0" else ""))
    assert line in result.err.splitlines()
    assert line in json.loads((tmp_path / "out" / "run.json").read_text())["notes"]


def test_the_probe_line_says_when_none_was_trained_on_or_made():
    # (review 111) it said "trained on (--retain-probes)" with no probe trained on, and named a probes.jsonl that
    # was empty (unlearn eval refuses it), now not written
    from unlearn.tables import _probe_lines

    def line(retained, made, file=None):
        return _probe_lines({"probes": {"sets": {"neighbours": {"made": made, "kept": 0}}, "retained": retained,
                                        "file": file}, "roles": {}})[0]
    assert line(0, 0).startswith("probes (held out: --retain-probes, but none could be trained on, built from")
    assert line(0, 0).endswith("neighbours 0 of 0 made; none made, so no probes.jsonl")
    assert line(3, 4, "out/probes.jsonl").startswith("probes (trained on (--retain-probes), built")
    assert line(3, 4, "out/probes.jsonl").endswith("; out/probes.jsonl")
    assert line(None, 4).startswith("probes (held out, built")


def test_the_steps_line_says_when_max_steps_cut_the_repair():
    # (review 111) a repair cut by --max-steps read as a finished one; and "1 repair steps"
    from unlearn.tables import _repair_note

    repair = {"first_forgotten": 1, "end": 3, "keep_terms_only_steps": 1, "whole_loss_steps": 0}
    assert _repair_note({"repair": {**repair, "finished": True}}) == (
        "; first forgotten after step 1, then 1 repair step of the keep terms alone and 0 of the whole loss")
    assert _repair_note({"repair": {**repair, "finished": False}}).endswith(
        "0 of the whole loss; --max-steps came first, before the repair could end (at a check from step 3 on)")
