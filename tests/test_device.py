"""The device path: the public functions, the split phases and the layer on arrays in CUDA memory.

Each test runs twice: on the host stand-ins of tests/fake_cuda.py (CuPy's API over host memory,
and the kernels written again in float64 NumPy from their specification), everywhere; and on CuPy
with the real kernels, where there is a GPU (skipped otherwise, saying why; .ci/gpu requires it).
The first run checks bnkernel's device layer (placement rules, zero-copy views, CuPy allocations,
streams and devices, which kernel gets which array, no synchronization); the second, the kernels
too.  Results are compared with bnkernel's CPU kernels on the same inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from conftest import gpu_reason
from fake_cuda import DLPackCuda, FakeCupy, FakeKernels, TorchLikeCuda

import bnkernel as bk


class Backend:
    def __init__(self, cp: Any, kernels: Any, fake: bool) -> None:
        self.cp, self.kernels, self.fake = cp, kernels, fake

    def put(self, a: Any, device: int = 0) -> Any:
        with self.cp.cuda.Device(device):
            return self.cp.asarray(a)

    def get(self, a: Any) -> np.ndarray:
        return self.cp.asnumpy(a)


@pytest.fixture(params=["fake", "cupy"])
def dev(request, monkeypatch):
    if request.param == "fake":
        cp, k = FakeCupy(), FakeKernels()
        monkeypatch.setitem(sys.modules, "cupy", cp)
        monkeypatch.setitem(sys.modules, "bnkernel._cuda", k)
        return Backend(cp, k, fake=True)
    reason = gpu_reason()
    if reason is not None:
        if os.environ.get("BNKERNEL_REQUIRE_GPU") == "1":
            pytest.fail(f"BNKERNEL_REQUIRE_GPU=1, but {reason}")
        pytest.skip(reason)
    import cupy

    import bnkernel._cuda as real

    return Backend(cupy, real, fake=False)


@pytest.fixture
def fake(monkeypatch):
    cp, k = FakeCupy(), FakeKernels()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "bnkernel._cuda", k)
    return Backend(cp, k, fake=True)


def _close(got: np.ndarray, want: np.ndarray, dtype: Any) -> None:
    """Two independent double computations of the same value, each rounded once to `dtype`: they
    agree within one unit of the output's last place, plus the double rounding of the terms
    (relative 2^-50 of the largest, which matters only where the terms cancel)."""
    got64 = np.asarray(got, np.float64)
    want64 = np.asarray(want, np.float64)
    ulp = np.spacing(np.abs(want64).astype(dtype)).astype(np.float64)
    scale = np.max(np.abs(want64)) if want64.size else 0.0
    assert np.all(np.abs(got64 - want64) <= ulp + 2.0**-50 * scale + 1e-300), np.max(
        np.abs(got64 - want64) / ulp
    )


LAYOUTS = [((8, 3, 5, 4), 1), ((6, 5, 7), -1), ((9, 1), 1), ((4, 2, 3, 6), 2)]
LAYOUT_IDS = ["NCHW", "NLC", "C1", "axis2"]
DTYPES = [np.float32, np.float64, np.float16]


def _data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    sh = [1] * len(shape)
    sh[axis] = C
    x = (rng.standard_normal(shape) * 2 + rng.uniform(-3, 3, sh)).astype(dtype)
    P = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    gamma = rng.uniform(0.5, 1.5, C).astype(P)
    beta = rng.standard_normal(C).astype(P)
    return x, gamma, beta


# ---- the fused functions ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "f16"])
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_training_forward_matches_the_cpu(dev, shape, axis, dtype):
    x, gamma, beta = _data(shape, axis, dtype)
    C = x.shape[axis]
    P = gamma.dtype
    rm, rv = np.full(C, 0.5, P), np.full(C, 2.0, P)
    y, mean, invstd = bk.batch_norm_forward(
        x, gamma, beta, running_mean=rm, running_var=rv, axis=axis, momentum=0.3
    )
    drm, drv = dev.put(np.full(C, 0.5, P)), dev.put(np.full(C, 2.0, P))
    dy_, dmean, dinvstd = bk.batch_norm_forward(
        dev.put(x), dev.put(gamma), dev.put(beta), running_mean=drm, running_var=drv, axis=axis,
        momentum=0.3,
    )  # fmt: skip
    assert isinstance(dy_, dev.cp.ndarray) and dy_.dtype == x.dtype and dy_.shape == x.shape
    assert dmean.dtype == np.float64 and dinvstd.dtype == np.float64
    np.testing.assert_allclose(dev.get(dmean), mean, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(dev.get(dinvstd), invstd, rtol=1e-13)
    _close(dev.get(dy_), y, dtype)
    _close(dev.get(drm), rm, P)  # updated in place on the device
    _close(dev.get(drv), rv, P)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "f16"])
@pytest.mark.parametrize("shape,axis", LAYOUTS[:2], ids=LAYOUT_IDS[:2])
def test_inference_and_the_fused_epilogue_match_the_cpu(dev, shape, axis, dtype):
    x, gamma, beta = _data(shape, axis, dtype, seed=1)
    res = _data(shape, axis, dtype, seed=2)[0]
    C = x.shape[axis]
    rm = np.linspace(-1, 1, C).astype(gamma.dtype)
    rv = np.linspace(0.5, 2, C).astype(gamma.dtype)
    for kw in ({}, {"activation": "relu"}, {"activation": "relu", "residual": res}):
        y, _, invstd = bk.batch_norm_forward(
            x, gamma, beta, running_mean=rm, running_var=rv, training=False, axis=axis, **kw
        )
        dkw = {k: (dev.put(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        got, _, dinvstd = bk.batch_norm_forward(
            dev.put(x), dev.put(gamma), dev.put(beta), running_mean=dev.put(rm),
            running_var=dev.put(rv), training=False, axis=axis, **dkw,
        )  # fmt: skip
        np.testing.assert_array_equal(dev.get(dinvstd), invstd)  # (one IEEE sqrt and divide)
        _close(dev.get(got), y, dtype)
        if "activation" in kw:
            assert (dev.get(got) >= 0).all()


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "f16"])
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_backward_matches_the_cpu(dev, shape, axis, dtype, training):
    x, gamma, _ = _data(shape, axis, dtype, seed=3)
    g = _data(shape, axis, dtype, seed=4)[0]
    _, mean, invstd = bk.batch_norm_forward(x, axis=axis)
    dx, dgamma, dbeta = bk.batch_norm_backward(g, x, mean, invstd, gamma, training=training,
                                               axis=axis)  # fmt: skip
    got = bk.batch_norm_backward(
        dev.put(g), dev.put(x), dev.put(mean), dev.put(invstd), dev.put(gamma),
        training=training, axis=axis,
    )  # fmt: skip
    assert all(isinstance(a, dev.cp.ndarray) for a in got)
    assert got[1].dtype == gamma.dtype and got[2].dtype == gamma.dtype
    _close(dev.get(got[0]), dx, dtype)
    np.testing.assert_allclose(dev.get(got[1]), dgamma, rtol=1e-5 if dtype != np.float64 else 1e-12,
                               atol=1e-9 * np.abs(g.astype(float)).sum())  # fmt: skip
    np.testing.assert_allclose(dev.get(got[2]), dbeta, rtol=1e-5 if dtype != np.float64 else 1e-12,
                               atol=1e-9 * np.abs(g.astype(float)).sum())  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_relu_residual_backward_matches_the_cpu(dev, dtype):
    x, gamma, beta = _data((6, 4, 9), 1, dtype, seed=5)
    res = _data((6, 4, 9), 1, dtype, seed=6)[0]
    g = _data((6, 4, 9), 1, dtype, seed=7)[0]
    y, mean, invstd = bk.batch_norm_forward(x, gamma, beta, activation="relu", residual=res)
    want = bk.batch_norm_backward(g, x, mean, invstd, gamma, activation="relu", y=y,
                                  residual_grad=True)  # fmt: skip
    dyy, dmean, dinvstd = bk.batch_norm_forward(
        dev.put(x), dev.put(gamma), dev.put(beta), activation="relu", residual=dev.put(res)
    )
    got = bk.batch_norm_backward(dev.put(g), dev.put(x), dmean, dinvstd, dev.put(gamma),
                                 activation="relu", y=dyy, residual_grad=True)  # fmt: skip
    _close(dev.get(dyy), y, dtype)
    _close(dev.get(got[0]), want[0], dtype)
    np.testing.assert_allclose(dev.get(got[1]), want[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dev.get(got[2]), want[2], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(dev.get(got[3]), want[3])  # dresidual: dy where y > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_masks_match_the_cpu(dev, dtype):
    x, gamma, beta = _data((5, 7, 3), -1, dtype, seed=8)
    g = _data((5, 7, 3), -1, dtype, seed=9)[0]
    mask = np.random.default_rng(10).random((5, 7)) < 0.6
    x[~mask] = np.nan  # NaN padding: in no sum, on either side
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    y, mean, invstd = bk.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv,
                                            axis=-1, mask=mask)  # fmt: skip
    want = bk.batch_norm_backward(g, x, mean, invstd, gamma, axis=-1, mask=mask)
    drm, drv = dev.put(np.zeros(3, dtype)), dev.put(np.ones(3, dtype))
    dmask = dev.put(mask)
    dyy, dmean, dinvstd = bk.batch_norm_forward(
        dev.put(x), dev.put(gamma), dev.put(beta), running_mean=drm, running_var=drv, axis=-1,
        mask=dmask,
    )  # fmt: skip
    np.testing.assert_allclose(dev.get(dmean), mean, rtol=1e-12)
    np.testing.assert_allclose(dev.get(dinvstd), invstd, rtol=1e-12)
    _close(dev.get(drv), rv, dtype)
    got = bk.batch_norm_backward(dev.put(g), dev.put(x), dmean, dinvstd, dev.put(gamma), axis=-1,
                                 mask=dmask)  # fmt: skip
    valid = mask[..., None].repeat(3, -1)
    _close(dev.get(dyy)[valid], y[valid], dtype)
    dx = dev.get(got[0])
    assert np.isfinite(dx[valid]).all()
    _close(dx[valid], want[0][valid], dtype)
    np.testing.assert_allclose(dev.get(got[1]), want[1], rtol=1e-6)
    np.testing.assert_allclose(dev.get(got[2]), want[2], rtol=1e-6)


# ---- the split phases ---------------------------------------------------------------------------


def test_split_phases_match_the_cpu(dev):
    x, gamma, beta = _data((6, 4, 10), 1, np.float32, seed=11)
    g = _data((6, 4, 10), 1, np.float32, seed=12)[0]
    n, mean, m2 = bk.channel_stats(x)
    dn, dmean, dm2 = bk.channel_stats(dev.put(x))
    assert dn == n and isinstance(dmean, dev.cp.ndarray)
    np.testing.assert_allclose(dev.get(dmean), mean, rtol=1e-13)
    np.testing.assert_allclose(dev.get(dm2), m2, rtol=1e-12)
    # with a mask (NaN padding), channels last
    xl = np.moveaxis(x, 1, -1).copy()
    valid = np.random.default_rng(15).random(xl.shape[:-1]) < 0.5
    xl[~valid] = np.nan
    wn, wmean, wm2 = bk.channel_stats(xl, axis=-1, mask=valid)
    gn, gmean, gm2 = bk.channel_stats(dev.put(xl), axis=-1, mask=dev.put(valid))
    assert gn == wn == int(valid.sum())
    np.testing.assert_allclose(dev.get(gmean), wmean, rtol=1e-13)
    np.testing.assert_allclose(dev.get(gm2), wm2, rtol=1e-12)
    # two halves merged on the device
    a, b = bk.channel_stats(dev.put(x[:2])), bk.channel_stats(dev.put(x[2:]))
    mn, mmean, mm2 = bk.merge_stats(a, b)
    assert mn == n
    np.testing.assert_allclose(dev.get(mmean), mean, rtol=1e-13)
    np.testing.assert_allclose(dev.get(mm2), m2, rtol=1e-12)
    invstd = bk.invstd_from_stats(n, m2)
    np.testing.assert_allclose(dev.get(bk.invstd_from_stats(n, dm2)), invstd, rtol=1e-15)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    bk.update_running_stats(rm, rv, n, mean, m2, momentum=0.25)
    drm, drv = dev.put(np.zeros(4, np.float32)), dev.put(np.ones(4, np.float32))
    bk.update_running_stats(drm, drv, n, dmean, dm2, momentum=0.25)
    _close(dev.get(drm), rm, np.float32)
    _close(dev.get(drv), rv, np.float32)
    y = bk.normalize(x, mean, invstd, gamma, beta, activation="relu")
    dy_ = bk.normalize(dev.put(x), dmean, dev.put(invstd), dev.put(gamma), dev.put(beta),
                       activation="relu")  # fmt: skip
    _close(dev.get(dy_), y, np.float32)
    sdy, sdyx = bk.backward_reduce(g, x, mean, invstd, y=y, dresidual=np.empty_like(x))
    dres = dev.cp.empty(x.shape, np.float32)
    dsdy, dsdyx = bk.backward_reduce(dev.put(g), dev.put(x), dmean, dev.put(invstd), y=dy_,
                                     dresidual=dres)  # fmt: skip
    np.testing.assert_allclose(dev.get(dsdy), sdy, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dev.get(dsdyx), sdyx, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(dev.get(dres), np.where(y > 0, g, 0))
    dx = bk.backward_elementwise(g, x, mean, invstd, gamma, sdy, sdyx, n, y=y)
    ddx = bk.backward_elementwise(dev.put(g), dev.put(x), dmean, dev.put(invstd),
                                  dev.put(gamma), dsdy, dsdyx, n, y=dy_)  # fmt: skip
    _close(dev.get(ddx), dx, np.float32)


def test_population_stats_on_the_device(dev):
    x = _data((12, 3, 5), 1, np.float64, seed=13)[0]
    want = bk.population_stats([x[:5], x[5:]])
    got = bk.population_stats([dev.put(x[:5]), dev.put(x[5:])])
    assert got[0] == want[0]
    np.testing.assert_allclose(dev.get(got[1]), want[1], rtol=1e-14)
    np.testing.assert_allclose(dev.get(got[2]), want[2], rtol=1e-13)


# ---- where arrays live --------------------------------------------------------------------------


def test_outputs_live_on_x_device_and_kernels_run_on_its_current_stream(fake):
    x, gamma, beta = _data((4, 3, 6), 1, np.float32)
    dx_ = fake.put(x, device=1)
    y, mean, invstd = bk.batch_norm_forward(dx_, fake.put(gamma, 1), fake.put(beta, 1))
    for a in (y, mean, invstd):
        assert isinstance(a, fake.cp.ndarray) and a.device.id == 1
    launches = fake.kernels.launches
    assert [n for n, _, _ in launches] == ["channel_stats", "finish_stats", "normalize"]
    assert {(s, d) for _, s, d in launches} == {(fake.cp.streams[1], 1)}
    assert fake.cp.current_device == 0  # (restored)


def test_the_fused_calls_never_synchronize(fake):
    x, gamma, beta = _data((4, 3, 6), 1, np.float32)
    rm, rv = fake.put(np.zeros(3, np.float32)), fake.put(np.ones(3, np.float32))
    dx_, dg = fake.put(x), fake.put(gamma)
    _, mean, invstd = bk.batch_norm_forward(dx_, dg, fake.put(beta), running_mean=rm,
                                            running_var=rv)  # fmt: skip
    bk.batch_norm_backward(fake.put(x), dx_, mean, invstd, dg)
    bk.batch_norm_forward(dx_, dg, running_mean=rm, running_var=rv, training=False)
    layer = bk.BatchNorm(3, device=0)
    layer.backward(layer.forward(dx_))
    assert fake.cp.syncs == 0
    # a mask's count is checked before anything is written: one read back, said in the docs
    bk.batch_norm_forward(dx_, mask=fake.put(np.ones((4, 6), bool)))
    assert fake.cp.syncs == 1


def test_cuda_array_interface_and_dlpack_arrays_are_taken_without_a_copy(fake):
    x, gamma, beta = _data((4, 3, 6), 1, np.float32)
    want, _, _ = bk.batch_norm_forward(x, gamma, beta)
    owner = fake.put(x)
    out_owner = fake.cp.zeros(x.shape, np.float32)
    rm_owner = fake.cp.zeros(3, np.float32)
    out = TorchLikeCuda(out_owner)
    y, _, _ = bk.batch_norm_forward(
        TorchLikeCuda(owner), DLPackCuda(fake.put(gamma)), TorchLikeCuda(fake.put(beta)),
        running_mean=TorchLikeCuda(rm_owner), running_var=fake.put(np.ones(3, np.float32)),
        out=out,
    )  # fmt: skip
    assert y is out  # (out= is returned as given, as with NumPy arrays)
    _close(fake.get(out_owner), want, np.float32)  # written where the caller's tensor lives
    assert fake.get(rm_owner).any()  # the running mean updated in the caller's memory
    # in place on the device: out is x itself
    y2, _, _ = bk.batch_norm_forward(owner, out=owner)
    assert y2 is owner


def test_read_only_device_outputs_are_refused(fake):
    x = fake.put(_data((4, 3, 6), 1, np.float32)[0])
    out = TorchLikeCuda(fake.cp.zeros((4, 3, 6), np.float32), readonly=True)
    with pytest.raises(ValueError, match=r"^out: is read-only"):
        bk.batch_norm_forward(x, out=out)
    rm = TorchLikeCuda(fake.cp.zeros(3, np.float32), readonly=True)
    with pytest.raises(ValueError, match=r"^running_mean: is read-only"):
        bk.batch_norm_forward(x, running_mean=rm, running_var=fake.cp.ones(3, np.float32))


@pytest.mark.parametrize("where", ["gamma", "running_mean", "out", "residual"])
def test_host_and_device_arrays_are_not_mixed(fake, where):
    x, gamma, _ = _data((4, 3, 6), 1, np.float32)
    args = {"gamma": gamma, "running_mean": np.zeros(3, np.float32), "out": None,
            "residual": np.zeros_like(x), "running_var": np.ones(3, np.float32)}  # fmt: skip
    on_device = {k: (None if v is None else fake.put(v)) for k, v in args.items()}
    if where == "out":
        args["out"] = np.empty_like(x)
    # x on the device, the one argument on the host
    bad = dict(on_device, **{where: args[where]})
    with pytest.raises(TypeError, match=rf"^{where}: a NumPy array in host memory, while x is on "
                       r"CUDA device 0"):  # fmt: skip
        bk.batch_norm_forward(fake.put(x), **bad)
    # x on the host, the one argument on the device
    host = dict(args)
    host[where] = fake.put(args[where])
    with pytest.raises(TypeError, match=rf"^{where}: an array on CUDA device 0, while x is a "
                       r"NumPy array in host memory"):  # fmt: skip
        bk.batch_norm_forward(x, **host)
    # two devices
    other = dict(on_device, **{where: fake.put(args[where], device=1)})
    with pytest.raises(ValueError, match=rf"^{where}: on CUDA device 1, while x is on CUDA "
                       r"device 0"):  # fmt: skip
        bk.batch_norm_forward(fake.put(x), **other)
    assert not fake.kernels.launches  # refused before anything ran


def test_backward_and_phases_refuse_mixed_arrays(fake):
    x = _data((4, 3, 6), 1, np.float32)[0]
    _, mean, invstd = bk.batch_norm_forward(x)
    with pytest.raises(TypeError, match=r"^dy: a NumPy array in host memory, while x is on CUDA"):
        bk.batch_norm_backward(x, fake.put(x), fake.put(mean), fake.put(invstd))
    with pytest.raises(TypeError, match=r"^mean: a NumPy array in host memory"):
        bk.batch_norm_backward(fake.put(x), fake.put(x), mean, fake.put(invstd))
    with pytest.raises(TypeError, match=r"^mask: a NumPy array in host memory"):
        bk.channel_stats(fake.put(x), mask=np.ones((4, 6), bool))
    with pytest.raises(TypeError, match=r"^stats\[1\]: in host memory, while stats\[0\] is on "):
        bk.merge_stats(bk.channel_stats(fake.put(x)), bk.channel_stats(x))
    with pytest.raises(TypeError, match=r"^mean: a NumPy array in host memory"):
        bk.update_running_stats(fake.cp.zeros(3), None, 5, mean, fake.put(np.ones(3)))


def test_overlap_rule_on_the_device(fake):
    x = fake.put(_data((4, 3, 6), 1, np.float32)[0])
    buf = fake.cp.zeros(6, np.float32)
    with pytest.raises(ValueError, match=r"^running_mean: overlaps running_var"):
        bk.batch_norm_forward(x, running_mean=buf[:3], running_var=buf[2:5])
    big = fake.cp.ones(80, np.float32)
    x2, shifted = big[:72].reshape(4, 3, 6), big[4:76].reshape(4, 3, 6)
    with pytest.raises(ValueError, match=r"^out: overlaps an input array \(x\)"):
        bk.batch_norm_forward(x2, out=shifted)  # (a partial overlap: only x itself is allowed)


# ---- the variants -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_variants_match_the_cpu(dev, dtype):
    x, gamma, beta = _data((8, 3, 5), 1, dtype, seed=16)
    g = _data((8, 3, 5), 1, dtype, seed=17)[0]
    rm, rv = np.full(3, 0.3, dtype), np.full(3, 1.7, dtype)
    y, mean, invstd, r, d = bk.batch_renorm_forward(
        x, gamma, beta, running_mean=rm, running_var=rv, r_max=1.5, d_max=0.5
    )
    drm, drv = dev.put(np.full(3, 0.3, dtype)), dev.put(np.full(3, 1.7, dtype))
    gy, gmean, ginvstd, gr, gd = bk.batch_renorm_forward(
        dev.put(x), dev.put(gamma), dev.put(beta), running_mean=drm, running_var=drv,
        r_max=1.5, d_max=0.5,
    )  # fmt: skip
    _close(dev.get(gy), y, dtype)
    np.testing.assert_allclose(dev.get(gr), r, rtol=1e-13)
    np.testing.assert_allclose(dev.get(gd), d, rtol=1e-12, atol=1e-13)
    _close(dev.get(drv), rv, dtype)
    want = bk.batch_renorm_backward(g, x, mean, invstd, r, d, gamma)
    got = bk.batch_renorm_backward(dev.put(g), dev.put(x), gmean, ginvstd, gr, gd, dev.put(gamma))
    _close(dev.get(got[0]), want[0], dtype)
    np.testing.assert_allclose(dev.get(got[1]), want[1], rtol=1e-6, atol=1e-9)
    # ghost batch normalization, two virtual batches
    y, mean, invstd = bk.ghost_batch_norm_forward(x, gamma, beta, virtual_batch_size=4,
                                                  running_mean=rm, running_var=rv)  # fmt: skip
    gy, gmean, ginvstd = bk.ghost_batch_norm_forward(
        dev.put(x), dev.put(gamma), dev.put(beta), virtual_batch_size=4, running_mean=drm,
        running_var=drv,
    )  # fmt: skip
    assert gmean.shape == (2, 3)
    _close(dev.get(gy), y, dtype)
    _close(dev.get(drm), rm, dtype)
    want = bk.ghost_batch_norm_backward(g, x, mean, invstd, gamma, virtual_batch_size=4)
    got = bk.ghost_batch_norm_backward(dev.put(g), dev.put(x), gmean, ginvstd, dev.put(gamma),
                                       virtual_batch_size=4)  # fmt: skip
    _close(dev.get(got[0]), want[0], dtype)
    np.testing.assert_allclose(dev.get(got[2]), want[2], rtol=1e-6, atol=1e-9)


def test_per_channel_arithmetic_runs_on_x_device(fake):
    """CuPy runs elementwise work on the current device and refuses arrays from another (the
    stand-in does too): every function makes x's device current around its own arithmetic."""
    x, gamma, beta = _data((8, 3, 5), 1, np.float32, seed=18)
    on1 = {k: fake.put(v, device=1) for k, v in {"x": x, "g": gamma, "b": beta}.items()}
    rm, rv = fake.put(np.zeros(3, np.float32), 1), fake.put(np.ones(3, np.float32), 1)
    y, mean, invstd, r, d = bk.batch_renorm_forward(on1["x"], on1["g"], on1["b"],
                                                    running_mean=rm, running_var=rv)  # fmt: skip
    bk.batch_renorm_backward(on1["x"], on1["x"], mean, invstd, r, d, on1["g"])
    bk.ghost_batch_norm_backward(on1["x"], on1["x"], *bk.ghost_batch_norm_forward(
        on1["x"], virtual_batch_size=2)[1:], virtual_batch_size=2)  # fmt: skip
    bk.batch_norm_backward(
        on1["x"], on1["x"], mean, invstd, mask=fake.put(np.ones((8, 5), bool), 1)
    )
    layer = bk.BatchNorm(3, device=1, renorm=True)
    layer.backward(layer.forward(on1["x"]))
    ghost = bk.BatchNorm(3, device=1, virtual_batch_size=4)
    ghost.backward(ghost.forward(on1["x"]))
    assert y.device.id == 1 and fake.cp.current_device == 0
    assert {d for _, _, d in fake.kernels.launches} == {1}


