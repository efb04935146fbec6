"""What the command-line tools share: output paths checked before any work."""

from __future__ import annotations

import errno
import os

from jaxgrad._paths import write_error

_EXAMPLE_NAMES = {"--json": "results.json", "--markdown": "results.md", "--plot": "curves.png"}


def check_writable(flag: str, path, parser) -> None:
    """Fails (``parser.error``) before any work when the file ``path`` cannot be written.

    The message names the flag and the path the user gave, and what is wrong with it: a
    directory given for a file (``--json /tmp``), a missing directory, or a file or directory
    that writing fails in. Writing is tried (an existing file opened for appending, else a
    temporary file made and removed next to it), not read off permission bits, which root
    passes on read-only and virtual file systems such as ``/proc``. (A checkpoint directory
    is :func:`jaxgrad.train.checkpoint.check_directory`'s.)

    Args:
      flag: the option, e.g. ``"--json"``.
      path: its value (None: not given, nothing checked).
      parser: the ``argparse.ArgumentParser`` whose ``error`` reports it.
    """
    if path is None:
        return
    if os.path.isdir(path):
        example = os.path.join(path, _EXAMPLE_NAMES.get(flag, "results"))
        parser.error(f"{flag} {path!r} is a directory; expected a file name, e.g. {example!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        parser.error(f"{flag} {path!r}: the directory {parent!r} does not exist; create it first")
    if os.path.exists(path):
        try:  # appending nothing changes nothing; non-blocking, as a FIFO may have no reader yet
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: a FIFO without a reader yet, written later
                parser.error(f"{flag} {path!r} exists and is not writable: {e.strerror}")
    elif (why := write_error(parent)) is not None:
        parser.error(f"{flag} {path!r}: the directory {parent!r} is not writable: {why}")
