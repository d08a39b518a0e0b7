"""The fast streaming engine: the bounded pipeline, threads, the exact top-k, the fast election, the device path.

Every optimisation must leave the bytes unchanged, so each is checked against a reference: the in-memory merge
for the pipeline (tiny in-flight bounds, many tensors, every method), and, for the cuts and the election, the
old rules re-implemented here in their plainest form (a stable sort for the cut; the ``where`` / bool
formulation of TIES' election).
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from pathlib import Path

import pytest
import torch
import yaml

from hf_atm.cli import main
from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.merging import engine
from hf_atm.merging import methods as M
from hf_atm.merging.config import MergeConfig
from hf_atm.merging.engine import merge_checkpoints, merge_state_dicts_in_memory, run_merge
from hf_atm.merging.io import CheckpointReader, ShardedWriter
from hf_atm.merging.pipeline import InFlight
from hf_atm.merging.spec import METHODS, MergeSpec, merge_tensor
from tests.helpers import load_checkpoint, make_bert_checkpoints, save_raw_checkpoint
from tests.merge_cases import SPECS as BASE_SPECS
from tests.merge_cases import assert_bit_equal as _assert_bit_equal
from tests.merge_cases import bits as _bits
from tests.merge_cases import merge_config as _config

SPECS = {**BASE_SPECS, "breadcrumbs_ties": MergeSpec("breadcrumbs_ties", density=0.8, gamma=0.05, normalize=True)}
#: on a GPU these give the CPU's bits: element-wise arithmetic and exact cuts / CPU-drawn masks only (weighted
#: sums use fused multiply-adds on both devices); the others reduce (norms, sums, SVD, ranks) and match to rounding.
GPU_BIT_EXACT = {"average", "task_arithmetic", "linear", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                 "breadcrumbs_ties"}
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny BERT base and 3 models in many small shards (about 40 tensors, several above 1000 elements)."""
    return make_bert_checkpoints(tmp_path_factory.mktemp("speed"), 3, hidden=32, layers=2, max_shard_size="40KB")


@pytest.fixture(scope="module")
def refs(ckpts):
    base, models = ckpts
    return load_checkpoint(base), [load_checkpoint(m) for m in models]


def _with_stream(monkeypatch, **kw):
    """Make run_merge call the engine's _stream with extra keywords (in-flight bounds, the device path)."""
    monkeypatch.setattr(engine, "_stream", functools.partial(engine._stream, **kw))


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


# ----------------------------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("method", sorted(SPECS))
def test_pipeline_with_tiny_bounds_equals_in_memory_for_every_method(ckpts, refs, tmp_path, monkeypatch, method):
    assert set(SPECS) == set(METHODS)
    base, models = ckpts
    models = models[:1] if method == "slerp" else models
    base_sd, model_sds = refs[0], refs[1][: len(models)]
    flight = InFlight(max_tensors=2, max_bytes=1)  # one tensor at a time by bytes, never more than 2 alive
    _with_stream(monkeypatch, in_flight=flight)
    out = merge_checkpoints(_config(base, models, tmp_path / "out", SPECS[method], threads=2), chunk_elements=700)
    _assert_bit_equal(load_checkpoint(out), merge_state_dicts_in_memory(SPECS[method], base_sd, model_sds))
    assert flight.peak == 1 and flight.alive == 0


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "tsv", "dare_ties"])
def test_threads_1_and_2_give_identical_bytes(ckpts, tmp_path, capsys, method):
    base, models = ckpts
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}"
        argv = ["merge", "--base", str(base), "--models", *map(str, models), "--method", method, "--output",
                str(out), "--no-progress", "--threads", threads]
        assert main(argv) == 0, capsys.readouterr().err
        outs.append(_file_bytes(out))
    assert outs[0] == outs[1] and outs[0]
    recorded = yaml.safe_load((tmp_path / "t1" / "merge_config.yaml").read_text())
    assert "threads" not in recorded and "device" not in recorded  # runtime options, not the result's


