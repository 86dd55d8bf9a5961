"""Forward kernels against the float64 reference: batch_norm_forward (training and inference),
normalize, channel_stats, invstd_from_stats, update_running_stats; every layout and dtype.

Tolerances are explained in conftest.py (TOL, STATS_TOL)."""

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
    assert_update_matches_fused,
    forward_inference,
    layout_params,
    make_case,
    max_abs,
    tol,
)

import bnkernel as bk
from bnkernel import reference as ref

AFFINE = pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])


def check_saved_stats(case, mean, invstd, ref_mean, ref_invstd):
    """The saved statistics: float64 of shape (C,), equal to the reference to float64 accuracy."""
    for name, a in (("mean", mean), ("invstd", invstd)):
        assert a.dtype == np.float64, name
        assert a.shape == (case.C,), name
    # mean: error relative to the data's magnitude; invstd: relative
    assert_close(mean, ref_mean, STATS_TOL, scale=max_abs(case.x), what="mean")
    assert_close(invstd, ref_invstd, STATS_TOL, what="invstd")


# ---- training forward ---------------------------------------------------------------------------


@AFFINE
def test_forward_train_matches_reference(case, affine):
    g, b = (case.gamma, case.beta) if affine else (None, None)
    x_before = case.x.copy()
    y, mean, invstd = bk.batch_norm_forward(case.x, g, b, axis=case.axis)
    y_ref, mean_ref, invstd_ref = ref.forward_train(case.x, g, b, 1e-5, case.axis)
    assert y.dtype == case.dtype and y.shape == case.x.shape
    assert_close(y, y_ref, case.tol, what="y")
    check_saved_stats(case, mean, invstd, mean_ref, invstd_ref)
    np.testing.assert_array_equal(case.x, x_before)  # input untouched


@pytest.mark.parametrize("eps", [1e-3, 0.5], ids=["eps1e-3", "eps0.5"])
@pytest.mark.parametrize(
    "layout", layout_params([Layout("NCHW", (4, 5, 6, 3), 1), Layout("NHWC", (4, 6, 3, 5), -1)])
)
def test_forward_train_eps(layout, dtype, eps):
    case = make_case(layout, dtype)
    y, mean, invstd = bk.batch_norm_forward(case.x, case.gamma, case.beta, eps=eps, axis=case.axis)
    y_ref, mean_ref, invstd_ref = ref.forward_train(case.x, case.gamma, case.beta, eps, case.axis)
    assert_close(y, y_ref, case.tol, what="y")
    check_saved_stats(case, mean, invstd, mean_ref, invstd_ref)


def test_forward_train_updates_running_stats_torch_convention(case):
    rm, rv = case.running_mean.copy(), case.running_var.copy()
    rm_id, rv_id = id(rm), id(rv)
    y, mean, invstd = bk.batch_norm_forward(
        case.x,
        case.gamma,
        case.beta,
        running_mean=rm,
        running_var=rv,
        momentum=0.1,
        axis=case.axis,
    )
    count, bmean, bvar = ref.batch_stats(case.x, case.axis)
    rm_ref, rv_ref = ref.update_running_torch(
        case.running_mean, case.running_var, bmean, bvar, count, momentum=0.1
    )
    assert id(rm) == rm_id and id(rv) == rv_id and rm.dtype == case.dtype
    # the running statistics are computed in double and rounded once to x's dtype
    assert_close(rm, rm_ref, case.tol, what="running_mean")
    assert_close(rv, rv_ref, case.tol, what="running_var")
    # tracking running statistics does not change the output
    y2, mean2, invstd2 = bk.batch_norm_forward(case.x, case.gamma, case.beta, axis=case.axis)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(mean, mean2)
    np.testing.assert_array_equal(invstd, invstd2)


def test_forward_train_updates_running_stats_keras_convention(case):
    rm, rv = case.running_mean.copy(), case.running_var.copy()
    bk.batch_norm_forward(
        case.x,
        case.gamma,
        case.beta,
        running_mean=rm,
        running_var=rv,
        momentum=1 - 0.99,
        running_var_unbiased=False,
        eps=1e-3,
        axis=case.axis,
    )
    _, bmean, bvar = ref.batch_stats(case.x, case.axis)
    rm_ref, rv_ref = ref.update_running_keras(
        case.running_mean, case.running_var, bmean, bvar, momentum=0.99
    )
    assert_close(rm, rm_ref, case.tol, what="moving_mean")
    assert_close(rv, rv_ref, case.tol, what="moving_variance")


