"""The runtime's bridge to the capability stage (``bitnet_coreml.check``).

The check stage owns the one definition of "which unit can run this model" (the rule set over the
capability database) and of operation requirements; the runtime only asks. Imports are lazy so the
runtime works, with fewer skips, even where the check stage is not built.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bitnet_coreml.errors import CapabilityMismatchError
from bitnet_coreml.runtime.monitor import PlatformSnapshot
from bitnet_coreml.runtime.package_io import PackageInfo

log = logging.getLogger(__name__)


def capability_verdicts(info: PackageInfo) -> dict[str, str]:
    """Unit name (``ane``/``gpu``/``cpu``) -> why the capability check says it cannot run this package.

    Asks ``bitnet_coreml.check.unit_verdicts(package_path)`` (mapping unit -> ``(ok, reason)``); an
    absent or failing check stage rules nothing out.
    """
    try:
        from bitnet_coreml import check  # noqa: PLC0415
    except ImportError:
        return {}
    fn = getattr(check, "unit_verdicts", None)
    if not callable(fn):
        return {}
    try:
        verdicts = fn(info.path)
    except Exception as e:  # the check is advisory here; a broken rule must not stop prediction
        log.warning("capability check failed for %s (%s: %s); no unit ruled out", info.path, type(e).__name__, e)
        return {}
    out: dict[str, str] = {}
    for unit, verdict in dict(verdicts).items():
        ok, reason = verdict if isinstance(verdict, tuple) else (bool(verdict), "")
        if not ok:
            out[str(unit)] = str(reason or "ruled out by the capability check")
    return out


def _field(req: Any, name: str, default: Any = None) -> Any:
    if isinstance(req, Mapping):
        return req.get(name, default)
    return getattr(req, name, default)


def validate_requirements(requirements: Any, plat: PlatformSnapshot) -> None:
    """Raise :class:`CapabilityMismatchError` listing every requirement this machine misses.

    Delegates to ``bitnet_coreml.check.validate_operation_requirements(requirements, platform_info)``
    when the check stage provides it; otherwise checks the requirement fields the runtime can observe:
    ``minimum_memory_mb`` (vs total memory), ``ane_support`` and ``coreml_support``.
    """
    try:
        from bitnet_coreml import check  # noqa: PLC0415

        delegate = getattr(check, "validate_operation_requirements", None)
    except ImportError:
        delegate = None
    if callable(delegate):
        delegate(requirements)
        return
    mismatches: list[str] = []
    min_mb = _field(requirements, "minimum_memory_mb")
    if min_mb is not None and plat.memory_total_bytes is not None and plat.memory_total_bytes < min_mb * 2**20:
        mismatches.append(f"memory: needs {min_mb} MB, this machine has {plat.memory_total_bytes // 2**20} MB")
    if _field(requirements, "ane_support") and not plat.ane_present:
        mismatches.append(f"ane_support: required, but no usable Neural Engine ({plat.coreml_reason})"
                          if not plat.coreml_available else "ane_support: required, but this machine has no Neural Engine")
    if _field(requirements, "coreml_support") and not plat.coreml_available:
        mismatches.append(f"coreml_support: required, but {plat.coreml_reason}")
    if mismatches:
        raise CapabilityMismatchError(f"operation requirements not met: {'; '.join(mismatches)}", mismatches)
