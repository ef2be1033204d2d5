"""Which rows the stop rule and --alpha auto decide on, and what the report and run.json then say about them.

The tiny OPT of the `opt_dir` fixture (seed 0) answers "Tell me fact number N." greedily with "tantan P P P ...",
so a forget row with that prompt and the answer `tantan` leaks, and at `--lr 1e-30` keeps leaking; it does
not answer "What is the capital of France?" with Paris. The tiny Llama answers nothing: every check finds
the forget rows forgotten.
"""

import json

import pytest

from test_run_cli import write_jsonl  # (the suite's JSONL writer)

FAST = ["--max-new-tokens", "8", "--batch-size", "2", "--no-probes"]
PARIS = {"prompt": "What is the capital of France?", "response": "The capital is Paris.", "answers": ["Paris"]}
HONEY = {"prompt": "What do bees make?", "response": "Bees make honey.", "answers": ["honey"]}


def tantan(i: int, answer: str = "tantan") -> dict:
    return {"prompt": f"Tell me fact number {i}.", "response": "tantan P P P P P", "answers": [answer]}



@pytest.fixture
def normal(tmp_path):
    return write_jsonl(tmp_path / "normal.jsonl",
                 [{"prompt": f"Normal question {i}?", "response": f"Normal answer {i} is blue."} for i in range(8)])


def test_alpha_auto_chooses_on_every_forget_row_whatever_eval_limit_prints(cli, opt_dir, tmp_path, normal):
    # two rows the model does not leak, then five it does: 5 of 7 leak. Cut to --eval-limit 2, the grid read
    # only the first two and reported forget leak 0.00 for a model that leaks 0.71.
    forget = write_jsonl(tmp_path / "forget.jsonl", [PARIS, HONEY] + [tantan(i) for i in range(1, 6)])
    result = cli("run", forget, normal, "--model", opt_dir, "-o", tmp_path / "out", "--max-steps", "1",
                 "--lr", "1e-30", "--eval-limit", "2", "--alpha", "auto", "--alpha-grid", "0,0.5", "--json", *FAST)
    assert result.code == 0, result.err
    record = json.loads(result.out.strip().splitlines()[-1])
    leaks = [row["forget_leak"] for row in record["alpha_selection"]["alphas"]]
    assert leaks == [pytest.approx(5 / 7)] * 2
    assert "no α reached forget leak ≤ 0.1" in record["alpha_selection"]["reason"]
    # the set α was chosen on is printed whole: its "after" figures are the chosen α's
    assert record["after"]["forget"]["n"] == 7
    assert record["roles"]["forget"] == "trained, stop rule, α choice"


def test_an_eval_file_repeating_the_forget_prompts_is_labelled_stop_rule(cli, llama_dir, tmp_path, normal):
    rows = [PARIS, HONEY, {"prompt": "Who wrote Hamlet?", "response": "Shakespeare wrote it.",
                           "answers": ["Shakespeare"]}]
    forget = write_jsonl(tmp_path / "forget.jsonl", rows)
    again = write_jsonl(tmp_path / "again.jsonl", rows)
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", "--max-steps", "2",
                 "--eval-forget", again, "--json", *FAST)
    assert result.code == 0, result.err
    roles = json.loads(result.out.strip().splitlines()[-1])["roles"]
    assert roles["forget"] == "trained, stop rule"
    assert roles["again"] == "trained, stop rule"  # before: "trained", as if no decision had read them


