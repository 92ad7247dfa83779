"""Gather, Cast, reductions, LayerNormalization, Conv and logic lowerings against the ONNX reference."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from bitnet_coreml.errors import UnsupportedOpError
from bitnet_coreml.lower.program import BuildOptions, build_program
from tests.lower.conformance_onnx import reference_outputs, run_model, single_node_model

RNG = np.random.default_rng(7)


def _check(model: object, feeds: dict[str, np.ndarray], rtol: float = 1e-5, atol: float = 1e-6) -> None:
    expected = reference_outputs(model, feeds)
    got = run_model(model, feeds)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        if e.dtype.kind in "biu":
            np.testing.assert_array_equal(g.astype(np.int64), e.astype(np.int64))
        else:
            np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)


def test_embedding_gather_with_int64_ids_and_negative_indices() -> None:
    table = RNG.standard_normal((10, 4)).astype(np.float32)
    ids = np.array([[0, 3, -1, 9], [-10, 2, 2, 5]], np.int64)
    model = single_node_model("Gather", {"ids": ids}, initializers={"table": table}, axis=0)
    # Gather(data, indices): swap so the table is input 0.
    model.graph.node[0].input[:] = ["table", "ids"]
    _check(model, {"ids": ids})


def test_gather_scalar_index_drops_the_axis() -> None:
    x = RNG.standard_normal((3, 5)).astype(np.float32)
    model = single_node_model("Gather", {"x": x}, initializers={"i": np.array(-2, np.int64)}, axis=1)
    _check(model, {"x": x})


@pytest.mark.parametrize("to", [6, 7, 1, 9])  # INT32, INT64, FLOAT, BOOL
def test_cast_from_float_truncates_and_maps_int64(to: int) -> None:
    x = np.array([-2.7, -0.5, 0.0, 0.4, 1.5, 3.99, -7.0], np.float32)
    _check(single_node_model("Cast", {"x": x}, to=to), {"x": x})


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2"])
@pytest.mark.parametrize(("opset", "keepdims"), [(13, 0), (18, 1)])
def test_reduce_axes_attribute_and_input_forms(op: str, opset: int, keepdims: int) -> None:
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    axes = np.array([-1, 1], np.int64)
    input_form = opset >= 18 or op == "ReduceSum"
    if input_form:
        model = single_node_model(op, {"x": x}, initializers={"axes": axes}, opset=opset, keepdims=keepdims)
    else:
        model = single_node_model(op, {"x": x}, opset=opset, keepdims=keepdims, axes=[-1, 1])
    _check(model, {"x": x})


def test_layer_norm_fused_and_with_stat_outputs() -> None:
    x = RNG.standard_normal((2, 3, 8)).astype(np.float32) * 3 + 1
    scale = RNG.standard_normal(8).astype(np.float32)
    bias = RNG.standard_normal(8).astype(np.float32)
    fused = single_node_model("LayerNormalization", {"x": x}, initializers={"s": scale, "b": bias}, epsilon=1e-5)
    _check(fused, {"x": x}, rtol=1e-4, atol=1e-5)
    built = build_program(ir.from_proto(fused), BuildOptions(precision="fp32", ios=17))
    assert "layer_norm" in {op.op_type for op in built.program.functions["main"].operations}
    stats = single_node_model("LayerNormalization", {"x": x}, outputs=("y", "mean", "inv"),
                              initializers={"s": scale, "b": bias}, axis=1)
    _check(stats, {"x": x}, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("group", "strides", "pads", "dilations"), [
    (1, [1, 1], [0, 0, 0, 0], [1, 1]),
    (2, [2, 1], [1, 0, 2, 1], [1, 1]),
    (4, [1, 2], [1, 1, 1, 1], [2, 1]),
])
def test_conv_groups_strides_pads_dilations(group: int, strides: list[int], pads: list[int],
                                            dilations: list[int]) -> None:
    x = RNG.standard_normal((1, 4, 9, 8)).astype(np.float32)
    # Ternary weights, as in BitNet CNNs.
    w = RNG.integers(-1, 2, size=(8, 4 // group, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(8).astype(np.float32)
    model = single_node_model("Conv", {"x": x}, initializers={"w": w, "b": b}, group=group, strides=strides,
                              pads=pads, dilations=dilations)
    _check(model, {"x": x}, rtol=1e-4, atol=1e-4)


def test_where_with_comparison_and_isnan() -> None:
    import onnx
    from onnx import helper

    x = np.array([1.0, np.nan, -2.0, 3.0, np.nan], np.float32)
    nodes = [helper.make_node("IsNaN", ["x"], ["nan"]), helper.make_node("Not", ["nan"], ["ok"]),
             helper.make_node("Greater", ["x", "zero"], ["pos"]), helper.make_node("And", ["ok", "pos"], ["keep"]),
             helper.make_node("Where", ["keep", "x", "zero"], ["y"])]
    g = helper.make_graph(nodes, "w", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [5])],
                          [onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    _check(model, {"x": x})


def test_bitwise_op_on_a_computed_value_names_the_node() -> None:
    x = np.array([1, 2, 3], np.int32)
    model = ir.from_proto(single_node_model("BitwiseAnd", {"x": x}, initializers={"m": np.array([1], np.int32)}))
    model.graph.node(0).name = "mask_and"
    with pytest.raises(UnsupportedOpError, match=r"mask_and.*BitwiseAnd.*no bitwise ops"):
        build_program(model, BuildOptions(precision="fp32", ios=17))


def test_bitwise_ops_on_constants_fold() -> None:
    a = np.array([12, 10], np.int64)
    model = single_node_model("BitShift", {}, initializers={"a": a, "s": np.array([2, 1], np.int64)},
                              direction="RIGHT")
    m = ir.from_proto(model)
    from bitnet_coreml.lower.registry import LoweringContext, get_lowering

    node = m.graph.node(0)
    (out,) = get_lowering(node)(LoweringContext(), node)
    np.testing.assert_array_equal(out, reference_outputs(model, {})[0])


def test_where_with_two_constant_branches_keeps_the_condition_shape() -> None:
    # Where(mask, 0, -inf) builds attention biases; MIL select sizes its output from the branches.
    mask = np.array([[True, False, True], [False, False, True]])
    model = single_node_model("Where", {"mask": mask}, initializers={
        "zero": np.array(0.0, np.float32), "ninf": np.array(-np.inf, np.float32)})
    _check(model, {"mask": mask})


def test_attention_gqa_causal_with_past_matches_reference() -> None:
    q = RNG.standard_normal((1, 4, 3, 8)).astype(np.float32)
    k = RNG.standard_normal((1, 2, 3, 8)).astype(np.float32)
    v = RNG.standard_normal((1, 2, 3, 8)).astype(np.float32)
    pk = RNG.standard_normal((1, 2, 5, 8)).astype(np.float32)
    pv = RNG.standard_normal((1, 2, 5, 8)).astype(np.float32)
    import onnx
    from onnx import helper

    node = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "present_k", "present_v"],
                            is_causal=1)
    ins = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, a.shape)
           for n, a in (("q", q), ("k", k), ("v", v), ("pk", pk), ("pv", pv))]
    outs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("y", "present_k", "present_v")]
    model = helper.make_model(helper.make_graph([node], "attn", ins, outs),
                              opset_imports=[helper.make_opsetid("", 23)])
    _check(model, {"q": q, "k": k, "v": v, "pk": pk, "pv": pv}, rtol=1e-4, atol=1e-5)
