"""LoRA adapters as task vectors (``B @ A * scaling`` per module, as peft merges them), adapters read as full
models by the merge engine (:func:`hf_atm.lora.merge.run_merge`: the merge entry point), and merges written
back out as one LoRA adapter (truncated SVD).

Submodules are imported lazily by name (``hf_atm.lora.delta``, ``.source``, ``.merge``, ``.export``) so that
importing ``hf_atm.lora`` stays cheap; the main entry points are re-exported here.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LoraAsModelSource",
    "adapter_base_reference",
    "adapter_deltas",
    "infer_adapter_base",
    "is_adapter_folder",
    "load_adapter",
    "merge_adapters_to_lora",
    "merge_checkpoints",
    "open_model_source",
    "run_merge",
]

_WHERE = {
    "LoraAsModelSource": "source",
    "open_model_source": "source",
    "adapter_base_reference": "delta",
    "adapter_deltas": "delta",
    "is_adapter_folder": "delta",
    "load_adapter": "delta",
    "merge_adapters_to_lora": "export",
    "infer_adapter_base": "merge",
    "merge_checkpoints": "merge",
    "run_merge": "merge",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"hf_atm.lora.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'hf_atm.lora' has no attribute {name!r}")
