"""ATMConfig: ``transformers.TrainingArguments`` plus the options of ATM (Alternating Tuning and Merging).

Every TrainingArguments option either works in ATM or is refused when ATMConfig is built (ValueError naming it):
:data:`TRAINING_ARGUMENTS_CONTRACT` says which, and how, for each of them. In short, the optimisation options
(learning rate, schedule, warmup, optimizer, weight decay, batch size, gradient accumulation, max_grad_norm,
bf16, gradient checkpointing, seed) apply to each per-task fine-tuning inside a round; a round is ATM's
evaluation and save unit (``eval_strategy`` / ``save_strategy`` ``"epoch"`` = once per round, which is what
``load_best_model_at_end``, ``metric_for_best_model`` and ``EarlyStoppingCallback`` work on); the budget is
``rounds x epochs_per_round`` (or ``rounds x steps_per_round`` optimizer steps) per task, so ``num_train_epochs``
and ``max_steps`` are refused; FSDP (``fsdp`` / ``fsdp_config``, FSDP2) shards the backbone in
``atm_parallel_mode="data_parallel"`` (:mod:`hf_atm.atm.sharding`) and is refused in task_parallel; DeepSpeed is
refused; DDP's bucket size and buffer broadcast apply to data_parallel's own gradient averaging.

The merge options (``merge_*``) are those of the merge-method registry (:mod:`hf_atm.merging.registry`) that
some method usable inside ATM rounds reads; each is validated by the registry's record of the option and of
the chosen method, and errors name the ATMConfig field. ``merge_scale`` also takes ``"auto"``: the scale is
then chosen every round by a line search (``merge_scale_candidates``, ``merge_scale_search_examples``;
:mod:`hf_atm.atm.scale_search`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from transformers import TrainingArguments

from hf_atm.atm.collector import ACCUMULATE_DTYPES, MERGE_DEVICES
from hf_atm.atm.exchange import PARALLEL_MODES
from hf_atm.atm.metrics import SHIPPED_METRICS, parse_task_metrics
from hf_atm.atm.rounds import default_merge_scale
from hf_atm.atm.scale_search import candidate_scales
from hf_atm.atm.sharding import check_fsdp_args, fsdp_mode_message, fsdp_requested
from hf_atm.errors import MergeConfigError
from hf_atm.merging.registry import METHODS, OPTIONS, RESCALES, get_method
from hf_atm.merging.spec import MAJORITY_SIGN_METHODS, MergeSpec

__all__ = [
    "ATM_MERGE_METHODS",
    "ATM_MERGE_OPTIONS",
    "ATM_MODES",
    "TRAINING_ARGUMENTS_CONTRACT",
    "ATMConfig",
    "merge_field",
]

#: the merge methods that work on task vectors alone, so inside ATM rounds (all but slerp).
ATM_MERGE_METHODS: tuple[str, ...] = tuple(m for m in METHODS if get_method(m).in_atm)

#: the registry's options that some method of :data:`ATM_MERGE_METHODS` reads (``weights`` first), in the
#: registry's order; each is the ATMConfig field ``merge_<option>`` (:func:`merge_field`).
ATM_MERGE_OPTIONS: tuple[str, ...] = tuple(
    o for o in OPTIONS
    if o == "weights" or any(o in get_method(m).options for m in ATM_MERGE_METHODS)
)

ATM_MODES = ("pa", "ph")

#: values a merge option can take besides the registry's range check (the CLI and ATMConfig's ``choices``).
_OPTION_CHOICES: dict[str, tuple[str, ...]] = {"majority_sign_method": MAJORITY_SIGN_METHODS, "rescale": RESCALES}
#: values accepted for a method that does not read the option, because they change nothing (MergeSpec's rule).
_NEUTRAL: dict[str, Any] = {"scale": 1.0, "seed": 0}


def merge_field(option: str) -> str:
    """The ATMConfig field of registry option `option` (``density`` -> ``merge_density``)."""
    return f"merge_{option}"


def _readers(option: str) -> list[str]:
    """The ATM methods that read `option`."""
    if option == "weights":
        return [m for m in ATM_MERGE_METHODS if get_method(m).takes_weights]
    return [m for m in ATM_MERGE_METHODS if option in get_method(m).options]


def _merge_help(option: str, lead: str = "") -> str:
    """Help text of ``merge_<option>``: the registry's description, who reads it and their defaults."""
    readers = []
    for m in _readers(option):
        default = get_method(m).default(option)
        readers.append(m if default is None else f"{m} ({default})")
    text = lead or OPTIONS[option].help
    if option in _OPTION_CHOICES:
        text += f"; one of {', '.join(_OPTION_CHOICES[option])}"
    return f"{text}. Read by: {', '.join(readers)}. Unset: the method's default."


