"""ATM data_parallel runs with an FSDP-sharded backbone, in one process or under ``accelerate launch``.

Usage: ``python atm_fsdp_run.py OUT_DIR ROWS [--fsdp]``. For each merge of :data:`RUNS` it trains the same
float64 tiny ViT (dropout 0) on the same digits tasks with ``atm_parallel_mode="data_parallel"`` and `ROWS`
rows per device; ``--fsdp`` turns FSDP on (FSDP2, one unit per ViT layer; with one process nothing is
sharded): ``fsdp=True`` in ATMConfig, except for the DARE run, which gets it from accelerate's FSDP config as
``accelerate launch --config_file fsdp.yaml`` passes it (``ACCELERATE_USE_FSDP`` / ``FSDP_*`` variables).
The main process writes ``<name>.safetensors`` (the final weights, gathered whole), ``<name>.json`` (history,
world size, whether the backbone was sharded) and, for the mean, the saved model folder ``fsdp_mean/model``;
every process writes ``fsdp-rank-<r>.json`` (the local shape of one sharded tensor, whether a resumed run
equals the uninterrupted one, what a task_parallel trainer under accelerate's FSDP config said, what predict(),
loading a checkpoint of another shape, a trainer without FSDP on the sharded model and layer classes that
match nothing said, and whether a second trainer reused the sharding). TIES runs
with ``reshard_after_forward=False``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)  # same arithmetic in every process and in the single-process run

from safetensors.torch import save_file  # noqa: E402
from scripts.atm_data import TASK_LABELS, digits_tasks, tiny_vit  # noqa: E402

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel  # noqa: E402
from hf_atm.atm.sharding import backbone_sharded, full_state_dict, local_tensors  # noqa: E402

#: name -> (merge options, rounds): the default element-wise mean (2 rounds, best round kept, round
#: checkpoints), TIES (gathers whole tensors to merge; 2 micro-batches per step), DARE (per-tensor masks:
#: gathers to transform; gradient checkpointing; FSDP from accelerate's environment variables).
RUNS = {
    "fsdp_mean": (dict(merge_method="task_arithmetic"), 2),
    "fsdp_ties": (dict(merge_method="ties", merge_density=0.5, merge_scale=0.6, gradient_accumulation_steps=2), 1),
    "fsdp_dare": (dict(merge_method="dare_linear", merge_density=0.5, merge_seed=4, gradient_checkpointing=True), 1),
}


#: fsdp_config per run (with --fsdp): TIES runs without resharding after forward (shard_grad_op)
FSDP_CONFIGS = {"fsdp_ties": {"reshard_after_forward": False}}

#: what ``accelerate launch`` sets for an FSDP config file with fsdp_version 2 (see the README)
ACCELERATE_FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
                       "FSDP_TRANSFORMER_CLS_TO_WRAP": "ViTLayer", "FSDP_OFFLOAD_PARAMS": "false"}


def _data():
    return digits_tasks(("digit", "parity", "high"), n_train=32, n_val=16, n_test=16, seed=2)


def _model(data):
    return MultiTaskModel.from_backbone(tiny_vit(seed=1, dtype=torch.float64), {t: TASK_LABELS[t] for t in data},
                                        seed=1).to(torch.float64)


def run(out: Path, rows: int, fsdp: bool) -> None:
    data = _data()
    rank = 0
    info: dict[str, object] = {}
    for name, (merge, rounds) in RUNS.items():
        model = _model(data)
        best = name == "fsdp_mean"
        from_env = fsdp and name == "fsdp_dare"
        if from_env:
            os.environ.update(ACCELERATE_FSDP_ENV)
        args = ATMConfig(output_dir=str(out / name), rounds=rounds, epochs_per_round=1.0,
                         per_device_train_batch_size=rows, learning_rate=1e-2, report_to="none", disable_tqdm=True,
                         save_strategy="epoch" if best else "no", eval_strategy="epoch" if best else "no",
                         load_best_model_at_end=best, seed=3, use_cpu=True, logging_steps=100,
                         atm_parallel_mode="data_parallel", fsdp=fsdp and not from_env,
                         fsdp_config=FSDP_CONFIGS.get(name) if fsdp and not from_env else None, **merge)
        try:
            trainer = ATMTrainer(model=model, args=args, task_datasets=data)  # shards the backbone here
        finally:
            if from_env:
                for k in ACCELERATE_FSDP_ENV:
                    os.environ.pop(k, None)
        trainer.train()
        if best:  # the saved folder the test loads (a collective with a sharded backbone)
            trainer.save_model(str(out / name / "model"))
        ex = trainer.exchange
        rank = ex.rank
        full = full_state_dict(model)  # a collective with a sharded backbone; None without
        state = full if full is not None else {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if name == "fsdp_mean":
            n, t = next((n, t) for n, t in local_tensors(model).items() if t.dim() == 2)
            info["local_rows"] = {"name": n, "local": int(t.shape[0]), "full": int(state[f"backbone.{n}"].shape[0])}
        if trainer.is_world_process_zero():
            save_file(state, str(out / f"{name}.safetensors"))
            (out / f"{name}.json").write_text(json.dumps(
                {"accuracy": [h["accuracy"] for h in trainer.history], "cosine": trainer.history[-1]["cosine"],
                 "steps": trainer.state.global_step, "world_size": ex.world_size, "best_round": trainer.best_round,
                 "sharded": backbone_sharded(model), "checkpoints": sorted(p.name for p in (out / name).glob(
                     "checkpoint-round-*"))}))
        if fsdp and name == "fsdp_mean":
            info.update(_sharded_trainer_checks(trainer, args, data, out))
    if fsdp:
        info["resumed_equal"] = _resume_sharded(out, data, rows)
        info["task_parallel"] = _task_parallel_under_accelerate_fsdp(out, data)
    (out / f"fsdp-rank-{rank}.json").write_text(json.dumps(info))


def _sharded_trainer_checks(trainer: ATMTrainer, args: ATMConfig, data, out: Path) -> dict[str, object]:
    """With the trained, sharded model of `trainer`: what predict() says, whether a second ATMTrainer on the
    same model reuses its sharding (and evaluates as the first), and what loading a checkpoint of another
    shape says."""
    from hf_atm.atm.sharding import load_backbone_folder_

    info: dict[str, object] = {}
    try:
        trainer.predict(data["digit"]["test"], task="digit")
        info["predict"] = "accepted"
    except ValueError as e:
        info["predict"] = str(e)
    model = trainer.model
    second = ATMTrainer(model=model, args=args, task_datasets=data)
    val = {t: trainer.task_data[t]["validation"] for t in trainer.task_names}
    info["second_trainer"] = {"sharded": second.exchange.sharded and backbone_sharded(model),
                              "same_accuracies": second.accuracies(val) == trainer.accuracies(val)}
    refused = {}
    for key, kw in (("without_fsdp", {}),  # the sharded model, FSDP not configured
                    ("no_such_layer", dict(fsdp=True, fsdp_config={"transformer_layer_cls_to_wrap": ["NoSuchLayer"]}))):
        try:
            other_args = ATMConfig(output_dir=str(out / key), rounds=1, report_to="none", disable_tqdm=True,
                                   save_strategy="no", use_cpu=True, atm_parallel_mode="data_parallel", **kw)
            ATMTrainer(model=model if key == "without_fsdp" else _model(data), args=other_args, task_datasets=data)
            refused[key] = "accepted"
        except ValueError as e:
            refused[key] = str(e)
    info["refused"] = refused
    other = MultiTaskModel.from_backbone(tiny_vit(seed=1, dtype=torch.float64, hidden_size=16, intermediate_size=32),
                                         {t: TASK_LABELS[t] for t in data}, seed=1)
    folder = out / "other-shape"
    other.write_files(folder)  # transformers writes on rank 0 only (torch.distributed initialised)
    trainer.exchange.barrier()
    try:
        load_backbone_folder_(model, folder)
        info["other_shape"] = "accepted"
    except Exception as e:  # noqa: BLE001 - the test checks the type and message
        info["other_shape"] = f"{type(e).__name__}: {e}"
    return info


def _resume_sharded(out: Path, data, rows: int) -> bool:
    """Resume the sharded mean run from its round-1 checkpoint (a fresh model, sharded at construction, loaded
    whole on the CPU, each rank taking its rows) and say whether round 2 gives the uninterrupted run's weights
    bit for bit."""
    from safetensors.torch import load_file

    model = _model(data)
    args = ATMConfig(output_dir=str(out / "resumed"), rounds=2, epochs_per_round=1.0, per_device_train_batch_size=rows,
                     learning_rate=1e-2, report_to="none", disable_tqdm=True, save_strategy="epoch",
                     eval_strategy="epoch", load_best_model_at_end=True, seed=3, use_cpu=True, logging_steps=100,
                     atm_parallel_mode="data_parallel", fsdp=True)
    trainer = ATMTrainer(model=model, args=args, task_datasets=data)
    trainer.train(resume_from_checkpoint=str(out / "fsdp_mean" / "checkpoint-round-1"))
    resumed = full_state_dict(model)
    uninterrupted = load_file(str(out / "fsdp_mean.safetensors"))
    return set(resumed) == set(uninterrupted) and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def _task_parallel_under_accelerate_fsdp(out: Path, data) -> str:
    """What ATMTrainer says to atm_parallel_mode='task_parallel' under accelerate's FSDP config (the
    environment ``accelerate launch --use_fsdp`` sets)."""
    os.environ.update(ACCELERATE_FSDP_ENV)
    try:
        args = ATMConfig(output_dir=str(out / "tp"), rounds=1, report_to="none", disable_tqdm=True,
                         save_strategy="no", use_cpu=True, atm_parallel_mode="task_parallel")
        ATMTrainer(model=_model(data), args=args, task_datasets=data)
        return "accepted"
    except ValueError as e:
        return str(e)
    finally:
        for k in ACCELERATE_FSDP_ENV:
            os.environ.pop(k, None)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("rows", type=int)
    p.add_argument("--fsdp", action="store_true")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    run(a.out, a.rows, a.fsdp)
