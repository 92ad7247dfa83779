"""``bitnet-coreml check MODEL --target ios|macos``: the pre-conversion report; exit 1 on violations."""

from __future__ import annotations

import sys

import click

from bitnet_coreml.commands._common import echo_json, table, target_options


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _v(x: object) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


@click.command("check")
@click.argument("model", type=click.Path(path_type=str))
@target_options
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="Compute precision the converter will use.")
@click.option("--strict", is_flag=True, help="Warnings fail the check too (exit 1).")
@click.option("--seq-len", type=int, default=None, help="Sequence length for a checkpoint folder or GGUF file.")
@click.option("--allow-dequant", is_flag=True,
              help="GGUF: dequantise tensors of other ggml types (and block-scaled ternary layers) instead of refusing.")
@click.option("--stateful", is_flag=True, help="Check the stateful package convert --stateful would write.")
@click.option("--context", type=int, default=512, show_default=True, help="--stateful: KV cache positions.")
@click.option("--prefill", type=int, default=64, show_default=True, help="--stateful: tokens per prefill call.")
@click.option("--exact-context", is_flag=True, help="--stateful: keep a --context that is not a multiple of 32.")
@click.option("--chunks", default=None, metavar="auto|N",
              help="Check the pieces `convert --chunks` would write: each piece on its own, and the whole.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/schemas/check-report.schema.json).")
def check(model: str, target: str | None, chip: str | None, min_os: str | None, embed_bits: str | None,
          cap_files: tuple[str, ...], precision: str, strict: bool, seq_len: int | None, allow_dequant: bool,
          stateful: bool, context: int, prefill: int, exact_context: bool, chunks: str | None, as_json: bool) -> None:
    """Check MODEL (.onnx file, checkpoint folder or .gguf file) against a target before converting it."""
    from bitnet_coreml.check.capabilities import load_capabilities
    from bitnet_coreml.check.report import run_check
    from bitnet_coreml.check.target import resolve
    from bitnet_coreml.chunking import parse_chunks
    from bitnet_coreml.vocab import Target, resolve_target

    # Validate the cheap inputs before loading a multi-GB model.
    requested = parse_chunks(chunks)
    db = load_capabilities(*cap_files)
    platform, parsed = resolve_target(target, min_os)
    checked = Target(platform, chip, parsed.version if parsed else None)
    resolve(checked, db)

    from bitnet_coreml.frontend import load, seq_len_note
    from bitnet_coreml.passes import run_default_passes

    spec = None
    if stateful:
        from bitnet_coreml.check.stateful import StatefulSpec
        from bitnet_coreml.errors import InputError
        from bitnet_coreml.frontend import builds_graph
        from bitnet_coreml.package.stateful import validate_sizes

        if not builds_graph(model):
            raise InputError(f"{model}: stateful conversion needs a Hugging Face BitNet checkpoint folder or a "
                             "BitNet GGUF file")
        validate_sizes(context, prefill, "all")
        spec = StatefulSpec.from_checkpoint(model, context, prefill, exact_context, allow_dequant=allow_dequant)
        seq_len = prefill
    m = load(model, seq_len=seq_len, allow_dequant=allow_dequant)
    # stated only once the source loaded: a refused model gets its one error line and nothing else
    note = None if stateful else seq_len_note(model, seq_len)
    if note:
        click.echo(f"note: {note}", err=True)
    run_default_passes(m)
    report = run_check(m, checked, db=db, embed_bits=int(embed_bits) if embed_bits else None, precision=precision,
                       strict=strict, source=model, stateful=spec)
    if note:
        report.notes.append(note)
    bits = int(embed_bits) if embed_bits else None
    if requested is not None:
        from bitnet_coreml.check.chunked import check_chunks

        cc = check_chunks(m, report, requested, lambda piece, k: run_check(
            piece, checked, db=db, embed_bits=bits, precision=precision, strict=strict, source=f"{model} piece {k}"),
            embed_bits=bits, precision=precision)
        if as_json:
            echo_json(cc.to_dict())
        else:
            _print(report, skip_rules=("package_size",))
            _print_chunks(cc)
        sys.exit(cc.exit_code)
    from bitnet_coreml.check.chunked import suggestion

    suggested = suggestion(m, report, embed_bits=bits, precision=precision)
    if suggested is not None:
        report.notes.append(f"does not fit one file: `convert --chunks auto` writes {suggested['count']} pieces "
                            f"({'; '.join(suggested['pieces'])}), each under the per-file limit; check them with "
                            f"--chunks auto" if suggested["count"] else f"no chunk count fits: {suggested['reason']}")
    if as_json:
        doc = report.to_dict()
        if suggested is not None:
            doc["suggested_chunks"] = suggested
        echo_json(doc)
    else:
        _print(report)
    sys.exit(report.exit_code)


