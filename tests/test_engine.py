"""The streaming merge engine (hf_atm.merging.engine) against the in-memory reference, shards, dtypes, card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from hf_atm.merging.config import MergeConfig
from hf_atm.merging.engine import merge_checkpoints, merge_state_dicts_in_memory, run_merge
from hf_atm.merging.spec import METHODS, MergeSpec
from tests.helpers import load_checkpoint, make_bert_checkpoints, save_raw_checkpoint
from tests.merge_cases import SPECS
from tests.merge_cases import assert_bit_equal as _assert_bit_equal
from tests.merge_cases import merge_config as _config


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny BERT base and 3 models, saved sharded (several shards each)."""
    root = tmp_path_factory.mktemp("ckpts")
    return make_bert_checkpoints(root, 3, hidden=32, layers=2, max_shard_size="40KB")


def test_every_method_is_covered():
    assert set(SPECS) == set(METHODS)


@pytest.mark.parametrize("method", sorted(SPECS))
def test_streaming_equals_in_memory_bit_for_bit(ckpts, tmp_path, method):
    base, models = ckpts
    spec = SPECS[method]
    models = models[:1] if method == "slerp" else models
    # a tiny slice size makes the element-wise methods stream every large tensor in many pieces
    out = merge_checkpoints(_config(base, models, tmp_path / "out", spec), chunk_elements=1000)
    ref = merge_state_dicts_in_memory(spec, load_checkpoint(base), [load_checkpoint(m) for m in models])
    got = load_checkpoint(out)
    _assert_bit_equal(got, ref)
    changed = sum(not torch.equal(got[k], load_checkpoint(base)[k]) for k in got)
    assert changed > len(got) // 2  # the merge did something


def test_sharded_in_and_out_loads_with_automodel(ckpts, tmp_path):
    from transformers import AutoModel

    base, models = ckpts
    spec = SPECS["ties"]
    result = run_merge(_config(base, models, tmp_path / "out", spec, max_shard_size="30KB"))
    out = result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert result.num_shards == len(shard_files) >= 3
    assert sorted(set(index["weight_map"].values())) == shard_files
    ref = merge_state_dicts_in_memory(spec, load_checkpoint(base), [load_checkpoint(m) for m in models])
    assert set(index["weight_map"]) == set(ref)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    for f in shard_files:  # every shard respects the limit (no single tensor here exceeds it)
        assert (out / f).stat().st_size <= 30_000 + 4096
    model = AutoModel.from_pretrained(out)
    sd = model.state_dict()
    for k, t in ref.items():
        assert torch.equal(sd[k], t), k
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "merge_config.yaml", "README.md"):
        assert (out / name).is_file(), name
    assert (out / "vocab.txt").read_bytes() == (base / "vocab.txt").read_bytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_kept_and_dtype_casts(tmp_path, dtype):
    base, models = make_bert_checkpoints(tmp_path / "in", 2, hidden=16, layers=1, dtype=dtype)
    spec = MergeSpec("task_arithmetic", weights=(0.6, 0.9))
    base_sd, model_sds = load_checkpoint(base), [load_checkpoint(m) for m in models]
    kept = load_checkpoint(merge_checkpoints(_config(base, models, tmp_path / "kept", spec)))
    assert {t.dtype for t in kept.values()} == {dtype}
    _assert_bit_equal(kept, merge_state_dicts_in_memory(spec, base_sd, model_sds))

    out = merge_checkpoints(_config(base, models, tmp_path / "cast", spec, dtype="float32"))
    cast = load_checkpoint(out)
    assert {t.dtype for t in cast.values()} == {torch.float32}
    ref32 = merge_state_dicts_in_memory(spec, base_sd, model_sds, dtype=torch.float32)
    _assert_bit_equal(cast, ref32)
    # float32 keeps what rounding to the half dtype would lose
    assert any(not torch.equal(cast[k], kept[k].float()) for k in cast)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_float32_to_bfloat16(ckpts, tmp_path):
    base, models = ckpts
    spec = SPECS["ties"]
    got = load_checkpoint(merge_checkpoints(_config(base, models, tmp_path / "o", spec, dtype="bfloat16")))
    ref = merge_state_dicts_in_memory(spec, load_checkpoint(base), [load_checkpoint(m) for m in models])
    _assert_bit_equal(got, {k: v.bfloat16() for k, v in ref.items()})


