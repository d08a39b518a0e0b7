"""What one federated ATM step costs on a real local Flower deployment, against the node's own compute.

Starts one ``flower-superlink --insecure`` and N ``flower-supernode`` processes on 127.0.0.1 (node i holds
the i-th task of the text suite), runs the Flower App of ``recipes/flower_app`` with ``flwr run`` (tiny
configuration: the app's defaults, ``rounds`` rounds, ``num-clients=N``), and prints per step kind (hello,
sync, train, eval) the wall time the server waited against the time the node spent in its handler and in its
own compute (training / evaluation, as the node reports it in its reply), and their ratio.

    python benchmarks/federated_step.py                       # 2 nodes, 2 rounds
    python benchmarks/federated_step.py --nodes 3 --rounds 1 --run-config "data-kwargs='{...}'"
    PYTHONPATH=/path/to/other/checkout python benchmarks/federated_step.py --app /path/to/other/checkout/recipes/flower_app

How it measures: the app is copied to a temporary folder whose ServerApp is this file's ``server_app``: the
federated ATM ServerApp (``hf_atm.federated.server.run_federated``) over a Grid wrapper that times every
step (push to last reply) and keeps each reply's ``atm_metrics`` (``compute-seconds``, ``handler-seconds``,
``startup-seconds``; older nodes report only ``train-seconds``). The ClientApp is the installed one
(``hf_atm.federated.client:app``), unchanged. The processes are started by the tests' harness,
``tests/flower_deployment.py`` (free ports on 127.0.0.1, from ``--port-base`` when given; a private
FLWR_HOME under the work folder; every process in its own process group, all killed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TIMINGS = "step_timings.json"
KINDS = ("hello", "sync", "train", "eval")


# ----------------------------------------------------------------------------------------------------------
# the ServerApp side (runs inside flwr-serverapp)
# ----------------------------------------------------------------------------------------------------------
def _kind(msg: Any) -> str:
    from flwr.app import MessageType

    mtype = msg.metadata.message_type
    if mtype == MessageType.TRAIN:
        return "train"
    if mtype == MessageType.EVALUATE:
        return "eval"
    conf = msg.content.config_records.get("atm_config") if msg.has_content() else None
    return str(conf["action"]) if conf is not None and "action" in conf else str(mtype)


def _reply_metrics(reply: Any) -> dict[str, float]:
    if not reply.has_content():
        return {}
    rec = reply.content.metric_records.get("atm_metrics")
    return {k: float(v) for k, v in rec.items() if isinstance(v, (int, float))} if rec is not None else {}


def _timing_grid(inner: Any) -> Any:
    """A Grid that records, per step (one ``send_and_receive`` or one push of messages), its kind, the wall
    time to each reply and the reply's metrics."""
    from flwr.serverapp import Grid

    class TimingGrid(Grid):
        def __init__(self) -> None:
            self.inner = inner
            self.steps: list[dict[str, Any]] = []
            self._pushed: dict[str, tuple[int, float]] = {}

        def set_run(self, run: Any) -> None:
            inner.set_run(run)

        @property
        def run(self) -> Any:
            return inner.run

        def create_message(self, *a: Any, **kw: Any) -> Any:
            return inner.create_message(*a, **kw)

        def get_node_ids(self) -> Iterable[int]:
            return inner.get_node_ids()

        def _step(self, msgs: list[Any]) -> dict[str, Any]:
            step = {"kind": _kind(msgs[0]) if msgs else "none", "messages": len(msgs), "t0": time.time(),
                    "replies": []}
            self.steps.append(step)
            return step

        def _record(self, step: dict[str, Any], reply: Any, t: float) -> None:
            step["replies"].append({"node": int(reply.metadata.src_node_id), "error": reply.has_error(),
                                    "seconds": t - step["t0"], "metrics": _reply_metrics(reply)})

        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
            msgs = list(messages)
            step = self._step(msgs)
            ids = list(inner.push_messages(msgs))
            for mid in ids:
                self._pushed[mid] = (len(self.steps) - 1, step["t0"])
            return ids

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
            out = list(inner.pull_messages(message_ids))
            now = time.time()
            for r in out:
                where = self._pushed.pop(str(r.metadata.reply_to_message_id), None)
                if where is not None:
                    self._record(self.steps[where[0]], r, now)
            return out

        def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
            msgs = list(messages)
            step = self._step(msgs)
            out = list(inner.send_and_receive(msgs, timeout=timeout))
            now = time.time()
            for r in out:
                self._record(step, r, now)
            return out

    return TimingGrid()


