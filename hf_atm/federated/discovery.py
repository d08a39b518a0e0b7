"""Node discovery: wait for the nodes, hello them, and keep which node holds which task and which round.

The registry maps every connected node of the run to its task and to the round whose global model it
acknowledged holding (a node without one is synced with the full backbone before it trains)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from hf_atm.errors import TaskDataError
from hf_atm.federated.protocol import (
    ACTION_HELLO,
    PROTOCOL,
    REC_CONFIG,
    REC_INFO,
    config_record,
    error_reason,
)

__all__ = ["NodeInfo", "NodeRegistry", "hello", "task_labels", "wait_for_nodes"]

log = logging.getLogger("hf_atm.federated")


@dataclass
class NodeInfo:
    """What a node told the server in its hello."""

    node_id: int
    task: str
    labels: list[str]
    num_train: int
    num_validation: int
    version: int


def hello(grid: Grid, node_ids: Sequence[int], timeout: float) -> dict[int, NodeInfo]:
    """Send the hello QUERY to `node_ids`; ``{node id: NodeInfo}`` of the nodes that answered in `timeout`
    seconds (a node that fails is logged and left out)."""
    msgs = [Message(RecordDict({REC_CONFIG: config_record(action=ACTION_HELLO, protocol=PROTOCOL)}), nid,
                    MessageType.QUERY, group_id="hello") for nid in node_ids]
    out: dict[int, NodeInfo] = {}
    for m in grid.send_and_receive(msgs, timeout=timeout):
        nid = int(m.metadata.src_node_id)
        if m.has_error():
            log.warning("node %s failed hello: %s", nid, error_reason(m))
            continue
        info = m.content.config_records[REC_INFO]
        out[nid] = NodeInfo(node_id=nid, task=str(info["task"]), labels=[str(x) for x in info["labels"]],
                            num_train=int(info["num-train"]), num_validation=int(info["num-validation"]),
                            version=int(info["version"]))
    return out


def wait_for_nodes(grid: Grid, want: int | None, startup_timeout: float, min_clients: int) -> list[int]:
    """The ids of the connected nodes once `want` of them are there (`want` None: once some are there and none
    joined for 2 s); after `startup_timeout` seconds those present, if at least `min_clients` (else
    TaskDataError)."""
    t0 = time.monotonic()
    last, last_change = -1, t0
    while True:
        ids = sorted(int(i) for i in grid.get_node_ids())
        now = time.monotonic()
        if len(ids) != last:
            last, last_change = len(ids), now
        if want is not None and len(ids) >= want:
            return ids
        if want is None and ids and now - last_change >= 2.0:
            return ids
        if now - t0 >= startup_timeout:
            if len(ids) < min_clients:
                raise TaskDataError(f"only {len(ids)} node(s) connected after startup_timeout={startup_timeout}s; "
                                    f"min_clients={min_clients}")
            return ids
        time.sleep(0.2)


def task_labels(infos: Mapping[int, NodeInfo], tasks: Sequence[str]) -> dict[str, list[str]]:
    """``{task: label names}`` of `tasks` as the nodes reported them (TaskDataError when a task is reported
    with two label sets or by no node)."""
    labels: dict[str, list[str]] = {}
    for info in infos.values():
        if info.task in tasks:
            if info.task in labels and labels[info.task] != info.labels:
                raise TaskDataError(f"task {info.task!r} is reported with two label sets")
            labels[info.task] = info.labels
    missing = [t for t in tasks if t not in labels]
    if missing:
        raise TaskDataError(f"no connected node holds task(s) {missing}; cannot build their heads")
    return {t: labels[t] for t in tasks}


class NodeRegistry:
    """The connected nodes that hold a task of the run (``nodes``) and the round whose global model each one
    acknowledged holding (``versions``; absent: none, the node must be synced)."""

    def __init__(self) -> None:
        self.nodes: dict[int, NodeInfo] = {}
        self.versions: dict[int, int] = {}

    def task_of(self, node_id: int) -> str:
        """The task of a registered node; ``node-<id>`` for a node that is not (or no longer) registered."""
        info = self.nodes.get(node_id)
        return info.task if info is not None else f"node-{node_id}"

    def node_of(self) -> dict[str, int]:
        """``{task: node id}`` of the registered nodes."""
        return {i.task: nid for nid, i in self.nodes.items()}

    def holding(self, version: int) -> list[int]:
        """The registered nodes (sorted) that hold the global model of round `version`."""
        return [nid for nid in sorted(self.nodes) if self.versions.get(nid) == version]

    def not_holding(self, version: int) -> list[int]:
        """The registered nodes (sorted) that do not hold the global model of round `version`."""
        return [nid for nid in sorted(self.nodes) if self.versions.get(nid) != version]

    def assign(self, infos: Mapping[int, NodeInfo], tasks: Sequence[str],
               labels: Mapping[str, list[str]]) -> list[NodeInfo]:
        """Register the nodes of `infos` that hold a task of the run (`tasks`, with their `labels`) that no
        connected node holds yet; returns those registered. A node of a foreign task is ignored; a second node
        for a held task, or a node with other labels, is a TaskDataError."""
        held = {i.task for i in self.nodes.values()}
        added = []
        for nid in sorted(infos):
            info = infos[nid]
            if info.task not in tasks:
                log.warning("node %s holds task %r, which is not part of this run: ignored", nid, info.task)
                continue
            if info.task in held:
                raise TaskDataError(f"task {info.task!r} is held by two nodes ({nid} and another); "
                                    "each task must live on exactly one node")
            if info.labels != list(labels[info.task]):
                raise TaskDataError(f"node {nid}: task {info.task!r} labels {info.labels} differ from the run's "
                                    f"{list(labels[info.task])}")
            self.nodes[nid] = info
            held.add(info.task)
            added.append(info)
        return added

    def drop_departed(self, connected: Iterable[int]) -> None:
        """Forget the registered nodes that are not in `connected` (they left the grid)."""
        ids = {int(i) for i in connected}
        for nid in list(self.nodes):
            if nid not in ids:
                log.warning("node %s (task %r) left", nid, self.nodes[nid].task)
                del self.nodes[nid]
                self.versions.pop(nid, None)
