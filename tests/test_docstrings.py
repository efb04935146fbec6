"""Every ``Example::`` in a public docstring runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import jaxgrad

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(jaxgrad.__path__, "jaxgrad.")
    if not info.name.endswith("__main__") and ".bench.peers" not in info.name
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
