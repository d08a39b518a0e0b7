"""Streaming merge (hf-atm) vs in-memory merge vs mergekit: wall time, CPU time and peak RSS, with floors.

Checkpoints (``--arch``), created once in ``--workdir`` and reused while complete:

* ``bert-base``   four random fine-tunes of BERT-base size (``BertConfig()`` defaults, 110M parameters,
                  float32, ``save_pretrained(max_shard_size="200MB")``) and a base; ~2.2 GB in all.
* ``llama-1b``    a base and four fine-tunes with TinyLlama-1.1B's configuration (``LlamaConfig``: hidden 2048,
                  intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocabulary 32000, untied LM head),
                  bfloat16, random weights (seeded; normal(0, 0.02), norms 1; fine-tune = base + seeded
                  normal(0, 0.002) noise), in 1 GB shards with an index, as ``save_pretrained(max_shard_size=
                  "1GB")`` lays them out; ~2.2 GB per model, ~11 GB in all. The shards are generated tensor by
                  tensor and written with safetensors (one base shard and one fine-tune shard in memory at a
                  time, never a whole model); the build's wall time, peak RSS and disk use are printed.
                  ``--cleanup`` (the default here) removes the workdir afterwards.
* ``llama-tiny``  the same code with tiny sizes (hidden 64, 2 layers, vocabulary 1000, 200 KB shards): checks
                  the whole pipeline in seconds.

Each contender merges, as its own whole subprocess, so that its wall, CPU (user + sys) and peak RSS
(``os.wait4``'s ``ru_maxrss``) are exactly that process's:

* ``hf_atm``      ``python -m hf_atm merge ...`` (the streaming engine, as a user runs it; ``--max-shard-size``
                  as the inputs' shards);
* ``in_memory``   (bert-base only: at 1B scale it would hold ~11 GB) loads every state dict with
                  ``safetensors.torch.load_file`` and merges per tensor with ``peft.utils.merge_utils``
                  (``ties`` / ``task_arithmetic``), then saves sharded;
* ``mergekit``    ``mergekit-yaml CONFIG OUT --allow-crimes --out-shard-size N --no-copy-tokenizer --quiet``
                  from ``--mergekit-python``'s environment (default ``.venv-mergekit/bin/python`` when it exists;
                  mergekit 0.1.5). ``--out-shard-size`` counts parameters, so N is the shard size in bytes over
                  the element size. ``--lazy-unpickle`` (only for pickled ``.bin`` files) and ``--low-cpu-memory``
                  (keeps results on the accelerator; no effect on CPU) are not passed: neither applies to
                  safetensors inputs merged on CPU. The YAML's ``dtype`` is the inputs' own (``--mergekit-dtype``
                  overrides it; ``float32`` then also sets ``out_dtype`` to the inputs' dtype). mergekit 0.1.5
                  fails on BertModel checkpoints (``TypeError`` in ``plan.py``: its BERT definition's aliases), so
                  bert-base reports that failure as a note; it merges Llama. One tensor of every output is
                  compared with hf-atm's (max |diff| printed) to show the contenders computed the same merge.
* floors: ``read``        a process that only reads every input shard fully (the read floor);
          ``read+write``  reads every input shard fully, then writes the output's bytes (the base's shard
                          sizes) into new files, closed without fsync exactly when hf-atm's writer
                          (``hf_atm/merging/io.py``) does not fsync (checked in its source at start);
          ``import``      only imports torch and safetensors (the interpreter's own RSS).

Methods: ``ties`` (density 0.2, weight 1 each: the disjoint mean, mergekit's default ``normalize: true``),
``task_arithmetic`` (weight 1 each),
``slerp`` (t 0.5, the base and the first fine-tune). Page cache: bert-base runs every contender once as a
warm-up; llama runs the read floor once (it pulls all inputs into the page cache: 11 GB fits in 24 GB of RAM)
and removes every output right after its run (which drops its pages), so the inputs stay resident. The share
of the inputs resident in the page cache (``mincore``) is printed before every timed run.

Targets (printed as ``target: ... measured ... met / NOT met``):

* bert-base:  hf-atm TIES wall <= 3 x the read+write floor (also: hf-atm peak RSS <= 1.3 x one checkpoint +
              the import floor's RSS; hf-atm TIES faster than the in-memory baseline);
* llama-1b:   hf-atm wall <= 0.25 x mergekit's, per method; hf-atm peak RSS <= 1.3 x (largest input shard +
              the import floor's RSS). llama-tiny prints the same lines as a pipeline check, not as targets.

    python benchmarks/merge_bench.py --arch bert-base --methods ties task_arithmetic     # ~10 min on 2 cores
    python benchmarks/merge_bench.py --arch llama-1b --methods ties slerp                # builds ~11 GB once
    python benchmarks/merge_bench.py --arch llama-tiny --methods ties slerp task_arithmetic   # seconds
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_MODELS = 4
METHODS = ["ties", "task_arithmetic", "slerp"]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}

TINYLLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    tie_word_embeddings=False)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)

#: Per --arch: how the checkpoints are built and the defaults of the run.
ARCHS: dict[str, dict] = {
    "bert-base": dict(kind="bert", dtype="float32", shard="200MB", shard_bytes=200_000_000, repeats=3,
                      warmup="all", cleanup=False, in_memory=True, workdir="hf_atm_merge_bench"),
    "llama-1b": dict(kind="llama", config=TINYLLAMA_1B, dtype="bfloat16", shard="1GB", shard_bytes=10**9,
                     repeats=1, warmup="read", cleanup=True, in_memory=False, workdir="hf_atm_merge_bench_llama1b"),
    "llama-tiny": dict(kind="llama", config=LLAMA_TINY, dtype="bfloat16", shard="200KB", shard_bytes=200_000,
                       repeats=1, warmup="read", cleanup=True, in_memory=False,
                       workdir="hf_atm_merge_bench_llama_tiny"),
}

MAKE_BERT = textwrap.dedent(
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

# Tensor by tensor, shard by shard: the base's shard is generated (seeded per tensor), written, then each
# fine-tune's shard (base + seeded noise) is written in turn; at most one base shard and one fine-tune shard
# (plus one tensor's float32 temporaries) are in memory. Names, shapes and order are those of
# LlamaForCausalLM's state_dict (built on the meta device: no memory), the shard layout that of
# save_pretrained / huggingface_hub (a new shard when the next tensor would exceed the limit: io.plan_shards).
MAKE_LLAMA = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from hf_atm.merging.io import plan_shards, shard_file_names
    work, n, kwargs, max_shard = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(int(sys.argv[5]))
    config = LlamaConfig(**kwargs, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        specs = [(k, tuple(v.shape)) for k, v in LlamaForCausalLM(config).state_dict().items()]
    index_of = {name: j for j, (name, _) in enumerate(specs)}
    planned = plan_shards([(name, 2 * torch.Size(shape).numel()) for name, shape in specs], max_shard)
    shards = [[index_of[name] for name in shard] for shard in planned]
    files = shard_file_names(len(shards))
    folders = [work / "base"] + [work / f"model_{i}" for i in range(n)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
    def base_tensor(j):
        name, shape = specs[j]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        gen = torch.Generator().manual_seed(1_000_003 * j + 17)
        return (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    meta = {"format": "pt"}
    for s, idx in enumerate(shards):
        base = {specs[j][0]: base_tensor(j) for j in idx}
        save_file(base, folders[0] / files[s], metadata=meta)
        for i in range(n):
            sd = {}
            for j in idx:
                name, shape = specs[j]
                gen = torch.Generator().manual_seed(7_919 * (i + 1) + 1_000_003 * j)
                noise = torch.randn(shape, generator=gen).mul_(0.002)
                sd[name] = noise.add_(base[name]).to(torch.bfloat16)
                del noise
            save_file(sd, folders[i + 1] / files[s], metadata=meta)
            del sd
        del base
    if len(shards) > 1:
        total = sum(2 * torch.Size(shape).numel() for _, shape in specs)
        weight_map = {specs[j][0]: files[s] for s, idx in enumerate(shards) for j in idx}
        index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
        for folder in folders:
            (folder / "model.safetensors.index.json").write_text(index + "\\n")
    for folder in folders:
        (folder / ".complete").touch()
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

# argv: OUT_DIR FSYNC(0/1) SIZES(comma-separated bytes, one new file each) INPUT...
READ_WRITE_FLOOR = textwrap.dedent(
    """
    import os, shutil, sys
    out, fsync, sizes, inputs = sys.argv[1], sys.argv[2] == "1", [int(s) for s in sys.argv[3].split(",")], sys.argv[4:]
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    total = 0
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    written = 0
    for k, size in enumerate(sizes):
        with open(os.path.join(out, f"shard-{k:05d}.bin"), "wb", buffering=0) as f:
            left = size
            while left:
                left -= f.write(view[: min(left, len(view))])
            if fsync:
                os.fsync(f.fileno())
        written += size
    print(total, written)
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


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ensure_checkpoints(work: Path, arch: str, threads: int, env: dict) -> tuple[Path, list[Path], str]:
    """Create the checkpoints unless complete; return (base, models, a line on how they were built)."""
    spec = ARCHS[arch]
    base = work / "base"
    models = [work / f"model_{i}" for i in range(N_MODELS)]
    stats = work / "build.json"
    if all((p / ".complete").exists() for p in [base, *models]):
        if not stats.exists():
            return base, models, f"checkpoints reused from {work} (build not recorded)"
        info = json.loads(stats.read_text())
        return base, models, (f"checkpoints reused from {work} (built earlier in {info['wall_s']:.1f} s, build "
                              f"peak RSS {fmt_mb(info['rss'])}, {fmt_mb(info['disk'])} on disk)")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    print(f"creating {N_MODELS} {arch} checkpoints + a base in {work} ...", flush=True)
    if spec["kind"] == "bert":
        argv = [sys.executable, "-c", MAKE_BERT, str(work), str(N_MODELS)]
    else:
        argv = [sys.executable, "-c", MAKE_LLAMA, str(work), str(N_MODELS), json.dumps(spec["config"]),
                str(spec["shard_bytes"]), str(threads)]
    free0 = shutil.disk_usage(work).free
    wall, rss, cpu = run_child(argv, work / "log_build.txt", env)
    disk = sum(folder_bytes(p) for p in [base, *models])
    info = {"wall_s": wall, "rss": rss, "cpu_s": cpu, "disk": disk, "free_before": free0,
            "free_after": shutil.disk_usage(work).free}
    stats.write_text(json.dumps(info))
    return base, models, (f"checkpoints built in {wall:.1f} s (cpu {cpu:.1f} s), build peak RSS {fmt_mb(rss)}, "
                          f"{fmt_mb(disk)} on disk ({fmt_mb(free0 - info['free_after'])} of free disk used)")


