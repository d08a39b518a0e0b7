"""Check a merge's Hub inputs against each other before any weight file is downloaded.

:func:`check_hub_inputs` (called by :func:`hf_atm.merging.engine.run_merge` right before it resolves the inputs)
reads, for every base / model reference that is a Hub repo id (``org/name[@rev]``):

* ``config.json`` (and ``adapter_config.json`` for a peft LoRA adapter), downloaded into the usual HF cache
  (they are small, and the snapshot download that follows reuses them);
* the header of every safetensors weights file: ``model.safetensors``, every shard listed in
  ``model.safetensors.index.json`` (the index itself is downloaded), or ``adapter_model.safetensors``. Each
  header is read with one ranged GET (``Range: bytes=0-99999``, what ``HfApi.get_safetensors_metadata`` sends;
  a second ranged GET when the header is longer) through huggingface_hub's HTTP session, honouring
  ``HF_ENDPOINT``, the token and redirects. The body is *streamed* and the connection is closed as soon as the
  header has arrived, so a server that ignores ``Range`` and answers ``200`` with the whole file (olah's local
  mirrors do) still sends only a few buffers' worth, never the weights. ``get_safetensors_metadata`` itself
  reads ``response.content`` whole and, against such a server, would pull every weight file into memory.

Then every input is compared with the base, as the engine's own check does on local folders:

* the same ``architectures`` in config.json (when both name them);
* a LoRA adapter: its config describes a plain LoRA (:func:`hf_atm.lora.delta.read_adapter_config`), every
  module maps to one base tensor and its ``lora_A`` / ``lora_B`` shapes fit that tensor;
* the same tensor names, with tied embeddings handled as the engine handles them (:mod:`hf_atm.merging.vocab`:
  when the base ties, stored output heads are ignored; a tying model serves its embedding as the base's head);
* the same vocabulary size (embedding rows), unless ``tokenizer_source`` is given: then the vocabulary tensors
  may differ in dim 0 (the engine aligns their rows by token);
* the same shapes, and floating dtypes where the base has them.

A mismatch raises :class:`~hf_atm.errors.CheckpointError` naming the repo ids (and revisions) and the tensor.
The check never fails a merge that resolving would let through: when a request fails (unknown repo or
revision, no access, no connection) the input is read from its cached snapshot if there is one, else skipped,
and resolving it then reports the error exactly as without the check.

**Local folders** given beside Hub ids are read from disk (headers only) and take part in the comparison; a
merge of local folders only is not touched here (the engine checks it). An input whose weights cannot be
inspected (a pickle-only repo, a missing or corrupt file) is left out, and the engine reports it.

**Offline** (``HF_HUB_OFFLINE``): no request is made. A Hub reference whose snapshot is in the cache is checked
from the cached files (their headers are read from disk; resolving it downloads nothing either); one that is
not in the cache is skipped here, and resolving it then raises the usual HubError.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from hf_atm.errors import CheckpointError, HfAtmError, HubError

__all__ = ["HEADER_PROBE_BYTES", "HubInput", "check_hub_inputs", "read_hub_input"]

#: First ranged read of a safetensors file (as huggingface_hub's get_safetensors_metadata): most headers fit.
HEADER_PROBE_BYTES = 100_000
_MAX_HEADER = 25_000_000  # huggingface_hub.constants.SAFETENSORS_MAX_HEADER_LENGTH
_SAFE_SINGLE = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# peft's tensor names, as hf_atm.lora.delta.load_adapter parses them
_LINEAR = re.compile(r"^(?P<m>.+)\.lora_(?P<ab>[AB])\.(?P<p>weight|bias)$")
_EMBEDDING = re.compile(r"^(?P<m>.+)\.lora_embedding_(?P<ab>[AB])$")
_SHARD_WORKERS = 8


class _Tensor(NamedTuple):
    """One tensor of a header: safetensors dtype code, shape, and where it is (``repo (file)``) for messages."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str


