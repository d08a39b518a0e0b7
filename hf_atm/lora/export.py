"""Merge LoRA adapters into one LoRA adapter (``hf-atm merge ... --output-format lora --rank R``).

For every base tensor that some adapter changes, the task vectors ``tau_i`` (adapter i's delta, zero where it
does not touch the tensor) are combined with the merge method exactly as a full merge combines them
(``merge_deltas(spec, taus, name)``), and the merged delta ``D`` is stored as a rank-``R`` LoRA through its
truncated SVD, as peft's ``add_weighted_adapter(..., combination_type="svd")`` does: in the adapter's
orientation ``M`` (``D`` for Linear weights, ``D.T`` for Conv1D and Embedding weights), ``M = U S Vh`` and
``lora_B = U[:, :R] * S[:R]``, ``lora_A = Vh[:R]``, with ``r = lora_alpha = R`` so that ``scaling = 1``. When a
module's matrix has fewer than ``R`` singular values the factors are zero-padded to rank ``R``.

Exactness: ``B @ A`` is the best rank-``R`` approximation of ``M`` (Eckart-Young), so the merged adapter
reproduces the full merge exactly (to float error) when ``R >= rank(M)`` (for task arithmetic that is at most
the sum of the adapters' ranks on that module); otherwise each weight is off by at most ``sigma_{R+1}(M)`` in
spectral norm, which bounds the change of that layer's output by ``sigma_{R+1}(M) * ||x||`` for an input ``x``.
The largest relative error ``sigma_{R+1} / sigma_1`` over modules is written in the model card.

Tensors an adapter stores whole (``modules_to_save`` such as a classifier, trained biases) are merged like in a
full merge (``merge_tensor`` of ``base + delta_i``) and stored whole, with ``modules_to_save`` / ``bias`` set
accordingly in ``adapter_config.json``. Adapters with ``lora_bias=True`` cannot be exported (merge them into the
full model instead). The output is written to a temporary folder beside `output` and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hf_atm.errors import MergeConfigError
from hf_atm.hub.card import architectures_of
from hf_atm.hub.resolve import resolve_model
from hf_atm.lora.delta import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_PREFIX,
    LoraAdapter,
    LoraModule,
    adapter_targets,
    is_adapter_folder,
    load_adapter,
)
from hf_atm.merging.io import CheckpointReader
from hf_atm.merging.output import check_free_space, check_output, staged_output
from hf_atm.merging.spec import MergeSpec, merge_deltas, merge_tensor

__all__ = ["lora_factors", "merge_adapters_to_lora"]

logger = logging.getLogger(__name__)


def lora_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(B, A, sigma_1, sigma_{rank+1})`` with ``B @ A`` the best rank-`rank` approximation of `matrix`.

    ``B = U[:, :rank] * S[:rank]`` (out, rank) and ``A = Vh[:rank]`` (rank, in), zero-padded to `rank` when
    `matrix` has fewer singular values; computed in float32 (float64 for float64 input). The two singular
    values (0.0 where they do not exist) give the truncation error: ``||matrix - B @ A||_2 = sigma_{rank+1}``.
    """
    dt = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(matrix.to(dt), full_matrices=False)
    k = min(rank, s.numel())
    b = torch.zeros(matrix.shape[0], rank, dtype=dt)
    a = torch.zeros(rank, matrix.shape[1], dtype=dt)
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vh[:k]
    top = float(s[0]) if s.numel() else 0.0
    dropped = float(s[rank]) if s.numel() > rank else 0.0
    return b, a, top, dropped


def _resolve_adapters(refs: Sequence[str], allow_pickle: bool) -> list[Path]:
    paths = []
    for ref in refs:
        path = resolve_model(ref, allow_pickle=allow_pickle)
        if not is_adapter_folder(path):
            raise MergeConfigError(
                f"--output-format lora merges LoRA adapters, but {ref!r} has no adapter_config.json (a full model); "
                "use --output-format full to merge full models"
            )
        paths.append(path)
    return paths


