"""Reference executor: numpy execution of ML Program (MIL) packages on any OS.

``ReferenceExecutor(source, *, fp32=False)`` takes an ``.mlpackage`` path, a coremltools ``MLModel``
or a MIL ``Program``; ``.predict(inputs) -> outputs``. It is the CPU fallback at the end of every
compute-unit chain, the engine of batch jobs on Linux and the oracle tests check packages with.

The names are re-exported lazily: importing a submodule (``executor.lean``, ``executor.errors``)
loads neither coremltools nor numba.
"""

from __future__ import annotations

from bitnet_coreml._lazy import lazy_exports

# public name -> module under bitnet_coreml.executor that defines it
_EXPORTS: dict[str, str] = {
    "ReferenceExecutor": "executor", "ExecutorState": "executor", "InputSpec": "executor",
    "supported_ops": "registry", "op_families": "registry",
    "MissingInputError": "errors", "UnexpectedInputError": "errors", "InputShapeError": "errors",
    "InputDtypeError": "errors", "StateError": "errors",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
