"""The ``bitnet-coreml`` command line.

Each command lives in its own module under ``bitnet_coreml.commands`` and is imported only when it
is invoked, so ``bitnet-coreml --help`` stays fast. Errors of the project's own types become one
line on stderr and their documented exit code (see ``bitnet_coreml.errors``); anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from bitnet_coreml import __version__
from bitnet_coreml.errors import EXIT_BAD_INPUT, BitnetCoremlError

# command name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "info": ("bitnet_coreml.commands.info", "info", "Platform, devices and the capability table."),
    "inspect": ("bitnet_coreml.commands.inspect", "inspect_cmd", "Graph summary: ops, parameters, BitLinear layers, size."),
    "check": ("bitnet_coreml.commands.check", "check", "Pre-conversion ANE/target report; exit 1 on violations."),
    "convert": ("bitnet_coreml.commands.convert", "convert", "Check, convert and package a model (optionally verify)."),
    "verify": ("bitnet_coreml.commands.verify", "verify", "Parity of a package against its source graph."),
    "predict": ("bitnet_coreml.commands.predict", "predict", "One prediction with compute-unit fallback."),
    "batch": ("bitnet_coreml.commands.batch", "batch", "Batch prediction job over a dataset (resumable)."),
    "generate": ("bitnet_coreml.commands.generate", "generate", "Stream text from a stateful package (fallback keeps every token)."),
    "report": ("bitnet_coreml.commands.report", "report", "Offline HTML report of a package (compute units, fp16, parity, memory)."),
    "pipeline": ("bitnet_coreml.commands.pipeline", "pipeline", "Build pipelines (what `make convert` runs)."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[cmd_name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                return _not_built(cmd_name)
            raise
        cmd: click.Command = getattr(module, attr)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, _, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BitnetCoremlError as e:
            click.echo(f"error: {e.one_line()}", err=True)
            ctx.exit(e.exit_code)


def _not_built(name: str) -> click.Command:
    @click.command(name=name, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1)
    def _cmd(args: tuple[str, ...]) -> None:
        click.echo(f"error: the '{name}' command is not available in this build", err=True)
        sys.exit(EXIT_BAD_INPUT)

    return _cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bitnet-coreml")
def main() -> None:
    """Compile BitNet (ternary) graphs into Core ML packages for the Apple Neural Engine.

    Exit codes: 0 success, 1 check or parity failed, 2 bad input or usage,
    3 runtime failure after every fallback was exhausted.
    """


if __name__ == "__main__":  # pragma: no cover
    main()
