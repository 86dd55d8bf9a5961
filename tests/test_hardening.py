"""Hardening of the compiled module: fork safety, the thread-count bound, merge_stats' count
overflow, and the bindings' memory-safety checks (shapes, writeable outputs, alignment).

The cases that used to crash or hang (a kernel in a child forked after a multithreaded call hung in
libgomp; a huge thread count or a misaligned streamed output segfaulted) run in a fresh interpreter
under a timeout, so that a regression fails the test instead of killing or hanging pytest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import bnkernel as bk
from bnkernel import _core

needs_openmp = pytest.mark.skipif(not _core.have_openmp, reason="built without OpenMP")
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")


def run_script(code: str, timeout: float = 60, env: dict[str, str] | None = None) -> str:
    """Run `code` in a fresh interpreter; its stdout.  Fails on a non-zero exit, a signal or the
    timeout (then the whole process group, forked children included, is killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s (a hang)\nstdout:\n{out}\nstderr:\n{err}")
    assert proc.returncode == 0, f"exit status {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    return out


# ---- fork ---------------------------------------------------------------------------------------

# 32x64x56x56 float32: far above the threshold for threads, so the parent's calls run a team
FORK_SETUP = """
    import os, warnings
    import numpy as np
    import bnkernel as bk
    warnings.simplefilter("ignore", DeprecationWarning)  # fork() of a multithreaded process
    bk.set_num_threads(2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 64, 56, 56), dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    g = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)

    def step():
        y, mean, invstd = bk.batch_norm_forward(x, g, b)
        dx, dg, db = bk.batch_norm_backward(dy, x, mean, invstd, g)
        return y, mean, invstd, dx, dg, db

    parent = step()  # on two threads: libgomp's pool now exists
"""


@needs_fork
@needs_openmp
def test_kernels_in_a_child_forked_after_a_threaded_call():
    """The child's calls run on one thread (libgomp's pool does not survive fork) and give the
    parent's results bit for bit; set_num_threads(2) there is accepted and has no effect."""
    out = run_script(
        FORK_SETUP
        + """
    pid = os.fork()
    if pid == 0:
        status = 6
        try:
            same = all(np.array_equal(a, b) for a, b in zip(parent, step()))
            threads = bk.get_num_threads()
            bk.set_num_threads(2)  # accepted, no effect in a forked child
            same_again = all(np.array_equal(a, b) for a, b in zip(parent, step()))
            threads_again = bk.get_num_threads()
            status = (
                0 if same and same_again and threads == threads_again == 1
                else 2 if not (same and same_again)
                else 3
            )
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status))
    print("parent threads", bk.get_num_threads())
    """
    )
    assert "child 0" in out, out
    assert "parent threads 2" in out, out  # the parent keeps its threads


@needs_fork
@needs_openmp
def test_fork_pool_of_workers_runs_the_kernels():
    out = run_script(
        FORK_SETUP
        + """
    import multiprocessing

    def work(i):
        y, mean, invstd, dx, dg, db = step()
        same = all(np.array_equal(a, b) for a, b in zip(parent, (y, mean, invstd, dx, dg, db)))
        return i, same, bk.get_num_threads()

    with multiprocessing.get_context("fork").Pool(2) as pool:
        print(pool.map(work, range(4)))
    """
    )
    assert out.strip() == str([(i, True, 1) for i in range(4)]), out


# ---- the thread-count bound ---------------------------------------------------------------------


def test_max_threads_is_exposed():
    assert bk.get_max_threads() == _core.max_threads == 256
    from bnkernel.__main__ import info_lines

    assert f"threads: {bk.get_num_threads()} (at most {bk.get_max_threads()})" in info_lines()


@pytest.mark.parametrize("n", [257, 100_000, 2**31, 2**64], ids=["max+1", "1e5", "2^31", "2^64"])
def test_set_num_threads_above_the_maximum_raises(n, restore_threads):
    bk.set_num_threads(2)
    with pytest.raises(ValueError, match=rf"^n: {n} is more than the maximum of 256 threads"):
        bk.set_num_threads(n)
    assert bk.get_num_threads() == 2  # unchanged
    bk.set_num_threads(256)  # the maximum itself is fine
    assert bk.get_num_threads() == 256


def test_core_set_num_threads_above_the_maximum_raises(restore_threads):
    with pytest.raises(ValueError, match=r"^n: 100000 is more than the maximum of 256 threads"):
        _core.set_num_threads(100_000)


LARGE_FORWARD = """
    import numpy as np
    import bnkernel as bk
    x = np.random.default_rng(0).standard_normal((32, 64, 28, 28), dtype=np.float32)
    print("threads", bk.get_num_threads())
    many = bk.batch_norm_forward(x)
    bk.set_num_threads(1)
    one = bk.batch_norm_forward(x)
    print("same", all(np.array_equal(a, b) for a, b in zip(many, one)))
"""


@needs_openmp
def test_omp_num_threads_above_the_maximum_is_clamped():
    out = run_script(LARGE_FORWARD, timeout=120, env={"OMP_NUM_THREADS": "1000000"})
    assert "threads 256\n" in out and "same True" in out, out


@needs_openmp
def test_threadpoolctl_limit_above_the_maximum_is_clamped():
    pytest.importorskip("threadpoolctl")
    code = (
        "import threadpoolctl, bnkernel\n"
        "threadpoolctl.threadpool_limits(limits=100000, user_api='openmp')\n"
    ) + textwrap.dedent(LARGE_FORWARD)
    out = run_script(code, timeout=120)
    assert "threads 256\n" in out and "same True" in out, out


# ---- merge_stats: the total count ---------------------------------------------------------------


@pytest.mark.parametrize(
    "counts",
    [[2**62, 2**62], [2**63 - 1, 1], [1, 0, 2**63 - 1]],
    ids=["2^62+2^62", "max+1", "with-zero"],
)
def test_core_merge_stats_count_overflow_raises(counts):
    parts = len(counts)
    mean, m2 = np.full(3, 7.0), np.full(3, 7.0)
    with pytest.raises(OverflowError, match="counts"):
        _core.merge_stats(
            np.array(counts, np.int64), np.ones((parts, 3)), np.ones((parts, 3)), mean, m2
        )
    assert (mean == 7.0).all() and (m2 == 7.0).all()  # untouched


def test_core_merge_stats_largest_total_is_fine():
    mean, m2 = np.empty(3), np.empty(3)
    counts = np.array([2**62, 2**62 - 1], np.int64)
    assert _core.merge_stats(counts, np.ones((2, 3)), np.zeros((2, 3)), mean, m2) == 2**63 - 1
    assert (mean == 1.0).all() and (m2 == 0.0).all()


# ---- unaligned outputs in the kernels -----------------------------------------------------------
#
# Unaligned outputs of 16 MiB and more (streamed stores) segfaulted the kernels.  Through the public
# functions the call must not crash: it either raises (the bindings refuse the array) or gives the
# result an aligned output gets, bit for bit.

UNALIGNED_STREAMED = """
    import numpy as np
    import bnkernel as bk

    def unaligned(a):
        u = np.frombuffer(bytearray(a.nbytes + 1), a.dtype, count=a.size, offset=1)
        u = u.reshape(a.shape)
        u[...] = a
        assert not u.flags.aligned
        return u

    rng = np.random.default_rng(0)
    results = []
    for threads in (1, 2):
        bk.set_num_threads(threads)
        for shape, axis in [((16, 64, 64, 64), 1), ((16, 64, 64, 64), -1), ((4096, 1024), 1)]:
            x = rng.standard_normal(shape, dtype=np.float32)
            dy = rng.standard_normal(shape, dtype=np.float32)
            C = shape[axis]
            rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
            _, mean, invstd = bk.batch_norm_forward(x, axis=axis)
            ops = {
                "forward": lambda out: bk.batch_norm_forward(x, axis=axis, out=out)[0],
                "inference": lambda out: bk.batch_norm_forward(
                    x, axis=axis, training=False, running_mean=rm, running_var=rv, out=out)[0],
                "normalize": lambda out: bk.normalize(x, mean, invstd, axis=axis, out=out),
                "backward": lambda out: bk.batch_norm_backward(
                    dy, x, mean, invstd, axis=axis, out=out)[0],
                "backward frozen": lambda out: bk.batch_norm_backward(
                    dy, x, mean, invstd, training=False, axis=axis, out=out)[0],
            }
            for name, op in ops.items():
                expected = op(np.empty_like(x))
                out = unaligned(np.zeros_like(x))
                try:
                    got = op(out)
                except ValueError as e:
                    assert "aligned" in str(e), e
                    results.append("refused")
                    continue
                assert np.array_equal(out, expected), (threads, shape, name)
                assert np.array_equal(got, expected), (threads, shape, name)
                results.append("same")
    print(sorted(set(results)))
"""


def test_unaligned_streamed_outputs_do_not_crash():
    out = run_script(UNALIGNED_STREAMED, timeout=300)
    assert out.strip() in ("['refused']", "['same']", "['refused', 'same']"), out


# ---- the bindings' checks -----------------------------------------------------------------------
#
# Every bound kernel with valid arguments, as keyword arguments, and the roles of its arrays:
# "data" arrays have x's (outer, C, inner) shape, "channel" arrays length C, "mask" (outer, inner);
# "written" ones must be writeable.

SHAPE = (2, 3, 5)


def unaligned(a: np.ndarray) -> np.ndarray:
    """A writeable, C-contiguous copy of `a` one byte off its element alignment."""
    u = np.frombuffer(bytearray(a.nbytes + 1), a.dtype, count=a.size, offset=1).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned and u.flags.writeable and u.flags.c_contiguous
    return u


def bound_calls(dtype: Any = np.float32) -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
    rng = np.random.default_rng(0)
    outer, C, inner = SHAPE
    p = np.float32 if np.dtype(dtype).itemsize == 2 else dtype

    def data() -> np.ndarray:
        return rng.standard_normal(SHAPE).astype(dtype)

    def chan(dt: Any = np.float64) -> np.ndarray:
        return rng.uniform(0.5, 1.5, C).astype(dt)

    def mask() -> np.ndarray:
        return np.ones((outer, inner), np.uint8)

    return {
        "channel_stats": (_core.channel_stats, dict(x=data(), mean=chan(), m2=chan())),
        "masked_channel_stats": (
            _core.masked_channel_stats,
            dict(x=data(), mask=mask(), mean=chan(), m2=chan()),
        ),
        "normalize": (
            _core.normalize,
            dict(x=data(), mean=chan(), invstd=chan(), gamma=chan(p), beta=chan(p), out=data(),
                 residual=data(), relu=True),
        ),
        "forward_train": (
            _core.forward_train,
            dict(x=data(), gamma=chan(p), beta=chan(p), eps=1e-5, out=data(), mean=chan(),
                 invstd=chan(), running_mean=chan(p), running_var=chan(p), momentum=0.1,
                 unbiased=True, residual=data(), relu=True),
        ),
        "backward_reduce": (
            _core.backward_reduce,
            dict(dy=data(), x=data(), mean=chan(), invstd=chan(), sum_dy=chan(),
                 sum_dy_xhat=chan(), y=data(), dresidual=data()),
        ),
        "backward_elementwise": (
            _core.backward_elementwise,
            dict(dy=data(), x=data(), mean=chan(), invstd=chan(), gamma=chan(p), sum_dy=chan(),
                 sum_dy_xhat=chan(), count=outer * inner, out=data(), y=data(), mask=mask()),
        ),
        "backward": (
            _core.backward,
            dict(training=True, dy=data(), x=data(), mean=chan(), invstd=chan(), gamma=chan(p),
                 out=data(), dgamma=chan(p), dbeta=chan(p), y=data(), dresidual=data()),
        ),
        "merge_stats": (
            _core.merge_stats,
            dict(counts=np.array([3, 4], np.int64), means=np.ones((2, C)), m2s=np.ones((2, C)),
                 mean=chan(), m2=chan()),
        ),
    }  # fmt: skip


WRITTEN = {
    "channel_stats": {"mean", "m2"},
    "masked_channel_stats": {"mean", "m2"},
    "normalize": {"out"},
    "forward_train": {"out", "mean", "invstd", "running_mean", "running_var"},
    "backward_reduce": {"sum_dy", "sum_dy_xhat", "dresidual"},
    "backward_elementwise": {"out"},
    "backward": {"out", "dgamma", "dbeta"},
    "merge_stats": {"mean", "m2"},
}


def array_args(multibyte_only: bool = False) -> list[Any]:
    cases = []
    for fn, (_, kwargs) in bound_calls().items():
        for name, value in kwargs.items():
            if not isinstance(value, np.ndarray):
                continue
            if multibyte_only and value.itemsize == 1:
                continue  # a byte array is always aligned
            cases.append(pytest.param(fn, name, id=f"{fn}-{name}"))
    return cases


@pytest.mark.parametrize("fn", list(bound_calls()))
def test_valid_direct_calls_run(fn):
    call, kwargs = bound_calls()[fn]
    call(**kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16], ids=["f32", "f64", "f16"])
