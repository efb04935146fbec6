"""Meshes users bring: ``jax.make_mesh`` (Explicit axes by default) and Auto axes.

One subprocess on 8 emulated CPU devices (tests/_sharding_worker.py ``user_meshes``) runs
every public entry point on a batch the user placed with ``NamedSharding(mesh, P("data"))``
and compares it with the same call on one device, in float64: a (sum, count) token loss,
sequences of very different real lengths, the last device holding only padding.
"""

from __future__ import annotations

import pytest
from test_sharding import _run_worker

ENTRY_POINTS = [
    "batch_grad",
    "mean_of_per_example_grads",
    "per_example_grads",
    "accumulate_grad",
    "per_example_norms",
    "clipped_grad",
    "grad_stats",
    "per_example_dots",
    "gradient_gram",
    "dp_grad",
    "sampled_dp_grad",
    "jit(batch_grad)",
]


@pytest.fixture(scope="module")
def user_meshes():
    return _run_worker("user_meshes")


def test_make_mesh_gives_explicit_axes(user_meshes):
    # What the tests below are about: jax.make_mesh's default (JAX >= 0.7) is Explicit.
    assert user_meshes["default_axis_types"] == "(Explicit,)"


@pytest.mark.parametrize("mesh", ["explicit", "auto"])
def test_every_entry_point_on_a_user_mesh_equals_one_device(user_meshes, mesh):
    errors = {k: v for k, v in user_meshes["errors"].items() if k.startswith(mesh + "/")}
    assert sorted(errors) == sorted(f"{mesh}/{k}" for k in ENTRY_POINTS)
    bad = {k: v for k, v in errors.items() if not v <= 1e-12}
    assert not bad, bad


def test_outputs_on_an_explicit_mesh_have_explicit_types(user_meshes):
    specs = user_meshes["specs"]
    # Gradients of replicated parameters are replicated; per-example outputs keep the
    # batch's sharding (no device ever holds all rows).
    assert all(s.replace("None", "").strip("P(), ") == "" for s in specs["explicit/batch_grad"])
    assert specs["explicit/per_example_norms"] == ["P('data',)"]
    assert all(s.startswith("P('data'") for s in specs["explicit/per_example_grads"])
    assert specs["auto/per_example_norms"] == ["P('data',)"]


def test_fit_on_an_explicit_mesh_equals_one_device(user_meshes):
    # One epoch of Adam, plain and DP-SGD (the same Poisson draws and noise keys): only the
    # order of the sums differs, ~1e-16 per step.
    for name in ("plain", "private"):
        assert user_meshes["fit"][name] <= 1e-12, user_meshes["fit"]
