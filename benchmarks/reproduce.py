"""Reproduce the ATM paper's claims on the embedded suites and write ``reports/REPRODUCTION.md`` with plots.

    python benchmarks/reproduce.py [--suites text vision] [--budgets 1 2 4 8] [--seeds 0 1 2]
                                   [--curve-seeds 0] [--threads 2] [--work reports/work] [--out reports]
                                   [--head_init random|linear_probe|zero_shot|prototypes]

For every suite and seed it runs, each from the same pre-trained backbone and with the same per-task data:

* individual fine-tuning at every budget B (B epochs per task; also the normalized-accuracy denominators);
* one-shot merges of those task vectors: task arithmetic, TIES, Breadcrumbs, DARE, TSV-M, Iso-C, each with
  its scale lambda chosen on the validation split from the same grid (fair tuning);
* joint multi-task training, B epochs over the union of the tasks' training data (mixed batches);
* PA-ATM, B rounds of 1 epoch. With a fresh optimizer every round and every (round, task) seeded by
  ``(seed, round, task)``, the model after round K of one run *is* the K-round run, so one run of max(B)
  rounds, evaluated on test after every round, gives ATM at every budget;
* the budget split at the largest budget: B rounds x 1 epoch against B/2 x 2, B/4 x 4, ..., 1 x B;
* PH-ATM started from the TA, TIES and TSV-M merges at the largest budget: rounds of 1 epoch on part of the
  validation split, the best round chosen on the held-out rest, test accuracy recorded every round.

Every method of a seed starts from the same heads, made once by ``--head_init`` (``hf_atm.atm.heads.shared_heads``;
default ``random``: the seeded heads of ``MultiTaskModel.from_backbone``); a protocol other than random is recorded
in the suite's settings, and a work folder holding another protocol's results is refused.

Budgets other than the largest run only for ``--curve-seeds`` (they cost as much again); the largest
budget, the split and PH-ATM run for every seed in ``--seeds``. The data splits are fixed (split seed 0):
the seeds vary initialisation of the heads, data order and dropout, so the spread is training noise.

Every unit of work (suite, seed, what) is saved as JSON under ``--work`` as soon as it finishes; a killed
run started again skips what is done. ``--report-only`` rewrites the report from what is there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hf_atm.atm.evaluation import mean_accuracy, normalized_accuracy

METHODS = {  # one-shot merges and their parameters (the papers' usual settings); scale tuned on validation
    "task_arithmetic": {},
    "ties": {"density": 0.2},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "dare_linear": {"density": 0.5},
    "tsv": {},
    "iso_c": {},
}
LABELS = {"task_arithmetic": "task arithmetic", "ties": "TIES", "breadcrumbs": "Breadcrumbs",
          "dare_linear": "DARE", "tsv": "TSV-M", "iso_c": "Iso-C", "joint": "joint multi-task",
          "individual": "individual", "atm": "ATM", "atm_sum": "ATM, sum merge"}  # fmt: skip
PH_STARTS = ("task_arithmetic", "ties", "tsv")
SUITE_SETTINGS = {  # sized so that one seed of one suite takes tens of minutes on two CPU cores
    "text": {"lr": 1e-4, "batch": 16, "max_train": 128, "max_test": 200, "max_length": 32},
    "vision": {"lr": 1e-3, "batch": 64, "max_train": 1000, "max_test": 500},
}


def scale_grid(num_tasks: int) -> list[float]:
    """0.1 .. 1.0 by 0.1, 1.25, 1.5 and 1/n: wide enough for sum-based merges (TSV-M, Iso-C peak near 1)."""
    return sorted({round(0.1 * k, 10) for k in range(1, 11)} | {1.25, 1.5, 1.0 / num_tasks})


# ----------------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------------
class Suite:
    """A task suite prepared once per process: datasets, backbone reference, collator inputs."""

    def __init__(self, name: str, settings: dict[str, Any]):
        from hf_atm.data import load_suite

        self.name, self.settings = name, settings
        self.head_init = settings.get("head_init", "random")
        self._factories: dict[int, Any] = {}
        suite = load_suite(name, seed=0, max_train_per_task=settings["max_train"],
                           max_test_per_task=settings["max_test"])
        if name == "text":
            from transformers import AutoTokenizer

            from hf_atm.backbones import TEXT_BACKBONE_POOLING, text_backbone_path
            from hf_atm.data import tokenize_suite

            self.backbone, self.pooling = text_backbone_path(), TEXT_BACKBONE_POOLING
            self.tokenizer = AutoTokenizer.from_pretrained(self.backbone)
            suite = tokenize_suite(suite, self.tokenizer, max_length=settings["max_length"])
        else:
            from transformers import AutoConfig

            from hf_atm.backbones import pretrained_vit
            from hf_atm.data import pixelize_suite

            self.backbone, self.pooling, self.tokenizer = pretrained_vit(), "cls", None
            cfg = AutoConfig.from_pretrained(self.backbone)
            c = cfg.num_channels
            suite = pixelize_suite(suite, image_size=cfg.image_size, mean=(0.5,) * c, std=(0.5,) * c)
        self.data = suite
        self.labels = {t: ds["train"].features["labels"].names for t, ds in suite.items()}
        self.sizes = {t: {sp: len(ds[sp]) for sp in ds} for t, ds in suite.items()}

    def factory(self, seed: int):
        """The model factory of `seed` (``hf_atm.atm.heads.shared_heads``): its heads are made by the head
        protocol on the first call for a seed, which therefore fails there when the protocol does not apply."""
        from functools import partial

        from hf_atm.atm import MultiTaskModel
        from hf_atm.atm.heads import shared_heads

        if seed not in self._factories:
            make = partial(MultiTaskModel.from_backbone, self.backbone, self.labels, pooling=self.pooling, seed=seed)
            self._factories[seed] = shared_heads(make, self.head_init, self.data, tokenizer=self.tokenizer,
                                                 seed=seed)  # fmt: skip
        return self._factories[seed]

    def model(self, seed: int):
        """A fresh model for `seed`; every method of a seed gets the same heads (made once by the head protocol)."""
        return self.factory(seed)()

    def args(self, out: Path, seed: int, **kw: Any):
        from hf_atm.atm import ATMConfig

        s = self.settings
        base = dict(output_dir=str(out), seed=seed, learning_rate=s["lr"], weight_decay=0.01,
                    per_device_train_batch_size=s["batch"], per_device_eval_batch_size=256, report_to="none",
                    save_strategy="no", logging_steps=50, dataloader_num_workers=0, disable_tqdm=True,
                    rounds=1, epochs_per_round=1.0)  # fmt: skip
        base.update(kw)
        return ATMConfig(**base)


def _test_acc(trainer: Any) -> dict[str, float]:
    from hf_atm.atm.report import test_accuracy

    return test_accuracy(trainer.evaluate(split="test", metric_key_prefix="test"), trainer.task_names)


def run_atm(suite: Suite, seed: int, out: Path, rounds: int, epochs: float, *, mode: str = "pa",
            model: Any = None, merge_scale: float | None = None) -> dict[str, Any]:
    """An ATM run with test accuracy after every round (round 0 = the start)."""
    from transformers import TrainerCallback

    from hf_atm.atm import ATMTrainer

    per_round: list[dict[str, float]] = []

    class TestEveryRound(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kw):  # noqa: ANN001 - Trainer's callback signature
            per_round.append(_test_acc(trainer))

    # PH: half of the (small) validation split tunes, half selects the round (a 20% selection part would be a
    # handful of examples per task at these sizes)
    args = suite.args(out, seed, rounds=rounds, epochs_per_round=epochs, atm_mode=mode, ph_select_fraction=0.5,
                      merge_scale=merge_scale)
    trainer = ATMTrainer(model=model if model is not None else suite.model(seed), args=args,
                         task_datasets=suite.data, processing_class=suite.tokenizer)
    per_round.append(_test_acc(trainer))
    trainer.add_callback(TestEveryRound())
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    final = per_round[trainer.best_round]  # PA: the last round; PH: the selected round (restored by train())
    return {"rounds": rounds, "epochs_per_round": epochs, "test_by_round": per_round, "test": final,
            "select_by_round": [h["mean_accuracy"] for h in trainer.history], "best_round": trainer.best_round,
            "cosine_by_round": [h["mean_cosine"] for h in trainer.history], "seconds": seconds,
            "timing": dict(trainer.timing)}


def run_individual_and_merges(suite: Suite, seed: int, out: Path, budget: int, with_ph: int) -> dict[str, Any]:
    """Individual fine-tuning at `budget`, every one-shot merge (scale tuned on validation), and, when
    `with_ph` > 0, PH-ATM for `with_ph` rounds from the TA / TIES / TSV-M merges."""
    from hf_atm.atm import finetune_individual, one_shot_merge

    args = suite.args(out, seed)
    model = suite.model(seed)
    t0 = time.perf_counter()
    ind = finetune_individual(model, args, suite.data, budget_epochs=budget, processing_class=suite.tokenizer)
    res: dict[str, Any] = {"individual": {"test": ind.test_accuracy, "validation": ind.validation_accuracy,
                                          "seconds": time.perf_counter() - t0,
                                          "cosine": ind.entries["test"]["cosine"]}}
    merged_models = {}
    grid = scale_grid(len(suite.labels))
    for method, params in METHODS.items():
        t0 = time.perf_counter()
        m = one_shot_merge(model, ind, args, suite.data, method, scale_grid=grid, seed=seed,
                           reference_accuracies=ind.reference_accuracies("test"), processing_class=suite.tokenizer,
                           **params)  # fmt: skip
        res[method] = {"test": m.entries["test"]["accuracy"], "scale": m.scale,
                       "validation_by_scale": {str(k): v for k, v in m.validation_by_scale.items()},
                       "params": params, "seconds": time.perf_counter() - t0}
        if with_ph and method in PH_STARTS:
            merged_models[method] = m.model
        print(f"[{suite.name} seed {seed} B={budget}] {method}: scale {m.scale:.2f}, test mean "
              f"{mean_accuracy(res[method]['test']):.4f}", flush=True)
    for method, start in merged_models.items():
        res[f"ph_{method}"] = run_atm(suite, seed, out / f"ph_{method}", with_ph, 1.0, mode="ph", model=start)
        print(f"[{suite.name} seed {seed}] PH-ATM from {method}: best round {res[f'ph_{method}']['best_round']}, "
              f"test mean {mean_accuracy(res[f'ph_{method}']['test']):.4f}", flush=True)
    return res


def run_joint(suite: Suite, seed: int, out: Path, budget: int) -> dict[str, Any]:
    from hf_atm.atm import train_joint

    t0 = time.perf_counter()
    r = train_joint(suite.model(seed), suite.args(out, seed), suite.data, budget_epochs=budget,
                    processing_class=suite.tokenizer)
    return {"test": r.entries["test"]["accuracy"], "seconds": time.perf_counter() - t0}


def plan(budgets: list[int], seeds: list[int], curve_seeds: list[int], split_seeds: list[int],
         ph_rounds: int) -> list[tuple]:
    """The units of work, cheapest-first within a seed so that partial runs already say something."""
    top = max(budgets)
    units = []
    for seed in seeds:
        units.append((seed, f"atm_{top}x1", run_atm, {"rounds": top, "epochs": 1.0}))
        if seed in curve_seeds:  # the theory's other merge: the sum of the task vectors (GD on the sum of
            units.append((seed, f"atm_{top}x1_sum", run_atm,  # the losses, as joint training)
                          {"rounds": top, "epochs": 1.0, "merge_scale": 1.0}))
        units.append((seed, f"individual_B{top}", run_individual_and_merges, {"budget": top, "with_ph": ph_rounds}))
        units.append((seed, f"joint_B{top}", run_joint, {"budget": top}))
        if seed in curve_seeds:
            for b in sorted(budgets):
                if b != top:
                    units.append((seed, f"individual_B{b}", run_individual_and_merges, {"budget": b, "with_ph": 0}))
                    units.append((seed, f"joint_B{b}", run_joint, {"budget": b}))
        for e in (2, 4, 8, 16):
            if seed in split_seeds and e <= top and top % e == 0:
                units.append((seed, f"atm_{top // e}x{e}", run_atm, {"rounds": top // e, "epochs": float(e)}))
    return units


def run_suite(name: str, a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    settings = dict(SUITE_SETTINGS[name])
    settings.update({k: v for k, v in (("max_train", a.max_train), ("max_test", a.max_test)) if v})
    if a.head_init != "random":  # the default protocol leaves the settings (and suite.json) as they were
        settings["head_init"] = a.head_init
    root = Path(a.work) / name
    saved = root / "suite.json"
    if saved.exists():
        before = json.loads(saved.read_text())["settings"].get("head_init", "random")
        if before != a.head_init:
            raise SystemExit(f"--head_init {a.head_init}: {root} holds results of head_init {before}; "
                             f"give another --work")  # fmt: skip
    suite = Suite(name, settings)
    # the head protocol must apply to this suite's backbone (e.g. no zero_shot heads on the ViT, which embeds no
    # text): build the first seed's heads now, so a protocol that fails does so before suite.json is written and
    # locks the folder to it (the heads are cached: the runs reuse them).
    suite.factory(a.seeds[0])
    root.mkdir(parents=True, exist_ok=True)
    write_meta(root / "meta.json", a)
    (root / "suite.json").write_text(json.dumps({"settings": settings, "sizes": suite.sizes,
                                                 "labels": suite.labels}, indent=1))
    for seed, unit, run, kwargs in plan(a.budgets, a.seeds, a.curve_seeds, a.split_seeds, a.ph_rounds):
        path = root / f"seed{seed}" / f"{unit}.json"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        out = root / f"seed{seed}" / f"{unit}.run"
        t0 = time.perf_counter()
        res = run(suite, seed, out, **kwargs)
        res["wall_seconds"] = time.perf_counter() - t0
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(path)  # a unit is either complete or absent
        print(f"[{name} seed {seed}] {unit} done in {res['wall_seconds']:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------
def _ms(xs: list[float]) -> str:
    """'mean ± sd' in percent (sd over seeds; '-' with one seed)."""
    if not xs:
        return "-"
    m = 100 * statistics.fmean(xs)
    return f"{m:.1f} ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{m:.1f}"


def load_results(work: Path, name: str) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for d in sorted((work / name).glob("seed*")):
        seed = int(d.name[4:])
        out[seed] = {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")}
    return out


def rows_at_budget(res: dict[int, dict[str, Any]], b: int, top: int) -> dict[str, dict[str, list]]:
    """{method: {"abs": [per seed], "norm": [...], "tasks": {task: [...]}}} at budget b."""
    rows: dict[str, dict[str, list]] = {}

    def add(key: str, acc: dict[str, float], ref: dict[str, float]) -> None:
        r = rows.setdefault(key, {"abs": [], "norm": [], "tasks": {}})
        r["abs"].append(mean_accuracy(acc))
        r["norm"].append(mean_accuracy(normalized_accuracy(acc, ref)))
        for t, v in acc.items():
            r["tasks"].setdefault(t, []).append(v)

    for units in res.values():
        ind = units.get(f"individual_B{b}")
        if ind is None:
            continue
        ref = ind["individual"]["test"]
        for key in ["individual", *METHODS]:
            add(key, ind[key]["test"], ref)
        if f"joint_B{b}" in units:
            add("joint", units[f"joint_B{b}"]["test"], ref)
        for key, unit in (("atm", f"atm_{top}x1"), ("atm_sum", f"atm_{top}x1_sum")):
            run = units.get(unit)  # ATM at budget b = round b of the longest run
            if run is not None and len(run["test_by_round"]) > b:
                add(key, run["test_by_round"][b], ref)
    return rows


def _axes() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def _save(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ncol: int = 1) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=ncol)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_budget_curve(by_b: dict[int, dict[str, dict[str, list]]], path: Path, title: str) -> None:
    """`by_b`: ``{budget: rows_at_budget(...)}``."""
    fig, ax = _axes()
    budgets = sorted(by_b)
    for key in ["atm", "atm_sum", "joint", "individual", *METHODS]:
        xs, ms, sds = [], [], []
        for b in budgets:
            r = by_b[b].get(key)
            if r and r["abs"]:
                xs.append(b)
                ms.append(100 * statistics.fmean(r["abs"]))
                sds.append(100 * statistics.stdev(r["abs"]) if len(r["abs"]) > 1 else 0.0)
        if xs:
            style = "-o" if key in ("atm", "atm_sum", "joint", "individual") else "--."
            ax.errorbar(xs, ms, yerr=sds, fmt=style, capsize=3, label=LABELS[key], lw=2 if key == "atm" else 1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    _save(fig, ax, path, title, "budget B (epochs per task)", ncol=2)


def _plot_rounds(series: dict[str, list[list[float]]], path: Path, title: str, xlabel: str) -> None:
    fig, ax = _axes()
    for label, runs in series.items():
        n = min(len(r) for r in runs)
        ms = [100 * statistics.fmean(r[i] for r in runs) for i in range(n)]
        sds = [100 * statistics.stdev([r[i] for r in runs]) if len(runs) > 1 else 0.0 for i in range(n)]
        ax.errorbar(range(n), ms, yerr=sds, fmt="-o", capsize=3, label=label)
    _save(fig, ax, path, title, xlabel)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**supported**" if ok else "**contradicted**")


def suite_report(name: str, res: dict[int, dict[str, Any]], a: argparse.Namespace, out: Path) -> list[str]:
    top = max(a.budgets)
    info = json.loads((Path(a.work) / name / "suite.json").read_text())
    seeds_top = sorted(s for s, u in res.items() if f"individual_B{top}" in u)
    lines = [f"## The {name} suite", ""]
    sizes = info["sizes"]
    lines.append("Tasks (train / validation / test examples, classes): " + "; ".join(
        f"`{t}` {s['train']} / {s['validation']} / {s['test']}, {len(info['labels'][t])}" for t, s in sizes.items())
        + f". Settings: {json.dumps(info['settings'])}.")
    lines.append("")
    # headline table
    rows = rows_at_budget(res, top, top)
    tasks = sorted(sizes)
    lines += [f"### Headline: budget B = {top} epochs per task (test accuracy %, mean ± sd over seeds "
              f"{', '.join(map(str, seeds_top))})", ""]
    lines.append("| method | " + " | ".join(tasks) + " | mean | normalized |")
    lines.append("|---" * (len(tasks) + 3) + "|")
    order = ["individual", "joint", "atm", "atm_sum", *METHODS]
    for key in order:
        r = rows.get(key)
        if not r:
            continue
        label = LABELS[key] + (f" ({top} x 1 ep)" if key.startswith("atm") else "")
        lines.append(f"| {label} | " + " | ".join(_ms(r["tasks"][t]) for t in tasks)
                     + f" | {_ms(r['abs'])} | {_ms(r['norm'])} |")
    scales = {m: [res[s][f"individual_B{top}"][m]["scale"] for s in seeds_top] for m in METHODS}
    lines += ["", "Scales chosen on validation (per seed): " + "; ".join(
        f"{LABELS[m]} {', '.join(f'{x:.2f}' for x in v)}" for m, v in scales.items()) + ".", ""]
    # budget curve: only seeds that ran every budget, so that every point averages the same seeds
    curve_res = {s: u for s, u in res.items() if all(f"individual_B{b}" in u for b in a.budgets)}
    by_b = {b: rows_at_budget(curve_res, b, top) for b in sorted(a.budgets)}
    curve = out / f"{name}_budget_curve.png"
    _plot_budget_curve(by_b, curve, f"{name} suite: accuracy against budget")
    lines += ["### Budget curve", "", f"![budget curve]({curve.name})", ""]
    lines.append("| method | " + " | ".join(f"B = {b}" for b in sorted(a.budgets)) + " |")
    lines.append("|---" * (len(a.budgets) + 1) + "|")
    for key in order:
        cells = [_ms(by_b[b][key]["abs"]) if key in by_b[b] else "-" for b in sorted(a.budgets)]
        lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    lines += ["", "Seeds: " + ", ".join(map(str, sorted(curve_res))) + " (those that ran every budget; ATM's "
              "row at B = K is round K of the same B = " + str(top) + " runs).", ""]
    # budget split: only seeds that ran every split
    keys = [f"atm_{top // e}x{e}" for e in (1, 2, 4, 8, 16) if e <= top and top % e == 0]
    split_res = {s: u for s, u in res.items() if all(k in u for k in keys)}
    splits = []
    for e in (1, 2, 4, 8, 16):
        if e <= top and top % e == 0:
            key = f"atm_{top // e}x{e}"
            accs = [mean_accuracy(u[key]["test"]) for u in split_res.values()]
            if accs:
                splits.append((top // e, e, accs))
    lines += [f"### Budget split at B = {top} (seeds {', '.join(map(str, sorted(split_res)))})", "",
              "| rounds x epochs per round | mean test accuracy (%) |", "|---|---|"]
    lines += [f"| {k} x {e} | {_ms(v)} |" for k, e, v in splits]
    series = {f"{k} x {e}": [[mean_accuracy(x) for x in u[f'atm_{k}x{e}']["test_by_round"]] for u in split_res.values()]
              for k, e, _ in splits}
    split_png = out / f"{name}_budget_split.png"
    _plot_rounds({k: v for k, v in series.items() if v}, split_png, f"{name}: ATM rounds x epochs (B = {top})",
                 "round")
    lines += ["", f"![budget split]({split_png.name})", ""]
    # PH-ATM
    ph = {m: [u[f"individual_B{top}"][f"ph_{m}"] for u in res.values()
              if f"ph_{m}" in u.get(f"individual_B{top}", {})] for m in PH_STARTS}
    ph_rounds = next((len(r[0]["test_by_round"]) - 1 for r in ph.values() if r), 0)
    lines += [f"### PH-ATM from one-shot merges (B = {top}), {ph_rounds} rounds of 1 epoch on "
              "the validation tuning part", "",
              "| start | start test acc | best round (per seed) | test acc at selected round | "
              "best test acc over rounds | test acc at last round |", "|---|---|---|---|---|---|"]
    for m, runs in ph.items():
        if not runs:
            continue
        start = [mean_accuracy(r["test_by_round"][0]) for r in runs]
        sel = [mean_accuracy(r["test"]) for r in runs]
        best = [max(mean_accuracy(x) for x in r["test_by_round"]) for r in runs]
        last = [mean_accuracy(r["test_by_round"][-1]) for r in runs]
        lines.append(f"| {LABELS[m]} | {_ms(start)} | {', '.join(str(r['best_round']) for r in runs)} | "
                     f"{_ms(sel)} | {_ms(best)} | {_ms(last)} |")
    ph_png = out / f"{name}_ph_atm.png"
    _plot_rounds({f"PH-ATM from {LABELS[m]}": [[mean_accuracy(x) for x in r["test_by_round"]] for r in runs]
                  for m, runs in ph.items() if runs}, ph_png, f"{name}: PH-ATM test accuracy by round",
                 "round (0 = the one-shot merge)")
    lines += ["", f"![PH-ATM]({ph_png.name})", ""]
    # claims
    lines += ["### The paper's claims on this suite", ""]
    atm, merges = rows.get("atm"), [rows[m] for m in METHODS if m in rows]
    joint = rows.get("joint")
    if atm and merges:
        best_m = max(METHODS, key=lambda m: statistics.fmean(rows[m]["abs"]) if m in rows else -1)
        gap = 100 * (statistics.fmean(atm["abs"]) - statistics.fmean(rows[best_m]["abs"]))
        lines.append(f"* ATM well above one-shot merging at equal budget: ATM - best tuned one-shot merge "
                     f"({LABELS[best_m]}) = {gap:+.1f} points at B = {top}: {_verdict(gap > 0)}"
                     f"{' (target >= 10 points: met)' if gap >= 10 else ' (target >= 10 points: not met)'}.")
        per_b = []
        for b in sorted(a.budgets):
            rb = by_b[b]
            if "atm" in rb and any(m in rb for m in METHODS):
                bm = max(statistics.fmean(rb[m]["abs"]) for m in METHODS if m in rb)
                per_b.append(f"B = {b}: {100 * (statistics.fmean(rb['atm']['abs']) - bm):+.1f}")
        lines.append("  At every budget, ATM - best one-shot merge: " + "; ".join(per_b) + " points.")
    if atm and joint:
        gap = 100 * (statistics.fmean(atm["abs"]) - statistics.fmean(joint["abs"]))
        lines.append(f"* ATM close to joint multi-task training: ATM - joint = {gap:+.1f} points at B = {top}"
                     f" (target within 2 points: {'met' if gap >= -2 else 'not met'}).")
    if len(splits) > 1:
        means = [statistics.fmean(v) for _, _, v in splits]
        mono = all(x >= y - 1e-12 for x, y in zip(means, means[1:]))
        lines.append("* More rounds of fewer epochs is better: " + ", ".join(
            f"{k} x {e}: {100 * m:.1f}" for (k, e, _), m in zip(splits, means)) +
            f": strictly ordered by rounds {_verdict(mono)}" + ("" if mono else
            f"; {splits[0][0]} x 1 against 1 x {top}: {_verdict(means[0] > means[-1])}") + ".")
    gains, selected, drifts = [], [], []
    for runs in ph.values():
        for r in runs:
            accs = [mean_accuracy(x) for x in r["test_by_round"]]
            gains.append(max(accs[1:]) - accs[0] if len(accs) > 1 else 0.0)
            selected.append(mean_accuracy(r["test"]) - accs[0])
            drifts.append(max(accs) - accs[-1])
    if gains:
        g, sg, d = statistics.fmean(gains), statistics.fmean(selected), statistics.fmean(drifts)
        lines.append(f"* PH-ATM gains, then drifts: best round's test accuracy over the start {100 * g:+.1f} points "
                     f"(an oracle: the best round by test), fall from the best round to the last {100 * d:.1f} "
                     f"points: gains {_verdict(g > 0)}, drift {_verdict(d > 0.005)} (more than half a point). "
                     f"Gain at the round chosen on the held-out validation part (what a user gets): "
                     f"{100 * sg:+.1f} points.")
    lines.append("")
    return lines


def copy_examples(name: str, work: Path, out: Path, top: int) -> list[str]:
    """Copy one PA-ATM and one PH-ATM run's history.json and plots (lowest seed) next to the report."""
    import shutil

    seeds = sorted(int(d.name[4:]) for d in (work / name).glob("seed*"))
    if not seeds:
        return []
    seed_dir = work / name / f"seed{seeds[0]}"
    runs = {f"{name}_pa_atm": seed_dir / f"atm_{top}x1.run", f"{name}_ph_atm_from_tsv": seed_dir /
            f"individual_B{top}.run" / "ph_tsv"}
    lines = []
    for label, src in runs.items():
        if (src / "history.json").exists():
            dst = out / "examples" / label
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("history.json", "accuracy.png", "cosine.png"):
                if (src / f).exists():
                    shutil.copy2(src / f, dst / f)
            lines.append(f"* `examples/{label}/`: history.json (validation accuracy per round, cosine of the task "
                         f"vectors, timings), accuracy.png, cosine.png (seed {seeds[0]}).")
    return (["### Example run histories", "", *lines, ""]) if lines else []


