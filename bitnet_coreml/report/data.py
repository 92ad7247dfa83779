"""Collect a package's report data from what the project already computes.

Nothing here re-derives a number another stage owns: the check verdict, score and per-op compute
units come from :func:`bitnet_coreml.check.run_check` (run on the source, or the summary the
converter stored in the package metadata), parity from :mod:`bitnet_coreml.verify`'s inputs and
comparisons, fp16 maxima from the per-layer table :func:`bitnet_coreml.lower.fp16.make_fp16_safe`
stored at conversion, layer membership from :mod:`bitnet_coreml.passes.layers`, op timings and the
activation liveness from the reference executor. The result is one JSON-ready dict
(``docs/schemas/report.schema.json``); :mod:`bitnet_coreml.report.html` draws it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml import __version__
from bitnet_coreml.errors import InputError, ModelLoadError
from bitnet_coreml.frontend import builds_graph
from bitnet_coreml.package.chunked import is_chunked
from bitnet_coreml.report.source import SourceHash, source_check

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
WORST_POSITIONS = 5
UNITS = ("ANE", "GPU", "CPU")
_EMBED_CONSUMERS = frozenset({"gather", "gather_along_axis", "gather_nd", "matmul", "linear"})


def finite(x: Any) -> Any:
    """JSON has no inf/nan: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def _meta_json(meta: Mapping[str, str], key: str, default: Any) -> Any:
    raw = meta.get(key)
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return default


# --- the package itself ---------------------------------------------------------------------------------


def bytes_by_kind(program: Any, package: Path) -> dict[str, Any]:
    """Package bytes split into 2-bit ternary weights, embeddings / LM head (at their bits) and the rest.

    Read from the program's constants: a ``constexpr_lut_to_dense`` whose lookup table has 4 entries,
    all in {-1, 0, 1}, is a ternary weight (2 bits per element); any other lookup table is a
    palettized embedding / LM head (log2(entries) bits); a float constant of rank >= 2 read by a
    gather or matmul is an fp16 (fp32) embedding / LM head. Everything else (scales, norms, tables,
    the program, blob headers) is ``other``, so the three add up to the package's bytes.
    """
    from bitnet_coreml.package.writer import package_files

    total = sum(package_files(package).values())
    ternary = embed = 0
    embed_bits: set[int] = set()
    for func in program.functions.values():
        for op in func.operations:
            if op.op_type == "constexpr_lut_to_dense":
                lut = np.asarray(op.inputs["lut"].val)
                n = int(np.prod(op.outputs[0].shape))
                entries = int(lut.shape[-2] if lut.ndim > 1 else lut.shape[0])
                bits = max(1, int(round(math.log2(entries))))
                payload = (n * bits + 7) // 8 + (lut.nbytes if lut.size >= 10 else 0)
                if entries == 4 and set(np.unique(lut.astype(np.float32)).tolist()) <= {-1.0, 0.0, 1.0}:
                    ternary += payload
                else:
                    embed += payload
                    embed_bits.add(bits)
            elif op.op_type == "const":
                val = op.outputs[0].val
                if not isinstance(val, np.ndarray) or val.ndim < 2 or val.dtype.kind != "f":
                    continue
                children = {c.op_type for c in op.outputs[0].child_ops}
                if children & _EMBED_CONSUMERS:
                    embed += val.nbytes
                    embed_bits.add(val.dtype.itemsize * 8)
    return {"total": total, "ternary_2bit": ternary, "embeddings": embed,
            "embedding_bits": sorted(embed_bits), "other": total - ternary - embed}


def _state_info(ex: Any, meta: Mapping[str, str]) -> dict[str, Any] | None:
    """KV cache (state) bytes of a stateful package, and how they grow with the context length."""
    specs = ex.state_specs
    if not specs:
        return None
    per_state = {n: int(np.prod([d or 0 for d in s.shape], dtype=np.int64)) * s.dtype.itemsize for n, s in specs.items()}
    total = sum(per_state.values())
    ctx = (_meta_json(meta, "bitnet_coreml.stateful", {}) or {}).get("context")
    if ctx is None:  # KV layouts put the sequence axis second to last: [..., context, head_dim]
        shapes = [s.shape for s in specs.values() if len(s.shape) >= 2]
        ctx = shapes[0][-2] if shapes else None
    context = int(ctx) if ctx else None
    return {"bytes": total, "states": per_state, "context_length": context,
            "bytes_per_token": total / context if context else None}


