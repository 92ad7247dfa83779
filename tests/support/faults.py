"""Fault injection for tests: faulty units, engines and monitors wrapped around the real ones.

Nothing in ``bitnet_coreml`` knows about faults. A test builds a :class:`FaultPlan` and hands the
product wrapped objects through its public seams:

* :meth:`FaultPlan.wrap` -> the ``units`` list of a :class:`~bitnet_coreml.runtime.Predictor`
  (a :class:`FaultyUnit` around each unit the plan names; the others stay as they are);
* :meth:`FaultPlan.monitor` -> its ``monitor`` (a :class:`FaultyMonitor` reporting the plan's
  thermal state / available memory on top of the real readings);
* :meth:`FaultPlan.open_engine` -> a :class:`~bitnet_coreml.generation.GenerationSession`'s
  ``open_engine`` (a :class:`FaultyEngine` around each engine the plan names);
* :func:`installed` puts all three behind the names the CLI commands import (``Predictor`` in
  ``bitnet_coreml.runtime`` and ``bitnet_coreml.runtime.predictor``, ``GenerationSession``), so a CLI
  test runs the shipped ``predict`` / ``generate`` / ``verify`` in-process (click's ``CliRunner``).

========== ==================================================================================
kind       effect
========== ==================================================================================
raise      raise ``error`` (a class from ``bitnet_coreml.errors``, or one of :data:`BUILTIN_ERRORS`)
hang       sleep ``seconds`` inside the call, so the unit's timeout fires
nan        replace the first output's values with NaN
wrong      return ``-output + 1`` (finite, plausible, wrong)
kill_probe the unit's probe child SIGKILLs itself at its first prediction (an ANE compile failure
           does this, coremltools #2758): the child runs ``tests/support/faulty_probe.py``
hang_probe the unit's probe child sleeps ``seconds`` there (past the probe timeout)
bug_probe  the unit's probe child raises ``KeyError`` there (a bug, not a device failure)
========== ==================================================================================

Every fault fires ``count`` times (default: every call) and then stops; ``after=k`` lets the unit's
first ``k`` calls through first (a failure at decode step k of a generation).

Text syntax (``;`` between entries), for compact parametrised tests::

    "ane:raise:error=DeviceInitError;reference:raise:error=OperationError,count=2,after=5;thermal=serious"
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from bitnet_coreml import errors as _errors
from bitnet_coreml.errors import ConfigError
from bitnet_coreml.generation import GenerationSession
from bitnet_coreml.generation.engines import Engine, open_engine
from bitnet_coreml.runtime import Predictor
from bitnet_coreml.runtime.monitor import Monitor, PlatformSnapshot
from bitnet_coreml.runtime.package_io import PackageInfo
from bitnet_coreml.runtime.strategy import ComputeUnit, FallbackStrategy
from bitnet_coreml.runtime.units import Unit, make_units

KINDS = ("raise", "hang", "nan", "wrong", "kill_probe", "hang_probe", "bug_probe")
_CALL_KINDS = {"raise", "hang", "nan", "wrong"}
_PROBE_KINDS = {"kill_probe", "hang_probe", "bug_probe"}
# Foreign exceptions a unit may raise: known device/OS failures, and bugs (KeyError, TypeError).
BUILTIN_ERRORS: dict[str, type[BaseException]] = {
    "MemoryError": MemoryError, "TimeoutError": TimeoutError, "RuntimeError": RuntimeError, "OSError": OSError,
    "KeyError": KeyError, "TypeError": TypeError, "AssertionError": AssertionError,
}
PROBE_MODULE = "tests.support.faulty_probe"
_PROBE_IDS = itertools.count()


def _error_class(name: str) -> type[BaseException]:
    cls = getattr(_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, _errors.BitnetCoremlError):
        return cls
    if name in BUILTIN_ERRORS:
        return BUILTIN_ERRORS[name]
    known = sorted([n for n, c in vars(_errors).items() if isinstance(c, type)
                    and issubclass(c, _errors.BitnetCoremlError)] + list(BUILTIN_ERRORS))
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


def before_call(fault: Fault | None, unit: str) -> None:
    """Raise or hang as ``fault`` says (nothing for ``None`` or an output fault)."""
    if fault is None:
        return
    if fault.kind == "raise":
        cls = _error_class(fault.error)
        raise cls(f"injected fault on unit {unit}: {fault.error}")
    if fault.kind == "hang":
        time.sleep(fault.seconds)


def after_call(fault: Fault | None, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``outputs`` spoiled as an output fault says (unchanged otherwise)."""
    if fault is None or fault.kind not in ("nan", "wrong"):
        return outputs
    out = dict(outputs)
    if fault.kind == "nan":
        first = next(iter(out))
        out[first] = np.full_like(np.asarray(out[first], dtype=np.float32), np.nan)
    else:
        out = {k: (1 - np.asarray(v)).astype(np.asarray(v).dtype) for k, v in out.items()}
    return out


