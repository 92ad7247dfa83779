"""BitLinear / RMSNorm / Relu2 lowerings and the 2-bit packer against independent oracles."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from bitnet_coreml._quiet import coremltools
from bitnet_coreml.errors import InputError
from bitnet_coreml.lower.bitnet import pack_ternary_2bit
from bitnet_coreml.lower.program import BuildOptions, build_program, convert_program
from tests.convert.graphs import FusedGraph, chain_model, np_bitlinear, np_chain, np_rmsnorm, ternary
from tests.convert.mil_eval import evaluate

ct = coremltools()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("shape", [(4, 8), (3, 5), (1, 1), (7, 13), (64, 96)])
def test_packer_matches_coremltools_decompression(shape: tuple[int, int]) -> None:
    from coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops import constexpr_lut_to_dense

    codes = np.random.default_rng(sum(shape)).integers(-1, 2, shape).astype(np.int8)
    packed = pack_ternary_2bit(codes)
    assert packed.dtype == np.uint8 and packed.size == -(-codes.size // 4)
    lut = np.array([-1, 0, 1, 0], np.float32)
    dense = constexpr_lut_to_dense.decompress(lut, packed, np.array(shape, np.uint32))
    np.testing.assert_array_equal(dense, codes.astype(np.float32))


def test_packer_bit_order_by_hand() -> None:
    # codes 1,0,-1,1 -> indices 2,1,0,2 -> 0b10_00_01_10 (element 0 in the low bits)
    assert pack_ternary_2bit(np.array([1, 0, -1, 1, 0], np.int8)).tolist() == [0b10000110, 0b01]


def test_packer_large_weight_in_chunks() -> None:
    from coremltools.optimize._utils import restore_elements_from_packed_bits

    codes = np.random.default_rng(0).integers(-1, 2, (2048, 4100)).astype(np.int8)  # > one 16 MB chunk
    idx = restore_elements_from_packed_bits(pack_ternary_2bit(codes), 2, codes.size)
    np.testing.assert_array_equal(idx.astype(np.int16) - 1, codes.reshape(-1))


@pytest.mark.parametrize("per_channel", [False, True])
def test_chain_fp32_program_matches_numpy_and_ort(per_channel: bool) -> None:
    m, p = chain_model(seed=3, per_channel=per_channel)
    x = np.random.default_rng(1).standard_normal((1, 8, 32)).astype(np.float32)
    want = np_chain(x, p)
    ort_y = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    built = build_program(ir.serde.deserialize_model(m), BuildOptions(precision="fp32"))
    got = next(iter(evaluate(built.program, {"x": x}).values()))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-5 * scale
    assert np.abs(got - ort_y).max() <= 1e-5 * scale


@pytest.mark.parametrize("per_channel", [False, True])
def test_chain_fp16_converted_program_close(per_channel: bool) -> None:
    m, p = chain_model(seed=4, per_channel=per_channel)
    x = np.random.default_rng(2).standard_normal((1, 8, 32)).astype(np.float32)
    built = build_program(ir.serde.deserialize_model(m), BuildOptions())
    mlmodel = convert_program(built, "fp16")
    got = next(iter(evaluate(mlmodel._mil_program, {"x": x}).values()))
    assert np.isfinite(got).all()
    assert _cos(got, np_chain(x, p)) >= 0.999


def test_bitlinear_exact_ties_round_to_even() -> None:
    # X rows whose scaled values land exactly on .5: x*127/m with m = 127*2 -> x/2
    g = FusedGraph()
    w = np.eye(8, dtype=np.int8)
    y = g.bitlinear("x", w, np.float32(1.0))
    m = g.model([("x", [1, 8])], [(y, [1, 8])])
    x = np.array([[1.0, 3.0, 5.0, -1.0, -3.0, 7.0, 0.0, 254.0]], np.float32)  # m = 254 -> x*0.5
    got = next(iter(evaluate(build_program(ir.serde.deserialize_model(m), BuildOptions("fp32")).program,
                             {"x": x}).values()))
    # round-half-even(0.5, 1.5, 2.5, -0.5, -1.5, 3.5, 0, 127) = 0, 2, 2, -0, -2, 4, 0, 127; then * m/127
    np.testing.assert_allclose(got, np.array([[0, 2, 2, 0, -2, 4, 0, 127]]) * 2.0, rtol=1e-6)
    np.testing.assert_allclose(got, np_bitlinear(x, w, 1.0), rtol=1e-6)


def test_no_dense_copy_of_ternary_weights() -> None:
    m, _ = chain_model(seed=5, d=64, n=96)
    built = build_program(ir.serde.deserialize_model(m), BuildOptions())
    mlmodel = convert_program(built, "fp16")
    ops = list(mlmodel._mil_program.functions["main"].operations)
    luts = [op for op in ops if op.op_type == "constexpr_lut_to_dense"]
    assert len(luts) == 2
    assert sorted(op.indices.val.size for op in luts) == [64 * 96 // 4] * 2
    for op in ops:  # no float constant as large as a weight anywhere
        if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray):
            assert op.outputs[0].val.size < 64 * 96


def test_rmsnorm_large_inputs_stay_finite_in_fp16() -> None:
    rng = np.random.default_rng(0)
    g = FusedGraph()
    gamma = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    y = g.rmsnorm("x", gamma)
    m = g.model([("x", [1, 4, 64])], [(y, [1, 4, 64])])
    x = (rng.standard_normal((1, 4, 64)) * 3000).astype(np.float32)  # x^2 ~ 1e7 overflows fp16
    mlmodel = convert_program(build_program(ir.serde.deserialize_model(m), BuildOptions()), "fp16")
    got = next(iter(evaluate(mlmodel._mil_program, {"x": x}).values()))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np_rmsnorm(x, gamma), rtol=5e-3, atol=5e-3)


def test_bitlinear_zero_and_tiny_rows_in_fp16() -> None:
    # An all-zero activation row (e.g. every relu2 gate <= 0) has m = eps: Qp/eps = 1.27e7 is inf in
    # fp16 and 0 * inf = NaN; a row with max-abs < Qp/65504 would saturate every code. Torch gives 0 /
    # the true quantisation.
    g = FusedGraph()
    w = ternary(np.random.default_rng(0), 16, 32)
    y = g.bitlinear("x", w, np.float32(0.05))
    m = g.model([("x", [1, 3, 32])], [(y, [1, 3, 16])])
    x = np.random.default_rng(1).standard_normal((1, 3, 32)).astype(np.float32)
    x[0, 0] = 0.0
    x[0, 1] *= 1e-4
    mlmodel = convert_program(build_program(ir.serde.deserialize_model(m), BuildOptions()), "fp16")
    got = next(iter(evaluate(mlmodel._mil_program, {"x": x}).values()))
    want = np_bitlinear(x, w, 0.05)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[0, 0], 0.0)
    for row in (1, 2):
        assert np.abs(got[0, row] - want[0, row]).max() <= 2e-2 * np.abs(want[0, row]).max()


def test_non_ternary_codes_rejected() -> None:
    g = FusedGraph()
    w = ternary(np.random.default_rng(0), 4, 8)
    w[0, 0] = 2
    y = g.bitlinear("x", w, np.float32(1.0))
    m = g.model([("x", [1, 8])], [(y, [1, 4])])
    with pytest.raises(InputError, match=r"\{-1, 0, 1\}.*\[-1, 2\]"):
        build_program(ir.serde.deserialize_model(m), BuildOptions())
