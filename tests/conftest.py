"""Strict test setup: float64 everywhere, so equivalence tests compare to ~1e-12.

And one XLA compilation per program per test process: many tests compile the same program
again (the same small model fitted whole, in chunks, interrupted and resumed; the same DP
step in several files), and jit's own cache is per function object, so each ``fit`` call
compiles afresh. A persistent compilation cache in a fresh temporary directory (per process,
so ``pytest -n 2``'s workers never share files; removed at exit) serves the repeats. It
changes no result: a hit runs the executable XLA compiled for the identical program, options
and flags; tracing (which the compile-once tests count) still happens. (An executable read
back from the cache prints, in ``Compiled.as_text()``, the same HLO without its source-line
metadata; the tests that read HLO text run in subprocesses, where this file is not loaded.)
"""

import atexit
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_enable_x64", True)

_XLA_CACHE = tempfile.mkdtemp(prefix="jaxgrad-tests-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


@pytest.fixture
def key():
    return jax.random.key(0)
