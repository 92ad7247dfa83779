"""A daemon worker thread per unit, so a call can be abandoned when it exceeds the unit's timeout.

Python cannot interrupt a thread stuck inside Core ML or numpy. The predictor waits for the result
with a timeout; on expiry it abandons the worker (a daemon thread, so it never blocks interpreter
exit) and never uses that unit again. A persistent thread keeps the per-call cost to a queue hand-off.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class _Job:
    __slots__ = ("fn", "args", "done", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Worker:
    """Runs calls one at a time on its own daemon thread."""

    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._t = threading.Thread(target=self._run, name=f"bitnet-coreml-{name}", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            try:
                job.result = job.fn(*job.args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who classifies it
                job.error = e
            job.done.set()

    def call(self, timeout_s: float, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """``(True, result)``, or ``(False, None)`` if the call did not finish in ``timeout_s``.

        Exceptions raised by ``fn`` are re-raised here.
        """
        job = _Job(fn, args)
        self._q.put(job)
        if not job.done.wait(timeout_s):
            return False, None
        if job.error is not None:
            raise job.error
        return True, job.result

    def stop(self) -> None:
        """Let the thread exit after its current job (if it ever returns)."""
        self._q.put(None)
