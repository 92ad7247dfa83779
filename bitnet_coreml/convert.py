"""The whole conversion: load -> passes -> check -> ANE rewrites -> fp16 safety -> lower -> package.

``convert(source, out, options)`` writes one ``.mlpackage`` atomically and deterministically and
returns a :class:`ConvertResult` (timings, sizes, notes, what the fp16-safety analysis did, the
check summary and, with ``verify=True``, the parity report). Ternary weights never exist as fp16 or
fp32 dense arrays: they go from int8 codes straight to 2-bit LUT indices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from bitnet_coreml import __version__
from bitnet_coreml.errors import CheckFailedError, InputError, set_stage
from bitnet_coreml.vocab import MinOs, os_for_ios, parse_embed_bits, parse_os, resolve_target

log = logging.getLogger(__name__)

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert. ``min_os`` (``"iOS17"``, ``"macOS14.4"``, ``"17"``: :func:`bitnet_coreml.vocab.parse_os`)
    overrides the deployment target chosen from the program; ``target`` defaults to the platform
    ``min_os`` names, else ``ios``. ``capabilities`` are extra capability files for the check."""

    precision: str = "fp16"
    embed_bits: int | None = None
    calibration: str | None = None
    target: str | None = None
    chip: str | None = None
    min_os: str | None = None
    capabilities: tuple[str, ...] = ()
    split_limit: int | None = None  # None: the capability database's max_dimension (bitnet_coreml.opsupport)
    check: bool = True
    verify: bool = False
    verify_inputs: str | None = None  # .npz of test inputs for the verify step (default: random tokens)
    seq_len: int | None = None
    allow_dequant: bool = False  # GGUF: dequantise other ggml types instead of refusing (frontend.gguf_model)
    passes: str = "fast"  # coremltools pass pipeline: "fast" (what our programs need) or "full" (its default)
    # stateful LLM package (KV cache as Core ML state; functions prefill and decode): see package/stateful.py
    stateful: bool = False
    context: int = 512
    prefill: int = 64
    prefill_logits: str = "all"
    exact_context: bool = False  # keep a --context that is not a multiple of 32 (ANE: coremltools issue 2631)
    chunks: int | str | None = None  # a chunked model folder of N pieces, or "auto" (bitnet_coreml.chunking)

    def resolved_split_limit(self) -> int:
        """The largest constant dimension kept whole: ``split_limit``, or the capability database's
        ``max_dimension`` (the bundled one merged with ``capabilities``, as the check reads it)."""
        if self.split_limit is not None:
            return self.split_limit
        from bitnet_coreml.check.capabilities import load_capabilities
        from bitnet_coreml.opsupport import max_dimension

        return max_dimension(load_capabilities(*self.capabilities) if self.capabilities else None)

    def __post_init__(self) -> None:
        if self.precision not in ("fp16", "fp32"):
            raise InputError(f"--precision must be fp16 or fp32, got {self.precision!r}")
        parse_embed_bits(self.embed_bits)
        self.resolved_target()  # refuses an unknown target or OS and a conflicting pair (--target macos --min-os iOS17)
        if self.split_limit is not None and self.split_limit < 0:
            raise InputError(f"split limit must be >= 0 (0 disables splitting), got {self.split_limit}")
        for f in self.capabilities:
            if not Path(f).is_file():
                raise InputError(f"--capabilities {f}: no such file")
        from bitnet_coreml.chunking import parse_chunks

        object.__setattr__(self, "chunks", parse_chunks(self.chunks))
        if self.passes not in ("fast", "full"):
            raise InputError(f"--passes must be fast or full, got {self.passes!r}")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise InputError(f"--calibration {self.calibration}: no such file")
        if self.stateful:
            from bitnet_coreml.package.stateful import validate_sizes

            validate_sizes(self.context, self.prefill, self.prefill_logits)
        if self.verify_inputs is not None and not self.verify:
            raise InputError(f"--input {self.verify_inputs}: test inputs are for --verify; add --verify")
        if self.verify_inputs is not None and not Path(self.verify_inputs).is_file():
            raise InputError(f"--input {self.verify_inputs}: no such file")


    def resolved_target(self) -> tuple[str, MinOs | None]:
        """The platform and the parsed ``min_os`` (None: what the program needs)."""
        platform, min_os = resolve_target(self.target, self.min_os)
        if min_os is not None:
            min_os = parse_os(self.min_os or "", platform, convertible=True)
        return platform, min_os


