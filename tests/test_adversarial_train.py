"""A demanding user against the training loop, the data loaders, the checks and the CLIs.

Every numeric result is compared in float64 with an independent reference (a numpy loop of
closed-form gradients, numpy statistics); every bad input must fail with an error that
names the argument (or the command-line flag), what it got and what was expected.
"""

import io
import math
import os
import re
from contextlib import redirect_stderr, redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxgrad
from jaxgrad import check, data, naive
from jaxgrad.bench import __main__ as bench_main
from jaxgrad.train import fit
from jaxgrad.train.__main__ import main as train_main

jax.config.update("jax_enable_x64", True)


# --- the training loop ---------------------------------------------------------------------


def _line_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 2))
    y = x @ np.array([1.0, -2.0]) + 0.5 + 0.1 * rng.normal(size=7)
    loss = lambda p, ex: (ex[0] @ p["w"] + p["b"] - ex[1]) ** 2
    return loss, {"w": jnp.zeros(2), "b": jnp.zeros(())}, (x, y)


def _numpy_multisteps_sgd(x, y, *, lr, every, epochs, batch_size, key):
    """SGD applying the mean of ``every`` consecutive batch gradients, in numpy float64.

    The gradient of the batch mean of (x w + b - y)^2 is the closed form
    (2/n) Σ_i r_i (x_i, 1) over the batch's real rows; the epoch loss is the mean over
    the epoch of each batch's loss weighted by its real examples (the last batch is partial).
    """
    w, b = np.zeros(2), 0.0
    acc_w, acc_b, count = np.zeros(2), 0.0, 0
    history = []
    for epoch in range(epochs):
        idx, mask = (np.asarray(a) for a in data.epoch_indices(key, epoch, len(x), batch_size))
        total, n = 0.0, 0
        for rows, real in zip(idx, mask, strict=True):
            rows = rows[real]
            r = x[rows] @ w + b - y[rows]
            total, n = total + np.sum(r**2), n + len(rows)
            acc_w += 2 * r @ x[rows] / len(rows)
            acc_b += 2 * np.mean(r)
            count += 1
            if count == every:
                w, b = w - lr * acc_w / every, b - lr * acc_b / every
                acc_w, acc_b, count = np.zeros(2), 0.0, 0
        history.append(total / n)
    return w, b, history


@pytest.mark.parametrize("scan", [True, False])
def test_optax_multisteps_trains_like_a_numpy_loop(scan):
    """optax.MultiSteps is no GradientTransformation subclass (it has init and update); the
    step refused it. Its trajectory and the epoch losses (the partial batch kept) against numpy."""
    loss, params, (x, y) = _line_problem()
    key = jax.random.key(4)
    # optax accumulates in float32 unless told otherwise (its default, not jaxgrad's)
    opt = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2, accumulator_dtype=jnp.float64)
    result = fit(
        loss, params, (x, y), optimizer=opt, epochs=3, batch_size=3, key=key, scan=scan, quiet=True
    )
    w, b, history = _numpy_multisteps_sgd(x, y, lr=0.1, every=2, epochs=3, batch_size=3, key=key)
    np.testing.assert_allclose(result.params["w"], w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.params["b"], b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose([h["loss"] for h in result.history], history, rtol=1e-12)
    assert int(result.state.step) == 9  # 3 epochs of ceil(7 / 3) = 3 batches


def test_a_strategy_that_is_not_a_gradient_is_named():
    """per_example_grads gives a (B, ...) stack, not a step's gradient: it used to fail deep in
    optax with 'Incompatible shapes for broadcasting'."""
    loss, params, train = _line_problem()
    with pytest.raises(ValueError, match=r"`strategy` \(per_example_grads\) must give one grad"):
        fit(
            loss,
            params,
            train,
            optimizer=optax.sgd(0.1),
            epochs=1,
            batch_size=3,
            key=jax.random.key(0),
            strategy=jaxgrad.per_example_grads,
            quiet=True,
        )


@pytest.mark.parametrize(
    "evaluate, error, message",
    [
        (lambda p: 3.0, TypeError, r"`evaluate` must return a mapping .* got a float"),
        (lambda p: {"loss": 1.0}, ValueError, r"metric named 'loss', which the epoch record"),
        (lambda p: {"acc": "high"}, TypeError, r"`evaluate` metric 'acc' must be one number"),
        ("accuracy", TypeError, r"`evaluate` must be a function"),
    ],
)
def test_evaluate_output_is_checked(evaluate, error, message):
    """An evaluate returning {"loss": ...} silently replaced the epoch's training loss."""
    loss, params, train = _line_problem()
    with pytest.raises(error, match=message):
        fit(
            loss,
            params,
            train,
            optimizer=optax.sgd(0.1),
            epochs=1,
            batch_size=3,
            key=jax.random.key(0),
            evaluate=evaluate,
            quiet=True,
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"resume": "no"}, r"`resume` must be True or False; got 'no'"),
        ({"quiet": "no"}, r"`quiet` must be True or False; got 'no'"),
        ({"checkpoint_every": 2}, r"`checkpoint_every` \(2\) needs `checkpoint_dir`"),
        ({"keep": 5}, r"`keep` \(5\) needs `checkpoint_dir`"),
        (
            {"resume": False, "keep": 2},
            r"`keep` \(2\) and `resume` \(False\) need `checkpoint_dir`",
        ),
        ({"checkpoint_every": 0}, r"`checkpoint_every` must be a positive integer; got 0"),
    ],
)
def test_fit_switches_that_were_silently_ignored(kwargs, message):
    loss, params, train = _line_problem()
    kwargs = {"quiet": True, **kwargs}
    with pytest.raises(ValueError, match=message):
        fit(
            loss,
            params,
            train,
            optimizer=optax.sgd(0.1),
            epochs=1,
            batch_size=3,
            key=jax.random.key(0),
            **kwargs,
        )


