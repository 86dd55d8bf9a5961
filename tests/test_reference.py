"""Tests of the float64 reference itself (bnkernel.reference), against independent formulations:
per-channel Python loops, finite differences, hand-computed numbers and (if installed) PyTorch."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from conftest import assert_fd_grads

from bnkernel import reference as ref

# (shape, channel axis): every dimension length distinct so that a wrong axis cannot pass.
STATS_CASES = [
    ((7, 3), 1),
    ((7, 3), -1),
    ((5, 3, 4), 1),
    ((5, 4, 3), -1),
    ((5, 4, 3), 2),
    ((2, 3, 4, 5), 1),
    ((2, 4, 5, 3), -1),
    ((2, 4, 3, 5), 2),
    ((2, 3, 4, 5, 6), 1),
    ((2, 4, 5, 6, 3), -1),
    ((2, 4, 3, 5, 6), 2),
]
STATS_IDS = [f"{len(s)}d-{'x'.join(map(str, s))}-axis{a}" for s, a in STATS_CASES]

# Layouts for the gradient checks: NCHW, channels-last NHWC, and plain (N, C).
GRAD_CASES = [((2, 3, 4, 5), 1), ((2, 4, 5, 3), -1), ((6, 3), 1)]
GRAD_IDS = ["NCHW", "NHWC", "NC"]

# Finite-difference tolerance. Central differences with step h have O(h^2 * |f'''|) truncation
# error (~1e-12 for h = 1e-6 and O(1) derivatives) and O(eps_machine * |L| / h) rounding error
# (~1e-16 * O(10) / 1e-6 ~ 1e-9). So agreement to ~1e-7 absolute / 1e-6 relative is what a correct
# analytic gradient achieves, while any wrong term in it is off by O(1e-2) or more.
FD_RTOL = 1e-6
FD_ATOL = 1e-7


def _data(shape: tuple[int, ...], axis: int, seed: int = 0) -> np.ndarray:
    """Random float64 data with a different, non-zero mean and scale per channel."""
    rng = np.random.default_rng(seed)
    nd = len(shape)
    c = shape[axis]
    offsets = ref._bcast(rng.uniform(-3.0, 3.0, c), nd, axis)
    scales = ref._bcast(rng.uniform(0.5, 2.0, c), nd, axis)
    return offsets + scales * rng.standard_normal(shape)


def _loop_stats(x: np.ndarray, axis: int) -> tuple[int, list[float], list[float]]:
    """(count, mean, M2) per channel by a plain Python loop with exact (fsum) summation."""
    c_axis = axis % x.ndim
    means, m2s = [], []
    count = 0
    for c in range(x.shape[c_axis]):
        vals = [float(v) for v in np.take(x, c, axis=c_axis).ravel()]
        count = len(vals)
        mean = math.fsum(vals) / count
        means.append(mean)
        m2s.append(math.fsum((v - mean) ** 2 for v in vals))
    return count, means, m2s


def _per_channel(a: np.ndarray, axis: int) -> np.ndarray:
    """a rearranged to (C, m): one row per channel."""
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


# ------------------------------------------------------------------------------------------
# helpers and statistics
# ------------------------------------------------------------------------------------------


def test_reduce_axes_and_bcast() -> None:
    assert ref._reduce_axes(4, 1) == (0, 2, 3)
    assert ref._reduce_axes(4, -1) == (0, 1, 2)
    assert ref._reduce_axes(2, 0) == (1,)
    assert ref._bcast(np.arange(3.0), 4, 1).shape == (1, 3, 1, 1)
    assert ref._bcast(np.arange(3.0), 4, -1).shape == (1, 1, 1, 3)
    with pytest.raises(ValueError):
        ref._reduce_axes(3, 3)


@pytest.mark.parametrize(("shape", "axis"), STATS_CASES, ids=STATS_IDS)
def test_channel_stats_matches_loop(shape: tuple[int, ...], axis: int) -> None:
    x = _data(shape, axis)
    count, mean, m2 = ref.channel_stats(x, axis=axis)
    n, loop_mean, loop_m2 = _loop_stats(x, axis)
    assert count == n == x.size // shape[axis]
    assert mean.dtype == np.float64 and m2.dtype == np.float64
    assert mean.shape == m2.shape == (shape[axis],)
    np.testing.assert_allclose(mean, loop_mean, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(m2, loop_m2, rtol=1e-12)


@pytest.mark.parametrize(("shape", "axis"), STATS_CASES, ids=STATS_IDS)
def test_batch_stats_matches_loop(shape: tuple[int, ...], axis: int) -> None:
    x = _data(shape, axis, seed=1)
    count, mean, var = ref.batch_stats(x, axis=axis)
    n, loop_mean, loop_m2 = _loop_stats(x, axis)
    assert count == n
    assert var.dtype == np.float64
    np.testing.assert_allclose(mean, loop_mean, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(var, np.array(loop_m2) / n, rtol=1e-12)  # biased: / m


def test_stats_accept_integer_input_and_return_float64() -> None:
    x = np.array([[1, 2], [2, 4], [6, 9]], dtype=np.int32)  # (N=3, C=2)
    count, mean, var = ref.batch_stats(x)
    assert count == 3
    assert mean.dtype == var.dtype == np.float64
    np.testing.assert_array_equal(mean, [3.0, 5.0])
    np.testing.assert_allclose(var, [14.0 / 3.0, 26.0 / 3.0], rtol=1e-15)


def test_two_pass_is_accurate_with_large_offset() -> None:
    # A one-pass E[x^2] - E[x]^2 loses all digits here; the two-pass form must not.
    x = 1e8 + np.array([[1.0], [2.0], [3.0], [4.0]])  # (N=4, C=1)
    _, mean, var = ref.batch_stats(x)
    np.testing.assert_array_equal(mean, [1e8 + 2.5])
    np.testing.assert_allclose(var, [1.25], rtol=1e-12)


def test_channel_stats_empty_batch() -> None:
    count, mean, m2 = ref.channel_stats(np.zeros((0, 3, 4)), axis=1)
    assert count == 0
    np.testing.assert_array_equal(mean, np.zeros(3))
    np.testing.assert_array_equal(m2, np.zeros(3))
    with pytest.raises(ValueError):
        ref.batch_stats(np.zeros((0, 3)))


# ------------------------------------------------------------------------------------------
# merge_stats
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), [((10, 3, 4, 5), 1), ((10, 4, 5, 3), -1), ((10, 3), 1)])
def test_merge_stats_of_uneven_split_equals_whole(shape: tuple[int, ...], axis: int) -> None:
    x = _data(shape, axis, seed=2) + 100.0  # offset so the d^2 correction term matters
    parts = [x[:3], x[3:3], x[3:]]  # sizes 3, 0, 7 along the batch axis
    assert [p.shape[0] for p in parts] == [3, 0, 7]
    whole = ref.channel_stats(x, axis=axis)
    merged = ref.merge_stats(*(ref.channel_stats(p, axis=axis) for p in parts))
    assert merged[0] == whole[0]
    np.testing.assert_allclose(merged[1], whole[1], rtol=1e-14)
    np.testing.assert_allclose(merged[2], whole[2], rtol=1e-12)

    first = None
    for perm in itertools.permutations(parts):
        res = ref.merge_stats(*(ref.channel_stats(p, axis=axis) for p in perm))
        if first is None:
            first = res
        assert res[0] == first[0]
        np.testing.assert_allclose(res[1], first[1], rtol=1e-14)  # rounding only
        np.testing.assert_allclose(res[2], first[2], rtol=1e-12)


def test_merge_stats_hand_numbers() -> None:
    # A = {1, 2}: n=2, mean=1.5, M2=0.5; B = {4}: n=1, mean=4, M2=0.
    # Union {1, 2, 4}: mean 7/3, M2 = 16/9 + 1/9 + 25/9 = 14/3.
    n, mean, m2 = ref.merge_stats((2, [1.5], [0.5]), (1, [4.0], [0.0]))
    assert n == 3
    np.testing.assert_allclose(mean, [7.0 / 3.0], rtol=1e-15)
    np.testing.assert_allclose(m2, [14.0 / 3.0], rtol=1e-15)


def test_merge_stats_empty_parts_are_neutral() -> None:
    a = (4, np.array([1.0, -2.0]), np.array([3.0, 5.0]))
    empty = (0, np.zeros(2), np.zeros(2))
    for parts in [(a,), (empty, a), (a, empty), (empty, a, empty)]:
        n, mean, m2 = ref.merge_stats(*parts)
        assert n == 4
        np.testing.assert_array_equal(mean, a[1])
        np.testing.assert_array_equal(m2, a[2])
    n, mean, m2 = ref.merge_stats(empty, empty)
    assert n == 0
    np.testing.assert_array_equal(mean, np.zeros(2))
    np.testing.assert_array_equal(m2, np.zeros(2))
    with pytest.raises(ValueError):
        ref.merge_stats()


# ------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), GRAD_CASES, ids=GRAD_IDS)
def test_forward_train_normalizes(shape: tuple[int, ...], axis: int) -> None:
    # Small per-channel variances (~1e-5) so eps = 1e-5 visibly shrinks the output variance.
    x = 0.5 + 3e-3 * _data(shape, axis, seed=3)
    eps = 1e-5
    _, _, var = ref.batch_stats(x, axis=axis)
    y, mean, invstd = ref.forward_train(x, eps=eps, axis=axis)
    assert y.dtype == np.float64 and y.shape == x.shape
    np.testing.assert_allclose(invstd, 1.0 / np.sqrt(var + eps), rtol=1e-15)
    rows = _per_channel(y, axis)
    np.testing.assert_allclose(rows.mean(axis=1), 0.0, atol=1e-12)
    expected_var = var / (var + eps)
    assert np.all(expected_var < 0.9)  # eps matters: a forward that dropped it would fail
    np.testing.assert_allclose(rows.var(axis=1), expected_var, rtol=1e-12)

    gamma = np.linspace(-2.0, 1.5, shape[axis])  # includes a negative scale
    beta = np.linspace(0.3, -0.7, shape[axis])
    y2, mean2, invstd2 = ref.forward_train(x, gamma, beta, eps=eps, axis=axis)
    np.testing.assert_array_equal(mean2, mean)
    np.testing.assert_array_equal(invstd2, invstd)
    rows2 = _per_channel(y2, axis)
    np.testing.assert_allclose(rows2.mean(axis=1), beta, atol=1e-12)
    np.testing.assert_allclose(rows2.std(axis=1), np.abs(gamma) * np.sqrt(expected_var), rtol=1e-12)


def test_forward_train_none_means_identity_affine() -> None:
    x = _data((4, 3, 5), 1, seed=4)
    y_none, _, _ = ref.forward_train(x)
    y_explicit, _, _ = ref.forward_train(x, np.ones(3), np.zeros(3))
    np.testing.assert_array_equal(y_none, y_explicit)


def test_normalize_and_forward_infer_hand_numbers() -> None:
    x = np.array([[1.0, 10.0], [3.0, 20.0]])  # (N=2, C=2)
    mean = np.array([2.0, 10.0])
    var = np.array([4.0 - 0.5, 25.0 - 0.5])  # + eps 0.5 -> std 2 and 5
    gamma = np.array([3.0, -1.0])
    beta = np.array([1.0, 0.5])
    expected = np.array([[(1 - 2) / 2 * 3 + 1, 0.5], [(3 - 2) / 2 * 3 + 1, -(20 - 10) / 5 + 0.5]])
    y = ref.forward_infer(x, mean, var, gamma, beta, eps=0.5)
    np.testing.assert_allclose(y, expected, rtol=1e-15)
    y2 = ref.normalize(x, mean, 1.0 / np.sqrt(var + 0.5), gamma, beta)
    np.testing.assert_allclose(y2, expected, rtol=1e-15)
    # The same numbers transposed to (C, N), with the channel axis 0.
    y3 = ref.forward_infer(x.T.copy(), mean, var, gamma, beta, eps=0.5, axis=0)
    np.testing.assert_allclose(y3, expected.T, rtol=1e-15)


def test_forward_infer_with_batch_stats_equals_forward_train() -> None:
    x = _data((3, 4, 2, 5), -1, seed=5)
    gamma, beta = np.array([1.0, 2.0, -0.5, 0.1, 3.0]), np.array([0.0, 1.0, 2.0, -1.0, 0.5])
    _, mean, var = ref.batch_stats(x, axis=-1)
    y_train, _, _ = ref.forward_train(x, gamma, beta, eps=1e-3, axis=-1)
    y_infer = ref.forward_infer(x, mean, var, gamma, beta, eps=1e-3, axis=-1)
    np.testing.assert_allclose(y_infer, y_train, rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------


def _affine(shape: tuple[int, ...], axis: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = shape[axis]
    return rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c), rng.standard_normal(c)


def test_numerical_gradient_on_known_function() -> None:
    x = np.array([[0.5, -1.0], [2.0, 0.25]])
    grad = ref.numerical_gradient(lambda a: float(np.sum(a**3 + np.sin(a))), x)
    np.testing.assert_allclose(grad, 3 * x**2 + np.cos(x), rtol=1e-8)
    np.testing.assert_array_equal(x, [[0.5, -1.0], [2.0, 0.25]])  # input untouched


@pytest.mark.parametrize(("shape", "axis"), GRAD_CASES, ids=GRAD_IDS)
def test_backward_train_matches_finite_differences(shape: tuple[int, ...], axis: int) -> None:
    x = _data(shape, axis, seed=6)
    gamma, beta = _affine(shape, axis, seed=7)
    g_out = np.random.default_rng(8).standard_normal(shape)  # L = sum(y * G), so dL/dy = G
    eps = 1e-5

    def loss(xv: np.ndarray, gv: np.ndarray, bv: np.ndarray) -> float:
        y, _, _ = ref.forward_train(xv, gv, bv, eps=eps, axis=axis)
        return float(np.sum(y * g_out))

    _, mean, invstd = ref.forward_train(x, gamma, beta, eps=eps, axis=axis)
    dx, dgamma, dbeta = ref.backward_train(g_out, x, mean, invstd, gamma, axis=axis)
    assert dx.shape == x.shape and dgamma.shape == dbeta.shape == gamma.shape

    num_dx, _, _ = assert_fd_grads(
        loss, (x, gamma, beta), (dx, dgamma, dbeta), rtol=FD_RTOL, atol=FD_ATOL
    )

    # The statistics' dependence on x is not negligible: the frozen dx differs clearly.
    dx_frozen, _, _ = ref.backward_frozen(g_out, x, mean, invstd, gamma, axis=axis)
    assert np.max(np.abs(dx_frozen - num_dx)) > 1e-3


def test_backward_train_gamma_none() -> None:
    shape, axis = (3, 4, 5), 1
    x = _data(shape, axis, seed=9)
    g_out = np.random.default_rng(10).standard_normal(shape)
    _, mean, invstd = ref.forward_train(x, axis=axis)
    dx, dgamma, dbeta = ref.backward_train(g_out, x, mean, invstd, axis=axis)
    num_dx = ref.numerical_gradient(
        lambda xv: float(np.sum(ref.forward_train(xv, axis=axis)[0] * g_out)), x
    )
    np.testing.assert_allclose(dx, num_dx, rtol=FD_RTOL, atol=FD_ATOL)
    _, dgamma1, dbeta1 = ref.backward_train(g_out, x, mean, invstd, np.ones(4), axis=axis)
    np.testing.assert_array_equal(dgamma, dgamma1)
    np.testing.assert_array_equal(dbeta, dbeta1)


@pytest.mark.parametrize(("shape", "axis"), GRAD_CASES, ids=GRAD_IDS)
def test_backward_frozen_matches_finite_differences(shape: tuple[int, ...], axis: int) -> None:
    x = _data(shape, axis, seed=11)
    gamma, beta = _affine(shape, axis, seed=12)
    g_out = np.random.default_rng(13).standard_normal(shape)
    # Frozen statistics: some fixed mean/invstd, deliberately not the batch's own.
    rng = np.random.default_rng(14)
    mean = rng.standard_normal(shape[axis])
    invstd = rng.uniform(0.5, 2.0, shape[axis])

    def loss(xv: np.ndarray, gv: np.ndarray, bv: np.ndarray) -> float:
        return float(np.sum(ref.normalize(xv, mean, invstd, gv, bv, axis=axis) * g_out))

    dx, dgamma, dbeta = ref.backward_frozen(g_out, x, mean, invstd, gamma, axis=axis)
    assert_fd_grads(loss, (x, gamma, beta), (dx, dgamma, dbeta), rtol=FD_RTOL, atol=FD_ATOL)


@pytest.mark.parametrize(("shape", "axis"), GRAD_CASES, ids=GRAD_IDS)
def test_reduce_then_elementwise_equals_backward_train(shape: tuple[int, ...], axis: int) -> None:
    x = _data(shape, axis, seed=15)
    gamma, _ = _affine(shape, axis, seed=16)
    dy = np.random.default_rng(17).standard_normal(shape)
    count, mean, var = ref.batch_stats(x, axis=axis)
    invstd = 1.0 / np.sqrt(var + 1e-5)
    dx, dgamma, dbeta = ref.backward_train(dy, x, mean, invstd, gamma, axis=axis)

    sum_dy, sum_dy_xhat = ref.backward_reduce(dy, x, mean, invstd, axis=axis)
    np.testing.assert_allclose(sum_dy, dbeta, rtol=1e-14, atol=1e-13)
    np.testing.assert_allclose(sum_dy_xhat, dgamma, rtol=1e-14, atol=1e-13)
    for g in (gamma, None):
        dx_ref = dx if g is not None else ref.backward_train(dy, x, mean, invstd, axis=axis)[0]
        dx2 = ref.backward_elementwise(dy, x, mean, invstd, g, sum_dy, sum_dy_xhat, count, axis)
        np.testing.assert_allclose(dx2, dx_ref, rtol=1e-12, atol=1e-13)


def test_split_batch_backward_equals_whole() -> None:
    # Synchronized BN: per-part reductions summed, then each part's elementwise pass with the
    # total count, reproduces the whole-batch backward.
    shape, axis = (9, 3, 4, 2), 1
    x = _data(shape, axis, seed=18)
    gamma, beta = _affine(shape, axis, seed=19)
    dy = np.random.default_rng(20).standard_normal(shape)
    _, mean, invstd = ref.forward_train(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = ref.backward_train(dy, x, mean, invstd, gamma, axis=axis)

    bounds = [(0, 2), (2, 2), (2, 9)]
    sums = [ref.backward_reduce(dy[a:b], x[a:b], mean, invstd, axis=axis) for a, b in bounds]
    sum_dy = sum(s[0] for s in sums)
    sum_dy_xhat = sum(s[1] for s in sums)
    np.testing.assert_allclose(sum_dy, dbeta, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(sum_dy_xhat, dgamma, rtol=1e-13, atol=1e-13)
    count = x.size // shape[axis]
    parts = [
        ref.backward_elementwise(
            dy[a:b], x[a:b], mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis=axis
        )
        for a, b in bounds
    ]
    np.testing.assert_allclose(np.concatenate(parts, axis=0), dx, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------------
# running statistics
# ------------------------------------------------------------------------------------------


def test_update_running_torch_hand_numbers() -> None:
    new_mean, new_var = ref.update_running_torch([1.0, 0.0], [1.0, 3.0], [3.0, -1.0], [2.0, 6.0], 4)
    np.testing.assert_allclose(new_mean, [0.9 * 1.0 + 0.1 * 3.0, 0.1 * -1.0], rtol=1e-15)
    expected_var = [0.9 * 1.0 + 0.1 * 2.0 * 4 / 3, 0.9 * 3.0 + 0.1 * 6.0 * 4 / 3]
    np.testing.assert_allclose(new_var, expected_var, rtol=1e-15)
    assert new_mean.dtype == new_var.dtype == np.float64
    # other momentum
    m, v = ref.update_running_torch([2.0], [5.0], [4.0], [1.0], 2, momentum=0.25)
    np.testing.assert_allclose(m, [0.75 * 2.0 + 0.25 * 4.0], rtol=1e-15)
    np.testing.assert_allclose(v, [0.75 * 5.0 + 0.25 * 1.0 * 2 / 1], rtol=1e-15)
    with pytest.raises(ValueError):
        ref.update_running_torch([0.0], [1.0], [0.0], [0.0], 1)


def test_update_running_keras_hand_numbers() -> None:
    new_mean, new_var = ref.update_running_keras([1.0, 0.0], [1.0, 3.0], [3.0, -1.0], [2.0, 6.0])
    np.testing.assert_allclose(new_mean, [0.99 * 1.0 + 0.01 * 3.0, 0.01 * -1.0], rtol=1e-14)
    np.testing.assert_allclose(
        new_var, [0.99 * 1.0 + 0.01 * 2.0, 0.99 * 3.0 + 0.01 * 6.0], rtol=1e-14
    )
    m, v = ref.update_running_keras([2.0], [5.0], [4.0], [1.0], momentum=0.75)
    np.testing.assert_allclose(m, [0.75 * 2.0 + 0.25 * 4.0], rtol=1e-15)
    np.testing.assert_allclose(v, [0.75 * 5.0 + 0.25 * 1.0], rtol=1e-15)  # biased: no 2/1


def test_update_running_general_form() -> None:
    m, v = ref.update_running([1.0], [1.0], [3.0], [2.0], 4, 0.1, unbiased=True)
    np.testing.assert_allclose(m, [1.2], rtol=1e-15)
    np.testing.assert_allclose(v, [0.9 + 0.8 / 3.0], rtol=1e-15)
    m, v = ref.update_running([1.0], [1.0], [3.0], [2.0], 4, 0.1, unbiased=False)
    np.testing.assert_allclose(m, [1.2], rtol=1e-15)
    np.testing.assert_allclose(v, [1.1], rtol=1e-15)
    # Keras momentum k is the general form's 1 - k.
    km, kv = ref.update_running_keras([1.0], [1.0], [3.0], [2.0], momentum=0.9)
    np.testing.assert_allclose(km, m, rtol=1e-15)
    np.testing.assert_allclose(kv, v, rtol=1e-15)


def test_update_running_torch_cumulative_average_via_momentum() -> None:
    # PyTorch's momentum=None: the caller passes 1/num_batches_tracked, which makes the running
    # statistics the plain average of the batch statistics (the initial values drop out).
    batch_means = [np.array([1.0, -2.0]), np.array([4.0, 0.5]), np.array([-0.5, 3.0])]
    batch_vars = [np.array([1.0, 2.0]), np.array([0.5, 4.0]), np.array([3.0, 1.0])]
    count = 5
    rm, rv = np.zeros(2), np.ones(2)
    for i in range(len(batch_means)):
        k = i + 1
        rm, rv = ref.update_running_torch(
            rm, rv, batch_means[i], batch_vars[i], count, momentum=1.0 / k
        )
    np.testing.assert_allclose(rm, np.mean(batch_means, axis=0), rtol=1e-14)
    np.testing.assert_allclose(rv, np.mean(batch_vars, axis=0) * count / (count - 1), rtol=1e-14)


# ------------------------------------------------------------------------------------------
# PyTorch cross-check (skipped when torch is not installed)
# ------------------------------------------------------------------------------------------

TORCH_CASES = [((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1), ((8, 3), 1), ((4, 3, 7), 1)]
TORCH_IDS = ["NCHW", "NHWC", "NC", "NCL"]


@pytest.mark.parametrize(("shape", "axis"), TORCH_CASES, ids=TORCH_IDS)
def test_against_torch_batch_norm(shape: tuple[int, ...], axis: int) -> None:
    torch = pytest.importorskip("torch")
    fn = torch.nn.functional
    eps, momentum = 1e-5, 0.1
    x = _data(shape, axis, seed=21)
    gamma, beta = _affine(shape, axis, seed=22)
    g_out = np.random.default_rng(23).standard_normal(shape)
    rng = np.random.default_rng(24)
    run_mean0, run_var0 = rng.standard_normal(shape[axis]), rng.uniform(0.5, 2.0, shape[axis])

    def to_ncx(a: np.ndarray) -> np.ndarray:  # torch wants channels at dim 1
        return np.moveaxis(a, axis, 1)

    tx = torch.tensor(to_ncx(x), dtype=torch.float64, requires_grad=True)
    tg = torch.tensor(gamma, dtype=torch.float64, requires_grad=True)
    tb = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    t_rm = torch.tensor(run_mean0, dtype=torch.float64)
    t_rv = torch.tensor(run_var0, dtype=torch.float64)
    ty = fn.batch_norm(tx, t_rm, t_rv, tg, tb, training=True, momentum=momentum, eps=eps)
    (ty * torch.tensor(to_ncx(g_out), dtype=torch.float64)).sum().backward()

    y, mean, invstd = ref.forward_train(x, gamma, beta, eps=eps, axis=axis)
    dx, dgamma, dbeta = ref.backward_train(g_out, x, mean, invstd, gamma, axis=axis)
    count, _, var = ref.batch_stats(x, axis=axis)
    rm, rv = ref.update_running_torch(run_mean0, run_var0, mean, var, count, momentum)

    np.testing.assert_allclose(to_ncx(y), ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_ncx(dx), tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, tg.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dbeta, tb.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm, t_rm.numpy(), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(rv, t_rv.numpy(), rtol=1e-13, atol=1e-14)

    # Inference with the updated running statistics.
    ty_inf = fn.batch_norm(
        torch.tensor(to_ncx(x), dtype=torch.float64),
        t_rm,
        t_rv,
        tg.detach(),
        tb.detach(),
        training=False,
        eps=eps,
    )
    y_inf = ref.forward_infer(x, rm, rv, gamma, beta, eps=eps, axis=axis)
    np.testing.assert_allclose(to_ncx(y_inf), ty_inf.numpy(), rtol=1e-12, atol=1e-12)


def test_against_torch_cumulative_momentum_none() -> None:
    torch = pytest.importorskip("torch")
    bn = torch.nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    bn.train()
    rm, rv = np.zeros(3), np.ones(3)
    for k in range(1, 4):
        x = _data((2, 3, 4, 5), 1, seed=30 + k)
        with torch.no_grad():
            bn(torch.tensor(x, dtype=torch.float64))
        count, mean, var = ref.batch_stats(x, axis=1)
        rm, rv = ref.update_running_torch(rm, rv, mean, var, count, momentum=1.0 / k)
    assert int(bn.num_batches_tracked) == 3
    np.testing.assert_allclose(rm, bn.running_mean.numpy(), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(rv, bn.running_var.numpy(), rtol=1e-13, atol=1e-14)