@dataclass
class ConvertResult:
    """What a conversion produced and how it went."""

    package: str
    source: str
    source_sha256: str
    precision: str
    deployment_target: str
    seconds: dict[str, float] = field(default_factory=dict)
    package_bytes: int = 0
    weight_bytes: int = 0
    params_ternary: int = 0
    params_other: int = 0
    bitlinear_layers: int = 0
    notes: list[str] = field(default_factory=list)
    fp16: dict[str, Any] = field(default_factory=dict)
    split: list[str] = field(default_factory=list)
    embed: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    stateful: dict[str, Any] | None = None  # package/stateful.py StatefulInfo.to_dict() of a --stateful package
    passes: dict[str, Any] = field(default_factory=dict)  # the graph pass pipeline's report (PassReport.to_dict())

    @property
    def weight_budget_bytes(self) -> float:
        """The size the weights should have: ternary at 2 bits, everything else at 16 (the issue's bound)."""
        return (self.params_ternary * 2 + self.params_other * 16) / 8

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_budget_bytes"] = self.weight_budget_bytes
        return d


def external_data_files(path: str | os.PathLike[str], model: ir.Model | None = None, *,
                        must_exist: bool = True) -> list[Path]:
    """The external-data files an ``.onnx`` file references, sorted by their name relative to its folder.

    ``model``, when given, is the already loaded model (its lazy external tensors name their files,
    so nothing is parsed again); otherwise the file's proto is read without its external data.
    A referenced file that is missing is an ``InputError``, or skipped with ``must_exist=False``.
    """
    p = Path(path)
    locations: set[str] = set()
    from bitnet_coreml.frontend import is_gguf

    if is_gguf(p):
        return []  # a GGUF file holds all its tensors
    if model is not None:
        from onnx_ir import traversal

        graphs = [model.graph, *model.functions.values()]
        for node in traversal.RecursiveGraphIterator(model.graph):
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    graphs.append(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    graphs.extend(attr.value)
        tensors: list[Any] = []
        for g in graphs:
            if isinstance(g, ir.Graph):
                tensors += [v.const_value for v in g.initializers.values()]
            tensors += [a.value for n in g for a in n.attributes.values() if a.type == ir.AttributeType.TENSOR]
        locations = {str(t.location) for t in tensors if isinstance(t, ir.ExternalTensor)}
    else:
        import onnx
        from onnx.external_data_helper import _get_all_tensors

        try:
            proto = onnx.load(str(p), load_external_data=False)
        except Exception as e:  # onnx raises DecodeError, OSError, ... on a broken file
            raise InputError(f"{p}: cannot read the ONNX file to find its external data: {e}") from e
        for t in _get_all_tensors(proto):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                locations.update(e.value for e in t.external_data if e.key == "location")
    files = []
    for loc in sorted(locations):
        f = p.parent / loc
        if f.resolve() == p.resolve():
            continue  # the loader memory-maps large inline tensors from the model file itself
        if not f.is_file():
            if not must_exist:
                continue
            raise InputError(f"{p}: external data file {loc!r} not found next to the model")
        files.append(f)
    return files


def source_sha256(path: str | os.PathLike[str], model: ir.Model | None = None, *,
                  external: list[Path] | None = None) -> str:
    """sha256 of a conversion's source, so a changed weight changes the hash.

    A checkpoint folder: every file (relative path + content, sorted). An ``.onnx`` file: its bytes,
    then each external-data file it references (relative name + content, sorted by name); a model
    without external data hashes to the plain sha256 of the file. ``model`` is the loaded model,
    used only to find the external files without parsing the file again; ``external``, when given,
    is that list already made (:func:`external_data_files`).
    """
    p = Path(path)
    h = hashlib.sha256()

    def feed(f: Path) -> None:
        import mmap

        with open(f, "rb") as fh:
            try:  # hashed in place from the page cache, in one call that releases the GIL (no 4 MB copies)
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    h.update(m)
                return
            except (ValueError, OSError):  # an empty file, or one that cannot be mapped: read it
                pass
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)

    if p.is_dir():
        from bitnet_coreml._files import inside

        for f in sorted(f for f in p.rglob("*") if f.is_file()):
            try:
                inside(p, f, "checkpoint file")
            except InputError:
                continue  # a link out of the folder is never read (a file the import needs is refused there)
            h.update(str(f.relative_to(p)).encode() + b"\0")
            feed(f)
        return h.hexdigest()
    feed(p)
    for f in external_data_files(p, model) if external is None else external:
        h.update(b"\0" + str(f.relative_to(p.parent)).encode() + b"\0")
        feed(f)
    return h.hexdigest()


