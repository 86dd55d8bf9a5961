"""The split phases (channel_stats, merge_stats, invstd_from_stats, normalize, backward_reduce,
backward_elementwise, update_running_stats) against the fused kernels.

On the same x the split path is bit-identical to the fused one (the kernels share the reduction
tree and the float64 formulas).  Over a batch split in parts, the merged statistics differ from the
whole batch's only by the merge order: float64 rounding, ~1e-15 relative."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import (
    DTYPE_IDS,
    DTYPES,
    STATS_TOL,
    assert_close,
    assert_update_matches_fused,
    channel_abs_sum,
    guard_intact,
    guarded_empty,
    max_abs,
)

import bnkernel as bk
from bnkernel import reference as ref

AFFINE = pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])


# ---- bit-identical on the same x ----------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-5, 1e-3], ids=["eps1e-5", "eps1e-3"])
@AFFINE
def test_split_forward_is_bit_identical(case, affine, eps):
    g, b = (case.gamma, case.beta) if affine else (None, None)
    y, mean, invstd = bk.batch_norm_forward(case.x, g, b, eps=eps, axis=case.axis)
    count, mean2, m2 = bk.channel_stats(case.x, axis=case.axis)
    invstd2 = bk.invstd_from_stats(count, m2, eps)
    y2 = bk.normalize(case.x, mean2, invstd2, g, b, axis=case.axis)
    assert count == case.m
    assert np.array_equal(mean, mean2)
    assert np.array_equal(invstd, invstd2)
    assert np.array_equal(y, y2)


@AFFINE
def test_split_backward_is_bit_identical(case, affine):
    g = case.gamma if affine else None
    _, mean, invstd = bk.batch_norm_forward(case.x, g, axis=case.axis)
    dx, dgamma, dbeta = bk.batch_norm_backward(case.dy, case.x, mean, invstd, g, axis=case.axis)
    sum_dy, sum_dy_xhat = bk.backward_reduce(case.dy, case.x, mean, invstd, axis=case.axis)
    dx2 = bk.backward_elementwise(
        case.dy, case.x, mean, invstd, g, sum_dy, sum_dy_xhat, case.m, axis=case.axis
    )
    assert np.array_equal(dx, dx2)
    assert np.array_equal(dbeta, sum_dy.astype(case.dtype))
    assert np.array_equal(dgamma, sum_dy_xhat.astype(case.dtype))
    # the frozen backward's parameter gradients are the same sums
    _, dgamma_f, dbeta_f = bk.batch_norm_backward(
        case.dy, case.x, mean, invstd, g, training=False, axis=case.axis
    )
    assert np.array_equal(dbeta_f, dbeta)
    assert np.array_equal(dgamma_f, dgamma)


def test_split_running_update_is_bit_identical(case):
    rm1, rv1 = case.running_mean.copy(), case.running_var.copy()
    rm2, rv2 = case.running_mean.copy(), case.running_var.copy()
    bk.batch_norm_forward(case.x, running_mean=rm1, running_var=rv1, momentum=0.1, axis=case.axis)
    count, mean, m2 = bk.channel_stats(case.x, axis=case.axis)
    bk.update_running_stats(rm2, rv2, count, mean, m2, momentum=0.1)
    # same float64 expressions, rounded once to x's dtype (the kernels are built without FMA
    # contraction, so the C++ and NumPy evaluations agree to the bit)
    assert np.array_equal(rm1, rm2)
    assert np.array_equal(rv1, rv2)


# ---- a batch split in three uneven parts, one of them empty -------------------------------------


def split3(a, axis):
    """a split along ``axis`` into three parts: [0:cut] (cut > 0), an EMPTY part, [cut:n].

    The empty part is a zero-size view at the start of a sentinel-filled buffer (see
    conftest.guarded_empty), so a kernel that wrongly touches it cannot corrupt the heap."""
    n = a.shape[axis]
    cut = max(1, n // 3)
    empty_shape = list(a.shape)
    empty_shape[axis] = 0
    empty, _ = guarded_empty(tuple(empty_shape), a.dtype)
    return [np.take(a, np.arange(cut), axis=axis), empty, np.take(a, np.arange(cut, n), axis=axis)]


def elementwise_part(fn, part, *args, **kwargs):
    """Call normalize / backward_elementwise on one part; an empty part writes into a guarded
    zero-size out= and must leave the guard intact."""
    if part.size:
        return fn(*args, **kwargs)
    out, buf = guarded_empty(part.shape, part.dtype)
    result = fn(*args, **kwargs, out=out)
    assert result is out
    assert guard_intact(buf), "the kernel wrote outside an empty output"
    return result


@AFFINE
def test_split_batch_forward(case, affine):
    ba = case.layout.batch_axis
    g, b = (case.gamma, case.beta) if affine else (None, None)
    parts = split3(case.x, ba)
    assert [p.shape[ba] == 0 for p in parts] == [False, True, False]
    stats = [bk.channel_stats(p, axis=case.axis) for p in parts]
    assert stats[1][0] == 0
    assert np.array_equal(stats[1][1], np.zeros(case.C))
    assert np.array_equal(stats[1][2], np.zeros(case.C))
    count, mean, m2 = bk.merge_stats(*stats)
    count_w, mean_w, m2_w = bk.channel_stats(case.x, axis=case.axis)
    assert count == count_w == case.m
    # merging in a different order than the kernel's tree: float64 rounding only
    assert_close(mean, mean_w, STATS_TOL, scale=max_abs(case.x), what="merged mean")
    assert_close(m2, m2_w, STATS_TOL, what="merged M2")
    # against the reference's merge of the reference's parts, too
    r_count, r_mean, r_m2 = ref.merge_stats(*[ref.channel_stats(p, case.axis) for p in parts])
    assert r_count == count
    assert_close(mean, r_mean, STATS_TOL, scale=max_abs(case.x))
    assert_close(m2, r_m2, STATS_TOL)

    invstd = bk.invstd_from_stats(count, m2)
    y_parts = [
        elementwise_part(bk.normalize, p, p, mean, invstd, g, b, axis=case.axis) for p in parts
    ]
    assert y_parts[1].shape == parts[1].shape and y_parts[1].dtype == case.dtype
    y = np.concatenate(y_parts, axis=ba)
    y_fused, mean_f, invstd_f = bk.batch_norm_forward(case.x, g, b, axis=case.axis)
    assert_close(mean, mean_f, STATS_TOL, scale=max_abs(case.x))
    assert_close(invstd, invstd_f, STATS_TOL)
    # y from statistics 1e-15 away: the same up to a float32 rounding flip (or 1e-12 in float64)
    assert_close(y, y_fused, case.tol, what="y")

    # running statistics from the merged statistics = the fused update (PyTorch's defaults, then
    # Keras' rule)
    merged = (count, mean, m2)
    assert_update_matches_fused(case, merged, momentum=0.1, unbiased=True)
    keras = ("keras moving_mean", "keras moving_variance")
    assert_update_matches_fused(case, merged, momentum=0.01, unbiased=False, what=keras)


@AFFINE
def test_split_batch_backward(case, affine):
    ba = case.layout.batch_axis
    g = case.gamma if affine else None
    _, mean, invstd = bk.batch_norm_forward(case.x, g, axis=case.axis)
    dx_fused, dgamma_f, dbeta_f = bk.batch_norm_backward(
        case.dy, case.x, mean, invstd, g, axis=case.axis
    )
    xs, dys = split3(case.x, ba), split3(case.dy, ba)
    sums = [
        bk.backward_reduce(d, x, mean, invstd, axis=case.axis) for d, x in zip(dys, xs, strict=True)
    ]
    assert np.array_equal(sums[1][0], np.zeros(case.C))  # the empty part sums to zero
    assert np.array_equal(sums[1][1], np.zeros(case.C))
    sum_dy = sums[0][0] + sums[1][0] + sums[2][0]  # the all-reduce
    sum_dy_xhat = sums[0][1] + sums[1][1] + sums[2][1]
    scale_b = channel_abs_sum(case.dy, case.axis).max()
    assert_close(sum_dy, dbeta_f, case.tol, scale=scale_b, what="dbeta")
    assert_close(
        sum_dy_xhat,
        dgamma_f,
        case.tol,
        scale=float(np.max(np.abs(sum_dy_xhat))) + scale_b,
        what="dgamma",
    )
    dx_parts = [
        elementwise_part(
            bk.backward_elementwise,
            x,
            d,
            x,
            mean,
            invstd,
            g,
            sum_dy,
            sum_dy_xhat,
            case.m,
            axis=case.axis,
        )
        for d, x in zip(dys, xs, strict=True)
    ]
    assert dx_parts[1].shape == xs[1].shape
    assert_close(np.concatenate(dx_parts, axis=ba), dx_fused, case.tol, what="dx")


# ---- merge_stats --------------------------------------------------------------------------------


def test_merge_stats_hand_computed():
    # A = {0.5, 1.5}: n 2, mean 1, M2 0.5;  B = {4}: n 1, mean 4, M2 0
    # union {0.5, 1.5, 4}: mean 2, M2 = 2.25 + 0.25 + 4 = 6.5
    count, mean, m2 = bk.merge_stats(
        (2, np.array([1.0]), np.array([0.5])), (1, np.array([4.0]), np.array([0.0]))
    )
    assert count == 3 and type(count) is int
    assert mean.dtype == np.float64 and m2.dtype == np.float64
    np.testing.assert_array_equal(mean, [2.0])
    np.testing.assert_array_equal(m2, [6.5])


def test_merge_stats_single_part_is_identity(rng):
    mean, m2 = rng.standard_normal(7), rng.uniform(0, 5, 7)
    count, mean2, m22 = bk.merge_stats((11, mean, m2))
    assert count == 11
    assert np.array_equal(mean2, mean) and np.array_equal(m22, m2)
    assert mean2 is not mean  # a new array, the input is not aliased


@pytest.mark.parametrize("position", [0, 1, 3], ids=["first", "middle", "last"])
def test_merge_stats_zero_count_part_is_neutral(rng, position):
    x = rng.standard_normal((30, 4))
    parts = [bk.channel_stats(x[:10]), bk.channel_stats(x[10:13]), bk.channel_stats(x[13:])]
    garbage = (0, rng.standard_normal(4) * 100, rng.uniform(0, 100, 4))  # ignored: count is 0
    with_zero = [*parts[:position], garbage, *parts[position:]]
    assert [s[0] for s in with_zero].count(0) == 1
    count, mean, m2 = bk.merge_stats(*with_zero)
    count0, mean0, m20 = bk.merge_stats(*parts)
    assert count == count0 == 30
    np.testing.assert_array_equal(mean, mean0)
    np.testing.assert_array_equal(m2, m20)


def test_merge_stats_all_zero_counts(rng):
    count, mean, m2 = bk.merge_stats(
        (0, rng.standard_normal(5), rng.uniform(0, 1, 5)), (0, np.zeros(5), np.zeros(5))
    )
    assert count == 0
    np.testing.assert_array_equal(mean, np.zeros(5))
    np.testing.assert_array_equal(m2, np.zeros(5))
    # the statistics of empty batches merge to the same
    empty = bk.channel_stats(np.zeros((0, 5, 3), np.float32))
    assert bk.merge_stats(empty, empty)[0] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_stats_many_uneven_parts(dtype, rng):
    """Every row its own part, plus parts of all sizes: still the whole batch's statistics."""
    x = (rng.standard_normal((200, 6)) * 3 + 50).astype(dtype)
    whole = bk.channel_stats(x)
    rows = [bk.channel_stats(x[i : i + 1]) for i in range(200)]
    cuts = [0, 1, 3, 7, 20, 20, 64, 199, 200]
    uneven = [bk.channel_stats(x[a:b]) for a, b in itertools.pairwise(cuts)]
    for parts in (rows, uneven, uneven[::-1]):
        count, mean, m2 = bk.merge_stats(*parts)
        assert count == 200
        assert_close(mean, whole[1], STATS_TOL, scale=max_abs(x))
        assert_close(m2, whole[2], STATS_TOL)


