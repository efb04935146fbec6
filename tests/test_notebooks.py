"""The notebooks run top to bottom without error (their cells assert their own numbers)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="install the dev extra to run notebooks")
nbclient = pytest.importorskip("nbclient", reason="install the dev extra to run notebooks")

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "expected notebooks/*.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute(cwd=str(path.parent))
    images = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert len(images) >= 3, "each section's plot should render"
