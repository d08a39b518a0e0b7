"""Node discovery: wait for the nodes, hello them, and keep which node holds which task and which round.

The registry maps every connected node of the run to its task and to the round whose global model it
acknowledged holding (a node without one is synced with the full backbone before it trains); its
membership rule (first claimant keeps a task while connected; a second claimant is refused for that node
and stands by) is in :class:`NodeRegistry`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from flwr.app import MessageType, RecordDict
from flwr.serverapp import Grid

from hf_atm.errors import TaskDataError
from hf_atm.federated.protocol import ACTION_HELLO, PROTOCOL, REC_CONFIG, REC_INFO, config_record
from hf_atm.federated.steps import StepResult, exchange, step_message

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


def hello(grid: Grid, node_ids: Sequence[int], timeout: float) -> tuple[dict[int, NodeInfo], StepResult]:
    """Send the hello QUERY to `node_ids` (a deadline-bounded step, :func:`hf_atm.federated.steps.exchange`);
    returns ``({node id: NodeInfo} of the nodes that answered, the step's result)``. A node that fails is
    logged and left out."""
    msgs = [step_message(RecordDict({REC_CONFIG: config_record(action=ACTION_HELLO, protocol=PROTOCOL)}), nid,
                         MessageType.QUERY, "hello", timeout) for nid in node_ids]
    step = exchange(grid, msgs, timeout)
    out: dict[int, NodeInfo] = {}
    for nid, m in step.replies.items():
        try:
            info = m.content.config_records[REC_INFO]
            theirs = int(info.get("protocol", 0))  # a node older than the protocol field speaks protocol 0
            if theirs != PROTOCOL:  # refused for this node only: its messages would not parse, or mean else
                step.errors[nid] = (f"node protocol {theirs} != server protocol {PROTOCOL}: install the same "
                                    "hf_atm version on the server and every node")
                continue
            out[nid] = NodeInfo(node_id=nid, task=str(info["task"]), labels=[str(x) for x in info["labels"]],
                                num_train=int(info["num-train"]), num_validation=int(info["num-validation"]),
                                version=int(info["version"]))
        except (KeyError, TypeError, ValueError) as e:
            step.errors[nid] = f"bad hello reply: {e}"
    for nid, reason in sorted(step.errors.items()):
        if nid not in out:
            log.warning("node %s failed hello: %s", nid, reason)
    return out, step


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


def task_labels(infos: Mapping[int, NodeInfo], tasks: Sequence[str],
                known: Mapping[str, list[str]] | None = None) -> dict[str, list[str]]:
    """``{task: label names}`` for the tasks of `tasks` that `known` lacks, as the node with the lowest id
    among `infos` reports them (a later claimant with other labels is refused by :meth:`NodeRegistry.assign`,
    never the run)."""
    known = known or {}
    out: dict[str, list[str]] = {}
    for nid in sorted(infos):
        info = infos[nid]
        if info.task in tasks and info.task not in known and info.task not in out:
            out[info.task] = list(info.labels)
    return out


class NodeRegistry:
    """The nodes of the run: who holds which task (``nodes``), which round's global model each holder
    acknowledged (``versions``; absent: none, the node is synced before it trains), the claimants kept in
    reserve (``standby``) and every node that answered a hello (``seen``).

    Membership rule: a task is held by the first node that claims it while that node stays connected; a
    second claimant is *refused* for that node (logged, reported by :meth:`assign`, the run goes on) and kept
    in ``standby``. When the holder leaves the grid (:meth:`drop_departed`), the standby claimant with the
    lowest node id takes the task over, and a new claimant can take it at its hello; either way it holds no
    round yet, so it is synced with the current global model before it trains."""

    def __init__(self) -> None:
        self.nodes: dict[int, NodeInfo] = {}
        self.versions: dict[int, int] = {}
        self.standby: dict[int, NodeInfo] = {}
        self.seen: set[int] = set()

    def task_of(self, node_id: int) -> str:
        """The task of a registered (or standby) node; ``node-<id>`` for a node that is neither."""
        info = self.nodes.get(node_id) or self.standby.get(node_id)
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
               labels: Mapping[str, list[str]]) -> tuple[list[NodeInfo], dict[str, str]]:
        """Register the nodes of `infos` that claim a task of the run (`tasks`) that no registered node holds.
        Returns ``(the nodes registered, {task: why a claimant was refused})``: a second claimant of a held
        task (kept in ``standby``), a claimant whose labels differ from the run's `labels` for that task. A
        node of a task outside the run is ignored (logged)."""
        held = {i.task: nid for nid, i in self.nodes.items()}
        added: list[NodeInfo] = []
        refused: dict[str, str] = {}
        for nid in sorted(infos):
            info = infos[nid]
            self.seen.add(nid)
            if info.task not in tasks:
                log.warning("node %s holds task %r, which is not part of this run (tasks %s): ignored", nid,
                            info.task, list(tasks))
                continue
            known = labels.get(info.task)
            if known is not None and info.labels != list(known):
                refused[info.task] = (f"node {nid} refused: its labels {info.labels} differ from the run's "
                                      f"{list(known)}")
            elif info.task in held and held[info.task] != nid:
                refused[info.task] = (f"node {nid} refused: task {info.task!r} is held by node {held[info.task]} "
                                      "(first claimant keeps it while connected; this node stands by)")
                self.standby[nid] = info
            else:
                self.nodes[nid] = info
                self.standby.pop(nid, None)
                held[info.task] = nid
                added.append(info)
                continue
            log.warning("%s", refused[info.task])
        return added, refused

    def drop_departed(self, connected: Iterable[int]) -> list[NodeInfo]:
        """Forget the nodes that are not in `connected` (they left the grid); a standby claimant of a task left
        without its holder takes it over. Returns the nodes that took a task over (to be synced)."""
        ids = {int(i) for i in connected}
        for nid in list(self.nodes):
            if nid not in ids:
                log.warning("node %s (task %r) left", nid, self.nodes[nid].task)
                del self.nodes[nid]
                self.versions.pop(nid, None)
        for nid in [n for n in self.standby if n not in ids]:
            del self.standby[nid]
        self.seen &= ids
        held = {i.task for i in self.nodes.values()}
        promoted = []
        for nid in sorted(self.standby):
            info = self.standby[nid]
            if info.task not in held:
                log.warning("node %s takes over task %r (its holder left)", nid, info.task)
                self.nodes[nid] = self.standby.pop(nid)
                held.add(info.task)
                promoted.append(info)
        return promoted
