"""Helpers shared by the op-family lowerings: attributes, constants vs Vars, dtypes, shapes.

A lowered value is either a numpy array (a compile-time constant, kept in its ONNX dtype so that
int64 shape arithmetic stays exact while it folds) or a MIL ``Var``. Core ML has no int64, no fp64
and no bool arithmetic, so a constant becomes a MIL value only through :func:`to_var`, which maps
int64/other integers to int32 (refusing values outside int32) and float64 to float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.errors import InputError, UnsupportedOpError
from bitnet_coreml.lower.registry import LoweringContext

_I32 = np.iinfo(np.int32)


def mb() -> Any:
    """The coremltools MIL builder (imported lazily: importing coremltools is slow)."""
    from bitnet_coreml._quiet import coremltools

    coremltools()
    from coremltools.converters.mil import Builder

    return Builder


def _types() -> Any:
    from coremltools.converters.mil.mil import types

    return types


def attr(node: ir.Node, key: str, default: Any = None) -> Any:
    """The Python value of attribute ``key`` (lists for repeated attributes), or ``default``."""
    a = node.attributes.get(key)
    if a is None:
        return default
    if a.is_ref():
        raise UnsupportedOpError(
            f"node {node.name!r} ({node.op_type}): attribute {key!r} is a reference to a function attribute; "
            "inline functions before lowering"
        )
    v = a.value
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, ir.TensorProtocol):
        return v.numpy()
    return v


def is_const(v: Any) -> bool:
    return isinstance(v, (np.ndarray, np.generic))


def unsupported(node: ir.Node, what: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"node {node.name!r} ({node.op_type}): {what}")


def bad(node: ir.Node, what: str) -> InputError:
    return InputError(f"node {node.name!r} ({node.op_type}): {what}")


def mil_array(arr: Any, where: str = "constant") -> np.ndarray:
    """``arr`` in a dtype MIL can hold: integers -> int32 (range-checked), float64 -> float32."""
    a = np.asarray(arr)
    if a.dtype == np.bool_ or a.dtype in (np.float32, np.float16, np.int32):
        return a
    if a.dtype.kind in "iu":
        if a.size and (int(a.min()) < _I32.min or int(a.max()) > _I32.max):
            raise UnsupportedOpError(
                f"{where}: integer value range [{int(a.min())}, {int(a.max())}] does not fit int32 "
                "(Core ML has no int64 tensors)"
            )
        return a.astype(np.int32)
    if a.dtype.kind == "f":
        return a.astype(np.float32)
    raise UnsupportedOpError(f"{where}: dtype {a.dtype} has no Core ML equivalent (allowed: float, int, bool)")


def as_dtype(value: Any, dt: Any, where: str = "constant") -> np.ndarray:
    """A constant converted to ``dt`` for a MIL op; integers are range-checked first (no silent wrap)."""
    a = np.asarray(value)
    target = np.dtype(dt)
    if a.dtype.kind in "iu" and target.kind in "iu":
        a = mil_array(a, where)
    return a.astype(target, copy=False)  # a table already in ``dt`` is not copied (the lm_head: 32 MB)


def to_var(v: Any, name: str | None = None) -> Any:
    """A MIL Var for ``v`` (a Var is returned as is; numpy becomes a ``const``)."""
    if not is_const(v):
        return v
    val = mil_array(v, name or "constant")
    if val.ndim == 0:
        # MIL keeps 0-d constants as Python scalars of the right dtype.
        val = val.dtype.type(val.item())
    return mb().const(val=val, name=name) if name else mb().const(val=val)


def np_dtype(v: Any) -> np.dtype:
    """The numpy dtype of a lowered value (for a Var, the dtype MIL computes in)."""
    if is_const(v):
        return np.asarray(v).dtype
    t = _types()
    dt = v.dtype
    if t.is_tensor(dt):
        dt = dt.get_primitive()
    return np.dtype(t.nptype_from_builtin(dt))


def mil_dtype_str(dt: np.dtype) -> str:
    """The MIL ``cast`` dtype string for a numpy dtype (after :func:`mil_array`'s mapping)."""
    dt = np.dtype(dt)
    if dt == np.bool_:
        return "bool"
    if dt == np.float16:
        return "fp16"
    if dt.kind == "f":
        return "fp32"
    if dt.kind in "iu":
        return "int32"
    raise UnsupportedOpError(f"dtype {dt} has no Core ML equivalent")


def shape_of(v: Any) -> tuple[Any, ...]:
    if is_const(v):
        return tuple(np.shape(v))
    return tuple(v.shape)


def static_shape(node: ir.Node, v: Any) -> tuple[int, ...]:
    """The shape of ``v`` as ints, or an UnsupportedOpError for a symbolic (dynamic) dimension."""
    s = shape_of(v)
    out = []
    for d in s:
        if isinstance(d, (int, np.integer)):
            out.append(int(d))
        else:
            raise unsupported(node, f"dynamic dimension {d} in shape {s}; Core ML needs fixed shapes")
    return tuple(out)


def rank_of(v: Any) -> int:
    return len(shape_of(v))


def cast(v: Any, dt: Any, name: str) -> Any:
    """``v`` converted to numpy dtype ``dt`` (folded when constant; a MIL ``cast`` otherwise)."""
    target = np.dtype(dt)
    if is_const(v):
        return np.asarray(v).astype(target)
    s = mil_dtype_str(target)
    if mil_dtype_str(np_dtype(v)) == s:
        return v
    return mb().cast(x=v, dtype=s, name=name)


def normalize_axis(node: ir.Node, axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise bad(node, f"axis {axis} is out of range for rank {rank} (allowed [{-rank}, {rank - 1}])")
    return axis + rank if axis < 0 else axis


def int_list(node: ir.Node, v: Any) -> list[int]:
    return [int(x) for x in np.asarray(v).reshape(-1)]


def req(ctx: LoweringContext, node: ir.Node, i: int) -> Any:
    """Required input ``i`` (an InputError naming the node when it is missing)."""
    v = ctx.input(node, i)
    if v is None:
        raise bad(node, f"required input {i} is missing")
    return v


def const_input(ctx: LoweringContext, node: ir.Node, i: int) -> np.ndarray | None:
    """Optional input ``i`` as a numpy constant (None when absent)."""
    if ctx.input(node, i) is None:
        return None
    return ctx.const(node, i)
