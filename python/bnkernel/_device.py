"""Arrays in GPU memory: recognising them, viewing them as CuPy arrays, and the CUDA kernels on
them.

Nothing here is imported eagerly by a CPU-only user's path: :mod:`bnkernel._checks` calls
:func:`kind` on an argument that is not a NumPy array, and only an array in GPU memory brings in
CuPy (``bnkernel[cuda]``) and the CUDA module (``bnkernel._cuda``, a build with
``BNKERNEL_CUDA=ON``), each looked up in ``sys.modules`` first on every call.

* Any array on a CUDA device is taken without a copy: CuPy's own, anything with
  ``__cuda_array_interface__`` (torch CUDA tensors, Numba, JAX), and DLPack exporters on a CUDA
  device, viewed through ``cupy.asarray`` / ``cupy.from_dlpack``.
* Outputs and scratch are allocated by CuPy (its memory pool), on x's device.
* Kernels are launched on CuPy's current stream, on x's device, and nothing synchronizes the
  device, except where a result must reach the host before the call can go on (documented where
  it happens: a mask's count, checked before anything is written).

:class:`Kernels` has the CPU module's signatures (``bnkernel._core``: the same arrays in the same
order), so that the public functions run one sequence of calls on either.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

# DLPack device types (dlpack.h): CPU, CUDA, CUDA pinned host memory, CUDA managed memory
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def kind(v: Any) -> str | None:
    """What v is when it lives in GPU memory: "cuda" for an array on a CUDA device (any
    ``__cuda_array_interface__``, or a DLPack exporter on a CUDA device or in managed memory),
    "other: ..." for an array on another accelerator (a DLPack device bnkernel has no kernels
    for), None for anything else (host memory, or not an array)."""
    # (on the instance: torch.Tensor's class has the property, which raises for a CPU tensor)
    if hasattr(v, "__cuda_array_interface__"):
        return "cuda"
    device = getattr(v, "__dlpack_device__", None)
    if callable(device):
        try:
            dev_type = int(device()[0])
        except Exception:  # not a DLPack exporter after all: np.asarray decides
            return None
        if dev_type in (_DL_CUDA, _DL_CUDA_MANAGED):
            return "cuda"
        if dev_type not in (_DL_CPU, _DL_CUDA_HOST):
            return f"other: an array on DLPack device type {dev_type}"
    return None


def describe(v: Any) -> str:
    """An array's type, for messages: 'cupy.ndarray', 'torch.Tensor'."""
    t = type(v)
    return f"{t.__module__.split('.')[0]}.{t.__qualname__}"


def _imported(name: str, hint: str) -> Any:
    """The module ``name``, imported on first use, or an ImportError saying ``hint``."""
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(hint) from e


def cupy() -> Any:
    """The CuPy module (imported on first use: only device arrays need it)."""
    return _imported(
        "cupy",
        "arrays in GPU memory need CuPy: pip install 'bnkernel[cuda]' (CuPy for CUDA 13), "
        "or copy the arrays to the host (e.g. tensor.cpu().numpy())",
    )


def kernels_module() -> Any:
    """bnkernel._cuda, or an ImportError saying how to build it."""
    return _imported(
        "bnkernel._cuda",
        "this bnkernel was built without its CUDA kernels: reinstall with "
        "pip install . -Ccmake.define.BNKERNEL_CUDA=ON (needs nvcc; docs/building.md, "
        "'CUDA'), or copy the arrays to the host",
    )


F = TypeVar("F", bound=Callable[..., Any])


def _first_device(args: tuple[Any, ...]) -> int | None:
    """The CUDA device of the first array among a call's positional arguments (looking into a
    (count, mean, M2) tuple), or None when it is a host array, or anything is amiss (the checks
    then say what)."""
    for a in args:
        if a is None or isinstance(a, (bool, int, float, str)):
            continue
        if type(a) is np.ndarray:
            return None
        if isinstance(a, tuple) and len(a) == 3:
            a = a[1]
        try:
            return device_of(as_cupy(a)) if kind(a) == "cuda" else None
        except Exception:
            return None
    return None


@contextlib.contextmanager
def current(device: int | None) -> Iterator[None]:
    """`device` made CuPy's current device for the block (nothing for None: a host call)."""
    if device is None:
        yield
        return
    with cupy().cuda.Device(device):
        yield


