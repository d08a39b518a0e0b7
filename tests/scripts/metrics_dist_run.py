"""One small ATM run whose tasks are scored by metrics other than accuracy (Matthews correlation, F1), in one
process or under ``accelerate launch`` with several processes: ``python metrics_dist_run.py OUT_DIR``.

Each task is evaluated on its owner process and its metric computed there; the main process writes
``metrics.json`` (the history's metric names and scores, and the evaluate() keys on test), so the test can
check that two processes give the single-process scores.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)  # same arithmetic in every process and in the single-process run

from scripts.atm_data import TASK_LABELS, digits_tasks, tiny_vit  # noqa: E402

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel  # noqa: E402

TASK_METRICS = {"parity": "matthews_correlation", "high": "f1"}


def main(out: Path) -> None:
    data = digits_tasks(("digit", "parity", "high"), n_train=32, n_val=16, n_test=16, seed=2)
    model = MultiTaskModel.from_backbone(tiny_vit(seed=1), {t: TASK_LABELS[t] for t in data}, seed=1)
    args = ATMConfig(output_dir=str(out / "run"), rounds=1, steps_per_round=2, per_device_train_batch_size=8,
                     learning_rate=1e-2, report_to="none", disable_tqdm=True, save_strategy="no", seed=3,
                     use_cpu=True, logging_steps=100, task_metrics=TASK_METRICS)
    trainer = ATMTrainer(model=model, args=args, task_datasets=data)
    trainer.train()
    test = trainer.evaluate(split="test", metric_key_prefix="test")
    if trainer.is_world_process_zero():
        (out / "metrics.json").write_text(json.dumps({
            "world_size": trainer.exchange.world_size,
            "metric": [h["metric"] for h in trainer.history],
            "score": [h["score"] for h in trainer.history],
            "accuracy": [h["accuracy"] for h in trainer.history],
            "test": test,
        }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
