"""Metrics of ATM runs: each task's outputs and main metric (:mod:`hf_atm.atm.metrics`), accuracy, normalized
scores, pairwise cosine similarity of task vectors.

Task vectors are dicts ``{tensor name: tensor}``; their cosine similarity is that of the vectors flattened
over all tensors, computed from per-tensor dot products (a Gram matrix accumulated tensor by tensor), so the
vectors are never concatenated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from hf_atm.atm.metrics import TaskMetric

__all__ = [
    "TaskOutputs",
    "accumulate_gram",
    "collect_outputs",
    "cosine_from_gram",
    "mean_accuracy",
    "mean_off_diagonal",
    "needs_predictions",
    "normalized_accuracy",
    "pairwise_cosine",
    "task_values",
]


def accumulate_gram(gram: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Add the pairwise dot products of `tensors` (one tensor per task, same shape) to `gram` (n x n,
    float64, on CPU) in place and return it. Each tensor's products are computed in the tensors' precision
    (float32 matmul; float64 for float64 input; half precision upcast to float32) and summed over tensors in
    float64."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = torch.stack([t.detach().reshape(-1).to(dtype) for t in tensors])
    gram += (flat @ flat.T).to(device="cpu", dtype=torch.float64)
    return gram


def pairwise_cosine(task_vectors: Sequence[Mapping[str, torch.Tensor]]) -> list[list[float]]:
    """Cosine similarity matrix of task vectors given as ``{name: tensor}`` dicts with the same names."""
    n = len(task_vectors)
    gram = torch.zeros(n, n, dtype=torch.float64)
    if n == 0:
        return []
    for name in sorted(task_vectors[0]):
        accumulate_gram(gram, [tv[name] for tv in task_vectors])
    return cosine_from_gram(gram)


def cosine_from_gram(gram: torch.Tensor) -> list[list[float]]:
    """``G_ij / sqrt(G_ii G_jj)`` as nested lists (0.0 where a vector is zero)."""
    g = gram.to(torch.float64)
    norms = g.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, g / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
    return [[float(x) for x in row] for row in cos.clamp(-1.0, 1.0)]


def mean_off_diagonal(cos: Sequence[Sequence[float | None]] | None) -> float | None:
    """Mean of the off-diagonal entries of a square matrix (None for None, a 1x1 matrix, or no finite entry).

    An entry that is NaN, or None (how ``history.json`` stores a NaN), is a pair whose cosine was not
    measured (a task whose vector did not arrive in a federated round) and is left out, so a matrix gives the
    same mean before and after a JSON round trip."""
    if cos is None:
        return None
    n = len(cos)
    if n < 2:
        return None
    vals = [float(v) for i in range(n) for j in range(n) if i != j and (v := cos[i][j]) is not None]
    vals = [v for v in vals if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else None


def mean_accuracy(acc: Mapping[str, float]) -> float:
    """Unweighted mean over tasks (NaN for no tasks): of accuracies, of main scores, of normalized scores.
    A NaN task (e.g. a normalized score against a reference that is not > 0) makes the mean NaN: the one
    definition history entries, cards and result tables share, so no mean is silently over fewer tasks."""
    return float(sum(acc.values()) / len(acc)) if acc else math.nan


def normalized_accuracy(
    acc: Mapping[str, float], reference: Mapping[str, float] | None
) -> dict[str, float] | None:
    """``acc[t] / reference[t]`` per task: the score (accuracy, or the task's main metric) of the merged model
    relative to the model fine-tuned on task t alone. None when no reference is given. A task missing from
    `reference` raises KeyError; a reference that is not > 0 (a correlation no better than chance) gives NaN
    for that task, since a ratio to it means nothing."""
    if reference is None:
        return None
    out = {}
    for t, a in acc.items():
        if t not in reference:
            raise KeyError(f"reference_accuracies has no entry for task {t!r}")
        r = float(reference[t])
        out[t] = float(a) / r if r > 0 else math.nan
    return out


@dataclass
class TaskOutputs:
    """What one task's head made of an evaluation split.

    Attributes:
        correct / total: predictions equal to their label, and examples.
        predictions / labels: the argmax class ids and the labels (CPU, int64), when kept; for a regression
            task the head's one logit and the float targets (CPU, float32).
        logits: the logits (CPU, float32), when kept.
        regression: the task is a regression (then ``correct`` is 0 and :attr:`accuracy` NaN).
    """

    correct: int
    total: int
    predictions: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    regression: bool = False

    @property
    def accuracy(self) -> float:
        """``correct / total`` (NaN for no examples and for a regression task, which has no accuracy)."""
        return self.correct / self.total if self.total and not self.regression else math.nan


@torch.no_grad()
def collect_outputs(
    model: Any,
    task: str,
    batches: Iterable[dict[str, Any]],
    prepare: Callable[[dict[str, Any]], dict[str, Any]],
    autocast: Callable[[], AbstractContextManager],
    keep_predictions: bool = False,
    keep_logits: bool = False,
    regression: bool = False,
) -> TaskOutputs:
    """The :class:`TaskOutputs` of `task`'s head over `batches` (each with a ``labels`` entry), with `model`
    in eval mode (its mode restored after). `prepare` moves a batch to the device, `autocast` gives the
    precision context. Predictions and labels are kept with `keep_predictions` (or `keep_logits`), logits with
    `keep_logits`; kept tensors stay on the device until the end (no host sync per batch). For a
    `regression` task the predictions are the head's one logit (float32) and nothing is counted correct."""
    was_training = model.training
    model.eval()
    correct = None
    total = 0
    keep_predictions = keep_predictions or keep_logits
    preds_all: list[torch.Tensor] = []
    logits_all: list[torch.Tensor] = []
    labels_all: list[torch.Tensor] = []
    try:
        for batch in batches:
            batch = prepare(batch)
            labels = batch.pop("labels")
            with autocast():
                logits = model(task=task, **batch).logits
            if regression:
                preds, labels = logits[:, 0].float(), labels.float()
            else:
                preds = logits.argmax(-1)
                hits = (preds == labels).sum()
                correct = hits if correct is None else correct + hits
            total += int(labels.shape[0])
            if keep_predictions:
                preds_all.append(preds.detach())
                labels_all.append(labels.detach())
            if keep_logits:
                logits_all.append(logits.detach().float())
    finally:
        model.train(was_training)
    out = TaskOutputs(int(correct.item()) if correct is not None else 0, total, regression=regression)
    if keep_predictions:
        empty = torch.float32 if regression else torch.long
        out.predictions = torch.cat(preds_all).cpu() if preds_all else torch.zeros(0, dtype=empty)
        out.labels = torch.cat(labels_all).cpu() if labels_all else torch.zeros(0, dtype=empty)
    if keep_logits:
        out.logits = torch.cat(logits_all).cpu() if logits_all else None
    return out


def needs_predictions(metric: TaskMetric) -> bool:
    """Whether `metric` is computed from the predictions (every metric but the shipped accuracy, which is
    the count of :func:`collect_outputs`)."""
    return not (metric.shipped and metric.name == "accuracy")


def task_values(metric: TaskMetric, outputs: TaskOutputs) -> dict[str, float]:
    """`metric`'s values on a task's outputs (``{metric.main_key: score, ...}``): the counted accuracy for the
    shipped accuracy (the module's value, without loading ``evaluate``), else the module's results on the
    kept predictions and labels. NaN scores for no examples."""
    if not needs_predictions(metric):
        return {metric.main_key: outputs.accuracy}
    if outputs.predictions is None or outputs.labels is None:
        raise ValueError(f"metric {metric.name!r} needs the predictions: collect them with keep_predictions=True")
    if outputs.total == 0:
        return {metric.main_key: math.nan}
    return metric.compute(outputs.predictions.numpy(), outputs.labels.numpy())
