"""The certified float path for 16-bit outputs gives the double path's bits, always.

The AVX2 and AVX-512 kernels compute a 16-bit output in float32 with an error bound, and keep it
only when both ends of the bound round to the same 16-bit value; otherwise that vector is
recomputed in double (csrc/bnkernel/simd/certified.hpp).  The claim is that no output changes:
here every 16-bit elementwise kernel runs on inputs built to stress the test (exact ties, values a
hair off a tie, cancellation, coefficients past the float range and below it, subnormal and
overflowing outputs, NaN and inf), with the certified path and without it
(``BNKERNEL_TEST_DOUBLE_16BIT=1``, read at load, so each side runs in its own interpreter), on
every instruction-set copy that has the path, at one and two threads; the outputs must agree bit
for bit.  The ties make sure the double path is really taken for some vectors: the float value of
a tie is within its bound of it, so the test fails there and the fallback decides.  (With the
bounds made 32 times too small, 70 of the outputs here differ: the check can fail.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ml_dtypes")

ORDER = ["baseline", "avx2", "avx512"]

SCRIPT = r"""
import sys
import numpy as np
import ml_dtypes
import bnkernel as bk

rng = np.random.default_rng(11)
out = {}

def put(key, a):
    out[key] = np.ascontiguousarray(a).view(np.uint16)

# (shape, axis): planar runs (NCHW, long and short), channels-last and (N, C) with register
# blocks and channels left over (C = 70: two blocks of 32 on AVX-512 and 6 over), few channels
LAYOUTS = [((4, 6, 9, 31), 1), ((3, 5, 2, 3), 1), ((5, 3, 7, 70), -1), ((64, 70), 1),
           ((40, 11), 1), ((2, 3, 400), 1)]

def inputs(kind, shape, dtype, rng):
    n = int(np.prod(shape))
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "ties":
        # odd 11-bit significands times powers of two: x * 1.5 (gamma 3, invstd 0.5) needs 12 or
        # 13 bits, so many outputs lie exactly halfway between two float16 values
        x = (rng.integers(1025, 2048, n) | 1) * np.exp2(rng.integers(-20, 2, n))
        x *= np.where(rng.random(n) < 0.5, -1, 1)
    elif kind == "offset":
        x = 1000 + rng.standard_normal(n)  # |mean| >> std: cancellation in x - mean
    elif kind == "wide":
        x = rng.standard_normal(n) * np.exp2(rng.integers(-30, 16, n))  # subnormal to overflow
    else:  # specials
        x = rng.standard_normal(n)
        x[rng.random(n) < 0.05] = np.nan
        x[rng.random(n) < 0.05] = np.inf
        x[rng.random(n) < 0.05] = -np.inf
        x[rng.random(n) < 0.05] = 0.0
    with np.errstate(over="ignore"):
        return x.reshape(shape).astype(dtype)

def coefficients(kind, C, rng):
    mean = rng.standard_normal(C)
    invstd = rng.uniform(0.5, 2, C)
    gamma = rng.uniform(-2, 2, C).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    if kind == "ties":
        mean[:] = 0
        invstd[:] = 0.5
        gamma[:] = 3
        beta[:] = 0
    elif kind == "offset":
        mean[:] = 1000
    elif kind == "wide":
        # past float's range and below it in some channels (those take the double path), tiny
        # and huge but certifiable in others
        invstd[0::5] = 1e35
        invstd[1::5] = 1e-35
        invstd[2::5] = 1e25
        invstd[3::5] = 1e-25
    return mean, invstd, gamma, beta

