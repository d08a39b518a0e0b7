"""Task data of an ATM run: each task's DatasetDict checked against the model and prepared (labels, inputs).

PH mode also divides each task's ``validation`` split deterministically
(``Dataset.train_test_split(test_size=ph_select_fraction, seed=args.seed)``) into ``validation_tune`` (what
the rounds train on) and ``validation_select`` (what scores every round).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from hf_atm.atm.model import MultiTaskModel
from hf_atm.atm.problems import is_regression
from hf_atm.errors import TaskDataError

__all__ = ["input_columns", "ph_validation_split", "prepare_split", "prepare_task_data"]


def input_columns(model: MultiTaskModel) -> set[str]:
    """The input names `model`'s backbone forward accepts (besides **kwargs): the dataset columns kept."""
    params = inspect.signature(model.backbone.forward).parameters
    return {k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def prepare_split(ds: Any, task: str, split: str, model: MultiTaskModel, torch_format: bool,
                  require_labels: bool = True) -> Any:
    """`ds` (split `split` of `task`) with its label column named ``labels``, only the backbone's input
    columns kept, labels checked against the model's head (class ids; finite floats for a regression task;
    TaskDataError naming task and split); in torch
    format when `torch_format`. Without `require_labels` a split with no label column is accepted (inputs
    only, for prediction)."""
    cols = list(ds.column_names)
    label_col = "labels" if "labels" in cols else "label" if "label" in cols else None
    if len(ds) == 0:
        raise TaskDataError(f"task {task!r}, split {split!r} has no examples")
    if label_col is None:
        if require_labels:
            raise TaskDataError(f"task {task!r}, split {split!r}: no 'labels' or 'label' column (columns: {cols})")
        return _select_inputs(ds, task, split, model, [], torch_format)
    if is_regression(model.config, task):
        _check_regression_labels(ds, task, split, label_col)
    else:
        _check_class_ids(ds, task, split, label_col, model.tasks[task])
    if label_col == "label":
        ds = ds.rename_column("label", "labels")
    return _select_inputs(ds, task, split, model, ["labels"], torch_format)


def _check_regression_labels(ds: Any, task: str, split: str, label_col: str) -> None:
    """TaskDataError naming task and split unless `label_col` holds finite real numbers (a float column)."""
    labels = np.asarray(ds[label_col])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.floating):
        raise TaskDataError(f"task {task!r}, split {split!r}: regression task: column {label_col!r} must hold "
                            f"float targets, got {ds.features.get(label_col)}")
    if not np.isfinite(labels).all():
        raise TaskDataError(f"task {task!r}, split {split!r}: regression targets in {label_col!r} must be finite "
                            f"({int((~np.isfinite(labels)).sum())} are not)")


def _check_class_ids(ds: Any, task: str, split: str, label_col: str, names: list[str]) -> None:
    """TaskDataError naming task and split unless `label_col` holds class ids of the head's `names`."""
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


def _select_inputs(ds: Any, task: str, split: str, model: MultiTaskModel, extra: list[str],
                   torch_format: bool) -> Any:
    """`ds` reduced to the backbone's input columns and `extra` (TaskDataError when it has no input)."""
    cols = list(ds.column_names)
    accepted = input_columns(model)
    keep = [c for c in cols if c in accepted]
    if not keep:
        raise TaskDataError(
            f"task {task!r}, split {split!r}: no model input column (expected some of "
            f"{sorted(accepted)}, got {cols})"
        )
    ds = ds.select_columns([*keep, *extra])
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
            sp: prepare_split(dd[sp], task, sp, model, torch_format)
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
            prepared["validation_tune"], prepared["validation_select"] = ph_validation_split(val, select_fraction,
                                                                                             seed)
        out[task] = prepared
    return out


def ph_validation_split(validation: Any, select_fraction: float, seed: int) -> tuple[Any, Any]:
    """PH-ATM's deterministic split of a validation set: ``(tuning part, selection part)``, the selection part
    ``ceil(select_fraction * len)`` examples drawn by ``Dataset.train_test_split(seed=seed, shuffle=True)``.
    The trainer splits with it; a caller that must keep the selection part unseen (e.g. tuning a PH start's
    scale on the tuning part only) splits with it too."""
    parts = validation.train_test_split(test_size=int(math.ceil(select_fraction * len(validation))), seed=seed,
                                        shuffle=True)
    return parts["train"], parts["test"]
