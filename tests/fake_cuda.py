"""Stand-ins for CuPy and bnkernel._cuda in host memory, so that bnkernel's device layer (the
placement rules, zero-copy views, CuPy allocations, streams, which kernel gets which array) is
tested on every machine, GPU or not.

* :class:`FakeCupy` is the part of CuPy's API that bnkernel uses: ``ndarray`` (a device array:
  host memory behind it, on a numbered "device", with ``__cuda_array_interface__``; like CuPy's it
  refuses an implicit conversion to NumPy, and each read of a value back to the host is counted as
  a synchronization), ``empty`` / ``asarray`` / ``ascontiguousarray`` / ``from_dlpack`` /
  ``asnumpy`` / ``zeros`` / ``ones``, ``cuda.Device`` and ``cuda.get_current_stream``.
* :class:`FakeKernels` is bnkernel._cuda with the same signatures, each kernel written again in
  float64 NumPy from its specification (csrc/cuda/api.hpp) on the memory behind the addresses, and
  each launch recorded (its stream and device).

tests/test_device.py runs the same tests on these and, where there is a GPU, on CuPy itself and
the real kernels: those runs check the kernels against the specification these follow.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np

# ---- CuPy ----------------------------------------------------------------------------------------


class _Ptr:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class _DeviceId:
    def __init__(self, i: int) -> None:
        self.id = i


class _Flags:
    def __init__(self, a: np.ndarray) -> None:
        self.c_contiguous = bool(a.flags.c_contiguous)
        self.f_contiguous = bool(a.flags.f_contiguous)


class FakeArray:
    """A device array: a NumPy array (its memory stands for device memory) on device `device`."""

    def __init__(self, host: np.ndarray, device: int, module: FakeCupy) -> None:
        self._a = host
        self._device = device
        self._cp = module

    # what bnkernel reads
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    flags = property(lambda self: _Flags(self._a))
    data = property(lambda self: _Ptr(self._a.__array_interface__["data"][0]))
    device = property(lambda self: _DeviceId(self._device))

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        a = self._a
        return {
            "shape": a.shape,
            "typestr": a.dtype.str,
            "data": (a.__array_interface__["data"][0], False),
            "strides": None if a.flags.c_contiguous else a.strides,
            "version": 3,
        }

    def _wrap(self, a: Any) -> Any:
        return FakeArray(a, self._device, self._cp) if isinstance(a, np.ndarray) else a

    def _launch(self) -> None:
        """What CuPy checks before running a kernel on this array: it must be on the current
        device."""
        if self._device != self._cp.current_device:
            raise ValueError(
                f"Array device must be same as the current device: array device = "
                f"{self._device} while current = {self._cp.current_device}"
            )

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
            "construct a NumPy array explicitly."
        )

    def get(self) -> np.ndarray:
        self._cp.syncs += 1
        return self._a.copy()

    def set(self, host: np.ndarray) -> None:
        """Host to device, as CuPy's ndarray.set (same shape and dtype)."""
        if not isinstance(host, np.ndarray) or host.shape != self.shape or host.dtype != self.dtype:
            raise ValueError("set: expected a NumPy array of the same shape and dtype")
        self._a[...] = host

    def _scalar(self) -> Any:
        self._cp.syncs += 1
        return self._a.item()

    def __int__(self) -> int:
        return int(self._scalar())

    def __float__(self) -> float:
        return float(self._scalar())

    def __bool__(self) -> bool:
        return bool(self._scalar())

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:
        return f"FakeArray({self._a!r}, device={self._device})"

    # views and copies on the device
    def reshape(self, *shape: Any) -> FakeArray:
        return self._wrap(self._a.reshape(*shape))

    def view(self, dtype: Any) -> FakeArray:
        return self._wrap(self._a.view(dtype))

    def astype(self, dtype: Any, copy: bool = True) -> FakeArray:
        self._launch()
        return self._wrap(self._a.astype(dtype, copy=copy))

    def copy(self) -> FakeArray:
        self._launch()
        return self._wrap(self._a.copy())

    def sum(self, *args: Any, **kwargs: Any) -> Any:
        self._launch()
        return self._wrap(np.asarray(self._a.sum(*args, **kwargs)))

    def mean(self, *args: Any, **kwargs: Any) -> Any:
        self._launch()
        return self._wrap(np.asarray(self._a.mean(*args, **kwargs)))

    def any(self) -> Any:
        self._launch()
        return self._wrap(np.asarray(self._a.any()))

    def __getitem__(self, key: Any) -> Any:
        return self._wrap(self._a[key])

    def __setitem__(self, key: Any, value: Any) -> None:
        self._launch()
        if isinstance(value, np.ndarray):
            raise TypeError("Unsupported type <class 'numpy.ndarray'>")  # as CuPy
        self._a[key] = _host(value)

    @property
    def T(self) -> FakeArray:
        return self._wrap(self._a.T)

    def _binary(self, other: Any, op: Any) -> FakeArray:
        if isinstance(other, np.ndarray):
            raise TypeError("Unsupported type <class 'numpy.ndarray'>")  # as CuPy
        self._launch()
        if isinstance(other, FakeArray):
            other._launch()
        return self._wrap(op(self._a, _host(other)))

    def __gt__(self, o: Any) -> FakeArray:
        return self._binary(o, np.greater)

    def __invert__(self) -> FakeArray:
        self._launch()
        return self._wrap(~self._a)

    def __add__(self, o: Any) -> FakeArray:
        return self._binary(o, np.add)

    def __radd__(self, o: Any) -> FakeArray:
        return self._binary(o, lambda a, b: np.add(b, a))

    def __sub__(self, o: Any) -> FakeArray:
        return self._binary(o, np.subtract)

    def __rsub__(self, o: Any) -> FakeArray:
        return self._binary(o, lambda a, b: np.subtract(b, a))

    def __mul__(self, o: Any) -> FakeArray:
        return self._binary(o, np.multiply)

    def __rmul__(self, o: Any) -> FakeArray:
        return self._binary(o, lambda a, b: np.multiply(b, a))

    def __truediv__(self, o: Any) -> FakeArray:
        return self._binary(o, np.true_divide)

    def __rtruediv__(self, o: Any) -> FakeArray:
        return self._binary(o, lambda a, b: np.true_divide(b, a))

    def __neg__(self) -> FakeArray:
        self._launch()
        return self._wrap(-self._a)