def test_in_flight_tensors_never_exceed_the_bound(ckpts, refs, tmp_path, monkeypatch):
    """Counted on the tensors themselves: every tensor a reader hands out is tracked until it is freed."""
    base, models = ckpts
    lock, alive, most = threading.Lock(), {}, [0]
    get = CheckpointReader.get

    def counted(self, name):
        t = get(self, name)
        with lock:
            alive[name] = alive.get(name, 0) + 1
            most[0] = max(most[0], sum(1 for v in alive.values() if v))

        def gone(n=name):
            with lock:
                alive[n] -= 1
        weakref.finalize(t, gone)
        return t

    monkeypatch.setattr(CheckpointReader, "get", counted)
    for limit in (1, 3):
        most[0] = 0
        flight = InFlight(max_tensors=limit, max_bytes=1 << 30)
        _with_stream(monkeypatch, in_flight=flight)
        spec = SPECS["ties"]
        out = merge_checkpoints(_config(base, models, tmp_path / f"o{limit}", spec, threads=2), chunk_elements=500)
        assert 1 <= most[0] <= limit, (most[0], limit)
        assert flight.peak <= limit
        monkeypatch.setattr(engine, "_stream", engine._stream.func)
    _assert_bit_equal(load_checkpoint(out), merge_state_dicts_in_memory(spec, refs[0], refs[1]))


class _Boom(RuntimeError):
    pass


def _floating_names(folder) -> list[str]:
    with CheckpointReader(folder) as r:
        return [n for n in r.names if r.info(n).dtype.is_floating_point]


@pytest.mark.parametrize("where", ["reader", "writer", "worker"])
@pytest.mark.parametrize("threads", [1, 2])
def test_an_error_in_any_stage_propagates_as_itself_and_leaves_no_temporary_folder(ckpts, tmp_path, monkeypatch,
                                                                                     where, threads):
    base, models = ckpts
    victim = _floating_names(base)[7]
    err = _Boom(f"boom in the {where}")
    if where == "reader":
        get = CheckpointReader.get
        monkeypatch.setattr(CheckpointReader, "get",
                            lambda self, name: (_ for _ in ()).throw(err) if name == victim else get(self, name))
    elif where == "writer":
        write = ShardedWriter.write

        def failing_write(self, name, data):
            if name == victim:
                assert threading.current_thread().name == "hf-atm-write"
                raise err
            write(self, name, data)
        monkeypatch.setattr(ShardedWriter, "write", failing_write)
    else:
        merge_one = engine._merge_one
        monkeypatch.setattr(engine, "_merge_one",
                            lambda spec, b, ms, name, dt: (_ for _ in ()).throw(err) if name == victim
                            else merge_one(spec, b, ms, name, dt))
    out = tmp_path / "out"
    with pytest.raises(_Boom) as info:
        run_merge(_config(base, models, out, SPECS["task_arithmetic"], threads=threads))
    assert info.value is err
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]  # no temporary folder
    assert not [t for t in threading.enumerate() if t.name.startswith("hf-atm")]  # every thread joined


def test_the_first_failing_tensor_in_order_is_reported(ckpts, tmp_path, monkeypatch):
    """Later tensors may be merged first on other threads; the error raised is still the earliest one's."""
    base, models = ckpts
    names = _floating_names(base)
    merge_one = engine._merge_one

    def failing(spec, b, ms, name, dt):
        if name in (names[5], names[9]):
            raise _Boom(name)
        return merge_one(spec, b, ms, name, dt)
    monkeypatch.setattr(engine, "_merge_one", failing)
    with pytest.raises(_Boom, match=names[5].replace(".", r"\.")):
        run_merge(_config(base, models, tmp_path / "out", SPECS["task_arithmetic"], threads=2))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare_ties"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["base", "model"])
