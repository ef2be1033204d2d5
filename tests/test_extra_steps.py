"""--extra-steps after the stop rule fires, and --max-steps cutting them short: said in the log, the table's steps
line and run.json, not silently (the run said "stopped: forgotten" after 1 of the 3 steps asked, and after all of
them as if a check had read the model they made)."""

import json

from test_run_cli import FORGET, NORMAL, write_jsonl

QUICK = ["--max-new-tokens", "4", "--batch-size", "2", "--no-probes", "--eval-limit", "2"]


def test_extra_steps_run_after_the_rule_fires_and_a_cut_is_said(tmp_path, cli, llama_dir):
    rows = write_jsonl(tmp_path / "forget.jsonl", FORGET), write_jsonl(tmp_path / "normal.jsonl", NORMAL)
    # the tiny random model never says an answer, so the rule fires at the first check (step 1)
    result = cli("run", *rows, "--model", llama_dir, "-o", tmp_path / "cut", "--extra-steps", "3", "--max-steps", "2",
                 *QUICK)
    assert result.code == 0, result.err
    record = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert record["steps"] == 2 and record["stopped_by"] == "forgotten"
    assert record["extra_steps"] == {"asked": 3, "run": 1}
    assert "step 1: forget leak rate 0.00; --max-steps 2 leaves 1 of the 3 --extra-steps" in result.err
    assert "(stopped: forgotten; 1 of 3 --extra-steps after it: --max-steps came first)" in result.out

    result = cli("run", *rows, "--model", llama_dir, "-o", tmp_path / "whole", "--extra-steps", "2", *QUICK)
    assert result.code == 0, result.err
    record = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert record["steps"] == 3 and record["extra_steps"] == {"asked": 2, "run": 2}
    # all of them ran: said too, since no check read the model they made (review 111)
    assert "(stopped: forgotten; then 2 --extra-steps, which no check read)" in result.out
    assert "step 1: forget leak rate 0.00; 2 --extra-steps follow" in result.err and "leaves" not in result.err
    # none asked: nothing recorded
    result = cli("run", *rows, "--model", llama_dir, "-o", tmp_path / "none", *QUICK)
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "none" / "run.json").read_text())["extra_steps"] is None
