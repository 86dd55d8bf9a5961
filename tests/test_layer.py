"""The BatchNorm layer: modes, both running-statistics conventions, state dicts, errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import bnkernel as bk
from bnkernel import reference as ref

# float32 layer outputs are computed in double and rounded once; the running statistics are
# rounded to float32 after each update, so after k updates they carry ~k half-ulps: 1e-6 relative
# covers the handful of steps these tests take.
TOL = {np.float32: dict(rtol=1e-6, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}


def batches(shape, count, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * (1 + i) + i).astype(dtype) for i in range(count)]


@pytest.mark.parametrize("C", [1, 3, 64])
def test_parameter_counts(C):
    layer = bk.BatchNorm(C)
    assert layer.count_params() == {"total": 4 * C, "trainable": 2 * C, "non_trainable": 2 * C}
    assert f"Total params: {4 * C:,}" in layer.summary()
    assert f"Trainable params: {2 * C:,}" in layer.summary()
    assert bk.BatchNorm(C, affine=False).count_params()["trainable"] == 0
    assert bk.BatchNorm(C, track_running_stats=False).count_params()["non_trainable"] == 0


def test_initial_values():
    layer = bk.BatchNorm(5, dtype=np.float64)
    np.testing.assert_array_equal(layer.params["gamma"], np.ones(5))
    np.testing.assert_array_equal(layer.params["beta"], np.zeros(5))
    np.testing.assert_array_equal(layer.running_mean, np.zeros(5))
    np.testing.assert_array_equal(layer.running_var, np.ones(5))
    assert layer.params["gamma"].dtype == np.float64
    assert layer.num_batches_tracked == 0 and layer.mode == "train"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "shape,axis", [((16, 4), 1), ((8, 4, 5, 3), 1), ((8, 5, 3, 4), -1)], ids=["NC", "NCHW", "NHWC"]
)
@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_running_stats_follow_the_convention(convention, shape, axis, dtype):
    layer = bk.BatchNorm(4, axis=axis, convention=convention, dtype=dtype)
    rm = np.zeros(4)
    rv = np.ones(4)
    for x in batches(shape, 4, dtype):
        count, mean, var = ref.batch_stats(x, axis)
        if convention == "torch":
            rm, rv = ref.update_running_torch(rm, rv, mean, var, count, momentum=0.1)
        else:
            rm, rv = ref.update_running_keras(rm, rv, mean, var, momentum=0.99)
        y = layer.forward(x)
        ry, _, _ = ref.forward_train(x, None, None, layer.eps, axis)
        np.testing.assert_allclose(y, ry, **TOL[dtype])
    assert layer.eps == (1e-5 if convention == "torch" else 1e-3)
    np.testing.assert_allclose(layer.running_mean, rm, **TOL[dtype])
    np.testing.assert_allclose(layer.running_var, rv, **TOL[dtype])
    assert layer.num_batches_tracked == 4


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_momentum_none_is_a_cumulative_average(convention):
    layer = bk.BatchNorm(3, axis=1, convention=convention, momentum=None, dtype=np.float64)
    means, variances = [], []
    for x in batches((10, 3, 4), 5, np.float64, seed=3):
        count, mean, var = ref.batch_stats(x, 1)
        means.append(mean)
        unbiased = convention == "torch"
        variances.append(var * count / (count - 1) if unbiased else var)
        layer.forward(x)
    np.testing.assert_allclose(layer.running_mean, np.mean(means, axis=0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, np.mean(variances, axis=0), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_train_backward_matches_reference(dtype):
    rng = np.random.default_rng(1)
    layer = bk.BatchNorm(6, dtype=dtype)
    layer.params["gamma"][...] = rng.uniform(0.5, 2, 6)
    layer.params["beta"][...] = rng.standard_normal(6)
    x = rng.standard_normal((7, 6, 3, 2)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y = layer.forward(x)
    dx = layer.backward(dy)
    ry, rmean, rinvstd = ref.forward_train(x, layer.gamma, layer.beta, 1e-5, 1)
    rdx, rdg, rdb = ref.backward_train(dy, x, rmean, rinvstd, layer.gamma, 1)
    np.testing.assert_allclose(y, ry, **TOL[dtype])
    np.testing.assert_allclose(dx, rdx, **TOL[dtype])
    # dgamma, dbeta are sums of 42 terms of size ~1 that cancel: their error is bounded relative
    # to that size (42), not to their own value, so the absolute bound is 42 x the dtype's rtol
    sum_atol = 42 * TOL[dtype]["rtol"]
    np.testing.assert_allclose(layer.grads["gamma"], rdg, rtol=TOL[dtype]["rtol"], atol=sum_atol)
    np.testing.assert_allclose(layer.grads["beta"], rdb, rtol=TOL[dtype]["rtol"], atol=sum_atol)


@pytest.mark.parametrize("mode", ["eval", "freeze"])
def test_eval_and_frozen_use_running_stats(mode):
    rng = np.random.default_rng(2)
    layer = bk.BatchNorm(4, dtype=np.float64)
    for x in batches((32, 4), 3, np.float64):
        layer.forward(x)
    layer.params["gamma"][...] = rng.uniform(0.5, 2, 4)
    getattr(layer, mode)()
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    x = rng.standard_normal((5, 4)) * 3
    dy = rng.standard_normal(x.shape)
    y = layer.forward(x)
    np.testing.assert_allclose(
        y, ref.forward_infer(x, rm, rv, layer.gamma, layer.beta, 1e-5, 1), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_array_equal(layer.running_mean, rm)  # not updated outside training
    np.testing.assert_array_equal(layer.running_var, rv)
    assert layer.num_batches_tracked == 3
    dx = layer.backward(dy)
    rdx, rdg, rdb = ref.backward_frozen(dy, x, rm, 1 / np.sqrt(rv + 1e-5), layer.gamma, 1)
    np.testing.assert_allclose(dx, rdx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads["gamma"], rdg, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads["beta"], rdb, rtol=1e-12, atol=1e-12)


def test_eval_on_a_single_sample_and_train_rejects_it():
    layer = bk.BatchNorm(3)
    one = np.ones((1, 3), np.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer.forward(one)
    assert layer.num_batches_tracked == 0  # a failed step does not count
    layer.eval()
    np.testing.assert_allclose(layer.forward(one), np.ones((1, 3)) / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_without_running_stats_eval_uses_batch_stats():
    layer = bk.BatchNorm(2, track_running_stats=False, dtype=np.float64).eval()
    x = np.random.default_rng(4).standard_normal((9, 2)) * 5 + 3
    np.testing.assert_allclose(layer.forward(x), ref.forward_train(x, None, None, 1e-5, 1)[0])
    assert layer.running_mean is None and layer.running_var is None
    assert set(layer.state_dict()) == {"weight", "bias"}
    with pytest.raises(ValueError, match="track_running_stats"):
        layer.freeze()


def test_affine_false_has_no_params_and_still_backpropagates():
    layer = bk.BatchNorm(3, affine=False, dtype=np.float64)
    x = np.random.default_rng(5).standard_normal((6, 3))
    dy = np.random.default_rng(6).standard_normal((6, 3))
    layer.forward(x)
    _, mean, invstd = ref.forward_train(x, None, None, 1e-5, 1)
    rdx = ref.backward_train(dy, x, mean, invstd, None, 1)[0]
    np.testing.assert_allclose(layer.backward(dy), rdx)
    assert layer.params == {} and layer.grads == {}
    assert set(layer.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}


@pytest.mark.parametrize("style", ["torch", "keras"])
def test_state_dict_round_trip(style):
    src = bk.BatchNorm(4, axis=1, convention=style)
    for x in batches((8, 4, 3), 3, np.float32):
        src.forward(x)
    src.params["gamma"][...] = [1.5, 0.5, 2.0, 1.0]
    state = src.state_dict()
    names = {"torch": {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"},
             "keras": {"gamma", "beta", "moving_mean", "moving_variance"}}[style]  # fmt: skip
    assert set(state) == names
    dst = bk.BatchNorm(4, axis=1, convention=style)
    dst.load_state_dict(state)
    for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = batches((5, 4, 3), 1, np.float32, seed=9)[0]
    np.testing.assert_array_equal(src.eval().forward(x), dst.eval().forward(x))
    # state_dict hands out copies: changing one does not change the layer
    state[next(iter(state))][...] = 123
    assert not np.any(src.params["gamma"] == 123)


def test_state_dict_cross_style_and_errors():
    src = bk.BatchNorm(2)
    src.forward(np.arange(8, dtype=np.float32).reshape(4, 2))
    keras_state = src.state_dict(style="keras")
    dst = bk.BatchNorm(2)
    dst.load_state_dict(keras_state)  # style guessed from the names
    np.testing.assert_array_equal(dst.running_mean, src.running_mean)
    with pytest.raises(KeyError, match="missing"):
        dst.load_state_dict({"weight": np.ones(2)})
    with pytest.raises(ValueError, match=r"state\['running_mean'\]: expected shape"):
        dst.load_state_dict({**src.state_dict(), "running_mean": np.zeros(3)})
    with pytest.raises(ValueError, match="style"):
        src.state_dict(style="jax")


def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match="num_features"):
        bk.BatchNorm(0)
    with pytest.raises(TypeError, match="num_features"):
        bk.BatchNorm(2.5)
    with pytest.raises(ValueError, match="convention"):
        bk.BatchNorm(3, convention="tf")
    with pytest.raises(ValueError, match="momentum"):
        bk.BatchNorm(3, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        bk.BatchNorm(3, eps=-1.0)
    with pytest.raises(TypeError, match="dtype"):
        bk.BatchNorm(3, dtype=np.int32)
    layer = bk.BatchNorm(3)
    with pytest.raises(RuntimeError, match="forward first"):
        layer.backward(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="expected 3 channels"):
        layer.forward(np.zeros((4, 5), np.float32))
    with pytest.raises(TypeError, match="layer's dtype"):
        layer.forward(np.zeros((4, 3), np.float64))
    layer.forward(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="dy"):
        layer.backward(np.zeros((5, 3), np.float32))


def test_matches_torch_batchnorm_over_steps():
    torch = pytest.importorskip("torch")
    for momentum in (0.1, None):
        ours = bk.BatchNorm(5, momentum=momentum, dtype=np.float64)
        theirs = torch.nn.BatchNorm2d(5, momentum=momentum).double()
        for x in batches((4, 5, 3, 3), 4, np.float64, seed=11):
            xt = torch.from_numpy(x).requires_grad_()
            yt = theirs(xt)
            dy = np.cos(x)
            yt.backward(torch.from_numpy(dy))
            y = ours.forward(x)
            dx = ours.backward(dy)
            np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(ours.grads["gamma"], theirs.weight.grad.numpy(), rtol=1e-10)
            theirs.zero_grad()
        np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), rtol=1e-12)
        assert ours.num_batches_tracked == int(theirs.num_batches_tracked)
        # the state dict loads into torch under torch's names
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in ours.state_dict().items()}
        theirs.load_state_dict(state)


def test_readme_example_runs():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not beside the tests (installed-package run)")
    code = re.search(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert code is not None
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    bn = namespace["bn"]
    assert isinstance(bn, bk.BatchNorm) and bn.mode == "eval" and bn.num_batches_tracked == 100


# ---- the peers' habits (issue #17) ---------------------------------------------------------------


def test_keras_convention_takes_keras_default_axis():
    """Keras' BatchNormalization normalizes axis=-1 by default: so does convention="keras"."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((4, 5, 5, 3)).astype(np.float32)
    layer = bk.BatchNorm(3, convention="keras")
    assert layer.axis == -1
    y = layer.forward(x)
    # Keras' formula: (x - mean) / sqrt(var + eps) over every axis but the last, eps 1e-3
    want = (x - x.mean(axis=(0, 1, 2))) / np.sqrt(x.var(axis=(0, 1, 2)) + 1e-3)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # moving = 0.99 moving + 0.01 batch, biased variance
    np.testing.assert_allclose(layer.running_var, 0.99 + 0.01 * x.var(axis=(0, 1, 2)), rtol=1e-6)
    assert bk.BatchNorm(3).axis == 1  # torch's default is unchanged