def test_non_finite_inputs_of_sliced_tensors_are_refused_naming_the_file(tmp_path, method, bad, where):
    """The sliced path checks its inputs after phase 1 (or learns from the cuts that they are finite)."""
    g = torch.Generator().manual_seed(78)
    sds = [{"w": torch.randn(60, 50, generator=g), "v": torch.randn(7, generator=g)} for _ in range(3)]
    sds[0 if where == "base" else 2]["w"][17, 3] = bad
    folders = [save_raw_checkpoint(tmp_path / f"c{i}", sd) for i, sd in enumerate(sds)]
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="NaN" if bad != bad else "Inf") as info:
        merge_checkpoints(_config(folders[0], folders[1:], out, SPECS[method], threads=2), chunk_elements=500)
    assert "'w'" in str(info.value) and str(folders[0 if where == "base" else 2] / "model.safetensors") in str(info.value)
    assert not out.exists()


def test_finite_inputs_whose_differences_overflow_still_merge(tmp_path):
    base_sd = {"w": torch.full((40, 30), -3e38)}
    model_sds = [{"w": torch.full((40, 30), 3e38) * (1 + 0.1 * torch.rand(40, 30))} for _ in range(2)]
    folders = [save_raw_checkpoint(tmp_path / f"c{i}", sd) for i, sd in enumerate([base_sd, *model_sds])]
    out = merge_checkpoints(_config(folders[0], folders[1:], tmp_path / "out", SPECS["ties"]), chunk_elements=100)
    _assert_bit_equal(load_checkpoint(out), merge_state_dicts_in_memory(SPECS["ties"], base_sd, model_sds))


def test_torch_threads_are_restored(ckpts, tmp_path):
    base, models = ckpts
    before = torch.get_num_threads()
    run_merge(_config(base, models, tmp_path / "out", SPECS["ties"], threads=2))
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("method", sorted(SPECS))
def test_device_path_on_the_cpu_equals_in_memory(ckpts, refs, tmp_path, monkeypatch, method):
    """The GPU path's code (copy in, merge, copy back in blocks) run with device cpu: the same bytes."""
    base, models = ckpts
    models = models[:1] if method == "slerp" else models
    _with_stream(monkeypatch, device_path=True)
    out = merge_checkpoints(_config(base, models, tmp_path / "out", SPECS[method], device="cpu"),
                            chunk_elements=700)
    expected = merge_state_dicts_in_memory(SPECS[method], refs[0], refs[1][: len(models)])
    _assert_bit_equal(load_checkpoint(out), expected)