def test_resuming_a_checkpoint_past_the_requested_epochs_is_refused(tmp_path):
    """fit(epochs=1) on a directory holding epoch 3's checkpoint returned the epoch-3
    parameters and three epochs of history: more training than asked for, silently. (The
    DP loop already refused it: its plan, and so its config, depends on the epochs.)"""
    from jaxgrad.train import CheckpointError

    loss, params, train = _line_problem()
    run = lambda epochs: fit(
        loss,
        params,
        train,
        optimizer=optax.sgd(0.1),
        epochs=epochs,
        batch_size=3,
        key=jax.random.key(0),
        checkpoint_dir=tmp_path,
        quiet=True,
    )
    done = run(3)
    with pytest.raises(CheckpointError, match=r"after epoch 3, past this run's `epochs` \(1\)"):
        run(1)
    again = run(3)  # the same request resumes at its end: the same result, no more steps
    assert int(again.state.step) == int(done.state.step)
    np.testing.assert_array_equal(again.params["w"], done.params["w"])


def test_evaluator_r2_for_several_outputs_and_undefined_r2():
    """Two regression outputs failed with a reshape error (predictions were summed per
    example); a split of one example gave R² = -inf where it is undefined (NaN)."""
    from jaxgrad.train import evaluator

    rng = np.random.default_rng(0)
    x, y, w = rng.normal(size=(6, 3)), rng.normal(size=(6, 2)), rng.normal(size=(3, 2))
    apply = lambda p, xi: xi @ p
    loss = jaxgrad.losses.supervised(apply, jaxgrad.losses.squared_error)
    got = evaluator(apply, loss, {"a": (x, y), "one": (x[:1], y[:1])}, task="regression")(w)
    residual = np.sum((y - x @ w) ** 2)
    np.testing.assert_allclose(got["a_r2"], 1 - residual / np.sum((y - y.mean(0)) ** 2))
    np.testing.assert_allclose(got["a_loss"], residual / 6)
    assert math.isnan(got["one_r2"])
    with pytest.raises(ValueError, match=r"`chunk_size` must be a positive integer; got 0"):
        evaluator(apply, loss, {"a": (x, y)}, task="regression", chunk_size=0)


