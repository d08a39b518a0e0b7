"""Model card (README.md) of an ATM output: per-task results table and model-index eval results.

Metadata: ``tags: [hf_atm, atm, merge]``, ``library_name: transformers``, ``base_model`` = the Hub repo the
run started from (only a Hub repo id; a local folder is named in the text instead). ``base_model_relation``
is ``"finetune"`` in both modes: a PA result is trained (by rounds of gradient steps and merges) from the
pre-trained base, and a PH result is a fine-tuned version of the one merged model it started from; the
Hub's ``"merge"`` relation means "a merge of the models listed in base_model", which neither output is
(the per-task models merged inside the rounds are never published). The ``merge`` tag still marks the method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = ["RunSummary", "atm_model_card", "atm_options_record"]

#: the ATM fields and main training options recorded in ``atm_config.json`` and the run summary.
_OPTION_KEYS = (
    "atm_mode", "rounds", "epochs_per_round", "steps_per_round", "merge_method", "merge_scale",
    "merge_weights", "merge_density", "merge_gamma", "merge_seed", "reset_optimizer_each_round",
    "freeze_heads", "ph_select_fraction", "lora_r", "lora_alpha", "lora_target_modules", "learning_rate",
    "weight_decay", "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "seed",
    "warmup_steps", "bf16",
)


def atm_options_record(args: Any) -> dict[str, Any]:
    """The ATM fields and the main training options of an :class:`~hf_atm.atm.config.ATMConfig`, as written
    to ``atm_config.json`` (no tokens, no paths)."""
    out = {}
    for k in _OPTION_KEYS:
        v = getattr(args, k, None)
        out[k] = v.value if hasattr(v, "value") else v
    out["optim"] = str(getattr(args.optim, "value", args.optim))
    out["lr_scheduler_type"] = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    return out


@dataclass
class RunSummary:
    """What a model card says about an ATM run (built by ATMTrainer and by the federated server).

    Attributes:
        tasks: the task names (sorted).
        history: the per-round history dicts (round 0 first).
        best_round: the round whose weights the result holds (None: the last one).
        test_metrics: ``{"eval_<task>_accuracy": ...}`` on ``test`` when it was evaluated.
        atm_mode / merge_method: the run's mode (``pa`` / ``ph``) and in-loop merge method.
        options: :func:`atm_options_record` of the run's arguments.
        selection: the split the result's round was selected on (None: the last round was kept).
        hub_model_id: the repo name the card defaults its title to.
        base_model: the model the run started from (Hub id or local path; only its name is written).
        pipeline_tag: ``text-classification`` or ``image-classification``.
        reference_accuracies: the normalized-accuracy denominators, when given.
    """

    tasks: list[str]
    history: list[dict[str, Any]]
    best_round: int | None
    test_metrics: dict[str, float] | None
    atm_mode: str
    merge_method: str
    options: dict[str, Any]
    selection: str | None = None
    hub_model_id: str | None = None
    base_model: str | None = None
    pipeline_tag: str = "text-classification"
    reference_accuracies: dict[str, float] | None = None

    @classmethod
    def of_run(
        cls,
        args: Any,
        model: Any,
        *,
        tasks: Sequence[str],
        history: Sequence[Mapping[str, Any]],
        best_round: int | None,
        test_metrics: Mapping[str, float] | None = None,
        selection: str | None = None,
        reference_accuracies: Mapping[str, float] | None = None,
    ) -> RunSummary:
        """The summary of a run with `args` (an ATMConfig) whose result is `model` (a MultiTaskModel)."""
        base = getattr(model, "base_model", None)
        return cls(
            tasks=list(tasks), history=[dict(h) for h in history], best_round=best_round,
            test_metrics=dict(test_metrics) if test_metrics else None, atm_mode=args.atm_mode,
            merge_method=args.merge_method, options=atm_options_record(args), selection=selection,
            hub_model_id=args.hub_model_id, base_model=str(base) if base else None,
            pipeline_tag=_pipeline_tag(model),
            reference_accuracies=dict(reference_accuracies) if reference_accuracies else None,
        )

_TEMPLATE = """---
{card_data}
---

# {title}

This model was trained with **ATM** (Alternating Tuning and Merging, Zhou et al., arXiv 2411.03055) using
`hf_atm`: {rounds} round(s) of per-task fine-tuning followed by a `{method}` merge of the
task vectors (mode `{mode}`{selected}). One shared backbone, one classification head per task.

