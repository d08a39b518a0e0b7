"""What the ATM recipes (atm_vit.py, atm_text.py) share: their command line, the baselines at ATM's budget and
their common tail (test accuracy beside the baselines, the saved and optionally pushed model folder, the result
table). A recipe imports it as ``common``: Python puts the script's own folder first on ``sys.path``, with
``python recipes/X.py`` and ``accelerate launch recipes/X.py`` alike.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, PreTrainedTokenizerBase

from hf_atm import ATMConfig, ATMTrainer, MultiTaskModel, finetune_individual, one_shot_merge
from hf_atm.atm.heads import shared_heads
from hf_atm.atm.history import main_scores
from hf_atm.atm.report import accuracy_row, format_table, test_scores
from hf_atm.files import atomic_write_json, atomic_write_text

# ATMConfig defaults every recipe shares, sized for a few minutes on two CPU cores; a recipe's own defaults
# win over these, and any flag given on the command line wins over both.
SHARED_DEFAULTS: dict[str, Any] = {"epochs_per_round": 1, "weight_decay": 0.01, "logging_steps": 20,
                                   "report_to": "none", "save_total_limit": 2, "dataloader_num_workers": 0}


def parse_args(script_class: type, **defaults: Any) -> tuple[Any, ATMConfig]:
    """``(script options, ATMConfig)`` parsed by ``HfArgumentParser`` from the command line (``sys.argv``) over
    :data:`SHARED_DEFAULTS` and the recipe's `defaults` (ATMConfig field name -> value). An unknown option
    raises ``ValueError`` naming it, before anything is written."""
    flags = [item for name, value in {**SHARED_DEFAULTS, **defaults}.items() for item in (f"--{name}", str(value))]
    script, args = HfArgumentParser((script_class, ATMConfig)).parse_args_into_dataclasses(args=flags + sys.argv[1:])
    return script, args


def label_names(suite: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{task: label names}`` of a suite (``{task: DatasetDict}`` whose ``labels`` column is a ClassLabel)."""
    return {task: ds["train"].features["labels"].names for task, ds in suite.items()}


def parse_sources(value: str | None) -> dict[str, str] | None:
    """``--sources``: a JSON object ``{task: dataset}`` (Hub repo id, ``repo:config`` or a local folder that
    ``load_dataset`` / ``load_from_disk`` reads) overriding where a Hub suite's tasks come from; None when not
    given. ``ValueError`` naming the option for anything else."""
    if value is None:
        return None
    try:
        sources = json.loads(value)
    except ValueError as e:
        raise ValueError(f"--sources must be a JSON object {{task: dataset}}: {e}") from e
    if not isinstance(sources, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                for k, v in sources.items()):  # fmt: skip
        raise ValueError(f"--sources must be a JSON object {{task: dataset}} of strings, got {value!r}")
    return sources


def data_cap(value: int | None) -> int | None:
    """``--max_train_per_task`` / ``--max_test_per_task``: 0 (or None) means every example (None: the data
    loaders' "no cap"); a positive integer caps each task; a negative one raises ``ValueError``."""
    if value is None or value == 0:
        return None
    if value < 0:
        raise ValueError(f"a per-task cap must be a positive integer, or 0 for all the data, got {value!r}")
    return value


def parse_tasks(value: str | None) -> list[str] | None:
    """``--tasks``: comma-separated task names (a subset of the suite's), None for the suite's defaults."""
    if value is None:
        return None
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--tasks must name at least one task, got {value!r}")
    return tasks


def same_heads(make_model: Callable[[], MultiTaskModel], head_init: str, suite: Mapping[str, Any], args: ATMConfig,
               processing_class: Any | None = None) -> Callable[[], MultiTaskModel]:
    """The model factory every method compared starts from: fresh copies of ``make_model()`` that all carry the
    heads of protocol `head_init`, computed once (``hf_atm.atm.heads.shared_heads``; a tokenizer among
    `processing_class` embeds label descriptions for text ``zero_shot`` and pads ``linear_probe`` /
    ``prototypes`` batches). An unknown `head_init` is refused before anything is built."""
    tokenizer = processing_class if isinstance(processing_class, PreTrainedTokenizerBase) else None
    return shared_heads(make_model, head_init, suite, tokenizer=tokenizer, seed=args.seed,
                        batch_size=args.per_device_eval_batch_size)  # fmt: skip


@dataclass
class Results:
    """The comparison a recipe prints: one test row of main scores per method (``hf_atm.atm.report.accuracy_row``,
    each naming its tasks' metrics), normalized by `reference`, the individually fine-tuned models' main scores,
    when the baselines ran."""

    reference: dict[str, float] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, method: str, scores: Mapping[str, float], metric: Mapping[str, str] | None = None) -> None:
        """Append the row of `method` with its per-task test main `scores`, by `metric` (``{task: metric
        name}``; default accuracy)."""
        self.rows.append(accuracy_row(method, scores, self.reference, metric))


def run_baselines(new_model: Callable[[], MultiTaskModel], args: ATMConfig, suite: Mapping[str, Any],
                  processing_class: Any | None = None) -> Results:
    """Individual fine-tuning and one-shot task arithmetic (scale tuned on validation), both at ATM's budget
    of ``rounds x epochs_per_round`` epochs per task, on a model from `new_model` (:func:`same_heads`: the
    heads ATM starts from too); their test rows, with the individual accuracies as the reference."""
    budget = args.rounds * args.epochs_per_round
    model = new_model()
    individual = finetune_individual(model, args, suite, budget_epochs=budget, processing_class=processing_class)
    results = Results(reference=individual.reference_accuracies("test"))
    results.add(f"individual ({budget:g} ep)", results.reference, individual.entries["test"].get("metric"))
    ta = one_shot_merge(model, individual, args, suite, "task_arithmetic", reference_accuracies=results.reference,
                        processing_class=processing_class)
    results.add(f"task arithmetic (scale {ta.scale:.2f})", main_scores(ta.entries["test"]),
                ta.entries["test"].get("metric"))
    return results


def finish(trainer: ATMTrainer, results: Results, title: str) -> dict[str, float]:
    """The recipes' common tail, after ``trainer.train()``; every process calls it (saving is collective).

    ATM's test accuracy becomes the last row of `results`; the model folder (backbone, heads, tokenizer or
    processor, model card, history.json and plots) is saved into ``args.output_dir`` and, with
    ``--push_to_hub``, pushed; the main process then writes the table there as results.md and results.json
    and prints it under `title`. Returns the test metrics.
    """
    args = trainer.args
    metrics = trainer.evaluate(split="test", metric_key_prefix="test")
    names = trainer.metric_names()
    results.add(f"ATM ({args.rounds} x {args.epochs_per_round:g} ep)", test_scores(metrics, names), names)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        table = format_table(results.rows, names)
        atomic_write_text(Path(args.output_dir, "results.md"), table + "\n")
        atomic_write_json(Path(args.output_dir, "results.json"), results.rows, indent=2)
        label = "accuracy" if set(names.values()) == {"accuracy"} else "main score per task"
        print(f"\nTest {label} (%), {title}:\n{table}")
        print(f"\nhistory, plots and model: {args.output_dir}")
    return metrics
