"""Platform readings the predictor adapts to: Core ML / ANE presence, memory, thermal state.

Readings come from the capability stage's platform detection
(``bitnet_coreml.check.DeviceCompatibilityChecker.get_platform_info()``) when it is importable; otherwise
from ``platform``/``psutil`` directly, so the runtime never depends on the check stage being built.
A :class:`~bitnet_coreml.runtime.faults.FaultPlan` may override memory and thermal readings (tests only).
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import sys
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

HOT_STATES = ("serious", "critical")  # NSProcessInfo.ThermalState names, lower-cased


@dataclasses.dataclass(frozen=True)
class PlatformSnapshot:
    """One reading of the platform."""

    os: str
    machine: str
    chip: str | None
    coreml_available: bool
    coreml_reason: str
    ane_present: bool | None  # None = unknown
    ane_generation: str | None
    memory_total_bytes: int | None
    memory_available_bytes: int | None
    thermal_state: str  # nominal | fair | serious | critical | unknown
    source: str  # "check" or "runtime"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def hot(self) -> bool:
        return self.thermal_state in HOT_STATES


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if isinstance(obj, Mapping) and n in obj:
            return obj[n]
        if hasattr(obj, n):
            return getattr(obj, n)
    return default


def _coreml_status() -> tuple[bool, str]:
    if sys.platform != "darwin":
        return False, (f"Core ML runs only on macOS; this is {platform.system()} "
                       "(coremltools converts and saves packages here but cannot load its runtime to predict)")
    try:
        import coremltools.libcoremlpython  # noqa: F401, PLC0415
    except Exception as e:  # the native extension is missing or does not load on this macOS/Python
        return False, f"coremltools' native runtime (libcoremlpython) does not load: {type(e).__name__}: {e}"
    return True, "macOS with the coremltools native runtime"


def _from_check() -> PlatformSnapshot | None:
    try:
        from bitnet_coreml.check import DeviceCompatibilityChecker  # type: ignore[attr-defined]  # noqa: PLC0415
    except ImportError:
        return None
    try:
        info = DeviceCompatibilityChecker.get_platform_info()
    except Exception as e:  # a broken detector must not take prediction down; fall back to our own reading
        log.warning("platform detection failed (%s: %s); using the runtime's own reading", type(e).__name__, e)
        return None
    cm_ok, cm_reason = _coreml_status()
    ane = _get(info, "ane", default=None)
    return PlatformSnapshot(
        os=str(_get(info, "os", "system", default=platform.system())),
        machine=str(_get(info, "machine", "arch", default=platform.machine())),
        chip=_get(info, "chip", default=None),
        coreml_available=bool(_get(info, "coreml_available", default=cm_ok)),
        coreml_reason=str(_get(info, "coreml_reason", "coreml_unavailable_reason", default=cm_reason) or cm_reason),
        ane_present=_get(info, "ane_present", "has_ane", default=(None if ane is None else bool(ane))),
        ane_generation=_get(info, "ane_generation", default=_get(ane, "generation", default=None)),
        memory_total_bytes=_get(info, "memory_total_bytes", "memory_total", default=None),
        memory_available_bytes=_get(info, "memory_available_bytes", "memory_available", default=None),
        thermal_state=str(_get(info, "thermal_state", default="unknown") or "unknown").lower(),
        source="check",
    )


def _own_reading() -> PlatformSnapshot:
    import psutil  # noqa: PLC0415

    vm = psutil.virtual_memory()
    cm_ok, cm_reason = _coreml_status()
    machine = platform.machine()
    ane: bool | None = None
    if sys.platform == "darwin":
        ane = machine == "arm64"  # every Apple-silicon Mac has an ANE; Intel Macs have none
    elif sys.platform.startswith("linux") or sys.platform == "win32":
        ane = False
    return PlatformSnapshot(
        os=platform.system(), machine=machine, chip=None, coreml_available=cm_ok, coreml_reason=cm_reason,
        ane_present=ane, ane_generation=None, memory_total_bytes=int(vm.total),
        memory_available_bytes=int(vm.available), thermal_state="unknown", source="runtime",
    )


def read_platform() -> PlatformSnapshot:
    """A fresh platform reading."""
    return _from_check() or _own_reading()


def refresh_memory(snapshot: PlatformSnapshot) -> PlatformSnapshot:
    """``snapshot`` with current available memory and thermal state (cheap: no full detection)."""
    try:
        import psutil  # noqa: PLC0415

        avail = int(psutil.virtual_memory().available)
    except Exception:  # psutil can fail in sandboxes; keep the last reading
        avail = snapshot.memory_available_bytes
    thermal = snapshot.thermal_state
    if snapshot.source == "check":
        try:
            from bitnet_coreml.check import DeviceCompatibilityChecker  # type: ignore[attr-defined]  # noqa: PLC0415

            reader = getattr(DeviceCompatibilityChecker, "thermal_state", None)
            if callable(reader):
                thermal = str(reader() or "unknown").lower()
        except Exception:  # keep the last thermal reading
            pass
    return dataclasses.replace(snapshot, memory_available_bytes=avail, thermal_state=thermal)


class Monitor:
    """Throttled memory/thermal readings, with optional test overrides."""

    def __init__(self, interval_s: float, *, thermal_override: str | None = None,
                 memory_override: int | None = None) -> None:
        self.interval_s = interval_s
        self.thermal_override = thermal_override
        self.memory_override = memory_override
        self._snap = read_platform()
        self._at = time.monotonic()

    @property
    def platform(self) -> PlatformSnapshot:
        return self._apply(self._snap)

    def _apply(self, s: PlatformSnapshot) -> PlatformSnapshot:
        if self.thermal_override is None and self.memory_override is None:
            return s
        return dataclasses.replace(
            s,
            thermal_state=self.thermal_override if self.thermal_override is not None else s.thermal_state,
            memory_available_bytes=self.memory_override if self.memory_override is not None
            else s.memory_available_bytes,
        )

    def reading(self, *, force: bool = False) -> PlatformSnapshot:
        """The current reading, refreshed at most every ``interval_s`` unless ``force``."""
        now = time.monotonic()
        if force or now - self._at >= self.interval_s:
            self._snap = refresh_memory(self._snap)
            self._at = now
        return self._apply(self._snap)
