"""Upload a finished folder (a merge, a merged adapter, an ATM run) to the Hugging Face Hub with ``HfApi``.

:func:`push_folder` creates the repo if needed (``create_repo(exist_ok=True)``), creates the target branch
when one is named and does not exist yet (``create_branch(exist_ok=True)``), then ``upload_folder``: the
client decides per file how it travels (inline, LFS or Xet for large weights) and splits huge folders into
several commits. The token comes from ``token=`` or else from the usual places (``HF_TOKEN``, ``hf auth
login``); it is handed to ``HfApi`` only and never printed, logged or written (errors are redacted too).

Transient failures are retried: every step (create the repo, create the branch, upload the files, which
includes the preupload, LFS and commit calls) that meets HTTP 429, 500, 502, 503 or 504 or a dropped
connection is tried again after a pause: the Hub's ``Retry-After`` when it sends one, else an exponential
backoff (``base_delay * 2**k``, capped at ``max_delay``), for at most ``attempts`` tries (:class:`RetryPolicy`;
:data:`DEFAULT_RETRY` is 5 tries, 2 s doubling to at most 60 s). A ``Retry-After`` beyond ``max_delay`` ends
the retries at once (the message says how long the Hub asked to wait). Re-uploading is safe: files already on
the Hub (LFS objects, unchanged files) are not sent again.

A failure raises :class:`~hf_atm.errors.HubError` carrying the Hub's own message; the local folder is only
ever read, never moved or removed, so it is intact and the push can be retried on its own with
``hf-atm push FOLDER --repo-id ...``.

CLI helpers: :func:`add_push_arguments` / :func:`push_from_args` give any command ``--push-to-hub REPO_ID
[--private] [--revision BRANCH] [--commit-message MSG] [--create-pr]`` (argument dests all start with
``push_``, see :data:`PUSH_ARG_DESTS`); :func:`register_push_command` adds the ``hf-atm push`` subcommand.
"""

from __future__ import annotations

import argparse
import email.utils
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hf_atm.errors import CheckpointError, HubError

__all__ = [
    "DEFAULT_RETRY",
    "PUSH_ARG_DESTS",
    "RETRY_STATUSES",
    "RetryPolicy",
    "add_push_arguments",
    "push_folder",
    "push_from_args",
    "register_push_command",
    "run_push_command",
]

#: argparse dests that :func:`add_push_arguments` adds (a command that builds a config from ``vars(args)``
#: must leave these out).
PUSH_ARG_DESTS: tuple[str, ...] = (
    "push_to_hub",
    "push_private",
    "push_revision",
    "push_commit_message",
    "push_create_pr",
)

#: HTTP statuses a push retries: rate limited, and the server errors that are usually transient.
RETRY_STATUSES: frozenset[int] = frozenset({429, 500, 502, 503, 504})

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryPolicy:
    """How a push retries a step that meets a transient failure (see the module docstring).

    ``attempts``: tries per step, the first included (1 = no retry); ``base_delay`` / ``max_delay``: seconds of
    the exponential backoff and its cap (also the longest ``Retry-After`` honoured); ``statuses``: the HTTP
    statuses retried (dropped connections and timeouts are retried too); ``sleep``: the pause (tests pass a
    recorder).
    """

    attempts: int = 5
    base_delay: float = 2.0
    max_delay: float = 60.0
    statuses: frozenset[int] = RETRY_STATUSES
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)

    def backoff(self, retry: int) -> float:
        """The pause before retry number `retry` (1-based) when the Hub gives no Retry-After."""
        return min(self.max_delay, self.base_delay * 2 ** (retry - 1))


#: The policy :func:`push_folder` uses when given none.
DEFAULT_RETRY = RetryPolicy()


class _GaveUp(Exception):
    """A transient failure that was retried until the policy ran out (or the Hub asked for a too long wait)."""

    def __init__(self, cause: BaseException, attempts: int, note: str = ""):
        super().__init__(str(cause))
        self.cause, self.attempts, self.note = cause, attempts, note


def _status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return int(status) if isinstance(status, int) else None


def _is_connection_error(exc: BaseException) -> bool:
    try:
        import httpx2 as httpx  # huggingface_hub 2.x's HTTP client
    except ImportError:  # pragma: no cover - older huggingface_hub
        import httpx
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))


