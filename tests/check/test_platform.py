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


def test_public_thermal_reader_per_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bitnet_coreml.check.platform as P
    from bitnet_coreml.check import read_thermal_state

    _zone(tmp_path, 0, 90_000, [("passive", 60_000), ("hot", 85_000), ("critical", 100_000)])
    monkeypatch.setattr(P._platform, "system", lambda: "Linux")
    assert read_thermal_state(linux_root=str(tmp_path)) == ("serious", f"{tmp_path} (zone temperatures vs their trip points)")
    assert read_thermal_state(linux_root=str(tmp_path / "none"))[0] is None
    monkeypatch.setattr(P._platform, "system", lambda: "Darwin")
    monkeypatch.setitem(sys.modules, "Foundation", None)  # no pyobjc: the pmset path
    monkeypatch.setattr(P, "_run", lambda argv, timeout=2.0: "CPU_Speed_Limit \t= 73" if argv[:2] == ["pmset", "-g"] else None)
    assert read_thermal_state()[0] == "serious" == DeviceCompatibilityChecker.thermal_state()
    monkeypatch.setattr(P._platform, "system", lambda: "Windows")
    assert read_thermal_state() == (None, "no thermal reader for Windows")
    assert DeviceCompatibilityChecker.thermal_state() is None


@macos_only
def test_macos_detection() -> None:
    info = DeviceCompatibilityChecker.get_platform_info()
    assert info.os_name == "macOS" and info.chip
    brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout.strip()
    assert info.chip == brand
    if brand.startswith("Apple") and info.chip_in_database:
        assert info.ane_generation is not None


@pytest.mark.parametrize("out, state", [
    ("Note: No thermal warning level has been recorded\nCPU_Speed_Limit \t= 100", "nominal"),
    ("CPU_Scheduler_Limit \t= 100\nCPU_Available_CPUs \t= 8\nCPU_Speed_Limit \t= 73", "serious"),
    ("Note: No thermal warning level has been recorded", "nominal"),
    ("something else", None),
    (None, None),
])
def test_macos_pmset_parsing(monkeypatch: pytest.MonkeyPatch, out: str | None, state: str | None) -> None:
    import bitnet_coreml.check.platform as P

    monkeypatch.setitem(sys.modules, "Foundation", None)  # no pyobjc: the pmset path
    monkeypatch.setattr(P, "_run", lambda argv, timeout=2.0: out)
    assert P._macos_thermal()[0] == state


@pytest.mark.parametrize("brand, chip, gen, ane", [
    ("Apple M2 Pro", "M2 Pro", 5, True), ("Apple M1", "M1", 4, True),
    ("Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz", None, None, False), ("Apple M9", None, None, None),
])
def test_darwin_detection_maps_the_chip(monkeypatch: pytest.MonkeyPatch, brand: str, chip: str | None,
                                        gen: int | None, ane: bool | None) -> None:
    import bitnet_coreml.check.platform as P

    monkeypatch.setattr(P._platform, "system", lambda: "Darwin")
    monkeypatch.setattr(P._platform, "mac_ver", lambda: ("14.4", ("", "", ""), "arm64"))
    monkeypatch.setattr(P, "_run", lambda argv, timeout=2.0: brand if argv[0] == "sysctl" else None)
    monkeypatch.setitem(sys.modules, "Foundation", None)
    info = DeviceCompatibilityChecker.get_platform_info(probe_coreml=False)
    assert info.os_name == "macOS" and info.os_version == "14.4" and info.chip == brand
    assert info.ane_generation == gen and info.ane_present is ane
    assert info.chip_in_database is (chip is not None)
    assert info.ane_available is (False if ane is False else None)  # Core ML not probed: unknown unless no ANE
    if chip:
        assert info.gpu_device == f"Apple {chip.split()[0]}"
