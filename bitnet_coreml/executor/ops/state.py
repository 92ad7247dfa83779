"""State ops of stateful programs (iOS18): ``read_state`` and ``coreml_update_state``.

A state input's environment slot holds a :class:`~bitnet_coreml.executor.compiler.StateCell` that
the executor copies back into the caller's ``ExecutorState`` after the call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.compiler import finish
from bitnet_coreml.executor.registry import OpContext, register


@register("read_state", pure=False)
def op_read_state(ctx: OpContext, a: dict[str, Any]) -> Any:
    return a["input"].value.copy()


@register("coreml_update_state", pure=False)
def op_coreml_update_state(ctx: OpContext, a: dict[str, Any]) -> Any:
    cell = a["state"]
    value = np.asarray(a["value"])
    if value.shape != cell.value.shape:
        raise ValueError(f"state {cell.name!r} has shape {cell.value.shape}, update has shape {value.shape}")
    # fp16 states hold fp16 values in a float32 array during the call (see compiler.finish)
    cell.value = finish(value.copy(), cell.dtype)
    return value
