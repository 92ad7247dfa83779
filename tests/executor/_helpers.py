"""Helpers for the executor's op tests: build one-op MIL programs and independent oracles."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bitnet_coreml._quiet import coremltools

ct = coremltools()
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from bitnet_coreml.executor import ReferenceExecutor  # noqa: E402

MB = mb
TYPES = types
DTYPES = {"fp16": (np.float16, types.fp16), "fp32": (np.float32, types.fp32)}
# fp16 results are the fp32 result rounded once per op: compare against a float64 oracle with fp16 tolerances
TOL = {"fp16": {"rtol": 2e-3, "atol": 2e-3}, "fp32": {"rtol": 1e-5, "atol": 1e-5}}


def build_program(build: Callable[..., Any], inputs: dict[str, np.ndarray], *, opset: Any = None) -> Any:
    """A MIL program whose inputs mirror ``inputs`` (names, shapes, dtypes) and whose outputs ``build`` returns."""
    from coremltools.converters.mil.mil import Function, Program

    placeholders = {
        name: mb.placeholder(shape=arr.shape, dtype=types.numpy_type_to_builtin_type(arr.dtype))
        for name, arr in inputs.items()
    }
    prog = Program()
    with Function(placeholders, opset_version=opset or ct.target.iOS18) as func:
        out = build(**func.inputs)
        func.set_outputs(list(out) if isinstance(out, (list, tuple)) else [out])
        prog.add_function("main", func)
    return prog


def run_program(build: Callable[..., Any], inputs: dict[str, np.ndarray], *, opset: Any = None,
                fp32: bool = False) -> dict[str, np.ndarray]:
    """Build the program, run it with the reference executor, return its outputs."""
    return ReferenceExecutor(build_program(build, inputs, opset=opset), fp32=fp32).predict(inputs)


def one(build: Callable[..., Any], inputs: dict[str, np.ndarray], **kw: Any) -> np.ndarray:
    out = run_program(build, inputs, **kw)
    assert len(out) == 1
    return next(iter(out.values()))


def rand(shape: tuple[int, ...], dtype: Any = np.float32, *, seed: int = 0, lo: float = -2.0, hi: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, size=shape).astype(dtype)


def onnx_ref(op_type: str, inputs: list[np.ndarray], attrs: dict[str, Any] | None = None, *, n_out: int = 1,
             opset: int = 18) -> list[np.ndarray]:
    """Run one ONNX op with the ONNX reference evaluator (an independent oracle)."""
    import onnx
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    in_names = [f"i{k}" for k in range(len(inputs))]
    out_names = [f"o{k}" for k in range(n_out)]
    node = helper.make_node(op_type, in_names, out_names, **(attrs or {}))
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in zip(in_names, inputs, strict=False)],
        [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in out_names],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    sess = ReferenceEvaluator(model)
    return list(sess.run(None, dict(zip(in_names, inputs, strict=False))))