@pytest.mark.parametrize("which", ["mean-only", "var-only"])
def test_forward_train_refuses_one_running_stat(dtype, which):
    """Training updates both running statistics: one alone was silently updated alone before;
    now it is refused, naming the missing one, as inference does (the fast path declines it, the
    checked path raises), and nothing is written."""
    case = make_case(Layout("NCHW", (4, 5, 6, 3), 1), dtype)
    rm, rv = case.running_mean.copy(), case.running_var.copy()
    kwargs = {"running_mean": rm} if which == "mean-only" else {"running_var": rv}
    missing = "running_var" if which == "mean-only" else "running_mean"
    out = np.full_like(case.x, 7)
    with pytest.raises(ValueError, match=rf"^{missing}: required with "):
        bk.batch_norm_forward(case.x, axis=1, out=out, **kwargs)
    np.testing.assert_array_equal(rm, case.running_mean)
    np.testing.assert_array_equal(rv, case.running_var)
    assert (out == 7).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_running_update_momentum_edges(dtype):
    """momentum=0 keeps the running statistics bit for bit; momentum=1 replaces them by the batch
    statistics (rounded once to x's dtype)."""
    case = make_case(Layout("NHWC", (4, 6, 3, 5), -1), dtype)
    rm, rv = case.running_mean.copy(), case.running_var.copy()
    bk.batch_norm_forward(case.x, running_mean=rm, running_var=rv, momentum=0.0, axis=-1)
    np.testing.assert_array_equal(rm, case.running_mean)
    np.testing.assert_array_equal(rv, case.running_var)
    _, mean, _ = bk.batch_norm_forward(case.x, running_mean=rm, running_var=rv, momentum=1, axis=-1)
    count, m2 = bk.channel_stats(case.x, axis=-1)[::2]
    np.testing.assert_array_equal(rm, mean.astype(dtype))
    np.testing.assert_array_equal(rv, (m2 / (count - 1)).astype(dtype))


# ---- hand-computed cases ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_hand_computed(dtype):
    # channel 0: {1, 3} -> mean 2, var 1;  channel 1: {10, 14} -> mean 12, var 4
    x = np.array([[1.0, 10.0], [3.0, 14.0]], dtype=dtype)
    gamma = np.array([2.0, -1.0], dtype=dtype)
    beta = np.array([0.5, 1.0], dtype=dtype)
    y, mean, invstd = bk.batch_norm_forward(x, gamma, beta, eps=0.0)
    np.testing.assert_array_equal(mean, [2.0, 12.0])
    np.testing.assert_array_equal(invstd, [1.0, 0.5])
    np.testing.assert_array_equal(y, np.array([[-1.5, 2.0], [2.5, 0.0]], dtype=dtype))
    count, cmean, m2 = bk.channel_stats(x)
    assert count == 2 and isinstance(count, int)
    np.testing.assert_array_equal(cmean, [2.0, 12.0])
    np.testing.assert_array_equal(m2, [2.0, 8.0])
    # running: torch, momentum 0.5, from (0, 1): mean 0.5 * batch, var 0.5 + 0.5 * M2 / (m - 1)
    rm, rv = np.zeros(2, dtype), np.ones(2, dtype)
    bk.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=0.5, eps=0.0)
    np.testing.assert_array_equal(rm, [1.0, 6.0])
    np.testing.assert_array_equal(rv, [1.5, 4.5])
    # inference with running mean 1, var 3, eps 1: y = (x - 1) / 2
    yi, mi, si = bk.batch_norm_forward(
        x, running_mean=np.ones(2, dtype), running_var=np.full(2, 3.0, dtype), training=False, eps=1
    )
    np.testing.assert_array_equal(yi, (x - 1) / 2)
    np.testing.assert_array_equal(mi, [1.0, 1.0])
    np.testing.assert_array_equal(si, [0.5, 0.5])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape,axis",
    [((8, 3, 4, 4), 1), ((8, 4, 4, 3), -1), ((4096, 3), 1), ((64, 3, 32, 32), 1)],
    ids=["NCHW", "NHWC", "NC-4096", "mt-NCHW"],
)
def test_constant_channel_gives_beta(dtype, shape, axis):
    """A channel whose values are all equal has variance 0: y = beta exactly, invstd 1/sqrt(eps)."""
    case = make_case(Layout("const", shape, axis), dtype)
    x = case.x.copy()
    ch = [slice(None)] * x.ndim
    ch[axis] = 1
    x[tuple(ch)] = 3.25  # exact in both dtypes, and so are its sums
    y, mean, invstd = bk.batch_norm_forward(x, case.gamma, case.beta, axis=axis)
    assert mean[1] == 3.25
    assert invstd[1] == 1.0 / np.sqrt(1e-5)
    np.testing.assert_array_equal(y[tuple(ch)], np.full(y[tuple(ch)].shape, case.beta[1]))


