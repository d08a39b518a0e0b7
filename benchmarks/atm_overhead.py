"""ATM's overhead against a plain ``transformers.Trainer`` making the same optimizer steps.

Both train the same 4-layer BERT (width 256) with the same batch size, optimizer (AdamW) and number of
optimizer steps on the same synthetic token data: ATM runs K rounds x E epochs over T tasks; the plain
Trainer trains a ``BertForSequenceClassification`` of the same size for the same total number of steps on
the union of the tasks' training data. Reported: ATM's extra wall time (merging and per-round setup;
evaluation, checkpoints and plots excluded) as a share of training time, with a breakdown. Target: <= 5%.

Then the peak memory per round for 2, 4 and 8 tasks (``--memory-tasks``), for a sum-decomposable merge
(task_arithmetic, cosines on: the defaults) and one that needs every task vector (ties), each configuration
in a fresh subprocess so that no high-water mark carries over:

* the merge's own accounting (:func:`merge_accounting`): bytes of the round snapshot, the collector's
  accumulators / kept task vectors at their peak, and the task vectors spilled to disk for the cosines, for
  this backbone with a collector configured exactly as the trainer's;
* the process's RSS high-water mark at the end of each round (``VmHWM``: everything the process
  touched -- Python, torch, datasets, model, optimizer, activations -- not only the merge);
* on CUDA, ``torch.cuda.max_memory_allocated`` per round (reset at each round's start).

Flat rows in the number of tasks = bounded memory; ``ties`` grows by one task vector per task by design.

    python benchmarks/atm_overhead.py [--rounds 3] [--epochs 1] [--tasks 3] [--examples 128] [--repeats 3] [--threads 2]
                                      [--memory-tasks 2,4,8] [--memory-methods task_arithmetic,ties] [--skip-time]

Each configuration runs ``--repeats`` times, alternating which one goes first; the fastest runs and the
median ratio of paired (adjacent) runs are printed (the machine may be shared). Runs on CPU (``--threads``) or, when available, CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value, concatenate_datasets  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    logging,
)

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel  # noqa: E402
from hf_atm.atm.distributed import DeltaCollector, TaskVectorView, local_exchange  # noqa: E402

VOCAB, SEQ, LABELS = 1000, 32, 4


def bert_config() -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=1024, max_position_embeddings=64, num_labels=LABELS)


def make_tasks(n_tasks: int, n_train: int, seed: int = 0) -> dict[str, DatasetDict]:
    """Synthetic token tasks: the label is which of 4 task-specific 'keyword' sets occurs most."""
    g = torch.Generator().manual_seed(seed)
    feats = Features({"input_ids": Sequence(Value("int64")), "attention_mask": Sequence(Value("int64")),
                      "labels": ClassLabel(names=[f"c{i}" for i in range(LABELS)])})
    out = {}
    for t in range(n_tasks):
        keywords = torch.randperm(VOCAB - 10, generator=g)[: LABELS * 5].view(LABELS, 5) + 10

        def split(n: int, keywords: torch.Tensor = keywords) -> Dataset:
            ids = torch.randint(10, VOCAB, (n, SEQ), generator=g)
            y = torch.randint(0, LABELS, (n,), generator=g)
            pos = torch.randint(1, SEQ, (n, 4), generator=g)
            for i in range(n):
                ids[i, pos[i]] = keywords[y[i], torch.randint(0, 5, (4,), generator=g)]
            ids[:, 0] = 2  # [CLS]
            return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones(n, SEQ, dtype=torch.long)
                                      .tolist(), "labels": y.tolist()}, features=feats)

        out[f"task{t}"] = DatasetDict({"train": split(n_train), "validation": split(16)})
    return out


def run_plain(tasks: dict[str, DatasetDict], steps: int, batch: int, out: str) -> tuple[float, float]:
    """Wall and CPU seconds of a plain Trainer.train() making `steps` optimizer steps (union of the tasks'
    train data)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config())
    union = concatenate_datasets([dd["train"] for dd in tasks.values()])
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                             report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=10_000,
                             seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=union)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    return time.perf_counter() - t0, time.process_time() - c0


def run_atm(tasks: dict[str, DatasetDict], rounds: int, epochs: float, batch: int, out: str) -> dict[str, float]:
    """Wall time of ATMTrainer.train() and its breakdown (trainer.timing)."""
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(AutoModel.from_config(bert_config()),
                                         {t: [f"c{i}" for i in range(LABELS)] for t in tasks})
    args = ATMConfig(output_dir=out, rounds=rounds, epochs_per_round=epochs, per_device_train_batch_size=batch,
                     learning_rate=1e-4, report_to="none", disable_tqdm=True, save_strategy="no",
                     logging_steps=10_000, seed=0)
    trainer = ATMTrainer(model=model, args=args, task_datasets=tasks)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall": wall, "cpu": cpu, "steps": trainer.state.global_step, **trainer.timing}


