"""Shared test setup: never touch the network, keep CPU threads modest (CI has 2 cores); the one ``accelerate
launch`` of the suite."""

import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gloo_launch(tmp_path_factory) -> Path:
    """One ``accelerate launch`` of 2 gloo processes (``tests/scripts/atm_dist_run.py``) for every multi-process
    test of the suite (a launch costs ~20 s of imports on 2 cores): the task-parallel and data-parallel ATM runs
    and the collector checks (tests/test_atm_distributed.py), the FSDP runs (``<folder>/fsdp``, same file) and
    the run scored by other metrics (``<folder>/metrics``, tests/test_metrics.py), all written into the returned
    folder."""
    out = tmp_path_factory.mktemp("gloo-launch")
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(Path(__file__).parent / "scripts" / "atm_dist_run.py"), str(out),
           "--data-parallel-rows", "8", "--collector", "--metrics", "--fsdp-rows", "8"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture
def no_plots(monkeypatch):
    """ATMTrainer writes no PNG plots (train() and save_model() call ``plot_history``): for tests that check
    training, not its report; a plot costs ~0.3 s of a 2-core CI per call. The plots themselves stay tested:
    test_atm_trainer.py (a run's accuracy.png / cosine.png, a saved folder's accuracy.png), test_metrics.py and
    test_report.py (negative correlations, mixed metrics, old histories), test_federated_faults.py (NaN cosines),
    the federated, recipe and notebook runs."""
    monkeypatch.setattr("hf_atm.atm.trainer.plot_history", lambda history, folder: [])
