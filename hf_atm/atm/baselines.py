"""Baselines for ATM, through the same model / arguments / data API and the same budget accounting.

Budget rule (``ATM.md``): at a budget of ``B`` epochs, every baseline fine-tunes ``B`` epochs per task
(``B = rounds x epochs_per_round`` of the ATMConfig by default; with ``steps_per_round > 0`` the budget is
``rounds x steps_per_round`` optimizer steps per task), while ATM runs ``B`` rounds of 1 epoch.

* :func:`finetune_individual`: one model per task, each fine-tuned from the same start on its own data only
  (fresh optimizer and schedule over the whole budget, the per-task fine-tuning of ATM's rounds). Gives the
  task vectors, the fine-tuned heads, and each model's accuracy and main score on its own task (the scores are
  the denominators of normalized scores).
* :func:`one_shot_merge`: merge those task vectors once with any method; the scale lambda is chosen on the
  validation split (mean main score, :mod:`hf_atm.atm.metrics`) by the same search for every method (fair
  tuning, :func:`search_scale`): the grid (default :func:`default_scale_grid`: 0, 0.1, ..., 1.0 plus 1/n;
  0 is the pre-trained backbone), then steps of 0.25 above its top while the top scores best, up to 4.0
  (``extend``, ``extend_step``, ``max_scale``); not ATM's in-loop ``merge_scale="auto"``
  (:mod:`hf_atm.atm.scale_search`: by the loss on a slice of the round split, in every round);
  each task keeps its own fine-tuned head at every scale, 0 included.
* :func:`train_joint`: joint multi-task training: mixed batches drawn from the union of all tasks' training
  data, per-task heads, ``B`` epochs over the union.

Results are dicts in the format of ATM's history entries (:class:`~hf_atm.atm.history.HistoryEntry`,
``round`` = the budget in epochs) with ``method`` and, for merges, ``scale`` and ``validation_by_scale``
(:class:`MergeResult` adds the scales tried and whether the chosen one is at the edge of them).
Every fine-tuning is :meth:`ATMTrainer.tune_task <hf_atm.atm.tuning.TaskTuning.tune_task>`; `model`'s
requires_grad flags are never changed.
Baselines run in one process (under several processes every process would repeat the same work).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Value, concatenate_datasets

from hf_atm.atm.config import ATMConfig
from hf_atm.atm.evaluation import mean_accuracy, pairwise_cosine
from hf_atm.atm.history import HistoryEntry
from hf_atm.atm.model import MultiTaskModel
from hf_atm.atm.problems import is_regression
from hf_atm.atm.rounds import apply_delta_
from hf_atm.atm.sharding import fsdp_requested
from hf_atm.atm.trainer import ATMTrainer
from hf_atm.atm.tuning import head_state, load_head_
from hf_atm.errors import MergeConfigError
from hf_atm.merging.spec import MergeSpec, merge_deltas, tensor_seed

__all__ = [
    "IndividualResult",
    "MergeResult",
    "ScaleChoice",
    "default_scale_grid",
    "finetune_individual",
    "one_shot_merge",
    "search_scale",
    "train_joint",
]

#: :func:`search_scale`'s defaults: the step of the upward extension and the largest scale it tries.
EXTEND_STEP = 0.25
MAX_SCALE = 4.0


def default_scale_grid(num_tasks: int) -> list[float]:
    """0, 0.1, 0.2, ..., 1.0 and 1/n (`num_tasks` = n >= 1), sorted, without duplicates. 0 is the pre-trained
    backbone (with each task's fine-tuned head, a baseline a merge has to beat); 1/n makes task arithmetic
    the mean of the task vectors."""
    if num_tasks < 1:
        raise ValueError(f"default_scale_grid needs num_tasks >= 1, got {num_tasks}")
    grid = {round(0.1 * k, 10) for k in range(11)} | {1.0 / num_tasks}
    return sorted(grid)


@dataclass(frozen=True)
class ScaleChoice:
    """The outcome of :func:`search_scale`.

    Attributes:
        scale: the chosen scale.
        validation_by_scale: ``{scale: validation score}`` of every scale tried, in the order tried
            (ascending: the grid, then the extension).
        at_grid_edge: the chosen scale is the largest tried and no larger one could be tried (``extend``
            off, or the next step would pass ``max_scale``), or it is the smallest tried and not 0 (0, the
            pre-trained backbone, is the natural lower end). A table should say so: the best scale may lie
            outside what was tried.
    """

    scale: float
    validation_by_scale: dict[float, float]
    at_grid_edge: bool

    @property
    def scales_tried(self) -> list[float]:
        """The scales tried, in order."""
        return list(self.validation_by_scale)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_search(grid: Sequence[float], step: float, max_scale: float) -> None:
    """MergeConfigError naming the option when :func:`search_scale`'s options are not usable."""
    if not grid or not all(_finite(s) for s in grid):
        raise MergeConfigError(f"scale_grid must be a non-empty list of finite numbers, got {list(grid)}")
    if not (_finite(step) and step > 0):
        raise MergeConfigError(f"extend_step must be a finite number > 0, got {step!r}")
    if not _finite(max_scale):
        raise MergeConfigError(f"max_scale must be a finite number, got {max_scale!r}")


def search_scale(
    evaluate: Callable[[float], float],
    grid: Sequence[float],
    *,
    extend: bool = True,
    step: float = EXTEND_STEP,
    max_scale: float = MAX_SCALE,
) -> ScaleChoice:
    """The scale with the highest ``evaluate(scale)`` (higher is better; NaN never wins; ties within 1e-12
    keep the smaller scale), from `grid` (evaluated once per distinct value, ascending) and, with `extend`,
    from ``top + step, top + 2 step, ...`` (``top`` = the grid's largest value) while the best so far is
    the largest scale tried: the walk stops at the first scale that is not better than the best, or before
    a scale above `max_scale` (a grid whose top is already >= `max_scale` is not extended). ``extend=False``
    evaluates exactly the grid. MergeConfigError (a ValueError) for an empty or non-finite grid, a `step`
    that is not a finite number > 0 or a non-finite `max_scale`, before any evaluation."""
    _check_search(grid, step, max_scale)
    by_scale: dict[float, float] = {}
    best, best_value = math.nan, -math.inf

    def trial(s: float) -> bool:
        """Evaluate `s`; True when it becomes the best (strictly better: the grid is walked ascending)."""
        nonlocal best, best_value
        v = by_scale[s] = float(evaluate(s))
        value = -math.inf if math.isnan(v) else v
        if math.isnan(best) or value > best_value + 1e-12:
            best, best_value = s, value
            return True
        return False

    scales = sorted({float(s) for s in grid})
    for s in scales:
        trial(s)
    top, k = scales[-1], 1
    # rounded to 10 places as default_scale_grid's values are (with a step such as 0.1, top + 3 * step would
    # be 1.3000000000000003): a walked scale reads, and compares, as the number it stands for
    while extend and best == max(by_scale) and round(top + k * step, 10) <= max_scale:
        if not trial(round(top + k * step, 10)):
            break
        k += 1
    upper = best == max(by_scale) and not (extend and round(top + k * step, 10) <= max_scale)
    lower = best == min(by_scale) and best != 0.0
    return ScaleChoice(scale=best, validation_by_scale=by_scale, at_grid_edge=upper or lower)


def _budget_steps(trainer: ATMTrainer, task: str, budget_epochs: float | None) -> int:
    """Optimizer steps of a baseline's fine-tuning of `task` at the budget (see the module docstring)."""
    args = trainer.args
    if budget_epochs is None and args.steps_per_round > 0:
        return args.rounds * args.steps_per_round
    epochs = budget_epochs if budget_epochs is not None else args.rounds * args.epochs_per_round
    return trainer.steps_per_round(task, epochs=epochs)


def _budget_epochs(args: ATMConfig, budget_epochs: float | None) -> float:
    return float(budget_epochs) if budget_epochs is not None else float(args.rounds * args.epochs_per_round)


def _entry(trainer: ATMTrainer, acc_score: tuple[Mapping[str, float], Mapping[str, float]], split: str,
           budget: float, method: str, cos: list[list[float]] | None, train_s: float, merge_s: float,
           reference: Mapping[str, float] | None) -> dict[str, Any]:
    """The history-style entry of a baseline from its ``(accuracy, main score)`` per task on `split`."""
    acc, score = acc_score
    return HistoryEntry.build(budget, acc, tasks=trainer.task_names, split=split, reference=reference, cosine=cos,
                              score=score, metric=trainer.metric_names(), train_seconds=train_s,
                              merge_seconds=merge_s, method=method).to_dict()


def _trainer(model: MultiTaskModel, args: ATMConfig, task_datasets: Mapping[str, Any], **kw: Any) -> ATMTrainer:
    if fsdp_requested(args):  # the baselines read whole backbone tensors; FSDP would hand them DTensor shards
        raise ValueError("the baselines (finetune_individual, one_shot_merge, train_joint) do not run with FSDP: "
                         "remove fsdp / fsdp_config and the accelerate FSDP config for them")
    tr = ATMTrainer(model=model, args=args, task_datasets=task_datasets, **kw)
    tr.model.zero_grad(set_to_none=True)
    return tr


def _split_scores(tr: ATMTrainer, split: str) -> tuple[dict[str, float], dict[str, float]]:
    """``(accuracy, main score)`` per task on `split`."""
    return tr.accuracies_and_scores({t: tr.task_data[t][split] for t in tr.task_names})


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
        validation_score / test_score: the same models' main scores (the task's metric; equal to the
            accuracies for tasks scored by accuracy).
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
    validation_score: dict[str, float] = field(default_factory=dict)
    test_score: dict[str, float] | None = None

    def reference_accuracies(self, split: str = "test") -> dict[str, float]:
        """The normalized-score denominators: each individual model's main score on `split` (its accuracy
        for tasks scored by accuracy; the name predates per-task metrics)."""
        acc = self.test_score if split == "test" else self.validation_score
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
    heads0 = {t: head_state(model, t) for t in tr.task_names}
    steps = {t: _budget_steps(tr, t, budget_epochs) for t in tr.task_names}
    tr.begin_tuning(sum(steps.values()), 1)
    _train_begin(tr)
    task_vectors, heads, val_acc, test_acc, val_score, test_score = {}, {}, {}, {}, {}, {}
    train_s = 0.0
    has_test = all("test" in tr.task_data[t] for t in tr.task_names)
    for task in tr.task_names:
        apply_delta_(tensors, base, {})  # back to the common start
        load_head_(model, task, heads0[task])
        run = tr.tune_task(task, 1, steps=steps[task], seed=tensor_seed(args.seed, f"individual/{task}") % (2**32),
                           carry_optimizer=False)
        train_s += run.train_seconds
        if run.lora_delta is not None:  # LoRA: apply the adapter's delta to evaluate this task's model
            apply_delta_(tensors, None, run.lora_delta)
        task_vectors[task] = {n: v.cpu() for n, v in run.task_vector.items()}
        heads[task] = run.head_state
        acc, val_score[task] = tr.task_accuracy_and_score(task, tr.task_data[task][tr.round_split])
        classification = not is_regression(model.config, task)  # a regression task has no accuracy entry
        if classification:
            val_acc[task] = acc
        if has_test:
            acc, test_score[task] = tr.task_accuracy_and_score(task, tr.task_data[task]["test"])
            if classification:
                test_acc[task] = acc
    _train_end(tr)
    apply_delta_(tensors, base, {})
    for task in tr.task_names:
        load_head_(model, task, heads0[task])
    cos = pairwise_cosine([task_vectors[t] for t in tr.task_names])
    res = IndividualResult(base=base, task_vectors=task_vectors, heads=heads, validation_accuracy=val_acc,
                           test_accuracy=test_acc if has_test else None, budget_epochs=budget,
                           train_seconds=train_s, validation_score=val_score,
                           test_score=test_score if has_test else None)
    res.entries[tr.round_split] = _entry(tr, (val_acc, val_score), tr.round_split, budget, "individual", cos,
                                         train_s, 0.0, None)
    if has_test:
        res.entries["test"] = _entry(tr, (test_acc, test_score), "test", budget, "individual", cos, train_s, 0.0,
                                     None)
    return res


