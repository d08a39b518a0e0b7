"""The offline text suite: four classification tasks on real text from Debian packages.

=================  ==============================================  =====================================
task               text -> label                                   source (Debian package)
=================  ==============================================  =====================================
noun_category      a noun synset's gloss -> its lexicographer      /usr/share/wordnet/data.noun
                   file (10 classes: the ten largest noun files)   (wordnet-base)
verb_category      a verb synset's gloss -> its lexicographer      /usr/share/wordnet/data.verb
                   file (10 classes: the ten largest verb files)   (wordnet-base)
fortune_topic      an English fortune -> its collection            /usr/share/games/fortunes (fortunes)
                   (8 topical collections, see FORTUNE_TOPICS)
fortune_language   a fortune -> its language (en de es it pl ru)   fortunes, fortunes-de/-es/-it/-pl/-ru
=================  ==============================================  =====================================

Honesty rules, applied to every task:

* the text is only the gloss or the fortune: no lemma, synset offset, lexicographer name or file name;
  fortunes lose their trailing attribution lines (``-- Author, "Work"``), which would name e.g. a
  Star Trek episode, and the terminal overstrike (``_\\b``) sequences;
* texts are normalized (whitespace collapsed) and de-duplicated within a task; a text that occurs with
  two different labels is dropped (WordNet shares some glosses between synsets of different files);
* the test split is a fixed 20% of the distinct texts, chosen by a hash of the normalized text, so the
  same text can never be both in test and in train/validation, and test is the same for every seed.

WordNet has no lexnames file in the Debian package; :data:`LEXNAMES` is the standard list (lexnames(5WN)).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from hf_atm.data.splits import (
    DEFAULT_MAX_TEST,
    DEFAULT_MAX_TRAIN,
    build_task,
    debian_root,
    require_path,
    stable_hash,
)
from hf_atm.errors import TaskDataError

__all__ = [
    "FORTUNE_LANGUAGES",
    "FORTUNE_TOPICS",
    "LEXNAMES",
    "NOUN_CATEGORIES",
    "TEXT_TASKS",
    "VERB_CATEGORIES",
    "clean_fortune",
    "load_text_suite",
    "read_fortunes",
    "read_wordnet_glosses",
]

# lexnames(5WN): lexicographer file number -> name.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip

# The ten largest noun / verb lexicographer files of WordNet 3.0 (synset counts in parentheses).
NOUN_CATEGORIES = (
    "noun.act",  # 6650
    "noun.animal",  # 7509
    "noun.artifact",  # 11587
    "noun.attribute",  # 3039
    "noun.communication",  # 5607
    "noun.location",  # 3209
    "noun.person",  # 11087
    "noun.plant",  # 8030
    "noun.state",  # 3544
    "noun.substance",  # 2983
)
VERB_CATEGORIES = (
    "verb.body",  # 547
    "verb.change",  # 2383
    "verb.cognition",  # 695
    "verb.communication",  # 1548
    "verb.contact",  # 2196
    "verb.creation",  # 694
    "verb.motion",  # 1408
    "verb.possession",  # 847
    "verb.social",  # 1106
    "verb.stative",  # 756
)
# English fortune collections with distinct topics and at least ~200 entries.
FORTUNE_TOPICS = ("computers", "food", "law", "politics", "science", "songs-poems", "startrek", "work")
# Language -> (sub-folder of /usr/share/games/fortunes, Debian package). English is the top folder.
FORTUNE_LANGUAGES = {
    "de": ("de", "fortunes-de"),
    "en": ("", "fortunes"),
    "es": ("es", "fortunes-es"),
    "it": ("it", "fortunes-it"),
    "pl": ("pl", "fortunes-pl"),
    "ru": ("ru", "fortunes-ru"),
}
# Collections that are not prose in one language: pictures, translation tables, untranslated items.
_FORTUNE_SKIP = {"art", "ascii-art", "translate-me", "asciiart", "translations"}
TEXT_TASKS = ("noun_category", "verb_category", "fortune_topic", "fortune_language")
TEST_FRACTION = 0.2
_MIN_CHARS = 20

_WS = re.compile(r"\s+")
_OVERSTRIKE = re.compile(r".\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_ATTRIBUTION = re.compile(r"^\s*--+\s*\S")
_CYRILLIC = re.compile(r"[\u0400-\u052f]")
_LETTER = re.compile(r"[^\W\d_]")


def _normalize(text: str) -> str:
    """Whitespace collapsed to single spaces, Unicode NFC, stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def _wordnet_dir() -> Path:
    return require_path(debian_root() / "wordnet", "wordnet-base")


