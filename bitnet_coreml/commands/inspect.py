"""``bitnet-coreml inspect MODEL|PACKAGE``: graph summary after the BitNet passes, or what a package holds."""

from __future__ import annotations

from typing import Any

import click

from bitnet_coreml.commands._common import echo_json, table


def _mb(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def gguf_report(model: object) -> dict[str, Any]:
    """What a GGUF source's import did (tensor types, block-scale handling, dequantised tensors), or {}."""
    import json

    meta = getattr(model, "metadata_props", {})
    if meta.get("bitnet_coreml.source") != "gguf":
        return {}
    keys = ("tensor_types", "block_scales", "dense_fallback", "dequantized")
    return {"architecture": meta.get("bitnet_coreml.gguf.architecture"),
            **{k: json.loads(meta.get(f"bitnet_coreml.gguf.{k}", "{}")) for k in keys}}


@click.command("inspect")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--seq-len", type=int, default=None, help="Sequence length for a checkpoint folder or GGUF file.")
@click.option("--allow-dequant", is_flag=True,
              help="GGUF: dequantise tensors of other ggml types (and block-scaled ternary layers) instead of refusing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_cmd(model: str, seq_len: int | None, allow_dequant: bool, as_json: bool) -> None:
    """Summarise MODEL (.onnx, checkpoint folder or .gguf): I/O, ops, parameters, BitLinear layers, size.

    Given a .mlpackage: its inputs/outputs (dtypes, shapes), functions and states, metadata, weight
    bytes by kind and deployment target.
    """
    from bitnet_coreml.package.chunked import is_chunked
    from bitnet_coreml.package.inspect import inspect_package, is_package

    if is_chunked(model):
        _chunked(model, as_json)
        return
    if is_package(model):
        doc = inspect_package(model)
        if as_json:
            echo_json(doc)
        else:
            _print_package(doc)
        return
    from bitnet_coreml.frontend import load
    from bitnet_coreml.passes import run_default_passes
    from bitnet_coreml.passes.summary import op_histogram, summarize

    m = load(model, seq_len=seq_len, allow_dequant=allow_dequant)
    before = op_histogram(m)
    report = run_default_passes(m)
    unfused: list[str] = next((p.details.get("ternary_unfused", []) for p in report.passes if p.name == "fuse_bitlinear"), [])
    s = summarize(m, source=model, ops_source=before, ternary_unfused=unfused)
    gguf = gguf_report(m)
    if as_json:
        d = s.to_dict()
        if gguf:
            d["gguf"] = gguf
        echo_json(d)
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{model}[/bold]  opset {s.opset}")
    io = Table("direction", "name", "shape", "dtype", title="Inputs and outputs")
    for t in s.inputs:
        io.add_row("input", t.name, str(t.shape), t.dtype)
    for t in s.outputs:
        io.add_row("output", t.name, str(t.shape), t.dtype)
    con.print(io)
    p = Table("parameters", "count", title="Parameters")
    p.add_row("ternary (BitLinear)", f"{s.params_ternary:,}")
    p.add_row("other (embedding, norms, lm_head)", f"{s.params_other:,}")
    p.add_row("BitLinear scales", f"{s.params_scales:,}")
    p.add_row("total", f"{s.params_total:,}")
    con.print(p)
    ops = Table("op", "source", "after passes", title="Ops")
    for k in sorted(set(s.ops_source) | set(s.ops)):
        ops.add_row(k, str(s.ops_source.get(k, "")), str(s.ops.get(k, "")))
    con.print(ops)
    bl = Table("layer", "in", "out", "convention", "scale", "activations", title=f"BitLinear layers: {len(s.bitlinear)}")
    for b in s.bitlinear:
        bl.add_row(b.name, str(b.in_features), str(b.out_features), b.convention,
                   "per channel" if b.per_channel else "per tensor",
                   f"{b.act_bits}-bit" if b.act_bits else "none (weight-only)")
    con.print(bl)
    if s.ternary_unfused:
        con.print(f"[yellow]ternary MatMuls not fused (no activation quantisation matched): {', '.join(s.ternary_unfused)}[/yellow]")
    if gguf:
        arch = gguf["architecture"]
        con.print(f"GGUF architecture: {arch}" + (" (llama decoder, weight-only ternary linears, q/k rows un-permuted)"
                                                   if arch == "llama" else ""))
        con.print(f"GGUF tensor types: {', '.join(f'{k} {v}' for k, v in gguf['tensor_types'].items())}")
        kinds: dict[str, list[str]] = {}
        for layer, how in gguf["block_scales"].items():
            kinds.setdefault(how, []).append(layer)
        for how, layers in sorted(kinds.items()):
            con.print(f"block scales: {how}: {len(layers)} layer(s)")
        for name, qtype in gguf["dequantized"].items():
            con.print(f"[yellow]dequantised ({qtype}): {name}[/yellow]")
    con.print(f"estimated weights: {_mb(s.size_2bit_bytes)} at 2-bit ternary vs {_mb(s.size_fp16_bytes)} in fp16 "
              f"({s.size_fp16_bytes / max(s.size_2bit_bytes, 1):.1f}x smaller)")


def _io_rows(table: object, where: str, io: dict) -> None:  # type: ignore[type-arg]
    for direction in ("inputs", "outputs", "states"):
        for f in io.get(direction, []):
            shape = f.get("shape")
            extra = f.get("enumerated_shapes") or f.get("shape_ranges")
            shape_text = (str(shape) if shape is not None else "-") + (f" (also {extra})" if extra else "")
            table.add_row(where, direction[:-1], f["name"], f.get("dtype", f["kind"]), shape_text)  # type: ignore[attr-defined]


def _print_package(doc: dict) -> None:  # type: ignore[type-arg]
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{doc['package']}[/bold]")
    con.print(f"{doc['model_type']}, Core ML spec {doc['spec_version']}, deployment target {doc['deployment_target']}")
    if doc.get("description"):
        con.print(doc["description"], soft_wrap=False)
    io = Table("function", "kind", "name", "dtype", "shape", title="Inputs, outputs and states")
    _io_rows(io, "(main)" if not doc["functions"] else doc.get("default_function") or "-", doc)
    for fn in doc["functions"]:
        _io_rows(io, fn["name"], fn)
    con.print(io)
    if doc.get("program_functions"):
        con.print(f"program functions: {', '.join(doc['program_functions'])}"
                  + (f" (default {doc['default_function']})" if doc.get("default_function") else ""))
    con.print(f"weights {doc['weight_bytes']:,} bytes; package {doc['package_bytes']:,} bytes")
    w = Table("weights read by op", "bytes")
    for kind, n in doc["weight_bytes_by_kind"].items():
        w.add_row(kind, f"{n:,}")
    con.print(w)
    meta = Table("key", "value", title="Metadata")
    for k, v in doc["metadata"].items():
        meta.add_row(k, v if len(v) <= 200 else v[:200] + f"... ({len(v):,} chars; --json for all)")
    con.print(meta)


def _chunked(folder: str, as_json: bool) -> None:
    """A chunked model folder (convert --chunks): the manifest checked, then every piece as for a package."""
    from bitnet_coreml.package.chunked import open_chunked
    from bitnet_coreml.package.inspect import inspect_package

    cm = open_chunked(folder)
    m = cm.manifest
    doc = {"chunked": {k: v for k, v in m.items() if k != "pieces"}, "folder": folder,
           "pieces": [{**{k: v for k, v in e.items() if k != "functions"}, "package": inspect_package(p)}
                      for e, p in zip(m["pieces"], cm.pieces, strict=True)]}
    if as_json:
        echo_json(doc)
        return
    from rich.console import Console

    con = Console()
    con.print(f"[bold]{folder}[/bold]: chunked model of {len(cm.pieces)} piece(s) from {m['source']} "
              f"({m['precision']}, {m['deployment_target']}); functions {', '.join(m['functions'])}; "
              f"every piece's sha256 and boundary checked")
    t = table("#", "holds", "weights", "inputs -> outputs", "states", whole=("#", "weights", "states"),
              title="Pieces chunk_NN.mlpackage (called in order)")
    fn = cm.default_function
    for k, e in enumerate(m["pieces"]):
        f = e["functions"][fn]
        io = " -> ".join(", ".join(f"{x['name']} {x['shape']} {x['dtype']}" for x in f[key]) for key in ("inputs", "outputs"))
        t.add_row(str(k), e["label"], _mb(e["weight_bytes"]), io, str(len(e["states"])))
    con.print(t)
