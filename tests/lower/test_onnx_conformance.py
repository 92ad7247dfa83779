"""ONNX node-conformance cases (the onnx wheel's own model + inputs + expected outputs) through the
lowerings, the program builder, ``ct.convert`` and the reference executor.

``make test`` runs the first case of every claimed op; ``make conformance`` (``-m conformance``) runs
every case of every claimed op and requires >= 95% of the cases that run to match, with every
exclusion explained by a Core ML limit listed in ``ALLOWED_EXCLUSIONS`` (docs/conformance-onnx.md).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import pytest

from tests.lower.conformance_onnx import CaseResult, claimed_cases, run_case

# Reasons a case may be excluded: each is a Core ML limit, not a gap in a lowering.
ALLOWED_EXCLUSIONS = [
    r"has no Core ML equivalent",  # string, complex, bfloat16, float8, int4/uint4, float4 element types
    r"Core ML model inputs are",  # 2-bit ints as model inputs
    r"is empty|zero-size",  # Core ML has no zero-size tensors
    r"beyond int32",  # int64 values that do not fit int32
    r"rank > 5|rank \d+ > 5",  # Core ML tensors have rank <= 5
    r"no bitwise ops",  # bit ops fold on constants only
    r"dilated pooling",  # MIL pools have no dilation
    r"training",  # inference only (Dropout/BatchNormalization training mode)
    r"Indices output of MaxPool",  # MIL max_pool has no argmax output
    r"sequence/optional",  # sequence / optional types
    r"pools float tensors only",  # MIL pools are float-only
    r"depends on the data",  # data-dependent output shapes (NonZero on a computed value)
]
_ALLOWED = re.compile("|".join(ALLOWED_EXCLUSIONS))


@lru_cache(maxsize=1)
def _cases() -> list[tuple[str, Any]]:
    return claimed_cases()


def _ops() -> list[str]:
    return sorted({op for op, _ in _cases()})


def _first_cases() -> list[tuple[str, Any]]:
    seen: dict[str, Any] = {}
    for op, case in _cases():
        seen.setdefault(op, case)
    return sorted(seen.items())


def _check(result: CaseResult) -> None:
    if result.status == "excluded":
        assert _ALLOWED.search(result.reason), f"{result.name}: unexpected exclusion: {result.reason}"
        return
    assert result.status == "pass", f"{result.name}: {result.status}: {result.reason}"


@pytest.mark.parametrize(("op", "case"), _first_cases(), ids=lambda v: v if isinstance(v, str) else v.name)
def test_first_case_of_each_op(op: str, case: Any) -> None:
    _check(run_case(op, case, "execute"))


@pytest.mark.conformance
@pytest.mark.timeout(900)
@pytest.mark.parametrize("op", _ops())
def test_all_cases_of_op(op: str) -> None:
    results = [run_case(o, c, "execute") for o, c in _cases() if o == op]
    ran = [r for r in results if r.status != "excluded"]
    failed = [r for r in ran if r.status != "pass"]
    for r in results:
        if r.status == "excluded":
            assert _ALLOWED.search(r.reason), f"{r.name}: unexpected exclusion: {r.reason}"
    if ran:
        rate = 1.0 - len(failed) / len(ran)
        assert rate >= 0.95, f"{op}: {len(failed)} of {len(ran)} cases fail: " + "; ".join(
            f"{r.name}: {r.reason}" for r in failed[:5])


def test_claimed_ops_cover_the_bitnet_export_ops() -> None:
    # Every op the BitNet exports and bundled models use must have conformance cases that run.
    required = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Round", "Clip", "Relu",
                "Sigmoid", "Tanh", "Erf", "Softmax", "MatMul", "Gemm", "Reshape", "Transpose", "Slice", "Concat",
                "Unsqueeze", "Squeeze", "Expand", "Gather", "Where", "IsNaN", "Cast", "Less", "Greater", "Equal",
                "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "ReduceMean", "ReduceMax", "ReduceSum",
                "LayerNormalization", "Shape", "Range", "ConstantOfShape", "Conv"}
    missing = required - set(_ops())
    assert not missing, f"no conformance cases for {sorted(missing)}"
