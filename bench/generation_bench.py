"""Batched vs one-at-a-time generation, and the leak-rate sanity target, in one run.

    .venv/bin/python bench/generation_bench.py [--model M] [--prompts 40] [--max-new-tokens 32]
                                               [--batch-size 16] [--threads N] [--json]

1. Generates greedy answers to N prompts with `--batch-size 1` (no padding:
   the plain greedy answer of each prompt), timing it.
2. Generates them again in batches of --batch-size (left padding, KV cache),
   timing it. Speed-up = time(1) / time(batched); the target is >= 4x on 40
   prompts of 32 new tokens with the embedded model.
3. Uses the one-at-a-time answers as forget responses and scores the batched
   answers against them with `unlearn.evaluate`: the model's own greedy
   answers must read as leaked (target leak_rate >= 0.9). This also shows
   how much left padding changes greedy outputs.

Results go to stdout (a table, or one JSON object with --json); progress to
stderr. Not part of the test suite: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
    "Who wrote Romeo and Juliet?", "What do bees make?", "Why is the sky blue?",
    "How many legs does a spider have?", "What is the boiling point of water?", "Define photosynthesis.",
    "What is the largest planet in the solar system?", "Give me a synonym for happy.",
    "What language is spoken in Brazil?", "How do I boil an egg?", "What is a prime number?",
    "Translate 'thank you' into Spanish.", "What is the speed of light?", "Who painted the Mona Lisa?",
    "What is the chemical symbol for gold?", "Explain gravity in one sentence.", "What is an adjective?",
    "Write a haiku about autumn.", "What is the tallest mountain on Earth?", "How many days are in a leap year?",
    "What is the freezing point of water in Fahrenheit?", "Name a mammal that can fly.",
    "What is the square root of 81?", "Who was the first person on the Moon?", "What is DNA?",
    "Suggest a name for a pet cat.", "What causes rain?", "What is the capital of Japan?",
    "List two renewable energy sources.", "What is the opposite of cold?", "How many continents are there?",
    "What instrument has 88 keys?", "What is the main ingredient of guacamole?", "Describe a rainbow.",
    "What is the currency of the United Kingdom?", "Why do leaves change colour in autumn?",
    "What is the smallest unit of life?",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model spec for unlearn.models.load_model [default: embedded]")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def timed_generate(loaded, prompts, batch_size, max_new_tokens):
    from unlearn.generation import generate

    start = time.perf_counter()
    outputs = generate(loaded.model, loaded.tokenizer, prompts, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, desc=f"batch size {batch_size}")
    seconds = time.perf_counter() - start
    tokens = sum(len(loaded.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
    return outputs, seconds, tokens


def leak_check(loaded, prompts, references, outputs, max_new_tokens):
    """Score OUTPUTS against REFERENCES (the model's own one-at-a-time answers) as `unlearn eval` does."""
    from unlearn import evaluate
    from unlearn.data import Example

    examples = [Example(prompt=p, response=r, line=i) for i, (p, r) in enumerate(zip(prompts, references), 1)]
    examples = evaluate.clip_references(examples, loaded.tokenizer, max_new_tokens)
    flags = evaluate.leak_flags(outputs, examples)
    identical = sum(o == r for o, r in zip(outputs, references))
    return evaluate.rate(flags), identical


def main(argv=None):
    args = parse_args(argv)
    import torch

    from unlearn.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
    loaded = load_model(args.model, log=lambda m: print(m, file=sys.stderr))
    single, t_single, tok_single = timed_generate(loaded, prompts, 1, args.max_new_tokens)
    batched, t_batched, tok_batched = timed_generate(loaded, prompts, args.batch_size, args.max_new_tokens)
    leak, identical = leak_check(loaded, prompts, single, batched, args.max_new_tokens)
    result = {
        "model": loaded.name,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "seconds_batch_1": round(t_single, 2),
        "seconds_batched": round(t_batched, 2),
        "speedup": round(t_single / t_batched, 2),
        "tokens_per_second_batch_1": round(tok_single / t_single, 1),
        "tokens_per_second_batched": round(tok_batched / t_batched, 1),
        "leak_rate_own_answers": leak,
        "identical_outputs": f"{identical}/{len(prompts)}",
    }
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
