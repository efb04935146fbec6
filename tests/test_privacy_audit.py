"""The one-run privacy audit (jaxgrad.privacy.audit): the bound, the canaries, and audits of the
library's DP training paths — correct ones stay below their claim, broken copies exceed it.

How the end-to-end audits are sized. Every run has m = 1000 Dirac canaries on a linear model
with P = 1001 coordinates, r = 200 guesses, a claim of ε = 2 at δ = 1e-5, confidence 95%.
With all 200 guesses right the bound can reach 4.17 (``log(p/(1−p))``, ``p = 0.05^(1/200)``,
less a little for δ), and ``ε_lower ≥ 2`` needs ``v ≥ 185`` correct guesses. A canary's score
is (up to the learning rate and 1/B_e) ``C K_k + N(0, T σ² C²)`` with ``K_k ~ Bin(T, q)`` if
included and 0 if not, plus the real rows' pull on its coordinate, which is made small (the
real rows' gradients have norm about 0.1 C). Simulating exactly that score model 20 000 times:

* correct runs (q = 1, T = 10, σ = 6.30; q = 0.5, T = 20, σ = 4.67): v has mean 142 and
  standard deviation 6.5, maximum 165: reaching 185 is 6.7 standard deviations out, a
  false-alarm probability of about 1e-11 over random seeds (normal approximation);
* σ/10 (10× too little noise): v = 200 in every draw (minimum 198 for q = 0.5), far above
  185; the other broken copies (sensitivity 100 C, noise for the mean, a public key) give the
  canaries an even larger signal, so a missed detection is less likely still.

The real rows' pull only adds noise to the scores, which lowers v, so it cannot raise the
false-alarm rate; every run is seeded, hence deterministic.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
import scipy.stats
from helpers import private_key

import jaxgrad
from jaxgrad import privacy
from jaxgrad.privacy import audit

ROOT = Path(__file__).parents[1]
DELTA = 1e-5
M, R = 1000, 200
CLIP = 1.0
TARGET = 2.0


# --------------------------------------------------------------------------------------------
# The bound against an independent SciPy computation
# --------------------------------------------------------------------------------------------


def scipy_p_value(m, r, v, eps, delta):
    """The paper's p-value, term by term with scipy.stats.binom (no log space).

    The terms ``i = 1..v`` of the max in one call of binom.cdf over an array of ``i`` (the
    same values as one call per ``i``; brentq evaluates this some 40 times, with v up to 700).
    """
    p = math.exp(eps) / (1 + math.exp(eps))
    beta = scipy.stats.binom.sf(v - 1, r, p)  # P[Bin >= v]
    i = np.arange(1, v + 1)
    terms = (scipy.stats.binom.cdf(v - 1, r, p) - scipy.stats.binom.cdf(v - i - 1, r, p)) / i
    alpha = float(terms.max()) if v else 0.0
    return min(1.0, beta + 2 * m * delta * alpha)


def scipy_epsilon(m, r, v, delta, confidence):
    """The sup by SciPy's brentq on the same p-value (an independent root finder)."""
    alpha = 1 - confidence
    if scipy_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    hi = 1.0
    while scipy_p_value(m, r, v, hi, delta) < alpha:
        hi *= 2
    return scipy.optimize.brentq(
        lambda e: scipy_p_value(m, r, v, e, delta) - alpha, 0.0, hi, xtol=1e-10
    )


GRID = [
    (1000, 200, 200, 1e-5, 0.95),
    (1000, 200, 185, 1e-5, 0.95),
    (1000, 200, 150, 1e-5, 0.95),
    (1000, 100, 90, 0.0, 0.95),
    (2000, 1000, 700, 1e-5, 0.99),
    (50, 20, 17, 1e-3, 0.9),
    (10, 10, 10, 0.0, 0.5),
    (5000, 60, 60, 1e-6, 0.95),
]