@pytest.mark.parametrize("scan", [True, False])
def test_nan_in_the_data_names_the_step_of_its_batch_and_the_row(scan):
    """A NaN input stops training at the first batch holding it; the error said only "lower
    the learning rate or check the data"."""
    from jaxgrad.train import NonFiniteLossError

    loss, params, (x, y) = _line_problem()
    x = x.copy()
    x[5, 1] = np.nan
    key = jax.random.key(2)
    idx, mask = (np.asarray(a) for a in data.epoch_indices(key, 0, len(x), 3))
    batch = next(b for b in range(len(idx)) if 5 in idx[b][mask[b]])
    with pytest.raises(NonFiniteLossError, match=r"non-finite data in rows 5 of `train_data`"):
        try:
            fit(
                loss,
                params,
                (x, y),
                optimizer=optax.sgd(0.1),
                epochs=1,
                batch_size=3,
                key=key,
                scan=scan,
                quiet=True,
            )
        except NonFiniteLossError as e:
            assert e.step == batch + 1
            raise


# --- strategies ----------------------------------------------------------------------------


def test_backprop_mean_error_names_a_non_pair_batch_under_jit():
    apply = lambda p, x: jnp.tanh(x @ p)
    out_loss = lambda o, t: jnp.sum((o - t) ** 2)
    f = jax.jit(naive.backprop_mean_error(apply, out_loss))
    with pytest.raises(TypeError, match=r"`batch` must be a pair \(inputs, targets\); got a dict"):
        f(jnp.ones((3, 2)), {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 2))})


@pytest.mark.parametrize(
    "mask, error, message",
    [
        (np.array([1, 0, 1]), TypeError, r"got dtype int64; a 0/1 mask is mask\.astype\(bool\)"),
        (np.array([1.0, 0.5, 1.0]), TypeError, r"got dtype float64; a 0/1 mask"),
        (np.ones((3, 1), bool), ValueError, r"`mask` must have shape \(3,\) .* got \(3, 1\)"),
    ],
)
def test_a_mask_that_is_not_a_boolean_vector_is_named(mask, error, message):
    f = jaxgrad.accumulate_grad(lambda p, x: p * x, num_microbatches=2)
    with pytest.raises(error, match=message):
        f(1.0, jnp.ones(3), mask)


