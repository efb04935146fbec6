"""Metric writers for :func:`jaxgrad.train.fit`: every epoch's record, as it is made.

A writer is any object with ``write(record: dict)``; ``fit(..., metric_writers=[...])`` calls
it once per epoch with the record it appends to the history (``epoch``, ``step``, ``loss``,
``seconds``, the ``evaluate`` metrics and, for a private run, ``epsilon``). Both writers here
flush on every write, so what an interrupted run wrote is readable; ``fit`` closes only the
writer it makes itself for ``metrics_path``.
"""

from __future__ import annotations

import json
import numbers
import os

from jaxgrad._optional import require
from jaxgrad.train.progress import strict_json


class JsonlWriter:
    """Appends every record to ``path`` as one JSON line (``fit``'s ``metrics_path``).

    Non-finite numbers are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (strict
    JSON has no ``Infinity``).

    Args:
      path: the file to append to (made on the first write).

    Example::

      >>> import json, os, tempfile
      >>> from jaxgrad.train.writers import JsonlWriter
      >>> path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
      >>> w = JsonlWriter(path); w.write({"epoch": 1, "loss": 0.5}); w.close()
      >>> [json.loads(line) for line in open(path)]
      [{'epoch': 1, 'loss': 0.5}]
    """

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"`path` must be a file path (str or os.PathLike); got {path!r}")
        self.path = os.fspath(path)
        self._file = None

    def write(self, record: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(strict_json(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def scalars(record: dict) -> dict[str, float]:
    """The numeric metrics of a record (bools, strings, ``epoch`` and ``step`` left out)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in ("epoch", "step") and isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


class TensorBoardWriter:
    """Writes every numeric metric of a record as a TensorBoard scalar at the record's step
    (stamped with the time it is written, or 0 for a record without ``seconds``: a private
    run's).

    Needs ``tensorboardX`` (``pip install 'jaxgrad[tensorboard]'``); ``tensorboard --logdir``
    then shows the curves.

    Args:
      logdir: the run's directory for event files.

    Example::

      >>> import tempfile
      >>> from jaxgrad.train.writers import TensorBoardWriter
      >>> w = TensorBoardWriter(tempfile.mkdtemp())
      >>> w.write({"epoch": 1, "step": 10, "loss": 0.5, "test_accuracy": 0.9}); w.close()
    """

    def __init__(self, logdir: str | os.PathLike):
        if not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(f"`logdir` must be a directory path; got {logdir!r}")
        tensorboardx = require(
            "tensorboardX",
            package="tensorboardX",
            extra="tensorboard",
            needed_for="jaxgrad.train.writers.TensorBoardWriter",
        )
        self.logdir = os.fspath(logdir)
        self._writer = tensorboardx.SummaryWriter(self.logdir)

    def write(self, record: dict) -> None:
        step = int(record.get("step", record.get("epoch", 0)))
        # TensorBoard stamps every scalar with a wall-clock time. A record without its
        # ``seconds`` is a private run's, whose times follow its private batch sizes and are
        # not released: its scalars are stamped 0.
        walltime = None if "seconds" in record else 0.0
        for name, value in scalars(record).items():
            self._writer.add_scalar(name, value, global_step=step, walltime=walltime)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def check_writers(writers) -> list:
    """``metric_writers`` as a list, each with a ``write(record)`` method.

    Raises:
      TypeError: naming ``metric_writers`` and the item that is not a writer.
    """
    if writers is None:
        return []
    if not isinstance(writers, (list, tuple)):
        raise TypeError(
            "`metric_writers` must be a list of writers with write(record), e.g. "
            f"[jaxgrad.train.writers.TensorBoardWriter('runs/1')]; got {writers!r}"[:300]
        )
    for w in writers:
        if not callable(getattr(w, "write", None)):
            raise TypeError(
                "`metric_writers` items must have a write(record: dict) method (see "
                f"jaxgrad.train.writers); got {w!r}"[:300]
            )
    return list(writers)
