"""``python -m jaxgrad.bench.utility`` at a tiny size: both sides train, account and report."""

import json

import numpy as np
import pytest

from jaxgrad.bench import utility
from jaxgrad.privacy import calibrate_noise_multiplier


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


def test_utility_mechanism_rows_and_merge(tmp_path):
    """The jaxgrad-only rows on the digits: per-layer clipping (C/√L: Δ₂ = C) and
    augmentation multiplicity spend the σ calibrated for flat DP-SGD (RDP, called here
    directly) and its ε; BandMF's σ is fit's own calibration for its ⌈steps / b⌉
    participations (larger: each one samples b times the rate). ``--merge`` appends a
    file's rows to the same data set and refuses other settings."""
    out = str(tmp_path / "m")
    mechanisms = ["per_layer", "augment", "bandmf"]
    argv = "--datasets digits --epsilons 8 --seeds 1 --epochs 1 --frameworks jaxgrad "
    argv += "--augmentations 2 --max-shift 1 --bands 2 --mechanisms " + " ".join(mechanisms)
    results = utility.main([*argv.split(), "--out", out])
    rows = {r["mechanism"]: r for r in results["datasets"]["digits"]}
    assert list(rows) == mechanisms  # no non-private row without flat
    s = results["settings"]["digits"]
    sigma = calibrate_noise_multiplier(
        target_epsilon=8.0,
        delta=1e-5,
        sampling_rate=s["batch_size"] / s["train"],
        steps=-(-s["train"] // s["batch_size"]),
        accountant="rdp",
    )
    for name in ("per_layer", "augment"):
        assert rows[name]["sigma"] == sigma
        assert 7.5 < rows[name]["runs"][0]["epsilon"] <= 8.0 + 1e-9
    assert rows["bandmf"]["sigma"] > sigma
    assert 7.5 < rows["bandmf"]["runs"][0]["epsilon"] <= 8.0 + 1e-9
    for r in rows.values():
        assert 0.2 < r["runs"][0]["test_accuracy"] <= 1  # above chance (10 classes)
    table = (tmp_path / "m.md").read_text()
    assert "| per-layer clip C/√L |" in table and "| BandMF b=2 |" in table
    assert "| augment K=2 (shift ±1) |" in table

    other = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "o.json").write_text(json.dumps(other))
    merged = utility._merge([out + ".json", str(tmp_path / "o.json")])
    assert len(merged["datasets"]["digits"]) == 2 * len(mechanisms)
    other["settings"]["digits"]["epochs"] = 3
    (tmp_path / "o.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="settings"):
        utility._merge([out + ".json", str(tmp_path / "o.json")])
