"""MultiTaskModel: one shared backbone (any ``AutoModel``) and one linear classification head per task.

Only the backbone is merged by ATM; each head belongs to its task (trained during that task's fine-tuning).

On disk (``save_pretrained``) a MultiTaskModel is a normal backbone folder that ``AutoModel.from_pretrained``
loads (``config.json`` + ``model.safetensors``) with two extra files beside it:

* ``heads.safetensors``: tensors ``"{task}.weight"`` (num_labels x hidden) and ``"{task}.bias"``;
* ``multitask_config.json``: ``{"format": "hf_atm.multitask", "version": 1, "pooling": ...,
  "tasks": {task: {"labels": [...], "id2label": {"0": ...}}}, "base_model": ...}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_atm.errors import CheckpointError, TaskDataError
from hf_atm.files import atomic_write_dir

__all__ = ["HEADS_FILE", "MULTITASK_CONFIG_FILE", "POOLINGS", "MultiTaskModel"]

HEADS_FILE = "heads.safetensors"
MULTITASK_CONFIG_FILE = "multitask_config.json"
POOLINGS = ("cls", "mean", "pooler")
_FORMAT = "hf_atm.multitask"


def _hidden_size(config: Any) -> int:
    """The width of the backbone's output features, from the usual config attributes."""
    for attr in ("hidden_size", "d_model", "dim", "embed_dim"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    raise CheckpointError(f"cannot tell the hidden size of backbone config {type(config).__name__}")


def _check_task_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or "/" in name or name.strip() != name:
        raise TaskDataError(
            f"task name {name!r} is invalid: use a non-empty name without '.', '/' or surrounding spaces"
        )


def _normalize_tasks(tasks: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    if not isinstance(tasks, Mapping) or not tasks:
        raise TaskDataError("tasks must be a non-empty mapping {task name: [label names]}")
    out: dict[str, list[str]] = {}
    for name, labels in tasks.items():
        _check_task_name(name)
        labels = [str(x) for x in labels]
        if len(labels) < 2:
            raise TaskDataError(f"task {name!r} needs at least 2 label names, got {labels}")
        if len(set(labels)) != len(labels):
            raise TaskDataError(f"task {name!r} has duplicate label names: {labels}")
        out[name] = labels
    return out


class MultiTaskModel(nn.Module):
    """A shared backbone with one linear head per task.

    ``forward(task=..., labels=..., **backbone_inputs)`` runs the backbone, pools its output (``"cls"``: first
    token; ``"mean"``: mean over positions, masked by ``attention_mask`` when given; ``"pooler"``: the
    backbone's ``pooler_output``) and applies the head of `task`; the loss is the mean cross entropy.
    ``forward(task_ids=..., ...)`` instead routes each example to the head of ``task_names[task_ids[j]]``
    (mixed batches for joint training); logits are then padded to the widest head with the dtype's minimum
    (softmax weight 0) and the loss is the mean over the batch of each example's own cross entropy.
    """

    # The Trainer must not pass ``num_items_in_batch``: the loss is a per-batch mean, scaled for gradient
    # accumulation by the Trainer itself.
    accepts_loss_kwargs = False

    def __init__(
        self,
        backbone: PreTrainedModel,
        tasks: Mapping[str, Iterable[str]],
        pooling: str = "cls",
        *,
        seed: int = 0,
        base_model: str | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a transformers model, got {type(backbone).__name__}")
        self.backbone = backbone
        self.pooling = pooling
        self.tasks: dict[str, list[str]] = _normalize_tasks(tasks)
        self.base_model = base_model
        self.hidden_size = _hidden_size(backbone.config)
        self.heads = nn.ModuleDict()
        for name in self.tasks:
            self.heads[name] = self._new_head(name, seed)

    # -- construction
    def _new_head(self, task: str, seed: int) -> nn.Linear:
        """A head for `task` initialised N(0, initializer_range) / zero bias from a generator seeded by
        ``(seed, task)``: the same head whatever the global RNG state or process."""
        from hf_atm.merging.spec import tensor_seed

        p = next(self.backbone.parameters())
        head = nn.Linear(self.hidden_size, len(self.tasks[task]))
        std = float(getattr(self.backbone.config, "initializer_range", 0.02) or 0.02)
        g = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, f"head/{task}"))
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
            head.bias.zero_()
        return head.to(device=p.device, dtype=p.dtype)

    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike | PreTrainedModel,
        tasks: Mapping[str, Iterable[str]],
        pooling: str = "cls",
        *,
        seed: int = 0,
        token: str | bool | None = None,
    ) -> MultiTaskModel:
        """A MultiTaskModel with fresh heads (seeded by ``(seed, task)``) on `backbone`.

        `backbone` is a model object, or a local folder / Hub repo id (``org/name@rev``) loaded with
        ``AutoModel.from_pretrained`` from safetensors only, remote code off. A folder with task heads is
        loaded backbone-only (use :meth:`from_pretrained` to keep the heads).
        """
        base_model = None
        if not isinstance(backbone, nn.Module):
            base_model = str(backbone)
            backbone = _load_backbone(backbone, token=token)
        else:
            base_model = getattr(getattr(backbone, "config", None), "_name_or_path", None) or None
        return cls(backbone, tasks, pooling, seed=seed, base_model=base_model)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        tasks: Mapping[str, Iterable[str]] | None = None,
        pooling: str | None = None,
        seed: int = 0,
        token: str | bool | None = None,
    ) -> MultiTaskModel:
        """Load a saved MultiTaskModel (backbone + ``heads.safetensors`` + ``multitask_config.json``).

        A plain model folder (e.g. an ``hf-atm merge`` output) has no heads: then `tasks` is required and
        fresh heads are made (``pooling`` defaults to ``"cls"``). With heads present, a `tasks` argument must
        name the same tasks and labels (CheckpointError otherwise). Only safetensors are read.
        """
        from hf_atm.hub.resolve import resolve_model

        folder = resolve_model(path_or_repo_id, token=token)
        cfg_path = folder / MULTITASK_CONFIG_FILE
        backbone = _load_backbone(folder)
        if not cfg_path.is_file():
            if tasks is None:
                raise CheckpointError(
                    f"{folder} has no {MULTITASK_CONFIG_FILE} (no task heads): pass tasks={{name: labels}} "
                    "to build fresh heads on this backbone"
                )
            return cls(backbone, tasks, pooling or "cls", seed=seed, base_model=str(path_or_repo_id))
        try:
            meta = json.loads(cfg_path.read_text())
            saved = {t: list(v["labels"]) for t, v in meta["tasks"].items()}
            saved_pooling = meta["pooling"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{cfg_path}: not a valid {_FORMAT} config ({e})") from e
        if tasks is not None and _normalize_tasks(tasks) != saved:
            raise CheckpointError(
                f"{folder}: saved tasks {saved} differ from the requested tasks {_normalize_tasks(tasks)}"
            )
        if pooling is not None and pooling != saved_pooling:
            raise CheckpointError(f"{folder}: saved pooling {saved_pooling!r} differs from {pooling!r}")
        model = cls(backbone, saved, saved_pooling, seed=seed, base_model=meta.get("base_model"))
        model.load_heads(folder)
        return model

    # -- heads
    def load_heads(self, source: str | os.PathLike | MultiTaskModel, tasks: Iterable[str] | None = None) -> None:
        """Copy the heads of `tasks` (default: all of this model's) from a MultiTaskModel or a saved folder.

        Raises CheckpointError naming the task when the source lacks it, or when its head's shape (labels,
        hidden size) or label names differ: the heads must come from a model of the same backbone width.
        """
        names = list(self.tasks) if tasks is None else list(tasks)
        if isinstance(source, MultiTaskModel):
            state = {f"{t}.{k}": v for t in source.heads for k, v in source.heads[t].state_dict().items()}
            labels = source.tasks
            where = "the source model"
        else:
            folder = Path(source)
            heads_path = folder / HEADS_FILE
            if not heads_path.is_file():
                raise CheckpointError(f"{heads_path} is missing")
            try:
                state = load_file(str(heads_path))
                labels = {
                    t: list(v["labels"])
                    for t, v in json.loads((folder / MULTITASK_CONFIG_FILE).read_text())["tasks"].items()
                }
            except Exception as e:  # safetensors / json errors: name the file
                raise CheckpointError(f"cannot read heads from {folder}: {e}") from e
            where = str(folder)
        for t in names:
            if t not in self.heads:
                raise CheckpointError(f"task {t!r} has no head in this model")
            if t not in labels or f"{t}.weight" not in state or f"{t}.bias" not in state:
                raise CheckpointError(f"{where} has no head for task {t!r}")
            if labels[t] != self.tasks[t]:
                raise CheckpointError(
                    f"task {t!r}: head labels {labels[t]} in {where} differ from {self.tasks[t]}"
                )
            head = self.heads[t]
            w, b = state[f"{t}.weight"], state[f"{t}.bias"]
            if tuple(w.shape) != tuple(head.weight.shape) or tuple(b.shape) != tuple(head.bias.shape):
                raise CheckpointError(
                    f"task {t!r}: head weight {tuple(w.shape)} in {where} does not fit this backbone's "
                    f"head {tuple(head.weight.shape)} (different backbone width or label count)"
                )
            with torch.no_grad():
                head.weight.copy_(w)
                head.bias.copy_(b)

    @property
    def task_names(self) -> list[str]:
        """Task names in insertion order (the order of ``task_ids``)."""
        return list(self.tasks)

    # -- forward
    def _cast_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # datasets hand floats over as float32: cast pixel_values / inputs_embeds to the backbone's dtype
        # (float64 in exact tests, bfloat16 for half-precision backbones).
        dtype = next(self.backbone.parameters()).dtype
        return {
            k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "attention_mask" else v
            for k, v in inputs.items()
        }

    def encode(self, **backbone_inputs: Any) -> torch.Tensor:
        """The pooled backbone features, shape (batch, hidden_size)."""
        out = self.backbone(**self._cast_inputs(backbone_inputs), return_dict=True)
        if self.pooling == "pooler":
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                raise ValueError("pooling='pooler' but the backbone returned no pooler_output")
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = backbone_inputs.get("attention_mask")
        if mask is None or hidden.dim() != 3 or mask.shape[:2] != hidden.shape[:2]:
            return hidden.mean(dim=1)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(
        self,
        task: str | None = None,
        labels: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        **backbone_inputs: Any,
    ) -> SequenceClassifierOutput:
        """Logits of `task`'s head (or per-example heads from `task_ids`) and, given `labels`, the loss."""
        backbone_inputs.pop("num_items_in_batch", None)
        backbone_inputs.pop("return_dict", None)
        if (task is None) == (task_ids is None):
            raise ValueError("pass exactly one of task=<name> or task_ids=<tensor>")
        pooled = self.encode(**backbone_inputs)
        if task is not None:
            if task not in self.heads:
                raise KeyError(f"unknown task {task!r}; tasks: {', '.join(self.tasks)}")
            logits = self.heads[task](pooled.to(self.heads[task].weight.dtype))
            loss = None if labels is None else F.cross_entropy(_upcast(logits), labels.long())
            return SequenceClassifierOutput(loss=loss, logits=logits)
        return self._mixed_forward(pooled, task_ids, labels)

    def _mixed_forward(
        self, pooled: torch.Tensor, task_ids: torch.Tensor, labels: torch.Tensor | None
    ) -> SequenceClassifierOutput:
        names = self.task_names
        width = max(len(v) for v in self.tasks.values())
        logits = pooled.new_full((pooled.shape[0], width), torch.finfo(pooled.dtype).min)
        loss_sum = pooled.new_zeros((), dtype=_upcast(pooled).dtype)
        task_ids = task_ids.view(-1)
        for idx in torch.unique(task_ids).tolist():
            if not 0 <= idx < len(names):
                raise ValueError(f"task_ids holds {idx}, outside 0..{len(names) - 1}")
            sel = (task_ids == idx).nonzero(as_tuple=True)[0]
            head = self.heads[names[idx]]
            lg = head(pooled[sel].to(head.weight.dtype))
            logits[sel, : lg.shape[1]] = lg.to(logits.dtype)
            if labels is not None:
                loss_sum = loss_sum + F.cross_entropy(_upcast(lg), labels.view(-1)[sel].long(), reduction="sum")
        loss = None if labels is None else loss_sum / max(1, pooled.shape[0])
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def predict(self, task: str, **inputs: Any) -> list[str]:
        """Label names predicted for `task` on a batch of model inputs (eval mode, no gradient)."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            logits = self(task=task, **inputs).logits
        finally:
            self.train(was_training)
        return [self.tasks[task][i] for i in logits.argmax(-1).tolist()]

    # -- saving
    def multitask_config(self) -> dict[str, Any]:
        """The content of ``multitask_config.json``."""
        return {
            "format": _FORMAT,
            "version": 1,
            "pooling": self.pooling,
            "hidden_size": self.hidden_size,
            "base_model": self.base_model,
            "tasks": {
                t: {"labels": labels, "id2label": {str(i): x for i, x in enumerate(labels)}}
                for t, labels in self.tasks.items()
            },
        }

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"{task}.weight": ..., "{task}.bias": ...}``: detached copies, contiguous, on CPU."""
        return {
            f"{t}.{k}": v.detach().to("cpu", copy=True).contiguous()
            for t in self.heads
            for k, v in self.heads[t].state_dict().items()
        }

    def save_pretrained(
        self, save_directory: str | os.PathLike, processing_class: Any | None = None, **kwargs: Any
    ) -> Path:
        """Save backbone (``AutoModel``-loadable, safetensors), heads and ``multitask_config.json`` (and the
        tokenizer / processor when given) into `save_directory`, written to a temporary folder first and
        moved into place file by file."""

        return atomic_write_dir(save_directory, lambda tmp: self.write_files(tmp, processing_class, **kwargs))

    def write_files(self, folder: str | os.PathLike, processing_class: Any | None = None, **kwargs: Any) -> None:
        """Write the files of :meth:`save_pretrained` directly into `folder` (no temporary folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder, safe_serialization=True, **kwargs)
        save_file(self.heads_state_dict(), str(folder / HEADS_FILE), metadata={"format": "pt"})
        (folder / MULTITASK_CONFIG_FILE).write_text(json.dumps(self.multitask_config(), indent=2) + "\n")
        if processing_class is not None:
            processing_class.save_pretrained(folder)

    def load_backbone_weights(self, folder: str | os.PathLike) -> None:
        """Load the backbone weights saved in `folder` into this model, in place (parameters keep their
        identity). Goes through ``AutoModel.from_pretrained`` (safetensors only, this backbone's dtype), so
        transformers' own checkpoint key conversions apply; raises CheckpointError naming the folder when the
        weights do not fit this backbone."""
        folder = Path(folder)
        dtype = next(self.backbone.parameters()).dtype
        try:
            loaded = AutoModel.from_pretrained(
                folder, use_safetensors=True, trust_remote_code=False, dtype=dtype
            )
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot load backbone weights from {folder}: {e}") from e
        try:
            self.backbone.load_state_dict(loaded.state_dict(), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{folder}: backbone weights do not fit this model: {e}") from e

    # -- merge helpers
    def backbone_tensors(self) -> dict[str, torch.Tensor]:
        """The backbone tensors ATM merges, by state-dict name: every parameter and floating buffer, each
        storage once (tied weights appear under their first name only)."""
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in list(self.backbone.named_parameters()) + list(self.backbone.named_buffers()):
            if not t.is_floating_point() or id(t) in seen:
                continue
            seen.add(id(t))
            out[name] = t
        return out


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the loss; float32 / float64 unchanged."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _load_backbone(ref: str | os.PathLike, token: str | bool | None = None) -> PreTrainedModel:
    """``AutoModel.from_pretrained`` on a resolved folder, safetensors only, remote code off."""
    from hf_atm.hub.resolve import resolve_model

    folder = resolve_model(ref, token=token)
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder} holds no .safetensors weights (pickle files are not loaded)")
    try:
        AutoConfig.from_pretrained(folder, trust_remote_code=False)
        return AutoModel.from_pretrained(folder, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load a backbone from {folder}: {e}") from e

