"""``convert --chunks auto|N``: one model written as a folder of consecutive packages (``package/chunked.py``).

:func:`bitnet_coreml.convert.convert` loads, runs the passes, checks the whole model (every rule but the
per-file size, which is checked per piece), splits large dimensions and runs the fp16-safety analysis as for
one package; then it hands over here. The graph is cut into pieces (``bitnet_coreml.chunking``: where, and
how many for ``auto``), each piece is checked on its own against the target's rules (a violation stops the
conversion, naming the piece), lowered with the same build options as the unchunked program, converted and
saved; a stateful model cuts the ``prefill`` and ``decode`` graphs at the same places, so every piece holds the
KV-cache states of its own layers and has both functions. The pieces and ``model.json`` are written into a
hidden temporary folder beside ``OUT`` that is renamed into place last: a killed run leaves nothing at ``OUT``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from bitnet_coreml.errors import CheckFailedError, InputError

__all__ = ["Prepared", "check_output", "convert_chunked", "plan_for_model"]

_TMP = ".tmp-"


def check_output(out: Path) -> None:
    """Refuse an output that cannot become a chunked model folder (before any work)."""
    from bitnet_coreml.package.chunked import is_chunked

    if out.suffix == ".mlpackage":
        raise InputError(f"{out}: --chunks writes a folder of packages; name the output without .mlpackage")
    if not out.parent.is_dir():
        raise InputError(f"{out}: the folder {out.parent} does not exist")
    if out.exists() and not is_chunked(out):
        raise InputError(f"{out}: exists and is not a chunked model folder (no model.json); refusing to replace it")


@dataclass
class Prepared:
    """What ``convert`` has done before the pieces are cut (its locals, named)."""

    source: str
    out: Path
    options: Any  # ConvertOptions
    model: ir.Model  # after passes, split and the fp16 plan
    plan: Any  # lower.fp16.Fp16Plan or None
    chunk_plan: Any  # chunking.ChunkPlan (plan_for_options, before the split)
    build: Any  # lower.program.BuildOptions
    platform: str
    want_ios: int
    context: int
    embed_dtype: str
    sha: str
    assets: Mapping[str, bytes]
    summary: Any
    check: dict[str, Any]
    notes: list[str]
    split_notes: list[str]
    fp16_info: dict[str, Any]
    times: dict[str, float]
    t_all: float
    stage: Callable[[str], None]
    passes: dict[str, Any] = field(default_factory=dict)  # the graph pass report (PassReport.to_dict())


def _limit(options: Any) -> int:
    from bitnet_coreml.check.capabilities import default_database, load_capabilities
    from bitnet_coreml.check.target import resolve
    from bitnet_coreml.vocab import Target

    platform, min_os = options.resolved_target()
    db = load_capabilities(*options.capabilities) if options.capabilities else default_database()
    target = resolve(Target(platform=platform, chip=options.chip, min_os=min_os.version if min_os else None), db)
    return int(target.package_limit_bytes)


def plan_for_model(model: ir.Model, requested: int | str, *, embed_bits: int | None, precision: str, limit: int,
                   split_limit: int | None = None, what: str = "model") -> Any:
    """The :class:`~bitnet_coreml.chunking.ChunkPlan` for ``model`` (after the default passes, before or
    after the split): what ``convert --chunks`` cuts and what ``check`` suggests. The size estimate splits at
    ``split_limit`` (0 or None: the capability database's ``max_dimension``)."""
    from bitnet_coreml.chunking import graph_units, plan_chunks, size_of_tensors

    units = graph_units(model.graph, what)
    sizes = size_of_tensors(model, embed_bits=embed_bits, precision=precision, split_limit=split_limit or None)
    return plan_chunks(model, requested, limit=limit, tensor_bytes=sizes, what=what, units=units)


def plan_for_options(model: ir.Model, options: Any, source: str) -> Any:
    """``convert``'s chunk plan: ``options.chunks`` against the target's per-file limit."""
    limit = _limit(options)
    return plan_for_model(model, options.chunks, embed_bits=options.embed_bits, precision=options.precision,
                          limit=limit, split_limit=options.resolved_split_limit(), what=source)


def _boundary_dtype(precision: str) -> ir.DataType:
    return ir.DataType.FLOAT16 if precision == "fp16" else ir.DataType.FLOAT


def _direct(build: Any) -> Any:
    """Which residual stream values the unchunked program builds in fp16 itself (``chunking.cut_model``):
    all of them in a native fp16 build (``lower/program.py``); none in an fp32 one (no cast is needed)."""
    return (lambda _v: True) if build.native_fp16 else None


def _check_piece(piece: ir.Model, k: int, label: str, options: Any, source: str) -> dict[str, Any]:
    from bitnet_coreml.convert import _run_check

    one = dataclasses.replace(options, chunks=None, stateful=False, verify=False, verify_inputs=None)
    try:
        return _run_check(piece, one, f"{source} piece {k}")
    except CheckFailedError as e:
        raise CheckFailedError(f"piece {k} ({label}): {e}") from None


def _stateful_pieces(p: Prepared, ranges: tuple[tuple[int, int], ...]) -> tuple[list[dict[str, ir.Model]], Any]:
    """The prefill/decode graphs of every piece and the whole model's cache kind."""
    from bitnet_coreml.chunking import cut_model, graph_units
    from bitnet_coreml.lower.fp16 import apply_fp16_plan
    from bitnet_coreml.stateful_convert import function_models

    o = p.options
    cache = "fp16x2" if o.precision == "fp32" else "fp16"
    models = function_models(p.source, prefill=o.prefill, context=p.context, prefill_logits=o.prefill_logits,
                             embed_dtype=p.embed_dtype, cache=cache, split_limit=o.resolved_split_limit(),
                             allow_dequant=o.allow_dequant)
    if p.plan is not None:
        for name, m in models.items():
            missing = apply_fp16_plan(m, p.plan)
            if missing:
                p.notes.append(f"{name}: fp32 node(s) of the stateless graph not found by name: {', '.join(missing)}")
    cut = {name: cut_model(m, graph_units(m.graph, f"{p.source} ({name})"), ranges,
                           boundary=_boundary_dtype(o.precision), what=f"{p.source} ({name})", direct=_direct(p.build))
           for name, m in models.items()}
    return [{name: cut[name][k] for name in cut} for k in range(len(ranges))], cache


def convert_chunked(p: Prepared) -> Any:
    """Cut, check, lower and write every piece, then ``model.json``; returns the ``ConvertResult``."""
    from bitnet_coreml.chunking import cut_model, graph_units
    from bitnet_coreml.convert import ConvertResult, finish
    from bitnet_coreml.package.writer import remove_stale_temps, replace_with

    o = p.options
    p.stage("plan chunks")
    t0 = time.perf_counter()
    plan = p.chunk_plan
    limit = plan.limit
    units = graph_units(p.model.graph, p.source)
    pieces = cut_model(p.model, units, plan.ranges, boundary=_boundary_dtype(o.precision), what=p.source,
                       direct=_direct(p.build))
    p.notes.append(f"chunks: {plan.count} piece(s) ({o.chunks}): "
                   + "; ".join(f"{k}: {plan.describe(k)}, ~{b / 1e6:.1f} MB" for k, b in enumerate(plan.piece_bytes))
                   + f" (per-file limit {limit / 1e6:.0f} MB)")
    checks = []
    if o.check:
        p.stage("check pieces")
        checks = [_check_piece(piece, k, plan.describe(k), o, p.source) for k, piece in enumerate(pieces)]
    functions_of: list[dict[str, ir.Model]] | None = None
    cache = None
    if o.stateful:
        functions_of, cache = _stateful_pieces(p, plan.ranges)
    p.times["plan"] = round(time.perf_counter() - t0, 3)

    out = p.out
    remove_stale_temps(out)
    tmp = out.parent / f".{out.name}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        entries = []
        for k, piece in enumerate(pieces):
            fns = functions_of[k] if functions_of is not None else None
            entries.append(_write_piece(p, k, plan, piece, fns, cache, checks[k] if checks else p.check, tmp))
            pieces[k] = None  # type: ignore[call-overload]  # its lowered weights can go
        manifest = _manifest(p, plan, entries, cache)
        from bitnet_coreml.package.chunked import write_manifest

        write_manifest(tmp, manifest)
        p.stage("write folder")
        replace_with(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(e["bytes"] for e in entries)
    result = ConvertResult(
        package=str(out), source=p.source, source_sha256=p.sha, precision=o.precision,
        deployment_target=manifest["deployment_target"], package_bytes=total,
        weight_bytes=sum(e["weight_bytes"] for e in entries), params_ternary=p.summary.params_ternary,
        params_other=p.summary.params_other, bitlinear_layers=len(p.summary.bitlinear), notes=p.notes,
        fp16=p.fp16_info, split=p.split_notes, embed=manifest.get("embed", {}), check=p.check,
        inputs={i["name"]: i["name"] for i in manifest["pieces"][0]["functions"][manifest["default_function"]]["inputs"]},
        outputs={i["name"]: i["name"] for i in manifest["pieces"][-1]["functions"][manifest["default_function"]]["outputs"]},
        stateful=manifest["stateful"], passes=p.passes,
    )
    result_dict_chunks = {"count": plan.count, "plan": plan.to_dict(), "pieces": [e["path"] for e in entries]}
    result.notes.append(f"chunked model folder: {json.dumps(result_dict_chunks['pieces'])} + model.json")
    return finish(result, p.source, out, o, p.times, p.t_all, p.stage)


def _write_piece(p: Prepared, k: int, plan: Any, piece: ir.Model, functions: dict[str, ir.Model] | None,
                 cache: str | None, check: dict[str, Any], folder: Path) -> dict[str, Any]:
    from bitnet_coreml.convert import package_metadata
    from bitnet_coreml.lower.palettize import palettize_program
    from bitnet_coreml.lower.program import build_functions, build_program, convert_program
    from bitnet_coreml.package.chunked import piece_name, piece_sha256
    from bitnet_coreml.package.stateful import DEFAULT_FUNCTION, StatefulInfo, function_specs
    from bitnet_coreml.package.writer import describe, package_files, save_package, weight_bytes
    from bitnet_coreml.passes.layers import layer_groups, run_lengths
    from bitnet_coreml.vocab import os_for_ios

    o = p.options
    label = plan.describe(k)
    p.stage(f"piece {k + 1}/{plan.count}: lower to MIL ({label})")
    t0 = time.perf_counter()
    info = None
    if functions is not None:
        built = build_functions(functions, DEFAULT_FUNCTION, p.build)
        from bitnet_coreml.lower.program import graph_states

        states = {}
        for m in functions.values():
            raw = m.metadata_props.get("bitnet_coreml.states")
            states.update({s: v for s, v in json.loads(raw or "{}").items() if s in graph_states(m)})
        info = StatefulInfo(context=p.context, prefill=o.prefill, prefill_logits=o.prefill_logits, states=states,
                            cache=cache or "fp16")
    else:
        built = build_program(piece, p.build)
    embed: dict[str, Any] = {}
    if o.embed_bits:
        embed = palettize_program(built.program, o.embed_bits)
    p.times["lower"] = round(p.times.get("lower", 0.0) + time.perf_counter() - t0, 3)
    p.stage(f"piece {k + 1}/{plan.count}: convert (coremltools passes)")
    t0 = time.perf_counter()
    mlmodel = convert_program(built, o.precision, platform=p.platform, pipeline=o.passes)
    p.times["coremltools"] = round(p.times.get("coremltools", 0.0) + time.perf_counter() - t0, 3)
    target_name = os_for_ios(max(built.ios, p.want_ios), p.platform).name
    layers = {"groups": run_lengths(layer_groups(piece.graph)), "residual": []}
    meta = package_metadata(p.source, p.sha, o, p.summary, p.fp16_info, check, layers, p.split_notes, built,
                            target_name)
    a, b = plan.ranges[k]
    meta["bitnet_coreml.chunk"] = json.dumps({"index": k, "count": plan.count, "units": [a, b], "label": label},
                                             sort_keys=True)
    desc = f"piece {k + 1} of {plan.count} of BitNet model {Path(p.source).name}: {label}, {o.precision}"
    if info is not None:
        from bitnet_coreml.package.stateful import describe_functions, metadata_entries

        meta.update(metadata_entries(info))
        describe_functions(mlmodel, info)
    describe(mlmodel, short_description=desc, metadata=meta, input_descriptions={}, output_descriptions={})
    p.stage(f"piece {k + 1}/{plan.count}: write")
    t0 = time.perf_counter()
    name = piece_name(k)
    save_package(mlmodel, folder / name, assets=p.assets if k == 0 else None)
    del mlmodel, built
    p.times["write"] = round(p.times.get("write", 0.0) + time.perf_counter() - t0, 3)
    from bitnet_coreml.package.reader import read_package_spec

    fns = {f["name"]: {"inputs": [_feat(x) for x in f["inputs"]], "outputs": [_feat(x) for x in f["outputs"]],
                       "states": [x["name"] for x in f["states"]], "default": f["default"]}
           for f in function_specs(read_package_spec(folder / name).spec)}
    L = plan.layers
    written = weight_bytes(folder / name)
    if plan.limit is not None and written > plan.limit:
        raise CheckFailedError(f"piece {k} ({label}): its weight file is {written:,} B, over the per-file limit "
                               f"{plan.limit:,} B (estimated {plan.piece_bytes[k]:,} B); convert with more --chunks")
    return {"path": name, "sha256": piece_sha256(folder / name), "bytes": sum(package_files(folder / name).values()),
            "weight_bytes": weight_bytes(folder / name), "estimated_weight_bytes": plan.piece_bytes[k],
            "units": [a, b], "layers": [max(a, 1) - 1, min(b, L + 1) - 1], "embedding": a == 0,
            "lm_head": b == L + 2, "label": label, "deployment_target": target_name, "functions": fns,
            "states": dict(sorted(info.states.items())) if info is not None else {}, "embed": embed}


def _feat(x: dict[str, Any]) -> dict[str, Any]:
    return {"name": x["name"], "shape": list(x.get("shape", [])), "dtype": x.get("dtype")}


def _manifest(p: Prepared, plan: Any, entries: list[dict[str, Any]], cache: str | None) -> dict[str, Any]:
    from bitnet_coreml import __version__
    from bitnet_coreml.chunking import boundary_name
    from bitnet_coreml.package.chunked import FORMAT, VERSION
    from bitnet_coreml.package.stateful import StatefulInfo

    o = p.options
    first = entries[0]["functions"]
    default = next((n for n, f in first.items() if f["default"]), sorted(first)[0])
    boundaries = []
    for k in range(len(entries) - 1):
        name = boundary_name(plan.ranges[k][1] - 1)
        shapes, dtype = {}, None
        for fn, f in entries[k]["functions"].items():
            feat = next(x for x in f["outputs"] if x["name"] == name)
            shapes[fn], dtype = feat["shape"], feat["dtype"]
        boundaries.append({"name": name, "from": k, "to": k + 1, "dtype": dtype, "shape": shapes})
    stateful = None
    if o.stateful:
        states = {s: shape for e in entries for s, shape in e["states"].items()}
        stateful = StatefulInfo(context=p.context, prefill=o.prefill, prefill_logits=o.prefill_logits,
                                states=states, cache=cache or "fp16").to_dict()
    targets = sorted({e["deployment_target"] for e in entries})
    return {
        "format": FORMAT, "version": VERSION, "bitnet_coreml_version": __version__,
        "source": Path(p.source).name, "source_sha256": p.sha, "precision": o.precision,
        "embed_bits": o.embed_bits or 16, "platform": p.platform, "deployment_target": targets[-1],
        "chunks": {"requested": o.chunks, "count": plan.count, "limit_bytes": plan.limit},
        "functions": sorted(first), "default_function": default, "stateful": stateful,
        "pieces": [{k: v for k, v in e.items() if k not in ("deployment_target", "embed")} for e in entries],
        "boundaries": boundaries,
    }
