"""Shape, slicing, gather/scatter and tensor-builder ops against numpy written from the MIL spec."""

from __future__ import annotations

import numpy as np
import pytest

from tests.executor._helpers import DTYPES, MB, one, rand, run_program

mb = MB


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("shape", [(2, 3, 4), (6, 4)])
def test_layout_ops(shape: tuple[int, ...], dtype: str) -> None:
    x = rand(shape, DTYPES[dtype][0], seed=1)
    n = x.ndim

    def build(x):  # type: ignore[no-untyped-def]
        return [
            mb.reshape(x=x, shape=[-1, shape[-1]]),
            mb.transpose(x=x, perm=list(reversed(range(n)))),
            mb.expand_dims(x=x, axes=[0, -1]),
            mb.squeeze(x=mb.expand_dims(x=x, axes=[1])),
            mb.tile(x=x, reps=[2] + [1] * (n - 1)),
            mb.reverse(x=x, axes=[0]),
            mb.concat(values=[x, x], axis=-1),
            mb.concat(values=[x, mb.add(x=x, y=x)], axis=0, interleave=True),
            mb.stack(values=[x, x], axis=1),
        ]

    outs = list(run_program(build, {"x": x}).values())
    refs = [
        x.reshape(-1, shape[-1]),
        x.transpose(list(reversed(range(n)))),
        x[None, ..., None],
        x,
        np.tile(x, [2] + [1] * (n - 1)),
        x[::-1],
        np.concatenate([x, x], axis=-1),
        np.stack([x, x + x], axis=1).reshape((2 * shape[0],) + shape[1:]),
        np.stack([x, x], axis=1),
    ]
    for i, (got, ref) in enumerate(zip(outs, refs, strict=False)):
        assert got.dtype == x.dtype, i
        np.testing.assert_array_equal(got, ref, err_msg=str(i))


def test_reshape_zero_copies_right_aligned_dim() -> None:
    x = rand((2, 50))
    got = one(lambda x: mb.reshape(x=x, shape=[1, 0, -1, 0]), {"x": x}, opset=None)
    assert got.shape == (1, 1, 2, 50)


@pytest.mark.parametrize("begin,end,stride,bmask,emask,smask", [
    ([0, 1, 0], [2, 3, 4], [1, 1, 2], None, None, None),
    ([1, -2, 3], [0, 0, 0], [1, 1, -1], [False, False, False], [True, True, True], None),
    ([1, 0, 0], [2, 3, 4], [1, 1, 1], None, None, [True, False, False]),
    ([0, 2, 1], [2, 0, 4], [1, -1, 1], [True, False, False], [False, True, False], None),
])
def test_slice_by_index(begin, end, stride, bmask, emask, smask) -> None:  # type: ignore[no-untyped-def]
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    kw = {k: v for k, v in [("begin_mask", bmask), ("end_mask", emask), ("squeeze_mask", smask)] if v is not None}
    got = one(lambda x: mb.slice_by_index(x=x, begin=begin, end=end, stride=stride, **kw), {"x": x})
    sl = []
    for i in range(3):
        b = None if (bmask and bmask[i]) else begin[i]
        e = None if (emask and emask[i]) else end[i]
        sl.append(begin[i] if (smask and smask[i]) else slice(b, e, stride[i]))
    np.testing.assert_array_equal(got, x[tuple(sl)])


