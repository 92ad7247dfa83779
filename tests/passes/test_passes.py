"""The default passes on BitNet-shaped graphs: fused counts, and ORT before == ORT after."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from bitnet_coreml.passes import DOMAIN, detect_ternary, run_default_passes
from tests.passes.graphs import G, mlp_block, ternary


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _passed(proto: onnx.ModelProto) -> tuple[ir.Model, onnx.ModelProto]:
    model = ir.serde.deserialize_model(proto)
    run_default_passes(model)
    return model, ir.to_proto(model)


def _ops(model: ir.Model) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph:
        key = f"{n.domain}::{n.op_type}" if n.domain else n.op_type
        out[key] = out.get(key, 0) + 1
    return out


@pytest.mark.parametrize(("form", "clamp"), [("offline", "clip"), ("online", "clip"), ("packed", "clip"),
                                             ("offline", "minmax"), ("packed", "maxmin")])
def test_mlp_block_fuses_and_matches_ort(form: str, clamp: str) -> None:
    proto = mlp_block(form=form, clamp=clamp)
    x = np.random.default_rng(1).standard_normal((1, 8, 32)).astype(np.float32)
    before = _run(proto, {"x": x})[0]
    model, after_proto = _passed(proto)
    ops = _ops(model)
    assert ops.get(f"{DOMAIN}::BitLinear") == 3
    assert ops.get(f"{DOMAIN}::RMSNorm") == 2
    assert ops.get(f"{DOMAIN}::Relu2") == 1
    assert "MatMul" not in ops and "Round" not in ops
    onnx.checker.check_model(after_proto)
    after = _run(after_proto, {"x": x})[0]
    cos = float(np.dot(before.ravel(), after.ravel()) / (np.linalg.norm(before) * np.linalg.norm(after)))
    assert cos >= 0.9999
    assert np.allclose(before, after, atol=1e-3 * np.abs(before).max())


def test_bitlinear_alpha_folds_scale_conventions() -> None:
    rng = np.random.default_rng(3)
    codes = ternary(rng, 8, 16)
    for form, ws, expect in [("offline", 0.25, 0.25), ("packed", 40.0, 1 / 40.0)]:
        g = G()
        y = g.offline_linear("x", codes, ws) if form == "offline" else g.packed_linear("x", codes, ws)
        proto = g.model([("x", onnx.TensorProto.FLOAT, [1, 4, 16])], [(y, "y", onnx.TensorProto.FLOAT, [1, 4, 8])])
        model, _ = _passed(proto)
        (bl,) = [n for n in model.graph if n.op_type == "BitLinear"]
        np.testing.assert_array_equal(bl.inputs[1].const_value.numpy(), codes)
        assert bl.inputs[1].const_value.numpy().dtype == np.int8
        assert float(bl.inputs[2].const_value.numpy()) == pytest.approx(expect, rel=1e-6)
        assert bl.attributes["convention"].as_string() == ("multiply" if form == "offline" else "divide")


def test_ternary_detection_per_tensor_per_channel_and_rejects_float() -> None:
    rng = np.random.default_rng(0)
    codes = ternary(rng, 6, 20).astype(np.float32)
    t = detect_ternary(codes.T * np.float32(0.3), out_axis=1)
    assert t is not None and not t.per_channel and float(t.scale) == pytest.approx(0.3)
    per = codes * rng.uniform(0.1, 1.0, (6, 1)).astype(np.float32)
    t2 = detect_ternary(per, out_axis=0)
    assert t2 is not None and t2.per_channel
    np.testing.assert_allclose(t2.codes * t2.scale[:, None], per, rtol=1e-6)
    # fp rounding noise of one ulp is still ternary
    noisy = codes * np.float32(0.3)
    noisy[0, 0] = np.nextafter(noisy[0, 0], np.float32(10)) if noisy[0, 0] else noisy[0, 0]
    assert detect_ternary(noisy, out_axis=0) is not None
    assert detect_ternary(rng.standard_normal((6, 20)).astype(np.float32), out_axis=0) is None
    assert detect_ternary(np.zeros((6, 20), np.float32), out_axis=0) is None


def test_ternary_matmul_without_act_quant_is_not_fused() -> None:
    rng = np.random.default_rng(0)
    g = G()
    y = g.op("MatMul", "x", g.const(ternary(rng, 8, 16).T.astype(np.float32).copy()))
    proto = g.model([("x", onnx.TensorProto.FLOAT, [1, 4, 16])], [(y, "y", onnx.TensorProto.FLOAT, [1, 4, 8])])
    model, _ = _passed(proto)
    assert "BitLinear" not in {n.op_type for n in model.graph}


@pytest.mark.parametrize("out_axis", [0, 1])
def test_per_channel_ternary_in_either_layout(out_axis: int) -> None:
    rng = np.random.default_rng(5)
    codes = ternary(rng, 300, 64)  # [N, K]
    mags = rng.uniform(0.01, 1.0, 300).astype(np.float32)
    w = codes * mags[:, None]
    t = detect_ternary(w if out_axis == 0 else w.T.copy(), out_axis=out_axis)
    assert t is not None and t.per_channel
    np.testing.assert_array_equal(t.codes, codes)
    live = np.abs(codes).sum(1) > 0
    np.testing.assert_allclose(t.scale[live], mags[live], rtol=1e-6)