def _make_server_app() -> Any:
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        from hf_atm.federated.config import FederatedATMConfig
        from hf_atm.federated.server import run_federated

        cfg = FederatedATMConfig.from_run_config(context.run_config)
        timing = _timing_grid(grid)
        try:
            run_federated(timing, cfg)
        finally:  # what was measured is kept even when the run failed
            from hf_atm.files import atomic_write_json

            atomic_write_json(Path(cfg.output_dir) / TIMINGS, timing.steps)

    return app


if __name__ != "__main__":  # imported by flwr-serverapp as the app's ServerApp component
    server_app = _make_server_app()


# ----------------------------------------------------------------------------------------------------------
# the deployment (this process)
# ----------------------------------------------------------------------------------------------------------
def _harness() -> Any:
    """The tests' deployment harness, ``tests/flower_deployment.py`` (process groups, free ports, private
    FLWR_HOME, cleanup): one launcher for tests, drills and this benchmark. tests/ is no package, so its folder
    goes on sys.path; imported here, not at the top, because flwr-serverapp imports this file's copy (outside
    the repository) for ``server_app`` only."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import flower_deployment

    return flower_deployment


def make_deployment(work: Path, port_base: int | None = None) -> Any:
    """A ``FlowerDeployment`` under `work` (insecure, connection ``bench``; not entered: the caller's ``with``
    stops its processes), ports free ones of ``[port_base, port_base + 999]``. The caller's thread settings
    and ``HF_ATM_CACHE`` are kept (the harness pins 1 thread and a cache inside `work` for the tests)."""
    fd = _harness()
    keep = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if "HF_ATM_CACHE" in os.environ:
        keep["HF_ATM_CACHE"] = os.environ["HF_ATM_CACHE"]
    ports = fd.PORT_RANGE if port_base is None else (port_base, port_base + 999)
    dep = fd.FlowerDeployment(work, connection="bench", env=keep, port_range=ports)
    return dep


def launch(dep: Any, tasks: list[str], timeout: float = 120.0) -> None:
    """Start the SuperLink and one SuperNode per task (``supernode-<task>``, node i holds ``tasks[i]``); wait
    until all are online."""
    dep.start_superlink(timeout=timeout)
    for task in tasks:
        dep.start_supernode(f"supernode-{task}", task=task)
    dep.wait_nodes_online(len(tasks), timeout=timeout)


def _prepare_app(src: Path, dst: Path) -> None:
    text = (src / "pyproject.toml").read_text()
    text, n = re.subn(r'(?m)^serverapp\s*=\s*".*"$', 'serverapp = "federated_step:server_app"', text)
    if n != 1:
        raise RuntimeError(f"{src / 'pyproject.toml'}: no single `serverapp = ...` component line")
    dst.mkdir(parents=True)
    (dst / "pyproject.toml").write_text(text)
    shutil.copy(Path(__file__), dst / "federated_step.py")


def _stats(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(steps: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per step kind: steps, mean wall seconds (push to last reply), mean over steps of the slowest node's
    handler and compute seconds, overhead (wall - compute) and its ratio to compute."""
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = [s for s in steps if s["kind"] == kind and s["replies"]]
        if not mine:
            continue
        walls, handlers, computes, startups = [], [], [], []
        for s in mine:
            walls.append(max(r["seconds"] for r in s["replies"]))
            ok = [r["metrics"] for r in s["replies"] if not r["error"]]
            # train: the tuner's own seconds (every version of the node reports them); else the handler's
            comp = [m.get("train-seconds", m.get("compute-seconds")) for m in ok]
            comp = [c for c in comp if c is not None]
            if comp:
                computes.append(max(comp))
            hand = [m["handler-seconds"] for m in ok if "handler-seconds" in m]
            if hand:
                handlers.append(max(hand))
            start = [m["startup-seconds"] for m in ok if "startup-seconds" in m]
            if start:
                startups.append(max(start))
        wall, comp = _stats(walls), _stats(computes)
        over = wall - comp if comp is not None else None
        out[kind] = {"steps": len(mine), "nodes": max(len(s["replies"]) for s in mine), "wall": wall,
                     "startup": _stats(startups), "handler": _stats(handlers), "compute": comp, "overhead": over,
                     "ratio": over / comp if comp else None}
    return out


def _fmt(v: float | None) -> str:
    return f"{v:8.2f}" if v is not None else "     n/a"


