"""fp16 calibration feeds large initializers to ONNX Runtime as graph inputs; each must keep its type.

Regression for issue 12: the default ``torch.onnx.export(..., dynamo=True)`` graph (``optimize=True``)
arrives fully typed, so calibration skipped shape inference, and the fused BitLinear codes (created by
the passes without a declared type) became an untyped graph input that ORT refused ("Model input
(node_linear.codes) does not have type information"). Here the same situation is built in code:
weights large enough to be fed (>= 64 KiB of int8 codes) and every intermediate value typed.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from bitnet_coreml.lower.fp16 import _FEED_BYTES, make_fp16_safe, random_calibration, run_ort
from bitnet_coreml.passes import run_default_passes
from bitnet_coreml.passes.ort import ort_session
from tests.passes.graphs import mlp_block

D = HIDDEN = 256  # 256 x 256 int8 codes = 64 KiB: fed to ORT as an input, not inlined


def _typed_fused_model() -> tuple[ir.Model, onnx.ModelProto]:
    proto = onnx.shape_inference.infer_shapes(mlp_block(seed=3, d=D, hidden=HIDDEN), strict_mode=True)
    model = ir.serde.deserialize_model(proto)
    run_default_passes(model)
    assert all(o.dtype is not None for n in model.graph for o in n.outputs), "every value must be typed"
    return model, proto


def test_fused_weights_declare_their_type() -> None:
    model, _ = _typed_fused_model()
    fused = [n for n in model.graph if n.op_type == "BitLinear"]
    assert len(fused) == 3
    for n in fused:
        for v in n.inputs[1:]:
            assert v is not None and v.const_value is not None
            assert v.dtype == v.const_value.dtype and v.shape == v.const_value.shape, v.name


def test_calibration_runs_the_fully_typed_graph_and_matches_ort_on_the_source() -> None:
    model, proto = _typed_fused_model()
    assert max(v.const_value.nbytes for v in model.graph.initializers.values()) >= _FEED_BYTES
    feeds = random_calibration(model)
    want = ort_session(ir.serde.deserialize_model(proto)).run(None, feeds)[0]
    got = next(iter(run_ort(model, feeds).values()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    # and the whole fp16 analysis (every value measured) runs on it
    plan = make_fp16_safe(model, feeds)
    assert plan.max_abs > 0


def test_untyped_initializer_is_fed_with_its_tensors_type() -> None:
    """Whoever made the value: an initializer moved to the inputs takes dtype and shape from its tensor."""
    model, proto = _typed_fused_model()
    for n in model.graph:
        if n.op_type == "BitLinear":
            w = n.inputs[1]
            assert w is not None
            w.type, w.shape = None, None
    feeds = random_calibration(model)
    want = ort_session(ir.serde.deserialize_model(proto)).run(None, feeds)[0]
    got = next(iter(run_ort(model, feeds).values()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
