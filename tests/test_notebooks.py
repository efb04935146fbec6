"""The notebooks run top to bottom without error (their cells assert their own numbers)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="install the dev extra to run notebooks")
nbclient = pytest.importorskip("nbclient", reason="install the dev extra to run notebooks")

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "expected notebooks/*.ipynb"


# The seed's numbers (`jaxgrad.seed.seed_results()`, 10-15 s of CPU) are computed once per
# session (tests/conftest.py) and checked against closed forms in tests/test_seed.py; a cell
# put before the notebook's first call hands the kernel that same dict, so the notebook's
# own table and assertions run on the numbers test_seed checks, without computing them again.
SHARE_SEED = """import jaxgrad.seed
_shared_seed_results = {results!r}


def _seed_results(*, seed=0):
    assert seed == 0, seed
    print("(the session's shared seed results)")
    return dict(_shared_seed_results)


jaxgrad.seed.seed_results = _seed_results
"""


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, seed_results):
    from jaxgrad.seed import format_results

    nb = nbformat.read(path, as_version=4)
    calls = [i for i, c in enumerate(nb.cells) if "seed_results(" in c.source]
    if calls:
        share = nbformat.v4.new_code_cell(SHARE_SEED.format(results=seed_results))
        nb.cells.insert(calls[0], share)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute(cwd=str(path.parent))
    if calls:  # the notebook took the shared numbers and printed their table
        printed = "".join(o.get("text", "") for o in nb.cells[calls[0] + 1].get("outputs", []))
        assert "(the session's shared seed results)" in printed, printed
        assert format_results(seed_results) in printed, printed
    images = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert len(images) >= 3, "each section's plot should render"
