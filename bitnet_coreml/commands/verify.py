"""``bitnet-coreml verify SOURCE PACKAGE``: parity of a package against its source graph; exit 1 below threshold."""

from __future__ import annotations

import sys

import click

from bitnet_coreml.commands._common import echo_json, parity_failures, parity_table
from bitnet_coreml.errors import EXIT_CHECK_FAILED, InputError


@click.command("verify")
@click.argument("source", type=click.Path(path_type=str))
@click.argument("package", type=click.Path(path_type=str))
@click.option("--input", "inputs", type=click.Path(path_type=str), default=None,
              help=".npz with the graph inputs (extra arrays named like outputs are compared too); default: random.")
@click.option("--min-cosine", type=float, default=None, help="Minimum cosine (default 0.999 fp16, 0.9999 fp32).")
@click.option("--min-top1", type=float, default=None, help="Minimum top-1 agreement (default 0.98 fp16, 0.995 fp32).")
@click.option("--min-top5", type=float, default=None, help="Minimum top-5 agreement (default: not checked).")
@click.option("--max-rel-l2", type=float, default=None, help="Maximum relative L2 error (default: not checked).")
@click.option("--seq-len", type=int, default=None, help="Sequence length for a checkpoint folder or GGUF file (default: the package's input_ids length).")
@click.option("--allow-dequant", is_flag=True,
              help="GGUF: dequantise tensors of other ggml types (and block-scaled ternary layers) instead of refusing.")
@click.option("--steps", type=int, default=None,
              help="Stateful package: teacher-forced decode steps after the prefill (default 32).")
@click.option("--units", default=None, metavar="LIST",
              help="Compute units the package must also answer on (ane,gpu,cpu,reference), each run as predict "
                   "runs it; one that fails is exit 1. Default: the Core ML units this machine has (none off macOS).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify(source: str, package: str, inputs: str | None, min_cosine: float | None, min_top1: float | None,
           min_top5: float | None, max_rel_l2: float | None, seq_len: int | None, allow_dequant: bool,
           steps: int | None, units: str | None,
           as_json: bool) -> None:
    """Compare PACKAGE with SOURCE: ONNX Runtime vs the reference executor and each compute unit."""
    from dataclasses import replace
    from pathlib import Path

    from bitnet_coreml.verify import Thresholds, package_meta
    from bitnet_coreml.verify import verify as run_verify

    precision = package_meta(Path(package))[0].get("bitnet_coreml.precision", "fp16") if Path(package).exists() else "fp16"
    t = Thresholds.for_precision(precision)
    changes = {k: v for k, v in (("cosine", min_cosine), ("top1", min_top1), ("top5", min_top5),
                                 ("rel_l2", max_rel_l2)) if v is not None}
    t = replace(t, **changes)
    chain = None
    if units is not None:
        chain = [u.strip() for u in units.split(",") if u.strip()]
        if not chain:
            raise InputError("--units: empty; give compute units, e.g. --units ane,cpu")
    report = run_verify(source, package, inputs, t, raise_on_failure=False, seq_len=seq_len,
                        allow_dequant=allow_dequant, steps=steps, units=chain)
    if as_json:
        echo_json(report.to_dict())
    else:
        from rich.console import Console

        con = Console()
        con.print(parity_table(report.to_dict()["comparisons"], f"{package} vs {source} ({report.precision}); "
                                                                "top-1 (outside fp16 ties)"))
        for s in report.skipped:
            con.print(f"- skipped: {s}")
    if not report.passed:
        if not as_json:
            failing = [c for c in report.to_dict()["comparisons"] if not c["passed"]]
            why = "; ".join(([parity_failures(failing)] if failing or not report.comparisons else [])
                            + report.unit_failures)
            click.echo(f"error: parity failed: {why}", err=True)
        sys.exit(EXIT_CHECK_FAILED)
