"""Vocabulary alignment: embedding / LM-head rows matched by token string, the output tokenizer, tied embeddings.

What ``hf-atm merge --tokenizer-source base | union | MODEL`` needs, as a small API the streaming engine calls
(cf. mergekit's ``tokenizer_source``; the differences are listed at the end).

**Plan** (:func:`plan_vocabulary`). Every checkpoint's tokenizer is loaded (:func:`load_vocabulary`). The
output vocabulary is the base's (``base``), one model's (``MODEL``, a model label), or ``union``: the base's
tokens at their ids, then the tokens the base lacks in order of first appearance (models in order, each in id
order), appended at ids ``len(base tokenizer)``, ``+1``... exactly as ``add_tokens`` numbers them. The
:class:`VocabPlan` maps every output row to a row of each checkpoint (base first, then the models), or None
where that checkpoint lacks the token.

**Rows versus tokens.** A checkpoint's *row count* is dim 0 of its input embedding tensor (the truth; config's
``vocab_size`` is not consulted). A token whose id is >= the row count has no row in that checkpoint (as if
absent). Output rows: ``max(output tokenizer length, row count of the tokenizer source)`` -- the base for
``base`` / ``union``, that model for ``MODEL`` -- so a source's padding rows survive and ``config.json``'s
``vocab_size`` (:func:`output_vocab_size`) does not shrink. ``union``'s new tokens take the ids right after
the base tokenizer, which may be rows the base kept as padding (that padding row is then replaced by the token).

**Padding-row rule.** An output row that is no output token's id is a padding row: it is taken by index from
every checkpoint that has a row with that index which is not a real token of its own (a padding row there
too). For ``base`` / ``union`` the base always has it (the rows beyond the tokenizer are the base's), and models
vote on it only when it is padding in them as well. A row no checkpoint can supply is a CheckpointError at
plan time.

**Merging rows** (:func:`merge_vocab_tensor`). Output rows are grouped by which checkpoints have their token;
for each group the base has, the engine's ``merge_rows`` callback merges the rows with only the models that
have them (a model lacking a token does not vote on its row; the engine restricts the merge spec: weights...).
A group no model has is the base's rows. A token the base lacks (new in ``union``/``MODEL``) gets the plain,
unweighted mean of the rows of the models that have it (one model: its row). Rows are gathered with
``index_select`` (or zero-copy ``narrow`` for contiguous runs), so each input costs at most one copy of its size
(``block_rows`` bounds it further for row-wise methods).

**Vocabulary tensors** (:func:`vocab_tensor_names`): names ending (at a ``.`` boundary) in one of
:data:`EMBEDDING_SUFFIXES` / :data:`HEAD_SUFFIXES`, whose dim 0 equals the row count of every checkpoint
holding them. Only their dim 0 may differ between checkpoints.

**Output tokenizer** (:func:`write_tokenizer`): ``base`` / ``MODEL`` (and ``union`` adding nothing) copy that
checkpoint's tokenizer files verbatim (:data:`TOKENIZER_PATTERNS`, chat template included); ``union`` saves the
base tokenizer with the new tokens added (``AddedToken`` flags kept, special ones as special) and checks that
each token's id in the reloaded tokenizer is its output row.

**Tied embeddings** (:func:`tied_embeddings`, :func:`tie_reader`). Whether a checkpoint ties comes from
``AutoConfig`` (class defaults apply: GPT-2 ties, Llama does not). The output ties as the base does: when the
base ties, every checkpoint's stored head is hidden (a tying checkpoint that stores it anyway holds the tie;
an untying model's separate head cannot be represented and is dropped, with a warning), so no separate head is
written; when the base does not tie, a tying model serves its embedding under the base's head name.

**Differences from mergekit 0.1.5** (``tokenizer/build.py``, ``tokenizer/embed.py``), on purpose: mergekit
fills a missing token's row in every model (base row / sole donor / mean) and merges all models on it; here a
model lacking a token does not vote. mergekit sizes the output to ``len(tokenizer)`` (optionally
``pad_to_multiple_of``, padding rows = mean embedding) and strips base tokens beyond config ``vocab_size``;
here padding rows are kept from the source and row counts come from the tensors. mergekit re-serializes the
output tokenizer always and assumes the base's tokenizer for a model whose tokenizer fails to load; here
files are copied verbatim when nothing is added and an unloadable tokenizer is an error. mergekit decides
ties by tensor presence (``tied_names`` aliases), here by the config.
"""

