"""Batch-normalization variants built on the kernels' split phases: batch renormalization, ghost
(virtual-batch) normalization, and population ("precise") statistics.

Each runs the same compiled kernels as :func:`bnkernel.batch_norm_forward` (statistics, normalize,
the backward's reductions and elementwise pass), so it keeps their accuracy, determinism and
speed; only per-channel arithmetic (C values) happens in NumPy.  Each has a float64 counterpart
in :mod:`bnkernel.reference` that the tests compare with.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _checks as chk
from . import _device
from .phases import Stats, channel_stats, invstd_of, merge_stats, running_update

__all__ = [
    "batch_renorm_backward",
    "batch_renorm_forward",
    "ghost_batch_norm_backward",
    "ghost_batch_norm_forward",
    "population_stats",
    "renorm_corrections",
]

F64 = NDArray[np.float64]


# ---- batch renormalization ---------------------------------------------------------------------


@_device.follows_arrays
def renorm_corrections(
    batch_mean: NDArray[Any],
    batch_var: NDArray[Any],
    running_mean: NDArray[Any],
    running_var: NDArray[Any],
    *,
    eps: float,
    r_max: float,
    d_max: float,
) -> tuple[F64, F64]:
    """Batch renormalization's per-channel corrections ``(r, d)`` (Ioffe 2017), in float64.

    Parameters
    ----------
    batch_mean, batch_var : arrays of shape (C,)
        This batch's mean and biased variance (``M2 / count`` from :func:`~bnkernel.channel_stats`).
    running_mean, running_var : arrays of shape (C,)
        The running statistics as they were before this batch.
    eps : float
        Added to both variances under the square root.
    r_max, d_max : float
        The clipping limits (``r_max >= 1``, ``d_max >= 0``).

    Returns
    -------
    r, d : float64 arrays of shape (C,)
        In the arrays' place (NumPy, or CuPy on the arrays' device).

    Notes
    -----
    ::

        sigma_B = sqrt(batch_var + eps);  sigma = sqrt(running_var + eps)
        r = clip(sigma_B / sigma, 1 / r_max, r_max)
        d = clip((batch_mean - running_mean) / sigma, -d_max, d_max)

    Examples
    --------
    >>> import numpy as np, bnkernel
    >>> r, d = bnkernel.renorm_corrections(np.zeros(2), np.full(2, 4.0), np.ones(2), np.ones(2),
    ...                                    eps=0.0, r_max=3.0, d_max=0.5)
    >>> r, d
    (array([2., 2.]), array([-0.5, -0.5]))
    """
    args = {"batch_mean": batch_mean, "batch_var": batch_var, "running_mean": running_mean,
            "running_var": running_var}  # fmt: skip
    arrays = {k: chk.as_array(v, k) for k, v in args.items()}
    xp = chk.namespace(*arrays.values())
    f64 = {k: xp.asarray(a, np.float64) for k, a in arrays.items()}
    sigma_b = xp.sqrt(f64["batch_var"] + eps)
    sigma = xp.sqrt(f64["running_var"] + eps)
    r: F64 = xp.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d: F64 = xp.clip((f64["batch_mean"] - f64["running_mean"]) / sigma, -d_max, d_max)
    return r, d


@_device.follows_arrays
def batch_renorm_forward(
    x: NDArray[Any],
    gamma: NDArray[Any] | None = None,
    beta: NDArray[Any] | None = None,
    *,
    running_mean: NDArray[Any],
    running_var: NDArray[Any],
    r_max: float = 3.0,
    d_max: float = 5.0,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    running_var_unbiased: bool = True,
    out: NDArray[Any] | None = None,
) -> tuple[NDArray[Any], F64, F64, F64, F64]:
    """Batch Renormalization's training forward (Ioffe 2017).

    Normalizes with the batch's statistics, corrected toward the running ones by ``(r, d)`` from
    :func:`renorm_corrections` (computed against the running statistics as they were before this
    batch), then updates the running statistics::

        y = gamma * ((x - mean) * invstd * r + d) + beta

    Parameters
    ----------
    x : array, ndim >= 2
        The batch; float32, float64, float16 or bfloat16.
    gamma, beta : arrays of shape (C,), optional
        Scale and shift (1 and 0 when omitted), in x's parameter dtype (float32 for 16-bit x).
    running_mean, running_var : arrays of shape (C,)
        Required, both; updated in place as :func:`bnkernel.batch_norm_forward` updates them.
    r_max, d_max : float, default 3.0 and 5.0
        The clipping limits.  ``r_max = 1, d_max = 0`` is exactly batch normalization; schedules
        (the paper relaxes them from 1 and 0 over training) are the caller's: pass the current
        values on each call.
    momentum : float, default 0.1
        The running statistics' update weight, PyTorch's direction
        (``running = (1 - momentum) * running + momentum * batch``).
    eps : float, default 1e-5
    axis : int, default 1
        The channel axis.
    running_var_unbiased : bool, default True
        Whether the running variance gets the ``m / (m - 1)`` correction (PyTorch) or not (Keras).
    out : array, optional
        Written with y (x's shape and dtype, writeable); returned.

    Returns
    -------
    y : array
        x's shape and dtype.
    mean, invstd : float64 arrays of shape (C,)
        The batch's statistics, ``invstd = 1 / sqrt(var + eps)``.
    r, d : float64 arrays of shape (C,)
        The corrections, for :func:`batch_renorm_backward`, which treats them as constants, as
        the paper prescribes.

    See Also
    --------
    batch_renorm_backward
    batch_norm_forward : use it with ``training=False`` at inference.

    Examples
    --------
    >>> import numpy as np, bnkernel
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    >>> rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    >>> y, mean, invstd, r, d = bnkernel.batch_renorm_forward(
    ...     x, running_mean=rm, running_var=rv, r_max=1.0, d_max=0.0)
    >>> bool(np.array_equal(y, bnkernel.batch_norm_forward(x)[0]))
    True
    """
    call = chk.Call()
    xa = call.data(x, axis)
    C = call.C
    rmax, dmax = chk.renorm_limits(r_max, d_max)
    eps_f = chk.eps(eps)
    mom = chk.weight(momentum)
    unbiased = chk.flag(running_var_unbiased, "running_var_unbiased")
    if running_mean is None or running_var is None:
        raise ValueError("running_mean, running_var: batch renormalization needs both")
    g, b, rm, rv, y, _ = call.training_forward(gamma, beta, running_mean, running_var, out)
    assert rm is not None and rv is not None
    count = chk.one_value_check(xa, call.ax)
    call.seal()
    x3 = call.view3(xa)
    mean = call.empty(C, np.float64)
    m2 = call.empty(C, np.float64)
    k = call.kernels
    k.channel_stats(x3, mean, m2)
    invstd = invstd_of(count, m2, eps_f)
    r, d = renorm_corrections(mean, m2 / count, rm, rv, eps=eps_f, r_max=rmax, d_max=dmax)
    # y = (x - mean) * (gamma * invstd * r) + (beta + gamma * d): r goes into the float64
    # invstd the kernel multiplies by, d into beta
    xp = call.xp
    g64 = xp.ones(C) if g is None else g.astype(np.float64)
    b64 = xp.zeros(C) if b is None else b.astype(np.float64)
    shift = (b64 + g64 * d).astype(chk.param_dtype(xa.dtype))
    k.normalize(x3, mean, invstd * r, g, shift, y.reshape(x3.shape), None, False)
    # the update comes after r and d, which use the statistics from before this batch
    running_update(rm, rv, count, mean, m2, mom, unbiased)
    call.finish()
    return (y if out is None else out), mean, invstd, r, d


@_device.follows_arrays
def batch_renorm_backward(
    dy: NDArray[Any],
    x: NDArray[Any],
    mean: NDArray[Any],
    invstd: NDArray[Any],
    r: NDArray[Any],
    d: NDArray[Any],
    gamma: NDArray[Any] | None = None,
    *,
    axis: int = 1,
    out: NDArray[Any] | None = None,
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """Gradients of :func:`batch_renorm_forward`, ``r`` and ``d`` held constant.

    Parameters
    ----------
    dy : array
        The gradient of the loss with respect to y (x's shape and dtype).
    x : array
        The forward's input.
    mean, invstd, r, d : float64 arrays of shape (C,)
        What the forward returned.
    gamma : array of shape (C,), optional
        The forward's scale (1 when omitted).
    axis : int, default 1
    out : array, optional
        Written with dx; returned.

    Returns
    -------
    dx : array
        x's shape and dtype.
    dgamma, dbeta : arrays of shape (C,)
        In the parameter dtype.

    Notes
    -----
    With ``xhat = (x - mean) * invstd`` and m values per channel::

        dbeta = sum(dy);  dgamma = r * sum(dy * xhat) + d * sum(dy)
        dx    = gamma * r * invstd * (dy - sum(dy) / m - xhat * sum(dy * xhat) / m)

    computed by the backward's two kernels: the reductions, then the elementwise pass with
    ``invstd * r`` in place of ``invstd`` and ``sum(dy * xhat) / r`` in place of the sum, which is
    the formula above term for term.
    """
    call = chk.Call()
    xa, dy3, m, s = call.gradient_inputs(x, axis, dy, mean, invstd)
    r64 = call.saved(r, "r")
    d64 = call.saved(d, "d")
    # (checked before anything is written: on a device, one read back)
    if bool(call.xp.any(~(r64 > 0))):
        raise ValueError("r: expected positive corrections (r is clipped to [1/r_max, r_max])")
    g = call.param(gamma, "gamma")
    dx = call.output(out)
    call.seal()
    C = call.C
    x3 = call.view3(xa)
    sum_dy = call.empty(C, np.float64)
    sum_dy_xhat = call.empty(C, np.float64)
    k = call.kernels
    k.backward_reduce(dy3, x3, m, s, sum_dy, sum_dy_xhat, None, None)
    count = int(xa.size // C)
    k.backward_elementwise(dy3, x3, m, s * r64, g, sum_dy, sum_dy_xhat / r64, count,
                               dx.reshape(x3.shape), None, None)  # fmt: skip
    call.finish()
    dgamma = (r64 * sum_dy_xhat + d64 * sum_dy).astype(chk.param_dtype(xa.dtype))
    return (dx if out is None else out), dgamma, sum_dy.astype(chk.param_dtype(xa.dtype))


# ---- ghost batch normalization -----------------------------------------------------------------


def _groups(xa: NDArray[Any], ax: int, virtual_batch_size: Any) -> int:
    v = chk.int_arg(virtual_batch_size, "virtual_batch_size")
    if ax == 0:
        raise ValueError("axis: ghost batch normalization splits axis 0, the batch axis; "
                         "the channel axis must be another")  # fmt: skip
    n = xa.shape[0]
    if v < 1 or n % v != 0:
        raise ValueError(f"virtual_batch_size: expected a divisor of the batch size {n}, got {v}")
    if xa.size // (xa.shape[ax] * (n // v)) < 2:
        raise ValueError(f"virtual_batch_size: {v} leaves one value per channel in a virtual batch")
    return int(n // v)


@_device.follows_arrays
def ghost_batch_norm_forward(
    x: NDArray[Any],
    gamma: NDArray[Any] | None = None,
    beta: NDArray[Any] | None = None,
    *,
    virtual_batch_size: int,
    running_mean: NDArray[Any] | None = None,
    running_var: NDArray[Any] | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    running_var_unbiased: bool = True,
    out: NDArray[Any] | None = None,
) -> tuple[NDArray[Any], F64, F64]:
    """Ghost batch normalization (Hoffer et al. 2017; Keras' ``virtual_batch_size``).

    Axis 0, the batch, is cut into consecutive virtual batches of ``virtual_batch_size`` examples,
    each normalized with its own statistics.

    Parameters
    ----------
    x : array, ndim >= 2
        The batch; its axis 0 is split, so the channel axis must be another.
    gamma, beta : arrays of shape (C,), optional
        Scale and shift (1 and 0 when omitted).
    virtual_batch_size : int
        A divisor of ``x.shape[0]`` that leaves at least two values per channel in each part.
    running_mean, running_var : arrays of shape (C,), optional
        Updated in place once per call, as Keras does: from the average over the virtual batches
        of their means and of their variances (each variance corrected by ``m / (m - 1)`` first,
        m being a virtual batch's values per channel, when ``running_var_unbiased``).
    momentum : float, default 0.1
        PyTorch's direction: ``running = (1 - momentum) * running + momentum * batch``.
    eps : float, default 1e-5
    axis : int, default 1
        The channel axis.
    running_var_unbiased : bool, default True
    out : array, optional
        Written with y; returned.

    Returns
    -------
    y : array
        x's shape and dtype.
    mean, invstd : float64 arrays of shape (groups, C)
        Each virtual batch's statistics, ``groups = x.shape[0] // virtual_batch_size``.

    See Also
    --------
    ghost_batch_norm_backward

    Examples
    --------
    >>> import numpy as np, bnkernel
    >>> x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    >>> y, mean, invstd = bnkernel.ghost_batch_norm_forward(x, virtual_batch_size=4)
    >>> mean.shape
    (2, 3)
    >>> bool(np.array_equal(y[:4], bnkernel.batch_norm_forward(x[:4])[0]))
    True
    """
    call = chk.Call()
    xa = call.data(x, axis)
    C = call.C
    groups = _groups(xa, call.ax, virtual_batch_size)
    eps_f = chk.eps(eps)
    mom = chk.weight(momentum)
    unbiased = chk.flag(running_var_unbiased, "running_var_unbiased")
    g, b, rm, rv, y, _ = call.training_forward(gamma, beta, running_mean, running_var, out)
    call.seal()
    xc = chk.kernel_view(xa)
    v = xa.shape[0] // groups
    means = call.empty((groups, C), np.float64)
    invstds = call.empty((groups, C), np.float64)
    variances = call.empty((groups, C), np.float64)
    m2 = call.empty(C, np.float64)
    kern = call.kernels
    for k in range(groups):
        part = call.view3(xc[k * v : (k + 1) * v])
        kern.channel_stats(part, means[k], m2)
        n = int(part.size // C)
        invstds[k] = invstd_of(n, m2, eps_f)
        variances[k] = m2 / (n - 1 if unbiased else n)
        kern.normalize(part, means[k], invstds[k], g, b,
                       y[k * v : (k + 1) * v].reshape(part.shape), None, False)  # fmt: skip
    if rm is not None:
        rm[...] = (1.0 - mom) * rm.astype(np.float64) + mom * means.mean(axis=0)
    if rv is not None:
        rv[...] = (1.0 - mom) * rv.astype(np.float64) + mom * variances.mean(axis=0)
    call.finish()
    return (y if out is None else out), means, invstds


@_device.follows_arrays
def ghost_batch_norm_backward(
    dy: NDArray[Any],
    x: NDArray[Any],
    mean: NDArray[Any],
    invstd: NDArray[Any],
    gamma: NDArray[Any] | None = None,
    *,
    virtual_batch_size: int,
    axis: int = 1,
    out: NDArray[Any] | None = None,
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """Gradients of :func:`ghost_batch_norm_forward`: each virtual batch's training backward.

    Parameters
    ----------
    dy : array
        The gradient of the loss with respect to y.
    x : array
        The forward's input.
    mean, invstd : float64 arrays of shape (groups, C)
        What the forward returned.
    gamma : array of shape (C,), optional
    virtual_batch_size : int
        The forward's.
    axis : int, default 1
    out : array, optional
        Written with dx; returned.

    Returns
    -------
    dx : array
        x's shape and dtype.
    dgamma, dbeta : arrays of shape (C,)
        Summed over the virtual batches in float64 and rounded once to the parameter dtype.
    """
    call = chk.Call()
    xa = call.data(x, axis)
    call.grad(dy)
    C = call.C
    groups = _groups(xa, call.ax, virtual_batch_size)
    means = call.saved(mean, "mean", (groups, C))
    invstds = call.saved(invstd, "invstd", (groups, C))
    g = call.param(gamma, "gamma")
    dx = call.output(out)
    call.seal()
    xc = chk.kernel_view(xa)
    dyc = chk.kernel_view(chk.as_array(dy, "dy"))
    v = xa.shape[0] // groups
    count = int(xa.size // (C * groups))
    sum_dy = call.xp.zeros(C)
    sum_dy_xhat = call.xp.zeros(C)
    sdy = call.empty(C, np.float64)
    sdyx = call.empty(C, np.float64)
    kern = call.kernels
    for k in range(groups):
        sl = slice(k * v, (k + 1) * v)
        x3, dy3 = call.view3(xc[sl]), call.view3(dyc[sl])
        kern.backward_reduce(dy3, x3, means[k], invstds[k], sdy, sdyx, None, None)
        kern.backward_elementwise(dy3, x3, means[k], invstds[k], g, sdy, sdyx, count,
                                  dx[sl].reshape(x3.shape), None, None)  # fmt: skip
        sum_dy += sdy
        sum_dy_xhat += sdyx
    call.finish()
    return (
        dx if out is None else out,
        sum_dy_xhat.astype(chk.param_dtype(xa.dtype)),
        sum_dy.astype(chk.param_dtype(xa.dtype)),
    )


# ---- population statistics ---------------------------------------------------------------------


def population_stats(batches: Iterable[NDArray[Any]], *, axis: int = 1) -> Stats:
    """Exact per-channel statistics over many batches, for "precise BN".

    Re-estimates a trained network's statistics over many batches without momentum's bias toward
    the last ones.  Each batch's :func:`~bnkernel.channel_stats` is merged into the running total
    with Chan's formula, in order, so memory stays at one batch.

    Parameters
    ----------
    batches : iterable of arrays
        Any number (at least one) of batches with the same channel count; a generator is fine.
    axis : int, default 1
        The channel axis.

    Returns
    -------
    count : int
        The number of values per channel over all batches.
    mean, M2 : float64 arrays of shape (C,)
        ``M2 = sum((x - mean)**2)``; ``M2 / count`` is the population variance.

    See Also
    --------
    bnkernel.BatchNorm.set_population_stats : loads the result into a layer.

    Examples
    --------
    >>> import numpy as np, bnkernel
    >>> rng = np.random.default_rng(0)
    >>> batches = [rng.standard_normal((16, 3)) for _ in range(4)]
    >>> count, mean, m2 = bnkernel.population_stats(batches)
    >>> count, bool(np.allclose(mean, np.concatenate(batches).mean(axis=0)))
    (64, True)
    """
    total: Stats | None = None
    for i, batch in enumerate(batches):
        try:
            st = channel_stats(batch, axis=axis)
        except (TypeError, ValueError) as e:
            raise type(e)(f"batches[{i}]: {e}") from e
        if total is not None and st[1].shape != total[1].shape:
            raise ValueError(
                f"batches[{i}]: {st[1].shape[0]} channels, the earlier batches have "
                f"{total[1].shape[0]}"
            )
        total = st if total is None else merge_stats(total, st)
    if total is None:
        raise ValueError("batches: expected at least one batch")
    return total
