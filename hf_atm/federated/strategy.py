"""The federated ATM round loop (:class:`ATMStrategy`): sync, train, merge, evaluate and checkpoint, over a Grid.

One federated ATM round ``k`` (``docs/FEDERATED.md``) is the PA-ATM round of ``ATMTrainer`` with every task on
its own node (a Flower SuperNode running :mod:`hf_atm.federated.client`):

1. *sync* (QUERY, action ``sync``): a node whose state is not the global model of round ``k-1`` (first round,
   a node that missed a message, a restarted node, a resumed server) receives the full backbone and its head;
2. *train* (TRAIN): every synced node fine-tunes its task ``E`` epochs from ``theta_{k-1}`` with the same code
   and seeds as ``ATMTrainer`` and replies with its task vector ``tau_i`` (optionally compressed) and its
   example count;
3. *merge*: ``theta_k = theta_{k-1} + merge(tau_i for the tasks that arrived)`` with ATM's own round merge
   (:func:`hf_atm.atm.collector.merge_round`, spec from :mod:`hf_atm.federated.aggregation`); fewer than ``min_clients`` vectors: the backbone is left unchanged
   and the round is marked ``skipped``;
4. *evaluate* (EVALUATE): every node holding ``theta_{k-1}`` receives the merged delta (optionally compressed;
   the server applies the decoded delta itself so everyone holds the same ``theta_k``), evaluates with its
   head on its validation split and returns accuracy and head.

Under SecAgg+ (``secure_aggregation``), step 2 runs Flower's ``SecAggPlusWorkflow``
(:mod:`hf_atm.federated.secagg`): the server only learns the mean over the nodes that arrived.

Every reply that fails, errors or misses ``round_timeout`` makes that task *missing* for the step; the run goes
on and ``history.json`` lists who was missing. Bytes per node and direction are counted on every message
(:class:`~hf_atm.federated.metering.MeteredGrid`). After each round the server writes ``checkpoint-round-{k}``
(:mod:`hf_atm.federated.checkpoints`) and a restarted server resumes from the last one (``resume``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from hf_atm.atm.collector import merge_round, round_spec
from hf_atm.atm.evaluation import cosine_from_gram, mean_off_diagonal, normalized_accuracy
from hf_atm.atm.history import HistoryEntry, write_history
from hf_atm.atm.rounds import apply_delta_
from hf_atm.atm.tuning import check_head_state, load_head_
from hf_atm.errors import CheckpointError, TaskDataError
from hf_atm.federated.aggregation import round_merge_spec
from hf_atm.federated.checkpoints import (
    CHECKPOINT_PREFIX,
    latest_checkpoint,
    load_checkpoint_state,
    save_checkpoint,
)
from hf_atm.federated.compression import decode_delta, encode_delta, record_to_tensors, tensors_to_record
from hf_atm.federated.config import FederatedATMConfig
from hf_atm.federated.discovery import NodeInfo, NodeRegistry, hello, task_labels, wait_for_nodes
from hf_atm.federated.metering import MeteredGrid
from hf_atm.federated.protocol import (
    ACTION_SYNC,
    PROTOCOL,
    REC_BACKBONE,
    REC_CONFIG,
    REC_DELTA,
    REC_HEAD,
    REC_INFO,
    REC_METRICS,
    REC_TAU,
    config_record,
    error_reason,
)
from hf_atm.federated.secagg import run_secagg_round, secagg_delta, secagg_workflow
from hf_atm.merging.spec import MergeSpec, tensor_seed

__all__ = ["ATMStrategy"]

log = logging.getLogger("hf_atm.federated")


def _empty_stats() -> dict[str, Any]:
    """The stats of a train step that merged nothing (no node was ready)."""
    return {"train_loss": {}, "steps": 0, "errors": {}, "arrived": [], "train_seconds": 0.0, "gram": None}


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
        self.labels: dict[str, list[str]] = {}
        self.registry = NodeRegistry()
        self.num_examples: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self.test_metrics: dict[str, float] | None = None
        self.best_round: int | None = None
        self.base_spec: MergeSpec | None = None
        self.grid: MeteredGrid | None = None

    # -- discovery ----------------------------------------------------------------------------------------
    def _hello(self, node_ids: Sequence[int]) -> dict[int, NodeInfo]:
        assert self.grid is not None
        # A node answers its first hello only after loading its task's data (and, in the simulation engine, after
        # its actor has imported torch): that is a step's work, so it gets a step's timeout, not startup_timeout
        # (seen: four nodes sharing one Ray CPU on a busy 2-core machine needed more than 120 s).
        return hello(self.grid, node_ids, self.cfg.round_timeout)

    def _assign(self, infos: Mapping[int, NodeInfo]) -> None:
        """Register the new nodes of `infos` and note their tasks' example counts."""
        for info in self.registry.assign(infos, self.tasks, self.labels):
            self.num_examples[info.task] = info.num_train

    def discover(self) -> None:
        """Hello every connected node, fix the task list and build the model (round 0 only)."""
        assert self.grid is not None
        want = self.cfg.num_clients or (len(self.cfg.tasks) if self.cfg.tasks else None)
        ids = wait_for_nodes(self.grid, want, self.cfg.startup_timeout, self.cfg.min_clients)
        infos = self._hello(ids)
        tasks = sorted(self.cfg.tasks) if self.cfg.tasks is not None else sorted({i.task for i in infos.values()})
        if not tasks:
            raise TaskDataError("no node answered the hello: no task to train")
        self.tasks = tasks
        self.labels = task_labels(infos, tasks)
        self.model = self.model_factory(dict(self.labels))
        self._assign(infos)
        self.base_spec = self.args.merge_spec(len(tasks))

    def refresh_nodes(self) -> None:
        """Forget nodes that left the grid; hello new ones and give them the tasks left without a node."""
        assert self.grid is not None
        ids = {int(i) for i in self.grid.get_node_ids()}
        self.registry.drop_departed(ids)
        new = sorted(ids - set(self.registry.nodes))
        if new and len(self.registry.nodes) < len(self.tasks):
            self._assign(self._hello(new))

    # -- helpers ------------------------------------------------------------------------------------------
    def _backbone(self) -> dict[str, Tensor]:
        return self.model.backbone_tensors()

    def _set_head(self, task: str, tensors: Mapping[str, Tensor]) -> None:
        check_head_state(self.model, task, tensors)  # every head tensor first: nothing half-copied
        load_head_(self.model, task, tensors)

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

    def _round_spec(self, arrived: Sequence[str], round_idx: int) -> MergeSpec:
        assert self.base_spec is not None
        return round_merge_spec(self.base_spec, self.tasks, arrived, round_idx, weighting=self.cfg.weighting,
                                num_examples=self.num_examples, merge_scale=self.args.merge_scale)

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
            task = self.registry.task_of(nid)
            content = RecordDict({
                REC_CONFIG: config_record(action=ACTION_SYNC, version=version, task=task),
                REC_BACKBONE: backbone,
                REC_HEAD: tensors_to_record(self.model.heads[task].state_dict()),
            })
            msgs.append(Message(content, nid, MessageType.QUERY, group_id=f"sync-{version}"))
        ok = []
        for m in self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout):
            nid = int(m.metadata.src_node_id)
            if m.has_error():
                log.warning("node %s failed sync to round %d: %s", nid, version, error_reason(m))
                continue
            self.registry.versions[nid] = int(m.content.config_records[REC_INFO]["version"])
            if self.registry.versions[nid] == version:
                ok.append(nid)
        return sorted(ok)

    def _train_config(self, nid: int, round_idx: int) -> dict[str, Any]:
        task = self.registry.task_of(nid)
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
        backbone = self._backbone()
        shapes = {n: t.shape for n, t in backbone.items()}
        dtypes = {n: t.dtype for n, t in backbone.items()}
        msgs = [Message(RecordDict({REC_CONFIG: ConfigRecord(self._train_config(nid, round_idx))}), nid,
                        MessageType.TRAIN, group_id=str(round_idx)) for nid in node_ids]
        t0 = time.perf_counter()
        replies = list(self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout))
        wall = time.perf_counter() - t0
        taus: dict[str, dict[str, Tensor]] = {}
        stats: dict[str, Any] = {"train_loss": {}, "steps": 0, "client_train_seconds": {}, "errors": {}}
        for m in replies:
            nid = int(m.metadata.src_node_id)
            task = self.registry.task_of(nid)
            if m.has_error():
                stats["errors"][task] = error_reason(m)
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
            self._add_train_metrics(stats, task, met)
            self.num_examples[task] = int(met["num-examples"])
        arrived = sorted(taus)
        stats["arrived"] = arrived
        stats["train_seconds"] = wall
        if len(arrived) < self.cfg.min_clients:
            stats["gram"] = None
            return None, stats
        t1 = time.perf_counter()
        delta, gram = merge_round(self._round_spec(arrived, round_idx), {t: taus[t] for t in arrived}, shapes,
                                  dtypes, compute_cosine=self.cfg.compute_cosine,
                                  merge_device=self.args.merge_device, accumulate=self.args.merge_accumulate_dtype)
        stats["gram"] = gram
        stats["merge_seconds"] = time.perf_counter() - t1
        return delta, stats

    @staticmethod
    def _add_train_metrics(stats: dict[str, Any], task: str, metrics: Mapping[str, Any]) -> None:
        stats["train_loss"][task] = float(metrics["loss"])
        stats["steps"] += int(metrics["steps"])
        stats["client_train_seconds"][task] = float(metrics["train-seconds"])

    def _train_secagg(self, node_ids: Sequence[int], round_idx: int) -> tuple[dict[str, Tensor] | None, dict[str, Any]]:
        assert self.grid is not None
        backbone = self._backbone()
        names = sorted(backbone)
        shapes = {n: t.shape for n, t in backbone.items()}
        configs = {nid: self._train_config(nid, round_idx) for nid in node_ids}
        t0 = time.perf_counter()
        mean_arrays, results, failures = run_secagg_round(self.grid, secagg_workflow(self.cfg), round_idx, configs)
        wall = time.perf_counter() - t0
        stats: dict[str, Any] = {"train_loss": {}, "steps": 0, "client_train_seconds": {}, "errors": {},
                                 "train_seconds": wall, "gram": None}
        arrived = []
        for nid, metrics in results:
            task = self.registry.task_of(nid)
            arrived.append(task)
            self._add_train_metrics(stats, task, metrics)
            stats.setdefault("secagg_clipped", {})[task] = int(metrics.get("secagg-clipped", 0))
        if failures:  # SecAgg+ reports failures without their node: keep the distinct reasons
            stats["errors"]["secagg"] = "; ".join(failures)[:600]
        arrived = sorted(arrived)
        stats["arrived"] = arrived
        if mean_arrays is None or len(arrived) < max(self.cfg.min_clients, 2):
            return None, stats
        t1 = time.perf_counter()
        mean = {n: torch.from_numpy(a.astype("float64")).reshape(shapes[n]) for n, a in zip(names, mean_arrays)}
        coeffs = [self._coefficient(t) for t in arrived]
        delta = secagg_delta(mean, self._round_spec(arrived, round_idx), len(arrived), coeffs)
        stats["merge_seconds"] = time.perf_counter() - t1
        return delta, stats

    def evaluate(self, node_ids: Sequence[int], round_idx: int, delta_record: ArrayRecord | None,
                 split: str = "validation") -> tuple[dict[str, float], dict[str, str], float]:
        """Send the round's merged delta (encoded) to nodes holding round ``round_idx - 1`` (``round_idx`` for
        round 0 / test evaluations), collect accuracy and heads. Returns (accuracy per task, errors, seconds)."""
        assert self.grid is not None
        versions = self.registry.versions
        msgs = []
        for nid in node_ids:
            content = RecordDict({REC_CONFIG: config_record(
                round=round_idx, split=split, task=self.registry.task_of(nid),
                **{"from-version": versions.get(nid, -1), "to-version": round_idx,
                   "downlink": json.dumps(self.downlink.to_dict()), "downlink-seed": self._down_seed(round_idx)},
            )})
            if delta_record is not None and versions.get(nid) == round_idx - 1:
                content[REC_DELTA] = delta_record
            msgs.append(Message(content, nid, MessageType.EVALUATE, group_id=f"eval-{round_idx}"))
        t0 = time.perf_counter()
        replies = list(self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout))
        seconds = time.perf_counter() - t0
        acc: dict[str, float] = {}
        errors: dict[str, str] = {}
        for m in replies:
            nid = int(m.metadata.src_node_id)
            task = self.registry.task_of(nid)
            if m.has_error():
                errors[task] = error_reason(m)
                continue
            try:
                info = m.content.config_records[REC_INFO]
                met = m.content.metric_records[REC_METRICS]
                versions[nid] = int(info["version"])
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
        present = dict(acc)
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
        node_of = self.registry.node_of()
        per_task_bytes = {}
        for t in self.tasks:
            nid = node_of.get(t)
            per_task_bytes[t] = {"down": self.grid.down.get(nid, 0) if nid is not None else 0,
                                 "up": self.grid.up.get(nid, 0) if nid is not None else 0}
        entry = HistoryEntry(
            round=k, accuracy=full_acc, mean_accuracy=mean, normalized_accuracy=norm,
            mean_normalized_accuracy=(sum(norm.values()) / len(norm)) if norm else None,
            cosine=cos, mean_cosine=mean_cos, tasks=list(self.tasks), split="validation",
            train_seconds=float(stats["train_seconds"]) if stats else 0.0,
            merge_seconds=float(stats.get("merge_seconds", 0.0)) if stats else 0.0,
            setup_seconds=float(stats.get("sync_seconds", 0.0)) if stats else 0.0,
            eval_seconds=eval_s,
            train_loss=dict(stats["train_loss"]) if stats else None,
            steps=int(stats["steps"]) if stats else 0,
            merged_tasks=arrived,
            missing_train=[t for t in self.tasks if t not in arrived] if stats else [],
            missing_eval=sorted(missing_eval),
            skipped=skipped,
            errors=dict(stats.get("errors", {})) if stats else {},
            clients={t: node_of.get(t) for t in self.tasks},
            client_train_seconds=dict(stats.get("client_train_seconds", {})) if stats else {},
            bytes=per_task_bytes,
            bytes_total={"down": int(sum(self.grid.down.values())), "up": int(sum(self.grid.up.values()))},
            secure_aggregation=bool(self.cfg.secure_aggregation),
            uplink=self.uplink.to_dict(),
            downlink=self.downlink.to_dict(),
            secagg_clipped=dict(stats["secagg_clipped"]) if stats and "secagg_clipped" in stats else None,
        )
        return entry.to_dict()

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

    def _start(self) -> None:
        """Round 0: sync every node and evaluate the starting model."""
        self.history = []
        t0 = time.perf_counter()
        synced = self.sync(sorted(self.registry.nodes), 0)
        sync_s = time.perf_counter() - t0
        acc, errors, eval_s = self.evaluate(synced, 0, None)
        entry = self._entry(0, acc, None, eval_s, [t for t in self.tasks if t not in acc], False)
        entry["setup_seconds"] = sync_s
        entry["errors"] = errors
        self._record(entry)

    def _apply_merged(self, delta: Mapping[str, Tensor], k: int) -> ArrayRecord:
        """Encode the merged delta for the downlink and apply its decoded form to the server's backbone (so
        server and nodes hold the same bits); returns the record sent."""
        record = encode_delta(delta, self.downlink, self._down_seed(k))
        backbone = self._backbone()
        shapes = {n: t.shape for n, t in backbone.items()}
        dtypes = {n: t.dtype for n, t in backbone.items()}
        apply_delta_(backbone, None, decode_delta(record, self.downlink, shapes, self._down_seed(k), dtypes))
        return record

    def _round(self, k: int) -> None:
        """Round `k`: re-sync stale nodes, train, merge, evaluate, record and checkpoint."""
        assert self.grid is not None
        self.grid.reset()
        self.refresh_nodes()
        t0 = time.perf_counter()
        self.sync(self.registry.not_holding(k - 1), k - 1)
        sync_s = time.perf_counter() - t0
        ready = self.registry.holding(k - 1)
        delta, stats = self.train(ready, k) if ready else (None, _empty_stats())
        stats["sync_seconds"] = sync_s
        if delta is not None:
            t1 = time.perf_counter()
            record = self._apply_merged(delta, k)
            stats["merge_seconds"] = stats.get("merge_seconds", 0.0) + time.perf_counter() - t1
        else:
            record = ArrayRecord()  # skipped round: the global model of round k is that of k-1
        acc, errors, eval_s = self.evaluate(self.registry.holding(k - 1), k, record)
        entry = self._entry(k, acc, stats, eval_s, [t for t in self.tasks if t not in acc], delta is None)
        entry["errors"].update({f"eval/{t}": r for t, r in errors.items()})
        self._record(entry)
        self._checkpoint(k)
        if delta is None:
            log.warning("round %d skipped: %d task vector(s) arrived, min_clients=%d", k,
                        len(stats["arrived"]), self.cfg.min_clients)

    def _evaluate_test(self) -> None:
        """After the last round: every node holding the final model reports its test accuracy."""
        assert self.grid is not None
        self.grid.reset()
        acc, _, _ = self.evaluate(self.registry.holding(self.cfg.rounds), self.cfg.rounds, None, split="test")
        self.test_metrics = {f"eval_{t}_accuracy": a for t, a in acc.items()}
        if acc:
            self.test_metrics["eval_mean_accuracy"] = sum(acc.values()) / len(acc)

    def run(self, grid: Grid) -> list[dict[str, Any]]:
        """Discover the nodes, then run (or resume) the rounds; returns the history."""
        self.grid = grid if isinstance(grid, MeteredGrid) else MeteredGrid(grid)
        self.grid.reset()
        self.discover()
        start = self._resume() if self.cfg.resume else -1
        if start < 0:
            self._start()
            start = 0
        for k in range(start + 1, self.cfg.rounds + 1):
            self._round(k)
        if self.cfg.eval_test:
            self._evaluate_test()
        return self.history

    def _record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        self.best_round = entry["round"]
        write_history(self.history, self.cfg.output_dir)
        missing = entry["missing_train"] or entry["missing_eval"]
        log.info("round %d: mean accuracy %.4f%s, bytes down %d up %d", entry["round"], entry["mean_accuracy"],
                 f", missing {missing}" if missing else "", entry["bytes_total"]["down"], entry["bytes_total"]["up"])
