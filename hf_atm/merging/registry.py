"""The merge-method registry: one :class:`MethodRecord` per method, read by everything else.

Validation (:meth:`hf_atm.merging.spec.MergeSpec.validate`), the dispatch (``merge_deltas`` / ``merge_tensor``),
the streaming engine's choice of path, the CLI's ``--help``, ``ATMConfig``'s choices and the exchange of task
vectors between processes all read these records. A new method is one pure tensor function in
:mod:`hf_atm.merging.methods` plus one record here.

Each record's ``combine(spec, task_vectors, name)`` returns ``combine(tau_1..tau_n)`` for one tensor, unscaled
(the dispatcher applies ``scale`` and ``normalize``); methods that need the base tensor itself (``slerp``) have
``combine_models(spec, base, models, name, out_dtype)`` instead and no delta form, so they cannot run inside ATM rounds.
Per-model options (``density``, ``gamma``, ``epsilon``) arrive as one float or one per model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from hf_atm.errors import MergeConfigError
from hf_atm.merging import methods as M

__all__ = [
    "METHODS",
    "OPTIONS",
    "MethodRecord",
    "OptionRecord",
    "SpecOptions",
    "get_method",
    "methods_help",
    "tensor_generators",
    "tensor_seed",
]


class SpecOptions(Protocol):
    """What a record's functions read of a merge spec (:class:`hf_atm.merging.spec.MergeSpec` is one).

    A structural type, so that the registry does not import the spec module built on top of it.
    """

    method: str
    weights: Sequence[float] | None
    seed: int
    normalize: bool | None



# --------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class OptionRecord:
    """One merge option (a :class:`~hf_atm.merging.spec.MergeSpec` field other than ``method``).

    ``per_model``: may be given once per model (a list as long as ``models``), as mergekit configs do.
    ``check(value)`` returns None when a single value is valid, else what the value must be (for the error).
    """

    name: str
    help: str
    per_model: bool = False
    check: Callable[[Any], str | None] = field(default=lambda v: None, compare=False)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _in(lo: float, hi: float, lo_open: bool, hi_open: bool) -> Callable[[Any], str | None]:
    text = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def check(v: Any) -> str | None:
        if not _is_number(v):
            return f"a number in {text}"
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else f"in {text}"

    return check


def _finite(v: Any) -> str | None:
    return None if _is_number(v) else "a finite number"


def _non_negative(v: Any) -> str | None:
    return None if _is_number(v) and v >= 0 else "a number >= 0"


OPTIONS: dict[str, OptionRecord] = {
    o.name: o
    for o in (
        OptionRecord("weights", "one weight per model (default 1 each)", per_model=True, check=_finite),
        OptionRecord("scale", "lambda multiplying the combined task vectors", check=_finite),
        OptionRecord("density", "kept fraction of each task vector", per_model=True,
                     check=_in(0.0, 1.0, True, False)),
        OptionRecord("gamma", "dropped top fraction of each task vector (outliers)", per_model=True,
                     check=_in(0.0, 1.0, False, True)),
        OptionRecord("epsilon", "half-width of DELLA's keep probabilities around density", per_model=True,
                     check=_non_negative),
        OptionRecord("t", "interpolation factor from the base (0) to the model (1)", check=_in(0.0, 1.0, False, False)),
        OptionRecord("seed", "seed of random masks (with the tensor name and model index)"),
        OptionRecord("majority_sign_method", "TIES sign election: total (sum of values) or frequency (of signs)"),
        OptionRecord("rescale", "DARE / DELLA: kept entries divided by their keep probability (probability), the "
                     "kept vector scaled back to its L1 norm (l1, mergekit's rescale: true) or none",
                     check=lambda v: None if v in RESCALES else "one of probability, l1, none"),
        OptionRecord("normalize", "mergekit's normalize: true divides by the sum of the (agreeing) weights, false "
                     "does not; unset: peft's conventions"),
    )
}


#: the values of ``rescale`` ("none": the kept entries as they are).
RESCALES: tuple[str, ...] = ("probability", "l1", "none")


# --------------------------------------------------------------------------------------------- seeding
def tensor_seed(seed: int, name: str, index: int | None = None) -> int:
    """A 63-bit seed from ``(seed, tensor name[, task index])``: the first 8 bytes of
    ``blake2b(f"{seed}\\x00{name}[\\x00{index}]")`` as a big-endian integer, top bit cleared.

    A pure function of its arguments (no Python ``hash``, no global state), so it is the same in every process
    and whatever order tensors are merged in; different names or indices give unrelated seeds.
    """
    key = f"{int(seed)}\x00{name}" if index is None else f"{int(seed)}\x00{name}\x00{int(index)}"
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def tensor_generators(seed: int, name: str, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per model index, seeded by :func:`tensor_seed` (masks equal on every device)."""
    return [torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name, i)) for i in indices]


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class MethodRecord:
    """Everything the library knows about one merge method.

    Attributes:
        name: the method's name (``--method``, ``merge_method`` in YAML and in ATMConfig).
        summary: one line for ``--help``; ``paper``: where the formula comes from.
        options: the MergeSpec options it reads besides ``weights`` (always read, except by ``model_stock``
            and ``slerp``); others given to it are refused by name.
        defaults: default of each option left unset (shown in ``--help`` and written to merge_config.yaml).
        needs_base: False only for ``average`` / ``linear`` (the weighted mean of the models).
        min_models / max_models: how many models (besides the base) it merges.
        sum_decomposable: combine is ``sum_i f_i(tau_i)`` (ranks can transform locally and all-reduce).
        sliced: whole-tensor statistics, then element-wise: the engine streams it in slices via ``plan``.
        elementwise: element-wise in the inputs: the engine streams it in slices directly.
        on_models: the result is computed from the model tensors (and base), not the deltas alone.
        combine: ``(spec, task_vectors, name) -> combine(tau)`` or None (``slerp``).
        combine_models: ``(spec, base, models, name, out_dtype) -> merged tensor`` (in ``out_dtype``, computed in
            the compute dtype) for ``on_models`` methods.
        per_task: ``(spec, tau, index, name, num_models) -> term`` for sum-decomposable methods.
        plan: ``(spec, magnitude, num_models, shape, name) -> methods.SlicedCombine`` for sliced methods.
    """

    name: str
    summary: str
    paper: str
    options: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    sum_decomposable: bool = False
    sliced: bool = False
    elementwise: bool = False
    on_models: bool = False
    takes_weights: bool = True
    combine: Callable[..., Tensor] | None = None
    combine_models: Callable[..., Tensor] | None = None
    per_task: Callable[..., Tensor] | None = None
    plan: Callable[..., M.SlicedCombine] | None = None

    @property
    def in_atm(self) -> bool:
        """Usable inside ATM rounds, where only task vectors exist (not ``slerp``)."""
        return self.combine is not None

    def default(self, option: str) -> Any:
        """The default of `option` for this method (None when it has none)."""
        return self.defaults.get(option)


