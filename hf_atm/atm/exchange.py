"""Who fine-tunes and evaluates which task, and the collectives between the processes of an ATM run.

Two ways to spread a round over processes (``ATMConfig.atm_parallel_mode``):

* ``task_parallel``: task ``j`` (index in sorted order) is fine-tuned by rank ``j % world_size``; the
  task vectors are exchanged at the end of the round (all-reduce or all_gather, see
  :mod:`hf_atm.atm.collector`) and each head is broadcast from its owner.
* ``data_parallel``: every rank fine-tunes every task together with the others: the loader yields global
  batches of ``per_device_train_batch_size x world_size`` rows in the same shuffled order on every rank,
  each rank computes the loss on its contiguous share of the rows (:meth:`TaskExchange.shard_batch`) and
  the gradients are averaged over ranks after the last backward of each optimizer step
  (:meth:`TaskExchange.sync_gradients_`, DDP semantics). Every rank thus ends with the same task vectors
  and heads: the merge needs no exchange.

With FSDP configured, data_parallel shards the backbone (:mod:`hf_atm.atm.sharding`; ``exchange.sharded``):
FSDP reduce-scatters the backbone's gradients, :meth:`TaskExchange.sync_gradients_` averages the rest (the
heads), and the round works on each rank's shards.

In both modes evaluation is split over ranks (:meth:`TaskExchange.my_eval_tasks`) and the counts summed
(with a sharded backbone every rank runs every forward, as FSDP's collectives need, and the owner's counts are
kept).
Collectives go through ``torch.distributed`` as initialised by accelerate (gloo on CPU: tensors are moved to
CPU for it; NCCL: they stay on the GPU). With one process (or ``local=True``) nothing is exchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = [
    "PARALLEL_MODES",
    "TaskExchange",
    "is_sharded",
    "local_exchange",
    "owner_of",
    "warn_if_unused_gpus",
]

PARALLEL_MODES = ("task_parallel", "data_parallel")

# Gradients are all-reduced in flat buckets of at most this many bytes: one collective per bucket instead
# of one per parameter, and a bounded temporary.
_GRAD_BUCKET_BYTES = 32 * 2**20


def owner_of(task_index: int, world_size: int) -> int:
    """The rank that fine-tunes the task at `task_index` (sorted order) in task_parallel: round-robin."""
    return task_index % world_size


class TaskExchange:
    """Who owns which task, and the collectives of an ATM run (no-ops with one process or ``local=True``).

    `tasks` are the round's task names in sorted order (their index is the task index of merge weights and
    DARE seeds). `parallel_mode` is one of :data:`PARALLEL_MODES`. ``local=True`` never communicates, even
    inside a distributed run: for one process merging on its own (the federated server, a baseline).
    data_parallel only: `grad_bucket_mb` (``TrainingArguments.ddp_bucket_cap_mb``) caps the flat gradient
    buckets of :meth:`sync_gradients_` (default 32 MiB); ``broadcast_buffers=False``
    (``ddp_broadcast_buffers``) makes :meth:`sync_buffers_` a no-op.
    """

    def __init__(self, tasks: Sequence[str], parallel_mode: str = "task_parallel", *, local: bool = False,
                 grad_bucket_mb: float | None = None, broadcast_buffers: bool | None = None) -> None:
        if parallel_mode not in PARALLEL_MODES:
            raise ValueError(f"parallel_mode must be one of {', '.join(PARALLEL_MODES)}, got {parallel_mode!r}")
        self.tasks = list(tasks)
        self.parallel_mode = parallel_mode
        self.grad_bucket_bytes = int(grad_bucket_mb * 2**20) if grad_bucket_mb else _GRAD_BUCKET_BYTES
        self.broadcast_buffers = broadcast_buffers is not False
        self.distributed = not local and dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        backend = dist.get_backend() if self.distributed else "none"
        # NCCL reduces CUDA tensors; gloo (and anything else) CPU tensors.
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        #: True when the backbone is FSDP-sharded over the ranks (set by :func:`hf_atm.atm.sharding.prepare_sharding`)
        self.sharded = False

    @property
    def data_parallel(self) -> bool:
        """True when every rank fine-tunes every task (``parallel_mode="data_parallel"``)."""
        return self.parallel_mode == "data_parallel"

    @property
    def merge_is_local(self) -> bool:
        """True when the round's merge needs no exchange: one process, a local exchange, or data_parallel
        (every rank holds every task vector)."""
        return not self.distributed or self.data_parallel

    # -- ownership
    def owner(self, task: str) -> int:
        """The rank that fine-tunes `task` in task_parallel (and evaluates it in both modes)."""
        return owner_of(self.tasks.index(task), self.world_size)

    def my_tasks(self) -> list[str]:
        """The tasks this rank fine-tunes, in sorted-name order: its round-robin share in task_parallel,
        every task in data_parallel."""
        if self.data_parallel:
            return list(self.tasks)
        return self.my_eval_tasks()

    def my_eval_tasks(self) -> list[str]:
        """The tasks this rank evaluates (round-robin in both modes; every task with one process)."""
        return [t for j, t in enumerate(self.tasks) if owner_of(j, self.world_size) == self.rank]

    # -- data parallel
    def global_batch_size(self, per_device: int) -> int:
        """The training loader's batch size: ``per_device x world_size`` in data_parallel (each rank then
        takes its share with :meth:`shard_batch`), else `per_device`."""
        return per_device * self.world_size if self.data_parallel and self.distributed else per_device

    def shard_bounds(self, rows: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's contiguous rows of a global batch of `rows` rows.

        Shares differ by at most one row. A batch with fewer rows than ranks (a remainder batch) is not
        split: every rank takes all of it, so that the averaged gradient is that batch's gradient."""
        if not (self.data_parallel and self.distributed) or rows < self.world_size:
            return 0, rows
        base, extra = divmod(rows, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def shard_batch(self, batch: Any) -> Any:
        """This rank's rows of a collated global batch (a mapping of tensors / lists, a tensor or a list);
        identity in task_parallel or with one process. Scalars and strings in a mapping are kept as is."""
        if not (self.data_parallel and self.distributed):
            return batch
        rows = _batch_rows(batch)
        if rows is None:
            raise ValueError("shard_batch: cannot tell the number of rows of the batch (no tensor or list)")
        start, stop = self.shard_bounds(rows)
        return _slice_rows(batch, start, stop, rows)

    def sync_gradients_(self, params: Iterable[nn.Parameter]) -> None:
        """Average ``.grad`` over ranks in place (data_parallel; no-op otherwise), in flat buckets per dtype
        and device. Parameters without a gradient are skipped (what DDP's ``find_unused_parameters=True``
        does), and so are FSDP-sharded ones (DTensors, which FSDP has reduce-scattered); every rank must hold
        gradients for the same parameters (same model, same task). Call after the last backward of an
        optimizer step, before gradient clipping and ``optimizer.step()``."""
        if not (self.data_parallel and self.distributed):
            return
        grads = [p.grad for p in params if p.grad is not None and not is_sharded(p.grad)]
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for g in grads:
            groups.setdefault((g.dtype, g.device), []).append(g)
        for group in groups.values():
            bucket: list[torch.Tensor] = []
            size = 0
            for g in group:
                bucket.append(g)
                size += g.numel() * g.element_size()
                if size >= self.grad_bucket_bytes:
                    self._mean_bucket_(bucket)
                    bucket, size = [], 0
            if bucket:
                self._mean_bucket_(bucket)

    def sync_buffers_(self, module: nn.Module) -> None:
        """Set `module`'s buffers (BatchNorm running statistics...) to rank 0's values on every rank
        (data_parallel; no-op otherwise): DDP's ``broadcast_buffers``, once per task instead of every forward,
        so that the ranks' task vectors stay equal for models with running statistics."""
        if not (self.data_parallel and self.distributed and self.broadcast_buffers):
            return
        for b in module.buffers():
            self.broadcast_(b.data, src=0)

    def _mean_bucket_(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.comm_device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world_size)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def reduce_task_stats(self, t: torch.Tensor) -> torch.Tensor:
        """Per-task sums of a round (losses, steps) over ranks: the sum in task_parallel (each task ran on
        one rank), the mean in data_parallel (every rank ran every task on its share of the rows)."""
        total = self.all_reduce_sum(t)
        return total.div_(self.world_size) if self.data_parallel and self.distributed else total

    # -- collectives
    def _to_comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.comm_device).contiguous()

    def _all_reduce(self, t: torch.Tensor, op: Any) -> torch.Tensor:
        if not self.distributed:
            return t.clone()
        c = self._to_comm(t).clone()
        dist.all_reduce(c, op=op)
        return c.to(t.device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over ranks (a new tensor on `t`'s device)."""
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of `t` over ranks (a new tensor on `t`'s device)."""
        return self._all_reduce(t, dist.ReduceOp.MAX)

    def broadcast_(self, t: torch.Tensor, src: int) -> None:
        """Overwrite `t` in place, on every rank, with rank `src`'s value."""
        if not self.distributed:
            return
        c = self._to_comm(t.detach())
        if c is t:
            dist.broadcast(c, src=src)
            return
        c = c.clone()
        dist.broadcast(c, src=src)
        with torch.no_grad():
            t.copy_(c)

    def broadcast_module_(self, module: nn.Module, src: int = 0) -> None:
        """Every parameter and buffer of `module` set to rank `src`'s values (FSDP-sharded ones excepted: each
        rank holds its own rows, sharded from rank `src`'s weights)."""
        if not self.distributed:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            if not is_sharded(t):
                self.broadcast_(t.data, src)

    def broadcast_heads_(self, heads: nn.ModuleDict, tasks: Sequence[str]) -> None:
        """Each head of `tasks` set, on every rank, to its owner's values (no-op in data_parallel, where
        every rank trained every head identically)."""
        if not self.distributed or self.data_parallel:
            return
        for t in tasks:
            self.broadcast_module_(heads[t], src=self.owner(t))

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.distributed:
            dist.barrier()

    def merge_dicts(self, local: Mapping[str, Any]) -> dict[str, Any]:
        """The union of every rank's `local` dict (picklable values; keys disjoint across ranks, as per-task
        results are): each rank gets all of them. One process: a copy of `local`."""
        if not self.distributed:
            return dict(local)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, dict(local))
        return {k: v for part in gathered for k, v in part.items()}

    def any_true(self, flag: bool) -> bool:
        """True when `flag` is True on some rank."""
        return bool(self.all_reduce_max(torch.tensor([1.0 if flag else 0.0])).item() > 0)

    def all_gather_chunks(self, local: Sequence[torch.Tensor], shape: torch.Size, dtype: torch.dtype,
                          slots: int) -> list[torch.Tensor]:
        """All ranks' `local` tensors (at most `slots` each, zero-padded), as ``world_size * slots`` tensors on
        the communication device, rank-major."""
        buf = torch.zeros((slots, *shape), dtype=dtype, device=self.comm_device)
        for k, t in enumerate(local):
            buf[k].copy_(t)
        if not self.distributed:
            return list(buf.unbind(0))
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(out, buf)
        return [row for chunk in out for row in chunk.unbind(0)]


def local_exchange(tasks: Sequence[str]) -> TaskExchange:
    """A :class:`TaskExchange` over `tasks` that never communicates (one process merging on its own)."""
    return TaskExchange(tasks, local=True)


def is_sharded(t: torch.Tensor) -> bool:
    """True for an FSDP-sharded tensor (a DTensor; :mod:`hf_atm.atm.sharding`)."""
    return isinstance(t, DTensor)


def warn_if_unused_gpus(exchange: TaskExchange, device: torch.device | str) -> None:
    """Warn once when a single process sees several CUDA devices but trains on one: ATM does not spread a
    round over GPUs by itself; ``accelerate launch`` with one process per GPU does."""
    device = torch.device(device)
    if exchange.distributed or device.type != "cuda" or not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    if count > 1:
        warnings.warn(
            f"ATMTrainer runs in a single process and uses only {device} although {count} GPUs are visible. "
            f"To use them all, launch one process per GPU: `accelerate launch --multi_gpu --num_processes "
            f"{count} train.py` with ATMConfig(atm_parallel_mode='task_parallel') (tasks split over GPUs) or "
            "atm_parallel_mode='data_parallel' (every task's batches split over GPUs); set CUDA_VISIBLE_DEVICES "
            "to silence this warning.",
            UserWarning,
            stacklevel=2,
        )


def _batch_rows(batch: Any) -> int | None:
    """The number of rows of a collated batch (first tensor or list found), None when there is none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, (list, tuple)):
        return len(batch)
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
        for v in batch.values():
            if isinstance(v, (list, tuple)):
                return len(v)
    return None


def _slice_rows(batch: Any, start: int, stop: int, rows: int) -> Any:
    """`batch` restricted to rows ``start:stop`` (values of other lengths kept whole)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch[start:stop])
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows:
            out[k] = v[start:stop]
        elif isinstance(v, (list, tuple)) and len(v) == rows:
            out[k] = type(v)(v[start:stop])
        else:
            out[k] = v
    return type(batch)(out) if not isinstance(batch, dict) else out