def test_a_channel_mismatch_suggests_the_axis_that_fits():
    x = np.zeros((4, 5, 5, 3), np.float32)
    msg = r"^x: expected 3 channels on axis 1, got shape \(4, 5, 5, 3\); axis -1 has 3: create"
    with pytest.raises(ValueError, match=msg + r" the layer with axis=-1"):
        bk.BatchNorm(3).forward(x)
    with pytest.raises(ValueError, match=r"axis 2 has 7: create the layer with axis=2$"):
        bk.BatchNorm(7).forward(np.zeros((4, 5, 7, 3), np.float32))
    with pytest.raises(ValueError, match=r"got shape \(4, 5\)$"):  # (no axis fits: no hint)
        bk.BatchNorm(7).forward(np.zeros((4, 5), np.float32))


def test_keras_weight_lists_load_and_save_in_get_weights_order():
    """Keras' get_weights() order: gamma, beta, moving_mean, moving_variance (without the first
    two for center=False, scale=False, i.e. affine=False)."""
    w = [np.full(3, v, np.float32) for v in (2.0, 0.5, -1.0, 4.0)]
    layer = bk.BatchNorm(3, convention="keras")
    layer.load_state_dict(w)
    np.testing.assert_array_equal(layer.params["gamma"], w[0])
    np.testing.assert_array_equal(layer.params["beta"], w[1])
    np.testing.assert_array_equal(layer.running_mean, w[2])
    np.testing.assert_array_equal(layer.running_var, w[3])
    got = layer.get_weights()
    assert len(got) == 4 and all(np.array_equal(a, b) for a, b in zip(got, w, strict=True))
    plain = bk.BatchNorm(3, affine=False, convention="keras")
    plain.set_weights(w[2:])
    np.testing.assert_array_equal(plain.get_weights()[1], w[3])
    # a torch-convention layer takes Keras lists too (the order is Keras')
    torch_style = bk.BatchNorm(3)
    torch_style.set_weights(tuple(w))
    np.testing.assert_array_equal(torch_style.running_var, w[3])


