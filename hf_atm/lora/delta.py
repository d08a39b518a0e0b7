"""LoRA adapters (peft) as task vectors: per module, the weight delta ``B @ A * scaling`` that peft adds to the
base weight when it merges the adapter (``merge_and_unload``).

An adapter folder (or Hub repo) holds ``adapter_config.json`` and ``adapter_model.safetensors``. Its tensors
are named by peft's convention, ``base_model.model.<module path>.<lora tensor>``:

* ``<m>.lora_A.weight`` (r, in), ``<m>.lora_B.weight`` (out, r) [+ ``<m>.lora_B.bias`` with ``lora_bias``]:
  a Linear (or GPT-2 style Conv1D) layer; the delta of ``<m>.weight`` is ``transpose(B @ A, fan_in_fan_out) *
  scaling`` and that of ``<m>.bias`` is ``lora_B.bias * scaling``;
* ``<m>.lora_embedding_A`` (r, num_embeddings), ``<m>.lora_embedding_B`` (dim, r): an Embedding; the delta of
  ``<m>.weight`` is ``(B @ A).T * scaling``;
* any other tensor is a full replacement of a base tensor: ``modules_to_save`` (e.g. a classifier head,
  ``<m>.weight``) or a bias trained with ``bias="all" | "lora_only"`` (``<m>.base_layer.bias``).

``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with ``r`` and ``lora_alpha`` taken
per module from ``rank_pattern`` / ``alpha_pattern`` exactly as peft does (``peft.utils.other.get_pattern_key``).
The delta is computed as peft's ``get_delta_weight`` does on CPU: half-precision factors are multiplied in
float32 and the result is cast back to the adapter's dtype.

Module paths are matched against the base checkpoint's actual tensor names, so an adapter trained on a task
model (``bert.encoder...``) applies to a bare-model checkpoint (``encoder...``) and vice versa; a module that
matches no tensor, or several, is an error naming it. Adapters whose merged weights are not ``B @ A *
scaling`` are refused with a clear error: DoRA and the other LoRA variants, convolution layers, PiSSA / OLoRA /
CorDA / LoftQ adapters saved without conversion (their base weights were changed), ``target_parameters``,
trainable tokens and layer replication.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_atm.errors import CheckpointError
from hf_atm.hub.headers import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, HubInput

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_PREFIX",
    "LoraAdapter",
    "LoraModule",
    "adapter_base_reference",
    "adapter_deltas",
    "adapter_targets",
    "check_adapter_headers",
    "check_full_shape",
    "is_adapter_folder",
    "load_adapter",
    "match_base_names",
    "read_adapter_config",
]

ADAPTER_PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# init_lora_weights values whose adapters are relative to a modified base (until peft converts them on save).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_LINEAR = re.compile(r"^(?P<m>.+)\.lora_(?P<ab>[AB])\.(?P<p>weight|bias)$")
_EMBEDDING = re.compile(r"^(?P<m>.+)\.lora_embedding_(?P<ab>[AB])$")


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding a peft ``adapter_config.json``."""
    return (Path(path) / ADAPTER_CONFIG_NAME).is_file()


def _lora_variant_fields() -> tuple[set[str], set[str]]:
    """(LoraConfig fields that switch on a LoRA variant, init_lora_weights values that do), from peft itself."""
    try:
        from peft import LoraConfig
    except ImportError:  # pragma: no cover - peft is a dependency
        return {"use_dora"}, set()
    flags, inits = set(), set()
    for f in dataclasses.fields(LoraConfig):
        if f.metadata.get("is_lora_variant"):
            flags.add(f.name)
        if f.name == "init_lora_weights":
            inits.update(f.metadata.get("lora_variants", ()))
    return flags, inits