for threads in (1, 2):
    bk.set_num_threads(threads)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        name = np.dtype(dtype).name
        for li, (shape, axis) in enumerate(LAYOUTS):
            C = shape[axis]
            for kind in ("normal", "ties", "offset", "wide", "specials"):
                key = f"t{threads}-{name}-l{li}-{kind}"
                x = inputs(kind, shape, dtype, rng)
                put(key + "-x", x)
                dy = inputs("ties" if kind == "ties" else "normal", shape, dtype, rng)
                res = inputs("normal", shape, dtype, rng)
                mean, invstd, gamma, beta = coefficients(kind, C, rng)
                with np.errstate(all="ignore"):
                    # the whole-array passes (split phases) with the coefficients as made above
                    put(key + "-norm", bk.normalize(x, mean, invstd, gamma, beta, axis=axis))
                    put(key + "-norm-res-relu", bk.normalize(
                        x, mean, invstd, gamma, beta, axis=axis, activation="relu", residual=res))
                    y = bk.normalize(x, mean, invstd, gamma, beta, axis=axis, activation="relu")
                    sdy = rng.standard_normal(C) * (1e30 if kind == "wide" else 30)
                    sdyx = rng.standard_normal(C) * 30
                    m = int(np.prod(shape)) // C
                    put(key + "-dx", bk.backward_elementwise(
                        dy, x, mean, invstd, gamma, sdy, sdyx, m, axis=axis))
                    put(key + "-dx-relu", bk.backward_elementwise(
                        dy, x, mean, invstd, gamma, sdy, sdyx, m, axis=axis, y=y))
                    # the fused kernels (statistics or sums, then the pass), where they apply
                    yt, bmean, binvstd = bk.batch_norm_forward(x, gamma, beta, axis=axis)
                    put(key + "-fwd", yt)
                    put(key + "-fwd-res-relu", bk.batch_norm_forward(
                        x, gamma, beta, axis=axis, activation="relu", residual=res)[0])
                    put(key + "-bwd", bk.batch_norm_backward(
                        dy, x, bmean, binvstd, gamma, axis=axis)[0])
                    put(key + "-frozen", bk.batch_norm_backward(
                        dy, x, mean, invstd, gamma, axis=axis, training=False)[0])
                    put(key + "-frozen-relu", bk.batch_norm_backward(
                        dy, x, mean, invstd, gamma, axis=axis, training=False,
                        activation="relu", y=y)[0])
                    rm = np.zeros(C, np.float32)
                    rv = (1 / invstd**2).astype(np.float32)
                    put(key + "-infer", bk.batch_norm_forward(
                        x, gamma, beta, running_mean=rm, running_var=rv, training=False,
                        axis=axis)[0])
np.savez(sys.argv[1], **out)
"""


def _isa_of(env: dict[str, str]) -> str:
    code = "import bnkernel; print(bnkernel._core.isa)"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()


def _base_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("BNKERNEL_ISA", "BNKERNEL_TEST_DOUBLE_16BIT")
    }


BEST = _isa_of(_base_env())
CERTIFIED_ISAS = [isa for isa in ("avx2", "avx512") if isa in ORDER[: ORDER.index(BEST) + 1]]


def _outputs(tmp_path: Path, isa: str, double: bool) -> dict[str, np.ndarray]:
    env = _base_env()
    env["BNKERNEL_ISA"] = isa
    if double:
        env["BNKERNEL_TEST_DOUBLE_16BIT"] = "1"
    assert _isa_of(env) == isa
    path = tmp_path / f"{isa}-{'double' if double else 'certified'}.npz"
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], check=True, env=env)
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.skipif(not CERTIFIED_ISAS, reason="no AVX2 on this CPU: only the double path exists")
@pytest.mark.parametrize("isa", CERTIFIED_ISAS)
def test_certified_path_gives_the_double_paths_bits(tmp_path, isa):
    certified = _outputs(tmp_path, isa, double=False)
    double = _outputs(tmp_path, isa, double=True)
    assert certified.keys() == double.keys() and len(certified) > 1000
    differ = [k for k in certified if not np.array_equal(certified[k], double[k])]
    assert not differ, f"{len(differ)} outputs differ, e.g. {differ[:5]}"
    # the ties are there and rounded right: y = (x - 0) * 0.5 * 3 + 0 = 1.5 x exactly in double,
    # NumPy's float64 -> float16 rounds once, to nearest even
    for layout in range(6):
        key = f"t1-float16-l{layout}-ties"
        x = certified[key + "-x"].view(np.float16).astype(np.float64)
        exact = 1.5 * x
        want = exact.astype(np.float16)
        np.testing.assert_array_equal(certified[key + "-norm"], want.view(np.uint16))
        toward = np.where(exact > want, np.float16(np.inf), np.float16(-np.inf)).astype(np.float16)
        other = np.nextafter(want, toward).astype(np.float64)  # the other float16 neighbour
        tie = (exact != want) & (np.abs(exact - want) == np.abs(exact - other))
        assert tie.mean() > 0.25, f"{key}: only {tie.sum()} ties of {tie.size}"
    nan = (certified["t1-float16-l0-specials-norm"] & 0x7FFF) > 0x7C00
    assert nan.any()
