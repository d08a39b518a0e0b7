"""F1: the harmonic mean of precision and recall (scikit-learn's f1_score).

An `evaluate` metric module shipped with hf_atm, loaded by path (offline): evaluate.load(<this folder>).
Binary tasks score the class `pos_label` (default 1), as GLUE's MRPC and QQP do; pass average="macro" (or
"micro", "weighted") for tasks with more classes.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

_DESCRIPTION = "F1 = 2 * (precision * recall) / (precision + recall)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (int).
    references: true class ids (int).
    labels: the labels to include when average is not "binary".
    pos_label: the positive class of a binary task (default 1).
    average: "binary" (default), "micro", "macro", "weighted" or None (one score per class).
    sample_weight: optional per-example weights.
    zero_division: the value when there is no positive prediction and no positive reference (default 0).
Returns:
    f1: the F1 score (a list with average=None).
"""
_CITATION = "Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011."


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None,
                 zero_division=0):
        score = f1_score(references, predictions, labels=labels, pos_label=pos_label, average=average,
                         sample_weight=sample_weight, zero_division=zero_division)
        return {"f1": float(score) if np.ndim(score) == 0 else np.asarray(score).tolist()}
