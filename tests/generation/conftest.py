"""Stateful packages of the bundled checkpoints, converted once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitnet_coreml.convert import ConvertOptions, convert

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "models" / "hf" / "bitnet-tiny-packed"  # transformers' logits in logits.npz; no tokenizer
TINY_CONTEXT, TINY_PREFILL = 64, 8


@pytest.fixture(scope="session")
def tiny_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gen_tiny")
    out = {}
    for prec in ("fp32", "fp16"):
        out[prec] = d / f"tiny_{prec}.mlpackage"
        convert(TINY, out[prec], ConvertOptions(stateful=True, context=TINY_CONTEXT, prefill=TINY_PREFILL,
                                                precision=prec, check=False))
    out["last"] = d / "tiny_last.mlpackage"  # prefill returns only the last position's logits
    convert(TINY, out["last"], ConvertOptions(stateful=True, context=TINY_CONTEXT, prefill=TINY_PREFILL,
                                              precision="fp32", prefill_logits="last", check=False))
    out["stateless"] = d / "tiny_plain.mlpackage"
    convert(TINY, out["stateless"], ConvertOptions(seq_len=TINY_PREFILL, check=False))
    return out