def test_non_float_tensors_come_from_the_base(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g)
    base = save_raw_checkpoint(tmp_path / "b", {"w": w, "ids": torch.arange(6), "flag": torch.tensor([True])})
    models = [
        save_raw_checkpoint(tmp_path / f"m{i}", {"w": w + 0.1 * (i + 1), "ids": torch.arange(6) * (i + 2),
                                                 "flag": torch.tensor([False])})
        for i in range(2)
    ]
    for method in ("task_arithmetic", "ties", "average"):
        got = load_checkpoint(merge_checkpoints(_config(base, models, tmp_path / method, MergeSpec(method),
                                                        dtype="float16")))
        assert torch.equal(got["ids"], torch.arange(6)) and torch.equal(got["flag"], torch.tensor([True]))
        assert got["w"].dtype == torch.float16 and got["ids"].dtype == torch.int64


def test_yaml_fed_back_reproduces_bit_for_bit(ckpts, tmp_path):
    base, models = ckpts
    spec = MergeSpec("dare_ties", density=0.4, seed=7, weights=(1.0, 0.5, 2.0))
    out1 = merge_checkpoints(_config(base, models, tmp_path / "one", spec, max_shard_size="50KB"))
    cfg = MergeConfig.from_yaml(out1 / "merge_config.yaml")
    assert cfg.spec == spec and cfg.max_shard_size == "50KB" and cfg.dtype is None
    cfg.output = str(tmp_path / "two")
    cfg.progress = False
    out2 = merge_checkpoints(cfg)
    files1 = sorted(p.name for p in out1.iterdir())
    assert files1 == sorted(p.name for p in out2.iterdir())
    for name in files1:
        if name not in ("merge_config.yaml", "README.md"):  # these name the output folder
            assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name
    y1 = yaml.safe_load((out1 / "merge_config.yaml").read_text())
    y2 = yaml.safe_load((out2 / "merge_config.yaml").read_text())
    assert {**y1, "output": None} == {**y2, "output": None}
    assert y1["hf_atm_version"] and y1["method"] == "dare_ties" and y1["seed"] == 7


def test_card_metadata_for_local_inputs(ckpts, tmp_path):
    base, models = ckpts
    out = merge_checkpoints(_config(base, models, tmp_path / "o", SPECS["ties"]))
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["tags"] == ["merge", "hf_atm", "ties"]
    assert data["library_name"] == "transformers"
    assert "base_model" not in data  # local folders are no Hub repos
    assert "model_1" in card.text and "merge_config.yaml" in card.text


