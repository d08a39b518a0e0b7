"""One per-task fine-tuning: from the current weights, tune the backbone and one task's head for S steps.

:meth:`TaskTuning.tune_task` (mixed into :class:`~hf_atm.atm.trainer.ATMTrainer`) is the single unit that
ATM's rounds, every baseline and the federated ClientApp run. It uses Trainer's own pieces
(``create_optimizer`` / ``create_scheduler``, ``training_step`` -> ``compute_loss`` ->
``accelerator.backward``, gradient clipping, callbacks, ``self.log``) on the unwrapped model, seeds every
RNG (data order, dropout, LoRA init) from one seed, and returns a :class:`TuningResult`. The pieces that do
not need a Trainer (LoRA injection and removal, the seeded loader, micro-batch grouping, the module view a
fine-tuning trains, requires_grad bookkeeping) are plain functions here.

Two hooks of the process group (:class:`~hf_atm.atm.distributed.TaskExchange`) sit in the loop for the
``data_parallel`` mode: ``exchange.shard_batch(batch)`` (this rank's share of each micro-batch) and
``exchange.sync_gradients_(params)`` (gradients averaged over ranks after the backward passes of a step,
before clipping). Both are no-ops when tasks are split over ranks. With an FSDP-sharded backbone
(:mod:`hf_atm.atm.sharding`) FSDP reduce-scatters the backbone's gradients, ``sync_gradients_`` averages the
head's, gradients are clipped by their global norm over the shards, and the task vector is this rank's rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import set_seed

from hf_atm.atm.heads import prepare_heads_
from hf_atm.atm.rounds import merge_threads
from hf_atm.atm.rounds import task_vector as compute_task_vector
from hf_atm.atm.sharding import clip_grad_norm_, local_tensors
from hf_atm.errors import CheckpointError, TaskDataError
from hf_atm.merging.spec import tensor_seed

__all__ = [
    "TaskTuning",
    "TuningResult",
    "activation_checkpointing",
    "check_lora_targets",
    "head_param_groups_",
    "head_state",
    "inject_lora",
    "kept_requires_grad",
    "load_head_",
    "loader_options",
    "num_batches",
    "remove_lora",
    "seeded_train_loader",
    "tuning_view",
    "update_groups",
]


@dataclass
class TuningResult:
    """What one fine-tuning produced.

    Attributes:
        task: the task tuned (None: mixed batches of every task, ``train_joint``).
        task_vector: ``theta_tuned - theta_start`` per backbone tensor (float32; float64 kept); with LoRA the
            adapter's delta (the backbone itself is unchanged). None when not asked for.
        lora_delta: LoRA only: ``{"<module>.weight": B @ A * scaling}`` (float32), else None.
        head_state: the tuned head's tensors (``{"weight", "bias"}``; for ``task=None`` every head's,
            ``{"<task>.weight", ...}``), detached copies.
        loss: the mean training loss over the steps.
        steps: optimizer steps taken.
        train_seconds: seconds in the training steps.
        setup_seconds: seconds setting up (optimizer, schedule, loader, LoRA injection and removal).
    """

    task: str | None
    task_vector: dict[str, torch.Tensor] | None
    lora_delta: dict[str, torch.Tensor] | None
    head_state: dict[str, torch.Tensor]
    loss: float
    steps: int
    train_seconds: float
    setup_seconds: float


# ----------------------------------------------------------------------------------------------------------
# pieces without a Trainer
# ----------------------------------------------------------------------------------------------------------
def num_batches(num_examples: int, batch_size: int, drop_last: bool) -> int:
    """Batches of one epoch over `num_examples` examples."""
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


def loader_options(args: Any) -> dict[str, Any]:
    """DataLoader worker options from TrainingArguments, as Trainer passes them: ``num_workers``,
    ``pin_memory`` (on CUDA only) and, with workers, ``persistent_workers`` / ``prefetch_factor`` /
    ``multiprocessing_context``."""
    opts: dict[str, Any] = {"num_workers": args.dataloader_num_workers,
                            "pin_memory": bool(args.dataloader_pin_memory) and args.device.type == "cuda"}
    if args.dataloader_num_workers > 0:
        opts["persistent_workers"] = bool(args.dataloader_persistent_workers)
        opts["prefetch_factor"] = args.dataloader_prefetch_factor
        opts["multiprocessing_context"] = getattr(args, "dataloader_multiprocessing_context", None)
    return opts


def seeded_train_loader(ds: Any, *, batch_size: int, collate_fn: Any, seed: int, drop_last: bool = False,
                        **options: Any) -> DataLoader:
    """A shuffling DataLoader over `ds` whose order is a pure function of `seed` (`options`: DataLoader's
    worker options, see :func:`loader_options`)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, sampler=RandomSampler(ds, generator=g), collate_fn=collate_fn,
                      drop_last=drop_last, generator=g, **options)


