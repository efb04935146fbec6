"""Data sets by name: :func:`load` (``python -m jaxgrad.train --data NAME``)."""

from __future__ import annotations

from collections.abc import Callable

from jaxgrad.data.arrays import Dataset
from jaxgrad.data.bundled import (
    load_breast_cancer,
    load_diabetes,
    load_digits,
    load_mnist1d,
    load_mnist_subset,
    synthetic_line,
)
from jaxgrad.data.files import load_idx, load_npz

BUNDLED: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "breast_cancer": load_breast_cancer,
    "diabetes": load_diabetes,
    "line": synthetic_line,
    "mnist1d": load_mnist1d,
    "mnist5k": load_mnist_subset,
}
FROM_PATH: dict[str, Callable[..., Dataset]] = {"npz": load_npz, "idx": load_idx}
NAMES = (*BUNDLED, *FROM_PATH)


def load(name: str, *, path=None, **kwargs) -> Dataset:
    """A data set by name: one of :data:`NAMES`.

    Args:
      name: ``"digits"``, ``"breast_cancer"``, ``"diabetes"``, ``"line"``, ``"mnist1d"``,
        ``"mnist5k"`` (bundled, generated locally or
        synthetic), or ``"npz"`` / ``"idx"`` with a ``path``.
      path: the file (``npz``) or directory (``idx``).
      **kwargs: the loader's options (``seed``, ``test_fraction``, ``standardize``, ``dtype``).

    Example::

      >>> import jaxgrad
      >>> jaxgrad.data.load("digits", seed=0)
      Dataset('digits', classification, num_classes=10, train=1438, test=359, features=(64,))
    """
    if name in BUNDLED:
        if path is not None:
            raise ValueError(f"data set {name!r} is bundled and takes no `path`; got {path!r}")
        return BUNDLED[name](**kwargs)
    if name in FROM_PATH:
        if path is None:
            raise ValueError(f"data set {name!r} needs a `path`")
        return FROM_PATH[name](path, **kwargs)
    raise ValueError(f"unknown data set {name!r}; expected one of {list(NAMES)}")
