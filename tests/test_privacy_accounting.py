"""jaxgrad.privacy.accounting: δ against the data set's size, and accounting that never
exhausts memory.

References: exact fractions for the release-one-example mechanism; dp-accounting's own
``RdpAccountant`` / ``PLDAccountant`` / PLD arrays called directly; a subprocess under
``RLIMIT_AS`` = 4 GB for the large targets.
"""

import itertools
import json
import math
import subprocess
import sys
import textwrap
import warnings
from fractions import Fraction

import dp_accounting as dpa
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from jaxgrad.privacy import accounting
from jaxgrad.privacy._accounting import epsilon as epsilon_module
from jaxgrad.privacy._accounting import pld_size as pld_size_module


def _dpa_epsilon(sigma, q, steps, delta, accountant, vdi=1e-4):
    acc = (
        dpa.rdp.RdpAccountant()
        if accountant == "rdp"
        else dpa.pld.PLDAccountant(value_discretization_interval=vdi)
    )
    acc.compose(
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    )
    return acc.get_epsilon(delta)


# ------------------------------------------------------------------------------------------
# δ < 1/N.


def test_releasing_one_random_example_is_zero_one_over_n_private():
    """The reason for the check, exactly: M(D) = a uniformly random element of D. Adding x
    to D (N → N + 1) moves probability 1/(N + 1) ≤ 1/N onto the output x, which M(D) never
    gives: δ(ε = 0) = TV = 1/(N + 1). So any δ ≥ 1/N admits publishing someone in full."""
    for n in (1, 2, 7, 60):
        d = list(range(n))
        p = {x: Fraction(1, n) for x in d}
        p_plus = {x: Fraction(1, n + 1) for x in [*d, n]}
        tv = sum(max(p_plus.get(x, 0) - p.get(x, 0), 0) for x in p_plus)
        assert tv == Fraction(1, n + 1) <= Fraction(1, n)
        if n > 1:  # (δ = 1 is refused as outside (0, 1))
            with pytest.raises(ValueError, match="certifies nothing"):
                accounting.check_delta(1 / n, num_examples=n)


def test_check_delta_refuses_one_over_n_and_above_and_says_why():
    n = 60000
    for bad in (1 / n, 2 / n, 0.5):
        with pytest.raises(ValueError) as e:
            accounting.check_delta(bad, num_examples=n)
        msg = str(e.value)
        assert f"`delta` {bad!r}" in msg and "1/N = 1.667e-05 for N = 60000" in msg
        assert "(0, 1/N)-DP" in msg and "δ ≤ 1/N^1.1 = 5.5e-06" in msg
    for good in (1e-5, n**-1.1, math.nextafter(1 / n, 0)):
        assert accounting.check_delta(good, num_examples=n) == good
    assert accounting.check_delta(0.999, num_examples=1) == 0.999


def test_check_delta_bad_arguments():
    for bad in (0.0, 1.0, -1e-6, float("nan"), "1e-5", True):
        with pytest.raises(ValueError, match="`delta`"):
            accounting.check_delta(bad, num_examples=10)
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="`num_examples`"):
            accounting.check_delta(1e-5, num_examples=bad)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_a_target_no_sigma_reaches_is_named_not_a_dp_accounting_traceback(accountant):
    """RDP's orders bound its ε below at any σ (log(1/δ)/(α_max − 1)): ε = 1e-3 at δ = 1e-10
    is out of its reach, which dp-accounting called directly confirms at σ = 2**30; the search
    raised dp-accounting's NoBracketIntervalFoundError, naming no argument."""
    rdp = dpa.rdp.RdpAccountant()
    rdp.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(2.0**30), 10**6))
    assert rdp.get_epsilon(1e-10) > 1e-3
    with pytest.raises(ValueError, match=r"`target_epsilon` 0.001 is out of reach"):
        accounting.calibrate_noise_multiplier(
            target_epsilon=1e-3,
            delta=1e-10,
            sampling_rate=1.0,
            steps=10**6,
            accountant=accountant,
        )


# ------------------------------------------------------------------------------------------
# The PLD's size, estimated before it is built.


