"""Head protocols (hf_atm.atm.heads) and CLIP zero-shot heads (hf_atm.atm.clip) on tiny models built here."""

import json
import types
from importlib import resources

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import save_tiny_clip
from scripts.atm_data import TASK_LABELS, digits_tasks, tiny_vit
from transformers import AutoModel, BertConfig, BertTokenizer

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel
from hf_atm.atm.clip import DEFAULT_TEMPLATES, load_clip, vision_backbone, zero_shot_weights
from hf_atm.atm.heads import (
    LINEAR_PROBE_L2,
    PROTOTYPE_K,
    ZERO_SHOT_LOGIT_SCALE,
    encode_dataset,
    fit_logistic_regression,
    heads_trainable,
    init_heads_,
    label_descriptions,
    prototype_indices,
    shared_heads,
)
from hf_atm.data.text import FORTUNE_LANGUAGES, FORTUNE_TOPICS, NOUN_CATEGORIES, TEXT_TASKS, VERB_CATEGORIES
from hf_atm.errors import CheckpointError, TaskDataError

CLASSES = {"pets": ["cat", "dog", "red fox"], "vehicles": ["car", "bus"]}


# ----------------------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel saved with a CLIPTokenizer made from a byte-level vocab.json / merges.txt."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def digits():
    return digits_tasks(("digit", "parity"), n_train=120, n_val=8, n_test=120, seed=0)


def vit_model(seed=0):
    return MultiTaskModel.from_backbone(tiny_vit(seed=0), {t: TASK_LABELS[t] for t in ("digit", "parity")},
                                        seed=seed)


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
         *"a an the animal plant tool place person food drink move make think big small red".split()]
TOY_TASKS = {"kind": ["animal", "plant", "tool"], "size": ["big", "small"]}
DESCRIPTIONS = {"kind": ["an animal", "a plant", "a tool"], "size": {"big": "a big thing", "small": "a small thing"}}


def text_model():
    torch.manual_seed(0)
    bb = AutoModel.from_config(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=32))
    return MultiTaskModel.from_backbone(bb, TOY_TASKS, pooling="mean"), BertTokenizer(
        vocab={w: i for i, w in enumerate(WORDS)})


