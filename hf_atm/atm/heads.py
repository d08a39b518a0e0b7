"""Head protocols: how every task's head is made before any tuning, shared by every method compared.

``head_init`` (:data:`~hf_atm.atm.model.HEAD_INITS`):

* ``random``: the seeded heads the model was built with (``MultiTaskModel.from_backbone``: N(0,
  initializer_range), zero bias, seeded by ``(seed, task)``); nothing is changed.
* ``linear_probe``: per task, the frozen pre-trained backbone's features (``model.encode``, eval mode, no
  gradient) of the task's own ``train`` split, then a multinomial logistic regression solved to convergence by
  :func:`fit_logistic_regression`: full-batch L-BFGS (strong Wolfe line search) in float64 on standardised
  features, mean cross entropy + ``LINEAR_PROBE_L2 / 2 * ||W||^2`` (bias not penalised), from zero weights
  (deterministic: no random draw), stopped when the largest gradient entry is below ``LINEAR_PROBE_TOL``; the
  standardisation is folded back into the head's weight and bias.
* ``zero_shot``: cosine heads from text. A CLIP-backed model (pooling ``"clip"``, built by
  ``MultiTaskModel.from_clip``) already has CLIP's zero-shot heads (kept; recomputed from its text tower when
  `templates` are given). A text encoder embeds each class's description (`descriptions`, default the shipped
  ``hf_atm/data/label_descriptions.json``, see :func:`label_descriptions`) through the backbone itself with
  the model's pooling; the L2-normalised embeddings times ``ZERO_SHOT_LOGIT_SCALE`` are the head's rows.
* ``prototypes``: cosine heads from ``k`` labelled train examples per class (default ``PROTOTYPE_K``; fewer
  when a class has fewer, chosen by a generator seeded by ``(seed, task)``): the L2-normalised mean of their
  L2-normalised features, times ``ZERO_SHOT_LOGIT_SCALE``.

Cosine heads (zero_shot, prototypes) set ``config.normalize_features = True`` (features L2-normalised before
the heads) and ``config.head_bias = False``. The heads themselves are built by the model
(``MultiTaskModel.rebuild_heads_`` / ``set_head_`` / ``set_clip_heads_``, recorded by ``record_head_init_``,
which also freezes heads of every protocol but ``random``). :func:`shared_heads` computes the heads once and
hands out independent deep copies of that one model, so individual fine-tuning, every one-shot merge, joint
training, ATM and PH-ATM start from the same heads; :func:`heads_trainable` is the one rule deciding whether
heads train.

Bad input raises before any work, naming the option or file: an unknown ``head_init``; ``zero_shot`` on a
backbone that cannot embed text; descriptions missing or duplicated; a task without a ``train`` split for
``linear_probe`` / ``prototypes``.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hf_atm.atm.clip import load_clip, templates_per_task
from hf_atm.atm.model import HEAD_INITS, MultiTaskModel
from hf_atm.atm.problems import is_regression
from hf_atm.errors import TaskDataError
from hf_atm.merging.spec import tensor_seed

__all__ = [
    "DESCRIPTIONS_FILE",
    "LINEAR_PROBE_L2",
    "LINEAR_PROBE_TOL",
    "PROTOTYPE_K",
    "ZERO_SHOT_LOGIT_SCALE",
    "check_head_init",
    "encode_dataset",
    "fit_logistic_regression",
    "heads_trainable",
    "init_heads_",
    "label_descriptions",
    "prepare_heads_",
    "prototype_indices",
    "shared_heads",
]

logger = logging.getLogger(__name__)

#: The shipped class descriptions (package data of :mod:`hf_atm.data`).
DESCRIPTIONS_FILE = "hf_atm/data/label_descriptions.json"
#: Fixed logit scale of cosine heads (zero_shot on text encoders, prototypes): logits = 20 x cosine, so a
#: cosine margin of 0.1 is a factor e^2 in probability. CLIP's own heads use CLIP's learnt logit_scale instead.
ZERO_SHOT_LOGIT_SCALE = 20.0
#: Labelled train examples per class averaged by ``prototypes`` (default of ``k``).
PROTOTYPE_K = 16
#: L2 penalty of the linear probe on standardised features (mean loss + l2/2 ||W||^2).
LINEAR_PROBE_L2 = 1e-3
#: Convergence tolerance of the linear probe: max |gradient| of the objective.
LINEAR_PROBE_TOL = 1e-6
_LINEAR_PROBE_MAX_ITER = 2000
_LABEL_KEYS = ("labels", "label")
_NOT_INPUTS = ("labels", "label", "task", "task_ids")


# ----------------------------------------------------------------------------------------------------------
# the one rule for training heads
# ----------------------------------------------------------------------------------------------------------
def heads_trainable(args: Any, model: Any) -> bool:
    """Whether a fine-tuning trains the task heads: ``args.freeze_heads`` when it is True / False; unset
    (None): only heads made by ``head_init="random"`` train (zero-shot, linear-probe and prototype heads stay
    as built, as in the ATM paper's frozen zero-shot heads)."""
    freeze = getattr(args, "freeze_heads", None)
    if freeze is None:
        return getattr(getattr(model, "config", None), "head_init", "random") == "random"
    return not freeze


_warned_frozen_head_lr = False  # the head_learning_rate warning is logged once per process


def prepare_heads_(args: Any, model: Any, task: str | None) -> bool:
    """Set the heads' ``requires_grad`` for one fine-tuning of `task` (None: every head) and return whether
    they train (:func:`heads_trainable`): frozen heads get False; with ``freeze_heads=False`` asked, the heads
    that train get True (heads made by a protocol are frozen on the model, see ``record_head_init_``); unset,
    trainable heads keep the caller's flags. The caller restores every flag afterwards
    (:func:`hf_atm.atm.tuning.kept_requires_grad`). Logs one warning when ``head_learning_rate`` is set but the
    heads are frozen (it then has no effect)."""
    global _warned_frozen_head_lr
    train = heads_trainable(args, model)
    if not train:
        model.heads.requires_grad_(False)
        if getattr(args, "head_learning_rate", None) is not None and not _warned_frozen_head_lr:
            _warned_frozen_head_lr = True
            logger.warning("head_learning_rate=%s has no effect: the heads are frozen (head_init=%r, freeze_heads=%r;"
                           " pass freeze_heads=False to train them)", args.head_learning_rate,
                           getattr(model.config, "head_init", None), getattr(args, "freeze_heads", None))
    elif getattr(args, "freeze_heads", None) is False:
        (model.heads if task is None else model.heads[task]).requires_grad_(True)
    return train


def check_head_init(head_init: str) -> str:
    """`head_init` when it is one of :data:`~hf_atm.atm.model.HEAD_INITS`, else ValueError naming the option."""
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
    return head_init


# ----------------------------------------------------------------------------------------------------------
# label descriptions
# ----------------------------------------------------------------------------------------------------------
def _shipped() -> dict[str, Any]:
    """The content of the shipped descriptions file."""
    try:
        text = resources.files("hf_atm.data").joinpath("label_descriptions.json").read_text(encoding="utf-8")
        return json.loads(text)
    except (OSError, ValueError) as e:
        raise TaskDataError(f"{DESCRIPTIONS_FILE}: cannot read the shipped label descriptions ({e})") from e


def label_descriptions(suite: str = "text") -> dict[str, list[str]]:
    """``{task: [description of each label, in the suite's label order]}`` of a suite's tasks, from the
    shipped ``hf_atm/data/label_descriptions.json``. TaskDataError naming the file for a suite it lacks."""
    data = _shipped()
    if suite.startswith("_") or suite not in data:
        known = ", ".join(k for k in data if not k.startswith("_"))
        raise TaskDataError(f"{DESCRIPTIONS_FILE} has no label descriptions for suite {suite!r} (it has: {known})")
    return {task: list(labels.values()) for task, labels in data[suite].items()}


def _shipped_by_label() -> dict[str, dict[str, str]]:
    """``{task: {label: description}}`` over every suite of the shipped file."""
    out: dict[str, dict[str, str]] = {}
    for suite, tasks in _shipped().items():
        if not suite.startswith("_"):
            out.update({t: dict(v) for t, v in tasks.items()})
    return out


def _task_descriptions(task: str, labels: Sequence[str], given: Any, source: str) -> list[str]:
    """The descriptions of `task`'s `labels` (in label order) from `given` (a list in label order or a
    ``{label: description}`` mapping); TaskDataError naming `source` and the task / label when one is missing,
    empty or duplicated."""
    if given is None:
        raise TaskDataError(f"head_init='zero_shot': {source} has no label descriptions for task {task!r}")
    if isinstance(given, Mapping):
        missing = [lab for lab in labels if lab not in given]
        if missing:
            raise TaskDataError(f"head_init='zero_shot': {source}: task {task!r} has no description for label(s) "
                                f"{missing}")
        out = [given[lab] for lab in labels]
    elif isinstance(given, Sequence) and not isinstance(given, str):
        out = list(given)
        if len(out) != len(labels):
            raise TaskDataError(f"head_init='zero_shot': {source}: task {task!r} has {len(out)} descriptions for "
                                f"{len(labels)} labels {list(labels)}")
    else:
        raise TaskDataError(f"head_init='zero_shot': {source}: task {task!r}: descriptions must be a list or a "
                            f"{{label: description}} mapping, got {type(given).__name__}")
    for lab, d in zip(labels, out):
        if not isinstance(d, str) or not d.strip():
            raise TaskDataError(f"head_init='zero_shot': {source}: task {task!r}, label {lab!r}: empty description")
    dup = sorted({d for d in out if out.count(d) > 1})
    if dup:
        raise TaskDataError(f"head_init='zero_shot': {source}: task {task!r} has duplicated descriptions {dup}")
    return out


def _resolve_descriptions(model: MultiTaskModel, descriptions: Mapping[str, Any] | None) -> dict[str, list[str]]:
    """Every task's descriptions, checked (before any embedding)."""
    source = "descriptions=" if descriptions is not None else DESCRIPTIONS_FILE
    table = descriptions if descriptions is not None else _shipped_by_label()
    return {t: _task_descriptions(t, labels, table.get(t), source) for t, labels in model.tasks.items()}


# ----------------------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------------------
def _default_collator(tokenizer: Any) -> Any:
    from transformers import DataCollatorWithPadding, default_data_collator

    return DataCollatorWithPadding(tokenizer) if tokenizer is not None else default_data_collator


@torch.no_grad()
def encode_dataset(model: MultiTaskModel, dataset: Any, data_collator: Any = None, batch_size: int = 64,
                   *, tokenizer: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, labels)`` of every example of `dataset` (a prepared task split): ``model.encode`` in eval
    mode without gradient, in order, batched by `data_collator` (default ``DataCollatorWithPadding(tokenizer)``
    with a tokenizer, else ``default_data_collator``). Features float32 on the CPU; the model's mode is kept."""
    collate = data_collator or _default_collator(tokenizer)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            key = next((k for k in _LABEL_KEYS if k in batch), None)
            if key is None:
                raise TaskDataError(f"encode_dataset: the batches carry no labels (keys {sorted(batch)})")
            labels.append(torch.as_tensor(batch[key]).long().view(-1).cpu())
            inputs = {k: v.to(device) for k, v in batch.items()
                      if isinstance(v, torch.Tensor) and k not in _NOT_INPUTS}  # fmt: skip
            feats.append(model.encode(**inputs).float().cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise TaskDataError("encode_dataset: the dataset is empty")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def _encode_texts(model: MultiTaskModel, tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """``model.encode`` of each text on its own (no padding: decoder tokenizers may have no pad token), in
    eval mode; float32 rows on the CPU."""
    device = next(model.parameters()).device
    max_length = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
    was_training = model.training
    model.eval()
    try:
        rows = []
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            rows.append(model.encode(**inputs).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows)


# ----------------------------------------------------------------------------------------------------------
# the protocols
# ----------------------------------------------------------------------------------------------------------
def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float = LINEAR_PROBE_L2,
    tol: float = LINEAR_PROBE_TOL,
    max_iter: int = _LINEAR_PROBE_MAX_ITER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight (num_classes x dim), bias)`` of a multinomial logistic regression on `features` (float64).

    Features are standardised (mean 0, variance 1 per dimension; constant dimensions kept at scale 1), the
    objective ``mean cross entropy + l2 / 2 * ||W||^2`` (bias unpenalised) is minimised by full-batch L-BFGS
    with a strong Wolfe line search from zero, on one CPU thread (deterministic), until the largest gradient entry is below `tol`
    (a warning is logged when `max_iter` iterations do not reach it), and the standardisation is folded back,
    so ``features @ weight.T + bias`` are the fitted logits.
    """
    x = features.detach().to(torch.float64).cpu()
    y = labels.detach().long().view(-1).cpu()
    if x.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"fit_logistic_regression: features {tuple(x.shape)} do not match labels {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"fit_logistic_regression: labels outside 0..{num_classes - 1}")
    mu = x.mean(0)
    sd = x.std(0, unbiased=False)
    sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))
    z = (x - mu) / sd
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small dense problems: one thread is faster, and the result is bit-reproducible
    try:
        opt.step(objective)
        objective()
    finally:
        torch.set_num_threads(threads)
    grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    if grad > tol:
        logger.warning("linear probe: L-BFGS stopped with max |gradient| %.2e > tolerance %.0e", grad, tol)
    weight = (w.detach() / sd).contiguous()
    bias = (b.detach() - weight @ mu).contiguous()
    return weight, bias


def _train_split(task_datasets: Mapping[str, Any] | None, task: str, head_init: str) -> Any:
    """`task`'s train split; TaskDataError naming the task and option when there is none."""
    if task_datasets is None:
        raise TaskDataError(f"head_init={head_init!r} needs the task datasets (task_datasets=...)")
    ds = task_datasets.get(task)
    if ds is None:
        raise TaskDataError(f"head_init={head_init!r}: no data for task {task!r}")
    try:
        train = ds["train"]
    except (KeyError, TypeError):
        train = None
    if train is None or len(train) == 0:
        raise TaskDataError(f"head_init={head_init!r}: task {task!r} has no (or an empty) 'train' split")
    return train


def _labels_of(ds: Any, task: str) -> np.ndarray:
    key = next((k for k in _LABEL_KEYS if k in ds.column_names), None)
    if key is None:
        raise TaskDataError(f"task {task!r}: the train split has no 'labels' column (columns {ds.column_names})")
    return np.asarray(ds[key], dtype=np.int64)


def prototype_indices(labels: np.ndarray, num_classes: int, k: int, seed: int, task: str) -> list[int]:
    """The train rows averaged by ``prototypes``: for each class, ``min(k, its count)`` rows drawn without
    replacement by a generator seeded by ``(seed, task)``, in row order. TaskDataError naming the task and class
    when a class has no example."""
    rng = np.random.default_rng(tensor_seed(seed, f"prototypes/{task}"))
    chosen = []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        if rows.size == 0:
            raise TaskDataError(f"head_init='prototypes': task {task!r}, class {c} has no training example")
        chosen.extend(rows[rng.permutation(rows.size)[: min(k, rows.size)]].tolist())
    return sorted(chosen)


def _cosine_rows(embeddings: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeddings.to(torch.float32), dim=-1) * ZERO_SHOT_LOGIT_SCALE


def _can_embed_text(model: MultiTaskModel) -> bool:
    return getattr(model.backbone, "main_input_name", None) == "input_ids"


def _check_inputs(model: MultiTaskModel, head_init: str, task_datasets: Any, tokenizer: Any,
                  descriptions: Any, k: int) -> dict[str, list[str]] | None:
    """Every check of :func:`init_heads_` before any computation; returns the zero_shot descriptions of a
    text encoder (None otherwise)."""
    check_head_init(head_init)
    regression = [t for t in model.tasks if is_regression(model.config, t)]
    if head_init != "random" and regression:
        # the protocols make class heads (probe, class means, class descriptions); a one-output regression
        # head has no classes to make them from
        raise TaskDataError(f"head_init={head_init!r} makes classification heads; task(s) {regression} are "
                            "regressions: use head_init='random' (a trained head) for them")
    if head_init in ("linear_probe", "prototypes"):
        for t in model.tasks:
            _train_split(task_datasets, t, head_init)
    if head_init == "prototypes" and not (isinstance(k, int) and k >= 1):
        raise ValueError(f"head_init='prototypes': k must be an integer >= 1, got {k!r}")
    if head_init != "zero_shot" or model.config.pooling == "clip":
        return None
    if not _can_embed_text(model):
        raise TaskDataError(
            f"head_init='zero_shot': the backbone {type(model.backbone).__name__} cannot embed text (its input is "
            f"{getattr(model.backbone, 'main_input_name', None)!r}); use a CLIP checkpoint "
            "(MultiTaskModel.from_clip) or another head_init"
        )
    if tokenizer is None:
        raise TaskDataError("head_init='zero_shot' on a text encoder needs its tokenizer (tokenizer=...)")
    return _resolve_descriptions(model, descriptions)


def _set_heads(model: MultiTaskModel, heads: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]],
               head_init: str, cosine: bool, k: int | None = None) -> None:
    """Write `heads` (task -> (weight, bias or None)) and record the protocol in the model's config (cosine
    heads: bias-free, on normalised features); the heads are frozen (``record_head_init_``)."""
    if cosine:
        model.config.normalize_features = True
    model.rebuild_heads_(not cosine)
    for t, (w, b) in heads.items():
        model.set_head_(t, w, b)
    model.record_head_init_(head_init, k)


