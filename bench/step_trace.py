"""Per-step trace of one `unlearn run` on a quality-benchmark scenario: what the model is after each step.

    .venv/bin/python bench/step_trace.py SCENARIO --seed S --steps N --out TRACE.jsonl [-- RUN ARGS...]

The run trains N steps and never stops early: its stop rule is replaced by one that, after every
step, records (one JSON line a step)
- `tool_leak`: the stop rule's own forget leak (the check `unlearn run` makes; exact here, no
  early verdict, since it never decides);
- `probe_accuracy`: per probe set of the run (neighbours, same subject), the share of probes whose
  answer words still appear (the report's accuracy, at the probes' own answer budget);
- the benchmark's columns (`quality.score`: forget and paraphrase leak, neighbours, same-subject
  and unrelated kept, normal similarity) of the model as it is after that step.
The model is measured in place (adapters on) between steps; generation restores the random state,
so the steps are those of a run with the same seed. Each step costs about 30 s more on 2 cores.
Used to see when the default's collateral damage happens (docs/quality.md, "The stop rule stops at
the worst moment").
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (bench/quality.py: the scenarios, their judges and base outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default=None, help="the run's output directory [default: a temporary one]")
    parser.add_argument("run_args", nargs="*", help="more `unlearn run` options, after --")
    args = parser.parse_args()

    import tempfile

    from unlearn import run
    from unlearn.cli import main as unlearn_main

    scenario = quality.Scenario(args.scenario)
    spec = scenario.model_spec()
    base = quality.base_outputs(scenario, spec)
    data_of_run = {}
    real_train_model = run.train_model

    def train_model(opts, job, data, log):
        data_of_run["data"] = data
        return real_train_model(opts, job, data, log)

    def stop_rule(opts, job, forget, *rest, **kwargs):
        checker = run.Measurer(job.model, job.tokenizer, run.Settings(max_new_tokens=opts.train.check_tokens,
                                                                      batch_size=opts.gen_batch_size, likelihood=False))
        step = [0]

        def forgotten():
            step[0] += 1
            leak = run.leak_rate(checker, forget)
            probe_sets = [s for s in data_of_run["data"].sets if s.name in job.probe_names]
            kept = job.probe_after.measure(probe_sets, {}) if probe_sets else {}
            after = quality.measure(job.model, job.tokenizer, scenario)
            scores = {k: v for k, v in quality.score(scenario, base, after).items() if k != "base_right"}
            row = {"scenario": args.scenario, "seed": args.seed, "step": step[0], "tool_leak": leak,
                   "probe_accuracy": {k: v.summary["accuracy"] for k, v in kept.items()}, **scores}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            return False, leak

        return forgotten

    run.train_model, run.stop_rule = train_model, stop_rule
    work = args.work or tempfile.mkdtemp(prefix="step-trace-")
    sys.argv = (["unlearn", "run", str(scenario.forget_file), str(scenario.normal_train), "--seed", str(args.seed),
                 "--max-steps", str(args.steps), "-o", work, "--force"] + quality.CHEAP_EVAL
                + (["--model", spec] if spec else []) + args.run_args)
    unlearn_main()


if __name__ == "__main__":
    main()
