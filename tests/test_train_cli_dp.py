"""python -m jaxgrad.train --dp: private by construction (issue 17).

The noise and sampling key comes from OS entropy (``--insecure-dp-seed`` is explicit and
labelled), inputs are not standardised with statistics of the training rows, the JSON holds
only what the table in docs/privacy.md lists, and DP flags without ``--dp`` are errors.
"""

import json
import re
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxgrad
from jaxgrad.train import __main__ as cli
from jaxgrad.train.__main__ import main
from jaxgrad.train._cli_privacy import dp_key

PRIVACY_DOC = (Path(__file__).parents[1] / "docs" / "privacy.md").read_text()
# The line fit: 410 training examples, two parameters in the JSON; seven steps an epoch.
LINE = ["--data", "line", "--dp", "--noise-multiplier", "1", "--accountant", "rdp"]
LINE += ["--batch-size", "64", "--x64"]


def _run(tmp_path, *args, name="out.json"):
    out = tmp_path / name
    assert main([*args, "--json", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())


def _flatten(value, prefix=""):
    """The JSON's keys as docs/privacy.md writes them: ``a.b`` for nested, ``a[].b`` in lists."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for v in value:
            yield from _flatten(v, f"{prefix}[]")
    else:
        yield prefix


def _readme_keys():
    section = PRIVACY_DOC.split("### What a `--dp` run releases", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    keys = set()
    for row in rows:
        first, _, status = row.strip("|").split("|")
        assert status.strip(), row  # every key has a privacy status
        keys |= set(re.findall(r"`([^`]+)`", first))
    return keys


# --- the key --------------------------------------------------------------------------------


def test_the_dp_key_uses_all_its_bits_from_os_entropy():
    """jax.random.key(seed) keeps 32 bits of a seed (its first word is 0 without x64); the
    entropy key's words all vary, and it is never taken for an --insecure-dp-seed key."""
    args = cli.build_parser().parse_args(["--dp"])
    keys = [dp_key(args, None) for _ in range(3)]
    data = np.array([jax.random.key_data(k) for k, _, _ in keys])
    assert all(source == "os-entropy" and private for _, source, private in keys)
    for word in range(data.shape[1]):
        assert len(set(data[:, word])) == 3, data
    args = cli.build_parser().parse_args(["--dp", "--insecure-dp-seed", "7"])
    key, source, private = dp_key(args, None)
    assert (source, private) == ("insecure-dp-seed", False)
    assert jax.random.key_data(key)[-1] == 7


def test_every_process_takes_process_0s_key(monkeypatch):
    """Several processes draw one Poisson sample: each must use the same key, process 0's,
    not its own entropy (here process 0's key stands in for the broadcast's result)."""
    from jax.experimental import multihost_utils

    process_0 = np.array([11, 22], np.uint32)
    sent = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(
        multihost_utils, "broadcast_one_to_all", lambda x: sent.append(x) or process_0
    )
    key, _, private = dp_key(cli.build_parser().parse_args(["--dp"]), None)
    np.testing.assert_array_equal(jax.random.key_data(key), process_0)
    assert len(sent) == 1 and not np.array_equal(sent[0], process_0) and private


def test_two_runs_differ_unless_the_same_insecure_seed(tmp_path, capsys):
    a = _run(tmp_path, *LINE, "--epochs", "1")
    b = _run(tmp_path, *LINE, "--epochs", "1")
    assert a["params"] != b["params"]  # the same --seed: the noise is not its function
    assert a["private"] is True and a["dp_key"] == "os-entropy" and "insecure_dp_seed" not in a
    capsys.readouterr()
    insecure = [*LINE, "--epochs", "1", "--insecure-dp-seed", "5", "--progress", "none"]
    assert main([*insecure, "--json", str(tmp_path / "c.json")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("WARNING: NOT PRIVATE") and "no finite epsilon" in out
    # the final line agrees with the JSON: no (ε, δ)-DP claim for a public key
    (line,) = [x for x in out.splitlines() if x.startswith("privacy:")]
    assert (
        line.startswith("privacy: NOT PRIVATE: the DP noise and sampling key") and "-DP" not in line
    )
    assert "WARNING: NOT PRIVATE" in err  # also on stderr, which --quiet does not silence
    c = json.loads((tmp_path / "c.json").read_text())
    d = _run(tmp_path, *LINE, "--epochs", "1", "--insecure-dp-seed", "5")
    e = _run(tmp_path, *LINE, "--epochs", "1", "--insecure-dp-seed", "6")
    assert c["params"] == d["params"] and c["history"] == d["history"]
    assert c["params"] != e["params"]
    assert c["private"] is False and c["insecure_dp_seed"] == 5
    assert "--insecure-dp-seed" in c["not_private_reason"]


def test_a_run_without_noise_is_not_private(tmp_path, capsys):
    """σ = 0: ε = inf, so the JSON says "private": false and why, and
    the final line says the same (it said "private": true with ε = inf)."""
    args = [*LINE[:3], "--noise-multiplier", "0", "--epochs", "1", "--progress", "none"]
    assert main([*args, "--json", str(tmp_path / "z.json")]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("privacy:")]
    z = json.loads((tmp_path / "z.json").read_text())
    assert z["privacy"]["epsilon"] == "inf" and z["private"] is False  # (strict JSON)
    assert "no noise" in z["not_private_reason"]
    assert line.startswith(f"privacy: NOT PRIVATE: {z['not_private_reason']}; sigma 0, ")


def _interrupted(tmp_path, *args):
    """A two-epoch run with checkpoints, then its last checkpoint removed (as if it had been
    stopped after epoch 1): ``(its summary, its checkpoint directory)``."""
    ckpt = tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}"
    full = _run(tmp_path, *LINE, "--epochs", "2", "--checkpoint-dir", str(ckpt), *args)
    checkpoints = jaxgrad.train.checkpoint.list_checkpoints(ckpt)
    assert len(checkpoints) == 2
    Path(checkpoints[-1]).unlink()
    return full, ckpt


@pytest.mark.parametrize(
    "mechanism", [(), ("--adaptive-clip-quantile", "0.5"), ("--bands", "2")], ids=str
)
def test_resume_continues_with_the_checkpoints_key(tmp_path, mechanism):
    """Running the same command again resumes with the key in the checkpoint, not with its
    own fresh entropy key: it ends bit for bit where the uninterrupted run ended — also with
    adaptive clipping and BandMF, whose privatizer state is checkpointed with the optimizer's
    (their checkpoints were read with the bare optimizer's template: a fresh key was drawn and
    fit refused the run as another)."""
    full, ckpt = _interrupted(tmp_path, *mechanism)
    resumed = _run(tmp_path, *LINE, "--epochs", "2", "--checkpoint-dir", str(ckpt), *mechanism)
    assert resumed["dp_key"] == "checkpoint" and resumed["private"] is True
    assert resumed["params"] == full["params"] and resumed["history"] == full["history"]
    if mechanism:
        return
    done = _run(tmp_path, *LINE, "--epochs", "2", "--checkpoint-dir", str(ckpt))
    assert done["params"] == full["params"]  # all done: the same result again


def test_resume_keeps_an_insecure_checkpoint_not_private(tmp_path, capsys):
    full, ckpt = _interrupted(tmp_path, "--insecure-dp-seed", "3")
    capsys.readouterr()
    args = [*LINE, "--epochs", "2", "--checkpoint-dir", str(ckpt), "--progress", "none"]
    assert main([*args, "--json", str(tmp_path / "resumed.json")]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("privacy:")]
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["params"] == full["params"]
    assert resumed["private"] is False and resumed["dp_key"] == "checkpoint"
    assert "by the run that wrote the checkpoint" in resumed["not_private_reason"]
    assert line.startswith(f"privacy: NOT PRIVATE: {resumed['not_private_reason']}; sigma 1, ")
    _, secure = _interrupted(tmp_path)
    capsys.readouterr()
    args = [*LINE, "--epochs", "2", "--checkpoint-dir", str(secure), "--insecure-dp-seed", "3"]
    assert main([*args, "--quiet"]) == 2
    assert "the run changed (key:" in capsys.readouterr().err  # another run's key: refused


# --- preprocessing ------------------------------------------------------------------------


def _trained_on(monkeypatch, args):
    """The training data the CLI hands to ``fit`` (fit not run)."""
    seen = {}

    def fake_fit(loss_fn, params, train_data, **kwargs):
        seen["data"] = jax.tree_util.tree_map(np.asarray, train_data)
        raise SystemExit(0)

    monkeypatch.setattr(jaxgrad.train, "fit", fake_fit)
    with pytest.raises(SystemExit):
        main([*args, "--quiet"])
    return seen["data"]


def test_dp_inputs_of_one_row_do_not_depend_on_the_others(tmp_path, monkeypatch):
    """Replace one training row: under --dp every other row is fed to fit unchanged; without
    --dp the training split's standardisation moves them all."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)), np.arange(40) % 2
    paths, raws = [], []
    for value in (0.0, 1e3):
        x = x.copy()
        x[0] = value
        paths.append(tmp_path / f"{value}.npz")
        np.savez(paths[-1], x=x, y=y)
        raws.append(jaxgrad.data.train_test_split(x, y, seed=0)[0])
    assert not np.array_equal(raws[0], raws[1])  # row 0 is a training row of seed 0
    dp = ["--dp", "--noise-multiplier", "1", "--data", "npz", "--batch-size", "8"]
    dp += ["--num-classes", "2"]
    for raw, path in zip(raws, paths, strict=True):
        got, _ = _trained_on(monkeypatch, [*dp, "--data-path", str(path)])
        np.testing.assert_allclose(got, raw, rtol=1e-6)  # as they are
    plain = [
        _trained_on(monkeypatch, ["--data", "npz", "--batch-size", "8", "--data-path", str(p)])[0]
        for p in paths
    ]
    assert np.all(np.any(plain[0] != plain[1], axis=1))  # without --dp every row moves


def test_dp_never_evaluates_the_training_split(monkeypatch):
    evaluated = []
    real = jaxgrad.train.evaluator

    def spy(apply, loss_fn, splits, **kwargs):
        evaluated.append(sorted(splits))
        return real(apply, loss_fn, splits, **kwargs)

    monkeypatch.setattr(jaxgrad.train, "evaluator", spy)
    _trained_on(monkeypatch, ["--data", "digits", "--dp", "--noise-multiplier", "1"])
    _trained_on(monkeypatch, ["--data", "digits"])
    assert evaluated == [["test"], ["test", "train"]]


def test_dp_digits_and_diabetes_are_used_as_they_are(monkeypatch):
    digits = jaxgrad.data.load("digits", seed=0, standardize=False)
    x, _ = _trained_on(monkeypatch, ["--data", "digits", "--dp", "--noise-multiplier", "1"])
    np.testing.assert_array_equal(x, digits.x_train)
    assert x.max() == 16.0  # raw pixels, 0-16
    diabetes = jaxgrad.data.load("diabetes", seed=0, standardize=False)
    x, y = _trained_on(monkeypatch, ["--data", "diabetes", "--dp", "--noise-multiplier", "1"])
    np.testing.assert_array_equal(y, diabetes.y_train)
    assert y.mean() > 100  # raw targets (25-346), not standardised
    # raw measurements too: scikit-learn's default scales by all 442 patients' statistics
    from sklearn.datasets import load_diabetes

    raw_x, _ = load_diabetes(return_X_y=True, scaled=False)
    rows = np.random.default_rng(0).permutation(len(raw_x))[round(0.2 * len(raw_x)) :]
    np.testing.assert_allclose(x, raw_x[rows], rtol=1e-6)


def test_input_stats_standardise_with_the_given_statistics(tmp_path, monkeypatch):
    from sklearn.datasets import load_diabetes

    stats = tmp_path / "stats.npz"
    np.savez(stats, mean=np.float64(50.0), std=np.full(10, 20.0), y_mean=150.0, y_std=80.0)
    for dp in ([], ["--dp", "--noise-multiplier", "1"]):  # given statistics: with or without
        x, y = _trained_on(monkeypatch, ["--data", "diabetes", "--input-stats", str(stats), *dp])
        raw_x, raw_y = load_diabetes(return_X_y=True, scaled=False)
        rows = np.random.default_rng(0).permutation(len(raw_x))[round(0.2 * len(raw_x)) :]
        np.testing.assert_allclose(x, (raw_x[rows] - 50.0) / 20.0, rtol=1e-6)
        np.testing.assert_allclose(y, (raw_y[rows] - 150.0) / 80.0, rtol=1e-6)


@pytest.mark.parametrize(
    ("stats", "message"),
    [
        ({"mean": np.zeros(3), "std": np.ones(3)}, r"`mean` has shape \(3,\); expected .*\(64,\)"),
        ({"mean": 0.0, "std": np.nan}, "`std` holds non-finite values"),
        ({"mean": 0.0, "std": np.zeros(64)}, "`std` must be > 0 everywhere"),
        ({"mean": 0.0}, "must hold `mean` and `std`"),
        ({"mean": 0.0, "std": 1.0, "scale": 1.0}, r"got \['mean', 'scale', 'std'\]"),
        ({"mean": 0.0, "std": 1.0, "y_mean": 0.0, "y_std": 1.0}, "this data set has class labels"),
    ],
)
def test_bad_input_stats_exit_2_naming_the_flag(stats, message, tmp_path, capsys, monkeypatch):
    path = tmp_path / "stats.npz"
    np.savez(path, **stats)
    monkeypatch.setattr(jaxgrad.train, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as e:
        main(["--data", "digits", "--dp", "--noise-multiplier", "1", "--input-stats", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--input-stats" in err and re.search(message, err), err


def test_missing_input_stats_file_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--data", "digits", "--input-stats", str(tmp_path / "none.npz"), "--quiet"])
    assert e.value.code == 2 and "--input-stats" in capsys.readouterr().err


def test_given_statistics_in_the_data_module(tmp_path):
    """from_arrays and load_rows (memory-mapped) apply given statistics the same way."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(3.0, 2.0, size=(30, 4)), rng.normal(size=30)
    given = {"mean": np.array([1.0, 2.0, 3.0, 4.0]), "std": 2.0, "y_mean": 0.5, "y_std": 4.0}
    ds = jaxgrad.data.from_arrays(x, y, standardize=given, dtype=np.float64, seed=2)
    plain = jaxgrad.data.from_arrays(x, y, standardize=False, dtype=np.float64, seed=2)
    np.testing.assert_allclose(ds.x_train, (plain.x_train - given["mean"]) / 2.0)
    np.testing.assert_allclose(ds.x_test, (plain.x_test - given["mean"]) / 2.0)
    np.testing.assert_allclose(ds.y_train, (plain.y_train - 0.5) / 4.0)
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    rows = jaxgrad.data.load_rows(
        "npz", tmp_path / "xy.npz", standardize=given, seed=2, dtype=np.float64
    )
    np.testing.assert_allclose(rows.x_train[np.arange(len(ds.x_train))], ds.x_train)
    np.testing.assert_allclose(rows.x_test, ds.x_test)
    np.testing.assert_allclose(rows.y_train, ds.y_train)


# --- what the JSON releases -----------------------------------------------------------------


def test_the_dp_json_holds_only_what_the_readme_lists(tmp_path):
    keys = _readme_keys()
    line = _run(tmp_path, *LINE, "--epochs", "2", "--insecure-dp-seed", "1", name="line.json")
    jsonl = tmp_path / "m.jsonl"
    args = ["--data", "breast_cancer", "--model", "mlp", "--hidden", "8", "--dp"]
    args += ["--target-epsilon", "4", "--epochs", "2", "--batch-size", "64", "--public-test"]
    classify = _run(tmp_path, *args, "--metrics-jsonl", str(jsonl), name="classify.json")
    for summary in (line, classify):
        found = set(_flatten(summary))
        assert found <= keys, f"keys not in docs/privacy.md's table: {sorted(found - keys)}"
        assert not any(
            re.search(r"train_|nonfinite_dropped|seconds|loss$|reference", k)
            for k in found
            if not k.split(".")[-1].startswith("test_")
        ), found
        assert all(set(r) == set(summary["history"][0]) for r in summary["history"])
        assert "nonfinite" not in summary["history"][0]
        assert "the guarantee does not cover it" in summary["privacy_note"]
    assert {"final.test_accuracy", "params.m", "privacy.epsilon", "history[].epsilon"} <= (
        set(_flatten(line)) | set(_flatten(classify))
    )
    assert classify["privacy"]["planned_steps"] == classify["steps"] == 2 * -(-455 // 64)
    lines = [json.loads(s) for s in jsonl.read_text().splitlines()]
    assert lines == classify["history"]  # --metrics-jsonl: the same released records


# --- flags that would be ignored ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--l2-clip", "0.1"], "--l2-clip needs --dp .*for --strategy clipped use --clip"),
        (["--strategy", "clipped", "--l2-clip", "0.1"], "--l2-clip needs --dp"),
        (["--delta", "1e-6"], "--delta needs --dp"),
        (["--accountant", "rdp"], "--accountant needs --dp"),
        (["--nonfinite", "raise"], "--nonfinite needs --dp .*exit code 1"),
        (["--insecure-dp-seed", "1"], "--insecure-dp-seed needs --dp .*--seed seeds the split"),
        (["--target-epsilon", "8"], "--target-epsilon needs --dp"),
        (["--noise-multiplier", "1"], "--noise-multiplier needs --dp"),
        (["--physical-batch-size", "40"], "--physical-batch-size needs --dp"),
        (
            ["--dp", "--noise-multiplier", "1", "--insecure-dp-seed", "-1"],
            r"--insecure-dp-seed must be an integer in \[0, 4294967295\]; got -1",
        ),
    ],
)
def test_dp_flags_without_dp_exit_2(args, message, capsys, monkeypatch):
    monkeypatch.setattr(jaxgrad.train, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as e:
        main(["--data", "digits", *args, "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(message, err), err


def test_help_says_dp_checkpoints_are_secret(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "OS entropy and is written only to the checkpoints, which are therefore secret" in out
    assert "checkpoints hold its secret noise and sampling key: keep them secret" in out
    # The DP flags' defaults apply with --dp only; "(default: None)" would say nothing.
    assert "delta (with --dp, default: 1e-05)" in out and "(default: None)" not in out


def test_the_test_split_is_released_only_when_declared_public(tmp_path, capsys):
    """The held-out split is the user's data too: a --dp run evaluates nothing unless
    --public-test declares it public (and then labels it outside the guarantee)."""
    args = [*LINE, "--epochs", "1"]
    quiet = _run(tmp_path, *args, name="quiet.json")
    assert quiet["final"] == {} and set(quiet["history"][0]) == {"epoch", "step", "epsilon"}
    public = _run(tmp_path, *args, "--public-test", name="public.json")
    assert set(public["final"]) == {"test_loss", "test_r2"}
    with pytest.raises(SystemExit) as exit_info:  # without --dp it means nothing: refused
        main(["--data", "line", "--public-test", "--quiet"])
    assert exit_info.value.code == 2 and "--public-test needs --dp" in capsys.readouterr().err


def test_dp_on_your_own_labels_needs_num_classes(tmp_path, capsys):
    """The number of classes sets the model's output width: read off the private labels, one
    row with a new largest label would change the released parameters' shapes."""
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.standard_normal((100, 4)), y=np.arange(100) % 3)
    args = ["--data", "npz", "--data-path", str(path), "--model", "logistic", "--dp"]
    args += ["--noise-multiplier", "1", "--epochs", "1", "--batch-size", "20", "--quiet"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "--num-classes" in capsys.readouterr().err
    out = _run(tmp_path, *args, "--num-classes", "5", name="npz.json")
    assert out["privacy"]["epsilon"] > 0
    with pytest.raises(SystemExit):
        main(["--data", "digits", "--num-classes", "10", "--quiet"])


def test_dp_task_auto_says_nothing_of_the_targets_values(tmp_path, capsys):
    """Under --dp, --task auto goes by y's dtype alone: the warning on floats that are all
    whole numbers (and their count of distinct values) is a statistic of the private rows."""
    rng = np.random.default_rng(0)
    path = tmp_path / "whole.npz"
    np.savez(path, x=rng.normal(size=(40, 3)), y=np.round(rng.normal(size=40) * 3))
    common = ["--data", "npz", "--data-path", str(path), "--epochs", "1", "--batch-size", "8"]
    common += ["--progress", "none"]
    with pytest.warns(UserWarning, match="all whole numbers"):
        main([*common, "--json", str(tmp_path / "plain.json")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails
        main([*common, "--dp", "--noise-multiplier", "1", "--json", str(tmp_path / "dp.json")])
    assert "whole numbers" not in capsys.readouterr().err