def _host(v: Any) -> Any:
    return v._a if isinstance(v, FakeArray) else v


class _Stream:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class _Cuda:
    """cupy.cuda: Device (a context manager making a device current) and the current stream."""

    def __init__(self, module: FakeCupy) -> None:
        self._cp = module

        class Device:
            def __init__(inner, device: int | None = None) -> None:
                inner.id = module.current_device if device is None else int(device)

            def __enter__(inner) -> Any:
                inner._saved = module.current_device
                if not 0 <= inner.id < module.device_count:
                    raise RuntimeError(f"cudaErrorInvalidDevice: no device {inner.id}")
                module.current_device = inner.id
                return inner

            def __exit__(inner, *exc: Any) -> None:
                module.current_device = inner._saved

        self.Device = Device

    def get_current_stream(self) -> _Stream:
        return _Stream(self._cp.streams[self._cp.current_device])

    class Event:
        """A CUDA event: the host clock when recorded (every fake launch is synchronous)."""

        def __init__(self) -> None:
            self.t = 0.0

        def record(self, stream: Any = None) -> None:
            self.t = time.perf_counter()

        def synchronize(self) -> None:
            pass

    @staticmethod
    def get_elapsed_time(start: Any, end: Any) -> float:
        return (end.t - start.t) * 1e3  # milliseconds, as CuPy's


