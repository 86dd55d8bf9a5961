"""The benchmark's inputs: ops, layouts, dtypes and shapes, and the seeded data of one case.

Shapes are written channels-first (N, C, spatial...); the NHWC layout stores the same logical
tensor channels-last, as an array of shape (N, spatial..., C).  The size sweep's shapes are one
family, (N, 64, H, W), of power-of-two byte sizes (:func:`sweep_shape`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import phases as _fn
from .units import shape_text

OPS = ("forward_train", "forward_infer", "backward_train", "backward_frozen")
IMPLS = ("bnkernel", "numpy", "torch")
LAYOUTS = ("NCHW", "NHWC", "NC")
DTYPES = ("float32", "float64", "float16", "bfloat16")  # bfloat16: ml_dtypes' (optional)

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

# The size sweep (--sweep): logical shapes (N, SWEEP_CHANNELS, H, W) of 2**k bytes, H = W doubling
# up to SWEEP_MAX_SIDE, then N doubling; sizes from SWEEP_MIN_BYTES to --sweep-max.
SWEEP_CHANNELS = 64
SWEEP_MAX_SIDE = 64
SWEEP_MIN_BYTES = 4 << 10
SWEEP_MAX_BYTES = 1 << 30


class BenchError(RuntimeError):
    """A benchmark that cannot run as configured (bad option, missing optional dependency)."""


class BenchCheckError(AssertionError):
    """A benchmarked kernel gave a wrong result: its timing would be meaningless."""


def layout_name(ndim: int, channels_last: bool) -> str:
    """The layout's letters for an array of ``ndim`` dimensions: "NC", "NCHW", "NDHWC", ..."""
    if ndim == 2:
        return "NC"
    # past three spatial axes, their count: a 6-D array is NCS4 / NS4C
    spatial = {3: "L", 4: "HW", 5: "DHW"}.get(ndim, f"S{ndim - 2}")
    return f"N{spatial}C" if channels_last else f"NC{spatial}"


def layouts_for(shape: tuple[int, ...], selected: Iterable[str]) -> list[str]:
    """The layouts (option names) a shape is run in: 2-D shapes only as "NC"."""
    sel = list(selected)
    if len(shape) == 2:
        return ["NC"] if "NC" in sel else []
    return [lay for lay in ("NCHW", "NHWC") if lay in sel]


def traffic_bytes(op: str, nbytes: int) -> int:
    """Minimal memory traffic of ``op`` on an x of ``nbytes``: 2 passes forward, 3 backward."""
    return (2 if op.startswith("forward") else 3) * nbytes


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
        return shape_text(self.shape)

    def frozen_stats(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """The frozen statistics (from the running statistics), float64: (mean, invstd)."""
        mean = self.running_mean.astype(np.float64)
        invstd: NDArray[np.float64] = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        return mean, invstd


def data_dtype(name: Any) -> np.dtype[Any]:
    """The dtype a benchmark runs in: float32, float64, float16, or bfloat16 (ml_dtypes', which
    must be installed: BenchError otherwise)."""
    if str(name) == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as e:
            raise BenchError("bfloat16 needs ml_dtypes (pip install ml_dtypes)") from e
        bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bf16
    dt: np.dtype[Any] = np.dtype(name)
    if dt.name not in DTYPES:
        raise ValueError(f"dtype {dt}: expected one of {', '.join(DTYPES)}")
    return dt


def default_dtypes() -> list[str]:
    """The table's dtypes: float32, float64, float16, and bfloat16 when ml_dtypes is installed."""
    names = ["float32", "float64", "float16"]
    if importlib.util.find_spec("ml_dtypes") is not None:
        names.append("bfloat16")
    return names


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
    dt = data_dtype(dtype)
    channels_last = layout == "NHWC"
    stored = (shape[0], *shape[2:], shape[1]) if channels_last else shape
    ax = len(shape) - 1 if channels_last else 1
    C = shape[1]
    bshape = [1] * len(shape)
    bshape[ax] = C
    rng = np.random.default_rng([seed, *shape, int(channels_last), dt.itemsize])
    # drawn in x's dtype, or in float32 and rounded for the 16-bit ones (parameters: float32)
    gen = dt if dt.itemsize >= 4 else np.dtype(np.float32)
    pt = gen  # the 16-bit dtypes' parameters are float32
    x = rng.standard_normal(stored, dtype=gen)
    x *= rng.uniform(0.5, 2.0, C).astype(gen).reshape(bshape)
    x += rng.uniform(-3.0, 3.0, C).astype(gen).reshape(bshape)
    dy = rng.standard_normal(stored, dtype=gen)
    dy += rng.uniform(-1.0, 1.0, C).astype(gen).reshape(bshape)
    x, dy = x.astype(dt, copy=False), dy.astype(dt, copy=False)
    gamma = (rng.choice([-1.0, 1.0], C) * rng.uniform(0.5, 1.5, C)).astype(pt)
    beta = rng.standard_normal(C).astype(pt)
    running_mean = rng.uniform(-3.0, 3.0, C).astype(pt)
    running_var = rng.uniform(0.5, 4.0, C).astype(pt)
    count, mean, m2 = _fn.channel_stats(x, axis=ax)
    invstd = _fn.invstd_from_stats(count, m2, EPS)
    return Case(shape, layout, dt, x, dy, gamma, beta, running_mean, running_var, mean, invstd)


def reduce_axes(ndim: int, ax: int) -> tuple[int, ...]:
    """Every axis but the channel axis ``ax``: what the per-channel reductions sum over."""
    return tuple(i for i in range(ndim) if i != ax)


def per_channel(v: NDArray[Any], ndim: int, ax: int) -> NDArray[Any]:
    """A per-channel vector shaped to broadcast along axis ``ax`` of an ``ndim``-D array."""
    shape = [1] * ndim
    shape[ax] = -1
    return v.reshape(shape)


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
    itemsize = data_dtype(dtype).itemsize
    per_channel_values, rem = divmod(nbytes, SWEEP_CHANNELS * itemsize)
    if rem or per_channel_values < 2 or per_channel_values & (per_channel_values - 1):
        raise ValueError(
            f"{nbytes} bytes: expected a power of two holding at least 2 {data_dtype(dtype).name} "
            f"values in each of {SWEEP_CHANNELS} channels"
        )
    k = per_channel_values.bit_length() - 1  # N * H * W = 2**k
    a = min(k // 2, SWEEP_MAX_SIDE.bit_length() - 1)  # H = W = 2**a
    return (1 << (k - 2 * a), SWEEP_CHANNELS, 1 << a, 1 << a)
