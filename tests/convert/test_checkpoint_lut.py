"""BitLinear weights from a packed checkpoint go to Core ML's 2-bit indices without an int8 copy, same bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bitnet_coreml.frontend import load
from bitnet_coreml.lower.program import BuildOptions, assign_node_names, build_program
from bitnet_coreml.passes import run_default_passes

FIXTURE = Path(__file__).resolve().parents[2] / "models" / "hf" / "bitnet-tiny-packed"


def _spec_pack(codes: np.ndarray) -> np.ndarray:
    """Core ML's constexpr_lut_to_dense layout, from its spec: element 4j+i in bits 2i..2i+1 of byte j."""
    idx = (codes.astype(np.int16).reshape(-1) + 1).astype(np.uint8)
    idx = np.concatenate([idx, np.zeros((-idx.size) % 4, np.uint8)]).reshape(-1, 4)
    return (idx[:, 0] | idx[:, 1] << 2 | idx[:, 2] << 4 | idx[:, 3] << 6).astype(np.uint8)


@pytest.mark.parametrize("ios", [16, 18])
def test_packed_checkpoint_weights_match_codes(ios: int) -> None:
    if not FIXTURE.is_dir():
        pytest.skip(f"{FIXTURE} not present (made by models/make_hf_fixtures.py)")
    model = load(FIXTURE, seq_len=4)
    run_default_passes(model)
    assign_node_names(model.graph)
    bitlinear = [n for n in model.graph if n.op_type == "BitLinear"]
    assert bitlinear and all(hasattr(n.inputs[1].const_value, "lut2_bytes") for n in bitlinear)
    # the oracle: the int8 codes the checkpoint tensor decodes (transformers' unpacking), packed from the spec
    codes = [n.inputs[1].const_value.codes() for n in bitlinear]
    built = build_program(model, BuildOptions(precision="fp16", ios=ios, native_fp16=True))
    ops = [op for op in built.program.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    assert len(ops) == len(bitlinear)
    for op, c in zip(ops, codes, strict=True):
        got = np.asarray(op.indices.val)
        if ios >= 18:
            assert got.shape == c.shape
            np.testing.assert_array_equal(got.astype(np.int16) - 1, c)
        else:
            np.testing.assert_array_equal(got, _spec_pack(c))
            np.testing.assert_array_equal(np.asarray(op.shape.val), c.shape)


def test_calibration_run_feeds_packed_weights_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_ort feeds packed checkpoint weights as bytes (unpacked in the graph) and gates them: same outputs."""
    if not FIXTURE.is_dir():
        pytest.skip(f"{FIXTURE} not present (made by models/make_hf_fixtures.py)")
    import onnx_ir as ir
    import onnxruntime as ort

    import bitnet_coreml.lower.fp16 as fp16

    monkeypatch.setattr(fp16, "_FEED_BYTES", 16)  # every weight of the tiny fixture counts as large
    model = load(FIXTURE, seq_len=8)
    run_default_passes(model)
    feeds = fp16.random_calibration(model)
    big = {v for v in model.graph.initializers.values() if v.const_value is not None and v.const_value.nbytes >= 16}
    gated, packed = fp16._gate_weights(model.graph, big, 18)
    n_bitlinear = sum(n.op_type == "BitLinear" for n in model.graph)
    assert len(gated) == len(packed) == n_bitlinear > 0
    for node, w, added in gated:  # undo, as run_ort does
        node.replace_input_with(1, w)
        for n in reversed(added):
            model.graph.remove(n, safe=True)
    got = fp16.run_ort(model, feeds, every_value=True)
    # oracle: ONNX Runtime on the plain serialised model (int8 codes as initializers, defaults)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    for name, ref in zip(names, sess.run(names, feeds), strict=True):
        np.testing.assert_array_equal(got[name], ref)
    assert len(got) > len(names)  # every float value came back too
