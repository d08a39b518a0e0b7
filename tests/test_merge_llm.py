"""End-to-end merges of tiny causal LMs (Llama, Qwen2, GPT-2 from tests/llm_fixtures.py) through ``hf-atm merge``
(:func:`hf_atm.cli.main`) and :func:`hf_atm.merging.engine.run_merge`: SLERP, Model Stock, per-model parameters,
layer gradients and name filters (native and mergekit YAML), re-runnable merge_config.yaml, vocabularies aligned
by token, tied embeddings, LoRA adapters without a base, model cards, and bad input refused with exit status 2.

Every expected tensor is computed here, from the method functions or from the formula, on the saved checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from hf_atm.cli import main
from hf_atm.merging import methods as M
from hf_atm.merging.config import MergeConfig
from hf_atm.merging.engine import run_merge
from hf_atm.merging.spec import MergeSpec, merge_tensor
from tests.helpers import save_raw_checkpoint
from tests.llm_fixtures import BPE_VOCAB_SIZE, make_causal_lm, make_vocab_checkpoints

L = 4  # layers of the tiny llama / qwen2 checkpoints
V = BPE_VOCAB_SIZE
TOOL, THINK = "<|tool|>", "<think>"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<think>{% endfor %}"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """An untied llama base and two independent fine-tunes."""
    root = tmp_path_factory.mktemp("llama")
    base = make_causal_lm(root / "base", "llama", num_layers=L)
    fts = [make_causal_lm(root / f"ft{i}", base=base, seed=i + 1) for i in range(2)]
    return base, fts


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A qwen2 base (biases in q/k/v) and three fine-tunes sharing a common direction (cos ~ 0.5 between task
    vectors, so Model Stock's t is well inside (0, 1))."""
    root = tmp_path_factory.mktemp("qwen")
    base = make_causal_lm(root / "base", "qwen2", num_layers=L)
    common = make_causal_lm(root / "common", base=base, seed=7)
    fts = [make_causal_lm(root / f"ft{i}", base=common, seed=20 + i) for i in range(3)]
    return base, fts


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """A llama base and two fine-tunes that each add a token: ft1 a special one, ft2 a plain added token and its
    own chat template (embeddings resized)."""
    return make_vocab_checkpoints(tmp_path_factory.mktemp("vocab"), dict(special_tokens=[TOOL]),
                                  dict(tokenizer_extra_tokens=[THINK], chat_template=TEMPLATE))


