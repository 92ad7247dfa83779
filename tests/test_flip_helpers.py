"""``tests/support/flips.py`` on hand-made rows: what it absorbs and what it still fails on."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.flips import close_except_flips, equal_except_rounding

REF = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [4.0, 1.0, -2.0], [0.0, 1.0, 0.25]], np.float32)


def test_close_rows_flag_nothing() -> None:
    assert close_except_flips(REF + 1e-5, REF, 1e-4, lambda _r: pytest.fail("not asked"), max_flagged=1) == 0


def test_a_flipped_row_the_second_oracle_shares_is_absorbed() -> None:
    got = REF.copy()
    got[2, 1] += 0.05  # torch rounded one activation the other way at position 2
    second = got.copy()
    second[:, 0] += 5e-5  # another runtime: float32 noise, same flip
    assert close_except_flips(got, REF, 1e-4, lambda r: second[r], max_flagged=1) == 1


def test_a_row_the_second_oracle_does_not_share_fails() -> None:
    got = REF.copy()
    got[2, 1] += 0.05  # a bug: the second oracle has the torch value there
    with pytest.raises(AssertionError, match="not a rounding flip"):
        close_except_flips(got, REF, 1e-4, lambda r: REF[r], max_flagged=1)


def test_too_many_flagged_rows_fail_even_when_the_second_oracle_agrees() -> None:
    got = REF + np.float32(0.01)  # every position moved: a bug in the shared graph, not a flip
    with pytest.raises(AssertionError, match="4 rows differ"):
        close_except_flips(got, REF, 1e-4, lambda r: got[r], max_flagged=1)


def test_a_flagged_row_far_from_torch_fails() -> None:
    got = REF.copy()
    got[1] = [2.0, 0.5, -1.0]  # argmax and direction changed, though the second oracle agrees
    with pytest.raises(AssertionError, match="cosine"):
        close_except_flips(got, REF, 1e-4, lambda r: got[r], max_flagged=1)


def test_one_fp16_rounding_apart_is_absorbed_and_more_is_not() -> None:
    same = REF.astype(np.float16).astype(np.float32)
    ref = same + np.float32(1e-3)  # torch, fp32
    got = same.copy()
    got[0, 2] = np.nextafter(np.float16(3.0), np.float16(4.0))  # one fp16 step (0.00195) up, at row 0
    assert equal_except_rounding(got, same, ref, max_flagged=1) == 1
    assert equal_except_rounding(same, same, ref, max_flagged=0) == 0
    got[0, 2] = 3.0 + 8 * 0.001953125  # 8 steps away from torch: not a rounding
    with pytest.raises(AssertionError, match="further from torch"):
        equal_except_rounding(got, same, ref, max_flagged=1)
    got[1, 0] = np.nextafter(np.float16(0.5), np.float16(1.0))
    with pytest.raises(AssertionError, match="2 rows differ"):
        equal_except_rounding(got, same, ref, max_flagged=1)
