"""Elementwise ops, activations and the fp16 storage rule, against numpy / math written from the MIL spec."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.executor._helpers import DTYPES, MB, TOL, one, rand

mb = MB
SHAPES = [(5,), (2, 3), (2, 3, 4)]

_erf = np.vectorize(math.erf)

UNARY = {
    "abs": (np.abs, (-2, 2)),
    "ceil": (np.ceil, (-2, 2)),
    "floor": (np.floor, (-2, 2)),
    "exp": (np.exp, (-2, 2)),
    "exp2": (np.exp2, (-2, 2)),
    "sqrt": (np.sqrt, (0.1, 4)),
    "sin": (np.sin, (-3, 3)),
    "cos": (np.cos, (-3, 3)),
    "tan": (np.tan, (-1, 1)),
    "tanh": (np.tanh, (-3, 3)),
    "atan": (np.arctan, (-3, 3)),
    "asin": (np.arcsin, (-0.9, 0.9)),
    "acos": (np.arccos, (-0.9, 0.9)),
    "sinh": (np.sinh, (-2, 2)),
    "cosh": (np.cosh, (-2, 2)),
    "atanh": (np.arctanh, (-0.9, 0.9)),
    "sign": (np.sign, (-2, 2)),
    "square": (np.square, (-2, 2)),
    "erf": (_erf, (-3, 3)),
    "relu": (lambda x: np.maximum(x, 0), (-2, 2)),
    "sigmoid": (lambda x: 1 / (1 + np.exp(-x)), (-4, 4)),
    "silu": (lambda x: x / (1 + np.exp(-x)), (-4, 4)),
    "softplus": (lambda x: np.log1p(np.exp(x)), (-4, 4)),
    "softsign": (lambda x: x / (1 + np.abs(x)), (-4, 4)),
    "relu6": (lambda x: np.clip(x, 0, 6), (-8, 8)),
}


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary(op: str, shape: tuple[int, ...], dtype: str) -> None:
    ref, (lo, hi) = UNARY[op]
    x = rand(shape, DTYPES[dtype][0], seed=len(op), lo=lo, hi=hi)
    got = one(lambda x: getattr(mb, op)(x=x), {"x": x})
    assert got.dtype == DTYPES[dtype][0]
    np.testing.assert_allclose(got.astype(np.float64), ref(x.astype(np.float64)), **TOL[dtype])


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("mode", ["EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION"])
def test_gelu_modes(mode: str, dtype: str) -> None:
    x = rand((3, 7), DTYPES[dtype][0], seed=3, lo=-5, hi=5).astype(np.float64)
    x = x.astype(DTYPES[dtype][0])
    xd = x.astype(np.float64)
    ref = {
        "EXACT": 0.5 * xd * (1 + _erf(xd / math.sqrt(2))),
        "TANH_APPROXIMATION": 0.5 * xd * (1 + np.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd**3))),
        "SIGMOID_APPROXIMATION": xd / (1 + np.exp(-1.702 * xd)),
    }[mode]
    got = one(lambda x: mb.gelu(x=x, mode=mode), {"x": x})
    np.testing.assert_allclose(got.astype(np.float64), ref, **TOL[dtype])


BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide,
    "maximum": np.maximum, "minimum": np.minimum, "pow": np.power, "floor_div": np.floor_divide,
}


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("shapes", [((2, 3), (2, 3)), ((2, 3), (3,)), ((4, 1, 3), (1, 5, 1))])
@pytest.mark.parametrize("op", sorted(BINARY))
def test_binary_broadcast(op: str, shapes: tuple[tuple[int, ...], tuple[int, ...]], dtype: str) -> None:
    np_t = DTYPES[dtype][0]
    x = rand(shapes[0], np_t, seed=1, lo=0.5, hi=2)
    y = rand(shapes[1], np_t, seed=2, lo=0.5, hi=2)
    got = one(lambda x, y: getattr(mb, op)(x=x, y=y), {"x": x, "y": y})
    np.testing.assert_allclose(got.astype(np.float64), BINARY[op](x.astype(np.float64), y.astype(np.float64)),
                               **TOL[dtype])


@pytest.mark.parametrize("op,ref", [("equal", np.equal), ("not_equal", np.not_equal), ("greater", np.greater),
                                    ("greater_equal", np.greater_equal), ("less", np.less),
                                    ("less_equal", np.less_equal)])
def test_comparisons(op: str, ref: object) -> None:
    x = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    y = np.array([3, 2, 1], np.float32)
    got = one(lambda x, y: getattr(mb, op)(x=x, y=y), {"x": x, "y": y})
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, ref(x, y))  # type: ignore[operator]


def test_logic_and_select() -> None:
    a = np.array([True, True, False, False])
    b = np.array([True, False, True, False])
    x = np.array([1, 2, 3, 4], np.float32)
    y = np.array([10, 20, 30, 40], np.float32)

    def build(a, b, x, y):  # type: ignore[no-untyped-def]
        return [mb.logical_and(x=a, y=b), mb.logical_or(x=a, y=b), mb.logical_xor(x=a, y=b),
                mb.logical_not(x=a), mb.select(cond=a, a=x, b=y)]

    from tests.executor._helpers import run_program

    outs = list(run_program(build, {"a": a, "b": b, "x": x, "y": y}).values())
    np.testing.assert_array_equal(outs[0], [True, False, False, False])
    np.testing.assert_array_equal(outs[1], [True, True, True, False])
    np.testing.assert_array_equal(outs[2], [False, True, True, False])
    np.testing.assert_array_equal(outs[3], [False, False, True, True])
    np.testing.assert_array_equal(outs[4], [1, 2, 30, 40])


def test_cast_round_trip_and_truncation() -> None:
    x = np.array([-2.7, -0.5, 0.5, 2.7, 70000.0], np.float32)
    got_i = one(lambda x: mb.cast(x=x, dtype="int32"), {"x": x})
    np.testing.assert_array_equal(got_i, [-2, 0, 0, 2, 70000])  # toward zero
    got_h = one(lambda x: mb.cast(x=x, dtype="fp16"), {"x": x})
    assert got_h.dtype == np.float16
    assert np.isinf(got_h[-1])  # 70000 > fp16 max 65504
    np.testing.assert_array_equal(one(lambda x: mb.cast(x=x, dtype="bool"), {"x": x}), [1, 1, 1, 1, 1])


def test_round_is_half_to_even() -> None:
    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 2.6], np.float32)
    np.testing.assert_array_equal(one(lambda x: mb.round(x=x), {"x": x}), [-2, -2, -0, 0, 2, 2, 3])


def test_fp16_overflow_shows_and_fp32_switch_hides_it() -> None:
    """relu(x)^2 of 300 overflows fp16 (max 65504) as on device; fp32=True computes 90000."""
    x = np.array([300.0, 2.0], np.float16)

    def build(x):  # type: ignore[no-untyped-def]
        r = mb.relu(x=x)
        return mb.mul(x=r, y=r)

    from tests.executor._helpers import ReferenceExecutor, build_program

    prog = build_program(build, {"x": x})
    on_device = ReferenceExecutor(prog).predict({"x": x})
    diag = ReferenceExecutor(prog, fp32=True).predict({"x": x})
    (a,), (b,) = on_device.values(), diag.values()
    assert a.dtype == np.float16 and np.isinf(a[0]) and a[1] == 4
    assert b.dtype == np.float32 and b[0] == 90000.0


def test_fp16_rounding_after_every_op() -> None:
    """(x + 1e-4) - x is 0 in fp16 storage (1 + 1e-4 rounds to 1) but 1e-4 in fp32."""
    x = np.array([1.0], np.float16)

    def build(x):  # type: ignore[no-untyped-def]
        return mb.sub(x=mb.add(x=x, y=np.float16(1e-4)), y=x)

    assert one(build, {"x": x})[0] == 0.0
    assert one(build, {"x": x}, fp32=True)[0] == pytest.approx(1e-4, rel=1e-2)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_parametric_activations(dtype: str) -> None:
    np_t = DTYPES[dtype][0]
    x = rand((1, 3, 2, 2), np_t, seed=5, lo=-3, hi=3)
    xd = x.astype(np.float64)
    alpha = np.array([0.1, 0.2, 0.3], np_t)
    cases = {
        "leaky": (lambda x: mb.leaky_relu(x=x, alpha=0.2), np.where(xd >= 0, xd, 0.2 * xd)),
        "elu": (lambda x: mb.elu(x=x, alpha=1.5), np.where(xd > 0, xd, 1.5 * (np.exp(xd) - 1))),
        "prelu": (lambda x: mb.prelu(x=x, alpha=alpha),
                  np.where(xd >= 0, xd, xd * alpha.astype(np.float64).reshape(1, 3, 1, 1))),
        "clip": (lambda x: mb.clip(x=x, alpha=np_t(-1), beta=np_t(1)), np.clip(xd, -1, 1)),
        "hard_sigmoid": (lambda x: mb.sigmoid_hard(x=x, alpha=0.2, beta=0.5), np.clip(0.2 * xd + 0.5, 0, 1)),
        "thresholded": (lambda x: mb.thresholded_relu(x=x, alpha=1.0), np.where(xd >= 1.0, xd, 0)),
        "scaled_tanh": (lambda x: mb.scaled_tanh(x=x, alpha=2.0, beta=0.5), 2 * np.tanh(0.5 * xd)),
    }
    for name, (build, ref) in cases.items():
        got = one(build, {"x": x})
        np.testing.assert_allclose(got.astype(np.float64), ref, **TOL[dtype], err_msg=name)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_against_onnx(axis: int, dtype: str) -> None:
    from tests.executor._helpers import onnx_ref

    x = rand((3, 4, 5), DTYPES[dtype][0], seed=9, lo=-6, hi=6)
    (ref,) = onnx_ref("Softmax", [x.astype(np.float32)], {"axis": axis})
    got = one(lambda x: mb.softmax(x=x, axis=axis), {"x": x})
    np.testing.assert_allclose(got.astype(np.float64), ref, **TOL[dtype])


def test_cast_to_fp16_leaves_its_fp32_input_alone() -> None:
    """cast returns its input array for the executor to round; the rounding must not happen in the
    input's memory, which other ops still read at full precision."""
    x = np.array([1 + 2**-12, 3.0001, -7.00001, 1e-6], np.float32)

    def build(x):  # type: ignore[no-untyped-def]
        h = mb.cast(x=mb.cast(x=x, dtype="fp16"), dtype="fp32")
        return mb.sub(x=x, y=h)  # x - fp16(x): the rounding error, in fp32

    expect = x - x.astype(np.float16).astype(np.float32)
    got = one(build, {"x": x})
    np.testing.assert_array_equal(got, expect)
    assert np.any(got != 0)


