"""The peers, ready to time: bnkernel, the NumPy textbook and torch, each op on one case.

:func:`prepare` returns what is timed (the call alone, no setup inside) and how to get its results
for the correctness check.  bnkernel runs with preallocated ``out=``; torch through its ATen
kernels with preallocated outputs where torch has a real out= kernel (else the allocating call:
``variant`` says which); the NumPy textbook allocates, as such code does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import functional as _fn
from . import textbook
from .cases import IMPLS, OPS, BenchError, Case

Outputs = dict[str, NDArray[Any]]


@dataclass
class Prepared:
    """One implementation of one op on one case, ready to time.

    ``call`` is what is timed (no setup inside); ``outputs()`` runs it once more from the initial
    state (running statistics reset) and returns its results as NumPy arrays in x's layout, for the
    correctness check.  ``variant`` says how the implementation is called."""

    call: Callable[[], object]
    outputs: Callable[[], Outputs]
    variant: str


def prepare(case: Case, op: str, impl: str, torch: ModuleType | None = None) -> Prepared:
    """The timed call of ``impl`` ("bnkernel", "numpy" or "torch") for ``op`` on ``case``."""
    if op not in OPS:
        raise ValueError(f"op {op!r}: expected one of {', '.join(OPS)}")
    if impl == "bnkernel":
        return _prepare_bnkernel(case, op)
    if impl == "numpy":
        return _prepare_numpy(case, op)
    if impl == "torch":
        if torch is None:
            raise BenchError("the torch peer needs torch (pip install torch)")
        return _prepare_torch(case, op, torch)
    raise ValueError(f"impl {impl!r}: expected one of {', '.join(IMPLS)}")


def _prepare_bnkernel(case: Case, op: str) -> Prepared:
    # looked up now (not at import) so that a patched kernel is the one benchmarked and checked
    forward = _fn.batch_norm_forward
    backward = _fn.batch_norm_backward
    x, dy, g, b, axis = case.x, case.dy, case.gamma, case.beta, case.axis
    out = np.empty_like(x)
    variant = {
        "forward_train": "bnkernel.batch_norm_forward(training=True, running stats, out=y)",
        "forward_infer": "bnkernel.batch_norm_forward(training=False, out=y)",
        "backward_train": "bnkernel.batch_norm_backward(training=True, out=dx)",
        "backward_frozen": "bnkernel.batch_norm_backward(training=False, out=dx)",
    }[op]
    if op == "forward_train":
        rm = case.running_mean.copy()
        rv = case.running_var.copy()

        def call() -> object:
            return forward(
                x, g, b, running_mean=rm, running_var=rv, training=True,
                momentum=case.momentum, eps=case.eps, axis=axis, out=out,
            )  # fmt: skip

        def outputs() -> Outputs:
            rm[...] = case.running_mean
            rv[...] = case.running_var
            call()
            return {"y": out, "running_mean": rm.copy(), "running_var": rv.copy()}

        return Prepared(call, outputs, variant)
    if op == "forward_infer":
        rm_i = case.running_mean.copy()
        rv_i = case.running_var.copy()

        def call_infer() -> object:
            return forward(
                x, g, b, running_mean=rm_i, running_var=rv_i, training=False, eps=case.eps,
                axis=axis, out=out,
            )  # fmt: skip

        def outputs_infer() -> Outputs:
            call_infer()
            return {"y": out}

        return Prepared(call_infer, outputs_infer, variant)
    training = op == "backward_train"
    mean, invstd = (case.mean, case.invstd) if training else case.frozen_stats()

    def call_bwd() -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
        return backward(dy, x, mean, invstd, g, training=training, axis=axis, out=out)

    def outputs_bwd() -> Outputs:
        _, dgamma, dbeta = call_bwd()
        return {"dx": out, "dgamma": dgamma, "dbeta": dbeta}

    return Prepared(call_bwd, outputs_bwd, variant)


def has_textbook(case: Case) -> bool:
    """Whether the NumPy textbook runs on ``case``: not on 16-bit data (NumPy computes in float32
    there, so a textbook user would convert first)."""
    return case.dtype.itemsize >= 4


def _prepare_numpy(case: Case, op: str) -> Prepared:
    if not has_textbook(case):
        raise BenchError(
            f"the NumPy textbook is not run on {case.dtype.name} (NumPy has no fast arithmetic in "
            "it: such code computes in float32)"
        )
    x, dy, g, b, ax = case.x, case.dy, case.gamma, case.beta, case.ax
    variant = "NumPy textbook in x's dtype (allocating, one thread)"
    if op == "forward_train":
        rm = case.running_mean.copy()
        rv = case.running_var.copy()

        def call() -> NDArray[Any]:
            return textbook.forward_train(x, g, b, rm, rv, ax, case.eps, case.momentum)

        def outputs() -> Outputs:
            rm[...] = case.running_mean
            rv[...] = case.running_var
            return {"y": call(), "running_mean": rm.copy(), "running_var": rv.copy()}

        return Prepared(call, outputs, variant)
    if op == "forward_infer":
        rm_i, rv_i = case.running_mean, case.running_var

        def call_infer() -> NDArray[Any]:
            return textbook.forward_infer(x, g, b, rm_i, rv_i, ax, case.eps)

        return Prepared(call_infer, lambda: {"y": call_infer()}, variant)
    training = op == "backward_train"
    mean64, invstd64 = (case.mean, case.invstd) if training else case.frozen_stats()
    mean = mean64.astype(case.dtype)  # a NumPy forward would have saved them in x's dtype
    invstd = invstd64.astype(case.dtype)
    fn = textbook.backward_train if training else textbook.backward_frozen

    def call_bwd() -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
        return fn(dy, x, mean, invstd, g, ax)

    def outputs_bwd() -> Outputs:
        dx, dgamma, dbeta = call_bwd()
        return {"dx": dx, "dgamma": dgamma, "dbeta": dbeta}

    return Prepared(call_bwd, outputs_bwd, variant)


def _has_cpu_kernel(torch: ModuleType, name: str) -> bool:
    """Whether the ATen operator ``name`` has its own CPU kernel (not a generic composite, which
    for an out= overload means: compute into new tensors, then copy into ``out``)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"))
    except (AttributeError, RuntimeError):
        return False