from __future__ import annotations

import fnmatch
import inspect
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.hub.resolve import TOKENIZER_FILE_PATTERNS
from hf_atm.merging.io import TensorInfo

__all__ = [
    "EMBEDDING_SUFFIXES",
    "HEAD_SUFFIXES",
    "TOKENIZER_PATTERNS",
    "VOCAB_SUFFIXES",
    "MergeRows",
    "NewToken",
    "TiedEmbeddings",
    "TiedEmbeddingsReader",
    "VocabPlan",
    "Vocabulary",
    "embedding_names",
    "embedding_rows",
    "is_vocab_tensor_name",
    "load_vocabulary",
    "merge_vocab_tensor",
    "output_vocab_size",
    "plan_vocabulary",
    "tie_as_base",
    "tie_reader",
    "tied_embeddings",
    "vocab_tensor_names",
    "vocabularies_match",
    "write_tokenizer",
]

#: Input-embedding tensor names end with one of these (Llama / Qwen, GPT-2, BLOOM / BERT, GPT-NeoX, InternLM).
EMBEDDING_SUFFIXES: tuple[str, ...] = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)
#: Output-head tensor names end with one of these (dim 0 must still be the row count: see vocab_tensor_names).
HEAD_SUFFIXES: tuple[str, ...] = ("lm_head.weight", "embed_out.weight", "output.weight", "lm_head.bias")
VOCAB_SUFFIXES: tuple[str, ...] = EMBEDDING_SUFFIXES + HEAD_SUFFIXES
#: Top-level files that make up a tokenizer (the chat template travels with it).
TOKENIZER_PATTERNS: tuple[str, ...] = TOKENIZER_FILE_PATTERNS
_SOURCES = ("base", "union")

#: ``merge_rows(model_indices, base_rows, model_rows) -> rows``: the engine's merge of a block of rows with the
#: subset of models (0-based indices into the models) that have those tokens, ``model_rows`` in that order.
MergeRows = Callable[[list[int], Tensor, list[Tensor]], Tensor]


# ------------------------------------------------------------------------------------------------ tokenizers
@dataclass(frozen=True, eq=False)
class Vocabulary:
    """One checkpoint's tokenizer: token -> id (``get_vocab()``, added tokens included), length, special tokens.

    ``length`` is ``len(tokenizer)`` (at least the largest id + 1); ``added`` maps an added token's string to its
    ``AddedToken`` (flags: special, normalized, lstrip, rstrip, single_word); ``special`` holds every special
    token (``all_special_tokens`` and added tokens flagged special).
    """

    label: str
    folder: Path
    tokens: Mapping[str, int]
    length: int
    special: frozenset[str]
    added: Mapping[str, Any]
    tokenizer: Any = field(repr=False)


