"""The split phases of batch normalization, each its own kernel call: the statistics and their
merge, the running update, the normalize, and the backward's reductions and elementwise pass.

Data-parallel training (:mod:`bnkernel.distributed`) and the variants (:mod:`bnkernel.variants`)
are built from them; :func:`bnkernel.batch_norm_forward` and :func:`bnkernel.batch_norm_backward`
fuse them.  The conventions are :mod:`bnkernel.functional`'s.  :func:`invstd_of` and
:func:`running_update` are the float64 arithmetic every path shares (the fused kernels' own, so
that split and fused results are bit-identical); they take checked arguments.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _checks as chk
from . import _core, _device

__all__ = [
    "Stats",
    "backward_elementwise",
    "backward_reduce",
    "channel_stats",
    "invstd_from_stats",
    "merge_stats",
    "normalize",
    "update_running_stats",
]

Stats = tuple[int, NDArray[np.float64], NDArray[np.float64]]


def invstd_of(count: int, m2: NDArray[np.float64], eps: float) -> NDArray[np.float64]:
    """1 / sqrt(M2 / count + eps): the same float64 operations wherever it is computed (on m2's
    device for a device array)."""
    if chk.on_device(m2):
        return _device.Kernels(_device.device_of(m2)).invstd(count, m2, eps)  # type: ignore
    result: NDArray[np.float64] = 1.0 / np.sqrt(m2 / float(count) + eps)
    return result


def running_coefficients(
    call: chk.Call, rm: NDArray[Any], rv: NDArray[Any], eps: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Inference's float64 ``(mean, invstd)`` from checked running statistics: ``running_mean``
    and ``1 / sqrt(running_var + eps)``, where the call runs."""
    if call.device is not None:
        return call.kernels.running_coefficients(rm, rv, eps)  # type: ignore[no-any-return]
    mean = rm.astype(np.float64)
    invstd: NDArray[np.float64] = 1.0 / np.sqrt(rv.astype(np.float64) + eps)
    return mean, invstd


def running_update(
    rm: NDArray[Any] | None, rv: NDArray[Any] | None, count: int, mean: NDArray[np.float64],
    m2: NDArray[np.float64], momentum: float, unbiased: bool,
) -> None:  # fmt: skip
    """The running update from merged statistics: the fused forward's own (the compiled
    ``update_running_stats``, csrc/bnkernel/kernels/running.cpp), so the results are bit-identical.
    ``rm`` / ``rv``: checked running buffers of one dtype (or None)."""
    if chk.on_device(mean):
        k = _device.Kernels(_device.device_of(mean))
        k.update_running_stats(rm, rv, count, mean, m2, momentum, unbiased)
        return
    _core.update_running_stats(rm, rv, count, mean, m2, momentum, unbiased)


@_device.follows_arrays
def channel_stats(
    x: NDArray[Any], *, axis: int = 1, mask: NDArray[np.bool_] | None = None
) -> Stats:
    """Per-channel ``(count, mean, M2)``, ``M2 = sum((x - mean)**2)``: the forward's first phase.

    Parameters
    ----------
    x : array, ndim >= 2
        The data; a batch with no samples (a zero-length non-channel axis) is allowed.
    axis : int, default 1
        The channel axis.
    mask : bool array, optional
        x's shape without the channel axis (or one that broadcasts to it): only the positions
        where it is True enter the statistics (padded values, even NaN, never do).

    Returns
    -------
    count : int
        The number of values per channel (valid positions with a mask); 0 for an empty batch,
        whose ``(0, 0, 0)`` is the neutral element of :func:`merge_stats`.
    mean, M2 : float64 arrays of shape (C,)

    Examples
    --------
    >>> import numpy as np, bnkernel
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> bnkernel.channel_stats(x)
    (2, array([ 2., 20.]), array([  2., 200.]))
    """
    call = chk.Call()
    xa = call.data(x, axis, allow_empty=True)
    C = call.C
    valid = call.mask(mask)
    mean = call.empty(C, np.float64)
    m2 = call.empty(C, np.float64)
    x3 = call.view3(xa)
    k = call.kernels
    if valid is not None:
        return int(k.masked_channel_stats(x3, chk.mask_view(valid, x3), mean, m2)), mean, m2
    k.channel_stats(x3, mean, m2)
    return xa.size // C, mean, m2


