"""Whether files can be written in a directory, tried rather than read off permission bits
(the CLIs' output checks and the checkpoint directory's: no JAX import here)."""

from __future__ import annotations

import os
import tempfile


def write_error(directory) -> str | None:
    """Why files cannot be written in ``directory``, or None when they can.

    It is tried: ``directory`` is made (with its parents) if missing and left in place, and a
    temporary file is created in it and removed. Permission bits (``os.access``) are not
    enough: root passes them on read-only and virtual file systems (``/proc``), and under a
    regular file that happens to be executable.

    Args:
      directory: the directory.

    Returns:
      None, or what failed, e.g. ``"'/proc/x': No such file or directory"``.
    """
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"{e.filename!r}: {e.strerror}" if e.filename and e.strerror else str(e)
    return None
