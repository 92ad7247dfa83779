"""The importer: memory-mapped embedded weights equal what onnx.load reads; external data works."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper as nh

from bitnet_coreml.frontend import load
from bitnet_coreml.passes.ort import ort_session
from tests.passes.graphs import mlp_block


def test_embedded_weights_are_mapped_and_identical(tmp_path: Path) -> None:
    proto = mlp_block(form="online", d=64, hidden=128)
    p = tmp_path / "m.onnx"
    onnx.save(proto, p)
    model = load(p)
    ref = {t.name: nh.to_array(t) for t in onnx.load(p).graph.initializer}
    kinds = set()
    for name, v in model.graph.initializers.items():
        assert v.const_value is not None
        kinds.add(type(v.const_value).__name__)
        np.testing.assert_array_equal(v.const_value.numpy(), ref[name])
    assert "ExternalTensor" in kinds  # large weights are memory-mapped, not copied


def test_external_data_model_runs_in_ort(tmp_path: Path) -> None:
    proto = mlp_block(form="offline", d=64, hidden=128)
    p = tmp_path / "ext.onnx"
    onnx.save(proto, p, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data", size_threshold=1024)
    model = load(p)
    x = np.random.default_rng(0).standard_normal((1, 8, 64)).astype(np.float32)
    import onnxruntime as ort

    want = ort.InferenceSession(str(p)).run(None, {"x": x})[0]
    got = ort_session(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


def test_large_model_path_leaves_no_temp_files(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Above the inline limit the session is built from a temp copy; the copy must not outlive it."""
    import tempfile

    import bitnet_coreml.passes.ort as ort_mod

    proto = mlp_block(form="offline", d=64, hidden=128)
    p = tmp_path / "m.onnx"
    onnx.save(proto, p)
    model = load(p)
    monkeypatch.setattr(ort_mod, "_INLINE_LIMIT", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    x = np.random.default_rng(0).standard_normal((1, 8, 64)).astype(np.float32)
    import onnxruntime as ort

    want = ort.InferenceSession(str(p)).run(None, {"x": x})[0]
    got = ort_mod.ort_session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert list((tmp_path / "tmp").iterdir()) == []
