"""ATM on images: `accelerate launch recipes/atm_vit.py`.

Default (offline): the embedded vision suite (Fashion-MNIST and scikit-learn digits tasks) on a small ViT that
hf_atm pre-trains once on a disjoint pretext pool and caches. With a network, point it at Hub data and models:
    accelerate launch recipes/atm_vit.py --suite hub-vit8 --backbone google/vit-base-patch16-224-in21k
Every ATMConfig option (a TrainingArguments subclass) works: --rounds, --epochs_per_round, --merge_method ties,
--lora_r 8, --push_to_hub --hub_model_id me/atm-vit, --bf16 ...
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, HfArgumentParser

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel, finetune_individual, one_shot_merge
from hf_atm.atm.report import accuracy_row, format_table, test_accuracy
from hf_atm.backbones import pretrained_vit
from hf_atm.data import load_suite, pixelize_suite
from hf_atm.hub.resolve import resolve_model

# Recipe defaults, sized for a few minutes on two CPU cores; any flag given on the command line wins.
DEFAULTS = ["--output_dir", "outputs/atm_vit", "--rounds", "4", "--epochs_per_round", "1",
            "--learning_rate", "1e-3", "--weight_decay", "0.01", "--per_device_train_batch_size", "64",
            "--per_device_eval_batch_size", "256", "--logging_steps", "20", "--report_to", "none",
            "--save_total_limit", "2", "--dataloader_num_workers", "0"]  # fmt: skip


@dataclass
class ScriptArguments:
    suite: str = field(default="vision", metadata={"help": "vision (offline, embedded) or hub-vit8 (network)."})
    backbone: str | None = field(default=None, metadata={"help": "ViT folder or Hub repo id (default: the "
                                                         "cached pretext-pre-trained ViT)."})
    max_train_per_task: int = field(default=1000, metadata={"help": "Training pool per task (train + val)."})
    max_test_per_task: int = field(default=500, metadata={"help": "Test examples per task."})
    baselines: bool = field(default=True, metadata={"help": "Also run individual fine-tuning and tuned TA."})


parser = HfArgumentParser((ScriptArguments, ATMConfig))
script, args = parser.parse_args_into_dataclasses(args=DEFAULTS + sys.argv[1:])

# 1. Data: each task a DatasetDict(train/validation/test) with its own labels.
suite = load_suite(script.suite, seed=args.seed, max_train_per_task=script.max_train_per_task,
                   max_test_per_task=script.max_test_per_task)
backbone = script.backbone or pretrained_vit()
vit = AutoConfig.from_pretrained(resolve_model(backbone))  # a folder, "org/name" or "org/name@rev"
channels = vit.num_channels
suite = pixelize_suite(suite, image_size=vit.image_size, mean=(0.5,) * channels, std=(0.5,) * channels)
labels = {task: ds["train"].features["labels"].names for task, ds in suite.items()}

# 2. Baselines at the same budget (B = rounds x epochs_per_round epochs per task).
budget = args.rounds * args.epochs_per_round
rows, reference = [], None
if script.baselines:
    model = MultiTaskModel.from_backbone(backbone, labels, seed=args.seed)
    individual = finetune_individual(model, args, suite, budget_epochs=budget)
    reference = individual.reference_accuracies("test")
    rows.append(accuracy_row(f"individual ({budget:g} ep)", reference, reference))
    ta = one_shot_merge(model, individual, args, suite, "task_arithmetic", reference_accuracies=reference)
    rows.append(accuracy_row(f"task arithmetic (scale {ta.scale:.2f})", ta.entries["test"]["accuracy"], reference))

# 3. ATM: rounds of per-task fine-tuning (each task sees only its own data) then merging.
model = MultiTaskModel.from_backbone(backbone, labels, seed=args.seed)
trainer = ATMTrainer(model=model, args=args, task_datasets=suite, reference_accuracies=reference)
trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
metrics = trainer.evaluate(split="test", metric_key_prefix="test")
rows.append(accuracy_row(f"ATM ({args.rounds} x {args.epochs_per_round:g} ep)",
                         test_accuracy(metrics, sorted(labels)), reference))

# 4. Save (Hub-ready folder with card, history.json and plots; with --push_to_hub also uploaded), print the
# table. save_model is collective, like Trainer's: every process calls it, the main one writes.
trainer.save_model(args.output_dir)
if trainer.is_world_process_zero():
    table = format_table(rows)
    Path(args.output_dir, "results.md").write_text(table + "\n")
    Path(args.output_dir, "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\nTest accuracy (%), " + script.suite + " suite:\n" + table)
    print(f"\nhistory, plots and model: {args.output_dir}")
