"""torch.nn's batch normalization on bnkernel's CPU kernels.

:class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d` are the ``torch.nn`` classes
of the same names (subclasses: same constructor, parameters, buffers, ``state_dict`` keys,
``train()`` / ``eval()``, ``momentum=None``, ``affine=False``, ``track_running_stats=False``,
``isinstance`` checks), whose forward and backward run bnkernel's kernels through a
``torch.autograd.Function``; :func:`batch_norm` is ``torch.nn.functional.batch_norm``'s
counterpart, with bnkernel's fused residual + ReLU epilogue as an option.
:func:`convert_batch_norm` swaps every ``torch.nn.BatchNorm1d/2d/3d`` of a model for these (the
parameters and buffers carried over: the very same tensors), and :func:`revert_batch_norm` swaps
back.

The tensors are viewed as NumPy arrays, never copied (a channels_last tensor is read as the NHWC
array it is in memory, with the channel axis last); outputs are torch tensors from torch's
allocator, in the input's memory format.  CPU tensors only: anything else raises, naming the
device.  float32 and float64; float16 and bfloat16 data with float32 parameters and running
statistics, as the kernels take them (bfloat16 needs ``ml_dtypes``, which NumPy needs to hold
it); parameters of another dtype than the kernels take are converted for the call (C values) and
their gradients converted back.

Differences from torch's own kernels, by design: statistics in double, outputs within half an ulp
of the float64 result (torch's float32 results carry a few ulps); results bit-identical for any
thread count; the backward is differentiable once (no double backward: use torch's modules for
gradient penalties); ``momentum`` must lie in [0, 1].

Imported only when used (``import bnkernel`` never imports torch): ``pip install
'bnkernel[torch]'``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _checks as chk
from .functional import batch_norm_backward, batch_norm_forward

try:
    import torch
    from torch.autograd.function import once_differentiable
except ImportError as exc:  # pragma: no cover - exercised without torch only
    raise ImportError("bnkernel.torch needs PyTorch: pip install 'bnkernel[torch]'") from exc

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "batch_norm",
    "convert_batch_norm",
    "revert_batch_norm",
]

_HALF = (torch.float16, torch.bfloat16)


# ---- tensors as arrays -------------------------------------------------------------------------


def _bfloat16() -> Any:
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(
            "bfloat16 tensors need ml_dtypes (NumPy's bfloat16): pip install ml_dtypes"
        ) from None
    return ml_dtypes.bfloat16


def _array(t: torch.Tensor) -> Any:
    """A CPU tensor's memory as a NumPy array (a view: writes go to the tensor)."""
    if t.requires_grad:
        t = t.detach()
    if t.is_neg():  # a lazy negation (z.conj().imag): torch's own ops apply it, so do we
        t = t.resolve_neg()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_bfloat16())
    return t.numpy()


def _check_cpu(name: str, t: torch.Tensor | None) -> None:
    if t is not None and not t.is_cpu:
        raise TypeError(
            f"{name}: a tensor on {t.device}; bnkernel.torch runs on CPU tensors (use "
            "torch.nn's modules on other devices, or revert_batch_norm(model))"
        )


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """x as the kernels read it: ``(view, axis, channels_last)``.  A channels_last (or
    channels_last_3d) tensor is permuted to the NHWC (NDHWC) view that is contiguous, channel axis
    last; anything else is made contiguous (a copy only if it is not), channel axis 1."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        perm = (0, *range(2, x.dim()), 1)
        v = x.permute(perm)
        if v.is_contiguous():
            return v, -1, True
    return x.contiguous(), 1, False


def _unlayout(v: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The kernels' view back in x's shape (a permuted view for channels_last)."""
    if not channels_last:
        return v
    return v.permute(0, v.dim() - 1, *range(1, v.dim() - 1))


def _param_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _HALF else x.dtype


def _as_param(t: torch.Tensor | None, dtype: torch.dtype) -> Any:
    """A per-channel tensor, read, as an array of the kernels' parameter dtype (a view when it
    already is one)."""
    if t is None:
        return None
    if t.dtype != dtype or not t.is_contiguous():
        t = t.detach().to(dtype).contiguous()
    return _array(t)


