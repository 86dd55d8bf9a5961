"""Every rule about arguments, in one place.

Each public function (the fused functions, the split phases, the variants, the layer and
``SyncBatchNorm``) declares its arguments here by role and lets this module decide whether the
call is valid, before any kernel runs and before anything is written:

* the data (``x``, and the arrays of x's shape and dtype beside it: ``dy``, ``residual``, ``y``):
  a float16 / bfloat16 / float32 / float64 array with ndim >= 2 (any host DLPack array is viewed
  through ``np.from_dlpack``: :func:`as_array`), never a ``np.ma.MaskedArray``
  (its mask would be dropped: ``mask=`` is the way), viewed as (outer, C, inner);
* parameters (``gamma``, ``beta``, and the running statistics when they are only read): 1-d,
  length C, exactly the parameter dtype of x's dtype;
* running statistics that the call updates in place: NumPy arrays (or host DLPack arrays such as
  torch CPU tensors, viewed; or CUDA arrays on a device), exactly right already (a copy would
  drop the update);
* saved statistics (``mean``, ``invstd``, ``r``, ``d``, the backward's sums, ``M2``): 1-d float32
  or float64, read as float64;
* outputs (``out=``, ``dresidual``): exactly right already (shape, dtype, C-contiguous,
  writeable), or None for a new array;
* scalars: ``eps`` finite and >= 0, ``momentum`` in [0, 1], flags (``training``...) real bools,
  ``axis`` an int in range, counts ints in range, ``activation`` / ``single_value`` by name.

One overlap rule for all (:meth:`Call.seal`): an output shares memory with no other argument (no
input, parameter, running statistic, saved statistic or other output), and a running statistic
that is written shares memory with no other argument either; the one exception is the documented
in-place forward, whose ``out`` may be ``x`` itself (the very same elements).

The compiled fast path (``csrc/fastpath.cpp``) accepts only calls that these rules accept; the
rules it re-checks in C are listed in :data:`FAST_PATH_RULES` with the function here that states
each (tests/test_fastpath.py holds the two lists together and shows, by property tests, that the
fast path never accepts a call the checked path refuses, and agrees with it bit for bit).

Copies happen here, in plain sight, and only of what is read: a non-contiguous or unaligned input
is copied once; an unaligned output or running statistic is computed in an aligned scratch array
and copied back by :meth:`Call.finish` (nothing is lost).
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from numpy.exceptions import AxisError
from numpy.ma import MaskedArray
from numpy.typing import NDArray

from . import _core, _device

# The dtypes of statistics and running buffers (and of data, with the 16-bit ones below).
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
F64 = np.dtype(np.float64)
F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
DATA_DTYPES_TEXT = "a float16, bfloat16, float32 or float64 array"
INT64_MAX = 2**63 - 1

# The rules csrc/fastpath.cpp checks again in C, each with the function here that states it.  The
# fast path declines (returns None) whenever one fails, and the checked path then raises.
FAST_PATH_RULES: Mapping[str, str] = {
    "x-plain": "data: an exact ndarray, float16/bfloat16/float32/float64, C-contiguous, aligned, "
    "ndim >= 2, not empty (Call.data)",
    "axis": "channel_axis: an int in [-ndim, ndim)",
    "flags": "flag: training and running_var_unbiased are bools",
    "eps": "eps: a finite float >= 0",
    "momentum": "momentum: a finite float in [0, 1] (training)",
    "per-channel": "Call.param / Call.running / Call.saved: 1-d, length C, the exact dtype "
    "(param_dtype: float32 for 16-bit data)",
    "one-value": "one_value_check: more than one value per channel when training",
    "running-required": "running statistics: both required for inference, both or neither in "
    "training (Call.training_forward)",
    "running-writeable": "Call.running: writeable when updated",
    "out-plain": "Call.output: exact ndarray, x's shape and dtype, C-contiguous, aligned, "
    "writeable",
    "overlap": "Call.seal: outputs and updated running statistics share memory with no other "
    "argument",
}


# ---- dtypes -------------------------------------------------------------------------------------


def bfloat16_dtype() -> np.dtype[Any] | None:
    """ml_dtypes' bfloat16, if ml_dtypes is loaded (an array of it can only exist if it is; bnkernel
    itself never imports it)."""
    mod = sys.modules.get("ml_dtypes")
    return None if mod is None else np.dtype(mod.bfloat16)


def is_data_dtype(dtype: np.dtype[Any]) -> bool:
    """Whether the kernels take data of this dtype: float32, float64, float16, bfloat16."""
    if dtype in SUPPORTED_DTYPES or dtype == F16:
        return True
    return dtype.itemsize == 2 and dtype.kind == "V" and dtype == bfloat16_dtype()


def param_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype of gamma, beta, the running statistics and dgamma / dbeta for data of `dtype`:
    the same, or float32 for the 16-bit types (their statistics and arithmetic are wider still)."""
    return F32 if dtype.itemsize == 2 else dtype


