"""Streaming merge vs in-memory merge (vs mergekit): wall time and peak RSS, side by side, with floors.

Four random checkpoints of BERT-base size (``BertConfig()`` defaults, 110M parameters, float32, saved with
``save_pretrained(max_shard_size="200MB")``) and a base are created once in ``--workdir`` (reused when present).
Each contender then merges the four into the base, as its own whole subprocess so that its peak RSS
(``os.wait4``'s ``ru_maxrss`` for exactly that child) is its own:

* ``hf_atm``      ``python -m hf_atm merge ...`` (the streaming engine, as a user runs it);
* ``in_memory``   loads every state dict with ``safetensors.torch.load_file`` and merges per tensor with
                  ``peft.utils.merge_utils`` (``ties`` / ``task_arithmetic``), then saves sharded;
* ``mergekit``    ``mergekit-yaml`` from ``--mergekit-python``'s environment, when given and importable there;
* floors: ``read``    a process that only reads every input shard file fully (the I/O floor);
          ``import``  a process that only imports torch and safetensors (the interpreter's own RSS).

Every contender runs once to warm the page cache, then ``--repeats`` times; medians are reported. Targets:
peak RSS of the streaming merge <= 1.3 x one checkpoint + the import floor's RSS; streaming TIES faster than
the in-memory baseline; streaming task_arithmetic within 2x the read floor.

    python benchmarks/merge_bench.py [--repeats 3] [--workdir DIR] [--methods ties task_arithmetic]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_MODELS = 4

MAKE_CHECKPOINTS = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from transformers import BertConfig, BertModel
    work, n = Path(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(work / "base", max_shard_size="200MB")
    gen = torch.Generator().manual_seed(1)
    for i in range(n):
        sd = {k: (v + 0.01 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v
              for k, v in base.items()}
        model.load_state_dict(sd)
        model.save_pretrained(work / f"model_{i}", max_shard_size="200MB")
        (work / f"model_{i}" / ".complete").touch()
    (work / "base" / ".complete").touch()
    """
)

