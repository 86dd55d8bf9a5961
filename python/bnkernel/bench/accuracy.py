"""Correctness: every benchmarked result against the float64 reference, and the tolerances.

:data:`TOLERANCE` and :func:`rel_err` are ``python -m bnkernel check``'s too: worst error relative
to max(1, |reference|).  Large inputs are checked on a fixed subset of channels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import reference
from .cases import BenchCheckError, Case, per_channel, reduce_axes
from .peers import Outputs

# bnkernel's results against the float64 reference: worst error relative to max(1, |reference|).
# float32 results are computed in double and rounded once (0.5 ulp = 6e-8), so 1e-6 leaves room
# for the inputs' own rounding; float64 results differ from the reference only by summation order.
# A 16-bit output is the exact result on the given inputs rounded once: within half an ulp, 2**-11
# (float16) or 2**-8 (bfloat16) of its value, so of max(1, |reference|).  Each output is checked
# at its own dtype's tolerance (the 16-bit dtypes' running statistics and dgamma are float32).
TOLERANCE = {
    np.dtype(np.float32): 1e-6,
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float16): 2.0**-11,
}
# The peers compute in x's dtype with their own summation orders: checked loosely, to catch a
# wrongly wired peer (wrong layout, wrong statistics), not to grade its rounding.
PEER_TOLERANCE = {
    np.dtype(np.float32): 1e-4,
    np.dtype(np.float64): 1e-9,
    np.dtype(np.float16): 1e-2,
}
try:  # bfloat16 is ml_dtypes' (optional)
    import ml_dtypes

    TOLERANCE[np.dtype(ml_dtypes.bfloat16)] = 2.0**-8
    PEER_TOLERANCE[np.dtype(ml_dtypes.bfloat16)] = 2e-2
except ImportError:
    pass

# Inputs with more elements than this are checked on a fixed subset of channels (the kernels
# treat every channel alike; the reference on the full array would take longer than the timing).
FULL_CHECK_MAX_ELEMENTS = 1 << 20
CHECK_CHANNELS = 8


def check_channel_subset(case: Case) -> NDArray[np.intp]:
    """The channels checked: all of them for small inputs, else a fixed spread of a few."""
    C = case.channels
    if case.x.size <= FULL_CHECK_MAX_ELEMENTS or C <= CHECK_CHANNELS:
        return np.arange(C)
    return np.unique(np.linspace(0, C - 1, CHECK_CHANNELS).round().astype(np.intp))


def expected_outputs(case: Case, op: str, channels: NDArray[np.intp]) -> Outputs:
    """The float64 reference's results for ``op`` on the given channels of ``case``."""
    ax = case.ax
    full = channels.size == case.channels
    xs = case.x if full else np.take(case.x, channels, axis=ax)
    gs, bs = case.gamma[channels], case.beta[channels]
    rm, rv = case.running_mean[channels], case.running_var[channels]
    if op in ("forward_train", "backward_train"):
        count, mean, var = reference.batch_stats(xs, ax)
        invstd = 1.0 / np.sqrt(var + case.eps)
        if op == "forward_train":
            new_rm, new_rv = reference.update_running_torch(rm, rv, mean, var, count, case.momentum)
            y = reference.normalize(xs, mean, invstd, gs, bs, ax)
            return {"y": y, "running_mean": new_rm, "running_var": new_rv}
        dys = case.dy if full else np.take(case.dy, channels, axis=ax)
        dx, dgamma, dbeta = reference.backward_train(dys, xs, mean, invstd, gs, ax)
        return {"dx": dx, "dgamma": dgamma, "dbeta": dbeta}
    if op == "forward_infer":
        return {"y": reference.forward_infer(xs, rm, rv, gs, bs, case.eps, ax)}
    dys = case.dy if full else np.take(case.dy, channels, axis=ax)
    invstd_f = 1.0 / np.sqrt(rv.astype(np.float64) + case.eps)
    dx, dgamma, dbeta = reference.backward_frozen(dys, xs, rm, invstd_f, gs, ax)
    return {"dx": dx, "dgamma": dgamma, "dbeta": dbeta}


