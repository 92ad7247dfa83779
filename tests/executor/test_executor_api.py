"""Sources, input checking, errors and the registry of ReferenceExecutor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitnet_coreml.errors import InputError, ModelLoadError, UnsupportedOpError
from bitnet_coreml.executor import (
    InputDtypeError,
    InputShapeError,
    MissingInputError,
    ReferenceExecutor,
    UnexpectedInputError,
    op_families,
    registry,
    supported_ops,
)
from tests.executor._helpers import MB, TYPES, build_program, ct, rand

mb = MB


def _prog():  # type: ignore[no-untyped-def]
    w = rand((4, 3), seed=1)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3)), mb.TensorSpec(shape=(2, 4), dtype=TYPES.int32)],
                opset_version=ct.target.iOS17)
    def prog(x, n):  # type: ignore[no-untyped-def]
        y = mb.linear(x=x, weight=w)
        return mb.add(x=y, y=mb.cast(x=n, dtype="fp32"), name="y"), mb.relu(x=x, name="r")

    return prog, w


def test_same_result_from_program_mlmodel_and_package(tmp_path: Path) -> None:
    prog, w = _prog()
    x = rand((2, 3), seed=2)
    n = np.arange(8, dtype=np.int32).reshape(2, 4)
    ref_y = x.astype(np.float64) @ w.T.astype(np.float64) + n
    # ct.convert rewrites the program it is given in place (fp16 casts), so convert a second copy
    model = ct.convert(_prog()[0], convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17)
    path = tmp_path / "m.mlpackage"
    model.save(str(path))
    for source, tol in ((prog, 1e-5), (model, 3e-2), (path, 3e-2), (str(path), 3e-2)):
        ex = ReferenceExecutor(source)
        assert ex.output_names == ["y", "r"]
        assert ex.input_specs["x"] == ((2, 3), np.dtype(np.float32))
        assert tuple(ex.input_specs["n"]) == ((2, 4), np.dtype(np.int32))
        out = ex.predict({"x": x, "n": n})
        assert out["y"].dtype == np.float32
        np.testing.assert_allclose(out["y"], ref_y, rtol=tol, atol=tol)
        np.testing.assert_allclose(out["r"], np.maximum(x, 0), rtol=tol, atol=tol)


def test_fp16_package_matches_fp32_within_fp16_error_and_fp32_switch_is_exact() -> None:
    prog, w = _prog()
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17)  # fp16 compute
    x = rand((2, 3), seed=3)
    n = np.zeros((2, 4), np.int32)
    half = ReferenceExecutor(model).predict({"x": x, "n": n})["y"]
    full = ReferenceExecutor(model, fp32=True).predict({"x": x, "n": n})["y"]
    # fp32 mode keeps even the program's cast-to-fp16 of x in fp32; only the stored weight is fp16
    w16 = w.astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(full, x.astype(np.float64) @ w16.T, rtol=1e-6, atol=1e-6)
    assert not np.array_equal(half, full)
    np.testing.assert_allclose(half, full, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("inputs,err,match", [
    ({"x": np.zeros((2, 3), np.float32)}, MissingInputError, "missing input.*n"),
    ({"x": np.zeros((2, 3), np.float32), "n": np.zeros((2, 4), np.int32), "z": np.zeros(1)}, UnexpectedInputError,
     "unexpected input.*z"),
    ({"x": np.zeros((3, 3), np.float32), "n": np.zeros((2, 4), np.int32)}, InputShapeError, r"\(3, 3\).*\(2, 3\)"),
    ({"x": np.zeros((2, 3), np.float64), "n": np.zeros((2, 4), np.int32)}, InputDtypeError, "float64.*float32"),
    ({"x": [[0.0] * 3] * 2, "n": np.zeros((2, 4), np.int32)}, InputDtypeError, "list"),
])
def test_bad_inputs_are_input_errors(inputs, err, match) -> None:  # type: ignore[no-untyped-def]
    prog, _ = _prog()
    ex = ReferenceExecutor(prog)
    with pytest.raises(err, match=match) as info:
        ex.predict(inputs)
    assert isinstance(info.value, InputError)
    assert "\n" not in str(info.value)


def test_flexible_input_dimension() -> None:
    from coremltools.converters.mil.mil import get_new_symbol

    s = get_new_symbol()

    @mb.program(input_specs=[mb.TensorSpec(shape=(s, 4))], opset_version=ct.target.iOS17)
    def prog(x):  # type: ignore[no-untyped-def]
        return mb.reduce_sum(x=x, axes=[-1])

    ex = ReferenceExecutor(prog)
    assert ex.input_specs["x"].shape == (None, 4)
    for rows in (1, 5):
        x = rand((rows, 4), seed=rows)
        np.testing.assert_allclose(ex.predict({"x": x})["reduce_sum_0"], x.sum(-1), rtol=1e-6)
    with pytest.raises(InputShapeError, match=r"\?"):
        ex.predict({"x": np.zeros((2, 5), np.float32)})


def test_unknown_op_names_it_and_lists_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    x = rand((1, 4))
    prog = build_program(lambda x: mb.random_uniform(shape=mb.shape(x=x)), {"x": x})
    with pytest.raises(UnsupportedOpError, match="random_uniform") as info:
        ReferenceExecutor(prog)
    msg = str(info.value)
    assert "supported:" in msg and "linear" in msg and "conv" in msg


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such package"):
        ReferenceExecutor(tmp_path / "missing.mlpackage")
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not an .mlpackage"):
        ReferenceExecutor(tmp_path / "x.onnx")
    bad = tmp_path / "bad.mlpackage"
    bad.mkdir()
    with pytest.raises(ModelLoadError, match=r"no Manifest\.json"):
        ReferenceExecutor(bad)
    with pytest.raises(ModelLoadError, match="int"):
        ReferenceExecutor(42)


def test_registry_refuses_duplicates_and_reports_families() -> None:
    assert "linear" in supported_ops() and "constexpr_lut_to_dense" in supported_ops()
    families = op_families()
    assert "matmul" in families["linear"] and "conv" in families["conv"]
    with pytest.raises(ValueError, match="already implemented"):
        registry.register("relu")(lambda ctx, a: a["x"])


def test_weights_are_folded_at_load() -> None:
    """A transposed constant weight is computed once at load, not per call."""
    w = rand((5, 3), seed=1).T.copy()  # (3, 5)

    def build(x):  # type: ignore[no-untyped-def]
        return mb.matmul(x=x, y=mb.transpose(x=w.T.copy(), perm=[1, 0]))

    x = rand((2, 3), seed=2)
    ex = ReferenceExecutor(build_program(build, {"x": x}))
    assert ex.num_steps == 1 and ex.folded_ops == 1
    np.testing.assert_allclose(ex.predict({"x": x})["matmul_0"], x @ w, rtol=1e-6)


def test_runtime_op_failure_names_the_op() -> None:
    from bitnet_coreml.errors import InputError

    x = rand((4, 3))
    idx = np.array([1, 7], np.int32)
    prog = build_program(lambda x, idx: mb.gather(x=x, indices=idx, axis=0, validate_indices=True, name="g"),
                         {"x": x, "idx": idx}, opset=ct.target.iOS17)
    ex = ReferenceExecutor(prog)
    with pytest.raises(InputError, match=r"op 'g' \(gather\).*out of range"):  # exit 2, never retried
        ex.predict({"x": x, "idx": idx})
    ok = ex.predict({"x": x, "idx": np.array([3, 0], np.int32)})["g"]
    np.testing.assert_array_equal(ok, x[[3, 0]])


def _check_free_plan(ex: Any) -> None:
    """No step reads a slot an earlier step dropped, outputs are never dropped, everything else is."""
    from bitnet_coreml.executor.compiler import _slots_read

    block = ex._block
    freed: set[int] = set()
    for step in block.steps:
        assert not (_slots_read(step) & freed), step.ctx.name
        freed |= set(step.frees)
    outputs = {slot for slot, _ in block.outputs if slot >= 0}
    assert not (outputs & freed)
    made = set(block.input_slots) | {s for step in block.steps for s in step.out_slots}
    assert made - outputs <= freed  # no intermediate value outlives the call's last use of it


def test_intermediates_are_dropped_after_their_last_use() -> None:
    """A value read only inside a cond branch, long after it was made, stays until the cond runs;
    the results are those of numpy, and the plan drops every intermediate."""
    from tests.executor._helpers import build_program

    x = np.array([1.0, 2.0], np.float32)

    def build(x):  # type: ignore[no-untyped-def]
        early = mb.mul(x=x, y=3.0)  # read next only inside the true branch
        total = mb.reduce_sum(x=x)
        dead = mb.add(x=x, y=1.0)  # nothing reads it  # noqa: F841
        branch = mb.cond(pred=mb.greater(x=total, y=2.0), _true_fn=lambda: mb.add(x=early, y=x),
                         _false_fn=lambda: mb.sub(x=x, y=1.0))
        looped = mb.while_loop(_cond=lambda v: mb.less(x=mb.reduce_sum(x=v), y=100.0),
                               _body=lambda v: (mb.mul(x=v, y=early),), loop_vars=(x,))
        return [branch, looped[0] if isinstance(looped, (list, tuple)) else looped]

    ex = ReferenceExecutor(build_program(build, {"x": x}))
    _check_free_plan(ex)
    branch, looped = ex.predict({"x": x}).values()
    np.testing.assert_array_equal(branch, [4.0, 8.0])  # 3x + x
    expect = x.copy()
    while expect.sum() < 100:
        expect = expect * (3 * x)
    np.testing.assert_array_equal(looped, expect)


def test_bundled_model_free_plan(tmp_path: Path) -> None:
    """The plan holds on a whole converted BitNet model, whose outputs still match ONNX Runtime."""
    import onnxruntime as ort

    from bitnet_coreml.convert import ConvertOptions, convert

    src = Path(__file__).resolve().parents[2] / "models" / "bitnet_offline.onnx"
    pkg = tmp_path / "m.mlpackage"
    convert(src, pkg, ConvertOptions(precision="fp32", check=False))
    ex = ReferenceExecutor(str(pkg))
    _check_free_plan(ex)
    ids = np.random.default_rng(0).integers(0, 1024, size=(1, 16))
    got = ex.predict({"input_ids": ids.astype(np.int32)})["logits"]
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: ids})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