@pytest.mark.parametrize("unroll", ["a", 2.5, -1, None])
def test_accumulate_grad_names_a_bad_unroll(unroll):
    loss = lambda p, ex: p * ex
    with pytest.raises(ValueError, match=r"`unroll` must be 'auto', True, False or an integer"):
        jaxgrad.accumulate_grad(loss, num_microbatches=2, unroll=unroll)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_mean_of_microbatch_means_contiguous_against_numpy(k):
    """K = 2, 3 do not divide B = 5 and K = 7 exceeds it: contiguous microbatches of
    ceil(B/K) rows, the empty ones left out; the gradient of θ x² per example is x²."""
    x = np.array([0.5, -1.0, 2.0, 1.5, 3.0])
    got = naive.mean_of_microbatch_means(lambda t, xi: t * xi**2, num_microbatches=k)(
        1.0, jnp.asarray(x)
    )
    per = -(-len(x) // k)
    means = [np.mean(x[i : i + per] ** 2) for i in range(0, len(x), per)]
    np.testing.assert_allclose(float(got.grads), np.mean(means), rtol=1e-14)


# --- check ---------------------------------------------------------------------------------


def _numpy_diff(a, b):
    """max |a - b|, and relative to max(|a|, |b|), for finite numpy vectors."""
    d = np.abs(a - b)
    return d.max(), d.max() / max(np.abs(a).max(), np.abs(b).max())


def test_tree_diff_non_finite_complex_empty_and_keys():
    nan, inf = np.nan, np.inf
    # Matching NaN and equal infinities are equal (as in assert_equivalent) and left out;
    # the finite entries' difference is what remains. inf vs inf used to give NaN.
    got = check.tree_diff(jnp.array([nan, inf, 1.0, 2.0]), jnp.array([nan, inf, 1.5, 2.0]))
    want_abs, want_rel = _numpy_diff(np.array([1.0, 2.0]), np.array([1.5, 2.0]))
    np.testing.assert_allclose(got[:2], (want_abs, want_rel), rtol=1e-15)
    assert math.isnan(check.tree_diff(jnp.array([nan]), jnp.array([1.0]))[0])
    assert check.tree_diff(jnp.array([inf]), jnp.array([-inf]))[0] == inf
    # complex: |1j - 0| = 1 (the imaginary part used to be dropped: 0)
    a, b = np.array([1j, 2.0 + 0j]), np.array([0j, 2.0 + 0j])
    got = check.tree_diff(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(got[:2], _numpy_diff(a, b), rtol=1e-15)
    assert check.tree_diff({}, {}) == (0.0, 0.0, 0.0)
    k0, k1 = jax.random.key(0), jax.random.key(1)
    assert check.tree_diff(k0, k0)[0] == 0.0 and check.tree_diff(k0, k1)[0] > 0


@pytest.mark.parametrize("tol", [-1e-6, float("nan"), float("inf"), "1e-3"])
@pytest.mark.parametrize("name", ["rtol", "atol"])
def test_assert_equivalent_refuses_meaningless_tolerances(name, tol):
    """A negative or NaN tolerance failed every comparison with chex's message; inf passed all."""
    with pytest.raises(ValueError, match=f"`{name}` must be"):
        check.assert_equivalent(jnp.ones(2), jnp.ones(2), **{name: tol})


def test_assert_equivalent_compares_integer_leaves_exactly():
    """1000000 and 1000001 passed as equivalent (rtol 1e-5 of an integer leaf)."""
    with pytest.raises(AssertionError, match=r"integer leaf \['n'\] differs .* 1000000 vs"):
        check.assert_equivalent({"n": jnp.array([1000000])}, {"n": jnp.array([1000001])})
    check.assert_equivalent(
        {"n": jnp.array([3]), "m": jnp.array([True])}, {"n": jnp.array([3]), "m": jnp.array([True])}
    )


def test_assert_equivalent_integer_leaves_keep_float64_tolerances():
    """An int leaf beside float64 ones loosened the defaults to float32's 1e-5."""
    a = {"g": jnp.array([1.0]), "n": jnp.array([3])}
    b = {"g": jnp.array([1.0 + 1e-7]), "n": jnp.array([3])}
    with pytest.raises(AssertionError):
        check.assert_equivalent(a, b)


# --- data ----------------------------------------------------------------------------------


def test_regression_targets_with_a_large_offset_keep_their_spread_in_float32():
    """Cast to float32 before standardising, 1e8 + N(0, 1) targets were rounded to multiples
    of 8 (float32's spacing at 1e8): the signal was gone."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 2)), 1e8 + rng.normal(size=40)
    ds = data.from_arrays(x, y, dtype=np.float32)
    _, y_train, _, y_test = data.train_test_split(x, y)
    mean, std = y_train.mean(), y_train.std()
    np.testing.assert_allclose(ds.y_train, (y_train - mean) / std, atol=1e-6)
    np.testing.assert_allclose(ds.y_test, (y_test - mean) / std, atol=1e-6)


def test_tiny_magnitude_feature_is_standardised_and_constant_columns_centred():
    """A feature of spread 1e-13 was taken for a constant column (absolute 1e-12 threshold)."""
    rng = np.random.default_rng(2)
    x = np.c_[1e-13 * rng.normal(size=30), np.full(30, 7.0), rng.normal(size=30)]
    ds = data.from_arrays(x, np.arange(30) % 2, dtype=np.float64)
    x_train, *_ = data.train_test_split(x, np.arange(30) % 2)
    np.testing.assert_allclose(
        ds.x_train[:, 0], (x_train[:, 0] - x_train[:, 0].mean()) / x_train[:, 0].std(), rtol=1e-9
    )
    np.testing.assert_array_equal(ds.x_train[:, 1], 0.0)
    assert ds.x_scale[1] == 1.0


def test_boolean_labels_are_two_classes():
    """Boolean y was taken for regression targets (standardised 0/1 floats)."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(20, 2)), rng.normal(size=20) > 0
    ds = data.from_arrays(x, y)
    _, y_train, _, y_test = data.train_test_split(x, y)
    assert ds.task == "classification" and ds.num_classes == 2
    np.testing.assert_array_equal(ds.y_train, y_train.astype(int))
    np.testing.assert_array_equal(ds.y_test, y_test.astype(int))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_classes": 2.5}, ValueError, r"`num_classes` must be a positive integer; got 2\.5"),
        ({"num_classes": 0}, ValueError, r"`num_classes` must be a positive integer; got 0"),
        ({"num_classes": True}, ValueError, r"`num_classes` must be a positive integer; got True"),
        ({"y": np.linspace(0, 1, 20), "num_classes": 3}, ValueError, r"`num_classes` \(3\) is for"),
        ({"x": np.ones((20, 2)) + 1j}, TypeError, r"`x` must hold real numbers .* complex128"),
        ({"x": np.full((20, 2), "a")}, TypeError, r"`x` must hold real numbers .* <U1"),
        ({"y": np.full(20, "cat")}, TypeError, r"`y` must hold real numbers"),
        ({"seed": -1}, ValueError, r"`seed` must be a non-negative integer; got -1"),
        ({"seed": "a"}, ValueError, r"`seed` must be an integer"),
        ({"y": np.full(20, 2**40)}, ValueError, r"labels are stored as int32"),
        (
            {"x": np.full((20, 2), 1e6), "dtype": np.float16, "standardize": False},
            ValueError,
            r"`x` overflows `dtype` float16",
        ),
    ],
)
def test_from_arrays_bad_input_is_named(kwargs, error, message):
    args = {"x": np.random.default_rng(0).normal(size=(20, 2)), "y": np.arange(20) % 3, **kwargs}
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(error, match=message):
        data.from_arrays(x, y, **args)


