"""bnkernel against torch.nn.functional.batch_norm on the same data: forward (training and eval),
backward through autograd (dx, dgamma, dbeta), running statistics.

Tolerances: in float64 both are exact to ~1e-15 (1e-12 is a wide margin).  In float32 torch
computes in float32 with its own summation order, so its own results carry a few ulps of error
(measured: up to ~5e-7 of the largest magnitude on these shapes); bnkernel's are within half an
ulp of the float64 result.  5e-6 (relative, and absolute on the quantity's magnitude) is "a few
1e-6": an order of magnitude above torch's error, far below any formula difference (a biased vs
unbiased running variance differs by 1/m ~ 1e-3 here, eps 1e-5 vs 1e-3 by ~1e-3)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    DTYPE_IDS,
    DTYPES,
    Layout,
    assert_close,
    channel_abs_sum,
    forward_inference,
    make_case,
    xhat_of,
)

import bnkernel as bk

torch = pytest.importorskip("torch")
F = torch.nn.functional

TORCH_TOL = {np.dtype(np.float32): 5e-6, np.dtype(np.float64): 1e-12}

LAYOUTS = [
    Layout("NCHW-C17", (8, 17, 6, 5), 1),
    Layout("NCHW-C1", (16, 1, 8, 8), 1),
    Layout("NHWC-C17", (8, 6, 5, 17), -1),
    Layout("NHWC-C1", (16, 8, 8, 1), -1),
    Layout("NC-C17", (64, 17), 1),
    Layout("NCL-C3", (8, 3, 40), 1),
    Layout("mt-NCHW-C3", (64, 3, 32, 32), 1),
    Layout("mt-NHWC-C32", (8, 16, 16, 32), -1),
]


@pytest.fixture(params=[pytest.param(lay, id=lay.name) for lay in LAYOUTS])
def tcase(request, dtype):
    return make_case(request.param, dtype)


def to_torch(a, axis, grad=False):
    """A torch tensor with the channel axis moved to 1 (torch's convention)."""
    t = torch.tensor(np.ascontiguousarray(np.moveaxis(a, axis, 1)))
    return t.requires_grad_(grad)


def from_torch(t, axis):
    return np.moveaxis(t.detach().numpy(), 1, axis)


def torch_run(case, training, momentum=0.1, eps=1e-5):
    """torch's (y, dx, dgamma, dbeta, running_mean, running_var) with dL/dy = case.dy."""
    x = to_torch(case.x, case.axis, grad=True)
    g = torch.tensor(case.gamma, requires_grad=True)
    b = torch.tensor(case.beta, requires_grad=True)
    rm = torch.tensor(case.running_mean.copy())
    rv = torch.tensor(case.running_var.copy())
    y = F.batch_norm(x, rm, rv, g, b, training=training, momentum=momentum, eps=eps)
    y.backward(to_torch(case.dy, case.axis))
    return (
        from_torch(y, case.axis),
        from_torch(x.grad, case.axis),
        g.grad.numpy(),
        b.grad.numpy(),
        rm.numpy(),
        rv.numpy(),
    )


def check_grads(case, mean, invstd, dx, dgamma, dbeta, t_dx, t_dgamma, t_dbeta):
    t = TORCH_TOL[case.dtype]
    assert_close(dx, t_dx, t, what="dx")
    # parameter gradients are sums: their error is relative to the summed magnitudes
    scale_b = channel_abs_sum(case.dy, case.axis).max()
    scale_g = channel_abs_sum(case.dy * xhat_of(case.x, mean, invstd, case.axis), case.axis).max()
    assert_close(dbeta, t_dbeta, t, scale=scale_b, what="dbeta")
    assert_close(dgamma, t_dgamma, t, scale=scale_g, what="dgamma")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_training_matches_torch(tcase, affine):
    case = tcase
    if not affine:
        case.gamma = np.ones(case.C, case.dtype)
        case.beta = np.zeros(case.C, case.dtype)
    t_y, t_dx, t_dgamma, t_dbeta, t_rm, t_rv = torch_run(case, training=True)
    rm, rv = case.running_mean.copy(), case.running_var.copy()
    g, b = (case.gamma, case.beta) if affine else (None, None)
    y, mean, invstd = bk.batch_norm_forward(
        case.x, g, b, running_mean=rm, running_var=rv, momentum=0.1, eps=1e-5, axis=case.axis
    )
    dx, dgamma, dbeta = bk.batch_norm_backward(case.dy, case.x, mean, invstd, g, axis=case.axis)
    t = TORCH_TOL[case.dtype]
    assert_close(y, t_y, t, what="y")
    assert_close(rm, t_rm, t, what="running_mean")
    assert_close(rv, t_rv, t, what="running_var")
    check_grads(case, mean, invstd, dx, dgamma, dbeta, t_dx, t_dgamma, t_dbeta)


def test_eval_matches_torch(tcase):
    case = tcase
    t_y, t_dx, t_dgamma, t_dbeta, t_rm, t_rv = torch_run(case, training=False, eps=1e-3)
    y, mean, invstd = forward_inference(case, eps=1e-3)
    dx, dgamma, dbeta = bk.batch_norm_backward(
        case.dy, case.x, mean, invstd, case.gamma, training=False, axis=case.axis
    )
    assert_close(y, t_y, TORCH_TOL[case.dtype], what="y")
    check_grads(case, mean, invstd, dx, dgamma, dbeta, t_dx, t_dgamma, t_dbeta)
    # eval leaves the running statistics alone in both
    np.testing.assert_array_equal(t_rm, case.running_mean)
    np.testing.assert_array_equal(t_rv, case.running_var)


def test_saved_statistics_match_torch(tcase):
    """torch.native_batch_norm's save_mean / save_invstd: what bnkernel returns as mean, invstd."""
    case = tcase
    x = to_torch(case.x, case.axis)
    _, t_mean, t_invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    _, mean, invstd = bk.batch_norm_forward(case.x, axis=case.axis)
    t = TORCH_TOL[case.dtype]
    assert_close(mean, t_mean.double().numpy(), t, scale=float(np.abs(case.x).max()))
    assert_close(invstd, t_invstd.double().numpy(), t)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cumulative_average_matches_torch_momentum_none(dtype):
    """torch's momentum=None (cumulative average) is momentum = 1 / num_batches_tracked."""
    C = 5
    module = torch.nn.BatchNorm2d(C, momentum=None, dtype=getattr(torch, np.dtype(dtype).name))
    module.train()
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    for k in range(1, 5):
        case = make_case(Layout("NCHW", (4, C, 3, 3), 1), dtype, seed=k)
        x = case.x * k + k  # batches with different statistics
        with torch.no_grad():
            module(torch.tensor(x))
        bk.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=1.0 / k)
        assert_close(rm, module.running_mean.numpy(), TORCH_TOL[np.dtype(dtype)], what="mean")
        assert_close(rv, module.running_var.numpy(), TORCH_TOL[np.dtype(dtype)], what="var")


