"""Lazy checkpoint reading and streaming sharded safetensors writing.

Reading (:class:`CheckpointReader`): a checkpoint folder holds ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (pickled ``pytorch_model.bin[.index.json]`` only when the caller allows
pickles). Every shard is opened once with ``safetensors.safe_open``; tensors are fetched one at a time with
``get_tensor``, which (safetensors 0.8, as installed here) returns a zero-copy view of the file's memory map. Pages of a
map that a process has touched count in its RSS until unmapped, so :meth:`CheckpointReader.release` hands a
consumed tensor's pages back to the kernel (``madvise(MADV_DONTNEED)``: the page cache keeps the data, the
process's RSS drops), which keeps a merge's memory bounded by the tensors in flight.

Writing (:class:`ShardedWriter`): tensor names, dtypes and shapes of the output are known before any
tensor is merged, so the shard layout (transformers' / huggingface_hub's rule: fill in order, start a new
shard when the next tensor would exceed ``max_shard_size``, a tensor larger than the limit gets its own shard)
and every shard's safetensors header are planned up front. Tensors (or consecutive pieces of one tensor) are
then streamed straight to disk, so no output shard is ever held in memory.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.hub.headers import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, read_weight_map
from hf_atm.merging.output import NO_SPACE_ERRNOS

__all__ = [
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "PT_WEIGHTS_NAME",
    "PT_WEIGHTS_INDEX_NAME",
    "CheckpointReader",
    "ShardedWriter",
    "TensorInfo",
    "check_safetensors_layout",
    "dtype_from_safetensors",
    "dtype_to_safetensors",
    "parse_size",
    "plan_shards",
    "shard_file_names",
]

PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _st, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        _ST_TO_TORCH[_st] = getattr(torch, _attr)
_TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in _ST_TO_TORCH.items()}


def dtype_from_safetensors(code: str, where: str = "") -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``"F32"`` -> ``torch.float32``); CheckpointError if unknown."""
    try:
        return _ST_TO_TORCH[code]
    except KeyError:
        raise CheckpointError(f"{where}: unsupported safetensors dtype {code!r}") from None