def _output_config(adapters: Sequence[LoraAdapter], base_ref: str, rank: int, targets: list[str],
                   full_keys: list[str]) -> dict[str, Any]:
    """adapter_config.json of the merged adapter: the first adapter's, with rank/alpha R and exact targets."""
    config = dict(adapters[0].config)
    modules_to_save = sorted({m for a in adapters for m in (a.config.get("modules_to_save") or [])})
    biases = [k for k in full_keys if k.endswith(".bias") and not any(
        k[len(PEFT_PREFIX):].startswith(m + ".") or f".{m}." in k for m in modules_to_save)]
    bias_modes = {a.config.get("bias", "none") for a in adapters} - {"none"}
    config.update(
        r=rank,
        lora_alpha=rank,
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
        lora_bias=False,
        init_lora_weights=True,
        target_modules=sorted(targets),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=modules_to_save or None,
        bias=("all" if len(bias_modes) != 1 else bias_modes.pop()) if biases else "none",
        fan_in_fan_out=any(bool(a.config.get("fan_in_fan_out")) for a in adapters),
        base_model_name_or_path=str(base_ref),
        inference_mode=True,
    )
    return config


def merge_adapters_to_lora(
    base_ref: str | os.PathLike,
    adapter_refs: Sequence[str | os.PathLike],
    spec: MergeSpec,
    output: str | os.PathLike,
    rank: int,
    *,
    overwrite: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
) -> Path:
    """Merge the LoRA adapters `adapter_refs` (folders or Hub ids) on the base `base_ref` with `spec` into one
    rank-`rank` LoRA adapter written to `output`; return the output folder (see the module docstring).

    The output holds ``adapter_model.safetensors``, ``adapter_config.json`` (``r = lora_alpha = rank``,
    ``base_model_name_or_path = base_ref``, ``target_modules`` = every module some adapter adapts) and a
    README.md model card; ``PeftModel.from_pretrained(base_model, output)`` loads it. Raises MergeConfigError
    for a bad rank / spec or a full model among the inputs, OutputExistsError for a non-empty `output`
    without `overwrite`, CheckpointError / HubError for unreadable or mismatched inputs.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeConfigError(f"--rank: expected a positive integer, got {rank!r}")
    if not adapter_refs:
        raise MergeConfigError("models: --output-format lora needs at least one LoRA adapter")
    spec.validate(len(adapter_refs))
    out = Path(output).expanduser()
    check_output(out, overwrite)  # before any work; checked again under the output's lock
    base_path = resolve_model(base_ref, allow_pickle=allow_pickle)
    paths = _resolve_adapters([str(r) for r in adapter_refs], allow_pickle)
    for ref, p in [(str(base_ref), base_path), *zip(map(str, adapter_refs), paths)]:
        if p.resolve() == out.resolve() or out.resolve() in p.resolve().parents:
            raise MergeConfigError(f"output: {out} is or contains the input {ref!r}; choose another folder")

    with CheckpointReader(base_path, allow_pickle=allow_pickle, label=str(base_ref)) as base:
        adapters = [load_adapter(p, label=str(r), allow_pickle=allow_pickle) for r, p in zip(adapter_refs, paths)]
        try:
            for a in adapters:
                if a.config.get("lora_bias") or any(m.bias_key for m in a.modules.values()):
                    raise MergeConfigError(
                        f"adapter {a.label} uses lora_bias=True, which a merged LoRA adapter cannot carry; merge it "
                        "into the full model (--output-format full) instead"
                    )
            targets = [adapter_targets(a, base.names, base.label) for a in adapters]
            tensors, stats, lora_paths, full_keys = _merge_tensors(spec, base, adapters, targets, rank, progress)
        finally:
            for a in adapters:
                a.close()
        config = _output_config(adapters, str(base_ref), rank, lora_paths, full_keys)

    # Locks the output, stages it in .<name>.tmp-<hex> and swaps it in when the block ends (merging/output.py).
    with staged_output(out, overwrite) as tmp:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        check_free_space(tmp, nbytes, f"the adapter weights of {out}")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _write_card(tmp, str(base_ref), [str(r) for r in adapter_refs], spec, rank, stats, str(output),
                    architectures_of(base_path))
    return out


def _merge_tensors(
    spec: MergeSpec,
    base: CheckpointReader,
    adapters: Sequence[LoraAdapter],
    targets: Sequence[dict[str, tuple[str, Any]]],
    rank: int,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str], list[str]]:
    """(output tensors, truncation stats, LoRA module paths, whole-tensor keys) of the merged adapter."""
    out_dtype = adapters[0].dtype if len({a.dtype for a in adapters}) == 1 else torch.float32
    names = [n for n in base.names if any(n in t for t in targets)]
    tensors: dict[str, torch.Tensor] = {}
    lora_paths: list[str] = []
    full_keys: list[str] = []
    worst = (0.0, None)
    for name in tqdm(names, desc="merging adapters", unit="tensor", disable=not progress, dynamic_ncols=True):
        info = base.info(name)
        here = [t.get(name) for t in targets]
        if any(h is not None and h[0] == "full" for h in here):
            # Stored whole by some adapter: merge the full tensors as a full merge does.
            b = base.get(name)
            models = [b if h is None else _full_model_tensor(a, h, b) for a, h in zip(adapters, here)]
            merged = merge_tensor(spec, b, models, name).to(info.dtype)
            key = next(h[1] for h in here if h is not None and h[0] == "full")
            tensors[key] = merged.contiguous()
            full_keys.append(key)
            continue
        first_i = next(i for i, h in enumerate(here) if h is not None)
        module: LoraModule = here[first_i][1]
        taus = [
            torch.zeros(info.shape, dtype=torch.float32) if h is None else a.delta(h[1], info.shape).float()
            for a, h in zip(adapters, here)
        ]
        delta = merge_deltas(spec, taus, name)
        transposed = adapters[first_i].transposes(module, info.shape)
        b_factor, a_factor, top, dropped = lora_factors(delta.T if transposed else delta, rank)
        if top > 0 and dropped / top > worst[0]:
            worst = (dropped / top, name)
        stem = f"{PEFT_PREFIX}{module.path}"
        if module.kind == "embedding":
            tensors[f"{stem}.lora_embedding_A"] = a_factor.to(out_dtype).contiguous()
            tensors[f"{stem}.lora_embedding_B"] = b_factor.to(out_dtype).contiguous()
        else:
            tensors[f"{stem}.lora_A.weight"] = a_factor.to(out_dtype).contiguous()
            tensors[f"{stem}.lora_B.weight"] = b_factor.to(out_dtype).contiguous()
        lora_paths.append(module.path)
    if worst[1] is not None:
        logger.info("rank %d: largest relative truncation error sigma_{R+1}/sigma_1 = %.3g (%s)", rank, *worst)
    return tensors, {"max_relative_error": worst[0], "worst_tensor": worst[1]}, lora_paths, full_keys


def _full_model_tensor(adapter: LoraAdapter, target: tuple[str, Any], base: torch.Tensor) -> torch.Tensor:
    """Adapter's version of a base tensor, as its merged model holds it (stored whole, or base + delta)."""
    kind, what = target
    if kind == "full":
        return adapter.tensor(what).to(base.dtype)
    delta = adapter.delta(what, tuple(base.shape))
    return torch.add(base, delta).to(base.dtype)


