"""Reference executor: numpy execution of ML Program (MIL) packages on any OS.

``ReferenceExecutor(source, *, fp32=False)`` takes an ``.mlpackage`` path, a coremltools ``MLModel``
or a MIL ``Program``; ``.predict(inputs) -> outputs``. It is the CPU fallback at the end of every
compute-unit chain, the engine of batch jobs on Linux and the oracle tests check packages with.
"""

from __future__ import annotations

from bitnet_coreml.executor.errors import (
    InputDtypeError,
    InputShapeError,
    MissingInputError,
    StateError,
    UnexpectedInputError,
)
from bitnet_coreml.executor.executor import ExecutorState, InputSpec, ReferenceExecutor
from bitnet_coreml.executor.registry import op_families, supported_ops

__all__ = [
    "ReferenceExecutor",
    "ExecutorState",
    "InputSpec",
    "supported_ops",
    "op_families",
    "MissingInputError",
    "UnexpectedInputError",
    "InputShapeError",
    "InputDtypeError",
    "StateError",
]
