"""Regression tasks (STS-B-like): one-output heads with an MSE loss, float labels checked, Pearson scores in an
ATM run's history with round selection by the mean score, joint training over mixed batches of both kinds,
the problem types saved and reloaded, bad input refused, and hub-glue's STS-B loaded as a regression."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, Value
from helpers import bert_config
from scipy.stats import pearsonr
from transformers import AutoModel

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel
from hf_atm.atm.baselines import train_joint
from hf_atm.atm.history import load_history
from hf_atm.atm.metrics import task_metrics_for
from hf_atm.data.hub import GLUE_METRICS, load_hub_suite, regression_tasks
from hf_atm.errors import HfAtmError, TaskDataError

LABELS = {"topic": ["a", "b"], "sim": ["similarity"]}


def tiny_model(**kw):
    torch.manual_seed(0)
    return MultiTaskModel.from_backbone(AutoModel.from_config(bert_config(vocab_size=120)), LABELS, seed=0,
                                        regression_tasks=("sim",), **kw)


def task_data(n: int, seed: int, regression: bool) -> Dataset:
    """Token sequences whose label (a class id, or a float 0..5 for the regression) follows token 1."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 120, size=(n, 8))
    if regression:
        labels = ((ids[:, 1] - 10) / 110 * 5).astype(np.float32).tolist()
    else:
        labels = (ids[:, 1] >= 65).astype(np.int64).tolist()
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                            "labels": labels})
    return ds.cast_column("labels", Value("float32")) if regression else ds


@pytest.fixture(scope="module")
def data():
    return {task: DatasetDict({split: task_data(n, 10 * k + j, task == "sim")
                               for j, (split, n) in enumerate((("train", 48), ("validation", 40), ("test", 24)))})
            for k, task in enumerate(LABELS)}


def make_args(out, **kw):
    base = dict(output_dir=str(out), rounds=2, per_device_train_batch_size=16, learning_rate=5e-3,
                report_to="none", disable_tqdm=True, save_strategy="no", seed=0, logging_strategy="no")
    base.update(kw)
    return ATMConfig(**base)


def batch(ds):
    return {"input_ids": torch.tensor(ds["input_ids"]), "attention_mask": torch.tensor(ds["attention_mask"])}


def test_regression_head_mse_loss_predict_and_mixed_batches(data):
    model = tiny_model().eval()
    assert model.config.task_problem_types == {"sim": "regression"}
    assert model.heads["sim"].out_features == 1 and model.heads["topic"].out_features == 2
    assert model.config.task_metrics == {"topic": "accuracy", "sim": "pearsonr"}
    ds = data["sim"]["train"].select(range(8))
    y = torch.tensor(ds["labels"])
    out = model(task="sim", labels=y, label_smoothing=0.3, **batch(ds))  # never smoothed
    assert out.logits.shape == (8, 1)
    assert torch.allclose(out.loss, F.mse_loss(out.logits[:, 0], y))
    preds = model.predict("sim", **batch(ds))
    assert all(isinstance(p, float) for p in preds)
    assert preds == pytest.approx(out.logits[:, 0].tolist())
    # a mixed batch: MSE for the regression examples, CE for the others, the per-example mean over the batch
    cls = data["topic"]["train"].select(range(6))
    inputs = {k: torch.cat([batch(ds)[k], batch(cls)[k]]) for k in ("input_ids", "attention_mask")}
    task_ids = torch.tensor([1] * 8 + [0] * 6)
    labels = torch.cat([y, torch.tensor(cls["labels"], dtype=torch.float32)])
    mixed = model(task_ids=task_ids, labels=labels, **inputs)
    lt = model(task="topic", **batch(cls)).logits
    expected = (F.mse_loss(out.logits[:, 0], y, reduction="sum")
                + F.cross_entropy(lt, torch.tensor(cls["labels"]), reduction="sum")) / 14
    assert torch.allclose(mixed.loss, expected, atol=1e-6)
    assert torch.allclose(mixed.logits[:8, 0], out.logits[:, 0], atol=1e-6)
    assert torch.allclose(mixed.logits[8:], lt, atol=1e-6)


def test_atm_run_scores_the_regression_by_pearson_and_selects_by_the_mean_score(tmp_path, data):
    tr = ATMTrainer(model=tiny_model(), args=make_args(tmp_path / "run", atm_mode="ph"), task_datasets=data)
    tr.train()
    history = load_history(tmp_path / "run")
    for h in history:
        assert h["metric"] == {"topic": "accuracy", "sim": "pearsonr"}
        assert set(h["accuracy"]) == {"topic"} and set(h["score"]) == {"topic", "sim"}
        assert h["mean_accuracy"] == pytest.approx(h["accuracy"]["topic"])
        assert h["mean_score"] == pytest.approx((h["score"]["topic"] + h["score"]["sim"]) / 2)
    best = max(history, key=lambda h: h["mean_score"])
    assert tr.best_round == best["round"]
    # the last evaluation's Pearson is scipy's on the model's own single logit
    m = tr.evaluate(split="test", metric_key_prefix="test")
    ds = data["sim"]["test"]
    with torch.no_grad():
        pred = tr.model.eval()(task="sim", **batch(ds)).logits[:, 0].numpy()
    assert m["test_sim_pearsonr"] == pytest.approx(pearsonr(ds["labels"], pred)[0], abs=1e-5)
    assert "test_sim_accuracy" not in m and m["test_mean_accuracy"] == m["test_topic_accuracy"]
    assert m["test_mean_score"] == pytest.approx((m["test_topic_accuracy"] + m["test_sim_pearsonr"]) / 2)


