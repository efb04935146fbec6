"""Progress reporting for :func:`jaxgrad.train.fit`: a tqdm bar, plain lines, or nothing.

tqdm is optional: without it a terminal gets one plain line per epoch. Off a terminal
(logs, CI, pipes) the default is silent.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping

MODES = ("auto", "bar", "plain", "none")


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def resolve(mode: str = "auto", *, quiet: bool = False, stream=None) -> str:
    """The concrete mode: ``"bar"``, ``"plain"`` or ``"none"``.

    ``"auto"`` is a bar on a terminal with tqdm installed, plain lines on a terminal without
    it, and nothing off a terminal; ``quiet`` always means nothing.
    """
    if mode not in MODES:
        raise ValueError(f"`progress` must be one of {list(MODES)}; got {mode!r}")
    stream = sys.stderr if stream is None else stream
    if quiet or mode == "none":
        return "none"
    if mode == "auto":
        if not getattr(stream, "isatty", lambda: False)():
            return "none"
        mode = "bar"
    if mode == "bar" and _tqdm() is None:
        return "plain"
    return mode


def format_record(record: dict, *, epoch_seconds: float | None = None) -> str:
    """``epoch 3  step 135  loss 0.1234  (0.7 s this epoch, 2.1 s in all)``."""
    parts = [f"epoch {record['epoch']}"]
    for k, v in record.items():
        if k in ("epoch", "seconds"):
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    if "seconds" in record and epoch_seconds is not None:
        parts.append(f"({epoch_seconds:.1f} s this epoch, {record['seconds']:.1f} s in all)")
    elif "seconds" in record:
        parts.append(f"({record['seconds']:.1f} s)")
    return "  ".join(parts)


class Progress:
    """Steps done out of ``total``; call :meth:`update` per chunk and :meth:`epoch` per epoch."""

    def __init__(
        self,
        total: int,
        *,
        mode: str = "auto",
        quiet: bool = False,
        initial: int = 0,
        desc: str = "train",
        stream=None,
        timed: bool = True,
    ):
        self.stream = sys.stderr if stream is None else stream
        self.mode = resolve(mode, quiet=quiet, stream=self.stream)
        self.bar = None
        if self.mode == "bar":
            self.bar = _tqdm()(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
                # Untimed (a private run, whose wall-clock times follow its realised, private
                # batch sizes): the bar without tqdm's elapsed time, rate and remaining time.
                **({} if timed else {"bar_format": "{l_bar}{bar}| {n_fmt}/{total_fmt}{postfix}"}),
            )

    def update(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def epoch(self, record: dict) -> None:
        if self.bar is not None:
            shown = {k: v for k, v in record.items() if k not in ("step", "seconds")}
            self.bar.set_postfix(
                {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in shown.items()},
                refresh=True,
            )
        elif self.mode == "plain":
            seconds = record.get("seconds")
            last, self._last_seconds = getattr(self, "_last_seconds", 0.0), seconds
            took = None if seconds is None else seconds - (last or 0.0)
            print(format_record(record, epoch_seconds=took), file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """A message that does not break the bar (silent in ``"none"`` mode)."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        elif self.mode == "plain":
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def strict_json(value):
    """``value`` with every non-finite float written as the string ``"inf"``, ``"-inf"`` or
    ``"nan"`` (e.g. ε = ∞ for σ = 0): ``json.dump`` would write ``Infinity``, which is not JSON
    and which strict parsers (``jq``, JavaScript's ``JSON.parse``) refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def end_epoch(record: dict, *, params, evaluate, start: float, history: list, bar, writers=()):
    """Completes an epoch's ``record`` (``evaluate(params)`` metrics, seconds since ``start``
    unless ``start`` is None),
    appends it to ``history``, shows it on ``bar`` and gives it to every metric writer."""
    if evaluate is not None:
        reserved = tuple(dict.fromkeys((*record, "loss", "seconds")))
        record.update(_metrics(evaluate(params), reserved=reserved))
    if start is not None:  # None for a private run: its times depend on the private draws
        record["seconds"] = time.perf_counter() - start
    history.append(record)
    bar.epoch(record)
    for writer in writers:
        writer.write(record)


def _metrics(metrics, *, reserved) -> dict:
    """``evaluate``'s ``{name: number}`` as floats; a name the record already has is an error
    (``{"loss": test_loss}`` would silently replace the epoch's training loss)."""
    if not isinstance(metrics, Mapping):
        raise TypeError(
            "`evaluate` must return a mapping {name: number} (e.g. {'test_accuracy': 0.9}); got "
            f"a {type(metrics).__name__}: {metrics!r}"[:300]
        )
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise TypeError(f"`evaluate` metric names must be strings; got {name!r}")
        if name in reserved:
            raise ValueError(
                f"`evaluate` returned a metric named {name!r}, which the epoch record already "
                f"holds ({', '.join(map(repr, reserved))}); name it otherwise, e.g. 'test_{name}'"
            )
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"`evaluate` metric {name!r} must be one number; got {value!r}"[:300]
            ) from None
    return out
