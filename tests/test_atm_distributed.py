"""ATM across processes: tasks split round-robin (task_parallel) or every task's batches split over ranks
(data_parallel), task vectors exchanged (all-reduce / all_gather) with bounded memory, heads broadcast, and
the result equal to a single-process run."""

import importlib
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from hf_atm.atm.distributed import (
    DeltaCollector,
    TaskExchange,
    TaskVectorView,
    accumulate_dtype,
    check_sharding_supported,
    local_exchange,
    merge_round,
    owner_of,
    resolve_merge_device,
    warn_if_unused_gpus,
)
from hf_atm.atm.evaluation import accumulate_gram, pairwise_cosine
from hf_atm.atm.sharding import check_weights_fit
from hf_atm.errors import CheckpointError
from hf_atm.merging.registry import METHODS
from hf_atm.merging.spec import MergeSpec, merge_deltas, needs_all_task_vectors


def _taus(n, names, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=gen) for k, s in names.items()} for _ in range(n)]


def _collector(tasks, spec, names, cosine, **kw):
    return DeltaCollector(TaskExchange(tasks), spec, list(names), names, {n: torch.float32 for n in names},
                          compute_cosine=cosine, **kw)


def test_round_robin_ownership_single_process():
    ex = TaskExchange(["a", "b", "c"])
    assert ex.world_size == 1 and ex.my_tasks() == ["a", "b", "c"]
    assert [owner_of(j, 2) for j in range(5)] == [0, 1, 0, 1, 0]
    dp = TaskExchange(["a", "b", "c"], "data_parallel")
    assert dp.my_tasks() == dp.my_eval_tasks() == ["a", "b", "c"] and dp.merge_is_local
    batch = {"x": torch.ones(4, 2), "task": "a"}
    assert dp.shard_batch(batch) is batch and dp.global_batch_size(8) == 8
    with pytest.raises(ValueError, match="parallel_mode"):
        TaskExchange(["a"], "model_parallel")


@pytest.mark.parametrize("method,kw", [("task_arithmetic", {"scale": 0.5}), ("dare_linear", {"density": 0.5}),
                                       ("breadcrumbs", {}), ("average", {"weights": (1.0, 2.0, 3.0)})])
def test_collector_sum_mode_equals_merge_deltas(method, kw):
    """Sum-decomposable methods merge through one accumulator whether cosines are recorded or not; the
    Gram then equals the Gram of the vectors computed all at once."""
    names = {"w": torch.Size([6, 5]), "b": torch.Size([7])}
    taus = _taus(3, names)
    spec = MergeSpec(method=method, **kw)
    out = {}
    for cosine in (False, True):
        col = _collector(["t0", "t1", "t2"], spec, names, cosine)
        assert col.mode == "sum"
        for i, t in enumerate(["t0", "t1", "t2"]):
            col.add(t, taus[i])
        out[cosine], gram = col.finish()
        assert (gram is None) != cosine
    expected_gram = torch.zeros(3, 3, dtype=torch.float64)
    for n in sorted(names):
        accumulate_gram(expected_gram, [tv[n] for tv in taus])
    assert torch.equal(gram, expected_gram)
    for n in names:
        expected = merge_deltas(spec, [tv[n] for tv in taus], n)
        # float64 accumulation, one rounding to float32 at the end: within one float32 ulp of merge_deltas
        assert torch.allclose(out[False][n], expected, atol=1e-6)
        assert torch.equal(out[True][n], out[False][n])


def test_float32_accumulation_is_merge_deltas_bit_for_bit():
    names = {"w": torch.Size([6, 5])}
    taus = _taus(3, names, seed=1)
    spec = MergeSpec(method="task_arithmetic", scale=0.3)
    delta, _ = merge_round(spec, {f"t{i}": taus[i] for i in range(3)}, names, accumulate="float32")
    assert delta["w"].dtype == torch.float32
    assert torch.equal(delta["w"], merge_deltas(spec, [tv["w"] for tv in taus], "w"))


