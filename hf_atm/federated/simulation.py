"""Running federated ATM on one machine.

* :func:`run_flower_simulation`: Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend):
  one virtual SuperNode per task, the real ServerApp and ClientApp, messages through Flower's in-memory
  SuperLink. The same apps run unchanged under ``flwr run`` or on real SuperNodes (``docs/FEDERATED.md``).
* :func:`run_local`: the same ServerApp logic and ClientApp over :class:`LocalGrid`, an in-process Grid that
  delivers each message to the ClientApp directly (a deep copy of it, as serialization would), one node after
  the other; no Ray, no threads. For debugging and fast tests; same results as the simulation engine.
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
from flwr.serverapp import Grid

from hf_atm.federated.config import FederatedATMConfig
from hf_atm.federated.protocol import Mod
from hf_atm.federated.strategy import ATMStrategy

__all__ = ["LocalGrid", "run_flower_simulation", "run_local"]

log = logging.getLogger("hf_atm.federated")

#: Flower's error code for an exception raised by a ClientApp
CLIENT_APP_RAISED_EXCEPTION = 2


class LocalGrid(Grid):
    """An in-process Grid: nodes ``1..n`` (or the given ids) each run `client_app` with their own persistent
    Context (``node_config`` e.g. ``{"partition-id": i}``). ``send_and_receive`` delivers every message in turn;
    an exception in the ClientApp becomes an error reply, and a reply that took longer than `timeout` is
    dropped (as a real server stops waiting)."""

    def __init__(self, client_app: Any, node_configs: Sequence[Mapping[str, Any]],
                 run_config: Mapping[str, Any] | None = None, run_id: int = 1) -> None:
        self.client_app = client_app
        self.run_id = run_id
        self.contexts: dict[int, Context] = {}
        for i, nc in enumerate(node_configs):
            nid = 1000 + i
            self.contexts[nid] = Context(run_id=run_id, node_id=nid, node_config=dict(nc), state=RecordDict(),
                                         run_config=dict(run_config or {}))
        self._pending: dict[str, Message] = {}
        self.disconnected: set[int] = set()

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

    def _deliver(self, msg: Message, timeout: float | None) -> Message | None:
        nid = int(msg.metadata.dst_node_id)
        if nid not in self.contexts or nid in self.disconnected:
            return None
        incoming = self._as_delivered(msg)
        t0 = time.monotonic()
        try:
            reply = self.client_app(incoming, self.contexts[nid])
        except Exception as e:  # noqa: BLE001 - a failing node must not stop the server (as in Flower)
            log.info("node %s raised: %s", nid, e)
            reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e).__name__}: {e}"),
                            reply_to=incoming)
        if timeout is not None and time.monotonic() - t0 > timeout:
            log.info("node %s replied after the %.1fs timeout: dropped", nid, timeout)
            return None
        if reply.has_content():  # the server gets its own copy too
            reply = Message(content=copy.deepcopy(reply.content), metadata=reply.metadata)
        return reply

    def _as_delivered(self, msg: Message) -> Message:
        """The message as the node receives it from a SuperLink: its own copy of the content (as after
        (de)serialization: records must not be shared between nodes), with the run id, the server as its
        source and a fresh message id in its metadata. A reply built with ``Message(..., reply_to=it)`` then
        comes from the node and points back at it."""
        md = msg.metadata
        metadata = Metadata(run_id=self.run_id, message_id=uuid.uuid4().hex, src_node_id=0,
                            dst_node_id=md.dst_node_id, reply_to_message_id=md.reply_to_message_id,
                            group_id=md.group_id, created_at=md.created_at, ttl=md.ttl,
                            message_type=md.message_type)
        return Message(content=copy.deepcopy(msg.content), metadata=metadata)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            key = uuid.uuid4().hex
            self._pending[key] = m
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for key in message_ids:
            m = self._pending.pop(key, None)
            if m is not None and (r := self._deliver(m, None)) is not None:
                out.append(r)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        out = []
        for m in messages:
            r = self._deliver(m, timeout)
            if r is not None:
                out.append(r)
        return out


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
