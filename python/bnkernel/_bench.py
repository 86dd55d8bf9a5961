"""Benchmarks: ``python -m bnkernel bench``.

Times bnkernel's four kernels (training forward with running statistics, inference forward,
training backward, frozen-statistics backward) on a table of shapes, layouts and dtypes, next to
the NumPy "textbook" implementation a user would write and, when it is importable, PyTorch's
kernels.  Every result is checked against the float64 reference (:mod:`bnkernel.reference`) before
it is timed, so a fast wrong kernel fails the benchmark instead of winning it.

Batch norm is memory-bound, so besides times the table reports

* achieved GB/s for the minimal traffic: forward = read x + write y (2 x bytes(x)), backward =
  read x + read dy + write dx (3 x bytes(x));
* passes over x: ``t / (bytes(x) / copy_bandwidth)``, where the copy bandwidth is measured here,
  at the same thread count, as ``2 * bytes / t_copy`` (a copy reads and writes every byte).  A copy
  of x is 2 passes; the lower bound of a forward is 2 and of a backward 3.

Peers are timed the way they run in a training loop: bnkernel with preallocated ``out=``; torch
through its ATen kernels with preallocated outputs where torch has a real out= kernel (else the
allocating call; the JSON says which); NumPy textbook code allocates, as such code does.

``--sweep`` runs the same measurements over one shape family, (N, 64, H, W), whose byte size
doubles from 4 KiB to ``--sweep-max`` (1 GiB by default), and reports the cost per byte of each
size next to the median cost per byte of the sizes past the L2 cache, with the machine's cache
sizes marked: a cache boundary the kernels fall off shows as a step in that ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import glob
import importlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TextIO

import numpy as np
from numpy.typing import NDArray

from . import _core, reference
from . import functional as _fn
from ._version import __version__

__all__ = [
    "DEFAULT_SHAPES",
    "IMPLS",
    "OPS",
    "QUICK_SHAPES",
    "BenchCheckError",
    "BenchConfig",
    "BenchError",
    "CacheLevel",
    "Case",
    "CopyBandwidth",
    "Prepared",
    "Timing",
    "add_arguments",
    "cache_sizes",
    "check_outputs",
    "copy_bandwidth",
    "format_sweep_table",
    "make_case",
    "parse_shapes",
    "parse_size",
    "prepare",
    "run_bench",
    "run_sweep",
    "sweep_shape",
    "sweep_sizes",
    "time_call",
]

OPS = ("forward_train", "forward_infer", "backward_train", "backward_frozen")
IMPLS = ("bnkernel", "numpy", "torch")
LAYOUTS = ("NCHW", "NHWC", "NC")
DTYPES = ("float32", "float64")

# Shapes are written channels-first (N, C, spatial...); the NHWC layout stores the same logical
# tensor channels-last, as an array of shape (N, spatial..., C).
DEFAULT_SHAPES: list[tuple[int, ...]] = [
    (256, 1024),
    (4096, 256),
    (32, 64, 56, 56),
    (32, 256, 56, 56),
    (32, 512, 28, 28),
    (32, 2048, 7, 7),
    (64, 3),
]
QUICK_SHAPES: list[tuple[int, ...]] = [(64, 3), (256, 1024), (8, 64, 28, 28)]

EPS = 1e-5
MOMENTUM = 0.1

# bnkernel's results against the float64 reference: worst error relative to max(1, |reference|)
# (the tolerances of ``python -m bnkernel check`` and the test suite).
TOLERANCE = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
# The peers compute in x's dtype with their own summation orders: checked loosely, to catch a
# wrongly wired peer (wrong layout, wrong statistics), not to grade its rounding.
PEER_TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}

# Inputs with more elements than this are checked on a fixed subset of channels (the kernels
# treat every channel alike; the reference on the full array would take longer than the timing).
FULL_CHECK_MAX_ELEMENTS = 1 << 20
CHECK_CHANNELS = 8

# Timing: samples of one call, or of a batch of calls averaged when a call is too short to time
# on its own; at least `repeat` samples and `min_time` seconds, at most MAX_SAMPLES samples.
MAX_SAMPLES = 2000
SHORT_CALL_S = 2e-5  # calls shorter than this are timed in batches ...
BATCH_TARGET_S = 2e-4  # ... of about this long
PEER_MAX_TIME_S = 1.0  # the NumPy textbook stops after this much time (and >= 3 samples)

# The size sweep (--sweep): logical shapes (N, SWEEP_CHANNELS, H, W) of 2**k bytes, H = W doubling
# up to SWEEP_MAX_SIDE, then N doubling; sizes from SWEEP_MIN_BYTES to --sweep-max.  A measurement
# in a sweep stops after SWEEP_MAX_TIME_S once it has 3 samples (slow peers on 1 GiB inputs).
SWEEP_CHANNELS = 64
SWEEP_MAX_SIDE = 64
SWEEP_MIN_BYTES = 4 << 10
SWEEP_MAX_BYTES = 1 << 30
SWEEP_MAX_TIME_S = 2.0
# Peak memory of a sweep step, in units of bytes(x): x, dy, one output, a peer's output and the
# temporaries of the peers and of the reference check (the NumPy textbook allocates more).
SWEEP_MEMORY_FACTOR = 5
SWEEP_MEMORY_FACTOR_NUMPY = 9
# Sizes of x past this are "past L2" when the machine does not say how large its L2 is.
ASSUMED_L2_BYTES = 1 << 20
CACHE_SYSFS = "/sys/devices/system/cpu/cpu0/cache"


class BenchError(RuntimeError):
    """A benchmark that cannot run as configured (bad option, missing optional dependency)."""


class BenchCheckError(AssertionError):
    """A benchmarked kernel gave a wrong result: its timing would be meaningless."""


# ---- parsing ------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32x256x56x56"`` -> ``(32, 256, 56, 56)``: positive integers joined by 'x', ndim >= 2."""
    parts = text.strip().lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise ValueError(
            f"{text!r} is not a shape: expected at least two positive integers joined by 'x', "
            "channels second, e.g. 32x256x56x56 or 64x3"
        )
    return dims


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """A comma-separated list of shapes, e.g. ``"32x256x56x56,64x3"``."""
    if not text.strip():
        raise ValueError("expected a comma-separated list of shapes such as 32x256x56x56,64x3")
    return [parse_shape(s) for s in text.split(",")]


def parse_choices(text: str, choices: Sequence[str], what: str) -> list[str]:
    """A comma-separated subset of ``choices`` (case-insensitive), in the order given."""
    lookup = {c.lower(): c for c in choices}
    picked: list[str] = []
    for raw in text.split(","):
        item = raw.strip().lower()
        if item not in lookup:
            raise ValueError(f"unknown {what} {raw.strip()!r}; choose from {', '.join(choices)}")
        if lookup[item] not in picked:
            picked.append(lookup[item])
    return picked


def parse_threads(text: str) -> list[int]:
    """A comma-separated list of thread counts >= 1, e.g. ``"1,2"``."""
    out: list[int] = []
    for raw in text.split(","):
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{raw.strip()!r} is not a thread count: expected integers >= 1")
        if n not in out:
            out.append(n)
    return out


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:([kmgt])(?:i?b)?|b)?")


def parse_size(text: str) -> int:
    """``"256M"`` -> 268435456: a whole number of bytes, with an optional K, M, G or T suffix in
    powers of 1024 ("256MiB", "256MB" and "256m" read the same), e.g. 4096, 64K, 1.5M, 1G."""
    m = _SIZE_RE.fullmatch(text.strip().lower().replace(" ", ""))
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""] if m else 0.0
    if not (value >= 1 and value == int(value)):
        raise ValueError(
            f"{text!r} is not a size: expected a whole number of bytes with an optional K, M or G "
            "suffix (powers of 1024), e.g. 64K, 256M or 1G"
        )
    return int(value)


def parse_sweep_size(text: str) -> int:
    """A size for ``--sweep-min`` / ``--sweep-max``: a power of two of at least 4 KiB."""
    n = parse_size(text)
    if n & (n - 1):
        raise ValueError(
            f"{text!r} ({n} bytes) is not a power of two: the sweep doubles the size of x, "
            "e.g. 256M or 1G"
        )
    if n < SWEEP_MIN_BYTES:
        raise ValueError(f"{text!r} ({n} bytes) is too small: the sweep starts at 4K or above")
    return n


