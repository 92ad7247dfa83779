"""``bitnet-coreml pipeline run FILE``: build every model of a pipeline file (what ``make convert`` runs)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from bitnet_coreml.commands._common import echo_json


@click.group("pipeline")
def pipeline() -> None:
    """Build pipelines: pipelines/*.toml describe models, targets, options and checks."""


@pipeline.command("run")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the build report as JSON.")
@click.option("--force", is_flag=True, help="Rebuild every entry even when its inputs are unchanged.")
def run(file: Path, as_json: bool, force: bool) -> None:
    """Check, convert and verify every model and target in FILE, skipping up-to-date ones.

    Exit 0 when every entry is built or up to date, 1 when a model fails its check or parity (the
    others are still built), 2 for a bad pipeline file or model.
    """
    import logging

    from bitnet_coreml.jobs.pipeline import run_pipeline
    from bitnet_coreml.jobs.spec import load_pipeline

    spec = load_pipeline(file)
    if not as_json:
        # Library warnings (e.g. an fp16 range note) are worth seeing in a build log, on stderr.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours = logging.getLogger("bitnet_coreml")
        ours.addHandler(handler)
        ours.propagate = False  # shown live here, so not held again by the CLI guard

    def on_event(key: str, message: str) -> None:
        if not as_json:
            click.echo(f"[{key}] {message}", err=True)

    report = run_pipeline(spec, force=force, on_event=on_event)
    if as_json:
        echo_json(report.to_dict())
    else:
        _table(report.to_dict())
    sys.exit(report.exit_code)


def _table(d: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"pipeline {d['pipeline']} -> {d['output_dir']}")
    for col in ("model", "target", "status", "check (viol./warn.)", "parity", "time"):
        t.add_column(col)
    colors = {"built": "green", "skipped": "cyan", "failed": "red", "error": "red"}
    notes = []
    for r in d["results"]:
        check = r.get("check") or {}
        check_s = f"{check['violations']} / {check['warnings']}" if "violations" in check else "-"
        parity = r.get("parity")
        parity_s = "-"
        if parity:
            cos = [c["cosine"] for c in parity.get("comparisons", [])]
            parity_s = ("pass" if parity.get("passed") else "FAIL") + (f" cos {min(cos):.5f}" if cos else "")
        t.add_row(r["model"], r["target"], f"[{colors.get(r['status'], 'white')}]{r['status']}[/]", check_s,
                  parity_s, f"{r['seconds']:.1f}s")
        notes.append(f"{r['model']}@{r['target']}: " + (r["reason"] if r["reason"] else r["package"]))
        if r.get("html"):
            notes.append(f"{r['model']}@{r['target']}: report {r['html']}")
    console = Console()
    console.print(t)
    for note in notes:
        console.print(note, highlight=False, soft_wrap=True)
    status = "ok" if d["ok"] else f"FAILED (exit {d['exit_code']})"
    console.print(f"{len(d['results'])} entries, {d['seconds']:.1f} s: {status}")
