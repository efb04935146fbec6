"""Runs doc blocks, each in a fresh process forked from one that has imported jaxgrad.

tests/test_docs.py starts one per test process. A block used to pay for a whole interpreter
and ``import jaxgrad`` (2.2 s of CPU each, 30 blocks); a fork of this process pays for neither.
Each block still runs alone: a fresh process and namespace (``__name__ == "__main__"``),
its own working directory, nothing of the blocks before it but the modules ``import jaxgrad``
and the imports below loaded (in ``sys.modules``, not in the block's namespace), which the
block itself loads first in a fresh interpreter. jax's CPU client is
never created here, so each block creates its own, as a fresh interpreter would (with the
emulated devices it asks for; jax itself warns on a fork after that).

Protocol, one line each way per block: read ``{"code": path, "cwd": dir, "out": path,
"err": path}`` as JSON on stdin; write ``{"pid": child}`` when the block starts and
``{"status": exit status}`` when it ends.
"""

import json
import os
import sys
import traceback

# jaxgrad: what every block imports first. dp-accounting and scikit-learn's datasets: what
# most blocks load next, through jaxgrad (ε; the digits), 1.3 s and 1.8 s of CPU per block
# that pays for them. A block's namespace is still its own, as in a fresh interpreter.
import dp_accounting  # noqa: F401
import sklearn.datasets  # noqa: F401

import jaxgrad  # noqa: F401


def _run_block(request: dict) -> int:
    """In the forked child: the block's output to its files, then the block."""
    os.chdir(request["cwd"])
    sys.argv, sys.path[0] = ["-c"], ""  # as `python -c`: the working directory first
    for fd, name in ((1, "out"), (2, "err")):
        target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    with open(request["code"]) as f:
        code = compile(f.read(), "<block>", "exec")
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            status = _run_block(request)
            # A normal interpreter exit (atexit handlers, non-daemon threads joined, files
            # flushed), as when the block runs as a script; never back into this loop.
            sys.stdout.flush()
            sys.stderr.flush()
            sys.exit(status)
        print(json.dumps({"pid": pid}), flush=True)
        _, wait_status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(wait_status)}), flush=True)


if __name__ == "__main__":
    main()
