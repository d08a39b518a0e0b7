"""How a merge opens its models: the hooks the engine is given, so that ``merging`` imports nothing above it.

:class:`ModelSources` bundles them; :data:`CHECKPOINTS` reads full checkpoints only. :mod:`hf_atm.lora.merge`
builds the one that also reads peft LoRA adapters as "base + adapter delta" (what ``hf-atm merge`` and
``hf_atm.run_merge`` use).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.hub.headers import ADAPTER_CONFIG_NAME
from hf_atm.merging.io import CheckpointReader
from hf_atm.merging.preflight import AdapterCheck, AdapterConfigReader

__all__ = ["CHECKPOINTS", "ModelOpener", "ModelSources", "open_checkpoint", "require_base"]

#: ``(folder, base reader, *, allow_pickle, label) -> reader``: a model of the merge, read like a checkpoint
#: (CheckpointReader's interface: ``names``, ``info``, ``get``, ``release``, ``weights_file``, ``close``...).
ModelOpener = Callable[..., Any]


def open_checkpoint(folder: str | os.PathLike, base: CheckpointReader, *, allow_pickle: bool = False,
                    label: str | None = None) -> CheckpointReader:
    """A :class:`CheckpointReader` of the model in `folder` (`base` unused: a full checkpoint stands alone).

    CheckpointError for a peft adapter folder: these models need the LoRA-aware sources of
    :mod:`hf_atm.lora.merge`.
    """
    del base
    if (Path(folder) / ADAPTER_CONFIG_NAME).is_file():
        raise CheckpointError(
            f"model {label or folder} is a peft LoRA adapter ({ADAPTER_CONFIG_NAME}); merge it with "
            "hf_atm.run_merge (hf_atm.lora.merge), which reads adapters as base + delta"
        )
    return CheckpointReader(folder, allow_pickle=allow_pickle, label=label)


def require_base(refs: Sequence[str], paths: Sequence[Path]) -> str:
    """The base of a merge given none whose method needs one: there is none to infer from full checkpoints."""
    del refs, paths
    raise MergeConfigError("base: missing, and the method needs the base model; give --base")


@dataclass(frozen=True)
class ModelSources:
    """The hooks through which the engine reads a merge's models.

    ``open``: opens one model (:data:`ModelOpener`). ``infer_base(refs, paths)``: the base reference when the
    config gives none and the method needs one (MergeConfigError when it cannot be inferred).
    ``read_adapter_config`` / ``check_adapter``: how the pre-download check of Hub inputs reads and checks
    adapters (:func:`hf_atm.merging.preflight.check_hub_inputs`); None: adapters are not compared there.
    """

    open: ModelOpener = open_checkpoint
    infer_base: Callable[[Sequence[str], Sequence[Path]], str] = require_base
    read_adapter_config: AdapterConfigReader | None = None
    check_adapter: AdapterCheck | None = None


#: Full checkpoints only (the engine's default).
CHECKPOINTS = ModelSources()
