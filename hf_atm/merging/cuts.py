"""Exact magnitude cuts: the k largest entries of a tensor by ``|x|``, whole, streamed or slice by slice.

:class:`MagnitudeCut` is the selection (a threshold plus the ties kept at it), :func:`magnitude_cuts` finds it
exactly by one partition, :func:`magnitude_cuts_streamed` without storing the magnitudes, and
:class:`CutCursor` applies it to consecutive slices (the streaming engine's second phase).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "KEEP_ALL",
    "KEEP_NONE",
    "STREAM_MIN",
    "CutCursor",
    "MagnitudeCut",
    "TaskMagnitudes",
    "cut_mask",
    "kth_largest",
    "magnitude_cut",
    "magnitude_cuts",
    "magnitude_cuts_streamed",
    "magnitude_trim",
]


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
STREAM_MIN = 1 << 16
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
    if todo and source.device.type == "cpu" and source.dtype == torch.float32 and n >= STREAM_MIN:
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


def kth_largest(flat: Tensor, k: int) -> float:
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


def cut_mask(magnitudes: Tensor, cut: MagnitudeCut) -> Tensor:
    """Bool keep-mask of `magnitudes` (any shape) under `cut`: the whole tensor as one slice."""
    return CutCursor(cut).mask(magnitudes.reshape(-1), 0).view(magnitudes.shape)


def magnitude_trim(tau: Tensor, density: float) -> Tensor:
    """Keep the ``k = int(density * numel)`` largest-magnitude entries of `tau`, zero the rest (TIES "trim").

    The count is peft's (``peft.utils.merge_utils.magnitude_based_pruning``); among entries whose magnitude
    equals the k-th largest, the first ones in flat index order are kept (see :class:`MagnitudeCut`: identical
    to peft whenever the magnitudes at the cut are distinct). ``density >= 1`` returns `tau` unchanged (a view).
    """
    if density >= 1.0:
        return tau
    mag = tau.abs()
    keep = cut_mask(mag, magnitude_cut(mag, int(density * tau.numel())))
    return torch.where(keep, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))
