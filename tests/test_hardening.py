"""Hardening of the compiled module: merge_stats' count overflow."""

from __future__ import annotations

import numpy as np
import pytest

from bnkernel import _core

# ---- merge_stats: the total count ---------------------------------------------------------------


@pytest.mark.parametrize(
    "counts",
    [[2**62, 2**62], [2**63 - 1, 1], [1, 0, 2**63 - 1]],
    ids=["2^62+2^62", "max+1", "with-zero"],
)
def test_core_merge_stats_count_overflow_raises(counts):
    parts = len(counts)
    mean, m2 = np.full(3, 7.0), np.full(3, 7.0)
    with pytest.raises(OverflowError, match="counts"):
        _core.merge_stats(
            np.array(counts, np.int64), np.ones((parts, 3)), np.ones((parts, 3)), mean, m2
        )
    assert (mean == 7.0).all() and (m2 == 7.0).all()  # untouched


def test_core_merge_stats_largest_total_is_fine():
    mean, m2 = np.empty(3), np.empty(3)
    counts = np.array([2**62, 2**62 - 1], np.int64)
    assert _core.merge_stats(counts, np.ones((2, 3)), np.zeros((2, 3)), mean, m2) == 2**63 - 1
    assert (mean == 1.0).all() and (m2 == 0.0).all()
