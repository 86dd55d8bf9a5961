"""Batch renormalization, ghost batch normalization, population statistics, the one-value policy and
in-place forwards: each against the float64 reference (:mod:`bnkernel.reference`), its special
cases against plain batch normalization, and its gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LAYOUTS, assert_close, assert_fd_grads, layout_params, random_arrays, tol

import bnkernel as bk
from bnkernel import reference as ref

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
SOME = [lay for lay in LAYOUTS if lay.name in (
    "NC", "NCHW", "NHWC", "NLC-C45", "NC-C100", "axis2-of-4d", "mt-NHWC-C70", "mt-NCHW-C16",
)]  # fmt: skip


def data(shape, axis, dtype, seed=0):
    # running statistics far enough from the batch's that the corrections clip in places
    return random_arrays(shape, axis, dtype, seed, running_mean_scale=2.0, running_var=(0.2, 9.0))


# ---- batch renormalization -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", layout_params(SOME))
@pytest.mark.parametrize("limits", [(3.0, 5.0), (1.5, 0.5)], ids=["loose", "clipping"])
def test_renorm_matches_reference(layout, dtype, limits):
    d = data(layout.shape, layout.axis, dtype)
    r_max, d_max = limits
    rm, rv = d["rm"].copy(), d["rv"].copy()
    y, mean, invstd, r, dd = bk.batch_renorm_forward(
        d["x"], d["g"], d["b"], running_mean=rm, running_var=rv, r_max=r_max, d_max=d_max,
        momentum=0.2, axis=layout.axis,
    )  # fmt: skip
    ry, rmean, rinvstd, rr, rd = ref.renorm_forward(
        d["x"], d["rm"], d["rv"], d["g"], d["b"], 1e-5, r_max, d_max, layout.axis
    )
    assert y.dtype == dtype
    assert_close(y, ry, tol(dtype), what="y")
    assert_close(mean, rmean, 1e-12, what="mean")
    assert_close(r, rr, 1e-12, what="r")
    assert_close(dd, rd, 1e-12, what="d")
    if limits == (1.5, 0.5):  # the corrections really clip somewhere in this case
        assert np.any(np.isclose(rr, 1.5) | np.isclose(rr, 1 / 1.5)) or np.any(
            np.isclose(np.abs(rd), 0.5)
        )
    _, _, var = ref.batch_stats(d["x"], layout.axis)
    want_rm, want_rv = ref.update_running(d["rm"], d["rv"], rmean, var, layout.count, 0.2, True)
    assert_close(rm, want_rm, tol(dtype), what="running_mean")
    assert_close(rv, want_rv, tol(dtype), what="running_var")
    dx, dg, db = bk.batch_renorm_backward(d["dy"], d["x"], mean, invstd, r, dd, d["g"],
                                          axis=layout.axis)  # fmt: skip
    rdx, rdg, rdb = ref.renorm_backward(d["dy"], d["x"], rmean, rinvstd, rr, rd, d["g"],
                                        layout.axis)  # fmt: skip
    assert_close(dx, rdx, tol(dtype), what="dx")
    assert_close(dg, rdg, tol(dtype), scale=float(np.abs(d["dy"]).sum()), what="dgamma")
    assert_close(db, rdb, tol(dtype), scale=float(np.abs(d["dy"]).sum()), what="dbeta")


def test_renorm_with_unit_corrections_is_batch_norm():
    """r_max = 1 and d_max = 0 force r = 1 and d = 0: the same bits as batch normalization."""
    d = data((8, 5, 3, 3), 1, np.float32)
    y, mean, invstd, r, dd = bk.batch_renorm_forward(
        d["x"], d["g"], d["b"], running_mean=d["rm"].copy(), running_var=d["rv"].copy(),
        r_max=1.0, d_max=0.0,
    )  # fmt: skip
    assert np.all(r == 1) and np.all(dd == 0)
    y0, mean0, invstd0 = bk.batch_norm_forward(d["x"], d["g"], d["b"])
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(invstd, invstd0)
    got = bk.batch_renorm_backward(d["dy"], d["x"], mean, invstd, r, dd, d["g"])
    want = bk.batch_norm_backward(d["dy"], d["x"], mean0, invstd0, d["g"])
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, 1e-6)


def test_renorm_backward_matches_finite_differences():
    """float64: d/dx, d/dgamma, d/dbeta of sum(w * y) with r and d held at their values (the
    paper's stop-gradient), the batch statistics free."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 3, 2)) * 2 + 1
    g = rng.uniform(0.5, 1.5, 3)
    b = rng.standard_normal(3)
    w = rng.standard_normal(x.shape)
    rm, rv = rng.standard_normal(3), rng.uniform(0.2, 4, 3)
    _, mean, invstd, r, d = ref.renorm_forward(x, rm, rv, g, b, 1e-5, 1.5, 0.5, 1)

    def loss(xv, gv, bv):
        _, mu, var = ref.batch_stats(xv, 1)
        xhat = (xv - mu[None, :, None]) / np.sqrt(var + 1e-5)[None, :, None]
        y = gv[None, :, None] * (xhat * r[None, :, None] + d[None, :, None]) + bv[None, :, None]
        return float(np.sum(w * y))

    dx, dg, db = bk.batch_renorm_backward(w, x, mean, invstd, r, d, g)
    assert_fd_grads(loss, (x, g, b), (dx, dg, db), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "kw,exc,msg",
    [
        ({"r_max": 0.5}, ValueError, "r_max"),
        ({"d_max": -1.0}, ValueError, "d_max"),
        ({"running_mean": None}, TypeError, "running_mean"),
    ],
)
def test_renorm_bad_arguments(kw, exc, msg):
    d = data((6, 3), 1, np.float64)
    args = {"running_mean": d["rm"], "running_var": d["rv"], **kw}
    with pytest.raises((exc, ValueError), match=msg):
        bk.batch_renorm_forward(d["x"], **args)


# ---- ghost batch normalization -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape,axis,v",
    [((12, 5), 1, 4), ((12, 5), -1, 3), ((8, 4, 3, 3), 1, 2), ((6, 3, 4, 7), -1, 3),
     ((16, 70), 1, 8)],
)  # fmt: skip
def test_ghost_matches_reference(shape, axis, v, dtype):
    d = data(shape, axis, dtype)
    rm, rv = d["rm"].copy(), d["rv"].copy()
    y, mean, invstd = bk.ghost_batch_norm_forward(
        d["x"], d["g"], d["b"], virtual_batch_size=v, running_mean=rm, running_var=rv,
        momentum=0.3, axis=axis,
    )  # fmt: skip
    ry, rmean, rinvstd = ref.ghost_forward(d["x"], v, d["g"], d["b"], 1e-5, axis)
    assert mean.shape == (shape[0] // v, shape[axis])
    assert_close(y, ry, tol(dtype), what="y")
    assert_close(mean, rmean, 1e-12, what="mean")
    assert_close(invstd, rinvstd, 1e-12, what="invstd")
    # Keras' rule: the running statistics move toward the mean of the groups' means and of
    # their (here unbiased) variances
    m = d["x"].size // (shape[axis] * (shape[0] // v))
    var = (1 / rinvstd**2 - 1e-5) * m / (m - 1)
    want_rm = 0.7 * d["rm"].astype(np.float64) + 0.3 * rmean.mean(axis=0)
    want_rv = 0.7 * d["rv"].astype(np.float64) + 0.3 * var.mean(axis=0)
    assert_close(rm, want_rm, tol(dtype), what="running_mean")
    assert_close(rv, want_rv, tol(dtype), what="running_var")
    dx, dg, db = bk.ghost_batch_norm_backward(d["dy"], d["x"], mean, invstd, d["g"],
                                              virtual_batch_size=v, axis=axis)  # fmt: skip
    rdx, rdg, rdb = ref.ghost_backward(d["dy"], d["x"], rmean, rinvstd, v, d["g"], axis)
    assert_close(dx, rdx, tol(dtype), what="dx")
    assert_close(dg, rdg, tol(dtype), scale=float(np.abs(d["dy"]).sum()), what="dgamma")
    assert_close(db, rdb, tol(dtype), scale=float(np.abs(d["dy"]).sum()), what="dbeta")


def test_ghost_with_one_group_is_batch_norm():
    d = data((8, 6, 5), 1, np.float32)
    y, mean, invstd = bk.ghost_batch_norm_forward(d["x"], d["g"], d["b"], virtual_batch_size=8)
    y0, mean0, invstd0 = bk.batch_norm_forward(d["x"], d["g"], d["b"])
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(mean[0], mean0)
    dx, _, _ = bk.ghost_batch_norm_backward(d["dy"], d["x"], mean, invstd, d["g"],
                                            virtual_batch_size=8)  # fmt: skip
    dx0, _, _ = bk.batch_norm_backward(d["dy"], d["x"], mean0, invstd0, d["g"])
    np.testing.assert_array_equal(dx, dx0)


def test_ghost_backward_matches_finite_differences():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 3)) * 1.5
    g = rng.uniform(0.5, 1.5, 3)
    w = rng.standard_normal(x.shape)

    def loss(xv):
        y, _, _ = ref.ghost_forward(xv, 3, g, None, 1e-5, 1)
        return float(np.sum(w * y))

    _, mean, invstd = bk.ghost_batch_norm_forward(x, g, virtual_batch_size=3)
    dx, _, _ = bk.ghost_batch_norm_backward(w, x, mean, invstd, g, virtual_batch_size=3)
    np.testing.assert_allclose(dx, ref.numerical_gradient(loss, x), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "shape,axis,v,msg",
    [((12, 5), 1, 5, "divisor"), ((12, 5), 0, 4, "axis"), ((12, 5), 1, 1, "one value"),
     ((12, 5), 1, 2.0, "int")],
)  # fmt: skip
def test_ghost_bad_arguments(shape, axis, v, msg):
    x = np.ones(shape)
    with pytest.raises((ValueError, TypeError), match=msg):
        bk.ghost_batch_norm_forward(x, virtual_batch_size=v, axis=axis)


