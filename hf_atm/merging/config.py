"""MergeConfig: everything ``hf-atm merge`` needs (inputs, method, output format), validated, YAML in and out.

The YAML form is flat and uses the command's option names with underscores (a mergekit YAML, recognised by its
``merge_method`` key, is read too: :func:`from_mergekit`)::

    base: bert-base-uncased            # a local folder or a Hub repo id[@revision]
    models: [org/model-a, {model: ./model-b, parameters: {weight: 0.5, density: [0.5, 0.3]}}]
    output: merged
    method: ties                       # + the method's options: weights, scale, density, gamma, seed,
    density: 0.2                       #   majority_sign_method, epsilon, t, normalize (MergeSpec fields);
                                       #   a list is a layer gradient, [{filter: s, value: v}, {value: d}]
                                       #   a filter list (hf_atm.merging.parameters)
    dtype: null                        # float32 | float16 | bfloat16 | null (keep the base's dtype per tensor)
    max_shard_size: 5GB
    revisions: {org/model-a: 0123abcd...}   # written by a merge: the Hub commits it read (pins a re-run)

``OUT_DIR/merge_config.yaml`` is such a file (``hf_atm_version`` is recorded there and ignored on input).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hf_atm.errors import MergeConfigError
from hf_atm.merging.io import parse_size
from hf_atm.merging.parameters import MODEL_OPTIONS, ParameterPlan, is_varying
from hf_atm.merging.registry import get_method
from hf_atm.merging.spec import MergeSpec

__all__ = ["DTYPES", "DEFAULT_MAX_SHARD_SIZE", "OUTPUT_FORMATS", "MergeConfig", "from_mergekit", "redact_secrets"]

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
DEFAULT_MAX_SHARD_SIZE = "5GB"
OUTPUT_FORMATS: tuple[str, ...] = ("full", "lora")
_SPEC_KEYS = frozenset(f.name for f in fields(MergeSpec))
_CONFIG_KEYS = frozenset(
    {"base", "models", "output", "dtype", "max_shard_size", "overwrite", "allow_pickle", "progress", "threads",
     "device", "revisions",
     "tokenizer_source", "output_format", "rank"}
)
_IGNORED_KEYS = frozenset({"hf_atm_version"})
# Hugging Face access tokens ("hf_" + 30+ letters) and credentials inside URLs never reach a written file.
_SECRET = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)")
# mergekit parameter names that differ from ours.
_MERGEKIT_NAMES = {"weight": "weights", "lambda": "scale"}
_MERGEKIT_KEYS = frozenset(
    {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
)
_MERGEKIT_UNSUPPORTED = {
    "slices": "layer slices (frankenmerges) are not supported; merge whole models",
    "modules": "per-module definitions are not supported",
    "tokenizer": "the 'tokenizer' block is not supported; use tokenizer_source: base | union | MODEL",
    "chat_template": "chat_template is not supported; the chat template travels with tokenizer_source",
}
# mergekit defaults that differ from ours (merge_method -> option -> value), applied when a mergekit YAML is read.
_MERGEKIT_DEFAULTS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"normalize": False},
    "ties": {"normalize": True, "density": 1.0},
    "dare_ties": {"normalize": False, "density": 1.0},
    "dare_linear": {"normalize": False, "density": 1.0},
    "breadcrumbs": {"normalize": False, "density": 1.0},
    "breadcrumbs_ties": {"normalize": False, "density": 1.0},
    "della": {"normalize": True, "density": 1.0},
    "della_linear": {"normalize": False, "density": 1.0},
}
# methods whose mergekit ``rescale`` is read (true: "l1", false: "none").
_RANDOM_DROP = ("dare_ties", "dare_linear", "della", "della_linear")
# mergekit parameters accepted without a numerical effect here, and why.
_MERGEKIT_NO_EFFECT = {
    "int8_mask": "int8_mask only changes mergekit's mask storage",
}


def _check_device(device: Any) -> None:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``; ``cuda`` where torch sees no CUDA is refused here, before any
    work (MergeConfigError naming the option)."""
    if not isinstance(device, str) or not re.fullmatch(r"cpu|auto|cuda(:\d+)?", device):
        raise MergeConfigError(f"device: expected cpu, cuda, cuda:N or auto, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise MergeConfigError(
                f"device: {device} asked for, but torch.cuda.is_available() is False here (no CUDA build of torch "
                "or no GPU); use --device cpu, or auto (cuda when available)"
            )


