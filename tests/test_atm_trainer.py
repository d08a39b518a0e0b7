"""ATMTrainer: the loop, logging / history / plots, resume, PH selection, LoRA, bf16, saving, bad input."""

import json
import math
import sys
import types

import pytest
import torch
from datasets import DatasetDict
from huggingface_hub import ModelCard
from scripts.atm_data import TASK_LABELS, digits_tasks, tiny_vit
from transformers import TrainerCallback

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel
from hf_atm.errors import CheckpointError, MergeConfigError, TaskDataError

TASKS = ("digit", "parity", "high")


@pytest.fixture(scope="module")
def data():
    return digits_tasks(TASKS, n_train=48, n_val=24, n_test=24, seed=0)


def make_model(dropout=0.0, seed=0):
    return MultiTaskModel.from_backbone(tiny_vit(seed=seed, hidden_dropout_prob=dropout),
                                        {t: TASK_LABELS[t] for t in TASKS}, seed=seed)


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), rounds=2, per_device_train_batch_size=16, learning_rate=3e-3,
                report_to="none", disable_tqdm=True, logging_steps=2, save_strategy="no", seed=11)
    base.update(kw)
    return ATMConfig(**base)


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs, self.steps, self.epochs_end, self.evals = [], 0, [], []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs))

    def on_step_end(self, args, state, control, **kw):
        self.steps += 1

    def on_epoch_end(self, args, state, control, **kw):
        self.epochs_end.append(state.epoch)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.evals.append(dict(metrics))


class Crash(TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_epoch_end(self, args, state, control, **kw):
        if state.epoch == self.at:
            raise RuntimeError("killed")


def test_logs_history_plots_and_metrics(tmp_path, data):
    rec = Recorder()
    ref = {"digit": 0.5, "parity": 0.8, "high": 0.8}
    tr = ATMTrainer(model=make_model(), args=make_args(tmp_path), task_datasets=data, callbacks=[rec],
                    reference_accuracies=ref)
    tr.train()
    assert [h["round"] for h in tr.history] == [0, 1, 2]
    assert rec.steps == 2 * 3 * 3  # rounds x tasks x ceil(48/16) steps
    assert rec.epochs_end == [1.0, 2.0]
    round_logs = [entry for entry in rec.logs if "round" in entry]
    assert [entry["round"] for entry in round_logs] == [0, 1, 2]
    last = round_logs[-1]
    for t in TASKS:
        assert last[f"eval_{t}_accuracy"] == tr.history[-1]["accuracy"][t]
        assert last[f"eval_{t}_normalized_accuracy"] == pytest.approx(tr.history[-1]["accuracy"][t] / ref[t])
    assert "mean_cosine" in last and "merge_seconds" in last
    assert any("digit/loss" in entry for entry in rec.logs)  # per-task training logs
    assert len(rec.evals) == 3
    h = tr.history[-1]
    cos = torch.tensor(h["cosine"])
    assert cos.shape == (3, 3) and torch.allclose(cos, cos.T) and torch.allclose(cos.diagonal(), torch.ones(3))
    assert h["tasks"] == sorted(TASKS) and h["split"] == "validation"
    assert h["mean_normalized_accuracy"] == pytest.approx(sum(h["normalized_accuracy"].values()) / 3)
    on_disk = json.loads((tmp_path / "history.json").read_text())
    assert [e["accuracy"] for e in on_disk] == [e["accuracy"] for e in tr.history]
    for png in ("accuracy.png", "cosine.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = tr.evaluate(split="test")
    assert set(m) >= {f"eval_{t}_accuracy" for t in TASKS} | {"eval_mean_accuracy", "eval_mean_normalized_accuracy"}
    assert m["eval_mean_accuracy"] == pytest.approx(sum(m[f"eval_{t}_accuracy"] for t in TASKS) / 3)


def test_cosine_of_history_matches_direct_computation(tmp_path, data):
    """The per-tensor Gram accumulation equals the cosine of the concatenated task vectors."""
    from hf_atm.atm.evaluation import pairwise_cosine

    a = {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 2.0, 1.0])}
    b = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0, -2.0, 0.0])}
    flat_a, flat_b = torch.cat([a["b"], a["w"]]), torch.cat([b["b"], b["w"]])
    expected = float(flat_a @ flat_b / flat_a.norm() / flat_b.norm())
    cos = pairwise_cosine([a, b])
    assert cos[0][1] == pytest.approx(expected) and cos[1][0] == pytest.approx(expected)


