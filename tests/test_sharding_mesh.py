"""Meshes users bring: ``jax.make_mesh`` (Explicit axes by default) and Auto axes.

One subprocess on 8 emulated CPU devices (tests/_sharding_worker.py ``user_meshes``) runs
every public entry point on a batch the user placed with ``NamedSharding(mesh, P("data"))``
and compares it with the same call on one device, in float64: a (sum, count) token loss,
sequences of very different real lengths, the last device holding only padding. The same
on a 4 x 2 ("data", "model") mesh with parameters sharded over "model" and FSDP-style over
"data" (and the compiled HLO's all-gathers, the DP noise, fit's sharded optimizer state).
fit resumed from orbax checkpoints of sharded state is tested across two processes, each
writing its own pieces, in tests/test_sharding.py.
"""

from __future__ import annotations

import math

import pytest
from test_sharding import _run_worker, shared

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
def user_meshes(tmp_path_factory):
    return shared(tmp_path_factory, "user_meshes", lambda _: _run_worker("user_meshes"))[0]


def test_make_mesh_gives_explicit_axes(user_meshes):
    # What the tests below are about: jax.make_mesh's default (JAX >= 0.7) is Explicit.
    assert user_meshes["default_axis_types"] == "(Explicit,)"


AUTO = ["per_example_grads", "per_example_dots", "gradient_gram", "sampled_dp_grad"]
AUTO += ["jit(batch_grad)"]  # (the rest runs on Auto meshes in tests/test_sharding.py)


@pytest.mark.parametrize("mesh, names", [("explicit", ENTRY_POINTS), ("auto", AUTO)])
def test_every_entry_point_on_a_user_mesh_equals_one_device(user_meshes, mesh, names):
    errors = {k: v for k, v in user_meshes["errors"].items() if k.startswith(mesh + "/")}
    assert sorted(errors) == sorted(f"{mesh}/{k}" for k in names)
    bad = {k: v for k, v in errors.items() if not v <= 1e-12}
    assert not bad, bad


def test_outputs_on_an_explicit_mesh_have_explicit_types(user_meshes):
    specs = user_meshes["specs"]
    # Gradients of replicated parameters are replicated; per-example outputs keep the
    # batch's sharding (no device ever holds all rows).
    assert all(s.replace("None", "").strip("P(), ") == "" for s in specs["explicit/batch_grad"])
    assert specs["explicit/per_example_norms"] == ["P('data',)"]
    assert all(s.startswith("P('data'") for s in specs["explicit/per_example_grads"])
    assert all(s.startswith("P('data'") for s in specs["auto/per_example_grads"])


# Parameters sharded over a second axis: a 4 x 2 ("data", "model") mesh, tensor-parallel
# weights over "model" and the embedding table FSDP-style over "data" (its vocabulary axis).
MODEL_SPECS = {
    "b": "P('model',)",
    "embed": "P('data', None)",
    "out": "P('model', None)",
    "w": "P(None, 'model')",
}
MODEL_AUTO = ["batch_grad", "per_example_norms", "clipped_grad", "dp_grad"]


def _norm(spec: str) -> str:
    """A spec as printed, without trailing Nones (Auto meshes print P('data',))."""
    while spec.endswith(", None)"):
        spec = spec[: -len(", None)")] + ")"
    return spec.replace("(None)", "()").replace(",)", ")")


def test_inputs_placed_as_users_place_them(user_meshes):
    placed = user_meshes["placements"]
    # A batch whose first leaf is numpy: the rows are sharded as the sharded leaf says.
    assert placed["numpy_first_leaf"] == "P('data',)", placed
    # Training data placed by rows on the Explicit mesh trains as numpy data does.
    assert all(err <= 1e-12 for err in placed["fit_placed_data"].values()), placed
    # shard_batch on a 4 x 2 mesh pads 14 rows to a multiple of the 4 "data" positions.
    assert placed["shard_batch_2d"] == [[16, 5], "P('data',)", 14], placed
    # What cannot run is named, with the fix: a closed-over array on the Explicit mesh, a
    # mask on another device than the parameters.
    assert "pass it as an extra loss argument" in placed["closure"], placed
    assert "argument mask" in placed["mask_on_one_device"], placed


