# Stub for the compiled module (csrc/bindings.cpp).  Each kernel is bound once per data dtype
# (float32, float64, float16, ml_dtypes.bfloat16; the parameters of the 16-bit ones are float32);
# arrays are taken exactly as given (C-contiguous, no conversion: TypeError otherwise).  ValueError
# naming the argument for a shape that does not fit x's (outer, C, inner) view, a read-only
# output, or an array not aligned to its element size.  merge_stats: OverflowError when the
# total count does not fit in int64.
from typing import Any

import numpy as np
from numpy.typing import NDArray

_F = NDArray[Any]
_D = NDArray[np.float64]

have_openmp: bool
max_threads: int  # set_num_threads refuses more; larger OpenMP settings are clamped
isa: str
version: str
native_build: bool
# the rules the fast path re-checks, by name (the keys of bnkernel._checks.FAST_PATH_RULES)
fast_path_rules: tuple[str, ...]
sanitized: bool

def channel_stats(x: _F, mean: _D, m2: _D) -> None: ...
def masked_channel_stats(x: _F, mask: NDArray[np.uint8], mean: _D, m2: _D) -> int: ...
def merge_stats(counts: NDArray[np.int64], means: _D, m2s: _D, mean: _D, m2: _D) -> int: ...

# running_mean / running_var: float32 or float64, one dtype (the fused forward's update, alone)
def update_running_stats(
    running_mean: _F | None,
    running_var: _F | None,
    count: int,
    mean: _D,
    m2: _D,
    momentum: float,
    unbiased: bool,
) -> None: ...
def normalize(
    x: _F,
    mean: _D,
    invstd: _D,
    gamma: _F | None,
    beta: _F | None,
    out: _F,
    residual: _F | None = None,
    relu: bool = False,
) -> None: ...
def forward_train(
    x: _F,
    gamma: _F | None,
    beta: _F | None,
    eps: float,
    out: _F,
    mean: _D,
    invstd: _D,
    running_mean: _F | None,
    running_var: _F | None,
    momentum: float,
    unbiased: bool,
    residual: _F | None = None,
    relu: bool = False,
) -> None: ...
def backward_reduce(
    dy: _F,
    x: _F,
    mean: _D,
    invstd: _D,
    sum_dy: _D,
    sum_dy_xhat: _D,
    y: _F | None = None,
    dresidual: _F | None = None,
) -> None: ...
def backward_elementwise(
    dy: _F,
    x: _F,
    mean: _D,
    invstd: _D,
    gamma: _F | None,
    sum_dy: _D,
    sum_dy_xhat: _D,
    count: int,
    out: _F,
    y: _F | None = None,
    mask: NDArray[np.uint8] | None = None,
) -> None: ...
def backward(
    training: bool,
    dy: _F,
    x: _F,
    mean: _D,
    invstd: _D,
    gamma: _F | None,
    out: _F,
    dgamma: _F,
    dbeta: _F,
    y: _F | None = None,
    dresidual: _F | None = None,
) -> None: ...

# kind: "copy" (dst = src), "read" (returns a sum of src's bytes: a value, so nothing is skipped) or
# "write" (dst = 0), on the kernels' threads and store policy: the benchmarks' bandwidth bound
def memory_pass(kind: str, src: _F, dst: _F) -> float: ...
def set_num_threads(n: int) -> None: ...  # ValueError above max_threads
def get_num_threads() -> int: ...  # at most max_threads; 1 in a forked child

# Heap allocations the kernels' per-thread workspaces have made so far, every thread together
# (csrc/bnkernel/runtime/workspace.hpp); for the tests.
def workspace_allocations() -> int: ...

# The per-call fast path (csrc/fastpath.cpp): the public functions' arguments as given; the
# results for the plain case, None for anything else (the caller then checks and raises).
def forward_fast(
    x: object,
    gamma: object,
    beta: object,
    running_mean: object,
    running_var: object,
    training: object,
    momentum: object,
    eps: object,
    axis: object,
    running_var_unbiased: object,
    out: object,
    /,
) -> tuple[_F, _D, _D] | None: ...
def backward_fast(
    dy: object,
    x: object,
    mean: object,
    invstd: object,
    gamma: object,
    training: object,
    axis: object,
    out: object,
    /,
) -> tuple[_F, _F, _F] | None: ...
