"""float64 NumPy reference: slow, plain, obviously correct. Every kernel is tested against it.

Conventions used throughout:

* ``x`` has ``ndim >= 2``; ``axis`` (may be negative) is its channel axis, of length ``C``.
  Per-channel statistics reduce over every other axis, so a channel holds
  ``m = x.size / C`` values (for NCHW, ``m = N*H*W``).
* Per-channel vectors (``mean``, ``invstd``, ``gamma``, ``beta``, ...) have length ``C``.
* ``gamma=None`` means ``gamma = 1`` and ``beta=None`` means ``beta = 0``.
* Everything is converted to float64 and every result is a float64 array.

No function here is tuned for speed or guards against misuse beyond what falls out naturally.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

__all__ = [
    "apply_epilogue",
    "backward_elementwise",
    "backward_frozen",
    "backward_reduce",
    "backward_train",
    "batch_stats",
    "channel_stats",
    "forward_infer",
    "forward_train",
    "ghost_backward",
    "ghost_forward",
    "masked_backward",
    "masked_forward",
    "merge_stats",
    "normalize",
    "numerical_gradient",
    "population_stats",
    "relu_backward",
    "renorm_backward",
    "renorm_forward",
    "renorm_rd",
    "update_running",
    "update_running_keras",
    "update_running_torch",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _f64(a: npt.ArrayLike) -> F64:
    """``a`` as a float64 array."""
    return np.asarray(a, dtype=np.float64)


def _channel_axis(ndim: int, axis: int) -> int:
    """``axis`` made non-negative for an array with ``ndim`` dimensions."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array with {ndim} dimensions")
    return axis % ndim


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """All axes of an ``ndim``-dimensional array except the channel axis ``axis``."""
    c = _channel_axis(ndim, axis)
    return tuple(i for i in range(ndim) if i != c)


def _bcast(v: npt.ArrayLike, ndim: int, axis: int) -> F64:
    """Reshape a length-C vector ``v`` to shape ``(1, ..., C, ..., 1)`` with C at ``axis``.

    The result broadcasts against an ``ndim``-dimensional ``x`` whose channel axis is ``axis``.
    """
    shape = [1] * ndim
    shape[_channel_axis(ndim, axis)] = -1
    return _f64(v).reshape(shape)


def _count(x: F64, axis: int) -> int:
    """Number of values per channel: the product of every dimension except ``axis``."""
    return math.prod(x.shape[i] for i in _reduce_axes(x.ndim, axis))


def _channel_sum(a: F64, axis: int) -> F64:
    """Per-channel sum of ``a``: ``sum over every axis except axis``, a length-C vector."""
    return _f64(np.sum(a, axis=_reduce_axes(a.ndim, axis)))


def _gamma_or_ones(gamma: npt.ArrayLike | None, channels: int) -> F64:
    """``gamma`` as float64, or a vector of ones when it is None."""
    if gamma is None:
        return np.ones(channels, dtype=np.float64)
    return _f64(gamma)


def _beta_or_zeros(beta: npt.ArrayLike | None, channels: int) -> F64:
    """``beta`` as float64, or a vector of zeros when it is None."""
    if beta is None:
        return np.zeros(channels, dtype=np.float64)
    return _f64(beta)


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def channel_stats(x: npt.ArrayLike, axis: int = 1) -> tuple[int, F64, F64]:
    """Per-channel ``(count, mean, M2)``, computed in two passes.

    ``count = m`` (values per channel), ``mean = (1/m) * sum(x)``,
    ``M2 = sum((x - mean)^2)``.

    An ``x`` with no values per channel (but ``C > 0`` channels) gives ``(0, zeros, zeros)``.
    These triples are what :func:`merge_stats` combines.
    """
    xf = _f64(x)
    c = _channel_axis(xf.ndim, axis)
    channels = xf.shape[c]
    m = _count(xf, c)
    if m == 0:
        zeros = np.zeros(channels, dtype=np.float64)
        return 0, zeros, zeros.copy()
    mean = _channel_sum(xf, c) / m
    d = xf - _bcast(mean, xf.ndim, c)
    m2 = _channel_sum(d * d, c)
    return m, mean, m2


def batch_stats(x: npt.ArrayLike, axis: int = 1) -> tuple[int, F64, F64]:
    """Per-channel ``(count, mean, var)`` with the biased variance, computed in two passes.

    ``count = m``, ``mean = (1/m) * sum(x)``, ``var = (1/m) * sum((x - mean)^2)``.

    The variance of no values is undefined: a ValueError is raised when ``m == 0``.
    """
    m, mean, m2 = channel_stats(x, axis)
    if m == 0:
        raise ValueError("batch_stats needs at least one value per channel")
    return m, mean, m2 / m


