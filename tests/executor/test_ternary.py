"""2-bit ternary weights kept packed in the executor: exact integer matmul, dense fallbacks.

Oracles: numpy int64 products of the codes (exact), coremltools' own ``materialized_val_inference``
of the weight op, and the dense decode path of the same package.
"""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_coreml.executor import ternary
from bitnet_coreml.executor.ternary import TernaryWeight, from_lut, matmul_t
from bitnet_coreml.lower.bitnet import TERNARY_LUT, pack_ternary_2bit
from tests.executor._helpers import MB, ReferenceExecutor, build_program, ct

mb = MB


def _weight(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, TernaryWeight]:
    codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    tw = from_lut({"lut": TERNARY_LUT, "indices": pack_ternary_2bit(codes), "shape": np.array([n, k], np.uint32)})
    assert tw is not None
    return codes, tw


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_quantised_activations_are_exact(rows: int) -> None:
    rng = np.random.default_rng(rows)
    codes, tw = _weight(rng, 96, 64)
    q = rng.integers(-128, 128, size=(2, rows, 64)).astype(np.int64)
    q[0, 0, :] = -128  # the extremes of int8
    q[0, -1, :] = 127
    x = (q / 128.0).astype(np.float32)  # BitLinear's xn = xq * 2**-7
    want = (q @ codes.astype(np.int64).T).astype(np.float64) / 128.0
    got = matmul_t(x, tw)
    assert got.dtype == np.float32 and got.shape == (2, rows, 96)
    np.testing.assert_array_equal(got.astype(np.float64), want)
    # the dense (BLAS) product of the same values is the same bits
    np.testing.assert_array_equal(got, np.matmul(x, codes.astype(np.float32).T))


def test_other_activations_use_the_dense_product() -> None:
    rng = np.random.default_rng(7)
    codes, tw = _weight(rng, 33, 24)
    x = rng.standard_normal((2, 24)).astype(np.float32)
    np.testing.assert_allclose(matmul_t(x, tw), x @ codes.astype(np.float32).T, rtol=1e-6, atol=1e-6)
    assert ternary._int_scale(np.array([[1.0, 0.5]], np.float32)) is None  # 128 is not an int8
    assert ternary._int_scale(np.array([[0.3]], np.float32)) is None


def test_refused_forms_decode_densely() -> None:
    n, k = 4, 8
    codes = np.ones((n, k), np.int8)
    packed = pack_ternary_2bit(codes)
    shape = np.array([n, k], np.uint32)
    assert from_lut({"lut": np.array([-2.0, 0, 2, 0], np.float32), "indices": packed, "shape": shape}) is None
    assert from_lut({"lut": TERNARY_LUT, "indices": pack_ternary_2bit(np.ones((4, 6), np.int8)),
                     "shape": np.array([4, 6], np.uint32)}) is None  # K not a multiple of 4
    with_3 = packed.copy()
    with_3[1] |= 0b11 << 4  # one element uses the LUT's padding index
    assert from_lut({"lut": TERNARY_LUT, "indices": with_3, "shape": shape}) is None


@pytest.mark.parametrize("opset", ["iOS16", "iOS18"])
def test_program_through_the_executor(opset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A BitLinear-shaped program: the packed path gives coremltools' dense weight's product exactly."""
    import bitnet_coreml.executor.ops.linear as linear_ops

    packed_calls = []

    def spy(x: np.ndarray, w: TernaryWeight) -> np.ndarray:
        packed_calls.append(w.shape)
        return matmul_t(x, w)

    monkeypatch.setattr(linear_ops, "matmul_t", spy)
    rng = np.random.default_rng(3)
    n, k = 48, 32
    codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    target = getattr(ct.target, opset)
    holder = {}

    def build(x):  # type: ignore[no-untyped-def]
        from coremltools.converters.mil.mil import types

        if opset == "iOS18":
            idx = (codes + np.int8(1)).view(np.uint8).astype(types.np_uint2_dtype)
            w = mb.constexpr_lut_to_dense(indices=idx, lut=TERNARY_LUT.reshape(1, 1, 4, 1))
        else:
            w = mb.constexpr_lut_to_dense(indices=pack_ternary_2bit(codes), lut=TERNARY_LUT,
                                          shape=np.array([n, k], np.uint32))
        holder["op"] = w.op
        y = mb.matmul(x=x, y=w, transpose_y=True)
        t = mb.transpose(x=w, perm=[1, 0])  # another consumer: gets the dense weight
        return y, mb.matmul(x=x, y=t)

    q = rng.integers(-128, 128, size=(1, k))
    x = (q / 128.0).astype(np.float32)
    prog = build_program(build, {"x": x}, opset=target)
    ex = ReferenceExecutor(prog, fp32=True)
    y1, y2 = ex.predict({"x": x}).values()
    dense = np.asarray(holder["op"].materialized_val_inference(), np.float32)
    np.testing.assert_array_equal(dense, codes.astype(np.float32))
    want = (q @ codes.astype(np.int64).T) / 128.0
    np.testing.assert_array_equal(y1, want)
    np.testing.assert_array_equal(y2, want)
    assert packed_calls == [(n, k)]  # the transposed consumer went dense, the matmul stayed packed


@pytest.mark.parametrize("k", [64, 256, 836, 2816])
def test_integer_kernels_agree_with_numpy(k: int) -> None:
    """The portable kernel and, on a CPU with AVX-512 VNNI, the vpdpbusd one (64-byte steps + a tail)."""
    from bitnet_coreml.executor._ternary_kernels import _int_matmul
    from bitnet_coreml.executor._vnni import HAS_VNNI, int_matmul_vnni

    rng = np.random.default_rng(k)
    codes, tw = _weight(rng, 37, k)
    q = rng.integers(-128, 128, size=(3, k)).astype(np.int8)
    q[0] = -128
    planes = np.ascontiguousarray(q.reshape(3, k // 4, 4).transpose(0, 2, 1))
    want = q.astype(np.int64) @ (codes.astype(np.int64) + 1).T  # the kernels sum code fields (weight + 1)
    kernels = [_int_matmul] + ([int_matmul_vnni] if HAS_VNNI else [])
    for kernel in kernels:
        out = np.zeros((3, 37), np.int32)
        kernel(tw.codes, planes, out)
        np.testing.assert_array_equal(out, want)
