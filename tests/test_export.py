"""One task out of a MultiTaskModel as a standard model folder (hf_atm.atm.export, ``hf-atm export``): what
transformers loads from it predicts what the multi-task model predicts. Tiny models built here, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertModel,
    BertTokenizer,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
    pipeline,
)

from hf_atm.atm.export import REGISTER_LINE, export_kind, export_task
from hf_atm.atm.model import MultiTaskModel
from hf_atm.cli import main
from hf_atm.errors import CheckpointError, OutputExistsError, TaskDataError
from tests.helpers import bert_config, save_tiny_clip

TEXT_TASKS = {"sent": ["neg", "pos"], "topic": ["sport", "news", "art"]}
TEXTS = ["w1 w2 w3", "w7 w8", "w10 w11 w12 w13 w14", "w20", "w3 w3 w3 w9", "w40 w41 w42"]
CLASSES = ["cat", "dog", "bird"]
TEMPLATE = "a photo of a {}."


# ------------------------------------------------------------------------------------------------ fixtures
@torch.no_grad()
def _spread_heads(model: MultiTaskModel, inputs: dict) -> MultiTaskModel:
    """Heads that tell the examples of `inputs` apart (fresh N(0, 0.02) heads on a random backbone answer one
    label for everything): label j's row points from the features' mean to example j's features."""
    model.eval()
    feats = model.encode(**inputs)
    center = feats.mean(0)
    for task, labels in model.tasks.items():
        rows = feats[: len(labels)] - center
        weight = 5 * rows / rows.norm(dim=1, keepdim=True) ** 2
        model.set_head_(task, weight, -weight @ center if model.heads[task].bias is not None else None)
    return model


def _bert_tokenizer(folder: Path) -> BertTokenizer:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(specials + [f"w{i}" for i in range(115)]) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"), model_max_length=64)


@pytest.fixture
def text_model(tmp_path):
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(BertModel(bert_config()), TEXT_TASKS, pooling="cls")
    tok = _bert_tokenizer(tmp_path / "tok")
    return _spread_heads(model, tok(TEXTS, padding=True, return_tensors="pt")), tok


def _images(n: int = 4, size: int = 20) -> list[Image.Image]:
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8")) for _ in range(n)]


@pytest.fixture
def vit_model():
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)
    model = MultiTaskModel.from_backbone(ViTModel(config), {"shape": ["round", "square", "star"],
                                                           "color": ["red", "blue"]}, pooling="cls")
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    return _spread_heads(model, processor(_images(), return_tensors="pt")), processor


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIPModel with a byte-level CLIPTokenizer and a CLIPProcessor, saved (tests/helpers.py)."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", image_size=16, patch_size=8,
                          hidden_size=32, projection_dim=16, processor=True)


def _tuned_clip(clip_dir: Path) -> MultiTaskModel:
    """from_clip with one template, then the vision tower 'tuned' (perturbed) as ATM would."""
    model = MultiTaskModel.from_clip(clip_dir, {"animals": CLASSES, "sizes": ["small", "large"]},
                                     templates=[TEMPLATE])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _clip_inputs(folder: Path, classes: list[str]) -> dict:
    """CLIPModel inputs from the processor saved in `folder`: the prompts of `classes` and the test images."""
    processor = CLIPProcessor.from_pretrained(folder)
    text = processor.tokenizer([TEMPLATE.format(c) for c in classes], padding=True, return_tensors="pt")
    return {**text, "pixel_values": processor.image_processor(_images(), return_tensors="pt")["pixel_values"]}


def _assert_pipeline_matches(results: list, model: MultiTaskModel, task: str, **inputs) -> None:
    """A pipeline's answers (every label with its score, per example) are the multi-task model's softmax."""
    with torch.no_grad():
        probs = model(task=task, **inputs).logits.softmax(-1)
    labels = model.tasks[task]
    got = torch.tensor([[{r["label"]: r["score"] for r in res}[x] for x in labels] for res in results])
    torch.testing.assert_close(got, probs, rtol=1e-4, atol=1e-5)
    assert [res[0]["label"] for res in results] == model.predict(task, **inputs)


