"""Turn a model reference (a local folder, or a Hub repo id with an optional ``@revision``) into a local folder.

Resolution goes through ``huggingface_hub.snapshot_download`` so the usual cache, ``HF_HOME``, ``HF_ENDPOINT``
(a mirror) and ``HF_HUB_OFFLINE`` all apply; only the files a merge needs are downloaded. Nothing here forces a
re-download or deletes anything in the cache.

**Interrupted downloads resume.** Within one run, huggingface_hub's ``http_get`` resumes a transfer whose
connection drops with a ``Range`` request (a few times). Across runs it does not (2.x): each download goes to a
process-unique ``<etag>.<random>.incomplete`` file that is deleted when the download fails or the process
dies. So before the snapshot download, every weights file of at least :data:`RESUMABLE_MIN_BYTES` that is not
in the cache yet is fetched here into the stable ``blobs/<etag>.incomplete`` (under huggingface_hub's own lock
for that blob, ``.locks/<repo>/<etag>.lock``), continued with ``Range: bytes=<size>-`` by the next run when the
process was killed or the connection lost, checked (size; the sha256 / git oid in the etag when the file was
resumed) and renamed to ``blobs/<etag>``; ``snapshot_download`` then only links it into the snapshot. Files
the Hub serves through Xet (with ``hf_xet`` installed) are left to huggingface_hub, whose Xet client has its
own chunk cache. A partial file that ends up corrupt is deleted and fetched again once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

from hf_atm.errors import HubError

#: Top-level files that make up a tokenizer (the chat template travels with it).
TOKENIZER_FILE_PATTERNS: tuple[str, ...] = (
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "*.model",  # sentencepiece: spiece.model, tokenizer.model, sentencepiece.bpe.model
    "*.tiktoken",
    "chat_template*",
)
#: Top-level files of an image / audio / video processor.
PROCESSOR_FILE_PATTERNS: tuple[str, ...] = (
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor*",
    "feature_extractor*",
    "video_preprocessor_config.json",
)
#: What travels with a model's weights: its configs, tokenizer and processor (a merge copies these from its base).
COMPANION_FILE_PATTERNS: tuple[str, ...] = (
    "config.json", "generation_config.json", *TOKENIZER_FILE_PATTERNS, *PROCESSOR_FILE_PATTERNS,
)
# What a merge reads or copies into its output: weights, companions, adapters, a multi-task model's heads.
MERGE_FILE_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.safetensors.index.json",
    "adapter_config.json",
    *COMPANION_FILE_PATTERNS,
    "heads/*",
    "multitask_config.json",
)
PICKLE_FILE_PATTERNS: tuple[str, ...] = ("*.bin", "*.bin.index.json")
#: Weight files from this size on are fetched resumably across runs (see the module docstring).
RESUMABLE_MIN_BYTES = 16 << 20
_WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.bin")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def split_revision(ref: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; ``"org/name"`` -> ``("org/name", None)``."""
    if "@" in ref:
        repo_id, revision = ref.rsplit("@", 1)
        if not repo_id or not revision:
            raise HubError(f"invalid model reference {ref!r}: expected 'org/name@revision'")
        return repo_id, revision
    return ref, None


def is_repo_id(repo_id: str) -> bool:
    """Whether `repo_id` (without ``@revision``) has the shape of a Hub repo id (``name`` or ``org/name``)."""
    return _REPO_ID.match(repo_id) is not None


def pin_revision(ref: str, revisions: Mapping[str, str]) -> str:
    """``ref@rev`` when `revisions` pins `ref`, an unpinned Hub reference (``MergeConfig.revisions``); else `ref`."""
    if ref in revisions and "@" not in ref and not is_local_reference(ref):
        return f"{ref}@{revisions[ref]}"
    return ref


def is_local_reference(ref: str | os.PathLike) -> bool:
    """True when ``ref`` names an existing local path (which always wins over a repo id of the same name)."""
    return Path(ref).expanduser().exists()


