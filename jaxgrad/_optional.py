"""Optional dependencies: imported on first use, with the install command when missing."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, *, package: str, extra: str, needed_for: str) -> ModuleType:
    """Imports ``module`` (from the PyPI ``package`` of the ``extra``) or says how to install it.

    Args:
      module: the dotted module name to import, e.g. ``"sklearn.datasets"``.
      package: the PyPI distribution that provides it, e.g. ``"scikit-learn"``.
      extra: jaxgrad's optional extra that installs it, e.g. ``"cli"``.
      needed_for: what needs it, for the message, e.g. ``"the bundled data sets"``.

    Raises:
      ImportError: the module is not installed; the message gives both install commands.

    Returns:
      The imported module.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{needed_for} needs the `{package}` package, which is not installed; install it "
            f"with `pip install {package}` (or `pip install 'jaxgrad[{extra}]'`)"
        ) from e


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), or an install hint."""
    matplotlib = require("matplotlib", package="matplotlib", extra="cli", needed_for="plotting")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
