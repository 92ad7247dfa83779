"""The seed's ANE API: requirements, mismatches, score (hand-computed), operation requirements."""

from __future__ import annotations

import pytest

from bitnet_coreml.check import (
    ANECapabilities,
    ANEDataType,
    CapabilityRequirements,
    validate_operation_requirements,
)
from bitnet_coreml.check.ane import requirement_mismatches
from bitnet_coreml.check.capabilities import load_capabilities
from bitnet_coreml.errors import CapabilityMismatchError, InputError


def test_data_type_parse() -> None:
    assert ANEDataType.parse("FP16") is ANEDataType.FLOAT16
    assert ANEDataType.parse("float16") is ANEDataType.FLOAT16
    assert ANEDataType.Float16 is ANEDataType.FLOAT16  # the seed's spelling
    assert ANEDataType.parse("int8") is ANEDataType.INT8
    with pytest.raises(InputError, match="allowed: fp16, int8, int16, uint8, fp32"):
        ANEDataType.parse("bf16")


def test_seed_example_a14() -> None:
    # The seed's example: 1e12 ops/s, [Float16, Int8], 128 MB. A14 = Gen 4: 10.9 TOPS, fp16/int8/int16, 128 MB.
    a14 = ANECapabilities.for_chip("A14")
    assert a14.generation == 4 and a14.tops == 10.9
    assert a14.meets_requirements(1_000_000_000_000, [ANEDataType.Float16, ANEDataType.Int8], 128)
    assert a14.get_requirement_mismatch(1e12, ["fp16", "int8"], 128) == []
    assert a14.compatibility_score(1e12, ["fp16", "int8"], 128) == 1.0


def test_each_requirement_on_both_sides_of_its_threshold() -> None:
    a12 = ANECapabilities.for_chip("A12")  # Gen 2: 0.6 TOPS, fp16 only, 32 MB
    assert a12.meets_requirements(0.6e12, ["fp16"], 32)
    m = a12.get_requirement_mismatch(0.61e12, ["fp16"], 32)
    assert len(m) == 1 and m[0].startswith("ops_per_second")
    m = a12.get_requirement_mismatch(0, ["fp16", "int8"], 32)
    assert len(m) == 1 and m[0].startswith("data type int8")
    m = a12.get_requirement_mismatch(0, ["fp16"], 32.5)
    assert len(m) == 1 and m[0].startswith("model size")
    # all three at once: every mismatch is listed
    assert len(a12.get_requirement_mismatch(1e12, ["int8", "int16"], 64)) == 4


def test_score_formula_hand_computed() -> None:
    a12 = ANECapabilities.for_chip("A12")
    # s_ops = 0.6e12 / 1.2e12 = 0.5; s_types = 1/2 (fp16 yes, int8 no); s_size = 32/64 = 0.5
    assert a12.compatibility_score(1.2e12, ["fp16", "int8"], 64) == pytest.approx(0.5 * 0.5 * 0.5)
    assert a12.compatibility_score(0, [], 0) == 1.0
    # a type no generation has: fp32
    assert ANECapabilities.for_chip("M3").compatibility_score(0, ["fp32"], 1) == 0.0


def test_unknown_tops_is_not_guessed() -> None:
    a17 = ANECapabilities.for_chip("A17Pro")
    assert a17.tops is None and a17.generation == 6 and a17.int8_compute is True
    m = a17.get_requirement_mismatch(1e9, ["fp16"], 10)
    assert len(m) == 1 and "unknown" in m[0]
    assert not a17.meets_requirements(1e9, ["fp16"], 10)
    assert a17.meets_requirements(0, ["fp16"], 10)
    # the unknown factor is left out of the product: only s_size = 256/512 counts
    assert a17.score_components(1e9, ["fp16"], 512)["ops"] is None
    assert a17.compatibility_score(1e9, ["fp16"], 512) == pytest.approx(0.5)


def test_for_generation_uses_the_rows_tops() -> None:
    g6 = ANECapabilities.for_generation(6)
    assert g6.tops == 15.8 and g6.model_size_budget_mb == 256
    with pytest.raises(InputError, match="unknown ANE generation 7"):
        ANECapabilities.for_generation(7)


def test_requirements_against_device_rows() -> None:
    req = CapabilityRequirements(neural_network_support=True, matrix_multiplication=True, convolution_support=True,
                                 graph_api=True, minimum_memory_mb=1024, ane_support=False)
    validate_operation_requirements(req, "Apple M1")  # Full/Full/Full/Yes/1GB: exactly meets 1024 MB
    with pytest.raises(CapabilityMismatchError) as e:
        validate_operation_requirements(CapabilityRequirements(minimum_memory_mb=1025), "Apple M1")
    assert e.value.mismatches == ["minimum_memory_mb: requires 1025 MB; Apple M1 memory limit is 1024 MB"]
    with pytest.raises(CapabilityMismatchError) as e:
        validate_operation_requirements(req, "Intel Iris")
    # Intel Iris: NN limited, conv limited, no graph API, 512 MB: four mismatches, all listed
    assert len(e.value.mismatches) == 4
    assert e.value.exit_code == 3


def test_requirements_ane_and_no_device() -> None:
    db = load_capabilities()
    out = requirement_mismatches(CapabilityRequirements(ane_support=True), None, ane_available=False, memory_mb=100)
    assert any(m.startswith("ane_support") for m in out)
    assert any(m.startswith("neural_network_support") for m in out)
    assert requirement_mismatches(CapabilityRequirements(neural_network_support=False, matrix_multiplication=False,
                                                         ane_support=True), db.device("Apple M2"),
                                  ane_available=True) == []
    with pytest.raises(InputError):
        CapabilityRequirements(minimum_memory_mb=-1)


def test_validate_current_platform_linux() -> None:
    import platform

    if platform.system() == "Darwin":
        pytest.skip("checks the non-macOS host path")
    with pytest.raises(CapabilityMismatchError) as e:
        validate_operation_requirements(CapabilityRequirements(ane_support=True))
    assert any("ane_support" in m for m in e.value.mismatches)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_KNOWN_TOPS = ["A11", "A12", "A13", "A14", "A15", "A16", "M1", "M2", "M3"]


@settings(max_examples=200, deadline=None)
@given(chip=st.sampled_from(_KNOWN_TOPS), ops=st.floats(0, 2e13), size=st.floats(0, 400),
       types=st.lists(st.sampled_from(["fp16", "int8", "int16", "uint8", "fp32"]), max_size=3))
def test_score_is_one_exactly_when_requirements_are_met(chip: str, ops: float, size: float, types: list[str]) -> None:
    ane = ANECapabilities.for_chip(chip)
    score = ane.compatibility_score(ops, types, size)
    assert 0.0 <= score <= 1.0
    assert (score == 1.0) is ane.meets_requirements(ops, types, size)
    assert len(ane.get_requirement_mismatch(ops, types, size)) == (
        (ops > ane.tops * 1e12) + len({t for t in types if ANEDataType.parse(t) not in ane.data_types})  # type: ignore[operator]
        + (size > ane.model_size_budget_mb))  # type: ignore[operator]
