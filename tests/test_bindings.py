"""The compiled module takes arrays exactly as the kernels need them, or refuses them.

pybind11's default would convert: a float64 array passed where float32 is expected, or a strided
one, would be copied silently, and an output written into that copy would be lost.  These tests call
``bnkernel._core`` directly to pin that the bindings never convert.
"""

from __future__ import annotations

import numpy as np
import pytest

import bnkernel as bk
from bnkernel import _core


def arrays(dtype=np.float32, shape=(4, 3, 5)):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    C = shape[1]
    return x, np.zeros(C), np.ones(C), np.empty_like(x)


def test_output_of_another_dtype_is_refused_not_copied():
    x, mean, invstd, _ = arrays()
    out = np.zeros(x.shape, np.float64)
    with pytest.raises(TypeError):
        _core.normalize(x, mean, invstd, None, None, out)
    assert not out.any()


def test_strided_output_is_refused_not_copied():
    x, mean, invstd, _ = arrays()
    big = np.zeros((4, 3, 10), np.float32)
    out = big[:, :, ::2]
    with pytest.raises(TypeError):
        _core.normalize(x, mean, invstd, None, None, out)
    assert not big.any()


def test_float32_statistics_are_refused():
    x, mean, invstd, out = arrays()
    with pytest.raises(TypeError):
        _core.normalize(x, mean.astype(np.float32), invstd, None, None, out)


def test_mixed_dtypes_are_refused():
    x, mean, invstd, out = arrays(np.float64)
    with pytest.raises(TypeError):
        _core.normalize(x, mean, invstd, np.ones(3, np.float32), None, out)


def test_read_only_output_is_refused():
    x, mean, invstd, out = arrays()
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out: must be writeable"):
        _core.normalize(x, mean, invstd, None, None, out)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x, m, s, o: _core.normalize(x.reshape(12, 5), m, s, None, None, o), "3-d"),
        (lambda x, m, s, o: _core.normalize(x, m[:2], s, None, None, o), "mean: expected"),
        (lambda x, m, s, o: _core.normalize(x, m, s, None, None, o[:2]), "out: expected"),
        (lambda x, m, s, o: _core.normalize(x, m, s, np.ones(4, np.float32), None, o), "gamma"),
    ],
    ids=["not-3d", "mean-length", "out-shape", "gamma-length"],
)
def test_shapes_are_checked_before_the_kernel_runs(call, message):
    x, mean, invstd, out = arrays()
    with pytest.raises(ValueError, match=message):
        call(x, mean, invstd, out)


def test_merge_stats_rejects_negative_counts():
    with pytest.raises(ValueError, match="counts"):
        _core.merge_stats(
            np.array([1, -1], np.int64),
            np.zeros((2, 3)),
            np.zeros((2, 3)),
            np.empty(3),
            np.empty(3),
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_running_stats_is_the_fused_forwards_update(dtype):
    """The split phases' running update is the compiled one the fused forward applies: the same
    values, bit for bit, for each running dtype, biased and unbiased."""
    x = np.random.default_rng(1).standard_normal((6, 3, 7)).astype(dtype)
    for unbiased in (True, False):
        fused_rm, fused_rv = np.full(3, 0.5, dtype), np.full(3, 2.0, dtype)
        out, mean, invstd = np.empty_like(x), np.empty(3), np.empty(3)
        _core.forward_train(
            x, None, None, 1e-5, out, mean, invstd, fused_rm, fused_rv, 0.3, unbiased
        )
        m2 = np.empty(3)
        _core.channel_stats(x, mean, m2)
        rm, rv = np.full(3, 0.5, dtype), np.full(3, 2.0, dtype)
        _core.update_running_stats(rm, rv, 42, mean, m2, 0.3, unbiased)
        np.testing.assert_array_equal(rm, fused_rm)
        np.testing.assert_array_equal(rv, fused_rv)


@pytest.mark.parametrize(
    "running_mean,running_var,error,message",
    [
        (np.zeros(3, np.float32), np.ones(3), TypeError, "incompatible"),
        (np.zeros(2, np.float32), None, ValueError, "running_mean: expected"),
        (None, np.ones(3)[::-1], TypeError, "incompatible"),
    ],
    ids=["mixed-dtypes", "length", "strided"],
)
def test_update_running_stats_refuses_what_it_cannot_write(
    running_mean, running_var, error, message
):
    with pytest.raises(error, match=message):
        _core.update_running_stats(running_mean, running_var, 8, np.zeros(3), np.ones(3), 0.1, True)


def test_update_running_stats_refuses_a_read_only_buffer():
    rv = np.ones(3)
    rv.flags.writeable = False
    with pytest.raises(ValueError, match="running_var: must be writeable"):
        _core.update_running_stats(None, rv, 8, np.zeros(3), np.ones(3), 0.1, True)


def test_info_command(capsys):
    from bnkernel.__main__ import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"bnkernel {bk.__version__}\n")
    assert f"SIMD kernels (chosen at run time): {bk._core.isa}" in out
    assert "OpenMP: yes" in out or "OpenMP: no" in out
    try:
        from bnkernel import _cuda  # noqa: F401
    except ImportError:
        assert "CUDA: no (built without BNKERNEL_CUDA=ON" in out
    else:
        assert "CUDA: module built (runtime " in out
    assert "data dtypes: float32, float64, float16, bfloat16 (ml_dtypes " in out


def test_one_version_everywhere():
    """python/bnkernel/_version.py is the one place: the package metadata and the compiled module
    (CMake gets it from scikit-build-core) carry the same."""
    from importlib import metadata

    assert bk.__version__ == _core.version == metadata.version("bnkernel")


# ---- memory_pass: the benchmarks' bound -------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("n", [1, 7, 1000, 12345, (16 << 20) // 4 + 3], ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "off-line"])
def test_memory_pass_copies_reads_and_writes_every_byte(dtype, n, offset, restore_threads):
    """Every byte, at any size (head and tail of a cache line, streamed past 16 MiB) and offset
    within a line, on one and two threads."""
    for threads in (1, 2):
        bk.set_num_threads(threads)
        base = np.arange(n + offset) % 251
        src = base.astype(dtype)[offset:]
        dst = np.full(n + offset, 7, dtype)[offset:]
        _core.memory_pass("copy", src, dst)
        np.testing.assert_array_equal(dst, src)
        zeros = np.zeros(n + offset, dtype)[offset:]
        assert _core.memory_pass("read", zeros, dst) == 0
        for at in (0, n // 2, n - 1):
            zeros[at] = 1
            assert _core.memory_pass("read", zeros, dst) != 0, at
            zeros[at] = 0
        _core.memory_pass("write", src, dst)
        assert not dst.any()


def test_memory_pass_refuses_what_it_cannot_do():
    a, b = np.ones(8), np.ones(8)
    with pytest.raises(ValueError, match="kind: expected 'copy', 'read' or 'write'"):
        _core.memory_pass("move", a, b)
    with pytest.raises(ValueError, match="dst: expected as many values as src"):
        _core.memory_pass("copy", a, np.ones(7))
    with pytest.raises(ValueError, match="dst: must not share memory with src"):
        _core.memory_pass("copy", a, a)
    b.flags.writeable = False
    with pytest.raises(ValueError, match="dst: must be writeable"):
        _core.memory_pass("copy", a, b)
    assert _core.memory_pass("read", a, b) != 0  # a read never writes dst
    with pytest.raises(TypeError):
        _core.memory_pass("copy", a, np.ones(8, np.float32))  # no conversion
