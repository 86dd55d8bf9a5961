"""The CUDA module (bnkernel._cuda, built with -Ccmake.define.BNKERNEL_CUDA=ON).

Host-side tests run wherever the module is built (CI builds it with nvcc from the package index,
on a machine without a GPU): it imports, reports its runtime and why no GPU is usable, and checks
its arguments.  The GPU tests need CuPy and a device; they compare the kernels with the float64
NumPy reference and check that the statistics are bit-identical run to run.  Without the module
or a GPU they skip, saying why.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import gpu_reason

_cuda = pytest.importorskip(
    "bnkernel._cuda", reason="built without BNKERNEL_CUDA=ON (no CUDA module in this build)"
)


GPU_REASON = gpu_reason()
if GPU_REASON is not None and os.environ.get("BNKERNEL_REQUIRE_GPU") == "1":
    # (.ci/gpu: on the GPU machine a skipped GPU test is a failure)
    raise RuntimeError(f"BNKERNEL_REQUIRE_GPU=1, but {GPU_REASON}")
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=GPU_REASON or "")


# ---- host side --------------------------------------------------------------------------------


def test_info_reports_runtime_driver_and_devices():
    info = _cuda.info()
    assert set(info) == {"runtime_version", "driver_version", "error", "devices"}
    assert info["runtime_version"] >= 12000  # CUDA 12 or newer, linked in statically
    if info["error"] is None:
        assert info["devices"], "no error, so at least one device"
        for d in info["devices"]:
            assert d["memory"] > 0 and len(d["compute_capability"]) == 2 and d["name"]
    else:
        assert info["devices"] == []
        assert isinstance(info["error"], str) and info["error"]


def test_info_command_names_the_cuda_build(capsys):
    from bnkernel.__main__ import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("CUDA: "))
    assert line.startswith("CUDA: module built (runtime ")
    if _cuda.info()["error"] is not None:
        assert "no usable GPU: " in line


def test_module_links_the_runtime_statically():
    """The module needs the driver alone: no libcudart among its shared-library dependencies."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("ldd: Linux only")
    out = subprocess.run(["ldd", _cuda.__file__], capture_output=True, text=True, check=False)
    assert "libcudart" not in out.stdout


def test_stats_parts_depend_on_the_shape_alone():
    """About 2048 blocks a launch, parts of at least 4096 values (rows, channels-last), at most
    1024 (kernels.cu); the same formula in tests/fake_cuda.py, which sizes the workspaces."""
    from fake_cuda import FakeKernels

    cases = {
        (1, 3, 10): 1,
        (1, 1, 1 << 16): 16,
        (1, 1, (1 << 16) + 1): 17,
        (4096, 7, 1 << 20): 293,  # ceil(2048 / 7)
        (1, 1, 1 << 32): 1024,  # capped
        (100_000, 64, 1): 25,  # channels-last: 2 tiles of 32 channels, 4096 rows a part
        (10**6, 5, 1): 245,  # one tile
        (0, 5, 0): 1,
    }
    fake = FakeKernels()
    for shape, parts in cases.items():
        assert _cuda.stats_parts(*shape) == parts == fake.stats_parts(*shape), shape


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="dtype: expected 'float32', 'float64', 'float16' or "):
        _cuda.normalize("int8", 0, 1, 1, 1, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="param_dtype: expected 'float32' or 'float64'"):
        _cuda.finish_stats("float16", 3, 2, 0, 0, 1e-5, 0)
    with pytest.raises(ValueError, match="count: expected a count >= 1"):
        _cuda.finish_stats("float32", 3, 0, 0, 0, 1e-5, 0)
    with pytest.raises(ValueError, match="device: expected an index >= 0"):
        _cuda.normalize("float32", 0, 1, 1, 1, 0, 0, 0, 0, 0, device=-2)
    with pytest.raises(ValueError, match="shape: expected non-negative"):
        _cuda.stats_parts(-1, 3, 4)
    with pytest.raises(ValueError, match="shape: expected non-negative"):
        _cuda.channel_stats("float32", 0, 1, -3, 1, 0, 0, 0)


def test_empty_launches_do_nothing():
    """Empty arrays launch no kernel (so no device is touched, none needed)."""
    _cuda.normalize("float32", 0, 0, 3, 5, 0, 0, 0, 0, 0)
    _cuda.normalize("bfloat16", 0, 0, 3, 5, 0, 0, 0, 0, 0, relu=True, device=0)
    _cuda.channel_stats("float64", 0, 4, 0, 1, 0, 0, 0)
    _cuda.channel_stats("float16", 0, 4, 0, 1, 0, 0, 0, mask=0, device=0)
    _cuda.channel_sums("float32", 0, 0, 4, 0, 1, 0, 0, 0, 0, 0)
    _cuda.backward_dx("float64", True, 0, 0, 0, 3, 2, 6, 0, 0, 0, 0, 0, 0)
    _cuda.finish_stats("float32", 0, 5, 0, 0, 1e-5, 0)
    _cuda.running_coefficients("float64", 0, 0, 0, 1e-5, 0, 0)


