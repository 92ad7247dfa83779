"""Platform detection: what this host says, Linux thermal zones from a fake sysfs tree, macOS paths."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet_coreml.check.platform import DeviceCompatibilityChecker, linux_thermal

linux_only = pytest.mark.skipif(platform.system() != "Linux", reason="checks the Linux detection path")
macos_only = pytest.mark.skipif(platform.system() != "Darwin", reason="needs macOS (Core ML, sysctl)")


@linux_only
def test_linux_says_coreml_unavailable_and_why() -> None:
    info = DeviceCompatibilityChecker.get_platform_info()
    assert info.os_name == "Linux"
    assert info.coreml_available is False and "only on macOS" in info.coreml_reason
    assert info.ane_available is False
    assert not DeviceCompatibilityChecker.is_coreml_available()
    assert not DeviceCompatibilityChecker.is_ane_available()
    assert info.ane_generation is None  # never guessed
    import psutil

    assert info.memory_total_mb == pytest.approx(psutil.virtual_memory().total / 2**20, rel=1e-3)
    assert "unknown" in str(info) or info.thermal_state is not None


def test_platform_module_imports_without_onnx_or_coremltools() -> None:
    code = ("import sys; from bitnet_coreml.check import DeviceCompatibilityChecker, load_capabilities, ANECapabilities; "
            "DeviceCompatibilityChecker.get_platform_info(probe_coreml=False); load_capabilities(); "
            "ANECapabilities.for_chip('M1'); "
            "bad = [m for m in ('onnx', 'onnx_ir', 'coremltools') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def _zone(root: Path, i: int, temp_mc: int, trips: list[tuple[str, int]], kind: str = "x86_pkg_temp") -> None:
    z = root / f"thermal_zone{i}"
    z.mkdir(parents=True)
    (z / "temp").write_text(f"{temp_mc}\n")
    (z / "type").write_text(kind + "\n")
    for j, (t, v) in enumerate(trips):
        (z / f"trip_point_{j}_type").write_text(t + "\n")
        (z / f"trip_point_{j}_temp").write_text(f"{v}\n")


@pytest.mark.parametrize("temp, state", [
    (59_000, "nominal"), (60_000, "fair"), (84_999, "fair"), (85_000, "serious"), (99_000, "serious"),
    (100_000, "critical"),
])
def test_linux_thermal_states_from_trip_points(tmp_path: Path, temp: int, state: str) -> None:
    _zone(tmp_path, 0, temp, [("passive", 60_000), ("hot", 85_000), ("critical", 100_000)])
    _zone(tmp_path, 1, 30_000, [("critical", 100_000)], kind="acpitz")
    got, temps, src = linux_thermal(str(tmp_path))
    assert got == state
    assert temps == {"thermal_zone0:x86_pkg_temp": temp / 1000, "thermal_zone1:acpitz": 30.0}
    assert str(tmp_path) in src


def test_linux_thermal_without_trip_points_gives_no_state(tmp_path: Path) -> None:
    _zone(tmp_path, 0, 45_000, [])
    state, temps, _ = linux_thermal(str(tmp_path))
    assert state is None and temps == {"thermal_zone0:x86_pkg_temp": 45.0}


def test_linux_thermal_no_zones(tmp_path: Path) -> None:
    assert linux_thermal(str(tmp_path))[:2] == (None, None)


@macos_only
def test_macos_detection() -> None:
    info = DeviceCompatibilityChecker.get_platform_info()
    assert info.os_name == "macOS" and info.chip
    brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout.strip()
    assert info.chip == brand
    if brand.startswith("Apple") and info.chip_in_database:
        assert info.ane_generation is not None