def mergekit_flags(shard_params: int) -> list[str]:
    return ["--allow-crimes", "--out-shard-size", str(shard_params), "--no-copy-tokenizer", "--quiet"]


def mergekit_command(python: str, method: str, density: float, t: float, base: Path, models: list[Path],
                     out: Path, work: Path, dtype: str, in_dtype: str, shard_params: int) -> list[str] | None:
    """The mergekit-yaml command for this merge, or None when mergekit is not importable from `python`."""
    probe = subprocess.run([python, "-c", "import mergekit"], capture_output=True)
    if probe.returncode != 0:
        return None
    lines = [f"merge_method: {method}", f"base_model: {base}", f"dtype: {dtype}"]
    if dtype != in_dtype:
        lines.append(f"out_dtype: {in_dtype}")
    if method == "slerp":
        lines += [f"parameters: {{t: {t}}}", "models:", f"  - model: {base}", f"  - model: {models[0]}"]
    else:
        params = f"{{density: {density}, weight: 1.0}}" if method == "ties" else "{weight: 1.0}"
        # mergekit's defaults: ties normalizes (the disjoint mean, as hf-atm's ties), task_arithmetic does not.
        lines += ["models:"]
        lines += [f"  - model: {m}\n    parameters: {params}" for m in models]
    cfg = work / f"mergekit_{method}.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    script = Path(python).with_name("mergekit-yaml")
    runner = [str(script)] if script.exists() else [python, "-m", "mergekit.scripts.run_yaml"]
    return [*runner, str(cfg), str(out), *mergekit_flags(shard_params)]


