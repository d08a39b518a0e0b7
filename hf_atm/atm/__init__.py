"""ATM (Alternating Tuning and Merging): multi-task model, Trainer subclass, baselines, metrics and plots."""

from hf_atm.atm.baselines import (
    IndividualResult,
    MergeResult,
    default_scale_grid,
    finetune_individual,
    one_shot_merge,
    train_joint,
)
from hf_atm.atm.config import ATMConfig
from hf_atm.atm.model import MultiTaskModel
from hf_atm.atm.trainer import ATMTrainer

__all__ = [
    "ATMConfig",
    "ATMTrainer",
    "IndividualResult",
    "MergeResult",
    "MultiTaskModel",
    "default_scale_grid",
    "finetune_individual",
    "one_shot_merge",
    "train_joint",
]
