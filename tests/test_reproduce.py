"""benchmarks/reproduce.py: the choices made on validation, the plan that follows from them, the refusal to mix
settings or backbone weights, and the report written from saved units (synthetic units: no training here)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["a", "b"]


@pytest.fixture(scope="module")
def rp():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def acc(v: float) -> dict[str, float]:
    return {t: v for t in TASKS}


class FakeSuite:
    def __init__(self, rp, name="vision", budgets=(1, 8, 16)):
        self.name, self.num_tasks = name, len(TASKS)
        self.settings = {**rp.SUITE_SETTINGS[name], "budgets": list(budgets)}


def headline_units(rp, lrs, best_ind=1, best_atm=(2, "0.5"), individual_val=None) -> dict:
    """Saved headline units whose validation favours lrs[best_ind] (individual, merges, joint) and the ATM
    pair `best_atm` (rate index, scale)."""
    units = {"zero_shot": {"validation": acc(0.5), "test": acc(0.5)}}
    for i, lr in enumerate(lrs):
        v = 0.8 if i == best_ind else 0.7
        ind = {"individual": {"test": acc(v), "validation": acc(v if individual_val is None else individual_val[i]),
                              "seconds": 1.0, "cosine": [[1.0, 0.1], [0.1, 1.0]]}}
        for m in rp.METHODS:
            ind[m] = {"test": acc(v - 0.1), "validation": acc(v - 0.1), "scale": 0.3, "at_grid_edge": False,
                      "validation_by_scale": {"0.3": v}, "params": {}, "seconds": 1.0}
        units[f"individual_B{rp.HEADLINE}_lr{rp.lr_tag(lr)}"] = ind
        units[f"joint_B{rp.HEADLINE}_lr{rp.lr_tag(lr)}"] = {"test": acc(v), "validation": acc(v), "seconds": 1.0,
                                                           "wall_seconds": 1.0}
        for s in rp.ATM_SCALES:  # the best rate scores 0.7 at every scale, 0.75 at the best scale
            v = 0.6 if i != best_atm[0] else 0.75 if str(s) == str(best_atm[1]) else 0.7
            units[rp.atm_key(lr, s)] = atm_run(rp.HEADLINE, v)
    return units


def atm_run(rounds: int, final: float, scales=None) -> dict:
    by_round = [acc(0.5 + (final - 0.5) * k / rounds) for k in range(rounds + 1)]
    return {"rounds": rounds, "test_by_round": by_round, "test": by_round[-1], "best_round": rounds,
            "validation_by_round": by_round[1:], "cosine_by_round": [0.05] * rounds,
            "merge_scale_by_round": scales or [None] * rounds,
            "train_loss_by_round": [{t: 1.0 / (k + 1) for t in TASKS} for k in range(rounds + 1)],
            "seconds": 1.0, "wall_seconds": 1.0}


def test_rates_are_chosen_on_validation_with_ties_to_the_smaller_rate(rp):
    lrs = [1e-4, 1e-3, 1e-2]
    units = headline_units(rp, lrs, best_ind=2, best_atm=(0, "1/n"))
    chosen = rp.choose_rates(units, lrs)
    assert chosen["individual"] == chosen["joint"] == chosen["ties"] == 1e-2
    assert chosen["atm"] == (1e-4, "1/n")
    tied = headline_units(rp, lrs, individual_val=[0.6, 0.9, 0.9])
    assert rp.choose_rates(tied, lrs)["individual"] == 1e-3  # equal validation: the smaller rate
    del units[f"joint_B{rp.HEADLINE}_lr{rp.lr_tag(1e-3)}"]
    assert rp.choose_rates(units, lrs) is None  # nothing is chosen from an incomplete grid


def test_the_plan_runs_the_headline_grid_first_then_what_the_choices_decide(rp):
    suite = FakeSuite(rp)
    lrs = suite.settings["lrs"]
    first = [u for u, _, _ in rp.plan(suite, {}, 0)]
    assert first[0] == "zero_shot" and len(first) == 1 + 3 * len(lrs)  # ATM: the rates at 1/n first
    assert first[-1] == rp.atm_key(lrs[-1], "1/n")
    units = headline_units(rp, lrs, best_ind=1, best_atm=(2, 0.5))
    at_mean = {k: v for k, v in units.items() if not k.startswith("atm_") or k.endswith("_mean")}
    second = [u for u, _, _ in rp.plan(suite, at_mean, 0)]  # then the scales at ATM's rate, nothing else yet
    assert second[len(first):] == [rp.atm_key(lrs[2], s) for s in rp.ATM_SCALES]
    rest = {u: kw for u, _, kw in rp.plan(suite, units, 0)}
    assert rest["atm_16x1_chosen"] == {"rounds": 16, "epochs": 1.0, "lr": lrs[2], "scale": 0.5, "train_loss": True}
    assert {u for u in rest if u.startswith("individual_B16")} == {f"individual_B16_lr{rp.lr_tag(lrs[1])}"}
    assert rest[f"joint_B1_lr{rp.lr_tag(lrs[1])}"] == {"budget": 1, "lr": lrs[1]}
    assert {"atm_5x2_chosen", "atm_2x5_chosen", "atm_1x10_chosen", "atm_16x1_auto", "atm_16x1_mean"} <= set(rest)
    ties = rest[f"atm_{rp.HEADLINE}x1_ties"]
    assert ties["merge_method"] == "ties" and ties["scale"] == pytest.approx(0.5 * suite.num_tasks)
    assert rest[f"ph_B{rp.HEADLINE}"] == {"lr": lrs[1], "rounds": suite.settings["ph_rounds"]}
    mean_chosen = headline_units(rp, lrs, best_atm=(0, "1/n"))
    assert "atm_16x1_mean" not in {u for u, _, _ in rp.plan(suite, mean_chosen, 0)}  # the long run is the mean


def _args(tmp_path, **kw):
    base = dict(work=str(tmp_path), seeds=[0], threads=torch.get_num_threads(), head_init=None, budgets=None,
                config=None, suites=["vision"], out=str(tmp_path / "out"), notes=None)
    base.update(kw)
    return argparse.Namespace(**base)


class StubSuite:
    """Stands in for the real Suite (which loads data and pre-trains a ViT): identity and model only."""

    identity_value = {"weights_sha256": "aaaa"}
    built: list[int] = []

    def __init__(self, name, settings):
        self.name, self.settings, self.sizes, self.labels = name, settings, {}, {}

    def identity(self):
        return dict(self.identity_value)

    def model(self, seed):
        StubSuite.built.append(seed)
        raise ValueError("head_init 'zero_shot' needs a text encoder")


def test_saved_units_of_other_weights_or_settings_are_refused_before_anything_runs(rp, tmp_path, monkeypatch):
    monkeypatch.setattr(rp, "Suite", StubSuite)
    a = _args(tmp_path)
    root = rp.work_dir(a, "vision", "prototypes")
    root.mkdir(parents=True)
    settings = rp.suite_settings("vision", a)
    (root / "suite.json").write_text(json.dumps({"settings": settings, "backbone": {"weights_sha256": "bbbb"}}))
    with pytest.raises(SystemExit, match="backbone weights bbbb.*aaaa"):
        rp.run_suite("vision", a)
    (root / "suite.json").write_text(json.dumps({"settings": {**settings, "lrs": [1.0]},
                                                 "backbone": StubSuite.identity_value}))
    with pytest.raises(SystemExit, match="settings"):
        rp.run_suite("vision", a)


def test_a_head_protocol_that_does_not_apply_fails_before_suite_json_is_written(rp, tmp_path, monkeypatch):
    monkeypatch.setattr(rp, "Suite", StubSuite)
    StubSuite.built = []
    a = _args(tmp_path, head_init="zero_shot", seeds=[3])
    with pytest.raises(ValueError, match="zero_shot"):
        rp.run_suite("vision", a)
    assert StubSuite.built == [3]
    assert not (rp.work_dir(a, "vision", "zero_shot") / "suite.json").exists()


def test_report_from_saved_units_shows_the_zero_shot_row_budgets_ablations_and_auto(rp, tmp_path):
    a = _args(tmp_path, budgets=[1, 8, 16], seeds=[0, 1])
    settings = rp.suite_settings("vision", a)
    root = rp.work_dir(a, "vision", settings["head_init"])
    lrs = settings["lrs"]
    rng = random.Random(0)
    for seed in (0, 1):
        units = headline_units(rp, lrs, best_ind=1, best_atm=(1, "1/n"))
        units["atm_16x1_chosen"] = atm_run(16, 0.85 + 0.01 * seed)
        units["atm_16x1_auto"] = atm_run(16, 0.9, scales=[0.5] * 16)
        for b in (1, 16):
            src = units[f"individual_B{rp.HEADLINE}_lr{rp.lr_tag(lrs[1])}"]
            units[f"individual_B{b}_lr{rp.lr_tag(lrs[1])}"] = json.loads(json.dumps(src))
            units[f"joint_B{b}_lr{rp.lr_tag(lrs[1])}"] = {"test": acc(0.6 + 0.01 * b), "validation": acc(0.6),
                                                          "wall_seconds": 2.0}
        for k, e in ((5, 2), (2, 5), (1, 10)):
            units[f"atm_{k}x{e}_chosen"] = atm_run(k, 0.7 - 0.02 * e)
        for m in rp.IN_LOOP:
            units[f"atm_{rp.HEADLINE}x1_{m}"] = atm_run(rp.HEADLINE, rng.uniform(0.5, 0.7))
        units[f"ph_B{rp.HEADLINE}"] = {m: {**atm_run(4, 0.7), "best_round": 2, "start_scale": 0.4}
                                       for m in rp.PH_STARTS}
        d = root / f"seed{seed}"
        d.mkdir(parents=True)
        for name, u in units.items():
            (d / f"{name}.json").write_text(json.dumps(u))
    (root / "suite.json").write_text(json.dumps({"settings": settings, "backbone": {"weights_sha256": "aaaa"},
                                                 "sizes": {t: {"train": 9, "validation": 2, "test": 3} for t in TASKS},
                                                 "labels": {t: ["x", "y"] for t in TASKS}}))
    (root / "meta.json").write_text(json.dumps({"machine": "test", "commands": ["python x"], "seeds": [0, 1],
                                                "started": "now", "software": "s"}))
    text = rp.write_report(a).read_text()
    assert "| vision (prototypes heads) | 50.0 ± 0.0 | 80.0 ± 0.0 | 80.0 ± 0.0 | 75.0 ± 0.0 | 70.0 ± 0.0 (task arithmetic) | 2 (0, 1) |" in text
    assert "| pre-trained, shared heads, no tuning | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 |" in text
    assert "Room (individual - zero-shot row): +30.0 points" in text
    # the validation-chosen headline run of both seeds, its choice named once
    assert "| ATM | 75.0 ± 0.0 | 75.0 ± 0.0 | 75.0 ± 0.0 | 93.8 ± 0.0 | lr 0.001, scale mean |" in text
    assert "| 10 x 1 | 72.2 ± 0.4 | [0, 1] |" in text and "| 1 x 10 | 50.0 ± 0.0 | [0, 1] |" in text
    assert "| TIES |" in text and "PH-ATM from one-shot merges" in text
    # joint at B = 8 scores 80.0: the fixed mean reaches 79.0 at round 14, auto at round 12 (not half of 14)
    assert re.search(r"\| 0 \| 80\.0 \| 14 \| 12 \| [0-9.]+, [0-9.]+ \| [0-9.]+, 90\.0 \| 0\.5, 0\.5", text)
    assert "met for 0 of 2 seeds; undecided (neither run within 1 point of joint in 16 rounds) for 0" in text
    for png in ("vision_prototypes_budget_curve.png", "vision_prototypes_ph_atm.png", "vision_prototypes_train_loss.png",
                "vision_prototypes_auto.png"):
        assert (Path(a.out) / png).stat().st_size > 0


def test_config_options_reach_every_method_and_are_recorded(rp, tmp_path):
    assert rp.config_option("warmup_steps=3") == ("warmup_steps", 3)
    assert rp.config_option("lr_scheduler_type=constant") == ("lr_scheduler_type", "constant")
    with pytest.raises(argparse.ArgumentTypeError, match="no_such_option"):
        rp.config_option("no_such_option=1")
    settings = rp.suite_settings("vision", _args(tmp_path, config=[("warmup_steps", 3)]))
    assert settings["atm_config"] == {"warmup_steps": 3}  # in suite.json: other options, other work folder
    suite = FakeSuite(rp)
    suite.settings = settings
    args = rp.Suite.args(suite, tmp_path / "o", 0, 3e-4, rounds=2)
    assert (args.warmup_steps, args.learning_rate, args.rounds) == (3, 3e-4, 2)


def test_the_headline_grid_is_what_the_choices_are_made_from(rp):
    suite = FakeSuite(rp)
    lrs = suite.settings["lrs"]
    units = headline_units(rp, lrs)
    needed = [u for u, _, _ in rp.plan(suite, units, 0) if rp.is_headline(u)]
    assert set(needed) <= set(units) and rp.choose_rates({u: units[u] for u in needed}, lrs) is not None
    assert not any(rp.is_headline(u) for u, _, _ in rp.plan(suite, units, 0) if u not in units)


def test_ph_split_of_the_study_is_the_trainers(tmp_path):
    """benchmarks/reproduce.py tunes a PH start's scale on ph_validation_split's tuning part of the raw data; the
    trainer splits its prepared validation the same way, so the selection part stays unseen."""
    from scripts.atm_data import TASK_LABELS, digits_tasks, tiny_vit

    from hf_atm.atm import MultiTaskModel
    from hf_atm.atm.taskdata import ph_validation_split, prepare_task_data

    tasks = ("digit", "parity")
    data = digits_tasks(tasks, n_train=8, n_val=9, n_test=2, seed=1)
    model = MultiTaskModel.from_backbone(tiny_vit(seed=0), {t: TASK_LABELS[t] for t in tasks}, seed=0)
    prepared = prepare_task_data(data, model, mode="ph", select_fraction=0.5, seed=7)
    for t in tasks:
        tune, select = ph_validation_split(data[t]["validation"], 0.5, 7)
        assert len(select) == 5 and len(tune) == 4
        for part, split in ((tune, "validation_tune"), (select, "validation_select")):
            mine, theirs = part.with_format("torch")[:], prepared[t][split][:]
            assert torch.equal(mine["labels"], theirs["labels"])
            assert torch.equal(mine["pixel_values"], theirs["pixel_values"])


def test_recorded_commands_hold_no_local_absolute_path(rp, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/reproduce.py", "--work", str(rp.REPO / "reports" / "work"),
                                      "--out", str(tmp_path / "out"), "--seeds", "0"])
    meta = tmp_path / "meta.json"
    rp.write_meta(meta, _args(tmp_path))
    (command,) = json.loads(meta.read_text())["commands"]
    assert command == "python benchmarks/reproduce.py --work reports/work --out .../out --seeds 0"