class FakeCupy:
    """The part of CuPy bnkernel uses."""

    __name__ = "cupy"

    def __init__(self, device_count: int = 2) -> None:
        self.ndarray = FakeArray
        self.device_count = device_count
        self.current_device = 0
        self.syncs = 0  # values read back to the host
        self.allocations = 0
        # each device's current stream: a made-up handle, as CuPy's would be (never 0 here)
        self.streams = {d: 0x5000 + 16 * d for d in range(device_count)}
        self.cuda = _Cuda(self)

    def _new(self, a: np.ndarray) -> FakeArray:
        self.allocations += 1
        return FakeArray(a, self.current_device, self)

    def empty(self, shape: Any, dtype: Any = np.float64) -> FakeArray:
        # (garbage, as device memory would be: a NaN pattern, so an unwritten value shows)
        a = np.empty(shape, dtype)
        a.view(np.uint8)[...] = 0xFF
        return self._new(a)

    def zeros(self, shape: Any, dtype: Any = np.float64) -> FakeArray:
        return self._new(np.zeros(shape, dtype))

    def ones(self, shape: Any, dtype: Any = np.float64) -> FakeArray:
        return self._new(np.ones(shape, dtype))

    def asarray(self, a: Any, dtype: Any = None) -> FakeArray:
        if isinstance(a, FakeArray):
            return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
        iface = getattr(a, "__cuda_array_interface__", None)
        if iface is not None:  # another library's device array: a view, as CuPy's
            return _from_interface(iface, self)
        return self._new(np.array(a, dtype=dtype))  # host data: copied to the device

    def ascontiguousarray(self, a: FakeArray, dtype: Any = None) -> FakeArray:
        with self.cuda.Device(a._device):
            return self._new(np.ascontiguousarray(a._a, dtype=dtype))

    def from_dlpack(self, obj: Any) -> FakeArray:
        kind, dev = obj.__dlpack_device__()
        if int(kind) != 2:
            raise BufferError("from_dlpack: not a CUDA array")
        return FakeArray(np.from_dlpack(obj.host_exporter()), int(dev), self)

    def _elementwise(self, fn: Any, a: Any, *rest: Any) -> Any:
        if isinstance(a, FakeArray):
            a._launch()
            return FakeArray(fn(a._a, *rest), a._device, self)
        return fn(a, *rest)

    def sqrt(self, a: Any) -> Any:
        return self._elementwise(np.sqrt, a)

    def clip(self, a: Any, lo: Any, hi: Any) -> Any:
        return self._elementwise(np.clip, a, lo, hi)

    def any(self, a: Any) -> Any:
        return self._elementwise(lambda v: np.asarray(np.any(v)), a)

    def count_nonzero(self, a: FakeArray) -> FakeArray:
        return FakeArray(np.asarray(np.count_nonzero(a._a)), a._device, self)

    def asnumpy(self, a: Any) -> np.ndarray:
        return a.get() if isinstance(a, FakeArray) else np.asarray(a)


def _from_interface(iface: dict[str, Any], module: FakeCupy) -> FakeArray:
    """A view of the memory a __cuda_array_interface__ describes (host memory here)."""
    ptr, _ = iface["data"]
    dtype = np.dtype(iface["typestr"])
    shape = tuple(iface["shape"])
    strides = iface.get("strides")
    if strides is None:
        strides = tuple(int(s) for s in np.empty(shape, dtype).strides)
    span = (
        sum((n - 1) * abs(s) for n, s in zip(shape, strides, strict=True)) + dtype.itemsize
        if all(shape)
        else 0
    )
    buf = (ctypes.c_char * max(span, 1)).from_address(ptr) if ptr else bytearray(1)
    base = np.frombuffer(buf, np.uint8)
    a = np.ndarray(shape, dtype, buffer=base, offset=0, strides=strides)
    return FakeArray(a, module.current_device, module)


class TorchLikeCuda:
    """Another library's CUDA tensor (torch's, Numba's): only __cuda_array_interface__, over a
    fake CuPy array's memory."""

    def __init__(self, a: FakeArray, readonly: bool = False) -> None:
        self._owner = a
        iface = dict(a.__cuda_array_interface__)
        iface["data"] = (iface["data"][0], readonly)
        self.__cuda_array_interface__ = iface

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("can't convert cuda:0 device type tensor to numpy")


class DLPackCuda:
    """A DLPack exporter on a CUDA device (e.g. a JAX GPU array), over a fake CuPy array."""

    def __init__(self, a: FakeArray) -> None:
        self._owner = a

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, self._owner._device)

    def __dlpack__(self, **kwargs: Any) -> Any:
        raise BufferError("(the fake's data is reached through host_exporter)")

    def host_exporter(self) -> np.ndarray:
        return self._owner._a


# ---- bnkernel._cuda -----------------------------------------------------------------------------

_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