# ---- the autograd function ---------------------------------------------------------------------


class _BatchNormFunction(torch.autograd.Function):
    """Batch normalization's forward and backward on bnkernel's kernels.

    ``batch_stats``: normalize with the batch's statistics (and update the running ones when
    given) and backpropagate through them; otherwise normalize with the running statistics,
    which the backward treats as constants.  ``relu`` and ``residual``: the fused epilogue
    ``relu(bn(x) + residual)``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        batch_stats: bool,
        momentum: float,
        eps: float,
        residual: torch.Tensor | None,
        relu: bool,
    ) -> torch.Tensor:
        for name, t in (("input", x), ("weight", weight), ("bias", bias),
                        ("running_mean", running_mean), ("running_var", running_var),
                        ("residual", residual)):  # fmt: skip
            _check_cpu(name, t)
        xv, axis, channels_last = _layout(x)
        pdt = _param_dtype(x)
        g, b = _as_param(weight, pdt), _as_param(bias, pdt)
        res = None
        if residual is not None:
            if residual.shape != x.shape:
                raise ValueError(
                    f"residual: expected the input's shape {tuple(x.shape)}, got "
                    f"{tuple(residual.shape)}"
                )
            res = _array(_layout_like(residual.to(x.dtype), axis))
        y = torch.empty_like(xv, memory_format=torch.contiguous_format)
        if batch_stats:
            # running statistics of the kernels' dtype are updated in place; others through a copy
            stats = [_running(t, pdt) for t in (running_mean, running_var)]
            _, mean, invstd = batch_norm_forward(
                _array(xv), g, b, training=True, running_mean=stats[0][0],
                running_var=stats[1][0], momentum=momentum, eps=eps, axis=axis,
                activation="relu" if relu else None, residual=res, out=_array(y),
            )  # fmt: skip
            for t, (a, copied) in zip((running_mean, running_var), stats, strict=True):
                if copied and t is not None:
                    with torch.no_grad():
                        t.copy_(torch.from_numpy(a))
        else:
            if running_mean is None or running_var is None:
                raise ValueError("running_mean, running_var: both are required in eval mode")
            _, mean, invstd = batch_norm_forward(
                _array(xv), g, b, training=False, running_mean=_as_param(running_mean, pdt),
                running_var=_as_param(running_var, pdt), eps=eps, axis=axis,
                activation="relu" if relu else None, residual=res, out=_array(y),
            )  # fmt: skip
        ctx.layout = (axis, channels_last, batch_stats, relu, residual is not None)
        ctx.param_dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        # the statistics and gamma as the kernels read them stay with ctx (NumPy, C values);
        # the tensors go through save_for_backward, whose version check catches an in-place
        # change of x, y or the weight between the forward and the backward
        ctx.arrays = (mean, invstd, g)
        ctx.save_for_backward(xv, weight, y if relu else None)
        return _unlayout(y, channels_last)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():
            # create_graph=True: these gradients are not differentiable, and a second backward
            # through them must raise, which once_differentiable arranges (at a cost of ~40 us a
            # call, so only here)
            return _backward_once(ctx, dy)
        return _backward(ctx, dy)


def _backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The Function's backward: the kernels' training or frozen backward into a new dx."""
    xv, _, y = ctx.saved_tensors
    mean, invstd, g = ctx.arrays
    axis, channels_last, batch_stats, relu, had_residual = ctx.layout
    dyv = _layout_like(dy.to(xv.dtype), axis)
    dx = torch.empty_like(xv, memory_format=torch.contiguous_format)
    grads = batch_norm_backward(
        _array(dyv), _array(xv), mean, invstd, g, training=batch_stats,
        axis=axis, activation="relu" if relu else None,
        y=None if y is None else _array(y), residual_grad=relu and had_residual, out=_array(dx),
    )  # fmt: skip
    dgamma, dbeta = grads[1], grads[2]
    dres = None
    if relu and had_residual:
        dres = _unlayout(_tensor(grads[3], xv.dtype), channels_last)
    wdt, bdt = ctx.param_dtypes
    return (
        _unlayout(dx, channels_last) if ctx.needs_input_grad[0] else None,
        None if wdt is None else torch.from_numpy(dgamma).to(wdt),
        None if bdt is None else torch.from_numpy(dbeta).to(bdt),
        None, None, None, None, None,
        dres,
        None,
    )  # fmt: skip


