"""What the command-line tools share: output paths checked before any work."""

from __future__ import annotations

import os

_EXAMPLE_NAMES = {"--json": "results.json", "--markdown": "results.md", "--plot": "curves.png"}


def check_writable(flag: str, path, parser, *, directory: bool = False) -> None:
    """Fails (``parser.error``) before any work when ``path`` cannot be written.

    The message names the flag and the path the user gave, and what is wrong with it: a
    directory given for a file (``--json /tmp``), a missing or read-only directory.

    Args:
      flag: the option, e.g. ``"--json"``.
      path: its value (None: not given, nothing checked).
      parser: the ``argparse.ArgumentParser`` whose ``error`` reports it.
      directory: whether ``path`` names a directory (made if missing) rather than a file.
    """
    if path is None:
        return
    if directory:
        if os.path.exists(path) and not os.path.isdir(path):
            parser.error(f"{flag} {path!r} is a file; expected a directory (or a new path)")
        probe = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        while not os.path.exists(probe):  # the nearest existing ancestor is where it is made
            probe = os.path.dirname(probe)
    else:
        if os.path.isdir(path):
            example = os.path.join(path, _EXAMPLE_NAMES.get(flag, "results"))
            parser.error(f"{flag} {path!r} is a directory; expected a file name, e.g. {example!r}")
        probe = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(probe):
            parser.error(
                f"{flag} {path!r}: the directory {probe!r} does not exist; create it first"
            )
        if os.path.exists(path) and not os.access(path, os.W_OK):
            parser.error(f"{flag} {path!r} exists and is not writable")
    if not os.access(probe, os.W_OK | os.X_OK):
        parser.error(f"{flag} {path!r}: the directory {probe!r} is not writable")
