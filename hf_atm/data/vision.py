"""The offline vision suite: four image classification tasks on real images (28x28 grayscale, uint8).

===============  =========================================================  ===================================
task             label set                                                  images (pool / test)
===============  =========================================================  ===================================
fashion10        the 10 Fashion-MNIST classes                               Fashion train[0:15000] / test
fashion_coarse   top / bottom / footwear / bag (Dress left out: neither)    Fashion train[15000:30000] / test
fashion_tops     T-shirt/top / Pullover / Coat / Shirt (the hard ones)      Fashion train[30000:45000] / test
digits           the 10 digits of scikit-learn's ``load_digits``            fixed 75% / fixed 25% of 1,797
===============  =========================================================  ===================================

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (IDX files in
/usr/share/datasets/fashion-mnist). Each Fashion task draws its train/validation pool from its own block of
the 60,000 training images, so no training image serves two tasks, and the block
:data:`PRETEXT_INDICES` (train[45000:60000]) is used by no task: it is the only data the ViT pretext
pre-training (:func:`hf_atm.backbones.pretrained_vit`) sees, without labels. The coarse and tops tasks are
derived label sets, honest because they are learnt from their own images: the coarse task must tell a coat
from a sneaker, not recognise 10 classes; the tops task is the 4-way fine distinction that fashion10's
errors concentrate on. The Fashion test split (10,000 images, disjoint from all training images) is shared:
each task reads the test images of its classes.

scikit-learn's digits are 8x8 with values 0..16; they are scaled to 0..255, resized to 20x20 (bilinear) and
centred in 28x28 with a 4-pixel black border, as MNIST digits are. They have no test split: a fixed 25%
(stratified, independent of the seed) is held out.

Columns: ``image`` (``Array2D((28, 28), "uint8")``, white object on black) and ``label`` (ClassLabel).
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hf_atm.data.splits import DEFAULT_MAX_TEST, DEFAULT_MAX_TRAIN, build_task, debian_root, require_path
from hf_atm.errors import TaskDataError

__all__ = [
    "FASHION_BLOCKS",
    "FASHION_CLASSES",
    "PRETEXT_INDICES",
    "VISION_TASKS",
    "digits_images",
    "fashion_mnist",
    "load_vision_suite",
]

FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# Disjoint blocks of Fashion-MNIST's 60,000 training images (the file order is already shuffled).
FASHION_BLOCKS = {
    "fashion10": range(0, 15000),
    "fashion_coarse": range(15000, 30000),
    "fashion_tops": range(30000, 45000),
}
PRETEXT_INDICES = range(45000, 60000)
# Fine class id -> coarse class (None: left out of the task).
_COARSE = ("top", "bottom", "footwear", "bag")
_COARSE_OF = {0: "top", 1: "bottom", 2: "top", 3: None, 4: "top", 5: "footwear", 6: "top", 7: "footwear",
              8: "bag", 9: "footwear"}  # fmt: skip
_TOPS = (0, 2, 4, 6)
VISION_TASKS = ("fashion10", "fashion_coarse", "fashion_tops", "digits")
DIGITS_TEST_FRACTION = 0.25
IMAGE_SIZE = 28


def _read_idx(path: Path) -> np.ndarray:
    """A gzip'ed IDX file (the MNIST format) as a uint8 array: images (N, H, W) or labels (N,)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic not in (2049, 2051):
        raise TaskDataError(f"{path}: not an IDX label/image file (magic number {magic})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise TaskDataError(f"{path}: holds {array.size} bytes of data, its header says {dims}")
    return array.reshape(dims)


@functools.lru_cache(maxsize=2)
def _fashion_cached(folder: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root = Path(folder)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(require_path(root / f"{prefix}-images-idx3-ubyte.gz", FASHION_PACKAGE))
        labels = _read_idx(require_path(root / f"{prefix}-labels-idx1-ubyte.gz", FASHION_PACKAGE))
        if len(images) != len(labels):
            raise TaskDataError(f"{root}: {prefix} has {len(images)} images but {len(labels)} labels")
        images.flags.writeable = False
        labels.flags.writeable = False
        out[split] = (images, labels)
    return out


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``"train"`` (60,000) or ``"test"`` (10,000): read-only uint8 images (N, 28, 28) and
    labels (N,), from the Debian package (TaskDataError naming it when missing)."""
    if split not in ("train", "test"):
        raise TaskDataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    folder = require_path(debian_root() / "datasets" / "fashion-mnist", FASHION_PACKAGE)
    return _fashion_cached(str(folder))[split]


@functools.lru_cache(maxsize=1)
def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 images (N, 28, 28) (MNIST-like framing) and labels (N,)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    out = np.zeros((len(small), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, img in enumerate(small):
        out[i, 4:24, 4:24] = np.asarray(Image.fromarray(img).resize((20, 20), Image.BILINEAR))
    labels = bunch.target.astype(np.int64)
    out.flags.writeable = False
    return out, labels


def _features(names: Sequence[str]):
    import datasets

    return datasets.Features(
        {
            "image": datasets.Array2D((IMAGE_SIZE, IMAGE_SIZE), "uint8"),
            "label": datasets.ClassLabel(names=list(names)),
        }
    )


def _fashion_task(name: str, seed: int, max_train: int | None, max_test: int | None):
    """One of the three Fashion tasks: its block of train images, the test images of its classes."""
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    block = np.asarray(FASHION_BLOCKS[name])
    if name == "fashion10":
        names: Sequence[str] = FASHION_CLASSES
        relabel = {c: c for c in range(10)}
        description = "Fashion-MNIST, 10 classes"
    elif name == "fashion_coarse":
        names = _COARSE
        relabel = {c: _COARSE.index(g) for c, g in _COARSE_OF.items() if g is not None}
        description = "Fashion-MNIST coarse: top (T-shirt, pullover, coat, shirt) / bottom / footwear / bag"
    else:
        names = tuple(FASHION_CLASSES[c] for c in _TOPS)
        relabel = {c: i for i, c in enumerate(_TOPS)}
        description = "Fashion-MNIST tops: T-shirt/top / Pullover / Coat / Shirt"

    def select(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        keep = np.isin(y, list(relabel))
        return {"image": x[keep], "label": np.array([relabel[int(c)] for c in y[keep]], dtype=np.int64)}

    pool = select(train_x[block], train_y[block])
    test = select(test_x, test_y)
    return build_task(name, pool, test, _features(names), seed=seed, max_train=max_train, max_test=max_test,
                      description=description)  # fmt: skip


def _digits_task(seed: int, max_train: int | None, max_test: int | None):
    """scikit-learn digits: a fixed stratified 25% test, the rest is the pool."""
    x, y = digits_images()
    order = np.random.default_rng(0).permutation(len(y))
    is_test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = order[y[order] == c]
        is_test[members[: int(round(DIGITS_TEST_FRACTION * len(members)))]] = True
    pool = {"image": x[~is_test], "label": y[~is_test]}
    test = {"image": x[is_test], "label": y[is_test]}
    return build_task("digits", pool, test, _features([str(d) for d in range(10)]), seed=seed,
                      max_train=max_train, max_test=max_test,
                      description="scikit-learn digits (8x8 -> 28x28), 10 classes")  # fmt: skip


def load_vision_suite(
    seed: int = 0,
    max_train_per_task: int | None = DEFAULT_MAX_TRAIN,
    max_test_per_task: int | None = DEFAULT_MAX_TEST,
    tasks: Sequence[str] | None = None,
) -> dict:
    """``{task: DatasetDict(train/validation/test)}`` with columns ``image`` (uint8 28x28) and ``label``.

    `tasks` selects a subset of :data:`VISION_TASKS` (default: all four). Split sizes follow
    :mod:`hf_atm.data.splits`. A missing ``dataset-fashion-mnist`` package raises TaskDataError naming it.
    """
    names = list(VISION_TASKS if tasks is None else tasks)
    unknown = [t for t in names if t not in VISION_TASKS]
    if unknown or not names:
        raise TaskDataError(f"unknown vision task(s) {unknown or names}: choose from {', '.join(VISION_TASKS)}")
    suite = {}
    for name in names:
        if name == "digits":
            suite[name] = _digits_task(seed, max_train_per_task, max_test_per_task)
        else:
            suite[name] = _fashion_task(name, seed, max_train_per_task, max_test_per_task)
    return suite
