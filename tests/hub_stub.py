"""A STUB of the Hugging Face Hub's write API for tests. It is not the Hub and implements only what
``huggingface_hub.HfApi`` (2.x) calls for ``create_repo``, ``create_branch`` and ``upload_folder`` of small
files, and ``create_pr``:

==========================================================  =============================================
``POST /api/repos/create``                                  create a model repo (409 when it exists)
``POST /api/validate-yaml``                                 README.md front matter must parse as a YAML mapping
``POST /api/models/{org}/{name}/branch/{branch}``           create a branch from ``main`` (409 if it exists)
``GET  /api/models/{org}/{name}/refs``                      list branches
``GET  /api/models/{org}/{name}[/revision/{rev}]``          repo info (``sha``, ``siblings``)
``POST /api/models/{org}/{name}/preupload/{rev}``           ``"regular"`` (inline base64) for every file, or
                                                            ``"lfs"`` from ``lfs_threshold`` bytes on; with the
                                                            oid of the file already on ``rev``
``POST /{org}/{name}.git/info/lfs/objects/batch``           Git LFS batch API (basic transfer): upload + verify
``PUT  /lfs-upload/{oid}``, ``POST /lfs-verify/{oid}``        receive / confirm an LFS object (sha256 checked)
``POST /api/models/{org}/{name}/commit/{rev}``              apply an ndjson commit (``file`` / ``lfsFile`` /
                                                            ``deletedFile``)
``POST /api/models/{org}/{name}/discussions``               open a pull request (``refs/pr/N``)
``GET  /api/models/{org}/{name}/discussions/{num}``         pull-request details
``GET  /api/models/{org}/{name}/tree/{rev}``                the file list (``oid``, ``size``, ``lfs``), for
                                                            ``snapshot_download``
``HEAD|GET /{org}/{name}/resolve/{rev}/{path}``             the file-download API: ``ETag`` (git oid, or the
                                                            sha256 in ``X-Linked-Etag`` / ``X-Linked-Size`` for
                                                            ``lfs`` files), ``X-Repo-Commit``,
                                                            ``Content-Length``, ``Range`` (206 +
                                                            ``Content-Range``)
==========================================================  =============================================

Revisions are branch names or the commit oids the stub reported (``add_model`` / a commit), so
``snapshot_download`` and ``hf_hub_download`` (plain HTTP: the stub sends no Xet headers) work against it.

Why files are "regular" by default: with ``hf_xet`` installed, huggingface_hub 2.x uploads every file the
Hub marks ``"lfs"`` through the Xet protocol (``_upload_pipeline.pipelined_upload``: no plain-LFS fallback
for files on disk), which needs a Xet CAS server; a stub cannot stand in for it. Regular files travel inside
the commit payload, so the stub sees their exact bytes. With ``HF_HUB_DISABLE_XET`` (or without ``hf_xet``)
the client takes the legacy path, and setting ``lfs_threshold`` exercises the Git LFS upload protocol.

The stub records what arrives: ``commits`` (revision, summary, ``files`` {path: bytes}, deletions),
``branches`` (state per ref), ``created`` (create-repo payloads), ``auth`` (Authorization headers seen),
``lfs_objects`` (sha256 -> bytes received over LFS), ``lfs_paths`` (paths committed as LFS files),
and ``readme_metadata(repo, rev)`` parses README.md's YAML front matter. ``fail[endpoint] = (status, message)``
makes an endpoint (``"create"``, ``"validate-yaml"``, ``"branch"``, ``"preupload"``, ``"lfs"``, ``"commit"``,
``"discussions"``) answer that
HTTP error with the message in the JSON body (``{"error": ...}``) and the ``X-Error-Message`` header, as the
Hub does, every time; for the statuses a client retries (429, 5xx) it also sends ``Retry-After:
{fail_retry_after}`` (``"0"`` by default, so a retrying client does not slow the tests; None sends none).

Faults for the retry and resume tests:

* ``inject(endpoint, status, message, times=N, headers=...)``: the next N calls of `endpoint` fail with that
  status, message and extra headers (e.g. ``Retry-After``), then it works again; ``calls[endpoint]`` counts
  every call of an endpoint (failed ones included);
* ``interrupt(path, after, mode, times=N)``: the next N downloads (GET) of `path` stop after `after` bytes of
  the response body: ``"drop"`` closes the connection (the client sees a truncated body), ``"stall"`` stops
  sending and holds the connection until ``release()`` (or ``stall_timeout`` seconds); ``downloads`` records
  every GET of a file: path, ``Range`` header, status, body bytes sent and the fault applied.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

__all__ = ["HubStub", "git_blob_oid"]


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of `data` (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Repo:
    private: bool | None
    refs: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    prs: list[dict[str, Any]] = field(default_factory=list)
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> files
    lfs: set[str] = field(default_factory=set)  # paths served as LFS files (sha256 etag)

    def files_at(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit oid, files) of a branch or a commit oid, None when unknown."""
        if rev in self.refs:
            return self.heads[rev], self.refs[rev]
        if rev in self.snapshots:
            return rev, self.snapshots[rev]
        return None


