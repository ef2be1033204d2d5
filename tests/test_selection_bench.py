"""bench/selection.py: the rule that chooses defaults, on hand-computed rows and on the committed results files."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The default's rows before the anchors (fifty-third session): the earlier decisions were judged against them.
BEFORE_ANCHORS = ROOT / "bench/results/dev-default-s52.json"
# The default's rows with the anchors on passages too (fifty-third session, and excerpts' first rows): the fifty-fourth
# session's candidate, anchors for chat rows only, was judged against them.
WITH_PASSAGE_ANCHORS = ROOT / "bench/results/dev-default-s53.json"
# the dev split before the fifty-fourth session added excerpts: earlier decisions are read over these
SEVEN = ["capitals", "tofu", "harmful", "openings", "inventors", "mischief", "nature"]
_spec = importlib.util.spec_from_file_location("selection", ROOT / "bench/selection.py")
selection = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(selection)


def row(scenario="s", seed=0, method="default", run_args="", forget=0.0, paraphrase=0.0, neighbours=1.0,
        same=1.0, unrelated=1.0, normal=1.0, wall=60.0, exit_code=0):
    return {"scenario": scenario, "seed": seed, "method": method, "run_args": run_args, "exit_code": exit_code,
            "forget_leak": forget, "paraphrase_leak": paraphrase, "neighbours_kept": neighbours,
            "same_subject_kept": same, "unrelated_kept": unrelated, "normal_similarity": normal,
            "wall_clock_s": wall}


def figures(score, forget=0.0, paraphrase=0.0, neighbours=1.0, same=1.0, unrelated=1.0, normal=1.0, longest=60.0):
    return {"score": score, "forget_leak": forget, "paraphrase_leak": paraphrase, "neighbours_kept": neighbours,
            "same_subject_kept": same, "unrelated_kept": unrelated, "normal_similarity": normal,
            "longest_run_s": longest}


def test_a_runs_score_is_the_mean_of_its_six_columns_oriented_upwards():
    # (1 - 0.1) + (1 - 0.2) + 0.5 + 0.6 + 0.9 + 0.7 = 4.4; / 6
    r = row(forget=0.1, paraphrase=0.2, neighbours=0.5, same=0.6, unrelated=0.9, normal=0.7)
    assert selection.run_score(r) == pytest.approx(4.4 / 6)


def test_a_scenarios_figures_are_means_over_its_seeds_and_a_failed_run_has_none():
    rows = [row(seed=0, paraphrase=0.0, wall=50), row(seed=1, paraphrase=0.3, wall=70), row(seed=2, paraphrase=0.3)]
    s = selection.summary(rows)
    assert s["paraphrase_leak"] == pytest.approx(0.2) and s["longest_run_s"] == 70
    assert s["score"] == pytest.approx(((6 - 0) + (6 - 0.3) * 2) / 6 / 3)  # every other column at its best
    assert selection.summary(rows[:2] + [row(seed=2, exit_code=1)])["score"] is None


def test_seed_rows_need_every_seed_and_refuse_two_rows_for_one():
    rows = [row(seed=0), row(seed=1), row(seed=2), row(seed=2, run_args="--other")]
    assert [r["seed"] for r in selection.seed_rows(rows, "s", "default", "", "f")] == [0, 1, 2]
    assert selection.seed_rows(rows, "s", "ga", "", "f") is None  # never ran there: trains as the default
    with pytest.raises(SystemExit, match=r"f: s \(default, ''\) lacks seed\(s\) \[2\]"):
        selection.seed_rows(rows[:2], "s", "default", "", "f")  # not judged on the default's seed 2
    with pytest.raises(SystemExit, match="f: two rows of s seed 2"):
        selection.seed_rows(rows + [row(seed=2)], "s", "default", "", "f")


def test_a_mean_of_three_tenths_meets_the_paraphrase_target():
    assert (0.1 + 0.1 + 0.1) / 3 > 0.10  # the float that would miss it
    assert "paraphrase_leak" in selection.targets_met(figures(0.9, paraphrase=(0.1 + 0.1 + 0.1) / 3))
    assert "paraphrase_leak" not in selection.targets_met(figures(0.9, paraphrase=0.11))


@pytest.mark.parametrize("candidate_a, verdict", [
    (figures(0.84), "adopted by the score (if the README command is no slower)"),  # mean +0.02 exactly
    (figures(0.8399, paraphrase=0.12), "not adopted"),  # +0.01995: a tie that meets no new target
    (figures(0.8399, paraphrase=0.05), "a tie, adopted by the targets (if the README command is no slower)"),
    (figures(0.8399, paraphrase=0.05, longest=400), "not adopted"),  # it also misses one the default meets
    (figures(0.95, forget=0.2), "not adopted: the mean forget leak is over the gate"),  # (0.2 + 0) / 2 > 0.05
    (figures(0.7901, paraphrase=0.05), "a tie, adopted by the targets (if the README command is no slower)"),  # -0.005
    (figures(0.7599, paraphrase=0.05), "not adopted"),  # -0.02005: worse than a tie
    (figures(0.95, forget=0.1), "adopted by the score (if the README command is no slower)"),  # (0.1 + 0) / 2 = 0.05
    (figures(None), "no verdict: a failed run or a missing figure in the candidate's a (seeds None)"),
])
def test_the_verdict_follows_the_declared_rule(candidate_a, verdict):
    default = {"a": figures(0.80, paraphrase=0.12), "b": figures(0.80)}
    got = selection.judge(default, {"a": candidate_a, "b": default["b"]})
    assert got["verdict"] == verdict
    if candidate_a["score"] is not None:
        assert got["default_score"] == pytest.approx(0.80) and got["bar"] == pytest.approx(0.82)
        assert got["candidate_score"] == pytest.approx((candidate_a["score"] + 0.80) / 2)


def test_the_committed_rows_give_the_documented_decisions(capsys):
    """The fortieth and fiftieth sessions' refusal candidates against the six dev scenarios of their declared test
    (docs/quality.md): 0.8393 and 0.8427 against the default's 0.8231, where the rule asks 0.8431."""
    six = "capitals,tofu,harmful,openings,inventors,mischief"
    for path, args, score in (("quality-dev-s40-topic-probes.jsonl", "--retain-probes", 0.83927),
                              ("quality-dev-s50-topic-probes-200.jsonl", "--retain-probes --retain-weight 200",
                               0.84267)):
        selection.main([str(ROOT / "bench/results" / path), f"--run-args={args}", "--scenarios", six, "--json",
                        "--defaults", str(BEFORE_ANCHORS)])
        got = json.loads(capsys.readouterr().out)
        assert got["default_score"] == pytest.approx(0.82306, abs=5e-6)
        assert got["candidate_score"] == pytest.approx(score, abs=5e-6)
        assert got["ran"] == ["harmful", "mischief"] and got["verdict"] == "not adopted"
        assert got["forget_leak"] == pytest.approx(0.0667 / 6, abs=1e-4)  # openings' default rows: 0.10, 0, 0.10


