"""LoRA adapters as task vectors, checked against peft itself: deltas equal ``merge_and_unload()`` minus the
base, an adapter read as a model equals its merged model, merges of adapters equal merges of the merged models,
and a merge exported as one LoRA loads in peft and reproduces the full merge (exactly when the rank suffices,
within the truncation bound otherwise). Tiny random BERTs; LoRA B initialised non-zero."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification, BertModel

from hf_atm.errors import CheckpointError, MergeConfigError, OutputExistsError
from hf_atm.lora.delta import adapter_base_reference, adapter_deltas, load_adapter
from hf_atm.lora.export import lora_factors, merge_adapters_to_lora
from hf_atm.lora.source import LoraAsModelSource, open_model_source
from hf_atm.merging.engine import merge_state_dicts_in_memory
from hf_atm.merging.io import CheckpointReader
from hf_atm.merging.spec import MergeSpec
from tests.helpers import bert_config

HIDDEN, LAYERS, LABELS = 32, 2, 3


def _sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _make_adapter(base_dir: Path, out: Path, seed: int, model_cls=BertModel, **lora) -> Path:
    """Train-free adapter: peft LoRA with random non-zero B (init_lora_weights=False), saved to `out`."""
    torch.manual_seed(seed)
    model = model_cls.from_pretrained(base_dir).eval()
    lora.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    with torch.no_grad():  # trained-looking full tensors: perturb what peft saves whole
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def _merged_sd(base_dir: Path, adapter_dir: Path, model_cls=BertModel) -> dict[str, torch.Tensor]:
    """What peft's merge_and_unload() gives for the adapter on the base."""
    model = model_cls.from_pretrained(base_dir).eval()
    return _sd(PeftModel.from_pretrained(model, adapter_dir).merge_and_unload())


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A BertModel base and three adapters: plain query/value r=4; rank/alpha patterns with word-embedding
    LoRA; rsLoRA on key/dense with fan_in_fan_out set in the config (which peft ignores for nn.Linear)."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base_dir = root / "base"
    BertModel(bert_config(HIDDEN, LAYERS)).eval().save_pretrained(base_dir)
    adapters = [
        _make_adapter(base_dir, root / "a0", 1, r=4, lora_alpha=8, target_modules=["query", "value"]),
        _make_adapter(base_dir, root / "a1", 2, r=2, lora_alpha=4, target_modules=["query", "word_embeddings"],
                      rank_pattern={"layer.1.attention.self.query": 3}, alpha_pattern={"word_embeddings": 7}),
        _make_adapter(base_dir, root / "a2", 3, r=3, lora_alpha=5, use_rslora=True,
                      target_modules=["key", "attention.output.dense"]),
    ]
    return {"root": root, "base": base_dir, "adapters": adapters,
            "base_sd": load_file(base_dir / "model.safetensors"),
            "merged": [_merged_sd(base_dir, a) for a in adapters]}


@pytest.fixture(scope="module")
def seqcls(tmp_path_factory):
    """A BertForSequenceClassification base ('bert.' names + classifier) and two SEQ_CLS adapters whose
    classifier (modules_to_save) and LoRA-layer biases (bias='lora_only') are stored whole."""
    root = tmp_path_factory.mktemp("seqcls")
    torch.manual_seed(10)
    base_dir = root / "base"
    BertForSequenceClassification(bert_config(HIDDEN, LAYERS, num_labels=LABELS)).eval().save_pretrained(base_dir)
    kw = {"model_cls": BertForSequenceClassification, "task_type": TaskType.SEQ_CLS}
    adapters = [
        _make_adapter(base_dir, root / "c0", 11, r=2, lora_alpha=2, target_modules=["query", "value"], **kw),
        _make_adapter(base_dir, root / "c1", 12, r=3, lora_alpha=6, target_modules=["value"], bias="lora_only",
                      **kw),
    ]
    merged = [_merged_sd(base_dir, a, BertForSequenceClassification) for a in adapters]
    return {"root": root, "base": base_dir, "adapters": adapters, "base_sd": load_file(base_dir / "model.safetensors"),
            "merged": merged}


