"""Vocabulary alignment (hf_atm.merging.vocab): union / base / MODEL plans, row merging, tokenizers, tied embeddings."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from llm_fixtures import BPE_VOCAB_SIZE, make_causal_lm, make_tokenizer, make_vocab_checkpoints
from safetensors.torch import load_file, save_file

from hf_atm.errors import CheckpointError, MergeConfigError
from hf_atm.merging.io import CheckpointReader
from hf_atm.merging.vocab import (
    TiedEmbeddingsReader,
    embedding_names,
    embedding_rows,
    load_vocabulary,
    merge_vocab_tensor,
    output_vocab_size,
    plan_vocabulary,
    tie_reader,
    tied_embeddings,
    vocab_tensor_names,
    write_tokenizer,
)

V = BPE_VOCAB_SIZE
TOOL, IM = "<tool>", "<|im_start|>"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """An untied llama base and two fine-tunes: ft1 adds <tool>, ft2 adds the special <|im_start|> + a template."""
    return make_vocab_checkpoints(tmp_path_factory.mktemp("vocab"), dict(tokenizer_extra_tokens=[TOOL]),
                                  dict(special_tokens=[IM], chat_template=TEMPLATE))


def _union(ckpts, **kw):
    base, ft1, ft2 = ckpts
    return plan_vocabulary(base, [ft1, ft2], ["ft1", "ft2"], "union", **kw)


def _mean_rows(calls):
    def merge_rows(model_indices, base_rows, model_rows):
        calls.append((list(model_indices), base_rows.shape[0]))
        return torch.stack([r.float() for r in model_rows]).mean(0)

    return merge_rows


def test_union_plan_tokens_and_row_maps(ckpts):
    plan = _union(ckpts)
    assert plan is not None and plan.needs_alignment
    assert plan.labels == ("base", "ft1", "ft2") and plan.rows == (V, V + 1, V + 1)
    base_vocab = load_vocabulary(ckpts[0], "base").tokens
    assert {t: i for t, i in plan.token_ids.items() if t in base_vocab} == base_vocab
    assert plan.token_ids[TOOL] == V and plan.token_ids[IM] == V + 1
    assert plan.num_rows == output_vocab_size(plan) == V + 2
    assert [(t.content, t.id, t.source, t.special) for t in plan.new_tokens] == [
        (TOOL, V, "ft1", False),
        (IM, V + 1, "ft2", True),
    ]
    base_map, m1, m2 = plan.row_maps
    assert base_map[:V] == m1[:V] == m2[:V] == tuple(range(V))
    assert base_map[V:] == (None, None)
    assert m1[V:] == (V, None) and m2[V:] == (None, V)  # each fine-tune stores its new token at row V
    assert plan.summary()["missing_rows"] == {"base": 2, "ft1": 1, "ft2": 1}


def test_merge_vocab_tensor_union_mean(ckpts):
    plan = _union(ckpts)
    sds = [load_file(str(c / "model.safetensors")) for c in ckpts]
    for name in (EMBED, HEAD):
        b, t1, t2 = (sd[name] for sd in sds)
        calls: list = []
        out = merge_vocab_tensor(plan, name, b, [t1, t2], _mean_rows(calls))
        assert out.shape == (V + 2, b.shape[1]) and out.dtype == b.dtype
        assert calls == [([0, 1], V)]  # one group with the base: the shared tokens, both models voting
        torch.testing.assert_close(out[:V], (t1[:V] + t2[:V]) / 2)
        assert torch.equal(out[V], t1[V]) and torch.equal(out[V + 1], t2[V])  # new tokens: their model's row
    out16 = merge_vocab_tensor(plan, EMBED, sds[0][EMBED], [sds[1][EMBED], sds[2][EMBED]], _mean_rows([]),
                               out_dtype=torch.bfloat16)
    assert out16.dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="ft1.*expected 321 rows"):
        merge_vocab_tensor(plan, EMBED, sds[0][EMBED], [sds[1][EMBED][:-1], sds[2][EMBED]], _mean_rows([]))


def test_write_tokenizer_union_encodes_new_tokens_to_their_rows(ckpts, tmp_path):
    from transformers import AutoTokenizer

    plan = _union(ckpts)
    shutil.copy(ckpts[0] / "tokenizer.json", tmp_path / "tokenizer.json")  # as if the engine copied the base's
    written = write_tokenizer(plan, tmp_path)
    assert "tokenizer.json" in written and "tokenizer_config.json" in written
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == plan.num_rows
    assert tok.get_vocab() == dict(plan.token_ids)
    assert tok.encode(TOOL, add_special_tokens=False) == [V]
    assert tok.encode(f"hi{IM}", add_special_tokens=False)[-1] == V + 1
    assert IM in tok.all_special_tokens and TOOL not in tok.all_special_tokens
    assert tok.decode([V, V + 1], skip_special_tokens=True) == TOOL
    assert tok.chat_template is None  # union keeps the base's (absent) template


def test_model_source_copies_its_tokenizer_and_template(ckpts, tmp_path):
    from transformers import AutoTokenizer

    base, ft1, ft2 = ckpts
    plan = plan_vocabulary(base, [ft1, ft2], ["ft1", "ft2"], "ft2")
    assert plan.source_index == 2 and plan.num_rows == V + 1 and TOOL not in plan.token_ids
    assert plan.row_maps[1][V] is None and plan.row_maps[2][V] == V
    sds = [load_file(str(c / "model.safetensors")) for c in ckpts]
    out = merge_vocab_tensor(plan, EMBED, sds[0][EMBED], [sds[1][EMBED], sds[2][EMBED]], _mean_rows([]))
    assert torch.equal(out[V], sds[2][EMBED][V])  # ft1's <tool> row is dropped, not merged into <|im_start|>
    (tmp_path / "chat_template.jinja").write_text("stale")
    written = write_tokenizer(plan, tmp_path)
    assert sorted(written) == sorted(p.name for p in ft2.iterdir() if p.name.startswith(("tokenizer", "chat")))
    for name in written:
        assert (tmp_path / name).read_bytes() == (ft2 / name).read_bytes()
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == TEMPLATE


def test_reordered_ids_gathered_by_token(ckpts, tmp_path):
    """ft3 (a tokenizer only: plans read tokenizers) has <x> at V and <tool> at V + 1, the reverse of the union."""
    base, ft1, _ = ckpts
    ft3 = tmp_path / "ft3"
    make_tokenizer(ft3, extra_tokens=["<x>", TOOL])
    plan = plan_vocabulary(base, [ft1, ft3], ["ft1", "ft3"], "union")
    assert plan.token_ids[TOOL] == V and plan.token_ids["<x>"] == V + 1
    assert plan.row_maps[2][V:] == (V + 1, V)
    b, t1, t3 = torch.randn(V, 4), torch.randn(V + 1, 4), torch.randn(V + 2, 4)
    whole = merge_vocab_tensor(plan, EMBED, b, [t1, t3], _mean_rows([]))
    torch.testing.assert_close(whole[V], (t1[V] + t3[V + 1]) / 2)  # <tool>: mean of the two models having it
    assert torch.equal(whole[V + 1], t3[V])
    calls: list = []
    blocks = merge_vocab_tensor(plan, EMBED, b, [t1, t3], _mean_rows(calls), block_rows=100)
    assert torch.equal(blocks, whole) and [n for _, n in calls] == [100, 100, 100, 20]
    src = plan_vocabulary(base, [ft1, ft3], ["ft1", "ft3"], "ft3")  # ft3's ids: <x> V, <tool> V + 1
    out = merge_vocab_tensor(src, EMBED, b, [t1, t3], _mean_rows([]))
    assert torch.equal(out[V], t3[V])
    torch.testing.assert_close(out[V + 1], (t1[V] + t3[V + 1]) / 2)


def test_base_source_and_no_alignment_needed(ckpts, tmp_path):
    base, ft1, ft2 = ckpts
    assert plan_vocabulary(base, [base], ["same"], "base") is None
    assert plan_vocabulary(base, [base], ["same"], "union") is None
    same = plan_vocabulary(base, [base], ["same"], "same")  # MODEL: a plan (its files), no row work
    assert same is not None and not same.needs_alignment
    plan = plan_vocabulary(base, [ft1, ft2], ["ft1", "ft2"], "base")
    assert plan.num_rows == V and plan.token_ids == load_vocabulary(base, "b").tokens and plan.needs_alignment
    assert write_tokenizer(plan, tmp_path) == ["tokenizer.json", "tokenizer_config.json"]


def test_padding_rows_rule(ckpts):
    # base: 320 tokens in 324 rows; ft1: 321 tokens in 321 rows; ft2: 321 tokens in 324 rows.
    plan = _union(ckpts, rows=[V + 4, V + 1, V + 4])
    assert plan.num_rows == V + 4  # the base's padding rows survive; the new tokens take rows V, V+1
    base_map, m1, m2 = plan.row_maps
    assert base_map[V:] == (None, None, V + 2, V + 3)
    assert m1[V:] == (V, None, None, None)  # ft1 has no rows beyond V
    assert m2[V:] == (None, V, V + 2, V + 3)  # ft2's rows V+2, V+3 are padding: it votes on them
    b, t1, t2 = torch.randn(V + 4, 3), torch.randn(V + 1, 3), torch.randn(V + 4, 3)
    calls: list = []
    out = merge_vocab_tensor(plan, EMBED, b, [t1, t2], _mean_rows(calls))
    assert sorted(calls) == [([0, 1], V), ([1], 2)]
    torch.testing.assert_close(out[V + 2 :], t2[V + 2 :])
    # a token beyond a checkpoint's rows is no row of it: a base whose tokenizer outgrows its matrix fails clearly
    with pytest.raises(CheckpointError, match="has no embedding row in any checkpoint"):
        plan_vocabulary(ckpts[0], [ckpts[0]], ["m"], "m", rows=[V - 1, V - 1])


def test_unknown_source_and_unloadable_tokenizer(ckpts, tmp_path):
    base, ft1, ft2 = ckpts
    with pytest.raises(MergeConfigError, match=r"'nope'.*'ft1', 'ft2'"):
        plan_vocabulary(base, [ft1, ft2], ["ft1", "ft2"], "nope")
    broken = tmp_path / "broken"
    shutil.copytree(ft1, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"bad: cannot load the tokenizer in {broken}"):
        plan_vocabulary(base, [broken], ["bad"], "union")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="nothing: cannot load the tokenizer"):
        load_vocabulary(empty, "nothing")


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    return {
        "gpt2": make_causal_lm(root / "gpt2", "gpt2", num_layers=1),
        "llama": make_causal_lm(root / "llama", "llama", num_layers=1),
        "llama_tied": make_causal_lm(root / "llama_tied", "llama", num_layers=1, tie_word_embeddings=True),
    }


def _names(folder):
    with CheckpointReader(folder) as r:
        return list(r.names)


def test_tie_detection(tied):
    g = tied_embeddings(tied["gpt2"], _names(tied["gpt2"]), label="gpt2")
    assert g.tied and g.embedding == "transformer.wte.weight" and g.head is None
    u = tied_embeddings(tied["llama"], _names(tied["llama"]), label="llama")
    assert not u.tied and (u.embedding, u.head) == (EMBED, HEAD)
    t = tied_embeddings(tied["llama_tied"], _names(tied["llama_tied"]), label="t", base_names=_names(tied["llama"]))
    assert t.tied and (t.embedding, t.head) == (EMBED, HEAD)  # head name from the base
    with pytest.raises(CheckpointError, match="x: cannot load the config"):
        tied_embeddings(tied["llama"] / "nowhere", [], label="x")
    assert embedding_names(["a.attention.output.weight", "output.weight", "tok_embeddings.weight"]) == (
        "tok_embeddings.weight",
        "output.weight",
    )


def test_reader_wrapper_hides_stored_head_and_serves_embedding(tied, tmp_path):
    # A checkpoint that ties but stores lm_head.weight anyway.
    stored = tmp_path / "stored"
    shutil.copytree(tied["llama_tied"], stored)
    sd = load_file(str(stored / "model.safetensors"))
    save_file({**sd, HEAD: sd[EMBED] + 1}, str(stored / "model.safetensors"), metadata={"format": "pt"})
    base_names = _names(tied["llama"])
    untied_base = tied_embeddings(tied["llama"], base_names, label="base")
    tied_base = tied_embeddings(tied["llama_tied"], _names(tied["llama_tied"]), label="tbase")
    with CheckpointReader(stored, label="stored") as r:
        tie = tied_embeddings(stored, r.names, label="stored", base_names=base_names)
        hidden = tie_reader(r, tie, tied_base)  # the base ties: the stored head is that tie, not a tensor
        assert isinstance(hidden, TiedEmbeddingsReader)
        assert HEAD not in hidden and HEAD not in hidden.names and len(hidden) == len(r) - 1
        assert hidden.label == "stored" and hidden.folder == stored and hidden.files == r.files
        served = tie_reader(r, tie, untied_base)  # the base does not tie: the embedding is the head
        assert HEAD in served and len(served) == len(r)
        assert torch.equal(served.get(HEAD), r.get(EMBED))
        info = served.info(HEAD)
        assert info.name == HEAD and info.shape == r.info(EMBED).shape and info.file == r.info(EMBED).file
    with CheckpointReader(tied["llama_tied"], label="t") as r:
        tie = tied_embeddings(tied["llama_tied"], r.names, label="t", base_names=base_names)
        served = tie_reader(r, tie, untied_base)
        assert HEAD in served and HEAD not in r and set(served.names) == {*r.names, HEAD}
        assert vocab_tensor_names([served]) == [EMBED, HEAD]
        assert tie_reader(r, tie, tied_base) is r  # both tie, nothing stored: unchanged
    with CheckpointReader(tied["llama"], label="u") as r:
        assert tie_reader(r, untied_base, untied_base) is r
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            dropped = tie_reader(r, untied_base, tied_base)  # an untied model under a tying base
        assert HEAD not in dropped and any("not merged" in str(x.message) for x in w)


def test_vocab_tensor_names_and_rows(ckpts):
    with CheckpointReader(ckpts[0]) as b, CheckpointReader(ckpts[1]) as m:
        assert embedding_rows(b) == V and embedding_rows(m) == V + 1
        names = vocab_tensor_names([b, m])
        assert set(names) == {EMBED, HEAD} and names == [n for n in b.names if n in names]  # the base's order


def test_end_to_end_union_merge_loads_in_transformers(ckpts, tmp_path):
    """What the engine will do: merge every tensor (vocab ones aligned), set vocab_size, write the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, ft1, ft2 = ckpts
    with CheckpointReader(base) as b, CheckpointReader(ft1) as r1, CheckpointReader(ft2) as r2:
        readers = [b, r1, r2]
        plan = plan_vocabulary(base, [ft1, ft2], ["ft1", "ft2"], "union", rows=[embedding_rows(r) for r in readers])
        vocab = set(vocab_tensor_names(readers))
        out = {}
        for name in b.names:
            ts = [r.get(name) for r in readers]
            if name in vocab:
                out[name] = merge_vocab_tensor(plan, name, ts[0], ts[1:], _mean_rows([]))
            else:
                out[name] = (ts[1] + ts[2]) / 2
    save_file(out, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["vocab_size"] = output_vocab_size(plan)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(plan, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok(f"the fox {TOOL}{IM}", return_tensors="pt").input_ids
    assert ids[0, -2:].tolist() == [V, V + 1]
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], V + 2)