# The issues' targets as the thirty-ninth session's amendment reads them per scenario: a value that meets each, and
# the nearest that misses it.
TARGET_EDGES = {"forget_leak": (0.05, 0.0501), "paraphrase_leak": (0.10, 0.1001), "neighbours_kept": (0.90, 0.8999),
                "same_subject_kept": (0.90, 0.8999), "unrelated_kept": (0.90, 0.8999),
                "normal_similarity": (0.70, 0.6999), "longest_run_s": (300.0, 300.1)}


def test_each_target_is_met_at_its_bound_and_missed_past_it():
    assert {name for name, _, _ in selection.TARGETS} == set(TARGET_EDGES)
    for name, (met, missed) in TARGET_EDGES.items():
        assert name in selection.targets_met({name: met}), name
        assert name not in selection.targets_met({name: missed}), name


def test_float_sums_at_the_rules_edges_read_as_the_edge():
    default = {"a": figures(0.81), "b": figures(0.80)}
    got = selection.judge(default, {"a": figures(0.85), "b": default["b"]})
    assert got["candidate_score"] - got["default_score"] < 0.02  # 0.019999999999999907 in floats
    assert got["verdict"] == "adopted by the score (if the README command is no slower)"
    # worse by the margin exactly is not a tie, whatever targets it gains
    default = {"a": figures(0.85, paraphrase=0.12), "b": figures(0.80)}
    got = selection.judge(default, {"a": figures(0.81, paraphrase=0.05), "b": default["b"]})
    assert got["targets_gained"]["a"] == ["paraphrase_leak"] and got["verdict"] == "not adopted"
    # six scenarios' forget leaks of 0, 0, 0, 0, 0.1 and 0.2 average 0.05000000000000001: at the gate, not over it
    leaks = (0.0, 0.0, 0.0, 0.0, 0.1, 0.2)
    assert sum(leaks) / 6 > 0.05
    default = {str(i): figures(0.70) for i in range(6)}
    got = selection.judge(default, {str(i): figures(0.90, forget=leak) for i, leak in enumerate(leaks)})
    assert got["verdict"] == "adopted by the score (if the README command is no slower)"