def _w(spec: SpecOptions) -> list[float] | None:
    return None if spec.weights is None else [float(w) for w in spec.weights]


def _opt(spec: SpecOptions, option: str) -> Any:
    """``spec.<option>`` or the method's default; per-model tuples become lists."""
    value = getattr(spec, option)
    if value is None:
        value = get_method(spec.method).default(option)
    return list(value) if isinstance(value, tuple) else value


def _rescale(spec: SpecOptions) -> str | None:
    value = _opt(spec, "rescale")
    return None if value == "none" else value


def _pick(value: Any, index: int) -> Any:
    return value[index] if isinstance(value, list) else value


def _gens(spec: SpecOptions, name: str, n: int) -> list[torch.Generator]:
    return tensor_generators(spec.seed, name, range(n))


# -- delta forms
def _task_arithmetic(spec: SpecOptions, taus: Sequence[Tensor], name: str) -> Tensor:
    return M.task_arithmetic(taus, _w(spec))


def _average(spec: SpecOptions, taus: Sequence[Tensor], name: str) -> Tensor:
    return M.average(taus, _w(spec))


def _ties(spec: SpecOptions, taus: Sequence[Tensor], name: str) -> Tensor:
    return M.ties(taus, _w(spec), _opt(spec, "density"), _opt(spec, "majority_sign_method"), spec.normalize)


