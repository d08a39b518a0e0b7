"""Per-task metrics through `evaluate`: the shipped modules loaded by path offline, bad metrics refused, a
CoLA-like imbalanced task scored by Matthews correlation in an ATM run's history, F1 and mixed metrics, round
selection by the main score, accuracy-only runs unchanged."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from helpers import bert_config
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import AutoModel

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel
from hf_atm.atm.history import HistoryEntry, load_history, plot_history
from hf_atm.atm.metrics import METRICS_DIR, SHIPPED_METRICS, load_task_metric, task_metrics_for
from hf_atm.data.hub import GLUE_METRICS, GLUE_TASKS
from hf_atm.errors import HfAtmError

PRED = [0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 0]
REF = [0, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1]
EXPECTED = {
    "accuracy": accuracy_score(REF, PRED),
    "f1": f1_score(REF, PRED),
    "matthews_correlation": matthews_corrcoef(REF, PRED),
    "pearsonr": pearsonr(REF, PRED)[0],
    "spearmanr": spearmanr(REF, PRED)[0],
}
LABELS = {"cola": ["unacceptable", "acceptable"], "para": ["different", "same"]}

LOAD_SCRIPT = """
import json, sys
import evaluate
root, pred, ref = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {}
for name in sys.argv[4:]:
    out[name] = evaluate.load(root + "/" + name, keep_in_memory=True).compute(predictions=pred, references=ref)
f1 = evaluate.load(root + "/f1/f1.py", keep_in_memory=True)
out["f1_macro_file"] = f1.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2], average="macro")
print(json.dumps(out))
"""


def test_shipped_modules_load_by_path_offline_and_write_only_their_caches(tmp_path):
    home, modules, work = tmp_path / "hf_home", tmp_path / "modules", tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(home),
           "HF_MODULES_CACHE": str(modules), "HF_EVALUATE_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(METRICS_DIR), json.dumps(PRED), json.dumps(REF),
                          *SHIPPED_METRICS], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for name in SHIPPED_METRICS:
        assert out[name] == {name: pytest.approx(EXPECTED[name], abs=1e-12)}, name
    assert out["f1_macro_file"]["f1"] == pytest.approx(f1_score([0, 1, 1, 2], [0, 1, 2, 2], average="macro"))
    # evaluate wrote its module copies and (empty) metric folders into its caches, nothing in the working folder
    # or elsewhere under tmp_path; the package's own files are untouched
    assert {p.name for p in tmp_path.iterdir()} == {"hf_home", "modules", "work"}
    assert not any(work.iterdir())
    assert not any(p.suffix == ".arrow" for p in home.rglob("*"))  # keep_in_memory: no prediction cache files
    assert sorted(p.name for p in METRICS_DIR.iterdir()) == sorted(SHIPPED_METRICS)
    assert all(sorted(f.name for f in (METRICS_DIR / n).iterdir() if f.name != "__pycache__") == [f"{n}.py"]
               for n in SHIPPED_METRICS)


@pytest.mark.parametrize("name", SHIPPED_METRICS)
def test_task_metric_equals_sklearn_and_scipy(name):
    metric = load_task_metric(name)
    assert metric.name == metric.main_key == name and metric.shipped
    assert load_task_metric(name) is metric  # cached per process
    values = metric.compute(np.asarray(PRED), torch.tensor(REF).numpy())
    assert values[name] == pytest.approx(EXPECTED[name], abs=1e-12)
    assert metric.score(values) == values[name]


def write_error_rate_module(folder: Path) -> Path:
    """An evaluate module of the user's own: 1 - accuracy (higher is 'better' for the trainer)."""
    mod = folder / "error_rate"
    mod.mkdir(parents=True)
    (mod / "error_rate.py").write_text(
        "import datasets\nimport evaluate\n\n\n"
        "class ErrorRate(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        return evaluate.MetricInfo(description='1 - accuracy', citation='', features=datasets.Features(\n"
        "            {'predictions': datasets.Value('int64'), 'references': datasets.Value('int64')}))\n\n"
        "    def _compute(self, predictions, references):\n"
        "        wrong = sum(int(p != r) for p, r in zip(predictions, references))\n"
        "        return {'error_rate': wrong / len(references), 'errors': wrong}\n"
    )
    return mod