# ------------------------------------------------------------------------------------------------------------
# the TrainingArguments contract
# ------------------------------------------------------------------------------------------------------------
_H, _R, _I = "honoured: ", "refused: ", "inert: "
_ROUND_BUDGET = "ATM's budget is rounds x epochs_per_round (or rounds x steps_per_round) optimizer steps per task"
_PER_ROUND = "a round is ATM's evaluation and save unit"
_TASK_LOOP = "ATM's per-task loop runs the unwrapped model with Trainer's training_step"
_NO_DDP = ("ATM wraps no model in DDP: task_parallel trains separate tasks per rank, data_parallel averages the "
           "gradients itself (exchange.sync_gradients_, after the last backward of each step)")
_NO_DEEPSPEED = ("ZeRO partitions the parameters and optimizer state behind an engine whose backward and step ATM "
                 "does not drive; for a model too large for one replica use fsdp=True with "
                 "atm_parallel_mode='data_parallel'")
_FSDP_MODE = fsdp_mode_message("task_parallel")  # the only other mode; one message for the rule
_EVAL_LOOP = "in predict(), which runs Trainer's evaluation loop for one task"

#: every ``dataclasses.fields(TrainingArguments)`` name -> what ATM does with it: ``"honoured: <how>"``,
#: ``"refused: <why>"`` (a non-default value raises ValueError naming it) or ``"inert: <why it has no effect>"``.
#: Honoured options with some refused values list them; :data:`_REFUSED_VALUES` tests them.
TRAINING_ARGUMENTS_CONTRACT: dict[str, str] = {
    # -- where and how long
    "output_dir": _H + "history.json, plots, checkpoint-round-{k} folders and the saved model go there",
    "num_train_epochs": _R + _ROUND_BUDGET + "; set rounds and epochs_per_round instead",
    "max_steps": _R + _ROUND_BUDGET + "; set rounds and steps_per_round instead",
    "per_device_train_batch_size": _H + "the batch size of each per-task fine-tuning",
    "gradient_accumulation_steps": _H + "micro-batches per optimizer step of each per-task fine-tuning",
    "dataloader_drop_last": _H + "per-task train loaders drop the last incomplete batch",
    "dataloader_num_workers": _H + "workers of the per-task and evaluation loaders",
    "dataloader_pin_memory": _H + "pinned memory for the per-task loaders on CUDA",
    "dataloader_persistent_workers": _H + "passed to the per-task loaders when dataloader_num_workers > 0",
    "dataloader_prefetch_factor": _H + "passed to the per-task loaders when dataloader_num_workers > 0",
    "dataloader_multiprocessing_context": _H + "passed to the per-task loaders when dataloader_num_workers > 0",
    "dataloader_in_order": _I + "read by accelerate for the loaders it prepares; ATM's per-task loaders are "
    "plain ordered torch DataLoaders",
    "train_sampling_strategy": _H + "'random': each (round, task) fine-tuning shuffles with a seed from (seed, "
    "round, task); 'sequential', 'group_by_length' and 'batch_rebalance' are refused",
    "length_column_name": _I + "read only by train_sampling_strategy='group_by_length' / 'batch_rebalance' "
    "(refused)",
    "remove_unused_columns": _R + "ATM always keeps only the backbone's input columns and 'labels'",
    "label_names": _R + "ATM's label column is 'labels' (or 'label', renamed); only None or ['labels'] is accepted",
    "data_seed": _R + "each (round, task) fine-tuning seeds its data order from (seed, round, task), so results "
    "do not depend on which process runs a task",
    # -- optimisation (applied to every per-task fine-tuning)
    "learning_rate": _H + "of every per-task optimizer",
    "lr_scheduler_type": _H + "the schedule of each per-task fine-tuning (over its steps, or over all rounds when "
    "reset_optimizer_each_round=False); 'reduce_lr_on_plateau' and 'greedy' are refused (they step on an "
    "evaluation metric, and ATM evaluates once per round, between fine-tunings)",
    "lr_scheduler_kwargs": _H + "passed to the per-task schedule (Trainer.create_scheduler)",
    "warmup_steps": _H + "warmup of each per-task schedule (a fraction < 1 of its steps, as in Trainer)",
    "optim": _H + "per-task optimizer from Trainer.create_optimizer; layer-wise (galore_*_layerwise, "
    "apollo_adamw_layerwise), lomo / adalomo (update inside backward) and schedule_free_* (averaged weights "
    "kept in the optimizer, not in the model a task vector is taken from) are refused",
    "optim_args": _H + "passed to the per-task optimizer",
    "optim_target_modules": _H + "the modules of GaLore / APOLLO optimizers, matched in the tuned backbone and head",
    "weight_decay": _H + "of every per-task optimizer",
    "adam_beta1": _H + "of every per-task Adam-type optimizer",
    "adam_beta2": _H + "of every per-task Adam-type optimizer",
    "adam_epsilon": _H + "of every per-task Adam-type optimizer",
    "max_grad_norm": _H + "gradient clipping at each per-task optimizer step",
    "label_smoothing_factor": _H + "each head's cross entropy is label-smoothed by that factor over its own classes "
    "(also in joint training's mixed batches), by the model's loss instead of Trainer's LabelSmoother",
    "average_tokens_across_devices": _I + "ATM's loss is each batch's mean cross-entropy (the classification "
    "heads take no token count), so there is no token count to average",
    # -- precision, memory, speed
    "bf16": _H + "bf16 autocast in per-task training and evaluation",
    "fp16": _R + "ATM's per-task loop runs without a gradient scaler; use bf16 (or full precision)",
    "bf16_full_eval": _R + "ATM evaluates under bf16 autocast when bf16=True; the model is never cast for evaluation",
    "fp16_full_eval": _R + "ATM evaluates under bf16 autocast when bf16=True; the model is never cast for evaluation",
    "tf32": _H + "TrainingArguments sets the TF32 backend flags at construction",
    "activation_checkpointing": _H + "the backbone's gradient checkpointing during every per-task fine-tuning "
    "(restored afterwards)",
    "activation_checkpointing_kwargs": _H + "passed to the backbone's gradient_checkpointing_enable",
    "gradient_checkpointing": _H + "transformers' alias of activation_checkpointing",
    "gradient_checkpointing_kwargs": _H + "transformers' alias of activation_checkpointing_kwargs",
    "torch_compile": _R + _TASK_LOOP + ", which no compiler wraps",
    "torch_compile_backend": _R + "implies torch_compile: " + _TASK_LOOP + ", which no compiler wraps",
    "torch_compile_mode": _R + "implies torch_compile: " + _TASK_LOOP + ", which no compiler wraps",
    "use_liger_kernel": _R + "Liger kernels patch known architectures; ATM's MultiTaskModel is not one of them",
    "liger_kernel_config": _R + "Liger kernels patch known architectures; ATM's MultiTaskModel is not one of them",
    "use_cache": _I + "Trainer sets model.config.use_cache; MultiTaskModel (backbone + classification heads) "
    "generates nothing, so no key/value cache is built whatever its value",
    "neftune_noise_alpha": _R + "NEFTune noises the embeddings of instruction tuning inside Trainer's own loop; "
    "ATM fine-tunes classification heads",
    "torch_empty_cache_steps": _H + "Trainer.training_step clears the device cache every that many steps",
    "auto_find_batch_size": _R + "Trainer retries its own training loop with smaller batches; ATM's rounds are not "
    "that loop",
    # -- logging
    "logging_strategy": _H + "'steps': per-step logs of each fine-tuning every logging_steps plus one log per "
    "round; 'epoch': one log per round; 'no': neither (the final train() summary is logged, as in Trainer)",
    "logging_steps": _H + "per-step logs of each per-task fine-tuning (logging_strategy='steps')",
    "logging_first_step": _H + "the first optimizer step is logged (Trainer's DefaultFlowCallback)",
    "log_on_each_node": _H + "as in Trainer (which processes log)",
    "logging_nan_inf_filter": _H + "nan / inf step losses are left out of the logged loss, as in Trainer",
    "include_num_input_tokens_seen": _R + "ATM does not count input tokens",
    "log_level": _H + "Trainer sets the transformers log level of the main process",
    "log_level_replica": _H + "Trainer sets the transformers log level of the other processes",
    "disable_tqdm": _H + "Trainer's progress bar (ProgressCallback) over all optimizer steps of all rounds",
    "report_to": _H + "the integrations' callbacks receive every log (per-step and per-round)",
    "run_name": _H + "read by the report_to integrations",
    "project": _H + "read by the report_to integrations",
    "trackio_space_id": _H + "read by the trackio integration",
    "trackio_bucket_id": _H + "read by the trackio integration",
    "trackio_static_space_id": _H + "read by the trackio integration",
    "skip_memory_metrics": _R + "ATM reports no memory metrics (False is refused)",
    "debug": _R + "Trainer's debug options hook into its own training loop",
    # -- evaluation (per round)
    "eval_strategy": _H + _PER_ROUND + ": every round (and round 0, the starting model) is evaluated on the "
    "round split whatever the value, as ATM's history needs; 'epoch' (= per round) is what "
    "load_best_model_at_end and EarlyStoppingCallback need; 'steps' is refused",
    "eval_steps": _R + _PER_ROUND + "; per-step evaluation (eval_strategy='steps') is refused",
    "eval_delay": _R + "every round is evaluated (ATM's history and round selection need it)",
    "per_device_eval_batch_size": _H + "batch size of the per-round evaluation, evaluate() and predict()",
    "prediction_loss_only": _R + "ATM's evaluation reports accuracies, which need the predictions",
    "eval_on_start": _I + "ATM always evaluates round 0 (the starting model) before the first round",
    "eval_do_concat_batches": _H + _EVAL_LOOP,
    "eval_use_gather_object": _R + "ATM's evaluation gathers counts per task, not Python objects",
    "eval_accumulation_steps": _H + _EVAL_LOOP,
    "include_for_metrics": _R + "the per-round compute_metrics receives each task's predictions and labels only",
    "batch_eval_metrics": _R + "compute_metrics is called once per task on all of its predictions",
    # -- saving and the Hub
    "save_strategy": _H + _PER_ROUND + ": 'epoch' and 'steps' (TrainingArguments' default) write one "
    "checkpoint-round-{k} per round, on_save firing for each; 'no' writes none; 'best' is refused",
    "save_steps": _R + _PER_ROUND + "; ATM saves once per round (save_strategy='epoch')",
    "save_on_each_node": _H + "as in Trainer (args.should_save: which processes write)",
    "save_total_limit": _H + "the number of checkpoint-round-{k} folders kept (older ones removed)",
    "save_only_model": _R + "a round checkpoint must hold what resuming needs (RNG, optimizer states)",
    "enable_jit_checkpoint": _R + "ATM checkpoints at round boundaries only",
    "push_to_hub": _H + "save_model() pushes the saved model folder, once (round checkpoints never are)",
    "hub_token": _H + "used by push_to_hub (never written into saved files)",
    "hub_private_repo": _H + "the pushed repository's visibility",
    "hub_model_id": _H + "the pushed repository (default: the name of output_dir)",
    "hub_strategy": _H + "'every_save' (the default) and 'end' both push the model save_model() writes; 'checkpoint' and "
    "'all_checkpoints' (pushing round checkpoints) are refused",
    "hub_always_push": _I + "ATM pushes once, blocking, so no push is ever skipped",
    "hub_revision": _H + "the branch pushed to",
    # -- best round
    "load_best_model_at_end": _H + "in PA as in PH the model after train() is the best round (round 0 included, "
    "earliest on ties) by metric_for_best_model; needs eval_strategy = save_strategy = 'epoch'",
    "metric_for_best_model": _H + "a per-round metric (when unset: eval_mean_score, the mean of each task's main "
    "metric (task_metrics), which is eval_mean_accuracy when every task is scored by accuracy; or "
    "eval_<task>_accuracy, eval_<task>_<metric>, normalized scores, compute_metrics keys; the 'eval_' prefix "
    "optional); PH's round selection uses it too",
    "greater_is_better": _H + "direction of metric_for_best_model (default: True unless the name ends in 'loss')",
    # -- resuming, determinism, devices, distribution
    "ignore_data_skip": _I + "ATM resumes at round boundaries: there are no batches to skip",
    "restore_callback_states_from_checkpoint": _H + "stateful callbacks are restored from the round checkpoint",
    "resume_from_checkpoint": _I + "not read by Trainer; scripts pass it to train(resume_from_checkpoint=...), as "
    "ATM's recipes do",
    "full_determinism": _H + "Trainer enables deterministic algorithms at construction",
    "seed": _H + "every (round, task) fine-tuning is seeded from (seed, round, task)",
    "use_cpu": _H + "train and merge on the CPU",
    "accelerator_config": _H + "Trainer's Accelerator (distributed state, device) is built from it",
    "parallelism_config": _R + "ATM spreads rounds over processes itself (atm_parallel_mode)",
    "ddp_backend": _H + "the process group's backend (used by ATM's exchange)",
    "ddp_timeout": _H + "the process group's timeout (used by ATM's exchange)",
    "ddp_find_unused_parameters": _I + _NO_DDP + "; parameters without a gradient are skipped, which is what "
    "find_unused_parameters=True does, at no cost",
    "ddp_bucket_cap_mb": _H + "data_parallel: the size of the flat gradient buckets averaged over ranks (default "
    "32 MiB); task_parallel exchanges no gradients",
    "ddp_broadcast_buffers": _H + "data_parallel: buffers (running statistics) set to rank 0's after each task's "
    "fine-tuning unless False; task_parallel broadcasts no buffers",
    "ddp_static_graph": _I + _NO_DDP + "; there is no DDP reducer to hint",
    "fsdp": _H + "atm_parallel_mode='data_parallel' with several processes: the backbone sharded with FSDP2 "
    "(fully_shard per transformer layer and the backbone as root), task vectors sharded, saved folders whole; "
    "refused in task_parallel",
    "fsdp_config": _H + "with fsdp: version 2, reshard_after_forward, transformer_layer_cls_to_wrap; every other "
    "key refused unless it has transformers' neutral default (no cpu_offload, TRANSFORMER_BASED_WRAP without "
    "min_num_params, FULL_STATE_DICT, no activation_checkpointing (use gradient_checkpointing), no "
    "cpu_ram_efficient_loading, no XLA); refused without fsdp, with lora_r > 0 and with "
    "reset_optimizer_each_round=False",
    "deepspeed": _R + _NO_DEEPSPEED,
    "local_rank": _H + "set by the launcher; the process's rank in ATM's exchange",
    "do_train": _I + "not read by Trainer (scripts' flag)",
    "do_eval": _I + "not read by Trainer (scripts' flag)",
    "do_predict": _I + "not read by Trainer (scripts' flag)",
}