def test_slice_by_size_split_pad() -> None:
    x = np.arange(30, dtype=np.float32).reshape(5, 6)

    def build(x):  # type: ignore[no-untyped-def]
        a, b, c = mb.split(x=x, split_sizes=[1, 2, 3], axis=1)
        d, e = mb.split(x=x, num_splits=2, axis=1)
        return [mb.slice_by_size(x=x, begin=[1, 2], size=[3, -1]), a, b, c, d, e,
                mb.pad(x=x, pad=[1, 2, 0, 1], constant_val=-1.0),
                mb.pad(x=x, pad=[2, 1], mode="reflect"),
                mb.pad(x=x, pad=[1, 1, 2, 0], mode="replicate")]

    outs = list(run_program(build, {"x": x}).values())
    np.testing.assert_array_equal(outs[0], x[1:4, 2:])
    for got, ref in zip(outs[1:4], np.split(x, [1, 3], axis=1), strict=False):
        np.testing.assert_array_equal(got, ref)
    for got, ref in zip(outs[4:6], np.split(x, 2, axis=1), strict=False):
        np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(outs[6], np.pad(x, [(1, 2), (0, 1)], constant_values=-1))
    np.testing.assert_array_equal(outs[7], np.pad(x, [(0, 0), (2, 1)], mode="reflect"))
    np.testing.assert_array_equal(outs[8], np.pad(x, [(1, 1), (2, 0)], mode="edge"))


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_gathers(dtype: str) -> None:
    x = rand((4, 5, 3), DTYPES[dtype][0], seed=2)
    idx = np.array([[3, 0], [-1, 2]], np.int32)
    along = np.array([[[0, 1, 2]] * 5, [[2, 2, 0]] * 5], np.int32)  # (2,5,3)
    nd = np.array([[0, 1], [3, 4], [-1, 0]], np.int32)

    def build(x, idx, along, nd):  # type: ignore[no-untyped-def]
        return [mb.gather(x=x, indices=idx, axis=1), mb.gather_along_axis(x=x, indices=along, axis=0),
                mb.gather_nd(x=x, indices=nd)]

    outs = list(run_program(build, {"x": x, "idx": idx, "along": along, "nd": nd}, opset=None).values())
    np.testing.assert_array_equal(outs[0], np.take(x, np.where(idx < 0, idx + 5, idx), axis=1))
    np.testing.assert_array_equal(outs[1], np.take_along_axis(x, along, axis=0))
    np.testing.assert_array_equal(outs[2], np.stack([x[0, 1], x[3, 4], x[3, 0]]))


def test_gather_batch_dims_by_hand() -> None:
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    idx = np.array([[2, 0], [1, 1]], np.int32)
    got = one(lambda x, idx: mb.gather(x=x, indices=idx, axis=1, batch_dims=1), {"x": x, "idx": idx})
    np.testing.assert_array_equal(got, np.stack([x[0][[2, 0]], x[1][[1, 1]]]))


@pytest.mark.parametrize("mode", ["update", "add", "mul", "max"])
def test_scatters(mode: str) -> None:
    data = rand((4, 3), seed=3)
    upd = rand((2, 3), seed=4)
    idx = np.array([2, 0], np.int32)
    got = one(lambda d, u, i: mb.scatter(data=d, indices=i, updates=u, axis=0, mode=mode),
              {"d": data, "u": upd, "i": idx})
    ref = data.copy()
    for k, row in enumerate(idx):
        ref[row] = {"update": upd[k], "add": ref[row] + upd[k], "mul": ref[row] * upd[k],
                    "max": np.maximum(ref[row], upd[k])}[mode]
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    nd_idx = np.array([[1, 2], [3, 0]], np.int32)
    nd_upd = np.array([5.0, 7.0], np.float32)
    got_nd = one(lambda d, u, i: mb.scatter_nd(data=d, indices=i, updates=u, mode="add"),
                 {"d": data, "u": nd_upd, "i": nd_idx})
    ref_nd = data.copy()
    ref_nd[1, 2] += 5
    ref_nd[3, 0] += 7
    np.testing.assert_allclose(got_nd, ref_nd, rtol=1e-6)


def test_builders_and_shape_ops() -> None:
    x = rand((3, 4), seed=5)
    n = np.array([7], np.int32)

    def build(x, n):  # type: ignore[no-untyped-def]
        end = mb.squeeze(x=n)
        return [mb.range_1d(start=1, end=end, step=2), mb.fill(shape=mb.shape(x=x), value=2.5), mb.shape(x=x),
                mb.band_part(x=x, lower=1, upper=0), mb.band_part(x=x, lower=0, upper=-1),
                mb.cumsum(x=x, axis=1), mb.cumsum(x=x, axis=0, exclusive=True, reverse=True),
                mb.one_hot(indices=mb.cast(x=n, dtype="int32"), one_hot_vector_size=9)]

    outs = list(run_program(build, {"x": x, "n": n}).values())
    np.testing.assert_array_equal(outs[0], [1, 3, 5])
    np.testing.assert_array_equal(outs[1], np.full((3, 4), 2.5))
    np.testing.assert_array_equal(outs[2], [3, 4])
    i, j = np.indices((3, 4))
    np.testing.assert_array_equal(outs[3], np.where((i - j <= 1) & (j - i <= 0), x, 0))
    np.testing.assert_array_equal(outs[4], np.triu(x))
    np.testing.assert_allclose(outs[5], np.cumsum(x, axis=1), rtol=1e-6)
    rev_excl = np.flip(np.cumsum(np.flip(x, 0), 0) - np.flip(x, 0), 0)
    np.testing.assert_allclose(outs[6], rev_excl, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outs[7], np.eye(9)[[7]])


