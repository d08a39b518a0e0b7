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
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hf_atm.errors import CheckpointError, MergeConfigError

__all__ = [
    "KEEP_ALL",
    "SLICE_ELEMENTS",
    "BreadcrumbsCombine",
    "BreadcrumbsTiesCombine",
    "CutCursor",
    "DareTiesCombine",
    "MagnitudeCut",
    "SlicedCombine",
    "TaskMagnitudes",
    "TiesCombine",
    "average",
    "breadcrumbs_plan",
    "breadcrumbs_ties_plan",
    "dare_ties_plan",
    "magnitude_cut",
    "magnitude_cuts",
    "magnitude_cuts_streamed",
    "ties_plan",
    "breadcrumbs",
    "breadcrumbs_mask",
    "breadcrumbs_ties",
    "compute_dtype",
    "dare_linear",
    "dare_mask",
    "dare_ties",
    "della",
    "della_keep_probabilities",
    "della_linear",
    "della_prune",
    "iso_c",
    "l1_rescale",
    "magnitude_trim",
    "model_stock",
    "model_stock_ratio",
    "slerp",
    "slerp_coefficients",
    "task_arithmetic",
    "ties",
    "tsv",
]

Generators = torch.Generator | Sequence[torch.Generator] | None
#: A per-method option given once for all tasks (a float) or once per task vector (a sequence of floats).
PerTask = float | Sequence[float]


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


def _check_gamma(gamma: float, name: str = "gamma") -> None:
    if not 0.0 <= gamma < 1.0:
        raise MergeConfigError(f"{name} must be in [0, 1), got {gamma}")


def _per_task(value: PerTask, n: int, name: str) -> tuple[list[float], bool]:
    """(one float per task, whether `value` was a sequence); a wrong count is a MergeConfigError naming `name`."""
    if isinstance(value, numbers.Real):
        return [float(value)] * n, False
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise MergeConfigError(f"{name} must be a number or a sequence of numbers (one per task), got {value!r}")
    vals = [float(v) for v in value]
    if len(vals) != n:
        raise MergeConfigError(
            f"{name} has {len(vals)} entries but {n} task vectors were given (one {name} per task)"
        )
    return vals, True


def _densities(density: PerTask, n: int) -> list[float]:
    """One validated density in (0, 1] per task (see :func:`_per_task`)."""
    ds, listed = _per_task(density, n, "density")
    for i, d in enumerate(ds):
        _check_density(d, f"density[{i}]" if listed else "density")
    return ds


def _gammas(gamma: PerTask, n: int) -> list[float]:
    """One validated gamma in [0, 1) per task (see :func:`_per_task`)."""
    gs, listed = _per_task(gamma, n, "gamma")
    for i, g in enumerate(gs):
        _check_gamma(g, f"gamma[{i}]" if listed else "gamma")
    return gs


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


def _check_rescale(rescale: str | None) -> None:
    if rescale not in DELLA_RESCALE:
        raise MergeConfigError(f"rescale must be 'probability', 'l1' or None, got {rescale!r}")


def l1_rescale(tau: Tensor, masked: Tensor) -> Tensor:
    """``masked * (||tau||_1 / ||masked||_1)`` in place (mergekit's ``RescaleNorm.l1``); `masked` unchanged when
    either norm is below 1e-7."""
    before, after = tau.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked.mul_(before / after)


def _dare_drop(tau: Tensor, density: float, generator: torch.Generator | None, dtype: torch.dtype,
               rescale: str | None = "probability") -> Tensor:
    """DARE on one task vector: ``tau * mask`` rescaled by ``1 / density`` (``"probability"``), to the L1 norm of
    `tau` (``"l1"``) or not at all (None), with ``mask = dare_mask(...)`` (fresh tensor)."""
    mask = dare_mask(tau.shape, density, generator, device=tau.device)
    x = tau.to(dtype)
    if rescale == "probability":
        # (tau * mask) / density as peft computes it, so kept entries are exactly tau / density.
        return (x * mask).div_(density)
    masked = x * mask
    return l1_rescale(x, masked) if rescale == "l1" and density < 1.0 else masked


# ------------------------------------------------------------------------------- exact magnitude cuts
#: Slice size (elements) in which the whole-tensor methods run their element-wise second phase.
#: 64K float32 = 256 KB per buffer: a slice's dozens of element-wise temporaries stay in the CPU caches (measured
#: 1.9x faster for TIES than slices of 1M); the result does not depend on it.
SLICE_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class MagnitudeCut:
    """The first ``k`` entries of a flat tensor in the total order (``|x|`` descending, flat index ascending).

    They are every entry with ``|x| > threshold`` plus the first ``ties`` entries, in flat index order, with
    ``|x| == threshold`` (``threshold`` is the k-th largest magnitude). ``threshold = -inf`` selects everything
    (``k >= numel``), ``+inf`` with ``ties = 0`` nothing (``k = 0``).

    ``tie_end`` (when known; not part of equality, it restates the same selection): the flat index just past the
    last kept tie, so the selection is ``|x| >= threshold`` before it and ``|x| > threshold`` from it on (0 when
    ``ties == 0``; ``numel`` when every entry equal to the threshold is kept). It makes any slice's mask a
    function of the slice alone; None (a cut built by hand): :class:`CutCursor` counts the ties slice by slice.

    Tie rule: ``torch.topk`` (what peft uses) leaves its order among equal magnitudes unspecified; this cut keeps
    the earliest ones. So the selection equals peft's whenever the magnitudes at the cut are distinct (always,
    in practice, for continuous data), and it is the same whether the tensor is processed whole or in slices.
    """

    threshold: float
    ties: int
    tie_end: int | None = field(default=None, compare=False)
    #: whether every magnitude the cut was computed from is finite (None: not looked at); not part of equality
    finite: bool | None = field(default=None, compare=False)

    @property
    def keeps_all(self) -> bool:
        return self.threshold == -math.inf


KEEP_ALL = MagnitudeCut(-math.inf, 0)
KEEP_NONE = MagnitudeCut(math.inf, 0, 0)


def magnitude_cut(magnitudes: Tensor, k: int) -> MagnitudeCut:
    """The :class:`MagnitudeCut` selecting the ``k`` largest of `magnitudes` (``|tau|``, any shape, non-negative,
    no NaN); `magnitudes` is not modified. See :func:`magnitude_cuts` for the algorithm."""
    return magnitude_cuts(magnitudes, (k,))[0]


