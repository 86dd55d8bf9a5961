"""Resident memory stays flat over 10**5 calls of each op (no leak in the bindings, the fast path
or the kernels: every buffer a call allocates is freed when it returns).  The calls are small, so
the 10**5 of them take well under a second per op; the first 2000 are a warm-up (allocator pools,
OpenMP's thread stacks), then the resident set may not grow by more than 4 MiB (a leak of even 40
bytes a call would be 4 MB)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import bnkernel as bk

CALLS = 100_000
WARMUP = 2_000
ALLOWED = 4 << 20  # bytes


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ops() -> dict[str, Callable[[], Any]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    xh = x.astype(np.float16)
    g = np.ones(8, np.float32)
    b = np.zeros(8, np.float32)
    rm, rv = np.zeros(8, np.float32), np.ones(8, np.float32)
    out = np.empty_like(x)
    y, mean, invstd = bk.batch_norm_forward(x, g, b)
    sdy, sdyx = bk.backward_reduce(dy, x, mean, invstd)
    mask = rng.random((16, 5)) < 0.7
    layer = bk.BatchNorm(8)
    return {
        "forward (fast path)": lambda: bk.batch_norm_forward(x, g, b, running_mean=rm,
                                                              running_var=rv, out=out),
        "forward (checked path, relu)": lambda: bk.batch_norm_forward(x, g, b, activation="relu"),
        "inference": lambda: bk.batch_norm_forward(x, g, b, running_mean=rm, running_var=rv,
                                                    training=False),
        "backward (fast path)": lambda: bk.batch_norm_backward(dy, x, mean, invstd, g, out=out),
        "backward (relu, residual grad)": lambda: bk.batch_norm_backward(
            dy, x, mean, invstd, g, activation="relu", y=y, residual_grad=True),
        "split phases": lambda: (
            bk.channel_stats(x), bk.normalize(x, mean, invstd, g, b, out=out),
            bk.backward_reduce(dy, x, mean, invstd),
            bk.backward_elementwise(dy, x, mean, invstd, g, sdy, sdyx, 80, out=out)),
        "masked": lambda: (bk.batch_norm_forward(x, mask=mask),
                           bk.batch_norm_backward(dy, x, mean, invstd, mask=mask)),
        "float16": lambda: bk.batch_norm_forward(xh, g, b),
        "merge_stats": lambda: bk.merge_stats((3, mean, sdy), (4, mean, sdy)),
        "layer": lambda: (layer.forward(x), layer.backward(dy)),
        "an error": lambda: _raises(lambda: bk.batch_norm_forward(x, np.ones(3, np.float32))),
    }  # fmt: skip


def _raises(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except (TypeError, ValueError):
        return
    raise AssertionError("expected an error")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ops()))
def test_resident_memory_is_flat(name):
    fn = ops()[name]
    for _ in range(WARMUP):
        fn()
    before = rss()
    for _ in range(CALLS):
        fn()
    grown = rss() - before
    assert grown <= ALLOWED, f"{name}: resident memory grew {grown / 2**20:.1f} MiB over {CALLS}"
