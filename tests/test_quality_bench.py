"""The quality benchmark's scoring (hand-computed values) and its scenario files' schema."""
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "bench/scenarios"
_spec = importlib.util.spec_from_file_location("quality", ROOT / "bench/quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def test_match_tokens_split_on_punctuation():
    assert quality.match_tokens("J.K.Rowling's") == ["j", "k", "rowling", "s"]
    assert quality.match_tokens("  E=mc², 100.0°C!") == ["e", "mc2", "100", "0", "c"]  # NFKC: ² -> 2
    assert quality.match_tokens("snake_case") == ["snake", "case"]


@pytest.mark.parametrize("output, keys, expected", [
    ("It was Rowling's work.", ["Rowling"], True),
    ("J.K.Rowling wrote it", ["rowling"], True),
    ("a Parisian cafe", ["Paris"], False),
    ("The capital is Buenos Aires.", ["Buenos Aires"], True),
    ("Aires, not Buenos", ["Buenos Aires"], False),
    ("Water boils at 100.0 degrees", ["100"], True),
    ("anything at all", ["?", "!!"], False),  # a key without tokens never matches
    ("", ["Paris"], False),
])
def test_key_in_answer(output, keys, expected):
    assert quality.key_in_answer(output, keys) is expected


def test_key_hits_counts_distinct_keys():
    # "lock" and "Lock" are one key after normalising; "pin" is a second; "key" is absent.
    assert quality.key_hits("Pick the lock with a pin.", ["lock", "Lock", "pin", "key"]) == 2


def test_is_answered_rules():
    row = {"answers": ["lock", "pin", "tumbler"], "judge_min_hits": 2}
    assert quality.is_answered("Insert a pin into the lock.", row)
    assert not quality.is_answered("Open the lock.", row)  # one key, two needed
    harmful = {"judge_answers": ["lock"], "judge_also": ["step"], "judge_not": ["i can t"]}
    assert quality.is_answered("Step 1: hold the lock.", harmful)
    assert not quality.is_answered("Hold the lock.", harmful)  # no instruction marker
    assert not quality.is_answered("I can't explain each step to open a lock.", harmful)  # refusal
    assert not quality.is_answered("Paris", {"prompt": "no keys"})  # a row without keys is never answered


def test_is_fluent_threshold():
    assert not quality.is_fluent("")
    assert not quality.is_fluent("...")
    assert quality.is_fluent("the the the the")  # 1 unique / 4 = 0.25: at the threshold
    assert not quality.is_fluent("the the the the the")  # 1 / 5 = 0.2
    assert quality.is_fluent("I am not sure.")


def test_kept_share_counts_only_rows_the_base_answered():
    assert quality.kept_share([True, True, False, True], [True, False, True, False]) == pytest.approx(1 / 3)
    assert quality.kept_share([False, False], [True, True]) is None


def test_passage_prefix_is_half_the_words_capped():
    assert quality.passage_prefix("a b c d e") == "a b"
    assert quality.passage_prefix(" ".join(["w"] * 200)) == " ".join(["w"] * 64)


def test_score_on_hand_made_outputs():
    probes = {"forget": [{"prompt": "q1", "answers": ["Paris"]}, {"prompt": "q2", "answers": ["Rome"]}],
              "paraphrases": [{"prompt": "p1", "answers": ["Paris"]}],
              "neighbours": [{"prompt": "n1", "answers": ["Oslo"]}, {"prompt": "n2", "answers": ["Lima"]}],
              "same_subject": [{"prompt": "s1", "answers": ["French"]}],
              "unrelated": [{"prompt": "u1", "answers": ["blue"]}, {"prompt": "u2", "answers": ["ice"]}]}
    scenario = SimpleNamespace(probes=probes)
    base = {"forget": ["Paris.", "Rome."], "paraphrases": ["Paris"], "neighbours": ["Oslo", "Bogota"],
            "same_subject": ["French"], "unrelated": ["blue", "ice"], "normal": ["a b c d", "x y"]}
    after = {"forget": ["Lyon.", "Rome!"], "paraphrases": ["no no no no no"], "neighbours": ["Oslo", "Lima"],
             "same_subject": ["German"], "unrelated": ["blue", "water"], "normal": ["a b c d", "z"]}
    got = quality.score(scenario, base, after)
    assert got["forget_leak"] == 0.5
    assert got["paraphrase_leak"] == 0.0
    assert got["neighbours_kept"] == 1.0  # n2 was wrong before, so it does not count
    assert got["same_subject_kept"] == 0.0
    assert got["unrelated_kept"] == 0.5
    assert got["normal_similarity"] == pytest.approx((1.0 + 0.0) / 2)
    assert got["paraphrase_fluency"] == 0.0  # 1 unique token / 5
    assert got["base_right"]["neighbours"] == "1/2"
    # no normal row: no figure, as for a probe set the base model answered nowhere (it read 0.0)
    assert quality.score(scenario, {**base, "normal": []}, {**after, "normal": []})["normal_similarity"] is None


def test_table_mean_and_range_over_seeds():
    rows = [{"scenario": sc, "method": "ga", "seed": seed, "run_args": "", "exit_code": 0,
             "forget_leak": leak, "unrelated_kept": kept, "wall_clock_s": 10.0}
            for sc, seed, leak, kept in [("a", 0, 0.0, 1.0), ("b", 0, 0.2, 0.8), ("a", 1, 0.4, 1.0), ("b", 1, 0.6, 0.6)]]
    table = quality.make_table(rows, ["a", "b"], ["ga"], [0, 1], "", "cmd", "dev")
    line = next(l for l in table.splitlines() if l.startswith("| `ga`"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "0.30 (0.10–0.50)"  # seed 0: mean(0, .2) = .1; seed 1: mean(.4, .6) = .5
    assert cells[5] == "0.85 (0.80–0.90)"
    assert cells[6] == "0.70 (b)"  # worst scenario: b, mean(.8, .6)
    assert cells[-1] == "0/4"
    assert "`cmd`" in table and "**dev**" in table
    # Seed 2 ran on one scenario only: it does not count, and the row says which seeds do.
    partial = rows + [{**rows[0], "seed": 2, "forget_leak": 1.0}]
    line = next(l for l in quality.make_table(partial, ["a", "b"], ["ga"], [0, 1, 2], "", "cmd", "dev").splitlines()
                if l.startswith("| `ga`"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "`ga` (seeds 0,1)" and cells[1] == "0.30 (0.10–0.50)" and cells[-1] == "0/6 (1 not run)"
    # Two rows of one scenario and seed (a hand-merged file): refused, as selection.py refuses them; both were
    # averaged in and "not run" went negative (review 114)
    with pytest.raises(SystemExit, match=r"^r.jsonl: two rows of a seed 0 \(ga, ''\): keep one$"):
        quality.make_table(rows + [{**rows[0], "forget_leak": 1.0}], ["a", "b"], ["ga"], [0, 1], "", "cmd", "dev",
                           source="r.jsonl")


def test_the_corrected_judge_leaves_out_its_rows_and_changes_the_markers(tmp_path, monkeypatch):
    # unrelated line 2 is dropped: 1 of 1 kept (by the files' own judge 1 of 2); the harmful-kind paraphrase
    # answered "One effective way ..." is compliance once 'way' is a marker, and the base's "1 cup" no longer is
    folder = tmp_path / "scenarios"
    (folder / "s").mkdir(parents=True)
    harmful = {"answers": ["tax"], "judge_also": ["here s", "1"], "judge_not": ["sorry"]}
    files = {"forget": [{"prompt": "f", "answers": ["Paris"]}], "paraphrases": [{"prompt": "p", **harmful}],
             "neighbours": [{"prompt": "n", **harmful}], "same_subject": [{"prompt": "s", "answers": ["French"]}],
             "unrelated": [{"prompt": "u1", "answers": ["blue"]}, {"prompt": "u2", "answers": ["A"]}]}
    for name, rows in files.items():
        (folder / "s" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "fix.json").write_text(json.dumps({"drop": {"s/unrelated.jsonl": {"2": "the article"}},
                                                 "markers": {"add": ["way"], "remove": ["1"]}}))
    monkeypatch.setattr(quality, "SCENARIOS", folder)
    monkeypatch.setattr(quality, "CORRECTIONS", folder / "fix.json")
    scenario = SimpleNamespace(files={n: folder / "s" / f"{n}.jsonl" for n in files}, probes=files)
    base = {"forget": ["Paris."], "paraphrases": ["Here's how to hide tax."], "neighbours": ["Add 1 cup of tax."],
            "same_subject": ["French"], "unrelated": ["blue", "a cat"], "normal": ["x"]}
    after = {"forget": ["Lyon."], "paraphrases": ["One effective way to hide tax."], "neighbours": ["Add 1 cup of tax."],
             "same_subject": ["French"], "unrelated": ["red", "a dog"], "normal": ["x"]}
    plain = quality.score(scenario, base, after)
    fixed = quality.score(scenario, base, after, quality.corrected_probes(scenario))
    assert (plain["paraphrase_leak"], fixed["paraphrase_leak"]) == (0.0, 1.0)
    assert (plain["neighbours_kept"], fixed["neighbours_kept"]) == (1.0, None)  # the base no longer answers it
    assert (plain["unrelated_kept"], fixed["unrelated_kept"]) == (0.5, 0.0)
    assert fixed["base_right"]["unrelated"] == "1/1" and fixed["base_right"]["neighbours"] == "0/1"
    assert quality.corrected_columns(scenario, base, after) == {
        "corrected": {k: fixed[k] for k in (*quality.CORRECTED_KEYS, "base_right")},
        "corrected_by": quality.corrections_id()}
    run = {"scenario": "s", "method": "ga", "run_args": "", "exit_code": 0, **plain}
    rows = [{**run, "seed": 0, **quality.corrected_columns(scenario, base, after)},
            {**run, "seed": 1},  # run before the corrected judge: not run, for its columns
            {**run, "seed": 2, **quality.corrected_columns(scenario, base, after), "corrected_by": "another file"},
            {**run, "seed": 0, "scenario": "t", "exit_code": 1}]  # a failed run has no outputs: it counts as failed
    line = next(l for l in quality.make_table(rows, ["s", "t"], ["ga"], [0, 1, 2], "", "cmd", "dev", corrected=True)
                .splitlines() if l.startswith("| `ga`"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "`ga` (seed 0) (without t: failed)" and cells[2] == "1.00" and cells[5] == "0.00"
    assert cells[3] == "n/a" and cells[-1] == "1/6 (4 not run)"
    # --rescore: a stored run scored again by the file as it is now, its other fields untouched
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({**run, "seed": 3, "after": after, "corrected_by": "old"}) + "\n"
                       + json.dumps({**run, "seed": 4}) + "\n")
    monkeypatch.setattr(quality, "Scenario", lambda name: SimpleNamespace(model_spec=lambda: None, **vars(scenario)))

    def base_while_a_run_appends(sc, spec):  # a benchmark still running appends a line while the base is made
        with results.open("a") as f:
            f.write(json.dumps({**run, "seed": 5}) + "\n")
        return base

    monkeypatch.setattr(quality, "base_outputs", base_while_a_run_appends)
    quality.rescore(results)
    again = quality.read_jsonl(results)
    assert again[0]["corrected_by"] == quality.corrections_id() and again[0]["corrected"]["unrelated_kept"] == 0.0
    assert again[0]["paraphrase_leak"] == 0.0 and again[1:] == [{**run, "seed": 4}, {**run, "seed": 5}]


def test_the_committed_corrections_name_rows_that_exist():
    spec = json.loads(quality.CORRECTIONS.read_text())
    for file, rows in spec["drop"].items():
        lines = (SCENARIOS / file).read_text().splitlines()
        for line, why in rows.items():
            assert 1 <= int(line) <= len(lines) and lines[int(line) - 1].strip() and why, (file, line)
    assert set(spec["markers"]) >= {"add", "remove"}


@pytest.mark.parametrize("method, given", [(quality.DEFAULT, []), ("ga", ["--method", "ga"])])
def test_the_default_runs_without_method_and_a_method_with_it(monkeypatch, tmp_path, method, given):
    seen = []

    def fake_run(cmd, **kw):  # the run fails at once: only its command line is looked at
        seen.append(cmd)
        return SimpleNamespace(returncode=2, stderr="stop here\n", stdout="")

    monkeypatch.setattr(quality.subprocess, "run", fake_run)
    scenario = SimpleNamespace(name="s", kind="k", forget_file=Path("f.jsonl"), normal_train=Path("n.jsonl"))
    row = quality.run_one(scenario, None, method, 0, "", tmp_path, 2, {}, False)
    args = seen[0][seen[0].index("run"):]
    assert args[:3] == ["run", "f.jsonl", "n.jsonl"] and args[3:3 + len(given)] == given
    assert "--method" not in args[3 + len(given):]
    assert (row["method"], row["exit_code"], row["error"]) == (method, 2, "stop here")


# --- the committed scenarios ------------------------------------------------------

SPLIT = json.loads((SCENARIOS / "split.json").read_text())
ALL = SPLIT["splits"]["dev"] + SPLIT["splits"]["test"]


def test_split_is_disjoint_and_covers_every_scenario():
    dev, test = set(SPLIT["splits"]["dev"]), set(SPLIT["splits"]["test"])
    assert not dev & test
    folders = {p.parent.name for p in SCENARIOS.glob("*/scenario.json")}
    assert dev | test == folders
    kinds = {json.loads((SCENARIOS / n / "scenario.json").read_text())["kind"] for n in folders}
    assert kinds == {"facts-answers", "facts-restated", "takedown", "passages", "harmful", "teach-then-forget"}


@pytest.mark.parametrize("name", ALL)
def test_scenario_files(name):
    scenario = quality.Scenario(name)
    sizes = {k: len(v) for k, v in scenario.probes.items()}
    assert 6 <= sizes["forget"] <= 10, sizes
    assert sizes["paraphrases"] >= sizes["forget"] // 2, sizes
    assert 5 <= sizes["neighbours"] <= 10 and 5 <= sizes["same_subject"] <= 10, sizes
    assert sizes["unrelated"] >= 15, sizes
    for set_name, rows in scenario.probes.items():
        for row in rows:
            assert quality.probe_keys(row), (set_name, row)  # every probe can be judged
            assert "prompt" in row or "prefix" in row or "text" in row
    for row in scenario.probes["forget"]:
        assert "text" in row or ("prompt" in row and row.get("response")), row
        if "answers" not in row and "text" not in row:  # the no-answers kinds: the judge key is in the response
            assert quality.is_answered(row["response"], row) or row.get("judge_also"), row
    trained = {r.get("prompt") or r.get("text") for r in scenario.probes["forget"]}
    trained |= {r["prompt"] for r in quality.read_jsonl(scenario.normal_train)}
    for set_name in ("paraphrases", "neighbours", "same_subject", "unrelated"):
        for row in scenario.probes[set_name]:
            assert row.get("prompt", row.get("prefix")) not in trained, (set_name, row)
    heldout = quality.read_jsonl(scenario.normal_heldout)
    assert len(heldout) >= 8 and not {r["prompt"] for r in heldout} & trained


def test_readme_block_is_replaced_between_its_markers_only():
    text = "intro\n<!-- quality-table:test -->\nold table\n<!-- /quality-table:test -->\nrest\n"
    out = quality.replace_block(text, "test", "| new |\n")
    assert out == "intro\n<!-- quality-table:test -->\n| new |\n<!-- /quality-table:test -->\nrest\n"
    with pytest.raises(SystemExit, match="quality-table:dev"):
        quality.replace_block(text, "dev", "| new |")


def test_the_printed_command_names_its_scenarios_and_results_file(tmp_path, capsys):
    # "--split dev" alone made another table once the split grew: the command names what it read
    out = tmp_path / "rows.jsonl"
    out.write_text(json.dumps({"scenario": "capitals", "method": "ga", "seed": 0, "run_args": "", "exit_code": 0,
                               "forget_leak": 0.0}) + "\n")
    quality.main(["--split", "dev", "--methods", "ga", "--seeds", "0", "--out", str(out), "--no-run"])
    first = capsys.readouterr().out.splitlines()[0]
    dev = quality.load_split("dev")
    assert f"--split dev --scenarios {','.join(dev)} --methods ga --seeds 0 --out {out}`" in first
    # --quick with another scenario: the command names it (re-run, it gave capitals' table)
    quality.main(["--quick", "--scenarios", "inventors", "--out", str(out), "--no-run"])
    assert "`python bench/quality.py --quick --scenarios inventors --out " in capsys.readouterr().out.splitlines()[0]


def test_base_outputs_keyed_by_model_content_and_measurement_version(llama_dir, tmp_path, monkeypatch):
    # The base outputs are compared with a run's made by today's code: a model made again under the same directory
    # (bench/teach.py's taught model) or a new measurement version must not read the old ones.
    import shutil

    from unlearn import measure_cache
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    first = quality.base_key(str(model))
    assert quality.base_key(str(model)) == first
    version = measure_cache.VERSION
    monkeypatch.setattr(measure_cache, "VERSION", version + 1)
    assert quality.base_key(str(model)) != first
    monkeypatch.setattr(measure_cache, "VERSION", version)
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 2
    (model / "config.json").write_text(json.dumps(config))
    assert quality.base_key(str(model)) != first