def merge_stats(*stats: tuple[int, npt.ArrayLike, npt.ArrayLike]) -> tuple[int, F64, F64]:
    """Merge any number of ``(count, mean, M2)`` triples into the triple of their union.

    Applies Chan's pairwise formula left to right; for parts A (accumulated) and B (next)::

        n    = nA + nB
        d    = meanB - meanA
        mean = meanA + d * nB / n
        M2   = M2A + M2B + d^2 * nA * nB / n

    A part with count 0 is neutral (skipped; an empty accumulator takes the next part as is).
    If every count is 0 the result is ``(0, zeros, zeros)``. At least one part is required.
    """
    if not stats:
        raise ValueError("merge_stats needs at least one (count, mean, M2) part")
    first_mean = _f64(stats[0][1])
    n_acc = 0
    mean_acc = np.zeros(first_mean.shape, dtype=np.float64)
    m2_acc = np.zeros(first_mean.shape, dtype=np.float64)
    for count, mean, m2 in stats:
        n_b = int(count)
        if n_b == 0:
            continue
        mean_b = _f64(mean)
        m2_b = _f64(m2)
        if n_acc == 0:
            n_acc, mean_acc, m2_acc = n_b, mean_b.copy(), m2_b.copy()
            continue
        n = n_acc + n_b
        d = mean_b - mean_acc
        mean_acc = mean_acc + d * n_b / n
        m2_acc = m2_acc + m2_b + d * d * n_acc * n_b / n
        n_acc = n
    return n_acc, mean_acc, m2_acc


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


def normalize(
    x: npt.ArrayLike,
    mean: npt.ArrayLike,
    invstd: npt.ArrayLike,
    gamma: npt.ArrayLike | None = None,
    beta: npt.ArrayLike | None = None,
    axis: int = 1,
) -> F64:
    """Normalize with given per-channel statistics.

    ``y = (x - mean) * invstd * gamma + beta``
    """
    xf = _f64(x)
    nd = xf.ndim
    channels = xf.shape[_channel_axis(nd, axis)]
    g = _gamma_or_ones(gamma, channels)
    b = _beta_or_zeros(beta, channels)
    xhat = (xf - _bcast(mean, nd, axis)) * _bcast(invstd, nd, axis)
    return xhat * _bcast(g, nd, axis) + _bcast(b, nd, axis)