# ---- population statistics -----------------------------------------------------------------------


@pytest.mark.parametrize("axis", [1, -1])
def test_population_stats_are_those_of_all_batches(axis):
    rng = np.random.default_rng(2)
    shapes = [(5, 4, 3), (1, 4, 3), (17, 4, 3)] if axis == 1 else [(5, 3, 4), (2, 3, 4)]
    batches = [(rng.standard_normal(s) * 3 + 7).astype(np.float32) for s in shapes]
    n, mean, m2 = bk.population_stats(iter(batches), axis=axis)
    rn, rmean, rm2 = ref.population_stats(batches, axis)
    assert n == rn
    assert_close(mean, rmean, 1e-12)
    assert_close(m2, rm2, 1e-12)


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_layer_loads_population_stats(convention):
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((9, 4)).astype(np.float32) * 2 + 1 for _ in range(3)]
    layer = bk.BatchNorm(4, convention=convention)
    layer.estimate_population_stats(batches)
    n, mean, m2 = ref.population_stats(batches, 1)
    denom = n - 1 if convention == "torch" else n
    assert_close(layer.running_mean, mean, 1e-6)
    assert_close(layer.running_var, m2 / denom, 1e-6)
    # inference now normalizes the whole set to mean 0, variance ~1
    y = layer.eval().forward(np.concatenate(batches))
    assert abs(float(y.mean())) < 1e-5


