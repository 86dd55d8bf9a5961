"""Shared shapes, data and comparison helpers for the kernel tests.

Every kernel test runs over the same table of layouts (``LAYOUTS``) and both dtypes, so that each
op is checked on every memory pattern the kernels have: planar (inner > 1) and interleaved
(inner == 1), serial and multi-threaded (>= 2**15 elements), few channels (C < 8: the threads
share each channel's reduction tree) and many (C >= 8: one channel per thread).

Data are seeded and per channel distinct (each channel has its own offset and scale), so a kernel
that mixes channels up cannot pass.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import bnkernel as bk
from bnkernel import reference as ref

SEED = 20_240_607

# ---- tolerances ---------------------------------------------------------------------------------
#
# float32: the kernels compute every output in double from the float32 inputs and round once to
#   float32 at the store, so an output is within half an ulp (2**-24 ~ 6e-8 relative) of the float64
#   reference evaluated on the same float32 inputs (which differs from the kernel's own double
#   computation by ~1e-15).  rtol = 1e-6 (~8 ulps) is a margin of >10x over that floor, yet an
#   implementation accumulating in float32 (errors ~sqrt(m) ulps and worse) or with a wrong formula
#   fails it.  atol = 1e-6 * (the magnitude of the quantity) covers elements near zero, whose
#   absolute error is set by the size of the terms that cancel, not by their own size.
# float64: the kernels and the reference sum in different orders; for the sizes here (m <= 2**17
#   values per channel, pairwise/blocked sums) that costs ~log2(m) * 2**-53 ~ 2e-15 of the summed
#   magnitude.  1e-12 is a margin of ~500x over that, and far below any algorithmic error.
TOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
# The saved statistics (mean, invstd, M2, the backward sums) are float64 whatever x's dtype is, and
# are computed in double from values that are exact in double, so they match the float64 reference
# to float64 accuracy even for float32 inputs.
STATS_TOL = 1e-12

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]


def gpu_reason() -> str | None:
    """Why the tests on a real GPU cannot run here (no CUDA module, no usable GPU, no CuPy), or
    None when they can (tests/test_cuda.py, tests/test_device.py)."""
    try:
        import bnkernel._cuda as cuda
    except ImportError:
        return "built without BNKERNEL_CUDA=ON"
    info = cuda.info()
    if info["error"] is not None:
        return f"no usable GPU: {info['error']}"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "needs CuPy (pip install 'bnkernel[cuda]')"
    return None


def tol(dtype: Any) -> float:
    return TOL[np.dtype(dtype)]


# ---- layouts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    name: str
    shape: tuple[int, ...]
    axis: int

    @property
    def ax(self) -> int:
        return self.axis % len(self.shape)

    @property
    def channels(self) -> int:
        return self.shape[self.axis]

    @property
    def count(self) -> int:
        """Values per channel."""
        return math.prod(self.shape) // self.channels

    @property
    def batch_axis(self) -> int:
        """The first non-channel axis (the one a data-parallel job splits)."""
        return 0 if self.ax != 0 else 1


PARALLEL_MIN = 2**15  # the kernels' threshold for going multi-threaded

LAYOUTS = [
    Layout("NC", (32, 5), 1),
    Layout("NC-axis-1", (32, 5), -1),
    Layout("NCL", (6, 5, 7), 1),
    Layout("NCHW", (4, 5, 6, 3), 1),
    Layout("NCHW-axis-3", (4, 5, 6, 3), -3),
    Layout("NCDHW", (2, 3, 4, 3, 5), 1),
    Layout("NLC", (6, 7, 5), -1),
    Layout("NHWC", (4, 6, 3, 5), -1),
    Layout("axis2-of-4d", (3, 4, 5, 6), 2),
    Layout("CN-axis0", (5, 40), 0),
    Layout("NC-C1", (16, 1), 1),
    Layout("NCHW-C1", (8, 1, 4, 4), 1),
    Layout("NCHW-C17", (4, 17, 3, 5), 1),
    Layout("NHWC-C17", (4, 3, 5, 17), -1),
    # interleaved with whole blocks of channels held in registers (a block is 8, 16 or 32
    # channels by instruction set) plus channels left over, and a row count that is not a
    # multiple of the 8-row tile
    Layout("NLC-C45", (3, 7, 45), -1),
    Layout("NC-C100", (7, 100), 1),
    Layout("NCHW-HW1", (8, 6, 1, 1), 1),
    Layout("NCHW-N2", (2, 5, 3, 3), 1),
    Layout("NC-N2", (2, 9), 1),
    Layout("NC-4096x3", (4096, 3), 1),
    # >= 2**15 elements: the multi-threaded paths
    Layout("mt-NC-16384x3", (16384, 3), 1),  # interleaved, C < 8
    Layout("mt-NC-C1", (40000, 1), 1),  # interleaved, one channel
    Layout("mt-NCHW-64x3x32x32", (64, 3, 32, 32), 1),  # planar, C < 8: shared subtrees
    Layout("mt-NCL-C2-long", (2, 2, 16384), 1),  # planar, few rows: rows split among threads
    Layout("mt-NCHW-C16", (8, 16, 16, 32), 1),  # planar, C >= 8: a channel per thread
    Layout("mt-NHWC-C32", (8, 16, 16, 32), -1),  # interleaved, C >= 8
    Layout("mt-NHWC-C70", (5, 13, 11, 70), -1),  # interleaved blocks, leftovers, 715 rows
    Layout("mt-axis2-C9", (4, 8, 9, 128), 2),  # planar, middle axis
]
SMALL_LAYOUTS = [lay for lay in LAYOUTS if math.prod(lay.shape) < PARALLEL_MIN]


def layout_params(layouts: list[Layout] = LAYOUTS) -> list[Any]:
    return [pytest.param(lay, id=lay.name) for lay in layouts]


def bshape(ndim: int, axis: int) -> list[int]:
    """Shape that broadcasts a length-C vector along channel ``axis``."""
    s = [1] * ndim
    s[axis] = -1
    return s


# ---- data ---------------------------------------------------------------------------------------


@dataclass
class Case:
    layout: Layout
    dtype: np.dtype[Any]
    x: np.ndarray
    dy: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray

    @property
    def axis(self) -> int:
        return self.layout.axis

    @property
    def C(self) -> int:
        return self.layout.channels

    @property
    def m(self) -> int:
        return self.layout.count

    @property
    def tol(self) -> float:
        return TOL[self.dtype]


def seed_for(*parts: Any) -> int:
    return SEED + zlib.crc32(repr(parts).encode())


def make_case(layout: Layout, dtype: Any, seed: int | None = None) -> Case:
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed_for(layout.name, dt.name) if seed is None else seed)
    C, shape, ax = layout.channels, layout.shape, layout.ax
    b = bshape(len(shape), ax)
    offset = rng.uniform(-3.0, 3.0, C).reshape(b)
    spread = rng.uniform(0.5, 2.0, C).reshape(b)
    x = (rng.standard_normal(shape) * spread + offset).astype(dt)
    dy = (rng.standard_normal(shape) + rng.uniform(-1.0, 1.0, C).reshape(b)).astype(dt)
    sign = rng.choice([-1.0, 1.0], C)
    return Case(
        layout=layout,
        dtype=dt,
        x=x,
        dy=dy,
        gamma=(sign * rng.uniform(0.5, 1.5, C)).astype(dt),
        beta=rng.standard_normal(C).astype(dt),
        running_mean=rng.standard_normal(C).astype(dt),
        running_var=rng.uniform(0.5, 2.0, C).astype(dt),
    )


def random_arrays(
    shape: tuple[int, ...],
    axis: int,
    dtype: Any,
    seed: int = 0,
    *,
    residual: bool = False,
    gamma: tuple[float, float] = (0.5, 1.5),
    running_mean_scale: float = 1.0,
    running_var: tuple[float, float] = (0.5, 2.0),
) -> dict[str, np.ndarray]:
    """Seeded arrays for one call, drawn in this order: "x" ~ 2 * randn + 1, "dy" ~ randn, "res"
    ~ randn (only with ``residual``), then per channel "g" uniform on ``gamma``, "b" ~ randn,
    "rm" ~ running_mean_scale * randn, "rv" uniform on ``running_var``."""
    rng = np.random.default_rng(seed)
    C = shape[axis]
    d = {
        "x": (rng.standard_normal(shape) * 2 + 1).astype(dtype),
        "dy": rng.standard_normal(shape).astype(dtype),
    }
    if residual:
        d["res"] = rng.standard_normal(shape).astype(dtype)
    d["g"] = rng.uniform(*gamma, C).astype(dtype)
    d["b"] = rng.standard_normal(C).astype(dtype)
    d["rm"] = (rng.standard_normal(C) * running_mean_scale).astype(dtype)
    d["rv"] = rng.uniform(*running_var, C).astype(dtype)
    return d


def forward_inference(case: Case, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """batch_norm_forward in inference on the case's x, gamma, beta and running statistics."""
    return bk.batch_norm_forward(
        case.x,
        case.gamma,
        case.beta,
        running_mean=case.running_mean,
        running_var=case.running_var,
        training=False,
        eps=eps,
        axis=case.axis,
    )


