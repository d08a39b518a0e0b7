"""The registry of task suites: ``load_suite(name, ...) -> {task: DatasetDict(train/validation/test)}``.

=========  =======  ===========================================================================  ========
name       input    tasks                                                                         network
=========  =======  ===========================================================================  ========
text       text     noun_category, verb_category, fortune_topic, fortune_language (Debian data)  no
vision     image    fashion10, fashion_coarse, fashion_tops, digits (Fashion-MNIST, sklearn)      no
hub-vit8   image    cars, dtd, eurosat, gtsrb, mnist, resisc45, svhn, sun397 (the ATM paper's)    yes
hub-glue   text     cola, sst2, mrpc, qqp, mnli, qnli, rte (+ wnli on request)                    yes
=========  =======  ===========================================================================  ========

Every task has a ClassLabel ``label`` and ``text`` (+ ``text_pair`` for GLUE pairs) or ``image`` columns.
Split rules: :mod:`hf_atm.data.splits`. Suite details: :mod:`hf_atm.data.text`, :mod:`hf_atm.data.vision`,
:mod:`hf_atm.data.hub`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hf_atm.data.splits import DEFAULT_MAX_TEST, DEFAULT_MAX_TRAIN
from hf_atm.errors import TaskDataError

__all__ = ["SUITES", "load_suite", "suite_modality", "suite_tasks"]

SUITES = ("text", "vision", "hub-vit8", "hub-glue")
_MODALITY = {"text": "text", "vision": "image", "hub-vit8": "image", "hub-glue": "text"}


def _check_name(name: str) -> None:
    if name not in SUITES:
        raise TaskDataError(f"unknown task suite {name!r}: choose from {', '.join(SUITES)}")


def suite_modality(name: str) -> str:
    """``"text"`` or ``"image"``: what the suite's tasks feed the backbone."""
    _check_name(name)
    return _MODALITY[name]


def suite_tasks(name: str) -> tuple[str, ...]:
    """The task names the suite loads by default, in order (reads no data)."""
    _check_name(name)
    if name == "text":
        from hf_atm.data.text import TEXT_TASKS

        return TEXT_TASKS
    if name == "vision":
        from hf_atm.data.vision import VISION_TASKS

        return VISION_TASKS
    from hf_atm.data.hub import HUB_SUITES

    return HUB_SUITES[name][1]


def load_suite(
    name: str,
    seed: int = 0,
    max_train_per_task: int | None = DEFAULT_MAX_TRAIN,
    max_test_per_task: int | None = DEFAULT_MAX_TEST,
    tasks: Sequence[str] | None = None,
    *,
    sources: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> dict[str, Any]:
    """``{task: DatasetDict(train/validation/test)}`` for suite `name` (see the module table).

    seed: draws the train/validation split and the capped subset (test never depends on it).
    max_train_per_task: cap on each task's training pool (train + validation; validation is 10% of it, at
        most 5,000), class-balanced; ``None``: no cap. Default 4,000 (CPU-sized: 3,600 train + 400 validation).
    max_test_per_task: cap on each task's test split, class-balanced, seed-independent; ``None``: no cap.
    tasks: a subset of the suite's tasks (default: :func:`suite_tasks`).
    sources / cache_dir / token: Hub suites only (see :func:`hf_atm.data.hub.load_hub_suite`).

    Raises TaskDataError for an unknown suite or task, or a missing Debian package (naming it), and HubError
    when a Hub suite cannot reach its data.
    """
    _check_name(name)
    caps = {"seed": seed, "max_train_per_task": max_train_per_task, "max_test_per_task": max_test_per_task,
            "tasks": tasks}  # fmt: skip
    if name in ("text", "vision"):
        if sources is not None or cache_dir is not None or token is not None:
            raise TaskDataError(f"suite {name!r} reads local Debian data: sources/cache_dir/token are for Hub suites")
        if name == "text":
            from hf_atm.data.text import load_text_suite

            return load_text_suite(**caps)
        from hf_atm.data.vision import load_vision_suite

        return load_vision_suite(**caps)
    from hf_atm.data.hub import load_hub_suite

    return load_hub_suite(name, **caps, sources=sources, cache_dir=cache_dir, token=token)