def _to_torch(torch: ModuleType, a: NDArray[Any], channels_last: bool) -> Any:
    """A torch view (no copy) of ``a`` with the channel axis at 1; channels-last data keeps its
    memory order, so torch sees e.g. an NCHW-shaped tensor in ``torch.channels_last`` format."""
    if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: torch sees its bits
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a)
    if channels_last:
        t = t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
    return t


def _from_torch(t: Any, channels_last: bool) -> NDArray[Any]:
    """A torch result as a NumPy array in the case's layout."""
    if channels_last:
        t = t.permute(0, *range(2, t.dim()), 1)
    t = t.detach()
    if str(t.dtype) == "torch.bfloat16":  # (torch is imported: t is its tensor)
        import ml_dtypes
        import torch

        return np.asarray(t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16))
    return np.asarray(t.numpy())


def _prepare_torch(case: Case, op: str, torch: ModuleType) -> Prepared:
    aten = torch.ops.aten
    cl = case.channels_last
    xt = _to_torch(torch, case.x, cl)
    dyt = _to_torch(torch, case.dy, cl)
    w = torch.from_numpy(case.gamma)
    b = torch.from_numpy(case.beta)
    C = case.channels
    eps, mom = case.eps, case.momentum
    rm0 = torch.from_numpy(case.running_mean)
    rv0 = torch.from_numpy(case.running_var)
    if op in ("forward_train", "forward_infer"):
        training = op == "forward_train"
        rm = rm0.clone()
        rv = rv0.clone()
        if _has_cpu_kernel(torch, "aten::native_batch_norm.out"):
            yt = torch.empty_like(xt)  # same strides as xt (channels-last stays channels-last)
            n_saved = C if training else 0
            sm = torch.empty(n_saved, dtype=w.dtype)  # (float32 for 16-bit x)
            si = torch.empty(n_saved, dtype=w.dtype)
            variant = "torch.ops.aten.native_batch_norm.out (preallocated outputs)"

            def call() -> Any:
                return aten.native_batch_norm.out(
                    xt, w, b, rm, rv, training, mom, eps, out=yt, save_mean=sm, save_invstd=si
                )

        else:
            variant = "torch.native_batch_norm (allocates outputs: no out= kernel)"

            def call() -> Any:
                return torch.native_batch_norm(xt, w, b, rm, rv, training, mom, eps)

        def outputs() -> Outputs:
            rm.copy_(rm0)
            rv.copy_(rv0)
            y = call()[0]
            res = {"y": _from_torch(y, cl)}
            if training:
                res["running_mean"] = rm.numpy().copy()
                res["running_var"] = rv.numpy().copy()
            return res

        return Prepared(call, outputs, variant)

    training = op == "backward_train"
    if training:
        # the statistics torch's own forward saved, as a training loop would pass them
        _, save_mean, save_invstd = torch.native_batch_norm(xt, w, b, None, None, True, mom, eps)
        rm_b = rv_b = None
    else:
        save_mean = save_invstd = None
        rm_b, rv_b = rm0, rv0
    mask = [True, True, True]
    if _has_cpu_kernel(torch, "aten::native_batch_norm_backward.out"):
        dxt = torch.empty_like(xt)
        dgt = torch.empty(C, dtype=w.dtype)
        dbt = torch.empty(C, dtype=w.dtype)
        variant = "torch.ops.aten.native_batch_norm_backward.out (preallocated outputs)"

        def call_bwd() -> Any:
            return aten.native_batch_norm_backward.out(
                dyt, xt, w, rm_b, rv_b, save_mean, save_invstd, training, eps, mask,
                out0=dxt, out1=dgt, out2=dbt,
            )  # fmt: skip

    else:
        variant = (
            "torch.ops.aten.native_batch_norm_backward (allocates outputs: its out= overload "
            "is a generic wrapper that allocates and copies)"
        )

        def call_bwd() -> Any:
            return aten.native_batch_norm_backward(
                dyt, xt, w, rm_b, rv_b, save_mean, save_invstd, training, eps, mask
            )

    def outputs_bwd() -> Outputs:
        dx, dgamma, dbeta = call_bwd()
        return {
            "dx": _from_torch(dx, cl),
            "dgamma": dgamma.numpy().copy(),
            "dbeta": dbeta.numpy().copy(),
        }

    return Prepared(call_bwd, outputs_bwd, variant)
