"""The ``hf-atm merge`` command: results equal to peft's merge_utils, YAML configs and overrides, the console
script and ``python -m hf_atm`` as real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft.utils import merge_utils

from hf_atm.cli import main
from tests.helpers import load_checkpoint, make_bert_checkpoints

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return make_bert_checkpoints(root, 3, hidden=32, layers=2, max_shard_size="60KB")


def _peft_merge(base_sd, model_sds, fn, scale=1.0, **kwargs):
    out = {}
    for name, b in base_sd.items():
        taus = [sd[name].float() - b.float() for sd in model_sds]
        out[name] = (b.float() + scale * fn(taus, **kwargs)).to(b.dtype)
    return out


def _assert_close(got, ref):
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-6, msg=k)


def test_task_arithmetic_equals_peft(ckpts, tmp_path, capsys):
    base, models = ckpts
    out = tmp_path / "ta"
    code = main(["merge", "--base", str(base), "--models", *map(str, models), "--method", "task_arithmetic",
                 "--weights", "0.5", "1.0", "0.25", "--scale", "0.7", "--output", str(out), "--no-progress"])
    assert code == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and str(out) in summary[0] and "tensors" in summary[0] and "shard" in summary[0]
    ref = _peft_merge(load_checkpoint(base), [load_checkpoint(m) for m in models], merge_utils.task_arithmetic,
                      scale=0.7, weights=torch.tensor([0.5, 1.0, 0.25]))
    _assert_close(load_checkpoint(out), ref)


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_equals_peft(ckpts, tmp_path, sign):
    base, models = ckpts
    out = tmp_path / "ties"
    code = main(["merge", "--base", str(base), "--models", *map(str, models), "--method", "ties",
                 "--density", "0.2", "--majority-sign", sign, "--output", str(out), "--no-progress"])
    assert code == 0
    ref = _peft_merge(load_checkpoint(base), [load_checkpoint(m) for m in models], merge_utils.ties,
                      weights=torch.ones(3), density=0.2, majority_sign_method=sign)
    got = load_checkpoint(out)
    _assert_close(got, ref)
    assert not torch.equal(got["encoder.layer.0.attention.self.query.weight"],
                           load_checkpoint(base)["encoder.layer.0.attention.self.query.weight"])


def test_config_yaml_and_flag_overrides(ckpts, tmp_path):
    base, models = ckpts
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"base": str(base), "models": [str(m) for m in models], "method": "ties",
                                   "density": 0.3, "output": str(tmp_path / "from_yaml"), "progress": False}))
    assert main(["merge", "--config", str(cfg)]) == 0
    rec = yaml.safe_load((tmp_path / "from_yaml" / "merge_config.yaml").read_text())
    assert rec["method"] == "ties" and rec["density"] == 0.3
    # flags override the YAML
    assert main(["merge", "--config", str(cfg), "--density", "0.5", "--output", str(tmp_path / "o2")]) == 0
    assert yaml.safe_load((tmp_path / "o2" / "merge_config.yaml").read_text())["density"] == 0.5
    # a different method drops the YAML options it does not take (density here)
    assert main(["merge", "--config", str(cfg), "--method", "task_arithmetic", "--output", str(tmp_path / "o3")]) == 0
    rec3 = yaml.safe_load((tmp_path / "o3" / "merge_config.yaml").read_text())
    assert rec3["method"] == "task_arithmetic" and "density" not in rec3
    # OUT_DIR/merge_config.yaml is itself a config: the same bytes come out
    assert main(["merge", "--config", str(tmp_path / "o2" / "merge_config.yaml"), "--output",
                 str(tmp_path / "o4"), "--no-progress"]) == 0
    for f in (tmp_path / "o2").glob("model*"):
        assert f.read_bytes() == (tmp_path / "o4" / f.name).read_bytes()


def test_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: b\nmodels: [m]\noutput: o\nmethod: ties\ndensty: 0.2\n")
    assert main(["merge", "--config", str(bad)]) == 2
    assert "densty" in capsys.readouterr().err
    bad.write_text("[1, 2")
    assert main(["merge", "--config", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert main(["merge", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_help_and_version(capsys):
    assert main(["--version"]) == 0
    assert main(["merge", "--help"]) == 0
    assert "--max-shard-size" in capsys.readouterr().out
    assert main([]) == 2


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return env


def test_console_script_subprocess(ckpts, tmp_path):
    base, models = ckpts
    script = Path(sys.executable).with_name("hf-atm")
    if not script.exists():
        pytest.skip("hf-atm console script not installed beside the interpreter")
    out = tmp_path / "sub"
    proc = subprocess.run(
        [str(script), "merge", "--base", str(base), "--models", *map(str, models[:2]), "--method", "ties",
         "--output", str(out), "--max-shard-size", "40KB", "--no-progress"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and (out / "model.safetensors.index.json").is_file()


def test_python_m_subprocess_exit_code(ckpts, tmp_path):
    base, models = ckpts
    out = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "hf_atm", "merge", "--base", str(base), "--models", str(models[0]),
         "--method", "ties", "--density", "2", "--output", str(out)],
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "density" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