@pytest.mark.parametrize("fn,name", array_args(multibyte_only=True))
def test_unaligned_array_is_refused(fn, name, dtype):
    call, kwargs = bound_calls(dtype)[fn]
    kwargs[name] = unaligned(kwargs[name])
    before = {k: v.copy() for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    with pytest.raises(ValueError, match=rf"^{name}: not aligned to its element size$"):
        call(**kwargs)
    for k, v in before.items():  # nothing written
        assert np.array_equal(kwargs[k], v, equal_nan=True), k


# every array but the ones whose shape the others are checked against
SHAPED = [c for c in array_args() if c.values[1] not in ("x", "counts", "means")]


@pytest.mark.parametrize("fn,name", SHAPED)
def test_wrong_shape_is_refused_naming_the_argument(fn, name):
    call, kwargs = bound_calls()[fn]
    a = kwargs[name]
    kwargs[name] = np.zeros((*a.shape[:-1], a.shape[-1] + 1), a.dtype)
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        call(**kwargs)


OUTPUTS = [c for c in array_args() if c.values[1] in WRITTEN[c.values[0]]]


@pytest.mark.parametrize("fn,name", OUTPUTS)
def test_read_only_output_is_refused(fn, name):
    call, kwargs = bound_calls()[fn]
    kwargs[name].flags.writeable = False
    with pytest.raises(ValueError, match=rf"^{name}: must be writeable$"):
        call(**kwargs)


def test_dresidual_needs_y():
    for fn in ("backward_reduce", "backward"):
        call, kwargs = bound_calls()[fn]
        kwargs["y"] = None
        with pytest.raises(ValueError, match=r"^dresidual: needs y"):
            call(**kwargs)


def test_x_must_be_3d():
    call, kwargs = bound_calls()["normalize"]
    kwargs["x"] = kwargs["x"].reshape(6, 5)
    with pytest.raises(ValueError, match=r"^x: expected a 3-d \(outer, C, inner\) array"):
        call(**kwargs)


def test_count_must_be_positive():
    call, kwargs = bound_calls()["backward_elementwise"]
    kwargs["count"] = 0
    with pytest.raises(ValueError, match=r"^count: must be > 0"):
        call(**kwargs)
