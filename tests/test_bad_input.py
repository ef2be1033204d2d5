"""Bad input through the real CLI: every case exits 1 or 2 with exactly one line on stderr,
no traceback, and writes nothing (the working directory is left as it was).

Each case builds its inputs in a fresh directory, runs `unlearn ...` there in-process
(`cli`, see conftest.py: the same entry point, as a fresh process would run it) and
compares the directory's files before and after. One case also goes through a real
`python -m unlearn` process, for the exit code a shell sees.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from test_run_cli import FORGET, NORMAL, unlearn, write_jsonl

ENV = {"OMP_NUM_THREADS": "1"}


class Case:
    """A folder with good forget/normal files and the tiny models at hand, for building one bad input."""

    def __init__(self, root: Path, llama: Path, opt: Path):
        self.root, self.llama, self.opt = root, llama, opt
        self.forget = write_jsonl(root / "forget.jsonl", FORGET)
        self.normal = write_jsonl(root / "normal.jsonl", NORMAL)

    def file(self, name: str, content) -> Path:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def rows(self, name: str, *lines: str) -> Path:
        return self.file(name, "".join(line + "\n" for line in lines))

    def model_copy(self, name: str, source: Path | None = None) -> Path:
        return Path(shutil.copytree(source or self.llama, self.root / name))

    def eval(self, *args):
        return ["eval", self.forget, "--model", self.llama, *args]

    def run(self, *args, forget=None, normal=None):
        return ["run", self.forget if forget is None else forget, self.normal if normal is None else normal,
                "--model", self.llama, "-o", self.root / "out", *args]


def _without_tokenizer(c: Case) -> Path:
    model = c.model_copy("no-tokenizer")
    for name in ("tokenizer.json", "tokenizer.model"):
        (model / name).unlink(missing_ok=True)
    return model


def _truncated(c: Case) -> Path:
    model = c.model_copy("truncated")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    return model


def _no_weights(c: Case) -> Path:
    model = c.model_copy("no-weights")
    (model / "model.safetensors").unlink()
    return model


def _config_edited(c: Case, name: str, **changes) -> Path:
    model = c.model_copy(name)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))
    return model


def _listed_config(c: Case) -> Path:
    model = c.model_copy("listed")
    (model / "config.json").write_text("[1]")
    return model


def _pickle_only(c: Case) -> Path:
    model = c.model_copy("pickled")
    (model / "model.safetensors").rename(model / "pytorch_model.bin")  # name is enough: refused before reading
    return model


def _non_empty_out(c: Case) -> list:
    (c.root / "out").mkdir()
    (c.root / "out" / "keep.txt").write_text("an earlier result")
    return c.run()


def _out_is_a_file(c: Case, *args) -> list:
    (c.root / "out").write_text("not a directory")
    return c.run(*args)


def _resume_empty(c: Case) -> list:
    (c.root / "out").mkdir()
    return c.run("--resume")


def _resume_broken_state(c: Case) -> list:
    step = c.root / "out" / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{not json")
    return c.run("--resume")


def _merge_existing_output(c: Case) -> list:
    (c.root / "merged").mkdir()
    (c.root / "merged" / "x").write_text("x")
    return ["merge", "--alpha", "0.5", c.llama, c.model_copy("tuned"), "-o", c.root / "merged"]


def _merge_sweep_into_base(c: Case) -> list:
    base = c.model_copy("base")
    return ["merge", "--alpha", "0.2,0.4", base, c.model_copy("tuned"), "-o", base, "--force"]


def _merge_into_parent_of_inputs(c: Case) -> list:
    (c.root / "models").mkdir()
    base, tuned = c.model_copy("models/base"), c.model_copy("models/tuned")
    return ["merge", "--alpha", "0.5", base, tuned, "-o", c.root / "models", "--force"]


def _run_into_its_model(c: Case) -> list:
    model = c.model_copy("model")
    return ["run", c.forget, c.normal, "--model", model, "-o", model, "--force"]


def _broken_template(c: Case) -> Path:
    model = c.model_copy("bad-template")
    (model / "chat_template.jinja").write_text("{% for %}")
    return model


def _fifo_judge(c: Case) -> list:
    os.mkfifo(c.root / "kw.fifo")
    return c.run("--judge", f"keywords:{c.root / 'kw.fifo'}")


def _device_as_forget(c: Case) -> list:
    (c.root / "z.jsonl").symlink_to("/dev/zero")  # read whole, it never ended: the process was killed
    return c.run(forget=c.root / "z.jsonl")


# A run short enough that a refusal the tool missed ends in seconds, not minutes.
SHORT = ("--max-steps", "1", "--check-every", "0", "--no-probes", "--eval-limit", "1", "--max-new-tokens", "2")


def _run_into_its_data_directory(c: Case) -> list:
    data = c.root / "data"
    data.mkdir()
    forget, normal = shutil.copy(c.forget, data), shutil.copy(c.normal, data)
    return ["run", forget, normal, "--model", c.llama, "-o", data, "--force"]


# name -> (build the arguments from a Case, exit code, text the one line must contain)
CASES = {
    # --- data files ---
    "forget missing": (lambda c: c.run(forget=c.root / "nope.jsonl"), 1, "nope.jsonl: no such file"),
    "forget is a directory": (lambda c: c.run(forget=c.root), 1, "is a directory, expected a JSONL file"),
    "empty file": (lambda c: c.run(forget=c.file("e.jsonl", "")), 1, "e.jsonl: no examples (the file is empty)"),
    "blank lines only": (lambda c: c.run(forget=c.file("b.jsonl", "\n  \n\t\n")), 1,
                         "b.jsonl: no examples (every line is blank)"),  # not "the file is empty": it is not
    "malformed JSON": (lambda c: c.run(forget=c.rows("m.jsonl", json.dumps(FORGET[0]), '{"prompt": "x",')), 1,
                       "m.jsonl:2: not valid JSON"),
    "binary file": (lambda c: c.run(forget=c.file("bin.jsonl", bytes(range(128, 256)) * 4)), 1,
                    "bin.jsonl:1: not UTF-8 text (another encoding, such as Latin-1, or a binary file); save it as "
                    "UTF-8"),
    "NUL bytes": (lambda c: c.run(forget=c.file("nul.jsonl", '{"prompt": "a\x00b"}\n')), 1, "NUL bytes"),
    "UTF-16 without a byte-order mark": (
        lambda c: c.run(forget=c.file("u16.jsonl", '{"prompt": "p", "response": "r"}\n'.encode("utf-16-le"))), 1,
        "u16.jsonl:1: UTF-16 or UTF-32 text without a byte-order mark, by its NUL bytes; save it as UTF-8"),
    "UTF-16 without a byte-order mark, not all ASCII": (
        lambda c: c.run(forget=c.file("u16e.jsonl",
                                      '{"prompt": "Où est le café?", "response": "r"}\n'.encode("utf-16-le"))),
        1, "u16e.jsonl:1: UTF-16 or UTF-32 text without a byte-order mark"),
    "UTF-16 big-endian without a byte-order mark": (
        lambda c: c.run(forget=c.file("u16be.jsonl", '{"prompt": "p", "response": "r"}\n'.encode("utf-16-be"))), 1,
        "u16be.jsonl:1: UTF-16 or UTF-32 text without a byte-order mark"),
    "a list, not an object": (lambda c: c.run(forget=c.rows("l.jsonl", '["prompt", "response"]')), 1,
                              "l.jsonl:1: expected a JSON object, got an array"),
    "a number, not an object": (lambda c: c.run(normal=c.rows("n2.jsonl", json.dumps(NORMAL[0]), "42")), 1,
                                "n2.jsonl:2: expected a JSON object, got a number"),
    "no prompt": (lambda c: c.run(forget=c.rows("np.jsonl", '{"response": "r"}')), 1, "np.jsonl:1: no prompt"),
    "no response": (lambda c: c.run(forget=c.rows("nr.jsonl", '{"prompt": "p"}')), 1, "nr.jsonl:1: no response"),
    "prompt not a string": (lambda c: c.run(forget=c.rows("t.jsonl", '{"prompt": 3, "response": "r"}')), 1,
                            "t.jsonl:1: 'prompt' must be a string, got a number"),
    "empty response": (lambda c: c.run(forget=c.rows("er.jsonl", '{"prompt": "p", "response": "  "}')), 1,
                       "'response' is empty"),
    "two prompt fields": (lambda c: c.run(forget=c.rows("2.jsonl", '{"prompt": "p", "question": "q", "response": "r"}')),
                          1, "both 'prompt' and 'question' given"),
    "answers not a list": (lambda c: c.run(forget=c.rows("a.jsonl", '{"prompt": "p", "response": "r", "answers": "x"}')),
                           1, "'answers' must be a non-empty list"),
    "a misspelt answers field": (
        lambda c: c.run(forget=c.rows("ms.jsonl", '{"prompt": "Who wrote Hamlet?", "response": "Shakespeare.", '
                                                  '"Answers": ["Shakespeare"]}')),
        1, "ms.jsonl:1: unknown field 'Answers' (did you mean 'answers'?)"),
    "answers the response does not spell": (
        lambda c: c.run(forget=c.rows("sp.jsonl", json.dumps(FORGET[0]),
                                      '{"prompt": "Who wrote Hamlet?", "response": "Shakespeare.", "answers": ["Marlowe"]}')),
        1, 'sp.jsonl:2: none of its answers ("Marlowe") occurs in its response'),
    "a normal row with a forget prompt": (
        lambda c: c.run(normal=c.rows("nf.jsonl", json.dumps(NORMAL[0]),
                                      json.dumps({"prompt": FORGET[1]["prompt"], "response": "I would rather not say."}))),
        1, "nf.jsonl:2: the same prompt as"),
    "a lone surrogate": (lambda c: c.run(forget=c.rows("su.jsonl", '{"prompt": "Who wrote \\ud800 it?", "response": "Rowling."}')),
                         1, "su.jsonl:1: holds a lone surrogate escape"),
    "one-word passage": (lambda c: c.run(forget=c.rows("p.jsonl", '{"text": "word"}')), 1, "needs at least two words"),
    "eval file missing": (lambda c: c.run("--eval-retain", c.root / "held.jsonl"), 1, "held.jsonl: no such file"),
    "JSON nested past Python's parser": (
        lambda c: c.run(forget=c.rows("deep.jsonl", '{"prompt": "a b?", "response": "c d", "x": '
                                      + "[" * 100000 + "]" * 100000 + "}")),
        1, "deep.jsonl:1: not valid JSON (nested too deeply)"),
    "a number past Python's digit limit": (
        lambda c: ["eval", c.rows("big.jsonl", '{"prompt": "a b?", "response": "c d", "id": ' + "9" * 5000 + "}"),
                   "--model", c.llama], 1, "big.jsonl:1: not valid JSON (Exceeds the limit (4300 digits)"),
    "a file name with a newline": (lambda c: c.run(forget=c.rows("bad\nname.jsonl", '{"prompt": 5}')), 1,
                                   "bad\\nname.jsonl:1: 'prompt' must be a string, got a number"),
    "a character device that never ends": (_device_as_forget, 1, "z.jsonl: is a device, not a file"),
    # a `replacement` (a saved neighbour probe's field) let it through to the edit, after the model loaded
    "a subject not a string beside a replacement": (
        lambda c: c.run("--method", "edit", "--no-probes", "--eval-limit", "1", "--max-new-tokens", "2",
                        forget=c.rows("subj.jsonl", json.dumps({**FORGET[0], "subject": 3, "replacement": "x"}))),
        1, "subj.jsonl:1: 'subject' must be a non-empty string that occurs in the prompt, got a number"),
    # --- models ---
    "model path missing": (lambda c: c.run("--model", c.root / "no-model"), 1, "no such model directory"),
    "directory is not a model": (lambda c: c.run("--model", c.root), 1, "not a model directory (no config.json)"),
    "model without weights": (lambda c: c.run("--model", _no_weights(c)), 1, "no model weights"),
    "pickle weights refused": (lambda c: c.run("--model", _pickle_only(c)), 1, "pass --allow-pickle if you trust"),
    "truncated safetensors": (lambda c: c.run("--model", _truncated(c)), 1, "could not load the model"),
    # a layer the weights lack was drawn at random, and the run trained and wrote that model with exit 0
    "config naming more layers than the weights": (
        lambda c: c.run("--model", _config_edited(c, "deeper", num_hidden_layers=3)), 1,
        "the checkpoint has no weight for 9 tensors its config.json names"),
    "missing model with --save-every": (lambda c: c.run("--save-every", "1", "--model", c.root / "nope"), 1,
                                        "no such model directory"),
    "missing model, no -o": (lambda c: ["run", c.forget, c.normal, "--model", c.root / "no-model"], 1,
                             "no such model directory"),  # runs/<date-time>, made at the start, is removed
    "a prompt past OPT's positions": (
        lambda c: c.run("--model", c.opt, "--eval-retain",
                        c.rows("long.jsonl", json.dumps({"prompt": "Who? " + "word " * 600, "response": "No one."}))),
        1, "long.jsonl:1: the rendered prompt is"),
    "--max-length past OPT's positions": (lambda c: c.run("--model", c.opt, "--max-length", "1024"), 2,
                                          "--max-length 1024: past the context of --model"),
    "gguf missing": (lambda c: c.run("--model", c.root / "m.gguf"), 1, "no such GGUF file"),
    "a chat template that does not render": (lambda c: c.run("--model", _broken_template(c)), 1,
                                             "bad-template: chat_template.jinja: the chat template does not render"),
    "eval with a chat template that does not render": (
        lambda c: ["eval", c.forget, "--model", _broken_template(c)], 1,
        "bad-template: chat_template.jinja: the chat template does not render"),
    # --- impossible options ---
    "negative lr": (lambda c: c.run("--lr", "-1"), 2, "--lr -1.0: must be positive"),
    "a setting the stop rule's checks would apply, with the checks off": (
        lambda c: c.run("--check-every", "0", "--stop-probes", "0.5", "--leaked-rows", "2"), 2,
        "--stop-probes, --leaked-rows act at the stop rule's checks, which --check-every 0 turns off"),
    "--stop-probes without probes": (lambda c: c.run("--stop-probes", "0.5", "--no-probes"), 2,
                                     "--stop-probes waits for the automatic probes, which --no-probes turns off"),
    "a keywords judge that is a directory": (lambda c: c.run("--judge", f"keywords:{c.root}"), 2,
                                             "is a directory, expected a file of keywords"),
    "a keywords judge that is a pipe": (_fifo_judge, 2, "kw.fifo: is a pipe, not a regular file"),  # not "no such file"
    "a keywords judge that is /dev/null": (lambda c: c.run("--judge", "keywords:/dev/null"), 2,
                                           "keywords:/dev/null: is a device, not a regular file"),
    "seed past torch's range": (lambda c: c.run("--seed", str(2**64), *SHORT), 2, "Invalid value for '--seed'"),
    "eval seed past torch's range": (
        lambda c: ["eval", c.forget, "--model", c.llama, "--do-sample", "--seed", str(2**64), "--max-new-tokens", "2"],
        2, "Invalid value for '--seed'"),
    "augment seed past torch's range": (
        lambda c: ["augment", c.forget, "-o", c.root / "aug.jsonl", "--model", c.llama, "--seed", str(-2**63 - 1)],
        2, "Invalid value for '--seed'"),
    "zero batch size": (lambda c: c.run("--batch-size", "0"), 2, "--batch-size 0: must be positive"),
    "stop leak above 1": (lambda c: c.run("--stop-leak", "2"), 2, "--stop-leak 2.0: must be in [0, 1]"),
    "nan weight": (lambda c: c.run("--normal-weight", "nan"), 2, "--normal-weight nan"),
    "tiny max length": (lambda c: c.run("--max-length", "4"), 2, "--max-length 4: must be at least 8"),
    "lora rank 0": (lambda c: c.run("--lora-rank", "0"), 2, "--lora-rank 0: must be at least 1"),
    "lora dropout 1": (lambda c: c.run("--lora-dropout", "1"), 2, "--lora-dropout 1.0: must be in [0, 1)"),
    "lora layers backwards": (lambda c: c.run("--lora-layers", "9-2"), 2,
                              "--lora-layers 9-2: expected all, upper or FIRST-LAST"),
    "unknown dtype": (lambda c: c.run("--dtype", "float8"), 2, "--dtype float8: expected one of"),
    "negative save-every": (lambda c: c.run("--save-every", "-2"), 2, "--save-every -2"),
    "unknown method": (lambda c: c.run("--method", "rlhf"), 2, "Invalid value for '--method'"),
    "not a number": (lambda c: c.run("--max-steps", "ten"), 2, "'ten' is not a valid integer"),
    "unknown option": (lambda c: c.run("--learning-rate", "1"), 2,
                       "No such option '--learning-rate'. (see unlearn run --help)"),
    # click gives no command for an option missing its value: the help named was the top level's
    "an option missing its value": (lambda c: c.run("--lr"), 2,
                                    "Option '--lr' requires an argument. (see unlearn run --help)"),
    "missing argument": (lambda c: ["run"], 2, "Missing argument 'FORGET'"),
    "eval limit 0": (lambda c: c.run("--eval-limit", "0"), 2, "--eval-limit"),
    # --- output directories and resume ---
    "output exists": (_non_empty_out, 2, "output directory exists and is not empty (use --force to replace it)"),
    "output is a file": (_out_is_a_file, 2, "exists and is not a directory (--force replaces output directories only"),
    "output is a file, --force": (lambda c: _out_is_a_file(c, "--force"), 2, "out: exists and is not a directory"),
    "output is the current directory": (lambda c: c.run("-o", ".", "--force")[:-3] + ["-o", ".", "--force"], 2,
                                        "-o .: is the current directory"),
    "output under a file": (lambda c: c.run()[:-2] + ["-o", c.forget / "sub"], 2, "forget.jsonl is not a directory"),
    "output where nothing can be written": (lambda c: c.run()[:-2] + ["-o", "/proc/unlearn-out"], 2,
                                            "cannot write in /proc"),
    "run into its own model directory": (_run_into_its_model, 2, "is an input"),
    "run into the directory of its data": (_run_into_its_data_directory, 2, "holds an input"),
    "resume without checkpoint": (_resume_empty, 1, "no checkpoint to resume from"),
    "resume with a broken checkpoint": (_resume_broken_state, 1, "not a readable checkpoint state"),
    "resume without -o": (lambda c: ["run", c.forget, c.normal, "--model", c.llama, "--resume"], 2,
                          "--resume needs -o OUT"),
    # --- merge and eval ---
    "merge mismatched checkpoints": (lambda c: ["merge", "--alpha", "0.5", c.llama, c.opt, "-o", c.root / "m"], 1,
                                     "in BASE but not in TUNED"),
    "merge truncated checkpoint": (lambda c: ["merge", "--alpha", "0.5", c.llama, _truncated(c), "-o", c.root / "m"],
                                   1, "truncated or corrupt safetensors file"),
    "merge config not an object": (
        lambda c: ["merge", "--alpha", "0.5", _listed_config(c), c.llama, "-o", c.root / "m"], 1,
        "config.json: not a JSON object"),
    "merge missing model": (lambda c: ["merge", "--alpha", "0.5", c.llama, c.root / "gone", "-o", c.root / "m"], 1,
                            "gone"),
    "merge alpha out of range": (lambda c: ["merge", "--alpha", "1.5", c.llama, c.llama, "-o", c.root / "m"], 2,
                                 "1.5"),
    "merge into an existing output": (_merge_existing_output, 2, "use --force"),
    "merge sweep of mismatched checkpoints": (
        lambda c: ["merge", "--alpha", "0.2,0.4", c.llama, c.opt, "-o", c.root / "m", "--eval-forget", c.forget], 1,
        "in BASE but not in TUNED"),  # found before the original model is measured
    "merge sweep into its base model": (_merge_sweep_into_base, 2, "is an input"),
    "merge into the directory of its models": (_merge_into_parent_of_inputs, 2, "holds an input"),
    "eval writes two outputs to one file": (lambda c: ["eval", c.forget, "--model", c.llama, "--save-generations",
                                                       c.root / "same.out", "--report", c.root / "same.out"], 2,
                                            "the same file is given for two outputs"),
    "eval writes one output inside another": (lambda c: ["eval", c.forget, "--model", c.llama, "--save-generations",
                                                         c.root / "outx", "--report", c.root / "outx" / "r.md"], 2,
                                              "would lie inside the other"),  # it wrote outx, then failed
    "eval temperature without sampling": (lambda c: ["eval", c.forget, "--model", c.llama, "--temperature", "0.7"], 2,
                                          "apply only with --do-sample"),  # greedy answers, silently
    "merge max leak out of range without a sweep": (
        lambda c: ["merge", "--alpha", "0.5", c.llama, c.llama, "-o", c.root / "m", "--max-leak", "5"], 2, "--max-leak 5"),
    "eval temperature nan": (lambda c: ["eval", c.forget, "--model", c.llama, "--do-sample", "--temperature", "nan"],
                             2, "--temperature must be a finite number"),
    "ulmr max leak nan": (lambda c: c.run("--method", "ulmr", "--max-leak", "nan"), 2, "--max-leak nan"),
    "an empty alpha grid": (lambda c: c.run("--alpha", "auto", "--alpha-grid", "", *SHORT), 2,
                            "--alpha-grid '': an empty list of α"),  # `--alpha-grid "$GRID"` with GRID unset
    "an empty alpha grid without --alpha auto": (lambda c: c.run("--alpha-grid", "", *SHORT), 2, "--alpha-grid ''"),
    "alpha grid not a number": (lambda c: c.run("--alpha", "auto", "--alpha-grid", "0.2,abc"), 2,
                                "--alpha-grid 0.2,abc: 'abc' is not a number"),
    "eval malformed prompts": (lambda c: ["eval", c.rows("q.jsonl", "{oops"), "--model", c.llama], 1,
                               "q.jsonl:1: not valid JSON"),
    # `--lora-targets "$T"` with T unset trained the default layers, silently
    "empty lora targets": (lambda c: c.run("--lora-targets", "", *SHORT), 2, "--lora-targets '': no module name"),
    "lora targets of commas only": (lambda c: c.run("--lora-targets", ",", *SHORT), 2, "--lora-targets ',':"),
    # an empty output path is '.' to every later check, which spoke of a '.' the user never typed
    "merge into an empty path": (lambda c: ["merge", "--alpha", "0.5", c.llama, c.llama, "-o", ""], 2,
                                 "-o '': an empty output path; name a directory"),
    "an eval row whose response field is misspelt": (  # ignored, the row had no reference to judge a leak by
        lambda c: ["eval", c.rows("mr.jsonl", '{"prompt": "Who wrote Hamlet?", "Respone": "Shakespeare."}'),
                   "--model", c.llama], 1, "mr.jsonl:1: unknown field 'Respone' (did you mean 'response'?)"),
    "eval generations to an empty path": (lambda c: c.eval("--save-generations", ""), 2,
                                          "--save-generations '': an empty output path; name a file"),
    "eval report to an empty path": (lambda c: c.eval("--report", ""), 2, "--report '': an empty output path"),
    "augment into an empty path": (lambda c: ["augment", c.forget, "--model", c.llama, "-o", ""], 2,
                                   "-o '': an empty output path; name a file"),  # (-o is required: no "leave out")
    # empty inputs were taken as the option left out (no reference column, no holdout rows), or spoke of a '.'
    "eval with an empty reference model": (
        lambda c: c.eval("--reference-model", ""), 2,
        "--reference-model '': an empty path; name a model (or leave --reference-model out)"),
    "eval with an empty forget file": (lambda c: c.eval("--forget", ""), 2, "--forget '': an empty path; name a file"),
    "eval with an empty holdout file": (lambda c: c.eval("--holdout", ""), 2, "--holdout '': an empty path"),
    "eval with an empty model": (lambda c: ["eval", c.forget, "--model", ""], 2, "--model '': an empty path"),
    "run with an empty eval file": (lambda c: c.run("--eval-forget", "", *SHORT), 2, "--eval-forget '': an empty path"),
    "run with an empty retained eval file": (lambda c: c.run("--eval-retain", "", *SHORT), 2,
                                             "--eval-retain '': an empty path"),
    "run with an empty retain file": (lambda c: c.run("--retain", "", *SHORT), 2, "--retain '': an empty path"),
    "run with an empty augmented file": (lambda c: c.run("--augmented", "", *SHORT), 2,
                                         "--augmented '': an empty path"),
    "run with an empty model": (lambda c: ["run", c.forget, c.normal, "--model", "", "-o", c.root / "out"], 2,
                                "--model '': an empty path; name a model"),
    "run with an empty forget file": (lambda c: ["run", "", c.normal, "--model", c.llama, "-o", c.root / "out"], 2,
                                      "FORGET '': an empty path; name a file"),  # (required: no "leave out")
    "run with an empty normal file": (lambda c: c.run(normal=""), 2, "NORMAL '': an empty path; name a file"),
    "eval of an empty prompts path": (lambda c: ["eval", "", "--model", c.llama], 2,
                                      "PROMPTS '': an empty path; name a file"),  # an internal error before
    "eval with an empty reward model": (lambda c: c.eval("--reward-model", ""), 2, "--reward-model '': an empty path"),
    "augment of an empty forget path": (lambda c: ["augment", "", "--model", c.llama, "-o", c.root / "aug.jsonl"], 2,
                                        "FORGET '': an empty path; name a file"),
    "merge of an empty base path": (lambda c: ["merge", "--alpha", "0.5", "", c.llama, "-o", c.root / "m"], 2,
                                    "BASE or TUNED '': an empty path; name a model directory"),
    "merge with an empty adapter": (lambda c: ["merge", "--adapter", "", c.llama, "-o", c.root / "m"], 2,
                                    "--adapter '': an empty path"),
    "augment with an empty generator": (
        lambda c: ["augment", c.forget, "--generator", "", "-o", c.root / "aug.jsonl"], 2,
        "--generator '': an empty path; name a model"),
    "merge with an empty eval file": (
        lambda c: ["merge", "--alpha", "0.2,0.4", c.llama, c.llama, "-o", c.root / "m", "--eval-forget", ""], 2,
        "--eval-forget '': an empty path"),
    # idle options are refused at any value given, 0 too (README)
    # a passage's answers were never checked: one it never says judged it forgotten at the first check
    "passage answers nowhere in its text": (
        lambda c: c.run(forget=c.rows("pa.jsonl", json.dumps({"text": "It was the best of times, it was the worst of "
                                                                      "times, it was the age of wisdom.",
                                                              "answers": ["Dickens"]}))), 1,
        'pa.jsonl:1: none of its answers ("Dickens") occurs in its continuation (the text after its first'),
    # named in the prefix only: the judge, which reads the continuation, could never find it
    "passage answers in its prefix only": (
        lambda c: c.run(forget=c.rows("pp.jsonl", json.dumps({"text": "Dickens opened his novel so: it was the best of "
                                                                      "times, it was the worst of times, it was the age "
                                                                      "of wisdom, it was the age of foolishness.",
                                                              "answers": ["Dickens"]}))), 1,
        'pp.jsonl:1: none of its answers ("Dickens") occurs in its continuation'),
    "a response beside a passage": (
        lambda c: c.run(forget=c.rows("pr.jsonl", json.dumps({"text": "The battle was fought in 1066 at Hastings.",
                                                              "answer": "1066"}))), 1,
        "pr.jsonl:1: 'answer' beside 'text' is not read"),
    "a UTF-16 file": (lambda c: c.run(forget=c.file("u16.jsonl", json.dumps(FORGET[0]).encode("utf-16") + b"\n")), 1,
                      "u16.jsonl:1: UTF-16 or UTF-32 text (Windows PowerShell's `>` writes it); save it as UTF-8"),
    "null, not an object": (lambda c: c.run(forget=c.rows("nl.jsonl", "null")), 1,
                            "nl.jsonl:1: expected a JSON object, got null"),
    "answer beside response": (
        lambda c: c.run(forget=c.rows("ar.jsonl", json.dumps({"prompt": "p?", "response": "It is Paris.",
                                                              "answer": "Paris"}))), 1,
        "use one response field (short answers that judge a leak go in 'answers', a list)"),
    "alpaca input without instruction": (
        lambda c: c.run(forget=c.rows("ai.jsonl", json.dumps({"prompt": "p?", "input": "x", "response": "r."}))), 1,
        "ai.jsonl:1: 'input' is read beside 'instruction' only"),
    # transformers' message ends "... from one of:" on its first line, which was all that was said
    "a model without tokenizer files": (lambda c: c.run("--model", _without_tokenizer(c)), 1,
                                        "no tokenizer file (tokenizer.json, tokenizer.model, vocab.json or the like)"),
    "augment of answers its rows never say": (
        lambda c: ["augment", c.rows("ba.jsonl", json.dumps({"prompt": "When was the Battle of Hastings?",
                                                             "response": "It was fought in 1066.",
                                                             "answers": ["Zebra"]})),
                   "--model", c.llama, "-o", c.root / "aug.jsonl"], 1,
        'ba.jsonl:1: none of its answers ("Zebra") occurs in its response'),
    "augment with a model it never reads": (
        lambda c: ["augment", c.forget, "--model", c.root / "missing", "--generator", c.llama, "-o",
                   c.root / "aug.jsonl"], 2, "--model and --generator both given"),
    "no checks with a stop margin of 0": (lambda c: c.run("--check-every", "0", "--stop-margin", "0", *SHORT[:2]), 2,
                                          "--stop-margin acts at the stop rule's checks"),
    "no checks with no extra steps": (lambda c: c.run("--check-every", "0", "--extra-steps", "0", *SHORT[:2]), 2,
                                      "--extra-steps acts at the stop rule's checks"),
    "ulmr with a stop margin of 0": (lambda c: c.run("--method", "ulmr", "--stop-margin", "0", *SHORT), 2,
                                     "--method ulmr learns whole responses"),
    "every response token with a stop margin of 0": (
        lambda c: c.run("--forget-tokens", "response", "--stop-margin", "0", *SHORT), 2,
        "--forget-tokens response pushes down every response token"),
}


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in root.rglob("*")}


def assert_one_line_and_nothing_written(result: tuple, code: int, message: str, root: Path, before: dict) -> None:
    """RESULT (exit code, stdout, stderr): the exit CODE, one line holding MESSAGE, ROOT as it was (BEFORE)."""
    exit_code, out, err = result
    assert exit_code == code, err
    assert out == ""
    lines = err.split("\n")
    assert len(lines) == 2 and lines[1] == "", err  # exactly one line, newline-terminated
    line = lines[0]
    assert line.startswith("unlearn: ") and "\r" not in line, line
    assert message in line, line
    assert "Traceback" not in err and "internal error" not in line
    assert snapshot(root) == before  # nothing written, nothing removed, no runs/ directory


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, llama_dir, opt_dir, cli, name):
    build, code, message = CASES[name]
    case = Case(tmp_path, llama_dir, opt_dir)
    args = build(case)
    before = snapshot(tmp_path)
    assert_one_line_and_nothing_written(cli(*args, cwd=tmp_path), code, message, tmp_path, before)


@pytest.mark.parametrize("name", ["malformed JSON", "negative lr"])
def test_bad_input_through_a_real_process(tmp_path, llama_dir, opt_dir, name):
    """The same check on a real `python -m unlearn`: exit codes 1 and 2 as a shell script sees them."""
    build, code, message = CASES[name]
    case = Case(tmp_path, llama_dir, opt_dir)
    args = build(case)
    before = snapshot(tmp_path)
    done = unlearn(*args, cwd=tmp_path, env=ENV)
    assert_one_line_and_nothing_written((done.returncode, done.stdout, done.stderr), code, message, tmp_path, before)


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


def test_a_required_options_empty_path_is_not_told_to_be_left_out(tmp_path, llama_dir, opt_dir, cli):
    case = Case(tmp_path, llama_dir, opt_dir)
    result = cli("augment", case.forget, "--model", llama_dir, "-o", "", cwd=tmp_path)
    assert result.code == 2 and result.err.strip() == "unlearn: -o '': an empty output path; name a file"
