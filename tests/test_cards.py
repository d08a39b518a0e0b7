"""Honest model cards of ATM runs: test results whatever the metric prefix, each table's split and metric named,
Hub dataset ids only where the data came from a Hub dataset, base_model a Hub id (never a path), no pipeline
claimed by a multi-task folder; the Hub suites' dataset sources and shipped class names."""

from __future__ import annotations

import json
import types

import datasets
import numpy as np
import pytest
from huggingface_hub import ModelCard
from scripts.atm_data import TASK_LABELS, digits_tasks, tiny_vit

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel
from hf_atm.atm.card import RunSummary, atm_model_card, atm_options_record, split_metrics
from hf_atm.atm.export import REGISTER_LINE, export_task
from hf_atm.data.hub import (
    HubTask,
    hub_dataset_source,
    normalize_hub_dataset,
    vit8_classnames,
    vit8_templates,
)
from hf_atm.errors import TaskDataError
from hf_atm.hub.resolve import hub_id_of

ENTRY = {"round": 1, "split": "validation", "accuracy": {"cola": 0.7, "mine": 0.5},
         "normalized_accuracy": None, "metric": {"cola": "matthews_correlation", "mine": "accuracy"},
         "score": {"cola": 0.31, "mine": 0.5}, "mean_score": 0.405}  # fmt: skip
GLUE_COLA = {"id": "nyu-mll/glue", "config": "cola", "split": "validation", "examples": 200, "split_examples": 1043}


def _summary(**kw) -> RunSummary:
    base = dict(tasks=["cola", "mine"], history=[{**ENTRY, "round": 0}, ENTRY], best_round=None,
                test_metrics={"test_cola_accuracy": 0.69, "test_cola_matthews_correlation": 0.29,
                              "test_mine_accuracy": 0.55, "test_mean_accuracy": 0.62},
                atm_mode="pa", merge_method="ties", options={}, base_model="org/encoder",
                datasets={"cola": GLUE_COLA})  # fmt: skip
    base.update(kw)
    return RunSummary(**base)


def _meta(card: ModelCard) -> dict:
    return card.data.to_dict()


def test_test_results_reach_the_card_whatever_the_prefix():
    for prefix in ("test", "eval", "my_run"):
        metrics = {f"{prefix}_cola_matthews_correlation": 0.29, f"{prefix}_cola_accuracy": 0.69,
                   f"{prefix}_mine_accuracy": 0.55, f"{prefix}_mean_accuracy": 0.62}  # fmt: skip
        card = atm_model_card(_summary(test_metrics=metrics))
        assert "## Results (split `test`)" in card.text, prefix
        assert "| cola | matthews_correlation | 0.2900 |" in card.text
        assert "| mine | accuracy | 0.5500 |" in card.text
    no_test = atm_model_card(_summary(test_metrics=None))
    assert "split `test`" not in no_test.text and not no_test.data.eval_results


def test_each_table_names_its_split_and_main_metric():
    card = atm_model_card(_summary())
    assert "## Results (split `validation`, round 1)" in card.text
    assert "| task | metric | value |" in card.text
    assert "| cola | matthews_correlation | 0.3100 |" in card.text  # the history's score, not its accuracy
    assert "| **mean** | mean score |" in card.text
    # a history without `metric` (older runs, the federated server): accuracy, named
    old = {k: v for k, v in ENTRY.items() if k not in ("metric", "score", "mean_score")}
    card = atm_model_card(_summary(history=[old], test_metrics=None))
    assert "| cola | accuracy | 0.7000 |" in card.text and "| **mean** | accuracy |" in card.text


def test_model_index_holds_hub_datasets_only():
    card = atm_model_card(_summary())
    results = card.data.eval_results
    assert [(r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type) for r in results] == [
        ("nyu-mll/glue", "cola", "validation", "matthews_correlation")]
    assert results[0].metric_value == pytest.approx(0.29) and results[0].dataset_name == "cola"
    assert all(r.dataset_type != "mine" for r in results)
    assert "`mine` (local data)" in card.text
    assert "[nyu-mll/glue](https://huggingface.co/datasets/nyu-mll/glue), config `cola`" in card.text
    assert "`cola`: 200 of 1043 examples of split `validation`" in card.text
    reparsed = ModelCard(str(card))  # the metadata parses back (the Hub's own checks)
    assert len(reparsed.data.eval_results) == 1
    local_only = atm_model_card(_summary(datasets=None))
    assert not local_only.data.eval_results and "model-index" not in _meta(local_only)


