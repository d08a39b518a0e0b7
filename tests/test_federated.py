"""Federated ATM on Flower: aggregation, compression, config and checkpoints on plain tensors; then the
ServerApp and ClientApp on a tiny ViT with three clients (digits tasks): Flower's simulation engine against
the in-process ATMTrainer (bit-identical), a client failing in round 2, resume after a killed server,
SecAgg+ with a dropout, compressed traffic.

Intra-op threads are pinned to 1 in this module: Flower's Ray actors run with one thread, and float32 sums
in a different thread split differ in the last bits (which Adam then amplifies)."""

import json
import math
import os

import pytest
import torch
from federated_faults import TrainFault
from flwr.app import MessageType
from scripts.atm_data import TASK_LABELS, digits_tasks, tiny_vit

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel
from hf_atm.atm.collector import merge_round
from hf_atm.atm.distributed import round_spec
from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.federated import FederatedATMConfig
from hf_atm.federated.aggregation import round_merge_spec
from hf_atm.federated.checkpoints import latest_checkpoint, list_checkpoints, save_checkpoint
from hf_atm.federated.client import make_client_app
from hf_atm.federated.compression import (
    Compression,
    ErrorFeedback,
    decode_delta,
    encode_delta,
    record_nbytes,
    roundtrip,
)
from hf_atm.federated.protocol import REC_BACKBONE
from hf_atm.federated.secagg import secagg_client_transform, secagg_delta
from hf_atm.federated.server import run_federated
from hf_atm.federated.simulation import LocalGrid, run_flower_simulation
from hf_atm.merging.spec import MergeSpec, merge_deltas

