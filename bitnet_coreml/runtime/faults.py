"""Fault injection: the documented, test-only way to make a unit misbehave on the real code path.

A :class:`FaultPlan` given to the :class:`~bitnet_coreml.runtime.predictor.Predictor` (or parsed from
the ``BITNET_COREML_FAULTS`` environment variable by the ``predict`` command) wraps a unit's call:

========== ==================================================================================
kind       effect
========== ==================================================================================
raise      raise ``error`` (a class from ``bitnet_coreml.errors`` or MemoryError/TimeoutError/RuntimeError)
hang       sleep ``seconds`` inside the call, so the unit's timeout fires
nan        replace the first output's values with NaN
wrong      return ``-output + 1`` (finite, plausible, wrong)
kill_probe the unit's probe subprocess SIGKILLs itself (what an ANE compile failure does, coremltools #2758)
hang_probe the unit's probe subprocess sleeps ``seconds`` (past the probe timeout)
========== ==================================================================================

Probe faults fire only for units that are probed: the Core ML units on macOS, and a
``ReferenceUnit(probe=True)`` anywhere (how the probe machinery is tested on Linux).

Every fault fires ``count`` times (default: every call) and then stops, so a test can model a
transient failure; ``after=k`` lets the unit's first ``k`` calls through first (a failure at decode
step k of a generation). The plan can also override what monitoring observes (``thermal_state``,
``available_memory_bytes``), which is how tests reach the memory-pressure and thermal paths on a
machine that is neither hot nor short of memory.

Environment syntax (``;`` between entries)::

    BITNET_COREML_FAULTS="ane:raise:error=DeviceInitError;reference:raise:error=OperationError,count=2,after=5;thermal=serious"

Nothing in production sets a plan; with no plan the hooks cost one ``None`` check per call.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Mapping

import numpy as np

from bitnet_coreml import errors as _errors
from bitnet_coreml.errors import ConfigError

ENV_VAR = "BITNET_COREML_FAULTS"
PROBE_ENV_VAR = "BITNET_COREML_PROBE_FAULT"

KINDS = ("raise", "hang", "nan", "wrong", "kill_probe", "hang_probe")
_CALL_KINDS = {"raise", "hang", "nan", "wrong"}
_PROBE_KINDS = {"kill_probe", "hang_probe"}
_BUILTIN_ERRORS: dict[str, type[BaseException]] = {
    "MemoryError": MemoryError, "TimeoutError": TimeoutError, "RuntimeError": RuntimeError,
}


def _error_class(name: str) -> type[BaseException]:
    cls = getattr(_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, _errors.BitnetCoremlError):
        return cls
    if name in _BUILTIN_ERRORS:
        return _BUILTIN_ERRORS[name]
    known = sorted([n for n, c in vars(_errors).items() if isinstance(c, type)
                    and issubclass(c, _errors.BitnetCoremlError)] + list(_BUILTIN_ERRORS))
    raise ConfigError(f"fault error {name!r} is not an error class; allowed: {', '.join(known)}")


@dataclasses.dataclass(frozen=True)
class Fault:
    """One injected misbehaviour of one unit."""

    unit: str
    kind: str
    error: str = "OperationError"
    count: int | None = None
    seconds: float = 3600.0
    after: int = 0  # calls of the unit that pass before the fault may fire

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"fault kind {self.kind!r} for unit {self.unit!r}; allowed: {', '.join(KINDS)}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"fault count {self.count} for unit {self.unit!r}; allowed: >= 1 or unset (always)")
        if self.kind == "raise":
            _error_class(self.error)
        if self.seconds < 0:
            raise ConfigError(f"fault seconds {self.seconds} for unit {self.unit!r}; allowed: >= 0")
        if self.after < 0:
            raise ConfigError(f"fault after {self.after} for unit {self.unit!r}; allowed: >= 0")


class FaultPlan:
    """A set of faults keyed by unit name, with per-fault fire counters."""

    def __init__(self, faults: list[Fault] | tuple[Fault, ...] = (), *, thermal_state: str | None = None,
                 available_memory_bytes: int | None = None) -> None:
        self.faults = tuple(faults)
        self.thermal_state = thermal_state
        self.available_memory_bytes = available_memory_bytes
        self._fired = [0] * len(self.faults)
        self._calls: dict[str, int] = {}  # call faults asked for, per unit
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"FaultPlan({list(self.faults)!r}, thermal_state={self.thermal_state!r}, "
                f"available_memory_bytes={self.available_memory_bytes!r})")

    def fired(self, unit: str, kind: str | None = None) -> int:
        """How many times faults of ``unit`` (and ``kind``) fired so far."""
        return sum(n for f, n in zip(self.faults, self._fired, strict=True)
                   if f.unit == unit and (kind is None or f.kind == kind))

    def _take(self, unit: str, kinds: set[str], call: int = 0) -> Fault | None:
        with self._lock:
            for i, f in enumerate(self.faults):
                if f.unit == unit and f.kind in kinds and (f.count is None or self._fired[i] < f.count) \
                        and call > f.after:
                    self._fired[i] += 1
                    return f
        return None

    # --- hooks on the real code path -----------------------------------------------------------

    def take_call_fault(self, unit: str) -> Fault | None:
        """The call fault to apply to this call of ``unit`` (consumes one firing)."""
        with self._lock:
            n = self._calls[unit] = self._calls.get(unit, 0) + 1
        return self._take(unit, _CALL_KINDS, n)

    @staticmethod
    def before_call(fault: Fault | None, unit: str) -> None:
        if fault is None:
            return
        if fault.kind == "raise":
            cls = _error_class(fault.error)
            raise cls(f"injected fault on unit {unit}: {fault.error}")
        if fault.kind == "hang":
            time.sleep(fault.seconds)

    @staticmethod
    def after_call(fault: Fault | None, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if fault is None or fault.kind not in ("nan", "wrong"):
            return outputs
        out = dict(outputs)
        if fault.kind == "nan":
            first = next(iter(out))
            out[first] = np.full_like(np.asarray(out[first], dtype=np.float32), np.nan)
        else:
            out = {k: (1 - np.asarray(v)).astype(np.asarray(v).dtype) for k, v in out.items()}
        return out

    def probe_env(self, unit: str) -> dict[str, str]:
        """Environment for ``unit``'s probe subprocess (consumes one firing of a probe fault)."""
        f = self._take(unit, _PROBE_KINDS, 1 << 62)
        if f is None:
            return {}
        return {PROBE_ENV_VAR: "kill" if f.kind == "kill_probe" else f"hang:{float(f.seconds)}"}

    # --- parsing -------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """Parse the ``BITNET_COREML_FAULTS`` syntax (see the module docstring)."""
        faults: list[Fault] = []
        thermal: str | None = None
        memory: int | None = None
        for raw in text.split(";"):
            entry = raw.strip()
            if not entry:
                continue
            if ":" not in entry and "=" in entry:
                key, _, value = entry.partition("=")
                key = key.strip()
                if key == "thermal":
                    thermal = value.strip()
                elif key == "available_memory":
                    memory = _int(value, entry)
                else:
                    raise ConfigError(f"{ENV_VAR}: unknown setting {key!r} in {entry!r}; allowed: thermal, available_memory")
                continue
            parts = entry.split(":", 2)
            if len(parts) < 2:
                raise ConfigError(f"{ENV_VAR}: entry {entry!r} is not UNIT:KIND[:key=value,...]")
            unit, kind = parts[0].strip(), parts[1].strip()
            opts: dict[str, str] = {}
            if len(parts) == 3 and parts[2].strip():
                for kv in parts[2].split(","):
                    k, sep, v = kv.partition("=")
                    if not sep:
                        raise ConfigError(f"{ENV_VAR}: option {kv!r} in {entry!r} is not key=value")
                    opts[k.strip()] = v.strip()
            unknown = set(opts) - {"error", "count", "seconds", "after"}
            if unknown:
                raise ConfigError(f"{ENV_VAR}: unknown option(s) {sorted(unknown)} in {entry!r}; "
                                  "allowed: error, count, seconds, after")
            try:
                faults.append(Fault(
                    unit=unit, kind=kind, error=opts.get("error", "OperationError"),
                    count=_int(opts["count"], entry) if "count" in opts else None,
                    seconds=_float(opts["seconds"], entry) if "seconds" in opts else 3600.0,
                    after=_int(opts["after"], entry) if "after" in opts else 0,
                ))
            except ConfigError as e:
                if str(e).startswith(ENV_VAR):
                    raise
                raise ConfigError(f"{ENV_VAR}: {e}") from None
        return cls(faults, thermal_state=thermal, available_memory_bytes=memory)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FaultPlan | None:
        """The plan in ``BITNET_COREML_FAULTS``, or ``None`` when it is unset or empty."""
        text = (environ if environ is not None else os.environ).get(ENV_VAR, "").strip()
        return cls.parse(text) if text else None


def _int(value: str, entry: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{ENV_VAR}: {value!r} in {entry!r} is not an integer") from None


def _float(value: str, entry: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{ENV_VAR}: {value!r} in {entry!r} is not a number") from None
