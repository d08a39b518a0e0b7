"""Kill a real ATM run mid-way and resume it: does it finish with the same model as a run never interrupted?

    python benchmarks/resume_check.py [--rounds 3] [--kill-after 2] [--max-train 300] [--work DIR]

Runs ``recipes/atm_vit.py`` (embedded vision suite, the cached pretext ViT, baselines off) three ways, each
in its own process: uninterrupted; killed with SIGKILL as soon as ``checkpoint-round-<kill-after>`` is
complete; that killed run started again with ``--resume_from_checkpoint True``. Prints whether the resumed
model's tensors (backbone and heads) equal the uninterrupted ones bit for bit and compares the histories.
Exit status 0 only when they match.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def recipe(out: Path, a: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / "atm_vit.py"), "--output_dir", str(out), "--rounds",
            str(a.rounds), "--max_train_per_task", str(a.max_train), "--max_test_per_task", str(a.max_test),
            "--baselines", "False", "--save_total_limit", str(a.rounds + 1), "--disable_tqdm", "True", *extra]


def tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kill-after", type=int, default=2)
    p.add_argument("--max-train", type=int, default=300)
    p.add_argument("--max-test", type=int, default=100)
    p.add_argument("--work", default=None)
    a = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    work = Path(a.work or tempfile.mkdtemp(prefix="atm-resume-"))
    full, cut = work / "uninterrupted", work / "killed"

    t0 = time.perf_counter()
    subprocess.run(recipe(full, a), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"uninterrupted run: {time.perf_counter() - t0:.0f} s")

    proc = subprocess.Popen(recipe(cut, a), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = cut / f"checkpoint-round-{a.kill_after}"
    while proc.poll() is None and not (marker / "atm_state.json").exists():
        time.sleep(0.05)
    if proc.poll() is not None:
        print(f"the run ended before {marker.name} appeared; nothing to resume")
        return 1
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(d.name for d in cut.glob("checkpoint-round-*"))
    print(f"killed (SIGKILL) with {done} on disk")

    t0 = time.perf_counter()
    subprocess.run(recipe(cut, a, "--resume_from_checkpoint", "True"), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"resumed run: {time.perf_counter() - t0:.0f} s")

    x, y = tensors(full), tensors(cut)
    same_names = sorted(x) == sorted(y)
    diffs = [k for k in x if k in y and not (x[k].shape == y[k].shape and bool((x[k] == y[k]).all()))]
    hx = json.loads((full / "history.json").read_text())
    hy = json.loads((cut / "history.json").read_text())
    acc_same = [h["accuracy"] for h in hx] == [h["accuracy"] for h in hy]
    print(f"tensors compared: {len(x)}; names equal: {same_names}; tensors that differ: {len(diffs)}"
          + (f" (first: {diffs[0]})" if diffs else ""))
    print(f"history rounds: {[h['round'] for h in hy]}; per-round accuracies equal: {acc_same}")
    print("per-round mean validation accuracy:", [round(h["mean_accuracy"], 4) for h in hy])
    ok = same_names and not diffs and acc_same
    print("RESULT:", "resumed run == uninterrupted run, bit for bit" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