@pytest.mark.parametrize("loader", ["load_npz", "load_rows"])
def test_both_file_loaders_apply_the_same_rules(tmp_path, loader):
    """load_rows (memory-mapped, for several hosts) inferred the task on its own: boolean
    labels were regression, complex inputs lost their imaginary part, num_classes was
    ignored for float targets."""
    load = (
        (lambda p, **kw: data.load_rows("npz", p, **kw)) if loader == "load_rows" else data.load_npz
    )
    rng = np.random.default_rng(5)
    x = rng.normal(size=(10, 2))
    np.savez(tmp_path / "bool.npz", x=x, y=x[:, 0] > 0)
    ds = load(tmp_path / "bool.npz")
    _, y_train, _, _ = data.train_test_split(x, x[:, 0] > 0)
    assert ds.task == "classification" and ds.num_classes == 2
    np.testing.assert_array_equal(ds.y_train, y_train.astype(int))
    np.savez(tmp_path / "complex.npz", x=x + 1j, y=np.arange(10) % 2)
    with pytest.raises(TypeError, match=r"`x` must hold real numbers .* complex128"):
        load(tmp_path / "complex.npz")
    np.savez(tmp_path / "float.npz", x=x, y=rng.normal(size=10))
    with pytest.raises(ValueError, match=r"`num_classes` \(3\) is for classification"):
        load(tmp_path / "float.npz", num_classes=3)
    with pytest.raises(ValueError, match=r"`seed` must be a non-negative integer"):
        load(tmp_path / "float.npz", seed=-2)


def test_batching_sizes_are_checked():
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer; got 0"):
        data.num_batches(5, 0)
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer; got -2"):
        data.num_batches(5, -2)  # was -2 batches
    with pytest.raises(ValueError, match=r"`num_examples` must be a positive integer; got 0"):
        data.epoch_indices(jax.random.key(0), 0, 0, 2)
    with pytest.raises(TypeError, match=r"`key` must be one PRNG key.*an int is a seed"):
        data.epoch_indices(0, 0, 10, 4)  # was JAX's "invalid PRNG key data"
    for bad in (-1, 2**32):  # was an OverflowError from fold_in's uint32
        with pytest.raises(
            ValueError, match=rf"`epoch` must be an integer in \[0, 2\*\*32\); got {bad}"
        ):
            data.epoch_indices(jax.random.key(0), bad, 10, 4)
    with pytest.raises(ValueError, match=r"`epoch` must be an integer \(a scalar\); got 1.5"):
        data.epoch_indices(jax.random.key(0), 1.5, 10, 4)


