"""ATMTrainer: a ``transformers.Trainer`` that alternates per-task fine-tuning and merging (ATM).

One round (``ATM.md``): ``theta`` = the current backbone; for each task ``i``, on its own data only,
``theta_i = finetune(theta, D_i, E epochs)`` with a fresh optimizer and schedule, ``tau_i = theta_i - theta``;
then ``theta = theta + merge(tau_1..tau_n)`` tensor by tensor (``merge_deltas``). Heads are not merged: each
task's head keeps what that task's fine-tuning made of it.

Modes:

* ``pa`` (from a pre-trained model): rounds train on each task's ``train`` split; every round is evaluated
  on ``validation``; the model after the last round is the result.
* ``ph`` (post-hoc refinement of an already merged model): each task's ``validation`` split is divided
  deterministically (``Dataset.train_test_split(test_size=ph_select_fraction, seed=args.seed)``) into a tuning
  part (``validation_tune``) that the rounds train on and a selection part (``validation_select``) that
  scores every round, round 0 (the starting merge) included; the best round by mean selection accuracy
  (earliest on ties) is the result. The selection part is never trained on, so the choice is honest;
  ``test`` stays untouched for the final report.

The per-task loop uses Trainer's own pieces (``create_optimizer`` / ``create_scheduler``, ``training_step``
-> ``compute_loss`` -> ``accelerator.backward``, ``_clip_grad_norm``, callbacks, ``self.log``) on the
unwrapped model: no DDP gradient synchronisation, since different processes train different tasks. Each
(round, task) fine-tuning seeds every RNG (data order, dropout, LoRA init) from ``(args.seed, round, task)``,
so results do not depend on which process runs a task, nor on resuming from a checkpoint.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from transformers import (
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    default_data_collator,
)
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import TrainOutput, set_seed

from hf_atm.atm.config import ATMConfig
from hf_atm.atm.distributed import DeltaCollector, TaskExchange, round_spec
from hf_atm.atm.evaluation import cosine_from_gram, mean_accuracy, mean_off_diagonal, normalized_accuracy
from hf_atm.atm.history import plot_history, write_history
from hf_atm.atm.model import MultiTaskModel, atomic_write_dir
from hf_atm.errors import CheckpointError, TaskDataError
from hf_atm.merging.spec import tensor_seed

__all__ = ["ATMTrainer", "prepare_task_data"]

CHECKPOINT_PREFIX = "checkpoint-round-"
ATM_STATE_FILE = "atm_state.json"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_state.safetensors"
BEST_FILE = "best.safetensors"
_CKPT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


# ----------------------------------------------------------------------------------------------------------
# task data
# ----------------------------------------------------------------------------------------------------------
def _input_columns(model: MultiTaskModel) -> set[str]:
    """Names the backbone's forward accepts (besides **kwargs)."""
    params = inspect.signature(model.backbone.forward).parameters
    return {k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _prepare_split(ds: Any, task: str, split: str, model: MultiTaskModel, torch_format: bool) -> Any:
    """The split with its label column named ``labels``, only model inputs kept, label names checked."""
    cols = list(ds.column_names)
    label_col = "labels" if "labels" in cols else "label" if "label" in cols else None
    if label_col is None:
        raise TaskDataError(f"task {task!r}, split {split!r}: no 'labels' or 'label' column (columns: {cols})")
    if len(ds) == 0:
        raise TaskDataError(f"task {task!r}, split {split!r} has no examples")
    names = model.tasks[task]
    feature = ds.features.get(label_col)
    if getattr(feature, "names", None) is not None and list(feature.names) != names:
        raise TaskDataError(
            f"task {task!r}, split {split!r}: label names {list(feature.names)} differ from the model's head "
            f"labels {names}"
        )
    labels = np.asarray(ds[label_col])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise TaskDataError(f"task {task!r}, split {split!r}: column {label_col!r} must hold integer class ids")
    if labels.min() < 0 or labels.max() >= len(names):
        raise TaskDataError(
            f"task {task!r}, split {split!r}: labels outside 0..{len(names) - 1} "
            f"(min {int(labels.min())}, max {int(labels.max())})"
        )
    keep = [c for c in cols if c in _input_columns(model)]
    if not keep:
        raise TaskDataError(
            f"task {task!r}, split {split!r}: no model input column (expected some of "
            f"{sorted(_input_columns(model))}, got {cols})"
        )
    if label_col == "label":
        ds = ds.rename_column("label", "labels")
    ds = ds.select_columns([*keep, "labels"])
    return ds.with_format("torch") if torch_format else ds


def prepare_task_data(
    task_datasets: Mapping[str, Any],
    model: MultiTaskModel,
    *,
    mode: str,
    select_fraction: float,
    seed: int,
    torch_format: bool = True,
) -> dict[str, dict[str, Any]]:
    """Check and prepare each task's DatasetDict; returns ``{task: {split: Dataset}}``.

    PA needs ``train`` and ``validation``; PH needs ``validation`` and adds ``validation_tune`` /
    ``validation_select`` (the deterministic split described in the module docstring). ``test`` is
    optional (only ``evaluate(split="test")`` needs it). Every problem raises TaskDataError naming the task
    and split, before any training.
    """
    if not isinstance(task_datasets, Mapping) or not task_datasets:
        raise TaskDataError("task_datasets must be a non-empty mapping {task name: DatasetDict}")
    out: dict[str, dict[str, Any]] = {}
    for task in sorted(task_datasets):
        dd = task_datasets[task]
        if task not in model.tasks:
            raise TaskDataError(f"task {task!r} has no head in the model (model tasks: {list(model.tasks)})")
        splits = list(dd.keys()) if hasattr(dd, "keys") else []
        required = ["train", "validation"] if mode == "pa" else ["validation"]
        for sp in required:
            if sp not in splits:
                raise TaskDataError(f"task {task!r} has no {sp!r} split (splits: {splits})")
        prepared = {
            sp: _prepare_split(dd[sp], task, sp, model, torch_format)
            for sp in ("train", "validation", "test")
            if sp in splits
        }
        if mode == "ph":
            val = prepared["validation"]
            n_sel = int(math.ceil(select_fraction * len(val)))
            if n_sel < 1 or len(val) - n_sel < 1:
                raise TaskDataError(
                    f"task {task!r}: validation has {len(val)} examples, too few to hold out "
                    f"ph_select_fraction={select_fraction} for round selection"
                )
            parts = val.train_test_split(test_size=n_sel, seed=seed, shuffle=True)
            prepared["validation_tune"] = parts["train"]
            prepared["validation_select"] = parts["test"]
        out[task] = prepared
    return out


# ----------------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------------
class ATMTrainer(Trainer):
    """Alternating Tuning and Merging through Trainer's public face.

    Args:
        model: the MultiTaskModel (pre-trained backbone for ``pa``; the merged start for ``ph``).
        args: an :class:`ATMConfig`.
        task_datasets: ``{task: DatasetDict(train/validation/test)}``, preprocessed to model inputs plus an
            integer ``labels`` (or ``label``) column.
        data_collator: default ``DataCollatorWithPadding(processing_class)`` for a tokenizer, else
            ``default_data_collator``.
        processing_class: tokenizer / image processor, saved with the model.
        callbacks: TrainerCallbacks (``on_step_*`` per optimizer step of a task, ``on_epoch_*`` per round,
            ``on_log`` for training logs and per-round metrics, ``on_evaluate`` per round).
        reference_accuracies: ``{task: accuracy of the model fine-tuned on that task alone}`` for
            normalized accuracy.
        optimizer_cls_and_kwargs: as in Trainer (used for every per-task optimizer).

    After ``train()``: ``trainer.history`` (list of per-round dicts, round 0 = the starting model),
    ``trainer.best_round`` (PH: the selected round; PA: the last), ``history.json`` and PNG plots in
    ``output_dir``, and ``checkpoint-round-{k}`` folders (unless ``save_strategy="no"``).
    """

    # compute_loss returns a per-batch mean: Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: MultiTaskModel,
        args: ATMConfig,
        task_datasets: Mapping[str, Any],
        data_collator: Any | None = None,
        processing_class: Any | None = None,
        callbacks: list[TrainerCallback] | None = None,
        reference_accuracies: Mapping[str, float] | None = None,
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
    ) -> None:
        if not isinstance(model, MultiTaskModel):
            raise TypeError(f"model must be a MultiTaskModel, got {type(model).__name__}")
        if not isinstance(args, ATMConfig):
            raise TypeError(f"args must be an ATMConfig, got {type(args).__name__}")
        if args.lora_r > 0 and not args.reset_optimizer_each_round:
            raise ValueError(
                "reset_optimizer_each_round=False cannot be combined with lora_r > 0: each round tunes a "
                "fresh LoRA adapter, so there is no optimizer state to carry over"
            )
        padding = isinstance(processing_class, PreTrainedTokenizerBase)
        collator = data_collator or (DataCollatorWithPadding(processing_class) if padding else default_data_collator)
        # Python lists for tokenizer padding; tensors for everything else (fast default collation).
        torch_format = not isinstance(collator, DataCollatorWithPadding)
        data = prepare_task_data(
            task_datasets, model, mode=args.atm_mode, select_fraction=args.ph_select_fraction,
            seed=args.seed, torch_format=torch_format,
        )
        tasks = sorted(data)
        spec = args.merge_spec(len(tasks))
        if reference_accuracies is not None:
            normalized_accuracy({t: 1.0 for t in tasks}, reference_accuracies)  # KeyError / ValueError early
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
        )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("ATMTrainer runs plain (non-sharded) replicas: DeepSpeed / FSDP are not supported")
        self.task_names: list[str] = tasks
        self.task_data = data
        self.merge_spec_ = spec
        self.reference_accuracies = dict(reference_accuracies) if reference_accuracies is not None else None
        self.exchange = TaskExchange(tasks)
        self.history: list[dict[str, Any]] = []
        self.best_round: int | None = None
        self.test_metrics: dict[str, float] | None = None
        #: seconds spent, summed over rounds: per-task training steps, per-task setup (optimizer, schedule,
        #: data loader, LoRA injection), merging (snapshot, task vectors, exchange, merge), evaluation,
        #: checkpoints, and reporting (history.json, plots).
        self.timing: dict[str, float] = {"train": 0.0, "setup": 0.0, "merge": 0.0, "eval": 0.0,
                                         "checkpoint": 0.0, "report": 0.0}
        self._best_score = -math.inf
        self._best_state: dict[str, torch.Tensor] | None = None
        self._active_task: str | None = None
        self._persistent: dict[str, tuple[Any, Any]] = {}
        self._pending_opt_state: dict[str, dict[str, Any]] = {}
        self._round = 0
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._train_split = "train" if args.atm_mode == "pa" else "validation_tune"
        self._round_split = "validation" if args.atm_mode == "pa" else "validation_select"
        if args.freeze_heads:
            for p in model.heads.parameters():
                p.requires_grad_(False)
        if args.lora_r > 0:
            self._check_lora_targets()

    # -- Trainer hooks ------------------------------------------------------------------------------------
    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """No network at construction: the repo is created by :meth:`push_to_hub`."""
        self.hub_model_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> Any:
        """bf16 autocast when ``args.bf16`` (accelerate would add it when preparing the model, which ATM's
        per-task loop does not do)."""
        if self.args.bf16:
            return torch.autocast(
                device_type=self.args.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled
            )
        return nullcontext()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """Trainer's compute_loss with the active task routed to the model (unless the batch is mixed)."""
        if self._active_task is not None and "task_ids" not in inputs and "task" not in inputs:
            inputs = {**inputs, "task": self._active_task}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    # -- helpers ------------------------------------------------------------------------------------------
    def _task_seed(self, round_idx: int, task: str) -> int:
        """The seed of one (round, task) fine-tuning: a pure function of ``(args.seed, round, task)``."""
        return tensor_seed(self.args.seed, f"atm/{round_idx}/{task}") % (2**32)

    def _num_batches(self, ds: Any) -> int:
        bs = self.args.per_device_train_batch_size
        return len(ds) // bs if self.args.dataloader_drop_last else -(-len(ds) // bs)

    def steps_per_round(self, task: str, split: str | None = None, epochs: float | None = None) -> int:
        """Optimizer steps of `task`'s fine-tuning in one round: ``steps_per_round`` if > 0, else
        ``ceil(epochs_per_round * ceil(batches / gradient_accumulation_steps))`` (at least 1)."""
        if self.args.steps_per_round > 0 and epochs is None:
            return int(self.args.steps_per_round)
        ds = self.task_data[task][split or self._train_split]
        nb = self._num_batches(ds)
        if nb < 1:
            raise TaskDataError(f"task {task!r}: fewer examples than one batch with dataloader_drop_last")
        per_epoch = -(-nb // self.args.gradient_accumulation_steps)
        e = self.args.epochs_per_round if epochs is None else epochs
        return max(1, int(math.ceil(e * per_epoch)))

    def _train_loader(self, ds: Any, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        return DataLoader(
            ds,
            batch_size=self.args.per_device_train_batch_size,
            sampler=RandomSampler(ds, generator=g),
            collate_fn=self.data_collator,
            drop_last=self.args.dataloader_drop_last,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and self.args.device.type == "cuda",
            generator=g,
        )

    def _update_groups(self, loader: DataLoader, task: str) -> Iterator[list[Any]]:
        """Micro-batches grouped per optimizer step, epoch after epoch (each epoch a new shuffle); the last
        group of an epoch holds the remainder, as in Trainer."""
        ga = self.args.gradient_accumulation_steps
        while True:
            group: list[Any] = []
            seen = 0
            for batch in loader:
                seen += 1
                group.append(batch)
                if len(group) == ga:
                    yield group
                    group = []
            if group:
                yield group
            if seen == 0:
                raise TaskDataError(f"task {task!r}: the training data loader yields no batch")

    def _view(self, task: str | None) -> nn.Module:
        """The modules one fine-tuning trains: the backbone and the task's head (all heads when mixed)."""
        model: MultiTaskModel = self.model
        view = nn.ModuleDict({"backbone": model.backbone})
        if task is None:
            view["heads"] = model.heads
        else:
            view["head"] = model.heads[task]
        return view

    # -- one fine-tuning ----------------------------------------------------------------------------------
    def _finetune(
        self,
        task: str | None,
        dataset: Any,
        *,
        steps: int,
        seed: int,
        round_idx: int,
        persistent_key: str | None = None,
        schedule_steps: int | None = None,
    ) -> dict[str, Any]:
        """Fine-tune the current model on `dataset` for `steps` optimizer steps (one task, or mixed batches
        with ``task_ids`` when `task` is None). Returns ``{"loss", "steps", "train_seconds",
        "setup_seconds"}`` and, with LoRA, ``"tau"`` (``{weight name: B @ A * scaling}``)."""
        args = self.args
        model: MultiTaskModel = self.model
        t0 = time.perf_counter()
        set_seed(seed)
        peft_model = self._inject_lora() if args.lora_r > 0 else None
        view = self._view(task)
        key = persistent_key if not args.reset_optimizer_each_round else None
        if key is not None and key in self._persistent:
            self.optimizer, self.lr_scheduler = self._persistent[key]
        else:
            self.optimizer, self.lr_scheduler = None, None
            self.create_optimizer(view)
            self.create_scheduler(num_training_steps=schedule_steps or steps)
            if key is not None:
                self._persistent[key] = (self.optimizer, self.lr_scheduler)
                pending = self._pending_opt_state.pop(key, None)
                if pending is not None:
                    self.optimizer.load_state_dict(pending["optimizer"])
                    self.lr_scheduler.load_state_dict(pending["scheduler"])
        self.callback_handler.optimizer = self.optimizer
        self.callback_handler.lr_scheduler = self.lr_scheduler
        groups = self._update_groups(self._train_loader(dataset, seed), task or "joint")
        setup_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        model.train()
        self._active_task = task
        loss_sum = torch.zeros((), device=args.device)
        logged_sum = torch.zeros((), device=args.device)
        last_logged = 0
        prefix = task or "joint"
        epoch0 = float(round_idx - 1)
        try:
            for s in range(steps):
                group = next(groups)
                self.current_gradient_accumulation_steps = len(group)
                self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
                step_loss = torch.zeros((), device=args.device)
                for i, inputs in enumerate(group):
                    step_loss = step_loss + self.training_step(model, inputs)
                    if i < len(group) - 1:
                        self.control = self.callback_handler.on_substep_end(args, self.state, self.control)
                grad_norm = None
                if args.max_grad_norm is not None and args.max_grad_norm > 0:
                    grad_norm = self._clip_grad_norm(view)
                self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
                self.optimizer.step()
                self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
                lr = self._get_learning_rate()
                self.lr_scheduler.step()
                view.zero_grad(set_to_none=True)
                loss_sum += step_loss.detach()
                logged_sum += step_loss.detach()
                self.state.global_step += 1
                self.state.epoch = epoch0 + (self._round_steps_done + s + 1) / max(1, self._round_steps_total)
                self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                if self.control.should_log:
                    logs = {
                        f"{prefix}/loss": logged_sum.item() / (s + 1 - last_logged),
                        f"{prefix}/learning_rate": lr,
                    }
                    if grad_norm is not None:
                        logs[f"{prefix}/grad_norm"] = float(grad_norm)
                    logged_sum.zero_()
                    last_logged = s + 1
                    self.control.should_log = False
                    self.log(logs)
                # ATM evaluates and saves once per round, not on Trainer's step schedule.
                self.control.should_evaluate = False
                self.control.should_save = False
        finally:
            self._active_task = None
        self._round_steps_done += steps
        out: dict[str, Any] = {
            "loss": loss_sum.item() / max(1, steps),
            "steps": steps,
            "train_seconds": time.perf_counter() - t1,
            "setup_seconds": setup_s,
        }
        if peft_model is not None:
            t2 = time.perf_counter()
            out["tau"] = self._remove_lora(peft_model)
            out["setup_seconds"] += time.perf_counter() - t2
        return out

    # -- LoRA ---------------------------------------------------------------------------------------------
    def _inject_lora(self) -> Any:
        """Wrap the backbone's target modules with a fresh LoRA adapter (peft); base weights frozen."""
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=self.args.lora_r,
            lora_alpha=self.args.lora_alpha,
            target_modules=self.args.lora_target_modules,
            lora_dropout=0.0,
            bias="none",
        )
        return get_peft_model(self.model.backbone, cfg)

    def _check_lora_targets(self) -> None:
        """Inject and remove an adapter once, so that bad target modules fail before any training."""
        try:
            peft_model = self._inject_lora()
        except ValueError as e:  # peft's NoMatchingPeftModuleError / unknown architecture
            raise ValueError(f"lora_target_modules={self.args.lora_target_modules!r}: {e}") from e
        self._remove_lora(peft_model)

    def _remove_lora(self, peft_model: Any) -> dict[str, torch.Tensor]:
        """The adapter's deltas ``{"<module>.weight": B @ A * scaling}``, then the adapter is removed
        (backbone weights unchanged) and the backbone made trainable again."""
        from peft.tuners.lora import LoraLayer

        backbone = self.model.backbone
        tau = {}
        for name, module in backbone.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                with torch.no_grad():
                    tau[f"{name}.weight"] = module.get_delta_weight("default").detach().float()
        peft_model.base_model.unload()
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in backbone.__dict__:
                delattr(backbone, attr)
        for p in backbone.parameters():
            p.requires_grad_(True)
        return tau

    # -- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _count_correct(self, task: str, ds: Any) -> tuple[int, int]:
        model: MultiTaskModel = self.model
        loader = DataLoader(
            ds,
            batch_size=self.args.per_device_eval_batch_size,
            sampler=SequentialSampler(ds),
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        was_training = model.training
        model.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.args.device)
        total = 0
        try:
            for batch in loader:
                batch = self._prepare_inputs(batch)
                labels = batch.pop("labels")
                with self.autocast_smart_context_manager():
                    logits = model(task=task, **batch).logits
                correct += (logits.argmax(-1) == labels).sum()
                total += int(labels.shape[0])
        finally:
            model.train(was_training)
        return int(correct.item()), total

    def _accuracies(self, datasets: Mapping[str, Any]) -> dict[str, float]:
        """Accuracy per task of `datasets`; each process evaluates its own tasks, counts are summed."""
        names = [t for t in self.task_names if t in datasets] + sorted(set(datasets) - set(self.task_names))
        counts = torch.zeros(len(names), 2, dtype=torch.float64)
        mine = set(self.exchange.my_tasks()) if self.exchange.distributed else set(names)
        for j, t in enumerate(names):
            owner_here = t in mine or (t not in self.task_names and self.exchange.rank == 0)
            if owner_here:
                c, n = self._count_correct(t, datasets[t])
                counts[j, 0], counts[j, 1] = c, n
        counts = self.exchange.all_reduce_sum(counts)
        return {t: float(counts[j, 0] / counts[j, 1]) if counts[j, 1] > 0 else math.nan
                for j, t in enumerate(names)}

    def _metrics(self, acc: Mapping[str, float], prefix: str) -> dict[str, float]:
        m = {f"{prefix}_{t}_accuracy": a for t, a in acc.items()}
        m[f"{prefix}_mean_accuracy"] = mean_accuracy(acc)
        norm = normalized_accuracy(acc, self.reference_accuracies)
        if norm is not None:
            m.update({f"{prefix}_{t}_normalized_accuracy": v for t, v in norm.items()})
            m[f"{prefix}_mean_normalized_accuracy"] = mean_accuracy(norm)
        return m

    def evaluate(
        self,
        eval_dataset: Mapping[str, Any] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        split: str | None = None,
    ) -> dict[str, float]:
        """Accuracy of the current model per task, with Trainer's key convention:
        ``{"<prefix>_<task>_accuracy", "<prefix>_mean_accuracy"}`` plus normalized accuracies when
        reference accuracies were given. `eval_dataset` is ``{task: Dataset}``; otherwise `split` of every
        task (default: the per-round split, ``validation`` for PA, ``validation_select`` for PH; also
        ``test``, ``train``, ``validation``, ``validation_tune``). Logged and passed to ``on_evaluate``."""
        t0 = time.perf_counter()
        if eval_dataset is not None:
            if not isinstance(eval_dataset, Mapping):
                raise TypeError("eval_dataset must be a mapping {task: Dataset}")
            datasets = {}
            for t, ds in eval_dataset.items():
                if t not in self.model.tasks:
                    raise TaskDataError(f"eval_dataset: task {t!r} has no head in the model")
                datasets[t] = _prepare_split(ds, t, "eval_dataset", self.model,
                                             not isinstance(self.data_collator, DataCollatorWithPadding))
        else:
            split = split or self._round_split
            missing = [t for t in self.task_names if split not in self.task_data[t]]
            if missing:
                raise TaskDataError(f"split {split!r} is missing for task(s) {missing}")
            datasets = {t: self.task_data[t][split] for t in self.task_names}
        acc = self._accuracies(datasets)
        metrics = self._metrics(acc, metric_key_prefix)
        if split == "test" and eval_dataset is None:
            self.test_metrics = dict(metrics)
        self.timing["eval"] += time.perf_counter() - t0
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """Not available on a multi-task trainer: use ``trainer.model.predict(task, **inputs)``."""
        raise NotImplementedError("ATMTrainer.predict: use trainer.model.predict(task, **inputs) per task")

    def _buffer(self, key: tuple, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A tensor shaped like `like` kept across rounds under `key` (reallocated if shape, dtype or
        device changed)."""
        b = self._buffers.get(key)
        if b is None or b.shape != like.shape or b.dtype != dtype or b.device != like.device:
            b = torch.empty(like.shape, dtype=dtype, device=like.device)
            self._buffers[key] = b
        return b

    @contextmanager
    def _merge_threads(self) -> Iterator[None]:
        """On CPU, run the merge bookkeeping single-threaded: its ops are small, memory-bound and many (a few
        per tensor), and an OpenMP fork/join per op costs more than it gains -- on a busy machine each
        join can wait a whole scheduler time slice (measured: 4-19 s instead of 0.07-0.27 s per round for
        a 3.5M-parameter BERT on 2 loaded cores). One thread also makes SVD-based merges (tsv, iso_c) and
        the cosine products independent of the thread count. The previous setting is restored."""
        if self.args.device.type != "cpu":
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    # -- one round ----------------------------------------------------------------------------------------
    def _run_round(self, k: int) -> dict[str, Any]:
        """Tune this process's tasks from the current backbone, merge everyone's task vectors into it, and
        return the round's stats (already reduced over processes)."""
        args = self.args
        model: MultiTaskModel = self.model
        tensors = model.backbone_tensors()
        mine = self.exchange.my_tasks()
        t0 = time.perf_counter()
        lora = args.lora_r > 0
        theta = None
        with self._merge_threads():
            if not lora:
                theta = {n: self._buffer(("theta", n), t, t.dtype).copy_(t.detach()) for n, t in tensors.items()}
            collector = DeltaCollector(
                self.exchange, round_spec(self.merge_spec_, k), list(tensors),
                {n: t.shape for n, t in tensors.items()}, {n: t.dtype for n, t in tensors.items()},
                args.compute_cosine, buffers=self._buffers,
            )
        merge_s = time.perf_counter() - t0
        self._round_steps_done = 0
        self._round_steps_total = sum(self._steps[t] for t in mine)
        n = len(self.task_names)
        sums = torch.zeros(2 * n, dtype=torch.float64)  # per-task loss, per-task steps
        times = torch.zeros(2, dtype=torch.float64)  # train, setup seconds (max over processes)
        for pos, task in enumerate(mine):
            if theta is not None and pos > 0:  # back to the round's starting point for the next task
                tm = time.perf_counter()
                with self._merge_threads(), torch.no_grad():
                    for name, t in tensors.items():
                        t.copy_(theta[name])
                merge_s += time.perf_counter() - tm
            run = self._finetune(
                task, self.task_data[task][self._train_split], steps=self._steps[task],
                seed=self._task_seed(k, task), round_idx=k, persistent_key=task,
                schedule_steps=None if args.reset_optimizer_each_round else self._steps[task] * args.rounds,
            )
            tm = time.perf_counter()
            with self._merge_threads():
                if lora:
                    tau = run.pop("tau")
                else:
                    # float32 task vectors (float64 kept), written into buffers reused across rounds; in
                    # "sum" mode the collector consumes them at once, so one set of buffers serves every task.
                    slot = task if collector.mode == "gather" else "_shared"
                    tau = {}
                    for name, t in tensors.items():
                        buf = self._buffer(("tau", slot, name), t, torch.float64 if t.dtype == torch.float64
                                           else torch.float32)
                        tau[name] = buf.copy_(t.detach()).sub_(theta[name])
                collector.add(task, tau)
                del tau
            merge_s += time.perf_counter() - tm
            j = self.task_names.index(task)
            sums[j], sums[n + j] = run["loss"], run["steps"]
            times[0] += run["train_seconds"]
            times[1] += run["setup_seconds"]
        tm = time.perf_counter()
        with self._merge_threads(), torch.no_grad():
            delta, gram = collector.finish()
            for name, t in tensors.items():
                if name not in delta:
                    if theta is not None:
                        t.copy_(theta[name])
                    continue
                base = theta[name] if theta is not None else t
                d = delta[name].to(t.device)
                if t.dtype == d.dtype:  # same single rounding as base + d, without a temporary
                    if base is not t:
                        t.copy_(base)
                    t.add_(d)
                else:
                    t.copy_((base.to(d.dtype) + d).to(t.dtype))
        del theta, delta
        self.exchange.broadcast_heads_(model.heads, self.task_names)
        merge_s += time.perf_counter() - tm
        sums = self.exchange.all_reduce_sum(sums)
        times = self.exchange.all_reduce_max(torch.cat([times, torch.tensor([merge_s], dtype=torch.float64)]))
        self.state.global_step = self._step_base + int(sums[n:].sum().item())
        self._step_base = self.state.global_step
        return {
            "train_loss": {t: float(sums[j]) for j, t in enumerate(self.task_names)},
            "steps": int(sums[n:].sum().item()),
            "train_seconds": float(times[0]),
            "setup_seconds": float(times[1]),
            "merge_seconds": float(times[2]),
            "gram": gram,
        }

    def _history_entry(self, k: int, acc: Mapping[str, float], gram: torch.Tensor | None,
                       stats: Mapping[str, Any] | None, eval_s: float) -> dict[str, Any]:
        norm = normalized_accuracy(acc, self.reference_accuracies)
        cos = cosine_from_gram(gram) if gram is not None else None
        return {
            "round": k,
            "accuracy": dict(acc),
            "mean_accuracy": mean_accuracy(acc),
            "normalized_accuracy": norm,
            "mean_normalized_accuracy": mean_accuracy(norm) if norm is not None else None,
            "cosine": cos,
            "mean_cosine": mean_off_diagonal(cos),
            "tasks": list(self.task_names),
            "split": self._round_split,
            "train_seconds": stats["train_seconds"] if stats else 0.0,
            "merge_seconds": stats["merge_seconds"] if stats else 0.0,
            "setup_seconds": stats["setup_seconds"] if stats else 0.0,
            "eval_seconds": eval_s,
            "train_loss": dict(stats["train_loss"]) if stats else None,
            "steps": stats["steps"] if stats else 0,
        }

    def _record(self, entry: dict[str, Any]) -> None:
        """Append a history entry, log it, track the best round (PH) and write ``history.json``."""
        self.history.append(entry)
        logs: dict[str, float] = {"round": float(entry["round"])}
        logs.update({f"eval_{t}_accuracy": a for t, a in entry["accuracy"].items()})
        logs["eval_mean_accuracy"] = entry["mean_accuracy"]
        if entry["normalized_accuracy"] is not None:
            logs.update({f"eval_{t}_normalized_accuracy": a for t, a in entry["normalized_accuracy"].items()})
            logs["eval_mean_normalized_accuracy"] = entry["mean_normalized_accuracy"]
        if entry["mean_cosine"] is not None:
            logs["mean_cosine"] = entry["mean_cosine"]
        if entry["train_loss"] is not None:
            logs.update({f"train_{t}_loss": v for t, v in entry["train_loss"].items()})
        for key in ("train_seconds", "merge_seconds", "setup_seconds"):
            logs[key] = entry[key]
        self.log(logs)
        metrics = {k: v for k, v in logs.items() if k.startswith("eval_")}
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        score = entry["mean_accuracy"]
        if self.args.atm_mode == "ph":
            if score > self._best_score:
                self._best_score = score
                self.best_round = entry["round"]
                self._best_state = self._snapshot()
        else:
            self._best_score, self.best_round = score, entry["round"]
        if self.args.should_save:
            t0 = time.perf_counter()
            write_history(self.history, self.args.output_dir)
            self.timing["report"] += time.perf_counter() - t0

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """Backbone and heads, detached copies on CPU (keys ``backbone.<name>`` / ``heads.<task>.<p>``)."""
        model: MultiTaskModel = self.model
        out = {f"backbone.{k}": v.detach().to("cpu", copy=True).contiguous()
               for k, v in model.backbone_tensors().items()}
        out.update({f"heads.{k}": v for k, v in model.heads_state_dict().items()})
        return out

    def _restore(self, snap: Mapping[str, torch.Tensor]) -> None:
        model: MultiTaskModel = self.model
        with torch.no_grad():
            for k, t in model.backbone_tensors().items():
                t.copy_(snap[f"backbone.{k}"])
            for task, head in model.heads.items():
                for p, t in head.state_dict(keep_vars=True).items():
                    t.data.copy_(snap[f"heads.{task}.{p}"])

    def _init_state(self, max_steps: int, num_rounds: int) -> None:
        """A fresh TrainerState for `max_steps` optimizer steps over `num_rounds` rounds (Trainer's fields:
        logging / eval / save steps resolved, stateful callbacks registered)."""
        self.state = TrainerState(
            stateful_callbacks=[
                cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)
            ]
        )
        self.state.train_batch_size = self.args.per_device_train_batch_size
        self.state.compute_steps(self.args, max_steps)
        self.state.init_training_references(self, max_steps, num_rounds, None)
        self._step_base = 0
        self._round_steps_done, self._round_steps_total = 0, max(1, max_steps)

    # -- train --------------------------------------------------------------------------------------------
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> TrainOutput:
        """Run ``args.rounds`` ATM rounds (resuming after the last saved round when asked).

        `resume_from_checkpoint`: True (the latest ``checkpoint-round-*`` in ``output_dir``) or a checkpoint
        folder. The result is the same as an uninterrupted run (bit-identical on CPU).
        """
        if trial is not None:
            raise ValueError("ATMTrainer does not support hyperparameter search trials")
        args = self.args
        self.is_in_train = True
        start_time = time.time()
        ckpt = self._resolve_checkpoint(resume_from_checkpoint)
        self._steps = {t: self.steps_per_round(t) for t in self.task_names}
        max_steps = args.rounds * sum(self._steps.values())
        self._init_state(max_steps, args.rounds)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        if ckpt is not None:
            self._load_round_checkpoint(ckpt, max_steps)
        else:
            self.exchange.broadcast_module_(self.model, src=0)  # every process starts from rank 0's model
            self.history, self._best_score, self.best_round, self._round = [], -math.inf, None, 0
            te = time.perf_counter()
            acc = self._accuracies({t: self.task_data[t][self._round_split] for t in self.task_names})
            eval_s = time.perf_counter() - te
            self.timing["eval"] += eval_s
            self._record(self._history_entry(0, acc, None, None, eval_s))
        self.model.zero_grad(set_to_none=True)

        for k in range(self._round + 1, args.rounds + 1):
            self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            stats = self._run_round(k)
            self.timing["train"] += stats["train_seconds"]
            self.timing["setup"] += stats["setup_seconds"]
            self.timing["merge"] += stats["merge_seconds"]
            self.state.epoch = float(k)
            te = time.perf_counter()
            acc = self._accuracies({t: self.task_data[t][self._round_split] for t in self.task_names})
            eval_s = time.perf_counter() - te
            self.timing["eval"] += eval_s
            self._round = k
            self._record(self._history_entry(k, acc, stats["gram"], stats, eval_s))
            if args.save_strategy != "no":
                tc = time.perf_counter()
                self._save_round_checkpoint(k)
                self.timing["checkpoint"] += time.perf_counter() - tc
            self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
            self.control.should_save = self.control.should_evaluate = self.control.should_log = False
            if self.exchange.any_true(bool(self.control.should_training_stop)) and k < args.rounds:
                break

        self._buffers.clear()  # round buffers (snapshot, task vectors, accumulators): free the memory
        if args.atm_mode == "ph" and self._best_state is not None and self.best_round != self._round:
            self._restore(self._best_state)
        if args.should_save:
            t0 = time.perf_counter()
            write_history(self.history, args.output_dir)
            plot_history(self.history, args.output_dir)
            self.timing["report"] += time.perf_counter() - t0
        losses = [v for h in self.history if h["train_loss"] for v in h["train_loss"].values()]
        train_loss = float(sum(losses) / len(losses)) if losses else math.nan
        metrics = {
            "train_runtime": round(time.time() - start_time, 4),
            "train_loss": train_loss,
            "train_rounds": float(self._round),
            "best_round": float(self.best_round if self.best_round is not None else self._round),
            "total_flos": 0.0,
        }
        self.log(dict(metrics))
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        self.is_in_train = False
        if args.push_to_hub:
            self.push_to_hub()
        return TrainOutput(self.state.global_step, train_loss, metrics)

    # -- checkpoints --------------------------------------------------------------------------------------
    def _checkpoints(self) -> list[tuple[int, Path]]:
        root = Path(self.args.output_dir)
        if not root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
        return sorted((k, p) for k, p in found if (p / ATM_STATE_FILE).is_file())

    def _resolve_checkpoint(self, resume: str | bool | None) -> Path | None:
        # From the command line (TrainingArguments.resume_from_checkpoint is a str) "True" means the latest.
        if isinstance(resume, str) and resume.strip().lower() in ("true", "false", ""):
            resume = resume.strip().lower() == "true"
        if resume is None or resume is False:
            return None
        if resume is True:
            found = self._checkpoints()
            if not found:
                raise CheckpointError(f"no {CHECKPOINT_PREFIX}* folder to resume from in {self.args.output_dir}")
            return found[-1][1]
        path = Path(resume)
        if not (path / ATM_STATE_FILE).is_file():
            raise CheckpointError(f"{path} is not an ATM round checkpoint (no {ATM_STATE_FILE})")
        return path

    def _fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this trainer."""
        a = self.args
        return {
            "tasks": list(self.task_names),
            "atm_mode": a.atm_mode,
            "merge": self.merge_spec_.to_dict(),
            "lora_r": a.lora_r,
            "seed": a.seed,
            "steps": dict(self._steps),
        }

    def _save_round_checkpoint(self, k: int) -> None:
        """Write ``checkpoint-round-{k}`` (temporary folder, then rename) and rotate old ones."""
        args = self.args
        root = Path(args.output_dir)
        final = root / f"{CHECKPOINT_PREFIX}{k}"
        tmp = root / f".tmp-{CHECKPOINT_PREFIX}{k}"
        if args.should_save:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.exchange.barrier()
        # Persistent optimizers live on their owners: each process writes its own.
        for task, (opt, sched) in self._persistent.items():
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / f"optimizer-{task}.pt")
        self.exchange.barrier()
        if args.should_save:
            self.model.write_files(tmp, self.processing_class)
            state = {
                "round": k,
                "history": self.history,
                "best_round": self.best_round,
                "best_score": self._best_score if math.isfinite(self._best_score) else None,
                "step_base": self._step_base,
                "fingerprint": self._fingerprint(),
                "python_rng": _jsonable(random.getstate()),
                "numpy_rng": _jsonable(np.random.get_state()),
            }
            (tmp / ATM_STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            self.state.save_to_json(str(tmp / TRAINER_STATE_FILE))
            rng = {"torch_cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                for i, s in enumerate(torch.cuda.get_rng_state_all()):
                    rng[f"torch_cuda_{i}"] = s
            save_file(rng, str(tmp / RNG_FILE))
            if args.atm_mode == "ph" and self.best_round != k and self._best_state is not None:
                save_file(self._best_state, str(tmp / BEST_FILE))
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            self._rotate_checkpoints()
        self.exchange.barrier()

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        found = self._checkpoints()
        for _, path in found[: max(0, len(found) - limit)]:
            shutil.rmtree(path, ignore_errors=True)

    def _load_round_checkpoint(self, path: Path, max_steps: int) -> None:
        """Restore model, history, trainer state, RNG and optimizer states from a round checkpoint."""
        try:
            state = json.loads((path / ATM_STATE_FILE).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path / ATM_STATE_FILE}: {e}") from e
        expected = json.loads(json.dumps(self._fingerprint()))
        if state.get("fingerprint") != expected:
            raise CheckpointError(
                f"{path} was written by a different ATM setup: {state.get('fingerprint')} != {expected}"
            )
        model: MultiTaskModel = self.model
        model.load_backbone_weights(path)
        model.load_heads(path)
        self.history = list(state["history"])
        self._round = int(state["round"])
        self.best_round = state["best_round"]
        self._best_score = state["best_score"] if state["best_score"] is not None else -math.inf
        self._step_base = int(state["step_base"])
        if self.args.atm_mode == "ph":
            best = path / BEST_FILE
            self._best_state = load_file(str(best)) if best.is_file() else self._snapshot()
        ts = path / TRAINER_STATE_FILE
        if ts.is_file():
            self.state = TrainerState.load_from_json(str(ts))
            self.state.init_training_references(self, max_steps, self.args.rounds, None)
            self._load_callback_state()
        self.state.global_step = self._step_base
        self.state.epoch = float(self._round)
        random.setstate(_python_rng(state["python_rng"]))
        np.random.set_state(_numpy_rng(state["numpy_rng"]))
        rng = load_file(str(path / RNG_FILE))
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        if not self.args.reset_optimizer_each_round:
            for task in self.exchange.my_tasks():
                f = path / f"optimizer-{task}.pt"
                if not f.is_file():
                    raise CheckpointError(f"{f} is missing (reset_optimizer_each_round=False)")
                self._pending_opt_state[task] = torch.load(f, map_location=self.args.device, weights_only=True)
        self._persistent.clear()

    # -- saving / hub -------------------------------------------------------------------------------------
    def _write_model_folder(self, folder: Path) -> None:
        from hf_atm.atm.card import atm_model_card

        self.model.write_files(folder, self.processing_class)
        write_history(self.history, folder)
        plot_history(self.history, folder)
        card = atm_model_card(self)
        card.save(str(folder / "README.md"))
        (folder / "atm_config.json").write_text(json.dumps(_atm_args(self.args), indent=2) + "\n")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the MultiTaskModel (backbone, heads, tokenizer / processor), ``history.json``, plots, a model
        card (README.md) and ``atm_config.json`` into `output_dir` (default ``args.output_dir``); main
        process only, files written to a temporary folder first."""
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            atomic_write_dir(output_dir, self._write_model_folder)
        self.exchange.barrier()
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub()

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        repo_id: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> str | None:
        """``save_model()`` then upload the saved model (not the round checkpoints) with
        ``hf_atm.hub.push.push_folder``. `repo_id` defaults to ``args.hub_model_id``, then the name of
        ``output_dir``. Returns the commit URL (None on non-main processes)."""
        self.save_model(_internal_call=True)
        if not self.args.should_save:
            return None
        import tempfile

        from hf_atm.hub.push import push_folder

        repo_id = repo_id or self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        token = token if token is not None else self.args.hub_token
        private = self.args.hub_private_repo if private is None else private
        revision = revision if revision is not None else getattr(self.args, "hub_revision", None)
        with tempfile.TemporaryDirectory(prefix="hf_atm_push_") as tmp:
            folder = Path(tmp) / "model"
            self._write_model_folder(folder)
            return push_folder(folder, repo_id, private=bool(private), revision=revision,
                               commit_message=commit_message, token=token)


# ----------------------------------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _python_rng(x: Any) -> tuple:
    return (x[0], tuple(x[1]), x[2])


def _numpy_rng(x: Any) -> tuple:
    return (x[0], np.asarray(x[1], dtype=np.uint32), int(x[2]), int(x[3]), float(x[4]))


def _atm_args(args: ATMConfig) -> dict[str, Any]:
    """The ATM fields and the main training options (no tokens, no paths besides output_dir's name)."""
    keys = [
        "atm_mode", "rounds", "epochs_per_round", "steps_per_round", "merge_method", "merge_scale",
        "merge_weights", "merge_density", "merge_gamma", "merge_seed", "reset_optimizer_each_round",
        "freeze_heads", "ph_select_fraction", "lora_r", "lora_alpha", "lora_target_modules", "learning_rate",
        "weight_decay", "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "seed",
        "warmup_steps", "bf16",
    ]
    out = {}
    for k in keys:
        v = getattr(args, k, None)
        out[k] = v.value if hasattr(v, "value") else v
    out["optim"] = str(getattr(args.optim, "value", args.optim))
    out["lr_scheduler_type"] = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    return out