def head_tensors(model):
    return {k: v.clone() for k, v in model.heads_state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------------------
def test_from_clip_logits_equal_clip_logits_per_image(clip_dir):
    """One template: the model's logits are CLIPModel's logits_per_image for the same prompts, per task."""
    clip, tok, _ = load_clip(clip_dir)
    model = MultiTaskModel.from_clip(clip_dir, CLASSES, templates=["a photo of a {}."]).eval()
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for task, names in CLASSES.items():
        enc = tok([f"a photo of a {c}." for c in names], padding=True, return_tensors="pt")
        with torch.no_grad():
            ref = clip(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=x).logits_per_image
            got = model(task=task, pixel_values=x).logits
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert model.config.head_init == "zero_shot" and model.config.head_bias is False
    assert model.config.normalize_features is True
    assert not heads_trainable(types.SimpleNamespace(freeze_heads=None), model)  # frozen by default


def test_zero_shot_weights_average_normalised_template_embeddings(clip_dir):
    """Several templates: each row is logit_scale * normalize(mean_t normalize(text_embeds)), computed here
    from CLIPModel's own forward (text_embeds are normalised there)."""
    clip, tok, _ = load_clip(clip_dir)
    templates = ["a photo of a {}.", "art of the {}.", "{}"]
    w = zero_shot_weights(clip, tok, CLASSES["pets"], templates)
    x = torch.zeros(1, 3, 8, 8)
    rows = []
    for c in CLASSES["pets"]:
        enc = tok([t.format(c) for t in templates], padding=True, return_tensors="pt")
        with torch.no_grad():
            emb = clip(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=x).text_embeds
        rows.append(F.normalize(emb.mean(0), dim=-1))
    torch.testing.assert_close(w, torch.stack(rows) * clip.logit_scale.exp().detach(), rtol=1e-5, atol=1e-6)
    assert w.shape == (3, clip.config.projection_dim)
    assert len(DEFAULT_TEMPLATES) >= 2 and all("{}" in t for t in DEFAULT_TEMPLATES)


def test_vision_backbone_has_clips_vision_weights(clip_dir):
    clip, _, _ = load_clip(clip_dir)
    vb = vision_backbone(clip).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = clip.get_image_features(pixel_values=x)
        ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
        torch.testing.assert_close(vb(pixel_values=x).image_embeds, ref)
    clip.visual_projection.weight.data.add_(1.0)  # a copy: the CLIP model's later changes do not leak in
    assert not torch.equal(vb.visual_projection.weight, clip.visual_projection.weight)


def test_clip_heads_survive_save_and_load(clip_dir, tmp_path):
    model = MultiTaskModel.from_clip(clip_dir, CLASSES).eval()
    model.save_pretrained(tmp_path / "run")
    again = MultiTaskModel.from_pretrained(tmp_path / "run").eval()
    for k, v in model.heads_state_dict().items():
        assert torch.equal(again.heads_state_dict()[k], v), k
    assert again.config.head_init == "zero_shot" and again.config.pooling == "clip"
    assert not any(p.requires_grad for p in again.heads.parameters())  # still frozen after loading
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(task="pets", pixel_values=x).logits, model(task="pets", pixel_values=x).logits)
    # zero_shot on a CLIP model keeps the heads from_clip made; with templates it rebuilds them from the text tower
    before = head_tensors(again)
    init_heads_(again, "zero_shot")
    assert all(torch.equal(before[k], v) for k, v in again.heads_state_dict().items())
    one = MultiTaskModel.from_clip(clip_dir, CLASSES, templates=["a photo of a {}."])
    init_heads_(model, "zero_shot", templates=["a photo of a {}."])
    for k, v in one.heads_state_dict().items():
        torch.testing.assert_close(model.heads_state_dict()[k], v)


def test_init_heads_zero_shot_templates_are_recorded_and_export_accepts_them(tmp_path):
    """init_heads_(zero_shot, templates=...) rebuilds the CLIP heads through the model's one builder
    (set_clip_heads_): the config names the templates, so export_task checks the heads against them."""
    from transformers import CLIPModel, CLIPProcessor

    from hf_atm.atm.export import export_task

    clip_dir = save_tiny_clip(tmp_path / "clip", image_size=16, patch_size=8, processor=True)
    model = MultiTaskModel.from_clip(clip_dir, CLASSES).eval()
    assert model.config.clip_templates == {t: list(DEFAULT_TEMPLATES) for t in CLASSES}
    assert not any(p.requires_grad for p in model.heads.parameters())  # zero-shot heads are frozen
    with pytest.raises(TaskDataError, match="dogs"):  # templates for an unknown task, refused before any change
        init_heads_(model, "zero_shot", templates={"dogs": ["a {}."]})
    assert model.config.clip_templates["pets"] == list(DEFAULT_TEMPLATES)
    init_heads_(model, "zero_shot", templates={"pets": ["a photo of a {}."]})
    assert model.config.clip_templates == {"pets": ["a photo of a {}."], "vehicles": list(DEFAULT_TEMPLATES)}
    out = export_task(model, "pets", tmp_path / "pets")
    exported = CLIPModel.from_pretrained(out).eval()
    processor = CLIPProcessor.from_pretrained(out)
    text = processor.tokenizer([f"a photo of a {c}." for c in CLASSES["pets"]], padding=True, return_tensors="pt")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(**text, pixel_values=x).logits_per_image,
                                   model(task="pets", pixel_values=x).logits, rtol=1e-4, atol=1e-4)
    # another protocol on the same model clears the templates (its heads are no longer CLIP's)
    model.rebuild_heads_(bias=True)
    model.record_head_init_("linear_probe")
    assert model.config.clip_templates is None and model.config.head_bias is True


