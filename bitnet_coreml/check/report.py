"""``run_check``: the pre-conversion report (violations, warnings, units, size, score, fallback plan).

The compatibility score of a model on a target (documented in ``docs/check.md``)::

    score = 0                                   if there is any violation (error)
    score = ane_score * f_ane                   otherwise
    ane_score = ANECapabilities.compatibility_score(0, data_types, size_mb)
              = s_types * s_size                (s_ops = 1: the check sets no throughput requirement)
    f_ane     = (ops expected on the ANE) / (all ops)

``data_types`` is ``{fp16}`` (``{fp32}`` at precision fp32) plus ``int8`` when the graph has int8 x
int8 ops; ``size_mb`` is the estimated weight.bin size. Without a chip there is no generation to
compare with, so ``ane_score`` is 1 and the score is ``f_ane`` (the report says so in ``score_basis``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bitnet_coreml.check.capabilities import MIB, CapabilityDatabase, default_database
from bitnet_coreml.check.rules import (
    Finding,
    OpUnit,
    RuleContext,
    SplitInfo,
    evaluate_rules,
    expected_unit,
    fp16_overflow_constants,
    fp32_consumers,
    needed_features,
    nodes_needing_split,
)
from bitnet_coreml.check.size import SizeEstimate, estimate_weight_bytes
from bitnet_coreml.check.target import ResolvedTarget, Target, resolve
from bitnet_coreml.errors import CheckFailedError
from bitnet_coreml.vocab import ONNX_DOMAINS

if TYPE_CHECKING:
    import onnx_ir as ir

log = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1
_INT8_OPS = ("MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv")


@dataclass
class CheckReport:
    """The result of :func:`run_check`; ``to_dict`` is the stable JSON (docs/schemas/check-report.schema.json)."""

    model: str
    target: ResolvedTarget
    violations: list[Finding]
    warnings: list[Finding]
    fixed: list[Finding]
    units: list[OpUnit]
    size: SizeEstimate
    splits: list[SplitInfo]
    score: float
    score_components: dict[str, float | None]
    score_basis: str
    fallback_plan: list[dict[str, str]]
    capability_files: tuple[str, ...]
    strict: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the model fits: no violation (and, with ``strict``, no warning)."""
        return not self.violations and not (self.strict and self.warnings)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    @property
    def unit_counts(self) -> dict[str, int]:
        c = Counter(u.unit for u in self.units)
        return {k: c.get(k, 0) for k in ("ANE", "GPU", "CPU")}

    def raise_if_failed(self) -> None:
        """Raise :class:`CheckFailedError` (exit 1) listing every violation (and warning when strict)."""
        if self.ok:
            return
        bad = self.violations + (self.warnings if self.strict else [])
        raise CheckFailedError(f"{self.model}: the check for {self.target.label} failed with {len(bad)} problem(s): "
                               + "; ".join(f"[{f.rule}] {f.message}" for f in bad))

    def to_dict(self) -> dict[str, Any]:
        limit = self.target.package_limit_bytes
        ane = self.target.ane
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "model": self.model,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "strict": self.strict,
            "target": self.target.to_dict(),
            "violations": [f.to_dict() for f in self.violations],
            "warnings": [f.to_dict() for f in self.warnings],
            "fixed": [f.to_dict() for f in self.fixed],
            "units": [u.to_dict() for u in self.units],
            "unit_counts": self.unit_counts,
            "splits": [s.to_dict() for s in self.splits],
            "size": {
                **self.size.to_dict(with_tensors=True),
                "package_limit_bytes": limit,
                "fits_package_limit": self.size.total_bytes <= limit,
                "ane_budget_bytes": int(ane.model_size_budget_mb * MIB) if ane and ane.model_size_budget_mb else None,
            },
            "score": round(self.score, 6),
            "score_components": {k: (round(v, 6) if v is not None else None) for k, v in self.score_components.items()},
            "score_basis": self.score_basis,
            "fallback_plan": self.fallback_plan,
            "capability_files": list(self.capability_files),
            "notes": list(self.notes),
            "seconds": round(self.seconds, 4),
        }


def _data_types(model: ir.Model, precision: str) -> list[str]:
    types = ["fp32" if precision == "fp32" else "fp16"]
    if any(n.domain in ONNX_DOMAINS and n.op_type in _INT8_OPS for n in model.graph):
        types.append("int8")
    return types


