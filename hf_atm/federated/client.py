"""The ClientApp of federated ATM: one Flower node holds one task (its data and its head).

Which task: the node config ``task`` (``flower-supernode --node-config "task='noun_category'"``), else
``partition-id`` (the simulation's node index) into the sorted task list. The node's state between messages
(``context.state``): the global backbone of the round it last received (``atm_backbone``), its head
(``atm_head``), that round's number (``atm_client.version``) and, with error feedback, its residual.

Messages (see :mod:`hf_atm.federated.protocol`):

* QUERY ``hello``: task, label names, example counts, state version;
* QUERY ``sync``: store the full backbone and head sent by the server;
* TRAIN: fine-tune the task from the stored backbone exactly as ``ATMTrainer`` does (same code through
  :func:`finetune_task`, same per-(seed, round, task) seeding) and reply with the task vector (compressed as
  asked) and the example count. Under SecAgg+ the message arrives through Flower's ``secaggplus_mod`` (legacy
  ``FitIns`` layout) and the reply carries ``c_i * u_i`` for masking;
* EVALUATE: apply the merged delta to the stored backbone, evaluate on ``validation`` (or ``test``), reply
  with the accuracy and the head.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hf_atm.atm.rounds import apply_delta_
from hf_atm.atm.tuning import check_head_state, load_head_
from hf_atm.errors import CheckpointError, TaskDataError
from hf_atm.federated.compression import (
    Compression,
    ErrorFeedback,
    decode_delta,
    encode_delta,
    record_to_tensors,
    tensors_to_record,
)
from hf_atm.federated.config import FederatedATMConfig
from hf_atm.federated.data import CACHE_SIZE, label_names, load_task_data, node_task
from hf_atm.federated.protocol import (
    ACTION_HELLO,
    ACTION_SYNC,
    FITINS_CONFIG,
    PROTOCOL,
    REC_BACKBONE,
    REC_CONFIG,
    REC_DELTA,
    REC_HEAD,
    REC_INFO,
    REC_METRICS,
    REC_TAU,
    STATE_CONFIG,
    STATE_RESIDUAL,
    Mod,
)
from hf_atm.federated.secagg import secagg_client_transform
from hf_atm.merging.spec import MergeSpec

__all__ = ["app", "finetune_task", "make_client_app", "optional_secaggplus_mod"]

log = logging.getLogger("hf_atm.federated")

_LOCAL: OrderedDict[str, _Local] = OrderedDict()


# ----------------------------------------------------------------------------------------------------------
# the local model
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Local:
    """One task's model and trainer in this process."""

    task: str
    model: Any
    trainer: Any
    labels: list[str]
    num_train: int
    num_validation: int


def _local(cfg: FederatedATMConfig, ctx: Context) -> _Local:
    """The cached (per process) model and ATMTrainer of this node's task."""
    from transformers import PrinterCallback

    from hf_atm.atm import ATMTrainer, MultiTaskModel

    suite, proc = load_task_data(cfg)
    task = node_task(ctx.node_config, list(suite))
    key = json.dumps([cfg.to_dict(), task], sort_keys=True, default=str)
    if key in _LOCAL:
        _LOCAL.move_to_end(key)
        return _LOCAL[key]
    labels = label_names(suite[task], task)
    model = MultiTaskModel.from_backbone(cfg.model, {task: labels}, pooling=cfg.pooling, seed=cfg.head_seed)
    args = cfg.atm_args(tempfile.gettempdir() + "/hf_atm_federated_client")
    trainer = ATMTrainer(model=model, args=args, task_datasets={task: suite[task]}, processing_class=proc)
    trainer.remove_callback(PrinterCallback)  # a node logs through Flower, not by printing every evaluation
    local = _Local(task, model, trainer, labels, len(suite[task]["train"]), len(suite[task]["validation"]))
    _LOCAL[key] = local
    while len(_LOCAL) > CACHE_SIZE:
        _LOCAL.popitem(last=False)
    return local


