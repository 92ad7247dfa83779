"""``bitnet-coreml convert MODEL -o OUT.mlpackage``: check, convert and package (optionally verify)."""

from __future__ import annotations

import sys

import click

from bitnet_coreml.commands._common import echo_json, parity_failures, parity_table, table, target_options
from bitnet_coreml.errors import EXIT_CHECK_FAILED


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


@click.command("convert")
@click.argument("model", type=click.Path(path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Destination .mlpackage, or folder with --chunks (written atomically).")
@target_options
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="Compute precision of the package.")
@click.option("--calibration", type=click.Path(path_type=str), default=None,
              help=".npz with the graph inputs for the fp16-safety analysis (default: a random input).")
@click.option("--split-limit", type=int, default=None,
              help="Split constant dimensions larger than this; 0 disables. [default: the capability database's "
                   "max_dimension, the ANE limit]")
@click.option("--seq-len", type=int, default=None,
              help="Sequence length for a checkpoint folder or GGUF file, or for an ONNX graph with dynamic axes "
                   "(a dynamic batch becomes 1).")
@click.option("--allow-dequant", is_flag=True,
              help="GGUF: dequantise tensors of other ggml types (and block-scaled ternary layers) instead of refusing.")
@click.option("--passes", type=click.Choice(["fast", "full"]), default="fast", show_default=True,
              help="coremltools pass pipeline: the passes our programs need, or coremltools' full default.")
@click.option("--stateful", is_flag=True,
              help="LLM package with a KV cache as Core ML state: functions prefill and decode (checkpoint folders, GGUF files).")
@click.option("--context", type=int, default=512, show_default=True,
              help="--stateful: KV cache positions (rounded up to a multiple of 32 unless --exact-context).")
@click.option("--prefill", type=int, default=64, show_default=True, help="--stateful: tokens per prefill call.")
@click.option("--prefill-logits", type=click.Choice(["all", "last"]), default="all", show_default=True,
              help="--stateful: prefill returns the logits of every token or of the last one.")
@click.option("--exact-context", is_flag=True, help="--stateful: keep a --context that is not a multiple of 32.")
@click.option("--chunks", default=None, metavar="auto|N",
              help="Write a folder of N consecutive packages (auto: the fewest that fit the target's per-file limit) "
                   "and model.json instead of one .mlpackage.")
@click.option("--no-check", is_flag=True, help="Skip the pre-conversion check.")
@click.option("--verify", "do_verify", is_flag=True, help="Verify the package against the source after converting.")
@click.option("--input", "-i", "verify_inputs", type=click.Path(path_type=str), default=None,
              help="With --verify: .npz of test inputs (arrays named like the model's inputs; default: random tokens).")
@click.option("--report", "report_path", type=click.Path(path_type=str), default=None,
              help="Also write the HTML conversion report here (see `bitnet-coreml report`).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def convert(model: str, out: str, target: str | None, chip: str | None, min_os: str | None, embed_bits: str | None,
            cap_files: tuple[str, ...], precision: str, calibration: str | None, split_limit: int | None, seq_len: int | None,
            allow_dequant: bool, passes: str, stateful: bool, context: int, prefill: int, prefill_logits: str,
            exact_context: bool, chunks: str | None, no_check: bool, do_verify: bool, verify_inputs: str | None, report_path: str | None,
            as_json: bool) -> None:
    """Convert MODEL (.onnx file, checkpoint folder or .gguf file) to a Core ML package with 2-bit ternary weights."""
    from bitnet_coreml.convert import ConvertOptions
    from bitnet_coreml.convert import convert as run_convert

    if report_path is not None:
        from bitnet_coreml.commands.report import check_output

        check_output(report_path)

    options = ConvertOptions(precision=precision, embed_bits=int(embed_bits) if embed_bits else None,
                             calibration=calibration, target=target, chip=chip, min_os=min_os, capabilities=cap_files,
                             split_limit=split_limit, check=not no_check, verify=do_verify, verify_inputs=verify_inputs,
                             seq_len=seq_len, passes=passes, stateful=stateful, context=context, prefill=prefill,
                             prefill_logits=prefill_logits, exact_context=exact_context,
                             allow_dequant=allow_dequant, chunks=chunks)
    if as_json:
        result = run_convert(model, out, options)
        echo_json(result.to_dict())
    else:
        from rich.console import Console

        err = Console(stderr=True)
        with err.status("converting ...") as status:
            result = run_convert(model, out, options, progress=lambda s: status.update(f"{s} ..."))
        con = Console()
        t = table("", "", title=f"{out}", show_header=False)
        t.add_row("source", f"{model} (sha256 {result.source_sha256[:12]}...)")
        t.add_row("precision / target", f"{result.precision} / {result.deployment_target}")
        t.add_row("BitLinear layers", str(result.bitlinear_layers))
        t.add_row("parameters", f"{result.params_ternary:,} ternary (2-bit) + {result.params_other:,} other")
        t.add_row("weights", f"{_mb(result.weight_bytes)} (budget {_mb(result.weight_budget_bytes)})")
        t.add_row("package", _mb(result.package_bytes))
        if result.stateful:
            st = result.stateful
            t.add_row("stateful", f"functions {', '.join(st['functions'])} (default {st['default_function']}); "
                                  f"context {st['context']}, prefill {st['prefill']} (logits {st['prefill_logits']}); "
                                  f"{len(st['states'])} fp16 states, {_mb(st['state_bytes'])}")
        from bitnet_coreml.passes.pipeline import describe_passes

        t.add_row("graph passes", describe_passes(result.passes))
        t.add_row("time", " ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items()))
        con.print(t)
        for n in result.split + result.notes:
            con.print(f"- {n}")
        if result.parity is not None:
            con.print(parity_table(result.parity["comparisons"], "parity; top-1 (outside fp16 ties)"))
    if report_path is not None:
        from bitnet_coreml.report import collect, write_html

        write_html(collect(out, model, calibration, seq_len=seq_len), report_path)
        if not as_json:
            click.echo(f"report: {report_path}")
    if result.parity is not None and not result.parity["passed"]:
        click.echo(f"error: parity failed: {parity_failures(result.parity['comparisons'])} "
                   f"(the package was written to {out})", err=True)
        sys.exit(EXIT_CHECK_FAILED)