def _retry_after(exc: BaseException) -> float | None:
    """Seconds the Hub's ``Retry-After`` header asks to wait (delay-seconds or an HTTP date), or None."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    value = str(value).strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _with_retries(call: Callable[[], _T], step: str, policy: RetryPolicy) -> _T:
    """``call()``, retried on transient failures per `policy`; _GaveUp wraps the last one when retries run out."""
    attempts = max(1, int(policy.attempts))
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except HubError:
            raise
        except Exception as exc:
            status = _status_of(exc)
            transient = status in policy.statuses if status is not None else _is_connection_error(exc)
            if not transient:
                raise
            if attempt == attempts:
                if attempts == 1:
                    raise
                raise _GaveUp(exc, attempt) from exc
            wait = _retry_after(exc)
            if wait is not None and wait > policy.max_delay:
                raise _GaveUp(exc, attempt, f"the Hub asked to retry after {wait:.0f} s") from exc
            wait = policy.backoff(attempt) if wait is None else wait
            what = f"HTTP {status}" if status is not None else type(exc).__name__
            _log.warning("%s: %s, retrying in %.1f s (attempt %d of %d)", step, what, wait, attempt + 1, attempts)
            policy.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


# Hugging Face access tokens and credentials inside URLs never reach a message.
_SECRET = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)")


def _redact(text: str, token: str | None) -> str:
    """`text` without the explicit `token` (whatever its form), Hub tokens or URL credentials."""
    if token:
        text = text.replace(token, "***")
    return _SECRET.sub("***", text)


def _hub_reason(exc: BaseException) -> str:
    """The Hub's message for a failed request, on one line (HfHubHTTPError's text holds the server message)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    server = " ".join(str(getattr(exc, "server_message", None) or "").split())
    if server and server not in text:
        text = f"{text} ({server})"
    return text.rstrip(".")


