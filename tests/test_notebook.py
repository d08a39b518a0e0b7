"""Execute notebooks/quickstart.ipynb end to end at a tiny budget (parameters injected papermill-style)."""

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
ROUNDS = 1
TASKS = ["noun_category", "fortune_language"]
KERNEL = "hf-atm-test-python"


def _install_kernelspec(root: Path) -> None:
    """A kernelspec named KERNEL under `root`/kernels that runs this very interpreter (the one with hf_atm),
    whatever "python3" resolves to on this machine, with the Hub off and tokenizers single-threaded."""
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "hf_atm test kernel",
        "language": "python",
        "env": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def _inject_parameters(nb, source: str) -> None:
    """Insert a code cell with `source` right after the cell tagged "parameters" (as papermill does)."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


def _text_outputs(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o.get("text", ""))
            elif "data" in o:
                out.append(o["data"].get("text/plain", ""))
    return "\n".join(out)


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The committed notebook is clean: no outputs, no execution counts.
    assert all(
        not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"
    )
    workdir = tmp_path / "work"
    _inject_parameters(nb, f"N = 40\nM = 20\nR = {ROUNDS}\nmax_length = 16\nTASKS = {TASKS!r}\n"
                           f"WORKDIR = {str(workdir)!r}\n")  # fmt: skip

    jupyter_path = tmp_path / "jupyter"
    _install_kernelspec(jupyter_path)
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()  # raises CellExecutionError on the first failing cell

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors

    # 1. The merge: a loadable folder with weights, card and config; the kernel saw the card's metadata.
    merged = workdir / "merged"
    for name in ("config.json", "model.safetensors", "README.md", "merge_config.yaml"):
        assert (merged / name).is_file(), name
    text = _text_outputs(nb)
    assert "method: ties" in text
    assert "BertModel" in text

    # 2. ATM: history with round 0 + ROUNDS rounds over the chosen tasks, test metrics printed.
    atm = workdir / "atm_text"
    history = json.loads((atm / "history.json").read_text())
    assert [h["round"] for h in history] == list(range(ROUNDS + 1))
    assert sorted(history[-1]["accuracy"]) == sorted(TASKS)
    assert all(0.0 <= a <= 1.0 for h in history for a in h["accuracy"].values())
    assert "test_mean_accuracy" in text

    # 3. Plots written and displayed as images; the history table rendered.
    for name in ("accuracy.png", "cosine.png"):
        assert (atm / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2
    last = nb.cells[-1].outputs
    assert last and "mean cosine" in last[0]["data"]["text/plain"]