@dataclass
class HubInput:
    """What the check knows of one input without its weights.

    ``label``: the reference with its pinned revision; ``folder``: a local folder holding the config files
    (a cache snapshot for a Hub id); ``config`` / ``adapter_config``: the parsed JSON files or None;
    ``names``: tensor names in storage order and ``tensors`` their headers (both empty when ``inspected`` is
    False: no safetensors weights to read).
    """

    label: str
    folder: Path | None = None
    config: dict[str, Any] | None = None
    adapter_config: dict[str, Any] | None = None
    names: list[str] = field(default_factory=list)
    tensors: dict[str, _Tensor] = field(default_factory=dict)
    inspected: bool = False

    # -- the reader interface hf_atm.merging.vocab's helpers use (names, info, in, len, label)
    def info(self, name: str) -> _Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.names)

    @property
    def is_adapter(self) -> bool:
        return self.adapter_config is not None


# --------------------------------------------------------------------------------------------- reading
def _parse_header(raw: bytes, where: str, filename: str) -> list[_Tensor]:
    """Tensors of a safetensors JSON header, in storage (offset) order."""
    try:
        header = json.loads(raw.decode("utf-8"))
        entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
        entries.sort(key=lambda kv: tuple(kv[1].get("data_offsets") or (0, 0)))
        return [_Tensor(k, str(v["dtype"]), tuple(int(d) for d in v["shape"]), f"{where} ({filename})")
                for k, v in entries]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where}: the safetensors header of {filename} is corrupt: {e}") from e


def _header_size(first8: bytes, where: str, filename: str) -> int:
    if len(first8) < 8:
        raise CheckpointError(f"{where}: {filename} is too small to be a safetensors file")
    size = struct.unpack("<Q", first8[:8])[0]
    if size > _MAX_HEADER:
        raise CheckpointError(f"{where}: {filename} has a {size}-byte safetensors header; corrupt or not safetensors")
    return size


def _local_header(path: Path, where: str) -> list[_Tensor]:
    with open(path, "rb") as f:
        size = _header_size(f.read(8), where, path.name)
        raw = f.read(size)
    if len(raw) < size:
        raise CheckpointError(f"{where}: {path.name} is truncated inside its safetensors header")
    return _parse_header(raw, where, path.name)