@pytest.mark.parametrize("m, r, v, delta, confidence", GRID)
def test_one_run_epsilon_matches_scipy(m, r, v, delta, confidence):
    eps = audit.one_run_epsilon(
        num_canaries=m, num_guesses=r, num_correct=v, delta=delta, confidence=confidence
    )
    assert eps > 0
    alpha = 1 - confidence
    # The returned value is rejected, and rejected no more 1e-6 above it (the stated tolerance).
    assert scipy_p_value(m, r, v, eps, delta) < alpha
    assert scipy_p_value(m, r, v, eps + 2 * audit.EPSILON_TOL, delta) >= alpha
    assert eps == pytest.approx(scipy_epsilon(m, r, v, delta, confidence), abs=2e-6)
    for e in (0.0, 0.5 * eps, eps, 3.0):
        got = audit.one_run_p_value(
            num_canaries=m, num_guesses=r, num_correct=v, epsilon=e, delta=delta
        )
        assert got == pytest.approx(scipy_p_value(m, r, v, e, delta), rel=1e-9, abs=1e-300)


def test_one_run_epsilon_all_correct_is_the_closed_form_without_delta():
    for r in (20, 100, 1000):
        p = 0.05 ** (1 / r)
        got = audit.one_run_epsilon(num_canaries=r, num_guesses=r, num_correct=r, delta=0.0)
        assert got == pytest.approx(math.log(p / (1 - p)), abs=2e-6)


def test_one_run_epsilon_is_monotone_in_v_and_zero_near_chance():
    eps = [
        audit.one_run_epsilon(num_canaries=M, num_guesses=R, num_correct=v, delta=DELTA)
        for v in range(0, R + 1, 5)
    ]
    assert all(a <= b for a, b in itertools.pairwise(eps))
    assert eps[-1] > 4
    # Chance level (v ≈ r/2) and a little above it reject nothing.
    for v in (0, 50, 100, 110):
        assert audit.one_run_epsilon(num_canaries=M, num_guesses=R, num_correct=v, delta=DELTA) == 0
    assert audit.one_run_epsilon(num_canaries=M, num_guesses=0, num_correct=0, delta=DELTA) == 0
    # More δ, a larger (m δ) term: a weaker bound.
    weak = audit.one_run_epsilon(num_canaries=M, num_guesses=R, num_correct=R, delta=1e-3)
    assert weak < eps[-1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_canaries=0), "num_canaries"),
        (dict(num_canaries=10.0), "num_canaries"),
        (dict(num_guesses=11), r"num_guesses.*≤ num_canaries \(10\)"),
        (dict(num_guesses=-1), "num_guesses"),
        (dict(num_correct=6), r"num_correct.*≤ num_guesses \(5\)"),
        (dict(num_correct=True), "num_correct"),
        (dict(delta=1.0), r"delta.*\[0, 1\)"),
        (dict(delta=-1e-9), "delta"),
        (dict(delta="0"), "delta"),
        (dict(confidence=1.0), r"confidence.*\(0, 1\)"),
        (dict(confidence=0.0), "confidence"),
    ],
)
def test_one_run_epsilon_argument_errors(kwargs, match):
    args = dict(num_canaries=10, num_guesses=5, num_correct=3, delta=1e-5, confidence=0.95)
    with pytest.raises(ValueError, match=match):
        audit.one_run_epsilon(**{**args, **kwargs})


# --------------------------------------------------------------------------------------------
# The canaries
# --------------------------------------------------------------------------------------------


def mlp_loss(p, ex):
    x, y = ex
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.sum((h @ p["w2"] - y) ** 2), jnp.float64(3.0)  # a (sum, count) pair


