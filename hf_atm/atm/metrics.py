"""Per-task metrics through ``evaluate``: the modules shipped in the package, loaded by path (offline).

Each task of an ATM run is scored by one main metric: a name of :data:`SHIPPED_METRICS` (the modules in
``hf_atm/metrics/<name>/<name>.py``, computed with scikit-learn / scipy) or the path of any ``evaluate`` metric
module (a ``.py`` file, or a folder holding ``<folder name>.py``). Classification predictions are the argmax
class ids of a head, a regression task's its one logit; every shipped metric is higher-is-better.

Where a task's metric comes from (:func:`task_metrics_for`): ``ATMConfig.task_metrics`` first, then the
model's ``config.task_metrics``, else ``"accuracy"`` (``"pearsonr"`` for a regression task, which refuses
the metrics of :data:`CLASSIFICATION_METRICS`).

``evaluate`` itself is imported only when a metric is computed (its import takes seconds): a run scored by
accuracy alone never loads it, since the trainer counts accuracy itself (the same value as the shipped
module's).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_atm.atm.problems import is_regression
from hf_atm.errors import HfAtmError

__all__ = [
    "CLASSIFICATION_METRICS",
    "DEFAULT_METRIC",
    "DEFAULT_REGRESSION_METRIC",
    "METRICS_DIR",
    "SHIPPED_METRICS",
    "TaskMetric",
    "load_task_metric",
    "metric_module_path",
    "parse_task_metrics",
    "task_metrics_for",
]

#: the metric modules shipped in ``hf_atm/metrics/<name>/<name>.py``.
SHIPPED_METRICS: tuple[str, ...] = ("accuracy", "f1", "matthews_correlation", "pearsonr", "spearmanr")
#: the metric of a task nobody chose one for.
DEFAULT_METRIC = "accuracy"
#: the metric of a regression task nobody chose one for (GLUE's for STS-B).
DEFAULT_REGRESSION_METRIC = "pearsonr"
#: shipped metrics of class predictions: refused for a regression task.
CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews_correlation")
#: the folder of the shipped modules (package data).
METRICS_DIR = Path(__file__).resolve().parents[1] / "metrics"


def metric_module_path(name_or_path: str | os.PathLike) -> Path | None:
    """The ``.py`` file of metric `name_or_path`: the shipped module of a name of :data:`SHIPPED_METRICS`, a
    ``.py`` file, or ``<folder>/<folder name>.py`` for a folder (evaluate's layout); None when it is none of
    these."""
    text = os.fspath(name_or_path)
    if text in SHIPPED_METRICS:
        return METRICS_DIR / text / f"{text}.py"
    p = Path(text).expanduser().resolve()  # resolved: the working directory may change before it is loaded
    if p.is_file() and p.suffix == ".py":
        return p
    if p.is_dir() and (p / f"{p.name}.py").is_file():
        return p / f"{p.name}.py"
    return None


def _unknown(name_or_path: Any, option: str | None) -> HfAtmError:
    where = f"{option}: " if option else ""
    return HfAtmError(
        f"{where}metric {os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else name_or_path!r}"
        f" is neither a shipped metric ({', '.join(SHIPPED_METRICS)}) nor the path of an evaluate metric module "
        "(a .py file, or a folder holding <folder name>.py)"
    )


@functools.cache
def _evaluate_module(path: str) -> Any:
    """The evaluate module at `path`, loaded once per process (results kept in memory, not in cache files)."""
    import evaluate

    return evaluate.load(path, keep_in_memory=True)


@dataclass(frozen=True)
class TaskMetric:
    """A task's main metric.

    Attributes:
        name: the shipped name, or the module's file name (without ``.py``) for a path; what history and
            metric keys call it (``eval_<task>_<name>``).
        main_key: the key of the module's result that scores the task (the name: evaluate's convention).
        path: the module's ``.py`` file.
    """

    name: str
    main_key: str
    path: Path

    @property
    def shipped(self) -> bool:
        """True for one of the package's own modules."""
        return self.name in SHIPPED_METRICS and self.path == METRICS_DIR / self.name / f"{self.name}.py"

    def compute(self, predictions: Sequence[Any] | np.ndarray, references: Sequence[Any] | np.ndarray,
                **kwargs: Any) -> dict[str, float]:
        """The module's numeric results on `predictions` / `references` (class ids for classification), as
        ``{key: float}`` with :attr:`main_key` among them (HfAtmError naming the metric otherwise). Non-numeric
        results (per-class lists) are left out."""
        result = _evaluate_module(str(self.path)).compute(
            predictions=np.asarray(predictions), references=np.asarray(references), **kwargs
        )
        out = {k: float(v) for k, v in (result or {}).items()
               if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)}
        if self.main_key not in out:
            raise HfAtmError(f"metric {self.name!r} ({self.path.name}) returned no number under {self.main_key!r}: "
                             f"got {sorted(result or {})}")
        return out

    def score(self, values: Mapping[str, float]) -> float:
        """The main score among `values` (a :meth:`compute` result); NaN when it is missing."""
        return float(values.get(self.main_key, math.nan))