def test_a_python_list_is_named_as_a_list():
    with pytest.raises(TypeError, match=r"^x: expected an array of dtype float32 \(the layer's "
                       r"dtype\), got a list \(which NumPy makes float64\)"):  # fmt: skip
        bk.BatchNorm(3).forward([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def test_masks_broadcast_as_keras_broadcasts_them():
    """A mask that broadcasts to x's shape without the channel axis (Keras' rule): one flag per
    sample, (N, 1), is the same as its full (N, L) form."""
    rng = np.random.default_rng(22)
    x = rng.standard_normal((5, 6, 3))
    per_sample = np.array([True, False, True, True, False])[:, None]
    full = np.broadcast_to(per_sample, (5, 6)).copy()
    a = bk.batch_norm_forward(x, axis=-1, mask=per_sample)
    b = bk.batch_norm_forward(x, axis=-1, mask=full)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    dy = rng.standard_normal(x.shape)
    ga = bk.batch_norm_backward(dy, x, a[1], a[2], axis=-1, mask=per_sample)
    gb = bk.batch_norm_backward(dy, x, b[1], b[2], axis=-1, mask=full)
    for u, v in zip(ga, gb, strict=True):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError, match=r"^mask: expected shape \(5, 6\) .* or one that "
                       r"broadcasts to it, got \(6, 1\)"):  # fmt: skip
        bk.batch_norm_forward(x, axis=-1, mask=np.ones((6, 1), bool))


def test_a_batch_with_no_valid_position_raises_and_writes_nothing():
    x = np.ones((4, 5, 3))
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=r"^mask: expected at least 2 valid positions when "
                       r"training, got 0"):  # fmt: skip
        bk.batch_norm_forward(x, axis=-1, running_mean=rm, running_var=rv,
                              mask=np.zeros((4, 5), bool))  # fmt: skip
    assert not rm.any() and (rv == 1).all()


def test_the_public_namespace_has_no_stray_names():
    """Every public name of bnkernel is in __all__, or one of its submodules (which become
    attributes once imported, e.g. bnkernel.coverage by `check`)."""
    import types

    assert "annotations" not in dir(bk)
    stray = {
        n for n in dir(bk)
        if not n.startswith("_") and n not in bk.__all__
        and not (isinstance(getattr(bk, n), types.ModuleType)
                 and getattr(bk, n).__name__ == f"bnkernel.{n}")
    }  # fmt: skip
    assert not stray, stray


def test_an_empty_batch_with_a_mask():
    x = np.zeros((0, 5, 3))
    m = np.zeros((0, 5), bool)
    rm, rv = np.zeros(3), np.ones(3)
    y, mean, invstd = bk.batch_norm_forward(x, axis=-1, mask=m, running_mean=rm, running_var=rv)
    assert y.shape == x.shape and np.isnan(mean).all() and np.isnan(invstd).all()
    assert not rm.any() and (rv == 1).all()
    dx, dg, db = bk.batch_norm_backward(x, x, np.zeros(3), np.ones(3), axis=-1, mask=m)
    assert dx.shape == x.shape and not dg.any() and not db.any()
