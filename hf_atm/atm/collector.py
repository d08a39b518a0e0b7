"""Merge one ATM round: task vectors in, the merged delta (and the Gram matrix of the task vectors) out.

The one implementation of "merge one round", used by the in-process trainer, the multi-process exchange and
the federated server (:func:`merge_round`). Two modes, chosen by the merge method:

* ``"sum"`` (sum-decomposable methods: ``average``, ``task_arithmetic``, ``dare_linear``, ``breadcrumbs``,
  ``della_linear``): each task vector is folded into one accumulator per tensor as soon as it is added
  (``per_task_transform``), so a round holds one accumulator whatever the number of tasks; at ``finish``
  one all-reduce (sum) per tensor gives ``merge = scale * sum_i transform_i`` on every rank.
* ``"gather"`` (methods that need every task vector at once: ``ties``, ``dare_ties``, ``tsv``, ``iso_c``...):
  the task vectors are kept (on the merge device) until ``finish``; for each tensor an all_gather gives every
  rank all ``n`` task vectors of that tensor only, merged with ``merge_deltas``.

Cosines (``compute_cosine``): the Gram matrix ``<tau_i, tau_j>`` needs every pair, which one accumulator
cannot give. In gather mode the vectors are at hand and the Gram is accumulated tensor by tensor. In sum mode
each task vector is also written once, as it is added, to a temporary raw file (float32; float64 for float64
tensors) and the Gram is computed at ``finish`` by streaming flat chunks of every task's file back (bounded
transient: ``_GRAM_CHUNK_ELEMENTS`` values over all tasks; in data_parallel each rank spills and multiplies
only its share of the elements, and the partial Grams are summed): exact, memory flat in the number of tasks, at the
cost of ``T x backbone`` bytes of disk during the round (deleted at ``finish``). ``compute_cosine=False``
skips it.

Accumulation dtype (``accumulate``, = ``ATMConfig.merge_accumulate_dtype``): ``"auto"`` sums float32 terms in
float64 on the CPU (a sum of a few float32 numbers is exact in float64 unless their magnitudes span more than
~2^29, so the result does not depend on which process holds which task: two processes equal one, bit for
bit) and in float32 on an accelerator (no float64 there unless asked; the multi-process result then differs
from one process by float32 rounding of the sum's order); float64 tensors always accumulate in float64.
``"float32"`` / ``"float64"`` force it. Merge device (``merge_device``): ``"auto"`` keeps accumulators and
gathered vectors on the tensors' device, ``"cpu"`` moves them (and the merge arithmetic) to the CPU.

LoRA rounds: names absent from every task vector on every rank (weights no adapter touched) are not
exchanged and are absent from the delta.

FSDP-sharded backbones (``full_shapes``, data_parallel): every rank adds every task's vector of its own rows
(shard-local shapes). Element-wise methods (``task_arithmetic``, ``average``) fold shard-locally; the other
sum-decomposable ones (DARE, Breadcrumbs, DELLA: per-tensor masks and ranks) gather each task's tensor,
transform it whole and fold their rows; gather-mode methods gather every task's tensor, merge it whole and keep
their rows. The Gram sums every rank's local dot products (whole shards; unsharded tensors split as above).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hf_atm.atm.evaluation import accumulate_gram
from hf_atm.atm.exchange import TaskExchange, local_exchange, owner_of
from hf_atm.atm.sharding import gather_rows, local_rows
from hf_atm.merging.registry import get_method
from hf_atm.merging.spec import (
    MergeSpec,
    merge_deltas,
    needs_all_task_vectors,
    per_task_transform,
    tensor_seed,
)

__all__ = [
    "ACCUMULATE_DTYPES",
    "MERGE_DEVICES",
    "DeltaCollector",
    "TaskVectorView",
    "accumulate_dtype",
    "merge_round",
    "resolve_merge_device",
    "round_spec",
]

ACCUMULATE_DTYPES = ("auto", "float32", "float64")
MERGE_DEVICES = ("auto", "cpu")

# Values (over all tasks together) streamed back per chunk when the Gram is computed from spilled task
# vectors: 2^24 float32 values = 64 MiB, whatever the number of tasks.
_GRAM_CHUNK_ELEMENTS = 2**24
# dtype codes agreed between ranks (max wins): 0 = name untouched on this rank.
_DTYPE_CODE = {torch.float32: 1.0, torch.float64: 2.0}
_CODE_DTYPE = {1: torch.float32, 2: torch.float64}


def accumulate_dtype(setting: str, device: torch.device | str, tensor_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of a round's merge accumulator for tensors of `tensor_dtype` accumulated on `device`.

    ``"auto"``: float64 on the CPU, float32 on an accelerator (no float64 there unless asked); ``"float32"`` /
    ``"float64"``: that dtype. float64 tensors always accumulate in float64 (their terms are float64)."""
    if setting not in ACCUMULATE_DTYPES:
        raise ValueError(f"merge_accumulate_dtype must be one of {', '.join(ACCUMULATE_DTYPES)}, got {setting!r}")
    if tensor_dtype == torch.float64 or setting == "float64":
        return torch.float64
    if setting == "float32":
        return torch.float32
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def resolve_merge_device(setting: str, device: torch.device | str) -> torch.device:
    """Where a round's accumulators and kept task vectors live: the tensors' `device` (``"auto"``) or the
    CPU (``"cpu"``)."""
    if setting not in MERGE_DEVICES:
        raise ValueError(f"merge_device must be one of {', '.join(MERGE_DEVICES)}, got {setting!r}")
    return torch.device("cpu") if setting == "cpu" else torch.device(device)


