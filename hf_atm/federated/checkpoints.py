"""Round checkpoints of the federated server: write, rotate, list and read ``checkpoint-round-{k}``.

A checkpoint holds the model files and ``federated_state.json``; writing, rotation and listing go through
ATM's one checkpoint module (:mod:`hf_atm.atm.checkpoints`: one atomic rename per checkpoint)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hf_atm.atm import checkpoints as atm_checkpoints
from hf_atm.atm.checkpoints import CHECKPOINT_PREFIX
from hf_atm.files import atomic_write_json

__all__ = [
    "CHECKPOINT_PREFIX",
    "STATE_FILE",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint_state",
    "save_checkpoint",
]

#: the server's state in a round checkpoint (round, history, fingerprint, example counts): what marks a
#: federated checkpoint complete
STATE_FILE = "federated_state.json"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(round, folder)]`` of the complete federated round checkpoints in `output_dir`, by round (a folder
    without the state file, or a hidden temporary one, is not a checkpoint)."""
    return atm_checkpoints.list_checkpoints(output_dir, STATE_FILE)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The folder of the last complete federated round checkpoint in `output_dir` (None when there is none)."""
    return atm_checkpoints.latest_checkpoint(output_dir, STATE_FILE)


def save_checkpoint(output_dir: str | os.PathLike, round_idx: int, model: Any, state: Mapping[str, Any],
                    save_total_limit: int | None = None, processing_class: Any | None = None) -> Path:
    """Write ``checkpoint-round-{round_idx}`` (``model.write_files`` + `state` as ``federated_state.json``) in
    one rename (a kill mid-write leaves the previous checkpoints intact), then keep only the last
    `save_total_limit` checkpoints (None or <= 0: all)."""

    def write(tmp: Path) -> None:
        model.write_files(tmp, processing_class)
        atomic_write_json(tmp / STATE_FILE, dict(state))

    return atm_checkpoints.write_checkpoint(output_dir, round_idx, write, state_file=STATE_FILE,
                                            save_total_limit=save_total_limit)


def load_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``federated_state.json`` of a round checkpoint (CheckpointError naming the file if unreadable)."""
    return atm_checkpoints.read_checkpoint_state(path, STATE_FILE)
