"""Round checkpoints: ``<output_dir>/checkpoint-round-{k}`` folders, written atomically, listed, rotated, read.

Used by ATMTrainer (state file ``atm_state.json``) and by the federated server (``federated_state.json``):
a folder counts as a checkpoint of a kind when it holds that kind's state file. A checkpoint is written into
a temporary folder and renamed into place (:func:`hf_atm.files.replace_dir`), so a reader never sees half
of one. Files that other processes must contribute (their own optimizer states) are put into
:func:`staging_dir` first and moved in by the commit.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hf_atm.errors import CheckpointError
from hf_atm.files import jsonable, replace_dir

__all__ = [
    "CHECKPOINT_PREFIX",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_rng_state",
    "read_checkpoint_state",
    "resolve_checkpoint",
    "rotate_checkpoints",
    "save_rng_state",
    "staging_dir",
    "write_checkpoint",
]

CHECKPOINT_PREFIX = "checkpoint-round-"
_CKPT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
#: the random-number generators' state inside a checkpoint (torch's as tensors, Python's and numpy's as JSON).
RNG_FILE = "rng_state.safetensors"
RNG_JSON = "rng_state.json"


def checkpoint_dir(output_dir: str | os.PathLike, round_idx: int) -> Path:
    """``<output_dir>/checkpoint-round-{round_idx}``."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{int(round_idx)}"


def staging_dir(output_dir: str | os.PathLike, round_idx: int) -> Path:
    """A folder (hidden, beside the checkpoints) where every process may put its own files for round
    `round_idx`'s checkpoint before the main process commits it with :func:`write_checkpoint`."""
    return Path(output_dir) / f".staging-{CHECKPOINT_PREFIX}{int(round_idx)}"


def list_checkpoints(output_dir: str | os.PathLike, state_file: str) -> list[tuple[int, Path]]:
    """``[(round, folder)]`` of the checkpoints in `output_dir` that hold `state_file`, by round."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return sorted((k, p) for k, p in found if (p / state_file).is_file())


def latest_checkpoint(output_dir: str | os.PathLike, state_file: str) -> Path | None:
    """The folder of the last checkpoint in `output_dir` holding `state_file` (None when there is none)."""
    found = list_checkpoints(output_dir, state_file)
    return found[-1][1] if found else None


def resolve_checkpoint(resume: str | bool | None, output_dir: str | os.PathLike, state_file: str) -> Path | None:
    """The checkpoint a ``resume_from_checkpoint`` value names: None / False / "false" / "": none;
    True / "True": the latest in `output_dir` (CheckpointError if there is none); else a folder, which must
    hold `state_file` (CheckpointError otherwise). Strings come from the command line."""
    if isinstance(resume, str) and resume.strip().lower() in ("true", "false", ""):
        resume = resume.strip().lower() == "true"
    if resume is None or resume is False:
        return None
    if resume is True:
        found = latest_checkpoint(output_dir, state_file)
        if found is None:
            raise CheckpointError(f"no {CHECKPOINT_PREFIX}* folder to resume from in {output_dir}")
        return found
    path = Path(resume)
    if not (path / state_file).is_file():
        raise CheckpointError(f"{path} is not a round checkpoint (no {state_file})")
    return path


def rotate_checkpoints(output_dir: str | os.PathLike, limit: int | None, state_file: str,
                       keep: str | os.PathLike | None = None) -> None:
    """Delete all but the last `limit` checkpoints holding `state_file` (None or <= 0: keep all). `keep`
    (the best round's, with ``load_best_model_at_end``) is never deleted and counts towards `limit`, but the
    latest checkpoint always stays too (as Trainer: ``save_total_limit=1`` keeps the best and the last)."""
    if limit is None or limit <= 0:
        return
    found = [p for _, p in list_checkpoints(output_dir, state_file)]
    kept = Path(keep).resolve() if keep is not None else None
    candidates = [p for p in found if p.resolve() != kept]
    retain = max(1, limit - 1) if len(candidates) < len(found) else limit
    for path in candidates[: max(0, len(candidates) - retain)]:
        shutil.rmtree(path, ignore_errors=True)


def write_checkpoint(
    output_dir: str | os.PathLike,
    round_idx: int,
    writer: Callable[[Path], None],
    *,
    state_file: str,
    save_total_limit: int | None = None,
    keep: str | os.PathLike | None = None,
) -> Path:
    """Write round `round_idx`'s checkpoint: the files staged in :func:`staging_dir` (if any) and those
    ``writer(folder)`` writes (it must write `state_file`) go into a temporary folder that replaces
    ``checkpoint-round-{round_idx}`` in one rename; then old checkpoints are rotated (`keep` spared).
    Returns the folder."""
    staged = staging_dir(output_dir, round_idx)

    def write(tmp: Path) -> None:
        if staged.is_dir():
            for f in sorted(staged.iterdir()):
                os.replace(f, tmp / f.name)
        writer(tmp)
        if not (tmp / state_file).is_file():
            raise CheckpointError(f"a round checkpoint must hold {state_file}")

    final = replace_dir(checkpoint_dir(output_dir, round_idx), write)
    shutil.rmtree(staged, ignore_errors=True)
    rotate_checkpoints(output_dir, save_total_limit, state_file, keep)
    return final


def read_checkpoint_state(folder: str | os.PathLike, state_file: str) -> dict[str, Any]:
    """The JSON `state_file` of a checkpoint (CheckpointError naming the file when unreadable)."""
    f = Path(folder) / state_file
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {f}: {e}") from e


def save_rng_state(folder: str | os.PathLike) -> None:
    """Write the Python, numpy and torch (CPU, every CUDA device) generator states into `folder`."""
    folder = Path(folder)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, str(folder / RNG_FILE))
    state = {"python": jsonable(random.getstate()), "numpy": jsonable(np.random.get_state())}
    (folder / RNG_JSON).write_text(json.dumps(state) + "\n")


def load_rng_state(folder: str | os.PathLike) -> None:
    """Restore the generator states :func:`save_rng_state` wrote (CUDA only with the same device count)."""
    folder = Path(folder)
    try:
        state = json.loads((folder / RNG_JSON).read_text())
        rng = load_file(str(folder / RNG_FILE))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the generator states in {folder}: {e}") from e
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), int(npy[2]), int(npy[3]), float(npy[4])))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