# ---- ill-conditioned data -----------------------------------------------------------------------


@edge_data.ILL_CONDITIONED
def test_forward_ill_conditioned_float32(shape, axis, rng):
    """x = 1e4 + 1e-2 * randn in float32: mean^2 / var ~ 1e12, so E[x^2] - E[x]^2, or sums in
    float32, lose every digit.  y must sit at the float32 rounding floor: within one ulp of the
    float64 reference computed from the same float32 x (the kernel rounds a double result once;
    the double-side error, ~1e-12 * |x| * invstd ~ 1e-10, is far below an ulp of |y| >= 2**-10)."""
    x = edge_data.ill_conditioned_float32(shape, rng)
    C = shape[axis]
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    y, mean, invstd = bk.batch_norm_forward(x, gamma, beta, axis=axis)
    y_ref, mean_ref, invstd_ref = ref.forward_train(x, gamma, beta, 1e-5, axis)
    edge_data.assert_float32_rounding_floor(y, y_ref, 1e-9, what="y")
    assert_close(mean, mean_ref, STATS_TOL, scale=1e4)
    assert_close(invstd, invstd_ref, STATS_TOL)  # the corrected two-pass keeps M2 exact here
    # the variance really is the generated ~1e-4 (plus float32 quantization), not eaten by
    # cancellation (E[x^2] - E[x]^2 in double would be off by ~1e-8 * 1e8 = 1)
    var = 1 / invstd**2 - 1e-5
    assert np.all((var > 0.5e-4) & (var < 2e-4)), var


# ---- inference forward --------------------------------------------------------------------------


@AFFINE
def test_forward_infer_matches_reference(case, affine):
    g, b = (case.gamma, case.beta) if affine else (None, None)
    rm, rv = case.running_mean.copy(), case.running_var.copy()
    y, mean, invstd = bk.batch_norm_forward(
        case.x, g, b, running_mean=rm, running_var=rv, training=False, eps=1e-3, axis=case.axis
    )
    y_ref = ref.forward_infer(case.x, rm, rv, g, b, 1e-3, case.axis)
    assert y.dtype == case.dtype and y.shape == case.x.shape
    assert_close(y, y_ref, case.tol, what="y")
    assert mean.dtype == np.float64 and invstd.dtype == np.float64
    np.testing.assert_array_equal(mean, rm.astype(np.float64))
    assert_close(invstd, 1.0 / np.sqrt(rv.astype(np.float64) + 1e-3), STATS_TOL, what="invstd")
    # the running statistics are read, never written, in inference
    np.testing.assert_array_equal(rm, case.running_mean)
    np.testing.assert_array_equal(rv, case.running_var)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape,axis",
    [((1, 5), 1), ((1, 5, 1, 1), 1), ((1, 1, 1, 5), -1)],
    ids=["1xC", "1xCx1x1", "1x1x1xC"],
)
def test_forward_infer_single_value_per_channel(dtype, shape, axis):
    """One value per channel is fine in inference (it is an error only in training)."""
    case = make_case(Layout("single", shape, axis), dtype)
    y, _, _ = forward_inference(case)
    y_ref = ref.forward_infer(
        case.x, case.running_mean, case.running_var, case.gamma, case.beta, 1e-5, axis
    )
    assert_close(y, y_ref, case.tol)


# ---- normalize ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stats_dtype", [np.float64, np.float32], ids=["stats-f64", "stats-f32"])
@AFFINE
def test_normalize_matches_reference(case, affine, stats_dtype):
    rng = np.random.default_rng(1)
    mean = rng.uniform(-3, 3, case.C).astype(stats_dtype)
    invstd = rng.uniform(0.3, 2.0, case.C).astype(stats_dtype)
    g, b = (case.gamma, case.beta) if affine else (None, None)
    y = bk.normalize(case.x, mean, invstd, g, b, axis=case.axis)
    assert y.dtype == case.dtype and y.shape == case.x.shape
    assert_close(y, ref.normalize(case.x, mean, invstd, g, b, case.axis), case.tol)


# ---- channel_stats, invstd_from_stats -----------------------------------------------------------


