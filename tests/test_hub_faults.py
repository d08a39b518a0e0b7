"""Hub faults that must lose nothing: a mismatch between Hub inputs found from headers before any weight download,
an interrupted download that resumes, and a push that retries 429 / 5xx and keeps the folder.

* pre-check: a real ``olah`` mirror (offline, serving local git repos; tests/olah_mirror.py) behind
  :class:`~tests.olah_mirror.RecordingProxy`, which records every request and the body bytes it passed on.
  huggingface_hub reads HF_ENDPOINT at import, so the merges run in one subprocess pointed at the proxy;
* downloads and pushes: tests/hub_stub.py, a local STUB of the Hub's file-download and commit APIs (not the
  Hub), which can cut or stall a download after N bytes and fail an endpoint N times with a chosen status.

Nothing leaves 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from hf_atm.errors import CheckpointError, HubError
from tests.hub_stub import HubStub
from tests.olah_mirror import OlahMirror, RecordingProxy, make_mirror_repo

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[1]
BIG = (512, 4096)  # an 8 MiB float32 tensor: what must never be downloaded by a failing pre-check
V, H = 64, 16
UP = "model.layers.0.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"


def _llama_config(vocab: int = V, **extra) -> bytes:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "vocab_size": vocab,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 32,
           "tie_word_embeddings": True, **extra}
    return json.dumps(cfg).encode()


def _tensors(seed: int, *, vocab: int = V, up: tuple[int, int] = BIG, head: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {EMBED: torch.randn(vocab, H, generator=g), "model.norm.weight": torch.ones(H),
           UP: torch.full(up, float(seed))}
    if head:
        out["lm_head.weight"] = out[EMBED].clone()  # a tying checkpoint that stores its head anyway
    return out


def _model(seed: int, **kw) -> dict[str, bytes]:
    cfg = kw.pop("config", None) or _llama_config(vocab=kw.get("vocab", V))
    return {"config.json": cfg, "model.safetensors": save(_tensors(seed, **kw), metadata={"format": "pt"})}


def _sharded(seed: int) -> dict[str, bytes]:
    t = _tensors(seed)
    shards = {"model-00001-of-00002.safetensors": {EMBED: t[EMBED], "model.norm.weight": t["model.norm.weight"]},
              "model-00002-of-00002.safetensors": {UP: t[UP]}}
    index = {"metadata": {"total_size": 0}, "weight_map": {n: f for f, sd in shards.items() for n in sd}}
    return {"config.json": _llama_config(), "model.safetensors.index.json": json.dumps(index).encode(),
            **{f: save(sd, metadata={"format": "pt"}) for f, sd in shards.items()}}


def _adapter(a_cols: int) -> dict[str, bytes]:
    """A LoRA adapter of org/base's up_proj; lora_A has `a_cols` columns (the base weight has BIG[1])."""
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["up_proj"],
           "base_model_name_or_path": "org/base"}
    p = "base_model.model.model.layers.0.mlp.up_proj"
    sd = {f"{p}.lora_A.weight": torch.zeros(2, a_cols), f"{p}.lora_B.weight": torch.zeros(BIG[0], 2)}
    return {"adapter_config.json": json.dumps(cfg).encode(),
            "adapter_model.safetensors": save(sd, metadata={"format": "pt"})}


REPOS = {
    "org/base": _model(1),
    "org/wide": _model(2, up=(BIG[0], BIG[1] + 8)),  # one tensor of another shape
    "org/vocab": _model(3, vocab=V + 16),  # a larger vocabulary
    "org/mistral": _model(4, config=_llama_config(architectures=["MistralForCausalLM"], model_type="mistral")),
    "org/sharded": _sharded(5),  # the same tensors in two shards
    "org/tied-head": _model(6, head=True),  # stores lm_head.weight beside tied embeddings
    "org/lora-bad": _adapter(BIG[1] + 1),
}
WEIGHTS = {repo: {n: len(d) for n, d in files.items() if n.endswith(".safetensors")} for repo, files in REPOS.items()}

