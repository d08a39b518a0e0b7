"""Lazy checkpoint reading and the streaming sharded safetensors writer (hf_atm.merging.io)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.merging.io import CheckpointReader, ShardedWriter, parse_size, plan_shards, shard_file_names
from tests.helpers import save_raw_checkpoint


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GB", 2 * 10**9),
        ("500MB", 500 * 10**6),
        ("10KB", 10_000),
        ("10kb", 10_000 // 8),  # transformers: a lowercase b means bits
        ("1GiB", 2**30),
        ("4KiB", 4096),
        ("1.5GB", 1_500_000_000),
        ("123", 123),
        ("100B", 100),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["2XB", "GB", "", "-1GB", 0, "0MB", True])
def test_parse_size_rejects_naming_the_option(bad):
    with pytest.raises(MergeConfigError, match="max_shard_size"):
        parse_size(bad)


def test_plan_shards_matches_huggingface_hub():
    gen = torch.Generator().manual_seed(0)
    sd = {f"t{i}": torch.empty(int(torch.randint(1, 400, (1,), generator=gen))) for i in range(40)}
    sd["huge"] = torch.empty(2000)  # larger than the limit: its own shard
    limit = 1500
    split = split_torch_state_dict_into_shards(sd, max_shard_size=limit)
    groups = plan_shards([(k, v.numel() * 4) for k, v in sd.items()], limit)
    names = shard_file_names(len(groups))
    assert sorted(names) == sorted(split.filename_to_tensors)
    assert {k: names[i] for i, g in enumerate(groups) for k in g} == split.tensor_to_filename


def _tensors():
    g = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.half": torch.randn(33, generator=g).half(),
        "c.bf16": torch.randn(3, 4, 2, generator=g).bfloat16(),
        "d.ids": torch.arange(17, dtype=torch.int64),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.empty(0, 4),
        "h.double": torch.randn(6, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("max_size", [10**9, 100])
def test_writer_roundtrip_whole_and_in_pieces(tmp_path, max_size):
    tensors = _tensors()
    writer = ShardedWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], max_size)
    for name, t in tensors.items():
        flat = t.reshape(-1)
        if flat.numel() > 4:  # several consecutive pieces
            for s in range(0, flat.numel(), 4):
                writer.write(name, flat[s : s + 4])
        else:
            writer.write(name, t)
    files = writer.finish()
    assert len(files) == writer.num_shards
    loaded = {}
    for f in files:
        with safe_open(tmp_path / f, framework="pt") as h:
            assert h.metadata() == {"format": "pt"}
            loaded.update({k: h.get_tensor(k) for k in h.keys()})
        loaded_sf = load_file(tmp_path / f)  # the plain loader accepts it too
        assert set(loaded_sf) <= set(tensors)
    assert set(loaded) == set(tensors)
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape
        assert torch.equal(loaded[k], t)
    index = tmp_path / "model.safetensors.index.json"
    if max_size == 100:
        assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        data = json.loads(index.read_text())
        assert data["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert set(data["weight_map"]) == set(tensors)
        for name, f in data["weight_map"].items():
            with safe_open(tmp_path / f, framework="pt") as h:
                assert name in h.keys()
    else:
        assert files == ["model.safetensors"] and not index.exists()


def test_writer_is_byte_identical_to_itself_and_rejects_misuse(tmp_path):
    tensors = _tensors()
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        w = ShardedWriter(tmp_path / sub, specs, 10**6)
        for k, v in tensors.items():
            w.write(k, v)
        w.finish()
    assert (tmp_path / "x/model.safetensors").read_bytes() == (tmp_path / "y/model.safetensors").read_bytes()
    (tmp_path / "z").mkdir()
    w = ShardedWriter(tmp_path / "z", specs, 10**6)
    with pytest.raises(RuntimeError, match="expected tensor 'a.weight'"):
        w.write("b.half", tensors["b.half"])
    with pytest.raises(RuntimeError, match="dtype"):
        w.write("a.weight", tensors["a.weight"].double())
    with pytest.raises(RuntimeError, match="more bytes"):
        w.write("a.weight", torch.zeros(100))
    with pytest.raises(RuntimeError, match="finished before"):
        w.finish()
    w.abort()


def test_reader_single_and_sharded_in_storage_order(tmp_path):
    tensors = _tensors()
    single = save_raw_checkpoint(tmp_path / "single", tensors)
    sharded = save_raw_checkpoint(tmp_path / "sharded", tensors, shards=3)
    for folder in (single, sharded):
        with CheckpointReader(folder) as r:
            assert sorted(r.names) == sorted(tensors)
            assert len(r.files) == (1 if folder == single else 3)
            offsets = []
            for name in r.names:
                info = r.info(name)
                assert info.dtype == tensors[name].dtype and info.shape == tuple(tensors[name].shape)
                assert torch.equal(r.get(name), tensors[name])
                with safe_open(info.file, framework="pt") as h:
                    offsets.append((r.files.index(info.file), h.offset_keys().index(name)))
            assert offsets == sorted(offsets)  # files in order, then by offset


def test_reader_errors_name_the_file(tmp_path):
    t = {"w": torch.ones(4)}
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights in .*empty.*model.safetensors"):
        CheckpointReader(empty)

    corrupt = save_raw_checkpoint(tmp_path / "corrupt", t)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt.*corrupt/model.safetensors"):
        CheckpointReader(corrupt)

    truncated = save_raw_checkpoint(tmp_path / "truncated", {"w": torch.ones(1000)})
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated/model.safetensors"):
        CheckpointReader(truncated)

    missing_shard = save_raw_checkpoint(tmp_path / "ms", {"a": torch.ones(2), "b": torch.ones(3)}, shards=2)
    (missing_shard / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        CheckpointReader(missing_shard)

    bad_index = save_raw_checkpoint(tmp_path / "bi", {"a": torch.ones(2), "b": torch.ones(3)}, shards=2)
    (bad_index / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="corrupt checkpoint index .*bi/model.safetensors.index.json"):
        CheckpointReader(bad_index)


def test_reader_pickles_only_when_allowed(tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    sd = {"w": torch.randn(3, 2), "ids": torch.arange(3)}
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle") as e:
        CheckpointReader(folder)
    assert "pytorch_model.bin" in str(e.value) and "arbitrary code" in str(e.value)
    with CheckpointReader(folder, allow_pickle=True) as r:
        assert r.format == "pickle" and set(r.names) == set(sd)
        assert torch.equal(r.get("w"), sd["w"]) and torch.equal(r.get("ids"), sd["ids"])


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release uses madvise / procfs")
def test_release_returns_mapped_pages_and_keeps_data(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    big = torch.arange(16 * 2**20, dtype=torch.float32)  # 64 MiB
    save_file({"big": big, "small": torch.ones(3)}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text("{}")
    with CheckpointReader(folder) as r:
        t = r.get("big")
        assert float(t[:: 1024].sum()) == float(big[::1024].sum())  # touch every page
        assert float(t.sum()) == float(big.sum())
        before = _rss_file_kb()
        r.release(t)
        after = _rss_file_kb()
        assert before - after > 50 * 1024, (before, after)
        assert torch.equal(t, big)  # the data is still there (mapped back from the page cache)
        own = torch.ones(2**20)
        r.release(own)  # not a file map: left alone
        assert bool((own == 1).all())
