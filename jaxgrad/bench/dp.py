"""``python -m jaxgrad.bench --dp``: a full DP-SGD step against a non-private step, side by side.

For every model and batch size ``B``, the jitted programs below are timed in interleaved rounds
(:func:`jaxgrad.bench.timing.interleaved`: one sample of each per round, the order rotated,
so all see the same machine load) and their medians compared:

* ``non-private step``: :func:`jaxgrad.batch_grad` and an optax update;
* ``DP step``: :func:`jaxgrad.privacy.dp_grad` (clip to ``C``, sum, ``N(0, σ²C² I)`` once,
  divide by ``B``) and the same update — the issue-9 target is ``DP / non-private ≥ 0.8``
  in throughput;
* ``clipped sum``: the DP step's clipped sum alone (``clipped_grad(reduction="sum")`` with
  its check for non-finite examples), no noise, no update;
* ``noise``: the DP step's Gaussian draw alone (:func:`jaxgrad.privacy.add_noise` on a tree
  shaped like the parameters) — a cost per *step*, independent of ``B``, which is why the
  ratio rises with the batch size;
* ``noise, jax.random.normal``: the same draw with ``jax.random.normal``'s numbers (computed
  fused, as ``add_noise`` did before :mod:`jaxgrad.privacy.gaussian`: float32 ``erf⁻¹`` of a
  ``2⁻²³`` grid, tails cut at 5.42σ) — the price of the uncut tails is ``noise`` over this;
* ``non-private step + noise``: the non-private step with the DP step's draw added to its
  gradient (std ``σC / B``, fused as in the DP step) — an unclipped "DP step": its throughput
  ratio is the most any DP step with this noise can reach on this machine (the noise ceiling);
* ``DP step, P rows``: the DP step on a batch of ``P`` rows (the default physical batch
  size), the first ``B`` real: the padding of one physical size, without the draw;
* ``sampled DP step``: what ``fit(privacy=...)`` runs — :func:`jaxgrad.privacy.sampled_dp_grad`
  drawing ``q = B / N`` of ``N = 60000`` examples (a new key, so a new draw, every round) with
  the default physical batch size ``P``, + the update;
* ``fit(privacy) step``: ``fit(privacy=...)``'s own steps — the engine ``fit`` runs
  (:func:`jaxgrad.train.private.engine`: the guarded step, in ``fit``'s loop over steps,
  ``scan="auto"``), :data:`FIT_STEPS` steps per call, the time per step. Over ``sampled DP
  step``, the loop tax of the training loop (target: at most 1.1).

The sampled steps run ``P ⌈b / P⌉`` rows for a draw of ``b ~ Binomial(N, q)``; the record's
``padding`` is ``P / qN`` (the rows of a one-batch step over the expected batch) and
``expected_padding`` the expected rows over ``qN`` (:func:`jaxgrad.privacy.expected_rows`,
counting the rare second batch). Their split: ``dp_over_ceiling`` (the clipped sum's own
share), ``padded_over_dp_time`` (the padding's), ``sampled_over_padded_time`` (the draw's).

The update is ``optax.sgd`` (the cheapest optax update: it dilutes the DP overhead least).
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgrad import _loops, grads, privacy
from jaxgrad.bench import suite, timing
from jaxgrad.privacy import threefry

DEFAULT_MODELS = ["mlp", "cnn", "cnn-ws", "transformer", "rnn"]
DEFAULT_BATCH_SIZES = [256, 1024]
TARGET = 0.8
DATA_SIZE = 60000  # the data set the sampled DP step draws from (MNIST's size)
ROWS = (
    "non-private step",
    "DP step",
    "clipped sum",
    "noise",
    "noise, jax.random.normal",
    "non-private step + noise",
    "DP step, P rows",
    "sampled DP step",
    "fit(privacy) step",
)
FIT_STEPS = 2  # steps per call of "fit(privacy) step"


def programs(
    case,
    batch_size: int,
    *,
    l2_clip: float = 1.0,
    noise_multiplier: float = 1.0,
    data_size: int = DATA_SIZE,
):
    """The jitted programs of one (model, B), each ``f(params, opt_state, batch, key)``.

    ``"sampled DP step"`` takes the whole data set (``data_size`` examples) for ``batch``: it
    is :func:`jaxgrad.privacy.sampled_dp_grad` with ``q = B / data_size`` and the physical
    batch size ``fit`` takes by default, + the update — the step ``fit(privacy=...)`` runs.
    ``"DP step, P rows"`` takes a batch of ``P`` rows, the first ``B`` real: the DP step with
    the sampled step's padding and without its draw.
    """
    opt = optax.sgd(0.1)
    plain = grads.batch_grad(case.loss_fn)
    noisy = privacy.dp_grad(
        case.loss_fn,
        l2_clip=l2_clip,
        noise_multiplier=noise_multiplier,
        expected_batch_size=batch_size,
    )
    clipped = privacy.ClippedSum(case.loss_fn, l2_clip=l2_clip)  # the DP step's
    q = batch_size / data_size
    physical = privacy.default_physical_batch_size(num_examples=data_size, sampling_rate=q)
    sampled = privacy.sampled_dp_grad(
        case.loss_fn,
        l2_clip=l2_clip,
        noise_multiplier=noise_multiplier,
        sampling_rate=q,
        physical_batch_size=physical,
    )
    # The DP step on a physical batch of P rows, the first B of them real: the padding alone.
    padded = jnp.arange(physical) < batch_size

    def update(g, params, opt_state):
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return opt, {
        "non-private step": jax.jit(lambda p, s, b, k: update(plain(p, b).grads, p, s)),
        "DP step": jax.jit(lambda p, s, b, k: update(noisy(p, b, None, k), p, s)),
        "clipped sum": jax.jit(lambda p, s, b, k: clipped(p, b, jnp.ones(batch_size, bool))[0]),
        "non-private step + noise": jax.jit(
            lambda p, s, b, k: update(
                privacy.add_noise(
                    plain(p, b).grads, k, stddev=l2_clip * noise_multiplier / batch_size
                ),
                p,
                s,
            )
        ),
        "noise": jax.jit(
            lambda p, s, b, k: privacy.add_noise(
                jax.tree_util.tree_map(jnp.zeros_like, p), k, stddev=l2_clip * noise_multiplier
            )
        ),
        "noise, jax.random.normal": jax.jit(
            lambda p, s, b, k: _old_noise(p, k, stddev=l2_clip * noise_multiplier)
        ),
        "DP step, P rows": jax.jit(lambda p, s, b, k: update(noisy(p, b, padded, k), p, s)),
        "sampled DP step": jax.jit(lambda p, s, data, k: update(sampled(p, data, k), p, s)),
    }


def fit_steps(case, batch_size: int, data, *, l2_clip=1.0, noise_multiplier=1.0, opt=None):
    """``f(params, opt_state, data, key)``: :data:`FIT_STEPS` steps of ``fit(privacy=...)``'s
    own engine on ``data`` (the chunk ``fit`` runs between reports), returning the state."""
    from jaxgrad.train import PrivacyConfig, private
    from jaxgrad.train.step import TrainState

    opt = optax.sgd(0.1) if opt is None else opt
    config = PrivacyConfig(l2_clip=l2_clip, noise_multiplier=noise_multiplier)
    n = jax.tree_util.tree_leaves(data)[0].shape[0]
    the_plan = private.plan(config, num_examples=n, batch_size=batch_size, epochs=1)
    engine = private.engine(
        case.loss_fn,
        data,
        the_plan,
        optimizer=opt,
        batch_size=batch_size,
        chunk=FIT_STEPS,
        scan=_loops.scan_steps("auto"),
        mesh=None,
        check=None,
        loss_key=None,
    )
    active = [True] * FIT_STEPS

    def f(params, opt_state, data_, key):
        del data_  # the engine holds the data on the device, as fit does
        state = TrainState(params, opt_state, jnp.zeros((), jnp.int32))
        return engine.run_chunk(state, key, active)[0]

    return f


def _old_noise(params, key, *, stddev):
    """``0 + stddev · jax.random.normal(key, (N,))`` cut into the leaves, fused: the draw
    ``add_noise`` made before the uncut-tail sampler (``threefry.normal_at``)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    dtype = jnp.result_type(jnp.float32, *leaves)
    out, start = [], 0
    for x in leaves:
        z = threefry.normal_at(key, start, x.shape, dtype)
        out.append(jnp.zeros_like(x) + (stddev * z).astype(x.dtype))
        start += x.size
    return jax.tree_util.tree_unflatten(treedef, out)


