"""Reproduce the ATM paper's claims on the embedded suites and write ``reports/REPRODUCTION.md`` with plots.

    python benchmarks/reproduce.py [--suites vision text] [--seeds 0 1 2] [--head_init PROTOCOL]
                                   [--budgets ...] [--threads 2] [--work reports/work] [--out reports]
                                   [--notes reports/notes.md] [--report-only]

Fair protocol (issue 12; ``../shared/ATM.md``, "what a fair comparison needs"):

* **Shared frozen heads with headroom.** Every method of a seed starts from the same model, heads made once by
  the suite's head protocol (``hf_atm.atm.heads.shared_heads``) and frozen: vision ``prototypes`` (16 seeded
  training examples per class, cosine heads), text ``zero_shot`` (the shipped label descriptions embedded by
  the backbone). Every table starts with that model untuned (``zero-shot row``), so the room a method has is
  visible. ``--head_init random`` runs the same study with today's trainable random heads (second section).
* **One learning-rate grid per suite for every method** (``lrs`` below), each method's rate chosen on the
  validation split at the headline budget (B = 8) and kept at every other budget. The one-shot merges choose
  their rate and scale together on validation (``one_shot_merge``'s grid: 0, 0.1 .. 1.0 and 1/n, extended
  upward while validation still rises). ATM chooses its rate and its in-loop scale from {1/n, 0.5, 0.75, 1} on
  validation (the mean score after the last round).
* **Budgets to convergence**: vision B in {1, 2, 4, 8, 16, 32}, text B in {1, 2, 4, 8, 16}; individual and
  joint training run B epochs per task; ATM runs B rounds of 1 epoch. With a fresh optimizer every round and
  every (round, task) seeded, round K of one long run *is* the K-round run, so one run of max(B) rounds gives
  ATM at every budget.
* **Ablations** at the chosen rate and scale: the split of a 10-epoch budget (10 x 1 = round 10 of the long
  run, 5 x 2, 2 x 5, 1 x 10); TIES, Breadcrumbs and DARE inside the loop (B = 8; each as a mean, scaled like
  the chosen ATM scale); per round, the mean pairwise cosine of the round's task vectors (against that of the
  individual task vectors) and the merged model's multi-task training loss on a fixed training slice;
  PH-ATM from task arithmetic, TIES and TSV-M starts whose scale is tuned on the validation part PH trains on,
  its round chosen on the held-out rest, with batches small enough for several optimizer steps per round.
* **Beyond the paper**: ``merge_scale="auto"`` (a line search per round) against the fixed 1/n: rounds needed
  to come within 1 point of joint training's B = 8 test accuracy.

Every unit of work (suite, seed, what) is saved as JSON under ``--work/<suite>_<protocol>/seed<k>/`` as soon as
it finishes; a run started again skips what is done. Units that depend on a choice made on validation (the
chosen rate, scale) are planned once the units they depend on exist. The backbone's weights fingerprint
(``hf_atm.backbones.backbone_identity``) is recorded in ``suite.json``; a run on other weights is refused
instead of being mixed with the saved units. ``--report-only`` rewrites the report from what is there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from hf_atm.atm.evaluation import mean_accuracy, normalized_accuracy

REPO = Path(__file__).resolve().parents[1]

METHODS = {  # one-shot merges and their parameters (the papers' usual settings); rate and scale tuned on validation
    "task_arithmetic": {},
    "ties": {"density": 0.2},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "dare_linear": {"density": 0.5},
    "tsv": {},
    "iso_c": {},
}
IN_LOOP = {  # ATM with another merge inside the loop; normalize: each a mean like ATM's 1/n task arithmetic
    "ties": {"merge_density": 0.2},
    "breadcrumbs": {"merge_density": 0.9, "merge_gamma": 0.01, "merge_normalize": True},
    "dare_linear": {"merge_density": 0.5, "merge_normalize": True},
}
LABELS = {"task_arithmetic": "task arithmetic", "ties": "TIES", "breadcrumbs": "Breadcrumbs",
          "dare_linear": "DARE", "tsv": "TSV-M", "iso_c": "Iso-C", "joint": "joint multi-task",
          "individual": "individual", "atm": "ATM", "zero_shot": "pre-trained, shared heads, no tuning",
          "auto": "ATM, merge_scale=auto"}  # fmt: skip
PH_STARTS = ("task_arithmetic", "ties", "tsv")
HEADLINE = 8  # the budget where rates and scales are chosen and the headline table stands
SPLIT_BUDGET = 10  # the paper's budget split: 10 x 1 / 5 x 2 / 2 x 5 / 1 x 10
ATM_SCALES = ("1/n", 0.5, 0.75, 1.0)
TRAIN_LOSS_SLICE = 256  # training examples per task on which the merged model's multi-task loss is measured
SUITE_SETTINGS = {
    "vision": {"batch": 64, "max_train": 1000, "max_test": 500, "head_init": "prototypes",
               "lrs": [3e-4, 1e-3, 3e-3], "budgets": [1, 2, 4, 8, 16, 32], "ph_batch": 8, "ph_rounds": 8},
    "text": {"batch": 16, "max_train": 900, "max_test": 200, "max_length": 32, "head_init": "zero_shot",
             "lrs": [3e-5, 1e-4, 3e-4], "budgets": [1, 2, 4, 8, 16], "ph_batch": 8, "ph_rounds": 8},
}  # fmt: skip


def scale_value(scale: float | str, num_tasks: int) -> float:
    """An ATM scale of :data:`ATM_SCALES` as a number (``"1/n"``: one over the number of tasks)."""
    return 1.0 / num_tasks if scale == "1/n" else float(scale)


def lr_tag(lr: float) -> str:
    return f"{lr:g}"


def scale_tag(scale: float | str) -> str:
    return "mean" if scale == "1/n" else f"{float(scale):g}"


# ----------------------------------------------------------------------------------------------------------
# the suite and its models
# ----------------------------------------------------------------------------------------------------------
class Suite:
    """A task suite prepared once per process: datasets, backbone, the seeds' shared heads."""

    def __init__(self, name: str, settings: dict[str, Any]):
        from hf_atm.data import load_suite

        self.name, self.settings = name, settings
        self.head_init = settings["head_init"]
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
        self.num_tasks = len(self.labels)

    def identity(self) -> dict[str, Any]:
        from hf_atm.backbones import backbone_identity

        return backbone_identity(self.backbone)

    def model(self, seed: int) -> Any:
        """A fresh model for `seed`: every method of a seed gets the same heads, made once by the protocol."""
        from functools import partial

        from hf_atm.atm import MultiTaskModel
        from hf_atm.atm.heads import shared_heads

        if seed not in self._factories:
            make = partial(MultiTaskModel.from_backbone, self.backbone, self.labels, pooling=self.pooling, seed=seed)
            self._factories[seed] = shared_heads(make, self.head_init, self.data, tokenizer=self.tokenizer,
                                                 seed=seed)  # fmt: skip
        return self._factories[seed]()

    def args(self, out: Path, seed: int, lr: float, **kw: Any) -> Any:
        from hf_atm.atm import ATMConfig

        base = dict(output_dir=str(out), seed=seed, learning_rate=lr, weight_decay=0.01,
                    per_device_train_batch_size=self.settings["batch"], per_device_eval_batch_size=256,
                    report_to="none", save_strategy="no", logging_steps=50, dataloader_num_workers=0,
                    disable_tqdm=True, rounds=1, epochs_per_round=1.0)  # fmt: skip
        base.update(self.settings.get("atm_config", {}))  # --config options reach every method
        base.update(kw)
        return ATMConfig(**base)