def snapshot_repo_id(path: str | os.PathLike) -> str | None:
    """``"org/name"`` when `path` is a Hugging Face cache snapshot (``.../models--org--name/snapshots/<commit>``),
    else None."""
    p = Path(path)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name[len("models--"):].replace("--", "/")
    return None


def hub_id_of(ref_or_model: object) -> str | None:
    """The Hub repo id (``org/name``, no revision) a backbone reference or model names; None for a local folder,
    a malformed or missing reference. The one rule of the run cards and the export cards (``base_model``).

    A string is a reference: a path (one that exists, is absolute, or starts with ``.``) names a repo only when
    it is a Hugging Face cache snapshot (``.../models--org--name/snapshots/<commit>``); anything else counts when
    it has the shape ``org/name[@rev]`` (a bare ``name`` may be a local folder's name and is not claimed). Any
    other object is a model: its first known reference decides, ``backbone_source`` (in memory: a Hub id or an
    absolute folder), then a string ``base_model``, then ``backbone.config._name_or_path``.
    """
    if ref_or_model is None:
        return None
    if not isinstance(ref_or_model, (str, os.PathLike)):
        legacy = getattr(ref_or_model, "base_model", None)  # PreTrainedModel's is a module: strings only
        backbone_config = getattr(getattr(ref_or_model, "backbone", None), "config", None)
        for ref in (getattr(ref_or_model, "backbone_source", None), legacy if isinstance(legacy, str) else None,
                    getattr(backbone_config, "_name_or_path", None)):
            if isinstance(ref, (str, os.PathLike)) and os.fspath(ref):
                return hub_id_of(ref)
        return None
    ref = os.fspath(ref_or_model)
    if not ref:
        return None
    path = Path(ref).expanduser()
    if path.exists() or path.is_absolute() or ref.startswith("."):
        return snapshot_repo_id(path.resolve() if path.exists() else path)
    try:
        repo_id = split_revision(ref)[0]
    except HubError:  # "org/name@": malformed, no Hub id
        return None
    return repo_id if "/" in repo_id and is_repo_id(repo_id) else None


