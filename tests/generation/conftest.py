"""Stateful packages of the bundled checkpoints (from the session's cache of converted packages)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.packages import PackageCache

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "models" / "hf" / "bitnet-tiny-packed"  # transformers' logits in logits.npz; no tokenizer
TINY_CONTEXT, TINY_PREFILL = 64, 8
LM = ROOT / "models" / "example-lm"  # the bundled example LM (a real BPE tokenizer)


@pytest.fixture(scope="session")
def tiny_packages(converted: PackageCache) -> dict[str, Path]:
    out = {prec: converted.get(TINY, stateful=True, context=TINY_CONTEXT, prefill=TINY_PREFILL, precision=prec,
                               check=False) for prec in ("fp32", "fp16")}
    # prefill returns only the last position's logits
    out["last"] = converted.get(TINY, stateful=True, context=TINY_CONTEXT, prefill=TINY_PREFILL, precision="fp32",
                                prefill_logits="last", check=False)
    out["stateless"] = converted.get(TINY, seq_len=TINY_PREFILL, check=False)
    return out


@pytest.fixture(scope="module")
def lm_fp16(converted: PackageCache) -> Path:
    """The example LM's stateful fp16 package (context 128, prefill 16)."""
    if not (LM / "config.json").is_file():
        pytest.skip("bundled example LM missing (make models)")
    return converted.get(LM, stateful=True, context=128, prefill=16, precision="fp16", check=False)


@pytest.fixture(scope="session")
def tiny_ort_logits() -> np.ndarray:
    """ONNX Runtime on the tiny checkpoint's fp32 source graph over ``logits.npz``'s 16 ids: [16, V].

    The second oracle (``tests/support/flips.py``) where a package's logits differ from torch's by an
    activation-rounding flip: the same float32 arithmetic in another runtime, without a cache or a kernel.
    """
    from bitnet_coreml.frontend import load
    from bitnet_coreml.lower.fp16 import run_ort

    ids = np.load(TINY / "logits.npz")["input_ids"]
    out = run_ort(load(TINY, seq_len=ids.shape[1]), {"input_ids": ids})
    return np.asarray(out["logits"], np.float32)[0]