def _accuracies(trainer: Any, split: str) -> dict[str, float]:
    return trainer.accuracies({t: trainer.task_data[t][split] for t in trainer.task_names})


# ----------------------------------------------------------------------------------------------------------
# units of work (each returns a JSON-able dict)
# ----------------------------------------------------------------------------------------------------------
def run_zero_shot(suite: Suite, seed: int, out: Path) -> dict[str, Any]:
    """The shared model with no tuning: the room every method has."""
    from hf_atm.atm import ATMTrainer

    tr = ATMTrainer(model=suite.model(seed), args=suite.args(out, seed, 1e-3), task_datasets=suite.data,
                    processing_class=suite.tokenizer)
    return {"validation": _accuracies(tr, "validation"), "test": _accuracies(tr, "test")}


def run_individual_and_merges(suite: Suite, seed: int, out: Path, budget: int, lr: float) -> dict[str, Any]:
    """Individual fine-tuning at `budget` and every one-shot merge of its task vectors (scale on validation)."""
    from hf_atm.atm import finetune_individual, one_shot_merge

    args = suite.args(out, seed, lr)
    model = suite.model(seed)
    t0 = time.perf_counter()
    ind = finetune_individual(model, args, suite.data, budget_epochs=budget, processing_class=suite.tokenizer)
    res: dict[str, Any] = {"individual": {"test": ind.test_accuracy, "validation": ind.validation_accuracy,
                                          "seconds": time.perf_counter() - t0,
                                          "cosine": ind.entries["test"]["cosine"]}}
    for method, params in METHODS.items():
        t0 = time.perf_counter()
        m = one_shot_merge(model, ind, args, suite.data, method, seed=seed, processing_class=suite.tokenizer,
                           reference_accuracies=ind.reference_accuracies("test"), **params)  # fmt: skip
        res[method] = {"test": m.entries["test"]["accuracy"], "validation": m.entries["validation"]["accuracy"],
                       "scale": m.scale, "at_grid_edge": m.at_grid_edge,
                       "validation_by_scale": {str(k): v for k, v in m.validation_by_scale.items()},
                       "params": params, "seconds": time.perf_counter() - t0}
        print(f"[{suite.name} seed {seed} B={budget} lr {lr:g}] {method}: scale {m.scale:.2f}, validation "
              f"{mean_accuracy(res[method]['validation']):.4f}", flush=True)
    return res


def run_joint(suite: Suite, seed: int, out: Path, budget: int, lr: float) -> dict[str, Any]:
    from hf_atm.atm import train_joint

    t0 = time.perf_counter()
    r = train_joint(suite.model(seed), suite.args(out, seed, lr), suite.data, budget_epochs=budget,
                    processing_class=suite.tokenizer)
    return {"test": r.entries["test"]["accuracy"], "validation": r.entries["validation"]["accuracy"],
            "seconds": time.perf_counter() - t0}


def run_atm(suite: Suite, seed: int, out: Path, rounds: int, epochs: float, lr: float, scale: float | str,
            *, mode: str = "pa", model: Any = None, data: dict[str, Any] | None = None, train_loss: bool = False,
            **config: Any) -> dict[str, Any]:
    """An ATM run with test accuracy after every round (index 0 = the start); `train_loss`: also the merged
    model's multi-task loss on the first :data:`TRAIN_LOSS_SLICE` training examples of each task after every round."""
    from transformers import TrainerCallback

    from hf_atm.atm import ATMTrainer

    per_round: list[dict[str, float]] = []
    losses: list[dict[str, float]] = []

    def record(trainer: Any) -> None:
        per_round.append(_accuracies(trainer, "test"))
        if train_loss:  # the merged model's multi-task training loss on a fixed slice of each task's train split
            losses.append({t: trainer.task_loss(t, d["train"].select(range(min(TRAIN_LOSS_SLICE, len(d["train"])))))
                           for t, d in trainer.task_data.items()})

    class EveryRound(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kw):  # noqa: ANN001 - Trainer's callback signature
            record(trainer)

    merge_scale = scale if scale == "auto" else scale_value(scale, suite.num_tasks)
    args = suite.args(out, seed, lr, rounds=rounds, epochs_per_round=epochs, atm_mode=mode, merge_scale=merge_scale,
                      **config)  # fmt: skip
    trainer = ATMTrainer(model=model if model is not None else suite.model(seed), args=args,
                         task_datasets=data if data is not None else suite.data, processing_class=suite.tokenizer)
    record(trainer)
    trainer.add_callback(EveryRound())
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    hist = trainer.history
    return {"rounds": rounds, "epochs_per_round": epochs, "lr": lr, "scale": scale, "config": config,
            "test_by_round": per_round, "test": per_round[trainer.best_round], "best_round": trainer.best_round,
            "validation_by_round": [h["accuracy"] for h in hist],
            "cosine_by_round": [h["mean_cosine"] for h in hist],
            "merge_scale_by_round": [h.get("merge_scale") for h in hist],
            "train_loss_by_round": losses, "seconds": seconds, "timing": dict(trainer.timing)}


