"""Per-model and per-tensor merge parameters: layer gradients and name filters, resolved to one MergeSpec per tensor.

A parameter value is, as in mergekit configs:

* a scalar (``density: 0.5``);
* a **layer gradient**, a list of numbers interpolated linearly over the layer position of the tensor
  (``t: [0, 0.5, 1]``): with ``L`` layers, the tensor of layer ``i`` sits at ``x = i / (L - 1)`` (``x = 1`` when
  ``L == 1``), and the value is ``(1 - f) v[j] + f v[j + 1]`` with ``j = int(x (k - 1))``, ``f = x (k - 1) - j``
  for ``k`` values. Tensors outside the layers (embeddings, final norm, LM head) sit at ``x = 0``, as mergekit
  plans its pre- and post-layer weights. Strings and booleans pick ``v[int(x (k - 1))]``;
* a **filter list** ``[{filter: SUBSTRING, value: V}, ..., {value: DEFAULT}]``: the first entry whose filter is a
  substring of the tensor name (an entry without a filter, or with ``*``, matches every tensor) gives the value,
  itself a scalar or a gradient. A list without a default entry is refused (a tensor matching no filter would
  have no value).

Values may be given for all models (top-level options) or per model (``models: [{model: ID, parameters:
{weight: ..., density: ...}}]``); a per-model value wins over the top-level one for that model. The layer index
of a tensor is the first dotted integer component of its name (``model.layers.3.mlp...`` -> 3,
``transformer.h.0.attn...`` -> 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hf_atm.errors import MergeConfigError
from hf_atm.merging.registry import OPTIONS
from hf_atm.merging.spec import MergeSpec

__all__ = [
    "MODEL_OPTIONS",
    "TENSOR_OPTIONS",
    "ParameterPlan",
    "check_setting",
    "evaluate_setting",
    "is_varying",
    "layer_index",
    "layer_positions",
]

#: options that may vary with the tensor (gradients, filters): all but ``seed`` and ``weights`` (a top-level
#: ``weights`` list is one weight per model; a model's own ``weight`` may vary).
TENSOR_OPTIONS: tuple[str, ...] = tuple(o for o in OPTIONS if o not in ("seed", "weights"))
#: options a model may set for itself (mergekit's per-model ``parameters``); ``weight`` is ``weights``' entry.
MODEL_OPTIONS: tuple[str, ...] = tuple(o.name for o in OPTIONS.values() if o.per_model)

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The layer index of tensor `name` (its first dotted integer component), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_positions(names: Iterable[str]) -> dict[str, float]:
    """Each tensor's position ``x`` in [0, 1] over the layers (see the module docstring); 0 outside the layers."""
    names = list(names)
    indices = {n: layer_index(n) for n in names}
    count = max((i for i in indices.values() if i is not None), default=-1) + 1
    return {
        n: 0.0 if i is None else (i / (count - 1) if count > 1 else 1.0)
        for n, i in indices.items()
    }


def _is_filter_list(value: Any) -> bool:
    return isinstance(value, Mapping) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)
    )


def is_varying(value: Any) -> bool:
    """Whether `value` depends on the tensor (a gradient list or a filter list)."""
    return isinstance(value, list) or isinstance(value, Mapping)


def _number_or_label(value: Any, option: str) -> Any:
    if isinstance(value, (bool, str)) or (isinstance(value, (int, float)) and math.isfinite(float(value))):
        return value
    raise MergeConfigError(f"{option}: expected a number, a layer gradient list or a filter list, got {value!r}")


def check_setting(option: str, value: Any, where: str = "") -> None:
    """Refuse a malformed value of `option` (MergeConfigError naming it): empty lists, filter lists without a
    default entry, entries other than ``filter`` / ``value``, non-scalar gradient points."""
    label = f"{where}{option}"
    if _is_filter_list(value):
        entries = [value] if isinstance(value, Mapping) else value
        has_default = False
        for i, entry in enumerate(entries):
            unknown = sorted(str(k) for k in entry if k not in ("filter", "value"))
            if unknown or "value" not in entry:
                raise MergeConfigError(
                    f"{label}[{i}]: a filter entry is {{filter: SUBSTRING, value: V}} (or {{value: V}} for the "
                    f"default), got {dict(entry)!r}"
                )
            flt = entry.get("filter")
            if flt is None or flt == "*":
                has_default = True
            elif not isinstance(flt, str) or not flt:
                raise MergeConfigError(f"{label}[{i}].filter: expected a non-empty substring, got {flt!r}")
            check_setting(option, entry["value"], where=f"{label}[{i}].value -> ")
        if not has_default:
            raise MergeConfigError(
                f"{label}: the filter list has no default entry ({{value: V}} without a filter), so a tensor "
                "matching no filter would have no value"
            )
    elif isinstance(value, list):
        if not value:
            raise MergeConfigError(f"{label}: an empty list has no value")
        for v in value:
            _number_or_label(v, label)
    else:
        _number_or_label(value, label)


