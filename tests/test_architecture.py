"""The package's shape, checked statically by scripts/architecture.py: no module over 800 lines, no import
cycle between modules or between sub-packages, at most three reaches into other objects' private state,
and the public face ``from hf_atm import ATMTrainer, ...``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("architecture", ROOT / "scripts" / "architecture.py")
arch = importlib.util.module_from_spec(_spec)
sys.modules["architecture"] = arch  # dataclasses look their module up
_spec.loader.exec_module(arch)


def test_no_module_over_800_lines():
    assert arch.oversized(800) == []


def test_no_import_cycle_between_modules():
    assert arch.cycles(arch.import_graph()) == []


def test_no_import_cycle_between_subpackages():
    assert arch.cycles(arch.subpackage_graph(arch.import_graph())) == []


def test_merging_imports_nothing_above_it():
    graph = arch.import_graph()
    above = ("hf_atm.lora", "hf_atm.atm", "hf_atm.federated", "hf_atm.cli", "hf_atm.data", "hf_atm.backbones")
    bad = {m: sorted(d for d in deps if d.startswith(above))
           for m, deps in graph.items() if m.startswith("hf_atm.merging")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_at_most_three_private_reaches():
    reaches = arch.private_reaches()
    assert len(reaches) <= 3, "\n".join(f"{r.module}:{r.line}: {r.text}" for r in reaches)
    assert not [r for r in reaches if r.module.startswith(("hf_atm.federated", "hf_atm.atm.baselines"))]


def test_checker_finds_what_it_looks_for(tmp_path):
    """The checks can fail: a planted cycle, a private reach and a long module are all reported."""
    pkg = tmp_path / "hf_atm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from hf_atm.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f(x):\n    from hf_atm import a\n    return x._hidden\n" + "\n" * 900)
    graph = arch.import_graph(tmp_path)
    assert arch.cycles(graph) == [["hf_atm.a", "hf_atm.sub.b"]]
    assert arch.cycles(arch.subpackage_graph(graph)) == [["hf_atm.a", "hf_atm.sub"]]
    assert [(r.module, r.text) for r in arch.private_reaches(tmp_path)] == [("hf_atm.sub.b", "return x._hidden")]
    assert [m for m, _ in arch.oversized(800, tmp_path)] == ["hf_atm.sub.b"]


def test_public_face_imports_lazily():
    """``import hf_atm`` does not import the trainer stack; ``from hf_atm import ATMTrainer`` does."""
    code = (
        "import sys, hf_atm; assert 'hf_atm.atm.trainer' not in sys.modules, 'eager import';"
        "from hf_atm import ATMConfig, ATMTrainer, MultiTaskModel, MergeConfig, MergeSpec, run_merge;"
        "from hf_atm.atm.trainer import ATMTrainer as T; assert ATMTrainer is T;"
        "print(hf_atm.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == __import__("hf_atm").__version__