@pytest.mark.usefixtures("no_plots")  # checks training, not the plots
@pytest.mark.parametrize("reset", [True, False], ids=["fresh-optimizer", "persistent-optimizer"])
def test_resume_after_crash_is_bit_identical(tmp_path, data, reset):
    kw = dict(rounds=3, save_strategy="epoch", steps_per_round=2, reset_optimizer_each_round=reset,
              save_total_limit=2)
    full = ATMTrainer(model=make_model(dropout=0.1), args=make_args(tmp_path / "full", **kw), task_datasets=data)
    full.train()
    crashed = ATMTrainer(model=make_model(dropout=0.1), args=make_args(tmp_path / "run", **kw), task_datasets=data,
                         callbacks=[Crash(at=2.0)])
    with pytest.raises(RuntimeError, match="killed"):
        crashed.train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-round-*")) == [
        "checkpoint-round-1", "checkpoint-round-2"]
    resumed = ATMTrainer(model=make_model(dropout=0.1), args=make_args(tmp_path / "run", **kw), task_datasets=data)
    # "True" as a string is what `--resume_from_checkpoint True` gives a recipe (a str field): the latest round
    assert resumed.resolve_checkpoint("True") == tmp_path / "run" / "checkpoint-round-2"
    assert resumed.resolve_checkpoint("false") is None
    resumed.train(resume_from_checkpoint=True)
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["accuracy"] for h in full.history] == [h["accuracy"] for h in resumed.history]
    assert resumed.state.global_step == full.state.global_step == 3 * 3 * 2
    # save_total_limit=2 keeps the last two rounds
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-round-*")) == [
        "checkpoint-round-2", "checkpoint-round-3"]
    # a checkpoint from a different setup is refused
    other = ATMTrainer(model=make_model(), args=make_args(tmp_path / "run", **{**kw, "merge_method": "ties"}),
                       task_datasets=data)
    with pytest.raises(CheckpointError, match="different ATM setup"):
        other.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-round-3"))


@pytest.mark.usefixtures("no_plots")  # checks training, not the plots
def test_ph_mode_selects_best_round_on_held_out_validation(tmp_path, data):
    tr = ATMTrainer(model=make_model(), args=make_args(tmp_path, atm_mode="ph", rounds=3, learning_rate=2e-2,
                                                       ph_select_fraction=0.25), task_datasets=data)
    for t in TASKS:
        tune, sel = tr.task_data[t]["validation_tune"], tr.task_data[t]["validation_select"]
        assert len(sel) == 6 and len(tune) == 18
        # disjoint parts of validation: compare the images
        tune_x = {tuple(x.flatten().tolist()) for x in tune["pixel_values"]}
        assert not any(tuple(x.flatten().tolist()) in tune_x for x in sel["pixel_values"])
    tr.train()
    assert tr.history[-1]["split"] == "validation_select"
    scores = [h["mean_accuracy"] for h in tr.history]
    assert tr.best_round == scores.index(max(scores))
    # the model left in the trainer is the selected round's
    assert tr.evaluate()["eval_mean_accuracy"] == pytest.approx(max(scores))
    # the split is deterministic
    again = ATMTrainer(model=make_model(), args=make_args(tmp_path, atm_mode="ph", ph_select_fraction=0.25),
                       task_datasets=data)
    assert again.task_data["digit"]["validation_select"][:]["labels"].tolist() == \
        tr.task_data["digit"]["validation_select"][:]["labels"].tolist()


