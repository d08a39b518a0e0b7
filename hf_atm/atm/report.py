"""Plain-text result tables for recipes and reports: one row per method, one column per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def accuracy_row(name: str, accuracy: Mapping[str, float], reference: Mapping[str, float] | None = None) -> dict:
    """A table row: per-task accuracy, the mean, and the mean normalized accuracy when `reference` is given
    (accuracy of the method on task i divided by the individually fine-tuned model's, averaged over tasks)."""
    tasks = sorted(accuracy)
    mean = sum(accuracy[t] for t in tasks) / len(tasks)
    norm = None
    if reference:
        norm = sum(accuracy[t] / reference[t] for t in tasks if reference.get(t)) / len(tasks)
    return {"method": name, "accuracy": dict(accuracy), "mean": mean, "normalized": norm}


def test_accuracy(metrics: Mapping[str, Any], tasks: Sequence[str], prefix: str = "test") -> dict[str, float]:
    """``{task: acc}`` from Trainer-style metrics ``{"<prefix>_<task>_accuracy": acc}``."""
    return {t: float(metrics[f"{prefix}_{t}_accuracy"]) for t in tasks}


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of accuracy rows (percent, one decimal)."""
    tasks = sorted({t for r in rows for t in r["accuracy"]})
    head = ["method", *tasks, "mean", "normalized"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], *(f"{100 * r['accuracy'][t]:.1f}" for t in tasks), f"{100 * r['mean']:.1f}",
                 "-" if r.get("normalized") is None else f"{100 * r['normalized']:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
