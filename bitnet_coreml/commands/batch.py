"""``bitnet-coreml batch PACKAGE DATASET -o JOBDIR``: a resumable batch prediction job."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from bitnet_coreml.commands._common import echo_json
from bitnet_coreml.errors import EXIT_RUNTIME, InputError


def _factory(package: Path, units: str | None, strict: bool) -> Any:
    from bitnet_coreml.jobs.predictors import RuntimeFactory

    chain = tuple(u.strip() for u in units.split(",") if u.strip()) if units else None
    return RuntimeFactory(package, units=chain, strict=strict)


def _generation_job(package: Path, dataset: Path, units: str | None, max_new_tokens: int,
                    options: Any) -> tuple[Any, Any] | None:
    """``(factory, prompts)`` when PACKAGE is stateful (a generation batch), else None."""
    from bitnet_coreml.package.chunked import is_chunked

    if not (package / "Manifest.json").is_file() and not is_chunked(package):
        return None
    from bitnet_coreml.package.stateful import stateful_info

    if stateful_info(package) is None:
        return None
    from bitnet_coreml.jobs.generation import GenerationFactory, PromptLines

    if options.output_format != "npz":
        raise InputError(f"--output-format {options.output_format}: a generation batch (stateful package) writes "
                         "one JSON document per prompt and generations.jsonl")
    prompts = PromptLines(dataset, max_new_tokens)
    chain = tuple(u.strip() for u in units.split(",") if u.strip()) if units else None
    return GenerationFactory(package, prompts, chain), prompts


def _workers(value: str) -> int:
    from bitnet_coreml._threads import available_cores

    if value.strip().lower() == "auto":
        return available_cores()
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(f"{value!r}; allowed: auto or an integer >= 1", param_hint="--workers")
    return n


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (exit 143 instead of 130)."""


@click.command("batch")
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("-o", "--output", "outdir", required=True, metavar="JOBDIR", type=click.Path(path_type=Path),
              help="Job folder: outputs/, manifest.jsonl, summary.json. Rerun the same command to resume.")
@click.option("--workers", default="auto", show_default=True, metavar="N|auto",
              help="Worker processes (local) or predictor actors (ray); each loads the package once and gets "
                   "cores/N BLAS threads. auto: one per core.")
@click.option("--strict", is_flag=True, help="Fail items holding arrays the package does not take (default: ignore).")
@click.option("--output-format", type=click.Choice(["npz", "npz-shards", "parquet"]), default="npz",
              show_default=True, help="One .npz per item, or combined files of --shard-size items (resumable).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Items per combined file (npz-shards, parquet).")
@click.option("--restart", is_flag=True, help="Discard the results already in JOBDIR and start the job afresh.")
@click.option("--verbose", is_flag=True, help="Show Ray's own log lines (--engine ray).")
@click.option("--units", default=None, metavar="LIST",
              help="Compute-unit fallback chain, comma-separated (ane,gpu,cpu,reference).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where to run: this machine, or a Ray cluster (needs the `ray` extra).")