TASKS = ("digit", "high", "parity")  # sorted: partition-id i holds TASKS[i]
DATA_KW = {"tasks": list(TASKS), "n_train": 48, "n_val": 24, "n_test": 24, "seed": 0}
TRAIN = {"per_device_train_batch_size": 16, "learning_rate": 3e-3, "seed": 11}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _taus(n=3, seed=0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w": (6, 5), "b": (5,)}
    return [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(n)]


# ------------------------------------------------------------------------------------------------------
# aggregation on plain tensors
# ------------------------------------------------------------------------------------------------------
def test_round_spec_mean_is_fedavg_and_matches_atm():
    tasks = ["a", "b", "c"]
    base = ATMConfig(output_dir="/tmp/unused", report_to="none", merge_method="task_arithmetic").merge_spec(3)
    taus = _taus()
    # all arrived, uniform: exactly ATMTrainer's spec of the round (scale 1/n, per-round seed)
    spec = round_merge_spec(base, tasks, tasks, 4)
    assert spec == round_spec(base, 4)
    delta, gram = merge_round(spec, dict(zip(tasks, taus)), {"w": (6, 5), "b": (5,)}, compute_cosine=True)
    for k in ("w", "b"):
        torch.testing.assert_close(delta[k], (taus[0][k] + taus[1][k] + taus[2][k]) / 3)
    assert gram.shape == (3, 3) and gram[0, 0] > 0
    # a missing task: the mean of those that arrived (FedAvg with equal weights)
    spec2 = round_merge_spec(base, tasks, ["a", "c"], 4)
    d2, _ = merge_round(spec2, {"a": taus[0], "c": taus[2]}, {"w": (6, 5), "b": (5,)})
    torch.testing.assert_close(d2["w"], (taus[0]["w"] + taus[2]["w"]) / 2)
    # example-count weights: FedAvg's n_i / sum n over the arrived ones
    spec3 = round_merge_spec(base, tasks, ["a", "b"], 1, weighting="examples", num_examples={"a": 10, "b": 30, "c": 5})
    d3, _ = merge_round(spec3, {"a": taus[0], "b": taus[1]}, {"w": (6, 5)})
    torch.testing.assert_close(d3["w"], 0.25 * taus[0]["w"] + 0.75 * taus[1]["w"])
    # explicit per-task weights are restricted to the arrived tasks
    wbase = MergeSpec("task_arithmetic", weights=(1.0, 2.0, 3.0), scale=1 / 3)
    spec4 = round_merge_spec(wbase, tasks, ["b", "c"], 1)
    assert spec4.weights == (2.0, 3.0) and spec4.scale == pytest.approx(0.5)
    with pytest.raises(MergeConfigError):
        round_merge_spec(base, tasks, [], 1)


@pytest.mark.parametrize("method", ["ties", "tsv", "dare_ties", "iso_c", "breadcrumbs"])
def test_any_merge_method_goes_through_merge_deltas(method):
    base = MergeSpec(method=method)
    taus = _taus(seed=1)
    del taus[1]["b"]  # a vector without a tensor counts as zeros there (LoRA rounds)
    spec = round_merge_spec(base, ["x", "y", "z"], ["x", "y", "z"], 2)
    delta, _ = merge_round(spec, dict(zip("xyz", taus)), {"w": (6, 5), "b": (5,), "unused": (2,)})
    assert set(delta) == {"w", "b"}
    torch.testing.assert_close(delta["w"], merge_deltas(spec, [t["w"] for t in taus], "w"))
    torch.testing.assert_close(delta["b"], merge_deltas(spec, [taus[0]["b"], torch.zeros(5), taus[2]["b"]], "b"))


@pytest.mark.parametrize(
    ("method", "weighting", "weights"),
    [("task_arithmetic", "uniform", None), ("task_arithmetic", "examples", None),
     ("task_arithmetic", "uniform", (0.5, 2.0, 1.0)), ("average", "uniform", (1.0, 3.0, 2.0)),
     ("dare_linear", "uniform", None), ("breadcrumbs", "uniform", None)],
)
def test_secagg_sum_recovers_the_merge(method, weighting, weights):
    """What the server gets from SecAgg+ (the mean of the nodes' masked terms) gives the same delta as
    merging the individual task vectors."""
    tasks, arrived = ["a", "b", "c"], ["a", "c"]
    counts = {"a": 40, "b": 10, "c": 20}
    base = MergeSpec(method, weights=weights, scale=1.0)
    taus = dict(zip(tasks, _taus(seed=2)))
    spec = round_merge_spec(base, tasks, arrived, 3, weighting=weighting, num_examples=counts)
    expected, _ = merge_round(spec, {t: taus[t] for t in arrived}, {"w": (6, 5), "b": (5,)})

    def raw(t):
        return float(counts[t]) if weighting == "examples" else (weights[tasks.index(t)] if weights else 1.0)

    wmax = max(abs(raw(t)) for t in tasks)
    coeffs = [raw(t) / wmax for t in arrived]
    terms = [secagg_client_transform(round_spec(base, 3), taus[t], tasks.index(t), 3, c) for t, c in zip(arrived, coeffs)]
    if method == "dare_linear":  # masks are seeded by the index among all tasks: compare with that merge
        expected = {k: spec.scale * sum(term[k] / c * (spec.weights[i] if spec.weights else 1.0)
                                        for i, (term, c) in enumerate(zip(terms, coeffs))) for k in ("w", "b")}
    mean = {k: sum(term[k] for term in terms) / len(terms) for k in ("w", "b")}
    got = secagg_delta(mean, spec, len(arrived), coeffs)
    for k in ("w", "b"):
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# compression and byte accounting
# ------------------------------------------------------------------------------------------------------
def test_compression_roundtrip_bytes_and_error_feedback():
    from flwr.app import RecordDict

    g = torch.Generator().manual_seed(3)
    delta = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g),
             "d": torch.randn(7, dtype=torch.float64, generator=g)}
    sizes = {}
    for spec in ["none", "bf16", "topk:0.1", "dare:0.5", "topk:0.1:bf16"]:
        comp = Compression.parse(spec)
        rec = encode_delta(delta, comp, seed=5)
        sizes[spec] = record_nbytes(RecordDict({"x": rec}))
        out = decode_delta(rec, comp, {k: v.shape for k, v in delta.items()}, 5, {k: v.dtype for k, v in delta.items()})
        assert out["d"].dtype == torch.float64 and out["w"].dtype == torch.float32
        if spec == "none":
            assert all(torch.equal(out[k], delta[k]) for k in delta)
        elif spec == "bf16":
            assert torch.equal(out["w"], delta["w"].bfloat16().float())
        elif spec == "topk:0.1":
            k = math.ceil(0.1 * delta["w"].numel())
            kept = out["w"] != 0
            assert int(kept.sum()) == k
            assert delta["w"].abs()[kept].min() >= delta["w"].abs()[~kept].max()  # the largest entries
            torch.testing.assert_close(out["w"][kept], delta["w"][kept])
        elif spec == "dare:0.5":
            kept = out["w"] != 0
            torch.testing.assert_close(out["w"][kept], delta["w"][kept] / 0.5)  # rescaled survivors
            assert 0.35 < kept.float().mean() < 0.65
            assert torch.equal(roundtrip(delta, comp, 5)["w"], out["w"])  # mask rebuilt from the seed
            assert not torch.equal(roundtrip(delta, comp, 6)["w"], out["w"])
    assert sizes["bf16"] < 0.6 * sizes["none"]
    assert sizes["topk:0.1:bf16"] < sizes["topk:0.1"] < 0.3 * sizes["none"]
    assert sizes["dare:0.5"] < 0.6 * sizes["none"]
    # error feedback: what the server received plus the residual is exactly what the node meant to send
    comp = Compression.parse("topk:0.1")
    ef = ErrorFeedback()
    wanted = ef.compensate(delta)
    sent = roundtrip(wanted, comp)
    ef.update(wanted, sent)
    for k in delta:
        torch.testing.assert_close(sent[k] + ef.residual[k], wanted[k])
    nxt = ef.compensate(delta)
    torch.testing.assert_close(nxt["w"], delta["w"] + ef.residual["w"])