@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.01, 300), (0.6, 0.004, 1000), (2.0, 1.0, 5)])
def test_pld_size_against_the_arrays_dp_accounting_builds(sigma, q, steps):
    """One step: exact. Composed: within 25 % of the longer of dp-accounting's two arrays."""
    vdi = 1e-3
    got = accounting.pld_size(
        noise_multiplier=sigma, sampling_rate=q, steps=steps, pld_discretization=vdi
    )
    one = pld_lib.from_gaussian_mechanism(sigma, value_discretization_interval=vdi, sampling_prob=q)
    pmfs = [one._pmf_remove, one._pmf_add]  # dp-accounting's own arrays (private attributes)
    assert got.step == max(p.size for p in pmfs)
    composed = max(p.self_compose(steps).size for p in pmfs)
    assert 1 / 1.25 < got.composed / composed < 1.25, (got, composed)


def test_pld_size_grows_as_sigma_shrinks():
    sizes = [
        accounting.pld_size(noise_multiplier=s, sampling_rate=0.01, steps=1000)
        for s in (2.0, 0.5, 0.1, 0.01, 1e-4)
    ]
    assert all(a.step < b.step and a.composed < b.composed for a, b in itertools.pairwise(sizes))
    assert sizes[-1].composed > 1e12 > accounting.PLD_MAX_POINTS  # what used to be attempted


def test_epsilon_at_tiny_sigma_falls_back_to_rdp_and_says_so():
    kw = dict(noise_multiplier=0.01, sampling_rate=0.01, steps=1000, delta=1e-5)
    with pytest.warns(accounting.AccountingFallbackWarning, match="RDP accountant instead"):
        eps = accounting.epsilon(**kw)
    assert eps == _dpa_epsilon(0.01, 0.01, 1000, 1e-5, "rdp")
    assert accounting.effective_accountant(**{k: kw[k] for k in kw if k != "delta"}) == "rdp"
    assert (
        accounting.effective_accountant(
            noise_multiplier=0.01, sampling_rate=0.01, steps=1000, accountant="rdp"
        )
        == "rdp"
    )
    assert (
        accounting.effective_accountant(noise_multiplier=1.0, sampling_rate=0.01, steps=100)
        == "pld"
    )
    # An ordinary setting uses the PLD, silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eps = accounting.epsilon(**{**kw, "noise_multiplier": 1.0, "steps": 100})
    assert eps == pytest.approx(_dpa_epsilon(1.0, 0.01, 100, 1e-5, "pld"), rel=1e-12)


_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time, warnings
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    from jaxgrad.privacy import accounting
    out = []
    for kind, value, q, steps in json.loads(sys.argv[1]):
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if kind == "calibrate":
                got = accounting.calibrate_noise_multiplier(
                    target_epsilon=value, delta=1e-5, sampling_rate=q, steps=steps
                )
            else:
                got = accounting.epsilon(
                    noise_multiplier=value, sampling_rate=q, steps=steps, delta=1e-5
                )
        out.append(dict(kind=kind, value=value, q=q, steps=steps, got=got,
                        seconds=time.perf_counter() - start,
                        fallback=[str(w.message) for w in caught
                                  if w.category is accounting.AccountingFallbackWarning]))
    print(json.dumps(out))
    """
)


def test_large_targets_answer_quickly_within_4_gb():
    """ε targets of 1e3 and 1e6 and ε at σ = 1e-3: each answers within 10 s in a process
    limited to 4 GB of address space (calibrate used to be killed at 23.5 GB), reports the
    fallback, and the σ found spends at most the target by dp-accounting's RDP directly."""
    cases = [
        ["calibrate", 1e3, 0.01, 1000],
        ["calibrate", 1e6, 0.01, 1000],
        ["calibrate", 1e6, 256 / 60000, 14063],
        ["calibrate", 1e3, 1.0, 10],
        ["epsilon", 1e-3, 0.01, 1000],
    ]
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for r in results:
        assert r["seconds"] < 10, r
        assert len(r["fallback"]) == 1 and "RDP accountant instead" in r["fallback"][0], r
        if r["kind"] == "calibrate":
            sigma = r["got"]
            assert 0 < sigma < 1
            assert _dpa_epsilon(sigma, r["q"], r["steps"], 1e-5, "rdp") <= r["value"]
            # and nearly all of it: 10 % less noise would spend more than the target
            assert _dpa_epsilon(0.9 * sigma, r["q"], r["steps"], 1e-5, "rdp") > r["value"]
        else:
            assert r["got"] == _dpa_epsilon(r["value"], r["q"], r["steps"], 1e-5, "rdp")


