"""Counts the heap allocations of the kernel calls; run by tests/test_memory.py in a fresh process.

For every layout of conftest.LAYOUTS (plus the shapes that take the other code paths: the short-run
columns, more than 2048 interleaved channels, streamed outputs), every data dtype, one and two
threads, it runs every op with its outputs given (``out=``) twice to warm up, then three more
times, and prints one JSON line per (layout, dtype, threads, op) with the allocations of those
last three runs:

* ``workspace``: the growth of the kernels' per-thread workspaces (``_core.workspace_allocations``);
* ``malloc``: every malloc-family call made while a kernel call ran, by any thread, when the process
  was started with ``LD_PRELOAD`` of the malloc counter (tests/malloc_counter.c) and its path in
  ``MALLOC_COUNTER``; else null.

A last line ``{"total": ...}`` gives both counters over the whole run, warm-ups included (the
caller checks that they saw the warm-up allocations at all, so that a counter that is not wired up
cannot pass as "nothing allocated").
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import bnkernel as bk
from bnkernel import _core

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import LAYOUTS, Layout, make_case

WARMUP = 2
RUNS = 3

EXTRA_LAYOUTS = [
    Layout("short-runs-NCHW", (8, 12, 7, 7), 1),  # planar runs < 256 values: the column pattern
    Layout("windows-NC-C5000", (40, 5000), 1),  # interleaved, C > 2048: windows of columns
    Layout("streamed-NCHW", (16, 64, 64, 64), 1),  # >= 16 MiB of float32: streamed stores
    Layout("streamed-NHWC", (16, 64, 64, 64), -1),
]


def data_dtypes() -> list[np.dtype[Any]]:
    dtypes = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)]
    try:
        import ml_dtypes

        dtypes.append(np.dtype(ml_dtypes.bfloat16))
    except ImportError:
        pass
    return dtypes


def malloc_counter() -> Callable[[], int] | None:
    path = os.environ.get("MALLOC_COUNTER")
    if not path:
        return None
    fn = ctypes.CDLL(path).malloc_counter_allocations
    fn.restype = ctypes.c_long
    return lambda: int(fn())


def ops(layout: Layout, dtype: np.dtype[Any]) -> dict[str, Callable[[], Any]]:
    case = make_case(layout, np.float64)
    axis = layout.axis
    pdt = np.float32 if dtype.itemsize == 2 else dtype  # the parameters' dtype
    x, dy = case.x.astype(dtype), case.dy.astype(dtype)
    residual = case.dy[::-1].astype(dtype)
    g, b = case.gamma.astype(pdt), case.beta.astype(pdt)
    rm, rv = case.running_mean.astype(pdt), case.running_var.astype(pdt)
    out, dx, y_relu, dres = (np.empty_like(x) for _ in range(4))
    _, mean, invstd = bk.batch_norm_forward(x, g, b, axis=axis)
    bk.batch_norm_forward(x, g, b, axis=axis, activation="relu", residual=residual, out=y_relu)
    sdy, sdyx = bk.backward_reduce(dy, x, mean, invstd, axis=axis)
    count = layout.count
    shape_wo_c = [n for i, n in enumerate(layout.shape) if i != layout.ax]
    mask = np.random.default_rng(1).random(shape_wo_c) < 0.7
    mask.flat[0] = True
    return {
        "forward": lambda: bk.batch_norm_forward(x, g, b, axis=axis, running_mean=rm,
                                                  running_var=rv, out=out),
        "forward relu+residual": lambda: bk.batch_norm_forward(
            x, g, b, axis=axis, activation="relu", residual=residual, out=out),
        "inference": lambda: bk.batch_norm_forward(x, g, b, axis=axis, running_mean=rm,
                                                    running_var=rv, training=False, out=out),
        "backward": lambda: bk.batch_norm_backward(dy, x, mean, invstd, g, axis=axis, out=dx),
        "backward frozen": lambda: bk.batch_norm_backward(dy, x, mean, invstd, g, axis=axis,
                                                          training=False, out=dx),
        "backward relu+residual": lambda: bk.batch_norm_backward(
            dy, x, mean, invstd, g, axis=axis, activation="relu", y=y_relu, residual_grad=True,
            out=dx),
        "channel_stats": lambda: bk.channel_stats(x, axis=axis),
        "normalize": lambda: bk.normalize(x, mean, invstd, g, b, axis=axis, out=out),
        "backward_reduce": lambda: bk.backward_reduce(dy, x, mean, invstd, axis=axis, y=y_relu,
                                                      dresidual=dres),
        "backward_elementwise": lambda: bk.backward_elementwise(dy, x, mean, invstd, g, sdy, sdyx,
                                                                count, axis=axis, out=dx),
        "masked channel_stats": lambda: bk.channel_stats(x, axis=axis, mask=mask),
        "masked backward_elementwise": lambda: bk.backward_elementwise(
            dy, x, mean, invstd, g, sdy, sdyx, count, axis=axis, mask=mask, out=dx),
    }  # fmt: skip


def main() -> None:
    mallocs = malloc_counter()
    for layout in LAYOUTS + EXTRA_LAYOUTS:
        streamed = layout.name.startswith("streamed")
        for dtype in data_dtypes():
            if streamed and dtype.itemsize == 8:
                continue  # float32 and the 16-bit types cover the streamed paths (and are 16 MiB)
            table = ops(layout, dtype)
            for threads in (1, 2):
                bk.set_num_threads(threads)
                for name, fn in table.items():
                    for _ in range(WARMUP):
                        fn()
                    w0, m0 = _core.workspace_allocations(), mallocs() if mallocs else None
                    for _ in range(RUNS):
                        fn()
                    row = {
                        "layout": layout.name, "dtype": dtype.name, "threads": threads, "op": name,
                        "workspace": _core.workspace_allocations() - w0,
                        "malloc": mallocs() - m0 if mallocs and m0 is not None else None,
                    }  # fmt: skip
                    print(json.dumps(row))
    print(json.dumps({"total": {"workspace": _core.workspace_allocations(),
                                "malloc": mallocs() if mallocs else None}}))  # fmt: skip


if __name__ == "__main__":
    main()
