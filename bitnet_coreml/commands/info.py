"""``bitnet-coreml info``: this host (Core ML, chip, ANE, GPU, memory, thermal) and the capability table."""

from __future__ import annotations

import click

from bitnet_coreml.commands._common import echo_json


def _u(v: object) -> str:
    return "unknown" if v is None else str(v)


@click.command("info")
@click.option("--capabilities", "cap_files", multiple=True, type=click.Path(path_type=str),
              help="Extra capability TOML file(s) merged over the bundled database.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(cap_files: tuple[str, ...], as_json: bool) -> None:
    """Show what this machine can run and the capability database (chips, ANE generations, limits)."""
    from bitnet_coreml.check.capabilities import load_capabilities  # noqa: PLC0415
    from bitnet_coreml.check.platform import DeviceCompatibilityChecker  # noqa: PLC0415

    db = load_capabilities(*cap_files)
    p = DeviceCompatibilityChecker.get_platform_info(db=db)
    if as_json:
        echo_json({"platform": p.to_dict(), "capabilities": db.to_dict()})
        return
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    con = Console()
    t = Table("", "", title="This host", show_header=False)
    t.add_row("OS", f"{p.os_name} {p.os_version} ({p.machine})")
    t.add_row("chip", _u(p.chip) + ("" if p.chip_in_database or p.chip is None else "  (not in the capability database)"))
    t.add_row("Core ML", ("[green]available[/green]" if p.coreml_available else "[red]unavailable[/red]")
              + f": {p.coreml_reason}")
    t.add_row("Neural Engine", f"available: {_u(p.ane_available)}, generation: {_u(p.ane_generation)} ({p.ane_reason})")
    t.add_row("GPU", _u(p.gpu) + (f"  (matrix row {p.gpu_device})" if p.gpu_device else ""))
    t.add_row("memory", f"{_u(p.memory_total_mb)} MB total, {_u(p.memory_available_mb)} MB available")
    temps = ""
    if p.temperatures_c:
        temps = "; " + ", ".join(f"{k} {v:.0f} C" for k, v in p.temperatures_c.items())
    t.add_row("thermal", f"{_u(p.thermal_state)} ({p.thermal_source}{temps})")
    con.print(t)
    if not p.coreml_available:
        con.print(f"[yellow]Core ML is unavailable here: {p.coreml_reason}. Conversion, checks and the reference "
                  "executor still work; predictions fall back to the reference executor.[/yellow]")

    chips = Table("chip", "targets", "ANE gen", "TOPS", "data types", "budget MB", "int8xint8", "GPU row",
                  title="Chips (capability database)")
    for c in db.chips.values():
        g = db.generations.get(c.ane_generation) if c.ane_generation is not None else None
        chips.add_row(c.name, ",".join(c.platforms), _u(c.ane_generation), _u(c.tops),
                      ",".join(g.data_types) if g else "unknown",
                      _u(g.model_size_budget_mb if g else None), _u(c.int8_compute), _u(c.gpu))
    con.print(chips)
    dev = Table("device", "neural networks", "matrix ops", "convolution", "graph API", "memory MB",
                title="Device matrix (seed)")
    for d in db.devices.values():
        dev.add_row(d.name, d.neural_networks, d.matrix_ops, d.convolution, "yes" if d.graph_api else "no",
                    _u(d.memory_limit_mb))
    con.print(dev)
    oses = Table("OS", "Core ML spec", "Core ML", "MIL opset", title="OS versions")
    for o in sorted(db.os_versions, key=lambda o: (o.platform, o.spec_version)):
        oses.add_row(o.label, str(o.spec_version), o.core_ml, o.mil_opset)
    con.print(oses)
    lim = Table("limit", "value", "severity", "source", title="Limits")
    for name, lm in db.limits.items():
        lim.add_row(name, ", ".join(f"{k}={v}" for k, v in lm.values.items()) or "-", lm.severity, lm.source)
    con.print(lim)
    con.print(f"capability files: {', '.join(db.files)}")
