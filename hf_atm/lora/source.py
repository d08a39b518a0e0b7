"""A LoRA adapter presented as a full model checkpoint: "base + adapter delta", tensor by tensor.

:class:`LoraAsModelSource` has the reading interface of :class:`hf_atm.merging.io.CheckpointReader` (``names``,
``info``, ``get``, ``release``, ``in``, ``len``, ``close``, context manager; plus ``keys`` / ``get_tensor`` /
``shape`` / ``dtype``), so the streaming merge engine reads an adapter exactly like a fine-tuned model and every
merge method applies to adapters. For each base tensor ``get(name)`` returns what peft's ``merge_and_unload()``
would hold there: ``base + B @ A * scaling`` for LoRA modules (the add done in the promoted dtype and cast to
the base's dtype, as peft's in-place merge does), the adapter's stored tensor (cast to the base's dtype) for
``modules_to_save`` / trained biases, and the base tensor itself (zero-copy) everywhere else.

:func:`open_model_source` picks a CheckpointReader or a LoraAsModelSource for a model folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hf_atm.errors import CheckpointError
from hf_atm.lora.delta import LoraAdapter, adapter_targets, check_full_shape, is_adapter_folder, load_adapter
from hf_atm.merging.io import CheckpointReader, TensorInfo

__all__ = ["LoraAsModelSource", "open_model_source"]


class LoraAsModelSource:
    """Read ``base + adapter`` like a checkpoint (see the module docstring).

    `base`: an open CheckpointReader (not closed by this source; the engine owns it) or a base folder (opened
    and closed here). `adapter`: an adapter folder or a :class:`~hf_atm.lora.delta.LoraAdapter`. Every module of
    the adapter must match a base tensor (CheckpointError naming it otherwise); the tensor names, shapes and
    dtypes are the base's.
    """

    def __init__(
        self,
        base: CheckpointReader | str | os.PathLike,
        adapter: LoraAdapter | str | os.PathLike,
        *,
        label: str | None = None,
        allow_pickle: bool = False,
    ):
        self._owns_base = not isinstance(base, CheckpointReader)
        self.base = base if isinstance(base, CheckpointReader) else CheckpointReader(base, allow_pickle=allow_pickle)
        try:
            self.adapter = (
                adapter if isinstance(adapter, LoraAdapter)
                else load_adapter(adapter, label=label, allow_pickle=allow_pickle)
            )
            self.label = label or self.adapter.label
            self._targets = adapter_targets(self.adapter, self.base.names, self.base.label)
            for name, (kind, what) in self._targets.items():
                shape = self.base.info(name).shape
                if kind == "weight":
                    self.adapter.transposes(what, shape)  # raises when the module does not fit the base
                elif kind == "bias" and tuple(self.adapter.tensor(what.bias_key).shape) != tuple(shape):
                    raise CheckpointError(
                        f"adapter {self.label}: lora_B.bias of {what.path!r} does not fit the base bias {name!r} "
                        f"of shape {tuple(shape)}"
                    )
                elif kind == "full":
                    check_full_shape(self.adapter, what, self.adapter.tensor(what), name, shape)
        except BaseException:
            self.close()
            raise
        self.folder = self.adapter.folder
        self.files = [self.adapter.file]
        self.format = "safetensors"

    # -- CheckpointReader interface
    @property
    def names(self) -> list[str]:
        """The base's tensor names, in its storage order."""
        return self.base.names

    @property
    def weights_file(self) -> str:
        """The adapter's weights file (for messages)."""
        return str(self.adapter.file)

    @property
    def changed(self) -> list[str]:
        """Names of the base tensors this adapter changes."""
        return [n for n in self.base.names if n in self._targets]

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)

    def info(self, name: str) -> TensorInfo:
        """The base's dtype and shape; the file is the adapter's for changed tensors, the base's otherwise."""
        info = self.base.info(name)
        if name in self._targets:
            return TensorInfo(name, info.dtype, info.shape, self.adapter.file)
        return info

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` of the merged model ``base + adapter`` (the base's own tensor when unchanged)."""
        b = self.base.get(name)
        target = self._targets.get(name)
        if target is None:
            return b
        kind, what = target
        if kind == "full":
            return self.adapter.tensor(what).to(b.dtype)
        delta = self.adapter.delta(what, tuple(b.shape)) if kind == "weight" else self.adapter.bias_delta(what)
        out = torch.add(b, delta)  # computed in the promoted dtype, as peft's in-place `weight.data += delta`
        self.base.release(b)
        return out if out.dtype == b.dtype else out.to(b.dtype)

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the base's memory-map pages under `tensor` (no-op for tensors this source computed)."""
        self.base.release(tensor)

    def close(self) -> None:
        adapter = getattr(self, "adapter", None)
        if adapter is not None:
            adapter.close()
        if getattr(self, "_owns_base", False):
            self.base.close()

    def __enter__(self) -> LoraAsModelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plain tensor-source names
    def keys(self) -> list[str]:
        return list(self.names)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.base.info(name).dtype


def open_model_source(
    folder: str | os.PathLike,
    base: CheckpointReader,
    *,
    allow_pickle: bool = False,
    label: str | None = None,
) -> CheckpointReader | LoraAsModelSource:
    """A reader for one model of a merge: a :class:`LoraAsModelSource` over `base` when `folder` is a peft
    adapter (``adapter_config.json``), else a :class:`CheckpointReader` of `folder`."""
    if is_adapter_folder(folder):
        return LoraAsModelSource(base, Path(folder), label=label, allow_pickle=allow_pickle)
    return CheckpointReader(folder, allow_pickle=allow_pickle, label=label)

