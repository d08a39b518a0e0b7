"""Where a multi-task model's pieces come from and how its files are read: references, load dtype, tensors.

A reference (``config.backbone_reference`` / ``config.text_tower_reference``) is a Hub id (``org/name[@rev]``)
or, in memory, an absolute local folder; on disk a local folder is written relative to the saved folder
(``./...`` or ``../...``), or left out (None) when the two share no folder but the file system root: never an
absolute path. The load dtype rule: a bf16 / fp16 checkpoint loads in float32 unless a low precision is asked
for (the weights then train in pure low precision, which small updates round away).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hf_atm.atm.pooling import SENTENCE_TRANSFORMERS_PATTERNS
from hf_atm.errors import CheckpointError

__all__ = ["LOW_PRECISION", "as_dtype", "backbone_class_of", "checkpoint_dtype", "load_dtype", "read_tensors", "resolve_folder",
           "resolve_reference", "saved_reference", "source_of"]

log = logging.getLogger("hf_atm.atm.model")

#: the dtypes the default load rule upcasts to float32.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def source_of(ref: str | os.PathLike) -> str:
    """A reference as kept in memory: an existing local folder made absolute, else the Hub id as given."""
    from hf_atm.hub.resolve import is_local_reference

    return str(Path(ref).expanduser().resolve()) if is_local_reference(ref) else str(ref)


def saved_reference(ref: str | None, folder: Path) -> str | None:
    """`ref` as written into `folder`'s config.json: a Hub id as is; a local folder relative to `folder`
    (``./`` or ``../`` first), or None when they share no folder but the root (a push from a temporary folder)."""
    if not ref or not os.path.isabs(ref):
        return ref
    here = folder.resolve()
    if os.path.commonpath([ref, str(here)]) == os.path.sep:
        return None
    rel = os.path.relpath(ref, here)
    return rel if rel.startswith(".") else f"./{rel}"


def resolve_reference(ref: str | None, folder: str | os.PathLike | None) -> str | None:
    """A saved reference made usable: a path relative to `folder` (``./...`` / ``../...``) becomes absolute,
    or None when no folder is there (e.g. a run folder downloaded from the Hub without its backbone); a Hub
    id or an absolute path is returned as is."""
    if not ref or folder is None or not ref.startswith("."):
        return ref
    path = os.path.normpath(os.path.join(str(Path(folder).resolve()), ref))
    return path if os.path.isdir(path) else None


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`dtype` as a torch dtype (None and ``"auto"``: None, the default rule of :func:`load_dtype`)."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    named = getattr(torch, str(dtype), None)
    if not isinstance(named, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
    return named


def backbone_class_of(config: Any) -> type | None:
    """The transformers class a checkpoint's ``config.architectures[0]`` names when it is a feature model (a
    base model class, e.g. ``BertModel``, or a ``...WithProjection`` embedding model such as
    ``CLIPVisionModelWithProjection``, whose projection ``AutoModel`` would drop); None otherwise (task-head
    classes such as ``BertForSequenceClassification`` load their base model through ``AutoModel``)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    names = getattr(config, "architectures", None) or []
    name = names[0] if names and isinstance(names[0], str) else ""
    base = {n for v in MODEL_MAPPING_NAMES.values() for n in ([v] if isinstance(v, str) else v)}
    if not name.isidentifier() or not (name in base or name.endswith("ModelWithProjection")):
        return None
    found = getattr(transformers, name, None)
    return found if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel) else None


def checkpoint_dtype(folder: str | os.PathLike) -> torch.dtype | None:
    """The dtype a checkpoint folder stores its weights in: its config's ``dtype`` / ``torch_dtype``, else the
    first floating tensor of its first safetensors file (None when neither tells)."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        named = cfg.get("dtype") or cfg.get("torch_dtype")
        if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
            return getattr(torch, named)
    except (OSError, ValueError, AttributeError):
        pass
    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                found = names.get(sf.get_slice(key).get_dtype())
                if found is not None:
                    return found
        break
    return None


def load_dtype(requested: torch.dtype | str | None, stored: torch.dtype | None, where: Any) -> torch.dtype:
    """The dtype to load `where` in. Default: float32 for a bf16 / fp16 checkpoint (said in one log line:
    the weights train in float32, bf16 autocast comes from ``TrainingArguments(bf16=True)``), else the stored
    float32 / float64. An explicit low precision is honoured with a warning (pure low-precision training)."""
    dtype = as_dtype(requested)
    if dtype is None:
        if stored in LOW_PRECISION:
            log.info("%s is stored in %s: loading it in float32 (weights train in float32, with bf16 autocast "
                     "from TrainingArguments(bf16=True)); pass dtype=%s for pure %s", where, stored, stored, stored)
        return stored if stored in (torch.float32, torch.float64) else torch.float32
    if dtype in LOW_PRECISION:
        log.warning("%s loaded in %s as asked: training updates the weights in pure %s (small updates can round "
                    "away); the default float32 with TrainingArguments(bf16=True) trains in mixed precision",
                    where, dtype, dtype)
    return dtype


def resolve_folder(ref: str | os.PathLike, token: str | bool | None) -> Path:
    """A local folder for `ref` (:func:`hf_atm.hub.resolve.resolve_model`; a Hub backbone's
    sentence-transformers pooling files come with it)."""
    from hf_atm.hub.resolve import MERGE_FILE_PATTERNS, resolve_model

    return resolve_model(ref, token=token, allow_patterns=(*MERGE_FILE_PATTERNS, *SENTENCE_TRANSFORMERS_PATTERNS))


def read_tensors(folder: str | os.PathLike, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix` in `folder`'s safetensors weights (one file or shards
    with ``model.safetensors.index.json``), on CPU. CheckpointError naming the folder when unreadable."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        out: dict[str, torch.Tensor] = {}
        for name in files:
            with safe_open(str(folder / name), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefix):
                        out[key] = f.get_tensor(key)
    except Exception as e:  # safetensors / json / OS errors: name the folder
        raise CheckpointError(f"cannot read weights from {folder}: {e}") from e
    return out
