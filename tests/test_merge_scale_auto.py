"""ATMConfig(merge_scale="auto"): the per-round line search of the merge scale (hf_atm.atm.scale_search)."""

import math

import pytest
import torch
from scripts.atm_data import TASK_LABELS, digits_tasks, tiny_vit
from transformers import HfArgumentParser, TrainerCallback

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel
from hf_atm.atm.exchange import local_exchange
from hf_atm.atm.scale_search import line_search_, pick_candidate
from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.federated.config import FederatedATMConfig

TASKS = ("digit", "parity")
K = 6  # examples of each task's slice (one evaluation batch)
S_REF = 0.5  # task_arithmetic's default scale for two tasks: the reference scale of the search


@pytest.fixture(scope="module", autouse=True)
def no_plots():
    """The PNG plots of every train() are tested elsewhere; here they would cost half of each run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("hf_atm.atm.trainer.plot_history", lambda history, folder: [])
        yield


@pytest.fixture(scope="module")
def data():
    return digits_tasks(TASKS, n_train=32, n_val=12, n_test=4, seed=1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """One round at the default scale (the reference scale of the search): theta0 + delta."""
    return run(tmp_path_factory.mktemp("reference"), data)


def make_model():
    return MultiTaskModel.from_backbone(tiny_vit(seed=0), {t: TASK_LABELS[t] for t in TASKS}, seed=0)


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), rounds=1, per_device_train_batch_size=16, per_device_eval_batch_size=12,
                learning_rate=2e-2, steps_per_round=1, report_to="none", disable_tqdm=True,
                logging_strategy="no", save_strategy="no", seed=5, merge_scale_search_examples=K)
    base.update(kw)
    return ATMConfig(**base)


def run(tmp_path, data, **kw):
    tr = ATMTrainer(model=make_model(), args=make_args(tmp_path, **kw), task_datasets=data)
    tr.train()
    return tr


def backbone(model):
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}


@torch.no_grad()
def slice_loss(model, task_data, split="validation"):
    """The mean over tasks of the model's cross entropy on the first K examples, in one batch per task."""
    model.eval()
    losses = []
    for t in TASKS:
        ds = task_data[t][split].select(range(K))
        px = torch.stack([torch.as_tensor(x) for x in ds["pixel_values"]])
        losses.append(float(model(task=t, pixel_values=px, labels=torch.as_tensor(ds["labels"])).loss))
    return sum(losses) / len(losses)


class Crash(TrainerCallback):
    def on_epoch_end(self, args, state, control, **kw):
        if state.epoch == 1.0:
            raise RuntimeError("killed")


# ------------------------------------------------------------------------------------------------ the search
def test_auto_picks_the_candidate_with_the_lowest_slice_loss(tmp_path, data, reference):
    theta0 = backbone(make_model())
    fixed = reference
    delta = {k: v.double() - theta0[k].double() for k, v in backbone(fixed.model).items()}
    candidates = [2.0, 0.2, 0.9]  # unsorted and without the reference scale: every candidate is rescaled
    auto = run(tmp_path / "auto", data, merge_scale="auto", merge_scale_candidates=candidates)
    entry = auto.history[1]
    assert list(entry["scale_search"]) == ["0.2", "0.9", "2.0"]
    # each candidate's loss recomputed here, from theta0 + (scale / s_ref) * delta, with the same (tuned) heads
    probe = make_model()
    probe.load_heads(fixed.model)  # the tuned heads (never merged nor scaled)
    recomputed = {}
    for s in sorted(candidates):
        probe.backbone.load_state_dict({k: (theta0[k].double() + s / S_REF * d).float() for k, d in delta.items()})
        recomputed[s] = slice_loss(probe, fixed.task_data)
        assert entry["scale_search"][str(s)] == pytest.approx(recomputed[s], rel=1e-4), s
    best = min(recomputed, key=recomputed.get)
    assert entry["merge_scale"] == best
    assert entry["scale_search"][str(best)] == min(entry["scale_search"].values())
    # the round's weights are the winner's
    after = backbone(auto.model)
    for k, d in delta.items():
        torch.testing.assert_close(after[k].double(), theta0[k].double() + best / S_REF * d, atol=2e-6, rtol=0)
    heads_a, heads_f = auto.model.heads_state_dict(), fixed.model.heads_state_dict()
    assert all(torch.equal(heads_a[k], heads_f[k]) for k in heads_f)  # heads are never merged nor scaled
    assert 0 < entry["scale_search_seconds"] <= entry["merge_seconds"]
    assert auto.timing["merge"] >= entry["merge_seconds"]


class SliceLossAtRoundEnd(TrainerCallback):
    """The slice loss of the model as each round leaves it (before any best-round selection)."""

    def __init__(self):
        self.trainer, self.losses = None, []

    def on_epoch_end(self, args, state, control, model=None, **kw):
        self.losses.append(slice_loss(model, self.trainer.task_data, self.trainer.round_split))