@_device.follows_arrays
def merge_stats(*stats: Stats) -> Stats:
    """Merge partial ``(count, mean, M2)`` statistics of disjoint parts of a batch.

    Parameters
    ----------
    *stats : (int, array, array) tuples
        ``(count, mean, M2)`` of each part (counts >= 0, their total within 64 bits; means and
        M2s of shape (C,), all in one place: host memory or one CUDA device).

    Returns
    -------
    count : int
    mean, M2 : float64 arrays of shape (C,)

    Notes
    -----
    Chan et al.'s pairwise formula, applied left to right; exact for uneven counts, and a part with
    count 0 changes nothing::

        n = nA + nB;  d = meanB - meanA
        mean = meanA + d * nB / n;  M2 = M2A + M2B + d**2 * nA * nB / n
    """
    if not stats:
        raise ValueError("merge_stats: expected at least one (count, mean, M2) tuple")
    counts = []
    means = []
    m2s = []
    channels = None
    for i, st in enumerate(stats):
        if not isinstance(st, tuple) or len(st) != 3:
            raise TypeError(f"stats[{i}]: expected a (count, mean, M2) tuple")
        n, mu, m2 = st
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"stats[{i}]: count must be an int >= 0, got {n!r}")
        if channels is None:
            mu_a = chk.as_array(mu, f"stats[{i}] mean")
            channels = int(mu_a.shape[0]) if mu_a.ndim == 1 else -1
        means.append(chk.saved_stat(mu, f"stats[{i}] mean", channels))
        m2s.append(chk.saved_stat(m2, f"stats[{i}] M2", channels))
        counts.append(int(n))
    assert channels is not None
    if sum(counts) > chk.INT64_MAX:
        raise OverflowError(
            f"stats: the total count {sum(counts)} does not fit in 64 bits (at most 2**63 - 1)"
        )
    first = chk.where(means[0])
    for i in range(len(stats)):
        for a in (means[i], m2s[i]):
            if chk.where(a) != first:
                raise TypeError(
                    f"stats[{i}]: {chk.where(a)}, while stats[0] is {first}: merge statistics "
                    "that live in one place"
                )
    if chk.on_device(means[0]):
        dmean, dm2 = _device.merge_stats(counts, means, m2s)
        return sum(counts), dmean, dm2
    mean = np.empty(channels, dtype=np.float64)
    m2 = np.empty(channels, dtype=np.float64)
    count = _core.merge_stats(
        np.asarray(counts, dtype=np.int64), np.stack(means), np.stack(m2s), mean, m2
    )
    return int(count), mean, m2


@_device.follows_arrays
def invstd_from_stats(count: int, m2: NDArray[Any], eps: float = 1e-5) -> NDArray[np.float64]:
    """``1 / sqrt(M2 / count + eps)``: the biased variance's inverse standard deviation.

    Computed exactly as the fused forward computes it (the same float64 operations, so the
    results are bit-identical).

    Parameters
    ----------
    count : int >= 1
        The values per channel the statistics were taken over.
    m2 : array of shape (C,)
        The sums of squared deviations (:func:`channel_stats`, :func:`merge_stats`).
    eps : float >= 0, default 1e-5

    Returns
    -------
    invstd : float64 array of shape (C,)
    """
    count = chk.count(count)
    m2a = chk.as_array(m2, "m2")
    m2a = _device.contiguous(m2a, np.float64) if chk.on_device(m2a) else m2a.astype(np.float64)
    eps_f = chk.eps(eps)
    return invstd_of(count, m2a, eps_f)