# ---- the layer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_layer_on_a_device_trains_as_on_the_host(dev, convention):
    host = bk.BatchNorm(4, axis=1, convention=convention)
    gpu = bk.BatchNorm(4, axis=1, convention=convention, device="cuda:0", activation=None)
    assert isinstance(gpu.running_mean, dev.cp.ndarray) and gpu.device == 0
    rng = np.random.default_rng(14)
    for step in range(3):
        x = (rng.standard_normal((8, 4, 5)) * 3 + step).astype(np.float32)
        g = rng.standard_normal((8, 4, 5)).astype(np.float32)
        y = host.forward(x)
        dx = host.backward(g)
        dy_ = gpu.forward(dev.put(x))
        ddx = gpu.backward(dev.put(g))
        _close(dev.get(dy_), y, np.float32)
        _close(dev.get(ddx), dx, np.float32)
        for k in ("gamma", "beta"):
            host.params[k] -= 0.1 * host.grads[k]
            gpu.params[k] -= 0.1 * gpu.grads[k]
    state, gstate = host.state_dict(), gpu.state_dict()
    assert set(state) == set(gstate)
    for k in state:
        assert type(gstate[k]) is np.ndarray  # state dicts come back as NumPy
        np.testing.assert_allclose(gstate[k], state[k], rtol=1e-5, atol=1e-6)
    host.eval()
    gpu.eval()
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    _close(dev.get(gpu.forward(dev.put(x))), host.forward(x), np.float32)
    # loading NumPy weights into a layer on a device, and moving it back
    fresh = bk.BatchNorm(4, axis=1, convention=convention, device=0)
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(dev.get(fresh.running_var), host.running_var)
    fresh.to("cpu")
    assert type(fresh.running_var) is np.ndarray
    np.testing.assert_array_equal(fresh.running_var, host.running_var)