def _run_check(model: ir.Model, options: ConvertOptions, source: str) -> dict[str, Any]:
    """Run the pre-conversion check; violations stop the conversion (exit 1). A chunked conversion checks the
    per-file limit on every piece instead (``chunked_convert``), the other rules on the whole model."""
    from bitnet_coreml.check import Target, run_check
    from bitnet_coreml.check.capabilities import load_capabilities

    platform, min_os = options.resolved_target()
    target = Target(platform=platform, chip=options.chip, min_os=min_os.version if min_os else None)
    db = load_capabilities(*options.capabilities) if options.capabilities else None
    stateful = None
    if options.stateful:
        from bitnet_coreml.check.stateful import StatefulSpec

        stateful = StatefulSpec.from_checkpoint(source, options.context, options.prefill, options.exact_context,
                                                allow_dequant=options.allow_dequant)
    report = run_check(model, target, db=db, embed_bits=options.embed_bits, precision=options.precision,
                       source=source, stateful=stateful)
    violations = [v for v in report.violations if options.chunks is None or v.rule != "package_size"]
    if violations:
        first = "; ".join(v.message for v in violations[:5])
        raise CheckFailedError(f"the check found {len(violations)} violation(s) for {platform}"
                               f"{' ' + options.chip if options.chip else ''}: {first}"
                               f"{' ...' if len(violations) > 5 else ''}; run `bitnet-coreml check` for the full "
                               "report, or convert with --no-check")
    # fallback_plan and unit_counts are what the runtime's predictor reads back from the package
    # (runtime/capability.py::_from_metadata): a Core ML unit missing from the plan is ruled out.
    return {"available": True, "violations": 0, "warnings": [w.message for w in report.warnings],
            "fixed_by_converter": [f.message for f in report.fixed], "score": report.score,
            "fallback_plan": list(report.fallback_plan), "unit_counts": dict(report.unit_counts),
            "target": report.target.to_dict(), "units": units_table(report.units)}


def units_table(units: list[Any]) -> dict[str, Any]:
    """The expected compute unit of every node, compactly: ``[node, op_type, reason index]`` rows and the
    ``[unit, reason]`` pairs they point to (what the report draws per layer without re-running the check)."""
    pairs = sorted({(u.unit, u.reason) for u in units})
    index = {pr: i for i, pr in enumerate(pairs)}
    return {"reasons": [list(pr) for pr in pairs], "ops": [[u.node, u.op_type, index[(u.unit, u.reason)]] for u in units]}


def _descriptions(model: ir.Model, built: Any) -> tuple[dict[str, str], dict[str, str]]:
    ins: dict[str, str] = {}
    for v in model.graph.inputs:
        if v.name not in built.input_names:
            continue
        shape = list(v.shape) if v.shape is not None else []
        dt = v.dtype.name.lower() if v.dtype is not None else "?"
        note = " (int64 in the source graph; pass int32)" if v.dtype == ir.DataType.INT64 else ""
        kind = "token ids" if "id" in (v.name or "").lower() and v.dtype in (ir.DataType.INT64, ir.DataType.INT32) \
            else "input"
        how = built.declared.get(v.name)
        ins[built.input_names[v.name]] = f"{kind} {v.name!r}, shape {shape}, {dt}{note}" + (f"; {how}" if how else "")
    outs: dict[str, str] = {}
    for v in model.graph.outputs:
        shape = list(v.shape) if v.shape is not None else []
        kind = "logits" if "logit" in (v.name or "").lower() else "output"
        how = built.declared.get(v.name)
        outs[built.output_names[v.name]] = f"{kind} {v.name!r}, shape {shape}" + (f"; {how}" if how else "")
    return ins, outs


