"""Which Core ML compute units can run a converted package on this host: the runtime's skip list.

:func:`host_unit_verdicts` combines the platform detection (Core ML present, ANE present) with the
package's Core ML specification version against the host OS's (from the capability database's OS
rows): a macOS 13 host cannot load a spec-8 (macOS 14) package on any unit. The spec version comes from
:func:`bitnet_coreml.package.reader.package_spec_version` (the protobuf's first field: neither coremltools
nor onnx needed).
"""

from __future__ import annotations

import os

from bitnet_coreml.check.capabilities import CapabilityDatabase, default_database
from bitnet_coreml.check.platform import DeviceCompatibilityChecker, PlatformInfo
from bitnet_coreml.errors import InputError
from bitnet_coreml.package.reader import package_spec_version
from bitnet_coreml.vocab import HARDWARE_UNITS

UNITS = HARDWARE_UNITS
__all__ = ["host_unit_verdicts", "package_spec_version"]


def host_unit_verdicts(package: str | os.PathLike[str], *, platform_info: PlatformInfo | None = None,
                  db: CapabilityDatabase | None = None) -> dict[str, tuple[bool, str]]:
    """``{"ane"|"gpu"|"cpu": (can_run, reason)}`` for ``package`` on this host (or ``platform_info``)."""
    db = db or default_database()
    info = platform_info or DeviceCompatibilityChecker.get_platform_info(db=db)
    if not info.coreml_available:
        return {u: (False, f"Core ML unavailable: {info.coreml_reason}") for u in UNITS}
    spec = package_spec_version(package)
    if info.os_name == "macOS":
        try:
            host = db.os_version("macos", info.os_version)
        except InputError:
            host = None
        if host is not None and host.spec_version < spec:
            need = next((o.label for o in db.os_versions_for("macos") if o.spec_version >= spec), f"spec {spec}")
            why = (f"the package needs Core ML specification {spec} ({need} or newer); this host is "
                   f"macOS{info.os_version} (specification {host.spec_version})")
            return {u: (False, why) for u in UNITS}
    out = {u: (True, "Core ML available") for u in UNITS if u != "ane"}  # the ANE's presence is decided below
    if info.ane_available is False:
        out["ane"] = (False, f"no usable Neural Engine: {info.ane_reason}")
    elif info.ane_available is None:
        out["ane"] = (True, f"Neural Engine presence unknown ({info.ane_reason}); a probe decides")
    else:
        out["ane"] = (True, f"Neural Engine Gen {info.ane_generation}" if info.ane_generation else "Neural Engine present")
    return out