@pytest.mark.parametrize("cosine", [True, False])
def test_sum_mode_holds_one_accumulator_whatever_the_number_of_tasks(cosine, tmp_path):
    """Bounded memory: with 2, 4 or 8 tasks a sum-mode round holds exactly one (float64, CPU) accumulator per
    tensor; with cosines each vector goes once to a spill file (deleted at finish) and the Gram is exact."""
    names = {"w": torch.Size([64, 33]), "b": torch.Size([33])}
    fp32_bytes = sum(s.numel() * 4 for s in names.values())
    for n in (2, 4, 8):
        tasks = [f"t{i}" for i in range(n)]
        taus = _taus(n, names, seed=n)
        col = _collector(tasks, MergeSpec(method="task_arithmetic"), names, cosine, spill_dir=tmp_path)
        for t, tau in zip(tasks, taus):
            col.add(t, tau)
            assert col.held_bytes() == 2 * fp32_bytes  # one float64 accumulator, whatever n
        assert col.peak_bytes == 2 * fp32_bytes
        assert col.spilled_bytes == (n * fp32_bytes if cosine else 0)
        delta, gram = col.finish()
        assert list(tmp_path.iterdir()) == []  # spill files removed
        assert torch.allclose(delta["w"], sum(tv["w"] for tv in taus), atol=1e-5)
        if cosine:
            expected = pairwise_cosine(taus)
            got = (gram / gram.diagonal().sqrt()[:, None] / gram.diagonal().sqrt()[None, :]).tolist()
            assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-6)