def convert(source: str | os.PathLike[str], out: str | os.PathLike[str], options: ConvertOptions | None = None,
            *, progress: ProgressFn | None = None) -> ConvertResult:
    """Convert ``source`` (ONNX file or HF checkpoint folder) to the package ``out``; see the module docstring."""
    from bitnet_coreml.frontend import builds_graph, load, seq_len_note
    from bitnet_coreml.frontend.convertible import describe_input, dynamic_inputs, refuse_bfloat16
    from bitnet_coreml.lower.fp16 import load_calibration, make_fp16_safe, random_calibration
    from bitnet_coreml.lower.palettize import palettize_program
    from bitnet_coreml.lower.program import (
        MIN_IOS,
        BuildOptions,
        assign_node_names,
        build_program,
        check_supported,
        convert_program,
    )
    from bitnet_coreml.lower.split import split_large_dims
    from bitnet_coreml.package.writer import describe, package_files, save_package, weight_bytes
    from bitnet_coreml.passes import run_default_passes
    from bitnet_coreml.passes.layers import layer_groups, residual_points, run_lengths
    from bitnet_coreml.passes.ort import ort_errors
    from bitnet_coreml.passes.summary import summarize

    options = options or ConvertOptions()
    out = Path(out)
    if options.chunks is not None:
        from bitnet_coreml.chunked_convert import check_output

        check_output(out)
    elif out.suffix != ".mlpackage":
        raise InputError(f"{out}: the output must end in .mlpackage")
    if not out.parent.is_dir():
        raise InputError(f"{out}: the folder {out.parent} does not exist")
    context = 0
    notes: list[str] = []
    if options.stateful:
        from bitnet_coreml.package.stateful import round_context

        if not builds_graph(source):
            raise InputError(f"{source}: stateful conversion needs a Hugging Face BitNet checkpoint folder "
                             "(config.json + safetensors) or a BitNet GGUF file; an ONNX export is not accepted with --stateful because "
                             "its attention blocks are not mapped onto a KV cache")
        context, note = round_context(options.context, options.exact_context)
        notes += [note] if note else []
    say: ProgressFn = progress or (lambda _s: None)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def stage(name: str) -> None:
        say(name)
        set_stage(f"convert ({name})")  # what the CLI names in "internal error in <stage>"
        log.info("convert: %s", name)

    def timed(name: str, t0: float) -> None:
        times[name] = round(time.perf_counter() - t0, 3)

    stage("load")
    t0 = time.perf_counter()
    # An fp16 build stores the embedding / lm_head in fp16 anyway: importing a checkpoint's bf16 table
    # as fp16 (exact for bf16 values in fp16's range) halves its memory in every later stage.
    embed_dtype = "float16" if options.precision == "fp16" else "float32"
    # A stateful package is checked and fp16-analysed on the stateless graph of its prefill length.
    model = load(source, seq_len=options.prefill if options.stateful else options.seq_len, embed_dtype=embed_dtype,
                 allow_dequant=options.allow_dequant)
    if not builds_graph(source):  # an ONNX file: the graph is the user's, not our importer's
        refuse_bfloat16(model, str(source))
    if dynamic := dynamic_inputs(model):
        raise InputError(f"{source}: graph input {describe_input(dynamic[0])} has dynamic dimensions; pass --seq-len N to "
                         "convert it for N tokens (a dynamic batch becomes 1)")
    sha = source_sha256(source, model if Path(source).is_file() else None)
    from bitnet_coreml.frontend import source_assets

    assets, asset_notes = source_assets(source)  # read now: a refused file fails before any work
    timed("load", t0)

    stage("graph passes")
    t0 = time.perf_counter()
    pass_report = run_default_passes(model)
    if pass_report.note:
        notes.append(pass_report.note)
    assign_node_names(model.graph)
    check_supported(model)  # every unsupported op at once, before any work is written
    summary = summarize(model, source=str(source))
    timed("passes", t0)

    check: dict[str, Any] = {"skipped": True}
    if options.check:
        stage("check")
        t0 = time.perf_counter()
        check = _run_check(model, options, str(source))
        timed("check", t0)

    chunk_plan = None
    if options.chunks is not None:  # planned on the graph `check` sees (before the split), so both agree
        from bitnet_coreml.chunked_convert import plan_for_options

        chunk_plan = plan_for_options(model, options, str(source))
    if not options.stateful:
        notes += [n for n in [seq_len_note(source, options.seq_len)] if n]
    split_notes: list[str] = []
    # layer of every node as checked, and where the residual stream sits in the program (bitnet_coreml.report)
    layers: dict[str, Any] = {"groups": run_lengths(layer_groups(model.graph))}
    split_limit = options.resolved_split_limit()
    # the tables the split reads (a lazy checkpoint embedding converted once): a stateful build splits
    # its two function graphs of the same checkpoint with them again
    tables: dict[Any, Any] = {}
    if split_limit:
        t0 = time.perf_counter()
        split_notes = split_large_dims(model, split_limit, tables=tables)
        assign_node_names(model.graph)
        check_supported(model)
        timed("split", t0)
    node_index = {id(n): i for i, n in enumerate(model.graph)}
    layers["residual"] = [{"label": r.label, "layer": r.layer, "value": r.value,
                           "node_index": node_index[id(model.graph.node(r.node))]}
                          for r in residual_points(model.graph)]

    fp16_info: dict[str, Any] = {}
    fp32_nodes: frozenset[str] = frozenset()
    rms_scale: tuple[tuple[str, float], ...] = ()
    plan = None
    if options.precision == "fp16":
        stage("fp16 safety")
        t0 = time.perf_counter()
        feeds = (load_calibration(options.calibration, model) if options.calibration
                 else random_calibration(model))
        with ort_errors(f"{source}: fp16 calibration", input_at_fault=False):
            plan = make_fp16_safe(model, feeds)
        fp16_info = plan.to_dict()
        fp16_info["calibration"] = Path(options.calibration).name if options.calibration else "random (seed 0)"
        fp32_nodes = frozenset(plan.fp32_nodes)
        rms_scale = tuple(sorted(plan.rmsnorm_input_scale.items()))
        notes += plan.notes
        timed("fp16_safety", t0)

    platform, min_os = options.resolved_target()
    want_ios = min_os.target.ios if min_os else MIN_IOS
    # every fp16 program (stateless, stateful, chunked pieces) is built in fp16 directly: nodes the analysis
    # keeps in fp32 are cast in and out by the builder, and coremltools' fp16 cast pass has nothing to rewrite
    build = BuildOptions(precision=options.precision, ios=max(want_ios, 18) if options.stateful else want_ios,
                         fp32_nodes=fp32_nodes, rmsnorm_input_scale=rms_scale,
                         native_fp16=options.precision == "fp16")
    if options.chunks is not None:
        from bitnet_coreml.chunked_convert import Prepared, convert_chunked

        return convert_chunked(Prepared(
            source=str(source), out=out, options=options, model=model, plan=plan, build=build, platform=platform,
            chunk_plan=chunk_plan, want_ios=want_ios, context=context, embed_dtype=embed_dtype, sha=sha, assets=assets, summary=summary,
            check=check, notes=notes + asset_notes, split_notes=split_notes, fp16_info=fp16_info, times=times,
            t_all=t_all, stage=stage, passes=pass_report.to_dict()))
    stage("lower to MIL")
    t0 = time.perf_counter()
    stateful_info = None
    if options.stateful:
        from bitnet_coreml.stateful_convert import build_stateful

        built, stateful_info = build_stateful(source, options, context, embed_dtype, plan, build, notes,
                                               tables=tables)
    else:
        built = build_program(model, build)
    notes += built.notes
    embed: dict[str, Any] = {}
    if options.embed_bits:
        embed = palettize_program(built.program, options.embed_bits)
        notes.append(f"embed-bits {options.embed_bits}: palettized {len(embed.get('weights', []))} non-ternary "
                     f"weight(s); relative L2 weight error {embed.get('max_rel_l2', 0):.3g} (worst tensor)")
    timed("lower", t0)

    stage("convert (coremltools passes)")
    t0 = time.perf_counter()
    mlmodel = convert_program(built, options.precision, platform=platform, pipeline=options.passes)
    timed("coremltools", t0)
    target_name = os_for_ios(max(built.ios, want_ios), platform).name

    ins, outs = _descriptions(model, built) if stateful_info is None else ({}, {})
    meta = package_metadata(source, sha, options, summary, fp16_info, check, layers, split_notes, built, target_name)
    desc = (f"BitNet model {Path(source).name}: {len(summary.bitlinear)} ternary BitLinear layers at 2 bits "
            f"({summary.params_ternary:,} ternary + {summary.params_other:,} other parameters), {options.precision}")
    if stateful_info is not None:
        from bitnet_coreml.package.stateful import describe_functions, metadata_entries

        meta.update(metadata_entries(stateful_info))
        desc += (f"; stateful: functions prefill (P={stateful_info.prefill}) and decode, KV cache of "
                 f"{stateful_info.context} positions as state")
        describe_functions(mlmodel, stateful_info)
    describe(mlmodel, short_description=desc, metadata=meta, input_descriptions=ins, output_descriptions=outs)

    stage("write package")
    t0 = time.perf_counter()
    notes += asset_notes
    store = None
    if stateful_info is not None:  # the decode function translated once, stored for generation (fused_store.py)
        from bitnet_coreml.executor.fused_store import translate, write_table

        program = getattr(mlmodel, "_mil_program", None)  # the program ct.convert made: nothing is read back
        # the specification save_package writes (its deterministic_spec drops volatile metadata only)
        spec = getattr(mlmodel, "_spec", None)

        def store_table(tmp: Path) -> None:
            t1 = time.perf_counter()
            notes.append(write_table(tmp, translate(program) if program is not None else None, spec))
            timed("decode_table", t1)  # part of "write"

        store = store_table
    save_package(mlmodel, out, assets=assets, finish=store)
    timed("write", t0)
    del mlmodel

    result = ConvertResult(
        package=str(out), source=str(source), source_sha256=sha, precision=options.precision,
        deployment_target=target_name, package_bytes=sum(package_files(out).values()), weight_bytes=weight_bytes(out),
        params_ternary=summary.params_ternary, params_other=summary.params_other,
        bitlinear_layers=len(summary.bitlinear), notes=notes, fp16=fp16_info, split=split_notes, embed=embed,
        check=check, inputs=dict(built.input_names), outputs=dict(built.output_names),
        stateful=stateful_info.to_dict() if stateful_info is not None else None, passes=pass_report.to_dict(),
    )
    return finish(result, source, out, options, times, t_all, stage)


