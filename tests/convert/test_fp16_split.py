"""fp16 safety (exact power-of-two rescaling, fp32 fallback) and the 16384 split, against ORT/numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
import onnxruntime as ort

from bitnet_coreml.lower.fp16 import FP16_MAX, make_fp16_safe, random_calibration
from bitnet_coreml.lower.program import BuildOptions, assign_node_names, build_program, convert_program
from bitnet_coreml.lower.split import split_large_dims
from bitnet_coreml.passes.ort import ort_session
from tests.convert.graphs import mlp_model, np_mlp
from tests.convert.mil_eval import evaluate


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return ort_session(model).run(None, {"x": x})[0]


def test_relu2_overflow_is_rescaled_exactly() -> None:
    proto, p = mlp_model(alpha=300.0)
    model = ir.serde.deserialize_model(proto)
    assign_node_names(model.graph)
    x = np.random.default_rng(7).standard_normal((1, 8, 32)).astype(np.float32)
    before = _run(model, x)
    plan = make_fp16_safe(model, random_calibration(model))
    assert len(plan.rescaled) == 1 and not plan.fp32_nodes
    # the rewritten graph computes the same function (ORT, fp32)
    after = _run(model, x)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    # and in fp16 the unrescaled program overflows while the rescaled one matches numpy
    want = np_mlp(x, p)
    fresh = ir.serde.deserialize_model(proto)
    naive = evaluate(convert_program(build_program(fresh, BuildOptions()), "fp16")._mil_program, {"x": x})
    assert not np.isfinite(next(iter(naive.values()))).all()
    built = build_program(model, BuildOptions(rmsnorm_input_scale=tuple(plan.rmsnorm_input_scale.items())))
    got = next(iter(evaluate(convert_program(built, "fp16")._mil_program, {"x": x}).values()))
    assert np.isfinite(got).all()
    cos = float((got.ravel() @ want.ravel()) / np.linalg.norm(got) / np.linalg.norm(want))
    assert cos >= 0.999


def test_small_values_untouched() -> None:
    proto, _ = mlp_model(alpha=0.5)
    model = ir.serde.deserialize_model(proto)
    plan = make_fp16_safe(model, random_calibration(model))
    assert plan.rescaled == [] and plan.fp32_nodes == set() and plan.max_abs < FP16_MAX / 8


def test_overflow_outside_the_pattern_stays_fp32() -> None:
    # x * 1e6 -> Add: no RMSNorm to absorb a factor, so the producer and its consumer stay fp32
    g = oh.make_graph(
        [oh.make_node("Mul", ["x", "big"], ["h"], name="scale_up"), oh.make_node("Mul", ["h", "small"], ["y"], name="scale_down")],
        "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [nh.from_array(np.float32(1e6), "big"), nh.from_array(np.float32(1e-6), "small")])
    model = ir.serde.deserialize_model(oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)], ir_version=10))
    plan = make_fp16_safe(model, {"x": np.ones((1, 4), np.float32)})
    assert plan.fp32_nodes == {"scale_up", "scale_down"}
    built = build_program(model, BuildOptions(fp32_nodes=frozenset(plan.fp32_nodes)))
    got = next(iter(evaluate(convert_program(built, "fp16")._mil_program, {"x": np.full((1, 4), 2.0, np.float32)}).values()))
    np.testing.assert_allclose(got, 2.0, rtol=1e-3)


def _lm(vocab: int, d: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    e = rng.standard_normal((vocab, d)).astype(np.float32)
    w = rng.standard_normal((d, vocab)).astype(np.float32)
    g = oh.make_graph([oh.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
                       oh.make_node("MatMul", ["h", "W"], ["logits"], name="lm_head")], "g",
                      [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 9])],
                      [oh.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 9, vocab])],
                      [nh.from_array(e, "E"), nh.from_array(w, "W")])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)


def test_split_is_exact_in_ort_and_bounds_every_dim() -> None:
    proto = _lm(50, 4)
    ids = np.array([[0, 15, 16, 17, 31, 32, 33, 48, 49]], np.int64)
    want = ort.InferenceSession(proto.SerializeToString()).run(None, {"ids": ids})[0]
    model = ir.serde.deserialize_model(proto)
    notes = split_large_dims(model, limit=16)
    assert len(notes) == 2
    for v in model.graph.initializers.values():
        assert max(v.const_value.shape, default=1) <= 16
    got = ort_session(model).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, want)


def test_split_default_limit_leaves_small_models_alone() -> None:
    model = ir.serde.deserialize_model(_lm(50, 4))
    assert split_large_dims(model) == []
    assert [n.op_type for n in model.graph] == ["Gather", "MatMul"]


def _tied_lm(vocab: int, d: int, seq: int = 6) -> onnx.ModelProto:
    """Hugging Face shape: Gather(E) ... Gemm(x2, E, transB=1) with the embedding tied to the lm_head."""
    e = np.random.default_rng(1).standard_normal((vocab, d)).astype(np.float32)
    g = oh.make_graph([oh.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
                       oh.make_node("Reshape", ["h", "shape2"], ["h2"], name="flat"),
                       oh.make_node("Gemm", ["h2", "E"], ["logits"], name="lm_head", transB=1)], "g",
                      [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, seq])],
                      [oh.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [seq, vocab])],
                      [nh.from_array(e, "E"), nh.from_array(np.array([seq, d], np.int64), "shape2")])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)


def test_tied_embedding_split_shares_row_chunks() -> None:
    proto = _tied_lm(40, 8)
    ids = np.array([[0, 15, 16, 31, 32, 39]], np.int64)
    want = ort.InferenceSession(proto.SerializeToString()).run(None, {"ids": ids})[0]
    model = ir.serde.deserialize_model(proto)
    notes = split_large_dims(model, limit=16)
    assert len(notes) == 2 and any("Gemm" in n for n in notes)
    tables = [v for v in model.graph.initializers.values() if len(v.const_value.shape) == 2]
    assert sorted(v.const_value.shape[0] for v in tables) == [12, 14, 14]  # 3 chunks: one copy of E
    got = ort_session(model).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, want)


def test_tied_embedding_package_stores_table_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bitnet_coreml.convert import ConvertOptions, convert

    src = tmp_path / "tied.onnx"
    onnx.save(_tied_lm(3000, 64), src)
    r = convert(src, tmp_path / "tied.mlpackage", ConvertOptions(check=False, split_limit=1024, verify=True))
    assert len(r.split) == 2
    table_fp16 = 3000 * 64 * 2
    assert table_fp16 <= r.weight_bytes <= 1.02 * table_fp16 + 4096
    assert r.parity is not None and r.parity["passed"]


def test_split_follows_the_checks_plan() -> None:
    """The converter cuts exactly the tables the check lists, into the chunks the check lists (one rule)."""
    from bitnet_coreml.check.split import nodes_needing_split

    model = ir.serde.deserialize_model(_lm(50, 4))
    plan = nodes_needing_split(model, 16)
    assert {(s.op_type, s.chunks) for s in plan} == {("Gather", (13, 13, 13, 11)), ("MatMul", (13, 13, 13, 11))}
    split_large_dims(model, limit=16)
    parts = {n.name: n for n in model.graph}
    for s in plan:
        axis_sizes = []
        for i in range(len(s.chunks)):
            part = parts[f"{s.node}.part{i}"]
            table = part.inputs[0 if s.op_type == "Gather" else 1]
            axis_sizes.append(table.const_value.shape[s.axis])
        assert tuple(axis_sizes) == s.chunks


def test_measured_ranges_match_every_value_in_ort() -> None:
    """measure() reduces in the graph; the oracle is ORT returning every node output, reduced by numpy."""
    from bitnet_coreml.lower.fp16 import measure

    proto, _ = mlp_model(seed=4, alpha=300.0)
    x = np.random.default_rng(1).standard_normal((1, 8, 32)).astype(np.float32)
    names = [o for n in proto.graph.node for o in n.output if o]
    full = onnx.ModelProto()
    full.CopyFrom(proto)
    full.graph.ClearField("output")
    full.graph.output.extend([onnx.ValueInfoProto(name=n) for n in names])
    ref = dict(zip(names, ort.InferenceSession(full.SerializeToString()).run(names, {"x": x}), strict=True))
    got = measure(ir.serde.deserialize_model(proto), {"x": x})
    assert set(got) == set(names) and len(names) >= 6
    for n in names:
        assert got[n] == (float(ref[n].max()), float(ref[n].min())), n