def test_canary_gradients_are_dirac_on_every_path():
    """grad, vmap(grad) and the fast clipped sum agree on a mixed batch (float64)."""
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": jax.random.normal(k[0], (6, 8)),
        "b1": jnp.zeros(8),
        "w2": jax.random.normal(k[1], (8, 3)),
    }
    clip = 0.7
    c = audit.dirac_canaries(params, num_canaries=30, l2_clip=clip, key=k[2])
    assert c.num_canaries == 30 and len(set(c.coordinates.tolist())) == 30
    data = (jax.random.normal(k[3], (10, 6)), jnp.ones((10, 3)))
    rows, ids = audit.insert(data, c)
    n_in = int(c.included.sum())
    assert ids.tolist() == [-1] * 10 + np.flatnonzero(c.included).tolist()
    assert rows[0].shape == (10 + n_in, 6)
    loss = audit.with_canaries(mlp_loss, c)
    # One example at a time: a canary row's gradient is C e_j, a real row's the user's.
    flat = lambda tree: jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])
    # One example at a time (a jitted function of the row index, so one compilation).
    take = lambda i: (jax.tree_util.tree_map(lambda a: a[i], rows), ids[i])
    one = jax.jit(lambda p, i: (flat(jax.grad(lambda q: loss(q, take(i))[0])(p)), loss(p, take(i))))
    user = jax.jit(lambda p, i: flat(jax.grad(lambda q: mlp_loss(q, take(i)[0])[0])(p)))
    for i in range(rows[0].shape[0]):
        g, value = one(params, i)
        if int(ids[i]) < 0:
            np.testing.assert_allclose(g, user(params, i), rtol=1e-14)
            assert value[1] == 3.0
        else:
            want = np.zeros(g.shape)
            want[c.coordinates[int(ids[i])]] = clip
            np.testing.assert_array_equal(g, want)
            assert (float(value[0]), float(value[1])) == (0.0, 0.0)  # no loss, no items
    # The fast clipped sum against vmap(grad) + clip.
    per_example = jax.vmap(jax.grad(lambda p, e: loss(p, e)[0]), in_axes=(None, 0))
    per = jax.jit(lambda p, b: jax.vmap(flat)(per_example(p, b)))(params, (rows, ids))
    norms = jnp.linalg.norm(per, axis=1)
    np.testing.assert_allclose(norms[10:], clip, rtol=1e-15)
    ref = jnp.sum(per * jnp.minimum(1, clip / norms)[:, None], axis=0)
    fast = jaxgrad.clipped_grad(loss, l2_clip=clip, reduction="sum")(params, (rows, ids))
    np.testing.assert_allclose(flat(fast), ref, rtol=1e-12, atol=1e-14)


def test_score_and_guess():
    params = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
    c = audit.Canaries(np.array([7, 0, 5, 9]), np.array([True, False, True, False]), 1.0)
    after = {"a": -jnp.arange(6.0).reshape(2, 3), "b": jnp.array([0.0, 2.0, 0.0, -3.0])}
    s = audit.score(params, after, c)
    np.testing.assert_array_equal(s, [-2.0, 0.0, 5.0, 3.0])  # b[1], a[0,0], a[1,2], b[3]
    g = audit.guess(s, c, num_guesses=3)
    assert g.guesses.tolist() == [-1, 0, 1, 1] and (g.num_guesses, g.num_correct) == (3, 1)
    assert audit.guess(s, c, num_guesses=0).num_correct == 0
    with pytest.raises(ValueError, match="num_guesses"):
        audit.guess(s, c, num_guesses=5)
    with pytest.raises(ValueError, match=r"scores.*\(4,\)"):
        audit.guess(s[:3], c, num_guesses=2)
    with pytest.raises(ValueError, match="finite"):
        audit.guess(np.array([np.nan, 0, 0, 0]), c, num_guesses=2)
    with pytest.raises(ValueError, match="same tree structure"):
        audit.score(params, {"a": after["a"]}, c)