@_device.follows_arrays
def update_running_stats(
    running_mean: NDArray[Any] | None,
    running_var: NDArray[Any] | None,
    count: int,
    mean: NDArray[Any],
    m2: NDArray[Any],
    *,
    momentum: float = 0.1,
    unbiased: bool = True,
) -> None:
    """Update running statistics in place from merged batch statistics, as the fused forward does.

    Parameters
    ----------
    running_mean, running_var : float32 or float64 arrays of shape (C,), or None
        Updated in place (contiguous, writeable, of one dtype); None leaves one out.
    count : int >= 1
        The values per channel the statistics were taken over.
    mean, m2 : arrays of shape (C,)
        The batch's statistics (:func:`channel_stats`, :func:`merge_stats`).
    momentum : float in [0, 1], default 0.1
        The weight of the batch (PyTorch's direction).
    unbiased : bool, default True
        Use ``M2 / (count - 1)`` (PyTorch) or ``M2 / count`` (Keras) as the batch variance.

    Notes
    -----
    The rule::

        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var  + momentum * M2 / (count - 1)  # unbiased
        running_var  = (1 - momentum) * running_var  + momentum * M2 / count        # biased
    """
    mom = chk.weight(momentum)
    count = chk.count(count)
    unbiased = chk.flag(unbiased, "unbiased")
    if running_mean is None and running_var is None:
        return
    # the running statistics fix C and the dtype (there is no x here): the first one given
    first: Any = running_mean if running_mean is not None else running_var
    first_name = "running_mean" if running_mean is not None else "running_var"
    C = int(np.shape(first)[0]) if np.ndim(first) == 1 else -1
    first = chk.running_buffer(first, first_name, C, None)
    assert first is not None
    call = chk.Call()
    call.statistics_only(C, first.dtype, like=first)
    rm = call.running(running_mean, "running_mean")
    rv = call.running(running_var, "running_var")
    mu = call.saved(mean, "mean")
    m2a = call.saved(m2, "m2")
    call.seal()
    running_update(rm, rv, count, mu, m2a, mom, unbiased)
    call.finish()


@_device.follows_arrays
def normalize(
    x: NDArray[Any],
    mean: NDArray[Any],
    invstd: NDArray[Any],
    gamma: NDArray[Any] | None = None,
    beta: NDArray[Any] | None = None,
    *,
    axis: int = 1,
    activation: str | None = None,
    residual: NDArray[Any] | None = None,
    out: NDArray[Any] | None = None,
) -> NDArray[Any]:
    """``y = (x - mean) * (gamma * invstd) + beta`` with given per-channel statistics.

    Parameters
    ----------
    x : array, ndim >= 2
        The data (an empty batch gives an empty y).
    mean, invstd : float32 or float64 arrays of shape (C,)
    gamma, beta : arrays of shape (C,), optional
        Of x's parameter dtype; None means ones / zeros.
    axis : int, default 1
    activation : {None, "relu"}, optional
        The fused epilogue of :func:`batch_norm_forward`: ``+ residual``, then ``relu``.
    residual : array of x's shape and dtype, optional
    out : array of x's shape and dtype, optional
        Where y is written; may be ``x`` itself.

    Returns
    -------
    y : array of x's shape and dtype
    """
    relu = chk.activation(activation)
    call = chk.Call()
    xa = call.data(x, axis, allow_empty=True)
    m = call.saved(mean, "mean")
    s = call.saved(invstd, "invstd")
    g, b, res3 = call.affine_arrays(gamma, beta, residual)
    y = call.output(out, in_place=True)
    call.seal()
    x3 = call.view3(xa)
    call.kernels.normalize(x3, m, s, g, b, y.reshape(x3.shape), res3, relu)
    call.finish()
    return y if out is None else out