def package_metadata(source: str | os.PathLike[str], sha: str, options: ConvertOptions, summary: Any,
                     fp16_info: dict[str, Any], check: dict[str, Any], layers: dict[str, Any], split_notes: list[str],
                     built: Any, target_name: str) -> dict[str, str]:
    """The ``bitnet_coreml.*`` metadata every converted package carries (docs/ARCHITECTURE.md)."""
    return {
        "bitnet_coreml.version": __version__,
        "bitnet_coreml.source": Path(source).name,
        "bitnet_coreml.source_sha256": sha,
        "bitnet_coreml.precision": options.precision,
        "bitnet_coreml.deployment_target": target_name,
        "bitnet_coreml.bitlinear_layers": str(len(summary.bitlinear)),
        "bitnet_coreml.params_ternary": str(summary.params_ternary),
        "bitnet_coreml.params_other": str(summary.params_other),
        "bitnet_coreml.fp16_safety": json.dumps(fp16_info, sort_keys=True, default=str),
        "bitnet_coreml.check": json.dumps(check, sort_keys=True, default=str),
        "bitnet_coreml.layers": json.dumps(layers, sort_keys=True),
        "bitnet_coreml.split": json.dumps(split_notes),
        "bitnet_coreml.embed_bits": str(options.embed_bits or 16),
        "bitnet_coreml.input_names": json.dumps(built.input_names, sort_keys=True),
        "bitnet_coreml.output_names": json.dumps(built.output_names, sort_keys=True),
    }


def finish(result: ConvertResult, source: str | os.PathLike[str], out: Path, options: ConvertOptions,
           times: dict[str, float], t_all: float, stage: Callable[[str], None]) -> ConvertResult:
    """The optional verify step and the total time of a conversion."""
    if options.verify:
        stage("verify")
        t0 = time.perf_counter()
        from bitnet_coreml.verify import verify

        report = verify(source, out, options.verify_inputs, raise_on_failure=False, seq_len=options.seq_len,
                        allow_dequant=options.allow_dequant)
        result.parity = report.to_dict()
        times["verify"] = round(time.perf_counter() - t0, 3)
    times["total"] = round(time.perf_counter() - t_all, 3)
    result.seconds = times
    return result
