"""The streaming merge: checkpoints are read, merged and written tensor by tensor.

:func:`merge_checkpoints` (what ``hf-atm merge`` runs, through :func:`hf_atm.lora.merge.run_merge`, which passes
the :class:`~hf_atm.merging.sources.ModelSources` that read LoRA adapters as base + delta):

1. checks the output folder (non-empty without ``overwrite`` is refused before any work), resolves the base
   and the models (local folders or Hub ids), opens every weights file once and compares the headers: the
   same tensor names, shapes, and floating / non-floating dtypes everywhere, else CheckpointError naming the
   tensor and both files (:mod:`hf_atm.merging.preflight`, which compares Hub inputs from their headers first,
   before any weight download);
2. plans the output (names in the base's storage order, dtypes, shards), locks the output, checks the free
   space against the planned shards and writes into a temporary folder beside the output
   (``.<name>.tmp-<hex>``), streaming each merged tensor straight into its shard;
3. copies the base's config and tokenizer / processor files, writes ``merge_config.yaml`` and README.md;
4. moves the temporary folder into place (with ``overwrite``, swapped atomically with the old folder, which
   goes only now). On any error, SIGINT or SIGTERM the temporary folder is removed and the old output, if any,
   is untouched (:func:`hf_atm.merging.output.staged_output`).

Memory stays bounded by the tensors in flight (:func:`_stream`, :mod:`hf_atm.merging.pipeline`): a reader
thread reads the next tensors ahead while worker threads (``--threads``) merge and a writer thread writes the
finished ones in order; inputs are zero-copy views of the files' memory maps whose pages are released after
use, outputs go straight to disk. For the element-wise methods (``average``, ``linear``, ``task_arithmetic``)
tensors are processed in blocks of ``chunk_elements`` (bit-identical to the whole-tensor result: every
operation is element-wise). ``ties`` / ``dare_ties`` / ``breadcrumbs`` / ``breadcrumbs_ties``
(:data:`~hf_atm.merging.spec.SLICED_METHODS`) first compute their per-task whole-tensor statistics (exact
magnitude cuts, one model at a time, its pages dropped after; DARE masks) with
:func:`~hf_atm.merging.spec.plan_tensor`, then merge the blocks in parallel, also bit-identical. The SVD
methods get whole tensors. Computation is float32 (float64 for float64 inputs), with torch's intra-op threads
at 1 (:func:`torch_threads`): the bytes written depend neither on ``--threads`` nor on the machine. With
``--device cuda`` each tensor is merged on the GPU.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.hub.resolve import (
    COMPANION_FILE_PATTERNS,
    is_local_reference,
    pin_revision,
    resolve_model,
    split_revision,
)
from hf_atm.merging import methods as M
from hf_atm.merging.config import MergeConfig
from hf_atm.merging.conventions import all_finite
from hf_atm.merging.io import CheckpointReader, ShardedWriter, TensorInfo, iter_chunks
from hf_atm.merging.output import check_free_space, check_output, staged_output
from hf_atm.merging.pipeline import InFlight, Pool, done, run_ordered
from hf_atm.merging.preflight import check_hub_inputs, check_same_tensors
from hf_atm.merging.registry import METHODS, get_method
from hf_atm.merging.sources import CHECKPOINTS, ModelSources
from hf_atm.merging.spec import MergeSpec, TensorPlan, merge_tensor, plan_tensor

__all__ = [
    "CHUNK_ELEMENTS",
    "COPY_PATTERNS",
    "ELEMENTWISE_METHODS",
    "MergeResult",
    "merge_checkpoints",
    "merge_state_dicts_in_memory",
    "run_merge",
]

#: Methods whose per-tensor result is element-wise in the inputs, so large tensors can be merged in slices
#: (the registry's ``sliced`` methods are too, after a whole-tensor first phase).
ELEMENTWISE_METHODS: frozenset[str] = frozenset(m for m in METHODS if get_method(m).elementwise)
#: Slice size (elements) for element-wise methods: 1M float32 = 4 MB per input, cache-friendly.
CHUNK_ELEMENTS = 1 << 20
#: Files copied from the base into the output (top level only); the config is rewritten when --dtype is set.
COPY_PATTERNS: tuple[str, ...] = COMPANION_FILE_PATTERNS


@dataclass(frozen=True)
class MergeResult:
    """What a merge produced: the output folder, tensor and shard counts, bytes of weights and wall seconds."""

    output: Path
    num_tensors: int
    num_shards: int
    total_bytes: int
    seconds: float


# --------------------------------------------------------------------------------------------- per tensor
def _merge_one(spec: MergeSpec, base: torch.Tensor, models: Sequence[torch.Tensor], name: str,
               out_dtype: torch.dtype) -> torch.Tensor:
    """merge_tensor(...) for a floating tensor, returned in `out_dtype` (merge_tensor computes in float32 /
    float64 and casts once, so there is no rounding to the base's dtype on the way to another one)."""
    return merge_tensor(spec, base, models, name, out_dtype=out_dtype)


def _nonfinite_error(name: str, tensor: torch.Tensor, file: Path) -> CheckpointError:
    kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
    return CheckpointError(f"tensor {name!r} in {file} contains {kind} values; refusing to merge non-finite weights")


def check_finite_inputs(name: str, tensors: Sequence[torch.Tensor], files: Sequence[Path]) -> None:
    """CheckpointError naming tensor `name` and the first of `files` whose tensor holds a NaN / inf."""
    for t, file in zip(tensors, files):
        if not all_finite(t):
            raise _nonfinite_error(name, t, file)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block, restored after.

    The engine computes with 1: reductions (norms, sums) and BLAS / LAPACK calls (SVD) round differently with
    another thread count, so this keeps a merge's bytes independent of ``--threads`` and of the machine's cores;
    its parallelism comes from worker threads instead (measured faster on 2 cores: 3.9 s vs 5.4 s for a 4-model
    BERT-base TIES merge, against 2 workers x 2 intra-op threads).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def merge_state_dicts_in_memory(
    spec: MergeSpec,
    base_sd: Mapping[str, torch.Tensor],
    model_sds: Sequence[Mapping[str, torch.Tensor]],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The reference merge of whole state dicts: what :func:`merge_checkpoints` writes, tensor for tensor.

    For every name of `base_sd` (in its order): non-floating tensors are copied from the base; floating ones
    are ``merge_tensor(spec, base, models, name)``, or, when `dtype` differs from the base's, the float32 (float64)
    merge cast once to `dtype`, computed with torch's intra-op threads set to 1 as the engine computes (see
    :func:`torch_threads`). Raises CheckpointError when a model lacks a tensor.
    """
    spec.validate(len(model_sds))
    with torch_threads(1):
        return _merge_state_dicts(spec, base_sd, model_sds, dtype)


def _merge_state_dicts(spec: MergeSpec, base_sd: Mapping[str, torch.Tensor],
                       model_sds: Sequence[Mapping[str, torch.Tensor]], dtype: torch.dtype | None) -> dict:
    out: dict[str, torch.Tensor] = {}
    for name, b in base_sd.items():
        if not b.is_floating_point():
            out[name] = b.clone()
            continue
        try:
            ms = [sd[name] for sd in model_sds]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is missing from a model state dict") from None
        if dtype is None or dtype == b.dtype:
            out[name] = merge_tensor(spec, b, ms, name)  # the plain definition, independent of the engine's path
        else:
            out[name] = _merge_one(spec, b, ms, name, dtype)
    return out


# -------------------------------------------------------------------------------------------------- checks
def _check_output_vs_inputs(out: Path, inputs: Mapping[str, Path]) -> None:
    """The output may be neither an input folder nor one of its parents (overwriting would destroy it)."""
    target = out.resolve()
    for ref, path in inputs.items():
        p = path.resolve()
        if p == target or target in p.parents:
            raise MergeConfigError(f"output: {out} is or contains the input {ref!r} ({p}); choose another folder")


# ------------------------------------------------------------------------------------------------- helpers
def _resolve(ref: str, config: MergeConfig) -> tuple[Path, str | None]:
    """(local folder, Hub commit or None) for a reference; ``config.revisions`` pins unpinned Hub ids."""
    pinned = pin_revision(ref, config.revisions)
    path = resolve_model(pinned, allow_pickle=config.allow_pickle)
    if is_local_reference(ref):
        return path, None
    if path.parent.name == "snapshots":
        return path, path.name
    return path, split_revision(pinned)[1]


def _copy_base_files(base: Path, dest: Path, dtype: str | None) -> list[str]:
    """Copy the base's config / tokenizer / processor files; with `dtype`, record it in config.json."""
    copied = []
    for src in sorted(base.iterdir()):
        if not src.is_file() or not any(fnmatch.fnmatch(src.name, pat) for pat in COPY_PATTERNS):
            continue
        if src.name == "config.json" and dtype is not None:
            try:
                cfg = json.loads(src.read_text(encoding="utf-8"))
            except ValueError as e:
                raise CheckpointError(f"corrupt config {src}: {e}") from e
            keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
            for k in keys:
                cfg[k] = dtype
            (dest / src.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(src, dest / src.name)
        copied.append(src.name)
    return copied


def default_threads() -> int:
    """The CPU cores this process may run on (what ``--threads`` defaults to)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` / ``cuda:N``, or ``auto`` (cuda when ``torch.cuda.is_available()``, else cpu) as a
    torch.device; MergeConfigError naming ``device`` for anything else, or cuda where CUDA is not available."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise MergeConfigError(f"device: expected cpu, cuda, cuda:N or auto, got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise MergeConfigError(f"device: expected cpu, cuda, cuda:N or auto, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeConfigError(
                f"device: {device!r} asked for, but torch.cuda.is_available() is False here (no CUDA build of "
                "torch or no GPU); use --device cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MergeConfigError(f"device: {device!r}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


#: Elements per step inside a job: the cache-sized unit of element-wise work (see methods.SLICE_ELEMENTS).
_SUB_ELEMENTS = M.SLICE_ELEMENTS
#: Elements per step of the element-wise work on a GPU (few large kernels; one tensor's inputs are there anyway).
_DEVICE_BLOCK = 1 << 24


def _ranges(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    """``iter_chunks`` of ``[start, stop)``; one empty range for an empty tensor (it still takes one write)."""
    if stop <= start:
        return [(start, start)]
    return [(start + a, start + b) for a, b in iter_chunks(stop - start, step)]


@dataclass
class _Read:
    """What the reader thread hands over for one tensor: the input views (None for a vocabulary tensor, which
    :class:`VocabMerge` reads itself) and whether their pages were populated and are held until it is written."""

    inputs: list[torch.Tensor] | None
    hold: bool


class _TensorJob:
    """The work of one floating tensor (its inputs: base first, then the models), as jobs for the pool.

    Every method computes what the sequential engine did, with the same ops (slices are cache-sized pieces of
    the engine's ``chunk_elements`` blocks; every path is slicing-invariant, so the bits are the same).
    Input pages are dropped as they are used unless `hold` (small tensors: read ahead whole, dropped once written).
    """

    def __init__(self, spec: MergeSpec, name: str, inputs: list[torch.Tensor], infos: list[TensorInfo],
                 readers: Sequence[CheckpointReader], out_dtype: torch.dtype, hold: bool) -> None:
        self.spec, self.name, self.inputs, self.infos = spec, name, inputs, infos
        self.readers, self.out_dtype, self.hold = readers, out_dtype, hold
        self.numel = inputs[0].numel()

    def _release(self, i: int, t: torch.Tensor) -> None:
        if not self.hold:
            self.readers[i].release(t)

    def _release_range(self, start: int, stop: int) -> None:
        if not self.hold:
            for i, t in enumerate(self.inputs):
                self.readers[i].release(t.reshape(-1)[start:stop])

    def check_inputs(self, xs: Sequence[torch.Tensor] | None = None) -> None:
        """Every input finite, base first (methods that are not element-wise check before merging)."""
        if xs is not None:
            check_finite_inputs(self.name, xs, [info.file for info in self.infos])
            return
        for i, (t, info) in enumerate(zip(self.inputs, self.infos)):
            check_finite_inputs(self.name, [t], [info.file])
            if i > 0:
                self._release(i, t)  # checked: drop its pages now rather than hold every model's at once

    def _elementwise(self, xs: Sequence[torch.Tensor], start: int, stop: int, step: int,
                     to_host: bool = False) -> list[torch.Tensor]:
        spec, name = self.spec, self.name
        flat = [t.reshape(-1) for t in xs]
        pieces, overflow = [], False
        for s, e in _ranges(start, stop, step):
            part = [f[s:e] for f in flat]
            if spec.method == "average" and not all_finite(part[0]):  # average's result ignores the base
                raise _nonfinite_error(name, part[0], self.infos[0].file)
            merged = _merge_one(spec, part[0], part[1:], name, self.out_dtype)
            if not all_finite(merged):
                # Linear methods propagate any NaN / Inf of an input, so checking the result suffices; when the
                # result alone overflowed (finite inputs) it is written as is, with a warning.
                self.check_inputs(part)
                overflow = True
            pieces.append(merged.cpu() if to_host else merged)
        if overflow:
            warnings.warn(f"tensor {name!r}: the merged values overflow {self.out_dtype}", stacklevel=2)
        return pieces

    def elementwise_block(self, start: int, stop: int) -> list[torch.Tensor]:
        pieces = self._elementwise(self.inputs, start, stop, _SUB_ELEMENTS)
        self._release_range(start, stop)
        return pieces

    def sliced(self, pool: Pool, chunk_elements: int) -> list:
        """Phase 1 (magnitude cuts / DARE masks over the whole tensor, one model at a time), the inputs' check,
        then the phase-2 blocks: parallel jobs when the plan is stateless, else in order here.

        The check comes after phase 1 and is skipped when the cuts saw every ``|M_i - BASE|`` finite (then every
        input is: see :func:`~hf_atm.merging.methods.cuts_saw_finite`), saving a pass over every input; it
        raises the same error as checking first would, phase 1 having written nothing."""
        # The base as it is stored: plan_tensor widens it to the compute dtype for phase 1 only, merge_slice each
        # slice (the same values: no half-precision copy of the base lives through phase 2).
        b = self.inputs[0]
        plan = plan_tensor(self.spec, b, self.inputs[1:], self.name, self.out_dtype,
                           on_task_read=lambda i, t: self._release(i + 1, t))
        if not M.cuts_saw_finite(plan.combine):
            self.check_inputs()
        blocks = _ranges(0, self.numel, chunk_elements)
        if pool.parallel and plan.stateless:
            return [pool.submit(self.plan_block, plan, b, s, e, False) for s, e in blocks]
        return [self.plan_block(plan, b, s, e, True) for s, e in blocks]

    def plan_block(self, plan: TensorPlan, base: torch.Tensor, start: int, stop: int, ordered: bool,
                   step: int = _SUB_ELEMENTS, to_host: bool = False) -> list[torch.Tensor]:
        fb, fm = base.reshape(-1), [t.reshape(-1) for t in self.inputs[1:]]
        merge = plan.merge_slice if ordered else plan.merge_slice_at
        pieces = []
        for s, e in _ranges(start, stop, step):
            merged = merge(fb[s:e], [m[s:e] for m in fm], s)
            pieces.append(merged.cpu() if to_host else merged)
        self._release_range(start, stop)
        return pieces

    def whole(self) -> list:
        self.check_inputs()
        return [[_merge_one(self.spec, self.inputs[0], self.inputs[1:], self.name, self.out_dtype)]]

    def on_device(self, device: torch.device, elementwise: bool, sliced: bool, chunk_elements: int) -> list:
        """The whole tensor on `device`: its inputs copied there (then their pages dropped), merged there, the
        result copied back to the host in blocks. Same ops as on the CPU; random masks are drawn on CPU
        generators either way."""
        xs = [t.to(device) for t in self.inputs]
        for i, t in enumerate(self.inputs):
            self._release(i, t)
        block = max(chunk_elements, _DEVICE_BLOCK)
        if elementwise:
            return [self._elementwise(xs, 0, self.numel, block, to_host=True)]
        self.check_inputs(xs)
        if sliced and self.numel > chunk_elements:
            plan = plan_tensor(self.spec, xs[0], xs[1:], self.name, self.out_dtype)
            job = _TensorJob(self.spec, self.name, xs, self.infos, self.readers, self.out_dtype, hold=True)
            return [job.plan_block(plan, xs[0], 0, self.numel, True, step=block, to_host=True)]
        return [[_merge_one(self.spec, xs[0], xs[1:], self.name, self.out_dtype).cpu()]]


def _stream(
    specs: Mapping[str, MergeSpec],
    base: CheckpointReader,
    models: Sequence[CheckpointReader],
    out_dtypes: Mapping[str, torch.dtype],
    writer: ShardedWriter,
    progress: bool,
    chunk_elements: int,
    vocab: VocabMerge | None = None,
    *,
    threads: int | None = None,
    device: str | torch.device | None = "cpu",
    in_flight: InFlight | None = None,
    device_path: bool = False,
) -> InFlight:
    """Merge every tensor of the base (in its storage order) into `writer` with its own spec (``specs[name]``;
    one method for all), through the bounded pipeline of :func:`hf_atm.merging.pipeline.run_ordered`.

    A reader thread fetches each tensor's inputs (zero-copy views) and starts their read-ahead (tensors whose
    inputs fit in half the byte budget get their pages populated, the rest only read into the page cache); the
    calling thread schedules the tensor's jobs (``threads`` workers, default :func:`default_threads`; the
    calling thread itself for 1): element-wise methods in blocks of `chunk_elements`, the sliced ones a first
    phase then parallel blocks, the others the whole tensor; a writer thread writes the results in order. At
    most `in_flight` tensors (default: ``2 * threads + 2`` and :data:`~hf_atm.merging.pipeline.IN_FLIGHT_BYTES`)
    are between being read and being written. torch's own threads are set to 1 meanwhile (restored after), so
    every op computes the same bits whatever ``threads`` is. `device` ``cuda`` (or ``auto`` with CUDA): one
    tensor at a time is copied to the GPU, merged there, and copied back for the writer (`device_path` runs
    that path on the CPU, for tests). `vocab` merges the vocabulary tensors row-aligned (on the CPU).
    Returns the budget (its ``peak``: the most tensors in flight at once).
    """
    record = get_method(next(iter(specs.values())).method) if specs else get_method("task_arithmetic")
    elementwise = record.elementwise
    sliced = record.plan is not None
    readers = [base, *models]
    dev = resolve_device(device)
    on_device = dev.type != "cpu" or device_path
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise MergeConfigError(f"threads: expected a positive integer, got {threads!r}")
    workers = 1 if on_device else (default_threads() if threads is None else threads)
    flight = in_flight if in_flight is not None else InFlight()
    hold_bytes = flight.max_bytes // 2
    vocab_names = vocab.names if vocab is not None else frozenset()
    bar = tqdm(total=len(base.names), unit="tensor", desc="merging", disable=not progress, dynamic_ncols=True)

    def size(name: str) -> int:
        """The tensor's inputs and output, counted at most `hold_bytes`: a larger tensor is not read ahead
        whole and drops its pages as it goes, so it leaves room for smaller ones beside it."""
        info = base.info(name)
        nbytes = info.nbytes * 2  # the base and the output
        if info.dtype.is_floating_point:
            nbytes += sum(r.info(name).nbytes for r in models)
        return max(1, min(nbytes, hold_bytes))

    def read(name: str) -> _Read:
        if name in vocab_names:
            return _Read(None, False)
        b = base.get(name)
        inputs = [b] if not b.is_floating_point() else [b, *(r.get(name) for r in models)]
        hold = sum(t.numel() * t.element_size() for t in inputs) <= hold_bytes
        for r, t in zip(readers, inputs):
            prefetch = getattr(r, "prefetch", None)  # LoRA sources compute their tensors: nothing to read ahead
            if prefetch is not None:
                prefetch(t, populate=hold)
        return _Read(inputs, hold)

    def submit(name: str, item: _Read, pool: Pool):
        spec, out_dtype = specs[name], out_dtypes[name]
        if item.inputs is None:
            assert vocab is not None
            return pool.submit(lambda: [[vocab.merge(spec, name, base, models, out_dtype)]])
        b = item.inputs[0]
        if not b.is_floating_point():
            return done([[b]])  # non-floating tensors (position ids...) are the base's
        job = _TensorJob(spec, name, item.inputs, [r.info(name) for r in readers], readers, out_dtype, item.hold)
        if on_device:
            return pool.submit(job.on_device, dev, elementwise, sliced, chunk_elements)
        if elementwise:
            return done([pool.submit(job.elementwise_block, s, e) for s, e in _ranges(0, job.numel, chunk_elements)])
        if sliced and job.numel > chunk_elements:
            return pool.submit(job.sliced, pool, chunk_elements)
        return pool.submit(job.whole)

    def finish(name: str, item: _Read) -> None:
        for r, t in zip(readers, item.inputs or ()):
            r.release(t)
        bar.update()

    try:
        with torch_threads(1):
            return run_ordered(base.names, size=size, read=read, submit=submit, write=writer.write, finish=finish,
                               workers=workers, in_flight=flight)
    finally:
        bar.close()

# ------------------------------------------------------------------------------------------------ the merge
def run_merge(config: MergeConfig, *, chunk_elements: int = CHUNK_ELEMENTS,
              sources: ModelSources = CHECKPOINTS) -> MergeResult:
    """Run the merge described by `config` (see the module docstring) and report what it wrote.

    `sources`: how the models are opened (:class:`~hf_atm.merging.sources.ModelSources`); the default reads full
    checkpoints only, :func:`hf_atm.lora.merge.run_merge` (``hf_atm.run_merge``) passes the LoRA-aware ones.
    Raises MergeConfigError / CheckpointError / OutputExistsError / HubError naming what is at fault; on
    any error nothing is left at ``config.output`` that was not there before.
    """
    from hf_atm.hub.card import architectures_of, merge_model_card
    from hf_atm.version import __version__

    t0 = time.perf_counter()
    config.validate()
    if chunk_elements < 1:
        raise MergeConfigError(f"chunk_elements must be positive, got {chunk_elements}")
    out = Path(config.output).expanduser()
    check_output(out, config.overwrite)  # before any work; checked again under the output's lock

    # Hub inputs compared from config.json + safetensors headers before any weight download
    check_hub_inputs(config.base, config.models, revisions=config.revisions,
                     tokenizer_source=config.tokenizer_source, allow_pickle=config.allow_pickle,
                     read_adapter_config=sources.read_adapter_config, check_adapter=sources.check_adapter)

    model_paths, resolved, revisions = [], {}, {}
    for ref in config.models:
        path, rev = _resolve(ref, config)
        model_paths.append(path)
        resolved[ref] = path
        if rev:
            revisions[ref] = rev
    if config.base is None:
        if config.spec.record.needs_base:
            config = replace(config, base=sources.infer_base(config.models, model_paths))
        else:  # average / linear use no base values: the first model gives the layout and the files
            config = replace(config, base=config.models[0])
    base_path, base_rev = _resolve(config.base, config)
    resolved = {config.base: base_path, **resolved}
    if base_rev:
        revisions[config.base] = base_rev
    _check_output_vs_inputs(out, resolved)
    if not (base_path / "config.json").is_file():
        raise CheckpointError(f"base {config.base}: {base_path / 'config.json'} is missing (the output needs it)")

    with ExitStack() as stack:
        base_reader = stack.enter_context(
            CheckpointReader(base_path, allow_pickle=config.allow_pickle, label=config.base)
        )
        # With LoRA-aware sources a model may be a peft adapter folder, read as "base + adapter delta".
        model_readers = [
            stack.enter_context(sources.open(p, base_reader, allow_pickle=config.allow_pickle, label=ref))
            for ref, p in zip(config.models, model_paths)
        ]
        base, models = _tie_as_base(base_path, base_reader, model_paths, model_readers)
        vocab = _plan_vocab(config, base_path, model_paths, base, models)
        check_same_tensors(base, models, vocab.names if vocab is not None else frozenset())
        specs = config.parameters.specs(base.names, len(models))
        cast = config.torch_dtype
        out_dtypes = {}
        for name in base.names:
            dt = base.info(name).dtype
            out_dtypes[name] = cast if cast is not None and dt.is_floating_point else dt
        plan = [(n, out_dtypes[n], _output_shape(base, n, vocab)) for n in base.names]

        # Locks the output, stages it in .<name>.tmp-<hex> and swaps it in when the block ends (output.py).
        tmp = stack.enter_context(staged_output(out, config.overwrite))
        writer = ShardedWriter(tmp, plan, config.max_shard_bytes)
        check_free_space(tmp, writer.planned_bytes, f"the {writer.num_shards} planned shard(s) of {out}")
        try:
            _stream(specs, base, models, out_dtypes, writer, config.progress, chunk_elements, vocab,
                    threads=config.threads, device=config.device)
            files = writer.finish()
            _copy_base_files(base_path, tmp, config.dtype)
            _write_tokenizer(config, tmp, base_path, model_paths, vocab)
            record = replace(config, revisions={**config.revisions, **revisions})
            yaml_text = record.to_yaml(version=__version__)
            (tmp / "merge_config.yaml").write_text(yaml_text, encoding="utf-8")
            card = merge_model_card(
                base=config.base,
                models=config.models,
                method=config.spec.method,
                options={**config.spec.to_dict(), **config.tensor_options},
                config_yaml=yaml_text,
                resolved={k: str(v) for k, v in resolved.items()},
                revisions=record.revisions,
                version=__version__,
                architectures=architectures_of(base_path),
            )
            card.save(tmp / "README.md")
        except BaseException:
            writer.abort()
            raise
    return MergeResult(out, len(plan), len(files), writer.total_size, time.perf_counter() - t0)


def _tie_as_base(base_path: Path, base: CheckpointReader, model_paths: Sequence[Path],
                 models: Sequence[CheckpointReader]) -> tuple[CheckpointReader, list[CheckpointReader]]:
    """The readers as the output's tying (the base's) sees them: see :func:`hf_atm.merging.vocab.tie_as_base`
    (a model folder without config.json is a LoRA adapter, read as base + delta: left as it is)."""
    from hf_atm.merging.vocab import tie_as_base

    folders = [p if (Path(p) / "config.json").is_file() else None for p in model_paths]
    return tie_as_base(base, base_path, models, folders)


@dataclass(frozen=True)
class VocabMerge:
    """The vocabulary tensors of a ``tokenizer_source`` merge and how their rows line up (a VocabPlan)."""

    plan: object  # hf_atm.merging.vocab.VocabPlan
    names: frozenset[str]

    def merge(self, spec: MergeSpec, name: str, base: CheckpointReader, models: Sequence[CheckpointReader],
              out_dtype: torch.dtype) -> torch.Tensor:
        """Tensor `name` merged row by row: each block of rows with only the models that have its tokens."""
        from hf_atm.merging.vocab import merge_vocab_tensor

        readers = [base, *models]
        inputs = [r.get(name) for r in readers]
        check_finite_inputs(name, inputs, [r.info(name).file for r in readers])
        record = spec.record

        def merge_rows(indices: list[int], base_rows: torch.Tensor, model_rows: list[torch.Tensor]) -> torch.Tensor:
            if len(indices) < record.min_models:  # e.g. model_stock's rows held by one model: its plain mean
                sub = MergeSpec(method="task_arithmetic", scale=1.0 / len(indices))
            else:
                sub = spec.for_models(indices)
            return _merge_one(sub, base_rows, model_rows, name, out_dtype)

        merged = merge_vocab_tensor(self.plan, name, inputs[0], inputs[1:], merge_rows, out_dtype=out_dtype)
        for r, t in zip(readers, inputs):
            r.release(t)
        return merged


def _plan_vocab(config: MergeConfig, base_path: Path, model_paths: Sequence[Path], base: CheckpointReader,
                models: Sequence[CheckpointReader]) -> VocabMerge | None:
    """The row alignment of ``config.tokenizer_source`` (None without the option or when nothing differs)."""
    if config.tokenizer_source is None:
        return None
    from hf_atm.merging.vocab import embedding_rows, plan_vocabulary, vocab_tensor_names

    for ref, path in zip(config.models, model_paths):
        if not (Path(path) / "config.json").is_file():
            raise MergeConfigError(f"tokenizer_source: model {ref} is a LoRA adapter; its vocabulary is the base's")
    readers = [base, *models]
    plan = plan_vocabulary(base_path, model_paths, [str(m) for m in config.models], config.tokenizer_source,
                           base_label=str(config.base), rows=[embedding_rows(r) for r in readers])
    if plan is None or not plan.needs_alignment:
        return VocabMerge(plan, frozenset()) if plan is not None else None
    return VocabMerge(plan, frozenset(vocab_tensor_names(readers)))


def _output_shape(base: CheckpointReader, name: str, vocab: VocabMerge | None) -> tuple[int, ...]:
    shape = tuple(base.info(name).shape)
    if vocab is not None and name in vocab.names:
        return (vocab.plan.num_rows, *shape[1:])  # type: ignore[attr-defined]
    return shape


def _write_tokenizer(config: MergeConfig, dest: Path, base_path: Path, model_paths: Sequence[Path],
                     vocab: VocabMerge | None) -> None:
    """The output's tokenizer: the base's (copied with its other files) unless ``tokenizer_source`` names
    another; then config.json's ``vocab_size`` follows the merged rows. Without the option, a model whose chat
    template differs from the base's gets a warning (its template is not in the output)."""
    if vocab is not None:
        from hf_atm.merging.vocab import output_vocab_size, write_tokenizer

        write_tokenizer(vocab.plan, dest)
        cfg_path = dest / "config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        size = output_vocab_size(vocab.plan)
        if cfg.get("vocab_size") != size:
            cfg["vocab_size"] = size
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return
    if config.tokenizer_source is not None:
        return
    own = _chat_template(base_path)
    for ref, path in zip(config.models, model_paths):
        theirs = _chat_template(Path(path))
        if theirs is not None and theirs != own:
            warnings.warn(
                f"model {ref} has its own chat template, which the output does not carry (it has the base's "
                f"tokenizer files); pass --tokenizer-source {ref} to take that model's tokenizer and template",
                stacklevel=2,
            )


def _chat_template(folder: Path) -> str | None:
    """A folder's chat template (chat_template.jinja / .json, or tokenizer_config.json's), or None."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            value = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except ValueError:
            return None
        return None if value is None else json.dumps(value)
    return None


def merge_checkpoints(config: MergeConfig, *, chunk_elements: int = CHUNK_ELEMENTS,
                      sources: ModelSources = CHECKPOINTS) -> Path:
    """Merge the checkpoints described by `config`; return the output folder (see :func:`run_merge`)."""
    return run_merge(config, chunk_elements=chunk_elements, sources=sources).output