def magnitude_cuts(magnitudes: Tensor, ks: Sequence[int], *,
                   again: Callable[[], Tensor] | None = None) -> list[MagnitudeCut]:
    """One :class:`MagnitudeCut` per ``k`` in `ks` on the same `magnitudes`, from one selection pass.

    `again`: `magnitudes` is a scratch buffer the caller gives up, partitioned in place instead of copied, and
    ``again()`` computes the same magnitudes once more, in order, should a tie scan need them (then only).

    CPU float32 / float64 (float16 / bfloat16 are widened exactly to float32): one ``numpy.partition``
    (introselect, O(numel), exact) of a copy puts every requested order statistic in place, the k-th largest
    ``t`` at position ``p = numel - k`` with only entries ``<= t`` before it and ``>= t`` after; the entries
    ``> t`` are then counted in the ``k - 1`` after it (a ``min`` says "none equal" without counting), and a
    ``max`` of the ``p`` before it says whether an entry equal to ``t`` is left out. Only then (ties at the cut
    both kept and dropped, as on quantized data) is the original order scanned for ``tie_end``. Other devices:
    ``torch.kthvalue`` and counts. Either way ``threshold`` is the exact k-th largest value and ``ties = k -
    #{|x| > threshold}``: the same cut as a full sort would give.
    """
    flat = magnitudes.detach().reshape(-1)
    n = flat.numel()
    todo = sorted({int(k) for k in ks if 0 < k < n})
    found: dict[int, MagnitudeCut] = {}
    if todo:
        if flat.device.type == "cpu":
            if flat.dtype not in (torch.float32, torch.float64):
                flat = flat.float()  # exact: every float16 / bfloat16 value is a float32 value
            if again is not None and flat.data_ptr() == magnitudes.data_ptr() and flat.is_contiguous():
                found = _cuts_numpy(flat.numpy(), todo, again)
            else:
                found = _cuts_numpy(flat.contiguous().numpy(), todo)
        else:
            found = _cuts_torch(flat if flat.dtype in (torch.float32, torch.float64) else flat.float(), todo)
    return [KEEP_ALL if k >= n else KEEP_NONE if k <= 0 else found[int(k)] for k in ks]


def _cuts_numpy(a: Any, ks: Sequence[int], again: Callable[[], Tensor] | None = None) -> dict[int, MagnitudeCut]:
    """The cuts by one exact partition of a copy of `a`, or of `a` itself when `again` can recompute it (see
    :func:`magnitude_cuts`)."""
    import numpy as np

    n = a.size
    kth = sorted(n - k for k in ks)
    if again is None:
        part = np.partition(a, kth)  # a copy; `a` keeps its order for the tie scan
    else:
        a.partition(kth)
        part, a = a, None
    # NaN and Inf sort above every number, so into the top part: its max says whether every entry is finite
    finite = bool(np.isfinite(part[kth[-1]:].max()))
    cuts = {}
    for k in ks:
        p = n - k
        thr = part[p]
        right, left = part[p + 1:], part[:p]
        if right.size == 0 or right.min() > thr:
            above = right.size
        else:
            above = int(np.count_nonzero(right > thr))
        ties = k - above
        if p == 0 or left.max() < thr:
            tie_end = n  # every entry equal to the threshold is among the k
        elif not finite:
            tie_end = None  # NaN compares unequal to itself: count ties slice by slice (the inputs are refused)
        else:
            if a is None:
                assert again is not None
                a = again().detach().reshape(-1).to(torch.float32 if part.dtype == np.float32 else torch.float64)
                a = a.contiguous().numpy()
            tie_end = _tie_end_numpy(a, thr, ties)
        cuts[k] = MagnitudeCut(float(thr), ties, tie_end, finite)
    return cuts


#: Elements per step of the scan for the ties kept at a cut.
_TIE_SCAN = 1 << 20


class TaskMagnitudes:
    """``|model - base|`` of one task vector, computed in `dtype` on demand and never stored whole: by chunks
    (:meth:`chunk`), a strided sample (:meth:`strided`) or, when really needed, whole (:meth:`whole`). Each
    element is the same float as in ``(model - base.to(dtype)).abs()``. `done` runs once the cuts are made
    (e.g. to drop the model's pages)."""

    def __init__(self, model: Tensor, base: Tensor, dtype: torch.dtype,
                 done: Callable[[], None] | None = None) -> None:
        self.model, self.base = model.reshape(-1), base.reshape(-1)
        self.dtype = dtype
        self.numel = self.model.numel()
        self.device = self.model.device
        self._done = done

    def chunk(self, start: int, stop: int) -> Tensor:
        return (self.model[start:stop] - self.base[start:stop].to(self.dtype)).abs_()

    def strided(self, step: int) -> Tensor:
        return (self.model[::step] - self.base[::step].to(self.dtype)).abs_()

    def whole(self) -> Tensor:
        return self.chunk(0, self.numel)

    def done(self) -> None:
        if self._done is not None:
            self._done()
            self._done = None


#: Elements per chunk of a streamed pass over a task's magnitudes (1 MB of float32: in the caches).
_STREAM_CHUNK = 1 << 18
#: Streamed cuts from this size on (smaller tensors are partitioned whole).
_STREAM_MIN = 1 << 16
#: Sample stride of the streamed cut's bracket.
_SAMPLE_STRIDE = 64


def magnitude_cuts_streamed(source: TaskMagnitudes, ks: Sequence[int]) -> list[MagnitudeCut]:
    """:func:`magnitude_cuts` of a task's magnitudes without storing them: one pass over chunks, usually.

    A sorted strided sample (every 64th magnitude) brackets each k-th largest in ``[lo, hi]`` (sample ranks
    about 4 standard deviations either side of the expected one). One pass over cache-sized chunks counts the
    entries ``> hi`` (``above``) and gathers those in ``[lo, hi]``; when ``1 <= k - above <= #gathered``, the k-th
    largest is exactly the ``(k - above)``-th largest gathered one (every larger entry was counted, every
    smaller one is below ``lo``), found by an exact partition of that small set; all entries equal to it are
    among the gathered ones, so ``ties`` and "every equal entry kept" are exact too; only when some equal
    entries are dropped does a second pass look for ``tie_end`` in flat order. The same cut as
    :func:`magnitude_cuts` on the whole tensor, which is what is done instead, for that k, when k is too near
    either end for a bracket, the bracket misses or would gather more than an eighth of the tensor, and for
    every k when a magnitude is NaN / Inf or the data are not CPU float32.
    """
    n = source.numel
    todo = sorted({int(k) for k in ks if 0 < k < n})
    found: dict[int, MagnitudeCut] = {}
    if todo and source.device.type == "cpu" and source.dtype == torch.float32 and n >= _STREAM_MIN:
        found = _cuts_streamed(source, todo)
    rest = [k for k in todo if k not in found]
    if rest:
        found.update(zip(rest, magnitude_cuts(source.whole(), rest, again=source.whole)))
    return [KEEP_ALL if k >= n else KEEP_NONE if k <= 0 else found[int(k)] for k in ks]


