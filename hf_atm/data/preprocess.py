"""Turn a suite's raw columns into model inputs: token ids for text, normalized pixels for images.

Both functions accept a suite (``{task: DatasetDict}``) and return one of the same shape, or a single
DatasetDict / Dataset and return that kind. The ClassLabel is kept and renamed ``labels`` (so
``ds.features["labels"].names`` still gives the label names), the raw columns are dropped, and the format is
``torch``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from hf_atm.errors import TaskDataError

__all__ = ["pixelize_suite", "process_images_suite", "tokenize_suite"]

_TEXT_COLUMNS = ("text", "text_pair")


def _apply(suite: Any, fn: Callable[[Any, str], Any]) -> Any:
    """`fn(dataset, where)` on every Dataset of a suite / DatasetDict / Dataset, keeping the structure."""
    import datasets

    if isinstance(suite, datasets.Dataset):
        return fn(suite, "dataset")
    if isinstance(suite, datasets.DatasetDict):
        return datasets.DatasetDict({sp: fn(ds, f"split {sp!r}") for sp, ds in suite.items()})
    if isinstance(suite, Mapping) and suite:
        return {
            task: datasets.DatasetDict({sp: fn(ds, f"task {task!r}, split {sp!r}") for sp, ds in dd.items()})
            for task, dd in suite.items()
        }
    raise TaskDataError(f"expected a suite {{task: DatasetDict}}, a DatasetDict or a Dataset, got {type(suite)}")


def _label_feature(ds: Any, where: str) -> Any:
    if "label" not in ds.column_names:
        raise TaskDataError(f"{where}: no 'label' column (columns: {ds.column_names})")
    return ds.features["label"]


def tokenize_suite(suite: Any, tokenizer: Any, max_length: int = 64, padding: bool | str = False) -> Any:
    """``input_ids`` / ``attention_mask`` (and ``token_type_ids`` if the tokenizer makes them) + ``labels``.

    Texts (``text``, and ``text_pair`` for sentence pairs) are truncated to `max_length` tokens. `padding`
    goes to the tokenizer: ``False`` (default) leaves rows of different lengths for a padding collator
    (``DataCollatorWithPadding``, what ATMTrainer uses when given the tokenizer); ``"max_length"`` pads every
    row to `max_length` for ``default_data_collator``.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise TaskDataError(f"max_length must be an integer >= 2, got {max_length!r}")

    def one(ds: Any, where: str) -> Any:
        feature = _label_feature(ds, where)
        if "text" not in ds.column_names:
            raise TaskDataError(f"{where}: no 'text' column to tokenize (columns: {ds.column_names})")
        pair = "text_pair" in ds.column_names

        def encode(batch: dict[str, list]) -> Any:
            return tokenizer(
                batch["text"], batch["text_pair"] if pair else None,
                truncation=True, max_length=max_length, padding=padding,
            )  # fmt: skip

        drop = [c for c in ds.column_names if c != "label"]
        # an in-memory dataset caches nothing by fingerprint, so skip computing one: it would dill-dump `encode`
        # with the whole tokenizer (its vocabulary) for every split (seconds each); on-disk data keeps it
        fingerprint = {} if ds.cache_files else {"new_fingerprint": uuid.uuid4().hex}
        out = ds.map(encode, batched=True, remove_columns=drop, desc=f"tokenize {where}", **fingerprint)
        out = out.rename_column("label", "labels")
        if out.features["labels"] != feature:  # map keeps it; guard against a library change
            out = out.cast_column("labels", feature)
        out.set_format("torch")
        return out

    return _apply(suite, one)


