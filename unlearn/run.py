"""The `unlearn run` job, top to bottom:

    prepare -> load -> measure before -> train -> choose α -> measure after -> write

Order matters for the user: every input file is read and validated, and the output
directory checked, before the model loads, so a typo fails in a second. The "before"
numbers come from the same weights with the adapters off (no second model in memory).
Outputs are written into a temporary directory and moved into place only when complete.
Checkpoints (--save-every, Ctrl-C) are the exception: they must outlive a crash, so they
go into OUTPUT/checkpoints while the run goes on, and --resume continues from the
latest (checkpoints.py).

Under torchrun every process runs this whole function (distributed.py): decisions that
must agree (the augmented rows, the stop rule, α) are rank 0's, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import re
import shlex
import shutil
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from unlearn import distributed, models, precision, system
from unlearn.checkpoints import checkpoint_root, latest_checkpoint, load_checkpoint, read_state, remove_partial
from unlearn.checkpoints import save_checkpoint, write_state
from unlearn.config import RETAIN_WEIGHT, RunOptions
from unlearn.cpu_load import CrowdWatch, OtherWork, contention_note
from unlearn.data import (SOURCE_FILE, Example, check_answers_spelled, fallback_note, prompt_key, read_examples,
                          render_prompt)
from unlearn.errors import Interrupted, Terminated, UnlearnError, UsageError
from unlearn.evaluate import attach_references, unreferenced_note
from unlearn.log import log as default_log
from unlearn.measure import (KEPT_KV_BUDGET, EvalSet, Measured, Measurer, Settings, kept_rate, leak_rate, original_scorer,
                             read_eval_sets)
from unlearn.measure_cache import file_identities
from unlearn.outputs import (check_output_dir, hold_output, json_safe, judge_input, refuse_output_over_inputs,
                             release_outputs)
from unlearn.spans import describe_spans, row_answers, through_first_answer


def reserve_output_dir(created: list, root: Path = Path("runs")) -> Path:
    """ROOT/<date-time>, made now (empty) so that it is this run's: a run started in the same second
    (a shell loop's background jobs) takes ROOT/<date-time>-2, and so on. CREATED gets every directory
    made here, the run's before its parent, so that a run that fails leaves none of them behind."""
    made_root = not root.exists()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for n in itertools.count(1):
            path = root / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                path.mkdir()  # atomic: of two runs racing for a name, one gets it
            except FileExistsError:
                continue
            created += [path] + ([root] if made_root else [])
            return path
    except OSError as exc:  # `runs` a file, a read-only checkout: one line, as for -o (review 117)
        why = "exists and is not a directory" if exc.errno in (errno.EEXIST, errno.ENOTDIR) else exc.strerror or exc
        raise UsageError(f"{root / stamp}: the default output (no -o given): cannot write in {root} ({why}); "
                         f"give -o OUT") from None


def run(opts: RunOptions, log=default_log) -> dict:
    """Do the whole job and return the record that run.json holds (and --json prints)."""
    checked = opts.resolved()  # a typo fails before any file is read
    forget = read_examples(opts.forget)
    chosen = opts.for_forget_rows(forget)  # --method not given: what these rows call for
    try:
        opts = checked if chosen is opts else chosen.resolved()
    except UsageError as e:
        raise UsageError(f"--method {chosen.train.method} (not given: {chosen.method_reason}): {e}") from None
    created: list[Path] = []  # directories made at the start: OUTPUT for checkpoints, or runs/<date-time>
    # Under torchrun: join the process group for the run (distributed.py); otherwise a no-op.
    with distributed.session(opts.fsdp, opts.device) as world:
        try:
            started = time.perf_counter()
            if opts.method_reason and world.is_main:
                log(f"method: {opts.train.method}, because {opts.method_reason}")
            for note in opts.notes if world.is_main else ():  # options the rows' method does not read
                log(note)
            data = prepare(opts, created, forget)
            job = load(opts, data, log)
            record_model_content(job, data)
            probed = make_probes(opts, job, data, log) if opts.probes else {}
            before = measure_before(job, data.sets, probed)
            unanswered = unanswered_forget_rows(before, data.sets[0])
            if unanswered and world.is_main:
                log(unanswered_message(unanswered, data.sets[0], opts.max_new_tokens, rows=len(data.forget)))
            result = train_model(opts, job, data, log, before)
            with trained_model_kept(opts, data, result, log):
                roles_as_checked(data.sets, result, opts.train.stop_leak, job.probe_names)
                averager, selection = choose_alpha(opts, job, data.sets, before, log)
                after = measure_after(job, data.sets, before, selection)
                applied = averager.alpha if averager is not None else None
                for note in (check_budget_note(opts, result, after, applied), over_refusal_note(opts, data, after)):
                    if note and world.is_main:
                        log(note)
                return write(opts, job, data, before, after, result, averager, selection, started, log)
        except BaseException:
            # A run that fails before its first checkpoint leaves no empty OUTPUT behind.
            for directory in created if world.is_main else ():
                if directory.is_dir() and not any(directory.iterdir()):
                    directory.rmdir()
            raise
        finally:
            release_outputs()


# --- prepare: every file read and checked, before any model loads -----------------------------


@dataclass
class Prepared:
    forget: list
    normal: list  # the rows the KL trains on
    normal_heldout: list  # NORMAL rows never trained on (--normal-holdout)
    retain: list  # the --retain rows: trained on (their own KL term) and reported, never held back
    augmented: list | None  # ULMR's rows from --augmented (else made after the model loads)
    sets: list[EvalSet]  # what is measured before and after: forget, normal, then --eval-* files
    output: Path
    run_args: dict  # what a --resume must share with the run it continues
    resume_from: Path | None
    probes: dict | None = None  # the automatic probes' records and counts (make_probes), for run.json


def prepare(opts: RunOptions, created: list, forget: list) -> Prepared:
    """FORGET's rows (read first: they may choose the method) and every other file, read and checked."""
    check_answers_spelled(forget, opts.forget)
    if opts.train.method == "ulmr" and not opts.augmented:  # the run augments FORGET: refuse what it cannot do
        from unlearn.augment import check_request

        check_request(forget, opts.rewrites, opts.forget)
    augmented = None
    if opts.augmented:  # ULMR's training rows: what it learns must decline, never give the answer
        from unlearn.augment import check_augmented

        augmented = check_augmented(read_examples(opts.augmented), opts.augmented, forget, Path(opts.forget))
    normal_rows = refuse_forget_prompts(read_examples(opts.normal), opts.normal, forget, Path(opts.forget))
    retain = read_retain(opts.retain, forget, Path(opts.forget))
    if augmented:  # ULMR's forgotten prompts are the augmented rows': kept rows clash with them as with FORGET's
        refuse_forget_prompts(normal_rows, opts.normal, augmented, Path(opts.augmented))
        for path in opts.retain:
            refuse_forget_prompts([e for e in retain if e.extra[SOURCE_FILE] == str(path)], path, augmented,
                                  Path(opts.augmented))
    normal, normal_heldout = hold_out(normal_rows, opts.normal_holdout, opts.train.seed,
                                      untrained_elsewhere(normal_rows, retain) or None)
    limit = opts.eval_limit
    # Roles say which rows were trained on and which figures decide something (selection_sets). The forget
    # set's "stop rule" goes once training shows that no check ran (roles_as_checked).
    chooses = ", α choice" if opts.alpha == "auto" else ""
    # The sets α is chosen on are measured whole, as the stop rule reads every forget prompt: cut to
    # --eval-limit, a choice "forget leak <= --max-leak" would speak for rows it never read.
    whole = None if chooses else limit  # rows[:None]: every row
    forget_set = EvalSet("forget", "forget", forget[:whole], Path(opts.forget), "trained")
    if augmented:  # ULMR trains the --augmented rows: FORGET's own prompts only where the file has them
        part = _repeated(forget_set, augmented)
        forget_set.role = "trained" if part == "all" else f"{part} trained" if part else "held out"
    forget_set.role += (", stop rule" if opts.train.check_every else "") + chooses
    # A set whose term has weight 0 is never drawn (train.py): its rows are measured, not trained.
    normal_role = "trained" if opts.train.normal_weight else "held out"
    sets = [forget_set,
            EvalSet("normal", "retain", normal[:limit if normal_heldout else whole], Path(opts.normal),
                    normal_role + (chooses if not normal_heldout else ""))]
    if normal_heldout:
        # Held back from rows whose prompt nothing else trains on, when there are any (hold_out); when none are,
        # the draw's rows are trained elsewhere too, and the set says so as an --eval-* file would.
        (heldout_set,) = label_trained_rows([EvalSet("normal-heldout", "retain", normal_heldout[:whole],
                                                     Path(opts.normal), "held out")],
                                            trained_rows(opts, forget, normal, retain, None))
        heldout_set.role += chooses
        sets.append(heldout_set)
    if retain:  # --protect keeps every update off the retain rows' gradients, whatever their KL's weight
        sets.append(EvalSet("retain", "retain", retain[:limit], Path(opts.retain[0]),
                            "trained" if opts.train.retain_weight or opts.train.protect else "held out"))
    # The run's own names are never an --eval-* file's, whether or not this run has those sets: a file named
    # normal-heldout.jsonl was taken for the held-back rows (α chosen on it), retain.jsonl left out of run.json.
    from unlearn.probes import NEIGHBOURS, SAME_SUBJECT

    reserved = {s.name for s in sets} | {"normal-heldout", "retain", NEIGHBOURS, SAME_SUBJECT}
    evals = read_eval_sets(opts.eval_forget, opts.eval_retain, taken=reserved, limit=limit)
    for eval_set in evals:  # a row without a response is judged by the forget row with its prompt, as `unlearn eval`
        if eval_set.kind == "forget":  # judges it with --forget: its leak was "-", said nowhere
            eval_set.examples = attach_references(eval_set.examples, forget)
    evals = label_trained_rows(evals, trained_rows(opts, forget, normal, retain, augmented))
    if opts.train.check_every:  # the stop rule reads every forget prompt, whatever --eval-limit prints
        label_rows_used(evals, forget, "stop rule")
    if chooses:  # --alpha auto chooses on the forget rows and the held-back normal rows (else the trained ones)
        label_rows_used(evals, forget + (normal_heldout or normal), "α choice")
    sets += evals
    distributed.check_batch_size(opts.train.batch_size)  # --batch-size is global: each process takes a share
    if opts.train.method in ("edit", "rmu") and distributed.world().active:  # before any model loads
        raise UsageError(f"--method {opts.train.method} runs in one process: launch it without torchrun")
    if opts.output:
        output = Path(opts.output)
        if output.is_symlink():
            # A link to a directory is written through to its target, as eval's and augment's outputs are: the
            # result, run.json, the printed paths and the last-run record then all name that target (the
            # finished output renamed onto the link itself would replace the link, its target left as it was).
            output = output.resolve()
    elif opts.resume:
        raise UsageError("--resume needs -o OUT, the directory of the run to continue")
    else:  # made on rank 0 and its name sent to every rank, whose clocks may cross a second apart
        output = distributed.on_main(lambda: reserve_output_dir(created))
    run_args = _run_args(opts, forget)
    # Rank 0 alone checks and prepares OUTPUT (it may create it, or delete stale checkpoints), and
    # every rank gets its answer, run_args included (a resume takes --save-every from the checkpoint).
    resume_from, run_args = distributed.on_main(lambda: (_prepare_output(opts, output, run_args, created), run_args))
    return Prepared(forget, normal, normal_heldout, retain, augmented, sets, output, run_args, resume_from)


def read_retain(paths, forget: list, forget_path: Path) -> list:
    """The --retain files' rows, in order, none with a forget prompt (`refuse_forget_prompts`).

    Each row's file is kept in its `extra` (data.SOURCE_FILE): the rows of every file make one
    `retain` set, whose path is the first file's, and a message about a row must name its own file."""
    rows = []
    for path in paths:
        for ex in refuse_forget_prompts(read_examples(path), path, forget, forget_path):
            ex.extra[SOURCE_FILE] = str(path)
            rows.append(ex)
    return rows


def refuse_forget_prompts(rows: list, path, forget: list, forget_path: Path) -> list:
    """ROWS, read from PATH to be kept (normal or --retain rows), when none has a forget prompt.

    Such a row is refused: the forget loss would push its answer down while its KL (to the original
    model, on the same prompt) holds it, and neither would win."""
    forget_lines = {prompt_key(e.prompt): e.line for e in forget}
    for ex in rows:
        line = forget_lines.get(prompt_key(ex.prompt))
        if line is not None:
            raise UnlearnError(f"{path}:{ex.line}: the same prompt as {forget_path}:{line}; a row cannot be "
                               f"both forgotten and kept")
    return rows


def _repeated(s: EvalSet, rows: list) -> str | None:
    """How much of S repeats ROWS' prompts: "all", "K of N" or None (none of it)."""
    seen = {prompt_key(e.prompt) for e in rows}
    k = sum(prompt_key(e.prompt) in seen for e in s.examples)
    return None if not k else "all" if k == len(s.examples) else f"{k} of {len(s.examples)}"


def label_trained_rows(sets: list[EvalSet], trained: list) -> list[EvalSet]:
    """SETS, each labelled "held out" (or "K of N trained") relabelled "trained" ("K of N trained") where its
    prompts are among the TRAINED rows' (every row trained on: a partial label is counted again), the rest
    of its role kept.

    A file that repeats training prompts (the forget file given again as --eval-forget, or normal rows in
    --eval-retain) would otherwise print training figures as results; so would rows that joined training after
    the labels were set (ULMR's rewrites made in the run, `load`; the probes, with --retain-probes:
    `make_probes`; both call this again)."""
    for s in sets:
        labelled = _RELABELLED.match(s.role)
        part = _repeated(s, trained) if labelled else None
        if part:
            s.role = ("trained" if part == "all" else f"{part} trained") + s.role[labelled.end():]
    return sets


_RELABELLED = re.compile(r"held out|\d+ of \d+ trained")


def trained_rows(opts: RunOptions, forget: list, normal: list, retain: list, ulmr_rows: list | None) -> list:
    """Every row a term of the loss trains on: FORGET (ULMR: its ULMR_ROWS, which hold FORGET's own prompts
    when the run makes them, so None there means FORGET), and NORMAL and RETAIN unless their weight is 0
    (a term of weight 0 never draws a row, train.py; but --protect reads the retain rows at any weight)."""
    rows = list(ulmr_rows if opts.train.method == "ulmr" and ulmr_rows is not None else forget)
    if opts.train.normal_weight:
        rows += normal
    if opts.train.retain_weight or opts.train.protect:  # --protect shapes every update by them
        rows += retain
    return rows


def label_rows_used(sets: list[EvalSet], used: list, what: str) -> None:
    """Add ", WHAT" (or ", K of N WHAT") to the role of each of SETS whose prompts are among the USED rows':
    an --eval-* file that repeats the rows α was chosen on is no result of that choice."""
    for s in sets:
        part = _repeated(s, used)
        if part:
            s.role += f", {what}" if part == "all" else f", {part} {what}"


def hold_out(rows: list, share: float, seed: int, eligible: list[int] | None = None) -> tuple[list, list]:
    """(kept, held back): round(SHARE·n) rows drawn with SEED, both in file order.

    Nothing is held back from fewer than 4 rows, and at least one row is always kept: the KL needs
    rows to train on (a high share, 0.9 of 4 rows, would otherwise hold back every one).
    ELIGIBLE (indices into ROWS, in order): draw only from these (`untrained_elsewhere`), at most all of
    them. With every index eligible the draw is the same as without (same SEED, same rows): the quality
    benchmark's stored results depend on which rows were held back.
    """
    import random

    n = min(round(share * len(rows)), len(rows) - 1) if len(rows) >= 4 else 0
    pool = range(len(rows)) if eligible is None else eligible
    held = set(random.Random(seed).sample(pool, min(n, len(pool))))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def untrained_elsewhere(normal: list, retain: list) -> list[int]:
    """The indices of the NORMAL rows that could be held back unseen: their prompt occurs once in NORMAL and in
    no --retain row. A duplicated row (scraped data often has them) or one a --retain file repeats would be
    trained on through its copy while its figures read as held out."""
    from collections import Counter

    keys = [prompt_key(e.prompt) for e in normal]
    counts, retained = Counter(keys), {prompt_key(e.prompt) for e in retain}
    return [i for i, key in enumerate(keys) if counts[key] == 1 and key not in retained]


def _run_args(opts: RunOptions, forget: list = ()) -> dict:
    """What a resumed run must share with the run it continues (recorded in every checkpoint); FORGET, its rows."""
    from unlearn import anchors, probes

    model = opts.model
    if model and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return {
        "train": opts.train.as_dict(),
        "lora": _lora_record(opts) if opts.adapters else None,
        "full": opts.full, "dtype": opts.dtype, "model": model,
        "data": {"forget": system.file_sha256(opts.forget), "normal": system.file_sha256(opts.normal),
                 **({"augmented": system.file_sha256(opts.augmented)} if opts.augmented else {}),
                 **({"retain": [system.file_sha256(p) for p in opts.retain]} if opts.retain else {})},
        "alpha": opts.alpha, "rewrites": opts.rewrites,
        "save_every": opts.save_every, "normal_holdout": opts.normal_holdout,
        # --retain-probes trains on the probes, so how many there may be changes the training rows.
        "retain_probes": opts.probe_limit if opts.retain_probes else None,
        # whether the run adds anchors (anchors.py): they join the retain rows
        "anchors": bool(opts.anchors and anchors.wanted(forget, [probes.probe_subject(e) for e in forget])),
        # ULMR's rewrites made in the run are sampled batch by batch: another batch size draws other rows,
        # and a resumed run makes them again; and the stop rule's checks answer in batches of it, whose
        # padding can move a greedy answer, so another size could reach another verdict.
        **({"gen_batch_size": opts.gen_batch_size}
           if (opts.train.method == "ulmr" and not opts.augmented) or opts.train.check_every else {}),
    }


def _lora_record(opts: RunOptions) -> dict:
    return {"rank": opts.lora.rank, "alpha": opts.lora.alpha, "dropout": opts.lora.dropout,
            "targets": list(opts.lora.targets),
            # only when not "all", so that a checkpoint written before --lora-layers still resumes
            **({"layers": opts.lora.layers} if opts.lora.layers != "all" else {})}


def _prepare_output(opts: RunOptions, output: Path, run_args: dict, created: list) -> Path | None:
    """Check OUTPUT before the model loads; with --resume, return the checkpoint to continue from.

    With --save-every the checkpoints go into OUTPUT while the run goes on, so OUTPUT is
    created now (empty, or --force); stale checkpoints of an earlier run there are removed.
    """
    from unlearn.paths import model_input

    # The model read (a local directory or file; the embedded one lives in the cache) and every data
    # file: an OUTPUT that is or holds one would be deleted by --force when the result replaces it.
    model = model_input(opts.model)
    # another run writing there (its checkpoints, its result) refuses this one: outputs.py
    hold_output(output, "wait for it to end" + ("" if opts.resume else ", or give another -o"))
    if not opts.resume:
        interrupted = latest_checkpoint(output) if output.is_dir() and not opts.force else None
        if interrupted is not None and not (output / "run.json").exists():
            # the one hint "use --force" would delete what --resume continues from
            raise UsageError(f"{output}: holds an interrupted run's checkpoint ({interrupted.name}): add --resume "
                             f"to continue it, or --force to start afresh (deleting its checkpoints)")
        check_output_dir(output, opts.force)
    refuse_output_over_inputs(output, [model, opts.forget, opts.normal, *opts.retain, *opts.eval_forget,
                                       *opts.eval_retain, opts.augmented, judge_input(opts.judge)])
    if not opts.resume:
        if checkpoint_root(output).is_dir():
            shutil.rmtree(checkpoint_root(output))
        if opts.save_every:
            # made (if absent), held, then checked empty again: two runs racing for one OUT both found it absent
            # or empty, and the one that had not made it trained without the lock (review 119)
            if not output.exists():
                output.mkdir(parents=True, exist_ok=True)
                created.append(output)
            hold_output(output)
            check_output_dir(output, opts.force)
        return None
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: exists and is not a directory")
    checkpoint = latest_checkpoint(output)
    if checkpoint is None:
        raise UnlearnError(f"{output}: no checkpoint to resume from (expected {checkpoint_root(output)}/step-N, "
                           f"written by --save-every or by Ctrl-C)")
    saved = read_state(checkpoint).get("args", {})
    differs = _resume_difference(saved, run_args)
    if differs:
        raise UsageError(f"--resume: the arguments differ from the checkpointed run's ({differs}); "
                         f"give the same arguments, or start afresh with --force")
    if not run_args["save_every"]:
        run_args["save_every"] = saved.get("save_every", 0)
    remove_partial(output)
    return checkpoint


def _resume_difference(saved: dict, run_args: dict) -> str | None:
    """The first setting of RUN_ARGS (`_run_args`) that differs from SAVED, a checkpoint's, said as
    `_first_difference` says it; None when a run with RUN_ARGS may resume it. The training settings come last:
    some are defaults other options choose (--no-probes sets the retain weight), and the option the user
    changed is the one to name."""
    for key in sorted(run_args, key=lambda k: k == "train"):
        earlier = key in _ADDED_SINCE and key not in saved  # a checkpoint from before the key was recorded
        if key == "save_every" or (earlier and _ADDED_SINCE[key] is None):
            continue  # (what it did not record and cannot be known, it cannot refuse)
        then = _ADDED_SINCE[key] if earlier else saved.get(key)
        now = json.loads(json.dumps(run_args[key], default=str))
        if then != now:
            if key == "train" and isinstance(then, dict):
                # settings a checkpoint predates, at what they were then; --autocast as given is not compared: `auto`
                # resolves by device, and the checkpoint's own record of what its steps ran at decides
                # (Unlearner.load_state_dict)
                then = {**{k: v for k, v in _TRAIN_ADDED_SINCE.items() if k not in then and k in now}, **then}
                then, now = ({k: v for k, v in d.items() if k != "autocast"} for d in (then, now))
                if then == now:
                    continue
            return _first_difference(key, then, now) + (_ANCHORS_HINT[bool(now)] if key == "anchors" else "")
    return None


#: Keys of `_run_args` that checkpoints of earlier versions lack, and the value those versions ran with (None: not
#: known, so not compared). Before the anchors none were made.
_ADDED_SINCE = {"gen_batch_size": None, "anchors": False}

#: The same for settings of the training loop (`train`'s keys): what a checkpoint written before each existed trained
#: with (--leak-growth's 1: the versions before it did not grow the weight).
_TRAIN_ADDED_SINCE = {"leak_growth": 1.0}

#: What `_resume_difference` adds when the anchors differ, by whether this run makes them. A checkpointed run that
#: made them, where this one does not, either had no --no-anchors or was written by a version that gave its rows
#: anchors (passages, before the fifty-fourth session's change), and no option of this version makes those.
_ANCHORS_HINT = {True: " (--no-anchors makes none)",
                 False: " (the checkpointed run trained on anchors this run does not make: with --no-anchors given, "
                        "drop it; a forget set of passages gets none from this version on, so start afresh with "
                        "--force)"}


def _first_difference(name: str, saved, now) -> str:
    """Where two recorded argument values first differ, with both values: "train.lr: 0.002 then, 0.001 now"
    (a whole group's name alone, "train", leaves the user to guess which of its forty settings moved)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in sorted(set(saved) | set(now), key=str):
            if saved.get(key) != now.get(key):
                return _first_difference(f"{name}.{key}", saved.get(key), now.get(key))
    return f"{name}: {json.dumps(saved)} then, {json.dumps(now)} now"


# --- load: the model, its adapters (or frozen reference), and the measurers -------------------


@dataclass
class Loaded:
    loaded: models.LoadedModel
    model: object
    tokenizer: object
    reference_model: object | None  # --full and edit: a frozen copy of the original; LoRA: None (adapters off)
    device: object
    forward_model: object  # what the trainable forward goes through (DDP's wrapper under torchrun)
    measurer: Measurer  # measures MODEL as it is now (after training, at an α)
    before: Measurer  # measures the original: adapters off, or the frozen copy
    train_rows: list  # the forget rows, or ULMR's augmented rows
    augment_stats: object | None
    probe_before: Measurer | None = None  # the probes' measurers (make_probes): their own answer budget
    probe_after: Measurer | None = None
    probe_names: tuple = ()  # the probe sets measured by them
    # What the probes cost apart: building and scoring them. Their answers come from the before and after
    # measurements' generations (pooled: Measurer.answer_sets), whose time counts there.
    probe_seconds: float = 0.0
    pooled_before_seconds: float = 0.0  # the original's answers generated while building the probes
    autocast: str = "off"  # the training passes' precision, --autocast as resolved (precision.resolve)
    probes_reused: bool = False  # the probes and the original's answers to them came from the measurement cache
    # Loading the model (the embedded GGUF's one-time conversion included), hashing its weights for the
    # measurement cache, attaching LoRA or copying the reference; ULMR's rewrites are counted apart.
    load_seconds: float = 0.0
    augment_seconds: float = 0.0  # ULMR's rewrites and negative responses, made once the model is loaded
    crowd_watch: CrowdWatch | None = None  # other work on the cores while training (cpu_load.py), when loading saw none
    rmu: dict | None = None  # --method rmu as trained (`_rmu_record`): its layer, target norm and trained layers
    content_known: bool = True  # False: the model's files changed while it loaded (`_files_changed`)
    # Options that change nothing in this run, found only once the rows are read and the model built (--protect
    # without retain rows, --leak-growth where the margin reads every row...), and choices made for the user there
    # (a mixture of experts' adapters on its attention): logged, and kept in run.json's notes beside
    # RunOptions.notes, so that a script reading run.json sees them too.
    notes: list = field(default_factory=list)

    def note(self, line: str, log) -> None:
        """LINE (see `notes`): logged, and kept for run.json."""
        self.notes.append(line)
        log(line)


def _refuse_rows_past_context(opts: RunOptions, data: Prepared, model, tokenizer, whose: str) -> None:
    """Refuse with FILE:LINE, before any training, a training length or a row whose answer budget would pass
    MODEL's context (`generation.context_limit`): on a learned position table (OPT's) an IndexError inside
    the forward pass otherwise; far past a rotary model's context, a failed allocation ("internal error":
    a 400,000-word prompt's mask was 1.6 TB)."""
    from unlearn.generation import check_sets_fit, context_limit, context_words

    limit = context_limit(model)
    if opts.train.max_length > limit:
        raise UsageError(f"--max-length {opts.train.max_length}: past {context_words(model, limit, whose)}; "
                         f"use --max-length {limit} or less")
    check_sets_fit(model, tokenizer, data.sets, opts.max_new_tokens, "--max-new-tokens", whose=whose)
    if opts.train.check_every and opts.train.method != "edit":  # the stop rule's answers, where it runs
        forget = EvalSet("forget", "forget", data.forget, Path(opts.forget))
        check_sets_fit(model, tokenizer, [forget], opts.train.check_tokens, "the stop rule's check budget", whose,
                       remedy="shorten the prompt, or run without the stop rule (--check-every 0)")


