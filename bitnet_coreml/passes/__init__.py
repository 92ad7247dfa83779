"""Graph passes on onnx-ir: shape inference, constant folding, ternary detection, BitNet fusion."""

from __future__ import annotations

from bitnet_coreml.passes.fused import DOMAIN, FUSED_OPS
from bitnet_coreml.passes.pipeline import PassRecord, PassReport, run_default_passes
from bitnet_coreml.passes.ternary import Ternary, detect_ternary

__all__ = ["DOMAIN", "FUSED_OPS", "PassRecord", "PassReport", "Ternary", "detect_ternary", "run_default_passes"]
