"""``python -m jaxgrad.train``: train a bundled model on data that ships offline.

Example::

  python -m jaxgrad.train --model mlp --data digits --epochs 30 --strategy per-example \\
      --json out.json --plot curves.png

The command line's parts: its options and parser (:mod:`jaxgrad.train._cli_args`), their
checks (:mod:`jaxgrad.train._cli_checks`), what they build (:mod:`jaxgrad.train._cli_build`,
and :mod:`jaxgrad.train._cli_privacy` for --dp), the run (:mod:`jaxgrad.train._cli_run`) and
what it reports (:mod:`jaxgrad.train._cli_report`).
"""

from __future__ import annotations

import sys

from jaxgrad.train._cli_args import build_parser
from jaxgrad.train._cli_run import run

__all__ = ["build_parser", "main", "run"]


def main(argv=None) -> int:
    """Runs the command line on ``argv`` (default: ``sys.argv[1:]``).

    Args:
      argv: the arguments, without the program's name.

    Returns:
      The exit code: 0, 1 at a non-finite loss, 2 at a checkpoint error (a bad argument
      exits 2 from the parser), 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from jaxgrad.train import CheckpointError, NonFiniteLossError

    try:
        run(args, parser)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:  # a user's directory or files: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = (
            f" resume with the same command ({args.checkpoint_dir})" if args.checkpoint_dir else ""
        )
        print(f"interrupted.{where}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
