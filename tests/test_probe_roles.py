"""How the automatic probes' sets are labelled and trained when other rows of the run ask the same prompts.

The tiny Llama makes two same-subject probes for "What is the capital of France?" ("What is France known for?
Answer in one sentence." and "Tell me one fact about France, in one sentence.") and answers nothing, so the
original's answers to the probes are scripted, as in test_probes.py.
"""

import json

import pytest

from test_run_cli import write_jsonl  # (the suite's JSONL writer)

KNOWN_FOR = "What is France known for? Answer in one sentence."
ONE_FACT = "Tell me one fact about France, in one sentence."
FAST = ["--max-steps", "1", "--check-every", "0", "--max-new-tokens", "8", "--batch-size", "1"]



@pytest.fixture
def scripted_probe_answers(monkeypatch):
    from unlearn.measure import Measurer

    answer_sets = Measurer.answer_sets

    def scripted(self, sets, *args, **kwargs):  # every probe answered with names that are no forget answer
        if [s.name for s in sets] != ["probes"]:
            return answer_sets(self, sets, *args, **kwargs)
        return {"probes": ["It is Lyon, in Europe."] * len(sets[0].examples)}

    monkeypatch.setattr(Measurer, "answer_sets", scripted)


@pytest.fixture
def files(tmp_path):
    forget = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "What is the capital of France?", "response": "It is Paris.",
                                           "answers": ["Paris"]}])
    normal = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "What do bees make?", "response": "Bees make honey."}])
    return forget, normal


def test_a_held_out_probe_set_whose_prompt_a_retain_row_trains_says_so(tmp_path, llama_dir, cli, files,
                                                                      scripted_probe_answers):
    forget, normal = files
    keep = write_jsonl(tmp_path / "keep.jsonl", [{"prompt": ONE_FACT, "response": "France is in Europe."}])
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--retain", keep, "--no-retain-probes", *FAST)
    assert result.code == 0, result.err
    roles = json.loads((out / "run.json").read_text())["roles"]
    assert roles["same subject"] == "1 of 2 trained"  # before: "held out", a trained row printed as a result


def test_ulmr_trains_no_probe_whose_prompt_it_forgets(tmp_path, llama_dir, cli, files, scripted_probe_answers):
    forget, normal = files
    augmented = write_jsonl(tmp_path / "aug.jsonl", [{"prompt": "What is the capital of France?",
                                                "response": "I'm not able to share that."},
                                               {"prompt": ONE_FACT, "response": "I'm not able to share that."}])
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--method", "ulmr", "--augmented", augmented,
                 "--retain-probes", "--alpha", "0.5", *FAST)
    assert result.code == 0, result.err
    record = json.loads((out / "run.json").read_text())
    rows = {r["prompt"]: r for r in map(json.loads, (out / "probes.jsonl").read_text().splitlines())}
    assert rows[ONE_FACT]["trained"] is False and rows[KNOWN_FOR]["trained"] is True
    assert record["probes"]["retained"] == 1  # before: 2, the augmented prompt trained both ways


def test_probes_jsonl_says_which_probes_are_trained(tmp_path, llama_dir, cli, files, scripted_probe_answers):
    forget, normal = files
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, *FAST)  # ga: --retain-probes by default
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    assert [r["trained"] for r in rows] == [True, True]
    off = tmp_path / "off"
    assert cli("run", forget, normal, "--model", llama_dir, "-o", off, "--no-retain-probes", *FAST).code == 0
    assert [json.loads(line)["trained"] for line in (off / "probes.jsonl").read_text().splitlines()] == [False, False]


def test_retain_rows_weigh_the_plain_default_when_no_probe_is_trained(tmp_path, llama_dir, cli):
    # no capitalised subject: no probe at all, so nothing trains at the probes' weight
    forget = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "where is the tallest tower?", "response": "it is in dubai."}])
    normal = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "What do bees make?", "response": "Bees make honey."}])
    keep = write_jsonl(tmp_path / "keep.jsonl", [{"prompt": "What do cows eat?", "response": "Cows eat grass."}])
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--retain", keep, *FAST)
    assert result.code == 0, result.err
    record = json.loads((out / "run.json").read_text())
    assert record["probes"]["retained"] == 0
    assert record["config"]["retain_weight"] == 10.0  # before: 50, the weight of a run that trains on probes
    assert "no probe joins the retain rows, so the --retain rows weigh 10" in result.err
    given = tmp_path / "given"
    assert cli("run", forget, normal, "--model", llama_dir, "-o", given, "--retain", keep, "--retain-weight", "50",
               *FAST).code == 0
    assert json.loads((given / "run.json").read_text())["config"]["retain_weight"] == 50.0  # asked for: kept
    alone = tmp_path / "alone"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", alone, "--retain-weight", "50", *FAST)
    assert result.code == 0, result.err
    assert "--retain-weight 50 does nothing: no probe joins the retain rows and no --retain file is given" in result.err
    assert [n for n in json.loads((alone / "run.json").read_text())["notes"] if "--normal-holdout" not in n] == [
        "--retain-weight 50 does nothing: no probe joins the retain rows and no --retain file is given"]
    plain = tmp_path / "plain"  # no weight given: nothing to say
    result = cli("run", forget, normal, "--model", llama_dir, "-o", plain, *FAST)
    assert result.code == 0, result.err
    assert "does nothing" not in result.err, result.err


def test_an_eval_file_named_like_a_probe_set_does_not_take_its_name(tmp_path, llama_dir, cli, files):
    forget, normal = files
    mine = write_jsonl(tmp_path / "neighbours.jsonl", [{"prompt": "What is the capital of Italy?",
                                                 "response": "It is Rome.", "answers": ["Rome"]}])
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--eval-retain", mine, *FAST)
    assert result.code == 0, result.err
    record = json.loads((out / "run.json").read_text())
    assert "neighbours" not in record["after"] and "neighbours'" in record["after"]
