"""The one-run audit (jaxgrad.privacy.audit) of ``python -m jaxgrad.train --dp``, end to end.

The CLI trains its own models on the user's ``.npz``, so its canaries live in input space:
a linear regression with ``d_real`` real features and one extra, all-zero feature column per
canary; canary ``k`` is the row ``x = A e_{d_real + k}``, ``y = −Y`` with ``A = 100``,
``Y = 10⁴``. Its squared-error gradient ``2 (A w_j + b + Y) (A e_j + e_b)`` is far above the
clip, so clipping leaves ``C (A e_j + e_b) / √(A² + 1)``: a Dirac canary on ``w_j`` up to
``1/A`` (real rows never touch ``w_j``: their column is 0). An included canary lowers ``w_j``;
the score is ``−w_j`` (the initial parameters are 0).

Sizing: m = 600 canaries, r = 200 guesses, claim ε = 2 at δ = 1e-5, confidence 0.95. With
every guess right the bound reaches about 4.2 > 2, so a broken run can be caught; a correct
run exceeds its claim with probability at most 1 − confidence over its random draws (the
canaries are fixed; the correct run's key is OS entropy, as by default, so this is its false
alarm rate: in practice far lower, a correct run got 126 of 200 right where 185 are needed).
What it catches is a key an adversary knows; a noise scale off by 2× would usually pass at
this m and r (the library-level audits in test_privacy_audit.py catch σ/10). Full batches
(q = 1) make the reference run of the broken copy draw exactly the same batches.
"""

import jax
import numpy as np
import optax

import jaxgrad
from jaxgrad.privacy import audit
from jaxgrad.train.__main__ import main

D_REAL, M, A, Y = 6, 600, 100.0, 1e4
CLAIM, DELTA, GUESSES = 2.0, 1e-5, 200


def _data(rng, canaries):
    """The npz arrays: 400 real training rows, then the included canaries' rows."""
    d = D_REAL + M
    w_true = rng.standard_normal(D_REAL)
    x_real = np.zeros((500, d))
    x_real[:, :D_REAL] = rng.standard_normal((500, D_REAL))
    y_real = x_real[:, :D_REAL] @ w_true + 0.1 * rng.standard_normal(500)
    rows = np.flatnonzero(canaries.included)
    x_canary = np.zeros((len(rows), d))
    x_canary[np.arange(len(rows)), D_REAL + rows] = A
    with_canaries = {
        "x_train": np.concatenate([x_real[:400], x_canary]),
        "y_train": np.concatenate([y_real[:400], np.full(len(rows), -Y)]),
        "x_test": x_real[400:],
        "y_test": y_real[400:],
    }
    without = dict(with_canaries, x_train=x_real[:400], y_train=y_real[:400])
    return with_canaries, without


def _train(tmp_path, name, arrays, *flags):
    """Runs the CLI on ``arrays`` (full batches, plain SGD) and returns the trained ``w``."""
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    n = len(arrays["x_train"])
    ckpt = tmp_path / f"ckpt-{name}"
    args = ["--data", "npz", "--data-path", str(path), "--model", "linear", "--x64"]
    args += ["--dp", "--target-epsilon", str(CLAIM), "--delta", str(DELTA), "--l2-clip", "1"]
    args += ["--accountant", "rdp", "--batch-size", str(n), "--epochs", "4"]
    args += ["--optimizer", "sgd", "--lr", "1", "--checkpoint-dir", str(ckpt), "--quiet"]
    assert main([*args, *flags]) == 0
    (last,) = jaxgrad.train.checkpoint.list_checkpoints(ckpt)[-1:]
    d = arrays["x_train"].shape[1]
    params = {"b": np.zeros(()), "w": np.zeros(d)}
    template = {
        "state": jaxgrad.train.init_state(params, optax.sgd(1.0)),
        "key": jax.random.key(0),
    }
    tree, _ = jaxgrad.train.checkpoint.load(last, template)
    return np.asarray(tree["state"].params["w"])


def _epsilon_lower(scores, canaries):
    guesses = audit.guess(scores, canaries, num_guesses=GUESSES)
    return audit.one_run_epsilon(
        num_canaries=M, num_guesses=GUESSES, num_correct=guesses.num_correct, delta=DELTA
    )


def test_cli_dp_run_audits_below_its_claim_and_a_public_seed_above_it(tmp_path):
    rng = np.random.default_rng(0)
    canaries = audit.Canaries(coordinates=np.arange(M), included=rng.random(M) < 0.5, l2_clip=1.0)
    with_canaries, without = _data(rng, canaries)

    # The default run: its key comes from OS entropy, so the adversary has no reference.
    w = _train(tmp_path, "secure", with_canaries)
    correct = _epsilon_lower(-w[D_REAL:], canaries)
    assert correct < CLAIM

    # A broken copy: the key derived from a public seed. The adversary reruns the command on
    # the data without any canary: the noise and the (full) batches are the same, and on a
    # canary's coordinate SGD adds up −lr (noise [+ the canary]) / N, so rescaling the rerun
    # by its N over the released run's leaves the canaries alone.
    seed = ["--insecure-dp-seed", "7"]
    w_public = _train(tmp_path, "public", with_canaries, *seed)
    w_reference = _train(tmp_path, "reference", without, *seed)
    ratio = len(without["x_train"]) / len(with_canaries["x_train"])
    broken = _epsilon_lower(ratio * w_reference[D_REAL:] - w_public[D_REAL:], canaries)
    assert broken > CLAIM > correct