def test_merge_stats_accepts_numpy_counts_and_float32_stats(rng):
    a = (np.int64(3), rng.standard_normal(4).astype(np.float32), np.ones(4, np.float32))
    b = (np.int32(5), rng.standard_normal(4), np.full(4, 2.0))
    count, mean, m2 = bk.merge_stats(a, b)
    r_count, r_mean, r_m2 = ref.merge_stats(a, b)
    assert count == r_count == 8 and type(count) is int
    assert_close(mean, r_mean, STATS_TOL)
    assert_close(m2, r_m2, STATS_TOL)


def test_merge_stats_matches_reference_formula(rng):
    parts = [(int(n), rng.standard_normal(9) * 10, rng.uniform(0, 50, 9)) for n in (5, 1, 0, 17, 2)]
    count, mean, m2 = bk.merge_stats(*parts)
    r_count, r_mean, r_m2 = ref.merge_stats(*parts)
    assert count == r_count
    assert_close(mean, r_mean, STATS_TOL)
    assert_close(m2, r_m2, STATS_TOL)


# ---- batches with no samples --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape,axis",
    [
        ((0, 3, 4), 1),
        ((0, 3), 1),
        ((0, 4, 3), -1),
        ((0, 3, 4), 2),
        ((2, 3, 0), 1),
        ((3, 0), 0),
    ],
    ids=["0xCxL", "0xC", "0xLxC", "0xLxC-axis2", "NxCx0", "Cx0-axis0"],
)
def test_split_phases_accept_an_empty_batch(shape, axis, dtype):
    """A process of a data-parallel job may get no samples: the split phases give count 0, zero
    sums and empty outputs, and touch no memory outside the (empty) arrays."""
    x, x_buf = guarded_empty(shape, dtype)
    dy, dy_buf = guarded_empty(shape, dtype)
    C = shape[axis]
    count, mean, m2 = bk.channel_stats(x, axis=axis)
    assert count == 0
    assert np.array_equal(mean, np.zeros(C)) and np.array_equal(m2, np.zeros(C))
    sum_dy, sum_dy_xhat = bk.backward_reduce(dy, x, np.ones(C), np.ones(C), axis=axis)
    assert np.array_equal(sum_dy, np.zeros(C)) and np.array_equal(sum_dy_xhat, np.zeros(C))
    gamma = np.ones(C, dtype)
    out, out_buf = guarded_empty(shape, dtype)
    # (mean 0, beta 1: a stray write of (SENTINEL - 0) * 1 + 1 would show in the guard)
    y = bk.normalize(x, np.zeros(C), np.ones(C), gamma, gamma, axis=axis, out=out)
    assert y is out and y.shape == shape and y.dtype == dtype
    assert guard_intact(out_buf), "normalize wrote outside an empty output"
    out, out_buf = guarded_empty(shape, dtype)
    dx = bk.backward_elementwise(
        dy, x, np.ones(C), np.ones(C), gamma, np.ones(C), np.ones(C), 10, axis=axis, out=out
    )
    assert dx is out and dx.shape == shape and dx.dtype == dtype
    assert guard_intact(out_buf), "backward_elementwise wrote outside an empty output"
    assert guard_intact(x_buf) and guard_intact(dy_buf)
