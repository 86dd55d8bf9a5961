"""Many Python threads at once: the kernels release the GIL, so these calls really overlap.  Each
thread's results must equal the serial ones bit for bit (the kernels keep no state between calls;
OpenMP teams are per calling thread), on different inputs and on one shared read-only input.  A
layer holds one training step's state, so a second thread entering it raises."""

from __future__ import annotations

import copy
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import bnkernel as bk

THREADS = 8
ml_dtypes = pytest.importorskip("ml_dtypes")

# (shape, axis, dtype): planar and interleaved, float32/64 and 16-bit, with and without a mask
JOBS = [
    ((8, 16, 32, 32), 1, np.float32, False),
    ((8, 32, 32, 16), -1, np.float64, False),
    ((4096, 24), 1, np.float32, True),
    ((8, 16, 32, 32), 1, np.float16, False),
    ((16, 64, 64), -1, ml_dtypes.bfloat16, True),
    ((6, 5, 7), 1, np.float64, True),
]


def step(x, dy, axis, mask, out_y=None, out_dx=None):
    """A full training step's kernels, fused and split, as bytes for bit-exact comparison."""
    C = x.shape[axis]
    P = np.float32 if x.dtype.itemsize == 2 else x.dtype
    g = np.linspace(0.5, 1.5, C).astype(P)
    b = np.linspace(-1, 1, C).astype(P)
    rm, rv = np.zeros(C, P), np.ones(C, P)
    y, mean, invstd = bk.batch_norm_forward(
        x, g, b, running_mean=rm, running_var=rv, axis=axis, mask=mask, out=out_y
    )
    dx, dg, db = bk.batch_norm_backward(dy, x, mean, invstd, g, axis=axis, mask=mask, out=out_dx)
    _, mu, m2 = bk.channel_stats(x, axis=axis)
    yr, _, _ = bk.batch_norm_forward(x, g, b, axis=axis, activation="relu", residual=dy)
    return [a.tobytes() for a in (y, mean, invstd, dx, dg, db, rm, rv, mu, m2, yr)]


def inputs(i):
    shape, axis, dtype, masked = JOBS[i % len(JOBS)]
    rng = np.random.default_rng(i)
    x = (rng.standard_normal(shape) * 2 + i).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    mask = None
    if masked:
        ax = axis % len(shape)
        mask = rng.random(shape[:ax] + shape[ax + 1 :]) < 0.8
    return x, dy, axis, mask


def test_threads_on_different_inputs_match_serial_runs():
    jobs = [inputs(i) for i in range(3 * len(JOBS))]
    serial = [step(*job) for job in jobs]
    barrier = threading.Barrier(THREADS)

    def run(i):
        if i < THREADS:
            barrier.wait()  # start the first wave together
        return step(*jobs[i])

    with ThreadPoolExecutor(THREADS) as pool:
        parallel = list(pool.map(run, range(len(jobs))))
    for i, (a, b) in enumerate(zip(serial, parallel, strict=True)):
        assert a == b, f"job {i} differs from its serial run"


@pytest.mark.parametrize("job", range(len(JOBS)))
def test_threads_sharing_one_read_only_input(job):
    x, dy, axis, mask = inputs(job)
    x.flags.writeable = False
    dy.flags.writeable = False
    want = step(x, dy, axis, mask)
    outs = [(np.empty_like(x), np.empty_like(x)) for _ in range(THREADS)]
    barrier = threading.Barrier(THREADS)

    def run(k):
        barrier.wait()
        return [step(x, dy, axis, mask, *outs[k]) for _ in range(3)]

    with ThreadPoolExecutor(THREADS) as pool:
        for results in pool.map(run, range(THREADS)):
            assert all(r == want for r in results)


def test_thread_count_setting_from_many_threads(restore_threads):
    """set_num_threads is process-wide; changing it while other threads compute changes how many
    OpenMP threads their next call uses, never what it computes."""
    x, dy, axis, mask = inputs(0)
    want = step(x, dy, axis, mask)
    stop = threading.Event()

    def flip():
        n = 1
        while not stop.is_set():
            bk.set_num_threads(n)
            n = 3 - n

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: step(x, dy, axis, mask), range(12)))
    finally:
        stop.set()
        flipper.join()
    assert all(r == want for r in results)


def test_a_layer_in_use_by_another_thread_raises():
    layer = bk.BatchNorm(4, axis=-1)
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    entered = threading.Event()
    release = threading.Event()
    real_check = layer._check_input

    def slow_check(xa):  # holds the first call inside forward until the second has tried
        entered.set()
        release.wait(10)
        return real_check(xa)

    layer._check_input = slow_check  # type: ignore[method-assign]
    first = threading.Thread(target=layer.forward, args=(x,))
    first.start()
    try:
        assert entered.wait(10)
        with pytest.raises(RuntimeError, match=r"^BatchNorm.forward: the layer is in use by"):
            layer.forward(x)
        with pytest.raises(RuntimeError, match=r"^BatchNorm.backward: the layer is in use by"):
            layer.backward(x)
    finally:
        release.set()
        first.join()
    del layer._check_input
    layer.backward(np.ones_like(x))  # free again, and the first call's step is intact
    assert layer.num_batches_tracked == 1


def test_layers_copy_and_pickle():
    """The lock is not part of a layer's state: copies and pickles get their own."""
    layer = bk.BatchNorm(3)
    layer.forward(np.arange(12, dtype=np.float32).reshape(4, 3))
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other._busy is not layer._busy
        np.testing.assert_array_equal(other.running_var, layer.running_var)
        other.forward(np.ones((4, 3), np.float32))