def _remote_header(url: str, headers: Mapping[str, str], where: str, filename: str) -> list[_Tensor]:
    """The header of the safetensors file at `url`, reading only its first bytes (see the module docstring)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

    buf = bytearray()
    need: int | None = None
    for attempt in range(2):  # the probe, then (rarely) the rest of a long header
        start = len(buf)
        stop = HEADER_PROBE_BYTES - 1 if need is None else need - 1
        req = {**headers, "Range": f"bytes={start}-{stop}", "Accept-Encoding": "identity"}
        with http_stream_backoff("GET", url, headers=req, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            hf_raise_for_status(response)
            ranged = response.status_code == 206
            if not ranged and start:
                buf.clear()  # the server ignored Range and starts again at byte 0
            for chunk in response.iter_bytes():
                buf += chunk
                if need is None and len(buf) >= 8:
                    need = 8 + _header_size(bytes(buf[:8]), where, filename)
                if need is not None and len(buf) >= need:
                    break  # leaving the block closes the connection: the rest of the file is never read
        if need is not None and len(buf) >= need:
            return _parse_header(bytes(buf[8:need]), where, filename)
        if not ranged or attempt:
            break
    raise CheckpointError(f"{where}: {filename} ended inside its safetensors header ({len(buf)} bytes read)")


def _read_local(folder: Path, label: str) -> HubInput:
    """Config files and headers of a local folder (a model, an adapter, or a cached Hub snapshot)."""
    item = HubInput(label=label, folder=folder)
    item.config = _load_json(folder / "config.json", label)
    if (folder / _ADAPTER_CONFIG).is_file():
        item.adapter_config = _adapter_config(folder, label)
        files = [_ADAPTER_WEIGHTS] if (folder / _ADAPTER_WEIGHTS).is_file() else []
    elif (folder / _SAFE_INDEX).is_file():
        files = sorted(set(_weight_map(folder / _SAFE_INDEX, label).values()))
    elif (folder / _SAFE_SINGLE).is_file():
        files = [_SAFE_SINGLE]
    else:
        return item
    _fill(item, [(name, _local_header(folder / name, label)) for name in files])
    return item


def _read_remote(repo_id: str, revision: str | None, label: str, *, token: str | bool | None,
                 endpoint: str | None) -> HubInput:
    """Config files (downloaded to the cache) and safetensors headers (ranged reads) of a Hub repo."""
    from huggingface_hub import HfApi, constants, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    api = HfApi(endpoint=endpoint, token=token)
    info = api.model_info(repo_id, revision=revision or constants.DEFAULT_REVISION)
    sha = info.sha or revision
    present = {s.rfilename for s in (info.siblings or [])}

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, revision=sha, token=token, endpoint=endpoint))

    item = HubInput(label=label)
    for name in ("config.json", _ADAPTER_CONFIG):
        if name in present:
            item.folder = fetch(name).parent  # the snapshot folder of commit `sha`
    if item.folder is not None:
        item.config = _load_json(item.folder / "config.json", label)
    if _ADAPTER_CONFIG in present:
        item.adapter_config = _adapter_config(item.folder, label)
        files = [_ADAPTER_WEIGHTS] if _ADAPTER_WEIGHTS in present else []
    elif _SAFE_INDEX in present:
        files = sorted(set(_weight_map(fetch(_SAFE_INDEX), label).values()))
    elif _SAFE_SINGLE in present:
        files = [_SAFE_SINGLE]
    else:
        return item
    headers = build_hf_headers(token=token, library_name="hf_atm")

    def one(name: str) -> tuple[str, list[_Tensor]]:
        url = hf_hub_url(repo_id, name, revision=sha, endpoint=endpoint)
        return name, _remote_header(url, headers, label, name)

    if len(files) == 1:
        _fill(item, [one(files[0])])
    else:
        with ThreadPoolExecutor(max_workers=min(_SHARD_WORKERS, len(files))) as pool:
            _fill(item, list(pool.map(one, files)))
    return item


def _fill(item: HubInput, per_file: Iterable[tuple[str, list[_Tensor]]]) -> None:
    for _name, tensors in per_file:  # files in name order, tensors in offset order: CheckpointReader's order
        for t in tensors:
            item.names.append(t.name)
            item.tensors[t.name] = t
    item.inspected = True


def _load_json(path: Path, label: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the engine reports a corrupt config
    return data if isinstance(data, dict) else None


def _adapter_config(folder: Path, label: str) -> dict[str, Any]:
    from hf_atm.lora.delta import read_adapter_config

    return read_adapter_config(folder, label)  # CheckpointError for DoRA / non-LoRA / ... (as the engine)


def _weight_map(index: Path, label: str) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("weight_map is empty or not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{label}: corrupt checkpoint index {index.name}: {e}") from e
    return {str(k): str(v) for k, v in weight_map.items()}


def _pin(ref: str, revisions: Mapping[str, str]) -> str:
    """``ref@rev`` when `revisions` pins an unpinned Hub reference (as the engine's resolution does)."""
    from hf_atm.hub.resolve import is_local_reference

    if ref in revisions and "@" not in ref and not is_local_reference(ref):
        return f"{ref}@{revisions[ref]}"
    return ref


def read_hub_input(ref: str, *, revisions: Mapping[str, str] | None = None, token: str | bool | None = None,
                   endpoint: str | None = None) -> HubInput | None:
    """What :func:`check_hub_inputs` reads of one reference, or None when it cannot be inspected here.

    A local folder is read from disk; a Hub id online from the Hub (configs downloaded, headers by ranged
    reads), offline, or online when a request fails, from its cached snapshot (None when it is not cached).
    Raises CheckpointError for a corrupt header or an adapter config hf-atm cannot merge.
    """
    from huggingface_hub import constants

    from hf_atm.hub.resolve import _REPO_ID, is_local_reference, split_revision

    ref = str(ref)
    pinned = _pin(ref, revisions or {})
    if is_local_reference(ref):
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            return None
        try:
            return _read_local(folder.resolve(), ref)
        except (OSError, CheckpointError):
            return None  # the engine's own checks name what is wrong with a local folder
    try:
        repo_id, revision = split_revision(pinned)
    except HubError:
        return None  # resolve_model raises the clear error
    if not _REPO_ID.match(repo_id):
        return None
    if not constants.is_offline_mode():
        try:
            return _read_remote(repo_id, revision, pinned, token=token, endpoint=endpoint)
        except HfAtmError:
            raise
        except _request_errors():
            pass  # not found, no access, 5xx after retries, no connection: the cache, else resolve_model's error
    folder = _cached_snapshot(repo_id, revision)
    return None if folder is None else _read_local(folder, pinned)


def _request_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub request raises: huggingface_hub's HTTP errors, its HTTP client's, OSError, ValueError."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        import httpx2 as client  # huggingface_hub 2.x
    except ImportError:  # pragma: no cover - huggingface_hub 1.x uses httpx
        import httpx as client
    return (HfHubHTTPError, client.HTTPError, OSError, ValueError)


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of `repo_id` at `revision` (no request), or None."""
    from huggingface_hub import snapshot_download

    from hf_atm.hub.resolve import MERGE_FILE_PATTERNS

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                      allow_patterns=list(MERGE_FILE_PATTERNS)))
    except Exception:  # noqa: BLE001 - not cached (or an unreadable cache): nothing to check here
        return None


# ------------------------------------------------------------------------------------------- comparing
def check_hub_inputs(
    base_ref: str | os.PathLike | None,
    model_refs: Sequence[str | os.PathLike],
    *,
    revisions: Mapping[str, str] | None = None,
    tokenizer_source: str | None = None,
    allow_pickle: bool = False,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> None:
    """Compare the merge's inputs from their config files and safetensors headers, before any weight download.

    Does nothing unless at least one of `base_ref` / `model_refs` is a Hub id (see the module docstring for
    what is read and compared). `base_ref` None: the base the LoRA adapters among the models name, else the
    first model (the layout of an ``average`` / ``linear`` merge). `revisions` pins unpinned Hub references as
    ``MergeConfig.revisions`` does; `tokenizer_source` lets vocabulary tensors differ in their rows;
    `allow_pickle` is accepted for symmetry with the engine (pickle weights have no header to read: such an
    input is left to the engine). `token` / `endpoint` as for :class:`huggingface_hub.HfApi`.

    Raises CheckpointError naming the repo ids and the tensor at fault. Returns None when everything that
    could be inspected matches (an input that cannot be inspected is skipped; the engine reports it).
    """
    from hf_atm.hub.resolve import is_local_reference

    del allow_pickle  # pickle checkpoints are not inspected here
    refs = [str(r) for r in model_refs] + ([] if base_ref is None else [str(base_ref)])
    if not refs or all(is_local_reference(r) for r in refs):
        return
    revisions = dict(revisions or {})

    def read(ref: str) -> HubInput | None:
        return read_hub_input(ref, revisions=revisions, token=token, endpoint=endpoint)

    models = [read(str(r)) for r in model_refs]
    if base_ref is None:
        base_ref = _implied_base(models)
        if base_ref is None:
            if not models or models[0] is None or models[0].is_adapter:
                return
            base, models = models[0], models[1:]
        else:
            base = read(base_ref)
    else:
        base = read(str(base_ref))
    if base is None or not base.inspected or base.is_adapter:
        return
    full = [m for m in models if m is not None and m.inspected and not m.is_adapter]
    for m in models:
        if m is not None and m.is_adapter and m.inspected:
            _check_adapter(m, base)
    for m in full:
        _check_architectures(base, m)
    if not full:
        return
    base_view, views = _tie_views(base, full)
    if base_view is None:
        return
    _check_vocab_rows(base_view, views, tokenizer_source)
    _check_tensors(base_view, views, tokenizer_source)


def _implied_base(models: Sequence[HubInput | None]) -> str | None:
    """The one base every model, all LoRA adapters, names (``base_model_name_or_path``), else None."""
    named = {str((m.adapter_config or {}).get("base_model_name_or_path") or "") for m in models if m is not None}
    if not models or any(m is None or not m.is_adapter for m in models) or len(named) != 1 or "" in named:
        return None
    return next(iter(named))


def _check_architectures(base: HubInput, model: HubInput) -> None:
    ours = list((base.config or {}).get("architectures") or [])
    theirs = list((model.config or {}).get("architectures") or [])
    if ours and theirs and ours != theirs:
        raise CheckpointError(
            f"model {model.label} is a {', '.join(theirs)} but the base {base.label} is a {', '.join(ours)} "
            "(config.json 'architectures' differ); merging needs checkpoints of one architecture"
        )


def _check_adapter(adapter: HubInput, base: HubInput) -> None:
    """Every module of `adapter` maps to one base tensor, with lora_A / lora_B shapes that fit it."""
    from hf_atm.lora.delta import match_base_names

    modules: dict[str, dict[str, _Tensor]] = {}
    kinds: dict[str, str] = {}
    full: dict[str, _Tensor] = {}
    for key in adapter.names:
        if not key.startswith(_PEFT_PREFIX):
            return  # not a peft adapter: load_adapter names the problem
        rel, t = key[len(_PEFT_PREFIX):], adapter.tensors[key]
        if (m := _LINEAR.match(rel)) is not None:
            modules.setdefault(m["m"], {})["bias" if m["p"] == "bias" else m["ab"]] = t
            kinds[m["m"]] = "linear"
        elif (m := _EMBEDDING.match(rel)) is not None:
            modules.setdefault(m["m"], {})[m["ab"]] = t
            kinds[m["m"]] = "embedding"
        elif "lora_" in rel or "trainable_tokens" in rel:
            return  # a kind the engine refuses with its own message
        else:
            full[rel.replace(".base_layer.", ".")] = t
    wanted: dict[str, tuple[str, str]] = {}
    for path, slots in modules.items():
        if "A" not in slots or "B" not in slots or len(slots["A"].shape) != 2 or len(slots["B"].shape) != 2:
            return  # the engine names the malformed module
        wanted[f"{path}.weight"] = ("weight", path)
        if "bias" in slots:
            wanted[f"{path}.bias"] = ("bias", path)
    for path in full:
        wanted[path] = ("full", path)
    targets = match_base_names(list(wanted), base.names, adapter.label, base.label)
    for path, name in targets.items():
        kind, key = wanted[path]
        shape = base.tensors[name].shape
        if kind == "full":
            t = full[key]
            if t.shape != shape:
                raise CheckpointError(
                    f"adapter {adapter.label}: tensor {t.name!r} has shape {t.shape} but the base {base.label} has "
                    f"{shape} for {name!r}"
                )
            continue
        a, b = modules[key]["A"].shape, modules[key]["B"].shape
        if kind == "bias":
            fits = modules[key]["bias"].shape == shape
        elif kinds[key] == "embedding":
            fits = shape == (a[1], b[0])
        else:
            fits = shape in ((b[0], a[1]), (a[1], b[0]))
        if not fits:
            raise CheckpointError(
                f"adapter {adapter.label}: module {key!r} (lora_A {a}, lora_B {b}) does not fit tensor {name!r} of "
                f"shape {shape} in the base {base.label}; is this adapter for another model?"
            )


def _tie_views(base: HubInput, models: Sequence[HubInput]) -> tuple[Any, list[Any]]:
    """The inputs as the output's tying (the base's) sees them, as the engine's ``_tie_as_base`` builds them;
    (None, []) when a config cannot tell whether a checkpoint ties (the engine reports it)."""
    from hf_atm.merging.vocab import embedding_names, tie_reader, tied_embeddings

    if all(embedding_names(r.names)[1] is None for r in (base, *models)):
        return base, list(models)
    if base.folder is None or any(m.folder is None for m in models):
        return None, []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the engine warns about a dropped head when it merges
            base_tie = tied_embeddings(base.folder, base.names, label=base.label)
            views = [tie_reader(base, base_tie, base_tie)]
            for m in models:
                tie = tied_embeddings(m.folder, m.names, label=m.label, base_names=base.names)
                views.append(tie_reader(m, tie, base_tie))
    except CheckpointError:
        return None, []
    return views[0], views[1:]


def _where(t: Any) -> str:
    return str(t.file)


def _check_vocab_rows(base: Any, models: Sequence[Any], tokenizer_source: str | None) -> None:
    """Without a tokenizer source every checkpoint must have the base's number of embedding rows."""
    if tokenizer_source is not None:
        return
    from hf_atm.merging.vocab import embedding_names

    embed = embedding_names(base.names)[0] or embedding_names(base.names)[1]
    if embed is None or not base.info(embed).shape:
        return
    rows = base.info(embed).shape[0]
    for m in models:
        if embed not in m or not m.info(embed).shape:
            continue
        theirs = m.info(embed).shape[0]
        if theirs != rows and tuple(m.info(embed).shape[1:]) == tuple(base.info(embed).shape[1:]):
            raise CheckpointError(
                f"vocabulary sizes differ: the base {base.label} has {rows} rows in {embed!r} but model {m.label} "
                f"has {theirs}; pass --tokenizer-source base, union or {m.label} to align the embedding rows by "
                "token"
            )


