"""The small protocol between the batch engines and whatever runs a prediction.

An engine never imports a predictor class directly: it is handed a *factory*, a picklable object
that each worker calls once to build its own predictor (so a package is loaded once per worker, in
that worker's process or Ray actor). A predictor maps named input arrays to named outputs and says
which compute unit answered.

* :class:`RuntimeFactory`: the project's :class:`bitnet_coreml.runtime.Predictor` with its fallback
  chain (ANE -> GPU -> CPU -> reference executor); what the CLI uses.
* :class:`ReferenceFactory`: the numpy reference executor alone (the benchmark's baseline).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from bitnet_coreml.errors import InputError
from bitnet_coreml.jobs._io import sha256_tree

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


@runtime_checkable
class ItemPredictor(Protocol):
    def predict(self, inputs: Arrays) -> tuple[Arrays, str]:
        """Outputs and the name of the compute unit that produced them."""


class PredictorFactory(Protocol):
    def __call__(self) -> ItemPredictor:
        """Build one predictor (called once per worker)."""

    def fingerprint(self) -> str:
        """Identifies what predicts (e.g. the package's content hash); a job folder is tied to it."""


def package_input_dtypes(package: str | Path) -> dict[str, np.dtype[Any]]:
    """Declared input dtypes of a package, so dataset arrays (e.g. JSON numbers) can be cast to them."""
    from bitnet_coreml.runtime.chunked import read_info

    return {name: spec.dtype for name, spec in read_info(package).inputs.items()}  # a package or a chunked folder


def coerce_inputs(inputs: Arrays, dtypes: dict[str, np.dtype[Any]]) -> Arrays:
    """Cast each input to its declared dtype (JSON numbers arrive as float64 / int64)."""
    out = {}
    for name, arr in inputs.items():
        want = dtypes.get(name)
        if want is not None and arr.dtype != want:
            if arr.dtype.kind == "f" and want.kind in "iu":
                raise InputError(f"input '{name}': got {arr.dtype} values but the package expects {want}")
            arr = arr.astype(want)
        out[name] = arr
    return out


def fit_item(info: Any, inputs: Arrays, dtypes: dict[str, np.dtype[Any]], strict: bool = False) -> list[Arrays]:
    """An item's inputs as the package takes them: its arrays only (others ignored unless ``strict``),
    cast to the declared dtypes, one dict per row where the item carries a batch dimension the
    package lacks (see :func:`bitnet_coreml.runtime.package_io.split_batch`)."""
    from bitnet_coreml.runtime.package_io import select_inputs, split_batch

    chosen, _ = select_inputs(info, inputs, strict=strict, source="item")
    return split_batch(info, coerce_inputs(chosen, dtypes))


def stack_rows(outputs: list[Arrays]) -> Arrays:
    """One item's outputs from its rows' outputs (stacked along the first axis)."""
    if len(outputs) == 1:
        return outputs[0]
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def _check_package(package: Path) -> None:
    if not package.exists():
        raise InputError(f"package {package}: no such file or folder")


@dataclass(frozen=True)
class ReferenceFactory:
    """Predictors backed by :class:`bitnet_coreml.executor.ReferenceExecutor` (unit ``"reference"``)."""

    package: Path
    strict: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "package", Path(self.package))
        _check_package(self.package)

    def fingerprint(self) -> str:
        return "package:" + sha256_tree(self.package)

    def __call__(self) -> ItemPredictor:
        from bitnet_coreml.executor.chunked import open_executor  # loaded per worker
        from bitnet_coreml.runtime.chunked import read_info

        return _ReferencePredictor(open_executor(str(self.package)), read_info(self.package),
                                   package_input_dtypes(self.package), self.strict)


class _ReferencePredictor:
    def __init__(self, executor: Any, info: Any, dtypes: dict[str, np.dtype[Any]], strict: bool) -> None:
        self._executor = executor
        self._info = info
        self._dtypes = dtypes
        self._strict = strict

    def predict(self, inputs: Arrays) -> tuple[Arrays, str]:
        rows = fit_item(self._info, inputs, self._dtypes, self._strict)
        return stack_rows([dict(self._executor.predict(r)) for r in rows]), "reference"


@dataclass(frozen=True)
class RuntimeFactory:
    """Predictors backed by :class:`bitnet_coreml.runtime.Predictor` and its fallback chain.

    ``units`` (e.g. ``("ane", "cpu", "reference")``) replaces the strategy's unit chain when given.
    """

    package: Path
    units: tuple[str, ...] | None = None
    strategy_overrides: tuple[tuple[str, Any], ...] = field(default=())
    strict: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "package", Path(self.package))
        _check_package(self.package)
        self._strategy()  # validate the unit names in the driver, before any worker starts

    def _strategy(self) -> Any:
        from bitnet_coreml.runtime.strategy import FallbackStrategy

        strategy = FallbackStrategy(**dict(self.strategy_overrides))
        return strategy.with_units(self.units) if self.units else strategy

    def fingerprint(self) -> str:
        return "package:" + sha256_tree(self.package)

    def __call__(self) -> ItemPredictor:
        from bitnet_coreml.runtime.chunked import open_predictor  # loaded per worker

        return _RuntimePredictor(open_predictor(str(self.package), strategy=self._strategy()),
                                 package_input_dtypes(self.package), self.strict)


class _RuntimePredictor:
    def __init__(self, predictor: Any, dtypes: dict[str, np.dtype[Any]], strict: bool = False) -> None:
        self.predictor = predictor
        self._dtypes = dtypes
        self._strict = strict

    def predict(self, inputs: Arrays) -> tuple[Arrays, str]:
        outs, units = [], []
        for row in fit_item(self.predictor.info, inputs, self._dtypes, self._strict):
            res = self.predictor.predict(row)
            outs.append(dict(res.outputs))
            units.append(res.unit.value if hasattr(res.unit, "value") else str(res.unit))
        return stack_rows(outs), ",".join(sorted(set(units)))

    def recovery_stats(self) -> dict[str, Any] | None:
        getter = getattr(self.predictor, "get_recovery_stats", None)
        if getter is None:
            return None
        stats = getter()
        return stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)