@pytest.fixture(params=DTYPES, ids=DTYPE_IDS)
def dtype(request: pytest.FixtureRequest) -> np.dtype[Any]:
    return np.dtype(request.param)


@pytest.fixture(params=layout_params())
def layout(request: pytest.FixtureRequest) -> Layout:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def case(layout: Layout, dtype: np.dtype[Any]) -> Case:
    """Seeded data for one layout and dtype (every layout in LAYOUTS x both dtypes)."""
    return make_case(layout, dtype)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


@pytest.fixture
def restore_threads():  # type: ignore[no-untyped-def]
    """Run a test that changes the kernels' thread count, and go back to the default after."""
    try:
        yield
    finally:
        bk.set_num_threads(None)


# ---- guarded empty arrays ----------------------------------------------------------------------

SENTINEL = 12345.0


def guarded_empty(shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """A zero-size C-contiguous array at the start of a sentinel-filled buffer, and the buffer.

    A kernel that wrongly touches elements of an empty array then reads / writes our own buffer
    (checked with ``guard_intact``) instead of corrupting the heap."""
    room = math.prod(max(n, 1) for n in shape) + 64
    buf = np.full(room, SENTINEL, dtype=dtype)
    view = buf[:0].reshape(shape)
    assert view.flags.c_contiguous and view.size == 0
    return view, buf


def guard_intact(buf: np.ndarray) -> bool:
    return bool(np.all(buf == SENTINEL))


# ---- comparisons --------------------------------------------------------------------------------


def max_abs(a: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64)), initial=0.0))


