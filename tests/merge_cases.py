"""What the engine tests share: one spec per method (options off their defaults), the config builder and the
bit-for-bit comparison of state dicts."""

from __future__ import annotations

from pathlib import Path

import torch

from hf_atm.merging.config import MergeConfig
from hf_atm.merging.spec import MergeSpec

#: One spec per registered method, with non-default options where the method has them.
SPECS = {
    "average": MergeSpec("average", weights=(0.2, 0.5, 1.3)),
    "task_arithmetic": MergeSpec("task_arithmetic", weights=(0.3, 0.7, 1.1), scale=0.8),
    "ties": MergeSpec("ties", density=0.3),
    "dare_linear": MergeSpec("dare_linear", density=0.5, seed=3),
    "dare_ties": MergeSpec("dare_ties", density=0.6, seed=4, majority_sign_method="frequency"),
    "breadcrumbs": MergeSpec("breadcrumbs", density=0.8, gamma=0.05),
    "tsv": MergeSpec("tsv"),
    "iso_c": MergeSpec("iso_c", scale=0.5),
    "linear": MergeSpec("linear", weights=(1.0, 2.0, 1.0)),
    "breadcrumbs_ties": MergeSpec("breadcrumbs_ties", density=0.8, gamma=0.05, majority_sign_method="frequency"),
    "della": MergeSpec("della", density=0.6, epsilon=0.1, seed=2),
    "della_linear": MergeSpec("della_linear", weights=(0.5, 1.0, 1.5), density=0.7, seed=5),
    "model_stock": MergeSpec("model_stock"),
    "slerp": MergeSpec("slerp", t=0.3),
}


def merge_config(base: str | Path, models: list, out: str | Path, spec: MergeSpec, **kw) -> MergeConfig:
    """A MergeConfig of local folders, without a progress bar."""
    return MergeConfig(base=str(base), models=[str(m) for m in models], output=str(out), spec=spec,
                       progress=False, **kw)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t` (to compare tensors bit for bit, NaN and the sign of zeros included)."""
    return t.contiguous().view(-1).view(torch.uint8)


def assert_bit_equal(a: dict, b: dict) -> None:
    """The same tensor names, and each tensor of the same dtype, shape and bytes."""
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k]), bits(b[k])), k