Base model: {base}

## Results ({split})

{table}

{test_section}## How to use

```python
from hf_atm.atm import MultiTaskModel
model = MultiTaskModel.from_pretrained("<this folder or repo id>")
labels = model.predict("{first_task}", **inputs)  # list of label names
```

The backbone alone loads with `transformers.AutoModel.from_pretrained(...)`; the heads are in
`heads.safetensors`, the tasks and label names in `multitask_config.json`, the per-round history in
`history.json` (plots: `accuracy.png`, `cosine.png`), the options in `atm_config.json`.
"""


def _pipeline_tag(model: Any) -> str:
    cfg = getattr(getattr(model, "backbone", None), "config", None)
    return "image-classification" if getattr(cfg, "num_channels", None) is not None else "text-classification"


def _table(tasks: list[str], acc: dict[str, float], norm: dict[str, float] | None) -> str:
    head = "| task | accuracy |" + (" normalized |" if norm else "")
    sep = "|---|---|" + ("---|" if norm else "")
    rows = [head, sep]
    for t in tasks:
        row = f"| {t} | {acc.get(t, float('nan')):.4f} |"
        if norm:
            row += f" {norm.get(t, float('nan')):.4f} |"
        rows.append(row)
    mean = sum(acc[t] for t in tasks) / len(tasks)
    row = f"| **mean** | **{mean:.4f}** |"
    if norm:
        row += f" **{sum(norm[t] for t in tasks) / len(tasks):.4f}** |"
    rows.append(row)
    return "\n".join(rows)


def atm_model_card(summary: RunSummary, model_name: str | None = None) -> ModelCard:
    """The card of a run's result (the selected round when one was selected, else the last round).

    Eval results (model-index): accuracy per task on the per-round split of that round and, when the test
    split was evaluated, on ``test``.
    """
    from hf_atm.hub.card import hub_repo_id

    tasks = list(summary.tasks)
    history = summary.history
    name = model_name or summary.hub_model_id or f"atm-{summary.atm_mode}-{summary.merge_method}"
    name = str(name).split("/")[-1]
    entry = None
    if history:
        chosen = summary.best_round if summary.best_round is not None else history[-1]["round"]
        entry = next((h for h in history if h["round"] == chosen), history[-1])
    ptag = summary.pipeline_tag
    results: list[EvalResult] = []
    if entry is not None:
        for t in tasks:
            results.append(EvalResult(task_type=ptag, dataset_type=t, dataset_name=t, dataset_split=entry["split"],
                                      metric_type="accuracy", metric_value=float(entry["accuracy"][t])))
    test_acc = None
    if summary.test_metrics:
        test_acc = {t: summary.test_metrics.get(f"eval_{t}_accuracy") for t in tasks}
        for t in tasks:
            if test_acc[t] is not None:
                results.append(EvalResult(task_type=ptag, dataset_type=t, dataset_name=t, dataset_split="test",
                                          metric_type="accuracy", metric_value=float(test_acc[t])))
    base_ref = summary.base_model
    base_id = hub_repo_id(str(base_ref)) if base_ref else None
    data = ModelCardData(
        model_name=name if results else None,
        eval_results=results or None,
        base_model=base_id,
        library_name="transformers",
        tags=["hf_atm", "atm", "merge", summary.merge_method],
        pipeline_tag=ptag,
    )
    if base_id:
        data["base_model_relation"] = "finetune"
    if entry is not None:
        table = _table(tasks, entry["accuracy"], entry["normalized_accuracy"])
        split = f"{entry['split']}, round {entry['round']}"
    else:
        table, split = "(not trained yet)", "none"
    test_section = ""
    if test_acc and all(v is not None for v in test_acc.values()):
        test_section = "## Results (test)\n\n" + _table(tasks, test_acc, None) + "\n\n"
    selected = f", selected round {summary.best_round} on {summary.selection}" if summary.selection else ""
    text = _TEMPLATE.format(
        card_data=data.to_yaml(),
        title=name,
        rounds=history[-1]["round"] if history else 0,
        method=summary.merge_method,
        mode=summary.atm_mode.upper(),
        selected=selected,
        # a local folder is named, never its full path
        base=f"`{base_id}`" if base_id else (f"local folder `{Path(str(base_ref)).name}`" if base_ref else "unknown"),
        split=split,
        table=table,
        test_section=test_section,
        first_task=tasks[0],
    )
    return ModelCard(text)
