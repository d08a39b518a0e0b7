"""ATM's overhead against a plain ``transformers.Trainer`` making the same optimizer steps.

Both train the same 4-layer BERT (width 256) with the same batch size, optimizer (AdamW) and number of
optimizer steps on the same synthetic token data: ATM runs K rounds x E epochs over T tasks; the plain
Trainer trains a ``BertForSequenceClassification`` of the same size for the same total number of steps on
the union of the tasks' training data. Reported: ATM's extra wall time (merging and per-round setup;
evaluation, checkpoints and plots excluded) as a share of training time, with a breakdown. Target: <= 5%.

    python benchmarks/atm_overhead.py [--rounds 3] [--epochs 1] [--tasks 3] [--examples 128] [--repeats 3] [--threads 2]

Each configuration runs ``--repeats`` times, alternating which one goes first; the fastest runs and the
median ratio of paired (adjacent) runs are printed (the machine may be shared). Runs on CPU (``--threads``) or, when available, CUDA.
"""

from __future__ import annotations

import argparse
import os
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
    TrainingArguments,
    logging,
)

from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel  # noqa: E402

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--examples", type=int, default=128, help="training examples per task")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
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
    sys.exit(0)


if __name__ == "__main__":
    main()
