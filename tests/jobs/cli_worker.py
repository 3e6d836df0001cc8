"""Runs `cellray` commands (and small Python snippets) for the scheduler tests, in one long-lived process.

Why a separate process: the test session may already hold its own local Ray (tests/conftest.py `ray_local`), and a
process connects to one Ray cluster at a time. Why long-lived: connecting to the cluster costs seconds; this
process connects once (on its first command) and stays connected, as a user's shell sessions would not, but the
commands are the same `jobs.cli.main(argv)` a user runs.

Protocol: one JSON request per stdin line, {"argv": [...]} or {"py": "code"} (a snippet that may set `result`);
one JSON reply per line on the original stdout: {"rc", "out", "err", "value"}. Everything else this process
prints (Ray's own logs) goes to stderr.
"""

import contextlib
import io
import json
import logging
import os
import sys
import traceback

reply = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # fd 1 now goes to stderr: stray output cannot corrupt the replies
sys.stdout = os.fdopen(1, "w", buffering=1)
logging.basicConfig(level=logging.INFO, stream=sys.__stderr__, format="%(levelname)s %(name)s: %(message)s")

from jobs.cli import main  # noqa: E402 (after the logging set-up above)

namespace: dict = {}
for line in sys.stdin:
    request = json.loads(line)
    out, err = io.StringIO(), io.StringIO()
    rc, value = None, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if "argv" in request:
                rc = main(request["argv"])
            else:
                namespace.pop("result", None)
                exec(request["py"], namespace)  # noqa: S102  (test snippets)
                value = namespace.get("result")
                rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException:
            err.write(traceback.format_exc())
            rc = -1
    reply.write(
        json.dumps({"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "value": value}, default=str) + "\n"
    )
    reply.flush()
sys.stderr.flush()
os._exit(0)  # at the end of the tests the cluster is gone: skip Ray's shutdown handshake with it