def _cuts_streamed(source: TaskMagnitudes, ks: Sequence[int]) -> dict[int, MagnitudeCut]:
    """The cuts of the `ks` the bracket finds (see :func:`magnitude_cuts_streamed`); the others are left out."""
    import numpy as np

    n = source.numel
    sample = np.sort(source.strided(_SAMPLE_STRIDE).numpy())
    m = sample.size
    brackets = {}
    for k in ks:
        r = k * m / n  # expected rank from the top of the k-th largest inside the sample
        margin = 4.0 * math.sqrt(max(r * (1.0 - r / m), 1.0)) + 8.0
        hi_rank, lo_rank = math.floor(r - margin), math.ceil(r + margin)
        if hi_rank >= 1 and lo_rank <= m:  # else too close to either end for a bracket
            brackets[k] = (sample[m - lo_rank], sample[m - hi_rank])
    if not brackets:
        return {}
    above = dict.fromkeys(brackets, 0)
    gathered: dict[int, list] = {k: [] for k in brackets}
    count = dict.fromkeys(brackets, 0)
    limit = max(n // 8, 1)
    for start in range(0, n, _STREAM_CHUNK):
        x = source.chunk(start, min(n, start + _STREAM_CHUNK)).numpy()
        if not np.isfinite(x.max()):
            return {}  # NaN / Inf: the whole-tensor path (which records it) decides
        for k in list(brackets):
            lo, hi = brackets[k]
            above[k] += int(np.count_nonzero(x > hi))
            inside = x >= lo
            inside &= x <= hi
            picked = x[inside]
            gathered[k].append(picked)
            count[k] += picked.size
            if count[k] > limit:  # too many values at the cut to gather: the whole-tensor path
                del brackets[k], gathered[k]
        if not brackets:
            return {}
    cuts = {}
    for k in brackets:
        need = k - above[k]
        cand = np.concatenate(gathered[k])
        if not 1 <= need <= cand.size:
            continue  # the bracket missed
        p = cand.size - need
        cand.partition(p)
        thr = cand[p]
        ties = k - above[k] - int(np.count_nonzero(cand[p + 1:] > thr))
        equal = int(np.count_nonzero(cand == thr))
        tie_end = n if equal == ties else _tie_end_streamed(source, thr, ties)
        cuts[k] = MagnitudeCut(float(thr), ties, tie_end, True)
    return cuts


def _tie_end_streamed(source: TaskMagnitudes, thr: Any, ties: int) -> int:
    """:func:`_tie_end_numpy` over the source's chunks."""
    import numpy as np

    seen = 0
    for s in range(0, source.numel, _STREAM_CHUNK):
        eq = source.chunk(s, min(source.numel, s + _STREAM_CHUNK)).numpy() == thr
        c = int(np.count_nonzero(eq))
        if seen + c >= ties:
            return s + int(np.flatnonzero(eq)[ties - seen - 1]) + 1
        seen += c
    raise AssertionError("fewer entries equal to the threshold than ties")  # pragma: no cover


def _tie_end_numpy(a: Any, thr: Any, ties: int) -> int:
    """1 + the flat index of the `ties`-th entry of `a` equal to `thr` (``ties >= 1``; there are more)."""
    import numpy as np

    seen = 0
    for s in range(0, a.size, _TIE_SCAN):
        eq = a[s:s + _TIE_SCAN] == thr
        c = int(np.count_nonzero(eq))
        if seen + c >= ties:
            return s + int(np.flatnonzero(eq)[ties - seen - 1]) + 1
        seen += c
    raise AssertionError("fewer entries equal to the threshold than ties")  # pragma: no cover


def _cuts_torch(flat: Tensor, ks: Sequence[int]) -> dict[int, MagnitudeCut]:
    n = flat.numel()
    cuts = {}
    for k in ks:
        thr = torch.kthvalue(flat, n - k + 1).values
        above = int(torch.count_nonzero(flat > thr))
        ties = k - above
        at = flat == thr
        if int(torch.count_nonzero(at)) == ties:
            tie_end = n
        else:
            tie_end = int(at.nonzero().view(-1)[ties - 1]) + 1
        cuts[k] = MagnitudeCut(float(thr), ties, tie_end)
    return cuts


def _kth_largest(flat: Tensor, k: int) -> float:
    """The k-th largest of the 1-D `flat` (``1 <= k < numel``, no NaN), exactly (see :func:`magnitude_cuts`)."""
    return magnitude_cuts(flat, (k,))[0].threshold


def _trim_ok(values: Tensor, threshold: float) -> bool:
    """Whether :func:`_keep_above` / :func:`_keep_at_least` apply: float32 / float64 `values` and a threshold that
    is 0, +inf, or a normal number of that dtype (no subnormal: exact even where denormals flush to zero)."""
    if values.dtype not in (torch.float32, torch.float64):
        return False
    if threshold == 0.0 or threshold == math.inf:
        return True
    info = torch.finfo(values.dtype)
    if not info.tiny <= threshold <= info.max:
        return False
    if values.dtype == torch.float32:
        import numpy as np

        return float(np.float32(threshold)) == threshold
    return True


def _keep_above(values: Tensor, threshold: float) -> Tensor:
    """`values` where ``|values| > threshold``, 0 elsewhere (``hardshrink``: one element-wise pass, no mask)."""
    if threshold == math.inf:
        return torch.zeros_like(values)
    return torch.nn.functional.hardshrink(values, threshold)


def _keep_at_least(values: Tensor, threshold: float) -> Tensor:
    """`values` where ``|values| >= threshold``, 0 elsewhere: :func:`_keep_above` of the next value below the
    threshold in `values`' dtype (no value lies strictly between the two); `values` itself when threshold is 0."""
    if threshold == 0.0:
        return values
    if threshold == math.inf:
        return _keep_above(values, threshold)
    if values.dtype == torch.float32:
        import numpy as np

        below = float(np.nextafter(np.float32(threshold), np.float32(0.0)))
    else:
        below = math.nextafter(threshold, 0.0)
    return torch.nn.functional.hardshrink(values, below)


class CutCursor:
    """Applies a :class:`MagnitudeCut` to consecutive flat slices of its tensor, visited in order from 0.

    With the cut's ``tie_end`` known, a slice's selection is ``|x| >= threshold`` before it and ``|x| >
    threshold`` from it on; otherwise the cursor counts the tie entries (``|x| == threshold``) kept so far. Either
    way the union of the slice masks is exactly the cut's selection whatever the slice sizes.

    :meth:`mask` / :meth:`trim` check the order of the slices; a :attr:`stateless` cursor (``tie_end`` known, or a
    cut that keeps all) also answers :meth:`mask_at` / :meth:`trim_at` for any slice, in any order and from any
    thread, without moving.
    """

    def __init__(self, cut: MagnitudeCut) -> None:
        self.cut = cut
        self.ties_left = cut.ties
        self.position = 0
        self._last = (0, cut.ties)  # (start, ties_left before it) of the slice visited last

    @property
    def stateless(self) -> bool:
        """Whether a slice's selection depends on the slice alone (no tie counting)."""
        return self.cut.keeps_all or self.cut.tie_end is not None

    def _advance(self, start: int, numel: int) -> None:
        if start != self.position:
            raise RuntimeError(f"slices must be visited in order: expected start {self.position}, got {start}")
        self._last = (start, self.ties_left)
        self.position += numel

    def mask(self, magnitudes: Tensor, start: int) -> Tensor:
        """Bool keep-mask of the flat slice ``[start, start + len)`` whose magnitudes are given."""
        self._advance(start, magnitudes.numel())
        keep, used = self._mask(magnitudes, start, self.ties_left)
        self.ties_left -= used
        return keep

    def last_mask(self, magnitudes: Tensor) -> Tensor:
        """The keep-mask of the slice visited last (by :meth:`mask` or :meth:`trim`), its magnitudes given again;
        the cursor does not move."""
        start, ties_left = self._last
        return self._mask(magnitudes, start, ties_left)[0]

    def trim(self, values: Tensor, start: int) -> Tensor:
        """The flat slice ``[start, start + len)`` of the task vector with the entries outside the cut zeroed
        (``where(mask(|values|), values, 0)`` up to the sign of the zeros; `values` itself when the cut keeps all).

        With ``tie_end`` known and a float32 / float64 slice: one or two ``hardshrink`` passes, no bool mask.
        """
        self._advance(start, values.numel())
        if self.stateless:
            return self.trim_at(values, start)
        keep, used = self._mask(values.abs(), start, self.ties_left)
        self.ties_left -= used
        return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))

    def mask_at(self, magnitudes: Tensor, start: int) -> Tensor:
        """:meth:`mask` of the slice at `start` for a :attr:`stateless` cursor (which does not move)."""
        self._need_stateless()
        return self._mask(magnitudes, start, 0)[0]

    def trim_at(self, values: Tensor, start: int) -> Tensor:
        """:meth:`trim` of the slice at `start` for a :attr:`stateless` cursor (which does not move)."""
        self._need_stateless()
        cut = self.cut
        if cut.keeps_all:
            return values
        te, thr = cut.tie_end, cut.threshold
        assert te is not None
        if not _trim_ok(values, thr):
            keep = self._mask(values.abs(), start, 0)[0]
            return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
        stop = start + values.numel()
        if te <= start:
            return _keep_above(values, thr)
        if te >= stop:
            return _keep_at_least(values, thr)
        flat = values.reshape(-1)
        out = _keep_above(flat, thr)
        out[: te - start] = _keep_at_least(flat[: te - start], thr)
        return out.view(values.shape)

    def _need_stateless(self) -> None:
        if not self.stateless:
            raise RuntimeError("this cut counts its ties slice by slice (no tie_end): visit the slices in order")

    def _mask(self, magnitudes: Tensor, start: int, ties_left: int) -> tuple[Tensor, int]:
        """(keep-mask of the slice at `start`, ties it keeps) with `ties_left` ties still to keep."""
        cut = self.cut
        if cut.keeps_all:
            return torch.ones(magnitudes.shape, dtype=torch.bool, device=magnitudes.device), 0
        te = cut.tie_end
        if te is not None:
            stop = start + magnitudes.numel()
            if te <= start:
                return magnitudes > cut.threshold, 0
            if te >= stop:
                return magnitudes >= cut.threshold, 0
            flat = magnitudes.reshape(-1)
            keep = flat > cut.threshold
            keep[: te - start] = flat[: te - start] >= cut.threshold
            return keep.view(magnitudes.shape), 0
        keep = magnitudes > cut.threshold
        used = 0
        if ties_left > 0:
            at = (magnitudes == cut.threshold).nonzero().view(-1)[:ties_left]
            keep[at] = True
            used = at.numel()
        return keep, used

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


