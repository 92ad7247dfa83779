"""fp16 weights kept at 2 bytes in the executor (``executor/half.py``): products and row gathers.

Oracles: numpy on the float32 widening of the same fp16 values (``astype`` is exact): the few-rows
kernel's defined order (a float32 running sum over k = 0..K-1, ``np.add.accumulate``) bit for bit,
numpy's BLAS product within float32 rounding, and exact row selection.
"""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_coreml.executor import half
from bitnet_coreml.executor.half import HalfWeight
from tests.executor._helpers import MB, ReferenceExecutor, build_program

mb = MB


def _weight(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float16)
    # the fp16 edge values: subnormals (smallest and largest), signed zeros, the largest finite, tiny normals
    edge = np.array([2.0**-24, -(2.0**-24), 2.0**-14 - 2.0**-24, 0.0, -0.0, 65504.0, -2.0**-14, 1.0],
                    dtype=np.float16)
    w[0, : edge.size] = edge
    w[-1, -edge.size:] = edge[::-1]
    return w


def _sequential(x: np.ndarray, w32: np.ndarray) -> np.ndarray:
    """The kernel's definition in numpy: per output, float32 running sum of x[k] * w[k] for k = 0..K-1."""
    prods = x[:, None, :].astype(np.float32) * w32[None, :, :]  # exact: fp16 x fp16 fits float32
    return np.add.accumulate(prods, axis=2, dtype=np.float32)[:, :, -1]


@pytest.mark.parametrize(("rows", "k"), [(1, 96), (2, 96), (5, 96), (8, 96), (1, 101), (3, 13)])
def test_few_rows_are_the_sequential_float32_sum(rows: int, k: int) -> None:
    rng = np.random.default_rng(rows)
    n = 130  # not a multiple of the 64-row block: padding must not show; k: 8-row steps and a remainder
    w = _weight(rng, n, k)
    x = rng.uniform(-3, 3, size=(rows, k)).astype(np.float16).astype(np.float32)  # fp16 activations
    got = half.matmul_t(x, HalfWeight(w))
    assert got.dtype == np.float32 and got.shape == (rows, n)
    want = _sequential(x, w.astype(np.float32))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, x @ w.astype(np.float32).T, rtol=1e-5, atol=1e-4)


def test_inf_and_nan_weights_propagate() -> None:
    w = np.ones((3, 8), np.float16)
    w[1, 2] = np.inf
    w[2, 5] = np.nan
    x = np.ones((1, 8), np.float32)
    got = half.matmul_t(x, HalfWeight(w))
    assert got[0, 0] == 8.0 and np.isposinf(got[0, 1]) and np.isnan(got[0, 2])


def test_many_rows_match_blas_on_the_widened_weight() -> None:
    rng = np.random.default_rng(9)
    w = _weight(rng, 200, 64)
    x = rng.standard_normal((2, 20, 64)).astype(np.float32)  # 40 rows: widened blocks + BLAS
    got = half.matmul_t(x, HalfWeight(w))
    assert got.shape == (2, 20, 200)
    np.testing.assert_allclose(got, x @ w.astype(np.float32).T, rtol=1e-6, atol=1e-5)


def test_rows_dense_and_refusals() -> None:
    rng = np.random.default_rng(4)
    w = _weight(rng, 70, 16)
    hw = HalfWeight(w)
    idx = np.array([[0, 69], [5, 5]])
    np.testing.assert_array_equal(hw.rows(idx), w.astype(np.float32)[idx])
    np.testing.assert_array_equal(hw.dense(), w.astype(np.float32))
    assert hw.nbytes == 2 * 64 * 16 * 2  # two 64-row blocks of fp16: no float32 copy
    with pytest.raises(ValueError, match="float16"):
        HalfWeight(w.astype(np.float32))
    with pytest.raises(ValueError, match="needs 16"):
        half.matmul_t(np.ones((1, 15), np.float32), hw)


def test_tied_embedding_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """gather + lm_head on one fp16 table: kept at 2 bytes, results are the package's fp16 arithmetic."""
    from coremltools.converters.mil.mil import types

    import bitnet_coreml.executor.ops.linear as linear_ops

    calls = []
    real = linear_ops.matmul_t

    def spy(x: np.ndarray, w: object) -> np.ndarray:
        calls.append(type(w).__name__)
        return real(x, w)

    monkeypatch.setattr(linear_ops, "matmul_t", spy)
    rng = np.random.default_rng(11)
    v, d = 1100, 480  # 1,056,000 bytes of fp16: over half.MIN_BYTES
    table = _weight(rng, v, d)
    assert table.nbytes >= half.MIN_BYTES

    def build(ids):  # type: ignore[no-untyped-def]
        w = mb.const(val=table)
        h = mb.gather(x=w, indices=ids, axis=0)  # [1, 3, d] fp16
        h = mb.mul(x=h, y=np.float16(3.0))
        logits = mb.matmul(x=h, y=w, transpose_y=True)  # [1, 3, v]
        logits_1 = mb.linear(x=mb.slice_by_index(x=h, begin=[0, 2, 0], end=[1, 3, d]), weight=w)
        other = mb.reduce_sum(x=mb.transpose(x=w, perm=[1, 0]), axes=[1])  # a consumer that needs it dense
        return logits, logits_1, mb.cast(x=other, dtype="fp32")

    ids = np.array([[3, 7, 1098]], np.int32)  # (rows 0 and 1099 hold 65504: x3 would overflow)
    prog = build_program(build, {"ids": ids})
    assert types.builtin_to_string(prog.functions["main"].outputs[0].dtype) == "fp16"
    ex = ReferenceExecutor(prog)
    out = list(ex.predict({"ids": ids}).values())
    h = (table.astype(np.float32)[ids[0]] * np.float32(3.0)).astype(np.float16).astype(np.float32)
    w32 = table.astype(np.float32)
    np.testing.assert_array_equal(out[0][0], _sequential(h, w32).astype(np.float16))  # 3 rows: the kernel
    np.testing.assert_array_equal(out[1][0], _sequential(h[2:], w32).astype(np.float16))
    np.testing.assert_allclose(out[2], w32.sum(axis=0), rtol=2e-3, atol=2e-3)
    assert calls == ["HalfWeight", "HalfWeight"]
