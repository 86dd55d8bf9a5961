"""Backward kernels against the float64 reference and against finite differences:
batch_norm_backward (training and frozen), backward_reduce, backward_elementwise; every layout and
dtype.  Tolerances are explained in conftest.py (TOL, STATS_TOL)."""

from __future__ import annotations

import edge_data
import numpy as np
import pytest
from conftest import (
    DTYPE_IDS,
    DTYPES,
    STATS_TOL,
    Layout,
    assert_close,
    channel_abs_sum,
    layout_params,
    make_case,
    tol,
    xhat_of,
)

import bnkernel as bk
from bnkernel import reference as ref

AFFINE = pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])


def check_param_grads(case, dgamma, dbeta, dgamma_ref, dbeta_ref, mean, invstd):
    """dgamma, dbeta: sums over m values, rounded once to x's dtype.  Their absolute error is
    relative to the summed magnitudes sum|dy * xhat| and sum|dy| (what a sum's error scales
    with)."""
    for name, a in (("dgamma", dgamma), ("dbeta", dbeta)):
        assert a.dtype == case.dtype and a.shape == (case.C,), name
    scale_g = channel_abs_sum(case.dy * xhat_of(case.x, mean, invstd, case.layout.ax), case.axis)
    scale_b = channel_abs_sum(case.dy, case.axis)
    assert_close(dgamma, dgamma_ref, case.tol, scale=float(scale_g.max()), what="dgamma")
    assert_close(dbeta, dbeta_ref, case.tol, scale=float(scale_b.max()), what="dbeta")


# ---- training backward --------------------------------------------------------------------------


@AFFINE
def test_backward_train_matches_reference(case, affine):
    g, b = (case.gamma, case.beta) if affine else (None, None)
    _, mean, invstd = bk.batch_norm_forward(case.x, g, b, axis=case.axis)
    x_before, dy_before = case.x.copy(), case.dy.copy()
    dx, dgamma, dbeta = bk.batch_norm_backward(case.dy, case.x, mean, invstd, g, axis=case.axis)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward_train(case.dy, case.x, mean, invstd, g, case.axis)
    assert dx.dtype == case.dtype and dx.shape == case.x.shape
    assert_close(dx, dx_ref, case.tol, what="dx")
    check_param_grads(case, dgamma, dbeta, dgamma_ref, dbeta_ref, mean, invstd)
    np.testing.assert_array_equal(case.x, x_before)
    np.testing.assert_array_equal(case.dy, dy_before)


@AFFINE
def test_backward_frozen_matches_reference(case, affine):
    g = case.gamma if affine else None
    _, mean, invstd = bk.batch_norm_forward(
        case.x,
        g,
        running_mean=case.running_mean,
        running_var=case.running_var,
        training=False,
        axis=case.axis,
    )
    dx, dgamma, dbeta = bk.batch_norm_backward(
        case.dy, case.x, mean, invstd, g, training=False, axis=case.axis
    )
    dx_ref, dgamma_ref, dbeta_ref = ref.backward_frozen(case.dy, case.x, mean, invstd, g, case.axis)
    assert dx.dtype == case.dtype and dx.shape == case.x.shape
    assert_close(dx, dx_ref, case.tol, what="dx")
    check_param_grads(case, dgamma, dbeta, dgamma_ref, dbeta_ref, mean, invstd)


@pytest.mark.parametrize("stats_dtype", [np.float64, np.float32], ids=["stats-f64", "stats-f32"])
def test_backward_accepts_float32_saved_stats(dtype, stats_dtype):
    """mean / invstd may be given as float32 (they are used as float64)."""
    case = make_case(Layout("NCHW", (4, 5, 6, 3), 1), dtype)
    rng = np.random.default_rng(3)
    mean = rng.uniform(-1, 1, case.C).astype(stats_dtype)
    invstd = rng.uniform(0.5, 2, case.C).astype(stats_dtype)
    for training, reference in ((True, ref.backward_train), (False, ref.backward_frozen)):
        got = bk.batch_norm_backward(case.dy, case.x, mean, invstd, case.gamma, training=training)
        want = reference(case.dy, case.x, mean, invstd, case.gamma, 1)
        assert_close(got[0], want[0], case.tol, what=f"dx training={training}")
        scale = channel_abs_sum(case.dy * xhat_of(case.x, mean, invstd, 1), 1).max()
        assert_close(got[1], want[1], case.tol, scale=scale, what="dgamma")


# ---- backward_reduce, backward_elementwise ------------------------------------------------------


