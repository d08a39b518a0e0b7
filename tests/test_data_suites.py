"""Task suites: real offline data, split rules, determinism, honesty, errors, Hub normalization, preprocessing."""

from __future__ import annotations

import hashlib

import datasets
import numpy as np
import pytest

from hf_atm.data import SUITES, load_suite, pixelize_suite, suite_tasks, tokenize_suite
from hf_atm.data.hub import HubTask, load_hub_suite
from hf_atm.data.splits import DEBIAN_ROOT_ENV, balanced_take, validation_size
from hf_atm.data.text import _dedupe, clean_fortune
from hf_atm.data.vision import FASHION_BLOCKS, PRETEXT_INDICES, fashion_mnist
from hf_atm.errors import HubError, TaskDataError

CAPS = {"max_train_per_task": 300, "max_test_per_task": 120}


@pytest.fixture(scope="module")
def text_suite():
    return load_suite("text", seed=0, **CAPS)


@pytest.fixture(scope="module")
def vision_suite():
    return load_suite("vision", seed=0, **CAPS)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hf_atm.backbones import text_backbone_path

    return AutoTokenizer.from_pretrained(text_backbone_path())


def _check_suite(suite, input_column):
    assert len(suite) >= 4
    label_sets = set()
    for task, dd in suite.items():
        assert isinstance(dd, datasets.DatasetDict)
        assert set(dd) == {"train", "validation", "test"}, task
        names = dd["train"].features["label"].names
        assert len(names) >= 2 and len(set(names)) == len(names)
        label_sets.add(tuple(names))
        for split, ds in dd.items():
            assert set(ds.column_names) == {input_column, "label"}, (task, split)
            assert isinstance(ds.features["label"], datasets.ClassLabel)
            assert ds.features["label"].names == names
            y = np.asarray(ds["label"])
            assert len(y) > 0 and y.min() >= 0 and y.max() < len(names), (task, split)
        # every class is present in train and test
        assert set(dd["train"]["label"]) == set(range(len(names))), task
        assert set(dd["test"]["label"]) == set(range(len(names))), task
    assert len(label_sets) == len(suite), "every task has its own label set"


def test_text_suite_structure(text_suite):
    assert list(text_suite) == list(suite_tasks("text"))
    _check_suite(text_suite, "text")
    assert text_suite["noun_category"]["train"].features["label"].names[0].startswith("noun.")
    assert set(text_suite["fortune_language"]["test"].features["label"].names) == {"de", "en", "es", "it", "pl", "ru"}
    for dd in text_suite.values():
        assert len(dd["train"]) + len(dd["validation"]) <= CAPS["max_train_per_task"]
        assert len(dd["test"]) <= CAPS["max_test_per_task"]


def test_vision_suite_structure(vision_suite):
    assert list(vision_suite) == list(suite_tasks("vision"))
    _check_suite(vision_suite, "image")
    img = np.asarray(vision_suite["digits"]["train"].with_format("numpy")[:3]["image"])
    assert img.shape == (3, 28, 28) and img.max() > 100 and img.min() == 0
    assert vision_suite["fashion_coarse"]["test"].features["label"].names == ["top", "bottom", "footwear", "bag"]


def test_caps_are_class_balanced(vision_suite):
    counts = np.bincount(vision_suite["fashion10"]["test"]["label"])
    assert counts.max() - counts.min() <= 1  # 120 over 10 classes: 12 each


@pytest.mark.parametrize("name", ["text", "vision"])
def test_deterministic_by_seed(name, text_suite, vision_suite):
    first = text_suite if name == "text" else vision_suite
    col = "text" if name == "text" else "image"
    task = suite_tasks(name)[-1]
    again = load_suite(name, seed=0, tasks=[task], **CAPS)[task]
    other = load_suite(name, seed=1, tasks=[task], **CAPS)[task]
    for split in ("train", "validation", "test"):
        assert again[split][col] == first[task][split][col], split
    assert other["train"][col] != again["train"][col]
    assert other["test"][col] == again["test"][col], "test never depends on the seed"