def measure_case(
    case_name: str, batch_size: int, *, rounds: int = 15, data_size: int = DATA_SIZE, log=None
) -> dict:
    """Medians of the programs over ``rounds`` interleaved rounds
    (:func:`jaxgrad.bench.timing.interleaved`, a new key every round), and their ratios."""
    case = suite.CASES[case_name]()
    params = case.model.init(jax.random.key(0))
    batch = case.make_batch(batch_size)
    data = case.make_batch(data_size)
    opt, fns = programs(case, batch_size, data_size=data_size)
    fns["fit(privacy) step"] = fit_steps(case, batch_size, data, opt=opt)
    opt_state = opt.init(params)
    q = batch_size / data_size
    physical = privacy.default_physical_batch_size(num_examples=data_size, sampling_rate=q)
    rows = {
        "sampled DP step": data,
        "DP step, P rows": case.make_batch(physical),
    }

    def args(name, r):  # a new key every round: a new Poisson draw, as in training
        key = jax.random.fold_in(jax.random.key(suite.DP_KEY), r + 1)  # r = -1: warm-up
        return (params, opt_state, rows.get(name, batch), key)

    t = timing.interleaved(fns, args=args, rounds=rounds)
    med = dict(t.seconds)
    med["fit(privacy) step"] /= FIT_STEPS
    iqr = {}  # over the rounds: each program's throughput over the non-private step's
    for name in fns:
        q1, _, q3 = t.ratio_quartiles("non-private step", name)
        steps = FIT_STEPS if name == "fit(privacy) step" else 1  # per step, as med
        iqr[name] = [q1 * steps, q3 * steps]
    plain = med["non-private step"]
    ceiling = med["non-private step + noise"]
    expected = functools.partial(privacy.expected_rows, num_examples=data_size, sampling_rate=q)
    record = {
        "model": case.name,
        "case": case_name,
        "num_params": sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params)),
        "batch_size": batch_size,
        "rounds": rounds,
        "median_s": med,
        "compile_s": t.compile_s,
        "nonprivate_ratio_iqr": iqr,
        "data_size": data_size,
        "dp_over_nonprivate_throughput": plain / med["DP step"],
        "sampled_over_nonprivate_throughput": plain / med["sampled DP step"],
        "noise_over_nonprivate_time": med["noise"] / plain,
        "noise_over_jax_normal_time": med["noise"] / med["noise, jax.random.normal"],
        "noise_ceiling_throughput": plain / med["non-private step + noise"],
        "clipped_over_nonprivate_time": med["clipped sum"] / plain,
        "physical_batch_size": physical,
        "padding": physical / (q * data_size),
        "expected_padding": expected(physical_batch_size=physical),
        "sampled_over_ceiling": ceiling / med["sampled DP step"],
        "dp_over_ceiling": ceiling / med["DP step"],
        # sampled / ceiling = (DP step / ceiling) / (padded DP / DP) / (sampled / padded DP)
        "padded_over_dp_time": med["DP step, P rows"] / med["DP step"],
        "sampled_over_padded_time": med["sampled DP step"] / med["DP step, P rows"],
        "fit_over_sampled_time": med["fit(privacy) step"] / med["sampled DP step"],
    }
    record["meets_target"] = record["dp_over_nonprivate_throughput"] >= TARGET
    if log is not None:  # progress only: the rows are printed once, as the table, at the end
        log(f"measured {case_name} at batch size {batch_size} ({rounds} rounds)")
    return record


