"""Secure aggregation (SecAgg+): what a node masks, the merge from the unmasked mean, Flower's workflow adapter.

The adapter drives Flower's legacy ``SecAggPlusWorkflow`` from the Message-API ServerApp, one train step at
a time.

SecAgg+ only reveals the mean of the nodes' terms, so it needs a merge that is a weighted sum of per-task
terms (``average``, ``task_arithmetic``, ``dare_linear``, ``breadcrumbs``): each node masks ``c_i * u_i``
(``u_i`` its per-task transform of ``tau_i``, ``c_i`` its weight over the largest weight).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from hf_atm.errors import MergeConfigError
from hf_atm.federated.config import FederatedATMConfig
from hf_atm.federated.protocol import short_reason
from hf_atm.merging.spec import MergeSpec, per_task_transform

__all__ = ["run_secagg_round", "secagg_client_transform", "secagg_delta", "secagg_workflow"]


def secagg_client_transform(
    spec: MergeSpec, tau: Mapping[str, Tensor], task_index: int, num_tasks: int, coefficient: float
) -> dict[str, Tensor]:
    """What a node masks under SecAgg+: ``coefficient * u_i`` per tensor, ``u_i`` the unweighted per-task term of
    a sum-decomposable merge (task_arithmetic / average: ``tau``; dare_linear: seeded DARE mask by the task's
    index among all tasks; breadcrumbs: the magnitude band)."""
    unweighted = replace(spec, weights=None, scale=1.0,
                         method="task_arithmetic" if spec.method == "average" else spec.method)
    return {n: per_task_transform(unweighted, t, task_index, n, num_tasks).mul_(coefficient) for n, t in tau.items()}


def secagg_delta(
    mean: Mapping[str, Tensor],
    spec: MergeSpec,
    num_arrived: int,
    coefficients: Sequence[float],
) -> dict[str, Tensor]:
    """The merged delta from SecAgg+'s mean ``(1/n') sum_i c_i u_i`` over the `num_arrived` nodes that arrived
    (``c_i`` = `coefficients`, the factors the nodes applied, proportional to their merge weights).

    ``average``: ``sum_i c_i u_i / sum_i c_i``; otherwise ``spec.scale * sum_i w_i u_i`` where
    ``w_i = spec.weights[i]`` (1 when None) ``= c_i * (w_j / c_j)`` for any ``j`` with ``c_j != 0``.
    Equal to ``merge_deltas(spec, taus)`` up to SecAgg+'s quantization (at most ``2 clip / range`` per entry of
    the mean)."""
    if len(coefficients) != num_arrived or num_arrived < 1:
        raise MergeConfigError(f"secagg: {len(coefficients)} coefficients for {num_arrived} nodes")
    total = {n: t.to(torch.float64) * num_arrived for n, t in mean.items()}
    if spec.method == "average":
        denom = float(sum(coefficients))
        if denom == 0:
            raise MergeConfigError("secagg: the weights of the nodes that arrived sum to zero")
        return {n: (t / denom).to(torch.float32) for n, t in total.items()}
    j = max(range(num_arrived), key=lambda i: abs(coefficients[i]))
    if coefficients[j] == 0:
        raise MergeConfigError("secagg: every node that arrived has weight zero")
    w_j = 1.0 if spec.weights is None else float(spec.weights[j])
    factor = spec.scale * w_j / float(coefficients[j])
    return {n: (t * factor).to(torch.float32) for n, t in total.items()}




def run_secagg_round(
    grid: Grid, workflow: Any, round_idx: int, configs: Mapping[int, Mapping[str, Any]]
) -> tuple[list[Any] | None, list[tuple[int, dict[str, Any]]], list[str]]:
    """One SecAgg+ train step through Flower's ``SecAggPlusWorkflow`` (a legacy-API workflow: it drives a
    ``LegacyContext`` and a legacy ``Strategy``, which this function supplies).

    `configs`: ``{node id: FitIns config}``. Returns ``(mean arrays in sorted tensor-name order or None when the
    protocol halted, [(node id, metrics)] of the nodes whose masked vector was summed, failure reasons)``.
    """
    from flwr.common import FitIns, Parameters, parameters_to_ndarrays
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import Strategy
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    class _Collect(Strategy):
        """The legacy strategy SecAggPlusWorkflow talks to: it hands out the per-node FitIns and keeps the
        unmasked mean (the workflow gives every result the same aggregated parameters)."""

        def __init__(self) -> None:
            self.mean: list[Any] | None = None
            self.results: list[tuple[int, dict[str, Any]]] = []
            self.failures: list[str] = []

        def initialize_parameters(self, client_manager: Any) -> None:
            return None

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
            empty = Parameters(tensors=[], tensor_type="numpy.ndarray")
            return [(GridClientProxy(nid, grid, 0), FitIns(empty, dict(cfg))) for nid, cfg in sorted(configs.items())]

        def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict]:
            self.results = [(int(proxy.node_id), dict(res.metrics)) for proxy, res in results]
            self.failures = list(dict.fromkeys(short_reason(f) for f in failures))
            if results:
                self.mean = parameters_to_ndarrays(results[0][1].parameters)
            return None, {}

        def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
            return []

        def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict]:
            return None, {}

        def evaluate(self, server_round: int, parameters: Any) -> None:
            return None

    collect = _Collect()
    ctx = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                        strategy=collect)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_idx})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow(grid, ctx)
    if collect.mean is None and not collect.failures:
        collect.failures = ["SecAgg+ halted (too few nodes for the reconstruction threshold?)"]
    return collect.mean, collect.results, collect.failures


def secagg_workflow(config: FederatedATMConfig) -> Any:
    """Flower's ``SecAggPlusWorkflow`` with the run's SecAgg+ options (shares, threshold, clipping, quantization,
    timeout); every node reports weight 1 (``max_weight=1``), so the workflow returns the plain mean."""
    from flwr.server.workflow import SecAggPlusWorkflow

    return SecAggPlusWorkflow(
        num_shares=_share_arg(config.secagg_shares), reconstruction_threshold=_share_arg(config.secagg_threshold),
        max_weight=1.0, clipping_range=float(config.secagg_clip),
        quantization_range=int(config.secagg_quantization_range), timeout=config.round_timeout,
    )


def _share_arg(x: float) -> int | float:
    """SecAgg+ takes a fraction as a float and a count as an int (> 2)."""
    return int(x) if x > 1 else float(x)