def test_validation_rule():
    assert [validation_size(n) for n in (0, 9, 10, 4000, 50000, 60000, 10**6)] == [0, 0, 1, 400, 5000, 5000, 5000]
    big = load_suite("text", tasks=["noun_category"], max_train_per_task=None, max_test_per_task=50)
    dd = big["noun_category"]
    pool = len(dd["train"]) + len(dd["validation"])
    assert pool > 50000 and len(dd["validation"]) == 5000
    small = load_suite("text", tasks=["verb_category"], max_train_per_task=1234, max_test_per_task=50)
    dd = small["verb_category"]
    assert len(dd["train"]) + len(dd["validation"]) == 1234 and len(dd["validation"]) == 123


def test_no_text_overlap_between_train_and_test():
    suite = load_suite("text", tasks=["fortune_topic", "verb_category"], max_train_per_task=None,
                       max_test_per_task=None)  # fmt: skip
    for task, dd in suite.items():
        seen = [t.lower() for sp in ("train", "validation") for t in dd[sp]["text"]]
        test = [t.lower() for t in dd["test"]["text"]]
        assert len(set(seen)) == len(seen) and len(set(test)) == len(test), f"{task}: duplicates"
        assert not set(seen) & set(test), task
        assert len(test) > 0.15 * (len(seen) + len(test)), task


def test_fortune_cleaning_and_dedupe():
    raw = "A star captain's most solemn oath.\n\t\t-- Kirk, \"The Omega Glory\",\n\t\t   stardate unknown\n"
    assert clean_fortune(raw) == "A star captain's most solemn oath."
    assert clean_fortune("_\bb_\bo_\bl_\bd  text\n-- in the middle\nstays") == "bold text -- in the middle stays"
    pairs = [("Same gloss", "a"), ("same  gloss", "a"), ("shared", "a"), ("Shared", "b"), ("other", "b")]
    assert _dedupe([(" ".join(t.split()), y) for t, y in pairs]) == [("Same gloss", "a"), ("other", "b")]


def test_fashion_tasks_never_use_pretext_images(vision_suite):
    images, _ = fashion_mnist("train")
    pretext = {hashlib.sha1(images[i].tobytes()).digest() for i in PRETEXT_INDICES}
    for task in FASHION_BLOCKS:
        for split in ("train", "validation"):
            arr = np.asarray(vision_suite[task][split].with_format("numpy")[:]["image"], dtype=np.uint8)
            assert not {hashlib.sha1(a.tobytes()).digest() for a in arr} & pretext, (task, split)
    blocks = [set(r) for r in FASHION_BLOCKS.values()] + [set(PRETEXT_INDICES)]
    assert sum(len(b) for b in blocks) == len(set().union(*blocks)) == 60000


def test_balanced_take():
    labels = np.array([0] * 50 + [1] * 5 + [2] * 30)
    order = np.random.default_rng(3).permutation(len(labels))
    idx = balanced_take(labels, 40, order)
    assert len(idx) == 40 and len(set(idx.tolist())) == 40
    assert sorted(np.bincount(labels[idx]).tolist()) == [5, 17, 18]  # the small class keeps all 5
    assert [i for i in order if i in set(idx.tolist())] == idx.tolist()  # taken in `order`'s order
    assert balanced_take(labels, None, order).tolist() == order.tolist()


@pytest.mark.parametrize(
    ("name", "package"),
    [("vision", "dataset-fashion-mnist"), ("text", "wordnet-base")],
)
def test_missing_debian_package(name, package, tmp_path, monkeypatch):
    monkeypatch.setenv(DEBIAN_ROOT_ENV, str(tmp_path))
    with pytest.raises(TaskDataError, match=f"apt-get install {package}"):
        load_suite(name, **CAPS)


def test_missing_fortunes_package(tmp_path, monkeypatch):
    (tmp_path / "wordnet").symlink_to("/usr/share/wordnet")
    monkeypatch.setenv(DEBIAN_ROOT_ENV, str(tmp_path))
    with pytest.raises(TaskDataError, match="apt-get install fortunes"):
        load_suite("text", tasks=["fortune_topic"], **CAPS)


