"""hf-atm vs mergekit on the same mergekit YAML files: do the merged tensors agree?

Tiny Llama checkpoints are built in a temporary folder with ``tests/llm_fixtures.py`` (a base and three
"fine-tunes" of it, float32, ``--layers`` deep). For every method of ``--methods`` one mergekit YAML file
is written there (absolute model paths, ``dtype: float32``) and merged twice, by each tool in its own
process with ``HF_HUB_OFFLINE=1``:

* ``mergekit``  mergekit 0.1.5's ``mergekit-yaml CONFIG OUT --copy-tokenizer --random-seed 0 --quiet``, from
                the environment of ``--mergekit-python`` (default ``.venv-mergekit/bin/python``, made by
                ``scripts/setup_mergekit.sh``; skipped with a note when missing). By default all configs go
                through one worker process there that imports mergekit once (its import alone takes ~8 s on
                2 cores, printed apart) and calls ``mergekit-yaml``'s own click command per config, so the
                times are the merges'; ``--mergekit-cli`` runs the ``mergekit-yaml`` executable per config;
* ``hf-atm``    ``hf-atm merge --config CONFIG --output OUT`` (``--hf-atm``, default the ``hf-atm`` next to
                this interpreter), a process per config: its times include the process start, printed apart
                (``hf-atm --help``).

Both outputs' safetensors are then loaded and compared tensor by tensor. The table shows, per config: the
tensors compared, the largest absolute difference, the largest relative difference (per tensor
``max|hf - mk| / max|mk|``, the worst tensor), and each tool's wall time. ``dare_ties``, ``della`` and
``della_linear`` draw random masks, which the two tools draw differently: for them only statistics compare,
the relative difference of the merged task vectors' norms (``||merged - base||`` over all tensors) and the
fraction of task-vector entries each kept; a row is marked SUSPECT when either differs by more than
``--stat-tolerance`` (2 %; mergekit's own results for different ``--random-seed`` values differ by < 0.5 %).

The exit status is 1 when a deterministic method differs by more than ``--tolerance`` (relative, default
1e-5, float32) in a config both tools merged; 0 otherwise, also when a tool failed or was skipped (the
failure is printed) or a row is SUSPECT, unless ``--strict``.

mergekit 0.1.5 behaviour these configs exercise (read from its source, checked against these fixtures):
gradients (``[a, b, ...]``) are evaluated at ``t = layer / (num_layers - 1)`` for ``model.layers.N.*`` and
at ``t = 0`` (their first value) for the embeddings, final norm and lm_head; filters match substrings of the
tensor name, first match wins; slerp works on each whole tensor flattened (float32, linear when
``|cos| > 0.9995``); ``model_stock`` needs the base and at least 2 more models; ``dare_*`` / ``della*``
rescale a kept task vector by ``||delta||_1 / ||masked delta||_1`` (one scalar per tensor, not ``1 / p`` per
entry), and ``della`` ranks magnitudes per row; ``dtype`` is the dtype inputs are cast to and merged in, and
the output keeps it unless ``out_dtype`` is given (``config.json``'s dtype is ``out_dtype or dtype``).

    python benchmarks/mergekit_parity.py [--methods slerp ties ...] [--keep] [--mergekit-python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
import yaml  # noqa: E402
from llm_fixtures import make_causal_lm  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

RANDOM_METHODS = {"dare_ties", "della", "della_linear"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MERGEKIT_FLAGS = ["--copy-tokenizer", "--random-seed", "0", "--quiet"]

# Runs in the mergekit environment: imports mergekit once (while the fixtures are being built), then reads one
# JSON line of [config, output, flags] jobs from stdin and runs mergekit-yaml's own click command on each,
# printing one "@@" JSON line per config.
MERGEKIT_WORKER = textwrap.dedent(
    """
    import json, sys, time, traceback
    t0 = time.perf_counter()
    from mergekit.scripts.run_yaml import main
    print("@@" + json.dumps({"import_s": time.perf_counter() - t0}), flush=True)
    for cfg, out, flags in json.loads(sys.stdin.readline()):
        t0 = time.perf_counter()
        try:
            main.main(args=[cfg, out, *flags], standalone_mode=False)
            err = None
        except BaseException as e:  # SystemExit and click errors too
            lines = traceback.format_exception_only(type(e), e)
            err = " | ".join(line.strip() for line in lines if line.strip())[-600:]
        print("@@" + json.dumps({"config": cfg, "wall_s": time.perf_counter() - t0, "error": err}), flush=True)
    """
)


def mergekit_configs(base: Path, models: list[Path]) -> dict[str, dict]:
    """The mergekit YAML documents to merge, by name (the name is also the table's first column)."""
    base_s = str(base)
    m1, m2, m3 = (str(m) for m in models)
    common = {"base_model": base_s, "dtype": "float32"}
    return {
        "slerp": {
            "merge_method": "slerp",
            **common,
            "models": [{"model": base_s}, {"model": m1}],
            "parameters": {"t": 0.3},
        },
        "slerp_gradient": {
            "merge_method": "slerp",
            **common,
            "models": [{"model": base_s}, {"model": m1}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
        },
        "model_stock": {
            "merge_method": "model_stock",
            **common,
            "models": [{"model": m1}, {"model": m2}, {"model": m3}],
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            **common,
            "models": [
                {"model": m1, "parameters": {"weight": 0.5}},
                {"model": m2, "parameters": {"weight": 0.3}},
                {"model": m3, "parameters": {"weight": [0.2, 0.8]}},
            ],
            "parameters": {"lambda": 0.9},
        },
        "linear": {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": m1, "parameters": {"weight": 0.5}},
                {"model": m2, "parameters": {"weight": 0.3}},
                {"model": m3, "parameters": {"weight": 0.2}},
            ],
        },
        "ties": {
            "merge_method": "ties",
            **common,
            "models": [
                {"model": m1, "parameters": {"weight": 0.5, "density": 0.5}},
                {"model": m2, "parameters": {"weight": [0.2, 0.4, 0.6, 0.8], "density": 0.3}},
                {"model": m3, "parameters": {"weight": 0.4, "density": 0.7}},
            ],
            "parameters": {"normalize": True},
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            **common,
            "models": [
                {"model": m1, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
                {"model": m2, "parameters": {"weight": 0.3, "density": 0.7, "gamma": 0.02}},
                {"model": m3, "parameters": {"weight": 0.4, "density": 0.9, "gamma": 0.01}},
            ],
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            **common,
            "models": [
                {"model": m1, "parameters": {"weight": 0.5, "density": 0.5}},
                {"model": m2, "parameters": {"weight": 0.3, "density": 0.3}},
                {"model": m3, "parameters": {"weight": 0.4, "density": 0.7}},
            ],
        },
        "della": {
            "merge_method": "della",
            **common,
            "models": [
                {"model": m1, "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}},
                {"model": m2, "parameters": {"weight": 0.3, "density": 0.4, "epsilon": 0.2}},
                {"model": m3, "parameters": {"weight": 0.4, "density": 0.7, "epsilon": 0.1}},
            ],
            "parameters": {"lambda": 1.0},
        },
        "della_linear": {
            "merge_method": "della_linear",
            **common,
            "models": [
                {"model": m1, "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}},
                {"model": m2, "parameters": {"weight": 0.3, "density": 0.4, "epsilon": 0.2}},
                {"model": m3, "parameters": {"weight": 0.4, "density": 0.7, "epsilon": 0.1}},
            ],
        },
    }


def run_tool(cmd: list[str], env: dict[str, str]) -> tuple[float, str | None]:
    """Run `cmd`; returns (wall seconds, None) or (wall seconds, why it failed: rc and the output's tail)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode == 0:
        return wall, None
    tail = [line.strip() for line in (proc.stderr + "\n" + proc.stdout).splitlines() if line.strip()][-3:]
    return wall, f"rc={proc.returncode}: " + " | ".join(tail)


def start_mergekit_worker(python: str, env: dict[str, str], stderr_file: Path) -> subprocess.Popen:
    """Start the mergekit worker: it imports mergekit, then waits for its jobs (:func:`finish_mergekit_worker`)."""
    with open(stderr_file, "w") as err:
        return subprocess.Popen(
            [python, "-c", MERGEKIT_WORKER],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )


def finish_mergekit_worker(proc: subprocess.Popen, jobs: list[tuple[str, str]], stderr_file: Path):
    """Merge every (config, output) of `jobs` in the worker: (import s, {config: (wall s, error or None)})."""
    stdout, _ = proc.communicate(json.dumps([(cfg, out, MERGEKIT_FLAGS) for cfg, out in jobs]) + "\n")
    import_s, results = float("nan"), {}
    for line in stdout.splitlines():
        if line.startswith("@@"):
            record = json.loads(line[2:])
            if "import_s" in record:
                import_s = record["import_s"]
            else:
                results[record["config"]] = (record["wall_s"], record["error"])
    if proc.returncode != 0 or len(results) != len(jobs):
        tail = [line.strip() for line in stderr_file.read_text().splitlines() if line.strip()][-3:]
        why = f"the mergekit worker died (rc={proc.returncode}): " + " | ".join(tail)
        for cfg, _ in jobs:
            results.setdefault(cfg, (float("nan"), why))
    return import_s, results


def load_merged(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    if not tensors:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    return tensors


def compare(hf: dict[str, torch.Tensor], mk: dict[str, torch.Tensor]) -> tuple[int, float, float, list[str]]:
    """(tensors compared, max |hf - mk|, worst per-tensor max|hf - mk| / max|mk|, notes on mismatches)."""
    notes = []
    for who, names in (
        ("hf-atm", sorted(hf.keys() - mk.keys())),
        ("mergekit", sorted(mk.keys() - hf.keys())),
    ):
        if names:
            notes.append(f"only in {who}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
    max_abs = max_rel = 0.0
    common = sorted(hf.keys() & mk.keys())
    for name in common:
        a, b = hf[name], mk[name]
        if a.shape != b.shape:
            notes.append(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            max_abs = max_rel = float("inf")
            continue
        if a.dtype != b.dtype:
            notes.append(f"{name}: dtype {a.dtype} vs {b.dtype}")
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        scale = float(b.double().abs().max()) if b.numel() else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return len(common), max_abs, max_rel, notes


def task_vector_stats(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(norm of merged - base over the tensors shaped like base's, the fraction of its nonzero entries)."""
    sq, nonzero, total = 0.0, 0, 0
    for name, t in merged.items():
        if name in base and base[name].shape == t.shape and t.is_floating_point():
            d = t.double() - base[name].double()
            sq += float((d * d).sum())
            nonzero += int((d != 0).sum())
            total += d.numel()
    return sq**0.5, nonzero / max(total, 1)


def seconds(x: float) -> str:
    return "-" if x != x else f"{x:.1f}"


def main(argv: list[str] | None = None) -> int:
    default_mk = REPO / ".venv-mergekit" / "bin" / "python"
    default_hf = Path(sys.executable).with_name("hf-atm")
    if not default_hf.exists():
        default_hf = REPO / ".venv" / "bin" / "hf-atm"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--mergekit-python",
        type=Path,
        default=default_mk if default_mk.exists() else None,
        help=f"python of an environment with mergekit (default {default_mk} when it exists)",
    )
    ap.add_argument(
        "--mergekit-cli",
        action="store_true",
        help="run the mergekit-yaml executable per config (slower: ~8 s of imports each)",
    )
    ap.add_argument(
        "--hf-atm", type=Path, default=default_hf, help=f"the hf-atm executable (default {default_hf})"
    )
    ap.add_argument("--methods", nargs="+", metavar="NAME", help="configs to merge (default: all)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the fixtures (default 4)")
    ap.add_argument("--tie-word-embeddings", action="store_true", help="fixtures with a tied lm_head")
    ap.add_argument("--tolerance", type=float, default=1e-5, help="relative tolerance, deterministic methods")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (its path is printed)")
    ap.add_argument(
        "--stat-tolerance",
        type=float,
        default=0.02,
        help="random-mask methods: the task-vector norm's relative difference and the kept fraction's difference "
        "above which a row is marked SUSPECT (mergekit's own seed-to-seed spread is < 0.005 here; default 0.02)",
    )
    ap.add_argument(
        "--strict",
        action="store_true",
        help="also exit 1 when a tool fails or is skipped, or a row is SUSPECT",
    )
    args = ap.parse_args(argv)
    known = list(mergekit_configs(Path("base"), [Path("m1"), Path("m2"), Path("m3")]))
    names = args.methods or known
    if any(n not in known for n in names):
        ap.error(f"unknown --methods {[n for n in names if n not in known]}; choose from {known}")

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="hf_atm_mergekit_parity_"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1")
    mk_python = args.mergekit_python
    if mk_python is None or not Path(mk_python).exists():
        print(
            f"note: mergekit skipped: {mk_python or default_mk} does not exist (run scripts/setup_mergekit.sh)"
        )
        mk_python = None
    worker = None
    try:
        if mk_python is not None and not args.mergekit_cli:  # mergekit imports while the fixtures are built
            worker = start_mergekit_worker(str(mk_python), env, work / "mergekit_worker.stderr")

        # 1. fixtures: a base and three fine-tunes of it, and one mergekit YAML file per method
        t0 = time.perf_counter()
        tie = True if args.tie_word_embeddings else None
        base = make_causal_lm(work / "base", "llama", seed=0, num_layers=args.layers, tie_word_embeddings=tie)
        models = [make_causal_lm(work / f"ft{i}", base=base, seed=i, scale=0.02) for i in (1, 2, 3)]
        print(
            f"fixtures: llama, {args.layers} layers{', tied embeddings' if tie else ''}, float32, "
            f"base + 3 fine-tunes in {work} ({time.perf_counter() - t0:.1f} s)"
        )
        base_sd = load_merged(base)
        configs = mergekit_configs(base, models)
        jobs = {}
        for name in names:
            cfg_path = work / f"{name}.yml"
            cfg_path.write_text(yaml.safe_dump(configs[name], sort_keys=False))
            jobs[name] = (cfg_path, work / f"out_mergekit_{name}", work / f"out_hf_atm_{name}")

        # 2. mergekit, on every config
        mk_results: dict[str, tuple[float, str | None]] = {}
        if mk_python is not None and args.mergekit_cli:
            script = Path(mk_python).with_name("mergekit-yaml")
            runner = [str(script)] if script.exists() else [str(mk_python), "-m", "mergekit.scripts.run_yaml"]
            for name, (cfg, out_mk, _) in jobs.items():
                mk_results[name] = run_tool(runner + [str(cfg), str(out_mk), *MERGEKIT_FLAGS], env)
            print("mergekit: mergekit-yaml per config (its times include its imports, ~8 s each)")
        elif worker is not None:
            import_s, by_cfg = finish_mergekit_worker(
                worker,
                [(str(cfg), str(out)) for cfg, out, _ in jobs.values()],
                work / "mergekit_worker.stderr",
            )
            mk_results = {name: by_cfg[str(cfg)] for name, (cfg, _, _) in jobs.items()}
            print(f"mergekit: one worker process, import {seconds(import_s)} s (not in the times below)")

        # 3. hf-atm, on every config
        hf_cmd = [str(args.hf_atm)] if Path(args.hf_atm).exists() else [sys.executable, "-m", "hf_atm"]
        start_s, _ = run_tool(hf_cmd + ["--help"], env)
        print(
            f"hf-atm: a process per config, {' '.join(hf_cmd)} --help takes {start_s:.1f} s (in the times below)"
        )
        hf_results = {
            name: run_tool(hf_cmd + ["merge", "--config", str(cfg), "--output", str(out_hf)], env)
            for name, (cfg, _, out_hf) in jobs.items()
        }

        # 4. compare
        rows, failures, mismatches, suspects, notes = [], [], [], [], []
        for name, (_, out_mk, out_hf) in jobs.items():
            mk_time, mk_err = mk_results.get(name, (float("nan"), None))
            hf_time, hf_err = hf_results[name]
            for tool, err in (("mergekit", mk_err), ("hf-atm", hf_err)):
                if err:
                    failures.append(f"{name}: {tool} failed ({err})")
            for tool, out, err in (("mergekit", out_mk, mk_err), ("hf-atm", out_hf, hf_err)):
                if out.exists() and err is None and not all((out / f).exists() for f in TOKENIZER_FILES):
                    notes.append(f"{name}: {tool} wrote no tokenizer")
            row = [name, "-", "-", "-", seconds(mk_time), seconds(hf_time)]
            if mk_python is None or mk_err or hf_err:
                why = [
                    "mergekit skipped" if mk_python is None else "mergekit failed" if mk_err else "",
                    "hf-atm failed" if hf_err else "",
                ]
                rows.append(row + ["; ".join(w for w in why if w)])
                continue
            hf_sd, mk_sd = load_merged(out_hf), load_merged(out_mk)
            n, max_abs, max_rel, cmp_notes = compare(hf_sd, mk_sd)
            row[1:4] = [str(n), f"{max_abs:.2e}", f"{max_rel:.2e}"]
            notes.extend(f"{name}: {note}" for note in cmp_notes)
            if name in RANDOM_METHODS:
                hf_norm, hf_kept = task_vector_stats(hf_sd, base_sd)
                mk_norm, mk_kept = task_vector_stats(mk_sd, base_sd)
                rel_norm = abs(hf_norm - mk_norm) / mk_norm if mk_norm else float("inf")
                note = (
                    f"random masks (drawn differently): stats only, task-vector norm rel diff {rel_norm:.3f}, "
                    f"kept {hf_kept:.3f} (hf-atm) vs {mk_kept:.3f} (mergekit)"
                )
                if rel_norm > args.stat_tolerance or abs(hf_kept - mk_kept) > args.stat_tolerance:
                    note = f"SUSPECT (> {args.stat_tolerance:g}): " + note
                    suspects.append(name)
            elif max_rel > args.tolerance or cmp_notes:
                note = f"MISMATCH (> {args.tolerance:g})"
                mismatches.append(name)
            else:
                note = "ok"
            rows.append(row + [note])

        # 5. report
        table = [["method", "tensors", "max |diff|", "max rel diff", "mergekit s", "hf-atm s", "note"], *rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
        print()
        for line in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1])
        print()
        for line in failures + notes:
            print(f"note: {line}")
        if args.keep:
            print(f"work folder kept: {work}")
        if mismatches:
            print(
                f"FAIL: {', '.join(mismatches)}: hf-atm differs from mergekit by more than {args.tolerance:g}"
            )
            return 1
        if args.strict and (failures or suspects or mk_python is None):
            print(
                "FAIL (--strict): a tool failed or was skipped, or a random-mask method's statistics differ"
            )
            return 1
        compared = sum(1 for r in rows if r[1] != "-")
        print(f"{compared} of {len(rows)} configs compared, no deterministic mismatch")
        return 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
