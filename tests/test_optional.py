"""Optional dependencies: a missing one is an ImportError that says how to install it."""

import sys

import pytest

import jaxgrad
from jaxgrad import _optional
from jaxgrad.train.plot import plot_history


def _missing(monkeypatch, *modules):
    # A None entry in sys.modules makes `import name` raise ImportError, as if not installed.
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_require_returns_the_module():
    import json

    assert _optional.require("json", package="x", extra="y", needed_for="z") is json


@pytest.mark.parametrize(
    ("modules", "call", "package", "extra"),
    [
        (("sklearn",), lambda: jaxgrad.data.load_digits(), "scikit-learn", "cli"),
        (("sklearn.datasets",), lambda: jaxgrad.data.load_diabetes(), "scikit-learn", "cli"),
        (("mnist1d.data",), lambda: jaxgrad.data.load_mnist1d(), "mnist1d", "privacy"),
        (
            ("dp_accounting",),
            lambda: jaxgrad.privacy.epsilon(
                noise_multiplier=1.0, sampling_rate=0.01, steps=10, delta=1e-5
            ),
            "dp-accounting",
            "privacy",
        ),
        (
            ("matplotlib",),
            lambda: plot_history([{"epoch": 1, "train_loss": 1.0}], "x.png"),
            "matplotlib",
            "cli",
        ),
    ],
)
def test_missing_dependency_names_its_install_command(monkeypatch, modules, call, package, extra):
    _missing(monkeypatch, *modules)
    with pytest.raises(ImportError) as err:
        call()
    message = str(err.value)
    assert f"pip install {package}`" in message
    assert f"jaxgrad[{extra}]" in message


@pytest.mark.parametrize("cli", ["jaxgrad.train.__main__", "jaxgrad.bench.__main__"])
def test_cli_plot_without_matplotlib_exits_2(monkeypatch, tmp_path, capsys, cli):
    module = __import__(cli, fromlist=["main"])
    _missing(monkeypatch, "matplotlib")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--plot", str(tmp_path / "p.png")])
    assert exit_.value.code == 2
    assert "pip install matplotlib" in capsys.readouterr().err