def _dare_linear(spec: SpecOptions, taus: Sequence[Tensor], name: str) -> Tensor:
    return M.dare_linear(taus, _w(spec), _opt(spec, "density"), generator=_gens(spec, name, len(taus)),
                         rescale=_rescale(spec))


def _dare_ties(spec: SpecOptions, taus: Sequence[Tensor], name: str) -> Tensor:
    return M.dare_ties(taus, _w(spec), _opt(spec, "density"), _opt(spec, "majority_sign_method"),
                       generator=_gens(spec, name, len(taus)), normalize=spec.normalize, rescale=_rescale(spec))


def _breadcrumbs(spec: SpecOptions, taus: Sequence[Tensor], name: str) -> Tensor:
    return M.breadcrumbs(taus, _w(spec), _opt(spec, "density"), _opt(spec, "gamma"))


def _breadcrumbs_ties(spec: SpecOptions, taus: Sequence[Tensor], name: str) -> Tensor:
    return M.breadcrumbs_ties(taus, _w(spec), _opt(spec, "density"), _opt(spec, "gamma"),
                              _opt(spec, "majority_sign_method"), normalize=spec.normalize)


def _della(spec: SpecOptions, taus: Sequence[Tensor], name: str) -> Tensor:
    return M.della(taus, _w(spec), _opt(spec, "density"), _opt(spec, "epsilon"), _opt(spec, "majority_sign_method"),
                   generator=_gens(spec, name, len(taus)), normalize=spec.normalize, rescale=_rescale(spec))


def _della_linear(spec: SpecOptions, taus: Sequence[Tensor], name: str) -> Tensor:
    return M.della_linear(taus, _w(spec), _opt(spec, "density"), _opt(spec, "epsilon"),
                          generator=_gens(spec, name, len(taus)), rescale=_rescale(spec))


def _tsv(spec: SpecOptions, taus: Sequence[Tensor], name: str) -> Tensor:
    return M.tsv(taus, _w(spec))


def _iso_c(spec: SpecOptions, taus: Sequence[Tensor], name: str) -> Tensor:
    return M.iso_c(taus, _w(spec))


def _model_stock(spec: SpecOptions, taus: Sequence[Tensor], name: str) -> Tensor:
    return M.model_stock(taus)


# -- model forms
def _average_models(spec: SpecOptions, base: Tensor | None, models: Sequence[Tensor], name: str,
                    out_dtype: torch.dtype) -> Tensor:
    return M.average(models, _w(spec)).to(out_dtype)


def _slerp_models(spec: SpecOptions, base: Tensor | None, models: Sequence[Tensor], name: str,
                  out_dtype: torch.dtype) -> Tensor:
    assert base is not None
    return M.slerp(base, models[0], float(_opt(spec, "t")), out_dtype=out_dtype)


# -- per-task terms of the sum-decomposable methods
def _unit(spec: SpecOptions, index: int) -> float:
    return 1.0 if spec.weights is None else float(spec.weights[index])


def _term_task_arithmetic(spec: SpecOptions, tau: Tensor, index: int, name: str, n: int) -> Tensor:
    return tau.to(dtype=M.compute_dtype([tau]), copy=True)


def _term_average(spec: SpecOptions, tau: Tensor, index: int, name: str, n: int) -> Tensor:
    total = float(n) if spec.weights is None else float(sum(spec.weights))
    # the weight is folded in here (average's terms are w_i / sum w), so the caller does not multiply again
    return tau.to(dtype=M.compute_dtype([tau]), copy=True).mul_(_unit(spec, index) / total)


def _term_dare_linear(spec: SpecOptions, tau: Tensor, index: int, name: str, n: int) -> Tensor:
    gen = tensor_generators(spec.seed, name, [index])
    return M.dare_linear([tau], density=_pick(_opt(spec, "density"), index), generator=gen, rescale=_rescale(spec))


def _term_breadcrumbs(spec: SpecOptions, tau: Tensor, index: int, name: str, n: int) -> Tensor:
    return M.breadcrumbs([tau], density=_pick(_opt(spec, "density"), index), gamma=_pick(_opt(spec, "gamma"), index))