def test_spilled_gram_streams_chunks(monkeypatch):
    """A tensor larger than the chunk budget is read back in chunks: the same Gram up to float64 sums."""
    import hf_atm.atm.collector as collector_module

    names = {"w": torch.Size([50, 8])}
    taus = _taus(3, names, seed=3)
    full = merge_round(MergeSpec(method="task_arithmetic"), {f"t{i}": taus[i] for i in range(3)}, names,
                       compute_cosine=True)[1]
    monkeypatch.setattr(collector_module, "_GRAM_CHUNK_ELEMENTS", 3 * 56)  # 56 of the 400 values per chunk
    chunked = merge_round(MergeSpec(method="task_arithmetic"), {f"t{i}": taus[i] for i in range(3)}, names,
                          compute_cosine=True)[1]
    assert torch.allclose(full, chunked, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_gather_only_for_methods_that_need_every_vector(method):
    spec = MergeSpec(method=method)
    try:
        col = _collector(["a", "b"], spec, {"w": torch.Size([3])}, True)
    except Exception:  # a method ATM cannot merge from task vectors alone (slerp...)
        pytest.skip(f"{method} needs the base tensor")
    assert col.mode == ("gather" if needs_all_task_vectors(method) else "sum")


def test_gather_mode_keeps_copies_on_the_merge_device_and_merges_exactly():
    names = {"w": torch.Size([6, 5]), "b": torch.Size([7])}
    taus = _taus(3, names, seed=5)
    spec = MergeSpec(method="ties", density=0.5, scale=0.7)
    col = _collector(["t0", "t1", "t2"], spec, names, True, merge_device="cpu")
    for i in range(3):
        col.add(f"t{i}", taus[i])
    fp32_bytes = sum(s.numel() * 4 for s in names.values())
    assert col.held_bytes() == 3 * fp32_bytes  # the vectors themselves: copies, not the caller's tensors
    expected = {n: merge_deltas(spec, [tv[n] for tv in taus], n) for n in names}
    taus[0]["w"].fill_(float("nan"))  # the caller may reuse its buffers after add()
    delta, gram = col.finish()
    for n in names:
        assert torch.equal(delta[n], expected[n])
    assert gram.shape == (3, 3) and col.held_bytes() == 0


def test_accumulate_dtype_choice_no_float64_on_an_accelerator():
    assert accumulate_dtype("auto", "cpu") == torch.float64
    assert accumulate_dtype("auto", "cuda:0") == torch.float32
    assert accumulate_dtype("auto", "mps") == torch.float32
    assert accumulate_dtype("float64", "cuda") == torch.float64
    assert accumulate_dtype("float32", "cpu") == torch.float32
    assert accumulate_dtype("auto", "cuda", torch.float64) == torch.float64  # float64 tensors stay float64
    with pytest.raises(ValueError, match="merge_accumulate_dtype"):
        accumulate_dtype("bfloat16", "cpu")
    assert resolve_merge_device("cpu", "cuda:1") == torch.device("cpu")
    assert resolve_merge_device("auto", "cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="merge_device"):
        resolve_merge_device("gpu", "cpu")
    # the accumulator the collector allocates for tensors off the CPU ("meta" stands in for an accelerator)
    names = {"w": torch.Size([4])}
    for setting, dtype in (("auto", torch.float32), ("float64", torch.float64)):
        col = _collector(["a"], MergeSpec(method="task_arithmetic"), names, False, accumulate=setting)
        col.add("a", {"w": torch.empty(4, device="meta")})
        assert col.held_bytes() == 4 * dtype.itemsize  # one accumulator of 4 values in `dtype`
        col.close()


def test_lora_round_exchanges_only_the_touched_tensors():
    names = {"q.weight": torch.Size([4, 4]), "k.weight": torch.Size([4, 4]), "ln.weight": torch.Size([4])}
    taus = [{"q.weight": t["q.weight"]} for t in _taus(2, names)]
    for spec in (MergeSpec(method="task_arithmetic"), MergeSpec(method="ties", density=0.5)):
        col = _collector(["a", "b"], spec, names, True)
        col.add("a", taus[0])
        col.add("b", taus[1])
        delta, gram = col.finish()
        assert list(delta) == col.exchanged_names == ["q.weight"]
        assert gram[0, 0] > 0


def test_task_vector_view_equals_the_difference():
    tensors = {"w": torch.randn(5, 3), "b": torch.randn(3, dtype=torch.float64), "h": torch.randn(4).bfloat16()}
    theta = {k: (v + 0.25).to(v.dtype) for k, v in tensors.items()}
    view = TaskVectorView(tensors, theta)
    for k, v in tensors.items():
        expected = v.to(torch.float64 if v.dtype == torch.float64 else torch.float32, copy=True).sub_(theta[k])
        assert torch.equal(view[k], expected) and view[k].dtype == expected.dtype
    spec = MergeSpec(method="task_arithmetic", scale=0.5)
    shapes = {k: v.shape for k, v in tensors.items()}
    dtypes = {k: v.dtype for k, v in tensors.items()}
    a = DeltaCollector(local_exchange(["t"]), spec, list(shapes), shapes, dtypes, True)
    a.add("t", view)
    b = DeltaCollector(local_exchange(["t"]), spec, list(shapes), shapes, dtypes, True)
    b.add("t", {k: view[k].clone() for k in tensors})
    (da, ga), (db, gb) = a.finish(), b.finish()
    assert all(torch.equal(da[k], db[k]) for k in tensors) and torch.equal(ga, gb)


def test_merge_round_matches_the_collector_and_skips_absent_names():
    names = {"w": torch.Size([6, 5]), "b": torch.Size([7]), "none": torch.Size([2])}
    taus = {f"t{i}": {k: v for k, v in tv.items() if k != "none"} for i, tv in enumerate(_taus(3, names, 9))}
    spec = MergeSpec(method="dare_linear", density=0.5, seed=2)
    delta, gram = merge_round(spec, taus, names, compute_cosine=True)
    assert set(delta) == {"w", "b"}
    col = _collector(sorted(taus), spec, names, True)
    for t in sorted(taus):
        col.add(t, taus[t])
    d2, g2 = col.finish()
    assert all(torch.equal(delta[k], d2[k]) for k in delta) and torch.equal(gram, g2)


def test_single_process_with_several_gpus_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.warns(UserWarning, match=r"uses only cuda:0 although 4 GPUs.*accelerate launch"):
        warn_if_unused_gpus(local_exchange(["a"]), "cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_unused_gpus(local_exchange(["a"]), "cuda:0")
        warn_if_unused_gpus(local_exchange(["a"]), "cpu")


def test_sharding_setups_atm_cannot_run_are_refused_naming_the_option():
    check_sharding_supported(fsdp=False, deepspeed=False, parallel_mode="task_parallel")
    check_sharding_supported(fsdp=True, deepspeed=False, parallel_mode="data_parallel")  # FSDP2 in data_parallel
    with pytest.raises(ValueError, match="FSDP needs atm_parallel_mode='data_parallel'.*'task_parallel'"):
        check_sharding_supported(fsdp=True, deepspeed=False, parallel_mode="task_parallel")
    with pytest.raises(ValueError, match="DeepSpeed.*ZeRO partitions"):
        check_sharding_supported(fsdp=False, deepspeed=True, parallel_mode="data_parallel")
    with pytest.raises(TypeError):  # the mode is required: forgetting it must not allow FSDP silently
        check_sharding_supported(fsdp=True, deepspeed=False)


def test_a_checkpoint_that_does_not_fit_the_sharded_backbone_names_its_folder(tmp_path):
    shapes = {"w": torch.Size([4, 2]), "b": torch.Size([4])}
    check_weights_fit(tmp_path, {"w": torch.zeros(4, 2), "b": torch.zeros(4), "extra": torch.zeros(1)}, shapes)
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: backbone weights do not fit.*missing \['b'\]"):
        check_weights_fit(tmp_path, {"w": torch.zeros(4, 2)}, shapes)
    with pytest.raises(CheckpointError, match=r"w: \(3, 2\) != \(4, 2\)"):
        check_weights_fit(tmp_path, {"w": torch.zeros(3, 2), "b": torch.zeros(4)}, shapes)


def _script(module: str):
    """``tests/scripts/<module>.py``, imported without keeping the one intra-op thread it sets when imported
    (the rest of the pytest session keeps its thread count)."""
    threads = torch.get_num_threads()
    try:
        return importlib.import_module(f"scripts.{module}")
    finally:
        torch.set_num_threads(threads)


def _single(module: str, fn: str, *args) -> None:
    """Run `module`'s `fn` here with one intra-op thread, like each launched process (restored afterwards)."""
    run = getattr(_script(module), fn)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(*args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def launched(gloo_launch):
    """The suite's one ``accelerate launch`` of 2 gloo processes (``gloo_launch`` in conftest.py): the
    task-parallel runs, the data-parallel run (8 rows per device), the collector checks and the FSDP runs
    (``multi/fsdp``), all written into one folder."""
    return gloo_launch


@pytest.mark.usefixtures("no_plots")  # the single-process reference: weights, not plots
def test_two_processes_match_single_process(tmp_path, launched):
    single, multi = tmp_path / "single", launched

    single.mkdir()
    _single("atm_dist_run", "main", single)
    # both ranks really ran, each on its own tasks (sorted: digit, high, parity -> rank 0: digit, parity)
    ranks = {p.name: json.loads(p.read_text()) for p in multi.glob("rank-*.json")}
    assert set(ranks) == {"rank-0.json", "rank-1.json"}
    assert ranks["rank-0.json"]["ties_gather"] == ["digit", "parity"]
    assert ranks["rank-1.json"]["ties_gather"] == ["high"]
    assert json.loads((single / "rank-0.json").read_text())["ties_gather"] == ["digit", "high", "parity"]
    for name in ("ta_allreduce", "ties_gather"):
        meta_1 = json.loads((single / f"{name}.json").read_text())
        meta_2 = json.loads((multi / f"{name}.json").read_text())
        assert (meta_1["world_size"], meta_2["world_size"]) == (1, 2)
        a, b = load_file(str(single / f"{name}.safetensors")), load_file(str(multi / f"{name}.safetensors"))
        assert set(a) == set(b)
        # Stated tolerance: bit-identical (gather merges the same vectors in the same order; the all-reduce
        # sums float32 terms in float64). atol 0 on purpose.
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        assert diff == 0.0, f"{name}: max difference {diff}"
        assert meta_1["accuracy"] == meta_2["accuracy"]
        assert meta_1["cosine"] == meta_2["cosine"]


# Stated tolerance of data_parallel: the mean of the two ranks' half-batch mean gradients equals the
# global-batch mean gradient up to the summation order. The run is in float64 (tests/scripts/atm_dist_run.py):
# measured 1.3e-13 after 2 rounds x 3 tasks x 2 Adam steps at lr 1e-2; the same run in float32 differs by
# ~6e-5 (Adam's first steps are ~lr * sign(g), so a last-bit difference of a near-zero gradient moves a weight
# by up to 2 lr), which is reduction order, not semantics.
DATA_PARALLEL_ATOL = 1e-10


@pytest.mark.usefixtures("no_plots")  # the single-process reference: weights, not plots
def test_data_parallel_two_processes_match_one_process_with_the_same_global_batch(tmp_path, launched):
    single, multi = tmp_path / "single", launched  # launched: two processes, 8 rows each

    single.mkdir()
    _single("atm_dist_run", "main_data_parallel", single, 16)  # one process, 16 rows per batch: the same global batch
    ranks = {p.name: json.loads(p.read_text()) for p in multi.glob("dp-rank-*.json")}
    assert ranks["dp-rank-0.json"]["tuned"] == ranks["dp-rank-1.json"]["tuned"] == ["digit", "high", "parity"]
    assert ranks["dp-rank-0.json"]["evaluated"] == ["digit", "parity"]
    assert ranks["dp-rank-1.json"]["evaluated"] == ["high"]
    meta_1 = json.loads((single / "data_parallel.json").read_text())
    meta_2 = json.loads((multi / "data_parallel.json").read_text())
    assert (meta_1["world_size"], meta_2["world_size"]) == (1, 2)
    assert meta_1["steps"] == meta_2["steps"] == 2 * 3 * 2  # rounds x tasks x (32 rows / 16 per global batch)
    a = load_file(str(single / "data_parallel.safetensors"))
    b = load_file(str(multi / "data_parallel.safetensors"))
    assert set(a) == set(b)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= DATA_PARALLEL_ATOL, f"max difference {diff}"
    assert meta_1["accuracy"] == meta_2["accuracy"]
    assert torch.allclose(torch.tensor(meta_1["cosine"]), torch.tensor(meta_2["cosine"]), atol=1e-9)


def test_collector_and_data_parallel_helpers_on_two_gloo_processes(launched):
    """Two real gloo processes: the task-parallel merge equals one process (bit for bit: float64 sums, same
    gathered vectors), only the touched tensors are exchanged (one all-reduce per touched tensor in sum
    mode), the Gram spans both processes' tasks; data-parallel sharding, gradient mean and stats."""
    script = _script("atm_dist_run")
    COLLECTOR_SHAPES, COLLECTOR_SPECS, collector_taus = (  # noqa: N806
        script.COLLECTOR_SHAPES, script.COLLECTOR_SPECS, script.collector_taus)

    tmp_path = launched
    taus = collector_taus()
    infos = [json.loads((tmp_path / f"collector-{r}.json").read_text()) for r in range(2)]
    results = [load_file(str(tmp_path / f"collector-{r}.safetensors")) for r in range(2)]
    for key, spec in COLLECTOR_SPECS.items():
        delta, gram = merge_round(spec, taus, COLLECTOR_SHAPES, compute_cosine=True)
        assert infos[0][key]["mine"] == ["t0", "t2"] and infos[1][key]["mine"] == ["t1"]
        for r in range(2):
            assert infos[r][key]["exchanged"] == ["a", "b"]
            assert torch.equal(results[r][f"{key}/gram"], gram)
            for n in ("a", "b"):
                assert torch.equal(results[r][f"{key}/{n}"], delta[n]), (key, n, r)
            assert f"{key}/untouched" not in results[r]
            calls = infos[r][key]["calls"]
            if needs_all_task_vectors(spec.method):  # one all_gather per touched tensor (merge and Gram)
                assert calls == {"all_reduce_sum": 0, "all_gather_chunks": 2}
            else:  # one all-reduce per touched tensor; the Gram gathers the spilled vectors chunk by chunk
                assert calls == {"all_reduce_sum": 2, "all_gather_chunks": 2}
    # data_parallel merge: local, the Gram's elements split between the ranks (half the spill each)
    delta, gram = merge_round(COLLECTOR_SPECS["task_arithmetic"], taus, COLLECTOR_SHAPES, compute_cosine=True)
    for r in range(2):
        assert infos[r]["dp_merge"]["calls"] == {"all_reduce_sum": 1, "all_gather_chunks": 0}
        assert infos[r]["dp_merge"]["spilled"] < 3 * 37 * 4  # less than every task's full a and b
        assert all(torch.equal(results[r][f"dp/{n}"], delta[n]) for n in ("a", "b"))
        assert torch.allclose(results[r]["dp/gram"], gram, rtol=1e-6)
    dp = [info["data_parallel"] for info in infos]
    assert dp[0]["my_tasks"] == dp[1]["my_tasks"] == ["t0", "t1", "t2"]
    assert dp[0]["my_eval_tasks"] == ["t0", "t2"] and dp[1]["my_eval_tasks"] == ["t1"]
    assert dp[0]["global_batch"] == 8
    assert dp[0]["shard_labels"] == [0, 1, 2] and dp[1]["shard_labels"] == [3, 4]  # contiguous shares
    assert dp[0]["small_batch_labels"] == dp[1]["small_batch_labels"] == [0]  # fewer rows than ranks: whole
    for r in range(2):
        assert all(v == 1.5 for g in dp[r]["grads"] for v in g)  # mean of 1 and 2
        # 1-byte buckets: weight (1, 2 -> 1.5) and bias (2, 4 -> 3) each averaged on its own
        assert [set(g) for g in dp[r]["small_bucket_grads"]] == [{1.5}, {3.0}]
        assert dp[r]["buffers_not_broadcast"] == [r + 1.0, r + 1.0]  # ddp_broadcast_buffers=False
        assert dp[r]["buffers_broadcast"] == [1.0, 1.0]  # rank 0's
        assert dp[r]["stats"] == [2.0, 0.5]  # per-task stats averaged in data_parallel
        assert dp[r]["merged_dicts"] == {"task0": {"f1": 0.0}, "task1": {"f1": 1.0}}  # every rank gets all


def test_merge_dicts_on_one_process_is_a_copy():
    ex = TaskExchange(["a", "b"])
    local = {"a": {"f1": 0.5}}
    merged = ex.merge_dicts(local)
    assert merged == local and merged is not local


# Stated tolerance of FSDP data_parallel against one unsharded process with the same global batch: as for
# data_parallel above, the difference is the summation order of the gradient (FSDP's reduce-scatter of two
# half-batch means, the clipping norm summed over shards), in float64. Measured max |difference| over every
# weight: 1.9e-14 (mean, 2 rounds), 3.2e-14 (TIES, 1 round, 2 micro-batches per step), 9.7e-14 (DARE, 1 round,
# gradient checkpointing, FSDP from accelerate's environment variables).
FSDP_ATOL = 1e-10


@pytest.fixture(scope="module")
def fsdp_single(tmp_path_factory):
    """The FSDP runs' reference: one process, no FSDP, 16 rows per batch (the two ranks' 8 + 8)."""

    single = tmp_path_factory.mktemp("fsdp-single")
    with pytest.MonkeyPatch.context() as mp:  # as the no_plots fixture: the tests compare weights, not plots
        mp.setattr("hf_atm.atm.trainer.plot_history", lambda history, folder: [])
        _single("atm_fsdp_run", "run", single, 16, False)
    return single


def test_fsdp_data_parallel_two_processes_match_one_unsharded_process(launched, fsdp_single):
    """FSDP2 (CPU, gloo, one unit per ViT layer) with the default element-wise mean, TIES (whole tensors gathered
    per tensor to merge; gradient accumulation) and DARE (gathered to draw its per-tensor masks; gradient
    checkpointing; FSDP from accelerate's FSDP environment variables): the weights after training, the cosines
    and every round's accuracies equal one unsharded process within FSDP_ATOL; the best round (PA,
    load_best_model_at_end) is the same, round checkpoints were written."""
    RUNS = _script("atm_fsdp_run").RUNS  # noqa: N806

    multi = launched / "fsdp"
    for r in range(2):  # each rank held half of the rows of a sharded weight
        rows = json.loads((multi / f"fsdp-rank-{r}.json").read_text())["local_rows"]
        assert rows["local"] == rows["full"] // 2, rows
    for name in RUNS:
        meta_1 = json.loads((fsdp_single / f"{name}.json").read_text())
        meta_2 = json.loads((multi / f"{name}.json").read_text())
        assert (meta_1["world_size"], meta_2["world_size"]) == (1, 2)
        assert (meta_1["sharded"], meta_2["sharded"]) == (False, True)
        assert meta_1["steps"] == meta_2["steps"]
        assert meta_1["best_round"] == meta_2["best_round"]
        assert meta_1["checkpoints"] == meta_2["checkpoints"]
        a = load_file(str(fsdp_single / f"{name}.safetensors"))
        b = load_file(str(multi / f"{name}.safetensors"))
        assert set(a) == set(b)
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        assert diff <= FSDP_ATOL, f"{name}: max difference {diff}"
        assert meta_1["accuracy"] == meta_2["accuracy"], name
        assert torch.allclose(torch.tensor(meta_1["cosine"]), torch.tensor(meta_2["cosine"]), atol=1e-9), name
    assert json.loads((multi / "fsdp_mean.json").read_text())["checkpoints"] == ["checkpoint-round-1",
                                                                                 "checkpoint-round-2"]


def test_fsdp_saved_model_is_whole_and_equals_the_in_memory_result(launched):
    """save_model and the round checkpoints of a sharded run gather the full weights: the folder loads with
    MultiTaskModel.from_pretrained (the format of an unsharded run) and equals the trained model, bit for bit."""
    from hf_atm.atm import MultiTaskModel

    multi = launched / "fsdp"
    trained = load_file(str(multi / "fsdp_mean.safetensors"))
    saved = MultiTaskModel.from_pretrained(str(multi / "fsdp_mean" / "model")).state_dict()
    assert set(saved) == set(trained)
    assert all(torch.equal(saved[k], trained[k]) for k in trained)
    best = json.loads((multi / "fsdp_mean.json").read_text())["best_round"]
    # the model holds the best round, and that round's checkpoint holds it too
    ckpt = MultiTaskModel.from_pretrained(str(multi / "fsdp_mean" / f"checkpoint-round-{best}")).state_dict()
    assert all(torch.equal(ckpt[k], trained[k]) for k in trained)


def test_fsdp_with_task_parallel_is_refused_under_accelerates_fsdp_config(launched):
    for r in range(2):
        said = json.loads((launched / "fsdp" / f"fsdp-rank-{r}.json").read_text())["task_parallel"]
        assert said.startswith("FSDP needs atm_parallel_mode='data_parallel', got atm_parallel_mode='task_parallel'")


def test_fsdp_trainer_refuses_predict_reuses_its_sharding_and_names_a_checkpoint_that_does_not_fit(launched):
    """With a sharded backbone: predict() is refused naming predict and FSDP; a second ATMTrainer on the same
    (already sharded) model reuses the sharding and evaluates as the first, one without FSDP is refused naming
    the situation; layer classes matching nothing are refused naming transformer_layer_cls_to_wrap; a
    checkpoint of another shape is a CheckpointError naming its folder (not a bare KeyError / copy_ error)."""
    for r in range(2):
        info = json.loads((launched / "fsdp" / f"fsdp-rank-{r}.json").read_text())
        assert info["predict"].startswith("predict() does not run with an FSDP-sharded backbone")
        assert info["second_trainer"] == {"sharded": True, "same_accuracies": True}
        assert info["refused"]["without_fsdp"].startswith("the model's backbone is already FSDP-sharded over 2 ranks")
        assert info["refused"]["no_such_layer"].startswith(
            "fsdp_config['transformer_layer_cls_to_wrap']=['NoSuchLayer']: no such module in ViTModel")
        assert info["other_shape"].startswith(f"CheckpointError: {launched / 'fsdp' / 'other-shape'}: backbone "
                                              "weights do not fit this model")


def test_fsdp_resume_from_a_round_checkpoint_is_bit_identical(launched):
    """A fresh sharded trainer resumed from the sharded run's round-1 checkpoint (loaded whole, each rank taking
    its rows) ends round 2 with the uninterrupted run's weights, bit for bit (checked on both ranks)."""
    for r in range(2):
        assert json.loads((launched / "fsdp" / f"fsdp-rank-{r}.json").read_text())["resumed_equal"] is True
