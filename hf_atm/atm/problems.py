"""Per-task problem types of a multi-task model: classification (the default) or regression.

Following transformers' ``config.problem_type`` convention, ``MultiTaskConfig.task_problem_types`` maps a
task to ``"regression"`` (tasks left out are ``"single_label_classification"``). A regression task's head has
one output and one label name (what the number is, e.g. ``["similarity"]``); its labels are floats and its loss
is the mean squared error (label smoothing never applies). This module holds the one rule for each of these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from hf_atm.errors import TaskDataError

__all__ = ["CLASSIFICATION", "PROBLEM_TYPES", "REGRESSION", "check_problem_types", "is_regression",
           "regression_label", "task_loss", "upcast"]

CLASSIFICATION = "single_label_classification"
REGRESSION = "regression"
#: the problem types a task may have (transformers' names).
PROBLEM_TYPES = (CLASSIFICATION, REGRESSION)


def check_problem_types(tasks: Mapping[str, Iterable[str]], problem_types: Mapping[str, str] | None
                        ) -> dict[str, str]:
    """``{task: "regression"}`` for the regression tasks of `problem_types` (classification entries dropped:
    absent means classification). TaskDataError naming the task for a task not in `tasks`, an unknown problem
    type, or a regression task whose label list is not exactly one name."""
    out = {}
    for task, kind in dict(problem_types or {}).items():
        if task not in tasks:
            raise TaskDataError(f"task_problem_types names task {task!r} the model has no head for")
        if kind not in PROBLEM_TYPES:
            raise TaskDataError(f"task {task!r}: problem type {kind!r} is not one of {', '.join(PROBLEM_TYPES)}")
        if kind == REGRESSION:
            regression_label(task, tasks[task])
            out[task] = REGRESSION
    return out


def regression_label(task: str, labels: Iterable[str]) -> list[str]:
    """A regression task's label list: exactly one non-blank name (what the number is, e.g.
    ``["similarity"]``); TaskDataError naming the task otherwise."""
    names = [labels] if isinstance(labels, str) else list(labels or [])
    if len(names) != 1 or not isinstance(names[0], str) or not names[0].strip():
        raise TaskDataError(f"regression task {task!r} has one output: give it one label name (what the number "
                            f"is, e.g. ['similarity']), got {names}")
    return names


def is_regression(config: Any, task: str) -> bool:
    """Whether `task` is a regression task of a MultiTaskConfig (or of a model's ``config``)."""
    return (getattr(config, "task_problem_types", None) or {}).get(task) == REGRESSION


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the loss; float32 / float64 unchanged."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool, label_smoothing: float = 0.0,
              reduction: str = "mean") -> torch.Tensor:
    """One head's loss: the mean squared error of the single logit against float labels (`regression`), else
    cross entropy against class ids, label-smoothed by `label_smoothing`; `reduction` ``"mean"`` or ``"sum"``."""
    logits = upcast(logits)
    if regression:
        return F.mse_loss(logits.reshape(-1), labels.reshape(-1).to(logits.dtype), reduction=reduction)
    return F.cross_entropy(logits, labels.long(), reduction=reduction, label_smoothing=label_smoothing)
