"""ATM on images: `accelerate launch recipes/atm_vit.py`.

Default (offline): the embedded vision suite (Fashion-MNIST and scikit-learn digits tasks) on a small ViT that
hf_atm pre-trains once on a disjoint pretext pool and caches. With a network, point it at Hub data and models:
    accelerate launch recipes/atm_vit.py --suite hub-vit8 --backbone google/vit-base-patch16-224-in21k
The ATM paper's run (CLIP ViT-B/16, frozen zero-shot heads from CLIP's text tower, only the image encoder tuned
and merged; images preprocessed by the checkpoint's own CLIPImageProcessor):
    accelerate launch recipes/atm_vit.py --backbone openai/clip-vit-base-patch16 --suite hub-vit8 \\
        --head_init zero_shot --rounds 10 --learning_rate 1e-5 --weight_decay 0.1 \\
        --per_device_train_batch_size 128 --max_grad_norm 10 --bf16
Every ATMConfig option (a TrainingArguments subclass) works: --rounds, --epochs_per_round, --merge_method ties,
--lora_r 8, --push_to_hub --hub_model_id me/atm-vit, --bf16 ...
"""

from dataclasses import dataclass, field
from functools import partial

from common import (
    Results,
    data_cap,
    finish,
    label_names,
    parse_args,
    parse_sources,
    parse_tasks,
    run_baselines,
    same_heads,
)
from transformers import AutoConfig, AutoImageProcessor

from hf_atm import ATMTrainer, MultiTaskModel
from hf_atm.atm.clip import DEFAULT_TEMPLATES, is_clip_config
from hf_atm.atm.model import HEAD_INITS
from hf_atm.backbones import pretrained_vit
from hf_atm.data import load_suite, pixelize_suite, process_images_suite
from hf_atm.data.hub import vit8_templates
from hf_atm.hub.resolve import resolve_model


@dataclass
class ScriptArguments:
    suite: str = field(default="vision", metadata={"help": "vision (offline, embedded) or hub-vit8 (network)."})
    backbone: str | None = field(default=None, metadata={"help": "ViT or CLIP folder or Hub repo id (default: the "
                                                         "cached pretext-pre-trained ViT)."})
    head_init: str | None = field(default=None, metadata={
        "help": "How every method's heads start: random, linear_probe, zero_shot (CLIP: its text tower's "
                "embeddings of the class names) or prototypes. Default: zero_shot for a CLIP backbone, else random.",
        "choices": list(HEAD_INITS)})  # fmt: skip
    tasks: str | None = field(default=None, metadata={"help": "Comma-separated subset of the suite's tasks."})
    sources: str | None = field(default=None, metadata={"help": "Hub suites: JSON {task: dataset repo id or "
                                                        "local folder} overriding where tasks' data comes from."})
    max_train_per_task: int | None = field(default=1000, metadata={"help": "Training pool per task (train + val); "
                                                                "0: all of it."})
    max_test_per_task: int | None = field(default=500, metadata={"help": "Test examples per task; 0: all of them."})
    baselines: bool = field(default=True, metadata={"help": "Also run individual fine-tuning and tuned TA."})


def main() -> None:
    script, args = parse_args(ScriptArguments, output_dir="outputs/atm_vit", rounds=4, learning_rate=1e-3,
                              per_device_train_batch_size=64, per_device_eval_batch_size=256)
    backbone = script.backbone or pretrained_vit()
    folder = resolve_model(backbone)  # a folder, "org/name" or "org/name@rev"
    clip = is_clip_config(AutoConfig.from_pretrained(folder))
    head_init = script.head_init or ("zero_shot" if clip else "random")
    if clip and head_init == "random":
        raise ValueError("--head_init random: a CLIP backbone starts from its zero-shot heads (from_clip); choose "
                         "zero_shot, linear_probe or prototypes")

    # 1. Data: each task a DatasetDict(train/validation/test) with its own labels, as pixels for the backbone.
    suite = load_suite(script.suite, seed=args.seed, max_train_per_task=data_cap(script.max_train_per_task),
                       max_test_per_task=data_cap(script.max_test_per_task), tasks=parse_tasks(script.tasks),
                       sources=parse_sources(script.sources))  # fmt: skip
    processor = None
    if clip:  # the checkpoint's own CLIPImageProcessor (resize, centre crop, CLIP's mean / std)
        processor = AutoImageProcessor.from_pretrained(folder)
        suite = process_images_suite(suite, processor)
    else:
        vit = AutoConfig.from_pretrained(folder)
        channels = vit.num_channels
        suite = pixelize_suite(suite, image_size=vit.image_size, mean=(0.5,) * channels, std=(0.5,) * channels)

    # 2. Model: the backbone with one head per task, made once by --head_init; every method compared starts from
    # its own copy of that model (the same heads).
    if clip:
        shipped = vit8_templates()
        templates = {t: shipped.get(t, list(DEFAULT_TEMPLATES)) for t in suite}
        make_model = partial(MultiTaskModel.from_clip, backbone, label_names(suite), templates=templates)
    else:
        make_model = partial(MultiTaskModel.from_backbone, backbone, label_names(suite), seed=args.seed)
    new_model = same_heads(make_model, head_init, suite, args, processor)

    # 3. Baselines at the same budget (rounds x epochs_per_round epochs per task).
    results = run_baselines(new_model, args, suite, processor) if script.baselines else Results()

    # 4. ATM: rounds of per-task fine-tuning (each task sees only its own data) then merging.
    trainer = ATMTrainer(model=new_model(), args=args, task_datasets=suite, processing_class=processor,
                         reference_accuracies=results.reference)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    # 5. Test accuracy beside the baselines; save (and with --push_to_hub push) the model folder; the table.
    finish(trainer, results, title=f"{script.suite} suite")


if __name__ == "__main__":
    main()
