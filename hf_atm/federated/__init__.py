"""Federated ATM on Flower: a ClientApp per data silo (one task, its data and head), a ServerApp whose strategy
merges the task vectors with any method of :mod:`hf_atm.merging`, with fault tolerance, round checkpoints,
traffic accounting, compressed deltas and SecAgg+. See ``docs/FEDERATED.md``.

Importing this package does not import Flower's apps; use ``hf_atm.federated.client:app`` /
``hf_atm.federated.server:app`` (``flwr run``) or :func:`hf_atm.federated.simulation.run_flower_simulation`.
"""

from hf_atm.federated.compression import Compression
from hf_atm.federated.strategy import ATMStrategy, FederatedATMConfig

__all__ = ["ATMStrategy", "Compression", "FederatedATMConfig"]
