"""The linear methods: the weighted mean of models (``average`` / ``linear``) and task arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from hf_atm.errors import MergeConfigError
from hf_atm.merging.conventions import check_tensors, weight_list, weighted_sum

__all__ = ["average", "task_arithmetic"]


def average(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Weighted mean ``sum_i w_i M_i / sum_i w_i`` of the *model* tensors (unit weights: the plain mean).

    The only function here that takes models rather than deltas (on deltas it gives the mean delta).
    The weight sum must be non-zero. Model soups / "uniform soup" (Wortsman et al. 2022).
    """
    dtype = check_tensors(tensors, "tensors")
    w = weight_list(weights, len(tensors))
    total = float(len(tensors)) if w is None else sum(w)
    if total == 0.0:
        raise MergeConfigError("weights sum to 0: the weighted average is undefined")
    return weighted_sum(tensors, w, dtype).div_(total)


def task_arithmetic(task_vectors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Task arithmetic: ``sum_i w_i tau_i`` (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

    Equals ``peft.utils.merge_utils.task_arithmetic(taus, torch.tensor(weights))``.
    """
    dtype = check_tensors(task_vectors)
    return weighted_sum(task_vectors, weight_list(weights, len(task_vectors)), dtype)