@pytest.fixture(scope="module")
def model_axis(user_meshes):
    return user_meshes["model_axis"]


@pytest.mark.parametrize("mesh, names", [("explicit", ENTRY_POINTS), ("auto", MODEL_AUTO)])
def test_sharded_parameters_equal_one_device(model_axis, mesh, names):
    # Per-example norms are sums of partial squared norms over the model axis (and over the
    # FSDP shards); every result equals the one-device float64 result.
    errors = {k: v for k, v in model_axis["errors"].items() if k.startswith(mesh + "/")}
    assert sorted(errors) == sorted(f"{mesh}/{k}" for k in names)
    bad = {k: v for k, v in errors.items() if not v <= 1e-12}
    assert not bad, bad


def test_gradients_keep_the_parameters_sharding_on_an_explicit_mesh(model_axis):
    for k in ("batch_grad", "clipped_grad", "dp_grad"):
        assert model_axis["specs"][f"explicit/{k}"] == MODEL_SPECS, k


def test_no_full_parameter_or_per_example_array_is_gathered(model_axis):
    # The compiled programs' all-gathers (see tests/_sharding_worker.py `_gathers`): none
    # is a whole parameter (its shape, or as many elements as the FSDP table) and none has
    # the batch's 16 rows (a B x P array of per-example gradients would). Measured: half the
    # FSDP table (2 of its 4 shards, for the embedding lookup) and two 4-element vectors
    # (the first real row's position).
    shapes = [tuple(s) for s in model_axis["param_shapes"].values()]
    table = math.prod(model_axis["param_shapes"]["embed"])  # the FSDP table's elements
    assert len(model_axis["gathers"]) == 5  # 4 entry points on Explicit axes, 1 on Auto
    for name, gathers in model_axis["gathers"].items():
        for g in gathers:
            size = 1
            for v in g:
                size *= v
            assert tuple(g) not in shapes and size < table, (name, g)
            assert not g or g[0] != 16, (name, g)


@pytest.mark.parametrize("mesh", ["explicit", "auto"])
def test_dp_noise_is_drawn_once_for_the_logical_array(model_axis, mesh):
    noise = model_axis["noise"]
    # One device: σC z / B_e for z drawn from the key over the flat leaves (the reference).
    assert noise["one_device_vs_numpy"] <= 1e-12
    # Sharded: bit for bit the one-device numbers, never a draw per shard.
    assert noise[mesh]["exact"], noise
    # And its spread: the std over 1848 values is σC/B_e within 10% (the sample std's
    # relative standard error is 1/√3696 = 1.6%: a false alarm is a 6.1σ event, ~1e-9).
    # Drawn per shard and summed over the 2 model shards it would be √2 larger.
    assert noise[mesh]["size"] == 1848
    assert abs(noise[mesh]["std_ratio"] - 1) < 0.1, noise


@pytest.mark.parametrize("run", ["explicit/plain", "explicit/private", "auto/private"])
def test_fit_with_sharded_parameters_equals_one_device(model_axis, run):
    # The parameters and Adam's two moments keep the parameters' sharding.
    got = model_axis["fit"][run]
    assert got["error"] <= 1e-12, got
    want = [_norm(s) for s in got["want"]]
    assert [[_norm(s) for s in leaves] for leaves in got["specs"]] == [want] * 3, got


def test_one_process_sharded_checkpoint_restores_bit_for_bit(model_axis):
    # fit's orbax checkpoint of the sharded state on one process's 8 devices, read back by a
    # resumed run (nothing left to train): every leaf bit for bit, with its sharding. Across
    # two processes, with interruption and fall-back: tests/test_sharding.py.
    restored = model_axis["fit"]["explicit/plain"]["restored"]
    assert restored["files"] == ["ckpt-0000000002.orbax"], restored
    assert restored["bitwise"], restored