def test_canary_argument_errors():
    params = {"w": jnp.zeros(5)}
    with pytest.raises(ValueError, match=r"num_canaries.*\(6\).*at most 5"):
        audit.dirac_canaries(params, num_canaries=6, l2_clip=1.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="l2_clip"):
        audit.dirac_canaries(params, num_canaries=2, l2_clip=0.0, key=jax.random.key(0))
    with pytest.raises(TypeError, match="key"):
        audit.dirac_canaries(params, num_canaries=2, l2_clip=1.0, key=0)
    with pytest.raises(TypeError, match="Canaries"):
        audit.with_canaries(lambda p, x: x, (np.array([0]), np.array([True]), 1.0))
    c = audit.dirac_canaries(params, num_canaries=2, l2_clip=1.0, key=jax.random.key(0))
    three = {"a": jnp.zeros(5), "b": jnp.zeros((1, 3)), "c": jnp.zeros(4)}
    only = {"a": False, "b": True, "c": True}
    c7 = audit.dirac_canaries(
        three, num_canaries=7, l2_clip=1.0, key=jax.random.key(0), leaves=only
    )
    assert sorted(c7.coordinates.tolist()) == list(range(5, 12))  # all of b and c, none of a
    with pytest.raises(ValueError, match=r"num_canaries.*\(8\).*`leaves`'.*7"):
        audit.dirac_canaries(three, num_canaries=8, l2_clip=1.0, key=jax.random.key(0), leaves=only)
    with pytest.raises(ValueError, match="leaves"):
        audit.dirac_canaries(
            three, num_canaries=1, l2_clip=1.0, key=jax.random.key(0), leaves={"a": 1}
        )
    with pytest.raises(ValueError, match="dirac_canaries"):  # canaries for other params
        audit.with_canaries(lambda p, x: jnp.sum(p["w"]), c)({"w": jnp.zeros(1)}, (0, 0))
    with pytest.raises(TypeError, match=r"\(example, canary_id\)"):
        audit.with_canaries(lambda p, x: jnp.sum(p["w"] * x), c)(params, jnp.ones(5))
    bits = audit.dirac_canaries(
        {"w": jnp.zeros(4000)}, num_canaries=4000, l2_clip=1.0, key=jax.random.key(1)
    ).included
    # Fair coins: |mean − ½| < 5.3 standard deviations (false alarm < 1e-7).
    assert abs(bits.mean() - 0.5) < 5.3 * math.sqrt(0.25 / bits.size)


# --------------------------------------------------------------------------------------------
# End-to-end audits of the training paths
# --------------------------------------------------------------------------------------------

N_REAL = 300


def linear_loss(p, ex):
    x, y = ex
    return (jnp.dot(x, p["w"]) + p["b"] - y) ** 2


def real_data():
    kx, ky = jax.random.split(jax.random.key(42))
    x = jax.random.normal(kx, (N_REAL, M)) / math.sqrt(M)  # |x| ≈ 1
    y = 0.05 * jax.random.normal(ky, (N_REAL,))  # small residuals: gradients ≈ 0.1 C
    return x, y


PARAMS = {"w": jnp.zeros(M), "b": jnp.zeros(())}  # P = 1001 coordinates


def null_canaries(loss_fn):
    """The adversary's reproduction of the run without canaries: canary rows, zero gradient."""

    def loss(p, ex):
        x, cid = ex
        return jnp.where(cid >= 0, 0.0, loss_fn(p, x))

    return loss


def hand_loop(grad_fn, steps, *, lr=1.0, key_fn):
    """``train(loss_fn, params, data)``: SGD on ``grad_fn(loss_fn, data)(params, key_t)``."""

    def train(loss_fn, params, data):
        g = grad_fn(loss_fn, data)
        for t in range(steps):
            grads = g(params, key_fn(t))
            params = jax.tree_util.tree_map(lambda a, b: a - lr * b, params, grads)
        return params

    return train


def run_audit(train, *, clip=CLIP, seed=0):
    """``audit.audit`` of ``train`` on the linear problem (m = 1000, r = 200)."""
    return audit.audit(
        train,
        PARAMS,
        real_data(),
        linear_loss,
        l2_clip=clip,
        num_canaries=M,
        num_guesses=R,
        delta=DELTA,
        key=jax.random.key(1000 + seed),
    )