def test_population_stats_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        bk.population_stats([])
    with pytest.raises(ValueError, match=r"batches\[1\]"):
        bk.population_stats([np.ones((3, 4)), np.ones((3, 5))])


# ---- one value per channel -----------------------------------------------------------------------


def test_single_value_raises_by_default_with_a_hint():
    x = np.ones((1, 4), np.float32)
    with pytest.raises(ValueError, match="single_value='running'"):
        bk.batch_norm_forward(x)


def test_single_value_running_falls_back_to_the_running_statistics():
    d = data((1, 6), 1, np.float32)
    rm, rv = d["rm"].copy(), d["rv"].copy()
    y, mean, invstd = bk.batch_norm_forward(d["x"], d["g"], d["b"], running_mean=rm,
                                            running_var=rv, single_value="running")  # fmt: skip
    want = ref.forward_infer(d["x"], d["rm"], d["rv"], d["g"], d["b"], 1e-5, 1)
    assert_close(y, want, 1e-6)
    np.testing.assert_array_equal(rm, d["rm"])  # not updated
    np.testing.assert_array_equal(rv, d["rv"])
    dx, dg, db = bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, d["g"],
                                        single_value="running")  # fmt: skip
    rdx, rdg, rdb = ref.backward_frozen(d["dy"], d["x"], mean, invstd, d["g"], 1)
    assert_close(dx, rdx, 1e-6)
    assert_close(dg, rdg, 1e-6)
    assert_close(db, rdb, 1e-6)
    with pytest.raises(ValueError, match="running_mean, running_var"):
        bk.batch_norm_forward(d["x"], single_value="running")
    with pytest.raises(ValueError, match="single_value"):
        bk.batch_norm_forward(d["x"], single_value="skip")
    # batches with more values per channel are unaffected by the policy
    x2 = data((4, 6), 1, np.float32)["x"]
    np.testing.assert_array_equal(bk.batch_norm_forward(x2, single_value="running")[0],
                                  bk.batch_norm_forward(x2)[0])  # fmt: skip