class FaultPlan:
    """A set of faults keyed by unit name, with per-fault fire counters, and monitor overrides."""

    def __init__(self, faults: Sequence[Fault] = (), *, thermal_state: str | None = None,
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

    def names(self) -> set[str]:
        return {f.unit for f in self.faults}

    def _take(self, unit: str, kinds: set[str], call: int = 0) -> Fault | None:
        with self._lock:
            for i, f in enumerate(self.faults):
                if f.unit == unit and f.kind in kinds and (f.count is None or self._fired[i] < f.count) \
                        and call > f.after:
                    self._fired[i] += 1
                    return f
        return None

    def take_call_fault(self, unit: str) -> Fault | None:
        """The call fault to apply to this call of ``unit`` (consumes one firing)."""
        with self._lock:
            n = self._calls[unit] = self._calls.get(unit, 0) + 1
        return self._take(unit, _CALL_KINDS, n)

    def take_probe_fault(self, unit: str) -> Fault | None:
        """The probe fault for ``unit``'s next probe (consumes one firing)."""
        return self._take(unit, _PROBE_KINDS, 1 << 62)

    # --- the product's seams ---------------------------------------------------------------------

    def wrap(self, units: Sequence[str | ComputeUnit | Unit], *, probe_coreml: bool = True) -> list[Unit]:
        """A Predictor's ``units``: each unit the plan names wrapped in a :class:`FaultyUnit`."""
        return [FaultyUnit(u, self) if u.name in self.names() else u
                for u in make_units(units, probe_coreml=probe_coreml)]

    def monitor(self, strategy: FallbackStrategy | None = None) -> Monitor | None:
        """A Predictor's ``monitor``: the plan's readings over the real ones (None when it overrides nothing)."""
        if self.thermal_state is None and self.available_memory_bytes is None:
            return None
        return FaultyMonitor((strategy or FallbackStrategy()).monitor_interval_s, self)

    def open_engine(self, unit: Unit, package: str | os.PathLike[str], *, fp32: bool = False,
                    decode_engine: str = "auto") -> Engine:
        """A GenerationSession's ``open_engine``: the real engine, wrapped when the plan names the unit."""
        engine = open_engine(unit, package, fp32=fp32, decode_engine=decode_engine)
        return FaultyEngine(engine, self) if engine.name in self.names() else engine

    # --- parsing -------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """Parse the text syntax (see the module docstring)."""
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
                    raise ConfigError(f"unknown setting {key!r} in {entry!r}; allowed: thermal, available_memory")
                continue
            parts = entry.split(":", 2)
            if len(parts) < 2:
                raise ConfigError(f"entry {entry!r} is not UNIT:KIND[:key=value,...]")
            unit, kind = parts[0].strip(), parts[1].strip()
            opts: dict[str, str] = {}
            if len(parts) == 3 and parts[2].strip():
                for kv in parts[2].split(","):
                    k, sep, v = kv.partition("=")
                    if not sep:
                        raise ConfigError(f"option {kv!r} in {entry!r} is not key=value")
                    opts[k.strip()] = v.strip()
            unknown = set(opts) - {"error", "count", "seconds", "after"}
            if unknown:
                raise ConfigError(f"unknown option(s) {sorted(unknown)} in {entry!r}; allowed: error, count, seconds, after")
            faults.append(Fault(
                unit=unit, kind=kind, error=opts.get("error", "OperationError"),
                count=_int(opts["count"], entry) if "count" in opts else None,
                seconds=_float(opts["seconds"], entry) if "seconds" in opts else 3600.0,
                after=_int(opts["after"], entry) if "after" in opts else 0,
            ))
        return cls(faults, thermal_state=thermal, available_memory_bytes=memory)


def _int(value: str, entry: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{value!r} in {entry!r} is not an integer") from None


def _float(value: str, entry: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{value!r} in {entry!r} is not a number") from None


def probe_entry(fault: str) -> tuple[str, ...]:
    """The probe entry of a faulty probe child: ``kill`` or ``hang:SECONDS`` (see ``faulty_probe``)."""
    return ("-m", PROBE_MODULE, fault)


class FaultyUnit(Unit):
    """A unit whose calls (and probe) misbehave as the plan says; everything else is the wrapped unit's."""

    def __init__(self, inner: Unit, plan: FaultPlan) -> None:  # no super().__init__: state is the inner unit's
        self.inner = inner
        self.plan = plan
        self.kind = inner.kind
        self.name = inner.name
        self.needs_probe = inner.needs_probe
        self.validate = inner.validate

    @property  # type: ignore[override]
    def loaded(self) -> bool:
        return self.inner.loaded

    @property  # type: ignore[override]
    def load_s(self) -> float | None:
        return self.inner.load_s

    def unavailable(self, plat: PlatformSnapshot, info: PackageInfo) -> Any:
        return self.inner.unavailable(plat, info)

    def memory_need(self, info: PackageInfo) -> int:
        return self.inner.memory_need(info)

    def load(self, info: PackageInfo) -> None:
        self.inner.load(info)

    def unload(self) -> None:
        self.inner.unload()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fault = self.plan.take_call_fault(self.name)
        before_call(fault, self.name)
        return after_call(fault, self.inner.predict(inputs))

    def _run(self, inputs: dict[str, np.ndarray]) -> Any:
        return self.inner._run(inputs)

    def _load(self, info: PackageInfo) -> None:
        self.inner._load(info)

    def _unload(self) -> None:
        self.inner._unload()

    def probe_args(self) -> list[str]:
        return self.inner.probe_args()

    def probe_entry(self) -> tuple[str, ...]:
        f = self.plan.take_probe_fault(self.name)
        if f is None:
            return self.inner.probe_entry()
        spec = {"kill_probe": "kill", "bug_probe": "bug"}.get(f.kind, f"hang:{float(f.seconds)}")
        # a distinct entry per firing: the predictor's per-process probe cache never replays an injected probe
        return probe_entry(f"{spec}#{os.getpid()}-{next(_PROBE_IDS)}")

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


class FaultyEngine(Engine):
    """A generation engine whose calls misbehave as the plan says."""

    def __init__(self, inner: Engine, plan: FaultPlan) -> None:
        self.inner = inner
        self.plan = plan
        self.name = inner.name
        self.decode_engine, self.decode_note = inner.decode_engine, inner.decode_note
        self.pads_prefill = inner.pads_prefill

    def call(self, function: str, ids: np.ndarray, position: int) -> np.ndarray:
        fault = self.plan.take_call_fault(self.name)
        before_call(fault, self.name)
        return after_call(fault, {"logits": self.inner.call(function, ids, position)})["logits"]

    def _predict(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        return self.inner._predict(function, inputs)


class FaultyMonitor(Monitor):
    """The real platform readings with the plan's thermal state and available memory on top."""

    def __init__(self, interval_s: float, plan: FaultPlan) -> None:
        super().__init__(interval_s)
        self.plan = plan

    def _over(self, s: PlatformSnapshot) -> PlatformSnapshot:
        p = self.plan
        return dataclasses.replace(
            s, thermal_state=p.thermal_state if p.thermal_state is not None else s.thermal_state,
            memory_available_bytes=p.available_memory_bytes if p.available_memory_bytes is not None
            else s.memory_available_bytes)

    @property
    def platform(self) -> PlatformSnapshot:
        return self._over(super().platform)

    def reading(self, *, force: bool = False) -> PlatformSnapshot:
        return self._over(super().reading(force=force))


def make_predictor(plan: FaultPlan | None, package: str | os.PathLike[str], strategy: FallbackStrategy | None = None,
                   *, units: Sequence[str | ComputeUnit | Unit] | None = None,
                   monitor: Monitor | None = None) -> Predictor:
    """A real :class:`Predictor` whose units and monitor carry ``plan`` (a plain one for ``None``)."""
    s = strategy or FallbackStrategy()
    if plan is None:
        return Predictor(package, s, units=units, monitor=monitor)
    chain = plan.wrap(s.enabled_units() if units is None else units, probe_coreml=s.probe_coreml_units)
    return Predictor(package, s, units=chain, monitor=monitor or plan.monitor(s))


def make_session(plan: FaultPlan | None, package: str | os.PathLike[str], **kw: Any) -> GenerationSession:
    """A real :class:`GenerationSession` whose engines carry ``plan``."""
    if plan is not None:
        kw.setdefault("open_engine", plan.open_engine)
    return GenerationSession(package, **kw)


@contextlib.contextmanager
def installed(plan: FaultPlan | str) -> Iterator[FaultPlan]:
    """Run the shipped CLI in-process with ``plan`` in force: the names ``predict`` and ``generate``
    import (``bitnet_coreml.runtime.Predictor``, ``bitnet_coreml.generation.GenerationSession``) build
    faulty units, monitor and engines for the duration."""
    from unittest import mock

    import bitnet_coreml.generation as generation
    import bitnet_coreml.runtime as runtime
    import bitnet_coreml.runtime.predictor as predictor  # runtime.chunked imports it from here

    p = FaultPlan.parse(plan) if isinstance(plan, str) else plan
    faulty = functools.partial(make_predictor, p)
    with mock.patch.object(runtime, "Predictor", faulty), mock.patch.object(predictor, "Predictor", faulty), \
            mock.patch.object(generation, "GenerationSession", functools.partial(make_session, p)):
        yield p
