"""The pure merge functions of hf_atm.merging.methods against peft and against dense references written here."""

import math
import warnings

import numpy as np
import pytest
import torch
from peft.utils import merge_utils as peft_mu
from torch.testing import assert_close

from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.merging import methods as M

SHAPES = [(), (7,), (5, 6), (3, 4, 5), (40, 30)]


def _taus(shape, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


def _peft(fn, taus, weights, *args):
    w = torch.ones(len(taus)) if weights is None else torch.tensor(weights, dtype=taus[0].dtype)
    with warnings.catch_warnings():  # peft warns when density >= 1 (no pruning)
        warnings.simplefilter("ignore")
        return fn([t.clone() for t in taus], w, *args)


# ------------------------------------------------------------------------------------ task arithmetic / ties
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", [None, [0.5, -1.25, 2.0]])
def test_task_arithmetic_matches_peft(shape, weights):
    taus = _taus(shape, 3, seed=1)
    assert_close(M.task_arithmetic(taus, weights), _peft(peft_mu.task_arithmetic, taus, weights))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", [None, [0.7, 1.3, 0.4]])
@pytest.mark.parametrize("msm", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.55, 1.0])
def test_ties_matches_peft(shape, weights, msm, density):
    taus = _taus(shape, 3, seed=2)
    ours = M.ties(taus, weights, density=density, majority_sign_method=msm)
    assert_close(ours, _peft(peft_mu.ties, taus, weights, density, msm))


def test_ties_matches_peft_float64_and_inputs_untouched():
    taus = _taus((20, 9), 4, seed=3, dtype=torch.float64)
    before = [t.clone() for t in taus]
    ours = M.ties(taus, [1.0, 2.0, 0.5, 1.5], density=0.3)
    assert ours.dtype == torch.float64
    assert_close(ours, _peft(peft_mu.ties, taus, [1.0, 2.0, 0.5, 1.5], 0.3, "total"))
    for t, b in zip(taus, before):
        assert torch.equal(t, b)


def test_ties_density_one_is_sign_election_and_disjoint_mean():
    taus = [torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([3.0, 1.0, -1.0, 0.0])]
    # votes: 4 (+), -1 (-), 2 (+), 0 (+, but no task agrees: both entries are 0)
    expected = torch.tensor([2.0, -2.0, 3.0, 0.0])
    assert torch.equal(M.ties(taus, density=1.0), expected)


def test_ties_half_precision_inputs_compute_in_float32():
    taus = [t.to(torch.bfloat16) for t in _taus((6, 6), 2, seed=4)]
    out = M.ties(taus, density=0.5)
    assert out.dtype == torch.float32
    assert_close(out, _peft(peft_mu.ties, [t.float() for t in taus], None, 0.5, "total"))


def test_magnitude_trim_keeps_exact_count():
    tau = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    for density in (0.001, 0.2, 0.5, 0.999):
        kept = M.magnitude_trim(tau, density)
        k = int(density * 1000)
        assert int((kept != 0).sum()) == k
        if k:
            assert kept.abs().max() == tau.abs().max()
            assert kept[kept != 0].abs().min() >= tau.abs().sort(descending=True).values[k - 1]


# --------------------------------------------------------------------------------------------------- DARE
def test_dare_linear_kept_entries_are_rescaled_and_mask_recoverable():
    tau = torch.randn(200, 300, generator=torch.Generator().manual_seed(6)) + 10.0  # no zeros
    density = 0.3
    out = M.dare_linear([tau], density=density, generator=torch.Generator().manual_seed(11))
    kept = out != 0
    assert torch.equal(out[kept], tau[kept] / density)
    assert torch.equal(kept, M.dare_mask(tau.shape, density, torch.Generator().manual_seed(11)))
    # Bernoulli(density) per entry: the kept fraction is within 6 binomial sigmas of density.
    n = tau.numel()
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(kept.float().mean().item() - density) < 6 * sigma


def test_dare_linear_is_weighted_sum_of_per_task_drops():
    taus = _taus((30, 20), 3, seed=7)
    w = [0.5, 2.0, -1.0]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    out = M.dare_linear(taus, w, density=0.4, generator=gens)
    ref = sum(
        wi * M.dare_linear([t], density=0.4, generator=torch.Generator().manual_seed(s))
        for wi, t, s in zip(w, taus, (1, 2, 3))
    )
    assert_close(out, ref)
    with pytest.raises(MergeConfigError, match="generator"):
        M.dare_linear(taus, density=0.4, generator=gens[:2])


