"""macOS only: Core ML per compute unit, real subprocess probes, the thermal reader.

These run in the macOS CI workflow (.github/workflows/macos.yml). Off macOS they skip: coremltools
cannot load its native runtime there, so there is no Core ML unit to run or probe.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from bitnet_coreml.runtime import FallbackStrategy, Predictor
from bitnet_coreml.runtime.monitor import read_platform
from bitnet_coreml.runtime.probe import run_probe
from tests.support.faults import Fault, FaultPlan, make_predictor

from .conftest import numpy_oracle

pytestmark = [
    pytest.mark.macos,
    pytest.mark.skipif(sys.platform != "darwin",
                       reason="needs macOS: coremltools cannot load Core ML to predict or probe on this OS"),
]
UNITS = ["ane", "gpu", "cpu"]


def _skip_if_unavailable(package: Path, unit: str) -> None:
    p = Predictor(package, units=[unit])
    why = p.units[0].unavailable(read_platform(), p.info)
    if why is not None:
        pytest.skip(f"{unit} is not available on this Mac: {why.one_line()}")


@pytest.mark.parametrize("unit", UNITS)
def test_probe_each_unit(tiny_package: Path, unit: str) -> None:
    _skip_if_unavailable(tiny_package, unit)
    res = run_probe(tiny_package, unit, [unit], timeout_s=300)
    assert res.ok, res.to_dict()
    assert res.detail["outputs"] == {"out": [2, 4]}


@pytest.mark.parametrize("unit", UNITS)
def test_each_unit_answers_like_the_reference(tiny_package: Path, tiny_inputs: dict, unit: str) -> None:
    _skip_if_unavailable(tiny_package, unit)
    p = Predictor(tiny_package, FallbackStrategy(units=(unit,)))
    res = p.predict(tiny_inputs)
    assert res.unit == unit, res.to_dict()
    np.testing.assert_allclose(res.outputs["out"], numpy_oracle(tiny_inputs["x"], tiny_inputs["y"]),
                               atol=2e-2, rtol=2e-2)
    info = {u["name"]: u for u in p.system_info()["units"]}
    assert info[unit]["probe"]["ok"] is True
    res2 = p.predict(tiny_inputs)  # second call: no new probe, no reload
    assert res2.unit == unit and p.units[0].load_s is not None
    p.close()


def test_killed_probe_moves_the_chain_on(tiny_package: Path, tiny_inputs: dict) -> None:
    _skip_if_unavailable(tiny_package, "ane")
    faults = FaultPlan([Fault("ane", "kill_probe")])
    p = make_predictor(faults, tiny_package)
    res = p.predict(tiny_inputs)
    assert res.unit != "ane" and "killed by SIGKILL" in res.skipped["ane"]
    np.testing.assert_allclose(res.outputs["out"], numpy_oracle(tiny_inputs["x"], tiny_inputs["y"]),
                               atol=2e-2, rtol=2e-2)


def test_platform_reading_on_macos() -> None:
    plat = read_platform()
    assert plat.coreml_available, plat.coreml_reason
    assert plat.thermal_state in ("nominal", "fair", "serious", "critical", "unknown")
    assert plat.memory_total_bytes and plat.memory_total_bytes > 2**30
