"""The message protocol between the federated ATM server and its nodes: record keys, actions and error text.

One round (``docs/FEDERATED.md``): QUERY ``hello`` (a node says which task it holds), QUERY ``sync`` (a node
receives the full backbone and its head), TRAIN (the node replies with its task vector), EVALUATE (the node
receives the merged delta and replies with its accuracy and head). Every record below travels in the
``content`` of a Flower ``Message``; nothing else is read from a message but its public ``metadata``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Context, Message

__all__ = [
    "ACTION_HELLO",
    "ACTION_SYNC",
    "FITINS_CONFIG",
    "PROTOCOL",
    "REC_BACKBONE",
    "REC_CONFIG",
    "REC_DELTA",
    "REC_HEAD",
    "REC_INFO",
    "REC_METRICS",
    "REC_TAU",
    "STATE_CONFIG",
    "STATE_RESIDUAL",
    "Mod",
    "config_record",
    "error_reason",
    "short_reason",
]

#: version of this protocol, sent in the hello
PROTOCOL = 1

# message content
REC_CONFIG = "atm_config"  # ConfigRecord, server -> node
REC_INFO = "atm_info"  # ConfigRecord, node -> server
REC_METRICS = "atm_metrics"  # MetricRecord, node -> server
REC_BACKBONE = "atm_backbone"  # ArrayRecord: full backbone (sync; also the node state)
REC_HEAD = "atm_head"  # ArrayRecord: one task head (sync, evaluate reply; also the node state)
REC_DELTA = "atm_delta"  # ArrayRecord: merged delta, encoded with the downlink compression
REC_TAU = "atm_tau"  # ArrayRecord: task vector, encoded with the uplink compression
FITINS_CONFIG = "fitins.config"  # Flower's legacy FitIns layout (what SecAggPlusWorkflow sends)

# QUERY actions
ACTION_HELLO = "hello"
ACTION_SYNC = "sync"

# node state (``context.state``) between messages
STATE_CONFIG = "atm_client"  # ConfigRecord: the round whose global model the node holds, its task
STATE_RESIDUAL = "atm_residual"  # ArrayRecord: the error-feedback residual

#: a Flower ClientApp mod: ``mod(message, context, call_next) -> reply``, where ``call_next(message, context)``
#: runs the rest of the chain and the handler (:func:`hf_atm.federated.client.make_client_app`'s ``mods``)
Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def config_record(**values: Any) -> ConfigRecord:
    """A ConfigRecord of the keyword arguments that are not None (a ConfigRecord cannot hold None)."""
    return ConfigRecord({k: v for k, v in values.items() if v is not None})


def short_reason(text: Any) -> str:
    """One line (at most 300 characters) of a node's error: the message of the ClientApp's exception when
    Flower's runtime wrapped it (Ray's traceback ends in ``... occurred. Message: <text>``)."""
    text = " ".join(_ANSI.sub("", str(text)).split())
    wrapped = re.fullmatch(r"Error\(code=\d+, reason=(['\"])(.*)\1\)", text)
    if wrapped:  # str(Exception(Error)) as SecAgg+ collects failures
        text = wrapped.group(2)
    if "Message:" in text:
        text = text.rsplit("Message:", 1)[1].strip()
        text = text[:-2] if text.endswith("'>") else text
    return text.strip()[:300]


def error_reason(message: Message) -> str:
    """:func:`short_reason` of an error reply ("" when `message` carries no error)."""
    return short_reason(message.error.reason) if message.has_error() else ""
