"""The work of the 2-process tests (test_distributed_shards.py), run by torchrun or in the test's own process.

`python distributed_worker.py MODEL_DIR OUT.pt [--fsdp]` under torchrun joins the process
group (`distributed.session`), does everything below, and rank 0 saves the results to OUT.pt.
The test calls `measure_all` and `train_all` in-process, without a process group, for the
one-process reference: the same functions, the same data.

- measure_all: every measurement path of a run (`Measurer.measure_set` with likelihood
  scores, fluency under the adapters-off model, membership inference, the stop rule's
  `leak_rate`) on a model whose LoRA weights are set to seeded random values; it also
  counts the prompts each rank generated, to show the work was shared out.
- cache_all (under torchrun only): the measurement cache with a cache per rank: rank 0
  alone writes, and decides for every rank whether a measurement is read back.
- train_all: N steps of every trainable method on the same global batch (and of ga in two micro-batches).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from unlearn import distributed
from unlearn.data import Example

FORGET = [
    Example("Who wrote the Harry Potter books?", "J.K. Rowling wrote them.", 1, {"answers": ["Rowling"]}),
    Example("Who is Harry Potter's friend?", "Hermione Granger and Ron Weasley.", 2,
            {"paraphrased_response": "Ron and Hermione.", "perturbed_responses": ["Draco.", "Neville Longbottom."]}),
    Example("Where does Harry Potter study?", "Harry Potter studies at Hogwarts.", 3),
    Example("What is the name of Harry's owl, the snowy one he got for his birthday?", "Hedwig.", 4,
            {"answers": ["Hedwig"]}),
    Example("Which house?", "Gryffindor, the house of the brave.", 5),
    Example("Who is the headmaster of Hogwarts during most of the books?", "Albus Dumbledore.", 6),
    # At TRAIN_MAX_LENGTH its answer is cut off: a row with no scored token, so that the ranks'
    # forget terms average over different numbers of rows (what `distributed.global_mean` weights).
    Example("Which owl?", "There is a lot to say about the famous snowy owl of the books, and its name is Hedwig.", 7,
            {"answers": ["Hedwig"]}),
]
NORMAL = [
    Example("What is two plus two?", "Two plus two equals four.", 1, {"answers": ["four"]}),
    Example("What do bees make?", "Bees make honey.", 2),
    Example("What colour is the sky on a clear day, seen from the ground?", "The sky is blue.", 3),
    Example("Name a fruit.", "An apple.", 4),
    Example("When does water boil at sea level, in degrees Celsius?", "At one hundred degrees.", 5,
            {"answers": ["hundred", "100"]}),
]
# Twelve prompts in batches of two: seven batches (forget 4, normal 3), dealt out unevenly over two
# ranks, a short last batch in the normal set.
GEN_BATCH = 2
TRAIN_MAX_LENGTH = 64
# The training runs: every trainable method in one micro-batch of 4, and ga in two of 2 (--grad-accum: each
# term weighed by its share of the update's units, over both ranks and both micro-batches).
RUNS = {**{m: (m, 4, 1) for m in ("ga", "ga+mismatch", "ga+template", "graddiff", "npo", "ulmr")},
        "ga --grad-accum 2": ("ga", 2, 2)}
METHODS = tuple(RUNS)
STEPS = 3


def _model(model_dir, seed: int = 0, perturb: bool = False):
    from unlearn.lora import LoraSettings, attach_lora, lora_modules
    from unlearn.models import load_model

    loaded = load_model(str(model_dir), log=lambda *a: None)
    torch.manual_seed(seed)
    attach_lora(loaded.model, LoraSettings(), seed=seed)
    if perturb:  # adapters that change the answers, so that "after" differs from "before"
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for module in lora_modules(loaded.model).values():
                for p in module.parameters():
                    if p.requires_grad:
                        p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return loaded.model, loaded.tokenizer


def measure_all(model_dir) -> dict:
    """Every measurement path on the forget and normal rows, plus how many prompts this rank generated."""
    from unlearn import generation
    from unlearn.lora import adapters_disabled
    from unlearn.measure import EvalSet, Measurer, Settings, leak_rate, original_scorer

    model, tokenizer = _model(model_dir, perturb=True)
    generated = []
    real_generate = generation.generate

    def counting_generate(model, tokenizer, prompts, **kwargs):
        generated.append(len(prompts))
        return real_generate(model, tokenizer, prompts, **kwargs)

    generation.generate = counting_generate
    try:
        sets = [EvalSet("forget", "forget", FORGET), EvalSet("normal", "retain", NORMAL)]
        settings = Settings(max_new_tokens=8, batch_size=GEN_BATCH, members=FORGET[:3], holdout=NORMAL[:3])
        common = dict(fluency_scorer=original_scorer(model, tokenizer, None, GEN_BATCH), against=FORGET)
        before_measurer = Measurer(model, tokenizer, settings, **common)
        with adapters_disabled(model):
            before = {s.name: before_measurer.measure_set(s, own_baseline=True) for s in sets}
        after = Measurer(model, tokenizer, settings, **common).measure(
            sets, {name: m.outputs for name, m in before.items()})
        checker = Measurer(model, tokenizer, Settings(max_new_tokens=12, batch_size=GEN_BATCH, likelihood=False))
        leak = leak_rate(checker, sets[0])
    finally:
        generation.generate = real_generate
    return {"before": {k: vars(v) for k, v in before.items()}, "after": {k: vars(v) for k, v in after.items()},
            "stop_rule_leak": leak, "generated": sum(generated)}


def cache_all(model_dir, cache_root: Path) -> dict:
    """The forget set measured twice with the measurement cache on, each rank with a cache of its own
    (as on machines that share nothing): how often this rank wrote, and read back, and whether the
    second measurement equals the first."""
    import os

    from unlearn import measure_cache
    from unlearn.measure import EvalSet, Measurer, Settings

    os.environ["UNLEARN_CACHE"] = str(cache_root / f"rank{distributed.world().rank}")
    model, tokenizer = _model(model_dir)
    stored, real_store = [], measure_cache.store
    measure_cache.store = lambda k, value: (stored.append(k), real_store(k, value))
    try:
        forget = EvalSet("forget", "forget", FORGET)
        settings = Settings(max_new_tokens=4, batch_size=GEN_BATCH)
        first = Measurer(model, tokenizer, settings, fingerprint="fingerprint").measure_set(forget, own_baseline=True)
        again = Measurer(model, tokenizer, settings, fingerprint="fingerprint")
        second = again.measure_set(forget, own_baseline=True)
    finally:
        measure_cache.store = real_store
    return {"stored": len(stored), "reused": again.reused, "same": vars(first) == vars(second)}


def train_all(model_dir) -> dict:
    """STEPS steps of each method: its logged terms per step and its final trainable weights."""
    from unlearn.config import TrainConfig
    from unlearn.train import Unlearner

    results = {}
    for run, (method, batch_size, grad_accum) in RUNS.items():
        model, tokenizer = _model(model_dir)
        forward = distributed.wrap(model)
        config = TrainConfig(method=method, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, max_steps=STEPS,
                             check_every=0, max_length=TRAIN_MAX_LENGTH)
        unlearner = Unlearner(model, tokenizer, FORGET, NORMAL, config, forward_model=forward)
        history = [unlearner.step() for _ in range(STEPS)]
        weights = {name: distributed.full(p.detach()).clone() for name, p in model.named_parameters()
                   if p.requires_grad}
        results[run] = {"history": history, "weights": weights}
    return results


def main(argv: list[str]) -> None:
    model_dir, out = argv[0], Path(argv[1])
    with distributed.session(fsdp="--fsdp" in argv) as world:
        torch.set_num_threads(1)
        result = {"train": train_all(model_dir)}
        if not world.fsdp:
            result["measure"] = measure_all(model_dir)
            import torch.distributed as dist

            counts = [None] * world.size
            dist.all_gather_object(counts, result["measure"]["generated"])
            result["measure"]["generated"] = counts
            caching = [None] * world.size
            dist.all_gather_object(caching, cache_all(model_dir, out.parent / "caches"))
            result["cache"] = caching
        if world.is_main:
            torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1:])