def _sd(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


def _merge(*argv) -> None:
    code = main(["merge", *map(str, argv), "--no-progress"])
    assert code == 0


def _refused(capsys, tmp_path: Path, argv: list, *expected: str) -> str:
    """Run the CLI; expect exit 2, exactly one ``error:`` line with every `expected` fragment, and no output (nor
    temporary) folder."""
    out = tmp_path / "out"
    code = main(["merge", *map(str, argv), "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for fragment in expected:
        assert fragment in lines[0], (fragment, err)
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    return lines[0]


def _yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def _gradient(values: list[float], x: float) -> float:
    """mergekit's layer gradient at position x in [0, 1] (linear between the k given points)."""
    scaled = x * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def _load_and_generate(folder: Path):
    """Load `folder` with AutoModelForCausalLM + AutoTokenizer (no missing / unexpected keys), generate 3 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not info.get("missing_keys") and not info.get("unexpected_keys"), info
    assert not info.get("mismatched_keys"), info
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok("the quick brown fox", return_tensors="pt")
    with torch.no_grad():
        gen = model.eval().generate(**ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape == (1, ids["input_ids"].shape[1] + 3)
    return model, tok


def _bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ 1. SLERP
def test_slerp_equals_the_method_and_loads(llama, tmp_path):
    base, (ft, _) = llama
    b, m = _sd(base), _sd(ft)
    out = tmp_path / "slerp"
    _merge("--base", base, "--models", ft, "--method", "slerp", "--t", "0.3", "--output", out)
    got = _sd(out)
    assert got.keys() == b.keys()
    spherical = 0
    for name in b:
        ref = M.slerp(b[name], m[name], 0.3)
        assert _bits(got[name], ref), name
        spherical += not torch.allclose(ref, 0.7 * b[name] + 0.3 * m[name], rtol=0, atol=1e-7)
    assert spherical > 0  # the arc, not only the straight line, was taken somewhere
    assert yaml.safe_load((out / "merge_config.yaml").read_text())["t"] == 0.3

    for t, want in (("0", b), ("1", m)):
        end = tmp_path / f"t{t}"
        _merge("--base", base, "--models", ft, "--method", "slerp", "--t", t, "--output", end)
        ends = _sd(end)
        assert all(_bits(ends[n], want[n]) for n in want), t

    model, _ = _load_and_generate(out)
    assert torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                       got["model.layers.0.self_attn.q_proj.weight"])
    card = (out / "README.md").read_text()
    assert "AutoModelForCausalLM" in card and "pipeline_tag: text-generation" in card


# ------------------------------------------------------------------------------------------ 2. Model Stock
def _model_stock_ref(b: torch.Tensor, ms: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Model Stock from the formula, dense in float64: t = N cos / (1 + (N - 1) cos), cos the mean pairwise
    cosine of the flattened task vectors; result = t * mean(models) + (1 - t) * base."""
    taus = [(m.double() - b.double()).reshape(-1) for m in ms]
    n = len(taus)
    cosines = [
        float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm())) for i in range(n) for j in range(i + 1, n)
    ]
    cos = sum(cosines) / len(cosines)
    t = n * cos / (1 + (n - 1) * cos)
    mean = torch.stack([m.double() for m in ms]).mean(0)
    return (t * mean + (1 - t) * b.double()).float(), t


def test_model_stock_equals_the_formula(qwen, tmp_path):
    base, fts = qwen
    b, ms = _sd(base), [_sd(f) for f in fts]
    out = tmp_path / "ms"
    _merge("--base", base, "--models", *fts, "--method", "model_stock", "--output", out)
    got = _sd(out)
    assert got.keys() == b.keys()
    ratios = []
    for name in b:
        ref, t = _model_stock_ref(b[name], [sd[name] for sd in ms])
        assert_close(got[name], ref, rtol=1e-5, atol=1e-6, msg=name)
        ratios.append(t)
    assert 0.3 < min(ratios) and max(ratios) < 0.95  # neither the base nor the mean of the models

    # identical models: cos = 1, t = 1, the result is that model
    twin = tmp_path / "twin"
    shutil.copytree(fts[0], twin)
    same = tmp_path / "same"
    _merge("--base", base, "--models", fts[0], twin, "--method", "model_stock", "--output", same)
    got = _sd(same)
    for name in b:
        assert_close(got[name], ms[0][name], rtol=1e-5, atol=1e-6, msg=name)


# -------------------------------------------------------------------------- 3. per-model parameters (native YAML)
def test_per_model_parameters_and_density_gradient(llama, tmp_path):
    base, (fa, fb) = llama
    b, a, c = _sd(base), _sd(fa), _sd(fb)
    out = tmp_path / "ties"
    cfg = _yaml(tmp_path / "merge.yaml", {
        "base": str(base),
        "models": [{"model": str(fa), "parameters": {"weight": 0.7, "density": 0.5}},
                   {"model": str(fb), "parameters": {"weight": 0.3, "density": [0.9, 0.1]}}],
        "method": "ties",
        "output": str(out),
        "progress": False,
    })
    assert main(["merge", "--config", str(cfg)]) == 0
    got = _sd(out)
    assert got.keys() == b.keys()
    for name in b:
        i = _layer(name)
        x = 0.0 if i is None else i / (L - 1)  # embeddings, final norm and LM head sit at x = 0
        d = (1 - x) * 0.9 + x * 0.1
        spec = MergeSpec(method="ties", weights=(0.7, 0.3), density=(0.5, d))
        assert _bits(got[name], merge_tensor(spec, b[name], [a[name], c[name]], name)), name
    # the gradient does act: the last layer's tensor is not what density 0.9 would give
    last = f"model.layers.{L - 1}.mlp.up_proj.weight"
    flat = merge_tensor(MergeSpec(method="ties", weights=(0.7, 0.3), density=(0.5, 0.9)), b[last],
                        [a[last], c[last]], last)
    assert not torch.equal(got[last], flat)
    record = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert record["models"][1]["parameters"] == {"weight": 0.3, "density": [0.9, 0.1]}
    assert record["models"][0]["parameters"] == {"weight": 0.7, "density": 0.5}


def test_layer_gradient_hits_the_right_layers(llama, tmp_path):
    """``t: [0, 1]`` through run_merge: layer 0 (and the tensors outside the layers) is the base bit for bit, the
    last layer the model, the layers between slerp at i / (L - 1)."""
    base, (ft, _) = llama
    b, m = _sd(base), _sd(ft)
    out = tmp_path / "grad"
    config = MergeConfig.from_dict({"base": str(base), "models": [str(ft)], "method": "slerp", "t": [0, 1],
                                    "output": str(out), "progress": False})
    result = run_merge(config)
    assert result.output == out and result.num_tensors == len(b)
    got = _sd(out)
    for name in b:
        i = _layer(name)
        if i is None or i == 0:
            assert _bits(got[name], b[name]), name
        elif i == L - 1:
            assert _bits(got[name], m[name]), name
        else:
            assert _bits(got[name], M.slerp(b[name], m[name], i / (L - 1))), name
            assert not torch.equal(got[name], b[name]) and not torch.equal(got[name], m[name])


# ------------------------------------------------------------------------------------------------ 4. filters
def test_filters_pick_the_value_by_name(llama, tmp_path):
    base, (ft, _) = llama
    b, m = _sd(base), _sd(ft)
    out = tmp_path / "filtered"
    cfg = _yaml(tmp_path / "f.yaml", {
        "base": str(base), "models": [str(ft)], "method": "slerp", "output": str(out),
        "t": [{"filter": "self_attn", "value": 0.0}, {"filter": "mlp", "value": 1.0}, {"value": 0.5}],
    })
    _merge("--config", cfg)
    got = _sd(out)
    kinds = {"self_attn": 0, "mlp": 0, "rest": 0}
    for name in b:
        if "self_attn" in name:
            want, kind = b[name], "self_attn"
        elif "mlp" in name:
            want, kind = m[name], "mlp"
        else:
            want, kind = M.slerp(b[name], m[name], 0.5), "rest"
        assert _bits(got[name], want), name
        kinds[kind] += 1
    assert kinds == {"self_attn": 4 * L, "mlp": 3 * L, "rest": 2 * L + 3}


def test_filter_list_without_default_is_refused(llama, tmp_path, capsys):
    base, (ft, _) = llama
    cfg = _yaml(tmp_path / "f.yaml", {
        "base": str(base), "models": [str(ft)], "method": "slerp",
        "t": [{"filter": "self_attn", "value": 0.0}, {"filter": "mlp", "value": 1.0}],
    })
    _refused(capsys, tmp_path, ["--config", cfg], "t:", "default")


# ------------------------------------------------------------------------------------------------ 5. mergekit
def test_mergekit_ties_yaml_and_rerun_record(llama, tmp_path):
    base, (fa, fb) = llama
    b, a, c = _sd(base), _sd(fa), _sd(fb)
    mk = _yaml(tmp_path / "mk.yml", {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(base)},  # mergekit lists the base among the models: it stays the base
            {"model": str(fa), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(fb), "parameters": {"weight": 0.4, "density": 0.7}},
        ],
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",
    })
    out = tmp_path / "OUT"
    _merge("--config", mk, "--output", out)
    got = _sd(out)
    assert got.keys() == b.keys()
    spec = MergeSpec(method="ties", weights=(0.6, 0.4), density=(0.5, 0.7), normalize=True)
    for name in b:
        assert _bits(got[name], merge_tensor(spec, b[name], [a[name], c[name]], name)), name
    # normalize mattered: the unnormalised merge differs
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(got[name], merge_tensor(MergeSpec(method="ties", weights=(0.6, 0.4), density=(0.5, 0.7)),
                                                   b[name], [a[name], c[name]], name))

    # OUT/merge_config.yaml is the re-runnable record
    again = tmp_path / "again"
    _merge("--config", out / "merge_config.yaml", "--output", again)
    rerun = _sd(again)
    assert rerun.keys() == got.keys() and all(_bits(rerun[n], got[n]) for n in got)
    assert json.loads((again / "config.json").read_text()) == json.loads((out / "config.json").read_text())


