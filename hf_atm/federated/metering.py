"""Traffic metering: a Grid wrapper that counts the bytes of every message per node and direction."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from hf_atm.federated.compression import record_nbytes
from hf_atm.federated.steps import exchange

__all__ = ["MeteredGrid"]


class MeteredGrid(Grid):
    """A Grid that counts the bytes of every message it carries, per node and direction.

    ``down[node]``: bytes of the contents sent to the node; ``up[node]``: bytes of its replies (Flower's
    ``count_bytes``, see :func:`hf_atm.federated.compression.record_nbytes`). Wraps any Grid (the SuperLink's,
    the simulation's, :class:`hf_atm.federated.simulation.LocalGrid`); SecAgg+'s protocol messages are
    counted too since the workflow sends through this grid. Its ``send_and_receive`` is deadline-bounded
    (:func:`hf_atm.federated.steps.exchange`).

    :meth:`reset` starts a new count (each round). A pull that began before it and completes after it (one a
    step abandoned at its deadline) counts nowhere: its reply was dropped, and its bytes must not inflate the
    next round's ``up``."""

    def __init__(self, grid: Grid) -> None:
        self.inner = grid
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}
        self.epoch = 0  # bumped by reset(): tells a pull which count it started in

    def reset(self) -> None:
        self.down, self.up = {}, {}
        self.epoch += 1

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

    def _count_in(self, replies: Iterable[Message], epoch: int) -> list[Message]:
        out = list(replies)
        if epoch != self.epoch:  # started before the last reset(): abandoned, see the class docstring
            return out
        for m in out:
            if m.has_content():
                nid = int(m.metadata.src_node_id)
                self.up[nid] = self.up.get(nid, 0) + record_nbytes(m.content)
        return out

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._count_out(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        epoch = self.epoch
        return self._count_in(self.inner.pull_messages(message_ids), epoch)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull under the deadline of :func:`hf_atm.federated.steps.exchange` (not the inner grid's
        ``send_and_receive``, whose pulls can block past `timeout`): SecAgg+'s workflow steps are bounded too."""
        return exchange(self, messages, timeout).all_replies()
