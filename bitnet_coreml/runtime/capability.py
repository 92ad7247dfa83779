"""The runtime's bridge to the capability stage (``bitnet_coreml.check``).

The check stage owns the one definition of "which unit can run this model" (the rule set over the
capability database) and of operation requirements; the runtime only asks. Imports are lazy so the
runtime works, with fewer skips, even where the check stage is not built.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from bitnet_coreml.errors import ConfigError
from bitnet_coreml.runtime.monitor import PlatformSnapshot
from bitnet_coreml.runtime.package_io import PackageInfo
from bitnet_coreml.vocab import COREML_UNITS

log = logging.getLogger(__name__)


_PLAN_NAMES = COREML_UNITS
CHECK_METADATA_KEY = "bitnet_coreml.check"


def capability_verdicts(info: PackageInfo, *, platform_info: Any = None) -> dict[str, str]:
    """Unit name (``ane``/``gpu``/``cpu``) -> why the capability check says it cannot run this package.

    Two sources, both owned by the check stage, merged (a unit ruled out by either is out; when both
    rule it out, both reasons are given):

    * the check report the converter stored in the package metadata (``bitnet_coreml.check``): a Core
      ML unit missing from its ``fallback_plan`` is ruled out;
    * ``bitnet_coreml.check.host_unit_verdicts(package)``: Core ML and ANE presence on this host and the
      package's specification version against the host OS (``platform_info``, a
      ``bitnet_coreml.check.PlatformInfo``, replaces the host detection; tests use it).

    A source that is missing or fails is skipped with a warning: the check is advisory here.
    """
    out = _from_metadata(info)
    for unit, reason in _from_host(info, platform_info).items():
        out[unit] = f"{out[unit]}; {reason}" if unit in out else reason
    return {u: out[u] for u in sorted(out, key=_UNIT_ORDER.index)}


_UNIT_ORDER = list(_PLAN_NAMES)


def _from_host(info: PackageInfo, platform_info: Any) -> dict[str, str]:
    try:
        from bitnet_coreml.check import host_unit_verdicts
    except ImportError:
        return {}
    try:
        verdicts = host_unit_verdicts(info.path, platform_info=platform_info)
    except Exception as e:  # noqa: BLE001 - the check is advisory here; a broken rule must not stop prediction
        log.warning("host capability check failed for %s (%s: %s); no unit ruled out by it",
                    info.path, type(e).__name__, e)
        return {}
    return {str(unit): str(reason or "ruled out by the capability check")
            for unit, (ok, reason) in verdicts.items() if not ok and unit in _PLAN_NAMES}


def _from_metadata(info: PackageInfo) -> dict[str, str]:
    raw = info.metadata.get(CHECK_METADATA_KEY)
    if not raw:
        return {}
    try:
        summary = json.loads(raw)
    except ValueError:
        log.warning("%s: metadata %s is not JSON; no unit ruled out", info.path, CHECK_METADATA_KEY)
        return {}
    plan = summary.get("fallback_plan") if isinstance(summary, dict) else None
    if not isinstance(plan, list) or not plan:
        return {}
    listed = {str(step.get("compute_units")) for step in plan if isinstance(step, dict)}
    return {unit: f"the package's check report leaves {cu} out of its fallback plan"
            for unit, cu in _PLAN_NAMES.items() if cu not in listed}


def _field(req: Any, name: str, default: Any = None) -> Any:
    if isinstance(req, Mapping):
        return req.get(name, default)
    return getattr(req, name, default)


def validate_requirements(requirements: Any, plat: PlatformSnapshot) -> None:
    """Raise :class:`CapabilityMismatchError` listing every requirement this machine misses.

    ``requirements`` is a ``bitnet_coreml.check.CapabilityRequirements`` or a mapping of its fields.
    The check stage owns the rules (``check.validate_operation_requirements``); the runtime passes
    its own reading of ANE availability and total memory so both agree with what the predictor saw.
    """
    from bitnet_coreml.check import CapabilityRequirements, validate_operation_requirements

    if isinstance(requirements, Mapping):
        known = set(CapabilityRequirements.__dataclass_fields__)
        unknown = sorted(set(requirements) - known)
        if unknown:
            raise ConfigError(f"unknown requirement field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        requirements = CapabilityRequirements(**requirements)
    memory_mb = None if plat.memory_total_bytes is None else plat.memory_total_bytes / 2**20
    validate_operation_requirements(requirements, ane_available=plat.ane_present if plat.coreml_available else False,
                                    memory_mb=memory_mb)
