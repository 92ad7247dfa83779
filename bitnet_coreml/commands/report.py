"""``bitnet-coreml report PACKAGE [--source MODEL] [--input X.npz] -o report.html [--json]``: the conversion report."""

from __future__ import annotations

import click

from bitnet_coreml.commands._common import echo_json
from bitnet_coreml.errors import InputError


def check_output(out: str) -> None:
    """Refuse a report path that is not an .html file in an existing folder (before any work)."""
    from pathlib import Path

    if not out.endswith((".html", ".htm")):
        raise InputError(f"{out}: the report is an HTML page; the name must end in .html")
    if not Path(out).parent.is_dir():
        raise InputError(f"{out}: the folder {Path(out).parent} does not exist")


@click.command("report")
@click.argument("package", type=click.Path(path_type=str))
@click.option("--source", type=click.Path(path_type=str), default=None,
              help="The model the package was converted from (.onnx or checkpoint folder): compute units per op "
                   "and parity by depth.")
@click.option("--input", "inputs", type=click.Path(path_type=str), default=None,
              help=".npz with the graph inputs (as for verify); default: verify's random draws. Adds op timings.")
@click.option("-o", "--output", "out", type=click.Path(path_type=str), default=None,
              help="Write the HTML page here (one self-contained file, opens offline).")
@click.option("--seq-len", type=int, default=None,
              help="Sequence length for a Hugging Face checkpoint source (default: the package's).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report data as JSON (docs/schemas/report.schema.json).")
def report(package: str, source: str | None, inputs: str | None, out: str | None, seq_len: int | None,
           as_json: bool) -> None:
    """Write an offline HTML report of PACKAGE (or a chunked model folder): summary, compute units, fp16 headroom,
    parity, memory, timings."""
    if out is None and not as_json:
        raise InputError("give -o REPORT.html (and/or --json)")
    if out is not None:
        check_output(out)
    from bitnet_coreml.report import ChartWorker, collect, write_html

    if out is None:
        data = collect(package, source, inputs, seq_len=seq_len)
    else:
        from bitnet_coreml.report.html import chart_jobs

        with ChartWorker() as worker:  # draws each chart in a child process as soon as its data is known
            data = collect(package, source, inputs, seq_len=seq_len, progress=lambda part: worker.submit(chart_jobs(part)))
            write_html(data, out, worker)
    if as_json:
        echo_json(data)
    else:
        click.echo(out)
