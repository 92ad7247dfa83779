"""The bundled transformers BitNet exports, lowered op by op (no fusion passes), against torch's logits.

This exercises every standard-op lowering the real exports use (embedding Gather on int64 ids, RMSNorm
spelled as Pow/ReduceMean/Sqrt/Reciprocal, the activation quantiser's Abs/ReduceMax/Clip/Round,
rotary Slice/Neg/Concat, SDPA's IsNaN/Where guard, Softmax, and the packed model's constant
BitwiseAnd/BitShift/Cast unpacking, which must fold). The oracle is torch's forward of the same
model, stored by ``models/make_models.py`` in ``models/<name>.npz``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from bitnet_coreml.executor import ReferenceExecutor
from bitnet_coreml.frontend import load
from bitnet_coreml.lower.program import BuildOptions, build_program, convert_program

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.mark.parametrize("name", [
    "bitnet_packed",
    "bitnet_bigvocab",
    pytest.param("bitnet_offline", marks=pytest.mark.slow),
    pytest.param("bitnet_online", marks=pytest.mark.slow),
    pytest.param("bitnet_external", marks=pytest.mark.slow),
])
def test_raw_export_matches_torch(name: str) -> None:
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not generated (make models)")
    oracle = np.load(MODELS / f"{name}.npz")
    built = build_program(load(path), BuildOptions(precision="fp32", ios=17))
    ops = {op.op_type for op in built.program.functions["main"].operations}
    assert "round" not in ops  # Round lowers to the exact half-even construction
    with contextlib.redirect_stderr(io.StringIO()):
        mlmodel = convert_program(built, precision="fp32")
    out = ReferenceExecutor(mlmodel).predict({built.input_names["input_ids"]: oracle["input_ids"].astype(np.int32)})
    logits = out[built.output_names["logits"]]
    ref = oracle["logits"]
    assert logits.shape == ref.shape
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
    assert np.array_equal(logits.argmax(-1), ref.argmax(-1))
