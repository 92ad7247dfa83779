"""A deployment target (:class:`bitnet_coreml.vocab.Target`) resolved against the capability database."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bitnet_coreml.check.ane import ANECapabilities
from bitnet_coreml.check.capabilities import CapabilityDatabase, Chip, Device, OsVersion
from bitnet_coreml.errors import InputError
from bitnet_coreml.vocab import Target

__all__ = ["ResolvedTarget", "Target", "resolve"]


def resolve(target: Target, db: CapabilityDatabase, needed_spec: int = 6) -> ResolvedTarget:
    """Look ``target``'s chip and OS up; without ``min_os`` the lowest OS with spec >= ``needed_spec`` is used."""
    chip: Chip | None = None
    ane: ANECapabilities | None = None
    device: Device | None = None
    if target.chip is not None:
        chip = db.chip(target.chip)
        if target.platform not in chip.platforms:
            raise InputError(f"chip {chip.name!r} is a {'/'.join(chip.platforms)} chip in the capability database, "
                             f"not {target.platform}; use --target {chip.platforms[0]} or add a row with --capabilities")
        if chip.ane_generation is not None:
            ane = ANECapabilities.for_chip(chip, db)
        if chip.gpu is not None:
            device = db.device(chip.gpu)
    if target.min_os is not None:
        os_row = db.os_version(target.platform, target.min_os)
        os_how = "given"
    else:
        found = db.lowest_os(target.platform, needed_spec)
        if found is None:
            raise InputError(f"no {target.platform} version in the capability database has Core ML specification "
                             f">= {needed_spec}")
        os_row, os_how = found, "derived: the lowest OS with every feature the graph needs"
    limit = int(db.limit("package_bytes")[target.platform])
    return ResolvedTarget(target, chip, ane, device, os_row, os_how, limit)


@dataclass(frozen=True)
class ResolvedTarget:
    target: Target
    chip: Chip | None
    ane: ANECapabilities | None
    device: Device | None
    os: OsVersion
    os_how: str
    package_limit_bytes: int

    @property
    def platform(self) -> str:
        return self.target.platform

    @property
    def label(self) -> str:
        chip = f" {self.chip.name}" if self.chip else ""
        return f"{self.os.label}+{chip}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "chip": self.chip.name if self.chip else None,
            "chip_source": self.chip.source if self.chip else None,
            "ane_generation": self.ane.generation if self.ane else None,
            "ane_tops": self.ane.tops if self.ane else None,
            "int8_compute": self.chip.int8_compute if self.chip else None,
            "gpu_device": self.device.name if self.device else None,
            "min_os": self.os.version,
            "min_os_how": self.os_how,
            "spec_version": self.os.spec_version,
            "mil_opset": self.os.mil_opset,
            "package_limit_bytes": self.package_limit_bytes,
        }