def audit_against_rerun(train, reference_train, *, seed=0):
    """The audit's pieces by hand, scored against ``reference_train``'s canary-free rerun."""
    c = audit.dirac_canaries(PARAMS, num_canaries=M, l2_clip=CLIP, key=jax.random.key(seed))
    rows = audit.insert(real_data(), c)
    trained = train(audit.with_canaries(linear_loss, c), PARAMS, rows)
    reference = reference_train(null_canaries(linear_loss), PARAMS, rows)
    g = audit.guess(audit.score(reference, trained, c), c, num_guesses=R)
    return audit.one_run_epsilon(
        num_canaries=M, num_guesses=R, num_correct=g.num_correct, delta=DELTA
    )


# Memoised: two tests audit the same (q, T) = (1, 10) setting, and a calibration by
# dp-accounting costs seconds; the value is a pure function of its arguments.
@functools.cache
def sigma_for(q, steps):
    return privacy.calibrate_noise_multiplier(
        target_epsilon=TARGET, delta=DELTA, sampling_rate=q, steps=steps
    )


@functools.cache
def claimed(sigma, q, steps):
    return privacy.epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=DELTA)


def secret_key(t):
    return jax.random.fold_in(jax.random.key(987654321), t)  # unknown to the adversary


FULL_STEPS = 10  # q = 1: dp_grad on the whole (augmented) data set each step


def full_batch(grad_maker):
    """A dp_grad-like ``f(params, batch, mask, key)`` over all rows, as ``g(params, key)``."""

    def grad_fn(loss_fn, data):
        f = grad_maker(loss_fn, data)
        return lambda p, k: f(p, data, None, k)

    return grad_fn


def test_dp_grad_full_batch_audit_stays_below_claim_and_broken_copies_exceed_it():
    sigma = sigma_for(1.0, FULL_STEPS)
    claim = claimed(sigma, 1.0, FULL_STEPS)
    assert claim == pytest.approx(TARGET, rel=1e-2)

    def dp(*, clip=CLIP, noise=sigma):
        return full_batch(
            lambda loss_fn, d: privacy.dp_grad(
                loss_fn,
                l2_clip=clip,
                noise_multiplier=noise,
                expected_batch_size=reduce_rows(d),
            )
        )

    correct = run_audit(hand_loop(dp(), FULL_STEPS, key_fn=secret_key))
    assert correct.epsilon_lower < claim, correct
    assert correct.num_correct < 185  # what a correct run's v looks like (see the docstring)

    # 1. 10x too little noise for the claim.
    broken = run_audit(hand_loop(dp(noise=sigma / 10), FULL_STEPS, key_fn=secret_key))
    assert broken.epsilon_lower > claim, broken
    # 2. Clipping at 100 C while the noise and the claim are for C (noise std σC kept):
    #    canaries of norm 100 C get through whole.
    broken = run_audit(
        hand_loop(dp(clip=100 * CLIP, noise=sigma / 100), FULL_STEPS, key_fn=secret_key),
        clip=100 * CLIP,
    )
    assert broken.epsilon_lower > claim, broken

    # 3. Noise calibrated to the mean: std σC / B_e added to the clipped sum.
    def to_mean(loss_fn, d):
        b_e = reduce_rows(d)
        clipped = jaxgrad.clipped_grad(loss_fn, l2_clip=CLIP, reduction="sum")
        return lambda p, batch, mask, k: privacy.noised_average(
            clipped(p, batch), k, stddev=sigma * CLIP / b_e, expected_batch_size=b_e
        )

    broken = run_audit(hand_loop(full_batch(to_mean), FULL_STEPS, key_fn=secret_key))
    assert broken.epsilon_lower > claim, broken


def reduce_rows(data):
    return jaxgrad.reduce.batch_size(data)