def forward_train(
    x: npt.ArrayLike,
    gamma: npt.ArrayLike | None = None,
    beta: npt.ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[F64, F64, F64]:
    """Training-mode forward with batch statistics; returns ``(y, mean, invstd)``.

    ``mean, var = batch_stats(x)`` (biased variance),
    ``invstd = 1 / sqrt(var + eps)``,
    ``y = (x - mean) * invstd * gamma + beta``.
    """
    _, mean, var = batch_stats(x, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    y = normalize(x, mean, invstd, gamma, beta, axis)
    return y, mean, invstd


def forward_infer(
    x: npt.ArrayLike,
    running_mean: npt.ArrayLike,
    running_var: npt.ArrayLike,
    gamma: npt.ArrayLike | None = None,
    beta: npt.ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> F64:
    """Inference-mode forward with running statistics.

    ``y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta``
    """
    invstd = 1.0 / np.sqrt(_f64(running_var) + eps)
    return normalize(x, running_mean, invstd, gamma, beta, axis)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


def backward_reduce(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    mean: npt.ArrayLike,
    invstd: npt.ArrayLike,
    axis: int = 1,
) -> tuple[F64, F64]:
    """Per-channel reductions of the backward pass; returns ``(sum_dy, sum_dy_xhat)``.

    ``xhat = (x - mean) * invstd``, ``sum_dy = sum(dy)``, ``sum_dy_xhat = sum(dy * xhat)``.
    These are ``dbeta`` and ``dgamma``.
    """
    dyf = _f64(dy)
    xf = _f64(x)
    nd = xf.ndim
    xhat = (xf - _bcast(mean, nd, axis)) * _bcast(invstd, nd, axis)
    return _channel_sum(dyf, axis), _channel_sum(dyf * xhat, axis)


def backward_elementwise(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    mean: npt.ArrayLike,
    invstd: npt.ArrayLike,
    gamma: npt.ArrayLike | None,
    sum_dy: npt.ArrayLike,
    sum_dy_xhat: npt.ArrayLike,
    count: int,
    axis: int = 1,
) -> F64:
    """Elementwise part of the training-mode backward, given the reductions.

    ``xhat = (x - mean) * invstd``,
    ``dx = gamma * invstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count)``.

    ``count`` is the total number of values per channel the statistics were taken over (which
    may exceed this ``x``'s when the batch is split across devices).
    """
    dyf = _f64(dy)
    xf = _f64(x)
    nd = xf.ndim
    channels = xf.shape[_channel_axis(nd, axis)]
    g = _gamma_or_ones(gamma, channels)
    xhat = (xf - _bcast(mean, nd, axis)) * _bcast(invstd, nd, axis)
    scale = _bcast(g * _f64(invstd), nd, axis)
    mean_dy = _bcast(_f64(sum_dy) / count, nd, axis)
    mean_dy_xhat = _bcast(_f64(sum_dy_xhat) / count, nd, axis)
    return scale * (dyf - mean_dy - xhat * mean_dy_xhat)


def backward_train(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    mean: npt.ArrayLike,
    invstd: npt.ArrayLike,
    gamma: npt.ArrayLike | None = None,
    axis: int = 1,
) -> tuple[F64, F64, F64]:
    """Training-mode backward (batch statistics depend on x); returns ``(dx, dgamma, dbeta)``.

    With ``m`` values per channel and ``xhat = (x - mean) * invstd``::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx     = (gamma * invstd / m) * (m * dy - dbeta - xhat * dgamma)

    ``mean`` and ``invstd`` must be the ones the forward pass used (from :func:`forward_train`).
    """
    dyf = _f64(dy)
    xf = _f64(x)
    nd = xf.ndim
    channels = xf.shape[_channel_axis(nd, axis)]
    m = _count(xf, axis)
    g = _gamma_or_ones(gamma, channels)
    xhat = (xf - _bcast(mean, nd, axis)) * _bcast(invstd, nd, axis)
    dbeta = _channel_sum(dyf, axis)
    dgamma = _channel_sum(dyf * xhat, axis)
    scale = _bcast(g * _f64(invstd) / m, nd, axis)
    dx = scale * (m * dyf - _bcast(dbeta, nd, axis) - xhat * _bcast(dgamma, nd, axis))
    return dx, dgamma, dbeta


def backward_frozen(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    mean: npt.ArrayLike,
    invstd: npt.ArrayLike,
    gamma: npt.ArrayLike | None = None,
    axis: int = 1,
) -> tuple[F64, F64, F64]:
    """Backward with frozen statistics (mean and invstd are constants); ``(dx, dgamma, dbeta)``.

    With ``xhat = (x - mean) * invstd``::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx     = dy * gamma * invstd
    """
    dyf = _f64(dy)
    xf = _f64(x)
    nd = xf.ndim
    channels = xf.shape[_channel_axis(nd, axis)]
    g = _gamma_or_ones(gamma, channels)
    dbeta, dgamma = backward_reduce(dyf, xf, mean, invstd, axis)
    dx = dyf * _bcast(g * _f64(invstd), nd, axis)
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------------------------
# running statistics
# --------------------------------------------------------------------------------------------


def update_running(
    running_mean: npt.ArrayLike,
    running_var: npt.ArrayLike,
    batch_mean: npt.ArrayLike,
    batch_var: npt.ArrayLike,
    count: int,
    momentum: float,
    unbiased: bool,
) -> tuple[F64, F64]:
    """General running-statistics update; returns ``(new_mean, new_var)``.

    ``new_mean = (1 - momentum) * running_mean + momentum * batch_mean``
    ``new_var  = (1 - momentum) * running_var  + momentum * v``, where
    ``v = batch_var * count / (count - 1)`` if ``unbiased`` else ``v = batch_var``.

    ``batch_var`` is the biased batch variance over ``count`` values per channel. The unbiased
    correction needs ``count >= 2`` (a ValueError otherwise); ``count`` is unused when biased.
    """
    if unbiased:
        if count < 2:
            raise ValueError(f"an unbiased variance needs count >= 2, got {count}")
        v = _f64(batch_var) * count / (count - 1)
    else:
        v = _f64(batch_var)
    new_mean = (1.0 - momentum) * _f64(running_mean) + momentum * _f64(batch_mean)
    new_var = (1.0 - momentum) * _f64(running_var) + momentum * v
    return new_mean, new_var


def update_running_torch(
    running_mean: npt.ArrayLike,
    running_var: npt.ArrayLike,
    batch_mean: npt.ArrayLike,
    batch_var: npt.ArrayLike,
    count: int,
    momentum: float = 0.1,
) -> tuple[F64, F64]:
    """PyTorch convention; returns ``(new_mean, new_var)``.

    ``new = (1 - momentum) * old + momentum * batch``, with the running variance unbiased:
    the batch variance is corrected to ``batch_var * count / (count - 1)``.

    PyTorch's ``momentum=None`` (a cumulative moving average) is NOT handled here: the caller
    passes ``momentum = 1 / num_batches_tracked`` (after incrementing it) instead.
    """
    return update_running(
        running_mean, running_var, batch_mean, batch_var, count, momentum, unbiased=True
    )


def update_running_keras(
    moving_mean: npt.ArrayLike,
    moving_var: npt.ArrayLike,
    batch_mean: npt.ArrayLike,
    batch_var: npt.ArrayLike,
    momentum: float = 0.99,
) -> tuple[F64, F64]:
    """Keras convention; returns ``(new_mean, new_var)``.

    ``new = momentum * old + (1 - momentum) * batch``, with the moving variance biased
    (``batch_var`` is used as is). Note Keras' momentum is PyTorch's ``1 - momentum``.
    """
    new_mean = momentum * _f64(moving_mean) + (1.0 - momentum) * _f64(batch_mean)
    new_var = momentum * _f64(moving_var) + (1.0 - momentum) * _f64(batch_var)
    return new_mean, new_var


# --------------------------------------------------------------------------------------------
# fused epilogue: y = relu(bn(x) + residual)
# --------------------------------------------------------------------------------------------


def apply_epilogue(z: npt.ArrayLike, residual: npt.ArrayLike | None, relu: bool) -> F64:
    """``relu(z + residual)`` (either part optional); NaN stays NaN through the ReLU."""
    out: F64 = _f64(z).copy()
    if residual is not None:
        out = out + _f64(residual)
    if relu:
        out = np.where(out < 0, 0.0, out)
    return out


def relu_backward(dy: npt.ArrayLike, y: npt.ArrayLike) -> F64:
    """The gradient through ``y = relu(v)`` taken from the output: ``dy`` where ``y > 0``, else 0
    (a NaN output passes nothing)."""
    g: F64 = np.where(_f64(y) > 0, _f64(dy), 0.0)
    return g


# --------------------------------------------------------------------------------------------
# masks: statistics over the valid positions only
# --------------------------------------------------------------------------------------------


def _valid(mask: npt.ArrayLike, nd: int, axis: int) -> F64:
    """The mask as 0/1 floats broadcastable against x (a length-1 channel axis inserted)."""
    return np.expand_dims(np.asarray(mask, dtype=np.float64), _channel_axis(nd, axis))


def masked_forward(
    x: npt.ArrayLike,
    mask: npt.ArrayLike,
    gamma: npt.ArrayLike | None = None,
    beta: npt.ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[F64, F64, F64, int]:
    """Training forward with statistics over the positions where ``mask`` (x's shape without the
    channel axis) is True; every position normalized with them.  Returns
    ``(y, mean, invstd, m)`` with m the number of valid positions::

        mean = sum(w * x) / m;  var = sum(w * (x - mean)**2) / m   (w = mask)
    """
    xf = _f64(x)
    nd = xf.ndim
    w = _valid(mask, nd, axis)
    axes = _reduce_axes(nd, axis)
    m = int(np.asarray(mask).sum())
    mean = np.sum(w * xf, axis=axes) / m
    var = np.sum(w * (xf - _bcast(mean, nd, axis)) ** 2, axis=axes) / m
    invstd = 1.0 / np.sqrt(var + eps)
    return normalize(xf, mean, invstd, gamma, beta, axis), mean, invstd, m


def masked_backward(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    mean: npt.ArrayLike,
    invstd: npt.ArrayLike,
    mask: npt.ArrayLike,
    gamma: npt.ArrayLike | None = None,
    axis: int = 1,
) -> tuple[F64, F64, F64]:
    """Gradients of :func:`masked_forward` (every output depends on the statistics of the valid
    positions; only valid positions influence them)::

        dx = gamma * invstd * (dy - w * (sum(dy) / m + xhat * sum(dy * xhat) / m))
        dgamma = sum(dy * xhat);  dbeta = sum(dy)     (sums over every position)
    """
    dyf = _f64(dy)
    xf = _f64(x)
    nd = xf.ndim
    channels = xf.shape[_channel_axis(nd, axis)]
    w = _valid(mask, nd, axis)
    m = float(np.asarray(mask).sum())
    g = _gamma_or_ones(gamma, channels)
    xhat = (xf - _bcast(mean, nd, axis)) * _bcast(invstd, nd, axis)
    dbeta = _channel_sum(dyf, axis)
    dgamma = _channel_sum(dyf * xhat, axis)
    inner = _bcast(dbeta / m, nd, axis) + xhat * _bcast(dgamma / m, nd, axis)
    dx = _bcast(g * _f64(invstd), nd, axis) * (dyf - w * inner)
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------------------------
# batch renormalization (Ioffe 2017)
# --------------------------------------------------------------------------------------------


def renorm_rd(
    batch_mean: npt.ArrayLike,
    batch_var: npt.ArrayLike,
    running_mean: npt.ArrayLike,
    running_var: npt.ArrayLike,
    eps: float,
    r_max: float,
    d_max: float,
) -> tuple[F64, F64]:
    """Batch renormalization's ``(r, d)`` for each channel c (Ioffe 2017, Algorithm 1): with the
    standard deviations of the batch and of the running estimate, both with eps added to the
    variance, r[c] is their ratio (batch over running) and d[c] the mean's shift measured in
    running standard deviations; r is kept within [1/r_max, r_max] and d within [-d_max, d_max].
    """
    # channel by channel in Python floats (the package's own code works on whole arrays with
    # np.clip): the oracle reaches the same numbers its own way
    r, d = [], []
    for mb, vb, mr, vr in zip(
        _f64(batch_mean), _f64(batch_var), _f64(running_mean), _f64(running_var), strict=True
    ):
        sigma = math.sqrt(float(vr) + eps)
        r.append(min(max(math.sqrt(float(vb) + eps) / sigma, 1.0 / r_max), r_max))
        d.append(min(max((float(mb) - float(mr)) / sigma, -d_max), d_max))
    return np.array(r, dtype=np.float64), np.array(d, dtype=np.float64)


def renorm_forward(
    x: npt.ArrayLike,
    running_mean: npt.ArrayLike,
    running_var: npt.ArrayLike,
    gamma: npt.ArrayLike | None = None,
    beta: npt.ArrayLike | None = None,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    axis: int = 1,
) -> tuple[F64, F64, F64, F64, F64]:
    """Training forward of batch renormalization; returns ``(y, mean, invstd, r, d)``.

    ``xhat = (x - mean) * invstd`` with the batch statistics, then
    ``y = gamma * (xhat * r + d) + beta`` with ``(r, d)`` from :func:`renorm_rd` against the
    running statistics *before* this batch's update.
    """
    _, mean, var = batch_stats(x, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    r, d = renorm_rd(mean, var, running_mean, running_var, eps, r_max, d_max)
    xf = _f64(x)
    nd = xf.ndim
    channels = xf.shape[_channel_axis(nd, axis)]
    g = _gamma_or_ones(gamma, channels)
    b = _beta_or_zeros(beta, channels)
    xhat = (xf - _bcast(mean, nd, axis)) * _bcast(invstd, nd, axis)
    y = _bcast(g, nd, axis) * (xhat * _bcast(r, nd, axis) + _bcast(d, nd, axis))
    return y + _bcast(b, nd, axis), mean, invstd, r, d


def renorm_backward(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    mean: npt.ArrayLike,
    invstd: npt.ArrayLike,
    r: npt.ArrayLike,
    d: npt.ArrayLike,
    gamma: npt.ArrayLike | None = None,
    axis: int = 1,
) -> tuple[F64, F64, F64]:
    """Backward of batch renormalization with ``r`` and ``d`` held constant (the paper's rule);
    returns ``(dx, dgamma, dbeta)``::

        dxhat  = dy * gamma * r
        dx     = invstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        dgamma = sum(dy * (xhat * r + d));  dbeta = sum(dy)
    """
    dyf = _f64(dy)
    xf = _f64(x)
    nd = xf.ndim
    channels = xf.shape[_channel_axis(nd, axis)]
    m = _count(xf, axis)
    g = _gamma_or_ones(gamma, channels)
    xhat = (xf - _bcast(mean, nd, axis)) * _bcast(invstd, nd, axis)
    dxhat = dyf * _bcast(g * _f64(r), nd, axis)
    mean_dxhat = _channel_sum(dxhat, axis) / m
    mean_dxhat_xhat = _channel_sum(dxhat * xhat, axis) / m
    dx = _bcast(invstd, nd, axis) * (
        dxhat - _bcast(mean_dxhat, nd, axis) - xhat * _bcast(mean_dxhat_xhat, nd, axis)
    )
    dgamma = _channel_sum(dyf * (xhat * _bcast(r, nd, axis) + _bcast(d, nd, axis)), axis)
    return dx, dgamma, _channel_sum(dyf, axis)


# --------------------------------------------------------------------------------------------
# ghost batch normalization
# --------------------------------------------------------------------------------------------


def ghost_forward(
    x: npt.ArrayLike,
    virtual_batch_size: int,
    gamma: npt.ArrayLike | None = None,
    beta: npt.ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[F64, F64, F64]:
    """Training forward with statistics per virtual batch: the batch axis (axis 0) is cut into
    consecutive groups of ``virtual_batch_size`` and each group is normalized with its own
    statistics.  Returns ``(y, mean, invstd)`` with ``mean`` and ``invstd`` of shape
    ``(groups, C)``."""
    xf = _f64(x)
    groups = xf.shape[0] // virtual_batch_size
    ys, means, invstds = [], [], []
    for k in range(groups):
        part = xf[k * virtual_batch_size : (k + 1) * virtual_batch_size]
        y, mean, invstd = forward_train(part, gamma, beta, eps, axis)
        ys.append(y)
        means.append(mean)
        invstds.append(invstd)
    return np.concatenate(ys, axis=0), np.stack(means), np.stack(invstds)


def ghost_backward(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    mean: npt.ArrayLike,
    invstd: npt.ArrayLike,
    virtual_batch_size: int,
    gamma: npt.ArrayLike | None = None,
    axis: int = 1,
) -> tuple[F64, F64, F64]:
    """Backward of :func:`ghost_forward`: each virtual batch's own training backward; dgamma and
    dbeta summed over the groups."""
    dyf = _f64(dy)
    xf = _f64(x)
    means = _f64(mean)
    invstds = _f64(invstd)
    dxs = []
    dgamma = np.zeros(means.shape[1])
    dbeta = np.zeros(means.shape[1])
    for k in range(means.shape[0]):
        sl = slice(k * virtual_batch_size, (k + 1) * virtual_batch_size)
        dx, dg, db = backward_train(dyf[sl], xf[sl], means[k], invstds[k], gamma, axis)
        dxs.append(dx)
        dgamma += dg
        dbeta += db
    return np.concatenate(dxs, axis=0), dgamma, dbeta


# --------------------------------------------------------------------------------------------
# population statistics (precise BN)
# --------------------------------------------------------------------------------------------


def population_stats(batches: list[npt.ArrayLike], axis: int = 1) -> tuple[int, F64, F64]:
    """``(count, mean, M2)`` of all the batches' values together, per channel: the statistics of
    their concatenation along the first non-channel axis."""
    arrays = [_f64(b) for b in batches]
    batch_axis = 0 if _channel_axis(arrays[0].ndim, axis) != 0 else 1
    return channel_stats(np.concatenate(arrays, axis=batch_axis), axis)


# --------------------------------------------------------------------------------------------
# gradient checking
# --------------------------------------------------------------------------------------------


def numerical_gradient(f: Callable[[F64], float], x: npt.ArrayLike, eps: float = 1e-6) -> F64:
    """Central finite-difference gradient of a scalar function ``f`` at ``x``.

    For every element i: ``grad[i] = (f(x + eps*e_i) - f(x - eps*e_i)) / (2*eps)``, where
    ``e_i`` is the unit array at i (the divisor used is the step actually taken in float64,
    ``(x_i + eps) - (x_i - eps)``, which is ``2*eps`` up to rounding). ``x`` is copied as float64
    and never modified; the result has ``x``'s shape. Error: O(eps^2) truncation plus
    O(machine_eps * |f| / eps) rounding.
    """
    x0 = _f64(x).copy()
    grad = np.zeros(x0.shape, dtype=np.float64)
    for idx in np.ndindex(*x0.shape):
        xp = x0.copy()
        xp[idx] += eps
        xm = x0.copy()
        xm[idx] -= eps
        grad[idx] = (float(f(xp)) - float(f(xm))) / (xp[idx] - xm[idx])
    return grad