def test_clip_bad_input_is_refused_before_any_work(clip_dir, tmp_path):
    clip, tok, _ = load_clip(clip_dir)
    for names, match in ((None, "missing"), ([], "at least 2"), (["cat", "cat"], "duplicated"),
                         (["cat", " "], "empty")):
        with pytest.raises(TaskDataError, match=match) as e:
            zero_shot_weights(clip, tok, names, DEFAULT_TEMPLATES, task="pets")
        assert "'pets'" in str(e.value)
        with pytest.raises(TaskDataError, match="'pets'"):
            MultiTaskModel.from_clip(clip_dir, {"pets": names})
    with pytest.raises(TaskDataError, match="has no '\\{\\}'"):
        zero_shot_weights(clip, tok, ["cat", "dog"], ["a photo of a cat"])
    vit = tmp_path / "vit"
    tiny_vit().save_pretrained(vit)
    with pytest.raises(CheckpointError, match="not a CLIP checkpoint") as e:
        load_clip(vit)
    assert str(vit) in str(e.value)
    with pytest.raises(CheckpointError, match="not a CLIP checkpoint"):
        MultiTaskModel.from_clip(vit, CLASSES)


# ----------------------------------------------------------------------------------------------------------
# linear probe
# ----------------------------------------------------------------------------------------------------------
def test_logistic_regression_matches_sklearn():
    """The L-BFGS probe is the regularised MLE: on standardised features it equals sklearn's multinomial
    LogisticRegression with C = 1 / (l2 * n)."""
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (150,), generator=g)
    x = torch.randn(150, 5, generator=g) + torch.randn(3, 5, generator=g)[y] * 2
    w, b = fit_logistic_regression(x, y, 3, l2=0.01)
    z = ((x - x.mean(0)) / x.std(0, unbiased=False)).double()
    sk = LogisticRegression(C=1 / (0.01 * 150), tol=1e-12, max_iter=10_000).fit(z.numpy(), y.numpy())
    ours = torch.softmax(x.double() @ w.T + b, -1).numpy()
    np.testing.assert_allclose(ours, sk.predict_proba(z.numpy()), atol=1e-5)


def test_linear_probe_beats_random_and_is_deterministic(digits):
    def test_acc(model):
        out = {}
        for t in model.tasks:
            feats, labels = encode_dataset(model, digits[t]["test"])
            out[t] = (model.heads[t](feats).argmax(-1) == labels).float().mean().item()
        return out

    rand = test_acc(init_heads_(vit_model(), "random", digits))
    probe_model = init_heads_(vit_model(), "linear_probe", digits)
    probe = test_acc(probe_model)
    assert probe["digit"] > rand["digit"] + 0.3 and probe["parity"] > rand["parity"] + 0.1, (probe, rand)
    assert probe["digit"] > 0.6
    again = init_heads_(vit_model(seed=5), "linear_probe", digits)
    assert all(torch.equal(again.heads_state_dict()[k], v) for k, v in probe_model.heads_state_dict().items())
    assert probe_model.config.head_init == "linear_probe" and probe_model.config.head_bias is True
    assert probe_model.config.normalize_features is False
    assert LINEAR_PROBE_L2 > 0


