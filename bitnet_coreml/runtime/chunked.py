"""Prediction with compute-unit fallback over a chunked model folder (``convert --chunks``), piece by piece.

:class:`ChunkedPredictor` holds one :class:`~bitnet_coreml.runtime.Predictor` per piece: each piece has its own
fallback chain, probes and recovery statistics, so one piece may answer on the ANE while another falls back to
the GPU, the CPU or the reference executor. A request runs the pieces in order, handing each boundary tensor
to the next; the result is the last piece's outputs, ``unit`` names every piece's unit when they differ
(``ane|reference``), and the notes and :meth:`ChunkedPredictor.get_recovery_stats` say which piece answered where.
:func:`open_predictor` and :func:`read_info` take a package or a folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bitnet_coreml.runtime.package_io import PackageInfo, read_package
from bitnet_coreml.runtime.result import PredictionResult

__all__ = ["ChunkedPredictor", "open_predictor", "read_info"]


def _is_chunked(path: Any) -> bool:
    from bitnet_coreml.package.chunked import is_chunked

    return isinstance(path, (str, os.PathLike)) and is_chunked(path)


def read_info(path: str | os.PathLike[str]) -> PackageInfo:
    """The :class:`PackageInfo` of a package, or of a chunked model as a whole (its inputs are the pieces' inputs
    that are not boundary tensors, its outputs the last piece's, its weight bytes the sum)."""
    if not _is_chunked(path):
        return read_package(path)
    from bitnet_coreml.package.chunked import open_chunked

    cm = open_chunked(path)
    return _whole_info(Path(path), [read_package(p) for p in cm.pieces], {b["name"] for b in cm.boundaries})


def _whole_info(folder: Path, infos: list[PackageInfo], boundaries: set[str]) -> PackageInfo:
    inputs: dict[str, Any] = {}
    for info in infos:
        for name, spec in info.inputs.items():
            if name not in boundaries:
                inputs.setdefault(name, spec)
    return PackageInfo(folder, inputs, infos[-1].output_names, sum(i.weight_bytes for i in infos),
                       infos[0].spec_version, dict(infos[0].metadata))


def open_predictor(package: str | os.PathLike[str], strategy: Any = None, **kwargs: Any) -> Any:
    """A :class:`ChunkedPredictor` for a chunked model folder, else a ``Predictor``."""
    from bitnet_coreml.runtime.predictor import Predictor

    if _is_chunked(package):
        return ChunkedPredictor(package, strategy, **kwargs)
    return Predictor(package, strategy, **kwargs)


class _PieceStats:
    """Recovery statistics of every piece (``to_dict``: ``{"pieces": [...]}``)."""

    def __init__(self, labels: list[str], stats: list[Any]) -> None:
        self.labels, self.stats = labels, stats

    def to_dict(self) -> dict[str, Any]:
        return {"pieces": [{"piece": k, "holds": lab, **s.to_dict()}
                           for k, (lab, s) in enumerate(zip(self.labels, self.stats, strict=True))]}


class ChunkedPredictor:
    """``ChunkedPredictor(folder, strategy).predict(inputs)``: see the module docstring."""

    def __init__(self, folder: str | os.PathLike[str], strategy: Any = None, **kwargs: Any) -> None:
        from bitnet_coreml.package.chunked import open_chunked
        from bitnet_coreml.runtime.predictor import Predictor

        self.model = open_chunked(folder)
        self.pieces = [Predictor(p, strategy, **kwargs) for p in self.model.pieces]
        self.labels = [str(e.get("label", f"piece {k}")) for k, e in enumerate(self.model.manifest["pieces"])]
        self.strategy = self.pieces[0].strategy
        self.info = _whole_info(Path(folder), [p.info for p in self.pieces], {b["name"] for b in self.model.boundaries})

    def __enter__(self) -> ChunkedPredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def predict(self, inputs: Any, *, source: str = "inputs") -> PredictionResult:
        values = dict(inputs)
        results: list[PredictionResult] = []
        for k, p in enumerate(self.pieces):
            feed = {n: values[n] for n in p.info.inputs if n in values}
            r = p.predict(feed, source=source if k == 0 else f"{source} (piece {k})")
            values.update(r.outputs)
            results.append(r)
        units = [str(getattr(r.unit, "value", r.unit)) for r in results]
        last = results[-1]
        overheads = [r.fallback_overhead_s for r in results if r.fallback_overhead_s is not None]
        notes = [n for r in results for n in r.notes]
        notes += [f"piece {k} ({self.labels[k]}) answered on {u}" for k, u in enumerate(units)]
        return PredictionResult(
            outputs=last.outputs, unit=units[0] if len(set(units)) == 1 else "|".join(units),
            attempts=tuple(a for r in results for a in r.attempts), chain=results[0].chain,
            power_target=results[0].power_target, power_reason=results[0].power_reason,
            latency_s=sum(r.latency_s for r in results), unit_latency_s=sum(r.unit_latency_s for r in results),
            fallback_overhead_s=sum(overheads) if overheads else None, notes=tuple(notes), batch_size=last.batch_size)

    def get_recovery_stats(self) -> _PieceStats:
        return _PieceStats(self.labels, [p.get_recovery_stats() for p in self.pieces])

    def system_info(self) -> dict[str, Any]:
        return {"pieces": [p.system_info() for p in self.pieces]}

    def close(self) -> None:
        for p in self.pieces:
            p.close()