def _fortunes_dir(package: str = "fortunes", sub: str = "") -> Path:
    root = require_path(debian_root() / "games" / "fortunes", package)
    return require_path(root / sub, package) if sub else root


def read_wordnet_glosses(pos: str) -> list[tuple[str, str]]:
    """``(gloss, lexname)`` for every synset of ``data.<pos>`` (pos ``"noun"`` or ``"verb"``), in file order.

    The gloss is the text after ``" | "`` (definition and example sentences), normalized; nothing of the
    synset's words, offset or lexicographer file enters it.
    """
    if pos not in ("noun", "verb"):
        raise TaskDataError(f"pos must be 'noun' or 'verb', got {pos!r}")
    path = require_path(_wordnet_dir() / f"data.{pos}", "wordnet-base")
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or " | " not in line:  # license header lines start with two spaces
                continue
            head, gloss = line.split(" | ", 1)
            fields = head.split(" ", 2)
            lexnum = int(fields[1])
            if not 0 <= lexnum < len(LEXNAMES):
                raise TaskDataError(f"{path}: unknown lexicographer file number {lexnum} in {fields[0]}")
            out.append((_normalize(gloss), LEXNAMES[lexnum]))
    return out


def clean_fortune(raw: str) -> str:
    """One fortune as plain text: overstrikes and control characters removed, trailing attribution lines
    (a line starting with ``--`` followed only by indented continuation lines) dropped, whitespace collapsed.
    """
    text = _CONTROL.sub("", _OVERSTRIKE.sub("", raw.replace("\r\n", "\n")))
    lines = text.rstrip().split("\n")
    for i in range(len(lines) - 1, 0, -1):
        if _ATTRIBUTION.match(lines[i]) and all(ln[:1].isspace() for ln in lines[i + 1 :] if ln.strip()):
            lines = lines[:i]
            break
    return _normalize("\n".join(lines))


def _fortune_files(folder: Path) -> list[Path]:
    """The fortune text files directly in `folder` (no ``.dat`` index, ``.u8`` alias, link or sub-folder)."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink() or not p.is_file() or p.suffix in (".dat", ".u8") or p.name.endswith("-pre"):
            continue
        stem = p.name.removesuffix(".fortunes")
        if stem in _FORTUNE_SKIP:
            continue
        files.append(p)
    return files


def read_fortunes(path: Path) -> list[str]:
    """The cleaned fortunes of one file (entries separated by lines holding only ``%``), short ones dropped.

    A file that is not UTF-8 text is skipped (returns ``[]``): a few collections hold binary junk.
    """
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return []
    entries = re.split(r"^%[ \t]*$", raw, flags=re.M)
    return [t for t in (clean_fortune(e) for e in entries) if len(t) >= _MIN_CHARS]


def _script_ok(text: str, language: str) -> bool:
    """Whether most letters of `text` are Cyrillic (ru) or Latin (the others): drops stray items."""
    letters = len(_LETTER.findall(text))
    if letters < 10:
        return False
    cyr = len(_CYRILLIC.findall(text)) / letters
    return cyr > 0.5 if language == "ru" else cyr < 0.1


def _dedupe(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Distinct texts with their label, first occurrence order; texts seen with 2+ labels are dropped."""
    labels: dict[str, set[str]] = {}
    order: list[str] = []
    for text, label in pairs:
        key = text.lower()
        if key not in labels:
            labels[key] = set()
            order.append(text)
        labels[key].add(label)
    out = []
    for text in order:
        seen = labels[text.lower()]
        if len(seen) == 1:
            out.append((text, next(iter(seen))))
    return out