def write_report(a: argparse.Namespace) -> Path:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Reproducing ATM's claims on the embedded suites", "",
             "Written by `benchmarks/reproduce.py` from the saved results under "
             f"`{a.work}`; every number below is from those runs. Rewrite it from them with "
             f"`python benchmarks/reproduce.py --report-only --notes reports/notes.md`.", ""]
    if a.notes:
        lines += [Path(a.notes).read_text().strip(), ""]
    for name in a.suites:
        res = load_results(Path(a.work), name)
        if not res:
            continue
        meta = json.loads((Path(a.work) / name / "meta.json").read_text())
        lines += [f"Run of the {name} suite:", "", f"* Machine: {meta['machine']}",
                  "* Commands (each a process; units already saved are skipped): "
                  + "; ".join(f"`{c}`" for c in meta.get("commands", [meta.get("command")])),
                  f"* Seeds: {meta['seeds']} for the largest budget and PH-ATM; "
                  f"{meta['curve_seeds']} for the other budgets, {meta.get('split_seeds')} for the budget split. "
                  "Data splits fixed (split seed 0).",
                  f"* Started {meta['started']}; software: {meta['software']}", ""]
        lines += suite_report(name, res, a, out)
        lines += copy_examples(name, Path(a.work), out, max(a.budgets))
    path = out / "REPRODUCTION.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def main() -> None:
    from hf_atm.atm.model import HEAD_INITS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="+", default=["text", "vision"], choices=sorted(SUITE_SETTINGS))
    p.add_argument("--budgets", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--curve-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--split-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--ph-rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="reports/work")
    p.add_argument("--out", default="reports")
    p.add_argument("--max-train", type=int, default=None, help="Override the suites' training pool per task.")
    p.add_argument("--max-test", type=int, default=None, help="Override the suites' test examples per task.")
    p.add_argument("--notes", default=None, help="A Markdown file (the reading of the numbers) put after the header.")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--head_init", "--head-init", dest="head_init", default="random",
                   choices=list(HEAD_INITS),
                   help="How every method's heads start (the same heads for all methods of a seed).")
    a = p.parse_args()
    if any(b < 1 for b in a.budgets):
        p.error("--budgets: every budget must be >= 1 epoch")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not a.report_only:
        for name in a.suites:
            run_suite(name, a)
    print(f"report: {write_report(a)}")


def write_meta(path: Path, a: argparse.Namespace) -> None:
    """Machine, commands, seeds and software of a suite's runs (each start, resumed or parallel, appends its
    command)."""
    import transformers

    meta = json.loads(path.read_text()) if path.exists() else {}
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    meta.setdefault("machine", f"{cpu}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}, "
                               f"CPU only")
    meta.setdefault("started", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    meta.setdefault("software", f"python {platform.python_version()}, torch {torch.__version__}, "
                                f"transformers {transformers.__version__}")
    commands = meta.get("commands") or ([meta["command"]] if "command" in meta else [])
    command = "python " + " ".join(sys.argv)
    if command not in commands:
        commands.append(command)
    meta["commands"] = commands
    for key in ("seeds", "curve_seeds", "split_seeds"):
        meta[key] = sorted(set(meta.get(key) or []) | set(getattr(a, key)))
    path.write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