def print_table(summary: dict[str, dict[str, Any]], header: str) -> None:
    print(header)
    print(f"{'step':<6} {'steps':>5} {'nodes':>5} {'wall s':>8} {'start s':>8} {'handler':>8} {'compute':>8} "
          f"{'overhead':>8} {'ovh/comp':>8}")
    for kind, s in summary.items():
        print(f"{kind:<6} {s['steps']:>5} {s['nodes']:>5} {_fmt(s['wall'])} {_fmt(s['startup'])} {_fmt(s['handler'])} "
              f"{_fmt(s['compute'])} {_fmt(s['overhead'])} {_fmt(s['ratio'])}")
    print("wall: push to last reply (server); start: node process start to handler; handler: time in the node's "
          "handler; compute: training / evaluation inside it (slowest node); overhead = wall - compute")
    train = summary.get("train")
    if train and train["ratio"] is not None:
        verdict = "meets" if train["ratio"] <= 2.0 else "misses"
        print(f"train step: overhead {train['overhead']:.2f} s = {train['ratio']:.2f}x its compute "
              f"({train['compute']:.2f} s); target <= 2x: {verdict}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2, help="SuperNodes (one task each, text suite order)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--app", default=str(REPO / "recipes" / "flower_app"), help="the Flower App folder to run")
    p.add_argument("--run-config", default="", help="extra `flwr run -c` overrides (keys of the app)")
    p.add_argument("--port-base", type=int, default=None,
                   help="choose the free ports (Fleet, Control, ServerAppIo, one ClientAppIo per node) from "
                        "base..base+999 (default: tests/flower_deployment.py's 17000-17999)")
    p.add_argument("--workdir", default=None, help="logs, outputs, FLWR_HOME (default: a fresh temporary folder)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds for the whole run")
    p.add_argument("--json", default=None, help="also write the summary and raw steps to this JSON file")
    a = p.parse_args(argv)
    from hf_atm.data import suite_tasks

    tasks = list(suite_tasks("text"))
    if not 1 <= a.nodes <= len(tasks):
        p.error(f"--nodes must be between 1 and {len(tasks)}")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="hf_atm_fedstep_")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    app = work / "app"
    if app.exists():
        shutil.rmtree(app)
    _prepare_app(Path(a.app), app)
    out = work / "output"
    dep = make_deployment(work, a.port_base)
    deployment_error = _harness().DeploymentError
    run: Any = None
    status = "unknown"
    with dep:  # leaving it kills every process group started (a SuperNode's ClientApps included)
        launch(dep, tasks[: a.nodes])
        overrides = (f"rounds={a.rounds} num-clients={a.nodes} min-clients=1 eval-test=false "
                     f"output-dir='{out}' {a.run_config}").strip()
        t0, load0 = time.time(), os.getloadavg()[0]
        try:
            run = dep.flwr("run", str(app), dep.connection, "--stream", "-c", overrides, timeout=a.timeout,
                           check=False)
        except deployment_error as e:  # the harness's timeout (the flwr process is killed)
            print(e)
        total, load1 = time.time() - t0, os.getloadavg()[0]
        if run is not None:
            (work / "flwr-run.log").write_text(run.stdout + run.stderr)
            # `flwr run --stream` exits 0 also when the ServerApp raised: Flower's run status says how it ended
            try:
                status = dep.flwr_json("list", dep.connection)["runs"][-1]["status"]
            except deployment_error as e:
                print(f"flwr list: {e}")
    timings = out / TIMINGS
    if run is None or not timings.is_file():
        if run is not None:
            print((run.stdout + run.stderr)[-4000:])
        why = f"timed out after {a.timeout} s" if run is None else f"failed (flwr run exit {run.returncode}, {status})"
        print(f"no complete {timings}: the run {why}; logs in {work}")
        return 1
    steps = json.loads(timings.read_text())
    summary = summarize(steps)
    print_table(summary, f"federated step cost: {a.nodes} nodes, {a.rounds} round(s), app {a.app}, "
                         f"hf_atm from {_hf_atm_origin(dep.env)}; flwr run {total:.1f} s (exit {run.returncode}, "
                         f"{status}); "
                         f"load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} CPUs; logs in {work}")
    if a.json:
        from hf_atm.files import atomic_write_json

        atomic_write_json(a.json, {"summary": summary, "steps": steps, "total_seconds": total})
    return 0 if run.returncode == 0 and status == "finished:completed" else 1


def _hf_atm_origin(env: dict[str, str]) -> str:
    res = subprocess.run([sys.executable, "-c", "import hf_atm, os; print(os.path.dirname(hf_atm.__file__))"],
                         env=env, capture_output=True, text=True, check=False)
    return res.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
