"""Memory: no leaks, and no allocation in the kernels once warm.

* Resident memory stays flat over 10**5 calls of each op (no leak in the bindings, the fast path
  or the kernels: every buffer a call allocates is freed when it returns).  The calls are small, so
  the 10**5 of them take well under a second per op; the first 2000 are a warm-up (allocator pools,
  OpenMP's thread stacks), then the resident set may not grow by more than 4 MiB (a leak of even 40
  bytes a call would be 4 MB).  Likewise over threads that each run a kernel once and exit (each
  thread's kernel workspace is freed with it).
* The kernels allocate nothing once a thread has run a call of that shape (their scratch comes
  from a per-thread workspace, csrc/bnkernel/runtime/workspace.hpp): every malloc made by any
  thread while a kernel call runs is counted by a library preloaded into a fresh process
  (tests/malloc_counter.c, tests/kernel_allocations.py), over every layout, dtype and op.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import bnkernel as bk
from bnkernel import _core

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


@pytest.mark.slow
def test_resident_memory_is_flat_over_threads():
    """Each of 3000 threads runs a forward and a backward of 256 channels once and exits: its
    kernel workspace (some KiB: the per-channel coefficients and sums, the trees' accumulators)
    is freed with it, so 3000 of them left behind would be tens of MiB."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 256, 3, 3))  # one kernel thread: no OpenMP pool per thread
    dy = rng.standard_normal(x.shape)
    out = np.empty_like(x)

    def step() -> None:
        _, mean, invstd = bk.batch_norm_forward(x, out=out)
        bk.batch_norm_backward(dy, x, mean, invstd, out=out)

    def in_a_thread() -> None:
        t = threading.Thread(target=step)
        t.start()
        t.join()

    for _ in range(200):
        in_a_thread()
    before = rss()
    for _ in range(3000):
        in_a_thread()
    grown = rss() - before
    assert grown <= ALLOWED, f"resident memory grew {grown / 2**20:.1f} MiB over 3000 threads"


# ---- no allocation in the kernels once warm ------------------------------------------------------

HERE = Path(__file__).resolve().parent


def _malloc_counter(tmp_path: Path) -> tuple[Path | None, str]:
    """The malloc counter built into tmp_path, or None and why not."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None, "the malloc counter needs Linux with glibc"
    if _core.sanitized:
        return None, "a sanitizer build: ASan's allocator cannot be interposed"
    cc = shlex.split(sysconfig.get_config_var("CC") or "")[:1]
    if not cc or not shutil.which(cc[0]):
        cc = [next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), "")]
    if not cc[0]:
        return None, "no C compiler to build the malloc counter"
    lib = tmp_path / "malloc_counter.so"
    subprocess.run([*cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(HERE / "malloc_counter.c")],
                   check=True, capture_output=True)  # fmt: skip
    return lib, ""


def test_kernels_allocate_nothing_once_warm(tmp_path):
    """Every op (forward, inference, backward train/frozen, the split phases, relu+residual, masks)
    with its outputs given, on every layout of the kernel tests plus the short-run, windowed and
    streamed shapes, every dtype, one and two threads: after two warm-up calls, three more calls
    make no heap allocation at all while a kernel runs (any thread: the kernels' own scratch, C++'s
    operator new, the OpenMP runtime's teams) and the workspaces do not grow.  The counters must
    have seen the first calls' allocations, so one that is not wired up cannot pass."""
    lib, why_not = _malloc_counter(tmp_path)
    env = dict(os.environ)
    if lib is not None:
        env["LD_PRELOAD"] = f"{lib} {env.get('LD_PRELOAD', '')}".strip()
        env["MALLOC_COUNTER"] = str(lib)
    proc = subprocess.run([sys.executable, str(HERE / "kernel_allocations.py")], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    total = rows.pop()["total"]
    assert len(rows) > 2000, len(rows)  # every (layout, dtype, threads, op) reported
    assert {r["dtype"] for r in rows} >= {"float32", "float64", "float16"}
    grew = [r for r in rows if r["workspace"] != 0]
    assert not grew, f"{len(grew)} warm calls grew a workspace, e.g. {grew[:5]}"
    assert total["workspace"] > 0  # the first calls did allocate their workspaces
    if lib is None:
        pytest.skip(f"the workspaces were checked, the mallocs not counted: {why_not}")
    allocating = [r for r in rows if r["malloc"] != 0]
    assert not allocating, f"{len(allocating)} warm calls allocated, e.g. {allocating[:5]}"
    # every workspace allocation is made inside a kernel call, so the counter saw at least those
    assert total["malloc"] >= total["workspace"] > 0, total