def fmt_mb(b: float) -> str:
    return f"{b / 1e6:,.0f} MB" if b >= 1e7 or b == 0 else f"{b / 1e6:,.2f} MB"


def resident_fraction(paths: list[Path]) -> float | None:
    """Share of the bytes of `paths` resident in the page cache (mincore on a private map), None if unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        total = resident = 0
        for path in paths:
            size = path.stat().st_size
            if size == 0:
                continue
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
            try:
                npages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * npages)()
                anchor = ctypes.c_char.from_buffer(mm)
                try:
                    if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0:
                        return None
                finally:
                    del anchor
                resident += sum(v & 1 for v in bytes(vec)) * page
                total += npages * page
            finally:
                mm.close()
        return resident / total if total else None
    except (OSError, AttributeError, ValueError, TypeError):
        return None


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def pick_probe(base: Path) -> str | None:
    """A 2-D tensor of the base to compare the contenders' outputs on: the smallest one (first name on ties)."""
    best: tuple[int, str] | None = None
    for f in sorted(base.glob("*.safetensors")):
        for name, info in safetensors_header(f).items():
            shape = info.get("shape", []) if isinstance(info, dict) else []
            if name != "__metadata__" and len(shape) == 2 and (best is None or (shape[0] * shape[1], name) < best):
                best = (shape[0] * shape[1], name)
    return best[1] if best else None


