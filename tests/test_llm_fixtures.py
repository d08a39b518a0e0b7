"""The tiny causal-LM fixtures of tests/llm_fixtures.py load, generate, grow vocabularies and are reproducible."""

from __future__ import annotations

import hashlib

import pytest
import torch
from llm_fixtures import ARCHS, BPE_VOCAB_SIZE, make_causal_lm, make_tokenizer
from safetensors import safe_open


def _keys(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_loads_and_generates(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_causal_lm(tmp_path / arch, arch, num_layers=2)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == BPE_VOCAB_SIZE == model.config.vocab_size
    ids = tokenizer("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)
    tensors = _keys(folder)
    # gpt2 ties lm_head to wte by default: save_pretrained writes no lm_head.weight for tied models
    assert ("lm_head.weight" in tensors) == (arch != "gpt2")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (arch == "gpt2")


def test_added_token_finetune_and_tied_llama(tmp_path):
    base = make_causal_lm(tmp_path / "base", "llama", tie_word_embeddings=True, num_layers=2)
    ft = make_causal_lm(tmp_path / "ft", base=base, tokenizer_extra_tokens=["<x1>", "<x2>"], seed=1)
    b, f = _keys(base), _keys(ft)
    assert "lm_head.weight" not in b and "lm_head.weight" not in f
    assert f["model.embed_tokens.weight"].shape[0] == b["model.embed_tokens.weight"].shape[0] + 2
    assert f.keys() == b.keys()
    delta = f["model.layers.0.mlp.up_proj.weight"] - b["model.layers.0.mlp.up_proj.weight"]
    assert 0.01 < float(delta.std()) < 0.03  # scale 0.02 noise
    old = b["model.embed_tokens.weight"].shape[0]
    assert f["model.embed_tokens.weight"][old:].abs().sum() > 0


def test_same_seed_identical_files(tmp_path):
    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    a = make_causal_lm(tmp_path / "a", "qwen2", num_layers=1, seed=5, chat_template="{{ messages }}")
    b = make_causal_lm(tmp_path / "b", "qwen2", num_layers=1, seed=5, chat_template="{{ messages }}")
    c = make_causal_lm(tmp_path / "c", "qwen2", num_layers=1, seed=6, chat_template="{{ messages }}")
    assert digest(a) == digest(b)
    assert digest(a)["model.safetensors"] != digest(c)["model.safetensors"]
    assert "chat_template.jinja" in digest(a)
    t1 = make_tokenizer(tmp_path / "t1", extra_tokens=["<x>"], special_tokens=["<|end|>"])
    make_tokenizer(tmp_path / "t2", extra_tokens=["<x>"], special_tokens=["<|end|>"])
    assert len(t1) == BPE_VOCAB_SIZE + 2
    assert digest(tmp_path / "t1") == digest(tmp_path / "t2")