# ----------------------------------------------------------------------------------------------------------
# the per-task fine-tuning (ATMTrainer's)
# ----------------------------------------------------------------------------------------------------------
def finetune_task(trainer: Any, task: str, round_idx: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One PA-ATM fine-tuning of `task` on ``trainer.model`` from its current backbone through the trainer's
    public per-task tuner (``ATMTrainer.tune_task``: the very step of an in-process round, same steps, fresh
    optimizer and schedule, every RNG seeded by ``trainer.task_seed(round_idx, task)``), so a node computes
    bit for bit the task vector the in-process trainer computes. Returns ``(tau, {"loss", "steps",
    "train-seconds"})`` with ``tau = theta_i - theta`` in float32 (float64 tensors stay float64; with LoRA the
    adapter's ``B @ A * scaling``). The model keeps the tuned weights (backbone and head)."""
    trainer.begin_round(trainer.steps_per_round(task))
    res = trainer.tune_task(task, round_idx)
    metrics = {"loss": float(res.loss), "steps": int(res.steps), "train-seconds": float(res.train_seconds)}
    return res.task_vector, metrics


# ----------------------------------------------------------------------------------------------------------
# node state
# ----------------------------------------------------------------------------------------------------------
def _version(ctx: Context) -> int:
    rec = ctx.state.config_records.get(STATE_CONFIG)
    return int(rec["version"]) if rec is not None and "version" in rec else -1


def _set_version(ctx: Context, version: int, task: str) -> None:
    ctx.state.config_records[STATE_CONFIG] = ConfigRecord({"version": int(version), "task": task})


def _check_tensors(local: _Local, backbone: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor]) -> None:
    mine = local.model.backbone_tensors()
    if set(backbone) != set(mine):
        diff = sorted(set(backbone) ^ set(mine))[:5]
        raise CheckpointError(f"task {local.task!r}: the server's backbone does not match this node's ({diff})")
    for n, t in backbone.items():
        if tuple(t.shape) != tuple(mine[n].shape):
            raise CheckpointError(f"tensor {n!r}: server shape {tuple(t.shape)} != node shape {tuple(mine[n].shape)}")
    check_head_state(local.model, local.task, head)


@torch.no_grad()
def _load_state(local: _Local, ctx: Context) -> None:
    """Copy the stored backbone and head into the local model."""
    if REC_BACKBONE not in ctx.state.array_records or REC_HEAD not in ctx.state.array_records:
        raise CheckpointError(f"task {local.task!r}: this node holds no model yet (no sync received)")
    backbone = record_to_tensors(ctx.state.array_records[REC_BACKBONE])
    head = record_to_tensors(ctx.state.array_records[REC_HEAD])
    _check_tensors(local, backbone, head)
    for n, t in local.model.backbone_tensors().items():
        t.copy_(backbone[n])
    load_head_(local.model, local.task, head)


def _store_backbone(local: _Local, ctx: Context) -> None:
    ctx.state.array_records[REC_BACKBONE] = tensors_to_record(local.model.backbone_tensors())


def _reply(msg: Message, info: Mapping[str, Any], metrics: Mapping[str, float] | None = None,
           arrays: Mapping[str, ArrayRecord] | None = None) -> Message:
    content = RecordDict({REC_INFO: ConfigRecord(dict(info))})
    if metrics is not None:
        content[REC_METRICS] = MetricRecord(dict(metrics))
    for k, v in (arrays or {}).items():
        content[k] = v
    return Message(content, reply_to=msg)


# ----------------------------------------------------------------------------------------------------------
# handlers
# ----------------------------------------------------------------------------------------------------------
def _query(cfg: FederatedATMConfig, msg: Message, ctx: Context) -> Message:
    conf = msg.content.config_records[REC_CONFIG]
    local = _local(cfg, ctx)
    action = str(conf["action"])
    if action == ACTION_HELLO:
        return _reply(msg, {"task": local.task, "labels": list(local.labels), "num-train": local.num_train,
                            "num-validation": local.num_validation, "version": _version(ctx), "protocol": PROTOCOL})
    if action == ACTION_SYNC:
        if str(conf["task"]) != local.task:
            raise TaskDataError(f"sync for task {conf['task']!r} reached the node of task {local.task!r}")
        backbone = record_to_tensors(msg.content.array_records[REC_BACKBONE])
        head = record_to_tensors(msg.content.array_records[REC_HEAD])
        _check_tensors(local, backbone, head)
        ctx.state.array_records[REC_BACKBONE] = msg.content.array_records[REC_BACKBONE]
        ctx.state.array_records[REC_HEAD] = msg.content.array_records[REC_HEAD]
        ctx.state.array_records.pop(STATE_RESIDUAL, None)
        _set_version(ctx, int(conf["version"]), local.task)
        return _reply(msg, {"task": local.task, "version": int(conf["version"])})
    raise ValueError(f"unknown query action {action!r}")


def _train_common(cfg: FederatedATMConfig, ctx: Context, conf: Mapping[str, Any]) -> tuple[_Local, dict, dict]:
    local = _local(cfg, ctx)
    round_idx = int(conf["round"])
    if str(conf["task"]) != local.task:
        raise TaskDataError(f"train for task {conf['task']!r} reached the node of task {local.task!r}")
    if _version(ctx) != int(conf["version"]):
        raise CheckpointError(f"task {local.task!r}: node holds round {_version(ctx)}, train needs round "
                              f"{int(conf['version'])} (the server re-syncs it next round)")
    _load_state(local, ctx)
    tau, stats = finetune_task(local.trainer, local.task, round_idx)
    ctx.state.array_records[REC_HEAD] = tensors_to_record(local.model.heads[local.task].state_dict())
    stats["num-examples"] = local.num_train
    return local, tau, stats


def _train(cfg: FederatedATMConfig, msg: Message, ctx: Context) -> Message:
    if FITINS_CONFIG in msg.content.config_records:
        return _train_secagg(cfg, msg, ctx)
    conf = msg.content.config_records[REC_CONFIG]
    local, tau, stats = _train_common(cfg, ctx, conf)
    comp = Compression(**json.loads(str(conf["uplink"])))
    seed = int(conf["uplink-seed"])
    ef = None
    if bool(conf.get("error-feedback", False)) and not comp.lossless:
        res = ctx.state.array_records.get(STATE_RESIDUAL)
        ef = ErrorFeedback(record_to_tensors(res) if res is not None else None)
        tau = ef.compensate(tau)
    rec = encode_delta(tau, comp, seed)
    if ef is not None:
        sent = decode_delta(rec, comp, {n: t.shape for n, t in tau.items()}, seed, {n: t.dtype for n, t in tau.items()})
        ef.update(tau, sent)
        ctx.state.array_records[STATE_RESIDUAL] = tensors_to_record(ef.state())
    return _reply(msg, {"task": local.task, "round": int(conf["round"]), "version": _version(ctx)}, stats,
                  {REC_TAU: rec})


def _train_secagg(cfg: FederatedATMConfig, msg: Message, ctx: Context) -> Message:
    """Train under SecAgg+: the reply (legacy FitRes layout) carries ``c_i * u_i`` as float32 arrays in sorted
    tensor-name order, weight 1 (``num_examples=1``: the workflow then returns the plain mean)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    conf = msg.content.config_records[FITINS_CONFIG]
    local, tau, stats = _train_common(cfg, ctx, conf)
    spec = replace(MergeSpec.from_dict(json.loads(str(conf["merge-spec"]))), seed=int(conf["merge-round-seed"]))
    backbone = local.model.backbone_tensors()
    names = sorted(backbone)
    shapes = {n: t.shape for n, t in backbone.items()}
    term = secagg_client_transform(spec, tau, int(conf["task-index"]), int(conf["num-tasks"]),
                                   float(conf["secagg-coefficient"]))
    arrays = [term[n].to(torch.float32).numpy() if n in term else np.zeros(tuple(shapes[n]), np.float32) for n in names]
    clipped = int(sum(int((np.abs(a) > cfg.secagg_clip).sum()) for a in arrays))
    metrics = {"task": local.task, "round": int(conf["round"]), "loss": stats["loss"], "steps": stats["steps"],
               "train-seconds": stats["train-seconds"], "num-examples": stats["num-examples"], "secagg-clipped": clipped}
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), 1, metrics)
    return Message(fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def _evaluate(cfg: FederatedATMConfig, msg: Message, ctx: Context) -> Message:
    conf = msg.content.config_records[REC_CONFIG]
    local = _local(cfg, ctx)
    if str(conf["task"]) != local.task:
        raise TaskDataError(f"evaluate for task {conf['task']!r} reached the node of task {local.task!r}")
    version, target = _version(ctx), int(conf["to-version"])
    _load_state(local, ctx)
    if REC_DELTA in msg.content.array_records:
        if version != int(conf["from-version"]) or target != version + 1:
            raise CheckpointError(f"task {local.task!r}: node holds round {version}, the delta goes from round "
                                  f"{int(conf['from-version'])} to {target}")
        comp = Compression(**json.loads(str(conf["downlink"])))
        tensors = local.model.backbone_tensors()
        delta = decode_delta(msg.content.array_records[REC_DELTA], comp, {n: t.shape for n, t in tensors.items()},
                             int(conf["downlink-seed"]), {n: t.dtype for n, t in tensors.items()})
        apply_delta_(tensors, None, delta)
        _store_backbone(local, ctx)
        _set_version(ctx, target, local.task)
    elif version != target:
        raise CheckpointError(f"task {local.task!r}: node holds round {version}, evaluation is of round {target}")
    split = str(conf.get("split", "validation"))
    metrics = local.trainer.evaluate(split=split)
    total = len(local.trainer.task_data[local.task][split])
    correct = int(round(float(metrics[f"eval_{local.task}_accuracy"]) * total))
    arrays = {REC_HEAD: tensors_to_record(local.model.heads[local.task].state_dict())} if split == "validation" else {}
    return _reply(msg, {"task": local.task, "version": _version(ctx), "split": split},
                  {"correct": correct, "total": total}, arrays)


# ----------------------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------------------
def optional_secaggplus_mod(msg: Message, ctx: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round (they carry its config record); plain
    TRAIN messages go straight through."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctx, call_next)
    return call_next(msg, ctx)


def make_client_app(config: FederatedATMConfig | None = None, mods: Sequence[Mod] | None = None) -> ClientApp:
    """A ClientApp running federated ATM. `config` None: read it from ``context.run_config`` (``flwr run``).

    `mods`: Flower ClientApp mods (``(message, context, call_next) -> reply``) wrapped around every handler,
    outermost first, e.g. to log, meter or inject faults; SecAgg+'s mod runs inside them."""
    app = ClientApp(mods=list(mods or []))
    cache: dict[str, FederatedATMConfig] = {}

    def resolve(ctx: Context) -> FederatedATMConfig:
        if config is not None:
            return config
        key = json.dumps(dict(ctx.run_config), sort_keys=True, default=str)
        if key not in cache:
            cache.clear()
            cache[key] = FederatedATMConfig.from_run_config(ctx.run_config)
        return cache[key]

    @app.query()
    def query(msg: Message, ctx: Context) -> Message:
        return _query(resolve(ctx), msg, ctx)

    @app.train(mods=[optional_secaggplus_mod])
    def train(msg: Message, ctx: Context) -> Message:
        return _train(resolve(ctx), msg, ctx)

    @app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        return _evaluate(resolve(ctx), msg, ctx)

    return app


#: the ClientApp for ``flwr run`` / ``flower-supernode`` (configuration from the run config).
app = make_client_app()
