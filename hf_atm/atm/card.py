"""Model card (README.md) of an ATM output: per-task results table and model-index eval results.

Metadata: ``tags: [hf_atm, atm, merge]``, ``library_name: transformers``, ``base_model`` = the Hub repo the
run started from (only a Hub repo id; a local folder is named in the text instead). ``base_model_relation``
is ``"finetune"`` in both modes: a PA result is trained (by rounds of gradient steps and merges) from the
pre-trained base, and a PH result is a fine-tuned version of the one merged model it started from; the
Hub's ``"merge"`` relation means "a merge of the models listed in base_model", which neither output is
(the per-task models merged inside the rounds are never published). The ``merge`` tag still marks the method.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

if TYPE_CHECKING:
    from hf_atm.atm.trainer import ATMTrainer

__all__ = ["atm_model_card"]

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


def atm_model_card(trainer: ATMTrainer, model_name: str | None = None) -> ModelCard:
    """The card of `trainer`'s current result (the selected round for PH, the last round for PA).

    Eval results (model-index): accuracy per task on the per-round split of the selected round and, when
    ``trainer.evaluate(split="test")`` was run, on ``test``.
    """
    from hf_atm.hub.card import hub_repo_id

    args = trainer.args
    model = trainer.model
    tasks = list(trainer.task_names)
    name = model_name or args.hub_model_id or f"atm-{args.atm_mode}-{args.merge_method}"
    name = str(name).split("/")[-1]
    entry = None
    if trainer.history:
        chosen = trainer.best_round if trainer.best_round is not None else trainer.history[-1]["round"]
        entry = next((h for h in trainer.history if h["round"] == chosen), trainer.history[-1])
    ptag = _pipeline_tag(model)
    results: list[EvalResult] = []
    if entry is not None:
        for t in tasks:
            results.append(EvalResult(task_type=ptag, dataset_type=t, dataset_name=t, dataset_split=entry["split"],
                                      metric_type="accuracy", metric_value=float(entry["accuracy"][t])))
    test_acc = None
    if trainer.test_metrics:
        test_acc = {t: trainer.test_metrics.get(f"eval_{t}_accuracy") for t in tasks}
        for t in tasks:
            if test_acc[t] is not None:
                results.append(EvalResult(task_type=ptag, dataset_type=t, dataset_name=t, dataset_split="test",
                                          metric_type="accuracy", metric_value=float(test_acc[t])))
    base_ref = getattr(model, "base_model", None)
    base_id = hub_repo_id(str(base_ref)) if base_ref else None
    data = ModelCardData(
        model_name=name if results else None,
        eval_results=results or None,
        base_model=base_id,
        library_name="transformers",
        tags=["hf_atm", "atm", "merge", args.merge_method],
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
    selected = f", selected round {trainer.best_round} on held-out validation" if args.atm_mode == "ph" else ""
    text = _TEMPLATE.format(
        card_data=data.to_yaml(),
        title=name,
        rounds=trainer.history[-1]["round"] if trainer.history else 0,
        method=args.merge_method,
        mode=args.atm_mode.upper(),
        selected=selected,
        # a local folder is named, never its full path
        base=f"`{base_id}`" if base_id else (f"local folder `{Path(str(base_ref)).name}`" if base_ref else "unknown"),
        split=split,
        table=table,
        test_section=test_section,
        first_task=tasks[0],
    )
    return ModelCard(text)