def test_layer_refuses_data_on_the_other_side(fake):
    layer = bk.BatchNorm(3, device="cuda")
    with pytest.raises(TypeError, match=r"^x: in host memory, while the layer lives on CUDA "
                       r"device 0: move the data, or the layer with layer.to"):  # fmt: skip
        layer.forward(np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match=r"^x: on CUDA device 0, while the layer lives in host"):
        bk.BatchNorm(3).forward(fake.put(np.ones((4, 3), np.float32)))
    with pytest.raises(ValueError, match=r"^device: expected None, 'cpu', 'cuda'"):
        bk.BatchNorm(3, device="gpu")


# ---- what a CPU-only user gets ------------------------------------------------------------------


def test_torch_cpu_tensors_stay_on_the_host():
    """torch.Tensor's class has __cuda_array_interface__ (a property that raises for a CPU
    tensor): a CPU tensor is host data, read through NumPy, never the device path."""
    torch = pytest.importorskip("torch")
    x = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(0))
    y, mean, _ = bk.batch_norm_forward(x, torch.ones(3), torch.zeros(3))
    want, wmean, _ = bk.batch_norm_forward(
        x.numpy(), np.ones(3, np.float32), np.zeros(3, np.float32)
    )
    assert type(y) is np.ndarray
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(mean, wmean)