@functools.lru_cache(maxsize=8)
def _task_examples(name: str, root: str) -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...], np.ndarray, np.ndarray]:
    """``(pool texts, pool labels, test texts, test labels, test order)`` of text task `name` under `root`.

    Deduped, restricted to the task's labels, test = the texts whose hash falls in the fixed 20%; the test
    order (for capping) is by hash, so it is the same on every machine and for every seed. Cached per
    (task, data root): loading a suite again (another seed, other caps) does not read the files again.
    """
    reader, label_names, _ = _TASKS[name]
    index = {n: i for i, n in enumerate(label_names)}
    kept = [(t, index[lab]) for t, lab in _dedupe(reader()) if lab in index]
    if not kept:
        raise TaskDataError(f"text task {name!r}: no examples found under {root}")
    texts = [t for t, _ in kept]
    labels = np.array([y for _, y in kept], dtype=np.int64)
    hashes = np.array([stable_hash(t.lower()) for t in texts], dtype=np.uint64)
    is_test = (hashes % np.uint64(1000)) < np.uint64(int(TEST_FRACTION * 1000))
    pool_texts = tuple(t for t, te in zip(texts, is_test) if not te)
    test_texts = tuple(t for t, te in zip(texts, is_test) if te)
    test_order = np.argsort(hashes[is_test], kind="stable")
    for arr in (labels, test_order):
        arr.flags.writeable = False
    return pool_texts, labels[~is_test], test_texts, labels[is_test], test_order


def _make_task(name: str, *, seed: int, max_train: int | None, max_test: int | None):
    """Text task `name`'s DatasetDict: its cached examples split by :func:`hf_atm.data.splits.build_task`."""
    import datasets

    _, label_names, description = _TASKS[name]
    pool_texts, pool_labels, test_texts, test_labels, test_order = _task_examples(name, str(debian_root()))
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(label_names))}
    )
    return build_task(
        name, {"text": pool_texts, "label": pool_labels}, {"text": test_texts, "label": test_labels},
        features, seed=seed, max_train=max_train, max_test=max_test, test_order=test_order,
        description=description,
    )  # fmt: skip


def _noun_pairs() -> list[tuple[str, str]]:
    return read_wordnet_glosses("noun")


def _verb_pairs() -> list[tuple[str, str]]:
    return read_wordnet_glosses("verb")


def _topic_pairs() -> list[tuple[str, str]]:
    folder = _fortunes_dir()
    pairs = []
    for topic in FORTUNE_TOPICS:
        path = require_path(folder / topic, "fortunes")
        pairs += [(t, topic) for t in read_fortunes(path)]
    return pairs


def _language_pairs() -> list[tuple[str, str]]:
    pairs = []
    for lang, (sub, package) in FORTUNE_LANGUAGES.items():
        for path in _fortune_files(_fortunes_dir(package, sub)):
            pairs += [(t, lang) for t in read_fortunes(path) if _script_ok(t, lang)]
    return pairs


_TASKS = {
    "noun_category": (_noun_pairs, NOUN_CATEGORIES, "WordNet noun gloss -> lexicographer file (wordnet-base)"),
    "verb_category": (_verb_pairs, VERB_CATEGORIES, "WordNet verb gloss -> lexicographer file (wordnet-base)"),
    "fortune_topic": (_topic_pairs, FORTUNE_TOPICS, "English fortune -> its collection (fortunes)"),
    "fortune_language": (
        _language_pairs,
        tuple(sorted(FORTUNE_LANGUAGES)),
        "fortune -> its language (fortunes, fortunes-de/-es/-it/-pl/-ru)",
    ),
}


def load_text_suite(
    seed: int = 0,
    max_train_per_task: int | None = DEFAULT_MAX_TRAIN,
    max_test_per_task: int | None = DEFAULT_MAX_TEST,
    tasks: Sequence[str] | None = None,
) -> dict:
    """``{task: DatasetDict(train/validation/test)}`` with columns ``text`` (str) and ``label`` (ClassLabel).

    `tasks` selects a subset of :data:`TEXT_TASKS` (default: all four, in that order). Split sizes follow
    :mod:`hf_atm.data.splits`: a pool of at most `max_train_per_task` examples (class-balanced, shuffled by
    `seed`), 10% of it (at most 5,000) as validation; test is the fixed hashed 20%, capped at
    `max_test_per_task` (class-balanced, seed-independent). A missing Debian package raises TaskDataError
    naming it.
    """
    names = list(TEXT_TASKS if tasks is None else tasks)
    unknown = [t for t in names if t not in _TASKS]
    if unknown or not names:
        raise TaskDataError(f"unknown text task(s) {unknown or names}: choose from {', '.join(TEXT_TASKS)}")
    suite = {}
    for name in names:
        suite[name] = _make_task(name, seed=seed, max_train=max_train_per_task, max_test=max_test_per_task)
    return suite
