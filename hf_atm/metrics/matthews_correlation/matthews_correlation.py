"""Matthews correlation coefficient (scikit-learn's matthews_corrcoef), GLUE's metric for CoLA.

An `evaluate` metric module shipped with hf_atm, loaded by path (offline): evaluate.load(<this folder>).
It ranges from -1 to 1 (0: no better than chance; constant predictions score 0) and, unlike accuracy, is
not fooled by imbalanced classes.
"""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef

_DESCRIPTION = "MCC = (TP * TN - FP * FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)), multi-class as in sklearn."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (int).
    references: true class ids (int).
    sample_weight: optional per-example weights.
Returns:
    matthews_correlation: the coefficient, in [-1, 1].
"""
_CITATION = "Matthews, Comparison of the predicted and observed secondary structure of T4 phage lysozyme, 1975."


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.matthews_corrcoef.html"
            ],
        )

    def _compute(self, predictions, references, sample_weight=None):
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions, sample_weight=sample_weight))}