def test_ph_mode_searches_on_the_held_out_selection_part(tmp_path, data):
    probe = SliceLossAtRoundEnd()
    tr = ATMTrainer(model=make_model(), args=make_args(tmp_path, atm_mode="ph", ph_select_fraction=0.5,
                                                       merge_scale="auto", merge_scale_candidates=[0.25, 1.5]),
                    task_datasets=data, callbacks=[probe])
    probe.trainer = tr
    assert tr.round_split == "validation_select" and len(tr.task_data["digit"]["validation_select"]) == K
    tr.train()
    entry = tr.history[1]
    # the round leaves the model at the chosen candidate, whose recorded loss is that of the selection part
    assert entry["scale_search"][str(entry["merge_scale"])] == pytest.approx(probe.losses[0], rel=1e-6)


def test_pick_candidate_ties_go_to_the_smaller_scale_and_nan_never_wins():
    assert pick_candidate([1.0, 0.5, 0.5, 2.0]) == 1
    assert pick_candidate([math.nan, 3.0, 2.0]) == 2
    assert pick_candidate([1.0, math.nan, 1.0]) == 0
    assert pick_candidate([math.nan, math.nan]) == 0


# ------------------------------------------------------------------------------------------------ the options
def parse(tmp_path, *argv):
    (cfg,) = HfArgumentParser(ATMConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none", *argv])
    return cfg


def test_merge_scale_parses_from_the_command_line(tmp_path):
    assert parse(tmp_path, "--merge_scale", "auto").merge_scale == "auto"
    cfg = parse(tmp_path, "--merge_scale", "0.5")
    assert cfg.merge_scale == 0.5 and isinstance(cfg.merge_scale, float) and cfg.merge_spec(4).scale == 0.5
    assert cfg.merge_scale_search(4) is None
    assert parse(tmp_path).merge_scale is None
    cfg = parse(tmp_path, "--merge_scale", "auto", "--merge_scale_candidates", "0.5", "0.1",
                "--merge_scale_search_examples", "16")
    assert cfg.merge_scale_candidates == [0.5, 0.1] and cfg.merge_scale_search(4) == [0.1, 0.5]
    assert cfg.merge_scale_search_examples == 16
    with pytest.raises(ValueError, match="^merge_scale must be a number or 'auto', got 'big'"):
        parse(tmp_path, "--merge_scale", "big")


def test_auto_defaults_and_the_reference_scale(tmp_path):
    cfg = make_args(tmp_path, merge_scale="auto")
    # multiples {0.5, 1, 1.5, 2, 3, 4} of the method's default scale (1/4 for task_arithmetic with 4 tasks)
    assert cfg.merge_scale_search(4) == [0.125, 0.25, 0.375, 0.5, 0.75, 1.0]
    assert cfg.resolved_merge_scale(4) == 0.25 and cfg.merge_spec(4).scale == 0.25  # built at the reference
    ties = make_args(tmp_path, merge_scale="auto", merge_method="ties", merge_density=0.5)
    assert ties.merge_scale_search(3) == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0] and ties.merge_spec(3).scale == 1.0


@pytest.mark.parametrize("kw,match", [
    ({"merge_scale_candidates": [0.5]}, "merge_scale_candidates is read only with merge_scale='auto'"),
    ({"merge_scale": 0.3, "merge_scale_candidates": [0.5]}, "merge_scale_candidates is read only"),
    ({"merge_scale": "auto", "merge_scale_candidates": [0.5, 0.0]}, "merge_scale_candidates: every scale"),
    ({"merge_scale": "auto", "merge_scale_candidates": [float("nan")]}, "merge_scale_candidates: every scale"),
    ({"merge_scale": "auto", "merge_scale_candidates": [-1.0]}, "merge_scale_candidates: every scale"),
    ({"merge_scale": "auto", "merge_scale_candidates": []}, "merge_scale_candidates must be a non-empty list"),
    ({"merge_scale": "auto", "merge_scale_search_examples": 0}, "merge_scale_search_examples must be"),
    ({"merge_scale": True}, "merge_scale must be a number or 'auto'"),
])
def test_bad_search_options_are_refused_by_name(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **kw)


def test_refusals_name_the_option_and_the_reason(tmp_path, monkeypatch):
    with pytest.raises(MergeConfigError, match="merge_scale: method 'average' takes no scale"):
        make_args(tmp_path, merge_scale="auto", merge_method="average")
    with pytest.raises(ValueError, match="merge_scale='auto' is not supported with FSDP"):
        make_args(tmp_path, merge_scale="auto", fsdp=True, atm_parallel_mode="data_parallel")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate's FSDP config
    with pytest.raises(ValueError, match="merge_scale='auto' is not supported with FSDP"):
        make_args(tmp_path, merge_scale="auto", atm_parallel_mode="data_parallel")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(ValueError, match="train_args: merge_scale='auto' is not supported federated"):
        FederatedATMConfig(model="org/name", train_args={"merge_scale": "auto"})
    ex = local_exchange(list(TASKS))
    ex.sharded = True  # what prepare_sharding marks: the search itself refuses a sharded backbone
    t = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="FSDP-sharded backbone"):
        line_search_(t, dict(t), {"w": torch.ones(2)}, reference=1.0, scales=[1.0], objective=lambda: None,
                     exchange=ex, device="cpu")


