"""Strict test setup: float64 everywhere, so equivalence tests compare to ~1e-12."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def key():
    return jax.random.key(0)