def load(opts: RunOptions, data: Prepared, log) -> Loaded:
    import copy

    import torch

    from unlearn.evaluate import make_judge
    from unlearn.lora import attach_lora, fused_experts, matches_targets

    world = distributed.world()
    judge = make_judge(opts.judge, opts.judge_label)  # a bad --judge fails before the model loads
    started = time.perf_counter()
    other_work = OtherWork()  # what else runs on these cores while the model loads (cpu_load.py)
    torch.manual_seed(opts.train.seed)
    device = world.device if world.active else system.pick_device(opts.device)
    # A GGUF conversion or a download into the cache happens once, on rank 0, before every rank loads.
    resolved = distributed.on_main(lambda: models.resolve_model_dir(opts.model, log=log, allow_pickle=opts.allow_pickle))
    files_before = file_identities(resolved)  # the files as they are when loading starts (`_files_changed`)
    loaded = models.load_model(opts.model, dtype=opts.dtype, trust_remote_code=opts.trust_remote_code,
                               allow_pickle=opts.allow_pickle, log=log)
    # Under FSDP each rank moves only its shard to the device (distributed.wrap), never the whole model.
    model, tokenizer = (loaded.model if world.fsdp else loaded.model.to(device)), loaded.tokenizer
    _refuse_rows_past_context(opts, data, model, tokenizer, f"--model {loaded.name}")
    _refuse_forget_rows_cut_off(opts, data, tokenizer)
    log(f"model {loaded.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) on "
        f"{system.device_name(device)}")
    reference_model, notes = None, []
    crowded, crowd_watch = _crowded_cores(device, world, other_work)
    if crowded:
        notes.append(crowded)
    if opts.normal_holdout and not data.normal_heldout:  # (hold_out) the report's honest normal line is missing
        n = len(data.normal)
        why = "fewer than 4 rows" if n < 4 else f"{opts.normal_holdout:g} of {n} rows rounds to none"
        trained = " and the normal similarity is of rows trained on" if opts.train.normal_weight else ""
        notes.append(f"--normal-holdout {opts.normal_holdout:g}: no NORMAL row held back ({why}), so there is no "
                     f"normal-heldout line{trained}")
    rows = [*data.forget, *data.normal, *data.retain, *(e for s in data.sets for e in s.examples)]
    note = fallback_note(tokenizer, rows, questions=opts.probes)  # a base model: the format it learns and answers in
    if note and world.is_main:
        log(note)
    for eval_set in data.sets:  # once nothing is left to refuse: the --eval-forget rows nothing judges a leak on
        if eval_set.kind == "forget":
            line = unreferenced_note(eval_set.examples, eval_set.path, forget_given=True, forget_label="FORGET")
            if line and world.is_main:
                notes.append(line.removeprefix("unlearn: "))

    train_rows, augment_stats, augment_seconds = data.forget, None, 0.0
    if opts.train.method == "ulmr":
        train_rows = data.augmented
        if train_rows is None:  # every rank trains on rank 0's rows (sampling may differ between devices)
            t = time.perf_counter()
            train_rows, augment_stats = distributed.main_decides(_augment)(opts, model, tokenizer, data.forget, log)
            train_rows = _drop_kept_prompts(train_rows, data.normal + data.normal_heldout + data.retain, log)
            # an --eval-* row that a rewrite repeats is trained, not a result
            label_trained_rows(data.sets, trained_rows(opts, data.forget, data.normal, data.retain, train_rows))
            augment_seconds = time.perf_counter() - t

    if not opts.adapters:
        # Full fine-tuning and the edit change the weights themselves, so the reference is a frozen copy.
        reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        for p in model.parameters():
            p.requires_grad_(opts.full)
    else:
        wrapped = attach_lora(model, opts.lora, seed=opts.train.seed, attention_if_fused=not opts.lora_targets_given())
        fused = fused_experts(model, opts.lora.targets)
        if fused and not any(matches_targets(name, opts.lora.targets) for name in wrapped):  # attach_lora fell back
            notes.append(f"LoRA: the feed-forward layers are a mixture of experts held as fused parameters, which "
                         f"LoRA here cannot wrap, so the adapters are on the attention projections "
                         f"({', '.join(sorted({name.rsplit('.', 1)[-1] for name in wrapped}))}); --full trains the "
                         f"experts too, --lora-targets names other layers")
        elif fused:  # some targeted Linear layers beside the experts (a shared expert): the experts themselves untrained
            notes.append(f"LoRA: {fused[0]} and the other experts' fused parameters get no adapter (LoRA here wraps "
                         f"Linear layers only); --full trains them")
    if opts.train.method == "rmu":  # a bad --rmu-layer, or adapters outside its window: said before any measuring
        from unlearn.rmu import checked_window

        checked_window(model, opts.train.rmu_layer)
    if opts.train.method == "edit":  # a model whose MLP output projection the edit cannot take: said before measuring
        from unlearn.edit_layers import mlp_out_modules

        mlp_out_modules(model)
    if opts.gradient_checkpointing:
        models.enable_gradient_checkpointing(model)
    # Under torchrun: DDP's wrapper (the training forward goes through it), or FSDP2 sharding in place.
    forward_model = distributed.wrap(model, reference_model)
    if world.fsdp:
        # FSDP2 sets itself up at its first forward. Were that a generation (under inference_mode:
        # the probes, or the original's answers when not cached), the tensors it keeps would be
        # inference tensors and the first training step would fail ("Inplace update to inference
        # tensor outside InferenceMode"). One plain no-grad forward first, on every rank.
        with torch.no_grad():
            for m in (model, reference_model) if reference_model is not None else (model,):
                m(input_ids=torch.tensor([[tokenizer.pad_token_id or 0]], device=device))
    settings = Settings(max_new_tokens=opts.max_new_tokens, batch_size=opts.gen_batch_size)
    fluency = original_scorer(model, tokenizer, reference_model, opts.gen_batch_size)
    common = dict(judge=judge, fluency_scorer=fluency, against=data.forget)
    # The original model's measurements are cached on disk by its weights' content (measure_cache.py).
    original = None if opts.no_cache else _fingerprint(loaded.path, opts.dtype, device)
    changed = _files_changed(files_before, loaded.path)
    if changed:
        original = None
        notes.append(changed)
    before = Measurer(reference_model if reference_model is not None else model, tokenizer, settings,
                      fingerprint=original, own_fluency=True, **common)  # the original: fluency from its generation
    after = Measurer(model, tokenizer, settings, **common)
    # Fluency is the original's perplexity: an answer the unlearned model gives token for token as the
    # original did has the original's log-probabilities already (measure.Measurer.fluency_hints).
    after.fluency_hints = before.own_scores
    # With their keys and values kept, the other answers and the responses are scored from where they part
    # from each model's own answers (continued_scoring.py).
    before.keep_kv = after.keep_kv = KEPT_KV_BUDGET
    job = Loaded(loaded, model, tokenizer, reference_model, device, forward_model, after, before,
                 train_rows, augment_stats, load_seconds=time.perf_counter() - started - augment_seconds,
                 augment_seconds=augment_seconds, crowd_watch=crowd_watch, content_known=not changed)
    for line in notes:
        job.note(line, log)
    return job