# ------------------------------------------------------------------------------------------------ deltas
def test_adapter_delta_is_merge_and_unload_minus_base(bert):
    base_sd = bert["base_sd"]
    for adapter, merged in zip(bert["adapters"], bert["merged"]):
        deltas = dict(adapter_deltas(adapter, bert["base"]))
        changed = {n for n in base_sd if not torch.equal(merged[n], base_sd[n])}
        assert set(deltas) == changed and changed
        for name, delta in deltas.items():
            assert torch.equal(base_sd[name] + delta, merged[name]), name  # bit-exact, like peft's in-place add
    # rank_pattern / alpha_pattern / rsLoRA were honoured (peft computed the same numbers).
    mods = load_adapter(bert["adapters"][1]).modules
    assert mods["encoder.layer.1.attention.self.query"].rank == 3
    assert mods["embeddings.word_embeddings"].kind == "embedding"
    assert mods["embeddings.word_embeddings"].scaling == 7 / 2
    assert load_adapter(bert["adapters"][2]).modules["encoder.layer.0.attention.self.key"].scaling == 5 / 3**0.5


def test_adapter_base_defaults_to_the_config(bert):
    adapter = bert["adapters"][0]
    assert adapter_base_reference(adapter) == str(bert["base"])
    assert {n for n, _ in adapter_deltas(adapter)} == {n for n, _ in adapter_deltas(adapter, bert["base"])}


def test_task_model_adapter_on_bare_model_base_and_back(bert, seqcls, tmp_path):
    # Adapter trained on BertForSequenceClassification ("bert.encoder..."), LoRA only, applied to the bare
    # BertModel checkpoint ("encoder..."): module names are matched against the base's tensor names.
    adapter = _make_adapter(seqcls["base"], tmp_path / "t", 5, model_cls=BertForSequenceClassification,
                            r=2, lora_alpha=4, target_modules=["query"])
    deltas = dict(adapter_deltas(adapter, bert["base"]))
    assert sorted(deltas) == [f"encoder.layer.{i}.attention.self.query.weight" for i in range(LAYERS)]
    ours = dict(adapter_deltas(adapter, seqcls["base"]))
    assert sorted(ours) == [f"bert.{n}" for n in sorted(deltas)]
    for name, d in deltas.items():
        assert torch.equal(d, ours[f"bert.{name}"])
    # ... and a bare-model adapter applied to a task-model checkpoint.
    assert {f"bert.{n}" for n, _ in adapter_deltas(bert["adapters"][0], bert["base"])} == {
        n for n, _ in adapter_deltas(bert["adapters"][0], seqcls["base"])
    }


def test_unmatched_module_is_named(bert, tmp_path):
    small = tmp_path / "small"
    torch.manual_seed(0)
    BertModel(bert_config(HIDDEN, 1)).save_pretrained(small)  # one layer: layer.1 does not exist
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.attention\.self\.query\.weight.*matches no tensor"):
        list(adapter_deltas(bert["adapters"][0], small))
    wide = tmp_path / "wide"
    BertModel(bert_config(48, LAYERS)).save_pretrained(wide)
    with pytest.raises(CheckpointError, match="does not fit the base weight"):
        LoraAsModelSource(wide, bert["adapters"][0])