def find_tensor(out: Path, name: str) -> tuple[Path, str] | None:
    """(shard, key) of tensor `name` in the output folder `out` (a ``model.`` prefix may differ), or None."""
    stem = name.removeprefix("model.")
    for f in sorted(out.glob("*.safetensors")):
        for key in safetensors_header(f):
            if key == name or key.removeprefix("model.") == stem:
                return f, key
    return None


# argv: DEST (a .safetensors file) then SHARD KEY LABEL triples: copies each tensor into DEST under LABEL. Run as
# a child so that the benchmark's own process never imports torch (a forked child's peak RSS starts from it).
PROBE_COPY = textwrap.dedent(
    """
    import sys
    from safetensors import safe_open
    from safetensors.torch import save_file
    got = {}
    for shard, key, label in zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3]):
        with safe_open(shard, "pt") as st:
            got[label] = st.get_tensor(key).contiguous()
    save_file(got, sys.argv[1])
    """
)
# argv: FILE... (PROBE_COPY outputs, one per contender, labels METHOD/CONTENDER); prints one line per pair.
PROBE_COMPARE = textwrap.dedent(
    """
    import sys
    from safetensors.torch import load_file
    got = {}
    for f in sys.argv[1:]:
        got.update(load_file(f))
    for label, t in sorted(got.items()):
        method, name = label.split("/")
        ref = got.get(method + "/hf_atm")
        if ref is not None and name != "hf_atm":
            diff = (t.float() - ref.float()).abs().max().item()
            print(f"{method} {name} vs hf_atm: max |diff| {diff:.3g} (values up to {ref.float().abs().max().item():.3g})")
    """
)


def fmt_cache(frac: float | None) -> str:
    return "cache ?" if frac is None else f"cache {100 * frac:3.0f}%"