def init_heads_(
    model: MultiTaskModel,
    head_init: str,
    task_datasets: Mapping[str, Any] | None = None,
    *,
    tokenizer: Any = None,
    descriptions: Mapping[str, Any] | None = None,
    templates: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    k: int = PROTOTYPE_K,
    seed: int = 0,
    data_collator: Any = None,
    batch_size: int = 64,
    token: str | bool | None = None,
) -> MultiTaskModel:
    """Set every head of `model` by protocol `head_init` (see the module docstring), in place; returns `model`.

    Args:
        task_datasets: ``{task: DatasetDict}`` with a ``train`` split of model inputs + ``labels``
            (linear_probe, prototypes).
        tokenizer: the backbone's tokenizer (zero_shot on a text encoder; also the default padding collator).
        descriptions: zero_shot on a text encoder: ``{task: [description per label] | {label: description}}``
            (default: the shipped :data:`DESCRIPTIONS_FILE`).
        templates: zero_shot on a CLIP-backed model: recompute the heads from its text tower with these
            templates (one list, or one per task; default: keep the heads ``from_clip`` made).
        k: examples per class of ``prototypes``.
        seed: seeds the prototypes' choice of examples (the linear probe is deterministic).
        data_collator / batch_size: how train splits are batched for ``model.encode``.
        token: Hub token for loading a CLIP text tower.

    Records ``config.head_init`` (``head_init_k`` for prototypes; ``normalize_features`` / ``head_bias`` for
    cosine heads; ``clip_templates`` for CLIP zero-shot heads) and freezes the heads of every protocol but
    ``random`` (``requires_grad`` False). Every input is checked before any computation (TaskDataError /
    ValueError naming the option, task or file).
    """
    texts = _check_inputs(model, head_init, task_datasets, tokenizer, descriptions, k)
    if head_init == "random":
        return model
    if head_init == "zero_shot":
        _zero_shot(model, texts, tokenizer, templates, token)
        return model
    collate = data_collator or _default_collator(tokenizer)
    heads: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    splits = {t: _train_split(task_datasets, t, head_init) for t in model.tasks}
    if head_init == "prototypes":
        # every example chosen (and every class checked) before the model changes
        rows = {t: prototype_indices(_labels_of(splits[t], t), len(n), k, seed, t) for t, n in model.tasks.items()}
        model.config.normalize_features = True  # the prototypes' features are the heads' normalised inputs
    for t, names in model.tasks.items():
        train = splits[t]
        if head_init == "prototypes":
            feats, labels = encode_dataset(model, train.select(rows[t]), collate, batch_size)
            means = torch.stack([F.normalize(feats[labels == c], dim=-1).mean(0) for c in range(len(names))])
            heads[t] = (_cosine_rows(means), None)
        else:
            feats, labels = encode_dataset(model, train, collate, batch_size)
            heads[t] = fit_logistic_regression(feats, labels, len(names))
    _set_heads(model, heads, head_init, cosine=head_init == "prototypes", k=k)
    return model