@pytest.mark.usefixtures("no_plots")  # checks training, not the plots
def test_lora_rounds_change_only_target_weights(tmp_path, data):
    model = make_model()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    tr = ATMTrainer(model=model, args=make_args(tmp_path, rounds=1, lora_r=2, lora_target_modules=["q_proj", "v_proj"],
                                                learning_rate=5e-2), task_datasets=data)
    tr.train()
    after = model.backbone.state_dict()
    assert set(after) == set(before)  # adapter removed, names as before
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert type(model.backbone.layers[0].attention.q_proj) is torch.nn.Linear
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert tr.history[-1]["cosine"] is not None


@pytest.mark.usefixtures("no_plots")  # checks training, not the plots
def test_gradient_accumulation_matches_bigger_batch(tmp_path, data):
    small = dict(optim="sgd", learning_rate=0.3, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                 rounds=1, merge_scale=1.0)
    a = ATMTrainer(model=make_model(), args=make_args(tmp_path / "a", per_device_train_batch_size=48, **small),
                   task_datasets=data)
    a.train()
    b = ATMTrainer(model=make_model(), args=make_args(tmp_path / "b", per_device_train_batch_size=16,
                                                      gradient_accumulation_steps=3, **small), task_datasets=data)
    b.train()
    assert a.state.global_step == b.state.global_step == 3
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-5


@pytest.mark.usefixtures("no_plots")  # checks training, not the plots
def test_bf16_autocast_is_applied(tmp_path, data):
    dtypes = []
    model = make_model()
    hook = model.backbone.layers[0].mlp.fc1.register_forward_hook(
        lambda mod, inp, out: dtypes.append(out.dtype) if mod.training else None)
    tr = ATMTrainer(model=model, args=make_args(tmp_path, rounds=1, bf16=True, use_cpu=True, steps_per_round=1),
                    task_datasets=data)
    tr.train()
    hook.remove()
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    assert next(model.parameters()).dtype == torch.float32


def test_save_model_card_and_push(tmp_path, data, monkeypatch):
    tr = ATMTrainer(model=make_model(), args=make_args(tmp_path / "out", rounds=1, hub_model_id="me/atm-digits"),
                    task_datasets=data)
    tr.train()
    tr.evaluate(split="test")
    tr.save_model(str(tmp_path / "saved"))
    saved = tmp_path / "saved"
    for f in ("model.safetensors", "config.json", "README.md", "history.json", "accuracy.png", "atm_config.json"):
        assert (saved / f).is_file(), f
    assert json.loads((saved / "config.json").read_text())["model_type"] == "hf_atm_multitask"  # backbone + heads
    card = ModelCard.load(saved / "README.md")
    assert {"hf_atm", "atm", "merge"} <= set(card.data.tags)
    # the tasks' data is local (no Hub dataset id): the card names them in its text and puts no task name in the
    # model-index, where the Hub expects dataset ids (issue 11); every task's test result is in the table
    assert not card.data.eval_results
    assert "## Results (split `test`)" in card.text
    assert all(f"`{t}`" in card.text for t in TASKS)
    reloaded = MultiTaskModel.from_pretrained(saved)
    assert torch.equal(reloaded.heads["digit"].weight, tr.model.heads["digit"].weight)

    calls = []

    def fake_push(folder, repo_id, *, private=False, revision=None, commit_message=None, token=None):
        calls.append((sorted(p.name for p in folder.iterdir()), repo_id, private))
        return "https://hub/commit/1"

    monkeypatch.setitem(sys.modules, "hf_atm.hub.push", types.SimpleNamespace(push_folder=fake_push))
    assert tr.push_to_hub() == "https://hub/commit/1"
    files, repo, private = calls[0]
    assert repo == "me/atm-digits" and "model.safetensors" in files and "README.md" in files
    assert not any(f.startswith("checkpoint") for f in files)


