"""A node's data: the task a node holds, its datasets (suite or user function) and the model's tokenizer."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from hf_atm.errors import TaskDataError
from hf_atm.federated.config import FederatedATMConfig

__all__ = ["CACHE_SIZE", "label_names", "load_processing_class", "load_task_data", "node_task"]

#: datasets (and local models) kept per process: a simulation actor serves several nodes in turn; a
#: SuperNode holds one task
CACHE_SIZE = int(os.environ.get("HF_ATM_FEDERATED_CACHE", "4"))

_DATA: OrderedDict[str, tuple[dict[str, Any], Any]] = OrderedDict()


def load_processing_class(model_ref: str) -> Any:
    """The tokenizer saved with `model_ref` (local folder or Hub id, offline-friendly), or None."""
    from transformers import AutoTokenizer

    from hf_atm.hub.resolve import resolve_model

    try:
        return AutoTokenizer.from_pretrained(resolve_model(model_ref), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _import(spec: str) -> Any:
    import importlib

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise TaskDataError(f"data: expected 'suite:<name>' or 'module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise TaskDataError(f"data: cannot import {spec!r}: {e}") from e


def load_task_data(cfg: FederatedATMConfig) -> tuple[dict[str, Any], Any]:
    """``({task: DatasetDict of model inputs + labels}, processing class)`` of ``cfg.data`` (cached per
    process).

    ``suite:<name>``: ``hf_atm.data.load_suite(name, tasks=cfg.tasks, **data_kwargs)``; text suites are
    tokenized with the model's tokenizer (``max_length`` from data_kwargs, default 64), image suites
    pixelized (``image_size`` / ``mean`` / ``std`` / ``num_channels`` from data_kwargs).
    ``module:function``: ``function(**data_kwargs)`` returning ``{task: DatasetDict}`` or ``(that, processor)``.
    """
    key = json.dumps([cfg.model, cfg.data, cfg.data_kwargs, cfg.tasks], sort_keys=True, default=str)
    if key in _DATA:
        _DATA.move_to_end(key)
        return _DATA[key]
    kw = dict(cfg.data_kwargs or {})
    if cfg.data.startswith("suite:"):
        from hf_atm.data import load_suite, pixelize_suite, suite_modality, tokenize_suite

        name = cfg.data.split(":", 1)[1]
        prep_keys = ("max_length", "image_size", "mean", "std", "num_channels")
        prep = {k: kw.pop(k) for k in prep_keys if k in kw}
        suite = load_suite(name, tasks=cfg.tasks, **kw)
        if suite_modality(name) == "text":
            proc = load_processing_class(cfg.model)
            if proc is None:
                raise TaskDataError(f"data {cfg.data!r}: the model {cfg.model!r} has no tokenizer to tokenize it")
            suite = tokenize_suite(suite, proc, max_length=int(prep.get("max_length", 64)))
        else:
            proc = None
            suite = pixelize_suite(suite, **{k: v for k, v in prep.items() if k != "max_length"})
    else:
        out = _import(cfg.data)(**kw)
        suite, proc = out if isinstance(out, tuple) else (out, None)
    if not isinstance(suite, Mapping) or not suite:
        raise TaskDataError(f"data {cfg.data!r} gave no tasks")
    if cfg.tasks is not None:
        missing = [t for t in cfg.tasks if t not in suite]
        if missing:
            raise TaskDataError(f"data {cfg.data!r} has no task(s) {missing} (it has {sorted(suite)})")
        suite = {t: suite[t] for t in cfg.tasks}
    _DATA[key] = (dict(suite), proc)
    while len(_DATA) > CACHE_SIZE:
        _DATA.popitem(last=False)
    return _DATA[key]


def node_task(node_config: Mapping[str, Any], tasks: Sequence[str]) -> str:
    """The task of a node: node config ``task``, else ``partition-id`` into the sorted `tasks`."""
    names = sorted(tasks)
    if "task" in node_config:
        task = str(node_config["task"])
        if task not in names:
            raise TaskDataError(f"node config task={task!r} is not one of the data's tasks {names}")
        return task
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(names):
            raise TaskDataError(f"node config partition-id={pid} out of range for {len(names)} tasks {names}")
        return names[pid]
    raise TaskDataError("the node config names no task: start the SuperNode with --node-config \"task='<name>'\"")


def label_names(dd: Any, task: str) -> list[str]:
    """The label names of `task`'s DatasetDict `dd` (its ``labels`` / ``label`` ClassLabel column)."""
    ds = dd["train"] if "train" in dd else next(iter(dd.values()))
    for col in ("labels", "label"):
        names = getattr(ds.features.get(col), "names", None) if col in ds.features else None
        if names:
            return [str(x) for x in names]
    raise TaskDataError(f"task {task!r}: the label column is not a ClassLabel (no label names)")
