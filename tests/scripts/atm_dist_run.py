"""Run small ATM trainings, in one process or under ``accelerate launch`` with several processes.

Usage: ``python atm_dist_run.py OUT_DIR`` (or through ``accelerate launch ... atm_dist_run.py OUT_DIR``).

For each merge setting (task arithmetic merged with one all-reduce; TIES, which needs every task vector), it
trains the same model on the same digits tasks and writes, on the main process, ``<name>.safetensors`` (the
final backbone and heads) and ``<name>.json`` (history); every process writes ``rank-<r>.json`` with the tasks
it fine-tuned, so the test can check that each process really ran.
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

from safetensors.torch import save_file  # noqa: E402
from scripts.atm_data import TASK_LABELS, digits_tasks, tiny_vit  # noqa: E402

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel  # noqa: E402

SETTINGS = {
    "ta_allreduce": dict(merge_method="task_arithmetic", compute_cosine=False),
    "ties_gather": dict(merge_method="ties", merge_density=0.5, merge_scale=0.6),
}


def main(out: Path) -> None:
    data = digits_tasks(("digit", "parity", "high"), n_train=32, n_val=16, n_test=16, seed=2)
    trained: dict[str, list[str]] = {}
    rank = 0
    for name, extra in SETTINGS.items():
        model = MultiTaskModel.from_backbone(tiny_vit(seed=1, hidden_dropout_prob=0.1),
                                             {t: TASK_LABELS[t] for t in data}, seed=1)
        args = ATMConfig(output_dir=str(out / name), rounds=2, steps_per_round=2, per_device_train_batch_size=8,
                         **{"learning_rate": 1e-2, **extra}, report_to="none", disable_tqdm=True, save_strategy="no", seed=3,
                         use_cpu=True, logging_steps=100)
        trainer = ATMTrainer(model=model, args=args, task_datasets=data)
        trainer.train()
        rank = trainer.exchange.rank
        trained[name] = trainer.exchange.my_tasks()
        if trainer.is_world_process_zero():
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(out / f"{name}.safetensors"))
            (out / f"{name}.json").write_text(json.dumps(
                {"accuracy": [h["accuracy"] for h in trainer.history], "cosine": trainer.history[-1]["cosine"],
                 "world_size": trainer.exchange.world_size}))
    (out / f"rank-{rank}.json").write_text(json.dumps(trained))


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    main(out_dir)
