"""MergeSpec (a merge method and its parameters, validated) and the per-tensor dispatch.

The per-tensor contract (docs/ARCHITECTURE.md): for a tensor name, ``tau_i = M_i - BASE`` in float32
(float64 when an input is float64) and ``result = BASE + scale * combine(tau_1..tau_n)`` cast back to the
base's dtype; ``average`` is ``sum_i w_i M_i / sum_i w_i``; non-floating tensors are copied from the base.

Each method's options, defaults and properties live in its record in :mod:`hf_atm.merging.registry`.

Determinism: DARE / DELLA masks are drawn from CPU generators seeded by :func:`tensor_seed` from ``(seed, tensor
name, task index)``, so a merge gives the same bits whatever order tensors are visited in, in any process,
and the same masks on CPU and GPU.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.merging import methods as M
from hf_atm.merging.registry import METHODS, OPTIONS, MethodRecord, get_method, tensor_seed

__all__ = [
    "DEFAULT_DENSITY",
    "DEFAULT_GAMMA",
    "DENSITY_METHODS",
    "GAMMA_METHODS",
    "METHODS",
    "SIGN_METHODS",
    "SLICED_METHODS",
    "MergeSpec",
    "TensorPlan",
    "merge_deltas",
    "merge_tensor",
    "needs_all_task_vectors",
    "per_task_transform",
    "plan_tensor",
    "tensor_seed",
]

# Views of the registry, kept for callers that want plain name tuples.
DEFAULT_DENSITY: dict[str, float] = {r: get_method(r).default("density") for r in METHODS
                                     if "density" in get_method(r).options}
DEFAULT_GAMMA: dict[str, float] = {r: get_method(r).default("gamma") for r in METHODS
                                   if "gamma" in get_method(r).options}
DENSITY_METHODS: tuple[str, ...] = tuple(DEFAULT_DENSITY)
GAMMA_METHODS: tuple[str, ...] = tuple(DEFAULT_GAMMA)
#: methods with a TIES sign election, the only ones that read ``majority_sign_method``.
SIGN_METHODS: tuple[str, ...] = tuple(m for m in METHODS if "majority_sign_method" in get_method(m).options)
MAJORITY_SIGN_METHODS: tuple[str, ...] = ("total", "frequency")
#: methods that need whole-tensor statistics (magnitude cuts, DARE masks) but are element-wise given them:
#: :func:`plan_tensor` computes the statistics, then :meth:`TensorPlan.merge_slice` merges any slices in order.
SLICED_METHODS: tuple[str, ...] = tuple(m for m in METHODS if get_method(m).sliced)
#: options that are given once per model or once for all (a list as long as ``models``).
_PER_MODEL = tuple(o.name for o in OPTIONS.values() if o.per_model and o.name != "weights")
#: options whose "not given" value is None (the method's default applies).
_OPTIONAL = ("density", "gamma", "epsilon", "t")


@dataclass(frozen=True)
class MergeSpec:
    """A merge method and its parameters for one tensor (see :mod:`hf_atm.merging.registry` for each method's
    options and defaults).

    Attributes:
        method: one of :data:`METHODS`.
        weights: one weight per model (``None``: all 1). For ``average`` / ``linear`` they must be >= 0 with a
            positive sum; ``slerp`` and ``model_stock`` take none.
        scale: lambda, multiplies ``combine(...)``; must be 1.0 for the methods that return models
            (``average``, ``linear``, ``slerp``).
        density: kept fraction in (0, 1] (one value, or one per model); ``None`` -> the method's default
            (ties 0.2 as in the TIES paper's top-20%, DARE and DELLA 0.5, breadcrumbs 0.9). Giving it to a
            method that takes none is an error.
        gamma: dropped top fraction in [0, 1) for the breadcrumbs methods (default 0.01); ``gamma + density <= 1``.
            Breadcrumbs' defaults (density 0.9, gamma 0.01) are the values common in mergekit breadcrumbs configs.
        epsilon: DELLA's half-width of the keep probabilities around density (default 0.15, mergekit's).
        t: SLERP's interpolation factor in [0, 1] (0: the base, 1: the model; default 0.5).
        rescale: DARE / DELLA: ``"probability"`` (default: kept entries divided by their keep probability, the
            papers' unbiased rescale), ``"l1"`` (each kept task vector scaled back to its L1 norm: mergekit's
            ``rescale: true``) or ``"none"``.
        seed: seeds random masks (DARE, DELLA) together with the tensor name and model index (:func:`tensor_seed`).
        majority_sign_method: ``"total"`` or ``"frequency"``, read by the TIES-style methods only.
        normalize: mergekit's ``normalize``. True: divide the combination by the sum of the weights (by the sum of
            the agreeing weights for TIES-style methods, whose sign is then elected on the weighted vectors, as
            mergekit does); False: no division (TIES-style: the plain sum of the agreeing weighted entries,
            mergekit's default for dare_ties / breadcrumbs_ties). None (default): peft's conventions (the
            TIES-style disjoint mean divides by the count of agreeing tasks), see :mod:`hf_atm.merging.methods`.
    """

    method: str = "task_arithmetic"
    weights: tuple[float, ...] | None = None
    scale: float = 1.0
    density: float | tuple[float, ...] | None = None
    gamma: float | tuple[float, ...] | None = None
    seed: int = 0
    majority_sign_method: str = "total"
    epsilon: float | tuple[float, ...] | None = None
    t: float | None = None
    normalize: bool | None = None
    rescale: str = "probability"

    def __post_init__(self) -> None:
        # Lists from YAML become tuples so the spec stays hashable (it is cached per validation).
        for option in ("weights", *_PER_MODEL):
            value = getattr(self, option)
            if isinstance(value, list):
                try:
                    object.__setattr__(self, option, tuple(value))
                except TypeError as e:  # pragma: no cover - tuple() of a list never fails
                    raise MergeConfigError(f"{option} must be a number or a list of numbers, got {value!r}") from e
        if self.weights is not None and not isinstance(self.weights, tuple):
            raise MergeConfigError(f"weights must be a list of numbers, got {self.weights!r}")

    @property
    def record(self) -> MethodRecord:
        """The registry record of :attr:`method` (MergeConfigError when unknown)."""
        return get_method(self.method)

    # -- resolved parameters
    def resolved(self, option: str) -> Any:
        """``option``'s value, or the method's default; None for an option the method does not read."""
        record = self.record
        if option not in record.options:
            return None
        value = getattr(self, option)
        return record.default(option) if value is None else value

    @property
    def effective_density(self) -> float | tuple[float, ...] | None:
        """``density``, or the method's default; None for methods that take no density."""
        d = self.resolved("density")
        return float(d) if _is_number(d) else d

    @property
    def effective_gamma(self) -> float | tuple[float, ...] | None:
        """``gamma``, or the method's default; None for methods that take no gamma."""
        g = self.resolved("gamma")
        return float(g) if _is_number(g) else g

    def for_models(self, indices: Sequence[int]) -> MergeSpec:
        """This spec restricted to the models at `indices` (their weights and per-model options, in order).

        Used where only some models have a tensor's row (a token missing from a vocabulary). Model indices
        keep seeding random masks by position in the subset, so a subset merge is itself deterministic.
        """
        changes: dict[str, Any] = {}
        for option in ("weights", *_PER_MODEL):
            value = getattr(self, option)
            if isinstance(value, tuple):
                changes[option] = tuple(value[i] for i in indices)
        return replace(self, **changes)

    def validate(self, num_models: int) -> None:
        """Raise MergeConfigError, naming the option at fault, unless this spec can merge `num_models` models."""
        try:
            hash(self)
        except TypeError as e:  # e.g. weights holding lists: report it instead of failing in the cache
            bad = next((o for o in ("weights", *_PER_MODEL) if _unhashable(getattr(self, o))), "options")
            raise MergeConfigError(
                f"{bad}: expected a number or a list of numbers, got {getattr(self, bad, None)!r} ({e})"
            ) from e
        _validate(self, num_models)

    def to_dict(self) -> dict[str, Any]:
        """Plain-typed dict for YAML with only the options that apply to the method (defaults resolved)."""
        record = self.record
        d: dict[str, Any] = {"method": self.method}
        if self.weights is not None:
            d["weights"] = [float(w) for w in self.weights]
        for option in record.options:
            value = self.resolved(option)
            if isinstance(value, tuple):
                value = [float(v) for v in value]
            elif option == "seed":
                value = int(value)
            elif option == "normalize":
                if value is None:
                    continue  # peft's conventions: nothing to record
                value = bool(value)
            elif _is_number(value):
                value = float(value)
            d[option] = value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MergeSpec:
        """Build from a mapping (e.g. parsed YAML); unknown keys raise MergeConfigError naming them."""
        if not isinstance(d, Mapping):
            raise MergeConfigError(f"merge spec must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise MergeConfigError(
                f"unknown merge option(s): {', '.join(unknown)}; known options: {', '.join(sorted(known))}"
            )
        return cls(**dict(d))


def _is_number(x: Any) -> bool:
    """A real number (Python or NumPy scalar), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _unhashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return True
    return False


def _methods_with(option: str) -> str:
    return ", ".join(m for m in METHODS if option in get_method(m).options)


def _check_values(option: str, value: Any, num_models: int) -> list[Any]:
    """The values of `option` (one, or one per model), each checked by the registry (MergeConfigError)."""
    record = OPTIONS[option]
    if isinstance(value, tuple):
        if not record.per_model:
            raise MergeConfigError(f"{option}: expected one number, got a list {list(value)}")
        if len(value) != num_models:
            raise MergeConfigError(f"{option} has {len(value)} entries but there are {num_models} models")
        values = list(value)
    else:
        values = [value]
    for v in values:
        problem = record.check(v)
        if problem is not None:
            raise MergeConfigError(f"{option} must be {problem}, got {v!r}")
    return values


@lru_cache(maxsize=256)
def _validate(spec: MergeSpec, num_models: int) -> None:
    """The checks behind MergeSpec.validate, cached: the dispatcher calls it once per tensor."""
    m = spec.method
    record = get_method(m)
    if not isinstance(num_models, int) or num_models < 1:
        raise MergeConfigError(f"a merge needs at least one model, got {num_models}")
    if num_models < record.min_models or (record.max_models is not None and num_models > record.max_models):
        want = (f"exactly {record.min_models}" if record.max_models == record.min_models
                else f"at least {record.min_models}")
        raise MergeConfigError(
            f"models: method {m!r} merges {want} model{'s' if record.min_models != 1 else ''} "
            f"besides the base, got {num_models}"
        )
    if spec.weights is not None:
        if not record.takes_weights:
            raise MergeConfigError(f"weights: method {m!r} takes no weights")
        if not all(_is_number(w) and math.isfinite(w) for w in spec.weights):
            raise MergeConfigError(f"weights must be finite numbers, got {list(spec.weights)}")
        if len(spec.weights) != num_models:
            raise MergeConfigError(
                f"weights has {len(spec.weights)} entries but there are {num_models} models"
            )
        if not record.needs_base and (any(w < 0 for w in spec.weights) or sum(spec.weights) <= 0):
            raise MergeConfigError(
                f"weights for {m!r} must be >= 0 with a positive sum, got {list(spec.weights)}"
            )
    if not _is_number(spec.scale) or not math.isfinite(spec.scale):
        raise MergeConfigError(f"scale must be a finite number, got {spec.scale!r}")
    if "scale" not in record.options and spec.scale != 1.0:
        raise MergeConfigError(
            f"scale: method {m!r} ignores scale (it returns {'the weighted mean' if not record.needs_base else 'a model'}"
            "); leave it 1.0"
        )
    for option in _OPTIONAL:
        value = getattr(spec, option)
        if value is None:
            continue
        if option not in record.options:
            only = _methods_with(option)
            raise MergeConfigError(f"{option}: method {m!r} takes no {option}; only {only} do")
        _check_values(option, value, num_models)
    if spec.normalize is not None and not isinstance(spec.normalize, bool):
        raise MergeConfigError(f"normalize must be true or false, got {spec.normalize!r}")
    if spec.normalize is not None and "normalize" not in record.options:
        raise MergeConfigError(f"normalize: method {m!r} takes no normalize; only {_methods_with('normalize')} do")
    if "gamma" in record.options:
        gammas, densities = spec.effective_gamma, spec.effective_density
        for i in range(num_models):
            g = gammas[i] if isinstance(gammas, tuple) else gammas
            dens = densities[i] if isinstance(densities, tuple) else densities
            if g + dens > 1.0 + 1e-12:
                raise MergeConfigError(
                    f"gamma + density must be <= 1 for {m!r}, got gamma={g} + density={dens}"
                )
    if OPTIONS["rescale"].check(spec.rescale) is not None:
        raise MergeConfigError(f"rescale must be one of probability, l1, none, got {spec.rescale!r}")
    if spec.rescale != "probability" and "rescale" not in record.options:
        raise MergeConfigError(f"rescale: method {m!r} draws no random mask; only {_methods_with('rescale')} read it")
    if spec.majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise MergeConfigError(
            f"majority_sign_method must be one of {', '.join(MAJORITY_SIGN_METHODS)}, "
            f"got {spec.majority_sign_method!r}"
        )
    if spec.majority_sign_method != "total" and "majority_sign_method" not in record.options:
        raise MergeConfigError(
            f"majority_sign_method: method {m!r} elects no sign; only {', '.join(SIGN_METHODS)} read it"
        )
    if not isinstance(spec.seed, numbers.Integral) or isinstance(spec.seed, bool):
        raise MergeConfigError(f"seed must be an integer, got {spec.seed!r}")


def needs_all_task_vectors(method: str) -> bool:
    """Whether `method` needs all task vectors at once (ties, dare_ties, tsv, iso_c, ...), or is a weighted sum
    of independent per-task transforms (average, task_arithmetic, dare_linear, breadcrumbs, della_linear), so
    that ranks can transform locally with :func:`per_task_transform` and all-reduce the sum."""
    return not get_method(method).sum_decomposable


def _normalizer(spec: MergeSpec, num_models: int) -> float:
    """The divisor of ``normalize: true`` for methods without a sign election: the sum of the weights
    (1 where it is ~0, as mergekit)."""
    if not spec.resolved("normalize"):
        return 1.0
    total = float(num_models) if spec.weights is None else float(sum(spec.weights))
    return 1.0 if abs(total) < 1e-8 else total


def per_task_transform(
    spec: MergeSpec, tau: Tensor, index: int, name: str = "", num_models: int | None = None
) -> Tensor:
    """The term of task `index` in a sum-decomposable merge, so that
    ``merge_deltas(spec, taus, name) == spec.scale * sum_i per_task_transform(spec, taus[i], i, name, n)``.

    Terms: task_arithmetic ``w_i tau_i``; dare_linear ``w_i m_i tau_i / density`` (mask seeded by
    ``(seed, name, i)``); breadcrumbs ``w_i tau_i * band_i``; della_linear ``w_i tau_i * m_i / p_i``; average
    ``(w_i / sum_j w_j) tau_i``; with ``normalize`` each term is divided by ``sum_j w_j``. The result is in the
    compute dtype (float32, float64 for float64 input), unscaled. `num_models` is required for ``average``
    without weights (for ``1/n``), otherwise inferred from ``len(weights)`` when given.
    Methods that need all task vectors raise MergeConfigError.
    """
    record = get_method(spec.method)
    if record.per_task is None:
        raise MergeConfigError(
            f"method {spec.method!r} is not a sum of per-task terms; merge it with merge_deltas on all task vectors"
        )
    n = num_models if num_models is not None else (len(spec.weights) if spec.weights is not None else None)
    if n is None:
        if not record.needs_base or spec.resolved("normalize"):
            raise MergeConfigError(f"per_task_transform for {spec.method!r} without weights needs num_models")
        n = index + 1
    spec.validate(n)
    if not 0 <= index < n:
        raise MergeConfigError(f"task index {index} out of range for {n} models")
    if not tau.is_floating_point():
        raise CheckpointError(f"tensor {name!r}: task vector has non-floating dtype {tau.dtype}")
    out = record.per_task(spec, tau, index, name, n)
    if record.on_models:  # average's terms carry w_i / sum w already
        return out
    factor = (1.0 if spec.weights is None else float(spec.weights[index])) / _normalizer(spec, n)
    return out if factor == 1.0 else out.mul_(factor)


def _check_shapes(
    name: str, tensors: Sequence[Tensor], what: str, expected: torch.Size | None = None
) -> None:
    shape = tensors[0].shape if expected is None else expected
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise CheckpointError(
                f"tensor {name!r}: {what} {i} has shape {tuple(t.shape)}, expected {tuple(shape)}"
            )


def merge_deltas(spec: MergeSpec, task_vectors: Sequence[Tensor], name: str = "") -> Tensor:
    """``spec.scale * combine(task_vectors)`` for one tensor, in float32 (float64 if an input is float64).

    For ``average`` / ``linear`` the weighted mean of the deltas (so ``base + merge_deltas(...)`` is the
    weighted mean of the models). Random masks come from per-task CPU generators seeded by
    ``tensor_seed(spec.seed, name, i)``. ``slerp`` needs the base tensor itself: use :func:`merge_tensor`.
    Raises MergeConfigError for an invalid spec, CheckpointError (naming `name`) for mismatched shapes or
    non-floating task vectors. Never modifies its inputs; the result never aliases them.
    """
    n = len(task_vectors)
    spec.validate(n)
    record = spec.record
    if record.combine is None:
        raise MergeConfigError(
            f"method {spec.method!r} needs the base tensor itself, not task vectors alone (so it cannot merge "
            "inside ATM rounds); merge it with merge_tensor"
        )
    _check_shapes(name, task_vectors, "task vector")
    for i, t in enumerate(task_vectors):
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {name!r}: task vector {i} has non-floating dtype {t.dtype}")
    out = record.combine(spec, task_vectors, name)
    if record.on_models:
        return out
    factor = _output_factor(spec, n)
    return out if factor == 1.0 else out.mul_(factor)


def _output_factor(spec: MergeSpec, num_models: int) -> float:
    """What multiplies ``combine(...)``: the scale, divided by the weight sum under ``normalize`` for methods
    without a sign election (the TIES-style ones divide by the agreeing weights themselves)."""
    if "majority_sign_method" in spec.record.options:
        return float(spec.scale)
    return float(spec.scale) / _normalizer(spec, num_models)


class TensorPlan:
    """Phase 2 of :func:`merge_tensor` for a :data:`SLICED_METHODS` method, made by :func:`plan_tensor`.

    :meth:`merge_slice` returns ``merge_tensor(spec, base, models, name).reshape(-1)[start:stop]`` (cast to
    ``out_dtype``) from the flat slices ``[start, stop)`` of the base and the models, bit for bit; slices must
    be visited in order from 0 and cover the tensor once.
    """

    def __init__(self, spec: MergeSpec, combine: M.SlicedCombine, dtype: torch.dtype, out_dtype: torch.dtype,
                 shape: torch.Size, num_models: int) -> None:
        self.spec = spec
        self.combine = combine
        self.dtype = dtype
        self.out_dtype = out_dtype
        self.shape = shape
        self.numel = combine.numel
        self.factor = _output_factor(spec, num_models)

    def merge_slice(self, base: Tensor, models: Sequence[Tensor], start: int) -> Tensor:
        """The merged flat slice ``[start, start + base.numel())`` in ``out_dtype`` (same ops as merge_tensor)."""
        return self._merge_slice(base, models, start, self.combine.combine)

    @property
    def stateless(self) -> bool:
        """Whether :meth:`merge_slice_at` applies (see :attr:`hf_atm.merging.methods.SlicedCombine.stateless`)."""
        return self.combine.stateless

    def merge_slice_at(self, base: Tensor, models: Sequence[Tensor], start: int) -> Tensor:
        """:meth:`merge_slice` of any slice, in any order, from any thread (a :attr:`stateless` plan): the same
        bits, nothing moves."""
        return self._merge_slice(base, models, start, self.combine.combine_at)

    def _merge_slice(self, base: Tensor, models: Sequence[Tensor], start: int,
                     combine: Callable[[Sequence[Tensor], int], Tensor]) -> Tensor:
        b = base.reshape(-1).to(self.dtype)
        taus = [t.reshape(-1) - b for t in models]
        delta = combine(taus, start)
        del taus
        if self.factor != 1.0:
            delta.mul_(self.factor)
        return delta.add_(b).to(self.out_dtype)

    def merge_all(self, base: Tensor, models: Sequence[Tensor],
                  slice_elements: int = M.SLICE_ELEMENTS) -> Tensor:
        """The whole merged tensor, slice by slice into one output buffer."""
        out = torch.empty(self.numel, dtype=self.out_dtype, device=base.device)
        fb, fm = base.reshape(-1), [t.reshape(-1) for t in models]
        for start in range(0, self.numel, slice_elements):
            stop = min(self.numel, start + slice_elements)
            out[start:stop] = self.merge_slice(fb[start:stop], [t[start:stop] for t in fm], start)
        return out.view(self.shape)


class _Magnitudes:
    """``magnitude(i) = |M_i - base|`` for a plan: called, one fresh buffer (the task vector made its own
    magnitudes; the base widened to the compute dtype once, only if asked); ``source(i)``, the same values
    streamed by chunks (:class:`hf_atm.merging.methods.TaskMagnitudes`, for the magnitude cuts). Either way
    ``on_task_read(i, M_i)`` follows once model i has been read."""

    def __init__(self, base: Tensor, models: Sequence[Tensor], dtype: torch.dtype,
                 on_task_read: Callable[[int, Tensor], None] | None) -> None:
        self.base, self.models, self.dtype, self.on_task_read = base, models, dtype, on_task_read
        self._b: Tensor | None = None

    def __call__(self, i: int) -> Tensor:
        if self._b is None:
            self._b = self.base.to(self.dtype)
        mag = (self.models[i] - self._b).abs_()
        if self.on_task_read is not None:
            self.on_task_read(i, self.models[i])
        return mag

    def source(self, i: int) -> M.TaskMagnitudes:
        read = self.on_task_read
        return M.TaskMagnitudes(self.models[i], self.base, self.dtype,
                                None if read is None else (lambda: read(i, self.models[i])))


def plan_tensor(
    spec: MergeSpec,
    base: Tensor,
    models: Sequence[Tensor],
    name: str = "",
    out_dtype: torch.dtype | None = None,
    on_task_read: Callable[[int, Tensor], None] | None = None,
) -> TensorPlan:
    """Phase 1 of ``merge_tensor(spec, base, models, name)`` for a :data:`SLICED_METHODS` method.

    Reads each model once, whole, in order, holding one task vector ``|M_i - base|`` at a time (the magnitude
    cuts of the ties / breadcrumbs methods; dare_ties draws its seeded masks instead and reads nothing);
    ``on_task_read(i, models[i])`` is called after model i was read (e.g. to drop its file pages). The plan's
    :meth:`TensorPlan.merge_slice` then merges slices in ``out_dtype`` (default: the base's dtype).
    Raises MergeConfigError for a method outside SLICED_METHODS or an invalid spec, CheckpointError
    (naming `name`) for mismatched shapes or non-floating tensors.
    """
    record = get_method(spec.method)
    if record.plan is None:
        raise MergeConfigError(
            f"method {spec.method!r} has no sliced plan; only {', '.join(SLICED_METHODS)} do"
        )
    if len(models) == 0:
        raise MergeConfigError(f"tensor {name!r}: a merge needs at least one model")
    spec.validate(len(models))
    _check_shapes(name, models, "model", expected=base.shape)
    for i, t in enumerate([base, *models]):
        if not t.is_floating_point():
            what = "the base" if i == 0 else f"model {i - 1}"
            raise CheckpointError(f"tensor {name!r}: {what} has non-floating dtype {t.dtype}")
    dtype = M.compute_dtype([base, *models])
    magnitude = _Magnitudes(base, models, dtype, on_task_read)
    combine = record.plan(spec, magnitude, len(models), base.shape, name)
    return TensorPlan(spec, combine, dtype, base.dtype if out_dtype is None else out_dtype, base.shape, len(models))


def merge_tensor(spec: MergeSpec, base: Tensor | None, models: Sequence[Tensor], name: str = "",
                 out_dtype: torch.dtype | None = None) -> Tensor:
    """The merged tensor `name`, in `out_dtype` (default: the base's dtype; the first model's for ``average``
    without a base), computed in float32 / float64 and cast once at the end.

    * non-floating tensors (int buffers): a copy of the base (of the first model when there is no base);
    * ``average`` / ``linear``: ``sum_i w_i M_i / sum_i w_i`` (the base only sets the dtype and shape check);
    * ``slerp``: :func:`hf_atm.merging.methods.slerp` of the base and the model;
    * otherwise: ``base + merge_deltas(spec, [M_i - base ...], name)``, computed in float32/float64.

    Raises CheckpointError naming `name` when shapes differ, MergeConfigError for an invalid spec or a
    missing base (every method but ``average`` / ``linear`` needs one).
    """
    if len(models) == 0:
        raise MergeConfigError(f"tensor {name!r}: a merge needs at least one model")
    spec.validate(len(models))
    record = spec.record
    ref = base if base is not None else models[0]
    _check_shapes(name, models, "model", expected=ref.shape)
    if not ref.is_floating_point():
        return ref.clone()
    for i, t in enumerate(models):
        if not t.is_floating_point():
            raise CheckpointError(
                f"tensor {name!r}: model {i} has dtype {t.dtype} but the base is {ref.dtype}"
            )
    out_dtype = ref.dtype if out_dtype is None else out_dtype
    if base is None and record.needs_base:
        raise MergeConfigError(
            f"method {spec.method!r} needs a base model (only 'average' and 'linear' work without one)"
        )
    if record.combine_models is not None:
        # The model forms widen slice by slice themselves: no whole-tensor float32 copies of half-precision
        # inputs (a 1B model's embedding is 262 MB in float32).
        models = list(models)
        if M.compute_dtype([ref, *models]) != M.compute_dtype(models):  # a float64 base: float64 throughout
            models = [t.to(torch.float64) for t in models]
        return record.combine_models(spec, base, models, name, out_dtype)
    assert base is not None
    if record.plan is not None:
        # Phase 1 over whole tensors, phase 2 in slices: the streaming engine runs the same plan.
        return plan_tensor(spec, base, models, name, out_dtype).merge_all(base, models)
    dtype = M.compute_dtype([base, *models])
    b = base.to(dtype)
    # Type promotion (b is in the widest dtype) upcasts each model inside the subtraction: no extra copy.
    taus = [t - b for t in models]
    delta = merge_deltas(spec, taus, name)
    return delta.add_(b).to(out_dtype)