def _no_absolute_paths(folder: Path, *roots: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for root in roots:
                assert str(root).encode() not in data, f"{f.name} holds the absolute path {root}"


def _card_metadata(folder: Path) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md").data.to_dict()


# ------------------------------------------------------------------------------------------------ text
def test_text_export_pipeline_predicts_like_the_multitask_model(tmp_path, text_model):
    model, tok = text_model
    assert export_kind(model, "topic") == "hf_atm"  # cls pooling: BertForSequenceClassification uses the pooler
    out = model.export_task("topic", tmp_path / "topic", processing_class=tok)
    clf = pipeline("text-classification", model=str(out))
    got = [r["label"] for r in clf(TEXTS)]
    assert got == model.predict("topic", **tok(TEXTS, padding=True, return_tensors="pt"))
    _assert_pipeline_matches(clf(TEXTS[:1], top_k=None), model, "topic", **tok(TEXTS[:1], return_tensors="pt"))
    assert len(set(got)) > 1  # the comparison is not between constant answers
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert loaded.config.id2label == {0: "sport", 1: "news", 2: "art"}
    assert loaded.config.label2id == {"sport": 0, "news": 1, "art": 2}
    meta = _card_metadata(out)
    assert meta["library_name"] == "hf_atm" and "pipeline_tag" not in meta
    assert REGISTER_LINE in (out / "README.md").read_text()
    _no_absolute_paths(out, tmp_path)


def test_the_cards_snippet_runs_in_a_fresh_interpreter(tmp_path, text_model):
    """What the card of a package-class export tells a user to run works as written (a new process: no
    registration left over from this test session), and answers what the multi-task model answers."""
    import os
    import re
    import subprocess
    import sys

    model, tok = text_model
    out = export_task(model, "topic", tmp_path / "topic", processing_class=tok)
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    code = code.replace("path/or/repo-of-this-model", str(out))
    code = re.sub(r"^classifier\((.*)\)$", r"print(classifier(\1)[0]['label'])", code, flags=re.M)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == model.predict("topic", **tok(["some text"], return_tensors="pt"))[0]


def test_bert_pooler_exports_as_native_sequence_classifier(tmp_path):
    torch.manual_seed(0)
    tok = _bert_tokenizer(tmp_path / "tok")
    model = MultiTaskModel.from_backbone(BertModel(bert_config()), TEXT_TASKS, pooling="pooler")
    _spread_heads(model, tok(TEXTS, padding=True, return_tensors="pt"))
    out = export_task(model, "sent", tmp_path / "sent", processing_class=tok)
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(loaded).__name__ == "BertForSequenceClassification"
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, model(task="sent", **enc).logits)
    meta = _card_metadata(out)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-classification"


# ------------------------------------------------------------------------------------------------ ViT
def test_vit_export_is_a_native_image_classifier_with_the_same_logits(tmp_path, vit_model):
    model, processor = vit_model
    assert export_kind(model, "shape") == "native"
    out = export_task(model, "shape", tmp_path / "shape", processing_class=processor)
    loaded = AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(loaded).__name__ == "ViTForImageClassification"
    assert loaded.config.id2label == {0: "round", 1: "square", 2: "star"}
    pixels = processor(_images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model(task="shape", pixel_values=pixels).logits)
    clf = pipeline("image-classification", model=str(out))
    _assert_pipeline_matches(clf(_images()), model, "shape", pixel_values=pixels)
    assert len(set(model.predict("shape", pixel_values=pixels))) > 1  # not a constant answer
    meta = _card_metadata(out)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-classification"
    _no_absolute_paths(out, tmp_path)


def test_export_without_a_processor_claims_no_pipeline_and_shows_the_model_call(tmp_path, vit_model):
    model, processor = vit_model
    out = export_task(model, "shape", tmp_path / "shape")  # e.g. the embedded suite: pixels made by hand
    meta = _card_metadata(out)
    assert meta["library_name"] == "transformers" and "pipeline_tag" not in meta
    card = (out / "README.md").read_text()
    assert "AutoModelForImageClassification.from_pretrained" in card and 'pipeline("' not in card
    loaded = AutoModelForImageClassification.from_pretrained(out).eval()  # what the card's snippet does
    pixels = processor(_images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model(task="shape", pixel_values=pixels).logits)


