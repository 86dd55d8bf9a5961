"""The functional API: batch normalization on NumPy arrays.

Conventions shared by every function here:

* ``x`` has ndim >= 2 and its channel axis is ``axis`` (default 1, as in PyTorch; ``axis=-1`` is
  channels-last, as in Keras).  Statistics reduce over every other axis.
* ``x`` is float32 or float64, or float16 / bfloat16 (``ml_dtypes.bfloat16``; bnkernel never
  imports ml_dtypes itself).  ``gamma``, ``beta``, the running statistics and ``dgamma`` /
  ``dbeta`` have shape ``(C,)`` and x's dtype, float32 for the 16-bit dtypes.  Every value is
  computed in double and rounded once to the output's dtype (to nearest, ties to even), so a
  16-bit output is within half an ulp of the exact result on the given inputs: a relative error
  of at most 2**-11 (float16) or 2**-8 (bfloat16), besides float16's subnormal range.
* Saved statistics (``mean``, ``invstd``, the backward sums, ``M2``) are float64 whatever x's
  dtype is, so that a float32 backward recovers ``xhat`` exactly.
* A non-contiguous ``x`` is copied once (explicitly, in Python).  ``out=`` must be exactly right
  (shape, dtype, C-contiguous, writeable) or the call raises: a silent copy would drop the
  writes.  Every argument is checked by its role in :mod:`bnkernel._checks` before anything is
  written; an output, and a running statistic that is updated, share memory with no other
  argument (the README's "Arguments" table says exactly what each role accepts).
* In place: the forwards (:func:`batch_norm_forward`, :func:`normalize`, and the variants'
  forwards) also accept ``out=x`` itself, the very same array (a partial overlap still raises):
  every kernel reads a value before it writes the result there.  The backward needs x, which is
  then gone, so in-place is for inference, or for training when x is kept elsewhere.
* The compiled kernels release the GIL.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import numpy as np
from numpy.typing import NDArray

from . import _checks as chk
from . import _core

__all__ = [
    "backward_elementwise",
    "backward_reduce",
    "batch_norm_backward",
    "batch_norm_forward",
    "channel_stats",
    "invstd_from_stats",
    "merge_stats",
    "normalize",
    "update_running_stats",
]

Stats = tuple[int, NDArray[np.float64], NDArray[np.float64]]

# batch_norm_forward and batch_norm_backward first offer their arguments to a compiled fast path,
# which runs the plain case (exact ndarrays of the right dtypes, contiguous, Python scalars) in one
# call and declines everything else, invalid arguments included, to the checked path below (the
# rules it re-checks: _checks.FAST_PATH_RULES).  The tests switch it off to run every case through
# both paths.
_FAST_PATH = True


def batch_norm_forward(
    x: NDArray[Any],
    gamma: NDArray[Any] | None = None,
    beta: NDArray[Any] | None = None,
    *,
    running_mean: NDArray[Any] | None = None,
    running_var: NDArray[Any] | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    running_var_unbiased: bool = True,
    single_value: str = "raise",
    activation: str | None = None,
    residual: NDArray[Any] | None = None,
    mask: NDArray[Any] | None = None,
    out: NDArray[Any] | None = None,
) -> tuple[NDArray[Any], NDArray[np.float64], NDArray[np.float64]]:
    """Batch-normalize ``x`` along channel ``axis``; returns ``(y, mean, invstd)``.

    Training (``training=True``), per channel over its m values::

        mean = sum(x) / m;  var = sum((x - mean)**2) / m;  invstd = 1 / sqrt(var + eps)
        y = (x - mean) * (gamma * invstd) + beta

    and, when given, the running statistics are updated in place (PyTorch's rule)::

        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var  + momentum * var * (m / (m - 1))

    where the ``m / (m - 1)`` correction applies when ``running_var_unbiased`` (PyTorch); pass
    ``running_var_unbiased=False`` and ``momentum = 1 - keras_momentum`` for Keras' rule.

    Inference (``training=False``) normalizes with ``running_mean`` / ``running_var`` (both
    required) and returns them as ``mean`` and ``invstd = 1 / sqrt(running_var + eps)``.

    ``mean`` and ``invstd`` are float64 arrays of shape (C,): what :func:`batch_norm_backward`
    needs.

    A training batch with one value per channel (a single sample of an (N, C) input) has no
    variance to normalize with.  ``single_value="raise"`` (the default) raises; ``"running"``
    normalizes it with the running statistics instead (as inference does, leaving them unchanged;
    both must be given); pass the same ``single_value`` to :func:`batch_norm_backward`, which then
    treats the statistics as constants.

    Fused epilogue, in the same pass and in double before the one rounding to x's dtype:
    ``residual`` (x's shape and dtype) is added to the normalized value, then
    ``activation="relu"`` applies max(v, 0) (NaN stays NaN):
    ``y = relu(bn(x) + residual)``, the ResNet block's tail, where the unfused chain makes three
    passes.  Its backward is :func:`batch_norm_backward` with ``activation="relu", y=y``.

    ``mask`` (training only): a boolean array of x's shape without the channel axis (e.g.
    ``(N, L)`` for ``(N, L, C)``), False at padding.  The statistics (and the running update,
    whose unbiased correction uses the number of valid positions) come from the valid positions
    only; every position is normalized with them.  Pass the same mask to the backward.
    """
    policy = chk.single_value(single_value)
    relu = chk.activation(activation)
    training = chk.flag(training, "training")
    if mask is not None:
        return _masked_forward(
            x, gamma, beta, mask, running_mean, running_var, training, momentum, eps, axis,
            running_var_unbiased, relu, residual, out,
        )  # fmt: skip
    if _FAST_PATH and not relu and residual is None:
        fast = _core.forward_fast(
            x, gamma, beta, running_mean, running_var, training, momentum, eps, axis,
            running_var_unbiased, out,
        )  # fmt: skip
        if fast is not None:  # the plain case, done in one compiled call (csrc/fastpath.cpp)
            return fast
    call = chk.Call()
    xa = call.data(x, axis)
    ax, C = call.ax, call.C
    eps_f = chk.eps(eps)
    unbiased = chk.flag(running_var_unbiased, "running_var_unbiased")
    if _single_value_batch(xa, ax, training, policy):
        if running_mean is None or running_var is None:
            raise ValueError(
                "running_mean, running_var: single_value='running' normalizes a one-value "
                "batch with the running statistics, so both are required"
            )
        training = False
    if training:
        mom = chk.weight(momentum)
        g, b, rm, rv, y, res3 = call.training_forward(
            gamma, beta, running_mean, running_var, out, residual
        )
        call.seal()
        x3 = call.view3(xa)
        mean = np.empty(C, dtype=np.float64)
        invstd = np.empty(C, dtype=np.float64)
        _core.forward_train(
            x3, g, b, eps_f, y.reshape(x3.shape), mean, invstd, rm, rv, mom, unbiased, res3, relu,
        )  # fmt: skip
        call.finish()
        return (y if out is None else out), mean, invstd
    if running_mean is None or running_var is None:
        raise ValueError(
            "running_mean, running_var: both are required when training=False "
            "(inference normalizes with the running statistics)"
        )
    g = call.param(gamma, "gamma")
    b = call.param(beta, "beta")
    res3 = call.like_x(residual, "residual")
    rm_in = call.param(running_mean, "running_mean")
    rv_in = call.param(running_var, "running_var")
    assert rm_in is not None and rv_in is not None
    y = call.output(out, in_place=True)
    call.seal()
    mean = rm_in.astype(np.float64)
    invstd = 1.0 / np.sqrt(rv_in.astype(np.float64) + eps_f)
    x3 = call.view3(xa)
    _core.normalize(x3, mean, invstd, g, b, y.reshape(x3.shape), res3, relu)
    call.finish()
    return (y if out is None else out), mean, invstd


@overload
def batch_norm_backward(
    dy: NDArray[Any],
    x: NDArray[Any],
    mean: NDArray[Any],
    invstd: NDArray[Any],
    gamma: NDArray[Any] | None = None,
    *,
    training: bool = True,
    axis: int = 1,
    single_value: str = "raise",
    activation: str | None = None,
    y: NDArray[Any] | None = None,
    residual_grad: Literal[False] = False,
    mask: NDArray[Any] | None = None,
    out: NDArray[Any] | None = None,
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]: ...
@overload
def batch_norm_backward(
    dy: NDArray[Any],
    x: NDArray[Any],
    mean: NDArray[Any],
    invstd: NDArray[Any],
    gamma: NDArray[Any] | None = None,
    *,
    training: bool = True,
    axis: int = 1,
    single_value: str = "raise",
    activation: str | None = None,
    y: NDArray[Any] | None = None,
    residual_grad: Literal[True],
    mask: NDArray[Any] | None = None,
    out: NDArray[Any] | None = None,
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]: ...
def batch_norm_backward(
    dy: NDArray[Any],
    x: NDArray[Any],
    mean: NDArray[Any],
    invstd: NDArray[Any],
    gamma: NDArray[Any] | None = None,
    *,
    training: bool = True,
    axis: int = 1,
    single_value: str = "raise",
    activation: str | None = None,
    y: NDArray[Any] | None = None,
    residual_grad: bool = False,
    mask: NDArray[Any] | None = None,
    out: NDArray[Any] | None = None,
) -> tuple[NDArray[Any], ...]:
    """Gradients ``(dx, dgamma, dbeta)`` of batch normalization given ``dy = dL/dy``.

    With ``xhat = (x - mean) * invstd`` and m values per channel::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx     = gamma * invstd / m * (m * dy - dbeta - xhat * dgamma)   # training=True
        dx     = gamma * invstd * dy                                     # training=False (frozen)

    ``mean`` and ``invstd`` are what :func:`batch_norm_forward` returned.  ``training=False`` is the
    backward of inference / frozen-statistics mode, where mean and invstd do not depend on x.
    ``dgamma`` and ``dbeta`` have gamma's dtype (x's, or float32 for 16-bit x); they are returned
    also when ``gamma`` is None (as the gradients a gamma of ones and a beta of zeros would get).

    ``single_value="running"``: a training batch with one value per channel was normalized with
    the running statistics (see :func:`batch_norm_forward`), so its backward is the frozen one.

    After a fused forward with ``activation="relu"``, pass ``activation="relu"`` and that
    forward's output ``y``: the gradient reaching batch normalization is ``g = dy`` where
    ``y > 0``, else 0, taken from y on the fly (no pre-activation stored, no extra pass), and it
    replaces dy above.  ``residual_grad=True`` also returns the residual's gradient, which is g
    (written by the reduction pass), as a fourth element: ``(dx, dgamma, dbeta, dresidual)``;
    without an activation that is dy itself.

    ``mask``: the forward's mask.  With m valid positions, xhat and the sums as above over every
    position (every output depends on the statistics), the exact gradient is::

        dx = gamma * invstd * (dy - valid * (sum(dy) / m + xhat * sum(dy * xhat) / m))

    so a padded position gets only the direct term; dgamma and dbeta sum over every position,
    except that a padded position whose value or gradient is not finite (NaN or inf padding)
    enters no sum: padding never reaches dgamma, dbeta or a valid position's dx.
    """
    policy = chk.single_value(single_value)
    relu = chk.relu_output(activation, y)
    training = chk.flag(training, "training")
    residual_grad = chk.flag(residual_grad, "residual_grad")
    if mask is not None:
        return _masked_backward(
            dy, x, mean, invstd, gamma, mask, training, axis, relu, y, residual_grad, out
        )
    if _FAST_PATH and not relu and not residual_grad:
        fast = _core.backward_fast(dy, x, mean, invstd, gamma, training, axis, out)
        if fast is not None:  # the plain case, done in one compiled call (csrc/fastpath.cpp)
            return fast
    call = chk.Call()
    xa = call.data(x, axis)
    dy3 = call.grad(dy)
    ax, C = call.ax, call.C
    if _single_value_batch(xa, ax, training, policy):
        training = False
    m, s, g, y3, dx = call.backward_arrays(mean, invstd, gamma, y, out)
    call.seal()
    x3 = call.view3(xa)
    P = chk.param_dtype(xa.dtype)
    dgamma = np.empty(C, dtype=P)
    dbeta = np.empty(C, dtype=P)
    dres = np.empty(xa.shape, dtype=xa.dtype) if residual_grad and relu else None
    _core.backward(
        training, dy3, x3, m, s, g, dx.reshape(x3.shape), dgamma, dbeta, y3,
        None if dres is None else dres.reshape(x3.shape),
    )  # fmt: skip
    call.finish()
    dx = dx if out is None else out
    if residual_grad:
        return dx, dgamma, dbeta, (dres if dres is not None else np.asarray(dy))
    return dx, dgamma, dbeta


# ---- masks --------------------------------------------------------------------------------------


def _single_value_batch(xa: NDArray[Any], ax: int, training: bool, policy: str) -> bool:
    """True when a training call has one value per channel and the policy says to fall back to
    the running statistics; raises for the 'raise' policy."""
    if training and xa.size // xa.shape[ax] < 2:
        if policy == "running":
            return True
        chk.one_value_check(xa, ax)
    return False


def _invstd(count: int, m2: NDArray[np.float64], eps: float) -> NDArray[np.float64]:
    """1 / sqrt(M2 / count + eps): the same float64 operations wherever it is computed."""
    result: NDArray[np.float64] = 1.0 / np.sqrt(m2 / float(count) + eps)
    return result


def _running_update(
    rm: NDArray[Any] | None, rv: NDArray[Any] | None, count: int, mean: NDArray[np.float64],
    m2: NDArray[np.float64], momentum: float, unbiased: bool,
) -> None:  # fmt: skip
    """The running update from merged statistics, in the same float64 operations as the fused
    kernel's (csrc/bnkernel/forward.cpp), so the results are bit-identical."""
    if rm is not None:
        rm[...] = (1.0 - momentum) * rm.astype(np.float64) + momentum * mean
    if rv is not None:
        denom = float(count - 1 if unbiased and count > 1 else count)
        rv[...] = (1.0 - momentum) * rv.astype(np.float64) + momentum * (m2 / denom)


