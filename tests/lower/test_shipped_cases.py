"""ONNX's node cases converted as shipped (graph inputs stay inputs): a sample in ``make test``, all in
``make conformance`` (tests/lower/conformance_shipped.py; the oracle is ONNX's expected outputs)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh
from onnx.reference import ReferenceEvaluator

from bitnet_coreml.convert import ConvertOptions, convert
from bitnet_coreml.executor import ReferenceExecutor
from tests.lower.conformance_onnx import claimed_cases
from tests.lower.conformance_shipped import ShippedResult, names_what_and_why, run_all, run_shipped, summary

# Cases that crashed or changed a type silently before (scalar graph inputs, rank-6 DepthToSpace /
# SpaceToDepth bodies, bool outputs): each converts and matches ONNX's expected outputs.
PASS = [
    "test_clip", "test_clip_default_min_expanded", "test_clip_splitbounds", "test_pow_bcast_scalar",
    "test_gemm_default_scalar_bias", "test_range_float_type_positive_delta", "test_range_int32_type_negative_delta",
    "test_onehot_with_axis", "test_onehot_negative_indices", "test_onehot_without_axis", "test_tril_neg",
    "test_triu_pos", "test_triu_one_row", "test_dropout_default_ratio", "test_dropout_default_mask",
    "test_equal", "test_isnan", "test_isinf_negative", "test_less_equal_bcast_expanded",
    "test_depthtospace_example_expanded", "test_depthtospace_crd_mode_example_expanded",
    "test_spacetodepth_example_expanded", "test_spacetodepth_expanded",
]
# Cases the converter cannot take: refused with the project's error, naming the node / input and the rule.
REFUSED = {
    "test_convtranspose": r"node 'convtranspose_0' \(ConvTranspose\): input 1 \('W'\) must be a compile-time constant",
    "test_cumsum_2d_int32": r"node 'cumsum_0' \(CumSum\): input 1 \('axis'\) must be a compile-time constant",
    "test_constant_pad": r"node 'pad_0' \(Pad\): input 1 \('pads'\) must be a compile-time constant",
    "test_identity_opt": r"graph input 'opt_in' has type Optional\(Sequence.*sequence/optional types are not supported",
    "test_identity_sequence": r"graph input 'x' has type Sequence.*sequence/optional types are not supported",
    "test_training_dropout": r"node 'dropout_0' \(Dropout\): input 2 \('t'\) must be a compile-time constant.*inference only",
    "test_unsqueeze_three_axes": r"input 1 \('axes'\) must be a compile-time constant.*has rank 6 > 5",
    "test_max_float64": r"graph input 'data_0' \(read by node 'max_0'\): dtype DOUBLE is not supported",
    "test_cast_FLOAT_to_BFLOAT16": r"node 'cast_0' \(Cast\): cast to BFLOAT16 is not supported",
    "test_and2d": r"opset 7 is too old",
    "test_nonzero_example": r"node 'nonzero_0' \(NonZero\): the output shape depends on the data",
    "test_averagepool_2d_dilations": r"node 'averagepool_0' \(AveragePool\): dilated pooling is not supported",
}


@lru_cache(maxsize=1)
def _cases() -> dict[str, tuple[str, object]]:
    return {c.name: (op, c) for op, c in claimed_cases(composite=True)}


def _run(name: str, tmp_path: Path) -> ShippedResult:
    op, case = _cases()[name]
    return run_shipped(op, case, tmp_path)


@pytest.mark.parametrize("name", PASS)
def test_case_converts_as_shipped_and_matches(name: str, tmp_path: Path) -> None:
    r = _run(name, tmp_path)
    assert r.status == "pass", f"{name}: {r.status}: {r.reason}"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_case_refused_naming_node_and_rule(name: str, tmp_path: Path) -> None:
    r = _run(name, tmp_path)
    assert r.status == "refused", f"{name}: {r.status}: {r.reason}"
    assert names_what_and_why(r.reason), r.reason
    assert re.search(REFUSED[name], r.reason), r.reason


def _pad_model(pads: list[int]) -> onnx.ModelProto:
    g = oh.make_graph([oh.make_node("Pad", ["x", "pads", "v"], ["y"], mode="constant")], "g",
                      [oh.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]),
                       oh.make_tensor_value_info("v", TensorProto.FLOAT, [])],
                      [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                      [nh.from_array(np.array(pads, np.int64), "pads")])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)])


def test_pad_with_a_scalar_value_input(tmp_path: Path) -> None:
    # ONNX's own Pad cases feed the pads as a graph input too (refused: they set the shape); with the
    # pads fixed, the pad value is a runtime scalar: the package takes a 0-d array or shape [1].
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    m = _pad_model([1, 2, 0, 3])
    onnx.save(m, tmp_path / "p.onnx")
    res = convert(tmp_path / "p.onnx", tmp_path / "p.mlpackage", ConvertOptions(precision="fp32", check=False))
    assert any("'v': a scalar in the source graph" in n for n in res.notes)
    ex = ReferenceExecutor(str(tmp_path / "p.mlpackage"))
    assert ex.input_specs["v"].shape == (1,)
    want = ReferenceEvaluator(m).run(None, {"x": x, "v": np.array(-2.5, np.float32)})[0]
    for v in (np.array(-2.5, np.float32), np.array([-2.5], np.float32)):
        np.testing.assert_array_equal(ex.predict({"x": x, "v": v})["y"], want)


def test_predictor_inputs_accept_a_scalar_for_a_declared_one(tmp_path: Path) -> None:
    from bitnet_coreml.runtime.package_io import read_package, validate_inputs

    onnx.save(_pad_model([0, 1, 0, 1]), tmp_path / "p.onnx")
    convert(tmp_path / "p.onnx", tmp_path / "p.mlpackage", ConvertOptions(precision="fp32", check=False))
    info = read_package(tmp_path / "p.mlpackage")
    x = validate_inputs(info, {"x": np.zeros((3, 4), np.float32), "v": np.float32(1.0)})
    assert x["v"].shape == (1,) and x["v"][0] == 1.0


def test_bool_output_is_declared_in_the_package(tmp_path: Path) -> None:
    op, case = _cases()["test_equal"]
    onnx.save(case.model, tmp_path / "e.onnx")
    res = convert(tmp_path / "e.onnx", tmp_path / "e.mlpackage", ConvertOptions(precision="fp32", check=False))
    from bitnet_coreml._quiet import coremltools

    spec = coremltools().models.MLModel(str(tmp_path / "e.mlpackage"), skip_model_load=True).get_spec()
    out = spec.description.output[0]
    assert "bool in the source graph" in out.shortDescription and "int32" in out.shortDescription
    assert any("'z': bool in the source graph" in n for n in res.notes)


@pytest.mark.conformance
@pytest.mark.timeout(3600)
def test_every_case_as_shipped() -> None:
    results = run_all()
    s = summary(results)
    crashes = [f"{r.name}: {r.reason}" for r in results if r.status == "crash"]
    changed = [f"{r.name}: {r.reason}" for r in results if r.status == "type-change"]
    assert not crashes, f"{len(crashes)} crash(es): " + "; ".join(crashes[:5])
    assert not changed, f"{len(changed)} silent type change(s): " + "; ".join(changed[:5])
    assert not s["unnamed_refusals"], f"refusals naming nothing: {s['unnamed_refusals'][:5]}"
    assert s["pass_rate"] >= 0.95, s
