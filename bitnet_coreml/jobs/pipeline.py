"""Run a pipeline: check -> convert -> verify for every model and target, incrementally.

For each (model, target) the runner computes the input hash (:mod:`bitnet_coreml.jobs.buildstate`);
an up-to-date package is skipped without importing the converter. Otherwise the package is built in
a temporary folder next to its destination, verified, and only then renamed into place, followed by
its JSON report and the manifest update. An interrupted build therefore leaves at most a ``.tmp-*``
folder (removed by the next run) and never a package the manifest vouches for. A model that fails its
check or parity is recorded and the others are still built; the exit code is the worst outcome.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitnet_coreml.errors import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_RUNTIME,
    BitnetCoremlError,
    CheckFailedError,
    ParityError,
)
from bitnet_coreml.jobs._io import atomic_write_json, lock_dir, remove_path, replace_tree, sha256_tree
from bitnet_coreml.jobs.buildstate import BuildRecord, BuildState, converter_version
from bitnet_coreml.jobs.spec import ModelEntry, Pipeline, Target, load_pipeline

log = logging.getLogger(__name__)

STATUSES = ("built", "skipped", "failed", "error")


@dataclass
class EntryResult:
    """What happened to one (model, target)."""

    model: str
    target: str
    package: str
    status: str  # built | skipped | failed (check or parity) | error (bad input, runtime, internal bug)
    reason: str = ""
    exit_code: int = EXIT_OK
    seconds: float = 0.0
    report: str = ""
    html: str = ""  # the conversion report page beside the package (bitnet_coreml.report)
    check: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PipelineReport:
    pipeline: str
    output_dir: str
    results: list[EntryResult]
    seconds: float

    @property
    def exit_code(self) -> int:
        return max((r.exit_code for r in self.results), default=EXIT_OK)

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "output_dir": self.output_dir, "seconds": round(self.seconds, 3),
                "ok": self.exit_code == EXIT_OK, "exit_code": self.exit_code,
                "converter": converter_version(), "results": [r.to_dict() for r in self.results]}


EventFn = Callable[[str, str], None]  # (entry key, message)


def run_pipeline(pipeline: Pipeline | str | os.PathLike[str], *, force: bool = False,
                 on_event: EventFn | None = None) -> PipelineReport:
    """Build every model and target of ``pipeline``; see the module docstring."""
    t_all = time.perf_counter()
    p = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline)
    out_dir = p.output_dir
    say: EventFn = on_event or (lambda _k, _m: None)
    fd = lock_dir(out_dir, "another pipeline run is building into this folder; wait for it")
    try:
        _remove_stale_temps(out_dir)
        state = BuildState(out_dir)
        plan: list[tuple[ModelEntry, Target, str, Path, str]] = []
        for entry in p.models:
            for target in entry.targets:
                key = f"{entry.name}@{target.label}"
                package = out_dir / entry.output_name(target)
                plan.append((entry, target, key, package, state.input_hash(entry, target, p.path.parent)))
        todo = [item for item in plan if force or not state.up_to_date(item[2], item[4], item[3])]
        if todo:
            # Only now pay for importing the converter: it validates every option before any build starts,
            # so a bad option is exit 2 with nothing half-done.
            for entry, target, *_ in todo:
                _convert_options(entry, target)
        results = []
        for entry, target, key, package, input_hash in plan:
            if (entry, target, key, package, input_hash) not in todo:
                say(key, "up to date, skipped")
                rec = state.entries[key]
                page = html_report_path(package)
                results.append(EntryResult(entry.name, target.label, str(package), "skipped",
                                           report=str(out_dir / rec.report), html=str(page) if page.exists() else ""))
                continue
            res = _build(entry, target, key, package, input_hash, state, say)
            results.append(res)
            state.save()  # after every entry, so an interrupted run keeps what it finished
        state.save()
    finally:
        if fd is not None:
            os.close(fd)
    return PipelineReport(str(p.path), str(out_dir), results, time.perf_counter() - t_all)


def _remove_stale_temps(out_dir: Path) -> None:
    for entry in os.scandir(out_dir):
        if entry.name.startswith(".tmp-") or entry.name.startswith(".old-"):
            log.info("removing %s left by an interrupted build", entry.path)
            remove_path(Path(entry.path))


def _convert_options(entry: ModelEntry, target: Target) -> Any:
    from bitnet_coreml.convert import ConvertOptions  # heavy (onnx-ir)

    try:
        return ConvertOptions(precision=entry.precision, embed_bits=entry.embed_bits,
                              calibration=str(entry.calibration) if entry.calibration else None,
                              target=target.platform, chip=target.chip, min_os=target.convert_min_os,
                              check=entry.check == "strict", verify=False, seq_len=entry.seq_len,
                              allow_dequant=entry.allow_dequant, capabilities=tuple(map(str, entry.capabilities)),
                              chunks=entry.chunks,
                              **({"stateful": True, **entry.stateful} if entry.stateful else {}))
    except BitnetCoremlError as e:
        raise type(e)(f"model '{entry.name}' target {target.label}: {e.one_line()}") from e


def _report_path(package: Path) -> Path:
    return package.with_name(package.name.removesuffix(".mlpackage") + ".report.json")


def html_report_path(package: Path) -> Path:
    """Where a build writes the package's HTML report: ``<name>.report.html`` beside it."""
    return package.with_name(package.name.removesuffix(".mlpackage") + ".report.html")