def rss_high_water_mib() -> float:
    """This process's resident-set high-water mark in MiB: ``VmHWM`` of /proc/self/status on Linux (per
    address space, so fresh after exec -- ``getrusage``'s ``ru_maxrss`` keeps the parent's peak at fork time
    across exec), else ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class RoundPeaks(TrainerCallback):
    """RSS high-water mark (MiB) and, on CUDA, the peak allocated bytes (MiB) at the end of each round."""

    def __init__(self) -> None:
        self.rss: list[float] = []
        self.cuda: list[float] = []

    def on_epoch_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_epoch_end(self, args, state, control, **kw):
        self.rss.append(rss_high_water_mib())
        if torch.cuda.is_available():
            self.cuda.append(torch.cuda.max_memory_allocated() / 2**20)


def merge_accounting(trainer: ATMTrainer) -> dict[str, int]:
    """The bytes one round's merge holds for this trainer's model, tasks and settings: the round snapshot and
    the collector's own accounting (accumulators or kept task vectors at their peak, spill-file bytes),
    replayed with a collector configured exactly as the trainer's (the accounting depends on shapes, dtypes
    and settings, not on the values)."""
    args = trainer.args
    tasks = trainer.task_names
    tensors = trainer.model.backbone_tensors()
    theta = {n: t.detach().clone() for n, t in tensors.items()}
    collector = DeltaCollector(local_exchange(tasks), args.merge_spec(len(tasks)), list(tensors),
                               {n: t.shape for n, t in tensors.items()}, {n: t.dtype for n, t in tensors.items()},
                               args.compute_cosine, merge_device=args.merge_device,
                               accumulate=args.merge_accumulate_dtype)
    for task in tasks:
        collector.add(task, TaskVectorView(tensors, theta))
    spilled = collector.spilled_bytes
    collector.finish()
    return {"snapshot_bytes": sum(t.numel() * t.element_size() for t in theta.values()),
            "collector_peak_bytes": collector.peak_bytes, "spilled_bytes": spilled}


def memory_child(n_tasks: int, method: str, rounds: int, examples: int, batch: int, threads: int) -> dict:
    """One ATM run in this (fresh) process: the peaks of every round, then the merge's accounting."""
    torch.set_num_threads(threads)
    logging.set_verbosity_error()
    tasks = make_tasks(n_tasks, examples)
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(AutoModel.from_config(bert_config()),
                                         {t: [f"c{i}" for i in range(LABELS)] for t in tasks})
    peaks = RoundPeaks()
    with tempfile.TemporaryDirectory() as out:
        args = ATMConfig(output_dir=out, rounds=rounds, epochs_per_round=1.0, per_device_train_batch_size=batch,
                         learning_rate=1e-4, report_to="none", disable_tqdm=True, save_strategy="no",
                         logging_steps=10_000, seed=0, merge_method=method)
        trainer = ATMTrainer(model=model, args=args, task_datasets=tasks, callbacks=[peaks])
        trainer.train()
    return {"merge": merge_accounting(trainer), "rss": peaks.rss, "cuda": peaks.cuda}


