"""float16 and bfloat16 data: float32 parameters and running statistics, float64 statistics, every
output rounded once to the 16-bit dtype.

The bound, stated per dtype: an output is the exact result on the given (16-bit) inputs rounded to
nearest, so it is within half an ulp of the float64 reference: a relative error of at most 2**-11
for float16 and 2**-8 for bfloat16 (an absolute 2**-25 in float16's subnormal range).  The kernel's
own double arithmetic differs from the reference by ~1e-16 of the terms' magnitude, which can tip
a value lying that close to a midpoint the other way; ``atol`` (1e-12 of the magnitude) is that
allowance, four orders above it and still far below an ulp.  The rounding itself is checked
exactly, against an independent nearest-value search, on every midpoint of both formats.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from conftest import (
    STATS_TOL,
    TOL,
    Layout,
    assert_close,
    layout_params,
    make_case,
    max_abs,
)

import bnkernel as bk
from bnkernel import reference as ref

ml_dtypes = pytest.importorskip("ml_dtypes")

F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
HALF = [pytest.param(F16, id="f16"), pytest.param(BF16, id="bf16")]
# significand bits (with the implicit one) and the smallest normal exponent
PRECISION = {F16: (11, -14), BF16: (8, -126)}
# the allowance for the kernel's double arithmetic, relative to the magnitude of the terms
DOUBLE_SIDE = 1e-12


def ulp(v: Any, dtype: np.dtype[Any]) -> np.ndarray:
    """The spacing of `dtype`'s values at |v| (its subnormal spacing below the normal range)."""
    p, emin = PRECISION[dtype]
    a = np.abs(np.asarray(v, dtype=np.float64))
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    e = np.maximum(np.where(a > 0, e, emin), emin)
    return np.exp2(e - (p - 1))


def assert_rounded(actual: Any, expected: Any, dtype: np.dtype[Any], scale: float, what: str = ""):
    """actual (of `dtype`) is the float64 `expected` rounded to nearest: within half an ulp, plus
    DOUBLE_SIDE * scale (see the module docstring)."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}"
    a = actual.astype(np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape
    assert np.array_equal(np.isnan(a), np.isnan(e)), f"{what}: NaN in different places"
    ok = ~np.isnan(e)
    bound = 0.5 * ulp(np.maximum(np.abs(a), np.abs(e)), dtype) + DOUBLE_SIDE * scale
    err = np.abs(a - e)
    worst = float(np.max((err / bound)[ok], initial=0.0))
    assert worst <= 1.0, f"{what}: error {worst:.3f} x the half-ulp bound"


def half_case(layout: Layout, dtype: np.dtype[Any]):
    """make_case's data as 16-bit x / dy / residual, float32 parameters and running statistics."""
    c = make_case(layout, np.float64)
    rng = np.random.default_rng(len(layout.name))
    return {
        "x": c.x.astype(dtype),
        "dy": c.dy.astype(dtype),
        "res": rng.standard_normal(layout.shape).astype(dtype),
        "gamma": c.gamma.astype(F32),
        "beta": c.beta.astype(F32),
        "rm": c.running_mean.astype(F32),
        "rv": c.running_var.astype(F32),
    }


def every_layout_and_half_dtype(test: Any) -> Any:
    """Parametrizes a test over every layout in conftest.LAYOUTS and both 16-bit dtypes."""
    test = pytest.mark.parametrize("dtype", HALF)(test)
    return pytest.mark.parametrize("layout", layout_params())(test)


# ---- the rounding itself ------------------------------------------------------------------------


