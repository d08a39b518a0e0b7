"""Exchange of task vectors, heads and metrics between the processes of an ATM run.

Tasks are owned round-robin by sorted task name: task ``j`` (index in sorted order) belongs to rank
``j % world_size``. Each rank fine-tunes its own tasks; at the end of a round:

* sum-decomposable merges (``average``, ``task_arithmetic``, ``dare_linear``, ``breadcrumbs``) without
  cosine tracking: every rank sums ``per_task_transform`` of its own task vectors as they are produced (one
  accumulator), then one all-reduce (sum) per tensor gives ``merge = scale * sum_i transform_i``;
* otherwise (``ties``, ``dare_ties``, ``tsv``, ``iso_c``, or whenever cosines are recorded): for each tensor
  (sorted names) an all_gather of the ranks' task-vector chunks gives every rank all ``n`` task vectors of
  that tensor only, merged with ``merge_deltas`` and added to the Gram matrix of the cosines.

So every rank ends a round with the same backbone. Heads are broadcast from their owners; metrics are
summed with all-reduce. Collectives go through ``torch.distributed`` as initialised by accelerate (gloo on
CPU: tensors are moved to CPU for it; NCCL: they stay on the GPU). With one process nothing is exchanged.

Agreement with a single-process run: the per-task fine-tunings are identical (seeded by round and task,
same arithmetic). The gather path then merges exactly the same task vectors in the same order: bit-identical.
The all-reduce path sums the float32 per-task terms in float64 (one float64 accumulator per tensor, twice
the bytes of a float32 all-reduce) and rounds once to float32 at the end: a sum of a few float32 numbers is
exact in float64 unless their magnitudes span more than ~2^29, so the order of addition (which process
holds which task) does not change the result; in the rare inexact case the merged tensor differs by at most
one float32 ulp per round (tested: bit-identical on 2 CPU processes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from hf_atm.atm.evaluation import accumulate_gram
from hf_atm.merging.spec import MergeSpec, merge_deltas, needs_all_task_vectors, per_task_transform

__all__ = ["DeltaCollector", "TaskExchange", "owner_of"]


def owner_of(task_index: int, world_size: int) -> int:
    """The rank that fine-tunes the task at `task_index` (sorted order): round-robin."""
    return task_index % world_size


class TaskExchange:
    """Who owns which task, and the collectives of an ATM run (no-ops with one process)."""

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        backend = dist.get_backend() if self.distributed else "none"
        # NCCL reduces CUDA tensors; gloo (and anything else) CPU tensors.
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    # -- ownership
    def owner(self, task: str) -> int:
        return owner_of(self.tasks.index(task), self.world_size)

    def my_tasks(self) -> list[str]:
        """This rank's tasks, in sorted-name order."""
        return [t for j, t in enumerate(self.tasks) if owner_of(j, self.world_size) == self.rank]

    # -- collectives
    def _to_comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.comm_device).contiguous()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over ranks (a new tensor on `t`'s device)."""
        if not self.distributed:
            return t.clone()
        c = self._to_comm(t).clone()
        dist.all_reduce(c, op=dist.ReduceOp.SUM)
        return c.to(t.device)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return t.clone()
        c = self._to_comm(t).clone()
        dist.all_reduce(c, op=dist.ReduceOp.MAX)
        return c.to(t.device)

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
        """Every parameter and buffer of `module` set to rank `src`'s values."""
        if not self.distributed:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            self.broadcast_(t.data, src)

    def broadcast_heads_(self, heads: nn.ModuleDict, tasks: Sequence[str]) -> None:
        """Each head of `tasks` set, on every rank, to its owner's values."""
        if not self.distributed:
            return
        for t in tasks:
            self.broadcast_module_(heads[t], src=self.owner(t))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

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


class DeltaCollector:
    """Collects one round's task vectors on this rank and produces the merged delta on every rank.

    ``add(task, {name: tau})`` is called once per own task, ``finish()`` once per round on every rank (it is a
    collective). In ``"sum"`` mode (sum-decomposable method, no cosines) only the running sum of the per-task
    transforms is kept; in ``"gather"`` mode the task vectors are kept until ``finish``.
    """

    def __init__(self, exchange: TaskExchange, spec: MergeSpec, names: Sequence[str],
                 shapes: Mapping[str, torch.Size], dtypes: Mapping[str, torch.dtype],
                 compute_cosine: bool, buffers: dict | None = None) -> None:
        self.ex = exchange
        self.spec = spec
        self.names = sorted(names)
        self.shapes = dict(shapes)
        self.dtypes = dict(dtypes)
        self.n = len(exchange.tasks)
        self.compute_cosine = compute_cosine
        self.mode = "gather" if (compute_cosine or needs_all_task_vectors(spec.method)) else "sum"
        self._sum: dict[str, torch.Tensor] = {}
        self._taus: dict[str, dict[str, torch.Tensor]] = {}
        # Accumulators reused from round to round (a caller-held dict): large CPU allocations are otherwise
        # returned to the OS and page-faulted in again every round.
        self._buffers = buffers if buffers is not None else {}

    def add(self, task: str, tau: Mapping[str, torch.Tensor]) -> None:
        """Record the task vector of `task` (names absent from `tau` count as zero)."""
        idx = self.ex.tasks.index(task)
        if self.mode == "gather":
            self._taus[task] = dict(tau)
            return
        w = 1.0 if self.spec.weights is None else float(self.spec.weights[idx])
        identity = self.spec.method == "task_arithmetic" and w == 1.0 and all(
            t.dtype in (torch.float32, torch.float64) for t in tau.values())
        for name, t in tau.items():
            # float64 accumulation: the sum of a few float32 terms is (almost always) exact in float64, so the
            # result does not depend on which process added which term, nor in which order.
            term = t if identity else per_task_transform(self.spec, t, idx, name, self.n)
            acc = self._sum.get(name)
            if acc is None:
                acc = self._buffers.get(("acc", name))
                if acc is None or acc.shape != t.shape or acc.device != t.device:
                    acc = torch.empty(t.shape, dtype=torch.float64, device=t.device)
                    self._buffers[("acc", name)] = acc
                acc.copy_(term)
                self._sum[name] = acc
            else:
                acc.add_(term)  # computed in float64 (in-place type promotion)

    def finish(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The merged delta ``{name: scale * combine(tau_1..tau_n)}`` (float32 / float64, on the tensors'
        device) and the n x n float64 Gram matrix of the task vectors (None in ``"sum"`` mode)."""
        if self.mode == "sum":
            return self._finish_sum(), None
        return self._finish_gather()

    def _compute_dtype(self, name: str) -> torch.dtype:
        return torch.float64 if self.dtypes[name] == torch.float64 else torch.float32

    def _finish_sum(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name in self.names:
            local = self._sum.get(name)
            if local is None:
                local = torch.zeros(self.shapes[name], dtype=torch.float64)
            total = self.ex.all_reduce_sum(local) if self.ex.distributed else local
            # average already divides by the total weight and takes no scale
            if self.spec.scale != 1.0:
                total = total.mul_(self.spec.scale)
            out[name] = total.to(self._compute_dtype(name))
        self._sum.clear()
        return out

    def _finish_gather(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        w = self.ex.world_size
        slots = -(-self.n // w)
        mine = self.ex.my_tasks()
        gram = torch.zeros(self.n, self.n, dtype=torch.float64) if self.compute_cosine else None
        out: dict[str, torch.Tensor] = {}
        for name in self.names:
            dtype = self._compute_dtype(name)
            shape = self.shapes[name]
            local = []
            device = None
            for t in mine:
                v = self._taus.get(t, {}).get(name)
                if v is not None:
                    device = v.device
                local.append(v.to(dtype) if v is not None else torch.zeros(shape, dtype=dtype))
            if w == 1:
                taus = [t.to(device) if device is not None else t for t in local]
            else:
                rows = self.ex.all_gather_chunks(local, shape, dtype, slots)
                # task j lives on rank j % w at position j // w
                taus = [rows[(j % w) * slots + j // w] for j in range(self.n)]
                if device is not None:
                    taus = [t.to(device) for t in taus]
            out[name] = merge_deltas(self.spec, taus, name)
            if gram is not None:
                accumulate_gram(gram, taus)
        self._taus.clear()
        return out, gram


def round_spec(spec: MergeSpec, round_idx: int) -> MergeSpec:
    """The spec of round `round_idx`: DARE masks are drawn afresh each round (seed mixed with the round)."""
    from hf_atm.merging.spec import tensor_seed

    return replace(spec, seed=tensor_seed(spec.seed, f"atm-round/{round_idx}") % (2**31))
