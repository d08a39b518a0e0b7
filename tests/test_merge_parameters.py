"""Per-model / per-tensor merge parameters, the method registry, mergekit's normalize convention and its YAML."""

from __future__ import annotations

import pytest
import torch
import yaml

from hf_atm.atm.config import ATM_MERGE_METHODS
from hf_atm.errors import MergeConfigError
from hf_atm.merging import methods as M
from hf_atm.merging.config import MergeConfig, from_mergekit
from hf_atm.merging.parameters import ParameterPlan, evaluate_setting, layer_index, layer_positions
from hf_atm.merging.registry import METHODS, get_method, methods_help, tensor_generators
from hf_atm.merging.spec import MergeSpec, merge_deltas, merge_tensor, per_task_transform

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.2.self_attn.q_proj.weight",
    "model.layers.3.mlp.up_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


# ------------------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("method", METHODS)
def test_every_record_is_consistent(method):
    r = get_method(method)
    assert r.name == method and r.summary and r.paper
    assert (r.per_task is not None) == r.sum_decomposable
    assert (r.plan is not None) == r.sliced
    if r.on_models:
        assert r.combine_models is not None
    else:
        assert r.combine is not None
    assert set(r.defaults) <= set(r.options)
    assert method in methods_help()
    assert (method in ATM_MERGE_METHODS) == r.in_atm


def test_slerp_is_not_an_atm_method_and_merge_deltas_says_why():
    assert "slerp" not in ATM_MERGE_METHODS
    with pytest.raises(MergeConfigError, match="base tensor"):
        merge_deltas(MergeSpec(method="slerp", t=0.5), [torch.zeros(3)])


@pytest.mark.parametrize("kwargs,n,match", [
    ({"method": "slerp", "t": 1.5}, 1, "t must be"),
    ({"method": "slerp"}, 2, "exactly 1"),
    ({"method": "model_stock"}, 1, "at least 2"),
    ({"method": "model_stock", "weights": (1.0, 2.0)}, 2, "weights: method 'model_stock' takes no weights"),
    ({"method": "tsv", "epsilon": 0.1}, 2, "epsilon: method 'tsv' takes no epsilon; only della, della_linear"),
    ({"method": "ties", "density": (0.5, 0.2, 0.1)}, 2, "density has 3 entries but there are 2 models"),
    ({"method": "ties", "density": (0.5, 1.5)}, 2, r"density must be in \(0, 1\], got 1.5"),
    ({"method": "breadcrumbs", "density": (0.9, 0.5), "gamma": (0.2, 0.1)}, 2, "gamma \\+ density"),
    ({"method": "average", "normalize": True}, 2, "normalize: method 'average' takes no normalize"),
    ({"method": "ties", "t": 0.3}, 2, "t: method 'ties' takes no t; only slerp"),
])
def test_registry_checks_name_the_option(kwargs, n, match):
    with pytest.raises(MergeConfigError, match=match):
        MergeSpec(**kwargs).validate(n)


def test_unhashable_option_is_named():
    with pytest.raises(MergeConfigError, match="density"):
        MergeSpec(method="ties", density=({"a": 1}, 0.2)).validate(2)


# ------------------------------------------------------------------------------- mergekit's normalize convention
def _mergekit_ties(base, models, weights, density, normalize):
    """mergekit 0.1.5's generalized_task_arithmetic (consensus 'sum', magnitude trim) written out densely."""
    deltas = []
    for m in models:
        d = m - base
        k = int(density * d.numel())
        if density < 1:
            keep = torch.zeros(d.numel())
            keep[torch.argsort(d.abs().reshape(-1), descending=True)[:k]] = 1
            d = d * keep.view_as(d)
        deltas.append(d)
    deltas = torch.stack(deltas)
    w = torch.tensor(weights).view(-1, *[1] * base.dim())
    deltas = deltas * w
    sign = deltas.sign()
    majority = (deltas.sum(0) >= 0).float() * 2 - 1
    mask = sign == majority
    mixed = (deltas * mask).sum(0)
    if normalize:
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return base + mixed


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_with_normalize_follows_mergekit(normalize):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 12, generator=g)
    models = [base + 0.1 * torch.randn(16, 12, generator=g) for _ in range(3)]
    weights = (0.7, 0.2, 1.3)
    spec = MergeSpec(method="ties", weights=weights, density=0.4, normalize=normalize)
    got = merge_tensor(spec, base, models, "w")
    ref = _mergekit_ties(base, models, weights, 0.4, normalize)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    peft = merge_tensor(MergeSpec(method="ties", weights=weights, density=0.4), base, models, "w")
    assert not torch.allclose(peft, got)  # the conventions differ with unit-free weights


