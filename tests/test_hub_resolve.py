"""Model references: local folders, and Hub repo ids ("org/name@rev") resolved over HTTP from a real ``olah``
mirror (offline, serving local git repositories) and then from the pre-filled cache under HF_HUB_OFFLINE=1.

huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE when it is imported, so downloads over HTTP
run in a subprocess with those variables set (as a user's shell would), and in-process offline checks
monkeypatch ``huggingface_hub.constants`` (restored after each test). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from hf_atm.errors import HubError
from hf_atm.hub.resolve import resolve_model, split_revision
from tests.olah_mirror import OlahMirror, add_commit, make_mirror_repo

REPO = "org/tiny-bert"
DECOYS = ("pytorch_model.bin", "flax_model.msgpack", "tf_model.h5")


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embeddings.word_embeddings.weight": torch.randn(50, 16, generator=g),
        "encoder.layer.0.attention.self.query.weight": torch.randn(16, 16, generator=g),
        "encoder.layer.0.attention.self.query.bias": torch.randn(16, generator=g),
        "embeddings.position_ids": torch.arange(8).unsqueeze(0),
    }


def _files(seed: int) -> dict[str, bytes]:
    config = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "seed": seed}
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": save(_weights(seed), metadata={"format": "pt"}),
        "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n",
        "tokenizer_config.json": b'{"do_lower_case": true}',
        "README.md": b"---\nlicense: apache-2.0\n---\n# tiny\n",
        # Files a merge must never fetch: pickles and other frameworks' weights.
        **{name: f"decoy {name} {seed}".encode() * 10 for name in DECOYS},
    }


_DOWNLOAD = """
import json, sys
from hf_atm.hub.resolve import resolve_model
from hf_atm.errors import HubError
out = {}
for ref in sys.argv[1:]:
    try:
        out[ref] = str(resolve_model(ref))
    except HubError as e:
        out[ref] = "HubError: " + str(e)
