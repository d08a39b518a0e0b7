"""A real Flower deployment on 127.0.0.1 for the tests and the fault drills: one ``flower-superlink`` and N
``flower-supernode`` processes, driven through the ``flwr`` CLI as an operator would.

    with FlowerDeployment(tmp_path / "dep", tls=True, auth=True) as dep:
        dep.start_superlink()
        key, pub = dep.node_key("node-1")
        dep.register(pub)
        dep.start_supernode("node-1", task="digit", private_key=key)
        run_id = dep.submit("recipes/flower_app", {"rounds": 1, ...})
        dep.wait_run(run_id, timeout=300)

Every process runs in its own process group (``start_new_session``) so that killing a SuperLink or SuperNode
also kills what it spawned (SuperExec, ``flwr-serverapp``, ``flwr-clientapp``); leaving the ``with`` block
kills every group it started, also when a test fails. Ports are free ones of 17000-17999 (``port_range``); every API binds
to 127.0.0.1, the node-local ones (ServerAppIo, ClientAppIo) included. The CLI gets a private ``FLWR_HOME``
with one ``[superlink.<name>]`` connection. Every wait has a timeout and fails with the last log lines.

TLS files and SuperNode keys come from ``scripts/make_certs.py`` (run as the documented command).
Linux only (process groups are found through /proc).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PORT_RANGE = (17000, 17999)
#: Flower's run status once a run ended (``flwr list`` shows ``finished:<sub-status>``)
FINISHED = "finished"

__all__ = ["BIN", "REPO", "DeploymentError", "FlowerDeployment", "free_ports"]


class DeploymentError(RuntimeError):
    """A deployment step failed or timed out (the message carries the relevant log tail)."""


def free_ports(n: int, lo: int = PORT_RANGE[0], hi: int = PORT_RANGE[1], exclude: set[int] | None = None) -> list[int]:
    """`n` distinct ports of ``[lo, hi]`` (none of `exclude`) that nobody listens on now (bound and released on
    127.0.0.1)."""
    candidates = [p for p in range(lo, hi + 1) if p not in (exclude or set())]
    random.shuffle(candidates)
    out: list[int] = []
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        out.append(port)
        if len(out) == n:
            return out
    raise DeploymentError(f"no {n} free ports in {lo}-{hi}")


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _group_members(pgid: int) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the live processes of process group `pgid` (read from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            # fields after the parenthesised command: state ppid pgrp ...
            state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
            if int(pgrp) != pgid or state == "Z":
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
        out.append((int(entry), cmd.strip()))
    return out


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(f"terminated by signal {signum}")


class FlowerDeployment:
    """SuperLink + SuperNodes as real processes on 127.0.0.1 under `root` (logs, FLWR_HOME, certificates).

    Args:
        root: working folder (created): ``home/`` (FLWR_HOME), ``certs/``, ``<name>.log`` per process.
        tls: serve the Fleet and Control APIs over TLS with certificates of ``scripts/make_certs.py``.
        auth: ``--enable-supernode-auth`` (needs `tls`; Flower refuses it on an insecure SuperLink).
        database: ``--database`` of the SuperLink (a path; None: state in memory).
        connection: name of the ``[superlink.<name>]`` connection written for the CLI.
        env: extra environment of every process (e.g. PYTHONPATH for a ``module:function`` data source); a
            value None removes that variable (e.g. the thread limits below, for a benchmark that keeps the
            caller's).
        port_range: ``(lo, hi)`` the free ports are chosen from (default 17000-17999).
    """

    def __init__(self, root: str | Path, *, tls: bool = False, auth: bool = False, database: str | Path | None = None,
                 connection: str = "atm", env: Mapping[str, str | None] | None = None,
                 port_range: tuple[int, int] = PORT_RANGE) -> None:
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (flower-superlink refuses it with --insecure)")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self.root / "home"
        self.home.mkdir(exist_ok=True)
        self.certs = self.root / "certs"
        self.tls, self.auth, self.connection = tls, auth, connection
        self.database = None if database is None else Path(database)
        self.port_range = port_range
        self.fleet_port, self.control_port, self.serverappio_port = free_ports(3, *port_range)
        # ports handed out (a process may not have bound its port yet when the next one is chosen)
        self._ports = {self.fleet_port, self.control_port, self.serverappio_port}
        self.procs: dict[str, subprocess.Popen] = {}  # the latest process of each name
        self._spawned: list[subprocess.Popen] = []  # every process ever started (restarts too), for stop()
        env_all: dict[str, str | None] = {**os.environ, "FLWR_HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONUNBUFFERED": "1",
                    # the nodes' prepared-data cache (hf_atm.federated.data) stays inside this deployment
                    "HF_ATM_CACHE": str(self.root / "cache"), **(env or {})}
        self.env = {k: v for k, v in env_all.items() if v is not None}
        if tls:
            self._run([sys.executable, str(REPO / "scripts" / "make_certs.py"), str(self.certs), "127.0.0.1",
                       "localhost"], timeout=60)
        self._write_connection()

    # ------------------------------------------------------------------------------------------ setup
    def _write_connection(self) -> None:
        conn: dict[str, Any] = {"address": f"127.0.0.1:{self.control_port}"}
        if self.tls:
            conn["root-certificates"] = str((self.certs / "ca.crt").resolve())  # flwr wants an absolute path
        else:
            conn["insecure"] = True
        (self.home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": self.connection,
                                                                            self.connection: conn}}))

    def node_key(self, name: str) -> tuple[Path, Path]:
        """A SuperNode authentication key pair ``(private, public)`` under ``certs/`` (scripts/make_certs.py)."""
        sys.path.insert(0, str(REPO / "scripts"))
        try:
            from make_certs import make_node_key
        finally:
            sys.path.pop(0)
        return make_node_key(self.certs, name)

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def log(self, name: str) -> str:
        """Everything process `name` wrote so far (stdout and stderr)."""
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def tail(self, name: str, lines: int = 40) -> str:
        return "\n".join(self.log(name).splitlines()[-lines:])

    def _spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen:
        if name in self.procs and self.procs[name].poll() is None:
            raise DeploymentError(f"process {name!r} is already running")
        with self.log_path(name).open("ab") as log:
            log.write(f"\n$ {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(list(argv), cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        self._spawned.append(proc)
        return proc

    def _run(self, argv: Sequence[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        try:
            res = subprocess.run(list(argv), cwd=self.root, env=self.env, capture_output=True, text=True,
                                 timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise DeploymentError(f"{' '.join(argv)} did not finish within {timeout} s") from e
        if check and res.returncode != 0:
            raise DeploymentError(f"{' '.join(argv)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        return ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                "--ssl-keyfile", str(self.certs / "server.key")]

    # ------------------------------------------------------------------------------------------ processes
    def start_superlink(self, timeout: float = 60.0) -> subprocess.Popen:
        """Start ``flower-superlink`` (every API on 127.0.0.1) and wait until its Control and Fleet APIs accept
        connections."""
        argv = [str(BIN / "flower-superlink"), *self._tls_args(),
                "--fleet-api-address", f"127.0.0.1:{self.fleet_port}",
                "--control-api-address", f"127.0.0.1:{self.control_port}",
                "--serverappio-api-address", f"127.0.0.1:{self.serverappio_port}",
                "--disable-runtime-dependency-installation"]
        if self.auth:
            argv.append("--enable-supernode-auth")
        if self.database is not None:
            argv += ["--database", str(self.database)]
        proc = self._spawn("superlink", argv)
        self.wait_for(lambda: _port_open(self.control_port) and _port_open(self.fleet_port), timeout,
                      "the SuperLink's Control and Fleet APIs", log="superlink", proc=proc)
        return proc

    def start_supernode(self, name: str, task: str | None = None, private_key: str | Path | None = None,
                        node_config: str | None = None, extra: Sequence[str] = ()) -> subprocess.Popen:
        """Start ``flower-supernode`` `name` holding `task` (``--node-config "task='<task>'"``), its ClientAppIo
        API on a free 127.0.0.1 port; returns at once (see :meth:`wait_nodes_online`)."""
        (clientappio,) = free_ports(1, *self.port_range, exclude=self._ports)
        self._ports.add(clientappio)
        config = node_config if node_config is not None else f"task='{task}'"
        argv = [str(BIN / "flower-supernode"), *(["--root-certificates", str(self.certs / "ca.crt")] if self.tls
                                                 else ["--insecure"]),
                "--superlink", f"127.0.0.1:{self.fleet_port}", "--node-config", config,
                "--clientappio-api-address", f"127.0.0.1:{clientappio}", *extra]
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(private_key)]
        return self._spawn(name, argv)

    def alive(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

    def pids(self, name: str, pattern: str = "") -> list[int]:
        """Live pids of process `name`'s group whose command line contains `pattern` (e.g. ``flwr-serverapp``
        under the SuperLink, ``flwr-clientapp`` under a SuperNode)."""
        proc = self.procs.get(name)
        if proc is None:
            return []
        return [pid for pid, cmd in _group_members(proc.pid) if pattern in cmd]

    def orphans(self, pattern: str = "") -> list[int]:
        """Live pids (matching `pattern`) of the groups of processes that ended or were replaced, e.g. the
        ``flwr-serverapp`` left behind when only the SuperLink process died."""
        current = {p.pid for p in self.procs.values() if p.poll() is None}
        return [pid for p in self._spawned if p.pid not in current
                for pid, cmd in _group_members(p.pid) if pattern in cmd]

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 30.0, group: bool = True) -> None:
        """Send `sig` to process `name`'s whole group (`group` False: to its main process only, as when that
        one process crashes) and wait for its main process to end."""
        proc = self.procs.get(name)
        if proc is None:
            raise DeploymentError(f"no process {name!r}")
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise DeploymentError(f"{name} did not end within {timeout} s after signal {sig}") from e

    def kill_matching(self, name: str, pattern: str, sig: int = signal.SIGKILL) -> list[int]:
        """Kill the processes of `name`'s group whose command line contains `pattern` (e.g. the ServerApp:
        ``kill_matching("superlink", "flwr-serverapp")``); returns their pids."""
        pids = self.pids(name, pattern)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def stop(self) -> None:
        """Kill every process group this deployment started (SIGTERM, then SIGKILL after 5 s)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self._spawned:
                if _group_members(proc.pid) or proc.poll() is None:
                    try:
                        os.killpg(proc.pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and any(_group_members(p.pid) for p in self._spawned):
                time.sleep(0.2)
        for proc in self._spawned:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> FlowerDeployment:
        # a SIGTERM to this process (a CI timeout, `kill <pytest>`) would end it without running __exit__:
        # turn it into an exception while the block runs, so the process groups are still killed
        self._old_sigterm = None
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)

    # ------------------------------------------------------------------------------------------ waiting
    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str, log: str | None = None,
                 proc: subprocess.Popen | None = None, interval: float = 0.5) -> Any:
        """Poll `predicate` until it returns a true value (returned); DeploymentError after `timeout` seconds
        or when `proc` ended first (with the tail of `log`)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if proc is not None and proc.poll() is not None:
                raise DeploymentError(f"{what}: the process ended with {proc.returncode}\n{self.tail(log or '')}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out after {timeout} s waiting for {what}\n"
                                      + (self.tail(log) if log else ""))
            time.sleep(interval)

    def wait_log(self, name: str, text: str, timeout: float, start: int = 0) -> int:
        """Wait until `name`'s log holds `text` after character `start`; returns the position after it."""
        def found() -> int:
            i = self.log(name).find(text, start)
            return i + len(text) if i >= 0 else 0
        return self.wait_for(found, timeout, f"{text!r} in the log of {name}", log=name)

    # ------------------------------------------------------------------------------------------ flwr CLI
    def flwr(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``flwr <args>`` with this deployment's FLWR_HOME (and the SuperLink connection as default)."""
        return self._run([str(BIN / "flwr"), *args], timeout=timeout, check=check)

    def flwr_json(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        """``flwr <args> --format json``, parsed; DeploymentError when Flower reports no success."""
        res = self.flwr(*args, "--format", "json", timeout=timeout, check=False)
        start = res.stdout.find("{")
        try:
            out = json.loads(res.stdout[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            out = {}
        if not out.get("success"):
            raise DeploymentError(f"flwr {' '.join(args)} (exit {res.returncode}): "
                                  f"{out.get('error-message') or res.stdout + res.stderr}")
        return out

    def register(self, public_key: str | Path) -> int:
        """``flwr supernode register <public key>``: the node id the SuperLink gives that key."""
        return int(self.flwr_json("supernode", "register", str(public_key), self.connection)["node-id"])

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list``: one dict per node (``node-id``, ``status``: registered / online / offline)."""
        return self.flwr_json("supernode", "list", self.connection)["nodes"]

    def wait_nodes_online(self, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Wait until `n` nodes are online; returns them."""
        def online() -> list[dict[str, Any]]:
            nodes = [x for x in self.nodes() if x["status"] == "online"]
            return nodes if len(nodes) >= n else []
        return self.wait_for(online, timeout, f"{n} SuperNode(s) online", log="superlink", interval=1.0)

    def wait_node_status(self, node_id: int, status: str, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until node `node_id` has `status` in ``flwr supernode list`` (e.g. ``offline``: the SuperLink
        noticed a killed node, after about two 30 s heartbeat intervals; only then does it let a node with the
        same key activate again)."""
        def has() -> dict[str, Any] | None:
            return next((x for x in self.nodes() if int(x["node-id"]) == int(node_id) and x["status"] == status),
                        None)
        return self.wait_for(has, timeout, f"node {node_id} {status}", log="superlink", interval=2.0)

    def write_run_config(self, config: Mapping[str, Any], name: str = "run_config.toml") -> Path:
        """A TOML file of run-config overrides (nested tables for dotted keys: ``{"train": {"seed": 0}}``)."""
        path = self.root / name
        path.write_text(tomli_w.dumps(dict(config)))
        return path

    def submit(self, app: str | Path, config: Mapping[str, Any] | None = None, timeout: float = 120.0) -> int:
        """``flwr run <app> <connection> -c <config>.toml``: the run id."""
        args = [str(app), self.connection]
        if config:
            args += ["-c", str(self.write_run_config(config))]
        return int(self.flwr_json("run", *args, timeout=timeout)["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        """``flwr list --run-id <id>``: the run's row (``status`` e.g. ``running``, ``finished:completed``,
        ``finished:failed``, ``finished:stopped``; ``status-details``)."""
        return self.flwr_json("list", "--run-id", str(run_id), self.connection)["runs"][0]

    def wait_run(self, run_id: int, timeout: float, interval: float = 2.0) -> dict[str, Any]:
        """Wait until run `run_id` finished (any sub-status); returns its ``flwr list`` row."""
        def finished() -> dict[str, Any] | None:
            row = self.run_info(run_id)
            return row if row["status"].startswith(FINISHED) else None
        return self.wait_for(finished, timeout, f"run {run_id} to finish", log="superlink", interval=interval)

    def stop_run(self, run_id: int) -> None:
        self.flwr("stop", str(run_id), self.connection, timeout=60)

    def run_log(self, run_id: int, timeout: float = 60.0) -> str:
        """``flwr log <id> --show``: the ServerApp's log of the run as the SuperLink keeps it."""
        return self.flwr("log", str(run_id), self.connection, "--show", timeout=timeout, check=False).stdout
