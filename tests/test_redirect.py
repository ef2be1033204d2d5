"""redirect.py: the tokens a forget position may not move to, on a hand-made vocabulary; and the
redirect and spellings terms in training, against losses.redirect_loss and losses.unlikelihood_loss
computed by hand from the model's logits."""

import pytest
import torch

from unlearn import losses
from unlearn.data import collate
from unlearn.losses import IGNORE_INDEX as IGN
from unlearn.lora import adapters_disabled
from unlearn.redirect import PrefixIndex, banned_tokens

from test_train import unlearner


class Vocabulary:
    """A tokenizer reduced to what PrefixIndex reads: len(), decode and batch_decode."""

    def __init__(self, texts):
        self.texts = texts

    def __len__(self):
        return len(self.texts)

    def decode(self, ids):
        return "".join(self.texts[i] for i in ids)

    def batch_decode(self, batches):
        return [self.decode(ids) for ids in batches]


TEXTS = [" Albert", " Einstein", " Ein", "stein", " E", "E", " einstein", " Schweitzer", " was", " ", ".", " Eins"]


def test_every_spelling_of_the_rest_of_the_answer_is_banned_and_nothing_else():
    index = PrefixIndex(Vocabulary(TEXTS))
    # " Albert Einstein was." with " Einstein" the answer: label position 2 scored, the rest not.
    row = {"input_ids": [0, 0, 1, 8, 10], "labels": [IGN, IGN, 1, IGN, IGN]}
    banned = banned_tokens(index, row)
    by_text = sorted(TEXTS[t] for j, t in banned)
    assert {j for j, _ in banned} == {2}
    # " Einstein", " Ein", " E", "E", " einstein" (case folded) and " Eins" start "einstein"; "stein",
    # " Schweitzer", " was", the whitespace token and "." do not.
    assert by_text == sorted([" Einstein", " Ein", " E", "E", " einstein", " Eins"])


def test_a_run_of_tokens_bans_at_each_position_what_remains_of_it():
    index = PrefixIndex(Vocabulary(TEXTS))
    # The answer spelled " Ein" + "stein": at "stein", only "stein" itself remains to ban; the run
    # ends there, so " was" (not scored) is not part of what remains.
    row = {"input_ids": [0, 2, 3, 8], "labels": [IGN, 2, 3, IGN]}
    banned = banned_tokens(index, row)
    assert sorted(TEXTS[t] for j, t in banned if j == 1) == sorted([" Einstein", " Ein", " E", "E", " einstein", " Eins"])
    assert [TEXTS[t] for j, t in banned if j == 2] == ["stein"]


def test_the_redirect_term_in_training_is_the_loss_against_the_original(llama_dir):
    u = unlearner(llama_dir, forget_loss="redirect")
    assert all(row["banned"] and all(row["labels"][j] != IGN for j, _ in row["banned"]) for row in u.forget)
    rows = {"forget": u.forget[:2]}
    batch = collate(rows["forget"], u.pad_id)
    banned = torch.tensor([(i, j, t) for i, row in enumerate(rows["forget"]) for j, t in row["banned"]])
    with torch.no_grad():
        logits = u.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # LoRA starts at zero: the model is still the original, so the term is -log(1 - p(banned)),
        # at least the unlikelihood of the answer's own tokens
        expected = float(losses.redirect_loss(logits, logits, batch["labels"], banned))
        assert u.loss(rows)[1]["forget"] == pytest.approx(expected, rel=1e-5)
        assert expected >= float(losses.unlikelihood_loss(logits, batch["labels"])) - 1e-6
    # after an update, the reference stays the original (adapters off), not the trained model
    u.step()
    with torch.no_grad():
        trained = u.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with adapters_disabled(u.model):
            original = u.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert not torch.allclose(trained, original)
        expected = float(losses.redirect_loss(original, trained, batch["labels"], banned))
        assert u.loss(rows)[1]["forget"] == pytest.approx(expected, rel=1e-4)


def test_rows_scored_whole_are_not_redirected_and_a_batch_of_them_is_plain_unlikelihood(llama_dir):
    from test_train import FORGET, NORMAL
    from unlearn.data import Example
    from unlearn.lora import LoraSettings, attach_lora
    from unlearn.models import load_model
    from unlearn.train import TrainConfig, Unlearner

    lm = load_model(str(llama_dir), log=lambda m: None)
    attach_lora(lm.model, LoraSettings(rank=4, alpha=8), seed=0)
    # an answer the response does not contain: every response token is scored, no redirect
    whole = Example("Who painted it?", "Nobody knows who did.", 4, {"answers": ["Picasso"]})
    u = Unlearner(lm.model, lm.tokenizer, [*FORGET, whole], NORMAL,
                  TrainConfig(lr=1e-2, batch_size=2, max_steps=4, check_every=0, forget_loss="redirect"))
    assert [bool(row.get("banned")) for row in u.forget] == [True, True, True, False]
    assert not u.forget[3]["focused"]
    batch = collate([u.forget[3]], u.pad_id)
    with torch.no_grad():
        logits = u.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert u.loss({"forget": [u.forget[3]]})[1]["forget"] == pytest.approx(
            float(losses.unlikelihood_loss(logits, batch["labels"])), rel=1e-6)
        mixed = collate([u.forget[0], u.forget[3]], u.pad_id)
        logits = u.model(input_ids=mixed["input_ids"], attention_mask=mixed["attention_mask"]).logits
        banned = torch.tensor([(0, j, t) for j, t in u.forget[0]["banned"]])
        expected = float(losses.redirect_loss(logits, logits, mixed["labels"], banned, torch.tensor([True, False])))
        assert u.loss({"forget": [u.forget[0], u.forget[3]]})[1]["forget"] == pytest.approx(expected, rel=1e-5)


def test_the_spellings_term_in_training_pushes_each_answer_position_s_banned_set(llama_dir):
    u = unlearner(llama_dir, forget_loss="spellings")
    assert all(row["banned"] for row in u.forget)  # every row of FORGET is narrowed to its answer
    rows = {"forget": u.forget[:2]}
    batch = collate(rows["forget"], u.pad_id)
    banned = torch.tensor([(i, j, t) for i, row in enumerate(rows["forget"]) for j, t in row["banned"]])
    for _ in range(2):  # at the original, then after an update (no reference: the term reads the model alone)
        with torch.no_grad():
            logits = u.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            expected = float(losses.unlikelihood_loss(logits, batch["labels"], banned))
            assert u.loss(rows)[1]["forget"] == pytest.approx(expected, rel=1e-5)
            # the set includes the label: never below the answer's own unlikelihood
            assert expected >= float(losses.unlikelihood_loss(logits, batch["labels"])) - 1e-6
        u.step()


def test_a_position_inside_a_characters_bytes_bans_its_label_only():
    # A byte-level BPE spells " Москва" from a lone lead byte on: decoded from there, the remainder opens with
    # U+FFFD, the text of every lone byte token (~300 of them on SmolLM2), none of them a spelling of the answer.
    texts = [" is", "\ufffd", "\ufffd", "осква", " Москва"]
    index = PrefixIndex(Vocabulary(texts))
    row = {"input_ids": [0, 1, 3], "labels": [IGN, 1, 3]}
    banned = banned_tokens(index, row)
    assert [t for j, t in banned if j == 1] == [1]  # its own label, not the other lone byte
    assert [t for j, t in banned if j == 2] == [3]