def _check_tensors(base: Any, models: Sequence[Any], tokenizer_source: str | None) -> None:
    """The engine's preflight on headers: names, shapes (vocabulary rows aside with a tokenizer source), and
    floating / non-floating dtypes."""
    from hf_atm.merging.vocab import vocab_tensor_names

    vocab = frozenset(vocab_tensor_names([base, *models])) if tokenizer_source is not None else frozenset()
    base_names = set(base.names)
    for m in models:
        for name in base.names:
            if name not in m:
                raise CheckpointError(
                    f"tensor {name!r} is in the base {base.label} ({_where(base.info(name))}) but missing from "
                    f"model {m.label}"
                )
        extra = next((n for n in m.names if n not in base_names), None)
        if extra is not None:
            raise CheckpointError(
                f"tensor {extra!r} is in model {m.label} ({_where(m.info(extra))}) but not in the base {base.label}"
            )
        for name in base.names:
            b, t = base.info(name), m.info(name)
            same = tuple(b.shape) == tuple(t.shape) or (
                name in vocab and len(b.shape) == len(t.shape) and tuple(b.shape[1:]) == tuple(t.shape[1:])
            )
            if not same:
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(b.shape)} in the base {_where(b)} but {tuple(t.shape)} in "
                    f"model {_where(t)}"
                )
            if _floating(b.dtype) != _floating(t.dtype):
                raise CheckpointError(
                    f"tensor {name!r} is {b.dtype} in the base {_where(b)} but {t.dtype} in model {_where(t)}: a "
                    "tensor must be floating in every checkpoint or in none"
                )


def _floating(dtype: Any) -> bool:
    return str(dtype).upper().startswith(("F", "BF"))  # safetensors codes: F16 / BF16 / F32 / F64 / F8_* ...
