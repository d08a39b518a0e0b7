"""Run small ATM trainings, in one process or under ``accelerate launch`` with several processes.

Usage: ``python atm_dist_run.py OUT_DIR`` (or through ``accelerate launch ... atm_dist_run.py OUT_DIR``);
``--data-parallel-rows ROWS`` adds one ATM run with ``atm_parallel_mode="data_parallel"``
and ``ROWS`` rows per device (the test runs 2 processes x 8 rows against 1 process x 16 rows); ``--collector``
adds :func:`collector_checks` (no model, on the launched process group): the exchange's
collectives, the collector's merge across processes and the data-parallel helpers; ``--metrics`` adds the run
of ``metrics_dist_run.py`` into ``OUT_DIR/metrics``; ``--fsdp-rows ROWS`` adds the FSDP runs of
``atm_fsdp_run.py`` into ``OUT_DIR/fsdp`` (one launch for every multi-process test of the suite).

For each merge setting (task arithmetic merged with one all-reduce; TIES, which needs every task vector), it
trains the same model on the same digits tasks and writes, on the main process, ``<name>.safetensors`` (the
final backbone and heads) and ``<name>.json`` (history); every process writes ``rank-<r>.json`` with the tasks
it fine-tuned, so the test can check that each process really ran.
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

import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from scripts.atm_data import TASK_LABELS, digits_tasks, tiny_vit  # noqa: E402
from torch import nn  # noqa: E402

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel  # noqa: E402
from hf_atm.atm.distributed import DeltaCollector, TaskExchange  # noqa: E402
from hf_atm.merging.spec import MergeSpec  # noqa: E402

SETTINGS = {
    "ta_allreduce": dict(merge_method="task_arithmetic", compute_cosine=False),
    "ties_gather": dict(merge_method="ties", merge_density=0.5, merge_scale=0.6),
}


def main(out: Path) -> None:
    data = digits_tasks(("digit", "parity", "high"), n_train=32, n_val=16, n_test=16, seed=2)
    trained: dict[str, list[str]] = {}
    rank = 0
    for name, extra in SETTINGS.items():
        model = MultiTaskModel.from_backbone(tiny_vit(seed=1, hidden_dropout_prob=0.1),
                                             {t: TASK_LABELS[t] for t in data}, seed=1)
        args = ATMConfig(output_dir=str(out / name), rounds=2, steps_per_round=2, per_device_train_batch_size=8,
                         **{"learning_rate": 1e-2, **extra}, report_to="none", disable_tqdm=True, save_strategy="no", seed=3,
                         use_cpu=True, logging_steps=100)
        trainer = ATMTrainer(model=model, args=args, task_datasets=data)
        trainer.train()
        rank = trainer.exchange.rank
        trained[name] = trainer.exchange.my_tasks()
        if trainer.is_world_process_zero():
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(out / f"{name}.safetensors"))
            (out / f"{name}.json").write_text(json.dumps(
                {"accuracy": [h["accuracy"] for h in trainer.history], "cosine": trainer.history[-1]["cosine"],
                 "world_size": trainer.exchange.world_size}))
    (out / f"rank-{rank}.json").write_text(json.dumps(trained))


def main_data_parallel(out: Path, rows: int) -> None:
    """One data-parallel ATM run (`rows` rows per device) of a float64 model (so that float32 rounding of the
    gradient's summation order, which Adam amplifies to ~1e-4, does not hide a real difference) with dropout 0
    (the per-rank forward passes then draw no random masks): the main process writes ``data_parallel.safetensors`` / ``.json``; every process
    writes ``dp-rank-<r>.json`` with the tasks it fine-tuned and evaluated."""
    data = digits_tasks(("digit", "parity", "high"), n_train=32, n_val=16, n_test=16, seed=2)
    model = MultiTaskModel.from_backbone(tiny_vit(seed=1, dtype=torch.float64), {t: TASK_LABELS[t] for t in data},
                                         seed=1).to(torch.float64)
    args = ATMConfig(output_dir=str(out / "data_parallel"), rounds=2, epochs_per_round=1.0,
                     per_device_train_batch_size=rows, learning_rate=1e-2, report_to="none", disable_tqdm=True,
                     save_strategy="no", seed=3, use_cpu=True, logging_steps=100, atm_parallel_mode="data_parallel")
    trainer = ATMTrainer(model=model, args=args, task_datasets=data)
    trainer.train()
    ex = trainer.exchange
    if trainer.is_world_process_zero():
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  str(out / "data_parallel.safetensors"))
        (out / "data_parallel.json").write_text(json.dumps(
            {"accuracy": [h["accuracy"] for h in trainer.history], "cosine": trainer.history[-1]["cosine"],
             "steps": trainer.state.global_step, "world_size": ex.world_size}))
    (out / f"dp-rank-{ex.rank}.json").write_text(json.dumps({"tuned": ex.my_tasks(), "evaluated": ex.my_eval_tasks()}))


# -- collectives on a plain process group (spawned by the tests) ---------------------------------------------
COLLECTOR_TASKS = ("t0", "t1", "t2")
COLLECTOR_SHAPES = {"a": (6, 5), "b": (7,), "untouched": (4, 4)}
COLLECTOR_SPECS = {
    "task_arithmetic": MergeSpec(method="task_arithmetic", scale=0.5),
    "dare_linear": MergeSpec(method="dare_linear", density=0.5, seed=4),
    "ties": MergeSpec(method="ties", density=0.5, scale=0.7),
}


def collector_taus() -> dict[str, dict[str, torch.Tensor]]:
    """Seeded task vectors of the collector checks: every task touches ``a`` and ``b``, none touches
    ``untouched`` (a LoRA round's frozen weights)."""
    g = torch.Generator().manual_seed(7)
    return {t: {n: torch.randn(COLLECTOR_SHAPES[n], generator=g) for n in ("a", "b")} for t in COLLECTOR_TASKS}


def collector_checks(out: str) -> None:
    """On every process of an initialised process group: merges :func:`collector_taus` with every spec of
    ``COLLECTOR_SPECS`` (task-parallel ownership, cosines on) and checks the data-parallel helpers; writes
    ``collector-<rank>.safetensors`` (deltas, Grams) and ``collector-<rank>.json`` (collective counts,
    shard rows, synced gradients)."""
    rank = dist.get_rank()
    taus = collector_taus()
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, object] = {}
    for key, spec in COLLECTOR_SPECS.items():
        ex = TaskExchange(list(COLLECTOR_TASKS))
        calls = {"all_reduce_sum": 0, "all_gather_chunks": 0}
        for fn in calls:
            original = getattr(ex, fn)

            def counted(*a, _fn=fn, _original=original, _calls=calls, **kw):
                _calls[_fn] += 1
                return _original(*a, **kw)

            setattr(ex, fn, counted)
        col = DeltaCollector(ex, spec, list(COLLECTOR_SHAPES), COLLECTOR_SHAPES,
                             {n: torch.float32 for n in COLLECTOR_SHAPES}, compute_cosine=True)
        for t in ex.my_tasks():
            col.add(t, taus[t])
        delta, gram = col.finish()
        tensors.update({f"{key}/{n}": v for n, v in delta.items()})
        tensors[f"{key}/gram"] = gram
        info[key] = {"calls": calls, "exchanged": col.exchanged_names, "mine": ex.my_tasks()}
    dp = TaskExchange(list(COLLECTOR_TASKS), "data_parallel")
    # data_parallel merge: every rank adds every task; nothing exchanged but the partial Grams (one all-reduce)
    dp_calls = {"all_reduce_sum": 0, "all_gather_chunks": 0}
    for fn in dp_calls:
        original = getattr(dp, fn)

        def counted(*a, _fn=fn, _original=original, **kw):
            dp_calls[_fn] += 1
            return _original(*a, **kw)

        setattr(dp, fn, counted)
    col = DeltaCollector(dp, COLLECTOR_SPECS["task_arithmetic"], list(COLLECTOR_SHAPES), COLLECTOR_SHAPES,
                         {n: torch.float32 for n in COLLECTOR_SHAPES}, compute_cosine=True)
    for t in dp.my_tasks():
        col.add(t, taus[t])
    delta, gram = col.finish()
    tensors.update({f"dp/{n}": v for n, v in delta.items()})
    tensors["dp/gram"] = gram
    info["dp_merge"] = {"calls": dict(dp_calls), "spilled": col.spilled_bytes}
    for fn in dp_calls:
        delattr(dp, fn)  # back to the class's methods
    batch = {"pixel_values": torch.arange(10.0).view(5, 2), "labels": torch.arange(5), "task": "t0"}
    lin = nn.Linear(2, 1)
    for p in lin.parameters():
        p.grad = torch.full_like(p, float(rank + 1))
    dp.sync_gradients_(lin.parameters())
    # a bucket smaller than one gradient (every gradient its own all-reduce: the multi-bucket path), and
    # buffers with broadcast_buffers off (each rank keeps its own) and on (rank 0's)
    small = TaskExchange(list(COLLECTOR_TASKS), "data_parallel", grad_bucket_mb=1e-6)  # 1 byte
    lin3 = nn.Linear(3, 2)
    for i, p in enumerate(lin3.parameters()):
        p.grad = torch.full_like(p, float((rank + 1) * (i + 1)))
    small.sync_gradients_(lin3.parameters())
    bn = nn.BatchNorm1d(2)
    bn.running_mean.fill_(float(rank + 1))
    TaskExchange(list(COLLECTOR_TASKS), "data_parallel", broadcast_buffers=False).sync_buffers_(bn)
    kept = bn.running_mean.tolist()
    dp.sync_buffers_(bn)
    info["data_parallel"] = {
        "my_tasks": dp.my_tasks(), "my_eval_tasks": dp.my_eval_tasks(), "global_batch": dp.global_batch_size(4),
        "shard_labels": dp.shard_batch(batch)["labels"].tolist(),
        "small_batch_labels": dp.shard_batch({"labels": torch.arange(1)})["labels"].tolist(),
        "grads": [p.grad.flatten().tolist() for p in lin.parameters()],
        "small_bucket_grads": [p.grad.flatten().tolist() for p in lin3.parameters()],
        "buffers_not_broadcast": kept, "buffers_broadcast": bn.running_mean.tolist(),
        "stats": dp.reduce_task_stats(torch.tensor([2.0, float(rank)])).tolist(),
        "merged_dicts": dp.merge_dicts({f"task{rank}": {"f1": float(rank)}}),  # per-task compute_metrics
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, f"collector-{rank}.safetensors"))
    Path(out, f"collector-{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--data-parallel-rows", type=int, default=0, help="also run main_data_parallel with these rows")
    p.add_argument("--collector", action="store_true", help="also run collector_checks (needs a process group)")
    p.add_argument("--metrics", action="store_true", help="also run metrics_dist_run's run")
    p.add_argument("--fsdp-rows", type=int, default=0, help="also run atm_fsdp_run's FSDP runs with these rows")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    main(a.out)
    if a.data_parallel_rows:
        main_data_parallel(a.out, a.data_parallel_rows)
    if a.collector:
        collector_checks(str(a.out))
    if a.metrics:
        from scripts.metrics_dist_run import main as run_metrics

        (a.out / "metrics").mkdir(exist_ok=True)
        run_metrics(a.out / "metrics")
    if a.fsdp_rows:
        from scripts.atm_fsdp_run import run as run_fsdp

        (a.out / "fsdp").mkdir(exist_ok=True)
        run_fsdp(a.out / "fsdp", a.fsdp_rows, fsdp=True)