def test_mean_pooled_vit_exports_as_the_package_class(tmp_path, vit_model):
    model, processor = vit_model
    model = MultiTaskModel.from_backbone(model.backbone, {"shape": ["round", "square", "star"]}, pooling="mean")
    _spread_heads(model, processor(_images(), return_tensors="pt"))
    with pytest.raises(CheckpointError, match="'mean' pooling"):
        export_kind(model, "shape", format="native")
    out = export_task(model, "shape", tmp_path / "shape", processing_class=processor)
    clf = pipeline("image-classification", model=str(out))
    pixels = processor(_images(), return_tensors="pt")["pixel_values"]
    _assert_pipeline_matches(clf(_images()), model, "shape", pixel_values=pixels)


# ------------------------------------------------------------------------------------------------ CLIP
def test_clip_export_is_a_clipmodel_with_the_tuned_tower_and_the_same_logits(tmp_path, clip_dir):
    model = _tuned_clip(clip_dir)
    assert export_kind(model, "animals") == "clip"
    out = export_task(model, "animals", tmp_path / "animals")
    exported = CLIPModel.from_pretrained(out).eval()
    inputs = _clip_inputs(out, CLASSES)
    with torch.no_grad():
        got = exported(**inputs).logits_per_image
        want = model(task="animals", pixel_values=inputs["pixel_values"]).logits
        original = CLIPModel.from_pretrained(clip_dir).eval()(**inputs).logits_per_image
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(original, want, atol=1e-3)  # the tuned tower, not the original, was exported
    clf = pipeline("zero-shot-image-classification", model=str(out))
    results = clf(_images(), candidate_labels=CLASSES, hypothesis_template=TEMPLATE)
    _assert_pipeline_matches(results, model, "animals", pixel_values=inputs["pixel_values"])
    meta = _card_metadata(out)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "zero-shot-image-classification"
    assert TEMPLATE in (out / "README.md").read_text()
    _no_absolute_paths(out, tmp_path, clip_dir.parent)


def test_clip_run_folder_exports_from_the_cli(tmp_path, clip_dir):
    """A saved CLIP run names its text tower by a path relative to the run folder; the CLI finds it."""
    model = _tuned_clip(clip_dir)
    run = tmp_path / "run"
    model.save_pretrained(run, processing_class=CLIPImageProcessor.from_pretrained(clip_dir))
    assert str(clip_dir) not in (run / "config.json").read_text()
    out = tmp_path / "sizes"
    assert main(["export", str(run), "--task", "sizes", "--output", str(out)]) == 0
    exported = CLIPModel.from_pretrained(out).eval()
    inputs = _clip_inputs(out, ["small", "large"])
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits_per_image,
                                   model(task="sizes", pixel_values=inputs["pixel_values"]).logits,
                                   rtol=1e-4, atol=1e-4)
    _no_absolute_paths(out, tmp_path, clip_dir.parent)


def test_clip_export_with_several_templates_names_them(tmp_path, clip_dir):
    templates = ["a photo of a {}.", "a drawing of a {}."]
    model = MultiTaskModel.from_clip(clip_dir, {"animals": CLASSES}, templates=templates)
    card = (export_task(model, "animals", tmp_path / "animals") / "README.md").read_text()
    assert all(f"`{t}`" in card for t in templates) and "approximates" in card


def _assert_own_class_export(out: Path, model: MultiTaskModel, task: str) -> None:
    """`out` holds the package's class for `task`, computing what the multi-task model computes."""
    assert json.loads((out / "config.json").read_text())["model_type"] == "hf_atm_multitask"
    loaded = AutoModelForImageClassification.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model(task=task, pixel_values=pixels).logits)
    meta = _card_metadata(out)
    assert meta["library_name"] == "hf_atm" and "pipeline_tag" not in meta


