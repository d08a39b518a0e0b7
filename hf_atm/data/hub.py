"""Hub suites (for a machine with a network): the ATM paper's eight vision tasks and GLUE.

The datasets are read with ``datasets.load_dataset`` by repo id; the defaults below are the copies commonly
used for these benchmarks and are *not* checked here (this code was written offline). Override any of them
with ``sources={task: "org/name"}``, ``{task: "org/name:config"}``, a local folder (anything
``load_dataset`` reads, or a ``save_to_disk`` folder), or a :class:`HubTask`.

Normalization (every task ends as the offline suites do):

* columns: images become ``image`` (the dataset's own Image feature, decoded lazily); texts become ``text``
  and, for sentence-pair tasks, ``text_pair``; the label becomes a ClassLabel ``label`` (string labels get
  sorted names, integer labels without names get ``"0".."k-1"``; a regression task's -- ``HubTask.regression``,
  GLUE's STS-B -- stays a float32 ``label``, non-finite values unlabelled); every other column is dropped;
* splits: ``test`` is the dataset's test split when it is labelled, else its validation split
  (GLUE's test labels are hidden: -1), else a fixed 20% of train (independent of the seed); examples
  labelled -1 are dropped; ``train`` / ``validation`` are carved from the dataset's train split by the rules of
  :mod:`hf_atm.data.splits` (10% validation, at most 5,000; caps class-balanced).

Class names (``hub-vit8``): the eight tasks' label names are the standard CLIP / task-vectors class names shipped
in ``hf_atm/data/vit8_classnames.json`` (with the per-task prompt templates in ``vit8_templates.json``), as the
fusion_bench package (by the author of the ``tanganke/*`` copies) lists them, in the order of those datasets'
ClassLabel ids: cars 196, dtd 47, eurosat 10, gtsrb 43, mnist 10, resisc45 45, svhn 10, sun397 397. They replace
the loaded dataset's own label names: *by name* when the dataset's ClassLabel names are the same names up to
case, ``_`` / ``/`` and spaces (:func:`class_name_key`), whatever its id order; else *by index*, with a warning
showing the first pairs that differ (a dataset's ClassLabel names for the same classes are often spelled
otherwise, e.g. ``AnnualCrop`` for ``annual crop land``), so the heads built from the names (zero-shot CLIP heads)
read the classes the labels mean; a dataset whose number of classes differs is refused.

Offline, or when a repo cannot be read, :class:`~hf_atm.errors.HubError` names the dataset and the remedy.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from hf_atm.data.splits import DEFAULT_MAX_TEST, DEFAULT_MAX_TRAIN, split_indices
from hf_atm.errors import HubError, TaskDataError

logger = logging.getLogger(__name__)

__all__ = [
    "GLUE_DEFAULT_TASKS",
    "GLUE_METRICS",
    "GLUE_TASKS",
    "HUB_SUITES",
    "VIT8_TASKS",
    "HubTask",
    "class_name_key",
    "hub_dataset_source",
    "hub_dataset_sources",
    "load_hub_suite",
    "normalize_hub_dataset",
    "regression_tasks",
    "vit8_classnames",
    "vit8_templates",
]

HELD_OUT_FRACTION = 0.2
_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_LABEL_COLUMNS = ("label", "labels")


@dataclass(frozen=True)
class HubTask:
    """Where one Hub task's data lives and how to read it.

    repo: a Hub dataset id or a local folder. config: the dataset configuration (subset), if any.
    kind: ``"image"`` or ``"text"``. text_columns: the one or two text columns of a text task (the image
    column of an image task is found among ``image`` / ``img``). label_column: the label's column.
    test_split: the split to use as test (default: ``test`` when labelled, else ``validation``).
    regression: the name of what a regression task's real-valued label is (e.g. ``"similarity"``): its
    ``label`` stays a float column (no ClassLabel); None for a classification task.
    """

    repo: str
    config: str | None = None
    kind: str = "image"
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    test_split: str | None = None
    regression: str | None = None


VIT8_TASKS: dict[str, HubTask] = {
    "cars": HubTask("tanganke/stanford_cars"),
    "dtd": HubTask("tanganke/dtd"),
    "eurosat": HubTask("tanganke/eurosat"),
    "gtsrb": HubTask("tanganke/gtsrb"),
    "mnist": HubTask("ylecun/mnist"),
    "resisc45": HubTask("tanganke/resisc45"),
    "svhn": HubTask("ufldl-stanford/svhn", config="cropped_digits"),
    "sun397": HubTask("tanganke/sun397"),
}


@cache
def _shipped(name: str) -> dict[str, tuple[str, ...]]:
    data = json.loads(Path(__file__).with_name(name).read_text(encoding="utf-8"))
    return {task: tuple(values) for task, values in data.items()}


def vit8_classnames() -> dict[str, list[str]]:
    """``{task: class names}`` of the eight ``hub-vit8`` tasks (shipped; order = the Hub datasets' label ids)."""
    return {task: list(names) for task, names in _shipped("vit8_classnames.json").items()}


def vit8_templates() -> dict[str, list[str]]:
    """``{task: prompt templates}`` of the eight ``hub-vit8`` tasks, each with one ``{}`` for the class name (the
    CLIP paper's / task vectors' per-dataset templates; shipped)."""
    return {task: list(t) for task, t in _shipped("vit8_templates.json").items()}


def _glue(config: str, *columns: str, test_split: str = "validation", regression: str | None = None) -> HubTask:
    return HubTask("nyu-mll/glue", config=config, kind="text", text_columns=columns, test_split=test_split,
                   regression=regression)


# GLUE's tasks (STS-B a regression: similarity 0..5). GLUE's test labels are hidden, so its validation split
# serves as test (MNLI: validation_matched).
GLUE_TASKS: dict[str, HubTask] = {
    "cola": _glue("cola", "sentence"),
    "sst2": _glue("sst2", "sentence"),
    "mrpc": _glue("mrpc", "sentence1", "sentence2"),
    "qqp": _glue("qqp", "question1", "question2"),
    "mnli": _glue("mnli", "premise", "hypothesis", test_split="validation_matched"),
    "qnli": _glue("qnli", "question", "sentence"),
    "rte": _glue("rte", "sentence1", "sentence2"),
    "wnli": _glue("wnli", "sentence1", "sentence2"),
    "stsb": _glue("stsb", "sentence1", "sentence2", regression="similarity"),
}
# WNLI is usually left out (its train/dev split is adversarial); ask for it with tasks=[..., "wnli"].
GLUE_DEFAULT_TASKS = ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte")
#: each GLUE task's official main metric (a name of hf_atm.atm.metrics.SHIPPED_METRICS; ATMConfig.task_metrics):
#: CoLA Matthews correlation, MRPC and QQP F1 (of the positive class), STS-B Pearson (a regression task: see
#: :func:`regression_tasks`), the others accuracy.
GLUE_METRICS: dict[str, str] = {
    "cola": "matthews_correlation",
    "sst2": "accuracy",
    "mrpc": "f1",
    "qqp": "f1",
    "stsb": "pearsonr",
    "mnli": "accuracy",
    "qnli": "accuracy",
    "rte": "accuracy",
    "wnli": "accuracy",
}
HUB_SUITES: dict[str, tuple[dict[str, HubTask], tuple[str, ...]]] = {
    "hub-vit8": (VIT8_TASKS, tuple(VIT8_TASKS)),
    "hub-glue": (GLUE_TASKS, GLUE_DEFAULT_TASKS),
}


def _as_spec(task: str, default: HubTask | None, source: str | HubTask | None) -> HubTask:
    """The task's HubTask: `source` (a HubTask, ``"repo"``, ``"repo:config"`` or a folder) over `default`."""
    if isinstance(source, HubTask):
        return source
    if default is None and source is None:
        raise TaskDataError(f"Hub task {task!r} has no default dataset: give one in sources={{{task!r}: ...}}")
    base = default or HubTask(repo="")
    if source is None:
        return base
    if not isinstance(source, str) or not source:
        raise TaskDataError(f"sources[{task!r}] must be a repo id, 'repo:config', a folder or a HubTask")
    repo, config = source, None
    if not Path(source).exists() and ":" in source:
        repo, config = source.rsplit(":", 1)
    return HubTask(repo, config, base.kind, base.text_columns, base.label_column, base.test_split, base.regression)


def regression_tasks(suite: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{task: [label name]}`` of the regression tasks of a loaded suite (``{task: DatasetDict}``): those whose
    ``label`` / ``labels`` column is a float :class:`datasets.Value`, named by the feature's description (what
    :func:`normalize_hub_dataset` records, e.g. ``"similarity"``; ``"score"`` when it has none). Their labels go
    to ``MultiTaskModel.from_backbone(..., regression_tasks=...)``."""
    out = {}
    for task, splits in suite.items():
        ds = splits["train"]
        feature = next((ds.features[c] for c in ("labels", "label") if c in ds.features), None)
        if getattr(feature, "dtype", "").startswith("float"):
            name = getattr(ds.info, "description", "") or ""
            out[task] = [name.removeprefix("regression:") if name.startswith("regression:") else "score"]
    return out


def _load_raw(task: str, spec: HubTask, cache_dir: str | None, token: str | bool | None) -> Any:
    """The dataset's DatasetDict (``load_from_disk`` for a ``save_to_disk`` folder, else ``load_dataset``)."""
    import datasets

    path = Path(spec.repo)
    try:
        if path.is_dir() and (path / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(spec.repo, spec.config, cache_dir=cache_dir, token=token)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear error naming the dataset
        where = f"{spec.repo!r}" + (f" (config {spec.config!r})" if spec.config else "")
        raise HubError(
            f"cannot load dataset {where} for task {task!r}: {type(e).__name__}: {e}. The Hub suites need "
            f"network access (HF_HUB_OFFLINE unset) or a copy already in the datasets cache; or pass "
            f"sources={{{task!r}: '/path/to/local/copy'}}. Offline, use the 'text' or 'vision' suites."
        ) from e


def _label_names(splits: Sequence[Any], column: str) -> tuple[list[str], dict[Any, int] | None]:
    """The label names and, for labels that are not ClassLabel ids, the value -> id mapping."""
    import datasets

    feature = splits[0].features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), None
    values: set[Any] = set()
    for ds in splits:
        values.update(v for v in ds.unique(column) if v is not None and v != -1)
    if not values:
        raise TaskDataError(f"label column {column!r} holds no labels")
    if all(isinstance(v, (int, np.integer)) for v in values):
        top = int(max(values))
        return [str(i) for i in range(top + 1)], {i: i for i in range(top + 1)}
    ordered = sorted(str(v) for v in values)
    return ordered, {v: ordered.index(str(v)) for v in values}


def _renamed(task: str, names: list[str], mapping: dict[Any, int] | None,
             class_names: Sequence[str]) -> tuple[list[str], dict[Any, int] | None]:
    """(`class_names`, value -> id mapping) replacing a dataset's label `names` (see :func:`_label_names`).

    ClassLabel labels whose names are the class names once compared by :func:`class_name_key` are mapped by
    NAME (dataset id -> the class name's index), whatever the dataset's id order. Other ClassLabel labels keep
    their ids (the i-th class name names id i: the shipped names follow the Hub datasets' id order) and a
    warning shows the first (dataset name, shipped name) pairs that differ. Integer labels keep their ids.
    String labels are mapped by name, and must be the class names themselves. TaskDataError when the class
    names are missing, duplicated or do not fit.
    """
    class_names = list(class_names)
    if not class_names or any(not isinstance(c, str) or not c.strip() for c in class_names):
        raise TaskDataError(f"class names of Hub task {task!r}: every class needs a non-empty name")
    if len(set(class_names)) != len(class_names):
        dup = sorted({c for c in class_names if class_names.count(c) > 1})
        raise TaskDataError(f"class names of Hub task {task!r}: duplicated {dup}")
    by_name = mapping is not None and any(isinstance(v, str) for v in mapping)
    if by_name:
        values = {str(v) for v in mapping}
        if values != set(class_names):
            raise TaskDataError(f"Hub task {task!r}: string labels {sorted(values)} are not the class names "
                                f"{class_names}")  # fmt: skip
        return class_names, {v: class_names.index(str(v)) for v in mapping}
    if len(names) != len(class_names):
        raise TaskDataError(f"Hub task {task!r}: the dataset has {len(names)} classes, its class names "
                            f"{len(class_names)}: give the task's own class names or another source")  # fmt: skip
    if mapping is not None:  # integer labels: the dataset has no names of its own to check
        return class_names, mapping
    own = [class_name_key(n) for n in names]
    shipped = {class_name_key(c): j for j, c in enumerate(class_names)}
    if len(set(own)) == len(own) and set(own) == set(shipped):
        # the dataset's ClassLabel spells the same classes: map by name, whatever the dataset's id order
        return class_names, {i: shipped[key] for i, key in enumerate(own)}
    pairs = [(n, c) for n, c in zip(names, class_names) if class_name_key(n) != class_name_key(c)][:_SHOWN_PAIRS]
    logger.warning("Hub task %r: the dataset's class names are not the shipped ones; applying the shipped names "
                   "by class id (check they line up): (dataset name, shipped name) %s", task, pairs)  # fmt: skip
    return class_names, None


#: (dataset name, shipped name) pairs a class-name warning shows.
_SHOWN_PAIRS = 5


def class_name_key(name: str) -> str:
    """A class name as compared with another: lowercase, ``_`` and ``/`` as spaces, runs of spaces as one,
    stripped (``"Annual_Crop"`` and ``"annual crop"`` name the same class)."""
    return " ".join(str(name).lower().replace("_", " ").replace("/", " ").split())


def _pick_test(task: str, raw: Any, spec: HubTask, label_col: str) -> str | None:
    """The split that serves as test, or None (then a fixed part of train is held out)."""
    if spec.test_split is not None:
        if spec.test_split not in raw:
            raise TaskDataError(f"Hub task {task!r}: no split {spec.test_split!r} (splits: {list(raw)})")
        return spec.test_split
    for name in ("test", "validation"):
        if name in raw and any(v != -1 for v in raw[name].unique(label_col)):
            return name
    return None


def normalize_hub_dataset(
    task: str,
    raw: Any,
    spec: HubTask,
    *,
    seed: int = 0,
    max_train_per_task: int | None = DEFAULT_MAX_TRAIN,
    max_test_per_task: int | None = DEFAULT_MAX_TEST,
    class_names: Sequence[str] | None = None,
) -> Any:
    """A loaded DatasetDict turned into the suites' form (see the module docstring); `class_names`, when
    given, become the label names (by name or by class id; see the module docstring)."""
    import datasets

    if "train" not in raw:
        raise TaskDataError(f"Hub task {task!r}: no 'train' split (splits: {list(raw)})")
    train = raw["train"]
    label_col = next((c for c in (spec.label_column, *_LABEL_COLUMNS) if c in train.column_names), None)
    if label_col is None:
        raise TaskDataError(f"Hub task {task!r}: no label column {spec.label_column!r} in {train.column_names}")
    if spec.kind == "image":
        inputs = [next((c for c in _IMAGE_COLUMNS if c in train.column_names), None)]
        if inputs[0] is None:
            raise TaskDataError(f"Hub task {task!r}: no image column ({_IMAGE_COLUMNS}) in {train.column_names}")
        targets = ["image"]
    elif spec.kind == "text":
        inputs = list(spec.text_columns) or ["text"]
        missing = [c for c in inputs if c not in train.column_names]
        if missing or len(inputs) > 2:
            raise TaskDataError(f"Hub task {task!r}: text columns {inputs} (one or two) not all in "
                                f"{train.column_names}")  # fmt: skip
        targets = ["text", "text_pair"][: len(inputs)]
    else:
        raise TaskDataError(f"Hub task {task!r}: kind must be 'image' or 'text', got {spec.kind!r}")

    test_name = _pick_test(task, raw, spec, label_col)
    if spec.regression is not None:  # real-valued targets: no class names; non-finite targets are unlabelled
        names, mapping = [spec.regression], None
    else:
        names, mapping = _label_names([raw[s] for s in ("train", test_name) if s], label_col)
    if class_names is not None and spec.regression is None:
        names, mapping = _renamed(task, names, mapping, class_names)

    def labels_of(ds: Any) -> np.ndarray:
        values = ds[label_col]
        if spec.regression is not None:
            return _float_targets(task, values)
        if mapping is None:
            return np.asarray(values, dtype=np.int64)
        return np.asarray([mapping.get(v, -1) for v in values], dtype=np.int64)

    def labelled(y: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.isfinite(y) if spec.regression is not None else y >= 0)

    train_y = labels_of(train)
    pool_pos = labelled(train_y)
    if test_name is None:
        held = np.random.default_rng(0).permutation(len(pool_pos))[: int(HELD_OUT_FRACTION * len(pool_pos))]
        is_test = np.zeros(len(pool_pos), dtype=bool)
        is_test[held] = True
        test_ds, test_pos = train, pool_pos[is_test]
        pool_pos = pool_pos[~is_test]
        test_y = train_y
    else:
        test_ds = raw[test_name]
        test_y = labels_of(test_ds)
        test_pos = labelled(test_y)
    if len(pool_pos) < 2 or len(test_pos) < 1:
        raise TaskDataError(f"Hub task {task!r}: too few labelled examples (train {len(pool_pos)}, "
                            f"test {len(test_pos)})")  # fmt: skip
    strata = (lambda y: np.zeros(len(y), dtype=np.int64)) if spec.regression is not None else (lambda y: y)
    tr, va, te = split_indices(  # a regression is one stratum (caps take a random subset)
        strata(train_y[pool_pos]), strata(test_y[test_pos]), seed=seed, max_train=max_train_per_task,
        max_test=max_test_per_task,
    )
    label_feature = datasets.Value("float32") if spec.regression is not None else datasets.ClassLabel(names=names)
    # The Hub dataset the data came from, kept in each split's DatasetInfo (which select / map / formatting carry
    # along, as they carry the split of the source the rows were drawn from): model cards name it. A local
    # source is no Hub dataset (even when it is a copy of one), so its name is cleared.
    hub_id = None if Path(spec.repo).exists() else spec.repo

    def finish(ds: Any, positions: np.ndarray, y: np.ndarray) -> Any:
        ds = ds.select(positions.tolist()).select_columns(inputs)
        for src, dst in zip(inputs, targets):
            if src != dst:
                ds = ds.rename_column(src, dst)
        out = ds.add_column("label", y[positions].tolist(), feature=label_feature)
        out.info.dataset_name, out.info.config_name = hub_id, spec.config if hub_id else None
        if spec.regression is not None:
            out.info.description = f"regression:{spec.regression}"  # read back by regression_tasks
        return out

    return datasets.DatasetDict(
        {
            "train": finish(train, pool_pos[tr], train_y),
            "validation": finish(train, pool_pos[va], train_y),
            "test": finish(test_ds, test_pos[te], test_y),
        }
    )


def _float_targets(task: str, values: Any) -> np.ndarray:
    """A regression task's label values as float64 (None as NaN: unlabelled); TaskDataError naming the task
    for values that are not numbers."""
    try:
        return np.asarray([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TaskDataError(f"Hub task {task!r} is a regression: its labels must be numbers ({e})") from None


def hub_dataset_source(dataset: Any) -> dict[str, Any] | None:
    """Where a split made by :func:`load_hub_suite` was drawn from: ``{"id": Hub dataset id, "config": config or
    None, "split": the Hub split, "examples": rows here, "split_examples": rows of that Hub split or None}``;
    None for data that did not come from a Hub dataset (local sources, the offline suites, user datasets)."""
    info = getattr(dataset, "info", None)
    hub_id = getattr(info, "dataset_name", None)
    if not isinstance(hub_id, str) or "/" not in hub_id or Path(hub_id).exists():
        return None
    split = str(dataset.split) if getattr(dataset, "split", None) is not None else None
    recorded = getattr(info, "splits", None) or {}
    total = recorded[split].num_examples if split in recorded else None
    return {"id": hub_id, "config": getattr(info, "config_name", None), "split": split,
            "examples": len(dataset), "split_examples": total}  # fmt: skip


def hub_dataset_sources(task_datasets: Mapping[str, Any], split: str = "test") -> dict[str, dict[str, Any]]:
    """``{task: hub_dataset_source(its split)}`` of the tasks whose `split` came from a Hub dataset (others are
    left out). `task_datasets` maps a task to its splits (a DatasetDict or ``{split: Dataset}``)."""
    out = {}
    for task, splits in task_datasets.items():
        ds = splits.get(split) if hasattr(splits, "get") else None
        source = hub_dataset_source(ds) if ds is not None else None
        if source is not None:
            out[task] = source
    return out


def load_hub_suite(
    name: str,
    seed: int = 0,
    max_train_per_task: int | None = DEFAULT_MAX_TRAIN,
    max_test_per_task: int | None = DEFAULT_MAX_TEST,
    tasks: Sequence[str] | None = None,
    *,
    sources: Mapping[str, str | HubTask] | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    class_names: Mapping[str, Sequence[str] | None] | None = None,
) -> dict:
    """``{task: DatasetDict}`` of Hub suite `name` (``"hub-vit8"`` or ``"hub-glue"``), normalized.

    `tasks` picks tasks (default: the suite's defaults; a task not in the suite needs a `sources` entry);
    `sources` overrides where a task's data comes from; `cache_dir` / `token` go to ``load_dataset``.
    `class_names` overrides a task's label names (``hub-vit8`` default: :func:`vit8_classnames`; ``None`` for a
    task keeps the dataset's own names). Needs the network unless the data is cached or local: HubError otherwise.
    """
    if name not in HUB_SUITES:
        raise TaskDataError(f"unknown Hub suite {name!r}: choose from {', '.join(HUB_SUITES)}")
    known, defaults = HUB_SUITES[name]
    sources = dict(sources or {})
    names = list(defaults if tasks is None else tasks)
    unknown = [t for t in names if t not in known and t not in sources]
    if unknown or not names:
        raise TaskDataError(f"unknown {name} task(s) {unknown or names}: choose from {', '.join(known)} "
                            f"or give sources={{task: dataset}}")  # fmt: skip
    shipped = vit8_classnames() if name == "hub-vit8" else {}
    renames = {**shipped, **dict(class_names or {})}
    suite = {}
    for task in names:
        spec = _as_spec(task, known.get(task), sources.get(task))
        raw = _load_raw(task, spec, cache_dir, token)
        suite[task] = normalize_hub_dataset(
            task, raw, spec, seed=seed, max_train_per_task=max_train_per_task, max_test_per_task=max_test_per_task,
            class_names=renames.get(task),
        )
    return suite
