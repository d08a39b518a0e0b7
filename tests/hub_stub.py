"""A STUB of the Hugging Face Hub's write API for tests. It is not the Hub and implements only what
``huggingface_hub.HfApi`` (2.x) calls for ``create_repo``, ``create_branch`` and ``upload_folder`` of small
files, and ``create_pr``:

==========================================================  =============================================
``POST /api/repos/create``                                  create a model repo (409 when it exists)
``POST /api/validate-yaml``                                 README.md front matter must parse as a YAML mapping
``POST /api/models/{org}/{name}/branch/{branch}``           create a branch from ``main`` (409 if it exists)
``GET  /api/models/{org}/{name}/refs``                      list branches
``GET  /api/models/{org}/{name}/revision/{rev}``            repo info (``sha``, ``siblings``)
``POST /api/models/{org}/{name}/preupload/{rev}``           ``"regular"`` (inline base64) for every file, or
                                                            ``"lfs"`` from ``lfs_threshold`` bytes on; with the
                                                            oid of the file already on ``rev``
``POST /{org}/{name}.git/info/lfs/objects/batch``           Git LFS batch API (basic transfer): upload + verify
``PUT  /lfs-upload/{oid}``, ``POST /lfs-verify/{oid}``        receive / confirm an LFS object (sha256 checked)
``POST /api/models/{org}/{name}/commit/{rev}``              apply an ndjson commit (``file`` / ``lfsFile`` /
                                                            ``deletedFile``)
``POST /api/models/{org}/{name}/discussions``               open a pull request (``refs/pr/N``)
``GET  /api/models/{org}/{name}/discussions/{num}``         pull-request details
==========================================================  =============================================

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
Hub does.
"""

from __future__ import annotations

import base64
import hashlib
import json
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


class HubStub:
    """A threaded HTTP stub of the Hub's write API on 127.0.0.1 (see the module docstring). Not the Hub."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.commits: list[dict[str, Any]] = []
        self.created: list[dict[str, Any]] = []
        self.auth: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.fail: dict[str, tuple[int, str]] = {}
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
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

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

    def _error(self, h: BaseHTTPRequestHandler, status: int, message: str) -> None:
        # validate-yaml lists its problems under "errors"; other endpoints use "error" (as the Hub does).
        self._send(h, status, {"error": message, "errors": [{"message": message}]}, {"X-Error-Message": message})

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if h.headers.get("Authorization"):
            self.auth.add(h.headers["Authorization"])
        parts = [unquote(p) for p in urlsplit(h.path).path.strip("/").split("/")]
        self.requests.append((method, "/".join(parts)))
        with self._lock:
            try:
                self._route(h, method, parts, body)
            except Exception as e:  # a stub bug shows up as a 500 with its reason
                self._error(h, 500, f"stub error: {e!r}")

    def _maybe_fail(self, h: BaseHTTPRequestHandler, endpoint: str) -> bool:
        if endpoint in self.fail:
            status, message = self.fail[endpoint]
            self._error(h, status, message)
            return True
        return False

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
            if rev not in repo.refs:
                return self._error(h, 404, f"Revision Not Found: {rev}")
            return self._send(h, 200, {"id": repo_id, "sha": repo.heads[rev], "private": bool(repo.private),
                                       "siblings": [{"rfilename": p} for p in sorted(repo.refs[rev])]})
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
