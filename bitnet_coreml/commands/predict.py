"""``bitnet-coreml predict PACKAGE --input X.npz``: one prediction with compute-unit fallback.

Writes the outputs (``-o Y.npz``, atomically), and reports which unit answered and why every other
unit was skipped or given up.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import click
import numpy as np

from bitnet_coreml.commands._common import echo_json
from bitnet_coreml.errors import InputError, ModelLoadError


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise InputError(f"--input {path}: no such file; give an .npz with one array per model input")
    from bitnet_coreml._files import load_npz

    return load_npz(path, "--input")


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _human(result: Any, out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"answered by [bold]{result.unit}[/bold] "
                        f"({result.unit_latency_s * 1e3:.1f} ms; total {result.latency_s * 1e3:.1f} ms)")
    table.add_column("unit")
    table.add_column("outcome")
    table.add_column("reason", overflow="fold")
    for a in result.attempts:
        table.add_row(a.unit, a.outcome, a.reason)
    console.print(table)
    console.print(f"power target: {result.power_target} ({result.power_reason})")
    for note in result.notes:
        console.print(f"note: {note}")
    for name, v in result.outputs.items():
        console.print(f"output {name}: shape {list(v.shape)} {v.dtype}")
    if out is not None:
        console.print(f"wrote {out}")


@click.command(name="predict")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--input", "-i", "input_path", required=True, type=click.Path(path_type=Path),
              help=".npz with one array per model input.")
@click.option("-o", "--output", "output_path", type=click.Path(path_type=Path), help="Write the outputs to this .npz.")
@click.option("--units", default="ane,gpu,cpu,reference", show_default=True,
              help="Unit chain, comma separated, from: ane, gpu, cpu, reference.")
@click.option("--retries", type=int, default=None, help="Retries per unit for transient errors (default 3).")
@click.option("--power-target", type=click.Choice(["balanced", "efficiency", "speed"]), default="balanced",
              show_default=True, help="How to order the unit chain.")
@click.option("--timeout", "timeout_s", type=float, default=None, help="Per-unit timeout in seconds (default 300).")
@click.option("--no-validate", is_flag=True, help="Do not compare a unit's first outputs to the CPU reference.")
@click.option("--function", "function", type=click.Choice(["prefill", "decode"]), default=None,
              help="Stateful package: run every token through this function (default: chunks of P through "
                   "prefill, the rest through decode).")
@click.option("--strict", is_flag=True, help="Refuse an --input file holding arrays the package does not take.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def predict(package: Path, input_path: Path, output_path: Path | None, units: str, retries: int | None,
            power_target: str, timeout_s: float | None, no_validate: bool, function: str | None, strict: bool,
            as_json: bool) -> None:
    """One prediction of PACKAGE with fallback between compute units.

    The package's inputs are taken from the --input file by name; other arrays in it are ignored
    with a note (--strict refuses them). Where the package's batch dimension is 1 and the file's
    arrays hold N rows, each row is predicted and the outputs are stacked along the first axis.

    A stateful package (convert --stateful) takes input_ids [1, N] (and optionally position [1], the
    first token's position, default 0): the tokens run call by call with one KV-cache state on the
    first unit of --units that can (Core ML on macOS, the reference executor anywhere; a failing unit
    hands the whole request to the next), and the output is the logits of every call concatenated.
    """
    from bitnet_coreml.package.chunked import is_chunked
    from bitnet_coreml.package.stateful import stateful_info
    from bitnet_coreml.runtime import FallbackStrategy
    from bitnet_coreml.runtime.chunked import open_predictor

    try:
        info = stateful_info(package) if (package / "Manifest.json").is_file() or is_chunked(package) else None
    except ModelLoadError:
        info = None  # an unreadable package: the predictor below says what is wrong with it
    if info is not None:
        _predict_stateful(package, _load_npz(input_path), function, output_path, as_json, units)
        return
    if function is not None:
        raise InputError(f"--function {function}: {package} is not a stateful package (it has one function)")

    overrides: dict[str, Any] = {"units": tuple(u for u in units.split(",") if u.strip()),
                                 "power_target": power_target, "validate_first_use": not no_validate}
    if retries is not None:
        overrides["max_retry_attempts"] = retries
    if timeout_s is not None:
        overrides["unit_timeout_s"] = timeout_s
    strategy = FallbackStrategy(**overrides)
    predictor = open_predictor(package, strategy)  # a package, or a chunked folder piece by piece
    from bitnet_coreml.runtime.package_io import select_inputs, split_batch

    inputs, notes = select_inputs(predictor.info, _load_npz(input_path), strict=strict, source=str(input_path))
    rows = split_batch(predictor.info, inputs)
    try:
        results = [predictor.predict(row, source=str(input_path)) for row in rows]
    finally:
        predictor.close()
    result = results[-1]
    if len(rows) > 1:
        notes.append(f"{input_path}: {len(rows)} rows predicted one at a time (the package's batch is 1); "
                     "outputs stacked along the first axis")
        stacked = {k: np.concatenate([r.outputs[k] for r in results]) for k in result.outputs}
        result = dataclasses.replace(result, outputs=stacked, batch_size=len(rows),
                                     latency_s=sum(r.latency_s for r in results))
    result = dataclasses.replace(result, notes=(*notes, *result.notes))
    if output_path is not None:
        _save_npz(output_path, result.outputs)
    if as_json:
        doc = result.to_dict()
        doc["package"] = str(package)
        doc["output_file"] = str(output_path) if output_path else None
        doc["recovery_stats"] = predictor.get_recovery_stats().to_dict()
        echo_json(doc)
    else:
        _human(result, output_path)


def _stateful_on_units(package: Path, units: str, feed: Any) -> tuple[Any, str, Any, list[str]]:
    """``(feed(run), unit, run, notes)`` on the first unit of ``units`` that can run the request.

    Core ML units (macOS: one ``MLModel`` per function and one ``MLState``, ``generation.engines``),
    the reference executor anywhere. A unit that is unavailable is noted and skipped; one that fails
    while loading or running is noted and the next unit runs the whole request again on a fresh
    state, so the logits do not depend on which unit failed. Bad input (InputError) is not retried.
    """
    from bitnet_coreml.errors import ExhaustedError
    from bitnet_coreml.executor.stateful import StatefulRun
    from bitnet_coreml.generation.engines import open_engine, unavailable_reason
    from bitnet_coreml.runtime.recovery import classify_exception
    from bitnet_coreml.runtime.strategy import ComputeUnit
    from bitnet_coreml.runtime.units import ReferenceUnit, make_unit

    notes: list[str] = []
    for name in [u.strip() for u in units.split(",") if u.strip()]:
        unit = make_unit(ComputeUnit.parse(name), probe_coreml=False)
        why = unavailable_reason(package, unit)
        if why is not None:
            notes.append(f"{unit.name} skipped: {why}")
            continue
        if isinstance(unit, ReferenceUnit):
            run = StatefulRun(package)
            return feed(run), unit.name, run, notes
        try:  # pragma: no cover - Core ML needs macOS (tests/runtime/test_macos.py)
            run = StatefulRun(package, engine=open_engine(unit, package))
            return feed(run), unit.name, run, notes
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - a unit's failure: noted, the next unit runs the request
            notes.append(f"{unit.name} failed: {classify_exception(e, context=unit.name).one_line()}")
    raise ExhaustedError(f"{package.name}: no compute unit could run it ({'; '.join(notes) or 'no units given'})")


def _predict_stateful(package: Path, inputs: dict[str, np.ndarray], function: str | None, output_path: Path | None,
                      as_json: bool, units: str = "reference") -> None:
    import time

    extra = sorted(set(inputs) - {"input_ids", "position"})
    if "input_ids" not in inputs or extra:
        raise InputError(f"{package} (stateful) takes input_ids [1, N] and optionally position [1]; the .npz has "
                         f"{', '.join(sorted(inputs)) or 'nothing'}")
    pos = np.asarray(inputs.get("position", np.zeros(1, np.int32))).reshape(-1)
    if pos.size != 1 or pos.dtype.kind not in "iu":
        raise InputError(f"position must be one integer, got {pos.dtype} {list(pos.shape)}")
    t0 = time.perf_counter()
    logits, unit, run, notes = _stateful_on_units(
        package, units, lambda r: r.feed(inputs["input_ids"], position=int(pos[0]), function=function))
    seconds = time.perf_counter() - t0
    if output_path is not None:
        _save_npz(output_path, {"logits": logits})
    n = int(np.asarray(inputs["input_ids"]).size)
    if as_json:
        echo_json({"package": str(package), "unit": unit, "stateful": run.info.to_dict(), "tokens": n,
                   "position": int(pos[0]), "next_position": run.position, "function": function or "auto",
                   "latency_s": seconds, "outputs": {"logits": list(logits.shape)},
                   "output_file": str(output_path) if output_path else None, "notes": notes})
    else:
        where = "the reference executor" if unit == "reference" else f"Core ML ({unit})"
        click.echo(f"{package}: {n} token(s) from position {int(pos[0])} through "
                   f"{function or 'prefill chunks + decode'} in {where} ({seconds * 1e3:.1f} ms); "
                   f"logits {list(logits.shape)}; next position {run.position}")
        for note in notes:
            click.echo(f"note: {note}", err=True)
        if output_path is not None:
            click.echo(f"wrote {output_path}")
