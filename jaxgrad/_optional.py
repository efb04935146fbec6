"""Optional dependencies: imported on first use, with the install command when missing."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
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
        raise _not_installed(package, extra, needed_for) from e


def package_dir(module: str, *, package: str, extra: str, needed_for: str) -> Path:
    """The directory of the installed top-level package ``module``, without importing it.

    For reading a data file a package ships when importing the package would cost more than
    the read (``import sklearn`` imports scipy and more; its digits CSV is one small file).

    Args:
      module: a top-level package name, e.g. ``"sklearn"``.
      package: as for :func:`require`.
      extra: as for :func:`require`.
      needed_for: as for :func:`require`.

    Raises:
      ImportError: the package is not installed; the message is :func:`require`'s.

    Returns:
      The directory holding the package's ``__init__.py``.
    """
    spec = importlib.util.find_spec(module)  # None if missing (or set to None in sys.modules)
    if spec is None or spec.origin is None:
        raise _not_installed(package, extra, needed_for)
    return Path(spec.origin).parent


def _not_installed(package: str, extra: str, needed_for: str) -> ImportError:
    return ImportError(
        f"{needed_for} needs the `{package}` package, which is not installed; install it "
        f"with `pip install {package}` (or `pip install 'jaxgrad[{extra}]'`)"
    )


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), or an install hint."""
    matplotlib = require("matplotlib", package="matplotlib", extra="cli", needed_for="plotting")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