def test_bad_metric_refused_naming_it(tmp_path):
    with pytest.raises(HfAtmError, match=r"task_metrics\['cola'\].*'mcc'.*neither a shipped metric"):
        ATMConfig(output_dir=str(tmp_path), report_to="none", task_metrics={"cola": "mcc"})
    with pytest.raises(HfAtmError, match=r"task_metrics\['para'\].*nope/missing\.py"):
        ATMConfig(output_dir=str(tmp_path), report_to="none", task_metrics="cola=f1,para=nope/missing.py")
    with pytest.raises(HfAtmError, match="task_metrics: expected 'task=metric"):
        ATMConfig(output_dir=str(tmp_path), report_to="none", task_metrics="cola")
    with pytest.raises(HfAtmError, match="'accurracy'"):
        load_task_metric("accurracy")
    # the command line's forms and a folder path are accepted
    mod = write_error_rate_module(tmp_path)
    cfg = ATMConfig(output_dir=str(tmp_path), report_to="none", task_metrics=f'{{"cola": "{mod}"}}')
    assert cfg.task_metrics == {"cola": str(mod)}
    assert ATMConfig(output_dir=str(tmp_path), report_to="none",
                     task_metrics="cola=matthews_correlation, para=f1").task_metrics == {
        "cola": "matthews_correlation", "para": "f1"}
    # a task the model has no head for is refused by the resolver (so by the trainer, before any training)
    model = tiny_model()
    with pytest.raises(HfAtmError, match=r"task_metrics: task\(s\) \['sst2'\] have no head"):
        task_metrics_for(ATMConfig(output_dir=str(tmp_path), report_to="none", task_metrics={"sst2": "f1"}), model)
    chosen = task_metrics_for(cfg, model)
    assert chosen["cola"].name == "error_rate" and chosen["para"].name == "accuracy"
    # the shipped F1 is GLUE's binary F1: a task with more classes is refused up front
    three = MultiTaskModel.from_backbone(AutoModel.from_config(bert_config(vocab_size=120)), {"topic": ["a", "b", "c"]})
    with pytest.raises(HfAtmError, match="f1 scores binary tasks.*'topic' has 3 classes"):
        task_metrics_for(ATMConfig(output_dir=str(tmp_path), report_to="none", task_metrics="topic=f1"), three)


def test_glue_metrics_and_stsb_a_regression():
    assert set(GLUE_TASKS) <= set(GLUE_METRICS) and set(GLUE_METRICS.values()) <= set(SHIPPED_METRICS)
    assert GLUE_METRICS["cola"] == "matthews_correlation" and GLUE_METRICS["mrpc"] == GLUE_METRICS["qqp"] == "f1"
    assert GLUE_METRICS["stsb"] == "pearsonr" and GLUE_METRICS["sst2"] == "accuracy"
    # STS-B is loaded as a regression (tests/test_regression.py loads a local copy through sources=)
    assert GLUE_TASKS["stsb"].regression == "similarity"


