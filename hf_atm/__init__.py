"""hf_atm: model merging and ATM (Alternating Tuning and Merging) for the Hugging Face ecosystem.

The public face, as trl and peft users expect it::

    from hf_atm import ATMConfig, ATMTrainer, MultiTaskConfig, MultiTaskModel
    from hf_atm import MergeConfig, MergeSpec, run_merge, merge_checkpoints

Names are imported on first use (as transformers does), so ``import hf_atm`` and the ``hf-atm`` command stay
cheap: the merge CLI never imports the trainer stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hf_atm.version import __version__

#: public name -> module that defines it.
_EXPORTS: dict[str, str] = {
    # ATM
    "ATMConfig": "hf_atm.atm.config",
    "ATMTrainer": "hf_atm.atm.trainer",
    "MultiTaskModel": "hf_atm.atm.model",
    "MultiTaskConfig": "hf_atm.atm.model",
    "finetune_individual": "hf_atm.atm.baselines",
    "one_shot_merge": "hf_atm.atm.baselines",
    "train_joint": "hf_atm.atm.baselines",
    # merging
    "MergeConfig": "hf_atm.merging.config",
    "MergeSpec": "hf_atm.merging.spec",
    "METHODS": "hf_atm.merging.registry",
    "get_method": "hf_atm.merging.registry",
    "merge_state_dicts_in_memory": "hf_atm.merging.engine",
    # the merge entry points with every model source (checkpoints and LoRA adapters), as the CLI uses them
    "run_merge": "hf_atm.lora.merge",
    "merge_checkpoints": "hf_atm.lora.merge",
}

__all__ = [
    "METHODS",
    "ATMConfig",
    "ATMTrainer",
    "MergeConfig",
    "MergeSpec",
    "MultiTaskConfig",
    "MultiTaskModel",
    "__version__",
    "finetune_individual",
    "get_method",
    "merge_checkpoints",
    "merge_state_dicts_in_memory",
    "one_shot_merge",
    "run_merge",
    "train_joint",
]

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time the names load lazily below
    from hf_atm.atm.baselines import finetune_individual, one_shot_merge, train_joint
    from hf_atm.atm.config import ATMConfig
    from hf_atm.atm.model import MultiTaskConfig, MultiTaskModel
    from hf_atm.atm.trainer import ATMTrainer
    from hf_atm.lora.merge import merge_checkpoints, run_merge
    from hf_atm.merging.config import MergeConfig
    from hf_atm.merging.engine import merge_state_dicts_in_memory
    from hf_atm.merging.registry import METHODS, get_method
    from hf_atm.merging.spec import MergeSpec


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_atm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