def test_normalize_true_with_unit_weights_is_pefts_disjoint_mean():
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(40, generator=g) for _ in range(3)]
    a = merge_deltas(MergeSpec(method="ties", density=0.5), taus)
    b = merge_deltas(MergeSpec(method="ties", density=0.5, normalize=True), taus)
    torch.testing.assert_close(a, b)


def test_normalize_divides_linear_methods_by_the_weight_sum_and_stays_decomposable():
    g = torch.Generator().manual_seed(2)
    taus = [torch.randn(30, generator=g) for _ in range(3)]
    spec = MergeSpec(method="task_arithmetic", weights=(1.0, 2.0, 3.0), normalize=True, scale=0.5)
    torch.testing.assert_close(merge_deltas(spec, taus), 0.5 * (taus[0] + 2 * taus[1] + 3 * taus[2]) / 6)
    parts = [per_task_transform(spec, t, i, "x", num_models=3) for i, t in enumerate(taus)]
    torch.testing.assert_close(0.5 * sum(parts), merge_deltas(spec, taus))


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_l1_rescale_is_mergekits(method):
    g = torch.Generator().manual_seed(4)
    taus = [torch.randn(20, 30, generator=g) for _ in range(3)]
    spec = MergeSpec(method=method, density=(0.3, 0.5, 0.7), seed=9, rescale="l1")
    got = merge_deltas(spec, taus, "layer.w")
    # the same seeded masks, each kept vector scaled back to its L1 norm (mergekit's RescaleNorm.l1)
    masks = [M.dare_mask(t.shape, d, gen) for t, d, gen in
             zip(taus, (0.3, 0.5, 0.7), tensor_generators(9, "layer.w", range(3)))]
    kept = [t * m * (t.abs().sum() / (t * m).abs().sum()) for t, m in zip(taus, masks)]
    ref = M.ties(kept, density=1.0) if method == "dare_ties" else sum(kept)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    none = merge_deltas(MergeSpec(method=method, density=(0.3, 0.5, 0.7), seed=9, rescale="none"), taus, "layer.w")
    ref_none = M.ties([t * m for t, m in zip(taus, masks)], density=1.0) if method == "dare_ties" else sum(
        t * m for t, m in zip(taus, masks))
    torch.testing.assert_close(none, ref_none)
    assert spec.to_dict()["rescale"] == "l1" and MergeSpec(method=method).to_dict()["rescale"] == "probability"
    with pytest.raises(MergeConfigError, match="rescale"):
        MergeSpec(method=method, rescale="l2").validate(3)


def test_mergekit_dare_reads_rescale_as_l1():
    assert from_mergekit({"merge_method": "dare_ties", "models": []})["rescale"] == "l1"
    out = from_mergekit({"merge_method": "della", "models": [], "parameters": {"rescale": False}})
    assert out["rescale"] == "none"


def test_per_model_densities_reach_the_method():
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(50, generator=g) for _ in range(2)]
    got = merge_deltas(MergeSpec(method="ties", density=(1.0, 0.1)), taus)
    assert torch.equal(got, M.ties(taus, density=[1.0, 0.1]))
    assert not torch.equal(got, M.ties(taus, density=0.1))


# ------------------------------------------------------------------------------------------- gradients, filters
def test_layer_index_and_positions_follow_mergekit():
    assert layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_index("transformer.h.0.attn.c_attn.weight") == 0
    assert layer_index("lm_head.weight") is None
    pos = layer_positions(NAMES)
    assert pos["model.layers.0.self_attn.q_proj.weight"] == 0.0
    assert pos["model.layers.3.mlp.up_proj.weight"] == 1.0
    assert pos["model.layers.1.self_attn.q_proj.weight"] == pytest.approx(1 / 3)
    assert pos["model.embed_tokens.weight"] == pos["lm_head.weight"] == 0.0  # pre / post weights at t = 0