def test_compression_bad_input():
    for bad in ["zip", "topk:2", "topk:0", "bf16:0.5", "topk:x", "none:bf16"]:
        with pytest.raises(MergeConfigError):
            Compression.parse(bad)
    comp = Compression.parse("topk:0.5")
    rec = encode_delta({"w": torch.ones(4)}, comp)
    with pytest.raises(CheckpointError, match="'w'"):
        decode_delta(rec, comp, {"w": (2,)})  # indices beyond the receiver's shape
    with pytest.raises(CheckpointError, match="does not have"):
        decode_delta(rec, comp, {"v": (4,)})
    with pytest.raises(CheckpointError, match="floating"):
        encode_delta({"i": torch.ones(3, dtype=torch.long)}, comp)


# ------------------------------------------------------------------------------------------------------
# config and checkpoints
# ------------------------------------------------------------------------------------------------------
def test_config_from_run_config_and_bad_options():
    cfg = FederatedATMConfig.from_run_config({
        "model": "m", "data": "suite:text", "rounds": 4, "min-clients": 2, "uplink": "topk:0.05:bf16",
        "data-kwargs": '{"max_train_per_task": 200}', "tasks": "b,a", "train.learning-rate": 1e-4,
        "train.merge-method": "ties", "num-clients": 0,
    })
    assert cfg.rounds == 4 and cfg.min_clients == 2 and cfg.tasks == ["b", "a"] and cfg.num_clients is None
    assert cfg.data_kwargs == {"max_train_per_task": 200}
    assert cfg.train_args == {"learning_rate": 1e-4, "merge_method": "ties"}
    assert cfg.uplink_compression == Compression("topk", 0.05, "bfloat16")
    assert cfg.atm_args().merge_method == "ties"
    with pytest.raises(ValueError, match="unknown run config key"):
        FederatedATMConfig.from_run_config({"model": "m", "roundz": 3})
    with pytest.raises(MergeConfigError, match="SecAgg"):
        FederatedATMConfig(model="m", secure_aggregation=True, train_args={"merge_method": "ties"})
    with pytest.raises(MergeConfigError, match="uplink"):
        FederatedATMConfig(model="m", secure_aggregation=True, uplink="bf16")
    with pytest.raises(ValueError, match="min_clients"):
        FederatedATMConfig(model="m", min_clients=0)
    with pytest.raises(ValueError, match="weighting"):
        FederatedATMConfig(model="m", weighting="size")


