"""Run the hostile corpus's CLI invocations in one process, each under its own timer.

``python -m tests.hostile.runner SPEC.json RESULTS.jsonl``. SPEC is ``{"timeout_s": 30, "cases":
[{"id": ..., "argv": [...]}, ...]}``; for each case one JSON line is appended to RESULTS: its exit code,
what it wrote to stdout and stderr (file descriptors 1 and 2, so native libraries' output is caught too),
the files it opened (every ``open``/``os.open`` seen by an audit hook) and its wall time. A case that
outlives its timer is recorded as ``timeout`` and the process exits; the parent restarts it with the cases
after it. The parent caps the address space (RLIMIT_AS) before this process starts.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from typing import Any

_opened: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        p = args[0]
        _opened.append(os.fsdecode(p))


def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    from bitnet_coreml import cli  # imported once for every case

    sys.addaudithook(_audit)
    out = open(out_path, "a", buffering=1)
    saved = os.dup(1), os.dup(2)
    for case in spec["cases"]:
        fo, fe = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fo.fileno(), 1)
        os.dup2(fe.fileno(), 2)
        _opened.clear()
        t0 = time.perf_counter()

        def _record(code: Any, *, timeout: bool = False, _case: dict[str, Any] = case,
                    _fo: Any = fo, _fe: Any = fe, _t0: float = t0) -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            texts = []
            for f in (_fo, _fe):
                f.seek(0)
                texts.append(f.read().decode("utf-8", "replace"))
            out.write(json.dumps({"id": _case["id"], "exit_code": code, "stdout": texts[0][-20000:],
                                  "stderr": texts[1][-20000:], "opened": sorted(set(_opened)),
                                  "seconds": time.perf_counter() - _t0, "timeout": timeout}) + "\n")

        def _on_alarm(signum: int, frame: Any) -> None:
            _record(None, timeout=True)
            out.flush()
            os._exit(0)

        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, float(spec["timeout_s"]))
        try:
            cli.main(case["argv"], prog_name="bitnet-coreml", standalone_mode=True)
            code: Any = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # noqa: BLE001  # escaped the guard: record it as what a user would see
            import traceback

            traceback.print_exception(e)
            code = "escaped"
        signal.setitimer(signal.ITIMER_REAL, 0)
        _record(code)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        fo.close()
        fe.close()
    out.close()


if __name__ == "__main__":
    main()