def test_a_tie_that_loses_a_target_is_not_adopted_however_many_it_gains():
    default = {"a": figures(0.80, paraphrase=0.12, neighbours=0.85), "b": figures(0.80)}
    candidate = figures(0.81, paraphrase=0.05, neighbours=0.95, normal=0.65)
    got = selection.judge(default, {"a": candidate, "b": default["b"]})
    assert got["targets_gained"]["a"] == ["neighbours_kept", "paraphrase_leak"]
    assert got["targets_lost"]["a"] == ["normal_similarity"] and got["verdict"] == "not adopted"


def test_a_figure_one_side_lacks_is_neither_gained_nor_lost():
    default = {"a": figures(0.80, paraphrase=0.12, longest=None), "b": figures(0.80)}
    got = selection.judge(default, {"a": figures(0.81, paraphrase=0.12, longest=200), "b": default["b"]})
    assert got["targets_gained"]["a"] == [] and got["verdict"] == "not adopted"


def test_a_failed_default_run_is_named_once():
    default = {"a": {"score": None, "failed_seeds": [1]}, "b": figures(0.80)}
    got = selection.judge(default, {"a": default["a"], "b": figures(0.90)})
    assert got["verdict"] == "no verdict: a failed run or a missing figure in the default's a (seeds [1])"


