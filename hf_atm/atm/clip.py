"""CLIP pieces for zero-shot heads: load a ``CLIPModel``, turn class names into head weights, split off the
vision tower.

Zero-shot classification with CLIP (Radford et al., 2021) scores an image against one text embedding per
class: the L2-normalised mean over prompt templates of the L2-normalised text embeddings of
``template.format(class name)``. :func:`zero_shot_weights` computes those rows, times ``logit_scale.exp()``,
so that a linear head without bias on the normalised image embedding gives exactly CLIP's own
``logits_per_image`` for the same prompts. :func:`vision_backbone` is the image side that ATM tunes and merges
(the vision tower and its projection); the text tower only builds heads.

This module imports from :mod:`hf_atm.atm` only :mod:`hf_atm.atm.sources` (the load-dtype rule): the multi-task model
builds on it. :func:`check_class_names` is THE label-name validator (the multi-task model's tasks use it too).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoTokenizer, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from hf_atm.atm.sources import checkpoint_dtype, load_dtype
from hf_atm.errors import CheckpointError, TaskDataError

__all__ = [
    "DEFAULT_TEMPLATES",
    "check_class_names",
    "check_templates",
    "is_clip_config",
    "load_clip",
    "templates_per_task",
    "vision_backbone",
    "zero_shot_weights",
]

#: The default prompt ensemble: the seven templates that OpenAI's ``notebooks/Prompt_Engineering_for_ImageNet
#: .ipynb`` (github.com/openai/CLIP) selected from its 80 ImageNet prompts by sequential forward selection, a
#: short ensemble that scores close to all 80. Override it per call (``templates=``) for a domain (e.g.
#: "a satellite photo of {}." for EuroSAT).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# Prompts embedded per forward pass of the text tower (hundreds of classes x templates would not fit at once).
_PROMPT_BATCH = 256


def is_clip_config(config: Any) -> bool:
    """Whether a transformers config describes a full CLIP model (text and vision towers)."""
    return getattr(config, "model_type", None) == "clip"


def check_class_names(task: str, class_names: Any) -> list[str]:
    """`class_names` (any iterable of names but a string or mapping) as a list of strings; TaskDataError naming
    `task` when they are missing, fewer than 2, blank (empty or spaces only) or duplicated. The one validator
    of label / class names (a multi-task model's tasks and CLIP's class names)."""
    if class_names is None or isinstance(class_names, (str, bytes, Mapping)) or not isinstance(class_names, Iterable):
        raise TaskDataError(f"task {task!r}: class names missing (give a list of names, got {class_names!r})")
    names = [str(c) for c in class_names]
    if len(names) < 2:
        raise TaskDataError(f"task {task!r}: needs at least 2 class names, got {names}")
    blank = [i for i, c in enumerate(names) if not c.strip()]
    if blank:
        raise TaskDataError(f"task {task!r}: class name(s) at position {blank} are empty")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise TaskDataError(f"task {task!r}: duplicated class names {dup}")
    return names


def check_templates(templates: Any, task: str | None = None) -> list[str]:
    """`templates` as a non-empty list of strings, each holding ``"{}"`` (where the class name goes);
    TaskDataError naming the template (and `task` when given) otherwise."""
    where = f"task {task!r}: " if task is not None else ""
    if templates is None or isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
        raise TaskDataError(f"{where}templates must be a non-empty list of strings, got {templates!r}")
    out = []
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise TaskDataError(f"{where}template {t!r} has no '{{}}' for the class name")
        out.append(t)
    return out


def templates_per_task(
    templates: Sequence[str] | Mapping[str, Sequence[str]] | None, tasks: Iterable[str]
) -> dict[str, list[str]]:
    """``{task: templates}`` for every task of `tasks`: `templates` None gives each :data:`DEFAULT_TEMPLATES`,
    one list goes to every task, a mapping ``{task: templates}`` gives tasks left out the default. Every list
    is checked (:func:`check_templates`); TaskDataError naming them when the mapping names unknown tasks."""
    tasks = list(tasks)
    if isinstance(templates, Mapping):
        unknown = sorted(set(templates) - set(tasks))
        if unknown:
            raise TaskDataError(f"templates name task(s) {unknown} that are not among the tasks {tasks}")
        return {t: check_templates(templates.get(t, DEFAULT_TEMPLATES), t) for t in tasks}
    shared = check_templates(DEFAULT_TEMPLATES if templates is None else templates)
    return {t: list(shared) for t in tasks}


def load_clip(
    ref: str | os.PathLike,
    token: str | bool | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[CLIPModel, Any, Path]:
    """``(CLIPModel, its tokenizer, the resolved folder)`` of a local folder or Hub id (``org/name[@rev]``,
    through :func:`hf_atm.hub.resolve.resolve_model`), safetensors only, remote code off.

    `dtype`: the load rule of :func:`hf_atm.atm.sources.load_dtype`: None loads a bf16 / fp16 checkpoint in
    float32 and says so in one log line (bf16 autocast comes from the training arguments); a dtype (or its
    name) loads in that precision (a low one with a warning). Raises CheckpointError naming the checkpoint
    when its config is not CLIP's, it holds no safetensors, or the model or tokenizer cannot be loaded.
    """
    from hf_atm.hub.resolve import resolve_model

    folder = resolve_model(ref, token=token)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ref}: cannot read its config ({e})") from e
    if not is_clip_config(config):
        raise CheckpointError(
            f"{ref} is not a CLIP checkpoint (model_type {getattr(config, 'model_type', None)!r}, expected "
            "'clip': a CLIPModel with text and vision towers)"
        )
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{ref}: {folder} holds no .safetensors weights (pickle files are not loaded)")
    dtype = load_dtype(dtype, checkpoint_dtype(folder), ref)  # ValueError naming a bad dtype, before loading
    try:
        model = CLIPModel.from_pretrained(folder, use_safetensors=True, trust_remote_code=False, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ref}: cannot load the CLIP model or its tokenizer ({e})") from e
    model.eval()
    return model, tokenizer, folder


def _text_embeds(clip_model: CLIPModel, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """CLIP's projected text embeddings of `prompts` (rows), in batches, eval mode, no gradient."""
    device = next(clip_model.parameters()).device
    max_length = int(getattr(clip_model.config.text_config, "max_position_embeddings", 77))
    rows = []
    for i in range(0, len(prompts), _PROMPT_BATCH):
        enc = tokenizer(prompts[i : i + _PROMPT_BATCH], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        out = clip_model.get_text_features(**inputs)
        # transformers >= 5 returns the output object (projected embeddings in pooler_output), older a tensor
        rows.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
    return torch.cat(rows)


@torch.no_grad()
def zero_shot_weights(
    clip_model: CLIPModel,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    task: str = "zero_shot",
) -> torch.Tensor:
    """Zero-shot head weights, shape ``(n_classes, projection_dim)``, in the model's dtype and device.

    Row ``c`` is ``logit_scale.exp() * normalize(mean_t normalize(text_embeds(template_t.format(c))))``: a
    bias-free linear head on the L2-normalised image embedding then gives CLIP's ``logits_per_image``
    (averaged over templates). Class names and templates are checked first (TaskDataError naming `task`:
    missing, empty or duplicated names, a template without ``"{}"``). The model's train / eval mode is kept.
    """
    names = check_class_names(task, class_names)
    temps = check_templates(templates, task)
    was_training = clip_model.training
    clip_model.eval()
    try:
        prompts = [t.format(c) for c in names for t in temps]
        emb = F.normalize(_text_embeds(clip_model, tokenizer, prompts), dim=-1)
        emb = emb.view(len(names), len(temps), -1).mean(dim=1)
        weights = F.normalize(emb, dim=-1) * clip_model.logit_scale.exp()
    finally:
        clip_model.train(was_training)
    return weights.detach().contiguous()


def vision_backbone(clip_model: CLIPModel) -> CLIPVisionModelWithProjection:
    """A ``CLIPVisionModelWithProjection`` holding copies of `clip_model`'s vision tower and visual
    projection (same weights, same dtype and device): its ``image_embeds`` are CLIP's image features."""
    cfg = clip_model.config
    vision_cfg = CLIPVisionConfig(**{**cfg.vision_config.to_dict(), "projection_dim": cfg.projection_dim})
    p = next(clip_model.parameters())
    model = CLIPVisionModelWithProjection(vision_cfg).to(device=p.device, dtype=p.dtype)
    model.vision_model.load_state_dict(clip_model.vision_model.state_dict(), strict=True)
    model.visual_projection.load_state_dict(clip_model.visual_projection.state_dict(), strict=True)
    if cfg.name_or_path:
        model.config.name_or_path = cfg.name_or_path
    model.train(clip_model.training)
    return model