def test_bad_names_and_options():
    assert SUITES == ("text", "vision", "hub-vit8", "hub-glue")
    with pytest.raises(TaskDataError, match="unknown task suite"):
        load_suite("imagenet")
    with pytest.raises(TaskDataError, match="unknown vision task"):
        load_suite("vision", tasks=["cifar"])
    with pytest.raises(TaskDataError, match="max_train_per_task"):
        load_suite("vision", tasks=["digits"], max_train_per_task=0)
    with pytest.raises(TaskDataError, match="Hub suites"):
        load_suite("text", sources={"x": "y"})


def test_hub_suite_offline_error(tmp_path):
    with pytest.raises(HubError, match="tanganke/dtd.*network access"):
        load_suite("hub-vit8", tasks=["dtd"], cache_dir=str(tmp_path))


def _local_image_dataset(path):
    rng = np.random.default_rng(0)
    names = ["cat", "dog", "bird"]
    feats = datasets.Features({"img": datasets.Image(), "fine_label": datasets.Value("string"),
                               "id": datasets.Value("int64")})  # fmt: skip

    def split(n):
        return datasets.Dataset.from_dict(
            {"img": [rng.integers(0, 255, (20, 24, 3), dtype=np.uint8) for _ in range(n)],
             "fine_label": [names[i % 3] for i in range(n)], "id": list(range(n))},
            features=feats,
        )  # fmt: skip

    datasets.DatasetDict({"train": split(60), "test": split(15)}).save_to_disk(str(path))