def test_channel_stats_matches_reference(case):
    count, mean, m2 = bk.channel_stats(case.x, axis=case.axis)
    count_ref, mean_ref, m2_ref = ref.channel_stats(case.x, case.axis)
    assert count == count_ref == case.m
    assert type(count) is int
    assert mean.dtype == np.float64 and m2.dtype == np.float64
    assert mean.shape == (case.C,) and m2.shape == (case.C,)
    assert_close(mean, mean_ref, STATS_TOL, scale=max_abs(case.x), what="mean")
    assert_close(m2, m2_ref, STATS_TOL, what="M2")


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.0])
def test_invstd_from_stats_matches_reference(case, eps):
    count, _, m2 = bk.channel_stats(case.x, axis=case.axis)
    invstd = bk.invstd_from_stats(count, m2, eps)
    _, _, var = ref.batch_stats(case.x, case.axis)
    assert invstd.dtype == np.float64 and invstd.shape == (case.C,)
    assert_close(invstd, 1.0 / np.sqrt(var + eps), STATS_TOL)


def test_invstd_from_stats_hand_computed():
    np.testing.assert_array_equal(
        bk.invstd_from_stats(4, np.array([4.0, 16.0, 0.0]), 0.25),
        [1 / np.sqrt(1.25), 1 / np.sqrt(4.25), 2.0],
    )
    np.testing.assert_array_equal(bk.invstd_from_stats(np.int64(2), [8.0], eps=0.0), [0.5])


# ---- update_running_stats -----------------------------------------------------------------------


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_update_running_stats_matches_reference(case, convention):
    count, mean, m2 = bk.channel_stats(case.x, axis=case.axis)
    rm, rv = case.running_mean.copy(), case.running_var.copy()
    _, bmean, bvar = ref.batch_stats(case.x, case.axis)
    if convention == "torch":
        bk.update_running_stats(rm, rv, count, mean, m2, momentum=0.1, unbiased=True)
        rm_ref, rv_ref = ref.update_running_torch(
            case.running_mean, case.running_var, bmean, bvar, count, 0.1
        )
    else:
        bk.update_running_stats(rm, rv, count, mean, m2, momentum=1 - 0.99, unbiased=False)
        rm_ref, rv_ref = ref.update_running_keras(
            case.running_mean, case.running_var, bmean, bvar, 0.99
        )
    assert rm.dtype == case.dtype and rv.dtype == case.dtype
    assert_close(rm, rm_ref, case.tol, what="running_mean")
    assert_close(rv, rv_ref, case.tol, what="running_var")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_update_running_stats_equals_fused_update(dtype, unbiased):
    """The split-phase update is the fused forward's update (same float64 formula)."""
    case = make_case(Layout("NHWC", (4, 6, 3, 5), -1), dtype)
    stats = bk.channel_stats(case.x, axis=-1)
    assert_update_matches_fused(case, stats, momentum=0.3, unbiased=unbiased)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_update_running_stats_one_buffer(dtype):
    count, mean, m2 = 5, np.array([1.0, 2.0]), np.array([4.0, 8.0])
    rm = np.zeros(2, dtype)
    bk.update_running_stats(rm, None, count, mean, m2, momentum=0.5)
    np.testing.assert_array_equal(rm, [0.5, 1.0])
    rv = np.ones(2, dtype)
    bk.update_running_stats(None, rv, count, mean, m2, momentum=0.5)
    np.testing.assert_array_equal(rv, [1.0, 1.5])  # 0.5 + 0.5 * M2 / 4
    bk.update_running_stats(None, rv, count, mean, m2, momentum=0.5, unbiased=False)
    np.testing.assert_allclose(rv, [0.9, 1.55], rtol=tol(dtype))  # 0.5 * rv + 0.5 * M2 / 5


# ---- non-contiguous inputs ----------------------------------------------------------------------


def _noncontiguous_views(dtype):
    rng = np.random.default_rng(5)
    base4 = rng.standard_normal((6, 5, 8, 7)) * 2 + 1
    yield "transposed-NCHW", np.asarray(base4.T.astype(dtype)), 1  # (7, 8, 5, 6), F-order
    yield "sliced", base4.astype(dtype)[:, :, ::2, 1:], 1
    yield "negative-stride", base4.astype(dtype)[::-1, :, :, ::-1], 1
    yield "moveaxis-to-channels-last", np.moveaxis(base4.astype(dtype), 1, -1), -1
    yield "channel-slice", base4.astype(dtype)[:, 1:4], 1
    big = rng.standard_normal((64, 3, 32, 32)).astype(dtype)
    yield "mt-negative-stride", big[::-1, ::-1], 1
    yield "NC-column-stride", (rng.standard_normal((300, 10)).astype(dtype))[:, ::2], 1


NONCONTIG = [
    pytest.param(dtype, i, id=f"{name}-{dtid}")
    for dtype, dtid in zip(DTYPES, DTYPE_IDS, strict=True)
    for i, (name, _, _) in enumerate(_noncontiguous_views(dtype))
]


