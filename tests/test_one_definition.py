"""Shared words are defined once in the product, and limits live in the capability database, not in code."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "bitnet_coreml"
SOURCES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("definition, home", [
    (r"class Target\b", "vocab.py"),
    (r"class InputSpec\b", "vocab.py"),
    (r"class PlatformInfo\b", "check/platform.py"),
    (r"class OpUnit\b", "opsupport.py"),
    (r"def expected_unit\b", "opsupport.py"),
    (r"def package_spec_version\b", "package/reader.py"),
    (r"def split_of\b", "check/split.py"),
    (r"EMBED_BITS =", "vocab.py"),
])
def test_defined_once(definition: str, home: str) -> None:
    pattern = re.compile(rf"^\s*{definition}", re.M)
    where = [p.relative_to(PKG).as_posix() for p in SOURCES if pattern.search(p.read_text())]
    assert where == [home]


def _number(text: str) -> float | complex:
    return ast.literal_eval(text)  # type: ignore[no-any-return]


@pytest.mark.parametrize("value", [16384, 65504, 65536])
def test_capability_limits_are_not_literals_in_code(value: int) -> None:
    # the ANE dimension limit, fp16's max and the channel limit: data/capabilities.toml, read through opsupport
    found = []
    for p in SOURCES:
        for tok in tokenize.generate_tokens(io.StringIO(p.read_text()).readline):
            if tok.type == tokenize.NUMBER and _number(tok.string) == value:
                found.append(f"{p.relative_to(PKG)}:{tok.start[0]}")
    assert found == []


@pytest.mark.parametrize("literal", ['"ai.onnx")', 'DOMAIN = "bitnet_coreml"'])
def test_domains_are_vocabulary(literal: str) -> None:
    # the default ONNX domain's spellings and the fused ops' domain: vocab.ONNX_DOMAINS / vocab.DOMAIN
    where = [p.relative_to(PKG).as_posix() for p in SOURCES if literal in p.read_text()]
    assert where == ["vocab.py"]