def update_groups(loader: DataLoader, accumulation_steps: int, label: str) -> Iterator[list[Any]]:
    """Micro-batches grouped per optimizer step, epoch after epoch (each epoch a new shuffle); the last
    group of an epoch holds the remainder, as in Trainer. `label` names the data in errors."""
    while True:
        group: list[Any] = []
        seen = 0
        for batch in loader:
            seen += 1
            group.append(batch)
            if len(group) == accumulation_steps:
                yield group
                group = []
        if group:
            yield group
        if seen == 0:
            raise TaskDataError(f"task {label!r}: the training data loader yields no batch")


def tuning_view(model: Any, task: str | None, train_heads: bool = True) -> nn.ModuleDict:
    """The modules one fine-tuning trains: the backbone and `task`'s head (every head when `task` is None;
    no head when not `train_heads`)."""
    view = nn.ModuleDict({"backbone": model.backbone})
    if train_heads:
        view["heads" if task is None else "head"] = model.heads if task is None else model.heads[task]
    return view


def head_state(model: Any, task: str | None) -> dict[str, torch.Tensor]:
    """Detached copies of `task`'s head tensors (``task=None``: every head, keys ``<task>.<param>``)."""
    if task is None:
        return model.heads_state_dict()
    return {k: v.detach().clone() for k, v in model.heads[task].state_dict().items()}


def check_head_state(model: Any, task: str, state: Mapping[str, torch.Tensor]) -> None:
    """CheckpointError unless `state` has every tensor of `task`'s head, each of its shape (a head received
    from another process or node, before :func:`load_head_`)."""
    for k, v in model.heads[task].state_dict().items():
        if k not in state or tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"task {task!r}: head tensor {k!r} missing or of the wrong shape")


