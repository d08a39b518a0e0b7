"""Running federated ATM on one machine.

* :func:`run_flower_simulation`: Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend):
  one virtual SuperNode per task, the real ServerApp and ClientApp, messages through Flower's in-memory
  SuperLink. The same apps run unchanged under ``flwr run`` or on real SuperNodes (``docs/FEDERATED.md``).
* :func:`run_local`: the same ServerApp logic and ClientApp over :class:`LocalGrid`, an in-process Grid that
  delivers each message to the ClientApp directly (a deep copy of it, as serialization would), one node after
  the other; no Ray. For debugging and fast tests (fault drills included: :class:`NodeKilled`); same results
  as the simulation engine.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import Context, Message, Metadata, RecordDict
from flwr.app.error import Error
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from hf_atm.federated.config import FederatedATMConfig
from hf_atm.federated.protocol import Mod
from hf_atm.federated.steps import exchange
from hf_atm.federated.strategy import ATMStrategy

__all__ = ["LocalGrid", "NodeKilled", "run_flower_simulation", "run_local"]

log = logging.getLogger("hf_atm.federated")

class NodeKilled(Exception):  # noqa: N818 - a fault, not an error of the caller
    """Raised by a fault mod (``tests/federated_faults.py``) for a node that dies while handling a message.

    In :class:`LocalGrid` the node then never answers again (it stays in ``get_node_ids`` until
    :meth:`LocalGrid.disconnect`, as a SuperLink lists a killed node until its heartbeat times out):
    ``sending=False`` (killed on receipt or while training): no reply at all; ``sending=True`` (killed while
    pushing its reply): the reply is announced but never completes, so pulling it blocks for `seconds`, as
    Flower's pull of a reply whose arrays never arrive retries for up to two hours, then returns Flower's
    "unavailable" error. Anywhere else (Flower's simulation engine) it is an ordinary ClientApp exception."""

    def __init__(self, sending: bool = False, seconds: float = 3600.0) -> None:
        super().__init__(f"injected fault: node killed while {'sending its reply' if sending else 'training'}")
        self.sending = sending
        self.seconds = float(seconds)


class LocalGrid(Grid):
    """An in-process Grid: nodes ``1000, 1001, ...`` each run `client_app` with their own persistent Context
    (``node_config`` e.g. ``{"partition-id": i}``).

    ``push_messages`` delivers every message in turn, in this thread (the ClientApps run one after the other,
    so results are deterministic); ``pull_messages`` hands out the replies. Nodes are modelled as running in
    parallel: a reply whose own handling took longer than its message's ``ttl`` is replaced by Flower's
    "expired" error (as the SuperLink does). An exception in the ClientApp becomes an error reply;
    :class:`NodeKilled` makes the node dead (see there). :meth:`add_node` / :meth:`disconnect` let tests
    join, restart (a new node id with the same node config) and remove nodes."""

    def __init__(self, client_app: Any, node_configs: Sequence[Mapping[str, Any]],
                 run_config: Mapping[str, Any] | None = None, run_id: int | None = None) -> None:
        self.client_app = client_app
        # default: a random id below 2**63 per grid, as Flower's simulation draws one: node state on disk is
        # kept per (node id, run id), and node ids repeat in every LocalGrid, so a fixed id would leak state
        self.run_id = int(run_id) if run_id is not None else uuid.uuid4().int >> 65
        self.run_config = dict(run_config or {})
        self.contexts: dict[int, Context] = {}
        self.disconnected: set[int] = set()
        self.dead: set[int] = set()
        self._replies: dict[str, Message | None] = {}
        self._stalled: dict[str, float] = {}  # replies that never complete: seconds their pull blocks
        for nc in node_configs:
            self.add_node(nc)

    def add_node(self, node_config: Mapping[str, Any]) -> int:
        """Connect a new node (fresh Context and state) with `node_config`; returns its id."""
        nid = max([999, *self.contexts]) + 1
        self.contexts[nid] = Context(run_id=self.run_id, node_id=nid, node_config=dict(node_config),
                                     state=RecordDict(), run_config=dict(self.run_config))
        return nid

    def disconnect(self, node_id: int) -> None:
        """The node leaves the grid (no longer in ``get_node_ids``; messages to it get no reply)."""
        self.disconnected.add(int(node_id))

    # Grid API
    def set_run(self, run: Any) -> None:
        self.run_id = int(getattr(run, "run_id", run))

    @property
    def run(self) -> Any:
        return type("Run", (), {"run_id": self.run_id})()

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [nid for nid in self.contexts if nid not in self.disconnected]

    def _deliver(self, msg: Message, message_id: str) -> Message | None:
        """Run the node's ClientApp on `msg`: its reply, or None (no reply: the node is gone or dead)."""
        nid = int(msg.metadata.dst_node_id)
        if nid not in self.contexts or nid in self.disconnected or nid in self.dead:
            return None
        incoming = self._as_delivered(msg, message_id)
        t0 = time.monotonic()
        try:
            reply = self.client_app(incoming, self.contexts[nid])
        except NodeKilled as e:
            log.info("node %s killed (%s)", nid, "while sending" if e.sending else "before replying")
            self.dead.add(nid)
            if not e.sending:
                return None
            # what Flower's pull returns once it gives up on the reply's arrays (after `seconds`)
            self._stalled[message_id] = e.seconds
            return Message(Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason="reply objects unavailable"),
                           reply_to=incoming)
        except Exception as e:  # noqa: BLE001 - a failing node must not stop the server (as in Flower)
            log.info("node %s raised: %s", nid, e)
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e).__name__}: {e}"),
                            reply_to=incoming)
        if time.monotonic() - t0 > msg.metadata.ttl:
            log.info("node %s replied after the message's %.1fs ttl: expired", nid, msg.metadata.ttl)
            return Message(Error(code=ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                                 reason="Error: Reply Message Unavailable - The reply message has expired."),
                           reply_to=incoming)
        if reply.has_content():  # the server gets its own copy too
            reply = Message(content=copy.deepcopy(reply.content), metadata=reply.metadata)
        return reply

    def _as_delivered(self, msg: Message, message_id: str) -> Message:
        """The message as the node receives it from a SuperLink: its own copy of the content (as after
        (de)serialization: records must not be shared between nodes), with the run id, the server as its
        source and its pushed `message_id` in its metadata. A reply built with ``Message(..., reply_to=it)``
        then comes from the node and points back at it."""
        md = msg.metadata
        metadata = Metadata(run_id=self.run_id, message_id=message_id, src_node_id=0,
                            dst_node_id=md.dst_node_id, reply_to_message_id=md.reply_to_message_id,
                            group_id=md.group_id, created_at=md.created_at, ttl=md.ttl,
                            message_type=md.message_type)
        return Message(content=copy.deepcopy(msg.content), metadata=metadata)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            key = uuid.uuid4().hex
            self._replies[key] = self._deliver(m, key)
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for key in message_ids:
            if key in self._stalled:  # announced, never completed: Flower's pull retries, then gives up
                time.sleep(self._stalled.pop(key))
            reply = self._replies.pop(key, None)
            if reply is not None:
                out.append(reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return exchange(self, messages, timeout).all_replies()


def _num_tasks(config: FederatedATMConfig) -> int:
    if config.tasks is not None:
        return len(config.tasks)
    from hf_atm.federated.data import load_task_data

    return len(load_task_data(config)[0])


def run_local(config: FederatedATMConfig, num_nodes: int | None = None,
              node_configs: Sequence[Mapping[str, Any]] | None = None,
              client_mods: Sequence[Mod] | None = None) -> ATMStrategy:
    """Run federated ATM in this process over a :class:`LocalGrid` (``partition-id`` i for node i, one node per
    task by default); `client_mods` wrap every ClientApp handler (:func:`make_client_app`'s ``mods``).
    Returns the finished strategy (history, model)."""
    from hf_atm.federated.client import make_client_app
    from hf_atm.federated.server import run_federated

    if node_configs is None:
        n = num_nodes or _num_tasks(config)
        node_configs = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    grid = LocalGrid(make_client_app(config, mods=client_mods), node_configs)
    return run_federated(grid, config)


def run_flower_simulation(config: FederatedATMConfig, num_supernodes: int | None = None,
                          backend_config: Mapping[str, Any] | None = None, verbose: bool = False,
                          client_mods: Sequence[Mod] | None = None) -> list[dict]:
    """Run federated ATM in Flower's simulation engine (Ray): `num_supernodes` virtual nodes (default one per
    task), each ClientApp with ``client_resources`` from `backend_config` (default 1 CPU, no GPU) and
    `client_mods` around its handlers (picklable, importable by the actors). Returns the history (also in
    ``config.output_dir``). Exceptions of the ServerApp propagate."""
    from flwr.simulation import run_simulation

    from hf_atm.atm.history import load_history
    from hf_atm.federated.client import make_client_app
    from hf_atm.federated.server import make_server_app

    n = num_supernodes or _num_tasks(config)
    if config.num_clients is None:
        config = copy.copy(config)
        config.num_clients = n
    bc: dict[str, Any] = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"log_to_driver": verbose}}
    for k, v in (backend_config or {}).items():
        bc[k] = {**bc.get(k, {}), **v} if isinstance(v, Mapping) else v
    run_simulation(server_app=make_server_app(config), client_app=make_client_app(config, mods=client_mods), num_supernodes=n,
                   backend_config=bc, verbose_logging=verbose)
    return load_history(config.output_dir)