def ph_tuning_data(suite: Suite, seed: int, fraction: float) -> dict[str, Any]:
    """The suite with each task's validation split replaced by PH-ATM's tuning part (the part the rounds train
    on, :func:`hf_atm.atm.taskdata.ph_validation_split`), so that a start's scale tuned on it leaves PH-ATM's
    selection part unseen."""
    from datasets import DatasetDict

    from hf_atm.atm.taskdata import ph_validation_split

    out = {}
    for t, ds in suite.data.items():
        tune, _ = ph_validation_split(ds["validation"], fraction, seed)
        out[t] = DatasetDict({"train": ds["train"], "validation": tune, "test": ds["test"]})
    return out


def run_ph(suite: Suite, seed: int, out: Path, lr: float, rounds: int) -> dict[str, Any]:
    """PH-ATM from the task arithmetic, TIES and TSV-M merges of individual models fine-tuned at the headline
    budget and the individual rate: each start's scale tuned on PH's tuning part, its rounds (1 epoch of the
    tuning part, batch ``ph_batch``) chosen on the held-out selection part."""
    from hf_atm.atm import finetune_individual, one_shot_merge

    fraction = 0.5  # validation is 88-100 examples per task: half tunes, half selects the round
    tune_data = ph_tuning_data(suite, seed, fraction)
    args = suite.args(out, seed, lr)
    model = suite.model(seed)
    ind = finetune_individual(model, args, suite.data, budget_epochs=HEADLINE, processing_class=suite.tokenizer)
    res: dict[str, Any] = {"lr": lr, "select_fraction": fraction}
    for method in PH_STARTS:
        m = one_shot_merge(model, ind, args, tune_data, method, seed=seed, processing_class=suite.tokenizer,
                           **METHODS[method])  # fmt: skip
        ph = run_atm(suite, seed, out / f"ph_{method}", rounds, 1.0, lr, 1.0 / suite.num_tasks, mode="ph",
                     model=m.model, ph_select_fraction=fraction,
                     per_device_train_batch_size=suite.settings["ph_batch"])  # fmt: skip
        ph["start_scale"] = m.scale
        res[method] = ph
        print(f"[{suite.name} seed {seed}] PH-ATM from {method}: start {mean_accuracy(ph['test_by_round'][0]):.4f}"
              f", round {ph['best_round']} chosen: {mean_accuracy(ph['test']):.4f}", flush=True)
    return res


# ----------------------------------------------------------------------------------------------------------
# choices made on validation, and the plan
# ----------------------------------------------------------------------------------------------------------
def _val(acc: dict[str, float]) -> float:
    v = mean_accuracy(acc)
    return -math.inf if math.isnan(v) else v


def atm_key(lr: float, scale: float | str) -> str:
    return f"atm_{HEADLINE}x1_lr{lr_tag(lr)}_{scale_tag(scale)}"


def _first_best(cands: list[tuple[float, Any]]) -> Any:
    """The value of the best score; ``max`` keeps the first of equal scores (candidates come smallest first)."""
    return max(cands, key=lambda c: c[0])[1]


def atm_rate(units: dict[str, Any], lrs: list[float]) -> float | None:
    """ATM's rate: the best validation (after the last headline round) over the grid at the authors' scale 1/n."""
    runs = [units.get(atm_key(lr, "1/n")) for lr in lrs]
    if any(r is None for r in runs):
        return None
    return _first_best([(_val(r["validation_by_round"][-1]), lr) for r, lr in zip(runs, lrs)])


def choose_rates(units: dict[str, Any], lrs: list[float]) -> dict[str, Any] | None:
    """Per method, the learning rate with the best mean validation accuracy at the headline budget (ties: the
    smaller rate); ATM's entry is ``(lr, scale)``, chosen by coordinate search: the rate at scale 1/n, then the
    scale of :data:`ATM_SCALES` at that rate (ties: the earlier scale). None until every unit it needs exists."""
    ind = [units.get(f"individual_B{HEADLINE}_lr{lr_tag(lr)}") for lr in lrs]
    joint = [units.get(f"joint_B{HEADLINE}_lr{lr_tag(lr)}") for lr in lrs]
    lr_atm = atm_rate(units, lrs)
    if any(u is None for u in ind + joint) or lr_atm is None:
        return None
    scales = [units.get(atm_key(lr_atm, s)) for s in ATM_SCALES]
    if any(u is None for u in scales):
        return None
    chosen: dict[str, Any] = {}
    for key in ["individual", *METHODS]:
        chosen[key] = _first_best([(_val(u[key]["validation"]), lr) for u, lr in zip(ind, lrs)])
    chosen["joint"] = _first_best([(_val(u["validation"]), lr) for u, lr in zip(joint, lrs)])
    chosen["atm"] = (lr_atm, _first_best([(_val(u["validation_by_round"][-1]), s)
                                          for u, s in zip(scales, ATM_SCALES)]))
    return chosen


