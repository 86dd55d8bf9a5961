"""Masked batch normalization: statistics over the valid (unpadded) positions only, against the
float64 reference, the exact gradient against finite differences, and the mask's contract."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LAYOUTS, STATS_TOL, Layout, assert_close, assert_fd_grads, layout_params, tol

import bnkernel as bk
from bnkernel import reference as ref

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
MASKABLE = [lay for lay in LAYOUTS if lay.count >= 4]


def case(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    ax = axis % len(shape)
    C = shape[ax]
    mshape = shape[:ax] + shape[ax + 1 :]
    mask = rng.random(mshape) < 0.7
    mask.flat[:2] = True  # at least two valid positions
    return {
        "x": (rng.standard_normal(shape) * 2 + 1).astype(dtype),
        "dy": rng.standard_normal(shape).astype(dtype),
        "g": rng.uniform(0.5, 1.5, C).astype(dtype),
        "b": rng.standard_normal(C).astype(dtype),
        "mask": mask,
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", layout_params(MASKABLE))
def test_masked_matches_reference(layout, dtype):
    d = case(layout.shape, layout.axis, dtype)
    C = layout.channels
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y, mean, invstd = bk.batch_norm_forward(
        d["x"], d["g"], d["b"], running_mean=rm, running_var=rv, axis=layout.axis, mask=d["mask"]
    )
    ry, rmean, rinvstd, m = ref.masked_forward(d["x"], d["mask"], d["g"], d["b"], 1e-5,
                                               layout.axis)  # fmt: skip
    assert_close(y, ry, tol(dtype), what="y")
    assert_close(mean, rmean, 1e-12, what="mean")
    assert_close(invstd, rinvstd, 1e-12, what="invstd")
    var = 1 / rinvstd**2 - 1e-5
    want_rm, want_rv = ref.update_running(np.zeros(C), np.ones(C), rmean, var, m, 0.1, True)
    assert_close(rm, want_rm, tol(dtype), what="running_mean")
    assert_close(rv, want_rv, tol(dtype), what="running_var")
    dx, dg, db = bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, d["g"], axis=layout.axis,
                                        mask=d["mask"])  # fmt: skip
    rdx, rdg, rdb = ref.masked_backward(d["dy"], d["x"], rmean, rinvstd, d["mask"], d["g"],
                                        layout.axis)  # fmt: skip
    # dx's error is set by the size of the terms that cancel in it (gamma * invstd * dy)
    terms = float(np.max(np.abs(d["g"] * rinvstd)) * np.max(np.abs(d["dy"])))
    assert_close(dx, rdx, tol(dtype), scale=terms, what="dx")
    size = float(np.abs(d["dy"]).sum())
    assert_close(dg, rdg, tol(dtype), scale=size, what="dgamma")
    assert_close(db, rdb, tol(dtype), scale=size, what="dbeta")


def test_padded_values_do_not_touch_the_statistics():
    d = case((6, 5, 4), -1, np.float64)
    y, mean, invstd = bk.batch_norm_forward(d["x"], axis=-1, mask=d["mask"])
    x2 = d["x"].copy()
    x2[~d["mask"]] = 1e6  # garbage in the padding
    y2, mean2, invstd2 = bk.batch_norm_forward(x2, axis=-1, mask=d["mask"])
    np.testing.assert_array_equal(mean, mean2)
    np.testing.assert_array_equal(invstd, invstd2)
    np.testing.assert_array_equal(y[d["mask"]], y2[d["mask"]])


def test_all_valid_mask_is_plain_batch_norm():
    d = case((8, 3, 5), 1, np.float64)
    full = np.ones((8, 5), bool)
    y, mean, invstd = bk.batch_norm_forward(d["x"], axis=1, mask=full)
    y0, mean0, invstd0 = bk.batch_norm_forward(d["x"], axis=1)
    assert_close(y, y0, 1e-12)
    dx = bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, axis=1, mask=full)[0]
    assert_close(dx, bk.batch_norm_backward(d["dy"], d["x"], mean0, invstd0)[0], 1e-12)


def test_masked_gradients_match_finite_differences():
    d = case((5, 3, 4), 1, np.float64, seed=2)
    w = np.random.default_rng(3).standard_normal(d["x"].shape)

    def loss(xv, gv, bv):
        y, _, _, _ = ref.masked_forward(xv, d["mask"], gv, bv, 1e-5, 1)
        return float(np.sum(w * y))

    _, mean, invstd = bk.batch_norm_forward(d["x"], d["g"], d["b"], mask=d["mask"])
    dx, dg, db = bk.batch_norm_backward(w, d["x"], mean, invstd, d["g"], mask=d["mask"])
    assert_fd_grads(loss, (d["x"], d["g"], d["b"]), (dx, dg, db), rtol=1e-6, atol=1e-8)


def test_mask_with_fused_relu_and_residual():
    d = case((4, 6, 3), -1, np.float32, seed=5)
    res = np.random.default_rng(6).standard_normal(d["x"].shape).astype(np.float32)
    y, mean, invstd = bk.batch_norm_forward(d["x"], d["g"], d["b"], axis=-1, mask=d["mask"],
                                            activation="relu", residual=res)  # fmt: skip
    ry, rmean, rinvstd, _ = ref.masked_forward(d["x"], d["mask"], d["g"], d["b"], 1e-5, -1)
    terms = float(np.abs(ry).max() + np.abs(res).max())  # the addends bound the rounding
    assert_close(y, ref.apply_epilogue(ry, res, True), 1e-6, scale=terms)
    dx, _, _, dres = bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, d["g"], axis=-1,
                                            mask=d["mask"], activation="relu", y=y,
                                            residual_grad=True)  # fmt: skip
    gm = ref.relu_backward(d["dy"], y)
    np.testing.assert_array_equal(dres, gm.astype(np.float32))
    rdx = ref.masked_backward(gm, d["x"], rmean, rinvstd, d["mask"], d["g"], -1)[0]
    assert_close(dx, rdx, 1e-6, scale=float(np.abs(gm).max() * np.abs(d["g"] * rinvstd).max()))


@pytest.mark.parametrize(
    "mask,exc,msg",
    [
        (np.ones((4, 5), bool), ValueError, "shape"),
        (np.ones((4, 3), np.int8), TypeError, "bool"),
        (np.eye(4, 3, dtype=bool)[:, :1].repeat(3, 1) & False, ValueError, "at least 2"),
    ],
    ids=["shape", "dtype", "too-few"],
)
def test_bad_masks(mask, exc, msg):
    x = np.ones((4, 2, 3))
    with pytest.raises(exc, match=msg):
        bk.batch_norm_forward(x, mask=mask)


def test_mask_is_for_training():
    x = np.ones((4, 2))
    with pytest.raises(ValueError, match="training"):
        bk.batch_norm_forward(x, running_mean=np.zeros(2), running_var=np.ones(2),
                              training=False, mask=np.ones(4, bool))  # fmt: skip


def test_layer_with_a_mask():
    d = case((6, 5, 4), -1, np.float32, seed=9)
    layer = bk.BatchNorm(4, axis=-1)
    y = layer.forward(d["x"], mask=d["mask"])
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y0, mean, invstd = bk.batch_norm_forward(d["x"], axis=-1, mask=d["mask"], running_mean=rm,
                                             running_var=rv)  # fmt: skip
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(layer.running_var, rv)
    dx = layer.backward(d["dy"])
    want = bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, layer.gamma, axis=-1,
                                  mask=d["mask"])  # fmt: skip
    np.testing.assert_array_equal(dx, want[0])
    np.testing.assert_array_equal(layer.grads["gamma"], want[1])


# ---- the masked kernels -------------------------------------------------------------------------
#
# The mask goes into the kernels: the statistics pass reads it alongside x (a planar leaf sums its
# valid values, an interleaved leaf skips padded rows), and the elementwise pass of the backward
# cuts each run where the mask changes.  Layouts with long runs (leaves of 4096 values, some of
# them wholly padded), many threads, and masks that are mostly padding or have one valid position
# per leaf.

KERNEL_LAYOUTS = [
    *MASKABLE,
    Layout("long-planar", (3, 4, 5000), 1),  # several leaves per channel
    Layout("long-interleaved", (9000, 3), 1),  # several leaves of rows
    Layout("mt-long-planar", (16, 2, 4100), 1),  # threads share a channel's subtrees
]


def sparse_mask(shape, seed, density):
    """Valid with probability `density`; or, for "head", the first tenth of the positions (in C
    order) and nothing after them, as sequences padded at the end: whole leaves are padding."""
    if density == "head":
        mask = np.zeros(shape, bool)
        mask.flat[: max(2, mask.size // 10)] = True
        return mask
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < density
    mask.flat[:2] = True
    return mask


@pytest.mark.parametrize("density", [0.7, 0.02, "head"], ids=["dense", "sparse", "head"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", layout_params(KERNEL_LAYOUTS))
def test_masked_channel_stats(layout, dtype, density):
    shape, ax = layout.shape, layout.ax
    x = (np.random.default_rng(1).standard_normal(shape) * 3 + 2).astype(dtype)
    mask = sparse_mask(shape[:ax] + shape[ax + 1 :], 2, density)
    x[np.moveaxis(np.broadcast_to(~mask[..., None], shape[:ax] + shape[ax + 1 :] + (shape[ax],)),
                  -1, ax)] = np.nan  # fmt: skip
    n, mean, m2 = bk.channel_stats(x, axis=layout.axis, mask=mask)
    valid = np.moveaxis(x, ax, -1)[mask].astype(np.float64)  # (count, C)
    rn, rmean, rm2 = ref.channel_stats(valid, 1)
    assert n == rn == int(mask.sum())
    assert_close(mean, rmean, STATS_TOL, scale=float(np.abs(valid).max()), what="mean")
    assert_close(m2, rm2, STATS_TOL, what="M2")


def test_masked_channel_stats_do_not_depend_on_the_thread_count(restore_threads):
    for shape, axis in (((16, 2, 4100), 1), ((9000, 40), 1), ((8, 64, 300), 1)):
        x = np.random.default_rng(3).standard_normal(shape)
        mask = sparse_mask((shape[0], *shape[2:]), 4, 0.5)
        results = []
        for threads in (1, 2, 3):
            bk.set_num_threads(threads)
            results.append(bk.channel_stats(x, axis=axis, mask=mask))
        for n, mean, m2 in results[1:]:
            assert n == results[0][0]
            np.testing.assert_array_equal(mean, results[0][1])
            np.testing.assert_array_equal(m2, results[0][2])


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", layout_params(KERNEL_LAYOUTS))
def test_masked_elementwise_is_the_two_kernels_it_selects(layout, dtype, relu):
    """At valid positions dx is the unmasked training dx, at padded ones the frozen dx (the direct
    term), both bit for bit: the masked pass computes each with the same arithmetic."""
    d = case(layout.shape, layout.axis, dtype, seed=11)
    ax = layout.axis
    y = None
    if relu:
        y, _, _ = bk.batch_norm_forward(d["x"], d["g"], d["b"], axis=ax, activation="relu")
    _, mean, invstd = bk.batch_norm_forward(d["x"], d["g"], d["b"], axis=ax)
    sdy, sdyx = bk.backward_reduce(d["dy"], d["x"], mean, invstd, axis=ax, y=y)
    count = int(d["mask"].sum())
    dx = bk.backward_elementwise(d["dy"], d["x"], mean, invstd, d["g"], sdy, sdyx, count,
                                 axis=ax, y=y, mask=d["mask"])  # fmt: skip
    plain = bk.backward_elementwise(d["dy"], d["x"], mean, invstd, d["g"], sdy, sdyx, count,
                                    axis=ax, y=y)  # fmt: skip
    act = "relu" if relu else None
    frozen = bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, d["g"], training=False, axis=ax,
                                    activation=act, y=y)[0]  # fmt: skip
    mask_full = np.moveaxis(
        np.broadcast_to(d["mask"][..., None], (*d["mask"].shape, layout.channels)), -1, layout.ax
    )
    np.testing.assert_array_equal(dx[mask_full], plain[mask_full])
    np.testing.assert_array_equal(dx[~mask_full], frozen[~mask_full])


def test_mask_args_of_the_split_phases():
    x = np.ones((4, 2, 3))
    with pytest.raises(ValueError, match=r"^mask: expected shape \(4, 3\)"):
        bk.channel_stats(x, mask=np.ones((4, 2), bool))
    with pytest.raises(TypeError, match=r"^mask: expected a bool array"):
        bk.backward_elementwise(x, x, np.zeros(2), np.ones(2), None, np.zeros(2), np.zeros(2), 4,
                                mask=np.ones((4, 3)))  # fmt: skip
    # a batch with no samples: count 0 and the neutral statistics
    n, mean, m2 = bk.channel_stats(np.ones((0, 2, 3)), mask=np.ones((0, 3), bool))
    assert n == 0 and not mean.any() and not m2.any()
    # no valid position: count 0
    n, mean, m2 = bk.channel_stats(np.ones((4, 2, 3)), mask=np.zeros((4, 3), bool))
    assert n == 0 and not mean.any() and not m2.any()