def test_joint_training_with_both_kinds_is_finite(tmp_path, data):
    res = train_joint(tiny_model(), make_args(tmp_path / "joint", rounds=1), data, budget_epochs=1)
    entry = res.entries["test"]
    assert set(entry["accuracy"]) == {"topic"} and set(entry["score"]) == {"topic", "sim"}
    assert all(math.isfinite(v) for v in entry["score"].values())


def test_problem_types_survive_save_and_load(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "saved")
    back = MultiTaskModel.from_pretrained(tmp_path / "saved")
    assert back.config.task_problem_types == {"sim": "regression"} and back.heads["sim"].out_features == 1
    assert back.config.task_metrics["sim"] == "pearsonr"
    single = model.task_model("sim")
    assert single.config.problem_type == "regression" and single.config.task_problem_types == {"sim": "regression"}
    assert model.task_model("topic").config.task_problem_types == {}


def test_bad_regression_input_refused(tmp_path, data):
    with pytest.raises(TaskDataError, match="regression task 'sim' has one output"):
        MultiTaskModel.from_backbone(AutoModel.from_config(bert_config(vocab_size=120)), {"sim": ["lo", "hi"]},
                                     regression_tasks=("sim",))
    bad = dict(data)
    bad["sim"] = DatasetDict({sp: ds.remove_columns("labels").add_column("labels", [round(v) for v in ds["labels"]])
                              for sp, ds in data["sim"].items()})  # class ids where floats belong
    with pytest.raises(TaskDataError, match="'sim', split 'train'.*must hold float targets"):
        ATMTrainer(model=tiny_model(), args=make_args(tmp_path / "a"), task_datasets=bad)
    nan = dict(data)
    nan["sim"] = DatasetDict({sp: ds.map(lambda r: {"labels": float("nan")}) for sp, ds in data["sim"].items()})
    with pytest.raises(TaskDataError, match="must be finite"):
        ATMTrainer(model=tiny_model(), args=make_args(tmp_path / "b"), task_datasets=nan)
    for metric in ("accuracy", "f1", "matthews_correlation"):
        with pytest.raises(HfAtmError, match=f"task 'sim' is a regression.*'{metric}'"):
            task_metrics_for(make_args(tmp_path / "c", task_metrics={"sim": metric}), tiny_model())
    with pytest.raises(HfAtmError, match="task 'sim' is a regression.*'accuracy'"):
        # a model config naming a classification metric is refused by the trainer, before any training
        ATMTrainer(model=tiny_model(task_metrics={"sim": "accuracy"}), args=make_args(tmp_path / "d"),
                   task_datasets=data)


def test_hub_glue_stsb_loads_as_a_regression_from_a_local_copy(tmp_path):
    rng = np.random.default_rng(0)

    def split(n):
        return Dataset.from_dict({"sentence1": [f"a {i}" for i in range(n)], "sentence2": [f"b {i}" for i in range(n)],
                                  "label": rng.uniform(0, 5, n).astype(np.float32).tolist(), "idx": list(range(n))})

    DatasetDict({"train": split(30), "validation": split(10), "test": split(5)}).save_to_disk(tmp_path / "stsb")
    suite = load_hub_suite("hub-glue", tasks=["stsb"], sources={"stsb": str(tmp_path / "stsb")})
    dd = suite["stsb"]
    assert set(dd["train"].column_names) == {"text", "text_pair", "label"}
    assert dd["train"].features["label"] == Value("float32")
    assert len(dd["test"]) == 10  # GLUE's hidden test labels are never read: validation serves as test
    assert all(0.0 <= v <= 5.0 for v in dd["train"]["label"])
    assert regression_tasks({t: DatasetDict({k: d.rename_column("label", "labels") for k, d in v.items()})
                             for t, v in suite.items()}) == {"stsb": ["similarity"]}
    assert GLUE_METRICS["stsb"] == "pearsonr"


def test_head_protocols_refuse_regression_tasks_and_export_keeps_the_regression(tmp_path, data):
    from hf_atm.atm.export import export_kind, export_task
    from hf_atm.atm.heads import init_heads_

    model = tiny_model()
    before = {k: v.clone() for k, v in model.heads_state_dict().items()}
    with pytest.raises(TaskDataError, match=r"head_init='linear_probe'.*\['sim'\].*regression"):
        init_heads_(model, "linear_probe", data)
    assert all(torch.equal(before[k], v) for k, v in model.heads_state_dict().items())  # nothing changed
    init_heads_(model, "random", data)  # the one protocol that fits a regression head
    # BERT with pooler pooling exports natively for a classification task, not for the regression
    pooled = tiny_model(pooling="pooler")
    assert export_kind(pooled, "topic") == "native" and export_kind(pooled, "sim") == "hf_atm"
    with pytest.raises(Exception, match="regression"):
        export_kind(pooled, "sim", format="native")
    out = export_task(pooled, "sim", tmp_path / "sim")
    reloaded = MultiTaskModel.from_pretrained(out)
    assert reloaded.config.problem_type == "regression" and reloaded.config.task_problem_types == {"sim": "regression"}
    x = batch(data["sim"]["test"])
    with torch.no_grad():
        assert torch.allclose(reloaded(**x).logits, pooled.eval()(task="sim", **x).logits)
