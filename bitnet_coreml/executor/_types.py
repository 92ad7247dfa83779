"""MIL builtin types -> numpy dtypes, as the executor stores tensors."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml._quiet import coremltools

__all__ = ["np_dtype", "static_shape", "dtype_name"]

_SUBBYTE_UNSIGNED = ("uint1", "uint2", "uint3", "uint4", "uint6")
_SUBBYTE_SIGNED = ("int4",)


def np_dtype(builtin: Any) -> np.dtype | None:
    """The numpy dtype a MIL builtin element type is stored as; None for non-numeric (str, list, state)."""
    coremltools()
    from coremltools.converters.mil.mil import types

    if builtin is None:
        return None
    if types.is_str(builtin):
        return None
    name = types.builtin_to_string(builtin)
    if name in _SUBBYTE_UNSIGNED:
        return np.dtype(np.uint8)
    if name in _SUBBYTE_SIGNED:
        return np.dtype(np.int8)
    try:
        return np.dtype(types.nptype_from_builtin(builtin))
    except Exception:  # noqa: BLE001 - list / tuple / dict element types have no numpy dtype
        return None


def dtype_name(builtin: Any) -> str:
    """Short MIL name of a builtin type (``fp16``, ``int32`` ...)."""
    coremltools()
    from coremltools.converters.mil.mil import types

    try:
        return str(types.builtin_to_string(builtin))
    except Exception:  # noqa: BLE001
        return str(builtin)


def static_shape(var: Any) -> tuple[int | None, ...] | None:
    """The var's shape with symbolic dims as None; None when the var is not a tensor or scalar."""
    coremltools()
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    sym = var.sym_type
    if types.is_state(sym):
        sym = sym.wrapped_type()
    if types.is_tensor(sym):
        return tuple(None if is_symbolic(d) else int(d) for d in sym.get_shape())
    if types.is_scalar(sym):
        return ()
    return None


def scalar_for_one(given: tuple[int, ...], declared: tuple[int | None, ...]) -> bool:
    """True when ``given`` is a 0-d value for an input declared ``[1]``: the converter declares the scalar
    inputs of a source graph (Core ML model inputs need rank >= 1) that way, and a scalar is accepted."""
    return len(given) == 0 and tuple(declared) in ((1,), (None,))
