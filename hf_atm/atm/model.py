"""MultiTaskModel: one shared backbone (any transformers model) and one linear classification head per task.

Only the backbone is merged by ATM; each head belongs to its task (made by a head protocol, trained during that
task's fine-tuning unless frozen).

MultiTaskModel is a transformers ``PreTrainedModel`` with its own config class, :class:`MultiTaskConfig`
(``model_type`` ``"hf_atm_multitask"``, registered with ``AutoConfig``, ``AutoModel``,
``AutoModelForSequenceClassification`` and ``AutoModelForImageClassification`` when this module is imported).
``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` are transformers' own: a saved folder holds
``config.json`` (the tasks and label names, pooling, head protocol, the backbone's own config and where the
backbone came from) and ``model.safetensors`` (tensors ``backbone.<name>`` and ``heads.<task>.weight`` /
``heads.<task>.bias``).

Where the backbone came from (``config.backbone_reference``, and ``config.text_tower_reference`` for CLIP) is
a Hub id (``org/name[@rev]``) or, in memory, an absolute local folder; on disk a local folder is written as a
path relative to the saved folder (``./...`` or ``../...``), or left out (None) when the two share no folder
but the file system root -- never an absolute path. :meth:`MultiTaskModel.from_pretrained` resolves it back.

Folders of the earlier format (``heads.safetensors`` + ``multitask_config.json`` beside a plain backbone) are
refused with a CheckpointError naming the folder.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as hf_init
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_atm.atm.clip import check_class_names, templates_per_task, zero_shot_weights
from hf_atm.atm.pooling import POOLINGS, check_pooling, default_pooling, feature_width, pool_features
from hf_atm.atm.problems import REGRESSION, check_problem_types, is_regression, regression_label, task_loss
from hf_atm.atm.sources import (
    LOW_PRECISION,
    as_dtype,
    backbone_class_of,
    checkpoint_dtype,
    load_dtype,
    read_tensors,
    resolve_folder,
    resolve_reference,
    saved_reference,
    source_of,
)
from hf_atm.errors import CheckpointError, TaskDataError
from hf_atm.files import atomic_write_dir

__all__ = ["HEAD_INITS", "LEGACY_FILES", "MODEL_TYPE", "POOLINGS", "MultiTaskConfig", "MultiTaskModel",
           "resolve_reference", "saved_tasks"]

log = logging.getLogger(__name__)

MODEL_TYPE = "hf_atm_multitask"
#: how a model's heads were made: trained from random (today's default), a logistic regression on frozen
#: features, zero-shot (class-name embeddings), or class prototypes (see hf_atm.atm.heads).
HEAD_INITS = ("random", "linear_probe", "zero_shot", "prototypes")
#: the files of the earlier on-disk format (refused by from_pretrained / load_heads).
LEGACY_FILES = ("heads.safetensors", "multitask_config.json")


# ----------------------------------------------------------------------------------------------------------
# tasks and references
# ----------------------------------------------------------------------------------------------------------
def _check_task_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or "/" in name or name.strip() != name:
        raise TaskDataError(
            f"task name {name!r} is invalid: use a non-empty name without '.', '/' or surrounding spaces"
        )


def _normalize_tasks(tasks: Mapping[str, Iterable[str]], problem_types: Mapping[str, str] | None = None
                     ) -> dict[str, list[str]]:
    """``{task: [label names]}`` checked: task names by :func:`_check_task_name`, labels by
    :func:`hf_atm.atm.clip.check_class_names` (the one label validator; the one name of a regression task of
    `problem_types` by :func:`hf_atm.atm.problems.regression_label`)."""
    if not isinstance(tasks, Mapping) or not tasks:
        raise TaskDataError("tasks must be a non-empty mapping {task name: [label names]}")
    for name in tasks:
        _check_task_name(name)
    regression = {t for t, kind in (problem_types or {}).items() if kind == REGRESSION}
    return {name: regression_label(name, labels) if name in regression else check_class_names(name, labels)
            for name, labels in tasks.items()}


# ----------------------------------------------------------------------------------------------------------
# the config
# ----------------------------------------------------------------------------------------------------------
class MultiTaskConfig(PretrainedConfig):
    """The configuration of a :class:`MultiTaskModel` (saved as its ``config.json``).

    Args:
        backbone_config: the backbone's ``config.to_dict()`` (its ``model_type`` inside; no local path).
        backbone_class: the transformers class building the backbone (e.g. ``"BertModel"``,
            ``"CLIPVisionModelWithProjection"``); None: ``AutoModel`` for ``backbone_config``.
        backbone_reference: where the backbone came from: a Hub id, or a local folder (absolute in memory,
            relative to the saved folder on disk; see the module docstring); None when unknown.
        tasks: task -> label names (their order = class ids).
        pooling: one of :data:`POOLINGS` (``"clip"`` implies `normalize_features`).
        normalize_features: L2-normalise the pooled features before the heads (cosine heads).
        head_init: one of :data:`HEAD_INITS`: how the heads were made.
        head_bias: whether the heads have a bias.
        text_tower_reference: CLIP only: where the original CLIP (its text tower) comes from.
        task_metrics: task -> main metric name (``"accuracy"`` for every task not named).
        clip_templates: CLIP only: task -> the prompt templates its zero-shot head was made from.
        head_init_k: ``prototypes`` only: the examples per class asked for (``k``); None otherwise.
        task_problem_types: task -> ``"regression"`` (transformers' ``problem_type`` names; tasks left out are
            classification): a regression task has one label name, a one-output head, float labels, an MSE loss
            and ``"pearsonr"`` as its default metric (:mod:`hf_atm.atm.problems`).

    A config with exactly one task has ``id2label`` / ``label2id`` from its labels (``pipeline()`` names them).
    """

    model_type = MODEL_TYPE

    backbone_config: dict[str, Any] | None = None
    backbone_class: str | None = None
    backbone_reference: str | None = None
    tasks: dict[str, list[str]] = field(default_factory=dict)
    pooling: str = "cls"
    normalize_features: bool = False
    head_init: str = "random"
    head_bias: bool = True
    text_tower_reference: str | None = None
    task_metrics: dict[str, str] = field(default_factory=dict)
    clip_templates: dict[str, list[str]] | None = None
    head_init_k: int | None = None
    task_problem_types: dict[str, str] = field(default_factory=dict)

    def __post_init__(self, **kwargs: Any) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {self.head_init!r}")
        if self.tasks:
            self.tasks = _normalize_tasks(self.tasks, self.task_problem_types)
        unknown = sorted(set(self.task_metrics or {}) - set(self.tasks))
        if unknown:
            raise TaskDataError(f"task_metrics names task(s) {unknown} the model has no head for")
        self.task_problem_types = check_problem_types(self.tasks, self.task_problem_types)
        self.task_metrics = {t: str((self.task_metrics or {}).get(t, _default_metric(self, t))) for t in self.tasks}
        if self.pooling == "clip":
            self.normalize_features = True
        super().__post_init__(**kwargs)
        if len(self.tasks) == 1:  # after transformers' own defaults (LABEL_0, ...), which these replace
            labels = next(iter(self.tasks.values()))
            self.id2label = dict(enumerate(labels))
            self.label2id = {x: i for i, x in enumerate(labels)}
            self.problem_type = REGRESSION if self.task_problem_types else None  # pipeline(): no softmax


def _default_metric(config: MultiTaskConfig, task: str) -> str:
    """A task's main metric when none is named: Pearson correlation for regression, else accuracy."""
    return "pearsonr" if is_regression(config, task) else "accuracy"


