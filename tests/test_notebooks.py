"""Execute every notebook in notebooks/ with small settings (GRADCLIP_NB_STEPS=40), so they never rot."""

from __future__ import annotations

import glob
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
NEEDS = {"04_lora.ipynb": ("peft", "wandb")}


def test_notebooks_are_there_and_saved_with_small_outputs():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert names == ["01_quickstart.ipynb", "02_strategies.ipynb", "03_loss_spikes.ipynb", "04_lora.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.outputs for c in code[:1]), f"{path}: saved without outputs"
        assert not any(o.get("output_type") == "error" for c in code for o in c.outputs), path
        assert os.path.getsize(path) < 400_000, f"{path}: outputs too large for GitHub"
        assert "GRADCLIP_NB_STEPS" in code[0].source


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
    for module in NEEDS.get(os.path.basename(path), ()):
        pytest.importorskip(module)
    # kernel "python3": jupyter_client runs a spec whose argv[0] is "python" with sys.executable (the venv's)
    from jupyter_client.kernelspec import KernelSpecManager

    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    assert argv0 in ("python", "python3", sys.executable), (
        f"the python3 kernelspec runs {argv0!r}, not this interpreter {sys.executable!r}")
    monkeypatch.setenv("GRADCLIP_NB_STEPS", "40")
    monkeypatch.setenv("WANDB_MODE", "disabled")  # 04 sets offline itself, in a temporary folder
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("WANDB_DIR", "WANDB_PROJECT", "TENSORBOARD_LOGGING_DIR", "MPLBACKEND"):
        monkeypatch.delenv(key, raising=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=240,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError with the cell and traceback on any error
    seconds = time.perf_counter() - start
    assert seconds < 120, f"{os.path.basename(path)} took {seconds:.0f} s"
