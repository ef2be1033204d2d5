"""--method rmu: its two distances by hand (positions, padding, signs), the layer it reads, the
layers it trains, and a seed-fixed run through the CLI."""

import json

import pytest
import torch

from unlearn import rmu
from unlearn.data import Example, collate, encode_pair
from unlearn.lora import LoraSettings, attach_lora, lora_modules
from unlearn.models import load_model
from unlearn.train import TrainConfig, Unlearner

I = -100  # noqa: E741  (IGNORE_INDEX)


def test_scored_positions_are_the_ones_that_predict_a_response_token():
    labels = torch.tensor([[I, I, 5, 6, I],    # prompt, prompt, response, response, padding
                           [I, 7, I, I, I]])   # one response token, then padding
    assert rmu.scored_positions(labels).tolist() == [[False, True, True, False, False],
                                                     [True, False, False, False, False]]


def test_forget_and_retain_losses_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [100.0, 100.0]],   # last position: not scored
                           [[0.0, 0.0], [50.0, -50.0], [2.0, 2.0]]])
    mask = torch.tensor([[True, True, False], [False, False, True]])
    target = torch.tensor([1.0, 1.0])
    # ||h - t||^2 / d at the three scored positions: (0 + 1)/2, (4 + 4)/2, (1 + 1)/2 -> mean 5.5/3
    assert float(rmu.forget_loss(hidden, mask, target)) == pytest.approx((0.5 + 4.0 + 1.0) / 3)

    original = hidden.clone()
    original[0, 0] = torch.tensor([1.0, 0.0])   # differs by (0, 2): 4/2 = 2
    original[1, 2] = torch.tensor([2.0, 5.0])   # differs by (0, -3): 9/2 = 4.5
    original[1, 1] = torch.tensor([0.0, 0.0])   # unscored (padding or prompt): must not count
    assert float(rmu.retain_loss(hidden, mask, original)) == pytest.approx((2.0 + 0.0 + 4.5) / 3)
    assert float(rmu.retain_loss(hidden, mask, hidden.clone())) == 0.0

    # Signs: a gradient step on the forget loss moves h towards the target; on the retain loss, towards the original.
    h = hidden.clone().requires_grad_(True)
    rmu.forget_loss(h, mask, target).backward()
    assert h.grad[0, 1].tolist() == pytest.approx([2 * 2.0 / 2 / 3, 2 * -2.0 / 2 / 3])  # d/dh of (h-t)^2/d, mean of 3
    assert h.grad[0, 2].tolist() == [0.0, 0.0] and h.grad[1, 1].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="no scored positions"):
        rmu.forget_loss(hidden, torch.zeros_like(mask), target)


def test_random_direction_is_a_seeded_unit_vector():
    u = rmu.random_direction(64, seed=3)
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(u, rmu.random_direction(64, seed=3)) and not torch.equal(u, rmu.random_direction(64, seed=4))


def test_default_layer_is_a_quarter_of_the_depth():
    assert [rmu.default_layer(n) for n in (1, 2, 30, 32)] == [0, 0, 8, 8]
    assert rmu.trained_layers(8) == [6, 7, 8] and rmu.trained_layers(1) == [0, 1]


FORGET = [Example("Who wrote the Harry Potter books?", "J.K. Rowling wrote them.", 1, {"answers": ["Rowling"]}),
          Example("Where does Harry Potter study?", "Harry Potter studies at Hogwarts.", 2)]
NORMAL = [Example("What is two plus two?", "Two plus two equals four.", 1),
          Example("What do bees make?", "Bees make honey.", 2)]
RETAIN = [Example("What colour is the sky?", "The sky is blue.", 1)]


def rmu_unlearner(directory, **overrides):
    torch.manual_seed(0)
    lm = load_model(str(directory), log=lambda m: None)
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
    config = TrainConfig(**{"method": "rmu", "lr": 1e-2, "batch_size": 2, "max_steps": 4, "check_every": 0,
                            "rmu_layer": 1, **overrides})
    return Unlearner(lm.model, lm.tokenizer, FORGET, NORMAL, config, retain=RETAIN)