# ----------------------------------------------------------------------------------------------------------
# prototypes
# ----------------------------------------------------------------------------------------------------------
def test_prototypes_are_normalised_means_of_k_seeded_examples(digits, tmp_path):
    k = 3
    model = init_heads_(vit_model(), "prototypes", digits, k=k, seed=7)
    assert model.config.normalize_features and model.config.head_bias is False
    assert all(h.bias is None for h in model.heads.values())
    train = digits["parity"]["train"]
    labels = np.asarray(train["labels"])
    rows = prototype_indices(labels, 2, k, 7, "parity")
    assert sorted(np.bincount(labels[rows]).tolist()) == [k, k]
    assert rows == prototype_indices(labels, 2, k, 7, "parity") != prototype_indices(labels, 2, k, 8, "parity")
    feats, y = encode_dataset(model, train.select(rows))
    expected = torch.stack([F.normalize(F.normalize(feats[y == c], dim=-1).mean(0), dim=0) for c in (0, 1)])
    torch.testing.assert_close(model.heads["parity"].weight, expected * ZERO_SHOT_LOGIT_SCALE)
    # a class with fewer than k examples uses them all
    small = prototype_indices(np.array([0, 0, 1]), 2, 5, 0, "t")
    assert small == [0, 1, 2]
    assert PROTOTYPE_K == 16
    # saved and loaded: the bias-free cosine heads come back exactly
    model.save_pretrained(tmp_path / "m")
    again = MultiTaskModel.from_pretrained(tmp_path / "m")
    assert again.config.head_init == "prototypes" and again.config.normalize_features
    for key, v in model.heads_state_dict().items():
        assert torch.equal(again.heads_state_dict()[key], v)


# ----------------------------------------------------------------------------------------------------------
# zero-shot on a text encoder
# ----------------------------------------------------------------------------------------------------------
def test_text_zero_shot_heads_embed_the_descriptions():
    model, tok = text_model()
    init_heads_(model, "zero_shot", tokenizer=tok, descriptions=DESCRIPTIONS)
    assert model.config.head_init == "zero_shot" and model.config.normalize_features
    assert all(h.bias is None for h in model.heads.values())
    model.eval()
    texts = {"kind": DESCRIPTIONS["kind"], "size": [DESCRIPTIONS["size"][x] for x in TOY_TASKS["size"]]}
    for task, descs in texts.items():
        enc = tok(descs, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(task=task, **enc).logits
        # each description is its own class's nearest row, at cosine 1 (logit = the fixed scale)
        assert model.predict(task, **enc) == TOY_TASKS[task]
        torch.testing.assert_close(logits.diagonal(), torch.full((len(descs),), ZERO_SHOT_LOGIT_SCALE), atol=1e-4,
                                   rtol=0)


def test_shipped_descriptions_cover_every_text_task_and_label():
    labels = {"noun_category": NOUN_CATEGORIES, "verb_category": VERB_CATEGORIES, "fortune_topic": FORTUNE_TOPICS,
              "fortune_language": tuple(sorted(FORTUNE_LANGUAGES))}
    shipped = label_descriptions("text")
    assert set(shipped) == set(TEXT_TASKS)
    raw = json.loads(resources.files("hf_atm.data").joinpath("label_descriptions.json").read_text("utf-8"))["text"]
    for task, names in labels.items():
        assert list(raw[task]) == list(names), task  # keyed by label, in the suite's label order
        assert len(set(shipped[task])) == len(names) and all(d.strip() for d in shipped[task])
    with pytest.raises(TaskDataError, match="label_descriptions.json"):
        label_descriptions("vision")


# ----------------------------------------------------------------------------------------------------------
# bad input: refused before anything changes
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["unknown", "zs_vit", "no_tokenizer", "task_missing", "label_missing",
                                  "duplicated", "count", "no_train", "no_data", "bad_k", "empty_class"])