IN_MEMORY = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from safetensors.torch import load_file
    from huggingface_hub import save_torch_state_dict
    from peft.utils import merge_utils
    torch.set_num_threads(int(sys.argv[5]))
    method, density, out = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
    folders = [Path(p) for p in sys.argv[4].split(",")]
    def load(folder):
        sd = {}
        for f in sorted(folder.glob("*.safetensors")):
            sd.update(load_file(f))
        return sd
    out.mkdir(parents=True, exist_ok=True)
    base, models = load(folders[0]), [load(f) for f in folders[1:]]
    weights = torch.ones(len(models))
    merged = {}
    for name, b in base.items():
        if not b.is_floating_point():
            merged[name] = b
            continue
        taus = [m[name].float() - b.float() for m in models]
        if method == "ties":
            delta = merge_utils.ties(taus, weights, density, "total")
        else:
            delta = merge_utils.task_arithmetic(taus, weights)
        merged[name] = (b.float() + delta).to(b.dtype)
    save_torch_state_dict(merged, out, max_shard_size="200MB")
    """
)

READ_FLOOR = textwrap.dedent(
    """
    import sys
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    total = 0
    for path in sys.argv[1:]:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    print(total)
    """
)

IMPORT_FLOOR = "import torch, safetensors, safetensors.torch"


class ChildFailed(RuntimeError):
    """A contender exited non-zero; the message ends with the tail of its log."""


def run_child(argv: list[str], log: Path, env: dict | None = None) -> tuple[float, int, float]:
    """Run `argv` to completion; return (wall seconds, peak RSS bytes, CPU seconds) of exactly that process."""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise ChildFailed(f"{log.name}: exit status {proc.returncode} (see {log}): {tail[0][:300]}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime  # Linux: ru_maxrss in kilobytes


def ensure_checkpoints(work: Path) -> tuple[Path, list[Path]]:
    base = work / "base"
    models = [work / f"model_{i}" for i in range(N_MODELS)]
    if not all((p / ".complete").exists() for p in [base, *models]):
        print(f"creating {N_MODELS} BERT-base checkpoints + a base in {work} (once) ...", flush=True)
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", MAKE_CHECKPOINTS, str(work), str(N_MODELS)], check=True)
    return base, models


def dir_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def mergekit_command(python: str, method: str, density: float, base: Path, models: list[Path], out: Path,
                     work: Path) -> list[str] | None:
    """The mergekit-yaml command for this merge, or None when mergekit is not importable from `python`."""
    probe = subprocess.run([python, "-c", "import mergekit"], capture_output=True)
    if probe.returncode != 0:
        return None
    params = f"{{density: {density}, weight: 1.0}}" if method == "ties" else "{weight: 1.0}"
    lines = [f"merge_method: {method}", f"base_model: {base}", "dtype: float32", "parameters: {normalize: false}",
             "models:"]
    lines += [f"  - model: {m}\n    parameters: {params}" for m in models]
    cfg = work / f"mergekit_{method}.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    script = Path(python).with_name("mergekit-yaml")
    runner = [str(script)] if script.exists() else [python, "-m", "mergekit.scripts.run_yaml"]
    return [*runner, str(cfg), str(out), "--allow-crimes", "--out-shard-size", "200M"]


def fmt_mb(b: float) -> str:
    return f"{b / 1e6:,.0f} MB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per contender after one warm-up")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hf_atm_merge_bench")
    ap.add_argument("--methods", nargs="+", default=["ties", "task_arithmetic"], choices=["ties", "task_arithmetic"])
    ap.add_argument("--density", type=float, default=0.2, help="TIES density")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads of each child")
    ap.add_argument("--mergekit-python", help="python of an environment where mergekit is installed")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"],
                    help="OMP_WAIT_POLICY of every child (default PASSIVE, as hf-atm itself uses)")
    args = ap.parse_args(argv)

    work = args.workdir.resolve()
    base, models = ensure_checkpoints(work)
    inputs = [p for d in [base, *models] for p in sorted(d.glob("*.safetensors"))]
    ckpt = dir_bytes(base)
    # Every child gets the same OpenMP settings (hf-atm would default to a passive wait policy by itself;
    # spinning workers distort timings badly on a shared machine, see hf_atm/cli.py).
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads),
               OMP_WAIT_POLICY=args.omp_wait_policy,
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    py = sys.executable

    # (method, contender, argv); floors first. Round-robin repeats: load from other processes on a shared
    # machine then hits every contender alike, and each contender's previous run leaves the same page cache.
    jobs: list[tuple[str, str, list[str]]] = [
        ("floor", "read", [py, "-c", READ_FLOOR, *map(str, inputs)]),
        ("floor", "import", [py, "-c", IMPORT_FLOOR]),
    ]
    notes = []
    for method in args.methods:
        cli = [py, "-m", "hf_atm", "merge", "--base", str(base), "--models", *map(str, models), "--method", method,
               "--output", str(work / f"out_hf_atm_{method}"), "--overwrite", "--no-progress",
               "--max-shard-size", "200MB"]
        if method == "ties":
            cli += ["--density", str(args.density)]
        jobs.append((method, "hf_atm", cli))
        folders = ",".join(map(str, [base, *models]))
        jobs.append((method, "in_memory", [py, "-c", IN_MEMORY, method, str(args.density),
                                           str(work / f"out_mem_{method}"), folders, str(args.threads)]))
        if args.mergekit_python:
            cmd = mergekit_command(args.mergekit_python, method, args.density, base, models,
                                   work / f"out_mergekit_{method}", work)
            if cmd is None:
                notes.append(f"mergekit skipped: not importable from {args.mergekit_python}")
            else:
                jobs.append((method, "mergekit", cmd))
    if not args.mergekit_python:
        notes.append("mergekit skipped: no --mergekit-python given")

    print(f"workdir {work}; {len(inputs)} input files, {fmt_mb(sum(p.stat().st_size for p in inputs))} in all; "
          f"one checkpoint {fmt_mb(ckpt)}; torch threads {args.threads}; 1 warm-up + {args.repeats} repeats "
          f"(medians); OMP_WAIT_POLICY={args.omp_wait_policy}; load average at start {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores", flush=True)
    samples: dict[tuple[str, str], list[tuple[float, int, float]]] = {}
    engine_s: dict[str, list[float]] = {}
    for rnd in range(args.repeats + 1):
        for method, name, argv_ in list(jobs):
            log = work / f"log_{method}_{name}.txt"
            try:
                sample = run_child(argv_, log, env)
            except ChildFailed as e:
                if name != "mergekit":
                    raise
                notes.append(f"mergekit {method} failed: {e}")
                jobs.remove((method, name, argv_))
                continue
            if rnd > 0:  # round 0 is the warm-up
                samples.setdefault((method, name), []).append(sample)
                if name == "hf_atm":  # the command's own summary line: seconds after its imports
                    m = re.search(r" in ([0-9.]+) s\s*$", log.read_text())
                    if m:
                        engine_s.setdefault(method, []).append(float(m.group(1)))
            print(f"  round {rnd}{' (warm-up)' if rnd == 0 else ''}: {method:<16}{name:<10} wall {sample[0]:7.2f} s"
                  f"  cpu {sample[2]:7.2f} s  peak RSS {fmt_mb(sample[1]):>9}", flush=True)

    def med(method: str, name: str) -> dict:
        rows = samples[(method, name)]
        return {"wall": statistics.median(r[0] for r in rows), "rss": statistics.median(r[1] for r in rows),
                "cpu": statistics.median(r[2] for r in rows)}

    floor_read, floor_import = med("floor", "read"), med("floor", "import")
    results = {m: {n: med(m, n) for (mm, n) in samples if mm == m} for m in args.methods}

    rss_budget = 1.3 * ckpt + floor_import["rss"]
    print()
    print(f"one checkpoint: {fmt_mb(ckpt)}; interpreter+torch import RSS: {fmt_mb(floor_import['rss'])} "
          f"(import wall {floor_import['wall']:.2f} s); read floor: {floor_read['wall']:.2f} s for "
          f"{fmt_mb(sum(p.stat().st_size for p in inputs))}")
    header = f"{'method':<16}{'contender':<12}{'wall s':>9}{'cpu s':>9}{'x read floor':>14}{'x hf_atm':>10}" \
             f"{'peak RSS':>12}{'RSS - import':>14}{'x checkpoint':>14}"
    print(header)
    print("-" * len(header))
    for method, contenders in results.items():
        ref = contenders["hf_atm"]
        for name, r in contenders.items():
            net = r["rss"] - floor_import["rss"]
            print(f"{method:<16}{name:<12}{r['wall']:>9.2f}{r['cpu']:>9.2f}{r['wall'] / floor_read['wall']:>14.2f}"
                  f"{r['wall'] / ref['wall']:>10.2f}{fmt_mb(r['rss']):>12}{fmt_mb(net):>14}{net / ckpt:>14.2f}")
    print()
    print("targets:")
    verdicts = []
    for method, contenders in results.items():
        rss = contenders["hf_atm"]["rss"]
        ok = rss <= rss_budget
        verdicts.append(ok)
        print(f"  [{'PASS' if ok else 'FAIL'}] {method}: peak RSS {fmt_mb(rss)} <= 1.3 x checkpoint + import RSS "
              f"= {fmt_mb(rss_budget)}")
    if "ties" in results:
        a, b = results["ties"]["hf_atm"]["wall"], results["ties"]["in_memory"]["wall"]
        verdicts.append(a < b)
        print(f"  [{'PASS' if a < b else 'FAIL'}] streaming TIES wall {a:.2f} s < in-memory baseline {b:.2f} s")
    if "task_arithmetic" in results:
        a = results["task_arithmetic"]["hf_atm"]["wall"]
        ok = a <= 2 * floor_read["wall"]
        verdicts.append(ok)
        print(f"  [{'PASS' if ok else 'FAIL'}] streaming task_arithmetic wall {a:.2f} s <= 2 x read floor "
              f"{2 * floor_read['wall']:.2f} s")
        net = a - floor_import["wall"]
        print(f"         (net of the interpreter+torch import, {floor_import['wall']:.2f} s: {net:.2f} s = "
              f"{net / floor_read['wall']:.2f} x read floor)")
    for method, secs in engine_s.items():
        e = statistics.median(secs)
        print(f"  info: hf_atm {method}: the merge itself (its summary line, after imports) {e:.2f} s = "
              f"{e / floor_read['wall']:.2f} x read floor")
    print(f"load average at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall times on a shared "
          "machine vary with it; cpu s does much less)")
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
