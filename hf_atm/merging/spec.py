"""MergeSpec (a merge method and its parameters, validated) and the per-tensor dispatch.

The per-tensor contract (docs/ARCHITECTURE.md): for a tensor name, ``tau_i = M_i - BASE`` in float32
(float64 when an input is float64) and ``result = BASE + scale * combine(tau_1..tau_n)`` cast back to the
base's dtype; ``average`` is ``sum_i w_i M_i / sum_i w_i``; non-floating tensors are copied from the base.

Determinism: DARE masks are drawn from CPU generators seeded by :func:`tensor_seed` from ``(seed, tensor
name, task index)``, so a merge gives the same bits whatever order tensors are visited in, in any process,
and the same masks on CPU and GPU.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.merging import methods as M

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

METHODS: tuple[str, ...] = (
    "average",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "tsv",
    "iso_c",
)
#: methods that take ``density`` (the kept fraction) and its default when the spec leaves it None.
DEFAULT_DENSITY: dict[str, float] = {"ties": 0.2, "dare_linear": 0.5, "dare_ties": 0.5, "breadcrumbs": 0.9}
#: methods that take ``gamma`` (the dropped top fraction) and its default.
DEFAULT_GAMMA: dict[str, float] = {"breadcrumbs": 0.01}
DENSITY_METHODS: tuple[str, ...] = tuple(DEFAULT_DENSITY)
GAMMA_METHODS: tuple[str, ...] = tuple(DEFAULT_GAMMA)
#: methods with a TIES sign election, the only ones that read ``majority_sign_method``.
SIGN_METHODS: tuple[str, ...] = ("ties", "dare_ties")
MAJORITY_SIGN_METHODS: tuple[str, ...] = ("total", "frequency")
#: methods that need whole-tensor statistics (magnitude cuts, DARE masks) but are element-wise given them:
#: :func:`plan_tensor` computes the statistics, then :meth:`TensorPlan.merge_slice` merges any slices in order.
SLICED_METHODS: tuple[str, ...] = ("ties", "dare_ties", "breadcrumbs")
#: methods whose combine is a (weighted) sum of independent per-task transforms.
_SUM_DECOMPOSABLE: frozenset[str] = frozenset({"average", "task_arithmetic", "dare_linear", "breadcrumbs"})


@dataclass(frozen=True)
class MergeSpec:
    """A merge method and its parameters.

    Attributes:
        method: one of :data:`METHODS`.
        weights: one weight per model (``None``: all 1). For ``average`` they must be >= 0 with a positive sum.
        scale: lambda, multiplies ``combine(...)``; must be 1.0 for ``average`` (which ignores it).
        density: kept fraction in (0, 1] for ``ties`` / ``dare_linear`` / ``dare_ties`` / ``breadcrumbs``;
            ``None`` -> :data:`DEFAULT_DENSITY` (ties 0.2 as in the TIES paper's top-20%, DARE 0.5, breadcrumbs
            0.9). Giving it to another method is an error.
        gamma: dropped top fraction in [0, 1) for ``breadcrumbs`` only (default 0.01); ``gamma + density <= 1``.
            Breadcrumbs' defaults (density 0.9, gamma 0.01) are the values common in mergekit breadcrumbs
            configs.
        seed: seeds DARE's masks together with the tensor name and task index (see :func:`tensor_seed`).
        majority_sign_method: ``"total"`` or ``"frequency"``, read by ``ties`` / ``dare_ties`` only (any other
            method rejects a value other than the default ``"total"``).
    """

    method: str = "task_arithmetic"
    weights: tuple[float, ...] | None = None
    scale: float = 1.0
    density: float | None = None
    gamma: float | None = None
    seed: int = 0
    majority_sign_method: str = "total"

    def __post_init__(self) -> None:
        # Lists from YAML become tuples so the spec stays hashable (it is cached per validation).
        if self.weights is not None and not isinstance(self.weights, tuple):
            try:
                object.__setattr__(self, "weights", tuple(self.weights))
            except TypeError as e:
                raise MergeConfigError(f"weights must be a list of numbers, got {self.weights!r}") from e

    # -- resolved parameters
    @property
    def effective_density(self) -> float | None:
        """``density``, or the method's default; None for methods that take no density."""
        if self.method not in DEFAULT_DENSITY:
            return None
        return DEFAULT_DENSITY[self.method] if self.density is None else float(self.density)

    @property
    def effective_gamma(self) -> float | None:
        """``gamma``, or the method's default; None for methods that take no gamma."""
        if self.method not in DEFAULT_GAMMA:
            return None
        return DEFAULT_GAMMA[self.method] if self.gamma is None else float(self.gamma)

    def validate(self, num_models: int) -> None:
        """Raise MergeConfigError, naming the option at fault, unless this spec can merge `num_models` models."""
        try:
            hash(self)
        except TypeError as e:  # e.g. weights holding lists: report it instead of failing in the cache
            raise MergeConfigError(f"merge options must be plain numbers and strings: {e}") from e
        _validate(self, num_models)

    def to_dict(self) -> dict[str, Any]:
        """Plain-typed dict for YAML with only the options that apply to the method (defaults resolved)."""
        d: dict[str, Any] = {"method": self.method}
        if self.weights is not None:
            d["weights"] = [float(w) for w in self.weights]
        if self.method != "average":
            d["scale"] = float(self.scale)
        if self.method in DENSITY_METHODS:
            d["density"] = self.effective_density
        if self.method in GAMMA_METHODS:
            d["gamma"] = self.effective_gamma
        if self.method in ("dare_linear", "dare_ties"):
            d["seed"] = int(self.seed)
        if self.method in SIGN_METHODS:
            d["majority_sign_method"] = self.majority_sign_method
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