def _mem(ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """The array of `shape` and `dtype` at address ptr (C-contiguous)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    if ptr == 0:
        raise ValueError("a kernel read or wrote address 0")
    buf = (ctypes.c_char * max(n, 1)).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def _opt(ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray | None:
    return None if ptr == 0 else _mem(ptr, shape, dtype)


def _param(dtype: str) -> Any:
    return np.float32 if dtype in ("float16", "bfloat16") else _DTYPES[dtype]


def _relu(v: np.ndarray) -> np.ndarray:
    return np.where((v > 0) | np.isnan(v), v, 0.0)


class FakeKernels:
    """bnkernel._cuda's functions in float64 NumPy, from api.hpp's specification; every launch is
    appended to ``launches`` as (name, stream, device)."""

    __name__ = "bnkernel._cuda"

    def __init__(self) -> None:
        self.launches: list[tuple[str, int, int]] = []

    def _record(self, name: str, stream: int, device: int) -> None:
        self.launches.append((name, int(stream), int(device)))

    def info(self) -> dict[str, Any]:
        devices = [
            {"index": i, "name": f"Fake GPU {i}", "compute_capability": (9, 0),
             "memory": 1 << 30, "multiprocessors": 1}
            for i in range(2)
        ]  # fmt: skip
        return {"runtime_version": 13000, "driver_version": 13000, "error": None,
                "devices": devices}  # fmt: skip

    def stats_parts(self, outer: int, channels: int, inner: int) -> int:
        """kernels.cu's stats_parts (the workspaces' size depends on it)."""
        m = outer * inner
        tiles = (-(-channels // 32) if channels >= 32 else 1) if inner <= 1 else channels
        want = -(-2048 // max(tiles, 1))
        most = max(-(-m // 4096), 1)
        return int(min(max(min(want, most), 1), 1024))

    def channel_stats(self, dtype: str, x: int, outer: int, channels: int, inner: int,
                      mean: int, m2: int, workspace: int, mask: int = 0, stream: int = 0,
                      device: int = -1) -> None:  # fmt: skip
        self._record("channel_stats", stream, device)
        if channels == 0:
            return
        _mem(workspace, (3 * channels * self.stats_parts(outer, channels, inner),), np.float64)
        xs = _mem(x, (outer, channels, inner), _DTYPES[dtype]).astype(np.float64)
        valid = np.ones((outer, 1, inner), bool)
        if mask:
            valid = _mem(mask, (outer, inner), np.uint8).reshape(outer, 1, inner) != 0
        w = np.broadcast_to(valid, xs.shape)
        n = w.sum(axis=(0, 2))
        total = np.where(w, xs, 0.0).sum(axis=(0, 2))
        mu = np.divide(total, n, out=np.zeros(channels), where=n > 0)
        dev = np.where(w, xs - mu[None, :, None], 0.0)
        _mem(mean, (channels,), np.float64)[...] = mu
        _mem(m2, (channels,), np.float64)[...] = (dev * dev).sum(axis=(0, 2))

    def finish_stats(self, param_dtype: str, channels: int, count: int, mean: int, m2: int,
                     eps: float, invstd: int, running_mean: int = 0, running_var: int = 0,
                     momentum: float = 0.0, unbiased: bool = True, stream: int = 0,
                     device: int = -1) -> None:  # fmt: skip
        self._record("finish_stats", stream, device)
        if count < 1:
            raise ValueError("count: expected a count >= 1")
        C = channels
        q = _mem(m2, (C,), np.float64)
        if invstd:
            _mem(invstd, (C,), np.float64)[...] = 1.0 / np.sqrt(q / count + eps)
        P = _DTYPES[param_dtype]
        denom = count - 1 if unbiased and count > 1 else count
        keep = 1.0 - momentum
        if running_mean:
            rm = _mem(running_mean, (C,), P)
            rm[...] = keep * rm.astype(np.float64) + momentum * _mem(mean, (C,), np.float64)
        if running_var:
            rv = _mem(running_var, (C,), P)
            rv[...] = keep * rv.astype(np.float64) + momentum * (q / denom)

    def running_coefficients(self, param_dtype: str, channels: int, running_mean: int,
                             running_var: int, eps: float, mean: int, invstd: int,
                             stream: int = 0, device: int = -1) -> None:  # fmt: skip
        self._record("running_coefficients", stream, device)
        P = _DTYPES[param_dtype]
        _mem(mean, (channels,), np.float64)[...] = _mem(running_mean, (channels,), P)
        rv = _mem(running_var, (channels,), P).astype(np.float64)
        _mem(invstd, (channels,), np.float64)[...] = 1.0 / np.sqrt(rv + eps)

    def channel_sums(self, dtype: str, dy: int, x: int, outer: int, channels: int, inner: int,
                     mean: int, invstd: int, sum_dy: int, sum_dy_xhat: int, workspace: int,
                     y: int = 0, mask: int = 0, dresidual: int = 0, dgamma: int = 0,
                     dbeta: int = 0, stream: int = 0, device: int = -1) -> None:  # fmt: skip
        self._record("channel_sums", stream, device)
        if channels == 0:
            return
        shape, T = (outer, channels, inner), _DTYPES[dtype]
        _mem(workspace, (2 * channels * self.stats_parts(outer, channels, inner),), np.float64)
        g = _mem(dy, shape, T).astype(np.float64)
        xs = _mem(x, shape, T).astype(np.float64)
        raw_dy = g.copy()
        if y:
            g = np.where(_mem(y, shape, T) > 0, g, 0.0)
            if dresidual:
                _mem(dresidual, shape, T)[...] = g
        take = np.ones(shape, bool)
        if mask:
            padded = _mem(mask, (outer, inner), np.uint8).reshape(outer, 1, inner) == 0
            take = ~(padded & ~(np.isfinite(xs) & np.isfinite(raw_dy)))
        mu = _mem(mean, (channels,), np.float64)[None, :, None]
        s_dy = np.where(take, g, 0.0).sum(axis=(0, 2))
        s_x = np.where(take, g * (xs - mu), 0.0).sum(axis=(0, 2)) * _mem(invstd, (channels,),
                                                                        np.float64)  # fmt: skip
        _mem(sum_dy, (channels,), np.float64)[...] = s_dy
        _mem(sum_dy_xhat, (channels,), np.float64)[...] = s_x
        P = _param(dtype)
        if dgamma:
            _mem(dgamma, (channels,), P)[...] = s_x
        if dbeta:
            _mem(dbeta, (channels,), P)[...] = s_dy

    def backward_dx(self, dtype: str, training: bool, dy: int, x: int, outer: int, channels: int,
                    inner: int, count: int, mean: int, invstd: int, gamma: int, sum_dy: int,
                    sum_dy_xhat: int, dx: int, y: int = 0, mask: int = 0, stream: int = 0,
                    device: int = -1) -> None:  # fmt: skip
        self._record("backward_dx", stream, device)
        shape, T, C = (outer, channels, inner), _DTYPES[dtype], channels
        if outer * channels * inner == 0:
            return
        g = _mem(dy, shape, T).astype(np.float64)
        if y:
            g = np.where(_mem(y, shape, T) > 0, g, 0.0)
        s = _mem(invstd, (C,), np.float64)[None, :, None]
        gam = _opt(gamma, (C,), _param(dtype))
        k = (1.0 if gam is None else gam.astype(np.float64)[None, :, None]) * s
        if training:
            valid = np.ones((outer, 1, inner))
            if mask:
                valid = (_mem(mask, (outer, inner), np.uint8) != 0).reshape(outer, 1, inner)
            xhat = (_mem(x, shape, T) - _mem(mean, (C,), np.float64)[None, :, None]) * s
            sd = _mem(sum_dy, (C,), np.float64)[None, :, None] / count
            sx = _mem(sum_dy_xhat, (C,), np.float64)[None, :, None] / count
            g = g - valid * (sd + xhat * sx)
        _mem(dx, shape, T)[...] = k * g

    def normalize(self, dtype: str, x: int, outer: int, channels: int, inner: int, mean: int,
                  invstd: int, gamma: int, beta: int, y: int, residual: int = 0,
                  relu: bool = False, stream: int = 0, device: int = -1) -> None:  # fmt: skip
        self._record("normalize", stream, device)
        shape, T, C = (outer, channels, inner), _DTYPES[dtype], channels
        if outer * channels * inner == 0:
            return
        P = _param(dtype)
        g = _opt(gamma, (C,), P)
        b = _opt(beta, (C,), P)
        v = (_mem(x, shape, T) - _mem(mean, (C,), np.float64)[None, :, None]) * (
            (1.0 if g is None else g.astype(np.float64)[None, :, None])
            * _mem(invstd, (C,), np.float64)[None, :, None]
        ) + (0.0 if b is None else b.astype(np.float64)[None, :, None])
        if residual:
            v = v + _mem(residual, shape, T)
        if relu:
            v = _relu(v)
        _mem(y, shape, T)[...] = v
