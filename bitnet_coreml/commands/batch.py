"""``bitnet-coreml batch PACKAGE DATASET -o OUTDIR``: a resumable batch prediction job."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from bitnet_coreml.commands._common import echo_json
from bitnet_coreml.errors import EXIT_RUNTIME


def _factory(package: Path, units: str | None) -> Any:
    from bitnet_coreml.jobs.predictors import RuntimeFactory

    chain = tuple(u.strip() for u in units.split(",") if u.strip()) if units else None
    return RuntimeFactory(package, units=chain)


@click.command("batch")
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(path_type=Path),
              help="Job folder: outputs/, manifest.jsonl, summary.json. Rerun the same command to resume.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Worker processes (local) or predictor actors (ray); each loads the package once.")
@click.option("--units", default=None, metavar="LIST",
              help="Compute-unit fallback chain, comma-separated (ane,gpu,cpu,reference).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where to run: this machine, or a Ray cluster (needs the `ray` extra).")
@click.option("--ray-address", default=None, help="Ray cluster address (default: start or join a local one).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def batch(package: Path, dataset: Path, outdir: Path, workers: int, units: str | None, engine: str,
          ray_address: str | None, as_json: bool, progress: bool | None) -> None:
    """Run PACKAGE over every item of DATASET and write the outputs to OUTDIR.

    DATASET is a folder of .npz files, one .npz whose arrays share a leading batch dimension, or a
    .jsonl file of named arrays. A failing item is recorded and the job goes on; rerunning the same
    command skips finished items (checksums verified). Exit 0 when every item succeeded, 3 when
    some failed (listed in the summary and the manifest).
    """
    from bitnet_coreml.jobs import BatchOptions, open_dataset, run_batch

    options = BatchOptions(workers=workers, engine=engine, ray_address=ray_address)
    factory = _factory(package, units)
    ds = open_dataset(dataset)
    show = (not as_json and sys.stderr.isatty()) if progress is None else progress
    try:
        if show:
            summary = _run_with_bar(factory, ds, outdir, options)
        else:
            summary = run_batch(factory, ds, outdir, options)
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished items are recorded in {outdir}/manifest.jsonl;"
                   " rerun the same command to resume", err=True)
        sys.exit(130)
    if as_json:
        echo_json(summary)
    else:
        _print_summary(summary)
    if not summary["job"]["complete"]:
        sys.exit(EXIT_RUNTIME)


def _run_with_bar(factory: Any, ds: Any, outdir: Path, options: Any) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from bitnet_coreml.jobs import run_batch

    columns = (TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} items/s"), TextColumn("failed {task.fields[failed]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("batch", total=len(ds), rate="-", failed=0)

        def on_event(ev: Any) -> None:
            speed = bar.tasks[0].speed
            bar.update(task, completed=ev.completed, failed=ev.failed,
                       rate=f"{speed:.1f}" if speed else "-")

        return run_batch(factory, ds, outdir, options, progress=on_event)


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    run, job = s["run"], s["job"]
    t = Table(title=f"batch: {s['outdir']}", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("items in dataset", str(job["items"]))
    t.add_row("done now / skipped (already done)", f"{run['ok']} / {run['skipped_done']}")
    t.add_row("failed now", str(run["failed"]))
    t.add_row("wall time", f"{run['wall_s']:.2f} s")
    if run["items_per_s"] is not None:
        t.add_row("throughput", f"{run['items_per_s']:.1f} items/s ({s['workers']} worker(s), {s['engine']})")
    lat = run["latency_ms"]
    if lat:
        t.add_row("latency ms mean / p50 / p90 / p99", f"{lat['mean']:.2f} / {lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f}")
    if run["units"]:
        t.add_row("compute units", ", ".join(f"{k}: {v}" for k, v in sorted(run["units"].items())))
    t.add_row("job complete", f"{job['ok']}/{job['items']} ok" + ("" if job["complete"] else f", {job['failed']} failed"))
    console = Console()
    console.print(t)
    for f in run["failures"][:5]:
        console.print(f"[red]failed[/red] {f['id']}: {f['error']}")
