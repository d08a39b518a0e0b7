"""Wire format of tensors in federated ATM, and lossy compression of deltas (bfloat16, top-k, DARE-style).

Tensors travel in Flower ``ArrayRecord`` objects, one ``Array`` per tensor (numpy ``.npy`` bytes, no pickle).
bfloat16 has no numpy dtype: such a tensor is sent as its raw 16-bit pattern (an ``int16`` ``.npy``) in an
``Array`` whose ``dtype`` field says ``"bfloat16"``; :func:`record_to_tensors` restores it bit for bit.

Compression of a delta ``{name: tensor}`` (a task vector going up, a merged update going down):

* ``none``: float32 values (float64 stays float64), exact;
* ``bf16``: every value rounded to bfloat16 (2 bytes per entry instead of 4);
* ``topk``: per tensor keep the ``k = max(1, ceil(fraction * numel))`` entries of largest magnitude; sends their
  flat indices (int32, int64 beyond 2**31 entries) and values;
* ``dare``: per tensor keep each entry with probability ``fraction`` and rescale the kept ones by
  ``1 / fraction`` (DARE, Yu et al. 2024; unbiased: ``E[decoded] = delta``). The mask is drawn from a CPU
  generator seeded by ``tensor_seed(seed, name)``, so the receiver rebuilds it from the seed: only the kept
  values travel, no indices.

``values="bfloat16"`` also rounds the kept values of ``topk`` / ``dare`` to bfloat16. Decoding returns float32
tensors (float64 for float64 input) of the original shapes. :func:`record_nbytes` counts the bytes a record
carries the way Flower does (``count_bytes``: array data plus key names; config and metric values).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor

from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.merging.spec import tensor_seed

__all__ = [
    "COMPRESSION_KINDS",
    "Compression",
    "ErrorFeedback",
    "decode_delta",
    "dense_nbytes",
    "encode_delta",
    "record_nbytes",
    "record_to_tensors",
    "roundtrip",
    "tensors_to_record",
]

COMPRESSION_KINDS: tuple[str, ...] = ("none", "bf16", "topk", "dare")
#: kept fraction used when a ``topk`` / ``dare`` spec leaves ``fraction`` unset.
DEFAULT_FRACTION: dict[str, float] = {"topk": 0.1, "dare": 0.5}
_VALUE_DTYPES = ("float32", "bfloat16")
_BF16 = "bfloat16"


# ----------------------------------------------------------------------------------------------------------
# plain tensors <-> ArrayRecord
# ----------------------------------------------------------------------------------------------------------
def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def tensor_to_array(t: Tensor) -> Array:
    """One tensor as a Flower ``Array`` (bfloat16 as its 16-bit pattern with ``dtype="bfloat16"``)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return Array(dtype=_BF16, shape=tuple(t.shape), stype="numpy.ndarray", data=_npy(t.view(torch.int16).numpy()))
    return Array(t.numpy())


def array_to_tensor(a: Array, name: str = "") -> Tensor:
    """The tensor of an ``Array`` written by :func:`tensor_to_array` (or any numpy ``Array``)."""
    try:
        arr = np.load(io.BytesIO(a.data), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"array {name!r}: cannot decode its data ({e})") from e
    t = torch.from_numpy(np.array(arr, copy=True))
    if a.dtype == _BF16:
        if t.dtype != torch.int16:
            raise CheckpointError(f"array {name!r}: bfloat16 array must hold int16 bit patterns, got {t.dtype}")
        t = t.view(torch.bfloat16)
    return t.reshape(tuple(a.shape))


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """``{name: tensor}`` as an ArrayRecord (exact, every dtype torch and numpy share, plus bfloat16)."""
    rec = ArrayRecord()
    for name in sorted(tensors):
        rec[name] = tensor_to_array(tensors[name])
    return rec


def record_to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """Inverse of :func:`tensors_to_record`."""
    return {name: array_to_tensor(record[name], name) for name in record}


def record_nbytes(content: RecordDict | None) -> int:
    """Bytes a message content carries, counted as Flower's ``count_bytes`` does: array data (numpy headers
    included) and key names, 8 bytes per number, the length of strings and bytes (protobuf framing excluded)."""
    if content is None:
        return 0
    total = 0
    for rec in content.values():
        total += _config_nbytes(rec) if isinstance(rec, ConfigRecord) else int(rec.count_bytes())
    return total


def _scalar_nbytes(v: Any) -> int:
    if isinstance(v, bool):
        return 1
    if isinstance(v, (str, bytes)):
        return len(v.encode("utf-8")) if isinstance(v, str) else len(v)
    return 8  # ints and floats travel as 64-bit values


def _config_nbytes(rec: ConfigRecord) -> int:
    """``ConfigRecord.count_bytes`` that also accepts empty lists (Flower 1.32's raises IndexError on them)."""
    n = 0
    for k, v in rec.items():
        n += len(k) + (sum(_scalar_nbytes(x) for x in v) if isinstance(v, list) else _scalar_nbytes(v))
    return n