def test_hidden_at_is_the_layer_output(llama_dir):
    lm = load_model(str(llama_dir), log=lambda m: None)
    batch = collate([encode_pair(lm.tokenizer, "What do bees make?", "Bees make honey.", 64)], lm.tokenizer.pad_token_id)
    with torch.no_grad():
        full = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        h0 = rmu.hidden_at(lm.model, rmu.decoder_layers(lm.model)[0], batch)
    assert torch.allclose(h0, full.hidden_states[1], atol=1e-6)  # hidden_states[0] is the embeddings


def test_unlearner_trains_only_the_window_and_its_terms_are_the_distances(llama_dir):
    u = rmu_unlearner(llama_dir, forget_weight=1.0, normal_weight=2.0, retain_weight=3.0, rmu_layer=0)
    trained = {n for n, p in u.model.named_parameters() if p.requires_grad}
    assert trained and all(".layers.0." in n for n in trained)  # layer 1's adapters are frozen (B stays 0)
    assert len(u.params) == len(trained)
    # c = scale x the mean norm of the original's h_0 on the normal rows' scored positions
    batch = collate(u.normal, u.pad_id)
    with torch.no_grad():
        h = rmu.hidden_at(u.model, u.rmu.module, batch)
    norm = float(h[rmu.scored_positions(batch["labels"])].norm(dim=-1).mean())
    assert float(u.rmu.target.norm()) == pytest.approx(u.config.rmu_scale * norm, rel=1e-5)

    rows = {"forget": u.forget, "normal": u.normal, "retain": u.retain}
    total, terms = u.loss(rows)
    assert terms["rmu_normal"] == 0.0 and terms["rmu_retain"] == 0.0  # B = 0: the model is the original
    fb = collate(u.forget, u.pad_id)
    with torch.no_grad():
        hf = rmu.hidden_at(u.model, u.rmu.module, fb)
    mask = rmu.scored_positions(fb["labels"])
    by_hand = sum(((hf[r, t] - u.rmu.target) ** 2).mean().item() for r, t in mask.nonzero().tolist()) / int(mask.sum())
    assert terms["rmu_forget"] == pytest.approx(by_hand, rel=1e-5)
    assert float(total.detach()) == pytest.approx(1.0 * by_hand, rel=1e-5)

    for _ in range(4):  # the forget distance falls; the others leave 0 (the model moves)
        record = u.step()
    assert record["rmu_forget"] < terms["rmu_forget"]
    assert record["rmu_normal"] > 0.0 and record["rmu_retain"] > 0.0
    assert all(float(m.lora_B.abs().sum()) == 0.0 for n, m in lora_modules(u.model).items() if ".layers.1." in n)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    forget = [{"prompt": "Who wrote the Harry Potter books?", "response": "J.K. Rowling wrote them.",
               "answers": ["Rowling"]},
              {"prompt": "Where does Harry Potter study?", "response": "Harry Potter studies at Hogwarts."}]
    normal = [{"prompt": "What is two plus two?", "response": "Two plus two equals four."},
              {"prompt": "What do bees make?", "response": "Bees make honey."},
              {"prompt": "What colour is the sky?", "response": "The sky is blue."}]
    return write_jsonl(tmp_path / "forget.jsonl", forget), write_jsonl(tmp_path / "normal.jsonl", normal)


@pytest.mark.parametrize("which, extra", [("llama_dir", ["--lr", "1e-2"]),
                                          ("opt_dir", ["--full", "--lr", "1e-3"])])  # OPT: model.decoder.layers.N