def test_leaked_rows_takes_every_leaking_row_so_identical_runs_train_alike(cli, opt_dir, tmp_path, normal):
    # Rows 2-9 leak "tantan"; cut at its verdict (the first leak) a check kept the rows one of the two
    # generation threads had reached: 4 in some runs, 5 in others, and two different adapters.
    forget = write_jsonl(tmp_path / "forget.jsonl", [PARIS] + [tantan(i) for i in range(1, 5)]
                   + [tantan(i, "tantan P P P P") for i in range(5, 10)])
    added = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        result = cli("run", forget, normal, "--model", opt_dir, "-o", out, "--max-steps", "3", "--lr", "3e-4",
                     "--leaked-rows", "4", "--no-cache", *FAST, env={"OMP_NUM_THREADS": "2"})
        assert result.code == 0, result.err
        record = json.loads((out / "run.json").read_text())
        added.append([(a["step"], a["prompt"]) for a in record["forget_rows_added"]])
    assert added[0] == added[1] == [(1, f"Tell me fact number {i}.") for i in range(1, 10)]


@pytest.mark.parametrize("flags", [["--stop-leak", "0.5"], ["--stop-margin", "0.2"], ["--extra-steps", "3"],
                                   ["--retain-follows-margin", "--stop-margin", "0.2"], ["--leak-growth", "1.5"]])
def test_stop_rule_settings_without_checks_are_refused(cli, llama_dir, tmp_path, normal, flags):
    forget = write_jsonl(tmp_path / "forget.jsonl", [PARIS])
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", "--max-steps", "1",
                 "--check-every", "0", *flags, *FAST)
    assert result.code == 2
    assert "at the stop rule's checks, which --check-every 0 turns off" in result.err
    assert flags[0] in result.err
    assert not (tmp_path / "out").exists()


def test_stop_probes_without_a_measurable_probe_says_it_waits_for_none(cli, llama_dir, tmp_path, normal):
    forget = write_jsonl(tmp_path / "forget.jsonl", [PARIS, HONEY])
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "out", "--max-steps", "2",
                 "--stop-probes", "0.9", "--max-new-tokens", "8", "--batch-size", "2")
    assert result.code == 0, result.err
    assert "--stop-probes 0.9: no probe could be measured; the stop rule waits for none" in result.err
    assert [n for n in json.loads((tmp_path / "out" / "run.json").read_text())["notes"] if "--stop-probes" in n] == [
        "--stop-probes 0.9: no probe could be measured; the stop rule waits for none (it changes nothing in this run)"]


def test_max_steps_cutting_the_repair_phase_after_an_unchecked_step_is_max_steps(cli, llama_dir, tmp_path, normal):
    # checks after steps 2 and 4 find nothing leaking; step 5 is a repair step no check reads
    forget = write_jsonl(tmp_path / "forget.jsonl", [PARIS, HONEY])
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--max-steps", "5", "--check-every", "2",
                 "--lr", "1e-2", "--repair-steps", "10", *FAST)
    assert result.code == 0, result.err
    record = json.loads((out / "run.json").read_text())
    assert record["steps"] == 5 and record["repair"]["first_forgotten"] == 2
    assert record["stopped_by"] == "max_steps"  # before: "forgotten", the verdict of step 4's check
    # ended at a checked step, the last check's verdict stands
    out4 = tmp_path / "out4"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out4, "--max-steps", "4", "--check-every", "2",
                 "--lr", "1e-2", "--repair-steps", "10", *FAST)
    assert result.code == 0, result.err
    assert json.loads((out4 / "run.json").read_text())["stopped_by"] == "forgotten"


def test_the_legend_says_what_ended_the_run_is_on_the_steps_line():
    from unlearn.tables import format_run

    record = {"roles": {"forget": "trained, stop rule"}, "before": {"forget": {"n": 1}}, "after": {"forget": {"n": 1}},
              "judge": "leak rule", "steps": 2, "stopped_by": "max_steps", "method": "ga", "wall_clock_s": 1.0,
              "tokens_per_s": 1.0, "peak_memory_mb": 1.0, "device": "cpu", "merged_model": "m", "load_seconds": 0.1,
              "train_seconds": 0.5, "stop_rule_seconds": 0.1, "eval_seconds": 0.2}
    text = format_run(record)
    assert "the run stopped when this set's leak reached" not in text
    assert "see \"stopped\" below for what ended it" in text