def _fallback_plan(target: ResolvedTarget, counts: dict[str, int], precision: str) -> list[dict[str, str]]:
    total = sum(counts.values())
    plan: list[dict[str, str]] = []
    has_ane = target.chip is None or target.chip.ane_generation is not None
    if has_ane and precision == "fp16" and counts["ANE"]:
        plan.append({"compute_units": "CPU_AND_NE",
                     "reason": f"{counts['ANE']} of {total} ops expected on the ANE, {counts['CPU']} on CPU, "
                               f"{counts['GPU']} on GPU; probe in a subprocess first (ANE compile failures can kill the "
                               "process: coremltools #2758) and compare with CPU_ONLY"})
    plan.append({"compute_units": "CPU_AND_GPU",
                 "reason": "when the ANE is unavailable, fails to load or gives wrong outputs" if plan
                 else "no op is expected on the ANE for this target/precision"})
    plan.append({"compute_units": "CPU_ONLY", "reason": "when the GPU fails or memory is short"})
    plan.append({"compute_units": "REFERENCE", "reason": "numpy reference executor: any OS, always available"})
    return plan


def run_check(model: ir.Model, target: Target, *, db: CapabilityDatabase | None = None, embed_bits: int | None = None,
              precision: str = "fp16", strict: bool = False, source: str = "", stateful: Any = None) -> CheckReport:
    """Check ``model`` (after ``run_default_passes``) against ``target``; never raises on a failed check.

    Bad input (unknown chip, bad OS version, bad precision) raises :class:`InputError`.
    """
    t0 = time.perf_counter()
    db = db or default_database()
    from bitnet_coreml.check import stateful as _stateful_rules  # noqa: F401 - registers its rules

    needed = max(db.feature(f).min_spec_version
                 for f, _ in needed_features(model, embed_bits, stateful=stateful is not None))
    resolved = resolve(target, db, needed_spec=needed)
    size = estimate_weight_bytes(model, embed_bits=embed_bits, precision=precision,
                                 split_limit=int(db.limit("max_dimension")["value"]))
    splits = nodes_needing_split(model, db=db)
    overflow = (fp16_overflow_constants(model, float(db.limit("fp16_range")["max"])) if precision == "fp16" else [])
    ctx = RuleContext(model, db, resolved, size, precision, embed_bits, splits, overflow, stateful)
    findings = evaluate_rules(ctx)
    split_nodes = frozenset(s.node for s in splits)
    ane_flag = None if resolved.chip is None else resolved.chip.ane_generation is not None
    fp32 = fp32_consumers(overflow)
    units = [expected_unit(n, db, precision=precision, split_nodes=split_nodes, ane=ane_flag is not False,
                           fp32_nodes=fp32) for n in model.graph]
    violations = [f for f in findings if f.severity == "error"]
    warnings = [f for f in findings if f.severity == "warning"]
    fixed = [f for f in findings if f.severity == "info"]
    counts = Counter(u.unit for u in units)
    f_ane = counts["ANE"] / len(units) if units else 1.0
    size_mb = size.total_bytes / MIB
    types = _data_types(model, precision)
    if resolved.ane is not None:
        comps: dict[str, float | None] = dict(resolved.ane.score_components(0, types, size_mb))
        ane_score = resolved.ane.compatibility_score(0, types, size_mb)
        basis = f"{resolved.ane.label}: s_types * s_size * f_ane (per-generation budget)"
    else:
        comps = {"ops": None, "data_types": None, "size": None}
        ane_score = 1.0
        basis = "no chip given: f_ane only (no ANE generation to compare data types and size budget with)"
    comps["f_ane"] = f_ane
    score = 0.0 if violations else ane_score * f_ane
    if violations:
        basis = "0: the target has violations; " + basis
    notes = []
    if resolved.chip is None:
        notes.append("no --chip: per-generation budget, TOPS and int8 compute not evaluated")
    if stateful is not None:
        st = stateful.to_dict(precision)
        notes.append(f"stateful: KV cache {st['states']} fp16 state(s) of {st['state_shape']}, "
                     f"{st['kv_cache_bytes']:,} bytes, counted with the weights in the memory rules")
    if embed_bits is not None and embed_bits < 8:
        notes.append(f"--embed-bits {embed_bits} costs accuracy (a {2 ** embed_bits}-entry table per embedding / "
                     "lm_head; on the bundled bigvocab model 4 bits drop top-1 agreement to 0.5-0.875); measure it: "
                     f"bitnet-coreml convert MODEL -o OUT.mlpackage --embed-bits {embed_bits} --verify --input TEST.npz")
    report = CheckReport(
        model=source, target=resolved, violations=violations, warnings=warnings, fixed=fixed, units=units,
        size=size, splits=splits, score=score, score_components=comps, score_basis=basis,
        fallback_plan=_fallback_plan(resolved, {k: counts.get(k, 0) for k in ("ANE", "GPU", "CPU")}, precision),
        capability_files=db.files, strict=strict, notes=notes)
    report.seconds = time.perf_counter() - t0
    log.debug("check %s for %s: %d violations, %d warnings in %.3fs", source, resolved.label, len(violations),
              len(warnings), report.seconds)
    return report