def round_spec(spec: MergeSpec, round_idx: int) -> MergeSpec:
    """The spec of round `round_idx`: DARE masks are drawn afresh each round (seed mixed with the round)."""
    return replace(spec, seed=tensor_seed(spec.seed, f"atm-round/{round_idx}") % (2**31))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, float32 for everything else (the precision of task vectors)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TaskVectorView(Mapping):
    """``{name: tensors[name] - theta[name]}`` computed lazily, one tensor at a time, into one scratch buffer.

    A task vector without a full-size copy: each value is valid until the next one is read (the
    :class:`DeltaCollector` consumes each tensor before reading the next). Values are float32 (float64 for
    float64 tensors), computed as ``copy(t) - theta`` in that precision (one rounding)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor],
                 scratch: dict | None = None) -> None:
        self.tensors = tensors
        self.theta = theta
        # {(dtype, device): flat buffer}, reusable across tasks and rounds through the caller's dict
        self.scratch = scratch if scratch is not None else {}

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        dtype = _compute_dtype(t.dtype)
        key = ("task-vector-scratch", dtype, t.device)
        buf = self.scratch.get(key)
        if buf is None or buf.numel() < t.numel():
            numel = max(v.numel() for v in self.tensors.values() if v.device == t.device)
            buf = torch.empty(numel, dtype=dtype, device=t.device)
            self.scratch[key] = buf
        out = buf[: t.numel()].view(t.shape)
        return out.copy_(t.detach()).sub_(self.theta[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


class _SpillStore:
    """This rank's task vectors written once to raw files (one per task), for the Gram in sum mode.

    Each tensor is stored flattened; only the flat range ``part(numel)`` of it (all of it, except in
    data_parallel where every rank holds every vector and keeps only its share of the elements)."""

    def __init__(self, directory: str | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hf_atm-gram-", dir=directory))
        # removed even when the round never reaches finish() (an exception in a task's fine-tuning)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self.index: dict[str, dict[str, tuple[int, torch.dtype]]] = {}  # task -> name -> (byte offset, dtype)
        self._files: dict[str, Any] = {}  # task -> open file being written
        self._readers: dict[str, Any] = {}  # task -> open file being read back (one open per task, not per read)
        self._size: dict[str, int] = {}  # task -> bytes written
        self.nbytes = 0

    def _path(self, task: str) -> Path:
        return self.dir / f"task-{list(self.index).index(task)}.bin"

    def write(self, task: str, name: str, t: torch.Tensor, start: int, stop: int) -> None:
        """Append the flat elements ``start:stop`` of `t` (float32; float64 for float64) to `task`'s file."""
        entry = self.index.setdefault(task, {})
        f = self._files.get(task)
        if f is None:
            f = self._files[task] = open(self._path(task), "ab")  # closed by flush() / close()
        arr = t.detach().reshape(-1)[start:stop].to(device="cpu", dtype=_compute_dtype(t.dtype)).contiguous().numpy()
        arr.tofile(f)
        entry[name] = (self._size.get(task, 0), _compute_dtype(t.dtype))
        self._size[task] = self._size.get(task, 0) + arr.nbytes
        self.nbytes += arr.nbytes

    def flush(self) -> None:
        """Close the files being written (before they are read back)."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def read(self, task: str, name: str, start: int, stop: int) -> torch.Tensor | None:
        """Stored elements ``start:stop`` of `task`'s vector of `name` (flat), None when it has none."""
        entry = self.index.get(task, {}).get(name)
        if entry is None:
            return None
        offset, dtype = entry
        # read into a tensor from torch's allocator: matmul kernels can take alignment-dependent paths, and
        # the Gram must not depend on where the bytes came from
        out = torch.empty(stop - start, dtype=dtype)
        f = self._readers.get(task)
        if f is None:
            f = self._readers[task] = open(self._path(task), "rb")  # closed by close()
        f.seek(offset + start * out.element_size())
        f.readinto(out.numpy())
        return out

    def close(self) -> None:
        self.flush()
        for f in self._readers.values():
            f.close()
        self._readers.clear()
        self._cleanup()
        self.index.clear()


