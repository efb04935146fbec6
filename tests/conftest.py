"""Strict test setup: float64 everywhere, so equivalence tests compare to ~1e-12.

And one XLA compilation per program per test process. Many tests compile a program another
test (or the same one) compiled already: the same small model fitted whole, in chunks,
interrupted and resumed, the same DP step in several files; jit's own cache is per function
object, so every ``fit`` call compiles afresh. A persistent compilation cache in a fresh
temporary directory (one per process, so ``pytest -n 2``'s workers share no files; removed
when the session ends) serves the repeats: a second identical private ``fit`` took 1 s of
CPU instead of 4.6 s. It changes no result (a hit runs the executable XLA compiled for the
identical program, options and flags) and no trace count (tracing still happens). An
executable read back from it prints, in ``Compiled.as_text()``, the same HLO without its
source-line metadata; the tests that read HLO text run in subprocesses, which do not load
this file.

XLA's CPU backend compiles at LLVM ``-O0`` here (tests/_xla_flags.py), as in the sharding
workers (tests/_sharding_worker.py): what the tests check — jaxgrad's programs and their
results against independent references in float64 — is fixed before code generation, and the
optimisation level changes only how fast the machine code is made and runs, not what it
computes. Compilation is most of the suite's CPU time: measured under load ~8, back to back: 4
files (152 tests: fast reparametrisations, training loop, DP training, grads) 432 s -> 342 s.
Subprocesses inherit the flag unless they set ``XLA_FLAGS`` themselves.
"""

import json
import os
import shutil
import tempfile

# Before jax creates its CPU client (it reads XLA_FLAGS then); a user's own flags are kept.
from _xla_flags import FAST_COMPILE

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), FAST_COMPILE]).strip()

import jax
import pytest

jax.config.update("jax_enable_x64", True)

_XLA_CACHE = tempfile.mkdtemp(prefix="jaxgrad-tests-xla-")
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


# Modules whose tests share results computed once per session in worker processes (minutes
# of CPU: the emulated-device meshes, the two-process runs; ``shared`` in tests/helpers.py),
# first in the collection. Under ``pytest -n 2`` (pytest-xdist's ``load``) each worker
# starts with a block of (tests / workers / 4) consecutive tests, 168 of 1344, so all of
# them run on the first worker, early: the other never waits on the lock of a result the
# first is computing (the last CI's second 62 s setup of tests/test_sharding_mesh.py was
# such a wait, one core idle), and these long setups cannot be what the run ends on while
# the other worker has nothing left to do.
FIRST = ("test_sharding.py", "test_sharding_mesh.py")


def pytest_collection_modifyitems(config, items):
    first = [item for item in items if item.path.name in FIRST]
    items[:] = first + [item for item in items if item.path.name not in FIRST]


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session")
def seed_results(tmp_path_factory):
    """``python -m jaxgrad.seed --json``'s numbers, computed once per session (and shared by
    pytest-xdist's workers): tests/test_seed.py checks them against closed forms, and
    tests/test_notebooks.py runs the notebook's table and assertions on them."""
    from helpers import shared

    from jaxgrad import seed

    def compute(directory):
        path = directory / "seed.json"
        assert seed.main(["--json", str(path)]) == 0
        return json.loads(path.read_text())

    return shared(tmp_path_factory, "seed", compute)[0]


def pytest_sessionfinish(session, exitstatus):
    # (pytest_unconfigure is not called in pytest-xdist's workers; this is)
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)
