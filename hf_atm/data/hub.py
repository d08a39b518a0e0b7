"""Hub suites (for a machine with a network): the ATM paper's eight vision tasks and GLUE.

The datasets are read with ``datasets.load_dataset`` by repo id; the defaults below are the copies commonly
used for these benchmarks and are *not* checked here (this code was written offline). Override any of them
with ``sources={task: "org/name"}``, ``{task: "org/name:config"}``, a local folder (anything
``load_dataset`` reads, or a ``save_to_disk`` folder), or a :class:`HubTask`.

Normalization (every task ends as the offline suites do):

* columns: images become ``image`` (the dataset's own Image feature, decoded lazily); texts become ``text``
  and, for sentence-pair tasks, ``text_pair``; the label becomes a ClassLabel ``label`` (string labels get
  sorted names, integer labels without names get ``"0".."k-1"``); every other column is dropped;
* splits: ``test`` is the dataset's test split when it is labelled, else its validation split
  (GLUE's test labels are hidden: -1), else a fixed 20% of train (independent of the seed); examples
  labelled -1 are dropped; ``train`` / ``validation`` are carved from the dataset's train split by the rules of
  :mod:`hf_atm.data.splits` (10% validation, at most 5,000; caps class-balanced).

Offline, or when a repo cannot be read, :class:`~hf_atm.errors.HubError` names the dataset and the remedy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_atm.data.splits import DEFAULT_MAX_TEST, DEFAULT_MAX_TRAIN, split_indices
from hf_atm.errors import HubError, TaskDataError

__all__ = [
    "GLUE_DEFAULT_TASKS",
    "GLUE_TASKS",
    "HUB_SUITES",
    "VIT8_TASKS",
    "HubTask",
    "load_hub_suite",
    "normalize_hub_dataset",
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
    """

    repo: str
    config: str | None = None
    kind: str = "image"
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    test_split: str | None = None


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


def _glue(config: str, *columns: str, test_split: str = "validation") -> HubTask:
    return HubTask("nyu-mll/glue", config=config, kind="text", text_columns=columns, test_split=test_split)


# GLUE's classification tasks (STS-B is a regression and is left out). GLUE's test labels are hidden, so its
# validation split serves as test (MNLI: validation_matched).
GLUE_TASKS: dict[str, HubTask] = {
    "cola": _glue("cola", "sentence"),
    "sst2": _glue("sst2", "sentence"),
    "mrpc": _glue("mrpc", "sentence1", "sentence2"),
    "qqp": _glue("qqp", "question1", "question2"),
    "mnli": _glue("mnli", "premise", "hypothesis", test_split="validation_matched"),
    "qnli": _glue("qnli", "question", "sentence"),
    "rte": _glue("rte", "sentence1", "sentence2"),
    "wnli": _glue("wnli", "sentence1", "sentence2"),
}
# WNLI is usually left out (its train/dev split is adversarial); ask for it with tasks=[..., "wnli"].
GLUE_DEFAULT_TASKS = ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte")
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
    return HubTask(repo, config, base.kind, base.text_columns, base.label_column, base.test_split)


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
) -> Any:
    """A loaded DatasetDict turned into the suites' form (see the module docstring)."""
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
    names, mapping = _label_names([raw[s] for s in ("train", test_name) if s], label_col)

    def labels_of(ds: Any) -> np.ndarray:
        values = ds[label_col]
        if mapping is None:
            return np.asarray(values, dtype=np.int64)
        return np.asarray([mapping.get(v, -1) for v in values], dtype=np.int64)

    train_y = labels_of(train)
    pool_pos = np.flatnonzero(train_y >= 0)
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
        test_pos = np.flatnonzero(test_y >= 0)
    if len(pool_pos) < 2 or len(test_pos) < 1:
        raise TaskDataError(f"Hub task {task!r}: too few labelled examples (train {len(pool_pos)}, "
                            f"test {len(test_pos)})")  # fmt: skip
    tr, va, te = split_indices(
        train_y[pool_pos], test_y[test_pos], seed=seed, max_train=max_train_per_task, max_test=max_test_per_task
    )
    class_label = datasets.ClassLabel(names=names)

    def finish(ds: Any, positions: np.ndarray, y: np.ndarray) -> Any:
        ds = ds.select(positions.tolist()).select_columns(inputs)
        for src, dst in zip(inputs, targets):
            if src != dst:
                ds = ds.rename_column(src, dst)
        return ds.add_column("label", y[positions].tolist(), feature=class_label)

    return datasets.DatasetDict(
        {
            "train": finish(train, pool_pos[tr], train_y),
            "validation": finish(train, pool_pos[va], train_y),
            "test": finish(test_ds, test_pos[te], test_y),
        }
    )


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
) -> dict:
    """``{task: DatasetDict}`` of Hub suite `name` (``"hub-vit8"`` or ``"hub-glue"``), normalized.

    `tasks` picks tasks (default: the suite's defaults; a task not in the suite needs a `sources` entry);
    `sources` overrides where a task's data comes from; `cache_dir` / `token` go to ``load_dataset``.
    Needs the network unless the data is cached or local: HubError otherwise.
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
    suite = {}
    for task in names:
        spec = _as_spec(task, known.get(task), sources.get(task))
        raw = _load_raw(task, spec, cache_dir, token)
        suite[task] = normalize_hub_dataset(
            task, raw, spec, seed=seed, max_train_per_task=max_train_per_task, max_test_per_task=max_test_per_task
        )
    return suite
