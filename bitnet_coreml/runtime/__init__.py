"""Prediction with compute-unit fallback: ANE -> GPU -> CPU -> reference executor.

The seed's manager (:class:`Predictor`), its :class:`FallbackStrategy`, the error-to-recovery table
(:func:`handle_error` -> :class:`RecoveryAction`), recovery statistics (:class:`RecoveryStats`),
subprocess probes of Core ML units and the platform :class:`Monitor` it adapts to.

The names are re-exported lazily (``runtime.strategy`` alone does not load the predictor, the
executor or coremltools).
"""

from __future__ import annotations

from bitnet_coreml._lazy import lazy_exports

# public name -> module under bitnet_coreml.runtime that defines it
_EXPORTS: dict[str, str] = {
    "Attempt": "result", "PredictionResult": "result",
    "ComputeUnit": "strategy", "FallbackStrategy": "strategy", "PowerTarget": "strategy", "UNIT_NAMES": "strategy",
    "CoreMLUnit": "units", "ReferenceUnit": "units", "Unit": "units", "make_units": "units",
    "ErrorRecovery": "stats", "RecoveryStats": "stats", "UnitStats": "stats",
    "Monitor": "monitor", "PlatformSnapshot": "monitor",
    "Predictor": "predictor",
    "RecoveryAction": "recovery", "backoff_delay": "recovery", "classify_exception": "recovery",
    "handle_error": "recovery", "is_foreign_failure": "recovery",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
