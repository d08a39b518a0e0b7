"""Federated ATM on Flower: one ClientApp per data silo (one task), a ServerApp that merges their task vectors.

The server merges with any method of :mod:`hf_atm.merging`, with fault tolerance, round checkpoints,
traffic accounting, compressed deltas and SecAgg+. See ``docs/FEDERATED.md``.

Importing this package does not import Flower's apps; use ``hf_atm.federated.client:app`` /
``hf_atm.federated.server:app`` (``flwr run``) or :func:`hf_atm.federated.simulation.run_flower_simulation`.

Modules: ``config`` (the run's options), ``protocol`` (record keys, actions, error text), ``discovery`` (which
node holds which task), ``aggregation`` (the round's merge spec and merge), ``secagg`` (SecAgg+),
``compression`` (wire format and compressed deltas), ``metering`` (bytes per node), ``checkpoints`` (round
checkpoints), ``strategy`` (the round loop), ``client`` / ``server`` (the apps), ``simulation`` (one machine).
"""

from hf_atm.federated.compression import Compression
from hf_atm.federated.config import FederatedATMConfig
from hf_atm.federated.strategy import ATMStrategy

__all__ = ["ATMStrategy", "Compression", "FederatedATMConfig"]
