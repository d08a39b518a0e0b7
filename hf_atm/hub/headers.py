"""What a model is made of, read without its weights: config files and safetensors headers.

:func:`read_hub_input` reads one merge input given as a local folder or a Hub repo id (``org/name[@rev]``):

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

A Hub id whose requests fail (unknown repo or revision, no access, no connection) is read from its cached
snapshot if there is one; offline (``HF_HUB_OFFLINE``) no request is made and only the cache is read. What
the inputs are compared on is :mod:`hf_atm.merging.preflight`'s business.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from hf_atm.errors import CheckpointError, HfAtmError, HubError
from hf_atm.hub.resolve import (
    MERGE_FILE_PATTERNS,
    is_local_reference,
    is_repo_id,
    pin_revision,
    split_revision,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "HEADER_PROBE_BYTES",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "HubInput",
    "TensorHeader",
    "read_hub_input",
    "read_weight_map",
]

#: First ranged read of a safetensors file (as huggingface_hub's get_safetensors_metadata): most headers fit.
HEADER_PROBE_BYTES = 100_000
_MAX_HEADER = 25_000_000  # huggingface_hub.constants.SAFETENSORS_MAX_HEADER_LENGTH
#: transformers' safetensors weights: one file, or shards named by an index.
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
#: peft's adapter files (the folder of a LoRA adapter has the first).
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_SHARD_WORKERS = 8

#: ``(folder, label) -> adapter config``: reads (and may refuse, with CheckpointError) an adapter's config.
AdapterConfigReader = Callable[[Path, str], dict[str, Any]]


class TensorHeader(NamedTuple):
    """One tensor of a header: safetensors dtype code, shape, and its file (a path, or ``repo/filename``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str


@dataclass
class HubInput:
    """What is known of one input without its weights.

    ``label``: the reference with its pinned revision; ``folder``: a local folder holding the config files
    (a cache snapshot for a Hub id); ``config`` / ``adapter_config``: the parsed JSON files or None;
    ``names``: tensor names in storage order and ``tensors`` their headers (both empty when ``inspected`` is
    False: no safetensors weights to read); ``weights_file``: the file that names the tensors (the index, or
    the single weights file), for messages. It has the reading interface the vocabulary helpers of
    :mod:`hf_atm.merging.vocab` use (``names``, ``info``, ``in``, ``len``, ``label``).
    """

    label: str
    folder: Path | None = None
    config: dict[str, Any] | None = None
    adapter_config: dict[str, Any] | None = None
    names: list[str] = field(default_factory=list)
    tensors: dict[str, TensorHeader] = field(default_factory=dict)
    inspected: bool = False
    weights_file: str = ""

    def info(self, name: str) -> TensorHeader:
        """The header of tensor `name` (KeyError when absent)."""
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.names)

    @property
    def is_adapter(self) -> bool:
        """Whether the input is a peft adapter (it has an ``adapter_config.json``)."""
        return self.adapter_config is not None


# --------------------------------------------------------------------------------------------- reading
def _parse_header(raw: bytes, where: str, filename: str, file: str) -> list[TensorHeader]:
    """Tensors of a safetensors JSON header, in storage (offset) order."""
    try:
        header = json.loads(raw.decode("utf-8"))
        entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
        entries.sort(key=lambda kv: tuple(kv[1].get("data_offsets") or (0, 0)))
        return [TensorHeader(k, str(v["dtype"]), tuple(int(d) for d in v["shape"]), file) for k, v in entries]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where}: the safetensors header of {filename} is corrupt: {e}") from e


def _header_size(first8: bytes, where: str, filename: str) -> int:
    if len(first8) < 8:
        raise CheckpointError(f"{where}: {filename} is too small to be a safetensors file")
    size = struct.unpack("<Q", first8[:8])[0]
    if size > _MAX_HEADER:
        raise CheckpointError(f"{where}: {filename} has a {size}-byte safetensors header; corrupt or not safetensors")
    return size


def _local_header(path: Path, where: str, file: str) -> list[TensorHeader]:
    with open(path, "rb") as f:
        size = _header_size(f.read(8), where, path.name)
        raw = f.read(size)
    if len(raw) < size:
        raise CheckpointError(f"{where}: {path.name} is truncated inside its safetensors header")
    return _parse_header(raw, where, path.name, file)


def _remote_header(url: str, headers: Mapping[str, str], where: str, filename: str) -> list[TensorHeader]:
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
            return _parse_header(bytes(buf[8:need]), where, filename, f"{where}/{filename}")
        if not ranged or attempt:
            break
    raise CheckpointError(f"{where}: {filename} ended inside its safetensors header ({len(buf)} bytes read)")