def test_bad_input_raises_before_any_change(case, digits):
    text, tok = text_model()
    vit = vit_model()
    kw: dict = {}
    if case == "unknown":
        model, args, err, match = vit, ("nearest", digits), ValueError, "head_init"
    elif case == "zs_vit":
        model, args, err, match = vit, ("zero_shot", digits), TaskDataError, "cannot embed text"
    elif case == "no_tokenizer":
        model, args, err, match = text, ("zero_shot",), TaskDataError, "tokenizer"
        kw = {"descriptions": DESCRIPTIONS}
    elif case == "task_missing":
        model, args, err, match = text, ("zero_shot",), TaskDataError, "task 'size'"
        kw = {"tokenizer": tok, "descriptions": {"kind": DESCRIPTIONS["kind"]}}
    elif case == "label_missing":
        model, args, err, match = text, ("zero_shot",), TaskDataError, "label.*'small'"
        kw = {"tokenizer": tok, "descriptions": {**DESCRIPTIONS, "size": {"big": "a big thing"}}}
    elif case == "duplicated":
        model, args, err, match = text, ("zero_shot",), TaskDataError, "'kind' has duplicated"
        kw = {"tokenizer": tok, "descriptions": {**DESCRIPTIONS, "kind": ["x", "y", "x"]}}
    elif case == "count":
        model, args, err, match = text, ("zero_shot",), TaskDataError, "2 descriptions for 3 labels"
        kw = {"tokenizer": tok, "descriptions": {**DESCRIPTIONS, "kind": ["x", "y"]}}
    elif case == "no_train":
        no_train = {t: {"test": ds["test"]} for t, ds in digits.items()}
        model, args, err, match = vit, ("linear_probe", no_train), TaskDataError, "task 'digit'.*'train'"
    elif case == "no_data":
        model, args, err, match = vit, ("prototypes", {"digit": digits["digit"]}), TaskDataError, "task 'parity'"
    elif case == "bad_k":
        model, args, err, match = vit, ("prototypes", digits), ValueError, "k must be"
        kw = {"k": 0}
    else:
        even = {**digits, "parity": {"train": digits["parity"]["train"].filter(lambda r: r["labels"] == 0)}}
        model, args, err, match = vit, ("prototypes", even), TaskDataError, "task 'parity', class 1 has no"
    before, flags = head_tensors(model), model.config.to_dict()
    with pytest.raises(err, match=match):
        init_heads_(model, *args, **kw)
    assert all(torch.equal(before[k], v) for k, v in model.heads_state_dict().items())
    assert model.config.to_dict() == flags


def test_shipped_descriptions_are_used_and_missing_tasks_named():
    model, tok = text_model()
    with pytest.raises(TaskDataError, match="label_descriptions.json has no label descriptions for task 'kind'"):
        init_heads_(model, "zero_shot", tokenizer=tok)


# ----------------------------------------------------------------------------------------------------------
# shared heads and who trains them
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_init", ["linear_probe", "prototypes"])
def test_shared_heads_give_fresh_models_with_identical_heads(head_init, digits):
    calls = []

    def make():
        calls.append(1)
        return vit_model(seed=len(calls))  # different random heads each time: the factory must overwrite them

    factory = shared_heads(make, head_init, digits, k=4)
    a, b, c = factory(), factory(), factory()
    # make_model runs once (a CLIP checkpoint is loaded and its prompts embedded once); the calls are copies
    assert len({id(a), id(b), id(c)}) == 3 and len(calls) == 1
    ref = a.heads_state_dict()
    for m in (b, c):
        assert m.heads_state_dict().keys() == ref.keys()
        assert all(torch.equal(m.heads_state_dict()[k], v) for k, v in ref.items())
        assert (m.config.head_init, m.config.normalize_features, m.config.head_bias) == \
            (a.config.head_init, a.config.normalize_features, a.config.head_bias)
        assert next(m.backbone.parameters()) is not next(a.backbone.parameters())
        assert m.config is not a.config and m.heads["digit"] is not a.heads["digit"]
    assert a.config.head_init == head_init
    assert a.config.head_init_k == (4 if head_init == "prototypes" else None)
    assert not any(p.requires_grad for p in a.heads.parameters())  # protocol heads are frozen on the model
    # independent objects: changing one model (as a fine-tuning would) changes neither the others nor new ones
    with torch.no_grad():
        a.heads["digit"].weight.add_(1.0)
        next(a.backbone.parameters()).add_(1.0)
    a.config.head_init = "random"
    d = factory()
    for m in (b, d):
        assert torch.equal(m.heads["digit"].weight, ref["digit.weight"])
        assert not torch.equal(next(m.backbone.parameters()), next(a.backbone.parameters()))
        assert m.config.head_init == head_init


