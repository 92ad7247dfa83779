"""host_unit_verdicts: which Core ML units can run a package here (the runtime's skip list)."""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

import numpy as np
import pytest

from bitnet_coreml.check import DeviceCompatibilityChecker, host_unit_verdicts, package_spec_version
from bitnet_coreml.errors import ModelLoadError


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bitnet_coreml._quiet import coremltools

    ct = coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec((1, 4), dtype=types.fp16)], opset_version=ct.target.iOS17)
    def prog(x):  # type: ignore[no-untyped-def]
        return mb.add(x=x, y=np.ones((1, 4), np.float16))

    m = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17)
    p = tmp_path_factory.mktemp("pkg") / "m.mlpackage"
    m.save(str(p))
    return p


def test_spec_version_matches_coremltools(package: Path) -> None:
    from bitnet_coreml._quiet import coremltools

    ct = coremltools()
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    assert package_spec_version(package) == spec.specificationVersion == 8


def test_not_a_package(tmp_path: Path) -> None:
    (tmp_path / "x.mlpackage").mkdir()
    with pytest.raises(ModelLoadError, match="Manifest.json"):
        package_spec_version(tmp_path / "x.mlpackage")
    f = tmp_path / "bad.mlmodel"
    f.write_bytes(b"\x12\x00")
    with pytest.raises(ModelLoadError, match="specificationVersion"):
        package_spec_version(f)


def _mac(version: str, ane: bool | None) -> object:
    base = DeviceCompatibilityChecker.get_platform_info(probe_coreml=False)
    return dataclasses.replace(base, os_name="macOS", os_version=version, coreml_available=True,
                               coreml_reason="test", ane_available=ane, ane_present=ane,
                               ane_generation=6 if ane else None, ane_reason="test host")


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the non-macOS host")
def test_off_macos_every_unit_is_out(package: Path) -> None:
    v = host_unit_verdicts(package)
    assert set(v) == {"ane", "gpu", "cpu"} and not any(ok for ok, _ in v.values())
    assert all("only on macOS" in why for _, why in v.values())


@pytest.mark.parametrize("version, ok", [("13.6", False), ("14", True), ("15.1", True)])
def test_host_os_older_than_the_package(package: Path, version: str, ok: bool) -> None:
    v = host_unit_verdicts(package, platform_info=_mac(version, True))  # type: ignore[arg-type]
    assert all(r[0] is ok for r in v.values())
    if not ok:
        assert "macOS14 or newer" in v["cpu"][1]


def test_ane_absent_or_unknown(package: Path) -> None:
    v = host_unit_verdicts(package, platform_info=_mac("15", False))  # type: ignore[arg-type]
    assert v["ane"][0] is False and v["gpu"][0] and v["cpu"][0]
    v = host_unit_verdicts(package, platform_info=_mac("15", None))  # type: ignore[arg-type]
    assert v["ane"][0] is True and "unknown" in v["ane"][1]
