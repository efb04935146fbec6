"""Whether files can be written in a directory or to a path, tried rather than read off
permission bits (the CLIs' output checks, ``fit``'s ``metrics_path`` and the checkpoint
directory's: no JAX import here)."""

from __future__ import annotations

import errno
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


def file_write_error(path, example: str = "results") -> str | None:
    """Why the file ``path`` cannot be written, or None when it can; nothing is made.

    What is wrong is told as the rest of a sentence that starts with the path's name and
    value (``f"--json {path!r}{why}"``): a directory given for a file, a missing parent
    directory, a parent that is a file, or a file or directory that writing fails in. Writing
    is tried (an existing file opened for appending, else a temporary file made and removed
    next to it), not read off permission bits, which root passes on read-only and virtual
    file systems such as ``/proc``.

    Args:
      path: the file.
      example: a file name to suggest when ``path`` is a directory, e.g. ``"results.json"``.

    Returns:
      None, or e.g. ``" is a directory; expected a file name, e.g. '/tmp/results.json'"`` or
      ``": the directory '/x' does not exist; create it first"``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        suggestion = os.path.join(path, example)
        return f" is a directory; expected a file name, e.g. {suggestion!r}"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        above = parent  # the nearest existing path above: a file there is the real problem
        while not os.path.lexists(above) and os.path.dirname(above) != above:
            above = os.path.dirname(above)
        if os.path.lexists(above) and not os.path.isdir(above):
            return f": {above!r} is a file, not a directory"
        return f": the directory {parent!r} does not exist; create it first"
    if os.path.exists(path):
        try:  # appending nothing changes nothing; non-blocking, as a FIFO may have no reader yet
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: a FIFO without a reader yet, written later
                return f" exists and is not writable: {e.strerror}"
    elif (why := write_error(parent)) is not None:
        return f": the directory {parent!r} is not writable: {why}"
    return None
