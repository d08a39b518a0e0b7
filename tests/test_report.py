"""Result tables and history readers with per-task metrics: rows name their metrics, a table with mixed metrics
says "mean score", normalized scores have one definition (NaN for a reference that is not > 0, and a NaN task
makes the mean NaN), and history readers never take an accuracy for a score."""

import json
import math

import pytest

from hf_atm.atm import report
from hf_atm.atm.evaluation import mean_accuracy, normalized_accuracy
from hf_atm.atm.history import (
    HistoryEntry,
    load_history,
    main_scores,
    mean_score,
    plot_history,
    write_history,
)
from hf_atm.atm.report import accuracy_row, format_table

MIXED = {"cola": "matthews_correlation", "sst2": "accuracy"}


def test_test_scores_read_each_tasks_own_metric():
    metrics = {"test_cola_matthews_correlation": 0.25, "test_cola_accuracy": 0.7, "test_sst2_accuracy": 0.9,
               "val_sst2_accuracy": 0.1}  # fmt: skip
    assert report.test_scores(metrics, MIXED) == {"cola": 0.25, "sst2": 0.9}
    assert report.test_scores({"val_sst2_accuracy": 0.1}, {"sst2": "accuracy"}, prefix="val") == {"sst2": 0.1}
    with pytest.raises(KeyError, match="test_cola_f1"):
        report.test_scores(metrics, {"cola": "f1"})


def test_accuracy_row_names_metrics_and_uses_the_one_normalized_score():
    scores, reference = {"sst2": 0.9, "cola": 0.2}, {"cola": 0.4, "sst2": 0.9}
    row = accuracy_row("ATM", scores, reference, MIXED)
    assert row["metric"] == MIXED and row["accuracy"] == scores
    assert row["mean"] == pytest.approx(0.55)
    assert row["normalized"] == pytest.approx(mean_accuracy(normalized_accuracy(scores, reference))) == 0.75
    assert accuracy_row("x", scores)["metric"] == {"cola": "accuracy", "sst2": "accuracy"}
    assert accuracy_row("x", scores)["normalized"] is None
    # a reference no better than chance (MCC 0) or negative: that task's ratio is NaN, so the mean is NaN; the
    # mean is never over fewer tasks than the row has, and a negative reference never flips a ratio's sign
    for bad in (0.0, -0.3):
        r = accuracy_row("ATM", scores, {"cola": bad, "sst2": 0.9}, MIXED)
        assert math.isnan(r["normalized"])
    with pytest.raises(KeyError, match="sst2"):
        accuracy_row("ATM", scores, {"cola": 0.4}, MIXED)


def test_format_table_names_metrics_and_says_mean_score_when_they_differ():
    rows = [accuracy_row("individual", {"cola": 0.4, "sst2": 0.9}, {"cola": 0.4, "sst2": 0.9}, MIXED),
            accuracy_row("ATM", {"cola": 0.2, "sst2": 0.9}, {"cola": 0.0, "sst2": 0.9}, MIXED)]
    table = format_table(rows).splitlines()
    assert table[0] == "| method | cola (matthews_correlation) | sst2 | mean score | normalized |"
    assert table[2] == "| individual | 40.0 | 90.0 | 65.0 | 100.0 |"
    assert table[3] == "| ATM | 20.0 | 90.0 | 55.0 | n/a |"  # NaN normalized mean shown as n/a
    assert format_table(rows, MIXED) == format_table(rows)  # the rows' own metric names suffice
    same = [accuracy_row("ATM", {"a": 0.5, "b": 0.25})]
    assert format_table(same).splitlines()[0] == "| method | a | b | mean | normalized |"
    assert format_table(same).splitlines()[2] == "| ATM | 50.0 | 25.0 | 37.5 | - |"
    # all tasks on one metric other than accuracy: named per column, the mean is of that metric
    f1 = [accuracy_row("ATM", {"a": 0.5, "b": 0.25}, metric={"a": "f1", "b": "f1"})]
    assert format_table(f1).splitlines()[0] == "| method | a (f1) | b (f1) | mean | normalized |"
    # rows with a missing task or a null score (NaN in results.json) print n/a, they do not fail
    assert "| x | n/a | 50.0 |" in format_table([{"method": "x", "accuracy": {"b": 0.5}, "mean": 0.5},
                                                {"method": "y", "accuracy": {"a": None, "b": 0.5}, "mean": None}])


def test_main_scores_and_mean_score_never_take_accuracy_for_a_score(tmp_path):
    nan_entry = HistoryEntry.build(1, {"cola": 0.7, "sst2": 0.9}, tasks=["cola", "sst2"], split="validation",
                                   score={"cola": math.nan, "sst2": 0.9}, metric=MIXED)
    write_history([nan_entry], tmp_path)
    stored = load_history(tmp_path)[0]
    assert stored["score"]["cola"] is None and stored["mean_score"] is None  # NaN is written as null
    assert math.isnan(main_scores(stored)["cola"]) and main_scores(stored)["sst2"] == 0.9
    assert math.isnan(mean_score(stored)) and math.isnan(mean_score(nan_entry))  # not the mean accuracy 0.8
    mixed = HistoryEntry.build(2, {"cola": 0.7, "sst2": 0.9}, tasks=["cola", "sst2"], split="validation",
                               score={"cola": -0.2, "sst2": 0.9}, metric=MIXED)
    assert main_scores(mixed) == {"cola": -0.2, "sst2": 0.9} and mean_score(mixed) == pytest.approx(0.35)
    old = {"round": 0, "accuracy": {"cola": 0.6, "sst2": None}, "mean_accuracy": 0.6}  # before per-task metrics
    assert main_scores(old)["cola"] == 0.6 and math.isnan(main_scores(old)["sst2"])
    assert mean_score(old) == 0.6
    assert plot_history([old, stored, mixed.to_dict()], tmp_path)[0].stat().st_size > 0
    json.dumps(main_scores(stored))  # plain floats
