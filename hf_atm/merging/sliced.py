"""The two-phase whole-tensor methods: ``ties``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``.

Phase 1 (the ``*_plan`` functions) looks at each task vector once and keeps small per-task state (exact
magnitude cuts, :mod:`hf_atm.merging.cuts`; DARE masks); phase 2 (a :class:`SlicedCombine`) is element-wise given
that state, so the streaming engine runs it on file slices, bit-identical to the whole-tensor call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from hf_atm.errors import MergeConfigError
from hf_atm.merging.conventions import (
    SLICE_ELEMENTS,
    Generators,
    PerTask,
    check_rescale,
    check_sign_method,
    check_tensors,
    densities,
    gammas,
    generator_list,
    per_task_values,
    weight_list,
)
from hf_atm.merging.cuts import (
    KEEP_ALL,
    CutCursor,
    MagnitudeCut,
    cut_mask,
    magnitude_cut,
    magnitude_cuts,
    magnitude_cuts_streamed,
)
from hf_atm.merging.dare import dare_mask
from hf_atm.merging.election import elect_and_mean_slice, elect_fast, elect_reference

__all__ = [
    "BreadcrumbsCombine",
    "BreadcrumbsTiesCombine",
    "DareTiesCombine",
    "SlicedCombine",
    "TiesCombine",
    "breadcrumbs",
    "breadcrumbs_mask",
    "breadcrumbs_plan",
    "breadcrumbs_ties",
    "breadcrumbs_ties_plan",
    "cuts_saw_finite",
    "dare_ties",
    "dare_ties_plan",
    "ties",
    "ties_plan",
]


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

    @property
    def stateless(self) -> bool:
        """Whether :meth:`combine_at` applies (no tie counters: every cut knows its ``tie_end``)."""
        return False

    def combine_at(self, task_slices: Sequence[Tensor], start: int) -> Tensor:
        """:meth:`combine` for a :attr:`stateless` combine: any slice, in any order, from any thread (the same
        bits as :meth:`combine`; nothing moves)."""
        raise RuntimeError(f"{type(self).__name__} counts ties slice by slice: use combine() in order")

    def run(self, task_vectors: Sequence[Tensor], dtype: torch.dtype, slice_elements: int = SLICE_ELEMENTS) -> Tensor:
        """The whole ``combine(task_vectors)`` in `dtype`, computed slice by slice into one output buffer."""
        shape = task_vectors[0].shape
        flat = [t.reshape(-1) for t in task_vectors]
        out = torch.empty(self.numel, dtype=dtype, device=flat[0].device)
        for start in range(0, self.numel, slice_elements):
            stop = min(self.numel, start + slice_elements)
            out[start:stop] = self.combine([f[start:stop].to(dtype) for f in flat], start)
        return out.view(shape)


def cuts_saw_finite(combine: SlicedCombine) -> bool:
    """Whether phase 1 saw every task's magnitudes ``|M_i - BASE|`` and found them all finite, which implies a
    finite base and finite models (a NaN or Inf in either makes the difference NaN or Inf). False when a task's
    cut looked at nothing (density 1, k = 0, no cut at all as DARE's masks) or met a non-finite magnitude (a
    non-finite input, or finite inputs whose difference overflows): the inputs must then be checked themselves."""
    cursors = getattr(combine, "cursors", None)
    if not cursors:
        return False
    for c in cursors:
        pair = c if isinstance(c, tuple) else (c,)
        if not any(x.cut.finite for x in pair):
            return False
    return True


class TiesCombine(SlicedCombine):
    """Phase 2 of :func:`ties`: trim each task by its cut, elect the sign, disjoint mean (see :func:`ties`)."""

    def __init__(self, cuts: Sequence[MagnitudeCut], numel: int, weights: list[float] | None,
                 majority_sign_method: str, normalize: bool | None = None) -> None:
        super().__init__(numel, weights)
        self.cursors = [CutCursor(c) for c in cuts]
        self.majority_sign_method = majority_sign_method
        self.normalize = normalize

    @property
    def stateless(self) -> bool:
        return all(c.stateless for c in self.cursors)

    def combine(self, task_slices: Sequence[Tensor], start: int) -> Tensor:
        # Each task trimmed by its cut (hardshrink passes, see CutCursor.trim), then the mask-free election; a
        # non-finite entry recomputes the slice with the reference's masks. Density 1 (a cut that keeps all)
        # skips the magnitudes: the sign election alone, as peft.
        trimmed = [c.trim(t, start) for c, t in zip(self.cursors, task_slices)]
        return self._elect(task_slices, trimmed, lambda c, mag: c.last_mask(mag))

    def combine_at(self, task_slices: Sequence[Tensor], start: int) -> Tensor:
        if not self.stateless:
            return super().combine_at(task_slices, start)
        trimmed = [c.trim_at(t, start) for c, t in zip(self.cursors, task_slices)]
        return self._elect(task_slices, trimmed, lambda c, mag: c.mask_at(mag, start))

    def _elect(self, task_slices: Sequence[Tensor], trimmed: Sequence[Tensor],
               mask: Callable[[CutCursor, Tensor], Tensor]) -> Tensor:
        out = elect_fast(trimmed, self.weights, self.majority_sign_method, self.normalize)
        if out is not None:
            return out
        keeps = [None if c.cut.keeps_all else mask(c, t.abs()) for c, t in zip(self.cursors, task_slices)]
        return elect_reference(task_slices, keeps, self.weights, self.majority_sign_method, self.normalize)


class DareTiesCombine(SlicedCombine):
    """Phase 2 of :func:`dare_ties`: ``d_i = tau_i * m_i / density_i`` then TIES steps 2-3 (see :func:`dare_ties`).

    `density`: one float for all tasks or one per task (the densities the masks were drawn with).
    `factors`: instead of ``1 / density_i``, multiply task i's kept entries by ``factors[i]`` (its L1 rescale,
    computed by :func:`dare_ties_plan` over the whole tensor; 1.0 for no rescale).
    """

    def __init__(self, masks: Sequence[Tensor], density: PerTask, weights: list[float] | None,
                 majority_sign_method: str, normalize: bool | None = None,
                 factors: Sequence[float] | None = None) -> None:
        super().__init__(masks[0].numel(), weights)
        self.masks = [m.reshape(-1) for m in masks]
        self.densities = per_task_values(density, len(self.masks), "density")[0]
        self.majority_sign_method = majority_sign_method
        self.normalize = normalize
        self.factors = None if factors is None else list(factors)

    @property
    def stateless(self) -> bool:
        return True  # the masks are indexed by position

    def combine_at(self, task_slices: Sequence[Tensor], start: int) -> Tensor:
        return self.combine(task_slices, start)

    def combine(self, task_slices: Sequence[Tensor], start: int) -> Tensor:
        stop = start + task_slices[0].numel()
        if self.factors is None:
            # (tau * mask) / density as peft computes it, so kept entries are exactly tau / density.
            dropped = [(t * m[start:stop].to(t.device)).div_(d)
                       for t, m, d in zip(task_slices, self.masks, self.densities)]
        else:
            dropped = [(t * m[start:stop].to(t.device)).mul_(f)
                       for t, m, f in zip(task_slices, self.masks, self.factors)]
        return elect_and_mean_slice(dropped, [None] * len(dropped), self.weights, self.majority_sign_method,
                                     self.normalize)


class BreadcrumbsCombine(SlicedCombine):
    """Phase 2 of :func:`breadcrumbs`: ``sum_i w_i tau_i [in band_i]`` with the band between two cuts."""

    def __init__(self, cuts: Sequence[tuple[MagnitudeCut, MagnitudeCut]], numel: int,
                 weights: list[float] | None) -> None:
        super().__init__(numel, weights)
        self.cursors = [(CutCursor(top), CutCursor(upto)) for top, upto in cuts]

    def _float_bands(self, task_slices: Sequence[Tensor], start: int, at: bool = False) -> list[Tensor]:
        """Each task's band as floats, ``sign(trim_upto(|t|)) - sign(trim_top(|t|))`` (advances the cursors,
        unless `at`: the stateless :meth:`CutCursor.trim_at`).

        1.0 inside the band where ``|t| > 0``, +0.0 elsewhere: ``t * band`` equals ``t * bool_band`` bit for bit
        (the band's entries with ``|t| = 0`` hold ``t = +-0``, and ``+-0 * 1 == +-0 * 0``), with no bool mask.
        """
        bands = []
        for t, (top, upto) in zip(task_slices, self.cursors):
            mag = t.abs()
            if at:
                bands.append(upto.trim_at(mag, start).sign().sub_(top.trim_at(mag, start).sign()))
            else:
                bands.append(upto.trim(mag, start).sign().sub_(top.trim(mag, start).sign()))
        return bands

    def _last_bands(self, task_slices: Sequence[Tensor], start: int | None = None) -> list[Tensor]:
        """The bool bands of the slice visited last, or of the slice at `start` (stateless); nothing moves."""
        if start is None:
            return [upto.last_mask(t.abs()) & ~top.last_mask(t.abs())
                    for t, (top, upto) in zip(task_slices, self.cursors)]
        return [upto.mask_at(t.abs(), start) & ~top.mask_at(t.abs(), start)
                for t, (top, upto) in zip(task_slices, self.cursors)]

    @property
    def stateless(self) -> bool:
        return all(top.stateless and upto.stateless for top, upto in self.cursors)

    def combine(self, task_slices: Sequence[Tensor], start: int) -> Tensor:
        return self._sum(task_slices, self._float_bands(task_slices, start))

    def combine_at(self, task_slices: Sequence[Tensor], start: int) -> Tensor:
        if not self.stateless:
            return super().combine_at(task_slices, start)
        return self._sum(task_slices, self._float_bands(task_slices, start, at=True))

    def _sum(self, task_slices: Sequence[Tensor], bands: Sequence[Tensor]) -> Tensor:
        out: Tensor | None = None
        for i, (t, band) in enumerate(zip(task_slices, bands)):
            term = t * band
            if self.weights is not None:
                term.mul_(self.weights[i])
            out = term if out is None else out.add_(term)
        assert out is not None
        return out


class BreadcrumbsTiesCombine(BreadcrumbsCombine):
    """Phase 2 of :func:`breadcrumbs_ties`: each task's Breadcrumbs band, then TIES steps 2-3 on the banded
    vectors (sign election and disjoint mean, see :func:`ties`)."""

    def __init__(self, cuts: Sequence[tuple[MagnitudeCut, MagnitudeCut]], numel: int,
                 weights: list[float] | None, majority_sign_method: str, normalize: bool | None = None) -> None:
        super().__init__(cuts, numel, weights)
        self.majority_sign_method = majority_sign_method
        self.normalize = normalize

    def combine(self, task_slices: Sequence[Tensor], start: int) -> Tensor:
        return self._elect(task_slices, self._float_bands(task_slices, start), None)

    def combine_at(self, task_slices: Sequence[Tensor], start: int) -> Tensor:
        if not self.stateless:
            return super().combine_at(task_slices, start)
        return self._elect(task_slices, self._float_bands(task_slices, start, at=True), start)

    def _elect(self, task_slices: Sequence[Tensor], bands: Sequence[Tensor], start: int | None) -> Tensor:
        banded = [t * band for t, band in zip(task_slices, bands)]
        out = elect_fast(banded, self.weights, self.majority_sign_method, self.normalize)
        if out is not None:
            return out
        return elect_reference(task_slices, self._last_bands(task_slices, start), self.weights,
                                self.majority_sign_method, self.normalize)


def ties_plan(magnitude: Callable[[int], Tensor], num_tasks: int, numel: int,
              weights: Sequence[float] | None = None, density: PerTask = 0.2,
              majority_sign_method: str = "total", normalize: bool | None = None) -> TiesCombine:
    """Phase 1 of :func:`ties`: one :func:`magnitude_cut` (``k_i = int(density_i * numel)``) per task.

    ``magnitude(i)`` returns ``|tau_i|`` (whole tensor, a fresh buffer the plan may reorder); it is called once
    per task in order and its result dropped before the next call, so one task's magnitudes are alive at a time
    (see :class:`_Scratch` for the rare second call). It is never called for a task whose density is 1.
    `density`: one float for all tasks or one per task.
    """
    ds = densities(density, num_tasks)
    check_sign_method(majority_sign_method)
    scratch = _Scratch(magnitude)
    cuts = [KEEP_ALL if d >= 1.0 else scratch.cuts(i, (int(d * numel),))[0] for i, d in enumerate(ds)]
    return TiesCombine(cuts, numel, weight_list(weights, num_tasks), majority_sign_method, normalize)


#: Magnitudes from this many elements on (64 MB in float32) are always partitioned in place: memory first.
_IN_PLACE_ALWAYS = 1 << 24


class _Scratch:
    """The cuts of each task's magnitudes: streamed (:func:`magnitude_cuts_streamed`) for half-precision models
    and large tensors when ``magnitude`` offers a ``source``, else stored whole and partitioned in place rather
    than copied (one pass and one buffer less; measured faster for float32 models).

    Should a cut need the magnitudes in their order again (ties at the cut both kept and dropped: the flat-order
    scan for ``tie_end``), ``magnitude(i)`` is called a second time, and the plan's later tasks are copied
    instead (unless they are large, :data:`_IN_PLACE_ALWAYS`): ties at the cut mean quantized data
    (half-precision checkpoints), where they are the rule.
    """

    def __init__(self, magnitude: Callable[[int], Tensor]) -> None:
        self.magnitude = magnitude
        self.in_place = True

    def cuts(self, i: int, ks: Sequence[int]) -> list[MagnitudeCut]:
        source = getattr(self.magnitude, "source", None)
        src = None if source is None else source(i)
        if src is not None and (src.model.dtype in (torch.float16, torch.bfloat16) or src.numel >= _IN_PLACE_ALWAYS):
            # streamed, never stored whole: faster for half-precision models (ties at every cut; widening in
            # cache-sized chunks), and a large tensor's magnitudes take no memory
            out = magnitude_cuts_streamed(src, ks)
            src.done()
            return out
        mag = self.magnitude(i)
        if not self.in_place and mag.numel() < _IN_PLACE_ALWAYS:
            return magnitude_cuts(mag, ks)

        def again() -> Tensor:
            self.in_place = False
            return self.magnitude(i)

        return magnitude_cuts(mag, ks, again=again)


def dare_ties_plan(shape: torch.Size | Sequence[int], num_tasks: int, weights: Sequence[float] | None = None,
                   density: PerTask = 0.5, majority_sign_method: str = "total",
                   generator: Generators = None, normalize: bool | None = None,
                   rescale: str | None = "probability",
                   magnitude: Callable[[int], Tensor] | None = None) -> DareTiesCombine:
    """Phase 1 of :func:`dare_ties`: each task's whole DARE mask, drawn once (bool, 1 byte per entry).

    `density`: one float for all tasks or one per task (task i's mask keeps with probability ``density_i``).
    `rescale` ``"l1"`` needs ``magnitude(i) = |tau_i|`` (whole tensor, called once per task in order) for each
    task's factor ``||tau_i||_1 / ||m_i tau_i||_1``; None keeps the kept entries as they are.
    """
    ds = densities(density, num_tasks)
    check_sign_method(majority_sign_method)
    check_rescale(rescale)
    gens = generator_list(generator, num_tasks)
    masks = [dare_mask(shape, d, g) for d, g in zip(ds, gens)]
    factors: list[float] | None = None
    if rescale is None:
        factors = [1.0] * num_tasks
    elif rescale == "l1":
        if magnitude is None:
            raise MergeConfigError("dare_ties_plan: rescale='l1' needs the task vectors' magnitudes")
        factors = []
        for i, (m, d) in enumerate(zip(masks, ds)):
            if d >= 1.0:
                factors.append(1.0)
                continue
            mag = magnitude(i).reshape(-1)
            before, after = mag.sum(), (mag * m.reshape(-1).to(mag.device)).sum()
            factors.append(1.0 if before < 1e-7 or after < 1e-7 else float(before / after))
            del mag
    return DareTiesCombine(masks, ds, weight_list(weights, num_tasks), majority_sign_method, normalize, factors)


def _breadcrumbs_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(k_top, k_top + k_keep): the band is the entries ranked in ``[k_top, k_top + k_keep)`` by magnitude."""
    k_top = int(gamma * numel)
    k_keep = min(int(density * numel), numel - k_top)
    return k_top, k_top + k_keep


def _breadcrumbs_cuts(magnitude: Callable[[int], Tensor], num_tasks: int, numel: int, density: PerTask,
                      gamma: PerTask) -> list[tuple[MagnitudeCut, MagnitudeCut]]:
    ds, gs = densities(density, num_tasks), gammas(gamma, num_tasks)
    scratch = _Scratch(magnitude)
    cuts = []
    for i in range(num_tasks):
        top, upto = scratch.cuts(i, _breadcrumbs_counts(numel, ds[i], gs[i]))  # one selection pass for both
        cuts.append((top, upto))
    return cuts


def breadcrumbs_plan(magnitude: Callable[[int], Tensor], num_tasks: int, numel: int,
                     weights: Sequence[float] | None = None, density: PerTask = 0.9,
                     gamma: PerTask = 0.01) -> BreadcrumbsCombine:
    """Phase 1 of :func:`breadcrumbs`: two cuts per task (its top ``k_top`` and its top ``k_top + k_keep``).

    ``magnitude(i)`` returns ``|tau_i|``, called once per task in order (see :func:`ties_plan`). `density` and
    `gamma`: one float for all tasks or one per task.
    """
    cuts = _breadcrumbs_cuts(magnitude, num_tasks, numel, density, gamma)
    return BreadcrumbsCombine(cuts, numel, weight_list(weights, num_tasks))


def breadcrumbs_ties_plan(magnitude: Callable[[int], Tensor], num_tasks: int, numel: int,
                          weights: Sequence[float] | None = None, density: PerTask = 0.9,
                          gamma: PerTask = 0.01, majority_sign_method: str = "total",
                          normalize: bool | None = None) -> BreadcrumbsTiesCombine:
    """Phase 1 of :func:`breadcrumbs_ties`: the same two cuts per task as :func:`breadcrumbs_plan`.

    ``magnitude(i)`` returns ``|tau_i|``, called once per task in order (see :func:`ties_plan`). `density` and
    `gamma`: one float for all tasks or one per task.
    """
    check_sign_method(majority_sign_method)
    cuts = _breadcrumbs_cuts(magnitude, num_tasks, numel, density, gamma)
    return BreadcrumbsTiesCombine(cuts, numel, weight_list(weights, num_tasks), majority_sign_method, normalize)


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Bool mask of the Breadcrumbs "middle band" of `tau` by magnitude.

    With ``N = numel``, ``k_top = int(gamma * N)`` and ``k_keep = min(int(density * N), N - k_top)``: in the
    order (``|tau|`` descending, flat index ascending; see :class:`MagnitudeCut`) the first ``k_top`` entries
    are dropped and the next ``k_keep`` kept, the rest dropped. Exactly ``k_keep`` entries are True.
    """
    mag = tau.abs()
    k_top, k_end = _breadcrumbs_counts(tau.numel(), density, gamma)
    return cut_mask(mag, magnitude_cut(mag, k_end)) & ~cut_mask(mag, magnitude_cut(mag, k_top))


# ---------------------------------------------------------------------------------------------- methods
def ties(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: PerTask = 0.2,
    majority_sign_method: str = "total",
    normalize: bool | None = None,
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

    ``normalize`` True / False switches steps 2-3 to mergekit's convention (``generalized_task_arithmetic``):
    the vote on ``w_i t_i``, and ``sum_i [agree] w_i t_i / sum_i [agree] w_i`` (True) or the plain agreeing
    sum (False); None (default) is peft's, above. Unit weights and True give the same result as None. `density` may be a sequence, one per task (``t_i`` trimmed to
    ``int(density_i * numel)`` entries). Not a sum of independent per-task terms (the election couples them).

    Computed by :func:`ties_plan` (one ``|tau_i|`` alive at a time) then :meth:`TiesCombine.run` in slices:
    besides the inputs, about one task vector plus a few slice-sized buffers are allocated.
    """
    dtype = check_tensors(task_vectors)
    plan = ties_plan(lambda i: task_vectors[i].to(dtype).abs(), len(task_vectors), task_vectors[0].numel(),
                     weights, density, majority_sign_method, normalize)
    return plan.run(task_vectors, dtype)


def dare_ties(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: PerTask = 0.5,
    majority_sign_method: str = "total",
    generator: Generators = None,
    normalize: bool | None = None,
    rescale: str | None = "probability",
) -> Tensor:
    """DARE + TIES (Yu et al. 2024; as ``peft.utils.merge_utils.dare_ties``).

    ``d_i = m_i tau_i / density`` (the DARE drop/rescale of :func:`dare_linear`, same masks for the same
    generators), then TIES steps 2-3 on the ``d_i``: sign election on the unweighted ``d_i`` and the weighted
    disjoint mean ``sum_i [sign(d_i) == s] w_i d_i / max(1, #agreeing)`` (see :func:`ties`). `density` may be
    a sequence, one per task (``d_i = m_i tau_i / density_i``). Not a sum of independent per-task terms.
    `rescale`: ``"probability"`` (the ``1 / density`` above, default), ``"l1"`` (``d_i = m_i tau_i ||tau_i||_1 /
    ||m_i tau_i||_1``, mergekit's ``rescale: true``) or None (``d_i = m_i tau_i``).
    """
    dtype = check_tensors(task_vectors)
    plan = dare_ties_plan(task_vectors[0].shape, len(task_vectors), weights, density, majority_sign_method,
                          generator, normalize, rescale, magnitude=lambda i: task_vectors[i].to(dtype).abs())
    return plan.run(task_vectors, dtype)


def breadcrumbs(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: PerTask = 0.9,
    gamma: PerTask = 0.01,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
    Sparse Masks", ECCV 2024): ``sum_i w_i (tau_i * breadcrumbs_mask(tau_i, density, gamma))``.

    Per task vector (over the whole tensor) the ``k_top = int(gamma * numel)`` largest-magnitude entries
    (outliers) are dropped, then the next ``int(density * numel)`` largest are kept and the smallest rest
    dropped. Requires ``gamma + density <= 1`` (validated by the spec; here the kept count is capped).
    `density` and `gamma` may be sequences, one per task. A sum of independent per-task terms.
    """
    dtype = check_tensors(task_vectors)
    plan = breadcrumbs_plan(lambda i: task_vectors[i].to(dtype).abs(), len(task_vectors),
                            task_vectors[0].numel(), weights, density, gamma)
    return plan.run(task_vectors, dtype)


def breadcrumbs_ties(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: PerTask = 0.9,
    gamma: PerTask = 0.01,
    majority_sign_method: str = "total",
    normalize: bool | None = None,
) -> Tensor:
    """Model Breadcrumbs with TIES (Davari & Belilovsky, ECCV 2024; mergekit's ``breadcrumbs_ties``).

    1. band: ``b_i = tau_i * breadcrumbs_mask(tau_i, density_i, gamma_i)`` (per task over the whole tensor: drop
       the top ``int(gamma_i * numel)`` magnitudes, keep the next ``int(density_i * numel)``, see
       :func:`breadcrumbs`);
    2. elect: ``s = sign(sum_i b_i)`` (``"total"``) or ``sign(sum_i sign(b_i))`` (``"frequency"``), ``+1``
       where the vote is 0, on the *unweighted* ``b_i``;
    3. disjoint mean: ``sum_i [sign(b_i) == s] w_i b_i / max(1, #{i : sign(b_i) == s})``.

    Steps 2-3 are exactly :func:`ties` with ``density = 1`` on the ``b_i`` (peft's weighting, see :func:`ties`).
    `density` and `gamma` may be sequences, one per task. Defaults as :func:`breadcrumbs`. Not a sum of
    independent per-task terms. Computed by :func:`breadcrumbs_ties_plan` then :meth:`SlicedCombine.run`, so
    the streaming engine can slice it bit-identically.
    """
    dtype = check_tensors(task_vectors)
    plan = breadcrumbs_ties_plan(lambda i: task_vectors[i].to(dtype).abs(), len(task_vectors),
                                 task_vectors[0].numel(), weights, density, gamma, majority_sign_method,
                                 normalize)
    return plan.run(task_vectors, dtype)