def _html_report(entry: ModelEntry, target: Target, package: Path, key: str, say: EventFn) -> str:
    """Write the package's HTML report; a report that cannot be made is logged, never fails the build."""
    from bitnet_coreml.report import collect, write_html

    say(key, "report")
    page = html_report_path(package)
    try:
        inputs = str(entry.verify.inputs) if entry.verify.inputs else None
        write_html(collect(package, entry.source, inputs, seq_len=entry.seq_len, target=target), page)
    except BitnetCoremlError as e:
        say(key, f"report not written: {e.one_line()}")
        return ""
    return str(page)


def _build(entry: ModelEntry, target: Target, key: str, package: Path, input_hash: str, state: BuildState,
           say: EventFn) -> EntryResult:
    t0 = time.perf_counter()
    report_path = _report_path(package)
    tmp = package.with_name(f".tmp-{os.getpid()}-{package.name}")  # the converter wants a .mlpackage suffix
    res = EntryResult(entry.name, target.label, str(package), "built", report=str(report_path))
    report: dict[str, Any] = {"model": entry.name, "target": target.__dict__, "source": str(entry.source),
                              "package": str(package), "converter": converter_version(), "input_hash": input_hash}
    try:
        if entry.check == "warn":
            say(key, "check (policy: warn)")
            res.check = _check_only(entry, target)
        say(key, "convert" + (" (with check)" if entry.check == "strict" else ""))
        from bitnet_coreml.convert import convert

        converted = convert(entry.source, tmp, _convert_options(entry, target),
                            progress=lambda stage: say(key, f"convert: {stage}"))
        report["convert"] = converted.to_dict()
        if entry.check == "strict":
            res.check = _check_summary(converted.check, "strict")
        if entry.verify.enabled:
            say(key, "verify")
            res.parity = _verify(entry, tmp)
            if not res.parity.get("passed", False):
                raise ParityError(f"parity failed: {_parity_reason(res.parity)}")
        replace_tree(tmp, package)
        # the HTML report reads one package: a chunked model folder (chunks = ...) has none
        res.html = _html_report(entry, target, package, key, say) if entry.chunks is None else ""
        package_hash = sha256_tree(package, state.stat_cache)
        report["package_sha256"] = package_hash
        res.seconds = round(time.perf_counter() - t0, 3)
        _write_report(report_path, report, res)
        remove_path(_failed_report_path(package))
        state.entries[key] = BuildRecord(input_hash, package.name, package_hash, "ok", report_path.name,
                                         res.seconds, converter_version())
        say(key, f"built in {res.seconds:.1f} s")
    except BitnetCoremlError as e:
        status = "failed" if isinstance(e, (CheckFailedError, ParityError)) else "error"
        _failed(res, status, e.one_line(), e.exit_code if status == "error" else EXIT_CHECK_FAILED, t0,
                key, package, report, state)
        say(key, f"{res.status}: {res.reason}")
    except Exception as e:  # a converter bug in one model must not stop the others from building
        log.exception("model %s target %s: internal error (a bug; traceback follows)", entry.name, target.label)
        _failed(res, "error", f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"[:500], EXIT_RUNTIME,
                t0, key, package, report, state)
        say(key, f"error: {res.reason}")
    finally:
        remove_path(tmp)
    return res


def _failed_report_path(package: Path) -> Path:
    return package.with_name(package.name.removesuffix(".mlpackage") + ".failed.report.json")


