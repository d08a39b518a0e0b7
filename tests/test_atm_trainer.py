"""ATMTrainer: the loop, logging / history / plots, resume, PH selection, LoRA, bf16, saving, bad input."""

import json
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
    assert resumed._resolve_checkpoint("True") == tmp_path / "run" / "checkpoint-round-2"
    assert resumed._resolve_checkpoint("false") is None
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
    for f in ("model.safetensors", "heads.safetensors", "multitask_config.json", "README.md", "history.json",
              "accuracy.png", "atm_config.json"):
        assert (saved / f).is_file(), f
    card = ModelCard.load(saved / "README.md")
    assert {"hf_atm", "atm", "merge"} <= set(card.data.tags)
    results = card.data.eval_results
    assert {(r.dataset_name, r.dataset_split) for r in results} >= {(t, "test") for t in TASKS}
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