def _argtype(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


# ---- cases --------------------------------------------------------------------------------------


def layout_name(ndim: int, channels_last: bool) -> str:
    if ndim == 2:
        return "NC"
    spatial = {3: "L", 4: "HW", 5: "DHW"}.get(ndim, "S" * (ndim - 2))
    return f"N{spatial}C" if channels_last else f"NC{spatial}"


def layouts_for(shape: tuple[int, ...], selected: Iterable[str]) -> list[str]:
    """The layouts (option names) a shape is run in: 2-D shapes only as "NC"."""
    sel = list(selected)
    if len(shape) == 2:
        return ["NC"] if "NC" in sel else []
    return [lay for lay in ("NCHW", "NHWC") if lay in sel]


@dataclass
class Case:
    """One input of the benchmark: data in its memory layout and the per-channel parameters."""

    shape: tuple[int, ...]  # logical, channels second
    layout: str  # "NCHW" (axis=1), "NHWC" (axis=-1) or "NC"
    dtype: np.dtype[Any]
    x: NDArray[Any]
    dy: NDArray[Any]
    gamma: NDArray[Any]
    beta: NDArray[Any]
    running_mean: NDArray[Any]
    running_var: NDArray[Any]
    mean: NDArray[np.float64]  # batch statistics of x (what the training backward gets)
    invstd: NDArray[np.float64]
    eps: float = EPS
    momentum: float = MOMENTUM

    @property
    def channels_last(self) -> bool:
        return self.layout == "NHWC"

    @property
    def axis(self) -> int:
        return -1 if self.channels_last else 1

    @property
    def ax(self) -> int:
        return self.axis % self.x.ndim

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def count(self) -> int:
        return self.x.size // self.channels

    @property
    def nbytes(self) -> int:
        return int(self.x.nbytes)

    @property
    def label(self) -> str:
        return layout_name(self.x.ndim, self.channels_last)

    @property
    def shape_text(self) -> str:
        return "x".join(map(str, self.shape))


def make_case(
    shape: Sequence[int], layout: str = "NCHW", dtype: Any = np.float32, seed: int = 0
) -> Case:
    """Seeded data for a logical (N, C, ...) shape stored in ``layout``.  Each channel has its own
    offset and scale (for x and dy), so a kernel that mixes channels up cannot pass the checks."""
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"shape {shape}: expected ndim >= 2")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if (len(shape) == 2) != (layout == "NC"):
        raise ValueError(f"layout {layout!r} does not apply to a {len(shape)}-D shape {shape}")
    dt = np.dtype(dtype)
    if dt not in TOLERANCE:
        raise ValueError(f"dtype {dt}: expected float32 or float64")
    channels_last = layout == "NHWC"
    stored = (shape[0], *shape[2:], shape[1]) if channels_last else shape
    ax = len(shape) - 1 if channels_last else 1
    C = shape[1]
    bshape = [1] * len(shape)
    bshape[ax] = C
    rng = np.random.default_rng([seed, *shape, int(channels_last), dt.itemsize])
    x = rng.standard_normal(stored, dtype=dt)
    x *= rng.uniform(0.5, 2.0, C).astype(dt).reshape(bshape)
    x += rng.uniform(-3.0, 3.0, C).astype(dt).reshape(bshape)
    dy = rng.standard_normal(stored, dtype=dt)
    dy += rng.uniform(-1.0, 1.0, C).astype(dt).reshape(bshape)
    gamma = (rng.choice([-1.0, 1.0], C) * rng.uniform(0.5, 1.5, C)).astype(dt)
    beta = rng.standard_normal(C).astype(dt)
    running_mean = rng.uniform(-3.0, 3.0, C).astype(dt)
    running_var = rng.uniform(0.5, 4.0, C).astype(dt)
    count, mean, m2 = _fn.channel_stats(x, axis=ax)
    invstd = _fn.invstd_from_stats(count, m2, EPS)
    return Case(shape, layout, dt, x, dy, gamma, beta, running_mean, running_var, mean, invstd)


# ---- the size sweep: shapes and caches ----------------------------------------------------------


def sweep_sizes(min_bytes: int = SWEEP_MIN_BYTES, max_bytes: int = SWEEP_MAX_BYTES) -> list[int]:
    """The sizes of x in a sweep: ``min_bytes``, doubling up to ``max_bytes`` (powers of two)."""
    sizes = []
    n = min_bytes
    while n <= max_bytes:
        sizes.append(n)
        n *= 2
    return sizes


def sweep_shape(nbytes: int, dtype: Any = np.float32) -> tuple[int, int, int, int]:
    """The logical (N, 64, H, W) shape of ``nbytes`` bytes: H = W grow (as powers of two) up to 64,
    then N grows, so past 1 MiB (float32; 2 MiB float64) every size is (N, 64, 64, 64)."""
    itemsize = np.dtype(dtype).itemsize
    per_channel, rem = divmod(nbytes, SWEEP_CHANNELS * itemsize)
    if rem or per_channel < 2 or per_channel & (per_channel - 1):
        raise ValueError(
            f"{nbytes} bytes: expected a power of two holding at least 2 {np.dtype(dtype).name} "
            f"values in each of {SWEEP_CHANNELS} channels"
        )
    k = per_channel.bit_length() - 1  # N * H * W = 2**k
    a = min(k // 2, SWEEP_MAX_SIDE.bit_length() - 1)  # H = W = 2**a
    return (1 << (k - 2 * a), SWEEP_CHANNELS, 1 << a, 1 << a)


@dataclass(frozen=True)
class CacheLevel:
    """One data (or unified) cache of CPU 0, as the kernel reports it."""

    level: int
    kind: str  # "Data" or "Unified"
    nbytes: int
    shared_cpu_list: str | None = None

    @property
    def name(self) -> str:
        return f"L{self.level}{'d' if self.kind == 'Data' else ''}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "level": self.level,
            "type": self.kind,
            "bytes": self.nbytes,
            "shared_cpu_list": self.shared_cpu_list,
        }


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def cache_sizes(root: str = CACHE_SYSFS) -> list[CacheLevel]:
    """CPU 0's data and unified caches from ``root`` (Linux sysfs: ``index*/{level,type,size}``),
    by level; instruction caches are left out.  An empty list where the machine does not say (not
    Linux, no sysfs, unreadable entries): the sweep then marks no cache sizes."""
    found: dict[int, CacheLevel] = {}
    for index in sorted(glob.glob(os.path.join(root, "index*"))):
        level_text = _read_text(os.path.join(index, "level"))
        kind = _read_text(os.path.join(index, "type")) or "Unified"
        size_text = _read_text(os.path.join(index, "size"))
        if level_text is None or size_text is None or kind == "Instruction":
            continue
        try:
            level = int(level_text)
            nbytes = parse_size(size_text)
        except ValueError:
            continue
        shared = _read_text(os.path.join(index, "shared_cpu_list"))
        if level not in found or nbytes > found[level].nbytes:
            found[level] = CacheLevel(level, kind, nbytes, shared)
    return [found[k] for k in sorted(found)]


def fits_in(nbytes: int, caches: Sequence[CacheLevel]) -> str:
    """The name of the smallest cache that holds ``nbytes`` ("memory" when none does)."""
    for c in caches:
        if nbytes <= c.nbytes:
            return c.name
    return "memory"


def baseline_threshold(caches: Sequence[CacheLevel]) -> tuple[int, str]:
    """The size past which a sweep's sizes form the baseline of the cost ratio: the L2 cache's
    size, else the largest cache known, else an assumed 1 MiB; and where that number comes from."""
    l2 = [c for c in caches if c.level == 2]
    if l2:
        return l2[0].nbytes, f"L2 ({_fmt_bytes(l2[0].nbytes)})"
    if caches:
        last = caches[-1]
        return last.nbytes, f"{last.name} ({_fmt_bytes(last.nbytes)}; no L2 known)"
    return ASSUMED_L2_BYTES, f"{_fmt_bytes(ASSUMED_L2_BYTES)} (cache sizes unknown; assumed L2)"


