"""Small real task suites for the ATM tests: scikit-learn's digits (8x8 images) as several tasks.

Tasks (each a DatasetDict train / validation / test with ``pixel_values`` (1x8x8, scaled to [0, 1]) and a
ClassLabel ``labels``): ``digit`` (0-9), ``parity`` (even/odd), ``high`` (digit >= 5), ``mod3`` (digit mod 3).
Every task gets a disjoint, seeded slice of the 1797 images so the tasks' data differ.
"""

from __future__ import annotations

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

TASK_LABELS: dict[str, list[str]] = {
    "digit": [str(i) for i in range(10)],
    "parity": ["even", "odd"],
    "high": ["low", "high"],
    "mod3": ["0", "1", "2"],
}


def _target(task: str, y: np.ndarray) -> np.ndarray:
    return {"digit": y, "parity": y % 2, "high": (y >= 5).astype(int), "mod3": y % 3}[task]


def digits_tasks(
    tasks: tuple[str, ...] = ("digit", "parity", "high"),
    n_train: int = 64,
    n_val: int = 32,
    n_test: int = 32,
    seed: int = 0,
) -> dict[str, DatasetDict]:
    """``{task: DatasetDict}`` with disjoint examples per task (sizes per split as given)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    per = n_train + n_val + n_test
    if per * len(tasks) > len(y):
        raise ValueError("not enough digits for disjoint tasks of this size")
    out = {}
    for i, task in enumerate(tasks):
        idx = order[i * per : (i + 1) * per]
        feats = Features(
            {
                "pixel_values": Sequence(Sequence(Sequence(Value("float32")))),
                "labels": ClassLabel(names=TASK_LABELS[task]),
            }
        )
        parts = {"train": idx[:n_train], "validation": idx[n_train : n_train + n_val], "test": idx[n_train + n_val :]}
        out[task] = DatasetDict(
            {
                sp: Dataset.from_dict(
                    {"pixel_values": x[ix].tolist(), "labels": _target(task, y[ix]).tolist()}, features=feats
                )
                for sp, ix in parts.items()
            }
        )
    return out


def tiny_vit(seed: int = 0, dtype=None, **overrides):
    """A random 2-layer ViT for 8x8 single-channel images (hidden 32), deterministic for `seed`."""
    import torch
    from transformers import AutoModel, ViTConfig

    cfg = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=64)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = AutoModel.from_config(ViTConfig(**cfg))
    return model if dtype is None else model.to(dtype)