def _read_local(folder: Path, label: str, read_adapter_config: AdapterConfigReader, shown: str) -> HubInput:
    """Config files and headers of a local folder (a model, an adapter, or a cached Hub snapshot); its files are
    named ``shown/filename`` in messages (the folder itself, or the repo id of a snapshot)."""
    item = HubInput(label=label, folder=folder)
    item.config = _load_json(folder / "config.json")
    if (folder / ADAPTER_CONFIG_NAME).is_file():
        item.adapter_config = read_adapter_config(folder, label)
        files = [ADAPTER_WEIGHTS_NAME] if (folder / ADAPTER_WEIGHTS_NAME).is_file() else []
    elif (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        files = sorted(set(read_weight_map(folder / SAFE_WEIGHTS_INDEX_NAME, label).values()))
        item.weights_file = f"{shown}/{SAFE_WEIGHTS_INDEX_NAME}"
    elif (folder / SAFE_WEIGHTS_NAME).is_file():
        files = [SAFE_WEIGHTS_NAME]
    else:
        return item
    item.weights_file = item.weights_file or (f"{shown}/{files[0]}" if files else "")
    _fill(item, [(name, _local_header(folder / name, label, f"{shown}/{name}")) for name in files])
    return item


def _read_remote(repo_id: str, revision: str | None, label: str, *, token: str | bool | None,
                 endpoint: str | None, read_adapter_config: AdapterConfigReader) -> HubInput:
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
    for name in ("config.json", ADAPTER_CONFIG_NAME):
        if name in present:
            item.folder = fetch(name).parent  # the snapshot folder of commit `sha`
    if item.folder is not None:
        item.config = _load_json(item.folder / "config.json")
    if ADAPTER_CONFIG_NAME in present:
        item.adapter_config = read_adapter_config(item.folder, label)
        files = [ADAPTER_WEIGHTS_NAME] if ADAPTER_WEIGHTS_NAME in present else []
    elif SAFE_WEIGHTS_INDEX_NAME in present:
        files = sorted(set(read_weight_map(fetch(SAFE_WEIGHTS_INDEX_NAME), label).values()))
        item.weights_file = f"{label}/{SAFE_WEIGHTS_INDEX_NAME}"
    elif SAFE_WEIGHTS_NAME in present:
        files = [SAFE_WEIGHTS_NAME]
    else:
        return item
    item.weights_file = item.weights_file or (f"{label}/{files[0]}" if files else "")
    headers = build_hf_headers(token=token, library_name="hf_atm")

    def one(name: str) -> tuple[str, list[TensorHeader]]:
        url = hf_hub_url(repo_id, name, revision=sha, endpoint=endpoint)
        return name, _remote_header(url, headers, label, name)

    if len(files) == 1:
        _fill(item, [one(files[0])])
    else:
        with ThreadPoolExecutor(max_workers=min(_SHARD_WORKERS, len(files))) as pool:
            _fill(item, list(pool.map(one, files)))
    return item


def _fill(item: HubInput, per_file: Iterable[tuple[str, list[TensorHeader]]]) -> None:
    for _name, tensors in per_file:  # files in name order, tensors in offset order: CheckpointReader's order
        for t in tensors:
            item.names.append(t.name)
            item.tensors[t.name] = t
    item.inspected = True


def _load_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the engine reports a corrupt config
    return data if isinstance(data, dict) else None


def _plain_adapter_config(folder: Path, label: str) -> dict[str, Any]:
    """An adapter config as stored ({} when unreadable): the default when no adapter-aware reader is given."""
    return _load_json(folder / ADAPTER_CONFIG_NAME) or {}


def read_weight_map(index: Path, label: str | None = None) -> dict[str, str]:
    """``{tensor name: shard file name}`` of a transformers index file (``model.safetensors.index.json``).

    CheckpointError naming the index (after ``label:`` when given) when it is unreadable, not JSON, or its
    ``weight_map`` is empty or not a mapping.
    """
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("weight_map is empty or not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        where = f"{label}: " if label else ""
        raise CheckpointError(f"{where}corrupt checkpoint index {index}: {e}") from e
    return {str(k): str(v) for k, v in weight_map.items()}


def read_hub_input(ref: str, *, revisions: Mapping[str, str] | None = None, token: str | bool | None = None,
                   endpoint: str | None = None,
                   read_adapter_config: AdapterConfigReader | None = None) -> HubInput | None:
    """What can be read of one reference without its weights, or None when it cannot be inspected here.

    A local folder is read from disk; a Hub id online from the Hub (configs downloaded, headers by ranged
    reads), offline, or online when a request fails, from its cached snapshot (None when it is not cached).
    `revisions` pins unpinned Hub references as ``MergeConfig.revisions`` does. `read_adapter_config(folder,
    label)` reads an adapter's ``adapter_config.json`` (default: the JSON as stored); it may refuse an adapter
    hf-atm cannot merge. Raises CheckpointError for a corrupt header, or what `read_adapter_config` raises.
    """
    from huggingface_hub import constants

    read_config = read_adapter_config or _plain_adapter_config
    ref = str(ref)
    pinned = pin_revision(ref, revisions or {})
    if is_local_reference(ref):
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            return None
        try:
            folder = folder.resolve()
            return _read_local(folder, ref, read_config, str(folder))
        except (OSError, CheckpointError):
            return None  # the engine's own checks name what is wrong with a local folder
    try:
        repo_id, revision = split_revision(pinned)
    except HubError:
        return None  # resolve_model raises the clear error
    if not is_repo_id(repo_id):
        return None
    if not constants.is_offline_mode():
        try:
            return _read_remote(repo_id, revision, pinned, token=token, endpoint=endpoint,
                                read_adapter_config=read_config)
        except HfAtmError:
            raise
        except _request_errors():
            pass  # not found, no access, 5xx after retries, no connection: the cache, else resolve_model's error
    folder = _cached_snapshot(repo_id, revision)
    return None if folder is None else _read_local(folder, pinned, read_config, pinned)


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

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                      allow_patterns=list(MERGE_FILE_PATTERNS)))
    except Exception:  # noqa: BLE001 - not cached (or an unreadable cache): nothing to check here
        return None