def _term_della_linear(spec: SpecOptions, tau: Tensor, index: int, name: str, n: int) -> Tensor:
    gen = tensor_generators(spec.seed, name, [index])
    return M.della_linear([tau], density=_pick(_opt(spec, "density"), index),
                          epsilon=_pick(_opt(spec, "epsilon"), index), generator=gen, rescale=_rescale(spec))


# -- sliced plans (phase 1 of the two-phase methods)
def _plan_ties(spec: SpecOptions, magnitude: Callable[[int], Tensor], n: int, shape: torch.Size,
               name: str) -> M.SlicedCombine:
    return M.ties_plan(magnitude, n, math.prod(shape), _w(spec), _opt(spec, "density"),
                       _opt(spec, "majority_sign_method"), spec.normalize)


def _plan_dare_ties(spec: SpecOptions, magnitude: Callable[[int], Tensor], n: int, shape: torch.Size,
                    name: str) -> M.SlicedCombine:
    return M.dare_ties_plan(shape, n, _w(spec), _opt(spec, "density"), _opt(spec, "majority_sign_method"),
                            generator=_gens(spec, name, n), normalize=spec.normalize, rescale=_rescale(spec),
                            magnitude=magnitude)


def _plan_breadcrumbs(spec: SpecOptions, magnitude: Callable[[int], Tensor], n: int, shape: torch.Size,
                      name: str) -> M.SlicedCombine:
    return M.breadcrumbs_plan(magnitude, n, math.prod(shape), _w(spec), _opt(spec, "density"), _opt(spec, "gamma"))


def _plan_breadcrumbs_ties(spec: SpecOptions, magnitude: Callable[[int], Tensor], n: int, shape: torch.Size,
                           name: str) -> M.SlicedCombine:
    return M.breadcrumbs_ties_plan(magnitude, n, math.prod(shape), _w(spec), _opt(spec, "density"),
                                   _opt(spec, "gamma"), _opt(spec, "majority_sign_method"), spec.normalize)


_GTA = ("scale", "normalize")  # options of every generalized-task-arithmetic method
_SIGN = ("majority_sign_method",)

