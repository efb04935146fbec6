"""``python -m jaxgrad.bench.utility`` at a tiny size: both sides train, account and report."""

import json

import numpy as np

from jaxgrad.bench import utility


def test_utility_script_runs_tiny_and_writes_its_table(tmp_path):
    """One ε, one seed, one epoch on the bundled digits: jaxgrad and Opacus run the same σ
    (calibrated by jaxgrad, RDP), each side's own accountant gives an ε close to the target,
    and the JSON, markdown table and plot are written."""
    out = str(tmp_path / "u")
    results = utility.main(
        ["--datasets", "digits", "--epsilons", "8", "--seeds", "1", "--epochs", "1", "--out", out]
    )
    rows = results["datasets"]["digits"]
    assert [(r["framework"], r["target_epsilon"]) for r in rows] == [
        ("jaxgrad", None),
        ("jaxgrad", 8.0),
        ("opacus", 8.0),
    ]
    jax_run, torch_run = rows[1]["runs"][0], rows[2]["runs"][0]
    assert rows[1]["sigma"] == rows[2]["sigma"] > 0
    assert 7.8 < jax_run["epsilon"] <= 8.0 + 1e-9  # calibrated (conservatively) to the target
    assert 0.9 * 8 < torch_run["epsilon"] < 8.0 * 1.02  # Opacus's RDP orders and conversion
    for r in rows:
        assert 0.3 < r["runs"][0]["test_accuracy"] <= 1  # far above chance (10 classes)
    table = (tmp_path / "u.md").read_text()
    assert table.count("| digits |") == 3
    assert json.loads((tmp_path / "u.json").read_text())["delta"] == 1e-5
    assert (tmp_path / "u.png").stat().st_size > 1000
    assert np.isfinite(jax_run["seconds_per_epoch"])