@lru_cache(maxsize=256)
def _validate(spec: MergeSpec, num_models: int) -> None:
    """The checks behind MergeSpec.validate, cached: the dispatcher calls it once per tensor."""
    m = spec.method
    if m not in METHODS:
        raise MergeConfigError(f"method: unknown merge method {m!r}; known methods: {', '.join(METHODS)}")
    if not isinstance(num_models, int) or num_models < 1:
        raise MergeConfigError(f"a merge needs at least one model, got {num_models}")
    if spec.weights is not None:
        if not all(_is_number(w) and math.isfinite(w) for w in spec.weights):
            raise MergeConfigError(f"weights must be finite numbers, got {list(spec.weights)}")
        if len(spec.weights) != num_models:
            raise MergeConfigError(
                f"weights has {len(spec.weights)} entries but there are {num_models} models"
            )
        if m == "average" and (any(w < 0 for w in spec.weights) or sum(spec.weights) <= 0):
            raise MergeConfigError(
                f"weights for 'average' must be >= 0 with a positive sum, got {list(spec.weights)}"
            )
    if not _is_number(spec.scale) or not math.isfinite(spec.scale):
        raise MergeConfigError(f"scale must be a finite number, got {spec.scale!r}")
    if m == "average" and spec.scale != 1.0:
        raise MergeConfigError(
            "scale: method 'average' ignores scale (it returns the weighted mean); leave it 1.0"
        )
    if spec.density is not None:
        if m not in DENSITY_METHODS:
            raise MergeConfigError(
                f"density: method {m!r} takes no density; only {', '.join(DENSITY_METHODS)} do"
            )
        if not _is_number(spec.density) or not 0.0 < spec.density <= 1.0:
            raise MergeConfigError(f"density must be in (0, 1], got {spec.density!r}")
    if spec.gamma is not None:
        if m not in GAMMA_METHODS:
            raise MergeConfigError(
                f"gamma: method {m!r} takes no gamma; only {', '.join(GAMMA_METHODS)} does"
            )
        if not _is_number(spec.gamma) or not 0.0 <= spec.gamma < 1.0:
            raise MergeConfigError(f"gamma must be in [0, 1), got {spec.gamma!r}")
    if m in GAMMA_METHODS:
        g, dens = spec.effective_gamma, spec.effective_density
        assert g is not None and dens is not None
        if g + dens > 1.0 + 1e-12:
            raise MergeConfigError(f"gamma + density must be <= 1 for {m!r}, got gamma={g} + density={dens}")
    if spec.majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise MergeConfigError(
            f"majority_sign_method must be one of {', '.join(MAJORITY_SIGN_METHODS)}, "
            f"got {spec.majority_sign_method!r}"
        )
    if spec.majority_sign_method != "total" and m not in SIGN_METHODS:
        raise MergeConfigError(
            f"majority_sign_method: method {m!r} elects no sign; only {', '.join(SIGN_METHODS)} read it"
        )
    if not isinstance(spec.seed, numbers.Integral) or isinstance(spec.seed, bool):
        raise MergeConfigError(f"seed must be an integer, got {spec.seed!r}")


def tensor_seed(seed: int, name: str, index: int | None = None) -> int:
    """A 63-bit seed from ``(seed, tensor name[, task index])``: the first 8 bytes of
    ``blake2b(f"{seed}\\x00{name}[\\x00{index}]")`` as a big-endian integer, top bit cleared.

    A pure function of its arguments (no Python ``hash``, no global state), so it is the same in every process
    and whatever order tensors are merged in; different names or indices give unrelated seeds.
    """
    key = f"{int(seed)}\x00{name}" if index is None else f"{int(seed)}\x00{name}\x00{int(index)}"
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def _generator(seed: int, name: str, index: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name, index))