_RETRYABLE = frozenset({429, 500, 502, 503, 504})
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class HubStub:
    """A threaded HTTP stub of the Hub's write API on 127.0.0.1 (see the module docstring). Not the Hub."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.commits: list[dict[str, Any]] = []
        self.created: list[dict[str, Any]] = []
        self.auth: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.fail: dict[str, tuple[int, str]] = {}
        self.fail_retry_after: str | None = "0"
        self.calls: dict[str, int] = {}
        self.downloads: list[dict[str, Any]] = []
        self.stall_timeout = 30.0
        self._faults: dict[str, list[tuple[int, str, dict[str, str]]]] = {}
        self._interrupts: dict[str, list[tuple[int, str]]] = {}
        self._release = threading.Event()
        self.lfs_threshold: int | None = None
        self.lfs_objects: dict[str, bytes] = {}
        self.lfs_paths: set[str] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()  # free stalled downloads
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------------------ set-up and faults
    def add_model(self, repo_id: str, files: dict[str, bytes], *, lfs: tuple[str, ...] | list[str] = ()) -> str:
        """Create model repo `repo_id` with `files` on ``main`` (paths in `lfs` served as LFS files); its oid."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, _Repo(private=None))
            oid = hashlib.sha1(json.dumps([repo_id, sorted((p, git_blob_oid(d)) for p, d in files.items())])
                               .encode()).hexdigest()
            repo.refs["main"] = dict(files)
            repo.heads["main"] = oid
            repo.snapshots[oid] = dict(files)
            repo.lfs.update(lfs)
            return oid

    def inject(self, endpoint: str, status: int, message: str, *, times: int = 1,
               headers: dict[str, str] | None = None) -> None:
        """The next `times` calls of `endpoint` answer `status` with `message` (and `headers`)."""
        self._faults.setdefault(endpoint, []).extend([(status, message, dict(headers or {}))] * times)

    def interrupt(self, path: str, after: int, mode: str = "drop", *, times: int = 1) -> None:
        """The next `times` GETs of file `path` stop after `after` body bytes (``"drop"`` or ``"stall"``)."""
        if mode not in ("drop", "stall"):
            raise ValueError(f"mode must be drop or stall, got {mode!r}")
        self._interrupts.setdefault(path, []).extend([(after, mode)] * times)

    def release(self) -> None:
        """End every stalled download (and any later stall at once)."""
        self._release.set()

    # ------------------------------------------------------------------ state for assertions
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Files on `revision` of `repo_id` (path -> bytes)."""
        return dict(self.repos[repo_id].refs[revision])

    def readme_metadata(self, repo_id: str, revision: str = "main") -> dict[str, Any]:
        """The YAML front matter of README.md on `revision` ({} when absent)."""
        text = self.repos[repo_id].refs[revision].get("README.md", b"").decode("utf-8")
        if not text.startswith("---"):
            return {}
        return yaml.safe_load(text.split("---", 2)[1]) or {}

    # ------------------------------------------------------------------------------ handlers
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                stub._dispatch(self, "GET")

            def do_POST(self) -> None:
                stub._dispatch(self, "POST")

            def do_PUT(self) -> None:
                stub._dispatch(self, "PUT")

            def do_HEAD(self) -> None:
                stub._dispatch(self, "HEAD")

        return Handler

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(raw)

    def _error(self, h: BaseHTTPRequestHandler, status: int, message: str,
               headers: dict[str, str] | None = None) -> None:
        # validate-yaml lists its problems under "errors"; other endpoints use "error" (as the Hub does).
        self._send(h, status, {"error": message, "errors": [{"message": message}]},
                   {"X-Error-Message": message, **(headers or {})})

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if h.headers.get("Authorization"):
            self.auth.add(h.headers["Authorization"])
        parts = [unquote(p) for p in urlsplit(h.path).path.strip("/").split("/")]
        self.requests.append((method, "/".join(parts)))
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._download(h, method, parts)  # streamed outside the lock (a stalled one must not block)
        with self._lock:
            try:
                self._route(h, method, parts, body)
            except Exception as e:  # a stub bug shows up as a 500 with its reason
                self._error(h, 500, f"stub error: {e!r}")

    def _maybe_fail(self, h: BaseHTTPRequestHandler, endpoint: str) -> bool:
        self.calls[endpoint] = self.calls.get(endpoint, 0) + 1
        queued = self._faults.get(endpoint)
        if queued:
            status, message, headers = queued.pop(0)
            self._error(h, status, message, headers)
            return True
        if endpoint in self.fail:
            status, message = self.fail[endpoint]
            extra = {"Retry-After": self.fail_retry_after} if status in _RETRYABLE and self.fail_retry_after else {}
            self._error(h, status, message, extra)
            return True
        return False

    # ------------------------------------------------------------------------- file downloads
    def _download(self, h: BaseHTTPRequestHandler, method: str, parts: list[str]) -> None:
        repo_id, rev, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
        with self._lock:
            repo = self.repos.get(repo_id)
            found = repo.files_at(rev) if repo is not None else None
            if found is None or path not in found[1]:
                what = "Repository" if repo is None else "Revision" if found is None else "Entry"
                code = {"Repository": "RepoNotFound", "Revision": "RevisionNotFound", "Entry": "EntryNotFound"}[what]
                h.send_response(404)
                h.send_header("X-Error-Code", code)
                h.send_header("X-Error-Message", f"{what} not found")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            commit, data = found[0], found[1][path]
            lfs = path in repo.lfs
            fault = None
            if method == "GET" and self._interrupts.get(path):
                fault = self._interrupts[path].pop(0)
        size = len(data)
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_oid(data)
        start, stop, status = 0, size - 1, 200
        wanted = h.headers.get("Range")
        m = _RANGE.match(wanted.strip()) if wanted else None
        if m is not None:
            start, stop, status = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1), 206
            if start >= size:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        body = data[start:stop + 1]
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{etag}"')
        h.send_header("X-Repo-Commit", commit)
        if lfs:
            h.send_header("X-Linked-Etag", f'"{etag}"')
            h.send_header("X-Linked-Size", str(size))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{stop}/{size}")
        h.end_headers()
        if method == "HEAD":
            return
        record = {"path": path, "range": wanted, "status": status, "sent": 0, "fault": None}
        self.downloads.append(record)
        limit = len(body) if fault is None else min(fault[0], len(body))
        try:
            for i in range(0, limit, 1 << 16):
                h.wfile.write(body[i:min(i + (1 << 16), limit)])
                record["sent"] = min(i + (1 << 16), limit)
            h.wfile.flush()
            if fault is not None and limit < len(body):
                record["fault"] = fault[1]
                if fault[1] == "stall":
                    self._release.wait(self.stall_timeout)
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client went away
            h.close_connection = True

    def _route(self, h: BaseHTTPRequestHandler, method: str, parts: list[str], body: bytes) -> None:
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create(h, json.loads(body))
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(h, json.loads(body))
        if len(parts) == 2 and parts[0] == "lfs-upload" and method == "PUT":
            if hashlib.sha256(body).hexdigest() != parts[1]:
                return self._error(h, 400, "LFS object does not match its oid")
            self.lfs_objects[parts[1]] = body
            return self._send(h, 200, {})
        if len(parts) == 2 and parts[0] == "lfs-verify" and method == "POST":
            if parts[1] not in self.lfs_objects:
                return self._error(h, 404, f"LFS object {parts[1]} was not uploaded")
            return self._send(h, 200, {"success": True})
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(h, json.loads(body))
        if len(parts) == 4 and parts[:2] == ["api", "models"] and method == "GET":
            parts = [*parts, "revision", "main"]  # model_info without a revision: the default branch
        if len(parts) < 5 or parts[:2] != ["api", "models"]:
            return self._error(h, 404, f"stub: no route for {method} /{'/'.join(parts)}")
        repo_id, action, rest = f"{parts[2]}/{parts[3]}", parts[4], parts[5:]
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, f"Repository Not Found for url: /{'/'.join(parts)}.")
        if action == "branch" and method == "POST":
            return self._branch(h, repo, "/".join(rest), json.loads(body or b"{}"))
        if action == "refs" and method == "GET":
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": repo.heads[b]}
                        for b in repo.refs if not b.startswith("refs/")]
            return self._send(h, 200, {"branches": branches, "tags": [], "converts": []})
        if action == "revision" and method == "GET":
            rev = "/".join(rest)
            found = repo.files_at(rev)
            if found is None:
                return self._error(h, 404, f"Revision Not Found: {rev}")
            return self._send(h, 200, {"id": repo_id, "sha": found[0], "private": bool(repo.private),
                                       "siblings": [{"rfilename": p} for p in sorted(found[1])]})
        if action == "tree" and method == "GET" and rest:
            found = repo.files_at(rest[0])
            if found is None:
                return self._error(h, 404, f"Revision Not Found: {rest[0]}")
            under = "/".join(rest[1:])
            entries = []
            for p, data in sorted(found[1].items()):
                if under and not p.startswith(under.rstrip("/") + "/"):
                    continue
                entry: dict[str, Any] = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": p}
                if p in repo.lfs:
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            return self._send(h, 200, entries)
        if action == "preupload" and method == "POST":
            return self._preupload(h, repo, "/".join(rest), json.loads(body))
        if action == "commit" and method == "POST":
            return self._commit(h, repo_id, repo, "/".join(rest), body)
        if action == "discussions" and method == "POST":
            return self._open_pr(h, repo_id, repo, json.loads(body))
        if action == "discussions" and method == "GET" and rest:
            return self._pr_details(h, repo_id, repo, int(rest[0]))
        return self._error(h, 404, f"stub: no route for {method} /{'/'.join(parts)}")

    def _create(self, h: BaseHTTPRequestHandler, payload: dict[str, Any]) -> None:
        if self._maybe_fail(h, "create"):
            return
        self.created.append(payload)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:
            msg = "You already created this model repo"  # the Hub also returns the url with a 409
            return self._send(h, 409, {"error": msg, "url": f"{self.url}/{repo_id}"}, {"X-Error-Message": msg})
        self.repos[repo_id] = _Repo(private=payload.get("visibility") == "private" if "visibility" in payload else None)
        self._send(h, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _lfs_batch(self, h: BaseHTTPRequestHandler, payload: dict[str, Any]) -> None:
        if self._maybe_fail(h, "lfs"):
            return
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_objects:  # no "actions": already stored, the client skips it
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"},
                                    "verify": {"href": f"{self.url}/lfs-verify/{obj['oid']}"}}
            objects.append(entry)
        self._send(h, 200, {"transfer": "basic", "objects": objects})

    def _validate_yaml(self, h: BaseHTTPRequestHandler, payload: dict[str, Any]) -> None:
        if self._maybe_fail(h, "validate-yaml"):
            return
        text = payload.get("content", "")
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---", 2)[1])
            except yaml.YAMLError as e:
                return self._send(h, 400, {"errors": [{"message": f"Invalid YAML: {e}"}]})
            if meta is not None and not isinstance(meta, dict):
                return self._send(h, 400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
        self._send(h, 200, {"warnings": []})

    def _branch(self, h: BaseHTTPRequestHandler, repo: _Repo, branch: str, payload: dict[str, Any]) -> None:
        if self._maybe_fail(h, "branch"):
            return
        if branch in repo.refs:
            return self._error(h, 409, f"Reference already exists: refs/heads/{branch}")
        start = payload.get("startingPoint") or "main"
        repo.refs[branch] = dict(repo.refs[start])
        repo.heads[branch] = repo.heads[start]
        self._send(h, 200, {})

    def _preupload(self, h: BaseHTTPRequestHandler, repo: _Repo, rev: str, payload: dict[str, Any]) -> None:
        if self._maybe_fail(h, "preupload"):
            return
        current = repo.refs.get(rev, repo.refs["main"])
        files = []
        for f in payload["files"]:
            lfs = self.lfs_threshold is not None and f["size"] >= self.lfs_threshold
            old = current.get(f["path"])
            oid = None if old is None else hashlib.sha256(old).hexdigest() if lfs else git_blob_oid(old)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._send(h, 200, {"files": files, "commitOid": "0" * 40})

    def _commit(self, h: BaseHTTPRequestHandler, repo_id: str, repo: _Repo, rev: str, body: bytes) -> None:
        if self._maybe_fail(h, "commit"):
            return
        if rev not in repo.refs:
            return self._error(h, 404, f"Invalid rev id: {rev}")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        added, deleted = {}, []
        for item in lines:
            if item["key"] == "file":
                added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "lfsFile":
                oid = item["value"]["oid"]
                if oid not in self.lfs_objects:
                    return self._error(h, 422, f"LFS file {item['value']['path']} ({oid}) was never uploaded")
                added[item["value"]["path"]] = self.lfs_objects[oid]
                self.lfs_paths.add(item["value"]["path"])
            elif item["key"] == "deletedFile":
                deleted.append(item["value"]["path"])
            elif item["key"] != "header":
                return self._error(h, 400, f"stub: unsupported commit operation {item['key']!r}")
        state = repo.refs[rev]
        for p in deleted:
            state.pop(p, None)
        state.update(added)
        oid = hashlib.sha1(json.dumps([rev, header, sorted(added), len(self.commits)]).encode()).hexdigest()
        repo.heads[rev] = oid
        repo.snapshots[oid] = dict(state)
        self.commits.append({"repo_id": repo_id, "revision": rev, "summary": header.get("summary"),
                             "description": header.get("description"), "files": added, "deleted": deleted})
        self._send(h, 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
                            "pullRequestUrl": None})

    def _open_pr(self, h: BaseHTTPRequestHandler, repo_id: str, repo: _Repo, payload: dict[str, Any]) -> None:
        if self._maybe_fail(h, "discussions"):
            return
        num = len(repo.prs) + 1
        ref = f"refs/pr/{num}"
        repo.refs[ref] = dict(repo.refs["main"])
        repo.heads[ref] = repo.heads["main"]
        repo.prs.append({"num": num, "title": payload["title"], "description": payload.get("description")})
        self._send(h, 200, {"num": num, "url": f"{self.url}/{repo_id}/discussions/{num}", "pullRequest": True})

    def _pr_details(self, h: BaseHTTPRequestHandler, repo_id: str, repo: _Repo, num: int) -> None:
        pr = repo.prs[num - 1]
        self._send(h, 200, {
            "title": pr["title"], "num": num, "author": {"name": "stub-user"},
            "createdAt": "2026-01-01T00:00:00.000Z", "status": "draft",
            "repo": {"name": repo_id, "type": "model"}, "isPullRequest": True, "events": [],
            "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [], "diff": "",
        })
