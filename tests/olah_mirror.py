"""Test fixtures around a real ``olah`` Hugging Face mirror (PyPI ``olah``) running offline on 127.0.0.1.

olah serves "local mirror" repositories without any upstream: with ``[accessibility] offline = true`` and
``[basic] mirrors-path = [ROOT]`` in its TOML config, a git repository at ``ROOT/models/<org>/<name>`` is
served through the Hub's download API (``/api/models/<org>/<name>/revision/<rev>``, ``.../tree/<rev>``,
``/<org>/<name>/resolve/<rev>/<file>``; branches, tags and commit hashes all resolve, see
``olah/mirror/repos.py``). Files may be plain git blobs or Git LFS pointers whose objects lie in
``.git/lfs/objects/`` (olah reads them there; no git-lfs binary needed).

:func:`make_mirror_repo` / :func:`add_commit` build such repositories with the ``git`` command;
:class:`OlahMirror` starts ``python -m olah.server -c CONFIG`` and stops that process (by its pid) on exit.

:class:`RecordingProxy` sits in front of it (or any HTTP server) on 127.0.0.1 and records every request:
method, path, ``Range`` header, status and the body bytes it passed on before the client hung up; that is how
the tests count what a client downloaded. Note that olah's local mirrors ignore ``Range``: a ranged GET is
answered ``200`` with the whole file (``olah/mirror/repos.py: get_file``), so a client that wants only a
file's first bytes has to stop reading and close the connection.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["OlahMirror", "RecordingProxy", "add_commit", "free_port", "make_mirror_repo"]

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


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class RecordingProxy:
    """A threaded HTTP/1.1 reverse proxy to `upstream` on 127.0.0.1:<free port> that records each request.

    ``url`` is the address to give clients; ``requests`` holds one dict per request, appended when it ends:
    ``method``, ``path`` (unquoted, no query), ``range`` (the Range header or None), ``status``, ``sent`` (body
    bytes passed to the client before it finished or hung up) and ``length`` (the upstream Content-Length or
    None). The ``Host`` header is passed on, so absolute redirects of the upstream point back at the proxy.
    """

    def __init__(self, upstream: str, timeout: float = 60.0):
        parts = urlsplit(upstream)
        self._up_host, self._up_port = parts.hostname or "127.0.0.1", parts.port or 80
        self._upstream = upstream.rstrip("/")
        self.timeout = timeout
        self.requests: list[dict[str, Any]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def downloads(self, suffix: str) -> list[dict[str, Any]]:
        """The GET requests of paths ending with `suffix` (e.g. ``".safetensors"``)."""
        return [r for r in self.requests if r["method"] == "GET" and r["path"].endswith(suffix)]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self, "GET")

            def do_HEAD(self) -> None:
                proxy._forward(self, "HEAD")

            def do_POST(self) -> None:
                proxy._forward(self, "POST")

        return Handler

    def _forward(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
        record: dict[str, Any] = {"method": method, "path": unquote(urlsplit(h.path).path),
                                  "range": h.headers.get("Range"), "status": None, "sent": 0, "length": None}
        up = http.client.HTTPConnection(self._up_host, self._up_port, timeout=self.timeout)
        try:
            up.request(method, h.path, body=body, headers=headers)
            resp = up.getresponse()
            record["status"] = resp.status
            declared = resp.getheader("Content-Length")
            record["length"] = int(declared) if declared is not None else None
            h.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() in _HOP_BY_HOP or k.lower() in ("date", "server"):
                    continue
                if k.lower() == "location":
                    v = v.replace(self._upstream, self.url)
                h.send_header(k, v)
            has_body = method != "HEAD" and resp.status not in (204, 304)
            chunked = has_body and declared is None
            if chunked:
                h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            if not has_body:
                return
            try:
                while True:
                    piece = resp.read1(1 << 16) if hasattr(resp, "read1") else resp.read(1 << 16)
                    if not piece:
                        break
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    record["sent"] += len(piece)
                if chunked:
                    h.wfile.write(b"0\r\n\r\n")
                h.wfile.flush()
            except OSError:  # the client closed the connection (e.g. after reading a header)
                h.close_connection = True
        except OSError as e:
            if record["status"] is None:
                record["status"] = 502
                msg = f"proxy: upstream failed: {e}".encode()
                try:
                    h.send_response(502)
                    h.send_header("Content-Length", str(len(msg)))
                    h.end_headers()
                    h.wfile.write(msg)
                except OSError:
                    pass
            h.close_connection = True
        finally:
            up.close()
            self.requests.append(record)