def _plain(value: Any) -> Any:
    """An enum's value (TrainingArguments turns strategy strings into enums), else `value`."""
    return value.value if isinstance(value, Enum) else value


def _ta_defaults() -> dict[str, Any]:
    """Each TrainingArguments field's default (its default_factory called)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


_TA_DEFAULTS = _ta_defaults()


def _truthy(cfg: ATMConfig, value: Any) -> bool:
    return bool(value)


_REFUSED_OPTIMIZERS = ("lomo", "adalomo")

#: honoured options' refused values (or a refused option's own test of "set"): option -> (refused?, why).
_REFUSED_VALUES: dict[str, tuple[Callable[[ATMConfig, Any], bool], str]] = {
    "eval_strategy": (lambda c, v: _plain(v) == "steps", _PER_ROUND + "; use eval_strategy='epoch' (per round)"),
    "save_strategy": (lambda c, v: _plain(v) == "best", _PER_ROUND + "; use save_strategy='epoch' with "
                      "load_best_model_at_end=True to get the best round"),
    "hub_strategy": (lambda c, v: _plain(v) in ("checkpoint", "all_checkpoints"),
                     "ATM pushes the final model only; use 'every_save' or 'end'"),
    "lr_scheduler_type": (lambda c, v: _plain(v) in ("reduce_lr_on_plateau", "greedy"),
                          "it steps on an evaluation metric, and ATM evaluates once per round, between fine-tunings"),
    "optim": (lambda c, v: (str(_plain(v)).endswith("_layerwise") or _plain(v) in _REFUSED_OPTIMIZERS
                            or str(_plain(v)).startswith("schedule_free")),
              "layer-wise and LOMO optimizers update inside backward, schedule-free ones keep their averaged "
              "weights in the optimizer; ATM steps a plain optimizer and takes task vectors from the model"),
    "train_sampling_strategy": (lambda c, v: v != "random",
                                "each (round, task) fine-tuning shuffles its data with a seeded RandomSampler"),
    "label_names": (lambda c, v: v is not None and list(v) != ["labels"],
                    "ATM's label column is 'labels' (or 'label', renamed)"),
    "include_num_input_tokens_seen": (lambda c, v: v not in ("no", False), "ATM does not count input tokens"),
    "debug": (lambda c, v: bool(v), "Trainer's debug options hook into its own training loop"),
    # set when truthy ("" and {} from a command line or a config file mean unset)
    "fsdp": (lambda c, v: bool(v) and c.atm_parallel_mode != "data_parallel", _FSDP_MODE),
    "fsdp_config": (lambda c, v: bool(v) and not c.fsdp, "fsdp_config has no effect without fsdp=True"),
    "deepspeed": (_truthy, _NO_DEEPSPEED),
}


def _refusal(cfg: ATMConfig, name: str) -> str | None:
    """Why `cfg`'s value of TrainingArguments option `name` is refused, or None when ATM takes it."""
    value = getattr(cfg, name)
    verdict = TRAINING_ARGUMENTS_CONTRACT[name]
    if name in _REFUSED_VALUES:
        refused, why = _REFUSED_VALUES[name]
        return why if refused(cfg, value) else None
    if verdict.startswith(_R) and _plain(value) != _plain(_TA_DEFAULTS[name]):
        return verdict[len(_R):]
    return None


