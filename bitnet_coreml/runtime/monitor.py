"""Platform readings the predictor adapts to: Core ML / ANE presence, memory, thermal state.

Readings come from the capability stage's platform detection
(``bitnet_coreml.check.DeviceCompatibilityChecker.get_platform_info()``); between full readings only
available memory (psutil) and, less often, the thermal state are refreshed. A
:class:`~bitnet_coreml.runtime.predictor.Predictor` takes a :class:`Monitor` (or a subclass: the tests'
hot or memory-starved machine, ``tests/support/faults.py``) as its ``monitor`` argument.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from bitnet_coreml.check.platform import PlatformInfo

log = logging.getLogger(__name__)

HOT_STATES = ("serious", "critical")  # NSProcessInfo.ThermalState names, lower-cased
THERMAL_INTERVAL_S = 5.0


@dataclasses.dataclass(frozen=True)
class PlatformSnapshot:
    """One reading of the platform for the predictor.

    The host facts are the check stage's :class:`~bitnet_coreml.check.platform.PlatformInfo` (the one
    platform model); the snapshot adds only what the runtime refreshes between full readings (available
    memory, thermal state) and presents the facts in the units the predictor compares (bytes).
    """

    info: PlatformInfo
    memory_available_bytes: int | None
    thermal_state: str  # nominal | fair | serious | critical | unknown
    source: str  # "check", or "fallback" when detection failed

    @property
    def os(self) -> str:
        return f"{self.info.os_name} {self.info.os_version}".strip()

    @property
    def machine(self) -> str:
        return self.info.machine

    @property
    def chip(self) -> str | None:
        return self.info.chip

    @property
    def coreml_available(self) -> bool:
        return bool(self.info.coreml_available)

    @property
    def coreml_reason(self) -> str:
        return self.info.coreml_reason

    @property
    def ane_present(self) -> bool | None:
        """ANE usable: ``ane_available`` folds in "Core ML can reach it"; ``ane_present`` is the hardware alone."""
        i = self.info
        return i.ane_present if i.ane_available is None else (i.ane_available or i.ane_present)

    @property
    def ane_generation(self) -> str | None:
        return None if self.info.ane_generation is None else f"Gen {self.info.ane_generation}"

    @property
    def memory_total_bytes(self) -> int | None:
        return _mb_to_bytes(self.info.memory_total_mb)

    def to_dict(self) -> dict[str, Any]:
        keys = ("os", "machine", "chip", "coreml_available", "coreml_reason", "ane_present", "ane_generation",
                "memory_total_bytes", "memory_available_bytes", "thermal_state", "source")
        return {k: getattr(self, k) for k in keys}

    @property
    def hot(self) -> bool:
        return self.thermal_state in HOT_STATES


def _mb_to_bytes(v: float | None) -> int | None:
    return None if v is None else int(v * 2**20)


def _from_check() -> PlatformSnapshot:
    from bitnet_coreml.check import DeviceCompatibilityChecker

    try:
        info = DeviceCompatibilityChecker.get_platform_info()
    except Exception as e:  # noqa: BLE001 - a broken detector must not take the reference executor down with it
        log.warning("platform detection failed (%s: %s); Core ML units treated as unavailable", type(e).__name__, e)
        why = f"platform detection failed ({type(e).__name__}: {e}); Core ML units are not trusted"
        return PlatformSnapshot(PlatformInfo.undetected(why), None, "unknown", "fallback")
    return PlatformSnapshot(info, _mb_to_bytes(info.memory_available_mb),
                            (info.thermal_state or "unknown").lower(), "check")


def _read_thermal() -> str | None:
    """The current thermal state through the check stage's readers, or None if there is none."""
    try:
        from bitnet_coreml.check import read_thermal_state

        state = read_thermal_state()[0]
    except Exception:  # noqa: BLE001 - no reader: thermal stays unknown
        return None
    return None if state is None else str(state).lower()


def read_platform() -> PlatformSnapshot:
    """A fresh platform reading (through the check stage's platform detection)."""
    return _from_check()


def refresh(snapshot: PlatformSnapshot, *, thermal: bool) -> PlatformSnapshot:
    """``snapshot`` with current available memory (and thermal state if ``thermal``), no full detection."""
    try:
        import psutil

        avail: int | None = int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil can fail in sandboxes; keep the last reading
        avail = snapshot.memory_available_bytes
    state = snapshot.thermal_state
    if thermal:
        state = _read_thermal() or "unknown"
    return dataclasses.replace(snapshot, memory_available_bytes=avail, thermal_state=state)


class Monitor:
    """Throttled memory/thermal readings."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._snap = read_platform()
        self._at = self._thermal_at = time.monotonic()

    @property
    def platform(self) -> PlatformSnapshot:
        """The last reading, not refreshed."""
        return self._snap

    def reading(self, *, force: bool = False) -> PlatformSnapshot:
        """The current reading, refreshed at most every ``interval_s`` unless ``force``."""
        now = time.monotonic()
        if force or now - self._at >= self.interval_s:
            # Thermal readers may spawn `pmset` on macOS: read them at most every THERMAL_INTERVAL_S.
            thermal = force or now - self._thermal_at >= THERMAL_INTERVAL_S
            self._snap = refresh(self._snap, thermal=thermal)
            self._at = now
            if thermal:
                self._thermal_at = now
        return self._snap
