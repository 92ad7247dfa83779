"""Numpy implementations of MIL ops, one module per op family; importing this registers them all."""

from __future__ import annotations

from bitnet_coreml.executor.ops import (  # noqa: F401
    activation,
    attention,
    constexpr,
    control_flow,
    conv,
    elementwise,
    gather_scatter,
    linear,
    normalization,
    pool,
    quantization,
    reduction,
    state,
    tensor_operation,
    tensor_transformation,
)