@torch.no_grad()
def load_head_(model: Any, task: str, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` (``{"weight", "bias"}``) into `task`'s head, in place."""
    for k, p in model.heads[task].state_dict(keep_vars=True).items():
        p.data.copy_(state[k])


def head_param_groups_(optimizer: Any, head_params: Iterable[nn.Parameter], lr: float) -> None:
    """Move `head_params` out of every param group of `optimizer` (before its first step) into a group of their
    own with the same options and learning rate `lr` (``head_learning_rate``): weight-decayed and not decayed
    head parameters stay apart, as Trainer grouped them."""
    if not isinstance(getattr(optimizer, "param_groups", None), list):
        raise ValueError("head_learning_rate needs an optimizer with param groups, got "
                         f"{type(optimizer).__name__}")
    ids = {id(p) for p in head_params}
    groups: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        rest = [p for p in group["params"] if id(p) not in ids]
        heads = [p for p in group["params"] if id(p) in ids]
        if rest:
            groups.append({**group, "params": rest})
        if heads:
            groups.append({**group, "params": heads, "lr": lr})
    optimizer.param_groups[:] = groups


@contextmanager
def kept_requires_grad(module: nn.Module) -> Iterator[None]:
    """Every parameter's ``requires_grad`` flag of `module` as it was on entry, restored on exit (a
    fine-tuning may freeze heads or, with LoRA, the base weights; the caller's model must not keep that)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def activation_checkpointing(backbone: nn.Module, enabled: bool, kwargs: Mapping[str, Any] | None) -> Iterator[None]:
    """Activation (gradient) checkpointing on `backbone` while inside, as Trainer turns it on from
    ``activation_checkpointing`` / ``activation_checkpointing_kwargs`` (``every_n_layers`` and ``offload``
    go to the model, the rest to ``torch.utils.checkpoint``); turned off again on exit unless it was on
    already. ValueError when the backbone cannot do it."""
    if not enabled or getattr(backbone, "is_activation_checkpointing", False):
        yield
        return
    if not getattr(backbone, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing / activation_checkpointing: {type(backbone).__name__} does "
                         "not support activation checkpointing")
    gc = dict(kwargs or {})
    every_n_layers = gc.pop("every_n_layers", 1)
    offload = gc.pop("offload", False)
    backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=gc or None,
                                             every_n_layers=every_n_layers, offload=offload)
    try:
        yield
    finally:
        backbone.activation_checkpointing_disable()


def inject_lora(backbone: nn.Module, r: int, alpha: int, target_modules: list[str] | None) -> Any:
    """Wrap `backbone`'s target modules with a fresh LoRA adapter (peft; base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, bias="none")
    return get_peft_model(backbone, cfg)


def remove_lora(backbone: nn.Module, peft_model: Any) -> dict[str, torch.Tensor]:
    """The adapter's deltas ``{"<module>.weight": B @ A * scaling}`` (float32), then the adapter is removed
    (`backbone`'s weights unchanged; its requires_grad flags are the caller's to restore)."""
    from peft.tuners.lora import LoraLayer

    tau = {}
    for name, module in backbone.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            with torch.no_grad():
                tau[f"{name}.weight"] = module.get_delta_weight("default").detach().float()
    peft_model.base_model.unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in backbone.__dict__:
            delattr(backbone, attr)
    return tau


def check_lora_targets(backbone: nn.Module, r: int, alpha: int, target_modules: list[str] | None) -> None:
    """Inject and remove an adapter once, so that bad target modules fail before any training
    (ValueError naming ``lora_target_modules``); `backbone` is left as it was."""
    with kept_requires_grad(backbone):
        try:
            peft_model = inject_lora(backbone, r, alpha, target_modules)
        except ValueError as e:  # peft's NoMatchingPeftModuleError / unknown architecture
            raise ValueError(f"lora_target_modules={target_modules!r}: {e}") from e
        remove_lora(backbone, peft_model)


# ----------------------------------------------------------------------------------------------------------
# the Trainer side
# ----------------------------------------------------------------------------------------------------------
class TaskTuning:
    """The per-task fine-tuning of :class:`~hf_atm.atm.trainer.ATMTrainer` (a ``transformers.Trainer``
    mixin: it uses the Trainer's optimizer / scheduler factories, ``training_step``, callbacks and logs)."""

    def init_tuning(self) -> None:
        """Fresh tuning bookkeeping (called once by the trainer's constructor)."""
        self._active_task: str | None = None
        self._persistent: dict[str, tuple[Any, Any]] = {}
        self._pending_opt_state: dict[str, dict[str, Any]] = {}
        self._round_steps_done, self._round_steps_total = 0, 1
        self._step_base = 0

    # -- seeds, splits and budgets ----------------------------------------------------------------------
    def task_seed(self, round_idx: int, task: str) -> int:
        """The seed of one (round, task) fine-tuning: a pure function of ``(args.seed, round, task)``, so
        results do not depend on which process runs a task, nor on resuming."""
        return tensor_seed(self.args.seed, f"atm/{round_idx}/{task}") % (2**32)

    @property
    def train_split(self) -> str:
        """The split the rounds train on: ``train`` (PA) or ``validation_tune`` (PH)."""
        return "train" if self.args.atm_mode == "pa" else "validation_tune"

    @property
    def round_split(self) -> str:
        """The split every round is scored on: ``validation`` (PA) or ``validation_select`` (PH)."""
        return "validation" if self.args.atm_mode == "pa" else "validation_select"

    def steps_for_epochs(self, dataset: Any, epochs: float) -> int:
        """Optimizer steps of `epochs` epochs over `dataset`: ``ceil(epochs * ceil(batches /
        gradient_accumulation_steps))``, at least 1."""
        a = self.args
        nb = num_batches(len(dataset), self.exchange.global_batch_size(a.per_device_train_batch_size),
                         a.dataloader_drop_last)
        if nb < 1:
            raise TaskDataError("fewer examples than one batch with dataloader_drop_last")
        return max(1, int(math.ceil(epochs * -(-nb // a.gradient_accumulation_steps))))

    def steps_per_round(self, task: str, split: str | None = None, epochs: float | None = None) -> int:
        """Optimizer steps of `task`'s fine-tuning in one round: ``steps_per_round`` if > 0, else
        :meth:`steps_for_epochs` of ``epochs_per_round`` (or `epochs`) over the task's `split`."""
        if self.args.steps_per_round > 0 and epochs is None:
            return int(self.args.steps_per_round)
        ds = self.task_data[task][split or self.train_split]
        try:
            return self.steps_for_epochs(ds, self.args.epochs_per_round if epochs is None else epochs)
        except TaskDataError as e:
            raise TaskDataError(f"task {task!r}: {e}") from None

    # -- trainer state ----------------------------------------------------------------------------------
    def begin_tuning(self, total_steps: int, num_rounds: int) -> None:
        """A fresh TrainerState for `total_steps` optimizer steps over `num_rounds` rounds (Trainer's
        fields: logging / eval / save steps resolved, stateful callbacks registered)."""
        self.state = TrainerState(
            stateful_callbacks=[
                cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)
            ]
        )
        self.state.train_batch_size = self.args.per_device_train_batch_size
        self.state.compute_steps(self.args, total_steps)
        self.state.init_training_references(self, total_steps, num_rounds, None)
        self._step_base = 0
        self.begin_round(total_steps)

    def begin_round(self, total_steps: int) -> None:
        """Start the step-progress count of one round of `total_steps` optimizer steps on this process
        (``state.epoch`` moves from ``round - 1`` to ``round`` over them)."""
        self._round_steps_done, self._round_steps_total = 0, max(1, int(total_steps))

    # -- Trainer hooks ----------------------------------------------------------------------------------
    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> Any:
        """bf16 autocast when ``args.bf16`` (accelerate would add it when preparing the model, which the
        per-task loop does not do)."""
        if self.args.bf16:
            return torch.autocast(device_type=self.args.device.type, dtype=torch.bfloat16,
                                  cache_enabled=cache_enabled)
        return nullcontext()

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """Trainer's compute_loss with the active task routed to the model (unless the batch is mixed)."""
        if self._active_task is not None and "task_ids" not in inputs and "task" not in inputs:
            inputs = {**inputs, "task": self._active_task}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        """Trainer's optimizer over `model`'s trainable parameters; with ``args.head_learning_rate`` the task
        heads' parameters get param groups of their own at that learning rate (:func:`head_param_groups_`)."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and self.args.head_learning_rate is not None:
            head_param_groups_(optimizer, self.model.heads.parameters(), self.args.head_learning_rate)
        return optimizer

    # -- one fine-tuning --------------------------------------------------------------------------------
    def _optimizer_for(self, view: nn.Module, key: str | None, schedule_steps: int) -> None:
        """Set ``self.optimizer`` / ``self.lr_scheduler``: the carried pair of `key` if there is one, else a
        fresh pair over `view`'s parameters (kept under `key`, loaded from a checkpoint's state if pending)."""
        if key is not None and key in self._persistent:
            self.optimizer, self.lr_scheduler = self._persistent[key]
        else:
            self.optimizer, self.lr_scheduler = None, None
            self.create_optimizer(view)
            self.create_scheduler(num_training_steps=schedule_steps)
            if key is not None:
                self._persistent[key] = (self.optimizer, self.lr_scheduler)
                pending = self._pending_opt_state.pop(key, None)
                if pending is not None:
                    self.optimizer.load_state_dict(pending["optimizer"])
                    self.lr_scheduler.load_state_dict(pending["scheduler"])
        self.callback_handler.optimizer = self.optimizer
        self.callback_handler.lr_scheduler = self.lr_scheduler

    def tune_task(
        self,
        task: str | None,
        round_idx: int,
        *,
        steps: int | None = None,
        dataset: Any = None,
        seed: int | None = None,
        base: Mapping[str, torch.Tensor] | None = None,
        out: dict[str, torch.Tensor] | None = None,
        carry_optimizer: bool | None = None,
        schedule_steps: int | None = None,
        task_vector: bool = True,
    ) -> TuningResult:
        """From the current weights, fine-tune the backbone and `task`'s head for `steps` optimizer steps (the
        head only when :func:`~hf_atm.atm.heads.heads_trainable`: by default, heads made by ``head_init="random"``).

        Args:
            task: the task (its head trains, its examples routed to it); None: mixed batches carrying
                ``task_ids`` (every head trains), then `dataset` and `steps` are required.
            round_idx: the round (``state.epoch`` runs from ``round_idx - 1`` to ``round_idx``).
            steps: default :meth:`steps_per_round` of `task`.
            dataset: default the task's training split (:attr:`train_split`).
            seed: seeds every RNG (data order, dropout, LoRA init); default :meth:`task_seed`.
            base: the weights the task vector is measured from (the round's snapshot); default a copy of
                the backbone taken before tuning.
            out: buffers the task vector is written into (reused across calls).
            carry_optimizer: keep one optimizer and schedule per task over calls (default: not
                ``args.reset_optimizer_each_round``).
            schedule_steps: length of the LR schedule (default `steps`; with a carried optimizer
                ``steps x rounds``).
            task_vector: compute the task vector (False: ``result.task_vector`` is None).

        The model keeps the tuned weights (with LoRA the backbone is unchanged: apply ``lora_delta``);
        every requires_grad flag and the train / eval mode of the model are as they were.
        """
        args = self.args
        model = self.model
        if task is None and (dataset is None or steps is None):
            raise ValueError("tune_task(None, ...) (mixed batches) needs a dataset and steps")
        dataset = self.task_data[task][self.train_split] if dataset is None else dataset
        steps = self.steps_per_round(task) if steps is None else int(steps)
        seed = self.task_seed(round_idx, task) if seed is None else int(seed)
        carry = (not args.reset_optimizer_each_round) if carry_optimizer is None else carry_optimizer
        if schedule_steps is None:
            schedule_steps = steps * args.rounds if carry else steps
        lora = args.lora_r > 0
        tensors = local_tensors(model)  # FSDP: this rank's rows (before the optimizer takes the parameters)
        if task_vector and not lora and base is None:
            base = {n: t.detach().clone() for n, t in tensors.items()}
        t0 = time.perf_counter()
        was_training = model.training
        with kept_requires_grad(model), activation_checkpointing(
                model.backbone, args.activation_checkpointing, args.activation_checkpointing_kwargs):
            set_seed(seed)
            peft_model = inject_lora(model.backbone, args.lora_r, args.lora_alpha,
                                     args.lora_target_modules) if lora else None
            train_heads = prepare_heads_(args, model, task)  # frozen, or trainable when asked
            view = tuning_view(model, task, train_heads=train_heads)
            self._optimizer_for(view, (task or "joint") if carry else None, schedule_steps)
            # data_parallel: the loader yields global batches, each rank trains on its share (shard_batch)
            batch_size = self.exchange.global_batch_size(args.per_device_train_batch_size)
            loader = seeded_train_loader(dataset, batch_size=batch_size, collate_fn=self.data_collator, seed=seed,
                                         drop_last=args.dataloader_drop_last, **loader_options(args))
            groups = update_groups(loader, args.gradient_accumulation_steps, task or "joint")
            setup_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            try:
                loss = self._optimizer_steps(model, view, groups, task, steps, round_idx)
            finally:
                model.train(was_training)
            self.exchange.sync_buffers_(model)  # data_parallel: running statistics equal on every rank
            train_s = time.perf_counter() - t1
            tau = lora_delta = None
            if peft_model is not None:
                t2 = time.perf_counter()
                lora_delta = remove_lora(model.backbone, peft_model)
                tau = lora_delta if task_vector else None
                setup_s += time.perf_counter() - t2
        if task_vector and not lora:
            with merge_threads(args.device):
                tau = compute_task_vector(tensors, base, out)
        return TuningResult(task=task, task_vector=tau, lora_delta=lora_delta, head_state=head_state(model, task),
                            loss=loss, steps=steps, train_seconds=train_s, setup_seconds=setup_s)

    def _optimizer_steps(self, model: nn.Module, view: nn.Module, groups: Iterator[list[Any]],
                         task: str | None, steps: int, round_idx: int) -> float:
        """`steps` optimizer steps on the micro-batch `groups`; returns the mean loss."""
        args = self.args
        exchange = self.exchange
        params = [p for p in view.parameters() if p.requires_grad]
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
                    inputs = exchange.shard_batch(inputs)  # data_parallel: this rank's rows (else as is)
                    step_loss = step_loss + self.training_step(model, inputs)
                    if i < len(group) - 1:
                        self.control = self.callback_handler.on_substep_end(args, self.state, self.control)
                exchange.sync_gradients_(params)  # data_parallel: mean over ranks, before clipping
                grad_norm = None
                if args.max_grad_norm is not None and args.max_grad_norm > 0:
                    grad_norm = (clip_grad_norm_(params, args.max_grad_norm, exchange) if exchange.sharded
                                 else self._clip_grad_norm(view))
                self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
                self.optimizer.step()
                self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
                lr = self._get_learning_rate()
                self.lr_scheduler.step()
                model.zero_grad(set_to_none=True)
                loss_sum += step_loss.detach()
                logged = step_loss.detach()
                if args.logging_nan_inf_filter:
                    # as Trainer: a nan / inf step is logged as the mean of the finite ones since the last log
                    # (decided on the device: no host sync per step)
                    logged = torch.where(torch.isfinite(logged), logged, logged_sum / (1 + s - last_logged))
                logged_sum += logged
                self.state.global_step += 1
                self.state.epoch = epoch0 + (self._round_steps_done + s + 1) / max(1, self._round_steps_total)
                self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                if self.control.should_log:
                    logs = {f"{prefix}/loss": logged_sum.item() / (s + 1 - last_logged),
                            f"{prefix}/learning_rate": lr}
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
        return loss_sum.item() / max(1, steps)