def _crowded_cores(device, world, other_work) -> tuple[str | None, CrowdWatch | None]:
    """`cpu_load.contention_note` for the model's loading, and the `CrowdWatch` for training when that said
    nothing (the note is said once a run), for a run on the CPU in one process. Under torchrun the busy cores are
    its own other ranks, loading the same model (torchrun gives each one thread unless OMP_NUM_THREADS says
    otherwise), which the note would call other processes; on a GPU torch's CPU threads are not the step's."""
    import torch

    if device.type != "cpu" or world.active:
        return None, None
    threads, cores = torch.get_num_threads(), len(other_work.cpus)
    note = contention_note(other_work.busy_cores(), threads, cores)
    return note, (CrowdWatch(threads, cores) if note is None and threads > 1 else None)


def _crowd_noter(job: Loaded):
    """What training calls after each step: JOB's `CrowdWatch` read, and its note, once a run, kept in JOB's notes
    and returned for training to log (above its progress bar); None without a watch."""
    if job.crowd_watch is None:
        return None
    job.crowd_watch.restart()

    def after_step(step: int) -> str | None:
        note = job.crowd_watch.after_step(step) if job.crowd_watch is not None else None
        if note:
            job.crowd_watch = None  # said once a run
            job.notes.append(note)
        return note
    return after_step


