"""Outputs large enough for the streaming-store path (>= 16 MiB), aligned and misaligned.

Outputs past the caches are written with non-temporal stores through an aligned L1 buffer, with
plain stores for the unaligned head and the tail of every run; these cases cover all three parts
on both memory patterns and every elementwise kernel.  The channels-last kernels compute a chunk
of rows into a buffer and stream the chunk out (stream_copy): by rows a vector of channels at a
time when the coefficients are few, by blocks of channels in registers when they are many; so the
chunk boundaries, aligned or not, are covered too.
"""

from __future__ import annotations

import numpy as np
import pytest

import bnkernel as bk
from bnkernel import reference as ref

# (label, shape, axis, dtype): each output is 17-18 MiB
CASES = [
    ("NCHW-f32-odd-inner", (8, 17, 181, 181), 1, np.float32),
    ("NHWC-f32-C17", (8, 181, 181, 17), -1, np.float32),
    ("NCHW-f64", (8, 17, 128, 128), 1, np.float64),
    ("NC-f64-C5", (445_000, 5), 1, np.float64),
    # rows a vector of channels at a time (C17 has a channel past the last vector), chunks of
    # rows streamed from a buffer
    ("NHWC-f32-C48", (7, 113, 113, 48), -1, np.float32),
    ("NHWC-f64-C40", (7, 87, 89, 40), -1, np.float64),
    # rows with the most coefficients they take (the normalize's 12 KiB a row, dx's 16 KiB), with
    # channels past the last vector of 8
    ("NHWC-f32-C500", (3, 13, 229, 500), -1, np.float32),
    # channel blocks in registers (24 KiB of coefficients a row), with channels left over past the
    # last block and a row count that is not a multiple of the tile
    ("NHWC-f32-C1000", (3, 7, 223, 1000), -1, np.float32),
]
TOL = {np.float32: 1e-6, np.float64: 1e-12}  # relative to max(1, |ref|), as everywhere


def misaligned_like(x: np.ndarray, shift: int) -> np.ndarray:
    """A C-contiguous array like x starting `shift` elements into a buffer (so not 64B-aligned)."""
    buf = np.empty(x.size + shift, dtype=x.dtype)
    return buf[shift:].reshape(x.shape)


def check(got, want, dtype):
    want = np.asarray(want, np.float64)
    scale = max(1.0, float(np.max(np.abs(want))))
    assert float(np.max(np.abs(got.astype(np.float64) - want))) / scale < TOL[dtype]


@pytest.mark.parametrize("shift", [0, 1, 3], ids=["aligned", "shift1", "shift3"])
@pytest.mark.parametrize("label,shape,axis,dtype", CASES, ids=[c[0] for c in CASES])
def test_streamed_outputs(label, shape, axis, dtype, shift):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    C = shape[axis]
    g = rng.uniform(0.5, 2, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    assert x.nbytes >= 16 << 20
    y = misaligned_like(x, shift)
    out, mean, invstd = bk.batch_norm_forward(x, g, b, axis=axis, out=y)
    assert out is y
    ry, rmean, rinvstd = ref.forward_train(x, g, b, 1e-5, axis)
    check(y, ry, dtype)
    dx = misaligned_like(x, shift)
    bk.batch_norm_backward(dy, x, mean, invstd, g, axis=axis, out=dx)
    check(dx, ref.backward_train(dy, x, rmean, rinvstd, g, axis)[0], dtype)
    bk.batch_norm_backward(dy, x, mean, invstd, g, training=False, axis=axis, out=dx)
    check(dx, ref.backward_frozen(dy, x, rmean, rinvstd, g, axis)[0], dtype)
    # the split phases write through the same stores, and must equal the fused results
    yn = bk.normalize(x, mean, invstd, g, b, axis=axis, out=misaligned_like(x, shift))
    np.testing.assert_array_equal(yn, y)