def test_gradient_interpolates_like_mergekit():
    grad = [0.0, 0.5, 0.3, 0.7, 1.0]
    # mergekit: scaled = t (k - 1), i0 = int(scaled), linear between the neighbours
    for x, want in [(0.0, 0.0), (1.0, 1.0), (0.25, 0.5), (0.375, 0.4), (0.9, 0.7 + 0.6 * 0.3)]:
        assert evaluate_setting(grad, "n", x) == pytest.approx(want)
    assert evaluate_setting(["a", "b"], "n", 0.99) == "a" and evaluate_setting(["a", "b"], "n", 1.0) == "b"


def test_filters_first_match_wins_and_values_may_be_gradients():
    setting = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.9}, {"value": 0.5}]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0.25) == 0.25
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.9
    assert evaluate_setting(setting, "model.norm.weight", 0.0) == 0.5


def test_plan_resolves_per_model_and_per_tensor_values():
    plan = ParameterPlan(
        MergeSpec(method="ties", scale=1.0),
        tensor_options={"scale": [{"filter": "mlp", "value": 0.5}, {"value": [1.0, 2.0]}]},
        model_options=[{"weights": 0.7, "density": 0.5}, {"weights": 0.3, "density": [0.9, 0.1]}],
    )
    specs = plan.specs(NAMES, 2)
    s0 = specs["model.layers.0.self_attn.q_proj.weight"]
    assert s0.weights == (0.7, 0.3) and s0.density == (0.5, 0.9) and s0.scale == 1.0
    s2 = specs["model.layers.2.self_attn.q_proj.weight"]
    assert s2.density == pytest.approx((0.5, 0.9 - 0.8 * 2 / 3)) and s2.scale == pytest.approx(1 + 2 / 3)
    assert specs["model.layers.3.mlp.up_proj.weight"].scale == 0.5
    assert specs["lm_head.weight"].density == (0.5, 0.9)


def test_a_model_without_its_own_value_gets_the_top_level_or_the_default():
    plan = ParameterPlan(MergeSpec(method="ties"), model_options=[{"density": 0.5}])
    assert plan.specs(NAMES, 2)[NAMES[0]].density == (0.5, 0.2)  # ties' default for the second model
    plan = ParameterPlan(MergeSpec(method="ties", density=0.3), model_options=[{}, {"weights": 2.0}])
    spec = plan.specs(NAMES, 2)[NAMES[0]]
    assert spec.density == 0.3 and spec.weights == (1.0, 2.0)


@pytest.mark.parametrize("plan,match", [
    (ParameterPlan(MergeSpec(method="slerp"), {"t": [{"filter": "mlp", "value": 0.1}]}), "no default entry"),
    (ParameterPlan(MergeSpec(method="slerp"), {"t": []}), "empty list"),
    (ParameterPlan(MergeSpec(method="slerp"), {"t": [0.0, 1.5]}), "t must be in"),
    (ParameterPlan(MergeSpec(method="ties"), model_options=[{"t": 0.1}]), r"models\[0\].parameters.t"),
    (ParameterPlan(MergeSpec(method="ties"), model_options=[{"density": {"a": 1}}]),
     r"models\[0\].parameters.density"),
    (ParameterPlan(MergeSpec(method="slerp"), {"t": [{"filter": "x", "value": 0.1, "when": 2}, {"value": 0}]}),
     "filter entry"),
])
def test_bad_settings_name_the_option(plan, match):
    with pytest.raises(MergeConfigError, match=match):
        plan.specs(NAMES, 1 if plan.spec.method == "slerp" else 2)


def test_a_gradient_needs_layered_tensor_names():
    plan = ParameterPlan(MergeSpec(method="ties"), {"density": [0.1, 0.9]})
    with pytest.raises(MergeConfigError, match="density: a layer gradient needs.*'a.weight'"):
        plan.specs(["a.weight", "b.bias"], 2)


# ------------------------------------------------------------------------------------------------ YAML configs
def _native(**extra):
    return {"base": "b", "models": ["m1", "m2"], "output": "o", **extra}


