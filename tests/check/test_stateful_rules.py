"""Check rules of stateful packages: OS features, state multiple of 32, fp16 states, context, KV-cache memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitnet_coreml.check import Target
from bitnet_coreml.check.report import run_check
from bitnet_coreml.check.stateful import StatefulSpec
from bitnet_coreml.frontend import load
from bitnet_coreml.package.stateful import kv_cache_bytes

CKPT = Path(__file__).resolve().parents[2] / "models" / "hf" / "bitnet-tiny-packed"  # 2 layers, 2 kv heads, d 16, 64 pos


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return load(CKPT, seq_len=16)


def _rules(report, severity: str) -> set[str]:  # type: ignore[no-untyped-def]
    items = {"error": report.violations, "warning": report.warnings, "info": report.fixed}[severity]
    return {f.rule for f in items}


def test_kv_cache_bytes_by_hand() -> None:
    # 2 (K, V) x 30 layers x 5 kv heads x 512 positions x 128 head_dim x 2 bytes
    assert kv_cache_bytes(30, 5, 512, 128) == 2 * 30 * 5 * 512 * 128 * 2 == 39_321_600
    assert kv_cache_bytes(30, 5, 512, 128, cache="fp16x2") == 2 * 39_321_600


def test_stateful_needs_ios18(model) -> None:  # type: ignore[no-untyped-def]
    spec = StatefulSpec.from_checkpoint(CKPT, 64, 16)
    r = run_check(model, Target("ios", None, "17"), stateful=spec)
    assert {"min_os_features"} <= _rules(r, "error")
    assert any("state_tensors needs iOS18" in f.message for f in r.violations)
    assert any("multifunction needs iOS18" in f.message for f in r.violations)
    ok = run_check(model, Target("ios", None, None), stateful=spec)  # lowest OS chosen: iOS18
    assert not ok.violations and ok.target.os.spec_version >= 9
    plain = run_check(model, Target("ios", None, "17"))
    assert "min_os_features" not in _rules(plain, "error")


def test_context_over_max_positions_is_a_violation(model) -> None:  # type: ignore[no-untyped-def]
    r = run_check(model, Target("ios", None, None), stateful=StatefulSpec.from_checkpoint(CKPT, 96, 16))
    assert "stateful_context" in _rules(r, "error")
    assert any("max_position_embeddings 64" in f.message for f in r.violations)


def test_context_not_multiple_of_32(model) -> None:  # type: ignore[no-untyped-def]
    rounded = run_check(model, Target("ios", None, None), stateful=StatefulSpec.from_checkpoint(CKPT, 40, 16))
    assert "state_dim_multiple_32" in _rules(rounded, "info") and not rounded.warnings
    assert any("rounds it up to 64" in f.message for f in rounded.fixed)
    kept = run_check(model, Target("ios", None, None), stateful=StatefulSpec.from_checkpoint(CKPT, 40, 16, True))
    assert "state_dim_multiple_32" in _rules(kept, "warning")


def test_fp32_states_are_fp16_pairs_and_memory_counts_the_cache(model) -> None:  # type: ignore[no-untyped-def]
    spec = StatefulSpec.from_checkpoint(CKPT, 64, 16)
    r = run_check(model, Target("ios", None, None), precision="fp32", stateful=spec)
    assert "state_fp16" in _rules(r, "info")
    assert spec.cache_bytes("fp32") == 2 * spec.cache_bytes("fp16") == 2 * 2 * 2 * 2 * 64 * 16 * 2
    assert any(f"{spec.cache_bytes('fp32'):,} bytes" in n for n in r.notes)


def test_kv_cache_counts_against_the_ane_budget(model) -> None:  # type: ignore[no-untyped-def]
    # a cache of 2*30*5*512*128*2 = 39.3 MB on a tiny model: over the A12's 32 MB budget only with the cache
    big = StatefulSpec(context=512, prefill=16, layers=30, kv_heads=5, head_dim=128, max_position_embeddings=4096)
    with_cache = run_check(model, Target("ios", "A12", None), stateful=big)
    assert any(f.rule == "ane_size_budget" and "weights + KV cache" in f.message for f in with_cache.warnings)
    assert "ane_size_budget" not in _rules(run_check(model, Target("ios", "A12", None)), "warning")
