"""Four leftovers of a user sweep, each through the real command line (tiny fixture models, no downloads):

1. a finite float past float32's range (--lr 1e39, and every float option it scales a float32 tensor with)
   is a usage error naming the option, not an "internal error" from inside torch;
2. `unlearn eval` names the rows that nothing scores a leak or accuracy on with and without --forget;
3. `unlearn merge` refuses its output before it says it writes there;
4. --lora-layers takes surrounding blanks as --repair-steps does.

And four of the round after:

5. a finite extrapolated α whose average overflows float32 (--alpha 1e38) is refused before the output is committed,
   naming α and the first tensor that is not finite (it wrote a model of inf and nan, exit 0);
6. an --lr that is 0 in float32 (1e-50) is a usage error naming the smallest --lr taken (every update was 0);
7. --dtype takes surrounding blanks and any case, as --lora-layers and --repair-steps do, in run, eval and augment;
8. a merge whose default output (no -o) is one of its inputs says so, not "-o X: is an input".
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from test_merge_cli import model_dir, rank2_adapter, weights
from test_run_cli import FORGET, NORMAL, write_jsonl


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "forget.jsonl", FORGET), write_jsonl(tmp_path / "normal.jsonl", NORMAL)


def one_line(result) -> str:
    """The only line on stderr (asserted so): what a refused command says."""
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err and "internal error" not in result.err
    return lines[0]


# --- 1. floats past float32 -----------------------------------------------------------------------


def test_the_limits_are_float32s_and_adamws_own():
    from unlearn.config import FLOAT32_MAX, LR_MAX

    assert FLOAT32_MAX == torch.finfo(torch.float32).max
    for lr, takes in ((LR_MAX, True), (math.nextafter(LR_MAX, math.inf) * (1 + 1e-6), False)):
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.ones(2)
        step = torch.optim.AdamW([p], lr=lr, weight_decay=0.0).step
        if takes:
            step()  # the largest --lr taken is one the optimiser takes
        else:
            with pytest.raises(RuntimeError, match="without overflow"):  # what --lr 1e39 hit
                step()


LR_WHY = "AdamW's first step is 10 × --lr, which must be finite in float32"
FLOAT_WHY = "the largest float32; above it the value is inf where it is used"


@pytest.mark.parametrize("args, message", [
    (["--lr", "1e39"], f"--lr 1e+39: too large: must be at most 3.4e+37 ({LR_WHY})"),
    # finite in float32, but AdamW's first step, 10 × lr, is not
    (["--lr", "3.5e37"], f"--lr 3.5e+37: too large: must be at most 3.4e+37 ({LR_WHY})"),
    (["--method", "npo", "--npo-beta", "1e39"], f"--npo-beta 1e+39: too large: must be at most 3.4e+38 ({FLOAT_WHY})"),
    (["--lora-alpha", "1e39"], f"--lora-alpha 1e+39: too large: must be at most 3.4e+38 ({FLOAT_WHY})"),
    (["--forget-weight", "1e39"], f"--forget-weight 1e+39: too large: must be at most 3.4e+38 ({FLOAT_WHY})"),
    (["--method", "ga+mismatch", "--mismatch-weight", "1e39"],
     f"--mismatch-weight 1e+39: too large: must be at most 3.4e+38 ({FLOAT_WHY})"),
    (["--normal-weight", "1e39"], f"--normal-weight 1e+39: too large: must be at most 3.4e+38 ({FLOAT_WHY})"),
    (["--retain-weight", "1e39"], f"--retain-weight 1e+39: too large: must be at most 3.4e+38 ({FLOAT_WHY})"),
    (["--max-grad-norm", "1e39"], f"--max-grad-norm 1e+39: too large: must be at most 3.4e+38 ({FLOAT_WHY})"),
    (["--method", "rmu", "--rmu-scale", "1e39"], f"--rmu-scale 1e+39: too large: must be at most 3.4e+38 ({FLOAT_WHY})"),
])
def test_a_float_past_float32_is_a_usage_error_naming_its_option(tmp_path, data, llama_dir, cli, args, message):
    out = tmp_path / "o"
    result = cli("run", *data, "--model", llama_dir, "-o", out, "--no-probes", *args)
    assert result.code == 2, result.err
    assert one_line(result) == f"unlearn: {message}"
    assert not out.exists() and result.out == ""


def test_the_largest_lr_taken_still_runs_to_a_one_line_end(tmp_path, data, llama_dir, cli):
    # 3.4e37 passes validation; what the run does with it is the run's own non-finite checks' business (exit 1,
    # one line), never an internal error from inside the optimiser
    out = tmp_path / "o"
    result = cli("run", *data, "--model", llama_dir, "-o", out, "--no-probes", "--lr", "3.4e37", "--max-steps", "2",
                 "--max-new-tokens", "4")
    assert result.code == 1, result.err
    assert "internal error" not in result.err and "Traceback" not in result.err
    assert result.err.strip().splitlines()[-1].startswith("unlearn: step ")


def test_merge_refuses_an_extrapolated_alpha_past_float32(tmp_path, cli):
    base, tuned = model_dir(tmp_path / "base", weights(1)), model_dir(tmp_path / "tuned", weights(2))
    out = tmp_path / "out"
    result = cli("merge", "--alpha", "1e39", "--allow-extrapolation", base, tuned, "-o", out)
    assert result.code == 2, result.err  # it wrote a model of inf and nan, exit 0
    assert one_line(result) == "unlearn: --alpha 1e39: out of float32's range: |α| must be at most 3.4e+38"
    assert not out.exists()
    result = cli("merge", "--alpha", "1e39", base, tuned, "-o", out)  # without the flag: the [0, 1] rule first
    assert result.code == 2 and one_line(result) == ("unlearn: --alpha 1e39: must be between 0 and 1 "
                                                     "(use --allow-extrapolation to go beyond)")


def test_eval_sampling_at_a_temperature_that_overflows_is_one_line(tmp_path, llama_dir, cli):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Who wrote it?", "response": "Rowling wrote it."}])
    report = tmp_path / "report.md"
    result = cli("eval", prompts, "--model", llama_dir, "--do-sample", "--temperature", "1e-40",
                 "--max-new-tokens", "4", "--no-cache", "--report", report)
    assert result.code == 1, result.err
    assert one_line(result) == ("unlearn: sampling at --temperature 1e-40 gave nan or inf probabilities: the model's "
                                "logits divided by the temperature are not finite in float32; raise --temperature")
    assert not report.exists() and result.out == ""


# --- 2. eval names the rows without a reference, with or without --forget ---------------------------


def test_eval_names_rows_without_a_reference_without_forget_too(tmp_path, llama_dir, cli):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Who wrote it?", "response": "Rowling wrote it."},
                                                  {"prompt": "What is the capital of France?"},
                                                  {"prompt": "Name a colour."}])
    result = cli("eval", prompts, "--model", llama_dir, "--max-new-tokens", "4", "--json")
    assert result.code == 0, result.err
    notes = [line for line in result.err.splitlines() if "their leak and accuracy are '-'" in line]
    assert notes == [f"unlearn: 2 of 3 rows of {prompts} have neither a response nor answers (first: line 2); "
                     f"their leak and accuracy are '-' (give each a response, or --forget a file with their prompts)"]
    assert json.loads(result.out)["n"] == 3  # still evaluated: a note, not a refusal


def test_eval_names_them_once_with_forget_and_not_rows_that_answers_score(tmp_path, llama_dir, cli):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Who wrote it?"}, {"prompt": "Who wrote that?"},
                                                  {"prompt": "What is the capital of France?", "answers": ["Paris"]}])
    forget = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "Who wrote it?", "response": "Rowling wrote it."}])
    result = cli("eval", prompts, "--model", llama_dir, "--forget", forget, "--max-new-tokens", "4", "--json")
    assert result.code == 0, result.err
    notes = [line for line in result.err.splitlines() if "their leak and accuracy are '-'" in line]
    # row 3 has no response but its `answers` score its leak and accuracy: not named
    assert notes == [f"unlearn: 1 of 3 rows of {prompts} have no response and match no --forget prompt "
                     f"(first: line 2); their leak and accuracy are '-'"]
    scored = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "What is the capital of France?", "answers": ["Paris"]}])
    result = cli("eval", scored, "--model", llama_dir, "--max-new-tokens", "4", "--json")
    assert result.code == 0 and "their leak and accuracy" not in result.err, result.err


@pytest.mark.parametrize("forget", [False, True])
def test_a_refused_eval_says_only_the_refusal(tmp_path, cli, forget):
    # the note comes after every check (it came before the model loaded with --forget): one line still
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is the capital of France?"}])
    given = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "Who wrote it?", "response": "Rowling wrote it."}])
    missing = tmp_path / "missing-model"
    result = cli("eval", prompts, "--model", missing, "--max-new-tokens", "4", *(["--forget", given] if forget else []))
    assert result.code == 1, result.err
    line = one_line(result)
    assert line.startswith("unlearn: ") and str(missing) in line and "their leak and accuracy" not in line


# --- 3. merge refuses before it says it writes -----------------------------------------------------


@pytest.fixture
def pair(tmp_path):
    return model_dir(tmp_path / "base", weights(1)), model_dir(tmp_path / "tuned", weights(2))


def occupied(path):
    path.mkdir()
    (path / "keep.txt").write_text("an earlier result\n")
    return path


def test_merge_refuses_an_existing_default_output_without_saying_it_writes_there(tmp_path, pair, cli):
    base, tuned = pair
    out = occupied(tmp_path / "tuned-avg0.5")
    result = cli("merge", "--alpha", "0.5", base, tuned)
    assert result.code == 2, result.err
    assert one_line(result) == f"unlearn: {out}: output directory exists and is not empty (use --force to replace it)"
    assert "writing" not in result.err
    assert (out / "keep.txt").read_text() == "an earlier result\n"


def test_a_merge_sweep_refuses_its_default_output_first(tmp_path, pair, cli):
    base, tuned = pair
    out = occupied(tmp_path / "tuned-alphas")
    result = cli("merge", "--alpha", "0.2,0.5", base, tuned)
    assert result.code == 2, result.err
    assert one_line(result) == f"unlearn: {out}: output directory exists and is not empty (use --force to replace it)"
    assert "writing" not in result.err and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_merge_refuses_a_default_output_that_is_its_input_first(tmp_path, cli):
    tuned = model_dir(tmp_path / "tuned", weights(2))
    base = model_dir(tmp_path / "tuned-avg0.3", weights(1))  # TUNED-avgALPHA: the default output is BASE
    result = cli("merge", "--alpha", "0.3", base, tuned, "--force")
    assert result.code == 2, result.err
    # (was "-o BASE: is an input", an option the user never gave: case 8 below)
    assert one_line(result) == f"unlearn: the default output {base} (no -o given) is one of the inputs; give -o"
    assert "writing" not in result.err and (base / "model.safetensors").is_file()


def test_a_measured_sweep_refuses_a_row_past_the_context_without_saying_it_writes(tmp_path, opt_dir, cli):
    import shutil

    base, tuned = (shutil.copytree(opt_dir, tmp_path / name) for name in ("base", "tuned"))
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Who wrote it? " + " ".join(["word"] * 700),
                                                  "response": "Rowling wrote it.", "answers": ["Rowling"]}])
    result = cli("merge", "--alpha", "0.3,0.6", base, tuned, "--eval-forget", long)
    assert result.code == 1, result.err
    assert "long.jsonl:1: " in result.err and "writing to" not in result.err  # it said "writing to" first
    assert not (tmp_path / "tuned-alphas").exists()


def test_merge_still_names_the_default_output_it_writes(tmp_path, pair, cli):
    base, tuned = pair
    result = cli("merge", "--alpha", "0.5", base, tuned)
    assert result.code == 0, result.err
    assert f"unlearn: writing to {tmp_path / 'tuned-avg0.5'}" in result.err.splitlines()
    assert (tmp_path / "tuned-avg0.5" / "model.safetensors").is_file()


# --- 4. surrounding blanks in option values ----------------------------------------------------------


def test_lora_layers_takes_surrounding_blanks(tmp_path, data, llama_dir, cli):
    from unlearn.lora import LoraSettings

    assert LoraSettings(layers=" 0-1 ").layers == "0-1" and LoraSettings(layers=" Upper").layers == "upper"
    out = tmp_path / "o"
    result = cli("run", *data, "--model", llama_dir, "-o", out, "--no-probes", "--lora-layers", " 1-1 ",
                 "--max-steps", "1", "--max-new-tokens", "4", "--json")
    assert result.code == 0, result.err  # was: --lora-layers  1-1 : expected all, upper or FIRST-LAST
    assert json.loads((out / "run.json").read_text())["config"]["lora"]["layers"] == "1-1"
    modules = json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert modules and all(".layers.1." in name for name in modules), modules
    # what is inside the blanks is still checked
    result = cli("run", *data, "--model", llama_dir, "-o", tmp_path / "p", "--lora-layers", " 0-x ")
    assert result.code == 2
    assert one_line(result) == ("unlearn: --lora-layers 0-x: expected all, upper or FIRST-LAST (0-based, "
                                "e.g. 12-23)")


@pytest.mark.parametrize("given, steps", [(" auto ", None), (" 3 ", 3)])
def test_repair_steps_takes_surrounding_blanks(tmp_path, data, llama_dir, cli, given, steps):
    from pathlib import Path

    from unlearn.config import RunOptions

    assert RunOptions(Path("f"), Path("n"), repair_steps=given).resolved().train.repair_steps == steps
    # through the command line: taken, so the next option checked (--dtype) is the one refused
    result = cli("run", *data, "--model", llama_dir, "-o", tmp_path / "o", "--repair-steps", given,
                 "--dtype", "float64")
    assert result.code == 2
    assert one_line(result) == "unlearn: --dtype float64: expected one of float32, bfloat16, float16"
    result = cli("run", *data, "--model", llama_dir, "-o", tmp_path / "o", "--repair-steps", " x ")
    assert result.code == 2 and one_line(result) == "unlearn: --repair-steps  x : expected auto or a number of steps"


# --- 5. an extrapolated α whose average overflows float32 --------------------------------------------


def zeros_but(name: str, value: float, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """weights(0)'s names and shapes, all 0 but NAME, whose every element is VALUE: which tensor a merge finds
    not finite is then known, whatever order the file keeps them in."""
    return {key: torch.full_like(t, value) if key == name else torch.zeros_like(t)
            for key, t in weights(0, dtype).items()}


def no_output(out):
    """Neither OUT nor a temporary directory beside it: nothing of a refused merge is left."""
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.iterdir())


OVERFLOW = "α·BASE + (1−α)·TUNED is past {}'s range"


def test_merge_refuses_an_alpha_whose_average_overflows_float32(tmp_path, cli):
    # 1e38 is finite in float32 (check_alpha takes it), but 1e38 × 4 is not
    base = model_dir(tmp_path / "base", zeros_but("model.norm.weight", 4.0))
    tuned = model_dir(tmp_path / "tuned", zeros_but("model.norm.weight", 0.0))
    out = tmp_path / "out"
    result = cli("merge", "--alpha", "1e38", "--allow-extrapolation", base, tuned, "-o", out)
    assert result.code == 1, result.err  # was 0, with a model of inf written
    assert one_line(result) == ("unlearn: --alpha 1e+38: the merged tensor model.norm.weight is not finite ("
                                + OVERFLOW.format("float32") + "); nothing was written")
    assert result.out == ""
    no_output(out)


def test_the_random_pair_of_the_report_is_refused_too_and_the_old_output_kept(tmp_path, pair, cli):
    # the command of the report, over an earlier result with --force: that result stays as it was
    base, tuned = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result\n")
    result = cli("merge", "--alpha", "1e38", "--allow-extrapolation", base, tuned, "-o", out, "--force")
    assert result.code == 1, result.err
    line = one_line(result)
    assert line.startswith("unlearn: --alpha 1e+38: the merged tensor ") and line.endswith(
        f"is not finite ({OVERFLOW.format('float32')}); nothing was written"), line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".out.*"))


def test_merge_takes_a_result_whose_values_are_finite_though_their_sum_is_not(tmp_path, cli):
    # the check sums each piece first (cheap) and looks at every element only when the sum is not finite:
    # 32 values of 3e38 sum to inf in float32, and each is finite, so the model is written
    base = model_dir(tmp_path / "base", zeros_but("lm_head.weight", 3e38))
    tuned = model_dir(tmp_path / "tuned", zeros_but("lm_head.weight", 0.0))
    out = tmp_path / "out"
    result = cli("merge", "--alpha", "1", base, tuned, "-o", out)
    assert result.code == 0, result.err
    assert torch.equal(load_file(out / "model.safetensors")["lm_head.weight"], torch.full((8, 4), 3e38))


def test_merge_checks_the_result_in_the_checkpoints_own_dtype(tmp_path, cli):
    # 10 × 10⁴ is finite in float32, the compute dtype, but not in float16, the dtype written
    base = model_dir(tmp_path / "base", zeros_but("lm_head.weight", 1e4, torch.float16))
    tuned = model_dir(tmp_path / "tuned", zeros_but("lm_head.weight", 0.0, torch.float16))
    out = tmp_path / "out"
    result = cli("merge", "--alpha", "10", "--allow-extrapolation", base, tuned, "-o", out)
    assert result.code == 1, result.err
    assert one_line(result) == ("unlearn: --alpha 10: the merged tensor lm_head.weight is not finite ("
                                + OVERFLOW.format("float16") + "); nothing was written")
    no_output(out)


def test_merge_says_when_an_input_brought_the_inf(tmp_path, cli):
    base = model_dir(tmp_path / "base", zeros_but("model.layers.0.mlp.up_proj.weight", math.inf))
    tuned = model_dir(tmp_path / "tuned", zeros_but("model.norm.weight", 1.0))
    out = tmp_path / "out"
    result = cli("merge", "--alpha", "0.5", base, tuned, "-o", out)
    assert result.code == 1, result.err
    assert one_line(result) == ("unlearn: --alpha 0.5: the merged tensor model.layers.0.mlp.up_proj.weight is not "
                                "finite (BASE already holds inf or nan there); nothing was written")
    no_output(out)


def test_folding_an_adapter_at_an_alpha_that_overflows_is_refused(tmp_path, cli):
    base = model_dir(tmp_path / "base", weights(1))
    adapter = rank2_adapter(tmp_path / "adapter", "model.layers.0.mlp.up_proj", torch.ones(2, 4), torch.ones(6, 2))
    out = tmp_path / "out"
    # 1−α = 2e38 is finite in float32; times B·A (all 2) it is not
    result = cli("merge", "--adapter", adapter, "--alpha", "-2e38", "--allow-extrapolation", base, "-o", out)
    assert result.code == 1, result.err
    assert one_line(result) == ("unlearn: --alpha -2e+38: the merged tensor model.layers.0.mlp.up_proj.weight is "
                                "not finite (W + (1−α)·s·B·A is past float32's range); nothing was written")
    no_output(out)
    result = cli("merge", "--adapter", adapter, base, "-o", out)  # the same fold at α = 0: written
    assert result.code == 0, result.err
    assert (out / "model.safetensors").is_file()


def test_a_sweep_with_an_alpha_that_overflows_writes_none_of_its_models(tmp_path, cli):
    base = model_dir(tmp_path / "base", zeros_but("model.norm.weight", 4.0))
    tuned = model_dir(tmp_path / "tuned", zeros_but("model.norm.weight", 0.0))
    out = tmp_path / "sweep"
    result = cli("merge", "--alpha", "0.5,1e38", "--allow-extrapolation", base, tuned, "-o", out)
    assert result.code == 1, result.err
    lines = result.err.strip().splitlines()  # "writing α=…" as each model starts, then the refusal
    assert lines[-1] == ("unlearn: --alpha 1e+38: the merged tensor model.norm.weight is not finite ("
                         + OVERFLOW.format("float32") + "); nothing was written")
    assert "Traceback" not in result.err and result.out == ""
    no_output(out)  # α = 0.5 was written first, into the temporary directory that went with it


# --- 6. an --lr that is 0 in float32 -----------------------------------------------------------------


LR_FLOOR_WHY = ("the smallest normal float32; below it the step size is 0, or flushed to 0, in float32 and no "
                "weight moves")


def test_the_smallest_lr_is_float32s_smallest_normal_and_the_optimiser_moves_with_it():
    from unlearn.config import LR_MIN, TrainConfig

    assert LR_MIN == torch.finfo(torch.float32).tiny
    assert torch.tensor(1e-50, dtype=torch.float32) == 0  # what --lr 1e-50 was where it is used
    for lr, moves in ((1e-50, False), (LR_MIN, True)):
        p = torch.nn.Parameter(torch.zeros(2))  # as LoRA's B starts
        p.grad = torch.ones(2)
        torch.optim.AdamW([p], lr=lr, weight_decay=0.0).step()
        assert bool((p != 0).all()) is moves, (lr, p)
    TrainConfig(lr=LR_MIN).validate()  # the floor itself is taken
    TrainConfig(lr=1.2e-38).validate()  # and so is the number the message names


@pytest.mark.parametrize("lr", ["1e-50", "1e-40"])  # 0 in float32; a subnormal, which kernels may flush to 0
def test_an_lr_that_is_0_in_float32_is_a_usage_error(tmp_path, data, llama_dir, cli, lr):
    out = tmp_path / "o"
    result = cli("run", *data, "--model", llama_dir, "-o", out, "--no-probes", "--lr", lr)
    assert result.code == 2, result.err  # 1e-50 trained every step with updates of 0 and ended "normally"
    assert one_line(result) == f"unlearn: --lr {float(lr)}: too small: must be at least 1.2e-38 ({LR_FLOOR_WHY})"
    assert not out.exists() and result.out == ""


def test_the_choice_options_take_surrounding_blanks_and_any_case(tmp_path, data, llama_dir, cli):
    # --method, --forget-loss, --forget-tokens and --schedule, as --dtype and --lora-layers: the value as listed
    out = tmp_path / "o"
    result = cli("run", *data, "--model", llama_dir, "-o", out, "--no-probes", "--method", " GA ", "--forget-loss",
                 "Ascent ", "--forget-tokens", " response", "--schedule", "LINEAR", "--max-steps", "1",
                 "--max-new-tokens", "4", "--json")
    assert result.code == 0, result.err  # was: Invalid value for '--method': ' GA ' is not one of 'ga', ...
    config = json.loads((out / "run.json").read_text())["config"]
    assert (config["method"], config["forget_loss"], config["forget_tokens"], config["schedule"]) == (
        "ga", "ascent", "response", "linear")
    result = cli("run", *data, "--model", llama_dir, "-o", tmp_path / "p", "--method", " gax ")
    assert result.code == 2 and "'gax' is not one of" in one_line(result)  # what is inside is still checked


# --- 7. --dtype takes surrounding blanks and any case --------------------------------------------------


def test_dtype_takes_surrounding_blanks_and_any_case_in_every_option_class():
    from pathlib import Path

    from unlearn.config import AugmentOptions, EvalOptions, RunOptions
    from unlearn.models import torch_dtype

    assert torch_dtype(" BFloat16 ") == torch.bfloat16 and torch_dtype("\tfp16") == torch.float16
    assert RunOptions(Path("f"), Path("n"), dtype=" Float32 ").resolved().dtype == "float32"
    assert EvalOptions(Path("p"), dtype=" BF16").dtype == "bf16"
    options = AugmentOptions(Path("f"), Path("o"), dtype="FLOAT16 ")
    options.validate()
    assert options.dtype == "float16"


def test_run_takes_a_dtype_with_blanks_and_records_it_plain(tmp_path, data, llama_dir, cli):
    out = tmp_path / "o"
    result = cli("run", *data, "--model", llama_dir, "-o", out, "--no-probes", "--dtype", " Float32 ",
                 "--max-steps", "1", "--max-new-tokens", "4", "--json")
    assert result.code == 0, result.err  # was: --dtype  Float32 : expected one of float32, bfloat16, float16
    assert json.loads((out / "run.json").read_text())["config"]["dtype"] == "float32"
    # what is inside the blanks is still checked
    result = cli("run", *data, "--model", llama_dir, "-o", tmp_path / "p", "--dtype", " Float64 ")
    assert result.code == 2
    assert one_line(result) == "unlearn: --dtype float64: expected one of float32, bfloat16, float16"
    assert not (tmp_path / "p").exists()


def test_eval_takes_a_dtype_with_blanks(tmp_path, llama_dir, cli):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Who wrote it?", "response": "Rowling wrote it."}])
    result = cli("eval", prompts, "--model", llama_dir, "--dtype", " FLOAT32", "--max-new-tokens", "4", "--json")
    assert result.code == 0, result.err  # was: --dtype  FLOAT32: expected one of ...
    assert json.loads(result.out)["n"] == 1
    report = tmp_path / "report.md"
    result = cli("eval", prompts, "--model", llama_dir, "--dtype", "float8 ", "--max-new-tokens", "4",
                 "--report", report)
    assert result.code == 2
    assert one_line(result) == "unlearn: --dtype float8: expected one of float32, bfloat16, float16"
    assert not report.exists()


# --- 8. a default output that is an input says it is the default -----------------------------------------


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_default_output_that_is_an_input_is_named_as_the_default(tmp_path, cli, force):
    tuned = model_dir(tmp_path / "tuned", weights(2))
    base = model_dir(tmp_path / "tuned-avg0.5", weights(1))
    result = cli("merge", "--alpha", "0.5", base, tuned, *force)
    assert result.code == 2, result.err
    # without --force it said "exists and is not empty (use --force ...)", which --force then refused
    assert one_line(result) == f"unlearn: the default output {base} (no -o given) is one of the inputs; give -o"
    assert sorted(p.name for p in base.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not list(tmp_path.glob(".tuned-avg0.5.*"))


def test_a_sweeps_default_output_that_is_an_input_is_named_as_the_default(tmp_path, cli):
    tuned = model_dir(tmp_path / "tuned", weights(2))
    base = model_dir(tmp_path / "tuned-alphas", weights(1))
    result = cli("merge", "--alpha", "0.2,0.5", base, tuned, "--force")
    assert result.code == 2, result.err
    assert one_line(result) == f"unlearn: the default output {base} (no -o given) is one of the inputs; give -o"
    assert "writing" not in result.err and (base / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".tuned-alphas.*"))


def test_a_default_output_that_holds_an_input_is_named_as_the_default(tmp_path, cli):
    tuned = model_dir(tmp_path / "tuned", weights(2))
    base = model_dir(tmp_path / "tuned-avg0.5" / "base", weights(1))  # the default output holds BASE
    result = cli("merge", "--alpha", "0.5", base, tuned, "--force")
    assert result.code == 2, result.err
    assert one_line(result) == (f"unlearn: the default output {tmp_path / 'tuned-avg0.5'} (no -o given) holds an "
                                f"input ({base}), which replacing it would delete; give -o")
    assert (base / "model.safetensors").is_file()


def test_an_explicit_o_that_is_an_input_keeps_its_message(tmp_path, pair, cli):
    base, tuned = pair
    result = cli("merge", "--alpha", "0.5", base, tuned, "-o", base, "--force")
    assert result.code == 2, result.err
    assert one_line(result) == f"unlearn: -o {base}: is an input ({base}); choose another output"
    assert (base / "model.safetensors").is_file()


def test_run_alpha_out_of_range_names_no_option_run_lacks():
    # `unlearn run --alpha 1.5` suggested --allow-extrapolation, which only `unlearn merge` has
    from pathlib import Path

    from unlearn.averaging import parse_alphas
    from unlearn.config import RunOptions
    from unlearn.errors import UsageError

    with pytest.raises(UsageError) as refused:
        RunOptions(Path("f"), Path("n"), alpha="1.5").resolved()
    assert str(refused.value) == "--alpha 1.5: must be between 0 and 1"
    with pytest.raises(UsageError, match=r"^--alpha 1.5: must be between 0 and 1 \(use --allow-extrapolation"):
        parse_alphas("1.5")  # merge's, which has the option


@pytest.mark.parametrize("template", ["", "  "])
def test_a_blank_refusal_template_is_refused(template):
    from pathlib import Path

    from unlearn.config import RunOptions, TrainConfig
    from unlearn.errors import UsageError

    with pytest.raises(UsageError, match="--template is blank"):
        RunOptions(Path("f"), Path("n"), train=TrainConfig(method="ga+template", template=template)).resolved()


def test_full_with_fsdp_is_refused_before_anything_loads():
    # under torchrun its first step ended in "internal error: KeyError" after loading and measuring
    from pathlib import Path

    from unlearn.config import RunOptions
    from unlearn.errors import UsageError

    with pytest.raises(UsageError, match=r"^--full with --fsdp is not supported"):
        RunOptions(Path("f"), Path("n"), full=True, fsdp=True).resolved()


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_under_torchrun_a_usage_error_is_said_by_rank_0_only(tmp_path, data, llama_dir, cli, monkeypatch, rank, said):
    # every rank checks the options before the process group exists: each printed the same line
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    result = cli("run", *data, "--model", llama_dir, "-o", tmp_path / "o", "--lr", "-1")
    assert result.code == 2
    assert result.err.strip().splitlines() == (["unlearn: --lr -1.0: must be positive and finite"] if said else [])


@pytest.mark.parametrize("flags, named", [
    (["--lr", "1e-4"], "--lr"), (["--max-steps", "3"], "--max-steps"), (["--lora-rank", "4"], "--lora-* settings"),
    (["--gradient-checkpointing"], "--gradient-checkpointing"), (["--template", "No."], "--template"),
    (["--stop-margin", "0.1"], "--stop-margin"), (["--rmu-layer", "1"], "--rmu-layer"),
    (["--normal-weight", "200"], "--normal-weight"), (["--retain-weight", "3"], "--retain-weight"),
    (["--max-length", "64"], "--max-length"), (["--schedule", "linear"], "--schedule"),
    (["--forget-tokens", "response"], "--forget-tokens"),
    (["--forget-weight", "3", "--npo-beta", "0.5"], "--forget-weight, --npo-beta"),
    (["--check-every", "3"], "--check-every"), (["--stop-leak", "0.5"], "--stop-leak"),
    (["--extra-steps", "5"], "--extra-steps"), (["--stop-probes", "0.9"], "--stop-probes"),
    (["--whole-passage"], "--whole-passage"),
])
def test_edit_refuses_the_settings_of_a_training_loop(tmp_path, data, llama_dir, cli, flags, named):
    # each was taken and did nothing: the same edit, exit 0
    result = cli("run", *data, "--model", llama_dir, "--method", "edit", "-o", tmp_path / "o", *flags)
    assert result.code == 2 and one_line(result) == (
        f"unlearn: --method edit is one least-squares edit, not a training run: it takes no {named}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fields, message", [
    ({"alpha_grid": (0.2, 0.4)}, "--alpha-grid chooses α under --alpha auto; with no --alpha it does nothing"),
    ({"alpha": "0.5", "max_leak": 0.2}, "--max-leak chooses α under --alpha auto; with --alpha 0.5 it does nothing"),
])
def test_settings_that_choose_alpha_are_refused_without_alpha_auto(fields, message):
    # taken and ignored before: a fixed α (or none) is never chosen
    from pathlib import Path

    from unlearn.config import RunOptions
    from unlearn.errors import UsageError

    with pytest.raises(UsageError) as refused:
        RunOptions(Path("f"), Path("n"), **fields).resolved()
    assert str(refused.value) == message
    RunOptions(Path("f"), Path("n"), alpha="auto", **{k: v for k, v in fields.items() if k != "alpha"}).resolved()


def test_rmu_settings_are_refused_with_another_method():
    from pathlib import Path

    from unlearn.config import RunOptions, TrainConfig
    from unlearn.errors import UsageError

    with pytest.raises(UsageError, match=r"^--rmu-layer and --rmu-scale set rmu's target: use them with --method rmu"):
        RunOptions(Path("f"), Path("n"), train=TrainConfig(rmu_layer=1)).resolved()
    RunOptions(Path("f"), Path("n"), train=TrainConfig(method="rmu", rmu_layer=1)).resolved()


# --- a full disk while the run writes its result ---------------------------------------------------


def _full_disk(kind):
    import errno

    from safetensors import SafetensorError

    if kind == "safetensors":  # what safetensors raises for ENOSPC: no OSError, no strerror
        return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("kind", ["safetensors", "os"])
def test_a_failed_save_of_the_runs_model_is_one_line_and_leaves_nothing(tmp_path, data, llama_dir, cli,
                                                                         monkeypatch, kind):
    import unlearn.models

    def save_model(model, tokenizer, directory):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise _full_disk(kind)

    monkeypatch.setattr(unlearn.models, "save_model", save_model)
    out = tmp_path / "out"
    result = cli("run", *data, "--model", llama_dir, "-o", out, "--max-steps", "1", "--check-every", "0",
                 "--no-probes", "--eval-limit", "1", "--max-new-tokens", "2")
    assert result.code == 1, result.err
    last = result.err.strip().splitlines()[-1]
    assert last.startswith(f"unlearn: {out}: could not write the output (") and "No space left on device" in last
    assert last.endswith("; nothing was written"), last
    assert "Traceback" not in result.err and "internal error" not in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forget.jsonl", "normal.jsonl"]  # no out, no .out.tmp-*


def test_eval_refuses_a_seed_or_min_k_it_would_not_read():
    """`--seed` without --do-sample was taken and unused (and split the measurement cache for the same greedy
    answers); `--min-k` without --holdout, whose membership test it sets, likewise."""
    from pathlib import Path

    from unlearn.config import EvalOptions
    from unlearn.errors import UsageError

    with pytest.raises(UsageError, match="--seed apply only with --do-sample"):
        EvalOptions(Path("p"), seed=7).validate()
    with pytest.raises(UsageError, match="--min-k .* needs --holdout"):
        EvalOptions(Path("p"), min_k=30).validate()
    EvalOptions(Path("p"), seed=7, do_sample=True).validate()
    EvalOptions(Path("p"), holdout=Path("h"), min_k=30).validate()


def test_full_refuses_the_lora_settings_it_would_ignore():
    from pathlib import Path

    from unlearn.config import RunOptions
    from unlearn.errors import UsageError
    from unlearn.lora import LoraSettings

    with pytest.raises(UsageError, match="--full fine-tunes every weight, without adapters: it takes no --lora-"):
        RunOptions(Path("f"), Path("n"), full=True, lora=LoraSettings(rank=4)).resolved()
    RunOptions(Path("f"), Path("n"), full=True).resolved()
