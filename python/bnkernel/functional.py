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
  argument (docs/api.md, "Arguments", says exactly what each role accepts).
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
from . import _core, _device, phases
from .masked import masked_backward, masked_forward

__all__ = ["batch_norm_backward", "batch_norm_forward"]


def __getattr__(name: str) -> Any:
    """The split phases lived here before bnkernel.phases: ``bnkernel.functional.channel_stats``
    and the rest still resolve, to the same functions."""
    if name in phases.__all__:
        return getattr(phases, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# batch_norm_forward and batch_norm_backward first offer their arguments to a compiled fast path,
# which runs the plain case (exact ndarrays of the right dtypes, contiguous, Python scalars) in one
# call and declines everything else, invalid arguments included, to the checked path below (the
# rules it re-checks: _checks.FAST_PATH_RULES).  The tests switch it off to run every case through
# both paths.
_FAST_PATH = True


@_device.follows_arrays
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

    ``training`` defaults to True, unlike ``torch.nn.functional.batch_norm`` (whose default is
    False): a port of ``F.batch_norm(x, running_mean, running_var)`` must pass
    ``training=False``, or it normalizes with the batch's statistics and updates the running ones.

    Parameters
    ----------
    x : array, ndim >= 2
        float16, bfloat16, float32 or float64 data; the channel axis is ``axis``.  A NumPy array,
        or a CUDA array (CuPy, ``__cuda_array_interface__``, DLPack) with a CUDA build.
    gamma, beta : array of shape (C,), optional
        The affine parameters, of x's dtype (float32 for 16-bit x); None means ones / zeros.
    running_mean, running_var : array of shape (C,), optional
        Updated in place when training (both or neither); required for inference.
    training : bool, default True
        Normalize with the batch's statistics (and update the running ones), or, False, with the
        running statistics.
    momentum : float in [0, 1], default 0.1
        The weight of the batch in the running update (PyTorch's direction).
    eps : float >= 0, default 1e-5
        Added to the variance under the square root.
    axis : int, default 1
        The channel axis (-1 for channels-last).
    running_var_unbiased : bool, default True
        Update the running variance with ``m / (m - 1)`` times the batch variance (PyTorch);
        False with ``momentum = 1 - keras_momentum`` is Keras' rule.
    single_value : {"raise", "running"}, default "raise"
        What a training batch with one value per channel does: raise, or use the running
        statistics (both required; pass the same value to :func:`batch_norm_backward`).
    activation : {None, "relu"}, optional
        The fused ReLU, after the residual: ``y = relu(bn(x) + residual)``.
    residual : array of x's shape and dtype, optional
        Added to the normalized value before the activation.
    mask : bool array, optional
        Training only: x's shape without the channel axis, or one that broadcasts to it as Keras
        broadcasts masks (e.g. ``(N, 1)``), False at padding.  The statistics come from the valid
        positions only (at least 2); every position is normalized with them.
    out : array of x's shape and dtype, optional
        Where y is written (C-contiguous, writeable); may be ``x`` itself.

    Returns
    -------
    y : array
        x normalized, of x's shape and dtype (``out`` when given).
    mean, invstd : float64 arrays of shape (C,)
        The statistics used: the batch's, or in inference the running mean and
        ``1 / sqrt(running_var + eps)``; what :func:`batch_norm_backward` needs.

    Raises
    ------
    TypeError, ValueError
        For any invalid argument, naming it, before anything is written.

    Notes
    -----
    Training, per channel over its m values::

        mean = sum(x) / m;  var = sum((x - mean)**2) / m;  invstd = 1 / sqrt(var + eps)
        y = (x - mean) * (gamma * invstd) + beta
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var  + momentum * var * (m / (m - 1))

    Every value is computed in double and rounded once to the output's dtype; the fused epilogue
    (residual, ReLU with NaN kept) is in the same pass, where the unfused chain makes three.

    An empty batch (a zero-length batch axis, N = 0) is taken as torch takes it: an empty output,
    the running statistics untouched, and NaN mean and invstd in training (there are no batch
    statistics); its backward gives an empty dx and zero dgamma, dbeta.

    Examples
    --------
    >>> import numpy as np, bnkernel as bk
    >>> x = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> y, mean, invstd = bk.batch_norm_forward(x)
    >>> mean
    array([4.5, 5.5, 6.5])
    """
    policy = chk.single_value(single_value)
    relu = chk.activation(activation)
    training = chk.flag(training, "training")
    if mask is not None:
        return masked_forward(
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
    xa = call.data(x, axis, allow_empty=True)
    ax, C = call.ax, call.C
    eps_f = chk.eps(eps)
    unbiased = chk.flag(running_var_unbiased, "running_var_unbiased")
    if training and xa.size == 0:
        return empty_training_forward(call, gamma, beta, running_mean, running_var, momentum, out,
                                      residual)  # fmt: skip
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
        mean = call.empty(C, np.float64)
        invstd = call.empty(C, np.float64)
        call.kernels.forward_train(
            x3, g, b, eps_f, y.reshape(x3.shape), mean, invstd, rm, rv, mom, unbiased, res3, relu,
        )  # fmt: skip
        call.finish()
        return (y if out is None else out), mean, invstd
    if running_mean is None or running_var is None:
        raise ValueError(
            "running_mean, running_var: both are required when training=False "
            "(inference normalizes with the running statistics)"
        )
    g, b, res3 = call.affine_arrays(gamma, beta, residual)
    rm_in = call.param(running_mean, "running_mean")
    rv_in = call.param(running_var, "running_var")
    assert rm_in is not None and rv_in is not None
    y = call.output(out, in_place=True)
    call.seal()
    mean, invstd = phases.running_coefficients(call, rm_in, rv_in, eps_f)
    x3 = call.view3(xa)
    call.kernels.normalize(x3, mean, invstd, g, b, y.reshape(x3.shape), res3, relu)
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
@_device.follows_arrays
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

    Parameters
    ----------
    dy : array of x's shape and dtype
        The gradient of the loss with respect to the forward's output.
    x : array
        The forward's input.
    mean, invstd : float32 or float64 arrays of shape (C,)
        What :func:`batch_norm_forward` returned.
    gamma : array of shape (C,), optional
        The forward's gamma (None: ones).
    training : bool, default True
        The backward through the batch statistics, or, False, the frozen one (inference,
        fine-tuning with frozen statistics), where mean and invstd do not depend on x.
    axis : int, default 1
        The channel axis.
    single_value : {"raise", "running"}, default "raise"
        As given to the forward: with "running", a one-value training batch was normalized with
        the running statistics, so its backward is the frozen one.
    activation : {None, "relu"}, optional
        The forward's fused ReLU; then ``y`` is required.
    y : array, optional
        The forward's output, whose sign masks dy for the ReLU (no pre-activation stored).
    residual_grad : bool, default False
        Also return the residual's gradient.
    mask : bool array, optional
        The forward's mask.
    out : array of x's shape and dtype, optional
        Where dx is written.

    Returns
    -------
    dx : array
        Of x's shape and dtype (``out`` when given).
    dgamma, dbeta : arrays of shape (C,)
        Of gamma's dtype (x's, float32 for 16-bit x), also when gamma is None.
    dresidual : array, only with ``residual_grad=True``
        The residual's gradient: dy masked by the ReLU (dy itself without an activation).

    Raises
    ------
    TypeError, ValueError
        For any invalid argument, naming it, before anything is written.

    Notes
    -----
    With ``xhat = (x - mean) * invstd`` and m values per channel::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx     = gamma * invstd / m * (m * dy - dbeta - xhat * dgamma)   # training=True
        dx     = gamma * invstd * dy                                     # training=False (frozen)

    With the fused ReLU, ``g = dy`` where ``y > 0`` (else 0) replaces dy above.  With a mask of m
    valid positions, xhat and the sums over every position, the exact gradient is::

        dx = gamma * invstd * (dy - valid * (sum(dy) / m + xhat * sum(dy * xhat) / m))

    so a padded position gets only the direct term; dgamma and dbeta sum over every position,
    except that a padded position whose value or gradient is not finite (NaN or inf padding)
    enters no sum: padding never reaches dgamma, dbeta or a valid position's dx.

    Examples
    --------
    >>> import numpy as np, bnkernel as bk
    >>> x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    >>> y, mean, invstd = bk.batch_norm_forward(x)
    >>> dx, dgamma, dbeta = bk.batch_norm_backward(np.ones_like(y), x, mean, invstd)
    >>> dbeta  # sum(dy) over the batch
    array([8., 8., 8.], dtype=float32)
    >>> bool(np.abs(dx).max() < 1e-5)  # a constant dy does not change the normalized output
    True
    """
    policy = chk.single_value(single_value)
    relu = chk.relu_output(activation, y)
    training = chk.flag(training, "training")
    residual_grad = chk.flag(residual_grad, "residual_grad")
    if mask is not None and training:
        return masked_backward(dy, x, mean, invstd, gamma, mask, axis, relu, y, residual_grad, out)
    if _FAST_PATH and not relu and not residual_grad and mask is None:
        fast = _core.backward_fast(dy, x, mean, invstd, gamma, training, axis, out)
        if fast is not None:  # the plain case, done in one compiled call (csrc/fastpath.cpp)
            return fast
    call = chk.Call()
    xa = call.data(x, axis, allow_empty=True)
    dy3 = call.grad(dy, allow_empty=True)
    call.mask(mask)  # frozen statistics: a mask changes nothing, but it must fit
    ax, C = call.ax, call.C
    if xa.size and _single_value_batch(xa, ax, training, policy):
        training = False
    m, s, g, y3, dx = call.backward_arrays(mean, invstd, gamma, y, out)
    call.seal()
    x3 = call.view3(xa)
    P = chk.param_dtype(xa.dtype)
    dres = call.empty(xa.shape, xa.dtype) if residual_grad and relu else None
    if xa.size == 0:  # an empty batch: no gradient to anything (as torch)
        dx = dx if out is None else out
        zeros = call.xp.zeros(C, P)
        if residual_grad:
            return dx, zeros, zeros.copy(), (dres if dres is not None else chk.as_array(dy, "dy"))
        return dx, zeros, zeros.copy()
    dgamma = call.empty(C, P)
    dbeta = call.empty(C, P)
    call.kernels.backward(
        training, dy3, x3, m, s, g, dx.reshape(x3.shape), dgamma, dbeta, y3,
        None if dres is None else dres.reshape(x3.shape),
    )  # fmt: skip
    call.finish()
    dx = dx if out is None else out
    if residual_grad:
        return dx, dgamma, dbeta, (dres if dres is not None else chk.as_array(dy, "dy"))
    return dx, dgamma, dbeta


def empty_training_forward(
    call: chk.Call, gamma: Any, beta: Any, running_mean: Any, running_var: Any, momentum: Any,
    out: Any, residual: Any,
) -> tuple[NDArray[Any], NDArray[np.float64], NDArray[np.float64]]:  # fmt: skip
    """A training batch with no values (a zero-length batch axis), as torch treats it: the
    arguments checked as usual, an empty output, the running statistics untouched; there are no
    batch statistics, so mean and invstd are NaN."""
    chk.weight(momentum)
    *_, y, _ = call.training_forward(gamma, beta, running_mean, running_var, out, residual)
    call.seal()
    nan = call.xp.full(call.C, np.nan)
    return (y if out is None else out), nan, nan.copy()


def _single_value_batch(xa: NDArray[Any], ax: int, training: bool, policy: str) -> bool:
    """True when a training call has one value per channel and the policy says to fall back to
    the running statistics; raises for the 'raise' policy."""
    if training and xa.size // xa.shape[ax] < 2:
        if policy == "running":
            return True
        chk.one_value_check(xa, ax)
    return False