def _fake_hub_cache(cache: Path, repo_id: str, src: Path, commit: str) -> Path:
    """Lay out `src` in a huggingface_hub cache as `repo_id` at `commit` (refs/main -> commit)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_hub_references_card_and_pinned_revisions(ckpts, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    base, models = ckpts
    cache = tmp_path / "hub"
    commits = {name: f"{i:x}" * 40 for i, name in enumerate(["org/base", "org/m0", "org/m1", "org/m2"], 1)}
    for (repo_id, commit), src in zip(commits.items(), [base, *models]):
        _fake_hub_cache(cache, repo_id, src, commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    refs = ["org/m0", f"org/m1@{commits['org/m1']}", "org/m2"]
    out = merge_checkpoints(MergeConfig(base="org/base", models=refs, output=str(tmp_path / "o"),
                                        spec=SPECS["ties"], progress=False))
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["base_model"] == ["org/m0", "org/m1", "org/m2", "org/base"]
    assert data["base_model_relation"] == "merge"
    assert data["tags"] == ["merge", "hf_atm", "ties"] and data["library_name"] == "transformers"
    recorded = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert recorded["models"] == refs and recorded["base"] == "org/base"
    assert recorded["revisions"]["org/base"] == commits["org/base"]
    assert recorded["revisions"]["org/m0"] == commits["org/m0"]
    local = load_checkpoint(merge_checkpoints(_config(base, models, tmp_path / "local", SPECS["ties"])))
    _assert_bit_equal(load_checkpoint(out), local)
    # the recorded commits pin a re-run: "main" moving to a commit that is not cached no longer matters
    (cache / "models--org--m0" / "refs" / "main").write_text("f" * 40)
    again = MergeConfig.from_yaml(out / "merge_config.yaml")
    again.output, again.progress = str(tmp_path / "again"), False
    _assert_bit_equal(load_checkpoint(merge_checkpoints(again)), local)


def test_card_never_contains_a_token():
    from hf_atm.hub.card import merge_model_card

    token = "hf_" + "a1B2c3D4" * 5
    card = merge_model_card(base="org/base", models=["org/a", "org/b"], method="ties", options={"density": 0.2},
                            config_yaml=f"base: org/base\nnote: https://user:{token}@example.com\n{token}\n")
    assert token not in str(card) and "***" in str(card)
    assert card.data.to_dict()["base_model"] == ["org/a", "org/b", "org/base"]


@pytest.mark.slow
def test_bert_base_sized_sharded_fixture(tmp_path):
    """BERT-base width (hidden 768, the 30522 vocabulary) but 4 layers instead of 12 (53M parameters; 12 layers
    took 10 s alone and > 30 s on a loaded 2-core machine), float16, 2 models saved in 50MB shards and merged into
    40MB shards (the 47MB word embeddings exceed it and get a shard of their own). task_arithmetic takes the
    sliced streaming path; TIES at this size spends most of its time in torch.topk and is left to the benchmark."""
    base, models = make_bert_checkpoints(tmp_path / "in", 2, hidden=768, layers=4, vocab_size=30522,
                                         max_shard_size="50MB", dtype=torch.float16, tokenizer_files=False)
    assert len(list(base.glob("model-*.safetensors"))) >= 2
    spec = MergeSpec("task_arithmetic", weights=(0.7, 0.4), scale=0.9)
    result = run_merge(_config(base, models, tmp_path / "out", spec, max_shard_size="40MB"))
    assert result.num_shards >= 3
    index = json.loads((result.output / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["embeddings.word_embeddings.weight"] not in {
        f for k, f in index["weight_map"].items() if k != "embeddings.word_embeddings.weight"
    }
    ref = merge_state_dicts_in_memory(spec, load_checkpoint(base), [load_checkpoint(m) for m in models])
    _assert_bit_equal(load_checkpoint(result.output), ref)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs"])
def test_sliced_whole_tensor_methods_stream_bit_for_bit_with_ties(tmp_path, method):
    """float16 checkpoints on a coarse grid (magnitudes tie at every cut), merged in 7-element slices."""
    g = torch.Generator().manual_seed(60)
    base_sd = {"w": (torch.randint(-8, 9, (40, 9), generator=g).float() / 8).half(), "b": torch.zeros(9).half()}
    base = save_raw_checkpoint(tmp_path / "base", base_sd)
    models, model_sds = [], []
    for i in range(3):
        sd = {k: v + (torch.randint(-4, 5, v.shape, generator=g).float() / 4).half() for k, v in base_sd.items()}
        models.append(save_raw_checkpoint(tmp_path / f"m{i}", sd))
        model_sds.append(sd)
    spec = SPECS[method]
    out = merge_checkpoints(_config(base, models, tmp_path / "out", spec), chunk_elements=7)
    _assert_bit_equal(load_checkpoint(out), merge_state_dicts_in_memory(spec, base_sd, model_sds))


def test_companion_files_travel_and_a_hub_base_fetches_them(tmp_path):
    """What the output copies from a local base (configs, tokenizer, processor) is what a Hub base is fetched
    with: one list of companion files (hub.resolve), so a processor config is never lost on the Hub path."""
    from hf_atm.hub.resolve import MERGE_FILE_PATTERNS
    from hf_atm.merging.engine import COPY_PATTERNS

    assert set(COPY_PATTERNS) <= set(MERGE_FILE_PATTERNS)
    base, models = make_bert_checkpoints(tmp_path / "in", 3, hidden=16, layers=1)
    extra = {"preprocessor_config.json": '{"do_resize": false}', "feature_extractor_config.json": "{}",
             "tokenizer.model": "sp", "notes.txt": "not a companion"}
    for name, text in extra.items():
        (base / name).write_text(text)
    out = merge_checkpoints(_config(base, models, tmp_path / "out", SPECS["task_arithmetic"]))
    for name, text in extra.items():
        assert ((out / name).read_text() if (out / name).is_file() else None) == (
            None if name == "notes.txt" else text), name
