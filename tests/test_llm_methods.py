"""The LLM-era merge functions of hf_atm.merging.methods (SLERP, Model Stock, DELLA, Breadcrumbs+TIES, per-task
densities) against dense references written here from each formula (plain torch, no slicing)."""

import math

import pytest
import torch
from torch.testing import assert_close

from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.merging import methods as M


def _taus(shape, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


def _gens(n, seed=100):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _bits_equal(a, b):
    """Bit for bit (signed zeros included) for float32 / float64 tensors."""
    view = torch.int64 if a.dtype == torch.float64 else torch.int32
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


# ------------------------------------------------------------------------------------------- references
def _ref_order(mag):
    """Flat indices in the order (|x| descending, flat index ascending)."""
    return torch.sort(mag.reshape(-1), descending=True, stable=True).indices


def _ref_trim(tau, density):
    if density >= 1.0:
        return tau.clone()
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[_ref_order(tau.abs())[: int(density * tau.numel())]] = True
    return torch.where(keep.view(tau.shape), tau, torch.zeros(()))


def _ref_band(tau, density, gamma):
    n = tau.numel()
    k_top = int(gamma * n)
    k_keep = min(int(density * n), n - k_top)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[_ref_order(tau.abs())[k_top : k_top + k_keep]] = True
    return keep.view(tau.shape)


def _ref_elect_mean(values, weights=None, method="total"):
    """TIES steps 2-3, dense: unweighted vote, weighted sum of agreeing entries / count of agreeing tasks."""
    stack = torch.stack([v.double() for v in values])
    w = torch.ones(len(values), dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    w = w.view(-1, *([1] * (stack.dim() - 1)))
    vote = stack.sum(0) if method == "total" else stack.sign().sum(0)
    elected = torch.where(vote >= 0, 1.0, -1.0).double()
    agree = stack.sign() == elected
    return ((stack * w * agree).sum(0) / agree.sum(0).clamp(min=1)).float()


def _ref_ranks(tau):
    """1-based ascending magnitude ranks along dim 1 (fewer than 2 dims: one row), ties by index."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    return (torch.argsort(order, dim=1, stable=True) + 1).double(), rows.shape[1]


def _ref_della_probs(tau, density, epsilon):
    ranks, n = _ref_ranks(tau)
    return (density - epsilon + 2 * epsilon * (ranks - 1) / (n - 1)).reshape(tau.shape)


# ------------------------------------------------------------------------------------------------ SLERP
def _ref_slerp(a, b, t):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    na = na if na > 1e-8 else torch.tensor(1.0, dtype=torch.float64)
    nb = nb if nb > 1e-8 else torch.tensor(1.0, dtype=torch.float64)
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b


@pytest.mark.parametrize("shape", [(), (7,), (12, 9), (2, 3, 4)])
def test_slerp_endpoints_are_the_inputs_bit_for_bit(shape):
    a, b = _taus(shape, 2, seed=1)
    assert _bits_equal(M.slerp(a, b, 0.0), a)
    assert _bits_equal(M.slerp(a, b, 1.0), b)
    # nearly parallel (linear branch) too
    c = a * 3.0 + 1e-4
    assert _bits_equal(M.slerp(a, c, 0.0), a) and _bits_equal(M.slerp(a, c, 1.0), c)


def test_slerp_mid_value_matches_the_formula():
    a, b = _taus((30, 20), 2, seed=2)
    for t in (0.25, 0.5, 0.8):
        assert_close(M.slerp(a, b, t), _ref_slerp(a, b, t).float().view(a.shape), rtol=1e-5, atol=1e-6)
    # hand-computed: orthogonal unit-norm vectors, theta = pi/2 -> (cos(t pi/2), sin(t pi/2))
    e0, e1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 5.0])
    out = M.slerp(e0, e1, 1 / 3)
    assert_close(out, torch.tensor([2 * math.cos(math.pi / 6), 5 * math.sin(math.pi / 6)]))
    c_a, c_b = M.slerp_coefficients(e0, e1, 1 / 3)
    assert_close(torch.tensor([c_a, c_b]), torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))


def test_slerp_linear_fallback_for_parallel_and_antiparallel_tensors():
    a = _taus((50,), 1, seed=3)[0]
    noise = _taus((50,), 1, seed=4)[0]
    for b in (2.0 * a, 2.0 * a + 1e-3 * noise, -0.5 * a):  # |dot| > 0.9995
        t = 0.3
        assert_close(M.slerp(a, b, t), (1 - t) * a + t * b, rtol=1e-6, atol=1e-6)
        assert M.slerp_coefficients(a, b, t) == pytest.approx((0.7, 0.3), abs=1e-7)


def test_slerp_zero_tensor_norm_is_replaced_by_one_and_float64_kept():
    a = torch.zeros(6, dtype=torch.float64)
    b = torch.arange(6, dtype=torch.float64)
    out = M.slerp(a, b, 0.5)
    assert out.dtype == torch.float64
    # dot = 0 -> theta = pi / 2: coefficient of b is sin(pi/4)
    assert_close(out, math.sin(math.pi / 4) * b)
    assert M.slerp(torch.zeros(0), torch.zeros(0), 0.5).shape == (0,)


def test_slerp_bad_inputs_raise():
    a, b = _taus((4,), 2)
    for t in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(MergeConfigError, match=r"\bt\b"):
            M.slerp(a, b, t)
    with pytest.raises(CheckpointError, match="shape"):
        M.slerp(a, torch.zeros(5), 0.5)


# ------------------------------------------------------------------------------------------ Model Stock
def _ref_model_stock(taus):
    flat = [t.double().reshape(-1) for t in taus]
    n = len(flat)
    cos = [
        float((flat[i] @ flat[j] / max(float(flat[i].norm() * flat[j].norm()), 1e-6)).clamp(-1, 1))
        for i in range(n)
        for j in range(i + 1, n)
    ]
    c = sum(cos) / len(cos)
    den = 1 + (n - 1) * c
    t = 0.0 if abs(den) < 1e-6 else n * c / den
    return t, t * torch.stack([x.double() for x in taus]).mean(0)


def test_model_stock_identical_task_vectors_give_t_one():
    tau = _taus((9, 7), 1, seed=5)[0]
    for n in (2, 4):
        assert float(M.model_stock_ratio([tau] * n)) == pytest.approx(1.0, abs=1e-6)
        assert_close(M.model_stock([tau] * n), tau, rtol=1e-5, atol=1e-6)


def test_model_stock_orthogonal_task_vectors_give_t_zero():
    taus = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0]), torch.tensor([0.0, 0.0, -3.0])]
    assert float(M.model_stock_ratio(taus)) == 0.0
    assert torch.equal(M.model_stock(taus), torch.zeros(3))
    # singular denominator 1 + (N - 1) cos = 0 (two opposite vectors): t = 0, as mergekit
    assert float(M.model_stock_ratio([taus[0], -taus[0]])) == 0.0


@pytest.mark.parametrize("n", [2, 3, 5])
def test_model_stock_random_case_matches_reference(n):
    common = _taus((16, 11), 1, seed=6)[0]
    taus = [common + 0.8 * x for x in _taus((16, 11), n, seed=7)]
    t_ref, ref = _ref_model_stock(taus)
    assert float(M.model_stock_ratio(taus)) == pytest.approx(t_ref, rel=1e-5)
    assert_close(M.model_stock(taus), ref.float(), rtol=1e-5, atol=1e-6)


def test_model_stock_filter_wise_is_row_wise():
    common = _taus((5, 8), 1, seed=8)[0]
    taus = [common + x for x in _taus((5, 8), 3, seed=9)]
    out = M.model_stock(taus, filter_wise=True)
    t = M.model_stock_ratio(taus, filter_wise=True)
    assert t.shape == (5, 1)
    for r in range(5):
        t_ref, ref = _ref_model_stock([x[r] for x in taus])
        assert float(t[r, 0]) == pytest.approx(t_ref, rel=1e-5)
        assert_close(out[r], ref.float(), rtol=1e-5, atol=1e-6)
    v = [x[0] for x in taus]  # 1-D: one row, the same as the flat version
    assert_close(M.model_stock(v, filter_wise=True), M.model_stock(v))


def test_model_stock_needs_two_task_vectors_and_keeps_inputs():
    with pytest.raises(MergeConfigError, match="at least 2"):
        M.model_stock(_taus((3,), 1))
    taus = _taus((4, 4), 3, seed=10)
    before = [t.clone() for t in taus]
    M.model_stock(taus)
    assert all(torch.equal(a, b) for a, b in zip(taus, before))


# ----------------------------------------------------------------------------------------------- DELLA
@pytest.mark.parametrize("shape", [(40,), (12, 30), (3, 5, 7)])
@pytest.mark.parametrize("density,epsilon", [(0.5, 0.15), (0.3, 0.1), (0.6, 0.0)])
def test_della_keep_probabilities_are_linear_in_the_row_rank(shape, density, epsilon):
    tau = _taus(shape, 1, seed=11)[0]
    p = M.della_keep_probabilities(tau, density, epsilon)
    assert p.shape == tau.shape and p.dtype == torch.float32
    assert_close(p.double(), _ref_della_probs(tau, density, epsilon), rtol=0, atol=1e-7)
    assert float(p.min()) >= density - epsilon - 1e-7 and float(p.max()) <= density + epsilon + 1e-7
    rows = (tau.reshape(1, -1), p.reshape(1, -1)) if tau.dim() < 2 else (tau, p)
    order = torch.argsort(rows[0].abs(), dim=1)
    sorted_p = torch.gather(rows[1], 1, order)
    assert (sorted_p.diff(dim=1) >= 0).all()  # monotone in magnitude rank
    if epsilon > 0:
        assert (sorted_p.diff(dim=1) > 0).all()
        lo, hi = sorted_p.select(1, 0), sorted_p.select(1, -1)  # ranked along dim 1
        assert_close(lo, torch.full_like(lo, density - epsilon))
        assert_close(hi, torch.full_like(hi, density + epsilon))


def test_della_prune_keeps_tau_over_p_with_the_generator_draw():
    tau = _taus((20, 50), 1, seed=12)[0]
    p = M.della_keep_probabilities(tau, 0.4, 0.2)
    out = M.della_prune(tau, 0.4, 0.2, torch.Generator().manual_seed(5))
    u = torch.rand(tau.shape, generator=torch.Generator().manual_seed(5))
    keep = u < p
    assert torch.equal(out != 0, keep)
    assert torch.equal(out[keep], tau[keep] / p[keep])
    assert abs(float(keep.float().mean()) - 0.4) < 0.05
    # larger magnitudes are kept more often: the top half by rank beats the bottom half
    ranks, _ = _ref_ranks(tau)
    assert keep[ranks > 25].float().mean() > keep[ranks <= 25].float().mean()
    # the same seed gives the same result; inputs untouched
    before = tau.clone()
    assert torch.equal(M.della_prune(tau, 0.4, 0.2, torch.Generator().manual_seed(5)), out)
    assert torch.equal(tau, before)


def test_della_prune_rescale_modes_and_density_one():
    tau = _taus((10, 10), 1, seed=13)[0]
    masked = M.della_prune(tau, 0.5, 0.1, torch.Generator().manual_seed(1), rescale=None)
    keep = masked != 0
    assert torch.equal(masked, tau * keep)
    l1 = M.della_prune(tau, 0.5, 0.1, torch.Generator().manual_seed(1), rescale="l1")
    assert_close(l1, masked * (tau.abs().sum() / masked.abs().sum()))
    assert_close(l1.abs().sum(), tau.abs().sum())
    assert torch.equal(M.della_prune(torch.zeros(4, 4), 0.5, 0.1, rescale="l1"), torch.zeros(4, 4))
    full = M.della_prune(tau, 1.0, 0.3)  # density 1: untouched, epsilon ignored (as mergekit)
    assert torch.equal(full, tau) and full is not tau


@pytest.mark.parametrize("weights", [None, [0.5, 2.0, -1.0]])
@pytest.mark.parametrize("msm", ["total", "frequency"])
def test_della_and_della_linear_on_the_sparsified_vectors(weights, msm):
    taus = _taus((24, 17), 3, seed=14)
    dens, eps = [0.5, 0.3, 0.7], [0.1, 0.2, 0.05]
    dropped = [M.della_prune(t, d, e, g) for t, d, e, g in zip(taus, dens, eps, _gens(3))]
    lin = M.della_linear(taus, weights, dens, eps, generator=_gens(3))
    w = [1.0] * 3 if weights is None else weights
    assert_close(lin, sum(wi * d for wi, d in zip(w, dropped)))
    out = M.della(taus, weights, dens, eps, msm, generator=_gens(3))
    assert_close(out, _ref_elect_mean(dropped, weights, msm))
    # della with epsilon 0 and density 1 on the dropped vectors is exactly ties(density=1) on them
    assert torch.equal(M.ties(dropped, weights, 1.0, msm), out)
    # della_linear is a sum of per-task terms: one task at a time with its own generator
    parts = [M.della_linear([t], [wi], d, e, generator=[g]) for t, wi, d, e, g in zip(taus, w, dens, eps, _gens(3))]
    assert_close(lin, sum(parts))


def test_della_with_epsilon_zero_is_dare_with_the_same_draw():
    taus = _taus((33, 21), 3, seed=15)
    for d in (0.3, 0.7, [0.3, 0.9, 0.55]):
        assert torch.equal(M.della_linear(taus, [1.0, 0.5, 2.0], d, 0.0, _gens(3)),
                           M.dare_linear(taus, [1.0, 0.5, 2.0], d, _gens(3)))
        assert torch.equal(M.della(taus, None, d, 0.0, "total", _gens(3)), M.dare_ties(taus, None, d, "total", _gens(3)))
    t64 = taus[0].double()
    assert torch.equal(M.della_prune(t64, 0.7, 0.0, torch.Generator().manual_seed(2)),
                       M.dare_linear([t64], None, 0.7, torch.Generator().manual_seed(2)))


def test_della_shared_generator_draws_in_task_order_and_tiny_shapes():
    taus = _taus((6, 9), 2, seed=16)
    g = torch.Generator().manual_seed(3)
    shared = M.della_linear(taus, None, 0.5, 0.2, generator=g)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(shared, M.della_prune(taus[0], 0.5, 0.2, g) + M.della_prune(taus[1], 0.5, 0.2, g))
    for shape in [(), (1,), (9, 1), (1, 9)]:
        zs = [torch.zeros(shape), torch.zeros(shape)]
        assert torch.equal(M.della(zs, density=0.5, generator=_gens(2)), torch.zeros(shape))
        out = M.della_linear(_taus(shape, 2, seed=17), density=0.5, generator=_gens(2))
        assert out.shape == torch.Size(shape) and torch.isfinite(out).all()
    # one-entry rows get probability density
    assert_close(M.della_keep_probabilities(torch.ones(4, 1), 0.4, 0.1), torch.full((4, 1), 0.4))


def test_della_validation():
    taus = _taus((5,), 2)
    with pytest.raises(MergeConfigError, match="epsilon"):
        M.della(taus, density=0.5, epsilon=-0.1)
    for d, e in [(0.5, 0.5), (0.9, 0.1), (0.1, 0.1)]:  # mergekit requires density +- epsilon strictly in (0, 1)
        with pytest.raises(MergeConfigError, match="epsilon"):
            M.della_linear(taus, density=d, epsilon=e)
    M.della_linear(taus, density=1.0, epsilon=0.5)  # density 1: no drop, epsilon unchecked (as mergekit)
    with pytest.raises(MergeConfigError, match="density"):
        M.della(taus, density=0.0)
    with pytest.raises(MergeConfigError, match="rescale"):
        M.della(taus, rescale="l2")
    with pytest.raises(MergeConfigError, match="majority_sign_method"):
        M.della(taus, majority_sign_method="mode")
    with pytest.raises(MergeConfigError, match="epsilon"):
        M.della(taus, epsilon=[0.1, 0.1, 0.1])
    with pytest.raises(MergeConfigError, match=r"epsilon\[1\]"):
        M.della_linear(taus, density=[0.5, 0.5], epsilon=[0.1, 0.6])
    with pytest.raises(MergeConfigError, match="generator"):
        M.della(taus, generator=_gens(3))


# ----------------------------------------------------------------------------------- Breadcrumbs + TIES
@pytest.mark.parametrize("weights", [None, [0.5, 2.0, -1.0]])
@pytest.mark.parametrize("msm", ["total", "frequency"])
def test_breadcrumbs_ties_matches_mask_then_ties_reference(weights, msm):
    taus = _taus((30, 20), 3, seed=18)
    banded = [torch.where(_ref_band(t, 0.6, 0.1), t, torch.zeros(())) for t in taus]
    out = M.breadcrumbs_ties(taus, weights, 0.6, 0.1, msm)
    assert_close(out, _ref_elect_mean(banded, weights, msm))
    assert torch.equal(out, M.ties(banded, weights, 1.0, msm))
    assert torch.equal(M.breadcrumbs_mask(taus[0], 0.6, 0.1), _ref_band(taus[0], 0.6, 0.1))


def _coarse(shape, n, seed):
    """Values on a coarse grid: many magnitudes tie at every cut."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-8, 9, shape, generator=g).float() / 4 for _ in range(n)]


@pytest.mark.parametrize("slice_size", [1, 7, 64, 10_000])
@pytest.mark.parametrize("density,gamma", [(0.6, 0.15), ([0.5, 0.8, 0.3], [0.0, 0.1, 0.2])])
def test_breadcrumbs_ties_plan_sliced_equals_whole_tensor(slice_size, density, gamma):
    taus = _coarse((31, 19), 3, seed=19)
    weights = [0.5, 2.0, -1.0]
    whole = M.breadcrumbs_ties(taus, weights, density, gamma)
    plan = M.breadcrumbs_ties_plan(lambda i: taus[i].abs(), 3, taus[0].numel(), weights, density, gamma)
    assert isinstance(plan, M.SlicedCombine)
    flat = [t.reshape(-1) for t in taus]
    parts = [plan.combine([f[s : s + slice_size] for f in flat], s) for s in range(0, flat[0].numel(), slice_size)]
    assert _bits_equal(torch.cat(parts).view(whole.shape), whole)
    fresh = M.breadcrumbs_ties_plan(lambda i: taus[i].abs(), 3, taus[0].numel(), weights, density, gamma)
    assert _bits_equal(fresh.run(taus, torch.float32, slice_elements=slice_size), whole)


# --------------------------------------------------------------------------------- per-task densities
def test_equal_per_task_lists_are_bit_identical_to_the_scalar():
    taus = _taus((37, 23), 3, seed=20)
    w = [0.7, 1.3, -0.4]
    three = lambda x: [x] * 3  # noqa: E731
    pairs = [
        (M.ties(taus, w, 0.3), M.ties(taus, w, three(0.3))),
        (M.dare_linear(taus, w, 0.4, _gens(3)), M.dare_linear(taus, w, three(0.4), _gens(3))),
        (M.dare_ties(taus, w, 0.4, "total", _gens(3)), M.dare_ties(taus, w, (0.4, 0.4, 0.4), "total", _gens(3))),
        (M.breadcrumbs(taus, w, 0.7, 0.05), M.breadcrumbs(taus, w, three(0.7), three(0.05))),
        (M.breadcrumbs_ties(taus, w, 0.7, 0.05), M.breadcrumbs_ties(taus, w, three(0.7), three(0.05))),
        (M.della(taus, w, 0.5, 0.1, generator=_gens(3)), M.della(taus, w, three(0.5), three(0.1), generator=_gens(3))),
        (M.della_linear(taus, w, 0.5, 0.1, _gens(3)), M.della_linear(taus, w, three(0.5), three(0.1), _gens(3))),
    ]
    for i, (a, b) in enumerate(pairs):
        assert _bits_equal(a, b), i
    mag = lambda i: taus[i].abs()  # noqa: E731
    n = taus[0].numel()
    assert _bits_equal(M.ties_plan(mag, 3, n, w, 0.3).run(taus, torch.float32),
                       M.ties_plan(mag, 3, n, w, three(0.3)).run(taus, torch.float32))
    assert _bits_equal(M.breadcrumbs_plan(mag, 3, n, w, 0.7, 0.05).run(taus, torch.float32),
                       M.breadcrumbs_plan(mag, 3, n, w, three(0.7), three(0.05)).run(taus, torch.float32))
    assert _bits_equal(M.dare_ties_plan(taus[0].shape, 3, w, 0.4, generator=_gens(3)).run(taus, torch.float32),
                       M.dare_ties_plan(taus[0].shape, 3, w, three(0.4), generator=_gens(3)).run(taus, torch.float32))


@pytest.mark.parametrize("weights", [None, [1.5, 0.5]])
def test_ties_with_per_task_densities_matches_reference(weights):
    taus = _taus((25, 16), 2, seed=21)
    out = M.ties(taus, weights, [1.0, 0.1])
    ref = _ref_elect_mean([_ref_trim(taus[0], 1.0), _ref_trim(taus[1], 0.1)], weights)
    assert_close(out, ref)
    assert not torch.equal(out, M.ties(taus, weights, 0.1)) and not torch.equal(out, M.ties(taus, weights, 1.0))
    # task 0 at density 1: its magnitudes are never needed
    calls = []
    M.ties_plan(lambda i: calls.append(i) or taus[i].abs(), 2, taus[0].numel(), None, [1.0, 0.1])
    assert calls == [1]


def test_dare_and_breadcrumbs_with_per_task_options_match_references():
    taus = _taus((20, 15), 3, seed=22)
    dens = [0.3, 0.9, 0.6]
    dropped = [t * M.dare_mask(t.shape, d, g) / d for t, d, g in zip(taus, dens, _gens(3))]
    assert_close(M.dare_linear(taus, None, dens, _gens(3)), sum(dropped))
    assert_close(M.dare_ties(taus, [1.0, 2.0, 0.5], dens, "total", _gens(3)), _ref_elect_mean(dropped, [1.0, 2.0, 0.5]))
    gammas = [0.0, 0.05, 0.2]
    bands = [torch.where(_ref_band(t, d, g), t, torch.zeros(())) for t, d, g in zip(taus, dens[::-1], gammas)]
    assert_close(M.breadcrumbs(taus, [1.0, -1.0, 0.5], dens[::-1], gammas), bands[0] - bands[1] + 0.5 * bands[2])
    assert_close(M.breadcrumbs_ties(taus, None, dens[::-1], gammas), _ref_elect_mean(bands))


@pytest.mark.parametrize("call", [
    lambda ts, v: M.ties(ts, density=v),
    lambda ts, v: M.dare_linear(ts, density=v),
    lambda ts, v: M.dare_ties(ts, density=v),
    lambda ts, v: M.breadcrumbs(ts, density=v),
    lambda ts, v: M.breadcrumbs_ties(ts, density=v),
    lambda ts, v: M.della(ts, density=v, epsilon=0.05),
    lambda ts, v: M.della_linear(ts, density=v, epsilon=0.05),
    lambda ts, v: M.ties_plan(lambda i: ts[i].abs(), 2, 6, density=v),
    lambda ts, v: M.dare_ties_plan((6,), 2, density=v),
    lambda ts, v: M.breadcrumbs_plan(lambda i: ts[i].abs(), 2, 6, density=v),
    lambda ts, v: M.breadcrumbs_ties_plan(lambda i: ts[i].abs(), 2, 6, density=v),
])
def test_wrong_length_or_bad_density_lists_raise(call):
    taus = _taus((6,), 2)
    with pytest.raises(MergeConfigError, match="density has 3 entries"):
        call(taus, [0.5, 0.5, 0.5])
    with pytest.raises(MergeConfigError, match="density has 1 entries"):
        call(taus, [0.5])
    with pytest.raises(MergeConfigError, match=r"density\[1\]"):
        call(taus, [0.5, 1.5])
    with pytest.raises(MergeConfigError, match="density"):
        call(taus, "0.5")


def test_wrong_length_gamma_lists_raise():
    taus = _taus((6,), 2)
    with pytest.raises(MergeConfigError, match="gamma has 3 entries"):
        M.breadcrumbs(taus, gamma=[0.1, 0.1, 0.1])
    with pytest.raises(MergeConfigError, match=r"gamma\[0\]"):
        M.breadcrumbs_ties(taus, gamma=[1.0, 0.1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_slerp_into_the_output_dtype_equals_the_cast_of_the_float32_result(dtype):
    """The engine's form writes each chunk in the output dtype (no whole float32 copy): the same bits, and
    half-precision inputs give what their float32 values give."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3 * 2**20 + 17, generator=g).to(dtype)
    b = (a.float() + 0.3 * torch.randn(a.shape, generator=g)).to(dtype)
    got = M.slerp(a, b, 0.3, out_dtype=dtype)
    assert got.dtype == dtype
    assert torch.equal(got, M.slerp(a, b, 0.3).to(dtype))
    assert torch.equal(M.slerp(a.float(), b.float(), 0.3), M.slerp(a, b, 0.3))