# -- ATM runs on a tiny BERT ------------------------------------------------------------------------------------
def imbalanced_task(n: int, seed: int, minority: float, marker: int) -> Dataset:
    """Token sequences; the minority class (label 0, a fraction `minority`) carries `marker` at position 1 most
    of the time, so a model can learn it but an untrained one mostly predicts one class (CoLA-like)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 120, size=(n, 8))
    labels = (rng.random(n) >= minority).astype(np.int64)
    hint = (labels == 0) & (rng.random(n) < 0.9)
    ids[hint, 1] = marker
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                              "labels": labels.tolist()})


@pytest.fixture(scope="module")
def data():
    out = {}
    for k, (task, minority) in enumerate((("cola", 0.3), ("para", 0.4))):
        out[task] = DatasetDict({split: imbalanced_task(n, 10 * k + j, minority, marker=3 + k)
                                 for j, (split, n) in enumerate((("train", 48), ("validation", 40), ("test", 24)))})
    return out


def tiny_model():
    torch.manual_seed(0)
    return MultiTaskModel.from_backbone(AutoModel.from_config(bert_config(vocab_size=120)), LABELS, seed=0)


def make_args(out, **kw):
    base = dict(output_dir=str(out), rounds=2, per_device_train_batch_size=16, learning_rate=5e-3,
                report_to="none", disable_tqdm=True, save_strategy="no", seed=0, logging_strategy="no")
    base.update(kw)
    return ATMConfig(**base)


@torch.no_grad()
def predictions(tr, data, task, split):
    """(argmax class ids, labels) of the trainer's model on a split, computed here with the model's forward."""
    ds = data[task][split]
    model = tr.model.eval()
    logits = model(task=task, input_ids=torch.tensor(ds["input_ids"]),
                   attention_mask=torch.tensor(ds["attention_mask"])).logits
    return logits.argmax(-1).numpy(), np.asarray(ds["labels"])


def test_cola_like_task_scored_by_matthews_correlation_in_history_with_f1_beside(tmp_path, data):
    args = make_args(tmp_path / "run", task_metrics={"cola": "matthews_correlation", "para": "f1"})
    tr = ATMTrainer(model=tiny_model(), args=args, task_datasets=data)
    tr.train()
    history = load_history(tmp_path / "run")
    assert [h["round"] for h in history] == [0, 1, 2]
    for h in history:
        assert h["metric"] == {"cola": "matthews_correlation", "para": "f1"}
        assert set(h["score"]) == {"cola", "para"} and set(h["accuracy"]) == {"cola", "para"}
        assert h["mean_score"] == pytest.approx((h["score"]["cola"] + h["score"]["para"]) / 2)
        assert -1.0 <= h["score"]["cola"] <= 1.0 and 0.0 <= h["score"]["para"] <= 1.0
    # the last round's scores are sklearn's on the model's own predictions (PA keeps the last round)
    for task, fn in (("cola", matthews_corrcoef), ("para", f1_score)):
        pred, ref = predictions(tr, data, task, "validation")
        assert history[-1]["score"][task] == pytest.approx(fn(ref, pred), abs=1e-12)
        assert history[-1]["accuracy"][task] == pytest.approx(float(np.mean(pred == ref)), abs=1e-12)
    # an imbalanced task: the untrained model's MCC is not its accuracy
    assert history[0]["score"]["cola"] != history[0]["accuracy"]["cola"]
    m = tr.evaluate(split="test", metric_key_prefix="test")
    pred, ref = predictions(tr, data, "cola", "test")
    assert m["test_cola_matthews_correlation"] == pytest.approx(matthews_corrcoef(ref, pred), abs=1e-12)
    assert m["test_cola_accuracy"] == pytest.approx(float(np.mean(pred == ref)), abs=1e-12)
    assert m["test_mean_score"] == pytest.approx((m["test_cola_matthews_correlation"] + m["test_para_f1"]) / 2)
    assert "test_mean_accuracy" in m and "test_mean_f1" not in m  # a mean of a metric only when all tasks have it
    assert (tmp_path / "run" / "accuracy.png").stat().st_size > 0


@pytest.mark.usefixtures("no_plots")  # checks scores, not the plots (the run above draws them)
def test_round_selection_uses_the_main_metric(tmp_path, data):
    # PH selects rounds by the mean main score; with a metric of the user's own (1 - accuracy, from a path), the
    # round chosen is the one with the highest error rate, which selection by accuracy would never pick
    mod = write_error_rate_module(tmp_path)
    args = make_args(tmp_path / "ph", atm_mode="ph", rounds=3, learning_rate=2e-2,
                     task_metrics={"cola": str(mod), "para": str(mod / "error_rate.py")})
    tr = ATMTrainer(model=tiny_model(), args=args, task_datasets=data)
    tr.train()
    scores = [h["mean_score"] for h in tr.history]
    for h in tr.history:
        assert h["metric"] == {"cola": "error_rate", "para": "error_rate"}
        assert h["mean_score"] == pytest.approx(1.0 - h["mean_accuracy"], abs=1e-12)
    assert tr.best_round == scores.index(max(scores))
    accuracies = [h["mean_accuracy"] for h in tr.history]
    assert tr.best_round == accuracies.index(min(accuracies))
    assert len(set(accuracies)) > 1  # the rounds differ, so the choice is the metric's
    m = tr.evaluate()
    assert m["eval_mean_score"] == pytest.approx(max(scores)) and m["eval_cola_errors"] >= 0
    assert m["eval_mean_error_rate"] == pytest.approx(max(scores))


@pytest.mark.usefixtures("no_plots")  # checks scores, not the plots (the run above draws them)
def test_load_best_model_at_end_defaults_to_the_mean_score_and_honours_an_explicit_metric(tmp_path, data):
    # 4 rounds at this rate (seed 0): the round with the best mean score (MCC + accuracy) is not the round with
    # the best mean accuracy, so the check tells selection by score from selection by accuracy
    args = make_args(tmp_path / "best", task_metrics={"cola": "matthews_correlation"}, eval_strategy="epoch",
                     save_strategy="epoch", load_best_model_at_end=True, rounds=4, learning_rate=2e-2)
    assert args.metric_for_best_model == "eval_mean_score"
    tr = ATMTrainer(model=tiny_model(), args=args, task_datasets=data)
    tr.train()
    scores = [h["mean_score"] for h in tr.history]
    accuracies = [h["mean_accuracy"] for h in tr.history]
    assert tr.best_round == scores.index(max(scores))
    assert tr.best_round != accuracies.index(max(accuracies))  # accuracy would have picked another round
    assert tr.evaluate()["eval_mean_score"] == pytest.approx(max(scores))
    explicit = make_args(tmp_path / "x", task_metrics={"cola": "matthews_correlation"},
                         metric_for_best_model="eval_mean_accuracy")
    assert explicit.metric_for_best_model == "eval_mean_accuracy"


@pytest.mark.usefixtures("no_plots")  # checks scores, not the plots (the run above draws them)
def test_accuracy_only_runs_are_unchanged(tmp_path, data):
    runs = []
    for name, metrics in (("default", None), ("explicit", {"cola": "accuracy", "para": "accuracy"})):
        tr = ATMTrainer(model=tiny_model(), args=make_args(tmp_path / name, rounds=1, task_metrics=metrics),
                        task_datasets=data, reference_accuracies={"cola": 0.5, "para": 0.8})
        tr.train()
        runs.append((tr.history, tr.evaluate()))
    (h0, m0), (h1, m1) = runs
    assert [h["accuracy"] for h in h0] == [h["accuracy"] for h in h1]
    for h in h0:
        assert h["score"] == h["accuracy"] and h["mean_score"] == h["mean_accuracy"]  # bit for bit
        assert h["metric"] == {"cola": "accuracy", "para": "accuracy"}
        assert h["normalized_accuracy"] == {"cola": h["accuracy"]["cola"] / 0.5, "para": h["accuracy"]["para"] / 0.8}
    assert m0 == m1 and m0["eval_mean_score"] == m0["eval_mean_accuracy"]
    assert {k for k in m0 if k.startswith("eval_")} == {
        "eval_cola_accuracy", "eval_para_accuracy", "eval_mean_accuracy", "eval_mean_score",
        "eval_cola_normalized_accuracy", "eval_para_normalized_accuracy", "eval_mean_normalized_accuracy"}


def test_history_entry_scores_and_plot_with_negative_correlations(tmp_path):
    e = HistoryEntry.build(1, {"cola": 0.7, "sst2": 0.9}, tasks=["cola", "sst2"], split="validation",
                           score={"cola": -0.2, "sst2": 0.9}, metric={"cola": "matthews_correlation",
                                                                       "sst2": "accuracy"},
                           reference={"cola": 0.4, "sst2": 0.9})
    d = e.to_dict()
    assert d["score"] == {"cola": -0.2, "sst2": 0.9} and d["mean_score"] == pytest.approx(0.35)
    assert d["normalized_accuracy"] == pytest.approx({"cola": -0.5, "sst2": 1.0})  # main score / reference's
    assert HistoryEntry.from_dict(d) == e
    old = {k: v for k, v in d.items() if k not in ("metric", "score", "mean_score")}  # a history before metrics
    assert plot_history([old, d], tmp_path)[0].stat().st_size > 0
    assert not math.isnan(d["mean_accuracy"])
    # an individual model no better than chance (MCC 0) gives no ratio: NaN, not an error
    chance = HistoryEntry.build(1, {"cola": 0.7}, tasks=["cola"], split="validation", score={"cola": 0.1},
                                metric={"cola": "matthews_correlation"}, reference={"cola": 0.0})
    assert math.isnan(chance.normalized_accuracy["cola"])


def test_two_processes_score_each_task_on_its_owner_like_one_process(tmp_path, gloo_launch):
    """Metrics other than accuracy are computed on each task's owner process and gathered: two gloo processes
    (``accelerate launch``: the suite's shared launch, ``gloo_launch`` in conftest.py, runs
    tests/scripts/metrics_dist_run.py into ``metrics``) give the single-process history and test keys."""
    single, multi = tmp_path / "single", gloo_launch / "metrics"
    threads = torch.get_num_threads()  # the single-process run here, with one intra-op thread like each process
    try:
        from scripts.metrics_dist_run import main as run_single

        single.mkdir()
        run_single(single)
    finally:
        torch.set_num_threads(threads)
    one, two = (json.loads((p / "metrics.json").read_text()) for p in (single, multi))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["metric"][0] == {"digit": "accuracy", "parity": "matthews_correlation", "high": "f1"}
    assert two["metric"] == one["metric"] and two["accuracy"] == one["accuracy"]
    for a, b in zip(one["score"], two["score"]):
        assert b == pytest.approx(a, abs=1e-6)
    assert {"test_parity_matthews_correlation", "test_high_f1", "test_mean_score"} <= set(two["test"])
    for k, v in one["test"].items():
        assert two["test"][k] == pytest.approx(v, abs=1e-6), k