def test_checkpoints_are_atomic_and_rotated(tmp_path):
    model = MultiTaskModel.from_backbone(tiny_vit(seed=0), {"parity": TASK_LABELS["parity"]})
    (tmp_path / ".tmp-checkpoint-round-9").mkdir()  # a half-written one (killed server) is ignored
    for k in (1, 2, 3):
        save_checkpoint(tmp_path, k, model, {"round": k}, save_total_limit=2)
    assert [k for k, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert latest_checkpoint(tmp_path).name == "checkpoint-round-3"
    assert json.loads((latest_checkpoint(tmp_path) / "federated_state.json").read_text())["round"] == 3


# ------------------------------------------------------------------------------------------------------
# the apps, three clients
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fed") / "base"
    tiny_vit(seed=0).save_pretrained(d)
    return d


def fed_config(base_dir, out, **kw):
    return FederatedATMConfig(model=str(base_dir), data="scripts.atm_data:digits_tasks", data_kwargs=DATA_KW,
                              tasks=list(TASKS), train_args=dict(TRAIN, **kw.pop("train", {})), output_dir=str(out),
                              **{"rounds": 2, **kw})


@pytest.fixture(scope="module")
def in_process(base_dir, tmp_path_factory):
    """PA-ATM in one process (ATMTrainer), 2 rounds, same seeds / tasks / settings."""
    model = MultiTaskModel.from_backbone(str(base_dir), {t: TASK_LABELS[t] for t in TASKS}, seed=0)
    args = ATMConfig(output_dir=str(tmp_path_factory.mktemp("inproc")), rounds=2, report_to="none",
                     disable_tqdm=True, save_strategy="no", **TRAIN)
    tr = ATMTrainer(model=model, args=args, task_datasets=digits_tasks(**DATA_KW))
    tr.train()
    return tr


def run_grid(cfg, grid_cls=LocalGrid, faults=()):
    grid = grid_cls(make_client_app(cfg, mods=list(faults)), [{"partition-id": i} for i in range(len(TASKS))])
    return run_federated(grid, cfg), grid


def assert_same_backbone(a, b, atol=0.0):
    ta, tb = a.backbone_tensors(), b.backbone_tensors()
    assert set(ta) == set(tb)
    worst = max(float((ta[n].detach() - tb[n].detach()).abs().max()) for n in ta)
    assert worst <= atol, f"max |difference| {worst} > {atol}"


def test_flower_simulation_engine_equals_in_process_atm(base_dir, in_process, tmp_path):
    """Flower's simulation engine (Ray, virtual SuperNodes, in-memory SuperLink) with three clients gives
    bit for bit the backbone, heads and accuracies of the in-process PA-ATM."""
    cfg = fed_config(base_dir, tmp_path / "sim")
    history = run_flower_simulation(cfg, backend_config={"init_args": {"num_cpus": 1}})
    fed = MultiTaskModel.from_pretrained(tmp_path / "sim")
    assert_same_backbone(fed, in_process.model, atol=0.0)
    for k, v in in_process.model.heads_state_dict().items():
        assert torch.equal(fed.heads_state_dict()[k], v), k
    assert [h["accuracy"] for h in history] == [h["accuracy"] for h in in_process.history]
    assert [h["missing_train"] for h in history] == [[], [], []]
    assert history[1]["mean_cosine"] == pytest.approx(in_process.history[1]["mean_cosine"])
    for h in history[1:]:
        for t in TASKS:  # traffic both ways for every client
            assert h["bytes"][t]["down"] > 0 and h["bytes"][t]["up"] > 0
    for f in ("history.json", "accuracy.png", "cosine.png", "README.md", "model.safetensors", "config.json",
              "federated_config.json"):
        assert (tmp_path / "sim" / f).is_file(), f


def test_client_failure_does_not_stop_the_run(base_dir, tmp_path):
    """The node of 'parity' raises in round 2: the round merges the two vectors that arrived, history says
    who was missing and why, the node is evaluated again and trains in round 3."""
    cfg = fed_config(base_dir, tmp_path / "fault", rounds=3, min_clients=2)
    strategy, _ = run_grid(cfg, faults=[TrainFault("parity", round=2)])
    h = strategy.history
    assert [e["round"] for e in h] == [0, 1, 2, 3]
    assert h[2]["missing_train"] == ["parity"] and h[2]["merged_tasks"] == ["digit", "high"]
    assert "injected fault" in h[2]["errors"]["parity"] and not h[2]["skipped"]
    assert h[1]["missing_train"] == [] and h[3]["missing_train"] == []
    assert all(e["missing_eval"] == [] for e in h)
    assert h[2]["bytes"]["parity"]["up"] < h[1]["bytes"]["parity"]["up"]  # no task vector from it
    assert math.isnan(h[2]["cosine"][2][2]) and h[2]["cosine"][0][0] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "fault" / "history.json").read_text())
    assert saved[2]["missing_train"] == ["parity"]


