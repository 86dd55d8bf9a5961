"""Shapes that take the kernels' less common paths, checked against the reference and across
thread counts.

The reductions pick a memory pattern from the shape alone: planar runs (per-channel leaves),
interleaved rows, or, for short planar runs (inner < 256, at least 8 rows), the interleaved
pattern over the (outer, C * inner) columns with the columns then merged per channel; rows wider
than 2048 columns are reduced a window of columns at a time.  Each case lands on one path.
"""

from __future__ import annotations

import numpy as np
import pytest

import bnkernel as bk
from bnkernel import reference as ref

CASES = [
    # label, shape, axis
    ("short-runs-7x7", (8, 300, 7, 7), 1),  # C*inner = 14700 columns: windowed
    ("short-runs-few-rows", (7, 300, 7, 7), 1),  # under 8 rows: planar runs instead
    ("short-runs-inner2", (2000, 9, 2), 1),  # C*inner = 18: one window
    ("run-255", (130, 3, 255), 1),  # just below the planar threshold
    ("run-256", (130, 3, 256), 1),  # just at it
    ("NHWC-C3000", (24, 3000), 1),  # interleaved, windowed
    ("NLC-C2049", (3, 7, 2049), -1),  # one column past a window
]
TOL = {np.float32: 1e-6, np.float64: 1e-12}


def rel(got, want):
    want = np.asarray(want, np.float64)
    return float(np.max(np.abs(got.astype(np.float64) - want))) / max(
        1.0, float(np.max(np.abs(want)))
    )


@pytest.fixture
def restore_threads():
    yield
    bk.set_num_threads(None)


def run_all(x, dy, g, b, axis):
    y, mean, invstd = bk.batch_norm_forward(x, g, b, axis=axis)
    dx, dg, db = bk.batch_norm_backward(dy, x, mean, invstd, g, axis=axis)
    count, cmean, m2 = bk.channel_stats(x, axis=axis)
    assert count == x.size // x.shape[axis]
    sdy, sdyx = bk.backward_reduce(dy, x, mean, invstd, axis=axis)
    return {"y": y, "mean": mean, "invstd": invstd, "dx": dx, "dgamma": dg, "dbeta": db,
            "stats_mean": cmean, "m2": m2, "sum_dy": sdy, "sum_dy_xhat": sdyx}  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("label,shape,axis", CASES, ids=[c[0] for c in CASES])
def test_path_matches_reference_and_is_thread_independent(
    label, shape, axis, dtype, restore_threads
):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
    dy = (rng.standard_normal(shape) + 0.5).astype(dtype)
    C = shape[axis]
    g = rng.uniform(0.5, 2, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    results = {}
    for threads in (1, 2, 3):
        bk.set_num_threads(threads)
        results[threads] = run_all(x, dy, g, b, axis)
    for threads in (2, 3):
        for name, value in results[1].items():
            assert np.array_equal(value, results[threads][name]), (threads, name)
    got = results[1]
    ry, rmean, rinvstd = ref.forward_train(x, g, b, 1e-5, axis)
    rdx, rdg, rdb = ref.backward_train(dy, x, rmean, rinvstd, g, axis)
    _, _, rm2 = ref.channel_stats(x, axis)
    assert rel(got["y"], ry) < TOL[dtype]
    assert rel(got["dx"], rdx) < TOL[dtype]
    assert rel(got["mean"], rmean) < 1e-12
    assert rel(got["invstd"], rinvstd) < 1e-12
    assert np.array_equal(got["stats_mean"], got["mean"])
    # M2 and the parameter gradients are sums of m terms, whose rounding error is bounded
    # relative to the sum of the terms' sizes (they cancel in dgamma and dbeta)
    assert np.max(np.abs(got["m2"] - rm2) / rm2) < 1e-12
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    bshape = [1] * x.ndim
    bshape[axis] = C
    xhat = (x - rmean.reshape(bshape)) * rinvstd.reshape(bshape)
    size_dg = np.abs(dy * xhat).sum(axis=axes)
    size_db = np.abs(dy.astype(np.float64)).sum(axis=axes)
    assert np.max(np.abs(got["dgamma"] - rdg) / size_dg) < TOL[dtype]
    assert np.max(np.abs(got["dbeta"] - rdb) / size_db) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "shape", [(6, 5, 45), (40, 7, 3, 70), (64, 33), (9, 8)], ids=["C45", "C70", "C33", "C8"]
)
def test_elementwise_same_bits_on_every_path(shape, dtype):
    """Given the statistics, every output value is one fixed expression of its own inputs, so the
    channels-last kernels (channel blocks held in registers, plus the channels left over) and the
    channels-first ones (per-channel runs) must agree bit for bit on the same data."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[-1]
    g = rng.uniform(0.5, 2, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    mean = rng.standard_normal(C) + 5
    invstd = rng.uniform(0.3, 0.7, C)
    sdy, sdyx = rng.standard_normal(C), rng.standard_normal(C)
    count = x.size // C
    first = np.ascontiguousarray(np.moveaxis(x, -1, 1))  # the same data, channels first
    dy_first = np.ascontiguousarray(np.moveaxis(dy, -1, 1))
    y_last = bk.normalize(x, mean, invstd, g, b, axis=-1)
    y_first = bk.normalize(first, mean, invstd, g, b, axis=1)
    np.testing.assert_array_equal(np.moveaxis(y_first, 1, -1), y_last)
    dx_last = bk.backward_elementwise(dy, x, mean, invstd, g, sdy, sdyx, count, axis=-1)
    dx_first = bk.backward_elementwise(dy_first, first, mean, invstd, g, sdy, sdyx, count, axis=1)
    np.testing.assert_array_equal(np.moveaxis(dx_first, 1, -1), dx_last)
