"""The TrainingArguments contract of ATMConfig / ATMTrainer: every option is honoured, refused naming it, or
inert (``TRAINING_ARGUMENTS_CONTRACT``), the merge options come from the registry, and the honoured options
that need the trainer behave as stated (gradient checkpointing, logging, saving, best round, early stopping,
compute_metrics, predict)."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scripts.atm_data import TASK_LABELS, digits_tasks, tiny_vit
from transformers import (
    BertConfig,
    BertTokenizer,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    TrainerCallback,
    TrainingArguments,
)

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel, train_joint
from hf_atm.atm.config import (
    ATM_MERGE_METHODS,
    ATM_MERGE_OPTIONS,
    TRAINING_ARGUMENTS_CONTRACT,
    merge_field,
)
from hf_atm.atm.tuning import loader_options
from hf_atm.errors import MergeConfigError
from hf_atm.merging.registry import OPTIONS, get_method
from hf_atm.merging.spec import MergeSpec

# no test here looks at the PNG plots ATMTrainer writes (tested in test_atm_trainer.py): skip drawing them
pytestmark = pytest.mark.usefixtures("no_plots")

TASKS = ("parity", "high")

#: one refused value for every option the contract refuses in full, and the refused values of honoured ones.
REFUSED = {
    "num_train_epochs": 2.0,
    "max_steps": 1,
    "remove_unused_columns": False,
    "label_names": ["label_ids"],
    "data_seed": 3,
    "fp16": True,
    "bf16_full_eval": True,
    "fp16_full_eval": True,
    "torch_compile": True,
    "torch_compile_backend": "inductor",
    "torch_compile_mode": "default",
    "use_liger_kernel": True,
    "liger_kernel_config": {"rope": True},
    "neftune_noise_alpha": 5.0,
    "auto_find_batch_size": True,
    "include_num_input_tokens_seen": "all",
    "skip_memory_metrics": False,
    "debug": "underflow_overflow",
    "eval_steps": 10,
    "eval_delay": 1,
    "prediction_loss_only": True,
    "eval_use_gather_object": True,
    "batch_eval_metrics": True,
    "include_for_metrics": ["inputs"],
    "save_steps": 10,
    "save_only_model": True,
    "enable_jit_checkpoint": True,
    "parallelism_config": {"dp_shard_size": 2},
    # honoured options' refused values
    "eval_strategy": "steps",
    "save_strategy": "best",
    "hub_strategy": "checkpoint",
    "lr_scheduler_type": "reduce_lr_on_plateau",
    "optim": "galore_adamw_layerwise",
    "train_sampling_strategy": "group_by_length",
    # DeepSpeed (ZeRO's engine is not driven by ATM); fsdp_config without fsdp (FSDP itself: below)
    "deepspeed": {"train_batch_size": 8},
    "fsdp_config": {"version": 2},
}
MORE_REFUSED = [
    ("lr_scheduler_type", "greedy"), ("optim", "lomo"), ("optim", "adalomo"), ("optim", "schedule_free_adamw"),
    ("optim", "apollo_adamw_layerwise"), ("hub_strategy", "all_checkpoints"), ("train_sampling_strategy", "sequential"),
    ("include_num_input_tokens_seen", True),
]


def base_kwargs(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", disable_tqdm=True, save_strategy="no", seed=5)
    base.update(kw)
    return base


def make_args(tmp_path, **kw):
    defaults = dict(rounds=1, per_device_train_batch_size=16, learning_rate=3e-3, logging_steps=1)
    return ATMConfig(**base_kwargs(tmp_path, **{**defaults, **kw}))


def make_model(seed=0):
    return MultiTaskModel.from_backbone(tiny_vit(seed=seed), {t: TASK_LABELS[t] for t in TASKS}, seed=seed)


@pytest.fixture(scope="module")
def data():
    return digits_tasks(TASKS, n_train=32, n_val=16, n_test=16, seed=0)


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs, self.evals, self.saves, self.checkpointing = [], [], [], []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs))

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.evals.append(dict(metrics))

    def on_save(self, args, state, control, **kw):
        self.saves.append(state.global_step)

    def on_step_end(self, args, state, control, model=None, **kw):
        self.checkpointing.append(bool(model.backbone.is_gradient_checkpointing))


def backbone_copy(model):
    return {k: v.detach().clone() for k, v in model.backbone_tensors().items()}


# ---------------------------------------------------------------------------------------------------- the table
def test_contract_covers_every_training_arguments_field():
    names = [f.name for f in dataclasses.fields(TrainingArguments)]
    missing = sorted(set(names) - set(TRAINING_ARGUMENTS_CONTRACT))
    assert not missing, f"TrainingArguments options missing from TRAINING_ARGUMENTS_CONTRACT: {missing}"
    stale = sorted(set(TRAINING_ARGUMENTS_CONTRACT) - set(names))
    assert not stale, f"TRAINING_ARGUMENTS_CONTRACT names options TrainingArguments no longer has: {stale}"
    for name, verdict in TRAINING_ARGUMENTS_CONTRACT.items():
        kind, _, how = verdict.partition(": ")
        assert kind in ("honoured", "refused", "inert") and len(how) > 10, (name, verdict)


def test_every_refused_option_has_a_refused_example():
    refused = {n for n, v in TRAINING_ARGUMENTS_CONTRACT.items() if v.startswith("refused")}
    assert refused <= set(REFUSED), sorted(refused - set(REFUSED))


@pytest.mark.parametrize("mode", ["task_parallel", "data_parallel"])
@pytest.mark.parametrize("name,value", [*REFUSED.items(), *MORE_REFUSED], ids=lambda x: str(x))
def test_refused_options_are_refused_naming_them(tmp_path, name, value, mode):
    with pytest.raises(ValueError, match=rf"^{name}="):
        ATMConfig(**base_kwargs(tmp_path, atm_parallel_mode=mode, **{name: value}))


def test_defaults_and_accepted_values_build(tmp_path):
    ATMConfig(**base_kwargs(tmp_path))
    ATMConfig(**base_kwargs(tmp_path, save_strategy="steps"))  # TrainingArguments' default: per round in ATM
    ATMConfig(**base_kwargs(tmp_path, eval_strategy="epoch", logging_strategy="no", label_names=["labels"],
                            hub_strategy="end", optim="adamw_torch", lr_scheduler_type="cosine"))
    cfg = ATMConfig(**base_kwargs(tmp_path, atm_parallel_mode="data_parallel", fsdp="", deepspeed=None))
    assert cfg.atm_parallel_mode == "data_parallel"
    # DDP's options: bucket size and buffer broadcast go to data_parallel's gradient averaging, the others are inert
    ATMConfig(**base_kwargs(tmp_path, ddp_find_unused_parameters=True, ddp_bucket_cap_mb=10,
                            ddp_broadcast_buffers=False, ddp_static_graph=True))
    # the TrainingArguments property is not shadowed by ATM's option
    assert not isinstance(cfg.parallel_mode, str)


def test_fsdp_is_accepted_in_data_parallel_and_refused_elsewhere(tmp_path):
    """The contract says how FSDP is honoured (FSDP2 in data_parallel; the honouring itself is proven by the
    launched runs of test_atm_distributed) and every fsdp_config key is either applied or refused naming it:
    FSDP in task_parallel, fsdp_config without fsdp, keys outside ATM's sharded round (transformers' neutral
    defaults accepted), LoRA and persistent optimizers."""
    assert TRAINING_ARGUMENTS_CONTRACT["fsdp"].startswith("honoured: atm_parallel_mode='data_parallel'")
    assert TRAINING_ARGUMENTS_CONTRACT["fsdp_config"].startswith("honoured: with fsdp")
    assert TRAINING_ARGUMENTS_CONTRACT["deepspeed"].startswith("refused: ZeRO")
    cfg = ATMConfig(**base_kwargs(tmp_path, atm_parallel_mode="data_parallel", fsdp=True,
                                  fsdp_config={"version": 2, "reshard_after_forward": False,
                                               "transformer_layer_cls_to_wrap": ["ViTLayer"]}))
    assert cfg.fsdp and cfg.fsdp_config["transformer_layer_cls_to_wrap"] == ["ViTLayer"]
    neutral = {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT", "min_num_params": 0,
               "cpu_ram_efficient_loading": "false", "cpu_offload": False, "activation_checkpointing": False}
    ATMConfig(**base_kwargs(tmp_path, atm_parallel_mode="data_parallel", fsdp=True, fsdp_config=neutral))
    with pytest.raises(ValueError, match=r"^fsdp=True .*FSDP needs atm_parallel_mode='data_parallel'"):
        ATMConfig(**base_kwargs(tmp_path, fsdp=True))  # task_parallel, the default
    for key, value, match in (("version", 1, "FSDP version 1"), ("cpu_offload", True, "CPU offload"),
                              ("min_num_params", 1000, r"fsdp_config\['min_num_params'\]"),
                              ("activation_checkpointing", True, "gradient_checkpointing"),
                              ("auto_wrap_policy", "SIZE_BASED_WRAP", r"fsdp_config\['auto_wrap_policy'\]"),
                              ("auto_wrap_policy", "NO_WRAP", r"fsdp_config\['auto_wrap_policy'\]"),
                              ("state_dict_type", "SHARDED_STATE_DICT", r"fsdp_config\['state_dict_type'\]"),
                              ("cpu_ram_efficient_loading", True, r"fsdp_config\['cpu_ram_efficient_loading'\]"),
                              ("forward_prefetch", True, r"fsdp_config\['forward_prefetch'\] .*applies only"),
                              ("bogus_key", 1, r"fsdp_config\['bogus_key'\]")):
        with pytest.raises(ValueError, match=match):
            ATMConfig(**base_kwargs(tmp_path, atm_parallel_mode="data_parallel", fsdp=True,
                                    fsdp_config={key: value}))
    with pytest.raises(ValueError, match="lora_r > 0 cannot be combined with FSDP"):
        ATMConfig(**base_kwargs(tmp_path, atm_parallel_mode="data_parallel", fsdp=True, lora_r=4))
    with pytest.raises(ValueError, match="reset_optimizer_each_round=False cannot be combined with FSDP"):
        ATMConfig(**base_kwargs(tmp_path, atm_parallel_mode="data_parallel", fsdp=True,
                                reset_optimizer_each_round=False))


FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_TRANSFORMER_CLS_TO_WRAP": "ViTLayer"}


@pytest.mark.parametrize("var,value,yaml_key", [
    ("FSDP_ACTIVATION_CHECKPOINTING", "true", "fsdp_activation_checkpointing"),
    ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "fsdp_auto_wrap_policy"),
    ("FSDP_MIN_NUM_PARAMS", "100000", "fsdp_min_num_params"),
    ("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT", "fsdp_state_dict_type"),
    ("FSDP_IGNORED_MODULES", "pooler", "fsdp_ignored_modules"),
    ("FSDP_CPU_RAM_EFFICIENT_LOADING", "true", "fsdp_cpu_ram_efficient_loading"),
    ("FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params"),
    ("FSDP_VERSION", "1", "fsdp_version"),
])
def test_accelerate_fsdp_settings_atm_does_not_apply_are_refused_naming_the_yaml_key(tmp_path, data, monkeypatch,
                                                                                      var, value, yaml_key):
    """accelerate's FSDP config (the FSDP_* variables ``accelerate launch`` sets) goes through the same rules,
    checked by the trainer with any number of processes (here one, where nothing would be sharded); the
    neutral values accelerate writes are accepted."""
    for k, v in {**FSDP_ENV, "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_STATE_DICT_TYPE":
                 "FULL_STATE_DICT", "FSDP_MIN_NUM_PARAMS": "0", "FSDP_ACTIVATION_CHECKPOINTING": "false"}.items():
        monkeypatch.setenv(k, v)
    args = make_args(tmp_path, atm_parallel_mode="data_parallel")
    assert not ATMTrainer(model=make_model(), args=args, task_datasets=data).exchange.sharded  # one process
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=yaml_key if var != "FSDP_VERSION" else "fsdp_version: 2"):
        ATMTrainer(model=make_model(), args=args, task_datasets=data)


def test_accelerate_fsdp_config_rules_apply_with_one_process(tmp_path, data, monkeypatch):
    for k, v in FSDP_ENV.items():
        monkeypatch.setenv(k, v)
    for kw, match in ((dict(lora_r=4), "lora_r > 0 cannot be combined with FSDP"),
                      (dict(reset_optimizer_each_round=False), "reset_optimizer_each_round=False cannot"),
                      (dict(), "FSDP needs atm_parallel_mode='data_parallel', got atm_parallel_mode='task_parallel'")):
        mode = "task_parallel" if not kw else "data_parallel"
        with pytest.raises(ValueError, match=match):
            ATMTrainer(model=make_model(), args=make_args(tmp_path, atm_parallel_mode=mode, **kw), task_datasets=data)


def test_ddp_options_reach_the_data_parallel_exchange(tmp_path, data):
    tr = ATMTrainer(model=make_model(), args=make_args(tmp_path, atm_parallel_mode="data_parallel",
                                                       ddp_bucket_cap_mb=3, ddp_broadcast_buffers=False),
                    task_datasets=data)
    assert tr.exchange.grad_bucket_bytes == 3 * 2**20 and tr.exchange.broadcast_buffers is False
    assert not tr.exchange.sharded
    default = ATMTrainer(model=make_model(), args=make_args(tmp_path), task_datasets=data).exchange
    assert default.grad_bucket_bytes == 32 * 2**20 and default.broadcast_buffers is True


def test_best_round_needs_per_round_evaluation_and_saving(tmp_path):
    with pytest.raises(ValueError, match="load_best_model_at_end needs eval_strategy='epoch'"):
        ATMConfig(**base_kwargs(tmp_path, load_best_model_at_end=True, eval_strategy="epoch", save_strategy="steps"))
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        ATMConfig(**base_kwargs(tmp_path, load_best_model_at_end=True, eval_strategy="no", save_strategy="no"))
    cfg = ATMConfig(**base_kwargs(tmp_path, load_best_model_at_end=True, eval_strategy="epoch", save_strategy="epoch"))
    # the mean of each task's main metric (eval_mean_accuracy when every task is scored by accuracy, issue 11)
    assert cfg.metric_for_best_model == "eval_mean_score" and cfg.greater_is_better is True


@pytest.mark.parametrize("name,value", [("atm_mode", "pp"), ("atm_parallel_mode", "pipeline"),
                                        ("merge_device", "cuda"), ("merge_accumulate_dtype", "bfloat16")])
def test_atm_choices_name_the_option(tmp_path, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be one of"):
        ATMConfig(**base_kwargs(tmp_path, **{name: value}))


# ---------------------------------------------------------------------------------------------- merge options
def test_merge_options_are_the_registrys():
    read = {o for m in ATM_MERGE_METHODS for o in get_method(m).options} | {"weights"}
    assert set(ATM_MERGE_OPTIONS) == read and read <= set(OPTIONS)
    fields = {f.name: f for f in dataclasses.fields(ATMConfig)}
    for option in ATM_MERGE_OPTIONS:
        f = fields[merge_field(option)]
        readers = [m for m in ATM_MERGE_METHODS if option in get_method(m).options]
        assert all(m in f.metadata["help"] for m in readers), option
    assert "slerp" not in ATM_MERGE_METHODS and "merge_t" not in fields


def test_merge_spec_carries_every_option(tmp_path):
    cfg = ATMConfig(**base_kwargs(tmp_path, merge_method="dare_ties", merge_density=0.4, merge_seed=3,
                                  merge_majority_sign_method="frequency", merge_rescale="l1", merge_normalize=True,
                                  merge_weights=[1.0, 2.0], merge_scale=0.5))
    assert cfg.merge_spec(2) == MergeSpec(method="dare_ties", weights=(1.0, 2.0), scale=0.5, density=0.4, seed=3,
                                          majority_sign_method="frequency", rescale="l1", normalize=True)
    della = ATMConfig(**base_kwargs(tmp_path, merge_method="della", merge_epsilon=0.05))
    assert della.merge_spec(3).to_dict()["epsilon"] == 0.05
    ta = ATMConfig(**base_kwargs(tmp_path))
    assert ta.merge_spec(4).scale == 0.25 and ta.resolved_merge_scale(4) == 0.25


@pytest.mark.parametrize("kw,field", [
    ({"merge_method": "ties", "merge_density": 0.0}, "merge_density"),
    ({"merge_method": "ties", "merge_majority_sign_method": "mean"}, "merge_majority_sign_method"),
    ({"merge_method": "task_arithmetic", "merge_majority_sign_method": "frequency"}, "merge_majority_sign_method"),
    ({"merge_method": "task_arithmetic", "merge_density": 0.5}, "merge_density"),
    ({"merge_method": "della", "merge_epsilon": -0.1}, "merge_epsilon"),
    ({"merge_method": "ties", "merge_epsilon": 0.1}, "merge_epsilon"),
    ({"merge_method": "dare_linear", "merge_rescale": "l2"}, "merge_rescale"),
    ({"merge_method": "tsv", "merge_normalize": True}, "merge_normalize"),
    ({"merge_method": "average", "merge_scale": 2.0}, "merge_scale"),
    ({"merge_method": "model_stock", "merge_weights": [1.0, 1.0]}, "merge_weights"),
    ({"merge_method": "breadcrumbs", "merge_gamma": 0.5, "merge_density": 0.9}, "merge_gamma"),
    ({"merge_method": "ties", "merge_density": [0.2, 0.3], "merge_weights": [1.0, 1.0, 1.0]}, "merge_density"),
    ({"merge_method": "slerp"}, "merge_method"),
    ({"merge_method": "frankenmerge"}, "merge_method"),
])
def test_merge_errors_name_the_atmconfig_field(tmp_path, kw, field):
    with pytest.raises(MergeConfigError, match=field):
        ATMConfig(**base_kwargs(tmp_path, **kw))


# ------------------------------------------------------------------------------------------ trainer behaviour
class MetricsCalls:
    """compute_metrics recording the size of each call; "hits" is the accuracy computed from the predictions."""

    def __init__(self):
        self.sizes = []

    def __call__(self, pred):
        self.sizes.append(pred.label_ids.shape[0])
        return {"hits": float(np.mean(np.argmax(pred.predictions, -1) == pred.label_ids))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """Two rounds saved and evaluated per round, with compute_metrics and a recording callback."""
    out = tmp_path_factory.mktemp("trained")
    rec, metrics = Recorder(), MetricsCalls()
    tr = ATMTrainer(model=make_model(), args=make_args(out, rounds=2, save_strategy="epoch", eval_strategy="epoch"),
                    task_datasets=data, callbacks=[rec], compute_metrics=metrics)
    tr.train()
    return tr, rec, metrics, out


def test_on_save_fires_for_each_round_checkpoint(trained):
    tr, rec, _, out = trained
    steps = [h["steps"] for h in tr.history]
    assert rec.saves == [steps[1], steps[1] + steps[2]]
    for k in (1, 2):
        state = json.loads((out / f"checkpoint-round-{k}" / "atm_state.json").read_text())
        assert state["round"] == k


def test_compute_metrics_is_called_per_task_and_round(trained):
    tr, rec, metrics, _ = trained
    assert len(metrics.sizes) >= len(TASKS) * len(tr.history) and set(metrics.sizes) == {16}
    round_evals = [m for m in rec.evals if "eval_mean_accuracy" in m]
    assert len(round_evals) >= len(tr.history)
    for m in round_evals:
        for t in TASKS:
            assert m[f"eval_{t}_hits"] == pytest.approx(m[f"eval_{t}_accuracy"])
        assert math.isclose(m["eval_mean_hits"], np.mean([m[f"eval_{t}_hits"] for t in TASKS]))


def test_predict_per_task(trained, data):
    tr = trained[0]
    test = data["parity"]["test"]
    out = tr.predict(test, task="parity")
    assert out.predictions.shape == (len(test), len(TASK_LABELS["parity"]))
    assert np.array_equal(out.label_ids, np.asarray(test["labels"]))
    accuracy = float(np.mean(np.argmax(out.predictions, -1) == out.label_ids))
    assert accuracy == pytest.approx(tr.evaluate(split="test")["eval_parity_accuracy"])


def test_gradient_checkpointing_trains_the_same(tmp_path, data):
    results, flags = [], []
    for gc in (False, True):
        model, rec = make_model(), Recorder()
        tr = ATMTrainer(model=model, args=make_args(tmp_path / str(gc), gradient_checkpointing=gc),
                        task_datasets=data, callbacks=[rec])
        tr.train()
        results.append(backbone_copy(model))
        flags.append(rec.checkpointing)
        assert not model.backbone.is_gradient_checkpointing  # the caller's model is left as given
    assert flags[0] and not any(flags[0]) and all(flags[1])
    for name, t in results[0].items():
        torch.testing.assert_close(results[1][name], t, rtol=1e-5, atol=1e-6)


def test_logging_strategy_no_silences_round_and_step_logs(tmp_path, data):
    rec = Recorder()
    tr = ATMTrainer(model=make_model(), args=make_args(tmp_path, logging_strategy="no"),
                    task_datasets=data, callbacks=[rec])
    tr.train()
    assert len(tr.history) == 2  # the round ran and round 0 and 1 were evaluated
    assert all("train_runtime" in log for log in rec.logs), rec.logs  # only train()'s final summary
    assert len(rec.evals) >= 2  # evaluation is not logging


def test_early_stopping_stops_after_patience_rounds(tmp_path, data):
    # learning_rate 0: no round improves on round 0, so patience 1 stops after round 1
    args = make_args(tmp_path, rounds=4, learning_rate=0.0, eval_strategy="epoch", save_strategy="epoch",
                     load_best_model_at_end=True)
    tr = ATMTrainer(model=make_model(), args=args, task_datasets=data,
                    callbacks=[EarlyStoppingCallback(early_stopping_patience=1)])
    tr.train()
    assert [h["round"] for h in tr.history] == [0, 1]
    assert tr.best_round == 0


def test_load_best_model_at_end_in_pa_mode(tmp_path, data):
    model = make_model()
    start = backbone_copy(model)
    # greater_is_better=False picks the worst round: the best-round machinery must restore it, not keep the last
    args = make_args(tmp_path, learning_rate=1e-2, eval_strategy="epoch", save_strategy="epoch",
                     load_best_model_at_end=True, greater_is_better=False)
    tr = ATMTrainer(model=model, args=args, task_datasets=data)
    tr.train()
    scores = [h["mean_accuracy"] for h in tr.history]
    assert tr.best_round == int(np.argmin(scores))
    assert tr.evaluate()["eval_mean_accuracy"] == pytest.approx(scores[tr.best_round])
    if tr.best_round == 0:
        for name, t in start.items():
            assert torch.equal(model.backbone_tensors()[name], t), name


class NanLossAtStep(ATMTrainer):
    """A loss whose value is nan at optimizer step 1 (the first task's second step), its gradient the real one."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.state.global_step == 1 and not return_outputs:
            loss = loss + (torch.tensor(float("nan")) - loss).detach()
        return loss


@pytest.mark.parametrize("nan_filter", [True, False])
def test_logging_nan_inf_filter(tmp_path, data, nan_filter):
    rec = Recorder()
    tr = NanLossAtStep(model=make_model(), args=make_args(tmp_path, logging_nan_inf_filter=nan_filter),
                       task_datasets=data, callbacks=[rec])
    tr.train()
    step_losses = [v for log in rec.logs for k, v in log.items() if k.endswith("/loss")]
    assert len(step_losses) == 4  # 2 tasks x 2 steps, logging_steps=1
    assert all(math.isfinite(v) for v in step_losses) == nan_filter


def test_dataloader_worker_options_reach_the_loaders(tmp_path):
    args = ATMConfig(**base_kwargs(tmp_path, dataloader_num_workers=2, dataloader_persistent_workers=True,
                                   dataloader_prefetch_factor=3, dataloader_multiprocessing_context="spawn"))
    opts = loader_options(args)
    assert opts["num_workers"] == 2 and opts["persistent_workers"] is True
    assert opts["prefetch_factor"] == 3 and opts["multiprocessing_context"] == "spawn"


# ------------------------------------------------------------------------------------------- label smoothing
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"good bad movie film the a is was very not plot".split()]
TEXT_LABELS = {"sent": ["neg", "pos"], "topic": ["movie", "film", "plot"]}


