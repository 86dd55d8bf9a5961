# Stub for the CUDA module (csrc/cuda/bindings.cpp), present only in a build with
# -Ccmake.define.BNKERNEL_CUDA=ON.  Raw kernels on device addresses (ints: what
# __cuda_array_interface__ and DLPack give; 0 for an absent optional array; C-contiguous
# (outer, channels, inner) arrays, a mask (outer, inner) bytes), launched on `stream` (a handle; 0:
# the legacy default stream) on `device` (-1: the current one), never synchronizing.  dtype:
# "float32", "float64", "float16" or "bfloat16"; param_dtype: "float32" or "float64" (ValueError
# otherwise, and for negative sizes); RuntimeError for a CUDA error.  bnkernel._device.Kernels is
# the checked way in (the public functions on CuPy arrays).
from typing import TypedDict

class _Device(TypedDict):
    index: int
    name: str
    compute_capability: tuple[int, int]
    memory: int
    multiprocessors: int

class _Info(TypedDict):
    runtime_version: int
    driver_version: int
    error: str | None
    devices: list[_Device]

def info() -> _Info: ...
def stats_parts(outer: int, channels: int, inner: int) -> int: ...
def channel_stats(
    dtype: str,
    x: int,
    outer: int,
    channels: int,
    inner: int,
    mean: int,
    m2: int,
    workspace: int,
    mask: int = 0,
    stream: int = 0,
    device: int = -1,
) -> None: ...
def finish_stats(
    param_dtype: str,
    channels: int,
    count: int,
    mean: int,
    m2: int,
    eps: float,
    invstd: int,
    running_mean: int = 0,
    running_var: int = 0,
    momentum: float = 0.0,
    unbiased: bool = True,
    stream: int = 0,
    device: int = -1,
) -> None: ...
def running_coefficients(
    param_dtype: str,
    channels: int,
    running_mean: int,
    running_var: int,
    eps: float,
    mean: int,
    invstd: int,
    stream: int = 0,
    device: int = -1,
) -> None: ...
def channel_sums(
    dtype: str,
    dy: int,
    x: int,
    outer: int,
    channels: int,
    inner: int,
    mean: int,
    invstd: int,
    sum_dy: int,
    sum_dy_xhat: int,
    workspace: int,
    y: int = 0,
    mask: int = 0,
    dresidual: int = 0,
    dgamma: int = 0,
    dbeta: int = 0,
    stream: int = 0,
    device: int = -1,
) -> None: ...
def backward_dx(
    dtype: str,
    training: bool,
    dy: int,
    x: int,
    outer: int,
    channels: int,
    inner: int,
    count: int,
    mean: int,
    invstd: int,
    gamma: int,
    sum_dy: int,
    sum_dy_xhat: int,
    dx: int,
    y: int = 0,
    mask: int = 0,
    stream: int = 0,
    device: int = -1,
) -> None: ...
def normalize(
    dtype: str,
    x: int,
    outer: int,
    channels: int,
    inner: int,
    mean: int,
    invstd: int,
    gamma: int,
    beta: int,
    y: int,
    residual: int = 0,
    relu: bool = False,
    stream: int = 0,
    device: int = -1,
) -> None: ...