def dense_nbytes(tensors: Mapping[str, Tensor], bytes_per_value: int = 4) -> int:
    """Bytes of the raw values of `tensors` at `bytes_per_value` each (no headers): the uncompressed reference."""
    return int(sum(t.numel() for t in tensors.values()) * bytes_per_value)


# ----------------------------------------------------------------------------------------------------------
# compression spec
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Compression:
    """How a delta is compressed on the wire.

    Attributes:
        kind: ``none`` | ``bf16`` | ``topk`` | ``dare`` (see the module docstring).
        fraction: kept fraction in (0, 1] for ``topk`` / ``dare`` (default 0.1 / 0.5); others take none.
        values: ``float32`` or ``bfloat16``: dtype of the values ``topk`` / ``dare`` send.
    """

    kind: str = "none"
    fraction: float | None = None
    values: str = "float32"

    def __post_init__(self) -> None:
        if self.kind not in COMPRESSION_KINDS:
            raise MergeConfigError(
                f"compression: unknown kind {self.kind!r}; known kinds: {', '.join(COMPRESSION_KINDS)}"
            )
        if self.fraction is not None:
            if self.kind not in DEFAULT_FRACTION:
                raise MergeConfigError(f"compression fraction: kind {self.kind!r} takes no fraction")
            if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not (
                0.0 < float(self.fraction) <= 1.0
            ):
                raise MergeConfigError(f"compression fraction must be in (0, 1], got {self.fraction!r}")
        if self.values not in _VALUE_DTYPES:
            raise MergeConfigError(f"compression values must be one of {', '.join(_VALUE_DTYPES)}, got {self.values!r}")
        if self.values != "float32" and self.kind not in DEFAULT_FRACTION:
            raise MergeConfigError(f"compression values: kind {self.kind!r} takes no values dtype")

    @property
    def effective_fraction(self) -> float | None:
        """``fraction`` or its default; None for ``none`` / ``bf16``."""
        if self.kind not in DEFAULT_FRACTION:
            return None
        return DEFAULT_FRACTION[self.kind] if self.fraction is None else float(self.fraction)

    @property
    def lossless(self) -> bool:
        return self.kind == "none"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fraction"] = self.effective_fraction
        return d

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | Compression | None) -> Compression:
        """From a Compression, a mapping, None (``none``) or a string: ``"none"``, ``"bf16"``, ``"topk:0.1"``,
        ``"dare:0.5"``, optionally ending in ``":bf16"`` for bfloat16 values (``"topk:0.05:bf16"``)."""
        if value is None:
            return cls()
        if isinstance(value, Compression):
            return value
        if isinstance(value, Mapping):
            return cls(**dict(value))
        if not isinstance(value, str):
            raise MergeConfigError(f"compression must be a string like 'topk:0.1', got {value!r}")
        parts = [p.strip() for p in value.strip().split(":") if p.strip()]
        if not parts:
            return cls()
        kind, rest = parts[0].lower(), parts[1:]
        values = "float32"
        if rest and rest[-1].lower() in ("bf16", "bfloat16"):
            values, rest = "bfloat16", rest[:-1]
        if len(rest) > 1:
            raise MergeConfigError(f"compression {value!r}: expected 'kind[:fraction][:bf16]'")
        fraction = None
        if rest:
            try:
                fraction = float(rest[0])
            except ValueError as e:
                raise MergeConfigError(f"compression {value!r}: fraction {rest[0]!r} is not a number") from e
        return cls(kind=kind, fraction=fraction, values=values)


# ----------------------------------------------------------------------------------------------------------
# encode / decode
# ----------------------------------------------------------------------------------------------------------
def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _dare_mask(numel: int, fraction: float, seed: int, name: str) -> Tensor:
    g = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, f"dare-wire/{name}"))
    return torch.rand(numel, generator=g) < fraction


def _values_array(v: Tensor, values: str) -> Array:
    return tensor_to_array(v.to(torch.bfloat16) if values == _BF16 else v)


def encode_delta(delta: Mapping[str, Tensor], comp: Compression, seed: int = 0) -> ArrayRecord:
    """The ArrayRecord that carries `delta` compressed by `comp`.

    Keys: ``name`` (``none`` / ``bf16``), ``name#idx`` and ``name#val`` (``topk``), ``name#val`` (``dare``;
    the mask is rebuilt from `seed` and the name). Non-floating tensors raise CheckpointError.
    """
    rec = ArrayRecord()
    frac = comp.effective_fraction
    for name in sorted(delta):
        t = delta[name]
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {name!r}: a delta must be floating point, got {t.dtype}")
        t = t.detach().to("cpu")
        if comp.kind == "none":
            rec[name] = tensor_to_array(t.to(_compute_dtype(t)))
        elif comp.kind == "bf16":
            rec[name] = tensor_to_array(t.to(torch.bfloat16))
        elif comp.kind == "topk":
            flat = t.reshape(-1).to(_compute_dtype(t))
            k = max(1, math.ceil(frac * flat.numel())) if flat.numel() else 0
            idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values if k else flat.new_zeros(0).long()
            idx_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
            rec[f"{name}#idx"] = tensor_to_array(idx.to(idx_dtype))
            rec[f"{name}#val"] = _values_array(flat[idx], comp.values)
        else:  # dare
            flat = t.reshape(-1).to(_compute_dtype(t))
            mask = _dare_mask(flat.numel(), frac, seed, name)
            rec[f"{name}#val"] = _values_array(flat[mask] / frac, comp.values)
    return rec


