"""The second half of ``python -m bnkernel check``: every kernel path, on every layout of the check
and every data dtype, against the float64 reference (:mod:`bnkernel.reference`), one line per path
and dtype with the worst error over the layouts.

Paths: the training and inference forwards, the training and frozen backwards, the fused residual
and ReLU (forward and backward), masks (forward and backward), and the split phases (statistics,
normalize; the backward's reduction and elementwise pass).  Errors are relative to the largest
magnitude of the reference output (``bench.accuracy.rel_err``), held to the dtype's bound: half an
ulp of the 16-bit types, 1e-6 for float32 and 1e-12 for float64 (every value is computed in double
and rounded once).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _checks as chk
from . import reference as ref
from .bench.accuracy import TOLERANCE, rel_err
from .functional import batch_norm_backward, batch_norm_forward
from .phases import (
    backward_elementwise,
    backward_reduce,
    channel_stats,
    invstd_from_stats,
    normalize,
)

EPS = 1e-5
# bfloat16: half an ulp of its 8-bit significand
TOLERANCES = {**TOLERANCE, "bfloat16": 2.0**-8}

Case = dict[str, Any]
Path = Callable[[Case], float]


def _tolerance(dtype: np.dtype[Any]) -> float:
    return TOLERANCES.get(dtype, TOLERANCES["bfloat16"])


def make_case(shape: tuple[int, ...], axis: int, dtype: np.dtype[Any], seed: int) -> Case:
    """Random data of one layout and dtype, and what every path needs."""
    rng = np.random.default_rng(seed)
    nd = len(shape)
    ax = axis % nd
    C = shape[ax]
    P = chk.param_dtype(dtype)
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
    no_channel = shape[:ax] + shape[ax + 1 :]
    mask = rng.random(no_channel) < 0.7
    mask.reshape(-1)[:2] = True  # (at least two valid positions)
    return {
        "x": x,
        "dy": rng.standard_normal(shape).astype(dtype),
        "res": rng.standard_normal(shape).astype(dtype),
        "gamma": rng.uniform(0.5, 1.5, C).astype(P),
        "beta": rng.standard_normal(C).astype(P),
        "rm": rng.standard_normal(C).astype(P),
        "rv": rng.uniform(0.5, 2.0, C).astype(P),
        "mask": mask,
        "axis": axis,
    }


def _grads(got: Sequence[NDArray[Any]], want: Sequence[NDArray[Any]]) -> float:
    return max(rel_err(g, w) for g, w in zip(got, want, strict=True))


def forward_train(c: Case) -> float:
    y, _, _ = batch_norm_forward(c["x"], c["gamma"], c["beta"], axis=c["axis"])
    return rel_err(y, ref.forward_train(c["x"], c["gamma"], c["beta"], EPS, c["axis"])[0])


def forward_infer(c: Case) -> float:
    y, _, _ = batch_norm_forward(c["x"], c["gamma"], c["beta"], running_mean=c["rm"],
                                 running_var=c["rv"], training=False, axis=c["axis"])  # fmt: skip
    want = ref.forward_infer(c["x"], c["rm"], c["rv"], c["gamma"], c["beta"], EPS, c["axis"])
    return rel_err(y, want)


def _backward(c: Case, training: bool) -> float:
    _, rmean, rinvstd = ref.forward_train(c["x"], c["gamma"], c["beta"], EPS, c["axis"])
    got = batch_norm_backward(c["dy"], c["x"], rmean, rinvstd, c["gamma"], training=training,
                              axis=c["axis"])  # fmt: skip
    fn = ref.backward_train if training else ref.backward_frozen
    return _grads(got, fn(c["dy"], c["x"], rmean, rinvstd, c["gamma"], c["axis"]))


def backward_train(c: Case) -> float:
    return _backward(c, True)


def backward_frozen(c: Case) -> float:
    return _backward(c, False)


def fused_forward(c: Case) -> float:
    y, _, _ = batch_norm_forward(c["x"], c["gamma"], c["beta"], axis=c["axis"],
                                 activation="relu", residual=c["res"])  # fmt: skip
    z = ref.forward_train(c["x"], c["gamma"], c["beta"], EPS, c["axis"])[0]
    return rel_err(y, ref.apply_epilogue(z, c["res"], True))


def fused_backward(c: Case) -> float:
    y, mean, invstd = batch_norm_forward(c["x"], c["gamma"], c["beta"], axis=c["axis"],
                                         activation="relu", residual=c["res"])  # fmt: skip
    got = batch_norm_backward(c["dy"], c["x"], mean, invstd, c["gamma"], axis=c["axis"],
                              activation="relu", y=y, residual_grad=True)  # fmt: skip
    g = ref.relu_backward(c["dy"], y)
    want = ref.backward_train(g, c["x"], mean, invstd, c["gamma"], c["axis"])
    return _grads(got, (*want, g))


def masked_forward(c: Case) -> float:
    y, _, _ = batch_norm_forward(c["x"], c["gamma"], c["beta"], axis=c["axis"], mask=c["mask"])
    want = ref.masked_forward(c["x"], c["mask"], c["gamma"], c["beta"], EPS, c["axis"])[0]
    return rel_err(y, want)


def masked_backward(c: Case) -> float:
    _, rmean, rinvstd, _ = ref.masked_forward(c["x"], c["mask"], c["gamma"], c["beta"], EPS,
                                              c["axis"])  # fmt: skip
    got = batch_norm_backward(c["dy"], c["x"], rmean, rinvstd, c["gamma"], axis=c["axis"],
                              mask=c["mask"])  # fmt: skip
    want = ref.masked_backward(c["dy"], c["x"], rmean, rinvstd, c["mask"], c["gamma"], c["axis"])
    return _grads(got, want)


def split_forward(c: Case) -> float:
    n, mean, m2 = channel_stats(c["x"], axis=c["axis"])
    y = normalize(c["x"], mean, invstd_from_stats(n, m2, EPS), c["gamma"], c["beta"],
                  axis=c["axis"])  # fmt: skip
    return rel_err(y, ref.forward_train(c["x"], c["gamma"], c["beta"], EPS, c["axis"])[0])


def split_backward(c: Case) -> float:
    _, rmean, rinvstd = ref.forward_train(c["x"], c["gamma"], c["beta"], EPS, c["axis"])
    sdy, sdyx = backward_reduce(c["dy"], c["x"], rmean, rinvstd, axis=c["axis"])
    n = c["x"].size // c["x"].shape[c["axis"]]
    dx = backward_elementwise(c["dy"], c["x"], rmean, rinvstd, c["gamma"], sdy, sdyx, n,
                              axis=c["axis"])  # fmt: skip
    want = ref.backward_train(c["dy"], c["x"], rmean, rinvstd, c["gamma"], c["axis"])
    return _grads((dx, sdyx, sdy), want)


PATHS: list[tuple[str, Path]] = [
    ("forward, training", forward_train),
    ("forward, inference", forward_infer),
    ("backward, training", backward_train),
    ("backward, frozen", backward_frozen),
    ("residual + ReLU, forward", fused_forward),
    ("residual + ReLU, backward", fused_backward),
    ("mask, forward", masked_forward),
    ("mask, backward", masked_backward),
    ("split phases, forward", split_forward),
    ("split phases, backward", split_backward),
]


def data_dtypes() -> list[np.dtype[Any]]:
    """float32, float64, float16, and bfloat16 when ml_dtypes is installed (the command imports
    it; the library never does)."""
    out: list[np.dtype[Any]] = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)]
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        return out
    bf16 = chk.bfloat16_dtype()
    return out + ([bf16] if bf16 is not None else [])


def run_coverage(cases: Sequence[tuple[str, tuple[int, ...], int]], out: Any = None) -> bool:
    """Print one line per (path, dtype): the worst error over the layouts; True if all pass."""
    write = (out or sys.stdout).write
    dtypes = data_dtypes()
    names = ", ".join(d.name for d in dtypes)
    extra = "" if len(dtypes) == 4 else " (bfloat16 too when ml_dtypes is installed)"
    write(f"\nevery kernel path on all {len(cases)} layouts above, in {names}{extra}: the worst "
          "error against the float64 reference\n")  # fmt: skip
    header = f"{'path':<27} {'dtype':<9} {'worst error':>11} {'bound':>9}\n"
    write(header)
    write("-" * (len(header) - 1) + "\n")
    ok = True
    for name, path in PATHS:
        for dtype in dtypes:
            worst = 0.0
            for i, (_, shape, axis) in enumerate(cases):
                worst = max(worst, path(make_case(shape, axis, dtype, seed=i)))
            bound = _tolerance(dtype)
            bad = not worst <= bound
            ok &= not bad
            write(f"{name:<27} {dtype.name:<9} {worst:>11.2e} {bound:>9.1e}"
                  f"{'  <-- FAILED' if bad else ''}\n")  # fmt: skip
    return ok