@dataclass
class ATMConfig(TrainingArguments):
    """Training arguments of an ATM run (see the module docstring and the ``help`` of each field)."""

    atm_mode: str = field(
        default="pa",
        metadata={
            "help": "'pa': from a pre-trained model, rounds fine-tune on each task's train split. 'ph': "
            "post-hoc refinement of an already merged model, rounds fine-tune on the tuning part of each "
            "task's validation split and the best round is chosen on its held-out selection part.",
            "choices": list(ATM_MODES),
        },
    )
    rounds: int = field(default=10, metadata={"help": "Number of ATM rounds (tune every task, then merge)."})
    epochs_per_round: float = field(
        default=1.0, metadata={"help": "Epochs over each task's data per round (fractions allowed)."}
    )
    steps_per_round: int = field(
        default=-1,
        metadata={"help": "If > 0: optimizer steps per task per round, overriding epochs_per_round."},
    )
    merge_method: str = field(
        default="task_arithmetic",
        metadata={"help": "Merge applied to the round's task vectors.", "choices": list(ATM_MERGE_METHODS)},
    )
    # `float | str | None`: HfArgumentParser parses the field as a string (it keeps `str` from such a Union), so
    # that `--merge_scale auto` and `--merge_scale 0.5` both parse; __post_init__ turns numbers into floats.
    merge_scale: float | str | None = field(
        default=None,
        metadata={
            "help": _merge_help("scale", "lambda multiplying the merged task vector, or 'auto' (chosen every "
                                "round by a line search on the round split: merge_scale_candidates, "
                                "merge_scale_search_examples). Default: 1/n for task_arithmetic (the mean of the "
                                "task vectors, as the ATM authors ran it), 1.0 for every other method")
        },
    )
    merge_scale_candidates: list[float] | None = field(
        default=None,
        metadata={
            "help": "merge_scale='auto' only: the scales tried every round (absolute, finite, > 0). Default: "
            "0.5, 1, 1.5, 2, 3 and 4 times the method's default scale (1/n for task_arithmetic, 1.0 otherwise)."
        },
    )
    merge_scale_search_examples: int = field(
        default=64,
        metadata={
            "help": "merge_scale='auto': each candidate is scored by the model's mean loss on the first that "
            "many examples of each task's round split (validation; validation_select in PH mode), averaged "
            "over tasks; the lowest wins (the smaller scale on ties)."
        },
    )
    merge_weights: list[float] | None = field(
        default=None,
        metadata={"help": _merge_help("weights", "One weight per task, in sorted task-name order (default: all 1)")},
    )
    merge_density: float | None = field(default=None, metadata={"help": _merge_help("density")})
    merge_gamma: float | None = field(default=None, metadata={"help": _merge_help("gamma")})
    merge_epsilon: float | None = field(default=None, metadata={"help": _merge_help("epsilon")})
    merge_seed: int = field(
        default=0, metadata={"help": _merge_help("seed", "Seed of random masks (with the tensor, task and round)")}
    )
    merge_majority_sign_method: str | None = field(
        default=None,
        metadata={"help": _merge_help("majority_sign_method"), "choices": list(MAJORITY_SIGN_METHODS)},
    )
    merge_rescale: str | None = field(
        default=None, metadata={"help": _merge_help("rescale"), "choices": list(RESCALES)}
    )
    merge_normalize: bool | None = field(default=None, metadata={"help": _merge_help("normalize")})
    atm_parallel_mode: str = field(
        default="task_parallel",
        metadata={
            "help": "How a round is spread over processes: 'task_parallel' (tasks split over ranks, each rank "
            "fine-tunes its tasks alone) or 'data_parallel' (every rank fine-tunes every task on its share of "
            "each batch, gradients averaged: for models whose per-task batches do not fit one process; with "
            "fsdp=True the backbone is sharded with FSDP2, for models too large for one replica). Named "
            "atm_parallel_mode because TrainingArguments already has a parallel_mode property.",
            "choices": list(PARALLEL_MODES),
        },
    )
    merge_device: str = field(
        default="auto",
        metadata={
            "help": "Where task vectors and merge accumulators live: 'auto' (the model's device) or 'cpu' "
            "(accelerator memory for the model only).",
            "choices": list(MERGE_DEVICES),
        },
    )
    merge_accumulate_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the merge accumulators: 'auto' (float64 on the CPU, float32 on accelerators), "
            "'float32' or 'float64'.",
            "choices": list(ACCUMULATE_DTYPES),
        },
    )
    reset_optimizer_each_round: bool = field(
        default=True,
        metadata={
            "help": "Fresh optimizer and LR schedule for every task in every round (as in the paper). If "
            "False, each task keeps one optimizer and one schedule over all rounds (more memory)."
        },
    )
    # HfArgumentParser gives `bool | None` fields a required value: nargs / const make the bare flag true (its
    # type is string_to_bool already, so `--freeze_heads false` still parses).
    freeze_heads: bool | None = field(
        default=None,
        metadata={
            "nargs": "?",
            "const": True,
            "help": "Do not train the task heads. Default (unset): heads are frozen unless the model's "
            "head_init is 'random' (zero-shot, linear-probe and prototype heads stay as built); "
            "true / false force it (a bare --freeze_heads means true)."
        },
    )
    head_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of trainable heads (their own optimizer param group). Default: "
                  "learning_rate."},
    )
    ph_select_fraction: float = field(
        default=0.2,
        metadata={
            "help": "PH mode: fraction of each task's validation split held out (deterministically, by "
            "seed) to select the best round; the rest is what the rounds train on."
        },
    )
    lora_r: int = field(
        default=0,
        metadata={
            "help": "0: full fine-tuning. > 0: every round tunes a fresh LoRA adapter of this rank per task "
            "(peft) and merges its delta B@A*scaling into the backbone."
        },
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names for LoRA (default: peft's defaults for the architecture)."},
    )
    compute_cosine: bool = field(
        default=True,
        metadata={
            "help": "Record the pairwise cosine similarity of each round's task vectors in the history."
        },
    )
    task_metrics: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "Main metric per task, scoring its evaluations, the history, round selection and cards: "
            f"one of {', '.join(SHIPPED_METRICS)} or the path of an evaluate metric module; as "
            "'task=metric,task=metric' or a JSON object. Tasks not named: the model's config.task_metrics, "
            "else accuracy."
        },
    )

    def __post_init__(self) -> None:
        # Checked before TrainingArguments normalises the values (torch_compile_backend implies torch_compile,
        # load_best_model_at_end implies metric_for_best_model="loss"...), so the option the user set is named.
        self._check_atm_choices()
        self._check_merge_scale()
        self._check_training_arguments()
        self.task_metrics = parse_task_metrics(self.task_metrics)  # HfAtmError naming the option and value
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            # ATM's rounds compute scores, not an evaluation loss (transformers' default metric): the mean of
            # each task's main metric, which is eval_mean_accuracy when every task is scored by accuracy. Set
            # here (not decided in the trainer) so that EarlyStoppingCallback compares what rounds are
            # selected by.
            self.metric_for_best_model = "eval_mean_score"
        super().__post_init__()
        if self.fsdp:
            check_fsdp_args(self)  # ValueError naming the fsdp_config key / option ATM does not run with FSDP
        if self.merge_scale == "auto" and fsdp_requested(self):
            raise ValueError("merge_scale='auto' is not supported with FSDP (fsdp / accelerate's FSDP config): the "
                             "forward passes of the scale search are collectives it does not drive over the "
                             "sharded backbone; set merge_scale to a number")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        if self.steps_per_round <= 0 and not self.epochs_per_round > 0:
            raise ValueError(
                f"epochs_per_round must be > 0 (or steps_per_round > 0), got {self.epochs_per_round!r}"
            )
        if not 0.0 < self.ph_select_fraction < 1.0:
            raise ValueError(f"ph_select_fraction must be in (0, 1), got {self.ph_select_fraction!r}")
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise ValueError(f"head_learning_rate must be > 0 when given, got {self.head_learning_rate!r}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0, got {self.lora_r}")
        if self.lora_r > 0 and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        self.merge_spec(_fewest_tasks(self))  # the task count is known only at train time

    # -- validation -------------------------------------------------------------------------------------------
    def _check_atm_choices(self) -> None:
        """ValueError naming the ATM option whose value is not one of its choices."""
        for name, choices in (("atm_mode", ATM_MODES), ("atm_parallel_mode", PARALLEL_MODES),
                              ("merge_device", MERGE_DEVICES), ("merge_accumulate_dtype", ACCUMULATE_DTYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    def _check_merge_scale(self) -> None:
        """``merge_scale`` as a number, None or ``"auto"`` (a string from the command line is converted), and
        the options of the line search; ValueError naming the field."""
        scale = self.merge_scale
        if isinstance(scale, str):
            text = scale.strip()
            if text.lower() == "auto":
                self.merge_scale = "auto"
            else:
                try:
                    self.merge_scale = float(text)
                except ValueError:
                    raise ValueError(f"merge_scale must be a number or 'auto', got {scale!r}") from None
        elif scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise ValueError(f"merge_scale must be a number or 'auto', got {scale!r}")
        given = self.merge_scale_candidates
        if given is not None:
            if self.merge_scale != "auto":
                raise ValueError("merge_scale_candidates is read only with merge_scale='auto', got "
                                 f"merge_scale={self.merge_scale!r}")
            if isinstance(given, (str, bytes)) or not isinstance(given, (list, tuple)) or not given:
                raise ValueError(f"merge_scale_candidates must be a non-empty list of numbers, got {given!r}")
            for v in given:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                    raise ValueError(f"merge_scale_candidates: every scale must be a finite number > 0, got {v!r}")
            self.merge_scale_candidates = [float(v) for v in given]
        k = self.merge_scale_search_examples
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"merge_scale_search_examples must be an integer >= 1, got {k!r}")

    def _check_training_arguments(self) -> None:
        """ValueError naming the first TrainingArguments option ATM refuses (:data:`TRAINING_ARGUMENTS_CONTRACT`),
        then ATM's rule for the best round."""
        for name in TRAINING_ARGUMENTS_CONTRACT:
            why = _refusal(self, name)
            if why is not None:
                raise ValueError(f"{name}={_plain(getattr(self, name))!r} is not supported by ATM: {why}")
        if self.load_best_model_at_end and not (
            _plain(self.eval_strategy) == _plain(self.save_strategy) == "epoch"
        ):
            raise ValueError(
                "load_best_model_at_end needs eval_strategy='epoch' and save_strategy='epoch' (a round is ATM's "
                f"evaluation and save unit), got eval_strategy={_plain(self.eval_strategy)!r}, "
                f"save_strategy={_plain(self.save_strategy)!r}"
            )

    def _check_merge_options(self, num_tasks: int) -> None:
        """MergeConfigError naming the ``merge_*`` field whose value the method's record or the option's record
        refuses (method usable in ATM, option read by the method, type, choices, range, one weight per task)."""
        method = self.merge_method
        record = get_method(method, option="merge_method")
        if not record.in_atm:
            raise MergeConfigError(
                f"merge_method: {method!r} cannot merge task vectors inside ATM rounds; "
                f"known: {', '.join(ATM_MERGE_METHODS)}"
            )
        for option in ATM_MERGE_OPTIONS:
            name, value = merge_field(option), getattr(self, merge_field(option))
            if value is None:
                continue
            reads = record.takes_weights if option == "weights" else option in record.options
            if not reads and not (option in _NEUTRAL and value == _NEUTRAL[option]):
                raise MergeConfigError(
                    f"{name}: method {method!r} takes no {option}; only {', '.join(_readers(option))} do"
                )
            if option == "scale" and value == "auto":
                continue  # the line search's candidates: _check_merge_scale
            if isinstance(value, (list, tuple)):  # one value per task (the per-model options)
                if not OPTIONS[option].per_model:
                    raise MergeConfigError(f"{name}: expected one value, got a list {list(value)}")
                if len(value) != num_tasks:
                    raise MergeConfigError(f"{name} has {len(value)} entries but there are {num_tasks} tasks")
            elif option == "weights":
                raise MergeConfigError(f"{name} must be a list of numbers, got {value!r}")
            for v in value if isinstance(value, (list, tuple)) else [value]:
                _check_option_value(option, name, v)

    # -- the merge ---------------------------------------------------------------------------------------------
    def resolved_merge_scale(self, num_tasks: int) -> float:
        """``merge_scale``, or the in-loop default (:func:`hf_atm.atm.rounds.default_merge_scale`), which is
        also the reference scale the round's merge is built at with ``merge_scale="auto"``."""
        if self.merge_scale is not None and self.merge_scale != "auto":
            return float(self.merge_scale)
        return default_merge_scale(self.merge_method, num_tasks)

    def merge_scale_search(self, num_tasks: int) -> list[float] | None:
        """The scales ``merge_scale="auto"`` tries each round for `num_tasks` tasks, ascending
        (:func:`hf_atm.atm.scale_search.candidate_scales`); None for a fixed scale."""
        if self.merge_scale != "auto":
            return None
        return candidate_scales(default_merge_scale(self.merge_method, num_tasks), self.merge_scale_candidates)

    def merge_spec(self, num_tasks: int) -> MergeSpec:
        """The validated MergeSpec of the in-loop merge for `num_tasks` tasks (MergeConfigError naming the
        ``merge_*`` field at fault; rules between options name the fields involved)."""
        self._check_merge_options(num_tasks)
        given = {option: getattr(self, merge_field(option)) for option in ATM_MERGE_OPTIONS
                 if option not in ("weights", "scale") and getattr(self, merge_field(option)) is not None}
        spec = MergeSpec(
            method=self.merge_method,
            weights=tuple(float(w) for w in self.merge_weights) if self.merge_weights is not None else None,
            scale=self.resolved_merge_scale(num_tasks),
            **given,
        )
        try:
            spec.validate(num_tasks)
        except MergeConfigError as e:  # a rule between options (gamma + density <= 1, weights' sum...)
            fields = ", ".join(f"{merge_field(o)}={getattr(self, merge_field(o))!r}" for o in ATM_MERGE_OPTIONS
                               if getattr(self, merge_field(o)) is not None and o != "seed")
            raise MergeConfigError(
                f"merge_method={self.merge_method!r}{', ' + fields if fields else ''} with {num_tasks} "
                f"task(s): {e}"
            ) from e
        return spec


def _check_option_value(option: str, name: str, value: Any) -> None:
    """MergeConfigError naming field `name` unless `value` is one value of the kind registry option `option`
    takes (its type, choices and the registry's range)."""
    if option == "seed":
        if not isinstance(value, int) or isinstance(value, bool):
            raise MergeConfigError(f"{name} must be an integer, got {value!r}")
    elif option == "normalize":
        if not isinstance(value, bool):
            raise MergeConfigError(f"{name} must be true or false, got {value!r}")
    elif option in _OPTION_CHOICES:
        if value not in _OPTION_CHOICES[option]:
            raise MergeConfigError(f"{name} must be one of {', '.join(_OPTION_CHOICES[option])}, got {value!r}")
    else:
        problem = OPTIONS[option].check(value)
        if problem is not None:
            raise MergeConfigError(f"{name} must be {problem}, got {value!r}")


def _fewest_tasks(cfg: ATMConfig) -> int:
    """The task count ATMConfig can validate its merge for before the tasks are known: the length of a
    per-task list option when one is given, else the fewest tasks the method merges."""
    for option in ATM_MERGE_OPTIONS:
        value = getattr(cfg, merge_field(option))
        if isinstance(value, (list, tuple)):
            return len(value)
    return get_method(cfg.merge_method, option="merge_method").min_models
