"""Test accuracy against ε on MNIST-1D: DP-SGD at ε ∈ {1, 3, 8} and the non-private baseline.

    PYTHONPATH=. python bench/privacy_mnist1d.py [--num-examples 25000] [--epochs 15]

Writes bench/results/privacy_mnist1d.json and .png. Same data, model, initial weights and
epochs for every run; DP runs use Poisson sampling (q = batch / N), clip C, σ calibrated by
jaxgrad.privacy for the planned steps at δ = 1e-5.
"""

import argparse
import json
import time

import jax
import optax

import jaxgrad
from jaxgrad.train import PrivacyConfig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-examples", type=int, default=25000)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--accountant", default="rdp")
    p.add_argument("--out", default="bench/results/privacy_mnist1d")
    a = p.parse_args()
    ds = jaxgrad.data.load("mnist1d", num_examples=a.num_examples, seed=0, standardize=False)
    model = jaxgrad.models.mlp([40, a.hidden, a.hidden, 10])
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=10
    )
    evaluate = jaxgrad.train.evaluator(model.apply, loss_fn, {"test": ds.test}, task=ds.task)
    params = model.init(jax.random.key(0))
    runs = []
    for eps in (None, 8.0, 3.0, 1.0):
        privacy = None
        if eps is not None:
            privacy = PrivacyConfig(
                l2_clip=a.clip, target_epsilon=eps, delta=1e-5, accountant=a.accountant
            )
        start = time.perf_counter()
        result = jaxgrad.train.fit(
            loss_fn,
            params,
            ds.train,
            optimizer=optax.adam(2e-3),
            epochs=a.epochs,
            batch_size=a.batch_size,
            key=jax.random.key(1),
            evaluate=evaluate,
            privacy=privacy,
            progress="none",
        )
        seconds = time.perf_counter() - start
        run = {
            "target_epsilon": eps,
            "epsilon": result.history[-1].get("epsilon"),
            "test_accuracy": result.history[-1]["test_accuracy"],
            "history": result.history,
            "seconds": seconds,
        }
        if eps is not None:
            plan = jaxgrad.train.private.plan(
                privacy, num_examples=len(ds.x_train), batch_size=a.batch_size, epochs=a.epochs
            )
            run["noise_multiplier"] = plan.noise_multiplier
            run["sampling_rate"] = plan.sampling_rate
            run["steps"] = plan.steps
        runs.append(run)
        print(
            f"target eps {eps}: test accuracy {run['test_accuracy']:.4f} "
            f"(eps spent {run['epsilon']}, sigma {run.get('noise_multiplier')}, {seconds:.0f} s)",
            flush=True,
        )
    out = {"settings": vars(a), "train": len(ds.x_train), "test": len(ds.x_test), "runs": runs}
    with open(a.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for run in runs:
        label = "non-private" if run["target_epsilon"] is None else f"ε = {run['target_epsilon']:g}"
        h = run["history"]
        ax.plot([r["epoch"] for r in h], [r["test_accuracy"] for r in h], marker=".", label=label)
    ax.set(
        xlabel="epoch",
        ylabel="test accuracy",
        title=f"DP-SGD on MNIST-1D ({len(ds.x_train)} train, δ = 1e-5, C = {a.clip:g})",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=120)


if __name__ == "__main__":
    main()
