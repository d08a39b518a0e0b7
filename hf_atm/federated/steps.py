"""One step of the federated protocol: push messages, then pull the replies under the server's own deadline.

Why not ``Grid.send_and_receive``: its timeout only bounds the loop *between* pulls. A single
``pull_messages`` call can block far longer: in Flower 1.32 ``GrpcGrid.pull_messages`` inflates each reply
with ``flwr.supercore.inflatable.inflatable_utils.pull_objects``, which retries an object that is announced
but not yet uploaded for up to ``PULL_MAX_TIME`` (7200 s, 500 tries per object). A node killed while it
pushes its reply leaves exactly that: the reply is registered on the SuperLink, its arrays never arrive, and
the ServerApp waits up to two hours. One such reply also holds back every other reply of the same
``pull_messages`` call (they are inflated one after the other).

:func:`exchange` therefore pushes the messages with Flower's public ``Grid.push_messages`` and pulls each
reply by its own ``Grid.pull_messages([message_id])`` call in a daemon thread. The server waits for those
threads until the step's deadline (``timeout`` from before the push); then every thread still polling makes
one last pull at once, and the step waits at most :data:`FINAL_PULL_GRACE` for those pulls and for pulls in
flight (a reply pulled by then counts). A pull still blocked after that is abandoned (its thread keeps
Flower's retry until Flower gives up, and its result is discarded; daemon threads never keep the process
alive, and ``flwr-serverapp`` force-exits 5 s after the ServerApp returns). The node is recorded *missing*.

A node whose message the SuperLink did not take (``push_messages`` returned no id for it:
``GrpcGrid.push_messages`` returns none at all on RESOURCE_EXHAUSTED) is an error of the step, "not pushed".

Replies are keyed by the node each message was *sent to* (reply ids are mapped back to the pushed message
ids): Flower's own error replies (an expired or unavailable message) come from the SuperLink
(``src_node_id`` 1), so the source node id of a reply cannot say which node failed.

Every message carries ``ttl = timeout`` (:func:`step_message`): the SuperLink then discards a reply that
comes after the step was given up, instead of storing it for Flower's default 12 hours.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from hf_atm.federated.protocol import error_reason

__all__ = ["FINAL_PULL_GRACE", "NOT_PUSHED", "StepResult", "exchange", "step_message"]

log = logging.getLogger("hf_atm.federated")

#: at the step's deadline every reply still pending gets one last pull (threads waiting between two polls are
#: woken for it), and the step waits at most this many seconds for those pulls and for pulls already in
#: flight; a reply pulled then counts. So a reply that is on the SuperLink at the deadline is not recorded
#: missing because its thread was between two polls, nor because the push itself took longer than the timeout.
FINAL_PULL_GRACE = 1.0
#: the error of a node whose message the SuperLink did not take
NOT_PUSHED = "not pushed (SuperLink refused)"
#: first and longest wait between two pulls of one reply (doubling in between)
POLL_FIRST, POLL_MAX = 0.05, 1.0


def step_message(content: RecordDict, node_id: int, message_type: str, group_id: str, timeout: float) -> Message:
    """A message of one step, valid for `timeout` seconds (its ``ttl``: the SuperLink drops later replies)."""
    return Message(content, int(node_id), message_type, ttl=float(timeout), group_id=group_id)


@dataclass
class StepResult:
    """The outcome of one step, by the node each message was sent to.

    Attributes:
        replies: ``{node id: reply}`` of the replies that carry content.
        errors: ``{node id: one-line reason}`` of the error replies (the node's exception, or Flower's own
            error for an expired / unavailable message), of pulls that raised and of messages not pushed
            (:data:`NOT_PUSHED`).
        missing: node ids with no reply before the deadline (dead, hung, or killed while sending).
        seconds: wall time of the step (push included).
        error_replies: the error messages themselves.
    """

    replies: dict[int, Message] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    seconds: float = 0.0
    error_replies: list[Message] = field(default_factory=list, repr=False)

    @property
    def answered(self) -> list[int]:
        """The nodes whose reply carries content (sorted)."""
        return sorted(self.replies)

    def all_replies(self) -> list[Message]:
        """Every reply that arrived (content and errors), as ``Grid.send_and_receive`` returns them."""
        return [*self.replies.values(), *self.error_replies]


def _pull_one(grid: Grid, message_id: str, final: threading.Event, out: queue.Queue) -> None:
    """Pull the reply to `message_id` until it comes or a pull raises, and report it in `out`; once `final` is
    set (the step's deadline), make one last pull and report ``(message_id, None, None)`` if it found nothing."""
    delay = POLL_FIRST
    while True:
        last = final.is_set()
        try:
            got = list(grid.pull_messages([message_id]))
        except Exception as e:  # noqa: BLE001 - reported to the step, which decides
            out.put((message_id, None, e))
            return
        if got:
            out.put((message_id, got[0], None))
            return
        if last:
            out.put((message_id, None, None))
            return
        final.wait(delay)  # woken at once by the deadline
        delay = min(delay * 2, POLL_MAX)


def exchange(grid: Grid, messages: Iterable[Message], timeout: float | None) -> StepResult:
    """Push `messages`, then collect their replies until every node answered or `timeout` seconds passed since
    the push began (None: no deadline), plus the final pull of :data:`FINAL_PULL_GRACE`; see the module
    docstring. A node whose message could not be pushed is an error; if every pull raised (the SuperLink is
    gone), the first exception propagates."""
    msgs = list(messages)
    t0 = time.monotonic()
    result = StepResult()
    if not msgs:
        return result
    dst = [int(m.metadata.dst_node_id) for m in msgs]
    ids = list(grid.push_messages(msgs))
    node_of: dict[str, int] = {}
    for nid, mid in zip(dst, ids):
        if mid is None:
            result.errors[nid] = NOT_PUSHED
        else:
            node_of[str(mid)] = nid
    for nid in dst[len(ids):]:  # GrpcGrid.push_messages returns no ids at all when the SuperLink refuses
        result.errors[nid] = NOT_PUSHED
    final = threading.Event()
    out: queue.Queue = queue.Queue()
    for mid in node_of:
        threading.Thread(target=_pull_one, args=(grid, mid, final, out), daemon=True,
                         name=f"hf_atm-pull-{mid[:8]}").start()
    pending = dict(node_of)
    gave_up: list[int] = []
    raised: list[Exception] = []

    def take(item: tuple[str, Message | None, Exception | None]) -> None:
        mid, reply, exc = item
        nid = pending.pop(mid, None)
        if nid is None:
            return
        if exc is not None:
            raised.append(exc)
            result.errors[nid] = f"pull failed: {type(exc).__name__}: {exc}"[:300]
        elif reply is None:  # its final pull found nothing
            gave_up.append(nid)
        elif reply.has_error():
            result.errors[nid] = error_reason(reply) or f"error code {reply.error.code}"
            result.error_replies.append(reply)
        else:
            result.replies[nid] = reply

    def collect(until: float | None) -> None:
        while pending:
            wait = None if until is None else until - time.monotonic()
            if wait is not None and wait <= 0:
                return
            try:
                take(out.get(timeout=wait))
            except queue.Empty:
                return

    try:
        collect(None if timeout is None else t0 + float(timeout))
        if pending:  # the deadline: one last pull each, and pulls in flight get FINAL_PULL_GRACE to finish
            final.set()
            collect(time.monotonic() + FINAL_PULL_GRACE)
        while pending:  # whatever was reported meanwhile still counts
            try:
                take(out.get_nowait())
            except queue.Empty:
                break
    finally:
        final.set()  # pulls still blocked inside Flower are abandoned; what they return later is dropped
    result.missing = sorted([*gave_up, *pending.values()])
    result.seconds = time.monotonic() - t0
    if raised and len(raised) == len(node_of) and not result.replies:
        raise raised[0]
    return result