# ---- 16-bit data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.name for lay in LAYOUTS])
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_matches_torch_mixed_precision(layout, half):
    """torch's CPU batch norm on float16 / bfloat16 data with float32 weights and running
    statistics (its mixed-precision path): the same outputs to one ulp of the 16-bit dtype, plus
    torch's float32 error near zero (torch computes in float32, so a value within ~1e-7 of a
    rounding midpoint can land on the other side; bnkernel's own error is half an ulp,
    tests/test_half.py); running statistics and dgamma / dbeta to float32's few ulps."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    ndt = np.dtype(np.float16) if half == "float16" else np.dtype(ml_dtypes.bfloat16)
    tdt = getattr(torch, half)
    c = make_case(layout, np.float32)
    ax = layout.ax
    x = c.x.astype(ndt)
    dy = c.dy.astype(ndt)
    rm, rv = c.running_mean.copy(), c.running_var.copy()
    y, mean, invstd = bk.batch_norm_forward(
        x, c.gamma, c.beta, running_mean=rm, running_var=rv, axis=layout.axis
    )
    dx, dgamma, dbeta = bk.batch_norm_backward(dy, x, mean, invstd, c.gamma, axis=layout.axis)

    tx = to_torch(x.astype(np.float32), ax).to(tdt).requires_grad_(True)
    tg = torch.from_numpy(c.gamma.copy()).requires_grad_(True)
    tb = torch.from_numpy(c.beta.copy()).requires_grad_(True)
    trm = torch.from_numpy(c.running_mean.copy())
    trv = torch.from_numpy(c.running_var.copy())
    ty = F.batch_norm(tx, trm, trv, tg, tb, training=True, momentum=0.1, eps=1e-5)
    assert ty.dtype == tdt
    ty.backward(to_torch(dy.astype(np.float32), ax).to(tdt))

    spacing = 2.0 ** (-10 if half == "float16" else -7)  # an ulp, relative, in [1, 2)
    for ours, theirs, what in ((y, ty, "y"), (dx, tx.grad, "dx")):
        t = from_torch(theirs.float(), ax).astype(np.float64)
        o = ours.astype(np.float64)
        # one ulp of the value, plus torch's float32 error on the terms that cancel near zero (as
        # in the float32 tests: TORCH_TOL of the largest magnitude)
        floor = TORCH_TOL[np.dtype(np.float32)] * float(np.max(np.abs(t)))
        bound = spacing * np.abs(t) + floor
        assert np.all(np.abs(o - t) <= bound), what
    assert_close(rm, trm.numpy(), TORCH_TOL[np.dtype(np.float32)], what="running_mean")
    assert_close(rv, trv.numpy(), TORCH_TOL[np.dtype(np.float32)], what="running_var")
    sums = channel_abs_sum(dy, ax)
    assert_close(dbeta, tb.grad.numpy(), 1e-5, scale=float(sums.max()), what="dbeta")
    assert_close(dgamma, tg.grad.numpy(), 1e-5, scale=float(sums.max()) * 4, what="dgamma")


# ---- torch.nn's habits ---------------------------------------------------------------------------


def _torch_layer(C: int, dim: int) -> object:
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[dim](C)


@pytest.mark.parametrize(
    "shape", [(0, 3), (0, 3, 5), (0, 3, 4, 4)], ids=["N0xC", "N0xCxL", "N0xCxHxW"]
)
def test_empty_batch_as_torch(shape):
    """torch.nn's BatchNorm on N = 0: an empty output, the running statistics untouched,
    num_batches_tracked counted, zero gradients for the weight and bias."""
    C = shape[1]
    theirs = _torch_layer(C, len(shape))
    ours = bk.BatchNorm(C)
    x = torch.zeros(shape, requires_grad=True)
    ty = theirs(x)
    ty.sum().backward()
    y = ours.forward(np.zeros(shape, np.float32))
    dx = ours.backward(np.ones(shape, np.float32))
    assert y.shape == tuple(ty.shape) and dx.shape == tuple(x.grad.shape)
    np.testing.assert_array_equal(ours.running_mean, theirs.running_mean.numpy())
    np.testing.assert_array_equal(ours.running_var, theirs.running_var.numpy())
    assert ours.num_batches_tracked == int(theirs.num_batches_tracked)
    np.testing.assert_array_equal(ours.grads["gamma"], theirs.weight.grad.numpy())
    np.testing.assert_array_equal(ours.grads["beta"], theirs.bias.grad.numpy())


def test_reset_running_stats_and_reset_parameters_as_torch():
    """torch's simple-average scenario calls reset_running_stats(); reset_parameters() also puts
    back weight 1 and bias 0."""
    rng = np.random.default_rng(5)
    theirs = torch.nn.BatchNorm2d(3, momentum=None)
    ours = bk.BatchNorm(3, momentum=None)
    for _ in range(3):
        x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
        theirs(torch.from_numpy(x))
        ours.forward(x)
    ours.params["gamma"][...] = 2.0
    with torch.no_grad():
        theirs.weight.fill_(2.0)
    ours.reset_running_stats()
    theirs.reset_running_stats()
    for k in ("running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(ours, k), getattr(theirs, k).numpy())
    assert ours.num_batches_tracked == int(theirs.num_batches_tracked) == 0
    assert (ours.params["gamma"] == 2.0).all()  # (reset_running_stats leaves the weights)
    # the simple average after the reset, as torch's own test checks it
    for _ in range(4):
        x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32) * 2 + 1
        theirs(torch.from_numpy(x))
        ours.forward(x)
    np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), rtol=1e-5)
    ours.reset_parameters()
    theirs.reset_parameters()
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b.numpy())