def _train_begin(tr: ATMTrainer) -> None:
    """Trainer's on_train_begin for a baseline's training (callbacks such as the progress bar set up there)."""
    tr.control = tr.callback_handler.on_train_begin(tr.args, tr.state, tr.control)


def _train_end(tr: ATMTrainer) -> None:
    tr.control = tr.callback_handler.on_train_end(tr.args, tr.state, tr.control)


@dataclass
class MergeResult:
    """A baseline's resulting model and its history-style entries (``entries[split]``); for merges also the
    scale search (:func:`search_scale`; None for joint training).

    Attributes:
        scale: the chosen scale (1.0 for ``average``, which takes none).
        validation_by_scale: the mean validation score (main metrics) of every scale tried, in the order tried.
        scales_tried: the keys of `validation_by_scale`, in order (ascending).
        at_grid_edge: the chosen scale is at the edge of the scales tried (see :class:`ScaleChoice`; False
            for ``average``).
    """

    model: MultiTaskModel
    entries: dict[str, dict[str, Any]]
    scale: float | None = None
    validation_by_scale: dict[float, float] | None = None
    at_grid_edge: bool | None = None

    @property
    def scales_tried(self) -> list[float] | None:
        """The scales tried, in order: the keys of `validation_by_scale` (None for joint training)."""
        return None if self.validation_by_scale is None else list(self.validation_by_scale)


