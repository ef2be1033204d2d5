"""Benchmark `unlearn merge` on two ~2 GB float32 checkpoints, against plain I/O and mergekit.

    .venv/bin/python bench/merge_bench.py [--size-gb 2] [--json] [--mergekit-venv DIR | --skip-mergekit]

What it measures, all in one run, every command once as a warm-up first so
that both sides read from a warm page cache (dropping it needs root and a
quiet machine, which a benchmark cannot assume):

- start-up: wall time of the same merge on a tiny checkpoint (Python, torch
  and click imports; the part no streaming can speed up);
- merge work: wall time of the real merge minus start-up;
- plain I/O: `cp -r BASE` plus reading every TUNED shard once, the least any
  merge must do; work ÷ plain I/O is the overhead of our arithmetic and
  writing (target ≤ 2.5);
- peak RssAnon: anonymous memory of the merge process tree, sampled from
  /proc every 20 ms (target ≤ 2 × largest tensor + 400 MB); page cache and
  memory-mapped files are not anonymous, so this is what the merge allocates;
- the same for mergekit's linear merge, installed into a throwaway venv
  (torch==2.13.0 first so that pip does not pick another torch, then mergekit).

Not run by the test suite: it needs ~12 GB of disk and a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
SHARD_BYTES = 500_000_000
MB = 1 << 20


# -- checkpoints ------------------------------------------------------------------


def llama_config(hidden: int, intermediate: int, layers: int, vocab: int) -> dict:
    """A real Llama config, so that mergekit recognises the architecture."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 16,
            "num_key_value_heads": 16, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32"}


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, m, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{n}_proj.weight": (h, h) for n in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                       p + "mlp.down_proj.weight": (h, m)})
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def write_checkpoint(path: Path, config: dict, seed: int) -> None:
    """Random float32 weights in ~500 MB shards with an index, one shard in memory at a time."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)
    groups, size = [[]], 0
    for name, shape in tensor_shapes(config).items():
        nbytes = 4 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in group}
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        total += sum(t.numel() * 4 for t in shard.values())
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def layers_for(size_gb: float, hidden: int, intermediate: int, vocab: int) -> int:
    per_layer = 4 * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden)
    fixed = 4 * 2 * vocab * hidden
    return max(1, round((size_gb * 1e9 - fixed) / per_layer))


# -- measuring ------------------------------------------------------------------------


def tree_rss_anon(pid: int) -> int:
    """RssAnon in bytes of PID and all its descendants (mergekit may fork workers)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def timed(cmd: list[str], env: dict | None = None, sample: bool = False) -> tuple[float, int]:
    """Wall seconds of CMD and, when SAMPLE, its peak tree RssAnon (bytes); fails loudly on error."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    if sample:
        stop = threading.Event()

        def poll():
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, tree_rss_anon(proc.pid))
                time.sleep(0.02)
        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
    _, err = proc.communicate()
    elapsed = time.perf_counter() - start
    if sample:
        stop.set()
        thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return elapsed, peak


def measure(make_cmd, out: Path, env=None, sample=False) -> tuple[float, int]:
    """One warm-up run, then one measured run; the output is removed before each, untimed."""
    for attempt in range(2):
        shutil.rmtree(out, ignore_errors=True)
        result = timed(make_cmd(), env, sample)
    shutil.rmtree(out, ignore_errors=True)
    return result


def startup(make_cmd, out: Path, env=None, runs: int = 3) -> float:
    """Median wall time on the tiny checkpoint, after a warm-up."""
    times = []
    for _ in range(runs + 1):
        shutil.rmtree(out, ignore_errors=True)
        times.append(timed(make_cmd(), env)[0])
    shutil.rmtree(out, ignore_errors=True)
    return sorted(times[1:])[runs // 2]


# -- the contenders ----------------------------------------------------------------------


def unlearn_cmd(base: Path, tuned: Path, out: Path, alpha: float):
    return lambda: [sys.executable, "-m", "unlearn", "merge", "--alpha", str(alpha), str(base), str(tuned),
                    "-o", str(out)]


def plain_io_cmd(base: Path, tuned: Path, out: Path):
    shards = " ".join(f"'{p}'" for p in sorted(tuned.glob("*.safetensors")))
    return lambda: ["sh", "-c", f"cp -r '{base}' '{out}' && cat {shards} > /dev/null"]


def mergekit_venv(requested: Path | None, work: Path) -> tuple[Path | None, str]:
    """A venv with mergekit: REQUESTED if it already has one, else a fresh one (torch first)."""
    venv = requested or work / "mergekit-venv"
    if (venv / "bin" / "mergekit-yaml").exists():
        return venv, "reused"
    print(f"installing mergekit into {venv} (torch==2.13.0 first) ...", file=sys.stderr)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0"],
             [str(venv / "bin" / "pip"), "install", "-q", "mergekit"]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return None, f"install failed at `{' '.join(step[-2:])}`: {' | '.join(tail)}"
    return venv, "installed"


def mergekit_cmd(venv: Path, base: Path, tuned: Path, out: Path, alpha: float, work: Path):
    config = work / f"mergekit-{base.name}.yml"
    config.write_text(
        "merge_method: linear\n"
        "dtype: float32\n"
        "models:\n"
        f"  - model: {base}\n    parameters:\n      weight: {alpha}\n"
        f"  - model: {tuned}\n    parameters:\n      weight: {1 - alpha}\n")
    return lambda: [str(venv / "bin" / "mergekit-yaml"), str(config), str(out), "--no-cuda", "--quiet"]


# -- the run -------------------------------------------------------------------------------


def check_disk(work: Path, size_gb: float) -> None:
    print(subprocess.run(["df", "-h", str(work)], capture_output=True, text=True).stdout, file=sys.stderr)
    need = 6 * size_gb * 1e9  # two inputs, and at most two outputs at once, plus margin
    free = shutil.disk_usage(work).free
    if free < need:
        sys.exit(f"merge_bench: {work} has {free / 1e9:.1f} GB free, needs {need / 1e9:.0f} GB")


def spot_check(base: Path, tuned: Path, out: Path, alpha: float) -> None:
    """The measured merge must be right: compare the last shard's tensors with torch."""
    for file in sorted(out.glob("*.safetensors"))[-1:]:
        merged = load_file(out / file.name)
        b_index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
        t_index = json.loads((tuned / "model.safetensors.index.json").read_text())["weight_map"]
        for name, value in merged.items():
            b = _one(base / b_index[name], name)
            t = _one(tuned / t_index[name], name)
            assert torch.allclose(value, alpha * b + (1 - alpha) * t, rtol=1e-6, atol=0), name