_backward_once = once_differentiable(_backward)


def _layout_like(t: torch.Tensor, axis: int) -> torch.Tensor:
    """t (x's shape) in the kernels' view of x: permuted as x is (channel axis last for a
    channels_last x), then contiguous."""
    if axis == -1:
        t = t.permute(0, *range(2, t.dim()), 1)
    return t.contiguous()


def _tensor(a: Any, dtype: torch.dtype) -> torch.Tensor:
    """A kernel result (a NumPy array of x's dtype) as a tensor over the same memory."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _running(t: torch.Tensor | None, dtype: torch.dtype) -> tuple[Any, bool]:
    """A running statistic as the kernels update it: ``(array, copied)``; a view of t when t has
    the kernels' dtype and is contiguous, else a float copy that the caller writes back."""
    if t is None:
        return None, False
    if t.dtype == dtype and t.is_contiguous() and not t.is_neg():
        return _array(t), False
    return _array(t.detach().to(dtype).contiguous().clone()), True


# ---- the functional form -----------------------------------------------------------------------


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` on bnkernel's kernels, differentiable.

    Parameters
    ----------
    input : Tensor, CPU
        ``(N, C, ...)``; a channels_last tensor stays channels_last.
    running_mean, running_var : Tensor of shape (C,), optional
        Updated in place when ``training`` (both or neither); required, and used, otherwise.
    weight, bias : Tensor of shape (C,), optional
    training : bool, default False
        torch's default: normalize with the running statistics.
    momentum : float, default 0.1
        ``running = (1 - momentum) * running + momentum * batch`` (unbiased running variance).
    eps : float, default 1e-5
    residual : Tensor, optional
        The input's shape: added after the normalization (bnkernel's fused epilogue).
    activation : {None, "relu"}
        ReLU after the residual, in the same pass.

    Returns
    -------
    Tensor
        The input's shape, dtype and memory format.

    Examples
    --------
    >>> import torch
    >>> from bnkernel.torch import batch_norm
    >>> x = torch.randn(8, 3, 4, 4, requires_grad=True)
    >>> y = batch_norm(x, None, None, training=True)
    >>> y.sum().backward()
    >>> x.grad.shape
    torch.Size([8, 3, 4, 4])
    """
    relu = chk.activation(activation)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(
            f"input: expected (N, C, ...) with ndim >= 2, got shape {tuple(input.shape)}"
        )
    if input.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"input: expected float32, float64, float16 or bfloat16, got {input.dtype}")
    out: torch.Tensor = _BatchNormFunction.apply(  # type: ignore[no-untyped-call]
        input, weight, bias, running_mean, running_var, chk.flag(training, "training"),
        float(momentum), float(eps), residual, relu,
    )  # fmt: skip
    return out


# ---- the modules -------------------------------------------------------------------------------


class _OnKernels:
    """The forward of torch.nn's ``_BatchNorm`` (the same decisions: cumulative average for
    ``momentum=None``, batch statistics in training or without running statistics, the running
    ones updated only in training with ``track_running_stats``), on bnkernel's kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        m: Any = self
        m._check_input_dim(input)
        updating = m.training and m.track_running_stats and m.num_batches_tracked is not None
        if not updating:
            factor = 0.0 if m.momentum is None else m.momentum
        elif m.momentum is None:  # a cumulative average: batch k weighs 1/k
            factor = 1.0 / float(int(m.num_batches_tracked) + 1)
        else:
            factor = m.momentum
        batch_stats = m.training or (m.running_mean is None and m.running_var is None)
        use_buffers = not m.training or m.track_running_stats
        y = batch_norm(
            input, m.running_mean if use_buffers else None, m.running_var if use_buffers else None,
            m.weight, m.bias, batch_stats, factor, m.eps,
        )  # fmt: skip
        if updating:
            m.num_batches_tracked.add_(1)
        return y


class BatchNorm1d(_OnKernels, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` (a subclass: same arguments, state and behaviour) on bnkernel's
    kernels; ``(N, C)`` or ``(N, C, L)`` CPU tensors."""


class BatchNorm2d(_OnKernels, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` (a subclass: same arguments, state and behaviour) on bnkernel's
    kernels; ``(N, C, H, W)`` CPU tensors, contiguous or channels_last.

    Examples
    --------
    >>> import torch
    >>> from bnkernel.torch import BatchNorm2d
    >>> bn = BatchNorm2d(16)
    >>> x = torch.randn(8, 16, 10, 10).to(memory_format=torch.channels_last)
    >>> y = bn(x)
    >>> y.is_contiguous(memory_format=torch.channels_last), int(bn.num_batches_tracked)
    (True, 1)
    >>> sorted(bn.state_dict())
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """


class BatchNorm3d(_OnKernels, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` (a subclass: same arguments, state and behaviour) on bnkernel's
    kernels; ``(N, C, D, H, W)`` CPU tensors, contiguous or channels_last_3d."""


# ---- swapping a model's modules ----------------------------------------------------------------

_Modules = dict[type[torch.nn.Module], type[torch.nn.Module]]
_TO_OURS: _Modules = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: _Modules = {v: k for k, v in _TO_OURS.items()}


def _swap(module: torch.nn.Module, table: _Modules, path: str) -> torch.nn.Module:
    target = table.get(type(module))
    out = module
    if target is not None:
        for name, t in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            if table is _TO_OURS and t.device.type != "cpu":
                raise TypeError(
                    f"{path or 'module'}: {name} is on {t.device}; bnkernel.torch runs on CPU "
                    "tensors (move the model to the CPU first)"
                )
        out = target.__new__(target)
        # the same state, not a copy of it: the parameters and buffers are the very same tensors
        # (an optimizer built before the swap keeps working), hooks and mode included
        out.__dict__.update(module.__dict__)
        for d in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            if d in module.__dict__:
                out.__dict__[d] = type(module.__dict__[d])(module.__dict__[d])
    for name, child in list(out.named_children()):
        new = _swap(child, table, f"{path}.{name}" if path else name)
        if new is not child:
            out.add_module(name, new)
    return out


def convert_batch_norm(module: torch.nn.Module) -> torch.nn.Module:
    """Swap every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` for bnkernel.torch's.

    The parameters and buffers are carried over as the very same tensors (so an optimizer built
    before the swap keeps working, and ``state_dict`` is unchanged), with the mode, the hooks and
    every other attribute.  Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: containers are
    changed in place and the (possibly new) root returned.  Subclasses of torch's classes other
    than these (``SyncBatchNorm``, lazy modules, your own) are left alone.

    Parameters
    ----------
    module : torch.nn.Module
        A model on the CPU.

    Returns
    -------
    torch.nn.Module
        ``module``, or the converted module when ``module`` itself is a batch norm.

    Raises
    ------
    TypeError
        A batch-norm module with a parameter or buffer on another device than the CPU (named by
        its path in the model).

    Examples
    --------
    >>> import torch
    >>> from bnkernel.torch import convert_batch_norm, revert_batch_norm
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> model = convert_batch_norm(model)
    >>> type(model[1]).__module__
    'bnkernel.torch'
    >>> type(revert_batch_norm(model)[1]) is torch.nn.BatchNorm2d
    True
    """
    return _swap(module, _TO_OURS, "")


def revert_batch_norm(module: torch.nn.Module) -> torch.nn.Module:
    """Swap every bnkernel.torch batch norm in ``module`` back for ``torch.nn``'s (the inverse of
    :func:`convert_batch_norm`, with the same tensors carried over)."""
    return _swap(module, _TO_TORCH, "")