def _to_pixels(images: Sequence[Any], size: int, channels: int) -> np.ndarray:
    """uint8 (N, size, size, channels) from PIL images or HxW / HxWxC arrays (resized bilinearly if needed)."""
    from PIL import Image

    first = images[0]
    if not hasattr(first, "convert"):
        arr = np.asarray(images)
        if arr.ndim == 3 and arr.shape[1:] == (size, size):  # fast path: a stack of gray images, right size
            arr = arr.astype(np.uint8, copy=False)[..., None]
            return np.repeat(arr, channels, axis=-1) if channels > 1 else arr
    out = np.empty((len(images), size, size, channels), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    for i, img in enumerate(images):
        if not hasattr(img, "convert"):
            a = np.asarray(img)
            if a.dtype != np.uint8:
                a = np.clip(a, 0, 255).astype(np.uint8)
            img = Image.fromarray(a.squeeze(-1) if a.ndim == 3 and a.shape[-1] == 1 else a)
        img = img.convert(mode)
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        a = np.asarray(img)
        out[i] = a[..., None] if channels == 1 else a
    return out


def pixelize_suite(
    suite: Any,
    image_size: int = 28,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
    num_channels: int | None = None,
    batch_size: int = 512,
) -> Any:
    """``pixel_values`` (float32, C x image_size x image_size) + ``labels``.

    Each image (uint8 array, or PIL image from a Hub dataset) is converted to gray (C=1) or RGB (C=3; gray
    images are repeated), resized bilinearly to `image_size` when it differs, scaled to [0, 1] and normalized
    per channel: ``(x - mean[c]) / std[c]``. `num_channels` defaults to ``len(mean)``; `mean` / `std` hold one
    value (used for every channel) or one per channel. The defaults match
    :func:`hf_atm.backbones.pretrained_vit` (1 channel, mean 0.5, std 0.5).
    """
    import datasets

    channels = len(mean) if num_channels is None else num_channels
    if channels not in (1, 3):
        raise TaskDataError(f"num_channels must be 1 or 3, got {channels}")
    if not isinstance(image_size, int) or image_size < 1:
        raise TaskDataError(f"image_size must be a positive integer, got {image_size!r}")
    m = np.asarray(mean, dtype=np.float32).reshape(-1)
    s = np.asarray(std, dtype=np.float32).reshape(-1)
    if len(m) not in (1, channels) or len(s) not in (1, channels) or (s <= 0).any():
        raise TaskDataError(f"mean {list(mean)} / std {list(std)} must have 1 or {channels} values, std > 0")
    m = np.broadcast_to(m, (channels,)).reshape(1, channels, 1, 1)
    s = np.broadcast_to(s, (channels,)).reshape(1, channels, 1, 1)

    def one(ds: Any, where: str) -> Any:
        feature = _label_feature(ds, where)
        if "image" not in ds.column_names:
            raise TaskDataError(f"{where}: no 'image' column to convert (columns: {ds.column_names})")
        features = datasets.Features(
            {
                "pixel_values": datasets.Array3D((channels, image_size, image_size), "float32"),
                "labels": feature,
            }
        )

        def convert(batch: dict[str, list]) -> dict[str, Any]:
            px = _to_pixels(batch["image"], image_size, channels).transpose(0, 3, 1, 2)
            values = (px.astype(np.float32) / 255.0 - m) / s
            return {"pixel_values": values.astype(np.float32), "labels": batch["label"]}

        fmt = ds.with_format("numpy", columns=["image"], output_all_columns=True)
        if isinstance(ds.features["image"], datasets.Image):
            fmt = ds  # PIL images: keep the default (decoded) format
        out = fmt.map(
            convert, batched=True, batch_size=batch_size, remove_columns=ds.column_names, features=features,
            desc=f"pixelize {where}",
        )  # fmt: skip
        out.set_format("torch")
        return out

    return _apply(suite, one)


def process_images_suite(suite: Any, image_processor: Any, batch_size: int = 64) -> Any:
    """``pixel_values`` made by a checkpoint's own `image_processor` + ``labels``.

    For the backbones that ship one (``preprocessor_config.json``; ``AutoImageProcessor.from_pretrained``), e.g.
    ``CLIPImageProcessor``: shortest side resized, centre crop, rescaled, normalized with the checkpoint's own
    mean / std, exactly as the checkpoint was trained. Each image is converted to RGB first (gray MNIST digits
    are repeated over the three channels). Stored as float32 arrays (about 0.6 MB per 224 x 224 image).
    """
    import datasets

    def one(ds: Any, where: str) -> Any:
        feature = _label_feature(ds, where)
        if "image" not in ds.column_names:
            raise TaskDataError(f"{where}: no 'image' column to convert (columns: {ds.column_names})")

        def rgb(images: Sequence[Any]) -> list[Any]:
            from PIL import Image

            return [(img if hasattr(img, "convert") else Image.fromarray(np.asarray(img, dtype=np.uint8)))
                    .convert("RGB") for img in images]  # fmt: skip

        shape = image_processor(images=rgb([ds[0]["image"]]), return_tensors="np")["pixel_values"].shape[1:]
        features = datasets.Features({"pixel_values": datasets.Array3D(tuple(shape), "float32"), "labels": feature})

        def convert(batch: dict[str, list]) -> dict[str, Any]:
            values = image_processor(images=rgb(batch["image"]), return_tensors="np")["pixel_values"]
            return {"pixel_values": values.astype(np.float32), "labels": batch["label"]}

        out = ds.map(convert, batched=True, batch_size=batch_size, remove_columns=ds.column_names,
                     features=features, desc=f"process images {where}")  # fmt: skip
        out.set_format("torch")
        return out

    return _apply(suite, one)