@click.option("--ray-address", default=None, help="Ray cluster address (default: start or join a local one).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Generation batches: new tokens per prompt unless its line says otherwise.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def batch(package: Path, dataset: Path, outdir: Path, workers: str, strict: bool, output_format: str,
          shard_size: int, restart: bool, verbose: bool, units: str | None, engine: str, ray_address: str | None,
          max_new_tokens: int, as_json: bool, progress: bool | None) -> None:
    """Run PACKAGE over every item of DATASET and write the outputs to JOBDIR.

    DATASET is a folder of .npz files, one .npz whose arrays share a leading batch dimension, or a
    .jsonl file of named arrays. For a stateful PACKAGE (convert --stateful) it is a .jsonl file of
    prompts, one JSON object per line with "prompt" or "ids" (and optional "id", "max_new_tokens",
    "stop", "temperature", "top_k", "top_p", "repetition_penalty", "seed"); JOBDIR then gets
    generations.jsonl (text, ids, timings, unit per prompt). A failing item is recorded and the job
    goes on; rerunning the same command skips finished items (checksums verified). Exit 0 when every
    item succeeded, 3 when some failed (listed in the summary and the manifest); Ctrl-C exits 130,
    SIGTERM 143.
    """
    import signal

    from bitnet_coreml.jobs import BatchOptions, open_dataset, run_batch

    options = BatchOptions(workers=_workers(workers), engine=engine, ray_address=ray_address, restart=restart,
                           verbose=verbose, output_format=output_format, shard_size=shard_size)
    generation = _generation_job(package, dataset, units, max_new_tokens, options)
    if generation is not None:
        factory, ds = generation
    else:
        factory = _factory(package, units, strict)
        ds = open_dataset(dataset)
    tty = sys.stderr.isatty()
    show = (not as_json and tty) if progress is None else progress
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if show and tty:
            summary = _run_with_bar(factory, ds, outdir, options)
        elif show or (progress is None and not as_json):
            summary = run_batch(factory, ds, outdir, options, progress=_LogLines())
        else:
            summary = run_batch(factory, ds, outdir, options)
    except KeyboardInterrupt as e:
        code, what = (143, "terminated (SIGTERM)") if isinstance(e, _Terminated) else (130, "interrupted")
        click.echo(f"{what}: finished items are recorded in {outdir}/manifest.jsonl and {outdir}/summary.json;"
                   " rerun the same command to resume", err=True)
        sys.exit(code)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if generation is not None:
        from bitnet_coreml.jobs.generation import finish_generations

        summary = finish_generations(summary, outdir, ds)
    if as_json:
        echo_json(summary)
    else:
        _print_summary(summary)
    if not summary["job"]["complete"]:
        sys.exit(EXIT_RUNTIME)


def _eta(ev: Any, elapsed: float) -> str:
    """Time left, from the items predicted in this run (items done by an earlier run do not count)."""
    done_now = ev.ok + ev.failed
    if done_now == 0 or elapsed <= 0:
        return "-"
    left = max(ev.to_do - done_now, 0) / (done_now / elapsed)
    m, sec = divmod(int(round(left)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}"


class _LogLines:
    """Progress as plain log lines every few seconds, for logs and CI (stderr is not a terminal)."""

    def __init__(self, every_s: float = 5.0) -> None:
        import time

        self._clock = time.monotonic
        self._t0 = self._clock()
        self._every = every_s
        self._next = self._t0 + every_s
        self._last: Any = None

    def __call__(self, ev: Any) -> None:
        now = self._clock()
        first = self._last is None
        self._last = ev
        if first or now >= self._next or ev.completed == ev.total:
            self._next = now + self._every
            elapsed = now - self._t0
            rate = (ev.ok + ev.failed) / elapsed if elapsed > 0 else 0.0
            click.echo(f"batch: {ev.completed}/{ev.total} done ({ev.skipped} from an earlier run), "
                       f"{ev.failed} failed, {rate:.1f} items/s, ETA {_eta(ev, elapsed)}", err=True)


def _run_with_bar(factory: Any, ds: Any, outdir: Path, options: Any) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from bitnet_coreml.jobs import run_batch

    columns = (TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} items/s"), TextColumn("failed {task.fields[failed]}"),
               TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"))
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("batch", total=len(ds), rate="-", failed=0, eta="-")
        t0 = time.monotonic()

        def on_event(ev: Any) -> None:
            elapsed = time.monotonic() - t0
            rate = (ev.ok + ev.failed) / elapsed if elapsed > 0 and ev.ok + ev.failed else None
            bar.update(task, completed=ev.completed, failed=ev.failed,
                       rate=f"{rate:.1f}" if rate else "-", eta=_eta(ev, elapsed))

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
    if "generations" in s:
        t.add_row("generations", f"{s['generations']['items']} in {s['generations']['file']}")
    console = Console()
    console.print(t)
    for f in run["failures"][:5]:
        console.print(f"[red]failed[/red] {f['id']}: {f['error']}")
