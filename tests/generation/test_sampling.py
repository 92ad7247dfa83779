"""Sampling: each filter against hand-computed values, and the seeded draw."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_coreml.errors import InputError
from bitnet_coreml.generation import Sampler, SamplingConfig

LOGITS = np.array([2.0, 1.0, 0.5, -1.0, 3.0], dtype=np.float32)


def test_greedy_takes_the_first_maximum() -> None:
    assert Sampler(SamplingConfig()).pick(LOGITS, []) == 4
    assert Sampler(SamplingConfig()).pick(np.array([1.0, 3.0, 3.0]), []) == 1


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    s = Sampler(SamplingConfig(repetition_penalty=2.0)).scores(LOGITS, [4, 3, 4])
    np.testing.assert_array_equal(s, [2.0, 1.0, 0.5, -2.0, 1.5])
    assert Sampler(SamplingConfig(repetition_penalty=2.0)).pick(LOGITS, [4]) == 0


def test_temperature_top_k_top_p() -> None:
    s = Sampler(SamplingConfig(temperature=0.5, top_k=3)).scores(LOGITS, [])
    np.testing.assert_array_equal(s, [4.0, 2.0, -np.inf, -np.inf, 6.0])
    # softmax of [2, 1, 0.5, -1, 3]: 0.2436, 0.0896, 0.0544, 0.0121, 0.6623 -> top_p 0.8 keeps {4, 0}
    s = Sampler(SamplingConfig(temperature=1.0, top_p=0.8)).scores(LOGITS, [])
    assert np.isfinite(s).tolist() == [True, False, False, False, True]
    s = Sampler(SamplingConfig(temperature=1.0, top_p=0.6)).scores(LOGITS, [])
    assert np.isfinite(s).tolist() == [False, False, False, False, True]  # the best token always stays


def test_seeded_draws_repeat_and_follow_the_distribution() -> None:
    cfg = SamplingConfig(temperature=1.0, seed=7)
    a = [Sampler(cfg).pick(LOGITS, []) for _ in range(3)]
    s1, s2 = Sampler(cfg), Sampler(cfg)
    seq1 = [s1.pick(LOGITS, []) for _ in range(200)]
    seq2 = [s2.pick(LOGITS, []) for _ in range(200)]
    assert seq1 == seq2 and len(set(a)) == 1
    p = np.exp(LOGITS - LOGITS.max()) / np.exp(LOGITS - LOGITS.max()).sum()
    s3 = Sampler(SamplingConfig(temperature=1.0, seed=1))
    counts = np.bincount([s3.pick(LOGITS, []) for _ in range(4000)], minlength=5) / 4000
    np.testing.assert_allclose(counts, p, atol=0.03)


@pytest.mark.parametrize("kw", [{"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5},
                                {"repetition_penalty": 0.0}])
def test_bad_settings(kw: dict) -> None:
    with pytest.raises(InputError):
        SamplingConfig(**kw)
