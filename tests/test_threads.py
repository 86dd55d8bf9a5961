"""Determinism in the thread count, and thread control.

Each channel's values are reduced along a fixed tree; threads only decide who computes which
subtree.  So every result (outputs, saved statistics, gradients, running statistics) is
bit-identical whatever the thread count, on both strategies: few channels (C < 4 * threads: the
threads share each channel's tree) and many (a channel per thread), planar and interleaved."""

from __future__ import annotations

import ast
import concurrent.futures
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import DTYPE_IDS, DTYPES, PARALLEL_MIN, Layout, assert_close, make_case

import bnkernel as bk
from bnkernel import reference as ref

# Leaf counts per channel that are not powers of two matter: there a tree cut at another depth
# (another thread count) has differently shaped subtrees.
BIG = [
    Layout("C1-planar", (4, 1, 128, 128), 1),  # one channel: its tree shared by the threads
    Layout("C2-planar", (2, 2, 128, 128), 1),  # few rows: runs split among threads
    Layout("C1-odd-leaves", (7, 1, 97, 53), 1),  # 35987 values: 9 leaves
    Layout("C2-odd-leaves", (5, 2, 61, 59), 1),  # 17995 values per channel: 5 leaves
    Layout("C3-NCHW", (25, 3, 32, 32), 1),  # 7 leaves per channel
    Layout("C64-NCHW", (4, 64, 16, 16), 1),  # a channel per thread
    Layout("C17-NCHW", (8, 17, 16, 16), 1),
    Layout("NHWC-C32", (4, 32, 32, 32), -1),  # interleaved, many channels
    Layout("NHWC-C3", (16, 32, 32, 3), -1),  # interleaved, few channels
    Layout("NC-C1", (65536, 1), 1),
    Layout("axis2-C5", (4, 8, 5, 256), 2),
]
THREAD_COUNTS = [2, 3, 7]  # 3 and 7 oversubscribe this 2-core machine: a different tree cut


def everything(case):
    """Every kernel's results on one case, as a dict of arrays."""
    x, dy, g, b, axis = case.x, case.dy, case.gamma, case.beta, case.axis
    rm, rv = case.running_mean.copy(), case.running_var.copy()
    y, mean, invstd = bk.batch_norm_forward(x, g, b, running_mean=rm, running_var=rv, axis=axis)
    dx, dgamma, dbeta = bk.batch_norm_backward(dy, x, mean, invstd, g, axis=axis)
    dxf, dgammaf, dbetaf = bk.batch_norm_backward(dy, x, mean, invstd, g, training=False, axis=axis)
    yi, _, _ = bk.batch_norm_forward(
        x,
        g,
        b,
        running_mean=case.running_mean,
        running_var=case.running_var,
        training=False,
        axis=axis,
    )
    count, cmean, m2 = bk.channel_stats(x, axis=axis)
    sdy, sdyx = bk.backward_reduce(dy, x, mean, invstd, axis=axis)
    dxe = bk.backward_elementwise(dy, x, mean, invstd, g, sdy, sdyx, count, axis=axis)
    yn = bk.normalize(x, mean, invstd, g, b, axis=axis)
    return dict(
        y=y,
        mean=mean,
        invstd=invstd,
        running_mean=rm,
        running_var=rv,
        dx=dx,
        dgamma=dgamma,
        dbeta=dbeta,
        dx_frozen=dxf,
        dgamma_frozen=dgammaf,
        dbeta_frozen=dbetaf,
        y_infer=yi,
        stats_mean=cmean,
        stats_m2=m2,
        sum_dy=sdy,
        sum_dy_xhat=sdyx,
        dx_elementwise=dxe,
        y_normalize=yn,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", [pytest.param(lay, id=lay.name) for lay in BIG])
def test_results_do_not_depend_on_the_thread_count(layout, dtype, restore_threads):
    case = make_case(layout, dtype)
    assert case.x.size >= PARALLEL_MIN
    bk.set_num_threads(1)
    assert bk.get_num_threads() == 1
    one = everything(case)
    for n in THREAD_COUNTS:
        bk.set_num_threads(n)
        assert bk.get_num_threads() == n
        many = everything(case)
        for name, a in one.items():
            assert np.array_equal(a, many[name]), f"{name} differs between 1 and {n} threads"
    # and the common result is right (so the test cannot pass on an equally wrong answer)
    y_ref, mean_ref, invstd_ref = ref.forward_train(case.x, case.gamma, case.beta, 1e-5, case.axis)
    assert_close(one["y"], y_ref, case.tol)
    assert_close(one["mean"], mean_ref, 1e-12, scale=float(np.abs(case.x).max()))
    assert_close(one["invstd"], invstd_ref, 1e-12)


def test_concurrent_calls_from_python_threads(restore_threads):
    """The kernels release the GIL; concurrent calls from several Python threads are each right
    (and bit-identical to the serial results)."""
    cases = [make_case(lay, np.float32) for lay in BIG[:4]]
    serial = [everything(c) for c in cases]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(everything, cases * 2))
    for i, res in enumerate(results):
        for name, a in serial[i % len(cases)].items():
            assert np.array_equal(a, res[name]), name


