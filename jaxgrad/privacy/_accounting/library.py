"""dp-accounting itself: imported on first use, its logging quieted, its accountant objects.

The one place jaxgrad touches the library's import and its accountants' constructors, so
``"pld"`` and ``"rdp"`` mean the same objects everywhere.
"""

from __future__ import annotations

import contextlib
import logging

from jaxgrad import reduce
from jaxgrad._optional import require
from jaxgrad.privacy._accounting.checks import check_accountant


def dpa():
    """The ``dp_accounting`` module, imported on first use (the ``privacy`` extra)."""
    return require(
        "dp_accounting", package="dp-accounting", extra="privacy", needed_for="privacy accounting"
    )


@contextlib.contextmanager
def quiet_absl():
    """absl's logger at ERROR for the block: RDP logs every order it drops at small σ."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def dpa_accountant(accountant, vdi, relation="add_or_remove_one"):
    """A fresh dp-accounting accountant (``"pld"`` or ``"rdp"``) under ``relation``."""
    lib = dpa()
    rel = getattr(lib.NeighboringRelation, relation.upper())
    if accountant == "rdp":
        return lib.rdp.RdpAccountant(neighboring_relation=rel)
    return lib.pld.PLDAccountant(neighboring_relation=rel, value_discretization_interval=vdi)


def make_accountant(accountant: str = "pld", *, pld_discretization: float = 1e-4):
    """A fresh ``dp_accounting`` accountant: ``"pld"`` or ``"rdp"``."""
    check_accountant(accountant)
    if accountant == "rdp":  # pld_discretization is not checked: the RDP has none
        return dpa_accountant("rdp", None)
    vdi = reduce.check_positive_float(pld_discretization, name="pld_discretization")
    return dpa_accountant("pld", vdi)
