"""MultiTaskModel: heads per task, pooling, mixed batches, save / load (transformers' own), references, dtype,
label smoothing, single-task views, prediction, bad input."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import save_tiny_clip
from safetensors.torch import save_file
from scripts.atm_data import TASK_LABELS, tiny_vit
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertTokenizer,
    GPT2Config,
    T5Config,
    T5EncoderModel,
)
from transformers.utils import find_labels

from hf_atm.atm import MultiTaskModel
from hf_atm.atm.model import MultiTaskConfig
from hf_atm.atm.pooling import last_token_index
from hf_atm.errors import CheckpointError, TaskDataError

TASKS = {"digit": TASK_LABELS["digit"], "parity": TASK_LABELS["parity"]}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"good bad movie film the a is was very not plot".split()]


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return AutoModel.from_config(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=32))


def test_heads_shapes_and_task_loss():
    m = MultiTaskModel.from_backbone(tiny_vit(), TASKS).eval()
    x = torch.rand(4, 1, 8, 8)
    out = m(task="digit", pixel_values=x, labels=torch.tensor([1, 2, 3, 4]))
    assert out.logits.shape == (4, 10)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, torch.tensor([1, 2, 3, 4])))
    assert m(task="parity", pixel_values=x).logits.shape == (4, 2)
    with pytest.raises(ValueError, match="exactly one"):
        m(pixel_values=x)
    with pytest.raises(KeyError, match="unknown task"):
        m(task="nope", pixel_values=x)


def test_heads_are_seeded_by_task_not_global_rng():
    torch.manual_seed(1)
    a = MultiTaskModel.from_backbone(tiny_vit(), TASKS, seed=3)
    torch.manual_seed(2)
    b = MultiTaskModel.from_backbone(tiny_vit(), {"parity": TASKS["parity"]}, seed=3)
    assert torch.equal(a.heads["parity"].weight, b.heads["parity"].weight)
    c = MultiTaskModel.from_backbone(tiny_vit(), TASKS, seed=4)
    assert not torch.equal(a.heads["parity"].weight, c.heads["parity"].weight)


def test_mixed_batch_routes_each_example_to_its_head():
    m = MultiTaskModel.from_backbone(tiny_vit(), TASKS).eval()
    x = torch.rand(5, 1, 8, 8)
    ids = torch.tensor([0, 1, 1, 0, 1])
    labels = torch.tensor([7, 1, 0, 3, 1])
    out = m(task_ids=ids, pixel_values=x, labels=labels)
    d = m(task="digit", pixel_values=x).logits
    p = m(task="parity", pixel_values=x).logits
    assert torch.allclose(out.logits[0], d[0], atol=1e-6)
    assert torch.allclose(out.logits[1, :2], p[1], atol=1e-6)
    assert (out.logits[1, 2:] == torch.finfo(out.logits.dtype).min).all()
    per = [F.cross_entropy(d[i : i + 1], labels[i : i + 1]) if ids[i] == 0 else
           F.cross_entropy(p[i : i + 1], labels[i : i + 1]) for i in range(5)]
    assert torch.allclose(out.loss, torch.stack(per).mean(), atol=1e-6)


def test_pooling_variants_on_text_backbone():
    ids = torch.tensor([[2, 9, 7, 3, 0, 0], [2, 5, 6, 8, 10, 3]])
    mask = (ids != 0).long()
    bb = tiny_bert()
    for pooling in ("cls", "mean", "pooler", "last"):
        m = MultiTaskModel.from_backbone(bb, {"sent": ["neg", "pos"]}, pooling=pooling).eval()
        assert m(task="sent", input_ids=ids, attention_mask=mask).logits.shape == (2, 2)
    m = MultiTaskModel.from_backbone(bb, {"sent": ["neg", "pos"]}, pooling="mean").eval()
    hidden = bb(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = hidden[0, :4].mean(0)  # padding excluded from the mean
    assert torch.allclose(m.encode(input_ids=ids, attention_mask=mask)[0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        MultiTaskModel.from_backbone(bb, {"sent": ["neg", "pos"]}, pooling="max")


def test_save_load_roundtrip_predict_and_automodel(tmp_path):
    m = MultiTaskModel.from_backbone(tiny_bert(), {"sent": ["neg", "pos"], "topic": ["movie", "film", "plot"]},
                                     pooling="mean").eval()
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    m.save_pretrained(tmp_path / "mt", processing_class=tok)
    files = {p.name for p in (tmp_path / "mt").iterdir()}
    # one transformers folder: backbone.* and heads.* tensors in model.safetensors, everything else in config.json
    assert {"config.json", "model.safetensors"} <= files and not {"heads.safetensors", "multitask_config.json"} & files
    assert "tokenizer_config.json" in files
    assert not any(f.startswith(".tmp") for f in (p.name for p in tmp_path.iterdir()))
    cfg = json.loads((tmp_path / "mt" / "config.json").read_text())
    assert cfg["model_type"] == "hf_atm_multitask" and cfg["architectures"] == ["MultiTaskModel"]
    assert cfg["pooling"] == "mean" and cfg["tasks"]["topic"] == ["movie", "film", "plot"]
    auto = AutoModel.from_pretrained(tmp_path / "mt")  # the Auto classes know the model type
    assert isinstance(auto, MultiTaskModel)
    bb = auto.backbone
    assert torch.equal(bb.embeddings.word_embeddings.weight, m.backbone.embeddings.word_embeddings.weight)
    m2 = MultiTaskModel.from_pretrained(str(tmp_path / "mt")).eval()
    enc = tok(["the movie was good", "a bad plot"], padding=True, return_tensors="pt")
    enc.pop("token_type_ids", None)
    assert torch.equal(m(task="topic", **enc).logits, m2(task="topic", **enc).logits)
    pred = m2.predict("topic", **enc)
    assert len(pred) == 2 and set(pred) <= {"movie", "film", "plot"}
    assert pred == [["movie", "film", "plot"][i] for i in m(task="topic", **enc).logits.argmax(-1).tolist()]


def test_plain_backbone_folder_needs_tasks_and_heads_must_fit(tmp_path):
    tiny_vit().save_pretrained(tmp_path / "merged")
    with pytest.raises(CheckpointError, match="tasks"):
        MultiTaskModel.from_pretrained(tmp_path / "merged")
    m = MultiTaskModel.from_pretrained(tmp_path / "merged", tasks=TASKS)
    assert m.task_names == ["digit", "parity"]
    # heads from a model with a different backbone width do not fit
    other = MultiTaskModel.from_backbone(tiny_vit(hidden_size=16, intermediate_size=32), TASKS)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="does not fit"):
        m.load_heads(tmp_path / "other")
    with pytest.raises(CheckpointError, match="differ"):
        MultiTaskModel.from_pretrained(tmp_path / "other", tasks={"parity": ["odd", "even"]})
    same = MultiTaskModel.from_backbone(tiny_vit(), TASKS, seed=9)
    m.load_heads(same)
    assert torch.equal(m.heads["digit"].weight, same.heads["digit"].weight)


def test_no_pickle_weights_and_bad_task_names(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    tiny_vit().config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors"):
        MultiTaskModel.from_backbone(str(folder), TASKS)
    for bad in ({"a.b": ["x", "y"]}, {"t": ["only"]}, {"t": ["x", "x"]}, {}):
        with pytest.raises(TaskDataError):
            MultiTaskModel.from_backbone(tiny_vit(), bad)


def test_backbone_tensors_dedupe_tied_and_skip_int_buffers():
    m = MultiTaskModel.from_backbone(tiny_bert(), {"sent": ["neg", "pos"]})
    names = m.backbone_tensors()
    assert "embeddings.position_ids" not in names  # int buffer
    assert all(t.is_floating_point() for t in names.values())
    assert len({id(t) for t in names.values()}) == len(names)


# ---------------------------------------------------------------------------------------------- transformers face
T1 = {"sent": ["neg", "pos"]}


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return AutoModel.from_config(GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=2, n_positions=32))


def tiny_clip(folder):
    """A tiny random CLIPModel with its tokenizer saved in `folder` (tests/helpers.save_tiny_clip)."""
    return save_tiny_clip(folder)


def test_config_is_a_registered_pretrained_config():
    assert isinstance(AutoConfig.for_model("hf_atm_multitask", tasks=T1), MultiTaskConfig)
    MultiTaskConfig()  # transformers builds default configs
    cfg = MultiTaskConfig(tasks=T1, pooling="clip", task_metrics={"sent": "f1"})
    assert cfg.normalize_features is True and cfg.task_metrics == {"sent": "f1"}
    assert MultiTaskConfig(tasks={"a": ["x", "y"], "b": ["u", "v"]}).task_metrics == {"a": "accuracy", "b": "accuracy"}
    with pytest.raises(ValueError, match="head_init"):
        MultiTaskConfig(tasks=T1, head_init="magic")
    with pytest.raises(TaskDataError, match="other"):
        MultiTaskConfig(tasks=T1, task_metrics={"other": "f1"})


def test_default_pooling_per_backbone_and_explicit_pooling_wins(tmp_path):
    assert MultiTaskModel.from_backbone(tiny_bert(), T1).pooling == "cls"
    assert MultiTaskModel.from_backbone(tiny_vit(), TASKS).pooling == "cls"
    assert MultiTaskModel.from_backbone(tiny_gpt2(), T1).pooling == "last"
    st = tmp_path / "st"
    tiny_bert().save_pretrained(st)
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (st / "1_Pooling").mkdir()
    pooling_cfg = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
                   "pooling_mode_max_tokens": False}
    (st / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg))
    assert MultiTaskModel.from_backbone(str(st), T1).pooling == "mean"
    assert MultiTaskModel.from_backbone(str(st), T1, pooling="cls").pooling == "cls"
    pooling_cfg.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    (st / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg))
    with pytest.raises(CheckpointError, match="1_Pooling"):
        MultiTaskModel.from_backbone(str(st), T1)
    assert MultiTaskModel.from_backbone(str(st), T1, pooling="mean").pooling == "mean"


def test_last_pooling_takes_the_last_real_token_with_either_padding():
    gpt = tiny_gpt2().eval()
    m = MultiTaskModel.from_backbone(gpt, T1).eval()
    right = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    left = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
    for ids, mask, last in ((right, (right != 0).long(), [2, 4]), (left, (left != 0).long(), [4, 4])):
        assert last_token_index(mask).tolist() == last
        hidden = gpt(input_ids=ids, attention_mask=mask).last_hidden_state
        feats = m.encode(input_ids=ids, attention_mask=mask)
        for row, pos in enumerate(last):
            torch.testing.assert_close(feats[row], hidden[row, pos])


def test_saved_references_are_relative_or_hub_ids_never_absolute(tmp_path):
    bb_dir = tmp_path / "models" / "bert"
    tiny_bert().save_pretrained(bb_dir)
    m = MultiTaskModel.from_backbone(str(bb_dir), T1)
    assert m.backbone_source == str(bb_dir.resolve())
    m.save_pretrained(tmp_path / "runs" / "r1")
    text = (tmp_path / "runs" / "r1" / "config.json").read_text()
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
    cfg = json.loads(text)
    assert cfg["backbone_reference"] == "../../models/bert" and "_name_or_path" not in cfg["backbone_config"]
    assert MultiTaskModel.from_pretrained(tmp_path / "runs" / "r1").backbone_source == str(bb_dir.resolve())
    assert m.backbone_source == str(bb_dir.resolve())  # saving left the in-memory reference as it was
    hub = tiny_bert()
    hub.config.name_or_path = "org/tiny-bert"  # as from_pretrained("org/tiny-bert") leaves it
    MultiTaskModel.from_backbone(hub, T1).save_pretrained(tmp_path / "h")
    assert json.loads((tmp_path / "h" / "config.json").read_text())["backbone_reference"] == "org/tiny-bert"


def test_low_precision_checkpoint_loads_in_float32_unless_asked(tmp_path, caplog):
    tiny_bert().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    with caplog.at_level(logging.INFO, logger="hf_atm.atm.model"):
        m = MultiTaskModel.from_backbone(str(tmp_path / "bf16"), T1)
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    said = [r for r in caplog.records if "bfloat16" in r.getMessage() and "float32" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_atm.atm.model"):
        low = MultiTaskModel.from_backbone(str(tmp_path / "bf16"), T1, dtype="bfloat16")
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert any(r.levelno == logging.WARNING and "pure" in r.getMessage() for r in caplog.records)
    low.save_pretrained(tmp_path / "mt16")
    assert {p.dtype for p in MultiTaskModel.from_pretrained(tmp_path / "mt16").parameters()} == {torch.float32}


def test_label_smoothing_per_head_and_in_mixed_batches():
    m = MultiTaskModel.from_backbone(tiny_vit(), TASKS).eval()
    x = torch.rand(5, 1, 8, 8)
    ids = torch.tensor([0, 1, 1, 0, 1])
    labels = torch.tensor([7, 1, 0, 3, 1])
    eps = 0.1
    out = m(task="digit", pixel_values=x, labels=labels, label_smoothing=eps)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels, label_smoothing=eps))
    assert not torch.allclose(out.loss, m(task="digit", pixel_values=x, labels=labels).loss)
    mixed = m(task_ids=ids, pixel_values=x, labels=labels, label_smoothing=eps)
    d, p = m(task="digit", pixel_values=x).logits, m(task="parity", pixel_values=x).logits
    per = [F.cross_entropy((d if ids[i] == 0 else p)[i : i + 1], labels[i : i + 1], label_smoothing=eps)
           for i in range(5)]
    assert torch.isfinite(mixed.loss)
    torch.testing.assert_close(mixed.loss, torch.stack(per).mean(), rtol=1e-6, atol=1e-6)
    assert find_labels(MultiTaskModel) == ["labels"]  # Trainer's label columns: label_smoothing is none
    # smoothing the padded logits (what Trainer's LabelSmoother would do) gives no usable loss
    padded = F.cross_entropy(mixed.logits, labels, label_smoothing=eps)
    assert not torch.isfinite(padded) or padded > 1e6


def test_task_model_shares_modules_and_loads_with_the_auto_classes(tmp_path):
    m = MultiTaskModel.from_backbone(tiny_vit(), TASKS).eval()
    one = m.task_model("parity")
    assert one.backbone is m.backbone and one.heads["parity"] is m.heads["parity"] and one.task_names == ["parity"]
    assert one.config.id2label == {0: "even", 1: "odd"} and one.config.label2id == {"even": 0, "odd": 1}
    assert m.config.id2label != one.config.id2label  # the multi-task config is left alone
    x = torch.rand(3, 1, 8, 8)
    expected = m(task="parity", pixel_values=x).logits
    assert torch.equal(one(pixel_values=x).logits, expected)  # a single-task model needs no task=
    one.save_pretrained(tmp_path / "one")
    for auto in (AutoModelForImageClassification, AutoModelForSequenceClassification):
        got = auto.from_pretrained(tmp_path / "one").eval()
        assert isinstance(got, MultiTaskModel) and got.config.id2label == {0: "even", 1: "odd"}
        assert torch.equal(got(pixel_values=x).logits, expected)
    with pytest.raises(TaskDataError, match="nope"):
        m.task_model("nope")


def test_set_head_checks_shapes_and_bias():
    m = MultiTaskModel.from_backbone(tiny_vit(), TASKS)
    w, b = torch.randn(2, 32), torch.randn(2)
    m.set_head_("parity", w, b)
    assert torch.equal(m.heads["parity"].weight, w) and torch.equal(m.heads["parity"].bias, b)
    m.set_head_("parity", w)
    assert not m.heads["parity"].bias.any()
    with pytest.raises(CheckpointError, match="parity"):
        m.set_head_("parity", torch.randn(3, 32))
    bb = tiny_vit()
    cosine = MultiTaskModel(MultiTaskModel.config_for(bb, TASKS, "cls", head_bias=False, head_init="prototypes"), bb)
    assert cosine.heads["parity"].bias is None and set(cosine.heads_state_dict()) == {"digit.weight", "parity.weight"}
    with pytest.raises(CheckpointError, match="no bias"):
        cosine.set_head_("parity", w, b)


def test_earlier_format_folders_are_refused_naming_the_folder(tmp_path):
    old = tmp_path / "old"
    tiny_bert().save_pretrained(old)
    save_file({"sent.weight": torch.zeros(2, 32), "sent.bias": torch.zeros(2)}, str(old / "heads.safetensors"))
    (old / "multitask_config.json").write_text(json.dumps({"format": "hf_atm.multitask", "version": 1,
                                                           "pooling": "cls", "tasks": {"sent": {"labels": T1["sent"]}}}))
    m = MultiTaskModel.from_backbone(str(old), T1)  # its backbone still loads as a backbone
    for load in (lambda: MultiTaskModel.from_pretrained(old), lambda: MultiTaskModel.from_pretrained(old, tasks=T1),
                 lambda: m.load_heads(old), lambda: m.load_backbone_weights(old)):
        with pytest.raises(CheckpointError, match="earlier hf_atm format") as e:
            load()
        assert str(old) in str(e.value)


def test_backbone_weights_are_never_reinitialised_and_ties_are_kept(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "bb")
    ref = AutoModel.from_pretrained(tmp_path / "bb").state_dict()
    m = MultiTaskModel.from_backbone(str(tmp_path / "bb"), T1)
    assert all(torch.equal(ref[k], v) for k, v in m.backbone.state_dict().items())
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=20, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    before = {k: v.clone() for k, v in t5.state_dict().items()}
    mt = MultiTaskModel.from_backbone(t5, T1)
    assert all(torch.equal(before[k], v) for k, v in t5.state_dict().items())
    assert mt.all_tied_weights_keys == {"backbone.encoder.embed_tokens.weight": "backbone.shared.weight"}
    assert set(t5._no_split_modules) <= set(mt._no_split_modules)
    mt.save_pretrained(tmp_path / "t5")
    again = MultiTaskModel.from_pretrained(tmp_path / "t5")
    assert again.backbone.encoder.embed_tokens.weight is again.backbone.shared.weight
    assert torch.equal(again.backbone.shared.weight, t5.shared.weight)
    assert torch.equal(again.heads["sent"].weight, mt.heads["sent"].weight)


def test_gradient_checkpointing_reaches_the_backbone():
    m = MultiTaskModel.from_backbone(tiny_bert(), T1)
    assert m.supports_gradient_checkpointing
    m.activation_checkpointing_enable()
    assert m.is_gradient_checkpointing and m.backbone.is_gradient_checkpointing
    m.train()
    ids = torch.tensor([[2, 9, 7, 3]])
    m(input_ids=ids, labels=torch.tensor([1])).loss.backward()
    assert m.backbone.embeddings.word_embeddings.weight.grad is not None


def test_from_clip_saves_references_templates_and_bias_free_heads(tmp_path):
    clip = tiny_clip(tmp_path / "clip")
    m = MultiTaskModel.from_clip(str(clip), {"pets": ["cat", "dog"]}, templates={"pets": ["a photo of a {}."]})
    m.save_pretrained(tmp_path / "run")
    text = (tmp_path / "run" / "config.json").read_text()
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
    cfg = json.loads(text)
    assert cfg["backbone_class"] == "CLIPVisionModelWithProjection" and cfg["pooling"] == "clip"
    assert cfg["head_bias"] is False and cfg["head_init"] == "zero_shot" and cfg["normalize_features"] is True
    assert cfg["backbone_reference"] == cfg["text_tower_reference"] == "../clip"
    assert cfg["clip_templates"] == {"pets": ["a photo of a {}."]}
    again = MultiTaskModel.from_pretrained(tmp_path / "run")
    assert again.config.text_tower_reference == str(clip.resolve()) and again.heads["pets"].bias is None
    assert torch.equal(again.heads["pets"].weight, m.heads["pets"].weight)
    with pytest.raises(TaskDataError, match="dogs"):
        MultiTaskModel.from_clip(str(clip), {"pets": ["cat", "dog"]}, templates={"dogs": ["a {}."]})


def test_one_task_run_folder_answers_pipeline_with_its_label_names(tmp_path):
    """A saved one-task MultiTaskModel: config.json carries id2label, so pipeline() names the real labels and
    agrees with predict."""
    from transformers import pipeline

    assert MultiTaskConfig(tasks=T1).id2label == {0: "neg", 1: "pos"}
    assert MultiTaskConfig(tasks=T1).label2id == {"neg": 0, "pos": 1}
    m = MultiTaskModel.from_backbone(tiny_bert(), T1, pooling="mean").eval()
    with torch.no_grad():
        m.set_head_("sent", torch.randn(m.heads["sent"].weight.shape, generator=torch.Generator().manual_seed(2)))
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    m.save_pretrained(tmp_path / "run", processing_class=tok)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    clf = pipeline("text-classification", model=str(tmp_path / "run"))
    texts = ["the movie was good", "a bad plot", "not very good"]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert [r["label"] for r in clf(texts)] == m.predict("sent", **enc)


def test_saved_clip_vision_with_projection_keeps_it_and_clip_pooling_needs_it(tmp_path):
    """A saved CLIPVisionModelWithProjection folder loads with its projection (clip pooling by default); a
    CLIPVisionModel has none: it defaults to pooler and pooling='clip' is refused before any training."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4, projection_dim=8)
    torch.manual_seed(0)
    with_proj = CLIPVisionModelWithProjection(cfg).eval()
    with_proj.save_pretrained(tmp_path / "proj")
    m = MultiTaskModel.from_backbone(str(tmp_path / "proj"), TASKS).eval()
    assert isinstance(m.backbone, CLIPVisionModelWithProjection) and m.pooling == "clip"
    assert torch.equal(m.backbone.visual_projection.weight, with_proj.visual_projection.weight)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = F.normalize(with_proj(pixel_values=x).image_embeds, dim=-1)
        torch.testing.assert_close(m.encode(pixel_values=x), want)
    CLIPVisionModel(cfg).save_pretrained(tmp_path / "plain")
    plain = MultiTaskModel.from_backbone(str(tmp_path / "plain"), TASKS)
    assert plain.pooling == "pooler" and plain.hidden_size == 16
    with pytest.raises(CheckpointError, match="visual_projection"):
        MultiTaskModel.from_backbone(str(tmp_path / "plain"), TASKS, pooling="clip")