def param_dtype_text(dtype: np.dtype[Any]) -> str:
    """How a parameter's expected dtype is explained in an error message."""
    if dtype.itemsize == 2:
        return f"float32 (parameters of {dtype.name} data are float32)"
    return f"{dtype} (the dtype of x)"


# ---- scalars ------------------------------------------------------------------------------------


def real_number(v: Any, name: str, *, minimum: float | None = None) -> float:
    """A finite real number (not a bool), >= minimum when given."""
    if type(v) is not float and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite number, got {f}")
    if minimum is not None and f < minimum:
        raise ValueError(f"{name}: expected a number >= {minimum}, got {f}")
    return f


def eps(v: Any, name: str = "eps") -> float:
    """eps: a finite number >= 0."""
    return real_number(v, name, minimum=0.0)


def momentum(v: Any, name: str = "momentum", *, optional: bool = False) -> float | None:
    """The weight of a batch in a running update: a number in [0, 1].  ``optional``: None too (the
    layer's cumulative average, which the layer resolves from its batch count)."""
    if v is None:
        if optional:
            return None
        raise TypeError(
            f"{name}: expected a real number, got NoneType: a number in [0, 1] (the cumulative "
            "average, momentum=None, is BatchNorm's, which counts the batches; pass 1 / batches)"
        )
    f = real_number(v, name)
    if not 0.0 <= f <= 1.0:
        either = " or None" if optional else ""
        raise ValueError(f"{name}: expected a number in [0, 1]{either}, got {f}")
    return f


def renorm_limits(r_max: Any, d_max: Any) -> tuple[float, float]:
    """Batch renormalization's clipping limits: r_max >= 1, d_max >= 0."""
    return real_number(r_max, "r_max", minimum=1.0), real_number(d_max, "d_max", minimum=0.0)


def weight(v: Any, name: str = "momentum") -> float:
    """momentum() where None is not allowed (the functional API), typed as a float."""
    f = momentum(v, name)
    assert f is not None
    return f


def positive_int(v: Any, name: str) -> int:
    """An int (Python's or NumPy's, not a bool) >= 1."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v}")
    return int(v)


def flag(v: Any, name: str) -> bool:
    """A truth value that is really one: a bool (Python's or NumPy's) or the int 0 or 1.  Anything
    else is refused, so that ``training="False"`` cannot train."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return bool(v)
    raise TypeError(f"{name}: expected a bool (True or False), got {type(v).__name__} {v!r}")