print(json.dumps(out))
"""


def _download(endpoint: str, cache: Path, home: Path, refs: list[str]) -> dict[str, str]:
    """resolve_model(ref) for each ref in a fresh process pointed at `endpoint` (HF_ENDPOINT) and `cache`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), HF_HOME=str(home), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run([sys.executable, "-c", _DOWNLOAD, *refs], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


ENCODER = "org/tiny-encoder"


def _encoder_files() -> dict[str, bytes]:
    """A complete tiny BERT (weights, config, WordPiece tokenizer) that AutoModel / AutoTokenizer load."""
    import tempfile

    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "the", "a", "of"]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.txt").write_text("\n".join(words) + "\n")
        BertTokenizerFast(vocab_file=str(Path(d) / "vocab.txt")).save_pretrained(Path(d) / "out")
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)
        BertModel(cfg).save_pretrained(Path(d) / "out")
        return {p.name: p.read_bytes() for p in (Path(d) / "out").iterdir()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A mirror holding REPO (commit v1 tagged ``v1``, then a second commit on ``main``) and a Hub cache
    filled from it over HTTP by resolve_model. Yields a dict of paths, commits and download results."""
    root = tmp_path_factory.mktemp("hub")
    mirrors = root / "mirrors"
    v1_files, main_files = _files(1), _files(2)
    repo, v1 = make_mirror_repo(mirrors, REPO, v1_files, lfs=["model.safetensors"], tag="v1")
    main = add_commit(repo, main_files, "second commit", lfs=["model.safetensors"])
    make_mirror_repo(mirrors, ENCODER, _encoder_files(), lfs=["model.safetensors"], tag="v1")
    cache = root / "hf-cache"
    with OlahMirror(mirrors, root / "olah") as mirror:
        refs = [REPO, f"{REPO}@main", f"{REPO}@v1", f"{REPO}@{v1}", "org/no-such-repo", f"{REPO}@no-such-branch",
                f"{ENCODER}@v1"]
        results = _download(mirror.endpoint, cache, root / "hf-home", refs)
    yield {"cache": cache, "v1": v1, "main": main, "v1_files": v1_files, "main_files": main_files,
           "results": results}


@pytest.fixture
def offline_cache(hub, monkeypatch):
    """huggingface_hub switched to offline mode with the filled cache as HF_HUB_CACHE (restored afterwards)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def _snapshot_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_http_download_from_olah_fetches_only_merge_files(hub):
    results = hub["results"]
    head = Path(results[REPO])
    # A branch resolves to its commit's snapshot in the standard cache layout.
    assert head == hub["cache"] / "models--org--tiny-bert" / "snapshots" / hub["main"]
    assert Path(results[f"{REPO}@main"]) == head
    got = _snapshot_files(head)
    assert set(got) == {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"}
    for name, data in got.items():
        assert data == hub["main_files"][name], name
    loaded = load_file(head / "model.safetensors")
    for name, t in _weights(2).items():
        assert torch.equal(loaded[name], t), name
    # No decoy (pickle / flax / tf weights) and no README reached the cache, not even as a blob.
    blobs = [p.read_bytes() for p in (hub["cache"] / "models--org--tiny-bert" / "blobs").iterdir()]
    for files in (hub["v1_files"], hub["main_files"]):
        for name in (*DECOYS, "README.md"):
            assert files[name] not in blobs, name
    assert not any(p.name in DECOYS for p in hub["cache"].rglob("*"))


def test_http_tag_and_commit_resolve_to_that_commit(hub):
    results = hub["results"]
    tagged = Path(results[f"{REPO}@v1"])
    assert tagged.name == hub["v1"]
    assert Path(results[f"{REPO}@{hub['v1']}"]) == tagged
    assert (tagged / "model.safetensors").read_bytes() == hub["v1_files"]["model.safetensors"]
    assert (tagged / "model.safetensors").read_bytes() != hub["main_files"]["model.safetensors"]


def test_http_errors_carry_the_hub_message(hub):
    missing = hub["results"]["org/no-such-repo"]
    assert missing.startswith("HubError: ") and "org/no-such-repo" in missing
    assert "404" in missing or "not found" in missing.lower()
    bad_rev = hub["results"][f"{REPO}@no-such-branch"]
    assert bad_rev.startswith("HubError: ") and "no-such-branch" in bad_rev


@pytest.mark.parametrize("rev", [None, "main", "v1", "commit"])
def test_offline_resolution_from_prefilled_cache(offline_cache, rev):
    hub = offline_cache
    if rev is None:
        ref, commit = REPO, hub["main"]
    elif rev == "commit":
        ref, commit = f"{REPO}@{hub['v1']}", hub["v1"]
    else:
        ref, commit = f"{REPO}@{rev}", hub["main"] if rev == "main" else hub["v1"]
    path = resolve_model(ref)
    assert path == hub["cache"] / "models--org--tiny-bert" / "snapshots" / commit
    files = hub["v1_files"] if commit == hub["v1"] else hub["main_files"]
    assert (path / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_offline_missing_entries_raise_hub_error(offline_cache):
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        resolve_model(f"{REPO}@never-downloaded")
    with pytest.raises(HubError, match="org/absent"):
        resolve_model("org/absent")


def test_offline_merge_from_repo_ids(offline_cache, tmp_path):
    """The merge command takes repo ids: base v1 plus (main - v1) with task arithmetic gives main."""
    from hf_atm.cli import main

    out = tmp_path / "merged"
    code = main(["merge", "--base", f"{REPO}@v1", "--models", REPO, "--method", "task_arithmetic",
                 "--output", str(out), "--no-progress"])
    assert code == 0
    merged = load_file(out / "model.safetensors")
    for name, t in _weights(2).items():
        torch.testing.assert_close(merged[name], t, rtol=0, atol=1e-6)


def test_local_folder_wins_and_bad_references(tmp_path, monkeypatch):
    folder = tmp_path / "org" / "name"
    folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/name") == folder.resolve()  # an existing path is never a repo id
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(HubError, match="is a file"):
        resolve_model(tmp_path / "file.txt")
    with pytest.raises(HubError, match="neither an existing local folder nor a valid Hub repo id"):
        resolve_model("not a//repo")
    with pytest.raises(HubError, match="org/name@revision"):
        split_revision("org/name@")
    assert split_revision("org/name@v1.0") == ("org/name", "v1.0")


def test_recipe_takes_a_repo_id_with_revision(offline_cache, tmp_path):
    """`recipes/atm_text.py --backbone org/name@rev` resolves through the (offline) Hub cache: backbone,
    tokenizer and model card's base_model."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(offline_cache["cache"]), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(root / "recipes" / "atm_text.py"), "--backbone", f"{ENCODER}@v1",
                           "--pooling", "cls", "--max_train_per_task", "24", "--max_test_per_task", "12",
                           "--max_length", "16", "--rounds", "1", "--baselines", "False", "--output_dir", str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Test accuracy (%)" in proc.stdout
    card = (out / "README.md").read_text()
    assert f"{ENCODER}@v1" in card or ENCODER in card