def _edited(src: Path, dst: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def test_unsupported_adapters_are_refused_with_the_reason(bert, tmp_path):
    a0 = bert["adapters"][0]
    cases = {
        "DoRA": _edited(a0, tmp_path / "dora", {"use_dora": True}),
        "IA3": _edited(a0, tmp_path / "ia3", {"peft_type": "IA3"}),
        "path_initial_model_for_weight_conversion": _edited(a0, tmp_path / "pissa", {"init_lora_weights": "pissa"}),
        "raw parameters": _edited(a0, tmp_path / "param", {"target_parameters": ["experts.w"]}),
        "has rank 4 .* but r=8 in its config": _edited(a0, tmp_path / "rank", {"r": 8}),
    }
    sd = load_file(a0 / "adapter_model.safetensors")
    mod = "base_model.model.encoder.layer.0.attention.self.query"
    conv = {**sd, f"{mod}.lora_A.weight": sd[f"{mod}.lora_A.weight"][:, :, None, None].contiguous()}
    cases["'encoder.layer.0.attention.self.query' is a convolution"] = _edited(a0, tmp_path / "conv", tensors=conv)
    dora = {**sd, f"{mod}.lora_magnitude_vector": torch.ones(HIDDEN)}
    cases["'encoder.layer.0.attention.self.query' is a DoRA module"] = _edited(a0, tmp_path / "dora2", tensors=dora)
    for reason, folder in cases.items():
        with pytest.raises(CheckpointError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            list(adapter_deltas(folder, bert["base"]))


def test_gpt2_conv1d_adapter_transposes_like_peft(tmp_path):
    """GPT-2's Conv1D weights are (in, out): peft merges B @ A transposed (fan_in_fan_out). c_attn is not square
    (the shape decides), attn.c_proj is (the config's fan_in_fan_out decides); the LoRA output round-trips."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    base_dir = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=60, n_positions=16)).save_pretrained(base_dir)
    adapter = _make_adapter(base_dir, tmp_path / "g", 4, model_cls=GPT2Model, r=2, lora_alpha=4,
                            target_modules=["c_attn", "attn.c_proj"], fan_in_fan_out=True)
    base_sd = load_file(base_dir / "model.safetensors")
    merged = _merged_sd(base_dir, adapter, GPT2Model)
    deltas = dict(adapter_deltas(adapter, base_dir))
    assert sorted(deltas) == ["h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight"]
    for name, delta in deltas.items():
        assert torch.equal(base_sd[name] + delta, merged[name]), name
    out = merge_adapters_to_lora(base_dir, [adapter], MergeSpec(), tmp_path / "out", 2, progress=False)
    again = _sd(_load_merged_adapter(base_dir, out, GPT2Model).merge_and_unload())
    for name in deltas:
        torch.testing.assert_close(again[name], merged[name], rtol=0, atol=1e-5)


def test_half_precision_adapter_matches_peft(tmp_path):
    """bfloat16 base and adapter: peft multiplies the factors in float32 on CPU, casts the delta back to
    bfloat16 and adds it in place; the source reproduces those bits."""
    torch.manual_seed(0)
    base_dir = tmp_path / "bf16"
    BertModel(bert_config(HIDDEN, 1)).to(torch.bfloat16).save_pretrained(base_dir)
    torch.manual_seed(1)
    model = BertModel.from_pretrained(base_dir, dtype=torch.bfloat16).eval()
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query"], init_lora_weights=False)
                   ).save_pretrained(tmp_path / "ad")
    merged = _sd(PeftModel.from_pretrained(BertModel.from_pretrained(base_dir, dtype=torch.bfloat16).eval(),
                                           tmp_path / "ad").merge_and_unload())
    with LoraAsModelSource(base_dir, tmp_path / "ad") as src:
        assert src.changed and all(src.get(n).dtype == torch.bfloat16 for n in src.changed)
        for name in src.names:
            assert torch.equal(src.get(name), merged[name]), name


def test_pickled_adapter_needs_allow_pickle(bert, tmp_path):
    folder = _edited(bert["adapters"][0], tmp_path / "pickled")
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_adapter(folder)
    ours = dict(adapter_deltas(folder, bert["base"], allow_pickle=True))
    reference = dict(adapter_deltas(bert["adapters"][0], bert["base"]))
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


# ------------------------------------------------------------------------------------- adapters as models
def test_source_reads_like_the_merged_model(seqcls):
    """modules_to_save (classifier), trained biases and LoRA deltas, bit-exact against merge_and_unload."""
    with CheckpointReader(seqcls["base"]) as base:
        for adapter, merged in zip(seqcls["adapters"], seqcls["merged"]):
            with open_model_source(adapter, base) as src:
                assert isinstance(src, LoraAsModelSource) and src.names == base.names
                assert "classifier.weight" in src.changed
                for name in src.names:
                    t = src.get(name)
                    assert t.dtype == base.info(name).dtype and t.shape == base.info(name).shape
                    assert torch.equal(t, merged[name]), name
        assert "bert.encoder.layer.0.attention.self.value.bias" in LoraAsModelSource(
            base, seqcls["adapters"][1]).changed
        assert isinstance(open_model_source(seqcls["base"], base), CheckpointReader)


@pytest.mark.parametrize("method, options", [("task_arithmetic", {"scale": 0.7}), ("ties", {"density": 0.3}),
                                             ("dare_ties", {"density": 0.5, "seed": 3}),
                                             ("average", {})])
def test_merging_adapters_equals_merging_their_merged_models(bert, method, options):
    spec = MergeSpec(method=method, **options)
    base_sd = bert["base_sd"]
    with CheckpointReader(bert["base"]) as base:
        sources = [LoraAsModelSource(base, a) for a in bert["adapters"]]
        as_models = [{n: s.get(n) for n in s.names} for s in sources]
    ours = merge_state_dicts_in_memory(spec, base_sd, as_models)
    reference = merge_state_dicts_in_memory(spec, base_sd, [{n: m[n] for n in base_sd} for m in bert["merged"]])
    for name in base_sd:
        assert torch.equal(ours[name], reference[name]), name


# -------------------------------------------------------------------------------------------- LoRA output
def _load_merged_adapter(base_dir: Path, out: Path, model_cls=BertModel):
    model = model_cls.from_pretrained(base_dir).eval()
    return PeftModel.from_pretrained(model, out).eval()


def _inputs(vocab: int = 120) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_lora_output_is_exact_when_the_rank_suffices(bert, tmp_path):
    spec = MergeSpec(method="task_arithmetic", weights=(1.0, 0.5, -0.3), scale=0.8)
    rank = 4 + 3 + 3  # >= the sum of the adapters' ranks on any module
    out = merge_adapters_to_lora(str(bert["base"]), [str(a) for a in bert["adapters"]], spec, tmp_path / "out", rank,
                                 progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (rank, rank, False)
    assert cfg["base_model_name_or_path"] == str(bert["base"])
    assert "embeddings.word_embeddings" in cfg["target_modules"]
    assert (out / "README.md").read_text().count("library_name: peft") == 1

    full = merge_state_dicts_in_memory(spec, bert["base_sd"], [{n: m[n] for n in bert["base_sd"]}
                                                               for m in bert["merged"]])
    peft_model = _load_merged_adapter(bert["base"], out)
    with torch.no_grad():
        got = peft_model(**_inputs()).last_hidden_state
        merged = _sd(peft_model.merge_and_unload())
        reference_model = BertModel.from_pretrained(bert["base"]).eval()
        reference_model.load_state_dict(full, strict=False)
        want = reference_model(**_inputs()).last_hidden_state
    for name, b in bert["base_sd"].items():  # float32 SVD: error relative to the delta's size
        tol = 4e-6 * max(1.0, float((full[name] - b).abs().max()))
        torch.testing.assert_close(merged[name], full[name], rtol=0, atol=tol, msg=name)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_lora_output_error_is_the_dropped_singular_value(bert, tmp_path):
    """Rank 1 for a TIES merge (full-rank deltas): each adapted weight is off by exactly sigma_2 of its
    merged delta in spectral norm (Eckart-Young), which bounds that layer's output error by sigma_2 * ||x||."""
    spec, rank = MergeSpec(method="ties", density=0.5), 1
    out = merge_adapters_to_lora(bert["base"], bert["adapters"], spec, tmp_path / "out", rank, progress=False)
    full = merge_state_dicts_in_memory(spec, bert["base_sd"], [{n: m[n] for n in bert["base_sd"]}
                                                               for m in bert["merged"]])
    merged_model = _load_merged_adapter(bert["base"], out).merge_and_unload()
    merged, modules = _sd(merged_model), dict(merged_model.named_modules())
    x = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(1))
    checked = 0
    for name, base_w in bert["base_sd"].items():
        if torch.equal(full[name], base_w):
            continue
        delta = (full[name] - base_w).double()
        s = torch.linalg.svdvals(delta)
        assert float(s[rank]) > 1e-3 * float(s[0]), name  # TIES' delta is full rank: truncation really drops
        err = (merged[name] - full[name]).double()
        assert abs(float(torch.linalg.matrix_norm(err, ord=2)) - float(s[rank])) <= 1e-5 * float(s[0]) + 1e-7, name
        layer = modules[name[: -len(".weight")]]
        if isinstance(layer, torch.nn.Linear):  # the layer's output error: |y_R - y| <= sigma_2 * |x| per row
            with torch.no_grad():
                dy = (layer(x) - torch.nn.functional.linear(x, full[name], layer.bias)).double()
            bound = float(s[rank]) * torch.linalg.vector_norm(x.double(), dim=1) * (1 + 1e-5) + 1e-6
            assert bool((torch.linalg.vector_norm(dy, dim=1) <= bound).all()), name
        checked += 1
    assert checked == 4 * LAYERS + 1  # query, key, value, attention.output.dense per layer + word embeddings


def test_lora_output_with_classifier_loads_on_the_task_model(seqcls, tmp_path):
    spec = MergeSpec(method="task_arithmetic", scale=0.5)
    out = merge_adapters_to_lora(seqcls["base"], seqcls["adapters"], spec, tmp_path / "out", 5, progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert "classifier" in cfg["modules_to_save"]
    full = merge_state_dicts_in_memory(spec, seqcls["base_sd"], [{n: m[n] for n in seqcls["base_sd"]}
                                                                 for m in seqcls["merged"]])
    peft_model = _load_merged_adapter(seqcls["base"], out, BertForSequenceClassification)
    reference = BertForSequenceClassification.from_pretrained(seqcls["base"]).eval()
    reference.load_state_dict(full, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**_inputs()).logits, reference(**_inputs()).logits, rtol=0, atol=1e-4)


def test_lora_factors_match_peft_svd_split():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 3, generator=g) @ torch.randn(3, 5, generator=g)
    b, a, top, dropped = lora_factors(m, 4)  # rank 4 > rank(m) = 3 and padding past min(shape) would be 5
    assert b.shape == (6, 4) and a.shape == (4, 5)
    torch.testing.assert_close(b @ a, m, rtol=0, atol=1e-5)
    u, s, vh = torch.linalg.svd(m, full_matrices=True)  # peft: B = U[:, :r] @ diag(S[:r]), A = Vh[:r]
    torch.testing.assert_close(b[:, :2] @ a[:2], (u[:, :2] @ torch.diag(s[:2])) @ vh[:2], rtol=0, atol=1e-5)
    assert top == pytest.approx(float(s[0])) and dropped < 1e-5


