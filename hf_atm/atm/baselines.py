"""Baselines for ATM, through the same model / arguments / data API and the same budget accounting.

Budget rule (``ATM.md``): at a budget of ``B`` epochs, every baseline fine-tunes ``B`` epochs per task
(``B = rounds x epochs_per_round`` of the ATMConfig by default; with ``steps_per_round > 0`` the budget is
``rounds x steps_per_round`` optimizer steps per task), while ATM runs ``B`` rounds of 1 epoch.

* :func:`finetune_individual`: one model per task, each fine-tuned from the same start on its own data only
  (fresh optimizer and schedule over the whole budget, the per-task fine-tuning of ATM's rounds). Gives the
  task vectors, the fine-tuned heads, and each model's accuracy on its own task (the denominators of
  normalized accuracy).
* :func:`one_shot_merge`: merge those task vectors once with any method; the scale lambda is chosen on the
  validation split from the same grid for every method (default 0.1, 0.2, ..., 1.0 plus 1/n: fair tuning);
  each task keeps its own fine-tuned head.
* :func:`train_joint`: joint multi-task training: mixed batches drawn from the union of all tasks' training
  data, per-task heads, ``B`` epochs over the union.

Results are dicts in the format of ATM's history entries (``round`` = the budget in epochs, ``accuracy``,
``mean_accuracy``, ``normalized_accuracy``, ``mean_normalized_accuracy``, ``cosine``, ``tasks``, ``split``,
``train_seconds``, ``merge_seconds``) plus ``method`` and, for merges, ``scale`` and ``validation_by_scale``.
Baselines run in one process (under several processes every process would repeat the same work).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Value, concatenate_datasets

from hf_atm.atm.config import ATMConfig
from hf_atm.atm.evaluation import cosine_from_gram, mean_accuracy, mean_off_diagonal, normalized_accuracy
from hf_atm.atm.model import MultiTaskModel
from hf_atm.atm.trainer import ATMTrainer
from hf_atm.errors import MergeConfigError
from hf_atm.merging.spec import MergeSpec, merge_deltas, tensor_seed

__all__ = [
    "IndividualResult",
    "MergeResult",
    "default_scale_grid",
    "finetune_individual",
    "one_shot_merge",
    "train_joint",
]


def default_scale_grid(num_tasks: int) -> list[float]:
    """0.1, 0.2, ..., 1.0 and 1/n, sorted."""
    grid = {round(0.1 * k, 10) for k in range(1, 11)} | {1.0 / num_tasks}
    return sorted(grid)


def _budget_steps(trainer: ATMTrainer, task: str | None, budget_epochs: float | None, dataset: Any = None) -> int:
    """Optimizer steps of a baseline fine-tuning at the budget (see the module docstring)."""
    args = trainer.args
    if budget_epochs is None and args.steps_per_round > 0:
        return args.rounds * args.steps_per_round
    epochs = budget_epochs if budget_epochs is not None else args.rounds * args.epochs_per_round
    if dataset is None:
        return trainer.steps_per_round(task, epochs=epochs)
    nb = trainer._num_batches(dataset)
    return max(1, int(math.ceil(epochs * -(-nb // args.gradient_accumulation_steps))))


def _budget_epochs(args: ATMConfig, budget_epochs: float | None) -> float:
    return float(budget_epochs) if budget_epochs is not None else float(args.rounds * args.epochs_per_round)


def _entry(trainer: ATMTrainer, acc: Mapping[str, float], split: str, budget: float, method: str,
           cos: list[list[float]] | None, train_s: float, merge_s: float,
           reference: Mapping[str, float] | None) -> dict[str, Any]:
    norm = normalized_accuracy(acc, reference)
    return {
        "round": budget,
        "accuracy": dict(acc),
        "mean_accuracy": mean_accuracy(acc),
        "normalized_accuracy": norm,
        "mean_normalized_accuracy": mean_accuracy(norm) if norm is not None else None,
        "cosine": cos,
        "mean_cosine": mean_off_diagonal(cos),
        "tasks": list(trainer.task_names),
        "split": split,
        "train_seconds": train_s,
        "merge_seconds": merge_s,
        "method": method,
    }


def _trainer(model: MultiTaskModel, args: ATMConfig, task_datasets: Mapping[str, Any], **kw: Any) -> ATMTrainer:
    tr = ATMTrainer(model=model, args=args, task_datasets=task_datasets, **kw)
    tr.model.zero_grad(set_to_none=True)
    return tr


@dataclass
class IndividualResult:
    """Per-task fine-tuned models, as task vectors over a common base.

    Attributes:
        base: the starting backbone tensors (CPU copies), by name.
        task_vectors: ``{task: {name: theta_task - base}}`` (float32 on CPU, float64 for a float64 model;
            only the LoRA target weights with ``lora_r > 0``).
        heads: ``{task: {"weight": ..., "bias": ...}}`` each task's fine-tuned head.
        validation_accuracy / test_accuracy: each fine-tuned model on its own task (test: None without a
            test split).
        entries: ``{"validation": history-style dict, "test": ... }``.
    """

    base: dict[str, torch.Tensor]
    task_vectors: dict[str, dict[str, torch.Tensor]]
    heads: dict[str, dict[str, torch.Tensor]]
    validation_accuracy: dict[str, float]
    test_accuracy: dict[str, float] | None
    budget_epochs: float
    train_seconds: float
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    def reference_accuracies(self, split: str = "test") -> dict[str, float]:
        """The normalized-accuracy denominators: each individual model's accuracy on `split`."""
        acc = self.test_accuracy if split == "test" else self.validation_accuracy
        if acc is None:
            raise ValueError(f"no {split!r} accuracies (the tasks have no {split!r} split)")
        return dict(acc)