def _write_card(folder: Path, base: str, adapters: list[str], spec: MergeSpec, rank: int, stats: dict,
                output: str, architectures: Sequence[str] = ()) -> None:
    """merge_config.yaml (a MergeConfig that ``--config`` re-runs) and README.md: the merge card (library peft)
    with the rank and its truncation error."""
    from hf_atm.hub.card import auto_class_for, hub_repo_id, merge_model_card
    from hf_atm.merging.config import MergeConfig
    from hf_atm.version import __version__

    options = {**spec.to_dict(), "output_format": "lora", "rank": rank}
    auto, _ = auto_class_for(architectures)
    record = MergeConfig(base=base, models=adapters, output=output, spec=spec, output_format="lora", rank=rank)
    config_yaml = record.to_yaml(version=__version__)
    (folder / "merge_config.yaml").write_text(config_yaml, encoding="utf-8")
    card = merge_model_card(
        base=base,
        models=adapters,
        method=spec.method,
        options=options,
        config_yaml=config_yaml,
        library_name="peft",
        version=__version__,
        use_snippet=(
            "from peft import PeftModel\n"
            f"from transformers import {auto}\n"
            f'base_model = {auto}.from_pretrained("{hub_repo_id(base) or "path/to/the/base"}")\n'
            'model = PeftModel.from_pretrained(base_model, "path/or/repo-of-this-adapter")'
        ),
    )
    worst = stats.get("worst_tensor")
    note = (
        f"\n\n## LoRA output\n\nEach merged delta is stored as a rank-{rank} LoRA (truncated SVD, "
        f"`r = lora_alpha = {rank}`). Largest relative truncation error sigma_(R+1)/sigma_1: "
        f"{stats.get('max_relative_error', 0.0):.3g}" + (f" (on `{worst}`)." if worst else ".") + "\n"
    )
    card.text = card.text + note
    card.save(folder / "README.md")
