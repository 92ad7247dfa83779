"""Reductions and normalisations against numpy and the ONNX reference evaluator."""

from __future__ import annotations

import numpy as np
import pytest

from tests.executor._helpers import DTYPES, MB, TOL, one, onnx_ref, rand

mb = MB
NORM_TOL = {"fp16": {"rtol": 5e-3, "atol": 5e-3}, "fp32": {"rtol": 1e-5, "atol": 1e-5}}

REDUCE = {
    "reduce_sum": lambda x, ax, k: np.sum(x, axis=ax, keepdims=k),
    "reduce_mean": lambda x, ax, k: np.mean(x, axis=ax, keepdims=k),
    "reduce_max": lambda x, ax, k: np.max(x, axis=ax, keepdims=k),
    "reduce_min": lambda x, ax, k: np.min(x, axis=ax, keepdims=k),
    "reduce_prod": lambda x, ax, k: np.prod(x, axis=ax, keepdims=k),
    "reduce_l1_norm": lambda x, ax, k: np.sum(np.abs(x), axis=ax, keepdims=k),
    "reduce_l2_norm": lambda x, ax, k: np.sqrt(np.sum(x * x, axis=ax, keepdims=k)),
    "reduce_sum_square": lambda x, ax, k: np.sum(x * x, axis=ax, keepdims=k),
    "reduce_log_sum": lambda x, ax, k: np.log(np.sum(x, axis=ax, keepdims=k)),
    "reduce_log_sum_exp": lambda x, ax, k: np.log(np.sum(np.exp(x), axis=ax, keepdims=k)),
}


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("axes,keep", [([-1], False), ([0, 2], True), (None, False)])
@pytest.mark.parametrize("op", sorted(REDUCE))
def test_reductions(op: str, axes: list[int] | None, keep: bool, dtype: str) -> None:
    x = rand((3, 4, 5), DTYPES[dtype][0], seed=7, lo=0.5, hi=1.5)
    kw = {"keep_dims": keep}
    if axes is not None:
        kw["axes"] = axes
    got = one(lambda x: getattr(mb, op)(x=x, **kw), {"x": x})
    ax = tuple(axes) if axes is not None else None
    np.testing.assert_allclose(got.astype(np.float64), REDUCE[op](x.astype(np.float64), ax, keep), **NORM_TOL[dtype])


def test_argmax_argmin() -> None:
    x = np.array([[1.0, 5.0, 5.0, 0.0], [7.0, -1.0, 3.0, -1.0]], np.float32)
    got = one(lambda x: mb.reduce_argmax(x=x, axis=1), {"x": x})
    np.testing.assert_array_equal(got, [1, 0])  # first of equal maxima
    got = one(lambda x: mb.reduce_argmin(x=x, axis=-1, keep_dims=True), {"x": x})
    np.testing.assert_array_equal(got, [[3], [1]])


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("shape,axes", [((2, 5, 8), [-1]), ((2, 3, 4, 6), [-2, -1])])
def test_layer_norm_against_onnx(shape: tuple[int, ...], axes: list[int], dtype: str) -> None:
    np_t = DTYPES[dtype][0]
    x = rand(shape, np_t, seed=1, lo=-3, hi=3)
    norm_shape = tuple(shape[a] for a in axes)
    g, b = rand(norm_shape, np_t, seed=2), rand(norm_shape, np_t, seed=3)
    got = one(lambda x: mb.layer_norm(x=x, axes=axes, gamma=g, beta=b, epsilon=np_t(1e-5)), {"x": x})
    (ref,) = onnx_ref("LayerNormalization", [x.astype(np.float32), g.astype(np.float32), b.astype(np.float32)],
                      {"axis": len(shape) - len(axes), "epsilon": 1e-5}, opset=17)
    np.testing.assert_allclose(got.astype(np.float64), ref, **NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_batch_and_instance_norm_against_onnx(dtype: str) -> None:
    np_t = DTYPES[dtype][0]
    x = rand((2, 3, 4, 5), np_t, seed=1, lo=-3, hi=3)
    mean, var = rand((3,), np_t, seed=2), rand((3,), np_t, seed=3, lo=0.5, hi=2)
    g, b = rand((3,), np_t, seed=4), rand((3,), np_t, seed=5)
    f = [a.astype(np.float32) for a in (x, g, b, mean, var)]
    got = one(lambda x: mb.batch_norm(x=x, mean=mean, variance=var, gamma=g, beta=b, epsilon=np_t(1e-3)), {"x": x})
    (ref,) = onnx_ref("BatchNormalization", f, {"epsilon": 1e-3})
    np.testing.assert_allclose(got.astype(np.float64), ref, **NORM_TOL[dtype])
    got = one(lambda x: mb.instance_norm(x=x, gamma=g, beta=b, epsilon=np_t(1e-3)), {"x": x})
    (ref,) = onnx_ref("InstanceNormalization", f[:3], {"epsilon": 1e-3})
    np.testing.assert_allclose(got.astype(np.float64), ref, **NORM_TOL[dtype])


def test_l2_norm_and_lrn() -> None:
    x = rand((2, 3, 4, 5), seed=1)
    got = one(lambda x: mb.l2_norm(x=x, epsilon=1e-6), {"x": x})
    ref = x / np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=(1, 2, 3), keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, ref, **TOL["fp32"])
    got = one(lambda x: mb.local_response_norm(x=x, size=3, alpha=1e-2, beta=0.75, k=1.0), {"x": x})
    # written from the spec (the ONNX reference LRN loops over the batch axis instead of channels)
    ref = np.empty_like(x, dtype=np.float64)
    for c in range(x.shape[1]):
        lo, hi = max(0, c - 1), min(x.shape[1], c + 2)
        ref[:, c] = x[:, c] / (1.0 + 1e-2 / 3 * np.sum(x[:, lo:hi].astype(np.float64) ** 2, axis=1)) ** 0.75
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_rmsnorm_decomposition_matches_formula() -> None:
    """The way the lowering writes RMSNorm (mul, reduce_mean, add, rsqrt, mul, mul) in fp16 vs float64."""
    x = rand((2, 7, 16), np.float16, seed=4, lo=-4, hi=4)
    gamma = rand((16,), np.float16, seed=5)

    def build(x):  # type: ignore[no-untyped-def]
        ms = mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True)
        inv = mb.rsqrt(x=mb.add(x=ms, y=np.float16(1e-5)))
        return mb.mul(x=mb.mul(x=x, y=inv), y=gamma)

    got = one(build, {"x": x})
    xd = x.astype(np.float64)
    ref = xd / np.sqrt(np.mean(xd * xd, axis=-1, keepdims=True) + 1e-5) * gamma.astype(np.float64)
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=5e-3, atol=5e-3)


def test_lrn_rank3_uses_axis_minus_3_like_core_ml() -> None:
    """Core ML's own outputs for a rank-3 input (hard-coded in coremltools' iOS14 LRN test, size 2)."""
    x = np.array([[[1.0, -7.0], [5.0, -6.0], [-3.0, -5.0]]], np.float32)
    got = one(lambda x: mb.local_response_norm(x=x, size=2), {"x": x})
    device = np.array([[[0.99996257, -6.98716545], [4.99531746, -5.99191284], [-2.99898791, -4.99531746]]])
    np.testing.assert_allclose(got, device, rtol=1e-6, atol=1e-6)
