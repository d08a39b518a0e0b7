"""Baselines: individual fine-tuning (budget B epochs per task), one-shot merges with the scale tuned on
validation, joint multi-task training with mixed batches."""

import copy

import pytest
import torch
import torch.nn.functional as F
from scripts.atm_data import TASK_LABELS, digits_tasks, tiny_vit

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel, finetune_individual, one_shot_merge, train_joint
from hf_atm.atm.baselines import default_scale_grid
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


def test_one_shot_task_arithmetic_tunes_scale_on_validation(tmp_path, data, individual):
    model, res = individual
    ref = res.reference_accuracies("validation")
    out = one_shot_merge(model, res, sgd_args(tmp_path), data, "task_arithmetic", reference_accuracies=ref)
    grid = default_scale_grid(3)
    assert set(out.validation_by_scale) == set(grid) and 1.0 / 3 in out.validation_by_scale
    best = max(out.validation_by_scale.values())
    assert out.scale == min(s for s, v in out.validation_by_scale.items() if v == best)
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
    assert set(out.validation_by_scale) == {0.3, 1.0} and out.scale in (0.3, 1.0)
    assert out.entries["test"]["method"] == method


def test_one_shot_bad_options(tmp_path, data, individual):
    model, res = individual
    with pytest.raises(MergeConfigError, match="density"):
        one_shot_merge(model, res, sgd_args(tmp_path), data, "ties", density=1.5)
    with pytest.raises(MergeConfigError, match="unknown merge method"):
        one_shot_merge(model, res, sgd_args(tmp_path), data, "nope")


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
    merged = one_shot_merge(model, ind, args, data, scale_grid=[0.5])
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
