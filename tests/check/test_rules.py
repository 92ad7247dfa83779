"""Every rule on both sides of its threshold, with small graphs built in code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bitnet_coreml.check import Target, load_capabilities, nodes_needing_split, run_check
from bitnet_coreml.check.rules import RULES, expected_units
from bitnet_coreml.errors import CheckFailedError, InputError
from tests.check.graphs import GraphBuilder, tiny_lm


def _rules(report, rule: str) -> list:  # type: ignore[no-untyped-def]
    return [f for f in report.violations + report.warnings + report.fixed if f.rule == rule]


def _add_const(shape: list[int], value: float | None = None, *, dims: list[int | str] | None = None):  # type: ignore[no-untyped-def]
    b = GraphBuilder()
    x = b.input("x", dims or shape)
    arr = np.full(shape, value, np.float32) if value is not None else np.zeros(shape, np.float32)
    return b.output(b.node("Add", [x, b.init(arr, "c")], dims or shape))


def _bitlinear(n: int, k: int, per_channel: bool = False):  # type: ignore[no-untyped-def]
    b = GraphBuilder()
    x = b.input("x", [1, k])
    return b.output(b.bitlinear(x, n, k, per_channel=per_channel))


def _caps(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "caps.toml"
    p.write_text(text)
    return p


def test_registry_refuses_duplicates() -> None:
    from bitnet_coreml.check.rules import rule

    with pytest.raises(RuntimeError, match="duplicate check rule 'package_size'"):
        rule("package_size", "again")(lambda ctx: iter(()))
    assert {"package_size", "ane_size_budget", "dim_over_16384", "rank_over_5", "lut_bits", "min_os_features",
            "fp16_range", "int8_compute", "flexible_shape", "conv_limits", "gpu_memory"} <= set(RULES)


# --- size gate -----------------------------------------------------------------------------------


def test_size_gate_2bit_vs_fp16_with_a_1mb_user_limit(tmp_path: Path) -> None:
    """3M ternary parameters: 750,000 B at 2 bits fits 1 MB; the same weights in fp16 (6 MB) do not."""
    db = load_capabilities(_caps(tmp_path, "[limits.package_bytes]\nios = 1000000\nmacos = 1000000\nsource = 'test'\n"))
    ternary = _bitlinear(3000, 1000)
    r = run_check(ternary, Target("ios"), db=db)
    # hand-computed weight.bin: 64 B file header + 64 B blob metadata + 3e6*2/8 B indices (scalar Alpha inlined)
    assert r.size.total_bytes == 64 + 64 + 750_000
    assert r.ok and not _rules(r, "package_size")
    # the same 3M parameters as an unfused fp16 MatMul weight
    b = GraphBuilder()
    x = b.input("x", [1, 1000])
    w = b.init(np.random.default_rng(0).integers(-1, 2, (1000, 3000)).astype(np.float32), "w")
    fp16 = b.output(b.node("MatMul", [x, w], [1, 3000]))
    r2 = run_check(fp16, Target("ios"), db=db)
    assert r2.size.total_bytes == 64 + 64 + 6_000_000
    [f] = _rules(r2, "package_size")
    assert f.severity == "error" and f.actual == 6_000_128 and f.limit == 1_000_000
    assert not r2.ok and r2.exit_code == 1 and r2.score == 0.0
    with pytest.raises(CheckFailedError, match="package_size"):
        r2.raise_if_failed()


def test_package_limit_exact_boundary(tmp_path: Path) -> None:
    m = _bitlinear(3000, 1000)
    for limit, fails in ((750_128, False), (750_127, True)):
        db = load_capabilities(_caps(tmp_path, f"[limits.package_bytes]\nmacos = {limit}\nsource = 't'\n"))
        assert bool(_rules(run_check(m, Target("macos"), db=db), "package_size")) is fails


def test_bundled_limits_are_the_platform_limits() -> None:
    m = _bitlinear(64, 64)
    assert run_check(m, Target("ios")).target.package_limit_bytes == 1_000_000_000
    assert run_check(m, Target("macos")).target.package_limit_bytes == 2_147_483_648


# --- soft budgets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cols, warn", [(8191, False), (8192, True)])
def test_ane_generation_budget(tmp_path: Path, cols: int, warn: bool) -> None:
    # 64 x 8191 fp16 = 1,048,448 B + 128 B of headers = exactly the 1 MiB budget set for Gen 1
    db = load_capabilities(_caps(tmp_path, "[[ane_generation]]\nid = 1\nmodel_size_budget_mb = 1\nsource = 't'\n"))
    r = run_check(_add_const([64, cols]), Target("ios", "A11"), db=db)
    found = _rules(r, "ane_size_budget")
    assert bool(found) is warn
    assert r.ok  # soft: a warning, not a violation
    if warn:
        assert found[0].severity == "warning" and found[0].limit == 1 << 20
        assert r.score == pytest.approx((1 << 20) / r.size.total_bytes)  # s_size; f_ane = 1 (one Add on the ANE)
        assert not run_check(_add_const([64, cols]), Target("ios", "A11"), db=db, strict=True).ok


def test_ane_budget_uses_the_seed_value_for_a11() -> None:
    r = run_check(_add_const([64, 8]), Target("ios", "A11"))
    assert r.to_dict()["size"]["ane_budget_bytes"] == 16 * 2**20


@pytest.mark.parametrize("cols, warn", [(8191, False), (8192, True)])
def test_gpu_memory_of_the_device_matrix(tmp_path: Path, cols: int, warn: bool) -> None:
    db = load_capabilities(_caps(tmp_path, "[[device]]\nname = 'Apple M1'\nmemory_limit_mb = 1\nsource = 't'\n"))
    r = run_check(_add_const([64, cols]), Target("macos", "M1"), db=db)
    assert bool(_rules(r, "gpu_memory")) is warn


# --- dimensions, rank, channels ------------------------------------------------------------------------


def _embedding(vocab: int):  # type: ignore[no-untyped-def]
    b = GraphBuilder()
    ids = b.input("ids", [1, 4], __import__("onnx_ir").DataType.INT64)
    emb = b.init(np.zeros((vocab, 8), np.float32), "embed")
    return b.output(b.node("Gather", [emb, ids], [1, 4, 8], axis=0))


def test_vocabulary_over_16384_is_flagged_as_fixed_by_split() -> None:
    assert nodes_needing_split(_embedding(16384)) == []
    assert not _rules(run_check(_embedding(16384), Target("macos", "M1")), "dim_over_16384")
    m = _embedding(16385)
    [s] = nodes_needing_split(m)
    assert (s.op_type, s.input_index, s.axis, s.dim, s.chunks) == ("Gather", 0, 0, 16385, (8193, 8192))
    r = run_check(m, Target("macos", "M1"))
    [f] = _rules(r, "dim_over_16384")
    assert f.severity == "info" and f.fixed_by and "2 chunks" in f.fixed_by and r.ok
    assert f in r.fixed


def test_lm_head_over_16384_split_and_stays_on_ane() -> None:
    m = tiny_lm(vocab=32000)
    splits = nodes_needing_split(m)
    assert {(s.op_type, s.axis, s.dim) for s in splits} == {("Gather", 0, 32000), ("MatMul", 1, 32000)}
    units = {u.op_type: u for u in expected_units(m)}
    assert units["MatMul"].unit == "ANE" and "split" in units["MatMul"].reason
    assert units["Gather"].unit == "CPU"


@pytest.mark.parametrize("n, warn", [(16384, False), (16385, True)])
def test_unsplittable_dimension_leaves_the_ane(n: int, warn: bool) -> None:
    b = GraphBuilder()
    x = b.input("x", [1, n])
    m = b.output(b.node("Relu", [x], [1, n]))
    r = run_check(m, Target("macos"))
    found = _rules(r, "dim_over_16384")
    assert bool(found) is warn
    assert r.units[0].unit == ("GPU" if warn else "ANE")
    if warn:
        assert found[0].severity == "warning" and found[0].actual == n and found[0].fixed_by is None


@pytest.mark.parametrize("rank, error", [(5, False), (6, True)])
def test_rank(rank: int, error: bool) -> None:
    shape = [1] * (rank - 1) + [4]
    b = GraphBuilder()
    m = b.output(b.node("Relu", [b.input("x", shape)], shape))
    r = run_check(m, Target("macos"))
    found = _rules(r, "rank_over_5")
    assert bool(found) is error
    assert r.ok is not error
    if error:
        assert found[0].actual == 6 and found[0].limit == 5


def _conv(w_shape: list[int], dilations: list[int] | None = None):  # type: ignore[no-untyped-def]
    b = GraphBuilder()
    x = b.input("x", [1, w_shape[1], 1, 32])
    w = b.init(np.zeros(w_shape, np.float32), "w")
    attrs = {"dilations": dilations} if dilations else {}
    return b.output(b.node("Conv", [x, w], [1, w_shape[0], 1, 32 - w_shape[3] + 1], **attrs))


@pytest.mark.parametrize("cout, warn", [(65536, False), (65537, True)])
def test_conv_channels(cout: int, warn: bool) -> None:
    r = run_check(_conv([cout, 1, 1, 1]), Target("macos"))
    assert bool(_rules(r, "channels_over_65536")) is warn
    assert not _rules(r, "dim_over_16384")  # channel axes have their own limit
    assert r.units[0].unit == ("GPU" if warn else "ANE")


@pytest.mark.parametrize("kw, warn", [(13, False), (14, True)])
def test_conv_kernel_width(kw: int, warn: bool) -> None:
    r = run_check(_conv([4, 4, 1, kw]), Target("macos"))
    assert bool(_rules(r, "conv_kernel_width")) is warn
    assert r.units[0].unit == ("GPU" if warn else "ANE")


def test_dilated_conv_leaves_the_ane() -> None:
    assert run_check(_conv([4, 4, 1, 3], [1, 1]), Target("macos")).units[0].unit == "ANE"
    u = run_check(_conv([4, 4, 1, 3], [1, 2]), Target("macos")).units[0]
    assert u.unit == "GPU" and u.rule == "dilated_conv_gpu" and "hollance" in u.source


# --- data types, bits, shapes --------------------------------------------------------------------------


@pytest.mark.parametrize("bits, error", [(4, False), (6, False), (8, False), (3, True), (5, True), (7, True)])
def test_lut_bits(bits: int, error: bool) -> None:
    r = run_check(tiny_lm(), Target("ios", "A16"), embed_bits=bits)
    assert bool(_rules(r, "lut_bits")) is error


def _int8_matmul():  # type: ignore[no-untyped-def]
    b = GraphBuilder()
    import onnx_ir as ir

    x = b.input("x", [1, 8], ir.DataType.INT8)
    w = b.init(np.ones((8, 4), np.int8), "w")
    return b.output(b.node("MatMulInteger", [x, w], [1, 4], ir.DataType.INT32))


@pytest.mark.parametrize("target, warn", [(Target("ios", "A16"), True), (Target("ios", "A17Pro"), False),
                                          (Target("macos", "M3"), True), (Target("macos", "M4"), False),
                                          (Target("macos"), True)])
def test_int8_compute(target: Target, warn: bool) -> None:
    r = run_check(_int8_matmul(), target)
    assert bool(_rules(r, "int8_compute")) is warn


def test_flexible_shape() -> None:
    assert not _rules(run_check(_add_const([1, 8]), Target("macos")), "flexible_shape")
    r = run_check(_add_const([1, 8], dims=[1, "seq"]), Target("macos"))
    [f] = _rules(r, "flexible_shape")
    assert f.node == "x" and f.actual == [1, "seq"]
    assert r.units[0].unit == "GPU" and r.units[0].rule == "dynamic_shape_gpu"


@pytest.mark.parametrize("value, over", [(65504.0, False), (-65504.0, False), (70000.0, True), (-70000.0, True),
                                         (float("inf"), True)])
def test_fp16_overflow_constant(value: float, over: bool) -> None:
    m = _add_const([2, 8], value)
    r = run_check(m, Target("macos"))
    found = _rules(r, "fp16_overflow_constant")
    assert bool(found) is over
    with np.errstate(over="ignore"):  # oracle: numpy's own fp16 conversion overflows for these values
        assert bool(np.isinf(np.float16(value))) is over
    # the converter keeps the consumer in fp32: off the ANE, a warning, not a violation
    assert r.units[0].unit == ("GPU" if over else "ANE") and r.ok
    if over:
        assert found[0].severity == "warning" and "fp32" in found[0].message
    assert not _rules(run_check(m, Target("macos"), precision="fp32"), "fp16_overflow_constant")


def _masked_softmax(fill: float, consumer: str = "Softmax"):  # type: ignore[no-untyped-def]
    b = GraphBuilder()
    x = b.input("x", [1, 4, 4])
    mask = np.triu(np.full((1, 4, 4), fill, np.float32), 1)
    y = b.node("Add", [x, b.init(mask, "mask")], [1, 4, 4])
    return b.output(b.node(consumer, [y], [1, 4, 4], axis=-1) if consumer == "Softmax" else b.node(consumer, [y], [1, 4, 4]))


def test_attention_mask_constant_is_not_an_overflow() -> None:
    lowest = float(np.finfo(np.float32).min)
    r = run_check(_masked_softmax(lowest), Target("macos"))
    assert not _rules(r, "fp16_overflow_constant")
    [f] = _rules(r, "fp16_mask_constant")
    assert f.severity == "info" and f in r.fixed
    assert {u.unit for u in r.units} == {"ANE"}
    # oracle: in fp16 the mask is -inf and softmax gives exactly 0 there
    with np.errstate(over="ignore"):
        z = np.float16(1.0) + np.float16(lowest)
    e = np.exp(np.array([0.0, z], np.float32))
    assert (e / e.sum())[1] == 0.0
    # the same constant feeding a Relu is a real overflow
    assert _rules(run_check(_masked_softmax(lowest, "Relu"), Target("macos")), "fp16_overflow_constant")


@pytest.mark.parametrize("eps", [1e-5, 1e-7, 3e-8, 2.9e-8, 1e-12])
def test_fp16_epsilon(eps: float) -> None:
    b = GraphBuilder()
    x = b.input("x", [1, 8])
    m = b.output(b.fused("RMSNorm", [x, b.init(np.ones(8, np.float32), "g")], {"epsilon": eps}, [1, 8]))
    flushed = float(np.float16(eps)) == 0.0  # oracle: numpy's fp16 rounding
    assert bool(_rules(run_check(m, Target("macos")), "fp16_epsilon")) is flushed


def test_relu2_noted_only_with_relu2() -> None:
    [f] = _rules(run_check(tiny_lm(), Target("macos")), "fp16_relu2_overflow")
    assert f.severity == "info" and "rescale" in (f.fixed_by or "")
    assert not _rules(run_check(_bitlinear(8, 8), Target("macos")), "fp16_relu2_overflow")


@pytest.mark.parametrize("platform, os_, error", [("ios", "15", True), ("ios", "16", False), ("ios", "18", False),
                                                  ("macos", "12", True), ("macos", "13", False)])
def test_min_os_for_2bit_lut(platform: str, os_: str, error: bool) -> None:
    r = run_check(_bitlinear(16, 16), Target(platform, min_os=os_))
    found = _rules(r, "min_os_features")
    assert bool(found) is error
    if error:
        assert "constexpr_lut_to_dense" in found[0].message and found[0].limit in ("iOS16", "macOS13")


def test_min_os_derived_from_the_graph() -> None:
    assert run_check(_bitlinear(16, 16), Target("ios")).target.os.version == "16"
    assert run_check(_add_const([1, 8]), Target("ios")).target.os.version == "15"
    assert run_check(_add_const([1, 8]), Target("ios"), embed_bits=4).target.os.version == "16"


def test_fp32_precision_moves_everything_off_the_ane() -> None:
    r = run_check(tiny_lm(), Target("macos", "M2"), precision="fp32")
    assert _rules(r, "fp32_compute")
    assert {u.unit for u in r.units} <= {"GPU", "CPU"}
    assert r.score == 0.0  # s_types = 0: no ANE generation computes in fp32
    assert r.fallback_plan[0]["compute_units"] == "CPU_AND_GPU"
    assert not _rules(run_check(tiny_lm(), Target("macos", "M2")), "fp32_compute")


def test_chip_without_ane(tmp_path: Path) -> None:
    db = load_capabilities(_caps(tmp_path, "[[chip]]\nname = 'Intel i9'\nplatforms = ['macos']\nsource = 't'\n"))
    r = run_check(tiny_lm(), Target("macos", "Intel i9"), db=db)
    assert _rules(r, "no_ane") and {u.unit for u in r.units} == {"GPU"}
    assert all(step["compute_units"] != "CPU_AND_NE" for step in r.fallback_plan)


# --- units, score, targets ----------------------------------------------------------------------------


def test_units_custom_and_recurrent_ops() -> None:
    b = GraphBuilder()
    x = b.input("x", [1, 8])
    y = b.node("MyOp", [x], [1, 8], domain="com.example")
    m = b.output(b.node("Relu", [y], [1, 8]))
    units = expected_units(m)
    assert [(u.op_type, u.unit) for u in units] == [("com.example::MyOp", "CPU"), ("Relu", "ANE")]
    b = GraphBuilder()
    x = b.input("x", [1, 1, 8])
    lstm = b.node("LSTM", [x, b.init(np.zeros((1, 16, 8), np.float32)), b.init(np.zeros((1, 16, 4), np.float32))],
                  [1, 1, 1, 4], hidden_size=4)
    assert expected_units(b.output(lstm))[0].unit == "CPU"


def test_score_hand_computed() -> None:
    # tiny_lm has 8 ops; Gather goes to CPU: f_ane = 7/8; the weights are far below every budget.
    r = run_check(tiny_lm(), Target("ios", "A11"))
    assert r.score_components["f_ane"] == pytest.approx(7 / 8)
    assert r.score == pytest.approx(7 / 8)
    assert r.unit_counts == {"ANE": 7, "GPU": 0, "CPU": 1}
    nochip = run_check(tiny_lm(), Target("ios"))
    assert nochip.score == pytest.approx(7 / 8) and "no chip" in nochip.score_basis


def test_bad_targets_are_input_errors() -> None:
    with pytest.raises(InputError, match="allowed: ios, macos"):
        Target("android")
    with pytest.raises(InputError, match="is a ios chip"):
        run_check(tiny_lm(), Target("macos", "A17Pro"))
    with pytest.raises(InputError, match="unknown chip"):
        run_check(tiny_lm(), Target("ios", "A99"))
    with pytest.raises(InputError, match="precision"):
        run_check(tiny_lm(), Target("ios"), precision="bf16")


@pytest.mark.parametrize("chip", ["M1", "M1 Max", "M2", "M2 Ultra", "M3", "M3 Pro", "M4", "M4 Max"])
def test_bitnet_graph_fits_macos_chips(chip: str) -> None:
    r = run_check(tiny_lm(vocab=32000), Target("macos", chip))
    assert r.ok and not r.violations and r.score > 0.8


@pytest.mark.parametrize("chip", ["A14", "A15", "A16", "A17Pro", "A18", "A18 Pro"])
def test_bitnet_graph_fits_recent_iphones(chip: str) -> None:
    r = run_check(tiny_lm(vocab=32000), Target("ios", chip))
    assert r.ok and r.fixed  # the 32000 vocabulary is reported as fixed by the split



def test_tied_gemm_lm_head_over_16384_is_fixed_by_split() -> None:
    # the Hugging Face form: Gemm(h, E, transB=1) with the embedding table E tied to the Gather
    m = tiny_lm(vocab=32000, tied="gemm")
    splits = nodes_needing_split(m)
    assert {(s.op_type, s.input_index, s.axis, s.dim, s.chunks) for s in splits} == {
        ("Gather", 0, 0, 32000, (16000, 16000)), ("Gemm", 1, 0, 32000, (16000, 16000))}
    r = run_check(m, Target("macos", "M1"))
    found = _rules(r, "dim_over_16384")
    assert {f.node for f in found} == {s.node for s in splits}
    assert all(f.severity == "info" and f.fixed_by for f in found) and r.ok
    # transB=0 (B is [K, N]): the converter leaves it whole, so the check flags it
    b = GraphBuilder()
    x = b.input("x", [2, 8])
    m = b.output(b.node("Gemm", [x, b.init(np.zeros((8, 16385), np.float32))], [2, 16385]))
    assert nodes_needing_split(m) == []
    assert any(f.severity != "info" and f.fixed_by is None for f in _rules(run_check(m, Target("macos")), "dim_over_16384"))


def test_only_what_the_converter_splits_is_reported_fixed() -> None:
    # a ternary layer with 16385 outputs: the converter splits MatMul/Gather weights only
    b = GraphBuilder()
    x = b.input("x", [1, 8])
    m = b.output(b.bitlinear(x, 16385, 8))
    r = run_check(m, Target("macos", "M2"))
    assert nodes_needing_split(m) == [] and not r.fixed
    found = _rules(r, "dim_over_16384")
    assert found and all(f.severity == "warning" and f.fixed_by is None for f in found)
    assert r.units[0].unit == "GPU"
    # a MatMul whose reduction dimension K is over the limit: not split either
    b = GraphBuilder()
    x = b.input("x", [1, 16385])
    m = b.output(b.node("MatMul", [x, b.init(np.zeros((16385, 4), np.float32))], [1, 4]))
    assert nodes_needing_split(m) == [] and _rules(run_check(m, Target("macos")), "dim_over_16384")
