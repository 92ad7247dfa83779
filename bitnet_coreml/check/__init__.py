"""The check stage: capability database, platform detection, rule predicates and the pre-conversion report.

Names are imported lazily so that the runtime can use :class:`DeviceCompatibilityChecker` and the
capability database without importing onnx or coremltools.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "ANECapabilities",
    "ANEDataType",
    "CapabilityDatabase",
    "CapabilityRequirements",
    "CheckReport",
    "DeviceCompatibilityChecker",
    "PlatformInfo",
    "SizeEstimate",
    "Target",
    "estimate_weight_bytes",
    "host_unit_verdicts",
    "load_capabilities",
    "nodes_needing_split",
    "package_spec_version",
    "read_thermal_state",
    "run_check",
    "validate_operation_requirements",
]

_WHERE = {
    "ANECapabilities": "ane", "ANEDataType": "ane", "CapabilityRequirements": "ane",
    "validate_operation_requirements": "ane",
    "CapabilityDatabase": "capabilities", "load_capabilities": "capabilities",
    "DeviceCompatibilityChecker": "platform", "PlatformInfo": "platform", "read_thermal_state": "platform",
    "SizeEstimate": "size", "estimate_weight_bytes": "size",
    "Target": "target",
    "nodes_needing_split": "rules",
    "CheckReport": "report", "run_check": "report",
    "host_unit_verdicts": "verdicts", "package_spec_version": "verdicts",
}

if TYPE_CHECKING:
    from bitnet_coreml.check.ane import (
        ANECapabilities,
        ANEDataType,
        CapabilityRequirements,
        validate_operation_requirements,
    )
    from bitnet_coreml.check.capabilities import CapabilityDatabase, load_capabilities
    from bitnet_coreml.check.platform import DeviceCompatibilityChecker, PlatformInfo, read_thermal_state
    from bitnet_coreml.check.report import CheckReport, run_check
    from bitnet_coreml.check.rules import nodes_needing_split
    from bitnet_coreml.check.size import SizeEstimate, estimate_weight_bytes
    from bitnet_coreml.check.target import Target
    from bitnet_coreml.check.verdicts import host_unit_verdicts, package_spec_version


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'bitnet_coreml.check' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"bitnet_coreml.check.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
