"""GenerationSession: feeding (chunked prefill, decode) against transformers' logits, fallback, refusals.

Oracles: transformers' logits of the bundled tiny checkpoint (``models/hf/bitnet-tiny-packed/logits.npz``,
torch fp32, every position of a 16-token input; where an 8-bit activation rounding flips against torch,
ONNX Runtime on the checkpoint's source graph at those positions: ``tests/support/flips.py``) and, for
recovery, the same session's tokens without any fault (the requirement is that a fault changes nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitnet_coreml.errors import ExhaustedError, InputError
from bitnet_coreml.generation import GenerationSession, SamplingConfig
from bitnet_coreml.runtime.units import ReferenceUnit
from tests.generation.conftest import TINY, TINY_CONTEXT
from tests.support.faults import Fault, FaultPlan, make_session
from tests.support.flips import close_except_flips

ORACLE = np.load(TINY / "logits.npz")
IDS = [int(i) for i in ORACLE["input_ids"][0]]  # 16 ids
LOGITS = ORACLE["logits"][0]  # [16, 512], torch fp32


def _chain(*names: str) -> list[ReferenceUnit]:
    return [ReferenceUnit(n) for n in names]


@pytest.mark.parametrize("split", [16, 13, 8, 3])
def test_prefill_then_decode_reproduce_transformers(tiny_packages: dict[str, Path], tiny_ort_logits: np.ndarray,
                                                    split: int, record_property: Any) -> None:
    """Chunked prefill (P=8: full chunks, a padded partial one) then decode, every position vs torch."""
    s = GenerationSession(tiny_packages["fp32"], units=["reference"])
    got = [s.prefill(IDS[:split])]
    got += [s.feed(t) for t in IDS[split:]]
    pos = np.arange(split - 1, len(IDS))
    flagged = close_except_flips(np.stack(got), LOGITS[pos], 2e-4, lambda rows: tiny_ort_logits[pos[rows]],
                                 max_flagged=len(IDS) // 4)
    record_property("flagged_positions", flagged)
    assert s.tokens == IDS


def test_prefill_logits_last_feeds_the_partial_chunk_through_decode(tiny_packages: dict[str, Path],
                                                                     tiny_ort_logits: np.ndarray) -> None:
    s = GenerationSession(tiny_packages["last"], units=["reference"])
    row = s.prefill(IDS[:13])  # one full chunk of 8, then 5 decode calls
    close_except_flips(row[None], LOGITS[12:13], 2e-4, lambda _rows: tiny_ort_logits[12:13], max_flagged=1)


def _greedy(pkg: Path, faults: FaultPlan | None = None, **kw: object) -> tuple[list[int], GenerationSession]:
    s = make_session(faults, pkg, **kw)
    return list(s.generate(IDS[:5], max_new_tokens=20)), s


@pytest.mark.parametrize("fault", [
    Fault("ref-a", "raise", error="DeviceInitError", count=1),  # at prefill (the first call)
    Fault("ref-a", "raise", error="ModelError", count=1, after=7),  # at decode step 7
    Fault("ref-a", "nan", count=1, after=12),  # non-finite logits at step 12
])
def test_a_unit_failing_mid_generation_changes_no_token(tiny_packages: dict[str, Path], fault: Fault) -> None:
    want, _ = _greedy(tiny_packages["fp16"], units=["reference"])
    faults = FaultPlan([fault])
    got, s = _greedy(tiny_packages["fp16"], units=_chain("ref-a", "ref-b"), faults=faults)
    assert got == want
    assert faults.fired("ref-a") == 1 and s.unit == "ref-b"
    failed = [r for r in s.stats.recoveries if "from" in r]
    assert [r["from"] for r in failed] == ["ref-a"]
    assert failed[0]["at_token"] == (0 if fault.after == 0 else 5 + fault.after - 1)
    stats = s.get_recovery_stats().to_dict()
    assert stats["units"]["ref-a"]["fallbacks"] == 1


def test_repeated_failures_and_transient_errors(tiny_packages: dict[str, Path]) -> None:
    want, _ = _greedy(tiny_packages["fp16"], units=["reference"])
    faults = FaultPlan([
        Fault("ref-a", "raise", error="OperationError", count=2, after=3),  # transient: retried on ref-a
        Fault("ref-a", "raise", error="DeviceInitError", count=1, after=9),  # ref-a gone at step ~6
        Fault("ref-b", "raise", error="DeviceInitError", count=1, after=4),  # ref-b fails during its replay
        Fault("ref-c", "raise", error="ModelError", count=1, after=15),  # ref-c fails later on
    ])
    got, s = _greedy(tiny_packages["fp16"], units=_chain("ref-a", "ref-b", "ref-c", "ref-d"), faults=faults,
                     strategy=None)
    assert got == want
    assert s.unit == "ref-d"
    assert [r["from"] for r in s.stats.recoveries if "from" in r] == ["ref-a", "ref-c"]
    stats = s.get_recovery_stats().to_dict()["units"]
    assert stats["ref-a"]["retries"] == 2
    assert stats["ref-b"]["fallbacks"] == 1


def test_every_unit_failing_is_exhausted(tiny_packages: dict[str, Path]) -> None:
    faults = FaultPlan([Fault("ref-a", "raise", error="DeviceInitError")])
    s = make_session(faults, tiny_packages["fp16"], units=_chain("ref-a"))
    with pytest.raises(ExhaustedError, match="no compute unit"):
        list(s.generate(IDS[:4], max_new_tokens=3))


def test_seeded_sampling_is_reproducible_across_runs_and_units(tiny_packages: dict[str, Path]) -> None:
    cfg = SamplingConfig(temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=1234)
    runs = []
    for units in (["reference"], ["reference"], ["ane", "gpu", "cpu", "reference"], _chain("other")):
        s = GenerationSession(tiny_packages["fp16"], units=units)  # type: ignore[arg-type]
        runs.append(list(s.generate(IDS[:5], max_new_tokens=24, sampling=cfg)))
    assert all(r == runs[0] for r in runs)
    other = GenerationSession(tiny_packages["fp16"], units=["reference"])
    diff = list(other.generate(IDS[:5], max_new_tokens=24, sampling=SamplingConfig(temperature=1.5, seed=99)))
    assert diff != runs[0]  # 24 draws from a near-flat distribution: another seed differs


def test_refusals(tiny_packages: dict[str, Path]) -> None:
    s = GenerationSession(tiny_packages["fp16"], units=["reference"])
    with pytest.raises(InputError, match="exceed the package's context of 64"):
        list(s.generate(IDS, max_new_tokens=TINY_CONTEXT - len(IDS) + 1))
    assert list(s.generate(IDS, max_new_tokens=TINY_CONTEXT - len(IDS)))  # exactly fits
    with pytest.raises(InputError, match=r"unknown token id\(s\) \[512\]"):
        list(s.generate([1, 512], max_new_tokens=2))
    with pytest.raises(InputError, match="empty"):
        list(s.generate([], max_new_tokens=2))
    with pytest.raises(InputError, match="no tokenizer"):
        list(s.generate("hello", max_new_tokens=2))
    with pytest.raises(InputError, match=r"not a stateful package.*convert .*--stateful"):
        GenerationSession(tiny_packages["stateless"])
