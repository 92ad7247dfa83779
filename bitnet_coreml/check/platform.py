"""Platform detection: OS, chip, Core ML runtime, ANE, GPU, memory, thermal state.

Everything is read from the machine (``platform``, ``sysctl`` on macOS, ``/proc`` and ``/sys`` on
Linux, psutil, coremltools' native runtime proxy); anything that cannot be read is ``None`` and shows
as "unknown", never a guess. Each field that is a conclusion carries its reason
(``coreml_reason``, ``ane_reason``, ``thermal_source``).

coremltools is imported only inside :meth:`DeviceCompatibilityChecker.is_coreml_available`, so the
runtime can import this module cheaply; the probe result is cached per process.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import platform as _platform
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

from bitnet_coreml.check.capabilities import CapabilityDatabase, chip_key, default_database

log = logging.getLogger(__name__)

THERMAL_STATES = ("nominal", "fair", "serious", "critical")
_PCI_VENDORS = {"0x1002": "AMD", "0x8086": "Intel", "0x10de": "NVIDIA", "0x106b": "Apple"}


@dataclass(frozen=True)
class PlatformInfo:
    """What this host is and can run. ``None`` means unknown."""

    os_name: str
    os_version: str
    machine: str
    chip: str | None
    chip_in_database: bool
    coreml_available: bool
    coreml_reason: str
    ane_present: bool | None
    ane_available: bool | None
    ane_generation: int | None
    ane_reason: str
    gpu: str | None
    gpu_device: str | None  # row of the seed's capability matrix, when the chip maps to one
    memory_total_mb: float | None
    memory_available_mb: float | None
    thermal_state: str | None
    thermal_source: str
    temperatures_c: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def undetected(cls, reason: str) -> PlatformInfo:
        """This host when detection failed: OS family and machine only, Core ML not trusted, the rest unknown."""
        return cls(os_name=_platform.system(), os_version="", machine=_platform.machine(), chip=None,
                   chip_in_database=False, coreml_available=False, coreml_reason=reason, ane_present=None,
                   ane_available=None, ane_generation=None, ane_reason=reason, gpu=None, gpu_device=None,
                   memory_total_mb=None, memory_available_mb=None, thermal_state=None, thermal_source=reason)

    def __str__(self) -> str:
        def u(v: object) -> str:
            return "unknown" if v is None else str(v)

        return (f"{self.os_name} {self.os_version} ({self.machine}); chip {u(self.chip)}; "
                f"Core ML {'available' if self.coreml_available else 'unavailable'} ({self.coreml_reason}); "
                f"ANE {u(self.ane_available)} gen {u(self.ane_generation)}; GPU {u(self.gpu)}; "
                f"memory {u(self.memory_total_mb)} MB total, {u(self.memory_available_mb)} MB available; "
                f"thermal {u(self.thermal_state)}")


def _run(argv: list[str], timeout: float = 2.0) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("%s failed: %s", argv, e)
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _linux_cpu_model() -> str | None:
    text = _read("/proc/cpuinfo")
    if not text:
        return None
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and val.strip():
            return val.strip()
    return None


def _linux_gpus() -> str | None:
    found = []
    for card in sorted(glob.glob("/sys/class/drm/card[0-9]*")):
        if "-" in os.path.basename(card):
            continue  # connectors (card0-HDMI-A-1), not devices
        vendor = _read(os.path.join(card, "device", "vendor"))
        device = _read(os.path.join(card, "device", "device"))
        if vendor:
            found.append(f"{_PCI_VENDORS.get(vendor, 'PCI vendor ' + vendor)} {device or ''}".strip())
    return ", ".join(found) if found else None


def linux_thermal(root: str = "/sys/class/thermal") -> tuple[str | None, dict[str, float] | None, str]:
    """(state, temperatures, source) from Linux thermal zones and their trip points.

    The state compares each zone's temperature with its own trip points: above a ``critical`` trip
    -> critical, above ``hot`` -> serious, above ``passive`` -> fair, else nominal. Zones without
    trip points give temperatures but no state.
    """
    zones = sorted(glob.glob(os.path.join(root, "thermal_zone[0-9]*")))
    if not zones:
        return None, None, f"no thermal zones under {root}"
    temps: dict[str, float] = {}
    rank = -1
    for z in zones:
        t = _read(os.path.join(z, "temp"))
        if t is None or not t.lstrip("-").isdigit():
            continue
        temp = int(t) / 1000.0
        name = f"{os.path.basename(z)}:{_read(os.path.join(z, 'type')) or '?'}"
        temps[name] = temp
        for tp in glob.glob(os.path.join(z, "trip_point_*_type")):
            kind = _read(tp)
            limit = _read(tp.replace("_type", "_temp"))
            if kind is None or limit is None or not limit.lstrip("-").isdigit() or int(limit) <= 0:
                continue
            level = {"passive": 1, "hot": 2, "critical": 3}.get(kind)
            if level is not None:
                rank = max(rank, level if temp >= int(limit) / 1000.0 else 0)
    if not temps:
        return None, None, f"thermal zones under {root} are unreadable"
    state = THERMAL_STATES[rank] if rank >= 0 else None
    return state, temps, f"{root} (zone temperatures vs their trip points)"


def _macos_thermal() -> tuple[str | None, str]:
    try:  # pyobjc, when installed, gives the exact NSProcessInfo.thermalState
        from Foundation import NSProcessInfo  # type: ignore[import-not-found]

        level = int(NSProcessInfo.processInfo().thermalState())
        return THERMAL_STATES[level], "NSProcessInfo.thermalState"
    except Exception:  # noqa: BLE001  (pyobjc absent or API missing)
        pass
    out = _run(["pmset", "-g", "therm"])
    if out is None:
        return None, "pmset unavailable"
    for line in out.splitlines():
        k, _, v = line.partition("=")
        if k.strip() == "CPU_Speed_Limit" and v.strip().isdigit():
            limit = int(v.strip())
            # pmset reports the CPU speed cap the thermal manager imposes: 100 means no throttling. Any cap
            # means the system is already reducing performance, which is how Apple describes "serious";
            # pmset cannot tell fair from nominal, or serious from critical, so it reports no more than that.
            state = "nominal" if limit >= 100 else "serious"
            return state, f"pmset -g therm (CPU_Speed_Limit={limit})"
    if "No thermal warning level has been recorded" in out:
        return "nominal", "pmset -g therm (no thermal warning recorded)"
    return None, "pmset -g therm gave no thermal level"


def read_thermal_state(*, linux_root: str = "/sys/class/thermal") -> tuple[str | None, str]:
    """(state, source): this host's current thermal state (nominal | fair | serious | critical) or None.

    The cheap reading the runtime refreshes between full platform detections: macOS through
    NSProcessInfo (pyobjc) or ``pmset -g therm``, Linux through its thermal zones' trip points; other
    systems have no reader.
    """
    system = _platform.system()
    if system == "Darwin":
        return _macos_thermal()
    if system == "Linux":
        state, _temps, source = linux_thermal(linux_root)
        return state, source
    return None, f"no thermal reader for {system}"


class DeviceCompatibilityChecker:
    """The seed's platform checker: ``is_coreml_available``, ``is_ane_available``, ``get_platform_info``."""

    @staticmethod
    def thermal_state() -> str | None:
        """The current thermal state (nominal | fair | serious | critical), or None where it cannot be read."""
        return read_thermal_state()[0]

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def coreml_status() -> tuple[bool, str]:
        """(available, reason): can this process run Core ML predictions?"""
        if _platform.system() != "Darwin":
            return False, (f"Core ML runs only on macOS; this is {_platform.system()} "
                           "(coremltools converts and saves packages here but cannot predict)")
        try:
            from bitnet_coreml._quiet import coremltools

            coremltools()
            from coremltools.models import model as ct_model
        except Exception as e:  # noqa: BLE001  (a broken install is reported, not raised)
            return False, f"coremltools cannot be imported: {e}"
        if getattr(ct_model, "_MLModelProxy", None) is None:
            return False, "coremltools' native runtime proxy (_MLModelProxy) failed to load on this macOS"
        return True, "macOS with coremltools' native runtime proxy"

    @classmethod
    def is_coreml_available(cls) -> bool:
        return cls.coreml_status()[0]

    @classmethod
    def is_ane_available(cls, db: CapabilityDatabase | None = None) -> bool:
        return cls.get_platform_info(db=db).ane_available is True

    @staticmethod
    def get_platform_info(db: CapabilityDatabase | None = None, *, probe_coreml: bool = True) -> PlatformInfo:
        """Detect this host. ``probe_coreml=False`` skips importing coremltools (reports Core ML as unknown-reason)."""
        db = db or default_database()
        system = _platform.system()
        machine = _platform.machine()
        if probe_coreml:
            coreml, coreml_reason = DeviceCompatibilityChecker.coreml_status()
        else:
            coreml = False
            coreml_reason = "not probed" if system == "Darwin" else f"Core ML runs only on macOS; this is {system}"
        chip: str | None = None
        gpu: str | None = None
        gpu_device: str | None = None
        ane_present: bool | None = None
        ane_gen: int | None = None
        thermal: str | None = None
        temps: dict[str, float] | None = None
        if system == "Darwin":
            os_name, os_version = "macOS", _platform.mac_ver()[0] or _platform.release()
            chip = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
            row = db.chips.get(chip_key(chip)) if chip else None
            if row is not None:
                ane_present = row.ane_generation is not None
                ane_gen = row.ane_generation
                gpu_device = row.gpu
                gpu = f"{row.name} integrated GPU"
                ane_reason = f"{row.name}: ANE Gen {ane_gen} ({row.source})" if ane_present else f"{row.name}: no ANE row"
            elif chip and not chip.startswith("Apple"):
                ane_present = False  # Intel Macs have no Neural Engine
                ane_reason = f"{chip} is not Apple silicon: no Neural Engine"
            else:
                ane_reason = f"chip {chip or 'unknown'} is not in the capability database"
            thermal, thermal_source = _macos_thermal()
        else:
            os_name = system or "unknown"
            os_version = _platform.release()
            chip = _linux_cpu_model() if system == "Linux" else _platform.processor() or None
            gpu = _linux_gpus() if system == "Linux" else None
            if machine in ("x86_64", "AMD64", "i686", "i386"):
                ane_present = False
                ane_reason = f"{machine} host: no Apple Neural Engine; Core ML runs only on macOS"
            else:
                ane_reason = f"{os_name} on {machine}: the ANE is reachable only through Core ML on macOS"
            if system == "Linux":
                thermal, temps, thermal_source = linux_thermal()
            else:
                thermal_source = f"no thermal reader for {system}"
        mem_total = mem_avail = None
        try:
            import psutil

            vm = psutil.virtual_memory()
            mem_total, mem_avail = vm.total / (1 << 20), vm.available / (1 << 20)
        except Exception as e:  # noqa: BLE001
            log.debug("psutil.virtual_memory failed: %s", e)
        ane_available: bool | None
        if ane_present is False or system != "Darwin":
            ane_available = False  # no ANE, or no Core ML to reach it
        elif not probe_coreml:
            ane_available = None
        else:
            ane_available = ane_present if coreml else False
        return PlatformInfo(
            os_name=os_name, os_version=os_version, machine=machine, chip=chip,
            chip_in_database=chip is not None and chip_key(chip) in db.chips,
            coreml_available=coreml, coreml_reason=coreml_reason,
            ane_present=ane_present, ane_available=ane_available, ane_generation=ane_gen, ane_reason=ane_reason,
            gpu=gpu, gpu_device=gpu_device,
            memory_total_mb=round(mem_total, 1) if mem_total is not None else None,
            memory_available_mb=round(mem_avail, 1) if mem_avail is not None else None,
            thermal_state=thermal, thermal_source=thermal_source, temperatures_c=temps)