# --- command lines -------------------------------------------------------------------------


def _exit_code_and_error(main, argv):
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "-1"], r"--seed must be an integer in \[0, 4294967295\]; got -1"),
        (["--seed", str(2**70)], r"--seed must be an integer in \[0, 4294967295\]"),  # traceback
        (["--data", "digits", "--test-fraction", "1.5"], r"--test-fraction must be a number"),
        (["--data", "mnist1d", "--num-examples", "0"], r"--num-examples must be an integer"),
        (["--strategy", "accumulate", "--microbatches", "0"], r"--microbatches must be a"),
        (["--strategy", "per-example", "--chunk-size", "0"], r"--chunk-size must be a"),
        (["--checkpoint-every", "3"], r"--checkpoint-every 3 needs --checkpoint-dir"),
        (["--chunk-size", "4"], r"--chunk-size is for --strategy per-example; got --strategy b"),
        (["--microbatches", "2"], r"--microbatches is for --strategy accumulate"),
        (["--clip", "2"], r"--clip is for --strategy clipped"),
        (
            ["--process-id", "-1", "--num-processes", "1", "--coordinator", "localhost:1"],
            r"--process-id must be an integer in \[0, 1\) \(--num-processes\)",
        ),
    ],
)
def test_train_cli_bad_values_exit_2_naming_the_flag(argv, message):
    argv = ["--epochs", "1", "--quiet", *argv]
    if "--data" not in argv:
        argv = ["--data", "line", *argv]
    code, err = _exit_code_and_error(train_main, argv)
    assert code == 2 and "Traceback" not in err, err
    assert re.search(message, err), err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--min-seconds", "-1"], r"--min-seconds must be a non-negative finite number"),
        (["--min-seconds", "inf"], r"--min-seconds must be a non-negative finite number"),
        (["--devices", "0"], r"--devices must be positive integers"),  # said --batch-sizes
        (["--dp", "--markdown", "x.md"], r"--markdown: not for --dp"),  # wrote nothing
        (["--dp", "--strategies", "batch_grad"], r"--strategies: not for --dp"),
        (["--peers", "--threads", "0"], r"--threads must be a positive integer"),  # exit 1
        (["--peers", "--min-time", "nan"], r"--min-time must be a non-negative finite"),
        (["--peers", "--time-cap-s", "-3"], r"--time-cap-s must be a positive finite"),
        (["--peers", "--warmup", "-1"], r"--warmup must be a non-negative integer"),
        (["--sweep", "--dp"], r"--dp and --sweep are different modes .*give one of them"),
        (["--dp", "--peers", "--sweep"], r"--dp and --peers and --sweep are different modes"),
        # A flag of the other mode names both (argparse said "unrecognized arguments").
        (["--peers", "--rounds", "3"], r"--rounds is for the benchmark suite .*not for --peers"),
        (["--sweep", "--strategies=x"], r"--strategies is for the benchmark suite .*--sweep"),
        (["--methods", "opacus"], r"--methods is for --peers or --sweep, not for the benchmark"),
    ],
)
def test_bench_cli_bad_values_exit_2_naming_the_flag(argv, message):
    code, err = _exit_code_and_error(bench_main.main, argv)
    assert code == 2 and "Traceback" not in err, err
    assert re.search(message, err), err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", str(2**70)], r"--seed must be an integer in \[0, 2\*\*63 - 1\]"),  # traceback
        (["--seed", "-3"], r"--seed must be an integer in"),
        (
            ["--json", "/nonexistent-dir/x.json"],
            r"--json '/nonexistent-dir/x.json': the directory '/nonexistent-dir' does not exist",
        ),
        (  # a path under a file: the file is the problem, not a missing directory
            ["--json", os.path.join(__file__, "x.json")],
            r"--json '[^']*x\.json': '[^']*test_adversarial_train\.py' is a file, not a directory",
        ),
    ],
)
def test_seed_cli_bad_values_exit_2_before_computing(argv, message):
    from jaxgrad.seed import main as seed_main

    code, err = _exit_code_and_error(seed_main, argv)
    assert code == 2 and "Traceback" not in err, err
    assert re.search(message, err), err
