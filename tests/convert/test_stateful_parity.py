"""Stateful packages of every bundled checkpoint against transformers' BitNetForCausalLM + DynamicCache.

The oracle is ``models/hf_stateful/<folder>.npz`` (``models/make_stateful_fixtures.py``, run once in the
export venv): a 16-token prefill, then 32 teacher-forced one-token steps on the same cache, and a
32-token greedy generation. fp32 packages must give the same argmax at every step and the same greedy
tokens, and cosine >= 0.99999 at every step except where the stateless fp32 package gives the same
logits (an activation-quantisation rounding flip, see the test); fp16 packages must keep cosine >= 0.999
at every step and give exactly the logits of the stateless fp16 package over the same tokens (the cache
adds no error of its own), except at rows where the one-token calls' other accumulation order rounds
differently: there no further from torch than the stateless row plus one fp16 step
(``tests/support/flips.py``; each test records how many positions it flagged). Over all bundled checkpoints together, the fp16 packages' top-1
outside fp16 ties (``verify.metrics(..., fp16_ties=True)``, the rule ``verify`` gates on) must hold at
>= 99% of the prefill + decode steps (issue 14; the checkpoints are briefly trained, so their top-2
gaps are real margins, not noise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitnet_coreml.executor import ReferenceExecutor
from bitnet_coreml.executor.stateful import StatefulRun
from bitnet_coreml.verify import metrics, verify
from tests.support.flips import equal_except_rounding
from tests.support.packages import PackageCache

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = sorted(p.name for p in (ROOT / "models" / "hf").iterdir() if (p / "config.json").is_file())
PREFILL, STEPS, CONTEXT = 16, 32, 64


def _oracle(folder: str) -> dict[str, np.ndarray]:
    with np.load(ROOT / "models" / "hf_stateful" / f"{folder}.npz") as z:
        return {k: z[k] for k in z.files}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _package(converted: PackageCache, folder: str, precision: str) -> Path:
    return converted.get(ROOT / "models" / "hf" / folder, stateful=True, context=CONTEXT, prefill=PREFILL,
                         precision=precision)


@pytest.mark.parametrize("folder", FOLDERS)
def test_fp32_matches_dynamic_cache_at_every_step(converted: PackageCache, folder: str, record_property: Any) -> None:
    z = _oracle(folder)
    ids = z["input_ids"]
    run = StatefulRun(_package(converted, folder, "fp32"))
    pre = run.call("prefill", ids[:, :PREFILL], 0)[0]
    dec = np.concatenate([run.call("decode", ids[:, t:t + 1], t)[0] for t in range(PREFILL, PREFILL + STEPS)])
    got = np.concatenate([pre, dec])
    ref = np.concatenate([z["prefill_logits"], z["decode_logits"]])
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    c = _cos(got, ref)
    assert c.min() >= 0.9999
    low = np.nonzero(c < 0.99999)[0]
    record_property("flagged_positions", int(low.size))
    if low.size:
        # An 8-bit activation quantisation flipped a rounding at these positions (a tiny fp32 difference
        # crosses a .5 boundary). The stateless fp32 package over the same tokens flips it identically:
        # the cache and the positions are not the cause.
        plain = _stateless(converted, folder, "fp32", ids)
        assert np.allclose(got[low], plain[low], rtol=0, atol=1e-5 * np.abs(plain).max())
    # greedy generation: feed back the package's own argmax
    run.reset()
    last = run.feed(ids[:, :PREFILL], function="prefill")[0, -1]
    tokens = []
    for _ in range(STEPS):
        tokens.append(int(last.argmax()))
        last = run.feed(np.array([[tokens[-1]]]))[0, -1]
    assert tokens == z["greedy_tokens"].tolist()


@pytest.mark.parametrize("folder", FOLDERS)
def test_fp16_close_at_every_step_and_equal_to_stateless_fp16(converted: PackageCache, folder: str,
                                                              record_property: Any) -> None:
    z = _oracle(folder)
    ids = z["input_ids"]
    got = StatefulRun(_package(converted, folder, "fp16")).feed(ids)[0]
    ref = np.concatenate([z["prefill_logits"], z["decode_logits"]])
    assert _cos(got, ref).min() >= 0.999
    flagged = equal_except_rounding(got, _stateless(converted, folder, "fp16", ids), ref,
                                    max_flagged=(PREFILL + STEPS) // 8)
    record_property("flagged_positions", flagged)


def test_fp16_top1_outside_ties_over_all_checkpoints(converted: PackageCache) -> None:
    hits, steps = 0.0, 0
    for folder in FOLDERS:
        z = _oracle(folder)
        got = StatefulRun(_package(converted, folder, "fp16")).feed(z["input_ids"])[0]
        ref = np.concatenate([z["prefill_logits"], z["decode_logits"]])
        top1 = metrics(ref, got, fp16_ties=True)["top1_resolvable"]
        assert top1 is not None
        hits += top1 * ref.shape[0]
        steps += ref.shape[0]
    assert steps == len(FOLDERS) * (PREFILL + STEPS)
    assert round(hits) / steps >= 0.99, f"{round(hits)}/{steps} steps"


def _stateless(converted: PackageCache, folder: str, precision: str, ids: np.ndarray) -> np.ndarray:
    """Logits of the stateless package of ``folder`` over all of ``ids`` at once."""
    plain = converted.get(ROOT / "models" / "hf" / folder, seq_len=ids.shape[1], precision=precision)
    return ReferenceExecutor(plain).predict({"input_ids": ids.astype(np.int32)})["logits"][0]


def test_verify_command_on_stateful_package(converted: PackageCache) -> None:
    folder = "bitnet-tiny-autobitlinear"
    npz = ROOT / "models" / "hf_stateful" / f"{folder}.npz"
    report = verify(ROOT / "models" / "hf" / folder, _package(converted, folder, "fp32"), npz, raise_on_failure=False)
    refs = {c.reference for c in report.comparisons}
    assert refs == {"onnxruntime (stateless source)", "npz (transformers DynamicCache)"}
    assert report.passed and all(c.cosine >= 0.99999 and c.top1 == 1.0 for c in report.comparisons)
