"""Fault injection for the federated ATM tests: a Flower ClientApp mod that makes one task's node raise, hang or
die in the train step of a round.

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
from hf_atm.federated.simulation import NodeKilled

FAULT_MODES = ("raise", "hang", "die", "die-sending")


@dataclass(frozen=True)
class TrainFault:
    """The node of `task` raises (``mode="raise"``), sleeps `seconds` before training (``"hang"``), dies on
    receiving the train message (``"die"``) or dies while sending its reply after training (``"die-sending"``:
    the reply never completes; its pull blocks `seconds`) in the train step of `round` (0: every round). The
    two ``die`` modes raise :class:`hf_atm.federated.simulation.NodeKilled`, which ``LocalGrid`` turns into a
    dead node. A dataclass, so Flower's simulation engine can ship it to its actors by reference."""

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
                    elif self.mode == "die":
                        raise NodeKilled(sending=False)
                    elif self.mode == "die-sending":
                        call_next(msg, ctx)  # trained (state updated); the reply is lost on the way
                        raise NodeKilled(sending=True, seconds=self.seconds)
                    else:
                        raise RuntimeError(f"injected fault: task {self.task!r} fails in round {round_idx}")
        return call_next(msg, ctx)