def test_bad_input_is_refused_before_training(tmp_path, data):
    args = make_args(tmp_path)
    empty = DatasetDict({**data["digit"], "train": data["digit"]["train"].select([])})
    with pytest.raises(TaskDataError, match="no examples"):
        ATMTrainer(model=make_model(), args=args, task_datasets={**data, "digit": empty})
    nolabel = DatasetDict({k: v.remove_columns("labels") for k, v in data["digit"].items()})
    with pytest.raises(TaskDataError, match="'labels' or 'label'"):
        ATMTrainer(model=make_model(), args=args, task_datasets={**data, "digit": nolabel})
    renamed = DatasetDict({k: v.rename_column("labels", "label") for k, v in data["digit"].items()})
    ATMTrainer(model=make_model(), args=args, task_datasets={**data, "digit": renamed})  # 'label' is fine
    with pytest.raises(TaskDataError, match="label names"):
        ATMTrainer(model=make_model(), args=args, task_datasets={**data, "parity": data["high"]})
    with pytest.raises(TaskDataError, match="no head"):
        ATMTrainer(model=make_model(), args=args, task_datasets={**data, "mod3": data["digit"]})
    with pytest.raises(MergeConfigError, match="merge_density"):
        make_args(tmp_path, merge_method="ties", merge_density=0.0)
    with pytest.raises(MergeConfigError, match="merge_weights"):
        ATMTrainer(model=make_model(), args=make_args(tmp_path, merge_weights=[1.0, 2.0]), task_datasets=data)
    with pytest.raises(KeyError, match="high"):
        ATMTrainer(model=make_model(), args=args, task_datasets=data, reference_accuracies={"digit": 0.9})
    with pytest.raises(TaskDataError, match="too few"):
        tiny = {t: DatasetDict({**dd, "validation": dd["validation"].select([0])}) for t, dd in data.items()}
        ATMTrainer(model=make_model(), args=make_args(tmp_path, atm_mode="ph"), task_datasets=tiny)


@pytest.mark.usefixtures("no_plots")  # checks training, not the plots
def test_freeze_heads_leaves_the_callers_requires_grad_flags(tmp_path, data):
    """freeze_heads freezes the heads during training only: the caller's model keeps its own flags (here one
    backbone tensor frozen by the caller, everything else trainable) and its train / eval mode."""
    model = make_model()
    frozen = next(n for n, _ in model.backbone.named_parameters())
    model.backbone.get_parameter(frozen).requires_grad_(False)
    model.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    heads0 = {k: v.clone() for k, v in model.heads_state_dict().items()}
    frozen0 = model.backbone.get_parameter(frozen).detach().clone()
    tr = ATMTrainer(model=model, args=make_args(tmp_path, rounds=1, steps_per_round=1, freeze_heads=True),
                    task_datasets=data)
    tr.train()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training
    assert all(torch.equal(heads0[k], v) for k, v in model.heads_state_dict().items())  # heads were frozen
    assert torch.equal(model.backbone.get_parameter(frozen), frozen0)  # the caller's frozen tensor too
    # a later trainer without freeze_heads trains the heads again
    ATMTrainer(model=model, args=make_args(tmp_path / "2", rounds=1, steps_per_round=1), task_datasets=data).train()
    assert not all(torch.equal(heads0[k], v) for k, v in model.heads_state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.usefixtures("no_plots")  # checks training, not the plots
def test_lora_leaves_the_callers_requires_grad_flags(tmp_path, data):
    """peft freezes the base weights while an adapter is in; the caller's flags come back as they were."""
    model = make_model()
    model.backbone.get_parameter(next(n for n, _ in model.backbone.named_parameters())).requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    args = make_args(tmp_path, rounds=1, steps_per_round=1, lora_r=2, lora_target_modules=["q_proj", "v_proj"])
    ATMTrainer(model=model, args=args, task_datasets=data).train()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _best_args(tmp_path, **kw):
    return make_args(tmp_path, rounds=3, steps_per_round=2, save_strategy="epoch", eval_strategy="epoch",
                     load_best_model_at_end=True, logging_strategy="no", **kw)


@pytest.mark.usefixtures("no_plots")  # checks training, not the plots
def test_pa_load_best_model_at_end_keeps_the_best_round(tmp_path, data):
    """A learning rate that wrecks the model: later rounds are worse on validation, so PA with
    load_best_model_at_end ends on round 0 (the starting model), not on the last round (its checkpoint)."""
    model = make_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    tr = ATMTrainer(model=model, args=_best_args(tmp_path, learning_rate=1e3), task_datasets=data)
    tr.train()
    scores = [h["mean_accuracy"] for h in tr.history]
    assert tr.best_round == scores.index(max(scores)) == 0 and max(scores[1:]) < scores[0]
    assert tr.state.best_metric == scores[0]
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())
    last = make_model()
    last.load_backbone_weights(tmp_path / "checkpoint-round-3")
    assert not all(torch.equal(start[f"backbone.{k}"], v) for k, v in last.backbone.state_dict().items())


