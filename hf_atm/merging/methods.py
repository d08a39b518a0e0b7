"""Pure tensor merge functions, one per method.

Every function takes a sequence of task vectors ``tau_i = M_i - BASE`` of one tensor (same shape, floating)
and returns ``combine(tau_1..tau_n)``: NOT scaled by the spec's ``scale`` (lambda) and NOT added to the base.
The one exception is :func:`average`, which takes the model tensors themselves (it is also correct on
deltas: the weighted mean of deltas plus the base is the weighted mean of the models).

Conventions shared by all functions:

* ``weights``: ``None`` means unit weights (every ``w_i = 1``); otherwise one finite float per input.
* Compute dtype: float64 when any input is float64, float32 otherwise (float16 / bfloat16 inputs are
  upcast). The result is in the compute dtype; the dispatcher in :mod:`hf_atm.merging.spec` casts back.
* The inputs are never modified in place.
* ``density`` is the kept fraction; trimming keeps ``k = int(density * numel)`` entries (as
  ``peft.utils.merge_utils.magnitude_based_pruning`` does), and ``density >= 1`` means no trimming. The
  selection is an exact threshold (:class:`MagnitudeCut`, ``torch.kthvalue``) rather than ``torch.topk``;
  among magnitudes equal to the k-th largest the earliest in flat index order are kept (topk's choice among
  ties is unspecified, so results equal peft's whenever the magnitudes at the cut are distinct).
* ``ties`` / ``dare_ties`` / ``breadcrumbs`` run in two phases: per-task whole-tensor statistics (cuts, DARE
  masks; one task vector's magnitudes alive at a time), then an element-wise pass over slices of
  :data:`SLICE_ELEMENTS` that accumulates task by task (no stacking). The streaming engine runs the same
  phases on file slices (see :class:`SlicedCombine`), bit-identical to the whole-tensor call.
* SVD-based methods (:func:`tsv`, :func:`iso_c`) apply only to 2-D tensors and use
  ``torch.linalg.svd(full_matrices=False)``; other ranks fall back as each docstring states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hf_atm.errors import CheckpointError, MergeConfigError

__all__ = [
    "KEEP_ALL",
    "SLICE_ELEMENTS",
    "BreadcrumbsCombine",
    "CutCursor",
    "DareTiesCombine",
    "MagnitudeCut",
    "SlicedCombine",
    "TiesCombine",
    "average",
    "breadcrumbs_plan",
    "dare_ties_plan",
    "magnitude_cut",
    "ties_plan",
    "breadcrumbs",
    "breadcrumbs_mask",
    "compute_dtype",
    "dare_linear",
    "dare_mask",
    "dare_ties",
    "iso_c",
    "magnitude_trim",
    "task_arithmetic",
    "ties",
    "tsv",
]

Generators = torch.Generator | Sequence[torch.Generator] | None


# ----------------------------------------------------------------------------------------------- helpers
def compute_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float64 when any tensor is float64, float32 otherwise (the precision merges are computed in)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(tensors: Sequence[Tensor], what: str = "task vectors") -> torch.dtype:
    """Validate a non-empty sequence of same-shape floating tensors; return the compute dtype."""
    if len(tensors) == 0:
        raise MergeConfigError(f"merge needs at least one tensor, got no {what}")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise CheckpointError(
                f"{what}[{i}] has non-floating dtype {t.dtype}; only floating tensors merge"
            )
        if t.shape != shape:
            raise CheckpointError(f"{what}[{i}] has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return compute_dtype(tensors)


def _weights(weights: Sequence[float] | None, n: int) -> list[float] | None:
    """None (unit weights) or a list of n floats; a wrong count is a MergeConfigError naming `weights`."""
    if weights is None:
        return None
    w = [float(x) for x in weights]
    if len(w) != n:
        raise MergeConfigError(f"weights has {len(w)} entries but {n} tensors were given")
    return w


def _weighted_sum(tensors: Sequence[Tensor], weights: list[float] | None, dtype: torch.dtype) -> Tensor:
    """sum_i w_i t_i in `dtype`, accumulated in one fresh buffer (no stacking, inputs untouched)."""
    out = tensors[0].to(dtype=dtype, copy=True)
    if weights is not None and weights[0] != 1.0:
        out.mul_(weights[0])
    for i in range(1, len(tensors)):
        t = tensors[i]
        w = 1.0 if weights is None else weights[i]
        if t.dtype == dtype:
            out.add_(t, alpha=w)
        else:
            out.add_(t.to(dtype), alpha=w)
    return out


def _check_density(density: float, name: str = "density") -> None:
    if not 0.0 < density <= 1.0:
        raise MergeConfigError(f"{name} must be in (0, 1], got {density}")


def _check_gamma(gamma: float) -> None:
    if not 0.0 <= gamma < 1.0:
        raise MergeConfigError(f"gamma must be in [0, 1), got {gamma}")


# ------------------------------------------------------------------------------------------ trimming / masks
def magnitude_trim(tau: Tensor, density: float) -> Tensor:
    """Keep the ``k = int(density * numel)`` largest-magnitude entries of `tau`, zero the rest (TIES "trim").

    The count is peft's (``peft.utils.merge_utils.magnitude_based_pruning``); among entries whose magnitude
    equals the k-th largest, the first ones in flat index order are kept (see :class:`MagnitudeCut`: identical
    to peft whenever the magnitudes at the cut are distinct). ``density >= 1`` returns `tau` unchanged (a view).
    """
    if density >= 1.0:
        return tau
    mag = tau.abs()
    keep = _cut_mask(mag, magnitude_cut(mag, int(density * tau.numel())))
    return torch.where(keep, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))


def dare_mask(
    shape: torch.Size | Sequence[int],
    density: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Bernoulli(`density`) keep-mask (bool) of `shape`: entry kept iff ``U < density`` with ``U ~ Uniform[0, 1)``.

    Drawn on the CPU with `generator` (the global RNG when None) and then moved to `device`, so a seeded
    generator gives the same mask on CPU and GPU.
    """
    u = torch.rand(tuple(shape), generator=generator, device="cpu", dtype=torch.float32)
    mask = u < density
    return mask if device is None else mask.to(device)


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Bool mask of the Breadcrumbs "middle band" of `tau` by magnitude.

    With ``N = numel``, ``k_top = int(gamma * N)`` and ``k_keep = min(int(density * N), N - k_top)``: in the
    order (``|tau|`` descending, flat index ascending; see :class:`MagnitudeCut`) the first ``k_top`` entries
    are dropped and the next ``k_keep`` kept, the rest dropped. Exactly ``k_keep`` entries are True.
    """
    mag = tau.abs()
    k_top, k_end = _breadcrumbs_counts(tau.numel(), density, gamma)
    return _cut_mask(mag, magnitude_cut(mag, k_end)) & ~_cut_mask(mag, magnitude_cut(mag, k_top))


def _generator_list(generator: Generators, n: int) -> list[torch.Generator | None]:
    """One generator per task: a sequence is used as given; a single generator (or None) is shared in order."""
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * n
    gens = list(generator)
    if len(gens) != n:
        raise MergeConfigError(f"dare needs one generator per task vector: got {len(gens)} for {n} tensors")
    return gens


def _dare_drop(tau: Tensor, density: float, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    """DARE on one task vector: ``tau * mask / density`` with ``mask = dare_mask(...)`` (fresh tensor)."""
    mask = dare_mask(tau.shape, density, generator, device=tau.device)
    # (tau * mask) / density as peft computes it, so kept entries are exactly tau / density.
    return (tau.to(dtype) * mask).div_(density)


# ------------------------------------------------------------------------------- exact magnitude cuts
#: Slice size (elements) in which the whole-tensor methods run their element-wise second phase.
SLICE_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class MagnitudeCut:
    """The first ``k`` entries of a flat tensor in the total order (``|x|`` descending, flat index ascending).

    They are every entry with ``|x| > threshold`` plus the first ``ties`` entries, in flat index order, with
    ``|x| == threshold`` (``threshold`` is the k-th largest magnitude). ``threshold = -inf`` selects everything
    (``k >= numel``), ``+inf`` with ``ties = 0`` nothing (``k = 0``).

    Tie rule: ``torch.topk`` (what peft uses) leaves its order among equal magnitudes unspecified; this cut keeps
    the earliest ones. So the selection equals peft's whenever the magnitudes at the cut are distinct (always,
    in practice, for continuous data), and it is the same whether the tensor is processed whole or in slices.
    """

    threshold: float
    ties: int

    @property
    def keeps_all(self) -> bool:
        return self.threshold == -math.inf


KEEP_ALL = MagnitudeCut(-math.inf, 0)
KEEP_NONE = MagnitudeCut(math.inf, 0)


def magnitude_cut(magnitudes: Tensor, k: int) -> MagnitudeCut:
    """The :class:`MagnitudeCut` selecting the ``k`` largest of `magnitudes` (``|tau|``, any shape, non-negative).

    One exact selection (:func:`_kth_largest`: ``torch.kthvalue`` on a sample-bracketed subset for large
    tensors) and one count; `magnitudes` is not modified.
    """
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    if k >= n:
        return KEEP_ALL
    if k <= 0:
        return KEEP_NONE
    thr = _kth_largest(flat, k)
    above = int(torch.count_nonzero(flat > thr))
    return MagnitudeCut(thr, k - above)


#: Sample stride of :func:`_kth_largest`'s bracketing step.
_SAMPLE_STRIDE = 64


def _kth_largest(flat: Tensor, k: int) -> float:
    """The k-th largest of the 1-D `flat` (``1 <= k < numel``, no NaN), exactly, with little extra memory.

    Large tensors: ``torch.kthvalue`` on a strided sample (every 64th entry) brackets the answer in
    ``[lo, hi]`` (about +-4 standard deviations of the sample rank); one pass counts the entries ``> hi``
    and one gathers those inside the bracket, and ``torch.kthvalue`` on that small set gives the exact
    value. When the bracket misses (unusual data) it falls back to ``torch.kthvalue`` on the whole tensor, as
    small tensors always do. Either way the result is the exact k-th largest.
    """
    n = flat.numel()
    if n <= SLICE_ELEMENTS:
        return float(torch.kthvalue(flat, n - k + 1).values)
    sample = flat[::_SAMPLE_STRIDE]
    m = sample.numel()
    r = k * m / n  # expected rank from the top of the k-th largest inside the sample
    margin = 4.0 * math.sqrt(max(r * (1.0 - r / m), 1.0)) + 8.0
    hi_rank, lo_rank = max(1, math.floor(r - margin)), min(m, math.ceil(r + margin))
    hi = float(torch.kthvalue(sample, m - hi_rank + 1).values)
    lo = float(torch.kthvalue(sample, m - lo_rank + 1).values)
    # Whole-tensor passes: two bool temporaries (1 byte per entry), far faster than many slice-sized ones.
    above = int(torch.count_nonzero(flat > hi))
    within = flat[(flat >= lo).logical_and_(flat <= hi)]
    need = k - above  # the answer is the need-th largest inside the bracket when 1 <= need <= len
    if 1 <= need <= within.numel():
        return float(torch.kthvalue(within, within.numel() - need + 1).values)
    return float(torch.kthvalue(flat, n - k + 1).values)


class CutCursor:
    """Applies a :class:`MagnitudeCut` to consecutive flat slices of its tensor, visited in order from 0.

    It counts the tie entries (``|x| == threshold``) kept so far, so the union of the slice masks is exactly the
    cut's selection whatever the slice sizes.
    """

    def __init__(self, cut: MagnitudeCut) -> None:
        self.cut = cut
        self.ties_left = cut.ties
        self.position = 0

    def mask(self, magnitudes: Tensor, start: int) -> Tensor:
        """Bool keep-mask of the flat slice ``[start, start + len)`` whose magnitudes are given."""
        if start != self.position:
            raise RuntimeError(f"slices must be visited in order: expected start {self.position}, got {start}")
        self.position += magnitudes.numel()
        if self.cut.keeps_all:
            return torch.ones(magnitudes.shape, dtype=torch.bool, device=magnitudes.device)
        keep = magnitudes > self.cut.threshold
        if self.ties_left > 0:
            at = (magnitudes == self.cut.threshold).nonzero().view(-1)[: self.ties_left]
            keep[at] = True
            self.ties_left -= at.numel()
        return keep


def _cut_mask(magnitudes: Tensor, cut: MagnitudeCut) -> Tensor:
    return CutCursor(cut).mask(magnitudes.reshape(-1), 0).view(magnitudes.shape)


# ------------------------------------------------------------------------ two-phase whole-tensor methods
class SlicedCombine:
    """Phase 2 of a method that needs whole-tensor statistics (``ties``, ``dare_ties``, ``breadcrumbs``).

    Phase 1 (the ``*_plan`` functions) looks at each task vector once, one at a time, and keeps only small
    per-task state (magnitude cuts; DARE's 1-byte masks). Phase 2 is element-wise given that state:
    :meth:`combine` maps the flat slices ``[start, stop)`` of the task vectors to the same slice of
    ``combine(tau_1..tau_n)``; slices must be visited in order from 0 (tie counters). The result does not
    depend on how the tensor is sliced.
    """

    def __init__(self, numel: int, weights: list[float] | None) -> None:
        self.numel = numel
        self.weights = weights

    def combine(self, task_slices: Sequence[Tensor], start: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, task_vectors: Sequence[Tensor], dtype: torch.dtype, slice_elements: int = SLICE_ELEMENTS) -> Tensor:
        """The whole ``combine(task_vectors)`` in `dtype`, computed slice by slice into one output buffer."""
        shape = task_vectors[0].shape
        flat = [t.reshape(-1) for t in task_vectors]
        out = torch.empty(self.numel, dtype=dtype, device=flat[0].device)
        for start in range(0, self.numel, slice_elements):
            stop = min(self.numel, start + slice_elements)
            out[start:stop] = self.combine([f[start:stop].to(dtype) for f in flat], start)
        return out.view(shape)


def _elect_and_mean_slice(
    values: Sequence[Tensor], keeps: Sequence[Tensor | None], weights: list[float] | None, majority_sign_method: str
) -> Tensor:
    """TIES steps 2-3 on one slice, accumulated task by task (element-wise, so slicing never changes a bit).

    ``t_i = values_i`` where ``keeps_i`` (all of it when None), else 0. ``total``: s = sign(sum_i t_i);
    ``frequency``: s = sign(sum_i sign(t_i)); s = +1 where that vote is 0. Task i agrees where
    ``sign(t_i) == s`` (zeros never agree). Result ``sum_i [agree_i] w_i t_i / max(1, #agree)``.
    """
    zero = torch.zeros((), dtype=values[0].dtype, device=values[0].device)
    signs = []
    votes: Tensor | None = None
    for v, keep in zip(values, keeps):
        sign = v.sign() if keep is None else torch.where(keep, v.sign(), zero)
        signs.append(sign)
        if majority_sign_method == "total":
            term = v if keep is None else torch.where(keep, v, zero)
        else:
            term = sign
        votes = term.clone() if votes is None else votes.add_(term)
    assert votes is not None
    elected = torch.where(votes >= 0, 1.0, -1.0).to(votes.dtype)
    del votes
    total = torch.zeros_like(elected)
    count = torch.zeros_like(elected)
    for i, (v, sign) in enumerate(zip(values, signs)):
        agree = sign == elected
        term = v if weights is None else v * weights[i]
        total.add_(torch.where(agree, term, zero))
        count.add_(agree)
    return total.div_(count.clamp_(min=1))


def _check_sign_method(majority_sign_method: str) -> None:
    if majority_sign_method not in ("total", "frequency"):
        raise MergeConfigError(
            f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}"
        )


class TiesCombine(SlicedCombine):
    """Phase 2 of :func:`ties`: trim each task by its cut, elect the sign, disjoint mean (see :func:`ties`)."""

    def __init__(self, cuts: Sequence[MagnitudeCut], numel: int, weights: list[float] | None,
                 majority_sign_method: str) -> None:
        super().__init__(numel, weights)
        self.cursors = [CutCursor(c) for c in cuts]
        self.majority_sign_method = majority_sign_method

    def combine(self, task_slices: Sequence[Tensor], start: int) -> Tensor:
        # density 1 (a cut that keeps all) skips the magnitudes: the sign election alone, as peft.
        keeps = [None if c.cut.keeps_all else c.mask(t.abs(), start) for c, t in zip(self.cursors, task_slices)]
        return _elect_and_mean_slice(task_slices, keeps, self.weights, self.majority_sign_method)


class DareTiesCombine(SlicedCombine):
    """Phase 2 of :func:`dare_ties`: ``d_i = tau_i * m_i / density`` then TIES steps 2-3 (see :func:`dare_ties`)."""

    def __init__(self, masks: Sequence[Tensor], density: float, weights: list[float] | None,
                 majority_sign_method: str) -> None:
        super().__init__(masks[0].numel(), weights)
        self.masks = [m.reshape(-1) for m in masks]
        self.density = density
        self.majority_sign_method = majority_sign_method

    def combine(self, task_slices: Sequence[Tensor], start: int) -> Tensor:
        stop = start + task_slices[0].numel()
        # (tau * mask) / density as peft computes it, so kept entries are exactly tau / density.
        dropped = [(t * m[start:stop].to(t.device)).div_(self.density) for t, m in zip(task_slices, self.masks)]
        return _elect_and_mean_slice(dropped, [None] * len(dropped), self.weights, self.majority_sign_method)


class BreadcrumbsCombine(SlicedCombine):
    """Phase 2 of :func:`breadcrumbs`: ``sum_i w_i tau_i [in band_i]`` with the band between two cuts."""

    def __init__(self, cuts: Sequence[tuple[MagnitudeCut, MagnitudeCut]], numel: int,
                 weights: list[float] | None) -> None:
        super().__init__(numel, weights)
        self.cursors = [(CutCursor(top), CutCursor(upto)) for top, upto in cuts]

    def combine(self, task_slices: Sequence[Tensor], start: int) -> Tensor:
        out: Tensor | None = None
        for i, (t, (top, upto)) in enumerate(zip(task_slices, self.cursors)):
            mag = t.abs()
            band = upto.mask(mag, start) & ~top.mask(mag, start)
            term = t * band
            if self.weights is not None:
                term.mul_(self.weights[i])
            out = term if out is None else out.add_(term)
        assert out is not None
        return out


def ties_plan(magnitude: Callable[[int], Tensor], num_tasks: int, numel: int,
              weights: Sequence[float] | None = None, density: float = 0.2,
              majority_sign_method: str = "total") -> TiesCombine:
    """Phase 1 of :func:`ties`: one :func:`magnitude_cut` (``k = int(density * numel)``) per task.

    ``magnitude(i)`` returns ``|tau_i|`` (whole tensor); it is called once per task in order and its result
    dropped before the next call, so one task's magnitudes are alive at a time. Density 1 calls it never.
    """
    _check_density(density)
    _check_sign_method(majority_sign_method)
    k = int(density * numel)
    cuts = [KEEP_ALL if density >= 1.0 else magnitude_cut(magnitude(i), k) for i in range(num_tasks)]
    return TiesCombine(cuts, numel, _weights(weights, num_tasks), majority_sign_method)


def dare_ties_plan(shape: torch.Size | Sequence[int], num_tasks: int, weights: Sequence[float] | None = None,
                   density: float = 0.5, majority_sign_method: str = "total",
                   generator: Generators = None) -> DareTiesCombine:
    """Phase 1 of :func:`dare_ties`: each task's whole DARE mask, drawn once (bool, 1 byte per entry)."""
    _check_density(density)
    _check_sign_method(majority_sign_method)
    gens = _generator_list(generator, num_tasks)
    masks = [dare_mask(shape, density, g) for g in gens]
    return DareTiesCombine(masks, density, _weights(weights, num_tasks), majority_sign_method)


def _breadcrumbs_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(k_top, k_top + k_keep): the band is the entries ranked in ``[k_top, k_top + k_keep)`` by magnitude."""
    k_top = int(gamma * numel)
    k_keep = min(int(density * numel), numel - k_top)
    return k_top, k_top + k_keep


def breadcrumbs_plan(magnitude: Callable[[int], Tensor], num_tasks: int, numel: int,
                     weights: Sequence[float] | None = None, density: float = 0.9,
                     gamma: float = 0.01) -> BreadcrumbsCombine:
    """Phase 1 of :func:`breadcrumbs`: two cuts per task (its top ``k_top`` and its top ``k_top + k_keep``).

    ``magnitude(i)`` returns ``|tau_i|``, called once per task in order (see :func:`ties_plan`).
    """
    _check_density(density)
    _check_gamma(gamma)
    k_top, k_end = _breadcrumbs_counts(numel, density, gamma)
    cuts = []
    for i in range(num_tasks):
        mag = magnitude(i)
        cuts.append((magnitude_cut(mag, k_top), magnitude_cut(mag, k_end)))
        del mag  # before the next task's magnitudes are computed
    return BreadcrumbsCombine(cuts, numel, _weights(weights, num_tasks))


# ------------------------------------------------------------------------------------------------ methods
def average(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Weighted mean ``sum_i w_i M_i / sum_i w_i`` of the *model* tensors (unit weights: the plain mean).

    The only function here that takes models rather than deltas (on deltas it gives the mean delta).
    The weight sum must be non-zero. Model soups / "uniform soup" (Wortsman et al. 2022).
    """
    dtype = _check(tensors, "tensors")
    w = _weights(weights, len(tensors))
    total = float(len(tensors)) if w is None else sum(w)
    if total == 0.0:
        raise MergeConfigError("weights sum to 0: the weighted average is undefined")
    return _weighted_sum(tensors, w, dtype).div_(total)


def task_arithmetic(task_vectors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Task arithmetic: ``sum_i w_i tau_i`` (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

    Equals ``peft.utils.merge_utils.task_arithmetic(taus, torch.tensor(weights))``.
    """
    dtype = _check(task_vectors)
    return _weighted_sum(task_vectors, _weights(weights, len(task_vectors)), dtype)


def ties(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: float = 0.2,
    majority_sign_method: str = "total",
) -> Tensor:
    """TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023).

    1. trim: ``t_i = magnitude_trim(tau_i, density)`` (top ``int(density * numel)`` entries by ``|tau_i|``,
       ties at the cut resolved by flat index, see :class:`MagnitudeCut`);
    2. elect: ``s = sign(sum_i t_i)`` (``"total"``) or ``s = sign(sum_i sign(t_i))`` (``"frequency"``), with
       ``s = +1`` where the vote is 0; the vote uses the *unweighted* trimmed vectors;
    3. disjoint mean: ``sum_i [sign(t_i) == s] w_i t_i / max(1, #{i : sign(t_i) == s})``.

    Weights enter only in step 3: each agreeing trimmed entry is multiplied by its weight and the sum is
    divided by the *count* of agreeing tasks (not by the sum of their weights). This is exactly
    ``peft.utils.merge_utils.ties(taus, torch.tensor(weights), density, majority_sign_method)``, for unit and
    non-unit weights alike. Entries where no task agrees (e.g. all zero) are 0. ``density = 1`` skips the trim,
    leaving the sign election and disjoint mean.

    Computed by :func:`ties_plan` (one ``|tau_i|`` alive at a time) then :meth:`TiesCombine.run` in slices:
    besides the inputs, about one task vector plus a few slice-sized buffers are allocated.
    """
    dtype = _check(task_vectors)
    plan = ties_plan(lambda i: task_vectors[i].to(dtype).abs(), len(task_vectors), task_vectors[0].numel(),
                     weights, density, majority_sign_method)
    return plan.run(task_vectors, dtype)


def dare_linear(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: float = 0.5,
    generator: Generators = None,
) -> Tensor:
    """DARE + linear sum (Yu et al., "Language Models are Super Mario", ICML 2024): ``sum_i w_i m_i tau_i / density``.

    ``m_i = dare_mask(shape, density, g_i)``: each entry kept independently with probability `density` and the
    kept ones rescaled by ``1 / density`` (peft's convention, unbiased: ``E[result] = sum_i w_i tau_i``).
    `generator`: a sequence gives one generator per task (``g_i``, what the dispatcher passes so that the
    mask of task i does not depend on the other tasks); a single generator draws the masks in task order;
    None uses torch's global RNG. Masks are drawn on the CPU and moved to the tensors' device.
    """
    dtype = _check(task_vectors)
    _check_density(density)
    w = _weights(weights, len(task_vectors))
    gens = _generator_list(generator, len(task_vectors))
    out: Tensor | None = None
    for i, (tau, g) in enumerate(zip(task_vectors, gens)):
        term = _dare_drop(tau, density, g, dtype)
        if w is not None:
            term.mul_(w[i])
        out = term if out is None else out.add_(term)
    assert out is not None
    return out


def dare_ties(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: float = 0.5,
    majority_sign_method: str = "total",
    generator: Generators = None,
) -> Tensor:
    """DARE + TIES (Yu et al. 2024; as ``peft.utils.merge_utils.dare_ties``).

    ``d_i = m_i tau_i / density`` (the DARE drop/rescale of :func:`dare_linear`, same masks for the same
    generators), then TIES steps 2-3 on the ``d_i``: sign election on the unweighted ``d_i`` and the weighted
    disjoint mean ``sum_i [sign(d_i) == s] w_i d_i / max(1, #agreeing)`` (see :func:`ties`).
    """
    dtype = _check(task_vectors)
    plan = dare_ties_plan(task_vectors[0].shape, len(task_vectors), weights, density, majority_sign_method,
                          generator)
    return plan.run(task_vectors, dtype)


def breadcrumbs(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: float = 0.9,
    gamma: float = 0.01,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
    Sparse Masks", ECCV 2024): ``sum_i w_i (tau_i * breadcrumbs_mask(tau_i, density, gamma))``.

    Per task vector (over the whole tensor) the ``k_top = int(gamma * numel)`` largest-magnitude entries
    (outliers) are dropped, then the next ``int(density * numel)`` largest are kept and the smallest rest
    dropped. Requires ``gamma + density <= 1`` (validated by the spec; here the kept count is capped).
    """
    dtype = _check(task_vectors)
    plan = breadcrumbs_plan(lambda i: task_vectors[i].to(dtype).abs(), len(task_vectors),
                            task_vectors[0].numel(), weights, density, gamma)
    return plan.run(task_vectors, dtype)


def tsv(task_vectors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """TSV-M, Task Singular Vectors merge (Gargiulo et al., "Task Singular Vectors: Reducing Task
    Interference in Model Merging", CVPR 2025).

    For a 2-D tensor (m x n) and T tasks, with ``A_i = w_i tau_i``:

    1. ``A_i = U_i S_i V_i^T`` (reduced SVD); keep the top ``k = max(1, int(min(m, n) / T))`` triplets;
    2. ``U_cat = [U_1[:, :k] .. U_T[:, :k]]`` (m x Tk), ``S_cat`` = the kept singular values in the same
       order, ``V_cat = [V_1[:, :k] .. V_T[:, :k]]`` (n x Tk);
    3. whiten: ``svd(U_cat) = P Sigma Q^T`` -> ``U_perp = P Q^T``, likewise ``V_perp`` from ``V_cat``
       (the closest matrices with orthonormal columns, Procrustes);
    4. result ``U_perp diag(S_cat) V_perp^T``.

    With T = 1, k = min(m, n) and the task's own delta comes back. Tensors that are not 2-D (biases,
    LayerNorm, scalars) fall back to the *mean* ``(1/T) sum_i w_i tau_i``, as the authors' code does for
    non-matrix parameters (it averages them).
    """
    dtype = _check(task_vectors)
    w = _weights(weights, len(task_vectors))
    n_tasks = len(task_vectors)
    if task_vectors[0].dim() != 2:
        return _weighted_sum(task_vectors, w, dtype).div_(n_tasks)
    m, n = task_vectors[0].shape
    k = max(1, int(min(m, n) / n_tasks))
    us, ss, vs = [], [], []
    for i, tau in enumerate(task_vectors):
        a = tau.to(dtype)
        if w is not None:
            a = a * w[i]
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k, :])
    u_cat = torch.cat(us, dim=1)  # m x Tk
    s_cat = torch.cat(ss)
    vh_cat = torch.cat(vs, dim=0)  # Tk x n, i.e. V_cat^T
    p, _, qh = torch.linalg.svd(u_cat, full_matrices=False)
    u_perp = p @ qh
    p, _, qh = torch.linalg.svd(vh_cat, full_matrices=False)
    vh_perp = p @ qh  # (V_perp)^T: whitening V_cat^T gives the transpose of whitening V_cat
    return (u_perp * s_cat) @ vh_perp


def iso_c(task_vectors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces", ICML 2025).

    2-D tensors: ``D = sum_i w_i tau_i = U S V^T`` (reduced SVD) and the result ``U (mean(S) I) V^T``: the
    spectrum flattened to its mean singular value (so the Frobenius norm changes, the subspaces do not).
    Other ranks (biases, LayerNorm, scalars): the *mean* ``(1/T) sum_i w_i tau_i``, which is what the authors'
    code does (it computes ``sum(tvs) / len(tvs)`` for every key and multiplies by ``len(tvs)`` only for the
    2-D ones). In the paper the result is then scaled by alpha: that is the spec's ``scale``, applied by the
    dispatcher, not here.
    """
    dtype = _check(task_vectors)
    delta = _weighted_sum(task_vectors, _weights(weights, len(task_vectors)), dtype)
    if delta.dim() != 2:
        return delta.div_(len(task_vectors))
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u * s.mean()) @ vh