def evaluate_setting(value: Any, name: str, x: float) -> Any:
    """The value of a (checked) setting for tensor `name` at layer position `x` (see the module docstring)."""
    if _is_filter_list(value):
        for entry in [value] if isinstance(value, Mapping) else value:
            flt = entry.get("filter")
            if flt is None or flt == "*" or flt in name:
                return evaluate_setting(entry["value"], name, x)
        raise AssertionError("checked filter lists have a default")  # pragma: no cover
    if isinstance(value, list):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return value[int(x * (len(value) - 1))]
        scaled = x * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    return value


@dataclass(frozen=True)
class ParameterPlan:
    """The scalar spec plus the parameters that vary with the model or the tensor.

    ``spec``: the options that are the same everywhere (method, seed, scalar options).
    ``tensor_options``: top-level options whose value is a gradient or filter list.
    ``model_options``: per model (in ``models`` order) the options it sets for itself (any form), ``weight``
    under the name ``weights``.
    """

    spec: MergeSpec
    tensor_options: Mapping[str, Any] = field(default_factory=dict)
    model_options: Sequence[Mapping[str, Any]] = ()

    @property
    def uniform(self) -> bool:
        """True when every tensor gets :attr:`spec` itself."""
        return not self.tensor_options and not any(self.model_options)

    def check(self) -> None:
        """Refuse malformed values and options that cannot vary, naming the option and the model."""
        for option, value in self.tensor_options.items():
            if option not in TENSOR_OPTIONS:
                raise MergeConfigError(f"{option}: this option cannot vary across tensors")
            check_setting(option, value)
        for i, opts in enumerate(self.model_options):
            for option, value in opts.items():
                if option not in MODEL_OPTIONS:
                    allowed = ", ".join("weight" if o == "weights" else o for o in MODEL_OPTIONS)
                    raise MergeConfigError(
                        f"models[{i}].parameters.{option}: not a per-model option; per-model options: {allowed}"
                    )
                check_setting(option, value, where=f"models[{i}].parameters.")

    def spec_for(self, name: str, x: float, num_models: int) -> MergeSpec:
        """The MergeSpec of tensor `name` at layer position `x` (not validated)."""
        if self.uniform:
            return self.spec
        changes: dict[str, Any] = {
            option: evaluate_setting(value, name, x) for option, value in self.tensor_options.items()
        }
        per_model = {o for opts in self.model_options for o in opts}
        for option in per_model:
            fallback = changes.get(option, getattr(self.spec, option))
            values = []
            for i in range(num_models):
                opts = self.model_options[i] if i < len(self.model_options) else {}
                if option in opts:
                    values.append(evaluate_setting(opts[option], name, x))
                elif option == "weights":
                    values.append(1.0 if fallback is None else fallback[i])
                elif fallback is None:
                    # unset for this model and globally: the method's default (resolved by the spec)
                    values.append(replace(self.spec, **{option: None}).resolved(option))
                else:
                    values.append(fallback[i] if isinstance(fallback, tuple) else fallback)
            changes[option] = tuple(values)
        return replace(self.spec, **changes)

    def specs(self, names: Sequence[str], num_models: int) -> dict[str, MergeSpec]:
        """Every tensor's validated MergeSpec (MergeConfigError naming the option and the tensor at fault).

        A layer gradient needs layered tensor names: when no name of `names` has a layer index, the error
        names the first tensor.
        """
        self.check()
        varying = [("", o, v) for o, v in self.tensor_options.items()] + [
            (f"models[{i}].parameters.", o, v) for i, opts in enumerate(self.model_options) for o, v in opts.items()
        ]
        gradient = next(((w, o) for w, o, v in varying if _has_gradient(v)), None)
        if gradient is not None and names and all(layer_index(n) is None for n in names):
            where, option = gradient
            raise MergeConfigError(
                f"{where}{option}: a layer gradient needs tensors with a layer index in their names, but tensor "
                f"{names[0]!r} (and every other) has none; give a single value or a filter list"
            )
        positions = layer_positions(names)
        out: dict[str, MergeSpec] = {}
        for n in names:
            spec = self.spec_for(n, positions[n], num_models)
            try:
                spec.validate(num_models)
            except MergeConfigError as e:
                if self.uniform:
                    raise
                raise MergeConfigError(f"tensor {n!r}: {e}") from e
            out[n] = spec
        return out


def _has_gradient(value: Any) -> bool:
    if _is_filter_list(value):
        entries = [value] if isinstance(value, Mapping) else value
        return any(_has_gradient(e.get("value")) for e in entries)
    return isinstance(value, list)
