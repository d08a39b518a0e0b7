"""Fault injection for the federated ATM tests: a Flower ClientApp mod that makes one task's node raise, or hang,
in the train step of a round.

Used through the ClientApp's public ``mods=`` hook (``make_client_app(cfg, mods=[TrainFault("parity", 2)])``,
``run_flower_simulation(cfg, client_mods=[...])``); it reads only the train message's public content. Under
SecAgg+ it acts on the stage that carries the node's FitIns (the one that runs the fine-tuning), so the node
drops out of that round's sum.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import Context, Message, MessageType

from hf_atm.federated.protocol import FITINS_CONFIG, REC_CONFIG

FAULT_MODES = ("raise", "hang")


@dataclass(frozen=True)
class TrainFault:
    """The node of `task` raises (``mode="raise"``) or sleeps `seconds` before training (``"hang"``) in the
    train step of `round` (0: every round). A dataclass, so Flower's simulation engine can ship it to its
    actors by reference."""

    task: str
    round: int = 0
    mode: str = "raise"
    seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.mode not in FAULT_MODES:
            raise ValueError(f"mode must be one of {', '.join(FAULT_MODES)}, got {self.mode!r}")

    def __call__(self, msg: Message, ctx: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN and msg.has_content():
            records = msg.content.config_records
            conf = records.get(FITINS_CONFIG) or records.get(REC_CONFIG)
            if conf is not None and "task" in conf and str(conf["task"]) == self.task:
                round_idx = int(conf["round"])
                if self.round in (0, round_idx):
                    if self.mode == "hang":
                        time.sleep(self.seconds)
                    else:
                        raise RuntimeError(f"injected fault: task {self.task!r} fails in round {round_idx}")
        return call_next(msg, ctx)