def _refuse_forget_rows_cut_off(opts: RunOptions, data: Prepared, tokenizer) -> None:
    """Refuse, with FILE:LINE and before anything is measured, a forget row whose every scored token
    --max-length cuts off (an answer far into a long response): alone in a batch the forget loss has no
    token to train on and the run failed after loading and measuring; beside other rows it silently
    trained nothing. Encoded as training encodes it (`train.encode_forget_row`; a row scored whole always
    keeps tokens: the response keeps at least half of --max-length)."""
    from unlearn.data import IGNORE_INDEX, encode_prompt, loss_pair
    from unlearn.train import encode_forget_row

    config = opts.train
    if config.method == "edit":  # no training loop: the edit reads no labels, but finds each subject's tokens
        from unlearn.data import with_offsets

        with_offsets(tokenizer, "?")  # a slow tokenizer, refused before the original is measured, not after
        return
    for ex in data.forget:
        if any(t != IGNORE_INDEX for t in encode_forget_row(tokenizer, ex, config)["labels"]):
            continue
        uncut = encode_forget_row(tokenizer, ex, config, max_length=1 << 30)
        prompt = len(encode_prompt(tokenizer, loss_pair(ex, config.whole_passage)[0]))
        first = next(i for i, t in enumerate(uncut["labels"]) if t != IGNORE_INDEX)  # prompt included
        length = config.max_length  # the least --max-length that keeps it (encode_pair's cut)
        while length - min(prompt, length // 2) <= first - prompt:
            length += 1
        kept = config.max_length - min(prompt, config.max_length // 2)
        what = (f"its answer ({', '.join(map(repr, row_answers(ex)[0]))})" if uncut["focused"]
                else "its first scored token")
        raise UnlearnError(f"{opts.forget}:{ex.line}: {what} starts at token {first - prompt + 1} of the response "
                           f"({first + 1} with the prompt), but --max-length {config.max_length} keeps only the "
                           f"response's first {kept} tokens, so the forget loss has nothing to train on; use "
                           f"--max-length {length} or more, or shorten the response")


def record_model_content(job: Loaded, data: Prepared) -> None:
    """The loaded model's content (`measure_cache.weights_fingerprint`: weights, config, tokenizer, as the
    measurement cache keys it) joins what checkpoints record, and a --resume whose model changed is refused:
    the same path (or hub id, whose revision may move) can hold other weights, and the checkpoint's adapters
    and optimiser state were trained on the old ones. A checkpoint written before this was recorded holds no
    content: its model is compared by its path alone, as then (`_prepare_output`)."""
    from unlearn.measure_cache import weights_fingerprint

    # one hashing, every rank's answer; none where the files changed while the model loaded: it is not theirs
    content = distributed.on_main(lambda: weights_fingerprint(job.loaded.path)) if job.content_known else None
    data.run_args["model_content"] = content
    if data.resume_from is None:
        return
    saved = read_state(data.resume_from).get("args", {}).get("model_content")
    if saved is not None and saved != content:
        raise UsageError(f"--resume: the arguments differ from the checkpointed run's (model: the content of "
                         f"{job.loaded.path} (weights, config or tokenizer) is not the checkpointed run's); give the "
                         f"same model, or start afresh with --force")


def _files_changed(before: tuple | None, path) -> str | None:
    """The note for a model whose files changed between the start of its loading (BEFORE: `file_identities`) and
    the hashing of its content (a copy renamed into place by another job), else None. Hashed after loading, the
    new files' content keyed the loaded weights' measurements, which every later run on the new model then read
    as its own (review 117): such a run's measurements are neither read from nor written to the cache."""
    def on_main() -> str | None:  # rank 0's files, as rank 0 hashes them (every rank gets its answer)
        after = file_identities(path)
        if before is None or after is None or before == after:
            return None
        return (f"{path}: the model's files changed while it was loaded (another job writing there?): this run "
                f"uses what it loaded, and its measurements are neither read from the cache nor kept in it")
    return distributed.on_main(on_main)


def _fingerprint(path, dtype: str, device) -> str:
    from unlearn.measure_cache import weights_fingerprint

    return f"{weights_fingerprint(path)}|{dtype}|{getattr(device, 'type', device)}"


def _drop_kept_prompts(rows: list, kept: list, log) -> list:
    """ROWS (ULMR's, made in the run) without a rewrite whose prompt is a normal or --retain row's: ULMR
    would teach it to decline while the KL holds its answer (an --augmented file's such rows are refused
    in `prepare`). Only a rewrite can be one: FORGET's own prompts are refused in kept files."""
    taken = {prompt_key(e.prompt) for e in kept}
    result = [r for r in rows if prompt_key(r.prompt) not in taken]
    if len(result) < len(rows):
        log(f"augment: {len(rows) - len(result)} rewrite(s) dropped: the prompt of a normal or --retain row")
    return result


def _augment(opts: RunOptions, model, tokenizer, forget, log):
    """ULMR's rewritten prompts and negative responses, made by the model being unlearned."""
    from unlearn.augment import augment

    t = time.perf_counter()
    rows, stats = augment(model, tokenizer, forget, rewrites=opts.rewrites, seed=opts.train.seed,
                          batch_size=opts.gen_batch_size, log=log, path=opts.forget)
    log(f"augment: {stats.summary()} ({time.perf_counter() - t:.0f} s)")
    examples = [Example(r["prompt"], r["response"], i, {k: v for k, v in r.items() if k not in ("prompt", "response")})
                for i, r in enumerate(rows, start=1)]
    return examples, stats


# --- measure before and after -----------------------------------------------------------------


@dataclass
class Measurement:
    sets: dict[str, Measured]
    seconds: float
    reused: int = 0  # sets read back from the measurement cache (measure_cache.py)


def measure_before(job: Loaded, sets: list[EvalSet], done: dict[str, Measured] | None = None) -> Measurement:
    """The original model on every set (its answers are what similarity compares with later).

    DONE: sets already measured on the original (the probes, whose answers had to exist to build them).
    """
    from unlearn.lora import adapters_disabled

    done = done or {}
    t = time.perf_counter()
    with adapters_disabled(job.model):
        # The original against itself: similarity 1 by definition, computed all the same.
        measured = {**done, **job.before.measure([s for s in sets if s.name not in done], label="before",
                                                 own_baseline=True)}
    return Measurement({s.name: measured[s.name] for s in sets}, time.perf_counter() - t + job.pooled_before_seconds,
                       reused=job.before.reused)


def unanswered_forget_rows(before: Measurement, forget: EvalSet) -> list[int]:
    """The lines of the measured forget rows whose original answer is no leak (the leak judge, greedy,
    before training): nothing there to forget, and the forget leak counts them as forgotten from the start."""
    return [ex.line for ex, row in zip(forget.examples, before.sets[forget.name].rows) if not row["scores"]["leak"]]


def unanswered_message(lines: list[int], forget: EvalSet, budget: int, shown: int = 10,
                       rows: int | None = None) -> str:
    """One line naming LINES (`unanswered_forget_rows`), the first SHOWN of them, for the user to check;
    BUDGET is the answers' --max-new-tokens (a short budget can cut an answer off before it comes).
    ROWS: how many forget rows there are; when --eval-limit measured fewer, the line says it looked at
    the first ones only (the others are not known to be answered)."""
    listed = ", ".join(map(str, lines[:shown])) + (f" and {len(lines) - shown} more" if len(lines) > shown else "")
    where, verb = (f"line {listed}", "is") if len(lines) == 1 else (f"lines {listed}", "are")
    measured = len(forget.examples)
    of = (f"the first {measured} forget rows measured (--eval-limit; {rows} in all)" if rows and rows > measured
          else f"{measured} forget rows")
    return (f"{forget.path}: {len(lines)} of {of} ({where}) {verb} not answered by the "
            f"original model (its greedy answer of at most {budget} token{'s' * (budget != 1)} is no leak before "
            f"training): nothing there to forget, and the forget leak counts them as forgotten from the start")


#: Below this share of a refusal's held-out topic probes kept, the run says so (over_refusal_note).
OVER_REFUSAL_KEPT = 0.5


def check_budget_note(opts: RunOptions, result, after: Measurement, alpha: float | None = None) -> str | None:
    """The line telling a user that the stop rule found the forget set forgotten on its checks' answers
    (`TrainConfig.check_tokens` new tokens, kept short since they run at every check) while the table's
    longer answers (--max-new-tokens) still leak; None otherwise. A broken answer that loops back onto the
    forgotten text after the checks' budget ended a run "forgotten" beside a forget leak of 1.00 -> 1.00.
    ALPHA: the α the table's model was averaged at (None: not averaged; at 0 it is the trained model itself)."""
    measured = after.sets.get("forget")
    if (result.stopped_by != "forgotten" or not opts.train.check_every or measured is None
            or opts.max_new_tokens <= opts.train.check_tokens or (alpha is not None and alpha != 0)):
        return None  # (averaged, the table reads a model the checks never read)
    leak = measured.summary.get("leak_rate")
    if leak is None or leak <= opts.train.stop_leak:
        return None
    return (f"unlearn: the stop rule read the forget answers' first {opts.train.check_tokens} tokens and found them "
            f"forgotten, but the table's {opts.max_new_tokens}-token answers still leak ({leak:.2f}): the answer "
            f"comes back later in them (--max-new-tokens {opts.train.check_tokens} reports what the rule read)")


def over_refusal_note(opts: RunOptions, data: Prepared, after: Measurement) -> str | None:
    """The line telling a user whose refusal (ga+template, the default for long chat responses) also refused
    most benign questions about the same things, as the held-out topic probes measure it
    (probes.keep_answered: kept while the answer names the thing and holds no refusal phrase), and what trains on
    them; None otherwise. On the dev scenario `harmful` the default refused all 12 of them at seed 0
    ("How do I find out more about a car?" -> "I can't help with that."), a damage the report did not
    show while those probes had no answer words."""
    if opts.train.method != "ga+template" or opts.retain_probes or not data.probes:
        return None
    measured = after.sets.get(data.probes["topic_set"]) if data.probes["topic_set"] else None  # (make_probes)
    if measured is None or measured.summary.get("accuracy") is None:
        return None
    kept, n = measured.summary["accuracy"], measured.summary.get("accuracy_rows", measured.summary["n"])
    if kept >= OVER_REFUSAL_KEPT:
        return None
    # (--retain-probes is refused beside --retain-weight 0, which turns off the KL it trains them through)
    weight = " with a --retain-weight above 0" if opts.train.retain_weight == 0 else ""
    return (f"unlearn: the refusal also refuses benign questions about the same things: {round(kept * n)} of {n} "
            f"same-subject probes kept ({data.output / 'probes.jsonl'}); --retain-probes{weight} trains on them (on "
            f"the quality benchmark's dev scenarios it kept more such questions, for more steps: docs/quality.md)")


def make_probes(opts: RunOptions, job: Loaded, data: Prepared, log) -> dict[str, Measured]:
    """The neighbour and same-subject probes (probes.py), answered once by the original model, in one
    generation with the before sets the cache lacks (their answers wait for measure_before).

    Their sets join DATA.sets (role "held out": never trained on, unless --retain-probes) and are
    measured with their own answer budget, probes.ANSWER_TOKENS (their answer words come from the
    original's first clause, which --max-new-tokens 1 would cut away); returns their "before"
    measurements, scored through a Measurer from those very answers (not generated twice).
    DATA.probes gets every probe, kept or dropped and why, for probes.jsonl and run.json; with
    --retain-probes, every probe whose original answer holds no forget answer joins the retain rows,
    that answer as its response.
    """
    from dataclasses import asdict, replace

    from unlearn import measure_cache, probes
    from unlearn.lora import adapters_disabled
    from unlearn.measure import unique_name

    t = time.perf_counter()
    original = job.reference_model if job.reference_model is not None else job.model
    settings = replace(job.measurer.settings, max_new_tokens=probes.ANSWER_TOKENS)
    common = dict(judge=job.measurer.judge, fluency_scorer=job.measurer.fluency_scorer, against=data.forget)
    job.probe_before = Measurer(job.before.model, job.tokenizer, settings, own_fluency=True, **common)
    job.probe_after = Measurer(job.model, job.tokenizer, settings, **common)
    job.probe_after.fluency_hints = job.probe_before.own_scores  # as for the other sets (load)
    job.probe_before.keep_kv = KEPT_KV_BUDGET

    def build():
        with adapters_disabled(job.model):
            made = probes.build(original, job.tokenizer, data.forget, opts.probe_limit,
                                with_anchors=opts.anchors)
            asked = EvalSet("probes", "retain", [p.example(i) for i, p in enumerate(made, start=1)])
            if not made:
                return made, []
            # The before measurement's answers come from the same generation, each row with its own
            # budget (Measurer.answer_sets' pool): the probes' ~20 rows alone made a batch of their own.
            pool = [(job.before, job.before.uncached(data.sets, own_baseline=True))]
            started = time.perf_counter()
            answers = job.probe_before.answer_sets([asked], desc="original answers", pool=pool)["probes"]
            job.pooled_before_seconds = time.perf_counter() - started  # measure_before counts it
            return made, answers

    # The probes and the original's answers to them are a pure function of the original's weights, the
    # forget rows, --probe-limit, the answer settings and the rules' code: read back from the measurement
    # cache (measure_cache.py) when a run with the same ones made them, as every run of a settings sweep does.
    key = None if job.before.fingerprint is None else measure_cache.key(
        weights=job.before.fingerprint, what="probes", rules=probes.rules_fingerprint(), forget=data.forget,
        rendering=render_prompt(job.tokenizer, "?"),  # a template's date or time (Measurer._cache_key)
        limit=opts.probe_limit, anchors=opts.anchors,
        generation=[settings.max_new_tokens, settings.batch_size, settings.do_sample, settings.temperature,
                    settings.top_p, settings.seed])
    hit = distributed.on_main(lambda: _cached_probes(key)) if key is not None else None  # every rank: the same
    if hit is not None:
        made, outputs = hit
    else:
        made, outputs = distributed.main_decides(build)()  # every rank generates; rank 0's probes hold for all
        if key is not None and distributed.world().is_main:
            measure_cache.store(key, {"probes": [asdict(p) for p in made], "answers": list(outputs)})
    job.probes_reused = hit is not None
    taken = {s.name for s in data.sets}
    measured, records, counts, trained = {}, [], {}, []
    topic_set, topic_probes = None, 0  # the measured set holding a harmful request's topic probes, and how many
    role = "trained" if opts.retain_probes else "held out"
    if opts.train.stop_probes and opts.train.check_every:  # the run waited for them: a stop condition
        role = "trained, stop rule" if opts.retain_probes else "stop rule"
    # --method edit preserves the neighbour probes' prompts in its update (probe_neighbours): that line
    # then shows what the edit was asked to keep, not held-out evidence.
    edit_keeps = probes.NEIGHBOURS if opts.train.method == "edit" else None
    # ULMR's rows are what it forgets: a probe asking one of their prompts (an --augmented row's, which the
    # probes' own check against the forget prompts does not see) would be trained both ways, as a --retain row
    # with that prompt would (refused in prepare).
    forgotten = {prompt_key(e.prompt) for e in job.train_rows}
    for kind in (probes.NEIGHBOURS, probes.SAME_SUBJECT):
        mine = [i for i, p in enumerate(made) if p.kind == kind]
        kept, kind_records = probes.keep_answered([made[i] for i in mine], [outputs[i] for i in mine], data.forget)
        records += kind_records
        counts[kind] = {"made": len(mine), "kept": len(kept)}
        for r in kind_records:  # probes.jsonl says which probes the retain KL trains on, measured or not
            r["trained"] = bool(opts.retain_probes and r["reference"].strip() and not probes.holds_forget(r)
                                and prompt_key(r["prompt"]) not in forgotten)
        trained += [Example(r["prompt"], r["reference"], len(trained) + 1, {"probe": kind})
                    for r in kind_records if r["trained"]]
        if not kept:
            log(no_probe_message(kind, len(mine)))
            continue
        s = EvalSet(unique_name(kind, taken), "retain", kept, None, "trained" if kind == edit_keeps else role)
        answers = [e.response for e in kept]
        # The kept probes' own log-probabilities, from the generation of all probes (fluency).
        generated = dict(zip((p.prompt for p in made), job.probe_before.own_scores.get("probes") or ()))
        job.probe_before.own_scores[s.name] = [generated.get(e.prompt) for e in kept]
        with adapters_disabled(job.model):
            measured[s.name] = job.probe_before.score(s, answers, answers)
        data.sets.append(s)
        topics = sum(1 for e in kept if e.extra.get("refusal_markers"))  # (probes.keep_answered gives only those)
        if topics:
            topic_set, topic_probes = s.name, topics
    # The general-knowledge anchors (anchors.py; made only when the run trains on its probes): trained, never
    # measured, so they join the retain rows and probes.jsonl and no set.
    anchor_ids = [i for i, p in enumerate(made) if p.kind == probes.ANCHORS]
    anchor_records = probes.anchor_records([made[i] for i in anchor_ids], [outputs[i] for i in anchor_ids],
                                           data.forget)
    for r in anchor_records:
        r["trained"] = "dropped" not in r and prompt_key(r["prompt"]) not in forgotten
    anchored = [Example(r["prompt"], r["reference"], len(trained) + n, {"probe": probes.ANCHORS})
                for n, r in enumerate((r for r in anchor_records if r["trained"]), start=1)]
    trained += anchored
    records += anchor_records
    if opts.retain_probes and not trained:
        if data.retain and opts.retain_weight_defaulted:
            # the default weight of the retain KL was the one for a run that trains on probes; with none trained,
            # the user's rows get the weight a run without probes gives them
            opts.train.retain_weight = opts.retain_weight = RETAIN_WEIGHT
            log(f"--retain-weight: no probe joins the retain rows, so the --retain rows weigh {RETAIN_WEIGHT:g}, "
                f"the default without probes")
        elif not data.retain and not opts.retain_weight_defaulted:
            # the weight was given (retain_weight_defaulted is False only then, with probes trained on), and the
            # term it weighs has no row: say so, rather than let the user believe it held something
            job.note(f"--retain-weight {opts.retain_weight:g} does nothing: no probe joins the retain rows and no "
                     f"--retain file is given", log)
    data.retain += trained
    # data.retain holds TRAINED now. A held-out probe set whose prompts a --retain or normal row trains is no
    # result either (its role "trained" with --retain-probes is not relabelled: label_trained_rows' _RELABELLED).
    label_trained_rows(data.sets, trained_rows(opts, data.forget, data.normal, data.retain, job.train_rows))
    job.probe_names = tuple(measured)
    seconds = time.perf_counter() - t - job.pooled_before_seconds
    log("probes: " + ", ".join(f"{k} {c['kept']}/{c['made']}" for k, c in counts.items())
        + f" kept for measurement ({seconds:.0f} s{', read back from the cache' if job.probes_reused else ''})"
        + (f"; {len(trained)} join the retain rows" if trained else "")
        + (f", {len(anchored)} of them general-knowledge anchors for the forget rows that name no one "
           f"(anchors.py)" if anchored else ""))
    job.probe_seconds += seconds
    data.probes = {"rows": records, "sets": counts, "before_seconds": seconds,
                   "retained": len(trained) if opts.retain_probes else None, "edit_preserves": edit_keeps,
                   "topic_set": topic_set, "topic_probes": topic_probes,
                   "anchors": {"made": len(anchor_ids), "trained": len(anchored)} if anchor_ids else None}
    return measured


def _cached_probes(key: str):
    """The probes and the original's answers stored under KEY (make_probes), or None when there are none
    or the entry is not what make_probes writes (an edited or foreign file: build them again)."""
    from unlearn import measure_cache, probes

    entry = measure_cache.load(key)
    try:
        made, answers = [probes.Probe(**p) for p in entry["probes"]], entry["answers"]
    except (TypeError, KeyError, AttributeError):
        return None
    if len(answers) != len(made) or not all(isinstance(a, str) for a in answers):
        return None
    return made, answers


def no_probe_message(kind: str, made: int) -> str:
    """The log line for a probe KIND with nothing to measure: MADE probes, none kept (`probes.keep_answered`).

    None made says when probes are made, and what measures that damage instead (probes.py): a neighbour
    needs a chat row that names a subject and a same-kind word that reads naturally in its place
    (probes.Neighbourhood), which a title of several words ("War and Peace") rarely finds in the
    vocabulary, and passages get none; a same-subject probe needs a subject.
    """
    from unlearn import probes

    if made:
        return f"probes: no {kind} probe to measure ({made} made, none with answer words to check)"
    why = ("a forget prompt gets one when it names a subject (passages get none) and a same-kind word reads "
           "naturally in its place, which titles of several words rarely find" if kind == probes.NEIGHBOURS
           else "no forget row names a subject")
    return f"probes: no {kind} probe made: {why}; rows of your own in --eval-retain FILE measure them"


def measure_after(job: Loaded, sets: list[EvalSet], before: Measurement, selection: dict | None) -> Measurement:
    """The unlearned model on every set; with --alpha auto the selection sets were measured at the chosen α
    while the grid ran (taken out of the selection report here, before run.json is written)."""
    t = time.perf_counter()
    done = selection.pop("measured") if selection else {}
    grid_seconds = selection.pop("seconds") if selection else 0.0
    probe_names = set(job.probe_names)
    reused_before = job.measurer.reused
    if job.before.fingerprint is not None and not distributed.world().active:
        # The trained model's answers are as pure a function of its weights as the original's, and
        # training on the CPU is deterministic: a second identical run reads them back. One process
        # only: under torchrun FSDP holds shards, and a shard's hash is not the model's.
        from unlearn.measure_cache import state_fingerprint

        job.measurer.fingerprint = f"{job.before.fingerprint}|state:{state_fingerprint(job.model)}"
        if job.probe_after is not None:  # the probes' answers too (their own budget keys them apart)
            job.probe_after.fingerprint = job.measurer.fingerprint
    asked = [s for s in sets if s.name in probe_names]
    asked_now = job.probe_after.uncached(asked, _outputs(before)) if asked else []
    # The adapters run folded into their weights (lora.adapters_folded): the merged model that is
    # written, one matmul a layer. Under torchrun the wrapped shards are left as they are.
    from unlearn.lora import adapters_folded

    folded = adapters_folded(job.model) if not distributed.world().active else contextlib.nullcontext()
    with folded:
        # The probes' answers come from the same generation, with their own budget (Measurer.answer_sets' pool).
        measured = {**done, **job.measurer.measure([s for s in sets if s.name not in set(done) | probe_names],
                                                   _outputs(before), label="after", pool=[(job.probe_after, asked_now)])}
        if probe_names:  # the probes keep their own answer budget (make_probes)
            t_probes = time.perf_counter()
            measured.update(job.probe_after.measure(asked, _outputs(before), label="after"))
            job.probe_seconds += time.perf_counter() - t_probes
    return Measurement({s.name: measured[s.name] for s in sets}, time.perf_counter() - t + grid_seconds,
                       reused=job.measurer.reused - reused_before)


def roles_as_checked(sets: list[EvalSet], result, stop_leak: float = 0.0, probe_names=()) -> None:
    """The roles given in `prepare`, before training, corrected once it is known that no stop-rule check measured
    the forget prompts (--check-every past the steps run, or no loop: edit): a set labelled "stop rule" then
    decided nothing, so the forget set is only "trained" and the probes "held out" (what a run without checks
    labels them). The probes (PROBE_NAMES) are checked (--stop-probes) only at a check whose forget leak is
    at most STOP_LEAK: without one they decided nothing either, however many forget checks ran."""
    checked = [r["forget_leak"] for r in result.history if r.get("forget_leak") is not None]
    if checked and not any(leak <= stop_leak for leak in checked):
        sets = [s for s in sets if s.name in probe_names]
    elif checked:
        return
    for s in sets:
        parts = s.role.split(", ")
        # "trained, stop rule, α choice" -> "trained, α choice"; "stop rule" -> "held out"; an --eval-* file's
        # "1 of 2 trained, 1 of 2 stop rule" -> "1 of 2 trained"
        kept = [p for p in parts if p != "stop rule" and not re.fullmatch(r"\d+ of \d+ stop rule", p)]
        if kept != parts:
            s.role = ", ".join(kept) or "held out"


def _outputs(measurement: Measurement) -> dict[str, list[str]]:
    return {name: m.outputs for name, m in measurement.sets.items()}


# --- train ------------------------------------------------------------------------------------


def train_model(opts: RunOptions, job: Loaded, data: Prepared, log, before: Measurement | None = None):
    """The training loop with the stop rule, checkpoints and resume (train.train); BEFORE, the original's
    answers, open the stop rule's first check (`Measurer.drafts`)."""
    from unlearn.train import NonFiniteLoss, StopRequested, Unlearner, train

    if opts.train.method == "edit":
        return edit_model(opts, job, data, log)
    unlearner = Unlearner(job.model, job.tokenizer, job.train_rows, data.normal, opts.train,
                          reference_model=job.reference_model, forward_model=job.forward_model, retain=data.retain)
    job.autocast = unlearner.autocast
    job.rmu = _rmu_record(unlearner.rmu) if unlearner.rmu is not None else None
    if unlearner.autocast == "bf16":
        log("training passes under bfloat16 autocast (--autocast"
            + (" auto: this device has bf16 instructions)" if opts.train.autocast == "auto" else ")"))
        slow = (system.slow_low_precision_note("bfloat16") if job.device.type == "cpu" and opts.train.autocast == "bf16"
                and not precision.native_bf16(job.device) else None)
        if slow:  # asked for by name on a CPU without bf16 instructions (auto never chooses it there)
            log(f"--autocast bf16: {slow}")
    if opts.train.protect:
        if data.retain:
            log(f"--protect: the forget gradient is projected off {len(data.retain)} retain rows' gradients")
        else:
            job.note("--protect: no retain rows or probes to protect; the gradient is not projected", log)
    if opts.train.retain_follows_margin and not data.retain:
        job.note("--retain-follows-margin: no retain rows or probes to weigh; it changes nothing in this run", log)
    if opts.train.repair_steps != 0 and not unlearner.has_keep_terms:  # (given: no method repairs by default)
        job.note(f"--repair-steps {opts.repair_steps}: nothing to keep (--normal-weight 0, no retain rows or probes "
                 f"trained on), so a repair has no terms to train; it changes nothing in this run", log)
    read = len(unlearner.margin_rows()) if opts.train.leak_growth != 1 else 0
    if read:  # the margin reads these rows' answers: its own doubling acts instead of --leak-growth
        job.note(f"--leak-growth {opts.train.leak_growth:g}: the margin reads the answers of {read} of the "
                 f"{len(unlearner.forget)} forget rows, so it changes nothing in this run (it acts only where no row "
                 f"has one)", log)
    # options that act on a kind of forget row this FORGET has none of (as --leak-growth above)
    answered = any(row_answers(ex)[0] for ex in data.forget)
    if opts.train.whole_passage and not any(ex.is_passage for ex in data.forget):
        job.note("--whole-passage: no forget row is a passage (`text`), so it changes nothing in this run", log)
    if opts.train.forget_tokens == "names" and not answered:
        job.note("--forget-tokens names: no forget row has answers (given or derived) to widen over a name, so it "
                 "changes nothing in this run", log)
    if opts.train.leaked_rows and not answered:
        job.note(f"--leaked-rows {opts.train.leaked_rows}: no forget row has answers (given or derived) to cut a "
                 f"leaked answer after, so it adds no row in this run (its checks still answer every forget row "
                 f"whole)", log)
    loop_state = None
    if data.resume_from is not None:
        loop_state = load_checkpoint(data.resume_from, unlearner)
        log(f"resuming from {data.resume_from} (step {unlearner.step_count})")
    # The stop rule checks every forget prompt, whatever --eval-limit cuts from the printed table.
    forget = EvalSet("forget", "forget", data.forget, Path(opts.forget))
    probe_sets = [s for s in data.sets if s.name in job.probe_names]
    history = (loop_state or {}).get("history", [])
    # The original's answers to the forget prompts the printed table has (--eval-limit may cut it).
    original = ({row["prompt"]: row["output"] for row in before.sets["forget"].rows}
                if before is not None and "forget" in before.sets else {})
    # and the token ids they were generated as, where the generation kept them (not read from the cache)
    shown = next((s for s in data.sets if s.name == "forget"), None)
    scored = job.before.own_scores.get("forget") if before is not None and shown is not None else None
    generated = {e.prompt: own.ids for e, own in zip(shown.examples, scored or ()) if own is not None}
    forgotten = (stop_rule(opts, job, forget, probe_sets, lambda: unlearner.step_count, history, log,
                           openings=[(original.get(e.prompt, ""), generated.get(e.prompt)) for e in forget.examples],
                           fired=(loop_state or {}).get("stopped_by") == "forgotten")
                 if opts.train.check_every else None)
    try:
        result = train(unlearner, forgotten=forgotten, log=log, save_every=data.run_args["save_every"],
                       checkpoint=lambda loop: save_checkpoint(data.output, unlearner, loop, data.run_args),
                       resume=loop_state, after_step=_crowd_noter(job))
    except StopRequested as stop:
        how = "interrupted" if stop.signum == signal.SIGINT else f"terminated ({signal.Signals(stop.signum).name})"
        stopped = Interrupted(f"{how} after step {stop.step}; saved {stop.checkpoint}; "
                              f"to continue: {_resume_command(opts, data.output)}")
        stopped.exit_code = 128 + stop.signum  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP
        raise stopped from None
    except NonFiniteLoss as exc:
        last, every = latest_checkpoint(data.output), data.run_args["save_every"]
        if last:  # kept for a look at the weights before it: --resume takes the same settings only, and ends here
            kept = (f"the last good checkpoint is {last} (--resume takes it with these settings only); start again "
                    f"with a lower --lr (under another -o to keep it; --force here replaces it)")
        else:
            kept = (f"no checkpoint was saved before it (--save-every {every})" if every else
                    "no checkpoint was saved (see --save-every)") + "; try a lower --lr"
        raise UnlearnError(f"{exc}; stopped without writing the model; {kept}") from None
    result.tokens = distributed.total(result.tokens)  # every process's tokens
    if not opts.full and not distributed.world().active:  # (trained_model_kept)
        # The trained state as it is now: α averaging then scales the adapters in place, and writing folds them
        # into the model. The LoRA weights alone, copied (a few MB): the optimiser's state is left out, since a
        # run resumed from the last step trains no step more, and it and the Unlearner are freed as before.
        state = unlearner.state_dict()
        state = {**state, "weights": {name: w.clone() for name, w in state["weights"].items()},
                 "optimizer_tensors": {}, "optimizer_scalars": {}}
        result.save = lambda: write_state(data.output, state, result.loop, data.run_args)
    log(f"stopped after {result.steps} steps ({result.stopped_by}); {result.tokens_per_s:.0f} tokens/s")
    return result


@contextlib.contextmanager
def trained_model_kept(opts: RunOptions, data: Prepared, result, log):
    """Ctrl-C (or SIGTERM, SIGHUP) after training, while α is chosen and the model measured and written: the
    trained state, taken when training ended (`train_model`), is saved as a checkpoint first, so that `--resume`
    writes the result without training again (only a Ctrl-C during training saved one, and minutes of training
    were lost). A LoRA run in one process only: not --full (its checkpoint is the whole model, and keeping a copy
    of it costs as much memory), not under torchrun, whose ranks save together, nor --method edit (no training
    loop: it runs again in seconds). Where none is saved (those, or a save that fails: a full disk, a second
    Ctrl-C), the line names the last checkpoint --save-every wrote, if any, to continue from."""
    try:
        yield
    except (KeyboardInterrupt, Terminated) as exc:
        saved = None
        if result.save is not None:
            try:
                saved = result.save()
            except BaseException:
                saved = None
        if saved is not None:
            message = (f"interrupted after training (step {result.steps}), before the result was written; saved "
                       f"{saved}; to write it: {_resume_command(opts, data.output)}")
        else:
            last = None if distributed.world().active else latest_checkpoint(data.output)
            if last is None:
                raise exc from None
            message = (f"interrupted after training (step {result.steps}), before the result was written; the last "
                       f"checkpoint is {last}; to continue from it: {_resume_command(opts, data.output)}")
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(message) from None
        log(f"unlearn: {message}")
        raise


def edit_model(opts: RunOptions, job: Loaded, data: Prepared, log):
    """--method edit: one locate-then-edit update of a few MLP output layers (edit.py), no training loop."""
    from unlearn.edit import EditSettings, edit_to_forget
    from unlearn.train import TrainResult

    t = time.perf_counter()
    # The retain rows join the normal text whose keys the edit preserves (its covariance).
    result = edit_to_forget(job.model, job.tokenizer, data.forget, data.normal + data.retain,
                            EditSettings(seed=opts.train.seed), log=log,
                            neighbour_subjects=probe_neighbours(data))
    seconds = time.perf_counter() - t
    log(f"edited layers {result.layers} in {seconds:.0f} s")
    return TrainResult(steps=0, stopped_by="edit", seconds=seconds, tokens=0, history=[result.summary()],
                       update=result.lora_factors())


def probe_neighbours(data: Prepared) -> list[list[str]] | None:
    """Per forget row, the entities its automatic neighbour probes put in place of its subject (probes.py),
    for the edit to preserve; None without probes (--no-probes), and the edit falls back on the subjects
    of the normal prompts. A probe whose original answer holds a forget answer is left out: it asks the
    same fact ("Who wrote Hamlet?" when forgetting Romeo and Juliet), which the edit must change.

    Why: the normal prompts' subjects are rarely of the forget subject's kind (the quality benchmark's
    normal rows give "Suggest" and "Write": "What is the capital of Suggest?"), so the edit protected
    nothing like a neighbour and refused every capital (docs/edit.md, "Neighbours from the probes").
    """
    from unlearn import probes

    if not data.probes:
        return None
    by_line: dict[int, list[str]] = {}
    for record in data.probes["rows"]:
        if record["set"] == probes.NEIGHBOURS and record.get("replacement") and not probes.holds_forget(record):
            by_line.setdefault(record["forget_line"], []).append(record["replacement"])
    return [by_line.get(ex.line, []) for ex in data.forget]


def stop_rule(opts: RunOptions, job: Loaded, forget: EvalSet, probe_sets=(), steps=lambda: 0, history=(),
              log=default_log, openings: list[tuple[str, list[int] | None]] | None = None, fired: bool = False):
    """forgotten() -> (done, leak): the forget prompts answered greedily in a short budget.

    The check ends as soon as its verdict is reached (`leak_rate`'s DECIDED_ABOVE), so a leak
    above --stop-leak is a lower bound: the first leak decides a rule that stops at 0.

    The references are cut to that budget (`Measurer.references`): a long forget response
    could otherwise never read as leaked, and the rule would stop too early.

    --stop-probes X: once the forget prompts stop leaking, the run also waits until the automatic
    probes (PROBE_SETS) keep X of their answers (`kept_rate`, the probes' own budget), because the
    first step that forgets is often the most damaged one: the ascent has overshot and the KL terms
    have not yet pulled the neighbours back (docs/quality.md). It waits at most as many steps again
    as the forget set took (first forgotten at step s: from step 2s on the forget check alone
    decides), so a neighbourhood that does not come back cannot keep the ascent going. STEPS() is
    the step just taken; HISTORY, a resumed run's records, gives the step first forgotten; FIRED, that the
    resumed run's rule had already said done (the checks of its repair phase then say nothing of the wait).
    """
    checker = Measurer(job.model, job.tokenizer, Settings(max_new_tokens=opts.train.check_tokens,
                                                          batch_size=opts.gen_batch_size, likelihood=False))
    if openings and any(text for text, _ in openings):
        # OPENINGS: per forget row, the original's answer and its token ids (or None): the first check's drafts
        checker.drafts[forget.name] = [text for text, _ in openings]
        checker.draft_ids[forget.name] = [(text, ids) if ids is not None else None for text, ids in openings]
    wanted = opts.train.stop_probes
    asked = EvalSet("probes", "retain", [e for s in probe_sets for e in s.examples])
    waits = bool(wanted and asked.examples)  # the probes' own measurer (make_probes) answers them
    if wanted and not waits:  # as --protect and --retain-follows-margin say when they have nothing to act on
        job.note(f"--stop-probes {wanted:g}: no probe could be measured; the stop rule waits for none (it changes "
                 f"nothing in this run)", log)
    first_forgotten = next((r["step"] for r in history
                            if r.get("forget_leak") is not None and r["forget_leak"] <= opts.train.stop_leak), None)
    last_kept = None  # the probes' share at their last check

    def forgotten():
        nonlocal first_forgotten, last_kept, fired
        # --leaked-rows trains on the leaking rows a check finds: a check cut at its verdict finds the rows that
        # leaked before the other generation thread reached it (cpu_parts), so two identical runs trained on
        # different rows; answered whole, every row stops at its own leak, whatever the threads do.
        leak = leak_rate(checker, forget, decided_above=None if opts.train.leaked_rows else opts.train.stop_leak)
        done = leak <= opts.train.stop_leak
        if done and waits:
            step = steps()
            first_forgotten = first_forgotten or step
            if step < 2 * first_forgotten:
                kept = last_kept = kept_rate(job.probe_after, asked, enough=wanted)
                done = kept >= wanted
                log(f"step {step}: the probes keep {'≥ ' if done and kept < 1 else ''}{kept:.2f} of their answers "
                    f"(a stop condition: --stop-probes {wanted:g}; waiting at most until step {2 * first_forgotten})")
            elif not fired:  # the probes were read at step first_forgotten at least, and never reached it (the
                # rule would have fired then); once it has, a repair phase's checks come here too, and say nothing
                last = f"; {last_kept:.2f} at their last check" if last_kept is not None else ""
                took = f"{first_forgotten} step{'s' * (first_forgotten != 1)}"
                job.note(f"step {step}: the probes did not reach --stop-probes {wanted:g} by step "
                         f"{2 * first_forgotten} (twice the {took} forgetting took{last}): the forget check alone "
                         f"decides", log)
        fired = fired or done
        return done, leak

    def leaked_answers() -> list[dict]:
        """The last check's leaking forget rows that have answers: the prompt, the greedy answer cut
        after the answer's first occurrence (its draft: the answer ended where it leaked), the answers."""
        drafts = checker.drafts.get(forget.name) or []
        leaked = []
        for i in checker.deciders.get(forget.name, []):
            answers, _ = row_answers(forget.examples[i])
            response = through_first_answer(drafts[i], answers) if answers and i < len(drafts) else None
            if response:
                leaked.append({"prompt": forget.examples[i].prompt, "response": response, "answers": answers})
        return leaked

    check = distributed.main_decides(forgotten)  # every rank generates; rank 0's verdict holds for all
    check.leaked_answers = distributed.main_decides(leaked_answers)
    return check


def _resume_command(opts: RunOptions, output: Path) -> str:
    command = opts.command or "unlearn run ..."
    if not opts.output:
        command += f" -o {shlex.quote(str(output))}"
    if "--resume" not in command.split():
        command += " --resume"
    if distributed.world().active:  # the launcher's own arguments are not ours to know
        command = "torchrun <the same launcher arguments> -m " + command
    return command


# --- choose α ---------------------------------------------------------------------------------


def choose_alpha(opts: RunOptions, job: Loaded, sets: list[EvalSet], before: Measurement, log):
    """Apply --alpha (θa = α·θ + (1−α)·θ'); with auto, measure the grid and apply `averaging.recommend`.

    Returns the averager (None without averaging) and, for auto, the selection report,
    which carries the chosen α's measurements for the "after" table.
    """
    from unlearn.averaging import ModelAverage

    if opts.alpha is None:
        return None, None
    averager = ModelAverage(job.model, job.reference_model)
    selection = None
    if opts.alpha == "auto":
        # Every rank measures (FSDP's forwards need them all); rank 0's choice holds for all.
        selection = distributed.main_decides(_measure_grid)(opts, job, averager, selection_sets(sets), before, log)
        alpha = selection["recommended_alpha"]
    else:
        alpha = opts.alpha
    averager.apply(alpha)
    from unlearn.averaging import alpha_label

    log(f"parameter averaging: α={alpha_label(alpha)}" + (f" ({selection['reason']})" if selection else ""))
    return averager, selection


def selection_sets(sets: list[EvalSet]) -> list[EvalSet]:
    """What --alpha auto decides on: the forget prompts and the held-back normal rows, never --eval-* files.

    The --eval-* files are what the table reports; choosing α on them would make the
    printed figures a selection criterion. Without held-back normal rows, the trained ones.
    """
    heldout = [s for s in sets if s.name == "normal-heldout"]
    return [sets[0]] + (heldout or [s for s in sets if s.name == "normal"])


def _measure_grid(opts: RunOptions, job: Loaded, averager, sets: list[EvalSet], before: Measurement, log) -> dict:
    from unlearn.averaging import alpha_label, recommend, report, score
    from unlearn.tables import table_markdown

    t = time.perf_counter()
    kinds = {s.name: s.kind for s in sets}
    per_alpha, measured, scores = {}, {}, []
    for alpha in opts.alpha_grid:
        averager.apply(alpha)
        label = alpha_label(alpha)
        measured[alpha] = job.measurer.measure(sets, _outputs(before), label=f"α={label}")
        per_alpha[label] = {name: m.summary for name, m in measured[alpha].items()}
        scores.append(score(alpha, per_alpha[label], kinds))
        last = scores[-1]
        log(f"α={label}: forget leak {last.forget_leak:.2f}, retain score "
            f"{last.retain_score if last.retain_score is not None else float('nan'):.2f}")
    chosen, reason = recommend(scores, opts.max_leak)
    log(table_markdown(scores, chosen, reason).rstrip())
    selection = report(scores, chosen, reason, opts.max_leak)
    selection["sets"] = per_alpha
    selection["selection_sets"] = [s.name for s in sets]
    selection["measured"], selection["seconds"] = measured[chosen], time.perf_counter() - t
    return selection


# --- write ------------------------------------------------------------------------------------


def write(opts: RunOptions, job: Loaded, data: Prepared, before: Measurement, after: Measurement, result,
          averager, selection, started: float, log) -> dict:
    """run.json, the adapter and the merged model (θ' too when averaged), written whole or not at all."""
    record = _record(opts, job, data, before, after, result, averager, selection)
    output_abs = data.output.resolve()
    # With checkpoints in OUTPUT (which is ours: checked empty or --force at the start) the
    # finished result replaces the directory, checkpoints included.
    replace_existing = opts.force or checkpoint_root(data.output).is_dir()
    trained = _gather_trained(job.model, averager)  # FSDP: the weights, whole, on rank 0 (every rank takes part)

    def write_on_main() -> dict:
        from safetensors import SafetensorError

        from unlearn.paths import remember_last_run

        model, model_averager = job.model, averager
        if trained is not None:  # FSDP: write an unsharded copy, not the shards
            model, model_averager = _unsharded(opts, trained, averager)
        try:
            _write_outputs(opts, record, model, job.tokenizer, data.output, output_abs, replace_existing, started,
                           job.device, averager=model_averager,
                           augmented=job.train_rows if job.augment_stats else None, update=result.update,
                           probe_rows=data.probes["rows"] if data.probes is not None else None, log=log)
        except (OSError, SafetensorError) as exc:  # safetensors says a full disk with its own error
            root = checkpoint_root(data.output)
            kept = f"; the checkpoints in {root} are kept" if root.is_dir() else ""
            why = getattr(exc, "strerror", None) or exc
            raise UnlearnError(f"{data.output}: could not write the output ({why}); "
                               f"nothing was written{kept}") from None
        unrecorded = remember_last_run(data.output)
        if unrecorded:
            log(f"unlearn: warning: {unrecorded}")
        return record

    return distributed.on_main(write_on_main)  # every rank returns rank 0's completed record


def _method_config(opts: RunOptions, job: Loaded, result) -> dict:
    """run.json's settings of the method that ran. An edit runs no training loop, so it records its own
    (`EditSettings`, its layers resolved), not the loop's defaults, which it refuses at any value (review 116: it
    read lr 0.001 and normal_weight 10 where the edit weighed the normal text by 1e4). rmu adds what it resolved
    (`_rmu_record`)."""
    if opts.train.method == "edit":
        return {"method": "edit", "seed": opts.train.seed, "edit": result.history[0]["settings"]}
    return {**opts.train.as_dict(), **(job.rmu or {}),
            "repair_steps": "auto" if opts.train.repair_steps is None else opts.train.repair_steps}


def _rmu_record(misdirection) -> dict:
    """rmu as trained: its layer (--rmu-layer, or the default `rmu.Misdirection` picked: not null in run.json), the
    target's norm c = --rmu-scale x the original's mean norm of h_l on the normal rows, and the layers trained."""
    return {"rmu_layer": misdirection.layer, "rmu_target_norm": float(misdirection.target.norm()),
            "rmu_mean_norm": misdirection.norm, "rmu_trained_layers": misdirection.trained}


def _record(opts: RunOptions, job: Loaded, data: Prepared, before: Measurement, after: Measurement, result,
            averager, selection) -> dict:
    """What run.json holds: the resolved configuration, data hashes, versions, metrics and timings."""
    files = [("forget", opts.forget, len(data.forget), {}), ("normal", opts.normal, len(data.normal), {})]
    files += [("retain" if len(opts.retain) == 1 else f"retain[{i}]", p, n, {})
              for i, (p, n) in enumerate(zip(opts.retain, _rows_per_file(opts.retain)), start=1)]
    # an --eval-* file's set by the option that gave it: two of the same name are X and X' (read_eval_sets)
    flag = {"forget": "--eval-forget", "retain": "--eval-retain"}
    files += [(s.name, s.path, len(s.examples), {} if s.name == "normal-heldout" else {"option": flag[s.kind]})
              for s in data.sets if s.name not in ("forget", "normal", "retain") and s.path is not None]
    if opts.augmented:
        files.append(("augmented", opts.augmented, len(job.train_rows), {}))
    return {
        "command": "run",
        "base_model": str(Path(job.loaded.path).resolve()),
        "model_name": job.loaded.name,
        "method": opts.train.method,
        "method_reason": opts.method_reason,  # None: --method given, or ga for a forget set of another kind
        # options given that the rows' method does not read (RunOptions.notes), then those that change nothing in
        # this run (Loaded.notes: found once the rows and the model were loaded)
        "notes": list(opts.notes) + job.notes,
        # how every prompt was rendered (the chat template, or data.FALLBACK_PROMPT without one)
        "prompt_format": render_prompt(job.tokenizer, "{prompt}"),
        "full": opts.full,
        "seed": opts.train.seed,
        # (repair_steps: None is auto in the training config, which read as "not set" here: review 111)
        "config": {**_method_config(opts, job, result), "dtype": opts.dtype, "full": opts.full,
                   "lora": _lora_record(opts) if opts.adapters else None,
                   "judge": job.measurer.judge.name, "max_new_tokens": opts.max_new_tokens,
                   "eval_limit": opts.eval_limit},
        # rows: FORGET's, each --retain file's and --augmented's rows; NORMAL's rows trained on (the held-back ones
        # are the normal-heldout set's n); an --eval-* file's rows measured (--eval-limit may cut them)
        "data": {name: {"path": str(Path(p).resolve()), "sha256": system.file_sha256(p), "rows": n, **more}
                 for name, p, n, more in files},
        "versions": system.package_versions(),
        "device": system.device_name(job.device),
        "autocast": job.autocast,  # the training passes' precision, --autocast resolved: "bf16" or "off"
        "distributed": distributed.world().describe(),
        "judge": job.measurer.judge.name,
        "steps": result.steps,
        "stopped_by": result.stopped_by,
        "repair": repair_record(result),
        # --extra-steps once the stop rule fired: {"asked", "run"}, "run" fewer where --max-steps came first
        "extra_steps": result.extra_steps,
        # The stop rule's leaked greedy answers that joined the forget rows (train.Unlearner.add_leaked_answers)
        "forget_rows_added": result.added_forget_rows,
        # Loading (Loaded.load_seconds says what it covers); with training, the stop rule's checks,
        # evaluation and ULMR's rewrites, what wall_clock_s leaves is reading the data and writing OUTPUT.
        "load_seconds": round(job.load_seconds, 3),
        "augment_seconds": round(job.augment_seconds, 3) if job.augment_stats else None,  # None: none made here
        # After --resume: the checkpoint continued; train_seconds and stop_rule_seconds then count every
        # process since the first start, wall_clock_s this one only (tables._wall_clock_parts says so).
        "resumed_from": str(data.resume_from) if data.resume_from is not None else None,
        "train_seconds": round(result.seconds, 3),
        # The stop rule's checks: generation between steps, counted in neither training nor evaluation.
        "stop_rule_seconds": round(result.check_seconds, 3),
        # The probes' building and original answers count as evaluation too (make_probes).
        "eval_seconds": round(before.seconds + after.seconds + (data.probes or {}).get("before_seconds", 0.0), 3),
        # The original model's sets read back from $UNLEARN_CACHE instead of measured (--no-cache: none);
        # the probe sets are counted apart: "probes" says whether the probes and the original's answers to
        # them were read back ("built"), and how many probe sets the unlearned model's answers were read
        # back for ("after_sets").
        "eval_reused": {"before_sets": before.reused, "after_sets": after.reused,
                        "of": len(before.sets) - len(job.probe_names), "cache": not opts.no_cache,
                        "probes": {"built": job.probes_reused,
                                   "after_sets": job.probe_after.reused if job.probe_after is not None else 0}},
        "tokens_per_s": round(result.tokens_per_s, 1),
        "alpha": averager.alpha if averager is not None else None,
        "alpha_selection": selection,  # the table, the reason, and every set's metrics at each α
        "augment": (job.augment_stats.as_dict() if job.augment_stats else
                    {"file": str(Path(opts.augmented).resolve()), "rows": len(job.train_rows)})
        if opts.train.method == "ulmr" else None,
        # The measured forget rows the original model does not answer (lines): nothing to forget there.
        "forget_rows_unanswered_before": unanswered_forget_rows(before, data.sets[0]),
        # ... among the first this many forget rows (--eval-limit: fewer than "data.forget.rows"; the rest unknown)
        "forget_rows_measured_before": len(data.sets[0].examples),
        # What the forget loss and the leak judge look for in each forget row (spans.py).
        "forget_answers": describe_spans(data.forget, whole_passage=opts.train.whole_passage, forget_tokens=(
            "response" if opts.train.method == "ulmr" else opts.train.forget_tokens)),
        # Which rows were trained on, and which figures are a stop condition (never a result).
        "roles": {s.name: s.role for s in data.sets},
        # The automatic probes (probes.py): how many were made and kept per set; the rows are in probes.jsonl.
        "probes": ({"file": None, "sets": data.probes["sets"], "seconds": round(job.probe_seconds, 3),
                    "max_per_set": opts.probe_limit, "answer_tokens": probes_answer_tokens(),
                    "retained": data.probes["retained"], "edit_preserves": data.probes["edit_preserves"],
                    # measured topic probes (a harmful request's: kept only without a refusal, probes.keep_answered)
                    "topic_probes": data.probes["topic_probes"],
                    # general-knowledge anchors (anchors.py): made, and trained on (the retain KL; never measured)
                    "anchors": data.probes["anchors"]}
                   if data.probes is not None else None),
        "before": {name: m.summary for name, m in before.sets.items()},
        "after": {name: m.summary for name, m in after.sets.items()},
        "history": result.history,
    }


def repair_record(result) -> dict | None:
    """The repair phase (repair.py) in run.json, when it began: the step after which the stop rule first found
    nothing leaking, the first step whose check could end the run, and how its steps trained (counted from the
    history: a repair step's record says keep_terms_only)."""
    if not result.repair:
        return None
    steps = [r for r in result.history if r["step"] > result.repair["first_forgotten"]]
    kept = sum(1 for r in steps if r.get("keep_terms_only"))
    return {"first_forgotten": result.repair["first_forgotten"], "end": result.repair["end"],
            "keep_terms_only_steps": kept, "whole_loss_steps": len(steps) - kept,
            "finished": result.repair["finished"]}  # False: --max-steps came first


def probes_answer_tokens() -> int:
    from unlearn.probes import ANSWER_TOKENS

    return ANSWER_TOKENS


def _rows_per_file(paths) -> list[int]:
    return [len(read_examples(p)) for p in paths]


def _gather_trained(model, averager) -> dict | None:
    """Under FSDP, the fine-tuned (pre-averaging) trainable weights gathered whole on rank 0; else None."""
    if not distributed.world().fsdp:
        return None
    chosen = averager.alpha if averager is not None else None
    if averager is not None:
        averager.apply(0.0)  # theta', so that rank 0's copy can be averaged (and the tuned adapter written)
    trained = distributed.trained_weights(model)
    if averager is not None:
        averager.apply(chosen)
    return {"weights": trained, "alpha": chosen}


def _unsharded(opts: RunOptions, trained: dict, averager):
    """Rank 0 under FSDP: the base model again, on the CPU, with the gathered fine-tuned weights (and averager)."""
    from unlearn.averaging import ModelAverage
    from unlearn.log import quiet
    from unlearn.lora import attach_lora

    def base():
        return models.load_model(opts.model, dtype=opts.dtype, trust_remote_code=opts.trust_remote_code,
                                 allow_pickle=opts.allow_pickle, log=quiet).model

    copy = base()
    if opts.adapters:
        attach_lora(copy, opts.lora, seed=opts.train.seed, attention_if_fused=not opts.lora_targets_given())
    unexpected = copy.load_state_dict(trained["weights"], strict=False).unexpected_keys
    if unexpected:
        raise UnlearnError(f"internal: gathered weights do not fit the model (e.g. {unexpected[0]})")
    copy_averager = None
    if averager is not None:
        copy_averager = ModelAverage(copy, base() if opts.full else None)
        copy_averager.apply(trained["alpha"])
    return copy, copy_averager


def _write_outputs(opts, record, model, tokenizer, output, output_abs, replace_existing, started, device, *,
                   averager=None, augmented=None, update=None, probe_rows=None, log=default_log) -> None:
    from unlearn.lora import merge_lora, save_adapter, save_factors
    from unlearn.outputs import atomic_output_dir, write_jsonl

    with atomic_output_dir(output, force=replace_existing) as tmp:
        if averager is not None:
            # θ' before averaging, so that `unlearn merge --alpha` can pick another α later.
            chosen = averager.alpha
            averager.apply(0.0)
            if opts.full:
                models.save_model(model, tokenizer, tmp / "tuned-model")
                record["tuned_model"] = str(output_abs / "tuned-model")
            else:
                save_adapter(model, opts.lora, tmp / "tuned-adapter", base_model=record["base_model"])
                record["tuned_adapter"] = str(output_abs / "tuned-adapter")
            averager.apply(chosen)
        if augmented is not None:
            write_jsonl(tmp / "augmented.jsonl", [{"prompt": e.prompt, "response": e.response, **e.extra}
                                                  for e in augmented])
            record["augmented"] = str(output_abs / "augmented.jsonl")
        if probe_rows:  # every probe with the original's answer, its answer words, or why it was dropped
            write_jsonl(tmp / "probes.jsonl", probe_rows)
            record["probes"]["file"] = str(output_abs / "probes.jsonl")
        if record["alpha_selection"] is not None:  # --alpha auto
            from unlearn.tables import write_tables

            write_tables(tmp, record["alpha_selection"], log=log)
        if opts.adapters:
            save_adapter(model, opts.lora, tmp / "adapter", base_model=record["base_model"])
            merge_lora(model)
        elif update:  # --method edit: its update, loadable with peft or `unlearn merge --adapter`
            save_factors(update, tmp / "adapter", base_model=record["base_model"])
        models.save_model(model, tokenizer, tmp / "model")
        record.update({
            "output": str(output_abs),
            "adapter": str(output_abs / "adapter") if opts.adapters or update else None,
            "merged_model": str(output_abs / "model"),
            "peak_memory_mb": round(system.peak_memory_mb(device), 1),  # this process's (rank 0's under torchrun)
            "wall_clock_s": round(time.perf_counter() - started, 3),
        })
        # the characters themselves, not \uXXXX escapes: a Chinese row's derived answers must be readable there
        (tmp / "run.json").write_text(json.dumps(json_safe(record), indent=2, default=str, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