def test_too_few_clients_skip_the_round(base_dir, tmp_path):
    cfg = fed_config(base_dir, tmp_path / "skip", rounds=1, min_clients=3)
    strategy, _ = run_grid(cfg, faults=[TrainFault("parity", round=1)])
    entry = strategy.history[1]
    assert entry["skipped"] and entry["missing_train"] == ["parity"]
    start = MultiTaskModel.from_backbone(str(base_dir), {t: TASK_LABELS[t] for t in TASKS})
    assert_same_backbone(strategy.model, start)  # backbone unchanged


def test_killed_server_resumes_from_its_last_checkpoint(base_dir, in_process, tmp_path):
    """A server stopped after round 1 (what a kill leaves: checkpoint-round-1) and restarted with fresh nodes
    ends with the very backbone of an uninterrupted run."""
    out = tmp_path / "resume"
    run_grid(fed_config(base_dir, out, rounds=1))
    (out / ".tmp-checkpoint-round-2").mkdir()  # an interrupted write of round 2
    strategy, _ = run_grid(fed_config(base_dir, out, rounds=2, resume=True))
    assert [h["round"] for h in strategy.history] == [0, 1, 2]
    assert_same_backbone(strategy.model, in_process.model, atol=0.0)
    assert [h["accuracy"] for h in strategy.history] == [h["accuracy"] for h in in_process.history]
    with pytest.raises(CheckpointError, match="different"):
        run_grid(fed_config(base_dir, out, rounds=3, resume=True, train={"merge_method": "ties"}))


