"""Patterns several test files share, each written once.

``interrupt_then_resume``: the resume tests' pattern. A run is cut short by a
``KeyboardInterrupt`` (as a user's Ctrl-C), either from ``evaluate`` (which ``fit`` calls at
the end of every epoch) or right after a checkpoint is written; then the same call runs again
in the same directory and resumes. The caller compares the resumed result with an
uninterrupted run.

``shared``: a costly JSON-able result computed once per test session, even when
pytest-xdist splits its users between workers.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from unittest import mock

import pytest

from jaxgrad.train import checkpoint


def interrupt_on_call(n: int = 2):
    """An ``evaluate`` callback that returns no metrics and raises ``KeyboardInterrupt`` on its
    ``n``-th call (``n = 2``: at the end of the second epoch, before its checkpoint)."""
    calls = []

    def evaluate(params):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return {}

    return evaluate


def run_interrupted(run, checkpoint_dir, *, at_evaluate: int | None = None, at_save=None, **kw):
    """``run(checkpoint_dir=checkpoint_dir, **kw)``, interrupted by a ``KeyboardInterrupt`` at
    ``evaluate``'s ``at_evaluate``-th call or right after the ``at_save``-th checkpoint is
    written (exactly one of the two). Fails unless the run is interrupted.

    Returns:
      The checkpoints the interrupted run left (``checkpoint.list_checkpoints``), oldest first.
    """
    if (at_evaluate is None) == (at_save is None):
        raise TypeError("pass exactly one of `at_evaluate` and `at_save`")
    if at_evaluate is not None:
        with pytest.raises(KeyboardInterrupt):
            run(checkpoint_dir=checkpoint_dir, evaluate=interrupt_on_call(at_evaluate), **kw)
    else:
        real, saved = checkpoint.save, []

        def save(*args, **kwargs):
            saved.append(real(*args, **kwargs))
            if len(saved) == at_save:
                raise KeyboardInterrupt
            return saved[-1]

        with mock.patch.object(checkpoint, "save", save), pytest.raises(KeyboardInterrupt):
            run(checkpoint_dir=checkpoint_dir, **kw)
        assert len(saved) == at_save
    return checkpoint.list_checkpoints(checkpoint_dir)


def interrupt_then_resume(run, checkpoint_dir, *, at_evaluate=None, at_save=None, **kw):
    """:func:`run_interrupted`, then the same ``run(checkpoint_dir=checkpoint_dir, **kw)``
    again, which resumes from the latest checkpoint.

    Returns:
      ``(checkpoints, resumed)``: the interrupted run's checkpoints and the resumed run's
      result.
    """
    saved = run_interrupted(run, checkpoint_dir, at_evaluate=at_evaluate, at_save=at_save, **kw)
    return saved, run(checkpoint_dir=checkpoint_dir, **kw)


def shared(tmp_path_factory, name: str, compute):
    """``compute(directory)``'s JSON-able result and its directory, computed once per session.

    Under pytest-xdist (CI runs ``-n 2``) the tests of one module may be split between the
    workers, and each would run the costly computation again; here the first worker
    to need it computes it under a file lock, in a directory both see, and the others read
    its result."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        directory = tmp_path_factory.mktemp(name)
        return compute(directory), directory
    root = tmp_path_factory.getbasetemp().parent / "session-shared"
    root.mkdir(exist_ok=True)
    directory, done = root / name, root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a failed earlier attempt's
            directory.mkdir()
            result = compute(directory)
            done.with_suffix(".tmp").write_text(json.dumps(result))
            done.with_suffix(".tmp").replace(done)
        return json.loads(done.read_text()), directory


def private_key(seed: int = 0, impl: str | None = None):
    """A fixed key for jaxgrad.privacy's entry points: not of ``jax.random.key(seed)``'s
    ``(0, seed)`` form, of which they warn (``jaxgrad.keys.check_private_key``). Tests are
    not private runs; a test of that warning passes ``jax.random.key(seed)`` itself.
    ``impl``: the PRNG implementation (``"rbg"``, ...; default: JAX's default)."""
    import jax

    return jax.random.fold_in(jax.random.key(seed, impl=impl), 1)
