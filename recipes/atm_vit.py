"""ATM on images: `accelerate launch recipes/atm_vit.py`.

Default (offline): the embedded vision suite (Fashion-MNIST and scikit-learn digits tasks) on a small ViT that
hf_atm pre-trains once on a disjoint pretext pool and caches. With a network, point it at Hub data and models:
    accelerate launch recipes/atm_vit.py --suite hub-vit8 --backbone google/vit-base-patch16-224-in21k
Every ATMConfig option (a TrainingArguments subclass) works: --rounds, --epochs_per_round, --merge_method ties,
--lora_r 8, --push_to_hub --hub_model_id me/atm-vit, --bf16 ...
"""

from dataclasses import dataclass, field
from functools import partial

from common import Results, finish, label_names, parse_args, run_baselines
from transformers import AutoConfig

from hf_atm import ATMTrainer, MultiTaskModel
from hf_atm.backbones import pretrained_vit
from hf_atm.data import load_suite, pixelize_suite
from hf_atm.hub.resolve import resolve_model


@dataclass
class ScriptArguments:
    suite: str = field(default="vision", metadata={"help": "vision (offline, embedded) or hub-vit8 (network)."})
    backbone: str | None = field(default=None, metadata={"help": "ViT folder or Hub repo id (default: the "
                                                         "cached pretext-pre-trained ViT)."})
    max_train_per_task: int = field(default=1000, metadata={"help": "Training pool per task (train + val)."})
    max_test_per_task: int = field(default=500, metadata={"help": "Test examples per task."})
    baselines: bool = field(default=True, metadata={"help": "Also run individual fine-tuning and tuned TA."})


def main() -> None:
    script, args = parse_args(ScriptArguments, output_dir="outputs/atm_vit", rounds=4, learning_rate=1e-3,
                              per_device_train_batch_size=64, per_device_eval_batch_size=256)

    # 1. Data: each task a DatasetDict(train/validation/test) with its own labels, as pixels sized for the ViT.
    suite = load_suite(script.suite, seed=args.seed, max_train_per_task=script.max_train_per_task,
                       max_test_per_task=script.max_test_per_task)
    backbone = script.backbone or pretrained_vit()
    vit = AutoConfig.from_pretrained(resolve_model(backbone))  # a folder, "org/name" or "org/name@rev"
    channels = vit.num_channels
    suite = pixelize_suite(suite, image_size=vit.image_size, mean=(0.5,) * channels, std=(0.5,) * channels)

    # 2. Model: the backbone with one fresh head per task; every method compared starts from its own copy.
    new_model = partial(MultiTaskModel.from_backbone, backbone, label_names(suite), seed=args.seed)

    # 3. Baselines at the same budget (rounds x epochs_per_round epochs per task).
    results = run_baselines(new_model, args, suite) if script.baselines else Results()

    # 4. ATM: rounds of per-task fine-tuning (each task sees only its own data) then merging.
    trainer = ATMTrainer(model=new_model(), args=args, task_datasets=suite, reference_accuracies=results.reference)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    # 5. Test accuracy beside the baselines; save (and with --push_to_hub push) the model folder; the table.
    finish(trainer, results, title=f"{script.suite} suite")


if __name__ == "__main__":
    main()