def test_casts_into_fp16_round_unless_exact() -> None:
    """int32 -> fp16 rounds (2049 is not an fp16 value); int8 -> fp16 is exact and skips rounding."""
    i32 = np.array([2049, 4097, 7, -65519, 70000], np.int32)
    got = one(lambda x: mb.cast(x=x, dtype="fp16"), {"x": i32})
    np.testing.assert_array_equal(got, i32.astype(np.float16))
    i8 = np.array([-128, -1, 0, 127], np.int8)
    np.testing.assert_array_equal(one(lambda x: mb.cast(x=x, dtype="fp16"), {"x": i8}), i8.astype(np.float16))


def test_value_preserving_ops_skip_rounding_only_on_fp16_inputs() -> None:
    """The compiler marks reshape/relu/max of fp16 values as exact (no second rounding) but still
    rounds arithmetic (mul) and casts from wider types; the results match numpy either way."""
    from tests.executor._helpers import ReferenceExecutor, build_program

    x = rand((4, 6), np.float16, seed=3)

    def build(x):  # type: ignore[no-untyped-def]
        r = mb.relu(x=mb.reshape(x=x, shape=[6, 4]))
        m = mb.mul(x=r, y=np.float16(1.1))
        w = mb.cast(x=mb.cast(x=m, dtype="fp32"), dtype="fp16")
        return mb.reduce_max(x=w, axes=[1], keep_dims=False)

    ex = ReferenceExecutor(build_program(build, {"x": x}))
    rounded = {s.ctx.op_type: s.out_dtypes[0] for s in ex._block.steps}
    assert rounded["reshape"] == np.float32 and rounded["relu"] == np.float32  # exact: fp16 in, fp16 values out
    assert rounded["reduce_max"] == np.float32
    assert rounded["mul"] == np.float16
    casts = [s.out_dtypes[0] for s in ex._block.steps if s.ctx.op_type == "cast"]
    assert casts == [np.float32, np.float16]  # fp32 -> fp16 rounds
    r = np.maximum(x.astype(np.float32).reshape(6, 4), 0)
    m = (r * np.float32(np.float16(1.1))).astype(np.float16)
    np.testing.assert_array_equal(ex.predict({"x": x})[next(iter(ex.output_names))], m.max(axis=1))