# ----------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------
def build_backbone(config: MultiTaskConfig) -> PreTrainedModel:
    """A freshly initialised backbone from ``config.backbone_config`` with the class ``config.backbone_class``
    (a transformers model class; default ``AutoModel``), in the current default dtype."""
    if not config.backbone_config or "model_type" not in config.backbone_config:
        raise CheckpointError("MultiTaskConfig.backbone_config is missing (it must hold the backbone's config "
                              "with its model_type)")
    kwargs = dict(config.backbone_config)
    kwargs.pop("dtype", None)
    sub = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    name = config.backbone_class
    if not name:
        return AutoModel.from_config(sub)
    model_cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(model_cls, type) and issubclass(model_cls, PreTrainedModel)):
        raise CheckpointError(f"backbone_class {name!r} is not a transformers model class")
    return model_cls(sub)


def _backbone_config_dict(backbone: PreTrainedModel) -> dict[str, Any]:
    """The backbone's config as saved inside ours: no path of where it was loaded from."""
    d = backbone.config.to_dict()
    for key in ("_name_or_path", "name_or_path", "transformers_version"):
        d.pop(key, None)
    return d


class MultiTaskModel(PreTrainedModel):
    """A shared backbone with one linear head per task.

    ``forward(task=..., labels=..., **backbone_inputs)`` runs the backbone, pools its output (``config.pooling``,
    see :mod:`hf_atm.atm.pooling`; L2-normalised when ``config.normalize_features``) and applies the head of
    `task` (which may be left out when the model has one task); the loss is the mean cross entropy (label
    smoothed by `label_smoothing`). ``forward(task_ids=..., ...)`` instead routes each example to the head of
    ``task_names[task_ids[j]]`` (mixed batches for joint training); logits are then padded to the widest head
    with the dtype's minimum (softmax weight 0) and the loss is the mean over the batch of each example's own
    cross entropy over its own head's classes. A regression task (``config.task_problem_types``, set by
    ``from_backbone(..., regression_tasks=...)``) has a one-output head and float labels: MSE loss (also in mixed
    batches, its logit in column 0), ``predict`` gives numbers.

    Build one with :meth:`from_backbone` (fresh heads), :meth:`from_clip` (CLIP zero-shot heads) or
    :meth:`from_pretrained` (a saved model). ``MultiTaskModel(config)`` builds a random backbone from the config;
    ``MultiTaskModel(config, backbone)`` wraps a given one (never re-initialised).
    """

    config_class = MultiTaskConfig
    base_model_prefix = "backbone"
    _tied_weights_keys = None  # the heads tie to nothing; the backbone's own ties are collected by post_init
    _no_split_modules: list[str] = []  # post_init adds the backbone's
    # The Trainer must not pass ``num_items_in_batch``: the loss is a per-batch mean, scaled for gradient
    # accumulation by the Trainer itself.
    accepts_loss_kwargs = False

    def __init__(self, config: MultiTaskConfig, backbone: PreTrainedModel | None = None, *, seed: int = 0) -> None:
        super().__init__(config)
        if not config.tasks:
            raise TaskDataError("MultiTaskConfig.tasks is empty: a MultiTaskModel needs at least one task")
        if backbone is None:
            backbone = build_backbone(config)
        elif not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a transformers model, got {type(backbone).__name__}")
        check_pooling(backbone, config.pooling)
        self.backbone = backbone
        self.head_seed = int(seed)
        self.hidden_size = feature_width(backbone.config, config.pooling)
        p = next(backbone.parameters())
        self.heads = nn.ModuleDict({
            t: nn.Linear(self.hidden_size, len(labels), bias=config.head_bias, device=p.device, dtype=p.dtype)
            for t, labels in config.tasks.items()
        })
        self.post_init()
        if config.head_init != "random":
            self.heads.requires_grad_(False)  # heads made by a protocol stay as built unless asked (freeze_heads)

    # -- transformers hooks
    @property
    def supports_gradient_checkpointing(self) -> bool:  # type: ignore[override]
        """Whether the backbone supports gradient (activation) checkpointing (the heads need none)."""
        return bool(getattr(self.backbone, "supports_gradient_checkpointing", False))

    @property
    def main_input_name(self) -> str:  # type: ignore[override]
        """The backbone's main input (``input_ids``, ``pixel_values``, ...)."""
        return self.backbone.main_input_name

    def init_weights(self) -> None:
        """Initialise the heads only (:meth:`_init_weights`) and tie the backbone's tied weights: the backbone
        initialised itself when it was built, or holds pre-trained weights that must stay as they are."""
        for head in self.heads.values():
            if head.weight.device.type != "meta":
                self._initialize_weights(head)
        self.tie_weights(recompute_mapping=False)

    def _init_weights(self, module: nn.Module) -> None:
        """A head is initialised N(0, initializer_range) / zero bias from a generator seeded by ``(seed, task)``:
        the same head whatever the global RNG state or process. Other modules are the backbone's own."""
        from hf_atm.merging.spec import tensor_seed

        task = next((t for t, h in self.heads.items() if h is module), None) if hasattr(self, "heads") else None
        if task is None:
            return
        std = float(getattr(self.backbone.config, "initializer_range", 0.02) or 0.02)
        g = torch.Generator(device="cpu").manual_seed(tensor_seed(self.head_seed, f"head/{task}"))
        hf_init.copy_(module.weight, torch.randn(tuple(module.weight.shape), generator=g) * std)
        if module.bias is not None:
            hf_init.zeros_(module.bias)

    # -- views of the config
    @property
    def tasks(self) -> dict[str, list[str]]:
        """Task -> label names (``config.tasks``; insertion order = the order of ``task_ids``)."""
        return self.config.tasks

    @property
    def task_names(self) -> list[str]:
        """Task names in insertion order (the order of ``task_ids``)."""
        return list(self.config.tasks)

    @property
    def pooling(self) -> str:
        """``config.pooling``."""
        return self.config.pooling

    @property
    def backbone_source(self) -> str | None:
        """Where the backbone came from: a Hub id, or a local folder (absolute); None when unknown."""
        return self.config.backbone_reference

    # -- construction
    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike | PreTrainedModel,
        tasks: Mapping[str, Iterable[str]],
        pooling: str | None = None,
        *,
        seed: int = 0,
        token: str | bool | None = None,
        dtype: torch.dtype | str | None = None,
        task_metrics: Mapping[str, str] | None = None,
        regression_tasks: Iterable[str] = (),
    ) -> MultiTaskModel:
        """A MultiTaskModel with fresh heads (seeded by ``(seed, task)``) on `backbone`; the tasks named in
        `regression_tasks` are regressions (one label name each; ``config.task_problem_types``).

        `backbone` is a model object, or a local folder / Hub repo id (``org/name@rev``) loaded from
        safetensors only, remote code off (a CLIP checkpoint gives its vision tower with projection; a saved
        MultiTaskModel gives its backbone, without its heads). `pooling` None: chosen per backbone
        (:func:`hf_atm.atm.pooling.default_pooling`). `dtype` None: float32 for a bf16 / fp16 checkpoint
        (see :func:`load_dtype`); a model object is kept in its dtype unless `dtype` is given.
        """
        problem_types = {t: REGRESSION for t in regression_tasks}
        tasks = _normalize_tasks(tasks, problem_types)
        folder = None
        if isinstance(backbone, nn.Module):
            requested, current = as_dtype(dtype), next(backbone.parameters()).dtype
            if requested is not None:
                backbone = backbone.to(load_dtype(requested, None, type(backbone).__name__))
            elif current in LOW_PRECISION:
                log.warning("the backbone is in %s: training updates its weights in pure %s; pass "
                            "dtype=torch.float32 for float32 weights with bf16 autocast", current, current)
            where = getattr(getattr(backbone, "config", None), "name_or_path", None) or ""
            source = source_of(where) if where else None
            folder = Path(where) if where and Path(where).is_dir() else None  # sentence-transformers pooling
            saved: dict[str, Any] = {}
        else:
            source = source_of(backbone)
            backbone, folder, saved = _load_backbone(backbone, token=token, dtype=dtype)
        if pooling is None:  # a saved multi-task model's own pooling first, else the backbone's default
            pooling = saved.get("pooling") or default_pooling(backbone.config, folder, backbone)
        normalize = saved.get("normalize_features") if pooling == saved.get("pooling") else None
        config = cls.config_for(backbone, tasks, pooling, backbone_reference=source, task_metrics=task_metrics,
                                normalize_features=normalize, task_problem_types=problem_types)
        return cls(config, backbone, seed=seed)

    @classmethod
    def config_for(
        cls,
        backbone: PreTrainedModel,
        tasks: Mapping[str, Iterable[str]],
        pooling: str,
        **fields: Any,
    ) -> MultiTaskConfig:
        """The MultiTaskConfig of a model with `tasks` on `backbone` (its config and class recorded; `fields`:
        further MultiTaskConfig fields such as ``backbone_reference``, ``head_init``, ``head_bias``)."""
        name = type(backbone).__name__
        fields = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in fields.items()}
        return MultiTaskConfig(
            backbone_config=_backbone_config_dict(backbone),
            backbone_class=name if getattr(transformers, name, None) is type(backbone) else None,
            tasks=_normalize_tasks(tasks, fields.get("task_problem_types")), pooling=pooling, **{k: v for k, v in fields.items() if v is not None},
        )

    @classmethod
    def from_clip(
        cls,
        name_or_path: str | os.PathLike,
        tasks: Mapping[str, Sequence[str]],
        templates: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        *,
        token: str | bool | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> MultiTaskModel:
        """A MultiTaskModel on a CLIP checkpoint (local folder or Hub id ``org/name[@rev]``) with zero-shot heads.

        The backbone is CLIP's vision tower with its visual projection (``CLIPVisionModelWithProjection``,
        ``"clip"`` pooling: the L2-normalised image embedding); each task's head (no bias) is
        :func:`hf_atm.atm.clip.zero_shot_weights` of its class names over `templates`, so that
        ``model(task=t, pixel_values=x).logits`` equals ``CLIPModel(...).logits_per_image`` for the same
        prompts. `templates`: None (:data:`hf_atm.atm.clip.DEFAULT_TEMPLATES`), one list for every task, or
        ``{task: templates}`` (tasks left out get the default). The heads are frozen by default
        (``head_init="zero_shot"``); the text tower only builds them. CheckpointError naming the checkpoint
        when it is not CLIP; TaskDataError naming the task for missing / duplicated class names or bad
        templates.
        """
        from hf_atm.atm.clip import load_clip, vision_backbone

        names = _normalize_tasks(tasks)
        templates_per_task(templates, names)  # checked before any loading
        # load_clip applies the load-dtype rule to the resolved folder (a bf16 checkpoint: float32, said in a log line)
        clip_model, tokenizer, _ = load_clip(name_or_path, token=token, dtype=dtype)
        source = source_of(name_or_path)
        vision = vision_backbone(clip_model)
        config = cls.config_for(vision, names, "clip", backbone_reference=source, text_tower_reference=source)
        model = cls(config, vision)
        model.set_clip_heads_(clip_model, tokenizer, templates)
        return model

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        tasks: Mapping[str, Iterable[str]] | None = None,
        pooling: str | None = None,
        seed: int = 0,
        token: str | bool | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> MultiTaskModel:
        """Load a saved MultiTaskModel (transformers' ``from_pretrained``: ``config.json`` with model_type
        ``hf_atm_multitask`` + safetensors), from a local folder or a Hub id (``org/name[@rev]``).

        A plain model folder (e.g. an ``hf-atm merge`` output) has no heads: then `tasks` is required and fresh
        heads are made (:meth:`from_backbone`; `pooling` None: chosen per backbone). With heads present, a
        `tasks` argument must name the same tasks and labels, and a `pooling` argument the saved pooling
        (CheckpointError otherwise). Only safetensors are read, remote code off. `dtype`: see
        :func:`load_dtype`.
        """
        ref = str(pretrained_model_name_or_path)
        revision = kwargs.pop("revision", None)
        if revision and revision != "main" and "@" not in ref and not Path(ref).expanduser().exists():
            ref = f"{ref}@{revision}"
        folder = resolve_folder(ref, token)
        config = kwargs.pop("config", None)
        for key in ("trust_remote_code", "use_safetensors"):
            kwargs.pop(key, None)  # never remote code; safetensors only
        if not isinstance(config, MultiTaskConfig):
            if _multitask_config(folder) is None:
                _refuse_legacy(folder)
                if tasks is None:
                    raise CheckpointError(f"{folder} holds no hf_atm multi-task model (no task heads): pass "
                                          "tasks={name: labels} to build fresh heads on this backbone")
                model = cls.from_backbone(folder, tasks, pooling, seed=seed, dtype=dtype)
                model.config.backbone_reference = source_of(ref)
                return model
            config = MultiTaskConfig.from_pretrained(folder)
        model = cls._load(folder, config, load_dtype(dtype, checkpoint_dtype(folder), folder), *model_args, **kwargs)
        if tasks is not None and _normalize_tasks(tasks, model.config.task_problem_types) != model.tasks:
            raise CheckpointError(
                f"{folder}: saved tasks {model.tasks} differ from the requested tasks {dict(tasks)}"
            )
        if pooling is not None and pooling != model.pooling:
            raise CheckpointError(f"{folder}: saved pooling {model.pooling!r} differs from {pooling!r}")
        return model

    @classmethod
    def _load(cls, folder: Path, config: MultiTaskConfig | None, dtype: torch.dtype, *model_args: Any,
              **kwargs: Any) -> MultiTaskModel:
        """transformers' ``from_pretrained`` of a saved multi-task `folder` in `dtype` (safetensors only), its
        saved references resolved against `folder`."""
        try:
            model = super().from_pretrained(folder, *model_args, config=config, dtype=dtype, use_safetensors=True,
                                            **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"cannot load a multi-task model from {folder}: {e}") from e
        for key in ("backbone_reference", "text_tower_reference"):
            setattr(model.config, key, resolve_reference(getattr(model.config, key), folder))
        if model.config.head_init != "random":
            model.heads.requires_grad_(False)  # as built (__init__); loading gave the heads fresh parameters
        return model

    # -- heads
    def set_head_(self, task: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Set `task`'s head in place: `weight` (labels x feature width) and `bias` (labels; None: zero, or
        nothing for a head without bias). CheckpointError naming the task when a shape does not fit."""
        if task not in self.heads:
            raise TaskDataError(f"unknown task {task!r}; tasks: {', '.join(self.tasks)}")
        head = self.heads[task]
        if tuple(weight.shape) != tuple(head.weight.shape):
            raise CheckpointError(f"task {task!r}: head weight {tuple(weight.shape)} does not fit the head "
                                  f"{tuple(head.weight.shape)} (labels x feature width)")
        if bias is not None and (head.bias is None or tuple(bias.shape) != tuple(head.bias.shape)):
            raise CheckpointError(f"task {task!r}: a bias of shape {tuple(bias.shape)} does not fit this head "
                                  f"({'no bias' if head.bias is None else tuple(head.bias.shape)})")
        with torch.no_grad():
            head.weight.copy_(weight.detach())
            if head.bias is not None:
                head.bias.copy_(bias.detach()) if bias is not None else head.bias.zero_()

    def rebuild_heads_(self, bias: bool) -> None:
        """Give every head a bias (or none), recorded in ``config.head_bias``: a head of the other kind is
        replaced by a new ``nn.Linear`` (same shape, device, dtype and requires_grad; its values are then set
        by :meth:`set_head_`), so that a saved model reloads with heads of its kind."""
        self.config.head_bias = bool(bias)
        for t, head in self.heads.items():
            if (head.bias is not None) != bool(bias):
                new = nn.Linear(head.in_features, head.out_features, bias=bool(bias), device=head.weight.device,
                                dtype=head.weight.dtype)
                self.heads[t] = new.requires_grad_(head.weight.requires_grad)

    def record_head_init_(self, head_init: str, k: int | None = None) -> None:
        """Record how the heads were made (``config.head_init``; ``config.head_init_k`` = `k` for
        ``prototypes``, else None; ``clip_templates`` cleared unless zero-shot) and freeze the heads of every
        protocol but ``random`` (``requires_grad`` False: they stay as built unless ``freeze_heads=False``)."""
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
        self.config.head_init = head_init
        self.config.head_init_k = int(k) if head_init == "prototypes" and k is not None else None
        if head_init != "zero_shot":
            self.config.clip_templates = None
        if head_init != "random":
            self.heads.requires_grad_(False)

    def set_clip_heads_(self, clip_model: Any, tokenizer: Any,
                        templates: Sequence[str] | Mapping[str, Sequence[str]] | None = None) -> None:
        """Set every head to CLIP's zero-shot head of its class names (:func:`hf_atm.atm.clip.zero_shot_weights`
        with `clip_model`'s text tower and `tokenizer`; `templates` as in :func:`~hf_atm.atm.clip.templates_per_task`:
        None for the default, one list, or ``{task: templates}``, unknown tasks refused). Heads become bias-free
        and frozen; ``config.head_init`` = ``"zero_shot"`` and ``config.clip_templates`` = the templates used.
        Every template is checked and every head computed before the model changes."""
        if self.pooling != "clip":
            raise TaskDataError(f"CLIP zero-shot heads need pooling='clip' (CLIP image embeddings), this model "
                                f"pools {self.pooling!r}")
        per_task = templates_per_task(templates, self.tasks)
        weights = {t: zero_shot_weights(clip_model, tokenizer, names, per_task[t], task=t)
                   for t, names in self.tasks.items()}  # fmt: skip
        self.rebuild_heads_(bias=False)
        for t, w in weights.items():
            self.set_head_(t, w)
        self.record_head_init_("zero_shot")
        self.config.clip_templates = per_task

    def load_heads(self, source: str | os.PathLike | MultiTaskModel, tasks: Iterable[str] | None = None) -> None:
        """Copy the heads of `tasks` (default: all of this model's) from a MultiTaskModel or a saved folder.

        Raises CheckpointError naming the task when the source lacks it, or when its head's shape (labels,
        feature width, bias) or label names differ: the heads must come from a model of the same backbone width.
        """
        names = list(self.tasks) if tasks is None else list(tasks)
        if isinstance(source, MultiTaskModel):
            state = source.heads_state_dict()
            labels, where = source.tasks, "the source model"
        else:
            folder = Path(source)
            labels = saved_tasks(folder)
            state = {k[len("heads."):]: v for k, v in read_tensors(folder, "heads.").items()}
            where = str(folder)
        for t in names:
            if t not in self.heads:
                raise CheckpointError(f"task {t!r} has no head in this model")
            if t not in labels or f"{t}.weight" not in state:
                raise CheckpointError(f"{where} has no head for task {t!r}")
            if labels[t] != self.tasks[t]:
                raise CheckpointError(f"task {t!r}: head labels {labels[t]} in {where} differ from {self.tasks[t]}")
            head = self.heads[t]
            w, b = state[f"{t}.weight"], state.get(f"{t}.bias")
            bias_fits = (b is None) == (head.bias is None) and (b is None or b.shape == head.bias.shape)
            if tuple(w.shape) != tuple(head.weight.shape) or not bias_fits:
                raise CheckpointError(
                    f"task {t!r}: head weight {tuple(w.shape)} in {where} does not fit this backbone's "
                    f"head {tuple(head.weight.shape)} (different backbone width, label count or bias)"
                )
            self.set_head_(t, w, b)

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"{task}.weight": ..., "{task}.bias": ...}`` (no bias for bias-free heads): detached copies,
        contiguous, on CPU."""
        return {
            f"{t}.{k}": v.detach().to("cpu", copy=True).contiguous()
            for t in self.heads
            for k, v in self.heads[t].state_dict().items()
        }

    def task_model(self, task: str) -> MultiTaskModel:
        """A single-task MultiTaskModel sharing this model's backbone module and `task`'s head (no copies),
        with ``config.id2label`` / ``label2id`` from the task's labels (``forward`` needs no ``task=``)."""
        if task not in self.heads:
            raise TaskDataError(f"unknown task {task!r}; tasks: {', '.join(self.tasks)}")
        cfg = copy.deepcopy(self.config)
        labels = self.tasks[task]
        cfg.tasks = {task: list(labels)}
        cfg.task_metrics = {task: self.config.task_metrics.get(task, _default_metric(self.config, task))}
        cfg.task_problem_types = {t: v for t, v in self.config.task_problem_types.items() if t == task}
        cfg.problem_type = REGRESSION if cfg.task_problem_types else None
        if cfg.clip_templates:
            cfg.clip_templates = {k: v for k, v in cfg.clip_templates.items() if k == task} or None
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {x: i for i, x in enumerate(labels)}
        single = type(self)(cfg, self.backbone, seed=self.head_seed)
        single.heads[task] = self.heads[task]
        return single.train(self.training)

    def export_task(self, task: str, out_dir: str | os.PathLike, processing_class: Any | None = None,
                    push_to_hub: str | None = None, token: str | bool | None = None, **kwargs: Any) -> Path:
        """Write `task` as a standard model folder (:func:`hf_atm.atm.export.export_task`; `kwargs` go there)."""
        from hf_atm.atm.export import export_task

        return export_task(self, task, out_dir, processing_class, push_to_hub, token, **kwargs)

    # -- forward
    def _cast_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # datasets hand floats over as float32: cast pixel_values / inputs_embeds to the backbone's dtype
        # (float64 in exact tests, bfloat16 for half-precision backbones).
        dtype = next(self.backbone.parameters()).dtype
        return {
            k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "attention_mask" else v
            for k, v in inputs.items()
        }

    def encode(self, **backbone_inputs: Any) -> torch.Tensor:
        """The pooled backbone features, shape (batch, hidden_size); L2-normalised when
        ``config.normalize_features``."""
        out = self.backbone(**self._cast_inputs(backbone_inputs), return_dict=True)
        pooled = pool_features(out, self.pooling, backbone_inputs.get("attention_mask"))
        return F.normalize(pooled, dim=-1) if self.config.normalize_features else pooled

    def forward(
        self,
        task: str | None = None,
        labels: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        **backbone_inputs: Any,
    ) -> SequenceClassifierOutput:
        """Logits of `task`'s head (or per-example heads from `task_ids`) and, given `labels`, the loss: cross
        entropy, label-smoothed by the keyword ``label_smoothing`` (float, default 0.0; each head over its own
        classes), or for a regression task the mean squared error of its one logit (never smoothed). ``label_smoothing`` is read from the keywords rather than named in the signature because
        Trainer takes every forward parameter whose name holds "label" for a label column."""
        label_smoothing = float(backbone_inputs.pop("label_smoothing", 0.0) or 0.0)
        backbone_inputs.pop("num_items_in_batch", None)
        backbone_inputs.pop("return_dict", None)
        if task is None and task_ids is None and len(self.heads) == 1:
            task = next(iter(self.heads))
        if (task is None) == (task_ids is None):
            raise ValueError("pass exactly one of task=<name> or task_ids=<tensor>")
        pooled = self.encode(**backbone_inputs)
        if task is not None:
            if task not in self.heads:
                raise KeyError(f"unknown task {task!r}; tasks: {', '.join(self.tasks)}")
            logits = self.heads[task](pooled.to(self.heads[task].weight.dtype))
            loss = None
            if labels is not None:
                loss = task_loss(logits, labels, is_regression(self.config, task), label_smoothing)
            return SequenceClassifierOutput(loss=loss, logits=logits)
        return self._mixed_forward(pooled, task_ids, labels, label_smoothing)

    def _mixed_forward(
        self, pooled: torch.Tensor, task_ids: torch.Tensor, labels: torch.Tensor | None, label_smoothing: float
    ) -> SequenceClassifierOutput:
        names = self.task_names
        width = max(len(v) for v in self.tasks.values())
        logits = pooled.new_full((pooled.shape[0], width), torch.finfo(pooled.dtype).min)
        loss_sum = pooled.new_zeros((), dtype=torch.float64 if pooled.dtype == torch.float64 else torch.float32)
        task_ids = task_ids.view(-1)
        for idx in torch.unique(task_ids).tolist():
            if not 0 <= idx < len(names):
                raise ValueError(f"task_ids holds {idx}, outside 0..{len(names) - 1}")
            sel = (task_ids == idx).nonzero(as_tuple=True)[0]
            head = self.heads[names[idx]]
            lg = head(pooled[sel].to(head.weight.dtype))
            logits[sel, : lg.shape[1]] = lg.to(logits.dtype)
            if labels is not None:
                loss_sum = loss_sum + task_loss(lg, labels.view(-1)[sel], is_regression(self.config, names[idx]),
                                                label_smoothing, reduction="sum")
        loss = None if labels is None else loss_sum / max(1, pooled.shape[0])
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def predict(self, task: str, **inputs: Any) -> list[str] | list[float]:
        """Label names predicted for `task` on a batch of model inputs (eval mode, no gradient); for a
        regression task the predicted numbers (its one logit)."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            logits = self(task=task, **inputs).logits
        finally:
            self.train(was_training)
        if is_regression(self.config, task):
            return [float(x) for x in logits[:, 0].float().tolist()]
        return [self.tasks[task][i] for i in logits.argmax(-1).tolist()]

    # -- saving
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, processing_class: Any | None = None,
                        **kwargs: Any) -> Path:
        """transformers' ``save_pretrained`` (``config.json`` + ``model.safetensors``, and the tokenizer /
        processor when given), written into a temporary sibling folder and moved into place file by file."""
        return atomic_write_dir(save_directory, lambda tmp: self.write_files(tmp, processing_class, *args, **kwargs))

    def write_files(self, folder: str | os.PathLike, processing_class: Any | None = None, *args: Any,
                    **kwargs: Any) -> None:
        """Write the files of :meth:`save_pretrained` directly into `folder` (no temporary folder). Local
        references are written relative to `folder` (see the module docstring)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        kept = {k: getattr(cfg, k) for k in ("backbone_config", "backbone_reference", "text_tower_reference")}
        cfg.backbone_config = _backbone_config_dict(self.backbone)
        cfg.backbone_reference = saved_reference(kept["backbone_reference"], folder)
        cfg.text_tower_reference = saved_reference(kept["text_tower_reference"], folder)
        try:
            kwargs.pop("safe_serialization", None)
            super().save_pretrained(folder, *args, **kwargs)
        finally:
            cfg.backbone_reference, cfg.text_tower_reference = kept["backbone_reference"], kept["text_tower_reference"]
        if processing_class is not None:
            processing_class.save_pretrained(folder)

    def load_backbone_weights(self, folder: str | os.PathLike) -> None:
        """Load the backbone weights saved in `folder` (by :meth:`save_pretrained` / :meth:`write_files`) into
        this model, in place (parameters keep their identity and dtype). Goes through transformers'
        ``from_pretrained`` (its checkpoint key conversions apply); CheckpointError naming the folder when the
        weights do not fit this backbone."""
        folder = Path(folder)
        saved_tasks(folder)  # a saved multi-task model (the earlier format is refused, naming the folder)
        loaded = self._load(folder, None, next(self.backbone.parameters()).dtype)
        try:
            self.backbone.load_state_dict(loaded.backbone.state_dict(), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{folder}: backbone weights do not fit this model: {e}") from e

    # -- merge helpers
    def backbone_tensors(self) -> dict[str, torch.Tensor]:
        """The backbone tensors ATM merges, by state-dict name: every parameter and floating buffer, each
        storage once (tied weights appear under their first name only)."""
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in list(self.backbone.named_parameters()) + list(self.backbone.named_buffers()):
            if not t.is_floating_point() or id(t) in seen:
                continue
            seen.add(id(t))
            out[name] = t
        return out


# ----------------------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------------------
def _multitask_config(folder: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("model_type") == MODEL_TYPE else None


def _refuse_legacy(folder: Path) -> None:
    """CheckpointError naming `folder` when it is a run folder of the earlier format."""
    if any((folder / f).is_file() for f in LEGACY_FILES):
        raise CheckpointError(
            f"{folder} is a multi-task model of the earlier hf_atm format ({' + '.join(LEGACY_FILES)} beside the "
            "backbone), which is no longer read: load its backbone with MultiTaskModel.from_backbone(folder, tasks) "
            "and its heads from heads.safetensors with set_head_, then save_pretrained it again"
        )


def saved_tasks(folder: str | os.PathLike) -> dict[str, list[str]]:
    """The tasks and labels of the multi-task model saved in local `folder`, from its config.json alone (no
    weights read); CheckpointError naming the folder otherwise (the earlier format named as such)."""
    folder = Path(folder)
    if (config := _multitask_config(folder)) is None:
        _refuse_legacy(folder)
        raise CheckpointError(f"{folder} holds no saved multi-task model (config.json with model_type {MODEL_TYPE})")
    try:
        return {t: list(v) for t, v in config["tasks"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: no valid tasks ({e})") from e


def _load_backbone(ref: str | os.PathLike, token: str | bool | None = None,
                   dtype: torch.dtype | str | None = None) -> tuple[PreTrainedModel, Path, dict[str, Any]]:
    """``(backbone, folder, saved)``: the backbone of the resolved folder, safetensors only, remote code off, in
    :func:`load_dtype`: a CLIP checkpoint gives its vision tower with projection; a saved MultiTaskModel its
    backbone, with ``saved`` = its ``pooling`` / ``normalize_features`` (empty otherwise); any other checkpoint
    the class its ``config.architectures`` names when a feature model (:func:`backbone_class_of`, e.g. keeping
    ``CLIPVisionModelWithProjection``'s projection), else ``AutoModel``."""
    folder = resolve_folder(ref, token)
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder} holds no .safetensors weights (pickle files are not loaded)")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load a backbone from {folder}: {e}") from e
    if config.model_type == "clip":
        from hf_atm.atm.clip import load_clip, vision_backbone

        clip_model = load_clip(folder, dtype=dtype)[0]  # load_clip applies the load-dtype rule
        return vision_backbone(clip_model), folder, {}
    if isinstance(config, MultiTaskConfig):
        saved = {"pooling": config.pooling, "normalize_features": config.normalize_features}
        return MultiTaskModel.from_pretrained(folder, dtype=dtype).backbone, folder, saved
    model_cls = backbone_class_of(config) or AutoModel
    try:
        model = model_cls.from_pretrained(folder, use_safetensors=True, trust_remote_code=False,
                                          dtype=load_dtype(dtype, checkpoint_dtype(folder), folder))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load a backbone from {folder}: {e}") from e
    return model, folder, {}


AutoConfig.register(MODEL_TYPE, MultiTaskConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForSequenceClassification, AutoModelForImageClassification):
    _auto.register(MultiTaskConfig, MultiTaskModel, exist_ok=True)
