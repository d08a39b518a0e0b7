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
(:mod:`hf_atm.federated.secagg`): the server only learns the mean over the nodes that arrived. That train
step is 4-5 workflow stages (setup, share keys, collect masked vectors, unmask), each a step of its own bounded
by ``round_timeout``: a SecAgg+ train step can take up to about 5 x ``round_timeout``.

Every step is one deadline-bounded push / pull (:func:`hf_atm.federated.steps.exchange`): a node that fails,
errors, or does not answer within ``round_timeout`` (dead before receiving, while training, or while sending
its reply) makes its task *missing* for the step; the run goes on, ``history.json`` lists who was missing and
why (errors keyed by task), and each step logs one INFO line (round, step, nodes answered / missing,
seconds). Membership (who holds which task, refused second claimants, late and restarted nodes) is
:class:`~hf_atm.federated.discovery.NodeRegistry`'s rule; nodes never heard from are hello'd every round. Bytes per node and direction are counted on every message
(:class:`~hf_atm.federated.metering.MeteredGrid`). After each round the server writes ``checkpoint-round-{k}``
(:mod:`hf_atm.federated.checkpoints`) and a restarted server resumes from the last one (``resume``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from hf_atm.atm.collector import merge_round, round_spec
from hf_atm.atm.evaluation import cosine_from_gram, mean_off_diagonal, normalized_accuracy
from hf_atm.atm.history import HistoryEntry, write_history
from hf_atm.atm.model import saved_tasks
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
from hf_atm.federated.data import task_names
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
)
from hf_atm.federated.secagg import run_secagg_round, secagg_delta, secagg_workflow
from hf_atm.federated.steps import StepResult, exchange, step_message
from hf_atm.merging.spec import MergeSpec, tensor_seed

__all__ = ["ATMStrategy", "saved_model_option"]

log = logging.getLogger("hf_atm.federated")


