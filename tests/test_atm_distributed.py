"""ATM across processes: tasks split round-robin, task vectors exchanged (all-reduce / all_gather), heads
broadcast, and the result equal to a single-process run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_atm.atm.distributed import DeltaCollector, TaskExchange, owner_of
from hf_atm.merging.spec import MergeSpec, merge_deltas

SCRIPT = Path(__file__).parent / "scripts" / "atm_dist_run.py"


def test_round_robin_ownership_single_process():
    ex = TaskExchange(["a", "b", "c"])
    assert ex.world_size == 1 and ex.my_tasks() == ["a", "b", "c"]
    assert [owner_of(j, 2) for j in range(5)] == [0, 1, 0, 1, 0]


@pytest.mark.parametrize("method,kw", [("task_arithmetic", {"scale": 0.5}), ("dare_linear", {"density": 0.5}),
                                       ("breadcrumbs", {}), ("average", {"weights": (1.0, 2.0, 3.0)})])
def test_collector_sum_mode_equals_merge_deltas(method, kw):
    gen = torch.Generator().manual_seed(0)
    names = {"w": torch.Size([6, 5]), "b": torch.Size([7])}
    taus = [{n: torch.randn(s, generator=gen) for n, s in names.items()} for _ in range(3)]
    spec = MergeSpec(method=method, **kw)
    ex = TaskExchange(["t0", "t1", "t2"])
    out = {}
    for cosine in (False, True):
        col = DeltaCollector(ex, spec, list(names), names, {n: torch.float32 for n in names}, compute_cosine=cosine)
        assert col.mode == ("gather" if cosine else "sum")
        for i, t in enumerate(["t0", "t1", "t2"]):
            col.add(t, taus[i])
        out[cosine], gram = col.finish()
        assert (gram is None) != cosine
    for n in names:
        expected = merge_deltas(spec, [tv[n] for tv in taus], n)
        assert torch.allclose(out[False][n], expected, atol=1e-6)
        assert torch.equal(out[True][n], expected)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    single, multi = tmp_path / "single", tmp_path / "multi"
    # the single-process reference runs here, with one thread like each launched process
    threads = torch.get_num_threads()  # before the import: the script sets one thread when imported
    from scripts.atm_dist_run import main as run_single

    torch.set_num_threads(1)
    try:
        single.mkdir()
        run_single(single)
    finally:
        torch.set_num_threads(threads)
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(SCRIPT), str(multi)]
    r2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    # both ranks really ran, each on its own tasks (sorted: digit, high, parity -> rank 0: digit, parity)
    ranks = {p.name: json.loads(p.read_text()) for p in multi.glob("rank-*.json")}
    assert set(ranks) == {"rank-0.json", "rank-1.json"}
    assert ranks["rank-0.json"]["ties_gather"] == ["digit", "parity"]
    assert ranks["rank-1.json"]["ties_gather"] == ["high"]
    assert json.loads((single / "rank-0.json").read_text())["ties_gather"] == ["digit", "high", "parity"]
    for name in ("ta_allreduce", "ties_gather"):
        meta_1 = json.loads((single / f"{name}.json").read_text())
        meta_2 = json.loads((multi / f"{name}.json").read_text())
        assert (meta_1["world_size"], meta_2["world_size"]) == (1, 2)
        a, b = load_file(str(single / f"{name}.safetensors")), load_file(str(multi / f"{name}.safetensors"))
        assert set(a) == set(b)
        # Stated tolerance: bit-identical (gather merges the same vectors in the same order; the all-reduce
        # sums float32 terms in float64). atol 0 on purpose.
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        assert diff == 0.0, f"{name}: max difference {diff}"
        assert meta_1["accuracy"] == meta_2["accuracy"]
        assert meta_1["cosine"] == meta_2["cosine"]
