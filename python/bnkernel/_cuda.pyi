# Stub for the CUDA module (csrc/cuda/bindings.cpp), present only in a build with
# -Ccmake.define.BNKERNEL_CUDA=ON.  Raw kernels on device addresses (ints: what
# __cuda_array_interface__ and DLPack give; C-contiguous (outer, channels, inner) arrays), launched
# on `stream` (a handle; 0: the legacy default stream), never synchronizing.  dtype: "float32" or
# "float64" (ValueError otherwise, and for negative sizes); RuntimeError for a CUDA error.
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
    stream: int = 0,
) -> None: ...
def channel_sums(
    dtype: str,
    dy: int,
    x: int,
    outer: int,
    channels: int,
    inner: int,
    mean: int,
    sum_dy: int,
    sum_dy_xmu: int,
    workspace: int,
    stream: int = 0,
) -> None: ...
def backward_dx(
    dtype: str,
    training: bool,
    dy: int,
    x: int,
    outer: int,
    channels: int,
    inner: int,
    mean: int,
    invstd: int,
    gamma: int,
    sum_dy: int,
    sum_dy_xmu: int,
    dx: int,
    stream: int = 0,
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
    stream: int = 0,
) -> None: ...
