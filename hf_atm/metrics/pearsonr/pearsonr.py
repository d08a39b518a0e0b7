"""Pearson correlation coefficient (scipy.stats.pearsonr), GLUE's metric for STS-B.

An `evaluate` metric module shipped with hf_atm, loaded by path (offline): evaluate.load(<this folder>).
Predictions and references are numbers (float64); a constant input has no correlation (NaN).
"""

import datasets
import evaluate
from scipy.stats import pearsonr

_DESCRIPTION = "Pearson's r: the covariance of predictions and references over the product of their deviations."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted values (float).
    references: true values (float).
    return_pvalue: also return the two-sided p-value (default False).
Returns:
    pearsonr: the coefficient, in [-1, 1]; pearsonr_pvalue: with return_pvalue=True.
"""
_CITATION = "Virtanen et al., SciPy 1.0: Fundamental Algorithms for Scientific Computing in Python, 2020."


class Pearsonr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
            reference_urls=["https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.pearsonr.html"],
        )

    def _compute(self, predictions, references, return_pvalue=False):
        result = pearsonr(references, predictions)
        out = {"pearsonr": float(result[0])}
        if return_pvalue:
            out["pearsonr_pvalue"] = float(result[1])
        return out
