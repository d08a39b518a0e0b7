"""The merge entry points users and ``hf-atm merge`` call: the streaming engine, with peft LoRA adapters
accepted among the models.

An adapter folder is read as "base + adapter delta" (:class:`~hf_atm.lora.source.LoraAsModelSource`), a merge
of adapters given no base takes the base they name, and Hub adapters are checked against the base from their
headers before any download. :data:`ADAPTER_SOURCES` is what this module passes to
:func:`hf_atm.merging.engine.run_merge`, which reads full checkpoints only by itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from hf_atm.errors import MergeConfigError
from hf_atm.lora.delta import (
    adapter_base_reference,
    check_adapter_headers,
    is_adapter_folder,
    read_adapter_config,
)
from hf_atm.lora.source import open_model_source
from hf_atm.merging import engine, preflight
from hf_atm.merging.config import MergeConfig
from hf_atm.merging.engine import CHUNK_ELEMENTS, MergeResult
from hf_atm.merging.sources import ModelSources

__all__ = ["ADAPTER_SOURCES", "check_hub_inputs", "infer_adapter_base", "merge_checkpoints", "run_merge"]


def infer_adapter_base(refs: Sequence[str], paths: Sequence[Path]) -> str:
    """The base every LoRA adapter among `paths` names (``base_model_name_or_path``), for a merge given no base.

    MergeConfigError when a model is not an adapter, names no base, or the adapters name different bases.
    """
    named: dict[str, str] = {}
    for ref, path in zip(refs, paths):
        if not is_adapter_folder(path):
            raise MergeConfigError(
                f"base: missing, and model {ref} is not a LoRA adapter naming its base; give --base"
            )
        found = adapter_base_reference(path)
        if not found:
            raise MergeConfigError(f"base: missing, and adapter {ref} names no base_model_name_or_path; give --base")
        named[str(ref)] = found
    if len(set(named.values())) != 1:
        listed = ", ".join(f"{r}: {b}" for r, b in named.items())
        raise MergeConfigError(f"base: missing, and the adapters name different bases ({listed}); give --base")
    return next(iter(named.values()))


#: Full checkpoints and peft LoRA adapters (read as base + delta), the base inferred from the adapters.
ADAPTER_SOURCES = ModelSources(
    open=open_model_source,
    infer_base=infer_adapter_base,
    read_adapter_config=read_adapter_config,
    check_adapter=check_adapter_headers,
)


def run_merge(config: MergeConfig, *, chunk_elements: int = CHUNK_ELEMENTS) -> MergeResult:
    """Run the merge described by `config` and report what it wrote (:func:`hf_atm.merging.engine.run_merge`),
    LoRA adapter folders or Hub repos among ``config.models`` read as base + adapter delta.

    Raises MergeConfigError / CheckpointError / OutputExistsError / HubError naming what is at fault; on any
    error nothing is left at ``config.output`` that was not there before.
    """
    return engine.run_merge(config, chunk_elements=chunk_elements, sources=ADAPTER_SOURCES)


def merge_checkpoints(config: MergeConfig, *, chunk_elements: int = CHUNK_ELEMENTS) -> Path:
    """:func:`run_merge`, returning the output folder."""
    return run_merge(config, chunk_elements=chunk_elements).output


def check_hub_inputs(
    base_ref: str | os.PathLike | None,
    model_refs: Sequence[str | os.PathLike],
    *,
    revisions: Mapping[str, str] | None = None,
    tokenizer_source: str | None = None,
    allow_pickle: bool = False,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> None:
    """The pre-download comparison of a merge's inputs (:func:`hf_atm.merging.preflight.check_hub_inputs`) with
    LoRA adapters among them read and checked against the base: what :func:`run_merge` runs first."""
    preflight.check_hub_inputs(
        base_ref, model_refs, revisions=dict(revisions or {}), tokenizer_source=tokenizer_source,
        allow_pickle=allow_pickle, token=token, endpoint=endpoint,
        read_adapter_config=ADAPTER_SOURCES.read_adapter_config, check_adapter=ADAPTER_SOURCES.check_adapter,
    )
