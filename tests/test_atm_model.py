"""MultiTaskModel: heads per task, pooling, mixed batches, save / load, prediction, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from scripts.atm_data import TASK_LABELS, tiny_vit
from transformers import AutoModel, BertConfig, BertTokenizer

from hf_atm.atm import MultiTaskModel
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
    for pooling in ("cls", "mean", "pooler"):
        m = MultiTaskModel(bb, {"sent": ["neg", "pos"]}, pooling=pooling).eval()
        assert m(task="sent", input_ids=ids, attention_mask=mask).logits.shape == (2, 2)
    m = MultiTaskModel(bb, {"sent": ["neg", "pos"]}, pooling="mean").eval()
    hidden = bb(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = hidden[0, :4].mean(0)  # padding excluded from the mean
    assert torch.allclose(m.encode(input_ids=ids, attention_mask=mask)[0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        MultiTaskModel(bb, {"sent": ["neg", "pos"]}, pooling="max")


def test_save_load_roundtrip_predict_and_automodel(tmp_path):
    m = MultiTaskModel.from_backbone(tiny_bert(), {"sent": ["neg", "pos"], "topic": ["movie", "film", "plot"]},
                                     pooling="mean").eval()
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    m.save_pretrained(tmp_path / "mt", processing_class=tok)
    files = {p.name for p in (tmp_path / "mt").iterdir()}
    assert {"config.json", "model.safetensors", "heads.safetensors", "multitask_config.json"} <= files
    assert "tokenizer_config.json" in files
    assert not any(f.startswith(".tmp") for f in (p.name for p in tmp_path.iterdir()))
    cfg = json.loads((tmp_path / "mt" / "multitask_config.json").read_text())
    assert cfg["pooling"] == "mean" and cfg["tasks"]["topic"]["id2label"] == {"0": "movie", "1": "film", "2": "plot"}
    bb = AutoModel.from_pretrained(tmp_path / "mt")
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
