"""One task of a multi-task model out as a standard model folder (``MultiTaskModel.export_task``, ``hf-atm export``).

Three forms, chosen per task (``format="auto"``), each with the task's ``id2label`` / ``label2id``, the
tokenizer or processor, and a model card (README.md):

* **native classifier**: a backbone + pooling + linear head that a transformers ``*For*Classification`` class
  computes exactly (:data:`NATIVE_CLASSIFIERS`: ``ViTModel`` with ``cls`` pooling ->
  ``ViTForImageClassification``; ``BertModel`` with ``pooler`` pooling -> ``BertForSequenceClassification``),
  on features that are not L2-normalised. A plain transformers install loads it; the export runs both models on
  one probe batch and refuses when their logits differ.
* **CLIP** (``clip`` pooling): a ``CLIPModel`` folder with the tuned vision tower and visual projection, the
  ORIGINAL text tower, projection and ``logit_scale`` (from ``config.text_tower_reference`` or `clip_source`),
  and a ``CLIPProcessor``, for ``pipeline("zero-shot-image-classification")``. Faithful only while the task's
  head is still the zero-shot head of that text tower (checked); with one template the pipeline, given the
  class names and that template, predicts what the multi-task model predicts. A head that is not (made by
  another head protocol, or trained since) goes out as the package's own class under ``format="auto"`` and
  is refused under ``format="native"``.
* **the package's own class** (otherwise, or ``format="hf_atm"``): ``model.task_model(task).save_pretrained``,
  a single-task ``MultiTaskModel`` registered with ``AutoModelForSequenceClassification`` /
  ``AutoModelForImageClassification``: after :data:`REGISTER_LINE`, ``pipeline("text-classification")`` /
  ``pipeline("image-classification")`` predict what ``MultiTaskModel.predict`` predicts.

The folder is written to a temporary sibling and moved into place (:mod:`hf_atm.files`): nothing half-written
is ever visible. No absolute local path and no token is written into it. This module does not import
:mod:`hf_atm.atm.model`: it receives the model and uses its public API only.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_atm.atm.problems import is_regression
from hf_atm.errors import CheckpointError, HfAtmError, OutputExistsError, TaskDataError
from hf_atm.files import atomic_write_dir, replace_dir

__all__ = [
    "EXPORT_FORMATS",
    "NATIVE_CLASSIFIERS",
    "REGISTER_LINE",
    "NativeClassifier",
    "check_output",
    "check_task",
    "export_kind",
    "export_task",
    "load_processing_class",
]

#: The line that makes transformers' Auto classes know the package's model class (the package root loads lazily:
#: this attribute imports hf_atm.atm.model, which registers it); the export card shows it.
REGISTER_LINE = "from hf_atm import MultiTaskModel  # registers hf_atm's model class with the transformers Auto classes"

#: ``format=`` values: ``auto`` (native or CLIP when faithful, else the package's class: e.g. a CLIP task whose
#: head is no longer its zero-shot head), ``native`` (refuse when no plain-transformers form is faithful),
#: ``hf_atm`` (always the package's own class).
EXPORT_FORMATS = ("auto", "native", "hf_atm")

_log = logging.getLogger(__name__)


class _NotFaithful(CheckpointError):
    """A CLIPModel would not reproduce the task (``format="auto"`` then writes the package's own class)."""


@dataclass(frozen=True)
class NativeClassifier:
    """A transformers classification class that computes ``head(pool(backbone(x)))`` exactly.

    ``backbone_class`` / ``pooling``: the multi-task model's backbone class name and pooling it matches;
    ``model_class``: the transformers class written; ``prefix``: its backbone attribute (state-dict prefix);
    ``pipeline_tag``: the pipeline that serves it. Its classifier is the ``classifier`` ``nn.Linear``.
    """

    backbone_class: str
    pooling: str
    model_class: str
    prefix: str
    pipeline_tag: str


#: Backbone + pooling -> the native class that reproduces it (dropout is off in eval mode, the pipelines' mode).
NATIVE_CLASSIFIERS: tuple[NativeClassifier, ...] = (
    # ViTForImageClassification: classifier(layernormed last_hidden_state[:, 0]) -- the "cls" pooling.
    NativeClassifier("ViTModel", "cls", "ViTForImageClassification", "vit", "image-classification"),
    # BertForSequenceClassification: classifier(dropout(pooler_output)) -- the "pooler" pooling.
    NativeClassifier("BertModel", "pooler", "BertForSequenceClassification", "bert", "text-classification"),
)


@dataclass(frozen=True)
class _Written:
    """What a writer put into the export folder (the card describes it)."""

    model_class: str  # the class config.json names
    pipeline: str  # the pipeline task that serves the folder
    native: bool  # a plain transformers install loads it (library_name transformers, pipeline_tag set)
    processor: bool  # everything the pipeline needs to preprocess was saved (tokenizer / image processor)
    templates: tuple[str, ...] = ()  # CLIP: the head's prompt templates
    clip_reference: str | None = None  # CLIP: where the text tower came from

    @property
    def auto_class(self) -> str:
        """The transformers Auto class that loads the folder with its head."""
        return {"image-classification": "AutoModelForImageClassification",
                "text-classification": "AutoModelForSequenceClassification"}.get(self.pipeline, "AutoModel")


# ------------------------------------------------------------------------------------------------ choosing
def _config_value(model: Any, name: str, default: Any = None) -> Any:
    """``model.config.<name>``, `default` when the model or its config lacks it."""
    return getattr(getattr(model, "config", None), name, default)


def _native_for(model: Any) -> NativeClassifier | None:
    """The entry of :data:`NATIVE_CLASSIFIERS` for the model's backbone class and pooling, or None."""
    name = type(model.backbone).__name__
    return next((n for n in NATIVE_CLASSIFIERS if n.backbone_class == name and n.pooling == model.pooling), None)


def check_task(tasks: Any, task: str) -> None:
    """TaskDataError naming `task` and the model's `tasks` (a mapping or list of names) when it is not one."""
    if task not in tasks:
        raise TaskDataError(
            f"cannot export task {task!r}: the model has no such task (its tasks: {', '.join(tasks)})"
        )


def check_output(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """`out_dir` as a Path; OutputExistsError when it is a file, or a non-empty folder and not `overwrite`."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} exists and is not empty; choose another folder or overwrite it "
                                "(overwrite=True, --overwrite)")
    return out


def export_kind(model: Any, task: str, format: str = "auto") -> str:
    """The form :func:`export_task` writes for `task`: ``"native"``, ``"clip"`` or ``"hf_atm"``.

    Raises TaskDataError naming `task` and the model's tasks when it has no such task, HfAtmError for an
    unknown `format`, and CheckpointError with the reason when ``format="native"`` and no plain-transformers
    form reproduces the task (e.g. mean pooling, or normalised features). A CLIP task: ``"clip"`` under
    ``native``, and under ``auto`` when its head was made by the zero-shot protocol (whether it still is that
    head is checked when writing: :func:`export_task` then falls back to the package's class under ``auto``);
    a head of another protocol (linear probe, prototypes, random) is ``"hf_atm"`` under ``auto``.
    """
    if format not in EXPORT_FORMATS:
        raise HfAtmError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    check_task(model.tasks, task)
    if format == "hf_atm":
        return "hf_atm"
    if model.pooling == "clip":
        zero_shot = _config_value(model, "head_init") == "zero_shot"
        return "clip" if format == "native" or zero_shot else "hf_atm"
    reason = None
    native = _native_for(model)
    if is_regression(model.config, task):
        # the native writers copy class labels; the package's class keeps problem_type="regression"
        reason = "it is a regression task (one output), which the native export does not write"
    elif native is None:
        reason = (f"no transformers classification class computes a {type(model.backbone).__name__} with "
                  f"{model.pooling!r} pooling and a linear head")
    elif _config_value(model, "normalize_features", False):
        reason = "the heads read L2-normalised features, which no transformers classification head does"
    if reason is None:
        return "native"
    if format == "native":
        raise CheckpointError(f"cannot export task {task!r} as a plain transformers model: {reason}; "
                              "export it as the package's own class instead (format='hf_atm')")
    return "hf_atm"


# ------------------------------------------------------------------------------------------------ helpers
def _labels(model: Any, task: str) -> list[str]:
    return [str(x) for x in model.tasks[task]]


def _label_maps(labels: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    return {i: x for i, x in enumerate(labels)}, {x: i for i, x in enumerate(labels)}


def _param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu") for k, v in module.state_dict().items()}


def _probe_inputs(model: Any, batch: int = 2) -> dict[str, torch.Tensor]:
    """A seeded random batch the backbone accepts (pixels, or token ids with a full attention mask)."""
    config = model.backbone.config
    g = torch.Generator().manual_seed(0)
    if model.backbone.main_input_name == "pixel_values":
        size = getattr(config, "image_size", 224)
        shape = (batch, int(getattr(config, "num_channels", 3)), *(
            (size, size) if isinstance(size, int) else tuple(size)))
        return {"pixel_values": torch.randn(shape, generator=g)}
    vocab = int(getattr(config, "vocab_size", 100))
    ids = torch.randint(0, vocab, (batch, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _task_logits(model: Any, task: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The multi-task model's logits for `task` on `inputs` (eval mode, its mode restored)."""
    was_training = model.training
    model.eval()
    try:
        device = _param(model).device
        return model(task=task, **{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()
    finally:
        model.train(was_training)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal up to `dtype`'s rounding (relative to the largest magnitude)."""
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    return a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, float(a.abs().max())))


# ------------------------------------------------------------------------------------------------ native
def _build_native(model: Any, task: str, native: NativeClassifier) -> nn.Module:
    """The native classifier of `task`: the backbone's weights under ``native.prefix``, the head as
    ``classifier``, on CPU in the backbone's dtype, eval mode. CheckpointError when the weights do not fit or
    the logits on a probe batch differ from the multi-task model's."""
    import transformers

    labels = _labels(model, task)
    config = copy.deepcopy(model.backbone.config)
    config.id2label, config.label2id = _label_maps(labels)
    config.problem_type = "single_label_classification"
    config.architectures = [native.model_class]
    dtype = _param(model.backbone).dtype
    out = getattr(transformers, native.model_class)(config).to(dtype).eval()
    body = getattr(out, native.prefix)
    state = _cpu_state(model.backbone)
    wanted = set(body.state_dict())
    extra = sorted(k for k in state if k not in wanted)
    if any(not k.startswith("pooler.") for k in extra):  # ViT's classifier has no pooler: only that may go
        raise CheckpointError(f"cannot export task {task!r} as {native.model_class}: backbone tensors "
                              f"{extra[:3]} have no place in it")
    try:
        body.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"cannot export task {task!r} as {native.model_class}: {e}") from e
    head = model.heads[task]
    with torch.no_grad():
        out.classifier.weight.copy_(head.weight.detach().cpu())
        bias = head.bias if head.bias is not None else torch.zeros(len(labels))
        out.classifier.bias.copy_(bias.detach().cpu())
    probe = _probe_inputs(model)
    with torch.no_grad():
        got = out(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in probe.items()}).logits.float()
    if not _close(got, _task_logits(model, task, probe), dtype):
        raise CheckpointError(f"cannot export task {task!r} as {native.model_class}: its logits differ from the "
                              "multi-task model's on a probe batch; export it with format='hf_atm'")
    return out


def _write_native(model: Any, task: str, folder: Path, processing_class: Any) -> _Written:
    native = _native_for(model)
    assert native is not None  # export_kind chose "native"
    _build_native(model, task, native).save_pretrained(folder, safe_serialization=True)
    if processing_class is not None:
        processing_class.save_pretrained(folder)
    return _Written(native.model_class, native.pipeline_tag, native=True, processor=processing_class is not None)


# ------------------------------------------------------------------------------------------------ CLIP
def _templates(model: Any, task: str) -> list[str]:
    from hf_atm.atm.clip import DEFAULT_TEMPLATES, check_templates

    saved = _config_value(model, "clip_templates") or {}
    return check_templates(saved.get(task) or list(DEFAULT_TEMPLATES), task)


def _image_processor(processing_class: Any, clip_folder: Path) -> Any | None:
    """The image processor for the CLIP folder: the one given (or inside the processor given), else the
    original checkpoint's, else None."""
    from transformers.image_processing_base import ImageProcessingMixin

    source = processing_class if processing_class is not None else load_processing_class(clip_folder)
    found = getattr(source, "image_processor", source)
    return found if isinstance(found, ImageProcessingMixin) else None


def _write_clip(model: Any, task: str, folder: Path, processing_class: Any, clip_source: str | os.PathLike | None,
                token: str | bool | None) -> _Written:
    """A CLIPModel folder for `task` (see the module docstring); CheckpointError when it would not be faithful."""
    from transformers import CLIPProcessor

    from hf_atm.atm.clip import load_clip, zero_shot_weights

    # config.text_tower_reference is a Hub id or an absolute folder in memory (from_pretrained resolved it)
    ref = str(clip_source) if clip_source is not None else _config_value(model, "text_tower_reference")
    if not ref:
        raise _NotFaithful(f"cannot export CLIP task {task!r}: the model does not say where its text tower "
                           "comes from (config.text_tower_reference); pass clip_source= (--clip-source)")
    backbone = model.backbone
    clip, tokenizer, clip_folder = load_clip(ref, token=token, dtype=_param(backbone).dtype)
    try:
        clip.vision_model.load_state_dict(backbone.vision_model.state_dict(), strict=True)
        clip.visual_projection.load_state_dict(backbone.visual_projection.state_dict(), strict=True)
    except (AttributeError, RuntimeError) as e:
        raise CheckpointError(f"cannot export CLIP task {task!r}: the tuned vision tower does not fit the CLIP "
                              f"checkpoint {ref}: {e}") from e
    labels, templates = _labels(model, task), _templates(model, task)
    head = model.heads[task]
    expected = zero_shot_weights(clip, tokenizer, labels, templates, task=task)
    has_bias = head.bias is not None and bool(head.bias.detach().abs().max() > 0)
    if has_bias or not _close(head.weight.detach().float().cpu(), expected.float().cpu(), expected.dtype):
        raise _NotFaithful(
            f"cannot export CLIP task {task!r} as a CLIPModel: its head is no longer the zero-shot head of the "
            f"text tower of {ref} for the templates {templates} (trained heads cannot be carried by the text "
            "tower); export it as the package's own class instead (format='hf_atm')")
    clip.config.id2label, clip.config.label2id = _label_maps(labels)
    clip.save_pretrained(folder, safe_serialization=True)
    image_processor = _image_processor(processing_class, clip_folder)
    if image_processor is None:  # none given, none in the CLIP checkpoint: the card says so
        tokenizer.save_pretrained(folder)
    else:
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return _Written("CLIPModel", "zero-shot-image-classification", native=True,
                    processor=image_processor is not None, templates=tuple(templates), clip_reference=ref)


# ------------------------------------------------------------------------------------------------ own class
def _write_own(model: Any, task: str, folder: Path, processing_class: Any) -> _Written:
    single = model.task_model(task)
    for key in ("backbone_reference", "text_tower_reference"):  # a copy of the config: the model keeps its own
        setattr(single.config, key, _hub_reference(getattr(single.config, key)))
    single.save_pretrained(folder)
    if processing_class is not None:
        processing_class.save_pretrained(folder)
    tag = "image-classification" if model.backbone.main_input_name == "pixel_values" else "text-classification"
    return _Written(type(single).__name__, tag, native=False, processor=processing_class is not None)


# ------------------------------------------------------------------------------------------------ card
def _hub_reference(ref: str | None) -> str | None:
    """`ref` as an exported folder may name it: a Hub reference as is (``org/name[@rev]``), a Hugging Face cache
    snapshot as its repo id, None for any other local folder (:func:`hf_atm.hub.resolve.hub_id_of`)."""
    from hf_atm.hub.resolve import hub_id_of, split_revision

    repo = hub_id_of(ref)
    if repo is None or ref is None:
        return None
    try:
        return ref if split_revision(ref)[0] == repo else repo
    except HfAtmError:  # a path with an "@" in it: the snapshot's repo id
        return repo


def _use_snippet(written: _Written, labels: Sequence[str]) -> list[str]:
    """The card's "Use" code: the pipeline that serves the folder (after the registering import if needed)."""
    where = 'model="path/or/repo-of-this-model"'
    if written.model_class == "CLIPModel":
        return ["from transformers import pipeline",
                f'classifier = pipeline("{written.pipeline}", {where})',
                f"classifier(image, candidate_labels={list(labels)!r},",
                f"           hypothesis_template={written.templates[0]!r})"]
    register = [] if written.native else [REGISTER_LINE]
    if not written.processor:
        # no tokenizer / image processor in the folder: pipeline() cannot load, so show the model on its inputs
        return [*register, f"from transformers import {written.auto_class}",
                f"model = {written.auto_class}.from_pretrained({where[len('model='):]})",
                "logits = model(**inputs).logits  # inputs prepared as for training (no processor was saved)",
                "label = model.config.id2label[int(logits[0].argmax())]"]
    arg = "image" if written.pipeline == "image-classification" else '"some text"'
    return [*register, "from transformers import pipeline",
            f'classifier = pipeline("{written.pipeline}", {where})', f"classifier({arg})"]


def _clip_lines(written: _Written, clip_repo: str | None) -> list[str]:
    templates = written.templates
    source = f" ([{clip_repo}](https://huggingface.co/{clip_repo}))" if clip_repo else ""
    lines = [
        "The vision tower and visual projection are the tuned ones; the text tower, text projection and "
        f"`logit_scale` are the original CLIP's{source}. The task's head is the zero-shot head of that text tower "
        f"for the class names above and the template{'s' if len(templates) > 1 else ''}: "
        + ", ".join(f"`{t}`" for t in templates) + ".",
        "With this one template, the zero-shot pipeline given these class names predicts what the multi-task "
        "model predicts." if len(templates) == 1 else
        "The head averages the normalised text embeddings over these templates; the pipeline takes one "
        "template, so it approximates the head (embed every template and average for the exact head).",
        "",
    ]
    return lines


def _card_text(model: Any, task: str, written: _Written) -> str:
    """The exported folder's README.md: metadata claiming only what this folder serves, and how to use it."""
    from huggingface_hub import ModelCard, ModelCardData

    from hf_atm.hub.resolve import hub_id_of
    from hf_atm.version import __version__

    labels = _labels(model, task)
    backbone_repo, clip_repo = hub_id_of(model), hub_id_of(written.clip_reference)
    repo_ids = list(dict.fromkeys(r for r in (backbone_repo, clip_repo) if r))
    data = ModelCardData(library_name="transformers" if written.native else "hf_atm", base_model=repo_ids or None,
                         tags=["hf_atm", "atm", "multi-task"])
    if written.native and written.processor:  # a pipeline_tag only where pipeline() loads the folder as it is
        data["pipeline_tag"] = written.pipeline
    head_init = _config_value(model, "head_init")
    lines = [
        f"# Task `{task}` exported from a hf_atm multi-task model",
        "",
        f"One task of a multi-task model (ATM: a shared backbone, one head per task), written by hf_atm "
        f"{__version__} as a `{written.model_class}` folder. Backbone `{type(model.backbone).__name__}`, pooling "
        f"`{model.pooling}`" + (f", head protocol `{head_init}`" if head_init else "")
        + f"; {len(labels)} labels (class ids in this order): " + ", ".join(f"`{x}`" for x in labels) + ".",
        "",
    ]
    if written.model_class == "CLIPModel":
        lines += _clip_lines(written, clip_repo)
    if not written.processor:
        lines += ["No tokenizer / image processor was saved with this model, so `pipeline()` cannot load it as it "
                  "is: call the model on inputs prepared as for training (below), or save the processor into this "
                  "folder (its `save_pretrained`) to use a pipeline.", ""]
    if not written.native:
        lines += [f"The model class is the package's own, registered with `{written.auto_class}`: install hf_atm "
                  f"and run `{REGISTER_LINE.split('  #')[0]}` before loading it.", ""]
    lines += ["## Use", "", "```python", *_use_snippet(written, labels), "```", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


# ------------------------------------------------------------------------------------------------ entry
def export_task(
    model: Any,
    task: str,
    out_dir: str | os.PathLike,
    processing_class: Any | None = None,
    push_to_hub: str | None = None,
    token: str | bool | None = None,
    *,
    overwrite: bool = False,
    format: str = "auto",
    clip_source: str | os.PathLike | None = None,
) -> Path:
    """Write `task` of the multi-task `model` as a standard model folder `out_dir`; return its path.

    The form (native transformers classifier, CLIPModel, or the package's own class) is chosen as the module
    docstring says (`format`: one of :data:`EXPORT_FORMATS`). `processing_class` (tokenizer, image processor
    or processor) is saved with it. `clip_source`: where the original CLIP comes from (local folder or Hub id),
    instead of ``config.text_tower_reference`` (a Hub id, or a path relative to the folder the model was
    loaded from). `push_to_hub`: a Hub repo id the finished folder is uploaded to
    (:func:`hf_atm.hub.push.push_folder`, with `token`).

    Refused, with `out_dir` left as it was: an unknown task (TaskDataError naming it and the model's tasks,
    checked first), a non-empty `out_dir` without `overwrite` (OutputExistsError), an export that would not
    reproduce the model (CheckpointError with the reason; under ``format="auto"`` a CLIP task whose head is not
    its zero-shot head is written as the package's own class instead, with a warning). The folder appears complete or not at all; with
    `overwrite` it then holds exactly the export (stale files of an earlier one removed).
    """
    kind = export_kind(model, task, format)
    out = check_output(out_dir, overwrite)

    def write(folder: Path) -> None:
        if kind == "native":
            written = _write_native(model, task, folder, processing_class)
        elif kind == "clip":
            try:
                written = _write_clip(model, task, folder, processing_class, clip_source, token)
            except _NotFaithful as e:  # raised before anything is written into `folder`
                if format != "auto":
                    raise
                _log.warning("%s: writing it as the package's own class", e)
                written = _write_own(model, task, folder, processing_class)
        else:
            written = _write_own(model, task, folder, processing_class)
        if not written.processor:
            _log.warning("export of task %r: no tokenizer / image processor saved; the pipeline needs it", task)
        (folder / "README.md").write_text(_card_text(model, task, written), encoding="utf-8")

    (replace_dir if out.exists() else atomic_write_dir)(out, write)
    _log.info("exported task %r as %s", task, out.name)
    if push_to_hub:
        from hf_atm.hub.push import push_folder

        push_folder(out, push_to_hub, token=token if isinstance(token, str) else None)
    return out


def load_processing_class(folder: str | os.PathLike) -> Any | None:
    """The tokenizer / image processor / processor saved in a model folder, or None when it holds none.

    A processor (``processor_config.json``) or image processor (``preprocessor_config.json``) wins over a
    tokenizer alone; remote code is never run. CheckpointError naming the folder when the files do not load.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    folder = Path(folder)
    try:
        if (folder / "processor_config.json").is_file():
            return AutoProcessor.from_pretrained(folder, trust_remote_code=False)
        if (folder / "preprocessor_config.json").is_file():
            return AutoImageProcessor.from_pretrained(folder, trust_remote_code=False)
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, HfAtmError) as e:
        raise CheckpointError(f"cannot load the tokenizer / processor saved in {folder}: {e}") from e
    return None
