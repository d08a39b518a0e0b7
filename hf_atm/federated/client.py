"""The ClientApp of federated ATM: one Flower node holds one task (its data and its head).

Which task: the node config ``task`` (``flower-supernode --node-config "task='noun_category'"``), else
``partition-id`` (the simulation's node index) into the sorted task list. The node's state between messages:
the global backbone of the round it last received (``atm_backbone``), its head (``atm_head``), that round's
number (``atm_client.version``) and, with error feedback, its residual; kept in Flower's ``context.state``
(``node_state="context"``) or in safetensors files on the node's disk (``node_state="disk"``, the Flower App's
default; the backbone is rewritten only when it changes, see :class:`_NodeState`).

What a message costs. In Flower's deployment runtime every message runs in a fresh ``flwr-clientapp``
process, so the node prepares its task's data once and keeps it on its disk (:func:`hf_atm.federated.data.node_data`:
its own task only, tokenized, under a key of data, tokenizer and options); hello and sync read only that
(no model is built for them); train and evaluate build the model and trainer once per process (kept for the
next messages where Flower keeps the process: simulation actors, :class:`~hf_atm.federated.simulation.LocalGrid`).
Every reply's ``atm_metrics`` carries the node's own timings: ``handler-seconds`` (in the handler),
``setup-seconds`` (data, model, node state), ``compute-seconds`` (training / evaluation; 0 for hello and
sync) and ``startup-seconds`` (process start to handler, first message of a process only).

Messages (see :mod:`hf_atm.federated.protocol`):

* QUERY ``hello``: task, label names, example counts, state version;
* QUERY ``sync``: store the full backbone and head sent by the server (their shapes are checked against the
  node's model when this process built it, else at the next train / evaluate);
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
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

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
from hf_atm.federated.data import CACHE_SIZE, NodeData, node_data
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

__all__ = ["STALE_STATE_SECONDS", "app", "finetune_task", "make_client_app", "optional_secaggplus_mod"]

log = logging.getLogger("hf_atm.federated")

_LOCAL: OrderedDict[str, _Local] = OrderedDict()
#: the shapes of the model of a (model, pooling, task) this process built: sync checks against them
_SHAPES: dict[str, tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]] = {}


# ----------------------------------------------------------------------------------------------------------
# timing (reported in every reply's atm_metrics: what the node spent, against what the server waited)
# ----------------------------------------------------------------------------------------------------------
_FIRST_MESSAGE = [True]


def _startup_seconds() -> float:
    """Seconds from this process's start to now for its first message (the deployment runtime starts a
    ClientApp process per message: interpreter, imports, receiving message and node state), 0 afterwards
    (a simulation actor or in-process node that is kept)."""
    if not _FIRST_MESSAGE[0]:
        return 0.0
    _FIRST_MESSAGE[0] = False
    try:
        import psutil  # optional: Flower's simulation extra brings it

        return max(0.0, time.time() - psutil.Process(os.getpid()).create_time())
    except (ImportError, OSError):
        return 0.0


@dataclass
class _Timer:
    """Seconds of one handler: setup (data and model), compute (training / evaluation), all of it."""

    start: float
    startup: float
    setup: float = 0.0
    compute: float = 0.0

    @classmethod
    def begin(cls) -> _Timer:
        return cls(time.perf_counter(), _startup_seconds())

    def timed(self, part: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            setattr(self, part, getattr(self, part) + time.perf_counter() - t0)

    def metrics(self) -> dict[str, float]:
        return {"handler-seconds": time.perf_counter() - self.start, "setup-seconds": self.setup,
                "compute-seconds": self.compute, "startup-seconds": self.startup}


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


def _model_key(cfg: FederatedATMConfig, data: NodeData) -> str:
    return json.dumps([cfg.model, cfg.pooling, cfg.head_seed, data.key, data.labels], default=str)


def _local(cfg: FederatedATMConfig, ctx: Context) -> _Local:
    """The model and ATMTrainer of this node's task, built once per process (a simulation actor, an
    in-process node) and run, cached by the run, every option and the data (a trainer carries its schedule
    from round to round, so a trainer is never shared by two runs)."""
    data = node_data(cfg, ctx.node_config)
    key = json.dumps([int(ctx.run_id), cfg.to_dict(), data.key, data.task], sort_keys=True, default=str)
    if key in _LOCAL:
        _LOCAL.move_to_end(key)
        return _LOCAL[key]
    from transformers import PrinterCallback

    from hf_atm.atm import ATMTrainer, MultiTaskModel

    task = data.task
    model = MultiTaskModel.from_backbone(cfg.model, {task: data.labels}, pooling=cfg.pooling, seed=cfg.head_seed)
    args = cfg.atm_args(tempfile.gettempdir() + "/hf_atm_federated_client")
    trainer = ATMTrainer(model=model, args=args, task_datasets={task: data.dataset}, processing_class=data.processing_class)
    trainer.remove_callback(PrinterCallback)  # a node logs through Flower, not by printing every evaluation
    local = _Local(task, model, trainer, data.labels, data.num_train, data.num_validation)
    _SHAPES[_model_key(cfg, data)] = ({n: tuple(t.shape) for n, t in model.backbone_tensors().items()},
                                      {n: tuple(t.shape) for n, t in model.heads[task].state_dict().items()})
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
#: a sync removes this node's state of other runs not written for this long (an abandoned run's files); a
#: run still writing (two runs on one SuperNode, as Flower allows) keeps its own
STALE_STATE_SECONDS = 24 * 3600.0
_BACKBONE_FILE = "backbone.safetensors"
_STATE_FILE = "state.safetensors"
_STATE_FORMAT = "2"


def _read_safetensors(path: Path, metadata_only: bool = False) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {} if metadata_only else {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 - no iteration
    return meta, tensors


class _NodeState:
    """What a node holds between messages: the version (round of the global model it holds), the backbone,
    its head and the error-feedback residual.

    ``node_state="context"``: Flower's node state (``context.state``), which Flower ships to each ClientApp
    process and back (twice the backbone per message in the deployment runtime). ``"disk"``: a folder per node
    and run on the node's disk (``<data cache>/nodes/<node id>/run-<run id>/``), the context keeping only the
    version. In Flower 1.32's deployment runtime the reply is pushed before the process pushes its context, so
    under load the next message's process can start from the previous context; the files are written before
    the reply leaves and are always current. Two files, each written atomically:

    * ``backbone.safetensors`` (metadata: its version), written only when the backbone changes (sync,
      evaluate with a delta): a train step rewrites only the small file;
    * ``state.safetensors``: head and residual, metadata version / task / format; written last, so a
      process killed between the two leaves versions that differ, read as "holds no model" (the server
      re-syncs the node).

    A late process of the node (one the server gave up on) never writes an older version over a newer one:
    its save raises CheckpointError. A sync removes this node's files of other runs only when they were not
    written for :data:`STALE_STATE_SECONDS`."""

    def __init__(self, cfg: FederatedATMConfig, ctx: Context) -> None:
        self.ctx = ctx
        self.folder: Path | None = None
        if cfg.node_state == "disk":
            from hf_atm.federated.data import data_cache_dir

            self.folder = data_cache_dir() / "nodes" / str(int(ctx.node_id)) / f"run-{int(ctx.run_id)}"
        self._small: dict[str, dict[str, torch.Tensor]] | None = None  # head, residual
        self._backbone: dict[str, torch.Tensor] | None = None  # read on first use
        self._meta: dict[str, str] | None = None
        self._dirty: set[str] = set()  # "backbone" / "state"

    # -- disk
    def _load(self) -> None:
        if self._small is not None:
            return
        self._small, self._meta = {}, {}
        assert self.folder is not None
        if not (self.folder / _STATE_FILE).is_file():
            return
        try:
            meta, flat = _read_safetensors(self.folder / _STATE_FILE)
            backbone_meta, _ = _read_safetensors(self.folder / _BACKBONE_FILE, metadata_only=True)
            if backbone_meta.get("version") != meta.get("version"):
                raise ValueError(f"backbone of round {backbone_meta.get('version')}, state of round "
                                 f"{meta.get('version')} (a process killed between the two writes)")
        except (OSError, ValueError, RuntimeError) as e:  # unreadable: the node holds nothing, the server re-syncs
            log.warning("node state %s unreadable (%s): holding no model", self.folder, e)
            return
        self._meta = meta
        for name, t in flat.items():
            group, _, tensor = name.partition("/")
            self._small.setdefault(group, {})[tensor] = t

    def _disk_version(self) -> int:
        assert self.folder is not None
        try:
            meta, _ = _read_safetensors(self.folder / _STATE_FILE, metadata_only=True)
            return int(meta.get("version", -1))
        except (OSError, ValueError, RuntimeError):
            return -1

    # -- API
    def version(self) -> int:
        if self.folder is None:
            rec = self.ctx.state.config_records.get(STATE_CONFIG)
            return int(rec["version"]) if rec is not None and "version" in rec else -1
        self._load()
        assert self._meta is not None
        return int(self._meta.get("version", -1))

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if self.folder is None:
            rec = self.ctx.state.array_records.get(key)
            return record_to_tensors(rec) if rec is not None else None
        self._load()
        assert self._small is not None and self._meta is not None
        if key != REC_BACKBONE:
            return self._small.get(key)
        if self._backbone is None and self._meta:
            try:
                self._backbone = _read_safetensors(self.folder / _BACKBONE_FILE)[1]
            except (OSError, ValueError, RuntimeError) as e:
                log.warning("node state %s: backbone unreadable (%s): holding no model", self.folder, e)
        return self._backbone

    def put(self, key: str, value: ArrayRecord | Mapping[str, torch.Tensor] | None) -> None:
        """Store (None: drop) the tensors of `key`."""
        if self.folder is None:
            if value is None:
                self.ctx.state.array_records.pop(key, None)
            else:
                self.ctx.state.array_records[key] = value if isinstance(value, ArrayRecord) else tensors_to_record(value)
            return
        self._load()
        assert self._small is not None
        tensors = None
        if value is not None:
            tensors = record_to_tensors(value) if isinstance(value, ArrayRecord) else value
            tensors = {n: t.detach().contiguous().clone() for n, t in tensors.items()}
        if key == REC_BACKBONE:
            self._backbone = tensors
            self._dirty.add("backbone")
        elif tensors is None:
            self._small.pop(key, None)
        else:
            self._small[key] = tensors
        self._dirty.add("state")

    def set_version(self, version: int, task: str) -> None:
        self.ctx.state.config_records[STATE_CONFIG] = ConfigRecord({"version": int(version), "task": task})
        if self.folder is not None:
            self._load()
            if self.version() != int(version) and "backbone" not in self._dirty:
                self.get(REC_BACKBONE)  # its file carries the version: rewritten with it
                self._dirty.add("backbone")
            self._meta = {"version": str(int(version)), "task": task, "format": _STATE_FORMAT}
            self._dirty.add("state")

    def save(self, fresh: bool = False) -> None:
        """Write what changed to disk (atomic, backbone first) before the reply leaves; CheckpointError when the
        node's files already hold a newer version (this process is late). `fresh` (a sync): remove this node's
        files of other runs not written for :data:`STALE_STATE_SECONDS`."""
        if self.folder is None or not self._dirty:
            return
        from safetensors.torch import save

        from hf_atm.files import atomic_write_bytes

        assert self._small is not None and self._meta is not None
        mine, on_disk = int(self._meta.get("version", -1)), self._disk_version()
        if on_disk > mine:
            raise CheckpointError(f"node state {self.folder}: the node already holds round {on_disk}; this process "
                                  f"(round {mine}) is late and does not overwrite it")
        if "backbone" in self._dirty:
            if self._backbone is None:
                raise CheckpointError(f"node state {self.folder}: no backbone to save")
            atomic_write_bytes(self.folder / _BACKBONE_FILE,
                               save(self._backbone, metadata={"version": self._meta.get("version", "-1")}))
        flat = {f"{group}/{name}": t for group, ts in self._small.items() for name, t in ts.items()}
        atomic_write_bytes(self.folder / _STATE_FILE, save(flat, metadata=self._meta))
        self._dirty.clear()
        if fresh:
            self._remove_stale_runs()

    def _remove_stale_runs(self) -> None:
        import shutil

        assert self.folder is not None
        now = time.time()
        for other in self.folder.parent.glob("run-*"):
            if other == self.folder:
                continue
            try:
                written = max([other.stat().st_mtime, *(f.stat().st_mtime for f in other.glob("*"))])
            except OSError:  # removed meanwhile by another process
                continue
            if now - written <= STALE_STATE_SECONDS:
                continue  # maybe a run still going on this node
            if other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
            else:  # the one-file layout of format 1
                other.unlink(missing_ok=True)


def _check_shapes(task: str, backbone: Mapping[str, tuple[int, ...]], mine: Mapping[str, tuple[int, ...]]) -> None:
    if set(backbone) != set(mine):
        diff = sorted(set(backbone) ^ set(mine))[:5]
        raise CheckpointError(f"task {task!r}: the server's backbone does not match this node's ({diff})")
    for n, shape in backbone.items():
        if tuple(shape) != tuple(mine[n]):
            raise CheckpointError(f"tensor {n!r}: server shape {tuple(shape)} != node shape {tuple(mine[n])}")


def _check_tensors(local: _Local, backbone: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor]) -> None:
    from hf_atm.atm.tuning import check_head_state

    _check_shapes(local.task, {n: tuple(t.shape) for n, t in backbone.items()},
                  {n: tuple(t.shape) for n, t in local.model.backbone_tensors().items()})
    check_head_state(local.model, local.task, head)


@torch.no_grad()
def _load_state(local: _Local, state: _NodeState) -> None:
    """Copy the stored backbone and head into the local model."""
    from hf_atm.atm.tuning import load_head_

    backbone, head = state.get(REC_BACKBONE), state.get(REC_HEAD)
    if backbone is None or head is None:
        raise CheckpointError(f"task {local.task!r}: this node holds no model yet (no sync received)")
    _check_tensors(local, backbone, head)
    for n, t in local.model.backbone_tensors().items():
        t.copy_(backbone[n])
    load_head_(local.model, local.task, head)


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
    """hello and sync need the node's data only (task, labels, counts), never its model: in the deployment
    runtime they cost a process start and a read of the data cache."""
    timer = _Timer.begin()
    conf = msg.content.config_records[REC_CONFIG]
    data = timer.timed("setup", lambda: node_data(cfg, ctx.node_config))
    state = _NodeState(cfg, ctx)
    action = str(conf["action"])
    if action == ACTION_HELLO:
        if int(conf.get("protocol", 0)) != PROTOCOL:  # said in this node's log too; the server refuses it
            log.warning("server protocol %s != node protocol %s: install the same hf_atm version on the server "
                        "and every node", conf.get("protocol", 0), PROTOCOL)
        return _reply(msg, {"task": data.task, "labels": list(data.labels), "num-train": data.num_train,
                            "num-validation": data.num_validation, "version": state.version(), "protocol": PROTOCOL},
                      timer.metrics())
    if action == ACTION_SYNC:
        if str(conf["task"]) != data.task:
            raise TaskDataError(f"sync for task {conf['task']!r} reached the node of task {data.task!r}")
        backbone = msg.content.array_records[REC_BACKBONE]
        head = msg.content.array_records[REC_HEAD]
        shapes = _SHAPES.get(_model_key(cfg, data))
        if shapes is not None:  # the model was built in this process: refuse a mismatch now (else at train)
            _check_shapes(data.task, {n: tuple(a.shape) for n, a in backbone.items()}, shapes[0])
            _check_shapes(data.task, {n: tuple(a.shape) for n, a in head.items()}, shapes[1])
        state.put(REC_BACKBONE, backbone)
        state.put(REC_HEAD, head)
        state.put(STATE_RESIDUAL, None)
        state.set_version(int(conf["version"]), data.task)
        timer.timed("setup", lambda: state.save(fresh=True))
        return _reply(msg, {"task": data.task, "version": int(conf["version"])}, timer.metrics())
    raise ValueError(f"unknown query action {action!r}")


def _train_common(cfg: FederatedATMConfig, ctx: Context, conf: Mapping[str, Any], timer: _Timer,
                  state: _NodeState) -> tuple[_Local, dict, dict]:
    local = timer.timed("setup", lambda: _local(cfg, ctx))
    round_idx = int(conf["round"])
    if str(conf["task"]) != local.task:
        raise TaskDataError(f"train for task {conf['task']!r} reached the node of task {local.task!r}")
    if state.version() != int(conf["version"]):
        raise CheckpointError(f"task {local.task!r}: node holds round {state.version()}, train needs round "
                              f"{int(conf['version'])} (the server re-syncs it next round)")
    timer.timed("setup", lambda: _load_state(local, state))
    tau, stats = timer.timed("compute", lambda: finetune_task(local.trainer, local.task, round_idx))
    state.put(REC_HEAD, local.model.heads[local.task].state_dict())
    stats["num-examples"] = local.num_train
    return local, tau, stats


def _train(cfg: FederatedATMConfig, msg: Message, ctx: Context) -> Message:
    if FITINS_CONFIG in msg.content.config_records:
        return _train_secagg(cfg, msg, ctx)
    timer = _Timer.begin()
    conf = msg.content.config_records[REC_CONFIG]
    state = _NodeState(cfg, ctx)
    local, tau, stats = _train_common(cfg, ctx, conf, timer, state)
    comp = Compression(**json.loads(str(conf["uplink"])))
    seed = int(conf["uplink-seed"])
    ef = None
    if bool(conf.get("error-feedback", False)) and not comp.lossless:
        ef = ErrorFeedback(state.get(STATE_RESIDUAL))
        tau = ef.compensate(tau)
    rec = encode_delta(tau, comp, seed)
    if ef is not None:
        sent = decode_delta(rec, comp, {n: t.shape for n, t in tau.items()}, seed, {n: t.dtype for n, t in tau.items()})
        ef.update(tau, sent)
        state.put(STATE_RESIDUAL, ef.state())
    timer.timed("setup", state.save)
    return _reply(msg, {"task": local.task, "round": int(conf["round"]), "version": state.version()},
                  {**stats, **timer.metrics()}, {REC_TAU: rec})


def _train_secagg(cfg: FederatedATMConfig, msg: Message, ctx: Context) -> Message:
    """Train under SecAgg+: the reply (legacy FitRes layout) carries ``c_i * u_i`` as float32 arrays in sorted
    tensor-name order, weight 1 (``num_examples=1``: the workflow then returns the plain mean)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    timer = _Timer.begin()
    conf = msg.content.config_records[FITINS_CONFIG]
    state = _NodeState(cfg, ctx)
    local, tau, stats = _train_common(cfg, ctx, conf, timer, state)
    timer.timed("setup", state.save)
    spec = replace(MergeSpec.from_dict(json.loads(str(conf["merge-spec"]))), seed=int(conf["merge-round-seed"]))
    backbone = local.model.backbone_tensors()
    names = sorted(backbone)
    shapes = {n: t.shape for n, t in backbone.items()}
    term = secagg_client_transform(spec, tau, int(conf["task-index"]), int(conf["num-tasks"]),
                                   float(conf["secagg-coefficient"]))
    arrays = [term[n].to(torch.float32).numpy() if n in term else np.zeros(tuple(shapes[n]), np.float32) for n in names]
    clipped = int(sum(int((np.abs(a) > cfg.secagg_clip).sum()) for a in arrays))
    metrics = {"task": local.task, "round": int(conf["round"]), "loss": stats["loss"], "steps": stats["steps"],
               "train-seconds": stats["train-seconds"], "num-examples": stats["num-examples"], "secagg-clipped": clipped,
               **timer.metrics()}
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), 1, metrics)
    return Message(fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def _evaluate(cfg: FederatedATMConfig, msg: Message, ctx: Context) -> Message:
    from hf_atm.atm.rounds import apply_delta_

    timer = _Timer.begin()
    conf = msg.content.config_records[REC_CONFIG]
    local = timer.timed("setup", lambda: _local(cfg, ctx))
    if str(conf["task"]) != local.task:
        raise TaskDataError(f"evaluate for task {conf['task']!r} reached the node of task {local.task!r}")
    state = _NodeState(cfg, ctx)
    version, target = state.version(), int(conf["to-version"])
    timer.timed("setup", lambda: _load_state(local, state))
    if REC_DELTA in msg.content.array_records:
        if version != int(conf["from-version"]) or target != version + 1:
            raise CheckpointError(f"task {local.task!r}: node holds round {version}, the delta goes from round "
                                  f"{int(conf['from-version'])} to {target}")
        comp = Compression(**json.loads(str(conf["downlink"])))
        tensors = local.model.backbone_tensors()
        delta = decode_delta(msg.content.array_records[REC_DELTA], comp, {n: t.shape for n, t in tensors.items()},
                             int(conf["downlink-seed"]), {n: t.dtype for n, t in tensors.items()})
        apply_delta_(tensors, None, delta)
        state.put(REC_BACKBONE, local.model.backbone_tensors())
        state.set_version(target, local.task)
        timer.timed("setup", state.save)
    elif version != target:
        raise CheckpointError(f"task {local.task!r}: node holds round {version}, evaluation is of round {target}")
    split = str(conf.get("split", "validation"))
    metrics = timer.timed("compute", lambda: local.trainer.evaluate(split=split))
    total = len(local.trainer.task_data[local.task][split])
    correct = int(round(float(metrics[f"eval_{local.task}_accuracy"]) * total))
    arrays = {REC_HEAD: tensors_to_record(local.model.heads[local.task].state_dict())} if split == "validation" else {}
    return _reply(msg, {"task": local.task, "version": state.version(), "split": split},
                  {"correct": correct, "total": total, **timer.metrics()}, arrays)


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