_RECORDS: tuple[MethodRecord, ...] = (
    MethodRecord(
        "average", "weighted mean of the models: sum_i w_i M_i / sum_i w_i", "Wortsman et al. 2022 (model soups)",
        needs_base=False, sum_decomposable=True, elementwise=True, on_models=True,
        combine=_average, combine_models=_average_models, per_task=_term_average,
    ),
    MethodRecord(
        "linear", "mergekit's name for average: sum_i w_i M_i / sum_i w_i", "Wortsman et al. 2022 (model soups)",
        needs_base=False, sum_decomposable=True, elementwise=True, on_models=True,
        combine=_average, combine_models=_average_models, per_task=_term_average,
    ),
    MethodRecord(
        "task_arithmetic", "BASE + scale * sum_i w_i tau_i", "Ilharco et al., ICLR 2023",
        options=_GTA, defaults={"scale": 1.0}, sum_decomposable=True, elementwise=True,
        combine=_task_arithmetic, per_task=_term_task_arithmetic,
    ),
    MethodRecord(
        "ties", "trim to the top density by magnitude, elect signs, disjoint mean", "Yadav et al., NeurIPS 2023",
        options=(*_GTA, "density", *_SIGN),
        defaults={"scale": 1.0, "density": 0.2, "majority_sign_method": "total"},
        sliced=True, combine=_ties, plan=_plan_ties,
    ),
    MethodRecord(
        "dare_linear", "random drop with keep probability density, rescale 1/density, weighted sum",
        "Yu et al., ICML 2024", options=(*_GTA, "density", "seed", "rescale"),
        defaults={"scale": 1.0, "density": 0.5, "seed": 0, "rescale": "probability"}, sum_decomposable=True,
        combine=_dare_linear, per_task=_term_dare_linear,
    ),
    MethodRecord(
        "dare_ties", "DARE's random drop and rescale, then TIES' sign election and disjoint mean",
        "Yu et al., ICML 2024", options=(*_GTA, "density", "seed", "rescale", *_SIGN),
        defaults={"scale": 1.0, "density": 0.5, "seed": 0, "rescale": "probability", "majority_sign_method": "total"},
        sliced=True, combine=_dare_ties, plan=_plan_dare_ties,
    ),
    MethodRecord(
        "breadcrumbs", "drop the top gamma (outliers) and the bottom of each task vector, weighted sum",
        "Davari & Belilovsky, ECCV 2024", options=(*_GTA, "density", "gamma"),
        defaults={"scale": 1.0, "density": 0.9, "gamma": 0.01}, sum_decomposable=True,
        sliced=True, combine=_breadcrumbs, per_task=_term_breadcrumbs, plan=_plan_breadcrumbs,
    ),
    MethodRecord(
        "breadcrumbs_ties", "Breadcrumbs' mask, then TIES' sign election and disjoint mean",
        "Davari & Belilovsky, ECCV 2024", options=(*_GTA, "density", "gamma", *_SIGN),
        defaults={"scale": 1.0, "density": 0.9, "gamma": 0.01, "majority_sign_method": "total"},
        sliced=True, combine=_breadcrumbs_ties, plan=_plan_breadcrumbs_ties,
    ),
    MethodRecord(
        "della", "magnitude-ranked keep probabilities in density +- epsilon, rescale 1/p, TIES election",
        "Deep et al., 2024 (DELLA-Merging)", options=(*_GTA, "density", "epsilon", "seed", "rescale", *_SIGN),
        defaults={"scale": 1.0, "density": 0.5, "epsilon": 0.15, "seed": 0, "rescale": "probability",
                  "majority_sign_method": "total"},
        combine=_della,
    ),
    MethodRecord(
        "della_linear", "magnitude-ranked keep probabilities in density +- epsilon, rescale 1/p, weighted sum",
        "Deep et al., 2024 (DELLA-Merging)", options=(*_GTA, "density", "epsilon", "seed", "rescale"),
        defaults={"scale": 1.0, "density": 0.5, "epsilon": 0.15, "seed": 0, "rescale": "probability"},
        sum_decomposable=True, combine=_della_linear, per_task=_term_della_linear,
    ),
    MethodRecord(
        "tsv", "Task Singular Vectors merge (TSV-M) on 2-D weights, mean elsewhere", "Gargiulo et al., CVPR 2025",
        options=("scale",), defaults={"scale": 1.0}, combine=_tsv,
    ),
    MethodRecord(
        "iso_c", "isotropic spectrum of the summed task vectors on 2-D weights", "Marczak et al., ICML 2025",
        options=("scale",), defaults={"scale": 1.0}, combine=_iso_c,
    ),
    MethodRecord(
        "model_stock", "BASE + t * mean_i tau_i with t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine",
        "Jang et al., ECCV 2024", options=("scale",), defaults={"scale": 1.0}, min_models=2, takes_weights=False,
        combine=_model_stock,
    ),
    MethodRecord(
        "slerp", "spherical interpolation from the base (t = 0) to one model (t = 1)", "Shoemake 1985; mergekit",
        options=("t",), defaults={"t": 0.5}, min_models=1, max_models=1, on_models=True, takes_weights=False,
        combine_models=_slerp_models,
    ),
)
_BY_NAME: dict[str, MethodRecord] = {r.name: r for r in _RECORDS}

#: every method name, in the order ``--help`` lists them.
METHODS: tuple[str, ...] = tuple(_BY_NAME)


def get_method(name: str, option: str = "method") -> MethodRecord:
    """The record of method `name` (MergeConfigError naming `option` and the known methods otherwise)."""
    record = _BY_NAME.get(name) if isinstance(name, str) else None
    if record is None:
        raise MergeConfigError(f"{option}: unknown merge method {name!r}; known methods: {', '.join(METHODS)}")
    return record


def methods_help() -> str:
    """One line per method with its options and their defaults (the CLI's ``--help`` epilog)."""
    lines = ["merge methods (option defaults in brackets):"]
    for r in _RECORDS:
        opts = ", ".join(f"{o}={r.defaults[o]}" if o in r.defaults else o for o in r.options if o != "normalize")
        count = f"{r.min_models}" if r.max_models == r.min_models else f">= {r.min_models}"
        lines.append(f"  {r.name:<17} {r.summary} [{opts or 'weights only'}; models {count}]")
    return "\n".join(lines)