def test_device_option_is_validated(tmp_path):
    kw = dict(base="b", models=["m"], output=str(tmp_path / "o"))
    for bad in ("gpu", "cuda:x", "", 3):
        with pytest.raises(MergeConfigError, match="device"):
            MergeConfig(**kw, device=bad).validate()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(MergeConfigError, match="threads"):
            MergeConfig(**kw, threads=bad).validate()
    MergeConfig(**kw, device="cpu", threads=3).validate()
    MergeConfig(**kw, device="auto").validate()
    assert "device" not in yaml.safe_load(MergeConfig(**kw, device="auto").to_yaml())


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_naming_the_option(ckpts, tmp_path, capsys):
    base, models = ckpts
    code = main(["merge", "--base", str(base), "--models", *map(str, models), "--method", "ties", "--output",
                 str(tmp_path / "out"), "--no-progress", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "device" in err and "cuda" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(MergeConfigError, match="device"):
        engine.resolve_device("cuda")
    assert engine.resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("method", sorted(SPECS))
def test_gpu_merge_equals_the_cpu_merge(ckpts, tmp_path, method):
    base, models = ckpts
    models = models[:1] if method == "slerp" else models
    torch.cuda.reset_peak_memory_stats()
    gpu = load_checkpoint(merge_checkpoints(_config(base, models, tmp_path / "gpu", SPECS[method], device="cuda"),
                                            chunk_elements=700))
    peak = torch.cuda.max_memory_allocated()
    cpu = load_checkpoint(merge_checkpoints(_config(base, models, tmp_path / "cpu", SPECS[method], device="cpu"),
                                            chunk_elements=700))
    assert peak > 0
    if method in GPU_BIT_EXACT:
        _assert_bit_equal(gpu, cpu)
    else:
        assert set(gpu) == set(cpu)
        for k in cpu:
            torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_gpu_memory_is_bounded_by_one_tensor_not_the_model(tmp_path, method):
    """24 tensors of 1 MiB (float32) in 4 checkpoints: the GPU holds about one tensor's inputs and temporaries."""
    g = torch.Generator().manual_seed(77)
    base_sd = {f"layer{i}.weight": torch.randn(512, 512, generator=g) for i in range(24)}
    base = save_raw_checkpoint(tmp_path / "base", base_sd)
    models = [save_raw_checkpoint(tmp_path / f"m{j}", {k: v + 0.01 * torch.randn(v.shape, generator=g)
                                                         for k, v in base_sd.items()}) for j in range(3)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    merge_checkpoints(_config(base, models, tmp_path / "out", SPECS[method], device="cuda"))
    peak = torch.cuda.max_memory_allocated() - start
    one_tensor, model = 512 * 512 * 4, 24 * 512 * 512 * 4
    assert peak <= 20 * one_tensor < 4 * model, (peak, one_tensor)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare_ties"])
def test_gpu_cuts_and_masks_equal_the_cpu_ones_with_ties_at_the_cut(method):
    g = torch.Generator().manual_seed(70)
    taus = [torch.randint(-6, 7, (300, 70), generator=g).float() / 8 for _ in range(3)]
    plan = {"ties": lambda ts: M.ties(ts, [1.0, 0.5, 2.0], 0.3),
            "breadcrumbs": lambda ts: M.breadcrumbs(ts, None, 0.6, 0.1),
            "dare_ties": lambda ts: M.dare_ties(ts, None, 0.5, "total",
                                                [torch.Generator().manual_seed(i) for i in range(3)])}[method]
    assert torch.equal(_bits(plan([t.cuda() for t in taus]).cpu()), _bits(plan(taus)))
    for t in taus:
        assert M.magnitude_cut(t.abs().cuda(), 5000) == M.magnitude_cut(t.abs(), 5000)


# ----------------------------------------------------------------------------------------- the exact top-k
def _first_k(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The old rule, plainly: the first k entries of (|x| descending, flat index ascending), by a stable sort."""
    flat = mag.reshape(-1)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    order = torch.sort(flat, descending=True, stable=True).indices
    keep[order[: max(0, min(k, flat.numel()))]] = True
    return keep.view(mag.shape)


def _ref_cut(mag: torch.Tensor, k: int, order=None) -> tuple[float, int]:
    """(threshold, ties) of the old rule: the k-th largest value, and how many of the k equal it."""
    flat = mag.reshape(-1).double()
    n = flat.numel()
    if k >= n:
        return -math.inf, 0
    if k <= 0:
        return math.inf, 0
    values = (order if order is not None else torch.sort(flat, descending=True, stable=True)).values.double()
    thr = float(values[k - 1])
    return thr, k - int((values[:k] > thr).sum())


class _Sorted:
    """One stable descending sort of a tensor's magnitudes, shared by the reference cuts and masks."""

    def __init__(self, mag: torch.Tensor):
        self.mag, self.order = mag, torch.sort(mag.reshape(-1), descending=True, stable=True)

    def cut(self, k: int) -> tuple[float, int]:
        return _ref_cut(self.mag, k, self.order)

    def first_k(self, k: int) -> torch.Tensor:
        keep = torch.zeros(self.mag.numel(), dtype=torch.bool)
        keep[self.order.indices[: max(0, min(k, self.mag.numel()))]] = True
        return keep.view(self.mag.shape)


def _magnitudes(kind: str, n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = {
        "randn": lambda: torch.randn(n, generator=g),
        "coarse": lambda: torch.randint(-8, 9, (n,), generator=g).float() / 4,  # ties everywhere
        "equal": lambda: torch.full((n,), 0.75),
        "zeros": lambda: torch.zeros(n),
        "tiny": lambda: torch.randn(n, generator=g) * 1e-40,  # subnormals
        "bf16": lambda: torch.randn(n, generator=g).bfloat16().float(),  # quantized, as bf16 checkpoints' deltas
        "sampled_zero": lambda: torch.randn(n, generator=g).index_fill_(0, torch.arange(0, n, 64), 0.0),
        "spikes": lambda: torch.where(torch.rand(n, generator=g) < 0.01, 1e30, 1e-3 * torch.rand(n, generator=g)),
    }[kind]()
    return x.abs().to(dtype)


KINDS = ["randn", "coarse", "equal", "zeros", "tiny", "bf16", "sampled_zero", "spikes"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_magnitude_cut_equals_the_sorted_rule(kind, dtype):
    n = 20_000 + 37
    mag = _magnitudes(kind, n, seed=71, dtype=dtype)
    ref = _Sorted(mag)
    ks = [0, 1, 2, 3, 17, n // 5, n // 2, n - 1, n, n + 5]
    cuts = M.magnitude_cuts(mag, ks)
    for k, cut in zip(ks, cuts):
        assert (cut.threshold, cut.ties) == ref.cut(k), k
        assert cut == M.magnitude_cut(mag, k)
        assert M.magnitude_cuts(mag.clone(), [k], again=lambda: mag)[0] == cut  # partitioned in place
        keep = ref.first_k(k)
        assert torch.equal(M.cut_mask(mag, cut), keep), k
        assert torch.equal(M.cut_mask(mag, M.MagnitudeCut(cut.threshold, cut.ties)), keep), k  # counting path
        if 0 < k < n:
            assert M.kth_largest(mag.reshape(-1), k) == ref.cut(k)[0]
        if k in (n // 5, n - 1) and dtype != torch.bfloat16:
            # any slice, any order, through the stateless cursor; trim = where(mask, values, 0)
            cursor = M.CutCursor(cut)
            signed = mag * torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0).to(dtype)
            for start, stop in [(n - 999, n), (0, 1), (1, 4097), (12_345, 20_001), (4097, 12_345)]:
                part = signed[start:stop]
                want = keep[start:stop]
                assert torch.equal(cursor.mask_at(part.abs(), start), want)
                assert torch.equal(cursor.trim_at(part, start), torch.where(want, part, torch.zeros((), dtype=dtype)))


@pytest.mark.parametrize("kind", KINDS + ["nan"])
def test_streamed_cuts_equal_the_sorted_rule(kind):
    """The one-pass bracketed cut over chunks of |M - BASE| (never stored), fallbacks included (all-equal
    magnitudes gather too much, "sampled_zero" makes the bracket miss, a NaN goes to the whole-tensor path)."""
    n = M.STREAM_MIN * 5 + 123
    mag = _magnitudes("randn" if kind == "nan" else kind, n, seed=79)
    if kind == "nan":
        mag[777] = math.nan
    g = torch.Generator().manual_seed(80)
    base = torch.randn(n, generator=g).bfloat16()
    model = (base.float() + torch.where(torch.rand(n, generator=g) < 0.5, -mag, mag)).bfloat16()
    exact = (model.float() - base.float()).abs()
    read = []
    source = M.TaskMagnitudes(model, base, torch.float32, done=lambda: read.append(1))
    ks = [1, 5, n // 5, n // 2, n - 3, 0, n]
    cuts = M.magnitude_cuts_streamed(source, ks)
    source.done()
    assert read == [1]
    ref = _Sorted(exact)
    for k, cut in zip(ks, cuts):
        if kind == "nan" and 0 < k < n:
            assert cut.finite is False
            continue
        assert (cut.threshold, cut.ties) == ref.cut(k), k
        assert torch.equal(M.cut_mask(exact, cut), ref.first_k(k)), k


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_plan_tensor_on_bf16_with_ties_at_every_cut_equals_the_sorted_rule(method):
    """Half-precision deltas tie at every cut: the streamed cuts' tie scan, then the merge, against the plain
    stable-sort reference and the where formulation."""
    g = torch.Generator().manual_seed(81)
    shape = (300, 450)
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    models = [(base.float() + 0.002 * torch.randn(shape, generator=g)).bfloat16() for _ in range(3)]
    taus = [m.float() - base.float() for m in models]
    if method == "ties":
        spec = MergeSpec("ties", density=0.2)
        delta = _ref_ties(taus, None, 0.2, "total", None)
    else:
        spec = MergeSpec("breadcrumbs_ties", density=0.5, gamma=0.1)
        bands = [_ref_breadcrumbs_keep(t, 0.5, 0.1).reshape(-1) for t in taus]
        delta = _elect_where([t.reshape(-1) for t in taus], bands, None, "total").view(shape)
    assert any(0 < M.magnitude_cut(t.abs(), int(0.2 * t.numel())).tie_end < t.numel() for t in taus)
    want = delta.add_(base.float()).to(torch.bfloat16)
    assert torch.equal(_bits(merge_tensor(spec, base, models, "w")), _bits(want))


def test_all_equal_magnitudes_keep_the_first_k():
    mag = torch.full((1000,), 2.0)
    cut = M.magnitude_cut(mag, 300)
    assert (cut.threshold, cut.ties, cut.tie_end) == (2.0, 300, 300)
    assert torch.equal(M.cut_mask(mag, cut), torch.arange(1000) < 300)


def test_cut_magnitudes_are_not_modified():
    mag = _magnitudes("randn", 5000, seed=72)
    before = mag.clone()
    M.magnitude_cuts(mag, [10, 2500])
    assert torch.equal(mag, before)


# ------------------------------------------------------------------------------------- the fast election
def _elect_where(values, keeps, weights, msm, normalize=None):
    """The old TIES steps 2-3 (``where`` and bool masks), copied from hf_atm before the float-only rewrite."""
    zero = torch.zeros((), dtype=values[0].dtype)
    if normalize is not None:
        weighted, votes = [], None
        for i, (v, keep) in enumerate(zip(values, keeps)):
            t = v if keep is None else torch.where(keep, v, zero)
            t = t * weights[i] if weights is not None else t.clone()
            weighted.append(t)
            term = t if msm == "total" else t.sign()
            votes = term.clone() if votes is None else votes.add_(term)
        elected = torch.where(votes >= 0, 1.0, -1.0).to(votes.dtype)
        total = torch.zeros_like(elected)
        divisor = torch.zeros_like(elected) if normalize else None
        for i, t in enumerate(weighted):
            agree = t.sign() == elected
            total.add_(torch.where(agree, t, zero))
            if divisor is not None:
                divisor.add_(agree, alpha=1.0 if weights is None else weights[i])
        return total if divisor is None else total.div_(torch.where(divisor == 0, 1.0, divisor))
    signs, votes = [], None
    for v, keep in zip(values, keeps):
        sign = v.sign() if keep is None else torch.where(keep, v.sign(), zero)
        signs.append(sign)
        term = (v if keep is None else torch.where(keep, v, zero)) if msm == "total" else sign
        votes = term.clone() if votes is None else votes.add_(term)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(votes.dtype)
    total, count = torch.zeros_like(elected), torch.zeros_like(elected)
    for i, (v, sign) in enumerate(zip(values, signs)):
        agree = sign == elected
        term = v if weights is None else v * weights[i]
        total.add_(torch.where(agree, term, zero))
        count.add_(agree)
    return total.div_(count.clamp_(min=1))


def _ref_ties(taus, weights, density, msm, normalize):
    keeps = [_first_k(t.abs(), int(density * t.numel())) if density < 1 else None for t in taus]
    flat = [t.reshape(-1) for t in taus]
    return _elect_where(flat, [None if k is None else k.reshape(-1) for k in keeps], weights, msm,
                        normalize).view(taus[0].shape)


def _ref_breadcrumbs_keep(t, density, gamma):
    n = t.numel()
    k_top = int(gamma * n)
    k_end = k_top + min(int(density * n), n - k_top)
    return _first_k(t.abs(), k_end) & ~_first_k(t.abs(), k_top)


def _task_vectors(kind: str, seed: int, shape=(131, 77)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        if kind == "randn":
            t = torch.randn(shape, generator=g)
        elif kind == "coarse":
            t = torch.randint(-3, 4, shape, generator=g).float() / 2
        elif kind == "signed_zeros":
            t = torch.randint(-1, 2, shape, generator=g).float() * 0.0  # +0 and -0
            t.view(-1)[::5] = torch.randn(t.view(-1)[::5].shape, generator=g)
        else:  # "cancel": the votes cancel exactly in many places
            t = torch.randint(-1, 2, shape, generator=g).float()
        out.append(t)
    if kind == "cancel":
        out[2] = -(out[0] + out[1]).clamp(-1, 1)
    return out


@pytest.mark.parametrize("kind", ["randn", "coarse", "signed_zeros", "cancel"])
@pytest.mark.parametrize("normalize", [None, True, False])
@pytest.mark.parametrize("msm", ["total", "frequency"])
def test_ties_family_equal_the_where_formulation_bit_for_bit(kind, normalize, msm):
    taus = _task_vectors(kind, seed=73)
    for weights in (None, [0.5, 2.0, -1.0]):
        for density in (0.05, 0.3, 1.0):
            got = M.ties(taus, weights, density, msm, normalize)
            assert torch.equal(_bits(got), _bits(_ref_ties(taus, weights, density, msm, normalize))), (weights, density)
        bands = [_ref_breadcrumbs_keep(t, 0.6, 0.1).reshape(-1) for t in taus]
        flat = [t.reshape(-1) for t in taus]
        want = _elect_where(flat, bands, weights, msm, normalize).view(taus[0].shape)
        got = M.breadcrumbs_ties(taus, weights, 0.6, 0.1, msm, normalize)
        assert torch.equal(_bits(got), _bits(want)), weights


def test_breadcrumbs_equals_the_bool_band_product_bit_for_bit():
    taus = _task_vectors("signed_zeros", seed=74)
    for weights in (None, [0.5, 2.0, -1.0]):
        out = None
        for i, t in enumerate(taus):
            term = t * _ref_breadcrumbs_keep(t, 0.6, 0.1)  # the old t * bool_band, weighted, summed in order
            if weights is not None:
                term.mul_(weights[i])
            out = term if out is None else out.add_(term)
        assert torch.equal(_bits(M.breadcrumbs(taus, weights, 0.6, 0.1)), _bits(out))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_values_fall_back_to_the_reference(bad):
    taus = _task_vectors("randn", seed=75, shape=(40, 30))
    taus[1][3, 4] = bad
    flat = [t.reshape(-1) for t in taus]
    for normalize in (None, True):
        got = M.elect_and_mean_slice(flat, [None] * 3, [1.0, -2.0, 0.5], "total", normalize)
        want = _elect_where(flat, [None] * 3, [1.0, -2.0, 0.5], "total", normalize)
        assert torch.equal(_bits(got), _bits(want))
        keeps = [_first_k(t.abs().nan_to_num(nan=0.0), 300).reshape(-1) for t in taus]
        plan = M.TiesCombine([M.magnitude_cut(t.abs().nan_to_num(nan=0.0), 300) for t in taus], 1200,
                             [1.0, -2.0, 0.5], "total", normalize)
        assert torch.equal(_bits(plan.combine(flat, 0)), _bits(_elect_where(flat, keeps, [1.0, -2.0, 0.5], "total",
                                                                            normalize)))


def test_stateless_combines_answer_any_slice_in_any_order():
    taus = [t.reshape(-1) for t in _task_vectors("coarse", seed=76, shape=(97, 53))]
    n = taus[0].numel()
    plans = [M.ties_plan(lambda i: taus[i].abs(), 3, n, None, 0.3),
             M.breadcrumbs_ties_plan(lambda i: taus[i].abs(), 3, n, [1.0, 2.0, 0.5], 0.5, 0.1),
             M.breadcrumbs_plan(lambda i: taus[i].abs(), 3, n, None, 0.5, 0.1)]
    for plan in plans:
        assert plan.stateless
        whole = plan.run(taus, torch.float32)
        for start, stop in [(4000, n), (17, 18), (0, 1000), (1000, 4000)]:
            assert torch.equal(_bits(plan.combine_at([t[start:stop] for t in taus], start)), _bits(whole[start:stop]))
