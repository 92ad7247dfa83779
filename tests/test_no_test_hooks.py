"""The shipped package carries no test hooks: no fault variables, no imports from ``tests``.

Fault injection lives in ``tests/support/faults.py`` and reaches the product only through its public
seams (a Predictor's units and monitor, a GenerationSession's engine opener, a unit's probe entry).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bitnet_coreml"
# the variables and names the old in-product fault injection used, and any other fault switch
FAULT_WORDS = re.compile(r"BITNET_COREML_(PROBE_)?FAULTS?\b|\bFaultPlan\b|\bPROBE_ENV_VAR\b|\bprobe_env\b")


def _sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50, files  # the walk found the package
    return files


def test_no_module_names_a_fault_variable() -> None:
    hits = [f"{p.relative_to(PACKAGE.parent)}:{i}: {line.strip()}"
            for p in _sources() for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if FAULT_WORDS.search(line)]
    assert hits == []


def test_no_module_imports_from_tests() -> None:
    hits = []
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            hits += [f"{p.relative_to(PACKAGE.parent)}: {n}" for n in names if n == "tests" or n.startswith("tests.")]
    assert hits == []


def test_the_checker_sees_a_planted_hook(tmp_path: Path) -> None:
    """The two checks above can fail: they flag the lines the old predictor had."""
    assert FAULT_WORDS.search('faults = FaultPlan.from_env()') and FAULT_WORDS.search('os.environ["BITNET_COREML_FAULTS"]')
    assert FAULT_WORDS.search("env.pop(PROBE_ENV_VAR, None)")
    tree = ast.parse("from tests.support.faults import FaultPlan\n")
    assert isinstance(tree.body[0], ast.ImportFrom) and tree.body[0].module == "tests.support.faults"