def test_clip_trained_head_goes_out_as_the_package_class_unless_native(tmp_path, clip_dir):
    model = _tuned_clip(clip_dir)
    head = model.heads["animals"]
    model.set_head_("animals", head.weight.detach() + 0.1, None)
    with pytest.raises(CheckpointError, match="no longer the zero-shot head"):
        export_task(model, "animals", tmp_path / "animals", format="native")
    assert not (tmp_path / "animals").exists()
    _assert_own_class_export(export_task(model, "animals", tmp_path / "auto"), model, "animals")  # the default
    out = export_task(model, "animals", tmp_path / "own", format="hf_atm")  # the package's class carries it
    _assert_own_class_export(out, model, "animals")


@pytest.mark.parametrize("head_init", ["linear_probe", "prototypes", "random"])
def test_clip_heads_of_other_protocols_export_by_default(tmp_path, clip_dir, head_init):
    """A CLIP model whose heads were not made zero-shot (linear probe, prototypes, trained from random):
    format="auto" writes the package's own class without trying the CLIPModel; "native" still refuses."""
    model = _tuned_clip(clip_dir)
    model.config.head_init = head_init
    model.set_head_("sizes", torch.randn(model.heads["sizes"].weight.shape, generator=torch.Generator().manual_seed(1)))
    assert export_kind(model, "sizes") == "hf_atm" and export_kind(model, "sizes", format="native") == "clip"
    _assert_own_class_export(export_task(model, "sizes", tmp_path / "sizes"), model, "sizes")
    with pytest.raises(CheckpointError, match="no longer the zero-shot head"):
        export_task(model, "sizes", tmp_path / "native", format="native")


# ------------------------------------------------------------------------------------------------ errors, CLI, push
def test_unknown_task_is_refused_before_anything_is_written(tmp_path, text_model):
    model, _ = text_model
    with pytest.raises(TaskDataError, match=r"'nope'.*sent, topic"):
        export_task(model, "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_empty_output_needs_overwrite(tmp_path, text_model):
    model, tok = text_model
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        export_task(model, "sent", out, processing_class=tok)
    export_task(model, "sent", out, processing_class=tok, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()


def test_cli_export_round_trip(tmp_path, text_model, capsys):
    model, tok = text_model
    run = tmp_path / "run"
    model.save_pretrained(run)
    tok.save_pretrained(run)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--task", "sent", "--output", str(out)]) == 0
    clf = pipeline("text-classification", model=str(out))  # the tokenizer came over from RUN_DIR
    assert [r["label"] for r in clf(TEXTS)] == model.predict("sent", **tok(TEXTS, padding=True, return_tensors="pt"))
    _no_absolute_paths(out, tmp_path)
    assert main(["export", str(run), "--task", "sent", "--output", str(out)]) == 2  # exists, no --overwrite
    assert main(["export", str(run), "--task", "sent", "--output", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--task", "nope", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'nope'" in err and "sent, topic" in err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(tmp_path / "missing"), "--task", "sent", "--output", str(tmp_path / "y")]) == 2
    assert main(["export", str(run), "--task", "sent", "--output", str(tmp_path / "y"), "--format", "onnx"]) == 2
    assert "--format must be one of auto, native, hf_atm" in capsys.readouterr().err
    assert main(["export", str(run), "--task", "sent", "--output", str(tmp_path / "y"), "--format", "native"]) == 2
    assert "format='hf_atm'" in capsys.readouterr().err and not (tmp_path / "y").exists()


@pytest.mark.network
def test_export_pushes_the_folder_to_the_hub(tmp_path, text_model, monkeypatch):
    from huggingface_hub import constants

    from tests.hub_stub import HubStub

    model, tok = text_model
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubStub() as stub:
        monkeypatch.setattr(constants, "ENDPOINT", stub.url)
        token = "hf_" + "x" * 32
        out = export_task(model, "sent", tmp_path / "sent", processing_class=tok, push_to_hub="org/sent",
                          token=token)
        files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert stub.files("org/sent") == files
        assert stub.readme_metadata("org/sent")["library_name"] == "hf_atm"
        assert all(token.encode() not in data for data in files.values())