def count(v: Any, name: str = "count") -> int:
    """A number of values per channel: an int >= 1."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= INT64_MAX:
        raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    return int(v)


def activation(v: Any) -> bool:
    """Whether the fused ReLU is on: None or 'relu'."""
    if v is None:
        return False
    if isinstance(v, str) and v == "relu":
        return True
    raise ValueError(f"activation: expected None or 'relu', got {v!r}")


def relu_output(activation_: Any, y: Any) -> bool:
    """A backward's activation and the forward's output y: y is needed with, and only with, the
    fused ReLU (whose mask it holds).  Whether the ReLU is on."""
    relu = activation(activation_)
    if relu and y is None:
        raise ValueError("y: activation='relu' needs the forward's output y (for the mask)")
    if y is not None and not relu:
        raise ValueError("y: only used with activation='relu'")
    return relu


def single_value(v: Any) -> str:
    """The one-value-batch policy: 'raise' or 'running'."""
    if not isinstance(v, str) or v not in ("raise", "running"):
        raise ValueError(f"single_value: expected 'raise' or 'running', got {v!r}")
    return v


def int_arg(v: Any, name: str) -> int:
    """An int of any sign (Python's or NumPy's, not a bool)."""
    if type(v) is not int:  # fast path first: this runs on every call
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    return int(v)


def channel_axis(ndim: int, axis: Any) -> int:
    """The channel axis normalized to 0 <= axis < ndim."""
    a = int_arg(axis, "axis")
    if not -ndim <= a < ndim:
        raise AxisError(a, ndim, "axis: channel axis out of range")
    return a % ndim


def one_value_check(x: NDArray[Any], axis: int) -> int:
    """The values per channel of a training batch, which must be more than one."""
    n = int(x.size // x.shape[axis])
    if n < 2:
        raise ValueError(
            "x: expected more than 1 value per channel when training "
            f"(shape {x.shape}, channel axis {axis}); use training=False for single samples, "
            "or single_value='running' to fall back to the running statistics"
        )
    return n


# ---- arrays -------------------------------------------------------------------------------------


def as_array(v: Any, name: str) -> Any:
    """v as an array, never a copy of one: a NumPy array as is; an array in CUDA memory (CuPy's, any
    ``__cuda_array_interface__``, a DLPack exporter on a CUDA device) as a CuPy view of it
    (:mod:`bnkernel._device`); another DLPack exporter in host memory (torch CPU tensors, JAX CPU
    arrays) as a NumPy view of it (``np.from_dlpack``); anything else through np.asarray.  Refuses,
    naming the argument, what would be taken wrongly: a masked array (its mask dropped), an array
    on another kind of accelerator."""
    if type(v) is np.ndarray:
        return v
    kind = _device.kind(v)
    if kind == "cuda":
        try:
            return _device.as_cupy(v)
        except ImportError as e:
            raise ImportError(f"{name}: {e}") from None
    if kind is not None:
        raise TypeError(
            f"{name}: {kind.removeprefix('other: ')} ({_device.describe(v)}) is not taken: "
            "bnkernel runs on NumPy arrays in host memory and on CUDA device arrays; copy it to "
            "the host first"
        )
    if isinstance(v, MaskedArray):
        raise TypeError(
            f"{name}: a numpy.ma.MaskedArray is not taken (its mask would be ignored); pass the "
            "data (x.data) and the valid positions as mask= (bool, x's shape without the "
            "channel axis, True where valid)"
        )
    if not isinstance(v, np.ndarray) and hasattr(v, "__dlpack__"):
        return _device.host_view(v, name)
    return np.asarray(v)


def on_device(a: Any) -> bool:
    """Whether an array from as_array lives on a CUDA device (is a CuPy array)."""
    return type(a) is not np.ndarray and _device.is_device_array(a)


def namespace(*arrays: Any) -> Any:
    """numpy, or cupy when the first array lives on a device (the others must be there too, as
    the arithmetic on them will say)."""
    return _device.cupy() if arrays and on_device(arrays[0]) else np


def where(a: Any) -> str:
    """Where an array lives, for messages."""
    if on_device(a):
        return f"on CUDA device {_device.device_of(a)}"
    return "in host memory"


def as_input(x: Any, name: str, *, allow_empty: bool = False) -> NDArray[Any]:
    """x as an array (NumPy's, or CuPy's for device memory) of a supported float dtype with
    ndim >= 2 (not copied)."""
    arr: NDArray[Any] = as_array(x, name)
    if arr.dtype not in SUPPORTED_DTYPES and not is_data_dtype(arr.dtype):
        raise TypeError(f"{name}: expected {DATA_DTYPES_TEXT}, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(
            f"{name}: expected an array with ndim >= 2 (batch, channels, ...), "
            f"got ndim {arr.ndim} with shape {arr.shape}"
        )
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name}: expected a non-empty array, got shape {arr.shape}")
    return arr


def kernel_view(a: NDArray[Any]) -> NDArray[Any]:
    """a itself if the kernels can read it (C-contiguous and aligned), else one explicit copy (on
    a's device for a device array)."""
    if type(a) is not np.ndarray and on_device(a):
        return _device.contiguous(a)  # type: ignore[no-any-return]
    if a.flags.c_contiguous and a.flags.aligned:
        return a
    return np.require(a, requirements=["C", "A"])


def view3(x: NDArray[Any], axis: int) -> NDArray[Any]:
    """C-contiguous, aligned (outer, C, inner) view of x; copies only when it must."""
    shape = x.shape
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :])
    return kernel_view(x).reshape(outer, shape[axis], inner)


