"""Lowering: onnx-ir graph (after the passes) -> coremltools MIL program -> ``MLModel``.

One module per op family under ``lower/ops`` registers its lowerings with :func:`lowering`
(``lower/registry.py``); ``lower/bitnet.py`` lowers the fused BitNet ops (2-bit ternary weights),
``lower/state.py`` the KV-cache state ops. Around the lowering: ``fp16.py`` makes a graph fp16-safe
from a calibration run in ONNX Runtime, ``split.py`` splits dimensions over the ANE's limit,
``palettize.py`` palettizes embeddings, ``program.py`` builds and converts the program.

The names people import are re-exported here lazily (this package imports coremltools only when
one of them is used)::

    from bitnet_coreml.lower import BuildOptions, build_program, convert_program
"""

from __future__ import annotations

from bitnet_coreml._lazy import lazy_exports

# public name -> module under bitnet_coreml.lower that defines it
_EXPORTS: dict[str, str] = {
    "BuildOptions": "program", "build_program": "program", "convert_program": "program",
    "lowering": "registry", "LoweringContext": "registry", "get_lowering": "registry", "supported_ops": "registry",
    "make_fp16_safe": "fp16", "random_calibration": "fp16", "load_calibration": "fp16", "run_ort": "fp16",
    "split_large_dims": "split", "palettize_program": "palettize", "pack_ternary_2bit": "bitnet",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
