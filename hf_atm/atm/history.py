"""ATM history: the list of per-round dicts, written as ``history.json`` and plotted as PNG (matplotlib, Agg).

Plots: ``accuracy.png`` (accuracy of each task and the mean against the round), ``cosine.png`` (heatmap of
the last round's pairwise cosine similarity of task vectors, and the mean off-diagonal cosine per round).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_atm.atm.evaluation import mean_off_diagonal

__all__ = ["HISTORY_FILE", "load_history", "plot_history", "write_history"]

HISTORY_FILE = "history.json"
ACCURACY_PLOT = "accuracy.png"
COSINE_PLOT = "cosine.png"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN / inf become None (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_history(history: Sequence[Mapping[str, Any]], folder: str | os.PathLike) -> Path:
    """Write ``history.json`` (a JSON list of the round dicts) into `folder`, atomically."""
    path = Path(folder) / HISTORY_FILE
    _atomic_write_bytes(path, (json.dumps(_clean(list(history)), indent=2) + "\n").encode())
    return path


def load_history(folder_or_file: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``history.json`` (or the one inside a folder)."""
    p = Path(folder_or_file)
    if p.is_dir():
        p = p / HISTORY_FILE
    return json.loads(p.read_text())


def plot_history(history: Sequence[Mapping[str, Any]], folder: str | os.PathLike) -> list[Path]:
    """Write ``accuracy.png`` and, when some round has cosines, ``cosine.png`` into `folder`; return the paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder = Path(folder)
    written: list[Path] = []
    if not history:
        return written
    rounds = [h["round"] for h in history]
    tasks = list(history[-1].get("tasks") or history[-1]["accuracy"])

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for t in tasks:
        ax.plot(rounds, [h["accuracy"].get(t, math.nan) for h in history], marker="o", ms=3, label=t)
    ax.plot(rounds, [h["mean_accuracy"] for h in history], color="black", lw=2.2, label="mean")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"accuracy ({history[-1].get('split', 'validation')})")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    written.append(_save_fig(fig, folder / ACCURACY_PLOT))
    plt.close(fig)

    with_cos = [h for h in history if h.get("cosine")]
    if with_cos:
        last = with_cos[-1]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
        im = a1.imshow(last["cosine"], vmin=-1, vmax=1, cmap="RdBu_r")
        names = last.get("tasks") or tasks
        a1.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        a1.set_yticks(range(len(names)), names, fontsize=7)
        a1.set_title(f"cosine of task vectors, round {last['round']}")
        fig.colorbar(im, ax=a1, fraction=0.046)
        a2.plot([h["round"] for h in with_cos], [mean_off_diagonal(h["cosine"]) for h in with_cos], marker="o")
        a2.set_xlabel("round")
        a2.xaxis.set_major_locator(MaxNLocator(integer=True))
        a2.set_ylabel("mean off-diagonal cosine")
        a2.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save_fig(fig, folder / COSINE_PLOT))
        plt.close(fig)
    return written


def _save_fig(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex[:8]}-{path.name}"
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return path