def finetune_individual(
    model: MultiTaskModel,
    args: ATMConfig,
    task_datasets: Mapping[str, Any],
    *,
    budget_epochs: float | None = None,
    data_collator: Any | None = None,
    processing_class: Any | None = None,
) -> IndividualResult:
    """Fine-tune one model per task from `model` for the budget, each on its own training data (``train``;
    ``validation_tune`` in PH mode), and evaluate each on its own task. `model` is left as it was given
    (its backbone and heads are restored at the end)."""
    tr = _trainer(model, args, task_datasets, data_collator=data_collator, processing_class=processing_class)
    budget = _budget_epochs(args, budget_epochs)
    tensors = model.backbone_tensors()
    base = {n: t.detach().to("cpu", copy=True) for n, t in tensors.items()}
    heads0 = {t: {k: v.detach().clone() for k, v in model.heads[t].state_dict().items()} for t in tr.task_names}
    steps = {t: _budget_steps(tr, t, budget_epochs) for t in tr.task_names}
    tr._init_state(sum(steps.values()), 1)
    _train_begin(tr)
    task_vectors, heads, val_acc, test_acc = {}, {}, {}, {}
    train_s = 0.0
    has_test = all("test" in tr.task_data[t] for t in tr.task_names)
    for task in tr.task_names:
        _restore_backbone(tensors, base)
        _load_head(model, task, heads0[task])
        seed = tensor_seed(args.seed, f"individual/{task}") % (2**32)
        run = tr._finetune(task, tr.task_data[task][tr._train_split], steps=steps[task], seed=seed, round_idx=1)
        train_s += run["train_seconds"]
        if "tau" in run:  # LoRA: apply the adapter's delta to evaluate this task's model
            tau = {n: v.cpu() for n, v in run["tau"].items()}
            with torch.no_grad():
                for n, d in tau.items():
                    tensors[n].add_(d.to(tensors[n].device, tensors[n].dtype))
        else:
            tau = {n: _wide(t.detach().cpu()) - _wide(base[n]) for n, t in tensors.items()}
        task_vectors[task] = tau
        heads[task] = {k: v.detach().clone() for k, v in model.heads[task].state_dict().items()}
        val_acc[task] = _own_accuracy(tr, task, tr._round_split)
        if has_test:
            test_acc[task] = _own_accuracy(tr, task, "test")
    _train_end(tr)
    _restore_backbone(tensors, base)
    for task in tr.task_names:
        _load_head(model, task, heads0[task])
    cos = _cosine(task_vectors, tr.task_names)
    res = IndividualResult(base=base, task_vectors=task_vectors, heads=heads, validation_accuracy=val_acc,
                           test_accuracy=test_acc if has_test else None, budget_epochs=budget,
                           train_seconds=train_s)
    res.entries[tr._round_split] = _entry(tr, val_acc, tr._round_split, budget, "individual", cos, train_s, 0.0,
                                          None)
    if has_test:
        res.entries["test"] = _entry(tr, test_acc, "test", budget, "individual", cos, train_s, 0.0, None)
    return res


