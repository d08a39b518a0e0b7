"""FSDP for ``atm_parallel_mode="data_parallel"``: the backbone sharded with FSDP2, task vectors sharded too.

When FSDP is configured (``TrainingArguments.fsdp`` / ``fsdp_config``, or accelerate's FSDP config, which
``accelerate launch`` passes as ``ACCELERATE_USE_FSDP`` / ``FSDP_*``), :func:`prepare_sharding` shards the
backbone with ``torch.distributed.fsdp.fully_shard``: one FSDP unit per transformer layer (the backbone's
``_no_split_modules``, or ``transformer_layer_cls_to_wrap``), applied bottom-up, and the backbone as the root
unit (accelerate's ``fsdp_version: 2`` also carves separate embedding and tail units; ATM does not). Every
parameter becomes a DTensor whose local part is this rank's dim-0 rows. The task heads stay whole (they are
small, and each task's head state is what a round keeps); their gradients are averaged by
:meth:`~hf_atm.atm.exchange.TaskExchange.sync_gradients_`, the backbone's by FSDP's reduce-scatter.

The library applies ``fully_shard`` itself rather than ``accelerator.prepare``: accelerate shards the whole
model it is given (every task's head inside the root unit) and, on the CPU, maps an FSDP configuration to
plain DDP (``DistributedType.MULTI_CPU``). ATM's rounds therefore run the same sharding on CPU (gloo) and GPU
(NCCL), but Trainer itself differs on a GPU: there accelerate's FSDP plugin is active
(``Trainer.is_fsdp_enabled``), and Trainer's own evaluation loop would ``accelerator.prepare`` the model again,
which is why ``ATMTrainer.predict`` refuses a sharded backbone. Only the CPU path is tested.

Every FSDP setting is either honoured or refused naming it (:func:`fsdp_settings`): ATM reads FSDP's version
(2), ``reshard_after_forward`` and ``transformer_layer_cls_to_wrap``; the other keys are accepted only with the
neutral values transformers fills in. :func:`check_fsdp_args` holds every args-level FSDP rule.

Everything a round does with the weights works on the local shards (:func:`local_tensors`, views that alias
the parameters' storage): the snapshot, the task vector ``tau = shard - snapshot shard``, the merge and
applying it. Element-wise merges (``task_arithmetic``, ``average``: the default) fold shard-locally; the
Gram of the cosines is local dot products all-reduced; merges that need whole tensors (TIES, TSV-M, Iso-C,
DARE's and Breadcrumbs' per-tensor masks...) gather one tensor at a time (:func:`gather_rows`), merge, and
keep their rows (:func:`local_rows`). Saving gathers the full state (:func:`full_state_dict`, kept on rank 0
only, which writes), so a saved folder has the format of an unsharded run.

The caller's model stays sharded after ``train()``: save it with ``trainer.save_model()`` on every rank (a
collective), not ``model.save_pretrained``. A second ATMTrainer on the same model reuses its sharding.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import str_to_bool
from torch import nn

from hf_atm.atm.exchange import TaskExchange, is_sharded
from hf_atm.errors import CheckpointError

__all__ = [
    "FSDPSettings",
    "accelerate_fsdp_flag_kept",
    "backbone_sharded",
    "check_fsdp_args",
    "check_sharding_supported",
    "check_weights_fit",
    "clip_grad_norm_",
    "fsdp_mode_message",
    "fsdp_requested",
    "fsdp_settings",
    "full_shapes",
    "full_state_dict",
    "full_tensors",
    "gather_rows",
    "is_sharded",
    "load_backbone_folder_",
    "load_full_",
    "local_rows",
    "local_tensors",
    "prepare_sharding",
    "row_bounds",
]

#: the fsdp_config keys ATM honours
_HONOURED_KEYS = ("version", "reshard_after_forward", "transformer_layer_cls_to_wrap")
_UNITS = ("ATM's FSDP units are the transformer layers (transformer_layer_cls_to_wrap / "
          "fsdp_transformer_layer_cls_to_wrap), not size-based or none")


def _false(value: Any) -> bool:
    return not str_to_bool(str(value))


#: fsdp_config key -> (accelerate's FSDP_* variable or None, is its value neutral?, why another one is refused).
#: transformers fills some of them in with the neutral value; a key outside this table and _HONOURED_KEYS is refused.
_NEUTRAL: dict[str, tuple[str | None, Callable[[Any], bool], str]] = {
    "cpu_offload": ("FSDP_OFFLOAD_PARAMS", _false, "CPU offload is not supported by ATM's sharded rounds; "
                    "merge_device='cpu' keeps the round's task vectors and accumulators in host memory"),
    "activation_checkpointing": ("FSDP_ACTIVATION_CHECKPOINTING", _false,
                                 "FSDP's own activation checkpointing is not applied; use gradient_checkpointing=True"),
    "auto_wrap_policy": ("FSDP_AUTO_WRAP_POLICY", lambda v: str(v).upper() == "TRANSFORMER_BASED_WRAP", _UNITS),
    "min_num_params": ("FSDP_MIN_NUM_PARAMS", lambda v: int(v or 0) == 0, _UNITS),
    "state_dict_type": ("FSDP_STATE_DICT_TYPE", lambda v: str(v).upper() == "FULL_STATE_DICT",
                        "ATM saves full state dicts (folders in an unsharded run's format); use FULL_STATE_DICT"),
    "cpu_ram_efficient_loading": ("FSDP_CPU_RAM_EFFICIENT_LOADING", _false,
                                  "ATM shards a model loaded on every rank (rank 0's weights broadcast first)"),
    "ignored_modules": ("FSDP_IGNORED_MODULES", lambda v: not v, "ATM shards every backbone module"),
    "xla": (None, _false, "XLA is not supported"),
    "xla_fsdp_v2": (None, _false, "XLA is not supported"),
    "xla_fsdp_grad_ckpt": (None, _false, "XLA is not supported"),
}


@dataclass(frozen=True)
class FSDPSettings:
    """What ATM takes from an FSDP configuration: reshard after forward (``full_shard``) or not
    (``shard_grad_op``), the layer classes that become FSDP units (None: the backbone's
    ``_no_split_modules``) and where they were named (for error messages)."""

    reshard_after_forward: bool = True
    layer_classes: tuple[str, ...] | None = None
    layer_source: str = "fsdp_config['transformer_layer_cls_to_wrap']"


def fsdp_requested(args: Any) -> bool:
    """True when FSDP is configured: ``args.fsdp`` or accelerate's FSDP config (``ACCELERATE_USE_FSDP``)."""
    return bool(getattr(args, "fsdp", None)) or bool(str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false")))


@contextlib.contextmanager
def accelerate_fsdp_flag_kept() -> Iterator[None]:
    """Keep ``ACCELERATE_USE_FSDP`` as it was: accelerate's Accelerator sets it to true when given an FSDP
    plugin (Trainer's, for ``args.fsdp``), and left set it would make every later trainer of the process read
    accelerate's FSDP config (:func:`fsdp_requested`) without any being launched."""
    before = os.environ.get("ACCELERATE_USE_FSDP")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ACCELERATE_USE_FSDP", None)
        else:
            os.environ["ACCELERATE_USE_FSDP"] = before


def _neutral(key: str, value: Any) -> bool:
    try:
        return _NEUTRAL[key][1](value)
    except ValueError:  # not a boolean / integer: not the neutral value either
        return False


def fsdp_settings(args: Any) -> FSDPSettings | None:
    """The :class:`FSDPSettings` of `args` (its normalised ``fsdp_config`` when ``fsdp`` is set, else the
    ``FSDP_*`` variables of an accelerate FSDP config), None when FSDP is not configured. ValueError naming the
    ``fsdp_config`` key (or the accelerate config's ``fsdp_*`` key and its variable) that ATM does not apply:
    FSDP version 1 (ATM's round works on FSDP2's DTensor shards), any key outside ``version``,
    ``reshard_after_forward``, ``transformer_layer_cls_to_wrap`` unless it has the neutral value transformers
    fills in (no CPU offload, transformer-based wrapping, full state dicts, no FSDP activation checkpointing, no
    CPU-RAM-efficient loading, no XLA)."""
    if not fsdp_requested(args):
        return None
    if getattr(args, "fsdp", None):
        cfg = dict(getattr(args, "fsdp_config", None) or {})
        where = "fsdp_config"
        for key, value in cfg.items():
            if key in _HONOURED_KEYS:
                continue
            if key not in _NEUTRAL:
                raise ValueError(f"fsdp_config['{key}'] is not supported by ATM: it applies only "
                                 f"{', '.join(_HONOURED_KEYS)} (other keys only with transformers' defaults)")
            if not _neutral(key, value):
                raise ValueError(f"fsdp_config['{key}']={value!r} is not supported by ATM: {_NEUTRAL[key][2]}")
        version = int(cfg.get("version", 2))
        reshard = cfg.get("reshard_after_forward", True)
        layers = cfg.get("transformer_layer_cls_to_wrap")
        source = "fsdp_config['transformer_layer_cls_to_wrap']"
    else:
        env = os.environ
        where = "accelerate's FSDP config (FSDP_* variables)"
        for key, (var, _, why) in _NEUTRAL.items():
            if var is not None and var in env and not _neutral(key, env[var]):
                yaml_key = "fsdp_offload_params" if var == "FSDP_OFFLOAD_PARAMS" else f"fsdp_{key}"
                raise ValueError(f"accelerate's FSDP config: {yaml_key} ({var}={env[var]!r}) is not supported by "
                                 f"ATM: {why}")
        version = int(env.get("FSDP_VERSION", "1"))
        reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true")
        layers = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
        source = "accelerate's fsdp_transformer_layer_cls_to_wrap (FSDP_TRANSFORMER_CLS_TO_WRAP)"
    if version != 2:
        raise ValueError(f"{where}: FSDP version {version} is not supported by ATM, set version 2 (fsdp_version: 2): "
                         "ATM's rounds work on FSDP2's DTensor shards")
    if isinstance(layers, str):
        layers = [n.strip() for n in layers.split(",") if n.strip()]
    # FSDP1's strategy names as FSDP2's flag: full_shard reshards after forward, shard_grad_op does not
    reshard_flag = reshard if isinstance(reshard, bool) else str(reshard).lower() not in ("false", "0", "shard_grad_op")
    return FSDPSettings(reshard_after_forward=reshard_flag, layer_classes=tuple(layers) if layers else None,
                        layer_source=source)


def fsdp_mode_message(parallel_mode: str) -> str:
    """Why FSDP is refused with `parallel_mode` (the one message of the rule "FSDP needs data_parallel")."""
    return (f"FSDP needs atm_parallel_mode='data_parallel', got atm_parallel_mode={parallel_mode!r}: in "
            "task_parallel every rank fine-tunes its own tasks on a whole replica, so there is nothing to shard "
            "over. Set atm_parallel_mode='data_parallel' (every rank fine-tunes every task together, the backbone "
            "sharded with FSDP2) or remove the FSDP setting.")


def check_sharding_supported(*, fsdp: bool, deepspeed: bool, parallel_mode: str) -> None:
    """Raise ValueError for a sharding setup ATM cannot run: DeepSpeed (always), FSDP outside
    ``atm_parallel_mode='data_parallel'``."""
    if deepspeed:
        raise ValueError(
            "ATMTrainer does not support DeepSpeed (TrainingArguments.deepspeed / accelerate's DeepSpeed plugin): "
            "ZeRO partitions the parameters and the optimizer state behind an engine whose backward and step "
            "ATM does not drive, while each ATM round snapshots the weights, steps a fresh optimizer per task and "
            "writes the merged delta into the parameters. For a model too large for one replica per process use "
            "FSDP with atm_parallel_mode='data_parallel' (the backbone sharded with FSDP2, see the README)."
        )
    if fsdp and parallel_mode != "data_parallel":
        raise ValueError(fsdp_mode_message(parallel_mode))


def check_fsdp_args(args: Any) -> FSDPSettings | None:
    """Every args-level FSDP rule, in one place: the :class:`FSDPSettings` of `args` (None without FSDP), or
    ValueError naming what ATM does not run with FSDP: another atm_parallel_mode than data_parallel, an FSDP
    setting :func:`fsdp_settings` refuses, LoRA, ``reset_optimizer_each_round=False``. Called by
    ``ATMConfig`` (``fsdp`` set) and by the trainer (also accelerate's FSDP config), whatever the process
    count."""
    if not fsdp_requested(args):
        return None
    check_sharding_supported(fsdp=True, deepspeed=False, parallel_mode=args.atm_parallel_mode)
    settings = fsdp_settings(args)
    if args.lora_r > 0:
        raise ValueError("lora_r > 0 cannot be combined with FSDP: LoRA adapters are small, train them without "
                         "fsdp (atm_parallel_mode='data_parallel' averages their gradients over ranks)")
    if not args.reset_optimizer_each_round:
        raise ValueError("reset_optimizer_each_round=False cannot be combined with FSDP: ATM's round checkpoints "
                         "store whole optimizer states, FSDP's are sharded")
    return settings


def _mesh_size(model: Any) -> int:
    return next(p for p in model.backbone.parameters() if is_sharded(p)).device_mesh.size()


def prepare_sharding(model: Any, exchange: TaskExchange, args: Any) -> bool:
    """Shard `model`'s backbone with FSDP2 over `exchange`'s ranks when FSDP is configured (see the module
    docstring) and return True; False (nothing done) without FSDP or with a single process (nothing to shard
    over; the FSDP rules of :func:`check_fsdp_args` are checked anyway). Every rank starts from rank 0's
    weights (broadcast before sharding). A backbone already sharded (by an earlier ATMTrainer) is reused when
    its mesh spans this run's ranks; ValueError otherwise. Sets ``exchange.sharded``."""
    settings = check_fsdp_args(args)
    if backbone_sharded(model):
        if settings is None or _mesh_size(model) != exchange.world_size:
            raise ValueError(
                f"the model's backbone is already FSDP-sharded over {_mesh_size(model)} ranks (by an earlier "
                f"ATMTrainer) but this trainer runs " + ("without FSDP" if settings is None else
                                                         f"on {exchange.world_size} ranks") +
                ": pass a freshly loaded model, or configure the same FSDP run")
        exchange.broadcast_module_(model, src=0)  # the heads (sharded tensors are skipped)
        exchange.sharded = True
        return True
    if settings is None or not exchange.distributed:
        return False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    backbone = model.backbone
    names = settings.layer_classes or tuple(getattr(backbone, "_no_split_modules", None) or ())
    source = settings.layer_source if settings.layer_classes else f"{type(backbone).__name__}._no_split_modules"
    # bottom-up (as FSDP2 and accelerate do): a matching module nested in another becomes its own unit first
    layers = [m for m in reversed(list(backbone.modules())) if m is not backbone and type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{source}={list(names)}: no such module in {type(backbone).__name__}, and sharding the backbone as "
            "one unit would gather all of it at every forward (a whole replica per rank). Name its transformer "
            "layer class with fsdp_config['transformer_layer_cls_to_wrap'] (accelerate's config: "
            "fsdp_transformer_layer_cls_to_wrap, FSDP_TRANSFORMER_CLS_TO_WRAP)")
    exchange.broadcast_module_(model, src=0)
    device = torch.device(args.device)
    model.heads.to(device)  # fully_shard moves each unit to the mesh's device; the heads are not in one
    mesh = init_device_mesh(device.type, (exchange.world_size,))
    for m in layers:
        fully_shard(m, mesh=mesh, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(backbone, mesh=mesh, reshard_after_forward=settings.reshard_after_forward)
    exchange.sharded = True
    return True
# ----------------------------------------------------------------------------------------------------------
# shards and full tensors
# ----------------------------------------------------------------------------------------------------------
def backbone_sharded(model: Any) -> bool:
    """True when `model`'s backbone was sharded by :func:`prepare_sharding` (an FSDP2 unit)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "backbone", None), FSDPModule)


def _reshard_(module: nn.Module) -> None:
    """Put every FSDP unit of `module` back in its sharded state. FSDP2 leaves the root unit's parameters
    gathered after a forward without backward (an evaluation): the module then holds temporary full copies, and
    writes into them would be lost at the next reshard."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def local_tensors(model: Any) -> dict[str, torch.Tensor]:
    """`model`'s backbone tensors (``backbone_tensors()``) with each sharded one replaced by this rank's local
    rows: a view of the parameter's storage, so in-place writes change the parameter. Unsharded models: the
    tensors themselves."""
    if not backbone_sharded(model):
        return model.backbone_tensors()
    _reshard_(model.backbone)
    return {n: t.to_local() if is_sharded(t) else t for n, t in model.backbone_tensors().items()}


def full_shapes(model: Any) -> dict[str, torch.Size]:
    """``{name: global shape}`` of `model`'s sharded backbone tensors (empty when none is)."""
    if not backbone_sharded(model):
        return {}
    _reshard_(model.backbone)
    return {n: t.shape for n, t in model.backbone_tensors().items() if is_sharded(t)}


def full_tensors(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """`model`'s backbone tensors, whole, as ``(name, tensor)`` one at a time (sharded ones gathered: a
    collective, call it on every rank), so that a caller copying each elsewhere (a CPU snapshot) never holds
    the whole backbone on the device."""
    if backbone_sharded(model):
        _reshard_(model.backbone)
    for n, t in model.backbone_tensors().items():
        if is_sharded(t):
            with torch.no_grad():  # closed before the yield: the caller's grad mode is its own
                t = t.full_tensor()
        yield n, t


@torch.no_grad()
def full_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor] | None:
    """The full ``state_dict`` of a model with a sharded backbone, on the CPU (each tensor gathered in turn: a
    collective, call it on every rank), for ``save_pretrained(state_dict=...)``; None when nothing is sharded
    (save as usual). `keep` False (a rank that does not write): each gathered tensor is dropped at once and the
    result is ``{}``, so that only the writing rank holds a whole host copy."""
    if not backbone_sharded(model):
        return None
    _reshard_(model)
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        whole = v.full_tensor() if is_sharded(v) else v
        if keep:
            out[k] = whole.detach().to("cpu", copy=True).contiguous()
    return out


def row_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank `rank`'s rows of a dim-0 sharded tensor of `rows` rows, as FSDP2 shards it
    (``torch.chunk``: chunks of ``ceil(rows / world_size)`` rows, the last ranks' possibly short or empty)."""
    chunk = -(-rows // world_size)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def local_rows(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of a whole tensor (a view)."""
    start, stop = row_bounds(full.shape[0], rank, world_size)
    return full[start:stop]


def gather_rows(exchange: TaskExchange, local: torch.Tensor, full_shape: torch.Size) -> torch.Tensor:
    """The whole tensor of shape `full_shape` from every rank's `local` rows (one all_gather of padded
    chunks), on `local`'s device."""
    rows = full_shape[0]
    chunk = row_bounds(rows, 0, exchange.world_size)[1]  # rank 0's chunk is the full chunk size
    padded = torch.zeros((chunk, *full_shape[1:]), dtype=local.dtype, device=exchange.comm_device)
    padded[: local.shape[0]].copy_(local)
    parts = exchange.all_gather_chunks([padded], padded.shape, local.dtype, 1)
    return torch.cat(parts)[:rows].to(local.device)


@torch.no_grad()
def load_full_(model: Any, full: Mapping[str, torch.Tensor]) -> None:
    """Copy whole backbone tensors `full` (``{name: tensor}``, e.g. a snapshot or a saved checkpoint's) into
    `model`'s backbone: each sharded tensor takes its rows, the others all of it."""
    if backbone_sharded(model):
        _reshard_(model.backbone)  # as local_tensors: write into the shards, not temporary full copies
    for name, t in model.backbone_tensors().items():
        src = full[name]
        if is_sharded(t):
            src = local_rows(src, t.device_mesh.get_local_rank(), t.device_mesh.size())
            t = t.to_local()  # a view of the parameter's storage
        t.copy_(src)


def check_weights_fit(folder: Any, saved: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]) -> None:
    """CheckpointError naming `folder` when its backbone tensors `saved` miss a name of `shapes` (``{name:
    whole shape}`` of the model's backbone tensors) or have another shape."""
    missing = [n for n in shapes if n not in saved]
    wrong = [f"{n}: {tuple(saved[n].shape)} != {tuple(s)}" for n, s in shapes.items()
             if n in saved and saved[n].shape != s]
    if missing or wrong:
        raise CheckpointError(f"{folder}: backbone weights do not fit this model: "
                              + "; ".join(([f"missing {missing[:5]}"] if missing else []) + wrong[:5]))


def load_backbone_folder_(model: Any, folder: str | os.PathLike) -> None:
    """Load the backbone weights of a saved model folder (a round checkpoint) into `model`: its own
    ``load_backbone_weights`` when unsharded; with a sharded backbone the folder is loaded whole on the CPU
    (``from_pretrained``, on every rank: a whole host copy per rank while it loads) and each rank copies its
    rows. CheckpointError naming the folder when the weights do not fit."""
    if not backbone_sharded(model):
        model.load_backbone_weights(folder)
        return
    saved = type(model).from_pretrained(str(folder)).backbone_tensors()
    _reshard_(model.backbone)
    check_weights_fit(Path(folder), saved, {n: t.shape for n, t in model.backbone_tensors().items()})  # global
    load_full_(model, saved)


@torch.no_grad()
def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float, exchange: TaskExchange) -> torch.Tensor:
    """Clip the gradients of `params` (sharded backbone and whole heads) to a total 2-norm of `max_norm`, as
    ``torch.nn.utils.clip_grad_norm_`` does on the whole gradients; returns the total norm before clipping.
    The squared norms of the local shards are summed over ranks (one all-reduce); whole gradients, equal on
    every rank, count once."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() for g in grads if is_sharded(g)]
    whole = [g for g in grads if not is_sharded(g)]
    dev = grads[0].device if grads else torch.device("cpu")
    acc = torch.float64 if dev.type == "cpu" else torch.float32
    shard_sq = torch.zeros((), dtype=acc, device=dev)
    for g in local:
        shard_sq += torch.linalg.vector_norm(g, 2, dtype=acc) ** 2
    shard_sq = exchange.all_reduce_sum(shard_sq.reshape(1)).reshape(())
    whole_sq = sum((torch.linalg.vector_norm(g, 2, dtype=acc) ** 2 for g in whole),
                   torch.zeros((), dtype=acc, device=dev))
    total = (shard_sq + whole_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in local + whole:
        g.mul_(coef.to(g.dtype))
    return total
