"""State ops of stateful programs (iOS18): ``read_state`` and ``coreml_update_state``.

A state input's environment slot holds a :class:`~bitnet_coreml.executor.compiler.StateCell` that
the executor copies back into the caller's ``ExecutorState`` after the call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.registry import OpContext, register


@register("read_state", pure=False)
def op_read_state(ctx: OpContext, a: dict[str, Any]) -> Any:
    # no copy: no op writes into its inputs, and coreml_update_state replaces the cell's array
    return a["input"].value


@register("coreml_update_state", pure=False)
def op_coreml_update_state(ctx: OpContext, a: dict[str, Any]) -> Any:
    cell = a["state"]
    value = np.asarray(a["value"])
    if value.shape != cell.value.shape:
        raise ValueError(f"state {cell.name!r} has shape {cell.value.shape}, update has shape {value.shape}")
    # fp16 states hold fp16 values in a float32 array (see compiler.finish); an fp16-typed value
    # already holds fp16 values (every fp16-typed op result is rounded), so no rounding pass and no
    # copy: the cell and the op's output share the array, which no op writes into
    held = np.dtype(np.float32) if cell.dtype == np.float16 else cell.dtype
    cell.value = value if value.dtype == held else value.astype(held)
    return value