def test_dare_density_one_keeps_everything():
    taus = _taus((10, 10), 2, seed=8)
    assert_close(
        M.dare_linear(taus, density=1.0, generator=torch.Generator().manual_seed(0)), taus[0] + taus[1]
    )


@pytest.mark.parametrize("msm", ["total", "frequency"])
def test_dare_ties_equals_peft_ties_on_the_same_dropped_vectors(msm):
    taus = _taus((40, 25), 3, seed=9)
    w = [1.0, 0.5, 2.0]
    seeds = (21, 22, 23)
    out = M.dare_ties(
        taus,
        w,
        density=0.6,
        majority_sign_method=msm,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    )
    dropped = [
        t * M.dare_mask(t.shape, 0.6, torch.Generator().manual_seed(s)) / 0.6 for t, s in zip(taus, seeds)
    ]
    # peft's ties at density 1 is exactly the sign election + weighted disjoint mean, without trimming.
    assert_close(out, _peft(peft_mu.ties, dropped, w, 1.0, msm))
    # invariants: entries every task dropped are 0; unit-weight result has the elected sign or is 0.
    all_dropped = torch.stack([d == 0 for d in dropped]).all(0)
    assert torch.equal(out[all_dropped], torch.zeros(int(all_dropped.sum())))
    unit = M.dare_ties(
        taus,
        density=0.6,
        majority_sign_method=msm,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    )
    stack = torch.stack(dropped)
    votes = stack.sum(0) if msm == "total" else stack.sign().sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    assert bool(((unit.sign() == elected) | (unit == 0)).all())


def test_dare_mask_defaults_to_global_rng_and_moves_device():
    torch.manual_seed(123)
    a = M.dare_mask((50,), 0.5)
    torch.manual_seed(123)
    b = M.dare_mask((50,), 0.5, device="cpu")
    assert torch.equal(a, b) and a.dtype == torch.bool


# -------------------------------------------------------------------------------------------- breadcrumbs
def test_breadcrumbs_keeps_the_middle_band_exactly():
    g = torch.Generator().manual_seed(10)
    tau = torch.randperm(1000, generator=g).float().add_(1.0) * torch.where(
        torch.rand(1000, generator=g) < 0.5, -1, 1
    )
    mask = M.breadcrumbs_mask(tau, density=0.5, gamma=0.1)
    assert int(mask.sum()) == 500
    order = tau.abs().argsort(descending=True)
    expected = torch.zeros(1000, dtype=torch.bool)
    expected[order[100:600]] = True
    assert torch.equal(mask, expected)
    out = M.breadcrumbs([tau], density=0.5, gamma=0.1)
    assert torch.equal(out, torch.where(expected, tau, torch.zeros(())))


def test_breadcrumbs_counts_exact_with_ties_and_weights():
    tau = torch.ones(10, 10)  # all magnitudes equal: the top and bottom drops must not overlap
    for density, gamma in [(0.9, 0.01), (0.5, 0.3), (0.2, 0.0), (1.0, 0.0)]:
        mask = M.breadcrumbs_mask(tau, density, gamma)
        assert int(mask.sum()) == int(density * 100)
    taus = _taus((30, 40), 2, seed=11)
    out = M.breadcrumbs(taus, [2.0, -0.5], density=0.7, gamma=0.05)
    ref = 2.0 * taus[0] * M.breadcrumbs_mask(taus[0], 0.7, 0.05) - 0.5 * taus[1] * M.breadcrumbs_mask(
        taus[1], 0.7, 0.05
    )
    assert_close(out, ref)


# ----------------------------------------------------------------------------------------------- TSV / Iso-C
def _inv_sqrt_psd(g):
    w, q = np.linalg.eigh(g)
    return q @ np.diag(w**-0.5) @ q.T


def _polar(a):
    """Orthonormal polar factor A (A^T A)^(-1/2) (full column rank), independent of the SVD route."""
    return a @ _inv_sqrt_psd(a.T @ a)


