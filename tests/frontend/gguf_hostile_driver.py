"""Run ``bitnet-coreml inspect FILE`` on each argument in this one process; print a JSON list of results.

Used by ``test_gguf_hostile.py`` under an address-space limit and a timeout (one process for the whole
corpus keeps the test fast: the imports are paid once). Each result: the file, the exit code the CLI
ended with, and what it wrote to stderr.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

from bitnet_coreml.cli import main


def run(path: str) -> dict[str, object]:
    err = io.StringIO()
    code: object = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main.main(args=["inspect", path], prog_name="bitnet-coreml", standalone_mode=True)
        except SystemExit as e:
            code = e.code
    return {"file": path, "code": code, "stderr": err.getvalue()}


if __name__ == "__main__":
    sys.stdout.write(json.dumps([run(p) for p in sys.argv[1:]]) + "\n")