def test_lora_output_bad_inputs(bert, tmp_path):
    spec = MergeSpec(method="task_arithmetic")
    with pytest.raises(MergeConfigError, match="--rank"):
        merge_adapters_to_lora(bert["base"], bert["adapters"], spec, tmp_path / "o", 0)
    with pytest.raises(MergeConfigError, match="has no adapter_config.json"):
        merge_adapters_to_lora(bert["base"], [bert["adapters"][0], bert["base"]], spec, tmp_path / "o", 2)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep")
    with pytest.raises(OutputExistsError):
        merge_adapters_to_lora(bert["base"], bert["adapters"], spec, taken, 2)
    assert (taken / "x").read_text() == "keep" and not list(tmp_path.glob(".*tmp-*"))


# ---------------------------------------------------------------------------- through the merge command
def test_merge_command_reads_adapters_as_models(bert, tmp_path):
    """`hf-atm merge` with adapters (and a full checkpoint) among the models equals the in-memory merge of
    peft's merged models."""
    from hf_atm.cli import main

    full_model = tmp_path / "full1"  # adapter 1 merged by peft, saved as a plain checkpoint
    full_model.mkdir()
    save_file({n: bert["merged"][1][n].contiguous() for n in bert["base_sd"]}, full_model / "model.safetensors",
              metadata={"format": "pt"})
    shutil.copy(bert["base"] / "config.json", full_model / "config.json")
    models = [bert["adapters"][0], full_model, bert["adapters"][2]]
    out = tmp_path / "merged"
    code = main(["merge", "--base", str(bert["base"]), "--models", *map(str, models), "--method", "ties",
                 "--density", "0.4", "--output", str(out), "--no-progress"])
    assert code == 0
    spec = MergeSpec(method="ties", density=0.4)
    reference = merge_state_dicts_in_memory(spec, bert["base_sd"], [{n: m[n] for n in bert["base_sd"]}
                                                                    for m in bert["merged"]])
    got = load_file(out / "model.safetensors")
    assert set(got) == set(reference)
    for name, t in reference.items():
        assert torch.equal(got[name], t), name


