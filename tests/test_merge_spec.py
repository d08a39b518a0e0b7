"""MergeSpec validation and (de)serialisation, and the per-tensor dispatch merge_deltas / merge_tensor."""

import hashlib
import warnings

import pytest
import torch
import yaml
from peft.utils import merge_utils as peft_mu
from torch.testing import assert_close

from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.merging import methods as M
from hf_atm.merging.spec import (
    METHODS,
    MergeSpec,
    merge_deltas,
    merge_tensor,
    needs_all_task_vectors,
    per_task_transform,
    tensor_seed,
)

NAME = "encoder.layer.0.attention.self.query.weight"
SUM_METHODS = ("average", "linear", "task_arithmetic", "dare_linear", "breadcrumbs", "della_linear")


def _rand(shape, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ validate
BAD = [
    (dict(method="slerp"), 2, "method"),
    (dict(method="ties", density=0.0), 2, "density"),
    (dict(method="ties", density=1.5), 2, "density"),
    (dict(method="dare_linear", density=float("nan")), 2, "density"),
    (dict(method="ties", density="0.2"), 2, "density"),
    (dict(method="breadcrumbs", gamma=1.0), 2, "gamma"),
    (dict(method="breadcrumbs", gamma=-0.1), 2, "gamma"),
    (dict(method="breadcrumbs", density=0.95, gamma=0.1), 2, "gamma + density"),
    (dict(method="breadcrumbs", gamma=0.2), 2, "gamma + density"),  # with the default density 0.9
    (dict(weights=(1.0, 2.0, 3.0)), 2, "weights"),
    (dict(weights=(1.0, float("inf"))), 2, "weights"),
    (dict(weights=(1.0, "a")), 2, "weights"),
    (dict(method="average", weights=(1.0, -1.0)), 2, "weights"),
    (dict(scale=float("nan")), 2, "scale"),
    (dict(scale="1"), 2, "scale"),
    (dict(method="average", scale=0.5), 2, "scale"),
    (dict(method="ties", majority_sign_method="mode"), 2, "majority_sign_method"),
    (dict(method="tsv", density=0.5), 2, "density"),
    (dict(method="task_arithmetic", density=0.5), 2, "density"),
    (dict(method="ties", gamma=0.1), 2, "gamma"),
    (dict(method="dare_ties", gamma=0.1), 2, "gamma"),
    (dict(method="tsv", majority_sign_method="frequency"), 2, "majority_sign_method"),
    (dict(seed="0"), 2, "seed"),
    (dict(seed=1.5), 2, "seed"),
    (dict(), 0, "at least one model"),
]


@pytest.mark.parametrize("kwargs,n,option", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_options_raise_merge_config_error_naming_the_option(kwargs, n, option):
    with pytest.raises(MergeConfigError, match=option.replace("+", r"\+")):
        MergeSpec(**kwargs).validate(n)


def test_error_messages_list_what_is_known():
    with pytest.raises(MergeConfigError) as e:
        MergeSpec(method="frobnicate").validate(2)
    assert all(m in str(e.value) for m in METHODS)
    with pytest.raises(MergeConfigError) as e:
        MergeSpec(method="tsv", density=0.5).validate(2)
    assert "ties" in str(e.value) and "breadcrumbs" in str(e.value)


@pytest.mark.parametrize("method", METHODS)
def test_defaults_are_valid_for_every_method(method):
    spec = MergeSpec(method=method)
    spec.validate({"slerp": 1}.get(method, 3))
    assert spec.effective_density == {
        "ties": 0.2,
        "dare_linear": 0.5,
        "dare_ties": 0.5,
        "breadcrumbs": 0.9,
        "breadcrumbs_ties": 0.9,
        "della": 0.5,
        "della_linear": 0.5,
    }.get(method)
    assert spec.effective_gamma == (0.01 if method.startswith("breadcrumbs") else None)


def test_weights_list_becomes_tuple_and_unhashable_is_reported():
    spec = MergeSpec(weights=[1, 2])
    assert spec.weights == (1, 2)
    spec.validate(2)
    with pytest.raises(MergeConfigError, match="weights|plain"):
        MergeSpec(weights=[[1], [2]]).validate(2)


# ------------------------------------------------------------------------------------------- dict round trip
@pytest.mark.parametrize("method", METHODS)
def test_to_dict_round_trip_through_yaml(method):
    n = 1 if method == "slerp" else 2
    weights = None if method in ("slerp", "model_stock") else (0.5, 1.5)
    spec = MergeSpec(method=method, weights=weights)
    d = spec.to_dict()
    again = MergeSpec.from_dict(yaml.safe_load(yaml.safe_dump(d)))
    again.validate(n)
    assert again.to_dict() == d
    assert ("density" in d) == (
        method in ("ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
    )
    assert ("gamma" in d) == method.startswith("breadcrumbs")
    assert ("epsilon" in d) == method.startswith("della")
    assert ("t" in d) == (method == "slerp")
    assert ("majority_sign_method" in d) == (method in ("ties", "dare_ties", "breadcrumbs_ties", "della"))
    assert ("seed" in d) == (method.startswith("dare") or method.startswith("della"))
    assert ("scale" in d) == (method not in ("average", "linear", "slerp"))


def test_from_dict_unknown_keys_named():
    with pytest.raises(MergeConfigError, match="alpha.*lambda|lambda.*alpha"):
        MergeSpec.from_dict({"method": "ties", "lambda": 1.0, "alpha": 2})
    with pytest.raises(MergeConfigError, match="mapping"):
        MergeSpec.from_dict(["ties"])


# ------------------------------------------------------------------------------------------- tensor_seed
def test_tensor_seed_is_a_pure_function_of_seed_and_name():
    expected = int.from_bytes(hashlib.blake2b(f"7\x00{NAME}".encode(), digest_size=8).digest(), "big") & (
        2**63 - 1
    )
    assert tensor_seed(7, NAME) == expected
    assert tensor_seed(7, NAME, 0) != tensor_seed(7, NAME, 1) != tensor_seed(8, NAME, 1)
    assert tensor_seed(7, "a") != tensor_seed(7, "b")


# ------------------------------------------------------------------------------------------- merge_deltas
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_seeded_per_tensor_and_independent_of_visit_order(method):
    taus_a, taus_b = _rand((20, 30), 3, seed=1), _rand((20, 30), 3, seed=2)
    spec = MergeSpec(method=method, density=0.5, seed=3)
    a1 = merge_deltas(spec, taus_a, "a")
    b1 = merge_deltas(spec, taus_b, "b")
    b2 = merge_deltas(spec, taus_b, "b")  # visited in the other order, global RNG disturbed in between
    torch.rand(100)
    a2 = merge_deltas(spec, taus_a, "a")
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(merge_deltas(spec, taus_a, "other"), a1)
    assert not torch.equal(merge_deltas(MergeSpec(method=method, density=0.5, seed=4), taus_a, "a"), a1)
    # the dispatcher's masks are the ones seeded by (seed, name, task index)
    gens = [torch.Generator().manual_seed(tensor_seed(3, "a", i)) for i in range(3)]
    fn = M.dare_linear if method == "dare_linear" else M.dare_ties
    assert torch.equal(a1, fn(taus_a, density=0.5, generator=gens))


def test_merge_deltas_scale_weights_and_peft():
    taus = _rand((16, 8), 3, seed=5)
    w = (0.5, 1.0, 2.0)
    out = merge_deltas(MergeSpec(method="ties", weights=w, scale=0.7, density=0.4), taus, NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft_mu.ties(taus, torch.tensor(w), 0.4, "total")
    assert_close(out, 0.7 * ref)
    out = merge_deltas(MergeSpec(scale=0.25), taus, NAME)
    assert_close(out, 0.25 * (taus[0] + taus[1] + taus[2]))


def test_merge_deltas_dtypes_and_no_aliasing():
    (tau,) = _rand((4, 4), 1, seed=6)
    before = tau.clone()
    out = merge_deltas(MergeSpec(), [tau], NAME)
    out.add_(1.0)
    assert torch.equal(tau, before)
    assert merge_deltas(MergeSpec(), [tau.double()], NAME).dtype == torch.float64
    assert merge_deltas(MergeSpec(method="iso_c"), [tau.half()], NAME).dtype == torch.float32


def test_merge_deltas_shape_and_dtype_errors_name_the_tensor():
    with pytest.raises(CheckpointError, match=NAME):
        merge_deltas(MergeSpec(), [torch.zeros(3), torch.zeros(2)], NAME)
    with pytest.raises(CheckpointError, match=NAME):
        merge_deltas(MergeSpec(), [torch.zeros(3, dtype=torch.int32)], NAME)
    with pytest.raises(MergeConfigError, match="weights"):
        merge_deltas(MergeSpec(weights=(1.0,)), [torch.zeros(3), torch.zeros(3)], NAME)


# ------------------------------------------------------------------------------------------- merge_tensor
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_merge_tensor_keeps_dtype_and_matches_float32_contract(dtype, method):
    base = _rand((12, 10), 1, seed=7)[0]
    n = 1 if method == "slerp" else 3
    models = [base + 0.1 * t for t in _rand((12, 10), n, seed=8)]
    base_d, models_d = base.to(dtype), [m.to(dtype) for m in models]
    weights = None if method in ("slerp", "model_stock") else (1.0, 0.5, 2.0)
    spec = MergeSpec(method=method, weights=weights)
    out = merge_tensor(spec, base_d, models_d, NAME)
    assert out.dtype == dtype and out.shape == base.shape
    b32 = base_d.float()
    if method == "slerp":
        ref = M.slerp(b32, models_d[0].float(), 0.5)
    elif method in ("average", "linear"):
        ref = sum(w * m.float() for w, m in zip(spec.weights, models_d)) / 3.5
    else:
        ref = b32 + merge_deltas(spec, [m.float() - b32 for m in models_d], NAME)
    assert torch.equal(out, ref.to(dtype))


def test_average_without_base_and_with_deltas():
    models = _rand((5, 3), 3, seed=9, dtype=torch.float64)
    w = (1.0, 2.0, 1.0)
    mean = (models[0] + 2 * models[1] + models[2]) / 4
    out = merge_tensor(MergeSpec(method="average", weights=w), None, models, NAME)
    assert out.dtype == torch.float64
    assert_close(out, mean)
    base = _rand((5, 3), 1, seed=10, dtype=torch.float64)[0]
    delta = merge_deltas(MergeSpec(method="average", weights=w), [m - base for m in models], NAME)
    assert_close(base + delta, mean)


def test_merge_tensor_copies_non_floating_tensors_from_base():
    base = torch.arange(12).view(1, 12)
    models = [base + 1, base + 2]
    out = merge_tensor(MergeSpec(method="ties"), base, models, "embeddings.position_ids")
    assert torch.equal(out, base) and out.dtype == torch.int64
    out[0, 0] = 99
    assert base[0, 0] == 0  # a copy, not the base itself


def test_merge_tensor_errors_name_the_tensor():
    with pytest.raises(CheckpointError, match=NAME):
        merge_tensor(MergeSpec(), torch.zeros(4, 3), [torch.zeros(4, 3), torch.zeros(3, 4)], NAME)
    with pytest.raises(CheckpointError, match=NAME):
        merge_tensor(MergeSpec(), torch.zeros(3), [torch.zeros(3, dtype=torch.int64)], NAME)
    with pytest.raises(MergeConfigError, match="base"):
        merge_tensor(MergeSpec(method="tsv"), None, [torch.zeros(3)], NAME)
    with pytest.raises(MergeConfigError, match="at least one"):
        merge_tensor(MergeSpec(), torch.zeros(3), [], NAME)


# ----------------------------------------------------------------------------------- per-task decomposition
def test_needs_all_task_vectors():
    assert {m for m in METHODS if not needs_all_task_vectors(m)} == set(SUM_METHODS)
    with pytest.raises(MergeConfigError, match="method"):
        needs_all_task_vectors("frobnicate")


@pytest.mark.parametrize("method", SUM_METHODS)
@pytest.mark.parametrize("weights", [None, (0.5, 2.0, -1.0)])
def test_per_task_transform_sums_to_merge_deltas(method, weights):
    if method in ("average", "linear") and weights is not None:
        weights = (0.5, 2.0, 1.0)
    taus = _rand((25, 20), 3, seed=11)
    scale = 1.0 if method in ("average", "linear") else 0.6
    spec = MergeSpec(method=method, weights=weights, scale=scale, seed=5)
    parts = [per_task_transform(spec, t, i, NAME, num_models=3) for i, t in enumerate(taus)]
    assert_close(scale * (parts[0] + parts[1] + parts[2]), merge_deltas(spec, taus, NAME))


@pytest.mark.parametrize("method", [m for m in METHODS if m not in SUM_METHODS])
def test_per_task_transform_refuses_methods_that_need_all(method):
    with pytest.raises(MergeConfigError, match=method):
        per_task_transform(MergeSpec(method=method), torch.zeros(3), 0, NAME, num_models=2)


def test_per_task_transform_checks_index_and_count():
    with pytest.raises(MergeConfigError, match="index"):
        per_task_transform(MergeSpec(), torch.zeros(3), 2, NAME, num_models=2)
    with pytest.raises(MergeConfigError, match="num_models"):
        per_task_transform(MergeSpec(method="average"), torch.zeros(3), 0, NAME)


@pytest.mark.parametrize("spec", [MergeSpec("ties", density=0.3, scale=0.7),
                                  MergeSpec("dare_ties", density=0.6, seed=5, weights=(1.0, -0.5, 2.0)),
                                  MergeSpec("breadcrumbs", density=0.6, gamma=0.1)])
def test_plan_tensor_slices_equal_merge_tensor_with_ties_at_the_cut(spec):
    from hf_atm.merging.spec import plan_tensor

    g = torch.Generator().manual_seed(50)
    base = (torch.randint(-8, 9, (37, 11), generator=g).float() / 8).half()
    models = [base + (torch.randint(-4, 5, (37, 11), generator=g).float() / 4).half() for _ in range(3)]
    whole = merge_tensor(spec, base, models, "w")
    plan = plan_tensor(spec, base, models, "w")
    fb, fm = base.reshape(-1), [m.reshape(-1) for m in models]
    parts = [plan.merge_slice(fb[s : s + 5], [m[s : s + 5] for m in fm], s) for s in range(0, base.numel(), 5)]
    got = torch.cat(parts).view(whole.shape)
    assert got.dtype == torch.float16 and torch.equal(got.view(torch.int16), whole.view(torch.int16))
    with pytest.raises(MergeConfigError, match="sliced"):
        plan_tensor(MergeSpec("tsv"), base, models, "w")