def _masked_count(valid: NDArray[np.bool_]) -> int:
    count = int(np.count_nonzero(valid))
    if count < 2:
        raise ValueError(f"mask: expected at least 2 valid positions when training, got {count}")
    return count


def _masked_forward(
    x: Any, gamma: Any, beta: Any, mask: Any, running_mean: Any, running_var: Any,
    training: bool, momentum: Any, eps: Any, axis: Any, unbiased: Any, relu: bool, residual: Any,
    out: Any,
) -> tuple[NDArray[Any], NDArray[np.float64], NDArray[np.float64]]:  # fmt: skip
    if not training:
        raise ValueError("mask: only used in training (inference uses the running statistics)")
    call = chk.Call()
    xa = call.data(x, axis)
    valid = call.mask(mask)
    assert valid is not None
    _masked_count(valid)
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
    mean = np.empty(call.C, dtype=np.float64)
    m2 = np.empty(call.C, dtype=np.float64)
    n = int(_core.masked_channel_stats(x3, chk.mask_view(valid, x3), mean, m2))
    invstd = _invstd(n, m2, eps_f)
    _core.normalize(x3, mean, invstd, g, b, y.reshape(x3.shape), res3, relu)
    _running_update(rm, rv, n, mean, m2, mom, unbiased)
    call.finish()
    return (y if out is None else out), mean, invstd


