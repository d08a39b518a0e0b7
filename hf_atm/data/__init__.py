"""Task suites for ATM experiments: each task a ``DatasetDict`` (train / validation / test) with a ClassLabel.

``load_suite("text" | "vision" | "hub-vit8" | "hub-glue", seed=0, ...)`` gives ``{task: DatasetDict}``;
``tokenize_suite`` / ``pixelize_suite`` turn one into model inputs. See :mod:`hf_atm.data.suites`.
"""

from hf_atm.data.preprocess import pixelize_suite, process_images_suite, tokenize_suite
from hf_atm.data.suites import SUITES, load_suite, suite_modality, suite_tasks

__all__ = [
    "SUITES", "load_suite", "pixelize_suite", "process_images_suite", "suite_modality", "suite_tasks", "tokenize_suite",
]
