"""``bitnet-coreml info``: this host (Core ML, chip, ANE, GPU, memory, thermal) and the capability table."""

from __future__ import annotations

from typing import Any

import click

from bitnet_coreml.commands._common import echo_json, table


def _u(v: object) -> str:
    return "unknown" if v is None else str(v)


@click.command("info")
@click.option("--capabilities", "cap_files", multiple=True, type=click.Path(path_type=str),
              help="Extra capability TOML file(s) merged over the bundled database.")
@click.option("--ops", "show_ops", is_flag=True,
              help="Show the op-support table instead: the placement rules, then every op the converter lowers "
                   "with its MIL ops and the units it can run on.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(cap_files: tuple[str, ...], show_ops: bool, as_json: bool) -> None:
    """Show what this machine can run and the capability database (chips, ANE generations, limits)."""
    from bitnet_coreml.check.capabilities import load_capabilities
    from bitnet_coreml.check.platform import DeviceCompatibilityChecker

    db = load_capabilities(*cap_files)
    if show_ops:
        _ops(db, as_json)
        return
    p = DeviceCompatibilityChecker.get_platform_info(db=db)
    if as_json:
        echo_json({"platform": p.to_dict(), "capabilities": db.to_dict()})
        return
    from rich.console import Console
    con = Console()
    t = table("", "", title="This host", show_header=False)
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

    # One short table per kind of row, within 80 columns; --json has every field and every row's source.
    chips = table("chip", "for", "ANE gen", "TOPS", "budget MB", "int8", "GPU", title="Chips (--chip)",
                  whole=("chip", "ANE gen", "TOPS", "budget MB", "int8"))
    for c in db.chips.values():
        g = db.generations.get(c.ane_generation) if c.ane_generation is not None else None
        chips.add_row(c.name, ",".join(c.platforms), _u(c.ane_generation), _u(c.tops),
                      _u(g.model_size_budget_mb if g else None), _u(c.int8_compute), _u(c.gpu))
    con.print(chips)
    gens = table("ANE gen", "data types", title="ANE data types", whole=("ANE gen",))
    for g in sorted(db.generations.values(), key=lambda g: g.id):
        gens.add_row(str(g.id), ", ".join(g.data_types))
    con.print(gens)
    oses = table("--min-os", "Core ML spec", "MIL opset", title="OS versions", whole=("--min-os",))
    for o in sorted(db.os_versions, key=lambda o: (o.platform, o.spec_version)):
        oses.add_row(o.label, f"{o.spec_version} ({o.core_ml})", o.mil_opset)
    con.print(oses)
    lim = table("limit", "value", "severity", title="Limits", whole=("limit", "severity"))
    for name, lm in db.limits.items():
        lim.add_row(name, ", ".join(f"{k}={v}" for k, v in lm.values.items()) or "-", lm.severity)
    con.print(lim)
    con.print(f"{len(db.devices)} GPU device rows and the source of every row: bitnet-coreml info --json")
    con.print(f"capability files: {', '.join(db.files)}")


def _ops(db: Any, as_json: bool) -> None:
    """``info --ops``: the ``[[unit_rule]]`` rows and the op-support table (``bitnet_coreml.opsupport``)."""
    from dataclasses import asdict

    from bitnet_coreml.opsupport import support_table

    rows = support_table(db)
    if as_json:
        echo_json({"unit_rules": [asdict(r) for r in db.unit_rules.values()], "ops": [r.to_dict() for r in rows]})
        return
    from rich.console import Console

    con = Console()
    rules = table("rule", "matches", "off", "reason", title="Placement rules (unit_rule rows, in order)",
                  whole=("rule", "off"))
    for r in db.unit_rules.values():
        rules.add_row(r.id, r.match + (f" {', '.join(r.ops)}" if r.ops else ""), ",".join(r.excludes), r.reason)
    con.print(rules)
    ops = table("op", "runs on", "MIL ops", title=f"Ops the converter lowers ({len(rows)})", whole=("op", "runs on"))
    for o in rows:
        ops.add_row(o.op, ",".join(o.units), " ".join(o.mil_ops) or "(folded to constants)")
    con.print(ops)
    con.print("every op may also leave the ANE per node (shapes, attributes, precision): the rules above; "
              "each op's limits and reasons: bitnet-coreml info --ops --json")