def read_adapter_config(folder: str | os.PathLike, label: str | None = None) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``, checked to describe a plain LoRA adapter hf-atm can merge.

    Raises CheckpointError naming the adapter and the setting at fault for a missing / corrupt config, a non-LoRA
    peft type, a LoRA variant (DoRA, aLoRA, ...), a base-changing initialisation saved without conversion,
    ``target_parameters``, ``trainable_token_indices`` or ``layer_replication``.
    """
    folder = Path(folder)
    label = label or str(folder)
    path = folder / ADAPTER_CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"adapter {label}: cannot read {path}: {e}") from e
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise CheckpointError(
            f"adapter {label} is a {config.get('peft_type')!r} adapter ({path}); only LoRA adapters are supported"
        )
    flags, variant_inits = _lora_variant_fields()
    for name in sorted(flags | {"use_dora"}):
        if config.get(name):
            what = "DoRA (use_dora)" if name == "use_dora" else f"the LoRA variant {name!r}"
            raise CheckpointError(
                f"adapter {label} uses {what}: its merged weights are not B @ A * scaling, which hf-atm merges; "
                "only plain LoRA adapters are supported"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str):
        if init in variant_inits:
            raise CheckpointError(
                f"adapter {label} uses the LoRA variant init_lora_weights={init!r}; only plain LoRA is supported"
            )
        if init.lower().startswith(_BASE_CHANGING_INITS):
            raise CheckpointError(
                f"adapter {label} was initialised with init_lora_weights={init!r}, which changes the base weights; "
                "save it converted to a plain LoRA (peft: save_pretrained(..., "
                "path_initial_model_for_weight_conversion=...)) and merge that"
            )
    for name, what in (
        ("target_parameters", "LoRA on raw parameters (target_parameters)"),
        ("trainable_token_indices", "trainable tokens (trainable_token_indices)"),
        ("layer_replication", "layer replication (layer_replication)"),
    ):
        if config.get(name):
            raise CheckpointError(f"adapter {label} uses {what}, which hf-atm does not support")
    return config


def adapter_base_reference(folder: str | os.PathLike) -> str | None:
    """``base_model_name_or_path`` of the adapter's config (the base it was trained on), or None."""
    value = read_adapter_config(folder).get("base_model_name_or_path")
    return str(value) if value else None


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module of an adapter.

    ``path``: module path in the adapter (peft prefix removed); ``kind``: ``"linear"`` or ``"embedding"``;
    ``a_key`` / ``b_key`` / ``bias_key``: tensor names in the adapter file; ``rank``, ``alpha`` and ``scaling``
    as peft computes them for this module; ``fan_in_fan_out``: the config's flag (the orientation actually used
    is decided against the base weight's shape, see :meth:`LoraAdapter.delta`).
    """

    path: str
    kind: str
    a_key: str
    b_key: str
    bias_key: str | None
    rank: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool


@dataclass
class LoraAdapter:
    """A parsed LoRA adapter: its config, LoRA modules and full replacement tensors, read lazily from its file.

    ``modules``: module path -> :class:`LoraModule`; ``full``: parameter path (e.g. ``classifier.weight``,
    ``encoder.layer.0.attention.self.query.bias``) -> tensor key, for tensors the adapter stores whole
    (``modules_to_save``, trained biases). Use :func:`load_adapter` to build one; close it with :meth:`close`.
    """

    folder: Path
    label: str
    config: dict[str, Any]
    file: Path
    modules: dict[str, LoraModule]
    full: dict[str, str]
    dtype: torch.dtype
    _handle: Any = field(default=None, repr=False)
    _state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def tensor(self, key: str) -> torch.Tensor:
        """The adapter tensor `key` as stored."""
        if self._state is not None:
            return self._state[key]
        return self._handle.get_tensor(key)

    def close(self) -> None:
        self._handle = None
        self._state = None

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- deltas
    def transposes(self, module: LoraModule, base_shape: tuple[int, ...]) -> bool:
        """Whether peft transposes ``B @ A`` for `module` on a base weight of `base_shape`.

        Linear weights are (out, in) and take ``B @ A`` as is; GPT-2 style Conv1D weights are (in, out) and take
        it transposed (peft's ``fan_in_fan_out``, which peft forces per layer type). The shape decides; for a
        square weight, where it cannot, the config's ``fan_in_fan_out`` does. Embeddings always transpose.
        Raises CheckpointError naming the module when neither orientation fits.
        """
        a_shape = tuple(self.tensor(module.a_key).shape)
        b_shape = tuple(self.tensor(module.b_key).shape)
        if module.kind == "embedding":
            expected = (a_shape[1], b_shape[0])
            if tuple(base_shape) != expected:
                raise CheckpointError(
                    f"adapter {self.label}: embedding module {module.path!r} gives a delta of shape {expected} but "
                    f"the base weight has shape {tuple(base_shape)}"
                )
            return True
        straight, flipped = (b_shape[0], a_shape[1]), (a_shape[1], b_shape[0])
        if tuple(base_shape) == straight == flipped:
            return module.fan_in_fan_out
        if tuple(base_shape) == straight:
            return False
        if tuple(base_shape) == flipped:
            return True
        raise CheckpointError(
            f"adapter {self.label}: module {module.path!r} (lora_A {a_shape}, lora_B {b_shape}) does not fit the base "
            f"weight of shape {tuple(base_shape)}"
        )

    def delta(self, module: LoraModule, base_shape: tuple[int, ...]) -> torch.Tensor:
        """The delta peft adds to `module`'s base weight (of `base_shape`), in the adapter's dtype."""
        a, b = self.tensor(module.a_key), self.tensor(module.b_key)
        half = a.dtype in (torch.float16, torch.bfloat16)  # peft multiplies half factors in float32 on CPU
        if half:
            a, b = a.float(), b.float()
        w = b @ a
        if self.transposes(module, base_shape):
            w = w.T
        out = w * module.scaling
        return out.to(self.dtype) if half else out

    def bias_delta(self, module: LoraModule) -> torch.Tensor | None:
        """``lora_B.bias * scaling`` (what peft adds to the base bias with ``lora_bias``), or None."""
        if module.bias_key is None:
            return None
        return self.tensor(module.bias_key) * module.scaling


def _open(folder: Path, label: str, allow_pickle: bool) -> tuple[Path, Any, dict[str, torch.Tensor] | None, list[str]]:
    """(weights file, safe_open handle or None, loaded state dict or None, tensor names)."""
    st = folder / ADAPTER_WEIGHTS_NAME
    if st.is_file():
        from safetensors import safe_open

        try:
            handle = safe_open(str(st), framework="pt", device="cpu")
            return st, handle, None, list(handle.keys())
        except Exception as e:
            raise CheckpointError(f"adapter {label}: corrupt or unreadable {st}: {e}") from e
    pt = folder / ADAPTER_PICKLE_NAME
    if pt.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"adapter {label}: {pt} is a pickle and no {ADAPTER_WEIGHTS_NAME} is beside it; unpickling can run "
                "code, so pass --allow-pickle (torch.load weights_only=True) only if you trust it"
            )
        try:
            state = torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"adapter {label}: cannot load {pt} with weights_only=True: {e}") from e
        return pt, None, dict(state), list(state)
    raise CheckpointError(f"adapter {label}: no {ADAPTER_WEIGHTS_NAME} in {folder}")


def load_adapter(folder: str | os.PathLike, *, label: str | None = None, allow_pickle: bool = False) -> LoraAdapter:
    """Parse the LoRA adapter in `folder` (config checked by :func:`read_adapter_config`, tensor names sorted
    into LoRA modules and full tensors, ranks checked against the config). Tensors are read lazily.

    Raises CheckpointError naming the adapter and module for DoRA magnitude vectors, LoRA on convolutions,
    unknown ``lora_`` tensors, a missing A or B, or a rank that contradicts ``r`` / ``rank_pattern``.
    """
    from peft.utils.other import get_pattern_key

    folder = Path(folder)
    label = label or str(folder)
    config = read_adapter_config(folder, label)
    file, handle, state, keys = _open(folder, label, allow_pickle)
    adapter = LoraAdapter(folder, label, config, file, {}, {}, torch.float32, handle, state)
    parts: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    for key in keys:
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(
                f"adapter {label}: tensor {key!r} in {file} does not start with {PEFT_PREFIX!r}; not a peft adapter"
            )
        rel = key[len(PEFT_PREFIX):]
        if "lora_magnitude_vector" in rel:
            module = rel.split(".lora_magnitude_vector")[0]
            raise CheckpointError(f"adapter {label}: module {module!r} is a DoRA module (lora_magnitude_vector); "
                                  "only plain LoRA adapters are supported")
        if (m := _LINEAR.match(rel)) is not None:
            slot = "bias" if m["p"] == "bias" else m["ab"]
            if slot == "bias" and m["ab"] == "A":
                raise CheckpointError(f"adapter {label}: unexpected tensor {key!r} (lora_A has no bias)")
            parts.setdefault(m["m"], {})[slot] = key
            kinds[m["m"]] = "linear"
        elif (m := _EMBEDDING.match(rel)) is not None:
            parts.setdefault(m["m"], {})[m["ab"]] = key
            kinds[m["m"]] = "embedding"
        elif "lora_" in rel or "trainable_tokens" in rel:
            raise CheckpointError(f"adapter {label}: tensor {key!r} is of a kind hf-atm does not support")
        else:
            adapter.full[rel.replace(".base_layer.", ".")] = key
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for path, slots in sorted(parts.items()):
        if "A" not in slots or "B" not in slots:
            raise CheckpointError(f"adapter {label}: module {path!r} lacks lora_{'A' if 'A' not in slots else 'B'}")
        a = adapter.tensor(slots["A"])
        if a.dim() != 2 or adapter.tensor(slots["B"]).dim() != 2:
            raise CheckpointError(
                f"adapter {label}: module {path!r} is a convolution LoRA (lora_A of shape {tuple(a.shape)}); only "
                "Linear, Conv1D and Embedding layers are supported"
            )
        rank = int(a.shape[0])
        r = rank_pattern.get(get_pattern_key(list(rank_pattern), path), config.get("r", rank))
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), path), config.get("lora_alpha", 8))
        if int(r) != rank:
            raise CheckpointError(
                f"adapter {label}: module {path!r} has rank {rank} in {file} but r={r} in its config"
            )
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        adapter.modules[path] = LoraModule(
            path=path, kind=kinds[path], a_key=slots["A"], b_key=slots["B"], bias_key=slots.get("bias"),
            rank=rank, alpha=float(alpha), scaling=scaling, fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        )
        adapter.dtype = adapter.tensor(slots["B"]).dtype
    if not adapter.modules and not adapter.full:
        raise CheckpointError(f"adapter {label}: {file} holds no tensors")
    return adapter


# ------------------------------------------------------------------------------------------ name matching
def match_base_names(paths: Collection[str], base_names: Collection[str], label: str, base_label: str) -> dict[str, str]:
    """Map adapter parameter paths (``encoder.layer.0.attention.self.query.weight``) to base tensor names.

    A path matches the base tensor of the same name; else the one base tensor that ends with ``"." + path``
    (the base has an extra prefix, e.g. a task-model checkpoint's ``bert.``); else the path with leading
    components dropped (the adapter has the prefix). Raises CheckpointError naming the parameter when nothing
    or more than one tensor matches.
    """
    base = set(base_names)
    by_suffix: dict[str, list[str]] = {}
    for name in base:
        comps = name.split(".")
        for i in range(1, len(comps) - 1):
            by_suffix.setdefault(".".join(comps[i:]), []).append(name)
    out = {}
    for path in paths:
        if path in base:
            out[path] = path
            continue
        found = sorted(by_suffix.get(path, ()))
        if not found:
            comps = path.split(".")
            for i in range(1, len(comps) - 1):
                if ".".join(comps[i:]) in base:
                    found = [".".join(comps[i:])]
                    break
        if len(found) > 1:
            raise CheckpointError(
                f"adapter {label}: {path!r} matches several tensors of the base {base_label}: {', '.join(found[:5])}"
            )
        if not found:
            tail = ".".join(path.split(".")[-3:])
            near = sorted(n for n in base if n.endswith(tail))[:3]
            hint = f" (base tensors ending like it: {', '.join(near)})" if near else ""
            raise CheckpointError(
                f"adapter {label}: {path!r} matches no tensor of the base {base_label}{hint}; is this adapter for "
                "another model?"
            )
        out[path] = found[0]
    return out


def check_adapter_headers(adapter: HubInput, base: HubInput) -> None:
    """Every module of `adapter` maps to one base tensor, with lora_A / lora_B shapes that fit it: checked from
    the two inputs' safetensors headers (:func:`hf_atm.hub.headers.read_hub_input`), before any weight download.

    An adapter of a kind :func:`load_adapter` refuses is left alone here (the engine names the problem).
    Raises CheckpointError naming the adapter, the module and the base tensor that does not fit.
    """
    modules: dict[str, dict[str, Any]] = {}
    kinds: dict[str, str] = {}
    full: dict[str, Any] = {}
    for key in adapter.names:
        if not key.startswith(PEFT_PREFIX):
            return  # not a peft adapter: load_adapter names the problem
        rel, t = key[len(PEFT_PREFIX):], adapter.tensors[key]
        if (m := _LINEAR.match(rel)) is not None:
            modules.setdefault(m["m"], {})["bias" if m["p"] == "bias" else m["ab"]] = t
            kinds[m["m"]] = "linear"
        elif (m := _EMBEDDING.match(rel)) is not None:
            modules.setdefault(m["m"], {})[m["ab"]] = t
            kinds[m["m"]] = "embedding"
        elif "lora_" in rel or "trainable_tokens" in rel:
            return  # a kind the engine refuses with its own message
        else:
            full[rel.replace(".base_layer.", ".")] = t
    wanted: dict[str, tuple[str, str]] = {}
    for path, slots in modules.items():
        if "A" not in slots or "B" not in slots or len(slots["A"].shape) != 2 or len(slots["B"].shape) != 2:
            return  # the engine names the malformed module
        wanted[f"{path}.weight"] = ("weight", path)
        if "bias" in slots:
            wanted[f"{path}.bias"] = ("bias", path)
    for path in full:
        wanted[path] = ("full", path)
    targets = match_base_names(list(wanted), base.names, adapter.label, base.label)
    for path, name in targets.items():
        kind, key = wanted[path]
        shape = base.tensors[name].shape
        if kind == "full":
            t = full[key]
            if t.shape != shape:
                raise CheckpointError(
                    f"adapter {adapter.label}: tensor {t.name!r} has shape {t.shape} but the base {base.label} has "
                    f"{shape} for {name!r}"
                )
            continue
        a, b = modules[key]["A"].shape, modules[key]["B"].shape
        if kind == "bias":
            fits = modules[key]["bias"].shape == shape
        elif kinds[key] == "embedding":
            fits = shape == (a[1], b[0])
        else:
            fits = shape in ((b[0], a[1]), (a[1], b[0]))
        if not fits:
            raise CheckpointError(
                f"adapter {adapter.label}: module {key!r} (lora_A {a}, lora_B {b}) does not fit tensor {name!r} of "
                f"shape {shape} in the base {base.label}; is this adapter for another model?"
            )


def adapter_targets(adapter: LoraAdapter, base_names: Collection[str], base_label: str) -> dict[str, tuple[str, Any]]:
    """Base tensor name -> what the adapter changes there: ``("weight", module)``, ``("bias", module)`` or
    ``("full", key)``. Raises CheckpointError for unmatched names or two changes to one tensor."""
    wanted: dict[str, tuple[str, Any]] = {}
    for module in adapter.modules.values():
        wanted[f"{module.path}.weight"] = ("weight", module)
        if module.bias_key is not None:
            wanted[f"{module.path}.bias"] = ("bias", module)
    for path, key in adapter.full.items():
        if path in wanted:
            raise CheckpointError(f"adapter {adapter.label}: {path!r} is both LoRA-adapted and stored whole ({key})")
        wanted[path] = ("full", key)
    names = match_base_names(list(wanted), base_names, adapter.label, base_label)
    out: dict[str, tuple[str, Any]] = {}
    for path, base_name in names.items():
        if base_name in out:
            raise CheckpointError(f"adapter {adapter.label}: two adapter tensors map to the base tensor {base_name!r}")
        out[base_name] = wanted[path]
    return out


def _base_reader(base: Any, adapter_dir: Path, allow_pickle: bool) -> tuple[Any, bool]:
    """(CheckpointReader, owned) for `base`: a reader, a folder / repo id, or None (the adapter's own base)."""
    from hf_atm.hub.resolve import resolve_model
    from hf_atm.merging.io import CheckpointReader

    if isinstance(base, CheckpointReader):
        return base, False
    if base is None:
        base = adapter_base_reference(adapter_dir)
        if base is None:
            raise CheckpointError(
                f"adapter {adapter_dir}: its config names no base_model_name_or_path; give the base explicitly"
            )
    path = resolve_model(base, allow_pickle=allow_pickle)
    return CheckpointReader(path, allow_pickle=allow_pickle, label=str(base)), True


def adapter_deltas(
    adapter_dir: str | os.PathLike,
    base: Any = None,
    *,
    allow_pickle: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(base tensor name, delta)`` for every base tensor the adapter changes, in the base's storage order.

    `base`: a :class:`~hf_atm.merging.io.CheckpointReader`, a folder or Hub repo id, or None for the
    adapter's ``base_model_name_or_path``. LoRA modules give peft's ``B @ A * scaling`` (and ``lora_B.bias *
    scaling``) in the adapter's dtype; tensors the adapter stores whole (``modules_to_save``, trained biases)
    give ``stored - base`` in float32 (float64 for float64 tensors). The sum of base and deltas is the model
    peft's ``merge_and_unload()`` returns. Raises CheckpointError as :func:`load_adapter` and
    :func:`match_base_names` do.
    """
    adapter_dir = Path(adapter_dir)
    reader, owned = _base_reader(base, adapter_dir, allow_pickle)
    try:
        with load_adapter(adapter_dir, allow_pickle=allow_pickle) as adapter:
            targets = adapter_targets(adapter, reader.names, reader.label)
            for name in reader.names:
                if name not in targets:
                    continue
                kind, what = targets[name]
                info = reader.info(name)
                if kind == "weight":
                    yield name, adapter.delta(what, info.shape)
                elif kind == "bias":
                    yield name, adapter.bias_delta(what)
                else:
                    stored, b = adapter.tensor(what), reader.get(name)
                    check_full_shape(adapter, what, stored, name, info.shape)
                    dt = torch.float64 if torch.float64 in (stored.dtype, b.dtype) else torch.float32
                    yield name, stored.to(dt) - b.to(dt)
    finally:
        if owned:
            reader.close()


def check_full_shape(adapter: LoraAdapter, key: str, stored: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    """CheckpointError unless the tensor `key` the adapter stores whole has the shape of base tensor `name`."""
    if tuple(stored.shape) != tuple(shape):
        raise CheckpointError(
            f"adapter {adapter.label}: {key!r} has shape {tuple(stored.shape)} but the base tensor {name!r} has "
            f"shape {tuple(shape)}"
        )