def test_metadata_claims_no_pipeline_and_no_path():
    meta = _meta(atm_model_card(_summary()))
    assert meta["library_name"] == "hf_atm"
    assert {"hf_atm", "atm", "merge", "ties", "transformers"} <= set(meta["tags"])
    assert "pipeline_tag" not in meta
    assert meta["base_model"] == "org/encoder" and meta["base_model_relation"] == "finetune"
    single = _meta(atm_model_card(_summary(tasks=["cola"], serves_pipeline=True, pipeline_tag="text-classification")))
    assert single["pipeline_tag"] == "text-classification"
    local = atm_model_card(_summary(base_model=None, base_name="my-encoder"))
    assert "base_model" not in _meta(local) and "local folder `my-encoder`" in local.text


def test_hub_id_of_a_model_is_never_a_path(tmp_path):
    snapshot = tmp_path / "hub" / "models--org--vit" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    cases = {"org/name@v1": "org/name", "org/name": "org/name", str(tmp_path): None, str(snapshot): "org/vit",
             "./relative/folder": None, "org/name@": None, None: None}  # fmt: skip
    for source, expected in cases.items():
        model = types.SimpleNamespace(backbone_source=source)
        assert hub_id_of(model) == expected, source
        assert hub_id_of(source) == expected, source  # the reference itself: the same rule
    # without backbone_source: the backbone config's _name_or_path (a cache snapshot names its repo)
    model = types.SimpleNamespace(backbone=types.SimpleNamespace(config=types.SimpleNamespace(_name_or_path=str(snapshot))))
    assert hub_id_of(model) == "org/vit"
    # a bare name may be a local folder's name: not claimed; a missing relative or absolute path neither
    assert [hub_id_of(r) for r in ("bert-base-uncased", "../gone/models--a--b", "/nowhere/x")] == [None, None, None]
    assert hub_id_of("/nowhere/models--org--gone/snapshots/abc") == "org/gone"  # a snapshot, even moved away


def test_run_card_and_export_card_name_the_same_base_model(tmp_path):
    """A backbone read from a Hugging Face cache snapshot: the run's card and its export's card both name that
    repo (one rule, hf_atm.hub.resolve.hub_id_of), before and after a save / load round trip."""
    snapshot = tmp_path / "hub" / "models--org--tiny-vit" / "snapshots" / "abc123"
    tiny_vit(seed=0).save_pretrained(snapshot)
    model = MultiTaskModel.from_backbone(snapshot, {"parity": TASK_LABELS["parity"]}, pooling="mean")
    args = ATMConfig(output_dir=str(tmp_path / "out"), report_to="none")
    model.save_pretrained(tmp_path / "run")
    for m in (model, MultiTaskModel.from_pretrained(tmp_path / "run")):
        run_card = _meta(atm_model_card(RunSummary.of_run(args, m, tasks=["parity"], history=[], best_round=None)))
        out = export_task(m, "parity", tmp_path / "export", overwrite=True)
        export_card = (out / "README.md").read_text()
        assert run_card["base_model"] == "org/tiny-vit"
        assert ModelCard(export_card).data.to_dict()["base_model"] in ("org/tiny-vit", ["org/tiny-vit"])
        assert str(tmp_path) not in export_card and str(tmp_path) not in (out / "config.json").read_text()
        assert json.loads((out / "config.json").read_text())["backbone_reference"] == "org/tiny-vit"


def test_a_test_set_held_out_of_train_is_not_in_the_model_index():
    carved = {**GLUE_COLA, "split": "train", "split_examples": None}
    card = atm_model_card(_summary(datasets={"cola": carved}))
    assert not card.data.eval_results and "model-index" not in _meta(card)
    assert "`cola`: 200 examples held out of split `train`" in card.text
    assert "| cola | matthews_correlation | 0.2900 |" in card.text  # the score is still reported, in the text


def test_split_metrics_any_prefix_and_overlapping_task_names():
    metrics = {"test_a_b_accuracy": 0.1, "test_b_accuracy": 0.2, "test_b_f1": 0.3, "test_mean_accuracy": 0.15,
               "test_runtime": 1.0}  # fmt: skip
    assert split_metrics(metrics, ["b", "a_b"]) == {"a_b": {"accuracy": 0.1}, "b": {"accuracy": 0.2, "f1": 0.3}}
    assert split_metrics({"x_y_t_accuracy": 0.5}, ["t"]) == {"t": {"accuracy": 0.5}}
    assert split_metrics({"eval_mean_accuracy": 0.5}, ["t"]) == {}