def test_mergekit_classic_slerp_config_runs_as_is(llama, tmp_path):
    base, (ft, _) = llama
    b, m = _sd(base), _sd(ft)
    attn, mlp = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]
    text = f"""\
models:
  - model: {base}
  - model: {ft}
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""
    mk = tmp_path / "slerp.yml"
    mk.write_text(text)
    out = tmp_path / "out"
    _merge("--config", mk, "--output", out)
    got = _sd(out)
    assert got.keys() == b.keys()
    for name in b:
        i = _layer(name)
        x = 0.0 if i is None else i / (L - 1)
        t = _gradient(attn, x) if "self_attn" in name else _gradient(mlp, x) if "mlp" in name else 0.5
        want = M.slerp(b[name], m[name], t).to(torch.bfloat16)
        assert _bits(got[name], want), (name, t)
    assert _bits(got["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"].bfloat16())
    assert _bits(got["model.layers.0.mlp.up_proj.weight"], m["model.layers.0.mlp.up_proj.weight"].bfloat16())
    assert json.loads((out / "config.json").read_text()).get("dtype") == "bfloat16"


# ---------------------------------------------------------------------------------------------- 6. vocabularies
def test_different_vocabularies_need_a_tokenizer_source(vocab, tmp_path, capsys):
    base, ft1, ft2 = vocab
    _refused(capsys, tmp_path, ["--base", base, "--models", ft1, ft2, "--method", "task_arithmetic"],
             f"({V}, 32)", f"({V + 1}, 32)", "--tokenizer-source")


def test_tokenizer_source_union(vocab, tmp_path):
    base, ft1, ft2 = vocab
    b, f1, f2 = _sd(base), _sd(ft1), _sd(ft2)
    out = tmp_path / "union"
    _merge("--base", base, "--models", ft1, ft2, "--method", "task_arithmetic", "--weights", "0.6", "0.9",
           "--tokenizer-source", "union", "--output", out)
    got = _sd(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == V + 2
    spec = MergeSpec(method="task_arithmetic", weights=(0.6, 0.9))
    for name in b:
        if name in (EMBED, HEAD):
            assert got[name].shape == (V + 2, 32)
            shared = merge_tensor(spec, b[name], [f1[name][:V], f2[name][:V]], name)
            assert _bits(got[name][:V], shared), name
            assert _bits(got[name][V], f1[name][V]), name  # <|tool|>: ft1's row
            assert _bits(got[name][V + 1], f2[name][V]), name  # <think>: ft2's row
        else:
            assert _bits(got[name], merge_tensor(spec, b[name], [f1[name], f2[name]], name)), name
    model, tok = _load_and_generate(out)
    assert len(tok) == V + 2 and model.get_input_embeddings().weight.shape == (V + 2, 32)
    assert tok.encode(TOOL, add_special_tokens=False) == [V]
    assert tok.encode(THINK, add_special_tokens=False) == [V + 1]
    assert TOOL in tok.all_special_tokens and THINK not in tok.all_special_tokens
    assert torch.equal(model.get_input_embeddings().weight[V + 1], f2[EMBED][V])


def test_tokenizer_source_model_and_unknown_source(vocab, tmp_path, capsys):
    from transformers import AutoTokenizer

    base, ft1, ft2 = vocab
    b, f1, f2 = _sd(base), _sd(ft1), _sd(ft2)
    out = tmp_path / "from_ft2"
    _merge("--base", base, "--models", ft1, ft2, "--method", "task_arithmetic", "--tokenizer-source", ft2,
           "--output", out)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == TEMPLATE
    assert len(tok) == V + 1 and tok.convert_tokens_to_ids(THINK) == V and TOOL not in tok.get_vocab()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == V + 1
    got = _sd(out)
    for name in (EMBED, HEAD):
        shared = merge_tensor(MergeSpec(), b[name], [f1[name][:V], f2[name][:V]], name)
        assert _bits(got[name][:V], shared) and _bits(got[name][V], f2[name][V]), name
    _load_and_generate(out)

    _refused(capsys, tmp_path, ["--base", base, "--models", ft1, ft2, "--method", "task_arithmetic",
                                "--tokenizer-source", "not-a-model"], "tokenizer_source", "'not-a-model'")


# ------------------------------------------------------------------------------------------- 7. tied embeddings
def test_gpt2_tied_embeddings(tmp_path):
    base = make_causal_lm(tmp_path / "base", "gpt2", num_layers=2)
    fts = [make_causal_lm(tmp_path / f"ft{i}", base=base, seed=i + 1) for i in range(2)]
    b, ms = _sd(base), [_sd(f) for f in fts]
    assert "lm_head.weight" not in b
    out = tmp_path / "merged"
    _merge("--base", base, "--models", *fts, "--method", "ties", "--density", "0.5", "--output", out)
    got = _sd(out)
    assert "lm_head.weight" not in got and got.keys() == b.keys()
    spec = MergeSpec(method="ties", density=0.5)
    for name in b:
        assert _bits(got[name], merge_tensor(spec, b[name], [sd[name] for sd in ms], name)), name
    model, _ = _load_and_generate(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, got["transformer.wte.weight"])


@pytest.mark.parametrize("stores_head", ["model", "base"])
def test_tied_llama_that_stores_its_head_anyway(tmp_path, stores_head):
    """A tying checkpoint whose safetensors also hold ``lm_head.weight`` (a copy of the embedding) merges with
    tying checkpoints that do not: the output ties, without a separate head."""
    base = make_causal_lm(tmp_path / "base", "llama", num_layers=1, tie_word_embeddings=True)
    ft = make_causal_lm(tmp_path / "ft", base=base, seed=3)
    b, m = _sd(base), _sd(ft)
    assert HEAD not in b and HEAD not in m
    target = ft if stores_head == "model" else base
    sd = _sd(target)
    sd[HEAD] = sd[EMBED].clone()
    save_file(sd, target / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "merged"
    _merge("--base", base, "--models", ft, "--method", "task_arithmetic", "--scale", "0.5", "--output", out)
    got = _sd(out)
    assert HEAD not in got and got.keys() == b.keys()
    for name in b:
        assert _bits(got[name], merge_tensor(MergeSpec(scale=0.5), b[name], [m[name]], name)), name
    model, _ = _load_and_generate(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# ---------------------------------------------------------------------------------------------------- 8. LoRA
@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two rank-2 peft LoRA adapters (B non-zero) on a tiny llama, each naming the base in adapter_config.json,
    and what peft's merge_and_unload gives for each."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    base = make_causal_lm(root / "base", "llama", num_layers=2)
    out, merged = [], []
    for i, targets in enumerate((["q_proj", "v_proj"], ["v_proj", "down_proj"])):
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(str(base))
        peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                      init_lora_weights=False, task_type="CAUSAL_LM"))
        folder = root / f"adapter{i}"
        peft_model.save_pretrained(str(folder))
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(base)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        out.append(folder)
        fresh = AutoModelForCausalLM.from_pretrained(str(base))
        merged.append({k: v.detach().clone() for k, v in
                       PeftModel.from_pretrained(fresh, str(folder)).merge_and_unload().state_dict().items()})
    return base, out, merged


def test_lora_adapters_merge_without_a_base(adapters, tmp_path):
    base, (a0, a1), merged = adapters
    b = _sd(base)
    out = tmp_path / "full"
    _merge("--models", a0, a1, "--method", "task_arithmetic", "--output", out)
    got = _sd(out)
    assert got.keys() == b.keys()
    changed = 0
    for name in b:
        want = b[name] + (merged[0][name] - b[name]) + (merged[1][name] - b[name])
        assert_close(got[name], want, rtol=1e-6, atol=1e-6, msg=name)
        changed += not torch.equal(got[name], b[name])
    assert changed == 3 * 2  # q_proj, v_proj and down_proj of both layers
    assert yaml.safe_load((out / "merge_config.yaml").read_text())["base"] == str(base)
    card = (out / "README.md").read_text()
    assert "AutoModelForCausalLM" in card and "pipeline_tag: text-generation" in card
    _load_and_generate(out)


def test_lora_output_rerun_from_its_record(adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, (a0, a1), merged = adapters
    out = tmp_path / "lora"
    _merge("--models", a0, a1, "--method", "task_arithmetic", "--output-format", "lora", "--rank", "4",
           "--output", out)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert "PeftModel" in (out / "README.md").read_text()
    again = tmp_path / "again"
    _merge("--config", out / "merge_config.yaml", "--output", again)
    first, second = load_file(out / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert first.keys() == second.keys() and first
    assert all(_bits(first[k], second[k]) for k in first)
    cfg1, cfg2 = (json.loads((d / "adapter_config.json").read_text()) for d in (out, again))
    assert cfg1 == cfg2
    # rank 4 holds the sum of two rank-2 adapters: the merged adapter reproduces the full merge
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(out)).merge_and_unload()
    b = _sd(base)
    for name, t in model.state_dict().items():
        if name in b:
            want = b[name] + (merged[0][name] - b[name]) + (merged[1][name] - b[name])
            assert_close(t, want, rtol=0, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- 9. bad input
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--method", "slerp", "--t", "1.5"], ["t must be", "1.5"]),
        (["--method", "slerp", "--t", "0.5", "TWO"], ["slerp", "exactly 1", "got 2"]),
        (["--method", "model_stock"], ["model_stock", "at least 2", "got 1"]),
    ],
    ids=["t-out-of-range", "slerp-two-models", "model-stock-one-model"],
)
def test_bad_method_arguments(llama, tmp_path, capsys, extra, expected):
    base, (fa, fb) = llama
    models = [fa, fb] if "TWO" in extra else [fa]
    _refused(capsys, tmp_path, ["--base", base, "--models", *models, *[e for e in extra if e != "TWO"]],
             *expected)


def test_no_base_for_models_that_are_not_adapters(llama, tmp_path, capsys):
    _, (fa, _) = llama
    _refused(capsys, tmp_path, ["--models", fa, "--method", "task_arithmetic"], "base", "not a LoRA adapter",
             "--base")


def test_layer_gradient_needs_layered_names(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(3, generator=g)}
    base = save_raw_checkpoint(tmp_path / "base", tensors)
    model = save_raw_checkpoint(tmp_path / "m", {k: v + 0.1 for k, v in tensors.items()})
    cfg = _yaml(tmp_path / "g.yaml", {"base": str(base), "models": [str(model)], "method": "ties",
                                      "density": [0.1, 0.9]})
    _refused(capsys, tmp_path, ["--config", cfg], "density", "layer gradient", "'a.weight'")


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"slices": [{"sources": [{"model": "A", "layer_range": [0, 4]}]}]}, ["slices"]),
        ({"merge_method": "passthrough"}, ["merge_method", "passthrough"]),
    ],
    ids=["slices", "passthrough"],
)
def test_mergekit_features_refused(llama, tmp_path, capsys, extra, expected):
    base, (fa, _) = llama
    data = {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(fa), "parameters": {"weight": 1.0}}], "dtype": "float32", **extra}
    cfg = _yaml(tmp_path / "mk.yml", data)
    _refused(capsys, tmp_path, ["--config", cfg], *expected)


def test_per_model_gradient_is_fine_but_a_mapping_is_refused(llama, tmp_path, capsys):
    base, (fa, fb) = llama
    b, a, c = _sd(base), _sd(fa), _sd(fb)
    ok = tmp_path / "ok"
    cfg = _yaml(tmp_path / "ok.yaml", {
        "base": str(base), "method": "ties", "output": str(ok),
        "models": [{"model": str(fa), "parameters": {"density": [0.5, 0.3]}}, str(fb)],
    })
    _merge("--config", cfg)
    got = _sd(ok)
    for i in (0, L - 1):
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        spec = MergeSpec(method="ties", density=(0.5 if i == 0 else 0.3, 0.2))  # the other model: ties' default
        assert _bits(got[name], merge_tensor(spec, b[name], [a[name], c[name]], name)), name

    bad = _yaml(tmp_path / "bad.yaml", {
        "base": str(base), "method": "ties",
        "models": [{"model": str(fa), "parameters": {"density": {"a": 1}}}, str(fb)],
    })
    _refused(capsys, tmp_path, ["--config", bad], "models[0].parameters.density")


def test_help_shows_the_ties_default_density(capsys):
    assert main(["merge", "--help"]) == 0
    text = capsys.readouterr().out
    ties = [line for line in text.splitlines() if line.strip().startswith("ties ")]
    assert len(ties) == 1 and "density=0.2" in ties[0], ties
    assert "ties 0.2" in " ".join(text.split())