def test_calibration_stops_at_the_smallest_sigma_whose_pld_fits(monkeypatch):
    """With the limit set between the PLD's and RDP's answers, the result is the smallest σ
    whose PLD fits, certified by the PLD (dp-accounting directly), with a warning; with the
    limits as shipped the same setting calibrates silently to the PLD's own answer."""
    kw = dict(target_epsilon=4.0, delta=1e-5, sampling_rate=0.02, steps=200)
    vdi = 1e-2  # coarse: every PLD here is cheap
    s_pld = accounting.calibrate_noise_multiplier(**kw, pld_discretization=vdi)
    s_rdp = accounting.calibrate_noise_multiplier(**kw, accountant="rdp")
    assert s_pld < 0.97 * s_rdp
    assert _dpa_epsilon(s_pld, 0.02, 200, 1e-5, "pld", vdi) <= 4.0
    middle = (s_pld + s_rdp) / 2
    limit = accounting.pld_size(
        noise_multiplier=middle, sampling_rate=0.02, steps=200, pld_discretization=vdi
    )
    # (the size guard reads its limit where it lives, at each call)
    monkeypatch.setattr(pld_size_module, "PLD_MAX_POINTS", limit.composed)
    with pytest.warns(accounting.AccountingFallbackWarning, match="smallest σ whose PLD fits"):
        sigma = accounting.calibrate_noise_multiplier(**kw, pld_discretization=vdi)
    assert middle - 2e-3 <= sigma <= middle + 2e-3
    assert _dpa_epsilon(sigma, 0.02, 200, 1e-5, "pld", vdi) <= 4.0


# ------------------------------------------------------------------------------------------
# A δ below the tail mass the PLD drops; a σ whose square overflows.

_TINY = dict(sampling_rate=32 / 1438, steps=45, delta=1e-15, pld_discretization=1e-3)


def test_epsilon_where_the_pld_cannot_reach_delta_is_rdps_and_says_so():
    """dp-accounting's PLD answers ε = inf at δ = 1e-15 (its truncated tails hold more);
    its RDP certifies a finite ε, which `epsilon`, `effective_accountant(delta=...)` and the
    Accountant then give, with a warning (the PLD was used, and inf passed on, before)."""
    q, steps, delta, vdi = (
        _TINY[k] for k in ("sampling_rate", "steps", "delta", "pld_discretization")
    )
    assert _dpa_epsilon(1.55, q, steps, delta, "pld", vdi) == math.inf
    rdp = _dpa_epsilon(1.55, q, steps, delta, "rdp")
    assert 1 < rdp < 3
    with pytest.warns(accounting.AccountingFallbackWarning, match="answers ε = inf at δ = 1e-15"):
        assert accounting.epsilon(noise_multiplier=1.55, **_TINY) == rdp
    settings = {k: v for k, v in _TINY.items() if k != "delta"}
    assert accounting.effective_accountant(noise_multiplier=1.55, **settings, delta=delta) == "rdp"
    assert accounting.effective_accountant(noise_multiplier=1.55, **settings) == "pld"  # size
    acc = accounting.Accountant(delta=delta, pld_discretization=vdi)
    acc.record(noise_multiplier=1.55, sampling_rate=q, steps=steps)
    with pytest.warns(accounting.AccountingFallbackWarning, match="answers ε = inf"):
        assert acc.epsilon() == pytest.approx(rdp, rel=1e-12)
    assert acc.effective_accountant() == "rdp"
    assert acc.effective_accountant(delta=1e-5) == "pld"  # the PLD reaches δ = 1e-5
    # A step without noise is inf to both accountants: inf, without a warning.
    acc.record(noise_multiplier=0.0, sampling_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert acc.epsilon() == math.inf


def test_calibration_where_the_pld_cannot_reach_delta_gives_rdps_sigma():
    """σ for ε = 2 at δ = 1e-15 is RDP's (dp-accounting's RDP certifies it, and 1 % less
    noise spends more), not σ ≈ 198 where the PLD first answers a finite ε (0.018); the
    same by `calibrate_event_noise`."""
    kw = dict(target_epsilon=2.0, **_TINY)
    with pytest.warns(accounting.AccountingFallbackWarning, match="answers ε = inf"):
        sigma = accounting.calibrate_noise_multiplier(**kw)
    q, steps = _TINY["sampling_rate"], _TINY["steps"]
    assert _dpa_epsilon(sigma, q, steps, 1e-15, "rdp") <= 2.0
    assert _dpa_epsilon(0.99 * sigma, q, steps, 1e-15, "rdp") > 2.0
    with pytest.warns(accounting.AccountingFallbackWarning):
        assert accounting.epsilon(noise_multiplier=sigma, **_TINY) <= 2.0
    event = lambda s: dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s))
    got = accounting.calibrate_event_noise(
        event, target_epsilon=2.0, delta=1e-15, steps=steps, pld_discretization=1e-3, tol=1e-2
    )
    assert abs(got - sigma) <= 1e-2