def one_shot_merge(
    model: MultiTaskModel,
    individual: IndividualResult,
    args: ATMConfig,
    task_datasets: Mapping[str, Any],
    method: str = "task_arithmetic",
    *,
    scale_grid: Sequence[float] | None = None,
    extend: bool = True,
    extend_step: float = EXTEND_STEP,
    max_scale: float = MAX_SCALE,
    density: float | None = None,
    gamma: float | None = None,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    reference_accuracies: Mapping[str, float] | None = None,
    data_collator: Any | None = None,
    processing_class: Any | None = None,
) -> MergeResult:
    """Merge the individual task vectors once: ``base + lambda * combine(tau_1..tau_n)`` with lambda chosen
    by the mean main score (the tasks' metrics; mean accuracy when every task is scored by accuracy; a NaN
    mean never wins) on the validation split (``validation_select`` in PH mode) by :func:`search_scale`:
    every value of `scale_grid` (default :func:`default_scale_grid`: 0, 0.1, ..., 1.0 and 1/n; a given grid
    as given), then, with `extend`, steps of `extend_step` above the grid's top while the top scores best,
    up to `max_scale`; ties keep the smaller scale; ``extend=False`` tries exactly the grid. Each task keeps
    its fine-tuned head at every scale (at 0 the backbone is the base). Returns a new MultiTaskModel (a copy
    of `model`; `model` is not modified) with the scales tried and whether the chosen one is at their edge.
    ``average`` takes no scale (grid [1.0], never extended). MergeConfigError for a bad method or option
    (scale grid, extension step, max scale included), before any evaluation."""
    merged = copy.deepcopy(model)
    tr = _trainer(merged, args, task_datasets, data_collator=data_collator, processing_class=processing_class)
    tasks = tr.task_names
    missing = [t for t in tasks if t not in individual.task_vectors]
    if missing:
        raise MergeConfigError(f"the individual results have no task vector for {missing}")
    if method == "average":
        grid, extend = [1.0], False
    else:
        grid = list(scale_grid) if scale_grid is not None else default_scale_grid(len(tasks))
    _check_search(grid, extend_step, max_scale)  # before anything is merged or evaluated
    spec = MergeSpec(method=method, weights=tuple(weights) if weights is not None else None, scale=1.0,
                     density=density, gamma=gamma, seed=seed)
    spec.validate(len(tasks))
    t0 = time.perf_counter()
    names = sorted(individual.task_vectors[tasks[0]])
    combined = {n: merge_deltas(spec, [individual.task_vectors[t][n] for t in tasks], n) for n in names}
    merge_s = time.perf_counter() - t0
    tensors = merged.backbone_tensors()
    for t in tasks:
        load_head_(merged, t, individual.heads[t])
    sel_split = tr.round_split

    def set_scale(s: float) -> None:
        """backbone = base + s * combined (``average``: base + combined, the weighted mean of the models)."""
        for n, t in tensors.items():  # tensor by tensor: one scaled temporary at a time, not a model copy
            d = combined.get(n)
            apply_delta_({n: t}, individual.base, {} if d is None else {n: d if method == "average" else d * s})

    def validation(s: float) -> float:
        set_scale(s)
        return mean_accuracy(_split_scores(tr, sel_split)[1])

    found = search_scale(validation, grid, extend=extend, step=extend_step, max_scale=max_scale)
    best, by_scale = found.scale, found.validation_by_scale
    set_scale(best)
    cos = pairwise_cosine([individual.task_vectors[t] for t in tasks])
    budget = individual.budget_epochs
    entries = {}
    for split in (sel_split, "test"):
        if all(split in tr.task_data[t] for t in tasks):
            entries[split] = _entry(tr, _split_scores(tr, split), split, budget, method, cos,
                                    individual.train_seconds, merge_s, reference_accuracies)
    for e in entries.values():
        e["scale"] = best
        e["validation_by_scale"] = dict(by_scale)
    return MergeResult(model=merged, entries=entries, scale=best, validation_by_scale=by_scale,
                       at_grid_edge=found.at_grid_edge and method != "average")


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
    # one label type for the union: class ids, or float32 for all when a task is a regression (class ids are
    # exact in float32; the model's cross entropy takes them back as ids)
    kind = "float32" if any(is_regression(model.config, t) for t in tr.task_names) else "int64"
    for t in tr.task_names:
        ds = tr.task_data[t][tr.train_split].with_format(None)
        ds = ds.cast_column("labels", Value(kind))
        parts.append(ds.add_column("task_ids", [names.index(t)] * len(ds)))
    union = concatenate_datasets(parts)
    if tr.task_data[tr.task_names[0]][tr.train_split].format["type"] == "torch":
        union = union.with_format("torch")
    budget = _budget_epochs(args, budget_epochs)
    if budget_epochs is None and args.steps_per_round > 0:
        steps = args.rounds * args.steps_per_round * len(tr.task_names)  # same number of updates as ATM
    else:
        steps = tr.steps_for_epochs(union, budget)
    tr.begin_tuning(steps, 1)
    _train_begin(tr)
    run = tr.tune_task(None, 1, steps=steps, dataset=union, seed=tensor_seed(args.seed, "joint") % (2**32),
                       carry_optimizer=False, task_vector=False)
    _train_end(tr)
    if run.lora_delta is not None:
        apply_delta_(model.backbone_tensors(), None, run.lora_delta)
    entries = {}
    for split in (tr.round_split, "test"):
        if all(split in tr.task_data[t] for t in tr.task_names):
            entries[split] = _entry(tr, _split_scores(tr, split), split, budget, "joint", None,
                                    run.train_seconds, 0.0, reference_accuracies)
    return MergeResult(model=model, entries=entries)
