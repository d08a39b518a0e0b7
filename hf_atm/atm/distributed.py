"""The round's exchange between the processes of an ATM run, under one import path.

:mod:`hf_atm.atm.exchange` says who fine-tunes and evaluates which task (``task_parallel`` /
``data_parallel``) and runs the collectives; :mod:`hf_atm.atm.collector` merges one round's task vectors
(one accumulator for sum-decomposable methods, all_gather for the others, the Gram matrix of the cosines).
"""

from hf_atm.atm.collector import (
    ACCUMULATE_DTYPES,
    MERGE_DEVICES,
    DeltaCollector,
    TaskVectorView,
    accumulate_dtype,
    merge_round,
    resolve_merge_device,
    round_spec,
)
from hf_atm.atm.exchange import (
    PARALLEL_MODES,
    TaskExchange,
    local_exchange,
    owner_of,
    warn_if_unused_gpus,
)
from hf_atm.atm.sharding import check_sharding_supported

__all__ = [
    "ACCUMULATE_DTYPES",
    "MERGE_DEVICES",
    "PARALLEL_MODES",
    "DeltaCollector",
    "TaskExchange",
    "TaskVectorView",
    "accumulate_dtype",
    "check_sharding_supported",
    "local_exchange",
    "merge_round",
    "owner_of",
    "resolve_merge_device",
    "round_spec",
    "warn_if_unused_gpus",
]
