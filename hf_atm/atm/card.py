"""Model card (README.md) of an ATM output: per-task results tables and model-index eval results.

What the card claims, and only that:

* results: each task's main metric (history ``metric`` / ``score``, accuracy when the history names none) on the
  split the result's round was scored on and, when a test evaluation ran (``trainer.evaluate(split="test")``,
  whatever its ``metric_key_prefix``), on the test split; every table names its split and metric;
* model-index (``eval_results``): only for tasks whose test data came from a known Hub dataset's own test split
  (the Hub suites: :func:`hf_atm.data.hub.hub_dataset_source`), with that dataset's id, config and split; a
  task of local data is named in the text and never passed off as a Hub dataset id, and a test set held out of
  a Hub dataset's ``train`` split is named in the text only (a model-index entry would read as a score on the
  training split);
* heads: how they were made (``config.head_init``) and whether the fine-tuning trained them, in the text;
* metadata: ``library_name: hf_atm`` (the folder loads with the package's model class, which registers itself
  with transformers' Auto classes: :data:`hf_atm.atm.export.REGISTER_LINE`), ``tags: [hf_atm, atm, merge,
  <method>, transformers]``; ``pipeline_tag`` only for a single-task folder whose config has that task's
  ``id2label`` and that holds its tokenizer / processor (a multi-task folder serves no pipeline: export a
  task with ``hf-atm export``); ``base_model`` = the backbone's Hub repo id when there is one
  (:func:`hf_atm.hub.resolve.hub_id_of`, the rule export cards follow too; never a local path: a local folder
  is named by its last component in the text). ``base_model_relation`` is ``"finetune"`` in both
  modes: a PA result is trained (by rounds of gradient steps and merges) from the pre-trained base, and a PH
  result is a fine-tuned version of the one merged model it started from; the Hub's ``"merge"`` relation means
  "a merge of the models listed in base_model", which neither output is (the per-task models merged inside the
  rounds are never published). The ``merge`` tag still marks the method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_atm.atm.evaluation import mean_accuracy
from hf_atm.atm.metrics import load_task_metric
from hf_atm.errors import HfAtmError
from hf_atm.hub.resolve import hub_id_of

__all__ = ["RunSummary", "atm_model_card", "atm_options_record", "metric_names", "split_metrics"]

#: the ATM fields and main training options recorded in ``atm_config.json`` and the run summary.
_OPTION_KEYS = (
    "atm_mode", "rounds", "epochs_per_round", "steps_per_round", "merge_method", "merge_scale",
    "merge_scale_candidates", "merge_scale_search_examples", "merge_weights", "merge_density", "merge_gamma",
    "merge_seed", "reset_optimizer_each_round",
    "freeze_heads", "ph_select_fraction", "lora_r", "lora_alpha", "lora_target_modules", "learning_rate",
    "weight_decay", "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "seed",
    "warmup_steps", "bf16", "head_learning_rate",
)


def metric_names(task_metrics: Mapping[str, str] | None) -> dict[str, str] | None:
    """``{task: metric name}`` of ``{task: metric name or module path}``: each metric's
    :func:`~hf_atm.atm.metrics.load_task_metric` name (what history and metric keys call it; a path becomes its
    module's name: no local paths in saved files). A value that is already such a name (a user module's,
    e.g. ``ATMTrainer.metric_names()`` or a saved config's) is kept; a path that does not load raises
    HfAtmError (never written). None for None / empty."""
    if not task_metrics:
        return None
    out = {}
    for t, m in task_metrics.items():
        try:
            out[t] = load_task_metric(m).name
        except HfAtmError:
            if Path(str(m)).name != str(m) or str(m).endswith(".py"):
                raise
            out[t] = str(m)  # a name already (a user module's, which loads by path only)
    return out


def atm_options_record(args: Any, model: Any | None = None, *,
                       task_metrics: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ATM fields and the main training options of an :class:`~hf_atm.atm.config.ATMConfig`, as written
    to ``atm_config.json`` (no tokens, no paths).

    `model` (the run's MultiTaskModel) records the effective head setup: ``freeze_heads`` is whether the
    fine-tuning froze the heads (:func:`hf_atm.atm.heads.heads_trainable`; without `model`, the option as
    given, None when unset), ``head_init`` (and ``head_init_k`` when the config has it) how they were made.
    ``task_metrics``: the run's ``{task: metric}`` (`task_metrics`, e.g. ``ATMTrainer.metric_names()``, else
    ``args.task_metrics``), by name (:func:`metric_names`).
    """
    out = {}
    for k in _OPTION_KEYS:
        v = getattr(args, k, None)
        out[k] = v.value if hasattr(v, "value") else v
    if model is not None:
        from hf_atm.atm.heads import heads_trainable

        config = getattr(model, "config", None)
        out["freeze_heads"] = not heads_trainable(args, model)
        out["head_init"] = getattr(config, "head_init", None)
        if hasattr(config, "head_init_k"):
            out["head_init_k"] = config.head_init_k
    out["task_metrics"] = metric_names(task_metrics or getattr(args, "task_metrics", None))
    out["optim"] = str(getattr(args.optim, "value", args.optim))
    out["lr_scheduler_type"] = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    return out


def split_metrics(metrics: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from Trainer-style metrics ``{"<prefix>_<task>_<metric>": value}``, whatever
    the prefix (``eval``, ``test``, ...): the prefix is the one before ``_mean_accuracy`` or, without that key,
    the one every task's keys share. Longer task names are matched first (task ``a_b`` before ``b``)."""
    keys = [k for k, v in metrics.items() if isinstance(v, (int, float))]
    prefixes = [k[: -len("_mean_accuracy")] for k in keys if k.endswith("_mean_accuracy")]
    if not prefixes:
        for t in tasks:
            prefixes += [k[: k.index(f"_{t}_")] for k in keys if f"_{t}_" in k]
    ordered = sorted(tasks, key=len, reverse=True)
    for prefix in dict.fromkeys(prefixes):
        out: dict[str, dict[str, float]] = {t: {} for t in tasks}
        for k in keys:
            if not k.startswith(prefix + "_"):
                continue
            rest = k[len(prefix) + 1:]
            task = next((t for t in ordered if rest.startswith(t + "_")), None)
            if task is not None:
                out[task][rest[len(task) + 1:]] = float(metrics[k])
        if all(out.values()):
            return out
    return {}


def _local_name(model: Any) -> str | None:
    """The last path component of a local backbone folder (what the card names instead of a path)."""
    ref = getattr(model, "backbone_source", None)
    legacy = getattr(model, "base_model", None)
    for r in (ref, legacy if isinstance(legacy, str) else None):
        if isinstance(r, str) and r:
            return Path(r).name or r
    return None


def _serves_pipeline(model: Any, tasks: Sequence[str]) -> bool:
    """Whether the folder answers ``pipeline(<task type>)`` itself: one task, its labels in ``config.id2label``."""
    if len(tasks) != 1:
        return False
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    labels = list(getattr(model, "tasks", {}).get(tasks[0], []))
    return bool(labels) and [id2label.get(i, id2label.get(str(i))) for i in range(len(labels))] == labels


@dataclass
class RunSummary:
    """What a model card says about an ATM run (built by ATMTrainer and by the federated server).

    Attributes:
        tasks: the task names (sorted).
        history: the per-round history dicts (round 0 first).
        best_round: the round whose weights the result holds (None: the last one).
        test_metrics: Trainer-style metrics of the test evaluation, ``{"<prefix>_<task>_<metric>": ...}`` with
            any prefix (``test`` from ``evaluate(split="test", metric_key_prefix="test")``), when it ran.
        atm_mode / merge_method: the run's mode (``pa`` / ``ph``) and in-loop merge method.
        options: :func:`atm_options_record` of the run's arguments.
        selection: the split the result's round was selected on (None: the last round was kept).
        hub_model_id: the repo name the card defaults its title to.
        base_model: the backbone's Hub repo id (:func:`hf_atm.hub.resolve.hub_id_of`), or None.
        pipeline_tag: the task type, ``text-classification`` or ``image-classification`` (the model-index's
            ``task.type``; the card's ``pipeline_tag`` only when `serves_pipeline`).
        reference_accuracies: the normalized-accuracy denominators, when given.
        datasets: ``{task: hf_atm.data.hub.hub_dataset_source(test split)}`` for tasks from Hub datasets.
        task_metrics: ``{task: main metric name}`` when the history does not name them (default accuracy).
        heads: how the heads were made and trained, as said in the text (:func:`heads_text`), or None.
        serves_pipeline: the folder answers ``pipeline(pipeline_tag)`` itself (one task, its id2label, and a
            tokenizer / processor saved with it).
        base_name: a local backbone folder's last component, named in the text when there is no Hub id.
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
    datasets: dict[str, dict[str, Any]] | None = None
    task_metrics: dict[str, str] | None = None
    serves_pipeline: bool = False
    base_name: str | None = None
    heads: str | None = None

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
        datasets: Mapping[str, Mapping[str, Any]] | None = None,
        task_metrics: Mapping[str, str] | None = None,
        processor_saved: bool = True,
    ) -> RunSummary:
        """The summary of a run with `args` (an ATMConfig) whose result is `model` (a MultiTaskModel);
        `datasets` as :attr:`datasets` (``hf_atm.data.hub.hub_dataset_sources(task data)``); `task_metrics`
        the run's ``{task: metric}`` (``ATMTrainer.metric_names()``; default: the model's
        ``config.task_metrics``); `processor_saved` False when the folder carries no tokenizer / processor
        (a pipeline could not preprocess its inputs: no ``pipeline_tag`` is claimed)."""
        configured = task_metrics or getattr(getattr(model, "config", None), "task_metrics", None)
        options = atm_options_record(args, model, task_metrics=configured if configured else None)
        return cls(
            tasks=list(tasks), history=[dict(h) for h in history], best_round=best_round,
            test_metrics=dict(test_metrics) if test_metrics else None, atm_mode=args.atm_mode,
            merge_method=args.merge_method, options=options, selection=selection,
            hub_model_id=args.hub_model_id, base_model=hub_id_of(model), pipeline_tag=_pipeline_tag(model),
            reference_accuracies=dict(reference_accuracies) if reference_accuracies else None,
            datasets={t: dict(d) for t, d in datasets.items() if t in tasks} if datasets else None,
            task_metrics=metric_names(configured) if isinstance(configured, Mapping) else None,
            serves_pipeline=processor_saved and _serves_pipeline(model, list(tasks)), base_name=_local_name(model),
            heads=heads_text(options),
        )  # fmt: skip


def heads_text(options: Mapping[str, Any]) -> str | None:
    """The card's sentence on the heads, from :func:`atm_options_record`'s ``head_init`` / ``freeze_heads``
    (None when the record names neither)."""
    init, frozen = options.get("head_init"), options.get("freeze_heads")
    if init is None and frozen is None:
        return None
    made = f"made by the `{init}` head protocol" if init else "made by an unrecorded protocol"
    if init == "random":
        made = "initialised at random (`random` head protocol)"
    k = options.get("head_init_k")
    made += f" (k = {k})" if k is not None and init == "prototypes" else ""
    state = {True: "frozen during the fine-tuning (not trained)", False: "trained with each task's fine-tuning",
             None: "frozen or trained: not recorded"}[frozen]
    return f"Heads: {made}, {state}."


_TEMPLATE = """---
{card_data}
---

# {title}

This model was trained with **ATM** (Alternating Tuning and Merging, Zhou et al., arXiv 2411.03055) using
`hf_atm`: {rounds} round(s) of per-task fine-tuning followed by a `{method}` merge of the
task vectors (mode `{mode}`{selected}). One shared backbone, one classification head per task.

Base model: {base}

Tasks: {task_list}.

{heads}## Results ({split})

{table}

{test_section}## How to use

```python
{register_line}
model = MultiTaskModel.from_pretrained("<this folder or repo id>")
labels = model.predict("{first_task}", **inputs)  # list of label names
```

{pipeline_note}

The per-round history is in `history.json` (plots: `accuracy.png`, `cosine.png`), the options in
`atm_config.json`.
"""


def _pipeline_tag(model: Any) -> str:
    cfg = getattr(getattr(model, "backbone", None), "config", None)
    vision = getattr(cfg, "num_channels", None) is not None or hasattr(cfg, "vision_config")
    return "image-classification" if vision else "text-classification"


def _main_metrics(summary: RunSummary, entry: Mapping[str, Any] | None) -> dict[str, str]:
    """``{task: main metric name}``: the history entry's ``metric``, else the summary's, else accuracy."""
    named = dict((entry or {}).get("metric") or {})
    configured = summary.task_metrics or {}
    return {t: str(named.get(t) or configured.get(t) or "accuracy") for t in summary.tasks}


def _entry_scores(entry: Mapping[str, Any], metrics: Mapping[str, str]) -> dict[str, float]:
    """A history entry's main-metric score per task (``score``, else ``accuracy`` for accuracy tasks)."""
    scores = dict(entry.get("score") or {})
    acc = dict(entry.get("accuracy") or {})
    out = {}
    for t, m in metrics.items():
        value = scores.get(t, acc.get(t) if m == "accuracy" else None)
        if value is not None:
            out[t] = float(value)
    return out


def _test_scores(summary: RunSummary, metrics: Mapping[str, str]) -> dict[str, float]:
    """The test evaluation's main-metric value per task (tasks whose metric key is absent are left out)."""
    if not summary.test_metrics:
        return {}
    per_task = split_metrics(summary.test_metrics, summary.tasks)
    out = {}
    for t, m in metrics.items():
        if m in per_task.get(t, {}):
            out[t] = per_task[t][m]
    return out


def _table(tasks: list[str], metrics: Mapping[str, str], values: Mapping[str, float],
           norm: Mapping[str, float] | None) -> str:
    head = "| task | metric | value |" + (" normalized |" if norm else "")
    sep = "|---|---|---|" + ("---|" if norm else "")
    rows = [head, sep]
    for t in tasks:
        row = f"| {t} | {metrics[t]} | {values.get(t, float('nan')):.4f} |"
        if norm:
            row += f" {norm.get(t, float('nan')):.4f} |"
        rows.append(row)
    if all(t in values for t in tasks):
        row = f"| **mean** | {'accuracy' if set(metrics.values()) == {'accuracy'} else 'mean score'} | " \
              f"**{mean_accuracy({t: values[t] for t in tasks}):.4f}** |"
        if norm:
            row += f" **{mean_accuracy({t: norm.get(t, float('nan')) for t in tasks}):.4f}** |"
        rows.append(row)
    return "\n".join(rows)


def _source_text(task: str, source: Mapping[str, Any] | None) -> str:
    if not source:
        return f"`{task}` (local data)"
    config = f", config `{source['config']}`" if source.get("config") else ""
    return f"`{task}` ([{source['id']}](https://huggingface.co/datasets/{source['id']}){config})"


def _held_out_of_train(source: Mapping[str, Any]) -> bool:
    """The test set was held out of the Hub dataset's ``train`` split (the dataset has no labelled test split)."""
    return source.get("split") == "train"


def _test_split_text(datasets: Mapping[str, Mapping[str, Any]]) -> str:
    """Which Hub split (and how much of it) each Hub task's test set is."""
    parts = []
    for t, d in datasets.items():
        of = f" of {d['split_examples']}" if d.get("split_examples") else ""
        if _held_out_of_train(d):
            parts.append(f"`{t}`: {d['examples']} examples held out of split `train` (never trained on; not in "
                         "the model-index, which would read as a score on the training split)")
        else:
            parts.append(f"`{t}`: {d['examples']}{of} examples of split `{d['split']}`")
    return ("Test sets: " + "; ".join(parts) + ".\n\n") if parts else ""


def atm_model_card(summary: RunSummary, model_name: str | None = None) -> ModelCard:
    """The card of a run's result (the selected round when one was selected, else the last round); see the
    module docstring for what it claims."""
    from hf_atm.atm.export import REGISTER_LINE

    tasks = list(summary.tasks)
    history = summary.history
    name = model_name or summary.hub_model_id or f"atm-{summary.atm_mode}-{summary.merge_method}"
    name = str(name).split("/")[-1]
    entry = None
    if history:
        chosen = summary.best_round if summary.best_round is not None else history[-1]["round"]
        entry = next((h for h in history if h["round"] == chosen), history[-1])
    metrics = _main_metrics(summary, entry)
    test = _test_scores(summary, metrics)
    sources = summary.datasets or {}
    ptag = summary.pipeline_tag
    results: list[EvalResult] = []
    for t in tasks:  # the model-index: test results on the Hub datasets' own test splits only
        src = sources.get(t)
        if src is None or t not in test or _held_out_of_train(src):
            continue
        results.append(EvalResult(
            task_type=ptag, dataset_type=src["id"], dataset_name=t, dataset_config=src.get("config"),
            dataset_split=src.get("split") or "test", metric_type=metrics[t], metric_value=test[t],
            metric_name=f"{metrics[t]} ({src['examples']} test examples)",
        ))  # fmt: skip
    data = ModelCardData(
        model_name=name if results else None,
        eval_results=results or None,
        base_model=summary.base_model,
        library_name="hf_atm",
        tags=["hf_atm", "atm", "merge", summary.merge_method, "transformers"],
    )
    if summary.serves_pipeline:
        data["pipeline_tag"] = ptag
    if summary.base_model:
        data["base_model_relation"] = "finetune"
    if entry is not None:
        table = _table(tasks, metrics, _entry_scores(entry, metrics), entry.get("normalized_accuracy"))
        split = f"split `{entry['split']}`, round {entry['round']}"
    else:
        table, split = "(not trained yet)", "none"
    test_section = ""
    if test:
        test_section = ("## Results (split `test`)\n\n" + _test_split_text(sources) + _table(tasks, metrics, test, None)
                        + "\n\n")  # fmt: skip
    selected = f", selected round {summary.best_round} on {summary.selection}" if summary.selection else ""
    if summary.base_model:
        base = f"[{summary.base_model}](https://huggingface.co/{summary.base_model})"
    else:
        base = f"local folder `{summary.base_name}`" if summary.base_name else "unknown"
    pipeline_note = (
        f'`transformers.pipeline("{ptag}", model=...)` serves this single-task folder (after the import above).'
        if summary.serves_pipeline else
        "This folder serves no `pipeline()` by itself (one backbone, several heads): `hf-atm export RUN_DIR "
        "--task T --output OUT` writes one task as a standard transformers model."
    )  # fmt: skip
    text = _TEMPLATE.format(
        card_data=data.to_yaml(),
        title=name,
        rounds=history[-1]["round"] if history else 0,
        method=summary.merge_method,
        mode=summary.atm_mode.upper(),
        selected=selected,
        base=base,
        task_list=", ".join(_source_text(t, sources.get(t)) for t in tasks),
        heads=f"{summary.heads}\n\n" if summary.heads else "",
        split=split,
        table=table,
        test_section=test_section,
        first_task=tasks[0],
        pipeline_note=pipeline_note,
        register_line=REGISTER_LINE,
    )
    return ModelCard(text)