# Runs in a subprocess with HF_ENDPOINT = the recording proxy. Each scenario gets its own HF cache.
_SCENARIOS = r"""
import json, sys, time, traceback, urllib.request
from pathlib import Path
from huggingface_hub import constants
from hf_atm.errors import HfAtmError
from hf_atm.lora.merge import check_hub_inputs
from hf_atm.merging.config import MergeConfig
from hf_atm.lora.merge import run_merge
from hf_atm.merging.spec import MergeSpec

root = Path(sys.argv[1])
out = {}

def scenario(name, fn):
    constants.HF_HUB_CACHE = str(root / name / "cache")
    try:  # a marker request: the proxy's log is split by scenario
        urllib.request.urlopen(f"{constants.ENDPOINT}/__scenario__/{name}", timeout=10).close()
    except OSError:
        pass
    t0 = time.perf_counter()
    try:
        fn(root / name)
        out[name] = {"ok": True}
    except HfAtmError as e:
        out[name] = {"ok": False, "type": type(e).__name__, "message": str(e)}
    except Exception:
        out[name] = {"ok": False, "type": "crash", "message": traceback.format_exc()}
    out[name]["seconds"] = round(time.perf_counter() - t0, 2)

def merge(base, *models):
    def run(d):
        run_merge(MergeConfig(base=base, models=list(models), output=str(d / "out"),
                              spec=MergeSpec(method="task_arithmetic"), progress=False))
    return run

scenario("shape", merge("org/base", "org/wide"))
scenario("vocab", merge("org/base", "org/vocab"))
scenario("arch", merge("org/base", "org/mistral"))
scenario("adapter", merge(None, "org/lora-bad"))  # the base comes from the adapter's config
scenario("api_shape", lambda d: check_hub_inputs("org/base", ["org/wide"]))
scenario("api_vocab_with_source", lambda d: check_hub_inputs("org/base", ["org/vocab"], tokenizer_source="base"))
scenario("missing_api", lambda d: check_hub_inputs("org/base", ["org/no-such-repo"]))  # skipped: no error
scenario("missing", merge("org/base", "org/no-such-repo"))  # resolving it raises the usual HubError
scenario("good", merge("org/base", "org/sharded", "org/tied-head"))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def mirror_run(tmp_path_factory):
    """The olah mirror holding REPOS behind a recording proxy, and the scenarios' results."""
    root = tmp_path_factory.mktemp("faults")
    mirrors = root / "mirrors"
    for repo, files in REPOS.items():
        make_mirror_repo(mirrors, repo, files, lfs=[n for n in files if n.endswith(".safetensors")])
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    with OlahMirror(mirrors, root / "olah") as mirror, RecordingProxy(mirror.endpoint) as proxy:
        env.update(HF_ENDPOINT=proxy.url, HF_HOME=str(root / "hf-home"), HF_HUB_OFFLINE="0",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-c", _SCENARIOS, str(root / "runs")], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        requests = list(proxy.requests)
        # For the offline checks, the cache of "good" also gets org/wide, downloaded whole (after `requests`).
        from hf_atm.hub.resolve import resolve_model

        with pytest.MonkeyPatch.context() as mp:
            from huggingface_hub import constants

            mp.setattr(constants, "HF_HUB_OFFLINE", False)
            resolve_model("org/wide", endpoint=proxy.url, cache_dir=root / "runs" / "good" / "cache")
        yield {"root": root / "runs", "results": results, "proxy": proxy, "requests": requests}


def _weight_files_in(cache: Path) -> list[Path]:
    """Cached weights: snapshot entries named *.safetensors and blobs of more than 1 MB (or partial ones)."""
    if not cache.exists():
        return []
    found = [p for p in cache.rglob("*.safetensors")]
    found += [p for p in cache.rglob("blobs/*") if p.stat().st_size > 1 << 20 or p.name.endswith(".incomplete")]
    return found


@pytest.mark.parametrize("scenario, repos, words", [
    ("shape", ("org/base", "org/wide"), (UP, "(512, 4096)", "(512, 4104)")),
    ("api_shape", ("org/base", "org/wide"), (UP,)),
    ("vocab", ("org/base", "org/vocab"), (str(V), str(V + 16), "--tokenizer-source")),
    ("arch", ("org/base", "org/mistral"), ("LlamaForCausalLM", "MistralForCausalLM")),
    ("adapter", ("org/lora-bad", "org/base"), ("up_proj", "does not fit")),
])
def test_hub_mismatch_is_found_before_any_weight_download(mirror_run, scenario, repos, words):
    """The CheckpointError names the repos and the tensor (or sizes / architectures), and no weights file
    reached the cache or crossed the wire: the mirror ignores Range, and the header reads stopped early."""
    result = mirror_run["results"][scenario]
    assert result["ok"] is False and result["type"] == "CheckpointError", result
    for word in (*repos, *words):
        assert word in result["message"], (word, result["message"])
    assert _weight_files_in(mirror_run["root"] / scenario / "cache") == []
    reads = [r for r in _scenario_requests(mirror_run["requests"], scenario)
             if r["method"] == "GET" and r["path"].endswith(".safetensors")]
    probed = {r["path"].split("/resolve/")[0].lstrip("/") for r in reads}
    assert set(repos) <= probed, probed  # headers were read...
    for r in reads:  # ...by header probes only: a Range request the client hung up on after the header
        size = WEIGHTS[r["path"].split("/resolve/")[0].lstrip("/")][r["path"].rsplit("/", 1)[1]]
        assert r["range"] and r["range"].startswith("bytes=0-"), r
        probe = int(r["range"].split("-")[1]) + 1
        # 8 MiB weights: under 1 MiB crossed the wire. A file no larger than the probe (the 37 KB adapter under a
        # 100 KB probe) is its own header read: whether the mirror finished sending it before the client hung
        # up is a race, so only its bound is checked
        assert r["sent"] < (1 << 20) and (r["sent"] < size or size <= probe), (r, size)


def _scenario_requests(requests: list[dict], scenario: str) -> list[dict]:
    """The proxy's records between the marker request of `scenario` and the next marker."""
    out, inside = [], False
    for r in requests:
        if r["path"].startswith("/__scenario__/"):
            inside = r["path"] == f"/__scenario__/{scenario}"
        elif inside:
            out.append(r)
    return out


def test_big_weights_were_never_downloaded_by_failing_merges(mirror_run):
    """The repos only the failing merges use: no full GET of their weights reached the mirror at all."""
    for repo in ("org/wide", "org/vocab", "org/mistral", "org/lora-bad"):
        gets = [r for r in mirror_run["requests"] if r["method"] == "GET" and r["path"].startswith(f"/{repo}/")
                and r["path"].endswith(".safetensors")]
        assert gets and all(r["range"] for r in gets), (repo, gets)


def test_matching_sharded_and_tied_inputs_pass_and_merge(mirror_run):
    """No false alarm: a sharded model and one that stores lm_head.weight beside tied embeddings (the engine
    hides it) pass the pre-check, then download and merge."""
    from safetensors.torch import load_file

    assert mirror_run["results"]["good"]["ok"] is True, mirror_run["results"]["good"]
    assert mirror_run["results"]["api_vocab_with_source"]["ok"] is True  # rows may differ with a source
    merged = load_file(mirror_run["root"] / "good" / "out" / "model.safetensors")
    assert "lm_head.weight" not in merged  # tied, as the base
    # task arithmetic, scale 1: base + (5 - 1) + (6 - 1) on the constant tensor
    assert torch.equal(merged[UP], torch.full(BIG, 10.0))


def test_unknown_repo_is_left_to_the_resolution(mirror_run):
    """The pre-check skips a repo the Hub does not know; resolving it raises the HubError it always did."""
    assert mirror_run["results"]["missing_api"]["ok"] is True
    result = mirror_run["results"]["missing"]
    assert result["type"] == "HubError" and "cannot resolve model 'org/no-such-repo'" in result["message"]


@pytest.fixture
def offline_cache(mirror_run, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(mirror_run["root"] / "good" / "cache"))
    return mirror_run


def test_offline_check_reads_cached_headers_without_requests(offline_cache):
    """HF_HUB_OFFLINE: the check reads the cached files (no request reaches the mirror); an input not in the
    cache is skipped (resolving it then raises the usual HubError)."""
    from hf_atm.lora.merge import check_hub_inputs

    proxy = offline_cache["proxy"]
    before = len(proxy.requests)
    check_hub_inputs("org/base", ["org/sharded", "org/tied-head"])
    with pytest.raises(CheckpointError, match="org/wide") as info:
        check_hub_inputs("org/base", ["org/wide"])
    assert UP in str(info.value) and "org/base" in str(info.value)
    check_hub_inputs("org/base", ["org/vocab"])  # not cached: skipped, no error
    assert len(proxy.requests) == before


def test_local_only_merges_are_not_inspected(tmp_path):
    from hf_atm.lora.merge import check_hub_inputs

    (tmp_path / "a").mkdir()
    check_hub_inputs(str(tmp_path / "a"), [str(tmp_path / "missing")])  # the engine reports these itself


# ----------------------------------------------------------------------------------- resumed downloads
CUT = 15 << 20  # huggingface_hub writes in 10 MiB chunks: a cut after 15 MiB leaves 10 MiB on disk
CHUNK = 10 << 20


def _big_files() -> dict[str, bytes]:
    """config.json and a ~24 MiB model.safetensors of random bytes."""
    data = torch.randint(0, 256, (24 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return {"config.json": b'{"model_type": "bert"}', "model.safetensors": save({"w": data})}


@pytest.fixture
def stub(monkeypatch):
    """The local stub of the Hub's download / commit API (not the Hub), huggingface_hub online for it."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubStub() as s:
        yield s


def _gets(stub: HubStub, path: str = "model.safetensors") -> list[dict]:
    return [d for d in stub.downloads if d["path"] == path]


@pytest.mark.parametrize("path", ["hf_atm", "huggingface_hub"])
def test_dropped_connection_resumes_with_a_range_request(stub, tmp_path, monkeypatch, path):
    """The connection drops after 15 MiB: the same run continues from what reached the disk (10 MiB) with
    ``Range``, in hf_atm's resumable fetch (large files) and in huggingface_hub's own download (the rest)."""
    from hf_atm.hub import resolve

    if path == "huggingface_hub":
        monkeypatch.setattr(resolve, "RESUMABLE_MIN_BYTES", 1 << 40)
    fetched: list[str] = []
    real_fetch = resolve._fetch_resumable
    monkeypatch.setattr(resolve, "_fetch_resumable", lambda *a, **k: fetched.append(k["name"]) or real_fetch(*a, **k))
    files = _big_files()
    stub.add_model("org/big", files, lfs=["model.safetensors"])
    stub.interrupt("model.safetensors", CUT, "drop")
    size = len(files["model.safetensors"])
    folder = resolve.resolve_model("org/big", endpoint=stub.url, cache_dir=tmp_path / "cache")
    assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]
    first, second = _gets(stub)
    assert first["fault"] == "drop" and first["sent"] == CUT
    assert second["range"] == f"bytes={CHUNK}-" and second["status"] == 206
    assert second["sent"] == size - CHUNK < size
    assert fetched == (["model.safetensors"] if path == "hf_atm" else [])
    assert not list((tmp_path / "cache").rglob("*.incomplete"))


_KILLED_RUN = r"""
import sys
from hf_atm.hub.resolve import resolve_model
resolve_model("org/big", endpoint=sys.argv[1], cache_dir=sys.argv[2])
"""


def test_download_killed_midway_resumes_in_the_next_run(stub, tmp_path):
    """A run is killed while a weights file downloads; the next run asks only for the missing bytes (Range)
    and completes the file, sha256-checked. (huggingface_hub 2.x alone would start again from zero: it
    deletes its partial file.)"""
    from hf_atm.hub.resolve import resolve_model

    files = _big_files()
    stub.add_model("org/big", files, lfs=["model.safetensors"])
    stub.interrupt("model.safetensors", CUT, "stall")
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="0", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
    log = tmp_path / "killed-run.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, stub.url, str(cache)], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        partial: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in cache.rglob("*.incomplete") if p.stat().st_size >= CHUNK]
            if partial:
                break
            time.sleep(0.1)
        assert partial, f"no partial file appeared: {log.read_text()[-2000:]}"
    finally:
        proc.kill()  # the interruption: the process dies mid-download
        proc.wait(timeout=30)
    stub.release()
    assert _gets(stub)[0]["fault"] == "stall"
    assert partial[0].name == hashlib.sha256(files["model.safetensors"]).hexdigest() + ".incomplete"

    size = len(files["model.safetensors"])
    folder = resolve_model("org/big", endpoint=stub.url, cache_dir=cache)
    assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]
    resumed = _gets(stub)[-1]
    assert resumed["range"] == f"bytes={CHUNK}-" and resumed["status"] == 206
    assert resumed["sent"] == size - CHUNK < size
    assert not list(cache.rglob("*.incomplete"))


def test_corrupt_partial_file_is_fetched_again(stub, tmp_path):
    """A partial file whose bytes do not belong to the file: the resumed result fails its sha256 and the file
    is fetched once more, whole."""
    from huggingface_hub.file_download import repo_folder_name

    from hf_atm.hub.resolve import resolve_model

    files = _big_files()
    stub.add_model("org/big", files, lfs=["model.safetensors"])
    sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
    blobs = tmp_path / "cache" / repo_folder_name(repo_id="org/big", repo_type="model") / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha}.incomplete").write_bytes(b"\0" * CHUNK)  # not the file's first bytes
    folder = resolve_model("org/big", endpoint=stub.url, cache_dir=tmp_path / "cache")
    assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert [d["range"] for d in _gets(stub)] == [f"bytes={CHUNK}-", None]


# ------------------------------------------------------------------------------------------ push retries
# huggingface_hub 2.x already retries its preupload, LFS and commit requests inside upload_folder (http_backoff:
# 5 retries, 1 s doubling to 8 s, or Retry-After + 1 s); create_repo / create_branch it does not retry. hf_atm's
# RetryPolicy wraps every step, so a step is given up only when both have run out. Tests on the commit endpoint
# replace huggingface_hub's backoff sleep with a recorder (`hf_sleeps`) to stay fast.
TOKEN = "hf_" + "x" * 32


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "bert"}\n')
    (out / "model.safetensors").write_bytes(save({"w": torch.ones(64, 64)}))
    return out


@pytest.fixture
def hf_sleeps(monkeypatch):
    """huggingface_hub's http_backoff pauses, recorded instead of slept (its module's ``time.sleep``)."""
    import huggingface_hub.utils._http as hf_http

    real, slept = hf_http.time, []

    class _Time:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def sleep(seconds):
            slept.append(seconds)

    monkeypatch.setattr(hf_http, "time", _Time())
    return slept


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _policy(sleeps: list[float], attempts: int = 4):
    from hf_atm.hub.push import RetryPolicy

    return RetryPolicy(attempts=attempts, base_delay=0.5, max_delay=30.0, sleep=sleeps.append)


def _pushed(stub: HubStub, folder: Path, rev: str = "main") -> bool:
    return stub.files("org/merged", rev) == {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("endpoint, status", [("create", 500), ("create", 429), ("branch", 502), ("branch", 503),
                                              ("branch", 504)])
def test_push_retries_transient_errors_with_exponential_backoff(stub, folder, endpoint, status):
    """A step of the commit API (local stub) fails twice with `status`: the push waits 0.5 s, then 1 s (no
    Retry-After), and succeeds."""
    from hf_atm.hub.push import push_folder

    stub.inject(endpoint, status, f"transient {status}", times=2)
    sleeps: list[float] = []
    push_folder(folder, "org/merged", token=TOKEN, endpoint=stub.url, retry=_policy(sleeps), revision="dev")
    assert sleeps == [0.5, 1.0] and stub.calls[endpoint] == 3
    assert _pushed(stub, folder, "dev") and len(stub.commits) == 1


def test_push_honours_retry_after(stub, folder):
    from hf_atm.hub.push import push_folder

    stub.inject("create", 429, "You are being rate limited", headers={"Retry-After": "7"})
    sleeps: list[float] = []
    push_folder(folder, "org/merged", token=TOKEN, endpoint=stub.url, retry=_policy(sleeps))
    assert sleeps == [7.0] and _pushed(stub, folder)


def test_push_gives_up_naming_the_hub_message_and_keeps_the_folder(stub, folder):
    from hf_atm.hub.push import push_folder

    before = _digest(folder)
    stub.inject("create", 503, "Service Unavailable: the Hub is under maintenance", times=10)
    sleeps: list[float] = []
    with pytest.raises(HubError) as info:
        push_folder(folder, "org/merged", token=TOKEN, endpoint=stub.url, retry=_policy(sleeps, attempts=3))
    text = str(info.value)
    assert "Service Unavailable: the Hub is under maintenance" in text
    assert "create the repo, 3 attempts" in text and f"hf-atm push {folder}" in text and "\n" not in text
    assert sleeps == [0.5, 1.0] and stub.calls["create"] == 3 and stub.commits == []
    assert _digest(folder) == before


def test_push_does_not_wait_for_a_retry_after_beyond_the_cap(stub, folder):
    from hf_atm.hub.push import push_folder

    stub.inject("create", 429, "Rate limit: 100 repos per hour", headers={"Retry-After": "3600"})
    sleeps: list[float] = []
    with pytest.raises(HubError, match="retry after 3600 s") as info:
        push_folder(folder, "org/merged", token=TOKEN, endpoint=stub.url, retry=_policy(sleeps))
    assert "Rate limit: 100 repos per hour" in str(info.value)
    assert sleeps == [] and stub.calls["create"] == 1


@pytest.mark.parametrize("endpoint", ["create", "commit"])
def test_push_does_not_retry_client_errors(stub, folder, hf_sleeps, endpoint):
    from hf_atm.hub.push import push_folder

    stub.inject(endpoint, 403, "Forbidden: read-only token", times=5)
    sleeps: list[float] = []
    with pytest.raises(HubError, match="Forbidden: read-only token"):
        push_folder(folder, "org/merged", token=TOKEN, endpoint=stub.url, retry=_policy(sleeps))
    assert sleeps == [] and hf_sleeps == [] and stub.calls[endpoint] == 1


def test_commit_errors_are_retried_by_huggingface_hub_then_by_the_policy(stub, folder, hf_sleeps):
    """The commit endpoint answers 503 eight times: huggingface_hub's own backoff absorbs six (1, 2, 4, 8, 8 s),
    hf_atm's policy re-runs the upload once (0.5 s), and the push lands; files already sent are not re-sent."""
    from hf_atm.hub.push import push_folder

    stub.inject("commit", 503, "Service Unavailable", times=8)
    sleeps: list[float] = []
    push_folder(folder, "org/merged", token=TOKEN, endpoint=stub.url, retry=_policy(sleeps))
    assert hf_sleeps[:5] == [1, 2, 4, 8, 8] and sleeps == [0.5]
    assert stub.calls["commit"] == 9 and _pushed(stub, folder) and len(stub.commits) == 1


def test_retry_after_as_http_date():
    import email.utils

    from hf_atm.hub.push import _retry_after

    class Response:
        def __init__(self, value):
            self.headers = {"Retry-After": value}

    class Failure(Exception):
        def __init__(self, value):
            self.response = Response(value)

    assert _retry_after(Failure("12")) == 12.0
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _retry_after(Failure(later)) <= 31
    assert _retry_after(Failure("soon")) is None


def test_merge_push_failing_after_retries_keeps_the_merged_folder(stub, tmp_path, monkeypatch, capsys, hf_sleeps):
    """`hf-atm merge --push-to-hub` against a Hub whose commit API keeps answering 502: exit 2 with the Hub's
    message and the retry command after every retry, and the merged folder stays for `hf-atm push`."""
    from huggingface_hub import constants

    from hf_atm.cli import main
    from hf_atm.hub import push
    from tests.helpers import make_bert_checkpoints

    monkeypatch.setattr(constants, "ENDPOINT", stub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "y" * 32)
    sleeps: list[float] = []
    monkeypatch.setattr(push, "DEFAULT_RETRY", _policy(sleeps, attempts=2))
    base, models = make_bert_checkpoints(tmp_path / "ckpt", 2, hidden=16, layers=1)
    stub.inject("commit", 502, "Bad Gateway from the Hub's front end", times=100)
    out = tmp_path / "merged"
    code = main(["merge", "--base", str(base), "--models", *map(str, models), "--method", "task_arithmetic",
                 "--output", str(out), "--no-progress", "--push-to-hub", "org/merged"])
    err = capsys.readouterr().err
    assert code == 2 and "Bad Gateway from the Hub's front end" in err and f"hf-atm push {out}" in err
    assert "2 attempts" in err and sleeps == [0.5] and stub.calls["commit"] == 12  # 2 x (1 + 5 in the client)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