@pytest.fixture(scope="module")
def text_data():
    """Two tiny text tasks (token ids of the words above; 'sent': whether "good" occurs, 'topic': which of
    movie / film / plot occurs) and the BERT tokenizer of those words."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

    tok = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    rng = np.random.default_rng(0)
    out = {}
    for task, names in TEXT_LABELS.items():
        splits = {}
        for split, n in (("train", 24), ("validation", 12)):
            labels = rng.integers(0, len(names), n)
            texts = []
            for y in labels:
                key = ("bad", "good")[y] if task == "sent" else names[y]
                filler = rng.choice(["the", "a", "is", "was", "very", "not"], rng.integers(1, 5)).tolist()
                texts.append(" ".join([*filler, key, *filler[:1]]))
            enc = tok(texts)
            feats = Features({"input_ids": Sequence(Value("int64")), "attention_mask": Sequence(Value("int64")),
                              "labels": ClassLabel(names=names)})
            splits[split] = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                               "labels": labels.tolist()}, features=feats)
        out[task] = DatasetDict(splits)
    return out, tok


def text_model():
    torch.manual_seed(0)
    from transformers import AutoModel

    bert = AutoModel.from_config(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    return MultiTaskModel.from_backbone(bert, TEXT_LABELS, seed=0)


def test_label_smoothing_factor_smooths_each_heads_loss(tmp_path, text_data):
    """label_smoothing_factor (an option Trainer reads next to model.config) is honoured: the ATM run's losses
    differ from the unsmoothed run's, and the loss of one batch is F.cross_entropy(label_smoothing=eps)."""
    data, tok = text_data
    eps = 0.2
    runs = {}
    for factor in (0.0, eps):
        tr = ATMTrainer(model=text_model(), args=make_args(tmp_path / str(factor), steps_per_round=2, rounds=1,
                                                           label_smoothing_factor=factor),
                        task_datasets=data, processing_class=tok)
        assert tr.label_smoother is None  # the model's per-head loss smooths, not Trainer's LabelSmoother
        tr.train()
        runs[factor] = tr
    for t in TEXT_LABELS:
        assert runs[eps].history[1]["train_loss"][t] != runs[0.0].history[1]["train_loss"][t]
    tr = runs[eps]
    model = tr.model.eval()
    batch = DataCollatorWithPadding(tok)([data["topic"]["train"][i] for i in range(8)])
    loss = tr.compute_loss(model, {**batch, "task": "topic"})
    with torch.no_grad():
        logits = model(task="topic", input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(loss.detach(), F.cross_entropy(logits, batch["labels"], label_smoothing=eps))
    assert not torch.isclose(loss.detach(), F.cross_entropy(logits, batch["labels"]))


def test_label_smoothing_in_joint_training_is_finite_and_per_head(tmp_path, text_data):
    """Joint training's mixed batches: each example is smoothed over its own head's classes (finite), not over
    the padded logits of the widest head; a label-smoothed joint run trains to finite weights."""
    data, tok = text_data
    eps = 0.1
    args = make_args(tmp_path, steps_per_round=2, rounds=1, label_smoothing_factor=eps)
    res = train_joint(text_model(), args, data, processing_class=tok)
    assert all(torch.isfinite(t).all() for t in res.model.backbone_tensors().values())
    tr = ATMTrainer(model=text_model().eval(), args=args, task_datasets=data, processing_class=tok)
    rows = [{**data[t]["train"][i], "task_ids": j} for i in range(3) for j, t in enumerate(tr.model.task_names)]
    batch = DataCollatorWithPadding(tok)(rows)
    loss = tr.compute_loss(tr.model, dict(batch))
    assert torch.isfinite(loss)
    per = []
    with torch.no_grad():
        for r in range(len(rows)):
            task = tr.model.task_names[int(batch["task_ids"][r])]
            lg = tr.model(task=task, input_ids=batch["input_ids"][r : r + 1],
                          attention_mask=batch["attention_mask"][r : r + 1]).logits
            per.append(F.cross_entropy(lg, batch["labels"][r : r + 1], label_smoothing=eps))
    torch.testing.assert_close(loss.detach(), torch.stack(per).mean(), rtol=1e-5, atol=1e-6)
