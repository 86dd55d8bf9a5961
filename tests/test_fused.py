"""The fused epilogue y = relu(bn(x) + residual) and its backward from the output y, on every layout
and dtype, against the float64 reference; the fused paths against the unfused chain and the
split phases; finite differences; NaN; bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LAYOUTS, assert_close, assert_fd_grads, layout_params, random_arrays, tol

import bnkernel as bk
from bnkernel import reference as ref

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
EPILOGUES = [(True, False), (False, True), (True, True)]
EPILOGUE_IDS = ["residual", "relu", "residual-relu"]


def data(shape, axis, dtype, seed=0):
    return random_arrays(shape, axis, dtype, seed, residual=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("residual,relu", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", layout_params(LAYOUTS))
def test_fused_forward_matches_reference(layout, dtype, residual, relu, training):
    d = data(layout.shape, layout.axis, dtype)
    res = d["res"] if residual else None
    act = "relu" if relu else None
    kw = {"running_mean": d["rm"], "running_var": d["rv"]} if not training else {}
    y, mean, invstd = bk.batch_norm_forward(d["x"], d["g"], d["b"], training=training,
                                            axis=layout.axis, activation=act, residual=res,
                                            **kw)  # fmt: skip
    if training:
        z, _, _ = ref.forward_train(d["x"], d["g"], d["b"], 1e-5, layout.axis)
    else:
        z = ref.forward_infer(d["x"], d["rm"], d["rv"], d["g"], d["b"], 1e-5, layout.axis)
    want = ref.apply_epilogue(z, res, relu)
    assert y.dtype == dtype
    # one rounding of a double result: the error is relative to the terms added (z and the
    # residual), which is what assert_close's scale covers
    terms = float(np.max(np.abs(z))) + (float(np.max(np.abs(res))) if residual else 0.0)
    assert_close(y, want, tol(dtype), scale=terms, what="y")
    if relu:
        assert np.all(y >= 0)
    # normalize with the statistics is the same computation
    yn = bk.normalize(d["x"], mean, invstd, d["g"], d["b"], axis=layout.axis, activation=act,
                      residual=res)  # fmt: skip
    np.testing.assert_array_equal(yn, y)


@pytest.mark.parametrize("layout", layout_params(LAYOUTS))
def test_fused_forward_float64_equals_the_unfused_chain(layout):
    """In float64 the fused epilogue is the unfused chain's operations in the same order, so the
    same bits; in float32 it rounds once instead of three times."""
    d = data(layout.shape, layout.axis, np.float64)
    y, _, _ = bk.batch_norm_forward(d["x"], d["g"], d["b"], axis=layout.axis, activation="relu",
                                    residual=d["res"])  # fmt: skip
    z, _, _ = bk.batch_norm_forward(d["x"], d["g"], d["b"], axis=layout.axis)
    np.testing.assert_array_equal(y, np.maximum(z + d["res"], 0))


@pytest.mark.parametrize("residual_grad", [False, True], ids=["dx", "dx-dres"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", layout_params(LAYOUTS))
def test_relu_backward_matches_reference(layout, dtype, training, residual_grad):
    d = data(layout.shape, layout.axis, dtype)
    y, mean, invstd = bk.batch_norm_forward(d["x"], d["g"], d["b"], axis=layout.axis,
                                            activation="relu", residual=d["res"])  # fmt: skip
    assert np.any(y == 0) and np.any(y > 0)  # the mask does something
    got = bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, d["g"], training=training,
                                 axis=layout.axis, activation="relu", y=y,
                                 residual_grad=residual_grad)  # fmt: skip
    g = ref.relu_backward(d["dy"], y)
    backward = ref.backward_train if training else ref.backward_frozen
    rdx, rdg, rdb = backward(g, d["x"], mean, invstd, d["g"], layout.axis)
    # dx's error is set by the size of the terms that cancel in it (gamma * invstd * g), not by
    # dx itself: with two values per channel and one masked, dx is 0 up to rounding
    terms = float(np.max(np.abs(d["g"].astype(np.float64) * invstd)) * np.max(np.abs(g)))
    assert_close(got[0], rdx, tol(dtype), scale=max(terms, 1e-300), what="dx")
    size = float(np.abs(g).sum()) + 1
    assert_close(got[1], rdg, tol(dtype), scale=size, what="dgamma")
    assert_close(got[2], rdb, tol(dtype), scale=size, what="dbeta")
    if residual_grad:
        assert len(got) == 4
        np.testing.assert_array_equal(got[3], g.astype(dtype))
    # the split phases with the mask compose to the fused backward, bit for bit
    if training:
        dres = np.full(d["x"].shape, np.nan, dtype)
        sdy, sdyx = bk.backward_reduce(d["dy"], d["x"], mean, invstd, axis=layout.axis, y=y,
                                       dresidual=dres)  # fmt: skip
        np.testing.assert_array_equal(dres, g.astype(dtype))
        dx = bk.backward_elementwise(d["dy"], d["x"], mean, invstd, d["g"], sdy, sdyx,
                                     layout.count, axis=layout.axis, y=y)  # fmt: skip
        np.testing.assert_array_equal(dx, got[0])
        np.testing.assert_array_equal(sdy.astype(dtype), got[2])


def test_fused_gradients_match_finite_differences():
    """float64: L = sum(w * relu(bn(x) + r)) differentiated in x, gamma, beta and r."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 3, 4)) * 2
    r = rng.standard_normal(x.shape)
    g = rng.uniform(0.5, 1.5, 3)
    b = rng.standard_normal(3)
    w = rng.standard_normal(x.shape)

    def loss(xv, gv, bv, rv):
        z, _, _ = ref.forward_train(xv, gv, bv, 1e-5, 1)
        return float(np.sum(w * ref.apply_epilogue(z, rv, True)))

    y, mean, invstd = bk.batch_norm_forward(x, g, b, activation="relu", residual=r)
    dx, dg, db, dr = bk.batch_norm_backward(w, x, mean, invstd, g, activation="relu", y=y,
                                            residual_grad=True)  # fmt: skip
    assert_fd_grads(loss, (x, g, b, r), (dx, dg, db, dr), rtol=1e-6, atol=1e-8)