def test_backward_reduce_matches_reference(case):
    _, mean, invstd = bk.batch_norm_forward(case.x, axis=case.axis)
    sum_dy, sum_dy_xhat = bk.backward_reduce(case.dy, case.x, mean, invstd, axis=case.axis)
    sum_dy_ref, sum_dy_xhat_ref = ref.backward_reduce(case.dy, case.x, mean, invstd, case.axis)
    for name, a in (("sum_dy", sum_dy), ("sum_dy_xhat", sum_dy_xhat)):
        assert a.dtype == np.float64 and a.shape == (case.C,), name
    # float64 sums of exactly representable products: float64 accuracy relative to sum|term|
    scale_b = channel_abs_sum(case.dy, case.axis).max()
    scale_g = channel_abs_sum(
        case.dy * xhat_of(case.x, mean, invstd, case.layout.ax), case.axis
    ).max()
    assert_close(sum_dy, sum_dy_ref, STATS_TOL, scale=scale_b, what="sum_dy")
    assert_close(sum_dy_xhat, sum_dy_xhat_ref, STATS_TOL, scale=scale_g, what="sum_dy_xhat")


@pytest.mark.parametrize("count_factor", [1, 3], ids=["local-count", "global-count-3x"])
@AFFINE
def test_backward_elementwise_matches_reference(case, affine, count_factor):
    """With count = the local m this is the training dx; with a larger global count (data-parallel)
    the formula is applied as documented."""
    g = case.gamma if affine else None
    _, mean, invstd = bk.batch_norm_forward(case.x, axis=case.axis)
    rng = np.random.default_rng(4)
    sum_dy, sum_dy_xhat = ref.backward_reduce(case.dy, case.x, mean, invstd, case.axis)
    sum_dy = sum_dy * count_factor + rng.standard_normal(case.C) * (count_factor - 1)
    sum_dy_xhat = sum_dy_xhat * count_factor
    count = case.m * count_factor
    dx = bk.backward_elementwise(
        case.dy, case.x, mean, invstd, g, sum_dy, sum_dy_xhat, count, axis=case.axis
    )
    dx_ref = ref.backward_elementwise(
        case.dy, case.x, mean, invstd, g, sum_dy, sum_dy_xhat, count, case.axis
    )
    assert dx.dtype == case.dtype and dx.shape == case.x.shape
    assert_close(dx, dx_ref, case.tol, what="dx")


# ---- hand-computed cases ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_hand_computed(dtype):
    # two values per channel with eps = 0: y = +-gamma whatever x is, so dL/dx = 0 exactly
    x = np.array([[1.0, 10.0], [3.0, 14.0]], dtype=dtype)
    dy = np.array([[1.0, -2.0], [0.0, 5.0]], dtype=dtype)
    gamma = np.array([2.0, 3.0], dtype=dtype)
    _, mean, invstd = bk.batch_norm_forward(x, gamma, eps=0.0)
    dx, dgamma, dbeta = bk.batch_norm_backward(dy, x, mean, invstd, gamma)
    np.testing.assert_array_equal(dx, np.zeros_like(x))
    np.testing.assert_array_equal(dbeta, [1.0, 3.0])
    np.testing.assert_array_equal(dgamma, [-1.0, 7.0])  # xhat = [-1, 1] per channel
    # frozen: dx = dy * gamma * invstd; running var 3, eps 1 -> invstd 0.5
    _, m, s = bk.batch_norm_forward(
        x,
        running_mean=np.zeros(2, dtype),
        running_var=np.full(2, 3.0, dtype),
        training=False,
        eps=1.0,
    )
    dx, dgamma, dbeta = bk.batch_norm_backward(dy, x, m, s, gamma, training=False)
    np.testing.assert_array_equal(dx, dy * gamma * 0.5)
    np.testing.assert_array_equal(dbeta, [1.0, 3.0])
    np.testing.assert_array_equal(dgamma, [0.5, -10.0 + 35.0])  # sum dy * x / 2
    # split phases on the same data
    sdy, sdyx = bk.backward_reduce(dy, x, m, s)
    np.testing.assert_array_equal(sdy, [1.0, 3.0])
    np.testing.assert_array_equal(sdyx, [0.5, 25.0])
    dx = bk.backward_elementwise(
        dy, x, np.zeros(2), np.ones(2), None, np.array([2.0, 4.0]), np.zeros(2), 2
    )
    np.testing.assert_array_equal(dx, dy - np.array([1.0, 2.0], dtype=dtype))


# ---- ill-conditioned data -----------------------------------------------------------------------