def machine_lines() -> list[str]:
    cpu = "unknown"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else platform.processor() or "unknown"
    except OSError:
        pass
    mem = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            mem[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    ram = f"{mem.get('MemTotal', 0) / 2**30:.1f} GiB RAM ({mem.get('MemAvailable', 0) / 2**30:.1f} GiB available)"
    return [f"machine: {cpu}; {cores} cores ({usable} usable); {ram}; {platform.platform()}"]


def engine_identity() -> str:
    """hf_atm's git commit, whether hf_atm/ differs from it, and a hash of hf_atm/**/*.py as they are now."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else "?"
    commit = git("rev-parse", "--short=12", "HEAD")
    changed = [line for line in git("status", "--porcelain", "--", "hf_atm").splitlines() if line.strip()]
    h = hashlib.sha256()
    for p in sorted((REPO / "hf_atm").rglob("*.py")):
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    state = f"{len(changed)} files under hf_atm/ differ from it (uncommitted)" if changed else "hf_atm/ clean"
    return f"hf_atm: git commit {commit}; {state}; sha256 of hf_atm/**/*.py now {h.hexdigest()[:12]}"


def hf_atm_fsyncs() -> bool:
    """Whether hf-atm's writer fsyncs its output (os.fsync / fdatasync in hf_atm/merging/*.py)."""
    src = "".join(p.read_text(errors="replace") for p in (REPO / "hf_atm" / "merging").glob("*.py"))
    return bool(re.search(r"\bos\.(fsync|fdatasync)\(", src))


def fmt_load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=list(ARCHS), default="bert-base", help="checkpoints to merge (see above)")
    ap.add_argument("--repeats", type=int, help="timed runs per contender (default: 3 bert-base, 1 llama)")
    ap.add_argument("--workdir", type=Path, help="checkpoints and outputs (default: TMPDIR/hf_atm_merge_bench*)")
    ap.add_argument("--cleanup", action=argparse.BooleanOptionalAction, default=None,
                    help="remove the workdir at the end (default: on for llama-*, off for bert-base)")
    ap.add_argument("--build-only", action="store_true", help="create the checkpoints (unless complete) and exit (no cleanup)")
    ap.add_argument("--methods", nargs="+", default=["ties", "task_arithmetic"], choices=METHODS)
    ap.add_argument("--density", type=float, default=0.2, help="TIES density")
    ap.add_argument("--t", type=float, default=0.5, help="SLERP t")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads of each child")
    ap.add_argument("--mergekit-python",
                    help="python of an environment where mergekit is installed (default: .venv-mergekit/bin/python "
                         "when it exists)")
    ap.add_argument("--no-mergekit", action="store_true", help="skip mergekit even when it is available")
    ap.add_argument("--mergekit-dtype", choices=["float32", "bfloat16"],
                    help="mergekit YAML dtype (default: the inputs' dtype, as mergekit's examples do)")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"],
                    help="OMP_WAIT_POLICY of every child (default PASSIVE, as hf-atm itself uses)")
    args = ap.parse_args(argv)
    spec = ARCHS[args.arch]
    repeats = spec["repeats"] if args.repeats is None else args.repeats
    cleanup = (spec["cleanup"] and not args.build_only) if args.cleanup is None else args.cleanup
    work = (args.workdir or Path(tempfile.gettempdir()) / spec["workdir"]).resolve()
    mk_python = args.mergekit_python
    if mk_python is None and (REPO / ".venv-mergekit/bin/python").exists():
        mk_python = str(REPO / ".venv-mergekit/bin/python")
    if args.no_mergekit:
        mk_python = None
    t_start = time.perf_counter()
    load_before = fmt_load()
    try:
        return run(args, spec, repeats, work, mk_python, load_before, t_start)
    finally:
        if cleanup and work.exists():
            shutil.rmtree(work)
            print(f"workdir {work} removed (--cleanup)")
        print(f"benchmark wall time {time.perf_counter() - t_start:.1f} s")