def _tsv_reference(taus, weights=None):
    t = len(taus)
    weights = weights or [1.0] * t
    m, n = taus[0].shape
    k = max(1, min(m, n) // t)
    us, ss, vs = [], [], []
    for w, tau in zip(weights, taus):
        u, s, vt = np.linalg.svd(w * tau, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vt[:k].T)
    u_perp, v_perp = _polar(np.hstack(us)), _polar(np.hstack(vs))
    return u_perp @ np.diag(np.concatenate(ss)) @ v_perp.T


@pytest.mark.parametrize("shape,n_tasks", [((12, 7), 2), ((6, 15), 3), ((10, 10), 4), ((9, 20), 1)])
@pytest.mark.parametrize("weighted", [False, True])
def test_tsv_matches_dense_reference(shape, n_tasks, weighted):
    taus = _taus(shape, n_tasks, seed=12, dtype=torch.float64)
    weights = [0.5 + i for i in range(n_tasks)] if weighted else None
    ours = M.tsv(taus, weights)
    ref = _tsv_reference([t.numpy() for t in taus], weights)
    assert_close(ours, torch.from_numpy(ref), rtol=1e-9, atol=1e-9)
    # float32 in: float32 out, close to the float64 reference
    ours32 = M.tsv([t.float() for t in taus], weights)
    assert ours32.dtype == torch.float32
    assert_close(ours32, torch.from_numpy(ref).float(), rtol=1e-4, atol=1e-4)


def test_tsv_single_task_returns_its_delta():
    for shape in [(8, 5), (5, 8), (6, 6)]:
        (tau,) = _taus(shape, 1, seed=13)
        assert_close(M.tsv([tau]), tau, rtol=1e-5, atol=1e-5)


def test_tsv_orthogonal_tasks_reconstruct_their_sum():
    m, n, t, k = 18, 15, 3, 5
    g = torch.Generator().manual_seed(14)
    ql = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    qr = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    taus = []
    for i in range(t):
        s = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        cols = slice(i * k, (i + 1) * k)
        taus.append(ql[:, cols] @ torch.diag(s) @ qr[:, cols].T)  # rank k, mutually orthogonal subspaces
    assert_close(M.tsv(taus), sum(taus), rtol=1e-9, atol=1e-9)


def test_tsv_more_tasks_than_rank_and_non_matrix_fallback():
    taus = _taus((3, 8), 5, seed=15)  # k = max(1, 3 // 5) = 1, Tk = 5 > 3 rows
    out = M.tsv(taus)
    assert out.shape == (3, 8) and torch.isfinite(out).all()
    for shape in [(), (7,), (2, 3, 4)]:
        taus = _taus(shape, 3, seed=16)
        assert_close(M.tsv(taus, [1.0, 2.0, 3.0]), (taus[0] + 2 * taus[1] + 3 * taus[2]) / 3)


def _iso_reference(taus, weights=None):
    weights = weights or [1.0] * len(taus)
    d = sum(w * t for w, t in zip(weights, taus))
    tall = d.shape[0] >= d.shape[1]
    a = d if tall else d.T
    polar = _polar(a)
    mean_s = np.trace(polar.T @ a) / a.shape[1]  # sum of singular values / min(m, n)
    out = mean_s * polar
    return out if tall else out.T


@pytest.mark.parametrize("shape", [(12, 7), (6, 15), (10, 10)])
@pytest.mark.parametrize("weights", [None, [1.5, -0.5, 1.0]])
def test_iso_c_matches_dense_reference(shape, weights):
    taus = _taus(shape, 3, seed=17, dtype=torch.float64)
    ref = _iso_reference([t.numpy() for t in taus], weights)
    assert_close(M.iso_c(taus, weights), torch.from_numpy(ref), rtol=1e-9, atol=1e-9)


def test_iso_c_single_task_flattens_the_spectrum():
    (tau,) = _taus((9, 6), 1, seed=18, dtype=torch.float64)
    out = M.iso_c([tau])
    s = torch.linalg.svdvals(tau)
    assert_close(torch.linalg.svdvals(out), torch.full_like(s, s.mean().item()))
    u, _, vh = torch.linalg.svd(tau, full_matrices=False)
    assert_close(out, u @ torch.diag(torch.full_like(s, s.mean().item())) @ vh)


def test_iso_c_non_matrix_is_the_mean():
    for shape in [(), (11,), (2, 2, 3)]:
        taus = _taus(shape, 2, seed=19)
        assert_close(M.iso_c(taus, [1.0, 3.0]), (taus[0] + 3 * taus[1]) / 2)


# ---------------------------------------------------------------------------------------------- edge cases
ALL = {
    "task_arithmetic": lambda ts: M.task_arithmetic(ts),
    "average": lambda ts: M.average(ts),
    "ties": lambda ts: M.ties(ts, density=0.3),
    "dare_linear": lambda ts: M.dare_linear(ts, density=0.5, generator=torch.Generator().manual_seed(0)),
    "dare_ties": lambda ts: M.dare_ties(ts, density=0.5, generator=torch.Generator().manual_seed(0)),
    "breadcrumbs": lambda ts: M.breadcrumbs(ts, density=0.8, gamma=0.1),
    "tsv": lambda ts: M.tsv(ts),
    "iso_c": lambda ts: M.iso_c(ts),
}


@pytest.mark.parametrize("method", sorted(ALL))
@pytest.mark.parametrize("shape", [(), (1,), (5,), (1, 1), (1, 9), (9, 1), (4, 6)])
def test_zero_and_tiny_tensors_give_finite_results(method, shape):
    zeros = [torch.zeros(shape), torch.zeros(shape)]
    out = ALL[method](zeros)
    assert out.shape == torch.Size(shape) and torch.equal(out, torch.zeros(shape))
    out = ALL[method](_taus(shape, 2, seed=20))
    assert out.shape == torch.Size(shape) and torch.isfinite(out).all()


def test_bad_inputs_raise_named_errors():
    with pytest.raises(MergeConfigError):
        M.task_arithmetic([])
    with pytest.raises(CheckpointError, match=r"\[1\].*shape"):
        M.ties([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(CheckpointError, match="non-floating"):
        M.task_arithmetic([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(MergeConfigError, match="weights"):
        M.task_arithmetic([torch.zeros(3)], [1.0, 2.0])
    with pytest.raises(MergeConfigError, match="density"):
        M.ties([torch.zeros(3)], density=0.0)
    with pytest.raises(MergeConfigError, match="majority_sign_method"):
        M.ties([torch.zeros(3)], majority_sign_method="mode")
    with pytest.raises(MergeConfigError, match="sum to 0"):
        M.average([torch.zeros(3), torch.zeros(3)], [1.0, -1.0])


# ------------------------------------------------------------------------ exact cuts, tie rule, slicing
def _coarse(shape, n, seed, dtype=torch.float16):
    """Task vectors on a coarse grid (multiples of 1/4 in [-2, 2]): many magnitudes tie at every cut."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(-8, 9, shape, generator=g).float() / 4).to(dtype) for _ in range(n)]


def _first_k(mag, k):
    """Reference selection: the first k entries in the order (|x| descending, index ascending)."""
    order = torch.sort(mag.reshape(-1), descending=True, stable=True).indices
    keep = torch.zeros(mag.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.view(mag.shape)


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.99])
def test_magnitude_trim_tie_rule_keeps_earliest_equal_entries(density):
    tau = _coarse((23, 17), 1, seed=30, dtype=torch.float32)[0]
    keep = _first_k(tau.abs(), int(density * tau.numel()))
    out = M.magnitude_trim(tau, density)
    assert int((out != 0).sum()) == int((keep & (tau != 0)).sum())
    assert torch.equal(out, torch.where(keep, tau, torch.zeros(())))


def test_magnitude_cut_edges():
    mag = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.0])
    assert M.magnitude_cut(mag, 0) == M.MagnitudeCut(math.inf, 0)
    assert M.magnitude_cut(mag, 6).keeps_all and M.magnitude_cut(mag, 9).keeps_all
    assert M.magnitude_cut(mag, 3) == M.MagnitudeCut(2.0, 2)  # 3.0, then the first two 2.0s
    cursor = M.CutCursor(M.magnitude_cut(mag, 3))
    assert cursor.mask(mag[:3], 0).tolist() == [True, False, True]
    with pytest.raises(RuntimeError, match="in order"):
        cursor.mask(mag[4:], 4)
    assert cursor.mask(mag[3:], 3).tolist() == [True, False, False]


def _plan(method, taus, weights):
    mag = lambda i: taus[i].float().abs()  # noqa: E731
    n, numel = len(taus), taus[0].numel()
    if method == "ties":
        return M.ties_plan(mag, n, numel, weights, 0.3, "total")
    if method == "ties_frequency":
        return M.ties_plan(mag, n, numel, weights, 0.3, "frequency")
    if method == "dare_ties":
        gens = [torch.Generator().manual_seed(40 + i) for i in range(n)]
        return M.dare_ties_plan(taus[0].shape, n, weights, 0.6, "total", gens)
    return M.breadcrumbs_plan(mag, n, numel, weights, 0.6, 0.15)


def _whole(method, taus, weights):
    if method.startswith("ties"):
        msm = "frequency" if method == "ties_frequency" else "total"
        return M.ties(taus, weights, 0.3, msm)
    if method == "dare_ties":
        gens = [torch.Generator().manual_seed(40 + i) for i in range(len(taus))]
        return M.dare_ties(taus, weights, 0.6, "total", gens)
    return M.breadcrumbs(taus, weights, 0.6, 0.15)


@pytest.mark.parametrize("method", ["ties", "ties_frequency", "dare_ties", "breadcrumbs"])
@pytest.mark.parametrize("slice_size", [1, 7, 64, 10_000])
@pytest.mark.parametrize("weights", [None, [0.5, 2.0, -1.0]])
def test_sliced_combine_equals_whole_tensor_with_ties_at_the_cut(method, slice_size, weights):
    taus = _coarse((31, 19), 3, seed=31)
    whole = _whole(method, taus, weights)
    plan = _plan(method, taus, weights)
    flat = [t.reshape(-1).float() for t in taus]
    parts = [plan.combine([f[s : s + slice_size] for f in flat], s) for s in range(0, flat[0].numel(), slice_size)]
    got = torch.cat(parts).view(whole.shape)
    assert torch.equal(got.view(torch.int32), whole.view(torch.int32))  # bit for bit, signed zeros included
    # a plan is one pass over the tensor: a fresh one for run()
    assert torch.equal(_plan(method, taus, weights).run(taus, torch.float32, slice_elements=slice_size), whole)


def test_ties_and_breadcrumbs_follow_the_tie_rule_on_coarse_values():
    taus = [t.float() for t in _coarse((20, 15), 3, seed=32)]
    k = int(0.3 * 300)
    trimmed = [torch.where(_first_k(t.abs(), k), t, torch.zeros(())) for t in taus]
    assert_close(M.ties(taus, None, 0.3), _peft(peft_mu.ties, trimmed, None, 1.0, "total"), rtol=0, atol=0)
    k_top, k_keep = int(0.15 * 300), int(0.6 * 300)
    band = _first_k(taus[0].abs(), k_top + k_keep) & ~_first_k(taus[0].abs(), k_top)
    assert int(band.sum()) == k_keep
    assert torch.equal(M.breadcrumbs_mask(taus[0], 0.6, 0.15), band)


def test_ties_on_a_large_tensor_matches_peft():
    """More than one internal slice (SLICE_ELEMENTS), continuous data: peft's topk selection exactly."""
    taus = _taus((M.SLICE_ELEMENTS // 512 + 3, 512), 3, seed=33)
    assert_close(M.ties(taus, [1.0, 0.5, 2.0], 0.2), _peft(peft_mu.ties, taus, [1.0, 0.5, 2.0], 0.2, "total"))


@pytest.mark.parametrize("data", ["randn", "coarse", "zeros", "tiny", "adversarial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bracketed_kth_largest_is_exact_on_large_tensors(data, dtype):
    n = M.SLICE_ELEMENTS + 4099  # above the bracketing path's size limit
    g = torch.Generator().manual_seed(34)
    x = {
        "randn": lambda: torch.randn(n, generator=g),
        "coarse": lambda: torch.randint(-8, 9, (n,), generator=g).float() / 4,
        "zeros": lambda: torch.zeros(n),
        "tiny": lambda: torch.randn(n, generator=g) * 1e-40,  # subnormals
        # every sampled entry is 0: the bracket misses and the whole-tensor fallback answers
        "adversarial": lambda: torch.randn(n, generator=g).index_fill_(0, torch.arange(0, n, 64), 0.0),
    }[data]().abs().to(dtype)
    for k in [1, 3, n // 5, n // 2, n - 1]:
        assert M.kth_largest(x, k) == float(torch.kthvalue(x, n - k + 1).values), k
    cut = M.magnitude_cut(x, n // 5)
    assert int((x > cut.threshold).sum()) + cut.ties == n // 5
