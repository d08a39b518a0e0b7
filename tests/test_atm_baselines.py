"""Baselines: individual fine-tuning (budget B epochs per task), one-shot merges with the scale tuned on
validation (the grid from 0, extended upward while its top scores best), joint multi-task training with mixed
batches."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from scripts.atm_data import TASK_LABELS, digits_tasks, tiny_vit

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel, finetune_individual, one_shot_merge, train_joint
from hf_atm.atm.baselines import default_scale_grid, search_scale
from hf_atm.errors import MergeConfigError

TASKS = ("digit", "parity", "high")
N = 16
ETA = 0.5
BUDGET = 2


@pytest.fixture(scope="module")
def data():
    return digits_tasks(TASKS, n_train=N, n_val=12, n_test=12, seed=4)


def make_model():
    return MultiTaskModel.from_backbone(tiny_vit(seed=2, dtype=torch.float64), {t: TASK_LABELS[t] for t in TASKS},
                                       seed=2)


def sgd_args(tmp_path, **kw):
    """Full-batch plain SGD: one optimizer step per epoch, so B epochs are B gradient steps."""
    base = dict(output_dir=str(tmp_path), rounds=BUDGET, epochs_per_round=1.0, optim="sgd", learning_rate=ETA,
                weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
                per_device_train_batch_size=N, report_to="none", disable_tqdm=True, save_strategy="no", seed=1)
    base.update(kw)
    return ATMConfig(**base)


def xy(data, task, split="train"):
    ds = data[task][split]
    return torch.tensor(ds["pixel_values"], dtype=torch.float64), torch.tensor(ds["labels"])


@pytest.fixture(scope="module")
def individual(data, tmp_path_factory):
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    res = finetune_individual(model, sgd_args(tmp_path_factory.mktemp("ind")), data)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the given model is left as it was
    return model, res


def test_individual_is_budget_epochs_of_training_on_own_data(data, individual):
    model, res = individual
    assert res.budget_epochs == BUDGET
    for task in TASKS:
        # B full-batch SGD epochs on L_task alone, computed independently
        ref = copy.deepcopy(model)
        x, y = xy(data, task)
        params = list(ref.backbone.parameters()) + list(ref.heads[task].parameters())
        for _ in range(BUDGET):
            grads = torch.autograd.grad(F.cross_entropy(ref(task=task, pixel_values=x).logits, y), params,
                                        allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is not None:
                        p -= ETA * g
        tensors = ref.backbone_tensors()
        diff = max((res.base[n] + res.task_vectors[task][n] - tensors[n]).abs().max().item() for n in tensors)
        assert diff < 1e-9
        assert torch.allclose(res.heads[task]["weight"], ref.heads[task].weight, atol=1e-9)
        assert 0.0 <= res.validation_accuracy[task] <= 1.0 and res.test_accuracy[task] is not None
    assert res.reference_accuracies("test") == res.test_accuracy
    e = res.entries["test"]
    assert e["method"] == "individual" and e["split"] == "test" and len(e["cosine"]) == 3


def assert_search_rule(out, grid, **kw):
    """`out`'s scales are those search_scale tries on its own recorded scores (a scale it did not record would
    be a KeyError), in that order, with the same choice and edge flag."""
    replay = search_scale(lambda s: out.validation_by_scale[s], grid, **kw)
    assert out.scales_tried == replay.scales_tried == list(out.validation_by_scale)
    assert (out.scale, out.at_grid_edge) == (replay.scale, replay.at_grid_edge)


def test_default_scale_grid_starts_at_zero():
    assert default_scale_grid(3) == [0.0, 0.1, 0.2, 0.3, 1 / 3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert default_scale_grid(1) == [round(0.1 * k, 10) for k in range(11)]  # 1/1 is 1.0, once
    with pytest.raises(ValueError, match="num_tasks >= 1"):
        default_scale_grid(0)


def _search(curve, grid, **kw):
    """search_scale on `curve`, checking that each scale is evaluated once, in the order reported."""
    calls = []
    out = search_scale(lambda s: calls.append(s) or curve(s), grid, **kw)
    assert calls == out.scales_tried
    return out


def test_search_walks_up_while_the_top_is_best_and_stops_at_the_first_worse_scale():
    grid = default_scale_grid(3)
    out = _search(lambda s: -((s - 1.8) ** 2), grid)  # peak above the grid: 1.75 best, 2.0 the first worse
    assert out.scales_tried == grid + [1.25, 1.5, 1.75, 2.0] and out.scale == 1.75 and not out.at_grid_edge
    out = _search(lambda s: -((s - 0.5) ** 2), grid)  # peak inside the grid: no extension
    assert out.scales_tried == grid and out.scale == 0.5 and not out.at_grid_edge
    out = _search(lambda s: -((s - 1.8) ** 2), [0.3])  # a given grid is extended from its own top
    assert out.scales_tried == [0.3, 0.55, 0.8, 1.05, 1.3, 1.55, 1.8, 2.05] and out.scale == 1.8
    assert not out.at_grid_edge  # 0.3 is the smallest tried, but not the chosen one


def test_search_stops_at_the_cap_and_says_it_is_at_the_edge():
    grid = default_scale_grid(3)
    out = _search(lambda s: s, grid)  # always better upward: every step up to max_scale 4.0
    assert out.scales_tried == grid + [1.0 + 0.25 * k for k in range(1, 13)] and out.scale == 4.0
    assert out.at_grid_edge
    out = _search(lambda s: s, [0.0, 1.0], step=0.5, max_scale=2.2)
    assert out.scales_tried == [0.0, 1.0, 1.5, 2.0] and out.scale == 2.0 and out.at_grid_edge
    out = _search(lambda s: s, [0.0, 5.0])  # a top above max_scale is not extended
    assert out.scales_tried == [0.0, 5.0] and out.scale == 5.0 and out.at_grid_edge


def test_search_without_extension_tries_exactly_the_grid():
    out = _search(lambda s: s, [1.0, 0.3, 1.0], extend=False)  # each distinct value once, ascending
    assert out.scales_tried == [0.3, 1.0] and out.scale == 1.0 and out.at_grid_edge  # could be higher
    out = _search(lambda s: -s, [1.0, 0.3], extend=False)
    assert out.scale == 0.3 and out.at_grid_edge  # the smallest tried, not 0: could be lower
    out = _search(lambda s: -s, [0.0, 0.3], extend=False)
    assert out.scale == 0.0 and not out.at_grid_edge  # 0 (the pre-trained backbone) is the lower end


def test_search_ties_keep_the_smaller_scale_and_nan_never_wins():
    out = _search(lambda s: 0.5, default_scale_grid(3))
    assert out.scale == 0.0 and out.scales_tried == default_scale_grid(3) and not out.at_grid_edge
    out = _search(lambda s: min(s, 1.5), [0.0, 1.0])  # 1.75 ties with 1.5: the walk stops, 1.5 kept
    assert out.scales_tried == [0.0, 1.0, 1.25, 1.5, 1.75] and out.scale == 1.5 and not out.at_grid_edge
    out = _search(lambda s: 0.5 + (1e-13 if s == 1.0 else 0.0), [0.5, 1.0], extend=False)
    assert out.scale == 0.5  # within 1e-12: a tie
    out = _search(lambda s: math.nan if s == 1.0 else 0.1, [0.5, 1.0])
    assert out.scale == 0.5 and math.isnan(out.validation_by_scale[1.0])
    out = _search(lambda s: math.nan, [0.5, 1.0], extend=False)
    assert out.scale == 0.5  # nothing scores: the smallest


def test_search_refuses_bad_options_by_name():
    for kw, match in (({"grid": []}, "scale_grid"), ({"grid": [0.1, math.nan]}, "scale_grid"),
                      ({"step": 0.0}, "extend_step"), ({"step": math.inf}, "extend_step"),
                      ({"max_scale": math.inf}, "max_scale")):
        kw = {"grid": [0.5], **kw}
        with pytest.raises(MergeConfigError, match=match):
            search_scale(lambda s: pytest.fail("evaluated before the options were checked"), kw.pop("grid"), **kw)


def test_one_shot_task_arithmetic_tunes_scale_on_validation(tmp_path, data, individual):
    """On this data the task vectors only hurt validation: scale 0 (the pre-trained backbone with each task's
    fine-tuned head) wins, and the grid is not extended."""
    model, res = individual
    ref = res.reference_accuracies("validation")
    out = one_shot_merge(model, res, sgd_args(tmp_path), data, "task_arithmetic", reference_accuracies=ref)
    grid = default_scale_grid(3)
    assert out.scales_tried == grid and 0.0 in out.validation_by_scale and 1.0 / 3 in out.validation_by_scale
    assert_search_rule(out, grid)
    assert out.scale == 0.0 and not out.at_grid_edge
    assert all(v < out.validation_by_scale[0.0] for s, v in out.validation_by_scale.items() if s > 0)
    merged = out.model.backbone_tensors()
    for n, t in merged.items():
        expected = res.base[n] + out.scale * sum(res.task_vectors[k][n] for k in TASKS)
        assert torch.allclose(t, expected, atol=1e-12)
    for k in TASKS:  # each task keeps its fine-tuned head
        assert torch.equal(out.model.heads[k].weight, res.heads[k]["weight"])
    # the starting model is untouched
    assert all(torch.equal(model.backbone_tensors()[n], res.base[n]) for n in merged)
    e = out.entries["validation"]
    atm_keys = {"round", "accuracy", "mean_accuracy", "normalized_accuracy", "mean_normalized_accuracy", "cosine",
                "tasks", "split", "train_seconds", "merge_seconds"}
    assert atm_keys <= set(e) and e["scale"] == out.scale and e["round"] == BUDGET
    assert e["mean_accuracy"] == pytest.approx(out.validation_by_scale[out.scale])
    assert e["normalized_accuracy"]["digit"] == pytest.approx(e["accuracy"]["digit"] / ref["digit"])
    # the merged model can start PH-ATM directly
    ph = ATMTrainer(model=out.model, args=sgd_args(tmp_path / "ph", atm_mode="ph", rounds=1, learning_rate=0.05,
                                                   per_device_train_batch_size=4), task_datasets=data)
    ph.train()
    assert [h["round"] for h in ph.history] == [0, 1]


@pytest.mark.parametrize("method,kw", [("ties", {"density": 0.5}), ("breadcrumbs", {}), ("dare_linear", {}),
                                       ("tsv", {}), ("iso_c", {})])
def test_one_shot_other_methods_same_grid(tmp_path, data, individual, method, kw):
    model, res = individual
    out = one_shot_merge(model, res, sgd_args(tmp_path), data, method, scale_grid=[0.3, 1.0], **kw)
    assert out.scales_tried[:2] == [0.3, 1.0]
    assert_search_rule(out, [0.3, 1.0])
    assert out.entries["test"]["method"] == method


def test_one_shot_extends_the_grid_above_one(tmp_path, data, individual):
    """A case whose best scale is above 1: start from the merge at scale 1 (base' = base + sum tau) with task
    vectors pointing back towards the pre-trained backbone, shortened (tau'_k = -0.9 sum tau / 3), so that
    scale s is base + (1 - 0.9 s) sum tau and s = 1/0.9 is the pre-trained backbone, which scores best here
    (see the test above). From the grid [0.5, 1.0] the walk goes up while the top is best and stops at the
    first point that is not better (1.5 ties with 1.25: the smaller is kept)."""
    model, res = individual
    total = {n: sum(res.task_vectors[k][n] for k in TASKS) for n in res.task_vectors[TASKS[0]]}
    base = {n: t + total[n] if n in total else t for n, t in res.base.items()}
    back = dataclasses.replace(res, base=base, task_vectors={k: {n: -0.9 * d / 3 for n, d in total.items()}
                                                             for k in TASKS})
    out = one_shot_merge(model, back, sgd_args(tmp_path), data, scale_grid=[0.5, 1.0])
    assert out.scales_tried == [0.5, 1.0, 1.25, 1.5] and out.scale == 1.25 and not out.at_grid_edge
    assert_search_rule(out, [0.5, 1.0])
    v = out.validation_by_scale
    assert v[0.5] < v[1.0] < v[1.25] == v[1.5]
    for n, t in out.model.backbone_tensors().items():
        assert torch.allclose(t, base[n] + 1.25 * sum(back.task_vectors[k].get(n, 0.0) for k in TASKS), atol=1e-12)
    assert out.entries["validation"]["scale"] == 1.25 and out.entries["validation"]["validation_by_scale"] == v


def test_one_shot_bad_options(tmp_path, data, individual):
    model, res = individual
    with pytest.raises(MergeConfigError, match="density"):
        one_shot_merge(model, res, sgd_args(tmp_path), data, "ties", density=1.5)
    with pytest.raises(MergeConfigError, match="unknown merge method"):
        one_shot_merge(model, res, sgd_args(tmp_path), data, "nope")
    for kw, match in (({"scale_grid": []}, "scale_grid"), ({"extend_step": -0.25}, "extend_step"),
                      ({"max_scale": math.nan}, "max_scale")):
        with pytest.raises(MergeConfigError, match=match):
            one_shot_merge(model, res, sgd_args(tmp_path), data, "task_arithmetic", **kw)


def test_joint_training_is_gd_on_the_union(tmp_path, data):
    """Full-batch joint training over the union (48 examples, mixed tasks): each epoch is one GD step on the
    mean loss over all examples, each routed to its task's head."""
    model = make_model()
    ref = copy.deepcopy(model)
    out = train_joint(model, sgd_args(tmp_path, per_device_train_batch_size=3 * N), data)
    params = list(ref.parameters())
    for _ in range(BUDGET):
        total = sum(F.cross_entropy(ref(task=t, pixel_values=xy(data, t)[0]).logits, xy(data, t)[1],
                                    reduction="sum") for t in TASKS) / (3 * N)
        grads = torch.autograd.grad(total, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p -= ETA * g
    sa, sb = out.model.state_dict(), ref.state_dict()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa if sa[k].is_floating_point()) < 1e-9
    assert {"validation", "test"} <= set(out.entries) and out.entries["test"]["method"] == "joint"


def test_baselines_leave_the_callers_requires_grad_flags(tmp_path, data):
    """freeze_heads in a baseline freezes the heads for that training only: the given model's flags (one
    backbone tensor frozen by the caller) are as they were after each baseline."""
    model = make_model()
    frozen = next(n for n, _ in model.backbone.named_parameters())
    model.backbone.get_parameter(frozen).requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    args = sgd_args(tmp_path, rounds=1, freeze_heads=True)
    ind = finetune_individual(model, args, data)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    merged = one_shot_merge(model, ind, args, data, scale_grid=[0.5], extend=False)
    assert merged.scales_tried == [0.5] and merged.at_grid_edge  # extend=False: exactly the given grid
    assert {n: p.requires_grad for n, p in merged.model.named_parameters()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    heads0 = {k: v.clone() for k, v in model.heads_state_dict().items()}
    train_joint(model, args, data)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(heads0[k], v) for k, v in model.heads_state_dict().items())  # heads were frozen


def test_baselines_refuse_fsdp(tmp_path, data):
    """The baselines read whole backbone tensors, which FSDP would shard: each refuses an FSDP config by name
    before it trains anything (ATMTrainer runs FSDP; the baselines do not)."""
    model = make_model()
    args = sgd_args(tmp_path, rounds=1, atm_parallel_mode="data_parallel", fsdp=True)
    # one_shot_merge refuses before it reads the individual results (None here: the refusal comes first)
    for run in (lambda: finetune_individual(model, args, data), lambda: train_joint(model, args, data),
                lambda: one_shot_merge(model, None, args, data)):
        with pytest.raises(ValueError, match=r"baselines .* do not run with FSDP"):
            run()
