"""Federated ATM on Flower: one ClientApp per data silo (one task), a ServerApp that merges their task vectors.

The server merges with any method of :mod:`hf_atm.merging`, with fault tolerance, round checkpoints,
traffic accounting, compressed deltas and SecAgg+. See ``docs/FEDERATED.md``.

Importing this package does not import Flower's apps; use ``hf_atm.federated.client:app`` /
``hf_atm.federated.server:app`` (``flwr run``) or :func:`hf_atm.federated.simulation.run_flower_simulation`.

Modules: ``config`` (the run's options), ``protocol`` (record keys, actions, error text), ``discovery`` (which
node holds which task), ``aggregation`` (the round's merge spec and merge), ``secagg`` (SecAgg+),
``compression`` (wire format and compressed deltas), ``metering`` (bytes per node), ``checkpoints`` (round
checkpoints), ``steps`` (one step: push, then pull each reply under the server's own deadline),
``strategy`` (the round loop), ``client`` / ``server`` (the apps), ``simulation`` (one machine).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> module that defines it. Imported on first use: every message of a deployment starts a fresh
#: ClientApp process that imports ``hf_atm.federated.client``, and an eager ``strategy`` import here would pull
#: in the whole trainer stack (transformers.Trainer, peft) for a hello or a sync.
_EXPORTS: dict[str, str] = {
    "ATMStrategy": "hf_atm.federated.strategy",
    "Compression": "hf_atm.federated.compression",
    "FederatedATMConfig": "hf_atm.federated.config",
}

__all__ = ["ATMStrategy", "Compression", "FederatedATMConfig"]

if TYPE_CHECKING:
    from hf_atm.federated.compression import Compression
    from hf_atm.federated.config import FederatedATMConfig
    from hf_atm.federated.strategy import ATMStrategy


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_atm.federated' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
