"""``bitnet-coreml verify SOURCE PACKAGE``: parity of a package against its source graph; exit 1 below threshold."""

from __future__ import annotations

import sys

import click

from bitnet_coreml.commands._common import echo_json
from bitnet_coreml.errors import EXIT_CHECK_FAILED


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
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify(source: str, package: str, inputs: str | None, min_cosine: float | None, min_top1: float | None,
           min_top5: float | None, max_rel_l2: float | None, seq_len: int | None, allow_dequant: bool,
           steps: int | None,
           as_json: bool) -> None:
    """Compare PACKAGE with SOURCE: ONNX Runtime vs the reference executor (and Core ML on macOS)."""
    from dataclasses import replace  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from bitnet_coreml.verify import Thresholds, package_meta  # noqa: PLC0415
    from bitnet_coreml.verify import verify as run_verify  # noqa: PLC0415

    precision = package_meta(Path(package))[0].get("bitnet_coreml.precision", "fp16") if Path(package).exists() else "fp16"
    t = Thresholds.for_precision(precision)
    changes = {k: v for k, v in (("cosine", min_cosine), ("top1", min_top1), ("top5", min_top5),
                                 ("rel_l2", max_rel_l2)) if v is not None}
    t = replace(t, **changes)
    report = run_verify(source, package, inputs, t, raise_on_failure=False, seq_len=seq_len,
                        allow_dequant=allow_dequant, steps=steps)
    if as_json:
        echo_json(report.to_dict())
    else:
        from rich.console import Console  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415

        con = Console()
        tab = Table("runner", "reference", "output", "cosine", "rel L2", "max abs", "top-1 (outside ties)", "top-5", "ok",
                    title=f"{package} vs {source} ({report.precision})")
        for c in report.comparisons:
            tab.add_row(c.runner, c.reference, c.output, f"{c.cosine:.6f}", f"{c.rel_l2:.4g}", f"{c.max_abs:.4g}",
                        _top1(c), "" if c.top5 is None else f"{c.top5:.4f}",
                        "yes" if c.passed else "NO")
        con.print(tab)
        for s in report.skipped:
            con.print(f"- skipped: {s}")
        for c in report.comparisons:
            for f in c.failures:
                con.print(f"[red]{c.runner} vs {c.reference} on {c.output}: {f}[/red]")
    if not report.passed:
        if not as_json:
            click.echo("error: parity below threshold", err=True)
        sys.exit(EXIT_CHECK_FAILED)


def _top1(c: object) -> str:
    top1 = getattr(c, "top1", None)
    res = getattr(c, "top1_resolvable", None)
    if top1 is None:
        return ""
    return f"{top1:.4f}" if res is None else f"{top1:.4f} ({res:.4f})"
