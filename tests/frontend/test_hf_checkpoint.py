"""Checkpoint import: ONNX Runtime on the imported graph vs independent oracles.

Oracles: the numpy forward of ``test_hf_fixtures`` (written from transformers' modeling_bitnet.py,
on the weights before packing), transformers' own logits stored with the committed fixtures
(``models/hf/*/logits.npz``; where an activation rounding flips against torch, the reference executor on
the converted fp32 package at those positions: ``tests/support/flips.py``) and, in a slow test, transformers run live from ``.venv-export``.
"""

from __future__ import annotations

import collections
import os
import subprocess
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from safetensors import safe_open

from bitnet_coreml.frontend import hf_safetensors
from bitnet_coreml.frontend.hf_checkpoint import load_checkpoint
from bitnet_coreml.frontend.hf_tensors import CheckpointTensor, TernaryCodes
from bitnet_coreml.passes.fused import DOMAIN
from tests.frontend.test_hf_fixtures import (
    VARIANTS,
    Tiny,
    argmax_agreement,
    cosine,
    make_checkpoint,
    reference_logits,
)
from tests.support.flips import close_except_flips
from tests.support.packages import PackageCache

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "models" / "hf"
EXPORT_PY = ROOT / ".venv-export" / "bin" / "python"
# ops the converter lowers (the brief's list) plus the fused ones
ALLOWED_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Round", "Clip", "Relu",
               "Sigmoid", "Tanh", "Erf", "Softmax", "MatMul", "Gemm", "Reshape", "Transpose", "Slice", "Concat",
               "Unsqueeze", "Squeeze", "Expand", "Gather", "Where", "Cast", "Less", "Greater", "Equal",
               "ReduceMean", "ReduceMax", "ReduceSum", "LayerNormalization"}
FUSED = {"BitLinear", "RMSNorm", "Relu2"}


def run_ort(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids.astype(np.int64)})[0]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Tiny, dict[str, np.ndarray]]]:
    base = tmp_path_factory.mktemp("hf")
    return {n: (base / n, t, make_checkpoint(base / n, t, seed=i)) for i, (n, t) in enumerate(VARIANTS.items())}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_numpy_reference(written: dict, name: str) -> None:  # type: ignore[type-arg]
    folder, t, lw = written[name]
    s = 12
    ids = np.random.default_rng(7).integers(0, t.vocab, (1, s))
    got = run_ort(load_checkpoint(folder, seq_len=s), ids)
    assert got.shape == (1, s, t.vocab) and got.dtype == np.float32
    ref = reference_logits(t, lw, ids[0])
    assert cosine(got[0], ref) >= 0.9999
    assert argmax_agreement(got[0], ref) >= 0.98
    np.testing.assert_allclose(got[0], ref, rtol=0, atol=1e-3 * float(np.abs(ref).max()))


@pytest.mark.parametrize("seq_len", [1, 5, 33])
def test_sequence_lengths(written: dict, seq_len: int) -> None:  # type: ignore[type-arg]
    folder, t, lw = written["bitlinear-packed-rmsnorm-mqa"]
    ids = np.arange(seq_len, dtype=np.int64)[None] % t.vocab
    got = run_ort(load_checkpoint(folder, seq_len=seq_len), ids)
    ref = reference_logits(t, lw, ids[0])
    assert cosine(got[0], ref) >= 0.9999 and argmax_agreement(got[0], ref) >= 0.98


