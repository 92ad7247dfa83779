"""Probe a compute unit in a subprocess before trusting it in-process.

``python -m bitnet_coreml.runtime.probe PACKAGE UNIT [--fp32]`` loads the package for UNIT, runs one
prediction on all-zero inputs, prints one JSON line and exits 0 (healthy) or 1 (a classified error).
Core ML can SIGKILL the process on the first prediction after a failed ANE compile
(coremltools #2758), so the parent (:func:`run_probe`) treats death by signal or a hang past the
timeout as a failed unit, and only then loads the unit in its own process.

The child is started as ``python *entry PACKAGE *args`` with the unit's
:meth:`~bitnet_coreml.runtime.units.Unit.probe_entry` (``-m`` and this module) and
:meth:`~bitnet_coreml.runtime.units.Unit.probe_args`; nothing here reads a test switch (the tests'
faulty probe is an entry of their own, ``tests/support/faulty_probe.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitnet_coreml import errors as _errors
from bitnet_coreml.errors import (
    BitnetCoremlError,
    DeviceInitError,
    InternalError,
    ModelError,
    RuntimeFailure,
    TimeoutFailure,
)

# ``python`` arguments that start the probe child before PACKAGE and the unit's arguments.
PROBE_ENTRY: tuple[str, ...] = ("-m", "bitnet_coreml.runtime.probe")


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What a probe found: healthy or the classified error, with the child's timings."""

    unit: str
    ok: bool
    seconds: float
    returncode: int | None
    error: BitnetCoremlError | None = None  # a RuntimeFailure, or InternalError for a bug in the child
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "ok": self.ok, "seconds": self.seconds, "returncode": self.returncode,
                "error_type": type(self.error).__name__ if self.error else None,
                "error": str(self.error) if self.error else None, "detail": self.detail}


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def run_probe(package: str | os.PathLike[str], unit_name: str, unit_args: Sequence[str], *, timeout_s: float,
              entry: Sequence[str] = PROBE_ENTRY) -> ProbeResult:
    """Spawn the probe for one unit (``python *entry PACKAGE *unit_args``) and classify what happened."""
    env = dict(os.environ)
    # The child must import this very package even when it is not installed (e.g. run from a checkout).
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, *entry, str(package), *unit_args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        dt = time.perf_counter() - t0
        return ProbeResult(unit_name, False, dt, proc.returncode, TimeoutFailure(
            f"{unit_name}: probe did not finish within {timeout_s:g} s (killed); the unit hangs on this package"))
    dt = time.perf_counter() - t0
    rc = proc.returncode
    if rc < 0:
        return ProbeResult(unit_name, False, dt, rc, ModelError(
            f"{unit_name}: probe process was killed by {_signal_name(-rc)} at its first prediction "
            "(Core ML does this when the compile for this unit failed, coremltools #2758)"),
            {"stderr_tail": err[-500:]})
    report = _last_json(out)
    if rc == 0 and report.get("ok"):
        return ProbeResult(unit_name, True, dt, rc, None, report)
    bug = report.get("bug")
    if isinstance(bug, dict):  # a bug is a bug in the parent too: never a failed unit to fall back from
        return ProbeResult(unit_name, False, dt, rc, _child_bug(unit_name, bug), report)
    cls = getattr(_errors, str(report.get("error_type")), None)
    if not (isinstance(cls, type) and issubclass(cls, RuntimeFailure)):
        cls = DeviceInitError
    msg = report.get("message") or f"probe exited with code {rc}: {' '.join(err.split())[-300:]}"
    return ProbeResult(unit_name, False, dt, rc, cls(f"{unit_name}: probe failed: {msg}"), report)


def _child_bug(unit_name: str, bug: dict[str, Any]) -> InternalError:
    """The child's bug as the parent's :class:`InternalError`: the original type name and message, and
    the child's traceback as a note of its cause (``--debug`` prints it)."""
    name = str(bug.get("type") or "Exception")
    cls = type(name if name.isidentifier() else "Exception", (Exception,), {"__module__": "probe child"})
    cause = cls(str(bug.get("message", "")))
    if bug.get("traceback"):
        note = f"in the probe child:\n{bug['traceback']}"
        if hasattr(cause, "add_note"):
            cause.add_note(note)
        else:  # Python 3.10: PEP 678's attribute itself (_guard prints it with --debug there)
            cause.__notes__ = [note]  # type: ignore[attr-defined]
    err = InternalError(f"{unit_name} probe", cause)
    err.__cause__ = cause
    return err


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return {}


def main(argv: list[str] | None = None) -> int:
    """Child entry point; prints one JSON line."""
    import argparse

    from bitnet_coreml.runtime.monitor import read_platform
    from bitnet_coreml.runtime.package_io import read_package, zeros_for
    from bitnet_coreml.runtime.recovery import classify_exception
    from bitnet_coreml.runtime.strategy import ComputeUnit
    from bitnet_coreml.runtime.units import CoreMLUnit, ReferenceUnit, Unit

    ap = argparse.ArgumentParser(prog="python -m bitnet_coreml.runtime.probe")
    ap.add_argument("package")
    ap.add_argument("unit")
    ap.add_argument("--fp32", action="store_true")
    a = ap.parse_args(argv)
    try:
        kind = ComputeUnit.parse(a.unit)
        unit: Unit = ReferenceUnit(fp32=a.fp32) if kind is ComputeUnit.REFERENCE else CoreMLUnit(kind, probe=False)
        info = read_package(a.package)
        why = unit.unavailable(read_platform(), info)
        if why is not None:
            raise why
        t0 = time.perf_counter()
        unit.load(info)
        t1 = time.perf_counter()
        outputs = unit.predict(zeros_for(info))
        t2 = time.perf_counter()
        report = {"ok": True, "unit": unit.name, "load_s": t1 - t0, "predict_s": t2 - t1,
                  "outputs": {k: list(v.shape) for k, v in outputs.items()}}
        code = 0
    except Exception as e:  # noqa: BLE001 - report every failure to the parent as one classified JSON line
        err = classify_exception(e, context=f"probe {a.unit}")
        report = {"ok": False, "unit": a.unit, "error_type": type(err).__name__, "message": err.one_line()}
        if isinstance(err, InternalError):  # a bug: the parent raises it as one, with this traceback
            import traceback

            report["bug"] = {"type": type(err.original).__name__, "message": " ".join(str(err.original).split()),
                             "traceback": "".join(traceback.format_exception(err.original))[-4000:]}
        code = 1
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