def test_layer_single_value_running():
    layer = bk.BatchNorm(3, single_value="running")
    rng = np.random.default_rng(0)
    layer.forward(rng.standard_normal((8, 3)).astype(np.float32))
    tracked = layer.num_batches_tracked
    x1 = rng.standard_normal((1, 3)).astype(np.float32)
    y = layer.forward(x1)
    assert layer.num_batches_tracked == tracked
    want = ref.forward_infer(x1, layer.running_mean, layer.running_var, None, None, 1e-5, 1)
    assert_close(y, want, 1e-6)
    dx = layer.backward(np.ones_like(x1))
    assert_close(dx, 1 / np.sqrt(layer.running_var.astype(np.float64) + 1e-5)[None, :], 1e-6)
    with pytest.raises(ValueError, match="single_value"):
        bk.BatchNorm(3).forward(x1)


# ---- the layer's variants ------------------------------------------------------------------------


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_layer_renorm_steps_match_the_functional_form(convention):
    rng = np.random.default_rng(6)
    layer = bk.BatchNorm(4, convention=convention, renorm=True, r_max=1.0, d_max=0.0)
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    mom = 0.1 if convention == "torch" else 0.01
    for step, (r_max, d_max) in enumerate([(1.0, 0.0), (1.5, 0.5), (3.0, 5.0)]):
        layer.r_max, layer.d_max = r_max, d_max  # a schedule, as the paper relaxes them
        x = (rng.standard_normal((16, 4)) * (step + 1) + step).astype(np.float32)
        y = layer.forward(x)
        want = bk.batch_renorm_forward(
            x, layer.gamma, layer.beta, running_mean=rm, running_var=rv, r_max=r_max,
            d_max=d_max, momentum=mom, eps=layer.eps,
            running_var_unbiased=convention == "torch",
        )  # fmt: skip
        np.testing.assert_array_equal(y, want[0])
        np.testing.assert_array_equal(layer.running_mean, rm)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        dx = layer.backward(dy)
        wdx, wdg, _ = bk.batch_renorm_backward(dy, x, *want[1:3], want[3], want[4], layer.gamma)
        np.testing.assert_array_equal(dx, wdx)
        np.testing.assert_array_equal(layer.grads["gamma"], wdg)


def test_layer_ghost_matches_the_functional_form():
    rng = np.random.default_rng(7)
    layer = bk.BatchNorm(5, virtual_batch_size=4)
    x = rng.standard_normal((12, 5)).astype(np.float32)
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    y = layer.forward(x)
    y0, mean, invstd = bk.ghost_batch_norm_forward(x, layer.gamma, layer.beta,
                                                   virtual_batch_size=4, running_mean=rm,
                                                   running_var=rv)  # fmt: skip
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(layer.running_var, rv)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(
        layer.backward(dy),
        bk.ghost_batch_norm_backward(dy, x, mean, invstd, layer.gamma, virtual_batch_size=4)[0],
    )
    # inference is the same as without ghost batches
    layer.eval()
    want = ref.forward_infer(x, layer.running_mean, layer.running_var, None, None, 1e-5, 1)
    assert_close(layer.forward(x), want, 1e-6)


