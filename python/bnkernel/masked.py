"""Batch normalization with a mask of valid positions (padded sequences): the statistics and the
running update from the valid positions only, every position normalized, and the exact gradient,
in which padding that is not finite enters no sum.  :func:`bnkernel.batch_norm_forward` and
:func:`bnkernel.batch_norm_backward` come here when given ``mask=``; SyncBatchNorm's masked
backward shares :func:`masked_sums`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _checks as chk
from . import _core, _device
from .phases import invstd_of, running_update


def masked_count(valid: NDArray[np.bool_]) -> int:
    """The number of valid positions, at least 2 in training (checked before anything is written:
    for a mask on a device this reads the count back to the host, one synchronization)."""
    count = int(valid.sum()) if chk.on_device(valid) else int(np.count_nonzero(valid))
    if count < 2:
        raise ValueError(f"mask: expected at least 2 valid positions when training, got {count}")
    return count


def masked_forward(
    x: Any, gamma: Any, beta: Any, mask: Any, running_mean: Any, running_var: Any,
    training: bool, momentum: Any, eps: Any, axis: Any, unbiased: Any, relu: bool, residual: Any,
    out: Any,
) -> tuple[NDArray[Any], NDArray[np.float64], NDArray[np.float64]]:  # fmt: skip
    if not training:
        raise ValueError("mask: only used in training (inference uses the running statistics)")
    call = chk.Call()
    xa = call.data(x, axis, allow_empty=True)
    valid = call.mask(mask)
    assert valid is not None
    if xa.size == 0:
        from .functional import empty_training_forward

        chk.eps(eps)
        return empty_training_forward(call, gamma, beta, running_mean, running_var, momentum, out,
                                      residual)  # fmt: skip
    count = masked_count(valid)
    eps_f = chk.eps(eps)
    mom = chk.weight(momentum)
    unbiased = chk.flag(unbiased, "running_var_unbiased")
    g, b, rm, rv, y, res3 = call.training_forward(
        gamma, beta, running_mean, running_var, out, residual
    )
    call.seal()
    # the statistics of the valid positions (one pass, the mask read alongside), then the
    # normalize of every position
    x3 = call.view3(xa)
    mean = call.empty(call.C, np.float64)
    m2 = call.empty(call.C, np.float64)
    k = call.kernels
    if call.device is None:
        n = int(_core.masked_channel_stats(x3, chk.mask_view(valid, x3), mean, m2))
        invstd = invstd_of(n, m2, eps_f)
    else:  # (n: known already; invstd and the running update in one launch)
        n = count
        k.channel_stats(x3, mean, m2, chk.mask_view(valid, x3))
        invstd = call.empty(call.C, np.float64)
        k.update_running_stats(rm, rv, n, mean, m2, mom, unbiased, invstd=invstd, eps=eps_f)
    k.normalize(x3, mean, invstd, g, b, y.reshape(x3.shape), res3, relu)
    if call.device is None:
        running_update(rm, rv, n, mean, m2, mom, unbiased)
    call.finish()
    return (y if out is None else out), mean, invstd


def masked_sums(
    dy3: NDArray[Any], x3: NDArray[Any], valid: NDArray[np.bool_], mean: NDArray[np.float64],
    invstd: NDArray[np.float64], y3: NDArray[Any] | None, dres3: NDArray[Any] | None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:  # fmt: skip
    """``(sum(g), sum(g * xhat))`` over every position (g: dy, ReLU-masked with y), except that a
    padded position whose value or gradient is not finite (NaN or inf padding) enters no sum:
    padding never poisons the valid positions' gradients.  Finite padding enters as it always
    did, so the common case is one pass and bit for bit the unmasked reduction."""
    C = x3.shape[1]
    if chk.on_device(x3):  # (the CUDA sums leave out non-finite padding in the same pass)
        k = _device.Kernels(_device.device_of(x3))
        sum_dy = _device.empty(_device.device_of(x3), C, np.float64)
        sum_dy_xhat = _device.empty(_device.device_of(x3), C, np.float64)
        mask = chk.kernel_view(valid).view(np.uint8)
        k.backward_reduce(dy3, x3, mean, invstd, sum_dy, sum_dy_xhat, y3, dres3, mask=mask)
        return sum_dy, sum_dy_xhat
    sum_dy = np.empty(C, dtype=np.float64)
    sum_dy_xhat = np.empty(C, dtype=np.float64)
    _core.backward_reduce(dy3, x3, mean, invstd, sum_dy, sum_dy_xhat, y3, dres3)
    if np.isfinite(sum_dy).all() and np.isfinite(sum_dy_xhat).all():
        return sum_dy, sum_dy_xhat
    padded = ~valid.reshape(x3.shape[0], 1, x3.shape[2])
    bad = padded & ~(np.isfinite(x3) & np.isfinite(dy3))
    if not bad.any():
        return sum_dy, sum_dy_xhat  # the valid positions' own values are not finite: honest NaN
    # those positions again with x = mean and dy = 0: a term of exactly 0 each
    xs = np.where(bad, mean.reshape(1, C, 1).astype(x3.dtype), x3)
    dys = np.where(bad, np.zeros((), dy3.dtype), dy3)
    _core.backward_reduce(dys, xs, mean, invstd, sum_dy, sum_dy_xhat, y3, None)
    return sum_dy, sum_dy_xhat


def masked_backward(
    dy: Any, x: Any, mean: Any, invstd: Any, gamma: Any, mask: Any, axis: Any, relu: bool,
    y: Any, residual_grad: bool, out: Any,
) -> tuple[NDArray[Any], ...]:  # fmt: skip
    """The training backward with a mask (the frozen one does not depend on it)."""
    call = chk.Call()
    xa = call.data(x, axis, allow_empty=True)
    dy3 = call.grad(dy, allow_empty=True)
    valid = call.mask(mask)
    assert valid is not None
    if xa.size == 0:  # an empty batch: the frozen backward gives the same (nothing)
        from .functional import batch_norm_backward

        frozen: tuple[NDArray[Any], ...] = batch_norm_backward(  # type: ignore[call-overload]
            dy, x, mean, invstd, gamma, training=False, axis=axis,
            activation="relu" if relu else None, y=y, residual_grad=residual_grad, out=out,
        )  # fmt: skip
        return frozen
    count = masked_count(valid)
    arrays = call.backward_arrays(mean, invstd, gamma, y, out)
    m, s, _, y3, _ = arrays
    call.seal()
    x3 = call.view3(xa)
    dres = call.empty(xa.shape, xa.dtype) if relu else None
    # the sums over every position, then dx with the mask (padded positions: the direct term)
    sum_dy, sum_dy_xhat = masked_sums(
        dy3, x3, valid.reshape(x3.shape[0], x3.shape[2]), m, s, y3,
        None if dres is None else dres.reshape(x3.shape),
    )  # fmt: skip
    return backward_from_sums(call, arrays, dy3, x3, sum_dy, sum_dy_xhat, count, valid,
                              residual_grad, dres, dy, out)  # fmt: skip


def backward_from_sums(
    call: chk.Call, arrays: chk.BackwardArrays, dy3: NDArray[Any], x3: NDArray[Any],
    sum_dy: NDArray[np.float64], sum_dy_xhat: NDArray[np.float64], count: int,
    valid: NDArray[np.bool_] | None, residual_grad: bool, dres: NDArray[Any] | None, dy: Any,
    out: Any,
) -> tuple[NDArray[Any], ...]:  # fmt: skip
    """The end of a training backward whose sums were reduced apart (under a mask, or over several
    processes): dx (the direct term only at padded positions), the write-back of ``call``, and
    ``(dx, dgamma, dbeta)``, with the residual's gradient (``dres``, else dy) when asked."""
    m, s, g, y3, dx = arrays
    mv = None if valid is None else chk.mask_view(valid, x3)
    call.kernels.backward_elementwise(dy3, x3, m, s, g, sum_dy, sum_dy_xhat, count,
                               dx.reshape(x3.shape), y3, mv)  # fmt: skip
    call.finish()
    P = chk.param_dtype(x3.dtype)
    dgamma, dbeta = sum_dy_xhat.astype(P), sum_dy.astype(P)
    dx = dx if out is None else out
    if residual_grad:
        return dx, dgamma, dbeta, (dres if dres is not None else chk.as_array(dy, "dy"))
    return dx, dgamma, dbeta
