"""Model cards for merged models, built with ``huggingface_hub.ModelCard`` / ``ModelCardData``.

The metadata follows the Hub's conventions for merges: ``base_model`` lists the Hub repos the merge was
made from (the merged models, then the base), ``base_model_relation: merge``, ``tags: [merge, hf_atm,
<method>]`` and ``library_name: transformers``. Only Hub repo ids go into ``base_model`` (a local folder is
no repo; it is named in the card's text instead), and no token or URL credential ever reaches the card.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from hf_atm.hub.resolve import is_local_reference, snapshot_repo_id, split_revision

__all__ = ["architectures_of", "auto_class_for", "hub_repo_id", "merge_model_card"]

# The Auto class and pipeline task of an architecture name's suffix (first match wins); the bare backbone last.
_HEADS: tuple[tuple[str, str, str | None], ...] = (
    ("ForCausalLM", "AutoModelForCausalLM", "text-generation"),
    ("LMHeadModel", "AutoModelForCausalLM", "text-generation"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM", "text2text-generation"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "AutoModelForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "AutoModelForMaskedLM", "fill-mask"),
    ("ForImageClassification", "AutoModelForImageClassification", "image-classification"),
)


def architectures_of(folder: str | Path) -> list[str]:
    """A model folder's config.json ``architectures`` (empty when absent or unreadable): they name the class the
    card's snippet loads."""
    import json

    try:
        return list(json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("architectures") or [])
    except (OSError, ValueError, AttributeError):
        return []


def auto_class_for(architectures: Sequence[str] | None) -> tuple[str, str | None]:
    """(transformers Auto class, pipeline task or None) for a config's ``architectures``: the class that keeps the
    architecture's head (``AutoModelForCausalLM`` for ``LlamaForCausalLM``), ``AutoModel`` and None otherwise."""
    for arch in architectures or ():
        for suffix, auto, task in _HEADS:
            if arch.endswith(suffix):
                return auto, task
    return "AutoModel", None

_SECRET = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$|^[A-Za-z0-9][\w.\-]*$")


def _redact(text: str) -> str:
    return _SECRET.sub("***", text)


def hub_repo_id(ref: str, resolved: str | Path | None = None) -> str | None:
    """The Hub repo id behind a model reference, or None for a plain local folder.

    ``"org/name@rev"`` -> ``"org/name"``; a local path that is a Hugging Face cache snapshot
    (``.../models--org--name/snapshots/<commit>``) -> ``"org/name"``; any other local folder -> None.
    `resolved` is the folder the reference resolved to, used to recognise cache snapshots.
    """
    for candidate in (resolved, ref if is_local_reference(ref) else None):
        if candidate is not None and (repo_id := snapshot_repo_id(candidate)):
            return repo_id
    if is_local_reference(ref):
        return None
    repo_id, _ = split_revision(str(ref))
    return repo_id if _REPO_ID.match(repo_id) else None


def merge_model_card(
    *,
    base: str,
    models: Sequence[str],
    method: str,
    options: Mapping[str, object],
    config_yaml: str,
    resolved: Mapping[str, str | Path] | None = None,
    revisions: Mapping[str, str] | None = None,
    library_name: str = "transformers",
    version: str | None = None,
    architectures: Sequence[str] | None = None,
    use_snippet: str | None = None,
) -> ModelCard:
    """The README.md model card of a merge.

    `base` / `models` are the references as the user wrote them, `resolved` maps a reference to its local
    folder (to recognise Hub cache snapshots), `revisions` to the Hub commit that was read. `options` are the
    method's options (``MergeSpec.to_dict()``, defaults resolved), `config_yaml` the text of ``merge_config.yaml``.
    `architectures` (config.json's) choose the "Use" snippet's Auto class and the ``pipeline_tag``;
    `use_snippet` replaces the snippet (a merged LoRA adapter is loaded with ``PeftModel``). The returned
    card's metadata has been round-tripped through ``ModelCardData`` (it parses back identically).
    """
    resolved = dict(resolved or {})
    revisions = dict(revisions or {})
    repo_ids: list[str] = []
    for ref in [*models, base]:
        rid = hub_repo_id(ref, resolved.get(ref))
        if rid is not None and rid not in repo_ids:
            repo_ids.append(rid)
    auto, task = auto_class_for(architectures)
    data = ModelCardData(
        base_model=repo_ids or None,
        library_name=library_name,
        tags=["merge", "hf_atm", method],
    )
    if task is not None and use_snippet is None:
        data["pipeline_tag"] = task
    if repo_ids:  # the relation is only meaningful with the repos it relates to
        data["base_model_relation"] = "merge"

    def describe(ref: str) -> str:
        rid = hub_repo_id(ref, resolved.get(ref))
        if rid is None:
            return f"local folder `{Path(ref).name or ref}`"
        rev = revisions.get(ref) or split_revision(str(ref))[1]
        link = f"[{rid}](https://huggingface.co/{rid})"
        return f"{link} (revision `{rev}`)" if rev else link

    opts = ", ".join(f"`{k}={v}`" for k, v in options.items() if k != "method") or "defaults"
    lines = [
        f"# Merge of {len(models)} model{'s' if len(models) != 1 else ''} with `{method}`",
        "",
        f"This model was made with hf_atm {version or ''}".rstrip()
        + f" by merging the models below into the base with **{method}** ({opts}).",
        "Every tensor was merged independently: `tau_i = M_i - base`, "
        "`result = base + scale * combine(tau_1..tau_n)` (`average`: the weighted mean of the models); "
        "non-floating tensors come from the base.",
        "",
        f"- base: {describe(base)}",
        *[f"- model {i + 1}: {describe(m)}" for i, m in enumerate(models)],
        "",
        "## Reproduce",
        "",
        "```bash",
        "hf-atm merge --config merge_config.yaml --output merged",
        "```",
        "",
        "`merge_config.yaml` (in this repository):",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
        "## Use",
        "",
        "```python",
        *(use_snippet.rstrip().splitlines() if use_snippet is not None else [
            f"from transformers import {auto}",
            f'model = {auto}.from_pretrained("path/or/repo-of-this-model")',
        ]),
        "```",
        "",
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    card = ModelCard(_redact(content))  # parses the metadata back: ModelCardData validation runs here
    return card