def test_layer_variant_arguments():
    with pytest.raises(ValueError, match="track_running_stats"):
        bk.BatchNorm(3, renorm=True, track_running_stats=False)
    with pytest.raises(ValueError, match="together"):
        bk.BatchNorm(3, renorm=True, virtual_batch_size=2)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bk.BatchNorm(3, virtual_batch_size=0)
    with pytest.raises(ValueError, match="r_max"):
        bk.BatchNorm(3, renorm=True, r_max=0.5)
    with pytest.raises(ValueError, match="single_value"):
        bk.BatchNorm(3, single_value="ignore")


# ---- in place ------------------------------------------------------------------------------------


@pytest.fixture
def restore_threads():
    yield
    bk.set_num_threads(None)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", layout_params(LAYOUTS))
def test_in_place_forward_equals_out_of_place(layout, dtype, restore_threads):
    """out=x: every kernel path (fused per channel, split, interleaved blocks, short runs) reads
    each value before writing it, on any number of threads."""
    d = data(layout.shape, layout.axis, dtype)
    for threads in (1, 3):
        bk.set_num_threads(threads)
        want, wmean, winvstd = bk.batch_norm_forward(d["x"], d["g"], d["b"], axis=layout.axis)
        x = d["x"].copy()
        y, mean, invstd = bk.batch_norm_forward(x, d["g"], d["b"], axis=layout.axis, out=x)
        assert y is x
        np.testing.assert_array_equal(mean, wmean)
        np.testing.assert_array_equal(x, want)
        np.testing.assert_array_equal(invstd, winvstd)
        x = d["x"].copy()
        bk.normalize(x, wmean, winvstd, d["g"], d["b"], axis=layout.axis, out=x)
        np.testing.assert_array_equal(x, want)
        x = d["x"].copy()
        bk.batch_norm_forward(x, d["g"], d["b"], running_mean=d["rm"], running_var=d["rv"],
                              training=False, axis=layout.axis, out=x)  # fmt: skip
        want_i = bk.batch_norm_forward(d["x"], d["g"], d["b"], running_mean=d["rm"],
                                       running_var=d["rv"], training=False,
                                       axis=layout.axis)[0]  # fmt: skip
        np.testing.assert_array_equal(x, want_i)


@pytest.mark.parametrize(
    "shape,axis,dtype",
    [((8, 17, 181, 181), 1, np.float32), ((7, 113, 113, 48), -1, np.float32),
     ((8, 4, 128, 1024), -1, np.float32)],
    ids=["NCHW-streamed", "NHWC-C48-streamed", "NHWC-C1024-blocks-streamed"],
)  # fmt: skip
def test_in_place_forward_on_streamed_outputs(shape, axis, dtype):
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    want = bk.batch_norm_forward(x0, axis=axis)[0]
    x = x0.copy()
    bk.batch_norm_forward(x, axis=axis, out=x)
    np.testing.assert_array_equal(x, want)


def test_in_place_variants_and_partial_overlap():
    d = data((8, 4, 5), 1, np.float32)
    want = bk.ghost_batch_norm_forward(d["x"], d["g"], virtual_batch_size=4)[0]
    x = d["x"].copy()
    bk.ghost_batch_norm_forward(x, d["g"], virtual_batch_size=4, out=x)
    np.testing.assert_array_equal(x, want)
    x = d["x"].copy()
    want = bk.batch_renorm_forward(d["x"], d["g"], running_mean=d["rm"].copy(),
                                   running_var=d["rv"].copy())[0]  # fmt: skip
    bk.batch_renorm_forward(x, d["g"], running_mean=d["rm"].copy(),
                            running_var=d["rv"].copy(), out=x)  # fmt: skip
    np.testing.assert_array_equal(x, want)
    # a shifted view of the same buffer is an overlap, not in place
    buf = np.zeros(2 * d["x"].size, np.float32)
    xv = buf[: d["x"].size].reshape(d["x"].shape)
    yv = buf[4 : 4 + d["x"].size].reshape(d["x"].shape)
    with pytest.raises(ValueError, match="overlaps"):
        bk.batch_norm_forward(xv, out=yv)
    # the backward still refuses to write over its inputs
    _, mean, invstd = bk.batch_norm_forward(d["x"])
    with pytest.raises(ValueError, match="overlaps"):
        bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, out=d["x"])