def test_public_run_merge_reads_adapters_and_the_bare_engine_names_them(bert, tmp_path):
    """hf_atm.lora.merge.run_merge (the public entry point) merges adapters given no base, taking the base they
    name; the engine with its default sources (full checkpoints only) refuses an adapter, naming it."""
    from hf_atm.lora.merge import run_merge
    from hf_atm.merging import engine
    from hf_atm.merging.config import MergeConfig

    adapters = [str(a) for a in bert["adapters"][:2]]
    spec = MergeSpec(method="task_arithmetic")
    result = run_merge(MergeConfig(base=None, models=adapters, output=str(tmp_path / "out"), spec=spec,
                                   progress=False))
    reference = merge_state_dicts_in_memory(spec, bert["base_sd"], [{n: m[n] for n in bert["base_sd"]}
                                                                    for m in bert["merged"][:2]])
    got = load_file(result.output / "model.safetensors")
    assert all(torch.equal(got[name], t) for name, t in reference.items())
    bare = MergeConfig(base=str(bert["base"]), models=adapters, output=str(tmp_path / "bare"), spec=spec,
                       progress=False)
    with pytest.raises(CheckpointError, match="LoRA adapter") as info:
        engine.run_merge(bare)
    assert adapters[0] in str(info.value) and not (tmp_path / "bare").exists()
    with pytest.raises(MergeConfigError, match="give --base"):
        engine.run_merge(MergeConfig(base=None, models=adapters, output=str(tmp_path / "nobase"), spec=spec,
                                     progress=False))


def test_merge_command_lora_output(bert, tmp_path, capsys):
    from hf_atm.cli import main

    out = tmp_path / "merged-lora"
    args = ["merge", "--base", str(bert["base"]), "--models", *map(str, bert["adapters"]),
            "--method", "task_arithmetic", "--output", str(out), "--no-progress"]
    assert main([*args, "--output-format", "lora"]) == 2  # --rank is required
    assert main([*args, "--rank", "4"]) == 2  # --rank needs --output-format lora
    assert "--rank" in capsys.readouterr().err
    assert main([*args, "--output-format", "lora", "--rank", "10"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 10 and (out / "adapter_model.safetensors").is_file()
    merged = _sd(_load_merged_adapter(bert["base"], out).merge_and_unload())
    full = merge_state_dicts_in_memory(MergeSpec(), bert["base_sd"], [{n: m[n] for n in bert["base_sd"]}
                                                                      for m in bert["merged"]])
    for name, b in bert["base_sd"].items():
        tol = 4e-6 * max(1.0, float((full[name] - b).abs().max()))
        torch.testing.assert_close(merged[name], full[name], rtol=0, atol=tol, msg=name)
