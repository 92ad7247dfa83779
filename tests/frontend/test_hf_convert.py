"""End to end: checkpoint folder -> ``convert`` -> .mlpackage -> reference executor, vs transformers.

Oracles: transformers' logits stored with the fixtures (``models/hf/*/logits.npz``, weights loaded
as float32) and, in the slow test, the package converted from transformers' own ONNX export of the
same checkpoint (the ONNX path), which must agree with the checkpoint path's package.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.frontend.test_hf_fixtures import argmax_agreement, cosine

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "models" / "hf"
EXPORT_PY = ROOT / ".venv-export" / "bin" / "python"


def _fixture(name: str) -> tuple[Path, np.ndarray, np.ndarray]:
    folder = FIXTURES / name
    if not (folder / "logits.npz").is_file():
        pytest.skip(f"{folder} not present (made by models/make_hf_fixtures.py)")
    z = np.load(folder / "logits.npz")
    return folder, z["input_ids"], z["logits"]


def _package_logits(source: Path, out: Path, ids: np.ndarray, precision: str) -> np.ndarray:
    from bitnet_coreml.convert import ConvertOptions, convert
    from bitnet_coreml.executor import ReferenceExecutor

    convert(source, out, ConvertOptions(precision=precision, seq_len=ids.shape[1], check=False))
    got = ReferenceExecutor(out).predict({"input_ids": ids.astype(np.int32)})
    return np.asarray(got["logits"], dtype=np.float32)


def _check(got: np.ndarray, ref: np.ndarray, cos_min: float) -> None:
    assert got.shape == ref.shape
    c, a = cosine(got, ref), argmax_agreement(got, ref)
    assert c >= cos_min and a >= 0.98, (c, a)


def test_fp16_package_matches_transformers(tmp_path: Path) -> None:
    folder, ids, tf = _fixture("bitnet-tiny-packed")
    _check(_package_logits(folder, tmp_path / "m.mlpackage", ids, "fp16"), tf, 0.999)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bitnet-tiny-autobitlinear", "bitnet-tiny-autobitlinear-packed"])
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_packages_match_transformers(tmp_path: Path, name: str, precision: str) -> None:
    folder, ids, tf = _fixture(name)
    _check(_package_logits(folder, tmp_path / "m.mlpackage", ids, precision), tf,
           0.999 if precision == "fp16" else 0.99999)


@pytest.mark.slow
@pytest.mark.skipif(not EXPORT_PY.exists(), reason="needs the export venv (.venv-export with torch + transformers)")
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_onnx_path_and_checkpoint_path_agree(tmp_path: Path, precision: str) -> None:
    folder, ids, tf = _fixture("bitnet-tiny-packed")
    onnx_path = tmp_path / "export.onnx"
    code = ("import sys, numpy as np, torch\nsys.path.insert(0, sys.argv[4])\n"
            "from transformers import BitNetForCausalLM\nfrom bitnet_export import export_onnx\n"
            "m = BitNetForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n"
            "ids = np.array([[int(x) for x in sys.argv[3].split(',')]], dtype=np.int64)\n"
            "export_onnx(m, ids, sys.argv[2])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([str(EXPORT_PY), "-c", code, str(folder), str(onnx_path), ",".join(map(str, ids[0])),
                    str(ROOT / "models")], check=True, env=env, capture_output=True, timeout=900)
    via_onnx = _package_logits(onnx_path, tmp_path / "onnx.mlpackage", ids, precision)
    via_ckpt = _package_logits(folder, tmp_path / "ckpt.mlpackage", ids, precision)
    _check(via_ckpt, via_onnx, 0.9999)
    _check(via_ckpt, tf, 0.999)
