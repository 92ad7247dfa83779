"""Capability verdicts from the package's check report, and batch lowering after a memory error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bitnet_coreml.runtime import FallbackStrategy, Predictor
from bitnet_coreml.runtime.capability import CHECK_METADATA_KEY, capability_verdicts
from bitnet_coreml.runtime.package_io import read_package
from tests.support.faults import Fault, FaultPlan, make_predictor

W = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, -0.5], [0.25, 0.25, 0.25], [-1.0, 0.0, 1.0]], dtype=np.float32)


def build_flexible(path: Path, metadata: dict[str, str] | None = None, *, ranged: bool = False) -> Path:
    """relu(x @ W.T) with x of shape (1|2|4, 3), default 4 (``ranged``: any batch 1..8)."""
    from bitnet_coreml._quiet import coremltools

    ct = coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import get_new_symbol

    @mb.program(input_specs=[mb.TensorSpec(shape=(get_new_symbol(), 3))])
    def prog(x):  # type: ignore[no-untyped-def]
        return mb.relu(x=mb.linear(x=x, weight=W), name="out")

    shape = ct.Shape(shape=(ct.RangeDim(1, 8, default=4), 3)) if ranged else \
        ct.EnumeratedShapes(shapes=[(1, 3), (2, 3), (4, 3)], default=(4, 3))
    model = ct.convert(prog, convert_to="mlprogram", inputs=[ct.TensorType(name="x", shape=shape)],
                       minimum_deployment_target=ct.target.macOS13)
    for k, v in (metadata or {}).items():
        model.user_defined_metadata[k] = v
    model.save(str(path))
    return path


@pytest.fixture(scope="module")
def flexible(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_flexible(tmp_path_factory.mktemp("flex") / "flex.mlpackage")


def test_memory_error_lowers_the_batch(flexible: Path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3) / 7 - 0.8
    faults = FaultPlan([Fault("reference", "raise", error="MemoryError", count=1)])
    p = make_predictor(faults, flexible, FallbackStrategy(retry_delay_s=0.001), units=["reference"])
    res = p.predict({"x": x})
    assert res.unit == "reference" and res.batch_size == 2
    assert any("lowered batch size 4 -> 2" in n for n in res.notes)
    np.testing.assert_allclose(res.outputs["out"], np.maximum(x @ W.T, 0), atol=5e-3, rtol=5e-3)
    from bitnet_coreml.executor import ReferenceExecutor

    assert np.array_equal(res.outputs["out"], ReferenceExecutor(flexible).predict({"x": x})["out"])
    u = p.get_recovery_stats().units["reference"]
    # one failed full-batch attempt, one retry that ran two half batches
    assert (u.attempts, u.failures, u.retries, u.successes) == (2, 1, 1, 1)


def test_batch_outside_the_enumerated_shapes_is_bad_input(flexible: Path) -> None:
    from bitnet_coreml.runtime.package_io import PredictionInputError

    with pytest.raises(PredictionInputError, match=r"expects \[4, 3\] or \[1, 3\] or \[2, 3\]"):
        Predictor(flexible, units=["reference"]).predict({"x": np.zeros((3, 3), np.float32)})


def _mac_host(version: str = "15", ane: bool | None = True) -> object:
    """A macOS host with Core ML (and an ANE unless ``ane`` is False), for the host half of the verdicts."""
    import dataclasses

    from bitnet_coreml.check import DeviceCompatibilityChecker

    base = DeviceCompatibilityChecker.get_platform_info(probe_coreml=False)
    return dataclasses.replace(base, os_name="macOS", os_version=version, coreml_available=True,
                               coreml_reason="test", ane_available=ane, ane_present=ane,
                               ane_generation=6 if ane else None, ane_reason="test host has no ANE")


def test_check_report_in_metadata_rules_units_out(tmp_path: Path) -> None:
    plan = [{"compute_units": "CPU_AND_GPU", "reason": "no op is expected on the ANE"},
            {"compute_units": "CPU_ONLY", "reason": "when the GPU fails"},
            {"compute_units": "REFERENCE", "reason": "any OS"}]
    pkg = build_flexible(tmp_path / "m.mlpackage", {CHECK_METADATA_KEY: json.dumps({"fallback_plan": plan})})
    verdicts = capability_verdicts(read_package(pkg), platform_info=_mac_host())
    assert verdicts == {"ane": "the package's check report leaves CPU_AND_NE out of its fallback plan"}
    # both sources: the host has no ANE either, so both reasons are given; GPU/CPU stay in
    verdicts = capability_verdicts(read_package(pkg), platform_info=_mac_host(ane=False))
    assert verdicts == {"ane": "the package's check report leaves CPU_AND_NE out of its fallback plan; "
                               "no usable Neural Engine: test host has no ANE"}


def test_no_check_report_rules_nothing_out(flexible: Path, tmp_path: Path) -> None:
    assert capability_verdicts(read_package(flexible), platform_info=_mac_host()) == {}
    pkg = build_flexible(tmp_path / "n.mlpackage", {CHECK_METADATA_KEY: json.dumps({"available": False})})
    assert capability_verdicts(read_package(pkg), platform_info=_mac_host()) == {}


def test_host_verdicts_rule_units_out(flexible: Path) -> None:
    # the package is Core ML specification 7 (macOS 13): a macOS 12 host (specification 6) cannot load it
    out = capability_verdicts(read_package(flexible), platform_info=_mac_host("12"))
    assert set(out) == {"ane", "gpu", "cpu"} and all("specification 7" in r and "macOS12" in r for r in out.values())
    assert set(capability_verdicts(read_package(flexible), platform_info=_mac_host(ane=False))) == {"ane"}


@pytest.mark.skipif(__import__("platform").system() == "Darwin", reason="checks the non-macOS host")
def test_off_macos_the_host_rules_every_core_ml_unit_out(flexible: Path) -> None:
    out = capability_verdicts(read_package(flexible))
    assert set(out) == {"ane", "gpu", "cpu"} and all("Core ML unavailable" in r for r in out.values())
    # the reference executor is no Core ML unit: it still answers
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    res = Predictor(flexible).predict({"x": x})
    assert res.unit == "reference"
    np.testing.assert_allclose(res.outputs["out"], np.maximum(x @ W.T, 0), atol=5e-3, rtol=5e-3)


def test_thermal_refresh_reads_the_check_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitnet_coreml import check
    from bitnet_coreml.runtime import monitor

    snap = monitor.read_platform()
    monkeypatch.setattr(check, "read_thermal_state", lambda: ("Critical", "test reader"))
    assert monitor.refresh(snap, thermal=True).thermal_state == "critical"
    assert monitor.refresh(snap, thermal=False).thermal_state == snap.thermal_state
    monkeypatch.setattr(check, "read_thermal_state", lambda: (None, "no reader"))
    assert monitor.refresh(snap, thermal=True).thermal_state == "unknown"


def test_memory_pressure_on_the_last_unit_lowers_the_batch(flexible: Path) -> None:
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    p = make_predictor(FaultPlan(available_memory_bytes=1), flexible, units=["reference"])
    res = p.predict({"x": x})
    assert res.unit == "reference" and res.batch_size == 2
    assert any("trying it anyway as the last unit" in n for n in res.notes)
    assert any(n.startswith("memory: lowered batch size 4 -> 2 on reference") for n in res.notes)
    np.testing.assert_allclose(res.outputs["out"], np.maximum(x @ W.T, 0), atol=5e-3, rtol=5e-3)
    u = p.get_recovery_stats().units["reference"]
    assert (u.attempts, u.failures, u.successes) == (1, 0, 1)  # lowered before running, not after a failure


def test_lowered_batch_with_a_remainder(tmp_path: Path) -> None:
    pkg = build_flexible(tmp_path / "ranged.mlpackage", ranged=True)
    x = np.linspace(-2, 2, 15, dtype=np.float32).reshape(5, 3)
    faults = FaultPlan([Fault("reference", "raise", error="MemoryError", count=1)])
    res = make_predictor(faults, pkg, FallbackStrategy(retry_delay_s=0.001), units=["reference"]).predict({"x": x})
    assert res.batch_size == 2  # chunks of 2, 2 and 1
    assert any("lowered batch size 5 -> 2" in n for n in res.notes)
    np.testing.assert_allclose(res.outputs["out"], np.maximum(x @ W.T, 0), atol=5e-3, rtol=5e-3)


def test_duplicate_unit_names_are_a_config_error(flexible: Path) -> None:
    from bitnet_coreml.errors import ConfigError
    from bitnet_coreml.runtime import ReferenceUnit

    with pytest.raises(ConfigError, match="unique"):
        Predictor(flexible, units=[ReferenceUnit("a"), ReferenceUnit("a")])
