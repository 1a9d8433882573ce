"""Every notebook under notebooks/ executes headless without a cell error (add yours to NOTEBOOKS)."""

import pathlib
import tempfile

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = [
    "notebooks/bandit.ipynb",
    "notebooks/quickstart.ipynb",
]


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_notebook_executes(path, monkeypatch):
    notebook = nbformat.read(ROOT / path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="dpo_jax_notebook_") as workdir:
        # The kernel is a subprocess that inherits this environment: quickstart.ipynb then trains a few steps a
        # stage instead of the full demo, and writes its run and export here (removed afterwards). Its quick
        # settings are conftest.make_short_config's, so the session's compilation cache (also inherited), filled
        # by earlier tests, serves most of its programs: ~20 s instead of ~50 s cold on 2 cores.
        monkeypatch.setenv("DPO_JAX_NOTEBOOK_QUICK", "1")
        monkeypatch.setenv("DPO_JAX_NOTEBOOK_WORKDIR", workdir)
        client = nbclient.NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        )
        client.execute()  # raises CellExecutionError naming the cell on any error


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(ROOT / path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path}: strip outputs before committing"
