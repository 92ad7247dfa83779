"""Graph passes on onnx-ir's pass infrastructure: shape inference, constant folding, ternary detection, BitNet fusion.

``run_default_passes(model)`` runs the pipeline the graph needs (``default``, or the ``fused`` fast path for
a graph imported already fused) and returns a :class:`PassReport`; ``run_pass_pipeline(model, name)`` runs a
named one of :data:`PIPELINES`. Each pass is an ``onnx_ir.passes.InPlacePass`` (:class:`GraphPass`).
"""

from __future__ import annotations

from bitnet_coreml.passes.fused import DOMAIN, FUSED_OPS
from bitnet_coreml.passes.pipeline import (
    PIPELINES,
    DetailedResult,
    GraphPass,
    PassRecord,
    PassReport,
    pipeline_for,
    run_default_passes,
    run_pass_pipeline,
)
from bitnet_coreml.passes.ternary import Ternary, detect_ternary

__all__ = ["DOMAIN", "FUSED_OPS", "PIPELINES", "DetailedResult", "GraphPass", "PassRecord", "PassReport", "Ternary",
           "detect_ternary", "pipeline_for", "run_default_passes", "run_pass_pipeline"]
