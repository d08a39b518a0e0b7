"""Test fixtures around a real ``olah`` Hugging Face mirror (PyPI ``olah``) running offline on 127.0.0.1.

olah serves "local mirror" repositories without any upstream: with ``[accessibility] offline = true`` and
``[basic] mirrors-path = [ROOT]`` in its TOML config, a git repository at ``ROOT/models/<org>/<name>`` is
served through the Hub's download API (``/api/models/<org>/<name>/revision/<rev>``, ``.../tree/<rev>``,
``/<org>/<name>/resolve/<rev>/<file>``; branches, tags and commit hashes all resolve, see
``olah/mirror/repos.py``). Files may be plain git blobs or Git LFS pointers whose objects lie in
``.git/lfs/objects/`` (olah reads them there; no git-lfs binary needed).

:func:`make_mirror_repo` / :func:`add_commit` build such repositories with the ``git`` command;
:class:`OlahMirror` starts ``python -m olah.server -c CONFIG`` and stops that process (by its pid) on exit.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["OlahMirror", "add_commit", "free_port", "make_mirror_repo"]

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "hf-atm tests",
    "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "hf-atm tests",
    "GIT_COMMITTER_EMAIL": "tests@example.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, **_GIT_ENV}
    out = subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _lfs_pointer(data: bytes) -> bytes:
    """The Git LFS pointer file of `data` (the format olah and the Hub recognise)."""
    oid = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()


def add_commit(
    repo: Path, files: Mapping[str, bytes], message: str, *, lfs: Iterable[str] = (), tag: str | None = None
) -> str:
    """Write `files` (path -> bytes) into the git repository `repo` and commit them; return the commit sha.

    Paths in `lfs` are committed as Git LFS pointers with their content stored in ``.git/lfs/objects``
    (as the Hub stores weights). `tag` adds a lightweight tag on the new commit.
    """
    lfs = set(lfs)
    for rel, data in files.items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel in lfs:
            oid = hashlib.sha256(data).hexdigest()
            obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(data)
            path.write_bytes(_lfs_pointer(data))
        else:
            path.write_bytes(data)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    if tag:
        _git(repo, "tag", tag)
    return _git(repo, "rev-parse", "HEAD")


def make_mirror_repo(
    mirrors_root: Path,
    repo_id: str,
    files: Mapping[str, bytes],
    *,
    lfs: Iterable[str] = (),
    tag: str | None = None,
) -> tuple[Path, str]:
    """Create the model repo `repo_id` ("org/name") under `mirrors_root` with one commit of `files` on branch
    ``main``; return (repository folder, commit sha)."""
    org, name = repo_id.split("/")
    repo = mirrors_root / "models" / org / name
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    lfs = list(lfs)
    if lfs:
        attrs = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in lfs)
        files = {".gitattributes": attrs.encode(), **files}
    return repo, add_commit(repo, files, "initial commit", lfs=lfs, tag=tag)


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OlahMirror:
    """``olah`` serving the git repositories under `mirrors_root`, offline, on 127.0.0.1:<free port>.

    ``endpoint`` is the URL to use as ``HF_ENDPOINT``. The server's output goes to ``workdir/olah.log``
    (shown in the error when it does not come up within `startup_timeout` seconds).
    """

    def __init__(self, mirrors_root: Path, workdir: Path, startup_timeout: float = 60.0):
        self.mirrors_root = Path(mirrors_root)
        self.workdir = Path(workdir)
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._log = self.workdir / "olah.log"

    def _write_config(self) -> Path:
        cfg = self.workdir / "olah.toml"
        cfg.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f'repos-path = "{self.workdir / "cache"}"\n'
            f'mirrors-path = ["{self.mirrors_root}"]\n'
            "[accessibility]\n"
            "offline = true\n"
        )
        return cfg

    def __enter__(self) -> OlahMirror:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self._write_config()
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "olah.server", "-c", str(cfg), "--log-path", str(self.workdir / "logs")],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if not k.startswith("HF_")},
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"olah exited with status {self._proc.returncode}:\n{self._log.read_text()}")
            try:
                urllib.request.urlopen(self.endpoint + "/api/whoami-v2", timeout=2).close()
                return self
            except urllib.error.HTTPError:  # any HTTP answer (even an error status) means it is serving
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"olah did not answer on {self.endpoint} within {self.startup_timeout} s:\n"
                           f"{self._log.read_text()}")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
