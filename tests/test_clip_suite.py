"""The paper's run offline: `recipes/atm_vit.py --suite hub-vit8 --head_init zero_shot` on a tiny CLIPModel
(``helpers.save_tiny_clip``: a byte-level BPE tokenizer from a small vocab.json + merges.txt, a CLIPImageProcessor
saved with it) and local stand-ins for two of the eight tasks with the Hub datasets' columns (an ``image`` Image
column and a ``label`` ClassLabel), passed with ``--sources``."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import save_tiny_clip
from huggingface_hub import ModelCard
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# the stand-ins' own spelling of the classes (as Hub copies often have): the shipped class names replace them
EUROSAT_NAMES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                 "PermanentCrop", "Residential", "River", "SeaLake"]  # fmt: skip


def stand_in(folder: Path, names: list[str], *, gray: bool, n_train: int = 40, n_test: int = 20) -> Path:
    """A local DatasetDict (train / test) with a Hub vit8 dataset's columns: ``image`` (Image) and ``label``
    (ClassLabel with `names`), saved with save_to_disk."""
    rng = np.random.default_rng(len(names))
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    shape = (12, 10) if gray else (12, 10, 3)

    def split(n: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"image": [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(n)],
             "label": [i % len(names) for i in range(n)]}, features=feats)  # fmt: skip

    datasets.DatasetDict({"train": split(n_train), "test": split(n_test)}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """The tests' tiny random CLIPModel (``helpers.save_tiny_clip``) with its tokenizer and a 16-pixel
    CLIPImageProcessor."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip", image_size=16, patch_size=8,
                          processor=True)  # fmt: skip


def test_vit8_images_go_through_the_checkpoints_own_processor(clip_folder, tmp_path):
    from transformers import AutoImageProcessor

    from hf_atm.data import load_suite, process_images_suite

    sources = {"mnist": str(stand_in(tmp_path / "mnist", [str(i) for i in range(10)], gray=True, n_train=20,
                                     n_test=10))}  # fmt: skip
    suite = load_suite("hub-vit8", tasks=["mnist"], sources=sources, max_train_per_task=None)
    processor = AutoImageProcessor.from_pretrained(clip_folder)
    assert type(processor).__name__.startswith("CLIPImageProcessor")
    out = process_images_suite(suite, processor)["mnist"]
    assert out["train"].features["labels"].names == [str(i) for i in range(10)]
    first = suite["mnist"]["train"][0]["image"].convert("RGB")
    expected = processor(images=[first], return_tensors="np")["pixel_values"][0]
    assert out["train"][0]["pixel_values"].shape == (3, 16, 16)
    np.testing.assert_allclose(out["train"][0]["pixel_values"].numpy(), expected, rtol=0, atol=1e-6)


def _recipe(monkeypatch):
    """recipes/atm_vit.py as a module (its `common` from the recipes folder, as when it runs as a script)."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    monkeypatch.delitem(sys.modules, "common", raising=False)
    spec = importlib.util.spec_from_file_location("atm_vit_recipe", ROOT / "recipes" / "atm_vit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_recipe_runs_on_a_tiny_clip(clip_folder, tmp_path, monkeypatch):
    from hf_atm.atm.clip import load_clip, zero_shot_weights
    from hf_atm.data.hub import vit8_classnames, vit8_templates

    sources = {"mnist": str(stand_in(tmp_path / "mnist", [str(i) for i in range(10)], gray=True)),
               "eurosat": str(stand_in(tmp_path / "eurosat", EUROSAT_NAMES, gray=False))}  # fmt: skip
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "atm_vit.py", "--suite", "hub-vit8", "--backbone", str(clip_folder), "--head_init", "zero_shot",
        "--tasks", "mnist,eurosat", "--sources", json.dumps(sources), "--rounds", "1",
        "--steps_per_round", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
        "--max_train_per_task", "30", "--max_test_per_task", "10", "--output_dir", str(out),
        "--save_strategy", "no",
    ])  # fmt: skip
    _recipe(monkeypatch).main()

    rows = json.loads((out / "results.json").read_text())
    assert [r["method"].split(" ")[0] for r in rows] == ["individual", "task", "ATM"]
    assert all(set(r["accuracy"]) == {"mnist", "eurosat"} for r in rows)
    # the heads are CLIP's zero-shot heads of the shipped class names and templates, frozen through the run
    clip_model, tokenizer, _ = load_clip(clip_folder)
    heads = load_file(str(out / "model.safetensors"))
    for task in ("mnist", "eurosat"):
        expected = zero_shot_weights(clip_model, tokenizer, vit8_classnames()[task], vit8_templates()[task])
        weight = next(v for k, v in heads.items() if k.endswith(f"heads.{task}.weight"))
        torch.testing.assert_close(weight, expected)
    config = json.loads((out / "config.json").read_text())
    assert config["tasks"]["eurosat"] == vit8_classnames()["eurosat"]  # shipped names, mapped by class id
    assert json.loads((out / "preprocessor_config.json").read_text())["crop_size"] == {"height": 16, "width": 16}
    card = ModelCard.load(out / "README.md")
    assert "## Results (split `test`)" in card.text and "base_model" not in card.data.to_dict()
    assert str(tmp_path) not in (out / "README.md").read_text()


def test_recipe_refuses_bad_sources_before_training(clip_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["atm_vit.py", "--suite", "hub-vit8", "--backbone", str(clip_folder),
                                      "--sources", "[1, 2]", "--output_dir", str(tmp_path / "out")])  # fmt: skip
    with pytest.raises(ValueError, match="--sources"):
        _recipe(monkeypatch).main()
    monkeypatch.setattr(sys, "argv", ["atm_vit.py", "--backbone", str(clip_folder), "--head_init", "random",
                                      "--output_dir", str(tmp_path / "out")])  # fmt: skip
    with pytest.raises(ValueError, match="--head_init random"):
        _recipe(monkeypatch).main()
    assert not (tmp_path / "out").exists()
