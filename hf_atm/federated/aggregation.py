"""The math of a federated round's merge: the MergeSpec that merges the task vectors that arrived.

The merge itself is ATM's own round merge, :func:`hf_atm.atm.collector.merge_round` (the arithmetic of
``ATMTrainer``'s rounds, through :mod:`hf_atm.merging`), and the merged delta is applied with
:func:`hf_atm.atm.rounds.apply_delta_`; this module only restricts the run's spec to the tasks that arrived
(their weights, FedAvg's example weights, the default scale over the vectors that arrived).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from hf_atm.atm.collector import round_spec
from hf_atm.atm.rounds import default_merge_scale
from hf_atm.errors import MergeConfigError
from hf_atm.merging.spec import MergeSpec

__all__ = ["round_merge_spec"]


def round_merge_spec(
    base: MergeSpec,
    all_tasks: Sequence[str],
    arrived: Sequence[str],
    round_idx: int,
    *,
    weighting: str = "uniform",
    num_examples: Mapping[str, int] | None = None,
    merge_scale: float | None = None,
) -> MergeSpec:
    """The MergeSpec that merges the task vectors of `arrived` (sorted task names) in round `round_idx`.

    `base` is ``ATMConfig.merge_spec(len(all_tasks))``. Weights: ``base.weights`` (one per task of
    `all_tasks`) restricted to `arrived`; with ``weighting="examples"``: ``n_i / sum_{arrived} n_j``. Scale:
    `merge_scale` when set, else ``1 / len(arrived)`` for task_arithmetic without example weights (the mean of
    the vectors that arrived: FedAvg with uniform weights), else 1.0 (average ignores it). DARE seeds are drawn
    afresh per round exactly as ATMTrainer does (:func:`hf_atm.atm.collector.round_spec`). With every task
    arrived and uniform weighting this is ATMTrainer's spec of that round.
    """
    if not arrived:
        raise MergeConfigError("a round merge needs at least one task vector")
    idx = [list(all_tasks).index(t) for t in arrived]
    weights = None
    if weighting == "examples":
        if num_examples is None:
            raise MergeConfigError("weighting='examples' needs the example count of every task that arrived")
        counts = [float(num_examples[t]) for t in arrived]
        total = sum(counts)
        if total <= 0:
            raise MergeConfigError(f"weighting='examples': example counts must be positive, got {counts}")
        weights = tuple(c / total for c in counts)
    elif base.weights is not None:
        weights = tuple(float(base.weights[i]) for i in idx)
    if base.method == "average":
        scale = 1.0
    elif merge_scale is not None:
        scale = float(merge_scale)
    elif weighting == "examples":
        scale = 1.0  # FedAvg's weights already sum to one
    else:
        scale = default_merge_scale(base.method, len(arrived))
    spec = replace(base, weights=weights, scale=scale)
    spec.validate(len(arrived))
    return round_spec(spec, round_idx)
