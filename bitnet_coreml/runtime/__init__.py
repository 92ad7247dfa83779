"""Prediction with compute-unit fallback: ANE -> GPU -> CPU -> reference executor.

The seed's manager (:class:`Predictor`), its :class:`FallbackStrategy`, the error-to-recovery table
(:func:`handle_error` -> :class:`RecoveryAction`), recovery statistics (:class:`RecoveryStats`),
subprocess probes of Core ML units and the platform :class:`Monitor` it adapts to.
"""

from __future__ import annotations

from bitnet_coreml.runtime.monitor import Monitor, PlatformSnapshot
from bitnet_coreml.runtime.predictor import Predictor
from bitnet_coreml.runtime.recovery import (
    RecoveryAction,
    backoff_delay,
    classify_exception,
    handle_error,
    is_foreign_failure,
)
from bitnet_coreml.runtime.result import Attempt, PredictionResult
from bitnet_coreml.runtime.stats import ErrorRecovery, RecoveryStats, UnitStats
from bitnet_coreml.runtime.strategy import UNIT_NAMES, ComputeUnit, FallbackStrategy, PowerTarget
from bitnet_coreml.runtime.units import CoreMLUnit, ReferenceUnit, Unit, make_units

__all__ = [
    "Attempt",
    "ComputeUnit",
    "CoreMLUnit",
    "ErrorRecovery",
    "FallbackStrategy",
    "Monitor",
    "PlatformSnapshot",
    "PowerTarget",
    "PredictionResult",
    "Predictor",
    "RecoveryAction",
    "RecoveryStats",
    "ReferenceUnit",
    "UNIT_NAMES",
    "Unit",
    "UnitStats",
    "backoff_delay",
    "classify_exception",
    "handle_error",
    "is_foreign_failure",
    "make_units",
]