def _raw(names: list[str], n: int = 30) -> datasets.DatasetDict:
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    rng = np.random.default_rng(0)

    def split(name, m):
        return datasets.Dataset.from_dict(
            {"image": [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(m)],
             "label": [i % len(names) for i in range(m)]}, features=feats, split=name)  # fmt: skip

    return datasets.DatasetDict({"train": split("train", n), "test": split("test", n // 2)})


def test_hub_dataset_source_follows_the_data(tmp_path):
    raw = _raw([f"c{i}" for i in range(3)])
    dd = normalize_hub_dataset("pets", raw, HubTask("org/pets", config="full"), max_train_per_task=None,
                               max_test_per_task=6)
    source = hub_dataset_source(dd["test"].with_format("torch").select_columns(["label"]))
    assert source == {"id": "org/pets", "config": "full", "split": "test", "examples": 6, "split_examples": None}
    raw.save_to_disk(str(tmp_path / "copy"))
    local = normalize_hub_dataset("pets", raw, HubTask(str(tmp_path / "copy")), max_train_per_task=None)
    assert hub_dataset_source(local["test"]) is None  # a local copy is no Hub dataset


def test_vit8_class_names_shipped_and_applied_by_index():
    names = vit8_classnames()
    counts = {"cars": 196, "dtd": 47, "eurosat": 10, "gtsrb": 43, "mnist": 10, "resisc45": 45, "svhn": 10,
              "sun397": 397}  # fmt: skip
    assert {t: len(v) for t, v in names.items()} == counts
    assert all(len(set(v)) == len(v) for v in names.values())
    assert names["eurosat"][0] == "annual crop land" and names["mnist"] == [str(i) for i in range(10)]
    templates = vit8_templates()
    assert set(templates) == set(counts) and all(t.count("{}") == 1 for v in templates.values() for t in v)
    # the dataset's ClassLabel spells the classes otherwise: the shipped names replace them by class id
    raw = _raw(["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                "PermanentCrop", "Residential", "River", "SeaLake"])  # fmt: skip
    dd = normalize_hub_dataset("eurosat", raw, HubTask("org/eurosat"), class_names=names["eurosat"])
    assert dd["train"].features["label"].names == names["eurosat"]
    assert sorted(set(dd["train"]["label"])) == list(range(10))  # ids kept (the names are relabelled only)
    with pytest.raises(TaskDataError, match="10 classes, its class names 47"):
        normalize_hub_dataset("eurosat", raw, HubTask("org/eurosat"), class_names=names["dtd"])
    with pytest.raises(TaskDataError, match="duplicated"):
        normalize_hub_dataset("eurosat", raw, HubTask("org/eurosat"), class_names=["a"] * 10)


def test_saved_run_card_has_the_recipes_test_results(tmp_path):
    """The recipes' tail: evaluate(split="test", metric_key_prefix="test"), then save_model: the card has them."""
    tasks = ("digit", "parity")
    data = digits_tasks(tasks, n_train=24, n_val=12, n_test=12, seed=0)
    model = MultiTaskModel.from_backbone(tiny_vit(seed=0), {t: TASK_LABELS[t] for t in tasks}, seed=0)
    args = ATMConfig(output_dir=str(tmp_path / "out"), rounds=1, steps_per_round=1, per_device_train_batch_size=8,
                     report_to="none", disable_tqdm=True, save_strategy="no")  # fmt: skip
    trainer = ATMTrainer(model=model, args=args, task_datasets=data)
    trainer.train()
    metrics = trainer.evaluate(split="test", metric_key_prefix="test")
    trainer.save_model(str(tmp_path / "saved"))
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert "## Results (split `test`)" in card.text
    for t in tasks:
        assert f"| {t} | accuracy | {metrics[f'test_{t}_accuracy']:.4f} |" in card.text
    meta = card.data.to_dict()
    assert meta["library_name"] == "hf_atm" and "pipeline_tag" not in meta
    assert "model-index" not in meta  # local data: no dataset ids made up
    assert REGISTER_LINE in card.text  # the usage snippet imports the class that registers the Auto classes
    assert str(tmp_path) not in (tmp_path / "saved" / "README.md").read_text()


def _rgb(data: dict) -> dict:
    """The digits tasks as 3-channel images (what an image-classification pipeline feeds a model)."""
    return {t: dd.map(lambda ex: {"pixel_values": ex["pixel_values"] * 3}) for t, dd in data.items()}


def test_a_one_task_run_folder_claims_the_pipeline_it_serves(tmp_path):
    """A real one-task run (ATMTrainer, save_model): config.json carries the task's id2label and the image
    processor is saved, so the card claims image-classification, and pipeline() serves it as the model predicts.
    Without a processor saved no pipeline is claimed."""
    from PIL import Image
    from transformers import ViTImageProcessor, pipeline

    data = _rgb(digits_tasks(("parity",), n_train=16, n_val=8, n_test=8, seed=0))
    processor = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.0] * 3, image_std=[1.0] * 3)
    for with_processor in (True, False):
        model = MultiTaskModel.from_backbone(tiny_vit(seed=0, num_channels=3), {"parity": TASK_LABELS["parity"]})
        args = ATMConfig(output_dir=str(tmp_path / "out"), rounds=1, steps_per_round=1,
                         per_device_train_batch_size=8, report_to="none", disable_tqdm=True, save_strategy="no")
        trainer = ATMTrainer(model=model, args=args, task_datasets=data,
                             processing_class=processor if with_processor else None)
        trainer.train()
        saved = tmp_path / f"saved-{with_processor}"
        trainer.save_model(str(saved))
        meta = ModelCard.load(saved / "README.md").data.to_dict()
        if not with_processor:
            assert "pipeline_tag" not in meta
            continue
        assert meta["pipeline_tag"] == "image-classification"
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(6)]
        answers = pipeline(meta["pipeline_tag"], model=str(saved))(images)
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        assert [a[0]["label"] for a in answers] == trainer.model.predict("parity", pixel_values=pixels)


def test_saved_folder_records_the_runs_metrics_by_name_and_the_head_setup(tmp_path):
    """config.json and atm_config.json of a saved run hold the metrics the run used (the model's and the
    arguments', names only: no module path), the effective head setting and how the heads were made; the
    caller's model keeps its own config."""
    from tests.test_metrics import write_error_rate_module

    module = str(write_error_rate_module(tmp_path / "metrics"))
    tasks = ("digit", "parity")
    data = digits_tasks(tasks, n_train=16, n_val=8, n_test=8, seed=0)
    model = MultiTaskModel.from_backbone(tiny_vit(seed=0), {t: TASK_LABELS[t] for t in tasks},
                                         task_metrics={"digit": module})
    model.record_head_init_("prototypes", k=4)  # as hf_atm.atm.heads.init_heads_ records it (frozen by default)
    args = ATMConfig(output_dir=str(tmp_path / "out"), rounds=1, steps_per_round=1, per_device_train_batch_size=8,
                     report_to="none", disable_tqdm=True, save_strategy="no",
                     task_metrics={"parity": "matthews_correlation"})  # fmt: skip
    trainer = ATMTrainer(model=model, args=args, task_datasets=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    names = {"digit": "error_rate", "parity": "matthews_correlation"}
    assert names == trainer.metric_names()
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    record = json.loads((tmp_path / "saved" / "atm_config.json").read_text())
    assert config["task_metrics"] == names and record["task_metrics"] == names
    assert model.config.task_metrics["digit"] == module  # the caller's model is left as it was
    assert record["freeze_heads"] is True and record["head_init"] == "prototypes"
    assert record["head_init_k"] == 4
    trained = ATMConfig(output_dir=str(tmp_path / "out"), report_to="none", freeze_heads=False)
    assert atm_options_record(trained, model)["freeze_heads"] is False  # the setting in force, not the option
    assert atm_options_record(ATMConfig(output_dir=str(tmp_path / "out"), report_to="none"))["freeze_heads"] is None
    text = (tmp_path / "saved" / "README.md").read_text()
    assert "Heads: made by the `prototypes` head protocol (k = 4)" in text and "frozen during the fine-tuning" in text
    for f in ("config.json", "atm_config.json", "README.md"):
        assert str(tmp_path) not in (tmp_path / "saved" / f).read_text(), f


def test_of_run_reads_the_model_and_claims_a_pipeline_only_for_one_task(tmp_path):
    args = ATMConfig(output_dir=str(tmp_path), report_to="none")
    config = types.SimpleNamespace(id2label={0: "neg", 1: "pos"}, task_metrics={"sst2": "f1"})
    backbone = types.SimpleNamespace(config=types.SimpleNamespace(num_channels=None, _name_or_path=str(tmp_path)))
    one = types.SimpleNamespace(config=config, tasks={"sst2": ["neg", "pos"]}, backbone=backbone,
                                backbone_source="org/encoder@main")  # fmt: skip
    summary = RunSummary.of_run(args, one, tasks=["sst2"], history=[], best_round=None,
                                datasets={"sst2": GLUE_COLA, "other": GLUE_COLA})  # fmt: skip
    assert (summary.serves_pipeline, summary.base_model, summary.pipeline_tag) == (True, "org/encoder",
                                                                                  "text-classification")
    assert summary.task_metrics == {"sst2": "f1"} and set(summary.datasets) == {"sst2"}
    two = types.SimpleNamespace(config=config, tasks={"sst2": ["neg", "pos"], "rte": ["no", "yes"]},
                                backbone=backbone, backbone_source=str(tmp_path))  # fmt: skip
    summary = RunSummary.of_run(args, two, tasks=["rte", "sst2"], history=[], best_round=None)
    assert (summary.serves_pipeline, summary.base_model, summary.base_name) == (False, None, tmp_path.name)