def _print_chunks(cc: object) -> None:
    from rich.console import Console

    from bitnet_coreml.check.chunked import ChunkedCheck

    assert isinstance(cc, ChunkedCheck)
    con = Console()
    limit = cc.whole.target.package_limit_bytes
    t = table("#", "holds", "weights", "violations", "warnings", "score", whole=("#", "weights", "score"),
              title=f"Pieces of --chunks {cc.plan.requested}: {cc.plan.count} (per-file limit {_mb(limit)})")
    for k, r in enumerate(cc.pieces):
        t.add_row(str(k), cc.plan.describe(k), _mb(r.size.total_bytes),
                  "; ".join(f"[{v.rule}] {v.message}" for v in r.violations) or "0", str(len(r.warnings)),
                  f"{r.score:.3f}")
    con.print(t)
    total = sum(r.size.total_bytes for r in cc.pieces)
    verdict = "[bold green]every piece fits[/bold green]" if cc.ok else "[bold red]does not fit[/bold red]"
    con.print(f"whole: {_mb(total)} of weights in {cc.plan.count} file(s) (one file: {_mb(cc.whole.size.total_bytes)}); "
              f"{verdict}")


def _print(report: object, skip_rules: tuple[str, ...] = ()) -> None:
    from rich.console import Console

    from bitnet_coreml.check.report import CheckReport

    assert isinstance(report, CheckReport)
    r = report
    con = Console()
    t = r.target
    ane = f"ANE Gen {t.ane.generation}" if t.ane else "ANE generation not evaluated (no --chip)"
    con.print(f"[bold]{r.model}[/bold] -> {t.label} (Core ML spec {t.os.spec_version}, MIL {t.os.mil_opset}; "
              f"min OS {t.os_how}); {ane}")
    size = table("", "bytes", "", whole=("bytes", ""), title="Weights (weight.bin estimate)", show_header=False)
    size.add_row("estimated (ternary 2-bit" + (f", embeddings {r.size.embed_bits}-bit" if r.size.embed_bits else "")
                 + f", {r.size.precision})", f"{r.size.total_bytes:,}", _mb(r.size.total_bytes))
    size.add_row("same model all fp16", f"{r.size.fp16_total_bytes:,}", _mb(r.size.fp16_total_bytes))
    size.add_row(f"{t.platform} package limit", f"{t.package_limit_bytes:,}", _mb(t.package_limit_bytes))
    if t.ane and t.ane.model_size_budget_mb:
        b = int(t.ane.model_size_budget_mb * (1 << 20))
        size.add_row(f"Gen {t.ane.generation} budget (soft)", f"{b:,}", _mb(b))
    con.print(size)

    def findings(title: str, items: list, style: str) -> None:  # type: ignore[type-arg]
        if not items:
            return
        ft = table("rule", "node", "actual", "limit", "message", whole=("rule", "actual", "limit"), title=title,
                   title_style=style)
        for f in items:
            ft.add_row(f.rule, f.node or "-", _v(f.actual), _v(f.limit), f.message)
        con.print(ft)

    violations = [v for v in r.violations if v.rule not in skip_rules]
    findings(f"Violations: {len(violations)}", violations, "bold red")
    findings(f"Warnings: {len(r.warnings)}", r.warnings, "yellow")
    findings(f"Handled by the converter (fixed or harmless): {len(r.fixed)}", r.fixed, "green")
    off = [u for u in r.units if u.unit != "ANE"]
    counts = r.unit_counts
    ut = table("node", "op", "unit", "reason", whole=("op", "unit"),
               title=f"Expected compute units: ANE {counts['ANE']}, GPU {counts['GPU']}, CPU {counts['CPU']} "
                     "(ops not on the ANE listed)")
    for u in off:
        ut.add_row(u.node, u.op_type, u.unit, u.reason)
    if off:
        con.print(ut)
    else:
        con.print(f"expected compute units: all {counts['ANE']} ops on the ANE")
    plan = table("#", "compute units", "when", whole=("compute units",), title="Fallback plan")
    for i, step in enumerate(r.fallback_plan, 1):
        plan.add_row(str(i), step["compute_units"], step["reason"])
    con.print(plan)
    for n in r.notes:
        con.print(f"note: {n}")
    ok = not violations and not (r.strict and r.warnings)
    verdict = "[bold green]fits[/bold green]" if ok else "[bold red]does not fit[/bold red]"
    if skip_rules:
        con.print(f"whole model, every rule but the per-file size: {verdict}")
        return
    con.print(f"compatibility score {r.score:.3f} ({r.score_basis}); {verdict}"
              + (" (strict: warnings count)" if r.strict and r.warnings else ""))