def _nonnegative_values(dtype: np.dtype[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Every finite non-negative value of `dtype` in increasing order, as float64, and its bits;
    then the first power of two past the largest, standing for inf (its bits are inf's: a value
    that rounds to it overflows, and a tie with the largest finite value goes to it, the even one).
    """
    if dtype == F16:
        bits = np.arange(0x7C01, dtype=np.uint16)
        values = bits.view(np.float16).astype(np.float64)
        values[-1] = 65536.0
    else:
        bits = np.arange(0x7F81, dtype=np.uint16)
        values = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        values[-1] = 2.0**128
    return values, bits


def nearest(v: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """v rounded to `dtype` by searching its values: the nearer neighbour, the one with even bits
    on a tie (differences of neighbours are exact in float64).  Independent of the kernels."""
    values, bits = _nonnegative_values(dtype)
    a = np.abs(v)
    hi = np.clip(np.searchsorted(values, a), 1, len(values) - 1)
    lo = hi - 1
    dlo = a - values[lo]
    dhi = values[hi] - a
    take_hi = (dhi < dlo) | ((dhi == dlo) & (bits[hi] % 2 == 0))
    out_bits = np.where(take_hi, bits[hi], bits[lo]).astype(np.uint16)
    out_bits[a > values[-1]] = bits[-1]  # past the stand-in for inf
    out_bits |= np.where(np.signbit(v), np.uint16(0x8000), np.uint16(0))
    out = out_bits.view(np.float16 if dtype == F16 else BF16)
    out[np.isnan(v)] = np.nan
    return out


def rounding_inputs(dtype: np.dtype[Any]) -> np.ndarray:
    """Every midpoint between neighbouring values, and each nudged by 2**-40 either way (where
    rounding twice, through float32, goes wrong), random values over the whole range, specials."""
    values, _ = _nonnegative_values(dtype)
    mid = (values[:-1] + values[1:]) / 2
    rng = np.random.default_rng(7)
    random = np.exp2(
        rng.uniform(-150 if dtype == BF16 else -30, 130 if dtype == BF16 else 18, 20000)
    )
    specials = [0.0, np.inf, np.nan, values[-2], 1e300, 1e-300, 2.0**-24, 2.0**-25, 2.0**-133]
    v = np.concatenate([mid, mid * (1 + 2.0**-40), mid * (1 - 2.0**-40), random, specials])
    sign = np.where(np.arange(v.size) % 2 == 0, 1.0, -1.0)
    return v * sign


def test_nearest_agrees_with_numpy_float16():
    """The search reference against NumPy's own float64 -> float16 (one rounding): agreeing on
    every input, the reference is trusted for bfloat16, where ml_dtypes rounds through float32."""
    v = rounding_inputs(F16)
    with np.errstate(over="ignore"):
        want = v.astype(np.float16)
    np.testing.assert_array_equal(nearest(v, F16).view(np.uint16), want.view(np.uint16))


def _kernel_round(v: np.ndarray, dtype: np.dtype[Any], inner: int) -> np.ndarray:
    """v rounded by the kernels' stores: normalize of ones with mean 0 and invstd v computes
    (1 - 0) * v + 0 = v exactly in double, then rounds it once (one channel per value)."""
    out = []
    chunk = 2000
    for i in range(0, v.size, chunk):
        part = v[i : i + chunk]
        C = part.size
        shape = (2, C) if inner == 0 else (1, C, inner)
        x = np.ones(shape, dtype=dtype)
        y = bk.normalize(x, np.zeros(C), part, axis=1)
        bits = y.view(np.uint16).reshape(shape[0], C, -1)
        assert np.all(bits == bits[:1, :, :1])  # every value of a channel is the same
        out.append(y.reshape(shape[0], C, -1)[0, :, 0])
    return np.concatenate(out)


# inner = 0: (2, C), the channels-last register blocks and the channels left over; 3: short planar
# runs (the per-value conversion); 128: long planar runs (blocks through the vector stores)
@pytest.mark.parametrize("inner", [0, 3, 128])
@pytest.mark.parametrize("dtype", HALF)
def test_every_store_rounds_to_nearest_even(dtype, inner):
    v = rounding_inputs(dtype)
    v = v[v != 0]  # (1 - 0) * -0 + 0 is +0: the sign of a zero does not survive the arithmetic
    got = _kernel_round(v, dtype, inner)
    want = nearest(v, dtype)
    bad = got.view(np.uint16) != want.view(np.uint16)
    bad &= ~(np.isnan(got.astype(np.float64)) & np.isnan(v))  # any NaN is a NaN
    assert not bad.any(), (
        f"{bad.sum()} wrong, e.g. {v[bad][:4]} -> {got[bad][:4]} not {want[bad][:4]}"
    )


@pytest.mark.parametrize("dtype", HALF)
def test_every_value_is_read_exactly(dtype):
    """channel_stats of one value per channel: the mean is the value as the kernels read it, for
    all 2**16 bit patterns (the finite ones; inf and NaN give a NaN mean, as d = x - x is NaN)."""
    bits = np.arange(2**16, dtype=np.uint16)
    x = bits.view(np.float16 if dtype == F16 else BF16)
    with np.errstate(invalid="ignore"):  # (ml_dtypes warns about its signalling NaNs)
        exact = x.astype(np.float64)
    finite = np.isfinite(exact)
    for shape in [(1, x.size), (1, x.size, 1)]:
        n, mean, m2 = bk.channel_stats(x.reshape(shape), axis=1)
        assert n == 1
        np.testing.assert_array_equal(mean[finite], exact[finite])
        assert np.all(np.isnan(mean[~finite]))
        assert np.all(m2[finite] == 0)


# ---- every kernel against the float64 reference -------------------------------------------------


@every_layout_and_half_dtype
def test_forward_train(layout, dtype):
    d = half_case(layout, dtype)
    ax = layout.axis
    rm, rv = d["rm"].copy(), d["rv"].copy()
    y, mean, invstd = bk.batch_norm_forward(
        d["x"], d["gamma"], d["beta"], running_mean=rm, running_var=rv, axis=ax
    )
    ry, rmean, rinvstd = ref.forward_train(d["x"], d["gamma"], d["beta"], 1e-5, ax)
    assert_rounded(y, ry, dtype, scale=max_abs(ry) + 1, what="y")
    assert_close(mean, rmean, STATS_TOL, scale=max_abs(d["x"]), what="mean")
    assert_close(invstd, rinvstd, STATS_TOL, what="invstd")
    n, _, bvar = ref.batch_stats(d["x"], ax)
    rrm, rrv = ref.update_running_torch(d["rm"], d["rv"], rmean, bvar, n, 0.1)
    assert rm.dtype == F32 and rv.dtype == F32
    assert_close(rm, rrm, TOL[F32], what="running_mean")
    assert_close(rv, rrv, TOL[F32], what="running_var")


@every_layout_and_half_dtype
def test_forward_infer_and_split_phases(layout, dtype):
    d = half_case(layout, dtype)
    ax = layout.axis
    y, _, _ = bk.batch_norm_forward(
        d["x"], d["gamma"], d["beta"], running_mean=d["rm"], running_var=d["rv"], training=False,
        axis=ax, eps=1e-3,
    )  # fmt: skip
    ry = ref.forward_infer(d["x"], d["rm"], d["rv"], d["gamma"], d["beta"], 1e-3, ax)
    assert_rounded(y, ry, dtype, scale=max_abs(ry) + 1, what="inference y")
    # the split phases compose to the fused forward, bit for bit
    n, mean, m2 = bk.channel_stats(d["x"], axis=ax)
    invstd = bk.invstd_from_stats(n, m2)
    y2 = bk.normalize(d["x"], mean, invstd, d["gamma"], d["beta"], axis=ax)
    y1, _, _ = bk.batch_norm_forward(d["x"], d["gamma"], d["beta"], axis=ax)
    np.testing.assert_array_equal(y2.view(np.uint16), y1.view(np.uint16))


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@every_layout_and_half_dtype
def test_backward(layout, dtype, training):
    d = half_case(layout, dtype)
    ax = layout.axis
    _, mean, invstd = bk.batch_norm_forward(d["x"], d["gamma"], d["beta"], axis=ax)
    dx, dgamma, dbeta = bk.batch_norm_backward(
        d["dy"], d["x"], mean, invstd, d["gamma"], training=training, axis=ax
    )
    backward = ref.backward_train if training else ref.backward_frozen
    rdx, rdg, rdb = backward(d["dy"], d["x"], mean, invstd, d["gamma"], ax)
    # dx's terms: gamma * invstd times dy and the two per-channel means
    scale = max_abs(d["gamma"]) * max_abs(invstd) * (3 * max_abs(d["dy"]) + 1)
    assert_rounded(dx, rdx, dtype, scale=scale, what="dx")
    assert dgamma.dtype == F32 and dbeta.dtype == F32
    assert_close(
        dgamma,
        rdg,
        TOL[F32],
        scale=float(np.sum(np.abs(d["dy"].astype(np.float64)))) * max_abs(invstd) * max_abs(d["x"]),
        what="dgamma",
    )
    assert_close(
        dbeta, rdb, TOL[F32], scale=float(np.sum(np.abs(d["dy"].astype(np.float64)))), what="dbeta"
    )
    if training:  # the split phases give the same dx, bit for bit
        sdy, sdyx = bk.backward_reduce(d["dy"], d["x"], mean, invstd, axis=ax)
        dx2 = bk.backward_elementwise(
            d["dy"], d["x"], mean, invstd, d["gamma"], sdy, sdyx, layout.count, axis=ax
        )
        np.testing.assert_array_equal(dx2.view(np.uint16), dx.view(np.uint16))


@every_layout_and_half_dtype
def test_fused_relu_residual(layout, dtype):
    d = half_case(layout, dtype)
    ax = layout.axis
    y, mean, invstd = bk.batch_norm_forward(
        d["x"], d["gamma"], d["beta"], axis=ax, activation="relu", residual=d["res"]
    )
    ry, _, _ = ref.forward_train(d["x"], d["gamma"], d["beta"], 1e-5, ax)
    rz = ref.apply_epilogue(ry, d["res"], True)
    assert_rounded(y, rz, dtype, scale=max_abs(ry) + max_abs(d["res"]) + 1, what="y")
    dx, _, _, dres = bk.batch_norm_backward(
        d["dy"], d["x"], mean, invstd, d["gamma"], axis=ax, activation="relu", y=y,
        residual_grad=True,
    )  # fmt: skip
    g = ref.relu_backward(d["dy"], y)
    np.testing.assert_array_equal(dres.astype(np.float64), g)  # g is dy or 0: exact
    rdx, _, _ = ref.backward_train(g, d["x"], mean, invstd, d["gamma"], ax)
    scale = max_abs(d["gamma"]) * max_abs(invstd) * (3 * max_abs(d["dy"]) + 1)
    assert_rounded(dx, rdx, dtype, scale=scale, what="dx")


@pytest.mark.parametrize("dtype", HALF)
def test_thread_count_changes_nothing(dtype, restore_threads):
    lay = Layout("mt", (8, 16, 16, 32), -1)
    d = half_case(lay, dtype)
    results = []
    for threads in (1, 2, 3):
        bk.set_num_threads(threads)
        y, mean, invstd = bk.batch_norm_forward(d["x"], d["gamma"], d["beta"], axis=-1)
        dx, dg, db = bk.batch_norm_backward(d["dy"], d["x"], mean, invstd, d["gamma"], axis=-1)
        results.append((y.view(np.uint16), mean, invstd, dx.view(np.uint16), dg, db))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("axis", [1, -1])
def test_streamed_output(dtype, axis):
    """An output past the streaming-store threshold (16 MiB), both memory patterns."""
    shape = (16, 64, 128, 64) if axis == 1 else (16, 128, 64, 64)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 1).astype(dtype)
    C = shape[axis]
    g = rng.uniform(0.5, 2, C).astype(F32)
    y, mean, invstd = bk.batch_norm_forward(x, g, None, axis=axis)
    ry = ref.normalize(x, mean, invstd, g, None, axis)
    assert_rounded(y, ry, dtype, scale=max_abs(ry) + 1, what="y")


@pytest.mark.parametrize("dtype", HALF)
def test_layer(dtype):
    rng = np.random.default_rng(5)
    layer = bk.BatchNorm(6, dtype=dtype)
    assert layer.param_dtype == F32
    for arr in (
        *layer.params.values(),
        *layer.grads.values(),
        layer.running_mean,
        layer.running_var,
    ):
        assert arr.dtype == F32
    x = (rng.standard_normal((10, 6, 5)) * 3 + 2).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y = layer.forward(x)
    ry, mean, invstd = ref.forward_train(x, None, None, layer.eps, 1)
    assert_rounded(y, ry, dtype, scale=max_abs(ry) + 1)
    dx = layer.backward(dy)
    rdx, _, rdb = ref.backward_train(dy, x, mean, invstd, None, 1)
    assert_rounded(dx, rdx, dtype, scale=max_abs(invstd) * (3 * max_abs(dy) + 1))
    assert_close(
        layer.grads["beta"], rdb, TOL[F32], scale=float(np.abs(dy.astype(np.float64)).sum())
    )
    layer.eval()
    ye = layer.forward(x)
    re = ref.forward_infer(x, layer.running_mean, layer.running_var, None, None, layer.eps, 1)
    assert_rounded(ye, re, dtype, scale=max_abs(re) + 1)
    state = layer.state_dict()
    assert all(v.dtype == F32 for k, v in state.items() if k != "num_batches_tracked")
    other = bk.BatchNorm(6, dtype=dtype)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.running_var, layer.running_var)


@pytest.mark.parametrize("dtype", HALF)
def test_variants_take_half_data(dtype):
    """Batch renorm, ghost BN, masks and precise BN go through the same kernels: their outputs
    are the 16-bit rounding of their references, their parameter gradients float32."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((8, 4, 6)) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    g = rng.uniform(0.5, 2, 4).astype(F32)
    b = rng.standard_normal(4).astype(F32)
    rm, rv = np.zeros(4, F32), np.ones(4, F32)
    y, mean, invstd, r, dd = bk.batch_renorm_forward(
        x, g, b, running_mean=rm, running_var=rv, r_max=1.5, d_max=0.5
    )
    ry = ref.renorm_forward(x, np.zeros(4), np.ones(4), g, b, 1e-5, 1.5, 0.5, 1)[0]
    assert_rounded(y, ry, dtype, scale=max_abs(ry) + 1, what="renorm y")
    _, dg, db = bk.batch_renorm_backward(dy, x, mean, invstd, r, dd, g)
    assert dg.dtype == F32 and db.dtype == F32
    yg, _, _ = bk.ghost_batch_norm_forward(x, g, b, virtual_batch_size=4)
    ryg = ref.ghost_forward(x, 4, g, b, 1e-5, 1)[0]
    assert_rounded(yg, ryg, dtype, scale=max_abs(ryg) + 1, what="ghost y")
    mask = rng.random((8, 6)) < 0.7
    ym, mm, sm = bk.batch_norm_forward(x, g, b, mask=mask)
    rym = ref.masked_forward(x, mask, g, b, 1e-5, 1)[0]
    assert_rounded(ym, rym, dtype, scale=max_abs(rym) + 1, what="masked y")
    dxm, dgm, _ = bk.batch_norm_backward(dy, x, mm, sm, g, mask=mask)
    rdxm = ref.masked_backward(dy, x, mm, sm, mask, g, 1)[0]
    assert_rounded(dxm, rdxm, dtype, scale=max_abs(sm) * max_abs(g) * (3 * max_abs(dy) + 1))
    assert dgm.dtype == F32
    n, pm, pm2 = bk.population_stats([x[:3], x[3:]])
    rn, rpm, rpm2 = ref.channel_stats(x, 1)
    assert n == rn
    assert_close(pm, rpm, STATS_TOL, scale=max_abs(x))
    assert_close(pm2, rpm2, STATS_TOL)


@pytest.mark.parametrize("dtype", HALF)
def test_parameters_must_be_float32(dtype):
    x = np.ones((4, 3), dtype=dtype)
    for name in ("gamma", "beta"):
        with pytest.raises(TypeError, match=rf"^{name}: expected dtype float32 \(parameters of"):
            bk.batch_norm_forward(x, **{name: np.ones(3, dtype)})
    with pytest.raises(TypeError, match=r"^running_mean: expected dtype float32"):
        bk.batch_norm_forward(x, running_mean=np.zeros(3), running_var=np.ones(3, F32))
    with pytest.raises(TypeError, match=r"^x: expected a float16, bfloat16, float32 or float64"):
        bk.batch_norm_forward(np.ones((4, 3), np.uint16))


# ---- each instruction set -----------------------------------------------------------------------

ISA_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_half as t
from conftest import LAYOUTS
import bnkernel as bk
worst = 0.0
wrong = 0
for dtype in (t.F16, t.BF16):
    v = t.rounding_inputs(dtype)
    v = v[v != 0]
    for inner in (0, 3, 128):
        got = t._kernel_round(v, dtype, inner)
        want = t.nearest(v, dtype)
        bad = (got.view(np.uint16) != want.view(np.uint16)) & ~np.isnan(v)
        wrong += int(bad.sum())
    for lay in LAYOUTS[::3]:
        t.test_forward_train(lay, dtype)
        t.test_backward(lay, dtype, True)
        t.test_fused_relu_residual(lay, dtype)
print(json.dumps({"isa": bk._core.isa, "wrong": wrong}))
"""


def _isas() -> list[str]:
    order = ["baseline", "avx2", "avx512"]
    return order[: order.index(bk._core.isa) + 1] if bk._core.isa in order else ["baseline"]


@pytest.mark.parametrize("isa", _isas())
def test_each_instruction_set(isa):
    """Every copy of the kernels (their conversions differ: F16C and AVX-512's rounding modes, or
    plain integer code) rounds every value correctly and meets the bounds."""
    env = {**os.environ, "BNKERNEL_ISA": isa}
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run(
        [sys.executable, "-c", ISA_SCRIPT, here], capture_output=True, text=True, env=env, cwd=here
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result == {"isa": isa, "wrong": 0}