def _elect_and_mean_slice(
    values: Sequence[Tensor], keeps: Sequence[Tensor | None], weights: list[float] | None, majority_sign_method: str,
    normalize: bool | None = None,
) -> Tensor:
    """TIES steps 2-3 on one slice (see :func:`_elect_reference` for the definition).

    Without masks it runs :func:`_elect_fast` (the same bits with element-wise float arithmetic only); masks, or
    a non-finite entry, take the reference.
    """
    if all(k is None for k in keeps):
        out = _elect_fast(values, weights, majority_sign_method, normalize)
        if out is not None:
            return out
    return _elect_reference(values, keeps, weights, majority_sign_method, normalize)


def _finite(t: Tensor) -> bool:
    """No NaN / Inf in `t` (one ``aminmax``: NaN propagates, an Inf is an extreme)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _elect_fast(values: Sequence[Tensor], weights: list[float] | None, majority_sign_method: str,
                normalize: bool | None = None) -> Tensor | None:
    """:func:`_elect_reference` with no masks, bit for bit, or None when the result has a NaN / Inf.

    The reference's ``where`` / ``==`` / bool steps become exact float arithmetic on signs in {-1, 0, +1}:
    the elected sign ``where(votes >= 0, 1, -1)`` is ``copysign(1, votes + 0)`` (+1 for +-0, as ``-0 >= 0``);
    task i agrees where ``a_i = max(sign(t_i) * s, 0)`` is 1 (else 0, of either sign), so ``where(agree, term,
    0)`` is ``term * a_i`` (exact) and the bool counts are the sums of the ``a_i``. Both sides add the same
    nonzero values in the same order; the extra terms are zeros, which leave a nonzero sum unchanged, so the
    sums agree up to the sign of a zero; the reference's never is -0 (it starts at +0 and only exact
    cancellation reaches zero again: +0), so adding +0 at the end makes them equal bit for bit. A zero's sign
    in `values` never matters (zeros never agree; votes only meet ``>= 0``). That holds for finite terms: an
    Inf / NaN term makes ``term * 0`` NaN here, so a non-finite result is handed back to the reference.
    """
    if normalize is not None and weights is not None:
        weighted = [v * weights[i] for i, v in enumerate(values)]  # mergekit: the vote on w_i t_i
    else:
        weighted = list(values)  # read only: no copy
    signs = [t.sign() for t in weighted]
    src = weighted if majority_sign_method == "total" else signs
    votes = src[0] + src[1] if len(src) > 1 else src[0].clone()
    for term in src[2:]:
        votes.add_(term)
    # where(votes >= 0, 1, -1): -0 made +0 (adding +0 changes nothing else), then its sign put on 1
    elected = torch.ones((), dtype=votes.dtype, device=votes.device).copysign(votes.add_(0.0))
    del votes
    total: Tensor | None = None
    count: Tensor | None = None
    for i, (v, sign) in enumerate(zip(weighted, signs)):
        agree = sign.mul_(elected).clamp_(min=0)  # signs[i]'s buffer, not needed after
        term = v * weights[i] if normalize is None and weights is not None else v
        if total is None:
            total = term * agree
        else:
            total.addcmul_(term, agree)
        if normalize is None:
            count = agree if count is None else count.add_(agree)
        elif normalize:
            w = 1.0 if weights is None else weights[i]
            count = agree.mul_(w) if count is None else count.add_(agree, alpha=w)
    assert total is not None
    total.add_(0.0)  # the reference's sum starts at +0: a -0 here (no agreeing term yet) is +0 there
    if normalize is None:
        assert count is not None
        out = total.div_(count.clamp_(min=1))
    elif normalize:
        assert count is not None
        # where(divisor == 0, 1, divisor): + (1 - sign(|divisor|)) adds 1 to a zero, +0 to anything else
        out = total.div_(count.add_(count.abs().sign_().neg_().add_(1.0)))
    else:
        out = total
    return out if _finite(out) else None


def _elect_reference(
    values: Sequence[Tensor], keeps: Sequence[Tensor | None], weights: list[float] | None, majority_sign_method: str,
    normalize: bool | None = None,
) -> Tensor:
    """TIES steps 2-3 on one slice, accumulated task by task (element-wise, so slicing never changes a bit).

    ``t_i = values_i`` where ``keeps_i`` (all of it when None), else 0. ``total``: s = sign(sum_i t_i);
    ``frequency``: s = sign(sum_i sign(t_i)); s = +1 where that vote is 0. Task i agrees where
    ``sign(t_i) == s`` (zeros never agree). Result ``sum_i [agree_i] w_i t_i / max(1, #agree)`` (peft).

    `normalize` True / False selects mergekit's convention instead: the vote runs on the weighted ``w_i t_i``, and
    the result is ``sum_i [agree_i] w_i t_i`` divided by ``sum_i [agree_i] w_i`` (True; 1 where that is 0) or
    by nothing (False). With unit weights, True equals peft's.
    """
    if normalize is not None:
        return _elect_weighted_slice(values, keeps, weights, majority_sign_method, normalize)
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


def _elect_weighted_slice(
    values: Sequence[Tensor], keeps: Sequence[Tensor | None], weights: list[float] | None, majority_sign_method: str,
    normalize: bool,
) -> Tensor:
    """mergekit's consensus (``generalized_task_arithmetic.get_mask``) on one slice: see :func:`_elect_and_mean_slice`."""
    zero = torch.zeros((), dtype=values[0].dtype, device=values[0].device)
    weighted = []
    votes: Tensor | None = None
    for i, (v, keep) in enumerate(zip(values, keeps)):
        t = v if keep is None else torch.where(keep, v, zero)
        t = t * weights[i] if weights is not None else t.clone()
        weighted.append(t)
        term = t if majority_sign_method == "total" else t.sign()
        votes = term.clone() if votes is None else votes.add_(term)
    assert votes is not None
    elected = torch.where(votes >= 0, 1.0, -1.0).to(votes.dtype)
    del votes
    total = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected) if normalize else None
    for i, t in enumerate(weighted):
        agree = t.sign() == elected
        total.add_(torch.where(agree, t, zero))
        if divisor is not None:
            divisor.add_(agree, alpha=1.0 if weights is None else weights[i])
    if divisor is None:
        return total
    return total.div_(torch.where(divisor == 0, 1.0, divisor))


