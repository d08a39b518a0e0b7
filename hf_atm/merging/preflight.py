"""The inputs of a merge compared with the base before any weight is read: one check, two callers.

:func:`check_same_tensors` is the comparison itself (the same tensor names, the same shapes, floating dtypes
where the base has them). The engine runs it on the open checkpoints; :func:`check_hub_inputs` runs it on the
config files and safetensors headers of Hub inputs (:func:`hf_atm.hub.headers.read_hub_input`) before any weight
file is downloaded. For every base / model reference that is a Hub id it compares:

* the same ``architectures`` in config.json (when both name them);
* a LoRA adapter, when adapter hooks are given (:mod:`hf_atm.lora` gives them): its config describes a plain
  LoRA, every module maps to one base tensor and its ``lora_A`` / ``lora_B`` shapes fit that tensor;
* the same tensor names, with tied embeddings handled as the engine handles them (:mod:`hf_atm.merging.vocab`:
  when the base ties, stored output heads are ignored; a tying model serves its embedding as the base's head);
* the same vocabulary size (embedding rows), unless ``tokenizer_source`` is given: then the vocabulary tensors
  may differ in dim 0 (the engine aligns their rows by token);
* the same shapes, and floating dtypes where the base has them.

A mismatch raises :class:`~hf_atm.errors.CheckpointError` naming the repo ids (and revisions) and the tensor.
The check never fails a merge that resolving would let through: when a request fails (unknown repo or
revision, no access, no connection) the input is read from its cached snapshot if there is one, else skipped,
and resolving it then reports the error exactly as without the check.

**Local folders** given beside Hub ids are read from disk (headers only) and take part in the comparison; a
merge of local folders only is not touched here (the engine checks it). An input whose weights cannot be
inspected (a pickle-only repo, a missing or corrupt file) is left out, and the engine reports it.

**Offline** (``HF_HUB_OFFLINE``): no request is made. A Hub reference whose snapshot is in the cache is checked
from the cached files (their headers are read from disk; resolving it downloads nothing either); one that is
not in the cache is skipped here, and resolving it then raises the usual HubError.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from hf_atm.errors import CheckpointError
from hf_atm.hub.headers import AdapterConfigReader, HubInput, read_hub_input
from hf_atm.hub.resolve import is_local_reference
from hf_atm.merging.vocab import (
    embedding_names,
    is_vocab_tensor_name,
    tie_as_base,
    vocab_tensor_names,
)

__all__ = ["AdapterCheck", "AdapterConfigReader", "check_hub_inputs", "check_same_tensors", "is_floating_dtype"]

#: ``(adapter, base) -> None``: CheckpointError when the adapter's tensors do not fit the base's headers.
AdapterCheck = Callable[[HubInput, HubInput], None]


def is_floating_dtype(dtype: torch.dtype | str) -> bool:
    """Whether a torch dtype or a safetensors dtype code (``F16``, ``BF16``, ``F32``, ``F8_E4M3``...) is floating."""
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return str(dtype).upper().startswith(("F", "BF"))


def check_same_tensors(base: Any, models: Sequence[Any], vocab_names: Collection[str] = frozenset()) -> None:
    """Every model has exactly the base's tensor names, the same shapes, and floating dtypes where the base does.

    `base` / `models`: readers (``names``, ``info(name)`` with ``shape`` / ``dtype`` / ``file``, ``in``, ``len``,
    ``label`` and ``weights_file``: a CheckpointReader, a LoRA source, a HubInput...). `vocab_names` (rows
    aligned by token) may differ in their number of rows. Raises CheckpointError naming the tensor and both files.
    """
    for r in models:
        for name in base.names:
            if name not in r:
                raise CheckpointError(
                    f"tensor {name!r} is in the base ({base.info(name).file}) but missing from model "
                    f"{r.label} ({r.weights_file})"
                )
        if len(r) != len(base):
            extra = next(n for n in r.names if n not in base)
            raise CheckpointError(
                f"tensor {extra!r} is in model {r.label} ({r.info(extra).file}) but not in the base "
                f"({base.weights_file})"
            )
        for name in base.names:
            b, m = base.info(name), r.info(name)
            b_shape, m_shape = tuple(b.shape), tuple(m.shape)
            same_rank_rows = len(b_shape) >= 1 and len(m_shape) == len(b_shape) and b_shape[1:] == m_shape[1:]
            if b_shape != m_shape and not (name in vocab_names and same_rank_rows):
                hint = ""
                if same_rank_rows and is_vocab_tensor_name(name):
                    hint = (f" (vocabularies of {b_shape[0]} and {m_shape[0]} rows: pass --tokenizer-source "
                            "base, union or a model to align the rows by token)")
                raise CheckpointError(f"tensor {name!r} has shape {b_shape} in {b.file} but {m_shape} in {m.file}{hint}")
            if is_floating_dtype(b.dtype) != is_floating_dtype(m.dtype):
                raise CheckpointError(
                    f"tensor {name!r} is {b.dtype} in {b.file} but {m.dtype} in {m.file}: a tensor must be "
                    "floating in every checkpoint or in none"
                )


# ------------------------------------------------------------------------------------------- Hub inputs
def check_hub_inputs(
    base_ref: str | os.PathLike | None,
    model_refs: Sequence[str | os.PathLike],
    *,
    revisions: dict[str, str] | None = None,
    tokenizer_source: str | None = None,
    allow_pickle: bool = False,
    token: str | bool | None = None,
    endpoint: str | None = None,
    read_adapter_config: AdapterConfigReader | None = None,
    check_adapter: AdapterCheck | None = None,
) -> None:
    """Compare the merge's inputs from their config files and safetensors headers, before any weight download.

    Does nothing unless at least one of `base_ref` / `model_refs` is a Hub id (see the module docstring for
    what is read and compared). `base_ref` None: the base the LoRA adapters among the models name, else the
    first model (the layout of an ``average`` / ``linear`` merge). `revisions` pins unpinned Hub references as
    ``MergeConfig.revisions`` does; `tokenizer_source` lets vocabulary tensors differ in their rows;
    `allow_pickle` is accepted for symmetry with the engine (pickle weights have no header to read: such an
    input is left to the engine). `token` / `endpoint` as for :class:`huggingface_hub.HfApi`.
    `read_adapter_config` / `check_adapter`: how adapters among the inputs are read and checked against the
    base (without them an adapter is read as stored and not compared).

    Raises CheckpointError naming the repo ids and the tensor at fault. Returns None when everything that
    could be inspected matches (an input that cannot be inspected is skipped; the engine reports it).
    """
    del allow_pickle  # pickle checkpoints are not inspected here
    refs = [str(r) for r in model_refs] + ([] if base_ref is None else [str(base_ref)])
    if not refs or all(is_local_reference(r) for r in refs):
        return
    revisions = dict(revisions or {})

    def read(ref: str) -> HubInput | None:
        return read_hub_input(ref, revisions=revisions, token=token, endpoint=endpoint,
                              read_adapter_config=read_adapter_config)

    models = [read(str(r)) for r in model_refs]
    if base_ref is None:
        base_ref = _implied_base(models)
        if base_ref is None:
            if not models or models[0] is None or models[0].is_adapter:
                return
            base, models = models[0], models[1:]
        else:
            base = read(base_ref)
    else:
        base = read(str(base_ref))
    if base is None or not base.inspected or base.is_adapter:
        return
    full = [m for m in models if m is not None and m.inspected and not m.is_adapter]
    if check_adapter is not None:
        for m in models:
            if m is not None and m.is_adapter and m.inspected:
                check_adapter(m, base)
    for m in full:
        _check_architectures(base, m)
    if not full:
        return
    base_view, views = _tie_views(base, full)
    if base_view is None:
        return
    _check_vocab_rows(base_view, views, tokenizer_source)
    vocab = frozenset(vocab_tensor_names([base_view, *views])) if tokenizer_source is not None else frozenset()
    check_same_tensors(base_view, views, vocab)


def _implied_base(models: Sequence[HubInput | None]) -> str | None:
    """The one base every model, all LoRA adapters, names (``base_model_name_or_path``), else None."""
    named = {str((m.adapter_config or {}).get("base_model_name_or_path") or "") for m in models if m is not None}
    if not models or any(m is None or not m.is_adapter for m in models) or len(named) != 1 or "" in named:
        return None
    return next(iter(named))


def _check_architectures(base: HubInput, model: HubInput) -> None:
    ours = list((base.config or {}).get("architectures") or [])
    theirs = list((model.config or {}).get("architectures") or [])
    if ours and theirs and ours != theirs:
        raise CheckpointError(
            f"model {model.label} is a {', '.join(theirs)} but the base {base.label} is a {', '.join(ours)} "
            "(config.json 'architectures' differ); merging needs checkpoints of one architecture"
        )


def _tie_views(base: HubInput, models: Sequence[HubInput]) -> tuple[Any, list[Any]]:
    """The inputs as the output's tying (the base's) sees them, as the engine's ``_tie_as_base`` builds them;
    (None, []) when a config cannot tell whether a checkpoint ties (the engine reports it)."""
    if all(embedding_names(r.names)[1] is None for r in (base, *models)):
        return base, list(models)
    if base.folder is None or any(m.folder is None for m in models):
        return None, []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the engine warns about a dropped head when it merges
            return tie_as_base(base, base.folder, models, [m.folder for m in models])
    except CheckpointError:
        return None, []


def _check_vocab_rows(base: Any, models: Sequence[Any], tokenizer_source: str | None) -> None:
    """Without a tokenizer source every checkpoint must have the base's number of embedding rows."""
    if tokenizer_source is not None:
        return
    embed, head = embedding_names(base.names)
    embed = embed or head
    if embed is None or not base.info(embed).shape:
        return
    rows = base.info(embed).shape[0]
    for m in models:
        if embed not in m or not m.info(embed).shape:
            continue
        theirs = m.info(embed).shape[0]
        if theirs != rows and tuple(m.info(embed).shape[1:]) == tuple(base.info(embed).shape[1:]):
            raise CheckpointError(
                f"vocabulary sizes differ: the base {base.label} has {rows} rows in {embed!r} but model {m.label} "
                f"has {theirs}; pass --tokenizer-source base, union or {m.label} to align the embedding rows by "
                "token"
            )
