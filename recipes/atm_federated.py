"""Federated ATM with Flower: one simulated node per task of the embedded text suite, the server merges their
task vectors every round (docs/FEDERATED.md).

    python recipes/atm_federated.py                                   # Flower simulation engine, tiny budget
    python recipes/atm_federated.py --engine local                    # same apps in-process (no Ray)
    python recipes/atm_federated.py --uplink topk:0.1 --error-feedback --downlink bf16
    python recipes/atm_federated.py --secure-aggregation               # SecAgg+: the server sees only the sum
    python recipes/atm_federated.py --resume                          # continue from the last round checkpoint

Defaults (a few minutes on 2 idle CPU cores): all-MiniLM-L6-v2 (bundled, offline), the 4 text tasks capped at
200 examples (180 train + 20 validation) and 200 test examples, 32 tokens, 3 rounds of 1 epoch, AdamW lr 2e-4,
batch 32. Prints one line per round
(validation accuracy, who was missing, bytes down/up) and the final test accuracy; writes history.json,
plots, round checkpoints and the Hub-ready model into --output-dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["simulation", "local"], default="simulation",
                   help="simulation: Flower's simulation engine (Ray); local: the same apps in this process")
    p.add_argument("--model", default="", help="backbone folder or Hub id (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--data", default="suite:text", help="'suite:<name>' or 'module:function'")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks")
    p.add_argument("--max-train", type=int, default=200, help="training pool per task (10%% is validation)")
    p.add_argument("--max-test", type=int, default=200, help="test examples per task")
    p.add_argument("--max-length", type=int, default=32, help="tokens per text")
    p.add_argument("--pooling", default="mean", choices=["cls", "mean", "pooler"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs-per-round", type=float, default=1.0)
    p.add_argument("--steps-per-round", type=int, default=-1, help="optimizer steps per task per round (> 0 "
                   "overrides --epochs-per-round)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge-method", default="task_arithmetic")
    p.add_argument("--weighting", default="uniform", choices=["uniform", "examples"])
    p.add_argument("--min-clients", type=int, default=1)
    p.add_argument("--round-timeout", type=float, default=900.0)
    p.add_argument("--uplink", default="none", help="none | bf16 | topk:F | dare:F (optionally ':bf16')")
    p.add_argument("--downlink", default="none", help="none | bf16 | topk:F | dare:F (optionally ':bf16')")
    p.add_argument("--error-feedback", action="store_true", help="nodes keep what uplink compression dropped")
    p.add_argument("--secure-aggregation", action="store_true", help="SecAgg+ (sum-decomposable merges only)")
    p.add_argument("--output-dir", default="outputs/atm-federated")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 1), help="Ray CPUs (simulation engine)")
    p.add_argument("--json", action="store_true", help="print the final summary as one JSON line")
    return p.parse_args(argv)


def build_config(a: argparse.Namespace):
    from hf_atm.federated import FederatedATMConfig

    return FederatedATMConfig(
        model=a.model, data=a.data, pooling=a.pooling, rounds=a.rounds,
        tasks=[t for t in a.tasks.split(",") if t] if a.tasks else None,
        data_kwargs={"max_train_per_task": a.max_train, "max_test_per_task": a.max_test, "max_length": a.max_length},
        train_args={"learning_rate": a.lr, "per_device_train_batch_size": a.batch_size, "per_device_eval_batch_size": 128,
                    "epochs_per_round": a.epochs_per_round, "steps_per_round": a.steps_per_round, "seed": a.seed, "weight_decay": 0.01, "max_grad_norm": 1.0,
                    "merge_method": a.merge_method},
        weighting=a.weighting, min_clients=a.min_clients, round_timeout=a.round_timeout, uplink=a.uplink,
        downlink=a.downlink, error_feedback=a.error_feedback, secure_aggregation=a.secure_aggregation,
        output_dir=a.output_dir, resume=a.resume, eval_test=True,
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(max(1, a.cpus if a.engine == "local" else 1))
    from hf_atm.atm.history import load_history
    from hf_atm.federated.simulation import run_flower_simulation, run_local

    cfg = build_config(a)
    if a.engine == "simulation":
        history = run_flower_simulation(cfg, backend_config={"init_args": {"num_cpus": a.cpus}})
    else:
        history = run_local(cfg).history
    history = load_history(cfg.output_dir) if not history else history
    test_file = Path(cfg.output_dir) / "test_metrics.json"
    test = json.loads(test_file.read_text()) if test_file.is_file() else {}
    print(f"\n{'round':>5} {'val acc':>8} {'down MB':>9} {'up MB':>9}  missing")
    for h in history:
        acc = h["mean_accuracy"]
        print(f"{h['round']:>5} {acc if acc is not None else float('nan'):8.4f} {h['bytes_total']['down'] / 1e6:9.2f} "
              f"{h['bytes_total']['up'] / 1e6:9.2f}  {h['missing_train'] or ''}")
    down = sum(h["bytes_total"]["down"] for h in history)
    up = sum(h["bytes_total"]["up"] for h in history)
    summary = {"engine": a.engine, "uplink": a.uplink, "downlink": a.downlink, "error_feedback": a.error_feedback,
               "secure_aggregation": a.secure_aggregation, "rounds": a.rounds,
               "val_mean_accuracy": history[-1]["mean_accuracy"], "test_mean_accuracy": test.get("eval_mean_accuracy"),
               "test_accuracy": {k[5:-9]: v for k, v in test.items() if k != "eval_mean_accuracy"},
               "mb_down": round(down / 1e6, 3), "mb_up": round(up / 1e6, 3),
               "mb_up_after_round0": round(sum(h["bytes_total"]["up"] for h in history[1:]) / 1e6, 3)}
    print(f"test mean accuracy {summary['test_mean_accuracy']}; traffic {summary['mb_down']} MB down, "
          f"{summary['mb_up']} MB up; output in {cfg.output_dir}")
    if a.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
