"""Shape/layout lowerings: Slice's clamping conventions, folded shape arithmetic, errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from bitnet_coreml.errors import InputError, UnsupportedOpError
from bitnet_coreml.lower.program import BuildOptions, build_program
from tests.lower.conformance_onnx import reference_outputs, run_model, single_node_model

I64_MAX = np.iinfo(np.int64).max
I64_MIN = np.iinfo(np.int64).min


@pytest.mark.parametrize(
    ("starts", "ends", "axes", "steps"),
    [
        ([1], [I64_MAX], [1], [1]),  # INT64_MAX end: to the end
        ([-3], [I64_MAX], [-1], [1]),  # negative start, negative axis
        ([I64_MAX], [I64_MIN], [0], [-1]),  # full reverse: runs through index 0
        ([-1], [-1000], [1], [-2]),  # reverse with a stride, end clamped below 0
        ([0, 1], [2, 100], [0, 2], [1, 2]),  # several axes, end clamped above the size
        ([-100], [2], [2], [1]),  # start clamped below 0
        ([4], [1], [2], [-1]),  # reverse, stop before index 1
    ],
)
def test_slice_matches_onnx_reference(starts: list[int], ends: list[int], axes: list[int], steps: list[int]) -> None:
    x = np.arange(3 * 5 * 6, dtype=np.float32).reshape(3, 5, 6)
    inits = {n: np.array(v, np.int64) for n, v in (("starts", starts), ("ends", ends), ("axes", axes),
                                                   ("steps", steps))}
    model = single_node_model("Slice", {"x": x}, initializers=inits)
    (expected,) = reference_outputs(model, {"x": x})
    (got,) = run_model(model, {"x": x})
    np.testing.assert_array_equal(got, expected)


def _shape_chain_model() -> onnx.ModelProto:
    # y = Reshape(x, Concat(Gather(Shape(x), 0), [-1])): the pattern transformers exports write.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "zero1"], ["b1"]),
        helper.make_node("Concat", ["b1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
        helper.make_node("Range", ["r0", "b", "r1"], ["pos"]),
        helper.make_node("ConstantOfShape", ["target_len"], ["ones"],
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "zero1"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(np.array(0, np.int64), "r0"),
             numpy_helper.from_array(np.array(1, np.int64), "r1"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "target_len")]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4])],
                          [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
                           for n in ("y", "pos", "ones")], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


def test_shape_arithmetic_folds_and_matches_reference() -> None:
    model = _shape_chain_model()
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    expected = reference_outputs(model, {"x": x})
    got = run_model(model, {"x": x})
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g.astype(e.dtype), e)
    built = build_program(ir.from_proto(model), BuildOptions(precision="fp32", ios=17))
    ops = {op.op_type for op in built.program.functions["main"].operations}
    # Shape/Gather/Concat/Range/ConstantOfShape all folded: only the reshape and output plumbing remain.
    assert not ops & {"shape", "gather", "concat", "range_1d", "fill"}, ops
    assert "reshape" in ops


def test_reshape_with_computed_shape_is_unsupported() -> None:
    x = np.zeros((2, 3), np.float32)
    model = single_node_model("Reshape", {"x": x, "shape": np.array([3, 2], np.int64)})
    with pytest.raises(UnsupportedOpError, match=r"Reshape.*input 1 \('shape'\) must be a compile-time constant"):
        build_program(ir.from_proto(model), BuildOptions(precision="fp32", ios=17))


def test_reshape_to_wrong_size_is_bad_input() -> None:
    x = np.zeros((2, 3), np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"], name="bad_reshape")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([4, 2], np.int64), "s")]), opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(InputError, match=r"bad_reshape.*\[4, 2\].*\[2, 3\]"):
        build_program(ir.from_proto(model), BuildOptions(precision="fp32", ios=17))
    assert x.size == 6


@pytest.mark.parametrize("shape", [[3, 1, 4], [2, 3, 4], [1, 4]])
def test_expand_matches_reference(shape: list[int]) -> None:
    x = np.arange(4, dtype=np.float32).reshape(1, 4) if len(shape) != 3 or shape[0] != 3 else \
        np.arange(3, dtype=np.float32).reshape(3, 1, 1)
    model = single_node_model("Expand", {"x": x}, initializers={"s": np.array(shape, np.int64)})
    (expected,) = reference_outputs(model, {"x": x})
    (got,) = run_model(model, {"x": x})
    np.testing.assert_array_equal(got, expected)


def test_split_opset18_num_outputs_uneven() -> None:
    x = np.arange(14, dtype=np.float32).reshape(2, 7)
    model = single_node_model("Split", {"x": x}, outputs=("a", "b", "c"), axis=1, num_outputs=3)
    expected = reference_outputs(model, {"x": x})
    got = run_model(model, {"x": x})
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)