@_device.follows_arrays
def backward_reduce(
    dy: NDArray[Any],
    x: NDArray[Any],
    mean: NDArray[Any],
    invstd: NDArray[Any],
    *,
    axis: int = 1,
    y: NDArray[Any] | None = None,
    dresidual: NDArray[Any] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(sum(dy), sum(dy * xhat))`` per channel, in one read of (dy, x): the backward's reduction.

    Parameters
    ----------
    dy, x : arrays of one shape and dtype
        A batch with no samples gives zeros.
    mean, invstd : float32 or float64 arrays of shape (C,)
        The forward's statistics (``xhat = (x - mean) * invstd``).
    axis : int, default 1
    y : array, optional
        The output of a forward with ``activation="relu"``: dy is masked where ``y <= 0`` first.
    dresidual : array of x's shape and dtype, optional
        With ``y``: receives the masked dy (the residual's gradient).

    Returns
    -------
    sum_dy, sum_dy_xhat : float64 arrays of shape (C,)
    """
    call = chk.Call()
    xa, dy3, m, s = call.gradient_inputs(x, axis, dy, mean, invstd, allow_empty=True)
    y3 = call.like_x(y, "y")
    if dresidual is not None and y is None:
        raise ValueError("dresidual: needs y (the ReLU mask)")
    dres = None if dresidual is None else call.output(dresidual, "dresidual")
    call.seal()
    C = call.C
    sum_dy = call.empty(C, np.float64)
    sum_dy_xhat = call.empty(C, np.float64)
    call.kernels.backward_reduce(
        dy3, call.view3(xa), m, s, sum_dy, sum_dy_xhat, y3,
        None if dres is None else call.view3(dres),
    )  # fmt: skip
    call.finish()
    return sum_dy, sum_dy_xhat


@_device.follows_arrays
def backward_elementwise(
    dy: NDArray[Any],
    x: NDArray[Any],
    mean: NDArray[Any],
    invstd: NDArray[Any],
    gamma: NDArray[Any] | None,
    sum_dy: NDArray[Any],
    sum_dy_xhat: NDArray[Any],
    count: int,
    *,
    axis: int = 1,
    y: NDArray[Any] | None = None,
    mask: NDArray[np.bool_] | None = None,
    out: NDArray[Any] | None = None,
) -> NDArray[Any]:
    """The elementwise phase of the training backward: dx from the reduced sums.

    Parameters
    ----------
    dy, x : arrays of one shape and dtype
    mean, invstd : float32 or float64 arrays of shape (C,)
    gamma : array of shape (C,) or None
        None means ones.
    sum_dy, sum_dy_xhat : arrays of shape (C,)
        From :func:`backward_reduce` (summed over every process in data-parallel training).
    count : int >= 1
        The values per channel the statistics were taken over (across all processes).
    axis : int, default 1
    y : array, optional
        The output of a forward with ``activation="relu"``: dy is masked where ``y <= 0``, as in
        :func:`backward_reduce`.
    mask : bool array, optional
        The statistics came from the positions where it is True (``count`` of them) and the sums
        over every position; a padded position gets only the direct term ``gamma * invstd * dy``.
    out : array of x's shape and dtype, optional
        Where dx is written.

    Returns
    -------
    dx : array of x's shape and dtype

    Notes
    -----
    It computes::

        dx = gamma * invstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count)
    """
    call = chk.Call()
    xa, dy3, m, s = call.gradient_inputs(x, axis, dy, mean, invstd, allow_empty=True)
    g = call.param(gamma, "gamma")
    sdy = call.saved(sum_dy, "sum_dy")
    sdyx = call.saved(sum_dy_xhat, "sum_dy_xhat")
    n = chk.count(count)
    y3 = call.like_x(y, "y")
    valid = call.mask(mask)
    dx = call.output(out)
    call.seal()
    x3 = call.view3(xa)
    mv = None if valid is None else chk.mask_view(valid, x3)
    call.kernels.backward_elementwise(dy3, x3, m, s, g, sdy, sdyx, n, dx.reshape(x3.shape), y3, mv)
    call.finish()
    return dx if out is None else out