def test_from_backbone_of_a_saved_run_keeps_its_pooling(tmp_path):
    run = MultiTaskModel.from_backbone(tiny_vit(), TASKS, pooling="mean")
    run.config.normalize_features = True
    run.save_pretrained(tmp_path / "run")
    again = MultiTaskModel.from_backbone(str(tmp_path / "run"), {"digit": TASKS["digit"]})
    assert again.pooling == "mean" and again.config.normalize_features is True
    other = MultiTaskModel.from_backbone(str(tmp_path / "run"), TASKS, pooling="cls")  # explicit pooling wins
    assert other.pooling == "cls" and other.config.normalize_features is False


def test_default_pooling_without_cls_token_and_sentence_transformers_objects(tmp_path):
    from transformers import ResNetConfig, SwinConfig

    swin = AutoModel.from_config(SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[1, 1],
                                            num_heads=[1, 2], window_size=2))
    resnet = AutoModel.from_config(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    for backbone, width in ((swin, 16), (resnet, 16)):
        m = MultiTaskModel.from_backbone(backbone, TASKS).eval()
        assert m.pooling == "pooler" and m.hidden_size == width
        assert m(task="digit", pixel_values=torch.randn(2, 3, 16, 16)).logits.shape == (2, 10)
    # a model object loaded from a sentence-transformers folder gets that folder's pooling
    st = tmp_path / "st"
    tiny_bert().save_pretrained(st)
    (st / "modules.json").write_text(json.dumps([
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert MultiTaskModel.from_backbone(AutoModel.from_pretrained(st), T1).pooling == "mean"


def test_blank_label_names_are_refused_like_clip_class_names():
    for bad in ({"t": ["x", " "]}, {"t": ["x", ""]}):
        with pytest.raises(TaskDataError, match="empty"):
            MultiTaskModel.from_backbone(tiny_vit(), bad)
        with pytest.raises(TaskDataError, match="empty"):
            MultiTaskConfig(tasks=bad)


def test_low_precision_clip_checkpoint_says_it_loads_in_float32(tmp_path, caplog):
    from transformers import CLIPModel

    folder = tiny_clip(tmp_path / "clip")
    CLIPModel.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
    with caplog.at_level(logging.INFO, logger="hf_atm.atm.model"):
        m = MultiTaskModel.from_clip(str(folder), {"pets": ["cat", "dog"]})
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    said = [r for r in caplog.records if "bfloat16" in r.getMessage() and "float32" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
