"""LoRA adapters as task vectors (``B @ A * scaling`` per module, as peft merges them), adapters read as full
models by the merge engine, and merges written back out as one LoRA adapter (truncated SVD).

Submodules are imported lazily by name (``hf_atm.lora.delta``, ``.source``, ``.export``) so that importing
``hf_atm.lora`` stays cheap; the main entry points are re-exported here.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LoraAsModelSource",
    "adapter_base_reference",
    "adapter_deltas",
    "is_adapter_folder",
    "load_adapter",
    "merge_adapters_to_lora",
    "open_model_source",
]

_WHERE = {
    "LoraAsModelSource": "source",
    "open_model_source": "source",
    "adapter_base_reference": "delta",
    "adapter_deltas": "delta",
    "is_adapter_folder": "delta",
    "load_adapter": "delta",
    "merge_adapters_to_lora": "export",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"hf_atm.lora.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'hf_atm.lora' has no attribute {name!r}")
