"""Tiny causal-LM checkpoints for tests and benchmarks, built offline and deterministically.

* :func:`make_tokenizer` trains a byte-level BPE (``tokenizers``) on :data:`CORPUS`, a fixed English text in
  this module, to :data:`BPE_VOCAB_SIZE` entries including the special tokens ``<s> </s> <unk> <pad>``
  (ids 0-3), then adds `extra_tokens` (``add_tokens``) and `special_tokens` (``additional_special_tokens``).
  The same call always gives the same tokenizer files.
* :func:`make_causal_lm` saves a tiny ``llama`` / ``qwen2`` / ``gpt2`` model (``save_pretrained``:
  ``config.json``, ``generation_config.json``, ``model.safetensors``) with its tokenizer. Given `base`, it
  is a "fine-tune" of that checkpoint: base's weights + ``scale * N(0, 1)`` seeded noise on every floating
  parameter, with the embedding matrix grown first when the tokenizer has more tokens than the base.

Tied embeddings (checked with transformers 5.x): ``gpt2`` ties ``lm_head.weight`` to
``transformer.wte.weight`` by default; ``llama`` / ``qwen2`` only with ``tie_word_embeddings=True``. For a
tied model ``save_pretrained`` writes ``"tie_word_embeddings": true`` in ``config.json`` and only the
embedding (``transformer.wte.weight`` / ``model.embed_tokens.weight``) in ``model.safetensors``: there is
no ``lm_head.weight`` tensor, and ``from_pretrained`` re-ties it on load. Untied models have both tensors.

Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ARCHS",
    "BPE_VOCAB_SIZE",
    "CORPUS",
    "SPECIAL_TOKENS",
    "make_causal_lm",
    "make_tokenizer",
    "tiny_config",
]

ARCHS = ("llama", "qwen2", "gpt2")
BPE_VOCAB_SIZE = 320
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model learns from a small corpus, one token at a time.
Merging models is the art of combining the weights of several fine-tuned networks into a single network
that keeps what each of them learned. Task arithmetic adds the differences between every fine-tuned model
and the base model; TIES trims the smallest of those differences and keeps only the signs that agree;
DARE drops most of them at random and rescales the rest. Spherical interpolation walks along the arc
between two weight vectors instead of the straight line between them.
Once upon a time there was a little robot who wanted to read every book in the library. Every morning it
opened a new book, and every evening it wrote down the words it had learned. The words became sentences,
the sentences became stories, and the stories became a model of the world.
Question: what is the capital of France? Answer: the capital of France is Paris.
Question: how many legs does a spider have? Answer: a spider has eight legs.
User: please write a short poem about the sea. Assistant: the sea is wide, the sea is deep, it sings the
sailors all to sleep.
Numbers: one two three four five six seven eight nine ten, 0 1 2 3 4 5 6 7 8 9, 10 20 30 40 50 100 1000.
def add(a, b): return a + b  # a function that adds two numbers and returns the sum
"""


def make_tokenizer(
    folder: Path | None = None,
    *,
    extra_tokens: Sequence[str] = (),
    special_tokens: Sequence[str] = (),
    chat_template: str | None = None,
):
    """A deterministic byte-level BPE ``PreTrainedTokenizerFast`` trained on :data:`CORPUS`.

    The trained vocabulary has :data:`BPE_VOCAB_SIZE` entries (256 byte symbols, the four special tokens of
    :data:`SPECIAL_TOKENS` at ids 0-3, then merges); `extra_tokens` are appended with ``add_tokens`` and
    `special_tokens` with ``add_special_tokens({"additional_special_tokens": ...})``, in that order, so
    ``len(tokenizer) == BPE_VOCAB_SIZE + len(extra_tokens) + len(special_tokens)`` (for new strings).
    `chat_template` becomes ``tokenizer.chat_template``. Saved with ``save_pretrained(folder)`` when
    `folder` is given; the same arguments always write identical files.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS.splitlines(), trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens))
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if folder is not None:
        tokenizer.save_pretrained(str(folder))
    return tokenizer


def tiny_config(
    arch: str,
    vocab_size: int,
    *,
    num_layers: int = 4,
    tie_word_embeddings: bool | None = None,
    bos_token_id: int = 0,
    eos_token_id: int = 1,
    pad_token_id: int = 3,
):
    """A tiny transformers config for `arch` (``llama`` / ``qwen2``: hidden 32, 4 heads of 8, 2 KV heads,
    MLP 64; ``gpt2``: n_embd 32, 4 heads), `num_layers` deep, 128 positions. ``tie_word_embeddings=None``
    keeps the architecture's default (tied for gpt2, untied for llama and qwen2)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    tie = {} if tie_word_embeddings is None else {"tie_word_embeddings": tie_word_embeddings}
    if arch in ("llama", "qwen2"):
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        return cls(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **ids,
            **tie,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=num_layers, n_head=4, n_positions=128, **ids, **tie
        )
    raise ValueError(f"unknown arch {arch!r}: expected one of {ARCHS}")