def test_heads_trainable_rules():
    made = {h: types.SimpleNamespace(config=types.SimpleNamespace(head_init=h))
            for h in ("random", "linear_probe", "zero_shot", "prototypes")}
    for h, model in made.items():
        assert heads_trainable(types.SimpleNamespace(freeze_heads=None), model) is (h == "random")
        assert heads_trainable(types.SimpleNamespace(freeze_heads=True), model) is False
        assert heads_trainable(types.SimpleNamespace(freeze_heads=False), model) is True
    assert ATMConfig(output_dir="x", report_to="none").freeze_heads is None
    with pytest.raises(ValueError, match="head_learning_rate"):
        ATMConfig(output_dir="x", report_to="none", head_learning_rate=0.0)


def _tune_once(tmp_path, model, data, **kw):
    args = ATMConfig(output_dir=str(tmp_path), report_to="none", save_strategy="no", disable_tqdm=True,
                     per_device_train_batch_size=32, learning_rate=1e-2, rounds=1, steps_per_round=2, **kw)
    tr = ATMTrainer(model=model, args=args, task_datasets=data)
    tr.tune_task("parity", 1)
    return tr


def test_tuning_freezes_built_heads_by_default_and_honours_overrides(tmp_path, digits):
    data = {"parity": digits["parity"]}
    model = init_heads_(MultiTaskModel.from_backbone(tiny_vit(), {"parity": TASK_LABELS["parity"]}), "prototypes",
                        data, k=4)
    before = head_tensors(model)
    backbone0 = next(model.backbone.parameters()).detach().clone()
    # protocol heads are frozen on the model itself (a plain transformers Trainer leaves them too)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any(p.requires_grad for p in model.heads.parameters())
    assert all(p.requires_grad for p in model.backbone.parameters())
    _tune_once(tmp_path, model, data)
    assert all(torch.equal(before[k], v) for k, v in model.heads_state_dict().items())  # frozen by default
    assert not torch.equal(next(model.backbone.parameters()), backbone0)  # the backbone did train
    _tune_once(tmp_path, model, data, freeze_heads=False)
    assert not torch.equal(before["parity.weight"], model.heads_state_dict()["parity.weight"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # the caller's flags are kept


def test_head_learning_rate_with_frozen_heads_warns_once(tmp_path, digits, caplog, monkeypatch):
    from hf_atm.atm import heads as heads_module

    monkeypatch.setattr(heads_module, "_warned_frozen_head_lr", False)
    data = {"parity": digits["parity"]}
    model = init_heads_(MultiTaskModel.from_backbone(tiny_vit(), {"parity": TASK_LABELS["parity"]}), "prototypes",
                        data, k=4)
    with caplog.at_level("WARNING", logger="hf_atm.atm.heads"):
        _tune_once(tmp_path, model, data, head_learning_rate=0.5)
        _tune_once(tmp_path / "again", model, data, head_learning_rate=0.5)
    assert sum("head_learning_rate" in r.getMessage() for r in caplog.records) == 1


def test_head_learning_rate_is_a_param_group_of_its_own(tmp_path, digits):
    data = {"parity": digits["parity"]}
    model = MultiTaskModel.from_backbone(tiny_vit(), {"parity": TASK_LABELS["parity"]})
    tr = _tune_once(tmp_path, model, data, head_learning_rate=0.5, weight_decay=0.1)
    heads = {id(p) for p in model.heads.parameters()}
    groups = tr.optimizer.param_groups
    head_groups = [g for g in groups if any(id(p) in heads for p in g["params"])]
    assert head_groups and all(all(id(p) in heads for p in g["params"]) for g in head_groups)
    assert {g["initial_lr"] for g in head_groups} == {0.5}
    assert {g["initial_lr"] for g in groups if all(g is not h for h in head_groups)} == {1e-2}
    assert sorted(g["weight_decay"] for g in head_groups) == [0.0, 0.1]  # decay / no-decay kept apart
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
