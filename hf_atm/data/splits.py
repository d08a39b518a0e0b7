"""Shared rules of every task suite: where the Debian data lives, class balancing and the split sizes.

Every task is a ``datasets.DatasetDict`` with ``train`` / ``validation`` / ``test`` and a ClassLabel ``label``.
The split rules (one place, so that every suite follows them):

* the *pool* is the task's own training data (the dataset's train split, or for a dataset without a test
  split everything not held out for test); it is capped at ``max_train_per_task`` examples,
  class-balanced (:func:`balanced_take`, taking examples in an order drawn from ``seed``), then shuffled
  (again from ``seed``);
* ``validation`` is the first ``min(5000, len(pool) // 10)`` examples of that capped, shuffled pool
  (10% of the task's training data, at most 5,000, as in the ATM paper), ``train`` the rest;
* ``test`` never depends on ``seed``: the dataset's own test split, or a fixed held-out fraction chosen by a
  seed-independent rule; it is capped at ``max_test_per_task`` examples, class-balanced, by a fixed order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hf_atm.errors import TaskDataError

__all__ = [
    "DEBIAN_ROOT_ENV",
    "DEFAULT_MAX_TEST",
    "DEFAULT_MAX_TRAIN",
    "MAX_VALIDATION",
    "balanced_take",
    "build_task",
    "debian_root",
    "require_path",
    "split_indices",
    "stable_hash",
    "validation_size",
]

DEBIAN_ROOT_ENV = "HF_ATM_DEBIAN_ROOT"
DEFAULT_MAX_TRAIN = 4000
DEFAULT_MAX_TEST = 2000
MAX_VALIDATION = 5000


def debian_root() -> Path:
    """The folder under which the Debian data packages live: ``$HF_ATM_DEBIAN_ROOT`` or ``/usr/share``.

    Read at every call, so that tests (and users with a copy of the data elsewhere) can point it elsewhere.
    """
    return Path(os.environ.get(DEBIAN_ROOT_ENV) or "/usr/share")


def require_path(path: Path, package: str) -> Path:
    """`path` if it exists, else TaskDataError naming the Debian package that provides it."""
    if not path.exists():
        raise TaskDataError(
            f"{path} not found: it comes from the Debian package {package!r}; install it with "
            f"`sudo apt-get install {package}` (scripts/setup.sh installs every package the suites read), "
            f"or point ${DEBIAN_ROOT_ENV} at a folder holding a copy of /usr/share"
        )
    return path


def stable_hash(text: str) -> int:
    """A 64-bit hash of `text` that is the same on every machine and run (unlike ``hash()``)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def validation_size(pool_size: int) -> int:
    """Number of validation examples carved from a pool of `pool_size`: 10% of it, at most 5,000."""
    return min(MAX_VALIDATION, pool_size // 10)


def _check_cap(name: str, cap: int | None) -> None:
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise TaskDataError(f"{name} must be a positive integer or None (no cap), got {cap!r}")


def balanced_take(labels: Sequence[int] | np.ndarray, cap: int | None, order: np.ndarray) -> np.ndarray:
    """Indices of at most `cap` examples, as class-balanced as the class sizes allow, in `order`'s order.

    Classes with fewer examples than an equal share keep all of theirs; the remaining budget is shared
    equally among the larger classes (water filling), the leftover few going to the classes that come
    first in `order`. Within a class the examples taken are the first ones in `order` (a permutation of
    ``range(len(labels))``). ``cap=None`` or ``cap >= len(labels)`` takes everything.
    """
    labels = np.asarray(labels)
    order = np.asarray(order)
    if cap is None or cap >= len(labels):
        return order.copy()
    counts = {int(c): int(n) for c, n in zip(*np.unique(labels, return_counts=True))}
    quota: dict[int, int] = {}
    remaining = cap
    open_classes = sorted(counts, key=lambda c: (counts[c], c))
    # Water filling: smallest classes first; a class smaller than an equal share of what is left keeps all.
    while open_classes and counts[open_classes[0]] <= remaining // len(open_classes):
        c = open_classes.pop(0)
        quota[c] = counts[c]
        remaining -= counts[c]
    if open_classes:
        share = remaining // len(open_classes)
        for c in open_classes:
            quota[c] = share
        remaining -= share * len(open_classes)
        # Leftover (fewer than the open classes): one more each for the open classes met first in `order`.
        first_seen: dict[int, int] = {}
        for pos, idx in enumerate(order):
            first_seen.setdefault(int(labels[idx]), pos)
        for c in sorted(open_classes, key=lambda c: first_seen[c])[:remaining]:
            quota[c] += 1
    taken = dict.fromkeys(quota, 0)
    keep = []
    for idx in order:
        c = int(labels[idx])
        if taken[c] < quota[c]:
            taken[c] += 1
            keep.append(idx)
    return np.asarray(keep, dtype=np.int64)


def _columns_at(columns: Mapping[str, Any], idx: np.ndarray) -> dict[str, Any]:
    """Each column (list or numpy array) restricted to the positions `idx`, in that order."""
    out = {}
    for name, col in columns.items():
        if isinstance(col, np.ndarray):
            out[name] = col[idx]
        else:
            out[name] = [col[i] for i in idx]
    return out


def split_indices(
    pool_labels: Sequence[int] | np.ndarray,
    test_labels: Sequence[int] | np.ndarray,
    *,
    seed: int,
    max_train: int | None,
    max_test: int | None,
    test_order: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, validation, test)`` positions into the pool / test examples, by the module's split rules.

    `test_order` is the fixed order in which test examples are taken when capping (default: a
    ``np.random.default_rng(0)`` permutation); it never depends on `seed`.
    """
    _check_cap("max_train_per_task", max_train)
    _check_cap("max_test_per_task", max_test)
    pool_labels = np.asarray(pool_labels)
    test_labels = np.asarray(test_labels)
    rng = np.random.default_rng(seed)
    chosen = balanced_take(pool_labels, max_train, rng.permutation(len(pool_labels)))
    # Shuffle again: balanced_take's order fills the big classes' quotas first, so its first examples
    # would over-represent them in validation.
    chosen = chosen[rng.permutation(len(chosen))]
    n_val = validation_size(len(chosen))
    if test_order is None:
        test_order = np.random.default_rng(0).permutation(len(test_labels))
    test_idx = balanced_take(test_labels, max_test, np.asarray(test_order))
    return chosen[n_val:], chosen[:n_val], test_idx


def build_task(
    name: str,
    pool: Mapping[str, Any],
    test: Mapping[str, Any],
    features: Any,
    *,
    seed: int,
    max_train: int | None,
    max_test: int | None,
    test_order: np.ndarray | None = None,
    description: str = "",
) -> Any:
    """The task's DatasetDict from in-memory pool and test columns, split by :func:`split_indices`.

    `pool` and `test` map column names to equal-length lists / numpy arrays and must hold ``label`` (integer
    class ids of `features["label"]`).
    """
    import datasets

    n_pool = len(pool["label"])
    n_test = len(test["label"])
    if n_pool < 2 or n_test < 1:
        raise TaskDataError(f"task {name!r}: too few examples (pool {n_pool}, test {n_test})")
    train_idx, val_idx, test_idx = split_indices(
        pool["label"], test["label"], seed=seed, max_train=max_train, max_test=max_test, test_order=test_order
    )
    parts = {
        "train": _columns_at(pool, train_idx),
        "validation": _columns_at(pool, val_idx),
        "test": _columns_at(test, test_idx),
    }
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                cols,
                features=features,
                info=datasets.DatasetInfo(description=description, features=features),
                split=split,
            )
            for split, cols in parts.items()
        }
    )