class RecordingGrid(LocalGrid):
    """LocalGrid that keeps the train replies the server receives (through the public ``pull_messages``)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.train_replies = []

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.train_replies += [r.content for r in replies
                               if r.has_content() and r.metadata.message_type == MessageType.TRAIN]
        return replies


def test_secure_aggregation_with_a_dropout(base_dir, in_process, tmp_path):
    """SecAgg+ (Flower's secaggplus_mod and SecAggPlusWorkflow): the server receives only masked vectors,
    round 1 equals the plain merge up to the quantization step, and a node failing in round 2 is dropped
    from the sum without stopping the run."""
    cfg = fed_config(base_dir, tmp_path / "secagg", secure_aggregation=True)
    strategy, grid = run_grid(cfg, RecordingGrid, faults=[TrainFault("parity", round=2)])
    h = strategy.history
    assert h[1]["merged_tasks"] == list(TASKS) and h[1]["cosine"] is None
    assert h[2]["missing_train"] == ["parity"] and h[2]["merged_tasks"] == ["digit", "high"]
    assert all(e["secure_aggregation"] for e in h)
    # no reply carried tensors in the clear: SecAgg+ empties the arrays, masked ints travel as bytes
    assert grid.train_replies
    for content in grid.train_replies:
        assert all(len(rec) == 0 for rec in content.array_records.values())
    # round 1: the in-process round-1 model within SecAgg+'s quantization (|error of the mean| <= 2 clip / range)
    one = ATMTrainer(model=MultiTaskModel.from_backbone(str(base_dir), {t: TASK_LABELS[t] for t in TASKS}, seed=0),
                     args=ATMConfig(output_dir=str(tmp_path / "one"), rounds=1, report_to="none", disable_tqdm=True,
                                    save_strategy="no", **TRAIN), task_datasets=digits_tasks(**DATA_KW))
    one.train()
    r1 = MultiTaskModel.from_pretrained(tmp_path / "secagg" / "checkpoint-round-1")
    step = 2 * cfg.secagg_clip / cfg.secagg_quantization_range
    assert_same_backbone(r1, one.model, atol=step + 1e-7)
    assert sum(h[1]["secagg_clipped"].values()) == 0


def test_compressed_traffic_keeps_nodes_in_sync(base_dir, tmp_path):
    """top-k uplink with error feedback and bfloat16 downlink: less traffic than plain float32, and every node
    holds exactly the server's backbone (the server applies the decoded delta it sent)."""
    from hf_atm.federated.compression import record_to_tensors

    plain, _ = run_grid(fed_config(base_dir, tmp_path / "plain", rounds=1))
    cfg = fed_config(base_dir, tmp_path / "comp", rounds=2, uplink="topk:0.1", downlink="bf16", error_feedback=True,
                     weighting="examples")
    strategy, grid = run_grid(cfg)
    up_plain = plain.history[1]["bytes_total"]["up"]
    down_plain = plain.history[1]["bytes_total"]["down"]
    assert strategy.history[1]["bytes_total"]["up"] < 0.5 * up_plain
    assert strategy.history[1]["bytes_total"]["down"] < 0.7 * down_plain
    assert strategy.history[2]["uplink"]["kind"] == "topk"
    server = strategy.model.backbone_tensors()
    for ctx in grid.contexts.values():
        node = record_to_tensors(ctx.state.array_records[REC_BACKBONE])
        assert all(torch.equal(node[n], server[n].detach()) for n in server)


def test_a_node_past_the_timeout_is_missing(base_dir, tmp_path):
    """A node that hangs past round_timeout in the train step is missing from that round's merge; its late
    reply is dropped and it trains again in the next round."""
    cfg = fed_config(base_dir, tmp_path / "hang", rounds=2, round_timeout=5.0)
    strategy, _ = run_grid(cfg, faults=[TrainFault("high", round=1, mode="hang", seconds=6.0)])
    h = strategy.history
    assert h[1]["missing_train"] == ["high"] and h[1]["merged_tasks"] == ["digit", "parity"]
    assert h[2]["missing_train"] == [] and h[2]["missing_eval"] == []


def test_error_reasons_are_one_line():
    from hf_atm.federated.protocol import short_reason

    ray = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m\n"
           "  File x\nException ClientAppException occurred. Message: injected fault: task 'a' (round 2)'>")
    assert short_reason(ray) == "injected fault: task 'a' (round 2)"
    assert short_reason('Error(code=2, reason="RuntimeError: boom")') == "RuntimeError: boom"


@pytest.mark.skipif(not os.environ.get("HF_ATM_SLOW_TESTS"), reason="set HF_ATM_SLOW_TESTS=1 (a second Ray run, ~30 s)")
def test_flower_simulation_engine_secure_aggregation_with_a_dropout(base_dir, tmp_path):
    cfg = fed_config(base_dir, tmp_path / "simsec", secure_aggregation=True)
    history = run_flower_simulation(cfg, backend_config={"init_args": {"num_cpus": 1}},
                                    client_mods=[TrainFault("parity", round=2)])
    assert history[1]["merged_tasks"] == list(TASKS)
    assert history[2]["missing_train"] == ["parity"] and "injected fault" in history[2]["errors"]["secagg"]