def _load_tokenizer(folder: Path, label: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # OSError / ValueError / a tokenizers parse error: all mean "no usable tokenizer"
        raise CheckpointError(f"{label}: cannot load the tokenizer in {folder}: {e}") from e


def load_vocabulary(folder: str | Path, label: str) -> Vocabulary:
    """Load the tokenizer of checkpoint folder `folder` (AutoTokenizer, no remote code) as a :class:`Vocabulary`.

    Raises CheckpointError naming `label` and `folder` when it cannot be loaded or has no tokens.
    """
    folder = Path(folder)
    tok = _load_tokenizer(folder, label)
    try:
        tokens = dict(tok.get_vocab())
        added = {t.content: t for t in tok.added_tokens_decoder.values()}
        length = len(tok)
    except Exception as e:  # a tokenizer class without a vocabulary API
        raise CheckpointError(f"{label}: the tokenizer in {folder} gives no vocabulary: {e}") from e
    if not tokens:
        raise CheckpointError(f"{label}: the tokenizer in {folder} has no tokens")
    special = set(getattr(tok, "all_special_tokens", ()))
    special.update(c for c, t in added.items() if getattr(t, "special", False))
    return Vocabulary(label, folder, tokens, max(length, max(tokens.values()) + 1), frozenset(special), added, tok)


def vocabularies_match(vocabs: Sequence[Vocabulary], rows: Sequence[int] | None = None) -> bool:
    """True when no alignment is needed: every token map equals the first's and so does every row count."""
    first = vocabs[0].tokens
    if any(v.tokens != first for v in vocabs[1:]):
        return False
    return rows is None or all(r == rows[0] for r in rows)


# ------------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class NewToken:
    """A token the ``union`` output adds to the base tokenizer: its string, id, where it came from and its flags."""

    content: str
    id: int
    source: str  # label of the first model that has it
    special: bool
    added: Any = None  # that model's AddedToken (flags kept), None for a token of its regular vocabulary


@dataclass(frozen=True, eq=False)
class VocabPlan:
    """The output vocabulary and, per input checkpoint, which of its rows feeds each output row.

    ``labels`` / ``folders`` / ``rows`` list the checkpoints (base first, then the models in order) and their
    embedding row counts; ``row_maps[c][r]`` is checkpoint c's row for output row r, or None when it lacks that
    token (or padding row). ``token_ids`` is the output tokenizer's token -> id (= row), ``num_rows`` the output
    row count, ``source_index`` the checkpoint whose tokenizer the output starts from, ``new_tokens`` what
    ``union`` adds to it.
    """

    source: str
    labels: tuple[str, ...]
    folders: tuple[Path, ...]
    rows: tuple[int, ...]
    token_ids: Mapping[str, int]
    num_rows: int
    row_maps: tuple[tuple[int | None, ...], ...]
    source_index: int
    new_tokens: tuple[NewToken, ...] = ()
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_models(self) -> int:
        return len(self.labels) - 1

    @property
    def needs_alignment(self) -> bool:
        """False when every checkpoint's rows already are the output rows (same count, identity map)."""
        if "needs" not in self._cache:
            self._cache["needs"] = not all(
                n == self.num_rows and all(m[r] == r for r in range(self.num_rows))
                for n, m in zip(self.rows, self.row_maps)
            )
        return self._cache["needs"]

    def index(self) -> Tensor:
        """``row_maps`` as an int64 tensor (checkpoints x output rows), -1 where a checkpoint has no row."""
        if "index" not in self._cache:
            self._cache["index"] = torch.tensor(
                [[-1 if i is None else i for i in m] for m in self.row_maps], dtype=torch.int64
            ).reshape(len(self.row_maps), self.num_rows)
        return self._cache["index"]

    def row_groups(self) -> list[tuple[Tensor, bool, list[int], Tensor]]:
        """Output rows grouped by which checkpoints have them: (out rows, base has them, model indices, src index)."""
        if "groups" not in self._cache:
            index = self.index()
            present = index >= 0  # checkpoints x rows
            if present.shape[0] <= 62:  # one int64 bit per checkpoint: a 1-D unique is far faster than dim=0
                bits = torch.zeros(present.shape[1], dtype=torch.int64)
                for c in range(present.shape[0]):
                    bits |= present[c].to(torch.int64) << c
                codes, inverse = torch.unique(bits, return_inverse=True)
                keys = [[bool(int(k) >> c & 1) for c in range(present.shape[0])] for k in codes]
            else:
                uniq, inverse = torch.unique(present.T, dim=0, return_inverse=True)
                keys = uniq.tolist()
            groups = []
            for g, key in enumerate(keys):
                out_rows = (inverse == g).nonzero().squeeze(1)
                models = [i for i in range(self.num_models) if key[i + 1]]
                groups.append((out_rows, bool(key[0]), models, index[:, out_rows]))
            self._cache["groups"] = groups
        return self._cache["groups"]

    def summary(self) -> dict[str, Any]:
        """Plain-typed facts for logs / the model card: source, output rows, added tokens, tokens each lacks."""
        return {
            "source": self.source,
            "num_rows": self.num_rows,
            "new_tokens": [t.content for t in self.new_tokens],
            "missing_rows": {lab: sum(i is None for i in m) for lab, m in zip(self.labels, self.row_maps)},
        }


def _real_ids(vocab: Vocabulary, rows: int) -> dict[str, int]:
    """The tokens that have an embedding row (id < rows): a token beyond the matrix is no row of it."""
    return {t: i for t, i in vocab.tokens.items() if i < rows}


def plan_vocabulary(
    base_dir: str | Path,
    model_dirs: Sequence[str | Path],
    labels: Sequence[str],
    source: str,
    *,
    base_label: str = "base",
    rows: Sequence[int | None] | None = None,
) -> VocabPlan | None:
    """Plan the output vocabulary for ``--tokenizer-source`` `source` (``"base"``, ``"union"`` or a model label).

    `labels` name the models of `model_dirs` (``"base"`` / ``"union"`` always mean the keywords); `rows` gives each checkpoint's embedding row count, base first
    (:func:`embedding_rows`; None or a None entry: the tokenizer's length). Returns None when there is nothing
    to do: `source` is ``base`` / ``union`` and every tokenizer and row count equals the base's (the engine then
    merges and copies files as without the option). Raises MergeConfigError for an unknown `source` (listing the
    labels), CheckpointError for an unloadable tokenizer or an output row no checkpoint has.
    """
    labels = [str(lab) for lab in labels]
    if len(labels) != len(model_dirs):
        raise MergeConfigError(f"plan_vocabulary: {len(model_dirs)} model folders but {len(labels)} labels")
    if source not in _SOURCES and source not in labels:
        raise MergeConfigError(
            f"tokenizer_source: {source!r} is neither 'base', 'union' nor one of the models "
            f"({', '.join(map(repr, labels)) or 'none'})"
        )
    n_ckpt = len(labels) + 1
    if rows is not None and len(rows) != n_ckpt:
        raise MergeConfigError(f"plan_vocabulary: {len(rows)} row counts for {n_ckpt} checkpoints")
    vocabs = [load_vocabulary(base_dir, base_label)]
    vocabs += [load_vocabulary(d, lab) for d, lab in zip(model_dirs, labels)]
    counts = [v.length if rows is None or rows[c] is None else int(rows[c]) for c, v in enumerate(vocabs)]
    if source in _SOURCES and vocabularies_match(vocabs, counts):
        return None
    return _plan(vocabs, counts, source)


def _plan(vocabs: Sequence[Vocabulary], rows: Sequence[int], source: str) -> VocabPlan:
    real = [_real_ids(v, n) for v, n in zip(vocabs, rows)]
    src = 0 if source in _SOURCES else 1 + [v.label for v in vocabs[1:]].index(source)
    out: dict[str, int] = dict(vocabs[src].tokens)
    new: list[NewToken] = []
    if source == "union":
        next_id = vocabs[0].length
        for v, ids in zip(vocabs[1:], real[1:]):
            for tok, _ in sorted(ids.items(), key=lambda kv: kv[1]):
                if tok in out:
                    continue
                out[tok] = next_id
                new.append(NewToken(tok, next_id, v.label, tok in v.special, v.added.get(tok)))
                next_id += 1
        plain = [t.content for t in new if t.added is None]
        if plain:  # mergekit does the same; a byte-level BPE string such as 'Ġword' is then matched literally
            warnings.warn(
                f"tokenizer union: {len(plain)} token(s) of models' regular vocabularies (e.g. {plain[0]!r}) are "
                "added to the base tokenizer as plain added tokens",
                stacklevel=3,
            )
    out_len = max(max(out.values()) + 1, vocabs[src].length)
    num_rows = max(out_len, rows[src])
    by_id: dict[int, str] = {i: t for t, i in out.items()}
    taken = [set(ids.values()) for ids in real]
    maps: list[tuple[int | None, ...]] = []
    for c, ids in enumerate(real):
        m: list[int | None] = []
        for r in range(num_rows):
            tok = by_id.get(r)
            if tok is not None:
                m.append(ids.get(tok))
            else:  # padding row: by index, from checkpoints where that row is padding too
                m.append(r if r < rows[c] and r not in taken[c] else None)
        maps.append(tuple(m))
    for r in range(num_rows):
        if all(m[r] is None for m in maps):
            what = f"token {by_id[r]!r} (id {r})" if r in by_id else f"padding row {r}"
            raise CheckpointError(
                f"tokenizer source {source!r}: {what} has no embedding row in any checkpoint ("
                + ", ".join(f"{v.label}: {n} rows" for v, n in zip(vocabs, rows))
                + ")"
            )
    return VocabPlan(
        source=source,
        labels=tuple(v.label for v in vocabs),
        folders=tuple(v.folder for v in vocabs),
        rows=tuple(rows),
        token_ids=out,
        num_rows=num_rows,
        row_maps=tuple(maps),
        source_index=src,
        new_tokens=tuple(new),
    )


def output_vocab_size(plan: VocabPlan) -> int:
    """The output's embedding row count: what config.json's ``vocab_size`` must say."""
    return plan.num_rows


# ------------------------------------------------------------------------------------------ vocab tensors
def _ends_with(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def is_vocab_tensor_name(name: str) -> bool:
    """Whether `name` is named like an input embedding or output head (dim 0 is still to be checked)."""
    return any(_ends_with(name, s) for s in VOCAB_SUFFIXES)


def _find(names: list[str], suffixes: Iterable[str]) -> str | None:
    """The name with the first suffix that any name has; among several, the shallowest (fewest dots)."""
    for s in suffixes:
        found = [n for n in names if _ends_with(n, s)]
        if found:
            return min(found, key=lambda n: n.count("."))
    return None


def embedding_names(names: Iterable[str]) -> tuple[str | None, str | None]:
    """(input embedding, output head weight) among `names`, None when absent.

    Suffixes are tried in :data:`EMBEDDING_SUFFIXES` / :data:`HEAD_SUFFIXES` order and the shallowest match wins,
    so a generic ``output.weight`` deep inside a block never beats ``lm_head.weight`` or a top-level ``output.weight``.
    """
    names = list(names)
    return _find(names, EMBEDDING_SUFFIXES), _find(names, [s for s in HEAD_SUFFIXES if s.endswith(".weight")])


def embedding_rows(reader: Any) -> int | None:
    """A checkpoint's row count: dim 0 of its input embedding (of its head when it has none); None without either."""
    embed, head = embedding_names(reader.names)
    for name in (embed, head):
        if name is not None and len(reader.info(name).shape) >= 1:
            return int(reader.info(name).shape[0])
    return None


def vocab_tensor_names(readers: Sequence[Any]) -> list[str]:
    """The vocabulary tensors of ``readers[0]`` (the base), in its order.

    A tensor is one when its name ends with one of :data:`VOCAB_SUFFIXES` and, in every reader holding it, it has
    at least one dimension and dim 0 equals that reader's :func:`embedding_rows`. Readers are anything with
    ``names`` and ``info(name).shape`` (CheckpointReader, TiedEmbeddingsReader...).
    """
    rows = [embedding_rows(r) for r in readers]
    out = []
    for name in readers[0].names:
        if not is_vocab_tensor_name(name):
            continue
        ok = True
        for r, n in zip(readers, rows):
            if name in r:
                shape = r.info(name).shape
                ok = ok and n is not None and len(shape) >= 1 and shape[0] == n
        if ok:
            out.append(name)
    return out


def _contiguous_start(idx: Tensor) -> int | None:
    """The first index when `idx` is ``a, a+1, ..., a+k-1`` (a zero-copy ``narrow`` serves it), else None."""
    k = idx.numel()
    if k == 0:
        return None
    a = int(idx[0])
    if int(idx[-1]) - a != k - 1:
        return None
    return a if k == 1 or bool((idx[1:] - idx[:-1] == 1).all()) else None


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    """Rows `idx` of `t`: a zero-copy view for a contiguous run, else one ``index_select`` copy."""
    a = _contiguous_start(idx)
    return t.narrow(0, a, idx.numel()) if a is not None else t.index_select(0, idx.to(t.device))


def merge_vocab_tensor(
    plan: VocabPlan,
    name: str,
    base_tensor: Tensor,
    model_tensors: Sequence[Tensor],
    merge_rows: MergeRows,
    *,
    out_dtype: torch.dtype | None = None,
    block_rows: int | None = None,
) -> Tensor:
    """The merged vocabulary tensor `name`: ``plan.num_rows`` rows (x the inputs' other dims) in `out_dtype`.

    Output rows are grouped by which checkpoints have them. A group the base has goes through
    ``merge_rows(model_indices, base_rows, model_rows)`` -- only the models having those rows vote (0-based
    indices into `model_tensors`; the rows may be views of the inputs: do not modify them) -- or, when no model
    has it, is the base's rows. Rows the base lacks are the plain mean of the models' rows (float32, float64 if an
    input is). With `block_rows`, each group is handed over in blocks of at most that many rows (bit-identical
    only for row-wise methods, e.g. the element-wise ones; methods with whole-tensor statistics need None).
    `out_dtype` defaults to the base's dtype. Raises CheckpointError naming the tensor and checkpoint when a row
    count or the other dims disagree with the plan.
    """
    inputs = [base_tensor, *model_tensors]
    if len(inputs) != len(plan.labels):
        raise CheckpointError(f"tensor {name!r}: {len(inputs)} inputs for a plan of {len(plan.labels)} checkpoints")
    for label, t, n in zip(plan.labels, inputs, plan.rows):
        if t.ndim < 1 or t.shape[0] != n or t.shape[1:] != base_tensor.shape[1:]:
            raise CheckpointError(
                f"tensor {name!r} of {label} has shape {tuple(t.shape)}; expected {n} rows (its embedding's) "
                f"x {tuple(base_tensor.shape[1:])}"
            )
    if block_rows is not None and block_rows < 1:
        raise MergeConfigError(f"block_rows must be positive, got {block_rows}")
    out_dtype = base_tensor.dtype if out_dtype is None else out_dtype
    rest = tuple(base_tensor.shape[1:])
    out = torch.empty((plan.num_rows, *rest), dtype=out_dtype, device=base_tensor.device)
    for group_rows, in_base, models, group_src in plan.row_groups():
        step = group_rows.numel() if block_rows is None else block_rows
        for lo in range(0, group_rows.numel(), step):
            out_rows, src = group_rows[lo : lo + step], group_src[:, lo : lo + step]
            if in_base and models:
                merged = merge_rows(
                    list(models), _gather(base_tensor, src[0]), [_gather(inputs[i + 1], src[i + 1]) for i in models]
                )
            elif in_base:
                merged = _gather(base_tensor, src[0])  # no model has these tokens: the base's rows
            elif models:  # tokens new to the base: the mean of the models that have them
                rows = [_gather(inputs[i + 1], src[i + 1]) for i in models]
                acc = torch.float64 if any(r.dtype == torch.float64 for r in rows) else torch.float32
                merged = rows[0].to(acc, copy=True)
                for r in rows[1:]:
                    merged.add_(r)
                merged.div_(len(rows))
                del rows
            else:  # pragma: no cover - _plan rejects rows no checkpoint has
                raise CheckpointError(f"tensor {name!r}: output rows without any source")
            if tuple(merged.shape) != (out_rows.numel(), *rest):
                raise RuntimeError(
                    f"tensor {name!r}: merge_rows returned shape {tuple(merged.shape)} for {out_rows.numel()} "
                    f"rows of {rest}"
                )
            a = _contiguous_start(out_rows)
            if a is not None:
                out.narrow(0, a, out_rows.numel()).copy_(merged)
            else:
                out.index_copy_(0, out_rows.to(out.device), merged.to(out_dtype))
            del merged
    return out


# ------------------------------------------------------------------------------------------ tokenizer files
def _tokenizer_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in TOKENIZER_PATTERNS)
    )


