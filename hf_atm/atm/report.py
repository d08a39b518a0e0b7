"""Plain-text result tables for recipes and reports: one row per method, one column per task.

A row holds each task's main score (accuracy unless the task has another metric, see
:mod:`hf_atm.atm.metrics`) and names each task's metric (``"metric"``); the table names a task's metric in its
column header when it is not accuracy, and calls the mean column "mean score" when the tasks' metrics differ.

Normalized scores are :func:`hf_atm.atm.evaluation.normalized_accuracy` (NaN for a task whose reference score
is not > 0) averaged by :func:`hf_atm.atm.evaluation.mean_accuracy`, as in ``history.json`` and the model card:
one NaN task makes the mean NaN (shown as ``n/a``), never a mean over fewer tasks than the table shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from hf_atm.atm.evaluation import mean_accuracy, normalized_accuracy


def accuracy_row(name: str, accuracy: Mapping[str, float], reference: Mapping[str, float] | None = None,
                 metric: Mapping[str, str] | None = None) -> dict:
    """A table row: per-task main score (key ``"accuracy"``, the name it has always had), each task's metric
    name (``"metric"``; default ``accuracy`` for every task), their mean and, when `reference` is given, the
    mean normalized score (:func:`~hf_atm.atm.evaluation.normalized_accuracy` averaged by
    :func:`~hf_atm.atm.evaluation.mean_accuracy`: NaN when some task's reference is not > 0; a task missing
    from `reference` raises KeyError)."""
    scores = {t: float(accuracy[t]) for t in sorted(accuracy)}
    names = {t: (metric or {}).get(t, "accuracy") for t in scores}
    norm = normalized_accuracy(scores, reference) if reference else None
    return {"method": name, "accuracy": scores, "metric": names, "mean": mean_accuracy(scores),
            "normalized": mean_accuracy(norm) if norm is not None else None}


def test_accuracy(metrics: Mapping[str, Any], tasks: Sequence[str], prefix: str = "test") -> dict[str, float]:
    """``{task: acc}`` from Trainer-style metrics ``{"<prefix>_<task>_accuracy": acc}``."""
    return {t: float(metrics[f"{prefix}_{t}_accuracy"]) for t in tasks}


def test_scores(metrics: Mapping[str, Any], metric_names: Mapping[str, str], prefix: str = "test") -> dict[str, float]:
    """``{task: main score}`` from Trainer-style metrics ``{"<prefix>_<task>_<metric>": value}``, where
    `metric_names` is ``{task: main metric name}`` (``ATMTrainer.metric_names()``)."""
    return {t: float(metrics[f"{prefix}_{t}_{m}"]) for t, m in metric_names.items()}


def format_table(rows: Sequence[Mapping[str, Any]], metric_names: Mapping[str, str] | None = None) -> str:
    """Markdown table of score rows (percent, one decimal; NaN as ``n/a``). Each task's main metric comes from
    `metric_names`, else from the rows' ``"metric"``, else accuracy; a task whose metric is not accuracy has it
    in its column header, and the mean column is "mean score" when the tasks' metrics differ."""
    tasks = sorted({t for r in rows for t in r["accuracy"]})
    names = {t: "accuracy" for t in tasks}
    for r in rows:
        names.update(r.get("metric") or {})
    names.update(metric_names or {})
    mixed = len({names[t] for t in tasks}) > 1
    head = ["method", *(t if names[t] == "accuracy" else f"{t} ({names[t]})" for t in tasks),
            "mean score" if mixed else "mean", "normalized"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], *(_percent(r["accuracy"].get(t)) for t in tasks), _percent(r["mean"]),
                 "-" if r.get("normalized") is None else _percent(r["normalized"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    """A score as a percent with one decimal; ``n/a`` for NaN or a missing score (null in results.json)."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{100 * float(value):.1f}"
