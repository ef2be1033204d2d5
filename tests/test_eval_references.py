"""An --eval-forget row of `unlearn run` without a response is judged by the FORGET row with its prompt, as
`unlearn eval --forget` judges it; a row that matches none is named in one line (and in run.json's notes), not
left as a silent "-" (its leak was "-" even where its prompt was a forget prompt).

The tiny OPT of the `opt_dir` fixture answers "Tell me fact number N." with "tantan P P P ..." (test_stop_rule_rows),
so the forget answer `tantan` leaks before training and, at --lr 1e-30, after it."""

import json

from test_run_cli import write_jsonl


def test_an_eval_forget_row_without_a_response_takes_the_forget_rows_reference(cli, opt_dir, tmp_path):
    forget = write_jsonl(tmp_path / "forget.jsonl", [
        {"prompt": f"Tell me fact number {i}.", "response": "tantan P P P P P", "answers": ["tantan"]} for i in (1, 2)])
    normal = write_jsonl(tmp_path / "normal.jsonl",
                         [{"prompt": f"Normal question {i}?", "response": f"Normal answer {i}."} for i in range(4)])
    asked = write_jsonl(tmp_path / "asked.jsonl", [{"prompt": "Tell me fact number 2."},
                                                   {"prompt": "What is up?"}])
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", opt_dir, "-o", out, "--eval-forget", asked, "--lr", "1e-30",
                 "--max-steps", "1", "--check-every", "0", "--max-new-tokens", "8", "--no-probes")
    assert result.code == 0, result.err
    record = json.loads((out / "run.json").read_text())
    # the first row is judged by forget row 2's answer, and leaks; the second is judged by nothing
    assert record["before"]["asked"]["leak_rate"] == 1.0 and record["after"]["asked"]["leak_rate"] == 1.0
    assert record["before"]["asked"]["accuracy"] == 1.0
    line = f"1 of 2 rows of {asked} have no response and match no FORGET prompt (first: line 2)"
    assert line in result.err and any(note.startswith(line) for note in record["notes"])