def _check_inputs(folder: Path, repo_id: str, revision: str | None, create_pr: bool) -> None:
    """Validate what can be checked locally, before any request."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not folder.is_dir():
        raise CheckpointError(f"cannot push {folder}: it is not a folder")
    if not any(p.is_file() for p in folder.rglob("*")):
        raise CheckpointError(f"cannot push {folder}: the folder holds no files")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"invalid Hub repo id {repo_id!r} for --push-to-hub: {e}") from None
    if "/" not in repo_id:
        raise HubError(f"invalid Hub repo id {repo_id!r}: expected 'namespace/name' (your user or an organization)")
    if create_pr and revision not in (None, "main"):
        raise HubError(
            "--create-pr opens a pull request against the default branch; it cannot be combined with "
            f"--revision {revision!r}"
        )


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    retry: RetryPolicy | None = None,
) -> str:
    """Upload every file of `folder` to the model repo `repo_id`; return the URL of the commit (of the PR
    when `create_pr`).

    * the repo is created when missing; ``private=True`` makes a new repo private (``False`` leaves the
      visibility to the Hub's / the organization's default); an existing repo's visibility is not changed;
    * `revision`: the branch to commit to (default ``main``); it is created from ``main`` when missing;
      ``refs/pr/N`` commits to an open pull request;
    * `create_pr`: commit to a new pull request against ``main`` instead (not with `revision`);
    * `token`: a Hub token; None uses ``HF_TOKEN`` or the saved login. It is never printed or written;
    * `endpoint`: the Hub URL (default: ``HF_ENDPOINT`` or https://huggingface.co);
    * `retry`: how transient failures (429, 5xx, dropped connections) are retried; default
      :data:`DEFAULT_RETRY`.

    Raises CheckpointError when `folder` is missing or empty, HubError for an invalid repo id, offline mode
    (``HF_HUB_OFFLINE``), or any failed request (naming the step, the number of attempts, and carrying the
    Hub's message). The folder is only read: after a failure it is intact and the push can simply be re-run.
    """
    from huggingface_hub import HfApi

    folder = Path(folder).expanduser()
    _check_inputs(folder, repo_id, revision, create_pr)
    if _offline():
        raise HubError(
            f"cannot push {folder} to {repo_id}: HF_HUB_OFFLINE is set (offline mode); unset it to push. "
            f"The folder is intact; retry with: hf-atm push {folder} --repo-id {repo_id}"
        )
    api = HfApi(endpoint=endpoint, token=token)
    policy = retry if retry is not None else DEFAULT_RETRY
    step = "create the repo"
    try:
        # private=False -> None: do not force a public repo where the organization defaults to private.
        _with_retries(lambda: api.create_repo(repo_id, repo_type="model", private=True if private else None,
                                              exist_ok=True), step, policy)
        branch = revision if revision not in (None, "main") and not revision.startswith("refs/") else None
        if branch is not None:
            step = f"create branch {branch!r}"
            _with_retries(lambda: api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True),
                          step, policy)
        step = "upload the files"
        info = _with_retries(lambda: api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name} with hf-atm",
            create_pr=create_pr,
        ), step, policy)
    except HubError:
        raise
    except Exception as exc:  # HfHubHTTPError, connection errors, client ValueErrors: one clear line
        tries = ""
        if isinstance(exc, _GaveUp):
            tries = f", {exc.attempts} attempt{'s' if exc.attempts > 1 else ''}" + (f", {exc.note}" if exc.note else "")
            exc = exc.cause
        reason = _redact(_hub_reason(exc), token)
        raise HubError(
            f"pushing {folder} to {repo_id} failed ({step}{tries}): {reason}. The local folder is intact; "
            f"retry with: hf-atm push {folder} --repo-id {repo_id}"
            + (f" --revision {revision}" if revision else "")
        ) from None
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or str(info)
    return _redact(str(url), token)


# ---------------------------------------------------------------------------------------------------- CLI
def add_push_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """Add ``--push-to-hub REPO_ID [--private] [--revision BRANCH] [--commit-message MSG] [--create-pr]``.

    Works with parsers built with ``argument_default=argparse.SUPPRESS`` (unset options are then absent from
    the namespace; :func:`push_from_args` handles that). Tokens are deliberately not a flag (command lines end
    up in shell histories and process lists): use ``HF_TOKEN`` or ``hf auth login``.
    """
    group = parser.add_argument_group("push to the Hub (token from HF_TOKEN or `hf auth login`)")
    group.add_argument("--push-to-hub", dest="push_to_hub", metavar="REPO_ID",
                       help="after the run, upload the output folder to this model repo (created if missing)")
    group.add_argument("--private", dest="push_private", action="store_true",
                       help="create the repo as private (an existing repo keeps its visibility)")
    group.add_argument("--revision", dest="push_revision", metavar="BRANCH",
                       help="branch of REPO_ID to commit to (created from main if missing; default main)")
    group.add_argument("--commit-message", dest="push_commit_message", metavar="MSG", help="commit message")
    group.add_argument("--create-pr", dest="push_create_pr", action="store_true",
                       help="open a pull request against main instead of committing to it")


def _push_options_given(args: argparse.Namespace) -> list[str]:
    flags = {"push_private": "--private", "push_revision": "--revision",
             "push_commit_message": "--commit-message", "push_create_pr": "--create-pr"}
    return [flag for dest, flag in flags.items() if getattr(args, dest, None)]


def push_from_args(args: argparse.Namespace, folder: str | os.PathLike, token: str | None = None) -> str | None:
    """Push `folder` as the options of :func:`add_push_arguments` ask; return the commit / PR URL, or None
    when ``--push-to-hub`` was not given (then the other push options are an error: HubError)."""
    repo_id = getattr(args, "push_to_hub", None)
    if not repo_id:
        stray = _push_options_given(args)
        if stray:
            raise HubError(f"{', '.join(stray)} only apply with --push-to-hub REPO_ID")
        return None
    return push_folder(
        folder,
        repo_id,
        private=bool(getattr(args, "push_private", False)),
        revision=getattr(args, "push_revision", None),
        commit_message=getattr(args, "push_commit_message", None),
        create_pr=bool(getattr(args, "push_create_pr", False)),
        token=token,
    )


def run_push_command(args: argparse.Namespace) -> int:
    """``hf-atm push FOLDER --repo-id REPO_ID``: upload a finished folder, print the commit URL."""
    args.push_to_hub = args.repo_id
    url = push_from_args(args, args.folder)
    print(f"pushed {args.folder} to {args.repo_id}: {url}")
    return 0


def register_push_command(subparsers: Any) -> None:
    """Add the ``push`` subcommand to an argparse ``add_subparsers()`` object (fits ``cli.SUBCOMMANDS``)."""
    p = subparsers.add_parser(
        "push",
        help="upload a finished output folder to the Hugging Face Hub",
        description=(
            "Upload FOLDER (e.g. a merge's OUT_DIR) to a model repo on the Hub, creating the repo and the branch "
            "if needed. The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub."
        ),
    )
    p.add_argument("folder", metavar="FOLDER", help="the folder to upload (every file in it)")
    p.add_argument("--repo-id", required=True, metavar="REPO_ID", help="target model repo, 'namespace/name'")
    p.add_argument("--private", dest="push_private", action="store_true",
                   help="create the repo as private (an existing repo keeps its visibility)")
    p.add_argument("--revision", dest="push_revision", metavar="BRANCH",
                   help="branch to commit to (created from main if missing; default main)")
    p.add_argument("--commit-message", dest="push_commit_message", metavar="MSG", help="commit message")
    p.add_argument("--create-pr", dest="push_create_pr", action="store_true",
                   help="open a pull request against main instead of committing to it")
    p.set_defaults(func=run_push_command, _parser=p)
