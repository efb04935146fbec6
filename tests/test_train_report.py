"""What ``fit`` reports: ``FitResult.privacy``, metric writers (JSONL, TensorBoard) and
``plot_history`` over every numeric metric."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import private_key

from jaxgrad import privacy as dp
from jaxgrad.train import PrivacyConfig, fit
from jaxgrad.train.plot import panels, plot_history
from jaxgrad.train.writers import JsonlWriter, TensorBoardWriter

jax.config.update("jax_enable_x64", True)


def _problem(n=24):
    x = jax.random.normal(jax.random.key(0), (n, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5])
    loss = lambda w, ex: (ex[0] @ w - ex[1]) ** 2
    return loss, jnp.zeros(3), (x, y)


def test_fit_result_carries_the_privacy_of_a_dp_run_and_unpacks_in_three():
    loss, w, data = _problem()
    config = PrivacyConfig(l2_clip=1.0, noise_multiplier=1.3, delta=1e-5, accountant="rdp")
    result = fit(
        loss,
        w,
        data,
        optimizer=optax.sgd(0.1),
        epochs=2,
        batch_size=6,
        key=private_key(1),
        privacy=config,
        quiet=True,
    )
    params, state, history = result  # the three-way unpacking still works
    assert params is result.params and len(history) == 2
    steps = int(state.step)
    assert steps == 8 and result.privacy["steps"] == steps
    assert result.privacy["noise_multiplier"] == 1.3 and result.privacy["delta"] == 1e-5
    expected = dp.epsilon(
        noise_multiplier=1.3, sampling_rate=6 / 24, steps=steps, delta=1e-5, accountant="rdp"
    )
    np.testing.assert_allclose(result.privacy["epsilon"], expected, rtol=1e-12)
    np.testing.assert_allclose(history[-1]["epsilon"], expected, rtol=1e-12)

    plain = fit(
        loss,
        w,
        data,
        optimizer=optax.sgd(0.1),
        epochs=1,
        batch_size=6,
        key=jax.random.key(1),
        quiet=True,
    )
    assert plain.privacy is None


def test_a_private_run_releases_no_wall_clock_time(tmp_path, capsys):
    """Its times follow its realised (private) batch sizes: not in the history, not on the
    progress bar (no elapsed time, rate or time left), not as TensorBoard's wall times."""
    loss, w, data = _problem()
    board = TensorBoardWriter(tmp_path / "tb")
    config = PrivacyConfig(l2_clip=1.0, noise_multiplier=1.3, delta=1e-5, accountant="rdp")
    kw = dict(optimizer=optax.sgd(0.1), epochs=2, batch_size=6, progress="bar")
    result = fit(loss, w, data, key=private_key(1), privacy=config, metric_writers=[board], **kw)
    board.close()
    bar = capsys.readouterr().err
    assert "8/8" in bar and "epsilon=" in bar  # the bar ran, and showed the spent ε
    for timing in ("step/s", "s/step", "<", "00:"):
        assert timing not in bar, bar
    assert all("seconds" not in r for r in result.history)
    scalars = _tensorboard_scalars(tmp_path / "tb")
    assert set(scalars) == {"epsilon", "wall_time"} and set(scalars["wall_time"]) == {0.0}
    fit(loss, w, data, key=jax.random.key(1), **kw)  # a plain run's bar is timed
    timed = capsys.readouterr().err
    assert "00:" in timed and ("step/s" in timed or "s/step" in timed), timed


class _ListWriter:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(dict(record))


def _tensorboard_scalars(logdir):
    """``{tag: [(step, value), ...]}`` read back from the TFRecord event files in ``logdir``."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(logdir.iterdir()):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4  # length, its CRC, the record, its CRC
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
                out.setdefault("wall_time", []).append(event.wall_time)
    return out


def test_metric_writers_get_every_record(tmp_path):
    loss, w, data = _problem()
    evaluate = lambda p: {"val_loss": float(jnp.sum(p**2)), "test_accuracy": 0.5}
    mine = _ListWriter()
    board = TensorBoardWriter(tmp_path / "tb")
    result = fit(
        loss,
        w,
        data,
        optimizer=optax.sgd(0.05),
        epochs=3,
        batch_size=8,
        key=jax.random.key(2),
        evaluate=evaluate,
        quiet=True,
        metrics_path=tmp_path / "m.jsonl",
        metric_writers=[mine, board],
    )
    board.close()
    assert mine.records == result.history
    lines = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert lines == result.history
    scalars = _tensorboard_scalars(tmp_path / "tb")
    assert set(scalars) == {"loss", "val_loss", "test_accuracy", "seconds", "wall_time"}
    assert min(scalars["wall_time"]) > 1.6e9  # when they were written (after 2020)
    for tag in ("loss", "val_loss"):
        expected = [(r["step"], r[tag]) for r in result.history]
        assert [s for s, _ in scalars[tag]] == [3, 6, 9]
        np.testing.assert_allclose(
            [v for _, v in scalars[tag]], [v for _, v in expected], rtol=1e-6
        )  # TensorBoard stores float32

    with pytest.raises(TypeError, match="`metric_writers` items must have a write"):
        fit(
            loss,
            w,
            data,
            optimizer=optax.sgd(0.1),
            epochs=1,
            batch_size=8,
            key=jax.random.key(0),
            metric_writers=["m.jsonl"],
        )
    with pytest.raises(TypeError, match="`metric_writers` must be a list"):
        fit(
            loss,
            w,
            data,
            optimizer=optax.sgd(0.1),
            epochs=1,
            batch_size=8,
            key=jax.random.key(0),
            metric_writers=JsonlWriter(tmp_path / "x"),
        )


def test_plot_history_draws_every_numeric_metric_and_no_empty_panel(tmp_path):
    history = [
        {
            "epoch": e,
            "step": 10 * e,
            "loss": 1.0 / e,
            "val_loss": 1.1 / e,
            "epsilon": 0.2 * e,
            "train_accuracy": 0.5 + e / 10,
            "test_accuracy": 0.4 + e / 10,
            "seconds": 1.0 * e,
            "note": "text",
            "lr": 0.1,
        }
        for e in (1, 2, 3)
    ]
    history[1]["grad_norm"] = 3.0  # a metric only some epochs have
    assert panels(history) == {
        "loss": ["loss", "val_loss"],
        "epsilon": ["epsilon"],
        "accuracy": ["train_accuracy", "test_accuracy"],
        "lr": ["lr"],
        "grad_norm": ["grad_norm"],
    }
    path = plot_history(history, tmp_path / "h.png", title="t")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # Only user metrics, no loss at all: still plotted (the old plot drew an empty loss panel).
    assert panels([{"epoch": 1, "val_f1": 0.3}]) == {"f1": ["val_f1"]}
    plot_history([{"epoch": 1, "val_f1": 0.3}], tmp_path / "f1.png")
    with pytest.raises(ValueError, match="no numeric metric"):
        plot_history([{"epoch": 1, "step": 3, "seconds": 0.1}], tmp_path / "none.png")