def _train_begin(tr: ATMTrainer) -> None:
    """Trainer's on_train_begin for a baseline's training (callbacks such as the progress bar set up there)."""
    tr.control = tr.callback_handler.on_train_begin(tr.args, tr.state, tr.control)


def _train_end(tr: ATMTrainer) -> None:
    tr.control = tr.callback_handler.on_train_end(tr.args, tr.state, tr.control)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (task vectors are computed in float32), float64 kept."""
    return t if t.dtype == torch.float64 else t.float()


def _own_accuracy(tr: ATMTrainer, task: str, split: str) -> float:
    correct, total = tr._count_correct(task, tr.task_data[task][split])
    return correct / total


def _restore_backbone(tensors: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, t in tensors.items():
            t.copy_(base[n])


def _load_head(model: MultiTaskModel, task: str, state: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, p in model.heads[task].state_dict(keep_vars=True).items():
            p.data.copy_(state[k])


def _cosine(task_vectors: Mapping[str, Mapping[str, torch.Tensor]], tasks: Sequence[str]) -> list[list[float]]:
    from hf_atm.atm.evaluation import accumulate_gram

    gram = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
    for name in sorted(task_vectors[tasks[0]]):
        accumulate_gram(gram, [task_vectors[t][name] for t in tasks])
    return cosine_from_gram(gram)


@dataclass
class MergeResult:
    """A baseline's resulting model and its history-style entries (``entries[split]``), plus, for merges,
    the chosen scale and the mean validation accuracy of every scale tried."""

    model: MultiTaskModel
    entries: dict[str, dict[str, Any]]
    scale: float | None = None
    validation_by_scale: dict[float, float] | None = None


def one_shot_merge(
    model: MultiTaskModel,
    individual: IndividualResult,
    args: ATMConfig,
    task_datasets: Mapping[str, Any],
    method: str = "task_arithmetic",
    *,
    scale_grid: Sequence[float] | None = None,
    density: float | None = None,
    gamma: float | None = None,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    reference_accuracies: Mapping[str, float] | None = None,
    data_collator: Any | None = None,
    processing_class: Any | None = None,
) -> MergeResult:
    """Merge the individual task vectors once: ``base + lambda * combine(tau_1..tau_n)`` with lambda picked
    from `scale_grid` (default :func:`default_scale_grid`) by mean accuracy on the validation split
    (``validation_select`` in PH mode); ties keep the smaller scale. Each task keeps its fine-tuned head.
    Returns a new MultiTaskModel (a copy of `model`); `model` is not modified. ``average`` takes no scale
    (grid [1.0]). MergeConfigError for a bad method or option, before any evaluation."""
    merged = copy.deepcopy(model)
    tr = _trainer(merged, args, task_datasets, data_collator=data_collator, processing_class=processing_class)
    tasks = tr.task_names
    missing = [t for t in tasks if t not in individual.task_vectors]
    if missing:
        raise MergeConfigError(f"the individual results have no task vector for {missing}")
    grid = [1.0] if method == "average" else list(scale_grid or default_scale_grid(len(tasks)))
    if not grid or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in grid):
        raise MergeConfigError(f"scale_grid must hold finite numbers, got {grid}")
    spec = MergeSpec(method=method, weights=tuple(weights) if weights is not None else None, scale=1.0,
                     density=density, gamma=gamma, seed=seed)
    spec.validate(len(tasks))
    t0 = time.perf_counter()
    names = sorted(individual.task_vectors[tasks[0]])
    combined = {n: merge_deltas(spec, [individual.task_vectors[t][n] for t in tasks], n) for n in names}
    merge_s = time.perf_counter() - t0
    tensors = merged.backbone_tensors()
    for t in tasks:
        _load_head(merged, t, individual.heads[t])
    sel_split = tr._round_split
    by_scale: dict[float, float] = {}
    best, best_acc = None, -math.inf
    for s in grid:
        _set_merged(tensors, individual.base, combined, s, method)
        acc = tr._accuracies({t: tr.task_data[t][sel_split] for t in tasks})
        by_scale[float(s)] = mean_accuracy(acc)
        if by_scale[float(s)] > best_acc + 1e-12 or (best is not None and by_scale[float(s)] == best_acc
                                                         and s < best):
            best, best_acc = float(s), by_scale[float(s)]
    _set_merged(tensors, individual.base, combined, best, method)
    cos = _cosine(individual.task_vectors, tasks)
    budget = individual.budget_epochs
    entries = {}
    acc = tr._accuracies({t: tr.task_data[t][sel_split] for t in tasks})
    entries[sel_split] = _entry(tr, acc, sel_split, budget, method, cos, individual.train_seconds, merge_s,
                                reference_accuracies)
    if all("test" in tr.task_data[t] for t in tasks):
        acc = tr._accuracies({t: tr.task_data[t]["test"] for t in tasks})
        entries["test"] = _entry(tr, acc, "test", budget, method, cos, individual.train_seconds, merge_s,
                                 reference_accuracies)
    for e in entries.values():
        e["scale"] = best
        e["validation_by_scale"] = dict(by_scale)
    return MergeResult(model=merged, entries=entries, scale=best, validation_by_scale=by_scale)


def _set_merged(tensors: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                combined: Mapping[str, torch.Tensor], scale: float, method: str) -> None:
    """backbone = base + scale * combined (``average``: base + combined, the weighted mean of the models)."""
    with torch.no_grad():
        for n, t in tensors.items():
            if n in combined:
                d = combined[n] if method == "average" else combined[n] * scale
                t.copy_((base[n].to(d.dtype) + d).to(t.dtype))
            else:
                t.copy_(base[n])


def train_joint(
    model: MultiTaskModel,
    args: ATMConfig,
    task_datasets: Mapping[str, Any],
    *,
    budget_epochs: float | None = None,
    reference_accuracies: Mapping[str, float] | None = None,
    data_collator: Any | None = None,
    processing_class: Any | None = None,
) -> MergeResult:
    """Joint multi-task training of `model` (in place): shuffled mixed batches from the union of every
    task's training data (each example routed to its task's head by ``task_ids``), ``B`` epochs over the
    union, one optimizer and schedule. Returns the model and its validation / test entries."""
    tr = _trainer(model, args, task_datasets, data_collator=data_collator, processing_class=processing_class)
    names = model.task_names
    parts = []
    for t in tr.task_names:
        ds = tr.task_data[t][tr._train_split].with_format(None)
        ds = ds.cast_column("labels", Value("int64"))
        parts.append(ds.add_column("task_ids", [names.index(t)] * len(ds)))
    union = concatenate_datasets(parts)
    if tr.task_data[tr.task_names[0]][tr._train_split].format["type"] == "torch":
        union = union.with_format("torch")
    budget = _budget_epochs(args, budget_epochs)
    if budget_epochs is None and args.steps_per_round > 0:
        steps = args.rounds * args.steps_per_round * len(tr.task_names)  # same number of updates as ATM
    else:
        steps = _budget_steps(tr, None, budget, dataset=union)
    tr._init_state(steps, 1)
    _train_begin(tr)
    run = tr._finetune(None, union, steps=steps, seed=tensor_seed(args.seed, "joint") % (2**32), round_idx=1)
    _train_end(tr)
    if "tau" in run:
        tensors = model.backbone_tensors()
        with torch.no_grad():
            for n, d in run["tau"].items():
                tensors[n].add_(d.to(tensors[n].device, tensors[n].dtype))
    entries = {}
    for split in (tr._round_split, "test"):
        if all(split in tr.task_data[t] for t in tr.task_names):
            acc = tr._accuracies({t: tr.task_data[t][split] for t in tr.task_names})
            entries[split] = _entry(tr, acc, split, budget, "joint", None, run["train_seconds"], 0.0,
                                    reference_accuracies)
    return MergeResult(model=model, entries=entries)