# ---- on a GPU -----------------------------------------------------------------------------------

SHAPES = [  # (outer, C, inner): NCHW-like, channels-last (inner 1), C = 1, tiny, awkward
    (8, 3, 25),
    (5, 17, 1),
    (3, 1, 1000),
    (2, 1, 1),
    (7, 513, 3),
    (33, 64, 49),
    (1, 5, 200_000),  # several parts per channel
    (70_000, 40, 1),  # channels-last: two tiles (the second partial), several parts
    (20_000, 3, 1),  # channels-last, 10 rows side by side in a warp
    (9, 33, 1),
]


def _ptr(a) -> int:
    return int(a.data.ptr)


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_stats_against_the_reference(shape, dtype):
    import cupy as cp

    outer, C, inner = shape
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 2, (1, C, 1)) + 3).astype(dtype)
    dx = cp.asarray(x)
    mean, m2 = cp.empty(C), cp.empty(C)
    parts = _cuda.stats_parts(outer, C, inner)
    work = cp.empty(3 * C * parts)
    name = np.dtype(dtype).name
    stream = cp.cuda.get_current_stream().ptr
    _cuda.channel_stats(
        name, _ptr(dx), outer, C, inner, _ptr(mean), _ptr(m2), _ptr(work), stream=stream
    )
    want_mean = x.astype(np.float64).mean(axis=(0, 2))
    want_m2 = ((x.astype(np.float64) - want_mean[None, :, None]) ** 2).sum(axis=(0, 2))
    np.testing.assert_allclose(cp.asnumpy(mean), want_mean, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(cp.asnumpy(m2), want_m2, rtol=1e-12, atol=1e-12)
    # deterministic: the same bits again
    mean2, m22 = cp.empty(C), cp.empty(C)
    _cuda.channel_stats(
        name, _ptr(dx), outer, C, inner, _ptr(mean2), _ptr(m22), _ptr(work), stream=stream
    )
    assert cp.asnumpy(mean2).tobytes() == cp.asnumpy(mean).tobytes()
    assert cp.asnumpy(m22).tobytes() == cp.asnumpy(m2).tobytes()


@needs_gpu
def test_channel_stats_are_stable_far_from_zero():
    """1e4 + 1e-2 randn in float32: the variance to the float32 rounding floor (a one-pass
    E[x^2] - E[x]^2 would lose it entirely)."""
    import cupy as cp

    x = (1e4 + 1e-2 * np.random.default_rng(1).standard_normal((64, 2, 4096))).astype(np.float32)
    dx = cp.asarray(x)
    mean, m2 = cp.empty(2), cp.empty(2)
    work = cp.empty(3 * 2 * _cuda.stats_parts(64, 2, 4096))
    stream = cp.cuda.get_current_stream()
    _cuda.channel_stats(
        "float32", _ptr(dx), 64, 2, 4096, _ptr(mean), _ptr(m2), _ptr(work), stream=stream.ptr
    )
    stream.synchronize()
    want = x.astype(np.float64).var(axis=(0, 2)) * 64 * 4096
    np.testing.assert_allclose(cp.asnumpy(m2), want, rtol=1e-12)


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_normalize_against_the_reference(shape, dtype):
    import cupy as cp

    outer, C, inner = shape
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) + rng.uniform(-3, 3, (1, C, 1))).astype(dtype)
    mean = rng.uniform(-3, 3, C)
    invstd = rng.uniform(0.5, 2, C)
    gamma = rng.uniform(0.5, 1.5, C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    dx, dy = cp.asarray(x), cp.empty(shape, dtype)
    dm, di, dg, db = (cp.asarray(a) for a in (mean, invstd, gamma, beta))
    _cuda.normalize(
        np.dtype(dtype).name, _ptr(dx), outer, C, inner, _ptr(dm), _ptr(di), _ptr(dg), _ptr(db),
        _ptr(dy), stream=cp.cuda.get_current_stream().ptr,
    )  # fmt: skip
    d = x.astype(np.float64) - mean[None, :, None]
    scale = (gamma.astype(np.float64) * invstd)[None, :, None]
    shift = beta.astype(np.float64)[None, :, None]
    want = d * scale + shift
    got = cp.asnumpy(dy).astype(np.float64)
    # computed in double (error at most a few units of 2^-53 of its terms), rounded once to the
    # output dtype (half an ulp of it): float32 outputs are the double result correctly rounded
    terms = np.abs(d * scale) + np.abs(shift)
    ulp = np.spacing(np.abs(want).astype(dtype)).astype(np.float64)
    assert np.all(np.abs(got - want) <= 0.5 * ulp + 2.0**-49 * terms)


@needs_gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_against_the_reference(shape, dtype, training):
    """The sums against float64 NumPy, bit-identical on a rerun; dx against the float64 formula
    (training: g invstd (dy - mean(dy) - xhat mean(dy xhat)); frozen: g invstd dy)."""
    import cupy as cp

    outer, C, inner = shape
    m = outer * inner
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 2 + rng.uniform(-3, 3, (1, C, 1))).astype(dtype)
    dy = (rng.standard_normal(shape) + rng.uniform(-1, 1, (1, C, 1))).astype(dtype)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mean = x64.mean(axis=(0, 2))
    invstd = 1.0 / np.sqrt(x64.var(axis=(0, 2)) + 1e-5)
    gamma = rng.uniform(0.5, 1.5, C).astype(dtype)
    dx_, dy_ = cp.asarray(x), cp.asarray(dy)
    dm, di, dg = cp.asarray(mean), cp.asarray(invstd), cp.asarray(gamma)
    s_dy, s_xmu = cp.empty(C), cp.empty(C)
    work = cp.empty(2 * C * _cuda.stats_parts(outer, C, inner))
    stream = cp.cuda.get_current_stream().ptr
    name = np.dtype(dtype).name
    _cuda.channel_sums(
        name, _ptr(dy_), _ptr(dx_), outer, C, inner, _ptr(dm), _ptr(di), _ptr(s_dy), _ptr(s_xmu),
        _ptr(work), stream=stream,
    )  # fmt: skip
    d = x64 - mean[None, :, None]
    want_dy = dy64.sum(axis=(0, 2))
    want_xmu = (dy64 * d).sum(axis=(0, 2)) * invstd  # (sum(dy * xhat))
    scale = np.abs(dy64).sum(axis=(0, 2)) * (1 + np.abs(d).max()) * invstd.max()
    np.testing.assert_allclose(cp.asnumpy(s_dy), want_dy, rtol=0, atol=1e-12 * scale.max())
    np.testing.assert_allclose(cp.asnumpy(s_xmu), want_xmu, rtol=0, atol=1e-12 * scale.max())
    again_dy, again_xmu = cp.empty(C), cp.empty(C)
    _cuda.channel_sums(
        name, _ptr(dy_), _ptr(dx_), outer, C, inner, _ptr(dm), _ptr(di), _ptr(again_dy),
        _ptr(again_xmu), _ptr(work), stream=stream,
    )  # fmt: skip
    assert cp.asnumpy(again_dy).tobytes() == cp.asnumpy(s_dy).tobytes()
    assert cp.asnumpy(again_xmu).tobytes() == cp.asnumpy(s_xmu).tobytes()

    out = cp.empty(shape, dtype)
    _cuda.backward_dx(
        name, training, _ptr(dy_), _ptr(dx_), outer, C, inner, m, _ptr(dm), _ptr(di), _ptr(dg),
        _ptr(s_dy), _ptr(s_xmu), _ptr(out), stream=stream,
    )  # fmt: skip
    k = (gamma.astype(np.float64) * invstd)[None, :, None]
    if training:
        xhat = d * invstd[None, :, None]
        want = k * (dy64 - (want_dy / m)[None, :, None]
                    - xhat * (want_xmu / m)[None, :, None])  # fmt: skip
        terms = np.abs(k) * (np.abs(dy64) + np.abs(want_dy / m)[None, :, None]
                             + np.abs(xhat * (want_xmu / m)[None, :, None]))  # fmt: skip
    else:
        want = k * dy64
        terms = np.abs(want)
    got = cp.asnumpy(out).astype(np.float64)
    ulp = np.spacing(np.abs(want).astype(dtype)).astype(np.float64)
    # computed in double from sums within a few 2^-53 of their terms, rounded once
    assert np.all(np.abs(got - want) <= 0.5 * ulp + 2.0**-44 * terms)