@pytest.mark.usefixtures("no_plots")  # checks training, not the plots
def test_metric_for_best_model_and_best_checkpoint_kept_by_rotation(tmp_path, data):
    """metric_for_best_model picks the round (without the eval_ prefix, as in Trainer); the best round's
    checkpoint survives save_total_limit; the model holds that checkpoint's weights."""
    tr = ATMTrainer(model=make_model(), args=_best_args(tmp_path, learning_rate=5.0, save_total_limit=1,
                                                        metric_for_best_model="high_accuracy"),
                    task_datasets=data)
    tr.train()
    scores = [h["accuracy"]["high"] for h in tr.history]
    best = scores.index(max(scores))
    assert tr.best_round == best
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-round-*"))
    assert "checkpoint-round-3" in kept and len(kept) <= 2
    if best > 0:
        assert f"checkpoint-round-{best}" in kept
        assert tr.state.best_model_checkpoint == str(tmp_path / f"checkpoint-round-{best}")
        ref = make_model()
        ref.load_backbone_weights(tmp_path / f"checkpoint-round-{best}")
        ref.load_heads(tmp_path / f"checkpoint-round-{best}")
        sa, sb = tr.model.state_dict(), ref.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_arithmetic_task_vector_and_apply_delta():
    """task_vector is after - before in float32 (float64 kept); apply_delta_ rounds base + delta once to the
    tensor's dtype, resets names the delta lacks to base, and with base=None leaves them alone."""
    from hf_atm.atm.rounds import apply_delta_, default_merge_scale, task_vector

    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(5, generator=g).bfloat16(), "b": torch.randn(3, generator=g, dtype=torch.float64)}
    after = {k: v + 0.25 for k, v in base.items()}
    tau = task_vector(after, base)
    assert tau["a"].dtype == torch.float32 and tau["b"].dtype == torch.float64
    assert torch.equal(tau["a"], after["a"].float() - base["a"].float())
    out = {}
    assert task_vector(after, base, out) is out and torch.equal(out["b"], tau["b"])
    tensors = {k: torch.zeros_like(v) for k, v in base.items()}
    apply_delta_(tensors, base, {"a": tau["a"]})
    assert torch.equal(tensors["a"], (base["a"].float() + tau["a"]).bfloat16())
    assert torch.equal(tensors["b"], base["b"])
    apply_delta_(tensors, None, {"b": tau["b"]})
    assert torch.equal(tensors["b"], base["b"] + tau["b"])
    assert default_merge_scale("task_arithmetic", 4) == 0.25 and default_merge_scale("ties", 4) == 1.0


