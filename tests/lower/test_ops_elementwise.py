"""Elementwise lowerings against independent oracles (numpy's round-half-even, the ONNX reference)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from bitnet_coreml.lower.program import BuildOptions, build_program, convert_program
from bitnet_coreml.lower.registry import LoweringContext, get_lowering
from tests.lower.conformance_onnx import reference_outputs, run_model, single_node_model


def _tie_values() -> np.ndarray:
    ties = np.arange(-1000, 1000, dtype=np.float32) + np.float32(0.5)
    near = np.array([np.nextafter(np.float32(0.5), np.float32(0)), np.nextafter(np.float32(0.5), np.float32(1)),
                     -np.nextafter(np.float32(2.5), np.float32(0)), 2.0**23 + 1, -(2.0**23) - 1, 2.0**24 + 2,
                     1e30, -1e30, 0.0, -0.0, 0.5, -0.5, 1.5, -1.5], dtype=np.float32)
    rng = np.random.default_rng(0)
    return np.concatenate([ties, near, rng.uniform(-300, 300, 500).astype(np.float32)])


def test_round_is_half_to_even_exactly_in_fp32() -> None:
    x = _tie_values()
    model = single_node_model("Round", {"x": x})
    (got,) = run_model(model, {"x": x})
    np.testing.assert_array_equal(got, np.round(x))  # numpy rounds half to even, as ONNX specifies


def test_round_is_half_to_even_exactly_in_fp16() -> None:
    # fp16 program (the ANE's precision): ties up to |x| < 1024 are representable and must round to even.
    from bitnet_coreml.executor import ReferenceExecutor

    x = (np.arange(-1000, 1000, dtype=np.float32) + np.float32(0.5))
    model = ir.from_proto(single_node_model("Round", {"x": x}))
    built = build_program(model, BuildOptions(precision="fp16", ios=17))
    ops = [op.op_type for op in built.program.functions["main"].operations]
    assert "round" not in ops  # MIL round's tie rule is backend-defined; we never rely on it
    mlmodel = convert_program(built, precision="fp16")
    got = ReferenceExecutor(mlmodel).predict({"x": x})[built.output_names["y"]]
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.round(x.astype(np.float16)).astype(np.float32))


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_div_truncates_toward_zero(dtype: type) -> None:
    a = np.array([7, -7, 7, -7, 0, 9, -9, 1], dtype=dtype)
    b = np.array([2, 2, -2, -2, 3, 4, -4, -3], dtype=dtype)
    model = single_node_model("Div", {"a": a, "b": b})
    (expected,) = reference_outputs(model, {"a": a, "b": b})
    (got,) = run_model(model, {"a": a, "b": b})
    np.testing.assert_array_equal(got.astype(np.int64), expected.astype(np.int64))


@pytest.mark.parametrize("fmod", [0, 1])
@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_mod_sign_conventions(fmod: int, dtype: type) -> None:
    if dtype == np.int32:
        a = np.array([5, -5, 5, -5, 7, -8], dtype=dtype)
        b = np.array([3, 3, -3, -3, 2, 3], dtype=dtype)
    else:
        a = np.array([5.5, -5.5, 5.5, -5.5, 7.25], dtype=dtype)
        b = np.array([3.0, 3.0, -3.0, -3.0, 2.0], dtype=dtype)
    model = single_node_model("Mod", {"a": a, "b": b}, fmod=fmod)
    (expected,) = reference_outputs(model, {"a": a, "b": b})
    (got,) = run_model(model, {"a": a, "b": b})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_pow_with_int_exponent_and_square() -> None:
    x = np.linspace(-3, 3, 13, dtype=np.float32)
    for y in (np.array(2, np.int64), np.array(3.0, np.float32)):
        model = single_node_model("Pow", {"x": x}, initializers={"p": y})
        (expected,) = reference_outputs(model, {"x": x})
        (got,) = run_model(model, {"x": x})
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_constant_inputs_fold_to_numpy_without_mil_ops() -> None:
    # Both operands are initializers: the lowering must return a numpy value (int64 kept exact).
    a = np.array([2**40, 3], dtype=np.int64)
    b = np.array([5, -7], dtype=np.int64)
    model = ir.from_proto(single_node_model("Mul", {}, initializers={"a": a, "b": b}))
    node = model.graph.node(0)
    ctx = LoweringContext()
    (out,) = get_lowering(node)(ctx, node)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64
    np.testing.assert_array_equal(out, a * b)