def test_topk_and_argsort() -> None:
    x = np.array([[3.0, 1.0, 4.0, 1.0, 5.0], [9.0, 2.0, 6.0, 5.0, 3.0]], np.float32)

    def build(x):  # type: ignore[no-untyped-def]
        v, i = mb.topk(x=x, k=3, axis=-1)
        return [v, i, mb.argsort(x=x, axis=-1, ascending=True)]

    v, i, s = run_program(build, {"x": x}).values()
    np.testing.assert_array_equal(v, [[5, 4, 3], [9, 6, 5]])
    np.testing.assert_array_equal(i, [[4, 2, 0], [0, 2, 3]])
    np.testing.assert_array_equal(s, np.argsort(x, axis=-1, kind="stable"))


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_scaled_dot_product_attention(mask_kind: str, dtype: str) -> None:
    np_t = DTYPES[dtype][0]
    q, k, v = rand((2, 3, 5, 8), np_t, seed=1), rand((2, 3, 6, 8), np_t, seed=2), rand((2, 3, 6, 4), np_t, seed=3)
    inputs = {"q": q, "k": k, "v": v}
    causal = np.tril(np.ones((5, 6), bool), k=1)
    if mask_kind == "bool":
        inputs["m"] = causal
    elif mask_kind == "float":
        inputs["m"] = np.where(causal, 0, -1e4).astype(np_t)

    def build(**kw):  # type: ignore[no-untyped-def]
        return mb.scaled_dot_product_attention(query=kw["q"], key=kw["k"], value=kw["v"], attn_mask=kw.get("m"))

    got = one(build, inputs)
    qd, kd, vd = (a.astype(np.float64) for a in (q, k, v))
    s = qd @ np.swapaxes(kd, -1, -2) / np.sqrt(8)
    if mask_kind != "none":
        s = np.where(causal, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    tol = {"fp16": 5e-3, "fp32": 1e-5}[dtype]
    np.testing.assert_allclose(got.astype(np.float64), p @ vd, rtol=tol, atol=tol)


def test_space_depth_moves_against_onnx() -> None:
    from tests.executor._helpers import onnx_ref

    x = rand((1, 8, 2, 3), seed=1)
    d2s = one(lambda x: mb.depth_to_space(x=x, block_size=2), {"x": x})
    (ref,) = onnx_ref("DepthToSpace", [x], {"blocksize": 2, "mode": "DCR"})
    np.testing.assert_array_equal(d2s, ref)
    ps = one(lambda x: mb.pixel_shuffle(x=x, upscale_factor=2), {"x": x})
    (ref_crd,) = onnx_ref("DepthToSpace", [x], {"blocksize": 2, "mode": "CRD"})
    np.testing.assert_array_equal(ps, ref_crd)
    y = rand((1, 2, 4, 6), seed=2)
    s2d = one(lambda x: mb.space_to_depth(x=x, block_size=2), {"x": y})
    (ref_s2d,) = onnx_ref("SpaceToDepth", [y], {"blocksize": 2})
    np.testing.assert_array_equal(s2d, ref_s2d)


def test_cond_and_while_loop() -> None:
    """Nested blocks: cond picks a branch at run time; while_loop doubles x until its sum exceeds 100."""
    x = np.array([1.0, 2.0], np.float32)

    def build(x):  # type: ignore[no-untyped-def]
        total = mb.reduce_sum(x=x)
        branch = mb.cond(pred=mb.greater(x=total, y=2.0), _true_fn=lambda: mb.mul(x=x, y=10.0),
                         _false_fn=lambda: mb.sub(x=x, y=1.0))
        looped = mb.while_loop(_cond=lambda v: mb.less(x=mb.reduce_sum(x=v), y=100.0),
                               _body=lambda v: (mb.mul(x=v, y=2.0),), loop_vars=(x,))
        return [branch, looped[0] if isinstance(looped, (list, tuple)) else looped]

    branch, looped = run_program(build, {"x": x}).values()
    np.testing.assert_array_equal(branch, [10.0, 20.0])  # sum 3 > 2
    np.testing.assert_array_equal(looped, [64.0, 128.0])  # 3 * 2^6 = 192 >= 100, 3 * 2^5 = 96 < 100
    branch, _ = run_program(build, {"x": np.array([0.5, 1.0], np.float32)}).values()
    np.testing.assert_array_equal(branch, [-0.5, 0.0])