# ------------------------------------------------------------------------------------------------ bit-identity
def test_fixed_scales_are_recorded_and_unchanged(tmp_path, data, reference):
    default = reference
    explicit = run(tmp_path / "explicit", data, merge_scale=S_REF)
    # auto with the reference scale as its only candidate applies the collector's delta itself
    only_ref = run(tmp_path / "auto", data, merge_scale="auto", merge_scale_candidates=[S_REF])
    sd = default.model.state_dict()
    for other in (explicit, only_ref):
        assert all(torch.equal(sd[k], v) for k, v in other.model.state_dict().items())
    timing = ("train_seconds", "merge_seconds", "setup_seconds", "eval_seconds", "scale_search_seconds")

    def plain(h):
        return [{k: v for k, v in e.items() if k not in timing and k != "scale_search"} for e in h]

    assert plain(default.history) == plain(explicit.history) == plain(only_ref.history)
    assert "merge_scale" not in default.history[0]  # round 0 merges nothing
    assert [e["merge_scale"] for e in default.history[1:]] == [S_REF]
    assert all("scale_search" not in e for e in default.history + explicit.history)
    assert [list(e["scale_search"]) for e in only_ref.history[1:]] == [[str(S_REF)]]


def test_lora_rounds_search_relative_to_the_round_start(tmp_path, data):
    lora = dict(lora_r=2, lora_target_modules=["q_proj", "v_proj"], learning_rate=5e-2)
    theta0 = backbone(make_model())
    fixed = run(tmp_path / "fixed", data, **lora)
    auto = run(tmp_path / "auto", data, merge_scale="auto", merge_scale_candidates=[0.25, 2.0], **lora)
    ref, after = backbone(fixed.model), backbone(auto.model)
    changed = {k for k in theta0 if not torch.equal(theta0[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    chosen = auto.history[1]["merge_scale"]
    assert chosen in (0.25, 2.0) and set(auto.history[1]["scale_search"]) == {"0.25", "2.0"}
    for k in theta0:
        d = ref[k].double() - theta0[k].double()
        torch.testing.assert_close(after[k].double(), theta0[k].double() + chosen / S_REF * d, atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ resume
def test_resume_with_auto_is_bit_identical(tmp_path, data):
    kw = dict(rounds=2, save_strategy="epoch", merge_scale="auto", merge_scale_candidates=[0.25, 1.0])
    full = run(tmp_path / "full", data, **kw)
    crashed = ATMTrainer(model=make_model(), args=make_args(tmp_path / "run", **kw), task_datasets=data,
                         callbacks=[Crash()])
    with pytest.raises(RuntimeError, match="killed"):
        crashed.train()
    resumed = ATMTrainer(model=make_model(), args=make_args(tmp_path / "run", **kw), task_datasets=data)
    resumed.train(resume_from_checkpoint=True)
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [(h.get("merge_scale"), h.get("scale_search")) for h in full.history] == \
        [(h.get("merge_scale"), h.get("scale_search")) for h in resumed.history]
    # a checkpoint of an auto run is not resumed by another candidate set (nor a fixed scale: the fingerprint)
    other = ATMTrainer(model=make_model(), args=make_args(tmp_path / "run", **{**kw, "merge_scale_candidates": [0.5]}),
                       task_datasets=data)
    with pytest.raises(CheckpointError, match="different ATM setup"):
        other.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-round-1"))


def test_task_loss_is_the_models_own_loss_in_eval_mode(reference):
    """ATMTrainer.task_loss (benchmarks/reproduce.py's multi-task training loss per round) is the task head's
    cross entropy in eval mode, with the model's mode left as it was; NaN on no examples."""
    tr = reference
    for t in TASKS:
        ds = tr.task_data[t]["validation"]
        tr.model.train()
        got = tr.task_loss(t, ds)
        assert tr.model.training
        with torch.no_grad():
            tr.model.eval()
            px = torch.stack([torch.as_tensor(x) for x in ds["pixel_values"]])
            want = float(tr.model(task=t, pixel_values=px, labels=torch.as_tensor(ds["labels"])).loss)
        assert got == pytest.approx(want, rel=1e-6)
    assert math.isnan(tr.task_loss(TASKS[0], tr.task_data[TASKS[0]]["validation"].select([])))
