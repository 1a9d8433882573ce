"""Every notebook under notebooks/ executes headless without a cell error (add yours to NOTEBOOKS)."""

import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = [
    "notebooks/bandit.ipynb",
]


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_notebook_executes(path):
    notebook = nbformat.read(ROOT / path, as_version=4)
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