def saved_model_option(model: str, output_dir: str | os.PathLike) -> str:
    """The ``model`` option as the files in `output_dir` record it, with no absolute local path in them: ``""``
    for the bundled text backbone (what an empty ``model`` resolves to,
    :func:`hf_atm.federated.config.resolve_model_option`), a local folder relative to `output_dir`, anything
    else (a Hub repo id) as given."""
    from hf_atm.backbones import text_backbone_path

    try:
        bundled = text_backbone_path()
    except CheckpointError:  # not installed: `model` cannot be it
        bundled = None
    if bundled is not None and str(model) == bundled:
        return ""
    if Path(model).exists():
        return os.path.relpath(Path(model).absolute(), Path(output_dir).absolute())
    return str(model)


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
        on_record: called with each round's history entry once it is recorded (and written to
            ``history.json``); the ServerApp rewrites ``run_status.json`` with it.

    After :meth:`run`: ``history`` (one dict per round, round 0 = the starting model: ATMTrainer's keys plus
    ``missing_train``, ``missing_eval``, ``merged_tasks``, ``skipped``, ``bytes``, ``bytes_total``,
    ``clients``), ``model`` (the final MultiTaskModel), ``test_metrics`` (with ``eval_test``).
    """

    def __init__(self, config: FederatedATMConfig, model_factory: Callable[[dict[str, list[str]]], Any],
                 processing_class: Any | None = None,
                 on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg = config
        self.on_record = on_record
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
        self.round_idx = 0
        self.round_errors: dict[str, str] = {}  # sync / hello / membership errors of the round being run
        # nodes whose hello failed (an error, not silence: e.g. another protocol): not hello'd again in
        # discovery, each one a fresh ClientApp process on the node; the next round's hello retries them
        self.hello_failed: set[int] = set()
        self.planned_tasks: list[str] | None = None  # the task list known before any hello (see discover)

    # -- discovery ----------------------------------------------------------------------------------------
    def _hello(self, node_ids: Sequence[int], timeout: float | None = None) -> dict[int, NodeInfo]:
        assert self.grid is not None
        # A node answers its first hello only after loading its task's data (and, in the simulation engine, after
        # its actor has imported torch): that is a step's work, so it gets a step's timeout, not startup_timeout
        # (seen: four nodes sharing one Ray CPU on a busy 2-core machine needed more than 120 s).
        infos, step = hello(self.grid, node_ids, timeout or self.cfg.round_timeout)
        self._log_step("hello", step, len(node_ids))
        for nid in [*step.missing, *step.errors]:
            if nid not in infos:
                self.round_errors[f"hello/node-{nid}"] = step.errors.get(nid) or "no reply in time"
        self.hello_failed.update(n for n in step.errors if n not in infos)
        return infos

    def _assign(self, infos: Mapping[int, NodeInfo]) -> None:
        """Register the new nodes of `infos` (membership rule: :class:`NodeRegistry`), give a task that joins
        late its head, and note the example counts; refused claims go into the round's errors."""
        for nid in infos:  # a node that answered a retried hello is no longer an error of this round
            self.round_errors.pop(f"hello/node-{nid}", None)
        new = task_labels(infos, self.tasks, self.labels)
        if new and self.model is not None:
            self._add_heads(new)
        added, refused = self.registry.assign(infos, self.tasks, self.labels)
        for info in added:
            self.num_examples[info.task] = info.num_train
        self.round_errors.update({f"claim/{t}": why for t, why in refused.items()})

    def _add_heads(self, new: Mapping[str, list[str]]) -> None:
        """A task of the run whose node answered only now: rebuild the model with its head (seeded by
        ``(head_seed, task)`` as every head) and keep the current backbone and heads."""
        labels = {t: ({**self.labels, **new})[t] for t in self.tasks if t in self.labels or t in new}
        model = self.model_factory(dict(labels))
        model.backbone.load_state_dict(self.model.backbone.state_dict())
        model.load_heads(self.model, tasks=list(self.labels))
        log.warning("task(s) %s joined the run late: head(s) added", sorted(new))
        self.model, self.labels = model, labels

    def _complete(self, infos: Mapping[int, NodeInfo]) -> bool:
        """Whether discovery has every task it waits for: the planned task list, else `num_clients` tasks."""
        seen = {i.task for i in infos.values()}
        if self.planned_tasks is not None:
            return set(self.planned_tasks) <= seen
        return self.cfg.num_clients is None or len(seen) >= self.cfg.num_clients

    def _planned_tasks(self, state: Mapping[str, Any]) -> list[str] | None:
        """The run's task list as known before any hello: ``tasks``; else, on resume, the checkpoint's; else
        a suite's task list (``data = "suite:<name>"``) when ``num_clients`` is unset or at least its size (the
        run then wants every task of the suite: the app's default, ``num-clients = 4`` of the 4 text tasks);
        else None: a data function, or fewer nodes than the suite has tasks (which of them is the nodes' choice),
        and the tasks the nodes report by the end of discovery make the list."""
        if self.cfg.tasks is not None:
            return sorted(self.cfg.tasks)
        if state.get("fingerprint", {}).get("tasks"):
            return list(state["fingerprint"]["tasks"])
        suite = task_names(self.cfg)
        if suite and (self.cfg.num_clients is None or self.cfg.num_clients >= len(suite)):
            return sorted(suite)
        return None

    def discover(self) -> None:
        """Round 0: wait for the nodes, hello them (again, until `startup_timeout`, for nodes that did not answer
        and nodes that join meanwhile; not a node whose hello failed), fix the task list and build the model.

        The run's task list (:meth:`_planned_tasks`): ``tasks`` when configured; else, on resume, the
        checkpoint's; else a suite's whole task list when ``num_clients`` is unset or at least the suite's size;
        else the tasks the nodes reported by the end of discovery. A task of a planned list whose node is not
        there yet gets its head when its node answers a later hello. Without a planned list a node that was
        down at the first hello cannot join later with a new task: ``startup_timeout`` running out with fewer
        than ``num_clients`` tasks is a WARNING that names ``tasks`` as the fix."""
        assert self.grid is not None
        t_end = time.monotonic() + self.cfg.startup_timeout
        checkpoint = latest_checkpoint(self.cfg.output_dir) if self.cfg.resume else None
        state = load_checkpoint_state(checkpoint) if checkpoint is not None else {}
        self.planned_tasks = self._planned_tasks(state)
        want = self.cfg.num_clients or (len(self.planned_tasks) if self.planned_tasks else None)
        ids = wait_for_nodes(self.grid, want, self.cfg.startup_timeout, self.cfg.min_clients)
        infos = self._hello(ids)
        while not self._complete(infos) and time.monotonic() < t_end:
            time.sleep(1.0)
            again = [int(n) for n in self.grid.get_node_ids() if int(n) not in infos
                     and int(n) not in self.hello_failed]
            if again:
                infos.update(self._hello(again, min(self.cfg.round_timeout, max(1.0, t_end - time.monotonic()))))
        tasks = self.planned_tasks or sorted({i.task for i in infos.values()})
        if not tasks:
            raise TaskDataError("no node answered the hello: no task to train")
        if not self._complete(infos):
            held = sorted({i.task for i in infos.values()})
            if self.planned_tasks is not None:
                log.warning("after startup_timeout=%ss the nodes hold tasks %s of %s; the others join when their "
                            "node answers a later round's hello", self.cfg.startup_timeout, held, tasks)
            else:
                log.warning("after startup_timeout=%ss the nodes hold %d task(s) %s of num_clients=%s: the run "
                            "goes on with these, and a node that joins later with another task is ignored; set "
                            "`tasks` (the run config key `tasks`, e.g. \"a,b,c\") so that late nodes can join",
                            self.cfg.startup_timeout, len(held), held, self.cfg.num_clients)
        self.tasks = tasks
        known = saved_tasks(checkpoint) if checkpoint is not None else {}
        known.update(task_labels(infos, tasks, known))
        self.labels = {t: known[t] for t in tasks if t in known}
        if not self.labels:
            raise TaskDataError(f"no node of the run's tasks {tasks} answered the hello: no head to build")
        self.model = self.model_factory(dict(self.labels))
        self._assign(infos)
        self.base_spec = self.args.merge_spec(len(tasks))

    def refresh_nodes(self) -> None:
        """Forget nodes that left the grid (a standby claimant takes over their task); hello the node ids never
        heard from (newcomers, restarted nodes, nodes that missed a hello) and register their claims."""
        assert self.grid is not None
        ids = {int(i) for i in self.grid.get_node_ids()}
        for info in self.registry.drop_departed(ids):  # a node that takes a task over trains only once synced
            self.registry.versions.pop(info.node_id, None)
        self.hello_failed.clear()  # a new round: their hello is retried once
        new = sorted(ids - self.registry.seen)
        if new:
            self._assign(self._hello(new))

    def _log_step(self, kind: str, step: StepResult, sent: int, arrived: Sequence[str] | None = None) -> None:
        """The one INFO line per step: round, step kind, nodes answered / missing (by task), seconds."""
        bad = sorted({self.registry.task_of(n) for n in [*step.missing, *step.errors]})
        answered = len(arrived) if arrived is not None else len(step.replies)
        log.info("round %d %s: %d/%d node(s) answered%s, %.1fs", self.round_idx, kind, answered, sent,
                 f", missing {bad}" if bad else "", step.seconds)

    def _step_errors(self, step: StepResult) -> dict[str, str]:
        """``{task: reason}`` of the nodes of `step` that failed or did not answer, keyed by the task of the node
        the message was sent to (Flower's own error replies come from node 1)."""
        out = {self.registry.task_of(n): r for n, r in step.errors.items()}
        for n in step.missing:
            out[self.registry.task_of(n)] = f"no reply within round_timeout={self.cfg.round_timeout}s"
        return out

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
            return float(self.num_examples.get(task, 0))
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
            msgs.append(step_message(content, nid, MessageType.QUERY, f"sync-{version}", self.cfg.round_timeout))
        step = exchange(self.grid, msgs, self.cfg.round_timeout)
        ok = []
        for nid, m in step.replies.items():
            try:
                self.registry.versions[nid] = int(m.content.config_records[REC_INFO]["version"])
            except (KeyError, TypeError, ValueError) as e:
                step.errors[nid] = f"bad reply: {e}"
                continue
            if self.registry.versions[nid] == version:
                ok.append(nid)
        self._log_step("sync", step, len(msgs), ok)
        for task, reason in self._step_errors(step).items():
            log.warning("node of %r failed sync to round %d: %s", task, version, reason)
            self.round_errors[f"sync/{task}"] = reason
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
        msgs = [step_message(RecordDict({REC_CONFIG: ConfigRecord(self._train_config(nid, round_idx))}), nid,
                             MessageType.TRAIN, str(round_idx), self.cfg.round_timeout) for nid in node_ids]
        step = exchange(self.grid, msgs, self.cfg.round_timeout)
        wall = step.seconds
        taus: dict[str, dict[str, Tensor]] = {}
        stats: dict[str, Any] = {"train_loss": {}, "steps": 0, "client_train_seconds": {},
                                 "errors": self._step_errors(step)}
        for nid, m in sorted(step.replies.items()):
            task = self.registry.task_of(nid)
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
        self._log_step("train", step, len(msgs), arrived)
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
        lost = sorted(self.registry.task_of(n) for n in node_ids if self.registry.task_of(n) not in arrived)
        log.info("round %d train (SecAgg+): %d/%d node(s) answered%s, %.1fs", round_idx, len(arrived),
                 len(node_ids), f", missing {lost}" if lost else "", wall)
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
            msgs.append(step_message(content, nid, MessageType.EVALUATE, f"eval-{round_idx}", self.cfg.round_timeout))
        step = exchange(self.grid, msgs, self.cfg.round_timeout)
        seconds = step.seconds
        acc: dict[str, float] = {}
        errors = self._step_errors(step)
        for nid, m in sorted(step.replies.items()):
            task = self.registry.task_of(nid)
            try:
                info = m.content.config_records[REC_INFO]
                met = m.content.metric_records[REC_METRICS]
                versions[nid] = int(info["version"])
                if split == "validation":
                    self._set_head(task, record_to_tensors(m.content.array_records[REC_HEAD]))
                acc[task] = float(met["correct"]) / max(1.0, float(met["total"]))
            except (KeyError, CheckpointError) as e:
                errors[task] = f"bad reply: {e}"
        self._log_step("eval" if split == "validation" else f"eval-{split}", step, len(msgs), sorted(acc))
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
                "weighting": self.cfg.weighting, "seed": self.cfg.seed,
                "model": saved_model_option(self.cfg.model, self.cfg.output_dir),
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
        saved_fp = dict(state.get("fingerprint") or {})
        if saved_fp.get("model") == str(self.cfg.model):  # written before the model was stored portably
            saved_fp["model"] = expected["model"]
        if saved_fp != expected:
            raise CheckpointError(f"{path} was written by a different federated ATM setup: "
                                  f"{state.get('fingerprint')} != {expected}")
        self.model.load_backbone_weights(path)
        saved = saved_tasks(path)  # a task that joined after this checkpoint keeps its fresh head
        self.model.load_heads(path, tasks=[t for t in self.model.tasks if t in saved])
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
        entry["errors"] = {**self.round_errors, **errors}
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
        self.round_idx, self.round_errors = k, {}
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
        entry["errors"] = {**self.round_errors, **entry["errors"], **{f"eval/{t}": r for t, r in errors.items()}}
        self._record(entry)
        self._checkpoint(k)
        if delta is None:
            log.warning("round %d skipped: %d task vector(s) arrived, min_clients=%d", k,
                        len(stats["arrived"]), self.cfg.min_clients)

    def _evaluate_test(self) -> None:
        """After the last round: every node holding the final model reports its test accuracy."""
        assert self.grid is not None
        self.grid.reset()
        self.round_idx = self.cfg.rounds
        acc, _, _ = self.evaluate(self.registry.holding(self.cfg.rounds), self.cfg.rounds, None, split="test")
        self.test_metrics = {f"eval_{t}_accuracy": a for t, a in acc.items()}
        if acc:
            self.test_metrics["eval_mean_accuracy"] = sum(acc.values()) / len(acc)

    def run(self, grid: Grid) -> list[dict[str, Any]]:
        """Discover the nodes, then run (or resume) the rounds; returns the history."""
        self.grid = grid if isinstance(grid, MeteredGrid) else MeteredGrid(grid)
        self.grid.reset()
        self.round_idx, self.round_errors = 0, {}
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
        if self.on_record is not None:
            self.on_record(entry)
        missing = entry["missing_train"] or entry["missing_eval"]
        log.info("round %d: mean accuracy %.4f%s, bytes down %d up %d", entry["round"], entry["mean_accuracy"],
                 f", missing {missing}" if missing else "", entry["bytes_total"]["down"], entry["bytes_total"]["up"])