def run(args: argparse.Namespace, spec: dict, repeats: int, work: Path, mk_python: str | None, load_before: str,
        t_start: float) -> int:
    # Every child gets the same OpenMP settings (hf-atm would default to a passive wait policy by itself;
    # spinning workers distort timings badly on a shared machine, see hf_atm/cli.py).
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads),
               OMP_WAIT_POLICY=args.omp_wait_policy,
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    py = sys.executable
    for line in machine_lines():
        print(line)
    print(engine_identity())
    print(f"load average before: {load_before}", flush=True)

    base, models, build_line = ensure_checkpoints(work, args.arch, args.threads, env)
    print(build_line, flush=True)
    if args.build_only:
        return 0
    inputs = [p for d in [base, *models] for p in sorted(d.glob("*.safetensors"))]
    in_bytes = sum(p.stat().st_size for p in inputs)
    base_shards = sorted(base.glob("*.safetensors"))
    ckpt = sum(p.stat().st_size for p in base_shards)
    largest_shard = max(p.stat().st_size for p in inputs)
    fsync = hf_atm_fsyncs()
    llama = spec["kind"] == "llama"
    elem = DTYPE_BYTES[spec["dtype"]]
    mk_dtype = args.mergekit_dtype or spec["dtype"]

    # (method, contender, argv, output folder); floors first. Round-robin repeats: load from other processes on
    # a shared machine then hits every contender alike.
    floor_out = work / "out_floor_read_write"
    jobs: list[tuple[str, str, list[str], Path | None]] = [
        ("floor", "read", [py, "-c", READ_FLOOR, *map(str, inputs)], None),
        ("floor", "read+write", [py, "-c", READ_WRITE_FLOOR, str(floor_out), "1" if fsync else "0",
                                 ",".join(str(p.stat().st_size) for p in base_shards), *map(str, inputs)], floor_out),
        ("floor", "import", [py, "-c", IMPORT_FLOOR], None),
    ]
    notes = [f"read+write floor: {'fsync' if fsync else 'no fsync'} after each file, as hf-atm's writer "
             f"({'fsyncs' if fsync else 'does not fsync'}: os.fsync searched in hf_atm/merging/*.py)"]
    if mk_python is None:
        notes.append("mergekit skipped: " + ("--no-mergekit" if args.no_mergekit else
                                             "no --mergekit-python and no .venv-mergekit/bin/python"))
    if not spec["in_memory"]:
        notes.append(f"in_memory (peft) skipped for {args.arch} (llama code path): it loads all five models at "
                     f"once, {fmt_mb(in_bytes)} here plus float32 copies; at 1B that is ~11 GB + ~4 GB per float32 "
                     "model, most of this machine's RAM")
    for method in args.methods:
        out = work / f"out_hf_atm_{method}"
        chosen = models[:1] if method == "slerp" else models
        cli = [py, "-m", "hf_atm", "merge", "--base", str(base), "--models", *map(str, chosen), "--method", method,
               "--output", str(out), "--overwrite", "--no-progress", "--max-shard-size", spec["shard"]]
        if method == "ties":
            cli += ["--density", str(args.density)]
        if method == "slerp":
            cli += ["--t", str(args.t)]
        jobs.append((method, "hf_atm", cli, out))
        if spec["in_memory"]:
            if method == "slerp":
                notes.append("in_memory (peft) has no slerp: skipped for slerp")
            else:
                out = work / f"out_mem_{method}"
                jobs.append((method, "in_memory", [py, "-c", IN_MEMORY, method, str(args.density), str(out),
                                                   ",".join(map(str, [base, *models])), str(args.threads)], out))
        if mk_python:
            out = work / f"out_mergekit_{method}"
            cmd = mergekit_command(mk_python, method, args.density, args.t, base, models, out, work, mk_dtype,
                                   spec["dtype"], spec["shard_bytes"] // elem)
            if cmd is None:
                notes.append(f"mergekit skipped: not importable from {mk_python}")
            else:
                jobs.append((method, "mergekit", cmd, out))
    if mk_python and any(j[1] == "mergekit" for j in jobs):
        ver = subprocess.run([mk_python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                             capture_output=True, text=True).stdout.strip()
        notes.append(f"mergekit {ver} ({mk_python}): mergekit-yaml CONFIG OUT "
                     f"{' '.join(mergekit_flags(spec['shard_bytes'] // elem))}; YAML dtype {mk_dtype} "
                     f"(configs: {work}/mergekit_*.yaml)")

    warm = "every contender once" if spec["warmup"] == "all" else "the read floor once (pulls the inputs into " \
        "the page cache); outputs removed after each run"
    print(f"workdir {work}; {len(inputs)} input files, {fmt_mb(in_bytes)} in all; one checkpoint {fmt_mb(ckpt)}; "
          f"largest input shard {fmt_mb(largest_shard)}; torch threads {args.threads}; warm-up: {warm}; "
          f"{repeats} timed repeat(s) (medians); OMP_WAIT_POLICY={args.omp_wait_policy}", flush=True)
    samples: dict[tuple[str, str], list[tuple[float, int, float]]] = {}
    caches: dict[tuple[str, str], list[float | None]] = {}
    engine_s: dict[str, list[float]] = {}
    probes: list[Path] = []  # one tensor of each output, copied aside: do the contenders agree?
    probe_name = pick_probe(base)
    out_sizes: dict[tuple[str, str], int] = {}
    run_times: list[str] = []
    for rnd in range(repeats + 1):
        for job in list(jobs):
            method, name, argv_, out = job
            if rnd == 0 and spec["warmup"] == "read" and name != "read":
                continue
            log = work / f"log_{method}_{name.replace('+', '_')}.txt"
            os.sync()  # earlier runs' dirty pages are not written back during this one
            cache = resident_fraction(inputs)
            try:
                sample = run_child(argv_, log, env)
            except ChildFailed as e:
                if name != "mergekit":
                    raise
                notes.append(f"mergekit {method} failed: {e}")
                jobs.remove(job)
                continue
            if out is not None and out.exists():
                out_sizes[(method, name)] = folder_bytes(out)
                found = find_tensor(out, probe_name) if probe_name and method != "floor" else None
                if found:  # kept aside to check, at the end, that the contenders' outputs agree
                    dest = work / f"probe_{method}_{name}.safetensors"
                    subprocess.run([py, "-c", PROBE_COPY, str(dest), str(found[0]), found[1], f"{method}/{name}"],
                                   env=env, check=True)
                    probes.append(dest)
                if llama:
                    shutil.rmtree(out)
            if rnd > 0:  # round 0 is the warm-up
                samples.setdefault((method, name), []).append(sample)
                caches.setdefault((method, name), []).append(cache)
                if name == "hf_atm":  # the command's own summary line: seconds after its imports
                    m = re.search(r" in ([0-9.]+) s\s*$", log.read_text())
                    if m:
                        engine_s.setdefault(method, []).append(float(m.group(1)))
            line = (f"  round {rnd}{' (warm-up)' if rnd == 0 else ''}: {method:<16}{name:<11} wall {sample[0]:8.2f} s"
                    f"  cpu {sample[2]:8.2f} s  peak RSS {fmt_mb(sample[1]):>9}  inputs {fmt_cache(cache)}"
                    f"  load {os.getloadavg()[0]:.2f}")
            run_times.append(line)
            print(line, flush=True)

    def med(method: str, name: str) -> dict:
        rows = samples[(method, name)]
        return {"wall": statistics.median(r[0] for r in rows), "rss": statistics.median(r[1] for r in rows),
                "cpu": statistics.median(r[2] for r in rows)}

    floor_read, floor_rw, floor_import = med("floor", "read"), med("floor", "read+write"), med("floor", "import")
    results = {m: {n: med(m, n) for (mm, n) in samples if mm == m} for m in args.methods}

    print()
    print(f"one checkpoint: {fmt_mb(ckpt)}; largest input shard {fmt_mb(largest_shard)}; interpreter+torch import "
          f"RSS: {fmt_mb(floor_import['rss'])} (import wall {floor_import['wall']:.2f} s); read floor "
          f"{floor_read['wall']:.2f} s for {fmt_mb(in_bytes)}; read+write floor {floor_rw['wall']:.2f} s (+ "
          f"{fmt_mb(ckpt)} written, {'fsync' if fsync else 'no fsync'})")
    header = (f"{'method':<16}{'contender':<12}{'wall s':>9}{'cpu s':>9}{'x read':>8}{'x r+w':>8}{'x hf_atm':>10}"
              f"{'peak RSS':>12}{'RSS - import':>14}{'x ckpt':>8}{'inputs cached':>15}")
    print(header)
    print("-" * len(header))
    floor_rows = [("floor", "read", floor_read), ("floor", "read+write", floor_rw), ("floor", "import", floor_import)]
    rows = floor_rows + [(m, n, r) for m, cs in results.items() for n, r in cs.items()]
    for method, name, r in rows:
        ref = results.get(method, {}).get("hf_atm")
        net = r["rss"] - floor_import["rss"]
        cached = [c for c in caches[(method, name)] if c is not None]
        cached_s = f"{100 * statistics.median(cached):.0f}%" if cached else "?"
        x_ref = f"{r['wall'] / ref['wall']:.2f}" if ref else "-"
        net_s, x_ckpt = (fmt_mb(net), f"{net / ckpt:.2f}") if method != "floor" else ("-", "-")
        print(f"{method:<16}{name:<12}{r['wall']:>9.2f}{r['cpu']:>9.2f}{r['wall'] / floor_read['wall']:>8.2f}"
              f"{r['wall'] / floor_rw['wall']:>8.2f}{x_ref:>10}{fmt_mb(r['rss']):>12}{net_s:>14}{x_ckpt:>8}"
              f"{cached_s:>15}")
    for (method, name), size in sorted(out_sizes.items()):
        if method != "floor":
            print(f"  output of {method} {name}: {fmt_mb(size)} on disk")
    if probes:
        r = subprocess.run([py, "-c", PROBE_COMPARE, *map(str, dict.fromkeys(probes))], env=env,
                           capture_output=True, text=True)
        for line in (r.stdout + r.stderr).strip().splitlines():
            print(f"  check on {probe_name}: {line}")
    print()
    verdicts = []

    def target(text: str, measured: str, ok: bool, binding: bool = True) -> None:
        if binding:
            verdicts.append(ok)
        print(f"target: {text}; measured {measured}; {'met' if ok else 'NOT met'}"
              + ("" if binding else f" ({args.arch}: pipeline check, not a target)"))

    if spec["kind"] == "bert":
        if "ties" in results:
            a = results["ties"]["hf_atm"]["wall"]
            target("bert-base TIES hf-atm wall <= 3 x read+write floor",
                   f"{a:.2f} s / {floor_rw['wall']:.2f} s = {a / floor_rw['wall']:.2f}x", a <= 3 * floor_rw["wall"])
            if "in_memory" in results["ties"]:
                b = results["ties"]["in_memory"]["wall"]
                target("bert-base TIES hf-atm wall < in-memory (peft) wall",
                       f"{a:.2f} s vs {b:.2f} s = {a / b:.2f}x", a < b)
        budget = 1.3 * ckpt + floor_import["rss"]
        for method, cs in results.items():
            rss = cs["hf_atm"]["rss"]
            target(f"bert-base {method} hf-atm peak RSS <= 1.3 x checkpoint + import RSS = {fmt_mb(budget)}",
                   f"{fmt_mb(rss)} = {rss / budget:.2f}x the budget", rss <= budget)
    else:
        binding = args.arch == "llama-1b"
        budget = 1.3 * (largest_shard + floor_import["rss"])
        for method, cs in results.items():
            a = cs["hf_atm"]
            if "mergekit" in cs:
                b = cs["mergekit"]["wall"]
                target(f"1B {method} hf-atm wall <= 0.25 x mergekit's",
                       f"{a['wall']:.2f} s / {b:.2f} s = {a['wall'] / b:.3f}x", a["wall"] <= 0.25 * b, binding)
            else:
                print(f"target: 1B {method} hf-atm wall <= 0.25 x mergekit's; not measured (no mergekit run)")
            target(f"1B {method} hf-atm peak RSS <= 1.3 x (largest input shard {fmt_mb(largest_shard)} + import "
                   f"RSS {fmt_mb(floor_import['rss'])}) = {fmt_mb(budget)}",
                   f"{fmt_mb(a['rss'])} = {a['rss'] / budget:.2f}x the budget", a["rss"] <= budget, binding)
    for method, cs in results.items():
        a = cs["hf_atm"]["wall"]
        print(f"info: {method} hf-atm wall = {a / floor_rw['wall']:.2f} x read+write floor, "
              f"{a / floor_read['wall']:.2f} x read floor")
    for method, secs in engine_s.items():
        e = statistics.median(secs)
        print(f"info: hf_atm {method}: the merge itself (its summary line, after imports) {e:.2f} s = "
              f"{e / floor_rw['wall']:.2f} x read+write floor")
    print(f"load average before: {load_before}; after: {fmt_load()} on {os.cpu_count()} cores (wall times on a "
          "shared machine vary with it; cpu s much less)")
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    print(f"runs took {time.perf_counter() - t_start:.1f} s including the build/check of the checkpoints")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
