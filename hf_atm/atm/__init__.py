"""ATM (Alternating Tuning and Merging): multi-task model, Trainer subclass, per-task tuner, baselines, metrics."""

from hf_atm.atm.baselines import (
    IndividualResult,
    MergeResult,
    default_scale_grid,
    finetune_individual,
    one_shot_merge,
    train_joint,
)
from hf_atm.atm.card import RunSummary, atm_model_card
from hf_atm.atm.config import ATMConfig
from hf_atm.atm.history import HistoryEntry
from hf_atm.atm.model import MultiTaskModel
from hf_atm.atm.trainer import ATMTrainer
from hf_atm.atm.tuning import TuningResult

__all__ = [
    "ATMConfig",
    "ATMTrainer",
    "HistoryEntry",
    "IndividualResult",
    "MergeResult",
    "MultiTaskModel",
    "RunSummary",
    "TuningResult",
    "atm_model_card",
    "default_scale_grid",
    "finetune_individual",
    "one_shot_merge",
    "train_joint",
]