def test_rmu_run_through_the_cli(request, tmp_path, files, cli, which, extra):
    forget, normal = files
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", request.getfixturevalue(which), "--method", "rmu", "-o", out,
                 "--json", "--seed", "0", "--max-steps", "6", "--check-every", "0", "--max-new-tokens", "4",
                 "--batch-size", "2", "--no-probes", "--normal-holdout", "0", *extra)
    assert result.code == 0, result.err
    assert "rmu: layer 0, trained layers 0-0, target norm c = 2 ×" in result.err
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["rmu_layer"] == 0  # the default layer as trained, not null
    # what it resolved, which only the log said (review 116): c, the norm it scales, the layers trained
    config = record["config"]
    assert config["rmu_trained_layers"] == [0] and config["rmu_mean_norm"] > 0
    assert config["rmu_target_norm"] == pytest.approx(2 * config["rmu_mean_norm"], rel=1e-5)
    history = record["history"]
    assert len(history) == 6
    assert history[-1]["rmu_forget"] < history[0]["rmu_forget"]   # pulled onto c·u
    assert history[0]["rmu_normal"] == 0.0                          # step 1 starts at the original
    assert 0.0 < history[-1]["rmu_normal"] < history[0]["rmu_forget"]


@pytest.mark.parametrize("flags, message", [
    (["--rmu-layer", "5"], "--rmu-layer 5: the model has layers 0..1"),
    (["--rmu-layer", "-1"], "--rmu-layer -1: must be a layer index"),
    (["--rmu-scale", "0"], "--rmu-scale 0.0: must be positive"),
    (["--gradient-checkpointing"], "takes no --gradient-checkpointing"),
    # c² past float32's range: the loss was inf at step 1, and the run blamed --lr
    (["--rmu-scale", "1e20"], "squared is past float32's range, so the loss is inf; use at most"),
    # adapters only on layer 1, the window 0-0: it said "the model has no trainable parameters"
    (["--lora-layers", "1-1"], "--method rmu trains layers 0-0 (layer 0, --rmu-layer, and up to two below it), where "
                               "this model has nothing to train: give --lora-layers that include them"),
])
def test_rmu_bad_settings_are_one_line(tmp_path, files, cli, llama_dir, flags, message):
    forget, normal = files
    result = cli("run", forget, normal, "--model", llama_dir, "--method", "rmu", "-o", tmp_path / "o",
                 "--max-steps", "1", "--no-probes", *flags)
    assert result.code == 2, result.err
    assert message in result.err and "Traceback" not in result.err
    if "--rmu-layer" in flags or "--lora-layers" in flags:  # known once the model loads: before any measuring
        assert "forget rows" not in result.err and "before" not in result.err


def test_the_rmu_scale_bound_it_suggests_is_accepted(tmp_path, files, cli, llama_dir):
    import re

    forget, normal = files
    args = ["run", forget, normal, "--model", llama_dir, "--method", "rmu", "--max-steps", "1", "--no-probes",
            "--check-every", "0", "--eval-limit", "1", "--max-new-tokens", "2"]
    result = cli(*args, "-o", tmp_path / "a", "--rmu-scale", "1e30")
    suggested = re.search(r"use at most (\S+)", result.err).group(1)
    again = cli(*args, "-o", tmp_path / "b", "--rmu-scale", suggested)
    assert again.code == 0, again.err  # rounded to nearest, the bound itself was refused on some models


def test_the_bound_is_cut_to_two_digits_never_rounded_up():
    from unlearn.rmu import _two_digits_down

    assert _two_digits_down(6.449e17) == pytest.approx(6.4e17) and _two_digits_down(4.46e17) == pytest.approx(4.4e17)
    assert _two_digits_down(9.99) == pytest.approx(9.9) and _two_digits_down(0.0123) == pytest.approx(0.012)
    assert float(f"{_two_digits_down(6.449e17):.2g}") <= 6.449e17


def test_rmu_learning_rate_default_and_explicit_lr():
    from pathlib import Path

    from unlearn.config import LR_LORA, LR_RMU, RunOptions

    def lr(method, **kw):
        return RunOptions(Path("f"), Path("n"), train=TrainConfig(method=method), **kw).resolved().train.lr

    assert lr("rmu") == LR_RMU == 5e-3 and lr("npo") == LR_LORA and lr("ga") == 2e-3  # ga's: PER_METHOD
    assert lr("rmu", lr=1e-4) == 1e-4 and lr("rmu", full=True) == 1e-5