def _add_special(tok: Any, tokens: list[Any]) -> None:
    """Register `tokens` as extra special tokens, keeping the existing ones (transformers 4 and 5 spellings)."""
    params = inspect.signature(tok.add_special_tokens).parameters
    if "replace_extra_special_tokens" in params:
        tok.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    else:
        tok.add_special_tokens({"additional_special_tokens": tokens}, replace_additional_special_tokens=False)


def _added_token(t: NewToken) -> Any:
    from tokenizers import AddedToken

    a = t.added
    if a is None:
        return AddedToken(t.content, special=t.special, normalized=not t.special)
    return AddedToken(
        t.content, single_word=a.single_word, lstrip=a.lstrip, rstrip=a.rstrip,
        normalized=a.normalized, special=t.special,
    )


def write_tokenizer(plan: VocabPlan, dest: str | Path) -> list[str]:
    """Write the output tokenizer into folder `dest`; return the file names written.

    Tokenizer files already in `dest` (:data:`TOKENIZER_PATTERNS`, e.g. the base's, copied earlier) are removed
    first. ``base`` / ``MODEL``, and ``union`` when it adds nothing: that checkpoint's tokenizer files, copied
    verbatim. ``union``: the base tokenizer with :attr:`VocabPlan.new_tokens` added in order (special ones as
    special) and saved with ``save_pretrained``; CheckpointError unless every token of the reloaded tokenizer has
    its output row as id.
    """
    dest = Path(dest)
    for p in _tokenizer_files(dest):
        p.unlink()
    src_label, src = plan.labels[plan.source_index], plan.folders[plan.source_index]
    if not plan.new_tokens:
        files = _tokenizer_files(src)
        if not files:
            raise CheckpointError(f"{src_label}: no tokenizer files in {src}")
        for p in files:
            shutil.copyfile(p, dest / p.name)
        return [p.name for p in files]

    tok = _load_tokenizer(src, src_label)  # a fresh copy: the plan's Vocabulary stays as loaded
    pending = list(plan.new_tokens)
    while pending:  # consecutive runs of one kind, so ids follow the plan's order
        k = 1
        while k < len(pending) and pending[k].special == pending[0].special:
            k += 1
        run, pending = pending[:k], pending[k:]
        added = [_added_token(t) for t in run]
        if run[0].special:
            _add_special(tok, added)
        else:
            tok.add_tokens(added)
    before = {p.name for p in dest.iterdir()}
    tok.save_pretrained(str(dest))
    written = sorted({p.name for p in dest.iterdir()} - before)
    vocab = load_vocabulary(dest, f"the union tokenizer of {src_label}").tokens
    wrong = [(t, vocab.get(t), i) for t, i in plan.token_ids.items() if vocab.get(t) != i]
    wrong += [(t, i, None) for t, i in vocab.items() if t not in plan.token_ids]
    if wrong:
        t, got, want = wrong[0]
        raise CheckpointError(
            f"union tokenizer (base {src_label}, {src}): after saving, token {t!r} has id {got} but its embedding "
            f"row is {want} ({len(wrong)} token(s) disagree); the saved tokenizer does not match the merged rows"
        )
    return written


