"""python -m jaxgrad.train: the documented results, outputs, and clear errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxgrad.train.__main__ import main


def _run(tmp_path, *args):
    out = tmp_path / "out.json"
    assert main([*args, "--json", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())


def test_mlp_on_digits_subprocess(tmp_path):
    """The headline result, as a user runs it: >= 0.97 test accuracy in well under 60 s."""
    out, png = tmp_path / "out.json", tmp_path / "curves.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxgrad.train",
            "--model",
            "mlp",
            "--data",
            "digits",
            "--epochs",
            "30",
            "--strategy",
            "per-example",
            "--json",
            str(out),
            "--plot",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "final after 30 epochs" in proc.stdout and "test_accuracy" in proc.stdout
    summary = json.loads(out.read_text())
    assert summary["final"]["test_accuracy"] >= 0.97
    assert summary["seconds"] < 60
    assert summary["epochs"] == 30 and summary["strategy"] == "per-example"
    assert summary["final"]["train_loss"] < 0.05
    assert len(summary["history"]) == 30
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_logistic_on_breast_cancer(tmp_path):
    s = _run(tmp_path, "--data", "breast_cancer", "--model", "logistic")
    assert s["final"]["test_accuracy"] >= 0.95


def test_line_fit_recovers_m_and_b(tmp_path):
    s = _run(tmp_path, "--data", "line", "--strategy", "accumulate", "--x64")
    assert s["params"]["m"] == pytest.approx(2.0, abs=1e-3)
    assert s["params"]["b"] == pytest.approx(-0.5, abs=1e-3)


def test_linear_regression_on_diabetes_matches_sklearn(tmp_path):
    from sklearn.linear_model import LinearRegression

    from jaxgrad import data

    s = _run(tmp_path, "--data", "diabetes", "--model", "linear")
    ds = data.load("diabetes", seed=0)
    reference = LinearRegression().fit(ds.x_train, ds.y_train).score(ds.x_test, ds.y_test)
    assert s["reference"]["sklearn_linear_regression_test_r2"] == pytest.approx(reference)
    assert abs(s["final"]["test_r2"] - reference) <= 0.01


def test_checkpoint_and_resume_from_the_cli(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    args = ["--data", "line", "--epochs", "4", "--checkpoint-dir", str(ckpt)]
    first = _run(tmp_path, *args)
    assert len(os.listdir(ckpt)) == 3  # --keep 3
    again = _run(tmp_path, *args, "--epochs", "6", "--metrics-jsonl", str(tmp_path / "m.jsonl"))
    assert again["history"][:4] == first["history"]
    assert len(again["history"]) == 6
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [5, 6]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "resnet"],
            r"invalid choice: 'resnet' \(choose from '?line'?, '?linear'?, '?logistic'?, '?mlp",
        ),
        (["--data", "mnist"], r"invalid choice: 'mnist' \(choose from '?digits'?, '?breast_cancer"),
        (["--strategy", "mean"], r"invalid choice: 'mean' \(choose from '?batch'?, '?per-example"),
        (["--data", "diabetes", "--model", "logistic"], "--model logistic is a classifier"),
        (["--strategy", "accumulate", "--microbatches", "0"], "--microbatches must be a"),
        (["--strategy", "clipped", "--clip", "-1"], "--clip must be a positive finite"),
        (["--data", "digits", "--model", "linear"], "--model linear is a regression model"),
        (
            ["--data", "digits", "--batch-size", "5000"],
            r"--batch-size 5000 is larger than the training set \(1438",
        ),
        (["--data", "npz"], "--data npz needs --data-path"),
    ],
)
def test_clear_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_bad_data_file_and_labels(tmp_path, capsys):
    x = np.ones((20, 3))
    x[3, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.zeros(20, int))
    with pytest.raises(SystemExit):
        main(["--data", "npz", "--data-path", str(tmp_path / "nan.npz"), "--quiet"])
    assert (
        "nan.npz contains non-finite values (NaN or inf) in 1 of 20 rows" in capsys.readouterr().err
    )


def test_non_finite_loss_exits_with_the_step(tmp_path, capsys):
    code = main(
        [
            "--data",
            "diabetes",
            "--optimizer",
            "sgd",
            "--lr",
            "1e3",
            "--epochs",
            "50",
            "--checkpoint-dir",
            str(tmp_path),
            "--checkpoint-every",
            "5",
            "--quiet",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite (NaN or inf) at step" in err and "the last good checkpoint is" in err


# --- issue 11: nonsense hyperparameters and unwritable outputs fail before the run ----------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "-0.1"], r"--lr must be a positive finite number; got -0\.1"),
        (["--lr", "nan"], "--lr must be a positive finite number"),
        (["--lr", "0"], "--lr must be a positive finite number"),
        (["--keep", "0", "--checkpoint-dir", "TMP"], "--keep must be a positive integer; got 0"),
        (["--checkpoint-every", "-2"], "--checkpoint-every must be a positive integer"),
        (["--hidden", "64", "0"], r"--hidden sizes must be positive integers; got \[64, 0\]"),
        (["--json", "/nonexistent-dir-u11/out.json"], "--json .*does not exist"),
        (["--metrics-jsonl", "/nonexistent-dir-u11/m.jsonl"], "--metrics-jsonl .*does not exist"),
    ],
)
def test_nonsense_hyperparameters_exit_2_before_training(
    args, message, capsys, monkeypatch, tmp_path
):
    import jaxgrad.train.__main__ as cli

    called = []
    monkeypatch.setattr("jaxgrad.train.fit", lambda *a, **k: called.append(1))
    args = [str(tmp_path) if a == "TMP" else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--quiet"])
    assert exit_info.value.code == 2 and not called
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_unwritable_outputs_fail_before_training(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for args, message in (
        (["--checkpoint-dir", str(a_file)], "--checkpoint-dir .* is a file; expected a directory"),
        (["--json", str(tmp_path)], "--json .* is a directory"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--quiet"])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(SystemExit):
                main(["--checkpoint-dir", str(locked / "ckpt"), "--quiet"])
            assert "is not writable" in capsys.readouterr().err
        finally:
            locked.chmod(0o700)


def test_outputs_are_written_to_not_judged_by_permission_bits(tmp_path, capsys, monkeypatch):
    """The permission bits say yes, writing fails: a directory under a regular file its owner
    may write and execute, and (what root's bits pass) /proc. Each exits 2 before training,
    naming the flag, the path and why, instead of a traceback from inside fit."""
    import jaxgrad.train.__main__ as cli

    called = []
    monkeypatch.setattr("jaxgrad.train.fit", lambda *a, **k: called.append(1))
    a_file = tmp_path / "afile"
    a_file.write_text("")
    a_file.chmod(0o755)
    assert os.access(a_file, os.W_OK | os.X_OK)  # what the check used to read
    for args, message in (
        (
            ["--checkpoint-dir", str(a_file / "sub")],
            r"--checkpoint-dir '[^']*afile/sub' is not writable: .*Not a directory",
        ),
        (
            ["--checkpoint-dir", "/proc/jaxgrad-x/ckpt"],
            r"--checkpoint-dir '/proc/jaxgrad-x/ckpt' is not writable: \S",
        ),
        (
            ["--json", "/proc/jaxgrad-x.json"],
            r"--json '/proc/jaxgrad-x\.json': the directory '/proc' is not writable: \S",
        ),
        (
            ["--metrics-jsonl", str(a_file / "m.jsonl")],
            r"--metrics-jsonl '[^']*afile/m\.jsonl': '[^']*afile' is a file, not a directory",
        ),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*args, "--data", "line", "--quiet"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and not called and "Traceback" not in err, err
        assert re.search(message, err), err
    assert not (tmp_path / "afile").is_dir() and os.listdir(tmp_path) == ["afile"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--data", "breast_cancer", "--model", "logistic", "--hidden", "5", "7"],
            "--hidden is for --model mlp; got --model logistic",
        ),
        (
            ["--data", "breast_cancer", "--hidden", "5"],
            r"--hidden is for --model mlp; got --model logistic \(--data breast_cancer's default\)",
        ),
        (
            ["--data", "diabetes", "--model", "linear", "--activation", "sigmoid"],
            "--activation is for --model mlp or cnn; got --model linear",
        ),
        (["--data", "line", "--keep", "2"], "--keep is for --checkpoint-dir; got no --checkpoint"),
        (["--data", "line", "--no-resume"], "--no-resume is for --checkpoint-dir; got no --"),
        (
            ["--data", "line", "--quiet", "--progress", "bar"],
            "--progress is for a run that prints; got --progress bar with --quiet",
        ),
    ],
)
def test_flags_that_would_be_ignored_are_refused(args, message, capsys, monkeypatch):
    """A flag the run would ignore exits 2 naming it, before training (docs/training.md)."""
    import jaxgrad.train.__main__ as cli

    called = []
    monkeypatch.setattr("jaxgrad.train.fit", lambda *a, **k: called.append(1))
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--epochs", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not called, err
    assert re.search(message, err), err


def test_line_honours_test_fraction_and_defaults_are_not_refused(monkeypatch, tmp_path):
    """--data line splits by --test-fraction like every other set (it was dropped); the
    defaults of the flags refused above are not "given": a plain run passes them to fit."""
    import jaxgrad.data
    import jaxgrad.train.__main__ as cli

    class Stop(Exception):
        pass

    seen = {}

    def fake_fit(loss_fn, params, train, **kwargs):
        seen.update(kwargs, rows=len(train[0]))
        raise Stop

    monkeypatch.setattr("jaxgrad.train.fit", fake_fit)
    for fraction in ("0.5", None):
        with pytest.raises(Stop):
            cli.main(
                ["--data", "line", "--quiet", *(["--test-fraction", fraction] * bool(fraction))]
            )
        expected = jaxgrad.data.synthetic_line(test_fraction=float(fraction or 0.2))
        assert seen["rows"] == len(expected.x_train)
    # Without --checkpoint-dir the checkpoint options are not passed (fit refuses them there).
    assert not {"keep", "resume", "checkpoint_every"} & set(seen) and seen["progress"] == "auto"
    with pytest.raises(Stop):
        cli.main(["--data", "line", "--quiet", "--checkpoint-dir", str(tmp_path)])
    assert seen["keep"] == 3 and seen["resume"] is True and seen["checkpoint_every"] is None


def test_sparse_labels_are_refused_but_never_described_under_dp(tmp_path, capsys, monkeypatch):
    """Labels 0, 10**6, 10**6 + 2 made a million-class model (minutes on 50 rows); the CLI
    refuses them naming --num-classes. Under --dp nothing is said from the (private) labels:
    --num-classes is required instead."""
    import jaxgrad.train.__main__ as cli

    monkeypatch.setattr("jaxgrad.train.fit", lambda *a, **k: pytest.fail("trained"))
    rng = np.random.default_rng(0)
    path = tmp_path / "ids.npz"
    np.savez(path, x=rng.normal(size=(50, 3)), y=rng.integers(0, 3, 50) * 2 + 10**6 - 4)
    base = ["--data", "npz", "--data-path", str(path), "--epochs", "1", "--quiet"]
    for extra, message in (
        ([], "without --num-classes the classes are counted as the largest label \\+ 1"),
        (["--dp", "--noise-multiplier", "1"], "--dp on --data npz needs --num-classes"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*base, *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and re.search(message, err), err
        assert ("distinct labels" in err) == (not extra)


def test_help_shows_defaults_and_a_sentence_per_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 0.2)" in out and "(default: relu)" in out
    assert "learning rate" in out


def test_checkpoint_problems_are_a_message_and_exit_2(tmp_path, capsys):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "ckpt-0000000001.npz").mkdir()  # newest entry a directory
    code = main(["--data", "line", "--epochs", "1", "--checkpoint-dir", str(d), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: checkpoint entry") and "Traceback" not in err
    assert "not a regular file" in err
