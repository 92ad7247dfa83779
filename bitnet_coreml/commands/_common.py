"""Helpers shared by the CLI commands: JSON output and the options every target-aware command spells alike."""

from __future__ import annotations

import sys
from typing import Any

import click

from bitnet_coreml._json import dump_json
from bitnet_coreml.vocab import DEFAULT_TARGET, EMBED_BITS, TARGETS

__all__ = ["dump_json", "echo_json", "target_options"]


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