def resolve_model(
    ref: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    allow_patterns: tuple[str, ...] | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
) -> Path:
    """Return a local folder holding the model named by ``ref``.

    ``ref`` is a local folder, or a Hub repo id optionally followed by ``@revision`` (branch, tag or commit).
    Repo ids are fetched with ``snapshot_download`` restricted to :data:`MERGE_FILE_PATTERNS` (plus ``*.bin``
    when ``allow_pickle``), honouring the cache and ``HF_HUB_OFFLINE``; `endpoint` overrides ``HF_ENDPOINT``
    (a mirror). Large weights files not cached yet are fetched first, resumably across runs (see the module
    docstring). Raises :class:`HubError` naming the reference and the Hub's (or the cache's) own message, on
    one line, when it cannot be resolved, or when a weights download fails midway (its partial file is kept
    for the next run).
    """
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HubError(f"model reference {str(ref)!r} is a file; expected a model folder or a Hub repo id")
        return path.resolve()
    repo_id, revision = split_revision(str(ref))
    if not is_repo_id(repo_id):
        raise HubError(f"{str(ref)!r} is neither an existing local folder nor a valid Hub repo id")
    patterns = list(allow_patterns or MERGE_FILE_PATTERNS)
    if allow_pickle:
        patterns += list(PICKLE_FILE_PATTERNS)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if not constants.is_offline_mode():
        _prefetch_weights(repo_id, revision, patterns, token=token, cache_dir=cache_dir, endpoint=endpoint)
    try:
        local = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, token=token, cache_dir=cache_dir,
            endpoint=endpoint,
        )
    except LocalEntryNotFoundError as exc:
        what = f"revision {revision!r} of {repo_id}" if revision else repo_id
        hint = (f" (HF_HUB_OFFLINE is set and {what} is not in the local cache)"
                if constants.is_offline_mode() else "")
        raise HubError(f"cannot resolve model {str(ref)!r}{hint}: {_one_line(exc)}") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise HubError(f"cannot resolve model {str(ref)!r}: {_one_line(exc)}") from exc
    return Path(local)


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (the CLI prints errors as one line)."""
    return " ".join(str(exc).split()) or type(exc).__name__


# --------------------------------------------------------------------------------- resumable weight files
def _prefetch_weights(
    repo_id: str,
    revision: str | None,
    patterns: list[str],
    *,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    endpoint: str | None,
) -> None:
    """Fetch the large weights files of `repo_id` that are not cached yet into their cache blobs, resumably.

    Best effort before ``snapshot_download``: a failed listing or metadata request leaves the file to it (it
    reports the error). Raises HubError only when a transfer started here fails; its partial file is kept.
    """
    from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import repo_folder_name

    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision or constants.DEFAULT_REVISION)
    except Exception:  # noqa: BLE001 - snapshot_download reports a missing repo / revision or the Hub's error
        return
    sha = info.sha
    names = [
        s.rfilename for s in (info.siblings or [])
        if any(fnmatch.fnmatch(s.rfilename, p) for p in _WEIGHT_PATTERNS)
        and any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)
    ]
    if not sha or not names:
        return
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    storage = cache / folder
    for name in names:
        if (storage / "snapshots" / sha / name).exists():
            continue  # already in this snapshot
        try:
            meta = get_hf_file_metadata(hf_hub_url(repo_id, name, revision=sha, endpoint=endpoint), token=token,
                                        endpoint=endpoint)
        except Exception:  # noqa: BLE001 - left to snapshot_download
            continue
        if not meta.etag or meta.size is None or meta.size < RESUMABLE_MIN_BYTES or not meta.location:
            continue
        if meta.xet_file_data is not None and _xet_download_enabled():
            continue  # the Xet client downloads (and resumes) it
        blob = storage / "blobs" / meta.etag
        if blob.exists():
            continue
        _fetch_resumable(meta.location, blob, meta.size, meta.etag, cache / ".locks" / folder / f"{meta.etag}.lock",
                         token=token, name=name, what=f"{name} of {repo_id}")


def _xet_download_enabled() -> bool:
    from huggingface_hub import constants
    from huggingface_hub.utils import is_xet_available

    return bool(is_xet_available()) and not constants.HF_HUB_DISABLE_XET


def _fetch_resumable(url: str, blob: Path, size: int, etag: str, lock: Path, *, token: str | bool | None,
                     name: str, what: str) -> None:
    """Download `url` (`size` bytes) to `blob` through ``<blob>.incomplete``, continuing what an earlier run left."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    partial = blob.with_name(blob.name + ".incomplete")
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock.parent.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers(token=token, library_name="hf_atm")
    with WeakFileLock(lock):
        for _attempt in range(2):
            if blob.exists():
                return  # another process finished it while we waited for the lock
            done = partial.stat().st_size if partial.exists() else 0
            if done > size:
                partial.unlink()
                done = 0
            try:
                with open(partial, "r+b" if done else "wb") as f:
                    f.seek(done)
                    http_get(url, f, resume_size=done, headers=headers, expected_size=size,
                             displayed_filename=name)
            except Exception as exc:
                have = partial.stat().st_size if partial.exists() else 0
                raise HubError(
                    f"downloading {what} failed after {have} of {size} bytes: {_one_line(exc)}. The partial file "
                    f"{partial} is kept: run again to resume it"
                ) from exc
            if not done or _content_matches(partial, etag):
                os.replace(partial, blob)
                return
            partial.unlink()  # the resumed file is corrupt: fetch it once more from the start
    raise HubError(f"downloading {what}: the file received does not match its etag {etag}")


def _content_matches(path: Path, etag: str) -> bool:
    """Whether `path` hashes to `etag` (an LFS sha256 or a git blob sha1); True for an etag of another form."""
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        h = hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", etag):
        h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    else:
        return True
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest() == etag
