"""ATM's theory as a test: with plain SGD, full batch and one epoch per round, K rounds of ATM are K steps of
gradient descent on the sum of the task losses (sum merge), or on their mean (mean merge) -- checked on the
backbone and the heads against an independent torch.autograd computation in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from scripts.atm_data import TASK_LABELS, digits_tasks, tiny_vit

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel

# no test here looks at the PNG plots ATMTrainer writes (tested in test_atm_trainer.py): skip drawing them
pytestmark = pytest.mark.usefixtures("no_plots")

ETA = 0.5
ROUNDS = 3
N = 16


def _setup(tmp_path, merge_scale, **extra):
    data = digits_tasks(("digit", "parity", "high"), n_train=N, n_val=8, n_test=8, seed=1)
    model = MultiTaskModel.from_backbone(tiny_vit(seed=3, dtype=torch.float64), {t: TASK_LABELS[t] for t in data},
                                         seed=5)
    args = ATMConfig(
        output_dir=str(tmp_path / "out"), rounds=ROUNDS, epochs_per_round=1.0, optim="sgd",
        learning_rate=ETA, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        per_device_train_batch_size=N, merge_method="task_arithmetic", merge_scale=merge_scale,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=7, **extra,
    )
    return data, model, args


def _gd_reference(model, data, rounds, backbone_scale, freeze_heads=False):
    """`rounds` steps of GD: backbone -= ETA * backbone_scale * sum_i grad L_i; head_i -= ETA * grad L_i."""
    ref = copy.deepcopy(model)
    tasks = sorted(data)
    xs = {t: torch.tensor(data[t]["train"]["pixel_values"], dtype=torch.float64) for t in tasks}
    ys = {t: torch.tensor(data[t]["train"]["labels"]) for t in tasks}
    bb = list(ref.backbone.parameters())
    for _ in range(rounds):
        total = sum(F.cross_entropy(ref(task=t, pixel_values=xs[t]).logits, ys[t]) for t in tasks)
        heads = [] if freeze_heads else [p for t in tasks for p in ref.heads[t].parameters()]
        grads = torch.autograd.grad(total, bb + heads, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(bb, grads[: len(bb)]):
                if g is not None:
                    p -= ETA * backbone_scale * g
            for p, g in zip(heads, grads[len(bb):]):
                p -= ETA * g
    return ref


def _max_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].is_floating_point())


@pytest.mark.parametrize(
    "merge_scale,compute_cosine", [(1.0, True), (1.0, False), (None, False)], ids=["sum", "sum-allreduce", "mean"]
)
def test_atm_rounds_equal_gradient_descent(tmp_path, merge_scale, compute_cosine):
    data, model, args = _setup(tmp_path, merge_scale, compute_cosine=compute_cosine)
    n = len(data)
    backbone_scale = 1.0 if merge_scale == 1.0 else 1.0 / n
    expected = _gd_reference(model, data, ROUNDS, backbone_scale)
    start = copy.deepcopy(model)
    trainer = ATMTrainer(model=model, args=args, task_datasets=data)
    trainer.train()
    assert trainer.state.global_step == ROUNDS * n  # one full-batch step per task per round
    assert _max_diff(trainer.model, expected) < 1e-9
    assert _max_diff(trainer.model, start) > 1e-3  # it did move (the check above can fail)
    # one round fewer is clearly different: the comparison has power
    assert _max_diff(trainer.model, _gd_reference(start, data, ROUNDS - 1, backbone_scale)) > 1e-4


def test_frozen_heads_follow_gd_on_backbone_only(tmp_path):
    data, model, args = _setup(tmp_path, 1.0, freeze_heads=True)
    expected = _gd_reference(model, data, ROUNDS, 1.0, freeze_heads=True)
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    trainer = ATMTrainer(model=model, args=args, task_datasets=data)
    trainer.train()
    assert _max_diff(trainer.model, expected) < 1e-9
    for k, v in trainer.model.heads.state_dict().items():
        assert torch.equal(v, heads_before[k])
