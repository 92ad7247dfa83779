"""The report of a chunked model folder (``convert --chunks``): each piece's facts, and the model's as their sum.

Every piece is a package carrying the converter's metadata: its own check (verdict, score, per-op compute
units), its layer groups, and ``bitnet_coreml.chunk`` (index, count, the decoder layers it holds, a label).
The model's sections add the pieces up: bytes by kind and weights are the pieces' sums, the check fits when
every piece fits (score: the lowest), and the compute units are one strip of rows per piece (rows named
``piece k: layer``). Parity is the whole chain's (the reference executor runs the pieces in order).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bitnet_coreml.report.data import UNITS, _check_and_units, _meta_json, bytes_by_kind


def piece_sections(folder: Path, ex: Any, notes: list[str]) -> dict[str, Any]:
    """``check``, ``units``, ``bytes_by_kind``, ``weight_bytes`` of the whole folder, and ``chunks`` (per piece).

    ``ex`` is the folder's :class:`~bitnet_coreml.executor.chunked.ChunkedExecutor` (its pieces' programs)."""
    from bitnet_coreml.package.writer import weight_bytes
    from bitnet_coreml.verify import package_meta

    checks, unit_sets, kinds, pieces = [], [], [], []
    for path, pex in zip(ex.model.pieces, ex.pieces, strict=True):
        meta = package_meta(path)[0]
        cm = _meta_json(meta, "bitnet_coreml.check", {})
        stored = cm.get("units") if cm.get("available") else None
        check, units = _check_and_units(meta, None, None, None, stored, notes)
        kind = bytes_by_kind(pex.program, path)
        chunk = _meta_json(meta, "bitnet_coreml.chunk", {})
        weights = weight_bytes(path)
        checks.append(check)
        unit_sets.append(units)
        kinds.append(kind)
        pieces.append({"path": str(Path(path).relative_to(folder)), "label": chunk.get("label"),
                       "layers": chunk.get("units"), "package_bytes": kind["total"], "weight_bytes": weights,
                       "activation_peak_bytes": pex.peak_activation_bytes(),
                       "check": {k: check[k] for k in ("available", "ok", "score")},
                       "unit_counts": units.get("unit_counts")})
    return {"check": _combined_check(checks), "units": _combined_units(unit_sets, pieces), "bytes_by_kind": _summed(kinds),
            "weight_bytes": sum(p["weight_bytes"] for p in pieces),
            "chunks": {"count": len(pieces), "pieces": pieces}}


def _summed(kinds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: sum(d[k] for d in kinds) for k in ("total", "ternary_2bit", "embeddings", "other")}
    out["embedding_bits"] = sorted({b for d in kinds for b in d["embedding_bits"]})
    return out


def _counts(sets: list[dict[str, int] | None]) -> dict[str, int] | None:
    if any(c is None for c in sets):
        return None
    return {u: sum(int(c.get(u, 0)) for c in sets if c) for u in UNITS}


def _combined_check(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """The pieces' checks as one: available when every piece was checked; fits when every piece fits."""
    first = checks[0]
    if not all(c["available"] for c in checks):
        return {**first, "available": False, "from": None, "ok": None, "score": None}
    return {"available": True, "from": "package metadata", "ok": all(c["ok"] for c in checks),
            "score": min(c["score"] for c in checks),
            "violations": [f"piece {k + 1}: {v}" for k, c in enumerate(checks) for v in c["violations"]],
            "warnings": [f"piece {k + 1}: {w}" for k, c in enumerate(checks) for w in c["warnings"]],
            "unit_counts": _counts([c["unit_counts"] for c in checks]), "fallback_plan": first["fallback_plan"],
            "target": first["target"]}


def _model_layer(label: str, units: list[int] | None) -> str:
    """A piece's layer label in the model's numbering: a piece holding units [a, b) (0 the embedding, 1..L the
    decoder layers) numbers its own decoder layers from 0."""
    m = re.fullmatch(r"layer (\d+)", label)
    if m is None or not units:
        return label
    return f"layer {int(m.group(1)) + max(int(units[0]), 1) - 1}"


def _combined_units(sets: list[dict[str, Any]], pieces: list[dict[str, Any]]) -> dict[str, Any]:
    """One compute-unit strip per piece: its layer rows, named ``piece k: layer`` (layers numbered as in the model)."""
    layers = [{**row, "layer": f"piece {k + 1}: {_model_layer(row['layer'], pieces[k]['layers'])}"}
              for k, s in enumerate(sets) for row in s["layers"]]
    return {"available": all(s["available"] for s in sets), "unit_counts": _counts([s["unit_counts"] for s in sets]),
            "fallback_plan": sets[0]["fallback_plan"], "layers": layers}