def test_hub_normalization_image(tmp_path):
    _local_image_dataset(tmp_path / "pets")
    spec = HubTask(str(tmp_path / "pets"), label_column="fine_label")
    suite = load_hub_suite("hub-vit8", seed=0, tasks=["pets"], sources={"pets": spec}, max_train_per_task=None)
    dd = suite["pets"]
    assert set(dd) == {"train", "validation", "test"}
    assert (len(dd["train"]), len(dd["validation"]), len(dd["test"])) == (54, 6, 15)
    assert dd["train"].column_names == ["image", "label"]
    assert dd["test"].features["label"].names == ["bird", "cat", "dog"]
    px = pixelize_suite(dd, image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert px["train"][:2]["pixel_values"].shape == (2, 3, 16, 16)
    assert px["test"].features["labels"].names == ["bird", "cat", "dog"]


def _class_label_dataset(names: list[str], n: int = 24) -> datasets.DatasetDict:
    """A raw image DatasetDict (train / test) whose ClassLabel has `names`; example i has class id i % k and
    an image filled with 10 * that id, so the source class of every normalized example can be read back."""
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    def split(m):
        ids = [i % len(names) for i in range(m)]
        return datasets.Dataset.from_dict(
            {"image": [np.full((4, 4, 3), 10 * i, dtype=np.uint8) for i in ids], "label": ids}, features=feats)

    return datasets.DatasetDict({"train": split(n), "test": split(n // 2)})


def _source_names(dd: datasets.DatasetDict, own: list[str]) -> set[tuple[str, str]]:
    """{(the dataset's own name of an example's class, the name the example carries now)}."""
    out = set()
    for split in ("train", "validation", "test"):
        ds = dd[split]
        for row in ds:
            source = own[int(np.asarray(row["image"])[0, 0, 0]) // 10]
            out.add((source, ds.features["label"].names[row["label"]]))
    return out


def test_hub_class_names_mapped_by_name_when_the_dataset_spells_them_alike(caplog):
    from hf_atm.data.hub import class_name_key, normalize_hub_dataset

    shipped = ["annual crop", "forest", "sea lake", "river stream"]
    own = ["Forest", "Sea_Lake", "River/Stream ", "annual_crop"]  # the same classes, in another id order
    assert [class_name_key(n) for n in own] == ["forest", "sea lake", "river stream", "annual crop"]
    with caplog.at_level("WARNING", logger="hf_atm.data.hub"):
        dd = normalize_hub_dataset("eurosat", _class_label_dataset(own), HubTask("org/eurosat-like"),
                                   class_names=shipped, max_train_per_task=None)  # fmt: skip
    assert not caplog.records
    assert dd["train"].features["label"].names == shipped
    # every example keeps its class (by name), not the shipped name at its dataset id (Forest -> annual crop)
    assert _source_names(dd, own) == {("Forest", "forest"), ("Sea_Lake", "sea lake"),
                                      ("River/Stream ", "river stream"), ("annual_crop", "annual crop")}


def test_hub_class_names_by_index_with_a_warning_when_the_names_differ(caplog):
    from hf_atm.data.hub import normalize_hub_dataset

    shipped = ["annual crop land", "forest", "brushland or shrubland"]
    own = ["AnnualCrop", "Forest", "HerbaceousVegetation"]
    with caplog.at_level("WARNING", logger="hf_atm.data.hub"):
        dd = normalize_hub_dataset("eurosat", _class_label_dataset(own), HubTask("org/eurosat-like"),
                                   class_names=shipped, max_train_per_task=None)  # fmt: skip
    assert dd["train"].features["label"].names == shipped
    assert _source_names(dd, own) == set(zip(own, shipped))  # by class id
    (record,) = caplog.records
    message = record.getMessage()
    assert "'eurosat'" in message and "by class id" in message
    # the pairs that differ are shown, the one that matches (Forest / forest) is not
    assert "('AnnualCrop', 'annual crop land')" in message and "('HerbaceousVegetation', " in message
    assert "'Forest'" not in message


def test_hub_normalization_glue_like(tmp_path, tokenizer):
    feats = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
                               "idx": datasets.Value("int32")})  # fmt: skip

    def split(n, hidden=False):
        return datasets.Dataset.from_dict(
            {"sentence1": [f"premise number {i}" for i in range(n)], "sentence2": [f"claim {i}" for i in range(n)],
             "label": [-1 if hidden else i % 2 for i in range(n)], "idx": list(range(n))},
            features=feats,
        )  # fmt: skip

    folder = tmp_path / "rte"
    datasets.DatasetDict({"train": split(40), "validation": split(10), "test": split(12, True)}).save_to_disk(
        str(folder)
    )
    dd = load_suite("hub-glue", tasks=["rte"], sources={"rte": str(folder)})["rte"]
    assert len(dd["test"]) == 10, "GLUE's hidden-label test split is replaced by validation"
    assert dd["train"].column_names == ["text", "text_pair", "label"]
    tok = tokenize_suite(dd, tokenizer, max_length=16)
    row = tok["test"][0]
    assert tokenizer.sep_token_id in row["input_ids"][1:-1].tolist(), "sentence pairs are encoded as pairs"
    assert tok["train"].features["labels"].names == ["entailment", "not_entailment"]


def test_tokenize_suite(text_suite, tokenizer):
    import torch

    out = tokenize_suite(text_suite, tokenizer, max_length=24)
    assert list(out) == list(text_suite)
    ds = out["fortune_language"]["train"]
    assert {"input_ids", "attention_mask", "labels"} <= set(ds.column_names) and "text" not in ds.column_names
    assert ds.features["labels"].names == text_suite["fortune_language"]["train"].features["label"].names
    lengths = [len(r) for r in ds["input_ids"]]
    assert max(lengths) == 24 and min(lengths) < 24, "long fortunes truncated, short ones not padded"
    assert ds[:3]["labels"].dtype == torch.int64
    padded = tokenize_suite(text_suite["verb_category"], tokenizer, max_length=32, padding="max_length")
    assert padded["test"][:4]["input_ids"].shape == (4, 32)


def test_pixelize_suite(vision_suite):
    import torch

    out = pixelize_suite(vision_suite)
    ds = out["fashion10"]["train"]
    assert ds.column_names == ["pixel_values", "labels"]
    batch = ds[:5]
    assert batch["pixel_values"].shape == (5, 1, 28, 28) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.int64
    raw = np.asarray(vision_suite["fashion10"]["train"].with_format("numpy")[:5]["image"], dtype=np.float32)
    np.testing.assert_allclose(batch["pixel_values"][:, 0].numpy(), (raw / 255 - 0.5) / 0.5, atol=1e-6)
    assert ds.features["labels"].names == vision_suite["fashion10"]["train"].features["label"].names
    rgb = pixelize_suite(vision_suite["digits"], image_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    px = rgb["validation"][:2]["pixel_values"]
    assert px.shape == (2, 3, 32, 32)
    assert not torch.allclose(px[:, 0], px[:, 2]), "per-channel normalization"
