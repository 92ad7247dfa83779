"""Compute units: the three Core ML units (ANE, GPU, CPU) and the reference executor.

A unit knows whether this machine can run it (:meth:`Unit.unavailable`), loads the package once
(:meth:`Unit.load`), predicts, and says whether it must be probed in a subprocess before it is trusted
(Core ML units: the first prediction after a failed ANE compile can SIGKILL the process,
coremltools #2758).
"""

from __future__ import annotations

import logging
import platform
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from bitnet_coreml.errors import (
    ANEUnavailableError,
    BitnetCoremlError,
    DeviceInitError,
    InternalError,
    ModelError,
    PlatformUnavailableError,
    RuntimeFailure,
)
from bitnet_coreml.runtime.monitor import PlatformSnapshot
from bitnet_coreml.runtime.package_io import PackageInfo
from bitnet_coreml.runtime.probe import PROBE_ENTRY
from bitnet_coreml.runtime.recovery import classify_exception, is_foreign_failure
from bitnet_coreml.runtime.strategy import ComputeUnit

log = logging.getLogger(__name__)


class Unit(ABC):
    """Base class of a compute unit in the fallback chain."""

    kind: ComputeUnit
    name: str
    needs_probe: bool = False
    validate: bool = False  # compare outputs to the CPU reference on first use

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.loaded = False
        self.load_s: float | None = None

    def unavailable(self, plat: PlatformSnapshot, info: PackageInfo) -> RuntimeFailure | None:
        """Why this machine cannot run this unit at all, or ``None`` if it can."""
        return None

    def memory_need(self, info: PackageInfo) -> int:
        """Estimated extra bytes a load of this unit costs (0 once loaded)."""
        return 0

    def load(self, info: PackageInfo) -> None:
        """Load the package for this unit (once; later calls return at once)."""
        if self.loaded:
            return
        with self._lock:
            if self.loaded:
                return
            t0 = time.perf_counter()
            self._load(info)
            self.load_s = time.perf_counter() - t0
            self.loaded = True

    def unload(self) -> None:
        """Drop the loaded model (memory pressure)."""
        with self._lock:
            self._unload()
            self.loaded = False

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the loaded model; a foreign exception is classified into the runtime taxonomy."""
        try:
            out = self._run(inputs)
        except BitnetCoremlError:
            raise
        except Exception as e:
            raise classify_exception(e, context=f"{self._call_context()} predict") from e
        return {k: np.asarray(v) for k, v in out.items()}

    def _call_context(self) -> str:
        return self.name

    @abstractmethod
    def _run(self, inputs: dict[str, np.ndarray]) -> Any:
        """Call the loaded model (DeviceInitError when not loaded); returns name -> array-like."""

    def probe_args(self) -> list[str]:
        """Arguments after PACKAGE for ``python -m bitnet_coreml.runtime.probe``."""
        return [self.kind.value]

    def probe_entry(self) -> tuple[str, ...]:
        """The ``python`` arguments that start this unit's probe child, before PACKAGE and :meth:`probe_args`."""
        return PROBE_ENTRY

    @abstractmethod
    def _load(self, info: PackageInfo) -> None:
        """Implemented by each kind of unit."""

    @abstractmethod
    def _unload(self) -> None:
        """Implemented by each kind of unit."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind.value, "probe": self.needs_probe, "validate": self.validate,
                "loaded": self.loaded}


class CoreMLUnit(Unit):
    """A Core ML compute unit: ``CPU_AND_NE`` (ane), ``CPU_AND_GPU`` (gpu) or ``CPU_ONLY`` (cpu)."""

    def __init__(self, kind: ComputeUnit, *, probe: bool = True, validate: bool | None = None) -> None:
        super().__init__()
        if kind.coreml_name is None:
            raise ValueError(f"{kind.value} is not a Core ML unit")
        self.kind = kind
        self.name = kind.value
        self.needs_probe = probe
        # CPU_ONLY is Core ML's own CPU reference; the ANE and GPU compute in fp16 and can be silently wrong.
        self.validate = kind is not ComputeUnit.CPU if validate is None else validate
        self._model: Any = None

    def unavailable(self, plat: PlatformSnapshot, info: PackageInfo) -> RuntimeFailure | None:
        label = f"{self.name} ({self.kind.coreml_name})"
        if sys.platform != "darwin" or not plat.coreml_available:
            return PlatformUnavailableError(f"{label}: {plat.coreml_reason}")
        if self.kind is ComputeUnit.ANE and plat.ane_present is False:
            return ANEUnavailableError(f"{label}: this Mac has no Neural Engine "
                                       f"({plat.chip or platform.machine()}); the GPU and CPU units remain")
        return None

    def memory_need(self, info: PackageInfo) -> int:
        # Core ML keeps the package's weights plus a compiled copy for the unit.
        return 0 if self.loaded else 2 * info.weight_bytes

    def _load(self, info: PackageInfo) -> None:
        from bitnet_coreml._quiet import coremltools

        ct = coremltools()
        cu_name = self.kind.coreml_name or "CPU_ONLY"
        try:
            model = ct.models.MLModel(str(info.path), compute_units=getattr(ct.ComputeUnit, cu_name))
        except BitnetCoremlError:
            raise
        except Exception as e:  # Core ML raises bare Exceptions on compile/load failures
            raise DeviceInitError(f"{self.name}: loading {info.path.name} with {self.kind.coreml_name} failed: "
                                  f"{type(e).__name__}: {' '.join(str(e).split())}") from e
        # coremltools only warns when the native model fails to load and leaves the proxy empty.
        if getattr(model, "__proxy__", None) is None:
            raise DeviceInitError(f"{self.name}: Core ML did not load {info.path.name} for {self.kind.coreml_name} "
                                  "(no native model; see the warnings above)")
        self._model = model

    def _unload(self) -> None:
        self._model = None

    def _call_context(self) -> str:
        return f"{self.name} ({self.kind.coreml_name})"

    def _run(self, inputs: dict[str, np.ndarray]) -> Any:
        if self._model is None:
            raise DeviceInitError(f"{self.name}: predict before load")
        return self._model.predict(inputs)


class ReferenceUnit(Unit):
    """The project's numpy reference executor, the chain's last resort on every OS.

    ``name`` defaults to ``reference``; giving a chain several reference units with distinct names
    (e.g. an fp16-emulating one that is validated, then an fp32 one) is how the fallback machinery
    runs end to end on machines without Core ML.
    """

    def __init__(self, name: str = "reference", *, fp32: bool = False, probe: bool = False,
                 validate: bool = False) -> None:
        super().__init__()
        self.kind = ComputeUnit.REFERENCE
        self.name = name
        self.fp32 = fp32
        self.needs_probe = probe
        self.validate = validate
        self._executor: Any = None

    def memory_need(self, info: PackageInfo) -> int:
        # The executor materialises compressed weights: a 2-bit LUT weight becomes fp32 (16x).
        return 0 if self.loaded else 16 * info.weight_bytes

    def _load(self, info: PackageInfo) -> None:
        try:
            from bitnet_coreml.executor import ReferenceExecutor  # type: ignore[attr-defined]
        except ImportError:  # the package re-export is the contract; the module is where it lives
            from bitnet_coreml.executor.executor import ReferenceExecutor

        try:
            self._executor = ReferenceExecutor(info.path, fp32=self.fp32)
        except BitnetCoremlError:
            raise
        except Exception as e:
            if not is_foreign_failure(e):  # the executor is this project's code: its bug is a bug
                raise InternalError(f"{self.name} load", e) from e
            raise ModelError(f"{self.name}: the reference executor cannot load {info.path.name}: "
                             f"{type(e).__name__}: {' '.join(str(e).split())}") from e

    def _unload(self) -> None:
        self._executor = None

    def _run(self, inputs: dict[str, np.ndarray]) -> Any:
        if self._executor is None:
            raise DeviceInitError(f"{self.name}: predict before load")
        return self._executor.predict(inputs)

    def probe_args(self) -> list[str]:
        return ["reference"] + (["--fp32"] if self.fp32 else [])

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["fp32"] = self.fp32
        return d


def make_unit(kind: ComputeUnit, *, probe_coreml: bool = True) -> Unit:
    """The standard unit for ``kind``."""
    if kind is ComputeUnit.REFERENCE:
        return ReferenceUnit()
    return CoreMLUnit(kind, probe=probe_coreml)


def make_units(chain: Sequence[str | ComputeUnit | Unit], *, probe_coreml: bool = True) -> list[Unit]:
    """Units for a chain of unit names, :class:`ComputeUnit` values and/or :class:`Unit` objects (kept as given)."""
    return [u if isinstance(u, Unit) else make_unit(ComputeUnit.parse(u) if isinstance(u, str) else u,
                                                    probe_coreml=probe_coreml) for u in chain]