def _fmt_bytes(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


# ---- the NumPy textbook -------------------------------------------------------------------------
#
# Batch norm the way it is usually written in NumPy: whole-array expressions in x's own dtype,
# allocating every intermediate.  (bnkernel.reference is the float64 ground truth; this is a peer.)


def _reduce_axes(ndim: int, ax: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != ax)


def _per_channel(v: NDArray[Any], ndim: int, ax: int) -> NDArray[Any]:
    shape = [1] * ndim
    shape[ax] = -1
    return v.reshape(shape)


def textbook_forward_train(
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
    red = _reduce_axes(x.ndim, ax)
    mean = x.mean(axis=red, keepdims=True)
    var = x.var(axis=red, keepdims=True)
    y: NDArray[Any] = (x - mean) / np.sqrt(var + eps) * _per_channel(
        gamma, x.ndim, ax
    ) + _per_channel(beta, x.ndim, ax)
    m = x.size // x.shape[ax]
    running_mean *= 1 - momentum
    running_mean += momentum * mean.ravel()
    running_var *= 1 - momentum
    running_var += momentum * var.ravel() * (m / (m - 1))
    return y


def textbook_forward_infer(
    x: NDArray[Any],
    gamma: NDArray[Any],
    beta: NDArray[Any],
    running_mean: NDArray[Any],
    running_var: NDArray[Any],
    ax: int,
    eps: float = EPS,
) -> NDArray[Any]:
    nd = x.ndim
    y: NDArray[Any] = (x - _per_channel(running_mean, nd, ax)) / np.sqrt(
        _per_channel(running_var, nd, ax) + eps
    ) * _per_channel(gamma, nd, ax) + _per_channel(beta, nd, ax)
    return y


def textbook_backward_train(
    dy: NDArray[Any],
    x: NDArray[Any],
    mean: NDArray[Any],
    invstd: NDArray[Any],
    gamma: NDArray[Any],
    ax: int,
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """``(dx, dgamma, dbeta)``: ``dx = gamma*invstd/m * (m*dy - dbeta - xhat*dgamma)``."""
    nd = x.ndim
    red = _reduce_axes(nd, ax)
    m = x.size // x.shape[ax]
    xhat = (x - _per_channel(mean, nd, ax)) * _per_channel(invstd, nd, ax)
    dbeta = dy.sum(axis=red)
    dgamma = (dy * xhat).sum(axis=red)
    dx = _per_channel(gamma * invstd / m, nd, ax) * (
        m * dy - _per_channel(dbeta, nd, ax) - xhat * _per_channel(dgamma, nd, ax)
    )
    return dx, dgamma, dbeta


def textbook_backward_frozen(
    dy: NDArray[Any],
    x: NDArray[Any],
    mean: NDArray[Any],
    invstd: NDArray[Any],
    gamma: NDArray[Any],
    ax: int,
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """``(dx, dgamma, dbeta)`` with constant statistics: ``dx = dy * gamma * invstd``."""
    nd = x.ndim
    red = _reduce_axes(nd, ax)
    xhat = (x - _per_channel(mean, nd, ax)) * _per_channel(invstd, nd, ax)
    dbeta = dy.sum(axis=red)
    dgamma = (dy * xhat).sum(axis=red)
    dx = dy * _per_channel(gamma * invstd, nd, ax)
    return dx, dgamma, dbeta


# ---- prepared calls -----------------------------------------------------------------------------

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


def _infer_stats(case: Case) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The frozen statistics (from the running statistics), float64."""
    mean = case.running_mean.astype(np.float64)
    invstd: NDArray[np.float64] = 1.0 / np.sqrt(case.running_var.astype(np.float64) + case.eps)
    return mean, invstd


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
    mean, invstd = (case.mean, case.invstd) if training else _infer_stats(case)

    def call_bwd() -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
        return backward(dy, x, mean, invstd, g, training=training, axis=axis, out=out)

    def outputs_bwd() -> Outputs:
        _, dgamma, dbeta = call_bwd()
        return {"dx": out, "dgamma": dgamma, "dbeta": dbeta}

    return Prepared(call_bwd, outputs_bwd, variant)


def _prepare_numpy(case: Case, op: str) -> Prepared:
    x, dy, g, b, ax = case.x, case.dy, case.gamma, case.beta, case.ax
    variant = "NumPy textbook in x's dtype (allocating, one thread)"
    if op == "forward_train":
        rm = case.running_mean.copy()
        rv = case.running_var.copy()

        def call() -> NDArray[Any]:
            return textbook_forward_train(x, g, b, rm, rv, ax, case.eps, case.momentum)

        def outputs() -> Outputs:
            rm[...] = case.running_mean
            rv[...] = case.running_var
            return {"y": call(), "running_mean": rm.copy(), "running_var": rv.copy()}

        return Prepared(call, outputs, variant)
    if op == "forward_infer":
        rm_i, rv_i = case.running_mean, case.running_var

        def call_infer() -> NDArray[Any]:
            return textbook_forward_infer(x, g, b, rm_i, rv_i, ax, case.eps)

        return Prepared(call_infer, lambda: {"y": call_infer()}, variant)
    training = op == "backward_train"
    mean64, invstd64 = (case.mean, case.invstd) if training else _infer_stats(case)
    mean = mean64.astype(case.dtype)  # a NumPy forward would have saved them in x's dtype
    invstd = invstd64.astype(case.dtype)
    fn = textbook_backward_train if training else textbook_backward_frozen

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
    t = torch.from_numpy(a)
    if channels_last:
        t = t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
    return t


def _from_torch(t: Any, channels_last: bool) -> NDArray[Any]:
    """A torch result as a NumPy array in the case's layout."""
    if channels_last:
        t = t.permute(0, *range(2, t.dim()), 1)
    return np.asarray(t.detach().numpy())


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
            sm = torch.empty(n_saved, dtype=xt.dtype)
            si = torch.empty(n_saved, dtype=xt.dtype)
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
        dgt = torch.empty(C, dtype=xt.dtype)
        dbt = torch.empty(C, dtype=xt.dtype)
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


# ---- correctness --------------------------------------------------------------------------------


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
        mean64, invstd64 = _infer_stats(case)
        mean, invstd = mean64[channels], invstd64[channels]
    red = _reduce_axes(xs.ndim, ax)
    dy64 = np.abs(dys.astype(np.float64))
    xhat = (xs.astype(np.float64) - _per_channel(mean, xs.ndim, ax)) * _per_channel(
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
    tol = (PEER_TOLERANCE if peer else TOLERANCE)[case.dtype]
    scales = sum_scales(case, op, channels)
    full = channels.size == case.channels
    errs: dict[str, float] = {}
    for name, ref in exp.items():
        if name not in got:
            if name.startswith("running_"):
                continue
            raise BenchCheckError(f"{who} {op}: result {name!r} missing")
        g = got[name]
        if not full:
            g = np.take(g, channels, axis=case.ax) if g.ndim > 1 else g[channels]
        errs[name] = rel_err(g, ref, scales.get(name))
    worst = max(errs.values())
    if not worst <= tol:
        detail = ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
        raise BenchCheckError(
            f"{who} {op} on {case.shape_text} {case.label} {case.dtype.name} disagrees with the "
            f"float64 reference: max relative error {worst:.2e} > tolerance {tol:.0e} ({detail}); "
            "its timing would be meaningless"
        )
    return {
        "max_rel_err": worst,
        "tolerance": tol,
        "channels_checked": int(channels.size),
        "outputs": errs,
    }


# ---- timing -------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds per call: one sample per entry of ``times`` (each the mean of ``number`` calls)."""

    times: list[float]
    number: int = 1

    @property
    def median(self) -> float:
        return float(statistics.median(self.times))

    @property
    def min(self) -> float:
        return float(min(self.times))

    def quartiles(self) -> tuple[float, float]:
        q1, q3 = np.percentile(self.times, [25.0, 75.0])
        return float(q1), float(q3)

    def to_json(self, keep_times: int = 200) -> dict[str, Any]:
        q1, q3 = self.quartiles()
        d: dict[str, Any] = {
            "median_s": self.median,
            "min_s": self.min,
            "max_s": float(max(self.times)),
            "q1_s": q1,
            "q3_s": q3,
            "iqr_s": q3 - q1,
            "samples": len(self.times),
            "calls_per_sample": self.number,
        }
        if len(self.times) <= keep_times:
            d["times_s"] = list(self.times)
        return d


def time_call(
    fn: Callable[[], object],
    repeat: int = 10,
    min_time: float = 0.1,
    *,
    max_time: float | None = None,
    max_samples: int = MAX_SAMPLES,
) -> Timing:
    """Time ``fn`` with ``time.perf_counter``: a warm-up call, then samples until there are at
    least ``repeat`` of them and they took at least ``min_time`` seconds (at most ``max_samples``
    samples; with ``max_time``, stop once that much time is spent and 3 samples are in).  Calls
    shorter than ~20 us are timed in batches and averaged, so the clock's own cost stays out."""
    clock = time.perf_counter
    repeat = max(1, repeat)
    t0 = clock()
    fn()  # warm-up: page faults of new outputs, lazy initialization, thread start-up
    first = clock() - t0
    number = 1
    if first < 1e-3:
        t0 = clock()
        for _ in range(5):
            fn()
        per_call = (clock() - t0) / 5
        if per_call < SHORT_CALL_S:
            number = int(min(1000, max(1, BATCH_TARGET_S // max(per_call, 1e-9))))
    times: list[float] = []
    total = 0.0
    while True:
        if number == 1:
            t0 = clock()
            fn()
            dt = clock() - t0
        else:
            t0 = clock()
            for _ in range(number):
                fn()
            dt = (clock() - t0) / number
        times.append(dt)
        total += dt * number
        n = len(times)
        if n >= max_samples or (n >= repeat and total >= min_time):
            break
        if max_time is not None and total >= max_time and n >= min(repeat, 3):
            break
    return Timing(times, number)


# ---- copy bandwidth -----------------------------------------------------------------------------


@dataclass
class CopyBandwidth:
    threads: int
    nbytes: int
    timing: Timing

    @property
    def gbps(self) -> float:
        """2 * bytes / median time, in GB/s (1e9 bytes): a copy reads and writes every byte."""
        return 2.0 * self.nbytes / self.timing.median / 1e9

    def to_json(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "bytes": self.nbytes,
            "GBps": self.gbps,
            "method": "np.copyto"
            if self.threads == 1
            else f"np.copyto in {self.threads} chunks by {self.threads} Python threads",
            "timing": self.timing.to_json(),
        }


def copy_bandwidth(threads: int = 1, nbytes: int = 256 << 20, repeat: int = 7) -> CopyBandwidth:
    """The machine's copy bandwidth with ``threads`` threads: the median time of ``np.copyto``
    between two prefaulted ``nbytes`` arrays, split into ``threads`` contiguous chunks copied
    concurrently (np.copyto releases the GIL)."""
    n = max(1, nbytes // 8)
    src = np.full(n, 1.0)  # written, so its pages are real memory (not the shared zero page)
    dst = np.empty_like(src)
    if threads == 1:

        def copy() -> None:
            np.copyto(dst, src)

        timing = time_call(copy, repeat, 0.0)
    else:
        pairs = list(zip(np.array_split(dst, threads), np.array_split(src, threads), strict=True))
        with ThreadPoolExecutor(max_workers=threads) as pool:

            def copy_chunk(pair: tuple[NDArray[Any], NDArray[Any]]) -> None:
                np.copyto(pair[0], pair[1])

            def copy_threads() -> None:
                for f in [pool.submit(copy_chunk, p) for p in pairs]:
                    f.result()

            timing = time_call(copy_threads, repeat, 0.0)
    return CopyBandwidth(threads, int(src.nbytes), timing)


# ---- the benchmark ------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    shapes: list[tuple[int, ...]] = field(default_factory=lambda: list(DEFAULT_SHAPES))
    layouts: list[str] = field(default_factory=lambda: list(LAYOUTS))
    dtypes: list[str] = field(default_factory=lambda: list(DTYPES))
    ops: list[str] = field(default_factory=lambda: list(OPS))
    threads: list[int] = field(default_factory=list)  # empty: bnkernel.get_num_threads()
    repeat: int = 10
    min_time: float = 0.1
    numpy: bool = True
    torch: bool = True
    copy_mib: float = 256.0
    json_path: str | None = None
    plot_path: str | None = None
    # a measurement stops after this many seconds once it has 3 samples (None: no cap)
    max_time: float | None = None
    # the size sweep (run_sweep): shapes are sweep_shape(size) for the sizes of sweep_sizes()
    sweep: bool = False
    sweep_min: int = SWEEP_MIN_BYTES
    sweep_max: int = SWEEP_MAX_BYTES

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["shapes"] = ["x".join(map(str, s)) for s in self.shapes]
        return d


def traffic_bytes(op: str, nbytes: int) -> int:
    """Minimal memory traffic of ``op`` on an x of ``nbytes``: 2 passes forward, 3 backward."""
    return (2 if op.startswith("forward") else 3) * nbytes


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(torch: ModuleType | None) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": None if torch is None else str(torch.__version__),
        "bnkernel": __version__,
        "openmp": bool(_core.have_openmp),
        "native_build": bool(_core.native_build),
        "default_threads": int(_core.get_num_threads()),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }


def _import_optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1.0:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.1f}x"


# What the columns both the table and the sweep report mean (written into their JSON).
_SHARED_DEFINITIONS = {
    "GBps": "minimal traffic / time: forward 2*bytes(x), backward 3*bytes(x); 1e9 B/GB",
    "passes": "time / (bytes(x) / copy bandwidth at the same thread count)",
    "copy_bandwidth": "2 * bytes / median time of np.copyto",
    "speedup": "peer time / bnkernel time",
    "numpy": "textbook NumPy in x's dtype, one thread, timed once per case (not per thread count)",
}


def run_bench(
    config: BenchConfig, out: TextIO | None = None, progress: TextIO | None = None
) -> dict[str, Any]:
    """Run the benchmark, print the table to ``out`` (progress lines to ``progress``), write the
    JSON / plot files the config asks for, and return the report (the JSON's content)."""
    if config.sweep:
        return run_sweep(config, out, progress)
    out = sys.stdout if out is None else out
    progress = sys.stderr if progress is None else progress
    threads_list, torch = _start_run(config, progress)
    torch_threads0 = int(torch.get_num_threads()) if torch is not None else None

    cases = [
        (shape, lay, dt)
        for shape in config.shapes
        for lay in layouts_for(shape, config.layouts)
        for dt in config.dtypes
    ]
    for shape in config.shapes:
        if not layouts_for(shape, config.layouts):
            progress.write(
                f"skipping {'x'.join(map(str, shape))}: no selected layout applies "
                f"({'NC' if len(shape) == 2 else 'NCHW or NHWC'} needed)\n"
            )
    report: dict[str, Any] = {
        "config": config.to_json() | {"threads": threads_list},
        "machine": machine_info(torch),
        "definitions": {
            "time": "median seconds per call",
            **_SHARED_DEFINITIONS,
        },
        "copy_bandwidth": [],
        "results": [],
    }
    try:
        copy_bw = _measure_copy(config, threads_list, progress)
        report["copy_bandwidth"] = [b.to_json() for b in copy_bw.values()]
        _print_header(out, report, copy_bw, torch)
        total = len(cases) * len(config.ops) * len(threads_list)
        done = 0
        for shape, lay, dtname in cases:
            case = make_case(shape, lay, dtname)
            for op in config.ops:
                np_result = _run_numpy(case, op, config) if config.numpy else None
                for t in threads_list:
                    done += 1
                    row = _run_threads(case, op, t, config, torch, copy_bw[t])
                    _add_numpy(row, np_result)
                    report["results"].append(row)
                    progress.write(f"[{done}/{total}] {_row_line(row)}\n")
                    progress.flush()
            del case
    finally:
        _fn_set_threads_default()
        if torch is not None and torch_threads0 is not None:
            torch.set_num_threads(torch_threads0)
    _print_table(out, report["results"])
    _write_outputs(config, report, progress, plot_report)
    return report


def run_sweep(
    config: BenchConfig, out: TextIO | None = None, progress: TextIO | None = None
) -> dict[str, Any]:
    """The size sweep (``bench --sweep``): every selected op, layout (NCHW, NHWC), dtype and thread
    count on (N, 64, H, W) inputs of ``sweep_sizes(config.sweep_min, config.sweep_max)`` bytes,
    each checked against the reference and timed as in :func:`run_bench`.  Prints one table per
    series with the cost per byte and its ratio to the series' median cost per byte past L2, the
    cache sizes marked between rows; writes the JSON / plot files asked for; returns the report."""
    out = sys.stdout if out is None else out
    progress = sys.stderr if progress is None else progress
    if config.max_time is None:
        config = dataclasses.replace(config, max_time=SWEEP_MAX_TIME_S)
    sizes = sweep_sizes(config.sweep_min, config.sweep_max)
    if not sizes:
        raise BenchError(
            f"--sweep-min {_fmt_bytes(config.sweep_min)} is larger than --sweep-max "
            f"{_fmt_bytes(config.sweep_max)}"
        )
    for n, what in ((config.sweep_min, "--sweep-min"), (config.sweep_max, "--sweep-max")):
        if n < SWEEP_MIN_BYTES or n & (n - 1):
            raise BenchError(f"{what} {n}: expected a power of two of at least 4 KiB")
    layouts = [lay for lay in config.layouts if lay in ("NCHW", "NHWC")]
    if not layouts:
        raise BenchError(
            "--sweep times 4-D (N, 64, H, W) inputs: choose --layouts NCHW and/or NHWC"
        )
    _check_sweep_memory(config.sweep_max, config.numpy)
    threads_list, torch = _start_run(config, progress)
    torch_threads0 = int(torch.get_num_threads()) if torch is not None else None
    caches = cache_sizes(CACHE_SYSFS)
    threshold, threshold_source = baseline_threshold(caches)
    report: dict[str, Any] = {
        "config": config.to_json() | {"threads": threads_list, "layouts": layouts, "shapes": []},
        "machine": machine_info(torch),
        "caches": [c.to_json() for c in caches],
        "caches_source": CACHE_SYSFS if caches else None,
        "sweep": {
            "sizes": sizes,
            "channels": SWEEP_CHANNELS,
            "shapes": {
                dt: ["x".join(map(str, sweep_shape(n, dt))) for n in sizes] for dt in config.dtypes
            },
            "shape_rule": f"(N, {SWEEP_CHANNELS}, H, W): H = W doubling up to {SWEEP_MAX_SIDE}, "
            "then N doubling",
            "baseline_above_bytes": threshold,
            "baseline": threshold_source,
            "series": [],
        },
        "definitions": {
            "time": "median seconds per call",
            "ns_per_byte": "median time / bytes(x), in ns",
            "ns_per_element": "median time / x.size, in ns",
            "cost_ratio": "ns_per_byte / the median ns_per_byte of the same series (op, layout, "
            "dtype, threads, implementation) over the sizes larger than baseline_above_bytes "
            "(the L2 cache); the largest size alone when no size is that large",
            "cache": "the smallest cache that holds x (the op also touches y, or dy and dx, each "
            "as large as x)",
            **_SHARED_DEFINITIONS,
        },
        "copy_bandwidth": [],
        "results": [],
    }
    try:
        copy_bw = _measure_copy(config, threads_list, progress)
        report["copy_bandwidth"] = [b.to_json() for b in copy_bw.values()]
        _print_sweep_header(out, report, copy_bw, torch, config)
        total = len(sizes) * len(layouts) * len(config.dtypes) * len(config.ops)
        total *= len(threads_list)
        done = 0
        for nbytes in sizes:
            for lay in layouts:
                for dtname in config.dtypes:
                    case = make_case(sweep_shape(nbytes, dtname), lay, dtname)
                    for op in config.ops:
                        np_result = _run_numpy(case, op, config) if config.numpy else None
                        for t in threads_list:
                            done += 1
                            row = _run_threads(case, op, t, config, torch, copy_bw[t])
                            _add_numpy(row, np_result)
                            row["cache"] = fits_in(nbytes, caches)
                            report["results"].append(row)
                            progress.write(
                                f"[{done}/{total}] {_fmt_bytes(nbytes)}: {_row_line(row)}\n"
                            )
                            progress.flush()
                    del case, np_result
                    gc.collect()  # the next size's arrays do not coexist with these
    finally:
        _fn_set_threads_default()
        if torch is not None and torch_threads0 is not None:
            torch.set_num_threads(torch_threads0)
    report["sweep"]["series"] = add_sweep_ratios(report["results"], threshold)
    out.write(format_sweep_table(report))
    out.flush()
    _write_outputs(config, report, progress, plot_sweep)
    return report


def _check_sweep_memory(max_bytes: int, numpy: bool) -> None:
    """Refuse, before any work, a sweep whose largest step would not fit in the machine's RAM."""
    factor = SWEEP_MEMORY_FACTOR_NUMPY if numpy else SWEEP_MEMORY_FACTOR
    try:
        phys = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return
    need = factor * max_bytes
    if phys > 0 and need > phys:
        raise BenchError(
            f"--sweep-max {_fmt_bytes(max_bytes)} needs about {_fmt_bytes(need)} of memory "
            f"({factor} x bytes(x){' with the NumPy textbook' if numpy else ''}), more than this "
            f"machine's {_fmt_bytes(phys)}: choose a smaller --sweep-max"
        )


def _series_key(row: dict[str, Any]) -> tuple[str, str, str, int]:
    return (row["op"], row["layout"], row["dtype"], int(row["threads"]))


def add_sweep_ratios(rows: Sequence[dict[str, Any]], threshold: int) -> list[dict[str, Any]]:
    """Add ``ns_per_byte``, ``ns_per_element`` and ``cost_ratio`` to every implementation's result
    in ``rows`` (and bnkernel's at the row's top level), each series (op, layout, dtype, threads)
    against the median ns per byte of its sizes larger than ``threshold`` (its largest size when
    none is); returns the series with their baselines."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_series_key(r), []).append(r)
    series = []
    for (op, layout, dtype, threads), group in groups.items():
        group = sorted(group, key=lambda r: r["bytes"])
        past = [r for r in group if r["bytes"] > threshold] or group[-1:]
        entry: dict[str, Any] = {
            "op": op,
            "layout": layout,
            "dtype": dtype,
            "threads": threads,
            "baseline_bytes": [r["bytes"] for r in past],
            "baseline_ns_per_byte": {},
        }
        for impl in IMPLS:
            if not any(r.get(impl) is not None for r in group):
                continue
            for r in group:
                res = r.get(impl)
                if res is not None:
                    res["ns_per_byte"] = res["median_s"] / r["bytes"] * 1e9
                    res["ns_per_element"] = res["median_s"] / (r["bytes"] / _itemsize(r)) * 1e9
            base_vals = [r[impl]["ns_per_byte"] for r in past if r.get(impl) is not None]
            base = float(statistics.median(base_vals)) if base_vals else math.nan
            entry["baseline_ns_per_byte"][impl] = base
            for r in group:
                res = r.get(impl)
                if res is not None:
                    res["cost_ratio"] = res["ns_per_byte"] / base if base > 0 else math.nan
        for r in group:
            for key in ("ns_per_byte", "ns_per_element", "cost_ratio"):
                r[key] = r["bnkernel"][key]
        series.append(entry)
    return series


def _itemsize(row: dict[str, Any]) -> int:
    return int(np.dtype(row["dtype"]).itemsize)


def _run_numpy(case: Case, op: str, config: BenchConfig) -> dict[str, Any]:
    """The NumPy textbook on ``case``: checked, then timed (capped at ~PEER_MAX_TIME_S)."""
    p = prepare(case, op, "numpy")
    check = check_outputs(case, op, p.outputs(), peer=True, who="numpy")
    timing = time_call(p.call, config.repeat, config.min_time, max_time=PEER_MAX_TIME_S)
    return {**timing.to_json(), "variant": p.variant, "check": check}


def _add_numpy(row: dict[str, Any], np_result: dict[str, Any] | None) -> None:
    row["numpy"] = None if np_result is None else dict(np_result)
    if np_result is not None:
        row["speedup_vs_numpy"] = np_result["median_s"] / row["bnkernel"]["median_s"]


def _start_run(config: BenchConfig, progress: TextIO) -> tuple[list[int], ModuleType | None]:
    """The thread counts to run, and torch (None when left out or not importable); fails at once,
    before any timing, on bad thread counts or a --plot without matplotlib."""
    threads_list = list(config.threads) or [int(_core.get_num_threads())]
    if any(t < 1 for t in threads_list):
        raise BenchError("threads: expected counts >= 1")
    if config.plot_path is not None:
        _require_matplotlib()
    torch = _import_optional("torch") if config.torch else None
    if config.torch and torch is None:
        progress.write("torch is not importable: the torch columns are left empty\n")
    return threads_list, torch


def _measure_copy(
    config: BenchConfig, threads_list: Sequence[int], progress: TextIO
) -> dict[int, CopyBandwidth]:
    copy_bw: dict[int, CopyBandwidth] = {}
    nbytes_copy = max(8, int(config.copy_mib * (1 << 20)))
    for t in threads_list:
        progress.write(f"measuring copy bandwidth, {t} thread(s), {nbytes_copy >> 20} MiB\n")
        copy_bw[t] = copy_bandwidth(t, nbytes_copy)
    return copy_bw


def _write_outputs(
    config: BenchConfig,
    report: dict[str, Any],
    progress: TextIO,
    plot: Callable[[dict[str, Any], str], None],
) -> None:
    if config.json_path is not None:
        with open(config.json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        progress.write(f"wrote {config.json_path}\n")
    if config.plot_path is not None:
        plot(report, config.plot_path)
        progress.write(f"wrote {config.plot_path}\n")


def _fn_set_threads_default() -> None:
    _core.set_num_threads(0)  # bnkernel.set_num_threads(None): follow OpenMP's setting again


def _run_threads(
    case: Case,
    op: str,
    threads: int,
    config: BenchConfig,
    torch: ModuleType | None,
    bw: CopyBandwidth,
) -> dict[str, Any]:
    _core.set_num_threads(threads)
    p = prepare(case, op, "bnkernel")
    check = check_outputs(case, op, p.outputs())
    timing = time_call(p.call, config.repeat, config.min_time, max_time=config.max_time)
    t_op = timing.median
    row: dict[str, Any] = {
        "shape": case.shape_text,
        "stored_shape": "x".join(map(str, case.x.shape)),
        "layout": case.label,
        "axis": case.axis,
        "dtype": case.dtype.name,
        "op": op,
        "threads": threads,
        "bytes": case.nbytes,
        "traffic_bytes": traffic_bytes(op, case.nbytes),
        "bnkernel": {**timing.to_json(), "variant": p.variant, "check": check},
        "GBps": traffic_bytes(op, case.nbytes) / t_op / 1e9,
        "passes": t_op / (case.nbytes / (bw.gbps * 1e9)),
        "copy_GBps": bw.gbps,
        "torch": None,
        "speedup_vs_numpy": None,
        "speedup_vs_torch": None,
    }
    del p
    if torch is not None:
        torch.set_num_threads(threads)
        pt = prepare(case, op, "torch", torch)
        tcheck = check_outputs(case, op, pt.outputs(), peer=True, who="torch")
        ttiming = time_call(pt.call, config.repeat, config.min_time, max_time=config.max_time)
        row["torch"] = {**ttiming.to_json(), "variant": pt.variant, "check": tcheck}
        row["speedup_vs_torch"] = ttiming.median / t_op
    return row


def _median(row: dict[str, Any], impl: str) -> float | None:
    d = row.get(impl)
    return None if d is None else float(d["median_s"])


def _row_line(row: dict[str, Any]) -> str:
    return (
        f"{row['shape']} {row['layout']} {row['dtype']} {row['op']} threads={row['threads']}: "
        f"bnkernel {_fmt_time(_median(row, 'bnkernel'))}, "
        f"numpy {_fmt_time(_median(row, 'numpy'))}, torch {_fmt_time(_median(row, 'torch'))}, "
        f"{row['GBps']:.1f} GB/s, {row['passes']:.2f} passes"
    )


def _print_header(
    out: TextIO, report: dict[str, Any], copy_bw: dict[int, CopyBandwidth], torch: Any
) -> None:
    m = report["machine"]
    cfg = report["config"]
    bw = ", ".join(
        f"{t} thread{'s' if t > 1 else ''}: {b.gbps:.1f} GB/s" for t, b in copy_bw.items()
    )
    nbytes = next(iter(copy_bw.values())).nbytes
    out.write(
        f"bnkernel {m['bnkernel']} benchmark on {m['cpu']} ({m['logical_cpus']} logical CPUs), "
        f"threads {','.join(map(str, cfg['threads']))}\n"
    )
    out.write(f"copy bandwidth (np.copyto, {nbytes / (1 << 20):g} MiB, 2*bytes/t): {bw}\n")
    torch_text = "not used" if torch is None else str(torch.__version__)
    out.write(
        f"numpy {m['numpy']}, torch {torch_text}, OpenMP {'yes' if m['openmp'] else 'no'}, "
        f"native build {'yes' if m['native_build'] else 'no'}\n"
    )
    out.write(
        f"times: median per call (>= {cfg['repeat']} samples and >= {cfg['min_time']:g} s; "
        f"numpy textbook one thread, capped at ~{PEER_MAX_TIME_S:g} s); bnkernel and torch with "
        "preallocated outputs where available\n"
        "GB/s: minimal traffic (forward 2x, backward 3x bytes(x)) / time; "
        "passes: time / (bytes(x) / copy bandwidth)\n\n"
    )


_COLUMNS = [
    ("shape", "<"), ("layout", "<"), ("dtype", "<"), ("op", "<"), ("thr", ">"),
    ("bnkernel", ">"), ("numpy", ">"), ("torch", ">"), ("vs numpy", ">"), ("vs torch", ">"),
    ("GB/s", ">"), ("passes", ">"),
]  # fmt: skip


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as an aligned text table."""
    cells = [
        [
            r["shape"],
            r["layout"],
            r["dtype"],
            r["op"],
            str(r["threads"]),
            _fmt_time(_median(r, "bnkernel")),
            _fmt_time(_median(r, "numpy")),
            _fmt_time(_median(r, "torch")),
            _fmt_ratio(r["speedup_vs_numpy"]),
            _fmt_ratio(r["speedup_vs_torch"]),
            f"{r['GBps']:.1f}",
            f"{r['passes']:.2f}",
        ]
        for r in rows
    ]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, (h, _) in enumerate(_COLUMNS)]

    def line(values: Sequence[str]) -> str:
        parts = [f"{v:{a}{w}}" for v, (_, a), w in zip(values, _COLUMNS, widths, strict=True)]
        return "  ".join(parts).rstrip()

    header = line([h for h, _ in _COLUMNS])
    return "\n".join([header, "-" * len(header), *(line(c) for c in cells)]) + "\n"


def _print_table(out: TextIO, rows: Sequence[dict[str, Any]]) -> None:
    out.write(format_table(rows))
    out.flush()


def _caches_text(caches: Sequence[dict[str, Any]]) -> str:
    if not caches:
        return "unknown (no cache sizes in sysfs: none marked)"
    parts = []
    for c in caches:
        shared = c.get("shared_cpu_list")
        parts.append(
            f"{c['name']} {_fmt_bytes(c['bytes'])}" + (f" (CPUs {shared})" if shared else "")
        )
    return ", ".join(parts)


def _print_sweep_header(
    out: TextIO,
    report: dict[str, Any],
    copy_bw: dict[int, CopyBandwidth],
    torch: Any,
    config: BenchConfig,
) -> None:
    m = report["machine"]
    sw = report["sweep"]
    bw = ", ".join(
        f"{t} thread{'s' if t > 1 else ''}: {b.gbps:.1f} GB/s" for t, b in copy_bw.items()
    )
    nbytes = next(iter(copy_bw.values())).nbytes
    torch_text = "not used" if torch is None else str(torch.__version__)
    sizes = sw["sizes"]
    cap = "" if config.max_time is None else f", or >= 3 samples once {config.max_time:g} s spent"
    if sizes[-1] > sw["baseline_above_bytes"]:
        base = f"the median ns/B of the same column's sizes past {sw['baseline']}"
    else:
        base = f"the ns/B of the largest size (no size is past {sw['baseline']})"
    out.write(
        f"bnkernel {m['bnkernel']} size sweep on {m['cpu']} ({m['logical_cpus']} logical CPUs), "
        f"threads {','.join(map(str, report['config']['threads']))}\n"
        f"copy bandwidth (np.copyto, {nbytes / (1 << 20):g} MiB, 2*bytes/t): {bw}\n"
        f"numpy {m['numpy']}, torch {torch_text}, OpenMP {'yes' if m['openmp'] else 'no'}, "
        f"native build {'yes' if m['native_build'] else 'no'}\n"
        f"caches (cpu0): {_caches_text(report['caches'])}\n"
        f"shapes {sw['shape_rule']}; bytes(x) from {_fmt_bytes(sizes[0])} to "
        f"{_fmt_bytes(sizes[-1])}; a forward also writes y, a backward reads dy and writes dx, "
        "each as large as x\n"
        f"times: median per call (>= {config.repeat} samples and >= {config.min_time:g} s{cap}; "
        f"numpy textbook one thread, capped at ~{PEER_MAX_TIME_S:g} s)\n"
        "ns/B: time / bytes(x); GB/s: minimal traffic (forward 2x, backward 3x bytes(x)) / time; "
        "passes: time / (bytes(x) / copy bandwidth)\n"
        f"ratio: ns/B / {base}; a cache cliff shows as a step in it (the smallest sizes pay the "
        "fixed cost of a call)\n"
        "----- lines: where bytes(x) passes a cache size\n\n"
    )
    out.flush()


def _fmt_float(v: float | None, digits: int) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.{digits}f}"


def _fmt_nspb(v: float | None) -> str:
    """ns per byte to 3 significant digits (at least 3 decimals below 1)."""
    if v is None or not math.isfinite(v):
        return "-"
    if v < 1.0:
        return f"{v:.4f}" if v < 0.1 else f"{v:.3f}"
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def format_sweep_table(report: dict[str, Any]) -> str:
    """A sweep's results: one block per series (op, layout, dtype, threads), a row per size, with a
    line where the size of x passes each of the machine's cache sizes (``report["caches"]``).
    Needs the ratios of :func:`add_sweep_ratios`."""
    rows = report["results"]
    caches = report.get("caches", [])
    peers = [impl for impl in ("numpy", "torch") if any(r.get(impl) is not None for r in rows)]
    columns = [
        ("size", "<"), ("shape", "<"), ("bnkernel", ">"), ("ns/B", ">"), ("GB/s", ">"),
        ("passes", ">"), ("ratio", ">"),
    ]  # fmt: skip
    for impl in peers:
        columns += [(impl, ">"), ("ns/B", ">"), ("ratio", ">"), (f"vs {impl}", ">")]

    def cells_of(r: dict[str, Any]) -> list[str]:
        c = [
            _fmt_bytes(r["bytes"]),
            r["shape"],
            _fmt_time(_median(r, "bnkernel")),
            _fmt_nspb(r["bnkernel"].get("ns_per_byte")),
            f"{r['GBps']:.1f}",
            f"{r['passes']:.2f}",
            _fmt_float(r["bnkernel"].get("cost_ratio"), 2),
        ]
        for impl in peers:
            res = r.get(impl)
            c += [
                _fmt_time(_median(r, impl)),
                _fmt_nspb(None if res is None else res.get("ns_per_byte")),
                _fmt_float(None if res is None else res.get("cost_ratio"), 2),
                _fmt_ratio(r.get(f"speedup_vs_{impl}")),
            ]
        return c

    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_series_key(r), []).append(r)
    all_cells = {id(r): cells_of(r) for r in rows}
    widths = [
        max([len(h), *(len(c[i]) for c in all_cells.values())]) for i, (h, _) in enumerate(columns)
    ]

    def line(values: Sequence[str]) -> str:
        parts = [f"{v:{a}{w}}" for v, (_, a), w in zip(values, columns, widths, strict=True)]
        return "  ".join(parts).rstrip()

    header = line([h for h, _ in columns])
    blocks = []
    for (op, layout, dtype, threads), group in groups.items():
        group = sorted(group, key=lambda r: r["bytes"])
        lines = [
            f"{op}, {layout}, {dtype}, {threads} thread{'s' if threads > 1 else ''}",
            header,
            "-" * len(header),
        ]
        for i, r in enumerate(group):
            if i > 0:
                for c in caches:
                    if group[i - 1]["bytes"] <= c["bytes"] < r["bytes"]:
                        text = f"----- {c['name']} {_fmt_bytes(c['bytes'])} "
                        lines.append(text + "-" * max(0, len(header) - len(text)))
            lines.append(line(all_cells[id(r)]))
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


# ---- plot ---------------------------------------------------------------------------------------

_MATPLOTLIB_HINT = (
    "--plot needs matplotlib, which is not installed: pip install 'bnkernel[bench]' "
    "(or pip install matplotlib)"
)


def _require_matplotlib() -> ModuleType:
    try:
        return importlib.import_module("matplotlib.figure")
    except ImportError:
        raise BenchError(_MATPLOTLIB_HINT) from None


def plot_report(report: dict[str, Any], path: str) -> None:
    """Time vs size of x (log-log), one panel per op, for the largest thread count measured;
    dashed: 1 pass at the copy bandwidth, dotted: the op's minimal traffic (2 or 3 passes)."""
    figure_mod = _require_matplotlib()
    rows = report["results"]
    if not rows:
        raise BenchError("nothing to plot: no results")
    threads = max(r["threads"] for r in rows)
    rows = [r for r in rows if r["threads"] == threads]
    bw = next(c["GBps"] for c in report["copy_bandwidth"] if c["threads"] == threads) * 1e9
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    ncols = min(2, len(ops))
    nrows = math.ceil(len(ops) / ncols)
    fig = figure_mod.Figure(figsize=(6.4 * ncols, 4.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = {"bnkernel": "tab:blue", "numpy": "tab:orange", "torch": "tab:green"}
    markers = {"NC": "o", "channels-first": "s", "channels-last": "^"}
    for axp, op in zip(axes, ops, strict=False):
        op_rows = [r for r in rows if r["op"] == op]
        for impl in IMPLS:
            for fam, marker in markers.items():
                pts = sorted(
                    (r["bytes"], r[impl]["median_s"])
                    for r in op_rows
                    if r.get(impl) is not None and _layout_family(r) == fam
                )
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    axp.plot(xs, ys, marker=marker, color=colors[impl], label=f"{impl} {fam}")
        sizes = np.array(sorted({r["bytes"] for r in op_rows}), dtype=np.float64)
        passes = 2 if op.startswith("forward") else 3
        axp.plot(sizes, sizes / bw, "k--", lw=1, label="1 pass at copy bandwidth")
        axp.plot(sizes, passes * sizes / bw, "k:", lw=1, label=f"{passes} passes (minimal traffic)")
        axp.set_xscale("log")
        axp.set_yscale("log")
        axp.set_xlabel("bytes(x)")
        axp.set_ylabel("seconds per call (median)")
        axp.set_title(f"{op}, {threads} thread{'s' if threads > 1 else ''}")
        axp.grid(True, which="both", alpha=0.3)
        axp.legend(fontsize="x-small")
    for axp in axes[len(ops) :]:
        axp.set_visible(False)
    fig.suptitle(f"bnkernel {report['machine']['bnkernel']} on {report['machine']['cpu']}")
    fig.savefig(path, dpi=120)


def plot_sweep(report: dict[str, Any], path: str) -> None:
    """A sweep's cost per byte vs the size of x (log-log), one panel per op, a line per
    implementation, layout, dtype and thread count; vertical lines at the cache sizes, dotted
    horizontal lines at the op's minimal traffic at the copy bandwidth (per thread count)."""
    figure_mod = _require_matplotlib()
    rows = report["results"]
    if not rows:
        raise BenchError("nothing to plot: no results")
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    ncols = min(2, len(ops))
    nrows = math.ceil(len(ops) / ncols)
    fig = figure_mod.Figure(figsize=(7.2 * ncols, 5.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = {"bnkernel": "tab:blue", "numpy": "tab:orange", "torch": "tab:green"}
    thread_counts = sorted({int(r["threads"]) for r in rows})
    styles = ["-", "--", "-.", ":"]
    markers = {"channels-first": "o", "channels-last": "^"}
    dtypes = sorted({r["dtype"] for r in rows})
    bws = {int(c["threads"]): float(c["GBps"]) for c in report["copy_bandwidth"]}
    for axp, op in zip(axes, ops, strict=False):
        op_rows = [r for r in rows if r["op"] == op]
        for impl in IMPLS:
            for fam, marker in markers.items():
                for dt in dtypes:
                    for k, t in enumerate(thread_counts):
                        pts = sorted(
                            (r["bytes"], r[impl]["ns_per_byte"])
                            for r in op_rows
                            if r.get(impl) is not None
                            and _layout_family(r) == fam
                            and r["dtype"] == dt
                            and int(r["threads"]) == t
                        )
                        if not pts:
                            continue
                        xs, ys = zip(*pts, strict=True)
                        label = f"{impl} {fam}" + (f" {dt}" if len(dtypes) > 1 else "")
                        label += f" {t}T" if impl != "numpy" else ""
                        axp.plot(
                            xs, ys, marker=marker, ms=3, color=colors[impl],
                            ls=styles[k % len(styles)], label=label,
                        )  # fmt: skip
        passes = 2 if op.startswith("forward") else 3
        for k, t in enumerate(thread_counts):
            if t in bws:
                axp.axhline(
                    passes / bws[t], color="k", ls=styles[k % len(styles)], lw=0.8, alpha=0.6,
                    label=f"{passes} passes at copy bandwidth, {t}T",
                )  # fmt: skip
        sizes = sorted({int(r["bytes"]) for r in op_rows})
        for c in report.get("caches", []):
            if not sizes[0] <= c["bytes"] <= sizes[-1]:
                continue  # outside the sweep: would only stretch the axis
            axp.axvline(c["bytes"], color="tab:red", ls="--", lw=0.8, alpha=0.7)
            axp.annotate(
                f"{c['name']} {_fmt_bytes(c['bytes'])}", (c["bytes"], 1.0),
                xycoords=("data", "axes fraction"), xytext=(2, -2), textcoords="offset points",
                va="top", fontsize="x-small", color="tab:red", rotation=90,
            )  # fmt: skip
        axp.set_xscale("log", base=2)
        axp.set_yscale("log")
        ticks = sizes[:: max(1, math.ceil(len(sizes) / 10))]
        axp.set_xticks(ticks, labels=[_fmt_bytes(n) for n in ticks], rotation=45, ha="right")
        axp.set_xticks([], minor=True)
        axp.set_xlabel("bytes(x)")
        axp.set_ylabel("ns per byte of x (median time / bytes)")
        axp.set_title(op)
        axp.grid(True, which="both", alpha=0.3)
        axp.legend(fontsize="x-small", loc="lower left")  # the cache labels are at the top
    for axp in axes[len(ops) :]:
        axp.set_visible(False)
    fig.suptitle(
        f"bnkernel {report['machine']['bnkernel']} size sweep on {report['machine']['cpu']}"
    )
    fig.savefig(path, dpi=120)


def _layout_family(row: dict[str, Any]) -> str:
    if row["layout"] == "NC":
        return "NC"
    return "channels-last" if row["axis"] == -1 else "channels-first"


# ---- command line -------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    p.add_argument(
        "--threads", type=_argtype(parse_threads), default=None,
        help="comma-separated thread counts, e.g. 1,2 (default: bnkernel.get_num_threads())",
    )  # fmt: skip
    p.add_argument(
        "--shapes", type=_argtype(parse_shapes), default=None,
        help="comma-separated shapes, channels second, e.g. 32x256x56x56,64x3 (default: "
        + ",".join("x".join(map(str, s)) for s in DEFAULT_SHAPES) + ")",
    )  # fmt: skip
    p.add_argument(
        "--layouts", type=_argtype(lambda s: parse_choices(s, LAYOUTS, "layout")),
        default=None,
        help="NCHW (axis=1), NHWC (channels-last, axis=-1) for ndim >= 3; NC for 2-D shapes "
        "(default: all; with --sweep: NCHW)",
    )  # fmt: skip
    p.add_argument(
        "--dtypes", type=_argtype(lambda s: parse_choices(s, DTYPES, "dtype")),
        default=None, help="float32,float64 (default: both; with --sweep: float32)",
    )  # fmt: skip
    p.add_argument(
        "--ops", type=_argtype(lambda s: parse_choices(s, OPS, "op")), default=None,
        help=f"{','.join(OPS)} (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--repeat", type=int, default=None, help="at least this many timed samples (default 10)"
    )
    p.add_argument(
        "--min-time", type=float, default=0.1,
        help="and at least this many seconds of timed calls per measurement (default 0.1)",
    )  # fmt: skip
    p.add_argument(
        "--copy-mib", type=float, default=None,
        help="size of the copy-bandwidth array in MiB (default 256; 64 with --quick)",
    )  # fmt: skip
    p.add_argument("--no-torch", action="store_true", help="leave torch out")
    p.add_argument("--no-numpy", action="store_true", help="leave the NumPy textbook out")
    p.add_argument(
        "--numpy", action="store_true",
        help="time the NumPy textbook in a --sweep too (slow on the largest sizes; default off)",
    )  # fmt: skip
    p.add_argument(
        "--sweep", action="store_true",
        help="size sweep: (N, 64, H, W) inputs whose size doubles from 4K to --sweep-max; cost "
        "per byte and its ratio to the cost per byte past L2, cache sizes marked (default: "
        "float32, NCHW, all ops, no NumPy textbook)",
    )  # fmt: skip
    p.add_argument(
        "--sweep-max", metavar="SIZE", type=_argtype(parse_sweep_size), default=None,
        help="largest bytes(x) of the sweep, a power of two with an optional K/M/G suffix "
        "(powers of 1024), e.g. 256M (default 1G)",
    )  # fmt: skip
    p.add_argument(
        "--sweep-min", metavar="SIZE", type=_argtype(parse_sweep_size), default=None,
        help="smallest bytes(x) of the sweep, a power of two >= 4K (default 4K)",
    )  # fmt: skip
    p.add_argument(
        "--quick", action="store_true",
        help="smoke run: shapes " + ",".join("x".join(map(str, s)) for s in QUICK_SHAPES)
        + ", 3 samples",
    )  # fmt: skip
    p.add_argument("--json", metavar="FILE", default=None, help="write every number to FILE")
    p.add_argument(
        "--plot", metavar="FILE.png", default=None,
        help="plot time vs size (log-log; with --sweep: ns per byte vs size, cache sizes marked) "
        "to FILE.png (needs matplotlib)",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = bool(args.quick)
    sweep = bool(args.sweep)
    if sweep and args.shapes is not None:
        raise BenchError("--shapes does not apply to --sweep, which picks (N, 64, H, W) shapes")
    if not sweep:
        for given, name in ((args.sweep_max, "--sweep-max"), (args.sweep_min, "--sweep-min")):
            if given is not None:
                raise BenchError(f"{name} only applies with --sweep")
        if args.numpy:
            raise BenchError("--numpy only applies with --sweep (the table times NumPy already)")
    if args.numpy and args.no_numpy:
        raise BenchError("--numpy and --no-numpy contradict each other")
    sweep_min = args.sweep_min if args.sweep_min is not None else SWEEP_MIN_BYTES
    sweep_max = args.sweep_max if args.sweep_max is not None else SWEEP_MAX_BYTES
    if sweep_min > sweep_max:
        raise BenchError(
            f"--sweep-min {_fmt_bytes(sweep_min)} is larger than --sweep-max "
            f"{_fmt_bytes(sweep_max)}"
        )
    shapes = args.shapes if args.shapes is not None else (QUICK_SHAPES if quick else DEFAULT_SHAPES)
    if sweep:
        shapes = []
    layouts = args.layouts if args.layouts is not None else (["NCHW"] if sweep else list(LAYOUTS))
    dtypes = args.dtypes if args.dtypes is not None else (["float32"] if sweep else list(DTYPES))
    ops = args.ops if args.ops is not None else list(OPS)
    repeat = args.repeat if args.repeat is not None else (3 if quick else 10)
    if repeat < 1:
        raise BenchError("--repeat: expected an integer >= 1")
    if args.min_time < 0:
        raise BenchError("--min-time: expected a number of seconds >= 0")
    copy_mib = args.copy_mib if args.copy_mib is not None else (64.0 if quick else 256.0)
    if copy_mib <= 0:
        raise BenchError("--copy-mib: expected a size > 0")
    return BenchConfig(
        shapes=list(shapes),
        layouts=list(layouts),
        dtypes=list(dtypes),
        ops=list(ops),
        threads=list(args.threads) if args.threads is not None else [],
        repeat=repeat,
        min_time=float(args.min_time),
        numpy=bool(args.numpy) if sweep else not args.no_numpy,
        torch=not args.no_torch,
        copy_mib=float(copy_mib),
        json_path=args.json,
        plot_path=args.plot,
        max_time=SWEEP_MAX_TIME_S if sweep else None,
        sweep=sweep,
        sweep_min=sweep_min,
        sweep_max=sweep_max,
    )


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``bench`` for parsed arguments; 0 on success, 1 on a wrong result, 2 on a bad setup."""
    try:
        config = config_from_args(args)
        run_bench(config)
    except BenchCheckError as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    return 0
