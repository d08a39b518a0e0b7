"""Model merging: pure tensor merge methods and the per-tensor dispatch (MergeSpec)."""

from hf_atm.merging.methods import (
    average,
    breadcrumbs,
    dare_linear,
    dare_ties,
    iso_c,
    task_arithmetic,
    ties,
    tsv,
)
from hf_atm.merging.spec import (
    METHODS,
    MergeSpec,
    merge_deltas,
    merge_tensor,
    needs_all_task_vectors,
    per_task_transform,
    tensor_seed,
)

__all__ = [
    "METHODS",
    "MergeSpec",
    "average",
    "breadcrumbs",
    "dare_linear",
    "dare_ties",
    "iso_c",
    "merge_deltas",
    "merge_tensor",
    "needs_all_task_vectors",
    "per_task_transform",
    "task_arithmetic",
    "tensor_seed",
    "ties",
    "tsv",
]
