"""The ``bitnet-coreml`` command line.

Each command lives in its own module under ``bitnet_coreml.commands`` and is imported only when it
is invoked, so ``bitnet-coreml --help`` stays fast. Every command runs under one guard
(``bitnet_coreml._guard``): any failure is one ``error:`` line on stderr and a documented exit code
(see ``bitnet_coreml.errors``), an unexpected exception is ``internal error in <stage>`` (exit 3), and
``--debug`` / ``BITNET_COREML_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from bitnet_coreml import __version__
from bitnet_coreml._guard import debug_enabled, run_guarded
from bitnet_coreml.errors import EXIT_BAD_INPUT

# Commands that run a source graph in ONNX Runtime (fp16 calibration, parity, report): the CLI, owner of
# the process, lets glibc return their large frees to the OS (bitnet_coreml.memory says why here).
HEAP_BOUND_COMMANDS = frozenset({"convert", "verify", "report", "pipeline"})

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
        args = [*getattr(ctx, "_protected_args", []), *ctx.args]
        args = args[:args.index("--")] if "--" in args else args
        where = " ".join(a for a in args[:2] if a in COMMANDS or a == "run") or "bitnet-coreml"
        if args and args[0] in HEAP_BOUND_COMMANDS:
            from bitnet_coreml.memory import mmap_large_allocations

            mmap_large_allocations()
        return run_guarded(lambda: super(LazyGroup, self).invoke(ctx), where=where,
                           debug=debug_enabled(bool(ctx.params.get("debug"))), as_json="--json" in args)


def _not_built(name: str) -> click.Command:
    @click.command(name=name, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1)
    def _cmd(args: tuple[str, ...]) -> None:
        click.echo(f"error: the '{name}' command is not available in this build", err=True)
        sys.exit(EXIT_BAD_INPUT)

    return _cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bitnet-coreml")
@click.option("--debug", is_flag=True, help="Show the traceback of a failure (also BITNET_COREML_DEBUG=1).")
def main(debug: bool) -> None:
    """Compile BitNet (ternary) graphs into Core ML packages for the Apple Neural Engine.

    Exit codes: 0 success, 1 check or parity failed, 2 bad input or usage,
    3 runtime failure after every fallback was exhausted (or an internal error: rerun with --debug).
    """


if __name__ == "__main__":  # pragma: no cover
    main()
