"""Turn a model reference (a local folder, or a Hub repo id with an optional ``@revision``) into a local folder.

Resolution goes through ``huggingface_hub.snapshot_download`` so the usual cache, ``HF_HOME``, ``HF_ENDPOINT``
(a mirror) and ``HF_HUB_OFFLINE`` all apply; only the files a merge needs are downloaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hf_atm.errors import HubError

# What a merge reads or copies into its output: weights, configs, tokenizer / processor files, adapters.
MERGE_FILE_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece*.model",
    "*.tiktoken",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor*",
    "chat_template*",
    "heads/*",
    "multitask_config.json",
)
PICKLE_FILE_PATTERNS: tuple[str, ...] = ("*.bin", "*.bin.index.json")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def split_revision(ref: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; ``"org/name"`` -> ``("org/name", None)``."""
    if "@" in ref:
        repo_id, revision = ref.rsplit("@", 1)
        if not repo_id or not revision:
            raise HubError(f"invalid model reference {ref!r}: expected 'org/name@revision'")
        return repo_id, revision
    return ref, None


def is_local_reference(ref: str | os.PathLike) -> bool:
    """True when ``ref`` names an existing local path (which always wins over a repo id of the same name)."""
    return Path(ref).expanduser().exists()


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
    (a mirror). Raises :class:`HubError` naming the reference and the Hub's (or the cache's) own message, on
    one line, when it cannot be resolved.
    """
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HubError(f"model reference {str(ref)!r} is a file; expected a model folder or a Hub repo id")
        return path.resolve()
    repo_id, revision = split_revision(str(ref))
    if not _REPO_ID.match(repo_id):
        raise HubError(f"{str(ref)!r} is neither an existing local folder nor a valid Hub repo id")
    patterns = list(allow_patterns or MERGE_FILE_PATTERNS)
    if allow_pickle:
        patterns += list(PICKLE_FILE_PATTERNS)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

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