def rel_err(got: NDArray[Any], ref: NDArray[Any], scale: float | None = None) -> float:
    """max |got - ref| / max(1, scale), where scale defaults to max |ref|."""
    ref64 = np.asarray(ref, dtype=np.float64)
    got64 = np.asarray(got, dtype=np.float64)
    if got64.shape != ref64.shape:
        return math.inf
    if scale is None:
        scale = float(np.max(np.abs(ref64), initial=0.0))
    diff = np.abs(got64 - ref64)
    if not np.all(np.isfinite(diff)):
        return math.inf
    return float(np.max(diff, initial=0.0)) / max(1.0, scale)


def sum_scales(case: Case, op: str, channels: NDArray[np.intp]) -> dict[str, float]:
    """For the per-channel sums of the backward, the size of their terms: max over channels of
    sum |dy| (dbeta) and sum |dy * xhat| (dgamma).  A computed sum is accurate relative to that,
    not to its own (possibly much smaller, after cancellation) value."""
    if not op.startswith("backward"):
        return {}
    ax = case.ax
    full = channels.size == case.channels
    xs = case.x if full else np.take(case.x, channels, axis=ax)
    dys = case.dy if full else np.take(case.dy, channels, axis=ax)
    if op == "backward_train":
        mean, invstd = case.mean[channels], case.invstd[channels]
    else:
        mean64, invstd64 = case.frozen_stats()
        mean, invstd = mean64[channels], invstd64[channels]
    red = reduce_axes(xs.ndim, ax)
    dy64 = np.abs(dys.astype(np.float64))
    xhat = (xs.astype(np.float64) - per_channel(mean, xs.ndim, ax)) * per_channel(
        invstd, xs.ndim, ax
    )
    return {
        "dbeta": float(np.max(dy64.sum(axis=red))),
        "dgamma": float(np.max((dy64 * np.abs(xhat)).sum(axis=red))),
    }


def check_outputs(
    case: Case, op: str, got: Outputs, *, peer: bool = False, who: str = "bnkernel"
) -> dict[str, Any]:
    """Compare ``got`` with the float64 reference; raise :class:`BenchCheckError` when off.

    bnkernel (``peer=False``) must be within :data:`TOLERANCE` of the reference relative to
    max(1, |reference|), like ``python -m bnkernel check``.  A peer (``peer=True``) computes in x's
    dtype, so it gets :data:`PEER_TOLERANCE`.  For both, the per-channel sums of the backward
    (dgamma, dbeta) are measured relative to the size of their terms (:func:`sum_scales`): a sum
    of m terms that cancel is only defined to that precision, and the float64 reference's own
    rounding error (seen at 4e-12 of |dgamma| on 32x64x56x56 NHWC, where bnkernel's was 10x
    smaller, checked against math.fsum) would otherwise fail a correct kernel.

    Returns ``{"max_rel_err", "tolerance", "channels_checked", "outputs"}``.
    """
    channels = check_channel_subset(case)
    exp = expected_outputs(case, op, channels)
    table = PEER_TOLERANCE if peer else TOLERANCE
    tol = table[case.dtype]
    scales = sum_scales(case, op, channels)
    full = channels.size == case.channels
    errs: dict[str, float] = {}
    tols: dict[str, float] = {}
    for name, ref in exp.items():
        if name not in got:
            if name.startswith("running_"):
                continue
            raise BenchCheckError(f"{who} {op}: result {name!r} missing")
        g = got[name]
        if not full:
            g = np.take(g, channels, axis=case.ax) if g.ndim > 1 else g[channels]
        errs[name] = rel_err(g, ref, scales.get(name))
        # bnkernel: each output at its own dtype's bound; a peer: at x's dtype's loose one
        tols[name] = tol if peer else table[np.dtype(g.dtype)]
    worst = max(errs.values())
    if any(not errs[k] <= tols[k] for k in errs):
        detail = ", ".join(f"{k} {v:.2e} (tolerance {tols[k]:.1e})" for k, v in errs.items())
        raise BenchCheckError(
            f"{who} {op} on {case.shape_text} {case.label} {case.dtype.name} disagrees with the "
            f"float64 reference: {detail}; its timing would be meaningless"
        )
    return {
        "max_rel_err": worst,
        "tolerance": tol,
        "channels_checked": int(channels.size),
        "outputs": errs,
    }