def test_public_key_is_caught_and_a_secret_key_is_not():
    """A known key lets the adversary rerun without canaries: the noise cancels exactly."""
    sigma = sigma_for(1.0, FULL_STEPS)
    claim = claimed(sigma, 1.0, FULL_STEPS)
    dp = full_batch(
        lambda loss_fn, d: privacy.dp_grad(
            loss_fn, l2_clip=CLIP, noise_multiplier=sigma, expected_batch_size=reduce_rows(d)
        )
    )
    public = lambda t: jax.random.fold_in(jax.random.key(0), t)
    leaked = audit_against_rerun(
        hand_loop(dp, FULL_STEPS, key_fn=public), hand_loop(dp, FULL_STEPS, key_fn=public)
    )
    assert leaked > claim
    # The same adversary against a secret key: its rerun's noise is independent, no gain.
    kept = audit_against_rerun(
        hand_loop(dp, FULL_STEPS, key_fn=secret_key), hand_loop(dp, FULL_STEPS, key_fn=public)
    )
    assert kept < claim


SAMPLED_Q, SAMPLED_STEPS = 0.5, 20


def test_sampled_dp_grad_audit():
    sigma = sigma_for(SAMPLED_Q, SAMPLED_STEPS)
    claim = claimed(sigma, SAMPLED_Q, SAMPLED_STEPS)

    def sampled(noise):
        def grad_fn(loss_fn, data):
            f = privacy.sampled_dp_grad(
                loss_fn,
                l2_clip=CLIP,
                noise_multiplier=noise,
                sampling_rate=SAMPLED_Q,
                physical_batch_size=512,
            )
            return lambda p, k: f(p, data, k)

        return grad_fn

    correct = run_audit(hand_loop(sampled(sigma), SAMPLED_STEPS, key_fn=secret_key))
    assert correct.epsilon_lower < claim, correct
    broken = run_audit(hand_loop(sampled(sigma / 10), SAMPLED_STEPS, key_fn=secret_key))
    assert broken.epsilon_lower > claim, broken


def fit_train(privacy_config, claims, mesh=None, sigmas=None):
    """``train`` over ``jaxgrad.train.fit(..., privacy=...)``: q = ½, 10 epochs. Each run's
    final ε goes to ``claims``, and its σ to ``sigmas`` if given."""

    def train(loss_fn, params, data):
        n = reduce_rows(data)
        result = jaxgrad.train.fit(
            loss_fn,
            params,
            data,
            optimizer=optax.sgd(1.0),
            epochs=10,
            batch_size=n // 2,
            key=private_key(55555),
            privacy=privacy_config,
            quiet=True,
            mesh=mesh,
        )
        claims.append(result.history[-1]["epsilon"])
        if sigmas is not None:
            sigmas.append(result.privacy["noise_multiplier"])
        return result.params

    return train


def test_fit_audit_stays_below_claim_and_too_little_noise_exceeds_it():
    claims, sigmas = [], []
    config = jaxgrad.train.PrivacyConfig(l2_clip=CLIP, target_epsilon=TARGET, delta=DELTA)
    correct = run_audit(fit_train(config, claims, sigmas=sigmas))
    assert claims[0] == pytest.approx(TARGET, rel=1e-2)
    assert correct.epsilon_lower < claims[0], correct
    # The broken copy: fit told a σ 10x smaller than the one the claim was computed for (the
    # σ the correct run calibrated and used: calibrating it again here cost seconds of
    # accounting and computed the same number).
    weak = jaxgrad.train.PrivacyConfig(l2_clip=CLIP, noise_multiplier=sigmas[0] / 10, delta=DELTA)
    broken = run_audit(fit_train(weak, claims))  # same canary key: same rows
    assert broken.epsilon_lower > TARGET, broken


def test_fit_on_a_mesh_audit():
    """The same audit of ``fit(..., mesh=data_mesh(4))``, in a subprocess with 4 emulated
    CPU devices (tests/_audit_worker.py), so that this process keeps its one device."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_audit_worker.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["devices"] == 4
    assert out["claim"] == pytest.approx(TARGET, rel=1e-2)
    assert out["correct"][0] < out["claim"], out
    assert out["broken"][0] > TARGET, out
