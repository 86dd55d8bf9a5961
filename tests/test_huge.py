"""More than 2**31 values in one channel: every index in the kernels is 64-bit.

The arrays are memory-mapped sparse files of float16 (4 GiB of zeros that take no disk), with a
block of ones written at the very end, past 2**31 values, where a 32-bit index would have wrapped:
the statistics and the backward sums must count exactly those ones.  Only reductions (no output
array) are run, so the test needs the page cache for the file and nothing else; one channel
(planar: a single run) and two channels (interleaved: positions 2**31 apart in memory)."""

from __future__ import annotations

import numpy as np
import pytest

import bnkernel as bk

N = 2**31 + 3 * 4096 + 5  # past 2**31, not a multiple of any leaf or vector size
ONES = 1000


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> np.memmap:
    path = tmp_path_factory.mktemp("huge") / "x.f16"
    with open(path, "wb") as f:
        f.truncate(N * 2)  # a sparse file: zeros
    tail = np.memmap(path, dtype=np.float16, mode="r+", offset=(N - ONES) * 2, shape=(ONES,))
    tail[:] = 1.0
    tail.flush()
    del tail
    return np.memmap(path, dtype=np.float16, mode="r", shape=(N,))


def expected(n: int, ones: int) -> tuple[float, float]:
    mean = ones / n
    return mean, ones * (1 - mean) ** 2 + (n - ones) * mean**2


@pytest.mark.slow
def test_one_channel_of_more_than_2_31_values(huge):
    x = huge.reshape(1, 1, N)
    count, mean, m2 = bk.channel_stats(x, axis=1)
    want_mean, want_m2 = expected(N, ONES)
    assert count == N
    np.testing.assert_allclose(mean, [want_mean], rtol=1e-12)
    np.testing.assert_allclose(m2, [want_m2], rtol=1e-9)
    # the backward sums with dy = x: sum(dy) counts the ones, sum(dy * xhat) their xhat
    invstd = bk.invstd_from_stats(count, m2, 0.0)
    sdy, sdyx = bk.backward_reduce(x, x, mean, invstd, axis=1)
    np.testing.assert_allclose(sdy, [ONES], rtol=1e-12)
    np.testing.assert_allclose(sdyx, [ONES * (1 - want_mean) * invstd[0]], rtol=1e-9)


@pytest.mark.slow
def test_two_interleaved_channels_past_2_31(huge):
    n = N - 1  # even: (rows, 2)
    x = huge[1:].reshape(n // 2, 2)  # the ones fall half in each channel
    count, mean, m2 = bk.channel_stats(x, axis=1)
    assert count == n // 2
    want_mean, want_m2 = expected(n // 2, ONES // 2)
    np.testing.assert_allclose(mean, [want_mean] * 2, rtol=1e-12)
    np.testing.assert_allclose(m2, [want_m2] * 2, rtol=1e-9)