@needs_gpu
def test_one_channel_of_more_than_2_to_the_31_values():
    """C = 1 with 2^31 + 77 values (float16, 4 GiB): 64-bit indexing throughout.  x = j mod 7,
    whose statistics are known exactly: the mean and M2 of the residues, weighted by count."""
    import cupy as cp

    n = 2**31 + 77
    x = (cp.arange(n, dtype=cp.int64) % 7).astype(cp.float16).reshape(1, 1, n)
    counts = np.array([n // 7 + (1 if r < n % 7 else 0) for r in range(7)], np.float64)
    values = np.arange(7, dtype=np.float64)
    want_mean = (counts * values).sum() / n
    want_m2 = (counts * (values - want_mean) ** 2).sum()
    mean, m2 = cp.empty(1), cp.empty(1)
    work = cp.empty(3 * _cuda.stats_parts(1, 1, n))
    _cuda.channel_stats("float16", _ptr(x), 1, 1, n, _ptr(mean), _ptr(m2), _ptr(work))
    np.testing.assert_allclose(float(mean.get()[0]), want_mean, rtol=1e-13)
    np.testing.assert_allclose(float(m2.get()[0]), want_m2, rtol=1e-11)
    y = cp.empty_like(x)
    invstd = 1.0 / cp.sqrt(m2 / n + 1e-5)
    _cuda.normalize("float16", _ptr(x), 1, 1, n, _ptr(mean), _ptr(invstd), 0, 0, _ptr(y))
    last = float(y[0, 0, -1].get())  # the last value, past 2^31: (x - mean) * invstd
    want_last = (float((n - 1) % 7) - want_mean) * float(invstd.get()[0])
    assert abs(last - want_last) <= 2.0**-10 * abs(want_last) + 1e-3