def _failed(res: EntryResult, status: str, reason: str, exit_code: int, t0: float, key: str, package: Path,
            report: dict[str, Any], state: BuildState) -> None:
    """Record a failed build. A package from an earlier build that passed every gate stays installed,
    with its report and manifest record (they describe it truthfully, and its input hash no longer
    matches, so the next run rebuilds); this attempt's report goes beside it as ``*.failed.report.json``."""
    res.status, res.reason, res.exit_code = status, reason, exit_code
    res.seconds = round(time.perf_counter() - t0, 3)
    rec = state.entries.get(key)
    if rec is not None and package.exists() and sha256_tree(package, state.stat_cache) == rec.package_hash:
        res.reason += f" (the previous {package.name}, which passed, is kept)"
        res.report = str(_failed_report_path(package))
    else:
        remove_path(package)  # nothing vouches for it: it must not pass for this build
        remove_path(html_report_path(package))
        state.entries.pop(key, None)
    _write_report(Path(res.report), report, res)


def _write_report(path: Path, report: dict[str, Any], res: EntryResult) -> None:
    report.update({"status": res.status, "reason": res.reason, "seconds": res.seconds, "check": res.check,
                   "parity": res.parity})
    atomic_write_json(path, report)


def _check_only(entry: ModelEntry, target: Target) -> dict[str, Any]:
    """The check report without failing on violations (``check = "warn"``)."""
    from bitnet_coreml.check import run_check
    from bitnet_coreml.check.capabilities import load_capabilities
    from bitnet_coreml.frontend import load
    from bitnet_coreml.passes import run_default_passes

    stateful, seq_len = None, entry.seq_len
    if entry.stateful:
        from bitnet_coreml.check.stateful import StatefulSpec
        from bitnet_coreml.convert import ConvertOptions

        opts = ConvertOptions(stateful=True, **entry.stateful)
        stateful = StatefulSpec.from_checkpoint(entry.source, opts.context, opts.prefill, opts.exact_context,
                                                allow_dequant=entry.allow_dequant)
        seq_len = opts.prefill  # the stateless graph the check reads (as convert --stateful)
    model = load(entry.source, seq_len=seq_len, allow_dequant=entry.allow_dequant)
    run_default_passes(model)
    report = run_check(model, target,
                       db=load_capabilities(*map(str, entry.capabilities)) if entry.capabilities else None,
                       embed_bits=entry.embed_bits, precision=entry.precision, source=str(entry.source),
                       stateful=stateful)
    violations = list(report.violations)
    if violations:
        log.warning("model %s target %s: %d check violation(s), converting anyway (check = \"warn\")",
                    entry.name, target.label, len(violations))
    return _check_summary({"violations": violations, "warnings": report.warnings, "score": report.score,
                           "report": report.to_dict()}, "warn")


def _check_summary(check: dict[str, Any], policy: str) -> dict[str, Any]:
    """Counts for the table and JSON (the converter gives counts or lists); the full report is kept."""
    def count(v: Any) -> int:
        return len(v) if isinstance(v, (list, tuple)) else int(v or 0)

    return {"policy": policy, "available": check.get("available", True),
            "violations": count(check.get("violations")), "warnings": count(check.get("warnings")),
            "score": check.get("score"), "report": check.get("report")}


def _verify(entry: ModelEntry, package: Path) -> dict[str, Any]:
    import dataclasses

    from bitnet_coreml.verify import Thresholds, verify

    thresholds = dataclasses.replace(Thresholds.for_precision(entry.precision), **entry.verify.thresholds())
    steps = None
    if entry.stateful:  # prefill + teacher-forced decode steps (verify_stateful.py), as many as the context holds
        from bitnet_coreml.verify_stateful import DEFAULT_STEPS

        steps = max(1, min(DEFAULT_STEPS, entry.stateful["context"] - entry.stateful["prefill"]))
    report = verify(entry.source, package, str(entry.verify.inputs) if entry.verify.inputs else None,
                    thresholds, raise_on_failure=False, seq_len=entry.seq_len,
                    allow_dequant=entry.allow_dequant, steps=steps)
    d: dict[str, Any] = report.to_dict()
    d["passed"] = bool(report.passed)
    return d


def _parity_reason(parity: dict[str, Any]) -> str:
    bad = [f"{c.get('runner')} vs {c.get('reference')} on {c.get('output')!r}: {'; '.join(c.get('failures', []))}"
           for c in parity.get("comparisons", []) if not c.get("passed", True)]
    return " | ".join(bad)[:500] if bad else "no outputs compared"
