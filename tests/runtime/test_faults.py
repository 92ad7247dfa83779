"""The tests' fault plans (``tests/support/faults.py``): text syntax, validation, fire counts, wrappers."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_coreml import errors as E
from bitnet_coreml.runtime import ReferenceUnit
from tests.support.faults import PROBE_MODULE, Fault, FaultPlan, FaultyUnit, after_call, before_call


def test_parse_env_syntax() -> None:
    plan = FaultPlan.parse("ane:raise:error=DeviceInitError; reference:raise:error=OperationError,count=2;"
                           "gpu:hang:seconds=0.5;cpu:kill_probe;thermal=serious;available_memory=1024")
    assert plan.faults == (
        Fault("ane", "raise", error="DeviceInitError"),
        Fault("reference", "raise", error="OperationError", count=2),
        Fault("gpu", "hang", seconds=0.5),
        Fault("cpu", "kill_probe"),
    )
    assert plan.thermal_state == "serious" and plan.available_memory_bytes == 1024


def test_blank_plan_is_empty() -> None:
    assert FaultPlan.parse("  ").faults == () and FaultPlan.parse(" ; ").thermal_state is None
    assert FaultPlan.parse("cpu:nan").faults == (Fault("cpu", "nan"),)


@pytest.mark.parametrize("text", [
    "ane", "ane:explode", "ane:raise:error=NoSuchError", "ane:raise:count=0", "ane:raise:count=x",
    "ane:hang:seconds=-1", "ane:raise:colour=red", "ane:raise:error", "volume=11",
])
def test_bad_plans_are_config_errors(text: str) -> None:
    with pytest.raises(E.ConfigError):
        FaultPlan.parse(text)


def test_count_limits_firing() -> None:
    plan = FaultPlan([Fault("ane", "raise", error="ThermalError", count=2)])
    fired = [plan.take_call_fault("ane") for _ in range(4)]
    assert [f is not None for f in fired] == [True, True, False, False]
    assert plan.take_call_fault("gpu") is None
    assert plan.fired("ane") == 2
    with pytest.raises(E.ThermalError, match="injected fault on unit ane"):
        before_call(fired[0], "ane")


def test_output_faults() -> None:
    out = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([3.0], np.float32)}
    nan = after_call(Fault("x", "nan"), out)
    assert np.isnan(nan["a"]).all() and np.array_equal(nan["b"], out["b"])
    wrong = after_call(Fault("x", "wrong"), out)
    assert np.array_equal(wrong["a"], np.array([0.0, -1.0], np.float32)) and wrong["a"].dtype == np.float32


def test_probe_entry() -> None:
    plan = FaultPlan([Fault("ane", "kill_probe", count=1), Fault("gpu", "hang_probe", seconds=5)])
    ane, gpu = FaultyUnit(ReferenceUnit("ane"), plan), FaultyUnit(ReferenceUnit("gpu"), plan)
    first = ane.probe_entry()
    assert first[:2] == ("-m", PROBE_MODULE) and first[2].split("#")[0] == "kill"
    assert ane.probe_entry() == ReferenceUnit().probe_entry()  # count=1: the next probe is the real one
    g1, g2 = gpu.probe_entry(), gpu.probe_entry()
    assert g1[2].split("#")[0] == g2[2].split("#")[0] == "hang:5.0" and g1 != g2  # never one cached probe
    assert plan.take_call_fault("ane") is None  # probe faults never fire on in-process calls
