"""A probe child that misbehaves at its first prediction: ``python -m tests.support.faulty_probe FAULT PACKAGE UNIT ...``.

``FAULT`` is ``kill`` (SIGKILL itself, as Core ML does after a failed ANE compile, coremltools #2758),
``hang:SECONDS`` (sleep) or ``bug`` (raise ``KeyError``, a bug in the child), with an optional ``#id`` suffix that only makes the command unique. The rest
is the real probe (``bitnet_coreml.runtime.probe.main``): it reads the package and loads the unit as
the product does; only the prediction is replaced.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from bitnet_coreml.runtime import probe
from bitnet_coreml.runtime.units import Unit


def main(argv: list[str]) -> int:
    fault = argv[0].split("#", 1)[0]

    def misbehave(self: Unit, inputs: Any) -> Any:
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.startswith("hang:"):
            time.sleep(float(fault.split(":", 1)[1]))
        if fault == "bug":
            raise KeyError("injected bug in the probe")
        raise SystemExit(f"faulty_probe: unknown fault {fault!r}; allowed: kill, hang:SECONDS, bug")

    Unit.predict = misbehave  # type: ignore[method-assign]
    return probe.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
