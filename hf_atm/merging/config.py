"""MergeConfig: everything ``hf-atm merge`` needs (inputs, method, output format), validated, YAML in and out.

The YAML form is flat and uses the command's option names with underscores::

    base: bert-base-uncased            # a local folder or a Hub repo id[@revision]
    models: [org/model-a, ./model-b]
    output: merged
    method: ties                       # + the method's options: weights, scale, density, gamma, seed,
    density: 0.2                       #   majority_sign_method (MergeSpec fields)
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
from hf_atm.merging.spec import MergeSpec

__all__ = ["DTYPES", "DEFAULT_MAX_SHARD_SIZE", "MergeConfig", "redact_secrets"]

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SPEC_KEYS = frozenset(f.name for f in fields(MergeSpec))
_CONFIG_KEYS = frozenset(
    {"base", "models", "output", "dtype", "max_shard_size", "overwrite", "allow_pickle", "progress", "revisions"}
)
_IGNORED_KEYS = frozenset({"hf_atm_version"})
# Hugging Face access tokens ("hf_" + 30+ letters) and credentials inside URLs never reach a written file.
_SECRET = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)")


def redact_secrets(text: str) -> str:
    """`text` with Hugging Face tokens and ``user:password@`` URL credentials replaced by ``***``."""
    return _SECRET.sub("***", text)


@dataclass
class MergeConfig:
    """One merge: ``base`` and ``models`` (local folders or Hub ids ``org/name[@rev]``), the method (``spec``)
    and the output (folder, dtype, shard size).

    ``dtype``: None keeps the base's dtype per tensor; otherwise floating tensors of the output are cast to it.
    ``max_shard_size``: bytes or a size string ("2GB", "500MB"). ``overwrite`` replaces a non-empty
    ``output`` once the new one is complete. ``allow_pickle`` lets ``pytorch_model.bin`` inputs be read with
    ``torch.load(weights_only=True)``. ``progress`` shows a tqdm bar. ``revisions`` maps a Hub reference
    (as written in base/models) to the commit a previous merge resolved it to; it pins that reference.
    """

    base: str
    models: list[str]
    output: str
    spec: MergeSpec = field(default_factory=MergeSpec)
    dtype: str | None = None
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE
    overwrite: bool = False
    allow_pickle: bool = False
    progress: bool = True
    revisions: dict[str, str] = field(default_factory=dict)

    # -- validation
    def validate(self) -> None:
        """Raise MergeConfigError naming the option at fault; also validates the spec for ``len(models)``."""
        for opt in ("base", "output"):
            value = getattr(self, opt)
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
        self.spec.validate(len(self.models))
        if self.dtype is not None and self.dtype not in DTYPES:
            raise MergeConfigError(f"dtype: expected one of {', '.join(DTYPES)} (or none), got {self.dtype!r}")
        parse_size(self.max_shard_size, "max_shard_size")
        for opt in ("overwrite", "allow_pickle", "progress"):
            if not isinstance(getattr(self, opt), bool):
                raise MergeConfigError(f"{opt}: expected true or false, got {getattr(self, opt)!r}")
        if not isinstance(self.revisions, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.revisions.items()
        ):
            raise MergeConfigError(f"revisions: expected a mapping of reference -> commit, got {self.revisions!r}")

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
        """Build and validate from the flat mapping described in the module docstring.

        Unknown keys raise MergeConfigError naming them; MergeSpec fields (method, weights, scale, density,
        gamma, seed, majority_sign_method) form ``spec``.
        """
        if not isinstance(data, Mapping):
            raise MergeConfigError(f"merge config must be a mapping of options, got {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in _SPEC_KEYS | _CONFIG_KEYS | _IGNORED_KEYS)
        if unknown:
            known = sorted(_SPEC_KEYS | _CONFIG_KEYS)
            raise MergeConfigError(f"unknown option(s) {', '.join(unknown)}; known options: {', '.join(known)}")
        for required in ("base", "models", "output"):
            if data.get(required) in (None, "", []):
                raise MergeConfigError(f"{required}: missing (give it in the YAML or on the command line)")
        spec_opts = {k: v for k, v in data.items() if k in _SPEC_KEYS and v is not None}
        if "weights" in spec_opts and not isinstance(spec_opts["weights"], (list, tuple)):
            raise MergeConfigError(f"weights: expected a list of numbers, got {spec_opts['weights']!r}")
        spec = MergeSpec.from_dict(spec_opts)
        models = data["models"]
        if isinstance(models, (str, os.PathLike)):
            models = [models]
        if not isinstance(models, (list, tuple)):
            raise MergeConfigError(f"models: expected a list of paths or repo ids, got {models!r}")
        kwargs: dict[str, Any] = {
            "base": _as_str(data["base"], "base"),
            "models": [_as_str(m, f"models[{i}]") for i, m in enumerate(models)],
            "output": _as_str(data["output"], "output"),
            "spec": spec,
        }
        for key in ("dtype", "max_shard_size", "overwrite", "allow_pickle", "progress", "revisions"):
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
        """The flat mapping (inverse of :meth:`from_dict`); ``include_runtime=False`` leaves out
        ``overwrite`` and ``progress``, which do not change the result."""
        d: dict[str, Any] = {"base": str(self.base), "models": [str(m) for m in self.models]}
        if self.revisions:
            d["revisions"] = dict(self.revisions)
        d.update(self.spec.to_dict())
        d["dtype"] = self.dtype
        d["max_shard_size"] = self.max_shard_size
        d["allow_pickle"] = self.allow_pickle
        d["output"] = str(self.output)
        if include_runtime:
            d["overwrite"] = self.overwrite
            d["progress"] = self.progress
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
