"""Every bad input to ``hf-atm merge`` is refused: exit status 2, a message naming the culprit, and no output
folder (nor temporary folder) left behind; with --overwrite the old output survives a failed merge."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hf_atm.cli import main
from tests.helpers import load_checkpoint, make_bert_checkpoints, save_raw_checkpoint


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    return make_bert_checkpoints(root, 2, hidden=16, layers=1, max_shard_size="20KB")


def _raw(folder: Path, **overrides) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(3, generator=g),
               "c.ids": torch.arange(4)}
    tensors.update(overrides)
    return save_raw_checkpoint(folder, {k: v for k, v in tensors.items() if v is not None})


def _refused(capsys, tmp_path: Path, argv: list[str], *expected: str) -> str:
    """Run the CLI, expect exit 2 with every `expected` fragment in stderr and no (temporary) output."""
    out = tmp_path / "out"
    code = main(["merge", *argv, "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    return err


def test_tensor_missing_from_a_model(tmp_path, capsys):
    base = _raw(tmp_path / "base")
    model = _raw(tmp_path / "m", **{"b.bias": None})
    err = _refused(capsys, tmp_path, ["--base", str(base), "--models", str(model), "--method", "ties"],
                   "'b.bias'", str(base / "model.safetensors"), str(model / "model.safetensors"))
    assert "missing" in err


def test_extra_tensor_in_a_model(tmp_path, capsys):
    base = _raw(tmp_path / "base")
    model = _raw(tmp_path / "m", **{"extra.weight": torch.ones(2)})
    _refused(capsys, tmp_path, ["--base", str(base), "--models", str(model), "--method", "task_arithmetic"],
             "'extra.weight'", str(base / "model.safetensors"), str(model / "model.safetensors"))


def test_shape_mismatch(tmp_path, capsys):
    base = _raw(tmp_path / "base")
    ok = _raw(tmp_path / "ok")
    model = _raw(tmp_path / "m", **{"a.weight": torch.ones(3, 4)})
    _refused(capsys, tmp_path, ["--base", str(base), "--models", str(ok), str(model), "--method", "ties"],
             "'a.weight'", "(4, 3)", "(3, 4)", str(base / "model.safetensors"), str(model / "model.safetensors"))


def test_float_vs_int_mismatch(tmp_path, capsys):
    base = _raw(tmp_path / "base")
    model = _raw(tmp_path / "m", **{"c.ids": torch.arange(4).float()})
    _refused(capsys, tmp_path, ["--base", str(base), "--models", str(model), "--method", "ties"],
             "'c.ids'", "int64", "float32")


def test_missing_weights(tmp_path, capsys):
    base = _raw(tmp_path / "base")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _refused(capsys, tmp_path, ["--base", str(base), "--models", str(model), "--method", "ties"],
             str(model), "model.safetensors")


def test_missing_model_folder(tmp_path, capsys):
    base = _raw(tmp_path / "base")
    _refused(capsys, tmp_path, ["--base", str(base), "--models", str(tmp_path / "nowhere"), "--method", "ties"],
             "nowhere")


def test_missing_shard(tmp_path, capsys, bert):
    base, (m0, _) = bert
    broken = tmp_path / "broken"
    shutil.copytree(m0, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _refused(capsys, tmp_path, ["--base", str(base), "--models", str(broken), "--method", "ties"], str(shard))


def test_corrupt_safetensors(tmp_path, capsys):
    base = _raw(tmp_path / "base")
    model = _raw(tmp_path / "m")
    (model / "model.safetensors").write_bytes(b"\x00" * 3)
    _refused(capsys, tmp_path, ["--base", str(base), "--models", str(model), "--method", "ties"],
             str(model / "model.safetensors"))


def test_pickle_refused_then_allowed(tmp_path, capsys, bert):
    base, (m0, m1) = bert
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(m1 / "config.json", pickled)
    torch.save(load_checkpoint(m1), pickled / "pytorch_model.bin")
    err = _refused(capsys, tmp_path, ["--base", str(base), "--models", str(m0), str(pickled), "--method", "ties"],
                   "--allow-pickle", str(pickled / "pytorch_model.bin"))
    assert "arbitrary code" in err
    code = main(["merge", "--base", str(base), "--models", str(m0), str(pickled), "--method", "ties",
                 "--output", str(tmp_path / "p"), "--allow-pickle", "--no-progress"])
    assert code == 0
    code = main(["merge", "--base", str(base), "--models", str(m0), str(m1), "--method", "ties",
                 "--output", str(tmp_path / "s"), "--no-progress"])
    assert code == 0
    a, b = load_checkpoint(tmp_path / "p"), load_checkpoint(tmp_path / "s")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# the sliced path (checks the result, then the inputs), the whole-tensor one (checks inputs), and average
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "average"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["model", "base"])
def test_nan_or_inf(tmp_path, capsys, method, bad, where):
    w = torch.randn(4, 3)
    w[2, 1] = bad
    base = _raw(tmp_path / "base", **({"a.weight": w} if where == "base" else {}))
    model = _raw(tmp_path / "m", **({"a.weight": w} if where == "model" else {}))
    culprit = base if where == "base" else model
    _refused(capsys, tmp_path, ["--base", str(base), "--models", str(model), "--method", method],
             "'a.weight'", str(culprit / "model.safetensors"), "NaN" if bad != bad else "Inf")


@pytest.mark.parametrize("density", ["0", "1.5", "-0.1"])
def test_density_outside_range(tmp_path, capsys, density):
    base = _raw(tmp_path / "base")
    _refused(capsys, tmp_path, ["--base", str(base), "--models", str(base), "--method", "ties",
                                "--density", density], "density")


def test_unknown_method(tmp_path, capsys):
    base = _raw(tmp_path / "base")
    _refused(capsys, tmp_path, ["--base", str(base), "--models", str(base), "--method", "frankenmerge"],
             "method", "frankenmerge")


def test_weights_count(tmp_path, capsys):
    base = _raw(tmp_path / "base")
    _refused(capsys, tmp_path, ["--base", str(base), "--models", str(base), str(base), "--method", "ties",
                                "--weights", "1.0"], "weights", "2 models")


def test_bad_max_shard_size(tmp_path, capsys):
    base = _raw(tmp_path / "base")
    _refused(capsys, tmp_path, ["--base", str(base), "--models", str(base), "--method", "ties",
                                "--max-shard-size", "2XB"], "max_shard_size", "2XB")


def test_base_without_config(tmp_path, capsys):
    base = _raw(tmp_path / "base")
    (base / "config.json").unlink()
    _refused(capsys, tmp_path, ["--base", str(base), "--models", str(base), "--method", "ties"],
             str(base / "config.json"))


@pytest.mark.parametrize("argv", [["--dtype", "float8"], ["--output"], []])
def test_usage_errors_exit_2(tmp_path, capsys, argv):
    base = _raw(tmp_path / "base")
    code = main(["merge", "--base", str(base), "--models", str(base), "--method", "ties", *argv])
    assert code == 2
    assert "usage:" in capsys.readouterr().err


def test_non_empty_output_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    # the base does not even exist: the output check comes first
    code = main(["merge", "--base", str(tmp_path / "nowhere"), "--models", str(tmp_path / "nowhere"),
                 "--method", "ties", "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(out) in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_only_when_complete(tmp_path, capsys):
    base = _raw(tmp_path / "base")
    good = _raw(tmp_path / "good", **{"b.bias": torch.zeros(3)})
    w = torch.randn(4, 3)
    w[0, 0] = float("nan")
    bad = _raw(tmp_path / "bad", **{"a.weight": w})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["merge", "--base", str(base), "--method", "task_arithmetic", "--output", str(out), "--overwrite",
            "--no-progress"]
    assert main([*argv, "--models", str(bad)]) == 2
    assert "NaN" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the failed merge left the old folder alone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert main([*argv, "--models", str(good)]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_empty_output_folder_is_fine(tmp_path):
    base = _raw(tmp_path / "base")
    out = tmp_path / "out"
    out.mkdir()
    assert main(["merge", "--base", str(base), "--models", str(base), "--method", "ties", "--output", str(out),
                 "--no-progress"]) == 0
    assert (out / "model.safetensors").is_file()


def test_output_may_not_be_or_contain_an_input(tmp_path, capsys):
    base = _raw(tmp_path / "inputs" / "base")
    for out in (tmp_path / "inputs", base):
        code = main(["merge", "--base", str(base), "--models", str(base), "--method", "ties", "--output",
                     str(out), "--overwrite", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "output" in err and str(base) in err
    assert (base / "model.safetensors").is_file()