def _view(dtype, i):
    return list(_noncontiguous_views(dtype))[i]


@pytest.mark.parametrize("dtype,i", NONCONTIG)
def test_noncontiguous_inputs(dtype, i):
    _, x, axis = _view(dtype, i)
    assert not x.flags.c_contiguous
    C = x.shape[axis]
    rng = np.random.default_rng(6)
    gamma_base = rng.uniform(0.5, 1.5, 2 * C).astype(dtype)
    gamma = gamma_base[::2]  # non-contiguous gamma too
    beta = rng.standard_normal(C).astype(dtype)
    t = tol(dtype)
    x_before = x.copy()
    y, mean, invstd = bk.batch_norm_forward(x, gamma, beta, axis=axis)
    y_ref, mean_ref, invstd_ref = ref.forward_train(x, gamma, beta, 1e-5, axis)
    assert_close(y, y_ref, t, what="y")
    assert_close(mean, mean_ref, STATS_TOL, scale=max_abs(x))
    assert_close(invstd, invstd_ref, STATS_TOL)
    count, cmean, m2 = bk.channel_stats(x, axis=axis)
    c_ref = ref.channel_stats(x, axis)
    assert count == c_ref[0]
    assert_close(cmean, c_ref[1], STATS_TOL, scale=max_abs(x))
    assert_close(m2, c_ref[2], STATS_TOL)
    assert_close(
        bk.normalize(x, mean, invstd, gamma, beta, axis=axis),
        ref.normalize(x, mean, invstd, gamma, beta, axis),
        t,
    )
    rm_base = rng.standard_normal(2 * C).astype(dtype)
    rv_base = rng.uniform(0.5, 2, 2 * C).astype(dtype)
    yi, _, _ = bk.batch_norm_forward(
        x,
        gamma,
        beta,
        running_mean=rm_base[::2],
        running_var=rv_base[1::2],
        training=False,
        axis=axis,
    )
    assert_close(yi, ref.forward_infer(x, rm_base[::2], rv_base[1::2], gamma, beta, 1e-5, axis), t)
    np.testing.assert_array_equal(x, x_before)


# ---- NaN and Inf --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape,axis", [*edge_data.NONFINITE_SHAPES, pytest.param((16384, 3), 1, id="mt-NC")]
)
def test_nonfinite_input_poisons_only_its_channel(shape, axis, dtype, bad):
    case = make_case(Layout("nonfinite", shape, axis), dtype)
    x = edge_data.with_bad_element(case.x, axis, bad)
    rm, rv = case.running_mean.copy(), case.running_var.copy()
    y, mean, invstd = bk.batch_norm_forward(
        x, case.gamma, case.beta, running_mean=rm, running_var=rv, axis=axis
    )
    rm0, rv0 = case.running_mean.copy(), case.running_var.copy()
    y0, mean0, invstd0 = bk.batch_norm_forward(
        case.x, case.gamma, case.beta, running_mean=rm0, running_var=rv0, axis=axis
    )
    ch1 = np.take(y, 1, axis=axis)
    assert np.all(np.isnan(ch1)), "every y of the poisoned channel is NaN"
    # (the mean of data holding +-inf may be +-inf or NaN; the variance is NaN either way)
    assert not np.isfinite(mean[1]) and np.isnan(invstd[1])
    assert not np.isfinite(rm[1]) and np.isnan(rv[1])
    others = [c for c in range(shape[axis]) if c != 1]
    # every other channel's arithmetic is independent of channel 1: bit-identical to clean data
    np.testing.assert_array_equal(np.take(y, others, axis=axis), np.take(y0, others, axis=axis))
    np.testing.assert_array_equal(mean[others], mean0[others])
    np.testing.assert_array_equal(invstd[others], invstd0[others])
    np.testing.assert_array_equal(rm[others], rm0[others])
    np.testing.assert_array_equal(rv[others], rv0[others])
    count, cmean, m2 = bk.channel_stats(x, axis=axis)
    assert count == x.size // shape[axis]
    assert not np.isfinite(cmean[1]) and np.isnan(m2[1])
    assert np.all(np.isfinite(cmean[others])) and np.all(np.isfinite(m2[others]))
    # inference with finite running statistics: only the bad element itself is non-finite
    yi, _, _ = bk.batch_norm_forward(
        x, running_mean=case.running_mean, running_var=case.running_var, training=False, axis=axis
    )
    bad_mask = ~np.isfinite(x)
    assert np.array_equal(~np.isfinite(yi), bad_mask)