def memory_table(a: argparse.Namespace) -> None:
    """Peak memory per round for each number of tasks and method, one fresh subprocess per row."""
    mib = 2**20
    print(f"\nPeak memory per round ({a.rounds} rounds x 1 epoch, {a.examples} examples per task; one fresh process "
          "per row; merge columns: the collector's own accounting for this backbone and these settings):")
    cuda = torch.cuda.is_available()
    print(f"  {'method':16s} {'tasks':>5s} {'snapshot':>9s} {'merge held':>11s} {'spilled':>8s}   "
          f"{'RSS high-water by round (MiB)':30s}" + ("   cuda max allocated by round (MiB)" if cuda else ""))
    for method in a.memory_methods.split(","):
        for n in (int(x) for x in a.memory_tasks.split(",")):
            cmd = [sys.executable, __file__, "--memory-child", json.dumps(
                {"n_tasks": n, "method": method, "rounds": a.rounds, "examples": a.examples, "batch": a.batch,
                 "threads": a.threads})]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                print(f"  {method:16s} {n:5d}  failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            mem = res["merge"]
            snap, held, spill = (mem[k] / mib for k in ("snapshot_bytes", "collector_peak_bytes", "spilled_bytes"))
            rss = ", ".join(f"{v:.0f}" for v in res["rss"])
            line = f"  {method:16s} {n:5d} {snap:8.1f}M {held:10.1f}M {spill:7.1f}M   {rss:30s}"
            if cuda:
                line += "   " + ", ".join(f"{v:.0f}" for v in res["cuda"])
            print(line)
    print("  (snapshot: the round's starting weights; merge held: accumulators (float64 on CPU) or, for ties, the "
          "kept task vectors; spilled: task vectors written to a temporary file for the exact cosines, deleted "
          "after each round)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--examples", type=int, default=128, help="training examples per task")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-tasks", default="2,4,8", help="numbers of tasks of the memory table ('' = none)")
    p.add_argument("--memory-methods", default="task_arithmetic,ties")
    p.add_argument("--skip-time", action="store_true", help="only the memory table")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_child:
        print(json.dumps(memory_child(**json.loads(a.memory_child))))
        return
    if not a.skip_time:
        time_overhead(a)
    if a.memory_tasks:
        memory_table(a)
    sys.exit(0)


def time_overhead(a: argparse.Namespace) -> None:
    """ATM against a plain Trainer at equal optimizer steps (see the module docstring)."""
    torch.set_num_threads(a.threads)
    logging.set_verbosity_error()
    tasks = make_tasks(a.tasks, a.examples)
    steps_per_task = -(-a.examples // a.batch)
    total_steps = a.rounds * a.tasks * int(-(-a.epochs * steps_per_task // 1))
    n_params = sum(p.numel() for p in AutoModel.from_config(bert_config()).parameters())
    device = "cuda" if torch.cuda.is_available() else f"cpu ({a.threads} threads)"
    print(f"ATM overhead benchmark: BERT 4 layers x 256 ({n_params / 1e6:.2f}M params), batch {a.batch}, seq {SEQ}, "
          f"{a.tasks} tasks x {a.examples} examples, {a.rounds} rounds x {a.epochs:g} epoch = {total_steps} "
          f"optimizer steps, device {device}")
    plain, atm = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):  # alternate the order so that neither side always runs first
            if r % 2:
                atm.append(run_atm(tasks, a.rounds, a.epochs, a.batch, os.path.join(tmp, f"atm{r}")))
            plain.append(run_plain(tasks, total_steps, a.batch, os.path.join(tmp, f"plain{r}")))
            if not r % 2:
                atm.append(run_atm(tasks, a.rounds, a.epochs, a.batch, os.path.join(tmp, f"atm{r}")))
    assert all(x["steps"] == total_steps for x in atm), [x["steps"] for x in atm]
    best_plain = min(w for w, _ in plain)
    for x in atm:
        x["net"] = x["wall"] - x["eval"] - x["checkpoint"] - x["report"]
    best = min(atm, key=lambda x: x["net"])
    atm_wall = best["net"]
    other = atm_wall - best["train"] - best["setup"] - best["merge"]
    extra = atm_wall - best_plain
    print(f"plain Trainer.train():        {best_plain:8.2f} s   (runs: {', '.join(f'{w:.2f}' for w, _ in plain)}; "
          f"CPU {', '.join(f'{c:.2f}' for _, c in plain)} s)")
    runs = ", ".join(f"{x['net']:.2f}" for x in atm)
    cpus = ", ".join(f"{x['cpu']:.2f}" for x in atm)
    print(f"ATMTrainer.train() w/o eval:  {atm_wall:8.2f} s   (runs: {runs}; CPU incl. eval {cpus} s)")
    print(f"  breakdown: training steps {best['train']:.2f} s, per-task setup {best['setup']:.3f} s, "
          f"merge {best['merge']:.3f} s, other {other:.3f} s  (excluded: eval {best['eval']:.2f} s, "
          f"history/plots {best['report']:.2f} s)")
    share_breakdown = (best["setup"] + best["merge"] + max(0.0, other)) / best["train"]
    share_wall = extra / best_plain
    print(f"ATM extra (merge + setup + other) / ATM training time: {100 * share_breakdown:5.2f} %   (target <= 5 %)")
    ratios = sorted(x["net"] / w for x, (w, _) in zip(atm, plain))
    median = ratios[len(ratios) // 2]
    print(f"ATM wall time w/o eval vs plain Trainer, fastest runs: {100 * share_wall:+5.2f} %; median of paired "
          f"runs: {100 * (median - 1):+5.2f} %   (wall times are noisy on a shared machine)")


if __name__ == "__main__":
    main()
