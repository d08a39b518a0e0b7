"""ATMTrainer: a ``transformers.Trainer`` that alternates per-task fine-tuning and merging (ATM).

One round (``ATM.md``): ``theta`` = the current backbone; for each task ``i``, on its own data only,
``theta_i = finetune(theta, D_i, E epochs)`` with a fresh optimizer and schedule, ``tau_i = theta_i - theta``;
then ``theta = theta + merge(tau_1..tau_n)`` tensor by tensor (``merge_deltas``). Heads are not merged: each
task's head keeps what that task's fine-tuning made of it. ``merge_scale="auto"`` chooses the scale of the
merged task vector every round by a line search on the round split (:mod:`hf_atm.atm.scale_search`).

Modes:

* ``pa`` (from a pre-trained model): rounds train on each task's ``train`` split; every round is evaluated
  on ``validation``; the model after the last round is the result, or, with ``load_best_model_at_end``, the
  best round by ``metric_for_best_model`` (round 0, the starting model, included).
* ``ph`` (post-hoc refinement of an already merged model): each task's ``validation`` split is divided
  deterministically (``Dataset.train_test_split(test_size=ph_select_fraction, seed=args.seed)``) into a tuning
  part (``validation_tune``) that the rounds train on and a selection part (``validation_select``) that
  scores every round, round 0 (the starting merge) included; the best round by mean selection score (each
  task's main metric, ``ATMConfig.task_metrics``: accuracy by default; earliest on ties; ``metric_for_best_model``
  when set) is the result. The selection part is never trained
  on, so the choice is honest; ``test`` stays untouched for the final report.

A round is ATM's evaluation and save unit: each round is evaluated (``on_evaluate``, the history) and, unless
``save_strategy="no"``, saved as ``checkpoint-round-{k}`` (``on_save``). The per-task fine-tuning is
:meth:`~hf_atm.atm.tuning.TaskTuning.tune_task`; each (round, task) fine-tuning seeds every RNG from
``(args.seed, round, task)``, so results do not depend on which process runs a task, nor on resuming.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler
from transformers import (
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    default_data_collator,
)
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PredictionOutput, TrainOutput

from hf_atm.atm.card import RunSummary, atm_model_card, atm_options_record
from hf_atm.atm.checkpoints import (
    checkpoint_dir,
    load_rng_state,
    read_checkpoint_state,
    resolve_checkpoint,
    save_rng_state,
    staging_dir,
    write_checkpoint,
)
from hf_atm.atm.config import ATMConfig
from hf_atm.atm.distributed import (
    DeltaCollector,
    TaskExchange,
    TaskVectorView,
    check_sharding_supported,
    round_spec,
    warn_if_unused_gpus,
)
from hf_atm.atm.evaluation import (
    collect_outputs,
    mean_accuracy,
    needs_predictions,
    normalized_accuracy,
    task_values,
)
from hf_atm.atm.history import HistoryEntry, plot_history, write_history
from hf_atm.atm.metrics import TaskMetric, task_metrics_for
from hf_atm.atm.model import MultiTaskModel
from hf_atm.atm.problems import is_regression
from hf_atm.atm.rounds import apply_delta_, merge_threads, model_snapshot, restore_snapshot_, reusable_buffer
from hf_atm.atm.scale_search import search_merge_scale_, slice_losses
from hf_atm.atm.sharding import (
    accelerate_fsdp_flag_kept,
    backbone_sharded,
    fsdp_requested,
    full_shapes,
    full_state_dict,
    load_backbone_folder_,
    local_tensors,
    prepare_sharding,
)
from hf_atm.atm.taskdata import input_columns, prepare_split, prepare_task_data
from hf_atm.atm.tuning import TaskTuning, check_lora_targets, loader_options
from hf_atm.errors import CheckpointError, TaskDataError
from hf_atm.files import atomic_write_dir, atomic_write_json

__all__ = ["ATMTrainer", "prepare_task_data"]

ATM_STATE_FILE = "atm_state.json"
TRAINER_STATE_FILE = "trainer_state.json"
BEST_FILE = "best.safetensors"


class ATMTrainer(TaskTuning, Trainer):
    """Alternating Tuning and Merging through Trainer's public face.

    Args:
        model: the MultiTaskModel (pre-trained backbone for ``pa``; the merged start for ``ph``). The trainer
            changes its weights, never its requires_grad flags. With FSDP its backbone is sharded at
            construction and stays sharded after ``train()``: save with ``trainer.save_model()`` on every rank.
        args: an :class:`ATMConfig`.
        task_datasets: ``{task: DatasetDict(train/validation/test)}``, preprocessed to model inputs plus an
            integer ``labels`` (or ``label``) column.
        data_collator: default ``DataCollatorWithPadding(processing_class)`` for a tokenizer, else
            ``default_data_collator``.
        processing_class: tokenizer / image processor, saved with the model.
        callbacks: TrainerCallbacks (``on_step_*`` per optimizer step of a task, ``on_epoch_*`` and
            ``on_evaluate`` per round, ``on_save`` per round checkpoint, ``on_log`` for logs).
        reference_accuracies: ``{task: main score (accuracy, or the task's metric) of the model fine-tuned
            on that task alone}`` for normalized scores (``*_normalized_accuracy``: score / reference).
        optimizer_cls_and_kwargs: as in Trainer (used for every per-task optimizer).
        compute_metrics: as in Trainer: ``fn(EvalPrediction) -> dict``, called per task on that task's
            examples at every evaluation; keys reported as ``eval_<task>_<key>`` and ``eval_mean_<key>``.

    After ``train()``: ``trainer.history`` (list of per-round dicts, round 0 = the starting model),
    ``trainer.best_round`` (the round the model holds), ``history.json`` and PNG plots in ``output_dir``,
    and ``checkpoint-round-{k}`` folders (unless ``save_strategy="no"``).
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
        compute_metrics: Any | None = None,
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
        self._torch_format = not isinstance(collator, DataCollatorWithPadding)
        data = prepare_task_data(
            task_datasets, model, mode=args.atm_mode, select_fraction=args.ph_select_fraction,
            seed=args.seed, torch_format=self._torch_format,
        )
        tasks = sorted(data)
        spec = args.merge_spec(len(tasks))
        metrics = task_metrics_for(args, model)  # every task's main metric, refused before any training
        if reference_accuracies is not None:
            normalized_accuracy({t: 1.0 for t in tasks}, reference_accuracies)  # KeyError early
        round_split = "validation" if args.atm_mode == "pa" else "validation_select"
        with accelerate_fsdp_flag_kept():  # Trainer's Accelerator would leave ACCELERATE_USE_FSDP set
            super().__init__(
                model=model,
                args=args,
                data_collator=collator,
                # Trainer asks for one with eval_strategy != "no": the rounds are evaluated on the round split
                eval_dataset={t: data[t][round_split] for t in tasks},
                processing_class=processing_class,
                callbacks=callbacks,
                optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                compute_metrics=compute_metrics,
            )
        check_sharding_supported(fsdp=self.is_fsdp_enabled or fsdp_requested(args),
                                 deepspeed=self.is_deepspeed_enabled, parallel_mode=args.atm_parallel_mode)
        # label_smoothing_factor goes into the model's own per-head cross entropy (compute_loss): Trainer's
        # LabelSmoother would smooth the padded logits of mixed batches over the widest head's classes.
        self.label_smoother = None
        self.task_names: list[str] = tasks
        self.task_data = data
        self.merge_spec_ = spec
        #: ``{task: TaskMetric}``: the main metric of every task of the model (``ATMConfig.task_metrics``, then
        #: the model's ``config.task_metrics``, else accuracy).
        self.task_metrics: dict[str, TaskMetric] = metrics
        self.reference_accuracies = dict(reference_accuracies) if reference_accuracies is not None else None
        self.exchange = TaskExchange(tasks, parallel_mode=args.atm_parallel_mode, grad_bucket_mb=args.ddp_bucket_cap_mb,
                                     broadcast_buffers=args.ddp_broadcast_buffers)
        prepare_sharding(model, self.exchange, args)  # FSDP rules checked; configured: the backbone sharded
        warn_if_unused_gpus(self.exchange, args.device)
        self.history: list[dict[str, Any]] = []
        self.best_round: int | None = None
        self.test_metrics: dict[str, float] | None = None
        #: seconds spent, summed over rounds: per-task training steps, per-task setup (optimizer, schedule,
        #: data loader, LoRA injection), merging (snapshot, task vectors, exchange, merge), evaluation,
        #: checkpoints, and reporting (history.json, plots).
        self.timing: dict[str, float] = {"train": 0.0, "setup": 0.0, "merge": 0.0, "eval": 0.0,
                                         "checkpoint": 0.0, "report": 0.0}
        self._best_score: float | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        self._round = 0
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.init_tuning()
        if args.lora_r > 0:
            check_lora_targets(model.backbone, args.lora_r, args.lora_alpha, args.lora_target_modules)

    # -- Trainer hooks ------------------------------------------------------------------------------------
    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """No network at construction: the repo is created by :meth:`push_to_hub`."""
        self.hub_model_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name

    def _set_signature_columns_if_needed(self) -> None:
        """The columns Trainer's prediction loaders keep: the backbone's inputs and the labels (the
        MultiTaskModel's forward takes the backbone inputs as ``**kwargs``)."""
        if self._signature_columns is None:
            self._signature_columns = sorted(input_columns(self.model)) + ["labels", "label", "label_ids",
                                                                            "task_ids"]

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        """Trainer's prediction_step with the task of :meth:`predict` routed to the model."""
        if self._active_task is not None and "task_ids" not in inputs and "task" not in inputs:
            inputs = {**inputs, "task": self._active_task}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """The per-task loss (:meth:`TaskTuning.compute_loss`) with ``args.label_smoothing_factor`` passed to
        the model's cross entropy (each head smoothed over its own classes, also in mixed batches)."""
        if self.args.label_smoothing_factor and "labels" in inputs:
            inputs = {**inputs, "label_smoothing": float(self.args.label_smoothing_factor)}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    # -- evaluation ---------------------------------------------------------------------------------------
    def _eval_batches(self, ds: Any) -> DataLoader:
        return DataLoader(ds, batch_size=self.args.per_device_eval_batch_size, sampler=SequentialSampler(ds),
                          collate_fn=self.data_collator, **loader_options(self.args))

    def _evaluate_task(self, task: str, ds: Any, extra: bool = True) -> tuple[int, int, dict[str, float],
                                                                             dict[str, float]]:
        """``(correct, total, main metric's values, compute_metrics' values)`` of `task` on `ds`, on this
        process (with a sharded backbone a collective: every rank runs it); `extra` False: compute_metrics not
        called (a sharded backbone's non-owner ranks)."""
        metric = self.task_metrics[task]
        keep = self.compute_metrics is not None and extra
        out = collect_outputs(self.model, task, self._eval_batches(ds), self._prepare_inputs,
                              self.autocast_smart_context_manager, keep_predictions=needs_predictions(metric),
                              keep_logits=keep, regression=is_regression(self.model.config, task))
        extra = {}
        if keep:
            extra = dict(self.compute_metrics(EvalPrediction(predictions=out.logits.numpy(),
                                                             label_ids=out.labels.numpy())))
        return out.correct, out.total, task_values(metric, out), extra

    def task_accuracy(self, task: str, dataset: Any) -> float:
        """Accuracy of `task`'s head on `dataset` (prepared task data), computed on this process only (with an
        FSDP-sharded backbone the forwards are collectives: call it on every rank)."""
        return self.task_accuracy_and_score(task, dataset)[0]

    def task_accuracy_and_score(self, task: str, dataset: Any) -> tuple[float, float]:
        """``(accuracy, main score)`` of `task`'s head on `dataset` (prepared task data; the main score by
        :attr:`task_metrics`), from one evaluation on this process only (every rank with a sharded backbone);
        the accuracy is NaN for a regression task."""
        c, n, values, _ = self._evaluate_task(task, dataset)
        acc = c / n if n and not is_regression(self.model.config, task) else math.nan
        return acc, self.task_metrics[task].score(values)

    def task_loss(self, task: str, dataset: Any) -> float:
        """Mean loss of `task`'s head on `dataset` (prepared task data): :meth:`compute_loss`, the training loss,
        in eval mode, on this process only (not with a sharded backbone); NaN for an empty dataset."""
        s, n = slice_losses(self.model, [task], {task: dataset}, self._eval_batches, self.compute_loss,
                            self._prepare_inputs, self.autocast_smart_context_manager)[0].tolist()
        return s / n if n else math.nan

    def _evaluate_all(self, datasets: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, dict[str, float]],
                                                                   dict[str, dict[str, float]]]:
        """``(accuracy, main metric's values, compute_metrics' values)`` per task of `datasets`; each process
        evaluates its own tasks (``exchange.my_eval_tasks()``; with a sharded backbone every rank runs every
        forward, FSDP's collectives, and the owner keeps the counts), the results are combined over processes
        (accuracy from the summed counts, other metrics computed on the task's process and gathered). Regression
        tasks have no accuracy: they are left out of the first dict (so ``mean_accuracy`` is over the
        classification tasks) and scored by their main metric only."""
        names = [t for t in self.task_names if t in datasets] + sorted(set(datasets) - set(self.task_names))
        counts = torch.zeros(len(names), 2, dtype=torch.float64)
        mine = set(self.exchange.my_eval_tasks()) if self.exchange.distributed else set(names)
        extras: dict[str, dict[str, float]] = {}
        values: dict[str, dict[str, float]] = {}
        for j, t in enumerate(names):
            owner = t in mine or (t not in self.task_names and self.exchange.rank == 0)
            if owner or self.exchange.sharded:  # FSDP: every rank runs every forward (its collectives)
                c, n, v, e = self._evaluate_task(t, datasets[t], extra=owner)
                if owner:
                    counts[j, 0], counts[j, 1], values[t], extras[t] = c, n, v, e
        counts = self.exchange.all_reduce_sum(counts)
        if self.compute_metrics is not None:
            extras = self.exchange.merge_dicts(extras)
        computed = [t for t in names if needs_predictions(self.task_metrics[t])]  # the same on every process
        if computed:
            values = self.exchange.merge_dicts({t: v for t, v in values.items() if t in computed})
        acc = {t: float(counts[j, 0] / counts[j, 1]) if counts[j, 1] > 0 else math.nan for j, t in enumerate(names)}
        values = {t: values[t] if t in computed else {self.task_metrics[t].main_key: acc[t]} for t in names}
        acc = {t: a for t, a in acc.items() if not is_regression(self.model.config, t)}
        return acc, values, {t: extras.get(t, {}) for t in names}

    def accuracies(self, datasets: Mapping[str, Any]) -> dict[str, float]:
        """Accuracy per task of ``{task: dataset}`` (prepared task data); every process gets all of them."""
        return self._evaluate_all(datasets)[0]

    def accuracies_and_scores(self, datasets: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
        """``(accuracy per task, main score per task)`` of ``{task: dataset}`` (prepared task data; main scores
        by :attr:`task_metrics`), from one evaluation; every process gets all of them."""
        acc, values, _ = self._evaluate_all(datasets)
        return acc, self._scores(values)

    def _scores(self, values: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        return {t: self.task_metrics[t].score(v) for t, v in values.items()}

    def metric_names(self, tasks: Sequence[str] | None = None) -> dict[str, str]:
        """``{task: main metric name}`` of `tasks` (default: the trainer's tasks)."""
        return {t: self.task_metrics[t].name for t in (self.task_names if tasks is None else tasks)}

    def _metrics(self, acc: Mapping[str, float], values: Mapping[str, Mapping[str, float]],
                 extras: Mapping[str, Mapping[str, Any]], prefix: str) -> dict[str, float]:
        m = {f"{prefix}_{t}_accuracy": a for t, a in acc.items()}
        m[f"{prefix}_mean_accuracy"] = mean_accuracy(acc)
        for k in sorted({k for v in values.values() for k in v} - {"accuracy"}):
            vals = {t: v[k] for t, v in values.items() if k in v}
            m.update({f"{prefix}_{t}_{k}": x for t, x in vals.items()})
            if len(vals) == len(values):
                m[f"{prefix}_mean_{k}"] = mean_accuracy(vals)
        score = self._scores(values)
        m[f"{prefix}_mean_score"] = mean_accuracy(score)
        norm = normalized_accuracy(score, self.reference_accuracies)  # main score / the reference's
        if norm is not None:
            m.update({f"{prefix}_{t}_normalized_accuracy": v for t, v in norm.items()})
            m[f"{prefix}_mean_normalized_accuracy"] = mean_accuracy(norm)
        keys = sorted({k for e in extras.values() for k in e})
        for k in keys:
            vals = {t: e[k] for t, e in extras.items() if k in e}
            m.update({f"{prefix}_{t}_{k}": v for t, v in vals.items()})
            if len(vals) == len(extras) and all(isinstance(v, (int, float)) for v in vals.values()):
                m[f"{prefix}_mean_{k}"] = float(sum(vals.values()) / len(vals))
        return m

    def _task_datasets(self, eval_dataset: Mapping[str, Any] | None, split: str | None) -> dict[str, Any]:
        if eval_dataset is None:
            split = split or self.round_split
            missing = [t for t in self.task_names if split not in self.task_data[t]]
            if missing:
                raise TaskDataError(f"split {split!r} is missing for task(s) {missing}")
            return {t: self.task_data[t][split] for t in self.task_names}
        if not isinstance(eval_dataset, Mapping):
            raise TypeError("eval_dataset must be a mapping {task: Dataset}")
        out = {}
        for t, ds in eval_dataset.items():
            if t not in self.model.tasks:
                raise TaskDataError(f"eval_dataset: task {t!r} has no head in the model")
            out[t] = prepare_split(ds, t, "eval_dataset", self.model, self._torch_format)
        return out

    def evaluate(
        self,
        eval_dataset: Mapping[str, Any] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        split: str | None = None,
    ) -> dict[str, float]:
        """Accuracy and main score of the current model per task, with Trainer's key convention:
        ``{"<prefix>_<task>_accuracy", "<prefix>_mean_accuracy"}``, ``"<prefix>_<task>_<metric>"`` for tasks
        scored by another metric (:attr:`task_metrics`; ``"<prefix>_mean_<metric>"`` when every task has it),
        ``"<prefix>_mean_score"`` (the mean main score, over every task), normalized scores when reference
        scores were given (regression tasks have no ``_accuracy`` key: ``_mean_accuracy`` is over the
        classification tasks, NaN when there are none),
        and compute_metrics' keys. `eval_dataset` is ``{task: Dataset}``;
        otherwise `split` of every task (default: the per-round split, ``validation`` for PA,
        ``validation_select`` for PH; also ``test``, ``train``, ``validation``, ``validation_tune``). Logged
        and passed to ``on_evaluate``."""
        t0 = time.perf_counter()
        datasets = self._task_datasets(eval_dataset, split)
        acc, values, extras = self._evaluate_all(datasets)
        metrics = self._metrics(acc, values, extras, metric_key_prefix)
        if split == "test" and eval_dataset is None:
            self.test_metrics = dict(metrics)
        self.timing["eval"] += time.perf_counter() - t0
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    def predict(self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test",
                task: str | None = None) -> PredictionOutput:
        """Trainer's ``predict`` for one task: logits of `task`'s head on `test_dataset` (that task's inputs,
        with or without labels), the labels, and the metrics (``<prefix>_loss`` and compute_metrics' keys
        when labels are given). `task` may be left out when the model has a single task. Refused with an
        FSDP-sharded backbone: Trainer's loop would prepare (re-shard) the model with accelerate on a GPU."""
        if backbone_sharded(self.model):
            raise ValueError("predict() does not run with an FSDP-sharded backbone (Trainer's evaluation loop would "
                             "prepare the model again): use evaluate() / accuracies(), or save_model() and predict "
                             "with the saved folder loaded unsharded")
        if task is None:
            if len(self.model.tasks) != 1:
                raise ValueError(f"predict: pass task=, one of {list(self.model.tasks)}")
            task = next(iter(self.model.tasks))
        if task not in self.model.tasks:
            raise TaskDataError(f"predict: task {task!r} has no head in the model")
        ds = prepare_split(test_dataset, task, "test_dataset", self.model, self._torch_format, require_labels=False)
        self._active_task = task
        try:
            return super().predict(ds, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._active_task = None

    # -- one round ----------------------------------------------------------------------------------------
    def _run_round(self, k: int) -> dict[str, Any]:
        """Tune this process's tasks from the current backbone, merge everyone's task vectors into it, and
        return the round's stats (already reduced over processes)."""
        args = self.args
        model: MultiTaskModel = self.model
        tensors = local_tensors(model)  # FSDP: this rank's rows
        mine = self.exchange.my_tasks()
        t0 = time.perf_counter()
        theta = None
        with merge_threads(args.device):
            if args.lora_r == 0:
                theta = {n: reusable_buffer(self._buffers, ("theta", n), t, t.dtype).copy_(t.detach())
                         for n, t in tensors.items()}
            collector = DeltaCollector(
                self.exchange, round_spec(self.merge_spec_, k), list(tensors),
                {n: t.shape for n, t in tensors.items()}, {n: t.dtype for n, t in tensors.items()},
                args.compute_cosine, buffers=self._buffers, merge_device=args.merge_device,
                accumulate=args.merge_accumulate_dtype, full_shapes=full_shapes(model),
            )
        merge_s = time.perf_counter() - t0
        self.begin_round(sum(self._steps[t] for t in mine))
        n = len(self.task_names)
        sums = torch.zeros(2 * n, dtype=torch.float64)  # per-task loss, per-task steps
        times = torch.zeros(2, dtype=torch.float64)  # train, setup seconds (max over processes)
        for pos, task in enumerate(mine):
            if theta is not None and pos > 0:  # back to the round's starting point for the next task
                tm = time.perf_counter()
                with merge_threads(args.device), torch.no_grad():
                    apply_delta_(tensors, theta, {})
                merge_s += time.perf_counter() - tm
            run = self.tune_task(task, k, steps=self._steps[task], task_vector=False)
            tm = time.perf_counter()
            with merge_threads(args.device):
                # the task vector is read tensor by tensor (no full-size copy); LoRA: the adapter's delta
                tau = run.lora_delta if theta is None else TaskVectorView(tensors, theta, scratch=self._buffers)
                collector.add(task, tau)
                del tau
            merge_s += time.perf_counter() - tm
            j = self.task_names.index(task)
            sums[j], sums[n + j] = run.loss, run.steps
            times[0] += run.train_seconds
            times[1] += run.setup_seconds
        tm = time.perf_counter()
        with merge_threads(args.device):
            delta, gram = collector.finish()
        self.exchange.broadcast_heads_(model.heads, self.task_names)  # first: the scale search runs every head
        search = None if args.merge_scale != "auto" else search_merge_scale_(
            self, tensors, theta, delta, batches=self._eval_batches, prepare=self._prepare_inputs)
        if search is None:
            with merge_threads(args.device):
                apply_delta_(tensors, theta, delta)
        del theta, delta
        merge_s += time.perf_counter() - tm  # the scale search included
        sums = self.exchange.reduce_task_stats(sums)
        times = self.exchange.all_reduce_max(torch.cat([times, torch.tensor([merge_s, search.seconds if search else 0.0],
                                                                             dtype=torch.float64)]))
        self.state.global_step = self._step_base + int(sums[n:].sum().item())
        self._step_base = self.state.global_step
        return {
            "train_loss": {t: float(sums[j]) for j, t in enumerate(self.task_names)},
            "steps": int(sums[n:].sum().item()),
            "train_seconds": float(times[0]),
            "setup_seconds": float(times[1]),
            "merge_seconds": float(times[2]),
            "gram": gram,
            **(search.record(float(times[3])) if search else {"merge_scale": self.merge_spec_.scale}),
        }

    # -- best round ---------------------------------------------------------------------------------------
    @property
    def selects_best_round(self) -> bool:
        """True when the result is the best round (PH, or ``load_best_model_at_end``), not the last."""
        return self.args.atm_mode == "ph" or bool(self.args.load_best_model_at_end)

    def _best_metric(self) -> tuple[str, bool]:
        """The metric key rounds are compared by and whether greater is better."""
        name = self.args.metric_for_best_model
        if not name or (name == "loss" and not self.args.load_best_model_at_end):
            return "eval_mean_score", True  # the mean main score (= eval_mean_accuracy when all use accuracy)
        key = name if name.startswith("eval_") else f"eval_{name}"
        greater = self.args.greater_is_better
        return key, (not key.endswith("loss")) if greater is None else bool(greater)

    def _track_best(self, entry: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Update the best round with `entry` (PH / load_best_model_at_end: by the best-model metric,
        earliest on ties; PA otherwise: the latest round) and ``state.best_metric``."""
        if not self.selects_best_round:
            self._best_score, self.best_round = entry["mean_score"], entry["round"]
            return
        key, greater = self._best_metric()
        if key not in metrics:
            raise KeyError(f"metric_for_best_model={self.args.metric_for_best_model!r}: no {key!r} among the "
                           f"round metrics {sorted(metrics)}")
        score = float(metrics[key])
        best = self._best_score
        # a NaN score (a correlation of constant predictions) never wins; any number beats a NaN best
        if best is None or (math.isnan(best) and not math.isnan(score)) or (score > best if greater else score < best):
            self._best_score, self.best_round = score, entry["round"]
            self._best_state = model_snapshot(self.model)
            self.state.best_metric = score
            self.state.best_global_step = self.state.global_step

    def _record(self, entry: dict[str, Any], values: Mapping[str, Mapping[str, float]],
                extras: Mapping[str, Mapping[str, Any]]) -> None:
        """Append a history entry, log it, report it to ``on_evaluate``, track the best round and write
        ``history.json``."""
        self.history.append(entry)
        logs: dict[str, float] = {"round": float(entry["round"])}
        logs.update(self._metrics(entry["accuracy"], values, extras, "eval"))
        if entry["mean_cosine"] is not None:
            logs["mean_cosine"] = entry["mean_cosine"]
        if entry["train_loss"] is not None:
            logs.update({f"train_{t}_loss": v for t, v in entry["train_loss"].items()})
        logs.update({k: entry[k] for k in ("train_seconds", "merge_seconds", "setup_seconds", "merge_scale") if k in entry})
        if self.args.logging_strategy != "no":
            self.log(logs)
        metrics = {k: v for k, v in logs.items() if k.startswith("eval_")}
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        self._track_best(entry, metrics)
        if self.args.should_save:
            t0 = time.perf_counter()
            write_history(self.history, self.args.output_dir)
            self.timing["report"] += time.perf_counter() - t0

    def _evaluate_round(self, k: int, stats: Mapping[str, Any] | None) -> None:
        te = time.perf_counter()
        acc, values, extras = self._evaluate_all({t: self.task_data[t][self.round_split] for t in self.task_names})
        eval_s = time.perf_counter() - te
        self.timing["eval"] += eval_s
        keys = ("train_seconds", "merge_seconds", "setup_seconds", "merge_scale", "scale_search", "scale_search_seconds")
        of_round = {key: stats[key] for key in keys if key in stats} if stats else {}
        entry = HistoryEntry.build(
            k, acc, tasks=self.task_names, split=self.round_split, reference=self.reference_accuracies,
            score=self._scores(values), metric=self.metric_names(),
            gram=stats["gram"] if stats else None, eval_seconds=eval_s,
            train_loss=dict(stats["train_loss"]) if stats else None, steps=stats["steps"] if stats else 0,
            **of_round,
        )
        self._record(entry.to_dict(), values, extras)

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
        ckpt = self.resolve_checkpoint(resume_from_checkpoint)
        self._steps = {t: self.steps_per_round(t) for t in self.task_names}
        max_steps = args.rounds * sum(self._steps.values())
        self.begin_tuning(max_steps, args.rounds)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        if ckpt is not None:
            self._load_round_checkpoint(ckpt, max_steps)
        else:
            self.exchange.broadcast_module_(self.model, src=0)  # every process starts from rank 0's model
            self.history, self._best_score, self.best_round, self._round = [], None, None, 0
            self._evaluate_round(0, None)
        self.model.zero_grad(set_to_none=True)

        for k in range(self._round + 1, args.rounds + 1):
            self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            stats = self._run_round(k)
            self.timing["train"] += stats["train_seconds"]
            self.timing["setup"] += stats["setup_seconds"]
            self.timing["merge"] += stats["merge_seconds"]
            self.state.epoch = float(k)
            self._round = k
            self._evaluate_round(k, stats)
            if args.save_strategy != "no":
                tc = time.perf_counter()
                self._save_round_checkpoint(k)
                self.timing["checkpoint"] += time.perf_counter() - tc
            self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
            self.control.should_save = self.control.should_evaluate = self.control.should_log = False
            if self.exchange.any_true(bool(self.control.should_training_stop)) and k < args.rounds:
                break

        self._buffers.clear()  # round buffers (snapshot, task vectors, accumulators): free the memory
        if self.selects_best_round and self._best_state is not None and self.best_round != self._round:
            restore_snapshot_(self.model, self._best_state)
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
        # As with Trainer, the final model goes to the Hub from save_model() / push_to_hub(), not from train():
        # pushing here too made every recipe run upload twice.
        return TrainOutput(self.state.global_step, train_loss, metrics)

    # -- checkpoints --------------------------------------------------------------------------------------
    def resolve_checkpoint(self, resume: str | bool | None) -> Path | None:
        """The round checkpoint a ``resume_from_checkpoint`` value names (True / "True": the latest in
        ``output_dir``; a folder; None / False / "false": none); CheckpointError when there is none."""
        return resolve_checkpoint(resume, self.args.output_dir, ATM_STATE_FILE)

    def _fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this trainer."""
        a = self.args
        return {"tasks": list(self.task_names), "atm_mode": a.atm_mode, "merge": self.merge_spec_.to_dict(),
                "lora_r": a.lora_r, "seed": a.seed, "steps": dict(self._steps),
                **({"scale_search": [a.merge_scale_search(len(self.task_names)), a.merge_scale_search_examples]}
                   if a.merge_scale == "auto" else {})}

    def _best_checkpoint(self) -> Path | None:
        """The best round's checkpoint, which rotation keeps (``load_best_model_at_end``, as Trainer)."""
        if not self.args.load_best_model_at_end or not self.best_round:
            return None
        return checkpoint_dir(self.args.output_dir, self.best_round)

    def _write_checkpoint_files(self, folder: Path, k: int, full: dict[str, torch.Tensor] | None) -> None:
        self.model.write_files(folder, self.processing_class, **({"state_dict": full} if full else {}))
        state = {"round": k, "history": self.history, "best_round": self.best_round,
                 "best_score": self._best_score, "step_base": self._step_base, "fingerprint": self._fingerprint()}
        atomic_write_json(folder / ATM_STATE_FILE, state)
        self.state.save_to_json(str(folder / TRAINER_STATE_FILE))
        save_rng_state(folder)
        if self.selects_best_round and self.best_round != k and self._best_state is not None:
            save_file(self._best_state, str(folder / BEST_FILE))

    def _save_round_checkpoint(self, k: int) -> None:
        """Write ``checkpoint-round-{k}`` atomically (each process stages its own optimizer states first),
        rotate old ones, then fire ``on_save``."""
        args = self.args
        if not args.reset_optimizer_each_round:
            # Persistent optimizers live on their owners: each process stages its own.
            staged = staging_dir(args.output_dir, k)
            if args.should_save:
                shutil.rmtree(staged, ignore_errors=True)  # leftovers of a crashed run
                staged.mkdir(parents=True)
            self.exchange.barrier()
            for task, (opt, sched) in self._persistent.items():
                torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                           staged / f"optimizer-{task}.pt")
            self.exchange.barrier()
        full = full_state_dict(self.model, keep=args.should_save)  # FSDP: gathered, kept where written
        if args.should_save:
            if self.best_round == k:
                self.state.best_model_checkpoint = str(checkpoint_dir(args.output_dir, k))
            write_checkpoint(args.output_dir, k, lambda tmp: self._write_checkpoint_files(tmp, k, full),
                             state_file=ATM_STATE_FILE, save_total_limit=args.save_total_limit,
                             keep=self._best_checkpoint())
        self.exchange.barrier()
        self.control = self.callback_handler.on_save(args, self.state, self.control)

    def _load_round_checkpoint(self, path: Path, max_steps: int) -> None:
        """Restore model, history, trainer state, RNG and optimizer states from a round checkpoint."""
        state = read_checkpoint_state(path, ATM_STATE_FILE)
        expected = json.loads(json.dumps(self._fingerprint()))
        if state.get("fingerprint") != expected:
            raise CheckpointError(
                f"{path} was written by a different ATM setup: {state.get('fingerprint')} != {expected}"
            )
        model: MultiTaskModel = self.model
        load_backbone_folder_(model, path)
        model.load_heads(path)
        self.history = list(state["history"])
        self._round = int(state["round"])
        self.best_round = state["best_round"]
        self._best_score = state["best_score"]
        self._step_base = int(state["step_base"])
        if self.selects_best_round:
            best = path / BEST_FILE
            self._best_state = load_file(str(best)) if best.is_file() else model_snapshot(model)
        ts = path / TRAINER_STATE_FILE
        if ts.is_file():
            self.state = TrainerState.load_from_json(str(ts))
            self.state.init_training_references(self, max_steps, self.args.rounds, None)
            self._load_callback_state()
        self.state.global_step = self._step_base
        self.state.epoch = float(self._round)
        load_rng_state(path)
        if not self.args.reset_optimizer_each_round:
            for task in self.exchange.my_tasks():
                f = path / f"optimizer-{task}.pt"
                if not f.is_file():
                    raise CheckpointError(f"{f} is missing (reset_optimizer_each_round=False)")
                self._pending_opt_state[task] = torch.load(f, map_location=self.args.device, weights_only=True)
        self._persistent.clear()

    # -- saving / hub -------------------------------------------------------------------------------------
    def run_summary(self) -> RunSummary:
        """What the model card says about this run (its tasks, history, selected round, test metrics, and the
        Hub datasets the tasks' test splits came from)."""
        from hf_atm.data.hub import hub_dataset_sources

        selection = None
        if self.args.atm_mode == "ph":
            selection = "held-out validation"
        elif self.args.load_best_model_at_end:
            selection = self.round_split
        return RunSummary.of_run(self.args, self.model, tasks=self.task_names, history=self.history,
                                 best_round=self.best_round, test_metrics=self.test_metrics, selection=selection,
                                 reference_accuracies=self.reference_accuracies,
                                 datasets=hub_dataset_sources(self.task_data), task_metrics=self.metric_names(),
                                 processor_saved=self.processing_class is not None)

    def _write_model_folder(self, folder: Path, full: dict[str, torch.Tensor] | None = None) -> None:
        """The saved folder: model files whose ``config.task_metrics`` are the run's metrics by name (the
        caller's model keeps its own config), history, plots, card, ``atm_config.json``; `full`: the whole
        weights of a sharded model (:func:`~hf_atm.atm.sharding.full_state_dict`)."""
        config, kept = self.model.config, self.model.config.task_metrics
        config.task_metrics = self.metric_names()  # names only: a metric module's path is never saved
        try:
            self.model.write_files(folder, self.processing_class, **({"state_dict": full} if full else {}))
        finally:
            config.task_metrics = kept
        write_history(self.history, folder)
        plot_history(self.history, folder)
        atm_model_card(self.run_summary()).save(str(folder / "README.md"))
        record = atm_options_record(self.args, self.model, task_metrics=self.metric_names())
        atomic_write_json(folder / "atm_config.json", record, indent=2)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the MultiTaskModel (backbone, heads, tokenizer / processor), ``history.json``, plots, a model
        card (README.md) and ``atm_config.json`` into `output_dir` (default ``args.output_dir``); main
        process only, files written to a temporary folder first."""
        output_dir = output_dir or self.args.output_dir
        full = full_state_dict(self.model, keep=self.args.should_save)  # FSDP: kept where written
        if self.args.should_save:
            atomic_write_dir(output_dir, lambda tmp: self._write_model_folder(tmp, full))
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
        full = full_state_dict(self.model, keep=self.args.should_save)
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
            self._write_model_folder(folder, full)
            return push_folder(folder, repo_id, private=bool(private), revision=revision,
                               commit_message=commit_message, token=token)