# ------------------------------------------------------------------------------------------- tied embeddings
@dataclass(frozen=True)
class TiedEmbeddings:
    """Whether a checkpoint ties its output head to its input embedding, and the two tensor names.

    ``head`` is the checkpoint's stored head name, else the base's (what a tying model serves), else None.
    """

    tied: bool
    embedding: str | None
    head: str | None


def tied_embeddings(
    folder: str | Path, names: Iterable[str], *, label: str, base_names: Iterable[str] | None = None
) -> TiedEmbeddings:
    """Read `folder`'s config (``AutoConfig``, no remote code, class defaults) and find its embedding names.

    `names` are the checkpoint's tensor names, `base_names` the base's (the head name a tying model lacks).
    Raises CheckpointError naming `label` and the folder when the config cannot be loaded.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    try:
        cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:
        raise CheckpointError(f"{label}: cannot load the config in {folder}: {e}") from e
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    embed, head = embedding_names(names)
    if head is None and base_names is not None:
        head = embedding_names(base_names)[1]
    return TiedEmbeddings(tied, embed, head)


class TiedEmbeddingsReader:
    """A reader (CheckpointReader's duck-typed interface) with some names hidden and some served as aliases.

    ``aliases`` maps a served name to the stored tensor it reads (``info`` reports the served name); ``hidden``
    names are not listed. Everything else (``label``, ``folder``, ``files``, ``format``, ``release``, ``close``...)
    is the wrapped reader's.
    """

    def __init__(self, reader: Any, *, hidden: Iterable[str] = (), aliases: Mapping[str, str] | None = None):
        self.reader = reader
        self.hidden = frozenset(hidden)
        self.aliases = dict(aliases or {})
        names = [n for n in reader.names if n not in self.hidden and n not in self.aliases]
        self.names: list[str] = names + [a for a in self.aliases if a not in names]

    def __getattr__(self, attr: str) -> Any:  # label, folder, files, format, allow_pickle...
        if attr == "reader":  # not set yet (copy / unpickle): no recursion
            raise AttributeError(attr)
        return getattr(self.reader, attr)

    def __contains__(self, name: str) -> bool:
        return name in self.aliases or (name not in self.hidden and name in self.reader)

    def __len__(self) -> int:
        return len(self.names)

    def _stored(self, name: str) -> str:
        if name in self.aliases:
            return self.aliases[name]
        if name in self.hidden:
            raise KeyError(name)
        return name

    def info(self, name: str) -> TensorInfo:
        info = self.reader.info(self._stored(name))
        return info if info.name == name else TensorInfo(name, info.dtype, info.shape, info.file)

    def get(self, name: str) -> Tensor:
        return self.reader.get(self._stored(name))

    def release(self, tensor: Tensor) -> None:
        self.reader.release(tensor)

    def keys(self) -> list[str]:
        return list(self.names)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> TiedEmbeddingsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tie_reader(reader: Any, tie: TiedEmbeddings, base_tie: TiedEmbeddings) -> Any:
    """`reader` as the output's tying (the base's) sees it; the reader itself when nothing changes.

    Base ties: the checkpoint's stored head is hidden (for a model that does not tie, with a warning: its
    separate head is dropped). Base does not tie and this checkpoint does: its embedding is served under the
    base's head name (a head it stores anyway is that tie, and is replaced). Otherwise unchanged.
    """
    label = getattr(reader, "label", "?")
    if base_tie.tied:
        if tie.head is None or tie.head not in reader:
            return reader
        if not tie.tied:
            warnings.warn(
                f"model {label} does not tie its embeddings but the base does: the output ties them as the "
                f"base, so {label}'s {tie.head!r} is not merged",
                stacklevel=2,
            )
        return TiedEmbeddingsReader(reader, hidden=[tie.head])
    if not tie.tied:
        return reader
    head = base_tie.head or tie.head
    if head is None or tie.embedding is None:
        raise CheckpointError(f"{label}: ties its embeddings but no embedding / head tensor name was found")
    hidden = [tie.head] if tie.head is not None and tie.head != head and tie.head in reader else []
    return TiedEmbeddingsReader(reader, hidden=hidden, aliases={head: tie.embedding})


def tie_as_base(base: Any, base_folder: str | Path, models: Sequence[Any],
                folders: Sequence[str | Path | None]) -> tuple[Any, list[Any]]:
    """The readers as the output's tying (the base's) sees them: each through :func:`tie_reader`, its tying read
    from the config in its folder. A model whose folder is None (a LoRA adapter, read as base + delta: the
    base's tensors) is left as it is; nothing is wrapped when no checkpoint stores an output head.
    Raises CheckpointError when a config cannot be loaded (see :func:`tied_embeddings`).
    """
    if all(embedding_names(r.names)[1] is None for r in (base, *models)):
        return base, list(models)  # no checkpoint stores an output head: nothing is tied or untied
    base_tie = tied_embeddings(base_folder, base.names, label=str(base.label))
    base_view = tie_reader(base, base_tie, base_tie)
    views = []
    for folder, r in zip(folders, models):
        if folder is None:
            views.append(r)
            continue
        tie = tied_embeddings(folder, r.names, label=str(r.label), base_names=base.names)
        views.append(tie_reader(r, tie, base_tie))
    return base_view, views