def test_relu_keeps_nan_and_masks_nan_outputs():
    x = np.array([[1.0, 5.0], [2.0, 3.0], [0.5, 1.0]])
    res = np.zeros_like(x)
    res[0, 1] = np.nan
    y, mean, invstd = bk.batch_norm_forward(x, activation="relu", residual=res)
    assert np.isnan(y[0, 1])  # NaN stays NaN through the ReLU
    assert np.all(y[~np.isnan(y)] >= 0)
    dx, _, _, dres = bk.batch_norm_backward(np.ones_like(x), x, mean, invstd, activation="relu",
                                            y=y, training=False, residual_grad=True)  # fmt: skip
    # a NaN output passes no gradient (as torch's threshold_backward)
    assert dx[0, 1] == 0 and dres[0, 1] == 0
    assert np.all(np.isfinite(dx))


@pytest.mark.parametrize(
    "shape,axis",
    [((8, 17, 181, 181), 1), ((8, 4, 128, 1024), -1), ((7, 113, 113, 48), -1)],
    ids=["NCHW-streamed", "NHWC-C1024-blocks-streamed", "NHWC-C48-streamed"],
)
def test_fused_on_streamed_outputs(shape, axis):
    d = data(shape, axis, np.float32, seed=3)
    y, mean, invstd = bk.batch_norm_forward(d["x"], d["g"], d["b"], axis=axis,
                                            activation="relu", residual=d["res"])  # fmt: skip
    z, _, _ = ref.forward_train(d["x"], d["g"], d["b"], 1e-5, axis)
    terms = float(np.abs(z).max() + np.abs(d["res"]).max())  # the addends bound the rounding
    assert_close(y, ref.apply_epilogue(z, d["res"], True), 1e-6, scale=terms)
    dx, _, _, dres = bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, d["g"], axis=axis,
                                            activation="relu", y=y, residual_grad=True)  # fmt: skip
    gref = ref.relu_backward(d["dy"], y)
    np.testing.assert_array_equal(dres, gref.astype(np.float32))
    assert_close(dx, ref.backward_train(gref, d["x"], mean, invstd, d["g"], axis)[0], 1e-6)


def test_residual_grad_without_activation_is_dy():
    d = data((4, 3, 5), 1, np.float32)
    _, mean, invstd = bk.batch_norm_forward(d["x"], residual=d["res"])
    *_, dres = bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, residual_grad=True)
    assert dres is d["dy"]


def test_fused_bad_arguments():
    d = data((4, 3, 5), 1, np.float32)
    with pytest.raises(ValueError, match="activation"):
        bk.batch_norm_forward(d["x"], activation="gelu")
    with pytest.raises(ValueError, match="residual"):
        bk.batch_norm_forward(d["x"], residual=d["res"][:2])
    with pytest.raises(TypeError, match="residual"):
        bk.batch_norm_forward(d["x"], residual=d["res"].astype(np.float64))
    with pytest.raises(ValueError, match="overlaps"):
        bk.batch_norm_forward(d["x"], residual=d["res"], out=d["res"])
    y, mean, invstd = bk.batch_norm_forward(d["x"], activation="relu")
    with pytest.raises(ValueError, match="y"):
        bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, activation="relu")
    with pytest.raises(ValueError, match="y"):
        bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, y=y)
    with pytest.raises(ValueError, match="y"):
        bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, activation="relu", y=y[:2])
    with pytest.raises(ValueError, match="dresidual"):
        bk.backward_reduce(d["dy"], d["x"], mean, invstd, dresidual=np.empty_like(d["x"]))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layer_fused_relu_with_residual(mode):
    rng = np.random.default_rng(12)
    layer = bk.BatchNorm(4, activation="relu")
    layer.forward(rng.standard_normal((8, 4)).astype(np.float32))  # some running statistics
    layer.train(mode == "train")
    x = rng.standard_normal((8, 4)).astype(np.float32)
    res = rng.standard_normal((8, 4)).astype(np.float32)
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    y = layer.forward(x, residual=res)
    kw = {"running_mean": rm, "running_var": rv, "training": mode == "train"}
    y0, mean, invstd = bk.batch_norm_forward(x, layer.gamma, layer.beta, activation="relu",
                                             residual=res, **kw)  # fmt: skip
    np.testing.assert_array_equal(y, y0)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, dres = layer.backward(dy)
    want = bk.batch_norm_backward(dy, x, mean, invstd, layer.gamma, training=mode == "train",
                                  activation="relu", y=y0, residual_grad=True)  # fmt: skip
    np.testing.assert_array_equal(dx, want[0])
    np.testing.assert_array_equal(dres, want[3])
    np.testing.assert_array_equal(layer.grads["gamma"], want[1])
    # without a residual, backward returns dx alone
    layer.forward(x)
    assert isinstance(layer.backward(dy), np.ndarray)


def test_layer_activation_arguments():
    with pytest.raises(ValueError, match="activation"):
        bk.BatchNorm(3, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        bk.BatchNorm(3, activation="relu", renorm=True)