def _masked_sums(
    dy3: NDArray[Any], x3: NDArray[Any], valid: NDArray[np.bool_], mean: NDArray[np.float64],
    invstd: NDArray[np.float64], y3: NDArray[Any] | None, dres3: NDArray[Any] | None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:  # fmt: skip
    """``(sum(g), sum(g * xhat))`` over every position (g: dy, ReLU-masked with y), except that a
    padded position whose value or gradient is not finite (NaN or inf padding) enters no sum:
    padding never poisons the valid positions' gradients.  Finite padding enters as it always
    did, so the common case is one pass and bit for bit the unmasked reduction."""
    C = x3.shape[1]
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


def _masked_backward(
    dy: Any, x: Any, mean: Any, invstd: Any, gamma: Any, mask: Any, training: bool, axis: Any,
    relu: bool, y: Any, residual_grad: bool, out: Any,
) -> tuple[NDArray[Any], ...]:  # fmt: skip
    call = chk.Call()
    xa = call.data(x, axis)
    dy3 = call.grad(dy)
    valid = call.mask(mask)
    assert valid is not None
    if not training:  # constant statistics: the mask changes nothing
        result: tuple[NDArray[Any], ...] = batch_norm_backward(  # type: ignore[call-overload]
            dy, xa, mean, invstd, gamma, training=False, axis=call.ax,
            activation="relu" if relu else None, y=y, residual_grad=residual_grad, out=out,
        )  # fmt: skip
        return result
    count = _masked_count(valid)
    m, s, g, y3, dx = call.backward_arrays(mean, invstd, gamma, y, out)
    call.seal()
    x3 = call.view3(xa)
    dres = np.empty(xa.shape, dtype=xa.dtype) if relu else None
    # the sums over every position, then dx with the mask (padded positions: the direct term)
    sum_dy, sum_dy_xhat = _masked_sums(
        dy3, x3, valid.reshape(x3.shape[0], x3.shape[2]), m, s, y3,
        None if dres is None else dres.reshape(x3.shape),
    )  # fmt: skip
    _core.backward_elementwise(dy3, x3, m, s, g, sum_dy, sum_dy_xhat, count,
                               dx.reshape(x3.shape), y3, chk.mask_view(valid, x3))  # fmt: skip
    call.finish()
    P = chk.param_dtype(xa.dtype)
    dgamma, dbeta = sum_dy_xhat.astype(P), sum_dy.astype(P)
    dx = dx if out is None else out
    if residual_grad:
        return dx, dgamma, dbeta, (dres if dres is not None else np.asarray(dy))
    return dx, dgamma, dbeta


# ---- split phases -------------------------------------------------------------------------------


def channel_stats(
    x: NDArray[Any], *, axis: int = 1, mask: NDArray[np.bool_] | None = None
) -> Stats:
    """Per-channel ``(count, mean, M2)`` with ``M2 = sum((x - mean)**2)``, the first phase of the
    forward.  ``count`` is the number of values per channel (an int); mean and M2 are float64.

    A batch with no samples (a zero-length non-channel axis) is allowed and gives ``(0, 0, 0)``,
    the neutral element of :func:`merge_stats` (a process of a data-parallel job may get none).

    ``mask`` (x's shape without the channel axis, bool): the statistics of the positions where it
    is True, read in the same pass (padded values, even NaN, never enter the sums); ``count`` is
    the number of those.
    """
    call = chk.Call()
    xa = call.data(x, axis, allow_empty=True)
    C = call.C
    valid = call.mask(mask)
    mean = np.empty(C, dtype=np.float64)
    m2 = np.empty(C, dtype=np.float64)
    x3 = call.view3(xa)
    if valid is not None:
        return int(_core.masked_channel_stats(x3, chk.mask_view(valid, x3), mean, m2)), mean, m2
    _core.channel_stats(x3, mean, m2)
    return xa.size // C, mean, m2


def merge_stats(*stats: Stats) -> Stats:
    """Merge partial ``(count, mean, M2)`` statistics of disjoint parts of a batch.

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
            channels = int(np.asarray(mu).shape[0]) if np.ndim(mu) == 1 else -1
        means.append(chk.saved_stat(mu, f"stats[{i}] mean", channels))
        m2s.append(chk.saved_stat(m2, f"stats[{i}] M2", channels))
        counts.append(int(n))
    assert channels is not None
    if sum(counts) > chk.INT64_MAX:
        raise OverflowError(
            f"stats: the total count {sum(counts)} does not fit in 64 bits (at most 2**63 - 1)"
        )
    mean = np.empty(channels, dtype=np.float64)
    m2 = np.empty(channels, dtype=np.float64)
    count = _core.merge_stats(
        np.asarray(counts, dtype=np.int64), np.stack(means), np.stack(m2s), mean, m2
    )
    return int(count), mean, m2


def invstd_from_stats(count: int, m2: NDArray[Any], eps: float = 1e-5) -> NDArray[np.float64]:
    """``1 / sqrt(M2 / count + eps)``: the biased variance's inverse standard deviation, exactly as
    the fused forward computes it (same float64 operations, so the results are bit-identical)."""
    count = chk.count(count)
    m2a = np.asarray(m2, dtype=np.float64)
    eps_f = chk.eps(eps)
    return _invstd(count, m2a, eps_f)


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
    """Update running statistics in place from merged batch statistics, as the fused forward does::

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
    call.C = C
    call.x = np.empty((0, C), first.dtype)  # stands for the data: only its dtype is used
    rm = call.running(running_mean, "running_mean")
    rv = call.running(running_var, "running_var")
    mu = call.saved(mean, "mean")
    m2a = call.saved(m2, "m2")
    call.seal()
    _running_update(rm, rv, count, mu, m2a, mom, unbiased)
    call.finish()


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
    """``y = (x - mean) * (gamma * invstd) + beta`` with given per-channel statistics, then the
    optional fused epilogue of :func:`batch_norm_forward` (``+ residual``, ``relu``)."""
    relu = chk.activation(activation)
    call = chk.Call()
    xa = call.data(x, axis, allow_empty=True)
    m = call.saved(mean, "mean")
    s = call.saved(invstd, "invstd")
    g = call.param(gamma, "gamma")
    b = call.param(beta, "beta")
    res3 = call.like_x(residual, "residual")
    y = call.output(out, in_place=True)
    call.seal()
    x3 = call.view3(xa)
    _core.normalize(x3, m, s, g, b, y.reshape(x3.shape), res3, relu)
    call.finish()
    return y if out is None else out


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
    """``(sum(dy), sum(dy * xhat))`` per channel, float64, in one read of (dy, x): the reduction
    phase of the backward.  A batch with no samples gives zeros.

    With ``y`` (the output of a forward with ``activation="relu"``), dy is masked where
    ``y <= 0`` first; ``dresidual`` (x's shape and dtype) then receives the masked dy."""
    call = chk.Call()
    xa = call.data(x, axis, allow_empty=True)
    dy3 = call.grad(dy, allow_empty=True)
    m = call.saved(mean, "mean")
    s = call.saved(invstd, "invstd")
    y3 = call.like_x(y, "y")
    if dresidual is not None and y is None:
        raise ValueError("dresidual: needs y (the ReLU mask)")
    dres = None if dresidual is None else call.output(dresidual, "dresidual")
    call.seal()
    C = call.C
    sum_dy = np.empty(C, dtype=np.float64)
    sum_dy_xhat = np.empty(C, dtype=np.float64)
    _core.backward_reduce(
        dy3, call.view3(xa), m, s, sum_dy, sum_dy_xhat, y3,
        None if dres is None else call.view3(dres),
    )  # fmt: skip
    call.finish()
    return sum_dy, sum_dy_xhat


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
    """The elementwise phase of the training backward::

        dx = gamma * invstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count)

    ``count`` is the number of values per channel the statistics were taken over (across all
    processes in data-parallel training).  ``gamma`` may be None (ones).  With ``y`` (the output
    of a forward with ``activation="relu"``) dy is masked where ``y <= 0``, as in
    :func:`backward_reduce`.

    ``mask``: the statistics came from the positions where it is True (``count`` of them) and the
    sums from :func:`backward_reduce` over every position; a padded position gets only the direct
    term ``gamma * invstd * dy`` (see :func:`batch_norm_backward`).
    """
    call = chk.Call()
    xa = call.data(x, axis, allow_empty=True)
    dy3 = call.grad(dy, allow_empty=True)
    m = call.saved(mean, "mean")
    s = call.saved(invstd, "invstd")
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
    _core.backward_elementwise(dy3, x3, m, s, g, sdy, sdyx, n, dx.reshape(x3.shape), y3, mv)
    call.finish()
    return dx if out is None else out