def needs_all_task_vectors(method: str) -> bool:
    """Whether `method` needs all task vectors at once (True: ties, dare_ties, tsv, iso_c), or is a weighted sum
    of independent per-task transforms (False: average, task_arithmetic, dare_linear, breadcrumbs), so that
    ranks can transform locally with :func:`per_task_transform` and all-reduce the sum."""
    if method not in METHODS:
        raise MergeConfigError(
            f"method: unknown merge method {method!r}; known methods: {', '.join(METHODS)}"
        )
    return method not in _SUM_DECOMPOSABLE


def per_task_transform(
    spec: MergeSpec, tau: Tensor, index: int, name: str = "", num_models: int | None = None
) -> Tensor:
    """The term of task `index` in a sum-decomposable merge, so that
    ``merge_deltas(spec, taus, name) == spec.scale * sum_i per_task_transform(spec, taus[i], i, name, n)``.

    Terms: task_arithmetic ``w_i tau_i``; dare_linear ``w_i m_i tau_i / density`` (mask seeded by
    ``(seed, name, i)``); breadcrumbs ``w_i tau_i * band_i``; average ``(w_i / sum_j w_j) tau_i``. The result is
    in the compute dtype (float32, float64 for float64 input), unscaled. `num_models` is required for
    ``average`` without weights (for ``1/n``), otherwise inferred from ``len(weights)`` when given.
    Methods that need all task vectors raise MergeConfigError.
    """
    if needs_all_task_vectors(spec.method):
        raise MergeConfigError(
            f"method {spec.method!r} is not a sum of per-task terms; merge it with merge_deltas on all task vectors"
        )
    n = num_models if num_models is not None else (len(spec.weights) if spec.weights is not None else None)
    if n is None:
        if spec.method == "average":
            raise MergeConfigError("per_task_transform for 'average' without weights needs num_models")
        n = index + 1
    spec.validate(n)
    if not 0 <= index < n:
        raise MergeConfigError(f"task index {index} out of range for {n} models")
    if not tau.is_floating_point():
        raise CheckpointError(f"tensor {name!r}: task vector has non-floating dtype {tau.dtype}")
    dtype = M.compute_dtype([tau])
    w = 1.0 if spec.weights is None else float(spec.weights[index])
    m = spec.method
    if m == "average":
        total = float(n) if spec.weights is None else float(sum(spec.weights))
        return tau.to(dtype=dtype, copy=True).mul_(w / total)
    if m == "task_arithmetic":
        out = tau.to(dtype=dtype, copy=True)
    elif m == "dare_linear":
        out = M.dare_linear(
            [tau], density=spec.effective_density, generator=[_generator(spec.seed, name, index)]
        )
    else:  # breadcrumbs
        out = M.breadcrumbs([tau], density=spec.effective_density, gamma=spec.effective_gamma)
    return out if w == 1.0 else out.mul_(w)


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

    For ``average`` the weighted mean of the deltas (so ``base + merge_deltas(...)`` is the weighted mean of
    the models). DARE masks come from per-task CPU generators seeded by ``tensor_seed(spec.seed, name, i)``.
    Raises MergeConfigError for an invalid spec, CheckpointError (naming `name`) for mismatched shapes or
    non-floating task vectors. Never modifies its inputs; the result never aliases them.
    """
    n = len(task_vectors)
    spec.validate(n)
    _check_shapes(name, task_vectors, "task vector")
    for i, t in enumerate(task_vectors):
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {name!r}: task vector {i} has non-floating dtype {t.dtype}")
    m, w = spec.method, spec.weights
    if m == "average":
        return M.average(task_vectors, w)
    if m == "task_arithmetic":
        out = M.task_arithmetic(task_vectors, w)
    elif m == "ties":
        out = M.ties(task_vectors, w, spec.effective_density, spec.majority_sign_method)
    elif m in ("dare_linear", "dare_ties"):
        gens = [_generator(spec.seed, name, i) for i in range(n)]
        if m == "dare_linear":
            out = M.dare_linear(task_vectors, w, spec.effective_density, generator=gens)
        else:
            out = M.dare_ties(
                task_vectors, w, spec.effective_density, spec.majority_sign_method, generator=gens
            )
    elif m == "breadcrumbs":
        out = M.breadcrumbs(task_vectors, w, spec.effective_density, spec.effective_gamma)
    elif m == "tsv":
        out = M.tsv(task_vectors, w)
    else:  # iso_c (validate() rejected anything else)
        out = M.iso_c(task_vectors, w)
    return out if spec.scale == 1.0 else out.mul_(spec.scale)


class TensorPlan:
    """Phase 2 of :func:`merge_tensor` for a :data:`SLICED_METHODS` method, made by :func:`plan_tensor`.

    :meth:`merge_slice` returns ``merge_tensor(spec, base, models, name).reshape(-1)[start:stop]`` (cast to
    ``out_dtype``) from the flat slices ``[start, stop)`` of the base and the models, bit for bit; slices must
    be visited in order from 0 and cover the tensor once.
    """

    def __init__(self, spec: MergeSpec, combine: M.SlicedCombine, dtype: torch.dtype, out_dtype: torch.dtype,
                 shape: torch.Size) -> None:
        self.spec = spec
        self.combine = combine
        self.dtype = dtype
        self.out_dtype = out_dtype
        self.shape = shape
        self.numel = combine.numel

    def merge_slice(self, base: Tensor, models: Sequence[Tensor], start: int) -> Tensor:
        """The merged flat slice ``[start, start + base.numel())`` in ``out_dtype`` (same ops as merge_tensor)."""
        b = base.reshape(-1).to(self.dtype)
        taus = [t.reshape(-1) - b for t in models]
        delta = self.combine.combine(taus, start)
        del taus
        if self.spec.scale != 1.0:
            delta.mul_(self.spec.scale)
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


def _combine_plan(spec: MergeSpec, magnitude: Callable[[int], Tensor], n: int, shape: torch.Size,
                  name: str) -> M.SlicedCombine:
    """Phase 1 of a SLICED_METHODS method; ``magnitude(i)`` gives ``|tau_i|`` (read once per task, in order)."""
    numel = math.prod(shape)
    density, w = spec.effective_density, spec.weights
    assert density is not None
    if spec.method == "ties":
        return M.ties_plan(magnitude, n, numel, w, density, spec.majority_sign_method)
    if spec.method == "dare_ties":
        gens = [_generator(spec.seed, name, i) for i in range(n)]
        return M.dare_ties_plan(shape, n, w, density, spec.majority_sign_method, generator=gens)
    gamma = spec.effective_gamma
    assert spec.method == "breadcrumbs" and gamma is not None
    return M.breadcrumbs_plan(magnitude, n, numel, w, density, gamma)


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
    cuts of ties / breadcrumbs; dare_ties draws its seeded masks instead and reads nothing);
    ``on_task_read(i, models[i])`` is called after model i was read (e.g. to drop its file pages). The plan's
    :meth:`TensorPlan.merge_slice` then merges slices in ``out_dtype`` (default: the base's dtype).
    Raises MergeConfigError for a method outside SLICED_METHODS or an invalid spec, CheckpointError
    (naming `name`) for mismatched shapes or non-floating tensors.
    """
    if spec.method not in SLICED_METHODS:
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
    b = base.to(dtype)

    def magnitude(i: int) -> Tensor:
        mag = (models[i] - b).abs_()  # one fresh buffer: the task vector, made its own magnitudes
        if on_task_read is not None:
            on_task_read(i, models[i])
        return mag

    combine = _combine_plan(spec, magnitude, len(models), base.shape, name)
    return TensorPlan(spec, combine, dtype, base.dtype if out_dtype is None else out_dtype, base.shape)


