"""What the command-line tools share: output paths checked before any work."""

from __future__ import annotations

from jaxgrad._paths import file_write_error

_EXAMPLE_NAMES = {
    "--json": "results.json",
    "--markdown": "results.md",
    "--plot": "curves.png",
    "--metrics-jsonl": "metrics.jsonl",
}


def check_writable(flag: str, path, parser) -> None:
    """Fails (``parser.error``) before any work when the file ``path`` cannot be written.

    The message names the flag and the path the user gave, and what is wrong with it
    (:func:`jaxgrad._paths.file_write_error`): a directory given for a file (``--json
    /tmp``), a missing directory or one that is a file, or a file or directory that writing
    fails in. (A checkpoint directory is :func:`jaxgrad.train.checkpoint.check_directory`'s.)

    Args:
      flag: the option, e.g. ``"--json"``.
      path: its value (None: not given, nothing checked).
      parser: the ``argparse.ArgumentParser`` whose ``error`` reports it.
    """
    if path is None:
        return
    if (why := file_write_error(path, _EXAMPLE_NAMES.get(flag, "results"))) is not None:
        parser.error(f"{flag} {path!r}{why}")
