"""A minimal numpy evaluator of the MIL ops the BitNet lowerings emit, for tests only.

Written from the MIL op specs (coremltools ``mil/ops/defs``), independent of the lowering code: it
lets the lowerings be checked numerically on Linux without a Core ML runtime. Each op's result is
stored in the op's declared dtype, so an fp16 program is evaluated with fp16 rounding after every op.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml._quiet import coremltools


def _np_dtype(var: Any) -> Any:
    from coremltools.converters.mil.mil import types

    return types.nptype_from_builtin(var.dtype)


def _val(env: dict[str, np.ndarray], v: Any) -> np.ndarray:
    if v.name in env:
        return env[v.name]
    if v.val is not None:
        return np.asarray(v.val)
    raise KeyError(v.name)


def _axes(op: Any) -> tuple[int, ...]:
    return tuple(int(a) for a in op.axes.val)


def evaluate(program: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the main function of ``program`` on ``inputs`` (by MIL input name)."""
    coremltools()
    func = program.functions["main"]
    env: dict[str, np.ndarray] = {}
    for name, var in func.inputs.items():
        env[var.name] = np.asarray(inputs[name]).astype(_np_dtype(var))
    for op in func.operations:
        t = op.op_type
        g = lambda n, op=op: _val(env, getattr(op, n))  # noqa: E731
        if t == "const":
            r = np.asarray(op.outputs[0].val)
        elif t == "constexpr_lut_to_dense":
            r = op.materialized_val_inference()
        elif t in ("identity",):
            r = g("x")
        elif t == "cast":
            r = g("x")
        elif t in ("add", "sub", "mul", "real_div", "maximum", "minimum", "equal", "greater", "less",
                   "logical_and", "logical_or"):
            a, b = g("x"), g("y")
            r = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide,
                 "maximum": np.maximum, "minimum": np.minimum, "equal": np.equal, "greater": np.greater,
                 "less": np.less, "logical_and": np.logical_and, "logical_or": np.logical_or}[t](a, b)
        elif t in ("abs", "floor", "relu", "sqrt"):
            x = g("x")
            r = {"abs": np.abs, "floor": np.floor, "relu": lambda v: np.maximum(v, 0), "sqrt": np.sqrt}[t](x)
        elif t == "rsqrt":
            x = g("x")
            eps = float(op.epsilon.val) if op.epsilon is not None else 1e-12
            r = 1.0 / np.sqrt(x + np.asarray(eps, x.dtype))
        elif t == "reduce_max":
            r = np.max(g("x"), axis=_axes(op), keepdims=bool(op.keep_dims.val))
        elif t == "reduce_mean":
            r = np.mean(g("x"), axis=_axes(op), keepdims=bool(op.keep_dims.val))
        elif t == "clip":
            r = np.clip(g("x"), g("alpha"), g("beta"))
        elif t == "select":
            r = np.where(g("cond"), g("a"), g("b"))
        elif t == "linear":
            x, w = g("x"), g("weight")
            r = np.matmul(x.astype(np.float32), w.astype(np.float32).T)
            if op.bias is not None:
                r = r + g("bias").astype(np.float32)
        elif t == "matmul":
            x, y = g("x"), g("y")
            if op.transpose_x.val:
                x = np.swapaxes(x, -1, -2)
            if op.transpose_y.val:
                y = np.swapaxes(y, -1, -2)
            r = np.matmul(x.astype(np.float32), y.astype(np.float32))
        elif t == "concat":
            r = np.concatenate([_val(env, v) for v in op.values], axis=int(op.axis.val))
        else:
            raise NotImplementedError(f"mil_eval: op {t!r} ({op.name})")
        out = op.outputs[0]
        env[out.name] = np.asarray(r).astype(_np_dtype(out))
    return {v.name: env[v.name] for v in func.outputs}
