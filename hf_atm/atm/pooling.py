"""Pooling: how a backbone's outputs become one feature vector per example, and which pooling a backbone gets.

``cls``: the first position; ``mean``: the mean over positions (padding excluded by ``attention_mask``);
``pooler``: the backbone's ``pooler_output``; ``last``: the last non-padding position (decoder-only language
models, whose last token has seen the whole sequence; left or right padding); ``clip``: CLIP's projected
``image_embeds`` (of ``CLIPVisionModelWithProjection``), used L2-normalised.

:func:`default_pooling` picks one per backbone when the caller gives none: a sentence-transformers folder's own
pooling mode (``modules.json`` -> ``1_Pooling/config.json``), ``last`` for decoder-only models, ``clip`` for
a CLIP vision tower with its visual projection, ``pooler`` for backbones without a CLS token whose
``pooler_output`` is their global pooling (:data:`POOLER_MODEL_TYPES`, and a CLIP vision tower without the
projection), else ``cls``. :func:`check_pooling` refuses a pooling the backbone cannot give, before training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from hf_atm.errors import CheckpointError

__all__ = [
    "DECODER_MODEL_TYPES",
    "POOLER_MODEL_TYPES",
    "POOLINGS",
    "SENTENCE_TRANSFORMERS_PATTERNS",
    "check_pooling",
    "default_pooling",
    "feature_width",
    "has_image_projection",
    "is_clip_vision",
    "is_decoder_only",
    "last_token_index",
    "pool_features",
    "sentence_transformers_pooling",
]

POOLINGS = ("cls", "mean", "pooler", "last", "clip")

#: model types of decoder-only (causal) language models: their features are the last non-padding token's.
DECODER_MODEL_TYPES = frozenset({
    "bloom", "codegen", "falcon", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox",
    "gptj", "granite", "llama", "mistral", "mixtral", "olmo", "olmo2", "opt", "phi", "phi3", "qwen2", "qwen2_moe",
    "qwen3", "qwen3_moe", "smollm3", "stablelm", "starcoder2",
})

#: model types without a CLS token (hierarchical vision transformers, convolutional networks) whose
#: ``pooler_output`` is the global average of their last stage (checked on transformers 5: the last hidden state
#: is patch tokens or a 4-D feature map, so ``cls`` would take one patch or one channel).
POOLER_MODEL_TYPES = frozenset({"bit", "convnext", "convnextv2", "dinat", "donut-swin", "nat", "regnet", "resnet",
                                "swin", "swinv2", "van"})

#: the files of a sentence-transformers folder that name its pooling (fetched with a Hub backbone's weights).
SENTENCE_TRANSFORMERS_PATTERNS: tuple[str, ...] = ("modules.json", "*Pooling/config.json")

# sentence-transformers' pooling flags -> this package's pooling (max / weighted-mean have no equivalent here)
_ST_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "last"}


def is_decoder_only(config: Any) -> bool:
    """Whether `config` describes a decoder-only language model (``is_decoder``, a causal-LM model type, or a
    causal-LM architecture name)."""
    if getattr(config, "is_decoder", False) or getattr(config, "model_type", None) in DECODER_MODEL_TYPES:
        return True
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or [])


def is_clip_vision(config: Any) -> bool:
    """Whether `config` is CLIP's (the full model or its vision tower): its features are ``image_embeds``."""
    return getattr(config, "model_type", None) in ("clip", "clip_vision_model")


def sentence_transformers_pooling(folder: str | os.PathLike) -> str | None:
    """The pooling of a sentence-transformers model folder (None when `folder` is not one). CheckpointError
    naming the file when its pooling mode has no equivalent in :data:`POOLINGS` (e.g. max pooling)."""
    folder = Path(folder)
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    paths = [m.get("path", "") for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")]
    if not paths:
        return None
    cfg_path = folder / paths[0] / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read the sentence-transformers pooling config ({e})") from e
    modes = [mode for flag, mode in _ST_MODES.items() if cfg.get(flag)]
    if len(modes) != 1 or any(v for k, v in cfg.items() if k.startswith("pooling_mode_") and k not in _ST_MODES):
        raise CheckpointError(
            f"{cfg_path}: sentence-transformers pooling {cfg} has no equivalent here (supported: cls, mean, "
            "lasttoken); pass pooling= explicitly"
        )
    return modes[0]


def has_image_projection(backbone: Any) -> bool:
    """Whether `backbone` returns CLIP's projected ``image_embeds`` (a ``CLIPVisionModelWithProjection``)."""
    return isinstance(getattr(backbone, "visual_projection", None), torch.nn.Module)


def default_pooling(config: Any, folder: str | os.PathLike | None = None, backbone: Any = None) -> str:
    """The pooling a backbone gets when none is asked for: a sentence-transformers folder's own mode, ``last``
    for decoder-only models, ``clip`` for a CLIP vision tower with its projection (`backbone` the module, when
    known; without it a CLIP config is taken to have one), ``pooler`` for :data:`POOLER_MODEL_TYPES` and a CLIP
    vision tower without projection, else ``cls``."""
    if folder is not None:
        found = sentence_transformers_pooling(folder)
        if found is not None:
            return found
    if is_clip_vision(config):
        return "clip" if backbone is None or has_image_projection(backbone) else "pooler"
    if getattr(config, "model_type", None) in POOLER_MODEL_TYPES:
        return "pooler"
    return "last" if is_decoder_only(config) else "cls"


def check_pooling(backbone: Any, pooling: str) -> None:
    """CheckpointError when `backbone` cannot give `pooling`'s features: ``clip`` needs CLIP's visual
    projection (``CLIPVisionModelWithProjection``; a ``CLIPVisionModel`` has none)."""
    if pooling == "clip" and not has_image_projection(backbone):
        raise CheckpointError(
            f"pooling='clip' needs CLIP's projected image_embeds, but the backbone {type(backbone).__name__} has no "
            "visual_projection: load it as CLIPVisionModelWithProjection (MultiTaskModel.from_clip) or pass "
            "pooling='pooler'"
        )


def feature_width(config: Any, pooling: str) -> int:
    """The width of the pooled features of a backbone with `config`: CLIP's ``projection_dim`` for ``clip``,
    else the usual hidden-size attributes."""
    names = ("projection_dim",) if pooling == "clip" else ("hidden_size", "d_model", "dim", "embed_dim", "n_embd")
    for attr in names:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    sizes = getattr(config, "hidden_sizes", None)
    if sizes and pooling != "clip":
        return int(sizes[-1])
    raise CheckpointError(f"cannot tell the feature width of backbone config {type(config).__name__} "
                          f"(pooling {pooling!r})")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the last non-padding token (mask 1), whichever side the padding is on (0 for
    an all-padding row)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=1).clamp_min(0)


def pool_features(outputs: Any, pooling: str, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One feature vector per example, shape (batch, width), from a backbone's `outputs` (see the module
    docstring for each pooling). ValueError when the backbone did not return what `pooling` needs."""
    if pooling in ("pooler", "clip"):
        key = "pooler_output" if pooling == "pooler" else "image_embeds"
        pooled = getattr(outputs, key, None)
        if pooled is None:
            raise ValueError(f"pooling={pooling!r} but the backbone returned no {key}")
        return pooled.flatten(1)
    hidden = outputs.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    fits = attention_mask is not None and hidden.dim() == 3 and attention_mask.shape[:2] == hidden.shape[:2]
    if pooling == "last":
        if not fits:
            return hidden[:, -1]
        idx = last_token_index(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    if pooling != "mean":
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if not fits:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