def channel_abs_sum(a: Any, axis: int) -> np.ndarray:
    """Per-channel sum of |a|: the magnitude a per-channel sum's rounding error is relative to."""
    a = np.abs(np.asarray(a, dtype=np.float64))
    return a.sum(axis=tuple(i for i in range(a.ndim) if i != axis % a.ndim))


def xhat_of(x: Any, mean: Any, invstd: Any, axis: int) -> np.ndarray:
    """(x - mean) * invstd in float64, per channel along ``axis``."""
    x = np.asarray(x, dtype=np.float64)
    b = bshape(x.ndim, axis % x.ndim)
    return (x - np.reshape(mean, b)) * np.reshape(invstd, b)


def assert_close(
    actual: Any, expected: Any, rel: float, scale: float | None = None, what: str = ""
):
    """|actual - expected| <= rel * |expected| + rel * scale, elementwise.

    ``scale`` is the magnitude the quantity's absolute error is relative to (default: the largest
    |expected|).
    """
    expected = np.asarray(expected, dtype=np.float64)
    actual64 = np.asarray(actual, dtype=np.float64)
    assert actual64.shape == expected.shape, f"{what}: shape {actual64.shape} != {expected.shape}"
    if scale is None:
        scale = max_abs(expected)
    np.testing.assert_allclose(actual64, expected, rtol=rel, atol=rel * scale, err_msg=what)


def assert_fd_grads(
    loss: Callable[..., float], args: Sequence[Any], grads: Sequence[Any], rtol: float, atol: float
) -> list[np.ndarray]:
    """Each of ``grads`` is the gradient of ``loss(*args)`` with respect to the matching argument:
    against its central differences (ref.numerical_gradient), to ``rtol`` and ``atol``.  Returns
    the numerical gradients."""
    numerical = []
    for i, (got, at) in enumerate(zip(grads, args, strict=True)):
        num = ref.numerical_gradient(lambda v, i=i: loss(*args[:i], v, *args[i + 1 :]), at)
        np.testing.assert_allclose(got, num, rtol=rtol, atol=atol, err_msg=f"argument {i}")
        numerical.append(num)
    return numerical


# ---- running statistics -------------------------------------------------------------------------


def assert_update_matches_fused(
    case: Case,
    stats: tuple[Any, Any, Any],
    momentum: float,
    unbiased: bool,
    what: tuple[str, str] = ("running_mean", "running_var"),
) -> None:
    """update_running_stats from ``stats`` (count, mean, M2 of case.x) updates a copy of the case's
    running statistics as the fused forward on case.x updates another (same float64 formula),
    within case.tol."""
    rm1, rv1 = case.running_mean.copy(), case.running_var.copy()
    rm2, rv2 = case.running_mean.copy(), case.running_var.copy()
    bk.batch_norm_forward(
        case.x,
        running_mean=rm1,
        running_var=rv1,
        momentum=momentum,
        running_var_unbiased=unbiased,
        axis=case.axis,
    )
    bk.update_running_stats(rm2, rv2, *stats, momentum=momentum, unbiased=unbiased)
    assert_close(rm2, rm1, case.tol, what=what[0])
    assert_close(rv2, rv1, case.tol, what=what[1])