def make_causal_lm(
    folder: Path,
    arch: str = "llama",
    *,
    tokenizer_extra_tokens: Sequence[str] = (),
    special_tokens: Sequence[str] = (),
    chat_template: str | None = None,
    base: Path | None = None,
    scale: float = 0.02,
    seed: int = 0,
    tie_word_embeddings: bool | None = None,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 4,
) -> Path:
    """Save a tiny causal LM with its tokenizer and generation config in `folder`; returns `folder`.

    Without `base`: a freshly initialised :func:`tiny_config` model of `arch` (``llama`` / ``qwen2`` /
    ``gpt2``), `num_layers` deep, vocabulary ``len(tokenizer)``, initialised from `seed` (the global RNG is
    left untouched).

    With `base` (a folder this function wrote): a "fine-tune" of it. The base is loaded in float32 and its
    config decides the architecture, depth and tying (`arch` and `num_layers` are ignored; an explicit
    `tie_word_embeddings` that disagrees is an error); if this tokenizer has more tokens than the base's vocabulary (its
    extra tokens -- pass the base's own extras again first), ``resize_token_embeddings(len(tokenizer))``
    grows the input and output embeddings and the new rows get seeded ``N(0, initializer_range)`` values;
    then every floating parameter gets ``scale * N(0, 1)`` noise from ``torch.Generator().manual_seed(seed)``
    (a tied lm_head is one parameter and gets the noise once).

    The weights are cast to `dtype` and written with ``save_pretrained`` (safetensors, one file). See the
    module docstring for what is written for tied embeddings. Same arguments -> identical files.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = Path(folder)
    tokenizer = make_tokenizer(
        None, extra_tokens=tokenizer_extra_tokens, special_tokens=special_tokens, chat_template=chat_template
    )
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if base is None:
        config = tiny_config(
            arch, len(tokenizer), num_layers=num_layers, tie_word_embeddings=tie_word_embeddings, **ids
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        config = model.config
        if tie_word_embeddings is not None and bool(config.tie_word_embeddings) != tie_word_embeddings:
            raise ValueError(f"base {base} has tie_word_embeddings={config.tie_word_embeddings}")
        generator = torch.Generator().manual_seed(seed)
        old_vocab = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) < old_vocab:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, fewer than base's {old_vocab} rows")
        if len(tokenizer) > old_vocab:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            std = float(getattr(config, "initializer_range", 0.02))
            with torch.no_grad():
                for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                    if emb is None:
                        continue
                    rows = emb.weight[old_vocab:]
                    rows.copy_(torch.randn(rows.shape, generator=generator) * std)
                    if model.config.tie_word_embeddings:
                        break  # one shared matrix
        with torch.no_grad():
            for _, param in model.named_parameters():  # tied parameters are listed once
                if param.is_floating_point():
                    param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)
        for key, value in ids.items():
            setattr(model.config, key, value)
    model = model.to(dtype).eval()
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def make_vocab_checkpoints(root: Path, ft1: dict[str, Any], ft2: dict[str, Any]) -> tuple[Path, Path, Path]:
    """A one-layer llama base and two fine-tunes of it (seeds 1 and 2) that add tokens: `ft1` / `ft2` are the
    :func:`make_causal_lm` keywords of each (``special_tokens``, ``tokenizer_extra_tokens``, ``chat_template``)."""
    base = make_causal_lm(root / "base", "llama", num_layers=1)
    return (base, make_causal_lm(root / "ft1", base=base, seed=1, **ft1),
            make_causal_lm(root / "ft2", base=base, seed=2, **ft2))
