"""Pure tensor merge functions, one per method.

Every function takes a sequence of task vectors ``tau_i = M_i - BASE`` of one tensor (same shape, floating)
and returns ``combine(tau_1..tau_n)``: NOT scaled by the spec's ``scale`` (lambda) and NOT added to the base.
The exceptions are :func:`average`, which takes the model tensors themselves (it is also correct on
deltas: the weighted mean of deltas plus the base is the weighted mean of the models), and :func:`slerp`,
which takes the base and one model tensor and returns the interpolated *model* tensor.

Conventions shared by all functions:

* ``weights``: ``None`` means unit weights (every ``w_i = 1``); otherwise one finite float per input.
* Compute dtype: float64 when any input is float64, float32 otherwise (float16 / bfloat16 inputs are
  upcast). The result is in the compute dtype; the dispatcher in :mod:`hf_atm.merging.spec` casts back.
* The inputs are never modified in place.
* ``density`` is the kept fraction. Every function / plan taking ``density`` also takes a sequence of
  densities, one per task vector (mergekit gives each model its own); a plain float means the same density
  for every task and is bit-identical to a list of equal entries. Likewise ``gamma`` (breadcrumbs) and
  ``epsilon`` (della). A list of the wrong length is a :class:`MergeConfigError` naming the option.
* Trimming keeps ``k = int(density * numel)`` entries (as
  ``peft.utils.merge_utils.magnitude_based_pruning`` does), and ``density >= 1`` means no trimming. The
  selection is an exact threshold (:class:`MagnitudeCut`, an exact selection) rather than ``torch.topk``;
  among magnitudes equal to the k-th largest the earliest in flat index order are kept (topk's choice among
  ties is unspecified, so results equal peft's whenever the magnitudes at the cut are distinct).
* ``ties`` / ``dare_ties`` / ``breadcrumbs`` / ``breadcrumbs_ties`` run in two phases: per-task whole-tensor
  statistics (cuts, DARE masks; one task vector's magnitudes alive at a time), then an element-wise pass over
  slices of :data:`SLICE_ELEMENTS` that accumulates task by task (no stacking). The streaming engine runs the
  same phases on file slices (see :class:`SlicedCombine`), bit-identical to the whole-tensor call.
* "Sum of independent per-task terms" (noted in each docstring) means ``combine(tau_1..tau_n) =
  sum_i f_i(tau_i)``, which is what a method needs to run inside ATM rounds or a sharded all-reduce on the
  deltas one at a time (task arithmetic, dare_linear, breadcrumbs, della_linear); the others need all task
  vectors of a tensor together, and :func:`slerp` needs the base tensor itself.
* SVD-based methods (:func:`tsv`, :func:`iso_c`) apply only to 2-D tensors and use
  ``torch.linalg.svd(full_matrices=False)``; other ranks fall back as each docstring states.

The functions live in one module per concept and are re-exported here: :mod:`~hf_atm.merging.conventions`
(compute dtype, checks, weights), :mod:`~hf_atm.merging.cuts` (exact magnitude cuts),
:mod:`~hf_atm.merging.election` (TIES' sign election), :mod:`~hf_atm.merging.sliced` (the two-phase TIES family),
:mod:`~hf_atm.merging.dare` (DARE / DELLA drops), :mod:`~hf_atm.merging.linear` (average, task arithmetic),
:mod:`~hf_atm.merging.interpolation` (SLERP, Model Stock) and :mod:`~hf_atm.merging.svd` (TSV-M, Iso-C).
"""

from __future__ import annotations

from hf_atm.merging.conventions import (
    DELLA_RESCALE,
    SLICE_ELEMENTS,
    Generators,
    PerTask,
    all_finite,
    compute_dtype,
)
from hf_atm.merging.cuts import (
    KEEP_ALL,
    KEEP_NONE,
    STREAM_MIN,
    CutCursor,
    MagnitudeCut,
    TaskMagnitudes,
    cut_mask,
    kth_largest,
    magnitude_cut,
    magnitude_cuts,
    magnitude_cuts_streamed,
    magnitude_trim,
)
from hf_atm.merging.dare import (
    dare_linear,
    dare_mask,
    della,
    della_keep_probabilities,
    della_linear,
    della_prune,
    l1_rescale,
)
from hf_atm.merging.election import elect_and_mean_slice
from hf_atm.merging.interpolation import model_stock, model_stock_ratio, slerp, slerp_coefficients
from hf_atm.merging.linear import average, task_arithmetic
from hf_atm.merging.sliced import (
    BreadcrumbsCombine,
    BreadcrumbsTiesCombine,
    DareTiesCombine,
    SlicedCombine,
    TiesCombine,
    breadcrumbs,
    breadcrumbs_mask,
    breadcrumbs_plan,
    breadcrumbs_ties,
    breadcrumbs_ties_plan,
    cuts_saw_finite,
    dare_ties,
    dare_ties_plan,
    ties,
    ties_plan,
)
from hf_atm.merging.svd import iso_c, tsv

__all__ = [
    "DELLA_RESCALE",
    "KEEP_ALL",
    "KEEP_NONE",
    "SLICE_ELEMENTS",
    "STREAM_MIN",
    "BreadcrumbsCombine",
    "BreadcrumbsTiesCombine",
    "CutCursor",
    "DareTiesCombine",
    "Generators",
    "MagnitudeCut",
    "PerTask",
    "SlicedCombine",
    "TaskMagnitudes",
    "TiesCombine",
    "all_finite",
    "average",
    "breadcrumbs",
    "breadcrumbs_mask",
    "breadcrumbs_plan",
    "breadcrumbs_ties",
    "breadcrumbs_ties_plan",
    "compute_dtype",
    "cut_mask",
    "cuts_saw_finite",
    "dare_linear",
    "dare_mask",
    "dare_ties",
    "dare_ties_plan",
    "della",
    "della_keep_probabilities",
    "della_linear",
    "della_prune",
    "elect_and_mean_slice",
    "iso_c",
    "kth_largest",
    "l1_rescale",
    "magnitude_cut",
    "magnitude_cuts",
    "magnitude_cuts_streamed",
    "magnitude_trim",
    "model_stock",
    "model_stock_ratio",
    "slerp",
    "slerp_coefficients",
    "task_arithmetic",
    "ties",
    "ties_plan",
    "tsv",
]
