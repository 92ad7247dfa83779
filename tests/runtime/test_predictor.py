"""The Predictor end to end: real reference units, genuinely unavailable Core ML units, injected faults.

Oracles: the reference executor called directly, numpy written from the op definitions, and counts
derived by hand from each test's fault plan.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bitnet_coreml import errors as E
from bitnet_coreml.runtime import FallbackStrategy, Predictor, ReferenceUnit
from bitnet_coreml.runtime.package_io import PredictionInputError
from tests.support.faults import Fault, FaultPlan, make_predictor

from .conftest import numpy_oracle

linux_only = pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the Core ML units are available and answer first; this test pins the Linux chain")
# Off macOS the Core ML units lead the chain and are genuinely unavailable; on macOS they would
# answer, so the fault tests there use reference units only.
COREML = [] if sys.platform == "darwin" else ["ane", "gpu", "cpu"]
FAST = dict(retry_delay_s=0.001, backoff_factor=2.0, max_retry_delay_s=0.01)


def executor_outputs(package: Path, inputs: dict) -> dict:
    from bitnet_coreml.executor import ReferenceExecutor

    return ReferenceExecutor(package).predict(inputs)


def two_refs(package: Path, faults: FaultPlan | None = None, *, a_validate: bool = False, **strategy) -> Predictor:
    """Core ML units, then two real reference units: fallback runs end to end without Core ML."""
    units = [*COREML, ReferenceUnit("ref-a", validate=a_validate), ReferenceUnit("ref-b")]
    return make_predictor(faults, package, FallbackStrategy(**{**FAST, **strategy}), units=units)


@linux_only
def test_linux_chain_runs_to_reference(tiny_package: Path, tiny_inputs: dict) -> None:
    p = Predictor(tiny_package)
    res = p.predict(tiny_inputs)
    assert res.unit == "reference"
    assert res.chain == ("ane", "gpu", "cpu", "reference")
    for unit in ("ane", "gpu", "cpu"):
        assert res.skipped[unit].startswith(f"{unit} (")
        assert "only on macOS" in res.skipped[unit]
    direct = executor_outputs(tiny_package, tiny_inputs)
    assert np.array_equal(res.outputs["out"], direct["out"])
    np.testing.assert_allclose(res.outputs["out"], numpy_oracle(tiny_inputs["x"], tiny_inputs["y"]), atol=5e-3, rtol=5e-3)
    assert res.power_target == "balanced"
    s = p.get_recovery_stats()
    assert s.units["reference"].successes == 1 and s.units["ane"].skips == 1 and s.units["ane"].attempts == 0
    assert not p.is_ane_available()
    info = p.system_info()
    assert [u["available"] for u in info["units"]] == [False, False, False, True]
    assert info["platform"]["coreml_available"] is False and "only on macOS" in info["platform"]["coreml_reason"]
    from bitnet_coreml.commands._common import dump_json

    assert json.loads(dump_json(info))["package"]["outputs"] == ["out"]
    p.close()


def test_transient_errors_are_retried_with_backoff(tiny_package: Path, tiny_inputs: dict) -> None:
    faults = FaultPlan([Fault("ref-a", "raise", error="OperationError", count=2)])
    p = two_refs(tiny_package, faults, max_retry_attempts=3, retry_delay_s=0.02, backoff_factor=2.0,
                 max_retry_delay_s=1.0)
    res = p.predict(tiny_inputs)
    assert res.unit == "ref-a"
    ref_a = [a for a in res.attempts if a.unit == "ref-a"]
    assert [a.outcome for a in ref_a] == ["retried", "retried", "answered"]
    # the wait before attempt i+1 is 0.02 * 2**i
    assert [a.planned_delay_s for a in ref_a] == pytest.approx([0.0, 0.02, 0.04])
    assert all(a.delay_s >= a.planned_delay_s for a in ref_a)
    u = p.get_recovery_stats().units["ref-a"]
    assert (u.attempts, u.successes, u.failures, u.retries, u.fallbacks) == (3, 1, 2, 2, 0)
    assert u.failures_by_type == {"OperationError": 2}


def test_retries_stay_within_bounds_then_fall_back(tiny_package: Path, tiny_inputs: dict) -> None:
    faults = FaultPlan([Fault("ref-a", "raise", error="OperationError")])
    p = two_refs(tiny_package, faults, max_retry_attempts=2)
    for _ in range(2):
        res = p.predict(tiny_inputs)
        assert res.unit == "ref-b"
        assert "gave up after 2 retries" in res.skipped["ref-a"]
    s = p.get_recovery_stats()
    a, b = s.units["ref-a"], s.units["ref-b"]
    # per request: 1 attempt + 2 retries on ref-a, then one fallback; a transient error is not permanent
    assert (a.attempts, a.failures, a.retries, a.fallbacks, a.successes) == (6, 6, 4, 2, 0)
    assert (b.attempts, b.successes) == (2, 2)
    assert (s.requests, s.answered, s.exhausted, s.total_retries, s.total_fallbacks) == (2, 2, 0, 4, 2)
    assert faults.fired("ref-a") == 6
    assert np.array_equal(res.outputs["out"], executor_outputs(tiny_package, tiny_inputs)["out"])


def test_zero_retries_means_one_attempt(tiny_package: Path, tiny_inputs: dict) -> None:
    faults = FaultPlan([Fault("ref-a", "raise", error="OperationError")])
    p = two_refs(tiny_package, faults, max_retry_attempts=0)
    assert p.predict(tiny_inputs).unit == "ref-b"
    a = p.get_recovery_stats().units["ref-a"]
    assert (a.attempts, a.retries, a.fallbacks) == (1, 0, 1)


@pytest.mark.parametrize("error", ["DeviceInitError", "ModelError", "PlatformUnavailableError",
                                   "ANEUnavailableError", "CapabilityMismatchError"])
def test_unit_errors_fall_back_at_once_and_stick(tiny_package: Path, tiny_inputs: dict, error: str) -> None:
    faults = FaultPlan([Fault("ref-a", "raise", error=error)])
    p = two_refs(tiny_package, faults, max_retry_attempts=3)
    first = p.predict(tiny_inputs)
    second = p.predict(tiny_inputs)
    assert first.unit == second.unit == "ref-b"
    assert first.retries == 0
    assert first.skipped["ref-a"].startswith("injected fault on unit ref-a")
    assert second.skipped["ref-a"].startswith("failed earlier: ")
    a = p.get_recovery_stats().units["ref-a"]
    assert (a.attempts, a.failures, a.fallbacks, a.skips, a.retries) == (1, 1, 1, 1, 0)
    assert a.failures_by_type == {error: 1}


def test_hang_past_timeout_falls_back(tiny_package: Path, tiny_inputs: dict) -> None:
    faults = FaultPlan([Fault("ref-a", "hang", seconds=3.0)])
    p = two_refs(tiny_package, faults, unit_timeout_s=0.3)
    t0 = time.perf_counter()
    res = p.predict(tiny_inputs)
    assert res.unit == "ref-b"
    assert time.perf_counter() - t0 < 3.0  # did not wait for the hung call
    assert "no answer within 0.3 s" in res.skipped["ref-a"]
    assert p.predict(tiny_inputs).skipped["ref-a"].startswith("failed earlier")
    assert p.get_recovery_stats().units["ref-a"].failures_by_type == {"TimeoutFailure": 1}


def test_nan_output_falls_back(tiny_package: Path, tiny_inputs: dict) -> None:
    faults = FaultPlan([Fault("ref-a", "nan")])
    p = two_refs(tiny_package, faults)
    res = p.predict(tiny_inputs)
    assert res.unit == "ref-b" and "NaN" in res.skipped["ref-a"]
    assert np.isfinite(res.outputs["out"]).all()
    assert p.get_recovery_stats().units["ref-a"].failures_by_type == {"ModelError": 1}


def test_wrong_output_is_caught_by_first_use_validation(tiny_package: Path, tiny_inputs: dict) -> None:
    faults = FaultPlan([Fault("ref-a", "wrong")])
    p = two_refs(tiny_package, faults, a_validate=True)
    res = p.predict(tiny_inputs)
    assert res.unit == "ref-b"
    assert "differs from the CPU reference" in res.skipped["ref-a"]
    np.testing.assert_allclose(res.outputs["out"], numpy_oracle(tiny_inputs["x"], tiny_inputs["y"]), atol=5e-3, rtol=5e-3)


def test_without_validation_wrong_output_goes_unnoticed(tiny_package: Path, tiny_inputs: dict) -> None:
    # The reason validation exists: a silently wrong unit answers when nobody checks it.
    faults = FaultPlan([Fault("ref-a", "wrong")])
    p = two_refs(tiny_package, faults, a_validate=True, validate_first_use=False)
    res = p.predict(tiny_inputs)
    assert res.unit == "ref-a"
    assert not np.allclose(res.outputs["out"], numpy_oracle(tiny_inputs["x"], tiny_inputs["y"]), atol=1e-2)


def test_validated_unit_answers(tiny_package: Path, tiny_inputs: dict) -> None:
    p = two_refs(tiny_package, a_validate=True)
    assert p.predict(tiny_inputs).unit == "ref-a"
    assert p.predict(tiny_inputs).unit == "ref-a"


def test_memory_error_frees_memory_and_retries(tiny_package: Path, tiny_inputs: dict) -> None:
    faults = FaultPlan([Fault("ref-a", "raise", error="MemoryError", count=1)])
    p = two_refs(tiny_package, faults)
    res = p.predict(tiny_inputs)
    assert res.unit == "ref-a"
    assert [a.action for a in res.attempts if a.unit == "ref-a"][0] == "reduce_memory"
    assert any("batch size cannot be lowered" in n for n in res.notes)
    assert p.get_recovery_stats().units["ref-a"].failures_by_type == {"ResourceMemoryError": 1}


def test_thermal_error_waits_then_retries(tiny_package: Path, tiny_inputs: dict) -> None:
    faults = FaultPlan([Fault("ref-a", "raise", error="ThermalError", count=1)])
    p = two_refs(tiny_package, faults, thermal_wait_s=0.05)
    res = p.predict(tiny_inputs)
    assert res.unit == "ref-a"
    assert [a.outcome for a in res.attempts if a.unit == "ref-a"] == ["retried", "answered"]
    assert any(n.startswith("thermal: waited") for n in res.notes)


def test_thermal_wait_lasts_while_the_device_stays_hot(tiny_package: Path, tiny_inputs: dict) -> None:
    faults = FaultPlan([Fault("ref-a", "raise", error="ThermalError", count=1)], thermal_state="critical")
    p = two_refs(tiny_package, faults, thermal_wait_s=0.2)
    res = p.predict(tiny_inputs)
    answered = [a for a in res.attempts if a.unit == "ref-a"][-1]
    assert answered.outcome == "answered"
    assert answered.planned_delay_s == pytest.approx(0.2) and answered.delay_s >= 0.2
    assert any("thermal state critical" in n for n in res.notes)


@linux_only
def test_hot_device_uses_efficiency_order(tiny_package: Path, tiny_inputs: dict) -> None:
    units = ["gpu", "cpu", "ane", "reference"]
    p = make_predictor(FaultPlan(thermal_state="serious"), tiny_package, FallbackStrategy(power_target="speed"),
                       units=units)
    res = p.predict(tiny_inputs)
    assert res.chain == ("ane", "cpu", "gpu", "reference")
    assert any("thermal state serious" in n for n in res.notes)
    assert res.power_target == "speed"


@linux_only
@pytest.mark.parametrize(("target", "threshold", "chain"), [
    ("balanced", 0, ("ane", "gpu", "cpu", "reference")),
    ("efficiency", 0, ("ane", "cpu", "gpu", "reference")),
    ("speed", 0, ("gpu", "ane", "cpu", "reference")),  # every model is "bandwidth bound" at threshold 0
    ("speed", 2**40, ("ane", "gpu", "cpu", "reference")),
])
def test_power_target_reorders_and_is_reported(tiny_package: Path, tiny_inputs: dict, target: str, threshold: int,
                                              chain: tuple) -> None:
    p = Predictor(tiny_package, FallbackStrategy(power_target=target, bandwidth_bound_weight_bytes=threshold))
    res = p.predict(tiny_inputs)
    assert res.chain == chain and res.power_target == target and res.unit == "reference"
    assert res.to_dict()["power_target"] == target


def test_memory_pressure_moves_to_a_cheaper_unit(tiny_package: Path, tiny_inputs: dict) -> None:
    p = two_refs(tiny_package, FaultPlan(available_memory_bytes=1))
    res = p.predict(tiny_inputs)
    assert res.unit == "ref-b"
    assert res.skipped["ref-a"].startswith("memory pressure: loading ref-a needs")
    assert any("moved on to a unit that costs less" in n for n in res.notes)
    assert any("trying it anyway as the last unit" in n for n in res.notes)


def test_every_unit_failing_is_exhausted(tiny_package: Path, tiny_inputs: dict) -> None:
    faults = FaultPlan([Fault("ref-a", "raise", error="ModelError"), Fault("ref-b", "nan")])
    p = two_refs(tiny_package, faults)
    with pytest.raises(E.ExhaustedError) as ei:
        p.predict(tiny_inputs)
    msg = ei.value.one_line()
    assert "no compute unit answered" in msg and "ref-a: injected fault" in msg and "; ref-b: output 'out' contains NaN" in msg
    assert [a["unit"] for a in ei.value.attempts] == [*COREML, "ref-a", "ref-b"]
    assert ei.value.exit_code == E.EXIT_RUNTIME
    s = p.get_recovery_stats()
    assert (s.requests, s.answered, s.exhausted) == (1, 0, 1)


@pytest.mark.parametrize(("inputs", "match"), [
    ({"x": np.zeros((2, 3), np.float32)}, "missing y"),
    ({"x": np.zeros((2, 3), np.float32), "y": np.zeros((2, 4), np.float32), "z": np.zeros(1)}, "unexpected z"),
    ({"x": np.zeros((3, 3), np.float32), "y": np.zeros((2, 4), np.float32)}, r"shape \[3, 3\]; tiny.mlpackage expects \[2, 3\]"),
    ({"x": np.zeros((2, 3), np.int32), "y": np.zeros((2, 4), np.float32)}, "dtype int32; expected a float dtype"),
    ({"x": np.full((2, 3), np.nan, np.float32), "y": np.zeros((2, 4), np.float32)}, "6 NaN/infinite"),
])
def test_bad_inputs_give_up_before_any_unit(tiny_package: Path, inputs: dict, match: str) -> None:
    p = two_refs(tiny_package)
    with pytest.raises(PredictionInputError, match=match) as ei:
        p.predict(inputs)
    assert ei.value.exit_code == E.EXIT_BAD_INPUT
    s = p.get_recovery_stats()
    assert all(u.attempts == 0 for u in s.units.values())
    assert (s.requests, s.answered, s.exhausted, s.rejected) == (1, 0, 0, 1)


def test_float64_inputs_are_cast(tiny_package: Path, tiny_inputs: dict) -> None:
    p = Predictor(tiny_package, units=["reference"])
    res = p.predict({k: v.astype(np.float64) for k, v in tiny_inputs.items()})
    assert np.array_equal(res.outputs["out"], executor_outputs(tiny_package, tiny_inputs)["out"])


def test_missing_and_corrupt_packages(tmp_path: Path) -> None:
    with pytest.raises(E.ModelLoadError, match="does not exist"):
        Predictor(tmp_path / "nope.mlpackage")
    bad = tmp_path / "bad.mlpackage"
    (bad / "Data" / "com.apple.CoreML").mkdir(parents=True)
    (bad / "Manifest.json").write_text("{not json")
    with pytest.raises(E.ModelLoadError, match=r"Manifest\.json: not valid JSON"):
        Predictor(bad)


def test_execute_with_recovery(tiny_package: Path) -> None:
    p = Predictor(tiny_package, FallbackStrategy(**FAST, max_retry_attempts=3), units=["reference"])
    calls = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("transient")
        return 42

    assert p.execute_with_recovery("gemm", flaky) == 42
    assert p.execute_with_recovery("init", lambda: (_ for _ in ()).throw(E.DeviceInitError("no device")),
                                   fallback=lambda: 7) == 7
    with pytest.raises(E.ExhaustedError, match="operation always failed after 3 retries"):
        p.execute_with_recovery("always", lambda: (_ for _ in ()).throw(E.OperationError("nope")))
    with pytest.raises(E.InputError):
        p.execute_with_recovery("bad", lambda: (_ for _ in ()).throw(E.InputError("bad value")))
    ops = p.get_recovery_stats().operations
    assert (ops["gemm"].attempts, ops["gemm"].retries, ops["gemm"].successes) == (3, 2, 1)
    assert ops["gemm"].failures_by_type == {"OperationError": 2}
    assert (ops["init"].fallbacks, ops["init:fallback"].successes) == (1, 1)
    assert (ops["always"].attempts, ops["always"].failures) == (4, 4)


@linux_only
def test_validate_operation_requirements(tiny_package: Path) -> None:
    p = Predictor(tiny_package, units=["reference"])
    # The seed's GPU-matrix requirements (neural networks, matmul) have no GPU row on a Linux host.
    no_gpu = {"neural_network_support": False, "matrix_multiplication": False}
    p.validate_operation_requirements({**no_gpu, "minimum_memory_mb": 1})
    with pytest.raises(E.CapabilityMismatchError) as ei:
        p.validate_operation_requirements({**no_gpu, "minimum_memory_mb": 10**9, "ane_support": True})
    assert sorted(m.split(":")[0] for m in ei.value.mismatches) == ["ane_support", "minimum_memory_mb"]
    with pytest.raises(E.CapabilityMismatchError) as ei:
        p.validate_operation_requirements({})
    assert sorted(m.split(":")[0] for m in ei.value.mismatches) == ["matrix_multiplication", "neural_network_support"]
    with pytest.raises(E.ConfigError, match="unknown requirement field"):
        p.validate_operation_requirements({"tops": 11})


def test_fallback_overhead_is_reported(tiny_package: Path, tiny_inputs: dict) -> None:
    faults = FaultPlan([Fault("ref-a", "raise", error="OperationError")])
    p = two_refs(tiny_package, faults, max_retry_attempts=0)
    res = p.predict(tiny_inputs)
    assert res.fallback_overhead_s is not None and 0 <= res.fallback_overhead_s <= res.latency_s
    assert Predictor(tiny_package, units=["reference"]).predict(tiny_inputs).fallback_overhead_s is None


def test_workers_stop_on_close_and_when_dropped(tiny_package: Path, tiny_inputs: dict) -> None:
    import gc

    def wait_dead(thread) -> bool:  # type: ignore[no-untyped-def]
        thread.join(timeout=5)
        return not thread.is_alive()

    with Predictor(tiny_package, units=["reference"]) as p:
        p.predict(tiny_inputs)
        closed = p._workers["reference"]._t
        assert closed.is_alive()
    assert wait_dead(closed)
    dropped = Predictor(tiny_package, units=["reference"])
    dropped.predict(tiny_inputs)
    thread = dropped._workers["reference"]._t
    del dropped
    gc.collect()
    assert wait_dead(thread)


class _BuggyUnit(ReferenceUnit):
    """A unit whose prediction raises a programming error (as a bug in an op implementation would)."""

    calls = 0

    def _run(self, inputs: dict) -> dict:
        type(self).calls += 1
        raise TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'")


def test_a_bug_is_never_retried_nor_passed_to_the_next_unit(tiny_package: Path, tiny_inputs: dict) -> None:
    _BuggyUnit.calls = 0
    p = Predictor(tiny_package, FallbackStrategy(**FAST, max_retry_attempts=3),
                  units=[_BuggyUnit("buggy"), ReferenceUnit("ref-b")])
    with pytest.raises(E.InternalError) as info:
        p.predict(tiny_inputs)
    assert _BuggyUnit.calls == 1  # no retry, and ref-b was never asked to cover for it
    assert info.value.one_line() == ("internal error in buggy predict: TypeError: unsupported operand type(s) for +: "
                                     "'NoneType' and 'int' (rerun with --debug for the traceback)")
    assert p.get_recovery_stats().units["buggy"].retries == 0
    p.close()