def dtype_to_safetensors(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


# ------------------------------------------------------------------------------------------------ sizes
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?[Bb]|[Bb])?\s*$", re.IGNORECASE)
_UNITS = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(size: str | int, option: str = "max_shard_size") -> int:
    """Bytes in `size`, parsed like transformers' ``convert_file_size_to_int``.

    An int (or a string of digits) is a byte count; ``"2GB"``, ``"500MB"``, ``"10KB"`` are decimal
    (10**9, 10**6, 10**3), ``"1GiB"``, ``"10MiB"``, ``"4KiB"`` binary; a lowercase ``b`` after a decimal unit
    means bits (``"8Mb"`` = 1,000,000 bytes), as in transformers; ``"100B"`` is bytes. The unit is otherwise
    case-insensitive and a decimal point is allowed (``"1.5GB"``). Raises MergeConfigError naming `option`
    for anything else or a size that is not positive.
    """
    if isinstance(size, bool):
        raise MergeConfigError(f"{option}: expected a size like '2GB', got {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str) and (m := _SIZE.match(size)):
        number, unit = m.group(1), m.group(2)
        if not unit or unit.upper() == "B":
            value = float(number)
        else:
            prefix = unit[:-1].upper()
            value = float(number) * _UNITS[prefix]
            if unit.endswith("b") and "I" not in prefix:
                value /= 8  # transformers' convention: a lowercase b is bits
        value = int(value)
    else:
        raise MergeConfigError(
            f"{option}: cannot parse {size!r}; use a number of bytes or a size like '2GB', '500MB', '10KB'"
        )
    if value <= 0:
        raise MergeConfigError(f"{option}: must be positive, got {size!r}")
    return value


# ------------------------------------------------------------------------------------------- page release
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux value; madvise is only used on Linux
_MADV_WILLNEED = 3  # start reading the range into the page cache (asynchronous, maps nothing)
_MADV_POPULATE_READ = 22  # Linux >= 5.14: fault the range in (reading it if needed), as touching every page would


def _load_madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        return None


_madvise = _load_madvise()
_populate_ok = True  # MADV_POPULATE_READ accepted so far


def _file_mappings(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of any of `paths` (one read of /proc/self/maps; [] off Linux)."""
    if _madvise is None or not paths:
        return []
    targets = {str(p.resolve()) for p in paths}
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") in targets:
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:  # pragma: no cover - no procfs
        return []
    return ranges


# ------------------------------------------------------------------------------------------------ reading
def check_safetensors_layout(path: Path) -> None:
    """Refuse (CheckpointError naming `path`) a safetensors file whose header does not describe its bytes.

    Read before the file is mapped: the 8-byte little-endian header length must fit in the file, the header
    must be a JSON object, and every tensor's ``data_offsets`` must lie inside the data section, span exactly
    its dtype x shape byte count, and, in order, tile the data section with no gap or overlap (what safetensors'
    own loader demands, said here with the tensor and the sizes involved).
    """
    bad = f"corrupt safetensors file {path}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{bad}: {size} bytes, too short for the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise CheckpointError(
                    f"{bad}: its header length ({n:,} bytes) runs past the end of the file ({size:,} bytes): "
                    "truncated, or not a safetensors file"
                )
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{bad}: its header is not valid JSON ({e})") from e
    data_len = size - 8 - n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{bad}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} has no dtype / shape / data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: bad shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise CheckpointError(f"{where}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise CheckpointError(f"{where}: data_offsets {offsets} are not a byte range")
        if end > data_len:
            raise CheckpointError(
                f"{where}: data_offsets {offsets} run past the end of the data section ({data_len:,} bytes "
                f"after the header, file of {size:,} bytes): the file is truncated or its header is wrong"
            )
        if not isinstance(dtype, str):
            raise CheckpointError(f"{where}: bad dtype {dtype!r}")
        itemsize = torch.empty((), dtype=dtype_from_safetensors(dtype, f"{path}: tensor {name!r}")).element_size()
        expected = math.prod(shape) * itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{where}: data_offsets {offsets} span {end - begin:,} bytes but a {dtype} tensor of shape "
                f"{shape} takes {expected:,}"
            )
        spans.append((begin, end, name))
    spans.sort()
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise CheckpointError(f"{bad}: the data of tensors {prev!r} and {name!r} overlap (bytes {begin:,} to {pos:,})")
        if begin > pos:
            raise CheckpointError(f"{bad}: bytes {pos:,} to {begin:,} of its data section belong to no tensor")
        pos, prev = end, name
    if pos != data_len:
        raise CheckpointError(
            f"{bad}: its tensors cover {pos:,} of the {data_len:,} bytes of its data section (the rest belongs to "
            "no tensor)"
        )


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype, shape and source file of one stored tensor (read from headers, no data loaded)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class CheckpointReader:
    """Read one checkpoint folder tensor by tensor, never as a whole state dict.

    ``names`` lists the tensors in storage order (shard files in name order, then by offset within a file),
    which is also the order that reads each file sequentially. ``info(name)`` gives dtype / shape / file
    from the headers; ``get(name)`` the tensor (a zero-copy view of the file map for safetensors; do not
    modify it); ``release(tensor)`` drops its pages from this process's RSS once it is no longer needed.
    Use as a context manager or call :meth:`close`.

    Raises CheckpointError naming the file for a missing / corrupt weights file or index, and for pickle
    checkpoints unless ``allow_pickle`` (then ``torch.load(weights_only=True, mmap=True)``).
    """

    def __init__(self, folder: str | os.PathLike, *, allow_pickle: bool = False, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        self.allow_pickle = allow_pickle
        self._handles: dict[Path, Any] = {}
        self._maps: list[tuple[int, int]] | None = None  # file-map address ranges, scanned when first needed
        self._infos: dict[str, TensorInfo] = {}
        self.names: list[str] = []
        self.format, self.files, weight_map = self._discover()
        try:
            self._read_headers(weight_map)
        except BaseException:
            self.close()
            raise

    # -- discovery
    def _discover(self) -> tuple[str, list[Path], dict[str, Path] | None]:
        """(format, weight files in order, tensor -> file map from an index or None)."""
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.label}: checkpoint folder {self.folder} does not exist")
        safe_index = self.folder / SAFE_WEIGHTS_INDEX_NAME
        if safe_index.is_file():
            weight_map = self._read_index(safe_index)
            return "safetensors", sorted(set(weight_map.values())), weight_map
        if (self.folder / SAFE_WEIGHTS_NAME).is_file():
            return "safetensors", [self.folder / SAFE_WEIGHTS_NAME], None
        pt_index, pt_single = self.folder / PT_WEIGHTS_INDEX_NAME, self.folder / PT_WEIGHTS_NAME
        if pt_index.is_file() or pt_single.is_file():
            found = pt_index if pt_index.is_file() else pt_single
            if not self.allow_pickle:
                raise CheckpointError(
                    f"{found} is a pickle checkpoint and no {SAFE_WEIGHTS_NAME} is beside it: unpickling can run "
                    "arbitrary code, so hf-atm reads only safetensors by default. If you trust this file, pass "
                    "--allow-pickle (allow_pickle=True) to load it with torch.load(weights_only=True)."
                )
            if found == pt_index:
                weight_map = self._read_index(pt_index)
                return "pickle", sorted(set(weight_map.values())), weight_map
            return "pickle", [pt_single], None
        present = sorted(p.name for p in self.folder.iterdir())[:20]
        raise CheckpointError(
            f"{self.label}: no weights in {self.folder}: expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}"
            f" (found: {', '.join(present) or 'nothing'})"
        )

    def _read_index(self, index: Path) -> dict[str, Path]:
        """tensor name -> shard path from a transformers index file; every shard must exist."""
        weight_map = {}
        for name, fname in read_weight_map(index).items():
            path = self.folder / fname
            if not path.is_file():
                raise CheckpointError(f"shard {path} listed in {index} (for tensor {name!r}) is missing")
            weight_map[str(name)] = path
        return weight_map

    def _open(self, path: Path) -> Any:
        """The open handle of one weights file (opened once, kept until close)."""
        handle = self._handles.get(path)
        if handle is not None:
            return handle
        if self.format == "safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # SafetensorError / OSError: truncated, bad header, unreadable
                raise CheckpointError(f"corrupt or unreadable safetensors file {path}: {e}") from e
        else:
            try:
                handle = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(
                    f"cannot load pickle checkpoint {path} with weights_only=True: {e}"
                ) from e
            if not isinstance(handle, dict):
                raise CheckpointError(f"pickle checkpoint {path} does not hold a state dict")
        self._handles[path] = handle
        self._maps = None  # a new map: rescan on the next release
        return handle

    def _read_headers(self, weight_map: dict[str, Path] | None) -> None:
        """Fill ``names`` (storage order) and ``_infos`` from every file's header."""
        for path in self.files:
            if self.format == "safetensors":
                check_safetensors_layout(path)  # before mapping it: a lying header is refused up front
            handle = self._open(path)
            if self.format == "safetensors":
                try:
                    keys = list(handle.offset_keys())
                    metas = [(k, handle.get_slice(k)) for k in keys]
                    entries = [
                        (
                            k,
                            dtype_from_safetensors(s.get_dtype(), f"{path}: tensor {k!r}"),
                            tuple(s.get_shape()),
                        )
                        for k, s in metas
                    ]
                except CheckpointError:
                    raise
                except Exception as e:
                    raise CheckpointError(f"corrupt or unreadable safetensors file {path}: {e}") from e
            else:
                entries = [
                    (k, t.dtype, tuple(t.shape)) for k, t in handle.items() if isinstance(t, torch.Tensor)
                ]
            present = set()
            for name, dtype, shape in entries:
                present.add(name)
                if weight_map is not None and weight_map.get(name) != path:
                    continue  # not indexed here (stray or duplicated tensor): the index decides
                if name in self._infos:
                    raise CheckpointError(
                        f"tensor {name!r} is stored twice: in {self._infos[name].file} and in {path}"
                    )
                self._infos[name] = TensorInfo(name, dtype, shape, path)
                self.names.append(name)
            if weight_map is not None:
                for name, file in weight_map.items():
                    if file == path and name not in present:
                        raise CheckpointError(
                            f"tensor {name!r} is listed for {path} in the index but missing from it"
                        )

    # -- access
    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self.names)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and file of tensor `name` (KeyError if absent)."""
        return self._infos[name]

    @property
    def weights_file(self) -> str:
        """The file that names the checkpoint's tensors: its index, or its single weights file (for messages)."""
        if len(self.files) == 1:
            return str(self.files[0])
        index = SAFE_WEIGHTS_INDEX_NAME if self.format == "safetensors" else PT_WEIGHTS_INDEX_NAME
        return str(self.folder / index)

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`, zero-copy from the file map where possible. Treat it as read-only."""
        info = self._infos[name]
        handle = self._open(info.file)
        try:
            t = handle.get_tensor(name) if self.format == "safetensors" else handle[name]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {e}") from e
        return t

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the memory-map pages lying wholly inside `tensor` from this process's RSS.

        Only acts on tensors whose bytes lie in a file map this reader opened (never on ordinary memory),
        and only on whole pages inside them; the data stays in the page cache and reading it again simply
        maps it back. Call it when a tensor (or a piece of it) of an input is no longer needed.
        """
        if _madvise is None or tensor.numel() == 0:
            return
        lo = tensor.data_ptr()
        hi = lo + tensor.numel() * tensor.element_size()
        if self._maps is None:
            self._maps = _file_mappings(list(self._handles))
        if not any(a <= lo and hi <= b for a, b in self._maps):
            return
        start = -(-lo // _PAGE) * _PAGE
        end = hi // _PAGE * _PAGE
        if end > start:
            _madvise(start, end - start, _MADV_DONTNEED)

    def prefetch(self, tensor: torch.Tensor, populate: bool = True) -> None:
        """Read ahead the memory-map pages under `tensor` (a :meth:`get` result), so that using it later does not
        wait for the disk: ``populate`` maps them into this process (``MADV_POPULATE_READ``; they then count in
        its RSS until :meth:`release`), else the kernel only starts reading them into the page cache
        (``MADV_WILLNEED``, no RSS). Safe from another thread; a no-op for tensors outside this reader's maps,
        off Linux, and (populate) on kernels before 5.14, which fall back to ``MADV_WILLNEED``.
        """
        global _populate_ok
        if _madvise is None or tensor.numel() == 0:
            return
        lo = tensor.data_ptr()
        hi = lo + tensor.numel() * tensor.element_size()
        maps = self._maps
        if maps is None:
            maps = self._maps = _file_mappings(list(self._handles))
        if not any(a <= lo and hi <= b for a, b in maps):
            return
        start = lo // _PAGE * _PAGE
        length = -(-(hi - start) // _PAGE) * _PAGE
        if populate and _populate_ok:
            if _madvise(start, length, _MADV_POPULATE_READ) == 0:
                return
            _populate_ok = False  # EINVAL: an older kernel; read-ahead only from now on
        _madvise(start, length, _MADV_WILLNEED)

    def close(self) -> None:
        """Drop every open handle (unmapping the files)."""
        self._handles.clear()
        self._maps = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ writing
def plan_shards(infos: Sequence[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Split ``(name, nbytes)`` pairs, in order, into shards like ``huggingface_hub.split_torch_state_dict_into_shards``.

    Tensors are added in order; a new shard starts when the next tensor would push the current one past
    `max_shard_size`; a tensor larger than the limit goes alone into its own shard (which then exceeds it).
    """
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, nbytes in infos:
        if nbytes > max_shard_size:
            shards.append([name])
            continue
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_file_names(num_shards: int, stem: str = "model") -> list[str]:
    """``model.safetensors`` for one shard, else ``model-00001-of-0000N.safetensors`` (transformers' names)."""
    if num_shards == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


@dataclass
class _Planned:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    shard: int


class ShardedWriter:
    """Write tensors, in a fixed order, into planned safetensors shards without buffering them.

    ``tensors`` gives ``(name, dtype, shape)`` in write order. The layout follows :func:`plan_shards`; each
    shard's header (``__metadata__ = {"format": "pt"}``, 8-byte aligned as safetensors writes it) is written
    when the shard is opened, then tensors' bytes are appended as :meth:`write` receives them. A tensor may
    arrive whole or as consecutive pieces of its flattened data (e.g. row blocks); it is complete when all
    its bytes have arrived. :meth:`finish` checks that everything was written and writes
    ``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``) when there is more than
    one shard. Writing the wrong tensor, dtype or too many bytes raises RuntimeError (a caller bug).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_size: int,
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.metadata = {"format": "pt"} if metadata is None else dict(metadata)
        planned = []
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            planned.append(_Planned(name, dtype, tuple(int(s) for s in shape), nbytes, -1))
        groups = plan_shards([(p.name, p.nbytes) for p in planned], max_shard_size)
        by_name = {p.name: p for p in planned}
        if len(by_name) != len(planned):
            raise RuntimeError("duplicate tensor names in the output plan")
        for i, group in enumerate(groups):
            for name in group:
                by_name[name].shard = i
        self.files = shard_file_names(len(groups))
        self._groups = groups
        self._by_name = by_name
        self._order = [p.name for p in planned]
        self._pos = 0  # index into _order of the tensor being written
        self._written = 0  # bytes of the current tensor written so far
        # Open files by shard: usually one, two while a tensor larger than the limit (planned into its own
        # shard, as huggingface_hub does) arrives while the current shard is still being filled.
        self._open: dict[int, BinaryIO] = {}
        self._left = [len(g) for g in groups]  # tensors still to complete, per shard
        self.total_size = sum(p.nbytes for p in planned)

    @property
    def num_shards(self) -> int:
        return len(self.files)

    @property
    def weight_map(self) -> dict[str, str]:
        """tensor name -> shard file name."""
        return {name: self.files[p.shard] for name, p in self._by_name.items()}

    def _header(self, shard: int) -> bytes:
        header: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for name in self._groups[shard]:
            p = self._by_name[name]
            header[name] = {
                "dtype": dtype_to_safetensors(p.dtype),
                "shape": list(p.shape),
                "data_offsets": [offset, offset + p.nbytes],
            }
            offset += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors pads it
        return len(raw).to_bytes(8, "little") + raw

    def _file(self, shard: int) -> BinaryIO:
        """The open file of `shard`, created with its header on first use."""
        fh = self._open.get(shard)
        if fh is None:
            fh = open(self.folder / self.files[shard], "wb")  # noqa: SIM115 - closed when the shard completes
            fh.write(self._header(shard))
            self._open[shard] = fh
        return fh

    def expected(self) -> str | None:
        """Name of the tensor the next :meth:`write` must belong to (None when all are written)."""
        return self._order[self._pos] if self._pos < len(self._order) else None

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append `data` (the whole tensor `name`, or the next consecutive piece of it) to its shard.

        Every tensor takes at least one call (an empty tensor: one call with no data); it is complete, and the
        writer moves to the next name, once all its planned bytes have arrived.
        """
        if name != self.expected():
            raise RuntimeError(f"writer expected tensor {self.expected()!r}, got {name!r}")
        p = self._by_name[name]
        if data.dtype != p.dtype:
            raise RuntimeError(f"tensor {name!r}: planned dtype {p.dtype}, got {data.dtype}")
        nbytes = data.numel() * data.element_size()
        if self._written + nbytes > p.nbytes:
            raise RuntimeError(f"tensor {name!r}: more bytes than its planned shape {p.shape}")
        try:
            fh = self._file(p.shard)
            if nbytes:
                fh.write(memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy()))
            self._written += nbytes
            if self._written == p.nbytes:
                self._pos += 1
                self._written = 0
                self._left[p.shard] -= 1
                if self._left[p.shard] == 0:
                    self._open.pop(p.shard).close()
        except OSError as e:
            if e.errno in NO_SPACE_ERRNOS:
                raise self._disk_full(self.files[p.shard]) from e
            raise

    @property
    def planned_bytes(self) -> int:
        """Bytes of all planned shard files (headers and data): what the output's weights need on disk."""
        return self.total_size + sum(len(self._header(i)) for i in range(self.num_shards))

    def _disk_full(self, file: str) -> Exception:
        """DiskFullError for the device filling while `file` is written: what the shards need, written, free."""
        from hf_atm.errors import DiskFullError
        from hf_atm.merging.output import format_bytes, free_bytes

        written = sum((self.folder / f).stat().st_size for f in self.files if (self.folder / f).is_file())
        return DiskFullError(
            f"no space left on the device while writing {self.folder / file}: the output's {self.num_shards} "
            f"planned shard(s) need {format_bytes(self.planned_bytes)}, {format_bytes(written)} were written, "
            f"{format_bytes(free_bytes(self.folder))} are free now"
        )

    def finish(self) -> list[str]:
        """Close the last shard, write the index when sharded; return the shard file names."""
        if self._pos != len(self._order):
            raise RuntimeError(f"writer finished before tensor {self.expected()!r} was written")
        try:
            if not self._order:  # an empty plan still yields one (header-only) file
                self._file(0).close()
                self._open.clear()
            if len(self.files) > 1:
                index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
                (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(
                    json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
                )
        except OSError as e:
            if e.errno in NO_SPACE_ERRNOS:
                raise self._disk_full(self.files[0] if not self._order else SAFE_WEIGHTS_INDEX_NAME) from e
            raise
        return list(self.files)

    def abort(self) -> None:
        """Close any open file (the caller removes the folder); a close that fails (its flush, on a full
        device) does not hide the error being handled."""
        for fh in self._open.values():
            try:
                fh.close()
            except OSError:
                pass
        self._open.clear()


def iter_chunks(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` element ranges of at most `chunk` elements covering ``[0, numel)``."""
    for start in range(0, numel, chunk):
        yield start, min(numel, start + chunk)
