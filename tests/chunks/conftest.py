"""Bundled models converted once as one package and as chunked folders, shared by the chunk tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "models" / "hf" / "bitnet-tiny-packed"  # 2 decoder layers, tied embedding
LM = ROOT / "models" / "example-lm"  # 4 decoder layers, tokenizer
ONNX = ROOT / "models" / "bitnet_offline.onnx"  # an ONNX export, 2 layers, untied lm_head


def run_cli(*args: object) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def convert(src: Path, out: Path, *extra: object) -> Path:
    code, _, err = run_cli("convert", src, "-o", out, "--seq-len", 16, "--json", *extra)
    assert code == 0, err
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoint: one package, and folders of 2, 3 and auto pieces."""
    d = tmp_path_factory.mktemp("chunks_tiny")
    out = {"full": convert(TINY, d / "full.mlpackage")}
    for n in ("2", "3", "auto"):
        out[n] = convert(TINY, d / f"tiny{n}", "--chunks", n)
    return out
