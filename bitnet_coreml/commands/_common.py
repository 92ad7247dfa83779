"""Helpers shared by the CLI commands: JSON output and the options every target-aware command spells alike."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import click

from bitnet_coreml._json import dump_json
from bitnet_coreml.vocab import DEFAULT_TARGET, EMBED_BITS, TARGETS

__all__ = ["dump_json", "echo_json", "parity_failures", "parity_table", "table", "target_options"]


def echo_json(obj: Any) -> None:
    sys.stdout.write(dump_json(obj) + "\n")


def target_options(f: Any) -> Any:
    """``--target``, ``--chip``, ``--min-os``, ``--embed-bits``, ``--capabilities``: one spelling and one
    default in every command that names a target (``bitnet_coreml.vocab``)."""
    options = [
        click.option("--target", type=click.Choice(TARGETS, case_sensitive=False), default=None,
                     help=f"Platform the package ships to (default: the one --min-os names, else {DEFAULT_TARGET})."),
        click.option("--chip", default=None,
                     help="Chip to check against, e.g. A17Pro, A16, M1, 'M2 Max' (default: none; per-chip budgets "
                          "are then not evaluated). Chips not listed: --capabilities."),
        click.option("--min-os", default=None,
                     help="Minimum OS, as iOS17, macOS14, macOS14.4 or 17 (default: the lowest the graph needs)."),
        click.option("--embed-bits", type=click.Choice([str(b) for b in EMBED_BITS]), default=None,
                     help="Palettize the non-ternary weights (embedding, lm_head) to this many bits "
                          "(default: fp16; fewer bits cost accuracy, measure with --verify)."),
        click.option("--capabilities", "cap_files", multiple=True, type=click.Path(path_type=str),
                     help="Extra capability TOML file(s) merged over the bundled database (e.g. a chip not listed)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def table(*headers: str, whole: Iterable[str] = (), **kwargs: Any) -> Any:
    """A rich table that never cuts a value at any width: text folds onto more lines, and the columns in
    ``whole`` (numbers, ids) are kept on one line while the others give up their width."""
    from rich.table import Table

    keep = set(whole)
    t = Table(**kwargs)
    for h in headers:
        t.add_column(h, overflow="fold", no_wrap=h in keep)
    return t


def _top1(c: dict[str, Any]) -> str:
    top1, res = c.get("top1"), c.get("top1_resolvable")
    if top1 is None:
        return ""
    return f"{top1:.4f}" if res is None else f"{top1:.4f} ({res:.4f})"


def parity_table(comparisons: list[dict[str, Any]], title: str) -> Any:
    """The parity comparisons (``ParityReport.to_dict()["comparisons"]``) in 80 columns, numbers whole."""
    numbers = ("cosine", "rel L2", "max abs", "top-1", "top-5", "ok")
    t = table("compared", *numbers, whole=numbers, title=title)
    for c in comparisons:
        t.add_row(f"{c['runner']} vs {c['reference']}: {c['output']}", f"{c['cosine']:.6f}", f"{c['rel_l2']:.4g}",
                  f"{c['max_abs']:.4g}", _top1(c), "" if c.get("top5") is None else f"{c['top5']:.4f}",
                  "yes" if c["passed"] else "NO")
    return t


def parity_failures(comparisons: list[dict[str, Any]]) -> str:
    """The failing metrics and their thresholds, for the error line: ``cosine 0.998 < 0.999; ...``."""
    return "; ".join(f"{c['runner']} vs {c['reference']} {c['output']}: {', '.join(c['failures'])}"
                     for c in comparisons if not c["passed"]) or "no outputs compared"