# ---- thread control -----------------------------------------------------------------------------


def test_set_and_get_num_threads(restore_threads):
    default = bk.get_num_threads()
    assert isinstance(default, int) and default >= 1
    for n in (1, 2, 5):
        bk.set_num_threads(n)
        assert bk.get_num_threads() == n
    bk.set_num_threads(None)
    assert bk.get_num_threads() == default
    bk.set_num_threads(3)
    bk.set_num_threads(0)  # 0 is the same as None
    assert bk.get_num_threads() == default


def test_num_threads_applies_to_every_calling_thread(restore_threads):
    bk.set_num_threads(3)
    seen = []
    t = threading.Thread(target=lambda: seen.append(bk.get_num_threads()))
    t.start()
    t.join()
    assert seen == [3]


@pytest.mark.parametrize(
    "bad", [-1, 1.5, "2", True, [2]], ids=["negative", "float", "str", "bool", "list"]
)
def test_set_num_threads_invalid(bad, restore_threads):
    bk.set_num_threads(2)
    with pytest.raises(ValueError, match=r"^n: expected an int >= 0 or None"):
        bk.set_num_threads(bad)
    assert bk.get_num_threads() == 2  # unchanged


def test_threadpoolctl_sees_and_limits_openmp(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not bk._core.have_openmp:
        pytest.skip("built without OpenMP")
    info = threadpoolctl.threadpool_info()
    assert any(lib["user_api"] == "openmp" for lib in info), info
    bk.set_num_threads(None)
    default = bk.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1):
        assert bk.get_num_threads() == 1
        # an explicit count wins over the OpenMP limit
        bk.set_num_threads(2)
        assert bk.get_num_threads() == 2
        bk.set_num_threads(None)
        assert bk.get_num_threads() == 1
        # and results under the limit are those of any other thread count
        case = make_case(BIG[0], np.float64)
        limited = everything(case)
    assert bk.get_num_threads() == default
    unlimited = everything(case)
    for name, a in limited.items():
        assert np.array_equal(a, unlimited[name]), name


def test_threadpoolctl_lists_the_openmp_that_bnkernel_loads():
    """In a fresh interpreter: the OpenMP runtime appears in threadpool_info() with bnkernel."""
    pytest.importorskip("threadpoolctl")
    if not bk._core.have_openmp:
        pytest.skip("built without OpenMP")
    code = (
        "import numpy, threadpoolctl\n"
        "def omp(): return sorted(l['filepath'] for l in threadpoolctl.threadpool_info() "
        "if l['user_api'] == 'openmp')\n"
        "before = omp()\n"
        "import bnkernel\n"
        "print(repr((before, omp())))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = ast.literal_eval(run.stdout)
    assert after, "no OpenMP runtime visible to threadpoolctl after importing bnkernel"
    assert set(before) <= set(after)


@pytest.mark.parametrize("value", ["1", "3"])
def test_omp_num_threads_sets_the_default(value):
    """OMP_NUM_THREADS, read by OpenMP at start-up, is the default thread count."""
    if not bk._core.have_openmp:
        pytest.skip("built without OpenMP")
    env = {**os.environ, "OMP_NUM_THREADS": value}
    code = "import bnkernel; print(bnkernel.get_num_threads())"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert run.stdout.strip() == value
