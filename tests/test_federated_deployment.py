"""Federated ATM on a real Flower deployment: ``flower-superlink`` and ``flower-supernode`` as separate processes
on 127.0.0.1, driven with the ``flwr`` CLI (``tests/flower_deployment.py``).

In CI (10-30 s on 2 cores): the TLS files of ``scripts/make_certs.py`` (CA, SAN), and a TLS SuperLink with
SuperNode authentication that lets a registered node join and refuses a node with an unlisted key and one
without a key.

Opt-in (several minutes on 2 CPU cores: every Flower message starts a fresh ``flwr-clientapp`` process), with

    HF_ATM_DEPLOYMENT_TESTS=1 .venv/bin/python -m pytest -q tests/test_federated_deployment.py

a whole run of federated ATM over TLS with authenticated nodes (3 tasks of the tiny digits suite, tiny ViT):
a node SIGKILLed while it trains in round 1 is missing from that round, which ends within ``round-timeout``;
the ServerApp killed in round 2 and the run resubmitted with ``resume = true`` ends with the model and
``test_metrics.json`` written, and the unlisted node's claim never reaches the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flower_deployment import REPO, FlowerDeployment

pytestmark = pytest.mark.slow

DEPLOYMENT_TESTS = bool(os.environ.get("HF_ATM_DEPLOYMENT_TESTS"))
TASKS = ("digit", "high", "parity")
APP = REPO / "recipes" / "flower_app"


def test_make_certs_writes_a_ca_and_a_server_certificate_with_the_sans(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    out = subprocess.run([sys.executable, str(REPO / "scripts" / "make_certs.py"), str(tmp_path), "10.1.2.3",
                          "superlink.example.org", "--node-keys", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    server.verify_directly_issued_by(ca)  # raises unless the CA signed it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in ("ca.key", "server.key", "node-1"):
        assert (tmp_path / key).stat().st_mode & 0o077 == 0, f"{key} is readable by others"
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    pub = load_ssh_public_key((tmp_path / "node-1.pub").read_bytes())
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp384r1"  # what Flower accepts
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "make_certs.py"), str(tmp_path), "--days", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--days" in bad.stderr


def test_supernode_auth_admits_a_registered_node_and_refuses_others(tmp_path):
    """TLS SuperLink with ``--enable-supernode-auth``: the node whose public key was registered with
    ``flwr supernode register`` comes online under the id the registration gave; a node with an unlisted key
    and a node without a key are refused (their processes exit) and never appear in ``flwr supernode list``."""
    with FlowerDeployment(tmp_path / "dep", tls=True, auth=True) as dep:
        dep.start_superlink()
        key, pub = dep.node_key("listed")
        other_key, _ = dep.node_key("unlisted")
        node_id = dep.register(pub)
        listed = dep.start_supernode("listed", task="digit", private_key=key)
        unlisted = dep.start_supernode("unlisted", task="digit", private_key=other_key)
        keyless = dep.start_supernode("keyless", task="high")
        dep.wait_log("listed", f"SuperNode ID: {node_id}", timeout=90)
        for name, proc in (("unlisted", unlisted), ("keyless", keyless)):
            try:
                rc = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the {name} SuperNode was not refused within 90 s:\n{dep.tail(name)}")
            assert rc != 0, dep.tail(name)
        assert "No SuperNode found with the given public key" in dep.log("unlisted")
        assert "All SuperNodes must be registered via the CLI" in dep.log("keyless")
        # one CLI call (each costs seconds): the listed node is online, nothing else ever registered
        dep.wait_for(lambda: [(int(n["node-id"]), n["status"]) for n in dep.nodes()] == [(node_id, "online")], 60,
                     "the registered node online and alone in flwr supernode list", log="superlink", interval=1.0)
        assert listed.poll() is None
        spawned = [pid for name in ("superlink", "listed") for pid in dep.pids(name)]
        assert len(spawned) >= 4  # SuperLink and SuperNode, each with its SuperExec
    # leaving the block killed every process group it started (also what happens when a test fails)
    assert not [pid for pid in spawned if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped by its (re-)parent


def _run_config(model, out, **kw):
    return {"model": str(model), "data": "scripts.atm_data:digits_tasks", "pooling": "cls",
            "data-kwargs": json.dumps({"tasks": list(TASKS), "n_train": 32, "n_val": 16, "n_test": 16, "seed": 0}),
            "rounds": 2, "min-clients": 2, "num-clients": len(TASKS), "eval-test": True, "output-dir": str(out),
            "train": {"per-device-train-batch-size": 16, "learning-rate": 3e-3, "seed": 11}, **kw}


@pytest.mark.skipif(not DEPLOYMENT_TESTS, reason="set HF_ATM_DEPLOYMENT_TESTS=1 (a real deployment, several minutes)")
def test_real_deployment_survives_a_killed_node_and_a_killed_serverapp(tmp_path):
    from scripts.atm_data import tiny_vit

    model, out = tmp_path / "base", tmp_path / "out"
    tiny_vit(seed=0).save_pretrained(model)
    round_timeout = 90.0
    # the nodes import the data function from tests/ (kept in front of any PYTHONPATH the caller set)
    pythonpath = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    with FlowerDeployment(tmp_path / "dep", tls=True, auth=True, env={"PYTHONPATH": pythonpath}) as dep:
        dep.start_superlink()
        ids = {}
        for task in TASKS:
            key, pub = dep.node_key(task)
            ids[task] = dep.register(pub)
            dep.start_supernode(task, task=task, private_key=key)
        intruder_key, _ = dep.node_key("intruder")
        intruder = dep.start_supernode("intruder", task="digit", private_key=intruder_key)
        dep.wait_nodes_online(len(TASKS), timeout=120)
        run1 = dep.submit(APP, _run_config(model, out, **{"round-timeout": round_timeout, "startup-timeout": 120.0}))

        # SIGKILL the node of 'parity' while it trains in round 1 (its ClientApp process is running)
        start = dep.wait_log("parity", "ROUND 1]", timeout=600)
        dep.wait_log("parity", "Receiving: train message", timeout=120, start=start)
        dep.wait_for(lambda: dep.pids("parity", "flwr-clientapp"), 60, "the train ClientApp of 'parity'", log="parity",
                     interval=0.1)
        dep.kill("parity")
        killed_at = time.monotonic()
        # round 1 ends without it, within its round timeout (plus the merge and evaluation of the others)
        dep.wait_for(lambda: (out / "checkpoint-round-1").is_dir(), round_timeout + 240,
                     "checkpoint-round-1 after the node kill", log="superlink")
        assert time.monotonic() - killed_at < round_timeout + 240

        # kill the ServerApp in round 2, then resubmit with resume = true
        assert dep.kill_matching("superlink", "flwr-serverapp"), "no flwr-serverapp process under the SuperLink"
        first = dep.wait_run(run1, timeout=120)
        assert first["status"] != "finished:completed"
        assert not (out / "test_metrics.json").exists()
        run2 = dep.submit(APP, _run_config(model, out, resume=True,
                                           **{"round-timeout": round_timeout, "startup-timeout": 20.0}))
        second = dep.wait_run(run2, timeout=900)
        assert second["status"] == "finished:completed", dep.run_log(run2)[-4000:]
        assert intruder.poll() not in (None, 0)  # refused at the door

    history = json.loads((out / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2]
    assert history[1]["missing_train"] == ["parity"] and history[1]["merged_tasks"] == ["digit", "high"]
    assert {t: int(n) for t, n in history[0]["clients"].items()} == ids  # only registered nodes hold tasks
    for f in ("model.safetensors", "config.json", "test_metrics.json"):
        assert (out / f).is_file(), f
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert {"eval_digit_accuracy", "eval_high_accuracy"} <= set(metrics)  # the live nodes' test accuracy