def plan(suite: Suite, units: dict[str, Any], seed: int) -> Iterator[tuple[str, Callable[..., dict], dict]]:
    """The units of one seed, in order: the headline grid first (it decides the rates and scales), then what
    depends on those choices. Re-planned after every unit."""
    lrs, budgets = suite.settings["lrs"], suite.settings["budgets"]
    yield "zero_shot", run_zero_shot, {}
    for lr in lrs:
        yield f"individual_B{HEADLINE}_lr{lr_tag(lr)}", run_individual_and_merges, {"budget": HEADLINE, "lr": lr}
        yield f"joint_B{HEADLINE}_lr{lr_tag(lr)}", run_joint, {"budget": HEADLINE, "lr": lr}
    for lr in lrs:  # ATM's rate at the authors' scale, then its scale at that rate
        yield atm_key(lr, "1/n"), run_atm, {"rounds": HEADLINE, "epochs": 1.0, "lr": lr, "scale": "1/n"}
    lr_atm = atm_rate(units, lrs)
    if lr_atm is None:
        return
    for s in ATM_SCALES:
        yield atm_key(lr_atm, s), run_atm, {"rounds": HEADLINE, "epochs": 1.0, "lr": lr_atm, "scale": s}
    chosen = choose_rates(units, lrs)
    if chosen is None:
        return
    lr_atm, s_atm = chosen["atm"]
    top = max(budgets)
    yield (f"atm_{top}x1_chosen", run_atm,
           {"rounds": top, "epochs": 1.0, "lr": lr_atm, "scale": s_atm, "train_loss": True})
    for b in budgets:
        if b == HEADLINE:
            continue
        for lr in sorted({chosen[k] for k in ["individual", *METHODS]}):
            yield f"individual_B{b}_lr{lr_tag(lr)}", run_individual_and_merges, {"budget": b, "lr": lr}
        yield f"joint_B{b}_lr{lr_tag(chosen['joint'])}", run_joint, {"budget": b, "lr": chosen["joint"]}
    for k, e in ((5, 2), (2, 5), (1, 10)):
        yield f"atm_{k}x{e}_chosen", run_atm, {"rounds": k, "epochs": float(e), "lr": lr_atm, "scale": s_atm}
    in_loop_scale = scale_value(s_atm, suite.num_tasks) * suite.num_tasks  # the chosen multiple of the mean
    for method, cfg in IN_LOOP.items():
        yield (f"atm_{HEADLINE}x1_{method}", run_atm,
               {"rounds": HEADLINE, "epochs": 1.0, "lr": lr_atm, "scale": in_loop_scale, "merge_method": method,
                **cfg})
    yield f"ph_B{HEADLINE}", run_ph, {"lr": chosen["individual"], "rounds": suite.settings["ph_rounds"]}
    yield f"atm_{top}x1_auto", run_atm, {"rounds": top, "epochs": 1.0, "lr": lr_atm, "scale": "auto"}
    if s_atm != "1/n":
        yield f"atm_{top}x1_mean", run_atm, {"rounds": top, "epochs": 1.0, "lr": lr_atm, "scale": "1/n"}


def is_headline(unit: str) -> bool:
    """Whether `unit` belongs to the headline grid (the units the choices on validation are made from)."""
    return unit == "zero_shot" or unit.startswith((f"individual_B{HEADLINE}_", f"joint_B{HEADLINE}_",
                                                  f"atm_{HEADLINE}x1_lr"))


def suite_settings(name: str, a: argparse.Namespace) -> dict[str, Any]:
    settings = dict(SUITE_SETTINGS[name])
    if a.config:
        settings["atm_config"] = dict(a.config)
    if a.head_init:
        settings["head_init"] = a.head_init
    if a.budgets:
        settings["budgets"] = sorted(set(a.budgets) | {HEADLINE})
    return settings


def work_dir(a: argparse.Namespace, name: str, head_init: str) -> Path:
    return Path(a.work) / f"{name}_{head_init}"


def run_suite(name: str, a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    settings = suite_settings(name, a)
    root = work_dir(a, name, settings["head_init"])
    suite = Suite(name, settings)
    identity = suite.identity()
    saved = root / "suite.json"
    if saved.exists():  # never mix units of other settings or other backbone weights
        before = json.loads(saved.read_text())
        for key, now, was in (("settings", settings, before["settings"]),
                              ("backbone weights", identity["weights_sha256"], before["backbone"]["weights_sha256"])):
            if now != was:
                raise SystemExit(f"{saved}: the saved units were run with {key} {was}, this run has {now}; "
                                 f"give another --work to run these")  # fmt: skip
    suite.model(a.seeds[0])  # a protocol that does not apply to the suite fails here, before anything is written
    root.mkdir(parents=True, exist_ok=True)
    write_meta(root / "meta.json", a)
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "backbone": identity, "sizes": suite.sizes,
                               "labels": suite.labels}, indent=1))
    tmp.replace(saved)
    # the headline grid of every seed first (three seeds of the headline table early), then the rest
    for wanted, seed in [(is_headline, s) for s in a.seeds] + [(lambda u: True, s) for s in a.seeds]:
        seed_dir = root / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        while True:
            units = {p.stem: json.loads(p.read_text()) for p in seed_dir.glob("*.json")}
            todo = next(((u, f, kw) for u, f, kw in plan(suite, units, seed) if u not in units and wanted(u)), None)
            if todo is None:
                break
            unit, run, kwargs = todo
            t0 = time.perf_counter()
            res = run(suite, seed, seed_dir / f"{unit}.run", **kwargs)
            res["wall_seconds"] = time.perf_counter() - t0
            tmp = seed_dir / f"{unit}.tmp"
            tmp.write_text(json.dumps(res, indent=1))
            tmp.replace(seed_dir / f"{unit}.json")  # a unit is either complete or absent
            print(f"[{name} seed {seed}] {unit} done in {res['wall_seconds']:.0f} s", flush=True)


def portable(arg: str) -> str:
    """A command-line argument as it may be written into a saved file: an absolute path relative to the
    repository when inside it, else only its last part (no local absolute path is ever recorded)."""
    if not os.path.isabs(arg):
        return arg
    path = Path(arg).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else f".../{path.name}"


