"""ONNX's node cases taken as they come: each case model converted as shipped, graph inputs left as inputs.

The constant-slot harness (:mod:`tests.lower.conformance_onnx`) binds the inputs Core ML needs fixed
to constants, as an exporter would. This one does nothing of the kind: every case model of a claimed
op (``onnx.backend.test.case.node.collect_testcases()``, the ``*_expanded`` function bodies too) is
saved as is and given to the product's own ``convert`` (fp32, no pre-conversion check), then the
package runs in :class:`bitnet_coreml.executor.ReferenceExecutor` with the case's inputs as the user
would pass them (a scalar stays a 0-d array; int64 / bool data as the declared int32, which the
package description says), and the outputs are compared with ONNX's expected ones in numpy.

Each case ends in one status:

* ``pass``: every output matches (exact for ints/bools, the case's rtol/atol for floats);
* ``mismatch``: an output differs;
* ``type-change``: an input or output has another dtype in the package than in the source graph and
  the package's description does not say so (a silent type change);
* ``refused``: ``convert`` raised the project's input error (exit 2): a one-line message that must
  name the node or graph input and the reason (:func:`names_what_and_why`);
* ``crash``: anything else escaped ``convert`` or the executor (a coremltools/numpy exception, an
  internal error).

``make conformance`` requires 0 crashes, 0 type changes, every refusal naming what and why, and a
pass rate >= 95% of the cases not refused; ``make test`` runs a sample (tests/lower/test_shipped_cases.py).
``python -m tests.lower.conformance_shipped [--md] [--failures]`` prints the table (docs/conformance-onnx.md).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml.errors import InputError
from tests.lower.conformance_onnx import _to_np, claimed_cases, compare

STATUSES = ("pass", "mismatch", "type-change", "refused", "crash")
# A refusal names a node, a graph input or the model's opset, and says why (after a colon).
_NAMES = re.compile(r"node '[^']+'|graph input '[^']+'|opset \d+ is")
_DECLARED = "in the source graph"  # how the package description declares a changed input/output type


@dataclass
class ShippedResult:
    name: str
    op: str
    status: str
    reason: str = ""
    composite: bool = False


def names_what_and_why(message: str) -> bool:
    """True when a refusal message names the node / graph input / opset at fault and gives a reason."""
    return bool(_NAMES.search(message)) and ":" in message and len(message.splitlines()) == 1


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _descriptions(package: Path) -> dict[str, str]:
    from bitnet_coreml._quiet import coremltools

    spec = coremltools().models.MLModel(str(package), skip_model_load=True).get_spec()
    return {f.name: f.shortDescription for f in [*spec.description.input, *spec.description.output]}


def run_shipped(op: str, case: Any, workdir: Path) -> ShippedResult:
    """Convert one case model as shipped and run it; see the module docstring for the statuses."""
    import onnx

    from bitnet_coreml.convert import ConvertOptions, convert
    from bitnet_coreml.executor import ReferenceExecutor

    name = case.name
    comp = len(case.model.graph.node) > 1
    src, out = workdir / f"{name}.onnx", workdir / f"{name}.mlpackage"
    onnx.save(case.model, src)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                np.errstate(all="ignore"):
            res = convert(src, out, ConvertOptions(precision="fp32", check=False))
    except InputError as e:
        return ShippedResult(name, op, "refused", e.one_line().replace(str(src), src.name), comp)
    except Exception as e:  # noqa: BLE001 - the harness records what escaped, it does not stop at one case
        return ShippedResult(name, op, "crash", _one_line(e), comp)
    try:
        ex = ReferenceExecutor(str(out))
        specs, desc = ex.input_specs, _descriptions(out)
        graph_inputs = [i.name for i in case.model.graph.input]
        for inputs, expected in case.data_sets:
            feed = {}
            for onnx_name, data in zip(graph_inputs, inputs, strict=False):
                if onnx_name not in res.inputs:
                    continue
                a = _to_np(data)
                mil = res.inputs[onnx_name]
                want = specs[mil].dtype
                if a.dtype != want and _DECLARED not in desc.get(mil, "") and not (a.dtype == np.int64
                                                                                    and want == np.int32):
                    return ShippedResult(name, op, "type-change", f"input {onnx_name!r}: {a.dtype} in the source "
                                         f"graph, {want} in the package, not declared", comp)
                feed[mil] = a.astype(want)
            with np.errstate(all="ignore"):
                got = ex.predict(feed)
            for o, exp in zip(case.model.graph.output, expected, strict=True):
                mil = res.outputs[o.name]
                g, e = np.asarray(got[mil]), _to_np(exp)
                if g.dtype != e.dtype and _DECLARED not in desc.get(mil, ""):
                    return ShippedResult(name, op, "type-change", f"output {o.name!r}: {e.dtype} in the source "
                                         f"graph, {g.dtype} in the package, not declared", comp)
                reason = compare(e, g, case.rtol, case.atol)
                if reason:
                    return ShippedResult(name, op, "mismatch", f"output {o.name!r}: {reason}", comp)
    except Exception as e:  # noqa: BLE001
        return ShippedResult(name, op, "crash", "predict: " + _one_line(e), comp)
    return ShippedResult(name, op, "pass", "", comp)


def run_all(ops: Sequence[str] | None = None, names: Sequence[str] | None = None) -> list[ShippedResult]:
    """Every claimed case (single-node and ``*_expanded``), or only ``names``."""
    out = []
    with tempfile.TemporaryDirectory(prefix="shipped-") as tmp:
        for op, case in claimed_cases(ops, composite=True):
            if names is not None and case.name not in names:
                continue
            out.append(run_shipped(op, case, Path(tmp)))
    return out


def summary(results: Sequence[ShippedResult]) -> dict[str, Any]:
    """Counts per status, the pass rate of the cases not refused, and the refusals that name nothing."""
    c = Counter(r.status for r in results)
    ran = len(results) - c["refused"]
    return {"cases": len(results), **{s: c[s] for s in STATUSES},
            "pass_rate": c["pass"] / ran if ran else 1.0,
            "unnamed_refusals": [r.name for r in results if r.status == "refused" and not names_what_and_why(r.reason)]}


def to_markdown(results: Sequence[ShippedResult]) -> str:
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for r in results:
        table[r.op][r.status] += 1
    lines = ["| op | cases | pass | mismatch | type change | refused | crash |", "|---|---:|---:|---:|---:|---:|---:|"]
    for op, c in sorted(table.items()):
        lines.append(f"| {op} | {sum(c.values())} | " + " | ".join(str(c[s]) for s in STATUSES) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", action="append", help="only these ops (repeatable)")
    p.add_argument("--md", action="store_true", help="print the per-op markdown table")
    p.add_argument("--failures", action="store_true", help="list every case that does not pass, with its reason")
    args = p.parse_args(argv)
    results = run_all(args.op)
    if args.md:
        sys.stdout.write(to_markdown(results) + "\n")
    if args.failures:
        for r in results:
            if r.status != "pass":
                sys.stdout.write(f"{r.status:11s} {r.op:18s} {r.name}: {r.reason}\n")
    s = summary(results)
    sys.stdout.write(" ".join(f"{k}={s[k]}" for k in ("cases", *STATUSES)) + f" pass_rate={s['pass_rate']:.4f} "
                     f"unnamed_refusals={len(s['unnamed_refusals'])}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
