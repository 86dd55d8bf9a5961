"""The NumPy textbook: batch norm the way it is usually written in NumPy, the bench's NumPy peer.

Whole-array expressions in x's own dtype, allocating every intermediate.  (bnkernel.reference is
the float64 ground truth; this is a peer.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from .cases import EPS, MOMENTUM, per_channel, reduce_axes

Grads = tuple[NDArray[Any], NDArray[Any], NDArray[Any]]


def forward_train(
    x: NDArray[Any],
    gamma: NDArray[Any],
    beta: NDArray[Any],
    running_mean: NDArray[Any],
    running_var: NDArray[Any],
    ax: int,
    eps: float = EPS,
    momentum: float = MOMENTUM,
) -> NDArray[Any]:
    """``y``; the running statistics are updated in place (PyTorch's rule, unbiased variance)."""
    red = reduce_axes(x.ndim, ax)
    mean = x.mean(axis=red, keepdims=True)
    var = x.var(axis=red, keepdims=True)
    y: NDArray[Any] = (x - mean) / np.sqrt(var + eps) * per_channel(
        gamma, x.ndim, ax
    ) + per_channel(beta, x.ndim, ax)
    m = x.size // x.shape[ax]
    running_mean *= 1 - momentum
    running_mean += momentum * mean.ravel()
    running_var *= 1 - momentum
    running_var += momentum * var.ravel() * (m / (m - 1))
    return y


def forward_infer(
    x: NDArray[Any],
    gamma: NDArray[Any],
    beta: NDArray[Any],
    running_mean: NDArray[Any],
    running_var: NDArray[Any],
    ax: int,
    eps: float = EPS,
) -> NDArray[Any]:
    """``y`` normalized with the running statistics."""
    nd = x.ndim
    y: NDArray[Any] = (x - per_channel(running_mean, nd, ax)) / np.sqrt(
        per_channel(running_var, nd, ax) + eps
    ) * per_channel(gamma, nd, ax) + per_channel(beta, nd, ax)
    return y


def _param_grads(
    dy: NDArray[Any], x: NDArray[Any], mean: NDArray[Any], invstd: NDArray[Any], ax: int
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """``(xhat, dgamma, dbeta)``, what both backwards compute the same way."""
    nd = x.ndim
    red = reduce_axes(nd, ax)
    xhat = (x - per_channel(mean, nd, ax)) * per_channel(invstd, nd, ax)
    return xhat, (dy * xhat).sum(axis=red), dy.sum(axis=red)


def backward_train(
    dy: NDArray[Any],
    x: NDArray[Any],
    mean: NDArray[Any],
    invstd: NDArray[Any],
    gamma: NDArray[Any],
    ax: int,
) -> Grads:
    """``(dx, dgamma, dbeta)``: ``dx = gamma*invstd/m * (m*dy - dbeta - xhat*dgamma)``."""
    nd = x.ndim
    m = x.size // x.shape[ax]
    xhat, dgamma, dbeta = _param_grads(dy, x, mean, invstd, ax)
    dx = per_channel(gamma * invstd / m, nd, ax) * (
        m * dy - per_channel(dbeta, nd, ax) - xhat * per_channel(dgamma, nd, ax)
    )
    return dx, dgamma, dbeta


def backward_frozen(
    dy: NDArray[Any],
    x: NDArray[Any],
    mean: NDArray[Any],
    invstd: NDArray[Any],
    gamma: NDArray[Any],
    ax: int,
) -> Grads:
    """``(dx, dgamma, dbeta)`` with constant statistics: ``dx = dy * gamma * invstd``."""
    _, dgamma, dbeta = _param_grads(dy, x, mean, invstd, ax)
    dx = dy * per_channel(gamma * invstd, x.ndim, ax)
    return dx, dgamma, dbeta
