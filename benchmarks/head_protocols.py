"""Test accuracy of the pre-trained backbones with each head protocol and no tuning at all.

    python benchmarks/head_protocols.py [--suites text vision] [--max-train N] [--max-test N] [--seed 0]
                                        [--k 16] [--threads 2]

For each embedded suite (``vision``: the pretext-pre-trained ViT of :func:`hf_atm.backbones.pretrained_vit`,
``cls`` pooling; ``text``: all-MiniLM-L6-v2, mean pooling), the backbone is loaded once per protocol, its heads
made by :func:`hf_atm.atm.heads.init_heads_` (``random``, ``linear_probe``, ``prototypes``, and ``zero_shot``
where the backbone embeds text) and every task scored on its test split by ``ATMTrainer.evaluate``. Data as
the recipes load it (``recipes/atm_text.py`` / ``recipes/atm_vit.py``; default caps: text 200 train pool / 200
test per task, vision 1,000 / 500), split seed 0 as in ``benchmarks/reproduce.py``; `--seed` seeds the random
heads and the prototypes' examples. Prints one table per suite (percent).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import SUITE_SETTINGS, Suite  # noqa: E402  (the suites as the reproduction loads them)

from hf_atm.atm.report import accuracy_row, format_table, test_accuracy  # noqa: E402

#: The recipes' default caps (training pool / test examples per task).
RECIPE_CAPS = {"text": (200, 200), "vision": (1000, 500)}
PROTOCOLS = ("random", "linear_probe", "prototypes", "zero_shot")


def protocols_for(suite: Suite) -> list[str]:
    """The head protocols that apply to the suite's backbone (zero_shot needs a backbone that embeds text)."""
    return [p for p in PROTOCOLS if p != "zero_shot" or suite.tokenizer is not None]


def evaluate(suite: Suite, head_init: str, seed: int, k: int, work: str) -> dict[str, float]:
    """Per-task test accuracy of the untuned backbone with heads made by `head_init`."""
    from hf_atm.atm import ATMConfig, ATMTrainer, MultiTaskModel
    from hf_atm.atm.heads import init_heads_

    model = MultiTaskModel.from_backbone(suite.backbone, suite.labels, pooling=suite.pooling, seed=seed)
    init_heads_(model, head_init, suite.data, tokenizer=suite.tokenizer, k=k, seed=seed, batch_size=256)
    args = ATMConfig(output_dir=work, report_to="none", save_strategy="no", per_device_eval_batch_size=256,
                     dataloader_num_workers=0, disable_tqdm=True, seed=seed)
    trainer = ATMTrainer(model=model, args=args, task_datasets=suite.data, processing_class=suite.tokenizer)
    trainer.remove_callback(PrinterCallback)  # the table below says it all
    return test_accuracy(trainer.evaluate(split="test", metric_key_prefix="test"), trainer.task_names)


def run_suite(name: str, a: argparse.Namespace) -> str:
    """The table of suite `name`: one row per protocol, one column per task, and the mean."""
    max_train, max_test = RECIPE_CAPS[name]
    settings = {**SUITE_SETTINGS[name], "max_train": a.max_train or max_train, "max_test": a.max_test or max_test}
    suite = Suite(name, settings)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for head_init in protocols_for(suite):
            t0 = time.perf_counter()
            acc = evaluate(suite, head_init, a.seed, a.k, work)
            label = f"prototypes (k={a.k})" if head_init == "prototypes" else head_init
            rows.append(accuracy_row(label, acc))
            print(f"[{name}] {label}: mean test accuracy {100 * rows[-1]['mean']:.1f} % "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    sizes = ", ".join(f"{t} {len(ds['train'])}/{len(ds['test'])}" for t, ds in suite.data.items())
    skipped = [p for p in PROTOCOLS if p not in protocols_for(suite)]
    note = f"\n({', '.join(skipped)}: not applicable, the backbone embeds no text)" if skipped else ""
    return (f"{name} suite, seed {a.seed} (train/test per task: {sizes}); test accuracy (%), no tuning:\n"
            + format_table(rows) + note)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", nargs="+", default=["text", "vision"], choices=sorted(RECIPE_CAPS))
    p.add_argument("--max-train", type=int, default=None, help="Training pool per task (default: the recipes').")
    p.add_argument("--max-test", type=int, default=None, help="Test examples per task (default: the recipes').")
    p.add_argument("--seed", type=int, default=0, help="Seeds the random heads and the prototypes' examples.")
    p.add_argument("--k", type=int, default=None, help="Examples per class of the prototypes (default 16).")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    from hf_atm.atm.heads import PROTOTYPE_K

    a.k = a.k or PROTOTYPE_K
    torch.set_num_threads(a.threads)
    tables = [run_suite(name, a) for name in a.suites]
    print("\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()