def test_epsilon_at_a_sigma_whose_square_overflows_is_that_at_1e100():
    """σ = 1e200 used to raise (dp-accounting's RDP overflows on σ², after a spurious
    fallback warning); ε falls as σ grows, so the ε at 1e100 — dp-accounting's own, ~0 —
    bounds it, by `epsilon` and by the Accountant alike."""
    kw = dict(sampling_rate=0.01, steps=100, delta=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("pld", "rdp"):
            reference = _dpa_epsilon(1e100, 0.01, 100, 1e-5, name)
            assert 0 <= reference < 1e-6
            assert accounting.epsilon(noise_multiplier=1e200, **kw, accountant=name) == reference
        acc = accounting.Accountant(delta=1e-5)
        acc.record(noise_multiplier=1e200, sampling_rate=0.01, steps=100)
        assert acc.epsilon() == _dpa_epsilon(1e100, 0.01, 100, 1e-5, "pld")
        assert acc.effective_accountant() == "pld"


@pytest.mark.parametrize(
    "relation, events",
    [
        (
            "add_or_remove_one",
            [
                (dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1.1)), 4),
                (
                    dpa.SelfComposedDpEvent(
                        dpa.PoissonSampledDpEvent(0.02, dpa.GaussianDpEvent(3.0)), 3
                    ),
                    2,
                ),
                (dpa.ComposedDpEvent([dpa.GaussianDpEvent(5.0), dpa.GaussianDpEvent(7.0)]), 1),
            ],
        ),
        (
            "replace_one",
            [(dpa.SampledWithoutReplacementDpEvent(60, 10, dpa.GaussianDpEvent(1.5)), 17)],
        ),
    ],
)
def test_rdp_epsilon_is_dp_accountings_rdp_accountant(relation, events):
    """The RDP ε sums each event's curve, computed once (searches ask for the same events with
    many counts): it is what dp-accounting's RdpAccountant composes, to round-off."""
    acc = dpa.rdp.RdpAccountant(
        neighboring_relation=getattr(dpa.NeighboringRelation, relation.upper())
    )
    for event, count in events:
        acc.compose(event, count)
    for delta in (1e-5, 1e-8):
        got = epsilon_module._rdp_epsilon(relation, events, delta)
        assert got == pytest.approx(acc.get_epsilon(delta), rel=1e-13, abs=0)
    # A second count of the same events reuses their curves and still composes them anew.
    again = epsilon_module._rdp_epsilon(relation, [(e, 2 * c) for e, c in events], 1e-5)
    twice = dpa.rdp.RdpAccountant(
        neighboring_relation=getattr(dpa.NeighboringRelation, relation.upper())
    )
    for event, count in events:
        twice.compose(event, 2 * count)
    once = epsilon_module._rdp_epsilon(relation, events, 1e-5)
    assert again == pytest.approx(twice.get_epsilon(1e-5), rel=1e-13, abs=0) and again > once