def merge_tensor(spec: MergeSpec, base: Tensor | None, models: Sequence[Tensor], name: str = "") -> Tensor:
    """The merged tensor `name`, in the base's dtype (the first model's dtype for ``average`` without a base).

    * non-floating tensors (int buffers): a copy of the base (of the first model when there is no base);
    * ``average``: ``sum_i w_i M_i / sum_i w_i`` (the base only sets the dtype and shape check);
    * otherwise: ``base + merge_deltas(spec, [M_i - base ...], name)``, computed in float32/float64.

    Raises CheckpointError naming `name` when shapes differ, MergeConfigError for an invalid spec or a
    missing base (every method but ``average`` needs one).
    """
    if len(models) == 0:
        raise MergeConfigError(f"tensor {name!r}: a merge needs at least one model")
    spec.validate(len(models))
    ref = base if base is not None else models[0]
    _check_shapes(name, models, "model", expected=ref.shape)
    if not ref.is_floating_point():
        return ref.clone()
    for i, t in enumerate(models):
        if not t.is_floating_point():
            raise CheckpointError(
                f"tensor {name!r}: model {i} has dtype {t.dtype} but the base is {ref.dtype}"
            )
    out_dtype = ref.dtype
    if spec.method == "average":
        return M.average(models, spec.weights).to(out_dtype)
    if base is None:
        raise MergeConfigError(
            f"method {spec.method!r} needs a base model (only 'average' works without one)"
        )
    if spec.method in SLICED_METHODS:
        # Phase 1 over whole tensors, phase 2 in slices: the streaming engine runs the same plan.
        return plan_tensor(spec, base, models, name).merge_all(base, models)
    dtype = M.compute_dtype([base, *models])
    b = base.to(dtype)
    # Type promotion (b is in the widest dtype) upcasts each model inside the subtraction: no extra copy.
    taus = [t - b for t in models]
    delta = merge_deltas(spec, taus, name)
    return delta.add_(b).to(out_dtype)
