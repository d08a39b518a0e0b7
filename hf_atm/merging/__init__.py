"""Model merging: pure tensor merge methods, the method registry and the per-tensor dispatch (MergeSpec)."""

from hf_atm.merging.methods import (
    average,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    iso_c,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
    tsv,
)
from hf_atm.merging.registry import METHODS, MethodRecord, get_method
from hf_atm.merging.spec import (
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
    "MethodRecord",
    "average",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "get_method",
    "iso_c",
    "merge_deltas",
    "merge_tensor",
    "model_stock",
    "needs_all_task_vectors",
    "per_task_transform",
    "slerp",
    "task_arithmetic",
    "tensor_seed",
    "ties",
    "tsv",
]