class DeltaCollector:
    """Collects one round's task vectors on this rank and produces the merged delta on every rank.

    ``add(task, {name: tau})`` is called once per task this rank fine-tuned (``exchange.my_tasks()``),
    ``finish()`` once per round on every rank (it is a collective). See the module docstring for the modes,
    the Gram, the accumulation dtype and the merge device. `names` are the tensors the round may touch
    (sorted here), `shapes` / `dtypes` their shapes and dtypes. `buffers` is a caller-held dict for
    accumulators reused from round to round (large CPU allocations are otherwise returned to the OS and
    page-faulted in again every round); the delta may alias them until the next round. `spill_dir` is the
    parent of the temporary Gram files (default: the system's temporary directory). `full_shapes`
    (``{name: global shape}``) names the FSDP-sharded tensors, whose `shapes` are this rank's rows (see the
    module docstring).
    """

    def __init__(self, exchange: TaskExchange, spec: MergeSpec, names: Sequence[str],
                 shapes: Mapping[str, torch.Size], dtypes: Mapping[str, torch.dtype],
                 compute_cosine: bool, buffers: dict | None = None, *, merge_device: str = "auto",
                 accumulate: str = "auto", spill_dir: str | os.PathLike | None = None,
                 full_shapes: Mapping[str, torch.Size] | None = None) -> None:
        resolve_merge_device(merge_device, "cpu")  # validate early
        accumulate_dtype(accumulate, "cpu")
        self.ex = exchange
        self.spec = spec
        self.names = sorted(names)
        self.shapes = {n: torch.Size(shapes[n]) for n in self.names}
        self.dtypes = {n: dtypes[n] for n in self.names}
        self.n = len(exchange.tasks)
        self.compute_cosine = compute_cosine
        self.merge_device = merge_device
        self.accumulate = accumulate
        self.mode = "gather" if needs_all_task_vectors(spec.method) else "sum"
        self.full_shapes = {n: torch.Size(s) for n, s in (full_shapes or {}).items()}
        if self.full_shapes and not (exchange.data_parallel or not exchange.distributed):
            raise ValueError("sharded task vectors (full_shapes) need a data_parallel exchange")
        # element-wise methods fold each rank's rows as they are; the others see whole tensors
        self._shard_local = get_method(spec.method).elementwise
        self._sum: dict[str, torch.Tensor] = {}
        self._taus: dict[str, dict[str, torch.Tensor]] = {}
        self._added: set[str] = set()
        self._spill = _SpillStore(None if spill_dir is None else str(spill_dir)) if (
            compute_cosine and self.mode == "sum") else None
        self._buffers = buffers if buffers is not None else {}
        #: the most bytes this collector held at once in accumulators and kept task vectors
        self.peak_bytes = 0
        #: the names exchanged (or merged) by the last ``finish``
        self.exchanged_names: list[str] = []

    # -- accounting
    def held_bytes(self) -> int:
        """Bytes of the tensors this collector holds now: accumulators and kept task vectors (spill files
        on disk excluded: :attr:`spilled_bytes`)."""
        total = sum(t.numel() * t.element_size() for t in self._sum.values())
        return total + sum(t.numel() * t.element_size() for tau in self._taus.values() for t in tau.values())

    @property
    def spilled_bytes(self) -> int:
        """Bytes of task vectors written to the temporary Gram files this round."""
        return self._spill.nbytes if self._spill is not None else 0

    def _track(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.held_bytes())

    # -- collecting
    def add(self, task: str, tau: Mapping[str, torch.Tensor]) -> None:
        """Record the task vector of `task` (names absent from `tau` count as zero). Each tensor is consumed
        during the call (folded, copied or spilled); no reference to the caller's tensors is kept."""
        idx = self.ex.tasks.index(task)
        if task in self._added:
            raise ValueError(f"task {task!r} was already added to this round")
        self._added.add(task)
        unknown = [n for n in tau if n not in self.shapes]
        if unknown:
            raise KeyError(f"task {task!r}: tensors {unknown[:3]} are not among the round's tensors")
        if self.mode == "gather":
            kept = {}
            for name, t in tau.items():
                dev = resolve_merge_device(self.merge_device, t.device)
                kept[name] = t.detach().to(device=dev, dtype=_compute_dtype(self.dtypes[name]), copy=True)
            self._taus[task] = kept
            self._track()
            return
        w = 1.0 if self.spec.weights is None else float(self.spec.weights[idx])
        for name, t in tau.items():
            if self._spill is not None:
                self._spill.write(task, name, t, *self._gram_part(name, t.numel()))
            self._fold(name, t, idx, w)
        self._track()

    def _fold(self, name: str, t: torch.Tensor, idx: int, w: float) -> None:
        """Add task `idx`'s term of tensor `name` to its accumulator."""
        identity = self.spec.method == "task_arithmetic" and w == 1.0 and t.dtype in (torch.float32, torch.float64)
        # the per-task term is computed where the task vector lives (float32), then folded where the
        # accumulator lives
        if identity:
            term = t
        elif name in self.full_shapes and not self._shard_local:  # whole-tensor masks / ranks: transform it whole
            whole = gather_rows(self.ex, t, self.full_shapes[name])
            term = local_rows(per_task_transform(self.spec, whole, idx, name, self.n), self.ex.rank,
                              self.ex.world_size)
        else:
            term = per_task_transform(self.spec, t, idx, name, self.n)
        acc = self._sum.get(name)
        if acc is None:
            dev = resolve_merge_device(self.merge_device, t.device)
            dtype = accumulate_dtype(self.accumulate, dev, self.dtypes[name])
            acc = self._buffers.get(("acc", name))
            if acc is None or acc.shape != t.shape or acc.device != dev or acc.dtype != dtype:
                acc = torch.empty(t.shape, dtype=dtype, device=dev)
                self._buffers[("acc", name)] = acc
            acc.copy_(term)
            self._sum[name] = acc
        else:
            acc.add_(term.to(acc.device))  # in the accumulator's dtype (in-place type promotion)

    # -- merging
    def finish(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The merged delta ``{name: scale * combine(tau_1..tau_n)}`` for every name some task touched
        (float32 / float64, on the merge device) and the n x n float64 Gram matrix of the task vectors on
        the CPU (None without ``compute_cosine``). A collective: call it on every rank."""
        try:
            if self.mode == "sum":
                delta = self._finish_sum()
                gram = self._spilled_gram() if self._spill is not None else None
                return delta, gram
            return self._finish_gather()
        finally:
            self.close()

    def close(self) -> None:
        """Drop what this round holds (accumulators stay in `buffers` for reuse) and the spill files."""
        self._sum.clear()
        self._taus.clear()
        if self._spill is not None:
            self._spill.close()

    def _touched(self) -> dict[str, torch.dtype]:
        """``{name: dtype}`` of the names some task touched on some rank, in sorted order, with the dtype
        every rank uses for it (the widest any rank holds). One small all-reduce (max) of a code per name."""
        codes = torch.zeros(len(self.names), dtype=torch.float32)  # small exact codes, no float64 on a GPU
        for j, name in enumerate(self.names):
            if self.mode == "sum":
                acc = self._sum.get(name)
                codes[j] = _DTYPE_CODE[acc.dtype] if acc is not None else 0.0
            elif any(name in tau for tau in self._taus.values()):
                codes[j] = _DTYPE_CODE[_compute_dtype(self.dtypes[name])]
        if not self.ex.merge_is_local:
            codes = self.ex.all_reduce_max(codes)
        return {name: _CODE_DTYPE[int(c)] for name, c in zip(self.names, codes.tolist()) if c > 0}

    def _finish_sum(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        touched = self._touched()
        self.exchanged_names = list(touched)
        for name, dtype in touched.items():
            local = self._sum.get(name)
            if local is None:
                local = torch.zeros(self.shapes[name], dtype=dtype, device=self._home_device())
            elif local.dtype != dtype:
                local = local.to(dtype)
            total = local if self.ex.merge_is_local else self.ex.all_reduce_sum(local)
            # average already divides by the total weight and takes no scale
            if self.spec.scale != 1.0:
                total = total.mul_(self.spec.scale)
            out[name] = total.to(_compute_dtype(self.dtypes[name]))
        return out

    def _home_device(self) -> torch.device:
        """Where this rank's accumulators live (the CPU when it has none: a rank without tasks)."""
        for acc in self._sum.values():
            return acc.device
        return torch.device("cpu")

    def _gathered(self, name: str, local: list[torch.Tensor], shape: torch.Size, dtype: torch.dtype) -> list[torch.Tensor]:
        """All tasks' tensors of `name` in task order, from this rank's `local` ones (my_tasks order)."""
        if self.ex.merge_is_local:
            return local
        w = self.ex.world_size
        slots = -(-self.n // w)
        rows = self.ex.all_gather_chunks(local, shape, dtype, slots)
        # task j is the (j // w)-th task of its owner
        return [rows[owner_of(j, w) * slots + j // w] for j in range(self.n)]

    def _finish_gather(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        mine = self.ex.my_tasks()
        gram = torch.zeros(self.n, self.n, dtype=torch.float64) if self.compute_cosine else None
        out: dict[str, torch.Tensor] = {}
        touched = self._touched()
        self.exchanged_names = list(touched)
        for name, dtype in touched.items():
            shape = self.shapes[name]
            device = next((self._taus[t][name].device for t in mine if name in self._taus.get(t, {})), None)
            local = [self._taus.get(t, {}).get(name) for t in mine]
            local = [v if v is not None else torch.zeros(shape, dtype=dtype, device=device) for v in local]
            taus = self._gathered(name, local, shape, dtype)
            if device is not None:
                taus = [t.to(device) for t in taus]
            full = self.full_shapes.get(name)
            if full is not None:  # sharded: merge the whole tensor (gathered from every rank), keep my rows
                taus = [gather_rows(self.ex, t, full) for t in taus]
                out[name] = local_rows(merge_deltas(self.spec, taus, name), self.ex.rank, self.ex.world_size).clone()
            else:
                out[name] = merge_deltas(self.spec, taus, name)
            if gram is not None:
                accumulate_gram(gram, taus)
            for t in mine:  # release this tensor's copies as soon as it is merged
                self._taus.get(t, {}).pop(name, None)
        return out, gram

    def _gram_part(self, name: str, numel: int) -> tuple[int, int]:
        """The flat elements of a tensor whose Gram terms this rank computes: all of them, except in
        data_parallel with several processes (every rank holds every task vector), where each rank takes a
        contiguous share and the partial Grams are summed; a sharded tensor's local rows are this rank's
        share already."""
        ex = self.ex
        if not (ex.data_parallel and ex.distributed) or name in self.full_shapes:
            return 0, numel
        base, extra = divmod(numel, ex.world_size)
        start = ex.rank * base + min(ex.rank, extra)
        return start, start + base + (1 if ex.rank < extra else 0)

    def _spilled_gram(self) -> torch.Tensor:
        """The Gram matrix of every task's vector, streamed from the spill files in flat chunks of at most
        ``_GRAM_CHUNK_ELEMENTS`` values over all tasks (one all_gather per chunk across task-parallel ranks;
        in data_parallel one all-reduce of the partial Grams)."""
        assert self._spill is not None
        self._spill.flush()
        mine = self.ex.my_tasks()
        gram = torch.zeros(self.n, self.n, dtype=torch.float64)
        step = max(1, _GRAM_CHUNK_ELEMENTS // max(1, self.n))
        for name in self.exchanged_names:
            dtype = _compute_dtype(self.dtypes[name])  # the task vectors' precision, as in gather mode
            start, stop = self._gram_part(name, self.shapes[name].numel())
            for a in range(0, stop - start, step):
                b = min(stop - start, a + step)
                local = []
                for t in mine:
                    v = self._spill.read(t, name, a, b)
                    local.append(v if v is not None else torch.zeros(b - a, dtype=dtype))
                accumulate_gram(gram, self._gathered(name, local, torch.Size([b - a]), dtype))
        if self.ex.data_parallel and self.ex.distributed:
            gram = self.ex.all_reduce_sum(gram)
        return gram


def merge_round(
    spec: MergeSpec,
    taus: Mapping[str, Mapping[str, torch.Tensor]],
    shapes: Mapping[str, torch.Size],
    dtypes: Mapping[str, torch.dtype] | None = None,
    *,
    compute_cosine: bool = False,
    merge_device: str = "auto",
    accumulate: str = "auto",
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Merge the task vectors `taus` (``{task: {name: tensor}}``) in one process, as one ATM round does.

    Tasks are taken in sorted order: a task's position there is its index for ``spec.weights`` and DARE
    seeds. Names outside `shapes` are ignored; names no task vector holds are absent from the delta. Returns
    ``(delta, gram)`` exactly as :meth:`DeltaCollector.finish` (the same arithmetic as the trainer's round).
    `dtypes` defaults to float32 for every name."""
    tasks = sorted(taus)
    names = list(shapes)
    collector = DeltaCollector(local_exchange(tasks), spec, names, shapes,
                               dtypes if dtypes is not None else {n: torch.float32 for n in names},
                               compute_cosine, merge_device=merge_device, accumulate=accumulate)
    try:
        for task in tasks:
            collector.add(task, {n: t for n, t in taus[task].items() if n in collector.shapes})
    except BaseException:
        collector.close()
        raise
    return collector.finish()