def check_channels(x: NDArray[Any], axis: int, name: str = "x") -> int:
    c = x.shape[axis]
    if c == 0:
        raise ValueError(f"{name}: the channel axis {axis} has length 0 (shape {x.shape})")
    return int(c)


def check_same_shape(a: NDArray[Any], x: NDArray[Any], name: str, x_name: str = "x") -> None:
    if a.shape != x.shape:
        raise ValueError(f"{name}: expected the shape of {x_name} {x.shape}, got {a.shape}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of {x_name}), got {a.dtype}")


def channel_param(v: Any, name: str, channels: int, dtype: np.dtype[Any]) -> NDArray[Any] | None:
    """A read-only per-channel array (gamma, beta): 1-d, length C, exactly the parameter dtype of
    data of `dtype` (see param_dtype)."""
    if v is None:
        return None
    arr = v if type(v) is np.ndarray else as_array(v, name)
    if arr.dtype != param_dtype(dtype):
        raise TypeError(f"{name}: expected dtype {param_dtype_text(dtype)}, got {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != channels:
        raise ValueError(f"{name}: expected shape ({channels},), got {arr.shape}")
    return kernel_view(arr)


def running_buffer(
    v: Any, name: str, channels: int, dtype: np.dtype[Any] | None
) -> NDArray[Any] | None:
    """A per-channel array updated in place (running statistics, of the parameter dtype of data of
    `dtype`, or float32/float64 when `dtype` is None): it must already be exactly right, since a
    copy would silently drop the update."""
    if v is None:
        return None
    v, writeable = written_array(v, name, "it is updated in place")
    if dtype is None:
        if v.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {v.dtype}")
    elif v.dtype != param_dtype(dtype):
        raise TypeError(f"{name}: expected dtype {param_dtype_text(dtype)}, got {v.dtype}")
    if v.ndim != 1 or v.shape[0] != channels:
        raise ValueError(f"{name}: expected shape ({channels},), got {v.shape}")
    if not v.flags.c_contiguous:
        raise ValueError(f"{name}: must be contiguous (it is updated in place)")
    if not writeable:
        raise ValueError(f"{name}: is read-only (it is updated in place)")
    arr: NDArray[Any] = v
    return arr


def saved_stat(v: Any, name: str, channels: int | tuple[int, ...]) -> NDArray[np.float64]:
    """Per-channel statistics (mean, invstd, sums): 1-d, length C (or the given shape), float32 or
    float64; passed to the kernels as float64."""
    if v is None:
        raise TypeError(f"{name}: required, got None")
    arr = v if type(v) is np.ndarray else as_array(v, name)
    if arr.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {arr.dtype}")
    shape = (channels,) if isinstance(channels, int) else channels
    if arr.shape != shape:
        want = f"({channels},)" if isinstance(channels, int) else str(shape)
        raise ValueError(f"{name}: expected shape {want}, got {arr.shape}")
    if type(arr) is not np.ndarray and on_device(arr):
        return _device.contiguous(arr, F64)  # type: ignore[no-any-return]
    return np.require(arr, dtype=F64, requirements=["C", "A"])


def same_array(a: NDArray[Any], b: NDArray[Any]) -> bool:
    """Whether a and b are views of exactly the same elements (same memory, shape and strides)."""
    if a is b:
        return True
    if on_device(a) or on_device(b):
        return on_device(a) and on_device(b) and bool(_device.same_array(a, b))
    return (
        a.shape == b.shape
        and a.strides == b.strides
        and a.dtype == b.dtype
        and bool(np.may_share_memory(a, b))
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


def overlaps(a: NDArray[Any], b: NDArray[Any]) -> bool:
    """Whether a and b share any memory (exactly: bounds first, then the strides)."""
    return bool(np.may_share_memory(a, b)) and bool(np.shares_memory(a, b))


def written_array(v: Any, name: str, why: str) -> tuple[Any, bool]:
    """An array the call writes into (``out=``, a running statistic), as an array over the
    caller's memory, and whether that memory may be written: a NumPy array; a CUDA device array
    (its interface's read-only flag); a DLPack array in host memory such as a torch CPU tensor
    (its NumPy view keeps DLPack's read-only flag).  Anything else, which np.asarray would copy
    (dropping the writes), is refused by name."""
    if isinstance(v, np.ndarray):
        return v, bool(v.flags.writeable)
    if _device.kind(v) == "cuda":
        return as_array(v, name), not _device.readonly(v)
    if hasattr(v, "__dlpack__"):
        a = as_array(v, name)
        return a, bool(a.flags.writeable)
    as_array(v, name)  # (refuses a masked array or another accelerator's by name)
    raise TypeError(
        f"{name}: expected a NumPy array, a DLPack array in host memory (a torch CPU tensor) or a "
        f"CUDA device array ({why}), got {type(v).__name__}"
    )


def check_output(out: Any, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
    """An ``out=`` buffer: a numpy array (or a CUDA device array) of exactly this shape and dtype,
    C-contiguous and writeable (a copy would drop the writes).  Returns it as an array."""
    out, writeable = written_array(out, name, "it is written")
    if out.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (a copy would drop the writes)")
    if not writeable:
        raise ValueError(f"{name}: is read-only (a copy would drop the writes)")
    return out


def mask_arg(mask: Any, xa: NDArray[Any], ax: int) -> NDArray[np.bool_]:
    """The mask as a bool array of x's shape without the channel axis: that shape, or one that
    broadcasts to it as Keras broadcasts a mask (e.g. (N, 1) for (N, L), a mask per sample); a
    broadcast mask is a read-only view, copied once for the kernels."""
    m: NDArray[np.bool_] = as_array(mask, "mask")
    want = xa.shape[:ax] + xa.shape[ax + 1 :]
    if m.dtype != np.bool_:
        raise TypeError(f"mask: expected a bool array, got dtype {m.dtype}")
    if m.shape != want:
        try:
            broadcast = np.broadcast_shapes(m.shape, want)
        except ValueError:
            broadcast = None
        if broadcast != want:
            raise ValueError(
                f"mask: expected shape {want} (x's shape without the channel axis {ax}) or one "
                f"that broadcasts to it, got {m.shape}"
            )
        m = (_device.cupy() if on_device(m) else np).broadcast_to(m, want)
    return m


def mask_view(valid: NDArray[np.bool_], x3: NDArray[Any]) -> NDArray[np.uint8]:
    """The mask as the kernels take it: (outer, inner) bytes, in the order of x's (outer, C, inner)
    view (x's shape without the channel axis is (outer..., inner...) in C order already)."""
    return kernel_view(valid).view(np.uint8).reshape(x3.shape[0], x3.shape[2])


# ---- one call's arguments, by role --------------------------------------------------------------

# roles
INPUT = "input"
PARAM = "parameter"
RUNNING = "running statistic"
SAVED = "saved statistic"
OUTPUT = "output"


class TrainingForward(NamedTuple):
    """What :meth:`Call.training_forward` returns: the arrays the kernels take."""

    gamma: NDArray[Any] | None
    beta: NDArray[Any] | None
    running_mean: NDArray[Any] | None
    running_var: NDArray[Any] | None
    out: NDArray[Any]
    residual: NDArray[Any] | None


class BackwardArrays(NamedTuple):
    """What :meth:`Call.backward_arrays` returns: the arrays the kernels take."""

    mean: NDArray[np.float64]
    invstd: NDArray[np.float64]
    gamma: NDArray[Any] | None
    y: NDArray[Any] | None
    out: NDArray[Any]


class Call:
    """One call's arguments, declared by role.

    The data array comes first (:meth:`data`, which fixes the channel axis and count); then each
    other argument through its role's method, which checks it and returns what the kernels take;
    then :meth:`seal` applies the overlap rule to everything declared, before anything is
    written.  After the kernels ran, :meth:`finish` copies any aligned scratch back into the
    caller's unaligned output (and returns the caller's array).
    """

    __slots__ = ("C", "_arrays", "_in_place", "_kernels", "_writebacks", "ax", "device", "x")

    def __init__(self) -> None:
        self._arrays: list[tuple[str, str, NDArray[Any]]] = []
        self._writebacks: list[tuple[NDArray[Any], NDArray[Any]]] = []
        self._in_place: NDArray[Any] | None = None
        self.x: NDArray[Any]
        self.ax: int
        self.C: int
        # None: the call runs on the CPU (NumPy arrays); else the CUDA device that x is on, where
        # every other array must be too and the kernels run (bnkernel._device)
        self.device: int | None = None
        self._kernels: Any = None

    def _declare(self, name: str, role: str, arr: Any) -> None:
        """Records an argument (an array from as_array) for seal(), after the placement rule:
        every array of a call lives where x lives (host memory, or x's CUDA device)."""
        if type(arr) is np.ndarray:
            if self.device is not None:
                raise TypeError(
                    f"{name}: a NumPy array in host memory, while x is on CUDA device "
                    f"{self.device}: pass every array on x's device (e.g. cupy.asarray({name}))"
                )
            self._arrays.append((name, role, arr))
        elif on_device(arr):
            device = _device.device_of(arr)
            if self.device is None:
                raise TypeError(
                    f"{name}: an array on CUDA device {device}, while x is a NumPy array in host "
                    f"memory: pass every array on one side (e.g. cupy.asnumpy({name}))"
                )
            if device != self.device:
                raise ValueError(
                    f"{name}: on CUDA device {device}, while x is on CUDA device {self.device}: "
                    "pass every array on x's device"
                )
            self._arrays.append((name, role, arr))

    def empty(self, shape: Any, dtype: Any) -> Any:
        """A new array where the call runs: NumPy's, or CuPy's on x's device."""
        if self.device is None:
            return np.empty(shape, dtype=dtype)
        return _device.empty(self.device, shape, dtype)

    @property
    def kernels(self) -> Any:
        """The kernels for where the call runs: bnkernel._core (NumPy arrays), or the CUDA kernels
        with the same signatures (bnkernel._device.Kernels, CuPy arrays on x's device)."""
        if self.device is None:
            return _core
        if self._kernels is None:
            self._kernels = _device.Kernels(self.device)
        return self._kernels

    # the data
    def data(
        self, x: Any, axis: Any, *, name: str = "x", allow_empty: bool = False
    ) -> NDArray[Any]:
        """The data array: checked, its channel axis and count fixed; returns it as an ndarray."""
        xa = as_input(x, name, allow_empty=allow_empty)
        self.ax = channel_axis(xa.ndim, axis)
        self.C = check_channels(xa, self.ax, name)
        self.x = xa
        if type(xa) is not np.ndarray and on_device(xa):
            self.device = _device.device_of(xa)
        self._declare(name, INPUT, xa)
        return xa

    @property
    def xp(self) -> Any:
        """The array module where the call runs: numpy, or cupy (for per-channel arithmetic)."""
        return np if self.device is None else _device.cupy()

    def statistics_only(self, channels: int, dtype: np.dtype[Any], like: Any = None) -> None:
        """For a call with no data array (update_running_stats): C and the data dtype whose
        parameter dtype the running statistics must have, given directly; ``like`` (an array of
        the call) says where it runs."""
        self.C = channels
        self.x = np.empty((0, channels), dtype)
        if like is not None and on_device(like):
            self.device = _device.device_of(like)

    def view3(self, a: NDArray[Any]) -> NDArray[Any]:
        """a (x's shape) as the kernels' (outer, C, inner) view."""
        return view3(a, self.ax)

    def like_x(self, a: Any, name: str) -> NDArray[Any] | None:
        """An input of x's shape and dtype (dy, residual, y); returns its (outer, C, inner) view."""
        return None if a is None else self.grad(a, name, allow_empty=True)

    def grad(self, a: Any, name: str = "dy", *, allow_empty: bool = False) -> NDArray[Any]:
        """A required input of x's shape and dtype (dy); returns its (outer, C, inner) view."""
        arr = as_input(a, name, allow_empty=allow_empty)
        check_same_shape(arr, self.x, name)
        self._declare(name, INPUT, arr)
        return view3(arr, self.ax)

    def param(self, v: Any, name: str) -> NDArray[Any] | None:
        """A per-channel parameter that is only read (gamma, beta, inference's running stats)."""
        if v is None:
            return None
        raw = v if type(v) is np.ndarray else as_array(v, name)
        self._declare(name, PARAM, raw)
        return channel_param(raw, name, self.C, self.x.dtype)

    def running(self, v: Any, name: str) -> NDArray[Any] | None:
        """A running statistic that this call updates in place (see running_buffer)."""
        arr = running_buffer(v, name, self.C, self.x.dtype)
        if arr is None:
            return None
        self._declare(name, RUNNING, arr)
        return self._aligned(arr, read=True)

    def saved(self, v: Any, name: str, shape: tuple[int, ...] | None = None) -> NDArray[np.float64]:
        """A saved statistic (mean, invstd, r, d, sums, M2), read as float64."""
        raw = v if v is None or type(v) is np.ndarray else as_array(v, name)
        arr = saved_stat(raw, name, self.C if shape is None else shape)
        self._declare(name, SAVED, raw)
        return arr

    def mask(self, mask: Any) -> NDArray[np.bool_] | None:
        """The positions' mask (bool, x's shape without the channel axis), an input."""
        if mask is None:
            return None
        m = mask_arg(mask, self.x, self.ax)
        self._declare("mask", INPUT, m)
        return m

    def output(self, out: Any, name: str = "out", *, in_place: bool = False) -> NDArray[Any]:
        """The array a kernel writes into, of x's shape and dtype: a new one, or the caller's
        ``out=`` if it is exactly right.  With ``in_place``, ``out`` may be x itself (the very
        same elements): the kernels that allow it read each value before writing it."""
        if out is None:
            return self.empty(self.x.shape, self.x.dtype)  # type: ignore[no-any-return]
        out = check_output(out, name, self.x.shape, self.x.dtype)
        if in_place and same_array(out, self.x):
            self._in_place = out
        self._declare(name, OUTPUT, out)
        return self._aligned(out)

    def gradient_inputs(
        self, x: Any, axis: Any, dy: Any, mean: Any, invstd: Any, *, allow_empty: bool = False
    ) -> tuple[NDArray[Any], NDArray[Any], NDArray[np.float64], NDArray[np.float64]]:
        """What every backward reads first: x (the data), dy (x's shape) and the forward's mean
        and invstd (saved statistics); returns ``(x, dy3, mean, invstd)``."""
        xa = self.data(x, axis, allow_empty=allow_empty)
        dy3 = self.grad(dy, allow_empty=allow_empty)
        return xa, dy3, self.saved(mean, "mean"), self.saved(invstd, "invstd")

    def affine_arrays(
        self, gamma: Any, beta: Any, residual: Any
    ) -> tuple[NDArray[Any] | None, NDArray[Any] | None, NDArray[Any] | None]:
        """The arrays of a forward's affine map and epilogue: gamma and beta (parameters) and the
        residual (an input of x's shape, viewed as the kernels take it)."""
        return (
            self.param(gamma, "gamma"),
            self.param(beta, "beta"),
            self.like_x(residual, "residual"),
        )

    def training_forward(
        self, gamma: Any, beta: Any, running_mean: Any, running_var: Any, out: Any,
        residual: Any = None,
    ) -> TrainingForward:  # fmt: skip
        """A training forward's arrays, as every training forward declares them: gamma and beta
        (parameters), the residual (an input of x's shape), the running statistics (updated in
        place) and out (the output, x itself allowed); returns what the kernels take, in that
        order: ``(g, b, rm, rv, y, residual3)``."""
        g, b, res3 = self.affine_arrays(gamma, beta, residual)
        if (running_mean is None) != (running_var is None):
            given, missing = (
                ("running_mean", "running_var") if running_var is None
                else ("running_var", "running_mean")
            )  # fmt: skip
            raise ValueError(
                f"{missing}: required with {given} (training updates both running statistics; "
                "pass both, or neither to keep none)"
            )
        rm = self.running(running_mean, "running_mean")
        rv = self.running(running_var, "running_var")
        y = self.output(out, in_place=True)
        return TrainingForward(g, b, rm, rv, y, res3)

    def backward_arrays(
        self, mean: Any, invstd: Any, gamma: Any, y: Any, out: Any
    ) -> BackwardArrays:
        """A backward's arrays, as every batch-norm backward declares them: the forward's mean
        and invstd (saved statistics), gamma (a parameter), y (the forward's output, an input, for
        the ReLU mask) and out (dx, the output)."""
        return BackwardArrays(
            self.saved(mean, "mean"),
            self.saved(invstd, "invstd"),
            self.param(gamma, "gamma"),
            self.like_x(y, "y"),
            self.output(out),
        )

    def _aligned(self, a: NDArray[Any], *, read: bool = False) -> NDArray[Any]:
        """a, or an aligned scratch array (holding a's values if the kernel `read`s them) that
        finish() copies back into it."""
        if type(a) is not np.ndarray or a.flags.aligned:  # (device memory is always aligned)
            return a
        scratch = np.array(a) if read else np.empty(a.shape, dtype=a.dtype)
        self._writebacks.append((scratch, a))
        return scratch

    def seal(self) -> None:
        """The overlap rule, over every array declared: an output or an updated running statistic
        shares memory with no other argument (but ``out`` may be ``x`` itself where in-place is
        allowed)."""
        arrays = self._arrays
        in_place = self._in_place is not None
        may_share: Any = np.may_share_memory
        shares: Any = np.shares_memory
        if self.device is not None:  # (CuPy arrays: their extents, exact for contiguous outputs)
            may_share = shares = _device.may_share_memory
        for i, (name, role, a) in enumerate(arrays):
            if role is not RUNNING and role is not OUTPUT:
                continue
            for j, (other, other_role, b) in enumerate(arrays):
                if j == i or (j < i and (other_role is RUNNING or other_role is OUTPUT)):
                    continue  # each pair of written arrays once
                if not may_share(a, b):  # bounds: the common answer, in one C call
                    continue
                if in_place and _in_place_pair(self, a, role, b, other_role):
                    continue
                if shares(a, b):
                    raise ValueError(_overlap_message(name, role, other, other_role))

    def finish(self) -> None:
        """After the kernels: copy aligned scratch back into the caller's unaligned arrays."""
        for scratch, target in self._writebacks:
            np.copyto(target, scratch)


def _in_place_pair(call: Call, a: NDArray[Any], role: str, b: NDArray[Any], b_role: str) -> bool:
    """The in-place exception: ``out`` is x itself, and the other array is an input that is also
    x itself (x, or a residual that is x): each value is read before its result is written."""
    if a is call._in_place and b_role == INPUT:
        return same_array(b, call.x)
    if b is call._in_place and role == INPUT:
        return same_array(a, call.x)
    return False


def _overlap_message(name: str, role: str, other: str, other_role: str) -> str:
    if role == OUTPUT and other_role == OUTPUT:
        return f"{name}: overlaps another output ({other}); pass separate buffers"
    if role == OUTPUT:
        if other_role == INPUT and other == "x":
            return (
                f"{name}: overlaps an input array (x); pass a separate buffer (only x itself, "
                "the very same array, is allowed, and only by the forwards)"
            )
        return (
            f"{name}: overlaps an input array ({other}, {_ROLE_TEXT[other_role]}); "
            "pass a separate buffer"
        )
    return (
        f"{name}: overlaps {other} ({_ROLE_TEXT[other_role]}); a running statistic is updated in "
        "place, so it must have memory of its own"
    )


_ROLE_TEXT = {
    INPUT: "an input",
    PARAM: "a parameter",
    RUNNING: "a running statistic",
    SAVED: "a saved statistic",
    OUTPUT: "an output",
}
