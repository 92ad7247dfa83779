"""Parity metrics against hand-computed values, including the fp16 near-tie rule for top-1."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_coreml.verify import Comparison, Thresholds, _judge, metrics


def test_strict_and_resolvable_top1_by_hand() -> None:
    # Row 0: reference top-2 differ by 0.0005 at magnitude ~1 (fp16 step there is 2^-10 ~ 0.00098): a tie.
    # Row 1: they differ by 0.1: a real disagreement. Row 2: same argmax.
    ref = np.array([[[1.0005, 1.0, 0.2], [2.0, 1.9, 0.0], [0.0, 3.0, 1.0]]])
    got = np.array([[[1.0, 1.0005, 0.2], [1.9, 2.0, 0.0], [0.0, 3.0, 1.0]]])
    m = metrics(ref, got, fp16_ties=True)
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["top1_resolvable"] == pytest.approx(2 / 3)
    assert metrics(ref, got)["top1_resolvable"] is None


def test_cosine_rel_l2_max_abs_by_hand() -> None:
    ref = np.array([3.0, 4.0])
    got = np.array([3.0, 4.5])
    m = metrics(ref, got)
    assert m["cosine"] == pytest.approx((9 + 18) / (5 * np.sqrt(9 + 20.25)))
    assert m["rel_l2"] == pytest.approx(0.5 / 5)
    assert m["max_abs"] == pytest.approx(0.5)


def test_fp16_gate_uses_resolvable_and_reports_strict() -> None:
    c = Comparison("logits", "onnxruntime", "reference-executor", 0.9999, 0.01, 0.01, top1=0.5, top5=1.0,
                   top1_resolvable=1.0)
    _judge(c, Thresholds())
    assert c.passed
    c2 = Comparison("logits", "onnxruntime", "reference-executor", 0.9999, 0.01, 0.01, top1=0.5, top5=1.0,
                    top1_resolvable=0.9)
    _judge(c2, Thresholds())
    assert not c2.passed and "strict top-1 0.5000" in c2.failures[0]
