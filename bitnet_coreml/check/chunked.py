"""The check of a model written as chunks (``check --chunks``) and the chunk count ``check`` suggests.

Each piece of the plan (``bitnet_coreml.chunking``: the same plan ``convert --chunks`` cuts) is checked on its own
with every rule (its estimated weights against the per-file limit, its ops' units, its score); the whole model
keeps every other finding (a per-file size violation of the whole is what chunking answers) and its memory is
the sum of the pieces'. A model whose one file would be over the limit gets ``suggested_chunks``: the count
``--chunks auto`` would choose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bitnet_coreml.errors import CheckFailedError

if TYPE_CHECKING:
    import onnx_ir as ir

    from bitnet_coreml.check.report import CheckReport

PER_FILE_RULE = "package_size"


def plan_for(model: ir.Model, requested: int | str, report: CheckReport, *, embed_bits: int | None,
             precision: str, what: str) -> Any:
    """The chunk plan of ``model`` for the target ``report`` was made for."""
    from bitnet_coreml.chunked_convert import plan_for_model

    return plan_for_model(model, requested, embed_bits=embed_bits, precision=precision,
                          limit=int(report.target.package_limit_bytes), what=what)


def suggestion(model: ir.Model, report: CheckReport, *, embed_bits: int | None, precision: str) -> dict[str, Any] | None:
    """For a model over the per-file limit: the plan ``--chunks auto`` would choose (or why none fits)."""
    if not any(v.rule == PER_FILE_RULE for v in report.violations):
        return None
    from bitnet_coreml.errors import InputError

    try:
        plan = plan_for(model, "auto", report, embed_bits=embed_bits, precision=precision, what=report.model)
    except (CheckFailedError, InputError) as e:
        return {"count": None, "reason": str(e)}
    return plan.to_dict()


@dataclass
class ChunkedCheck:
    """The whole model's report, the plan, and one report per piece."""

    whole: CheckReport
    plan: Any
    pieces: list[CheckReport] = field(default_factory=list)

    @property
    def whole_violations(self) -> list[Any]:
        return [v for v in self.whole.violations if v.rule != PER_FILE_RULE]

    @property
    def ok(self) -> bool:
        strict = self.whole.strict
        return (not self.whole_violations and not (strict and self.whole.warnings)
                and all(p.ok for p in self.pieces))

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        d = self.whole.to_dict()
        d["ok"], d["exit_code"] = self.ok, self.exit_code
        d["violations"] = [v.to_dict() for v in self.whole_violations]
        memory = sum(p.size.total_bytes for p in self.pieces)
        d["chunks"] = {**self.plan.to_dict(), "memory_bytes": memory,
                       "reports": [{"piece": k, "holds": self.plan.describe(k), **p.to_dict()}
                                   for k, p in enumerate(self.pieces)]}
        return d


def check_chunks(model: ir.Model, whole: CheckReport, requested: int | str, run_piece: Any, *,
                 embed_bits: int | None, precision: str) -> ChunkedCheck:
    """Cut ``model`` as ``convert --chunks requested`` would and check each piece with ``run_piece(piece, k)``."""
    import onnx_ir as ir

    from bitnet_coreml.chunking import cut_model, graph_units

    plan = plan_for(model, requested, whole, embed_bits=embed_bits, precision=precision, what=whole.model)
    units = graph_units(model.graph, whole.model)
    boundary = ir.DataType.FLOAT16 if precision == "fp16" else ir.DataType.FLOAT
    pieces = cut_model(model, units, plan.ranges, boundary=boundary, what=whole.model)
    return ChunkedCheck(whole, plan, [run_piece(p, k) for k, p in enumerate(pieces)])