def _check_sign_method(majority_sign_method: str) -> None:
    if majority_sign_method not in ("total", "frequency"):
        raise MergeConfigError(
            f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}"
        )


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
        out = _elect_fast(trimmed, self.weights, self.majority_sign_method, self.normalize)
        if out is not None:
            return out
        keeps = [None if c.cut.keeps_all else mask(c, t.abs()) for c, t in zip(self.cursors, task_slices)]
        return _elect_reference(task_slices, keeps, self.weights, self.majority_sign_method, self.normalize)


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
        self.densities = _per_task(density, len(self.masks), "density")[0]
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
        return _elect_and_mean_slice(dropped, [None] * len(dropped), self.weights, self.majority_sign_method,
                                     self.normalize)


class BreadcrumbsCombine(SlicedCombine):
    """Phase 2 of :func:`breadcrumbs`: ``sum_i w_i tau_i [in band_i]`` with the band between two cuts."""

    def __init__(self, cuts: Sequence[tuple[MagnitudeCut, MagnitudeCut]], numel: int,
                 weights: list[float] | None) -> None:
        super().__init__(numel, weights)
        self.cursors = [(CutCursor(top), CutCursor(upto)) for top, upto in cuts]

    def _bands(self, task_slices: Sequence[Tensor], start: int) -> list[Tensor]:
        """Each task's band mask (bool) on the slice starting at `start` (advances the cursors)."""
        bands = []
        for t, (top, upto) in zip(task_slices, self.cursors):
            mag = t.abs()
            bands.append(upto.mask(mag, start) & ~top.mask(mag, start))
        return bands

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
        out = _elect_fast(banded, self.weights, self.majority_sign_method, self.normalize)
        if out is not None:
            return out
        return _elect_reference(task_slices, self._last_bands(task_slices, start), self.weights,
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
    ds = _densities(density, num_tasks)
    _check_sign_method(majority_sign_method)
    scratch = _Scratch(magnitude)
    cuts = [KEEP_ALL if d >= 1.0 else scratch.cuts(i, (int(d * numel),))[0] for i, d in enumerate(ds)]
    return TiesCombine(cuts, numel, _weights(weights, num_tasks), majority_sign_method, normalize)


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
    ds = _densities(density, num_tasks)
    _check_sign_method(majority_sign_method)
    _check_rescale(rescale)
    gens = _generator_list(generator, num_tasks)
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
    return DareTiesCombine(masks, ds, _weights(weights, num_tasks), majority_sign_method, normalize, factors)


def _breadcrumbs_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(k_top, k_top + k_keep): the band is the entries ranked in ``[k_top, k_top + k_keep)`` by magnitude."""
    k_top = int(gamma * numel)
    k_keep = min(int(density * numel), numel - k_top)
    return k_top, k_top + k_keep


def _breadcrumbs_cuts(magnitude: Callable[[int], Tensor], num_tasks: int, numel: int, density: PerTask,
                      gamma: PerTask) -> list[tuple[MagnitudeCut, MagnitudeCut]]:
    ds, gs = _densities(density, num_tasks), _gammas(gamma, num_tasks)
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
    return BreadcrumbsCombine(cuts, numel, _weights(weights, num_tasks))


def breadcrumbs_ties_plan(magnitude: Callable[[int], Tensor], num_tasks: int, numel: int,
                          weights: Sequence[float] | None = None, density: PerTask = 0.9,
                          gamma: PerTask = 0.01, majority_sign_method: str = "total",
                          normalize: bool | None = None) -> BreadcrumbsTiesCombine:
    """Phase 1 of :func:`breadcrumbs_ties`: the same two cuts per task as :func:`breadcrumbs_plan`.

    ``magnitude(i)`` returns ``|tau_i|``, called once per task in order (see :func:`ties_plan`). `density` and
    `gamma`: one float for all tasks or one per task.
    """
    _check_sign_method(majority_sign_method)
    cuts = _breadcrumbs_cuts(magnitude, num_tasks, numel, density, gamma)
    return BreadcrumbsTiesCombine(cuts, numel, _weights(weights, num_tasks), majority_sign_method, normalize)


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
    dtype = _check(task_vectors)
    plan = ties_plan(lambda i: task_vectors[i].to(dtype).abs(), len(task_vectors), task_vectors[0].numel(),
                     weights, density, majority_sign_method, normalize)
    return plan.run(task_vectors, dtype)


def dare_linear(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: PerTask = 0.5,
    generator: Generators = None,
    rescale: str | None = "probability",
) -> Tensor:
    """DARE + linear sum (Yu et al., "Language Models are Super Mario", ICML 2024): ``sum_i w_i m_i tau_i / density``.

    `density` may be a sequence, one per task (``m_i`` keeps with probability ``density_i`` and task i is
    rescaled by ``1 / density_i``). A sum of independent per-task terms.

    ``m_i = dare_mask(shape, density, g_i)``: each entry kept independently with probability `density` and the
    kept ones rescaled by ``1 / density`` (peft's convention, unbiased: ``E[result] = sum_i w_i tau_i``).
    `generator`: a sequence gives one generator per task (``g_i``, what the dispatcher passes so that the
    mask of task i does not depend on the other tasks); a single generator draws the masks in task order;
    None uses torch's global RNG. Masks are drawn on the CPU and moved to the tensors' device. `rescale`:
    ``"probability"`` (``1 / density``, default), ``"l1"`` (each kept vector scaled back to its task vector's L1
    norm, mergekit's ``rescale: true``) or None (no rescale).
    """
    dtype = _check(task_vectors)
    _check_rescale(rescale)
    ds = _densities(density, len(task_vectors))
    w = _weights(weights, len(task_vectors))
    gens = _generator_list(generator, len(task_vectors))
    out: Tensor | None = None
    for i, (tau, g) in enumerate(zip(task_vectors, gens)):
        term = _dare_drop(tau, ds[i], g, dtype, rescale)
        if w is not None:
            term.mul_(w[i])
        out = term if out is None else out.add_(term)
    assert out is not None
    return out


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
    dtype = _check(task_vectors)
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
    dtype = _check(task_vectors)
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
    dtype = _check(task_vectors)
    plan = breadcrumbs_ties_plan(lambda i: task_vectors[i].to(dtype).abs(), len(task_vectors),
                                 task_vectors[0].numel(), weights, density, gamma, majority_sign_method,
                                 normalize)
    return plan.run(task_vectors, dtype)


# ----------------------------------------------------------------------------------------------- DELLA
#: DELLA rescaling modes: ``"probability"`` (the paper: kept entries / their keep probability), ``"l1"``
#: (mergekit 0.1.5's ``rescale: true``: match the task vector's L1 norm) and None (no rescaling).
DELLA_RESCALE = ("probability", "l1", None)


def _della_options(task_vectors: Sequence[Tensor], density: PerTask, epsilon: PerTask,
                   rescale: str | None) -> tuple[list[float], list[float]]:
    n = len(task_vectors)
    ds = _densities(density, n)
    es, listed = _per_task(epsilon, n, "epsilon")
    for i, (d, e) in enumerate(zip(ds, es)):
        _check_della(d, e, f"epsilon[{i}]" if listed else "epsilon")
    _check_rescale(rescale)
    return ds, es


def _check_della(density: float, epsilon: float, name: str = "epsilon") -> None:
    """mergekit 0.1.5's rule: for ``density < 1``, ``density - epsilon > 0`` and ``density + epsilon < 1``."""
    if not epsilon >= 0.0:
        raise MergeConfigError(f"{name} must be >= 0, got {epsilon}")
    if density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise MergeConfigError(
            f"{name}: density +/- epsilon must lie in (0, 1), got density={density}, epsilon={epsilon}"
        )


def della_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probabilities ``p`` (same shape as `tau`, compute dtype), as mergekit 0.1.5.

    Tensors with fewer than 2 dims are viewed as one row (``(1, numel)``). Along dim 1 (within each row of a
    matrix; along dim 1 for each index of the other dims of a higher-rank tensor) entries are ranked by
    ``|tau|`` ascending, ``r = 1..n`` (equal magnitudes: earlier index, lower rank; mergekit's unstable
    argsort leaves that order unspecified), and ``p = (density - epsilon) + ((r - 1) / (n - 1)) * 2 * epsilon``:
    linear in the rank from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest), mean
    ``density`` in every row. A row of one entry (``n = 1``, where mergekit divides 0 by 0) gets
    ``(density - epsilon) + epsilon``. Ranks are exact integers in the compute dtype (mergekit uses the tensor
    dtype on GPU, so ranks above 256 round in bfloat16 there) and every step is one IEEE operation, so the
    probabilities are the same on every device. No validation here (see :func:`della_prune`).
    """
    dtype = compute_dtype([tau])
    x = tau.to(dtype)
    rows = x.reshape(1, 1) if x.dim() == 0 else (x.unsqueeze(0) if x.dim() == 1 else x)
    mag = rows.abs()
    n = mag.shape[1]
    if n == 1:
        rank_norm = torch.full_like(mag, 0.5)
    else:
        order = torch.argsort(mag, dim=1, stable=True)  # ascending
        view = [1] * mag.dim()
        view[1] = n
        positions = torch.arange(1, n + 1, dtype=order.dtype, device=order.device).view(view).expand_as(order)
        ranks = torch.empty_like(order).scatter_(1, order, positions).to(dtype)  # argsort(argsort) + 1
        del order, positions
        # mergekit: ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1) with min 1 and max n, divided by
        # a tensor (not a Python scalar, which CUDA turns into a multiplication by the reciprocal).
        span = torch.tensor(float(n - 1), dtype=dtype, device=ranks.device)
        rank_norm = ranks.sub_(1).div_(span).clamp_(0, 1)
    probs = rank_norm.mul_(2).mul_(epsilon).add_(density - epsilon)
    return probs.view(tau.shape)


def della_prune(
    tau: Tensor,
    density: float = 0.5,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
    rescale: str | None = "probability",
) -> Tensor:
    """DELLA's MagPrune on one task vector (Deep et al., "DELLA-Merging: Reducing Interference in Model
    Merging through Magnitude-Based Sampling", 2024), in the compute dtype (a fresh tensor).

    ``p = della_keep_probabilities(tau, density, epsilon)``; entry j kept iff ``U_j < p_j`` (``p`` rounded to
    float32, the precision of ``U``) with ``U = torch.rand(tau.shape, generator)`` drawn on the CPU as
    :func:`dare_mask` does and moved to `tau`'s device (seeded, device-independent). Then with ``m`` the mask:

    * ``rescale="probability"`` (default, the paper's): ``tau * m / p``, unbiased (``E = tau``);
    * ``rescale="l1"`` (what mergekit 0.1.5 does with its default ``rescale: true``): ``tau * m *
      (||tau||_1 / ||tau * m||_1)``, left unscaled when either norm is below 1e-7;
    * ``rescale=None`` (mergekit's ``rescale: false``): ``tau * m``.

    ``density = 1`` returns `tau` (in the compute dtype) untouched and draws nothing, as mergekit. Validated as
    mergekit does (no clamping): ``density`` in (0, 1], ``epsilon >= 0`` and, for ``density < 1``,
    ``0 < density - epsilon`` and ``density + epsilon < 1``. With ``epsilon = 0`` every ``p_j = density`` and
    the mask is exactly :func:`dare_mask` with the same generator, so ``della_prune`` equals DARE's drop.
    """
    dtype = _check([tau])
    ds, es = _della_options([tau], density, epsilon, rescale)
    return _della_prune(tau, ds[0], es[0], generator, rescale, dtype)


def _della_prune(tau: Tensor, density: float, epsilon: float, generator: torch.Generator | None,
                 rescale: str | None, dtype: torch.dtype) -> Tensor:
    x = tau.to(dtype)
    if density >= 1.0:
        return x.clone() if x is tau else x
    probs = della_keep_probabilities(x, density, epsilon)
    u = torch.rand(tuple(tau.shape), generator=generator, device="cpu", dtype=torch.float32).to(tau.device)
    keep = u < probs.to(torch.float32)
    del u
    masked = x * keep
    if rescale == "probability":
        return masked.div_(probs)
    if rescale == "l1":
        return l1_rescale(x, masked)
    return masked


def della(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: PerTask = 0.5,
    epsilon: PerTask = 0.15,
    majority_sign_method: str = "total",
    generator: Generators = None,
    rescale: str | None = "probability",
    normalize: bool | None = None,
) -> Tensor:
    """DELLA-Merging (Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling", 2024; mergekit's ``della``): MagPrune, then TIES' election and disjoint mean.

    1. drop: ``d_i = della_prune(tau_i, density_i, epsilon_i, g_i, rescale)`` (keep probabilities linear in the
       row-wise magnitude rank within ``density_i +- epsilon_i``, kept entries divided by their probability);
    2. elect: ``s = sign(sum_i d_i)`` (``"total"``) or ``sign(sum_i sign(d_i))`` (``"frequency"``), ``+1``
       where the vote is 0, on the *unweighted* ``d_i``;
    3. disjoint mean: ``sum_i [sign(d_i) == s] w_i d_i / max(1, #agreeing)`` (peft's TIES weighting, as
       :func:`ties`; mergekit elects on ``w_i d_i`` and divides by the sum of the agreeing weights instead:
       the same for unit weights).

    Defaults: ``epsilon = 0.15`` is mergekit's default; ``density = 0.5`` is this module's DARE default
    (mergekit's default density is 1, which disables the drop). `density` and `epsilon` may be sequences,
    one per task. `generator`: one per task (what the dispatcher should pass) or one shared in task order,
    as :func:`dare_linear`. Not a sum of independent per-task terms; needs the whole tensor (row ranks).
    """
    dtype = _check(task_vectors)
    ds, es = _della_options(task_vectors, density, epsilon, rescale)
    _check_sign_method(majority_sign_method)
    w = _weights(weights, len(task_vectors))
    gens = _generator_list(generator, len(task_vectors))
    dropped = [_della_prune(t, ds[i], es[i], gens[i], rescale, dtype).reshape(-1)
               for i, t in enumerate(task_vectors)]
    # steps 2-3 are element-wise: run them in slices to bound the temporaries (same bits as one call)
    out = torch.empty_like(dropped[0])
    for start in range(0, out.numel(), SLICE_ELEMENTS):
        stop = start + SLICE_ELEMENTS
        out[start:stop] = _elect_and_mean_slice([d[start:stop] for d in dropped], [None] * len(dropped), w,
                                                majority_sign_method, normalize)
    return out.view(task_vectors[0].shape)


def della_linear(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: PerTask = 0.5,
    epsilon: PerTask = 0.15,
    generator: Generators = None,
    rescale: str | None = "probability",
) -> Tensor:
    """Linear DELLA (Deep et al. 2024; mergekit's ``della_linear``): ``sum_i w_i d_i`` with
    ``d_i = della_prune(tau_i, density_i, epsilon_i, g_i, rescale)`` (see :func:`della`, same defaults and
    the same ``d_i`` for the same generators).

    No normalisation by the weights (mergekit's ``della_linear`` default ``normalize: false`` too). A sum of
    independent per-task terms (``d_i`` depends on ``tau_i`` and ``g_i`` only).
    """
    dtype = _check(task_vectors)
    ds, es = _della_options(task_vectors, density, epsilon, rescale)
    w = _weights(weights, len(task_vectors))
    gens = _generator_list(generator, len(task_vectors))
    out: Tensor | None = None
    for i, (tau, g) in enumerate(zip(task_vectors, gens)):
        term = _della_prune(tau, ds[i], es[i], g, rescale, dtype)
        if w is not None:
            term = term.mul_(w[i])
        out = term if out is None else out.add_(term)
    assert out is not None
    return out


# ------------------------------------------------------------------------------------------ Model Stock
def model_stock_ratio(task_vectors: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock's interpolation ratio ``t = N cos / (1 + (N - 1) cos)`` (compute dtype), as mergekit 0.1.5.

    ``cos`` is the mean over pairs ``i < j`` of ``clamp(<tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6), -1, 1)``.
    ``filter_wise=False``: over the flattened tensors, ``t`` is 0-dim. ``filter_wise=True``: per vector along
    the last dim (per row of a matrix; tensors of fewer than 2 dims are one row), ``t`` has shape
    ``(*rows, 1)`` (broadcastable against the tensor; ``(1, 1)`` for a 0-/1-D one). ``t = 0`` where
    ``|1 + (N - 1) cos| < 1e-6`` (mergekit keeps the base there). Needs at least 2 task vectors.
    """
    dtype = _check(task_vectors)
    n = len(task_vectors)
    if n < 2:
        raise MergeConfigError(f"model_stock needs at least 2 task vectors (models besides the base), got {n}")
    if filter_wise:
        xs = [t.to(dtype).reshape(1, -1) if t.dim() < 2 else t.to(dtype) for t in task_vectors]
    else:
        xs = [t.to(dtype).reshape(-1) for t in task_vectors]
    cos_thetas = []
    for i, a in enumerate(xs):
        for b in xs[i + 1:]:
            norm_product = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cos_thetas.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (n * cos_theta) / safe)
    return t if filter_wise else t.reshape(())


def model_stock(task_vectors: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024):
    ``t * mean_i(tau_i)`` with ``t = model_stock_ratio(task_vectors, filter_wise)``.

    So ``BASE + result = t * mean_i(M_i) + (1 - t) * BASE``, mergekit 0.1.5's ``model_stock`` (whose
    ``filter_wise`` option, default False, this mirrors). Identical task vectors give ``t = 1`` (the result is
    the task vector); mutually orthogonal ones ``t = 0``. No weights (the method has none). Needs at least 2
    task vectors (mergekit: a base and at least 2 models). Not a sum of independent per-task terms (``t``
    depends on every pair); needs the whole tensor.
    """
    t = model_stock_ratio(task_vectors, filter_wise)
    dtype = compute_dtype(task_vectors)
    mean = _weighted_sum(task_vectors, None, dtype).div_(len(task_vectors))
    shape = mean.shape
    if filter_wise and mean.dim() < 2:
        return (t * mean.reshape(1, -1)).reshape(shape)
    return t * mean


# ------------------------------------------------------------------------------------------------ SLERP
#: Chunk (elements) in which mergekit 0.1.5's SLERP accumulates its norms and dot for one output tensor.
_SLERP_CHUNK = 1024 * 1024
_SLERP_DOT_THRESHOLD = 0.9995
_SLERP_EPS = 1e-8


def _check_t(t: float) -> float:
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= float(t) <= 1.0:
        raise MergeConfigError(f"t must be a number in [0, 1], got {t!r}")
    return float(t)


def slerp_coefficients(base: Tensor, model: Tensor, t: float) -> tuple[float, float]:
    """The coefficients ``(c_base, c_model)`` of :func:`slerp`: ``slerp(base, model, t) = c_base * base +
    c_model * model`` (exact floats of the compute dtype; a streaming caller can apply them slice by slice)."""
    t = _check_t(t)
    dtype = _check([base, model], "tensors")
    a, b = base.reshape(1, -1), model.reshape(1, -1)
    tt = torch.tensor(t, dtype=dtype, device=a.device).reshape(1, 1)
    if a.shape[1] == 0:
        return float(1 - tt), float(tt)
    norm_a_parts, norm_b_parts = [], []
    for start in range(0, a.shape[1], _SLERP_CHUNK):
        x = a[:, start:start + _SLERP_CHUNK].to(dtype)
        y = b[:, start:start + _SLERP_CHUNK].to(dtype)
        norm_a_parts.append(torch.linalg.vector_norm(x, dim=1, keepdim=True))
        norm_b_parts.append(torch.linalg.vector_norm(y, dim=1, keepdim=True))
        del x, y
    norm_a = torch.linalg.vector_norm(torch.stack(norm_a_parts), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norm_b_parts), dim=0)
    norm_a = torch.where(norm_a > _SLERP_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > _SLERP_EPS, norm_b, 1)
    dot_parts = []
    for start in range(0, a.shape[1], _SLERP_CHUNK):
        x = a[:, start:start + _SLERP_CHUNK].to(dtype) / norm_a
        y = b[:, start:start + _SLERP_CHUNK].to(dtype) / norm_b
        dot_parts.append((x * y).sum(dim=1, keepdim=True))
        del x, y
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > _SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return float(coef_a), float(coef_b)


def slerp(base: Tensor, model: Tensor, t: float) -> Tensor:
    """Spherical linear interpolation of two *model* tensors (Shoemake 1985; mergekit's ``slerp``), returning
    the interpolated tensor itself (not a delta) in the compute dtype.

    Over the whole flattened tensors ``a = base``, ``b = model``: norms ``|a|``, ``|b|`` (a norm ``<= 1e-8``
    is replaced by 1), ``dot = clamp(<a/|a|, b/|b|>, -1, 1)``; if ``|dot| > 0.9995`` the result is the linear
    ``(1 - t) a + t b``, else with ``theta = acos(dot)``: ``sin((1 - t) theta) / sin(theta) * a +
    sin(t theta) / sin(theta) * b`` (the coefficients apply to the *unnormalised* tensors). ``t = 0`` gives
    `base`, ``t = 1`` gives `model`, bit for bit. `t` must be in [0, 1] (MergeConfigError naming ``t``).

    Bit-identical to mergekit 0.1.5's ``slerp`` for one output tensor: the same float ops, with its norms and
    dot accumulated over chunks of 2**20 elements (mergekit batching B same-shape tensors uses chunks of
    ``2**20 // B``, which can move the norms by an ulp). Needs the base tensor, so it cannot run inside ATM
    rounds on deltas alone; it is not a sum of per-task terms. See :func:`slerp_coefficients`.
    """
    c_a, c_b = slerp_coefficients(base, model, t)
    dtype = compute_dtype([base, model])
    a, b = base.reshape(-1), model.reshape(-1)
    out = torch.empty(a.numel(), dtype=dtype, device=a.device)
    for start in range(0, a.numel(), _SLERP_CHUNK):
        stop = start + _SLERP_CHUNK
        out[start:stop] = a[start:stop].to(dtype) * c_a + b[start:stop].to(dtype) * c_b
    return out.view(base.shape)


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