def test_a_cpu_only_user_never_imports_cupy_or_the_cuda_module():
    code = (
        "import sys, numpy as np, bnkernel as bk\n"
        "x = np.random.default_rng(0).standard_normal((8, 3, 4)).astype(np.float32)\n"
        "y, m, s = bk.batch_norm_forward(x)\n"
        "bk.batch_norm_backward(x, x, m, s)\n"
        "layer = bk.BatchNorm(3); layer.backward(layer.forward(x))\n"
        "bad = [k for k in ('cupy', 'bnkernel._cuda', 'torch') if k in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_without_the_cuda_module_device_arrays_say_how_to_build_it(fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "bnkernel._cuda", None)
    with pytest.raises(ImportError, match=r"built without its CUDA kernels.*BNKERNEL_CUDA=ON"):
        bk.batch_norm_forward(fake.put(np.ones((4, 3), np.float32)))


# ---- bench --device cuda ------------------------------------------------------------------------


def test_bench_device_cuda_runs_on_the_stand_ins(fake, tmp_path, capsys):
    """The table's plumbing (options, timing with events, the copy bandwidth, the check against
    the float64 reference, JSON); the GPU machine's run gives the numbers."""
    from bnkernel.__main__ import main

    out = tmp_path / "cuda.json"
    rc = main(["bench", "--device", "cuda", "--shapes", "4x3x5x6", "--repeat", "2",
               "--min-time", "0", "--no-torch", "--no-numpy", "--copy-mib", "1",
               "--json", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "bench --device cuda: Fake GPU 0" in text
    import json

    rows = json.loads(out.read_text())["rows"]
    assert {(r["layout"], r["dtype"], r["op"]) for r in rows} == {
        (lo, dt, op) for lo in ("NCHW", "NHWC") for dt in ("float32", "float16")
        for op in ("forward_train", "forward_infer", "backward_train")
    }  # fmt: skip
    assert all(r["passes"] > 0 and r["gbps"] > 0 for r in rows)


def test_bench_device_cuda_refuses_what_does_not_apply(fake, capsys):
    from bnkernel.__main__ import main

    assert main(["bench", "--device", "cuda", "--sweep"]) == 2
    assert "--sweep does not apply to --device cuda" in capsys.readouterr().err
    assert main(["bench", "--device", "cuda", "--dtypes", "bfloat16"]) == 2
    assert "CuPy has no bfloat16" in capsys.readouterr().err


def test_bench_device_cuda_without_a_gpu_says_why(capsys):
    if gpu_reason() is None:
        pytest.skip("a GPU is here")
    from bnkernel.__main__ import main

    assert main(["bench", "--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "bench: error: " in err
    assert any(s in err for s in ("no usable GPU", "need CuPy", "built without its CUDA"))


# ---- any size ------------------------------------------------------------------------------------


def test_empty_batches_and_tiny_ones_in_the_split_phases(dev):
    """A process of a data-parallel job may get no samples: (0, 0, 0) statistics, nothing to
    normalize; and N*H*W < 32."""
    empty = dev.put(np.zeros((0, 3, 4), np.float32))
    n, mean, m2 = bk.channel_stats(empty)
    assert n == 0
    np.testing.assert_array_equal(dev.get(mean), 0.0)
    np.testing.assert_array_equal(dev.get(m2), 0.0)
    y = bk.normalize(empty, mean, dev.put(np.ones(3)))
    assert y.shape == (0, 3, 4)
    sdy, sdyx = bk.backward_reduce(empty, empty, mean, dev.put(np.ones(3)))
    np.testing.assert_array_equal(dev.get(sdy), 0.0)
    np.testing.assert_array_equal(dev.get(sdyx), 0.0)
    tiny = _data((2, 5, 3), -1, np.float64, seed=19)[0]
    want = bk.batch_norm_forward(tiny, axis=-1)[0]
    _close(dev.get(bk.batch_norm_forward(dev.put(tiny), axis=-1)[0]), want, np.float64)


@pytest.mark.parametrize("shape,axis", [((3, 10**6), 1), ((2, 20_000, 3), 1)],
                         ids=["C=1e6 channels-last", "C=2e4 planar"])  # fmt: skip
def test_many_channels(dev, shape, axis):
    x = _data(shape, axis, np.float32, seed=20)[0]
    y, mean, _ = bk.batch_norm_forward(x, axis=axis)
    dy_, dmean, _ = bk.batch_norm_forward(dev.put(x), axis=axis)
    np.testing.assert_allclose(dev.get(dmean), mean, rtol=1e-12, atol=1e-12)
    _close(dev.get(dy_), y, np.float32)