def write_meta(path: Path, a: argparse.Namespace) -> None:
    """Machine, commands, seeds and software of a suite's runs (each start, resumed or parallel, appends)."""
    import transformers

    meta = json.loads(path.read_text()) if path.exists() else {}
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    meta.setdefault("machine", f"{cpu}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}, "
                               f"CPU only, {a.threads} threads")
    meta.setdefault("started", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    meta.setdefault("software", f"python {platform.python_version()}, torch {torch.__version__}, "
                                f"transformers {transformers.__version__}")
    command = "python " + " ".join(portable(arg) for arg in sys.argv)
    meta["commands"] = [*[c for c in meta.get("commands", []) if c != command], command]
    meta["seeds"] = sorted(set(meta.get("seeds") or []) | set(a.seeds))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------
def _ms(xs: list[float]) -> str:
    """'mean ± sd' in percent (sd over seeds; no sd with one seed)."""
    if not xs:
        return "-"
    m = 100 * statistics.fmean(xs)
    return f"{m:.1f} ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{m:.1f}"


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def load_results(root: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for d in sorted(root.glob("seed*")):
        out[int(d.name[4:])] = {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")}
    return out


def _seconds(units: list[dict[str, Any] | None]) -> float:
    return sum(u.get("wall_seconds", 0.0) for u in units if u)


class Rows:
    """Per-method rows of a table: absolute mean accuracies per seed, per-task accuracies, normalized."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.seconds = 0.0

    def add(self, key: str, acc: dict[str, float], ref: dict[str, float] | None, note: str = "") -> None:
        r = self.rows.setdefault(key, {"abs": [], "norm": [], "tasks": {}, "notes": []})
        r["abs"].append(mean_accuracy(acc))
        if ref is not None:
            r["norm"].append(mean_accuracy(normalized_accuracy(acc, ref)))
        for t, v in acc.items():
            r["tasks"].setdefault(t, []).append(v)
        if note:
            r["notes"].append(note)

    def mean(self, key: str) -> float:
        return _mean(self.rows[key]["abs"]) if key in self.rows else math.nan


def budget_rows(res: dict[int, dict[str, Any]], settings: dict[str, Any], b: int) -> Rows:
    """Every method at budget `b`, each at its rate chosen on validation at the headline budget."""
    rows = Rows()
    top = max(settings["budgets"])
    for units in res.values():
        chosen = choose_rates(units, settings["lrs"])
        if chosen is None or "zero_shot" not in units:
            continue
        ind = units.get(f"individual_B{b}_lr{lr_tag(chosen['individual'])}")
        ref = ind["individual"]["test"] if ind else None
        rows.add("zero_shot", units["zero_shot"]["test"], ref)
        if ind:
            rows.add("individual", ind["individual"]["test"], ref, f"lr {chosen['individual']:g}")
            rows.seconds += ind["individual"]["seconds"]
        for m in METHODS:
            u = units.get(f"individual_B{b}_lr{lr_tag(chosen[m])}")
            if u:
                edge = " (edge)" if u[m].get("at_grid_edge") else ""
                rows.add(m, u[m]["test"], ref, f"lr {chosen[m]:g}, scale {u[m]['scale']:g}{edge}")
                rows.seconds += u[m]["seconds"]
        joint = units.get(f"joint_B{b}_lr{lr_tag(chosen['joint'])}")
        if joint:
            rows.add("joint", joint["test"], ref, f"lr {chosen['joint']:g}")
            rows.seconds += joint["wall_seconds"]
        lr_atm, s_atm = chosen["atm"]
        run = units.get(f"atm_{top}x1_chosen")
        if b == HEADLINE:  # the headline ATM is the validation-chosen run itself
            run = units.get(atm_key(lr_atm, s_atm))
        if run and len(run["test_by_round"]) > b:
            rows.add("atm", run["test_by_round"][b], ref, f"lr {lr_atm:g}, scale {scale_tag(s_atm)}")
            rows.seconds += run["wall_seconds"] * (b / run["rounds"])
    return rows


def _axes() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def _save(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str = "mean test accuracy (%)") -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _series(runs: list[list[float]]) -> tuple[list[int], list[float], list[float]]:
    n = min(len(r) for r in runs)
    ms = [statistics.fmean(r[i] for r in runs) for i in range(n)]
    sds = [statistics.stdev([r[i] for r in runs]) if len(runs) > 1 else 0.0 for i in range(n)]
    return list(range(n)), ms, sds


def _plot_rounds(ax: Any, runs: list[list[dict[str, float]]], label: str) -> None:
    """Mean test accuracy by round (``test_by_round`` of each seed's run), mean ± sd over seeds, in percent."""
    x, m, sd = _series([[mean_accuracy(a) for a in r] for r in runs])
    ax.errorbar(x, [100 * v for v in m], yerr=[100 * v for v in sd], fmt="-o", capsize=3, label=label)


def table(rows: Rows, tasks: list[str], order: list[str]) -> list[str]:
    lines = ["| method | " + " | ".join(tasks) + " | mean | normalized | chosen on validation |",
             "|---" * (len(tasks) + 4) + "|"]
    for key in order:
        r = rows.rows.get(key)
        if not r:
            continue
        notes = "; ".join(dict.fromkeys(r["notes"])) if r["notes"] else "-"  # a choice once, differing ones each
        lines.append(f"| {LABELS[key]} | " + " | ".join(_ms(r["tasks"][t]) for t in tasks)
                     + f" | {_ms(r['abs'])} | {_ms(r['norm'])} | {notes} |")
    return lines


def suite_report(name: str, root: Path, out: Path) -> list[str]:
    info = json.loads((root / "suite.json").read_text())
    settings = info["settings"]
    res = load_results(root)
    budgets, top = settings["budgets"], max(settings["budgets"])
    tasks = sorted(info["sizes"])
    tag = f"{name}_{settings['head_init']}"
    done = {s: u for s, u in res.items() if choose_rates(u, settings["lrs"]) is not None}
    lines = [f"## The {name} suite, heads: {settings['head_init']}", ""]
    lines.append("Tasks (train / validation / test examples, classes): " + "; ".join(
        f"`{t}` {s['train']} / {s['validation']} / {s['test']}, {len(info['labels'][t])}"
        for t, s in info["sizes"].items()) + f". Settings: {json.dumps(settings)}. Backbone: "
        f"{json.dumps(info['backbone'])}.")
    lines += ["", f"Seeds with the whole headline grid: {sorted(done) or 'none yet'} (of {sorted(res)} started).", ""]
    if not done:
        return lines
    order = ["zero_shot", "individual", "joint", "atm", *METHODS]
    # headline
    rows = budget_rows(done, settings, HEADLINE)
    grid_s = sum(_seconds([u.get(f"{k}_B{HEADLINE}_lr{lr_tag(lr)}") for k in ("individual", "joint")
                           for lr in settings["lrs"]]) for u in done.values())
    grid_s += sum(_seconds([u.get(atm_key(lr, s)) for lr in settings["lrs"] for s in ATM_SCALES])
                  for u in done.values())  # the ATM units of the coordinate search (those that exist)
    lines += [f"### Headline: B = {HEADLINE} (test accuracy %, mean ± sd over seeds {sorted(done)})", ""]
    lines += table(rows, tasks, order)
    room = rows.mean("individual") - rows.mean("zero_shot")
    lines += ["", f"Room (individual - zero-shot row): {100 * room:+.1f} points (the issue asks for at least 15). "
              f"Compute of the whole headline grid (every rate for individual + merges and joint; ATM: every rate at "
              f"1/n, then every scale at its rate): {grid_s / 60:.1f} min.", ""]
    # budgets
    by_b = {b: budget_rows(done, settings, b) for b in budgets}
    if len(budgets) > 1:  # a headline-only study has no budget curve
        fig, ax = _axes()
        for key in ["atm", "joint", "individual", *METHODS, "zero_shot"]:
            pts = [(b, by_b[b].rows[key]["abs"]) for b in budgets if key in by_b[b].rows]
            if pts:
                ax.errorbar([b for b, _ in pts], [100 * _mean(v) for _, v in pts],
                            yerr=[100 * statistics.stdev(v) if len(v) > 1 else 0 for _, v in pts],
                            fmt="-o" if key in ("atm", "joint", "individual") else "--.", capsize=3, label=LABELS[key])
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        png = out / f"{tag}_budget_curve.png"
        _save(fig, ax, png, f"{name} ({settings['head_init']} heads): accuracy against budget",
              "budget B (epochs per task; ATM: rounds of 1 epoch)")
        lines += ["### Budgets", "", f"![budget curve]({png.name})", "",
                  "| method | " + " | ".join(f"B = {b}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
        for key in order:
            lines.append(f"| {LABELS[key]} | " + " | ".join(_ms(by_b[b].rows[key]["abs"]) if key in by_b[b].rows
                                                           else "-" for b in budgets) + " |")
        lines += ["", f"Compute of the budget table: {sum(r.seconds for r in by_b.values()) / 60:.1f} min "
                  "(ATM's share is its long run's, pro rata of the rounds).", ""]
    # ATM rounds vs joint epochs, and the multi-task training loss / cosine per round
    long_runs = [u[f"atm_{top}x1_chosen"] for u in done.values() if f"atm_{top}x1_chosen" in u]
    if long_runs:
        fig, ax = _axes()
        _plot_rounds(ax, [r["test_by_round"] for r in long_runs], "ATM test accuracy after round K")
        pts = [(b, by_b[b].rows["joint"]["abs"]) for b in budgets if "joint" in by_b[b].rows]
        ax.errorbar([b for b, _ in pts], [100 * _mean(v) for _, v in pts], fmt="-s", capsize=3,
                    label="joint training after K epochs")
        png = out / f"{tag}_rounds_vs_epochs.png"
        _save(fig, ax, png, f"{name}: ATM by round beside joint training by epoch", "K")
        lines += [f"![rounds vs epochs]({png.name})", ""]
        lines += claims_per_round(done, long_runs, out, tag, name, settings["lrs"])
    lines += split_section(done, top)
    lines += in_loop_section(done, settings["lrs"])
    lines += ph_section(done, out, tag, name)
    lines += auto_section(done, top, settings["lrs"], out, tag, name)
    lines += claims(rows, by_b, budgets)
    return lines


def headline_atm(units: dict[str, Any], lrs: list[float]) -> dict[str, Any] | None:
    """The ATM run of the headline grid chosen on validation (None until the grid is complete)."""
    chosen = choose_rates(units, lrs)
    if chosen is None:
        return None
    lr, s = chosen["atm"]
    return units[atm_key(lr, s)]


def claims_per_round(done: dict[int, dict[str, Any]], long_runs: list[dict[str, Any]], out: Path, tag: str,
                     name: str, lrs: list[float]) -> list[str]:
    """The orthogonality and upper-bound claims: cosine of the round's task vectors and the multi-task loss."""
    import numpy as np

    lines = ["### Per round: task-vector cosine and multi-task training loss (the long ATM run)", ""]
    one_shot = []
    for u in done.values():
        ind = u[f"individual_B{HEADLINE}_lr{lr_tag(choose_rates(u, lrs)['individual'])}"]
        c = np.array(ind["individual"]["cosine"], dtype=float)
        one_shot.append(float(c[np.triu_indices_from(c, 1)].mean()))
    _, cm, _ = _series([[c for c in r["cosine_by_round"] if c is not None] for r in long_runs])
    lines.append(f"Mean pairwise cosine of the round's task vectors, rounds 1..{len(cm)}: "
                 + ", ".join(f"{v:.3f}" for v in cm) + "; of the individual (one-shot) task vectors at B = "
                 f"{HEADLINE}: {_mean(one_shot):.3f} (seeds {sorted(done)}).")
    loss = [[statistics.fmean(d.values()) for d in r["train_loss_by_round"]] for r in long_runs
            if r.get("train_loss_by_round")]
    if loss:
        _, lm, _ = _series(loss)
        lines.append("Multi-task training loss of the merged model (mean over tasks, "
                     f"{TRAIN_LOSS_SLICE} training examples per task), round 0..{len(lm) - 1}: "
                     + ", ".join(f"{v:.3f}" for v in lm) + ".")
        fig, ax = _axes()
        ax.plot(range(len(lm)), lm, "-o", label="multi-task training loss")
        png = out / f"{tag}_train_loss.png"
        _save(fig, ax, png, f"{name}: merged model's multi-task training loss by round", "round", "loss")
        lines += ["", f"![train loss]({png.name})"]
    return [*lines, ""]


def split_section(done: dict[int, dict[str, Any]], top: int) -> list[str]:
    keys = {(10, 1): f"atm_{top}x1_chosen", (5, 2): "atm_5x2_chosen", (2, 5): "atm_2x5_chosen",
            (1, 10): "atm_1x10_chosen"}
    lines = [f"### Budget split of {SPLIT_BUDGET} epochs (paper: 88.08 / 85.27 / 79.11 / 72.22)", "",
             "| rounds x epochs per round | mean test accuracy (%) | seeds |", "|---|---|---|"]
    if not any(key in u for u in done.values() for key in list(keys.values())[1:]):
        return []  # not run (a headline-only study)
    seconds = 0.0
    for (k, e), key in keys.items():
        accs = {s: mean_accuracy(u[key]["test_by_round"][k]) for s, u in done.items()
                if key in u and len(u[key]["test_by_round"]) > k}
        seconds += sum(u[key]["wall_seconds"] * (k / u[key]["rounds"]) for u in done.values() if key in u)
        lines.append(f"| {k} x {e} | {_ms(list(accs.values()))} | {sorted(accs)} |")
    return [*lines, "", f"Compute: {seconds / 60:.1f} min (10 x 1: its share of the long run).", ""]


def in_loop_section(done: dict[int, dict[str, Any]], lrs: list[float]) -> list[str]:
    lines = [f"### Other merges inside the loop (B = {HEADLINE}, ATM's chosen rate; each a mean scaled like "
             "ATM's chosen scale; paper: DARE collapsed, Breadcrumbs 86.2 %)", "",
             "| merge in the loop | mean test accuracy (%) | seeds |", "|---|---|---|"]
    if not any(f"atm_{HEADLINE}x1_{m}" in u for u in done.values() for m in IN_LOOP):
        return []  # not run (a headline-only study)
    seconds = 0.0
    for method in ["task_arithmetic", *IN_LOOP]:
        accs = {}
        for s, u in done.items():
            run = headline_atm(u, lrs) if method == "task_arithmetic" else u.get(f"atm_{HEADLINE}x1_{method}")
            if run:
                accs[s] = mean_accuracy(run["test"])
                seconds += run["wall_seconds"]
        lines.append(f"| {LABELS[method]} | {_ms(list(accs.values()))} | {sorted(accs)} |")
    return [*lines, "", f"Compute: {seconds / 60:.1f} min.", ""]


def ph_section(done: dict[int, dict[str, Any]], out: Path, tag: str, name: str) -> list[str]:
    runs = {m: [u[f"ph_B{HEADLINE}"][m] for u in done.values() if f"ph_B{HEADLINE}" in u] for m in PH_STARTS}
    if not any(runs.values()):
        return []
    lines = ["### PH-ATM from one-shot merges (start's scale tuned on the tuning part, round chosen on the "
             "held-out selection part)", "",
             "| start | start test acc | start scale | round chosen (per seed) | test acc at the chosen round | "
             "gain |", "|---|---|---|---|---|---|"]
    fig, ax = _axes()
    for m, rs in runs.items():
        if not rs:
            continue
        start = [mean_accuracy(r["test_by_round"][0]) for r in rs]
        sel = [mean_accuracy(r["test"]) for r in rs]
        gain = 100 * (_mean(sel) - _mean(start))
        scales = ", ".join(f"{r['start_scale']:g}" for r in rs)
        lines.append(f"| {LABELS[m]} | {_ms(start)} | {scales} | {', '.join(str(r['best_round']) for r in rs)} | "
                     f"{_ms(sel)} | {gain:+.1f} points (target >= 5: {'met' if gain >= 5 else 'not met'}) |")
        _plot_rounds(ax, [r["test_by_round"] for r in rs], f"PH-ATM from {LABELS[m]}")
    png = out / f"{tag}_ph_atm.png"
    _save(fig, ax, png, f"{name}: PH-ATM test accuracy by round", "round (0 = the one-shot merge)")
    seconds = _seconds([u.get(f"ph_B{HEADLINE}") for u in done.values()])
    return [*lines, "", f"Compute: {seconds / 60:.1f} min (the individual fine-tuning of the starts included).", "",
            f"![PH-ATM]({png.name})", ""]


def rounds_to_reach(test_by_round: list[dict[str, float]], target: float) -> int | None:
    """The first round (>= 1) whose mean test accuracy is at least `target` (None: never within the run)."""
    return next((k for k, a in enumerate(test_by_round) if k > 0 and mean_accuracy(a) >= target), None)


def auto_section(done: dict[int, dict[str, Any]], top: int, lrs: list[float], out: Path, tag: str,
                 name: str) -> list[str]:
    lines = ["### merge_scale=\"auto\" against the fixed mean: rounds to come within 1 point of joint "
             f"training's B = {HEADLINE} test accuracy", "",
             f"| seed | joint B = {HEADLINE} | rounds: fixed 1/n | rounds: auto | fixed 1/n at B = {HEADLINE} / "
             f"{top} | auto at B = {HEADLINE} / {top} | auto's scale per round |", "|---|---|---|---|---|---|---|"]
    met, seconds, curves = [], 0.0, {"fixed 1/n": [], "auto": []}
    for seed, u in done.items():
        chosen = choose_rates(u, lrs)
        joint = u[f"joint_B{HEADLINE}_lr{lr_tag(chosen['joint'])}"]
        fixed = u.get(f"atm_{top}x1_mean") or (u.get(f"atm_{top}x1_chosen") if chosen["atm"][1] == "1/n" else None)
        auto = u.get(f"atm_{top}x1_auto")
        if not (fixed and auto):
            continue
        seconds += auto["wall_seconds"] + (fixed["wall_seconds"] if fixed is u.get(f"atm_{top}x1_mean") else 0.0)
        target = mean_accuracy(joint["test"]) - 0.01
        rf, ra = rounds_to_reach(fixed["test_by_round"], target), rounds_to_reach(auto["test_by_round"], target)
        # decided only when auto gets there (in half the fixed mean's rounds or not) or the fixed mean does
        met.append(None if rf is None and ra is None else ra is not None and (rf is None or ra <= rf / 2))
        scales = ", ".join(f"{s:.3g}" for s in auto["merge_scale_by_round"] if s is not None)
        never = f"> {top}"
        at = [", ".join(f"{100 * mean_accuracy(r['test_by_round'][k]):.1f}" for k in (HEADLINE, top))
              for r in (fixed, auto)]
        curves["fixed 1/n"].append(fixed["test_by_round"])
        curves["auto"].append(auto["test_by_round"])
        lines.append(f"| {seed} | {100 * mean_accuracy(joint['test']):.1f} | {never if rf is None else rf} | "
                     f"{never if ra is None else ra} | {at[0]} | {at[1]} | {scales} |")
    if not met:
        return []
    fig, ax = _axes()
    for label, runs in curves.items():
        _plot_rounds(ax, runs, f"ATM, {label}")
    png = out / f"{tag}_auto.png"
    _save(fig, ax, png, f"{name}: ATM with the fixed mean and with merge_scale=auto", "round")
    decided = [m for m in met if m is not None]
    return [*lines, "", f"Target (auto in at most half the rounds of the fixed mean): met for {sum(decided)} of "
            f"{len(met)} seeds; undecided (neither run within 1 point of joint in {top} rounds) for "
            f"{len(met) - len(decided)}. Compute: {seconds / 60:.1f} min (auto's runs, and the fixed mean's where "
            "it is not the long run above).", "", f"![auto]({png.name})", ""]


def claims(rows: Rows, by_b: dict[int, Rows], budgets: list[int]) -> list[str]:
    lines = ["### Targets", ""]
    atm, joint = rows.mean("atm"), rows.mean("joint")
    merges = {m: rows.mean(m) for m in METHODS if m in rows.rows}
    if merges and not math.isnan(atm):
        best = max(merges, key=merges.get)
        gap = 100 * (atm - merges[best])
        lines.append(f"* ATM at B = {HEADLINE} at least 10 points above the best tuned one-shot merge "
                     f"({LABELS[best]}): {gap:+.1f} points: {'met' if gap >= 10 else 'not met'}.")
    top = max(budgets)
    a_top = by_b[top].mean("atm")
    joints = {b: by_b[b].mean("joint") for b in budgets if not math.isnan(by_b[b].mean("joint"))}
    if top > HEADLINE and joints and not math.isnan(a_top):
        # joint's converged accuracy: its best budget (it stops gaining, then overfits); ATM's at the largest one
        b_j = max(joints, key=joints.get)
        gap = 100 * (a_top - joints[b_j])
        prev = max((b for b in budgets if b < top), default=None)
        rising = "" if prev is None else f"; ATM from B = {prev} to {top}: {100 * (a_top - by_b[prev].mean('atm')):+.1f}"
        lines.append(f"* ATM at convergence within 1 point of joint training: ATM at B = {top} against joint's best "
                     f"budget (B = {b_j}, {100 * joints[b_j]:.1f}): {gap:+.1f} points: "
                     f"{'met' if gap >= -1 else 'not met'}{rising}.")
    if not (math.isnan(atm) or math.isnan(joint)):
        lines.append(f"* ATM - joint at B = {HEADLINE}: {100 * (atm - joint):+.1f} points.")
    return [*lines, ""]


def summary_row(name: str, root: Path) -> str | None:
    """One line of the summary table: the headline means of the seeds with the whole headline grid."""
    settings = json.loads((root / "suite.json").read_text())["settings"]
    done = {s: u for s, u in load_results(root).items() if choose_rates(u, settings["lrs"]) is not None}
    if not done:
        return None
    rows = budget_rows(done, settings, HEADLINE)
    merges = {m: rows.mean(m) for m in METHODS if m in rows.rows}
    best = max(merges, key=merges.get)
    cells = [_ms(rows.rows[k]["abs"]) for k in ("zero_shot", "individual", "joint", "atm")]
    return (f"| {name} ({settings['head_init']} heads) | " + " | ".join(cells)
            + f" | {_ms(rows.rows[best]['abs'])} ({LABELS[best]}) | {len(done)} ({', '.join(map(str, sorted(done)))}) |")


SUMMARY_HEADER = [f"| suite | zero-shot row | individual | joint | ATM ({HEADLINE} x 1 ep) | best tuned one-shot merge "
                  "| seeds |", "|---|---|---|---|---|---|---|"]


def write_report(a: argparse.Namespace) -> Path:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Reproducing ATM's claims on the embedded suites", "",
             "Written by `benchmarks/reproduce.py` from the saved results under "
             f"`{a.work}`; every number below is from those runs. Rewrite it from them with "
             "`python benchmarks/reproduce.py --report-only --notes reports/notes.md`.", ""]
    roots = [r for r in sorted(Path(a.work).glob("*_*"))
             if r.name.split("_")[0] in a.suites and (r / "suite.json").exists()]
    summary = [row for r in roots if (row := summary_row(r.name.split("_")[0], r))]
    if summary:
        lines += [f"Mean test accuracy (%) at B = {HEADLINE}, mean ± sd over seeds, every method at its rate (and "
                  "scale) chosen on validation:", "", *SUMMARY_HEADER, *summary, ""]
        print("\n".join([*SUMMARY_HEADER, *summary]))
    if a.notes:
        lines += [Path(a.notes).read_text().strip(), ""]
    for root in roots:
        name = root.name.split("_")[0]
        meta = json.loads((root / "meta.json").read_text())
        lines += [f"Run of `{root.name}`:", "", f"* Machine: {meta['machine']}",
                  "* Commands (each a process; units already saved are skipped): "
                  + "; ".join(f"`{c}`" for c in meta["commands"]),
                  f"* Seeds: {meta['seeds']}; data splits fixed (split seed 0); started {meta['started']}; "
                  f"software: {meta['software']}", ""]
        lines += suite_report(name, root, out)
    path = out / "REPRODUCTION.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def config_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--config``: VALUE as JSON when it parses (numbers, true/false, lists), else a string."""
    from hf_atm.atm import ATMConfig

    key, sep, value = text.partition("=")
    if not sep or key not in ATMConfig.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"--config {text!r}: expected KEY=VALUE with KEY an ATMConfig field")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    from hf_atm.atm.model import HEAD_INITS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="+", default=["vision", "text"], choices=sorted(SUITE_SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budgets", nargs="+", type=int, default=None,
                   help=f"override the suite's budgets ({HEADLINE} is always run: rates are chosen there)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="reports/work")
    p.add_argument("--out", default="reports")
    p.add_argument("--notes", default=None, help="A Markdown file (the reading of the numbers) put after the header.")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--config", nargs="+", type=config_option, default=None, metavar="KEY=VALUE",
                   help="ATMConfig options given to every method (e.g. lr_scheduler_type=constant warmup_steps=10); "
                        "values are read as JSON when they parse, else as strings; recorded in suite.json")
    p.add_argument("--head_init", "--head-init", dest="head_init", default=None, choices=list(HEAD_INITS),
                   help="override the suite's head protocol (default: vision prototypes, text zero_shot)")
    a = p.parse_args()
    if a.budgets and any(b < 1 for b in a.budgets):
        p.error("--budgets: every budget must be >= 1 epoch")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not a.report_only:
        for name in a.suites:
            run_suite(name, a)
    print(f"report: {write_report(a)}")


if __name__ == "__main__":
    main()