@edge_data.ILL_CONDITIONED
def test_backward_ill_conditioned_float32(shape, axis, rng):
    """x = 1e4 + 1e-2 * randn (float32): xhat must come from (x - mean) in double, not from a folded
    x * a + b.  dx, dgamma, dbeta at the float32 rounding floor: within one ulp of the reference
    elementwise (the double-side error is ~1e-12 * |x| * invstd^2 ~ 1e-8, far below an ulp of
    |dx| ~ 1e2), and within two ulps of the largest |value|."""
    x = edge_data.ill_conditioned_float32(shape, rng)
    C = shape[axis]
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    _, mean, invstd = bk.batch_norm_forward(x, gamma, axis=axis)
    for training, reference in ((True, ref.backward_train), (False, ref.backward_frozen)):
        dx, dgamma, dbeta = bk.batch_norm_backward(
            dy, x, mean, invstd, gamma, training=training, axis=axis
        )
        dx_ref, dgamma_ref, dbeta_ref = reference(dy, x, mean, invstd, gamma, axis)
        for name, got, want in (
            ("dx", dx, dx_ref),
            ("dgamma", dgamma, dgamma_ref),
            ("dbeta", dbeta, dbeta_ref),
        ):
            edge_data.assert_float32_rounding_floor(got, want, 1e-7, what=(name, training))


# ---- finite differences -------------------------------------------------------------------------

FD_LAYOUTS = [
    Layout("NC", (6, 3), 1),
    Layout("NCL", (3, 2, 4), 1),
    Layout("NCHW", (2, 3, 2, 2), 1),
    Layout("NHWC", (2, 2, 2, 3), -1),
    Layout("axis2-of-4d", (2, 2, 3, 2), 2),
    Layout("NC-C1", (5, 1), 1),
    Layout("NCHW-N2", (2, 2, 1, 2), 1),
]

# Central differences with h = 1e-6 on L = sum(y * G) in float64: truncation O(h^2 * L''') ~ 1e-12,
# rounding ~ 2**-53 * |L| / h ~ 1e-9 for |L| ~ 10; 1e-6 (relative and absolute on O(1) gradients)
# is well above both and far below any formula error (a missing term is O(1)).
FD_TOL = 1e-6


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("layout", layout_params(FD_LAYOUTS))
def test_gradients_match_finite_differences(layout, training, affine):
    case = make_case(layout, np.float64)
    G = case.dy  # L = sum(y * G), so dL/dy = G
    g = case.gamma if affine else None
    b = case.beta if affine else None
    stats = {} if training else {"running_mean": case.running_mean, "running_var": case.running_var}

    def loss(x=case.x, gamma=g, beta=b):
        y, _, _ = bk.batch_norm_forward(x, gamma, beta, training=training, axis=case.axis, **stats)
        return float(np.sum(y * G))

    _, mean, invstd = bk.batch_norm_forward(
        case.x, g, b, training=training, axis=case.axis, **stats
    )
    dx, dgamma, dbeta = bk.batch_norm_backward(
        G, case.x, mean, invstd, g, training=training, axis=case.axis
    )
    num_dx = ref.numerical_gradient(lambda x: loss(x=x), case.x)
    np.testing.assert_allclose(dx, num_dx, rtol=FD_TOL, atol=FD_TOL)
    if affine:
        num_dgamma = ref.numerical_gradient(lambda gm: loss(gamma=gm), case.gamma)
        num_dbeta = ref.numerical_gradient(lambda bt: loss(beta=bt), case.beta)
        np.testing.assert_allclose(dgamma, num_dgamma, rtol=FD_TOL, atol=FD_TOL)
        np.testing.assert_allclose(dbeta, num_dbeta, rtol=FD_TOL, atol=FD_TOL)
    else:
        # gamma = None: the gradients a gamma of ones and a beta of zeros would get
        ones = np.ones(case.C)
        num_dgamma = ref.numerical_gradient(lambda gm: loss(gamma=gm, beta=None), ones)
        np.testing.assert_allclose(dgamma, num_dgamma, rtol=FD_TOL, atol=FD_TOL)
    # the split phases give the same gradient (training)
    if training:
        sdy, sdyx = bk.backward_reduce(G, case.x, mean, invstd, axis=case.axis)
        dx2 = bk.backward_elementwise(G, case.x, mean, invstd, g, sdy, sdyx, case.m, axis=case.axis)
        np.testing.assert_allclose(dx2, num_dx, rtol=FD_TOL, atol=FD_TOL)