def decode_delta(
    record: ArrayRecord,
    comp: Compression,
    shapes: Mapping[str, tuple[int, ...] | torch.Size],
    seed: int = 0,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> dict[str, Tensor]:
    """The delta carried by `record` (see :func:`encode_delta`), as float32 tensors (float64 where `dtypes`
    says so) of `shapes`. Names of `shapes` absent from the record are absent from the result. Malformed
    arrays (wrong sizes, indices out of range, unknown names) raise CheckpointError naming the tensor."""
    frac = comp.effective_fraction
    out: dict[str, Tensor] = {}
    names = {k.split("#", 1)[0] for k in record}
    unknown = sorted(names - set(shapes))
    if unknown:
        raise CheckpointError(f"delta holds tensors this model does not have: {unknown[:5]}")
    for name in sorted(names):
        shape = tuple(shapes[name])
        numel = math.prod(shape)
        dtype = (dtypes or {}).get(name, torch.float32)
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if comp.kind in ("none", "bf16"):
            if name not in record:
                raise CheckpointError(f"tensor {name!r}: expected a dense array for compression {comp.kind!r}")
            t = array_to_tensor(record[name], name)
            if t.numel() != numel:
                raise CheckpointError(f"tensor {name!r}: {t.numel()} values for shape {shape}")
            out[name] = t.to(dtype).reshape(shape)
            continue
        if f"{name}#val" not in record:
            raise CheckpointError(f"tensor {name!r}: missing '{name}#val' for compression {comp.kind!r}")
        vals = array_to_tensor(record[f"{name}#val"], f"{name}#val").to(dtype).reshape(-1)
        flat = torch.zeros(numel, dtype=dtype)
        if comp.kind == "topk":
            if f"{name}#idx" not in record:
                raise CheckpointError(f"tensor {name!r}: missing '{name}#idx' for compression 'topk'")
            idx = array_to_tensor(record[f"{name}#idx"], f"{name}#idx").long().reshape(-1)
            if idx.numel() != vals.numel() or (idx.numel() and (idx.min() < 0 or idx.max() >= numel)):
                raise CheckpointError(f"tensor {name!r}: top-k indices do not fit shape {shape}")
            flat[idx] = vals
        else:
            mask = _dare_mask(numel, frac, seed, name)
            if int(mask.sum()) != vals.numel():
                raise CheckpointError(
                    f"tensor {name!r}: {vals.numel()} DARE values but the seeded mask keeps {int(mask.sum())}"
                )
            flat[mask] = vals
        out[name] = flat.reshape(shape)
    return out


def roundtrip(delta: Mapping[str, Tensor], comp: Compression, seed: int = 0) -> dict[str, Tensor]:
    """``decode(encode(delta))``: what the receiver of `delta` gets (used by the sender to stay in sync)."""
    rec = encode_delta(delta, comp, seed)
    return decode_delta(rec, comp, {n: t.shape for n, t in delta.items()}, seed,
                        {n: t.dtype for n, t in delta.items()})


class ErrorFeedback:
    """Error feedback for lossy uplink compression (Seide et al. 2014; Karimireddy et al. 2019): what the
    compression dropped this round is added to the next round's vector, so nothing is lost for good.

    ``compensate(tau)`` returns ``tau + residual``; after encoding, ``update(compensated, sent)`` stores
    ``compensated - sent`` (``sent`` = the decoded vector the server receives). Residuals live as float32
    tensors (``state()`` / ``load_state()`` for persistence between rounds)."""

    def __init__(self, residual: Mapping[str, Tensor] | None = None) -> None:
        self.residual: dict[str, Tensor] = {k: v.clone() for k, v in (residual or {}).items()}

    def compensate(self, tau: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: t + self.residual[n].to(t.dtype) if n in self.residual else t.clone() for n, t in tau.items()}

    def update(self, compensated: Mapping[str, Tensor], sent: Mapping[str, Tensor]) -> None:
        self.residual = {
            n: (t - sent[n].to(t.dtype)) if n in sent else t.clone() for n, t in compensated.items()
        }

    def state(self) -> dict[str, Tensor]:
        return dict(self.residual)