# --- check, units per layer -----------------------------------------------------------------------------


def _check_target(meta: Mapping[str, str], given: Any) -> Any:
    """The check Target: ``given``, else the one the converter checked the package for (its metadata), else None."""
    from bitnet_coreml.check import Target

    if given is not None:
        return given
    t = _meta_json(meta, "bitnet_coreml.check", {}).get("target") or {}
    if not t.get("platform"):
        return None
    min_os = t.get("min_os") if t.get("min_os_how") == "given" else None
    return Target(t["platform"], t.get("chip"), min_os)


def _units_by_layer(units: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    from bitnet_coreml.passes.layers import group_order

    rows: dict[str, dict[str, Any]] = {lab: {"layer": lab, "ops": [], "counts": dict.fromkeys(UNITS, 0)}
                                       for lab in group_order(labels)}
    for u, lab in zip(units, labels, strict=True):
        rows[lab]["ops"].append({k: u[k] for k in ("node", "op_type", "unit", "reason")})
        rows[lab]["counts"][u["unit"]] += 1
    return list(rows.values())


# --- parity ---------------------------------------------------------------------------------------------


def _worst_positions(ref: np.ndarray, got: np.ndarray, draws: int) -> list[dict[str, Any]]:
    """Per token position of a logits output: cosine, max |diff| and argmax agreement; the worst first."""
    r = np.asarray(ref, np.float64).reshape(-1, ref.shape[-1])
    g = np.asarray(got, np.float64).reshape(-1, got.shape[-1])
    nr, ng = np.linalg.norm(r, axis=1), np.linalg.norm(g, axis=1)
    with np.errstate(all="ignore"):
        cos = np.where((nr > 0) & (ng > 0), np.einsum("ij,ij->i", r, g) / (nr * ng), np.where(nr == ng, 1.0, 0.0))
    cos = np.where(np.isfinite(cos), cos, 0.0)
    mx = np.abs(r - g).max(axis=1)
    per_draw = max(1, r.shape[0] // max(draws, 1))
    order = np.lexsort((-mx, cos))[:WORST_POSITIONS]
    return [{"input": int(i // per_draw), "position": int(i % per_draw), "cosine": float(cos[i]),
             "max_abs": float(mx[i]), "top1_match": bool(r[i].argmax() == g[i].argmax())} for i in order]


def _mil_op_for(node_index: int, names: set[str]) -> str | None:
    """The MIL op holding residual add ``node_index``'s output: the last ``add`` op the lowering named ``n<i>_<j>``."""
    # coremltools' fp16 cast pass renames the ops it rewrites (``n12_0_cast_fp16``)
    pat = re.compile(rf"n{node_index}_(\d+)(?:_[a-z0-9_]+)?")
    cands = sorted((int(m.group(1)), n) for n in names if (m := pat.fullmatch(n)))
    return cands[-1][1] if cands else None


def _checkpoint_seq_len(pkg: Path, spec: Any, meta: Mapping[str, str]) -> int:
    from bitnet_coreml.verify import package_seq_len

    return package_seq_len(pkg, spec, _meta_json(meta, "bitnet_coreml.input_names", {}))


def _load_source(source: Any, seq_len: int | None, embed_dtype: str = "float32") -> Any:
    """The source after the default passes (``embed_dtype="float16"``: as the converter loads a checkpoint for fp16)."""
    from bitnet_coreml.frontend import load
    from bitnet_coreml.passes import run_default_passes

    model = load(source, seq_len=seq_len, embed_dtype=embed_dtype)
    run_default_passes(model)
    return model


def _check_and_units(meta: Mapping[str, str], model: Any, check_target: Any, source: Any,
                     stored: Mapping[str, Any] | None, notes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The check verdict and the compute units per layer.

    From the converter's check stored in the package (``stored``: its per-node units, with the layer of
    every node in ``bitnet_coreml.layers``), else from ``run_check`` on ``model`` (the source).
    """
    check_meta = _meta_json(meta, "bitnet_coreml.check", {})
    units: dict[str, Any] = {"available": False, "unit_counts": check_meta.get("unit_counts"),
                             "fallback_plan": check_meta.get("fallback_plan", []), "layers": []}
    if model is not None and check_target is not None:
        from bitnet_coreml.check import run_check
        from bitnet_coreml.passes.layers import layer_groups

        bits = meta.get("bitnet_coreml.embed_bits", "16")
        rep = run_check(model, check_target, embed_bits=None if bits in ("16", "") else int(bits),
                        precision=meta.get("bitnet_coreml.precision", "fp16"), source=str(source))
        cd = rep.to_dict()
        check = {"available": True, "from": "source", "ok": cd["ok"], "score": cd["score"],
                 "violations": [v["message"] for v in cd["violations"]],
                 "warnings": [w["message"] for w in cd["warnings"]], "unit_counts": cd["unit_counts"],
                 "fallback_plan": cd["fallback_plan"], "target": cd["target"]}
        units = {"available": True, "unit_counts": cd["unit_counts"], "fallback_plan": cd["fallback_plan"],
                 "layers": _units_by_layer(cd["units"], layer_groups(model.graph))}
    elif check_meta.get("available") and (stored is not None or source is None):
        check = {"available": True, "from": "package metadata", "ok": not check_meta.get("violations"),
                 "score": round(float(check_meta["score"]), 6), "violations": [],
                 "warnings": list(check_meta.get("warnings", [])), "unit_counts": check_meta.get("unit_counts"),
                 "fallback_plan": check_meta.get("fallback_plan", []), "target": check_meta.get("target")}
        groups = _meta_json(meta, "bitnet_coreml.layers", {}).get("groups")
        if stored is not None and groups:
            from bitnet_coreml.passes.layers import expand_runs

            reasons = stored["reasons"]
            ops = [{"node": n, "op_type": t, "unit": reasons[r][0], "reason": reasons[r][1]} for n, t, r in stored["ops"]]
            units = {"available": True, "unit_counts": check_meta.get("unit_counts"),
                     "fallback_plan": check_meta.get("fallback_plan", []),
                     "layers": _units_by_layer(ops, expand_runs(groups))}
        else:
            notes.append("compute units per op need the source model (--source) or a package converted by this "
                         "version; the totals come from the package")
    else:
        check = {"available": False, "from": None, "ok": None, "score": None, "violations": [], "warnings": [],
                 "unit_counts": None, "fallback_plan": [], "target": None}
        notes.append("the package was converted without a check (--no-check) and no target was given: "
                     "no check verdict or compute units")
    return check, units


# --- the whole report -----------------------------------------------------------------------------------


def collect(package: str | os.PathLike[str], source: str | os.PathLike[str] | None = None,
            inputs: str | os.PathLike[str] | None = None, *, seq_len: int | None = None,
            target: Any = None, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Everything the report shows, as one JSON-ready dict (``docs/schemas/report.schema.json``).

    ``target`` (a :class:`bitnet_coreml.check.Target`) is what the check on ``source`` runs for; by
    default the target the converter checked the package for (none when converted without a check).
    ``progress``, when given, is called with the sections known so far (a JSON-ready partial report, each
    section as it ends up in the result) as they become known, so that charts can be drawn while the
    package and the source still run (:class:`bitnet_coreml.report.worker.ChartWorker`).
    """
    from bitnet_coreml.verify import package_meta

    t_start = time.perf_counter()
    pkg = Path(package)
    if not pkg.exists():
        raise ModelLoadError(f"{pkg}: no such package")
    if source is not None and not Path(source).exists():
        raise InputError(f"--source {source}: no such file or folder")
    if inputs is not None and not Path(inputs).is_file():
        raise InputError(f"--input {inputs}: no such file")
    meta, spec = package_meta(pkg)
    if "bitnet_coreml.version" not in meta:
        raise InputError(f"{pkg}: has no bitnet_coreml metadata; the report covers packages made by bitnet-coreml convert")
    precision = meta.get("bitnet_coreml.precision", "fp16")
    check_meta = _meta_json(meta, "bitnet_coreml.check", {})
    chunked = is_chunked(pkg)
    notes: list[str] = []
    tell = progress or (lambda _part: None)

    data: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "generated_by": f"bitnet-coreml {__version__}",
        "package": str(pkg), "source": str(source) if source is not None else None,
        "inputs": str(inputs) if inputs is not None else None, "notes": notes,
    }
    needs_run = source is not None or inputs is not None
    given_source = str(source) if source is not None else None

    # --- the source: loaded as verify loads it, and hashed in a thread from here on (it overlaps the rest)
    why_no_parity = "parity needs the source model (--source)"
    src = None
    hashed: SourceHash | None = None
    if source is not None and "bitnet_coreml.stateful" in meta:
        # verify compares whole-sequence graphs; a stateful package runs token by token through its KV cache
        notes.append(f"{pkg} is stateful (KV cache): parity against the source is not measured by the report; "
                     "the check and compute units come from the package")
        hashed = SourceHash(source)
        source = None
        needs_run = inputs is not None
        why_no_parity = "stateful package: parity by depth is measured on whole-sequence packages only"
    if source is not None and seq_len is None and builds_graph(source):
        seq_len = _checkpoint_seq_len(pkg, spec, meta)
    if source is not None:
        from bitnet_coreml.frontend import load

        src = load(source, seq_len=seq_len)  # the unrewritten graph, exactly what verify runs
        hashed = SourceHash(source, src)

    # --- check and units: the converter's check stored in the package, else `check` re-run on the source
    fp16 = _fp16_section(meta, precision)
    if not chunked:
        check_target = _check_target(meta, target)
        stored = check_meta.get("units") if target is None and check_meta.get("available") else None
        model = None
        if source is not None and check_target is not None and stored is None:
            model = _load_source(source, seq_len)
        check, units = _check_and_units(meta, model, check_target, source, stored, notes)
        del model
        tell(finite({"units": units, "fp16": fp16}))

    # --- the package in the reference executor (a chunked folder: its pieces in order): bytes by kind, memory
    from bitnet_coreml.executor.chunked import open_executor

    t0 = time.perf_counter()
    ex = open_executor(str(pkg))
    load_seconds = time.perf_counter() - t0
    chunks = None
    if chunked:  # every piece's own check, units, bytes (report/chunked.py)
        from bitnet_coreml.report.chunked import piece_sections

        pieces = piece_sections(pkg, ex, notes)
        check, units, by_kind, weights, chunks = (pieces[k] for k in ("check", "units", "bytes_by_kind",
                                                                       "weight_bytes", "chunks"))
        tell(finite({"units": units, "fp16": fp16}))
    else:
        from bitnet_coreml.package.writer import weight_bytes

        by_kind = bytes_by_kind(ex.program, pkg)
        weights = weight_bytes(pkg)
    activation_peak = ex.peak_activation_bytes()
    state = _state_info(ex, meta)
    device_limit, device = _device_limit(check.get("target"))
    size = {"package_bytes": by_kind["total"], "weight_bytes": weights,
            "activation_peak_bytes": activation_peak, "state": state,
            "peak_estimate_bytes": weights + activation_peak + (state["bytes"] if state else 0), "device": device,
            "device_limit_bytes": device_limit, "executor_load_seconds": round(load_seconds, 3)}
    tell(finite({"summary": {"bytes_by_kind": by_kind}, "size": size}))

    # --- parity (verify's inputs and comparisons) plus the residual stream by depth, and op timings
    parity: dict[str, Any] = {**_NO_PARITY, "why_unavailable": why_no_parity}
    timing: dict[str, Any] = {**_NO_TIMING}
    specs = ex.input_specs
    run = None
    if needs_run:
        run, timing = _trace(meta, ex, src, source, inputs, seq_len, notes, residual=not chunked)
        tell(finite({"timing": timing}))
    del ex  # not needed any more: ONNX Runtime runs the source without the package's weights beside it
    if run is not None and src is not None:
        parity = _parity(pkg, meta, run, src, source, notes, hashed)
        tell(finite({"parity": parity}))
    del src, run

    src_check = source_check(meta.get("bitnet_coreml.source_sha256"), given_source,
                             hashed.result() if hashed is not None else None, notes)
    verdict_check = "not checked" if not check["available"] else ("fits" if check["ok"] else "does not fit")
    pr = parity.get("report")
    data["summary"] = {
        "model": meta.get("bitnet_coreml.source"), "source_sha256": meta.get("bitnet_coreml.source_sha256"),
        "source_check": src_check,
        "converter_version": meta.get("bitnet_coreml.version"), "precision": precision,
        "deployment_target": meta.get("bitnet_coreml.deployment_target"),
        "target": check.get("target") or check_meta.get("target"),
        "bitlinear_layers": int(meta.get("bitnet_coreml.bitlinear_layers", 0)),
        "params_ternary": int(meta.get("bitnet_coreml.params_ternary", 0)),
        "params_other": int(meta.get("bitnet_coreml.params_other", 0)),
        "package_bytes": by_kind["total"], "bytes_by_kind": by_kind,
        "inputs": {k: [d for d in s.shape] for k, s in specs.items()},
        "check": {**{k: check[k] for k in ("available", "from", "ok", "score", "violations", "warnings")},
                  "verdict": verdict_check},
        "parity": {"available": pr is not None, "passed": pr["passed"] if pr else None,
                   "verdict": "not measured" if pr is None else ("passed" if pr["passed"] else "failed"),
                   "comparison": _headline(pr)},
    }
    data["units"] = units
    data["fp16"] = fp16
    data["parity"] = parity
    data["size"] = size
    data["timing"] = timing
    data["chunks"] = chunks
    data["seconds"] = round(time.perf_counter() - t_start, 3)
    return finite(data)


def _fp16_section(meta: Mapping[str, str], precision: str) -> dict[str, Any]:
    """The fp16 headroom section: the per-layer table the converter stored (``bitnet_coreml.fp16_safety``)."""
    fp16_meta = _meta_json(meta, "bitnet_coreml.fp16_safety", {})
    out = {"available": bool(fp16_meta.get("layers")), "precision": precision,
           "fp16_max": fp16_meta.get("fp16_max"), "limit": fp16_meta.get("limit"),
           "calibration": fp16_meta.get("calibration"),
           "calibration_max_abs": fp16_meta.get("calibration_max_abs"),
           "layers": fp16_meta.get("layers", []), "rescaled": fp16_meta.get("rescaled", []),
           "fp32_nodes": fp16_meta.get("fp32_nodes", []), "notes": fp16_meta.get("notes", [])}
    if precision == "fp32":
        out["why_unavailable"] = "fp32 package: nothing is stored in fp16"
    elif not fp16_meta.get("layers"):
        out["why_unavailable"] = "the package predates per-layer fp16 statistics; convert it again"
    return out


_NO_PARITY: dict[str, Any] = {"available": False, "report": None, "depth": [], "worst_positions": [], "output": None,
                              "draws": 0, "why_unavailable": None}
_NO_TIMING: dict[str, Any] = {"available": False, "seconds": None, "by_family": {}, "calls": {},
                              "outside_ops_seconds": None,
                              "why_unavailable": "op timings need an input (--input X.npz)"}


def _headline(pr: dict[str, Any] | None) -> dict[str, Any] | None:
    """The comparison the summary shows: the reference executor vs ONNX Runtime on the first output."""
    if not pr:
        return None
    for c in pr["comparisons"]:
        if c["runner"] == "reference-executor" and c["reference"] == "onnxruntime":
            return c
    return pr["comparisons"][0] if pr["comparisons"] else None


def _device_limit(target: Mapping[str, Any] | None) -> tuple[int | None, str | None]:
    """The memory limit of the target's GPU device row in the capability database (bytes), if known."""
    if not target or not target.get("gpu_device"):
        return None, None
    from bitnet_coreml.check.capabilities import default_database

    try:
        dev = default_database().device(target["gpu_device"])
    except InputError:
        return None, target["gpu_device"]
    mb = dev.memory_limit_mb
    return (int(mb * (1 << 20)) if mb else None), dev.name


class _Traced:
    """The package's run on verify's inputs (:func:`_trace`), what :func:`_parity` compares with the source."""

    def __init__(self, feed_list: list[dict[str, np.ndarray]], extra: dict[str, np.ndarray],
                 pfeeds: list[dict[str, np.ndarray]], traces: list[Any], capture: dict[str, str],
                 points: list[tuple[str, str, str]]) -> None:
        self.feed_list, self.extra, self.pfeeds, self.traces = feed_list, extra, pfeeds, traces
        self.capture = capture  # ONNX value -> package op
        self.points = points  # (label, layer, ONNX value)


def _trace(meta: Mapping[str, str], ex: Any, src: Any, source: Any, inputs: Any, seq_len: int | None,
           notes: list[str], *, residual: bool = True) -> tuple[_Traced, dict[str, Any]]:
    """Run the package on verify's inputs (those of ``src``, the source loaded from ``source``, when given),
    keeping the residual stream (``residual``); op timings with ``inputs``."""
    from bitnet_coreml.verify import feeds_for, package_feeds

    precision = meta.get("bitnet_coreml.precision", "fp16")
    in_names = _meta_json(meta, "bitnet_coreml.input_names", {})
    capture: dict[str, str] = {}
    points: list[tuple[str, str, str]] = []
    if src is not None:
        feed_list, extra = feeds_for(src, inputs)
        names = {s.ctx.name for s in ex._block.steps if s.ctx.op_type == "add"} if residual else set()
        if not residual:
            notes.append("parity by depth: a chunked model is compared at its outputs (its pieces record no "
                         "residual stream)")
        for label, layer, value, index in (_residual_stream(meta, src, source, seq_len, precision, notes)
                                           if residual else []):
            op = _mil_op_for(index, names)
            if op is None:
                notes.append(f"parity by depth: no package op for {label} ({value}); left out")
                continue
            capture[value] = op
            points.append((label, layer, value))
    else:
        feed_list, extra = feeds_for(_input_model(ex, in_names), inputs)
    pfeeds = [package_feeds(f, in_names, ex.input_specs) for f in feed_list]
    profile = inputs is not None
    traces = [ex.trace(pf, capture=set(capture.values()), profile=profile,
                       state=ex.make_state() if ex.is_stateful else None) for pf in pfeeds]
    timing: dict[str, Any] = {**_NO_TIMING}
    if profile:
        tr = traces[0]
        fam = {k: round(v, 6) for k, v in sorted(tr.by_family.items(), key=lambda kv: -kv[1])}
        timing = {"available": True, "seconds": round(tr.seconds, 6), "by_family": fam, "calls": dict(tr.calls),
                  "outside_ops_seconds": round(max(0.0, tr.seconds - sum(tr.by_family.values())), 6),
                  "why_unavailable": None}
    return _Traced(feed_list, extra, pfeeds, traces, capture, points), timing


def _parity(pkg: Path, meta: Mapping[str, str], run: _Traced, src: Any, source: Any, notes: list[str],
            hashed: SourceHash | None) -> dict[str, Any]:
    """The package's run against the source's in ONNX Runtime: verify's comparisons, parity by depth, worst positions."""
    from bitnet_coreml.lower.fp16 import run_ort
    from bitnet_coreml.verify import ParityReport, Thresholds, compare, metrics, stack, unit_runs

    precision = meta.get("bitnet_coreml.precision", "fp16")
    out_names = _meta_json(meta, "bitnet_coreml.output_names", {})
    capture, traces = run.capture, run.traces
    if hashed is not None:
        hashed.graph_read()  # run_ort changes the graph for its run
    ort_runs = [run_ort(src, f, values=list(capture)) for f in run.feed_list]
    graph_outs = [n for n in ort_runs[0] if n not in capture]
    ort_out = stack([{k: r[k] for k in graph_outs} for r in ort_runs])
    runs = {"reference-executor": stack([t.outputs for t in traces])}
    report = ParityReport(str(source), str(pkg), precision, Thresholds.for_precision(precision))
    runs.update(unit_runs(pkg, run.pfeeds, None, report))  # the compute units, exactly as verify runs them
    compare(report, runs, ort_out, run.extra, out_names)
    depth = []
    for label, layer, value in run.points:
        if value not in ort_runs[0]:
            continue
        ref = np.concatenate([r[value].reshape(-1) for r in ort_runs])
        got = np.concatenate([t.values[capture[value]].reshape(-1) for t in traces])
        if ref.size != got.size:
            notes.append(f"parity by depth: {label} has {ref.size} values in ONNX Runtime, {got.size} in the package")
            continue
        m = metrics(ref, got)
        depth.append({"label": label, "layer": layer, "value": value, "cosine": m["cosine"],
                      "rel_l2": m["rel_l2"], "max_abs": m["max_abs"]})
    for c in report.comparisons:  # the outputs: verify's own comparison, not computed twice
        if c.runner == "reference-executor" and c.reference == "onnxruntime":
            depth.append({"label": f"output {c.output}", "layer": "head", "value": c.output, "cosine": c.cosine,
                          "rel_l2": c.rel_l2, "max_abs": c.max_abs})
    worst: list[dict[str, Any]] = []
    logits = next((k for k, v in ort_out.items() if v.ndim >= 2 and v.shape[-1] >= 2), None)
    if logits is not None and out_names.get(logits, logits) in runs["reference-executor"]:
        worst = _worst_positions(ort_out[logits], runs["reference-executor"][out_names.get(logits, logits)],
                                 len(run.feed_list))
    return {"available": True, "report": report.to_dict(), "depth": depth, "worst_positions": worst,
            "output": logits, "draws": len(run.feed_list), "why_unavailable": None}


def _residual_stream(meta: Mapping[str, str], src: Any, source: Any, seq_len: int | None, precision: str,
                     notes: list[str]) -> list[tuple[str, str, str, int]]:
    """(label, layer, value named as in ``src``, node index in the converter's graph) of every residual add.

    The converter stores them (``bitnet_coreml.layers`` -> ``residual``). When those value names are not
    in ``src`` (a checkpoint graph numbers its values, and the converter imports the embedding as fp16
    for fp16 builds, which adds a node), they are found again: on the source as verify loads it (the
    names) and as the converter loaded it (the node numbering), paired in order.
    """
    from bitnet_coreml.lower.program import assign_node_names
    from bitnet_coreml.lower.split import split_large_dims
    from bitnet_coreml.passes.layers import residual_points

    stored = _meta_json(meta, "bitnet_coreml.layers", {}).get("residual")
    have = {o.name for n in src.graph for o in n.outputs}
    if stored and all(r["value"] in have for r in stored):
        return [(r["label"], r["layer"], r["value"], int(r["node_index"])) for r in stored]
    model = _load_source(source, seq_len)
    named = residual_points(model.graph)
    if builds_graph(source) and precision == "fp16":
        model = _load_source(source, seq_len, "float16")
    converted = residual_points(model.graph)
    if len(converted) != len(named):
        notes.append("parity by depth: the converter's graph has a different residual stream; left out")
        return []
    assign_node_names(model.graph)
    if _meta_json(meta, "bitnet_coreml.split", []):
        split_large_dims(model)  # the converter's node numbering includes the split nodes
        assign_node_names(model.graph)
    index = {str(n.outputs[0].name): i for i, n in enumerate(model.graph) if n.outputs}
    return [(p.label, p.layer, p.value, index[q.value]) for p, q in zip(named, converted, strict=True)
            if q.value in index]


class _InputModel:
    """Just enough of a model for ``feeds_for`` when there is no source: the package's inputs."""

    def __init__(self, specs: Mapping[str, Any]) -> None:
        import onnx_ir as ir

        self.graph = ir.Graph([ir.Value(name=n, shape=ir.Shape(list(s.shape)),
                                        type=ir.TensorType(ir.DataType.from_numpy(s.dtype)))
                               for n, s in specs.items()], [], nodes=[])


def _input_model(ex: Any, in_names: Mapping[str, str]) -> Any:
    back = {v: k for k, v in in_names.items()}
    if any(d is None for s in ex.input_specs.values() for d in s.shape):
        raise InputError(f"{ex.source}: has flexible input shapes; give --source to build inputs")
    return _InputModel({back.get(n, n): s for n, s in ex.input_specs.items()})


def unit_table(units: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """(unit, reason, count) over every op, most frequent first: the legend beside the compute-unit grid."""
    c: Counter[tuple[str, str]] = Counter()
    for layer in units.get("layers", []):
        for op in layer["ops"]:
            c[(op["unit"], op["reason"])] += 1
    return [(u, r, n) for (u, r), n in sorted(c.items(), key=lambda kv: (UNITS.index(kv[0][0]) if kv[0][0] in UNITS
                                                                          else 9, -kv[1]))]
