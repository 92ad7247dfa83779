"""The weight.bin estimate against real packages written by coremltools' blob writer (ct.convert + save)."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_coreml.check import estimate_weight_bytes
from bitnet_coreml.check.size import blob_file_bytes
from bitnet_coreml.check.split import split_chunks
from bitnet_coreml.errors import InputError
from tests.check.graphs import GraphBuilder, tiny_lm
from tests.check.mil_oracle import weight_bin_bytes


def test_blob_layout_hand_computed() -> None:
    # ANE_FACTS: a 1024x1024 ternary weight as 2-bit LUT (+ its 1024-element fp16 bias) is 264,384 B
    assert blob_file_bytes([1024 * 1024 * 2 // 8, 1024 * 2]) == 264_384
    assert blob_file_bytes([]) == 0
    assert blob_file_bytes([1]) == 64 + 64 + 1
    assert blob_file_bytes([1, 1]) == 64 + 64 + 1 + 63 + 64 + 1


def test_split_chunks() -> None:
    assert split_chunks(32000, 16384) == [16000, 16000]
    assert split_chunks(16384, 16384) == [16384]
    assert split_chunks(128256, 16384) == [16032] * 8  # ANEMLL's 8 parts of the 128256 LM head
    assert split_chunks(32770, 16384) == [10924, 10924, 10922]
    assert sum(split_chunks(40001, 16384)) == 40001


CASES = [
    ("tiny", dict()),
    ("vocab_40000", dict(vocab=40000)),
    ("tied", dict(tied=True)),
    ("odd_shapes", dict(vocab=77, d=24, hidden=40, seq=3)),
    ("palettize_threshold", dict(vocab=2048, d=32)),  # 65536-element embedding: exactly at the threshold
    ("below_threshold", dict(vocab=2047, d=32)),
    ("tied_gemm_split", dict(vocab=20000, tied="gemm")),  # Gather + Gemm(transB=1) share the row chunks
]


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("embed_bits", [None, 4, 6, 8])
@pytest.mark.parametrize("name, kw", CASES, ids=[c[0] for c in CASES])
def test_estimate_matches_coremltools_weight_bin(name: str, kw: dict, embed_bits: int | None, precision: str) -> None:  # type: ignore[type-arg]
    m = tiny_lm(**kw)
    est = estimate_weight_bytes(m, embed_bits=embed_bits, precision=precision)
    real = weight_bin_bytes(m, embed_bits=embed_bits, precision=precision)
    assert abs(est.total_bytes - real) <= 0.02 * real
    assert est.total_bytes == real  # the layout is deterministic: the estimate is exact


def test_estimate_matches_on_ios18_target() -> None:
    m = tiny_lm(vocab=300)
    assert estimate_weight_bytes(m).total_bytes == weight_bin_bytes(m, target="iOS18")


def test_3m_ternary_parameters() -> None:
    b = GraphBuilder()
    x = b.input("x", [1, 1000])
    m = b.output(b.bitlinear(x, 3000, 1000, per_channel=True))
    est = estimate_weight_bytes(m)
    assert est.params_ternary == 3_000_000 and est.params_scales == 3000
    assert est.total_bytes == weight_bin_bytes(m)
    # the 2-bit package is ~8x smaller than the same weights in fp16
    assert est.fp16_total_bytes / est.total_bytes == pytest.approx(6_006_000 / 756_000, rel=0.01)


def test_small_constants_are_inlined() -> None:
    b = GraphBuilder()
    x = b.input("x", [1, 9])
    y = b.node("Add", [x, b.init(np.ones((1, 9), np.float32), "c9")], [1, 9])
    m = b.output(b.node("Mul", [y, b.init(np.ones((1, 9), np.float32), "c9b")], [1, 9]))
    est = estimate_weight_bytes(m)
    assert est.total_bytes == 0 == weight_bin_bytes(m)
    assert [t.kind for t in est.tensors] == ["inlined", "inlined"]


def test_tied_gemm_head_split_is_stored_once() -> None:
    # hand-computed: a 32000x32 table cut into 2 row chunks of 16000 rows, fp16, written once although
    # the Gather and the Gemm(transB=1) LM head both use it
    m = tiny_lm(vocab=32000, d=32, tied="gemm")
    [emb] = [t for t in estimate_weight_bytes(m).tensors if t.shape == (32000, 32)]
    assert emb.blobs == (16000 * 32 * 2, 16000 * 32 * 2)
    # nothing split: the whole table, once
    [emb] = [t for t in estimate_weight_bytes(m, split_limit=0).tensors if t.shape == (32000, 32)]
    assert emb.blobs == (32000 * 32 * 2,)
    # a head that the converter cannot split (alpha != 1) keeps the whole table next to the Gather's chunks
    [gemm] = [n for n in m.graph if n.op_type == "Gemm"]
    gemm.attributes["alpha"] = __import__("onnx_ir").AttrFloat32("alpha", 0.5)
    [emb] = [t for t in estimate_weight_bytes(m).tensors if t.shape == (32000, 32)]
    assert emb.blobs == (16000 * 32 * 2, 16000 * 32 * 2, 32000 * 32 * 2)


def test_split_gemm_bias_is_cut_into_the_head_chunks() -> None:
    b = GraphBuilder()
    x = b.input("x", [2, 8])
    w = b.init(np.zeros((16385, 8), np.float32), "head")
    c = b.init(np.zeros((16385,), np.float32), "bias")
    m = b.output(b.node("Gemm", [x, w, c], [2, 16385], transB=1))
    t = {tb.shape: tb for tb in estimate_weight_bytes(m).tensors}
    assert t[(16385, 8)].blobs == (8193 * 8 * 2, 8192 * 8 * 2)
    assert t[(16385,)].blobs == (8193 * 2, 8192 * 2)


def test_bad_arguments() -> None:
    with pytest.raises(InputError, match="precision"):
        estimate_weight_bytes(tiny_lm(), precision="int4")
    with pytest.raises(InputError, match="embed_bits 9"):
        estimate_weight_bytes(tiny_lm(), embed_bits=9)


MODELS = __import__("pathlib").Path(__file__).resolve().parents[2] / "models"


@pytest.mark.parametrize("name, precision, embed_bits, split_limit", [
    ("bitnet_offline.onnx", "fp16", 4, 16384),
    # a tied HF checkpoint with the split limit lowered so that its 512-row embedding is split both for
    # the Gather and for the tied Gemm(transB=1) LM head: the shared row chunks are written once
    ("hf/bitnet-tiny-packed", "fp16", None, 200),
    pytest.param("bitnet_offline.onnx", "fp16", None, 16384, marks=pytest.mark.slow),
    pytest.param("bitnet_bigvocab.onnx", "fp16", None, 16384, marks=pytest.mark.slow),
    pytest.param("bitnet_bigvocab.onnx", "fp16", 8, 16384, marks=pytest.mark.slow),
    pytest.param("bitnet_packed.onnx", "fp32", None, 16384, marks=pytest.mark.slow),
])
def test_estimate_matches_the_converter(tmp_path, name: str, precision: str, embed_bits: int | None,  # type: ignore[no-untyped-def]
                                        split_limit: int) -> None:
    """The issue's bar: the converted package's weight.bin within 2% of the estimate."""
    src = MODELS / name
    if not src.exists():
        pytest.skip(f"bundled model {name} missing")
    convert_mod = pytest.importorskip("bitnet_coreml.convert")
    from bitnet_coreml.frontend import load
    from bitnet_coreml.passes import run_default_passes

    m = load(src)
    run_default_passes(m)
    est = estimate_weight_bytes(m, precision=precision, embed_bits=embed_bits, split_limit=split_limit)
    out = tmp_path / "m.mlpackage"
    convert_mod.convert(src, out, convert_mod.ConvertOptions(precision=precision, embed_bits=embed_bits, check=False,
                                                             split_limit=split_limit))
    real = (out / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size
    assert abs(est.total_bytes - real) <= 0.02 * real, (est.total_bytes, real)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(deadline=None)
@given(dim=st.integers(1, 10**6), limit=st.integers(64, 20000))
def test_split_chunks_properties(dim: int, limit: int) -> None:
    c = split_chunks(dim, limit)
    assert sum(c) == dim and all(0 < x <= limit for x in c) or (dim <= limit and c == [dim])
    assert len(c) == max(1, -(-dim // limit))  # the fewest chunks that fit
    assert all(x == c[0] for x in c[:-1]) and c[-1] <= c[0]
