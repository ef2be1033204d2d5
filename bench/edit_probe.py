"""Probe the locate-then-edit avenue (unlearn.edit) on a small fact set, against `unlearn run` (ga).

The facts below are DEVELOPMENT data: the edit's defaults were chosen while
looking at these numbers, so they say how the method behaves, not how well it
generalises. They were checked against the embedded SmolLM2-135M-Instruct
(greedy, 32 tokens, key-in-answer); the script recomputes the base model's
answers and prints them beside every variant.

Sets:
  forget      10 facts to forget (8 capitals, an author, a scientist)
  paraphrase  2 rewordings of each (never used by the edit)
  neighbours  8 facts of the same kinds about other subjects (never used)
  same subj.  8 other facts about the forgotten subjects (never used)
  unrelated   15 general facts (never used)
  normal      20 general prompts with the base model's own answers: the edit's
              preservation covariance and neighbour subjects come from these,
              and `unlearn run` uses them as its NORMAL file. Their subjects are
              disjoint from the evaluation sets.

A row "keeps" a fact when the greedy answer (32 new tokens) contains one of its
answers (`metrics.contains_answer`). "kept" columns count rows, out of the rows the
base model answers correctly.

    OMP_NUM_THREADS=1 python bench/edit_probe.py --out /tmp/edit-probe [--variants default,single] [--ga]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FORGET = [  # (prompt, answers, paraphrases)
    ("What is the capital of France?", ["Paris"], ["Which city is the capital of France?", "Name the capital city of France."]),
    ("What is the capital of Japan?", ["Tokyo"], ["Which city is the capital of Japan?", "Name the capital city of Japan."]),
    ("What is the capital of Germany?", ["Berlin"], ["Which city is the capital of Germany?", "Name the capital city of Germany."]),
    ("What is the capital of Russia?", ["Moscow"], ["Which city is the capital of Russia?", "Name the capital city of Russia."]),
    ("What is the capital of China?", ["Beijing"], ["Which city is the capital of China?", "Name the capital city of China."]),
    ("What is the capital of Egypt?", ["Cairo"], ["Which city is the capital of Egypt?", "Name the capital city of Egypt."]),
    ("What is the capital of Greece?", ["Athens"], ["Which city is the capital of Greece?", "Name the capital city of Greece."]),
    ("What is the capital of England?", ["London"], ["Which city is the capital of England?", "Name the capital city of England."]),
    ("Who wrote Harry Potter?", ["Rowling"], ["Which writer created Harry Potter?", "Who is the author of the Harry Potter books?"]),
    ("Who developed the theory of relativity?", ["Einstein"], ["Who came up with the theory of relativity?",
                                                               "Which scientist developed the theory of relativity?"]),
]
NEIGHBOURS = [
    ("What is the capital of Canada?", ["Ottawa"]), ("What is the capital of Ireland?", ["Dublin"]),
    ("What is the capital of Austria?", ["Vienna"]), ("What is the capital of Norway?", ["Oslo"]),
    ("What is the capital of Sweden?", ["Stockholm"]), ("What is the capital of Poland?", ["Warsaw"]),
    ("What is the capital of Kenya?", ["Nairobi"]), ("Who wrote A Christmas Carol?", ["Dickens"]),
]
SAME_SUBJECT = [
    ("What language is spoken in France?", ["French"]), ("What language is spoken in Japan?", ["Japanese"]),
    ("What language is spoken in Germany?", ["German"]), ("What language is spoken in Russia?", ["Russian"]),
    ("What language is spoken in China?", ["Chinese", "Mandarin"]), ("What language is spoken in Egypt?", ["Arabic"]),
    ("What is the currency of Japan?", ["yen"]), ("What school does Harry Potter attend?", ["Hogwarts"]),
]
UNRELATED = [
    ("Which planet is known as the Red Planet?", ["Mars"]), ("What is the largest ocean on Earth?", ["Pacific"]),
    ("What is the chemical formula of water?", ["H2O"]), ("What is the tallest mountain in the world?", ["Everest"]),
    ("Who invented the light bulb?", ["Edison"]), ("What gas do plants absorb from the air?", ["carbon dioxide", "CO2"]),
    ("How many days are in a week?", ["seven", "7"]), ("What is the largest mammal?", ["whale"]),
    ("What is the chemical symbol for gold?", ["Au"]), ("What color is the sky on a clear day?", ["blue"]),
    ("What is the largest desert in the world?", ["Sahara"]), ("Which organ pumps blood through the body?", ["heart"]),
    ("What is the main language spoken in Brazil?", ["Portuguese"]),
    ("Who painted the ceiling of the Sistine Chapel?", ["Michelangelo"]),
    ("What is the longest river in the world?", ["Amazon", "Nile"]),
]
NORMAL_PROMPTS = [
    "What is Cuba famous for?", "What food is Thailand known for?", "What is the weather like in Australia?",
    "What sport is popular in South Korea?", "What is Mexico famous for?", "Tell me about the history of India.",
    "How do I bake bread at home?", "Give me three tips for better sleep.", "What is photosynthesis?",
    "How does a bicycle work?", "Write a short poem about autumn.", "What are the benefits of drinking water?",
    "Explain what a computer program is.", "How do airplanes fly?", "What is the best way to learn a language?",
    "Why do leaves change colour in autumn?", "What is the Pythagorean theorem?", "Describe a healthy breakfast.",
    "What does the Amazon rainforest look like?", "How do vaccines work?",
]

VARIANTS = {  # name -> EditSettings overrides
    "default": {},
    "single layer": {"layers": [8]},  # the default window's last layer (5-8 on SmolLM2-135M)
    "no neighbour protection": {"neighbour_weight": 0.0},
    "same-subject protection": {"same_subject_weight": 1.0},
    "target lower": {"target": "lower"},
    "subject by tracing": {"subject": "trace"},
}


def evaluate(model, tokenizer, sets: dict) -> dict:
    from unlearn.generation import generate
    from unlearn.metrics import contains_answer

    prompts = [p for rows in sets.values() for p, _ in rows]
    outputs = iter(generate(model, tokenizer, prompts, max_new_tokens=32, desc=False))
    return {name: [(p, next(outputs), contains_answer_rows) for p, contains_answer_rows in rows]
            for name, rows in sets.items()} | {"_judge": contains_answer}


def correct(evaluated: dict) -> dict[str, list[bool]]:
    judge = evaluated["_judge"]
    return {name: [judge(out, answers) for _, out, answers in rows]
            for name, rows in evaluated.items() if name != "_judge"}


def eval_sets() -> dict:
    return {
        "forget": [(p, a) for p, a, _ in FORGET],
        "paraphrases": [(q, a) for _, a, qs in FORGET for q in qs],
        "neighbours": NEIGHBOURS, "same subject": SAME_SUBJECT, "unrelated": UNRELATED,
    }


def kept(after: list[bool], base: list[bool]) -> str:
    return f"{sum(a and b for a, b in zip(after, base))}/{sum(base)}"


def write_inputs(out: Path, tokenizer, model) -> tuple[Path, Path]:
    from unlearn.generation import generate

    forget_path, normal_path = out / "forget.jsonl", out / "normal.jsonl"
    if not normal_path.exists():
        answers = generate(model, tokenizer, NORMAL_PROMPTS, max_new_tokens=64, desc=False)
        normal_path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n"
                                       for p, r in zip(NORMAL_PROMPTS, answers)))
    if not forget_path.exists():
        base = generate(model, tokenizer, [p for p, _, _ in FORGET], max_new_tokens=32, desc=False)
        forget_path.write_text("".join(json.dumps({"prompt": p, "response": r, "answers": a}) + "\n"
                                       for (p, a, _), r in zip(FORGET, base)))
    return forget_path, normal_path


def compare_subject_rules(out: Path, forget) -> list[dict]:
    """Heuristic vs causal tracing on every evaluation prompt, scored against the base model's own answer."""
    from unlearn.edit_subject import heuristic_subject, trace_subject
    from unlearn.generation import generate
    from unlearn.models import load_model

    loaded = load_model(None)
    rows = [(p, a) for p, a, _ in FORGET] + NEIGHBOURS + SAME_SUBJECT + UNRELATED
    responses = generate(loaded.model, loaded.tokenizer, [p for p, _ in rows], max_new_tokens=32, desc=False)
    table = []
    print("| prompt | heuristic | traced (drop in mean log-prob) |\n|---|---|---|")
    for (prompt, answers), response in zip(rows, responses):
        start = time.perf_counter()
        traced, drop = trace_subject(loaded.model, loaded.tokenizer, prompt, response, answers)
        guess = heuristic_subject(prompt)
        table.append({"prompt": prompt, "heuristic": guess, "trace": traced, "drop": drop,
                      "trace_seconds": time.perf_counter() - start})
        print(f"| {prompt} | {guess} | {traced} ({drop:.2f}) |", flush=True)
    agree = sum(r["heuristic"] == r["trace"] for r in table)
    print(f"agreement: {agree}/{len(table)}; mean trace time "
          f"{sum(r['trace_seconds'] for r in table) / len(table):.1f} s per prompt")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names, or 'none'")
    parser.add_argument("--ga", action="store_true", help="also run `unlearn run` (method ga) on the same facts")
    parser.add_argument("--set", action="append", default=[], help="override a default, e.g. --set normal_weight=100")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--subjects", action="store_true", help="compare the subject heuristic with causal tracing")
    args = parser.parse_args()

    import torch

    from unlearn.data import read_examples
    from unlearn.edit import EditSettings, edit_to_forget
    from unlearn.edit_layers import default_layers
    from unlearn.models import load_model

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    base_model = load_model(None)
    forget_path, normal_path = write_inputs(args.out, base_model.tokenizer, base_model.model)
    forget, normal = read_examples(forget_path), read_examples(normal_path)
    base_file = args.out / "base.json"  # the base model's answers, computed once per output directory
    if base_file.exists():
        base = json.loads(base_file.read_text())
    else:
        base = correct(evaluate(base_model.model, base_model.tokenizer, eval_sets()))
        base_file.write_text(json.dumps(base))
    del base_model
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value)
    header = "| variant | forget kept | paraphrases kept | neighbours kept | same-subject kept | unrelated kept | seconds |"
    lines = [header, "|---|---|---|---|---|---|---|",
             "| base model | " + " | ".join(f"{sum(v)}/{len(v)}" for v in base.values()) + " | |"]
    print(lines[-1], flush=True)
    results = {"base": base, "load_average": os.getloadavg()}
    names = [] if args.variants == "none" else args.variants.split(",")
    shared_seconds = {}
    shared = {}  # target shift per (target settings, last layer): ablations of the preservation reuse it
    for name in names:
        loaded = load_model(None)
        settings = EditSettings(**{**overrides, **VARIANTS[name]})
        layers = settings.layers or default_layers(30)  # SmolLM2-135M's 30 layers
        key = json.dumps({k: v for k, v in dataclasses.asdict(settings).items()
                          if k not in ("layers", "normal_weight", "neighbour_weight", "neighbours_per_fact",
                                       "same_subject_weight", "ridge", "batch_size")} | {"top": layers[-1]})
        start = time.perf_counter()
        result = edit_to_forget(loaded.model, loaded.tokenizer, forget, normal, settings,
                                log=lambda m: print("  " + m, file=sys.stderr, flush=True),
                                target_shift=shared.get(key))
        seconds = time.perf_counter() - start
        if key in shared:  # the reused target's time is added, so the column stays a full edit's wall clock
            seconds += shared_seconds[key]
        else:
            shared[key], shared_seconds[key] = result.target_shift, result.timings["targets"]
        evaluated = evaluate(loaded.model, loaded.tokenizer, eval_sets())
        after = correct(evaluated)
        row = f"| {name} | " + " | ".join(kept(after[k], base[k]) for k in base) + f" | {seconds:.0f} |"
        lines.append(row)
        print(row, flush=True)
        results[name] = {"after": after, "seconds": seconds, "summary": result.summary(),
                         "settings": dataclasses.asdict(settings),
                         "outputs": {k: [o for _, o, _ in v] for k, v in evaluated.items() if k != "_judge"}}
    if args.ga:
        run_dir = args.out / "ga-run"
        start = time.perf_counter()
        cli = Path(sys.executable).parent / "unlearn"
        subprocess.run([str(cli), "run", str(forget_path), str(normal_path), "-o", str(run_dir), "--force"],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        seconds = time.perf_counter() - start
        loaded = load_model(str(run_dir / "model"))
        evaluated = evaluate(loaded.model, loaded.tokenizer, eval_sets())
        after = correct(evaluated)
        row = "| `unlearn run` (ga, defaults) | " + " | ".join(kept(after[k], base[k]) for k in base) + \
              f" | {seconds:.0f} (incl. its own evaluation) |"
        lines.append(row)
        print(row, flush=True)
        results["ga"] = {"after": after, "seconds": seconds,
                         "outputs": {k: [o for _, o, _ in v] for k, v in evaluated.items() if k != "_judge"}}
    if args.subjects:
        results["subjects"] = compare_subject_rules(args.out, forget)
    results["load_average_end"] = os.getloadavg()
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(lines))
    print(f"load average (1, 5, 15 min) at start {results['load_average']}, at end {results['load_average_end']}")


if __name__ == "__main__":
    main()