def redact_secrets(text: str) -> str:
    """`text` with Hugging Face tokens and ``user:password@`` URL credentials replaced by ``***``."""
    return _SECRET.sub("***", text)


@dataclass
class MergeConfig:
    """One merge: ``base`` and ``models`` (local folders or Hub ids ``org/name[@rev]``), the method (``spec``,
    plus parameters that vary per model or per tensor) and the output (folder, dtype, shard size, format).

    ``dtype``: None keeps the base's dtype per tensor; otherwise floating tensors of the output are cast to it.
    ``max_shard_size``: bytes or a size string ("2GB", "500MB"). ``overwrite`` replaces a non-empty
    ``output`` once the new one is complete. ``allow_pickle`` lets ``pytorch_model.bin`` inputs be read with
    ``torch.load(weights_only=True)``. ``progress`` shows a tqdm bar. ``threads``: worker threads of the merge
    (None: the machine's cores; the result does not depend on it). ``device``: ``cpu`` (default), ``cuda`` /
    ``cuda:N`` (merge each tensor on the GPU) or ``auto`` (cuda when available). ``revisions`` maps a Hub reference
    (as written in base/models) to the commit a previous merge resolved it to; it pins that reference.
    ``tensor_options``: top-level options given as layer gradients or filter lists; ``model_options``: per model
    the options it sets itself (``weights`` for its weight); see :mod:`hf_atm.merging.parameters`.
    ``tokenizer_source``: None (the vocabularies must match), ``base``, ``union`` or one of ``models``: the
    output's tokenizer, with embedding rows aligned by token (:mod:`hf_atm.merging.vocab`).
    ``output_format``: ``full`` (a model) or ``lora`` (LoRA adapters merged into one adapter of ``rank``).
    """

    base: str | None
    models: list[str]
    output: str
    spec: MergeSpec = field(default_factory=MergeSpec)
    dtype: str | None = None
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE
    overwrite: bool = False
    allow_pickle: bool = False
    progress: bool = True
    threads: int | None = None
    device: str = "cpu"
    revisions: dict[str, str] = field(default_factory=dict)
    tensor_options: dict[str, Any] = field(default_factory=dict)
    model_options: list[dict[str, Any]] = field(default_factory=list)
    tokenizer_source: str | None = None
    output_format: str = "full"
    rank: int | None = None

    @property
    def parameters(self) -> ParameterPlan:
        """The per-tensor parameter plan (``spec`` + what varies per model or tensor)."""
        return ParameterPlan(self.spec, dict(self.tensor_options), [dict(o) for o in self.model_options])

    # -- validation
    def validate(self) -> None:
        """Raise MergeConfigError naming the option at fault; also validates the spec for ``len(models)``.

        Values that vary per tensor are checked for form here and for range by the engine, over every tensor
        name, before anything is written.
        """
        # base None: the engine takes the base LoRA adapters name (adapter_config.json), else asks for --base
        for opt in ("base", "output"):
            value = getattr(self, opt)
            if opt == "base" and value is None:
                continue
            if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
                raise MergeConfigError(f"{opt}: expected a non-empty path or repo id, got {value!r}")
        if isinstance(self.models, (str, bytes)) or not isinstance(self.models, (list, tuple)):
            raise MergeConfigError(f"models: expected a list of paths or repo ids, got {self.models!r}")
        if not self.models:
            raise MergeConfigError("models: at least one model to merge is required")
        for i, m in enumerate(self.models):
            if not isinstance(m, (str, os.PathLike)) or not str(m).strip():
                raise MergeConfigError(f"models[{i}]: expected a non-empty path or repo id, got {m!r}")
        if not isinstance(self.spec, MergeSpec):
            raise MergeConfigError(f"spec: expected a MergeSpec, got {type(self.spec).__name__}")
        if len(self.model_options) > len(self.models):
            raise MergeConfigError("model_options: more entries than models")
        plan = self.parameters
        if plan.uniform:
            self.spec.validate(len(self.models))
        else:
            plan.check()
        if self.dtype is not None and self.dtype not in DTYPES:
            raise MergeConfigError(f"dtype: expected one of {', '.join(DTYPES)} (or none), got {self.dtype!r}")
        parse_size(self.max_shard_size, "max_shard_size")
        for opt in ("overwrite", "allow_pickle", "progress"):
            if not isinstance(getattr(self, opt), bool):
                raise MergeConfigError(f"{opt}: expected true or false, got {getattr(self, opt)!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise MergeConfigError(f"threads: expected a positive integer (or none: every core), got {self.threads!r}")
        _check_device(self.device)
        if not isinstance(self.revisions, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.revisions.items()
        ):
            raise MergeConfigError(f"revisions: expected a mapping of reference -> commit, got {self.revisions!r}")
        if self.tokenizer_source is not None and (
            not isinstance(self.tokenizer_source, str)
            or self.tokenizer_source not in ("base", "union", *map(str, self.models))
        ):
            raise MergeConfigError(
                f"tokenizer_source: expected base, union or one of the models ({', '.join(map(str, self.models))}), "
                f"got {self.tokenizer_source!r}"
            )
        if self.output_format not in OUTPUT_FORMATS:
            raise MergeConfigError(f"output_format: expected full or lora, got {self.output_format!r}")
        if self.output_format == "lora":
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise MergeConfigError(f"rank: --output-format lora needs a positive integer rank, got {self.rank!r}")
            if not plan.uniform or self.tokenizer_source is not None:
                raise MergeConfigError(
                    "output_format: lora merges take one value per option (no per-model or per-tensor "
                    "parameters, no tokenizer_source)"
                )
        elif self.rank is not None:
            raise MergeConfigError("rank: applies only with output_format lora")

    @property
    def max_shard_bytes(self) -> int:
        """``max_shard_size`` in bytes."""
        return parse_size(self.max_shard_size, "max_shard_size")

    @property
    def torch_dtype(self) -> Any:
        """The torch dtype of ``dtype`` (None when the base's dtypes are kept)."""
        import torch

        return None if self.dtype is None else getattr(torch, self.dtype)

    # -- dict / YAML
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergeConfig:
        """Build and validate from the mapping described in the module docstring (or a mergekit config, told
        apart by its ``merge_method`` key: see :func:`from_mergekit`).

        Unknown keys raise MergeConfigError naming them; MergeSpec fields (method, weights, scale, density,
        gamma, epsilon, t, seed, majority_sign_method, normalize) form ``spec``, or ``tensor_options`` when
        they are gradients or filter lists.
        """
        if not isinstance(data, Mapping):
            raise MergeConfigError(f"merge config must be a mapping of options, got {type(data).__name__}")
        if "merge_method" in data:
            data = from_mergekit(data)
        unknown = sorted(str(k) for k in data if k not in _SPEC_KEYS | _CONFIG_KEYS | _IGNORED_KEYS)
        if unknown:
            known = sorted(_SPEC_KEYS | _CONFIG_KEYS)
            raise MergeConfigError(f"unknown option(s) {', '.join(unknown)}; known options: {', '.join(known)}")
        for required in ("models", "output"):  # no base: LoRA adapters name theirs (see validate)
            if data.get(required) in (None, "", []):
                raise MergeConfigError(f"{required}: missing (give it in the YAML or on the command line)")
        spec_opts: dict[str, Any] = {}
        tensor_options: dict[str, Any] = {}
        for k, v in data.items():
            if k not in _SPEC_KEYS or v is None:
                continue
            if k == "weights":
                if not isinstance(v, (list, tuple)) or any(isinstance(w, (list, tuple, Mapping)) for w in v):
                    raise MergeConfigError(f"weights: expected a list of numbers (one per model), got {v!r}")
                spec_opts[k] = v
            elif k != "method" and is_varying(v):
                tensor_options[k] = v
            else:
                spec_opts[k] = v
        spec = MergeSpec.from_dict(spec_opts)
        models = data["models"]
        if isinstance(models, (str, os.PathLike, Mapping)):
            models = [models]
        if not isinstance(models, (list, tuple)):
            raise MergeConfigError(f"models: expected a list of paths or repo ids, got {models!r}")
        refs, model_options = [], []
        for i, m in enumerate(models):
            ref, opts = _model_entry(m, i)
            refs.append(ref)
            model_options.append(opts)
        while model_options and not model_options[-1]:
            model_options.pop()
        base = data.get("base")
        kwargs: dict[str, Any] = {
            "base": None if base in (None, "") else _as_str(base, "base"),
            "models": refs,
            "output": _as_str(data["output"], "output"),
            "spec": spec,
            "tensor_options": tensor_options,
            "model_options": model_options,
        }
        for key in ("dtype", "max_shard_size", "overwrite", "allow_pickle", "progress", "threads", "device",
                    "revisions", "tokenizer_source", "output_format", "rank"):
            if data.get(key) is not None:
                kwargs[key] = data[key]
        if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"].lower() in ("none", "null", "auto"):
            kwargs["dtype"] = None
        config = cls(**kwargs)
        if isinstance(config.revisions, Mapping):
            config.revisions = {str(k): str(v) for k, v in config.revisions.items()}
        config.validate()
        return config

    def to_dict(self, *, include_runtime: bool = True) -> dict[str, Any]:
        """The mapping (inverse of :meth:`from_dict`); ``include_runtime=False`` leaves out ``overwrite``,
        ``progress``, ``threads`` and ``device``, which do not change the result (on a GPU, methods with
        reductions may differ in the last bits; the rest is bit-identical). Models with their own options are written as
        ``{model: ID, parameters: {...}}`` (``weight`` for their weight)."""
        models: list[Any] = []
        for i, m in enumerate(self.models):
            opts = self.model_options[i] if i < len(self.model_options) else {}
            if opts:
                params = {("weight" if k == "weights" else k): v for k, v in opts.items()}
                models.append({"model": str(m), "parameters": params})
            else:
                models.append(str(m))
        d: dict[str, Any] = {"base": None if self.base is None else str(self.base), "models": models}
        if self.revisions:
            d["revisions"] = dict(self.revisions)
        d.update(self.spec.to_dict())
        d.update(self.tensor_options)
        d["dtype"] = self.dtype
        d["max_shard_size"] = self.max_shard_size
        d["allow_pickle"] = self.allow_pickle
        if self.tokenizer_source is not None:
            d["tokenizer_source"] = self.tokenizer_source
        if self.output_format != "full":
            d["output_format"] = self.output_format
            d["rank"] = self.rank
        d["output"] = str(self.output)
        if include_runtime:
            d["overwrite"] = self.overwrite
            d["progress"] = self.progress
            d["threads"] = self.threads
            d["device"] = self.device
        return d

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> MergeConfig:
        """Read a YAML merge config (MergeConfigError naming the file when unreadable or invalid YAML)."""
        return cls.from_dict(load_yaml_options(path))

    def to_yaml(self, *, include_runtime: bool = False, version: str | None = None) -> str:
        """YAML text for this merge (the form ``merge_config.yaml`` takes); secrets are redacted."""
        d = self.to_dict(include_runtime=include_runtime)
        if version is not None:
            d = {"hf_atm_version": version, **d}
        text = yaml.safe_dump(d, sort_keys=False, default_flow_style=False, allow_unicode=True)
        return redact_secrets(text)


def _model_entry(entry: Any, index: int) -> tuple[str, dict[str, Any]]:
    """(reference, own options) of one ``models`` entry: a path / repo id, or ``{model: ID, parameters: {...}}``."""
    if not isinstance(entry, Mapping):
        return _as_str(entry, f"models[{index}]"), {}
    unknown = sorted(str(k) for k in entry if k not in ("model", "parameters"))
    if unknown or "model" not in entry:
        raise MergeConfigError(
            f"models[{index}]: expected a path or {{model: ID, parameters: {{...}}}}, got keys {sorted(map(str, entry))}"
        )
    params = entry.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise MergeConfigError(f"models[{index}].parameters: expected a mapping, got {params!r}")
    opts: dict[str, Any] = {}
    for k, v in params.items():
        name = _MERGEKIT_NAMES.get(str(k), str(k))
        if name not in MODEL_OPTIONS:
            allowed = ", ".join("weight" if o == "weights" else o for o in MODEL_OPTIONS)
            raise MergeConfigError(f"models[{index}].parameters.{k}: not a per-model option; per-model options: {allowed}")
        opts[name] = v
    return _as_str(entry["model"], f"models[{index}].model"), opts


def from_mergekit(data: Mapping[str, Any]) -> dict[str, Any]:
    """A mergekit YAML config (``merge_method``, ``base_model``, ``models``, ``parameters``, ``dtype`` /
    ``out_dtype``, ``tokenizer_source``) as this project's mapping, for every method both implement.

    Differences, on purpose: computation is float32 here whatever mergekit's ``dtype`` (the output dtype is
    ``out_dtype``, else ``dtype``); mergekit's defaults are applied where ours differ (TIES and DELLA
    ``normalize: true``; ``density`` 1 for the sparsifying methods; DARE / DELLA ``rescale: true``, which is
    ``rescale: l1`` here: each kept task vector scaled back to its L1 norm, as mergekit does).
    ``slices``, ``modules``, ``passthrough``, MoE and other mergekit-only features are refused naming the key.
    """
    for key, why in _MERGEKIT_UNSUPPORTED.items():
        if data.get(key) not in (None, [], {}):
            raise MergeConfigError(f"{key}: {why}")
    unknown = sorted(str(k) for k in data if k not in _MERGEKIT_KEYS | set(_MERGEKIT_UNSUPPORTED) | _CONFIG_KEYS)
    if unknown:
        raise MergeConfigError(
            f"unknown mergekit key(s) {', '.join(unknown)}; this project reads {', '.join(sorted(_MERGEKIT_KEYS))}"
        )
    method = data["merge_method"]
    if method in ("passthrough", "moe", "nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion",
                  "ram", "task_adapter"):
        raise MergeConfigError(f"merge_method: mergekit's {method!r} is not implemented by hf-atm")
    get_method(method, option="merge_method")
    out: dict[str, Any] = {"method": method}
    params = dict(data.get("parameters") or {})
    for key in _MERGEKIT_NO_EFFECT:
        params.pop(key, None)
    rescale = params.pop("rescale", None)
    if method in _RANDOM_DROP:
        # mergekit's rescale (default true) scales each kept task vector back to its L1 norm
        params["rescale"] = "l1" if rescale is None or rescale is True else ("none" if rescale is False else rescale)
    elif rescale:
        raise MergeConfigError(f"parameters.rescale: true is implemented for {', '.join(_RANDOM_DROP)} only")
    if "filter_wise" in params:
        raise MergeConfigError("parameters.filter_wise: model_stock's filter-wise variant is not implemented")
    for k, v in _MERGEKIT_DEFAULTS.get(method, {}).items():
        params.setdefault(k, v)
    base = data.get("base_model")
    if isinstance(base, Mapping):
        base = base.get("model")
    out["base"] = base
    weight_all = None
    for k, v in params.items():
        name = _MERGEKIT_NAMES.get(str(k), str(k))
        if name == "weights":  # a top-level weight applies to every model
            weight_all = v
            continue
        out[name] = v
    models = []
    for entry in data.get("models") or []:
        if isinstance(entry, Mapping):
            entry = dict(entry)
            if isinstance(entry.get("model"), Mapping):
                entry["model"] = entry["model"].get("model")
            p = dict(entry.get("parameters") or {})
            if weight_all is not None:
                p.setdefault("weight", weight_all)
            for key in ("rescale", *_MERGEKIT_NO_EFFECT):
                p.pop(key, None)
            entry["parameters"] = p
        elif weight_all is not None:
            entry = {"model": entry, "parameters": {"weight": weight_all}}
        models.append(entry)
    # mergekit lists the base among the models for some methods: it is the base, not a model to merge
    if base is not None:
        models = [m for m in models if (m.get("model") if isinstance(m, Mapping) else m) != base]
    out["models"] = models
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        out["dtype"] = str(dtype)
    for key in _CONFIG_KEYS:
        if key in data and key not in out:
            out[key] = data[key]
    if data.get("tokenizer_source") is not None:
        out["tokenizer_source"] = data["tokenizer_source"]
    return out


def load_yaml_options(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in YAML file `path` (MergeConfigError naming the file if missing, unparsable or not a mapping)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise MergeConfigError(f"config: cannot read {p}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise MergeConfigError(f"config: {p} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MergeConfigError(f"config: {p} must hold a mapping of options, got {type(data).__name__}")
    return data


def _as_str(value: Any, option: str) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise MergeConfigError(f"{option}: expected a path or repo id, got {value!r}")
    return value