def test_history_entry_round_trip_and_checkpoint_rotation_spares_the_best(tmp_path):
    from hf_atm.atm.checkpoints import list_checkpoints, write_checkpoint
    from hf_atm.atm.history import HistoryEntry, load_history, write_history

    e = HistoryEntry.build(1, {"a": 0.5, "b": 1.0}, tasks=["a", "b"], split="validation",
                           reference={"a": 1.0, "b": 0.5}, cosine=[[1.0, 0.5], [0.5, 1.0]], steps=4)
    d = e.to_dict()
    assert list(d)[:9] == ["round", "accuracy", "mean_accuracy", "normalized_accuracy", "mean_normalized_accuracy",
                           "cosine", "mean_cosine", "tasks", "split"]
    assert "method" not in d and "merged_tasks" not in d  # optional fields only when set
    assert d["mean_accuracy"] == 0.75 and d["mean_normalized_accuracy"] == 1.25 and d["mean_cosine"] == 0.5
    write_history([e, {**d, "round": 2, "mean_cosine": float("nan")}], tmp_path)
    back = load_history(tmp_path)
    assert back[0] == d and back[1]["mean_cosine"] is None
    assert HistoryEntry.from_dict(back[0]) == e

    def writer(folder):
        (folder / "state.json").write_text("{}")

    for limit, expected in ((3, [1, 3, 4]), (2, [1, 4]), (1, [1, 4])):  # the best (1) and the latest stay
        for k in (1, 2, 3, 4):
            write_checkpoint(tmp_path, k, writer, state_file="state.json", save_total_limit=limit,
                             keep=tmp_path / "checkpoint-round-1")
        assert [k for k, _ in list_checkpoints(tmp_path, "state.json")] == expected
    write_checkpoint(tmp_path, 5, writer, state_file="state.json", save_total_limit=1)
    assert [k for k, _ in list_checkpoints(tmp_path, "state.json")] == [5]
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".staging-*"))


def test_tune_task_is_the_public_per_task_unit(tmp_path, data):
    """tune_task from the current weights returns theta_tuned - theta and the tuned head; the same seed from
    the same start gives the same bits (what a federated node and the in-process round rely on)."""
    model = make_model(dropout=0.1)
    tr = ATMTrainer(model=model, args=make_args(tmp_path), task_datasets=data)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    tr.begin_round(2)
    res = tr.tune_task("parity", 1, steps=2)
    assert res.task == "parity" and res.steps == 2 and res.lora_delta is None and math.isfinite(res.loss)
    after = model.backbone_tensors()
    assert all(torch.equal(res.task_vector[n], after[n] - start[f"backbone.{n}"]) for n in after)
    assert torch.equal(res.head_state["weight"], model.heads["parity"].weight)
    assert torch.equal(model.heads["digit"].weight, start["heads.digit.weight"])  # other heads untouched
    assert tr.state.epoch == 1.0
    model.load_state_dict(start)
    again = tr.tune_task("parity", 1, steps=2, seed=tr.task_seed(1, "parity"))
    assert all(torch.equal(res.task_vector[n], again.task_vector[n]) for n in after)


@pytest.mark.usefixtures("no_plots")  # checks training, not the plots
def test_push_to_hub_pushes_once_from_save_model_not_from_train(tmp_path, data, monkeypatch):
    """As with Trainer: train() pushes nothing; save_model() with push_to_hub=True pushes the saved folder once
    (it used to push from both, so every recipe run uploaded twice). The push API is a local stub here."""
    calls = []

    def fake_push(folder, repo_id, *, private=False, revision=None, commit_message=None, token=None):
        calls.append(repo_id)
        return "https://hub/commit/1"

    monkeypatch.setitem(sys.modules, "hf_atm.hub.push", types.SimpleNamespace(push_folder=fake_push))
    tr = ATMTrainer(model=make_model(), task_datasets=data,
                    args=make_args(tmp_path / "out", rounds=1, steps_per_round=1, push_to_hub=True,
                                   hub_model_id="me/atm-once"))
    tr.train()
    assert calls == []
    tr.save_model()
    assert calls == ["me/atm-once"]