def _zero_shot(model: MultiTaskModel, texts: dict[str, list[str]] | None, tokenizer: Any,
               templates: Sequence[str] | Mapping[str, Sequence[str]] | None, token: str | bool | None) -> None:
    """zero_shot heads: description embeddings (text encoders) or CLIP's text tower (pooling "clip")."""
    if texts is not None:
        heads = {t: (_cosine_rows(_encode_texts(model, tokenizer, texts[t])), None) for t in model.tasks}
        _set_heads(model, heads, "zero_shot", cosine=True)
        return
    if templates is None and model.config.head_init == "zero_shot":
        return  # from_clip made them
    ref = getattr(model.config, "text_tower_reference", None)
    if not ref:
        raise TaskDataError("head_init='zero_shot': this CLIP-pooled model records no text_tower_reference to "
                            "build heads from; build it with MultiTaskModel.from_clip")
    templates_per_task(templates, model.tasks)  # checked (unknown tasks refused) before loading CLIP
    clip_model, clip_tokenizer, _ = load_clip(ref, token=token)
    model.set_clip_heads_(clip_model, clip_tokenizer, templates)


def shared_heads(
    make_model: Callable[[], MultiTaskModel],
    head_init: str,
    task_datasets: Mapping[str, Any] | None = None,
    **kw: Any,
) -> Callable[[], MultiTaskModel]:
    """A factory of fresh models that all carry the same heads: `make_model` is called ONCE, its heads set by
    :func:`init_heads_` (`kw` as there), and every call returns an independent ``copy.deepcopy`` of that model
    (backbone, heads, config with ``head_init`` / ``normalize_features`` / ``head_bias`` / ``clip_templates``,
    requires_grad flags), so e.g. a CLIP checkpoint is loaded and its prompts embedded only once. The kept
    model itself is never handed out: tuning one copy changes no other."""
    check_head_init(head_init)
    template = init_heads_(make_model(), head_init, task_datasets, **kw)

    def new_model() -> MultiTaskModel:
        return copy.deepcopy(template)

    return new_model
