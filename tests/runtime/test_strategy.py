"""FallbackStrategy validation and unit ordering by power target."""

from __future__ import annotations

import dataclasses

import pytest

from bitnet_coreml.errors import ConfigError
from bitnet_coreml.runtime import ComputeUnit, FallbackStrategy, PowerTarget
from bitnet_coreml.runtime.strategy import order_for_power

U = ComputeUnit


def test_default_chain_is_ane_gpu_cpu_reference() -> None:
    s = FallbackStrategy()
    assert [u.value for u in s.units] == ["ane", "gpu", "cpu", "reference"]
    assert [U.ANE.coreml_name, U.GPU.coreml_name, U.CPU.coreml_name] == ["CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY"]
    assert U.REFERENCE.coreml_name is None


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        FallbackStrategy().max_retry_attempts = 9  # type: ignore[misc]


@pytest.mark.parametrize("kwargs", [
    {"units": ()},
    {"units": ("ane", "ane")},
    {"units": ("tpu",)},
    {"max_retry_attempts": -1},
    {"max_retry_attempts": True},
    {"max_retry_attempts": 1.5},
    {"retry_delay_s": -0.1},
    {"retry_delay_s": float("nan")},
    {"backoff_factor": 0.5},
    {"max_retry_delay_s": float("inf")},
    {"unit_timeout_s": 0},
    {"probe_timeout_s": -1},
    {"validation_max_rel_l2": 0},
    {"power_target": "turbo"},
    {"latency_window": 0},
])
def test_invalid_strategy_is_a_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError) as ei:
        FallbackStrategy(**kwargs)
    assert "\n" not in ei.value.one_line()


def test_unit_and_power_names_are_parsed() -> None:
    s = FallbackStrategy(units=("CPU", "reference"), power_target="speed")  # type: ignore[arg-type]
    assert s.units == (U.CPU, U.REFERENCE)
    assert s.power_target is PowerTarget.SPEED
    assert s.to_dict()["units"] == ["cpu", "reference"]


def test_disabled_fallbacks_leave_the_chain() -> None:
    s = FallbackStrategy(enable_gpu_fallback=False, enable_cpu_fallback=False)
    assert s.enabled_units() == (U.ANE, U.REFERENCE)
    # the first unit is the request itself, never a fallback
    s2 = FallbackStrategy(units=(U.CPU, U.REFERENCE), enable_cpu_fallback=False, enable_reference_fallback=False)
    assert s2.enabled_units() == (U.CPU,)


def test_retry_delays_follow_backoff() -> None:
    s = FallbackStrategy(max_retry_attempts=5, retry_delay_s=0.2, backoff_factor=2, max_retry_delay_s=1.0)
    assert s.retry_delays() == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])


ALL = [U.ANE, U.GPU, U.CPU, U.REFERENCE]


@pytest.mark.parametrize(("target", "bandwidth", "expected"), [
    (PowerTarget.BALANCED, False, ALL),
    (PowerTarget.BALANCED, True, ALL),
    (PowerTarget.EFFICIENCY, False, [U.ANE, U.CPU, U.GPU, U.REFERENCE]),
    (PowerTarget.SPEED, False, [U.ANE, U.GPU, U.CPU, U.REFERENCE]),
    (PowerTarget.SPEED, True, [U.GPU, U.ANE, U.CPU, U.REFERENCE]),
])
def test_power_target_orders_chain(target: PowerTarget, bandwidth: bool, expected: list) -> None:
    idx, reason = order_for_power(ALL, target, bandwidth_bound=bandwidth)
    assert [ALL[i] for i in idx] == expected
    assert reason.startswith(target.value)


def test_power_order_keeps_configured_order_within_a_kind() -> None:
    kinds = [U.REFERENCE, U.GPU, U.REFERENCE, U.ANE]
    idx, _ = order_for_power(kinds, PowerTarget.EFFICIENCY, bandwidth_bound=False)
    assert idx == [3, 1, 0, 2]
