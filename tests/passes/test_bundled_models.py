"""The passes on the bundled real exports: every BitLinear found, ternary parameters exact, ORT parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bitnet_coreml.frontend import load
from bitnet_coreml.passes import run_default_passes
from bitnet_coreml.passes.ort import ort_session
from bitnet_coreml.passes.summary import summarize

MODELS = Path(__file__).resolve().parents[2] / "models"
MANIFEST = json.loads((MODELS / "MANIFEST.json").read_text())["onnx"]


def _expected_ternary(spec: dict[str, int]) -> int:
    """Hand count from the config: q, k, v, o, gate, up, down per layer (no biases)."""
    h, i = spec["hidden"], spec["intermediate"]
    kv = spec["kv_heads"] * (h // spec["heads"])
    return spec["layers"] * (h * h + 2 * h * kv + h * h + 2 * h * i + i * h)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_bitlinear_found_and_counted_exactly(name: str) -> None:
    entry = MANIFEST[name]
    spec = entry["spec"]
    model = load(MODELS / entry["file"])
    run_default_passes(model)
    s = summarize(model)
    assert len(s.bitlinear) == 7 * spec["layers"]
    assert s.params_ternary == _expected_ternary(spec)
    assert not s.ternary_unfused
    # embedding (+ untied lm_head) and norms stay float
    assert s.params_other >= spec["vocab"] * spec["hidden"]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_ort_after_passes_matches_ort_before(name: str) -> None:
    entry = MANIFEST[name]
    path = MODELS / entry["file"]
    data = np.load(MODELS / (path.stem + ".npz"))
    feeds = {"input_ids": data["input_ids"]}
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    model = load(path)
    run_default_passes(model)
    after = ort_session(model).run(None, feeds)[0]
    a, b = before.reshape(-1, before.shape[-1]), after.reshape(-1, after.shape[-1])
    cos = float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))
    agree = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    assert cos >= 0.9999, cos
    assert agree >= 0.99, agree
