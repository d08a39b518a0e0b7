"""ATM history: one :class:`HistoryEntry` per round, written as ``history.json`` and plotted as PNG
(matplotlib, Agg).

Every writer of ``history.json`` (ATMTrainer, the baselines, the federated server) fills a HistoryEntry
and stores ``entry.to_dict()``: histories stay JSON-shaped lists of dicts with the same keys as before.

Each entry holds every task's accuracy and its main score (``score``, by the metric named in ``metric``:
accuracy unless the task was given another, see :mod:`hf_atm.atm.metrics`); normalized scores are main scores
over the reference's (the field keeps its older name ``normalized_accuracy``).

One encoding of a missing value: a NaN (a task not evaluated, a cosine not measured) is written as JSON
``null`` (``hf_atm.files.jsonable``), and every reader here reads ``null`` back as NaN
(:func:`main_scores`, :func:`mean_score`, the plots, :func:`hf_atm.atm.evaluation.mean_off_diagonal`), so a
history read from disk (a resumed run's) behaves as the one in memory.

Plots: ``accuracy.png`` (the main score of each task and their mean against the round, the metric named on the
axis; the file keeps its older name), ``cosine.png`` (heatmap of the last round's pairwise cosine similarity of
task vectors, and the mean off-diagonal cosine per round).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_atm.atm.evaluation import cosine_from_gram, mean_accuracy, mean_off_diagonal, normalized_accuracy
from hf_atm.files import atomic_write_bytes, atomic_write_json

__all__ = [
    "HISTORY_FILE",
    "HistoryEntry",
    "load_history",
    "main_scores",
    "mean_score",
    "plot_history",
    "write_history",
]

HISTORY_FILE = "history.json"
ACCURACY_PLOT = "accuracy.png"
COSINE_PLOT = "cosine.png"

#: fields written only when set: the baselines' and the federated server's additions to a round's entry.
_OPTIONAL = (
    # per-task metrics (absent from histories written before them and from the federated server's)
    "metric", "score", "mean_score",
    # ATMTrainer's merge scale (rounds >= 1) and its line search (merge_scale="auto")
    "merge_scale", "scale_search", "scale_search_seconds",
    # baselines
    "method", "scale", "validation_by_scale",
    # federated server
    "merged_tasks", "missing_train", "missing_eval", "skipped", "errors", "clients", "client_train_seconds",
    "bytes", "bytes_total", "secure_aggregation", "uplink", "downlink", "secagg_clipped",
)


@dataclass
class HistoryEntry:
    """One evaluated round (round 0: the starting model; for a baseline, ``round`` is its budget in epochs).

    Attributes:
        round: the round index (a float budget for baselines).
        accuracy: ``{task: accuracy}`` on `split`.
        mean_accuracy: the unweighted mean of `accuracy`.
        normalized_accuracy / mean_normalized_accuracy: each task's main score over its reference score (the
            individually fine-tuned model's; None without references). With accuracy everywhere: accuracy
            over the reference accuracy.
        cosine / mean_cosine: pairwise cosine of the round's task vectors and its mean off-diagonal entry
            (None when not recorded).
        tasks: the tasks, in the order of `cosine`'s rows.
        split: the split the accuracies were measured on.
        metric: ``{task: main metric name}`` (``accuracy``, ``matthews_correlation``...).
        score: ``{task: main score}``, by `metric` (equal to `accuracy` for tasks scored by accuracy).
        mean_score: the unweighted mean of `score`: what rounds are selected by, unless
            ``metric_for_best_model`` says otherwise.
        train_seconds / merge_seconds / setup_seconds / eval_seconds: the round's time by kind.
        train_loss: ``{task: mean training loss}`` of the round (None for round 0).
        steps: optimizer steps of the round (all tasks).
        merge_scale: ATMTrainer rounds (not round 0): the scale lambda the round's merged task vector was applied
            with (fixed, or chosen by ``merge_scale="auto"``).
        scale_search: ``merge_scale="auto"`` only: ``{str(scale): mean over tasks of the slice loss}`` of every
            candidate tried (:mod:`hf_atm.atm.scale_search`); the lowest is `merge_scale`.
        scale_search_seconds: ``merge_scale="auto"`` only: seconds of the search (the maximum over processes),
            part of `merge_seconds`.
        method, scale, validation_by_scale: baselines only (the method, the chosen merge scale, the mean
            validation accuracy of every scale tried).
        merged_tasks ... secagg_clipped: federated server only (who took part, missing nodes, errors,
            traffic, compression and secure-aggregation settings); see ``hf_atm.federated``.
    """

    round: int | float
    accuracy: dict[str, float]
    mean_accuracy: float
    normalized_accuracy: dict[str, float] | None
    mean_normalized_accuracy: float | None
    cosine: list[list[float]] | None
    mean_cosine: float | None
    tasks: list[str]
    split: str
    metric: dict[str, str] | None = None
    score: dict[str, float] | None = None
    mean_score: float | None = None
    train_seconds: float = 0.0
    merge_seconds: float = 0.0
    setup_seconds: float = 0.0
    eval_seconds: float = 0.0
    train_loss: dict[str, float] | None = None
    steps: int = 0
    merge_scale: float | None = None
    scale_search: dict[str, float] | None = None
    scale_search_seconds: float | None = None
    method: str | None = None
    scale: float | None = None
    validation_by_scale: dict[float, float] | None = None
    merged_tasks: list[str] | None = None
    missing_train: list[str] | None = None
    missing_eval: list[str] | None = None
    skipped: bool | None = None
    errors: dict[str, str] | None = None
    clients: dict[str, int | None] | None = None
    client_train_seconds: dict[str, float] | None = None
    bytes: dict[str, dict[str, int]] | None = None
    bytes_total: dict[str, int] | None = None
    secure_aggregation: bool | None = None
    uplink: dict[str, Any] | None = None
    downlink: dict[str, Any] | None = None
    secagg_clipped: dict[str, Any] | None = None

    @classmethod
    def build(
        cls,
        round: int | float,
        accuracy: Mapping[str, float],
        *,
        tasks: Sequence[str],
        split: str,
        reference: Mapping[str, float] | None = None,
        gram: torch.Tensor | None = None,
        cosine: list[list[float]] | None = None,
        score: Mapping[str, float] | None = None,
        metric: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> HistoryEntry:
        """An entry whose derived fields are computed here: the mean accuracy, the main scores (`score`;
        default: the accuracies, with `metric` ``accuracy`` for every task) and their mean, the normalized
        scores against `reference` (and their mean), the cosine matrix from `gram` (or `cosine` as given) and
        its mean off-diagonal entry. `fields` sets any other attribute (timings, train_loss, steps, extras)."""
        acc = dict(accuracy)
        main = dict(score) if score is not None else dict(acc)
        names = dict(metric) if metric is not None else {t: "accuracy" for t in main}
        norm = normalized_accuracy(main, reference)
        cos = cosine_from_gram(gram) if gram is not None else cosine
        fields.setdefault("mean_cosine", mean_off_diagonal(cos))
        return cls(round=round, accuracy=acc, mean_accuracy=mean_accuracy(acc), normalized_accuracy=norm,
                   mean_normalized_accuracy=mean_accuracy(norm) if norm is not None else None, cosine=cos,
                   tasks=list(tasks), split=split, metric=names, score=main, mean_score=mean_accuracy(main),
                   **fields)

    def to_dict(self) -> dict[str, Any]:
        """The entry as stored in ``history`` lists and ``history.json`` (optional fields only when set)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _OPTIONAL and v is None:
                continue
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HistoryEntry:
        """An entry from a ``history.json`` dict (unknown keys are ignored; missing ones take defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("normalized_accuracy", "mean_normalized_accuracy", "cosine", "mean_cosine"):
            kw.setdefault(k, None)
        kw.setdefault("tasks", list(d.get("accuracy", {})))
        kw.setdefault("split", "validation")
        return cls(**kw)


def main_scores(entry: HistoryEntry | Mapping[str, Any]) -> dict[str, float]:
    """``{task: main score}`` of a history entry: its ``score``, or its ``accuracy`` for entries written
    before per-task metrics (and the federated server's) -- chosen by whether the key is there, never by its
    values. A task's None (``history.json`` stores NaN as null) reads as NaN."""
    d = _as_dict(entry)
    scores = d["score"] if d.get("score") is not None else d["accuracy"]
    return {t: _float(v) for t, v in scores.items()}


def mean_score(entry: HistoryEntry | Mapping[str, Any]) -> float:
    """The mean main score of a history entry: its ``mean_score``, or its ``mean_accuracy`` for entries written
    before per-task metrics (and the federated server's) -- chosen by whether the key is there: an entry with
    per-task metrics whose mean is NaN (null in ``history.json``) gives NaN, never its mean accuracy."""
    d = _as_dict(entry)
    return _float(d["mean_score"] if "mean_score" in d else d["mean_accuracy"])


def _float(value: float | None) -> float:
    """A stored score as a float: None (a NaN written as null) -> NaN."""
    return math.nan if value is None else float(value)


def _as_dict(entry: HistoryEntry | Mapping[str, Any]) -> dict[str, Any]:
    return entry.to_dict() if isinstance(entry, HistoryEntry) else dict(entry)


def write_history(history: Sequence[HistoryEntry | Mapping[str, Any]], folder: str | os.PathLike) -> Path:
    """Write ``history.json`` (a JSON list of the round dicts; NaN / inf as null) into `folder`, atomically."""
    return atomic_write_json(Path(folder) / HISTORY_FILE, [_as_dict(h) for h in history], indent=2)


def load_history(folder_or_file: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``history.json`` (or the one inside a folder)."""
    p = Path(folder_or_file)
    if p.is_dir():
        p = p / HISTORY_FILE
    return json.loads(p.read_text())


def plot_history(history: Sequence[HistoryEntry | Mapping[str, Any]], folder: str | os.PathLike) -> list[Path]:
    """Write ``accuracy.png`` (main scores) and, when some round has cosines, ``cosine.png`` into `folder`;
    return the paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder = Path(folder)
    written: list[Path] = []
    if not history:
        return written
    history = [_as_dict(h) for h in history]
    rounds = [h["round"] for h in history]
    tasks = list(history[-1].get("tasks") or history[-1]["accuracy"])

    names = history[-1].get("metric") or {t: "accuracy" for t in tasks}
    kinds = sorted({names.get(t, "accuracy") for t in tasks})
    one = kinds[0] if len(kinds) == 1 else None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lowest = 0.0
    for t in tasks:
        ys = [main_scores(h).get(t, math.nan) for h in history]
        lowest = min([lowest, *(y for y in ys if math.isfinite(y))])
        ax.plot(rounds, ys, marker="o", ms=3, label=t if one else f"{t} ({names.get(t, 'accuracy')})")
    mean = [mean_score(h) for h in history]  # NaN means stay NaN: never accuracy under the "mean score" label
    ax.plot(rounds, mean, color="black", lw=2.2, label="mean" if one else "mean score")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{one or 'main score'} ({history[-1].get('split', 'validation')})")
    ax.set_ylim(-1.02 if lowest < 0 else 0, 1.02)  # correlations (MCC, Pearson) go down to -1
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    written.append(_save_fig(fig, folder / ACCURACY_PLOT))
    plt.close(fig)

    with_cos = [h for h in history if h.get("cosine")]
    if with_cos:
        last = with_cos[-1]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
        cells = [[_float(v) for v in row] for row in last["cosine"]]  # a null (unmeasured pair) is NaN
        im = a1.imshow(cells, vmin=-1, vmax=1, cmap="RdBu_r")
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
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    return atomic_write_bytes(path, buf.getvalue())