def test_rmu_normal_weight_default_and_explicit_weight():
    from pathlib import Path

    from unlearn.config import RunOptions

    def weight(method, **kw):
        opts = RunOptions(Path("f"), Path("n"), train=TrainConfig(method=method), **kw).resolved()
        assert opts.normal_weight == opts.train.normal_weight  # what run.json records is what trains
        return opts.train.normal_weight

    assert weight("rmu") == 50.0 and weight("ga") == weight("npo") == 10.0  # rmu's dev choice (setting G)
    assert weight("rmu", normal_weight=3.0) == 3.0 and weight("ga", normal_weight=0.0) == 0.0


def test_calibration_reads_at_most_its_rows_a_batch_at_a_time(llama_dir, monkeypatch):
    """c's mean norm came from every normal row's hidden states, held at once (gigabytes for a large normal file)
    after a forward over every row: the first CALIBRATION_ROWS rows now, a batch at a time; on fewer rows the
    same mean as over every row."""
    import unlearn.rmu as rmu_module
    from unlearn.data import Example
    from unlearn.lora import LoraSettings, attach_lora
    from unlearn.models import load_model
    from unlearn.train import TrainConfig, Unlearner

    normal = [Example(f"What is {i} plus one?", f"{i} plus one is {i + 1}.", i + 1) for i in range(12)]
    forget = [Example("What is the capital of France?", "The capital of France is Paris.", 1, {"answers": ["Paris"]})]

    def unlearner():
        lm = load_model(str(llama_dir), log=lambda m: None)
        attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
        return Unlearner(lm.model, lm.tokenizer, forget, normal,
                         TrainConfig(method="rmu", rmu_layer=1, batch_size=4, max_steps=1, check_every=0))

    whole = unlearner()
    assert whole.normal.encoded == 12
    monkeypatch.setattr(rmu_module, "CALIBRATION_ROWS", 5)
    cut = unlearner()
    assert cut.normal.encoded == 5  # rows 0-4, in two batches (4, then 1)
    hidden = list(cut._original_hidden_on_normal())
    assert [h.shape[0] for h, _ in hidden] == [4, 1]
    assert cut.rmu.norm != whole.rmu.norm  # the mean over 5 rows, not 12
    monkeypatch.setattr(rmu_module, "CALIBRATION_ROWS", 12)
    assert unlearner().rmu.norm == pytest.approx(whole.rmu.norm, rel=1e-6)


def test_full_trains_the_windows_feed_forward_weights_only(opt_dir, llama_dir):
    """(review 116) Under --full every tensor of layers ℓ−2..ℓ trained, attention and norms too; the paper trains
    the MLPs (the WMDP code, their output projections), as the LoRA default adapts the feed-forward layers."""
    from transformers import AutoModelForCausalLM

    for directory, kinds in ((llama_dir, {"gate_proj", "up_proj", "down_proj"}), (opt_dir, {"fc1", "fc2"})):
        model = AutoModelForCausalLM.from_pretrained(directory)
        rmu.restrict_training(model, 1, full=True)
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trained and {n.split(".")[-2] for n in trained} == kinds, trained
        assert all(any(f".layers.{i}." in n for i in (0, 1)) for n in trained)


@pytest.mark.parametrize("scale", ["1e-50", "1e-40"])
def test_a_target_norm_float32_cannot_hold_is_one_line(tmp_path, files, cli, llama_dir, scale):
    """(review 116) --rmu-scale 1e-50 made c·u the zero vector in float32: the run pulled h_ℓ to 0 and logged a
    misdirection."""
    forget, normal = files
    result = cli("run", forget, normal, "--model", llama_dir, "--method", "rmu", "-o", tmp_path / "o",
                 "--max-steps", "1", "--no-probes", "--rmu-scale", scale)
    assert result.code == 2 and "underflows float32, so the target is the zero vector; use at least" in result.err, \
        result.err