@pytest.mark.parametrize("fixture", ["bitnet-tiny-packed", "bitnet-tiny-autobitlinear", "bitnet-tiny-autobitlinear-packed"])
def test_logits_match_transformers_fixture(fixture: str, converted: PackageCache, record_property: Any) -> None:
    """Within 1e-3 of the largest |logit| of torch at every position, or, where an activation rounding
    flips against torch (``tests/support/flips.py``), of the reference executor on the fp32 package."""
    folder = FIXTURES / fixture
    if not (folder / "logits.npz").is_file():
        pytest.skip(f"{folder} not present (made by models/make_hf_fixtures.py)")
    z = np.load(folder / "logits.npz")
    ids = z["input_ids"]
    got = run_ort(load_checkpoint(folder, seq_len=ids.shape[1]), ids)
    tf = z["logits"]  # transformers, weights loaded as float32
    assert cosine(got, tf) >= 0.999 and argmax_agreement(got, tf) >= 0.98

    def executor(rows: np.ndarray) -> np.ndarray:
        from bitnet_coreml.executor import ReferenceExecutor

        pkg = converted.get(folder, seq_len=ids.shape[1], precision="fp32", check=False)
        return ReferenceExecutor(pkg).predict({"input_ids": ids.astype(np.int32)})["logits"][0][rows]

    flagged = close_except_flips(got[0], tf[0], 1e-3 * float(np.abs(tf).max()), executor,
                                 max_flagged=ids.shape[1] // 4)
    record_property("flagged_positions", flagged)


def test_graph_contract(written: dict) -> None:  # type: ignore[type-arg]
    folder, t, lw = written["bitlinear-packed-bf16-sharded-untied"]
    m = load_checkpoint(folder, seq_len=8)
    g = m.graph
    assert [v.name for v in g.inputs] == ["input_ids"] and g.inputs[0].dtype == ir.DataType.INT64
    assert list(g.inputs[0].shape) == [1, 8]
    assert [v.name for v in g.outputs] == ["logits"] and list(g.outputs[0].shape) == [1, 8, t.vocab]
    assert g.opset_imports[""] == 18 and g.opset_imports[DOMAIN] == 1
    ops = collections.Counter((n.domain, n.op_type) for n in g)
    assert {o for d, o in ops if d == ""} <= ALLOWED_OPS
    assert {o for d, o in ops if d == DOMAIN} == FUSED
    assert ops[(DOMAIN, "BitLinear")] == 7 * t.layers
    assert ops[(DOMAIN, "RMSNorm")] == 4 * t.layers + 1
    assert {k[1] for k in m.functions} == FUSED  # ORT-runnable definitions travel with the model
    for n in g:
        if n.op_type == "BitLinear":
            w, alpha = n.inputs[1], n.inputs[2]
            assert isinstance(w.const_value, TernaryCodes) and w.dtype == ir.DataType.INT8
            prefix = n.name
            np.testing.assert_array_equal(w.const_value.numpy(), lw[f"{prefix}.weight"].astype(np.int8))
            # packed BitLinear divides by weight_scale: Alpha is its reciprocal
            assert float(alpha.const_value.numpy()) == pytest.approx(1.0 / float(lw[f"{prefix}.weight_scale"]), rel=1e-6)
            assert n.attributes["convention"].as_string() == "divide"
            for o in n.outputs:
                assert o.shape is not None and o.dtype == ir.DataType.FLOAT
    assert m.metadata_props["bitnet_coreml.source"] == "hf_checkpoint"


def test_multiply_convention_alpha(written: dict) -> None:  # type: ignore[type-arg]
    folder, _, lw = written["autobitlinear-offline-dense-f16"]
    m = load_checkpoint(folder, seq_len=4)
    for n in m.graph:
        if n.op_type == "BitLinear":
            assert n.attributes["convention"].as_string() == "multiply"
            assert float(n.inputs[2].const_value.numpy()) == pytest.approx(float(lw[f"{n.name}.weight_scale"]), rel=1e-6)


def test_import_reads_no_weight_data(written: dict, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[type-arg]
    folder, t, _ = written["bitlinear-packed-bf16-sharded-untied"]
    reads: collections.Counter[str] = collections.Counter()
    orig = hf_safetensors.CheckpointTensors.read

    def counting(self: hf_safetensors.CheckpointTensors, name: str) -> np.ndarray:
        reads[name] += 1
        return orig(self, name)

    monkeypatch.setattr(hf_safetensors.CheckpointTensors, "read", counting)
    m = load_checkpoint(folder, seq_len=8)
    heavy = [n for n in reads if n.endswith("proj.weight") or "embed" in n or n.startswith("lm_head")]
    assert heavy == [], heavy  # only norms and scales are read at import
    # materialising one layer's codes reads exactly that layer's packed tensor
    w = next(n for n in m.graph if n.op_type == "BitLinear").inputs[1].const_value
    w.numpy()
    assert [n for n in reads if n.endswith("proj.weight")] == [w.source_name]


def test_codes_expose_packed_source_and_lut_indices(written: dict) -> None:  # type: ignore[type-arg]
    folder, _, lw = written["bitlinear-packed-f32"]
    m = load_checkpoint(folder, seq_len=4)
    codes = [n.inputs[1].const_value for n in m.graph if n.op_type == "BitLinear"]
    with safe_open(str(folder / "model.safetensors"), "numpy") as f:
        for c in codes:
            expected = lw[c.source_name].astype(np.int8)
            np.testing.assert_array_equal(c.packed_source(), f.get_tensor(c.source_name))
            idx = c.lut_indices()
            assert idx.dtype == np.uint8 and idx.shape == expected.shape
            np.testing.assert_array_equal(np.array([-1, 0, 1, 0], np.int8)[idx], expected)


@pytest.mark.parametrize("name", ["bitlinear-packed-f32", "autobitlinear-offline-dense-f16", "autobitlinear-online-bf16"])
def test_lut2_bytes_match_the_converters_packer(written: dict, name: str) -> None:  # type: ignore[type-arg]
    from bitnet_coreml.lower.bitnet import pack_ternary_2bit  # the converter's own packer, from int8 codes

    folder, _, lw = written[name]
    m = load_checkpoint(folder, seq_len=4)
    for n in m.graph:
        if n.op_type == "BitLinear":
            c = n.inputs[1].const_value
            # the writer's codes where it has them; online codes come from absmean (checked vs transformers)
            codes = c.numpy() if c.kind == "online" else lw[c.source_name].astype(np.int8)
            np.testing.assert_array_equal(c.lut2_bytes(), pack_ternary_2bit(codes))


def test_embedding_converts_lazily_to_fp16(written: dict) -> None:  # type: ignore[type-arg]
    folder, _, lw = written["bitlinear-packed-bf16-sharded-untied"]
    m = load_checkpoint(folder, seq_len=4)
    emb = m.graph.initializers["model.embed_tokens.weight"].const_value
    assert isinstance(emb, CheckpointTensor) and emb.dtype == ir.DataType.FLOAT and emb.source_dtype == "BF16"
    src = lw["model.embed_tokens.weight"]  # float32 widening of the stored bf16 values
    np.testing.assert_array_equal(emb.numpy(), src)
    np.testing.assert_array_equal(emb.numpy_as(np.float16), src.astype(np.float16))
    assert src.astype(ml_dtypes.bfloat16).astype(np.float32).tolist() == src.tolist()


def test_fp16_conversion_in_row_chunks(written: dict, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[type-arg]
    from bitnet_coreml.frontend import hf_tensors

    folder, t, lw = written["bitlinear-packed-bf16-sharded-untied"]
    monkeypatch.setattr(hf_tensors, "_chunk_rows", lambda n_rows, row_bytes: 7)  # 96 rows: 13 full chunks + 5
    m = load_checkpoint(folder, seq_len=4)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        got = m.graph.initializers[name].const_value.numpy_as(np.float16)
        np.testing.assert_array_equal(got, lw[name].astype(np.float16))


def test_fp16_embedding_option(written: dict) -> None:  # type: ignore[type-arg]
    # bf16 heads (as real checkpoints store them) convert to fp16 exactly; the lm_head runs in fp16
    folder, t, lw = written["bitlinear-packed-bf16-sharded-untied"]
    m = load_checkpoint(folder, seq_len=10, embed_dtype="float16")
    heads = [v for k, v in m.graph.initializers.items() if k in ("model.embed_tokens.weight", "lm_head.weight")]
    assert heads and all(v.dtype == ir.DataType.FLOAT16 for v in heads)
    ids = np.random.default_rng(9).integers(0, t.vocab, (1, 10))
    got = run_ort(m, ids)
    assert got.dtype == np.float32
    ref = reference_logits(t, lw, ids[0])  # float32 oracle: the fp16 lm_head product is the only change
    assert cosine(got[0], ref) >= 0.9999 and argmax_agreement(got[0], ref) >= 0.98


def test_frontend_load_dispatches_folders(written: dict) -> None:  # type: ignore[type-arg]
    from bitnet_coreml.frontend import load

    folder, t, lw = written["bitlinear-packed-f32"]
    m = load(folder, seq_len=6)
    assert list(m.graph.outputs[0].shape) == [1, 6, t.vocab]


@pytest.mark.slow
@pytest.mark.skipif(not EXPORT_PY.exists(), reason="needs the export venv (.venv-export with torch + transformers)")
@pytest.mark.parametrize("name", ["bitlinear-packed-bf16-sharded-untied", "autobitlinear-online-bf16",
                                  "autobitlinear-offline-attention-bias",
                                  "bitlinear-packed-rmsnorm-mqa"])
def test_logits_match_live_transformers(written: dict, name: str, tmp_path: Path) -> None:  # type: ignore[type-arg]
    folder, t, _ = written[name]
    ids = np.random.default_rng(3).integers(0, t.vocab, (1, 10))
    out = tmp_path / "tf.npy"
    code = ("import sys, numpy as np, torch\nfrom transformers import BitNetForCausalLM\n"
            "m = BitNetForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n"
            "ids = torch.tensor([[int(x) for x in sys.argv[2].split(',')]])\n"
            "with torch.no_grad():\n    np.save(sys.argv[3], m(input_ids=ids, use_cache=False).logits.numpy())\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([str(EXPORT_PY), "-c", code, str(folder), ",".join(map(str, ids[0])), str(out)],
                   check=True, env=env, capture_output=True, timeout=600)
    tf = np.load(out)
    got = run_ort(load_checkpoint(folder, seq_len=10), ids)
    assert cosine(got, tf) >= 0.9999 and argmax_agreement(got, tf) >= 0.98

