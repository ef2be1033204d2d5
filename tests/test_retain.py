"""--retain: the must-keep rows' KL term (value and sign by hand), their batches, and the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch

from unlearn.data import Example, collate
from unlearn.lora import LoraSettings, adapters_disabled, attach_lora, lora_modules
from unlearn.models import load_model
from unlearn.train import TrainConfig, Unlearner
from unlearn.errors import UsageError

FORGET = [Example("Who is Harry Potter's friend?", "Hermione Granger and Ron Weasley.", 1),
          Example("Where does Harry Potter study?", "Harry Potter studies at Hogwarts.", 2)]
NORMAL = [Example("What is two plus two?", "Two plus two equals four.", 1),
          Example("What do bees make?", "Bees make honey.", 2)]
RETAIN = [Example("What is the capital of France?", "The capital of France is Paris.", 1),
          Example("When does water boil?", "Water boils at one hundred degrees.", 2),
          Example("What colour is the sky?", "The sky is blue.", 3)]


def retainer(directory, method="ga", **overrides):
    torch.manual_seed(0)
    lm = load_model(str(directory), log=lambda m: None)
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
    config = TrainConfig(**{"method": method, "lr": 1e-2, "batch_size": 2, "max_steps": 4, "check_every": 0,
                            **overrides})
    return Unlearner(lm.model, lm.tokenizer, FORGET, NORMAL, config, retain=RETAIN)


def kl_by_hand(ref_logits, logits, labels):
    """KL(p_ref || p) summed over the vocabulary at each scored position, averaged over positions,
    written out element by element (no losses.py)."""
    total, count = 0.0, 0
    for row in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[row, t] == -100:
                continue
            p = [math.exp(x) for x in ref_logits[row, t - 1].tolist()]
            q = [math.exp(x) for x in logits[row, t - 1].tolist()]
            zp, zq = sum(p), sum(q)
            total += sum(a / zp * (math.log(a / zp) - math.log(b / zq)) for a, b in zip(p, q))
            count += 1
    return total / count


def test_retain_term_is_the_true_kl_on_the_retain_rows_times_its_weight(llama_dir):
    # Only the retain term: forget and normal weights 0, so the loss is retain_weight * KL.
    u = retainer(llama_dir, forget_weight=0.0, normal_weight=0.0, retain_weight=3.0)
    rows = {"forget": [u.forget[0]], "retain": u.retain[:2]}
    total, terms = u.loss(rows)
    assert terms["retain_kl"] == 0.0 and float(total.detach()) == 0.0  # B = 0: the model is the original

    for m in lora_modules(u.model).values():  # move off the original so the KL is not zero
        m.lora_B.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    total, terms = u.loss(rows)
    batch = collate(u.retain[:2], u.pad_id)
    with torch.no_grad():
        logits = u.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with adapters_disabled(u.model):
            ref = u.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = kl_by_hand(ref.double(), logits.double(), batch["labels"])
    assert expected > 1e-4  # a KL: positive once the model differs
    assert terms["retain_kl"] == pytest.approx(expected, rel=1e-3)
    assert float(total.detach()) == pytest.approx(3.0 * expected, rel=1e-3)

    # Its sign: gradient steps on the retain term alone bring the model back towards the original.
    before = terms["retain_kl"]
    for _ in range(3):
        loss, _ = u.loss(rows)
        u.optimizer.zero_grad()
        loss.backward()
        u.optimizer.step()
    assert u.loss(rows)[1]["retain_kl"] < before


@pytest.mark.parametrize("follows", [False, True])
def test_retain_weight_follows_the_margins_multiplier_only_when_asked(llama_dir, follows):
    # forget weight 1, normal 0, retain 3: loss = scale x forget + 3 x (scale if follows else 1) x KL
    u = retainer(llama_dir, normal_weight=0.0, retain_weight=3.0, stop_margin=0.05, forget_loss="unlikelihood",
                 retain_follows_margin=follows, forget_weight=1.0)
    for m in lora_modules(u.model).values():  # off the original, so the KL is not zero
        m.lora_B.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    rows = {"forget": [u.forget[0]], "retain": u.retain[:2]}
    u.forget_scale = 8.0  # three failed margin checks
    total, terms = u.loss(rows)
    assert terms["retain_kl"] > 1e-4
    retain_scale = 8.0 if follows else 1.0
    assert float(total.detach()) == pytest.approx(8.0 * terms["forget"] + 3.0 * retain_scale * terms["retain_kl"],
                                                  rel=1e-5)


def test_retain_follows_margin_needs_a_margin():
    with pytest.raises(UsageError, match="--retain-follows-margin"):
        TrainConfig(method="ga", stop_margin=0.0, retain_follows_margin=True).validate()


@pytest.mark.parametrize("method", ["ga", "ga+mismatch", "ga+template", "graddiff", "npo", "ulmr"])
def test_every_training_method_carries_the_retain_term(llama_dir, method):
    u = retainer(llama_dir, method=method)
    record = u.step()
    assert "retain_kl" in record and record["retain_kl"] >= 0.0
    weights = {"ga": 0.5, "ga+mismatch": 0.5, "ga+template": 0.5, "graddiff": 0.5, "npo": 0.5, "ulmr": 1.0}
    assert record["loss"] == pytest.approx(sum(
        w * record[k] for k, w in (("forget", weights[method]), ("npo", 0.5), ("sft", 1.0), ("mismatch", 1.0),
                                   ("kl", 10.0), ("normal_nll", 10.0), ("retain_kl", 10.0)) if k in record), rel=1e-4)


def test_every_retain_row_is_seen_each_epoch_and_resumes_in_order(llama_dir):
    u = retainer(llama_dir)
    seen = [tuple(r["input_ids"]) for _ in range(2) for r in u._rows()["retain"]]  # 2 steps x 2 rows >= 3 rows
    assert {tuple(r["input_ids"]) for r in u.retain} <= set(seen)
    state = u.state_dict()
    again = retainer(llama_dir)
    again.load_state_dict(state)
    assert again.retain_batches.order == u.retain_batches.order
    assert [r["input_ids"] for r in again._rows()["retain"]] == [r["input_ids"] for r in u._rows()["retain"]]


def test_no_retain_rows_or_zero_weight_adds_no_term(llama_dir):
    assert "retain" not in retainer(llama_dir, retain_weight=0.0)._rows()
    u = retainer(llama_dir)
    u.retain = []
    assert "retain" not in u._rows()


# --- the command line --------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CLI_FORGET = [{"prompt": "What is the capital of France?", "response": "The capital of France is Paris.",
               "answers": ["Paris"]},
              {"prompt": "Where does Harry Potter study?", "response": "Harry Potter studies at Hogwarts."}]
CLI_NORMAL = [{"prompt": "What is two plus two?", "response": "Two plus two equals four."},
              {"prompt": "What do bees make?", "response": "Bees make honey."}]
CLI_RETAIN = [{"prompt": "Who are Harry Potter's friends?", "response": "Hermione Granger and Ron Weasley.",
               "answers": ["Hermione"]},
              {"text": "Water boils at one hundred degrees and the sky is blue."}]
FAST = ["--max-steps", "2", "--check-every", "0", "--max-new-tokens", "4", "--batch-size", "2", "--normal-holdout",
        "0", "--no-probes"]


def test_cli_retain_is_trained_reported_and_recorded(tmp_path, llama_dir, cli):
    forget, normal = write_jsonl(tmp_path / "f.jsonl", CLI_FORGET), write_jsonl(tmp_path / "n.jsonl", CLI_NORMAL)
    retain = write_jsonl(tmp_path / "keep.jsonl", CLI_RETAIN)
    out = tmp_path / "out"
    result = cli("run", forget, normal, "--model", llama_dir, "-o", out, "--retain", retain, "--retain-weight", "2",
                 "--json", *FAST)
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["roles"]["retain"] == "trained"
    assert report["before"]["retain"]["n"] == 2 and "accuracy" in report["after"]["retain"]
    record = json.loads((out / "run.json").read_text())
    assert record["data"]["retain"]["rows"] == 2 and record["config"]["retain_weight"] == 2.0
    assert all("retain_kl" in step for step in record["history"])
    table = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "t", "--retain", retain, *FAST)
    assert table.code == 0 and any(line.split()[:2] == ["retain", "trained"] for line in table.out.splitlines())


def test_cli_retain_follows_margin_is_recorded_and_says_when_it_has_nothing_to_weigh(tmp_path, llama_dir, cli):
    forget, normal = write_jsonl(tmp_path / "f.jsonl", CLI_FORGET), write_jsonl(tmp_path / "n.jsonl", CLI_NORMAL)
    retain = write_jsonl(tmp_path / "keep.jsonl", CLI_RETAIN)
    note = "--retain-follows-margin: no retain rows or probes to weigh"
    fast = FAST + ["--check-every", "1"]  # it acts at the checks (refused without them)
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "a", "--retain", retain,
                 "--retain-follows-margin", *fast)
    assert result.code == 0, result.err
    assert note not in result.err
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["config"]["retain_follows_margin"] is True and not any(note in n for n in record["notes"])
    result = cli("run", forget, normal, "--model", llama_dir, "-o", tmp_path / "b", "--retain-follows-margin", *fast)
    assert result.code == 0 and note in result.err
    # kept in run.json too, for a script that reads it rather than stderr
    assert [n for n in json.loads((tmp_path / "b" / "run.json").read_text())["notes"] if note in n] == [
        note + "; it changes nothing in this run"]


def test_cli_retain_bad_input_is_one_line(tmp_path, llama_dir, cli):
    forget, normal = write_jsonl(tmp_path / "f.jsonl", CLI_FORGET), write_jsonl(tmp_path / "n.jsonl", CLI_NORMAL)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "response": "fine"}\n{"prompt": "no answer"}\n')
    result = cli("run", forget, normal, "--model", tmp_path / "no-model", "--retain", bad)
    assert result.code == 1 and result.err.strip() == (
        f"unlearn: {bad}:2: no response: expected one of response, answer, output")
    both = write_jsonl(tmp_path / "both.jsonl", [CLI_NORMAL[0], CLI_FORGET[0]])
    result = cli("run", forget, normal, "--model", tmp_path / "no-model", "--retain", both)
    assert result.code == 1 and result.err.strip() == (
        f"unlearn: {both}:2: the same prompt as {forget}:1; a row cannot be both forgotten and kept")
    result = cli("run", forget, normal, "--model", llama_dir, "--retain", bad, "--retain-weight", "-1")
    assert result.code == 2 and "--retain-weight -1.0" in result.err and len(result.err.strip().splitlines()) == 1


def test_resume_refuses_a_different_retain_file(tmp_path):
    # The resume check compares the checkpoint's recorded arguments (run._run_args) with this run's.
    from pathlib import Path

    from unlearn.config import RunOptions
    from unlearn.errors import UsageError
    from unlearn.run import _prepare_output, _run_args

    forget, normal = write_jsonl(tmp_path / "f.jsonl", CLI_FORGET), write_jsonl(tmp_path / "n.jsonl", CLI_NORMAL)
    retain = write_jsonl(tmp_path / "keep.jsonl", CLI_RETAIN)
    out = tmp_path / "out"
    opts = RunOptions(forget=forget, normal=normal, output=out, retain=(Path(retain),), resume=True).resolved()
    args = _run_args(opts)
    assert len(args["data"]["retain"]) == 1
    step = out / "checkpoints" / "step-1"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"args": args}))
    assert _prepare_output(opts, out, _run_args(opts), []) == step  # the same retain file: resumes
    write_jsonl(retain, CLI_RETAIN[:1])
    with pytest.raises(UsageError, match=r"differ from the checkpointed run's \(data\.retain: \["):
        _prepare_output(opts, out, _run_args(opts), [])
    without = RunOptions(forget=forget, normal=normal, output=out, resume=True).resolved()
    with pytest.raises(UsageError, match=r"\(data\.retain: \[\"[0-9a-f]{64}\"\] then, null now\)"):
        _prepare_output(without, out, _run_args(without), [])


@pytest.mark.parametrize("method, flags, expected", [
    ("ga", {}, (True, 50.0)),                                   # the default method trains on its probes
    ("npo", {}, (False, 10.0)),                                 # other methods were not measured with them
    ("ga", {"probes": False}, (False, 10.0)),                   # no probes, nothing to train on
    ("ga", {"retain_probes": False}, (False, 10.0)),            # --no-retain-probes: the previous default
    ("npo", {"retain_probes": True}, (True, 50.0)),
    ("ga", {"retain_weight": 3.0}, (True, 3.0)),                # an explicit weight wins
    ("rmu", {}, (True, 10.0)),                                  # rmu's dev choice: probes at 10
    ("rmu", {"retain_probes": False}, (False, 10.0)),
])
def test_retain_probes_and_weight_defaults_per_method(method, flags, expected):
    from unlearn.config import RunOptions, TrainConfig

    opts = RunOptions(forget=Path("f.jsonl"), normal=Path("n.jsonl"), train=TrainConfig(method=method),
                      **flags).resolved()
    assert (opts.retain_probes, opts.train.retain_weight) == expected


def test_retain_probes_need_probes():
    from unlearn.config import RunOptions
    from unlearn.errors import UsageError

    with pytest.raises(UsageError, match="--no-probes"):
        RunOptions(forget=Path("f.jsonl"), normal=Path("n.jsonl"), probes=False, retain_probes=True).resolved()