def test_the_thirty_ninth_sessions_tie_is_adopted_by_its_targets(tmp_path):
    """The one decision the tie-break made: spellings, 0.8231 against the default of the time's 0.8233 (worse by
    0.0002), meeting four targets that default missed and missing none (docs/quality.md, thirty-ninth session)."""
    margin = {"file": "quality-dev-s24-margin-lr2e-3.jsonl", "method": "ga",
              "run_args": "--forget-loss unlikelihood --stop-margin 0.05 --lr 2e-3"}
    refusal = {"method": "ga+template", "run_args": "--normal-weight 200"}
    spec = tmp_path / "before-39.json"
    spec.write_text(json.dumps({"scenarios": {
        "capitals": margin, "tofu": margin, "openings": margin,
        "inventors": {"file": "quality-dev-s26-inventors.jsonl", "method": "ga", "run_args": ""},
        "harmful": {"file": "quality-dev-s34-refusal-normal-weight.jsonl", **refusal},
        "mischief": {"file": "quality-dev-s35-mischief.jsonl", **refusal}}}))
    six = ["capitals", "tofu", "harmful", "openings", "inventors", "mischief"]
    default = selection.default_summaries(six, spec)
    rows = selection.read_rows(selection.RESULTS / "quality-dev-s37-spellings.jsonl")
    candidate = {name: (selection.summary(mine) if (mine := selection.seed_rows(
        rows, name, "ga", "--forget-loss spellings", "s37")) else default[name]) for name in six}
    got = selection.judge(default, candidate)
    assert round(got["default_score"], 4) == 0.8233 and round(got["candidate_score"], 4) == 0.8231
    assert got["targets_gained"]["inventors"] == ["forget_leak", "longest_run_s", "paraphrase_leak"]
    assert got["targets_gained"]["capitals"] == ["unrelated_kept"] and not any(got["targets_lost"].values())
    assert got["verdict"] == "a tie, adopted by the targets (if the README command is no slower)"


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "bad.jsonl:1: a row is a JSON object"),
    ('{"scenario": "s", "method": "default", "run_args": "", "seed": "0"}', "bad.jsonl:1: no seed"),
    (json.dumps({**row(), "forget_leak": "0.1"}), "bad.jsonl:1: forget_leak is not a number: '0.1'"),
    (json.dumps({k: v for k, v in row().items() if k != "method"}), "bad.jsonl:1: no method"),
])
def test_a_row_the_rule_cannot_read_is_one_line(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(line + "\n")
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        selection.read_rows(tmp_path / "bad.jsonl")


def test_a_missing_file_or_a_bad_line_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="nothing.jsonl: No such file"):
        selection.read_rows(tmp_path / "nothing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(row()) + "\n\n{oops\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:3: not a JSON row"):
        selection.read_rows(bad)


def test_every_dev_scenario_has_the_defaults_rows_named():
    split = json.loads((ROOT / "bench/scenarios/split.json").read_text())["splits"]["dev"]
    summaries = selection.default_summaries(split)
    assert set(summaries) == set(split) and all(s["score"] is not None for s in summaries.values())
    # the fifty-fourth session's, passages without anchors: openings 0.8647 and excerpts 0.8427 in the eight
    assert selection.split_score(summaries) == pytest.approx(0.8349, abs=5e-5)
    before = selection.default_summaries(split, WITH_PASSAGE_ANCHORS)
    # before it, over the eight: the seven below and excerpts' 0.8346, (7 x 0.82996 + 0.8346) / 8
    assert selection.split_score(before) == pytest.approx(0.8305, abs=5e-5)
    # the fifty-third session's seven, with the anchors' rows on nature, inventors and openings (docs/quality.md)
    assert selection.split_score({k: v for k, v in before.items() if k in SEVEN}) == pytest.approx(0.8300, abs=5e-5)
    # and the fiftieth session's, before them: (6 x 0.8231 + 0.709) / 7
    assert selection.split_score(selection.default_summaries(SEVEN, BEFORE_ANCHORS)) == pytest.approx(0.8068, abs=5e-5)


def test_the_anchors_decision_reads_as_documented(capsys):
    """The fifty-third session's scoped candidate against the default before it: 0.8300 against 0.8068, bar 0.8199,
    over the seven dev scenarios of the time."""
    selection.main([str(ROOT / "bench/results/quality-dev-s53-anchors.jsonl"), "--run-args=", "--scoped", "--json",
                    "--defaults", str(BEFORE_ANCHORS), "--scenarios", ",".join(SEVEN)])
    got = json.loads(capsys.readouterr().out)
    assert got["default_score"] == pytest.approx(0.8068, abs=5e-5)
    assert got["candidate_score"] == pytest.approx(0.8300, abs=5e-5)
    assert got["bar"] == pytest.approx(0.8068 + 0.0131, abs=1e-4) and got["ran"] == ["inventors", "nature", "openings"]
    assert got["verdict"] == "adopted by the score (if the README command is no slower)"


def test_the_chat_row_anchors_decision_reads_as_documented(capsys):
    """The fifty-fourth session's scoped candidate: 0.8349 against 0.8305, under the bar 0.8405 but within the margin,
    and adopted by the targets it gains (openings' paraphrase leak and unrelated facts, excerpts' longest run)."""
    selection.main([str(ROOT / "bench/results/quality-dev-s54-chat-anchors.jsonl"), "--run-args=", "--scoped", "--json",
                    "--defaults", str(WITH_PASSAGE_ANCHORS)])
    got = json.loads(capsys.readouterr().out)
    assert got["default_score"] == pytest.approx(0.8305, abs=5e-5)
    assert got["candidate_score"] == pytest.approx(0.8349, abs=5e-5)
    assert got["bar"] == pytest.approx(0.8305 + 0.0100, abs=1e-4) and got["ran"] == ["excerpts", "openings"]
    assert got["targets_gained"]["openings"] == ["paraphrase_leak", "unrelated_kept"]
    assert got["targets_gained"]["excerpts"] == ["longest_run_s"] and not any(got["targets_lost"].values())
    assert got["verdict"] == "a tie, adopted by the targets (if the README command is no slower)"


def test_a_scoped_candidates_margin_scales_with_the_root_of_its_reach():
    # 0.02 * sqrt(2 / 7) = 0.02 * 0.534522 = 0.0106904
    assert selection.margin_for(2, 7) == pytest.approx(0.0106904, abs=1e-7)
    assert selection.margin_for(7, 7) == selection.MARGIN
    for reached in (0, 8):
        with pytest.raises(ValueError):
            selection.margin_for(reached, 7)


@pytest.mark.parametrize("gain, verdict", [
    (0.0375, "adopted by the score (if the README command is no slower)"),  # 2 x 0.0375 / 7 = 0.010714 >= 0.010690
    (0.0373, "not adopted"),  # 0.010657: a tie, and no target gained
    (-0.035, "a tie, adopted by the targets (if the README command is no slower)"),  # -0.01, a target gained
    (-0.0375, "not adopted"),  # -0.010714: worse than a tie by the scoped margin, though within MARGIN
])
def test_a_scoped_candidate_is_judged_by_its_margin_over_the_whole_split(gain, verdict):
    default = {name: figures(0.80, paraphrase=0.12) for name in "abcdefg"}  # paraphrase target missed everywhere
    gained = 0.05 if gain < 0 else 0.12  # the losing candidates meet it in a and b
    candidate = {**default, "a": figures(0.80 + gain, paraphrase=gained), "b": figures(0.80 + gain, paraphrase=gained)}
    got = selection.judge(default, candidate, selection.margin_for(2, 7))
    assert got["verdict"] == verdict and got["bar"] == pytest.approx(0.8106904, abs=1e-7)
    if gain > 0:
        assert selection.judge(default, candidate)["verdict"] == "not adopted"  # MARGIN over all seven asks 0.07


def test_scoped_is_asked_for_and_printed_as_such(capsys):
    """The fiftieth session's candidate read with --scoped (a figure, not its decision: that candidate was not
    declared scoped before its runs, and its test rows were seen after, so this rule cannot adopt it)."""
    six = "capitals,tofu,harmful,openings,inventors,mischief"
    path = ROOT / "bench/results/quality-dev-s50-topic-probes-200.jsonl"
    args = [str(path), "--run-args=--retain-probes --retain-weight 200", "--scenarios", six,
            "--defaults", str(BEFORE_ANCHORS)]
    selection.main(args + ["--scoped", "--json"])
    got = json.loads(capsys.readouterr().out)
    assert got["margin"] == pytest.approx(0.02 * (2 / 6) ** 0.5) and got["bar"] == pytest.approx(0.82306 + 0.011547,
                                                                                                 abs=5e-6)
    selection.main(args + ["--scoped"])
    assert "margin 0.0115, scoped: 2 of 6 scenarios reached, 0.02 x sqrt(2/6))" in capsys.readouterr().out
    selection.main(args)
    assert "(margin 0.0200)" in capsys.readouterr().out


def test_reaches_takes_the_margin_from_the_declaration_and_refuses_a_run_left_out(capsys):
    """--scoped reads the reach from the rows, so a candidate declared to reach two scenarios whose file held rows of
    one would have been judged by the smaller margin of one; --reaches names the declared ones."""
    six = "capitals,tofu,harmful,openings,inventors,mischief"
    path = ROOT / "bench/results/quality-dev-s50-topic-probes-200.jsonl"
    args = [str(path), "--run-args=--retain-probes --retain-weight 200", "--scenarios", six,
            "--defaults", str(BEFORE_ANCHORS), "--json"]
    selection.main(args + ["--reaches", "harmful, mischief"])
    assert json.loads(capsys.readouterr().out)["margin"] == pytest.approx(0.02 * (2 / 6) ** 0.5)
    with pytest.raises(SystemExit, match=r"--reaches harmful,mischief,capitals: declared but without rows: capitals$"):
        selection.main(args + ["--reaches", "harmful,mischief,capitals"])
    with pytest.raises(SystemExit, match=r"--reaches harmful: rows but not declared: mischief$"):
        selection.main(args + ["--reaches", "harmful"])
    with pytest.raises(SystemExit, match=r"--reaches harmful,mischief,nowhere: not in the split: nowhere$"):
        selection.main(args + ["--reaches", "harmful,mischief,nowhere"])