def format_record(r: dict) -> str:
    m = r["median_s"]
    return (
        f"{r['case']:<12} B={r['batch_size']:<5} non-private {m['non-private step'] * 1e3:8.2f} ms"
        f"  DP {m['DP step'] * 1e3:8.2f} ms  clipped sum {m['clipped sum'] * 1e3:8.2f} ms"
        f"  noise {m['noise'] * 1e3:6.2f} ms (jax.random.normal's "
        f"{m['noise, jax.random.normal'] * 1e3:6.2f} ms: x{r['noise_over_jax_normal_time']:.2f})"
        f"  |  DP/non-private throughput "
        f"{r['dp_over_nonprivate_throughput']:.2f}{' (>= 0.8)' if r['meets_target'] else ''}"
        f"  noise/non-private time {r['noise_over_nonprivate_time']:.2f}"
        f"  noise ceiling {r['noise_ceiling_throughput']:.2f}"
        f"  |  sampled DP step {m['sampled DP step'] * 1e3:8.2f} ms, /non-private throughput "
        f"{r['sampled_over_nonprivate_throughput']:.2f} (P = {r['physical_batch_size']}, "
        f"padding x{r['padding']:.2f}, expected x{r['expected_padding']:.3f}; of the noise "
        f"ceiling {r['sampled_over_ceiling']:.2f} = DP step {r['dp_over_ceiling']:.2f}"
        f" / padding x{r['padded_over_dp_time']:.2f} (DP step on P rows "
        f"{m['DP step, P rows'] * 1e3:.2f} ms) / draw x{r['sampled_over_padded_time']:.2f})"
        f"  |  fit(privacy) step {m['fit(privacy) step'] * 1e3:8.2f} ms, over the sampled step "
        f"x{r['fit_over_sampled_time']:.2f}"
    )


NOTE = (
    "Medians of interleaved rounds (one sample of each program per round, the order rotated). "
    "DP step = "
    "privacy.dp_grad (clip C=1, sum, one N(0, σ²C² I) draw with σ=1, divide by B) + optax.sgd; "
    "non-private step = batch_grad + the same update; noise = the draw alone (per step, "
    "independent of B; uncut tails to |z| = 9.155; x = its time over jax.random.normal's "
    "float32 numbers, cut at |z| = 5.42, fused the same way); noise ceiling = non-private "
    "step / (non-private step + the same noise): the most any DP step with this noise "
    "reaches. Target: DP / non-private throughput >= 0.8. Sampled DP step = what "
    "fit(privacy=...) runs: Poisson-sample q = B/N of N examples (N = 60000), the default "
    "physical batch P (padding = P / qN), clip, noise, update; of the noise ceiling = "
    "(non-private step + noise) / sampled step (target >= 0.95), split into the DP step's own "
    "share (the clipped sum), the padding's (DP step on P rows, B real, over the DP step) and "
    "the draw's (sampled step over the DP step on P rows); expected = E[rows run] / qN "
    "(privacy.expected_rows, counting the rare second batch). fit(privacy) step = "
    f"fit's own engine, {FIT_STEPS} steps per call, per step (target <= 1.1x the sampled step)."
)


def run(
    models, batch_sizes, *, rounds: int = 15, data_size: int = DATA_SIZE, quiet: bool = False
) -> list[dict]:
    log = None if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    return [
        measure_case(m, b, rounds=rounds, data_size=data_size, log=log)
        for m in models
        for b in batch_sizes
    ]
