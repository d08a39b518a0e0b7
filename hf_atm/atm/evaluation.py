"""Metrics of ATM runs: accuracy, normalized accuracy, pairwise cosine similarity of task vectors.

Task vectors are dicts ``{tensor name: tensor}``; their cosine similarity is that of the vectors flattened
over all tensors, computed from per-tensor dot products (a Gram matrix accumulated tensor by tensor), so the
vectors are never concatenated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

__all__ = [
    "accumulate_gram",
    "cosine_from_gram",
    "count_correct",
    "mean_accuracy",
    "mean_off_diagonal",
    "normalized_accuracy",
    "pairwise_cosine",
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


def mean_off_diagonal(cos: Sequence[Sequence[float]] | None) -> float | None:
    """Mean of the off-diagonal entries of a square matrix (None for None or a 1x1 matrix)."""
    if cos is None:
        return None
    n = len(cos)
    if n < 2:
        return None
    vals = [cos[i][j] for i in range(n) for j in range(n) if i != j]
    return float(sum(vals) / len(vals))


def mean_accuracy(acc: Mapping[str, float]) -> float:
    """Unweighted mean over tasks (NaN for no tasks)."""
    return float(sum(acc.values()) / len(acc)) if acc else math.nan


def normalized_accuracy(
    acc: Mapping[str, float], reference: Mapping[str, float] | None
) -> dict[str, float] | None:
    """``acc[t] / reference[t]`` per task: the accuracy of the merged model relative to the model fine-tuned
    on task t alone. None when no reference is given. A task missing from `reference` raises KeyError;
    a reference of 0 raises ValueError."""
    if reference is None:
        return None
    out = {}
    for t, a in acc.items():
        if t not in reference:
            raise KeyError(f"reference_accuracies has no entry for task {t!r}")
        r = float(reference[t])
        if r <= 0:
            raise ValueError(f"reference accuracy of task {t!r} must be > 0, got {r}")
        out[t] = float(a) / r
    return out


@torch.no_grad()
def count_correct(
    model: Any,
    task: str,
    batches: Iterable[dict[str, Any]],
    prepare: Callable[[dict[str, Any]], dict[str, Any]],
    autocast: Callable[[], AbstractContextManager],
    keep_logits: bool = False,
) -> tuple[int, int, torch.Tensor | None, torch.Tensor | None]:
    """``(correct, total, logits, labels)`` of `task`'s head over `batches` (each with a ``labels``
    entry), with `model` in eval mode (its mode restored after). `prepare` moves a batch to the device,
    `autocast` gives the precision context. Logits and labels (concatenated, on CPU) only when
    `keep_logits`, else None."""
    was_training = model.training
    model.eval()
    correct = None
    total = 0
    logits_all: list[torch.Tensor] = []
    labels_all: list[torch.Tensor] = []
    try:
        for batch in batches:
            batch = prepare(batch)
            labels = batch.pop("labels")
            with autocast():
                logits = model(task=task, **batch).logits
            hits = (logits.argmax(-1) == labels).sum()
            correct = hits if correct is None else correct + hits
            total += int(labels.shape[0])
            if keep_logits:
                logits_all.append(logits.detach().float().cpu())
                labels_all.append(labels.detach().cpu())
    finally:
        model.train(was_training)
    n_correct = int(correct.item()) if correct is not None else 0
    if not keep_logits:
        return n_correct, total, None, None
    return n_correct, total, torch.cat(logits_all), torch.cat(labels_all)