# ---- non-contiguous inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "which", ["transposed", "sliced", "negative-stride", "channels-last-view", "dy-only", "mt"]
)
def test_backward_noncontiguous(dtype, which):
    rng = np.random.default_rng(8)
    if which == "mt":
        base = rng.standard_normal((2, 64, 3, 32, 32)).astype(dtype)
        base_dy = rng.standard_normal((64, 3, 32, 32)).astype(dtype)
        x, dy, axis = base[1, ::-1], base_dy[:, ::-1], 1
    else:
        base = (rng.standard_normal((6, 5, 8, 7)) * 2 + 1).astype(dtype)
        base_dy = rng.standard_normal((6, 5, 8, 7)).astype(dtype)
        x, dy, axis = {
            "transposed": (base.T, base_dy.T, 1),
            "sliced": (base[:, :, ::2, 1:], base_dy[:, :, 1::2, :-1], 1),
            "negative-stride": (base[::-1, :, :, ::-1], base_dy[:, :, ::-1], 1),
            "channels-last-view": (np.moveaxis(base, 1, -1), np.moveaxis(base_dy, 1, -1), -1),
            "dy-only": (base, base_dy[::-1], 1),
        }[which]
    assert not dy.flags.c_contiguous
    assert x.flags.c_contiguous == (which == "dy-only")
    C = x.shape[axis]
    gamma = rng.uniform(0.5, 1.5, 2 * C).astype(dtype)[1::2]
    _, mean, invstd = bk.batch_norm_forward(x, gamma, axis=axis)
    t = tol(dtype)
    for training, reference in ((True, ref.backward_train), (False, ref.backward_frozen)):
        dx, dgamma, dbeta = bk.batch_norm_backward(
            dy, x, mean, invstd, gamma, training=training, axis=axis
        )
        dx_ref, dgamma_ref, dbeta_ref = reference(dy, x, mean, invstd, gamma, axis)
        assert_close(dx, dx_ref, t, what="dx")
        scale = channel_abs_sum(dy * xhat_of(x, mean, invstd, axis % x.ndim), axis).max()
        assert_close(dgamma, dgamma_ref, t, scale=scale, what="dgamma")
        assert_close(dbeta, dbeta_ref, t, scale=channel_abs_sum(dy, axis).max(), what="dbeta")
    sdy, sdyx = bk.backward_reduce(dy, x, mean, invstd, axis=axis)
    sdy_ref, sdyx_ref = ref.backward_reduce(dy, x, mean, invstd, axis)
    assert_close(sdy, sdy_ref, STATS_TOL, scale=channel_abs_sum(dy, axis).max())
    scale = channel_abs_sum(dy * xhat_of(x, mean, invstd, axis), axis).max()
    assert_close(sdyx, sdyx_ref, STATS_TOL, scale=scale)
    count = x.size // C
    assert_close(
        bk.backward_elementwise(dy, x, mean, invstd, gamma, sdy, sdyx, count, axis=axis),
        ref.backward_elementwise(dy, x, mean, invstd, gamma, sdy, sdyx, count, axis),
        t,
    )


# ---- NaN and Inf --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["dy", "x"])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis", edge_data.NONFINITE_SHAPES)
def test_nonfinite_gradient_poisons_only_its_channel(shape, axis, dtype, bad, where):
    case = make_case(Layout("nonfinite", shape, axis), dtype)
    _, mean, invstd = bk.batch_norm_forward(case.x, case.gamma, axis=axis)
    arrays = {"x": case.x, "dy": case.dy}
    arrays[where] = edge_data.with_bad_element(arrays[where], axis, bad)
    others = [c for c in range(shape[axis]) if c != 1]
    for training in (True, False):
        dx, dgamma, dbeta = bk.batch_norm_backward(
            arrays["dy"], arrays["x"], mean, invstd, case.gamma, training=training, axis=axis
        )
        dx0, dgamma0, dbeta0 = bk.batch_norm_backward(
            case.dy, case.x, mean, invstd, case.gamma, training=training, axis=axis
        )
        assert not np.isfinite(dgamma[1])
        if where == "dy":
            assert not np.isfinite(dbeta[1])
        if training:  # every dx of the channel goes through its non-finite sums
            assert not np.any(np.isfinite(np.take(dx, 1, axis=axis)))
        np.testing.assert_array_equal(
            np.take(dx, others, axis=axis), np.take(dx0, others, axis=axis)
        )
        np.testing.assert_array_equal(dgamma[others], dgamma0[others])
        np.testing.assert_array_equal(dbeta[others], dbeta0[others])
    sdy, sdyx = bk.backward_reduce(arrays["dy"], arrays["x"], mean, invstd, axis=axis)
    assert not np.isfinite(sdyx[1]) and np.all(np.isfinite(sdyx[others]))
    assert np.isfinite(sdy[1]) == (where == "x") and np.all(np.isfinite(sdy[others]))
