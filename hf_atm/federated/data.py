"""A node's data: the task a node holds, its datasets (suite or user function) and the model's tokenizer.

A node prepares its own task only (:func:`node_data`), once: the tokenized / pixelized DatasetDict is saved
under ``$HF_ATM_CACHE/federated/<key>`` (default ``~/.cache/hf_atm/federated/<key>``) with
``datasets.DatasetDict.save_to_disk``, where ``key`` hashes everything the prepared data depends on (data
spec, data kwargs, the task, the tokenizer, the data function's source, library versions; its limits:
:func:`data_cache_key`), so a changed option gives a new folder. The folder appears by one rename once
complete (``hf_atm.files.atomic_write_dir``; a broken folder is replaced as a whole,
``hf_atm.files.replace_dir``): a half-written cache is never read. In the deployment runtime every message
runs in a fresh ClientApp process; the next message of the node then memory-maps the saved Arrow files
instead of re-reading and re-tokenizing the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_atm.errors import TaskDataError
from hf_atm.federated.config import FederatedATMConfig

__all__ = [
    "CACHE_SIZE",
    "NodeData",
    "data_cache_dir",
    "data_cache_key",
    "forget_loaded_data",
    "label_names",
    "load_processing_class",
    "load_task_data",
    "node_data",
    "node_task",
    "task_names",
]

log = logging.getLogger("hf_atm.federated")

#: datasets (and local models) kept per process: a simulation actor serves several nodes in turn; a
#: SuperNode holds one task
CACHE_SIZE = int(os.environ.get("HF_ATM_FEDERATED_CACHE", "4"))
#: version of the cached folder's layout (part of the key)
CACHE_FORMAT = 2
_META = "meta.json"
_DATASET = "dataset"
#: the files of a tokenizer whose bytes make its identity in the cache key
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")

_DATA: OrderedDict[str, tuple[dict[str, Any], Any]] = OrderedDict()
_NODE: OrderedDict[str, NodeData] = OrderedDict()


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


def _suite_name(cfg: FederatedATMConfig) -> str | None:
    return cfg.data.split(":", 1)[1] if cfg.data.startswith("suite:") else None


def _prepare_suite(cfg: FederatedATMConfig, tasks: Sequence[str] | None) -> tuple[dict[str, Any], Any]:
    """``hf_atm.data.load_suite(name, tasks=tasks, **data_kwargs)``, tokenized with the model's tokenizer
    (text) or pixelized (images)."""
    from hf_atm.data import load_suite, pixelize_suite, suite_modality, tokenize_suite

    name = _suite_name(cfg)
    assert name is not None
    kw = dict(cfg.data_kwargs or {})
    prep_keys = ("max_length", "image_size", "mean", "std", "num_channels")
    prep = {k: kw.pop(k) for k in prep_keys if k in kw}
    suite = load_suite(name, tasks=None if tasks is None else list(tasks), **kw)
    if suite_modality(name) == "text":
        proc = load_processing_class(cfg.model)
        if proc is None:
            raise TaskDataError(f"data {cfg.data!r}: the model {cfg.model!r} has no tokenizer to tokenize it")
        return tokenize_suite(suite, proc, max_length=int(prep.get("max_length", 64))), proc
    return pixelize_suite(suite, **{k: v for k, v in prep.items() if k != "max_length"}), None


def _call_data_function(cfg: FederatedATMConfig) -> tuple[dict[str, Any], Any]:
    out = _import(cfg.data)(**dict(cfg.data_kwargs or {}))
    suite, proc = out if isinstance(out, tuple) else (out, None)
    if not isinstance(suite, Mapping) or not suite:
        raise TaskDataError(f"data {cfg.data!r} gave no tasks")
    return dict(suite), proc


def load_task_data(cfg: FederatedATMConfig) -> tuple[dict[str, Any], Any]:
    """``({task: DatasetDict of model inputs + labels}, processing class)`` of every task of ``cfg.data``
    (cached per process). A node needs only its own task: :func:`node_data`.

    ``suite:<name>``: ``hf_atm.data.load_suite(name, tasks=cfg.tasks, **data_kwargs)``; text suites are
    tokenized with the model's tokenizer (``max_length`` from data_kwargs, default 64), image suites
    pixelized (``image_size`` / ``mean`` / ``std`` / ``num_channels`` from data_kwargs).
    ``module:function``: ``function(**data_kwargs)`` returning ``{task: DatasetDict}`` or ``(that, processor)``.
    """
    key = json.dumps([cfg.model, cfg.data, cfg.data_kwargs, cfg.tasks], sort_keys=True, default=str)
    if key in _DATA:
        _DATA.move_to_end(key)
        return _DATA[key]
    suite, proc = _prepare_suite(cfg, cfg.tasks) if _suite_name(cfg) else _call_data_function(cfg)
    if not suite:
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


def task_names(cfg: FederatedATMConfig) -> list[str] | None:
    """The run's tasks without reading any data: ``cfg.tasks``, else a suite's task list; None for a data
    function (only calling it tells)."""
    if cfg.tasks is not None:
        return list(cfg.tasks)
    name = _suite_name(cfg)
    if name is None:
        return None
    from hf_atm.data import suite_tasks

    return list(suite_tasks(name))


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


# ----------------------------------------------------------------------------------------------------------
# one node's task, prepared once and cached on disk
# ----------------------------------------------------------------------------------------------------------
class NodeData:
    """The prepared data of the task a node holds. The task, label names and example counts come from the
    cache's ``meta.json``; the DatasetDict (memory-mapped Arrow files) and the processing class are read on
    first use, so a hello or sync reads no dataset and loads no tokenizer."""

    def __init__(self, cfg: FederatedATMConfig, task: str, labels: list[str], counts: Mapping[str, int], key: str,
                 from_cache: bool, dataset: Any = None, processing_class: Any = None,
                 folder: Path | None = None, has_processor: bool = False) -> None:
        self.task, self.labels, self.key, self.from_cache = task, list(labels), key, from_cache
        self.counts = dict(counts)  #: examples per split
        self._cfg, self._folder, self._dataset = cfg, folder, dataset
        self._proc, self._proc_loaded = processing_class, dataset is not None or not has_processor

    @property
    def num_train(self) -> int:
        return int(self.counts["train"])

    @property
    def num_validation(self) -> int:
        return int(self.counts["validation"])

    @property
    def dataset(self) -> Any:
        """DatasetDict (train / validation / test) of model inputs + ``labels``. A cache whose meta is valid but
        whose dataset cannot be read (a damaged Arrow file) is logged and prepared again, not failed forever."""
        if self._dataset is None:
            import datasets

            assert self._folder is not None
            try:
                self._dataset = datasets.load_from_disk(str(self._folder / _DATASET))
            except (OSError, ValueError, KeyError) as e:  # pyarrow's ArrowInvalid is a ValueError
                log.warning("data cache %s: dataset unreadable (%s): preparing the data again", self._folder, e)
                dd, proc = _prepare_and_cache(self._cfg, self.task, self._folder)
                if label_names(dd, self.task) != self.labels:
                    raise TaskDataError(f"task {self.task!r}: the data prepared again has labels "
                                        f"{label_names(dd, self.task)}, its cache {self._folder} said "
                                        f"{self.labels}") from e
                self._dataset = dd
                if not self._proc_loaded:
                    self._proc, self._proc_loaded = proc, True
        return self._dataset

    @property
    def processing_class(self) -> Any:
        """The tokenizer of a text suite (the model's), a data function's processing class, or None."""
        if not self._proc_loaded:
            self._proc = (load_processing_class(self._cfg.model) if _suite_name(self._cfg)
                          else _call_data_function(self._cfg)[1])
            self._proc_loaded = True
        return self._proc


def data_cache_dir() -> Path:
    """``$HF_ATM_CACHE/federated`` (default ``~/.cache/hf_atm/federated``): where nodes keep prepared data."""
    from hf_atm.backbones import default_cache_dir

    return default_cache_dir() / "federated"


def _files_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _tokenizer_identity(model_ref: str) -> str:
    """The sha256 of the tokenizer files saved with `model_ref` and of the ``model_type`` / ``tokenizer_class``
    of its ``config.json`` (AutoTokenizer picks the tokenizer class from them): the same tokenizer on every
    machine gives the same identity, wherever its folder is."""
    from hf_atm.hub.resolve import resolve_model

    folder = Path(resolve_model(model_ref))
    files = [folder / f for f in _TOKENIZER_FILES if (folder / f).is_file()]
    if not files:
        raise TaskDataError(f"data: the model {model_ref!r} ({folder}) has no tokenizer files to tokenize text")
    chooses: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
            chooses = {k: config.get(k) for k in ("model_type", "tokenizer_class")}
        except (OSError, ValueError) as e:
            raise TaskDataError(f"data: {folder / 'config.json'} unreadable ({e})") from e
    return _files_digest(files) + json.dumps(chooses, sort_keys=True)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def _source_identity(spec: str) -> str:
    """The sha256 of the source file of the data function `spec` (an edited function gives a new key)."""
    import inspect

    fn = _import(spec)
    try:
        source = inspect.getsourcefile(fn)
    except TypeError:
        source = None
    return _files_digest([Path(source)]) if source and Path(source).is_file() else spec


def data_cache_key(cfg: FederatedATMConfig, task: str) -> str:
    """The key of `task`'s prepared data: sha256 of the data spec, data kwargs (``max_length`` and the
    preprocessing options included), the task, the versions of hf_atm and datasets, and

    * text suites: the tokenizer's files, the ``model_type`` / ``tokenizer_class`` of the model's
      ``config.json``, and the transformers and tokenizers versions;
    * ``module:function``: the source file of the function (the module that defines it).

    Limits (not in the key; delete the cache folder after changing them): modules the data function imports
    and data files it reads; the code of ``hf_atm.data`` in an editable install whose version did not change;
    the versions of other libraries the preparation uses (numpy, PIL for image suites)."""
    from hf_atm.version import __version__

    name = _suite_name(cfg)
    parts: dict[str, Any] = {"format": CACHE_FORMAT, "data": cfg.data, "data_kwargs": cfg.data_kwargs or {},
                             "task": task, "hf_atm": __version__, "datasets": _version("datasets")}
    if name is not None:
        from hf_atm.data import suite_modality

        if suite_modality(name) == "text":
            parts["tokenizer"] = _tokenizer_identity(cfg.model)
            parts["transformers"] = _version("transformers")
            parts["tokenizers"] = _version("tokenizers")
    else:
        parts["source"] = _source_identity(cfg.data)
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read_meta(folder: Path, task: str) -> dict[str, Any] | None:
    """The meta of the complete cache in `folder` (task, label names, counts), or None (absent, or unreadable:
    then prepared again). ``meta.json`` is the last file a writer writes and the folder appears by one rename."""
    if not (folder / _META).is_file() or not (folder / _DATASET).is_dir():
        return None
    try:
        meta = json.loads((folder / _META).read_text())
        if meta.get("task") != task:
            raise ValueError(f"holds task {meta.get('task')!r}")
        meta["labels"] = [str(x) for x in meta["labels"]]
        meta["counts"] = {str(k): int(v) for k, v in meta["counts"].items()}
        return meta
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("data cache %s unreadable (%s): preparing the data again", folder, e)
        return None


def _write_cache(folder: Path, dd: Any, task: str, labels: list[str], cfg: FederatedATMConfig,
                 has_processor: bool) -> None:
    """Save the prepared `dd` as the cache `folder`: a new folder appears by one rename; a broken one that
    exists is replaced as a whole (``replace_dir``: no stale file of it survives)."""
    from hf_atm.files import atomic_write_dir, replace_dir

    def write(tmp: Path) -> None:
        dd.save_to_disk(str(tmp / _DATASET))
        meta = {"task": task, "labels": labels, "counts": {sp: len(ds) for sp, ds in dd.items()}, "data": cfg.data,
                "data_kwargs": cfg.data_kwargs or {}, "processing_class": has_processor}
        (tmp / _META).write_text(json.dumps(meta, indent=1, default=str) + "\n")

    try:
        (replace_dir if folder.exists() else atomic_write_dir)(folder, write)
    except OSError as e:  # another process of this node's machine wrote it first: theirs is as good
        if not (folder / _META).is_file():
            log.warning("data cache %s not written (%s)", folder, e)


def _prepare_and_cache(cfg: FederatedATMConfig, task: str, folder: Path,
                       loaded: tuple[Mapping[str, Any], Any] | None = None) -> tuple[Any, Any]:
    """Prepare `task` (from `loaded` ``(suite, processing class)`` when the data function was already called)
    and save it as the cache `folder`; returns ``(DatasetDict, processing class)``."""
    suite, proc = loaded or (_prepare_suite(cfg, [task]) if _suite_name(cfg) else _call_data_function(cfg))
    if task not in suite:
        raise TaskDataError(f"data {cfg.data!r} has no task {task!r} (it has {sorted(suite)})")
    dd = suite[task]
    _write_cache(folder, dd, task, label_names(dd, task), cfg, proc is not None)
    return dd, proc


def node_data(cfg: FederatedATMConfig, node_config: Mapping[str, Any]) -> NodeData:
    """The prepared data of the task this node holds (:func:`node_task`), and only that task: from this
    process's memory, else from the disk cache (:func:`data_cache_dir` / :func:`data_cache_key`), else
    prepared (``load_suite(name, tasks=[task])`` + tokenize / pixelize, or the data function) and saved there.

    A data function that also returns a processing class is called again on each cold start (the class is
    not cached on disk, only the datasets are; its datasets are still read from the cache)."""
    names = task_names(cfg)
    suite = proc = None
    if names is None and "task" not in node_config:  # partition-id into a data function's tasks: call it
        suite, proc = load_task_data(cfg)
        names = list(suite)
    task = node_task(node_config, names) if names is not None else str(node_config["task"])
    key = data_cache_key(cfg, task)
    mem_key = json.dumps([key, cfg.model], default=str)
    if mem_key in _NODE:
        _NODE.move_to_end(mem_key)
        return _NODE[mem_key]
    folder = data_cache_dir() / key
    meta = _read_meta(folder, task)
    if meta is not None:
        node = NodeData(cfg, task, meta["labels"], meta["counts"], key, True, processing_class=proc, folder=folder,
                        has_processor=bool(meta.get("processing_class")) and proc is None)
    else:
        dd, proc = _prepare_and_cache(cfg, task, folder, None if suite is None else (suite, proc))
        node = NodeData(cfg, task, label_names(dd, task), {sp: len(ds) for sp, ds in dd.items()}, key, False,
                        dataset=dd, processing_class=proc)
    _NODE[mem_key] = node
    while len(_NODE) > CACHE_SIZE:
        _NODE.popitem(last=False)
    return node


def forget_loaded_data() -> None:
    """Drop this process's in-memory copies of prepared data (the disk cache stays): the next
    :func:`node_data` reads the disk cache as a fresh ClientApp process would."""
    _NODE.clear()
    _DATA.clear()
