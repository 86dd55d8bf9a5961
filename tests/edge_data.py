"""Data at the edges of floating point, shared by the forward and backward kernel tests:
ill-conditioned float32 data (a large offset, a tiny spread), whose results must still sit at the
float32 rounding floor, and one non-finite element, which must poison only its own channel."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import max_abs

# ---- ill-conditioned float32 --------------------------------------------------------------------

# Ill-conditioned float32 data (``ill_conditioned_float32``) on planar and interleaved layouts,
# serial and multi-threaded.
ILL_CONDITIONED = pytest.mark.parametrize(
    "shape,axis",
    [
        ((8, 4, 16, 16), 1),
        ((8, 16, 16, 4), -1),
        ((256, 3), 1),
        ((64, 3, 32, 32), 1),
        ((16, 32, 32, 8), -1),
    ],
    ids=["NCHW", "NHWC", "NC", "mt-NCHW", "mt-NHWC"],
)


def ill_conditioned_float32(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """x = 1e4 + 1e-2 * randn in float32: mean^2 / var ~ 1e12 per channel."""
    return (1e4 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)


def assert_float32_rounding_floor(actual: Any, expected: Any, atol: float, what: Any = "") -> None:
    """A float32 result at the rounding floor: within one ulp (plus ``atol``) of the float64
    ``expected`` elementwise, and within two ulps of the largest |expected|."""
    expected = np.asarray(expected, dtype=np.float64)
    ulp = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
    err = np.abs(np.asarray(actual, dtype=np.float64) - expected)
    assert np.all(err <= ulp + atol), f"{what}: max error {err.max()}, ulps {np.max(err / ulp)}"
    assert err.max() <= 2 * np.spacing(np.float32(max_abs(expected))), what


# ---- one non-finite element ---------------------------------------------------------------------

# Layouts for the non-finite tests (``with_bad_element``): planar and interleaved, serial and
# multi-threaded, C < 8 and C >= 8.
NONFINITE_SHAPES = [
    pytest.param((4, 3, 5), 1, id="NCL"),
    pytest.param((40, 3), 1, id="NC"),
    pytest.param((8, 6, 5, 4), -1, id="NHWC"),
    pytest.param((64, 3, 32, 32), 1, id="mt-NCHW-C3"),
    pytest.param((8, 16, 16, 32), 1, id="mt-NCHW-C16"),
    pytest.param((8, 16, 16, 32), -1, id="mt-NHWC-C32"),
]


def with_bad_element(a: np.ndarray, axis: int, bad: float) -> np.ndarray:
    """A copy of ``a`` whose middle element of channel 1 (along ``axis``) is ``bad``."""
    a = a.copy()
    idx = [s // 2 for s in a.shape]
    idx[axis] = 1
    a[tuple(idx)] = bad
    return a