def follows_arrays(fn: F) -> F:
    """Runs a public function with the device of its first array argument current, so that the
    per-channel arithmetic done with CuPy (and CuPy's allocations) happen on x's device, as the
    kernels do.  A host call pays one type check."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if args and type(args[0]) is np.ndarray:
            return fn(*args, **kwargs)
        device = _first_device(args)
        if device is None:
            return fn(*args, **kwargs)
        with current(device):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def host_view(v: Any, name: str) -> Any:
    """v, an array in host memory that speaks DLPack (a torch CPU tensor, a JAX CPU array, any
    array-API library's), as a NumPy array over the same memory (``np.from_dlpack``), never a
    copy.  A read-only export comes back read-only (NumPy keeps DLPack's flag), so an ``out=``
    check refuses it.  What NumPy cannot view is refused by name: a tensor that requires grad,
    a dtype NumPy has no DLPack code for (bfloat16), and a torch tensor with the negative bit set
    (``z.conj().imag``: a lazy negation that torch's DLPack export drops, so the view would hold
    the values' negatives)."""
    is_neg = getattr(v, "is_neg", None)
    if callable(is_neg) and is_neg():
        raise TypeError(
            f"{name}: this {describe(v)} has the negative bit set (a lazy negation, e.g. from "
            "z.conj().imag), which DLPack cannot carry: pass t.resolve_neg()"
        )
    try:
        return np.from_dlpack(v)
    except BufferError as e:  # the exporter refuses: torch's "Can't export tensors that require
        raise TypeError(
            f"{name}: this {describe(v)} cannot be viewed without a copy: {e}"
        ) from None
    except (RuntimeError, TypeError, ValueError) as e:
        dtype = getattr(v, "dtype", None)
        hint = ""
        if "bfloat16" in str(dtype):
            hint = (
                "; NumPy has no DLPack bfloat16: pass an ml_dtypes.bfloat16 NumPy array (for a "
                "torch tensor t, t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)), or use "
                "bnkernel.torch's modules, which do that"
            )
        raise TypeError(
            f"{name}: NumPy cannot view this {describe(v)} (dtype {dtype}) through DLPack: "
            f"{e}{hint}"
        ) from None


def readonly(v: Any) -> bool:
    """Whether a device array says it is read-only (``__cuda_array_interface__``'s flag)."""
    iface = getattr(v, "__cuda_array_interface__", None)
    if isinstance(iface, dict):
        data = iface.get("data")
        return isinstance(data, tuple) and len(data) == 2 and bool(data[1])
    return False


def as_cupy(v: Any) -> Any:
    """v (an array on a CUDA device) as a CuPy array over the same memory, never a copy."""
    cp = cupy()
    if isinstance(v, cp.ndarray):
        return v
    if hasattr(v, "__cuda_array_interface__"):
        return cp.asarray(v)  # zero-copy: CuPy wraps the interface's pointer
    return cp.from_dlpack(v)


def device_of(a: Any) -> int:
    """The index of the CUDA device a CuPy array lives on."""
    return int(a.device.id)


def is_device_array(a: Any) -> bool:
    """Whether a (an array the checks produced) is a CuPy array, i.e. lives on a device."""
    mod = sys.modules.get("cupy")
    return mod is not None and isinstance(a, mod.ndarray)


def address(a: Any | None) -> int:
    """A CuPy array's device address, or 0 for None (an absent optional array)."""
    return 0 if a is None else int(a.data.ptr)


def extent(a: Any) -> tuple[int, int]:
    """The bytes [lo, hi) a CuPy array's elements can touch (from its pointer and strides)."""
    lo = hi = int(a.data.ptr)
    if a.size == 0:
        return lo, lo
    for n, s in zip(a.shape, a.strides, strict=True):
        if s >= 0:
            hi += (n - 1) * s
        else:
            lo += (n - 1) * s
    return lo, hi + a.itemsize


def may_share_memory(a: Any, b: Any) -> bool:
    """Whether two CuPy arrays' extents meet: exact for the contiguous arrays that outputs and
    running statistics are, conservative for a strided input (which may then be refused as
    overlapping when only its gaps do)."""
    if a.size == 0 or b.size == 0:
        return False
    alo, ahi = extent(a)
    blo, bhi = extent(b)
    return alo < bhi and blo < ahi


def same_array(a: Any, b: Any) -> bool:
    """Whether two CuPy arrays are views of exactly the same elements."""
    return a is b or (
        int(a.data.ptr) == int(b.data.ptr)
        and a.shape == b.shape
        and a.strides == b.strides
        and a.dtype == b.dtype
        and device_of(a) == device_of(b)
    )


def contiguous(a: Any, dtype: Any = None) -> Any:
    """a itself when C-contiguous (and of `dtype`), else one copy on its device (CuPy's)."""
    if a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
        return a
    cp = cupy()
    with cp.cuda.Device(device_of(a)):
        return cp.ascontiguousarray(a, dtype=dtype)


def empty(device: int, shape: Any, dtype: Any) -> Any:
    """A new CuPy array on `device` (CuPy's allocator)."""
    cp = cupy()
    with cp.cuda.Device(device):
        return cp.empty(shape, dtype=dtype)


def empty_like_host(device: int, host: np.ndarray) -> Any:
    """A copy of a host array on `device`."""
    cp = cupy()
    with cp.cuda.Device(device):
        return cp.asarray(host)


def _dtype_name(dtype: np.dtype[Any]) -> str:
    return "bfloat16" if dtype.kind == "V" else dtype.name


class Kernels:
    """The CUDA kernels on CuPy arrays, with bnkernel._core's signatures ((outer, C, inner) views,
    float64 saved statistics, None for an absent optional array), each launched on x's device and
    CuPy's current stream there."""

    __slots__ = ("_cuda", "_device", "_where")

    def __init__(self, device: int) -> None:
        self._device = device
        self._cuda = kernels_module()
        self._where: dict[str, int] | None = None

    def _launch(self) -> dict[str, int]:
        """The stream and device of every launch of this call (looked up once)."""
        if self._where is None:
            cp = cupy()
            with cp.cuda.Device(self._device):
                stream = int(cp.cuda.get_current_stream().ptr)
            self._where = {"stream": stream, "device": self._device}
        return self._where

    def _workspace(self, x3: Any, per_part: int) -> Any:
        outer, C, inner = x3.shape
        parts = int(self._cuda.stats_parts(outer, C, inner))
        return empty(self._device, max(per_part * C * parts, 1), np.float64)

    # -- the phases --
    def channel_stats(self, x3: Any, mean: Any, m2: Any, mask: Any = None) -> None:
        outer, C, inner = x3.shape
        work = self._workspace(x3, 3)
        self._cuda.channel_stats(
            _dtype_name(x3.dtype), address(x3), outer, C, inner, address(mean), address(m2),
            address(work), mask=address(mask), **self._launch(),
        )  # fmt: skip

    def masked_channel_stats(self, x3: Any, mask: Any, mean: Any, m2: Any) -> int:
        """As channel_stats over the valid positions; returns their number, which this reads
        back to the host (one synchronization: the count is an int)."""
        self.channel_stats(x3, mean, m2, mask)
        return int(cupy().count_nonzero(mask))

    def update_running_stats(
        self, rm: Any, rv: Any, count: int, mean: Any, m2: Any, momentum: float, unbiased: bool,
        invstd: Any = None, eps: float = 0.0,
    ) -> None:  # fmt: skip
        first = rm if rm is not None else rv
        if first is None and invstd is None:
            return
        C = int(mean.shape[0])
        pdt = "float64" if first is not None and first.dtype == np.float64 else "float32"
        self._cuda.finish_stats(
            pdt, C, int(count), address(mean), address(m2), float(eps), address(invstd),
            running_mean=address(rm), running_var=address(rv), momentum=float(momentum),
            unbiased=bool(unbiased), **self._launch(),
        )  # fmt: skip

    def invstd(self, count: int, m2: Any, eps: float) -> Any:
        """1 / sqrt(M2 / count + eps), float64, on the device."""
        invstd = empty(self._device, m2.shape, np.float64)
        self._cuda.finish_stats(
            "float64", int(m2.shape[0]), int(count), address(m2), address(m2), float(eps),
            address(invstd), **self._launch(),
        )  # fmt: skip
        return invstd

    def running_coefficients(self, rm: Any, rv: Any, eps: float) -> tuple[Any, Any]:
        """Inference's float64 (mean, invstd) from the running statistics."""
        C = int(rm.shape[0])
        mean = empty(self._device, C, np.float64)
        invstd = empty(self._device, C, np.float64)
        self._cuda.running_coefficients(
            rm.dtype.name, C, address(rm), address(rv), float(eps), address(mean),
            address(invstd), **self._launch(),
        )  # fmt: skip
        return mean, invstd

    def normalize(
        self, x3: Any, mean: Any, invstd: Any, g: Any, b: Any, y3: Any, res3: Any, relu: bool
    ) -> None:
        outer, C, inner = x3.shape
        self._cuda.normalize(
            _dtype_name(x3.dtype), address(x3), outer, C, inner, address(mean), address(invstd),
            address(g), address(b), address(y3), residual=address(res3), relu=bool(relu),
            **self._launch(),
        )  # fmt: skip

    def backward_reduce(
        self, dy3: Any, x3: Any, mean: Any, invstd: Any, sum_dy: Any, sum_dy_xhat: Any,
        y3: Any, dres3: Any, mask: Any = None, dgamma: Any = None, dbeta: Any = None,
    ) -> None:  # fmt: skip
        outer, C, inner = x3.shape
        work = self._workspace(x3, 2)
        self._cuda.channel_sums(
            _dtype_name(x3.dtype), address(dy3), address(x3), outer, C, inner, address(mean),
            address(invstd), address(sum_dy), address(sum_dy_xhat), address(work),
            y=address(y3), mask=address(mask), dresidual=address(dres3), dgamma=address(dgamma),
            dbeta=address(dbeta), **self._launch(),
        )  # fmt: skip

    def backward_elementwise(
        self, dy3: Any, x3: Any, mean: Any, invstd: Any, g: Any, sum_dy: Any, sum_dy_xhat: Any,
        count: int, dx3: Any, y3: Any, mask: Any, *, training: bool = True,
    ) -> None:  # fmt: skip
        outer, C, inner = x3.shape
        self._cuda.backward_dx(
            _dtype_name(x3.dtype), bool(training), address(dy3), address(x3), outer, C, inner,
            int(count), address(mean), address(invstd), address(g), address(sum_dy),
            address(sum_dy_xhat), address(dx3), y=address(y3), mask=address(mask),
            **self._launch(),
        )  # fmt: skip

    # -- the fused calls --
    def forward_train(
        self, x3: Any, g: Any, b: Any, eps: float, y3: Any, mean: Any, invstd: Any, rm: Any,
        rv: Any, momentum: float, unbiased: bool, res3: Any, relu: bool,
    ) -> None:  # fmt: skip
        """Statistics, their finish (invstd and the running update), the normalize: three
        launches and one per-channel launch, no synchronization."""
        outer, C, inner = x3.shape
        m2 = empty(self._device, C, np.float64)
        self.channel_stats(x3, mean, m2)
        self.update_running_stats(
            rm, rv, outer * inner, mean, m2, momentum, unbiased, invstd=invstd, eps=eps
        )
        self.normalize(x3, mean, invstd, g, b, y3, res3, relu)

    def backward(
        self, training: bool, dy3: Any, x3: Any, mean: Any, invstd: Any, g: Any, dx3: Any,
        dgamma: Any, dbeta: Any, y3: Any, dres3: Any,
    ) -> None:  # fmt: skip
        """The sums (dgamma and dbeta written by their merge), then dx."""
        outer, C, inner = x3.shape
        sum_dy = empty(self._device, C, np.float64)
        sum_dy_xhat = empty(self._device, C, np.float64)
        self.backward_reduce(
            dy3, x3, mean, invstd, sum_dy, sum_dy_xhat, y3, dres3, dgamma=dgamma, dbeta=dbeta
        )
        self.backward_elementwise(
            dy3, x3, mean, invstd, g, sum_dy, sum_dy_xhat, max(outer * inner, 1), dx3, y3, None,
            training=training,
        )  # fmt: skip


def merge_stats(counts: list[int], means: list[Any], m2s: list[Any]) -> tuple[Any, Any]:
    """Chan's merge of per-part statistics on the device, left to right (the CPU's chan_merge, in
    CuPy's float64 arithmetic)."""
    n = 0.0
    mean = means[0] * 0.0
    m2 = m2s[0] * 0.0
    for nb_int, mb, m2b in zip(counts, means, m2s, strict=True):
        nb = float(nb_int)
        if nb == 0.0:
            continue
        if n == 0.0:
            n, mean, m2 = nb, mb.copy(), m2b.copy()
            continue
        total = n + nb
        d = mb - mean
        mean = mean + d * (nb / total)
        m2 = m2 + (m2b + d * d * (n * nb / total))
        n = total
    return mean, m2
