"""linear / matmul / einsum against numpy; conv, conv_transpose and pooling against the ONNX reference evaluator."""

from __future__ import annotations

import numpy as np
import pytest

from tests.executor._helpers import DTYPES, MB, TOL, one, onnx_ref, rand

mb = MB
CONV_TOL = {"fp16": {"rtol": 5e-3, "atol": 5e-3}, "fp32": {"rtol": 1e-4, "atol": 1e-4}}


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("x_shape,n_out", [((4,), 3), ((2, 8), 5), ((2, 3, 16), 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(x_shape: tuple[int, ...], n_out: int, bias: bool, dtype: str) -> None:
    np_t = DTYPES[dtype][0]
    x = rand(x_shape, np_t, seed=1)
    w = rand((n_out, x_shape[-1]), np_t, seed=2)
    b = rand((n_out,), np_t, seed=3)
    got = one(lambda x: mb.linear(x=x, weight=w, bias=b) if bias else mb.linear(x=x, weight=w), {"x": x})
    ref = x.astype(np.float64) @ w.astype(np.float64).T + (b.astype(np.float64) if bias else 0)
    np.testing.assert_allclose(got.astype(np.float64), ref, **CONV_TOL[dtype])


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("xs,ys,tx,ty", [
    ((3, 4), (4, 5), False, False),
    ((4, 3), (4, 5), True, False),
    ((2, 3, 4), (2, 5, 4), False, True),
    ((2, 1, 3, 4), (5, 4, 6), False, False),
    ((4,), (4, 5), False, False),
])
def test_matmul(xs: tuple[int, ...], ys: tuple[int, ...], tx: bool, ty: bool, dtype: str) -> None:
    np_t = DTYPES[dtype][0]
    x, y = rand(xs, np_t, seed=1), rand(ys, np_t, seed=2)
    got = one(lambda x, y: mb.matmul(x=x, y=y, transpose_x=tx, transpose_y=ty), {"x": x, "y": y})
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    if tx:
        xd = np.swapaxes(xd, -1, -2)
    if ty:
        yd = np.swapaxes(yd, -1, -2)
    np.testing.assert_allclose(got.astype(np.float64), np.matmul(xd, yd), **CONV_TOL[dtype])


def test_einsum() -> None:
    # one of the two equation forms MIL's einsum accepts
    x, y = rand((2, 3, 4, 5)), rand((2, 5, 4, 6), seed=1)
    got = one(lambda x, y: mb.einsum(values=(x, y), equation="nchw,nwhu->nchu"), {"x": x, "y": y})
    np.testing.assert_allclose(got, np.einsum("nchw,nwhu->nchu", x, y), rtol=1e-5, atol=1e-5)


CONV_CASES = [
    # (x shape, w shape, strides, dilations, groups, pad_type, custom pad)
    ((1, 3, 9, 9), (4, 3, 3, 3), [1, 1], [1, 1], 1, "valid", None),
    ((2, 4, 8, 7), (6, 2, 3, 2), [2, 1], [1, 1], 2, "custom", [1, 0, 2, 1]),
    ((1, 4, 10, 10), (4, 1, 3, 3), [1, 1], [2, 2], 4, "same", None),
    ((1, 2, 7, 6), (3, 2, 2, 3), [2, 2], [1, 1], 1, "same", None),
    ((1, 3, 11), (5, 3, 4), [3], [1], 1, "custom", [2, 1]),
    ((1, 2, 4, 5, 5), (2, 2, 2, 3, 3), [1, 2, 1], [1, 1, 1], 1, "valid", None),
]


def _onnx_pads(x_shape, w_shape, strides, dilations, pad_type, pad):  # type: ignore[no-untyped-def]
    n = len(x_shape) - 2
    if pad_type == "valid":
        return [0] * (2 * n)
    if pad_type == "custom":
        return [pad[2 * i] for i in range(n)] + [pad[2 * i + 1] for i in range(n)]
    # "same": total = (ceil(in/s)-1)*s + eff - in, extra on the end (ONNX SAME_UPPER)
    begins, ends = [], []
    for size, k, s, d in zip(x_shape[2:], w_shape[2:], strides, dilations, strict=False):
        eff = (k - 1) * d + 1
        total = max((-(-size // s) - 1) * s + eff - size, 0)
        begins.append(total // 2)
        ends.append(total - total // 2)
    return begins + ends


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"c{i}" for i in range(len(CONV_CASES))])
def test_conv_against_onnx(case, dtype: str) -> None:  # type: ignore[no-untyped-def]
    xs, ws, strides, dil, groups, pad_type, pad = case
    np_t = DTYPES[dtype][0]
    x, w, b = rand(xs, np_t, seed=1), rand(ws, np_t, seed=2), rand((ws[0],), np_t, seed=3)
    kw = {"strides": strides, "dilations": dil, "groups": groups, "pad_type": pad_type}
    if pad is not None:
        kw["pad"] = pad
    got = one(lambda x: mb.conv(x=x, weight=w, bias=b, **kw), {"x": x})
    (ref,) = onnx_ref("Conv", [x.astype(np.float32), w.astype(np.float32), b.astype(np.float32)],
                      {"strides": strides, "dilations": dil, "group": groups,
                       "pads": _onnx_pads(xs, ws, strides, dil, pad_type, pad)})
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.astype(np.float64), ref, **CONV_TOL[dtype])


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("xs,ws,strides,groups,pad", [
    ((1, 4, 5, 5), (4, 3, 3, 3), [2, 2], 1, [0, 0, 0, 0]),
    ((1, 4, 4, 6), (4, 2, 2, 3), [1, 2], 2, [1, 0, 0, 1]),
    ((2, 3, 7), (3, 2, 4), [3], 1, [1, 2]),
])
def test_conv_transpose_against_onnx(xs, ws, strides, groups, pad, dtype: str) -> None:  # type: ignore[no-untyped-def]
    np_t = DTYPES[dtype][0]
    x, w = rand(xs, np_t, seed=1), rand(ws, np_t, seed=2)
    got = one(lambda x: mb.conv_transpose(x=x, weight=w, strides=strides, groups=groups, pad_type="custom", pad=pad),
              {"x": x})
    n = len(xs) - 2
    onnx_pads = [pad[2 * i] for i in range(n)] + [pad[2 * i + 1] for i in range(n)]
    # the ONNX reference ConvTranspose has no groups: run it per group and concatenate the channels
    xg = np.split(x.astype(np.float32), groups, axis=1)
    wg = np.split(w.astype(np.float32), groups, axis=0)
    ref = np.concatenate([onnx_ref("ConvTranspose", [xi, wi], {"strides": strides, "pads": onnx_pads})[0]
                          for xi, wi in zip(xg, wg, strict=False)], axis=1)
    np.testing.assert_allclose(got.astype(np.float64), ref, **CONV_TOL[dtype])


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("xs,k,s,pad", [
    ((1, 2, 6, 6), [2, 2], [2, 2], [0, 0, 0, 0]),
    ((2, 3, 7, 5), [3, 2], [2, 1], [1, 1, 0, 1]),
    ((1, 2, 9), [3], [2], [1, 1]),
])
def test_pool_against_onnx(kind: str, xs, k, s, pad, dtype: str) -> None:  # type: ignore[no-untyped-def]
    np_t = DTYPES[dtype][0]
    x = rand(xs, np_t, seed=4)
    op = mb.max_pool if kind == "max" else mb.avg_pool
    kw = {"exclude_padding_from_average": True} if kind == "avg" else {}
    got = one(lambda x: op(x=x, kernel_sizes=k, strides=s, pad_type="custom", pad=pad, **kw), {"x": x})
    n = len(xs) - 2
    onnx_pads = [pad[2 * i] for i in range(n)] + [pad[2 * i + 1] for i in range(n)]
    attrs = {"kernel_shape": k, "strides": s, "pads": onnx_pads}
    if kind == "avg":
        attrs["count_include_pad"] = 0
    (ref,) = onnx_ref("MaxPool" if kind == "max" else "AveragePool", [x.astype(np.float32)], attrs)
    np.testing.assert_allclose(got.astype(np.float64), ref, **TOL[dtype])


def test_avg_pool_counting_padding_by_hand() -> None:
    x = np.arange(1, 5, dtype=np.float32).reshape(1, 1, 2, 2)
    got = one(lambda x: mb.avg_pool(x=x, kernel_sizes=[2, 2], strides=[1, 1], pad_type="custom", pad=[1, 0, 1, 0],
                                    exclude_padding_from_average=False), {"x": x})
    # windows over [[0,0,0],[0,1,2],[0,3,4]] divided by 4
    np.testing.assert_allclose(got[0, 0], [[0.25, 0.75], [1.0, 2.5]])
