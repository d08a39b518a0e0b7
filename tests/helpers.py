"""Tiny checkpoints for tests: random BERT models saved with ``save_pretrained`` (optionally sharded), and
helpers to write / read raw safetensors checkpoints. Nothing here touches the network."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "bert_config",
    "load_checkpoint",
    "make_bert_checkpoints",
    "perturb_state_dict",
    "save_raw_checkpoint",
    "save_tiny_clip",
]


def bert_config(hidden: int = 32, layers: int = 2, vocab_size: int = 120, **kwargs):
    """A small ``BertConfig``: `hidden` wide (heads of 16 dims), `layers` deep, 4x intermediate."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 16),
        intermediate_size=4 * hidden,
        max_position_embeddings=kwargs.pop("max_position_embeddings", 64),
        **kwargs,
    )


def perturb_state_dict(sd: Mapping[str, torch.Tensor], scale: float, generator: torch.Generator) -> dict:
    """Copy of `sd` with ``scale * N(0, 1)`` noise added to every floating tensor (computed in float32)."""
    out = {}
    for name, t in sd.items():
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32) * scale
            out[name] = (t.float() + noise).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def make_bert_checkpoints(
    tmp_path: str | Path,
    n_models: int,
    hidden: int = 32,
    layers: int = 2,
    max_shard_size: str | int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    noise: float = 0.02,
    vocab_size: int = 120,
    tokenizer_files: bool = True,
) -> tuple[Path, list[Path]]:
    """A random ``BertModel`` base and `n_models` "fine-tuned" copies (base + `noise` * N(0, 1) per weight).

    Each is saved with ``save_pretrained`` (``max_shard_size`` shards it) in `dtype` under
    ``tmp_path/base`` and ``tmp_path/model_<i>``; with `tokenizer_files`, the base also gets a
    ``vocab.txt`` and ``tokenizer_config.json`` (a merge copies them). Returns ``(base_dir, [model_dirs])``.
    """
    from transformers import BertModel

    tmp_path = Path(tmp_path)
    torch.manual_seed(seed)
    model = BertModel(bert_config(hidden, layers, vocab_size=vocab_size)).to(dtype).eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir, **kwargs)
    if tokenizer_files:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        words = specials + [f"w{i}" for i in range(vocab_size - len(specials))]
        (base_dir / "vocab.txt").write_text("\n".join(words) + "\n")
        (base_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}) + "\n")
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    model_dirs = []
    for i in range(n_models):
        sd = perturb_state_dict(base_sd, noise, gen)
        model.load_state_dict(sd)
        d = tmp_path / f"model_{i}"
        model.save_pretrained(d, **kwargs)
        model_dirs.append(d)
    return base_dir, model_dirs


def save_raw_checkpoint(
    folder: str | Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping | None = None,
    shards: int = 1,
) -> Path:
    """Write `tensors` as ``model.safetensors`` (or `shards` files plus a transformers index) into `folder`,
    with ``config.json`` (a minimal one when `config` is None). For checkpoints save_pretrained cannot make
    (integer tensors, NaN, odd shapes...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(config or {"model_type": "raw"})) + "\n")
    names = list(tensors)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        return folder
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in group}, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return folder


def load_checkpoint(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder (single file or sharded), fully loaded."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out = {}
    for f in files:
        with safe_open(folder / f, framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k).clone()
    return out


#: BPE merges of the tiny CLIP tokenizer (a few multi-character tokens, so prompts are not all single bytes).
TINY_CLIP_MERGES = ("o f</w>", "p h", "ph o", "a r", "t h", "th e</w>")


def save_tiny_clip(
    folder: str | Path,
    *,
    image_size: int = 8,
    patch_size: int = 4,
    hidden_size: int = 16,
    projection_dim: int = 8,
    max_length: int = 64,
    merges: Sequence[str] = TINY_CLIP_MERGES,
    processor: bool = False,
    seed: int = 0,
) -> Path:
    """Save a tiny random ``CLIPModel`` (one layer per tower, weights from ``torch.manual_seed(seed)``) with a
    ``CLIPTokenizer`` made from a byte-level ``vocab.json`` / ``merges.txt`` into `folder` (created); with
    `processor` also a ``CLIPImageProcessor`` of `image_size` (saved as a ``CLIPProcessor``). The vocabulary is
    CLIP's layout: the byte alphabet, the same with ``</w>``, the merges' results, then ``<|startoftext|>`` and
    ``<|endoftext|>`` last (the end token, also the padding token, has the largest id). Returns `folder`."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += [m.replace(" ", "") for m in merges if m.replace(" ", "") not in tokens]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)
    eos = vocab["<|endoftext|>"]
    tower = {"hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "num_hidden_layers": 1,
             "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(vocab), "max_position_embeddings": max_length,
                     "bos_token_id": eos - 1, "eos_token_id": eos, "pad_token_id": eos},
        vision_config={**tower, "image_size": image_size, "patch_size": patch_size, "num_channels": 3},
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if processor:
        images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size})
        CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder
