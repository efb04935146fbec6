"""Where the sampled DP step's time goes beyond the DP step on its P physical rows ("the draw").

Run: python bench/draw_cost.py parts|second|draw MODEL B ROUNDS [reuse]
(a model of ``jaxgrad.bench.suite.CASES``; ``reuse``: first ``allocator.reuse_freed_memory()``).

Every mode interleaves its programs (one sample of each per round, the order rotated, as
``jaxgrad.bench.timing.interleaved``) and reports per program the median CPU time per call
(user + system, all threads: ``resource.getrusage``), its quartiles, the system time and the
wall time. On a loaded machine the wall time is noise; the CPU time is the work.

* ``parts``: the sampled step (``jaxgrad.bench.dp.programs``' "sampled DP step") against the
  same step built here from its parts: without the ``while_loop`` over further batches
  ("no loop": the first batch only), with the draw's indices given as an input ("indices
  given": no draw, the gather of the rows kept), the DP step on ``P`` rows ("P rows": no
  draw, no gather) and on ``B`` rows; each P-row program also with ``reduce.fill_padding``'s
  masked sum ("[masked-sum fill]", the form before the one-device index).
* ``second``: the sampled step on draws that fit one physical batch (``b <= P``) and on
  draws that need a second one (``b > P``, run in the ``while_loop``'s body): the real cost
  of the rare second batch, against ``privacy.expected_rows``' count of its rows.
* ``draw``: the Poisson draw alone (the mask; the mask and its prefix sum; ``compact``).
"""

import resource
import sys
import time

from jaxgrad.bench import allocator


def cpu_interleaved(progs, args, rounds, calls=1):
    """Medians over interleaved rounds: ``{name: (cpu_s, (q1, q3), sys_s, wall_s)}``."""
    import jax
    import numpy as np

    names = list(progs)
    for n in names:  # compile, then warm up
        for _ in range(2):
            jax.block_until_ready(progs[n](*args(n, -1)))
    cpu, sys_, wall = ({n: [] for n in names} for _ in range(3))
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            a = args(n, r)
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(progs[n](*a))
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            s = r1.ru_stime - r0.ru_stime
            cpu[n].append((r1.ru_utime - r0.ru_utime + s) / calls)
            sys_[n].append(s / calls)
            wall[n].append((t1 - t0) / calls)
    med = lambda v: float(np.median(v))
    return {
        n: (med(cpu[n]), tuple(np.percentile(cpu[n], [25, 75])), med(sys_[n]), med(wall[n]))
        for n in names
    }


def main(mode, name, size, rounds):
    import jax
    import jax.numpy as jnp
    import optax

    from jaxgrad import _loops, keys, privacy, reduce
    from jaxgrad.bench import dp, suite
    from jaxgrad.privacy import noisy, sampling

    n_data = dp.DATA_SIZE
    q = size / n_data
    p = privacy.default_physical_batch_size(num_examples=n_data, sampling_rate=q)
    padded = -(-n_data // p) * p
    base = jax.random.key(suite.DP_KEY)

    def draw(k):
        sample_key = keys.split_step_key(k)[0]
        return sampling.poisson_sample(
            sample_key, num_examples=n_data, sampling_rate=q, physical_batch_size=p
        )

    def report(res, ref):
        for k, (c, (q1, q3), s, w) in res.items():
            print(
                f"{name:<12} B={size:<5} P={p:<5} {k:<34} cpu {c * 1e3:8.3f} ms "
                f"(IQR {q1 * 1e3:.3f}-{q3 * 1e3:.3f}, sys {s * 1e3:.2f})  x{c / res[ref][0]:.3f}"
                f"  wall {w * 1e3:8.2f} ms"
            )

    if mode == "draw":
        mask = lambda k: sampling.inclusion_mask(
            keys.split_step_key(k)[0], sampling_rate=q, num_examples=n_data
        )
        progs = {
            "mask": jax.jit(mask),
            "mask + cumsum": jax.jit(lambda k: jnp.cumsum(mask(k), dtype=jnp.int32)),
            "mask + compact (poisson_sample)": jax.jit(
                lambda k: sampling.compact(mask(k), padded=padded)[:2]
            ),
        }
        res = cpu_interleaved(progs, lambda n, r: (jax.random.fold_in(base, r + 1),), rounds, 20)
        return report(res, "mask")

    case = suite.CASES[name]()
    params = case.model.init(jax.random.key(0))
    data = case.make_batch(n_data)
    batch, rows = case.make_batch(size), case.make_batch(p)

    if mode == "second":
        opt, fns = dp.programs(case, size, data_size=n_data)
        state = opt.init(params)
        count = jax.jit(lambda k: draw(k).count)
        one, two, tried = [], [], 0
        while len(two) < rounds and tried < 20000:
            k = jax.random.fold_in(base, tried)
            (two if int(count(k)) > p else one).append(k)
            tried += 1
        p2 = len(two) / tried
        progs = {
            "DP step": fns["DP step"],
            "DP step, P rows": fns["DP step, P rows"],
            "sampled, b <= P": fns["sampled DP step"],
            "sampled, b > P": fns["sampled DP step"],
        }
        inputs = {"DP step": batch, "DP step, P rows": rows}

        def args(n, r):
            keys_ = two if n == "sampled, b > P" else one
            return (params, state, inputs.get(n, data), keys_[max(r, 0) % len(keys_)])

        res = cpu_interleaved(progs, args, rounds)
        report(res, "DP step")
        t1, t2, t_dp = (res[k][0] for k in ("sampled, b <= P", "sampled, b > P", "DP step"))
        rows_x = p / (q * n_data)
        exp = privacy.expected_rows(num_examples=n_data, sampling_rate=q, physical_batch_size=p)
        print(
            f"  Pr(b > P) {p2:.4f} ({len(two)} of {tried} draws); a second batch costs "
            f"{(t2 - t1) * 1e3:.2f} ms = {(t2 - t1) / res['DP step, P rows'][0]:.2f}x a P-row "
            f"DP step.\n  Padding: P / qN {rows_x:.3f}, expected_rows {exp:.3f} (second batches "
            f"{exp - rows_x:.3f}); measured: P rows / DP step "
            f"{res['DP step, P rows'][0] / t_dp:.3f}, E[sampled] / DP step "
            f"{(t1 + p2 * (t2 - t1)) / t_dp:.3f} (second batches {p2 * (t2 - t1) / t_dp:.3f})"
        )
        return None

    # parts
    new_fill = reduce.fill_padding

    def masked_sum_fill(b, mask):  # reduce.fill_padding's several-device form, always
        is_first = jnp.arange(mask.shape[0]) == jnp.argmax(mask)

        def fill(x):
            shape = mask.shape + (1,) * (x.ndim - 1)
            first = jnp.sum(jnp.where(is_first.reshape(shape), x, jnp.zeros_like(x)), axis=0)
            return jnp.where(mask.reshape(shape), x, first.astype(x.dtype))

        return jax.tree_util.tree_map(fill, b)

    progs, inputs, state = {}, {}, None
    clip = privacy.ClippedSum(case.loss_fn, l2_clip=1.0)
    for fill, tag in ((new_fill, ""), (masked_sum_fill, " [masked-sum fill]")):
        reduce.fill_padding = fill  # read when the programs are traced, just below
        opt, fns = dp.programs(case, size, data_size=n_data)
        state = opt.init(params)

        def update(g, prm, s, opt=opt):
            u, s = opt.update(g, s, prm)
            return optax.apply_updates(prm, u), s

        def built(form):
            def f(prm, s, d, k):
                _, noise_key = keys.split_step_key(k)
                if form == "indices given":
                    d, idx, cnt = d
                    sample = sampling.PoissonSample(idx, cnt, None)
                else:
                    sample = draw(k)

                def one(i):
                    idx, mask = sampling.physical_batch(sample, i, physical_batch_size=p)
                    return clip(prm, jax.tree_util.tree_map(lambda a: a[idx], d), mask)

                if form == "loop":
                    steps = sampling.num_physical_batches(sample.count, p)
                    total, cnt, bad = _loops.peeled_sum(one, steps)
                else:
                    total, cnt, bad = one(jnp.int32(0))
                g = noisy._privatize(
                    total,
                    cnt,
                    bad,
                    noise_key,
                    nonfinite="drop",
                    stddev=1.0,
                    expected_batch_size=size,
                )
                return update(g, prm, s)

            return jax.jit(f)

        here = {
            "sampled DP step": fns["sampled DP step"],
            "no loop": built("no loop"),
            "indices given": built("indices given"),
            "DP step, P rows": fns["DP step, P rows"],
        }
        if not tag:
            here["DP step"] = fns["DP step"]
        for label, prog in here.items():  # traced now, under this fill (the jit keeps it)
            inputs[label + tag], progs[label + tag] = label, prog
            first = {"DP step": batch, "DP step, P rows": rows}.get(label, data)
            if label == "indices given":
                first = (data, draw(base).indices, draw(base).count)
            jax.block_until_ready(prog(params, state, first, base))
    reduce.fill_padding = new_fill
    given = {}

    def args(n, r):
        k = jax.random.fold_in(base, r + 1)
        what = inputs[n]
        if what == "indices given":
            if r not in given:
                smp = draw(k)
                given[r] = (data, smp.indices, smp.count)
            return (params, state, given[r], k)
        return (params, state, {"DP step": batch, "DP step, P rows": rows}.get(what, data), k)

    report(cpu_interleaved(progs, args, rounds), "DP step, P rows")


if __name__ == "__main__":
    if "reuse" in sys.argv[5:]:
        print("reuse_freed_memory:", allocator.reuse_freed_memory())
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
