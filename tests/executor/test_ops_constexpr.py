"""Weight decompression (constexpr_*, iOS16 and iOS18 forms) and the ternary path.

Oracles: element-by-element loops written from the op specs, coremltools' own
``materialized_val_inference``, and for saved packages a numpy matmul with the dense weight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.executor._helpers import MB, TYPES, ReferenceExecutor, build_program, ct, rand

mb = MB
types = TYPES


def _pack_lsb_first(values: np.ndarray, nbits: int) -> np.ndarray:
    """Pack unsigned nbits-wide values LSB-first into bytes, one bit at a time (the iOS16 layout)."""
    flat = [int(v) for v in values.reshape(-1)]
    out = bytearray((len(flat) * nbits + 7) // 8)
    for i, v in enumerate(flat):
        for b in range(nbits):
            if (v >> b) & 1:
                pos = i * nbits + b
                out[pos // 8] |= 1 << (pos % 8)
    return np.frombuffer(bytes(out), dtype=np.uint8).copy()


def _run_weight(build_weight, x: np.ndarray, opset=None) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Run linear(x, W) with W from ``build_weight``; also return coremltools' decompression of W."""
    holder = {}

    def build(x):  # type: ignore[no-untyped-def]
        w = build_weight()
        holder["op"] = w.op
        return mb.linear(x=x, weight=w)

    prog = build_program(build, {"x": x}, opset=opset or ct.target.iOS18)
    (y,) = ReferenceExecutor(prog).predict({"x": x}).values()
    return y, holder["op"].materialized_val_inference()


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_lut_to_dense_ios16(nbits: int) -> None:
    rng = np.random.default_rng(nbits)
    shape = (5, 7)
    idx = rng.integers(0, 2**nbits, size=shape)
    lut = rng.uniform(-1, 1, size=2**nbits).astype(np.float32)
    x = rand((3, 7), seed=1)
    y, ct_dense = _run_weight(
        lambda: mb.constexpr_lut_to_dense(indices=_pack_lsb_first(idx, nbits), lut=lut, shape=np.uint32(shape)),
        x, opset=ct.target.iOS16)
    dense = lut[idx]
    np.testing.assert_array_equal(ct_dense, dense)
    np.testing.assert_allclose(y, x @ dense.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups,vector", [((1, 1), 1), ((3, 1), 1), ((1, 2), 1), ((1, 1), 2)])
def test_lut_to_dense_ios18_grouped_and_vector(groups: tuple[int, int], vector: int) -> None:
    rng = np.random.default_rng(3)
    out_shape = (6, 8)
    idx_shape = (6, 8 // vector) if vector > 1 else out_shape
    idx = rng.integers(0, 4, size=idx_shape).astype(types.np_uint2_dtype)
    lut = rng.uniform(-1, 1, size=groups + (4, vector)).astype(np.float16)
    kw = {"vector_axis": 1} if vector > 1 else {}
    x = rand((2, 8), np.float16, seed=2)
    y, ct_dense = _run_weight(lambda: mb.constexpr_lut_to_dense(indices=idx, lut=lut, **kw), x)
    dense = np.empty(out_shape, np.float16)
    gs = (idx_shape[0] // groups[0], idx_shape[1] // groups[1])
    for i in range(idx_shape[0]):
        for j in range(idx_shape[1]):
            vec = lut[i // gs[0], j // gs[1], int(idx[i, j])]
            dense[i, j * vector:(j + 1) * vector] = vec
    np.testing.assert_array_equal(ct_dense, dense)
    ref = (x.astype(np.float32) @ dense.astype(np.float32).T).astype(np.float16)
    np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, "int4"])
def test_blockwise_shift_scale(dtype) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(5)
    lo, hi, np_t = {"int4": (-8, 8, types.np_int4_dtype), np.int8: (-128, 128, np.int8),
                    np.uint8: (0, 256, np.uint8)}[dtype]  # type: ignore[index]
    data = rng.integers(lo, hi, size=(4, 6)).astype(np_t)
    scale = rng.uniform(0.01, 0.1, size=(4, 2)).astype(np.float32)  # blocks of 3 along axis 1
    offset = rng.integers(lo // 2, hi // 2, size=(4, 2)).astype(np_t)
    x = rand((2, 6), seed=3)
    y, ct_dense = _run_weight(lambda: mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset), x)
    dense = np.empty((4, 6), np.float64)
    for i in range(4):
        for j in range(6):
            dense[i, j] = scale[i, j // 3] * (int(data[i, j]) - int(offset[i, j // 3]))
    np.testing.assert_allclose(ct_dense, dense, rtol=1e-6)
    np.testing.assert_allclose(y, x @ dense.T, rtol=1e-5, atol=1e-5)


def test_affine_dequantize_and_sparse() -> None:
    q = np.array([[0, 10, 255], [128, 3, 7]], np.uint8)
    scale = np.array([0.5, 0.25], np.float32)
    zp = np.array([128, 0], np.uint8)
    x = rand((2, 3), seed=1)
    y, ct_dense = _run_weight(
        lambda: mb.constexpr_affine_dequantize(quantized_data=q, zero_point=zp, scale=scale, axis=0), x,
        opset=ct.target.iOS16)
    dense = (q.astype(np.float64) - zp[:, None]) * scale[:, None]
    np.testing.assert_allclose(ct_dense, dense)
    np.testing.assert_allclose(y, x @ dense.T, rtol=1e-6, atol=1e-6)

    mask = np.array([[1, 0, 1], [0, 0, 1]]).astype(types.np_uint1_dtype)
    nz = np.array([2.0, -3.0, 5.0], np.float32)
    y, ct_dense = _run_weight(lambda: mb.constexpr_sparse_to_dense(nonzero_data=nz, mask=mask), x)
    dense = np.array([[2.0, 0, -3.0], [0, 0, 5.0]])
    np.testing.assert_array_equal(ct_dense, dense)
    np.testing.assert_allclose(y, x @ dense.T, rtol=1e-6, atol=1e-6)


def test_sparse_ios16_packed_mask() -> None:
    mask_bits = np.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 1], np.uint8)
    nz = np.arange(1, 6, dtype=np.float32)
    x = rand((1, 5), seed=2)
    y, ct_dense = _run_weight(
        lambda: mb.constexpr_sparse_to_dense(nonzero_data=nz, mask=_pack_lsb_first(mask_bits, 1),
                                             shape=np.uint32([2, 5])), x, opset=ct.target.iOS16)
    dense = np.zeros(10, np.float32)
    dense[mask_bits == 1] = nz
    dense = dense.reshape(2, 5)
    np.testing.assert_array_equal(ct_dense, dense)
    np.testing.assert_allclose(y, x @ dense.T, rtol=1e-6)


@pytest.mark.parametrize("target", ["iOS16", "iOS18"])
def test_ternary_package_via_palettization(tmp_path: Path, target: str) -> None:
    """A ternary linear, palettized by coremltools to 2-bit LUT, saved and run from the .mlpackage."""
    rng = np.random.default_rng(11)
    w = (rng.integers(-1, 2, size=(64, 96)) * 0.0625).astype(np.float32)
    x = rand((3, 96), seed=4)
    opset = getattr(ct.target, target)

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 96))], opset_version=opset)
    def prog(x):  # type: ignore[no-untyped-def]
        return mb.linear(x=x, weight=w)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=opset,
                       compute_precision=ct.precision.FLOAT32)
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    model = palettize_weights(model, OptimizationConfig(global_config=OpPalettizerConfig(mode="unique")))
    path = tmp_path / "ternary.mlpackage"
    model.save(str(path))
    ex = ReferenceExecutor(path)
    ops = {op.op_type for op in ex.program.functions["main"].operations}
    assert "constexpr_lut_to_dense" in ops
    (y,) = ex.predict({"x": x}).values()
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.parametrize("per_axis", [False, True])
def test_quantize_dequantize(dtype: str, per_axis: bool) -> None:
    """iOS17 quantize / dequantize against the spec: q = clip(round_half_even(x / s + zp)), x' = (q - zp) * s."""
    x = rand((2, 3, 4), seed=7, lo=-3, hi=3)
    if per_axis:
        scale = np.array([0.02, 0.05, 0.1], np.float32)
        zp = np.array([0, 3, -2] if dtype == "int8" else [128, 100, 140], getattr(np, dtype))
        kw = {"axis": 1}
        s_b, z_b = scale.reshape(1, 3, 1), zp.reshape(1, 3, 1).astype(np.float64)
    else:
        scale = np.float32(0.03)
        zp = getattr(np, dtype)(5 if dtype == "int8" else 128)
        kw = {}
        s_b, z_b = np.float64(scale), np.float64(zp)
    lo, hi = (-128, 127) if dtype == "int8" else (0, 255)

    def build(x):  # type: ignore[no-untyped-def]
        q = mb.quantize(input=x, scale=scale, zero_point=zp, output_dtype=dtype, **kw)
        return [q, mb.dequantize(input=q, scale=scale, zero_point=zp, **kw)]

    from tests.executor._helpers import run_program

    q, dq = run_program(build, {"x": x}, opset=ct.target.iOS17).values()
    ref_q = np.clip(np.round(x.astype(np.float64) / s_b + z_b), lo, hi)
    assert q.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(q, ref_q)
    np.testing.assert_allclose(dq, (ref_q - z_b) * s_b, rtol=1e-6, atol=1e-7)
