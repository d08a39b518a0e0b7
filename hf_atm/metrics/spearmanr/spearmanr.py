"""Spearman rank correlation coefficient (scipy.stats.spearmanr).

An `evaluate` metric module shipped with hf_atm, loaded by path (offline): evaluate.load(<this folder>).
Predictions and references are numbers (float64); a constant input has no correlation (NaN).
"""

import datasets
import evaluate
from scipy.stats import spearmanr

_DESCRIPTION = "Spearman's rho: Pearson's r of the ranks of predictions and references."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted values (float).
    references: true values (float).
    return_pvalue: also return the two-sided p-value (default False).
Returns:
    spearmanr: the coefficient, in [-1, 1]; spearmanr_pvalue: with return_pvalue=True.
"""
_CITATION = "Virtanen et al., SciPy 1.0: Fundamental Algorithms for Scientific Computing in Python, 2020."


class Spearmanr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
            reference_urls=["https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.spearmanr.html"],
        )

    def _compute(self, predictions, references, return_pvalue=False):
        result = spearmanr(references, predictions)
        out = {"spearmanr": float(result[0])}
        if return_pvalue:
            out["spearmanr_pvalue"] = float(result[1])
        return out