@functools.cache
def _load(text: str) -> TaskMetric:
    path = metric_module_path(text)
    if path is None:
        raise _unknown(text, None)
    name = text if text in SHIPPED_METRICS else path.stem
    return TaskMetric(name=name, main_key=name, path=path)


def load_task_metric(name_or_path: str | os.PathLike, option: str | None = None) -> TaskMetric:
    """The :class:`TaskMetric` of a shipped metric name or the path of an evaluate module (cached per
    process; the module itself is loaded when first computed). HfAtmError naming the metric (and `option`,
    the setting it came from) when it is neither."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not os.fspath(name_or_path):
        raise _unknown(name_or_path, option)
    try:
        return _load(os.fspath(name_or_path))
    except HfAtmError:
        raise _unknown(name_or_path, option) from None


def parse_task_metrics(value: Mapping[str, str] | str | None, option: str = "task_metrics") -> dict[str, str] | None:
    """``{task: metric}`` from a mapping, a JSON object string (``'{"cola": "matthews_correlation"}'``) or
    ``"task=metric,task=metric"`` (the command line's forms); every metric checked by
    :func:`load_task_metric`. None for None / empty. HfAtmError naming `option` and the bad value."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise HfAtmError(f"{option}: not a JSON object {{task: metric}}: {value!r} ({e})") from None
        else:
            pairs = [p.partition("=") for p in text.split(",") if p.strip()]
            if any(not sep or not t.strip() or not m.strip() for t, sep, m in pairs):
                raise HfAtmError(f"{option}: expected 'task=metric,task=metric' or a JSON object, got {value!r}")
            value = {t.strip(): m.strip() for t, _, m in pairs}
    if not isinstance(value, Mapping) or not all(isinstance(t, str) for t in value):
        raise HfAtmError(f"{option}: expected {{task: metric}}, got {value!r}")
    out = {}
    for task, metric in value.items():
        load_task_metric(metric, option=f"{option}[{task!r}]")
        out[task] = os.fspath(metric)
    return out


def task_metrics_for(args: Any, model: Any, tasks: Sequence[str] | None = None) -> dict[str, TaskMetric]:
    """``{task: TaskMetric}`` for `tasks` (default: the model's tasks): ``args.task_metrics`` (an
    ATMConfig's), then the model's ``config.task_metrics``, else :data:`DEFAULT_METRIC`. HfAtmError naming
    ``task_metrics`` for a task the model has no head for, or a classification metric for a regression task."""
    given = parse_task_metrics(getattr(args, "task_metrics", None)) or {}
    model_tasks = list(getattr(model, "tasks", None) or [])
    unknown = sorted(t for t in given if t not in model_tasks)
    if unknown:
        raise HfAtmError(f"task_metrics: task(s) {unknown} have no head in the model (tasks: {model_tasks})")
    from_model = dict(getattr(getattr(model, "config", None), "task_metrics", None) or {})
    names = list(tasks) if tasks is not None else model_tasks
    config = getattr(model, "config", None)
    out = {t: load_task_metric(given.get(t) or from_model.get(t)
                               or (DEFAULT_REGRESSION_METRIC if is_regression(config, t) else DEFAULT_METRIC),
                               option="task_metrics" if t in given else "config.task_metrics")
           for t in names}
    for t, metric in out.items():
        if metric.shipped and metric.name in CLASSIFICATION_METRICS and is_regression(config, t):
            raise HfAtmError(f"task_metrics: task {t!r} is a regression (real-valued predictions); metric "
                             f"{metric.name!r} scores class predictions: choose pearsonr, spearmanr or the path "
                             "of an evaluate module")
        n_classes = len(model.tasks[t]) if t in model_tasks else 2
        if metric.shipped and metric.name == "f1" and n_classes != 2:
            # sklearn's binary F1 (GLUE's) would fail at the first evaluation: refuse before any training
            raise HfAtmError(f"task_metrics: f1 scores binary tasks (class id 1 positive); task {t!r} has "
                             f"{n_classes} classes: choose another metric or the path of an evaluate module")
    return out
