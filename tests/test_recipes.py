"""The recipes run top to bottom as users run them (subprocess, command-line options), in a tiny configuration:
a few examples per task, one round; the vision recipe on a tiny random ViT (the cached pretext ViT takes
minutes to pre-train), the text recipe on the bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(ROOT / "recipes" / script), *options], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _check_outputs(proc: subprocess.CompletedProcess, out: Path, tasks: set[str]) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Test accuracy (%)" in proc.stdout
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"].split(" ")[0] for r in rows] == ["individual", "task", "ATM"]
    for r in rows:
        assert set(r["accuracy"]) == tasks
        assert r["metric"] == {t: "accuracy" for t in tasks}  # results.json names each task's metric
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
    assert rows[0]["normalized"] == pytest.approx(1.0)
    history = json.loads((out / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1]
    assert (out / "accuracy.png").stat().st_size > 0
    assert (out / "config.json").exists() and (out / "README.md").exists()


VISION_TASKS = {"digits", "fashion10", "fashion_coarse", "fashion_tops"}


def _tiny_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    return folder


def _vision_options(tmp_path: Path) -> list[str]:
    return ["--backbone", str(_tiny_vit(tmp_path / "tiny-vit")), "--max_train_per_task", "40",
            "--max_test_per_task", "20", "--rounds", "1", "--output_dir", str(tmp_path / "out")]


def test_vision_recipe_runs_with_a_given_backbone(tmp_path):
    proc = _run("atm_vit.py", *_vision_options(tmp_path))
    _check_outputs(proc, tmp_path / "out", VISION_TASKS)


def test_vision_recipe_runs_on_two_processes(tmp_path):
    """The README's `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` form (gloo): the tasks
    are split over the ranks and every rank takes part in saving (save_model is collective)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "atm_vit.py"),
                           *_vision_options(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    _check_outputs(proc, tmp_path / "out", VISION_TASKS)


def test_text_recipe_runs_on_the_bundled_minilm(tmp_path):
    out = tmp_path / "out"
    proc = _run("atm_text.py", "--max_train_per_task", "24", "--max_test_per_task", "12", "--max_length", "16",
                "--rounds", "1", "--output_dir", str(out))
    _check_outputs(proc, out, {"noun_category", "verb_category", "fortune_topic", "fortune_language"})


def test_recipe_refuses_an_unknown_option(tmp_path, monkeypatch):
    """The recipe's main() with an unknown option raises naming it (uncaught: a non-zero exit with the message on
    stderr when run as a script) before anything is written. In this process: a fresh interpreter would spend
    seconds importing torch to parse one option, and the other recipe tests run the scripts as subprocesses."""
    _recipes_common(monkeypatch)
    vit = _load_recipe("atm_vit.py")
    monkeypatch.setattr(sys, "argv", ["atm_vit.py", "--no_such_option", "1", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="no_such_option"):
        vit.main()
    assert not (tmp_path / "out").exists()


def _load_recipe(script: str):
    """recipes/`script` imported as a module (its ``__main__`` block not run); ``common`` must be in
    ``sys.modules`` first (:func:`_recipes_common`)."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / "recipes" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recipes_common(monkeypatch):
    """recipes/common.py, imported as the recipes import it (``common``, from their own folder)."""
    spec = importlib.util.spec_from_file_location("common", ROOT / "recipes" / "common.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "common", module)
    spec.loader.exec_module(module)
    return module


def test_recipe_defaults_give_way_to_the_command_line(monkeypatch, tmp_path):
    """Shared defaults < a recipe's own defaults < the command line, for ATMConfig and script options alike."""
    common = _recipes_common(monkeypatch)

    @dataclass
    class Options:
        baselines: bool = True

    monkeypatch.setattr(sys, "argv", ["recipe.py", "--rounds", "7", "--weight_decay", "0.5", "--baselines", "False",
                                      "--output_dir", str(tmp_path / "out")])
    script, args = common.parse_args(Options, output_dir="outputs/x", rounds=4, learning_rate=1e-3,
                                     save_total_limit=5)
    assert script.baselines is False
    assert (args.rounds, args.weight_decay, args.output_dir) == (7, 0.5, str(tmp_path / "out"))  # command line
    assert (args.learning_rate, args.save_total_limit) == (1e-3, 5)  # the recipe's defaults over the shared ones
    assert (args.logging_steps, args.report_to, args.dataloader_num_workers) == (20, [], 0)  # shared defaults


def test_data_caps_zero_means_all_and_freeze_heads_parses_bare(monkeypatch, tmp_path):
    from transformers import HfArgumentParser

    from hf_atm import ATMConfig

    common = _recipes_common(monkeypatch)
    assert common.data_cap(0) is None and common.data_cap(None) is None and common.data_cap(7) == 7
    with pytest.raises(ValueError, match="0 for all the data"):
        common.data_cap(-1)
    # the recipes' own option types take 0 from the command line
    vit = _load_recipe("atm_vit.py")
    (script,) = HfArgumentParser(vit.ScriptArguments).parse_args_into_dataclasses(
        args=["--max_train_per_task", "0", "--max_test_per_task", "0"])
    assert (script.max_train_per_task, script.max_test_per_task) == (0, 0)
    # --freeze_heads alone means true; an explicit value still works; unset stays None (the protocol decides)
    parser = HfArgumentParser(ATMConfig)
    for flags, expected in (([], None), (["--freeze_heads"], True), (["--freeze_heads", "false"], False),
                            (["--freeze_heads", "true"], True), (["--freeze_heads", "--rounds", "2"], True)):
        (args,) = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), *flags])
        assert args.freeze_heads is expected, flags