def test_native_yaml_round_trips_per_model_and_per_tensor_values():
    cfg = MergeConfig.from_dict(_native(
        method="ties",
        models=[{"model": "m1", "parameters": {"weight": 0.7, "density": 0.5}},
                {"model": "m2", "parameters": {"weight": 0.3, "density": [0.9, 0.1]}}],
        scale=[{"filter": "mlp", "value": 0.5}, {"value": 1.0}],
        tokenizer_source="union",
    ))
    assert cfg.models == ["m1", "m2"] and cfg.model_options[1] == {"weights": 0.3, "density": [0.9, 0.1]}
    assert "scale" in cfg.tensor_options and cfg.tokenizer_source == "union"
    again = MergeConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()
    assert again.parameters.specs(NAMES, 2) == cfg.parameters.specs(NAMES, 2)


def test_lora_output_format_round_trips():
    cfg = MergeConfig.from_dict({"models": ["a1", "a2"], "output": "o", "method": "ties",
                                 "output_format": "lora", "rank": 4})
    assert cfg.base is None and cfg.rank == 4
    assert MergeConfig.from_dict(yaml.safe_load(cfg.to_yaml())).to_dict() == cfg.to_dict()
    with pytest.raises(MergeConfigError, match="rank"):
        MergeConfig.from_dict({**cfg.to_dict(), "rank": 0})
    # no base: the engine takes the one LoRA adapters name, or the first model's layout for average / linear
    assert MergeConfig.from_dict(_native(base=None, method="ties")).base is None


MERGEKIT_TIES = """
merge_method: ties
base_model: /models/base
models:
  - model: /models/base
  - model: /models/a
    parameters: {weight: 0.5, density: 0.5}
  - model: /models/b
    parameters: {weight: 0.3, density: [0.9, 0.1]}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
out_dtype: float16
tokenizer_source: union
"""


def test_mergekit_yaml_is_translated():
    data = dict(yaml.safe_load(MERGEKIT_TIES), output="o")
    cfg = MergeConfig.from_dict(data)
    assert cfg.base == "/models/base" and cfg.models == ["/models/a", "/models/b"]  # the base is no model
    assert cfg.spec.method == "ties" and cfg.spec.normalize is True
    assert cfg.model_options == [{"weights": 0.5, "density": 0.5}, {"weights": 0.3, "density": [0.9, 0.1]}]
    assert cfg.dtype == "float16" and cfg.tokenizer_source == "union"
    # the written record is our own format and reads back to the same merge
    again = MergeConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again.parameters.specs(NAMES, 2) == cfg.parameters.specs(NAMES, 2)


def test_mergekit_defaults_apply_where_ours_differ():
    out = from_mergekit({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}]})
    assert out["density"] == 1.0 and out["normalize"] is True
    out = from_mergekit({"merge_method": "slerp", "base_model": "b", "models": [{"model": "a"}],
                         "parameters": {"t": [0, 1], "weight": 1.0}})
    assert out["t"] == [0, 1] and out["models"] == [{"model": "a", "parameters": {"weight": 1.0}}]


@pytest.mark.parametrize("data,match", [
    ({"merge_method": "passthrough", "slices": [{"sources": []}]}, "slices"),
    ({"merge_method": "passthrough", "models": []}, "passthrough"),
    ({"merge_method": "frob", "models": []}, "merge_method: unknown merge method 'frob'"),
    ({"merge_method": "ties", "models": [], "tokenizer": {"source": "union"}}, "tokenizer"),
    ({"merge_method": "ties", "models": [], "mystery": 1}, "mystery"),
    ({"merge_method": "ties", "models": [], "parameters": {"rescale": True}}, "rescale"),
])
def test_unsupported_mergekit_keys_are_named(data, match):
    with pytest.raises(MergeConfigError, match=match):
        from_mergekit(data)


def test_atm_config_offers_the_methods_that_merge_task_vectors(tmp_path):
    from hf_atm.atm.config import ATMConfig

    for method in ("model_stock", "della_linear", "breadcrumbs_ties"):
        cfg = ATMConfig(output_dir=str(tmp_path), merge_method=method, report_to=[])
        assert cfg.merge_spec(3).method == method
    with pytest.raises(MergeConfigError, match="slerp.*cannot merge task vectors inside ATM rounds"):
        ATMConfig(output_dir=str(tmp_path), merge_method="slerp", report_to=[])