def _one(file: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return f.get_tensor(name).clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="size of each checkpoint")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir in /tmp)")
    parser.add_argument("--mergekit-venv", type=Path, default=None,
                        help="reuse this venv if it has mergekit, else install there (kept)")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--json", action="store_true", help="print a final JSON line")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.workdir))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        check_disk(work, args.size_gb)
        hidden, inter, vocab = 2048, 5632, 32000
        big = llama_config(hidden, inter, layers_for(args.size_gb, hidden, inter, vocab), vocab)
        tiny = llama_config(64, 128, 1, 128)
        print(f"building checkpoints ({big['num_hidden_layers']} layers) in {work} ...", file=sys.stderr)
        for name, config, seed in [("base", big, 1), ("tuned", big, 2), ("tiny-base", tiny, 3), ("tiny-tuned", tiny, 4)]:
            write_checkpoint(work / name, config, seed)
        base, tuned, out = work / "base", work / "tuned", work / "out"
        largest = max(4 * torch.Size(s).numel() for s in tensor_shapes(big).values())
        total = sum(4 * torch.Size(s).numel() for s in tensor_shapes(big).values())
        a = args.alpha

        print("plain I/O ...", file=sys.stderr)
        plain, _ = measure(plain_io_cmd(base, tuned, out), out)
        print("unlearn merge ...", file=sys.stderr)
        ours_start = startup(unlearn_cmd(work / "tiny-base", work / "tiny-tuned", out, a), out, env)
        shutil.rmtree(out, ignore_errors=True)
        timed(unlearn_cmd(base, tuned, out, a)(), env)  # warm-up, kept for the spot check
        spot_check(base, tuned, out, a)
        ours_wall, ours_rss = measure(unlearn_cmd(base, tuned, out, a), out, env, sample=True)
        ours = {"startup_s": ours_start, "wall_s": ours_wall, "work_s": ours_wall - ours_start,
                "peak_rss_anon_mb": ours_rss / MB}

        theirs, note = None, "skipped (--skip-mergekit)"
        if not args.skip_mergekit:
            venv, note = mergekit_venv(args.mergekit_venv, work)
            if venv is not None:
                print("mergekit ...", file=sys.stderr)
                try:
                    mk_start = startup(mergekit_cmd(venv, work / "tiny-base", work / "tiny-tuned", out, a, work), out)
                    mk_wall, mk_rss = measure(mergekit_cmd(venv, base, tuned, out, a, work), out, sample=True)
                    theirs = {"startup_s": mk_start, "wall_s": mk_wall, "work_s": mk_wall - mk_start,
                              "peak_rss_anon_mb": mk_rss / MB}
                except RuntimeError as exc:
                    note = f"run failed: {str(exc).splitlines()[0]}"
        report(args, total, largest, plain, ours, theirs, note)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def report(args, total, largest, plain, ours, theirs, note) -> None:
    rss_target = (2 * largest) / MB + 400
    ratio = ours["work_s"] / plain
    rows = [("checkpoint size (GB, each)", f"{total / 1e9:.2f}", ""),
            ("largest tensor (MB)", f"{largest / MB:.0f}", ""),
            ("plain I/O: cp -r BASE + read TUNED (s)", f"{plain:.2f}", ""),
            ("start-up (s)", f"{ours['startup_s']:.2f}", _fmt(theirs, "startup_s", "{:.2f}")),
            ("wall time (s)", f"{ours['wall_s']:.2f}", _fmt(theirs, "wall_s", "{:.2f}")),
            ("merge work = wall - start-up (s)", f"{ours['work_s']:.2f}", _fmt(theirs, "work_s", "{:.2f}")),
            ("work / plain I/O   (target <= 2.5)", f"{ratio:.2f}",
             f"{theirs['work_s'] / plain:.2f}" if theirs else ""),
            (f"peak RssAnon (MB)  (target <= {rss_target:.0f})", f"{ours['peak_rss_anon_mb']:.0f}",
             _fmt(theirs, "peak_rss_anon_mb", "{:.0f}"))]
    speedup = theirs["wall_s"] / ours["wall_s"] if theirs else None
    work_speedup = theirs["work_s"] / ours["work_s"] if theirs else None
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'unlearn':>10}  {'mergekit':>10}")
    for label, mine, other in rows:
        print(f"{label:<{width}}  {mine:>10}  {other:>10}")
    if speedup:
        print(f"{'mergekit / unlearn, wall (target >= 2)':<{width}}  {speedup:>10.2f}")
        print(f"{'mergekit / unlearn, work':<{width}}  {work_speedup:>10.2f}")
    print(f"mergekit: {note}")
    if args.json:
        print(json.dumps({"size_bytes": total, "largest_tensor_bytes": largest, "plain_io_s": round(plain, 3),
                          "unlearn": _rounded(ours), "work_over_plain_io": round(ratio, 3),
                          "rss_target_mb": round(rss_target), "mergekit": _rounded(theirs) if theirs else None,
                          "mergekit_note": note,
                          "speedup_wall": round(speedup, 3) if speedup else None,
                          "speedup_work": round(work_speedup, 3) if work_speedup else None}))


def _fmt(d, key, fmt):
    return fmt.format(d[key]) if d else "n/a"


def _rounded(d):
    return {k: round(v, 3) for k, v in d.items()}


if __name__ == "__main__":
    main()
